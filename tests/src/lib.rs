//! End-to-end test harness for the fleet: starts *real* components as child processes.
//!
//! Every component runs on a free loopback port (or a unix socket) inside its own temp
//! dir under `/tmp`, writes its log there, and is stopped by PID when dropped:
//!
//! | component | type | notes |
//! |---|---|---|
//! | Mosquitto 2.0 | [`Mosquitto`] | ACL/password files, stop/restart on the same port |
//! | Docker Engine 20.10 | [`Dockerd`] | own data root, bridge and address pool: instances run in parallel |
//! | podman 4.3 Docker-compatible API | [`Podman`] | isolated storage; one instance at a time per machine |
//! | RabbitMQ 3.10 + MQTT, N nodes | [`RabbitCluster`] | one cluster on one machine, own epmd and cookie |
//! | Docker Distribution 2.8 | [`Registry`] | plain HTTP on 127.0.0.1 |
//! | static HTTP files | [`StaticHttpServer`] | `Range: bytes=N-`, optional dropped first transfer or several cuts per path |
//! | nginx 1.22 | [`Nginx`] | a build output with the README's cache headers; JSON access log |
//! | hostile HTTP | [`HostileHttpServer`] | trickling, wrong or no answers; every connection logged |
//! | Git repositories | [`GitRepo`] | reproducible commit ids |
//! | a machine booted by systemd | [`systemd::Machine`] | the host's root, copy-on-write, under `systemd-nspawn -b` |
//!
//! Helpers: [`free_port`], [`wait_until`], MQTT clients over the `mosquitto_*` CLIs
//! ([`Mqtt`], [`Subscription`]), HTTP over unix sockets ([`engine_get`], [`engine_post`],
//! [`engine_delete`], the [`Engine`] trait), images built from `busybox-static`
//! ([`build_busybox_image`], [`push_image`]) and the workspace's own binaries
//! ([`workspace_bin`]).
//!
//! The fleet itself ([`fleet`]): a Git fleet repository with keys and served build
//! output driven through `fleet-bundler` ([`FleetRepo`]), devices running `fleet-agent`
//! ([`Device`]) and what they publish on MQTT ([`DeviceWatch`]).
//!
//! A missing program makes the constructor fail with "... run scripts/setup.sh"; a
//! component that does not come up fails with the tail of its log. Set
//! `FLEET_E2E_KEEP=1` to keep the temp dirs (and logs) of stopped components.

mod bins;
pub mod chromium;
mod dockerd;
mod engine;
pub mod fleet;
mod git;
pub mod hostile_http;
mod http_server;
mod images;
mod mosquitto;
pub mod mqtt;
pub mod nginx;
pub mod pki;
mod podman;
mod process;
mod rabbitmq;
mod registry;
pub mod systemd;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use bins::{artifact_path, shipped_agent, shipped_deb, stamp_version, workspace_bin, workspace_bin_of};
pub use chromium::{Chromium, Page};
pub use dockerd::Dockerd;
pub use engine::{engine_delete, engine_get, engine_post, engine_request, http_get, Engine, HttpResponse};
pub use fleet::{AgentCommand, CmdOutput, Device, DeviceBuilder, DeviceWatch, FleetRepo, IndexEntry};
pub use git::GitRepo;
pub use hostile_http::{HostileHttpServer, Hostility};
pub use http_server::{ServedRequest, StaticHttpOptions, StaticHttpServer};
pub use images::{build_busybox_image, build_image, push_image, BUSYBOX_APPLETS};
pub use mosquitto::{Mosquitto, MosquittoBuilder};
pub use mqtt::{Message, Mqtt, Subscription};
pub use nginx::{Nginx, NginxRequest};
pub use podman::Podman;
pub use rabbitmq::RabbitCluster;
pub use registry::Registry;

/// Returns a loopback TCP port that is free right now (bound to `127.0.0.1:0`, then
/// released). Never returns the same port twice within one process, so parallel tests
/// do not race each other for it.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0 must work on a test machine");
        let mut given = given.lock().unwrap_or_else(|e| e.into_inner());
        if given.insert(port) {
            return port;
        }
    }
}

/// Polls `f` every 50 ms until it returns `Ok(true)`, for at most `deadline`.
///
/// `Ok(false)` and `Err(_)` both mean "not yet" (typical while a daemon starts); on
/// timeout the error names `what` and carries the last error `f` returned, if any.
pub fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    let mut last_err: Option<anyhow::Error> = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= deadline {
            return match last_err {
                Some(e) => Err(e.context(format!("timed out after {deadline:?} waiting for {what}"))),
                None => bail!("timed out after {deadline:?} waiting for {what}"),
            };
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Finds `program` on `PATH` (or checks an absolute path), failing with a hint to run
/// `scripts/setup.sh` when it is not installed.
pub fn require_program(program: &str) -> Result<PathBuf> {
    let candidate = Path::new(program);
    if candidate.is_absolute() {
        if candidate.is_file() {
            return Ok(candidate.to_path_buf());
        }
    } else if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let full = dir.join(program);
            if full.is_file() {
                return Ok(full);
            }
        }
    }
    bail!("`{program}` is not installed: run scripts/setup.sh (as root) first")
}

/// Creates a temp dir directly under `/tmp` with a short name (`/tmp/fe2e-<tag>XXXXXX`):
/// unix socket paths are limited to 108 bytes, so `$TMPDIR` (possibly long) is not used.
pub(crate) fn short_tempdir(tag: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("fe2e-{tag}"))
        .tempdir_in("/tmp")
        .with_context(|| format!("creating a temp dir for {tag} under /tmp"))
}

/// Whether `FLEET_E2E_KEEP=1` asks to keep stopped components' temp dirs for debugging.
pub(crate) fn keep_tempdirs() -> bool {
    std::env::var("FLEET_E2E_KEEP").is_ok_and(|v| v == "1")
}

/// The last `lines` lines of a log file, preceded by its last few error-looking lines
/// from further up (daemons often log their fatal error before a long shutdown).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let errors: Vec<&str> = all[..start]
                .iter()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("error") || l.contains("fatal") || l.contains("failed")
                })
                .copied()
                .collect();
            let mut out = String::new();
            if !errors.is_empty() {
                let from = errors.len().saturating_sub(10);
                out.push_str(&format!(
                    "--- errors in {} ---\n{}\n",
                    path.display(),
                    errors[from..].join("\n")
                ));
            }
            out.push_str(&format!("--- last lines of {} ---\n{}", path.display(), all[start..].join("\n")));
            out
        }
        Err(e) => format!("(cannot read log {}: {e})", path.display()),
    }
}
