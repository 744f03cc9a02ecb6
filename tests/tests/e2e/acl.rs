//! Scenario 10: broker ACLs. Mosquitto with passwords and the ACL that
//! `fleet-spec/MESSAGES.md` recommends (the bundler may write everything; each device,
//! whose broker username is its device id, may read its own `desired` and `bundle` and
//! write its own `status`, `online` and `events`). Devices converge under it, and a
//! device cannot write another device's status, forge announcements, or read another
//! device's announcement.

use anyhow::{ensure, Result};
use fleet_e2e::fleet::converged_on;
use fleet_e2e::{wait_until, Device, FleetRepo, Mosquitto, Mqtt};

use crate::common::*;

/// The ACL of MESSAGES.md, plus a read-only account for the test's observations.
const ACL: &str = "\
user bundler
topic readwrite fleet/#

user observer
topic read fleet/#

pattern read  fleet/+/devices/%u/desired
pattern read  fleet/+/devices/%u/bundle
pattern write fleet/+/devices/%u/status
pattern write fleet/+/devices/%u/online
pattern write fleet/+/devices/%u/events
";

const BUNDLER: [&str; 4] = ["--username", "bundler", "--password", "bundler-pw"];

fn broker_with_acl(acl: &str) -> Result<Mosquitto> {
    Mosquitto::builder()
        .allow_anonymous(false)
        .user("bundler", "bundler-pw")
        .user("observer", "observer-pw")
        .user("gw-1", "gw-1-pw")
        .user("gw-2", "gw-2-pw")
        .acl(acl)
        .start()
}

/// Two devices converged under the ACL, each with its own credentials.
/// (Fields drop in order: the agents stop before their broker and files go away.)
struct AclFleet {
    _devices: Vec<Device>,
    broker: Mosquitto,
    fleet: FleetRepo,
    commit: String,
}

fn acl_fleet(acl: &str) -> Result<AclFleet> {
    let broker = broker_with_acl(acl)?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    fleet.add_device("gw-2", &[])?;
    files_app(&fleet, "conf", None, &[("app.conf", "id = {{ device.id }}\n")])?;
    let commit = fleet.commit("conf for both")?;
    fleet.build()?;
    let mut devices = Vec::new();
    for id in ["gw-1", "gw-2"] {
        let device = Device::builder(&fleet, id)?
            .broker(&broker.url())
            .credentials(id, &format!("{id}-pw"))
            .no_polling()
            .private_root()
            .start()?;
        devices.push(device);
    }
    fleet.publish_output(&broker.url(), &BUNDLER)?.check()?;
    let gate = fleet.status(&broker.url(), &[&BUNDLER[..], &["--wait", "--timeout", "60s"]].concat())?;
    let logs: Vec<String> = devices.iter().map(Device::log_tail).collect();
    assert_eq!(gate.code, Some(0), "{gate}\n{}\n{}", logs.join("\n"), broker.log());
    for device in &devices {
        assert_file(device, &fleet.app_file("conf", "app.conf"), &format!("id = {}\n", device.id));
    }
    Ok(AclFleet { broker, fleet, commit, _devices: devices })
}

impl AclFleet {
    fn observer(&self) -> Mqtt {
        self.broker.client_as("observer", "observer-pw")
    }

    /// A client logging in with gw-1's credentials and client id (what gw-1's agent is).
    fn as_gw1(&self) -> Mqtt {
        self.broker.client_as("gw-1", "gw-1-pw").with_client_id("gw-1")
    }

