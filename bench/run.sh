#!/usr/bin/env bash
# Runs the benchmark suite and rewrites BENCHMARKS.md at the repository root.
#
#   bench/run.sh            # full run: 60 s idle window, 50+50 config changes,
#                           # 10,000-device bundler fleet, 100 and 1,000 agents, static
#                           # and cross builds, cargo bloat (~5 min once built)
#   bench/run.sh --quick    # CI: 10 s idle window, 10+10 changes, 200-device bundler
#                           # fleet, 20 agents, no extra builds (~1.5 min once built)
#
# Options:
#   --quick          the short mode above
#   --out FILE       write the report somewhere else (default: BENCHMARKS.md)
#   --no-install     do not install packages (scripts/setup.sh, mender-client, openssl)
#   --only LIST      run only some sections: sizes,cross,bloat,device,bundler,fleet (development)
#   --fleet-sizes N,N,...   agents per fleet run instead of 100,1000 (quick: 20); up to
#                    10,000 here, see "10,000 agents" in BENCHMARKS.md
#   --fleet-rate R   agents started per second (default 250)
#   --fleet-http python|nginx   the fleet runs' bundle server (default: bench/httpd.py)
#   --fleet-nice-infra   broker and bundle server at nice -10 (as if on their own machines)
#   --fleet-restart SECS   then stop the broker for SECS: time until all agents are back online
#   -h, --help       this help
#
# As root it first installs what it measures with (idempotent): scripts/setup.sh
# (Mosquitto, dockerd, registry, busybox, ...), Debian's mender-client (the peer measured
# side by side; its service is never started) and openssl. Then it builds fleet-agent and
# fleet-bundler in release mode (CARGO_TARGET_DIR is honoured, default target/) and runs
# bench/suite.py, which starts its own broker, HTTP server, dockerd and registry on
# loopback and stops them by PID. The aarch64 size needs Debian's cross toolchain
# (`scripts/setup.sh --cross`); without it the report says so.
#
# Exit status: 0 when the report was written, whatever the numbers say (a measurement
# that cannot run on this machine says why in the report); non-zero only when the suite
# is broken: a binary does not build, or the suite hit a bug of its own.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
QUICK=()
OUT="$ROOT/BENCHMARKS.md"
INSTALL=1
ONLY=()
FLEET=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=(--quick); shift ;;
        --out) OUT="$(realpath -m "$2")"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --only) ONLY=(--only "$2"); shift 2 ;;
        --fleet-sizes | --fleet-rate | --fleet-http | --fleet-restart) FLEET+=("$1" "$2"); shift 2 ;;
        --fleet-nice-infra) FLEET+=("$1"); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33m[bench] WARNING:\033[0m %s\n' "$*" >&2; }
START=$(date +%s)

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]; }

install_packages() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        warn "not root (or no apt-get): not installing packages; missing ones are reported in the results"
        return 0
    fi
    if [ -x "$ROOT/scripts/setup.sh" ]; then
        "$ROOT/scripts/setup.sh" || warn "scripts/setup.sh failed; measurements that need a missing component will say so"
    fi
    local missing=()
    for p in mender-client openssl time; do installed "$p" || missing+=("$p"); done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "installing ${missing[*]}"
    # Keep the packages' maintainer scripts from starting daemons (mender-client has a
    # service): add a policy-rc.d for the install unless the system already has one.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# temporary, from fleet bench/run.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local attempt
    for attempt in 1 2 3; do
        apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null 2>&1 || true
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
            --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
            break
        fi
        warn "apt-get install ${missing[*]} failed (attempt $attempt/3)"
        sleep $((attempt * 5))
    done
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

if [ "$INSTALL" = 1 ]; then
    install_packages
fi
command -v python3 >/dev/null 2>&1 || { echo "bench/run.sh: python3 is required" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || { echo "bench/run.sh: cargo is required" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$CARGO_TARGET_DIR" in /*) ;; *) CARGO_TARGET_DIR="$ROOT/$CARGO_TARGET_DIR" ;; esac
say "building fleet-agent and fleet-bundler (release) into $CARGO_TARGET_DIR"
BUILD_START=$(date +%s)
# One package per cargo invocation: built together, the two would share unified
# dependency features, and the agent would not be the binary that ships.
for pkg in fleet-agent fleet-bundler; do
    if ! cargo build --release -q -p "$pkg" --manifest-path "$ROOT/Cargo.toml"; then
        echo "bench/run.sh: the release build of $pkg failed: the suite cannot run" >&2
        exit 1
    fi
done
say "built in $(($(date +%s) - BUILD_START)) s"
AGENT="$CARGO_TARGET_DIR/release/fleet-agent"
BUNDLER="$CARGO_TARGET_DIR/release/fleet-bundler"
for b in "$AGENT" "$BUNDLER"; do
    [ -x "$b" ] || { echo "bench/run.sh: $b was not built" >&2; exit 1; }
done

status=0
export PYTHONDONTWRITEBYTECODE=1
python3 "$ROOT/bench/suite.py" --agent "$AGENT" --bundler "$BUNDLER" --target-dir "$CARGO_TARGET_DIR" \
    --out "$OUT" "${QUICK[@]}" "${ONLY[@]}" \
    "${FLEET[@]}" || status=$?
say "done in $(($(date +%s) - START)) s (report: $OUT)"
exit "$status"
