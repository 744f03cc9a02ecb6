//! Scenario 6: outages. The broker goes away in the middle of a rollout and comes back;
//! an agent starts while the broker is down; an update is never announced at all and
//! arrives by polling; the bundle server drops the connection in the middle of a
//! download.

use anyhow::{Context, Result};
use fleet_e2e::fleet::{converged_on, sha256_hex};
use fleet_e2e::{wait_until, Device, DeviceWatch, FleetRepo, Mosquitto, StaticHttpOptions};

use crate::common::*;

#[test]
fn broker_stopped_mid_rollout_and_restarted_converges() -> Result<()> {
    let mut broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    let ids = ["gw-1", "gw-2"];
    for id in ids {
        fleet.add_device(id, &[])?;
    }
    files_app(&fleet, "conf", None, &[("app.conf", "id = {{ device.id }}\nrelease = 1\n")])?;
    // Polling stays on (every 5 s): a missed announcement must not be a missed update.
    let mut devices = Vec::new();
    let mut watches = Vec::new();
    for id in ids {
        let device = Device::builder(&fleet, id)?.broker(&broker.url()).private_root().create()?;
        watches.push(DeviceWatch::of(&broker.client(), &device)?);
        devices.push(device);
    }
    for device in &mut devices {
        device.start()?;
    }
    let c1 = ship(&mut fleet, &broker, "release 1")?;
    for (device, watch) in devices.iter().zip(&watches) {
        wait_converged(watch, device, &c1)?;
    }

    // Release 2 is announced, and the broker dies right away (without persistence: its
    // retained announcements are gone when it comes back).
    files_app(&fleet, "conf", None, &[("app.conf", "id = {{ device.id }}\nrelease = 2\n")])?;
    let c2 = ship(&mut fleet, &broker, "release 2")?;
    broker.stop();
    broker.restart()?;

    // Every device gets there, and says so on the new broker.
    let gate = fleet.status_wait(&broker.url(), secs(60))?;
    let logs = || devices.iter().map(Device::log_tail).collect::<Vec<_>>().join("\n");
    assert_eq!(gate.code, Some(0), "{gate}\n{}", logs());
    for device in &devices {
        assert_file(
            device,
            &fleet.app_file("conf", "app.conf"),
            &format!("id = {}\nrelease = 2\n", device.id),
        );
        let status = broker.client().retained(&device.topic("status"))?.context("no retained status")?;
        assert!(converged_on(&serde_json::from_str(&status)?, &c2), "{status}");
        assert_eq!(broker.client().retained(&device.topic("online"))?.as_deref(), Some("true"));
    }
    Ok(())
}

#[test]
fn agent_started_while_the_broker_is_down_keeps_its_state_then_catches_up() -> Result<()> {
    let mut broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let conf = fleet.app_file("conf", "app.conf");
    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    let c1 = deploy(&mut fleet, &broker, &watch, &device, "release 1")?;

    // The device reboots while the broker is down; meanwhile CI builds release 2.
    device.stop();
    broker.stop();
    files_app(&fleet, "conf", None, &[("app.conf", "release = 2\n")])?;
    let c2 = fleet.commit("release 2")?;
    fleet.build()?;
    device.start()?;
    wait_until(REPORT, "the agent to start and recover offline", || {
        Ok(device.log().matches("recovery").count() >= 2)
    })
    .with_context(|| device.log_tail())?;

    // Offline, it keeps the last good state, and keeps it in place: drift is repaired.
    assert!(device.is_running(), "the agent exited without a broker:\n{}", device.log_tail());
    assert_file(&device, &conf, "release = 1\n");
    std::fs::remove_file(device.host_path(&conf))?;
    wait_until(REPORT, "the deleted file restored offline", || {
        Ok(device.sha256(&conf) == Some(sha256_hex(b"release = 1\n")))
    })
    .with_context(|| device.log_tail())?;
    let local = device.local_status()?;
    assert_eq!(local["applied"]["commit"], c1.as_str(), "{local}");
    assert_eq!(local["status"]["state"], "converged", "{local}");

    // The broker is back and CI publishes: the device catches up.
    broker.restart()?;
    fleet.publish(&broker.url())?;
    wait_converged(&watch, &device, &c2)?;
    assert_file(&device, &conf, "release = 2\n");
    assert_eq!(broker.client().retained(&device.topic("online"))?.as_deref(), Some("true"));
    Ok(())
}

