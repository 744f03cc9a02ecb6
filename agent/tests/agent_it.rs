//! End-to-end tests of the `fleet-agent` binary against a real Mosquitto broker and a
//! real (tiny, in-test) HTTP server that can drop a connection mid-body.
//!
//! Each test starts its own broker on a free loopback port and its own temp dirs, and
//! stops what it started by PID. Needs `mosquitto` and `mosquitto_sub`/`mosquitto_pub`
//! (`apt-get install -y mosquitto mosquitto-clients`). Containers are not involved here
//! (`engine.socket = "none"`); the engine adapter has its own tests against dockerd.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_e2e::{free_port, Mosquitto};
use fleet_spec::bundle::{self, BundleMeta};
use fleet_spec::keys::SigningKey;
use fleet_spec::messages::{Announcement, StatusReport};
use fleet_spec::model::{DesiredState, ManagedFile};

// Only `BIN` and `now` are used here; the rest serves the engine tests.
#[allow(dead_code)]
mod common;
use common::{now, set_allowed_roots, BIN};

/// A child process killed (by its PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
}

/// A private anonymous broker (the harness's) on a free loopback port.
fn mosquitto() -> Mosquitto {
    Mosquitto::start().expect("mosquitto must be installed: apt-get install -y mosquitto mosquitto-clients")
}

/// `mosquitto_sub -v` on a filter, lines collected on a channel.
struct Sub {
    _proc: Proc,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    pending: Vec<String>,
}

impl Sub {
    fn new(port: u16, filter: &str) -> Sub {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", filter, "-v", "-q", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        Sub { _proc: Proc(child), lines: rx, seen: Vec::new(), pending: Vec::new() }
    }

    /// Waits for a line on `topic` whose payload satisfies `pred` (looking first at lines
    /// received earlier and not matched yet); returns the payload and consumes the line.
    fn wait(&mut self, topic: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let matches = |line: &str| line.split_once(' ').is_some_and(|(t, p)| t == topic && pred(p));
        if let Some(i) = self.pending.iter().position(|l| matches(l)) {
            let line = self.pending.remove(i);
            return line.split_once(' ').map(|(_, p)| p.to_string()).expect("matched");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line.split_once(' ').map(|(_, p)| p.to_string()).expect("matched");
                    }
                    self.pending.push(line);
                }
                Err(_) => panic!(
                    "no matching message on {topic} within {timeout:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

/// The announcement of bundle `version` (`digest`, `size` bytes) for `gw-01` of `acme`.
fn announcement(
    version: u64,
    commit: &str,
    digest: &str,
    size: usize,
    urls: Vec<String>,
    mqtt_blob: bool,
) -> Announcement {
    Announcement {
        fleet: "acme".into(),
        device: "gw-01".into(),
        version,
        commit: commit.into(),
        digest: digest.into(),
        size: size as u64,
        urls,
        mqtt_blob,
    }
}

/// Publishes `ann` retained on `gw-01`'s `desired` topic; returns the JSON published.
fn publish_announcement(port: u16, ann: &Announcement) -> String {
    let json = String::from_utf8(ann.to_json()).expect("utf8");
    publish_retained(port, "fleet/acme/devices/gw-01/desired", &json);
    json
}

fn publish_retained(port: u16, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-r", "-q", "1", "-m", payload])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
}

/// A static file server on a free port, `404` for paths it does not hold. With
/// `drop_first`, the first request for a `.bundle` is answered with a full
/// `Content-Length` but only half the body, then the connection is closed, so the client
/// must resume with `Range`. Records each `.bundle` request's Range header, and every
/// requested path.
/// Path → body.
type Files = Vec<(String, Vec<u8>)>;

struct Http {
    port: u16,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
    paths: Arc<Mutex<Vec<String>>>,
    /// What it serves; may change while it runs.
    files: Arc<Mutex<Files>>,
}

fn http_server(files: Files, drop_first: bool) -> Http {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let paths = Arc::new(Mutex::new(Vec::new()));
    let files = Arc::new(Mutex::new(files));
    let (seen, requested, served) = (ranges.clone(), paths.clone(), files.clone());
    std::thread::spawn(move || {
        let mut dropped = !drop_first;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.trim().to_string());
                    }
                }
            }
            requested.lock().expect("lock").push(path.clone());
            let body = served.lock().expect("lock").iter().find(|(p, _)| *p == path).map(|(_, b)| b.clone());
            let Some(body) = body else {
                let _ = stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            if path.ends_with(".bundle") {
                seen.lock().expect("lock").push(range.clone());
            }
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0)
                .min(body.len());
            let rest = &body[start..];
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    rest.len(),
                    body.len() - 1,
                    body.len()
                )
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", rest.len())
            };
            let _ = stream.write_all(head.as_bytes());
            if path.ends_with(".bundle") && !dropped {
                dropped = true;
                let _ = stream.write_all(&rest[..rest.len() / 2]);
                let _ = stream.flush();
                drop(stream);
                continue;
            }
            let _ = stream.write_all(rest);
        }
    });
    Http { port, ranges, paths, files }
}

