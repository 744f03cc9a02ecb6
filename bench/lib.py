"""Plumbing for the benchmark suite: processes, /proc readings, the components the
measurements run on (Mosquitto with TLS, the byte-counting HTTP server, dockerd, a
registry, busybox images), fleet repositories, agent configs and an MQTT observer.

Everything started here is a child of the suite and is stopped by its PID (never by
name); temp dirs live under one work dir that the suite removes at the end.
"""
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqttc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()

FLEET = "bench"
PREFIX = "fleet"


def log(msg):
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A measurement cannot run on this machine; the message says why."""


def need(program, hint="run scripts/setup.sh (as root) first"):
    path = shutil.which(program)
    if not path:
        raise Skip(f"`{program}` is not installed ({hint})")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, timeout, fn, interval=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except Exception as e:  # noqa: BLE001 - "not yet"
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))


def run(cmd, timeout=600, check=True, env=None, cwd=None, input=None):
    """Runs a command, returns CompletedProcess with text stdout/stderr."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, input=input)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, cmd, p.stdout, p.stderr)
    return p


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


# --- processes --------------------------------------------------------------------------


class Procs:
    """Children of the suite, stopped by PID: SIGTERM, a grace period, then SIGKILL."""

    def __init__(self):
        self.items = []

    def spawn(self, name, cmd, log_path, env=None, cwd=None):
        out = open(log_path, "ab")
        try:
            p = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                start_new_session=True,
            )
        finally:
            out.close()
        p.bench_name = name
        p.bench_log = log_path
        self.items.append(p)
        return p

    def stop(self, procs, grace=10.0):
        if not isinstance(procs, (list, tuple)):
            procs = [procs]
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        killed = 0
        for p in alive:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed += 1
        for p in procs:
            if p in self.items:
                self.items.remove(p)
        return killed

    def stop_all(self):
        self.stop(list(reversed(self.items)), grace=10.0)


def proc_status(pid):
    """VmRSS, VmHWM (KiB) and context switches (summed over threads) of a live process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    vol = invol = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
    except OSError:
        pass
    out["ctxt"] = vol + invol
    return out


def rss_by_mapping(pid):
    """{mapping name: Rss KiB} from /proc/PID/smaps (anonymous mappings as [anon])."""
    out = {}
    name = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif first == "Rss:":
                out[name] = out.get(name, 0) + int(line.split()[1])
    return out


def proc_memory(pid):
    """{"rss", "pss", "private"} in KiB from /proc/PID/smaps_rollup: RSS counts every page
    mapped, shared ones (the binary's code, libc) in full in every process; PSS divides each
    shared page among the processes mapping it; private is what only this process maps
    (what one more process adds)."""
    out = {"rss": 0, "pss": 0, "private": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "Rss":
                out["rss"] = int(v.split()[0])
            elif k == "Pss":
                out["pss"] = int(v.split()[0])
            elif k in ("Private_Clean", "Private_Dirty"):
                out["private"] += int(v.split()[0])
    return out


def meminfo():
    """/proc/meminfo in KiB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0])
    return out


