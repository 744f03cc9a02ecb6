#!/usr/bin/env python3
"""Issue 14's benchmark: rollouts at scale. Started by bench/rollout.sh (which builds the
release binaries); prints a Markdown section on stdout, progress on stderr.

    bench/rollout.py --agent PATH --bundler PATH [--quick] [--scale 10000,100000]
                     [--agents 1000] [--only scale,agents]

scale:  N synthetic devices (a real `fleet-bundler build` of a generated N-device repo,
        N retained status reports and N online flags on a private Mosquitto), then
        `fleet-bundler status --index --json` and every `fleet-bundler rollout --once`
        step of a 4-wave rollout under /usr/bin/time -v (wall time, peak RSS). Between
        steps the bench publishes `converged` statuses on the new bundle for the devices
        that were announced (seen on their `desired` topics), as agents would.
agents: N real `fleet-agent` processes (files only), a 4-wave rollout driven by
        `fleet-bundler rollout` (time per wave), then a second rollout where devices of
        wave 2 refuse the bundle (a file outside their allowed roots: `path_not_allowed`,
        state `failed`), timed from the status that crossed the halt threshold (as a
        subscriber received it) to the retained `halted` state.
"""
import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqttc  # noqa: E402
from lib import (  # noqa: E402
    FLEET, PREFIX, ROOT, HttpServer, Observer, Procs, agent_config, cpu_ticks, free_port, log, machine, pct,
    proc_status, run, tail, wait_for, CLK_TCK,
)

MIB = 1024 * 1024
STATE_TOPIC = f"{PREFIX}/{FLEET}/rollout"
AGENT_VERSION = "0.1.0"


# --- broker ------------------------------------------------------------------------------


class BigBroker:
    """Mosquitto sized for 100,000 devices: no per-client queue limit (a subscriber that
    asks for 200,000 retained messages gets them all), no memory limit, no persistence."""

    def __init__(self, procs, workdir):
        self.dir = os.path.join(workdir, "mosquitto")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        conf = ["per_listener_settings false", "allow_anonymous true", "persistence false", "user root",
                "log_dest stderr", "log_type error", "log_type warning",
                "max_queued_messages 10000000", "max_queued_bytes 0", "memory_limit 0", "max_inflight_messages 100",
                "set_tcp_nodelay true", f"listener {self.port} 127.0.0.1"]
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(conf) + "\n")
        self.log = os.path.join(self.dir, "mosquitto.log")
        self.proc = procs.spawn("mosquitto", ["mosquitto", "-c", self.conf], self.log)
        wait_for("mosquitto to listen", 10, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True)
        self.pid = self.proc.pid
        self.url = f"mqtt://127.0.0.1:{self.port}"


