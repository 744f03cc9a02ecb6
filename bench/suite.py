#!/usr/bin/env python3
"""The benchmark suite: measures the agent, the bundler and a peer, writes BENCHMARKS.md.

    bench/suite.py --agent PATH --bundler PATH [--quick] [--out BENCHMARKS.md]

Normally started by bench/run.sh, which builds the binaries first. Every measurement
runs in its own guarded section: one that cannot run on this machine (no dockerd, no
cross toolchain, mender-client not installed, ...) says why in the table and the suite
goes on. Benchmarks are not tests: a slow number never fails the run. The exit status
is non-zero only when the suite itself is broken (a bug here, not a slow machine).
"""
import argparse
import resource
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (  # noqa: E402
    CLK_TCK, FLEET, PREFIX, ROOT, Broker, Dockerd, Fleet, HttpServer, Nginx, Observer, OnlineCounter, Procs, Registry,
    Skip, agent_config, build_busybox_image, cpu_ticks, meminfo, proc_memory, rss_by_mapping, log, machine, make_tls,
    pct, proc_status, push, run, tail, wait_for,
)

MIB = 1024 * 1024
# Failures that come from the machine or the product under test, not from a bug here.
EXPECTED = (Skip, TimeoutError, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, ConnectionError,
            RuntimeError)


def mib(n):
    return f"{n / MIB:.2f} MiB"


def kib_to_mib(k):
    return f"{k / 1024:.2f} MiB"


def ms(s):
    return f"{s * 1000:.0f} ms"


class Results:
    def __init__(self):
        self.rows = []  # dicts: group, figure, measured, target, met, method
        self.details = []  # (title, markdown)
        self.broken = []  # suite bugs (tracebacks)
        self.seen = set()

    def row(self, group, figure, measured, target="", met=None, method=""):
        self.seen.add(figure)
        self.rows.append(dict(group=group, figure=figure, measured=measured, target=target, met=met, method=method))

    def detail(self, title, text):
        self.details.append((title, text))


def guarded(res, name, placeholders, fn, *args):
    """Runs one measurement; on failure, rows not yet recorded say why."""
    log(f"== {name}")
    t = time.monotonic()
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, subprocess.CalledProcessError):
            err = (e.stderr or e.stdout or "").strip().splitlines()
            reason = f"`{' '.join(map(str, e.cmd[:3]))} ...` exited {e.returncode}" + (f": {err[-1]}" if err else "")
        if not isinstance(e, EXPECTED):
            res.broken.append(f"{name}: {traceback.format_exc()}")
            reason = f"suite error ({type(e).__name__}: {reason})"
        log(f"{name}: not measured: {reason}")
        if isinstance(e, EXPECTED) and not isinstance(e, Skip):
            traceback.print_exc()
        reason = reason.replace("|", "\\|")
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        for group, figure, target in placeholders:
            if figure not in res.seen:
                res.row(group, figure, f"not measured: {reason}", target, None, "")
    finally:
        log(f"{name}: {time.monotonic() - t:.1f} s")


# --- binary sizes ---------------------------------------------------------------------


