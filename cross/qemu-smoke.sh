#!/usr/bin/env bash
# Smoke-tests the cross-built agent under qemu-user: the ARM binary really starts,
# parses its command line and its config on an emulated CPU.
#
#   cross/qemu-smoke.sh                  # $CARGO_TARGET_DIR/aarch64-unknown-linux-musl/release/fleet-agent
#   cross/qemu-smoke.sh --build          # cross/build.sh --targets aarch64 first
#   cross/qemu-smoke.sh --target armv7   # the armv7 binary, under qemu-arm-static
#   cross/qemu-smoke.sh --binary PATH    # any fleet-agent binary
#   cross/qemu-smoke.sh --print-path     # just print the binary's absolute path
#
# Checks, each under qemu-<arch>-static (no -L: the binary is static):
#   --version                      exit 0, prints "fleet-agent <workspace version>"
#   --help                         exit 0, documents `run` and `--config`
#   check-config (default config)  exit 64: the packaged agent.toml is incomplete on
#                                  purpose, and the unit relies on 64 to stop restarting
#   check-config (filled in)       exit 0: the same file with a device id and a key
#
# The last line of output is FLEET_AGENT_AARCH64=<absolute path> (eval-able): the
# end-to-end test in tests/ reads that variable and runs the agent as
# `qemu-aarch64-static $FLEET_AGENT_AARCH64 run --config ...`; it talks to the host's
# broker (TCP on 127.0.0.1) and engine socket (unix) through qemu-user's syscalls.
# FLEET_AGENT_AARCH64 (or FLEET_AGENT_ARMV7) set in the environment overrides the default
# binary path here too.
set -euo pipefail

CROSS_SCRIPT="qemu-smoke"
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

TARGET=aarch64
BINARY=""
BUILD=0
PRINT_PATH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --target)
            [ $# -ge 2 ] || cross_die "--target needs a value"
            TARGET="$2"
            shift 2
            ;;
        --binary)
            [ $# -ge 2 ] || cross_die "--binary needs a path"
            BINARY="$2"
            shift 2
            ;;
        --build)
            BUILD=1
            shift
            ;;
        --print-path)
            PRINT_PATH=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) cross_die "unknown argument: $1 (try --help)" ;;
    esac
done

cd "$REPO_ROOT"
TRIPLE="$(target_triple "$TARGET")"
if [ -z "$TRIPLE" ] || is_native_triple "$TRIPLE"; then
    cross_die "unknown ARM target: $TARGET (aarch64, armv7)"
fi
case "$TRIPLE" in
    aarch64-*) VAR=FLEET_AGENT_AARCH64 MACHINE=AArch64 ;;
    *) VAR=FLEET_AGENT_ARMV7 MACHINE=ARM ;;
esac
QEMU="$(target_qemu "$TRIPLE")"

if [ -z "$BINARY" ]; then
    BINARY="${!VAR:-$CARGO_TARGET_DIR/$TRIPLE/release/$AGENT_BIN}"
fi
if [ "$BUILD" = 1 ]; then
    bash "$CROSS_DIR/build.sh" --targets "$TRIPLE" >&2
fi
[ -f "$BINARY" ] || cross_die "no binary at $BINARY: run cross/build.sh (or pass --build)"
BINARY="$(cd "$(dirname "$BINARY")" && pwd)/$(basename "$BINARY")"
if [ "$PRINT_PATH" = 1 ]; then
    echo "$BINARY"
    exit 0
fi

command -v "$QEMU" >/dev/null 2>&1 || cross_die "$QEMU not found (apt-get install qemu-user-static)"
machine="$(readelf -h "$BINARY" | awk -F: '/Machine:/ { gsub(/^ +/, "", $2); print $2 }')"
[[ "$machine" == *"$MACHINE"* ]] || cross_die "$BINARY is a '$machine' binary, not $MACHINE"
[ "$(elf_linkage "$BINARY")" = static ] || cross_die "$BINARY is dynamically linked (build it with cross/build.sh)"

cross_log "binary: $BINARY ($machine, static, $(stat -c %s "$BINARY") bytes)"
cross_log "qemu:   $($QEMU --version | head -n 1)"

FAILS=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# run_check NAME EXPECTED_EXIT GREP_PATTERN ARGS...: runs the binary under qemu.
run_check() {
    local name="$1" want="$2" pattern="$3" rc=0 start ms
    shift 3
    start=$(date +%s%N)
    timeout 60 "$QEMU" "$BINARY" "$@" >"$WORK/out" 2>&1 || rc=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    if [ "$rc" = "$want" ] && grep -qE -- "$pattern" "$WORK/out"; then
        printf '  ok    %-28s exit %-3s %5s ms  %s\n' "$name" "$rc" "$ms" "$(head -n 1 "$WORK/out")"
    else
        printf '  FAIL  %-28s exit %s (want %s), output must match /%s/:\n' "$name" "$rc" "$want" "$pattern"
        sed 's/^/        | /' "$WORK/out" | head -n 20
        FAILS=$((FAILS + 1))
    fi
}

VERSION="$(agent_version)"
echo "qemu smoke test of $BINARY:"
run_check "--version" 0 "^fleet-agent ${VERSION//./\\.}" --version
run_check "--help" 0 "run.*--config" --help
run_check "check-config (default)" 64 "." check-config --config "$(default_agent_config)"
# The packaged default, filled in (RFC 8032's test key, a scratch state dir): accepted.
sed -e 's/^device = .*/device = "smoke-01"/' -e 's/^fleet = .*/fleet = "smoke"/' \
    -e "s|^state_dir = .*|state_dir = \"$WORK/state\"|" \
    -e 's/^public_keys = \[/public_keys = ["fleet-ed25519-public:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",/' \
    "$(default_agent_config)" >"$WORK/agent.toml"
run_check "check-config (filled in)" 0 "smoke-01" check-config --config "$WORK/agent.toml"

if [ "$FAILS" -gt 0 ]; then
    cross_die "$FAILS check(s) failed under $QEMU"
fi
echo "$VAR=$BINARY"
