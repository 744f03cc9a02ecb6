//! `publish` and `status` against a real Mosquitto broker.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_spec::messages::{
    Announcement, Applied, DeviceState, FileCounts, LastError, StatusReport, VersionRef,
};

use crate::common::{build, bundler, free_port, mosquitto, mosquitto_on, read_index, Keys, Repo};

fn broker_url(port: u16) -> String {
    format!("mqtt://127.0.0.1:{port}")
}

/// Reads `count` retained messages under `filter` with mosquitto_sub: (topic, payload).
fn retained(port: u16, filter: &str, count: usize) -> Vec<(String, String)> {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            filter,
            "-v",
            "-C",
            &count.to_string(),
            "-W",
            "5",
        ])
        .output()
        .expect("mosquitto_sub");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(t, p)| (t.to_string(), p.to_string())))
        .collect()
}

fn retained_bytes(port: u16, topic: &str) -> Vec<u8> {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-C", "1", "-N", "-W", "5"])
        .output()
        .expect("mosquitto_sub")
        .stdout
}

fn publish(out: &Path, port: u16, extra: &[&str]) -> crate::common::Output {
    let url = broker_url(port);
    let mut args = vec!["publish", "--out", out.to_str().expect("utf-8"), "--broker", &url, "--json"];
    args.extend_from_slice(extra);
    bundler(&args)
}

fn built_example() -> (Repo, Keys, tempfile::TempDir) {
    let repo = Repo::example();
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    (repo, keys, out)
}

#[test]
fn publish_announces_retained_and_only_what_changed() {
    let broker = mosquitto("allow_anonymous true");
    let (repo, keys, out) = built_example();
    let first = publish(out.path(), broker.port, &["--base-url", "http://files.local/fleet/"]);
    first.assert_code(0);
    assert_eq!(first.json()["announced"].as_array().expect("list").len(), 6);

    let index = read_index(out.path());
    let messages = retained(broker.port, "fleet/acme/devices/+/desired", 6);
    assert_eq!(messages.len(), 6, "{messages:?}");
    for (topic, payload) in &messages {
        let a = Announcement::from_json(payload.as_bytes()).expect("announcement parses");
        assert_eq!(topic, &format!("fleet/acme/devices/{}/desired", a.device));
        let entry = &index["devices"][&a.device];
        assert_eq!(a.fleet, "acme");
        assert_eq!(a.version, entry["version"].as_u64().expect("version"));
        assert_eq!(a.digest, entry["digest"].as_str().expect("digest"));
        assert_eq!(a.size, entry["size"].as_u64().expect("size"));
        assert_eq!(a.commit, entry["commit"].as_str().expect("commit"));
        assert_eq!(a.urls, vec![format!("http://files.local/fleet/bundles/{}.bundle", a.digest)]);
        assert!(!a.mqtt_blob);
    }

    // Nothing changed: nothing announced.
    let again = publish(out.path(), broker.port, &["--base-url", "http://files.local/fleet/"]);
    again.assert_code(0);
    assert_eq!(again.json()["announced"], serde_json::json!([]));
    assert_eq!(again.json()["unchanged"], 6);

    // One device changed: one announcement.
    repo.edit("devices/gw-munich-01.yaml", "Munich, line 3", "Munich, line 4");
    repo.commit_at("move", 1_800_000_100);
    build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    let third = publish(out.path(), broker.port, &["--base-url", "http://files.local/fleet/"]);
    third.assert_code(0);
    assert_eq!(third.json()["announced"], serde_json::json!(["gw-munich-01"]));
    let munich = retained(broker.port, "fleet/acme/devices/gw-munich-01/desired", 1);
    let a = Announcement::from_json(munich[0].1.as_bytes()).expect("announcement");
    assert_eq!(a.version, 1_800_000_100);

    // --force announces everything again.
    let forced = publish(out.path(), broker.port, &["--base-url", "http://files.local/fleet/", "--force"]);
    assert_eq!(forced.json()["announced"].as_array().expect("list").len(), 6);

    // A device that left the fleet gets its retained announcement cleared.
    repo.remove("devices/sensor-hub-01.yaml");
    repo.commit_at("retire sensor-hub-01", 1_800_000_200);
    build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    let cleared = publish(out.path(), broker.port, &["--base-url", "http://files.local/fleet/"]);
    cleared.assert_code(0);
    assert_eq!(cleared.json()["cleared"], serde_json::json!(["sensor-hub-01"]));
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "fleet/acme/devices/sensor-hub-01/desired",
            "-C",
            "1",
            "-W",
            "1",
        ])
        .output()
        .expect("mosquitto_sub");
    assert!(
        out.stdout.is_empty(),
        "retained announcement still there: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bundles_can_travel_as_retained_blobs() {
    let broker = mosquitto("allow_anonymous true");
    let (_repo, _keys, out) = built_example();
    publish(out.path(), broker.port, &["--blobs-over-mqtt"]).assert_code(0);
    let index = read_index(out.path());
    let digest = index["devices"]["gw-berlin-01"]["digest"].as_str().expect("digest");
    let blob = retained_bytes(broker.port, "fleet/acme/devices/gw-berlin-01/bundle");
    let file = std::fs::read(out.path().join(format!("bundles/{digest}.bundle"))).expect("bundle");
    assert_eq!(blob, file);
    let a = retained(broker.port, "fleet/acme/devices/gw-berlin-01/desired", 1);
    let a = Announcement::from_json(a[0].1.as_bytes()).expect("announcement");
    assert!(a.mqtt_blob);
    assert!(a.urls.is_empty());
}

