//! nginx (Debian's `nginx-light`) serving a directory on a free loopback port, as a
//! user's bundle server would: the build output with the cache headers the README
//! recommends, `Range` and `ETag`/`If-None-Match` as nginx does them by default.
//!
//! nginx runs in the foreground (`-g 'daemon off;'`) with its own configuration, prefix,
//! pid file, logs and temp paths in a temp dir (`user root;` when started as root, so
//! its worker can read the 0700 temp dirs). Every request is logged as one JSON line
//! ([`Nginx::requests`]): status, bytes, the `Range` and `If-None-Match` asked for, the
//! `ETag`, `Content-Range` and `Cache-Control` sent.
//!
//! Not installed is an error naming `scripts/setup.sh`, never a skipped test.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{remove_tempdir, Daemon};
use crate::{free_port, require_program};

/// The `location` blocks for a build output (`fleet-bundler build --out DIR`): what
/// devices poll is revalidated on every request, bundles (content-addressed: a name is
/// never reused for other bytes) are cached for a year. The README shows the same.
pub const BUNDLE_SERVER_LOCATIONS: &str = r#"location /devices/ {
    add_header Cache-Control "no-cache";
}
location = /index.json {
    add_header Cache-Control "no-cache";
}
location /bundles/ {
    add_header Cache-Control "public, max-age=31536000, immutable";
}
"#;

/// One request nginx answered (a line of its access log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxRequest {
    pub method: String,
    /// The URI as requested (path and query).
    pub uri: String,
    pub status: u16,
    /// Body bytes sent.
    pub body_bytes: u64,
    /// The request's `Range` header (`""` when none).
    pub range: String,
    /// The request's `If-None-Match` header (`""` when none).
    pub if_none_match: String,
    /// The response's `ETag`, `Content-Range` and `Cache-Control` (`""` when none).
    pub etag: String,
    pub content_range: String,
    pub cache_control: String,
}

/// A running nginx. Stopped (SIGTERM to the master, by PID) on drop.
pub struct Nginx {
    daemon: Option<Daemon>,
    dir: Option<TempDir>,
    root: PathBuf,
    port: u16,
    https: bool,
}

impl Nginx {
    /// Serves `www` on `127.0.0.1:<free port>` with [`BUNDLE_SERVER_LOCATIONS`].
    pub fn serve(www: &Path) -> Result<Nginx> {
        Self::serve_with(www, BUNDLE_SERVER_LOCATIONS)
    }

    /// Serves `www` with these lines in its `server` block (locations, headers...).
    pub fn serve_with(www: &Path, server_extra: &str) -> Result<Nginx> {
        let dir = crate::short_tempdir("n")?;
        let root = dir.path().to_path_buf();
        Self::start(www, server_extra, root, Some(dir), false)
    }

    /// Like [`Nginx::serve_with`] over HTTPS: `server_extra` must name the
    /// `ssl_certificate` and `ssl_certificate_key` (and may ask for client certificates).
    pub fn serve_tls(www: &Path, server_extra: &str) -> Result<Nginx> {
        let dir = crate::short_tempdir("n")?;
        let root = dir.path().to_path_buf();
        Self::start(www, server_extra, root, Some(dir), true)
    }

