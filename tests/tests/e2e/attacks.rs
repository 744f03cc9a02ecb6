//! Scenario 5: attacks and bad input. Each bad bundle is announced the way an attacker
//! who can publish on the broker would (a retained announcement naming a bundle on a
//! server they control), to a device that runs a good version 2 after a version 1.
//! Every one is refused: nothing on the device changes, and the reason code is in the
//! status (`last_error`) and in a `bundle_rejected` event.
//!
//! Bad bundles are crafted with fleet-spec's own bundle code (`bundle::build`,
//! `manifest_for`, `assemble`) and zstd, signed with the fleet's real key unless the
//! attack is about the key. A broken fleet repository is caught earlier: `build` fails
//! with file and line and nothing is published.

use std::collections::BTreeMap;
use std::fs;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::{last_error_code, now_unix, sha256_hex, state};
use fleet_e2e::{Device, DeviceWatch, FleetRepo, IndexEntry, Mosquitto};
use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::messages::Announcement;
use fleet_spec::model::{DesiredState, ManagedFile};
use fleet_spec::SigningKey;
use serde_json::Value;

use crate::common::*;

/// A device that applied version 1 and then version 2 of app `conf`, and the fleet
/// (with a second device, `gw-2`, that has no agent here).
/// (Fields drop in order: the agent stops before its broker and files go away.)
struct Target {
    device: Device,
    watch: DeviceWatch,
    broker: Mosquitto,
    fleet: FleetRepo,
    v1: IndexEntry,
    v2: IndexEntry,
    before: Snapshot,
}

fn target() -> Result<Target> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[("site", "berlin")])?;
    fleet.add_device("gw-2", &[("site", "munich")])?;
    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    files_app(&fleet, "conf", None, &[("app.conf", "device = {{ device.id }}\nrelease = 1\n")])?;
    deploy(&mut fleet, &broker, &watch, &device, "release 1")?;
    let v1 = fleet.entry("gw-1")?;
    files_app(&fleet, "conf", None, &[("app.conf", "device = {{ device.id }}\nrelease = 2\n")])?;
    deploy(&mut fleet, &broker, &watch, &device, "release 2")?;
    let v2 = fleet.entry("gw-1")?;
    let before = Snapshot::take(&device)?;
    Ok(Target { broker, fleet, device, watch, v1, v2, before })
}

/// What the device holds: the applied bundle, the trust state, and the content hash of
/// every managed file on disk.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    applied: Value,
    trust: Value,
    files: BTreeMap<String, Option<String>>,
}

impl Snapshot {
    fn take(device: &Device) -> Result<Snapshot> {
        let local = device.local_status()?;
        let managed = local["managed_files"].as_object().context("managed_files")?;
        let files = managed.keys().map(|path| (path.clone(), device.sha256(path))).collect();
        Ok(Snapshot { applied: local["applied"].clone(), trust: local["trust"].clone(), files })
    }
}

impl Target {
    fn key(&self) -> Result<SigningKey> {
        self.fleet.signing_key()
    }

    /// A version newer than anything the device accepted.
    fn newer(&self, by: u64) -> u64 {
        self.v2.version + by
    }

    /// Serves `served` as `name` and announces it to gw-1 as the bundle `bytes` (the
    /// digest and size an attacker would claim) with `version`; returns the digest.
    fn announce_as(&self, name: &str, bytes: &[u8], served: &[u8], version: u64) -> Result<String> {
        let url = self.fleet.serve_extra(name, served)?;
        let digest = sha256_hex(bytes);
        let ann = Announcement {
            fleet: "acme".into(),
            device: "gw-1".into(),
            version,
            commit: "a77ac4".repeat(6) + "aaaa",
            digest: digest.clone(),
            size: bytes.len() as u64,
            urls: vec![url],
            mqtt_blob: false,
        };
        self.fleet.announce(&self.broker.client(), &ann)?;
        Ok(digest)
    }

    fn announce(&self, name: &str, bytes: &[u8], version: u64) -> Result<String> {
        self.announce_as(name, bytes, bytes, version)
    }

