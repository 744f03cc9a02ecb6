//! A private Docker Engine (`dockerd` 20.10, API 1.41) per test.
//!
//! Each instance gets its own data root, exec root, pidfile and API socket in a short temp
//! dir under `/tmp`, its own config file (the system `/etc/docker/daemon.json` is not
//! read), and — so that several instances can run at once — its own network slot:
//! a bridge `fe2e-dN` at `10.(150+N).255.1/24` for the default network (instead of the
//! shared `docker0`, where parallel daemons would hand out the same container IPs) and
//! the address pool `10.(150+N).0.0/17` for user-defined networks. Slots are claimed
//! with lock files in `/tmp/fleet-e2e-locks`, so parallel test processes cooperate too.
//!
//! Dropping a [`Dockerd`] force-removes its containers and networks through the API,
//! stops the daemon (SIGTERM, then SIGKILL), kills any leftover shim/proxy process,
//! unmounts what is still mounted under its temp dir, deletes its bridges and removes
//! the temp dir.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::engine::{engine_get, Engine};
use crate::process::{
    kill_leftovers, machine_lock, process_tree, remove_tempdir, run_output, Daemon, LOCK_DIR,
};
use crate::require_program;

/// Number of parallel dockerd network slots (10.150.x.x .. 10.189.x.x).
const SLOTS: u8 = 40;
const FIRST_OCTET: u8 = 150;

/// An exclusive claim on a network slot, held for the life of a [`Dockerd`].
struct NetSlot {
    index: u8,
    _lock: File,
}

impl NetSlot {
    fn second_octet(&self) -> u8 {
        FIRST_OCTET + self.index
    }

    fn bridge(&self) -> String {
        format!("fe2e-d{}", self.index)
    }

    fn claim() -> Result<NetSlot> {
        fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let routes = run_output(Command::new("ip").args(["-4", "route", "show"])).unwrap_or_default();
        for index in 0..SLOTS {
            let path = Path::new(LOCK_DIR).join(format!("net-{index}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            if file.try_lock().is_err() {
                continue;
            }
            let slot = NetSlot { index, _lock: file };
            // A bridge left by a killed test process: nobody holds the slot, so it is stale.
            delete_link(&slot.bridge());
            let prefix = format!("10.{}.", slot.second_octet());
            let stale_bridge = format!("dev {} ", slot.bridge());
            if routes.lines().any(|r| r.starts_with(&prefix) && !r.contains(&stale_bridge)) {
                continue; // the host uses this range for something else
            }
            return Ok(slot);
        }
        bail!("all {SLOTS} dockerd network slots are in use (locks in {LOCK_DIR})")
    }
}

/// Deletes network interface `name` if it exists.
pub(crate) fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = run_output(Command::new("ip").args(["link", "del", name]));
    }
}

/// A running private `dockerd`. See the module docs.
pub struct Dockerd {
    daemon: Option<Daemon>,
    dir: Option<TempDir>,
    root: PathBuf,
    socket: PathBuf,
    slot: Option<NetSlot>,
}

/// A directory holding an `iptables` that dockerd finds first on its `PATH`: it passes
/// every call to the real one except flushing or deleting the shared `DOCKER*` chains.
///
/// Every dockerd flushes and deletes those chains when it starts, then creates them again.
/// On one machine with one daemon that is harmless; here several test daemons share the
/// host's tables, and a daemon that creates a network in that window fails with
/// `iptables -t nat -I DOCKER …: No chain/target/match by that name` (it once failed a CI
/// run). Keeping the chains makes each start add to them instead; each daemon still
/// removes its own rules when it removes a network.
fn iptables_shim(root: &Path) -> Result<PathBuf> {
    let real = require_program("iptables").context("dockerd needs iptables")?;
    let dir = root.join("shims");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = format!(
        "#!/bin/sh\n\
         # fleet-e2e: keep the DOCKER* chains other test daemons use (see tests/src/dockerd.rs)\n\
         case \" $* \" in\n\
         *\" -F DOCKER\"*|*\" -X DOCKER\"*) exit 0 ;;\n\
         esac\n\
         exec '{}' \"$@\"\n",
        real.display()
    );
    let shim = dir.join("iptables");
    fs::write(&shim, script).with_context(|| format!("writing {}", shim.display()))?;
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", shim.display()))?;
    Ok(dir)
}

