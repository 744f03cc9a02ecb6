//! The agent driven with the in-memory `FakeEngine`, a temp-dir filesystem and paused
//! tokio time: the apply path, health and rollback, rejected bundles, file safety,
//! drift repair, and recovery from a crash at every journal record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::keys::SigningKey;
use fleet_spec::messages::{Announcement, DeviceState, DriftKind, EventKind};
use fleet_spec::model::{
    ContainerSpec, Dependency, DependencyCondition, DesiredState, Healthcheck, Hook, ImageRef, ManagedFile,
    Mount, MountSource, NetworkAttachment, NetworkSpec, RestartPolicy, VolumeSpec,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::*;
use crate::clock::TokioClock;
use crate::config::Config;
use crate::engine::fake::{Call, FakeEngine};
use crate::engine::{Health, LABEL_SPEC_HASH};

#[path = "artifact_tests.rs"]
mod artifacts;

const NOW: i64 = 1_800_000_000;
const IMAGE: &str = "registry.local:5000/app:1";

struct H {
    /// Dropped before `_dir`: unmounts the small disk of [`H::on_small_disk`].
    _mount: Option<Unmount>,
    _dir: tempfile::TempDir,
    root: PathBuf,
    cfg: Config,
    fake: Rc<FakeEngine>,
    clock: Rc<TokioClock>,
    key: SigningKey,
}

impl H {
    fn new() -> H {
        H::with_engine(true)
    }

    fn with_engine(engine: bool) -> H {
        H::in_dir(tempfile::tempdir().expect("tempdir"), None, engine)
    }

    /// A device whose state directory and allowed root share a disk of `kib` KiB (a
    /// tmpfs: needs root, as CI runs; `None`, said on stderr, where it cannot mount).
    fn on_small_disk(kib: u64) -> Option<H> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (not root?)");
            return None;
        }
        let mount = Unmount(dir.path().to_path_buf());
        Some(H::in_dir(dir, Some(mount), true))
    }

    fn in_dir(dir: tempfile::TempDir, mount: Option<Unmount>, engine: bool) -> H {
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir root");
        let key = SigningKey::from_seed(&[9; 32]);
        let engine_line = if engine { "" } else { "[engine]\nsocket = \"none\"\n" };
        let text = format!(
            "device = \"gw\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\nhealth_timeout_secs = 30\n[trust]\npublic_keys = [\"{}\"]\n{engine_line}",
            dir.path().join("state").display(),
            root.display(),
            key.public()
        );
        let cfg = Config::parse(&text, Path::new("/etc/agent.toml")).expect("valid config");
        H {
            _mount: mount,
            _dir: dir,
            root,
            cfg,
            fake: Rc::new(FakeEngine::with_images([IMAGE])),
            clock: Rc::new(TokioClock::starting_at(NOW)),
            key,
        }
    }

    fn agent(&self) -> (Agent<FakeEngine>, UnboundedReceiver<Report>) {
        let (tx, rx) = unbounded_channel();
        let agent =
            Agent::new(self.cfg.clone(), self.fake.clone(), self.clock.clone(), Some(tx)).expect("agent");
        (agent, rx)
    }

    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root.display())
    }

    fn file(&self, rel: &str, content: &str) -> ManagedFile {
        ManagedFile { path: self.path(rel), mode: 0o644, owner: None, content: content.as_bytes().to_vec() }
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    fn bundle(&self, version: u64, state: &DesiredState) -> Vec<u8> {
        self.bundle_with(version, state, &self.key, "gw", NOW + 86_400)
    }

    fn bundle_with(
        &self,
        version: u64,
        state: &DesiredState,
        key: &SigningKey,
        device: &str,
        expires_at: i64,
    ) -> Vec<u8> {
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: device.into(),
            version,
            commit: format!("c{version}"),
            subject: "test".into(),
            created_at: NOW - 60,
            expires_at,
        };
        bundle::build(meta, state, &[key], 3)
    }
}

fn container(name: &str, healthcheck: bool) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        app: "app".into(),
        service: name.into(),
        image: ImageRef { reference: IMAGE.into(), digest: None },
        restart: RestartPolicy::Always,
        networks: vec![NetworkAttachment { network: "app_default".into(), aliases: vec![name.into()] }],
        healthcheck: healthcheck
            .then(|| Healthcheck { test: vec!["CMD".into(), "true".into()], ..Default::default() }),
        ..Default::default()
    }
}

fn state(files: Vec<ManagedFile>, containers: Vec<ContainerSpec>) -> DesiredState {
    let mut s = DesiredState {
        files,
        containers,
        networks: vec![NetworkSpec { name: "app_default".into(), ..Default::default() }],
        volumes: vec![],
        ..Default::default()
    };
    s.canonicalize();
    s
}

fn drain(rx: &mut UnboundedReceiver<Report>) -> Vec<Report> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

fn events(reports: &[Report]) -> Vec<EventKind> {
    reports
        .iter()
        .filter_map(|r| match r {
            Report::Event(e) => Some(e.kind.clone()),
            Report::Status(_) => None,
        })
        .collect()
}

/// The distinct consecutive device states reported.
fn states(reports: &[Report]) -> Vec<DeviceState> {
    let mut out: Vec<DeviceState> = Vec::new();
    for r in reports {
        if let Report::Status(s) = r {
            if out.last() != Some(&s.state) {
                out.push(s.state);
            }
        }
    }
    out
}

fn spec_hash(fake: &FakeEngine, name: &str) -> Option<String> {
    fake.container(name).and_then(|c| c.labels.get(LABEL_SPEC_HASH).cloned())
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the disk holding `dir` to the last byte; remove the returned file to free it.
fn fill_disk(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path).expect("create the ballast");
    for chunk in [64 * 1024, 4096, 512, 1] {
        let buf = vec![0u8; chunk];
        while file.write_all(&buf).is_ok() {}
    }
    path
}

fn v1(h: &H) -> DesiredState {
    state(vec![h.file("app/a.conf", "a1"), h.file("app/b.conf", "b1")], vec![container("app-web", false)])
}

async fn commit_v1(h: &H, agent: &mut Agent<FakeEngine>) {
    let outcome = agent.apply_bundle(&h.bundle(1, &v1(h))).await.expect("apply v1");
    assert_eq!(outcome, Outcome::Committed { version: 1 });
}

/// `base` plus a one-shot container, `app-once`, that [`exit_once_soon`] makes exit: an
/// update that fails its health.
fn with_failing_container(mut base: DesiredState) -> DesiredState {
    let mut once = container("app-once", false);
    once.restart = RestartPolicy::No;
    base.containers.push(once);
    base.canonicalize();
    base
}

/// Two seconds into an apply, `app-once` exits with code 3.
async fn exit_once_soon(h: &H) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.fake.exit("app-once", 3);
}

#[tokio::test(start_paused = true)]
async fn applies_files_and_containers_then_commits() {
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut s = v1(&h);
    s.containers.push(container("app-db", true));
    s.volumes.push(VolumeSpec { name: "app_data".into(), ..Default::default() });
    s.containers[0].mounts.push(Mount {
        source: MountSource::Volume("app_data".into()),
        target: "/d".into(),
        read_only: false,
    });
    s.canonicalize();
    let bytes = h.bundle(1, &s);
    let healthy_later = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        h.fake.set_health("app-db", Health::Healthy);
    };
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bytes), healthy_later);
    assert_eq!(outcome.expect("apply"), Outcome::Committed { version: 1 });

    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"));
    assert_eq!(h.read("app/b.conf").as_deref(), Some("b1"));
    for c in &s.containers {
        let got = h.fake.container(&c.name).expect("created");
        assert!(got.running, "{} runs", c.name);
        assert_eq!(spec_hash(&h.fake, &c.name), Some(s.container_hash(c)));
    }
    assert!(h.fake.network_names().contains(&"app_default".to_string()));
    assert!(h.fake.volume_names().contains(&"app_data".to_string()));
    assert!(
        !h.fake.calls().iter().any(|c| matches!(c, Call::Pull { .. })),
        "a present image is never pulled"
    );

    let store = agent.store();
    assert_eq!(store.trust().expect("trust").last_version, Some(1));
    assert_eq!(store.applied().expect("applied").expect("some").version, 1);
    assert!(
        Journal::read(&store.journal_path()).expect("journal").is_empty(),
        "journal emptied after commit"
    );
    assert_eq!(store.managed().expect("managed").len(), 2);

    let reports = drain(&mut rx);
    assert_eq!(
        states(&reports),
        [
            DeviceState::Idle,
            DeviceState::Downloading,
            DeviceState::Applying,
            DeviceState::AwaitingHealth,
            DeviceState::Converged
        ]
    );
    let ev = events(&reports);
    assert!(matches!(ev.first(), Some(EventKind::ApplyStarted { version: 1, .. })), "{ev:?}");
    assert!(matches!(ev.last(), Some(EventKind::ApplyFinished { version: 1, .. })), "{ev:?}");
    let status = agent.status_report();
    assert_eq!(status.state, DeviceState::Converged);
    assert_eq!(status.applied.expect("applied").version, 1);
    assert_eq!(status.containers.len(), 2);
    assert_eq!(status.files.managed, 2);
    assert!(status.last_error.is_none());
}