    /// Like [`Nginx::serve`], with its configuration, logs and temp files in `dir`
    /// (created; left in place when stopped), e.g. for `fleet-demo --nginx`.
    pub fn serve_in(www: &Path, dir: &Path) -> Result<Nginx> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let root = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
        Self::start(www, BUNDLE_SERVER_LOCATIONS, root, None, false)
    }

    fn start(
        www: &Path,
        server_extra: &str,
        root: PathBuf,
        dir: Option<TempDir>,
        https: bool,
    ) -> Result<Nginx> {
        let program = nginx_program()?;
        let port = free_port();
        let www = www.canonicalize().with_context(|| format!("the directory to serve: {}", www.display()))?;
        let r = root.display();
        let mut conf = String::new();
        // As root the worker would otherwise run as `nobody`, which cannot read 0700
        // temp dirs; as another user nginx ignores the directive (with a warning).
        if is_root() {
            writeln!(conf, "user root;")?;
        }
        writeln!(conf, "worker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/error.log info;")?;
        writeln!(conf, "events {{ worker_connections 256; }}")?;
        writeln!(conf, "http {{")?;
        for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            writeln!(conf, "    {t}_temp_path {r}/tmp/{t};")?;
        }
        writeln!(
            conf,
            "    types {{ application/json json; text/html html; text/css css; application/javascript js; }}"
        )?;
        writeln!(conf, "    default_type application/octet-stream;")?;
        writeln!(conf, "    sendfile on;")?;
        writeln!(
            conf,
            "    log_format fleet escape=json '{{\"method\":\"$request_method\",\"uri\":\"$request_uri\",\
             \"status\":$status,\"body_bytes\":$body_bytes_sent,\"range\":\"$http_range\",\
             \"if_none_match\":\"$http_if_none_match\",\"etag\":\"$sent_http_etag\",\
             \"content_range\":\"$sent_http_content_range\",\"cache_control\":\"$sent_http_cache_control\"}}';"
        )?;
        writeln!(conf, "    access_log {r}/access.log fleet;")?;
        let ssl = if https { " ssl" } else { "" };
        writeln!(
            conf,
            "    server {{\n        listen 127.0.0.1:{port}{ssl};\n        root {};",
            www.display()
        )?;
        for line in server_extra.lines() {
            writeln!(conf, "        {line}")?;
        }
        writeln!(conf, "    }}\n}}")?;
        fs::create_dir_all(root.join("tmp")).context("creating nginx's temp dir")?;
        let config = root.join("nginx.conf");
        fs::write(&config, conf).with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = Command::new(program);
        cmd.arg("-c").arg(&config).arg("-p").arg(&root).arg("-e").arg(root.join("error.log"));
        cmd.args(["-g", "daemon off;"]);
        let mut daemon = Daemon::spawn("nginx", cmd, &root.join("nginx.log"))?;
        daemon
            .wait_ready(Duration::from_secs(15), || TcpStream::connect(("127.0.0.1", port)).is_ok())
            .with_context(|| crate::log_tail(&root.join("error.log"), 20))?;
        Ok(Nginx { daemon: Some(daemon), dir, root, port, https })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`Nginx::serve_tls`]; no trailing slash):
    /// a `fetch.base_url`.
    pub fn base_url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.https { "https" } else { "http" }, self.port)
    }

    /// The requests answered so far, in order (nginx writes each line as it answers).
    pub fn requests(&self) -> Result<Vec<NginxRequest>> {
        let path = self.root.join("access.log");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        text.lines().filter(|l| l.ends_with('}')).map(parse_line).collect()
    }

    /// The requests for `uri`.
    pub fn requests_for(&self, uri: &str) -> Result<Vec<NginxRequest>> {
        Ok(self.requests()?.into_iter().filter(|r| r.uri == uri).collect())
    }

    /// nginx's error log (startup, denied files, ...).
    pub fn error_log(&self) -> String {
        crate::log_tail(&self.root.join("error.log"), 30)
    }

    /// The configuration nginx runs with.
    pub fn config(&self) -> String {
        fs::read_to_string(self.config_path()).unwrap_or_default()
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("nginx.conf")
    }

    /// The prefix directory (`-p`): configuration, logs, pid file, temp files.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
    }
}

/// `nginx` on `PATH`, else Debian's `/usr/sbin/nginx` (not on a non-root user's `PATH`).
pub fn nginx_program() -> Result<PathBuf> {
    require_program("nginx")
        .or_else(|_| require_program("/usr/sbin/nginx"))
        .context("nginx serves the bundles here (Debian package `nginx-light`)")
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn parse_line(line: &str) -> Result<NginxRequest> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("nginx access log line: {line}"))?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let n = |k: &str| v[k].as_u64().with_context(|| format!("no number {k} in the access log line {line}"));
    Ok(NginxRequest {
        method: s("method"),
        uri: s("uri"),
        status: u16::try_from(n("status")?).context("status")?,
        body_bytes: n("body_bytes")?,
        range: s("range"),
        if_none_match: s("if_none_match"),
        etag: s("etag"),
        content_range: s("content_range"),
        cache_control: s("cache_control"),
    })
}
