# shellcheck shell=bash disable=SC2034 # variables here are used by the scripts that source this
# Shared by cross/build.sh, cross/package.sh and cross/qemu-smoke.sh (sourced, not run).
#
# One table of the targets the agent ships for, the environment each needs for a
# static cross build, and small helpers. Everything here is a function or a constant:
# sourcing it changes nothing.

# The repository root (the workspace), whatever the caller's working directory.
CROSS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CROSS_DIR/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
DIST_DIR="${DIST_DIR:-dist}"

# The package (and binary) that ships to devices.
AGENT_PKG=fleet-agent
AGENT_BIN=fleet-agent

# Canonical triple for a short name or a triple; empty when unknown.
target_triple() {
    case "$1" in
        aarch64 | arm64 | aarch64-unknown-linux-gnu) echo aarch64-unknown-linux-gnu ;;
        armv7 | armhf | armv7-unknown-linux-gnueabihf) echo armv7-unknown-linux-gnueabihf ;;
        x86_64 | amd64 | native | x86_64-unknown-linux-gnu) echo x86_64-unknown-linux-gnu ;;
        *) echo "" ;;
    esac
}

# Debian architecture of a triple.
target_debarch() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo arm64 ;;
        armv7-unknown-linux-gnueabihf) echo armhf ;;
        x86_64-unknown-linux-gnu) echo amd64 ;;
    esac
}

# GNU toolchain prefix of a cross triple (empty for the native one).
target_gcc_prefix() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        *) echo "" ;;
    esac
}

# Debian packages a cross triple needs besides rustc-web/cargo-web.
target_cross_pkgs() {
    case "$1" in
        aarch64-unknown-linux-gnu)
            echo "libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
            ;;
        armv7-unknown-linux-gnueabihf)
            echo "libstd-rust-web-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross"
            ;;
    esac
}

# qemu-user binary that runs a triple's binaries (empty for the native one).
target_qemu() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo qemu-aarch64-static ;;
        armv7-unknown-linux-gnueabihf) echo qemu-arm-static ;;
        *) echo "" ;;
    esac
}

# `uname -m` values of machines that run a Debian architecture's binaries.
debarch_unames() {
    case "$1" in
        arm64) echo "aarch64 arm64" ;;
        armhf) echo "armv7l armv8l aarch64" ;;
        amd64) echo "x86_64" ;;
    esac
}

is_native_triple() { [ "$1" = x86_64-unknown-linux-gnu ]; }

# TRIPLE -> TRIPLE with '-' replaced by '_' (cc-rs: CC_<triple>) or upper-cased (cargo).
triple_underscored() { printf '%s' "${1//-/_}"; }
triple_cargo_env() { triple_underscored "$1" | tr '[:lower:]' '[:upper:]'; }

# Prints `export` lines with everything a static build of TRIPLE needs: the linker,
# the C compiler and archiver for crates with C/asm code (ring, zstd-sys), the qemu
# runner for `cargo run`/`cargo test --target`, and +crt-static. Used by build.sh and by
# `cross/build.sh --print-env TRIPLE` (eval it to run cargo by hand).
#
# RUSTFLAGS (not target.<triple>.rustflags) carries +crt-static, appended to the caller's
# RUSTFLAGS: cargo ignores target rustflags whenever RUSTFLAGS is set, so appending is the
# only way to honour both. With an explicit --target, RUSTFLAGS reaches only the target's
# crates, not build scripts or proc-macros (which must stay dynamic).
cross_env_lines() {
    local triple="$1" prefix up low qemu flags
    prefix="$(target_gcc_prefix "$triple")"
    up="$(triple_cargo_env "$triple")"
    low="$(triple_underscored "$triple")"
    qemu="$(target_qemu "$triple")"
    flags="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static"
    if [ -n "$prefix" ]; then
        printf 'export CARGO_TARGET_%s_LINKER=%q\n' "$up" "$prefix-gcc"
        printf 'export CC_%s=%q\n' "$low" "$prefix-gcc"
        printf 'export AR_%s=%q\n' "$low" "$prefix-ar"
        printf 'export CARGO_TARGET_%s_RUNNER=%q\n' "$up" "$qemu"
    fi
    printf 'export RUSTFLAGS=%q\n' "$flags"
    printf 'unset CARGO_ENCODED_RUSTFLAGS\n'
}

