//! Setup and assertions shared by the scenarios.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::converged_on;
use fleet_e2e::{Device, DeviceWatch, FleetRepo, Mosquitto};
use serde_json::Value;

/// How long a device may take to converge on a new commit: download, verify, apply,
/// pull images, start containers and hold them healthy for the settle time.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// How long an agent may take to notice and report something (a rejection, drift).
pub const REPORT: Duration = Duration::from_secs(20);

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Writes app `app`: `apps/<app>/app.yaml` delivering each `(source, content)` under
/// `apps/<app>/`, to every device (`selector: None`) or to those matching the YAML
/// selector lines (e.g. `"site: north"`).
pub fn files_app(fleet: &FleetRepo, app: &str, selector: Option<&str>, files: &[(&str, &str)]) -> Result<()> {
    let mut yaml = String::new();
    if let Some(sel) = selector {
        yaml.push_str(&format!("selector:\n  {sel}\n"));
    }
    yaml.push_str("files:\n");
    for (source, content) in files {
        yaml.push_str(&format!("  - source: {source}\n"));
        if content.contains("{{") {
            yaml.push_str("    template: true\n");
        }
        fleet.write(&format!("apps/{app}/{source}"), content)?;
    }
    fleet.write(&format!("apps/{app}/app.yaml"), yaml)
}

/// Commits, builds and publishes, as CI does on a merge; returns the commit id.
pub fn ship(fleet: &mut FleetRepo, broker: &Mosquitto, message: &str) -> Result<String> {
    let commit = fleet.commit(message)?;
    fleet.build().with_context(|| format!("building {message:?}"))?;
    fleet.publish(&broker.url()).with_context(|| format!("publishing {message:?}"))?;
    Ok(commit)
}

/// Waits until `device` reports `converged` on `commit`; returns that status.
pub fn wait_converged(watch: &DeviceWatch, device: &Device, commit: &str) -> Result<Value> {
    watch
        .wait_status(CONVERGE, &format!("{} to converge on {commit}", device.id), |s| converged_on(s, commit))
        .with_context(|| device.log_tail())
}

/// Ships a commit and waits until the device converged on it; returns the commit id.
pub fn deploy(
    fleet: &mut FleetRepo,
    broker: &Mosquitto,
    watch: &DeviceWatch,
    device: &Device,
    message: &str,
) -> Result<String> {
    let commit = ship(fleet, broker, message)?;
    wait_converged(watch, device, &commit)?;
    Ok(commit)
}

/// Asserts the device holds exactly `content` at `path` (compared by sha256).
#[track_caller]
pub fn assert_file(device: &Device, path: &str, content: &str) {
    let want = fleet_e2e::fleet::sha256_hex(content.as_bytes());
    let got = device.sha256(path);
    assert_eq!(
        got.as_deref(),
        Some(want.as_str()),
        "{path} on {}: expected the sha256 of {content:?}, found {:?}",
        device.id,
        device.read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
    );
}

/// Asserts nothing exists at `path` on the device.
#[track_caller]
pub fn assert_no_file(device: &Device, path: &str) {
    assert!(!device.host_path(path).exists(), "{path} should not exist on {}", device.id);
}

/// The events of kind `event` for version `version`.
pub fn events_for_version(watch: &DeviceWatch, event: &str, version: u64) -> Vec<Value> {
    watch.events_of(event).into_iter().filter(|e| e["version"] == version).collect()
}

/// Checks the fields every status report carries (MESSAGES.md).
pub fn check_status_shape(status: &Value, device: &str, fleet: &str) -> Result<()> {
    ensure!(status["device"] == device && status["fleet"] == fleet, "wrong device/fleet in {status}");
    ensure!(status["agent_version"].as_str().is_some_and(|v| !v.is_empty()), "no agent_version in {status}");
    let now = fleet_e2e::fleet::now_unix();
    let ts = status["timestamp"].as_i64().context("no timestamp")?;
    ensure!((now - 300..=now + 5).contains(&ts), "timestamp {ts} is not recent (now {now})");
    ensure!(
        status["files"]["managed"].is_u64() && status["files"]["drift_repaired"].is_u64(),
        "no file counts in {status}"
    );
    ensure!(status["containers"].is_array(), "no container list in {status}");
    Ok(())
}
