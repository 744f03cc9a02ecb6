#!/usr/bin/env bash
# The dashboard with a large fleet: real Mosquitto (WebSockets listener), N retained
# statuses, the page (dashboard/index.html from `fleet-bundler build`) in headless
# Chromium. Prints a Markdown table: time until all N devices are counted, the longest
# main-thread stall (Chromium's longest "long task") and the longest render, at page
# load and while N live updates arrive.
#
#   bench/dashboard.sh                 # 10,000 devices
#   bench/dashboard.sh --devices 1000
#
# Needs mosquitto and chromium (scripts/setup.sh) and git; runs as root (Chromium gets
# --no-sandbox). FLEET_DASHBOARD_BENCH_SCREENSHOT=PATH also saves a screenshot.
set -euo pipefail
cd "$(dirname "$0")/.."
for p in mosquitto chromium git; do
    command -v "$p" >/dev/null 2>&1 || {
        echo "bench/dashboard.sh: $p is not installed: run scripts/setup.sh (as root) first" >&2
        exit 1
    }
done
cargo build --quiet -p fleet-bundler --bin fleet-bundler
cargo build --quiet -p fleet-e2e --bin fleet-dashboard-bench
TARGET_DIR="$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${TARGET_DIR:-target}/debug/fleet-dashboard-bench" "$@"