def elf_is_static(path):
    """True when the ELF file has no PT_INTERP program header (no dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        is64 = head[4] == 2
        endian = "<" if head[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(endian + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        else:
            phoff, = struct.unpack_from(endian + "I", head, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x2A)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ptype, = struct.unpack(endian + "I", f.read(4))
            if ptype == 3:
                return False
    return True


def stripped_size(path, work, strip="strip"):
    copy = os.path.join(work, os.path.basename(path) + ".stripped")
    shutil.copy(path, copy)
    if shutil.which(strip):
        run([strip, copy], check=False)
    return os.path.getsize(copy)


def measure_sizes(ctx):
    res = ctx.res
    size = stripped_size(ctx.agent, ctx.work)
    link = "static" if elf_is_static(ctx.agent) else "dynamically linked to glibc"
    res.row("Footprint", "agent binary, x86_64, stripped", f"{mib(size)} ({size:,} B, {link})", "≤ 3 MiB",
            size <= 3 * MIB, "`cargo build --release -p fleet-agent` (opt-level z, fat LTO, panic=abort, strip), "
            "size of the file after `strip`")
    ctx.sizes["x86_64"] = size
    bsize = stripped_size(ctx.bundler, ctx.work)
    res.row("Footprint", "bundler binary, x86_64, stripped", f"{mib(bsize)}", "", None,
            "release build (opt-level 3 for the bundler; runs in CI, not on devices)")


def cross_toolchain_missing(short):
    """Debian packages that cross/build.sh needs for a target and that are not installed."""
    pkgs = ["rustc-web", "rust-web-src"]
    pkgs += ["musl-dev:amd64"] if short == "x86_64" else ["musl-dev:arm64", "gcc-aarch64-linux-gnu"]
    return [p for p in pkgs
            if "install ok installed" not in run(["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout]


def measure_cross(ctx):
    """Static builds with cross/build.sh: x86_64 (as in the amd64 .deb) and aarch64."""
    res = ctx.res
    script = os.path.join(ROOT, "cross", "build.sh")
    if not os.path.exists(script):
        raise Skip("cross/build.sh is not in this checkout")
    targets, skipped = [], {}
    rows = {}
    # rows for both targets are written below, whatever happens
    for short, triple in (("x86_64", "x86_64-unknown-linux-musl"), ("aarch64", "aarch64-unknown-linux-musl")):
        missing = cross_toolchain_missing(short)
        no_toolchain = (f"Debian's cross toolchain is not installed ({', '.join(missing)}; "
                        "`scripts/setup.sh --cross` installs it)") if missing else ""
        if ctx.quick:
            # A binary cross/build.sh already left in dist/ (CI builds aarch64 before the
            # tests) is reported as it is; --quick never starts a static build.
            dist = os.environ.get("DIST_DIR", "dist")
            prev = os.path.join(dist if os.path.isabs(dist) else os.path.join(ROOT, dist), f"fleet-agent-{triple}")
            if os.path.isfile(prev):
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.path.getmtime(prev)))
                rows[short] = dict(bytes=os.path.getsize(prev), linkage="static" if elf_is_static(prev) else "dynamic",
                                   secs="", path=prev, note=f"; the binary cross/build.sh left in {dist}/ "
                                   f"at {when} (--quick does not rebuild it)")
            else:
                skipped[short] = no_toolchain or ("--quick skips the static builds (minutes each on 2 cores) and "
                                                  f"found none in {dist}/; the full run builds them")
            continue
        if no_toolchain:
            skipped[short] = no_toolchain
            continue
        targets.append(short)
    secs = 0.0
    if targets:
        dist = os.path.join(ctx.work, "dist")
        env = dict(os.environ, DIST_DIR=dist, FLEET_CROSS_NO_APT="1", CARGO_TARGET_DIR=ctx.target_dir)
        log(f"cross/build.sh --targets {','.join(targets)}")
        t = time.monotonic()
        p = run(["bash", script, "--targets", ",".join(targets)], timeout=3600, env=env, check=False)
        secs = time.monotonic() - t
        tsv = os.path.join(dist, "sizes.tsv")
        if os.path.exists(tsv):
            with open(tsv) as f:
                for line in list(f)[1:]:
                    r = line.rstrip("\n").split("\t")
                    rows[r[0].split("-")[0]] = dict(bytes=int(r[2]), linkage=r[4], secs=r[5],
                                                    path=os.path.join(dist, f"fleet-agent-{r[0]}"))
        lines = (p.stderr + p.stdout).strip().splitlines()
        for short in targets:
            if short not in rows:
                skipped[short] = f"cross/build.sh failed (exit {p.returncode}): {lines[-1] if lines else 'no output'}"
    x = rows.get("x86_64")
    if x:
        ctx.sizes["x86_64_static"] = x["bytes"]
        res.row("Footprint", "agent binary, x86_64 static (as in the amd64 .deb), stripped",
                f"{mib(x['bytes'])} ({x['bytes']:,} B, {x['linkage']})", "≤ 3 MiB", x["bytes"] <= 3 * MIB,
                "`cross/build.sh --targets x86_64` (static musl, std built for size), stripped" + x.get("note", ""))
        # With --quick, FLEET_BENCH_STATIC_FROM_DIST=1 measures the device with the static
        # binary found in dist/ too (a re-measure after cross/build.sh, without rebuilding).
        from_dist = os.environ.get("FLEET_BENCH_STATIC_FROM_DIST") == "1"
        if x["linkage"] == "static" and (not x.get("note") or from_dist):
            ctx.device_agent = x["path"]
            ctx.device_agent_label = "static x86_64 build (as shipped)"
    else:
        res.row("Footprint", "agent binary, x86_64 static (as in the amd64 .deb), stripped",
                f"not measured: {skipped.get('x86_64', 'unknown')}", "≤ 3 MiB", None, "")
    a = rows.get("aarch64")
    if a:
        ctx.sizes["aarch64"] = a["bytes"]
        res.row("Footprint", "agent binary, aarch64, stripped", f"{mib(a['bytes'])} ({a['bytes']:,} B, {a['linkage']})",
                "≤ 2.5 MiB", a["bytes"] <= 2.5 * MIB,
                "`cross/build.sh --targets aarch64` (static musl, std built for size, same release profile), stripped"
                + a.get("note", ""))
    else:
        res.row("Footprint", "agent binary, aarch64, stripped", f"not measured: {skipped.get('aarch64', 'unknown')}",
                "≤ 2.5 MiB", None, "")
    if targets:
        log(f"static builds took {secs:.0f} s")


def measure_bloat(ctx):
    """`cargo bloat --crates` of the agent (full runs only: it needs a build with symbols)."""
    if ctx.quick:
        raise Skip("--quick skips it (a separate release build with symbols)")
    if run(["cargo", "bloat", "--version"], check=False).returncode != 0:
        raise Skip("cargo-bloat is not installed (`cargo install cargo-bloat`)")
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ctx.target_dir, "bloat"), CARGO_PROFILE_RELEASE_STRIP="false")
    p = run(["cargo", "bloat", "--release", "-p", "fleet-agent", "--bin", "fleet-agent", "--crates", "-n", "15"],
            timeout=3600, env=env, cwd=ROOT)
    table = ["| crate | code size | share of .text |", "|---|---:|---:|"]
    total = ""
    for ln in p.stdout.splitlines()[1:]:
        parts = ln.split(None, 3)
        if len(parts) == 4 and parts[0].endswith("%") and parts[1].endswith("%"):
            if parts[3].startswith(".text section size"):
                total = parts[2]
            elif parts[3].startswith("And "):
                table.append(f"| ({parts[3].split('.')[0][4:]}) | {parts[2]} | {parts[1]} |")
            else:
                table.append(f"| {parts[3]} | {parts[2]} | {parts[1]} |")
    if total:
        table.append(f"| **.text in all** | **{total}** | |")
    ctx.res.detail("What the agent binary is made of", "`cargo bloat --release -p fleet-agent --crates` on x86_64 "
                   "(dynamically linked against glibc, std prebuilt; the shipped static builds link musl and "
                   "compile std for size). The rest of the stripped file is read-only "
                   "data, unwind tables (`.eh_frame`) and relocations.\n\n" + "\n".join(table))


# --- mender-client side by side -------------------------------------------------------


def measure_mender(ctx, seconds):
    """Runs in a thread; stores its figures in ctx.mender (or the exception)."""
    binary = "/usr/bin/mender"
    if not os.path.exists(binary):
        raise Skip("mender-client is not installed (bench/run.sh installs it with apt-get when run as root)")
    version = "3.4"
    p = run([binary, "--version"], check=False)
    m = re.search(r"(\d+\.\d+\.\d+)", p.stdout + p.stderr)
    if m:
        version = m.group(1)
    created = []
    ident_dir = "/usr/share/mender/identity"
    ident = os.path.join(ident_dir, "mender-device-identity")
    art = "/etc/mender/artifact_info"
    t = os.path.join(ctx.work, "mender")
    os.makedirs(os.path.join(t, "data"), exist_ok=True)
    proc = None
    try:
        for d in (ident_dir, "/etc/mender"):
            if not os.path.isdir(d):
                os.makedirs(d)
                created.append(d)
        if not os.path.exists(ident):
            with open(ident, "w") as f:
                f.write("#!/bin/sh\necho mac=02:00:00:00:00:01\n")
            os.chmod(ident, 0o755)
            created.append(ident)
        if not os.path.exists(art):
            with open(art, "w") as f:
                f.write("artifact_name=bench\n")
            created.append(art)
        with open(os.path.join(t, "data", "device_type"), "w") as f:
            f.write("device_type=bench\n")
        conf = os.path.join(t, "mender.conf")
        with open(conf, "w") as f:
            json.dump({"ServerURL": "https://127.0.0.1:9/", "InventoryPollIntervalSeconds": 5,
                       "UpdatePollIntervalSeconds": 5, "RetryPollIntervalSeconds": 5,
                       "DeviceTypeFile": f"{t}/data/device_type", "ModulesWorkPath": f"{t}/data/modules/v3"}, f)
        proc = ctx.procs.spawn("mender", [binary, "--no-syslog", "-c", conf, "-b", "/nonexistent", "-d",
                                          f"{t}/data", "daemon"], os.path.join(t, "mender.log"))
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if proc.poll() is not None:
                raise RuntimeError(f"mender exited with {proc.returncode}: {tail(proc.bench_log, 5)}")
            time.sleep(0.5)
        st = proc_status(proc.pid)
        ticks = cpu_ticks(proc.pid)
        libs = set()
        for line in run(["ldd", binary], check=False).stdout.splitlines():
            mm = re.search(r"=>\s+(\S+)", line) or re.match(r"\s*(/\S+)", line)
            if mm and os.path.exists(mm.group(1)):
                libs.add(os.path.realpath(mm.group(1)))
        ctx.mender = dict(version=version, rss=st["VmRSS"], hwm=st["VmHWM"], cpu=ticks / CLK_TCK, secs=seconds,
                          size=os.path.getsize(binary), libs=sum(os.path.getsize(x) for x in libs), nlibs=len(libs))
    finally:
        if proc is not None:
            ctx.procs.stop(proc)
        for path in reversed(created):
            try:
                if os.path.isdir(path):
                    os.rmdir(path)
                else:
                    os.remove(path)
            except OSError as e:
                log(f"mender cleanup: cannot remove {path}: {e}")


def mender_thread(ctx, seconds):
    def body():
        try:
            measure_mender(ctx, seconds)
        except Exception as e:  # noqa: BLE001
            ctx.mender = e
            if not isinstance(e, EXPECTED):
                ctx.res.broken.append(f"mender: {traceback.format_exc()}")
    th = threading.Thread(target=body, daemon=True)
    th.start()
    return th


def report_mender(ctx):
    res, m = ctx.res, ctx.mender
    if m is None:
        raise RuntimeError("the mender measurement did not finish")
    if isinstance(m, EXPECTED):
        raise m
    if isinstance(m, Exception):  # already listed as a suite error by the thread
        raise RuntimeError(f"suite error ({type(m).__name__}: {m})")
    cmp = ""
    if getattr(ctx, "idle", None):
        cmp = f" (fleet-agent: {kib_to_mib(ctx.idle['rss'])}, {m['rss'] / ctx.idle['rss']:.0f}× less)"
    cmp_size = ""
    if ctx.sizes.get("x86_64_static"):
        cmp_size = f" (fleet-agent: {mib(ctx.sizes['x86_64_static'])}, static, no shared library)"
    elif ctx.sizes.get("x86_64"):
        cmp_size = f" (fleet-agent: {mib(ctx.sizes['x86_64'])} + libc)"
    res.row("Side by side", f"mender-client {m['version']}: idle RSS after {m['secs']} s", kib_to_mib(m["rss"]) + cmp,
            "", None,
            "Debian's package with the minimal config it needs, daemon polling a closed local port every 5 s, run "
            "alongside the agent's idle window; VmRSS from /proc/PID/status")
    res.row("Side by side", "mender-client: binary size", f"{mib(m['size'])} (+ {mib(m['libs'])} in {m['nlibs']} "
            f"shared libraries){cmp_size}", "", None, "`/usr/bin/mender` as packaged (Go); shared libraries from `ldd`")


# --- one device: idle, config-change latency, bytes, apply peak, image change ----------

CONF_LINES = "# managed by fleet (benchmark)\nlisten = 0.0.0.0:8080\nlog_level = info\nrevision = {rev}\n"


class DeviceBench:
    DEV = "dev-01"
    DEV2 = "dev-02"

    def __init__(self, ctx):
        self.ctx = ctx
        self.dir = os.path.join(ctx.work, "device")
        os.makedirs(self.dir, exist_ok=True)
        self.tls = ctx.tls
        self.tls_note = ctx.tls_note
        self.broker = Broker(ctx.procs, self.dir, self.tls)
        self.roots = os.path.join(self.dir, "roots")
        os.makedirs(self.roots, exist_ok=True)
        # Files without an explicit target land under <file_root>/<app>/: dev-01's allowed root.
        self.fleet = Fleet(ctx.bundler, os.path.join(self.dir, "repo"), file_root=os.path.join(self.roots, self.DEV))
        self.http = HttpServer(ctx.procs, self.dir, self.fleet.out)
        self.obs = Observer(self.broker.port)
        self.rev = 1
        self.fleet.write(f"devices/{self.DEV}.yaml", "labels:\n  site: bench\n  hardware: rpi4\n  slot: dev-01\n")
        self.fleet.write("apps/conf/app.yaml", "description: one config file\nselector:\n  slot: dev-01\nfiles:\n"
                         f"  - source: files/app.conf\n    target: {self.roots}/dev-01/conf/app.conf\n")
        # A second device, only for the dynamically linked build's idle figure.
        self.fleet.write(f"devices/{self.DEV2}.yaml", "labels:\n  site: bench\n  hardware: rpi4\n  slot: dev-02\n")
        self.fleet.write("apps/conf2/app.yaml", "description: one config file\nselector:\n  slot: dev-02\nfiles:\n"
                         f"  - source: files/app.conf\n    target: {self.roots}/dev-02/conf/app.conf\n")
        self.fleet.write("apps/conf2/files/app.conf", CONF_LINES.format(rev=1))
        self.fleet.write("apps/conf/files/app.conf", CONF_LINES.format(rev=self.rev))
        self.fleet.commit("v1")
        self.fleet.build()
        self.publish()
        self.agent = None
        self.engine = "none"
        self.engine_note = "no container engine (engine.socket = \"none\")"
        self.dockerd = ctx.dockerd
        if self.dockerd:
            self.engine = self.dockerd.sock
            self.engine_note = "engine: a private dockerd 20.10"

    def publish(self):
        return run(self.fleet.publish_cmd(self.broker.url, self.http.url), timeout=60)

    @property
    def mqtt_url(self):
        return self.broker.tls_url if self.tls else self.broker.url

    def spawn_agent(self, device, binary, extra=None, env=None, tag="agent", wrap=()):
        """Starts an agent for `device` (under the `wrap` command, if any) and waits for its
        first status after the start."""
        # The config lives beside the roots, never above them (the agent refuses an
        # allowed root inside its config directory).
        cfg = agent_config(os.path.join(self.dir, "cfg", f"{tag}.toml"), device, os.path.join(self.dir, f"state-{device}"),
                           [os.path.join(self.roots, device)], self.fleet.pubkey, self.mqtt_url,
                           self.tls and self.tls["ca"], self.http.url, self.engine, extra)
        os.makedirs(os.path.join(self.roots, device), exist_ok=True)
        t = time.monotonic()
        e = dict(os.environ)
        e.pop("FLEET_LOG", None)
        e.update(env or {})
        proc = self.ctx.procs.spawn("fleet-agent", [*wrap, binary, "run", "--config", cfg],
                                    os.path.join(self.dir, f"{tag}.log"), env=e)
        proc.started = t
        try:
            wait_for(f"the first status of {device}", 30, lambda: proc.poll() is None and any(
                m[0] >= t and m[1] == device and m[2] == "status" for m in list(self.obs.messages[-50:])))
        except TimeoutError:
            raise RuntimeError(f"the agent did not report within 30 s: {tail(proc.bench_log, 8)}")
        return proc

    def start_agent(self, extra=None, env=None, tag="agent", wrap=()):
        if self.agent is not None:
            self.stop_agent()
        self.agent = self.spawn_agent(self.DEV, self.ctx.device_agent, extra, env, tag, wrap)
        self.agent_started = self.agent.started
        return self.agent

    def stop_agent(self):
        # The whole process group: under strace (which ignores SIGTERM when it started the
        # program) the agent must get the SIGTERM itself.
        try:
            os.killpg(self.agent.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.ctx.procs.stop(self.agent)
        self.agent = None

    def version(self):
        return self.fleet.index()["devices"][self.DEV]["version"]

    def change(self, text=None, timeout=60):
        """One config change: edit, commit, build (untimed), then time publish → converged."""
        self.rev += 1
        self.fleet.write("apps/conf/files/app.conf", text or CONF_LINES.format(rev=self.rev))
        self.fleet.commit(f"rev {self.rev}")
        _, build_secs = self.fleet.build()
        ver = self.version()
        t0 = time.monotonic()
        self.publish()
        t_pub = time.monotonic()
        done = self.obs.wait_converged({self.DEV: ver}, timeout, since=t0)
        t_conv = done[self.DEV]
        t_ann = self.obs.desired_at.get((self.DEV, ver))
        t_fin = self.obs.finished_at.get((self.DEV, ver))
        return dict(ver=ver, t0=t0, total=t_conv - t0, publish=t_pub - t0, ann=(t_ann - t0) if t_ann else None,
                    fin=(t_fin - t0) if t_fin else None, t_conv=t_conv, build=build_secs)

    def close(self):
        try:
            self.obs.close()
        except Exception:  # noqa: BLE001
            pass


def measure_idle(ctx, dev, seconds):
    res = ctx.res
    agent = dev.start_agent(tag="idle")
    dyn = None
    if ctx.device_agent != ctx.agent:
        # The dynamically linked `cargo build --release` binary, idle alongside.
        dyn = dev.spawn_agent(dev.DEV2, ctx.agent, tag="idle-dynamic")
    want = {dev.DEV: dev.version()}
    if dyn:
        want[dev.DEV2] = dev.fleet.index()["devices"][dev.DEV2]["version"]
    dev.obs.wait_converged(want, 60)
    time.sleep(2)
    procs = [agent] + ([dyn] if dyn else [])
    t0 = time.monotonic()
    c0 = [cpu_ticks(p.pid) for p in procs]
    s0 = [proc_status(p.pid) for p in procs]
    rss = [[] for _ in procs]
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        for i, p in enumerate(procs):
            if p.poll() is not None:
                raise RuntimeError(f"an agent exited during the idle window: {tail(p.bench_log, 8)}")
            rss[i].append(proc_status(p.pid)["VmRSS"])
    window = time.monotonic() - t0
    c1 = [cpu_ticks(p.pid) for p in procs]
    s1 = [proc_status(p.pid) for p in procs]
    maps = sorted(rss_by_mapping(agent.pid).items(), key=lambda kv: -kv[1])
    if dyn:
        maps_dyn = sorted(rss_by_mapping(dyn.pid).items(), key=lambda kv: -kv[1])
    ctx.procs.stop(procs)
    dev.agent = None

    def table(maps, binary):
        lines = ["| mapping | RSS |", "|---|---:|"]
        for name, kib in maps[:7]:
            label = os.path.basename(name) if name.startswith("/") else name
            if name == binary:
                label = "the fleet-agent binary (code, read-only data)"
            lines.append(f"| {label} | {kib} KiB |")
        return "\n".join(lines)
    text = ("From `/proc/PID/smaps` at the end of the idle window. File-backed pages are clean: the kernel "
            "can drop them under memory pressure and read them again; anonymous pages (heap, stacks) are the "
            "agent's own memory.\n\n" + f"{ctx.device_agent_label}:\n\n" + table(maps, ctx.device_agent))
    if dyn:
        text += "\n\nThe dynamically linked release build:\n\n" + table(maps_dyn, ctx.agent)
    res.detail("Where the idle agent's RSS is", text)

    session = "TLS" if dev.tls else dev.tls_note
    method = (f"`fleet-agent run`, live MQTT session over {session} to a local Mosquitto, bundle fetch over HTTP, "
              f"{dev.engine_note}; converged on a one-file bundle, then sampled 1/s for {window:.0f} s; "
              "VmRSS/VmHWM/RssAnon/RssFile from /proc/PID/status")
    labels = [ctx.device_agent_label, "dynamically linked glibc build, for comparison (devices run the static one)"]
    for i in range(len(procs)):
        st = s1[i]
        res.row("Footprint", f"agent idle RSS, {labels[i]} ({window:.0f} s window)",
                f"{kib_to_mib(st['VmRSS'])} (anonymous {kib_to_mib(st.get('RssAnon', 0))} + file-backed "
                f"{kib_to_mib(st.get('RssFile', 0))}; max in window {kib_to_mib(max(rss[i]))}; lifetime peak "
                f"VmHWM {kib_to_mib(st['VmHWM'])})", "≤ 4 MiB" if i == 0 else "",
                st["VmRSS"] <= 4096 if i == 0 else None,
                method if i == 0 else "the same, a second device alongside in the same window")
    ctx.idle = dict(rss=s1[0]["VmRSS"])
    cpu = (c1[0] - c0[0]) / CLK_TCK
    wake = (s1[0]["ctxt"] - s0[0]["ctxt"]) / window
    res.row("Footprint", f"agent idle CPU ({window:.0f} s window)",
            f"{cpu:.2f} CPU-s = {100 * cpu / window:.3f} % of one core; {wake:.2f} context switches/s",
            "~0", cpu / window < 0.005, "CPU time over the window from /proc/PID/task/*/schedstat; context switches summed "
            "over threads from /proc/PID/task/*/status (MQTT keepalive 30 s, reconcile every 60 s)")


def measure_latency(ctx, dev, n):
    res = ctx.res
    # Default config: changes 5 s apart, so the status limiter starts each one rested
    # (its token bucket full), as for an isolated change in the field.
    passes = [("default config (status_min_interval_ms = 1000)", {}, 5.0),
              ("status_min_interval_ms = 0", {"status_min_interval_ms": 0}, 0.3)]
    rows = []
    for label, extra, pause in passes:
        dev.start_agent(extra=extra, tag="latency" + ("0" if extra else ""))
        dev.obs.wait_converged({dev.DEV: dev.version()}, 60)
        time.sleep(1.2)
        runs = []
        for i in range(n):
            r = dev.change()
            runs.append(r)
            time.sleep(pause)
        if not extra:
            time.sleep(1.5)  # trailing status/events of the last change
            r = runs[-1]
            ctx.bytes_snapshot = dict(
                run=r, messages=[m for m in list(dev.obs.messages) if m[1] == dev.DEV and r["t0"] <= m[0]],
                requests=dev.http.requests(), index=dev.fleet.index()["devices"][dev.DEV])
        commits = committed_times(dev.agent.bench_log)
        wall_off = time.time() - time.monotonic()
        for r in runs:
            c = commits.get(r["ver"])
            r["committed"] = (c - wall_off - r["t0"]) if c else None
        tot = [r["total"] for r in runs]
        ann = [r["ann"] for r in runs if r["ann"] is not None]
        pub = [r["publish"] for r in runs]
        com = [r["committed"] for r in runs if r["committed"] is not None]
        fin = [r["fin"] for r in runs if r["fin"] is not None]
        rows.append((label, runs, tot, ann, pub, fin, com))
        if not extra:
            res.row("Latency", f"config-only change, publish → `converged` (p50 / p95, n = {n})",
                    f"{ms(pct(tot, 50))} / {ms(pct(tot, 95))}", "p50 ≤ 50 ms", pct(tot, 50) <= 0.050,
                    f"one line of one file changed, changes 5 s apart; committed and built (untimed), then from just before "
                    f"`fleet-bundler publish` to the retained status with `state: converged` for the new version "
                    f"arriving at a subscriber; agent with default config over {'TLS' if dev.tls else 'plain'} MQTT, "
                    f"{dev.engine_note}, loopback")
        else:
            res.row("Latency", f"… same, agent with `status_min_interval_ms = 0` (p50 / p95, n = {n})",
                    f"{ms(pct(tot, 50))} / {ms(pct(tot, 95))}", "p50 ≤ 50 ms", pct(tot, 50) <= 0.050,
                    "as above; shows the agent's own work without the status rate limit")
    lines = ["| agent config | `converged` p50 | p95 | max | `apply_finished` event (p50) | committed, agent's log "
             "(p50) | announcement at subscriber (p50) | publish command exits (p50) | build, untimed (p50) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, runs, tot, ann, pub, fin, com in rows:
        builds = [r["build"] for r in runs]
        lines.append(f"| {label} | {ms(pct(tot, 50))} | {ms(pct(tot, 95))} | {ms(max(tot))} | "
                     f"{ms(pct(fin, 50)) if fin else 'n/a'} | {ms(pct(com, 50)) if com else 'n/a'} | "
                     f"{ms(pct(ann, 50)) if ann else 'n/a'} | {ms(pct(pub, 50))} | {ms(pct(builds, 50))} |")
    lines.append("")
    lines.append("All times from just before `fleet-bundler publish` starts (a new process that connects to the "
                 "broker over plain loopback MQTT and publishes with QoS 1). \"announcement at subscriber\" is when a "
                 "bystander subscriber received the retained announcement; the `apply_finished` event is published "
                 "(not rate-limited) when the agent committed the bundle; \"committed, agent's log\" is the "
                 "timestamp of the agent's `bundle committed` log line (same clock); the gap between it and the "
                 "`apply_finished` column is time spent between the agent's socket and the subscriber.")
    res.detail("Config-only change latency", "\n".join(lines))


def measure_bytes(ctx, dev):
    res = ctx.res
    snap = getattr(ctx, "bytes_snapshot", None)
    if not snap:
        raise RuntimeError("no config change was measured")
    idx = snap["index"]
    digest, bsize = idx["digest"], idx["size"]
    msgs = snap["messages"]
    ann = [m for m in msgs if m[2] == "desired"]
    status = [m for m in msgs if m[2] == "status"]
    events = [m for m in msgs if m[2] == "events"]
    reqs = [q for q in snap["requests"] if digest in q[1]]
    http_in = sum(q[3] for q in reqs)
    http_out = sum(q[4] for q in reqs)
    ann_wire = sum(m[3] for m in ann)
    ann_payload = sum(m[4] for m in ann)
    down = ann_wire + http_out
    up_mqtt = sum(m[3] for m in status + events)
    res.row("Wire", "bytes per device for a one-line config change (down: announcement + bundle)",
            f"{down:,} B = announcement {ann_wire} B (JSON {ann_payload} B) + bundle {bsize:,} B "
            f"(+ {http_out - bsize} B HTTP headers)", "", None,
            "announcement as the MQTT PUBLISH a subscriber receives; bundle size from index.json; HTTP response bytes "
            "counted by the bench's file server; TLS adds ~22-29 B per record on top")
    res.row("Wire", "… and up: status + events, and the HTTP request",
            f"{up_mqtt:,} B in {len(status)} status + {len(events)} event messages; GET request {http_in} B", "", None,
            "MQTT PUBLISH packets from the agent as relayed by the broker during the change")
    with open(os.path.join(dev.fleet.out, "devices", f"{dev.DEV}.json"), "rb") as f:
        ctx.wire = dict(pointer=len(f.read()))


SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "msync")
SYNC_CALL = re.compile(rf"^\d+\s+({'|'.join(SYNC_CALLS)})\(\d+<([^>]*)>")


def sync_target(path, state_dir):
    """What an fsync'd path is, in words: temp files and digests folded into one name."""
    name = os.path.basename(path)
    name = re.sub(r"^\.(.*)\.fleet-tmp\.[0-9a-f]+$", r"\1", name)  # temp names end in random hex
    name = re.sub(r"[0-9a-f]{64}", "<digest>", name)
    if os.path.realpath(path).startswith(os.path.realpath(state_dir)):
        rel = os.path.relpath(os.path.join(os.path.dirname(path), name), state_dir)
        return "state dir (directory)" if rel == "." else f"state dir: {rel}"
    return "managed file or its directory"


