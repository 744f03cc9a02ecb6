//! Self-update (issue 15) as a device runs it: the real amd64 `.deb` installed with
//! `dpkg -i` on a machine whose PID 1 is systemd ([`Machine`]: this host's root,
//! copy-on-write, under `systemd-nspawn -b`), the packaged unit (`fleet-agent launch`,
//! `Type=notify`, `NotifyAccess=all`, the watchdog, the hardening, `Restart=`) and the
//! agent's state in `/var/lib/fleet-agent`.
//!
//! 1. An update converges and reports the new version without systemd restarting the
//!    service (the launcher switches inside it); a binary that crashes is rolled back
//!    (its `--version` check, slower than the watchdog, does not get the agent killed);
//!    then `dpkg -i` of a newer package takes over from the self-updated agent, as the
//!    cross README says `apt install` does.
//! 2. A new binary that hangs on trial sends no keep-alive: systemd's watchdog (a
//!    drop-in shortens it to 6 s) kills the service, `Restart=on-failure` starts it
//!    again, and the launcher rolls the binary back.
//!
//! The short watchdog also guards test 1: keep-alives that stop reaching systemd
//! across a switch would fail it.
//!
//! Needs the amd64 package (`cross/package.sh --arch amd64`, which CI runs) and
//! `systemd-nspawn`; without them the tests say so and pass, except under CI.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use fleet_e2e::systemd::Machine;
use fleet_e2e::{shipped_agent, shipped_deb, stamp_version, Device, DeviceWatch, FleetRepo, Mosquitto};
use serde_json::Value;

use crate::common::{secs, ship};
use crate::self_update::{agent_version, release_dir, script, update_code};

const UNIT: &str = "fleet-agent.service";
const TRIAL_SECS: u64 = 15;
/// The machine's watchdog (a drop-in; the unit says 120 s).
const WATCHDOG_SECS: u64 = 6;

/// The shipped agent and its package, or `None` (said) when they are not built or no
/// machine can boot here, outside CI.
fn prerequisites() -> Result<Option<(PathBuf, PathBuf)>> {
    let missing = match (shipped_agent(), shipped_deb(), Machine::unavailable()) {
        (Some(agent), Some(deb), None) => return Ok(Some((agent, deb))),
        (None, _, _) => {
            "dist/fleet-agent-x86_64-unknown-linux-musl is missing (bash cross/build.sh --targets x86_64)"
                .to_string()
        }
        (_, None, _) => {
            "dist/fleet-agent_*_amd64.deb is missing (bash cross/package.sh --no-build --arch amd64)"
                .to_string()
        }
        (_, _, Some(why)) => format!("no systemd machine: {why}"),
    };
    if std::env::var_os("CI").is_some() {
        bail!("{missing}: CI builds and installs what these tests need");
    }
    eprintln!("skipped: {missing}");
    Ok(None)
}

struct Setup {
    broker: Mosquitto,
    fleet: FleetRepo,
    machine: Machine,
    watch: DeviceWatch,
    agent: PathBuf,
    /// The amd64 package installed.
    deb: PathBuf,
}

impl Setup {
    /// The unit's journal, for failure messages.
    fn journal(&self) -> String {
        self.machine.journal(UNIT, 80)
    }

    /// The service is up (`active`, `running`).
    fn ensure_active(&self) -> Result<()> {
        let state =
            (self.machine.unit_property(UNIT, "ActiveState")?, self.machine.unit_property(UNIT, "SubState")?);
        ensure!(
            state.0 == "active" && state.1 == "running",
            "the service is {}/{}\n{}",
            state.0,
            state.1,
            self.journal()
        );
        Ok(())
    }

