//! The whole agent (in memory: `FakeEngine`, paused tokio time, a temp-dir filesystem)
//! against what a container can leave in a shared directory: a symlink at a managed path
//! is repaired by the reconcile and is no reason to refuse the next bundle (it used to
//! make every later bundle fail preflight with `symlink_escape` for good), while a
//! symlinked directory on the way is refused, even one that stays inside the root.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use fleet_agent::agent::{Agent, Outcome};
use fleet_agent::clock::TokioClock;
use fleet_agent::config::Config;
use fleet_agent::engine::fake::FakeEngine;
use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::keys::SigningKey;
use fleet_spec::messages::DriftKind;
use fleet_spec::model::{DesiredState, ManagedFile};

const NOW: i64 = 1_800_000_000;

struct Device {
    dir: tempfile::TempDir,
    root: PathBuf,
    key: SigningKey,
    agent: Agent<FakeEngine>,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("app")).expect("mkdir root/app");
        let key = SigningKey::from_seed(&[7; 32]);
        let text = format!(
            "device = \"gw\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\n\
             health_timeout_secs = 30\n[trust]\npublic_keys = [\"{}\"]\n[engine]\nsocket = \"none\"\n",
            dir.path().join("state").display(),
            root.display(),
            key.public()
        );
        let cfg = Config::parse(&text, Path::new("/etc/agent.toml")).expect("valid config");
        let engine = Rc::new(FakeEngine::with_images(Vec::<&str>::new()));
        let clock = Rc::new(TokioClock::starting_at(NOW));
        let agent = Agent::new(cfg, engine, clock, None).expect("agent");
        Device { dir, root, key, agent }
    }

    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root.display())
    }

    fn bundle(&self, version: u64, files: &[(&str, &str)]) -> Vec<u8> {
        let mut state = DesiredState {
            files: files
                .iter()
                .map(|(rel, content)| ManagedFile {
                    path: self.path(rel),
                    mode: 0o644,
                    owner: None,
                    content: content.as_bytes().to_vec(),
                })
                .collect(),
            ..Default::default()
        };
        state.canonicalize();
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: "gw".into(),
            version,
            commit: format!("c{version}"),
            subject: "test".into(),
            created_at: NOW - 60,
            expires_at: NOW + 86_400,
        };
        bundle::build(meta, &state, &[&self.key], 3)
    }

    /// A file outside the allowed root, as a container would point a symlink at.
    fn victim(&self) -> PathBuf {
        let victim = self.dir.path().join("victim");
        if !victim.exists() {
            std::fs::write(&victim, "outside").expect("write victim");
        }
        victim
    }

    fn plant_symlink(&self, rel: &str) {
        let link = self.root.join(rel);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(self.victim(), &link).expect("symlink");
    }

    fn read(&self, rel: &str) -> String {
        let p = self.root.join(rel);
        assert!(std::fs::symlink_metadata(&p).expect("lstat").is_file(), "{rel} is a regular file");
        std::fs::read_to_string(p).expect("read")
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn symlink_planted_at_a_managed_path_is_repaired_and_never_blocks_the_next_bundle() {
    let mut d = Device::new();
    d.agent.recover().await.expect("recover");
    let v1 = d.bundle(1, &[("app/a.conf", "a1")]);
    assert_eq!(d.agent.apply_bundle(&v1).await.expect("v1"), Outcome::Committed { version: 1 });

    d.plant_symlink("app/a.conf");
    let repaired = d.agent.reconcile().await.expect("reconcile");
    assert_eq!(repaired, [(DriftKind::FileChanged, d.path("app/a.conf"))]);
    assert_eq!(d.read("app/a.conf"), "a1");
    assert_eq!(
        std::fs::read_to_string(d.victim()).expect("read"),
        "outside",
        "the link's target is untouched"
    );

    d.plant_symlink("app/a.conf");
    let v2 = d.bundle(2, &[("app/a.conf", "a2")]);
    assert_eq!(d.agent.apply_bundle(&v2).await.expect("v2"), Outcome::Committed { version: 2 });
    assert_eq!(d.read("app/a.conf"), "a2");
    assert_eq!(
        std::fs::read_to_string(d.victim()).expect("read"),
        "outside",
        "the link's target is untouched"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn symlinked_directory_inside_the_root_is_refused_with_symlink_escape() {
    let mut d = Device::new();
    d.agent.recover().await.expect("recover");
    std::fs::create_dir_all(d.root.join("real")).expect("mkdir");
    std::os::unix::fs::symlink(d.root.join("real"), d.root.join("alias")).expect("symlink");
    let v1 = d.bundle(1, &[("alias/a.conf", "a1")]);
    let outcome = d.agent.apply_bundle(&v1).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "symlink_escape"), "{outcome:?}");
    assert!(!d.root.join("real/a.conf").exists(), "nothing written through the alias");
}

/// A container that plants a symlinked directory on a managed path (its app directory
/// is bind-mounted read-write) defers the bundle; it does not keep the signed bundle out
/// for good: once the link is gone, the same bytes apply.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_planted_symlinked_directory_defers_the_bundle_until_it_is_gone() {
    let mut d = Device::new();
    d.agent.recover().await.expect("recover");
    std::os::unix::fs::symlink("/etc", d.root.join("conf")).expect("symlink");
    let v1 = d.bundle(1, &[("conf/a.conf", "a1")]);
    let digest = fleet_spec::bundle::content_address(&v1);
    let outcome = d.agent.apply_bundle(&v1).await.expect("apply");
    assert!(matches!(&outcome, Outcome::Deferred { code, .. } if code == "symlink_escape"), "{outcome:?}");
    assert!(!d.agent.store().rejected().expect("rejected").contains_key(&digest), "not rejected");
    assert!(!std::path::Path::new("/etc/a.conf").exists(), "nothing written through the link");

    std::fs::remove_file(d.root.join("conf")).expect("remove the link");
    assert_eq!(d.agent.apply_bundle(&v1).await.expect("again"), Outcome::Committed { version: 1 });
    assert_eq!(d.read("conf/a.conf"), "a1");
}
