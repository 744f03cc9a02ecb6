//! podman's Docker-compatible API (`podman system service`), with isolated storage.
//!
//! Each instance writes its own `containers.conf` (runtime `runc`, `default_ulimits = []`
//! — this sandbox forbids raising rlimits and crun cannot handle its hybrid cgroups —,
//! cgroupfs, file events, netavark networking with a private network config dir),
//! `storage.conf` (graph root and run root in the temp dir) and `registries.conf` (plain
//! HTTP allowed for `127.0.0.1` and `localhost` registries, so images can be pulled from
//! a [`crate::Registry`]), passed through `CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF` and
//! `CONTAINERS_REGISTRIES_CONF`.
//!
//! Rootful podman instances share `/run/containers/networks` (netavark's IPAM database and
//! aardvark-dns configuration, keyed by network name) and choose bridge names and subnets
//! without seeing each other's networks, so two instances creating the same network would
//! collide: only one [`Podman`] runs at a time per machine (a lock file in
//! `/tmp/fleet-e2e-locks`; `start` waits for it). dockerd instances run alongside.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use tempfile::TempDir;

use crate::engine::{engine_get, Engine};
use crate::process::{kill_leftovers, machine_lock, process_tree, remove_tempdir, run_output, Daemon};
use crate::require_program;

/// How long `Podman::start` waits for another instance to finish.
const LOCK_WAIT: Duration = Duration::from_secs(600);
const NETAVARK: &str = "/usr/lib/podman/netavark";
const CATATONIT: &str = "/usr/bin/catatonit";

/// A running podman API service. See the module docs.
pub struct Podman {
    daemon: Option<Daemon>,
    dir: Option<TempDir>,
    root: PathBuf,
    socket: PathBuf,
    _lock: File,
}

impl Podman {
    /// Starts `podman system service` on a unix socket and waits (up to 60 s) until
    /// `/_ping` and `/v1.41/_ping` answer.
    pub fn start() -> Result<Podman> {
        let podman = require_program("podman")?;
        require_program("runc")?;
        require_program("conmon")?;
        let lock = machine_lock("podman", LOCK_WAIT)?;
        let dir = crate::short_tempdir("p")?;
        let root = dir.path().to_path_buf();
        let socket = root.join("p.sock");
        let mut me = Podman { daemon: None, dir: Some(dir), root: root.clone(), socket, _lock: lock };
        me.write_configs()?;
        let mut cmd = Command::new(podman);
        cmd.envs(me.env())
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", me.socket.display()));
        let mut daemon = Daemon::spawn("podman system service", cmd, &root.join("podman.log"))?;
        let socket = me.socket.clone();
        let ready = daemon.wait_ready(Duration::from_secs(60), || {
            matches!(engine_get(&socket, "/_ping"), Ok((200, _)))
                && matches!(engine_get(&socket, "/v1.41/_ping"), Ok((200, _)))
        });
        me.daemon = Some(daemon);
        ready?;
        Ok(me)
    }

    fn write_configs(&self) -> Result<()> {
        let r = &self.root;
        for sub in ["net", "tmp", "root", "run"] {
            fs::create_dir_all(r.join(sub))?;
        }
        let backend = if Path::new(NETAVARK).exists() {
            "netavark"
        } else {
            eprintln!("fleet-e2e: netavark missing: podman falls back to CNI, without network aliases (run scripts/setup.sh)");
            "cni"
        };
        // Compose `init: true` runs catatonit as PID 1 (Debian's package puts it here).
        let init_path = if Path::new(CATATONIT).exists() {
            format!("init_path = \"{CATATONIT}\"\n")
        } else {
            eprintln!("fleet-e2e: catatonit missing: podman cannot run `init: true` (run scripts/setup.sh)");
            String::new()
        };
        let containers_conf = format!(
            "[containers]\ndefault_ulimits = []\n{init_path}\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             tmp_dir = \"{tmp}\"\n\n\
             [network]\nnetwork_backend = \"{backend}\"\nnetwork_config_dir = \"{net}\"\n",
            tmp = r.join("tmp").display(),
            net = r.join("net").display(),
        );
        fs::write(r.join("containers.conf"), containers_conf)?;
        let storage_conf = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            r.join("root").display(),
            r.join("run").display()
        );
        fs::write(r.join("storage.conf"), storage_conf)?;
        let registries = "unqualified-search-registries = []\n\n\
                          [[registry]]\nlocation = \"127.0.0.1\"\ninsecure = true\n\n\
                          [[registry]]\nlocation = \"localhost\"\ninsecure = true\n";
        fs::write(r.join("registries.conf"), registries)?;
        Ok(())
    }

    /// Environment that points a `podman` command at this instance's configuration.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("CONTAINERS_CONF", self.root.join("containers.conf")),
            ("CONTAINERS_STORAGE_CONF", self.root.join("storage.conf")),
            ("CONTAINERS_REGISTRIES_CONF", self.root.join("registries.conf")),
        ]
    }

    /// Runs the `podman` CLI directly on this instance's storage; returns stdout.
    pub fn podman(&self, args: &[&str]) -> Result<String> {
        run_output(Command::new(require_program("podman")?).envs(self.env()).args(args))
    }

    /// Runs the Docker CLI against this instance's API socket; returns stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        Engine::docker(self, args)
    }

    /// The API socket (`DOCKER_HOST=unix://<this>`).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The temp dir holding configuration, storage, socket and `podman.log`.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("podman.log")).unwrap_or_default()
    }

    /// Force-removes all containers and networks but `podman`, noting their bridges.
    fn remove_everything(&self, bridges: &mut Vec<String>) -> Result<()> {
        for c in self.containers()? {
            if let Some(id) = c.get("Id").and_then(Value::as_str) {
                let _ = self.delete(&format!("/v1.41/containers/{id}?force=1&v=1"));
            }
        }
        if let Some(nets) = self.get_json("/v4.0.0/libpod/networks/json")?.as_array() {
            for n in nets {
                let name = n.get("name").and_then(Value::as_str).unwrap_or_default();
                if name == "podman" {
                    continue;
                }
                if let Some(iface) = n.get("network_interface").and_then(Value::as_str) {
                    bridges.push(iface.to_string());
                }
                let _ = self.delete(&format!("/v4.0.0/libpod/networks/{name}?force=true"));
            }
        }
        Ok(())
    }
}

impl Engine for Podman {
    fn socket_path(&self) -> &Path {
        &self.socket
    }

    fn work_dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let mut bridges = Vec::new();
        if let Some(mut daemon) = self.daemon.take() {
            if daemon.check_alive().is_ok() {
                if let Err(e) = self.remove_everything(&mut bridges) {
                    if daemon.check_alive().is_ok() {
                        eprintln!("fleet-e2e: cleaning up podman {}: {e:#}", self.root.display());
                    }
                }
            }
            let tree = daemon.pid().map(process_tree).unwrap_or_default();
            daemon.stop(Duration::from_secs(10));
            kill_leftovers(&self.root, &tree);
        }
        for bridge in &bridges {
            crate::dockerd::delete_link(bridge);
        }
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
    }
}