#[tokio::test(start_paused = true)]
async fn health_timeout_rolls_back_to_the_last_good_state_and_never_retries_the_bad_bundle() {
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let good = v1(&h);
    let web_hash = good.container_hash(&good.containers[0]);

    // v2 edits a.conf, drops b.conf, adds c.conf and changes the container to one whose
    // healthcheck never passes.
    let bad =
        state(vec![h.file("app/a.conf", "a2"), h.file("app/c.conf", "c2")], vec![container("app-web", true)]);
    let bad_bytes = h.bundle(2, &bad);
    drain(&mut rx);
    let start = tokio::time::Instant::now();
    let outcome = agent.apply_bundle(&bad_bytes).await.expect("apply v2");
    assert!(matches!(&outcome, Outcome::RolledBack { code, .. } if code == "health_timeout"), "{outcome:?}");
    assert!(start.elapsed() >= Duration::from_secs(30), "waited the health timeout");

    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"), "edited file restored");
    assert_eq!(h.read("app/b.conf").as_deref(), Some("b1"), "removed file restored");
    assert_eq!(h.read("app/c.conf"), None, "file only the bad bundle added is deleted");
    assert_eq!(spec_hash(&h.fake, "app-web"), Some(web_hash), "container back to the good spec");
    assert!(h.fake.container("app-web").expect("exists").running);

    let digest = bundle::content_address(&bad_bytes);
    let rejected = agent.store().rejected().expect("rejected");
    assert_eq!(rejected.get(&digest).map(|r| r.code.as_str()), Some("health_timeout"));
    let status = agent.status_report();
    assert_eq!(status.state, DeviceState::RolledBack);
    assert_eq!(status.last_error.as_ref().map(|e| e.code.as_str()), Some("health_timeout"));
    assert_eq!(status.applied.as_ref().map(|a| a.version), Some(1));
    let ev = events(&drain(&mut rx));
    assert!(ev
        .iter()
        .any(|e| matches!(e, EventKind::ApplyFailed { version: 2, code, .. } if code == "health_timeout")));
    assert!(ev
        .iter()
        .any(|e| matches!(e, EventKind::RolledBack { from_version: 2, to_version: Some(1), .. })));

    // The bad bundle is not fetched again...
    let ann = Announcement {
        fleet: "acme".into(),
        device: "gw".into(),
        version: 2,
        commit: "c2".into(),
        digest: digest.clone(),
        size: bad_bytes.len() as u64,
        urls: vec![],
        mqtt_blob: false,
    };
    assert_eq!(agent.offer(&ann).expect("offer"), Offer::Skip("rejected before"));
    assert!(matches!(agent.apply_bundle(&bad_bytes).await.expect("again"), Outcome::Rejected { .. }));
    // ...but a newer one is tried normally.
    let fixed = state(vec![h.file("app/a.conf", "a3")], vec![container("app-web", false)]);
    assert_eq!(
        agent.apply_bundle(&h.bundle(3, &fixed)).await.expect("v3"),
        Outcome::Committed { version: 3 }
    );
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a3"));
    assert_eq!(h.read("app/b.conf"), None, "b.conf no longer desired");
}

#[tokio::test(start_paused = true)]
async fn a_container_that_exits_fails_fast_with_its_reason() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let bytes = h.bundle(2, &with_failing_container(v1(&h)));
    let start = tokio::time::Instant::now();
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bytes), exit_once_soon(&h));
    let outcome = outcome.expect("apply");
    assert!(
        matches!(&outcome, Outcome::RolledBack { code, .. } if code == "container_exited"),
        "{outcome:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(10), "did not wait for the timeout");
    assert!(h.fake.container("app-once").is_none(), "the container only the bad bundle had is removed");
}

#[tokio::test(start_paused = true)]
async fn a_failed_pull_changes_nothing_and_is_retried() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut s = v1(&h);
    s.containers[0].image.reference = "registry.local:5000/other:2".into();
    let bytes = h.bundle(1, &s);
    h.fake.fail_pulls(true);
    let outcome = agent.apply_bundle(&bytes).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "pull_failed"), "{outcome:?}");
    assert_eq!(h.read("app/a.conf"), None, "no file written");
    assert!(h.fake.container_names().is_empty());
    assert_eq!(agent.store().trust().expect("trust").last_version, None, "trust not advanced");
    assert!(agent.store().rejected().expect("rejected").is_empty(), "not rejected: it may work later");
    assert_eq!(agent.status_report().state, DeviceState::Failed);
    h.fake.fail_pulls(false);
    assert_eq!(agent.apply_bundle(&bytes).await.expect("retry"), Outcome::Committed { version: 1 });
}

#[tokio::test(start_paused = true)]
async fn every_rejection_reason_changes_nothing() {
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let outside = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(outside.path(), h.root.join("escape")).expect("symlink");
    let other_key = SigningKey::from_seed(&[1; 32]);
    let good = state(vec![h.file("app/a.conf", "changed")], vec![]);
    let mut tampered = h.bundle(5, &good);
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown_key", h.bundle_with(5, &good, &other_key, "gw", NOW + 86_400)),
        ("wrong_device", h.bundle_with(5, &good, &h.key, "other", NOW + 86_400)),
        ("not_newer", h.bundle(1, &good)),
        ("truncated", h.bundle(5, &good)[..20].to_vec()),
        ("bad_magic", b"definitely not a bundle".to_vec()),
        ("payload_digest", tampered),
        (
            "path_not_allowed",
            h.bundle(
                5,
                &state(
                    vec![ManagedFile {
                        path: "/etc/passwd".into(),
                        mode: 0o644,
                        owner: None,
                        content: b"x".to_vec(),
                    }],
                    vec![],
                ),
            ),
        ),
        ("path_not_allowed", h.bundle(6, &state(vec![h.file("app/../../etc/passwd", "x")], vec![]))),
    ];
    let before_files = (h.read("app/a.conf"), h.read("app/b.conf"));
    h.fake.clear_calls();
    for (code, bytes) in cases {
        drain(&mut rx);
        let outcome = agent.apply_bundle(&bytes).await.expect("apply");
        assert!(matches!(&outcome, Outcome::Rejected { code: c, .. } if c == code), "{code}: {outcome:?}");
        assert_eq!((h.read("app/a.conf"), h.read("app/b.conf")), before_files, "{code}: files unchanged");
        assert!(h.fake.mutations().is_empty(), "{code}: engine unchanged: {:?}", h.fake.mutations());
        assert_eq!(agent.store().trust().expect("trust").last_version, Some(1), "{code}: trust unchanged");
        let reports = drain(&mut rx);
        let ev = events(&reports);
        assert!(
            ev.iter().any(|e| matches!(e, EventKind::BundleRejected { code: c, .. } if c == code)),
            "{code}: {ev:?}"
        );
        // A refused bundle never shows `applying`: checks run while `downloading`.
        // Bytes that do not verify and that nobody announced to this device leave it
        // `converged` on v1 (an event, not its state); a genuine bundle for it that
        // its config refuses makes it `failed`.
        let seen = states(&reports);
        assert!(!seen.contains(&DeviceState::Applying), "{code}: {seen:?}");
        let expected = if code == "path_not_allowed" { DeviceState::Failed } else { DeviceState::Converged };
        assert_eq!(seen.last(), Some(&expected), "{code}: {seen:?}");
        if expected == DeviceState::Converged {
            assert!(seen.iter().all(|s| *s == expected), "{code}: {seen:?}");
        }
        let status = agent.status_report();
        assert_eq!(status.state, expected, "{code}");
        assert_eq!(status.last_error.as_ref().map(|e| e.code.as_str()), Some(code));
        assert_eq!(status.applied.as_ref().map(|a| a.version), Some(1), "{code}: still on v1");
        assert!(agent.store().rejected().expect("rejected").contains_key(&bundle::content_address(&bytes)));
    }
    // A symlinked directory on the way is the device's disk, not the bundle: deferred
    // (tried again once the link is gone), and nothing changes either.
    let escape = h.bundle(7, &state(vec![h.file("app/a.conf", "a2"), h.file("escape/passwd", "x")], vec![]));
    let outcome = agent.apply_bundle(&escape).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "symlink_escape"), "{outcome:?}");
    assert_eq!((h.read("app/a.conf"), h.read("app/b.conf")), before_files, "symlink_escape: files unchanged");
    assert!(h.fake.mutations().is_empty(), "symlink_escape: engine unchanged");
    assert!(!agent.store().rejected().expect("rejected").contains_key(&bundle::content_address(&escape)));
    assert!(
        std::fs::read_dir(outside.path()).expect("ls").next().is_none(),
        "nothing written outside the root"
    );
}