    fn current_slot(&self) -> Option<String> {
        let target = fs::read_link(self.machine.path("/var/lib/fleet-agent/agent/current")).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Declares agent `version` (binary `bytes`) for every device, with a file change
    /// `note`, and publishes; returns the commit.
    fn declare(&mut self, version: &str, bytes: &[u8], note: &str) -> Result<String> {
        let dir = release_dir(&self.fleet, "x86_64", version, bytes)?;
        self.fleet.write("fleet.yaml", fleet_yaml(Some(version)))?;
        self.fleet.write("apps/app/app.conf", format!("note = {note}\n"))?;
        let commit = self.fleet.commit(&format!("agent {version}: {note}"))?;
        self.fleet.build_output(&["--agent-release", &dir.to_string_lossy()])?.check()?;
        self.fleet.publish(&self.broker.url())?;
        Ok(commit)
    }

    fn wait(&self, what: &str, limit: u64, f: impl FnMut(&Value) -> bool) -> Result<Value> {
        self.watch.wait_status(secs(limit), what, f).with_context(|| self.journal())
    }
}

/// The fleet's `fleet.yaml`: files under `/srv/fleet` (the unit's writable root), and
/// the agent release when one is declared.
fn fleet_yaml(agent: Option<&str>) -> String {
    let mut yaml = "name: acme\nbundle_expiry: 30d\nfile_root: /srv/fleet\n".to_string();
    if let Some(version) = agent {
        yaml.push_str(&format!("agent:\n  version: \"{version}\"\n"));
    }
    yaml
}

/// A machine with the package installed, configured for device `gw-1` of a new fleet,
/// the service enabled and booted; the device has converged on a first commit.
fn setup() -> Result<Option<Setup>> {
    let Some((agent, deb)) = prerequisites()? else { return Ok(None) };
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    fleet.write("fleet.yaml", fleet_yaml(None))?;
    fleet.write("apps/app/app.yaml", "files:\n  - source: app.conf\n")?;
    fleet.write("apps/app/app.conf", "note = first\n")?;
    let commit = ship(&mut fleet, &broker, "first")?;

    let mut machine = Machine::new()?;
    fs::copy(&deb, machine.path("/root/fleet-agent.deb"))?;
    machine.run(&["dpkg", "-i", "/root/fleet-agent.deb"])?.check().context("installing the package")?;
    // The config a person writes after installing: this device, this broker, this key.
    let config = Device::builder(&fleet, "gw-1")?
        .broker(&broker.url())
        .setting("", "state_dir", "\"/var/lib/fleet-agent\"")
        .setting("", "allowed_roots", "[\"/srv/fleet\"]")
        .setting("updates", "agent_trial_secs", &TRIAL_SECS.to_string())
        .create()?;
    fs::copy(config.config_path(), machine.path("/etc/fleet-agent/agent.toml"))?;
    machine.run(&["fleet-agent", "check-config", "--config", "/etc/fleet-agent/agent.toml"])?.check()?;
    machine.run(&["systemctl", "enable", UNIT])?.check()?;
    // A watchdog that bites within seconds instead of the unit's 120 s: keep-alives
    // that stop reaching systemd (from the agent, the launcher's child) show in a test.
    let drop_in = machine.path("/etc/systemd/system/fleet-agent.service.d");
    fs::create_dir_all(&drop_in)?;
    fs::write(drop_in.join("watchdog.conf"), format!("[Service]\nWatchdogSec={WATCHDOG_SECS}s\n"))?;

    let watch = DeviceWatch::new(&broker.client(), "acme", "gw-1")?;
    machine.boot()?;
    let s = Setup { broker, fleet, machine, watch, agent, deb };
    s.wait("the packaged agent to converge under systemd", 60, |st| {
        fleet_e2e::fleet::converged_on(st, &commit)
    })?;
    ensure!(
        fs::read_to_string(s.machine.path("/srv/fleet/app/app.conf"))? == "note = first\n",
        "the file was not delivered under /srv/fleet"
    );
    // The service's main process is the launcher.
    let pid = s.machine.unit_property(UNIT, "MainPID")?;
    let cmdline =
        s.machine.run(&["cat", &format!("/proc/{pid}/cmdline")])?.check()?.stdout.replace('\0', " ");
    ensure!(
        cmdline.trim() == "/usr/bin/fleet-agent launch --config /etc/fleet-agent/agent.toml",
        "the service runs {cmdline:?}"
    );
    Ok(Some(s))
}

/// `deb` repacked as package version `version` around `binary` (an agent stamped with
/// that version): what a newer release's package is.
fn repacked_deb(fleet: &FleetRepo, deb: &std::path::Path, version: &str, binary: &[u8]) -> Result<PathBuf> {
    let dir = fleet.scratch(&format!("deb-{version}"))?;
    let tree = dir.join("tree");
    fleet_e2e::fleet::run_command(std::process::Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree))?
        .check()?;
    fs::write(tree.join("usr/bin/fleet-agent"), binary)?;
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control)?;
    let text: Vec<String> = text
        .lines()
        .map(|l| if l.starts_with("Version:") { format!("Version: {version}") } else { l.to_string() })
        .collect();
    fs::write(&control, text.join("\n") + "\n")?;
    let out = dir.join(format!("fleet-agent_{version}_amd64.deb"));
    fleet_e2e::fleet::run_command(
        std::process::Command::new("dpkg-deb").args(["--root-owner-group", "-b"]).arg(&tree).arg(&out),
    )?
    .check()?;
    Ok(out)
}

