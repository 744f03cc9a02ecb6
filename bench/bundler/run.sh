#!/usr/bin/env bash
# Bundler benchmark: a synthetic fleet of 10,000 devices x 20 apps.
#
#   bench/bundler/run.sh            # full size (10,000 devices x 20 apps)
#   bench/bundler/run.sh --quick    # 200 devices, for CI
#   DEVICES=2000 APPS=10 bench/bundler/run.sh
#
# Builds fleet-bundler in release mode, generates the fleet repository and commits it,
# then times with /usr/bin/time -v (wall time, peak RSS):
#   1. validate
#   2. a full build into an empty output directory
#   3. a rebuild after one device changed (must write exactly one new bundle)
#   4. a rebuild of the same commit (must write nothing)
# and prints a Markdown table. Exits non-zero when a check fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEVICES="${DEVICES:-10000}"
APPS="${APPS:-20}"
for arg in "$@"; do
    case "$arg" in
        --quick) DEVICES=200 ;;
        -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
[ -x /usr/bin/time ] || { echo "run.sh: /usr/bin/time is missing (apt-get install -y time)" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
echo "building fleet-bundler (release) into $CARGO_TARGET_DIR ..." >&2
# The workspace's release profile optimizes dependencies for size (opt-level "z", for
# the agent). Signing (curve25519-dalek's SIMD backend), zstd and sha2 are 5-10x slower
# that way, so the bundler wants them at opt-level 3; these flags are no-ops once the
# root Cargo.toml has the same [profile.release.package.*] overrides.
cargo build --release -q -p fleet-bundler --manifest-path "$ROOT/Cargo.toml" \
    --config 'profile.release.package.curve25519-dalek.opt-level=3' \
    --config 'profile.release.package.zstd-sys.opt-level=3' \
    --config 'profile.release.package.sha2.opt-level=3'
BIN="$CARGO_TARGET_DIR/release/fleet-bundler"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "generating $DEVICES devices x $APPS apps in $WORK ..." >&2
python3 "$ROOT/bench/bundler/gen_fleet.py" --devices "$DEVICES" --apps "$APPS" --out "$WORK/fleet"
git_commit() {
    git -C "$WORK/fleet" -c user.name=bench -c user.email=bench@fleet.invalid add -A
    GIT_COMMITTER_DATE="@$1 +0000" GIT_AUTHOR_DATE="@$1 +0000" \
        git -C "$WORK/fleet" -c user.name=bench -c user.email=bench@fleet.invalid commit -q -m "$2"
}
git -C "$WORK/fleet" init -q -b main
git_commit 1800000000 "synthetic fleet"
# The commits carry fixed dates (the same bytes every run); the build's clock is set just
# after them, or the bundler refuses a commit dated in the future.
export FLEET_BUILD_NOW=1800000700
"$BIN" keygen --out "$WORK/keys" >/dev/null 2>&1

# measure NAME CMD...: runs CMD under /usr/bin/time -v, records "NAME|seconds|peak MB".
ROWS=()
measure() {
    local name="$1"; shift
    /usr/bin/time -v -o "$WORK/time.txt" "$@" >"$WORK/stdout.txt" 2>"$WORK/stderr.txt" || {
        echo "run.sh: '$name' failed:" >&2; tail -n 20 "$WORK/stderr.txt" >&2; exit 1; }
    local wall rss
    wall="$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/time.txt")"
    rss="$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$WORK/time.txt")"
    # m:ss.ss or h:mm:ss -> seconds
    wall="$(echo "$wall" | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')"
    ROWS+=("$name|$wall|$rss")
}
written() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["written"])' "$WORK/stdout.txt"; }

measure "validate" "$BIN" validate --repo "$WORK/fleet"
measure "full build" "$BIN" build --repo "$WORK/fleet" --key "$WORK/keys/signing.key" --out "$WORK/out" --json
FULL_WRITTEN="$(written)"
[ "$FULL_WRITTEN" = "$DEVICES" ] || { echo "run.sh: full build wrote $FULL_WRITTEN bundles, expected $DEVICES" >&2; exit 1; }

sed -i 's/^  location: .*/  location: "moved for the benchmark"/' "$WORK/fleet/devices/dev-00007.yaml"
git_commit 1800000600 "move dev-00007"
measure "rebuild, 1 device changed" "$BIN" build --repo "$WORK/fleet" --key "$WORK/keys/signing.key" --out "$WORK/out" --json
ONE_WRITTEN="$(written)"
[ "$ONE_WRITTEN" = 1 ] || { echo "run.sh: one-device rebuild wrote $ONE_WRITTEN bundles, expected 1" >&2; exit 1; }

measure "rebuild, nothing changed" "$BIN" build --repo "$WORK/fleet" --key "$WORK/keys/signing.key" --out "$WORK/out" --json
SAME_WRITTEN="$(written)"
[ "$SAME_WRITTEN" = 0 ] || { echo "run.sh: unchanged rebuild wrote $SAME_WRITTEN bundles, expected 0" >&2; exit 1; }

BUNDLES_MB="$(du -sm "$WORK/out/bundles" | cut -f1)"
AVG="$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["devices"]; print(round(sum(e["size"] for e in d.values())/len(d)))' "$WORK/out/index.json")"

echo
echo "Bundler benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "Fleet: $DEVICES devices x $APPS apps (each app: 1 templated + 1 static file, 2 services); average bundle $AVG bytes, $BUNDLES_MB MB of bundles."
echo
echo "| step | wall time (s) | peak RSS (MB) | bundles written |"
echo "|---|---:|---:|---:|"
WRITTEN=("-" "$FULL_WRITTEN" "$ONE_WRITTEN" "$SAME_WRITTEN")
i=0
for row in "${ROWS[@]}"; do
    IFS='|' read -r name wall rss <<<"$row"
    echo "| $name | $wall | $rss | ${WRITTEN[$i]} |"
    i=$((i + 1))
done
