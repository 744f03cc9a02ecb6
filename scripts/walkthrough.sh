#!/usr/bin/env bash
# The README's "How a change reaches a device", run as written on a copy of
# examples/fleet: the shell blocks between `<!-- walkthrough:begin TAGS -->` and
# `<!-- walkthrough:end -->` whose TAGS name the variant, in order, in one bash.
#
#   scripts/walkthrough.sh                         # both variants
#   scripts/walkthrough.sh files-only              # lab-kiosk-01, no container engine
#   scripts/walkthrough.sh containers              # lab-gateway-01, a private dockerd and
#                                                  # a registry on localhost:5000
#
# The README text is executed as it is; only the environment comes from here: BROKER (a
# Mosquitto on a free loopback port), BASE_URL (python3 -m http.server serving
# $TRY/www), TRY (a temp dir), ENGINE_SOCKET and DOCKER_HOST (a private dockerd), a Git
# identity, and a `sudo` that runs the command as is when the machine has none (we are
# root). The example's REGISTRY is localhost:5000: a Docker Distribution registry listens
# there, holding a busybox image built FROM scratch under the name the example uses.
#
# fleet-bundler and fleet-agent come from PATH. Needs root: everything runs in a private
# mount namespace whose /srv is a tmpfs, so the README's /srv/fleet never touches the
# machine's. Everything started is stopped, by PID, on exit (also on failure or Ctrl-C).
set -euo pipefail

SELF="$(readlink -f "$0")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"

say() { printf '\033[1m[walkthrough]\033[0m %s\n' "$*" >&2; }
die() {
    say "FAILED: $*"
    exit 1
}

VARIANTS=()
for arg in "$@"; do
    case "$arg" in
        files-only | containers) VARIANTS+=("$arg") ;;
        -h | --help)
            sed -n '2,20p' "$SELF" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument $arg (files-only, containers)" ;;
    esac
done
[ "${#VARIANTS[@]}" -gt 0 ] || VARIANTS=(files-only containers)

[ "$(id -u)" -eq 0 ] || die "run as root (a private mount namespace for /srv/fleet; dockerd)"
for tool in fleet-bundler fleet-agent mosquitto python3 git unshare; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH"
done

# A private mount namespace: /srv here is a tmpfs, the machine's is untouched.
if [ "${FLEET_WALKTHROUGH_NS:-}" != 1 ]; then
    exec env FLEET_WALKTHROUGH_NS=1 unshare --mount --propagation private -- bash "$SELF" "${VARIANTS[@]}"
fi
[ -d /srv ] || die "/srv does not exist (the example's file_root is /srv/fleet)"
mount -t tmpfs -o mode=0755,size=64m fleet-walkthrough /srv

LOCK_DIR=/tmp/fleet-e2e-locks # shared with the test harness (tests/src/dockerd.rs)
T=""
PIDS=()       # daemons we started (mosquitto, http server, registry)
STEPS_PGID="" # the README's commands and what they started in the background (agents)
DOCKERD_PID=""
SLOT=""  # the network slot; its lock is held on fd 8 (fd 7: the dockerd startup lock)

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # DESCRIPTION SECONDS COMMAND...
    local what=$1 secs=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || die "$what did not come up within ${secs}s"
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The shell blocks of README.md tagged with variant $1, in order.
extract() {
    awk -v variant="$1" '
        /^<!-- walkthrough:begin / {
            if (region) { print "README.md:" NR ": walkthrough:begin inside a region" > "/dev/stderr"; exit 1 }
            region = 1; on = 0
            for (i = 3; i < NF; i++) if ($i == variant) on = 1
            next
        }
        /^<!-- walkthrough:end -->/ { region = 0; on = 0; next }
        region && on && /^```sh$/ { code = 1; next }
        code && /^```$/ { code = 0; print ""; next }
        code { print }
        END { if (region) { print "README.md: walkthrough region not closed" > "/dev/stderr"; exit 1 } }
    ' "$ROOT/README.md"
}