/// An artifact's blob is retained in 256 KiB chunks under `<prefix>/<fleet>/blobs/`,
/// sent once (`published.json` remembers it), and cleared once no bundle names it.
#[test]
fn artifact_blobs_travel_as_retained_chunks_once() {
    let broker = mosquitto("allow_anonymous true");
    let (repo, keys, out) = built_example();
    let content: String = (0..600_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
    repo.write(
        "apps/big/app.yaml",
        "files:\n  - source: files/big.txt\n    target: /srv/fleet/big/big.txt\n",
    );
    repo.write("apps/big/files/big.txt", &content);
    repo.commit_at("a big file", 1_800_000_100);
    build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    assert!(out.path().join("blobs").join(&sha).exists(), "the build made no blob");

    let first = publish(out.path(), broker.port, &["--blobs-over-mqtt"]);
    first.assert_code(0);
    assert_eq!(first.json()["blobs_published"], serde_json::json!([sha]), "{}", first.stderr);
    let chunks: Vec<Vec<u8>> =
        (0..3).map(|n| retained_bytes(broker.port, &format!("fleet/acme/blobs/{sha}/{n}"))).collect();
    assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [262_144, 262_144, 600_000 - 2 * 262_144]);
    assert_eq!(chunks.concat(), content.as_bytes());

    let again = publish(out.path(), broker.port, &["--blobs-over-mqtt"]);
    again.assert_code(0);
    assert_eq!(again.json()["blobs_published"], serde_json::json!([]), "sent once");

    repo.remove("apps/big");
    repo.commit_at("no big file", 1_800_000_200);
    build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    let cleared = publish(out.path(), broker.port, &["--blobs-over-mqtt"]);
    cleared.assert_code(0);
    assert_eq!(cleared.json()["blobs_cleared"], serde_json::json!([sha]));
    assert!(
        retained(broker.port, &format!("fleet/acme/blobs/{sha}/#"), 1).is_empty(),
        "chunks still retained"
    );
}

#[test]
fn publish_needs_a_delivery_route() {
    let (_repo, _keys, out) = built_example();
    let o = publish(out.path(), free_port(), &[]);
    o.assert_code(64);
    o.assert_stderr_has("pass --base-url URL and/or --blobs-over-mqtt");
}

#[test]
fn an_unreachable_broker_fails_fast_and_clearly() {
    let (_repo, _keys, out) = built_example();
    let port = free_port();
    let started = Instant::now();
    let o = publish(out.path(), port, &["--base-url", "http://x", "--timeout", "2s"]);
    o.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    o.assert_stderr_has(&format!("cannot connect to mqtt://127.0.0.1:{port}"));
    assert!(!out.path().join("published.json").exists(), "nothing recorded as published");

    // A port that accepts TCP but never speaks MQTT: bounded by --timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = listener.local_addr().expect("addr").port();
    let started = Instant::now();
    let o = publish(out.path(), silent, &["--base-url", "http://x", "--timeout", "2s"]);
    o.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(o.stderr.contains("no answer from") || o.stderr.contains("cannot connect"), "{}", o.stderr);
    drop(listener);
}

#[test]
fn a_refused_login_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwd = dir.path().join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c", passwd.to_str().expect("utf-8"), "ci", "s3cret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success());
    let broker = mosquitto(&format!("allow_anonymous false\npassword_file {}", passwd.display()));
    let (_repo, _keys, out) = built_example();
    let o = publish(
        out.path(),
        broker.port,
        &["--base-url", "http://x", "--username", "ci", "--password", "wrong"],
    );
    o.assert_code(1);
    o.assert_stderr_has("refused the connection");
    let o = publish(
        out.path(),
        broker.port,
        &["--base-url", "http://x", "--username", "ci", "--password", "s3cret"],
    );
    o.assert_code(0);
}

