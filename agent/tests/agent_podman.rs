//! The whole agent against a real podman service on a host without systemd (like this
//! machine and many minimal devices), where podman runs no healthcheck by itself and a
//! container's health would stay `starting` for ever: the agent runs the checks.
//!
//! - `apply` of a bundle with a healthchecked container converges (the check passes);
//! - `apply` of a bundle whose healthcheck fails is rolled back as `unhealthy`;
//! - `run` keeps running the checks at rest: a managed file deleted behind the agent's
//!   back makes the check fail, podman's health event makes the agent repair the file,
//!   and the check passes again.
//!
//! Uses the fleet-e2e harness: an image registry holding a FROM-scratch busybox image
//! (built on a throw-away dockerd), and a podman service that pulls it by digest. Needs
//! the packages of `scripts/setup.sh` (podman, runc, netavark, docker.io,
//! docker-registry, busybox-static).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_e2e::{build_busybox_image, push_image, Dockerd, Engine as _, Podman, Registry};
use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::keys::SigningKey;
use fleet_spec::model::{
    ContainerSpec, DesiredState, Healthcheck, ImageRef, ManagedFile, Mount, MountSource, NetworkAttachment,
    NetworkSpec, RestartPolicy,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fleet-agent");

/// The agent in `run` mode, stopped (SIGTERM, then SIGKILL) when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Device {
    dir: tempfile::TempDir,
    config: PathBuf,
    root: PathBuf,
    key: SigningKey,
    image: ImageRef,
}