# The cargo command for a triple, into the array CARGO_CMD. Cross targets use Debian's
# toolchain (rustup cannot download targets on these machines): `cargo +debian` when
# rustup has it linked, else /usr/bin/cargo with RUSTC=/usr/bin/rustc (without RUSTC,
# /usr/bin/cargo would pick rustup's `rustc` proxy from PATH, i.e. stable, which has no
# ARM std). The native target uses the default toolchain. Override with FLEET_CROSS_CARGO
# / FLEET_NATIVE_CARGO (a command line, split on spaces).
CARGO_CMD=()
select_cargo() {
    local triple="$1"
    if is_native_triple "$triple"; then
        # shellcheck disable=SC2206 # intended word splitting of a command line
        CARGO_CMD=(${FLEET_NATIVE_CARGO:-cargo})
        return 0
    fi
    if [ -n "${FLEET_CROSS_CARGO:-}" ]; then
        # shellcheck disable=SC2206
        CARGO_CMD=(${FLEET_CROSS_CARGO})
    elif command -v rustup >/dev/null 2>&1 && rustup toolchain list 2>/dev/null | grep -q '^debian'; then
        CARGO_CMD=(cargo +debian)
    elif [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ]; then
        CARGO_CMD=(env RUSTC=/usr/bin/rustc /usr/bin/cargo)
    else
        return 1
    fi
}

# The rustc matching CARGO_CMD (for --print queries).
RUSTC_CMD=()
select_rustc() {
    local triple="$1"
    if is_native_triple "$triple"; then
        RUSTC_CMD=(rustc)
    elif [ "${CARGO_CMD[0]}" = cargo ] && [ "${CARGO_CMD[1]:-}" = +debian ]; then
        RUSTC_CMD=(rustc +debian)
    else
        RUSTC_CMD=(/usr/bin/rustc)
    fi
}

# Installed version of a Debian package (empty when not installed).
deb_installed_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "ii" { print $2; exit }'
}

# The workspace version of the agent, without resolving or building anything
# (`cargo metadata --no-deps --offline` neither fetches nor touches Cargo.lock).
agent_version() {
    local v
    v="$(cd "$REPO_ROOT" && cargo metadata --no-deps --offline --format-version 1 2>/dev/null |
        grep -o "\"name\":\"$AGENT_PKG\",\"version\":\"[^\"]*\"" | head -n 1 | sed 's/.*"version":"//; s/"$//')" || v=""
    if [ -z "$v" ]; then
        # Fallback: the workspace's [workspace.package] version (agent/Cargo.toml inherits it).
        v="$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' "$REPO_ROOT/Cargo.toml" | head -n 1)"
    fi
    echo "${v:-0.0.0}"
}

# The file packaged as /etc/fleet-agent/agent.toml: cross/agent.toml, which is incomplete
# on purpose. agent/agent.toml.example is NOT packaged as is: it is a complete, valid
# example (device gw-01, a placeholder key, an extra allowed root outside the unit's
# ReadWritePaths), so a device that was never configured would start with it.
default_agent_config() { echo "${FLEET_AGENT_DEFAULT_CONFIG:-$CROSS_DIR/agent.toml}"; }

# Config keys (`key =` lines, commented out or not, with their [table]) of a TOML file,
# one per line as table.key: enough to compare the packaged default with the example.
toml_keys() {
    sed -n 's/^[# ]*\(\[\{1,2\}[a-z_.]*\]\{1,2\}\).*/\1/p; s/^[# ]*\([a-z_][a-z_0-9]*\) *=.*/\1/p' "$1" |
        awk '/^\[/ { gsub(/[][]/, ""); t = $0 "."; next } { print t $0 }' | sort -u
}

# Bytes -> "x.yz" MiB.
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

# "static" or "dynamic" for an ELF file (readelf from binutils understands every arch).
elf_linkage() {
    if readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; then
        echo dynamic
    else
        echo static
    fi
}

# True when the ELF has a symbol table (i.e. is not stripped).
elf_has_symtab() { readelf -SW "$1" 2>/dev/null | grep -q ' \.symtab '; }

# Messages go to stderr, in bold/colour only when it is a terminal.
if [ -t 2 ]; then
    _B=$'\033[1m' _Y=$'\033[1;33m' _R=$'\033[1;31m' _N=$'\033[0m'
else
    _B="" _Y="" _R="" _N=""
fi
cross_log() { printf '%s[%s]%s %s\n' "$_B" "${CROSS_SCRIPT:-cross}" "$_N" "$*" >&2; }
cross_warn() { printf '%s[%s] WARNING:%s %s\n' "$_Y" "${CROSS_SCRIPT:-cross}" "$_N" "$*" >&2; }
cross_die() {
    printf '%s[%s] ERROR:%s %s\n' "$_R" "${CROSS_SCRIPT:-cross}" "$_N" "$*" >&2
    exit 1
}
