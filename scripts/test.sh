#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs first (idempotent).
#
#   scripts/test.sh          # setup, format, lint, ARM builds, unit tests on aarch64 under
#                            # qemu, unit + integration + end-to-end tests (one with the
#                            # aarch64 agent under qemu), fuzz smoke, quick benchmarks
#   FUZZ_SECONDS=0 scripts/test.sh    # skip the fuzz smoke run
#
# Tests start their own Mosquitto, RabbitMQ cluster, dockerd, podman and registry on free loopback ports
# and temp dirs; nothing needs to be running beforehand. Run as root (dockerd, podman).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says when it starts, in minutes since the run began: where CI's time goes.
RUN_START=$SECONDS
step() { printf '\n\033[1m==> [%dm%02ds] %s\033[0m\n' $(((SECONDS - RUN_START) / 60)) $(((SECONDS - RUN_START) % 60)) "$*"; }

# CI machines run short of disk before they run short of CPU. Everything here is built
# once, so incremental caches are dead weight, and line tables are all the debug info a
# failing test's backtrace needs (file:line). Set either variable to override.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"

# A full run needs about NEED_GIB free where target/ and the temp dir live. Say so up
# front: running out halfway shows up as a linker crash, not as "disk full".
NEED_GIB=8
for dir in . "${TMPDIR:-/tmp}"; do
    free_gib=$(( $(df -Pk "$dir" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
    if [ "$free_gib" -lt "$NEED_GIB" ]; then
        echo "warning: only ${free_gib} GiB free on $(df -P "$dir" | awk 'NR==2 {print $6}') (for $dir);" \
            "a full run needs about ${NEED_GIB} GiB. Free space (cargo clean in old checkouts) if it fails." >&2
    fi
done

step "setup (packages for the real components, and the Debian toolchain for ARM)"
bash scripts/setup.sh --cross

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cross-build the agent: aarch64 (required), armv7, and x86_64 (the shipped build the e2e memory bound is asserted on) (static musl, size profile, size budget)"
bash cross/build.sh --setup-armhf --enforce-budget --targets aarch64,armv7,x86_64
export FLEET_AGENT_AARCH64="$PWD/dist/fleet-agent-aarch64-unknown-linux-musl"

step "fleet-spec's tests and the agent's unit tests on aarch64 (the musl build, under qemu-user)"
(
    env_lines="$(bash cross/build.sh --print-env aarch64)"
    eval "$env_lines"
    cargo +debian test --locked --target aarch64-unknown-linux-musl -p fleet-spec
    cargo +debian test --locked --target aarch64-unknown-linux-musl -p fleet-agent --lib --bins
)

step "package the agents (.deb, tarball: arm64, amd64, armhf) and check the packages (ARM under qemu)"
bash cross/package.sh --no-build --arch arm64
bash cross/check-packages.sh arm64
# amd64: the package the systemd e2e tests install in a machine booted by systemd.
bash cross/package.sh --no-build --arch amd64
bash cross/check-packages.sh amd64
if [ -f dist/fleet-agent-armv7-unknown-linux-musleabihf ]; then
    bash cross/package.sh --no-build --arch armhf
    bash cross/check-packages.sh armhf
else
    echo "armv7 was not built (the reason is in the table above): its packages are not checked"
fi

step "cargo test: build every test binary"
cargo test --workspace --locked --no-run

# The bundler's two static release builds are CPU-bound for ~10 min, and the quick
# benchmarks' release builds of both binaries (below) for ~4 more; the end-to-end tests
# mostly wait on brokers, engines and timers. Run the builds beside the tests, at a lower
# priority, instead of after them. The benchmarks' builds are the very commands
# bench/run.sh runs (same target dir and environment), so there they are no-ops.
step "ship the bundler, part 1 (in the background while the tests run): static x86_64 + aarch64 release binaries and checksums; the benchmarks' release builds"
ship_log="$(mktemp)"
setsid nice -n 10 bash -c 'bash scripts/ci-ship.sh --only build &&
    for pkg in fleet-agent fleet-bundler; do
        echo "release build of $pkg for the benchmarks" && cargo build --release -q -p "$pkg" || exit
    done' >"$ship_log" 2>&1 &
ship_pid=$!
trap 'kill -- "-$ship_pid" 2>/dev/null || true' EXIT

step "cargo test (unit, integration, end-to-end on real components)"
cargo test --workspace --locked --no-fail-fast

step "ship the bundler, part 2: the release builds' output, then the OCI image, the installer, action and GitLab template (from a loopback server), pipeline syntax"
ship_status=0
wait "$ship_pid" || ship_status=$?
trap - EXIT
cat "$ship_log"
if [ "$ship_status" -ne 0 ]; then
    echo "the release builds failed (exit $ship_status; the log is above)" >&2
    exit 1
fi
bash scripts/ci-ship.sh --no-build

step "walkthrough: the README, verbatim, on a copy of the example (files-only and with containers)"
PATH="$PWD/target/debug:$PATH" bash scripts/walkthrough.sh

FUZZ_SECONDS="${FUZZ_SECONDS:-15}"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    step "fuzz smoke run (${FUZZ_SECONDS}s per target)"
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "nightly toolchain missing: skipping the fuzz smoke run (rustup toolchain install nightly)"
    else
        command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
        for target in bundle announcement; do
            (cd fleet-spec/fuzz && cargo +nightly fuzz run "$target" -- \
                -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 2>&1 | tail -n 3)
        done
    fi
fi
step "benchmarks, quick mode (numbers are not judged here; the suite itself must run)"
bash bench/run.sh --quick --out "$(mktemp -d)/BENCHMARKS.md"

step "all tests passed"