def _varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_bulk(port, items):
    """Publishes (topic, payload) pairs retained with QoS 1 as fast as the socket takes
    them (pipelined, no waiting per message), then waits until the broker acknowledged
    every one (PUBACKs counted). Returns (seconds, count)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = f"bench-bulk-{os.getpid()}-{time.monotonic_ns()}".encode()
    body = struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", 600) + struct.pack("!H", len(cid)) + cid
    s.sendall(bytes([0x10]) + _varint(len(body)) + body)
    ack = s.recv(4)
    if len(ack) < 4 or ack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {ack!r}")
    acked = [0]
    err = []

    def reader():
        buf = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return
                buf += chunk
                # PUBACKs are 4 bytes (0x40 0x02 id id); PINGRESP 2 bytes.
                i = 0
                while i + 2 <= len(buf):
                    if buf[i] == 0x40 and i + 4 <= len(buf):
                        acked[0] += 1
                        i += 4
                    elif buf[i] == 0xD0:
                        i += 2
                    elif buf[i] == 0x40:
                        break
                    else:
                        raise ConnectionError(f"unexpected packet 0x{buf[i]:02x}")
                buf = buf[i:]
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t0 = time.monotonic()
    out = bytearray()
    n = 0
    for topic, payload in items:
        n += 1
        pid = n % 65535 + 1
        tb = topic.encode()
        b = struct.pack("!H", len(tb)) + tb + struct.pack("!H", pid) + payload
        out += bytes([0x33]) + _varint(len(b)) + b
        if len(out) > 1 << 20:
            s.sendall(out)
            out.clear()
    s.sendall(out)
    deadline = time.monotonic() + 300
    while acked[0] < n and time.monotonic() < deadline and not err:
        time.sleep(0.01)
    secs = time.monotonic() - t0
    s.sendall(b"\xe0\x00")
    s.close()
    if acked[0] < n:
        raise RuntimeError(f"the broker acknowledged {acked[0]} of {n} retained messages ({err})")
    return secs, n


def count_retained(port, filters, want, quiet=3.0):
    """Subscribes and counts the retained messages per filter until `want` arrived or
    nothing came for `quiet` seconds. Returns the count."""
    seen = set()
    lock = threading.Lock()
    last = [time.monotonic()]

    def on(m):
        if m.retain and m.payload:
            with lock:
                seen.add(m.topic)
                last[0] = time.monotonic()

    c = mqttc.Client("127.0.0.1", port, f"bench-count-{os.getpid()}-{time.monotonic_ns()}", on)
    c.subscribe(*filters)
    while True:
        time.sleep(0.1)
        with lock:
            if len(seen) >= want or time.monotonic() - last[0] > quiet:
                break
    c.close()
    return len(seen)


class TopicWatch:
    """Timestamps every message on the rollout state topic and the devices' desired
    topics (on arrival)."""

    def __init__(self, port):
        self.lock = threading.Lock()
        self.states = []  # (mono, parsed state)
        self.desired = {}  # device -> [(mono, version)]
        self.c = mqttc.Client("127.0.0.1", port, f"bench-watch-{os.getpid()}-{time.monotonic_ns()}", self._on)
        self.c.subscribe(STATE_TOPIC, f"{PREFIX}/{FLEET}/devices/+/desired")

    def _on(self, m):
        if not m.payload:
            return
        try:
            doc = json.loads(m.payload)
        except ValueError:
            return
        with self.lock:
            if m.topic == STATE_TOPIC:
                self.states.append((m.mono, doc))
            else:
                self.desired.setdefault(m.topic.split("/")[-2], []).append((m.mono, doc.get("version")))

    def close(self):
        self.c.close()


# --- fleet repositories -------------------------------------------------------------------


def rollout_yaml(soak, halt, canary="canary"):
    return ("rollout:\n  waves:\n"
            f"    - name: canary\n      selector: {{channel: {canary}}}\n      soak: {soak}\n"
            f"    - name: early\n      percent: 10\n      soak: {soak}\n"
            f"    - name: middle\n      percent: 30\n      soak: {soak}\n"
            f"    - name: rest\n      soak: {soak}\n"
            f"  halt:\n" + "".join(f"    {k}: {v}\n" for k, v in halt.items()))


class Repo:
    def __init__(self, bundler, path):
        self.bundler, self.path, self.out = bundler, path, path + "-out"
        os.makedirs(path, exist_ok=True)
        run(["git", "init", "-q", "-b", "main", path])
        self.keys = path + "-keys"
        run([bundler, "keygen", "--out", self.keys])
        self.pubkey = os.path.join(self.keys, "signing.pub")

    def write(self, rel, text):
        full = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)

    def fleet_yaml(self, rev, rollout=""):
        self.write("fleet.yaml", f"name: {FLEET}\ntopic_prefix: {PREFIX}\nbundle_expiry: 90d\n"
                                 f"vars:\n  rev: \"{rev}\"\n" + rollout)

    def commit(self, msg):
        g = ["git", "-C", self.path, "-c", "user.name=bench", "-c", "user.email=bench@fleet.invalid"]
        run(g + ["add", "-A"], timeout=1800)
        run(g + ["commit", "-q", "-m", msg], timeout=1800)

    def build(self):
        t = time.monotonic()
        p = timed([self.bundler, "build", "--repo", self.path, "--key", os.path.join(self.keys, "signing.key"),
                   "--out", self.out, "--json"], timeout=3600)
        if p["rc"] != 0:
            raise RuntimeError(f"build failed ({p['rc']}): {p['stderr'][-2000:]}")
        return p

    def index(self):
        with open(os.path.join(self.out, "index.json")) as f:
            return json.load(f)


def timed(cmd, timeout=600):
    """Runs cmd under /usr/bin/time -v: {rc, secs, rss_mb, stdout, stderr}."""
    fd, tf = tempfile.mkstemp(prefix="time-")
    os.close(fd)
    t = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-v", "-o", tf, *cmd], capture_output=True, text=True, timeout=timeout)
    secs = time.monotonic() - t
    rss = None
    with open(tf) as f:
        for line in f:
            if "Maximum resident set size" in line:
                rss = int(line.split(":")[1]) / 1024
    os.remove(tf)
    return dict(rc=p.returncode, secs=secs, rss_mb=rss, stdout=p.stdout, stderr=p.stderr)


# --- synthetic statuses ------------------------------------------------------------------


def status_json(dev, entry, state="converged", at=None, containers=2):
    """What the agent publishes (fleet-spec/MESSAGES.md), with `containers` containers."""
    now = int(at or time.time())
    ref = {"version": entry["version"], "digest": entry["digest"], "commit": entry["commit"]}
    doc = {
        "device": dev, "fleet": FLEET, "agent_version": AGENT_VERSION, "state": state,
        "desired": ref, "applied": dict(ref, at=now - 5),
        "containers": [{"name": f"app{k}-main", "image": f"registry.bench.example/app{k}/main@sha256:{k:064x}",
                        "running": True, "health": "healthy", "restarts": 0} for k in range(containers)],
        "files": {"managed": 3, "drift_repaired": 0}, "last_error": None, "timestamp": now,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def status_items(devices, index):
    for d in devices:
        yield f"{PREFIX}/{FLEET}/devices/{d}/status", status_json(d, index[d])


def online_items(devices):
    for d in devices:
        yield f"{PREFIX}/{FLEET}/devices/{d}/online", b"true"


# --- scale: status and rollout --once at N synthetic devices -------------------------------


def gen_scale_repo(repo, n):
    """n devices (1 % canary), one app with a templated file for all of them."""
    for i in range(n):
        ch = "canary" if i % 100 == 0 else "stable"
        repo.write(f"devices/dev-{i:06d}.yaml",
                   f"labels:\n  channel: {ch}\n  site: site-{i % 50:02d}\nvars:\n  serial: SN{i:08d}\n")
    repo.write("apps/conf/app.yaml", "description: one templated file\nfiles:\n"
                                     "  - source: files/app.conf\n    template: true\n")
    repo.write("apps/conf/files/app.conf", "# managed by fleet\nrevision = {{ device.vars.rev }}\n"
                                           "device = {{ device.id }}\nserial = {{ device.vars.serial }}\n")


def measure_scale(ctx, n):
    procs = ctx.procs
    base = os.path.join(ctx.work, f"scale{n}")
    rows = {"n": n}
    log(f"scale {n}: generating the repository")
    repo = Repo(ctx.bundler, os.path.join(base, "repo"))
    gen_scale_repo(repo, n)
    repo.fleet_yaml(2, rollout_yaml("0s", {"max_failed": 5, "max_failed_rate": 0.2, "min_reporting": 10})
                    if ctx.have_rollout else "")
    repo.commit("v2: rollout")
    log(f"scale {n}: repository committed; building")
    b2 = repo.build()
    rows["build_v2"] = (b2["secs"], b2["rss_mb"])
    idx = repo.index()
    new = idx["devices"]
    plan = (idx.get("rollout") or {}).get("devices") or {}
    rows["plan"] = bool(plan)
    log(f"scale {n}: built in {b2['secs']:.1f} s ({'with' if plan else 'WITHOUT'} a rollout plan)")
    # What the devices run before the rollout: the previous bundle (an older version and
    # another digest; the status path only compares them with the index).
    old = {d: {"version": e["version"] - 3600, "digest": hashlib.sha256(e["digest"].encode()).hexdigest(),
               "commit": "0" * 40} for d, e in new.items()}

    broker = BigBroker(procs, base)
    devs = sorted(old)
    secs, cnt = publish_bulk(broker.port, status_items(devs, old))
    secs2, cnt2 = publish_bulk(broker.port, online_items(devs))
    rows["publish"] = (secs + secs2, cnt + cnt2)
    got = count_retained(broker.port, [f"{PREFIX}/{FLEET}/devices/+/status"], n)
    got_on = count_retained(broker.port, [f"{PREFIX}/{FLEET}/devices/+/online"], n)
    rows["retained"] = (got, got_on)
    log(f"scale {n}: {cnt} statuses + {cnt2} online flags published in {secs + secs2:.1f} s; "
        f"a subscriber counted {got} + {got_on} retained")
    if got != n or got_on != n:
        raise RuntimeError(f"the broker kept {got} statuses / {got_on} online flags of {n}")
    rows["broker_rss_mb"] = proc_status(broker.pid)["VmRSS"] / 1024

    st = timed([ctx.bundler, "status", "--broker", broker.url, "--index", os.path.join(repo.out, "index.json"),
                "--json"])
    if st["rc"] != 0:
        raise RuntimeError(f"status exited {st['rc']}: {st['stderr'][-1000:]}")
    shown = len(json.loads(st["stdout"])["devices"])
    rows["status"] = (st["secs"], st["rss_mb"], shown)
    st0 = timed([ctx.bundler, "status", "--broker", broker.url, "--index", os.path.join(repo.out, "index.json"),
                 "--json", "--settle", "100ms"])
    rows["status_settle"] = (st0["secs"], st0["rss_mb"])
    log(f"scale {n}: status {st['secs']:.2f} s, {st['rss_mb']:.0f} MB, {shown} rows "
        f"(--settle 100ms: {st0['secs']:.2f} s)")

    if not ctx.have_rollout:
        rows["steps"] = None
        return rows
    watch = TopicWatch(broker.port)
    version = lambda d: new[d]["version"]  # noqa: E731
    steps = []
    reported = set()
    try:
        for step in range(1, 25):
            p = timed([ctx.bundler, "rollout", "--out", repo.out, "--broker", broker.url, "--base-url",
                       "http://127.0.0.1:9/", "--once", "--json"], timeout=600)
            time.sleep(0.5)  # the announcements reach the watcher
            with watch.lock:
                announced = {d for d, vs in watch.desired.items() if any(v == new[d]["version"] for _, v in vs)}
            state = watch.states[-1][1] if watch.states else {}
            fresh = sorted(announced - reported)
            steps.append(dict(step=step, rc=p["rc"], secs=p["secs"], rss_mb=p["rss_mb"], announced=len(fresh),
                              wave=state.get("wave"), state=state.get("state")))
            log(f"scale {n}: rollout --once step {step}: exit {p['rc']}, {p['secs']:.2f} s, {p['rss_mb']:.0f} MB, "
                f"{len(fresh)} new announcements, state {state.get('state')} wave {state.get('wave')}")
            if p["rc"] not in (0, 4):
                steps[-1]["stderr"] = p["stderr"][-600:]
                log(f"scale {n}: step {step} failed: {p['stderr'][-600:]}")
                # A CI job would run the step again: the rollout resumes from the retained
                # state. Three failures in a row end the measurement.
                if sum(1 for x in steps[-3:] if x["rc"] not in (0, 4)) >= 3:
                    break
            elif state.get("state") in ("done", "halted", "aborted"):
                break
            if fresh:
                publish_bulk(broker.port, status_items(fresh, new))
                reported |= set(fresh)
        rows["steps"] = steps
    finally:
        watch.close()
        procs.stop(broker.proc)
    return rows


# --- agents: a real rollout over N agents ------------------------------------------------


def measure_agents(ctx, n):
    procs = ctx.procs
    base = os.path.join(ctx.work, f"agents{n}")
    roots = os.path.join(base, "roots")
    out = {"n": n}
    repo = Repo(ctx.bundler, os.path.join(base, "repo"))
    devs = [f"d{i:04d}" for i in range(n)]
    canary = set(devs[:: max(1, n // 10 if n < 100 else 100)]) if n < 100 else set(devs[::100])

    def write_devices(fail=()):
        for d in devs:
            os.makedirs(os.path.join(roots, d), exist_ok=True)
            labels = f"  slot: {d}\n  channel: {'canary' if d in canary else 'stable'}\n"
            if d in fail:
                labels += "  broken: \"yes\"\n"
            repo.write(f"devices/{d}.yaml", "labels:\n" + labels)
            repo.write(f"apps/a-{d}/app.yaml", f"selector:\n  slot: {d}\nfiles:\n  - source: files/app.conf\n"
                       f"    target: {roots}/{d}/app.conf\n    template: true\n")
            repo.write(f"apps/a-{d}/files/app.conf", "# managed by fleet\nrevision = {{ device.vars.rev }}\n"
                       "device = {{ device.id }}\n")

    soak = ctx.soak
    halt = {"max_failed": 5, "max_failed_rate": 0.2, "min_reporting": 10}
    write_devices()
    repo.fleet_yaml(1)
    repo.commit("v1")
    repo.build()
    broker = BigBroker(procs, base)
    http = HttpServer(procs, base, repo.out)
    obs = SeqObserver(broker.port)
    watch = TopicWatch(broker.port)
    run([ctx.bundler, "publish", "--out", repo.out, "--broker", broker.url, "--base-url", http.url], timeout=300)
    agents = []
    os.makedirs(os.path.join(base, "logs"), exist_ok=True)
    try:
        t0 = time.monotonic()
        for i, d in enumerate(devs):
            cfg = agent_config(os.path.join(base, "cfg", f"{d}.toml"), d, os.path.join(base, "state", d),
                               [os.path.join(roots, d)], repo.pubkey, broker.url, None, http.url,
                               poll_secs=(5 if n <= 100 else 60) if ctx.have_rollout else 86400)
            # Without `rollout`, the v2 pointer files are live at once: the bench's own
            # driver relies on announcements and keeps the agents from polling them.
            agents.append(procs.spawn("fleet-agent", [ctx.agent, "run", "--config", cfg],
                                      os.path.join(base, "logs", f"{d}.log")))
            # 50 starts a second: each fetches v1 at once, and the bench's HTTP server
            # (a thread per connection) on a loaded 2-core machine timed out under 1,000.
            if i % 25 == 24:
                time.sleep(0.5)
        idx1 = repo.index()["devices"]
        obs.wait_converged({d: idx1[d]["version"] for d in devs}, 60 + n * 0.3)
        out["cold"] = time.monotonic() - t0
        dead = [a for a in agents if a.poll() is not None]
        if dead:
            raise RuntimeError(f"{len(dead)} agent(s) exited: {tail(dead[0].bench_log, 5)}")
        log(f"agents {n}: all converged on v1 after {out['cold']:.1f} s")

        # Run 1: a healthy 4-wave rollout.
        repo.fleet_yaml(2, rollout_yaml(soak, halt) if ctx.have_rollout else "")
        repo.commit("v2: rollout, one line of fleet.yaml")
        repo.build()
        idx = repo.index()
        names = ["canary", "early", "middle", "rest"]
        plan = idx["rollout"]["devices"] if ctx.have_rollout else assign_waves(devs, canary)
        out["waves"] = [sum(1 for d in devs if plan.get(d) == i) for i in range(len(names))]
        out["names"] = names
        log(f"agents {n}: v2 built; waves {dict(zip(names, out['waves']))}")
        if not ctx.have_rollout:
            out["run1"] = drive_manual(ctx, repo, broker, http, obs, idx, devs, plan, names,
                                       float(soak.rstrip("s")))
            out["rss"] = rss_snapshot(broker, agents)
            return out
        out["run1"] = drive(ctx, repo, broker, http, obs, watch, idx, devs, plan, names, "run1")
        out["rss"] = rss_snapshot(broker, agents)

        # Run 2: devices of wave 2 refuse the new bundle.
        wave2 = sorted(d for d in devs if plan.get(d) == 1)
        k = max(ctx.fail_min, len(wave2) // 10)
        fail = set(wave2[:k])
        write_devices(fail)
        repo.write("apps/broken/app.yaml", "description: a file outside the device's allowed roots\n"
                                           "selector:\n  broken: \"yes\"\nfiles:\n  - source: files/x.conf\n"
                                           f"    target: {base}/outside/x.conf\n")
        repo.write("apps/broken/files/x.conf", "x = 1\n")
        repo.fleet_yaml(3, rollout_yaml(soak, halt))
        repo.commit("v3: rollout; wave-2 devices labelled broken get a file outside their roots")
        repo.build()
        idx3 = repo.index()
        plan3 = idx3["rollout"]["devices"]
        moved = [d for d in devs if plan3.get(d) != plan.get(d)]
        out["fail"] = len(fail)
        out["moved"] = len(moved)
        out["run2"] = drive(ctx, repo, broker, http, obs, watch, idx3, devs, plan3, names, "run2", halt=halt,
                            fail=fail)
        out["rss2"] = rss_snapshot(broker, agents)
    finally:
        log(f"stopping {len(agents)} agents")
        killed = procs.stop(agents, grace=30)
        log(f"agents stopped ({killed} needed SIGKILL)")
        watch.close()
        obs.close()
        procs.stop([http.proc, broker.proc])
    return out


def assign_waves(devs, canary):
    """The plan's wave assignment (bundler/src/rollout/plan.rs) for canary / 10 % / 30 % /
    rest, for the bench's own driver when the bundler has no `rollout` command."""
    rest = sorted((hashlib.sha256(f"{FLEET}/{d}".encode()).digest(), d) for d in devs if d not in canary)
    plan = {d: 0 for d in canary}
    for i, p in ((1, 10), (2, 30)):
        k = -(-len(rest) * p // 100)
        for _, d in rest[:k]:
            plan[d] = i
        rest = rest[k:]
    for _, d in rest:
        plan[d] = 3
    return plan


def drive_manual(ctx, repo, broker, http, obs, idx, devs, plan, names, soak_s):
    """Without `fleet-bundler rollout`: the bench announces wave by wave itself (the
    announcement `publish` sends, retained QoS 1), waits until every device of the wave
    reported `converged` on it, waits the soak, and goes on. Measures the agents' side
    of a wave, not the bundler's bookkeeping."""
    new = idx["devices"]
    res = {"rc": None, "manual": True, "waves": []}
    t0 = time.monotonic()
    for i, name in enumerate(names):
        members = [d for d in devs if plan[d] == i]
        items = []
        for d in members:
            e = new[d]
            ann = {"fleet": FLEET, "device": d, "version": e["version"], "commit": e["commit"],
                   "digest": e["digest"], "size": e["size"], "urls": [f"{http.url}/bundles/{e['digest']}.bundle"],
                   "mqtt_blob": False}
            items.append((f"{PREFIX}/{FLEET}/devices/{d}/desired", json.dumps(ann).encode()))
        ta = time.monotonic()
        publish_bulk(broker.port, items)
        tp = time.monotonic()
        done = obs.wait_converged({d: new[d]["version"] for d in members}, 120 + len(members) * 0.1, since=ta)
        tc = max(done.values())
        time.sleep(soak_s)
        res["waves"].append(dict(name=name, devices=len(members), announced=len(members), converged=len(done),
                                 first_ann=ta - t0, last_ann=tp - t0, all_conv=tc - t0,
                                 soaked=time.monotonic() - t0))
    res["secs"] = time.monotonic() - t0
    return res


def agent_checks(a):
    """What the rollout must have done for the figures to mean anything."""
    bad = []
    r1, r2 = a.get("run1") or {}, a.get("run2")
    if not r1.get("manual"):
        if r1.get("rc") != 0:
            bad.append(f"check: the healthy rollout exited {r1.get('rc')}, not 0 (done): {r1.get('stderr')}")
        if any(w["converged"] != w["devices"] for w in r1.get("waves", [])):
            bad.append("check: not every device of the healthy rollout converged on the new bundle")
    if r2 is not None:
        if r2.get("rc") != 3:
            bad.append(f"check: the failing rollout exited {r2.get('rc')}, not 3 (halted): {r2.get('stderr')}")
        if r2.get("later_announced") or r2.get("later_pointer_new"):
            bad.append(f"check: devices of waves 3-4 got the halted bundle ({r2.get('later_announced')} "
                       f"announced, {r2.get('later_pointer_new')} pointer files)")
    return bad


def rss_snapshot(broker, agents):
    b = proc_status(broker.pid)
    rss = sorted(proc_status(a.pid)["VmRSS"] for a in agents if a.poll() is None)
    return dict(broker_rss=b["VmRSS"] / 1024, broker_hwm=b["VmHWM"] / 1024, agents_sum=sum(rss) / 1024,
                agents_p50=rss[len(rss) // 2] / 1024 if rss else 0, agents_max=rss[-1] / 1024 if rss else 0,
                alive=len(rss))


def drive(ctx, repo, broker, http, obs, watch, idx, devs, plan, names, tag, halt=None, fail=()):
    """Runs `fleet-bundler rollout` to its end; per-wave timings from what subscribers saw."""
    new = idx["devices"]
    commit = idx["commit"]
    want = {d: new[d]["version"] for d in devs}
    with watch.lock:
        s0 = len(watch.states)
    b0 = cpu_ticks(broker.pid)
    t0 = time.monotonic()
    p = timed([ctx.bundler, "rollout", "--out", repo.out, "--broker", broker.url, "--base-url", http.url,
               "--timeout", "20m", "--json"], timeout=1500)
    t_end = time.monotonic()
    time.sleep(1.0)
    res = dict(rc=p["rc"], secs=t_end - t0, rss_mb=p["rss_mb"], stdout=p["stdout"][-800:],
               stderr=p["stderr"][-800:], broker_cpu=(cpu_ticks(broker.pid) - b0) / CLK_TCK)
    log(f"{tag}: rollout exited {p['rc']} after {res['secs']:.1f} s (peak RSS {p['rss_mb']:.0f} MB)")
    with watch.lock:
        states = [(m, s) for m, s in watch.states[s0:] if s.get("commit") == commit]
        desired = {d: [(m, v) for m, v in vs if v == want.get(d) and m >= t0] for d, vs in watch.desired.items()}
    res["final"] = states[-1][1] if states else None
    waves = []
    for i, name in enumerate(names):
        members = [d for d in devs if plan.get(d) == i]
        ann = [desired[d][0][0] for d in members if desired.get(d)]
        conv = [obs.converged_at[(d, want[d])] for d in members if (d, want[d]) in obs.converged_at
                and obs.converged_at[(d, want[d])] >= t0]
        # The state message that first shows a later wave (or `done`): the soak's end.
        soaked = next((m for m, s in states if (s.get("wave") or 0) > i or s.get("state") == "done"), None)
        started = next((m for m, s in states if (s.get("wave") or 0) >= i and s.get("state") == "running"), None)
        w = dict(name=name, devices=len(members), announced=len(ann), converged=len(conv))
        if ann:
            w["first_ann"] = min(ann) - t0
            w["last_ann"] = max(ann) - t0
        if conv and len(conv) == len(members):
            w["all_conv"] = max(conv) - t0
        if soaked is not None:
            w["soaked"] = soaked - t0
        if started is not None:
            w["started"] = started - t0
        waves.append(w)
    res["waves"] = waves
    if halt is not None:
        res.update(halt_timing(obs, states, want, set(d for d in devs), halt, t0, plan, fail))
        later = [d for d in devs if (plan.get(d) or 0) >= 2]
        res["later_announced"] = sum(1 for d in later if desired.get(d))
        res["later_pointer_new"] = sum(1 for d in later if pointer_version(repo.out, d) == want[d])
    return res


def pointer_version(out, d):
    try:
        with open(os.path.join(out, "devices", f"{d}.json")) as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def halt_timing(obs, states, want, devs, halt, t0, plan, fail):
    """Replays the statuses as a subscriber received them with the spec's criteria
    (failed > max_failed, or failed / reported > max_failed_rate once min_reporting
    reported, both counted over devices reporting on the new bundle) and finds the
    status that crossed the threshold; then the first retained `halted` state."""
    with obs.cv:
        seq = list(obs.sequence)
    failed, ok = set(), set()
    crossing = None
    for m, dev, st in seq:
        if m < t0 or dev not in devs:
            continue
        d = st.get("desired") or {}
        a = st.get("applied") or {}
        if st.get("state") in ("failed", "rolled_back") and d.get("version") == want[dev]:
            failed.add(dev)
            ok.discard(dev)
        elif st.get("state") == "converged" and a.get("version") == want[dev]:
            ok.add(dev)
            failed.discard(dev)
        else:
            continue
        rep = len(failed) + len(ok)
        trip = (halt.get("max_failed") is not None and len(failed) > halt["max_failed"]) or (
            halt.get("max_failed_rate") is not None and rep >= halt.get("min_reporting", 1)
            and len(failed) / rep > halt["max_failed_rate"])
        if trip:
            crossing = (m, dev, len(failed), rep)
            break
    halted = next((m for m, s in states if s.get("state") == "halted"), None)
    out = {"failed_seen": len(failed)}
    if crossing:
        out["crossing"] = crossing[0] - t0
        out["crossing_counts"] = (crossing[2], crossing[3])
    if halted is not None:
        out["halted"] = halted - t0
        out["halt_reason"] = next((s.get("reason") for m, s in states if s.get("state") == "halted"), None)
    if crossing and halted is not None:
        out["cross_to_halt"] = halted - crossing[0]
    return out


class SeqObserver(Observer):
    """The suite's observer, also keeping every status in arrival order."""

    def __init__(self, port):
        self.sequence = []
        super().__init__(port)

    def _on(self, m):
        parts = m.topic.split("/")
        if parts[-1] == "status" and m.payload:
            try:
                self.sequence.append((m.mono, parts[-2], json.loads(m.payload)))
            except ValueError:
                pass
        super()._on(m)


# --- report ------------------------------------------------------------------------------


def f2(x, unit=" s"):
    return "n/a" if x is None else f"{x:.2f}{unit}"


def report(ctx, scale, agents, errors):
    m = ctx.machine
    L = []
    L.append(f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['mem_gib']:.1f} GiB), {m['os']}, "
             f"kernel {m['kernel']}, {m['mosquitto']}; commit {m['commit']}; load average at start "
             f"{ctx.load0}, at end {loadavg()}. `bench/rollout.sh{' --quick' if ctx.quick else ''}`.")
    L.append("")
    if scale:
        L.append("| devices | `status --index --json` (default 1 s settle) | `status` with `--settle 100ms` | "
                 "slowest `rollout --once` step | every step: s / peak MB / announcements seen after it (wave it left the rollout in) | `build` | "
                 "broker RSS with N statuses |")
        L.append("|---|---|---|---|---|---|---|")
        for r in scale:
            s = r["status"]
            steps = r.get("steps")
            if steps:
                worst = max(steps, key=lambda x: x["secs"])
                wr = max(x["rss_mb"] or 0 for x in steps)
                slow = f"{worst['secs']:.2f} s, peak RSS {wr:.0f} MB (max over steps)"
                every = "; ".join(f"{x['secs']:.2f}/{(x['rss_mb'] or 0):.0f}/{x['announced']} (w{(x['wave'] or 0) + 1})"
                                  + (f" **exit {x['rc']}**" if x["rc"] not in (0, 4) else "") for x in steps)
            else:
                slow, every = "not measured (no `rollout` command)", ""
            L.append(f"| {r['n']:,} | {s[0]:.2f} s, peak RSS {s[1]:.0f} MB ({s[2]:,} rows) | "
                     f"{r['status_settle'][0]:.2f} s, {r['status_settle'][1]:.0f} MB | {slow} | {every} | "
                     f"{r['build_v2'][0]:.1f} s, {r['build_v2'][1]:.0f} MB | {r['broker_rss_mb']:.0f} MB |")
        L.append("")
    if agents:
        a = agents
        r1 = a["run1"]
        if r1.get("manual"):
            L.append(f"{a['n']:,} agents (cold start on v1: {a['cold']:.1f} s). Healthy rollout, **announced by the "
                     f"bench** (no `fleet-bundler rollout` in this build): {r1['secs']:.1f} s in all. Times from "
                     f"the first announcement:")
        else:
            L.append(f"{a['n']:,} agents (cold start on v1: {a['cold']:.1f} s). Run 1, healthy: `rollout` exited "
                     f"{r1['rc']} after {r1['secs']:.1f} s, peak RSS {r1['rss_mb']:.0f} MB, broker CPU "
                     f"{r1['broker_cpu']:.2f} s. Times from the start of `fleet-bundler rollout`:")
        L.append("")
        L.append("| wave | devices | first → last announcement | → all converged | → next wave (soak end) | "
                 "wave time (first announcement → soak end) |")
        L.append("|---|---|---|---|---|---|")
        for w in r1["waves"]:
            span = (f"{w['first_ann']:.2f} → {w['last_ann']:.2f} s" if "first_ann" in w else "none")
            total = (w["soaked"] - w["first_ann"]) if ("soaked" in w and "first_ann" in w) else None
            L.append(f"| {w['name']} | {w['devices']} | {span} | {f2(w.get('all_conv'))} | {f2(w.get('soaked'))} | "
                     f"{f2(total)} |")
        L.append("")
        r2 = a.get("run2")
        if r2:
            L.append(f"Run 2: {a['fail']} devices of wave 2 get a file outside their allowed roots "
                     f"(`path_not_allowed`, state `failed`); halt: max_failed 5, max_failed_rate 0.2, "
                     f"min_reporting 10. `rollout` exited {r2['rc']} after {r2['secs']:.1f} s"
                     f" (reason: {r2.get('halt_reason')}). The threshold was crossed by the status that "
                     f"arrived at {f2(r2.get('crossing'))} (failed/reported then: "
                     f"{r2.get('crossing_counts')}); the retained `halted` state arrived at "
                     f"{f2(r2.get('halted'))}: **{f2((r2.get('cross_to_halt') or 0) * 1000 if r2.get('cross_to_halt') is not None else None, ' ms')} "
                     f"from threshold crossing to halt**. Devices of waves 3-4 announced the new bundle: "
                     f"{r2.get('later_announced')}; their pointer files on the new bundle: "
                     f"{r2.get('later_pointer_new')}.")
            L.append("")
        rs = a["rss"]
        L.append(f"Memory after run 1: broker VmRSS {rs['broker_rss']:.1f} MB (peak {rs['broker_hwm']:.1f} MB); "
                 f"{rs['alive']} agents: {rs['agents_sum']:.0f} MB together, median {rs['agents_p50']:.2f} MB, "
                 f"max {rs['agents_max']:.2f} MB.")
        L.append("")
    for e in errors:
        L.append(f"- {'' if e.startswith('check:') else 'not measured: '}{e}")
    return "\n".join(L)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--bundler", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", default="")
    ap.add_argument("--agents", type=int, default=0)
    ap.add_argument("--only", default="")
    ap.add_argument("--soak", default="")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()

    class Ctx:
        pass
    ctx = Ctx()
    ctx.quick = a.quick
    ctx.agent, ctx.bundler = os.path.abspath(a.agent), os.path.abspath(a.bundler)
    ctx.procs = Procs()
    ctx.work = tempfile.mkdtemp(prefix="frollout", dir="/tmp")
    ctx.soak = a.soak or ("1s" if a.quick else "5s")
    ctx.fail_min = 6 if a.quick else 10
    ctx.load0 = loadavg()
    ctx.machine = machine()
    ctx.have_rollout = "rollout" in run([ctx.bundler, "--help"], check=False).stdout
    sizes = [int(x) for x in a.scale.split(",") if x] or ([1000] if a.quick else [10000, 100000])
    n_agents = a.agents or (50 if a.quick else 1000)
    only = set(filter(None, a.only.split(",")))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    errors, scale, agents = [], [], None
    try:
        if not only or "scale" in only:
            for n in sizes:
                try:
                    scale.append(measure_scale(ctx, n))
                except Exception as e:  # noqa: BLE001
                    log(f"scale {n} failed: {e!r}")
                    errors.append(f"scale {n}: {e}")
        if not only or "agents" in only:
            if not ctx.have_rollout:
                errors.append("`fleet-bundler rollout` (this build has no such command): every `rollout --once` "
                              "step, the bundler's own wave bookkeeping, and the halt (threshold crossing → "
                              "`halted`); the agents' waves below are announced by the bench itself")
            try:
                agents = measure_agents(ctx, n_agents)
                errors += agent_checks(agents)
            except Exception as e:  # noqa: BLE001
                log(f"agents failed: {e!r}")
                errors.append(f"agents {n_agents}: {e}")
    finally:
        ctx.procs.stop_all()
        if os.environ.get("FLEET_BENCH_KEEP") != "1":
            shutil.rmtree(ctx.work, ignore_errors=True)
        else:
            log(f"kept {ctx.work}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"scale": scale, "agents": agents, "errors": errors}, f, indent=1, default=str)
    print(report(ctx, scale, agents, errors))
    # Benchmarks are not tests, but a section that could not run (or a rollout that did
    # not behave: see agent_checks) makes the figures meaningless: say so to CI.
    real = [e for e in errors if "has no such command" not in e]
    return 1 if real else 0


if __name__ == "__main__":
    sys.exit(main())