#[test]
fn an_update_never_announced_arrives_by_polling_the_devices_pointer_file() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    fleet.add_device("gw-2", &[])?;
    let conf = fleet.app_file("conf", "app.conf");
    files_app(&fleet, "conf", None, &[("app.conf", "id = {{ device.id }}\nrelease = 1\n")])?;
    // Polling every 5 s; nothing is ever published on the broker.
    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let c1 = fleet.commit("release 1")?;
    fleet.build()?;
    wait_converged(&watch, &device, &c1)?;
    assert_file(&device, &conf, "id = gw-1\nrelease = 1\n");

    // The device read its own pointer file and its bundle from the bundle server, nothing
    // else: not index.json, not another device's file.
    let pointer = "/devices/gw-1.json";
    let bundle = format!("/bundles/{}.bundle", fleet.entry("gw-1")?.digest);
    let requests = fleet.server().requests();
    assert!(requests.iter().any(|r| r.path == pointer && r.status == 200), "{requests:#?}");
    assert!(requests.iter().any(|r| r.path == bundle && r.status == 200), "{requests:#?}");
    let others: Vec<_> = requests.iter().filter(|r| r.path != pointer && r.path != bundle).collect();
    assert!(others.is_empty(), "{others:#?}");

    // The device leaves the fleet: the build deletes its pointer file, the next poll gets a
    // 404, and the device keeps what it runs.
    fleet.remove("devices/gw-1.yaml")?;
    fleet.commit("retire gw-1")?;
    let summary = fleet.build()?;
    assert_eq!(summary["pointers_deleted"], serde_json::json!(["gw-1"]), "{summary}");
    assert!(!fleet.out_dir().join("devices/gw-1.json").exists());
    assert!(fleet.out_dir().join("devices/gw-2.json").exists());
    let seen = fleet.server().requests().len();
    wait_until(secs(15), "a poll answered 404", || {
        Ok(fleet.server().requests()[seen..].iter().any(|r| r.path == pointer && r.status == 404))
    })?;
    wait_until(REPORT, "the agent to log the 404", || Ok(device.log().contains("no bundle for this device")))
        .with_context(|| device.log_tail())?;
    assert!(device.is_running(), "{}", device.log_tail());
    assert_file(&device, &conf, "id = gw-1\nrelease = 1\n");
    Ok(())
}

#[test]
fn download_dropped_mid_transfer_resumes_with_range_and_converges() -> Result<()> {
    let broker = Mosquitto::start()?;
    // The first transfer of every file stops after 1000 bytes.
    let mut fleet = FleetRepo::with_server(
        "acme",
        StaticHttpOptions { drop_first_after: Some(1000), ..Default::default() },
    )?;
    fleet.add_device("gw-1", &[])?;
    // Enough incompressible content that the bundle is well over 1000 bytes.
    let mut blob = String::new();
    let mut h = sha256_hex(b"seed");
    while blob.len() < 32 * 1024 {
        h = sha256_hex(h.as_bytes());
        blob.push_str(&h);
        blob.push('\n');
    }
    files_app(&fleet, "data", None, &[("blob.txt", &blob)])?;
    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    deploy(&mut fleet, &broker, &watch, &device, "a big file")?;
    assert_file(&device, &fleet.app_file("data", "blob.txt"), &blob);

    let entry = fleet.entry("gw-1")?;
    assert!(entry.size > 2000, "the bundle is only {} bytes", entry.size);
    let path = format!("/bundles/{}.bundle", entry.digest);
    let requests: Vec<_> = fleet.server().requests().into_iter().filter(|r| r.path == path).collect();
    assert!(requests.len() >= 2, "{requests:?}");
    assert!(requests[0].dropped && requests[0].body_bytes == 1000, "{requests:?}");
    assert_eq!(requests[1].status, 206, "the download was not resumed: {requests:?}");
    assert_eq!(requests[1].range.as_deref(), Some("bytes=1000-"), "{requests:?}");
    assert_eq!(requests[1].body_bytes, entry.size - 1000, "{requests:?}");
    Ok(())
}