impl Device {
    fn new(podman: &Podman, image: ImageRef) -> Device {
        let dir = tempfile::Builder::new().prefix("fap").tempdir_in("/tmp").expect("tempdir");
        let d = dir.path();
        let root = d.join("root");
        let key = SigningKey::from_seed(&[5; 32]);
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device = \"gw-p\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\nhealth_timeout_secs = 30\nreconcile_interval_secs = 3600\n[trust]\npublic_keys = [\"{}\"]\n[engine]\nsocket = \"{}\"\nstop_grace_secs = 1\n",
                d.join("state").display(),
                root.display(),
                key.public(),
                podman.socket_path().display()
            ),
        )
        .expect("config");
        Device { dir, config, root, key, image }
    }

    /// One container whose healthcheck tests for `flag` (a path inside it); its config
    /// directory is bind-mounted from the managed file's directory.
    fn state(&self, flag: &str) -> DesiredState {
        let mut state = DesiredState {
            files: vec![ManagedFile {
                path: format!("{}/app/app.conf", self.root.display()),
                mode: 0o644,
                owner: None,
                content: b"one".to_vec(),
            }],
            containers: vec![ContainerSpec {
                name: "app-web".into(),
                app: "app".into(),
                service: "web".into(),
                image: self.image.clone(),
                command: Some(vec!["sh".into(), "-c".into(), "sleep 3600".into()]),
                mounts: vec![Mount {
                    source: MountSource::Bind(format!("{}/app", self.root.display())),
                    target: "/etc/app".into(),
                    read_only: true,
                }],
                networks: vec![NetworkAttachment {
                    network: "app_default".into(),
                    aliases: vec!["web".into()],
                }],
                restart: RestartPolicy::UnlessStopped,
                healthcheck: Some(Healthcheck {
                    test: vec!["CMD-SHELL".into(), format!("test -f {flag}")],
                    interval_ms: Some(1000),
                    timeout_ms: Some(2000),
                    retries: Some(2),
                    start_period_ms: None,
                }),
                ..Default::default()
            }],
            networks: vec![NetworkSpec { name: "app_default".into(), ..Default::default() }],
            volumes: vec![],
        };
        state.canonicalize();
        state
    }

    fn bundle_file(&self, version: u64, state: &DesiredState) -> PathBuf {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: "gw-p".into(),
            version,
            commit: format!("c{version}"),
            subject: "podman test".into(),
            created_at: now - 60,
            expires_at: now + 3600,
        };
        let path = self.dir.path().join(format!("v{version}.bundle"));
        std::fs::write(&path, bundle::build(meta, state, &[&self.key], 3)).expect("write bundle");
        path
    }

    fn agent(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("FLEET_LOG", "debug")
            .output()
            .expect("fleet-agent runs")
    }

    fn apply(&self, bundle: &Path) -> Output {
        Command::new(BIN)
            .args(["apply", "--config"])
            .arg(&self.config)
            .arg(bundle)
            .env("FLEET_LOG", "debug")
            .output()
            .expect("fleet-agent apply runs")
    }

    fn status(&self) -> Value {
        let out = self.agent(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

fn inspect(podman: &Podman, name: &str) -> Option<Value> {
    podman.get_json(&format!("/v1.41/containers/{name}/json")).ok()
}

fn health(podman: &Podman, name: &str) -> Option<String> {
    inspect(podman, name)?.pointer("/State/Health/Status").and_then(Value::as_str).map(str::to_owned)
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The busybox image in a registry, by digest, built on a throw-away dockerd.
fn image_in(registry: &Registry) -> ImageRef {
    let reference = registry.image("fleet-agent-podman/bb:1");
    let dockerd = Dockerd::start().expect("dockerd starts");
    build_busybox_image(&dockerd, &reference, &["sh", "-c", "sleep 3600"]).expect("image built");
    let digest = push_image(&dockerd, &reference).expect("image pushed");
    ImageRef { reference, digest: Some(digest) }
}

#[test]
fn the_agent_runs_healthchecks_that_podman_without_systemd_does_not() {
    let registry = Registry::start().expect("registry starts");
    let image = image_in(&registry);
    let podman = Podman::start().expect("podman starts");
    let dev = Device::new(&podman, image);

    // v1: the check passes; podman alone would leave it `starting` until the timeout.
    let v1 = dev.state("/etc/app/app.conf");
    let started = Instant::now();
    let out = dev.apply(&dev.bundle_file(1, &v1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "apply v1:\n{stderr}\npodman:\n{}", podman.log());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "healthy before the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(health(&podman, "app-web").as_deref(), Some("healthy"));
    let status = dev.status();
    assert_eq!(status["status"]["state"], "converged", "{status}");
    assert_eq!(status["status"]["containers"][0]["health"], "healthy", "{status}");
    let hash = v1.container_hash(&v1.containers[0]);
    let label = |podman: &Podman| {
        inspect(podman, "app-web").and_then(|v| {
            v.pointer("/Config/Labels/io.fleet.spec-hash").and_then(Value::as_str).map(str::to_owned)
        })
    };
    assert_eq!(label(&podman), Some(hash.clone()));

    // v2: the check fails: rolled back as unhealthy (well before the 30 s timeout).
    let v2 = dev.state("/etc/app/missing");
    let started = Instant::now();
    let out = dev.apply(&dev.bundle_file(2, &v2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "apply v2 must roll back:\n{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "failed fast: {:?}", started.elapsed());
    assert_eq!(label(&podman), Some(hash.clone()), "v1's container is back");
    let status = dev.status();
    assert_eq!(status["status"]["state"], "rolled_back", "{status}");
    assert_eq!(status["status"]["last_error"]["code"], "unhealthy", "{status}");

    // run: the agent keeps running the checks at rest (v1's container, recreated by the
    // rollback, becomes healthy only that way)...
    let log = std::fs::File::create(dev.dir.path().join("agent.log")).expect("log");
    let _agent = Agent(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&dev.config)
            .env("FLEET_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run"),
    );
    wait_until("the recreated container is healthy", Duration::from_secs(20), || {
        health(&podman, "app-web").as_deref() == Some("healthy")
    });
    // ...so a failing check is seen: the file it tests deleted behind the agent's back
    // makes the container unhealthy; podman's event makes the agent reconcile, which
    // writes the file again, and the next check passes.
    let conf = dev.root.join("app/app.conf");
    std::fs::remove_file(&conf).expect("rm app.conf");
    wait_until("drift repaired", Duration::from_secs(20), || dev.log().contains("drift repaired"));
    assert_eq!(std::fs::read_to_string(&conf).expect("app.conf is back"), "one");
    assert!(dev.log().contains("health_status: unhealthy"), "{}", dev.log());
    wait_until("healthy again", Duration::from_secs(20), || {
        health(&podman, "app-web").as_deref() == Some("healthy")
    });
}
