//! Scenario 11: sideloading with `fleet-agent apply` while the broker is unreachable
//! (a USB stick on an air-gapped device): the same verification and apply path, with
//! the service stopped and with it running (it then applies the bundle itself).

use std::fs;

use anyhow::Result;
use fleet_e2e::{free_port, Device, FleetRepo};

use crate::common::*;

#[test]
fn sideloaded_bundles_apply_without_a_broker_with_full_verification() -> Result<()> {
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let conf = fleet.app_file("conf", "app.conf");
    let usb = fleet.scratch("usb")?;
    let copy_to_usb = |fleet: &FleetRepo, name: &str| -> Result<std::path::PathBuf> {
        let path = usb.join(name);
        fs::write(&path, fleet.bundle_of("gw-1")?)?;
        Ok(path)
    };
    // Nothing listens on the broker port: the device is offline.
    let mut device = Device::builder(&fleet, "gw-1")?
        .broker(&format!("mqtt://127.0.0.1:{}", free_port()))
        .no_polling()
        .create()?;

    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    let c1 = fleet.commit("release 1")?;
    fleet.build()?;
    let v1 = fleet.entry("gw-1")?;
    let stick1 = copy_to_usb(&fleet, "release-1.bundle")?;

    let out = device.apply(&stick1)?;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains(&format!("applied version {}", v1.version)), "{out}");
    assert_file(&device, &conf, "release = 1\n");
    let local = device.local_status()?;
    assert_eq!(local["applied"]["digest"], v1.digest.as_str(), "{local}");
    assert_eq!(local["applied"]["commit"], c1.as_str(), "{local}");
    assert_eq!(local["status"]["state"], "converged", "{local}");
    assert_eq!(local["journal"], "clean", "{local}");

    // The same stick again: already applied.
    let again = device.apply(&stick1)?;
    assert_eq!(again.code, Some(0), "{again}");
    assert!(again.stdout.contains("already applied"), "{again}");

    // A newer release, then the old stick again: refused (rollback protection).
    files_app(&fleet, "conf", None, &[("app.conf", "release = 2\n")])?;
    fleet.commit("release 2")?;
    fleet.build()?;
    let stick2 = copy_to_usb(&fleet, "release-2.bundle")?;
    assert_eq!(device.apply(&stick2)?.code, Some(0));
    assert_file(&device, &conf, "release = 2\n");
    let old = device.apply(&stick1)?;
    assert_eq!(old.code, Some(65), "{old}");
    assert!(old.stderr.contains("not_newer"), "{old}");
    assert_file(&device, &conf, "release = 2\n");

    // A stick whose bundle was tampered with: refused, nothing changed.
    files_app(&fleet, "conf", None, &[("app.conf", "release = 3\n")])?;
    fleet.commit("release 3")?;
    fleet.build()?;
    let mut bytes = fleet.bundle_of("gw-1")?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let tampered = usb.join("tampered.bundle");
    fs::write(&tampered, bytes)?;
    let out = device.apply(&tampered)?;
    assert_eq!(out.code, Some(65), "{out}");
    assert!(out.stderr.contains("payload_digest"), "{out}");
    assert_file(&device, &conf, "release = 2\n");

    // A missing file is its own error.
    assert_eq!(device.apply(&usb.join("nope.bundle"))?.code, Some(66));

    // While the service runs (offline: its broker is unreachable), apply hands the stick
    // to it over the state directory's socket and waits for the outcome.
    device.start()?;
    let stick3 = copy_to_usb(&fleet, "release-3.bundle")?;
    fleet_e2e::wait_until(secs(20), "the running agent to open its sideload socket", || {
        Ok(device.log().contains("fleet-agent starting"))
    })?;
    let handed = device.apply(&stick3)?;
    assert_eq!(handed.code, Some(0), "{handed}\n{}", device.log_tail());
    assert!(handed.stderr.contains("the agent service is running"), "{handed}");
    assert_file(&device, &conf, "release = 3\n");
    assert!(device.log().contains("sideloaded bundle received"), "{}", device.log_tail());
    assert!(device.is_running(), "the offline agent exited:\n{}", device.log_tail());
    // The running agent refuses a replay as the local path does, and keeps running.
    let replay = device.apply(&stick1)?;
    assert_eq!(replay.code, Some(65), "{replay}");
    assert_file(&device, &conf, "release = 3\n");
    assert!(device.is_running(), "the offline agent exited:\n{}", device.log_tail());
    device.stop();

    // With the service stopped, the same stick is applied locally: nothing left to do.
    let out = device.apply(&stick3)?;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("already applied"), "{out}");
    assert_file(&device, &conf, "release = 3\n");
    Ok(())
}