struct Device {
    dir: tempfile::TempDir,
    config: PathBuf,
    root: PathBuf,
    key: SigningKey,
}

fn device(extra: &str) -> Device {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let key = SigningKey::from_seed(&[42; 32]);
    // Not beside root/: an allowed root must lie apart from the directory of agent.toml.
    std::fs::create_dir(dir.path().join("etc")).expect("mkdir etc");
    let config = dir.path().join("etc/agent.toml");
    let text = format!(
        "device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\nhealth_timeout_secs = 10\nstatus_min_interval_ms = 100\n{extra}\n[trust]\npublic_keys = [\"{}\"]\n[engine]\nsocket = \"none\"\n",
        dir.path().join("state").display(),
        root.display(),
        key.public()
    );
    // `extra` holds top-level keys or whole tables placed before [trust]: keep tables last.
    std::fs::write(&config, text).expect("write config");
    Device { dir, config, root, key }
}

impl Device {
    fn bundle(&self, version: u64, files: &[(&str, &str)]) -> Vec<u8> {
        let state = DesiredState {
            files: files
                .iter()
                .map(|(p, c)| ManagedFile {
                    path: format!("{}/{p}", self.root.display()),
                    mode: 0o644,
                    owner: None,
                    content: c.as_bytes().to_vec(),
                })
                .collect(),
            ..Default::default()
        };
        self.sign(version, state)
    }

    /// A bundle of `state` for this device, signed with its fleet's key.
    fn sign(&self, version: u64, mut state: DesiredState) -> Vec<u8> {
        state.canonicalize();
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: "gw-01".into(),
            version,
            commit: format!("commit{version}"),
            subject: "test".into(),
            created_at: now() - 60,
            expires_at: now() + 86_400,
        };
        bundle::build(meta, &state, &[&self.key], 3)
    }

    /// A bundle with one container (for a device whose engine is not there).
    fn bundle_with_container(&self, version: u64) -> Vec<u8> {
        use fleet_spec::model::{ContainerSpec, ImageRef};
        let state = DesiredState {
            containers: vec![ContainerSpec {
                name: "app-web".into(),
                app: "app".into(),
                service: "web".into(),
                image: ImageRef { reference: "127.0.0.1:5000/web:1".into(), digest: None },
                ..Default::default()
            }],
            ..Default::default()
        };
        self.sign(version, state)
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg("--config").arg(&self.config);
        cmd.output().expect("run fleet-agent")
    }

    fn run(&self) -> Proc {
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("FLEET_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(self.dir.path().join("agent.log")).expect("log")))
            .spawn()
            .expect("spawn agent");
        Proc(child)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

fn status_of(payload: &str) -> StatusReport {
    StatusReport::from_json(payload.as_bytes()).expect("status JSON")
}

#[test]
fn announcement_fetch_with_resume_apply_and_status_over_a_real_broker() {
    let broker = mosquitto();
    let dev = device(&format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nkeepalive_secs = 5", broker.port()));
    let bytes = dev.bundle(1, &[("app/app.conf", "hello"), ("app/other.conf", "x")]);
    let digest = bundle::content_address(&bytes);
    let http = http_server(vec![(format!("/bundles/{digest}.bundle"), bytes.clone())], true);

    let mut sub = Sub::new(broker.port(), "fleet/acme/devices/gw-01/#");
    let agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let idle = sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(10), |_| true);
    assert_eq!(status_of(&idle).agent_version, env!("CARGO_PKG_VERSION"));

    let ann = announcement(
        1,
        "commit1",
        &digest,
        bytes.len(),
        vec![format!("http://127.0.0.1:{}", http.port)],
        false,
    );
    publish_announcement(broker.port(), &ann);

    let converged = sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(20), |p| {
        status_of(p).state.as_str() == "converged"
    });
    let status = status_of(&converged);
    assert_eq!(status.applied.as_ref().map(|a| a.version), Some(1), "{converged}");
    assert_eq!(status.desired.as_ref().map(|d| d.digest.as_str()), Some(digest.as_str()));
    assert_eq!(status.files.managed, 2);
    assert_eq!(dev.read("app/app.conf").as_deref(), Some("hello"));
    let ranges = http.ranges.lock().expect("lock").clone();
    assert_eq!(ranges.len(), 2, "one dropped download, one resumed: {ranges:?}\n{}", dev.log());
    assert_eq!(ranges[0], None);
    assert_eq!(ranges[1], Some(format!("bytes={}-", bytes.len() / 2)), "resumed where the drop happened");
    let finished =
        sub.wait("fleet/acme/devices/gw-01/events", Duration::from_secs(5), |p| p.contains("apply_finished"));
    assert!(finished.contains("\"version\":1"), "{finished}");

    // Drift: edit a managed file; the reconcile timer is long, so restart is not what fixes
    // it: the reconcile on start is. Stop gracefully: status stays, online goes false.
    signal(&agent.0, "-TERM");
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "false");
    std::fs::write(dev.root.join("app/app.conf"), "edited").expect("edit");
    let agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let drift = sub
        .wait("fleet/acme/devices/gw-01/events", Duration::from_secs(10), |p| p.contains("drift_repaired"));
    assert!(drift.contains("file_changed"), "{drift}");
    assert_eq!(dev.read("app/app.conf").as_deref(), Some("hello"));

    // A crash (SIGKILL) leaves the last will: online = false, published by the broker.
    signal(&agent.0, "-KILL");
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(15), |p| p == "false");
}

