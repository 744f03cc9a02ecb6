//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the
//! dashboard's browser tests and its benchmark.
//!
//! [`Chromium::start`] runs `chromium --headless=new --no-sandbox --disable-gpu
//! --remote-debugging-port=PORT` with its own profile in a temp dir; [`Chromium::open`]
//! attaches to its page over the DevTools WebSocket (`tungstenite`, blocking) and
//! navigates. A [`Page`] evaluates JavaScript (`Runtime.evaluate`, results by value),
//! polls the DOM until a condition holds, and captures screenshots
//! (`Page.captureScreenshot`). The browser and every process it started are stopped by
//! PID when the [`Chromium`] is dropped.
//!
//! Not installed is an error naming `scripts/setup.sh`, never a skipped test.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;
use tungstenite::{Message, WebSocket};

use crate::process::{kill_leftovers, process_tree, remove_tempdir, Daemon};
use crate::{free_port, require_program};

/// A running headless Chromium. See the module docs.
pub struct Chromium {
    daemon: Option<Daemon>,
    dir: Option<TempDir>,
    root: PathBuf,
    port: u16,
}

impl Chromium {
    /// Starts the browser with a `width`×`height` window and waits for its DevTools
    /// endpoint.
    pub fn start(width: u32, height: u32) -> Result<Chromium> {
        let program = require_program("chromium")
            .context("the dashboard tests need headless Chromium (Debian package `chromium`)")?;
        let dir = crate::short_tempdir("c")?;
        let root = dir.path().to_path_buf();
        let port = free_port();
        let mut cmd = Command::new(program);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .args(["--disable-background-networking", "--disable-extensions", "--disable-sync", "--mute-audio"])
        .args(["--disable-background-timer-throttling", "--disable-renderer-backgrounding"])
        .arg("--disable-backgrounding-occluded-windows")
        .arg(format!("--remote-debugging-port={port}"))
        .arg("--remote-debugging-address=127.0.0.1")
        .arg(format!("--user-data-dir={}/profile", root.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("about:blank");
        let mut daemon = Daemon::spawn("chromium", cmd, &root.join("chromium.log"))?;
        daemon.wait_ready(Duration::from_secs(30), || {
            devtools_get(port, "/json/list")
                .is_ok_and(|(code, body)| code == 200 && body.contains("\"page\""))
        })?;
        Ok(Chromium { daemon: Some(daemon), dir: Some(dir), root, port })
    }

    /// Attaches to the browser's page and navigates it to `url`.
    pub fn open(&self, url: &str) -> Result<Page> {
        let (code, body) = devtools_get(self.port, "/json/list")?;
        ensure_ok(code, &body)?;
        let targets: Value = serde_json::from_str(&body).context("/json/list is not JSON")?;
        let ws_url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .with_context(|| format!("no page target in {body}"))?
            .to_string();
        let stream = TcpStream::connect(("127.0.0.1", self.port)).context("connecting to DevTools")?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let (ws, _) = tungstenite::client(ws_url.as_str(), stream)
            .map_err(|e| anyhow!("DevTools WebSocket handshake with {ws_url}: {e}"))?;
        let mut page = Page { ws, next_id: 0 };
        page.call("Page.enable", json!({}))?;
        page.call("Runtime.enable", json!({}))?;
        page.navigate(url)?;
        Ok(page)
    }

    /// The browser's log (stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("chromium.log")).unwrap_or_default()
    }
}

/// `GET path` from the DevTools HTTP endpoint: (status, body). Chromium keeps the
/// connection open whatever the request says, so the body is read by its Content-Length.
fn devtools_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let code =
        status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("bad status line")?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().context("Content-Length")?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn ensure_ok(code: u16, body: &str) -> Result<()> {
    if code != 200 {
        bail!("DevTools answered {code}: {body}");
    }
    Ok(())
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser's zygote, renderer and GPU processes go with it.
        let tree = self.daemon.as_ref().and_then(Daemon::pid).map(process_tree).unwrap_or_default();
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
        kill_leftovers(&self.root, &tree);
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
    }
}

/// One page of a [`Chromium`], over its DevTools WebSocket.
pub struct Page {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Page {
    /// Sends a DevTools command and returns its `result` (events in between are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(request.to_string())).with_context(|| format!("sending {method}"))?;
        loop {
            let msg = self.ws.read().with_context(|| format!("waiting for the answer to {method}"))?;
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text).context("a DevTools message that is not JSON")?;
            if v["id"] != id {
                continue;
            }
            if !v["error"].is_null() {
                bail!("{method} failed: {}", v["error"]);
            }
            return Ok(v["result"].clone());
        }
    }

    /// Navigates to `url` and waits for the load event's document.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(e) = r["errorText"].as_str() {
            bail!("navigating to {url}: {e}");
        }
        crate::wait_until(Duration::from_secs(30), "the page to load", || {
            Ok(self.eval("document.readyState")? == "complete")
        })
    }

    /// Evaluates `expression` in the page; returns its value (JSON-serializable results;
    /// a thrown exception is an error).
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if !r["exceptionDetails"].is_null() {
            bail!("`{expression}` threw: {}", r["exceptionDetails"]);
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expression` (every 100 ms) until it returns something other than `null`,
    /// `false` or `undefined`; returns that value. On timeout, the error shows the last
    /// value of `describe` (an expression that explains the page's state).
    pub fn wait_for(
        &mut self,
        deadline: Duration,
        what: &str,
        expression: &str,
        describe: &str,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.eval(expression)?;
            if !(v.is_null() || v == false) {
                return Ok(v);
            }
            if start.elapsed() >= deadline {
                let state = self.eval(describe).unwrap_or_else(|e| Value::String(format!("{e:#}")));
                bail!("timed out after {deadline:?} waiting for {what}; the page shows: {state}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG screenshot of the viewport to `path` (directories created).
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = r["data"].as_str().context("captureScreenshot returned no data")?;
        let png =
            base64::engine::general_purpose::STANDARD.decode(data).context("screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}
