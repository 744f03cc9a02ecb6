#!/usr/bin/env bash
# The fleet's whole loop on this machine, step by step: the example fleet repository is
# committed to Git, bundled and signed, published over MQTT, applied by a local agent,
# and shown in the fleet status table; then a second commit changes one config file.
#
#   scripts/demo.sh                          # in-process MQTT broker, files only, no root needed
#   scripts/demo.sh --broker mqtt://host:1883
#   scripts/demo.sh --engine-socket /var/run/docker.sock   # run the containers too
#   scripts/demo.sh --nginx                  # serve the bundles with nginx (Debian's nginx-light)
#   scripts/demo.sh --help                   # every option
#
# As root it first runs scripts/setup.sh (the test suite's packages; idempotent). Without
# root it skips that: the demo needs only git and a Rust toolchain (cargo, stable).
# Everything goes to ./demo-work (replaced on every run). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

HELP=0
for arg in "$@"; do
    case "$arg" in
        -h | --help) HELP=1 ;; # fleet-demo prints the options: no setup needed for that
    esac
done

if [ "$HELP" -eq 1 ]; then
    :
elif [ "$(id -u)" -eq 0 ]; then
    say "running scripts/setup.sh (as root: installs the packages the tests need, idempotent)"
    bash scripts/setup.sh
else
    say "not root: skipping scripts/setup.sh (the demo needs only git and cargo)"
fi

if ! command -v cargo >/dev/null 2>&1; then
    say "cargo is not installed: install a stable Rust toolchain (rustup), then run this again"
    exit 1
fi
if ! command -v git >/dev/null 2>&1; then
    say "git is not installed: install it (e.g. apt-get install git), then run this again"
    exit 1
fi

say "building fleet-bundler, fleet-agent and fleet-demo (debug; the first build takes a few minutes)"
# Two builds, not one: in one build cargo would unify the demo's dependency features
# (its in-process broker's) into the agent, which would then differ from a device's.
cargo build --quiet -p fleet-bundler -p fleet-agent --bin fleet-bundler --bin fleet-agent
cargo build --quiet -p fleet-e2e --bin fleet-demo

# Run the binary itself (not `cargo run`, whose different package selection would
# rebuild it): exec'ed, so Ctrl-C reaches the demo directly. It finds fleet-bundler and
# fleet-agent next to itself.
TARGET_DIR="$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${TARGET_DIR:-target}/debug/fleet-demo" "$@"