stop_pid() { # PID [SECONDS]: TERM, then KILL
    local pid=$1 secs=${2:-10}
    kill -TERM "$pid" 2>/dev/null || return 0
    local end=$((SECONDS + secs))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Processes whose command line names our temp dir (containerd, shims, docker-proxy).
pids_under() {
    local p
    for p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF "$1/" && echo "${p#/proc/}"
    done
    return 0
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$STEPS_PGID" ]; then
        kill -TERM -- "-$STEPS_PGID" 2>/dev/null
        for _ in $(seq 50); do kill -0 -- "-$STEPS_PGID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$STEPS_PGID" 2>/dev/null
        STEPS_PGID=""
    fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid" 5; done
    PIDS=()
    if [ -n "$DOCKERD_PID" ]; then
        local ids=()
        mapfile -t ids < <(docker ps -aq 2>/dev/null)
        [ "${#ids[@]}" -eq 0 ] || docker rm -f -v "${ids[@]}" >/dev/null 2>&1
        docker network prune -f >/dev/null 2>&1
        stop_pid "$DOCKERD_PID" 20
        DOCKERD_PID=""
        for pid in $(pids_under "$T"); do kill -KILL "$pid" 2>/dev/null; done
    fi
    if [ -n "$SLOT" ]; then
        ip link del "fe2e-d$SLOT" 2>/dev/null
        exec 8>&-
        SLOT=""
    fi
    if [ -n "$T" ] && [ -d "$T" ]; then
        awk -v t="$T/" 'index($5, t) == 1 {print $5}' /proc/self/mountinfo | sort -r |
            while read -r m; do umount -l "$m"; done
        if [ "$rc" -ne 0 ] && [ "${FLEET_WALKTHROUGH_KEEP:-}" = 1 ]; then
            say "keeping $T (FLEET_WALKTHROUGH_KEEP=1)"
        else
            rm -rf "$T"
        fi
    fi
    rm -rf /srv/fleet
    T=""
    set -e
    return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_broker_and_server() {
    local mqtt_port http_port
    mqtt_port=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mqtt_port" >"$T/mosquitto.conf"
    mosquitto -c "$T/mosquitto.conf" >"$T/mosquitto.log" 2>&1 &
    PIDS+=($!)
    wait_for "mosquitto on port $mqtt_port" 10 port_open "$mqtt_port"
    mkdir -p "$T/try/www"
    http_port=$(free_port)
    python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$T/try/www" >"$T/http.log" 2>&1 &
    PIDS+=($!)
    wait_for "the bundle server on port $http_port" 10 port_open "$http_port"
    export BROKER="mqtt://127.0.0.1:$mqtt_port" BASE_URL="http://127.0.0.1:$http_port"
}

# A private dockerd the way the test harness starts one (tests/src/dockerd.rs): its own
# bridge and address pool (a network slot locked in $LOCK_DIR), an iptables that keeps
# the shared DOCKER* chains, one dockerd starting at a time.
start_dockerd() {
    local i routes
    mkdir -p "$LOCK_DIR" "$T/d" "$T/shims"
    routes="$(ip -4 route show)"
    for i in $(seq 0 39); do
        exec 8>"$LOCK_DIR/net-$i.lock"
        if flock -n 8; then
            ip link del "fe2e-d$i" 2>/dev/null || true
            if ! printf '%s\n' "$routes" | grep "^10\.$((150 + i))\." | grep -vq "dev fe2e-d$i "; then
                SLOT=$i
                break
            fi
        fi
        exec 8>&-
    done
    [ -n "$SLOT" ] || die "no free dockerd network slot (locks in $LOCK_DIR)"
    local octet=$((150 + SLOT)) bridge="fe2e-d$SLOT"
    ip link add "$bridge" type bridge
    ip addr add "10.$octet.255.1/24" dev "$bridge"
    ip link set "$bridge" up
    printf '#!/bin/sh\ncase " $* " in\n*" -F DOCKER"*|*" -X DOCKER"*) exit 0 ;;\nesac\nexec %s "$@"\n' \
        "$(command -v iptables)" >"$T/shims/iptables"
    chmod 755 "$T/shims/iptables"
    echo '{}' >"$T/d/daemon.json"
    exec 7>"$LOCK_DIR/dockerd-startup.lock"
    flock -w 300 7 || die "another dockerd has been starting for 5 minutes"
    PATH="$T/shims:$PATH" dockerd --config-file "$T/d/daemon.json" --data-root "$T/d/data" \
        --exec-root "$T/d/x" --pidfile "$T/d/dockerd.pid" -H "unix://$T/d/d.sock" \
        --bridge="$bridge" --default-address-pool="base=10.$octet.0.0/17,size=24" \
        >"$T/dockerd.log" 2>&1 7>&- 8>&- &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://$T/d/d.sock" ENGINE_SOCKET="$T/d/d.sock"
    wait_for "dockerd (log: $T/dockerd.log)" 60 docker version
    exec 7>&-
}

# The registry the example names (apps/status-page/.env: localhost:5000), holding
# busybox under the example's image name, built FROM scratch (no registry on the internet).
start_registry_with_image() {
    port_open 5000 && die "something listens on 127.0.0.1:5000, where the example's registry (localhost:5000) must be"
    command -v docker-registry >/dev/null || die "docker-registry is not installed"
    printf 'version: 0.1\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: "127.0.0.1:5000"}\n' \
        "$T/registry" >"$T/registry.yml"
    docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 8>&- &
    PIDS+=($!)
    wait_for "the registry on localhost:5000" 20 port_open 5000
    local bb
    bb="$(command -v busybox)" || die "busybox is not installed (busybox-static)"
    mkdir -p "$T/img/bin"
    cp "$bb" "$T/img/bin/busybox"
    for c in sh httpd wget sleep cat; do ln -s busybox "$T/img/bin/$c"; done
    printf 'FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nCMD ["/bin/sh"]\n' >"$T/img/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t localhost:5000/busybox:1.36 "$T/img" >"$T/image.log" 2>&1 ||
        die "docker build: $(cat "$T/image.log")"
    docker push localhost:5000/busybox:1.36 >"$T/image.log" 2>&1 || die "docker push: $(cat "$T/image.log")"
    docker rmi localhost:5000/busybox:1.36 >/dev/null # the agent pulls it from the registry
}

run_variant() {
    local variant=$1 started=$SECONDS
    T="$(mktemp -d /tmp/fwalk.XXXXXX)"
    say "$variant: in $T"
    start_broker_and_server
    if [ "$variant" = containers ]; then
        start_dockerd
        start_registry_with_image
    else
        unset DOCKER_HOST ENGINE_SOCKET
    fi
    export TRY="$T/try"
    mkdir -p "$T/bin"
    if ! command -v sudo >/dev/null; then
        printf '#!/bin/sh\nexec "$@"\n' >"$T/bin/sudo" # root without sudo: run the command as is
        chmod 755 "$T/bin/sudo"
    fi
    {
        echo "PS4='+ [\${SECONDS}s] '  # (walkthrough.sh) the trace: each command, seconds since the start"
        extract "$variant"
    } >"$T/steps.sh"
    grep -q 'fleet-bundler publish' "$T/steps.sh" || die "README.md has no walkthrough blocks for $variant"
    say "$variant: the README's commands ($(grep -c . "$T/steps.sh") lines), BROKER=$BROKER BASE_URL=$BASE_URL"
    (
        cd "$ROOT"
        export PATH="$T/bin:$PATH"
        export GIT_AUTHOR_NAME="Fleet Walkthrough" GIT_AUTHOR_EMAIL="walkthrough@example.invalid"
        export GIT_COMMITTER_NAME="Fleet Walkthrough" GIT_COMMITTER_EMAIL="walkthrough@example.invalid"
        exec setsid bash -euo pipefail -x "$T/steps.sh" 8>&-
    ) &
    STEPS_PGID=$!
    if ! wait "$STEPS_PGID"; then
        for log in "$TRY"/*/agent.log; do
            [ -f "$log" ] && { say "--- $log (last 30 lines)"; tail -n 30 "$log" >&2; }
        done
        die "$variant: a README command failed (above)"
    fi

    # What the README showed, checked: the device's files on disk hold the change.
    local device=lab-kiosk-01
    [ "$variant" = containers ] && device=lab-gateway-01
    grep -q "Changed in Git, delivered by the fleet." /srv/fleet/welcome/files/index.html ||
        die "$variant: /srv/fleet/welcome/files/index.html does not hold the change"
    grep -q "$device" /srv/fleet/welcome/files/index.html ||
        die "$variant: /srv/fleet/welcome/files/index.html is not $device's"
    if [ "$variant" = containers ]; then
        local health
        health="$(docker inspect -f '{{.State.Health.Status}}' status-page-httpd)"
        [ "$health" = healthy ] || die "containers: status-page-httpd is $health"
        docker exec status-page-httpd wget -q -O- http://127.0.0.1:8080/ | grep -q "Changed in Git" ||
            die "containers: the container does not serve the changed page"
    fi
    say "$variant: converged twice, as the README says, in $((SECONDS - started))s"
    cleanup
}

for variant in "${VARIANTS[@]}"; do
    run_variant "$variant"
done
say "passed: ${VARIANTS[*]}"