// ---- secrets -------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn secrets_sealed_to_this_device_are_written_and_to_another_key_change_nothing() {
    use fleet_spec::age::SecretKey;
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let (device_key, _) = crate::identity::load_or_create(&h.cfg.state_dir, NOW).expect("identity");
    let device = fleet_spec::age::parse_recipient(&device_key.recipient()).expect("recipient");
    let sealed = |to: [u8; 32]| {
        let mut s = v1(&h);
        s.secrets.files.push(ManagedFile { mode: 0o600, ..h.file("app/token", "s3cr3t") });
        s.secrets.env.insert("app-web".into(), BTreeMap::from([("TOKEN".into(), "s3cr3t".into())]));
        s.seal(&[to], &[5; 32]);
        s
    };

    // To another key: refused for good, nothing written, and the reason names this key.
    h.fake.clear_calls();
    let other = SecretKey::from_bytes([3; 32]);
    let bytes = h.bundle(2, &sealed(*other.public_bytes()));
    let outcome = agent.apply_bundle(&bytes).await.expect("apply");
    assert!(
        matches!(&outcome, Outcome::Rejected { code, .. } if code == "secrets_undecryptable"),
        "{outcome:?}"
    );
    let reason = agent.status_report().last_error.map(|e| e.message).unwrap_or_default();
    assert!(reason.contains(&device_key.key_id()), "{reason}");
    assert_eq!(h.read("app/token"), None);
    assert!(h.fake.mutations().is_empty(), "engine unchanged");

    // To this device: the file with its mode, the variable in the container.
    let bytes = h.bundle(3, &sealed(device));
    assert!(!bytes.windows(6).any(|w| w == b"s3cr3t"), "the bundle holds no plaintext");
    assert_eq!(agent.apply_bundle(&bytes).await.expect("apply"), Outcome::Committed { version: 3 });
    assert_eq!(h.read("app/token").as_deref(), Some("s3cr3t"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(h.path("app/token")).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let created = h.fake.container("app-web").expect("app-web");
    assert_eq!(created.spec.env.get("TOKEN").map(String::as_str), Some("s3cr3t"));

    // After a restart the stored bundle is opened again with the key (recovery).
    drop(agent);
    let (mut again, _rx) = h.agent();
    again.recover().await.expect("recover with secrets");
    assert_eq!(again.status_report().applied.map(|a| a.version), Some(3));
}

// ---- Hardening I: clocks (case 10) ------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_clock_behind_checks_expiry_at_the_signed_time_floor() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    assert_eq!(agent.store().trust().expect("trust").last_known_time, NOW - 60, "the floor is created_at");
    // No RTC: the device boots in 1970. The floor stands in, and a sideload applies.
    h.clock.jump(-NOW);
    let outcome = agent.apply_bundle(&h.bundle(2, &v1(&h))).await.expect("apply");
    assert_eq!(outcome, Outcome::Committed { version: 2 });
}

#[tokio::test(start_paused = true)]
async fn a_clock_that_jumped_ahead_once_does_not_block_later_updates() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let far = NOW + 400 * 86_400;
    let first = h.bundle_with(1, &v1(&h), &h.key, "gw", far);
    h.clock.jump(30 * 86_400);
    assert_eq!(agent.apply_bundle(&first).await.expect("apply"), Outcome::Committed { version: 1 });
    // NTP puts the clock right: the next bundle is not held until the wrong date passes.
    h.clock.jump(-30 * 86_400);
    let second = h.bundle_with(2, &v1(&h), &h.key, "gw", far);
    assert_eq!(agent.apply_bundle(&second).await.expect("apply"), Outcome::Committed { version: 2 });
}

#[tokio::test(start_paused = true)]
async fn an_expired_verdict_is_deferred_and_kept_not_blacklisted() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let bytes = h.bundle_with(2, &v1(&h), &h.key, "gw", NOW + 3600);
    let digest = bundle::content_address(&bytes);
    // A clock two hours fast sees the bundle as expired.
    h.clock.jump(7200);
    let outcome = agent.apply_bundle(&bytes).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "expired"), "{outcome:?}");
    assert!(agent.store().rejected().expect("rejected").is_empty(), "not blacklisted");
    assert!(agent.store().bundle_path(&digest).exists(), "kept for the retry (case 7)");
    assert!(agent.state().is_rest());
    h.clock.jump(-7200);
    assert_eq!(agent.apply_bundle(&bytes).await.expect("retry"), Outcome::Committed { version: 2 });
}

// ---- Hardening I: unsigned input and failing disks ---------------------------------

#[tokio::test(start_paused = true)]
async fn a_fetch_failure_never_rejects_the_digest_and_a_sideload_of_it_applies() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let bytes = h.bundle(2, &state(vec![h.file("app/a.conf", "a2")], vec![]));
    let digest = bundle::content_address(&bytes);
    let outcome =
        agent.fetch_failed(&digest, "fetch_failed", "http://evil/x: 10737418240 bytes is over the limit");
    assert!(matches!(outcome, Outcome::Deferred { .. }), "{outcome:?}");
    assert!(agent.store().rejected().expect("rejected").is_empty());
    // What an older agent wrote for a transport failure is not a rejection either.
    let legacy = Rejection {
        code: "download_digest".into(),
        reason: "mismatch".into(),
        version: None,
        at: NOW,
        config: None,
    };
    agent.store().add_rejected(&digest, legacy).expect("add");
    let ann = Announcement {
        fleet: "acme".into(),
        device: "gw".into(),
        version: 2,
        commit: "c2".into(),
        digest: digest.clone(),
        size: bytes.len() as u64,
        urls: vec![],
        mqtt_blob: false,
    };
    assert_eq!(agent.offer(&ann).expect("offer"), Offer::Fetch);
    assert_eq!(agent.apply_bundle(&bytes).await.expect("sideload"), Outcome::Committed { version: 2 });
}

#[tokio::test(start_paused = true)]
async fn an_unsigned_version_or_size_in_an_announcement_refuses_nothing() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let ann = |version, size| Announcement {
        fleet: "acme".into(),
        device: "gw".into(),
        version,
        commit: "c".into(),
        digest: "ab".repeat(32),
        size,
        urls: vec![],
        mqtt_blob: false,
    };
    // A lower version than the accepted one, or a size over the limit, is only a hint.
    assert_eq!(agent.offer(&ann(0, 1)).expect("offer"), Offer::Fetch);
    assert_eq!(agent.offer(&ann(2, u64::MAX)).expect("offer"), Offer::Fetch);
}

/// A refusal of the device's own config (its policy, its roots) holds only under that
/// config: once the device allows it, the same bundle is judged again.
#[tokio::test(start_paused = true)]
async fn a_policy_refusal_is_judged_again_under_a_config_that_allows_it() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let mut s = v1(&h);
    s.containers[0].privileged = true;
    let bytes = h.bundle(2, &s);
    let outcome = agent.apply_bundle(&bytes).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Rejected { code, .. } if code == "policy_denied"), "{outcome:?}");
    let again = agent.apply_bundle(&bytes).await.expect("again");
    assert!(
        matches!(&again, Outcome::Rejected { reason, .. } if reason.starts_with("rejected before")),
        "{again:?}"
    );
    drop(agent);
    let mut h = h;
    h.cfg.engine_policy.policy.allow_privileged = true;
    let (mut agent, _rx) = h.agent();
    assert!(agent.store().rejected().expect("rejected").is_empty(), "forgotten under the new config");
    agent.recover().await.expect("recover");
    assert_eq!(agent.apply_bundle(&bytes).await.expect("allowed now"), Outcome::Committed { version: 2 });
}

#[tokio::test(start_paused = true)]
async fn a_state_dir_error_ends_in_a_rest_state_and_the_same_bundle_applies_later() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    // A failing SD card, as the agent sees it: bundles/ cannot be written.
    let bundles = agent.store().dir().join("bundles");
    std::fs::remove_dir_all(&bundles).expect("rm bundles/");
    std::fs::write(&bundles, b"not a directory").expect("plant a file");
    let bytes = h.bundle(2, &state(vec![h.file("app/a.conf", "a2")], vec![]));
    let outcome = agent.apply_bundle(&bytes).await.expect("settled, not an error");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "state_dir_error"), "{outcome:?}");
    assert!(agent.state().is_rest(), "{:?}", agent.state());
    let error = agent.status_report().last_error.expect("reported");
    assert!(!error.message.contains("not allowed in state"), "{}", error.message);
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"), "nothing changed");
    assert!(agent.store().rejected().expect("rejected").is_empty(), "the bundle is not to blame");
    // The card is replaced; the same bundle applies.
    std::fs::remove_file(&bundles).expect("rm");
    std::fs::create_dir(&bundles).expect("mkdir");
    assert_eq!(agent.apply_bundle(&bytes).await.expect("retry"), Outcome::Committed { version: 2 });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a2"));
}

