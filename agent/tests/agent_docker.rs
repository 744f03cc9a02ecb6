//! The whole agent against a real `dockerd`: sideloaded bundles with a container that
//! mounts a managed file, a user-defined network and a named volume; a failing update
//! rolled back; and, in `run` mode, a container deleted behind the agent's back
//! recreated on the engine's event.
//!
//! Uses the fleet-e2e harness: a private `dockerd` (own data root, socket, bridge and
//! address pool) holding a FROM-scratch busybox image built on it (nothing is pulled).
//! Needs root and the packages of `scripts/setup.sh` (docker.io, runc, busybox-static).

mod common;

use std::time::Duration;

use common::{health, inspect, inspect_str, label, spec_hash, Device};
use fleet_e2e::{build_busybox_image, wait_until, Dockerd};
use fleet_spec::model::{
    DesiredState, DeviceMapping, Healthcheck, ImageRef, Mount, MountSource, RestartPolicy, VolumeSpec,
};

const IMAGE: &str = "fleet-agent-test/bb:1";

/// The app (see [`Device::app`]), healthy while its config file is mounted, with the
/// named volume `app_data` at `/data`.
fn state(dev: &Device, conf: &str, command: &str, restart: RestartPolicy) -> DesiredState {
    let image = ImageRef { reference: IMAGE.into(), digest: None };
    let healthcheck = Healthcheck {
        test: vec!["CMD-SHELL".into(), "test -f /etc/app/app.conf".into()],
        interval_ms: Some(500),
        timeout_ms: Some(1000),
        retries: Some(3),
        start_period_ms: None,
    };
    let mut state = dev.app(image, conf, command, restart, healthcheck);
    state.containers[0].mounts.push(Mount {
        source: MountSource::Volume("app_data".into()),
        target: "/data".into(),
        read_only: false,
    });
    state.volumes.push(VolumeSpec { name: "app_data".into(), ..Default::default() });
    state.canonicalize();
    state
}

fn running(dockerd: &Dockerd, name: &str) -> bool {
    inspect(dockerd, name).and_then(|c| c.pointer("/State/Running")?.as_bool()) == Some(true)
}