#[test]
fn publish_over_tls_with_a_private_ca() {
    if !crate::common::have("openssl") {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let sh = format!(
        "set -e; cd {d}
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=fleet-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null
chmod 755 {d}; chmod 644 server.key  # mosquitto drops root privileges before reading them"
    );
    assert!(Command::new("sh").args(["-c", &sh]).status().expect("openssl").success());
    let tls_port = free_port();
    let broker = mosquitto(&format!(
        "allow_anonymous true\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key"
    ));
    crate::common::wait_for_port(tls_port, "mosquitto tls");
    let (_repo, _keys, out) = built_example();
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let ca = format!("{d}/ca.pem");
    let o = bundler(&[
        "publish",
        "--out",
        out.path().to_str().expect("utf-8"),
        "--broker",
        &url,
        "--ca-file",
        &ca,
        "--base-url",
        "http://x",
    ]);
    o.assert_code(0);
    assert_eq!(retained(broker.port, "fleet/acme/devices/+/desired", 6).len(), 6);
    // Without the CA the server is not trusted.
    let o = bundler(&[
        "publish",
        "--out",
        out.path().to_str().expect("utf-8"),
        "--broker",
        &url,
        "--base-url",
        "http://y",
        "--timeout",
        "3s",
    ]);
    o.assert_code(1);
    o.assert_stderr_has("cannot connect");
}

fn report(device: &str, state: DeviceState, applied: Option<(u64, &str)>, desired: (u64, &str)) -> String {
    let r = StatusReport {
        device: device.into(),
        fleet: "acme".into(),
        agent_version: "0.1.0".into(),
        state,
        desired: Some(VersionRef { version: desired.0, digest: desired.1.into(), commit: "c".into() }),
        applied: applied.map(|(version, digest)| Applied {
            version,
            digest: digest.into(),
            commit: "c".into(),
            at: 1,
        }),
        containers: vec![],
        files: FileCounts::default(),
        last_error: (state == DeviceState::Failed).then(|| LastError {
            code: "health_timeout".into(),
            message: "api did not become healthy".into(),
            at: 1,
        }),
        waiting: None,
        agent_update: None,
        timestamp: fleet_bundler::timefmt::now(),
    };
    String::from_utf8(r.to_json()).expect("utf-8")
}

fn pub_retained(port: u16, topic: &str, payload: &str) {
    let ok = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-r", "-q", "1", "-m", payload])
        .status()
        .expect("mosquitto_pub")
        .success();
    assert!(ok);
}

fn status(port: u16, index: &Path, extra: &[&str]) -> crate::common::Output {
    let url = broker_url(port);
    let mut args = vec!["status", "--broker", &url, "--index", index.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    bundler(&args)
}

#[test]
fn status_shows_the_table_and_gates_on_convergence() {
    let broker = mosquitto("allow_anonymous true");
    let (_repo, _keys, out) = built_example();
    let index = read_index(out.path());
    let index_path = out.path().join("index.json");
    let entry = |d: &str| {
        let e = &index["devices"][d];
        (e["version"].as_u64().expect("version"), e["digest"].as_str().expect("digest").to_string())
    };

    // Canary converged; the rest have not reported yet.
    let (v, dg) = entry("gw-berlin-01");
    pub_retained(
        broker.port,
        "fleet/acme/devices/gw-berlin-01/status",
        &report("gw-berlin-01", DeviceState::Converged, Some((v, &dg)), (v, &dg)),
    );
    pub_retained(broker.port, "fleet/acme/devices/gw-berlin-01/online", "true");

    let table = status(broker.port, &index_path, &[]);
    table.assert_code(0);
    assert!(table.stdout.starts_with("DEVICE"), "{}", table.stdout);
    let canary_line = table.stdout.lines().find(|l| l.starts_with("gw-berlin-01")).expect("canary row");
    assert!(canary_line.contains("yes") && canary_line.contains("converged"), "{canary_line}");
    assert!(
        table.stdout.lines().any(|l| l.starts_with("sensor-hub-01") && l.contains("no report")),
        "{}",
        table.stdout
    );

    let json = status(broker.port, &index_path, &["--json"]);
    json.assert_code(0);
    let rows = json.json()["devices"].as_array().expect("rows").clone();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0]["device"], "gw-berlin-01");
    assert_eq!(rows[0]["applied_version"], v);

    // The canary gate passes: every selected device converged.
    status(broker.port, &index_path, &["--selector", "channel=canary", "--wait", "--timeout", "5s"])
        .assert_code(0);
    // The whole fleet times out (exit 4), within the bound.
    let started = Instant::now();
    let o = status(broker.port, &index_path, &["--wait", "--timeout", "2s"]);
    o.assert_code(4);
    assert!(started.elapsed() < Duration::from_secs(10));

    // One device fails on its indexed version: exit 3 at once.
    let (v2, d2) = entry("gw-berlin-02");
    pub_retained(
        broker.port,
        "fleet/acme/devices/gw-berlin-02/status",
        &report("gw-berlin-02", DeviceState::Failed, None, (v2, &d2)),
    );
    let started = Instant::now();
    let o = status(broker.port, &index_path, &["--wait", "--timeout", "30s"]);
    o.assert_code(3);
    assert!(started.elapsed() < Duration::from_secs(10), "failure is reported at once");
    assert!(o.stdout.contains("health_timeout: api did not become healthy"), "{}", o.stdout);

    // Everyone converges: exit 0.
    for d in ["gw-berlin-02", "gw-munich-01", "sensor-hub-01", "lab-gateway-01", "lab-kiosk-01"] {
        let (v, dg) = entry(d);
        pub_retained(
            broker.port,
            &format!("fleet/acme/devices/{d}/status"),
            &report(d, DeviceState::Converged, Some((v, &dg)), (v, &dg)),
        );
    }
    status(broker.port, &index_path, &["--wait", "--timeout", "10s"]).assert_code(0);
}

