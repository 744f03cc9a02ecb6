#!/usr/bin/env bash
# Builds the device agent (`fleet-agent`) as a static release binary for ARM devices.
#
#   cross/build.sh                      # aarch64 (required) + armv7 (when armhf is set up)
#   cross/build.sh --all                # ... plus x86_64 (for the amd64 .deb)
#   cross/build.sh --targets aarch64    # just some: aarch64, armv7, x86_64 (or triples)
#   cross/build.sh --print-env aarch64  # the env a hand-run `cargo --target` needs
#
# Every target is a static musl binary (aarch64-unknown-linux-musl,
# armv7-unknown-linux-musleabihf, x86_64-unknown-linux-musl): no glibc, no NSS, no
# loader on the device; why, and what it saves, in cross/README.md ("Why musl").
#
# Output: $CARGO_TARGET_DIR/<triple>/release/fleet-agent (CARGO_TARGET_DIR defaults to
# `target`, relative to the repository root), copied to dist/fleet-agent-<triple>, and a
# size table (also written to dist/sizes.tsv).
#
# dist/release.json names the agent's version and the binaries this run built, by
# architecture as the agent names its own (std::env::consts::ARCH: aarch64, arm, x86_64):
#   {"version": "0.10.0", "binaries": {"aarch64": "fleet-agent-aarch64-unknown-linux-musl"}}
# `fleet-bundler build --agent-release dist` delivers them to the devices whose fleet.yaml
# `agent:` names that version (bundler/README.md, "Agent releases"). It is not written when
# a required target failed, and lists only this run's binaries (a --targets run too).
#
# Options:
#   --targets LIST   comma- or space-separated targets (default: aarch64,armv7)
#   --all            aarch64,armv7,x86_64
#   --setup-armhf    enable the armhf dpkg architecture and install the armv7 C toolchain
#                    and musl (musl-dev:armhf gcc-arm-linux-gnueabihf)
#   --enforce-budget fail when a binary is over its size budget (aarch64 and armv7
#                    2.5 MiB, x86_64 3 MiB: issue #4's footprint targets); without it,
#                    the table only marks the binary "OVER"
#   --unlocked       do not pass --locked to cargo (default: the workspace's Cargo.lock
#                    is used as is, never rewritten)
#   --print-env T    print the `export` lines for target T and exit
#   -h, --help       this help
#
# Toolchain: Debian's Rust for every target (`cargo +debian`, see scripts/setup.sh
# --cross), which compiles std itself from rust-web-src (-Z build-std). Override with
# FLEET_CROSS_CARGO. Set FLEET_CROSS_NO_APT=1 to never install packages from here
# (LLVM's libunwind is still fetched with `apt-get download`, see common.sh).
#
# Exit status: 0 when every required target (aarch64, x86_64 if asked) built static (and,
# with --enforce-budget, within budget); armv7 never fails the script when it cannot be
# built (the reason is printed), but a built armv7 binary is held to its budget.
set -euo pipefail

CROSS_SCRIPT=build
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

TARGETS_ARG="aarch64,armv7"
SETUP_ARMHF=0
ENFORCE_BUDGET=0
LOCKED=(--locked)
while [ $# -gt 0 ]; do
    case "$1" in
        --targets)
            [ $# -ge 2 ] || cross_die "--targets needs a value (try --help)"
            TARGETS_ARG="$2"
            shift 2
            ;;
        --targets=*)
            TARGETS_ARG="${1#*=}"
            shift
            ;;
        --all)
            TARGETS_ARG="aarch64,armv7,x86_64"
            shift
            ;;
        --setup-armhf)
            SETUP_ARMHF=1
            shift
            ;;
        --enforce-budget)
            ENFORCE_BUDGET=1
            shift
            ;;
        --unlocked)
            LOCKED=()
            shift
            ;;
        --print-env)
            [ $# -ge 2 ] || cross_die "--print-env needs a target (try --help)"
            t="$(target_triple "$2")"
            [ -n "$t" ] || cross_die "unknown target: $2 (aarch64, armv7, x86_64)"
            cross_env_lines "$t"
            exit 0
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) cross_die "unknown argument: $1 (try --help)" ;;
    esac
