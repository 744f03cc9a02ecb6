#!/usr/bin/env bash
# Packages fleet-agent for devices: a .deb and a tarball per architecture, in dist/.
#
#   cross/package.sh                 # build (cross/build.sh --all), then package every
#                                    # architecture that has a binary: arm64, armhf, amd64
#   cross/package.sh --no-build      # package the binaries already in dist/
#   cross/package.sh --arch arm64    # only some: arm64, armhf, amd64 (comma-separated)
#
# Output (dist/, next to the binaries of cross/build.sh):
#   fleet-agent_<version>_<arch>.deb      dpkg -i; /usr/bin/fleet-agent, the unit in
#                                         /lib/systemd/system, /etc/fleet-agent/agent.toml
#                                         (conffile), /var/lib/fleet-agent (0700)
#   fleet-agent-<version>-<arch>.tar.gz   binary, unit, default config, install.sh
#   SHA256SUMS
#
# The default config is cross/agent.toml (incomplete on purpose: the agent refuses to
# start until it is filled in; override: FLEET_AGENT_DEFAULT_CONFIG=path); a warning
# names keys of agent/agent.toml.example it does not mention. Timestamps come from the
# last commit (SOURCE_DATE_EPOCH): the same tree and binaries give the same packages.
#
# Options: --arch LIST, --no-build, -h/--help. Needs dpkg-deb (dpkg), tar, gzip.
set -euo pipefail

CROSS_SCRIPT=package
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

ARCHES_ARG="arm64,armhf,amd64"
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --arch | --arches)
            [ $# -ge 2 ] || cross_die "$1 needs a value (try --help)"
            ARCHES_ARG="$2"
            shift 2
            ;;
        --arch=* | --arches=*)
            ARCHES_ARG="${1#*=}"
            shift
            ;;
        --no-build)
            BUILD=0
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
command -v dpkg-deb >/dev/null 2>&1 || cross_die "dpkg-deb not found (apt-get install dpkg)"

TRIPLES=()
for a in ${ARCHES_ARG//,/ }; do
    t="$(target_triple "$a")"
    [ -n "$t" ] || cross_die "unknown architecture: $a (arm64, armhf, amd64)"
    TRIPLES+=("$t")
done

if [ "$BUILD" = 1 ]; then
    # build.sh fails only when a required target fails; armv7 is skipped with a reason.
    bash "$CROSS_DIR/build.sh" --targets "$(
        IFS=,
        echo "${TRIPLES[*]}"
    )"
fi

VERSION="$(agent_version)"
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$REPO_ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH

DEFAULT_CONFIG="$(default_agent_config)"
[ -f "$DEFAULT_CONFIG" ] || cross_die "default config $DEFAULT_CONFIG does not exist"
cross_log "default /etc/fleet-agent/agent.toml: $DEFAULT_CONFIG"
# Keep the packaged default in step with the agent's documented keys.
if [ -f agent/agent.toml.example ]; then
    missing="$(comm -23 <(toml_keys agent/agent.toml.example) <(toml_keys "$DEFAULT_CONFIG") | tr '\n' ' ')"
    if [ -n "$missing" ]; then
        cross_warn "$DEFAULT_CONFIG does not mention these keys of agent/agent.toml.example: $missing"
    fi
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# ELF machine name expected for a Debian architecture (readelf -h "Machine:").
elf_machine_for() {
    case "$1" in
        arm64) echo AArch64 ;;
        armhf) echo ARM ;;
        amd64) echo X86-64 ;;
    esac
}

