//! Prometheus metrics (issue 18): `fleet-bundler exporter` against a real Mosquitto and
//! real agents. The test scrapes `/metrics` over HTTP and reads it with a strict parser
//! of the text format 0.0.4 written here (independent of the exporter's renderer):
//! devices by state after a publish (one converged, one failing with its reason code),
//! a device going offline, hostile retained messages that must neither break the
//! format nor the exporter, and a clean exit 0 on SIGTERM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fleet_e2e::{free_port, wait_until, workspace_bin, Device, FleetRepo, Mosquitto};
use fleet_spec::messages::{DeviceState, FileCounts, LastError, StatusReport, VersionRef};
use fleet_spec::SigningKey;

use crate::common::*;

/// `fleet-bundler exporter ARGS --listen 127.0.0.1:<free port>`, stopped on drop.
struct Exporter {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Exporter {
    fn start(args: &[&str]) -> Result<Exporter> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("exporter.log");
        let out = std::fs::File::create(&log)?;
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(workspace_bin("fleet-bundler")?)
            .arg("exporter")
            .args(args)
            .args(["--listen", &addr, "--settle", "1s"])
            .env_remove("FLEET_BROKER")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning fleet-bundler exporter")?;
        let exporter = Exporter { child: Some(child), addr, log, _dir: dir };
        wait_until(secs(20), "the exporter to serve /metrics, connected", || {
            Ok(exporter.scrape()?.get("fleet_exporter_broker_connected", &[]) == Some(1.0))
        })
        .with_context(|| exporter.log())?;
        Ok(exporter)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A raw HTTP exchange: what was sent, everything read back.
    fn exchange(&self, request: &[u8]) -> Result<String> {
        let mut stream =
            TcpStream::connect(&self.addr).with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_read_timeout(Some(secs(10)))?;
        stream.write_all(request)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        String::from_utf8(response).context("the response is not UTF-8")
    }

    /// `GET /metrics`, checked (200, content type), parsed strictly.
    fn scrape(&self) -> Result<Metrics> {
        let response =
            self.exchange(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nAccept: text/plain\r\n\r\n")?;
        let (head, body) = response.split_once("\r\n\r\n").context("no end of the response head")?;
        ensure!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        ensure!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8")),
            "no exposition content type in {head}"
        );
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .context("no Content-Length")?
            .parse()?;
        ensure!(length == body.len(), "Content-Length {length}, body {} bytes", body.len());
        parse_exposition(body)
    }

