#!/usr/bin/env bash
# Builds the device agent (`fleet-agent`) as a static release binary for ARM devices.
#
#   cross/build.sh                      # aarch64 (required) + armv7 (when its std fits)
#   cross/build.sh --all                # ... plus x86_64 (native, for the amd64 .deb)
#   cross/build.sh --targets aarch64    # just some: aarch64, armv7, x86_64 (or triples)
#   cross/build.sh --print-env aarch64  # the env a hand-run `cargo --target` needs
#
# Output: $CARGO_TARGET_DIR/<triple>/release/fleet-agent (CARGO_TARGET_DIR defaults to
# `target`, relative to the repository root), copied to dist/fleet-agent-<triple>, and a
# size table (also written to dist/sizes.tsv).
#
# Options:
#   --targets LIST   comma- or space-separated targets (default: aarch64,armv7)
#   --all            aarch64,armv7,x86_64
#   --setup-armhf    enable the armhf dpkg architecture and install the armv7 toolchain
#                    when Debian offers libstd-rust-web-dev:armhf at rustc-web's version
#   --unlocked       do not pass --locked to cargo (default: the workspace's Cargo.lock
#                    is used as is, never rewritten)
#   --print-env T    print the `export` lines for target T and exit
#   -h, --help       this help
#
# Toolchains: cross targets use Debian's Rust (`cargo +debian`, see scripts/setup.sh
# --cross); x86_64 uses the default toolchain. Override with FLEET_CROSS_CARGO /
# FLEET_NATIVE_CARGO. Set FLEET_CROSS_NO_APT=1 to never run apt-get from here.
#
# Exit status: 0 when every required target (aarch64, x86_64 if asked) built static;
# armv7 never fails the script: when it cannot be built, the reason is printed.
set -euo pipefail

CROSS_SCRIPT=build
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

TARGETS_ARG="aarch64,armv7"
SETUP_ARMHF=0
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

# Newest version of a package that apt offers (empty when none).
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2; exit }'
}

# True when apt offers exactly version $2 of package $1.
apt_offers() {
    apt-cache madison "$1" 2>/dev/null | awk -F'|' -v v="$2" '{ gsub(/ /, "", $2) } $2 == v { found = 1 } END { exit !found }'
}

# Why the armv7 toolchain is unusable (empty output: usable). May install packages when
# Debian offers the matching std (see --setup-armhf).
ARMHF_PKGS=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
UPDATE_LOG="$(mktemp)"
trap 'rm -f "$UPDATE_LOG"' EXIT
armv7_problem() {
    local rv sv cand
    rv="$(debian_rustc_version)"
    if [ -z "$rv" ]; then
        echo "Debian's rustc-web is not installed (run scripts/setup.sh --cross)"
        return 0
    fi
    if [ "$SETUP_ARMHF" = 1 ] && can_apt && ! dpkg --print-foreign-architectures | grep -qx armhf; then
        cross_log "enabling dpkg architecture armhf"
        dpkg --add-architecture armhf
        # Its exit code is not trusted either way: an armhf index mid-sync makes it fail
        # while every list we need may be fine (see ../shared/ENVIRONMENT.md).
        if ! apt-get -o DPkg::Lock::Timeout=300 update -q >"$UPDATE_LOG" 2>&1; then
            cross_warn "apt-get update reported errors (continuing): $(grep -m1 '^Err' "$UPDATE_LOG" || tail -n 1 "$UPDATE_LOG")"
        fi
    fi
    sv="$(deb_installed_version libstd-rust-web-dev:armhf)"
    if [ -z "$sv" ]; then
        if ! dpkg --print-foreign-architectures | grep -qx armhf; then
            echo "dpkg architecture armhf is not enabled, so libstd-rust-web-dev:armhf (rustc $rv) is not installed; run cross/build.sh --setup-armhf to try"
            return 0
        fi
        if apt_offers libstd-rust-web-dev:armhf "$rv"; then
            if can_apt; then
                cross_log "installing libstd-rust-web-dev:armhf=$rv ${ARMHF_PKGS[*]}"
                DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
                    "libstd-rust-web-dev:armhf=$rv" "${ARMHF_PKGS[@]}" >&2 ||
                    cross_warn "apt-get install of the armhf toolchain failed"
                sv="$(deb_installed_version libstd-rust-web-dev:armhf)"
            else
                echo "libstd-rust-web-dev:armhf $rv is installable but not installed (as root: apt-get install libstd-rust-web-dev:armhf=$rv ${ARMHF_PKGS[*]})"
                return 0
            fi
        else
            cand="$(apt_candidate libstd-rust-web-dev:armhf)"
            local err=""
            err="$(grep -m1 '^Err.*armhf' "$UPDATE_LOG" 2>/dev/null || true)"
            echo "armhf std ${cand:-(none offered)} does not match rustc $rv: apt offers no libstd-rust-web-dev:armhf $rv (Debian's armhf security index probably lags amd64's${err:+; apt-get update said: $err}; retry after apt-get update)"
            return 0
        fi
    fi
    if [ -z "$sv" ]; then
        echo "libstd-rust-web-dev:armhf $rv could not be installed"
    elif [ "$sv" != "$rv" ]; then
        echo "armhf std $sv does not match rustc $rv"
    elif ! command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1; then
        if can_apt; then
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${ARMHF_PKGS[@]}" >&2 || true
        fi
        command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 ||
            echo "arm-linux-gnueabihf-gcc not found (apt-get install ${ARMHF_PKGS[*]})"
    fi
}