def cpu_ticks(pid):
    """CPU time a process (all its threads) has used, in clock ticks (1/CLK_TCK s).

    From /proc/PID/task/*/schedstat (nanoseconds) when the kernel has it: utime+stime in
    /proc/PID/stat are whole ticks per process, which rounds the few milliseconds an
    agent spends on an update down to nothing. Falls back to utime+stime."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total * CLK_TCK / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])


def machine():
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info["cpu"] = model
    info["cores"] = os.cpu_count()
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                info["mem_gib"] = int(line.split()[1]) / 1048576
    info["kernel"] = os.uname().release
    info["os"] = "unknown"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        rev = run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], timeout=10).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], timeout=10).stdout.strip()
        info["commit"] = rev + (" + uncommitted changes" if dirty else "")
    except Exception:  # noqa: BLE001
        info["commit"] = "unknown"
    for name, cmd in [("rustc", ["rustc", "--version"]), ("mosquitto", ["mosquitto", "-h"]),
                      ("dockerd", ["dockerd", "--version"])]:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            info[name] = (p.stdout or p.stderr).splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            info[name] = "not installed"
    return info


# --- TLS and the broker ---------------------------------------------------------------


def make_tls(dirpath):
    """A CA and a server certificate for 127.0.0.1/localhost (ECDSA P-256, SAN, v3)."""
    need("openssl", "apt-get install -y openssl")
    os.makedirs(dirpath, exist_ok=True)
    ca_key, ca_crt = f"{dirpath}/ca.key", f"{dirpath}/ca.pem"
    key, csr, crt = f"{dirpath}/server.key", f"{dirpath}/server.csr", f"{dirpath}/server.pem"
    ext = f"{dirpath}/server.ext"
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key])
    run(["openssl", "req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "30", "-subj", "/CN=fleet bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-out", ca_crt])
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key])
    run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=127.0.0.1", "-out", csr])
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-days", "30",
         "-sha256", "-extfile", ext, "-out", crt])
    return {"ca": ca_crt, "cert": crt, "key": key}


class Broker:
    """Mosquitto with a plain and (when `tls`) a TLS listener on loopback."""

    def __init__(self, procs, workdir, tls=None):
        need("mosquitto")
        self.dir = os.path.join(workdir, "mosquitto")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        conf = [
            "per_listener_settings false", "allow_anonymous true", "persistence false", "user root",
            "log_dest stderr", "log_type error", "log_type warning", "max_queued_messages 100000",
        ] + (["set_tcp_nodelay true"] if os.environ.get("BENCH_NODELAY") == "1" else []) + [
            f"listener {self.port} 127.0.0.1",
        ]
        if tls:
            conf += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls['ca']}", f"certfile {tls['cert']}",
                     f"keyfile {tls['key']}"]
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(conf) + "\n")
        self.log = os.path.join(self.dir, "mosquitto.log")
        self.procs = procs
        self.start()

    def start(self):
        self.proc = self.procs.spawn("mosquitto", ["mosquitto", "-c", self.conf], self.log)
        wait_for("mosquitto to listen", 10, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True)
        if self.proc.poll() is not None:
            raise Skip(f"mosquitto exited: {tail(self.log)}")
        self.pid = self.proc.pid

    def restart(self, down_secs):
        """Stops the broker (its retained messages are gone: no persistence), waits
        `down_secs`, starts it again on the same ports."""
        self.procs.stop(self.proc)
        time.sleep(down_secs)
        self.start()

    @property
    def url(self):
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self):
        return f"mqtts://127.0.0.1:{self.tls_port}"


class HttpServer:
    def __init__(self, procs, workdir, root):
        self.port = free_port()
        self.log = os.path.join(workdir, f"httpd-{self.port}.requests")
        self.proc = procs.spawn(
            "httpd", [sys.executable, os.path.join(ROOT, "bench", "httpd.py"), "--root", root, "--port",
                      str(self.port), "--log", self.log], os.path.join(workdir, f"httpd-{self.port}.log"))
        wait_for("the HTTP server", 10, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def pids(self):
        return [self.proc.pid]

    def requests(self):
        """[(unix time, path, status, request bytes, response bytes)]"""
        out = []
        try:
            with open(self.log) as f:
                for line in f:
                    t, path, status, rin, rout = line.split()
                    out.append((float(t), path, int(status), int(rin), int(rout)))
        except OSError:
            pass
        return out


class Nginx:
    """nginx (Debian's nginx-light) serving `root` on loopback: the bundle server of a
    real deployment, for fleets the Python server cannot keep up with. Runs in the
    foreground as a child of the suite; `pids()` are the master and its workers."""

    def __init__(self, procs, workdir, root, workers=2, connections=20000):
        nginx = need("nginx", "apt-get install -y nginx-light")
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self.port = free_port()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""user root;
worker_processes {workers};
worker_rlimit_nofile {connections + 100};
error_log {self.dir}/logs/error.log warn;
pid {self.dir}/nginx.pid;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {self.dir}/body; proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fcgi; uwsgi_temp_path {self.dir}/uwsgi; scgi_temp_path {self.dir}/scgi;
    server {{ listen 127.0.0.1:{self.port} backlog=4096; root {root}; }}
}}
""")
        self.proc = procs.spawn("nginx", [nginx, "-c", conf, "-p", self.dir, "-g", "daemon off;"],
                                os.path.join(self.dir, "nginx.out"))
        wait_for("nginx", 10, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def pids(self):
        out = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return out


# --- Docker Engine and registry -------------------------------------------------------

LOCK_DIR = "/tmp/fleet-e2e-locks"  # shared with the test harness (tests/src/dockerd.rs)


class Dockerd:
    """A private dockerd as in tests/src/dockerd.rs: own data/exec root, socket, bridge
    `fe2e-dN` on 10.(150+N).255.1/24 and address pool 10.(150+N).0.0/17, with the slot
    claimed through the harness's lock files so parallel test runs do not collide."""

    def __init__(self, procs, workdir):
        for prog in ("dockerd", "containerd", "runc", "docker", "ip"):
            need(prog)
        self.procs = procs
        self.dir = os.path.join(workdir, "d")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "d.sock")
        os.makedirs(LOCK_DIR, exist_ok=True)
        self.slot_file = None
        routes = run(["ip", "-4", "route", "show"], check=False).stdout
        for idx in range(40):
            f = open(os.path.join(LOCK_DIR, f"net-{idx}.lock"), "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            bridge = f"fe2e-d{idx}"
            self._del_link(bridge)
            octet = 150 + idx
            if any(r.startswith(f"10.{octet}.") and f"dev {bridge} " not in r for r in routes.splitlines()):
                f.close()
                continue
            self.slot_file, self.bridge, self.octet = f, bridge, octet
            break
        if not self.slot_file:
            raise Skip(f"all dockerd network slots in {LOCK_DIR} are taken")
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"10.{self.octet}.255.1/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        with open(os.path.join(self.dir, "daemon.json"), "w") as f:
            f.write("{}\n")
        startup = open(os.path.join(LOCK_DIR, "dockerd-startup.lock"), "a")
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(startup, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise Skip("another dockerd kept the startup lock for 5 minutes")
                time.sleep(0.1)
        try:
            self.log = os.path.join(self.dir, "dockerd.log")
            self.proc = procs.spawn("dockerd", [
                "dockerd", "--config-file", os.path.join(self.dir, "daemon.json"),
                "--data-root", os.path.join(self.dir, "data"), "--exec-root", os.path.join(self.dir, "x"),
                "--pidfile", os.path.join(self.dir, "dockerd.pid"), "-H", f"unix://{self.sock}",
                f"--bridge={self.bridge}", f"--default-address-pool=base=10.{self.octet}.0.0/17,size=24",
            ], self.log)
            try:
                wait_for("dockerd to answer /_ping", 60,
                         lambda: self.proc.poll() is None and self.docker("version", timeout=5) is not None)
            except TimeoutError:
                raise Skip(f"dockerd did not start: {tail(self.log, 8)}")
        finally:
            startup.close()

    def docker(self, *args, timeout=120, check=True):
        return run(["docker", "-H", f"unix://{self.sock}", *args], timeout=timeout, check=check).stdout

    @staticmethod
    def _del_link(name):
        if os.path.exists(f"/sys/class/net/{name}"):
            run(["ip", "link", "del", name], check=False)

    def close(self):
        bridges = [self.bridge]
        try:
            if self.proc.poll() is None:
                ids = self.docker("ps", "-aq", timeout=30, check=False).split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, timeout=120, check=False)
                for line in self.docker("network", "ls", "-q", "--filter", "type=custom", timeout=30,
                                        check=False).split():
                    bridges.append(f"br-{line[:12]}")
                self.docker("network", "prune", "-f", timeout=60, check=False)
        except Exception as e:  # noqa: BLE001
            log(f"cleaning up dockerd: {e}")
        self.procs.stop(self.proc, grace=20)
        # containerd-shims and docker-proxies of this daemon: processes naming our dir.
        needle = (self.dir + "/").encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        mounts = []
        with open("/proc/mounts") as f:
            for line in f:
                mp = line.split()[1]
                if mp.startswith(self.dir + "/"):
                    mounts.append(mp)
        for mp in sorted(mounts, key=len, reverse=True):
            run(["umount", "-l", mp], check=False)
        for b in bridges:
            self._del_link(b)
        if self.slot_file:
            self.slot_file.close()


class Registry:
    def __init__(self, procs, workdir):
        need("docker-registry")
        self.dir = os.path.join(workdir, "registry")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        conf = os.path.join(self.dir, "registry.yml")
        with open(conf, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.dir}/data\n"
                    f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.log = os.path.join(self.dir, "registry.log")
        self.proc = procs.spawn("registry", ["docker-registry", "serve", conf], self.log)
        wait_for("the registry", 20, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"


def build_busybox_image(dockerd, workdir, tag, marker):
    """FROM scratch + static busybox (+ applets) + /www/index.html containing `marker`."""
    busybox = need("busybox", "apt-get install -y busybox-static")
    with open(busybox, "rb") as f:
        if b"/ld-linux" in f.read():
            raise Skip("busybox is dynamically linked: install busybox-static")
    ctx = os.path.join(workdir, "img-" + tag.replace("/", "_").replace(":", "_"))
    os.makedirs(os.path.join(ctx, "bin"), exist_ok=True)
    os.makedirs(os.path.join(ctx, "www"), exist_ok=True)
    shutil.copy(busybox, os.path.join(ctx, "bin", "busybox"))
    for applet in ("sh", "sleep", "true", "cat", "httpd", "wget"):
        os.symlink("busybox", os.path.join(ctx, "bin", applet))
    with open(os.path.join(ctx, "www", "index.html"), "w") as f:
        f.write(marker + "\n")
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write('FROM scratch\nCOPY bin /bin\nCOPY www /www\nCMD ["/bin/sleep", "3600"]\n')
    dockerd.docker("build", "-q", "-t", tag, ctx, timeout=300)


def push(dockerd, ref):
    out = dockerd.docker("push", ref, timeout=300)
    words = out.split()
    for i, w in enumerate(words):
        if w == "digest:" and i + 1 < len(words) and words[i + 1].startswith("sha256:"):
            return words[i + 1]
    raise RuntimeError(f"no digest in `docker push {ref}` output: {out}")


# --- fleet repository, bundler, agent ------------------------------------------------


class Fleet:
    """A fleet Git repository in a temp dir, built and published with fleet-bundler."""

    def __init__(self, bundler, path, vars=None, file_root=None):
        self.bundler = bundler
        self.path = path
        self.out = path + "-out"
        os.makedirs(path, exist_ok=True)
        os.makedirs(self.out, exist_ok=True)
        self.vars = dict(vars or {})
        self.file_root = file_root
        self.write_fleet_yaml()
        run(["git", "init", "-q", "-b", "main", path])
        self.keys = path + "-keys"
        run([bundler, "keygen", "--out", self.keys])
        self.pubkey = os.path.join(self.keys, "signing.pub")
        self.key = os.path.join(self.keys, "signing.key")
        self.seq = 0

    def write_fleet_yaml(self):
        text = f"name: {FLEET}\ntopic_prefix: {PREFIX}\nbundle_expiry: 90d\n"
        if self.file_root:
            text += f"file_root: {self.file_root}\n"
        if self.vars:
            text += "vars:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in self.vars.items())
        self.write("fleet.yaml", text)

    def write(self, rel, text):
        full = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)

    def remove(self, rel):
        full = os.path.join(self.path, rel)
        if os.path.isdir(full):
            shutil.rmtree(full)
        elif os.path.exists(full):
            os.remove(full)

    def commit(self, msg):
        self.seq += 1
        g = ["git", "-C", self.path, "-c", "user.name=bench", "-c", "user.email=bench@fleet.invalid"]
        run(g + ["add", "-A"])
        run(g + ["commit", "-q", "--allow-empty", "-m", msg])

    def build(self, level=None, timeout=600):
        cmd = [self.bundler, "build", "--repo", self.path, "--key", self.key, "--out", self.out, "--json"]
        if level:
            cmd += ["--level", str(level)]
        t = time.monotonic()
        p = run(cmd, timeout=timeout)
        secs = time.monotonic() - t
        return json.loads(p.stdout), secs

    def index(self):
        with open(os.path.join(self.out, "index.json")) as f:
            return json.load(f)

    def publish_cmd(self, broker_url, base_url):
        return [self.bundler, "publish", "--out", self.out, "--broker", broker_url, "--base-url", base_url, "--json"]


def agent_config(path, device, state_dir, roots, pubkey, mqtt_url=None, ca_file=None, base_url=None,
                 engine="none", extra=None, poll_secs=None):
    lines = [
        f"device = {json.dumps(device)}",
        f"fleet = {json.dumps(FLEET)}",
        f"topic_prefix = {json.dumps(PREFIX)}",
        f"state_dir = {json.dumps(state_dir)}",
        f"allowed_roots = {json.dumps(roots)}",
        'log_format = "json"',
    ]
    for k, v in (extra or {}).items():
        lines.append(f"{k} = {json.dumps(v)}")
    if mqtt_url:
        lines += ["[mqtt]", f"url = {json.dumps(mqtt_url)}"]
        if ca_file:
            lines.append(f"ca_file = {json.dumps(ca_file)}")
    lines += ["[trust]", f"public_keys = [{json.dumps(pubkey)}]"]
    if base_url:
        lines += ["[fetch]", f"base_url = {json.dumps(base_url)}"]
        if poll_secs:
            lines.append(f"poll_interval_secs = {poll_secs}")
    lines += ["[engine]", f"socket = {json.dumps(engine)}"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Observer:
    """Subscribes to every device's status/desired/events and timestamps each message."""

    def __init__(self, broker_port):
        self.cv = threading.Condition()
        self.status = {}  # device -> parsed status (latest)
        self.converged_at = {}  # (device, version) -> monotonic time of the first converged status
        self.failed = {}  # device -> status that says failed/rolled_back
        self.messages = []  # (mono, device, kind, wire bytes, payload bytes, retained)
        self.desired_at = {}  # (device, version) -> monotonic
        self.finished_at = {}  # (device, version) -> monotonic of the apply_finished event
        self.client = mqttc.Client("127.0.0.1", broker_port, f"bench-observer-{os.getpid()}-{time.monotonic_ns()}",
                                   self._on)
        base = f"{PREFIX}/{FLEET}/devices/+"
        self.client.subscribe(f"{base}/status", f"{base}/desired", f"{base}/events")

    def _on(self, m):
        parts = m.topic.split("/")
        device, kind = parts[-2], parts[-1]
        with self.cv:
            self.messages.append((m.mono, device, kind, m.wire_bytes, len(m.payload), m.retain))
            if kind == "status" and m.payload:
                try:
                    st = json.loads(m.payload)
                except ValueError:
                    return
                st["_mono"] = m.mono
                self.status[device] = st
                applied = st.get("applied") or {}
                if st.get("state") == "converged" and applied.get("version") is not None:
                    self.converged_at.setdefault((device, applied["version"]), m.mono)
                elif st.get("state") in ("failed", "rolled_back"):
                    self.failed[device] = st
                self.cv.notify_all()
            elif kind == "events" and m.payload:
                try:
                    ev = json.loads(m.payload)
                except ValueError:
                    return
                if ev.get("event") == "apply_finished":
                    self.finished_at.setdefault((device, ev.get("version")), m.mono)
            elif kind == "desired" and m.payload:
                try:
                    ann = json.loads(m.payload)
                    self.desired_at.setdefault((device, ann.get("version")), m.mono)
                except ValueError:
                    pass

    def wait_converged(self, want, timeout, since=None):
        """want: {device: version}. Returns {device: mono time converged on >= version}.
        Fails early when a device reports failed/rolled_back for the wanted version.

        Only devices not yet done are looked at again, at most every 0.2 s for large
        fleets: with 10,000 agents a pass per status message would cost O(n²) and starve
        the observer's own reader thread (the arrival times come from the reader, so a
        late check does not move them)."""
        deadline = time.monotonic() + timeout
        done = {}
        pending = dict(want)
        with self.cv:
            while True:
                for dev, ver in list(pending.items()):
                    t = self.converged_at.get((dev, ver))
                    if t is None:
                        st = self.status.get(dev) or {}
                        applied = st.get("applied") or {}
                        if st.get("state") == "converged" and (applied.get("version") or 0) >= ver:
                            t = st["_mono"]
                    if t is not None and (since is None or t >= since):
                        done[dev] = t
                        del pending[dev]
                    elif dev in self.failed:
                        st = self.failed[dev]
                        if ((st.get("desired") or {}).get("version") == ver):
                            raise RuntimeError(f"device {dev} reports {st.get('state')}: {st.get('last_error')}")
                if not pending:
                    return done
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(pending)
                    sample = {d: (self.status.get(d) or {}).get("state") for d in missing[:5]}
                    raise TimeoutError(f"{len(missing)} of {len(want)} device(s) not converged after {timeout:.0f} s "
                                       f"(e.g. {sample})")
                if len(pending) > 500:
                    self.cv.release()
                    try:
                        time.sleep(min(left, 0.2))
                    finally:
                        self.cv.acquire()
                else:
                    self.cv.wait(min(left, 1.0))

    def close(self):
        self.client.close()


class OnlineCounter:
    """Counts the devices whose retained `online` flag says true, with the time each was
    first seen (monotonic)."""

    def __init__(self, broker_port):
        self.cv = threading.Condition()
        self.online_at = {}
        self.client = mqttc.Client("127.0.0.1", broker_port, f"bench-online-{os.getpid()}-{time.monotonic_ns()}",
                                   self._on)
        self.client.subscribe(f"{PREFIX}/{FLEET}/devices/+/online")

    def _on(self, m):
        if m.payload == b"true":
            with self.cv:
                self.online_at.setdefault(m.topic.split("/")[-2], m.mono)
                self.cv.notify_all()

    def wait(self, n, timeout):
        deadline = time.monotonic() + timeout
        with self.cv:
            while len(self.online_at) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{n - len(self.online_at)} of {n} device(s) not back online after "
                                       f"{timeout:.0f} s")
                self.cv.wait(min(left, 1.0))
            return dict(self.online_at)

    def close(self):
        self.client.close()


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]