#[test]
fn status_needs_a_fleet_and_a_reachable_broker() {
    // A usage problem found after parsing exits 64 like a bad flag (as --help says).
    let o = bundler(&["status", "--broker", "mqtt://127.0.0.1:1"]);
    o.assert_code(64);
    o.assert_stderr_has("pass --fleet NAME or --index DIR/index.json");
    let o = bundler(&["status", "--broker", "mqtt://127.0.0.1:1", "--fleet", "a/b"]);
    o.assert_code(64);
    o.assert_stderr_has("fleet id \"a/b\" contains '/'");
    let o = bundler(&["exporter", "--broker", "mqtt://127.0.0.1:1"]);
    o.assert_code(64);
    o.assert_stderr_has("pass --fleet NAME or --index DIR/index.json");
    let started = Instant::now();
    let o = bundler(&[
        "status",
        "--broker",
        &broker_url(free_port()),
        "--fleet",
        "acme",
        "--connect-timeout",
        "2s",
    ]);
    o.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(10));
    o.assert_stderr_has("cannot connect");
}

/// `GET /metrics` on `addr`: the body, or `None` while nothing answers.
fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Some(body.to_string())
}

fn wait_metrics(addr: &str, what: &str, lines: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(body) = scrape(addr) {
            if lines.iter().all(|l| body.lines().any(|b| b == *l)) {
                return body;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}: {lines:?}\n{last}");
}

#[test]
fn status_serve_follows_the_broker_through_a_restart_and_stops_on_sigterm() {
    let broker = mosquitto("allow_anonymous true");
    let port = broker.port;
    let converged = report("gw-1", DeviceState::Converged, None, (3, &"a".repeat(64)));
    pub_retained(port, "fleet/acme/devices/gw-1/status", &converged);
    pub_retained(port, "fleet/acme/devices/gw-1/online", "true");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut exporter = Command::new(env!("CARGO_BIN_EXE_fleet-bundler"))
        .args(["status", "--broker", &broker_url(port), "--fleet", "acme", "--serve", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn status --serve");
    wait_metrics(
        &addr,
        "gw-1 converged",
        &["fleet_exporter_broker_connected 1", "fleet_devices_by_state{state=\"converged\"} 1"],
    );

    // The broker goes away: the exporter says so and keeps the last known state.
    drop(broker);
    wait_metrics(
        &addr,
        "the broker gone",
        &["fleet_exporter_broker_connected 0", "fleet_devices_by_state{state=\"converged\"} 1"],
    );

    // A fresh broker (nothing retained) on the same port: reconnected, resubscribed,
    // and gw-1, which the broker no longer retains, forgotten; new reports count.
    let broker = mosquitto_on(port, "allow_anonymous true");
    wait_metrics(
        &addr,
        "reconnected and gw-1 forgotten",
        &["fleet_exporter_broker_connected 1", "fleet_devices 0"],
    );
    let failed = report("gw-2", DeviceState::Failed, None, (3, &"a".repeat(64)));
    pub_retained(broker.port, "fleet/acme/devices/gw-2/status", &failed);
    wait_metrics(&addr, "gw-2 failed", &["fleet_devices 1", "fleet_devices_by_state{state=\"failed\"} 1"]);

    let killed = Command::new("kill").args(["-TERM", &exporter.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = exporter.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = exporter.kill();
            panic!("SIGTERM did not stop the exporter within 5s");
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(code, Some(0), "SIGTERM is a clean stop");
}
