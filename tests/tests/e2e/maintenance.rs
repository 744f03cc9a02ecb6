//! Issue 14, device side: a maintenance window and an update lock each hold an apply
//! (the device reports `waiting` with the reason and when it will apply) and release it
//! without a new announcement; a lock held past its maximum deferral is overridden.
//! Files-only agents on a real Mosquitto.

use anyhow::Result;
use fleet_e2e::fleet::{applied_commit, now_unix, state};
use fleet_e2e::{Device, DeviceWatch, FleetRepo, Mosquitto};
use serde_json::Value;

use crate::common::*;

fn fleet_yaml(fleet: &FleetRepo, maintenance: &str) -> Result<()> {
    fleet.write(
        "fleet.yaml",
        format!("name: acme\nbundle_expiry: 30d\nfile_root: {}\n{maintenance}", fleet.file_root().display()),
    )
}

fn waiting(status: &Value, reason: &str, commit: &str) -> bool {
    state(status) == "waiting"
        && status["waiting"]["reason"] == reason
        && status["desired"]["commit"] == commit
}

/// A fixed-offset zone (`<+00>-0:00:SS`, POSIX) in which `at` is a whole minute, and
/// a window of ten minutes opening at `at` in it (`HH:MM` from, to): a window can then
/// open to the second.
fn window_opening_at(at: i64) -> (String, String, String) {
    let east = (60 - at.rem_euclid(60)) % 60;
    let from = (at + east).rem_euclid(86400) / 60;
    let to = (from + 10) % 1440;
    let hm = |m: i64| format!("{:02}:{:02}", m / 60, m % 60);
    (format!("<+00>-0:00:{east:02}"), hm(from), hm(to))
}

#[test]
fn a_maintenance_window_holds_an_apply_until_it_opens() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    files_app(&fleet, "app", None, &[("files/app.conf", "v=1\n")])?;
    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    deploy(&mut fleet, &broker, &watch, &device, "v1")?;
    let conf = fleet.app_file("app", "files/app.conf");

    // v2 may apply only in a window that opens ~30 s from now.
    let opens = now_unix() + 30;
    let (zone, from, to) = window_opening_at(opens);
    fleet_yaml(
        &fleet,
        &format!(
            "maintenance:\n  windows:\n    - from: \"{from}\"\n      to: \"{to}\"\n  timezone: \"{zone}\"\n"
        ),
    )?;
    files_app(&fleet, "app", None, &[("files/app.conf", "v=2\n")])?;
    let v2 = ship(&mut fleet, &broker, "v2 in the window")?;
    let status = watch
        .wait_status(REPORT, "waiting for the window", |s| waiting(s, "window", &v2))
        .map_err(|e| e.context(device.log_tail()))?;
    assert_eq!(status["waiting"]["until"], opens, "{status}");
    assert!(status["waiting"]["since"].as_i64().is_some_and(|s| s <= now_unix()), "{status}");
    assert_eq!(status["waiting"]["digest"], fleet.entry("gw-1")?.digest.as_str(), "{status}");
    assert_ne!(applied_commit(&status), Some(v2.as_str()));
    assert_file(&device, &conf, "v=1\n");
    let table = fleet.status(&broker.url(), &[])?.check()?;
    assert!(
        table.stdout.lines().any(|l| l.starts_with("gw-1") && l.contains("waiting (window until ")),
        "the table says why and until when: {table}"
    );

    // No new announcement: the window opening is enough.
    let status = wait_converged(&watch, &device, &v2)?;
    assert!(now_unix() >= opens, "applied before the window opened: {status}");
    assert!(status.get("waiting").is_none(), "{status}");
    assert_file(&device, &conf, "v=2\n");
    Ok(())
}

#[test]
fn an_update_lock_holds_an_apply_until_removed_or_its_maximum_deferral_ends() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    files_app(&fleet, "app", None, &[("files/app.conf", "v=1\n")])?;
    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    deploy(&mut fleet, &broker, &watch, &device, "v1")?;
    let conf = fleet.app_file("app", "files/app.conf");
    let locks = device.state_dir().join("locks");
    std::fs::create_dir_all(&locks)?;

    // An app holds the lock: v2 waits, until the end of its maximum deferral.
    std::fs::write(locks.join("updates.lock"), b"")?;
    fleet_yaml(&fleet, "maintenance:\n  update_lock:\n    max_deferral: 1h\n")?;
    files_app(&fleet, "app", None, &[("files/app.conf", "v=2\n")])?;
    let v2 = ship(&mut fleet, &broker, "v2 under a lock")?;
    let status = watch
        .wait_status(REPORT, "waiting for the lock", |s| waiting(s, "lock", &v2))
        .map_err(|e| e.context(device.log_tail()))?;
    let since = status["waiting"]["since"].as_i64().unwrap_or_default();
    assert_eq!(status["waiting"]["until"], since + 3600, "{status}");
    assert_file(&device, &conf, "v=1\n");
    std::fs::remove_file(locks.join("updates.lock"))?;
    wait_converged(&watch, &device, &v2)?;
    assert_file(&device, &conf, "v=2\n");

    // A hostile lock (a FIFO nobody writes) held past a short maximum deferral: the
    // apply goes ahead anyway, and says so.
    let fifo = locks.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    assert!(made.success());
    fleet_yaml(&fleet, "maintenance:\n  update_lock:\n    max_deferral: 8s\n")?;
    files_app(&fleet, "app", None, &[("files/app.conf", "v=3\n")])?;
    let v3 = ship(&mut fleet, &broker, "v3 under a lock that stays")?;
    let status = watch
        .wait_status(REPORT, "waiting for the lock again", |s| waiting(s, "lock", &v3))
        .map_err(|e| e.context(device.log_tail()))?;
    let since = status["waiting"]["since"].as_i64().unwrap_or_default();
    assert_eq!(status["waiting"]["until"], since + 8, "{status}");
    wait_converged(&watch, &device, &v3)?;
    assert!(now_unix() >= since + 8);
    assert_file(&device, &conf, "v=3\n");
    let overridden = watch.events_of("update_lock_overridden");
    assert_eq!(overridden.len(), 1, "{}", watch.describe());
    assert_eq!(overridden[0]["entry"], "fifo");
    assert_eq!(overridden[0]["since"], since);
    Ok(())
}