#[test]
fn under_systemd_the_packaged_agent_updates_itself_rolls_back_and_gives_way_to_a_newer_package() -> Result<()>
{
    let Some(mut s) = setup()? else { return Ok(()) };
    let launcher = s.machine.unit_property(UNIT, "MainPID")?;
    let shipped = fs::read(&s.agent)?;

    // An update: converges, reports the new version, promoted; systemd saw no restart.
    let binary = stamp_version(&shipped, "99.0.0")?;
    let commit = s.declare("99.0.0", &binary, "with 99.0.0")?;
    s.wait("99.0.0 converged under systemd", 120, |st| {
        agent_version(st) == "99.0.0" && fleet_e2e::fleet::converged_on(st, &commit)
    })?;
    let sha = fleet_e2e::fleet::sha256_hex(&binary);
    fleet_e2e::wait_until(secs(TRIAL_SECS + 30), "99.0.0 promoted", || {
        Ok(s.current_slot().as_deref() == Some(&sha))
    })
    .with_context(|| s.journal())?;
    s.ensure_active()?;
    ensure!(
        s.machine.unit_property(UNIT, "NRestarts")? == "0",
        "systemd restarted the service\n{}",
        s.journal()
    );
    ensure!(
        s.machine.unit_property(UNIT, "MainPID")? == launcher,
        "the launcher was replaced\n{}",
        s.journal()
    );

    // A binary that crashes at start: rolled back by the launcher, reported, and the
    // device converges on a later commit with the agent it had.
    // Its `--version` takes longer than the watchdog: the agent checking it keeps
    // sending keep-alives meanwhile.
    let crashing = format!(
        "#!/bin/sh\ncase \"$1\" in\n  --version) sleep {}; echo \"fleet-agent 99.0.1\"; exit 0 ;;\n  check-config) exit 0 ;;\nesac\necho boom >&2; exit 3\n",
        WATCHDOG_SECS + 3
    )
    .into_bytes();
    s.declare("99.0.1", &crashing, "with a crashing 99.0.1")?;
    let st = s.wait("99.0.1 rolled back", TRIAL_SECS + 90, |st| {
        update_code(st) == Some("agent_update_failed")
            && st["agent_update"]["version"].as_str() == Some("99.0.1")
    })?;
    ensure!(agent_version(&st) == "99.0.0", "{st}");
    ensure!(s.current_slot().as_deref() == Some(&sha), "current moved off 99.0.0\n{}", s.journal());
    ensure!(
        s.machine.unit_property(UNIT, "NRestarts")? == "0",
        "systemd restarted the service\n{}",
        s.journal()
    );
    // (The failed release is still declared: it is not tried again.)
    let commit = s.declare("99.0.1", &crashing, "after 99.0.1")?;
    s.wait("converged after the rollback", 60, |st| {
        agent_version(st) == "99.0.0" && fleet_e2e::fleet::converged_on(st, &commit)
    })?;
    ensure!(fs::read_to_string(s.machine.path("/srv/fleet/app/app.conf"))? == "note = after 99.0.1\n");

    // `apt install` of a newer package over the self-updated agent: the package's
    // postinst restarts the service and the launcher runs the newer packaged binary.
    let deb = repacked_deb(&s.fleet, &s.deb, "100.0.0", &stamp_version(&shipped, "100.0.0")?)?;
    fs::copy(&deb, s.machine.path("/root/fleet-agent-100.deb"))?;
    s.machine.run(&["dpkg", "-i", "/root/fleet-agent-100.deb"])?.check().context("upgrading the package")?;
    s.wait("the packaged 100.0.0 runs after the upgrade", 60, |st| agent_version(st) == "100.0.0")?;
    fleet_e2e::wait_until(secs(10), "current is forgotten", || Ok(s.current_slot().is_none()))
        .with_context(|| s.journal())?;
    s.ensure_active()?;
    Ok(())
}

#[test]
fn under_systemd_a_new_agent_that_hangs_is_caught_by_the_watchdog_and_rolled_back() -> Result<()> {
    let Some(mut s) = setup()? else { return Ok(()) };
    let before = s.watch.latest_status().map(|st| agent_version(&st).to_string()).unwrap_or_default();
    // Longer than the watchdog: systemd, not the launcher, notices the hang.
    let hanging = script("77.0.0", "exec sleep 100000");
    s.declare("77.0.0", &hanging, "with a hanging 77.0.0")?;
    let st = s.wait("back on the previous agent after the watchdog", TRIAL_SECS + 90, |st| {
        update_code(st) == Some("agent_update_failed")
            && st["agent_update"]["version"].as_str() == Some("77.0.0")
    })?;
    ensure!(agent_version(&st) == before, "the agent reports {} (was {before})", agent_version(&st));
    let journal = s.journal();
    ensure!(journal.contains("Watchdog timeout"), "systemd's watchdog did not fire\n{journal}");
    let restarts: u32 = s.machine.unit_property(UNIT, "NRestarts")?.parse()?;
    ensure!(restarts >= 1, "systemd did not restart the service\n{journal}");
    s.ensure_active()?;
    let sha = fleet_e2e::fleet::sha256_hex(&hanging);
    ensure!(
        s.machine.path(&format!("/var/lib/fleet-agent/agent/failed/{sha}")).exists(),
        "no failure record"
    );
    ensure!(s.current_slot().as_deref() != Some(&sha), "the hanging binary is current");
    Ok(())
}