    /// Sends SIGTERM and returns the exit code.
    fn terminate(&mut self) -> Result<Option<i32>> {
        let mut child = self.child.take().context("not running")?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the exporter ignored SIGTERM for 5s\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Samples by (name, labels).
struct Metrics {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    text: String,
}

impl Metrics {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.get(name, labels).ok_or_else(|| anyhow!("no sample {name}{labels:?} in\n{}", self.text))
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

/// The text format 0.0.4, strictly: `# HELP name text`, `# TYPE name gauge|counter`
/// before the family's samples, samples `name{k="v",...} value` with only the escapes
/// `\\`, `\"`, `\n` in label values, no series twice, a final line feed.
fn parse_exposition(text: &str) -> Result<Metrics> {
    ensure!(text.ends_with('\n'), "the exposition does not end with a line feed");
    let mut typed = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || anyhow!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(bad)?;
            ensure!(is_name(name, true) && matches!(kind, "gauge" | "counter"), bad());
            ensure!(typed.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice: {}", bad());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            ensure!(is_name(name, true), bad());
            continue;
        }
        ensure!(!line.starts_with('#') && !line.is_empty(), bad());
        let name_end = line.find(['{', ' ']).ok_or_else(bad)?;
        let name = &line[..name_end];
        ensure!(is_name(name, true), bad());
        let family = name.strip_suffix("_total").filter(|f| typed.get(*f).is_some_and(|k| k == "counter"));
        ensure!(typed.contains_key(name) || family.is_some(), "sample without a TYPE: {}", bad());
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            while !rest.starts_with('}') {
                let (key, r) = rest.split_once("=\"").ok_or_else(bad)?;
                ensure!(is_name(key, false), bad());
                let mut value = String::new();
                let mut it = r.char_indices();
                let end = loop {
                    match it.next().ok_or_else(bad)? {
                        (_, '\\') => match it.next().ok_or_else(bad)?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            _ => return Err(bad()),
                        },
                        (i, '"') => break i + 1,
                        (_, c) => value.push(c),
                    }
                };
                ensure!(labels.insert(key.to_string(), value).is_none(), bad());
                rest = &r[end..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
            rest = &rest[1..];
        }
        let value = rest.strip_prefix(' ').ok_or_else(bad)?;
        let value: f64 = value.parse().map_err(|_| bad())?;
        ensure!(samples.insert((name.to_string(), labels), value).is_none(), "series twice: {}", bad());
    }
    Ok(Metrics { samples, text: text.to_string() })
}

#[test]
fn exporter_counts_devices_by_state_after_a_publish_with_a_failing_device_as_failed() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-ok", &[("site", "berlin")])?;
    fleet.add_device("gw-bad", &[("site", "paris")])?;
    files_app(&fleet, "greeting", None, &[("files/motd", "Hello from {{ device.id }}\n")])?;
    let commit = fleet.commit("greeting for every device")?;
    fleet.build()?;
    let index = fleet.out_dir().join("index.json");
    let exporter = Exporter::start(&["--broker", &broker.url(), "--index", &index.to_string_lossy()])?;

    // Before any agent reports: the index's devices, unknown and outdated.
    let m = exporter.scrape()?;
    assert_eq!(m.must("fleet_devices", &[])?, 2.0, "{}", m.text);
    assert_eq!(m.must("fleet_devices_by_state", &[("state", "unknown")])?, 2.0);
    assert_eq!(m.must("fleet_devices_outdated", &[])?, 2.0);
    assert_eq!(m.must("fleet_devices_by_desired_commit", &[("commit", &commit)])?, 2.0);
    assert_eq!(
        m.must("fleet_exporter_build_info", &[("version", "0.1.0"), ("fleet", "acme"), ("prefix", "fleet")])?,
        1.0
    );

    // gw-bad trusts another key: it refuses the genuine bundle (unknown_key), failed.
    let stranger = SigningKey::from_seed(&[7; 32]).public().to_string();
    let mut ok =
        Device::builder(&fleet, "gw-ok")?.broker(&broker.url()).no_polling().private_root().start()?;
    let bad = Device::builder(&fleet, "gw-bad")?
        .broker(&broker.url())
        .no_polling()
        .private_root()
        .trust(vec![stranger])
        .start()?;
    fleet.publish(&broker.url())?;

    let mut last = None;
    wait_until(CONVERGE, "the metrics to show gw-ok converged and gw-bad failed", || {
        let m = exporter.scrape()?;
        let done = m.get("fleet_devices_by_state", &[("state", "converged")]) == Some(1.0)
            && m.get("fleet_devices_by_state", &[("state", "failed")]) == Some(1.0);
        last = Some(m.text);
        Ok(done)
    })
    .with_context(|| {
        format!("{}\n{}\n{}\n{}", last.unwrap_or_default(), ok.log_tail(), bad.log_tail(), exporter.log())
    })?;

    let m = exporter.scrape()?;
    assert_eq!(m.must("fleet_devices", &[])?, 2.0, "{}", m.text);
    assert_eq!(m.must("fleet_devices_by_state", &[("state", "unknown")])?, 0.0);
    assert_eq!(m.must("fleet_devices_by_applied_commit", &[("commit", &commit)])?, 1.0, "{}", m.text);
    assert_eq!(m.must("fleet_devices_by_applied_commit", &[("commit", "none")])?, 1.0);
    assert_eq!(m.must("fleet_devices_outdated", &[])?, 1.0, "gw-bad applied nothing");
    assert_eq!(m.must("fleet_devices_in_trouble_by_error", &[("code", "unknown_key")])?, 1.0, "{}", m.text);
    assert_eq!(m.must("fleet_devices_by_online", &[("online", "true")])?, 2.0);
    assert_eq!(m.must("fleet_device_state", &[("device", "gw-bad"), ("state", "failed")])?, 1.0);
    assert_eq!(m.must("fleet_device_state", &[("device", "gw-ok"), ("state", "converged")])?, 1.0);
    let seen = m.must("fleet_device_last_report_timestamp_seconds", &[("device", "gw-ok")])? as i64;
    let now = fleet_e2e::fleet::now_unix();
    ensure!((now - 300..=now + 5).contains(&seen), "last report at {seen}, now {now}");
    assert_eq!(m.must("fleet_exporter_invalid_messages_total", &[("topic", "status")])?, 0.0);

    // Live: the agent stops, its online flag turns false, and the metrics follow.
    ok.stop();
    wait_until(REPORT, "fleet_device_online{device=\"gw-ok\"} 0", || {
        Ok(exporter.scrape()?.get("fleet_device_online", &[("device", "gw-ok")]) == Some(0.0))
    })?;
    assert_eq!(exporter.scrape()?.must("fleet_devices_by_online", &[("online", "false")])?, 1.0);

    let mut exporter = exporter;
    assert_eq!(exporter.terminate()?, Some(0), "SIGTERM is a clean stop\n{}", exporter.log());
    Ok(())
}

fn hostile_report(device: &str) -> StatusReport {
    StatusReport {
        device: device.into(),
        fleet: "acme".into(),
        agent_version: "0.1.0\"}\n".into(),
        state: DeviceState::Failed,
        desired: Some(VersionRef {
            version: 1,
            digest: "d".into(),
            commit: "c0ffee\"} 1\nevil_metric 2".into(),
        }),
        applied: None,
        containers: Vec::new(),
        files: FileCounts::default(),
        last_error: Some(LastError { code: "bad\"code\n".into(), message: "\\\"}\n".into(), at: 1 }),
        waiting: None,
        agent_update: None,
        timestamp: 1_700_000_000,
    }
}

#[test]
fn exporter_survives_garbage_huge_and_hostile_retained_messages() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mqtt = broker.client();
    // Retained before the exporter starts (what it reads first) ...
    mqtt.publish("fleet/acme/devices/junk/status", b"{not json at all", true)?;
    mqtt.publish("fleet/acme/devices/big/status", vec![b'x'; 2 << 20], true)?;
    mqtt.publish("fleet/acme/devices/junk/online", b"maybe\n", true)?;
    mqtt.publish("fleet/acme/devices/weird/status", hostile_report("weird").to_json(), true)?;
    // ... a topic whose device id breaks the id rule (quote): not a device topic, ignored.
    mqtt.publish("fleet/acme/devices/we\"ird/status", hostile_report("we\"ird").to_json(), true)?;
    // ... and a rollout state whose commit and wave name try to smuggle samples in.
    let rollout = |commit: &str, wave: &str, failed: u64| {
        format!(
            r#"{{"fleet":"acme","commit":{},"state":"halted","wave":0,"started_at":1,"updated_at":2,"halt":{{"min_reporting":1}},"waves":[{{"name":{},"devices":9,"announced":9,"succeeded":5,"failed":{failed},"pending":1}}]}}"#,
            serde_json::to_string(commit).expect("a string"),
            serde_json::to_string(wave).expect("a string"),
        )
    };
    mqtt.publish("fleet/acme/rollout", rollout("\"} 1\nevil_rollout 1\n", "w\"}\nevil_wave 1", 3), true)?;
    let exporter = Exporter::start(&["--broker", &broker.url(), "--fleet", "acme"])?;

