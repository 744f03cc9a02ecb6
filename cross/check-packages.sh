#!/usr/bin/env bash
# Checks the packages of one architecture as a device would meet them: the .deb's
# files, conffile and maintainer scripts; the tarball's install.sh into a fake root
# (twice: it must never overwrite an edited agent.toml); and the packaged binary itself
# (under qemu for arm64). Run after `cross/package.sh`; CI runs it from scripts/test.sh.
#
#   cross/check-packages.sh [ARCH]     # ARCH: arm64 (default), armhf, amd64
#
# Reads $DIST_DIR (default dist), as cross/package.sh writes it.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH="${1:-arm64}"
case "$ARCH" in -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DIST_DIR="${DIST_DIR:-dist}"
DEB="$DIST_DIR/fleet-agent_${VERSION}_${ARCH}.deb"
TARBALL="$DIST_DIR/fleet-agent-${VERSION}-${ARCH}.tar.gz"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

fail() { echo "check-packages: FAIL: $*" >&2; exit 1; }
ok() { echo "check-packages: ok: $*"; }

case "$ARCH" in
    arm64) RUN=(qemu-aarch64-static) ;;
    armhf) RUN=(qemu-arm-static) ;;
    *) RUN=() ;;
esac

[ -f "$DEB" ] || fail "$DEB is missing: run cross/package.sh first"
[ -f "$TARBALL" ] || fail "$TARBALL is missing: run cross/package.sh first"

# The .deb: metadata, files, conffile, and a binary that runs.
[ "$(dpkg-deb -f "$DEB" Architecture)" = "$ARCH" ] || fail "$DEB is not for $ARCH"
contents=$(dpkg-deb -c "$DEB")
for path in ./usr/bin/fleet-agent ./lib/systemd/system/fleet-agent.service ./etc/fleet-agent/agent.toml; do
    grep -q " $path\$" <<<"$contents" || fail "$DEB lacks $path"
done
dpkg-deb -e "$DEB" "$WORK/control"
grep -qx /etc/fleet-agent/agent.toml "$WORK/control/conffiles" || fail "agent.toml is not a conffile"
for script in postinst prerm; do [ -x "$WORK/control/$script" ] || fail "$DEB lacks $script"; done
ok "$DEB: architecture, files, conffile, maintainer scripts"

dpkg-deb -x "$DEB" "$WORK/deb"
# Self-update needs the launcher as the service's command, and its child's notifications.
unit="$WORK/deb/lib/systemd/system/fleet-agent.service"
grep -q '^ExecStart=/usr/bin/fleet-agent launch ' "$unit" || fail "the unit does not run fleet-agent launch"
grep -qx 'NotifyAccess=all' "$unit" || fail "the unit lacks NotifyAccess=all (the agent is the launcher's child)"
version_line=$("${RUN[@]}" "$WORK/deb/usr/bin/fleet-agent" --version)
grep -q "$VERSION" <<<"$version_line" || fail "packaged binary says '$version_line', not $VERSION"
set +e
"${RUN[@]}" "$WORK/deb/usr/bin/fleet-agent" check-config --config "$WORK/deb/etc/fleet-agent/agent.toml" \
    >"$WORK/check.out" 2>&1
code=$?
set -e
[ "$code" = 64 ] || fail "the default config must be refused with 64 until filled in (got $code): $(cat "$WORK/check.out")"
ok "packaged binary runs ($version_line); the unfilled default config exits 64"

# The tarball: install.sh into a fake root, twice.
tar -xzf "$TARBALL" -C "$WORK"
dir="$WORK/fleet-agent-${VERSION}-${ARCH}"
root="$WORK/root"
DESTDIR="$root" sh "$dir/install.sh" >/dev/null
for path in usr/local/bin/fleet-agent etc/fleet-agent/agent.toml etc/systemd/system/fleet-agent.service; do
    [ -e "$root/$path" ] || fail "install.sh did not install /$path"
done
[ "$(stat -c %a "$root/var/lib/fleet-agent")" = 700 ] || fail "/var/lib/fleet-agent is not 0700"
echo 'device = "edited-by-hand"' >>"$root/etc/fleet-agent/agent.toml"
DESTDIR="$root" sh "$dir/install.sh" >/dev/null
grep -q edited-by-hand "$root/etc/fleet-agent/agent.toml" || fail "a second install.sh overwrote agent.toml"
ok "$TARBALL: install.sh into a fake root, idempotent, keeps an edited agent.toml"

if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify "$WORK/deb/lib/systemd/system/fleet-agent.service" 2>&1 |
        grep -v -e 'Failed to .*bus' -e 'fleet-agent.* is not executable' || true
fi
ok "all checks passed for $ARCH"