done

TRIPLES=()
for t in ${TARGETS_ARG//,/ }; do
    triple="$(target_triple "$t")"
    [ -n "$triple" ] || cross_die "unknown target: $t (aarch64, armv7, x86_64)"
    TRIPLES+=("$triple")
done
[ "${#TRIPLES[@]}" -gt 0 ] || cross_die "no target given"

cd "$REPO_ROOT"

is_root() { [ "$(id -u)" -eq 0 ]; }
can_apt() { is_root && [ "${FLEET_CROSS_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; }

# Debian's rustc version (package rustc-web, else rustc), empty when neither is installed.
debian_rustc_version() {
    local v
    v="$(deb_installed_version rustc-web)"
    [ -n "$v" ] || v="$(deb_installed_version rustc)"
    echo "$v"
}

# Debian's std source (rust-web-src, else rust-src), empty when neither is installed.
debian_rust_src_version() {
    local v
    v="$(deb_installed_version rust-web-src)"
    [ -n "$v" ] || v="$(deb_installed_version rust-src)"
    echo "$v"
}

# --setup-armhf: the armhf dpkg architecture and armv7's C side, installed with apt.
ARMHF_PKGS=(musl-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
setup_armhf() {
    local log policy
    can_apt || {
        cross_warn "--setup-armhf needs root and apt-get (and FLEET_CROSS_NO_APT unset)"
        return 0
    }
    if ! dpkg --print-foreign-architectures | grep -qx armhf; then
        cross_log "enabling dpkg architecture armhf"
        dpkg --add-architecture armhf
    fi
    # (apt-cache's output is read whole: `| grep -q` would end the pipe early, and under
    # pipefail apt-cache's SIGPIPE would make the test fail.)
    policy="$(apt-cache policy "$LIBUNWIND_PKG:armhf" 2>/dev/null || true)"
    if [ -f /usr/lib/arm-linux-musleabihf/libc.a ] && command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 &&
        [[ "$policy" == *"Candidate: "[0-9]* ]]; then
        return 0
    fi
    log="$(mktemp)"
    # Its exit code is not trusted either way: an armhf index mid-sync makes it fail
    # while every list we need may be fine (see ../shared/ENVIRONMENT.md).
    if ! apt-get -o DPkg::Lock::Timeout=300 update -q >"$log" 2>&1; then
        cross_warn "apt-get update reported errors (continuing): $(grep -m1 '^Err' "$log" || tail -n 1 "$log")"
    fi
    rm -f "$log"
    cross_log "installing ${ARMHF_PKGS[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
        "${ARMHF_PKGS[@]}" >&2 || cross_warn "apt-get install of the armhf toolchain failed"
}

# Why TRIPLE cannot be built here (empty output: it can). Sets CARGO_CMD / RUSTC_CMD.
preflight() {
    local triple="$1" rv sv src
    if ! select_cargo; then
        echo "no Debian Rust toolchain (neither 'cargo +debian' nor /usr/bin/cargo): run scripts/setup.sh --cross"
        return 0
    fi
    select_rustc
    if [ "$triple" = armv7-unknown-linux-musleabihf ] && ! dpkg --print-foreign-architectures | grep -qx armhf; then
        echo "dpkg architecture armhf is not enabled (run cross/build.sh --setup-armhf as root)"
        return 0
    fi
    src="$("${RUSTC_CMD[@]}" --print sysroot 2>/dev/null || true)/lib/rustlib/src/rust/library"
    if [ ! -f "$src/std/Cargo.toml" ]; then
        echo "no std source for build-std in $src (apt-get install rust-web-src; scripts/setup.sh --cross does)"
        return 0
    fi
    rv="$(debian_rustc_version)"
    sv="$(debian_rust_src_version)"
    if [ -n "$rv" ] && [ -n "$sv" ] && [ "$sv" != "$rv" ]; then
        echo "std source $sv does not match rustc $rv (apt-get install rust-web-src=$rv)"
        return 0
    fi
    # musl, gcc and libunwind: musl_toolchain says what is missing.
    { musl_toolchain "$triple" >/dev/null; } 2>&1 || true
}

if [ "$SETUP_ARMHF" = 1 ]; then
    setup_armhf
fi

# Size budget of a target's stripped binary, in bytes.
size_budget() {
    case "$1" in
        x86_64-unknown-linux-musl) echo $((3 * 1048576)) ;;
        *) echo $((5 * 1048576 / 2)) ;;
    esac
}

is_required() { [ "$1" != armv7-unknown-linux-musleabihf ]; }

mkdir -p "$DIST_DIR"
# dist/ holds build outputs only: keep it out of git even without a root .gitignore entry.
[ -e "$DIST_DIR/.gitignore" ] || printf '*\n' >"$DIST_DIR/.gitignore"
# An earlier run's release must not be delivered as this run's (its binaries are replaced below).
RELEASE_JSON="$DIST_DIR/release.json"
rm -f "$RELEASE_JSON"

# The architecture of a triple as the agent names its own (std::env::consts::ARCH), the
# key of dist/release.json: what a device picks its binary by.
triple_rust_arch() {
    case "$1" in
        aarch64-*) echo aarch64 ;;
        armv7-* | arm-*) echo arm ;;
        x86_64-*) echo x86_64 ;;
        *) echo "" ;;
    esac
}

