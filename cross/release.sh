#!/usr/bin/env bash
# Builds the release binaries of the CI-side tool (`fleet-bundler`): static musl binaries
# for x86_64 and aarch64 CI runners, with their SHA-256 sums, in dist/.
#
#   cross/release.sh                     # x86_64 and aarch64
#   cross/release.sh --targets x86_64    # just some: x86_64, aarch64 (or triples)
#   cross/release.sh --no-build          # check and checksum the binaries already in dist/
#
# Output (dist/, beside the agent's files from cross/build.sh and cross/package.sh):
#   fleet-bundler-x86_64-unknown-linux-musl    static PIE, stripped
#   fleet-bundler-aarch64-unknown-linux-musl   static, stripped
#   install-fleet-bundler.sh                   scripts/install-fleet-bundler.sh, for CI
#                                              systems that cannot check out this repo
#   fleet-bundler-SHA256SUMS                   `sha256sum` lines for the files above
#   fleet-bundler-sizes.tsv                    target, bytes, build seconds
# Upload them as the assets of the release tagged v<version>: that is the layout
# scripts/install-fleet-bundler.sh, the GitHub action and the GitLab template download.
#
# The same route as the agent (cross/build.sh, cross/README.md "How it works"): Debian's
# Rust (`cargo +debian`) compiles std from source for the musl target (-Z build-std), and
# the C code inside the bundler's dependencies (ring for rustls, zstd-sys for zstd) is
# compiled by cc-rs with the musl `cc` wrapper that cross/common.sh (musl_toolchain)
# writes: no other C toolchain, nothing downloaded but LLVM's libunwind .deb.
#
# Profile: the workspace's release profile (the bundler at opt-level 3, Cargo.toml) with
# thin LTO and 16 codegen units instead of fat LTO and one: fat LTO of the bundler runs
# on one core for about 6 of the 10 minutes a target takes from clean on a 2-core CI
# machine (docs/ci.md, "Building a release"). --full-lto builds with the workspace's
# profile as it is (for a tagged release, when build time does not matter).
#
# Each binary is checked: no program interpreter (static), the right ELF machine, and
# `--version` prints "fleet-bundler <workspace version>" (aarch64 under
# qemu-aarch64-static). Exit status 0 only when every target built and passed.
# Options: --targets LIST, --no-build, --full-lto, --unlocked (do not pass --locked),
# -h/--help.
set -euo pipefail

CROSS_SCRIPT=release
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

BUNDLER_PKG=fleet-bundler
BUNDLER_BIN=fleet-bundler
TARGETS_ARG="x86_64,aarch64"
BUILD=1
FULL_LTO=0
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
        --no-build)
            BUILD=0
            shift
            ;;
        --full-lto)
            FULL_LTO=1
            shift
            ;;
        --unlocked)
            LOCKED=()
            shift
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
    case "$triple" in
        x86_64-unknown-linux-musl | aarch64-unknown-linux-musl) TRIPLES+=("$triple") ;;
        *) cross_die "unknown target: $t (x86_64, aarch64: CI runners)" ;;
    esac
done
[ "${#TRIPLES[@]}" -gt 0 ] || cross_die "no target given"

cd "$REPO_ROOT"

# The bundler's version, without resolving or building anything.
VERSION="$(cargo metadata --no-deps --offline --format-version 1 2>/dev/null |
    grep -o "\"name\":\"$BUNDLER_PKG\",\"version\":\"[^\"]*\"" | head -n 1 | sed 's/.*"version":"//; s/"$//')" || VERSION=""
[ -n "$VERSION" ] || VERSION="$(agent_version)" # the workspace version; both inherit it

# ELF machine (readelf -h) of a triple.
elf_machine_for() {
    case "$1" in
        x86_64-*) echo X86-64 ;;
        aarch64-*) echo AArch64 ;;
    esac
}

mkdir -p "$DIST_DIR"
[ -e "$DIST_DIR/.gitignore" ] || printf '*\n' >"$DIST_DIR/.gitignore"