/// Hardening I, case 4, on a disk that is really full (not a file planted in the state
/// directory): the apply ends at rest with a reason, and once space is freed the same
/// bundle applies.
#[tokio::test(start_paused = true)]
async fn a_full_disk_ends_the_apply_at_rest_and_the_same_bundle_applies_once_space_is_freed() {
    let Some(h) = H::on_small_disk(2048) else { return };
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let ballast = fill_disk(h._dir.path());
    let big = "x".repeat(64 * 1024);
    let v2 = state(
        vec![h.file("app/a.conf", "a2"), h.file("app/b.conf", "b1"), h.file("app/big.bin", &big)],
        vec![container("app-web", false)],
    );
    let bytes = h.bundle(2, &v2);
    let outcome = agent.apply_bundle(&bytes).await.expect("settled, not an error");
    assert!(!matches!(outcome, Outcome::Committed { .. }), "{outcome:?}");
    assert!(agent.state().is_rest(), "{:?}", agent.state());
    let error = agent.status_report().last_error.expect("reported");
    assert!(!error.message.contains("not allowed in state"), "{}", error.message);
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"), "v1 still in place");
    assert!(h.read("app/big.bin").is_none());
    let digest = bundle::content_address(&bytes);
    assert!(
        !agent.store().rejected().unwrap_or_default().contains_key(&digest),
        "the bundle is not to blame"
    );

    std::fs::remove_file(&ballast).expect("free the disk");
    assert_eq!(agent.apply_bundle(&bytes).await.expect("retry"), Outcome::Committed { version: 2 });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a2"));
}

/// Hardening I, case 5, on a disk that fills up during the update: whatever the rollback
/// could not finish, the agent rests, and a newer bundle is applied (fix forward) once
/// there is space again.
#[tokio::test(start_paused = true)]
async fn a_rollback_on_a_full_disk_does_not_refuse_the_fix_forward() {
    let Some(h) = H::on_small_disk(2048) else { return };
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let mut bad = with_failing_container(v1(&h));
    bad.files[0].content = b"a2".to_vec();
    let bad_bytes = h.bundle(2, &bad);
    let ballast = h._dir.path().join("ballast");
    // The container exits, and the disk is full when the rollback starts.
    let sabotage = async {
        exit_once_soon(&h).await;
        fill_disk(h._dir.path());
    };
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bad_bytes), sabotage);
    let outcome = outcome.expect("settled, not an error");
    assert!(!matches!(outcome, Outcome::Committed { .. }), "{outcome:?}");
    assert!(agent.state().is_rest(), "{:?}", agent.state());
    std::fs::remove_file(&ballast).expect("free the disk");
    let fix = state(
        vec![h.file("app/a.conf", "a3"), h.file("app/b.conf", "b1")],
        vec![container("app-web", false)],
    );
    let outcome = agent.apply_bundle(&h.bundle(3, &fix)).await.expect("fix forward");
    assert_eq!(outcome, Outcome::Committed { version: 3 });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a3"));
    assert!(h.fake.container("app-once").is_none(), "the failed bundle's container is gone");
}

#[tokio::test(start_paused = true)]
async fn a_stuck_rollback_does_not_refuse_the_fix_forward() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let bad = with_failing_container(v1(&h));
    // The container exits, and the engine is gone when the rollback starts.
    let sabotage = async {
        exit_once_soon(&h).await;
        h.fake.set_unreachable(true);
    };
    let bad_bytes = h.bundle(2, &bad);
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bad_bytes), sabotage);
    let outcome = outcome.expect("settled");
    assert!(matches!(&outcome, Outcome::RollbackIncomplete { .. }), "{outcome:?}");
    assert!(agent.state().is_rest(), "a stuck rollback rests in failed: {:?}", agent.state());
    assert_eq!(agent.status_report().state, DeviceState::Degraded, "rests; the engine is down");
    // The engine is back and the fix is published: it is taken, not refused as "busy".
    h.fake.set_unreachable(false);
    let fix = state(
        vec![h.file("app/a.conf", "a3"), h.file("app/b.conf", "b1")],
        vec![container("app-web", false)],
    );
    let outcome = agent.apply_bundle(&h.bundle(3, &fix)).await.expect("fix forward");
    assert_eq!(outcome, Outcome::Committed { version: 3 });
    assert!(h.fake.container("app-once").is_none(), "the failed bundle's container is gone");
    assert!(Journal::read(&agent.store().journal_path()).expect("read").is_empty());
    // The failed bundle stays refused.
    let again = agent.apply_bundle(&h.bundle(2, &bad)).await.expect("again");
    assert!(matches!(again, Outcome::Rejected { .. }), "{again:?}");
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_the_journal_begin_and_the_trust_state_still_converges() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let v2 = state(vec![h.file("app/a.conf", "a2")], vec![container("app-web", false)]);
    agent.crash_after_begin();
    assert!(agent.apply_bundle(&h.bundle(2, &v2)).await.is_err(), "the process died");
    drop(agent);
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    assert_eq!(agent.applied_digest(), Some(bundle::content_address(&h.bundle(2, &v2)).as_str()));
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a2"));
    assert_eq!(agent.store().trust().expect("trust").last_version, Some(2), "trust raised by recovery");
    let replay = agent.apply_bundle(&h.bundle(1, &v1(&h))).await.expect("replay");
    assert!(matches!(&replay, Outcome::Rejected { code, .. } if code == "not_newer"), "{replay:?}");
}

#[tokio::test(start_paused = true)]
async fn a_last_good_bundle_that_cannot_be_read_is_never_rolled_back_to_nothing() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let digest = agent.applied_digest().expect("applied").to_string();
    drop(agent);
    // The card damaged the stored last good bundle.
    std::fs::write(h.cfg.state_dir.join("bundles").join(format!("{digest}.bundle")), b"garbage")
        .expect("damage");
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    assert_eq!(agent.status_report().state, DeviceState::Degraded);
    // An update that fails its health "rolls back": nothing of v1 is deleted.
    let mut bad = v1(&h);
    bad.files = vec![h.file("app/a.conf", "a2"), h.file("app/b.conf", "b1")];
    let bad_bytes = h.bundle(2, &with_failing_container(bad));
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bad_bytes), exit_once_soon(&h));
    let outcome = outcome.expect("settled");
    assert!(!matches!(outcome, Outcome::RolledBack { .. }), "{outcome:?}");
    assert_eq!(h.read("app/b.conf").as_deref(), Some("b1"), "no managed file deleted");
    assert!(h.fake.container("app-web").is_some(), "no managed container deleted");
    assert!(agent.state().is_rest());
    assert_eq!(agent.status_report().state, DeviceState::Degraded);
}

#[tokio::test(start_paused = true)]
async fn a_last_good_bundle_whose_key_was_rotated_out_stays_the_last_good_state() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    drop(agent);
    let new_key = SigningKey::from_seed(&[7; 32]);
    let mut h = h;
    h.cfg.trusted = fleet_spec::TrustedKeys::new(vec![new_key.public()], 1).expect("keys");
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    assert_eq!(agent.status_report().applied.map(|a| a.version), Some(1));
    assert_ne!(agent.status_report().state, DeviceState::Degraded);
}

#[tokio::test(start_paused = true)]
async fn volumes_no_longer_desired_are_deleted_only_after_the_commit() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut with_volume = v1(&h);
    with_volume.volumes.push(VolumeSpec { name: "app_data".into(), ..Default::default() });
    with_volume.canonicalize();
    assert_eq!(
        agent.apply_bundle(&h.bundle(1, &with_volume)).await.expect("v1"),
        Outcome::Committed { version: 1 }
    );
    // Another fleet's volume on the same engine is never ours to delete.
    h.fake.add_foreign_fleet_volume("other_data", "other");
    // v2 drops the volume and fails its health: the rollback finds the volume in place.
    let exit_soon = async {
        exit_once_soon(&h).await;
        assert!(h.fake.volume_names().contains(&"app_data".to_string()), "not deleted during the apply");
    };
    let bad_bytes = h.bundle(2, &with_failing_container(v1(&h)));
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bad_bytes), exit_soon);
    assert!(matches!(outcome.expect("settled"), Outcome::RolledBack { .. }));
    assert!(h.fake.volume_names().contains(&"app_data".to_string()), "kept through the rollback");
    // v3 drops it and commits: now it goes; the other fleet's stays.
    assert_eq!(
        agent.apply_bundle(&h.bundle(3, &v1(&h))).await.expect("v3"),
        Outcome::Committed { version: 3 }
    );
    assert!(!h.fake.volume_names().contains(&"app_data".to_string()), "deleted after the commit");
    assert!(h.fake.volume_names().contains(&"other_data".to_string()), "another fleet's volume is kept");
}

#[tokio::test(start_paused = true)]
async fn a_file_the_device_had_before_is_kept_and_put_back_when_the_bundle_lets_go() {
    use std::os::unix::fs::PermissionsExt;
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    // A provisioning certificate, there before the agent.
    let cert = h.root.join("app/device.pem");
    std::fs::write(&cert, b"the device's own certificate").expect("write");
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut takes = v1(&h);
    takes.files.push(h.file("app/device.pem", "a bundle's certificate"));
    takes.canonicalize();
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &takes)).await.expect("v2"),
        Outcome::Committed { version: 2 }
    );
    assert_eq!(h.read("app/device.pem").as_deref(), Some("a bundle's certificate"));
    // The next bundle no longer names it: the original comes back, mode and all.
    assert_eq!(
        agent.apply_bundle(&h.bundle(3, &v1(&h))).await.expect("v3"),
        Outcome::Committed { version: 3 }
    );
    assert_eq!(h.read("app/device.pem").as_deref(), Some("the device's own certificate"));
    let mode = std::fs::metadata(&cert).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    // And a rollback of a bundle that took it over puts it back too.
    let bad_bytes = h.bundle(4, &with_failing_container(takes.clone()));
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bad_bytes), exit_once_soon(&h));
    assert!(matches!(outcome.expect("settled"), Outcome::RolledBack { .. }));
    assert_eq!(h.read("app/device.pem").as_deref(), Some("the device's own certificate"));
}