    /// Waits for the rejection of bundle `digest` with `code` in an event and in the
    /// status, then checks that nothing on the device changed.
    fn expect_rejected(&self, digest: &str, code: &str) -> Result<()> {
        let event = self
            .watch
            .wait_event(REPORT, &format!("bundle_rejected {code}"), |e| {
                e["event"] == "bundle_rejected" && e["digest"] == digest
            })
            .with_context(|| self.device.log_tail())?;
        assert_eq!(event["code"], code, "{event}");
        assert!(event["reason"].as_str().is_some_and(|r| !r.is_empty()), "{event}");
        // The status once this bundle was handled (an earlier rejection may have left
        // the same code behind).
        let status = self.watch.wait_status(REPORT, &format!("status failed with {code}"), |s| {
            state(s) == "failed" && last_error_code(s) == Some(code) && s["desired"]["digest"] == digest
        })?;
        assert_eq!(state(&status), "failed", "{status}");
        assert_eq!(status["applied"]["digest"], self.v2.digest.as_str(), "{status}");
        self.assert_unchanged()
    }

    /// Whether the device remembers bytes with this digest as refused for good.
    fn is_rejected(&self, digest: &str) -> Result<bool> {
        let rejected = fs::read_to_string(self.device.state_dir().join("rejected.json")).unwrap_or_default();
        Ok(rejected.contains(digest))
    }

    fn assert_unchanged(&self) -> Result<()> {
        let now = Snapshot::take(&self.device)?;
        ensure!(now == self.before, "the device changed:\nbefore {:?}\nafter  {now:?}", self.before);
        assert_file(&self.device, &self.fleet.app_file("conf", "app.conf"), "device = gw-1\nrelease = 2\n");
        ensure!(
            self.watch.events_of("apply_started").len() == 2,
            "an attack started an apply: {}",
            self.watch.describe()
        );
        Ok(())
    }
}

/// A state with one file at `path`.
fn state_with_file(path: &str, content: &str) -> DesiredState {
    DesiredState {
        files: vec![ManagedFile {
            path: path.into(),
            mode: 0o644,
            owner: None,
            content: content.as_bytes().to_vec(),
        }],
        ..Default::default()
    }
}

fn meta(device: &str, version: u64, expires_at: i64) -> BundleMeta {
    let now = now_unix();
    BundleMeta {
        fleet: "acme".into(),
        device: device.into(),
        version,
        commit: "a77ac4".repeat(6) + "aaaa",
        subject: "crafted by the test".into(),
        created_at: now - 60,
        expires_at,
    }
}

/// A well-formed bundle for gw-1 that sets its app.conf to `content`, signed by `key`.
fn crafted(t: &Target, key: &SigningKey, version: u64, content: &str) -> Vec<u8> {
    let state = state_with_file(&t.fleet.app_file("conf", "app.conf"), content);
    bundle::build(meta("gw-1", version, now_unix() + 86_400), &state, &[key], 3)
}

#[test]
fn tampered_payload_is_rejected() -> Result<()> {
    let t = target()?;
    let mut bytes = crafted(&t, &t.key()?, t.newer(1), "release = evil\n");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let digest = t.announce("tampered.bundle", &bytes, t.newer(1))?;
    t.expect_rejected(&digest, "payload_digest")
}

#[test]
fn tampered_manifest_is_rejected() -> Result<()> {
    let t = target()?;
    let good = crafted(&t, &t.key()?, t.newer(1), "release = evil\n");
    // The manifest holds the subject "crafted by the test": change one letter of it.
    let at = good.windows(7).position(|w| w == b"crafted").context("subject in the manifest")?;
    let mut bytes = good.clone();
    bytes[at] = b'C';
    let digest = t.announce("manifest.bundle", &bytes, t.newer(1))?;
    t.expect_rejected(&digest, "bad_signature")
}

#[test]
fn bundle_signed_by_an_unknown_key_is_rejected() -> Result<()> {
    let t = target()?;
    let stranger = SigningKey::from_seed(&[42; 32]);
    let bytes = crafted(&t, &stranger, t.newer(1), "release = evil\n");
    let digest = t.announce("stranger.bundle", &bytes, t.newer(1))?;
    t.expect_rejected(&digest, "unknown_key")
}

