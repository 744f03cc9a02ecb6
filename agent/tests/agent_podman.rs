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

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{health, spec_hash, Device, BIN};
use fleet_e2e::{build_busybox_image, push_image, wait_until, Dockerd, Podman, Registry};
use fleet_spec::model::{DesiredState, Healthcheck, ImageRef, RestartPolicy};
use serde_json::Value;

/// The app (see [`Device::app`]) with a healthcheck that tests for `flag` (a path inside
/// the container).
fn state(dev: &Device, image: &ImageRef, flag: &str) -> DesiredState {
    let healthcheck = Healthcheck {
        test: vec!["CMD-SHELL".into(), format!("test -f {flag}")],
        interval_ms: Some(1000),
        timeout_ms: Some(2000),
        retries: Some(2),
        start_period_ms: None,
    };
    dev.app(image.clone(), "one", "sleep 3600", RestartPolicy::UnlessStopped, healthcheck)
}

/// `fleet-agent status --json`: the agent's local view of its state dir.
fn local_status(dev: &Device) -> Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(&dev.config)
        .env("FLEET_LOG", "debug")
        .output()
        .expect("fleet-agent status runs");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
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
    let dev = Device::new("gw-p", podman.socket_path(), 30);

    // v1: the check passes; podman alone would leave it `starting` until the timeout.
    let v1 = state(&dev, &image, "/etc/app/app.conf");
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
    let status = local_status(&dev);
    assert_eq!(status["status"]["state"], "converged", "{status}");
    assert_eq!(status["status"]["containers"][0]["health"], "healthy", "{status}");
    let hash = v1.container_hash(&v1.containers[0]);
    assert_eq!(spec_hash(&podman, "app-web"), Some(hash.clone()));

    // v2: the check fails: rolled back as unhealthy (well before the 30 s timeout).
    let v2 = state(&dev, &image, "/etc/app/missing");
    let started = Instant::now();
    let out = dev.apply(&dev.bundle_file(2, &v2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "apply v2 must roll back:\n{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "failed fast: {:?}", started.elapsed());
    assert_eq!(spec_hash(&podman, "app-web"), Some(hash.clone()), "v1's container is back");
    let status = local_status(&dev);
    assert_eq!(status["status"]["state"], "rolled_back", "{status}");
    assert_eq!(status["status"]["last_error"]["code"], "unhealthy", "{status}");

    // run: the agent keeps running the checks at rest (v1's container, recreated by the
    // rollback, becomes healthy only that way)...
    let _agent = dev.run();
    wait_until(Duration::from_secs(20), "the recreated container to be healthy", || {
        Ok(health(&podman, "app-web").as_deref() == Some("healthy"))
    })
    .expect("the recreated container is healthy");
    // ...so a failing check is seen: the file it tests deleted behind the agent's back
    // makes the container unhealthy; podman's event makes the agent reconcile, which
    // writes the file again, and the next check passes.
    let conf = dev.root.join("app/app.conf");
    std::fs::remove_file(&conf).expect("rm app.conf");
    wait_until(Duration::from_secs(20), "drift repaired", || Ok(dev.log().contains("drift_repaired")))
        .expect("drift repaired");
    assert_eq!(std::fs::read_to_string(&conf).expect("app.conf is back"), "one");
    assert!(dev.log().contains("health_status: unhealthy"), "{}", dev.log());
    wait_until(Duration::from_secs(20), "healthy again", || {
        Ok(health(&podman, "app-web").as_deref() == Some("healthy"))
    })
    .expect("healthy again");
}