#[tokio::test(start_paused = true)]
async fn containers_on_a_files_only_device_are_refused() {
    let h = H::with_engine(false);
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let outcome = agent.apply_bundle(&h.bundle(1, &v1(&h))).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Rejected { code, .. } if code == "engine_disabled"), "{outcome:?}");
    let files_only = state(vec![h.file("a", "1")], vec![]);
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &files_only)).await.expect("apply"),
        Outcome::Committed { version: 2 }
    );
}

#[tokio::test(start_paused = true)]
async fn files_and_containers_never_managed_are_never_touched() {
    let h = H::new();
    std::fs::create_dir_all(h.root.join("app")).expect("mkdir");
    std::fs::write(h.root.join("app/local.conf"), "mine").expect("write");
    h.fake.add_unmanaged("someone-elses", BTreeMap::new());
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let smaller = state(vec![h.file("app/a.conf", "a2")], vec![]);
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &smaller)).await.expect("v2"),
        Outcome::Committed { version: 2 }
    );
    assert_eq!(h.read("app/b.conf"), None, "managed and no longer desired: removed");
    assert!(h.fake.container("app-web").is_none(), "managed container no longer desired: removed");
    assert_eq!(h.read("app/local.conf").as_deref(), Some("mine"), "never managed: untouched");
    assert!(h.fake.container("someone-elses").is_some(), "foreign container untouched");
    agent.reconcile().await.expect("reconcile");
    assert_eq!(h.read("app/local.conf").as_deref(), Some("mine"));
}

#[tokio::test(start_paused = true)]
async fn drift_is_repaired_and_reported() {
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut s = v1(&h);
    s.containers.push(container("app-worker", false));
    s.canonicalize();
    assert_eq!(agent.apply_bundle(&h.bundle(1, &s)).await.expect("v1"), Outcome::Committed { version: 1 });
    assert!(agent.reconcile().await.expect("reconcile").is_empty(), "no drift, no repair");

    std::fs::write(h.path("app/a.conf"), "edited by hand").expect("edit");
    std::fs::remove_file(h.path("app/b.conf")).expect("rm");
    h.fake.kill("app-web");
    h.fake.delete("app-worker");
    drain(&mut rx);
    let repaired = agent.reconcile().await.expect("reconcile");
    let mut kinds: Vec<(DriftKind, String)> = repaired;
    kinds.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        kinds,
        [
            (DriftKind::FileChanged, h.path("app/a.conf")),
            (DriftKind::FileMissing, h.path("app/b.conf")),
            (DriftKind::ContainerStopped, "app-web".to_string()),
            (DriftKind::ContainerMissing, "app-worker".to_string()),
        ]
    );
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"));
    assert_eq!(h.read("app/b.conf").as_deref(), Some("b1"));
    assert!(h.fake.container("app-web").expect("there").running);
    assert!(h.fake.container("app-worker").expect("recreated").running);
    let ev = events(&drain(&mut rx));
    assert_eq!(ev.iter().filter(|e| matches!(e, EventKind::DriftRepaired { .. })).count(), 4);
    assert_eq!(agent.status_report().files.drift_repaired, 2);

    // A container whose spec drifted (recreated by hand with other labels) is recreated.
    h.fake.delete("app-web");
    let mut labels = plan::container_labels(&s.containers[0], "acme", "stale-hash");
    labels.insert("x".into(), "y".into());
    h.fake.create(&s.containers[0], &labels).await.expect("create");
    let repaired = agent.reconcile().await.expect("reconcile");
    assert_eq!(repaired, [(DriftKind::ContainerChanged, "app-web".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn engine_down_means_degraded_and_deferred() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    h.fake.set_unreachable(true);
    agent.reconcile().await.expect("reconcile");
    assert_eq!(agent.status_report().state, DeviceState::Degraded);
    let outcome = agent.apply_bundle(&h.bundle(2, &v1(&h))).await.expect("apply");
    assert!(
        matches!(&outcome, Outcome::Deferred { code, .. } if code == "engine_unavailable"),
        "{outcome:?}"
    );
    h.fake.set_unreachable(false);
    agent.reconcile().await.expect("reconcile");
    assert_ne!(agent.status_report().state, DeviceState::Degraded);
}

#[tokio::test(start_paused = true)]
async fn dependencies_start_first_and_healthy_conditions_are_awaited() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let db = container("app-db", true);
    let mut web = container("app-web", false);
    web.depends_on.push(Dependency { container: "app-db".into(), condition: DependencyCondition::Healthy });
    let s = state(vec![], vec![web, db]);
    let bytes = h.bundle(1, &s);
    let db_healthy = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(h.fake.container("app-web").is_none(), "web waits for db to be healthy");
        h.fake.set_health("app-db", Health::Healthy);
    };
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bytes), db_healthy);
    assert_eq!(outcome.expect("apply"), Outcome::Committed { version: 1 });
    let calls = h.fake.calls();
    let pos = |c: &Call| calls.iter().position(|x| x == c).expect("call made");
    assert!(pos(&Call::Start("app-db".into())) < pos(&Call::Create("app-web".into())));
}

/// podman without systemd runs no healthcheck by itself: the agent runs them, while it
/// waits for a dependency, while it waits for health, and at rest.
#[tokio::test(start_paused = true)]
async fn healthchecks_the_engine_does_not_run_are_run_by_the_agent() {
    let h = H::new();
    h.fake.healthchecks_by_caller(Health::Healthy, Duration::from_secs(2));
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    assert_eq!(agent.next_healthcheck(), None, "nothing to check yet");
    let db = container("app-db", true);
    let mut web = container("app-web", true);
    web.depends_on.push(Dependency { container: "app-db".into(), condition: DependencyCondition::Healthy });
    let s = state(vec![], vec![web, db]);
    let outcome = agent.apply_bundle(&h.bundle(1, &s)).await.expect("apply");
    assert_eq!(outcome, Outcome::Committed { version: 1 });
    let calls = h.fake.calls();
    let pos = |c: &Call| calls.iter().position(|x| x == c).expect("call made");
    assert!(pos(&Call::RunHealthcheck("app-db".into())) < pos(&Call::Create("app-web".into())));
    assert!(calls.contains(&Call::RunHealthcheck("app-web".into())));
    assert_eq!(h.fake.container("app-web").expect("web").health, Health::Healthy);

    // At rest, at the pace the engine asks for (here every 2 s).
    let at = agent.next_healthcheck().expect("a check is planned");
    assert!(at > tokio::time::Instant::now() && at <= tokio::time::Instant::now() + Duration::from_secs(2));
    h.fake.set_check_result("app-web", Health::Unhealthy);
    h.fake.clear_calls();
    tokio::time::sleep_until(at).await;
    agent.run_due_healthchecks().await;
    tokio::time::sleep_until(agent.next_healthcheck().expect("planned")).await;
    agent.run_due_healthchecks().await;
    assert_eq!(h.fake.container("app-web").expect("web").health, Health::Unhealthy);
    let runs = h.fake.calls().iter().filter(|c| matches!(c, Call::RunHealthcheck(_))).count();
    assert_eq!(runs, 4, "two rounds, each container once per round: {:?}", h.fake.calls());

    // An update whose healthcheck fails (the check result set above) is rolled back as
    // unhealthy, not timed out.
    let mut bad = container("app-web", true);
    bad.command = Some(vec!["serve".into(), "--broken".into()]);
    let v2 = state(vec![], vec![bad]);
    let outcome = agent.apply_bundle(&h.bundle(2, &v2)).await.expect("apply v2");
    assert!(matches!(&outcome, Outcome::RolledBack { code, .. } if code == "unhealthy"), "{outcome:?}");
}

/// `dockerd` runs its own healthchecks: the agent finds that out once and leaves them be.
#[tokio::test(start_paused = true)]
async fn an_engine_that_runs_its_own_healthchecks_is_asked_once() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let s = state(vec![], vec![container("app-db", true), container("app-web", true)]);
    let healthy_later = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        h.fake.set_health("app-db", Health::Healthy);
        h.fake.set_health("app-web", Health::Healthy);
    };
    let bytes = h.bundle(1, &s);
    let (outcome, ()) = tokio::join!(agent.apply_bundle(&bytes), healthy_later);
    assert_eq!(outcome.expect("apply"), Outcome::Committed { version: 1 });
    agent.reconcile().await.expect("reconcile");
    assert_eq!(agent.next_healthcheck(), None);
    let runs = h.fake.calls().iter().filter(|c| matches!(c, Call::RunHealthcheck(_))).count();
    assert_eq!(runs, 1);
}

