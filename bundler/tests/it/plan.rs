//! `plan` between two commits: per-device file diffs, container field changes,
//! secrets hidden, and the exit code CI reads.

use crate::common::{bundler, Repo};

/// The telemetry app's image in `examples/fleet`.
const TELEGRAF: &str =
    "telegraf:1.32@sha256:d2aa551cbd7ce436afdafe3c47360d985f14bb02a631df63976a174b03c33419";

fn plan(repo: &Repo, from: &str, to: &str, json: bool) -> crate::common::Output {
    let mut args = vec!["plan", "--repo", repo.path_str(), "--from", from, "--to", to];
    if json {
        args.push("--json");
    }
    bundler(&args)
}

#[test]
fn no_changes_exit_0() {
    let repo = Repo::example();
    repo.commit_at("empty", 1_800_000_100);
    let out = plan(&repo, "HEAD~1", "HEAD", false);
    out.assert_code(0);
    assert!(out.stdout.contains("0 device(s) change, 6 unchanged"), "{}", out.stdout);
}

#[test]
fn file_and_container_changes_per_device() {
    let repo = Repo::example();
    // A template variable of one device, an image of one app, a secret file.
    repo.write(
        "devices/gw-berlin-02.yaml",
        "labels:\n  site: berlin\n  hardware: rpi4\n  channel: stable\nvars:\n  location: \"Berlin, hall 2\"\n  upstream_port: 8082\n",
    );
    repo.write(
        "apps/modbus-gateway/conf/gateway.env",
        "GATEWAY_ID={{ device.id }}\nAPI_TOKEN=rotated-{{ device.id }}\n",
    );
    let compose = std::fs::read_to_string(repo.path().join("apps/telemetry/compose.yaml")).expect("compose");
    repo.write("apps/telemetry/compose.yaml", &compose.replace(TELEGRAF, "telegraf:1.33-alpine"));
    repo.commit_at("changes", 1_800_000_100);

    let out = plan(&repo, "HEAD~1", "HEAD", false);
    out.assert_code(2);
    let text = &out.stdout;
    assert!(text.contains("4 device(s) change, 2 unchanged"), "{text}");
    assert!(text.contains("~ device gw-berlin-02"), "{text}");
    assert!(text.contains("~ file /srv/fleet/edge-proxy/files/nginx.conf"), "{text}");
    assert!(text.contains("-        proxy_pass http://api:8081/;"), "unified diff: {text}");
    assert!(text.contains("+        proxy_pass http://api:8082/;"), "unified diff: {text}");
    assert!(text.contains("~ container edge-proxy-proxy: restarts (a mounted file changed)"), "{text}");
    assert!(text.contains("~ container edge-proxy-api: env.PORT, expose, healthcheck"), "{text}");
    // A pinned reference is shown as the engine pulls it: by digest, without the tag.
    let pinned = TELEGRAF.replace(":1.32@", "@");
    assert!(text.contains(&format!("image {pinned} -> telegraf:1.33-alpine")), "{text}");
    assert!(
        text.contains("~ file /srv/fleet/modbus-gateway/conf/gateway.env: content changed (hidden)"),
        "{text}"
    );
    assert!(!text.contains("rotated"), "secret content must never show: {text}");
    assert!(!text.contains("8082") || !text.contains("PORT=8082"), "env values are not shown");

    let out = plan(&repo, "HEAD~1", "HEAD", true);
    out.assert_code(2);
    let json = out.json();
    let devices = json["devices"].as_array().expect("devices");
    let berlin = devices.iter().find(|d| d["device"] == "gw-berlin-02").expect("gw-berlin-02");
    let api = berlin["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "edge-proxy-api")
        .expect("api");
    assert_eq!(api["change"], "changed");
    assert!(api["fields"].as_array().expect("fields").contains(&serde_json::json!("env.PORT")));
    let munich = devices.iter().find(|d| d["device"] == "gw-munich-01").expect("munich");
    let env = munich["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == "/srv/fleet/modbus-gateway/conf/gateway.env")
        .expect("env file");
    assert_eq!(env["hidden"], true);
    assert!(env.get("diff").is_none());
    assert!(!out.stdout.contains("rotated"));
}

#[test]
fn added_and_removed_devices_and_apps() {
    let repo = Repo::example();
    repo.remove("devices/sensor-hub-01.yaml");
    repo.write(
        "devices/gw-hamburg-01.yaml",
        "labels:\n  site: hamburg\n  hardware: x86\n  channel: canary\n",
    );
    repo.remove("apps/canary-tools");
    repo.commit_at("fleet changes", 1_800_000_100);
    let out = plan(&repo, "HEAD~1", "HEAD", false);
    out.assert_code(2);
    assert!(out.stdout.contains("+ device gw-hamburg-01"), "{}", out.stdout);
    assert!(out.stdout.contains("- device sensor-hub-01"), "{}", out.stdout);
    assert!(out.stdout.contains("- container canary-tools-netcheck"), "{}", out.stdout);
}

#[test]
fn an_invalid_revision_stops_the_plan() {
    let repo = Repo::example();
    repo.write("apps/canary-tools/compose.yaml", "services:\n  x:\n    build: .\n");
    repo.commit_at("broken", 1_800_000_100);
    let out = plan(&repo, "HEAD~1", "HEAD", false);
    out.assert_code(65);
    out.assert_stderr_has("apps/canary-tools/compose.yaml:3:12: error: `build:` is not supported");
    plan(&repo, "HEAD~1", "no-such-rev", false).assert_code(1);
}