#[test]
fn a_rejected_announced_bundle_is_reported_and_not_refetched() {
    let broker = mosquitto();
    let dev = device(&format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"", broker.port()));
    let other = Device { key: SigningKey::from_seed(&[7; 32]), ..device("") };
    let bytes = Device { root: dev.root.clone(), ..other }.bundle(1, &[("a", "1")]);
    let digest = bundle::content_address(&bytes);
    let http = http_server(vec![(format!("/bundles/{digest}.bundle"), bytes.clone())], false);
    let mut sub = Sub::new(broker.port(), "fleet/acme/devices/gw-01/#");
    let _agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let ann = announcement(
        1,
        "c",
        &digest,
        bytes.len(),
        vec![format!("http://127.0.0.1:{}/bundles/{digest}.bundle", http.port)],
        false,
    );
    let json = publish_announcement(broker.port(), &ann);
    let rejected = sub
        .wait("fleet/acme/devices/gw-01/events", Duration::from_secs(10), |p| p.contains("bundle_rejected"));
    assert!(rejected.contains("unknown_key"), "{rejected}");
    let failed = sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(10), |p| {
        status_of(p).state.as_str() == "failed"
    });
    assert_eq!(status_of(&failed).last_error.map(|e| e.code), Some("unknown_key".to_string()));
    // Announce it again: it is not downloaded again.
    publish_retained(broker.port(), "fleet/acme/devices/gw-01/desired", "");
    publish_retained(broker.port(), "fleet/acme/devices/gw-01/desired", &json);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(http.ranges.lock().expect("lock").len(), 1, "fetched once");
    assert!(dev.read("a").is_none());
}

/// Hardening I, case 1: bytes that do not match the announced digest are that URL's
/// failure. Nothing is rejected; the candidate backs off (it is not downloaded again at
/// every tick); and the genuine bytes of the same digest, from another URL, apply.
#[test]
fn a_truncated_download_is_not_rejected_backs_off_and_the_genuine_bytes_still_apply() {
    let broker = mosquitto();
    let dev =
        device(&format!("reconcile_interval_secs = 1\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"", broker.port()));
    let full = dev.bundle(1, &[("a", "1")]);
    let digest = bundle::content_address(&full);
    // The server holds only half of the announced bundle, and the body ends normally.
    let http = http_server(
        vec![
            ("/half.bundle".to_string(), full[..full.len() / 2].to_vec()),
            (format!("/bundles/{digest}.bundle"), full.clone()),
        ],
        false,
    );
    let mut sub = Sub::new(broker.port(), "fleet/acme/devices/gw-01/#");
    let _agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let announce = |url: String| {
        let ann = announcement(1, "commit1", &digest, full.len(), vec![url], false);
        publish_announcement(broker.port(), &ann);
    };
    announce(format!("http://127.0.0.1:{}/half.bundle", http.port));
    let failed = sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(10), |p| {
        status_of(p).last_error.is_some_and(|e| e.code == "fetch_failed")
    });
    assert!(failed.contains(&digest) || failed.contains("sha256"), "{failed}");
    // Several reconcile ticks later: downloaded once (backing off), never rejected.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(http.ranges.lock().expect("lock").len(), 1, "fetched once\n{}", dev.log());
    assert!(dev.read("a").is_none(), "nothing on the device changed");
    assert!(!sub.seen.iter().any(|l| l.contains("bundle_rejected")), "no rejection: {:?}", sub.seen);
    let rejected = std::fs::read_to_string(dev.dir.path().join("state/rejected.json")).unwrap_or_default();
    assert!(!rejected.contains(&digest), "{rejected}");

    // The same digest from a server that has it: applied at once (a changed
    // announcement is due at once).
    announce(format!("http://127.0.0.1:{}", http.port));
    sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(20), |p| {
        status_of(p).state.as_str() == "converged"
    });
    assert_eq!(dev.read("a").as_deref(), Some("1"));
}

