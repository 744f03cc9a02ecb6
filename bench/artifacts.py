#!/usr/bin/env python3
"""Large payloads on one device: the agent's peak RSS while it downloads and applies an
artifact of 1 MB, 50 MB and 500 MB (and 2,000 small files), and the bytes on the wire
for a one-line change beside a 200 MB artifact.

    python3 bench/artifacts.py [--agent PATH] [--bundler PATH] [--sizes 1,50,500]
                               [--files 2000] [--out FILE]

Each case starts a fresh agent (fresh state directory and allowed root, so everything is
downloaded and written), publishes the case's bundle, waits for `converged` and reads
the agent's VmHWM from /proc: its peak RSS over its whole life, start-up included. The
payloads are random bytes (incompressible, as models and firmware are). Runs on
Mosquitto and bench/httpd.py (which counts the bytes it sends) on loopback; needs the
release binaries (`cargo build --release -p fleet-agent -p fleet-bundler`). Prints a
Markdown table (and writes it to --out).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import (ROOT, Broker, Fleet, HttpServer, Observer, Procs, agent_config, log,  # noqa: E402
                 proc_status, run)

DEV = "dev-01"
MB = 1000 * 1000


def write_random(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n


class Bench:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.procs = Procs()
        self.broker = Broker(self.procs, work)
        self.roots = os.path.join(work, "roots")
        self.fleet = Fleet(args.bundler, os.path.join(work, "repo"), file_root=os.path.join(self.roots, "r0"))
        self.http = HttpServer(self.procs, work, self.fleet.out)
        self.obs = Observer(self.broker.port)
        self.fleet.write(f"devices/{DEV}.yaml", "labels:\n  slot: one\n")
        self.seq = 0
        self.agent = None
        self.conf_rev = 0
        self.write_conf()

    def write_conf(self):
        self.conf_rev += 1
        self.fleet.write("apps/conf/files/app.conf", f"# benchmark\nrevision = {self.conf_rev}\n")

    def app_yaml(self, root, with_model, small_files):
        files = f"  - source: files/app.conf\n    target: {root}/conf/app.conf\n"
        if with_model:
            files += f"  - source: files/model.bin\n    target: {root}/models/model.bin\n"
        for i in range(small_files):
            files += f"  - source: files/small/f{i:04d}.conf\n    target: {root}/small/f{i:04d}.conf\n"
        self.fleet.write("apps/conf/app.yaml", f"selector:\n  slot: one\nfiles:\n{files}")

    def case(self, label, model_bytes=0, small_files=0, keep=False):
        """One fresh device applying one bundle; returns (VmHWM KiB, seconds, bundle bytes)."""
        self.seq += 1
        root = os.path.join(self.roots, f"r{self.seq}")
        os.makedirs(root, exist_ok=True)
        model = os.path.join(self.fleet.path, "apps/conf/files/model.bin")
        if model_bytes:
            write_random(model, model_bytes)
        elif os.path.exists(model):
            os.remove(model)
        small_dir = os.path.join(self.fleet.path, "apps/conf/files/small")
        shutil.rmtree(small_dir, ignore_errors=True)
        for i in range(small_files):
            self.fleet.write(f"apps/conf/files/small/f{i:04d}.conf",
                             "".join(f"key_{j} = value {i}-{j}\n" for j in range(90)))
        self.app_yaml(root, bool(model_bytes), small_files)
        self.fleet.commit(label)
        log(f"{label}: building")
        self.fleet.build(timeout=1800)
        idx = self.fleet.index()["devices"][DEV]
        cfg = agent_config(os.path.join(self.work, "cfg", f"{self.seq}.toml"), DEV,
                           os.path.join(self.work, f"state-{self.seq}"), [root], self.fleet.pubkey,
                           self.broker.url, None, self.http.url, "none")
        proc = self.procs.spawn("fleet-agent", [self.args.agent, "run", "--config", cfg],
                                os.path.join(self.work, f"agent-{self.seq}.log"))
        t0 = time.monotonic()
        run(self.fleet.publish_cmd(self.broker.url, self.http.url), timeout=120)
        log(f"{label}: waiting for the device")
        done = self.obs.wait_converged({DEV: idx["version"]}, 1800, since=t0)
        took = done[DEV] - t0
        time.sleep(0.3)
        hwm = proc_status(proc.pid)["VmHWM"]
        if keep:
            self.agent = (proc, idx)
        else:
            self.procs.stop(proc)
        return hwm, took, idx["size"]

    def one_line_change(self):
        """With the agent of the last case still running: one line of app.conf changes;
        returns (HTTP bytes sent after the change, blob requests, bundle bytes)."""
        proc, _ = self.agent
        before = len(self.http.requests())
        text = open(os.path.join(self.fleet.path, "apps/conf/files/app.conf")).read()
        self.fleet.write("apps/conf/files/app.conf", text.replace("revision = ", "revision = 2"))
        self.fleet.commit("one line")
        self.fleet.build(timeout=1800)
        idx = self.fleet.index()["devices"][DEV]
        t0 = time.monotonic()
        run(self.fleet.publish_cmd(self.broker.url, self.http.url), timeout=120)
        self.obs.wait_converged({DEV: idx["version"]}, 600, since=t0)
        reqs = self.http.requests()[before:]
        sent = sum(r[4] for r in reqs)
        blobs = [r for r in reqs if "/blobs/" in r[1]]
        self.procs.stop(proc)
        return sent, len(blobs), idx["size"], [r[1] for r in reqs]

    def close(self):
        self.obs.close()
        self.procs.stop_all()


def mib(kib):
    return f"{kib / 1024:.2f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default=os.path.join(ROOT, "target/release/fleet-agent"))
    ap.add_argument("--bundler", default=os.path.join(ROOT, "target/release/fleet-bundler"))
    ap.add_argument("--sizes", default="1,50,500", help="artifact sizes in MB (10^6 bytes)")
    ap.add_argument("--files", type=int, default=2000, help="the many-small-files case (0: skip)")
    ap.add_argument("--wire-mb", type=int, default=200, help="the artifact beside the one-line change")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    os.environ["FLEET_MAX_FILE_SIZE"] = "2GiB"
    work = tempfile.mkdtemp(prefix="fleet-bench-artifacts-")
    rows = []
    b = Bench(args, work)
    try:
        hwm, took, size = b.case("baseline: one config file")
        rows.append(("one 60 B config file (baseline)", mib(hwm), f"{took:.1f} s", f"{size:,} B"))
        for mb in [int(x) for x in args.sizes.split(",") if x]:
            hwm, took, size = b.case(f"{mb} MB artifact", model_bytes=mb * MB)
            rows.append((f"one {mb} MB artifact (+ the config file)", mib(hwm), f"{took:.1f} s", f"{size:,} B"))
        if args.files:
            hwm, took, size = b.case(f"{args.files} small files", small_files=args.files)
            rows.append((f"{args.files:,} files of 1.9 KB (inline up to the 1 MiB budget, the rest artifacts)",
                         mib(hwm), f"{took:.1f} s", f"{size:,} B"))
        wire = None
        if args.wire_mb:
            hwm, took, size = b.case(f"{args.wire_mb} MB artifact for the wire", model_bytes=args.wire_mb * MB,
                                     keep=True)
            rows.append((f"one {args.wire_mb} MB artifact (+ the config file)", mib(hwm), f"{took:.1f} s",
                         f"{size:,} B"))
            wire = b.one_line_change()
    finally:
        b.close()
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| apply (fresh device, everything downloaded) | agent peak RSS (VmHWM) | publish → converged "
             "| bundle |", "|---|---|---|---|"]
    lines += [f"| {a} | {r} | {t} | {s} |" for a, r, t, s in rows]
    if wire:
        sent, blobs, size, paths = wire
        lines += ["", f"One-line change of the config file beside the {args.wire_mb} MB artifact: "
                  f"**{sent:,} B** sent by the bundle server ({len(paths)} requests: "
                  f"{', '.join(sorted(set(p.rsplit('/', 2)[-2] + '/…' for p in paths)))}; "
                  f"{blobs} blob requests), bundle {size:,} B."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