    fn retained_status(&self, device: &str) -> Result<serde_json::Value> {
        let text = self.observer().retained(&self.fleet.topic(device, "status"))?.unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

#[test]
fn devices_work_within_their_own_subtree_and_cannot_touch_others() -> Result<()> {
    let f = acl_fleet(ACL)?;
    let gw1 = f.as_gw1();
    let watch_all = f.observer().subscribe("fleet/acme/devices/+/+")?;

    // gw-1 reads its own announcement, not gw-2's.
    assert!(
        gw1.retained(&f.fleet.topic("gw-1", "desired"))?.is_some(),
        "gw-1 cannot read its own announcement"
    );
    let theirs = gw1.subscribe(&f.fleet.topic("gw-2", "desired"))?;
    assert!(gw1.retained(&f.fleet.topic("gw-2", "desired"))?.is_none(), "gw-1 read gw-2's announcement");
    assert!(theirs.denied() || theirs.messages().is_empty(), "gw-1 received gw-2's announcement");

    // gw-1 writes its own status...
    gw1.publish(&f.fleet.topic("gw-1", "events"), r#"{"probe":"own"}"#, false)?;
    watch_all.wait_for(secs(10), "gw-1's own event", |m| m.text().contains("\"own\""))?;
    // ...but not gw-2's status, nor announcements for anyone.
    gw1.publish(&f.fleet.topic("gw-2", "status"), r#"{"spoofed":true}"#, true)?;
    gw1.publish(&f.fleet.topic("gw-2", "desired"), r#"{"spoofed":true}"#, true)?;
    gw1.publish(&f.fleet.topic("gw-1", "desired"), r#"{"spoofed":true}"#, true)?;
    // A marker published after the attempts: once it arrived, the attempts were handled.
    gw1.publish(&f.fleet.topic("gw-1", "events"), r#"{"probe":"marker"}"#, false)?;
    watch_all.wait_for(secs(10), "the marker", |m| m.text().contains("marker"))?;
    assert!(
        watch_all.messages().iter().all(|m| !m.text().contains("spoofed")),
        "a spoofed message got through: {:?}",
        watch_all.messages()
    );
    assert!(f.broker.log().contains("Denied PUBLISH from gw-1"), "{}", f.broker.log());

    // gw-2's status is still its own, and both announcements are the bundler's.
    let status = f.retained_status("gw-2")?;
    assert!(converged_on(&status, &f.commit), "gw-2's status was overwritten: {status}");
    for device in ["gw-1", "gw-2"] {
        let ann = f.observer().retained(&f.fleet.topic(device, "desired"))?.unwrap_or_default();
        assert!(ann.contains(&f.fleet.entry(device)?.digest), "{device}'s announcement was replaced: {ann}");
    }

    // The devices still report fine afterwards.
    wait_until(REPORT, "both statuses converged", || {
        Ok(converged_on(&f.retained_status("gw-1")?, &f.commit)
            && converged_on(&f.retained_status("gw-2")?, &f.commit))
    })?;
    Ok(())
}

/// Logs in with gw-1's credentials but gw-2's client id and tries to write gw-2's status:
/// the ACL is keyed on the username (`%u`, which the broker authenticates), not on the
/// client id (`%c`, which a device chooses), so this must fail.
#[test]
fn a_device_cannot_take_another_devices_client_id() -> Result<()> {
    let f = acl_fleet(ACL)?;
    // gw-1's credentials, but gw-2's client id: `%c` in the ACL would grant gw-2's rights.
    let impostor = f.broker.client_as("gw-1", "gw-1-pw").with_client_id("gw-2");
    let watch = f.observer().subscribe("fleet/acme/devices/+/+")?;
    let _ = impostor.publish(&f.fleet.topic("gw-2", "status"), r#"{"spoofed":true}"#, true);
    // A marker published after the attempt: once it arrived, the attempt was handled.
    f.as_gw1().publish(&f.fleet.topic("gw-1", "events"), r#"{"probe":"marker"}"#, false)?;
    watch.wait_for(secs(10), "the marker", |m| m.text().contains("marker"))?;
    let status = f.retained_status("gw-2")?;
    ensure!(
        converged_on(&status, &f.commit) && watch.messages().iter().all(|m| !m.text().contains("spoofed")),
        "a device logged in as gw-1 wrote gw-2's status by using client id gw-2: an ACL that \
         matches %c (the client id, which a device chooses) does not confine devices; status now: {status}"
    );
    Ok(())
}
