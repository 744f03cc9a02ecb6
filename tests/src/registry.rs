//! A real image registry (Docker Distribution 2.8, `docker-registry serve`) on a free
//! loopback port, storing blobs in its temp dir. Plain HTTP: dockerd allows
//! `127.0.0.0/8` registries without TLS by default, and [`crate::Podman`] is configured to.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tempfile::TempDir;

use crate::engine::http_get;
use crate::process::{remove_tempdir, Daemon};
use crate::{free_port, require_program};

/// A running registry. See the module docs.
pub struct Registry {
    daemon: Option<Daemon>,
    dir: Option<TempDir>,
    root: PathBuf,
    port: u16,
}

impl Registry {
    /// Starts the registry and waits (up to 20 s) until `GET /v2/` answers 200.
    pub fn start() -> Result<Registry> {
        let program = require_program("docker-registry")?;
        let dir = crate::short_tempdir("r")?;
        let root = dir.path().to_path_buf();
        let mut last_err = None;
        // A port handed out by free_port can (rarely) be taken by another process meanwhile.
        for _ in 0..3 {
            let port = free_port();
            let config = root.join("registry.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                     delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                    root.join("data").display()
                ),
            )?;
            let mut cmd = Command::new(&program);
            cmd.arg("serve").arg(&config);
            let mut daemon = Daemon::spawn("docker-registry", cmd, &root.join("registry.log"))?;
            let addr = format!("127.0.0.1:{port}");
            match daemon
                .wait_ready(Duration::from_secs(20), || matches!(http_get(&addr, "/v2/"), Ok((200, _))))
            {
                Ok(()) => return Ok(Registry { daemon: Some(daemon), dir: Some(dir), root, port }),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("docker-registry did not start")))
    }

    /// `"127.0.0.1:PORT"`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A reference in this registry: `image("bb:1")` is `"127.0.0.1:PORT/bb:1"`.
    pub fn image(&self, name_and_tag: &str) -> String {
        format!("{}/{name_and_tag}", self.addr())
    }

    /// The temp dir holding `registry.yml`, `registry.log` and the blobs.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
    }
}
