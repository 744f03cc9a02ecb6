#!/usr/bin/env bash
# Builds the fleet-bundler OCI image (cross/Dockerfile.bundler: FROM scratch, the static
# x86_64 binary, CA certificates, non-root user) and checks that it works.
#
#   cross/bundler-image.sh                   # build + check, with a private dockerd
#   cross/bundler-image.sh --save FILE       # ... and `docker save` the image (gzip) to FILE
#   DOCKER_HOST=unix:///run/docker.sock cross/bundler-image.sh   # use that daemon instead
#
# Input: dist/fleet-bundler-x86_64-unknown-linux-musl (cross/release.sh), or --binary PATH.
# Image: fleet-bundler:<version> (--tag to name it otherwise; push it to your registry).
#
# Without DOCKER_HOST (or --docker-host), the script starts its own dockerd (root) on a
# socket in a temp dir, with no bridge and no iptables rules (the checks run with
# --network none, so it touches no network state of the machine or of other daemons),
# and stops it, unmounts and deletes its directory on exit, whatever happened.
#
# Checks:
#   the image config    user 65532:65532, entrypoint fleet-bundler, org.opencontainers.image.* labels
#   --version           `docker run --rm IMAGE --version` prints "fleet-bundler <version>"
#   validate            on a fresh Git repository holding examples/fleet, mounted read-only at
#                       /repo (owned by root, read by the image's non-root user): exit 0
#   validate (broken)   the same repository plus a device file with an unknown key: exit 65,
#                       the problem reported as file:line:column
# Options: --binary PATH, --tag TAG, --save FILE, --docker-host URL, -h/--help.
set -euo pipefail

CROSS_SCRIPT=bundler-image
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

BINARY=""
TAG=""
SAVE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary | --tag | --save | --docker-host)
            [ $# -ge 2 ] || cross_die "$1 needs a value (try --help)"
            case "$1" in
                --binary) BINARY="$2" ;;
                --tag) TAG="$2" ;;
                --save) SAVE="$2" ;;
                --docker-host) export DOCKER_HOST="$2" ;;
            esac
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) cross_die "unknown argument: $1 (try --help)" ;;
    esac
done

cd "$REPO_ROOT"
BINARY="${BINARY:-$DIST_DIR/fleet-bundler-x86_64-unknown-linux-musl}"
[ -f "$BINARY" ] || cross_die "no binary at $BINARY: run cross/release.sh --targets x86_64"
[ "$(elf_linkage "$BINARY")" = static ] || cross_die "$BINARY is not static: a FROM scratch image has no loader"
VERSION="$("$BINARY" --version | awk '{ print $2 }')"
TAG="${TAG:-fleet-bundler:$VERSION}"
command -v docker >/dev/null 2>&1 || cross_die "docker (the CLI) not found: apt-get install docker.io"
# The legacy builder: a FROM scratch image needs nothing else, and BuildKit (buildx) is
# not part of Debian's docker.io.
export DOCKER_BUILDKIT=0

