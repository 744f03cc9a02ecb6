#!/usr/bin/env bash
# Rollouts at scale (issue 14). Prints a Markdown section (the "Rollouts (issue 14)"
# section of BENCHMARKS.md) on stdout, progress on stderr.
#
#   bench/rollout.sh                   # 10,000 and 100,000 synthetic devices; 1,000 agents
#   bench/rollout.sh --quick           # CI: 1,000 synthetic devices; 50 agents (< 60 s once built)
#   bench/rollout.sh --only scale      # or --only agents
#   bench/rollout.sh --scale 20000 --agents 200 --soak 2s
#
# scale:  a generated N-device fleet built with the real `fleet-bundler build`, N retained
#         status reports + N online flags on a private Mosquitto (checked by counting them
#         back), then `fleet-bundler status --index --json` and each `rollout --once` step
#         of a 4-wave rollout under /usr/bin/time -v (wall time, peak RSS).
# agents: N real `fleet-agent` processes (release build, files only, pointer poll 5 s,
#         JSON logs), a 4-wave rollout driven by `fleet-bundler rollout` (time per wave),
#         then one whose wave 2 has failing devices (time from threshold crossing to halt).
#
# Needs mosquitto, git, python3 and /usr/bin/time (package `time`); not part of run.sh.
# FLEET_BENCH_KEEP=1 keeps the work dir (/tmp/frollout*). Builds in release mode
# (honours CARGO_TARGET_DIR), one package per cargo invocation as run.sh does.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for p in mosquitto git python3 /usr/bin/time; do
    command -v "$p" >/dev/null 2>&1 || {
        echo "bench/rollout.sh: $p is not installed: run scripts/setup.sh (as root) first" >&2
        exit 1
    }
done
case "${1:-}" in -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
for pkg in fleet-agent fleet-bundler; do
    cargo build --release -q -p "$pkg" --manifest-path "$ROOT/Cargo.toml"
done
# 1,000 agents hold ~3 descriptors each plus the bench's; raise the soft limit if allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 "$ROOT/bench/rollout.py" --agent "$CARGO_TARGET_DIR/release/fleet-agent" \
    --bundler "$CARGO_TARGET_DIR/release/fleet-bundler" "$@"