#[test]
fn replayed_older_bundle_is_rejected() -> Result<()> {
    let t = target()?;
    let old = fs::read(t.fleet.bundle_path(&t.v1.digest))?;
    let old_path = format!("/bundles/{}.bundle", t.v1.digest);
    let fetches = |t: &Target| t.fleet.server().requests().iter().filter(|r| r.path == old_path).count();
    let fetched_before = fetches(&t);
    // Replayed as it was announced. The version in an announcement is unsigned, so the
    // agent does not judge it: it downloads the bytes once, and the signed manifest
    // tells the truth.
    let honest = Announcement {
        fleet: "acme".into(),
        device: "gw-1".into(),
        version: t.v1.version,
        commit: t.v1.commit.clone(),
        digest: t.v1.digest.clone(),
        size: t.v1.size,
        urls: vec![format!("{}{old_path}", t.fleet.base_url())],
        mqtt_blob: false,
    };
    t.fleet.announce(&t.broker.client(), &honest)?;
    t.expect_rejected(&t.v1.digest, "not_newer")?;
    assert_eq!(fetches(&t), fetched_before + 1, "downloaded once");
    // Replayed again with a lie about its version, from elsewhere: the same bytes were
    // refused already, so they are not even downloaded.
    let replay_path = "/replay.bundle";
    let digest = t.announce("replay.bundle", &old, t.newer(100))?;
    assert_eq!(digest, t.v1.digest);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let replays = t.fleet.server().requests().iter().filter(|r| r.path == replay_path).count();
    assert_eq!(replays, 0, "refused bytes were downloaded again");
    t.assert_unchanged()
}

/// Hardening I, case 10: expiry is judged by a clock, and the device's may run fast, so
/// an expired bundle is deferred (re-checked later), never blacklisted.
#[test]
fn expired_bundle_is_refused_but_not_blacklisted() -> Result<()> {
    let t = target()?;
    let state = state_with_file(&t.fleet.app_file("conf", "app.conf"), "release = frozen\n");
    let bytes = bundle::build(meta("gw-1", t.newer(1), now_unix() - 60), &state, &[&t.key()?], 3);
    let digest = t.announce("expired.bundle", &bytes, t.newer(1))?;
    t.watch
        .wait_status(REPORT, "status with last_error expired", |s| last_error_code(s) == Some("expired"))
        .with_context(|| t.device.log_tail())?;
    t.assert_unchanged()?;
    ensure!(!t.is_rejected(&digest)?, "an expired bundle was blacklisted");
    Ok(())
}

#[test]
fn bundle_for_another_device_is_rejected() -> Result<()> {
    let t = target()?;
    // gw-2's real bundle, built and signed by the fleet's pipeline.
    let theirs = t.fleet.bundle_of("gw-2")?;
    let digest = t.announce("gw-2.bundle", &theirs, t.newer(1))?;
    t.expect_rejected(&digest, "wrong_device")
}

#[test]
fn truncated_bundle_is_rejected() -> Result<()> {
    let t = target()?;
    // A validly signed bundle cut short, announced under its own (cut) digest.
    let full = crafted(&t, &t.key()?, t.newer(1), &"release = 3\n".repeat(200));
    let cut = &full[..full.len() - 10];
    let digest = t.announce("cut.bundle", cut, t.newer(1))?;
    t.expect_rejected(&digest, "size_mismatch")
}

/// Hardening I, case 1: a server that has only half of a bundle is that server's
/// failure: reported, nothing changed, and the digest is not blacklisted (the genuine
/// bytes from another source would still apply).
#[test]
fn truncated_download_is_refused_and_reported_but_not_blacklisted() -> Result<()> {
    let t = target()?;
    // The server holds only half of the announced bundle (a download cut short for good).
    let full = crafted(&t, &t.key()?, t.newer(1), &"release = 3\n".repeat(200));
    let digest = t.announce_as("half.bundle", &full, &full[..full.len() / 2], t.newer(1))?;
    let status = t
        .watch
        .wait_status(REPORT, "status with last_error fetch_failed", |s| {
            last_error_code(s) == Some("fetch_failed")
                && s["last_error"]["message"].as_str().is_some_and(|m| m.contains(&digest))
        })
        .with_context(|| t.device.log_tail())?;
    ensure!(state(&status) != "failed", "a transport failure is not the device's state: {status}");
    t.assert_unchanged()?;
    ensure!(!t.is_rejected(&digest)?, "a transport failure blacklisted the digest");
    ensure!(t.watch.events_of("bundle_rejected").is_empty(), "{}", t.watch.describe());
    Ok(())
}

#[test]
fn decompression_bomb_is_rejected() -> Result<()> {
    let t = target()?;
    // 64 MiB of zeros compress to a few KiB; the manifest declares 1000 bytes.
    let raw = vec![0u8; 64 << 20];
    let payload = zstd::bulk::compress(&raw, 3)?;
    let mut manifest = bundle::manifest_for(meta("gw-1", t.newer(1), now_unix() + 86_400), &raw, &payload);
    manifest.uncompressed_size = 1000;
    let bytes = bundle::assemble(&manifest, 1, &payload, &[&t.key()?]);
    assert!(bytes.len() < 64 << 10, "the bomb is small on the wire: {} bytes", bytes.len());
    let digest = t.announce("bomb.bundle", &bytes, t.newer(1))?;
    t.expect_rejected(&digest, "decompression_bomb")
}