ROWS=()
FAILED=()
# "<arch> <file name in dist/>" of each binary this run built.
RELEASED=()
SIZES_TSV="$DIST_DIR/sizes.tsv"
printf 'target\tarch\tbytes\tmib\tlinkage\tbuild_secs\ttoolchain\n' >"$SIZES_TSV.tmp"

for triple in "${TRIPLES[@]}"; do
    debarch="$(target_debarch "$triple")"
    # A binary from an earlier run must not be packaged as this run's.
    rm -f "$DIST_DIR/$AGENT_BIN-$triple"
    problem="$(preflight "$triple")"
    if [ -n "$problem" ]; then
        if is_required "$triple"; then
            cross_warn "$triple: cannot build: $problem"
            FAILED+=("$triple")
            ROWS+=("$(printf '%-31s %-6s FAILED: %s' "$triple" "$debarch" "$problem")")
        else
            cross_warn "$triple: skipped: $problem"
            ROWS+=("$(printf '%-31s %-6s skipped: %s' "$triple" "$debarch" "$problem")")
        fi
        continue
    fi
    # preflight ran in a subshell: select the toolchain again here.
    select_cargo
    toolchain="$("${CARGO_CMD[@]}" --version 2>/dev/null | awk '{ print $2 }')"
    cross_log "$triple: ${CARGO_CMD[*]} build --release ${LOCKED[*]} -p $AGENT_PKG (cargo $toolchain)"
    start=$(date +%s)
    if (
        env_lines="$(cross_env_lines "$triple")" || exit 1
        eval "$env_lines"
        # No unwind tables (.eh_frame): the release profile aborts on panic, so nothing
        # unwinds, and the stripped binary prints no backtrace. 0.38 MiB less on aarch64,
        # and idle RSS follows the binary's size (BENCHMARKS.md). Only here: test builds
        # (--print-env) unwind.
        export RUSTFLAGS="$RUSTFLAGS -C force-unwind-tables=no"
        exec "${CARGO_CMD[@]}" build --release "${LOCKED[@]}" --target "$triple" \
            -p "$AGENT_PKG" --bin "$AGENT_BIN"
    ); then
        ok=1
    else
        ok=0
    fi
    secs=$(($(date +%s) - start))
    bin="$CARGO_TARGET_DIR/$triple/release/$AGENT_BIN"
    if [ "$ok" = 1 ] && [ ! -f "$bin" ]; then
        cross_warn "$triple: cargo succeeded but $bin does not exist"
        ok=0
    fi
    if [ "$ok" = 0 ]; then
        if is_required "$triple"; then
            FAILED+=("$triple")
            ROWS+=("$(printf '%-31s %-6s FAILED: cargo build failed (see above)' "$triple" "$debarch")")
        else
            cross_warn "$triple: build failed (armv7 is optional: continuing)"
            ROWS+=("$(printf '%-31s %-6s skipped: cargo build failed (see above)' "$triple" "$debarch")")
        fi
        continue
    fi
    out="$DIST_DIR/$AGENT_BIN-$triple"
    cp -f "$bin" "$out.tmp"
    if elf_has_symtab "$out.tmp"; then
        # The release profile strips; strip here too should someone turn that off.
        prefix="$(target_gcc_prefix "$triple")"
        "${prefix:+$prefix-}strip" "$out.tmp"
    fi
    mv -f "$out.tmp" "$out"
    linkage="$(elf_linkage "$out")"
    if [ "$linkage" != static ]; then
        cross_warn "$triple: $out has a program interpreter (was +crt-static dropped?)"
        if is_required "$triple"; then
            FAILED+=("$triple")
        fi
    fi
    bytes=$(stat -c %s "$out")
    budget="$(size_budget "$triple")"
    if [ "$bytes" -le "$budget" ]; then
        verdict="≤ $(mib "$budget")"
    else
        verdict="OVER $(mib "$budget")"
        cross_warn "$triple: $bytes bytes is over the size budget of $budget ($(mib "$budget") MiB)"
        if [ "$ENFORCE_BUDGET" = 1 ]; then
            FAILED+=("$triple")
        fi
    fi
    ROWS+=("$(printf '%-31s %-6s %-8s %10s  %6s MiB  %-9s  %4ss  %s' "$triple" "$debarch" "$linkage" "$bytes" "$(mib "$bytes")" "$verdict" "$secs" "$out")")
    if [ "$linkage" = static ]; then
        RELEASED+=("$(triple_rust_arch "$triple") $AGENT_BIN-$triple")
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$triple" "$debarch" "$bytes" "$(mib "$bytes")" "$linkage" "$secs" "$toolchain" >>"$SIZES_TSV.tmp"
done
mv -f "$SIZES_TSV.tmp" "$SIZES_TSV"