/// The scenario of the crash tests: v1 is committed, then v2 is applied; v2 is either
/// healthy (commit) or not (rollback).
async fn crash_scenario(crash_at: Option<(usize, bool)>, healthy: bool) -> (H, usize) {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let v2 = state(
        vec![h.file("app/a.conf", "a2"), h.file("app/c.conf", "c2")],
        vec![container("app-web", !healthy), container("app-new", false)],
    );
    let appended_before = agent.journal_mut().appended;
    agent.journal_mut().crash_at = crash_at.map(|(at, torn)| (appended_before + at, torn));
    let result = agent.apply_bundle(&h.bundle(2, &v2)).await;
    let appended = agent.journal_mut().appended - appended_before;
    if crash_at.is_none() {
        let outcome = result.expect("no crash");
        assert_eq!(matches!(outcome, Outcome::Committed { .. }), healthy, "{outcome:?}");
    }
    drop(agent);
    (h, appended)
}

fn v2_files(h: &H) -> (Option<String>, Option<String>, Option<String>) {
    (h.read("app/a.conf"), h.read("app/b.conf"), h.read("app/c.conf"))
}

async fn assert_recovers_consistently(healthy: bool) {
    let (_, total) = crash_scenario(None, healthy).await;
    assert!(total >= 8, "the scenario journals its steps ({total} records)");
    for at in 0..=total {
        for torn in [false, true] {
            let (h, _) = crash_scenario(Some((at, torn)), healthy).await;
            let (mut agent, _rx) = h.agent();
            let outcome = agent.recover().await.unwrap_or_else(|e| panic!("crash at {at} torn={torn}: {e}"));
            let files = v2_files(&h);
            let committed_v2 = agent.store().applied().expect("applied").expect("some").version == 2;
            let why = format!("crash at record {at}/{total} torn={torn}: {outcome:?}");
            if committed_v2 {
                assert!(healthy, "{why}: an unhealthy bundle never commits");
                assert_eq!(files, (Some("a2".into()), None, Some("c2".into())), "{why}");
                assert!(h.fake.container("app-new").is_some(), "{why}");
            } else {
                assert_eq!(files, (Some("a1".into()), Some("b1".into()), None), "{why}");
                assert!(h.fake.container("app-new").is_none(), "{why}");
                let v1 = v1(&h);
                assert_eq!(
                    spec_hash(&h.fake, "app-web"),
                    Some(v1.container_hash(&v1.containers[0])),
                    "{why}"
                );
            }
            assert!(agent.state().is_rest(), "{why}: {:?}", agent.state());
            assert!(
                Journal::read(&agent.store().journal_path()).expect("read").is_empty(),
                "{why}: journal done"
            );
            let managed: Vec<String> = agent.store().managed().expect("managed").into_keys().collect();
            let expect: Vec<String> = if committed_v2 {
                vec![h.path("app/a.conf"), h.path("app/c.conf")]
            } else {
                vec![h.path("app/a.conf"), h.path("app/b.conf")]
            };
            assert_eq!(managed, expect, "{why}: managed record matches the files");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn recovery_after_a_crash_at_every_journal_record_of_a_healthy_update() {
    assert_recovers_consistently(true).await;
}

#[tokio::test(start_paused = true)]
async fn recovery_after_a_crash_at_every_journal_record_of_an_update_that_rolls_back() {
    assert_recovers_consistently(false).await;
}

#[tokio::test(start_paused = true)]
async fn new_files_are_recorded_as_managed_at_once_and_a_foreign_file_only_when_replaced() {
    let h = H::new();
    std::fs::create_dir_all(h.root.join("app")).expect("mkdir");
    std::fs::write(h.root.join("app/local.conf"), "mine").expect("write");
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    // v2 edits a.conf, adds new.conf, and takes over local.conf, which exists and was
    // never the agent's.
    let v2 = state(
        vec![h.file("app/a.conf", "a2"), h.file("app/local.conf", "taken"), h.file("app/new.conf", "n2")],
        vec![container("app-web", false)],
    );
    // Crash while journaling the first file's intent (record 0 is `begin`).
    let before = agent.journal_mut().appended;
    agent.journal_mut().crash_at = Some((before + 1, false));
    assert!(agent.apply_bundle(&h.bundle(2, &v2)).await.is_err(), "crashed");
    drop(agent);

    let managed = Store::new(&h.cfg.state_dir).managed().expect("managed");
    assert!(managed.contains_key(&h.path("app/new.conf")), "absent file recorded before any write");
    assert!(managed.contains_key(&h.path("app/a.conf")));
    assert!(
        !managed.contains_key(&h.path("app/local.conf")),
        "a foreign file is not ours before it is replaced"
    );
    assert_eq!(h.read("app/local.conf").as_deref(), Some("mine"), "nothing written yet");

    // The next start resumes the apply; then the taken-over file is ours.
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    assert_eq!(agent.store().applied().expect("applied").map(|a| a.version), Some(2));
    assert_eq!(h.read("app/local.conf").as_deref(), Some("taken"));
    assert_eq!(h.read("app/new.conf").as_deref(), Some("n2"));
    let managed: Vec<String> = agent.store().managed().expect("managed").into_keys().collect();
    assert_eq!(managed, [h.path("app/a.conf"), h.path("app/local.conf"), h.path("app/new.conf")]);
}

#[tokio::test(start_paused = true)]
async fn a_stale_bundle_fetched_after_a_newer_commit_leaves_the_device_converged() {
    // A CI run caught this: an older MQTT candidate fetched after the pointer's newer
    // bundle was committed turned a converged device `failed` (`not_newer`).
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    let old = h.bundle(2, &state(vec![h.file("app/a.conf", "two")], vec![]));
    let new = h.bundle(3, &state(vec![h.file("app/a.conf", "three")], vec![]));
    assert_eq!(agent.apply_bundle(&new).await.expect("apply"), Outcome::Committed { version: 3 });
    drain(&mut rx);
    let outcome = agent.apply_bundle(&old).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Rejected { code, .. } if code == "not_newer"), "{outcome:?}");
    let reports = drain(&mut rx);
    assert!(events(&reports).iter().any(|e| matches!(e, EventKind::BundleRejected { .. })));
    assert!(states(&reports).iter().all(|s| *s == DeviceState::Converged), "{:?}", states(&reports));
    let status = agent.status_report();
    assert_eq!(status.state, DeviceState::Converged);
    assert_eq!(status.applied.map(|a| a.version), Some(3));
    assert_eq!(h.read("app/a.conf").as_deref(), Some("three"));
}

#[tokio::test(start_paused = true)]
async fn the_desired_bundle_failing_verification_makes_the_device_failed() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let other_key = SigningKey::from_seed(&[1; 32]);
    let forged =
        h.bundle_with(5, &state(vec![h.file("app/a.conf", "x")], vec![]), &other_key, "gw", NOW + 86_400);
    let digest = bundle::content_address(&forged);
    agent.set_desired(VersionRef { version: 5, digest, commit: "c5".into() });
    let outcome = agent.apply_bundle(&forged).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Rejected { code, .. } if code == "unknown_key"), "{outcome:?}");
    let status = agent.status_report();
    assert_eq!(status.state, DeviceState::Failed, "the device cannot reach what it was told to run");
    assert_eq!(status.last_error.map(|e| e.code), Some("unknown_key".to_string()));
}

#[tokio::test(start_paused = true)]
async fn pull_policy_never_does_not_pull_a_missing_image_and_always_pulls_a_present_one() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut never = v1(&h);
    never.containers[0].image.reference = "registry.local:5000/loaded-by-hand:1".into();
    never.containers[0].options.pull_policy = Some(PullPolicy::Never);
    let outcome = agent.apply_bundle(&h.bundle(1, &never)).await.expect("apply");
    let Outcome::Deferred { code, reason } = &outcome else { panic!("{outcome:?}") };
    assert_eq!(code, "pull_failed");
    assert!(reason.contains("pull_policy is `never`"), "{reason}");
    assert!(!h.fake.calls().iter().any(|c| matches!(c, Call::Pull { .. })), "never pulled");
    assert!(h.fake.container_names().is_empty(), "nothing changed");
    // Loaded by other means, the same bundle applies.
    h.fake.add_image("registry.local:5000/loaded-by-hand:1");
    assert_eq!(
        agent.apply_bundle(&h.bundle(1, &never)).await.expect("retry"),
        Outcome::Committed { version: 1 }
    );

    let mut always = v1(&h);
    always.containers[0].options.pull_policy = Some(PullPolicy::Always);
    let reference = always.containers[0].image.pull_reference();
    h.fake.add_image(&reference);
    h.fake.clear_calls();
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &always)).await.expect("apply"),
        Outcome::Committed { version: 2 }
    );
    assert!(
        h.fake.calls().iter().any(|c| matches!(c, Call::Pull { image, .. } if *image == reference)),
        "`always` pulls on an apply even when the image is there: {:?}",
        h.fake.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_post_start_hook_rolls_the_update_back_and_pre_stop_runs_before_a_recreate() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let hook = |cmd: &str| Hook { command: vec!["sh".into(), "-c".into(), cmd.into()], ..Default::default() };
    let mut v1 = v1(&h);
    v1.containers[0].options.pre_stop = vec![hook("flush")];
    v1.containers[0].options.post_start = vec![hook("warm up")];
    assert_eq!(
        agent.apply_bundle(&h.bundle(1, &v1)).await.expect("apply"),
        Outcome::Committed { version: 1 }
    );
    assert!(h.fake.calls().contains(&Call::Exec { name: "app-web".into(), command: "sh -c warm up".into() }));

    // v2 changes the container (recreate) and its post_start fails.
    let mut v2 = v1.clone();
    v2.containers[0].env.insert("V".into(), "2".into());
    v2.containers[0].options.post_start = vec![hook("migrate")];
    h.fake.exec_result("sh -c migrate", 1);
    h.fake.clear_calls();
    let outcome = agent.apply_bundle(&h.bundle(2, &v2)).await.expect("apply");
    let Outcome::RolledBack { reason, .. } = &outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("post_start `sh -c migrate` exited with 1"), "{reason}");
    let calls = h.fake.calls();
    let flush =
        calls.iter().position(|c| *c == Call::Exec { name: "app-web".into(), command: "sh -c flush".into() });
    let removed = calls.iter().position(|c| matches!(c, Call::Remove { name, .. } if name == "app-web"));
    assert!(flush.is_some() && flush < removed, "pre_stop of the running v1 before its removal: {calls:?}");
    assert_eq!(agent.status_report().applied.map(|a| a.version), Some(1), "back on v1");
}

