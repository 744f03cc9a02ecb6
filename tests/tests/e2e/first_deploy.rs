//! Scenario 1, files only: a commit → `build` → `publish` → the agent converges; its
//! status shows the commit and `converged`; `status --wait` exits 0.

use anyhow::{ensure, Result};
use fleet_e2e::fleet::{applied_commit, state};
use fleet_e2e::{Device, DeviceWatch, FleetRepo, Mosquitto};

use crate::common::*;

#[test]
fn first_deploy_of_files_converges_and_passes_the_ci_gate() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[("site", "berlin")])?;
    files_app(
        &fleet,
        "greeting",
        None,
        &[
            ("files/motd", "Hello from {{ device.id }} at {{ device.labels.site }}\n"),
            ("files/limits.conf", "max=3\n"),
        ],
    )?;
    let commit = fleet.commit("greeting for every device")?;
    let summary = fleet.build()?;
    ensure!(summary["written"] == 1 && summary["devices"] == 1, "build summary: {summary}");
    let entry = fleet.entry("gw-1")?;
    ensure!(entry.commit == commit, "index names {} not {commit}", entry.commit);

    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let published = fleet.publish(&broker.url())?;
    ensure!(published["announced"] == serde_json::json!(["gw-1"]), "publish summary: {published}");

    // The CI gate: `status --wait` exits 0 once the device runs the indexed version.
    let gate = fleet.status_wait(&broker.url(), secs(60))?;
    assert_eq!(gate.code, Some(0), "{gate}\n{}", device.log_tail());

    // Files, by content hash.
    let motd = fleet.app_file("greeting", "files/motd");
    let limits = fleet.app_file("greeting", "files/limits.conf");
    assert_file(&device, &motd, "Hello from gw-1 at berlin\n");
    assert_file(&device, &limits, "max=3\n");

    // The retained status.
    let status = broker.client().retained(&device.topic("status"))?.expect("a retained status");
    let status: serde_json::Value = serde_json::from_str(&status)?;
    check_status_shape(&status, "gw-1", "acme")?;
    assert_eq!(state(&status), "converged", "{status}");
    assert_eq!(applied_commit(&status), Some(commit.as_str()));
    assert_eq!(status["applied"]["version"], entry.version);
    assert_eq!(status["applied"]["digest"], entry.digest.as_str());
    assert_eq!(status["desired"]["commit"], commit.as_str());
    assert_eq!(status["desired"]["digest"], entry.digest.as_str());
    assert_eq!(status["files"]["managed"], 2);
    assert!(status["last_error"].is_null(), "{status}");
    assert_eq!(status["containers"], serde_json::json!([]));
    assert_eq!(broker.client().retained(&device.topic("online"))?.as_deref(), Some("true"));

    // The events of the apply.
    let started = events_for_version(&watch, "apply_started", entry.version);
    let finished = events_for_version(&watch, "apply_finished", entry.version);
    assert_eq!(started.len(), 1, "{}", watch.describe());
    assert_eq!(finished.len(), 1, "{}", watch.describe());
    assert_eq!(finished[0]["commit"], commit.as_str());
    assert_eq!(finished[0]["device"], "gw-1");

    // The table CI prints lists the device as converged on the commit.
    let table = fleet.status(&broker.url(), &[])?.check()?;
    let row = table.stdout.lines().find(|l| l.starts_with("gw-1")).unwrap_or_default().to_string();
    assert!(row.contains("converged") && row.contains(&commit[..8]), "{table}");

    // The local view agrees, with a clean journal.
    let local = device.local_status()?;
    assert_eq!(local["applied"]["digest"], entry.digest.as_str(), "{local}");
    assert_eq!(local["journal"], "clean", "{local}");
    assert_eq!(local["managed_files"].as_object().map(|m| m.len()), Some(2), "{local}");
    Ok(())
}