#[test]
fn validly_signed_files_outside_the_allowed_roots_are_rejected() -> Result<()> {
    let mut t = target()?;
    let outside = t.fleet.scratch("outside")?;
    let evil = outside.join("evil.conf");

    // Through the real pipeline: a commit that targets a path outside the device's
    // allowed roots builds and is signed, and the device refuses it.
    t.fleet.write(
        "apps/conf/app.yaml",
        format!(
            "files:\n  - source: app.conf\n    template: true\n  - source: evil.conf\n    target: {}\n",
            evil.display()
        ),
    )?;
    t.fleet.write("apps/conf/evil.conf", "owned = true\n")?;
    ship(&mut t.fleet, &t.broker, "deliver outside the root")?;
    let bad = t.fleet.entry("gw-1")?;
    t.expect_rejected(&bad.digest, "path_not_allowed")?;
    assert!(!evil.exists(), "{} was written", evil.display());

    // Crafted: a path that climbs out of the root with `..`.
    let climbing = format!("{}/../outside/climb.conf", t.fleet.file_root().display());
    let state = state_with_file(&climbing, "owned = true\n");
    // Its version only needs to be newer than the device's trust state (v2: the refused
    // bundle above never advanced it). Not `bad.version + 1`: the next commit's version
    // (its time in seconds) may be exactly that, and `publish` refuses to announce over a
    // retained announcement of the same version with other bytes.
    let version = t.v2.version + 1;
    let bytes = bundle::build(meta("gw-1", version, now_unix() + 86_400), &state, &[&t.key()?], 3);
    let digest = t.announce("climb.bundle", &bytes, version)?;
    t.expect_rejected(&digest, "path_not_allowed")?;
    assert!(!outside.join("climb.conf").exists(), "the climbing path was written");

    // The next good commit applies.
    files_app(&t.fleet, "conf", None, &[("app.conf", "device = {{ device.id }}\nrelease = 3\n")])?;
    t.fleet.remove("apps/conf/evil.conf")?;
    deploy(&mut t.fleet, &t.broker, &t.watch, &t.device, "release 3")?;
    assert_file(&t.device, &t.fleet.app_file("conf", "app.conf"), "device = gw-1\nrelease = 3\n");
    Ok(())
}

#[test]
fn broken_fleet_repo_fails_the_build_with_file_and_line_and_publishes_nothing() -> Result<()> {
    let mut t = target()?;
    let index_before = fs::read(t.fleet.out_dir().join("index.json"))?;
    let pointer_before = fs::read(t.fleet.out_dir().join("devices/gw-1.json"))?;
    let bundles_before = fs::read_dir(t.fleet.out_dir().join("bundles"))?.count();
    let announced_before = t.broker.client().retained(&t.fleet.topic("gw-1", "desired"))?;

    // A typo in a device file (line 3) and an unknown key in an app (line 2).
    t.fleet.write("devices/gw-1.yaml", "labels:\n  site: berlin\nvarz:\n  x: 1\n")?;
    t.fleet.write("apps/conf/app.yaml", "files:\n  - sauce: app.conf\n")?;
    t.fleet.commit("broken")?;
    let build = t.fleet.build_output(&[])?;
    assert_eq!(build.code, Some(65), "{build}");
    assert!(build.stderr.contains("devices/gw-1.yaml:3:"), "no file:line for the device file\n{build}");
    assert!(build.stderr.contains("apps/conf/app.yaml:2:"), "no file:line for the app file\n{build}");

    // Nothing was written, so nothing is published.
    assert_eq!(fs::read(t.fleet.out_dir().join("index.json"))?, index_before, "index.json changed");
    assert_eq!(
        fs::read(t.fleet.out_dir().join("devices/gw-1.json"))?,
        pointer_before,
        "the pointer file that polling devices read changed"
    );
    assert_eq!(
        fs::read_dir(t.fleet.out_dir().join("bundles"))?.count(),
        bundles_before,
        "bundles were written"
    );
    let published = t.fleet.publish(&t.broker.url())?;
    assert_eq!(published["announced"], serde_json::json!([]), "{published}");
    assert_eq!(t.broker.client().retained(&t.fleet.topic("gw-1", "desired"))?, announced_before);
    assert_eq!(t.watch.events_of("apply_started").len(), 2, "{}", t.watch.describe());
    Ok(())
}
