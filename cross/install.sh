#!/bin/sh
# Installs fleet-agent from this tarball on a device without dpkg (any Linux with
# systemd, or none: the binary is static and needs no library).
#
#   sudo ./install.sh                  # /usr/local/bin, /etc/fleet-agent, /var/lib/fleet-agent,
#                                      # /etc/systemd/system/fleet-agent.service
#   DESTDIR=/tmp/rootfs ./install.sh   # into an image or a fake root (no systemctl, no arch check)
#   ./install.sh --prefix /usr         # binary in /usr/bin (as the .deb does)
#   sudo ./install.sh --uninstall      # binary and unit; keeps config and state
#   sudo ./install.sh --uninstall --purge   # ... and config and state too
#
# Idempotent: running it again replaces the binary and the unit, restarts a running agent,
# and never overwrites an existing agent.toml. --force skips the machine-architecture check.
# POSIX sh (devices may only have busybox): `set -eu`, and pipefail where the shell has it.
set -eu
# shellcheck disable=SC3040 # pipefail is optional here: used where the shell supports it
(set -o pipefail) 2>/dev/null && set -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=/usr/local
UNINSTALL=0
PURGE=0
FORCE=0
# Set by package.sh when it builds the tarball.
ARCH=@ARCH@
VERSION=@VERSION@

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
say() { echo "install.sh: $*"; }
die() {
    echo "install.sh: ERROR: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix)
            [ $# -ge 2 ] || die "--prefix needs a directory"
            PREFIX=$2
            shift 2
            ;;
        --prefix=*)
            PREFIX=${1#*=}
            shift
            ;;
        --destdir)
            [ $# -ge 2 ] || die "--destdir needs a directory"
            DESTDIR=$2
            shift 2
            ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done
case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path: $PREFIX" ;;
esac
PREFIX=${PREFIX%/}
DESTDIR=${DESTDIR%/}

BIN=$PREFIX/bin/fleet-agent
DOC=$PREFIX/share/doc/fleet-agent
CONF_DIR=/etc/fleet-agent
STATE_DIR=/var/lib/fleet-agent
ROOT_DIR=/srv/fleet
UNIT=/etc/systemd/system/fleet-agent.service

# systemctl only on the live system, and only when systemd runs it.
live_systemd() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# install_file SRC DEST MODE: atomic replace (a running agent keeps its old inode).
install_file() {
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.new.$$"
    chmod "$3" "$2.new.$$"
    mv -f "$2.new.$$" "$2"
}

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or set DESTDIR= to install into a directory)"
fi

if [ "$UNINSTALL" = 1 ]; then
    if live_systemd; then
        systemctl disable --now fleet-agent.service >/dev/null 2>&1 || true
    fi
    rm -f "$DESTDIR$BIN" "$DESTDIR$UNIT" "$DESTDIR/etc/systemd/system/multi-user.target.wants/fleet-agent.service"
    rm -rf "$DESTDIR$DOC"
    say "removed $DESTDIR$BIN and $DESTDIR$UNIT"
    if [ "$PURGE" = 1 ]; then
        rm -f "$DESTDIR$CONF_DIR/agent.toml"
        rmdir "$DESTDIR$CONF_DIR" 2>/dev/null || say "kept $DESTDIR$CONF_DIR (it holds other files: keys, certificates)"
        rm -rf "$DESTDIR$STATE_DIR"
        say "purged $DESTDIR$CONF_DIR/agent.toml and $DESTDIR$STATE_DIR"
    else
        say "kept $DESTDIR$CONF_DIR and $DESTDIR$STATE_DIR (--purge removes them)"
    fi
    if live_systemd; then
        systemctl daemon-reload
    fi
    exit 0
fi

for f in fleet-agent fleet-agent.service agent.toml; do
    [ -f "$HERE/$f" ] || die "$HERE/$f is missing: run install.sh from the unpacked tarball"
done

# The binary is static, but it still must match the CPU.
if [ -z "$DESTDIR" ] && [ "$FORCE" = 0 ]; then
    machine=$(uname -m)
    case "$ARCH:$machine" in
        arm64:aarch64 | arm64:arm64 | armhf:armv7l | armhf:armv8l | armhf:aarch64 | amd64:x86_64) ;;
        *) die "this tarball is for $ARCH, and this machine is $machine (--force to install anyway)" ;;
    esac
fi

install_file "$HERE/fleet-agent" "$DESTDIR$BIN" 0755
say "installed $DESTDIR$BIN ($VERSION, $ARCH)"

# The unit names /usr/bin/fleet-agent (the .deb's path): point it at PREFIX.
mkdir -p "$DESTDIR/etc/systemd/system"
sed -e "s|/usr/bin/fleet-agent|$BIN|g" \
    -e "s|file:/usr/share/doc/fleet-agent/|file:$DOC/|g" \
    "$HERE/fleet-agent.service" >"$DESTDIR$UNIT.new.$$"
chmod 0644 "$DESTDIR$UNIT.new.$$"
mv -f "$DESTDIR$UNIT.new.$$" "$DESTDIR$UNIT"
say "installed $DESTDIR$UNIT"

if [ -f "$HERE/README.md" ]; then
    install_file "$HERE/README.md" "$DESTDIR$DOC/README.md" 0644
fi

mkdir -p "$DESTDIR$CONF_DIR"
chmod 0755 "$DESTDIR$CONF_DIR"
if [ -e "$DESTDIR$CONF_DIR/agent.toml" ]; then
    say "kept the existing $DESTDIR$CONF_DIR/agent.toml (the new default is $HERE/agent.toml)"
    FIRST=0
else
    install_file "$HERE/agent.toml" "$DESTDIR$CONF_DIR/agent.toml" 0600
    say "installed the default $DESTDIR$CONF_DIR/agent.toml"
    FIRST=1
fi

mkdir -p "$DESTDIR$STATE_DIR"
chmod 0700 "$DESTDIR$STATE_DIR"
mkdir -p "$DESTDIR$ROOT_DIR"

if live_systemd; then
    systemctl daemon-reload
    if systemctl is-active --quiet fleet-agent.service; then
        systemctl restart fleet-agent.service
        say "restarted the running fleet-agent"
    fi
elif [ -z "$DESTDIR" ]; then
    say "systemd is not running here: start it with '$BIN run --config $CONF_DIR/agent.toml'"
fi

if [ "$FIRST" = 1 ]; then
    say "next: set device, fleet and trust.public_keys in $CONF_DIR/agent.toml,"
    say "      '$BIN check-config', then 'systemctl enable --now fleet-agent'"
fi