impl Dockerd {
    /// Starts a dockerd and waits (up to 60 s) until `GET /_ping` answers `OK`.
    pub fn start() -> Result<Dockerd> {
        let dockerd = require_program("dockerd")?;
        require_program("containerd")?;
        require_program("runc")?;
        require_program("ip").context("iproute2 is needed to give each dockerd its own bridge")?;
        let dir = crate::short_tempdir("d")?;
        let root = dir.path().to_path_buf();
        let socket = root.join("d.sock");
        let mut me = Dockerd { daemon: None, dir: Some(dir), root: root.clone(), socket, slot: None };

        let slot = NetSlot::claim()?;
        let bridge = slot.bridge();
        let octet = slot.second_octet();
        me.slot = Some(slot);
        run_output(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]))?;
        run_output(Command::new("ip").args([
            "addr",
            "add",
            &format!("10.{octet}.255.1/24"),
            "dev",
            &bridge,
        ]))?;
        run_output(Command::new("ip").args(["link", "set", &bridge, "up"]))?;

        let config = root.join("daemon.json");
        fs::write(&config, "{}\n").context("writing daemon.json")?;
        let shims = iptables_shim(&root)?;
        let mut cmd = Command::new(dockerd);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(std::iter::once(shims).chain(std::env::split_paths(&path)))
            .context("building dockerd's PATH")?;
        cmd.env("PATH", path);
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("x"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", me.socket.display()))
            .arg(format!("--bridge={bridge}"))
            .arg(format!("--default-address-pool=base=10.{octet}.0.0/17,size=24"));
        // dockerd (re)creates the shared DOCKER* iptables chains while it starts: two
        // daemons starting at once fail with "Chain already exists" / "No chain". Once up,
        // they coexist (published loopback ports go through docker-proxy), except for the
        // chains' deletion, which `iptables_shim` takes out.
        let startup = machine_lock("dockerd-startup", Duration::from_secs(300))?;
        let mut daemon = Daemon::spawn("dockerd", cmd, &root.join("dockerd.log"))?;
        let socket = me.socket.clone();
        let ready = daemon.wait_ready(
            Duration::from_secs(60),
            || matches!(engine_get(&socket, "/_ping"), Ok((200, ref body)) if body.trim() == "OK"),
        );
        drop(startup);
        me.daemon = Some(daemon);
        ready?;
        Ok(me)
    }

    /// The API socket (`DOCKER_HOST=unix://<this>`).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Runs the Docker CLI against this daemon; returns stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        Engine::docker(self, args)
    }

    /// The temp dir holding data root, exec root, socket and `dockerd.log`.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default()
    }

    /// The bridge of the default network (`fe2e-dN`).
    pub fn bridge(&self) -> Option<String> {
        self.slot.as_ref().map(NetSlot::bridge)
    }

    /// PID of the dockerd process.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    fn shutdown(&mut self) {
        let mut bridges: Vec<String> = Vec::new();
        if let Some(mut daemon) = self.daemon.take() {
            if daemon.check_alive().is_ok() {
                if let Err(e) = self.remove_everything(&mut bridges) {
                    if daemon.check_alive().is_ok() {
                        eprintln!("fleet-e2e: cleaning up dockerd {}: {e:#}", self.root.display());
                    }
                }
            }
            let tree = daemon.pid().map(process_tree).unwrap_or_default();
            daemon.stop(Duration::from_secs(20));
            kill_leftovers(&self.root, &tree);
        }
        for bridge in bridges.iter().chain(self.bridge().iter()) {
            delete_link(bridge);
        }
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
        self.slot = None;
    }

    /// Force-removes all containers and user-defined networks, noting their bridges.
    fn remove_everything(&self, bridges: &mut Vec<String>) -> Result<()> {
        for c in self.containers()? {
            if let Some(id) = c.get("Id").and_then(Value::as_str) {
                let (status, body) = self.delete(&format!("/v1.41/containers/{id}?force=1&v=1"))?;
                if !(200..300).contains(&status) && status != 404 {
                    eprintln!("fleet-e2e: removing container {id}: HTTP {status}: {body}");
                }
            }
        }
        let networks = self.get_json("/v1.41/networks")?;
        for n in networks.as_array().ok_or_else(|| anyhow!("networks is not a list"))? {
            let name = n.get("Name").and_then(Value::as_str).unwrap_or_default();
            let Some(id) = n.get("Id").and_then(Value::as_str) else { continue };
            if ["bridge", "host", "none"].contains(&name) {
                continue;
            }
            let custom = n.pointer("/Options/com.docker.network.bridge.name").and_then(Value::as_str);
            bridges.push(custom.map_or_else(|| format!("br-{}", &id[..id.len().min(12)]), str::to_string));
            let _ = self.delete(&format!("/v1.41/networks/{id}"));
        }
        Ok(())
    }
}

impl Engine for Dockerd {
    fn socket_path(&self) -> &Path {
        &self.socket
    }

    fn work_dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}