#[tokio::test(start_paused = true)]
async fn a_container_is_stopped_with_its_own_stop_grace_period() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut v1 = v1(&h);
    v1.containers[0].options.stop_timeout_s = Some(45);
    assert_eq!(
        agent.apply_bundle(&h.bundle(1, &v1)).await.expect("apply"),
        Outcome::Committed { version: 1 }
    );

    // v2 recreates it: the running v1 stops with its stop_grace_period, not the default.
    let mut v2 = v1.clone();
    v2.containers[0].env.insert("V".into(), "2".into());
    v2.containers[0].options.stop_timeout_s = None;
    h.fake.clear_calls();
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &v2)).await.expect("apply"),
        Outcome::Committed { version: 2 }
    );
    let graces = |calls: Vec<Call>| -> Vec<u32> {
        calls
            .into_iter()
            .filter_map(|c| if let Call::Remove { grace_secs, .. } = c { Some(grace_secs) } else { None })
            .collect()
    };
    assert_eq!(graces(h.fake.calls()), vec![45], "v1's own period");

    // v3 recreates v2, which has none: the device's engine.stop_grace_secs (10 s).
    let mut v3 = v2.clone();
    v3.containers[0].env.insert("V".into(), "3".into());
    h.fake.clear_calls();
    agent.apply_bundle(&h.bundle(3, &v3)).await.expect("apply");
    assert_eq!(graces(h.fake.calls()), vec![10], "the device's default");
}

#[test]
fn a_signed_stop_grace_period_cannot_hold_the_agent_for_hours() {
    let mut spec = ContainerSpec { name: "c".into(), ..Default::default() };
    assert_eq!(super::converge::stop_grace_secs(Some(&spec), 10), 10);
    spec.options.stop_timeout_s = Some(u64::MAX);
    assert_eq!(super::converge::stop_grace_secs(Some(&spec), 10), 15 * 60);
    assert_eq!(super::converge::stop_grace_secs(None, 7), 7);
}

/// Issue 20, point 3: a preflight refusal that comes from the device's disk (its root is
/// a file) is not the bundle's fault: deferred, not rejected, and the same bundle applies
/// once the disk is fixed.
#[tokio::test(start_paused = true)]
async fn a_root_that_is_not_a_directory_defers_the_bundle_and_the_fix_lets_it_apply() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    std::fs::remove_dir(&h.root).expect("rm root");
    std::fs::write(&h.root, b"a file where the root should be").expect("plant a file");
    let bytes = h.bundle(1, &state(vec![h.file("app/a.conf", "a1")], vec![]));
    let outcome = agent.apply_bundle(&bytes).await.expect("settled");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "file_write_failed"), "{outcome:?}");
    assert!(agent.store().rejected().expect("rejected").is_empty(), "the bundle is not to blame");
    std::fs::remove_file(&h.root).expect("rm");
    std::fs::create_dir(&h.root).expect("mkdir");
    assert_eq!(agent.apply_bundle(&bytes).await.expect("retry"), Outcome::Committed { version: 1 });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"));
}

/// `apply --json` prints `Outcome::name`: the same names as the sideload answer's tag.
#[test]
fn outcome_names_are_the_serialized_tags() {
    let all = [
        Outcome::Committed { version: 1 },
        Outcome::AlreadyApplied,
        Outcome::Rejected { code: "c".into(), reason: "r".into() },
        Outcome::Deferred { code: "c".into(), reason: "r".into() },
        Outcome::RolledBack { code: "c".into(), reason: "r".into() },
        Outcome::RollbackIncomplete { code: "c".into(), reason: "r".into() },
    ];
    for o in all {
        let json = serde_json::to_value(&o).expect("serializes");
        assert_eq!(json["outcome"], o.name(), "{json}");
    }
}

// ---- maintenance windows and update locks (issue 14) ----------------------------------

/// A window every day from `open_in` to `open_in + len` after [`NOW`] (UTC).
fn window_in(open_in: i64, len: i64) -> fleet_spec::maintenance::Maintenance {
    let from = (NOW + open_in).rem_euclid(86400) / 60;
    let to = (NOW + open_in + len).rem_euclid(86400) / 60;
    fleet_spec::maintenance::Maintenance {
        windows: vec![fleet_spec::maintenance::Window {
            days: fleet_spec::maintenance::EVERY_DAY,
            from_min: from as u16,
            to_min: to as u16,
        }],
        timezone: "UTC".into(),
        tz_rule: "UTC0".into(),
        max_deferral_s: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_bundle_outside_its_window_waits_verified_and_applies_when_the_window_opens() {
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let mut v2 = v1(&h);
    v2.files[0].content = b"a2".to_vec();
    v2.maintenance = window_in(3600, 1800);
    let bytes = h.bundle(2, &v2);
    let digest = bundle::content_address(&bytes);
    drain(&mut rx);

    let t0 = agent.now();
    let outcome = agent.apply_bundle(&bytes).await.expect("verify");
    assert_eq!(outcome, Outcome::Waiting { reason: WaitReason::Window, until: Some(NOW + 3600) });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"), "nothing changed");
    let status = agent.status_report();
    assert_eq!(status.state, DeviceState::Waiting);
    let waiting = status.waiting.expect("waiting object");
    assert_eq!((waiting.reason, waiting.since, waiting.until), (WaitReason::Window, t0, Some(NOW + 3600)));
    assert_eq!(waiting.digest, digest);
    assert_eq!(agent.store().trust().expect("trust").last_version, Some(1), "trust moves only at apply");
    assert_eq!(agent.still_waiting(&digest), Some(WINDOW_RECHECK));

    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(agent.still_waiting(&digest), None, "the window is open");
    let outcome = agent.apply_bundle(&bytes).await.expect("apply");
    assert_eq!(outcome, Outcome::Committed { version: 2 });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a2"));
    assert_eq!(agent.status_report().waiting, None);
}

#[tokio::test(start_paused = true)]
async fn a_newer_bundle_replaces_the_waiting_one_and_a_return_to_the_applied_one_releases_it() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let mut v2 = v1(&h);
    v2.files[0].content = b"a2".to_vec();
    v2.maintenance = window_in(3600, 60);
    let waiting = h.bundle(2, &v2);
    assert!(matches!(agent.apply_bundle(&waiting).await.expect("v2"), Outcome::Waiting { .. }));
    // The fix widens its own window: it applies at once.
    let mut v3 = v2.clone();
    v3.files[0].content = b"a3".to_vec();
    v3.maintenance = window_in(-60, 600);
    assert_eq!(agent.apply_bundle(&h.bundle(3, &v3)).await.expect("v3"), Outcome::Committed { version: 3 });
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a3"));

    let mut v4 = v3.clone();
    v4.files[0].content = b"a4".to_vec();
    v4.maintenance = window_in(3600, 60);
    assert!(matches!(agent.apply_bundle(&h.bundle(4, &v4)).await.expect("v4"), Outcome::Waiting { .. }));
    agent.release_hold().expect("release");
    assert_eq!(agent.status_report().state, DeviceState::Converged);
    assert_eq!(agent.status_report().waiting, None);
}

#[tokio::test(start_paused = true)]
async fn an_update_lock_holds_the_apply_until_it_is_removed() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let locks = agent.config().updates.lock_dir.clone();
    crate::lockdir::create(&locks).expect("lock dir");
    std::fs::write(locks.join("updates.lock"), b"").expect("lock");
    let mut v2 = v1(&h);
    v2.files[0].content = b"a2".to_vec();
    v2.maintenance.max_deferral_s = Some(600);
    let bytes = h.bundle(2, &v2);
    let digest = bundle::content_address(&bytes);

    let t0 = agent.now();
    let outcome = agent.apply_bundle(&bytes).await.expect("verify");
    assert_eq!(outcome, Outcome::Waiting { reason: WaitReason::Lock, until: Some(t0 + 600) });
    assert_eq!(agent.status_report().waiting.map(|w| w.reason), Some(WaitReason::Lock));
    assert_eq!(agent.still_waiting(&digest), Some(LOCK_POLL));
    tokio::time::advance(Duration::from_secs(30)).await;
    std::fs::remove_file(locks.join("updates.lock")).expect("unlock");
    assert_eq!(agent.still_waiting(&digest), None);
    assert_eq!(agent.apply_bundle(&bytes).await.expect("apply"), Outcome::Committed { version: 2 });
    assert_eq!(agent.store().lock_since(), None, "the deferral starts over next time");
}

