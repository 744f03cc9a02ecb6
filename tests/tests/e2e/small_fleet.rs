//! Scenario 9: a small fleet. Twenty files-only devices with different labels, each
//! with its own filesystem (a private mount namespace over the fleet's file root), get
//! exactly their own bundles and converge; `fleet-bundler status` shows all twenty.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::{converged_on, sha256_hex};
use fleet_e2e::{wait_until, Device, FleetRepo, Mosquitto};
use serde_json::Value;

use crate::common::*;

const DEVICES: usize = 20;

fn labels(i: usize) -> (&'static str, &'static str) {
    (if i.is_multiple_of(2) { "north" } else { "south" }, if i <= 4 { "canary" } else { "stable" })
}

/// Every file under `dir`, relative path → sha256.
fn files_under(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                found.insert(rel, sha256_hex(&std::fs::read(&path)?));
            }
        }
    }
    Ok(found)
}

#[test]
fn twenty_devices_get_exactly_their_own_bundles_and_converge() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("plant")?;
    let ids: Vec<String> = (1..=DEVICES).map(|i| format!("dev-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let (site, channel) = labels(i + 1);
        fleet.add_device(id, &[("site", site), ("channel", channel)])?;
    }
    files_app(
        &fleet,
        "base",
        None,
        &[("id.conf", "id = {{ device.id }}\nsite = {{ device.labels.site }}\n")],
    )?;
    files_app(&fleet, "north", Some("site: north"), &[("north.conf", "north side\n")])?;
    files_app(&fleet, "canary", Some("channel: canary"), &[("canary.conf", "canary build\n")])?;
    let commit = fleet.commit("plant rollout")?;
    let summary = fleet.build()?;
    ensure!(summary["written"] == DEVICES, "{summary}");

    let all_status = broker.client().subscribe("fleet/plant/devices/+/status")?;
    let mut devices = Vec::new();
    for id in &ids {
        devices.push(Device::builder(&fleet, id)?.broker(&broker.url()).no_polling().private_root().start()?);
    }
    let published = fleet.publish(&broker.url())?;
    ensure!(published["announced"].as_array().map(Vec::len) == Some(DEVICES), "{published}");

    let gate = fleet.status_wait(&broker.url(), secs(120))?;
    let diagnose =
        || devices.iter().map(|d| format!("{}:\n{}", d.id, d.log_tail())).collect::<Vec<_>>().join("\n");
    assert_eq!(gate.code, Some(0), "{gate}\n{}", diagnose());

    // Each device holds exactly the files of the apps its labels select, rendered for it,
    // and runs exactly its own bundle.
    let latest = |id: &str| -> Option<Value> {
        let topic = format!("fleet/plant/devices/{id}/status");
        all_status.messages().iter().rev().find(|m| m.topic == topic).and_then(|m| m.json().ok())
    };
    let mut digests = BTreeSet::new();
    for (i, device) in devices.iter().enumerate() {
        let (site, channel) = labels(i + 1);
        let mut want = BTreeMap::new();
        want.insert(
            "base/id.conf".to_string(),
            sha256_hex(format!("id = {}\nsite = {site}\n", device.id).as_bytes()),
        );
        if site == "north" {
            want.insert("north/north.conf".to_string(), sha256_hex(b"north side\n"));
        }
        if channel == "canary" {
            want.insert("canary/canary.conf".to_string(), sha256_hex(b"canary build\n"));
        }
        let root = device.host_path(&fleet.file_root().to_string_lossy());
        assert_eq!(files_under(&root)?, want, "files of {}", device.id);
        let entry = fleet.entry(&device.id)?;
        wait_until(REPORT, &format!("{} converged in its status", device.id), || {
            Ok(latest(&device.id).is_some_and(|s| converged_on(&s, &commit)))
        })?;
        let status = latest(&device.id).context("status")?;
        assert_eq!(
            status["applied"]["digest"],
            entry.digest.as_str(),
            "{} runs another bundle: {status}",
            device.id
        );
        digests.insert(entry.digest);
    }
    assert_eq!(digests.len(), DEVICES, "devices share bundles");
    // Nothing leaked to the shared file root: every device wrote into its own.
    assert_eq!(files_under(fleet.file_root())?, BTreeMap::new());

    // `status` shows all twenty, converged.
    let shown = fleet.status(&broker.url(), &["--json"])?.check()?.json()?;
    let rows = shown["devices"].as_array().context("devices")?;
    assert_eq!(rows.len(), DEVICES, "{shown}");
    for row in rows {
        assert_eq!(row["state"], "converged", "{row}");
        assert_eq!(row["online"], true, "{row}");
        assert_eq!(row["applied_commit"], commit.as_str(), "{row}");
    }
    let table = fleet.status(&broker.url(), &[])?.check()?;
    for id in &ids {
        assert!(
            table.stdout.lines().any(|l| l.starts_with(id.as_str()) && l.contains("converged")),
            "{id}:\n{table}"
        );
    }
    Ok(())
}
