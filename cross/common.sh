# shellcheck shell=bash disable=SC2034 # variables here are used by the scripts that source this
# Shared by cross/build.sh, package.sh, qemu-smoke.sh, release.sh and bundler-image.sh
# (sourced, not run).
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

# Canonical triple for a short name or a triple; empty when unknown. The agent ships as
# a static musl binary (cross/README.md, "Why musl"); the glibc triples are accepted as
# other names of the same architecture.
target_triple() {
    case "$1" in
        aarch64 | arm64 | aarch64-unknown-linux-musl | aarch64-unknown-linux-gnu)
            echo aarch64-unknown-linux-musl
            ;;
        armv7 | armhf | armv7-unknown-linux-musleabihf | armv7-unknown-linux-gnueabihf)
            echo armv7-unknown-linux-musleabihf
            ;;
        x86_64 | amd64 | native | x86_64-unknown-linux-musl | x86_64-unknown-linux-gnu)
            echo x86_64-unknown-linux-musl
            ;;
        *) echo "" ;;
    esac
}

# Debian architecture of a triple.
target_debarch() {
    case "$1" in
        aarch64-unknown-linux-musl) echo arm64 ;;
        armv7-unknown-linux-musleabihf) echo armhf ;;
        x86_64-unknown-linux-musl) echo amd64 ;;
    esac
}

# Prefix of the GNU gcc/binutils that compile and link for a triple (with musl's specs).
target_gcc_prefix() {
    case "$1" in
        aarch64-unknown-linux-musl) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-musleabihf) echo arm-linux-gnueabihf ;;
        x86_64-unknown-linux-musl) echo x86_64-linux-gnu ;;
    esac
}

# Debian's multiarch name of musl for a triple: /usr/lib/<it>/libc.a, /usr/include/<it>.
target_musl_dir() {
    case "$1" in
        aarch64-unknown-linux-musl) echo aarch64-linux-musl ;;
        armv7-unknown-linux-musleabihf) echo arm-linux-musleabihf ;;
        x86_64-unknown-linux-musl) echo x86_64-linux-musl ;;
    esac
}

# Debian packages a triple needs besides rustc-web, cargo-web and rust-web-src.
target_cross_pkgs() {
    case "$1" in
        aarch64-unknown-linux-musl) echo "musl-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
        armv7-unknown-linux-musleabihf) echo "musl-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
        x86_64-unknown-linux-musl) echo "musl-dev gcc" ;;
    esac
}

# LLVM's libunwind, unpacked per architecture from this Debian package (see musl_toolchain).
LIBUNWIND_PKG=libunwind-14-dev
LIBUNWIND_PATH=usr/lib/llvm-14/lib/libunwind.a

# qemu-user binary that runs a triple's binaries (empty for the native one).
target_qemu() {
    case "$1" in
        aarch64-unknown-linux-musl) echo qemu-aarch64-static ;;
        armv7-unknown-linux-musleabihf) echo qemu-arm-static ;;
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

is_native_triple() { [ "$1" = x86_64-unknown-linux-musl ]; }

# TRIPLE -> TRIPLE with '-' replaced by '_' (cc-rs: CC_<triple>) or upper-cased (cargo).
triple_underscored() { printf '%s' "${1//-/_}"; }
triple_cargo_env() { triple_underscored "$1" | tr '[:lower:]' '[:upper:]'; }