# dist/release.json for `fleet-bundler build --agent-release dist`: only when every
# required target built (a partial release would leave those devices' agents as they are
# while CI believes they update), and only with this run's binaries.
write_release_json() {
    local version entries="" entry arch file
    version="$(agent_version)"
    for entry in "${RELEASED[@]}"; do
        arch="${entry%% *}"
        file="${entry#* }"
        [ -n "$arch" ] || continue
        entries="${entries:+$entries,}
    \"$arch\": \"$file\""
    done
    [ -n "$entries" ] || return 0
    printf '{\n  "version": "%s",\n  "binaries": {%s\n  }\n}\n' "$version" "$entries" >"$RELEASE_JSON.tmp"
    mv -f "$RELEASE_JSON.tmp" "$RELEASE_JSON"
    cross_log "wrote $RELEASE_JSON: fleet-agent $version for ${#RELEASED[@]} architecture(s) (fleet-bundler build --agent-release $DIST_DIR)"
}
if [ "${#FAILED[@]}" -eq 0 ]; then
    write_release_json
fi

echo
echo "fleet-agent $(agent_version): stripped static musl release binaries (opt-level z, fat LTO, panic abort, std built for size)"
printf '%-31s %-6s %-8s %10s  %10s  %-9s  %5s  %s\n' target arch linkage bytes size budget build file
for row in "${ROWS[@]}"; do
    echo "$row"
done
if [ "${#FAILED[@]}" -gt 0 ]; then
    cross_die "target(s) failed: ${FAILED[*]}"
fi
