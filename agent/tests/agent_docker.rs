//! The whole agent against a real `dockerd`: sideloaded bundles with a container that
//! mounts a managed file, a user-defined network and a named volume; a failing update
//! rolled back; and, in `run` mode, a container deleted behind the agent's back
//! recreated on the engine's event.
//!
//! Starts its own `dockerd` (own data root, socket and address pool, no default
//! bridge) and builds a FROM-scratch busybox image locally (nothing is pulled). Needs
//! `docker.io` and `busybox-static`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::keys::SigningKey;
use fleet_spec::model::{
    ContainerSpec, DesiredState, Healthcheck, ImageRef, ManagedFile, Mount, MountSource, NetworkAttachment,
    NetworkSpec, RestartPolicy, VolumeSpec,
};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-agent");
const IMAGE: &str = "fleet-agent-test/bb:1";

struct Proc(Child);

impl Drop for Proc {
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

struct Lab {
    dir: tempfile::TempDir,
    socket: PathBuf,
    _dockerd: Proc,
}

impl Lab {
    fn start() -> Lab {
        let dir = tempfile::Builder::new().prefix("fa").tempdir_in("/tmp").expect("tempdir");
        let d = dir.path();
        let socket = d.join("d.sock");
        let log = std::fs::File::create(d.join("dockerd.log")).expect("log");
        let dockerd = Command::new("/usr/sbin/dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("x"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--bridge=none")
            .args(["--default-address-pool", "base=10.239.0.0/16,size=24"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd must be installed: apt-get install -y docker.io");
        let lab = Lab { dir, socket, _dockerd: Proc(dockerd) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lab.docker(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "dockerd not up:\n{}", lab.read("dockerd.log"));
            std::thread::sleep(Duration::from_millis(200));
        }
        let img = lab.dir.path().join("img");
        std::fs::create_dir_all(img.join("bin")).expect("mkdir");
        std::fs::copy("/bin/busybox", img.join("bin/busybox")).expect("busybox-static must be installed");
        for applet in ["sh", "sleep", "test", "cat"] {
            std::os::unix::fs::symlink("busybox", img.join("bin").join(applet)).expect("link");
        }
        std::fs::write(
            img.join("Dockerfile"),
            "FROM scratch\nCOPY bin /bin\nCMD [\"/bin/sh\",\"-c\",\"sleep 3600\"]\n",
        )
        .expect("Dockerfile");
        let out = lab.docker(&["build", "-q", "-t", IMAGE, img.to_str().expect("utf8")]);
        assert!(out.status.success(), "docker build: {}", String::from_utf8_lossy(&out.stderr));
        lab
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("cli"))
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("docker CLI")
    }

    fn inspect(&self, format: &str, name: &str) -> Option<String> {
        let out = self.docker(&["inspect", "--format", format, name]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

struct Device<'a> {
    lab: &'a Lab,
    config: PathBuf,
    root: PathBuf,
    key: SigningKey,
}

impl<'a> Device<'a> {
    fn new(lab: &'a Lab) -> Device<'a> {
        let d = lab.dir.path();
        let root = d.join("root");
        let key = SigningKey::from_seed(&[3; 32]);
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device = \"gw-d\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\nhealth_timeout_secs = 20\nreconcile_interval_secs = 3600\n[trust]\npublic_keys = [\"{}\"]\n[engine]\nsocket = \"{}\"\nstop_grace_secs = 1\n",
                d.join("state").display(),
                root.display(),
                key.public(),
                lab.socket.display()
            ),
        )
        .expect("config");
        Device { lab, config, root, key }
    }

    fn state(&self, conf: &str, command: &str, restart: RestartPolicy) -> DesiredState {
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
                image: ImageRef { reference: IMAGE.into(), digest: None },
                command: Some(vec!["sh".into(), "-c".into(), command.into()]),
                mounts: vec![
                    Mount {
                        source: MountSource::Bind(format!("{}/app", self.root.display())),
                        target: "/etc/app".into(),
                        read_only: true,
                    },
                    Mount {
                        source: MountSource::Volume("app_data".into()),
                        target: "/data".into(),
                        read_only: false,
                    },
                ],
                networks: vec![NetworkAttachment {
                    network: "app_default".into(),
                    aliases: vec!["web".into()],
                }],
                restart,
                healthcheck: Some(Healthcheck {
                    test: vec!["CMD-SHELL".into(), "test -f /etc/app/app.conf".into()],
                    interval_ms: Some(500),
                    timeout_ms: Some(1000),
                    retries: Some(3),
                    start_period_ms: None,
                }),
                ..Default::default()
            }],
            networks: vec![NetworkSpec { name: "app_default".into(), ..Default::default() }],
            volumes: vec![VolumeSpec { name: "app_data".into(), ..Default::default() }],
        };
        state.canonicalize();
        state
    }