# Where musl_toolchain writes its files (absolute: the cc wrapper names its specs file).
musl_toolchain_root() {
    local d="${FLEET_MUSL_TOOLCHAIN_DIR:-$CARGO_TARGET_DIR/musl-toolchain}"
    case "$d" in
        /*) echo "$d" ;;
        *) echo "$REPO_ROOT/$d" ;;
    esac
}

# Writes the C side of a static musl build of TRIPLE into $(musl_toolchain_root)/TRIPLE
# and prints that directory. Every piece is a Debian package; nothing is compiled here.
#   cc           the target's GNU gcc with musl.specs: musl's headers, crt objects and
#                libc.a instead of glibc's. cargo links with it and cc-rs compiles ring's
#                C with it.
#   musl.specs   Debian's musl-gcc.specs (musl-dev) plus what that file lacks: rustc links
#                with -static-pie, which needs rcrt1.o (musl's self-relocating start) and
#                no program interpreter.
#   libunwind.a  LLVM's libunwind for the target: std's backtrace printer calls
#                _Unwind_Backtrace. Unpacked from $LIBUNWIND_PKG:<arch> with `apt-get
#                download`, never installed (its arm64 and amd64 files have one path),
#                plus musl-fortify-shim.c (the one glibc symbol it needs).
# Fails with a message on stderr naming what to install.
musl_toolchain() {
    local triple="$1" prefix musl debarch dir tmp deb
    prefix="$(target_gcc_prefix "$triple")"
    musl="$(target_musl_dir "$triple")"
    debarch="$(target_debarch "$triple")"
    dir="$(musl_toolchain_root)/$triple"
    if [ ! -f "/usr/lib/$musl/libc.a" ] || [ ! -f "/usr/lib/$musl/rcrt1.o" ]; then
        echo "musl for $debarch is not installed (/usr/lib/$musl/libc.a): apt-get install $(target_cross_pkgs "$triple")" >&2
        return 1
    fi
    if ! command -v "$prefix-gcc" >/dev/null 2>&1; then
        echo "$prefix-gcc not found: apt-get install $(target_cross_pkgs "$triple")" >&2
        return 1
    fi
    mkdir -p "$dir"
    if [ ! -f "$dir/libunwind.a" ]; then
        tmp="$(mktemp -d)"
        # -o APT::Sandbox::User=root: the _apt user may not write to this directory.
        if ! (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "$LIBUNWIND_PKG:$debarch" >/dev/null 2>&1); then
            rm -rf "$tmp"
            echo "cannot download $LIBUNWIND_PKG:$debarch (is the dpkg architecture $debarch enabled, and apt's index fresh? try: apt-get update)" >&2
            return 1
        fi
        deb="$(find "$tmp" -name '*.deb' | head -n 1)"
        dpkg-deb -x "$deb" "$tmp/x"
        cp "$tmp/x/$LIBUNWIND_PATH" "$dir/libunwind.a.tmp"
        rm -rf "$tmp"
    fi
    cat >"$dir/musl.specs.tmp" <<EOF
%rename cpp_options old_cpp_options

*cpp_options:
-nostdinc -isystem /usr/include/$musl -isystem include%s %(old_cpp_options)

*cc1:
%(cc1_cpu) -nostdinc -isystem /usr/include/$musl -isystem include%s

*link_libgcc:
-L/usr/lib/$musl -L$dir -L .%s

*libgcc:
libgcc.a%s

*startfile:
%{static-pie:/usr/lib/$musl/rcrt1.o;!shared:/usr/lib/$musl/Scrt1.o} /usr/lib/$musl/crti.o crtbeginS.o%s

*endfile:
crtendS.o%s /usr/lib/$musl/crtn.o

*link:
%{static-pie:-static -pie --no-dynamic-linker -z text;static:-static} -nostdlib %{shared:-shared} %{rdynamic:-export-dynamic}

EOF
    mv -f "$dir/musl.specs.tmp" "$dir/musl.specs"
    printf '#!/bin/sh\n# Written by cross/common.sh (musl_toolchain): %s gcc against musl.\nexec %q "$@" -specs %q\n' \
        "$triple" "$prefix-gcc" "$dir/musl.specs" >"$dir/cc.tmp"
    chmod +x "$dir/cc.tmp"
    mv -f "$dir/cc.tmp" "$dir/cc"
    if [ -f "$dir/libunwind.a.tmp" ]; then
        # libunwind.a appears only complete: with musl-fortify-shim.c's object inside.
        if ! "$dir/cc" -c -Os -fPIC -o "$dir/fortify-shim.o" "$CROSS_DIR/musl-fortify-shim.c" ||
            ! "$prefix-ar" rs "$dir/libunwind.a.tmp" "$dir/fortify-shim.o" 2>/dev/null; then
            echo "cannot compile cross/musl-fortify-shim.c with $prefix-gcc against musl" >&2
            return 1
        fi
        mv -f "$dir/libunwind.a.tmp" "$dir/libunwind.a"
    fi
    echo "$dir"
}

# std is compiled from Debian's rust-web-src for every target (cargo -Z build-std):
# rustup cannot download a musl std on these machines and Debian ships none. A stable
# compiler accepts -Z flags under RUSTC_BOOTSTRAP=1; cargo reads them from
# CARGO_UNSTABLE_* variables. optimize_for_size selects std's smaller algorithms.
BUILD_STD_CRATES=std,panic_abort
BUILD_STD_FEATURES=optimize_for_size

# Prints `export` lines with everything a static musl build of TRIPLE needs: the linker
# and C compiler (musl_toolchain), the archiver, build-std, the qemu runner for
# `cargo run`/`cargo test --target`, and +crt-static. Used by build.sh and by
# `cross/build.sh --print-env TRIPLE` (eval it, then `cargo +debian build --target TRIPLE`).
# Fails (printing nothing on stdout) when musl_toolchain does.
#
# RUSTFLAGS (not target.<triple>.rustflags) carries the flags, appended to the caller's
# RUSTFLAGS: cargo ignores target rustflags whenever RUSTFLAGS is set, so appending is the
# only way to honour both. With an explicit --target, RUSTFLAGS reaches only the target's
# crates, not build scripts or proc-macros (which stay native and dynamic).
# -C link-self-contained=no: use musl.specs' crt objects, not rustc's own (which a
# build-std sysroot does not have).
cross_env_lines() {
    local triple="$1" prefix up low qemu flags dir
    dir="$(musl_toolchain "$triple")" || return 1
    prefix="$(target_gcc_prefix "$triple")"
    up="$(triple_cargo_env "$triple")"
    low="$(triple_underscored "$triple")"
    qemu="$(target_qemu "$triple")"
    flags="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static -C link-self-contained=no"
    printf 'export CARGO_TARGET_%s_LINKER=%q\n' "$up" "$dir/cc"
    printf 'export CC_%s=%q\n' "$low" "$dir/cc"
    printf 'export AR_%s=%q\n' "$low" "$prefix-ar"
    if [ -n "$qemu" ]; then
        printf 'export CARGO_TARGET_%s_RUNNER=%q\n' "$up" "$qemu"
    fi
    printf 'export RUSTC_BOOTSTRAP=1\n'
    printf 'export CARGO_UNSTABLE_BUILD_STD=%q\n' "$BUILD_STD_CRATES"
    printf 'export CARGO_UNSTABLE_BUILD_STD_FEATURES=%q\n' "$BUILD_STD_FEATURES"
    printf 'export RUSTFLAGS=%q\n' "$flags"
    printf 'unset CARGO_ENCODED_RUSTFLAGS\n'
}

# The cargo command, into the array CARGO_CMD: Debian's toolchain for every target, since
# build-std needs the std source of the very compiler it runs (rust-web-src matches
# rustc-web). `cargo +debian` when rustup has it linked, else /usr/bin/cargo with
# RUSTC=/usr/bin/rustc (without RUSTC, /usr/bin/cargo would pick rustup's `rustc` proxy
# from PATH). Override with FLEET_CROSS_CARGO (a command line, split on spaces).
CARGO_CMD=()
select_cargo() {
    if [ -n "${FLEET_CROSS_CARGO:-}" ]; then
        # shellcheck disable=SC2206 # intended word splitting of a command line
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
    if [ "${CARGO_CMD[0]}" = cargo ] && [ "${CARGO_CMD[1]:-}" = +debian ]; then
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
