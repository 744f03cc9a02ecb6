//! Issue 13, enrollment: a device publishes its claim with `fleet-agent enroll` on a real
//! Mosquitto under the ACL README "Enrollment" documents, beside its own running agent
//! (whose session and last will stay untouched); `fleet-bundler enroll list` shows it
//! pending; `enroll accept` writes `devices/<id>.yaml` with its key into the work tree
//! of a real Git repository, which a commit makes `accepted`. A key rotation on the
//! device is claimed and accepted with both keys, the file's other lines kept. Hostile
//! claims are listed as invalid, never crash the listing, and a device cannot write
//! another's claim. An unreachable broker is a temporary failure (75).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::bundler;
use fleet_e2e::{free_port, Device, FleetRepo, Mosquitto};
use serde_json::Value;

/// The device rules of fleet-spec/MESSAGES.md, with the enrollment line, and accounts
/// for the bundler and an observer.
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
pattern write fleet/+/enroll/%u
";

const BUNDLER: [&str; 4] = ["--username", "bundler", "--password", "bundler-pw"];

fn list(fleet: &FleetRepo, broker: &Mosquitto) -> Result<Vec<Value>> {
    let (repo, url) = (fleet.repo_dir().to_string_lossy().into_owned(), broker.url());
    let mut args = vec!["enroll", "list", "--broker", &url, "--repo", &repo, "--json"];
    args.extend(BUNDLER);
    let out = bundler(&args)?.check()?;
    Ok(out.json()?.as_array().cloned().unwrap_or_default())
}

fn row<'a>(rows: &'a [Value], device: &str) -> Result<&'a Value> {
    rows.iter().find(|r| r["device"] == device).with_context(|| format!("no row of {device} in {rows:?}"))
}

fn accept(
    fleet: &FleetRepo,
    broker: &Mosquitto,
    device: &str,
    extra: &[&str],
) -> Result<fleet_e2e::CmdOutput> {
    let repo = fleet.repo_dir().to_string_lossy().into_owned();
    let url = broker.url();
    let mut args = vec!["enroll", "accept", device, "--broker", &url, "--repo", &repo];
    args.extend(BUNDLER);
    args.extend(extra);
    bundler(&args)
}

