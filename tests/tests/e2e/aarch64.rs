//! The cross-compiled aarch64 agent, emulated by `qemu-aarch64-static`, in a real
//! scenario (issue 6): it receives a bundle over the real broker, applies its files and
//! its container through the host's `dockerd` socket, and reports `converged`.
//!
//! The binary comes from `cross/build.sh` (static, size profile): `scripts/test.sh`
//! builds it and sets `FLEET_AGENT_AARCH64`. Without that variable the test is skipped
//! with a message, except under CI (`CI=true`), where a missing binary fails it.

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use fleet_e2e::fleet::state;
use fleet_e2e::{require_program, AgentCommand, Device, DeviceWatch, Dockerd, Engine, FleetRepo, Mosquitto};

use crate::common::*;
use crate::engines::{web_app, Health, Images, TestEngine};

fn aarch64_agent() -> Result<Option<AgentCommand>> {
    let Some(binary) = std::env::var_os("FLEET_AGENT_AARCH64").map(PathBuf::from) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("FLEET_AGENT_AARCH64 is not set under CI: scripts/test.sh builds it with cross/build.sh");
        }
        eprintln!("skipped: set FLEET_AGENT_AARCH64 to a cross-built agent (bash cross/build.sh)");
        return Ok(None);
    };
    ensure!(binary.is_file(), "FLEET_AGENT_AARCH64={} is not a file", binary.display());
    let runner = require_program("qemu-aarch64-static")?;
    Ok(Some(AgentCommand { binary, runner: Some(runner) }))
}

#[test]
fn emulated_aarch64_agent_applies_files_and_a_container_and_converges() -> Result<()> {
    let Some(agent) = aarch64_agent()? else { return Ok(()) };
    let engine = TestEngine::Dockerd(Dockerd::start()?);
    let images = Images::push(&engine)?;
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("pi-1", &[("hardware", "rpi4")])?;
    web_app(&fleet, &images.tag(1), "greeting = from arm\n", Health::Good)?;

    let mut device = Device::builder(&fleet, "pi-1")?
        .broker(&broker.url())
        .engine(engine.socket_path())
        // Emulation is slow: give health a wider margin than native agents get.
        .health_timeout_secs(60)
        .agent(agent)
        .create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let commit = ship(&mut fleet, &broker, "web on the aarch64 device")?;

    let status = wait_converged(&watch, &device, &commit)?;
    assert_eq!(state(&status), "converged", "{status}");
    assert_file(&device, &fleet.app_file("web", "files/app.conf"), "greeting = from arm\n");
    let web = engine.container("web-web")?;
    assert!(web.running(), "web-web is not running");
    assert_eq!(web.image(), images.pinned(1), "the container runs the image pinned by digest");
    assert_eq!(engine.docker(&["exec", "web-web", "cat", "/etc/app.conf"])?, "greeting = from arm\n");
    Ok(())
}