def sync_tracer(dev, tag):
    """The strace command line that logs the agent's fsync-family calls (with the paths)
    to a file, and a function that reads them back. seccomp-bpf stops the agent only at
    those calls, so the rest of its work runs at full speed."""
    strace = shutil.which("strace")
    if not strace:
        raise Skip("strace is not installed (apt-get install strace)")
    trace = os.path.join(dev.dir, f"{tag}.strace")
    if os.path.exists(trace):
        os.unlink(trace)
    wrap = (strace, "-f", "--seccomp-bpf", "-qq", "-y", "-e", "signal=none", "-e", "trace=" + ",".join(SYNC_CALLS),
            "-o", trace)

    def calls():
        with open(trace, errors="replace") as f:
            return [m.groups() for m in map(SYNC_CALL.match, f) if m]
    return wrap, calls


def measure_fsyncs(ctx, dev, n=3):
    """fsync-family calls per config-only change, counted by strace on the agent."""
    res = ctx.res
    wrap, calls = sync_tracer(dev, "fsync")
    dev.start_agent(tag="fsync", wrap=wrap)
    dev.obs.wait_converged({dev.DEV: dev.version()}, 60)
    state_dir = os.path.join(dev.dir, f"state-{dev.DEV}")
    per_change = []
    time.sleep(1.5)
    for _ in range(n):
        before = len(calls())
        dev.change()
        time.sleep(1.5)  # the trailing status writes
        per_change.append(calls()[before:])
    dev.stop_agent()
    median_run = sorted(per_change, key=len)[len(per_change) // 2]
    median = len(median_run)
    res.row("Footprint", f"fsync-family calls per config-only change (median, n = {n})", f"{median}",
            "", None, f"strace -f on the agent: {', '.join(SYNC_CALLS)} from the announcement to the trailing "
            "status; one managed file changes; each costs ~10-50 ms on an SD card")
    by = {}
    for call, path in median_run:
        key = (sync_target(path, state_dir), call)
        by[key] = by.get(key, 0) + 1
    lines = ["| what | call | count |", "|---|---|---:|"]
    for (what, call), k in sorted(by.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {what} | `{call}` | {k} |")
    lines.append("")
    lines.append("One config-only change (the median one), by the file each call synced (`strace -y`). The journal "
                 "takes one `fdatasync` per record (intent before each effect, done after it); a file replaced "
                 "atomically takes an `fsync` of the file and one of its directory.")
    res.detail("fsync calls per config change", "\n".join(lines))


def log_time(ts):
    """RFC 3339 timestamp of a tracing JSON log line → unix seconds."""
    secs = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    frac = re.match(r"\.(\d+)", ts[19:])
    return secs + (float("0." + frac.group(1)) if frac else 0.0)


def committed_times(log_path):
    """{bundle version: unix time} of the agent's `bundle committed` log lines."""
    out = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            if "bundle committed" not in line:
                continue
            try:
                j = json.loads(line)
                out[int(j["fields"]["version"])] = log_time(j["timestamp"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def log_message(line):
    try:
        j = json.loads(line)
        return " ".join(str(v) for v in j.get("fields", {}).values())
    except ValueError:
        return line.strip()


def measure_poll(ctx, dev, fleet_size=10000):
    """Peak RSS and bytes of the agent's poll of its pointer file in a fleet of `fleet_size` devices."""
    res = ctx.res
    real = dev.fleet.index()
    big = dict(real)
    devices = dict(real["devices"])
    template = devices[dev.DEV]
    root = os.path.join(dev.dir, "big-fleet")
    os.makedirs(os.path.join(root, "devices"), exist_ok=True)
    for i in range(fleet_size):
        e = dict(template)
        e["digest"] = f"{i:064x}"
        e["state_digest"] = f"{i + 1:064x}"
        e["labels"] = {"site": f"site-{i % 50:02d}", "hardware": "rpi4", "channel": "stable"}
        devices[f"dev-{i:05d}"] = e
    big["devices"] = devices
    # The output of a build of this many devices: index.json and one pointer file each
    # (the bundler's format: the announcement without URLs, compact, one line).
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(big, f, separators=(",", ":"))
    for d, e in devices.items():
        pointer = dict(fleet=real["fleet"], device=d, version=e["version"], commit=e["commit"],
                       digest=e["digest"], size=e["size"], urls=[], mqtt_blob=False)
        with open(os.path.join(root, "devices", f"{d}.json"), "w") as f:
            f.write(json.dumps(pointer, separators=(",", ":")) + "\n")
    index_size = os.path.getsize(os.path.join(root, "index.json"))
    path = f"/devices/{dev.DEV}.json"
    pointer_size = os.path.getsize(os.path.join(root, path.lstrip("/")))
    if not os.path.exists(os.path.join(root, "bundles")):
        os.symlink(os.path.join(dev.fleet.out, "bundles"), os.path.join(root, "bundles"))
    srv = HttpServer(ctx.procs, dev.dir, root)
    saved = dev.http
    try:
        dev.http = srv  # the agent's [fetch] base_url
        agent = dev.start_agent(tag="poll")
        dev.obs.wait_converged({dev.DEV: dev.version()}, 60)
        wait_for("the pointer poll", 30, lambda: any(q[1] == path for q in srv.requests()))
        time.sleep(2)
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited: {tail(agent.bench_log, 8)}")
        st = proc_status(agent.pid)
        reqs = [q for q in srv.requests() if q[1] == path]
        others = sorted({q[1] for q in srv.requests() if q[1] != path and not q[1].startswith("/bundles/")})
        status = reqs[0][2] if reqs else "none"
        with open(agent.bench_log, errors="replace") as f:
            complaint = [ln for ln in f if ("pointer" in ln or "polling" in ln)
                         and ("WARN" in ln or "ERROR" in ln or "failed" in ln)]
    finally:
        dev.http = saved
        if dev.agent is not None:
            dev.stop_agent()
        ctx.procs.stop(srv.proc)
    if reqs:
        if ctx.wire is None:
            ctx.wire = {}
        ctx.wire["poll_response"] = reqs[0][4]
        ctx.wire["poll_request"] = reqs[0][3]
    idle = getattr(ctx, "idle", {}).get("rss")
    note = f" (idle: {kib_to_mib(idle)})" if idle else ""
    res.row("Footprint", f"agent peak RSS polling its pointer file in a {fleet_size:,}-device fleet",
            f"{kib_to_mib(st['VmHWM'])} VmHWM{note}; HTTP {status}, {reqs[0][4] if reqs else 0} B response "
            f"for a {pointer_size} B file" + (f"; also fetched {', '.join(others)}" if others else "")
            + (f"; agent said: {log_message(complaint[0])[:160]}" if complaint else ""),
            "", None, "the agent's periodic poll of `<base_url>/devices/<id>.json` (done at start, then every "
            f"poll_interval_secs), served from a build output of {len(devices):,} devices (index.json "
            f"{index_size / 1e6:.1f} MB, one pointer file each), this device's entry unchanged; VmHWM 2 s after "
            "the request. The agent reads only its own file, so neither figure grows with the fleet")


def bulk_state(dev, reg_ref, with_containers):
    """200 files (app `bulk`) and, with an engine, 10 containers (app `svc`)."""
    for i in range(200):
        dev.fleet.write(f"apps/bulk/files/f{i:03d}.conf",
                        "".join(f"key_{j} = value {i}-{j} for {{{{ device.id }}}}\n" for j in range(40)))
    entries = "".join(f"  - source: files/f{i:03d}.conf\n    template: true\n" for i in range(200))
    dev.fleet.write("apps/bulk/app.yaml", f"description: 200 config files\nselector:\n  slot: dev-01\nfiles:\n{entries}")
    if with_containers:
        svcs = []
        for i in range(10):
            s = (f"  s{i}:\n    image: {reg_ref}\n"
                 "    command: [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; sleep 3600 & wait\"]\n"
                 f"    restart: unless-stopped\n    environment:\n      SLOT: \"{i}\"\n")
            if i < 3:
                s += "    healthcheck:\n      test: [\"CMD\", \"/bin/true\"]\n      interval: 1s\n      retries: 3\n"
            if i == 0:
                s += "    volumes:\n      - ./files/svc.conf:/etc/svc.conf:ro\n"
            svcs.append(s)
        dev.fleet.write("apps/svc/compose.yaml", "services:\n" + "".join(svcs))
        dev.fleet.write("apps/svc/files/svc.conf", "mode = bench\n")
        dev.fleet.write("apps/svc/app.yaml", "description: 10 containers\nselector:\n  slot: dev-01\nfiles:\n"
                        "  - source: files/svc.conf\n")


def measure_apply_peak(ctx, dev):
    res = ctx.res
    containers = dev.dockerd is not None and ctx.image1 is not None
    try:
        wrap, calls = sync_tracer(dev, "peak")
    except Skip:
        wrap, calls = (), None
    dev.start_agent(tag="peak", wrap=wrap)
    dev.obs.wait_converged({dev.DEV: dev.version()}, 60)
    time.sleep(0.5)
    # Under strace, the agent is strace's child.
    pid = int(open(f"/proc/{dev.agent.pid}/task/{dev.agent.pid}/children").read().split()[0]) if wrap \
        else dev.agent.pid
    before = proc_status(pid)
    synced_before = len(calls()) if calls else 0
    bulk_state(dev, ctx.image1, containers)
    dev.fleet.commit("200 files" + (" and 10 containers" if containers else ""))
    dev.fleet.build()
    ver = dev.version()
    samples = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                samples.append(proc_status(pid)["VmRSS"])
            except OSError:
                return
            time.sleep(0.02)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        dev.publish()
        done = dev.obs.wait_converged({dev.DEV: ver}, 180, since=t0)
    finally:
        stop.set()
        th.join()
    after = proc_status(pid)
    synced = len(calls()) - synced_before if calls else None
    took = done[dev.DEV] - t0
    what = "200 files (~1.6 KiB each, templated)" + (" and 10 containers (busybox image already on the device, 3 "
                                                   "with healthchecks, one mounting a managed file)" if containers else "")
    note = "incl. the 5 s health settle" if containers else f"files only: {ctx.no_containers_reason}"
    bsize = dev.fleet.index()["devices"][dev.DEV]["size"]
    res.row("Footprint", "agent peak RSS while applying 200 files" + (" + 10 containers" if containers else ""),
            f"{kib_to_mib(after['VmHWM'])} (VmHWM; before the apply {kib_to_mib(before['VmHWM'])}; RSS after "
            f"{kib_to_mib(after['VmRSS'])})", "", None,
            f"freshly started agent converged on the one-file bundle, then a bundle ({bsize:,} B) adding {what}; "
            f"VmHWM read after `converged` (publish → converged {took:.1f} s, {note})")
    if synced is not None:
        res.row("Footprint", "… fsync-family calls during that apply", f"{synced:,}", "", None,
                "counted as for the config-only change (strace with seccomp-bpf, which stops the agent only "
                "at those calls); 200 files and managed.json journaled and synced, plus the trailing status")


def measure_image_change(ctx, dev):
    res = ctx.res
    if dev.dockerd is None or ctx.image2 is None:
        raise Skip(ctx.no_containers_reason or "no dockerd")
    dev.start_agent(env={"FLEET_LOG": "debug"}, tag="image")
    dev.obs.wait_converged({dev.DEV: dev.version()}, 60)
    time.sleep(1.2)
    text = open(os.path.join(dev.fleet.path, "apps/svc/compose.yaml")).read()
    first, rest = text.split("  s1:", 1)
    dev.fleet.write("apps/svc/compose.yaml", first.replace(ctx.image1, ctx.image2) + "  s1:" + rest)
    dev.fleet.commit("s0: image bb:2")
    dev.fleet.build()
    ver = dev.version()
    wall_off = time.time() - time.monotonic()
    t0 = time.monotonic()
    dev.publish()
    done = dev.obs.wait_converged({dev.DEV: ver}, 180, since=t0)
    t_conv = done[dev.DEV]
    marks = {}
    with open(dev.agent.bench_log, errors="replace") as f:
        for line in f:
            try:
                j = json.loads(line)
            except ValueError:
                continue
            ts = j.get("timestamp", "")
            fields = j.get("fields", {})
            msg = fields.get("message", "")
            try:
                secs = log_time(ts)
            except ValueError:
                continue
            t = secs - wall_off
            if t < t0:
                continue
            if msg == "pulling image":
                marks.setdefault("pull_start", t)
            elif msg == "apply state":
                cmd = str(fields.get("command", ""))
                for key, name in (("Stage", "staged"), ("Apply", "apply"), ("Applied", "applied"),
                                  ("Healthy", "healthy")):
                    if cmd == key or cmd.startswith(key + " ") or cmd.startswith(key + "{"):
                        marks.setdefault(name, t)
            elif msg == "bundle committed":
                marks.setdefault("committed", t)
    total = t_conv - t0
    res.row("Latency", "one-container image change, publish → `converged`", ms(total), "", None,
            "compose `image:` of one of 10 services changed to a new digest (the new layer is not on the device: "
            "a real pull from a local Docker Distribution registry); split below from the agent's JSON debug log")
    parts = []
    if "pull_start" in marks and "staged" in marks:
        parts.append(("announce, fetch and verify the bundle", marks["pull_start"] - t0))
        parts.append(("pull the image", marks["staged"] - marks["pull_start"]))
    if "staged" in marks and "applied" in marks:
        parts.append(("journal + recreate the container (stop, remove, create, start)", marks["applied"] - marks["staged"]))
    if "applied" in marks and "committed" in marks:
        parts.append(("health wait (includes the agent's 5 s settle time)", marks["committed"] - marks["applied"]))
    if "committed" in marks:
        parts.append(("status `converged` reaches the subscriber", t_conv - marks["committed"]))
    if len(parts) >= 3:
        res.row("Latency", "… split: pull / recreate / health wait",
                " / ".join(ms(p[1]) for p in parts if p[0].startswith(("pull", "journal", "health"))), "", None,
                "timestamps of the agent's log lines `pulling image`, `apply state` (Stage, Applied) and "
                "`bundle committed`")
        lines = ["| phase | time |", "|---|---:|"] + [f"| {a} | {ms(b)} |" for a, b in parts]
        lines.append(f"| **total** | **{ms(total)}** |")
        res.detail("One-container image change", "\n".join(lines))
    else:
        res.row("Latency", "… split: pull / recreate / health wait",
                f"not measured: the agent's log lacked the marks (found {sorted(marks)})", "", None, "")


def run_device(ctx):
    dev = DeviceBench(ctx)
    ctx.device = dev
    try:
        guarded(ctx.res, "idle", [("Footprint", "agent idle RSS", "≤ 4 MiB")], measure_idle, ctx, dev,
                ctx.idle_secs)
        if ctx.mender_thread:
            ctx.mender_thread.join(timeout=120)
        guarded(ctx.res, "mender (side by side)", [("Side by side", "mender-client idle RSS", "")], report_mender, ctx)
        guarded(ctx.res, "config-change latency", [("Latency", "config-only change, publish → `converged`",
                                                    "p50 ≤ 50 ms")], measure_latency, ctx, dev, ctx.changes)
        guarded(ctx.res, "bytes on the wire", [("Wire", "bytes per device for a one-line config change", "")],
                measure_bytes, ctx, dev)
        guarded(ctx.res, "fsyncs per change",
                [("Footprint", "fsync-family calls per config-only change (median, n = 3)", "")],
                measure_fsyncs, ctx, dev)
        guarded(ctx.res, "pointer poll",
                [("Footprint", "agent peak RSS polling its pointer file in a 10,000-device fleet", "")],
                measure_poll, ctx, dev)
        guarded(ctx.res, "apply peak", [("Footprint", "agent peak RSS while applying 200 files + 10 containers", "")],
                measure_apply_peak, ctx, dev)
        guarded(ctx.res, "image change", [("Latency", "one-container image change, publish → `converged`", "")],
                measure_image_change, ctx, dev)
    finally:
        if dev.agent is not None:
            dev.stop_agent()
        dev.close()


def setup_engine(ctx):
    """dockerd + registry + two busybox images (bb:1 pushed and present, bb:2 pushed only)."""
    try:
        d = Dockerd(ctx.procs, ctx.work)
    except Skip as e:
        ctx.no_containers_reason = str(e)
        return
    except Exception as e:  # noqa: BLE001
        ctx.no_containers_reason = f"dockerd did not start: {e}"
        return
    ctx.dockerd = d
    try:
        reg = Registry(ctx.procs, ctx.work)
        r1, r2 = f"{reg.addr}/bb:1", f"{reg.addr}/bb:2"
        build_busybox_image(d, ctx.work, r1, "one")
        build_busybox_image(d, ctx.work, r2, "two")
        dg1 = push(d, r1)
        dg2 = push(d, r2)
        d.docker("rmi", r2)  # the image change must really pull
        ctx.image1, ctx.image2 = f"{r1}@{dg1}", f"{r2}@{dg2}"
    except Exception as e:  # noqa: BLE001
        ctx.no_containers_reason = f"registry/images not available: {e}"


# --- bundler ---------------------------------------------------------------------------


def measure_bundler(ctx):
    res = ctx.res
    script = os.path.join(ROOT, "bench", "bundler", "run.sh")
    if not os.path.exists(script):
        raise Skip("bench/bundler/run.sh is not in this checkout")
    env = dict(os.environ, CARGO_TARGET_DIR=ctx.target_dir)
    cmd = ["bash", script] + (["--quick"] if ctx.quick else [])
    p = run(cmd, timeout=3600, env=env, check=False)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        raise RuntimeError(f"bench/bundler/run.sh exited {p.returncode}: {lines[-1] if lines else ''}")
    out = p.stdout.strip().splitlines()
    table = [line for line in out if line.startswith("|")]
    prose = [line for line in out if line.strip() and not line.startswith("|")]
    fleet_line = next((line for line in prose if line.startswith("Fleet:")), "")
    m = re.search(r"Fleet: ([\d,]+) devices x (\d+) apps", fleet_line)
    devices = int(m.group(1).replace(",", "")) if m else None
    full = next((line for line in table if "full build" in line), None)
    one = next((line for line in table if "1 device changed" in line), None)

    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]
    label = f"{devices:,} devices × {m.group(2)} apps" if m else "synthetic fleet"
    if full:
        c = cells(full)
        secs = float(c[1])
        target = "≤ 10 s (10,000 × 20)"
        res.row("Bundler", f"full build, {label}", f"{secs:.2f} s, peak RSS {c[2]} MB", target,
                (secs <= 10) if devices == 10000 else None, "`bench/bundler/run.sh" + (" --quick" if ctx.quick else "") +
                "`: generated repo, committed; `fleet-bundler build` into an empty dir under `/usr/bin/time -v`")
    if one:
        c = cells(one)
        res.row("Bundler", f"rebuild after one device changed, {label}", f"{float(c[1]):.2f} s, peak RSS {c[2]} MB",
                "", None, "same output dir; exactly one bundle rewritten")
    res.detail("Bundler (`bench/bundler/run.sh" + (" --quick" if ctx.quick else "") + "`)",
               "\n".join(([fleet_line, ""] if fleet_line else []) + table))


# --- fleet convergence ---------------------------------------------------------------


class Monitor:
    """Samples the load average and available memory every second during a fleet run;
    when available memory falls below `min_avail` it kills the agents (by PID) so the
    machine survives, and the run fails with that reason."""

    def __init__(self, agents, min_avail_kib):
        self.agents, self.min_avail = agents, min_avail_kib
        self.max_load, self.min_mem, self.oom = 0.0, None, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(1.0):
            with open("/proc/loadavg") as f:
                self.max_load = max(self.max_load, float(f.read().split()[0]))
            avail = meminfo().get("MemAvailable", 0)
            self.min_mem = avail if self.min_mem is None else min(self.min_mem, avail)
            if avail < self.min_avail and not self.oom:
                self.oom = f"available memory fell to {avail / 1048576:.1f} GiB with {len(self.agents)} agents started"
                log(f"{self.oom}: killing the agents")
                for a in list(self.agents):
                    try:
                        a.kill()
                    except OSError:
                        pass

    def reset(self):
        self.max_load = 0.0

    def close(self):
        self.stop.set()
        self.thread.join()


def abandoned_handshakes(broker):
    """Lines in Mosquitto's log saying a TLS client went away mid-handshake ("unexpected
    eof while reading"): connection attempts the client gave up on, often after the
    broker had done the work."""
    try:
        with open(broker.log, "rb") as f:
            return f.read().count(b"unexpected eof while reading")
    except OSError:
        return 0


def renice_self(prio):
    """Every thread of the bench (the observer's reader included) at `prio`; children
    started afterwards inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), prio)
        except OSError:
            pass


def group_ticks(pids):
    total = 0.0
    for pid in pids:
        try:
            total += cpu_ticks(pid)
        except OSError:
            pass
    return total


def measure_fleet(ctx, n):
    res = ctx.res
    base = os.path.join(ctx.work, f"fleet{n}")
    os.makedirs(base, exist_ok=True)
    tls = ctx.tls
    broker = Broker(ctx.procs, base, tls)
    url = broker.tls_url if tls else broker.url
    roots = os.path.join(base, "roots")
    fleet = Fleet(ctx.bundler, os.path.join(base, "repo"), vars={"rev": "1"})
    devs = [f"d{i:04d}" for i in range(n)]
    for d in devs:
        os.makedirs(os.path.join(roots, d), exist_ok=True)
        fleet.write(f"devices/{d}.yaml", f"labels:\n  slot: {d}\n")
        fleet.write(f"apps/a-{d}/app.yaml", f"selector:\n  slot: {d}\nfiles:\n  - source: files/app.conf\n"
                    f"    target: {roots}/{d}/app.conf\n    template: true\n")
        fleet.write(f"apps/a-{d}/files/app.conf", "# managed by fleet\nrevision = {{ device.vars.rev }}\n"
                    "device = {{ device.id }}\n")
    fleet.commit("v1")
    fleet.build()
    http = Nginx(ctx.procs, base, fleet.out) if ctx.fleet_http == "nginx" else HttpServer(ctx.procs, base, fleet.out)
    if ctx.fleet_nice_infra:
        # The broker and the bundle server run on their own machines in a real fleet; here
        # they share two cores with every agent, and a single-threaded Mosquitto among
        # thousands of runnable agents gets a tiny share of the CPU.
        for pid in [broker.pid] + http.pids():
            os.setpriority(os.PRIO_PROCESS, pid, -10)
    obs = Observer(broker.port)
    t = time.monotonic()
    run(fleet.publish_cmd(broker.url, http.url), timeout=300)
    t_pub_idle = time.monotonic() - t
    agents = []
    os.makedirs(os.path.join(base, "logs"), exist_ok=True)
    mon = Monitor(agents, ctx.fleet_min_avail_gib * 1048576)
    rate = ctx.fleet_rate
    load_before = loadavg()
    started = time.strftime('%H:%M', time.gmtime())
    try:
        cfgs = [agent_config(os.path.join(base, "cfg", f"{d}.toml"), d, os.path.join(base, "state", d),
                             [os.path.join(roots, d)], fleet.pubkey, url, tls and tls["ca"]) for d in devs]
        b0, h0 = cpu_ticks(broker.pid), group_ticks(http.pids())
        t_start = time.monotonic()
        for i, (d, cfg) in enumerate(zip(devs, cfgs)):
            if mon.oom:
                raise RuntimeError(mon.oom)
            agents.append(ctx.procs.spawn("fleet-agent", [ctx.device_agent, "run", "--config", cfg],
                                          os.path.join(base, "logs", f"{d}.log")))
            # Paced: agent i starts at i / rate seconds (sleeping only when ahead).
            ahead = t_start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        t_spawned = time.monotonic() - t_start
        if ctx.fleet_nice_infra:
            # The observer (the clock), the publish command (a CI runner's) and the
            # restarted broker are infrastructure too; agents keep nice 0.
            renice_self(-10)
        idx = fleet.index()["devices"]
        obs.wait_converged({d: idx[d]["version"] for d in devs}, 60 + n * 0.3)
        cold = time.monotonic() - t_start
        eof_cold = abandoned_handshakes(broker)
        if mon.oom:
            raise RuntimeError(mon.oom)
        cold_b, cold_h = cpu_ticks(broker.pid) - b0, group_ticks(http.pids()) - h0
        cold_a = group_ticks([a.pid for a in agents])
        cold_load = mon.max_load
        dead = [a for a in agents if a.poll() is not None]
        if dead:
            raise RuntimeError(f"{len(dead)} agent(s) exited: {tail(dead[0].bench_log, 5)}")
        time.sleep(2)
        fleet.vars["rev"] = "2"
        fleet.write_fleet_yaml()
        fleet.commit("v2: one line of fleet.yaml")
        _, build_secs = fleet.build()
        idx = fleet.index()["devices"]
        want = {d: idx[d]["version"] for d in devs}
        mon.reset()
        b0, h0 = cpu_ticks(broker.pid), group_ticks(http.pids())
        a0 = group_ticks([a.pid for a in agents])
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        run(fleet.publish_cmd(broker.url, http.url), timeout=300)
        t_pub = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        pub_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        done = obs.wait_converged(want, 120 + n * 0.05, since=t0)
        t_all = max(done.values()) - t0
        b1, h1 = cpu_ticks(broker.pid), group_ticks(http.pids())
        a1 = group_ticks([a.pid for a in agents])
        if mon.oom:
            raise RuntimeError(mon.oom)
        t_end = max(done.values())
        eof_change = abandoned_handshakes(broker)
        msgs = sum(1 for m in obs.messages if t0 <= m[0] <= t_end and m[2] in ("status", "events"))
        lat = [t - t0 for t in done.values()]
        fin = [obs.finished_at[(d, v)] - t0 for d, v in want.items() if (d, v) in obs.finished_at]
        t_fin = max(fin) if len(fin) == len(want) else None
        reconnect = ""
        if ctx.fleet_restart is not None:
            # The broker restarts (an upgrade, a crash): every agent loses its session at
            # once and reconnects with its backoff (0.25-0.5 s, then doubling, each
            # scaled by a random factor in [0.5, 1)).
            obs.close()
            mon.reset()
            t_stop = time.monotonic()
            broker.restart(ctx.fleet_restart)
            t_up = time.monotonic()
            if ctx.fleet_nice_infra:
                os.setpriority(os.PRIO_PROCESS, broker.pid, -10)
            rb0 = cpu_ticks(broker.pid)
            ra0 = group_ticks([a.pid for a in agents])
            online = OnlineCounter(broker.port)
            try:
                seen = online.wait(n, 120 + n * 0.05)
            finally:
                online.close()
            back = sorted(t - t_up for t in seen.values())
            reconnect = (f"{back[-1]:.1f} s (half by {back[len(back) // 2]:.1f} s; broker down {t_up - t_stop:.1f} s; "
                         f"{abandoned_handshakes(broker) - eof_change} abandoned TLS handshakes; "
                         f"CPU-s broker {(cpu_ticks(broker.pid) - rb0) / CLK_TCK:.2f} / agents "
                         f"{(group_ticks([a.pid for a in agents]) - ra0) / CLK_TCK:.1f}; peak load {mon.max_load:.0f})")
        mems = [proc_memory(a.pid) for a in agents]
        rss = sorted(m["rss"] for m in mems)
        pss = sorted(m["pss"] for m in mems)
        priv = sorted(m["private"] for m in mems)
        threads = sorted(proc_status(a.pid)["Threads"] for a in agents)
        bmem = proc_memory(broker.pid)
        hmem = sum(proc_memory(p)["pss"] for p in http.pids())
        bcpu = (b1 - b0) / CLK_TCK
        res.row("Fleet", f"{n:,} agents: publish → every status `converged`",
                f"{t_all:.2f} s (p50 device {ms(pct(lat, 50))}, p95 {ms(pct(lat, 95))}; every device had applied "
                f"(`apply_finished` event) after {f'{t_fin:.2f} s' if t_fin else 'n/a'}; publish command {t_pub:.2f} s)", "≤ 10 s for 1,000" if n >= 1000 else "", (t_all <= 10) if n >= 1000 else None,
                f"{n} `fleet-agent run` processes (files only, own configs/state dirs/allowed roots, default config, "
                f"{'TLS' if tls else 'plain'} MQTT) on one Mosquitto and one HTTP server, all on this machine; one line "
                f"of fleet.yaml changed → {n} new bundles (built untimed: {build_secs:.1f} s)")
        res.row("Fleet", f"{n:,} agents: broker CPU during the convergence",
                f"{bcpu:.2f} CPU-s over {t_all:.2f} s ({100 * bcpu / max(t_all, 1e-9):.0f} % of one core)", "", None,
                "CPU time of the mosquitto process (/proc/PID/task/*/schedstat) between publish and the last `converged`")
        ctx.fleet_details.append(
            f"| {n:,} | {cold:.1f} s | {t_pub:.2f} s | {f'{t_fin:.2f} s' if t_fin else 'n/a'} | {ms(pct(lat, 50))} | "
            f"{ms(pct(lat, 95))} | {t_all:.2f} s | "
            f"{bcpu:.2f} | {(a1 - a0) / CLK_TCK:.2f} ({1000 * (a1 - a0) / CLK_TCK / n:.1f} ms/agent) | "
            f"{(h1 - h0) / CLK_TCK:.2f} | {kib_to_mib(rss[len(rss) // 2])} / {kib_to_mib(rss[-1])} |")
        ctx.fleet_scale.append(
            f"| {n:,} | {started}, load {load_before} | {rate:g}/s, spawned in "
            f"{t_spawned:.1f} s | {cold:.1f} s | {cold_b / CLK_TCK:.2f} / {cold_a / CLK_TCK:.1f} / "
            f"{cold_h / CLK_TCK:.2f}; {eof_cold} abandoned TLS handshakes | {cold_load:.0f} | "
            f"{t_all:.2f} s (publish command {t_pub:.2f} s, "
            f"{pub_cpu:.2f} CPU-s; v1 to no agents: {t_pub_idle:.2f} s; {msgs / n:.1f} status/event messages "
            f"per agent; CPU-s broker {bcpu:.2f} / agents {(a1 - a0) / CLK_TCK:.1f} / HTTP {(h1 - h0) / CLK_TCK:.2f}) | "
            f"{mon.max_load:.0f} | "
            f"{kib_to_mib(bmem['rss'])} | {kib_to_mib(pss[len(pss) // 2])} / {kib_to_mib(priv[len(priv) // 2])} / "
            f"{kib_to_mib(rss[len(rss) // 2])} | {sum(pss) / 1048576:.2f} GiB | {kib_to_mib(hmem)} | "
            f"{threads[len(threads) // 2]} | {(mon.min_mem or 0) / 1048576:.1f} GiB |"
            + (f" {reconnect} |" if ctx.fleet_restart is not None else ""))
    finally:
        mon.close()
        log(f"stopping {len(agents)} agents")
        t = time.monotonic()
        killed = ctx.procs.stop(agents, grace=30)
        log(f"agents stopped in {time.monotonic() - t:.1f} s ({killed} needed SIGKILL after 30 s)")
        obs.close()
        ctx.procs.stop([http.proc, broker.proc])
        if os.environ.get("FLEET_BENCH_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)


# --- report ----------------------------------------------------------------------------


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def write_report(ctx, path):
    res, mach = ctx.res, ctx.machine
    mode = "quick run (`bench/run.sh --quick`: shorter windows, fewer changes, smaller fleets)" if ctx.quick else \
        "full run (`bench/run.sh`)"
    out = ["# Benchmarks", "",
           f"Generated by `bench/run.sh` — {mode} — on {mach['date']}, commit {mach['commit']}, in "
           f"{(time.monotonic() - ctx.t0) / 60:.1f} min. Numbers are from this one machine and run; "
           "[bench/README.md](bench/README.md) explains each method, and [why the misses miss]"
           "(bench/README.md#what-the-numbers-say) with profiles. Benchmarks are not tests: nothing here fails CI.",
           "", "## Machine", "", "| | |", "|---|---|",
           f"| CPU | {mach['cpu']} |", f"| cores | {mach['cores']} |", f"| memory | {mach['mem_gib']:.1f} GiB |",
           f"| kernel | {mach['kernel']} |", f"| OS | {mach['os']} |", f"| Rust | {mach['rustc']} |",
           f"| broker | {mach['mosquitto']} |", f"| engine | {mach['dockerd']} |",
           f"| load average (1/5/15 min) at start / end | {mach['load']} / {loadavg()} |", "",
           "## Results", "", "| | figure | measured | target | | method |", "|---|---|---|---|---|---|"]
    for r in res.rows:
        verdict = {True: "met", False: "**missed**", None: ""}[r["met"]]
        out.append(f"| {r['group']} | {r['figure']} | {r['measured']} | {r['target']} | {verdict} | {r['method']} |")
    if ctx.fleet_details:
        out += ["", "## Fleet convergence", "",
                "| agents | cold start: all converged on v1 | publish command | every `apply_finished` event | "
                "`converged` p50 device | p95 device | every `converged` | broker CPU-s | agents CPU-s | "
                "HTTP server CPU-s | agent RSS median / max |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"] + ctx.fleet_details
        server = ("the bench's Python file server (`bench/httpd.py`), a stand-in for a CDN" if ctx.fleet_http == "python"
                  else "nginx (`--fleet-http nginx`), 2 workers")
        out += ["", f"Cold start: agents started {ctx.fleet_rate:g} a second; each connects, takes its retained "
                f"announcement, fetches and applies its bundle. The HTTP server is {server}."]
    if ctx.fleet_scale:
        out += ["", "### Cold start, load and memory", "",
                "| agents | time (UTC), load avg before | start rate | cold start: all converged | cold start CPU-s: "
                "broker / agents / HTTP | peak load avg, cold start | one change: publish → all converged | "
                "peak load avg, change | broker RSS | agent PSS / private / RSS (median) | agents' PSS, total | "
                "HTTP server PSS | threads per agent | least available memory |"
                + (" broker restart: all agents back online |" if ctx.fleet_restart is not None else ""),
                "|---:|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"
                + ("---|" if ctx.fleet_restart is not None else "")] + ctx.fleet_scale
    for title, text in res.details:
        out += ["", f"## {title}", "", text]
    if ctx.wire:
        per_poll = ctx.wire.get("poll_response")
        pointer = ctx.wire.get("pointer")
        text = ("Besides announcements, every agent polls its own pointer file `<base_url>/devices/<id>.json` "
                "(default every 300 s)")
        if pointer:
            text += f", {pointer} B here, whatever the size of the fleet"
        if per_poll:
            text += (f"; with the HTTP headers a poll downloads {per_poll} B (and sends "
                     f"{ctx.wire.get('poll_request', 0)} B), so 10,000 devices pull "
                     f"~{per_poll * 10000 / 300 / 1e3:.0f} kB/s from the bundle server and 100,000 "
                     f"~{per_poll * 100000 / 300 / 1e3:.0f} kB/s")
        out += ["", "## Polling cost", "", text + "."]
    if res.broken:
        out += ["", "## Suite errors", "", "The suite hit bugs of its own (not slow numbers):", "", "```"]
        out += [b.strip() for b in res.broken] + ["```"]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--bundler", required=True)
    ap.add_argument("--target-dir", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--only", default="", help="comma-separated sections (sizes,cross,bloat,device,bundler,fleet) for "
                                                "development; the report then holds only those")
    ap.add_argument("--fleet-sizes", default="", help="override N for the fleet convergence, e.g. 50,200")
    ap.add_argument("--fleet-rate", type=float, default=250.0, help="agents started per second in the fleet runs")
    ap.add_argument("--fleet-http", choices=("python", "nginx"), default="python",
                    help="bundle server of the fleet runs: bench/httpd.py or nginx")
    ap.add_argument("--fleet-restart", type=float, default=None, metavar="SECS",
                    help="after the change, stop the broker for SECS and time until every agent is back online")
    ap.add_argument("--fleet-nice-infra", action="store_true",
                    help="run the fleet runs' broker and HTTP server at nice -10 (root), as if on their own machines")
    ap.add_argument("--fleet-min-avail-gib", type=float, default=3.0,
                    help="kill a fleet run's agents when available memory falls below this")
    a = ap.parse_args()

    class Ctx:
        pass
    ctx = Ctx()
    ctx.t0 = time.monotonic()
    ctx.quick = a.quick
    ctx.agent, ctx.bundler, ctx.target_dir = os.path.abspath(a.agent), os.path.abspath(a.bundler), a.target_dir
    # The binary the runtime measurements use: the static build when cross/build.sh made one.
    ctx.device_agent, ctx.device_agent_label = ctx.agent, "dynamically linked release build"
    ctx.res = Results()
    ctx.procs = Procs()
    ctx.work = tempfile.mkdtemp(prefix="fbench", dir="/tmp")
    ctx.sizes, ctx.mender, ctx.mender_thread = {}, None, None
    ctx.dockerd, ctx.image1, ctx.image2 = None, None, None
    ctx.no_containers_reason = ""
    ctx.device, ctx.fleet_details, ctx.fleet_scale, ctx.wire = None, [], [], None
    ctx.fleet_rate, ctx.fleet_http, ctx.fleet_min_avail_gib = a.fleet_rate, a.fleet_http, a.fleet_min_avail_gib
    ctx.fleet_restart, ctx.fleet_nice_infra = a.fleet_restart, a.fleet_nice_infra
    # FLEET_BENCH_IDLE_SECS: a full-length idle window with --quick's prebuilt binaries.
    ctx.idle_secs = int(os.environ.get("FLEET_BENCH_IDLE_SECS") or (10 if a.quick else 60))
    ctx.changes = 10 if a.quick else 50
    sizes = [int(x) for x in a.fleet_sizes.split(",") if x] or ([20] if a.quick else [100, 1000])
    only = set(filter(None, a.only.split(",")))

    def want(s):
        return not only or s in only
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if os.geteuid() == 0:  # Mosquitto (a child) holds a socket per agent, the fleet runs up to 10,000
            hard = max(hard, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    res = ctx.res
    ctx.tls, ctx.tls_note = None, ""
    try:
        ctx.tls = make_tls(os.path.join(ctx.work, "tls"))
    except Exception as e:  # noqa: BLE001
        ctx.tls_note = f"plain MQTT (TLS setup failed: {e})"
    try:
        ctx.machine = machine()
        ctx.machine["load"] = loadavg()
        if want("sizes"):
            guarded(res, "sizes", [("Footprint", "agent binary, x86_64, stripped", "≤ 3 MiB")], measure_sizes, ctx)
        if want("cross"):
            guarded(res, "static builds (cross/build.sh)",
                    [("Footprint", "agent binary, x86_64 static (as in the amd64 .deb), stripped", "≤ 3 MiB"),
                     ("Footprint", "agent binary, aarch64, stripped", "≤ 2.5 MiB")], measure_cross, ctx)
        if want("bloat"):
            guarded(res, "cargo bloat", [], measure_bloat, ctx)
        if want("device"):
            log("== starting dockerd, registry and test images")
            setup_engine(ctx)
            ctx.mender_thread = mender_thread(ctx, 20)
            guarded(res, "device benchmarks", [("Footprint", "agent idle RSS", "≤ 4 MiB"),
                                               ("Side by side", "mender-client idle RSS", "")], run_device, ctx)
            if ctx.dockerd:
                ctx.dockerd.close()
                ctx.dockerd = None
        if want("bundler"):
            guarded(res, "bundler", [("Bundler", "full build", "≤ 10 s (10,000 × 20)")], measure_bundler, ctx)
        if want("fleet"):
            for n in sizes:
                guarded(res, f"fleet of {n}", [("Fleet", f"{n:,} agents: publish → every status `converged`",
                                                "≤ 10 s for 1,000" if n >= 1000 else "")], measure_fleet, ctx, n)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        raise
    finally:
        if ctx.dockerd:
            ctx.dockerd.close()
        ctx.procs.stop_all()
        log("cleaning up")
        if os.environ.get("FLEET_BENCH_KEEP") == "1":
            log(f"keeping {ctx.work}")
        else:
            shutil.rmtree(ctx.work, ignore_errors=True)
    write_report(ctx, a.out)
    log(f"wrote {a.out}")
    if res.broken:
        log("the suite itself hit errors (see 'Suite errors' in the report)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