# Why TRIPLE cannot be built here (empty output: it can). Sets CARGO_CMD / RUSTC_CMD.
preflight() {
    local triple="$1" prefix libdir rv sv debarch
    if ! select_cargo "$triple"; then
        echo "no Debian Rust toolchain (neither 'cargo +debian' nor /usr/bin/cargo): run scripts/setup.sh --cross"
        return 0
    fi
    select_rustc "$triple"
    if [ "$triple" = armv7-unknown-linux-gnueabihf ]; then
        armv7_problem
        return 0
    fi
    if is_native_triple "$triple"; then
        [ "$(uname -m)" = x86_64 ] || echo "x86_64 is only built natively, and this machine is $(uname -m)"
        return 0
    fi
    debarch="$(target_debarch "$triple")"
    rv="$(debian_rustc_version)"
    sv="$(deb_installed_version "libstd-rust-web-dev:$debarch")"
    if [ -n "$rv" ] && [ -n "$sv" ] && [ "$sv" != "$rv" ]; then
        echo "$debarch std $sv does not match rustc $rv"
        return 0
    fi
    libdir="$("${RUSTC_CMD[@]}" --print target-libdir --target "$triple" 2>/dev/null || true)"
    if [ -z "$libdir" ] || ! compgen -G "$libdir/libstd-*.rlib" >/dev/null; then
        echo "no Rust std for $triple in ${libdir:-the Debian toolchain} (install $(target_cross_pkgs "$triple"); scripts/setup.sh --cross does)"
        return 0
    fi
    prefix="$(target_gcc_prefix "$triple")"
    command -v "$prefix-gcc" >/dev/null 2>&1 ||
        echo "$prefix-gcc not found (install $(target_cross_pkgs "$triple"); scripts/setup.sh --cross does)"
}

is_required() { [ "$1" != armv7-unknown-linux-gnueabihf ]; }

mkdir -p "$DIST_DIR"
# dist/ holds build outputs only: keep it out of git even without a root .gitignore entry.
[ -e "$DIST_DIR/.gitignore" ] || printf '*\n' >"$DIST_DIR/.gitignore"

ROWS=()
FAILED=()
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
    select_cargo "$triple"
    toolchain="$("${CARGO_CMD[@]}" --version 2>/dev/null | awk '{ print $2 }')"
    cross_log "$triple: ${CARGO_CMD[*]} build --release ${LOCKED[*]} -p $AGENT_PKG (cargo $toolchain)"
    start=$(date +%s)
    if (
        eval "$(cross_env_lines "$triple")"
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
        cross_warn "$triple: $out is dynamically linked (was +crt-static dropped?)"
        if is_required "$triple"; then
            FAILED+=("$triple")
        fi
    fi
    bytes=$(stat -c %s "$out")
    ROWS+=("$(printf '%-31s %-6s %-8s %10s  %6s MiB  %4ss  %s' "$triple" "$debarch" "$linkage" "$bytes" "$(mib "$bytes")" "$secs" "$out")")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$triple" "$debarch" "$bytes" "$(mib "$bytes")" "$linkage" "$secs" "$toolchain" >>"$SIZES_TSV.tmp"
done
mv -f "$SIZES_TSV.tmp" "$SIZES_TSV"

echo
echo "fleet-agent $(agent_version): stripped release binaries (profile: opt-level z, fat LTO, panic abort)"
printf '%-31s %-6s %-8s %10s  %10s  %5s  %s\n' target arch linkage bytes size build file
for row in "${ROWS[@]}"; do
    echo "$row"
done
if [ "${#FAILED[@]}" -gt 0 ]; then
    cross_die "required target(s) failed: ${FAILED[*]}"
fi