    let mut last = String::new();
    wait_until(REPORT, "the hostile messages counted", || {
        let m = exporter.scrape()?;
        last = m.text.clone();
        Ok(m.get("fleet_exporter_invalid_messages_total", &[("topic", "status")]) == Some(2.0)
            && m.get("fleet_exporter_invalid_messages_total", &[("topic", "online")]) == Some(1.0)
            && m.get("fleet_devices_by_state", &[("state", "failed")]) == Some(1.0)
            && m.get("fleet_rollout_info", &[("commit", "invalid"), ("state", "halted")]) == Some(1.0))
    })
    .with_context(|| format!("{last}\n{}", exporter.log()))?;
    let m = exporter.scrape()?;
    assert_eq!(m.must("fleet_devices", &[])?, 3.0, "junk, big, weird: {}", m.text);
    assert_eq!(m.must("fleet_devices_by_state", &[("state", "unknown")])?, 2.0);
    assert_eq!(m.must("fleet_exporter_invalid_messages_total", &[("topic", "online")])?, 1.0);
    assert_eq!(m.must("fleet_devices_by_desired_commit", &[("commit", "invalid")])?, 1.0);
    assert_eq!(m.must("fleet_devices_in_trouble_by_error", &[("code", "other")])?, 1.0);
    ensure!(!m.samples.keys().any(|(name, _)| name.starts_with("evil")), "a smuggled sample:\n{}", m.text);

    // Garbage on the HTTP side too: answered, and the next scrape still works.
    assert!(exporter.exchange(b"\x16\x03\x01garbage\r\n\r\n")?.starts_with("HTTP/1.1 400 "));
    assert!(exporter.exchange(b"DELETE /metrics HTTP/1.1\r\n\r\n")?.starts_with("HTTP/1.1 405 "));

    // The exporter still follows the fleet: junk now sends a real report.
    let mut good = hostile_report("junk");
    good.state = DeviceState::Converged;
    good.last_error = None;
    mqtt.publish("fleet/acme/devices/junk/status", good.to_json(), true)?;
    mqtt.publish("fleet/acme/devices/big/status", b"", true)?;
    mqtt.publish("fleet/acme/rollout", rollout(&"c".repeat(40), "rest", 4), true)?;
    wait_until(REPORT, "junk converged, big forgotten, the rollout updated", || {
        let m = exporter.scrape()?;
        Ok(m.get("fleet_devices_by_state", &[("state", "converged")]) == Some(1.0)
            && m.get("fleet_devices", &[]) == Some(2.0)
            && m.get("fleet_rollout_wave_devices", &[("wave", "rest"), ("result", "failed")]) == Some(4.0))
    })?;
    let m = exporter.scrape()?;
    assert_eq!(m.must("fleet_rollout_info", &[("commit", &"c".repeat(40)), ("state", "halted")])?, 1.0);
    assert_eq!(m.must("fleet_rollout_wave", &[])?, 1.0);
    let mut exporter = exporter;
    assert_eq!(exporter.terminate()?, Some(0), "{}", exporter.log());
    Ok(())
}