#[test]
fn a_device_enrolls_is_accepted_by_a_commit_and_rotates_its_key() -> Result<()> {
    let broker = Mosquitto::builder()
        .allow_anonymous(false)
        .user("bundler", "bundler-pw")
        .user("observer", "observer-pw")
        .user("gw-1", "gw-1-pw")
        .acl(ACL)
        .start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.commit("an empty fleet")?;
    // The agent runs (connected as gw-1); enrollment must not take its session over.
    let mut device = Device::builder(&fleet, "gw-1")?
        .broker(&broker.url())
        .credentials("gw-1", "gw-1-pw")
        .no_polling()
        .start()?;
    let observer = broker.client_as("observer", "observer-pw");
    let online = observer.subscribe(&fleet.topic("gw-1", "online"))?;
    online
        .wait_for(Duration::from_secs(20), "gw-1 online", |m| m.text() == "true")
        .context(device.log_tail())?;

    let out = device.cli(&["enroll", "--json"])?.check()?;
    let published = out.json()?;
    let claim = &published["claim"];
    assert_eq!(published["topic"], "fleet/acme/enroll/gw-1", "{out}");
    let key1 = claim["recipients"][0].as_str().context("a recipient")?.to_string();
    let id1 = claim["key_id"].as_str().context("a key id")?.to_string();
    assert_eq!(claim["recipients"].as_array().map(Vec::len), Some(1), "{claim}");
    let identity = device.cli(&["identity", "--json"])?.check()?.json()?;
    assert_eq!(identity["key_id"], id1.as_str(), "the claim carries the key `identity` shows");
    // The running agent kept its session: no last will ("false") was published.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        online.messages().iter().all(|m| m.text() == "true"),
        "enroll fired the agent's last will: {:?}",
        online.messages().iter().map(|m| m.text()).collect::<Vec<_>>()
    );
    ensure!(device.is_running(), "the agent stopped: {}", device.log_tail());

    // Hostile claims, and one a device tries to write for another device (the ACL drops it).
    let bundler_client = broker.client_as("bundler", "bundler-pw");
    bundler_client.publish("fleet/acme/enroll/evil", "{not json", true)?;
    let forged = claim.to_string().replace("\"gw-1\"", "\"gw-2\"");
    bundler_client.publish("fleet/acme/enroll/gw-3", &forged, true)?;
    broker.client_as("gw-1", "gw-1-pw").with_client_id("gw-1-forger").publish(
        "fleet/acme/enroll/gw-2",
        &forged,
        true,
    )?;

    let rows = list(&fleet, &broker)?;
    let gw1 = row(&rows, "gw-1")?;
    assert_eq!(gw1["valid"], true, "{gw1}");
    assert_eq!(gw1["standing"], "pending", "{gw1}");
    assert_eq!(gw1["claim"]["key_id"], id1.as_str(), "{gw1}");
    assert_eq!(gw1["claim"]["arch"], std::env::consts::ARCH, "{gw1}");
    let evil = row(&rows, "evil")?;
    assert_eq!(evil["valid"], false, "{evil}");
    assert!(evil["reason"].as_str().unwrap_or_default().starts_with("not a claim"), "{evil}");
    let gw3 = row(&rows, "gw-3")?;
    assert!(gw3["reason"].as_str().unwrap_or_default().contains("names device \"gw-2\""), "{gw3}");
    assert!(rows.iter().all(|r| r["device"] != "gw-2"), "gw-1 wrote gw-2's claim: {rows:?}");
    // The table says the same.
    let url = broker.url();
    let repo = fleet.repo_dir().to_string_lossy().into_owned();
    let mut args = vec!["enroll", "list", "--broker", url.as_str(), "--repo", repo.as_str()];
    args.extend(BUNDLER);
    let table = bundler(&args)?.check()?;
    assert!(table.stdout.contains(&id1) && table.stdout.contains("pending"), "{table}");
    assert!(table.stdout.contains("invalid claim on fleet/acme/enroll/evil"), "{table}");

    // Accept: a new device file with the key and the labels, in the work tree only.
    let out = accept(&fleet, &broker, "gw-1", &["--labels", "site=berlin"])?.check()?;
    assert!(out.stdout.contains("new device file") && out.stdout.contains("git -C"), "{out}");
    let file = fleet.read("devices/gw-1.yaml")?;
    assert_eq!(file, format!("public_key: {key1}\nlabels:\n  site: \"berlin\"\n"));
    let validate = bundler(&["validate", "--repo", &repo, "--worktree"])?;
    assert_eq!(validate.code, Some(0), "{validate}");
    // The operator adds a comment and a variable, and commits.
    fleet.write("devices/gw-1.yaml", format!("# gateway, hall 1\n{file}vars:\n  hall: 1  # north\n"))?;
    fleet.commit("Enroll gw-1")?;
    assert_eq!(row(&list(&fleet, &broker)?, "gw-1")?["standing"], "accepted");
    let again = accept(&fleet, &broker, "gw-1", &[])?.check()?;
    assert!(again.stdout.contains("nothing changed"), "{again}");

    // Rotation: a new key, both claimed (newest first), the file then lists both.
    device.cli(&["identity", "--rotate"])?.check()?;
    let claim2 = device.cli(&["enroll", "--json"])?.check()?.json()?;
    let recipients: Vec<String> = serde_json::from_value(claim2["claim"]["recipients"].clone())?;
    assert_eq!(recipients.len(), 2, "{claim2}");
    assert_eq!(recipients[1], key1, "the old key comes second");
    let key2 = recipients[0].clone();
    assert_eq!(row(&list(&fleet, &broker)?, "gw-1")?["standing"], "rotation");
    let out = accept(&fleet, &broker, "gw-1", &[])?.check()?;
    assert!(out.stdout.contains(&format!("-> [{key2}, {key1}]")), "{out}");
    assert_eq!(
        fleet.read("devices/gw-1.yaml")?,
        format!("# gateway, hall 1\npublic_key: [{key2}, {key1}]\nlabels:\n  site: \"berlin\"\nvars:\n  hall: 1  # north\n")
    );
    fleet.commit("gw-1 rotates its key")?;
    assert_eq!(row(&list(&fleet, &broker)?, "gw-1")?["standing"], "accepted");

    // The old key leaves the repository, then the device.
    let old_id = device.cli(&["identity", "--json"])?.check()?.json()?["keys"][1]["key_id"]
        .as_str()
        .context("the old key's id")?
        .to_string();
    assert_eq!(old_id, id1);
    device.cli(&["identity", "--retire", &old_id])?.check()?;
    let claim3 = device.cli(&["enroll", "--json"])?.check()?.json()?;
    assert_eq!(claim3["claim"]["recipients"], serde_json::json!([key2]), "{claim3}");
    let out = accept(&fleet, &broker, "gw-1", &[])?.check()?;
    assert!(out.stdout.contains(&format!("-> {key2}")), "{out}");

    // No claim, or a broker that is not there.
    let none = accept(&fleet, &broker, "gw-9", &[])?;
    assert_eq!(none.code, Some(1), "{none}");
    assert!(none.stderr.contains("no enrollment claim of gw-9"), "{none}");
    let offline =
        Device::builder(&fleet, "gw-2")?.broker(&format!("mqtt://127.0.0.1:{}", free_port())).create()?;
    let out = offline.cli(&["enroll", "--timeout", "2"])?;
    assert_eq!(out.code, Some(75), "{out}");
    assert!(out.stderr.contains("did not acknowledge"), "{out}");
    device.stop();
    Ok(())
}