copyright() {
    cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fleet-agent
Source: https://example.invalid/fleet

Files: *
Copyright: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y) the fleet contributors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
Comment:
 /usr/bin/fleet-agent is statically linked. Besides the fleet's own code it contains
 musl libc (Copyright 2005-2020 Rich Felker, et al.; MIT), LLVM's libunwind
 (Apache-2.0 WITH LLVM-exception), the Rust standard library (MIT OR Apache-2.0) and
 the Rust crates pinned in the source's Cargo.lock, under their own permissive
 licenses (MIT, Apache-2.0, ISC, BSD, Unicode-3.0, Zlib, CDLA-Permissive-2.0; ring:
 Apache-2.0 AND ISC); \`cargo metadata\` in the source lists them per crate.
EOF
}

changelog() {
    cat <<EOF
fleet-agent ($VERSION) unstable; urgency=medium

  * Built from $(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo "an unknown commit").

 -- Fleet maintainers <fleet@example.invalid>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
}

# Deliberate departures from Debian's archive rules, so lintian reports what is left.
lintian_overrides() {
    cat <<EOF
# One static binary is the product: devices need no shared library.
fleet-agent: statically-linked-binary [usr/bin/fleet-agent]
fleet-agent: shared-library-lacks-prerequisites [usr/bin/fleet-agent]
# The config may hold secrets (mqtt.password); the state directory holds the journal.
fleet-agent: non-standard-file-perm 0600 != 0644 [etc/fleet-agent/agent.toml]
fleet-agent: non-standard-dir-perm 0700 != 0755 [var/lib/fleet-agent/]
EOF
}

# build_deb ARCH BIN OUT
build_deb() {
    local arch="$1" bin="$2" out="$3" root="$WORK/deb-$1" size
    rm -rf "$root"
    install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/etc/fleet-agent" \
        "$root/lib/systemd/system" "$root/usr/share/doc/fleet-agent"
    install -d -m 0700 "$root/var/lib/fleet-agent"
    install -m 0755 "$bin" "$root/usr/bin/fleet-agent"
    install -m 0600 "$DEFAULT_CONFIG" "$root/etc/fleet-agent/agent.toml"
    install -m 0644 "$CROSS_DIR/fleet-agent.service" "$root/lib/systemd/system/fleet-agent.service"
    install -m 0644 "$CROSS_DIR/README.md" "$root/usr/share/doc/fleet-agent/README.md"
    copyright >"$root/usr/share/doc/fleet-agent/copyright"
    changelog | gzip -9n >"$root/usr/share/doc/fleet-agent/changelog.gz"
    install -d -m 0755 "$root/usr/share/lintian/overrides"
    lintian_overrides >"$root/usr/share/lintian/overrides/fleet-agent"
    chmod 0644 "$root/usr/share/doc/fleet-agent/copyright" "$root/usr/share/doc/fleet-agent/changelog.gz" \
        "$root/usr/share/lintian/overrides/fleet-agent"
    for s in postinst prerm postrm; do
        install -m 0755 "$CROSS_DIR/debian/$s" "$root/DEBIAN/$s"
    done
    echo /etc/fleet-agent/agent.toml >"$root/DEBIAN/conffiles"
    size="$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)"
    cat >"$root/DEBIAN/control" <<EOF
Package: fleet-agent
Version: $VERSION
Architecture: $arch
Maintainer: Fleet maintainers <fleet@example.invalid>
Installed-Size: $size
Recommends: docker.io | docker-ce | podman | moby-engine | balena-engine
Section: admin
Priority: optional
Homepage: https://example.invalid/fleet
Description: GitOps agent for IoT fleets (signed bundles, files and containers)
 fleet-agent keeps a device in the state its fleet's Git repository declares:
 it pulls ed25519-signed bundles (announced over MQTT, polled over HTTPS, or
 sideloaded), applies files and containers atomically through the Docker
 Engine API, rolls back when an update fails its health checks, repairs
 drift, and reports its state over MQTT.
 .
 One static binary; runs as a hardened systemd service (not enabled until
 /etc/fleet-agent/agent.toml is configured).
EOF
    # Clamp every mtime so that the archive does not depend on when it was staged.
    find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
}

# build_tarball ARCH BIN OUT
build_tarball() {
    local arch="$1" bin="$2" out="$3" name dir
    name="fleet-agent-$VERSION-$arch"
    dir="$WORK/tar-$arch/$name"
    rm -rf "$WORK/tar-$arch"
    install -d -m 0755 "$dir"
    install -m 0755 "$bin" "$dir/fleet-agent"
    install -m 0644 "$CROSS_DIR/fleet-agent.service" "$dir/fleet-agent.service"
    install -m 0644 "$DEFAULT_CONFIG" "$dir/agent.toml"
    install -m 0644 "$CROSS_DIR/README.md" "$dir/README.md"
    sed -e "s/@ARCH@/$arch/" -e "s/@VERSION@/$VERSION/" "$CROSS_DIR/install.sh" >"$dir/install.sh"
    chmod 0755 "$dir/install.sh"
    find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    tar --sort=name --owner=0 --group=0 --numeric-owner --format=gnu \
        -C "$WORK/tar-$arch" -cf - "$name" | gzip -9n >"$out.tmp"
    mv -f "$out.tmp" "$out"
}

mkdir -p "$DIST_DIR"
[ -e "$DIST_DIR/.gitignore" ] || printf '*\n' >"$DIST_DIR/.gitignore"

MADE=()
SKIPPED=()
for triple in "${TRIPLES[@]}"; do
    arch="$(target_debarch "$triple")"
    bin="$DIST_DIR/$AGENT_BIN-$triple"
    if [ ! -f "$bin" ]; then
        SKIPPED+=("$arch: no binary $bin (cross/build.sh printed why)")
        continue
    fi
    machine="$(readelf -h "$bin" | awk -F: '/Machine:/ { gsub(/^ +/, "", $2); print $2 }')"
    case "$machine" in
        *"$(elf_machine_for "$arch")"*) ;;
        *) cross_die "$bin is a '$machine' binary, not $arch" ;;
    esac
    [ "$(elf_linkage "$bin")" = static ] || cross_die "$bin is not statically linked"
    deb="$DIST_DIR/fleet-agent_${VERSION}_$arch.deb"
    tgz="$DIST_DIR/fleet-agent-$VERSION-$arch.tar.gz"
    build_deb "$arch" "$bin" "$deb"
    build_tarball "$arch" "$bin" "$tgz"
    MADE+=("$deb" "$tgz")
done

[ "${#MADE[@]}" -gt 0 ] || cross_die "nothing packaged: ${SKIPPED[*]:-no architecture given}"

NAMES=()
for f in "${MADE[@]}"; do
    NAMES+=("$(basename "$f")")
done
(cd "$DIST_DIR" && sha256sum -- "${NAMES[@]}" >SHA256SUMS)

echo
echo "fleet-agent $VERSION packages:"
for f in "${MADE[@]}"; do
    printf '  %-48s %9s bytes\n' "$f" "$(stat -c %s "$f")"
done
for s in "${SKIPPED[@]}"; do
    echo "  skipped $s"
done
echo "  $DIST_DIR/SHA256SUMS"
