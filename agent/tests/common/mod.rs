//! What the agent's tests against a real container engine (`agent_docker.rs`,
//! `agent_podman.rs`) share: a [`Device`] (its `agent.toml`, signing key and managed
//! root in a temp dir; signed bundles; `fleet-agent apply` and `run`), the app both
//! deploy ([`Device::app`]), and what the engine's API says about a container
//! ([`health`], [`spec_hash`], [`label`]). The engines themselves come from the
//! fleet-e2e harness. `agent_it.rs` and `config_cli.rs` use only [`BIN`], [`now`] and
//! [`set_allowed_roots`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_e2e::{log_tail, Engine};
use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::keys::SigningKey;
use fleet_spec::model::{
    ContainerSpec, DesiredState, Healthcheck, ImageRef, ManagedFile, Mount, MountSource, NetworkAttachment,
    NetworkSpec, RestartPolicy,
};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_fleet-agent");

/// Replaces the `allowed_roots = [...]` line of the `agent.toml` at `config`.
#[allow(dead_code)] // the engine tests do not change roots
pub fn set_allowed_roots(config: &Path, roots: &[&Path]) {
    let list: Vec<String> = roots.iter().map(|r| format!("{:?}", r.display().to_string())).collect();
    let toml: String = std::fs::read_to_string(config)
        .expect("read agent.toml")
        .lines()
        .map(|l| match l.starts_with("allowed_roots") {
            true => format!("allowed_roots = [{}]\n", list.join(", ")),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(config, toml).expect("write agent.toml");
}

/// Seconds since the Unix epoch (bundle validity windows).
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
}

/// A device of fleet `acme`: its `agent.toml`, state dir, managed root, bundles and
/// agent log, all in one temp dir.
pub struct Device {
    id: String,
    dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The one allowed root; the app's managed file is `root/app/app.conf`.
    pub root: PathBuf,
    key: SigningKey,
}

impl Device {
    /// Device `id`, using the engine on `engine_socket`, trusting one key, waiting at
    /// most `health_timeout_secs` for health. No broker and no polling (bundles are
    /// sideloaded); the reconcile timer is an hour, so in `run` mode only engine events
    /// make the agent reconcile.
    pub fn new(id: &str, engine_socket: &Path, health_timeout_secs: u64) -> Device {
        let dir = tempfile::Builder::new().prefix("fa").tempdir_in("/tmp").expect("tempdir");
        let d = dir.path();
        let root = d.join("root");
        let key = SigningKey::from_seed(&[3; 32]);
        // Not beside root/: an allowed root must lie apart from the directory of agent.toml.
        std::fs::create_dir(d.join("etc")).expect("mkdir etc");
        let config = d.join("etc/agent.toml");
        std::fs::write(
            &config,
            format!(
                "device = \"{id}\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\nhealth_timeout_secs = {health_timeout_secs}\nreconcile_interval_secs = 3600\n[trust]\npublic_keys = [\"{}\"]\n[engine]\nsocket = \"{}\"\nstop_grace_secs = 1\n",
                d.join("state").display(),
                root.display(),
                key.public(),
                engine_socket.display()
            ),
        )
        .expect("config");
        Device { id: id.to_owned(), dir, config, root, key }
    }

    /// The app both tests deploy: the managed file `root/app/app.conf` holding `conf`,
    /// and the container `app-web` (`image`, `sh -c command`) with that file's directory
    /// bind-mounted read-only at `/etc/app`, on the network `app_default` (alias `web`).
    pub fn app(
        &self,
        image: ImageRef,
        conf: &str,
        command: &str,
        restart: RestartPolicy,
        healthcheck: Healthcheck,
    ) -> DesiredState {
        let mut state = DesiredState {
            files: vec![ManagedFile {
                path: format!("{}/app/app.conf", self.root.display()),
                mode: 0o644,
                owner: None,
                content: conf.as_bytes().to_vec(),
            }],
            containers: vec![ContainerSpec {
                name: "app-web".into(),
                app: "app".into(),
                service: "web".into(),
                image,
                command: Some(vec!["sh".into(), "-c".into(), command.into()]),
                mounts: vec![Mount {
                    source: MountSource::Bind(format!("{}/app", self.root.display())),
                    target: "/etc/app".into(),
                    read_only: true,
                }],
                networks: vec![NetworkAttachment {
                    network: "app_default".into(),
                    aliases: vec!["web".into()],
                }],
                restart,
                healthcheck: Some(healthcheck),
                ..Default::default()
            }],
            networks: vec![NetworkSpec { name: "app_default".into(), ..Default::default() }],
            ..Default::default()
        };
        state.canonicalize();
        state
    }

    /// `state` as version `version`, signed with the trusted key, valid for an hour;
    /// written to `v<version>.bundle` in the device's temp dir.
    pub fn bundle_file(&self, version: u64, state: &DesiredState) -> PathBuf {
        let now = now();
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: self.id.clone(),
            version,
            commit: format!("c{version}"),
            subject: format!("{} test", self.id),
            created_at: now - 60,
            expires_at: now + 3600,
        };
        let path = self.dir.path().join(format!("v{version}.bundle"));
        std::fs::write(&path, bundle::build(meta, state, &[&self.key], 3)).expect("write bundle");
        path
    }

    /// `fleet-agent apply --config agent.toml BUNDLE` (the sideload path), to completion.
    pub fn apply(&self, bundle: &Path) -> Output {
        Command::new(BIN)
            .args(["apply", "--config"])
            .arg(&self.config)
            .arg(bundle)
            .env("FLEET_LOG", "debug")
            .output()
            .expect("fleet-agent apply runs")
    }

    /// Starts `fleet-agent run --config agent.toml`, logging to [`Device::log`].
    pub fn run(&self) -> Agent {
        let log = self.dir.path().join("agent.log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("FLEET_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("fleet-agent run starts");
        Agent { child, log }
    }

    /// What `fleet-agent run` logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

/// The agent in `run` mode, stopped (SIGTERM, then SIGKILL after 15 s) when dropped;
/// its log is printed when the test is failing.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", log_tail(&self.log, 60));
        }
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container `name` as the engine's API shows it (`GET /containers/{name}/json`);
/// `None` when there is no such container.
pub fn inspect(engine: &impl Engine, name: &str) -> Option<Value> {
    engine.get_json(&format!("/v1.41/containers/{name}/json")).ok()
}

/// The string at `pointer` (e.g. `/Id`) in [`inspect`]'s answer.
pub fn inspect_str(engine: &impl Engine, name: &str, pointer: &str) -> Option<String> {
    inspect(engine, name)?.pointer(pointer).and_then(Value::as_str).map(str::to_owned)
}

/// The container's health status (`starting`, `healthy`, `unhealthy`).
pub fn health(engine: &impl Engine, name: &str) -> Option<String> {
    inspect_str(engine, name, "/State/Health/Status")
}

/// The value of the container's label `key`.
pub fn label(engine: &impl Engine, name: &str, key: &str) -> Option<String> {
    inspect_str(engine, name, &format!("/Config/Labels/{key}"))
}

/// The spec hash the agent labelled the container with (`io.fleet.spec-hash`).
pub fn spec_hash(engine: &impl Engine, name: &str) -> Option<String> {
    label(engine, name, "io.fleet.spec-hash")
}