WORK="$(mktemp -d /tmp/fbimg.XXXXXX)" # short: the dockerd socket lives here
DOCKERD_PID=""
cleanup() {
    local i
    if [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
        # containerd and its shims were started by this dockerd: they go with it, but a
        # shim can linger a moment; its mounts are what would keep the directory busy.
        awk -v d="$WORK/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
    fi
    rm -rf "$WORK" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

# A private dockerd, unless one was given.
if [ -n "${DOCKER_HOST:-}" ]; then
    docker version >/dev/null 2>&1 || cross_die "no Docker daemon answers at DOCKER_HOST=$DOCKER_HOST"
    cross_log "using the daemon at $DOCKER_HOST"
else
    [ "$(id -u)" -eq 0 ] || cross_die "starting a private dockerd needs root (or set DOCKER_HOST)"
    command -v dockerd >/dev/null 2>&1 || cross_die "dockerd not found: apt-get install docker.io"
    echo '{}' >"$WORK/daemon.json"
    dockerd --config-file "$WORK/daemon.json" --data-root "$WORK/data" --exec-root "$WORK/x" \
        --pidfile "$WORK/dockerd.pid" -H "unix://$WORK/d.sock" \
        --bridge=none --iptables=false --ip-masq=false --containerd-namespace "fbimg-$$" \
        --containerd-plugins-namespace "fbimg-$$-plugins" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://$WORK/d.sock"
    for i in $(seq 1 120); do
        docker version >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || {
            tail -n 20 "$WORK/dockerd.log" >&2
            cross_die "dockerd exited while starting (log above)"
        }
        [ "$i" -lt 120 ] || cross_die "dockerd did not answer within 60 s ($WORK/dockerd.log)"
        sleep 0.5
    done
    cross_log "private dockerd $(docker version -f '{{.Server.Version}}') on $DOCKER_HOST (pid $DOCKERD_PID)"
fi

# The build context: exactly the files the Dockerfile copies.
CTX="$WORK/ctx"
mkdir -p "$CTX"
install -m 0755 "$BINARY" "$CTX/fleet-bundler"
CA=/etc/ssl/certs/ca-certificates.crt
[ -s "$CA" ] || cross_die "$CA missing: apt-get install ca-certificates"
install -m 0644 "$CA" "$CTX/ca-certificates.crt"
printf 'root:x:0:0:root:/:/sbin/nologin\nfleet:x:65532:65532:fleet-bundler:/repo:/sbin/nologin\n' >"$CTX/passwd"
printf 'root:x:0:\nfleet:x:65532:\n' >"$CTX/group"
chmod 0644 "$CTX/passwd" "$CTX/group"
cp "$CROSS_DIR/Dockerfile.bundler" "$CTX/Dockerfile"

SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
SOURCE="$(sed -n '/^\[workspace.package\]/,/^\[/{s/^repository *= *"\(.*\)"/\1/p}' Cargo.toml | head -n 1)"
start=$(date +%s)
docker build -q -t "$TAG" \
    --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" \
    --build-arg "CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)" \
    --build-arg "SOURCE=${SOURCE:-https://example.invalid/fleet}" \
    "$CTX" >/dev/null || cross_die "docker build failed"
ID="$(docker image inspect -f '{{.Id}}' "$TAG")"
SIZE="$(docker image inspect -f '{{.Size}}' "$TAG")"
cross_log "built $TAG ($ID, $(mib "$SIZE") MiB) in $(($(date +%s) - start)) s"

FAILS=0
ok() { printf '  ok    %s\n' "$*"; }
fail() {
    printf '  FAIL  %s\n' "$*"
    FAILS=$((FAILS + 1))
}

# expect WHAT GOT WANT
expect() {
    if [ "$2" = "$3" ]; then
        ok "$1: $2"
    else
        fail "$1: '$2', want '$3'"
    fi
}

echo "checks of $TAG:"
label() { docker image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$1\"}}" "$TAG"; }
expect "user" "$(docker image inspect -f '{{.Config.User}}' "$TAG")" 65532:65532
expect "entrypoint" "$(docker image inspect -f '{{json .Config.Entrypoint}}' "$TAG")" '["/usr/local/bin/fleet-bundler"]'
expect "label org.opencontainers.image.version" "$(label version)" "$VERSION"
expect "label org.opencontainers.image.revision" "$(label revision)" "$REVISION"
for l in title description created source licenses; do
    [ -n "$(label "$l")" ] || fail "label org.opencontainers.image.$l is missing"
done

run() { docker run --rm --network none "$@"; }
expect "docker run --rm $TAG --version" "$(run "$TAG" --version 2>&1 || true)" "fleet-bundler $VERSION"

# A fleet repository as CI checks it out: examples/fleet, committed.
REPO="$WORK/repo"
mkdir -p "$REPO"
cp -r examples/fleet/. "$REPO/"
commit() {
    git -C "$REPO" add -A
    git -C "$REPO" -c user.name=ci -c user.email=ci@example.invalid commit -q -m "$1"
}
git -C "$REPO" init -q -b main
commit "fleet"
rc=0
run -v "$REPO:/repo:ro" "$TAG" validate --repo /repo >"$WORK/out" 2>&1 || rc=$?
expect "validate --repo /repo (examples/fleet, read-only mount, non-root user), exit" "$rc" 0
[ "$rc" = 0 ] || sed 's/^/        | /' "$WORK/out" | head -n 20

# The same repository, broken: a device file with a key the format does not have.
printf 'labels:\n  channel: stable\ncolour: red\n' >"$REPO/devices/broken-01.yaml"
commit "broken device"
rc=0
run -v "$REPO:/repo:ro" "$TAG" validate --repo /repo >"$WORK/out" 2>&1 || rc=$?
if [ "$rc" = 65 ] && grep -q 'devices/broken-01.yaml:[0-9]*:[0-9]*' "$WORK/out"; then
    ok "validate --repo /repo (a device file with an unknown key): exit 65, $(grep -m1 -o 'devices/broken-01.yaml:[0-9]*:[0-9]*' "$WORK/out")"
else
    fail "validate of the broken repository: exit $rc (want 65 and devices/broken-01.yaml:LINE:COL)"
    sed 's/^/        | /' "$WORK/out" | head -n 20
fi

[ "$FAILS" -eq 0 ] || cross_die "$FAILS check(s) of $TAG failed"

if [ -n "$SAVE" ]; then
    mkdir -p "$(dirname "$SAVE")"
    docker save "$TAG" | gzip -9n >"$SAVE.tmp"
    mv -f "$SAVE.tmp" "$SAVE"
    cross_log "saved $TAG to $SAVE ($(mib "$(stat -c %s "$SAVE")") MiB; docker load -i FILE, then docker push)"
fi
if [ -n "$DOCKERD_PID" ]; then
    echo "image $TAG checked (it was built in a private dockerd, stopped now: use --save to keep it)"
else
    echo "FLEET_BUNDLER_IMAGE=$TAG"
fi
