//! A private Mosquitto 2.0 broker on a free loopback port, with optional password file,
//! ACL file, persistence and extra configuration, which can be stopped and restarted on
//! the same port (broker outage tests).
//!
//! With [`MosquittoBuilder::websockets`] it also listens for MQTT over WebSockets on a
//! second free loopback port (what the browser dashboard connects to).
//!
//! The broker runs as root (`user root`, so it can read its files in the 0700 temp dir)
//! and logs everything (`log_type all`, including ACL denials) to `mosquitto.log`.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::mqtt::Mqtt;
use crate::process::{remove_tempdir, run_output, Daemon};
use crate::{free_port, require_program};

/// Configures a [`Mosquitto`] before starting it.
#[derive(Debug, Clone)]
pub struct MosquittoBuilder {
    allow_anonymous: bool,
    users: Vec<(String, String)>,
    acl: Option<String>,
    persistence: bool,
    websockets: bool,
    extra: String,
}

impl Default for MosquittoBuilder {
    fn default() -> Self {
        MosquittoBuilder {
            allow_anonymous: true,
            users: Vec::new(),
            acl: None,
            persistence: false,
            websockets: false,
            extra: String::new(),
        }
    }
}

impl MosquittoBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// `allow_anonymous` (default true).
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }

    /// Adds a user to the password file (hashed with `mosquitto_passwd`).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.to_string(), password.to_string()));
        self
    }

    /// The ACL file's contents, e.g.
    /// `"user admin\ntopic readwrite #\n\npattern readwrite fleet/+/devices/%c/#\n"`.
    pub fn acl(mut self, contents: &str) -> Self {
        self.acl = Some(contents.to_string());
        self
    }

    /// Keep retained messages and sessions across [`Mosquitto::restart`] (default false).
    pub fn persistence(mut self, on: bool) -> Self {
        self.persistence = on;
        self
    }

    /// Also listen for MQTT over WebSockets (`listener PORT 127.0.0.1` + `protocol
    /// websockets`) on a second free port: [`Mosquitto::ws_url`]. The password file
    /// and the ACL apply to both listeners (`per_listener_settings false`).
    pub fn websockets(mut self, on: bool) -> Self {
        self.websockets = on;
        self
    }

    /// Extra lines for `mosquitto.conf` (listeners, limits, ...).
    pub fn extra(mut self, config: &str) -> Self {
        self.extra.push_str(config);
        self.extra.push('\n');
        self
    }

    /// Writes the configuration and starts the broker.
    pub fn start(self) -> Result<Mosquitto> {
        let program = require_program("mosquitto")?;
        let dir = crate::short_tempdir("m")?;
        let root = dir.path().to_path_buf();
        let port = free_port();
        let ws_port = if self.websockets { Some(free_port()) } else { None };
        let mut conf = String::new();
        writeln!(conf, "listener {port} 127.0.0.1")?;
        if let Some(ws) = ws_port {
            writeln!(conf, "listener {ws} 127.0.0.1\nprotocol websockets")?;
        }
        writeln!(conf, "allow_anonymous {}", self.allow_anonymous)?;
        writeln!(conf, "user root\nlog_dest stderr\nlog_type all\nconnection_messages true")?;
        if self.persistence {
            writeln!(conf, "persistence true\npersistence_location {}/", root.display())?;
        } else {
            writeln!(conf, "persistence false")?;
        }
        if !self.users.is_empty() {
            let passwd = root.join("passwd");
            fs::write(&passwd, "").context("creating the password file")?;
            let tool = require_program("mosquitto_passwd")?;
            for (user, pass) in &self.users {
                run_output(Command::new(&tool).arg("-b").arg(&passwd).arg(user).arg(pass))?;
            }
            writeln!(conf, "password_file {}", passwd.display())?;
        }
        if let Some(acl) = &self.acl {
            let path = root.join("acl");
            fs::write(&path, acl).context("writing the ACL file")?;
            writeln!(conf, "acl_file {}", path.display())?;
        }
        conf.push_str(&self.extra);
        let config = root.join("mosquitto.conf");
        fs::write(&config, conf).context("writing mosquitto.conf")?;
        let mut broker = Mosquitto { daemon: None, dir: Some(dir), root, port, ws_port, config, program };
        broker.spawn()?;
        Ok(broker)
    }
}

/// A running Mosquitto broker. See the module docs.
pub struct Mosquitto {
    daemon: Option<Daemon>,
    dir: Option<TempDir>,
    root: PathBuf,
    port: u16,
    ws_port: Option<u16>,
    config: PathBuf,
    program: PathBuf,
}

impl Mosquitto {
    /// An anonymous broker without persistence.
    pub fn start() -> Result<Mosquitto> {
        MosquittoBuilder::new().start()
    }

    /// An anonymous broker with extra configuration lines.
    pub fn start_with(config_extra: &str) -> Result<Mosquitto> {
        MosquittoBuilder::new().extra(config_extra).start()
    }

    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder::new()
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.program);
        cmd.arg("-c").arg(&self.config);
        let mut daemon = Daemon::spawn("mosquitto", cmd, &self.root.join("mosquitto.log"))?;
        let addr = format!("127.0.0.1:{}", self.port);
        let ws_addr = self.ws_port.map(|p| format!("127.0.0.1:{p}"));
        let ready = daemon.wait_ready(Duration::from_secs(10), || {
            TcpStream::connect(&addr).is_ok()
                && ws_addr.as_ref().is_none_or(|a| TcpStream::connect(a).is_ok())
        });
        self.daemon = Some(daemon);
        ready
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `"mqtt://127.0.0.1:PORT"`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `"ws://127.0.0.1:WS_PORT"`, when started with [`MosquittoBuilder::websockets`].
    pub fn ws_url(&self) -> Option<String> {
        self.ws_port.map(|p| format!("ws://127.0.0.1:{p}"))
    }

    /// An anonymous client of this broker.
    pub fn client(&self) -> Mqtt {
        Mqtt::new(self.port)
    }

    /// A client of this broker logging in as `user`.
    pub fn client_as(&self, user: &str, password: &str) -> Mqtt {
        Mqtt::new(self.port).with_credentials(user, password)
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.check_alive().is_ok())
    }

    /// Stops the broker (SIGTERM, which also saves persistence). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
    }

    /// Starts the broker again on the same port with the same configuration (stopping
    /// it first if it is running).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("mosquitto.log")).unwrap_or_default()
    }

    /// The temp dir holding `mosquitto.conf`, `mosquitto.log`, `passwd`, `acl`.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
    }
}