    fn bundle_file(&self, version: u64, state: &DesiredState) -> PathBuf {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: "gw-d".into(),
            version,
            commit: format!("c{version}"),
            subject: "docker test".into(),
            created_at: now - 60,
            expires_at: now + 3600,
        };
        let bytes = bundle::build(meta, state, &[&self.key], 3);
        let path = self.lab.dir.path().join(format!("v{version}.bundle"));
        std::fs::write(&path, bytes).expect("write bundle");
        path
    }

    fn apply(&self, bundle: &Path) -> Output {
        Command::new(BIN)
            .args(["apply", "--config"])
            .arg(&self.config)
            .arg(bundle)
            .env("FLEET_LOG", "debug")
            .output()
            .expect("fleet-agent apply")
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_agent_runs_containers_on_dockerd_rolls_back_and_repairs_drift() {
    let lab = Lab::start();
    let dev = Device::new(&lab);

    // v1: healthy.
    let v1 = dev.state("one", "echo kept > /data/marker; sleep 3600", RestartPolicy::UnlessStopped);
    let out = dev.apply(&dev.bundle_file(1, &v1));
    assert_eq!(out.status.code(), Some(0), "apply v1:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lab.inspect("{{.State.Running}}", "app-web").as_deref(), Some("true"));
    assert_eq!(lab.inspect("{{.State.Health.Status}}", "app-web").as_deref(), Some("healthy"));
    let hash = v1.container_hash(&v1.containers[0]);
    assert_eq!(lab.inspect("{{index .Config.Labels \"io.fleet.spec-hash\"}}", "app-web"), Some(hash.clone()));
    assert_eq!(
        lab.inspect("{{index .Config.Labels \"io.fleet.managed\"}}", "app-web").as_deref(),
        Some("true")
    );
    let id_v1 = lab.inspect("{{.Id}}", "app-web").expect("id");

    // v2: the container exits at once: rolled back to v1 (exit 1), v1's spec restored.
    let v2 = dev.state("two", "exit 3", RestartPolicy::No);
    let out = dev.apply(&dev.bundle_file(2, &v2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "apply v2 must roll back:\n{stderr}");
    assert!(stderr.contains("container_exited"), "{stderr}");
    assert_eq!(std::fs::read_to_string(dev.root.join("app/app.conf")).expect("conf"), "one");
    assert_eq!(lab.inspect("{{index .Config.Labels \"io.fleet.spec-hash\"}}", "app-web"), Some(hash.clone()));
    assert_eq!(lab.inspect("{{.State.Running}}", "app-web").as_deref(), Some("true"));
    assert_ne!(lab.inspect("{{.Id}}", "app-web").expect("id"), id_v1, "recreated from v1's spec");
    let marker = lab.docker(&["exec", "app-web", "cat", "/data/marker"]);
    assert_eq!(
        String::from_utf8_lossy(&marker.stdout).trim(),
        "kept",
        "the named volume survived recreation"
    );

    // run: a container removed behind the agent's back comes back on the engine event.
    let log = std::fs::File::create(lab.dir.path().join("agent.log")).expect("log");
    let _agent = Proc(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&dev.config)
            .env("FLEET_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run"),
    );
    wait_until("the agent is up", Duration::from_secs(10), || lab.read("agent.log").contains("recovery"));
    std::thread::sleep(Duration::from_secs(1));
    let out = lab.docker(&["rm", "-f", "app-web"]);
    assert!(out.status.success());
    wait_until("app-web recreated", Duration::from_secs(20), || {
        lab.inspect("{{.State.Running}}", "app-web").as_deref() == Some("true")
    });
    wait_until("drift reported", Duration::from_secs(5), || lab.read("agent.log").contains("drift repaired"));
    assert_eq!(lab.inspect("{{index .Config.Labels \"io.fleet.spec-hash\"}}", "app-web"), Some(hash));
}