/// Hardening I, case 7: a bundle deferred after verification (here: its engine is not
/// there) is retried from the stored copy, with backoff; it is not downloaded again.
#[test]
fn a_deferred_bundle_is_retried_from_its_stored_copy_not_downloaded_again() {
    let broker = mosquitto();
    let dev =
        device(&format!("reconcile_interval_secs = 1\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"", broker.port()));
    // An engine socket nobody listens on: containers cannot be prepared.
    let config = std::fs::read_to_string(&dev.config).expect("read config");
    let socket = dev.dir.path().join("no-engine.sock");
    std::fs::write(
        &dev.config,
        config.replace("socket = \"none\"", &format!("socket = \"{}\"", socket.display())),
    )
    .expect("write config");
    let bytes = dev.bundle_with_container(1);
    let digest = bundle::content_address(&bytes);
    let http = http_server(vec![(format!("/bundles/{digest}.bundle"), bytes.clone())], false);
    let mut sub = Sub::new(broker.port(), "fleet/acme/devices/gw-01/#");
    let _agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let ann = announcement(
        1,
        "commit1",
        &digest,
        bytes.len(),
        vec![format!("http://127.0.0.1:{}", http.port)],
        false,
    );
    publish_announcement(broker.port(), &ann);
    sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(10), |p| {
        status_of(p).last_error.is_some_and(|e| e.code == "engine_unavailable")
    });
    // The first retry comes after the first backoff (10 s), from disk.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev.log().contains("applying the stored copy") {
        assert!(Instant::now() < deadline, "no retry from the stored copy\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http.ranges.lock().expect("lock").len(), 1, "downloaded once\n{}", dev.log());
    let rejected = std::fs::read_to_string(dev.dir.path().join("state/rejected.json")).unwrap_or_default();
    assert!(!rejected.contains(&digest), "deferred, not rejected: {rejected}");
}

#[test]
fn polling_the_device_pointer_file_applies_without_a_broker() {
    let dev = device("");
    let bytes = dev.bundle(3, &[("conf/x.conf", "polled")]);
    let digest = bundle::content_address(&bytes);
    // What `fleet-bundler build` writes as devices/gw-01.json.
    let pointer = announcement(3, "commit3", &digest, bytes.len(), vec![], false);
    // The bundle is there, the pointer file not yet (a 404: no bundle for this device).
    let http = http_server(vec![(format!("/bundles/{digest}.bundle"), bytes)], false);
    let text = std::fs::read_to_string(&dev.config).expect("read");
    let text = text.replace(
        "[trust]",
        &format!("[fetch]\nbase_url = \"http://127.0.0.1:{}/\"\npoll_interval_secs = 5\n[trust]", http.port),
    );
    std::fs::write(&dev.config, text).expect("write");
    let out = dev.cli(&["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("fetch         http://127.0.0.1:{}/devices/gw-01.json every 5 s", http.port)),
        "{text}"
    );
    let agent = dev.run();
    let polled =
        |http: &Http| http.paths.lock().expect("lock").iter().filter(|p| *p == "/devices/gw-01.json").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while polled(&http) == 0 || !dev.log().contains("no bundle for this device") {
        assert!(Instant::now() < deadline, "no poll:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(dev.read("conf/x.conf").is_none());
    let mut json = pointer.to_json();
    json.push(b'\n');
    http.files.lock().expect("lock").push(("/devices/gw-01.json".into(), json));
    // The next poll (5 s later) finds it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while dev.read("conf/x.conf").is_none() {
        assert!(Instant::now() < deadline, "not applied:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dev.read("conf/x.conf").as_deref(), Some("polled"));
    let paths = http.paths.lock().expect("lock").clone();
    assert_eq!(
        paths.iter().filter(|p| !p.starts_with("/devices/")).collect::<Vec<_>>(),
        [&format!("/bundles/{digest}.bundle")],
        "only its pointer file and its bundle, never index.json"
    );
    assert!(polled(&http) >= 2);
    std::thread::sleep(Duration::from_millis(300));
    signal(&agent.0, "-TERM");
    let mut child = agent;
    let code = child.0.wait().expect("wait").code();
    assert_eq!(code, Some(0), "graceful stop exits 0:\n{}", dev.log());
    let out = dev.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(json["status"]["state"], "converged", "{json}");
    assert_eq!(json["applied"]["version"], 3);
    assert_eq!(json["journal"], "clean");
}

#[test]
fn sideload_apply_and_the_documented_exit_codes() {
    let dev = device("");
    let good = dev.dir.path().join("good.bundle");
    std::fs::write(&good, dev.bundle(1, &[("a.conf", "one")])).expect("write");
    let out = dev.cli(&["apply", good.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dev.read("a.conf").as_deref(), Some("one"));
    let out = dev.cli(&["apply", good.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "already applied is fine");

    let escape = dev.dir.path().join("escape.bundle");
    let mut evil = DesiredState {
        files: vec![ManagedFile {
            path: "/etc/passwd".into(),
            mode: 0o644,
            owner: None,
            content: b"x".to_vec(),
        }],
        ..Default::default()
    };
    evil.canonicalize();
    let meta = BundleMeta {
        fleet: "acme".into(),
        device: "gw-01".into(),
        version: 2,
        commit: "c2".into(),
        subject: "evil".into(),
        created_at: now() - 60,
        expires_at: now() + 3600,
    };
    std::fs::write(&escape, bundle::build(meta, &evil, &[&dev.key], 3)).expect("write");
    let out = dev.cli(&["apply", escape.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("path_not_allowed"));

    let out = dev.cli(&["apply", "/nonexistent.bundle"]);
    assert_eq!(out.status.code(), Some(66));
    let out = dev.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gw-01"));
    let out = dev.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state     failed"), "the last bundle was refused: {text}");
    assert!(text.contains("applied   version 1"), "still running version 1: {text}");
    assert!(text.contains("path_not_allowed"), "{text}");

    let bad = dev.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = \"/x\"\nbogus = 1\n[trust]\npublic_keys = []\n",
    )
    .expect("write");
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bogus"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("EXIT CODES"));

    // While the service runs, apply hands the bundle to it over <state_dir>/agent.sock
    // and reports the outcome it answers, with the same exit codes.
    let agent = dev.run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev.dir.path().join("state/agent.sock").exists() {
        assert!(Instant::now() < deadline, "agent did not open its socket:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = dev.cli(&["apply", good.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already applied"));
    let three = dev.dir.path().join("three.bundle");
    let three_bytes = dev.bundle(3, &[("a.conf", "three")]);
    std::fs::write(&three, &three_bytes).expect("write");
    let out = dev.cli(&["apply", three.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", dev.log());
    assert!(stderr.contains("the agent service is running"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied version 3"));
    assert_eq!(dev.read("a.conf").as_deref(), Some("three"), "the running agent applied it");
    assert!(dev.log().contains("sideloaded bundle received"), "{}", dev.log());
    let mut tampered = three_bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered_path = dev.dir.path().join("tampered.bundle");
    std::fs::write(&tampered_path, &tampered).expect("write");
    let out = dev.cli(&["apply", tampered_path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected"));
    assert_eq!(dev.read("a.conf").as_deref(), Some("three"), "a refused sideload changes nothing");
    drop(agent);

    // A lock held by something that takes no sideloads (here: this test): 75, and why.
    let lock =
        std::fs::OpenOptions::new().write(true).open(dev.dir.path().join("state/lock")).expect("open lock");
    lock.try_lock().expect("take the lock");
    let _ = std::fs::remove_file(dev.dir.path().join("state/agent.sock"));
    let out = dev.cli(&["apply", three.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("systemctl stop fleet-agent"), "{stderr}");
}

fn sh(dir: &std::path::Path, script: &str) {
    let out = Command::new("bash").arg("-ec").arg(script).current_dir(dir).output().expect("bash");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// mqtts:// with a private CA and a client certificate (mutual TLS), as production
/// brokers are set up: rustls on ring, the CA from `ca_file`, the client cert and key
/// from PEM files.
#[test]
fn mqtts_with_a_client_certificate() {
    let pki = tempfile::tempdir().expect("tempdir");
    sh(
        pki.path(),
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca 2>/dev/null
         for n in server client; do
           openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj /CN=$n 2>/dev/null
         done
         printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
         printf 'extendedKeyUsage=clientAuth\\n' > client.ext
         openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext 2>/dev/null
         openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext 2>/dev/null",
    );
    // Mosquitto drops root privileges before reading its key: let it read the files.
    sh(pki.path(), "chmod 0755 . && chmod 0644 *");
    let p = |f: &str| pki.path().join(f).display().to_string();
    let (tls_port, plain_port) = (free_port(), free_port());
    let conf = pki.path().join("mosq.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             listener {plain_port} 127.0.0.1\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        ),
    )
    .expect("conf");
    let broker = Proc(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", plain_port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dev = device(&format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    ));
    let mut sub = Sub::new(plain_port, "fleet/acme/devices/gw-01/#");
    let agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let status = sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(10), |_| true);
    assert_eq!(status_of(&status).device, "gw-01", "{}", dev.log());
    drop(agent);
    drop(broker);
}

/// Broker-only fleets: the bundle itself is retained on `.../bundle`.
#[test]
fn a_bundle_retained_on_mqtt_is_applied() {
    let broker = mosquitto();
    let dev = device(&format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"", broker.port()));
    let bytes = dev.bundle(4, &[("blob.conf", "via mqtt")]);
    let digest = bundle::content_address(&bytes);
    let file = dev.dir.path().join("blob.bundle");
    std::fs::write(&file, &bytes).expect("write");
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-t",
            "fleet/acme/devices/gw-01/bundle",
            "-r",
            "-q",
            "1",
            "-f",
        ])
        .arg(&file)
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let ann = announcement(4, "commit4", &digest, bytes.len(), vec![], true);
    publish_announcement(broker.port(), &ann);
    let mut sub = Sub::new(broker.port(), "fleet/acme/devices/gw-01/status");
    let _agent = dev.run();
    let converged = sub.wait("fleet/acme/devices/gw-01/status", Duration::from_secs(15), |p| {
        status_of(p).state.as_str() == "converged"
    });
    assert_eq!(status_of(&converged).applied.map(|a| a.version), Some(4), "{}", dev.log());
    assert_eq!(dev.read("blob.conf").as_deref(), Some("via mqtt"));
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Issue 20, point 3: a refusal caused by the device's own config (here its allowed
/// roots) holds only under that config. Widened, the same bundle applies: through
/// `apply`, and in `run` at its next poll after a restart. `apply --json` says what
/// happened.
#[test]
fn a_config_caused_refusal_is_judged_again_once_the_config_allows_it() {
    let dev = device("");
    let extra = dev.dir.path().join("extra");
    let outside = |version: u64, content: &str| {
        dev.sign(
            version,
            DesiredState {
                files: vec![ManagedFile {
                    path: format!("{}/x.conf", extra.display()),
                    mode: 0o644,
                    owner: None,
                    content: content.as_bytes().to_vec(),
                }],
                ..Default::default()
            },
        )
    };
    let two = dev.dir.path().join("two.bundle");
    std::fs::write(&two, outside(2, "two")).expect("write");
    let two_arg = two.to_str().expect("utf8");
    let out = dev.cli(&["apply", "--json", two_arg]);
    assert_eq!(out.status.code(), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
    let json = json_of(&out);
    assert_eq!(json["outcome"], "rejected", "{json}");
    assert_eq!(json["code"], "path_not_allowed", "{json}");
    assert_eq!(json["digest"].as_str().map(str::len), Some(64), "{json}");
    let out = dev.cli(&["apply", two_arg]);
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejected before"), "under the same config it stays refused: {stderr}");
    assert!(stderr.contains("agent.toml"), "says the config decides: {stderr}");

    let digest_two = json["digest"].as_str().unwrap_or_default().to_string();
    assert!(json_of(&dev.cli(&["status", "--json"]))["rejected"].get(&digest_two).is_some());
    set_allowed_roots(&dev.config, &[&dev.root, &extra]);
    let status = json_of(&dev.cli(&["status", "--json"]));
    assert!(
        status["rejected"].get(&digest_two).is_none(),
        "another config's refusal is not listed: {status}"
    );
    let out = dev.cli(&["apply", "--json", two_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json = json_of(&out);
    assert_eq!((json["outcome"].as_str(), json["version"].as_u64()), (Some("committed"), Some(2)), "{json}");
    assert_eq!(std::fs::read_to_string(extra.join("x.conf")).ok().as_deref(), Some("two"));

    // The same through `run`: refused at a poll under a narrow config; after the config
    // is widened and the service restarted, the next poll applies it.
    let three = outside(3, "three");
    let digest = bundle::content_address(&three);
    let mut pointer = announcement(3, "commit3", &digest, three.len(), vec![], false).to_json();
    pointer.push(b'\n');
    let http = http_server(
        vec![(format!("/bundles/{digest}.bundle"), three), ("/devices/gw-01.json".into(), pointer)],
        false,
    );
    set_allowed_roots(&dev.config, &[&dev.root]);
    let text = std::fs::read_to_string(&dev.config).expect("read").replace(
        "[trust]",
        &format!("[fetch]\nbase_url = \"http://127.0.0.1:{}/\"\npoll_interval_secs = 5\n[trust]", http.port),
    );
    std::fs::write(&dev.config, text).expect("write");
    let rejected = |dev: &Device| {
        let json = json_of(&dev.cli(&["status", "--json"]));
        json["rejected"].get(&digest).is_some()
    };
    let agent = dev.run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rejected(&dev) {
        assert!(Instant::now() < deadline, "not refused:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);
    set_allowed_roots(&dev.config, &[&dev.root, &extra]);
    let _agent = dev.run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(extra.join("x.conf")).ok().as_deref() != Some("three") {
        assert!(Instant::now() < deadline, "not applied after the config was widened:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `fleet-agent forget` drops a rejection that is about the bytes (here a bundle not
/// newer than the applied one), and `apply --retry` judges a bundle again.
#[test]
fn forget_and_apply_retry_judge_a_rejected_bundle_again() {
    let dev = device("");
    let good = dev.dir.path().join("good.bundle");
    std::fs::write(&good, dev.bundle(1, &[("a.conf", "one")])).expect("write");
    // Not newer than itself: applied once, then v1 again from another build is refused.
    assert_eq!(dev.cli(&["apply", good.to_str().expect("utf8")]).status.code(), Some(0));
    let stale = dev.dir.path().join("stale.bundle");
    std::fs::write(&stale, dev.bundle(1, &[("a.conf", "other one")])).expect("write");
    let stale_arg = stale.to_str().expect("utf8");
    let out = dev.cli(&["apply", stale_arg]);
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not_newer"), "{stderr}");
    assert!(stderr.contains("fleet-agent forget"), "says how to judge it again: {stderr}");
    let digest = bundle::content_address(&std::fs::read(&stale).expect("read"));
    let status = json_of(&dev.cli(&["status", "--json"]));
    assert!(status["rejected"].get(&digest).is_some(), "{status}");

    let out = dev.cli(&["forget", &digest]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("forgot 1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = json_of(&dev.cli(&["status", "--json"]));
    assert!(status["rejected"].get(&digest).is_none(), "{status}");
    let out = dev.cli(&["forget", &digest]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to forget"));

    // Judged again: still not newer, so rejected again (a real rejection is not undone).
    assert_eq!(dev.cli(&["apply", stale_arg]).status.code(), Some(65));
    let out = dev.cli(&["apply", "--retry", "--json", stale_arg]);
    let json = json_of(&out);
    assert_eq!(json["code"], "not_newer", "judged again, not `rejected before`: {json}");
    assert!(!json["reason"].as_str().unwrap_or("").contains("rejected before"), "{json}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("forgot the earlier rejection"));
    let out = dev.cli(&["forget", "--all"]);
    assert_eq!(out.status.code(), Some(0));
    let status = json_of(&dev.cli(&["status", "--json"]));
    assert_eq!(status["rejected"].as_object().map(|m| m.len()), Some(0), "{status}");
}

/// Issue 20, point 4: another device's bundle sideloaded onto a converged device is an
/// event, not the device's state: `apply` exits 65 with `wrong_device`, and `status`
/// still says `converged`.
#[test]
fn another_devices_sideload_leaves_a_converged_device_converged() {
    let dev = device("");
    let good = dev.dir.path().join("good.bundle");
    std::fs::write(&good, dev.bundle(1, &[("a.conf", "one")])).expect("write");
    assert_eq!(dev.cli(&["apply", good.to_str().expect("utf8")]).status.code(), Some(0));
    assert_eq!(json_of(&dev.cli(&["status", "--json"]))["status"]["state"], "converged");

    let mut state = DesiredState::default();
    state.canonicalize();
    let meta = BundleMeta {
        fleet: "acme".into(),
        device: "gw-02".into(),
        version: 2,
        commit: "c2".into(),
        subject: "for gw-02".into(),
        created_at: now() - 60,
        expires_at: now() + 3600,
    };
    let other = dev.dir.path().join("gw-02.bundle");
    std::fs::write(&other, bundle::build(meta, &state, &[&dev.key], 3)).expect("write");
    let out = dev.cli(&["apply", other.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("wrong_device"), "{stderr}");
    let status = json_of(&dev.cli(&["status", "--json"]));
    assert_eq!(status["status"]["state"], "converged", "{status}");
    assert_eq!(status["status"]["last_error"]["code"], "wrong_device", "{status}");
    assert_eq!(status["applied"]["version"], 1, "{status}");
    assert!(status["applied"]["at"].is_i64(), "JSON keeps Unix seconds: {status}");
    assert_eq!(dev.read("a.conf").as_deref(), Some("one"));

    // Issue 20, point 7: the human view shows times as RFC 3339 UTC with their age.
    let text = String::from_utf8_lossy(&dev.cli(&["status"]).stdout).into_owned();
    let applied = text.lines().find(|l| l.starts_with("applied")).unwrap_or_default();
    let at = applied.split(" at ").nth(1).unwrap_or_default();
    assert!(at.len() > 20 && at.as_bytes()[10] == b'T' && at[..20].ends_with('Z'), "{text}");
    assert!(at.ends_with("(just now)") || at.ends_with("s ago)"), "{text}");
    assert!(text.contains("state     converged"), "{text}");
}

/// Issue 20, point 5: each event is logged once, under its documented name with its
/// fields, never as Rust debug text, in JSON logs too; a clean journal's recovery is
/// not logged at INFO.
#[test]
fn events_are_logged_once_by_name_in_json_logs() {
    let dev = device("log_format = \"json\"");
    let good = dev.dir.path().join("good.bundle");
    std::fs::write(&good, dev.bundle(1, &[("a.conf", "one")])).expect("write");
    let out = Command::new(BIN)
        .args(["apply", "--config"])
        .arg(&dev.config)
        .arg(&good)
        .env("FLEET_LOG", "info")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let events: Vec<&serde_json::Value> = lines.iter().filter(|l| l["fields"]["event"].is_string()).collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["fields"]["event"].as_str()).collect();
    assert_eq!(names, ["apply_started", "apply_finished"], "each once:\n{log}");
    assert_eq!(events[1]["fields"]["version"], 1, "{log}");
    assert_eq!(events[1]["fields"]["commit"], "commit1", "{log}");
    assert!(!log.contains("ApplyFinished") && !log.contains("ApplyStarted"), "no Rust debug text:\n{log}");
    assert!(!log.contains("recovery"), "a clean journal is not news at INFO:\n{log}");
    assert!(!log.contains("Clean"), "{log}");
}

/// CPU time (user + system, in clock ticks) the process `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Found by the rollout benchmark: while a download waited on a server that accepted
/// the connection and never answered, the agent woke its loop again and again (the
/// candidate being downloaded was due) and burned a whole core, on every stalled device
/// at once. Waiting on a download must cost no CPU.
#[test]
fn a_download_stalled_by_a_silent_server_costs_no_cpu() {
    let broker = mosquitto();
    // Accepts connections and never reads or answers (a hung CDN node).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in silent.incoming().map_while(Result::ok) {
            keep.lock().expect("lock").push(conn);
        }
    });
    let dev =
        device(&format!("[fetch]\ntimeout_secs = 30\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"", broker.port()));
    let full = dev.bundle(1, &[("a", "1")]);
    let digest = bundle::content_address(&full);
    let mut sub = Sub::new(broker.port(), "fleet/acme/devices/gw-01/#");
    let agent = dev.run();
    sub.wait("fleet/acme/devices/gw-01/online", Duration::from_secs(10), |p| p == "true");
    let ann =
        announcement(1, "commit1", &digest, full.len(), vec![format!("http://127.0.0.1:{port}/b")], false);
    publish_announcement(broker.port(), &ann);
    // The download is under way once the server holds its connection.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while held.lock().expect("lock").is_empty() {
        assert!(std::time::Instant::now() < until, "the agent never connected\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = agent.0.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(4));
    let used = cpu_ticks(pid) - before;
    // 4 s of a busy loop is ~400 ticks (100 per second); waiting is a handful.
    assert!(used < 100, "{used} clock ticks of CPU in 4 s while waiting on a silent server\n{}", dev.log());
    assert!(dev.read("a").is_none());
}