#[tokio::test(start_paused = true)]
async fn a_lock_held_past_the_maximum_deferral_is_overridden_and_reported() {
    let h = H::new();
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let locks = agent.config().updates.lock_dir.clone();
    crate::lockdir::create(&locks).expect("lock dir");
    std::fs::create_dir(locks.join("a-directory-not-a-file")).expect("hostile lock");
    let mut v2 = v1(&h);
    v2.files[0].content = b"a2".to_vec();
    v2.maintenance.max_deferral_s = Some(300);
    let bytes = h.bundle(2, &v2);
    let t0 = agent.now();
    assert!(matches!(agent.apply_bundle(&bytes).await.expect("verify"), Outcome::Waiting { .. }));
    drain(&mut rx);
    // A restart keeps the deferral's start.
    drop(agent);
    let (mut agent, mut rx) = h.agent();
    agent.recover().await.expect("recover");
    tokio::time::advance(Duration::from_secs(299)).await;
    assert_eq!(
        agent.apply_bundle(&bytes).await.expect("still held"),
        Outcome::Waiting { reason: WaitReason::Lock, until: Some(t0 + 300) }
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(agent.apply_bundle(&bytes).await.expect("apply"), Outcome::Committed { version: 2 });
    let overridden = events(&drain(&mut rx)).into_iter().find_map(|e| match e {
        EventKind::UpdateLockOverridden { version, entry, since } => Some((version, entry, since)),
        _ => None,
    });
    assert_eq!(overridden, Some((2, "a-directory-not-a-file".to_string(), t0)));
}

#[tokio::test(start_paused = true)]
async fn the_device_caps_the_deferral_a_bundle_asks_for_and_a_sideload_does_not_wait() {
    let mut h = H::new();
    h.cfg.updates.max_deferral = Duration::from_secs(60);
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let locks = agent.config().updates.lock_dir.clone();
    crate::lockdir::create(&locks).expect("lock dir");
    std::fs::write(locks.join("l"), b"").expect("lock");
    let mut v2 = v1(&h);
    v2.maintenance.max_deferral_s = Some(30 * 86400);
    v2.files[0].content = b"a2".to_vec();
    let bytes = h.bundle(2, &v2);
    let t0 = agent.now();
    assert_eq!(
        agent.apply_bundle(&bytes).await.expect("held"),
        Outcome::Waiting { reason: WaitReason::Lock, until: Some(t0 + 60) }
    );
    let mut v3 = v2.clone();
    v3.maintenance = window_in(3600, 60);
    v3.files[0].content = b"a3".to_vec();
    assert_eq!(
        agent.apply_bundle_now(&h.bundle(3, &v3)).await.expect("sideload"),
        Outcome::Committed { version: 3 }
    );
}

#[tokio::test(start_paused = true)]
async fn images_the_agent_pulled_go_once_no_commit_has_used_them_for_the_grace() {
    let mut h = H::new();
    h.cfg.image_gc_grace_secs = Some(600);
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let on = |image: &str| {
        let mut s = v1(&h);
        s.containers[0].image.reference = image.into();
        s
    };
    let removed = |h: &H| -> Vec<String> {
        h.fake
            .calls()
            .into_iter()
            .filter_map(|c| if let Call::RemoveImage(r) = c { Some(r) } else { None })
            .collect()
    };
    let commit = |version: u64, image: &'static str| (version, on(image));

    // v1 and v2 each pull an image the device did not have.
    for (version, state) in [commit(1, "reg/a:1"), commit(2, "reg/b:1")] {
        let outcome = agent.apply_bundle(&h.bundle(version, &state)).await.expect("apply");
        assert_eq!(outcome, Outcome::Committed { version });
    }
    assert!(h.fake.has_image("reg/a:1") && h.fake.has_image("reg/b:1"));
    // a is unused since v2's commit: it stays for the grace, then goes; b (in use) stays.
    tokio::time::advance(Duration::from_secs(599)).await;
    agent.reconcile().await.expect("reconcile");
    assert!(h.fake.has_image("reg/a:1"), "removed before its grace: {:?}", removed(&h));
    tokio::time::advance(Duration::from_secs(1)).await;
    agent.reconcile().await.expect("reconcile");
    assert_eq!(removed(&h), ["reg/a:1"]);
    assert!(!h.fake.has_image("reg/a:1") && h.fake.has_image("reg/b:1"));

    // v3 uses the image the device had before the agent (never recorded): b goes after
    // its grace; v4 moves on, and IMAGE is never removed however long it is unused.
    let outcome = agent.apply_bundle(&h.bundle(3, &on(IMAGE))).await.expect("apply v3");
    assert_eq!(outcome, Outcome::Committed { version: 3 });
    assert!(!h.fake.calls().iter().any(|c| matches!(c, Call::Pull { image, .. } if image == IMAGE)));
    tokio::time::advance(Duration::from_secs(600)).await;
    agent.reconcile().await.expect("reconcile");
    assert_eq!(removed(&h), ["reg/a:1", "reg/b:1"]);
    let outcome = agent.apply_bundle(&h.bundle(4, &on("reg/a:1"))).await.expect("apply v4");
    assert_eq!(outcome, Outcome::Committed { version: 4 });
    tokio::time::advance(Duration::from_secs(6000)).await;
    agent.reconcile().await.expect("reconcile");
    assert!(h.fake.has_image(IMAGE), "an image the device had before the agent was removed");
    assert_eq!(removed(&h), ["reg/a:1", "reg/b:1"]);

    // With `image_gc = false` nothing is ever removed; records still accumulate, so
    // turning it on later collects what was pulled meanwhile.
    let mut h2 = H::new();
    h2.cfg.image_gc_grace_secs = None;
    let (mut agent, _rx) = h2.agent();
    agent.recover().await.expect("recover");
    for (version, image) in [(1, "reg/a:1"), (2, "reg/b:1")] {
        let mut s = v1(&h2);
        s.containers[0].image.reference = image.into();
        assert_eq!(
            agent.apply_bundle(&h2.bundle(version, &s)).await.expect("apply"),
            Outcome::Committed { version }
        );
    }
    tokio::time::advance(Duration::from_secs(100_000)).await;
    agent.reconcile().await.expect("reconcile");
    assert!(removed(&h2).is_empty() && h2.fake.has_image("reg/a:1"));
    assert!(h2.cfg.state_dir.join("images.json").exists());
}

#[tokio::test(start_paused = true)]
async fn an_image_a_container_still_uses_or_a_damaged_record_is_kept() {
    let mut h = H::new();
    h.cfg.image_gc_grace_secs = Some(0);
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let mut v1s = v1(&h);
    v1s.containers[0].image.reference = "reg/a:1".into();
    assert_eq!(
        agent.apply_bundle(&h.bundle(1, &v1s)).await.expect("apply"),
        Outcome::Committed { version: 1 }
    );
    // Someone runs a container of their own on the image (the engine refuses to remove
    // an image in use without force, which the agent never uses).
    let mut own = container("by-hand", false);
    own.image.reference = "reg/a:1".into();
    h.fake.add_unmanaged_spec(own, BTreeMap::new());
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &v1(&h))).await.expect("apply"),
        Outcome::Committed { version: 2 }
    );
    assert!(h.fake.has_image("reg/a:1"), "an image in use was removed");
    assert!(h.fake.calls().contains(&Call::RemoveImage("reg/a:1".into())), "it was tried");
    // Still recorded: once the container is gone, the next reconcile removes it.
    assert!(h.fake.delete("by-hand"));
    agent.reconcile().await.expect("reconcile");
    assert!(!h.fake.has_image("reg/a:1"));

    // A damaged images.json is forgotten, never a reason to remove anything; pulls after
    // it are recorded again.
    let mut v3 = v1(&h);
    v3.containers[0].image.reference = "reg/c:1".into();
    assert_eq!(
        agent.apply_bundle(&h.bundle(3, &v3)).await.expect("apply"),
        Outcome::Committed { version: 3 }
    );
    std::fs::write(h.cfg.state_dir.join("images.json"), b"{not json").expect("write");
    assert_eq!(
        agent.apply_bundle(&h.bundle(4, &v1(&h))).await.expect("apply"),
        Outcome::Committed { version: 4 }
    );
    agent.reconcile().await.expect("reconcile");
    assert!(h.fake.has_image("reg/c:1"), "removed on the word of a damaged record");
    let mut v5 = v1(&h);
    v5.containers[0].image.reference = "reg/d:1".into();
    assert_eq!(
        agent.apply_bundle(&h.bundle(5, &v5)).await.expect("apply"),
        Outcome::Committed { version: 5 }
    );
    assert_eq!(
        agent.apply_bundle(&h.bundle(6, &v1(&h))).await.expect("apply"),
        Outcome::Committed { version: 6 }
    );
    assert!(!h.fake.has_image("reg/d:1") && h.fake.has_image("reg/c:1"));
}