FAILED=()
ROWS=()
SIZES_TSV="$DIST_DIR/fleet-bundler-sizes.tsv"
printf 'target\tbytes\tmib\tbuild_secs\n' >"$SIZES_TSV.tmp"
for triple in "${TRIPLES[@]}"; do
    out="$DIST_DIR/$BUNDLER_BIN-$triple"
    secs="-"
    if [ "$BUILD" = 1 ]; then
        # A binary from an earlier run must not be released as this run's.
        rm -f "$out"
        select_cargo || cross_die "no Debian Rust toolchain (neither 'cargo +debian' nor /usr/bin/cargo): run scripts/setup.sh --cross"
        cross_log "$triple: ${CARGO_CMD[*]} build --release ${LOCKED[*]} -p $BUNDLER_PKG"
        start=$(date +%s)
        if ! (
            env_lines="$(cross_env_lines "$triple")" || exit 1
            eval "$env_lines"
            if [ "$FULL_LTO" = 0 ]; then
                export CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
            fi
            exec "${CARGO_CMD[@]}" build --release "${LOCKED[@]}" --target "$triple" \
                -p "$BUNDLER_PKG" --bin "$BUNDLER_BIN"
        ); then
            cross_warn "$triple: build failed (see above)"
            FAILED+=("$triple")
            continue
        fi
        secs=$(($(date +%s) - start))
        bin="$CARGO_TARGET_DIR/$triple/release/$BUNDLER_BIN"
        cp -f "$bin" "$out.tmp"
        if elf_has_symtab "$out.tmp"; then
            "$(target_gcc_prefix "$triple")-strip" "$out.tmp"
        fi
        mv -f "$out.tmp" "$out"
    fi
    if [ ! -f "$out" ]; then
        cross_warn "$triple: no binary $out (run without --no-build)"
        FAILED+=("$triple")
        continue
    fi

    # The checks: static, the right machine, and it runs.
    problem=""
    machine="$(readelf -h "$out" | awk -F: '/Machine:/ { gsub(/^ +/, "", $2); print $2 }')"
    if [[ "$machine" != *"$(elf_machine_for "$triple")"* ]]; then
        problem="is a '$machine' binary"
    elif [ "$(elf_linkage "$out")" != static ]; then
        problem="has a program interpreter (not static)"
    else
        qemu="$(target_qemu "$triple")"
        if [ -n "$qemu" ] && ! command -v "$qemu" >/dev/null 2>&1; then
            problem="cannot be run: $qemu not found (apt-get install qemu-user-static)"
        else
            got="$(timeout 60 ${qemu:+"$qemu"} "$out" --version 2>&1)" || true
            [ "$got" = "$BUNDLER_BIN $VERSION" ] || problem="--version printed '$got', not '$BUNDLER_BIN $VERSION'"
        fi
    fi
    if [ -n "$problem" ]; then
        cross_warn "$triple: $out $problem"
        FAILED+=("$triple")
        continue
    fi
    bytes=$(stat -c %s "$out")
    took="$secs"
    [ "$secs" = - ] || took="${secs}s"
    ROWS+=("$(printf '%-28s static  %10s  %6s MiB  %6s  %s' "$triple" "$bytes" "$(mib "$bytes")" "$took" "$out")")
    printf '%s\t%s\t%s\t%s\n' "$triple" "$bytes" "$(mib "$bytes")" "$secs" >>"$SIZES_TSV.tmp"
done
mv -f "$SIZES_TSV.tmp" "$SIZES_TSV"

[ "${#FAILED[@]}" -eq 0 ] || cross_die "target(s) failed: ${FAILED[*]} (nothing checksummed)"

# The installer ships beside the binaries (GitLab's include cannot bring files along).
cp -f scripts/install-fleet-bundler.sh "$DIST_DIR/install-fleet-bundler.sh.tmp"
chmod 0755 "$DIST_DIR/install-fleet-bundler.sh.tmp"
mv -f "$DIST_DIR/install-fleet-bundler.sh.tmp" "$DIST_DIR/install-fleet-bundler.sh"

# Checksums of every release file of this version present in dist/ (a --targets run
# keeps the other target's binary listed, if it is there).
NAMES=(install-fleet-bundler.sh)
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    [ -f "$DIST_DIR/$BUNDLER_BIN-$t" ] && NAMES+=("$BUNDLER_BIN-$t")
done
(cd "$DIST_DIR" && sha256sum -- "${NAMES[@]}" >fleet-bundler-SHA256SUMS.tmp && mv -f fleet-bundler-SHA256SUMS.tmp fleet-bundler-SHA256SUMS)

echo
if [ "$FULL_LTO" = 1 ]; then lto="fat LTO, 1 codegen unit"; else lto="thin LTO, 16 codegen units"; fi
echo "fleet-bundler $VERSION: stripped static musl release binaries (opt-level 3, $lto, panic abort)"
printf '%-28s %-7s %10s  %10s  %6s  %s\n' target linkage bytes size build file
for row in "${ROWS[@]}"; do
    echo "$row"
done
echo "checksums: $DIST_DIR/fleet-bundler-SHA256SUMS"
sed 's/^/  /' "$DIST_DIR/fleet-bundler-SHA256SUMS"
