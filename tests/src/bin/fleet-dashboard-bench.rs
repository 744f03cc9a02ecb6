//! `fleet-dashboard-bench` (run by `bench/dashboard.sh`): the dashboard page with a large
//! fleet, on real Mosquitto (WebSockets listener) and headless Chromium.
//!
//! 1. A fleet repository of N devices (labels `site`, `channel`) is built with the
//!    dashboard (`config.js` then lists every device).
//! 2. N retained statuses and N retained `online` flags are published (one MQTT
//!    connection, QoS 0; a PINGREQ round trip at the end proves the broker read them
//!    all): 90% converged, 4% failed, 3% applying, 2% rolled back, 1% degraded, over 10
//!    commits; 3% offline.
//! 3. The page is opened: time until all N devices are counted, and the longest
//!    main-thread stall (the longest "long task" Chromium reports, and the longest render).
//! 4. Live: N new statuses (every device converged on a new commit) are published while
//!    the page is open: time until the page shows all N on it, and the stalls meanwhile.
//!
//! Prints a Markdown table. `--devices N` (default 10000).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleet_e2e::fleet::now_unix;
use fleet_e2e::{Chromium, FleetRepo, Mosquitto, Page};
use serde_json::{json, Value};

fn main() {
    if let Err(e) = run() {
        eprintln!("fleet-dashboard-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut devices = 10_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--devices" => devices = args.next().context("--devices N")?.parse().context("--devices N")?,
            "-h" | "--help" => {
                println!("fleet-dashboard-bench [--devices N]   (see bench/dashboard.sh)");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    // Mosquitto queues at most max_queued_messages (default 1000) outgoing messages per
    // client, QoS 0 included: a subscription matching more retained messages than that
    // loses the rest ("Outgoing messages are being dropped"). The README's dashboard
    // listener configuration raises it; so does this broker.
    let broker = Mosquitto::builder().websockets(true).extra("max_queued_messages 100000").start()?;
    let ws = broker.ws_url().context("websockets")?;

    eprintln!("building a fleet of {devices} devices with the dashboard");
    let mut fleet = FleetRepo::new("bench")?;
    let sites = ["berlin", "paris", "madrid", "rome", "oslo", "lisbon", "vienna", "prague"];
    for i in 0..devices {
        let channel = if i % 20 == 0 { "canary" } else { "stable" };
        fleet.add_device(&id(i), &[("site", sites[i % sites.len()]), ("channel", channel)])?;
    }
    fleet.commit("a large fleet")?;
    let built = Instant::now();
    fleet.build_output(&["--dashboard-broker", &ws])?.check()?;
    let build_secs = built.elapsed().as_secs_f64();
    let config_size = std::fs::metadata(fleet.out_dir().join("dashboard/config.js"))?.len();

    eprintln!("publishing {devices} retained statuses");
    let commits: Vec<String> = (0..10).map(|c| format!("{c:x}").repeat(40)).collect();
    let now = now_unix();
    let first: Vec<(String, Vec<u8>)> = (0..devices)
        .map(|i| {
            let (state, error) = match i % 100 {
                0..=3 => {
                    ("failed", json!({"code": "pull_failed", "message": "registry unreachable", "at": now}))
                }
                4..=6 => ("applying", Value::Null),
                7..=8 => (
                    "rolled_back",
                    json!({"code": "health_timeout", "message": "web not healthy in 60 s", "at": now}),
                ),
                9 => (
                    "degraded",
                    json!({"code": "engine_unavailable", "message": "docker.sock refused", "at": now}),
                ),
                _ => ("converged", Value::Null),
            };
            (topic(i, "status"), status(i, state, &commits[i % commits.len()], error, now).into_bytes())
        })
        .collect();
    let mut first = first;
    first.extend(
        (0..devices)
            .map(|i| (topic(i, "online"), if i % 33 == 5 { b"false".to_vec() } else { b"true".to_vec() })),
    );
    let published = Instant::now();
    publish_all(broker.port(), &first)?;
    let publish_secs = published.elapsed().as_secs_f64();

    let browser = Chromium::start(1400, 900)?;
    let url = format!("file://{}?expect={devices}", fleet.out_dir().join("dashboard/index.html").display());
    let opened = Instant::now();
    let mut page = browser.open(&url)?;
    let all = format!("window.fleetDashboard && window.fleetDashboard.stats().reported >= {devices}");
    page.wait_for(
        Duration::from_secs(300),
        "every device counted",
        &all,
        "JSON.stringify(window.fleetDashboard.stats())",
    )?;
    let load_wall = opened.elapsed().as_secs_f64();
    settle(&mut page)?;
    let load = page.eval("window.fleetDashboard.stats()")?;
    eprintln!("page stats after load (ms since navigation): {load}");

    eprintln!("publishing {devices} live updates with the page open");
    page.eval("window.fleetDashboard.resetStalls()")?;
    let fresh = "f".repeat(40);
    let second: Vec<(String, Vec<u8>)> = (0..devices)
        .map(|i| (topic(i, "status"), status(i, "converged", &fresh, Value::Null, now + 1).into_bytes()))
        .collect();
    let live_started = Instant::now();
    publish_all(broker.port(), &second)?;
    let shown = format!("window.fleetDashboard.appliedCount({}) >= {devices}", json!(fresh));
    page.wait_for(
        Duration::from_secs(300),
        "every update shown",
        &shown,
        "JSON.stringify(window.fleetDashboard.stats())",
    )?;
    let live_wall = live_started.elapsed().as_secs_f64();
    settle(&mut page)?;
    let live = page.eval("window.fleetDashboard.stats()")?;

    let ms = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let chromium = std::process::Command::new("chromium").arg("--version").output().ok();
    let chromium =
        chromium.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    println!("Dashboard with {devices} devices ({chromium}, Mosquitto WebSockets listener on loopback; config.js {config_size} bytes; build {build_secs:.1} s; {devices} retained statuses and online flags published in {publish_secs:.2} s)\n");
    println!("| phase | time until all {devices} shown | longest main-thread stall (long task) | longest render | renders |");
    println!("|---|---|---|---|---|");
    println!(
        "| page load, {devices} retained statuses + online flags | {load_wall:.2} s from navigation ({:.2} s from the page's script start) | {:.0} ms | {:.0} ms | {} |",
        (ms(&load, "allReportedAt") - ms(&load, "startedAt")) / 1000.0,
        ms(&load, "longestTaskMs"),
        ms(&load, "longestRenderMs"),
        load["renders"]
    );
    println!(
        "| live, {devices} updates while open | {live_wall:.2} s from the first publish | {:.0} ms | {:.0} ms | {} |",
        ms(&live, "longestTaskMs"),
        ms(&live, "longestRenderMs"),
        live["renders"].as_u64().unwrap_or(0).saturating_sub(load["renders"].as_u64().unwrap_or(0))
    );
    if let Ok(path) = std::env::var("FLEET_DASHBOARD_BENCH_SCREENSHOT") {
        page.screenshot(std::path::Path::new(&path))?;
        eprintln!("screenshot: {path}");
    }
    Ok(())
}

/// Waits until the page rendered its last change (a render runs at most every 200 ms).
fn settle(page: &mut Page) -> Result<()> {
    std::thread::sleep(Duration::from_millis(600));
    page.eval("new Promise(r => requestAnimationFrame(() => r(true)))")?;
    Ok(())
}

fn id(i: usize) -> String {
    format!("gw-{i:05}")
}

fn topic(i: usize, kind: &str) -> String {
    format!("fleet/bench/devices/{}/{kind}", id(i))
}

fn status(i: usize, state: &str, commit: &str, error: Value, now: i64) -> String {
    json!({
        "device": id(i), "fleet": "bench", "agent_version": "0.1.0", "state": state,
        "desired": {"version": 2, "digest": "d".repeat(64), "commit": commit},
        "applied": {"version": 2, "digest": "d".repeat(64), "commit": commit, "at": now},
        "containers": [{"name": "web-nginx", "image": "registry:5000/nginx@sha256:0123", "running": true, "health": "healthy", "restarts": 0}],
        "files": {"managed": 3, "drift_repaired": 0},
        "last_error": error, "timestamp": now,
    })
    .to_string()
}

/// Publishes every (topic, payload) retained at QoS 0 over one MQTT 3.1.1 connection,
/// then waits for a PINGRESP: the broker handles a connection's packets in order, so
/// by then it has stored them all.
fn publish_all(port: u16, messages: &[(String, Vec<u8>)]) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to Mosquitto")?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let client_id = format!("dashboard-bench-{}", std::process::id());
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.extend([4, 0x02, 0, 60]); // level 4, clean session, keepalive 60 s
    put_str(&mut body, client_id.as_bytes());
    let mut out = packet(0x10, &body);
    s.write_all(&out)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).context("CONNACK")?;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("connection refused: {connack:?}");
    }
    out.clear();
    for (topic, payload) in messages {
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 2);
        put_str(&mut body, topic.as_bytes());
        body.extend_from_slice(payload);
        out.extend(packet(0x31, &body)); // PUBLISH, QoS 0, retain
        if out.len() > 1 << 20 {
            s.write_all(&out)?;
            out.clear();
        }
    }
    out.extend([0xC0, 0]); // PINGREQ
    s.write_all(&out)?;
    let mut pingresp = [0u8; 2];
    s.read_exact(&mut pingresp).context("PINGRESP")?;
    if pingresp != [0xD0, 0] {
        bail!("expected PINGRESP, got {pingresp:?}");
    }
    s.write_all(&[0xE0, 0])?; // DISCONNECT
    Ok(())
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend((s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        p.push(b);
        if n == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}