#[test]
fn the_agent_runs_containers_on_dockerd_rolls_back_and_repairs_drift() {
    let dockerd = Dockerd::start().expect("dockerd starts");
    build_busybox_image(&dockerd, IMAGE, &["/bin/sh", "-c", "sleep 3600"]).expect("image built");
    let dev = Device::new("gw-d", dockerd.socket_path(), 20);

    // v1: healthy.
    let v1 = state(&dev, "one", "echo kept > /data/marker; sleep 3600", RestartPolicy::UnlessStopped);
    let out = dev.apply(&dev.bundle_file(1, &v1));
    assert_eq!(out.status.code(), Some(0), "apply v1:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(running(&dockerd, "app-web"));
    assert_eq!(health(&dockerd, "app-web").as_deref(), Some("healthy"));
    let hash = v1.container_hash(&v1.containers[0]);
    assert_eq!(spec_hash(&dockerd, "app-web"), Some(hash.clone()));
    assert_eq!(label(&dockerd, "app-web", "io.fleet.managed").as_deref(), Some("true"));
    let id_v1 = inspect_str(&dockerd, "app-web", "/Id").expect("id");

    // v2: the container exits at once: rolled back to v1 (exit 1), v1's spec restored.
    let v2 = state(&dev, "two", "exit 3", RestartPolicy::No);
    let out = dev.apply(&dev.bundle_file(2, &v2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "apply v2 must roll back:\n{stderr}");
    assert!(stderr.contains("container_exited"), "{stderr}");
    assert_eq!(std::fs::read_to_string(dev.root.join("app/app.conf")).expect("conf"), "one");
    assert_eq!(spec_hash(&dockerd, "app-web"), Some(hash.clone()));
    assert!(running(&dockerd, "app-web"));
    assert_ne!(inspect_str(&dockerd, "app-web", "/Id").expect("id"), id_v1, "recreated from v1's spec");
    let marker = dockerd.docker(&["exec", "app-web", "cat", "/data/marker"]).expect("docker exec");
    assert_eq!(marker.trim(), "kept", "the named volume survived recreation");

    // run: a container removed behind the agent's back comes back on the engine event.
    let _agent = dev.run();
    wait_until(Duration::from_secs(10), "the agent to start", || Ok(dev.log().contains("recovery")))
        .expect("the agent is up");
    std::thread::sleep(Duration::from_secs(1));
    dockerd.docker(&["rm", "-f", "app-web"]).expect("docker rm -f app-web");
    wait_until(Duration::from_secs(20), "app-web recreated", || Ok(running(&dockerd, "app-web")))
        .expect("app-web recreated");
    wait_until(Duration::from_secs(5), "drift reported", || Ok(dev.log().contains("drift_repaired")))
        .expect("drift reported");
    assert_eq!(spec_hash(&dockerd, "app-web"), Some(hash));
}

/// The engine boundary (`[engine.policy]`): a signed bundle asking for a privileged
/// container that mounts the engine's socket is refused in preflight with
/// `policy_denied`, naming both, and nothing changes on the device. Once the device's
/// own config allows the socket, a bundle that still asks for `privileged` is refused
/// for that alone; one that asks only for the socket runs with it mounted. (Privileged
/// containers cannot start in the test sandbox, where runc may not apply every
/// capability: `allow_privileged` itself is covered by the unit tests.)
#[test]
fn a_bundle_beyond_the_engine_policy_is_refused_on_dockerd_and_runs_once_the_policy_allows_it() {
    let dockerd = Dockerd::start().expect("dockerd starts");
    build_busybox_image(&dockerd, IMAGE, &["/bin/sh", "-c", "sleep 3600"]).expect("image built");
    let dev = Device::new("gw-p", dockerd.socket_path(), 20);
    let socket = dockerd.socket_path().to_string_lossy().into_owned();
    let mut mounts_socket = state(&dev, "one", "sleep 3600", RestartPolicy::UnlessStopped);
    mounts_socket.containers[0].mounts.push(Mount {
        source: MountSource::Bind(socket.clone()),
        target: "/var/run/docker.sock".into(),
        read_only: true,
    });
    let mut privileged = mounts_socket.clone();
    privileged.containers[0].privileged = true;

    let out = dev.apply(&dev.bundle_file(1, &privileged));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "refused, nothing changed:\n{stderr}");
    assert!(stderr.contains("policy_denied"), "{stderr}");
    assert!(stderr.contains("`app-web` (app `app`, service `web`)"), "{stderr}");
    assert!(stderr.contains("`privileged: true`"), "{stderr}");
    assert!(stderr.contains("engine.policy.allow_privileged = true"), "{stderr}");
    assert!(stderr.contains(&format!("`bind source {socket}`")), "{stderr}");
    assert!(stderr.contains("engine.policy.allow_engine_socket = true"), "{stderr}");
    assert!(inspect(&dockerd, "app-web").is_none(), "no container was created");
    let networks = dockerd.docker(&["network", "ls", "--format", "{{.Name}}"]).expect("docker network ls");
    assert!(!networks.lines().any(|n| n == "app_default"), "no network was created: {networks}");
    let volumes = dockerd.docker(&["volume", "ls", "--format", "{{.Name}}"]).expect("docker volume ls");
    assert!(!volumes.lines().any(|v| v == "app_data"), "no volume was created: {volumes}");
    assert!(!dev.root.join("app/app.conf").exists(), "no file was written");

    // The device opens its policy to the engine socket, not to privileged containers.
    let mut config = std::fs::read_to_string(&dev.config).expect("agent.toml");
    config.push_str("\n[engine.policy]\nallow_engine_socket = true\n");
    std::fs::write(&dev.config, config).expect("agent.toml");
    let out = dev.apply(&dev.bundle_file(2, &privileged));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "still refused:\n{stderr}");
    assert!(stderr.contains("`privileged: true`") && !stderr.contains("`bind source"), "{stderr}");
    assert!(inspect(&dockerd, "app-web").is_none(), "no container was created");

    let out = dev.apply(&dev.bundle_file(3, &mounts_socket));
    assert_eq!(out.status.code(), Some(0), "applied:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(running(&dockerd, "app-web"));
    let listing =
        dockerd.docker(&["exec", "app-web", "ls", "-l", "/var/run/docker.sock"]).expect("docker exec");
    assert!(listing.starts_with('s'), "the engine socket is mounted: {listing}");
}

/// Hardening II on a real engine: each way out of the default policy (host network, host
/// PID namespace, an added capability, a host device, a bind of `/`, a bind of a symlink a
/// container planted in an allowed root that leads to the engine socket) is refused in
/// preflight with `policy_denied` naming the key, and dockerd is never asked for anything.
#[test]
fn every_way_out_of_the_default_policy_is_refused_before_dockerd_is_asked() {
    let dockerd = Dockerd::start().expect("dockerd starts");
    build_busybox_image(&dockerd, IMAGE, &["/bin/sh", "-c", "sleep 3600"]).expect("image built");
    let dev = Device::new("gw-q", dockerd.socket_path(), 20);
    let base = state(&dev, "one", "sleep 3600", RestartPolicy::UnlessStopped);
    let planted = dev.root.join("app/planted");
    std::fs::create_dir_all(dev.root.join("app")).expect("mkdir");
    std::os::unix::fs::symlink(dockerd.socket_path(), &planted).expect("plant the link");
    let bind = |source: &str| Mount {
        source: MountSource::Bind(source.into()),
        target: "/x".into(),
        read_only: true,
    };
    type Breach = (&'static str, Box<dyn Fn(&mut fleet_spec::model::ContainerSpec)>);
    let planted_text = planted.to_string_lossy().into_owned();
    let cases: Vec<Breach> = vec![
        ("engine.policy.allow_host_network = true", Box::new(|c| c.network_mode = Some("host".into()))),
        ("host_namespaces", Box::new(|c| c.options.pid = Some("host".into()))),
        ("engine.policy.capabilities", Box::new(|c| c.cap_add.push("SYS_ADMIN".into()))),
        (
            "engine.policy.devices",
            Box::new(|c| {
                c.devices.push(DeviceMapping {
                    host_path: "/dev/mem".into(),
                    container_path: "/dev/mem".into(),
                    permissions: "rwm".into(),
                })
            }),
        ),
        ("`bind source /`", Box::new(move |c| c.mounts.push(bind("/")))),
        ("(a symlink to", Box::new(move |c| c.mounts.push(bind(&planted_text)))),
    ];
    for (version, (says, breach)) in (1u64..).zip(cases) {
        let mut desired = base.clone();
        breach(&mut desired.containers[0]);
        let out = dev.apply(&dev.bundle_file(version, &desired));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{says}: refused, nothing changed:\n{stderr}");
        assert!(stderr.contains("policy_denied") && stderr.contains(says), "{says}: {stderr}");
        assert!(inspect(&dockerd, "app-web").is_none(), "{says}: no container was created");
        let networks =
            dockerd.docker(&["network", "ls", "--format", "{{.Name}}"]).expect("docker network ls");
        assert!(!networks.lines().any(|n| n == "app_default"), "{says}: no network: {networks}");
        assert!(!dev.root.join("app/app.conf").exists(), "{says}: no file was written");
    }
    // The same state without the breaches runs.
    let out = dev.apply(&dev.bundle_file(10, &base));
    assert_eq!(out.status.code(), Some(0), "applied:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(running(&dockerd, "app-web"));
}
