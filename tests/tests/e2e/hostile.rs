//! Hardening I: a hostile broker and hostile servers. Whoever can publish on the broker
//! can retain announcements on a device's `desired` topic; what they say (digests,
//! URLs, sizes, versions) is unsigned, so it may make the agent *look* somewhere, never
//! refuse, blacklist, prefer or delay a bundle that verifies (PRODUCT.md, "Unsigned is a
//! hint"). The genuine bundle reaches the device through its pointer poll
//! (`<fetch.base_url>/devices/<id>.json`) within one poll interval of its upload, and a
//! genuine MQTT publish still works afterwards.
//!
//! The attacker's servers are [`HostileHttpServer`]s: every connection is logged, so
//! each case asserts that the agent really tried the server (the attack was exercised)
//! and how long it held on. The agent runs with short fetch limits ([`fetch_limits`]):
//! `timeout_secs` (connect and idle read), `deadline_secs` (a download's total time per
//! URL) and `min_bytes_per_sec` (its average rate after the first `timeout_secs`).
//!
//! The first scenario collects every broken expectation ([`Findings`]) and reports them
//! all at the end, with what the device holds, what it published, every hostile
//! connection and the agent's log, so one run shows everything an agent gets wrong.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fleet_e2e::fleet::{converged_on, sha256_hex, state};
use fleet_e2e::hostile_http::Ending;
use fleet_e2e::{
    require_program, wait_until, Device, DeviceBuilder, DeviceWatch, FleetRepo, HostileHttpServer, Hostility,
    Mosquitto, Mqtt,
};
use fleet_spec::messages::Announcement;
use serde_json::Value;

use crate::common::*;

/// `[fetch] timeout_secs`: connect and idle read timeout.
const TIMEOUT_SECS: u64 = 2;
/// `[fetch] deadline_secs`: a download's total time, per URL.
const DEADLINE_SECS: u64 = 10;
/// `[fetch] min_bytes_per_sec`: a download's average rate after its first `timeout_secs`.
const MIN_BYTES_PER_SEC: u64 = 4;
/// `[fetch] poll_interval_secs` (the agent's minimum).
const POLL_SECS: u64 = 5;
/// `reconcile_interval_secs`.
const RECONCILE_SECS: u64 = 2;
/// What a deadline in these scenarios allows beyond its nominal time (a busy machine,
/// a debug build).
const SLACK: Duration = Duration::from_secs(4);
/// How long `fleet-agent apply` may take to answer while a download is in flight.
const SIDELOAD_ANSWER: Duration = Duration::from_secs(5);
/// How long a hostile server holds a connection at most.
const SERVER_LIMIT: Duration = Duration::from_secs(30);

/// gw-1 of fleet `acme` on `broker`, polling the fleet's bundle server, with short fetch
/// limits.
fn fetch_limits(fleet: &FleetRepo, broker: &Mosquitto) -> Result<DeviceBuilder> {
    Ok(Device::builder(fleet, "gw-1")?
        .broker(&broker.url())
        .reconcile_interval_secs(RECONCILE_SECS)
        .setting("fetch", "poll_interval_secs", &POLL_SECS.to_string())
        .setting("fetch", "timeout_secs", &TIMEOUT_SECS.to_string())
        .setting("fetch", "deadline_secs", &DEADLINE_SECS.to_string())
        .setting("fetch", "min_bytes_per_sec", &MIN_BYTES_PER_SEC.to_string()))
}

/// Starts the agent and checks it accepted its configuration (the fetch limits above):
/// it is still running once it opened its sideload socket or logged its start (or
/// after [`REPORT`]).
fn start(device: &mut Device) -> Result<()> {
    device.start()?;
    let socket = device.state_dir().join("agent.sock");
    let _ = wait_until(REPORT, "the agent to start", || {
        Ok(!device.is_running() || socket.exists() || device.log().contains("fleet-agent starting"))
    });
    ensure!(
        device.is_running(),
        "the agent exited at start: does it know [fetch] deadline_secs and min_bytes_per_sec?\n{}\n--- agent.toml ---\n{}",
        device.log_tail(),
        fs::read_to_string(device.config_path()).unwrap_or_default()
    );
    Ok(())
}

/// Retains on gw-1's `desired` topic, as anyone who can publish on the broker can, an
/// announcement of bundle `digest`.
fn hint(
    fleet: &FleetRepo,
    attacker: &Mqtt,
    digest: &str,
    version: u64,
    size: u64,
    urls: Vec<String>,
) -> Result<()> {
    fleet.announce(attacker, &hint_for(digest, version, size, urls))
}

fn hint_for(digest: &str, version: u64, size: u64, urls: Vec<String>) -> Announcement {
    Announcement {
        fleet: "acme".into(),
        device: "gw-1".into(),
        version,
        commit: "a77ac4".repeat(6) + "aaaa",
        digest: digest.into(),
        size,
        urls,
        mqtt_blob: false,
    }
}

/// A digest no bundle has.
fn decoy(name: &str) -> String {
    sha256_hex(format!("decoy {name}").as_bytes())
}

/// Waits up to `deadline` for a status (any received, not only the newest) saying
/// `converged` on `commit`; returns it.
fn converged_within(watch: &DeviceWatch, deadline: Duration, commit: &str) -> Option<Value> {
    let mut found = None;
    let _ = wait_until(deadline, "converged", || {
        found = watch.statuses().into_iter().find(|s| converged_on(s, commit));
        Ok(found.is_some())
    });
    found
}

/// The entry of `digest` in the device's `rejected.json`, if any.
fn rejection(device: &Device, digest: &str) -> Result<Option<Value>> {
    let path = device.state_dir().join("rejected.json");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let all: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(all.get(digest).cloned())
}

/// The expectations a run broke, reported together at the end.
#[derive(Default)]
struct Findings {
    failed: Vec<String>,
    /// The genuine bundle was found in `rejected.json` (said once).
    rejected: bool,
}

impl Findings {
    fn fail(&mut self, what: String) {
        eprintln!("hostile: FAILED: {what}");
        self.failed.push(what);
    }

    /// Records `what` unless `ok`; returns `ok`.
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.fail(what());
        }
        ok
    }

    /// Waits up to `deadline` for `cond`; records `what` when it does not come.
    fn wait(&mut self, deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) -> bool {
        let ok = wait_until(deadline, what, || Ok(cond())).is_ok();
        self.check(ok, || format!("within {deadline:?}: {what}"))
    }

    /// Checks that `digest` is not in the device's `rejected.json`.
    fn not_rejected(&mut self, device: &Device, digest: &str, when: &str) -> Result<()> {
        if self.rejected {
            return Ok(());
        }
        let entry = rejection(device, digest)?;
        self.rejected = entry.is_some();
        self.check(entry.is_none(), || {
            format!(
                "{when}: the genuine bundle {digest} is in rejected.json: {} (an unsigned hint got a bundle that verifies blacklisted)",
                entry.unwrap_or_default()
            )
        });
        Ok(())
    }

    /// Checks that `server` got a request within `deadline` (the attack was exercised).
    fn tried(&mut self, server: &HostileHttpServer, name: &str, deadline: Duration) -> bool {
        self.wait(deadline, &format!("the agent to try {name} (the attack to be exercised)"), || {
            server.requests() > 0
        })
    }

    /// Checks that the first connection of `server` was closed by the agent, at most
    /// `within` after it opened (waiting that long, plus a second, for it to end).
    fn abandoned(&mut self, server: &HostileHttpServer, name: &str, within: Duration, rule: &str) {
        let first = || server.connections().into_iter().find(|c| c.request.is_some());
        let _ = wait_until(within + Duration::from_secs(1), "the connection to end", || {
            Ok(first().is_some_and(|c| !c.is_open()))
        });
        let Some(conn) = first() else { return }; // `tried` has said so
        let ok = matches!(conn.ended, Some((_, Ending::ClientClosed))) && conn.duration() <= within;
        self.check(ok, || {
            format!(
                "{name}: expected the agent to give up on it within {within:?} ({rule}); its first download: {}",
                server.describe().lines().next().unwrap_or_default()
            )
        });
    }

    /// Succeeds when nothing failed; otherwise one error naming every failure, followed
    /// by `context`.
    fn finish(self, context: impl FnOnce() -> String) -> Result<()> {
        if self.failed.is_empty() {
            return Ok(());
        }
        let list: Vec<String> =
            self.failed.iter().enumerate().map(|(i, f)| format!("{:>2}. {f}", i + 1)).collect();
        bail!("{} expectation(s) failed:\n{}\n\n{}", self.failed.len(), list.join("\n"), context())
    }
}

/// Issue "Hardening I", cases 1-3, in one run:
///
/// 1. retained announcements of the genuine next bundle's real digest D pointing at (a) a
///    server answering a 10 GiB `Content-Length` and then trickling, (b) one serving
///    wrong bytes of the announced size: D must never be rejected, and the agent also
///    asks its own `fetch.base_url` for D;
/// 2. an announcement of another digest with version `u64::MAX` pointing at a server
///    that never answers: it must not outrank the genuine bundle;
/// 3. an announcement whose servers trickle (below `min_bytes_per_sec`, and above it
///    until `deadline_secs`): while that download is in flight, file drift is repaired
///    within the reconcile interval and `fleet-agent apply` answers promptly.
///
/// Then CI uploads the genuine version 2 without publishing it (the attacker keeps the
/// retained topic): the device converges on it from its pointer poll within one poll
/// interval (plus slack), with D never rejected, and a genuine version 3 published over
/// MQTT afterwards is applied too.
#[test]
fn hostile_announcements_and_servers_never_keep_the_genuine_bundle_out() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let conf = fleet.app_file("conf", "app.conf");
    let mut device = fetch_limits(&fleet, &broker)?.create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    start(&mut device)?;
    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    deploy(&mut fleet, &broker, &watch, &device, "release 1")?;
    let v1 = fleet.entry("gw-1")?;

    // CI builds release 2 and has not uploaded it yet. Digests are not secret: the
    // attacker knows D, the digest of the bundle the device will want next.
    files_app(&fleet, "conf", None, &[("app.conf", "release = 2\n")])?;
    let c2 = fleet.commit("release 2")?;
    fleet.build_staged()?;
    let v2 = fleet.staged_entry("gw-1")?;
    let d = v2.digest.clone();
    let d_path = format!("/bundles/{d}.bundle");
    let genuine = fs::read(fleet.staged_bundle_path(&d))?;
    let attacker = broker.client();
    let mut f = Findings::default();

    // 1a. D at a server that announces 10 GiB, then trickles a byte a second.
    let huge = HostileHttpServer::start(
        Hostility::Trickle { content_length: 10 << 30, chunk: 1, every: secs(1) },
        SERVER_LIMIT,
    )?;
    hint(&fleet, &attacker, &d, v2.version, v2.size, vec![huge.url("d.bundle")])?;
    if f.tried(&huge, "1a (10 GiB Content-Length)", REPORT) {
        let within = secs(TIMEOUT_SECS) + SLACK;
        f.abandoned(
            &huge,
            "1a (10 GiB Content-Length)",
            within,
            "over max_bundle_bytes, or below min_bytes_per_sec",
        );
    }
    f.not_rejected(&device, &d, "after 1a")?;

    // 1b. D at a server that serves other bytes of D's size.
    let mut wrong_bytes = genuine.clone();
    let last = wrong_bytes.len() - 1;
    wrong_bytes[last] ^= 0xff;
    let wrong = HostileHttpServer::start(Hostility::Body(wrong_bytes), SERVER_LIMIT)?;
    hint(&fleet, &attacker, &d, v2.version, v2.size, vec![wrong.url("d.bundle")])?;
    f.tried(&wrong, "1b (wrong bytes of the announced size)", REPORT);
    // Transport failures are per URL: the agent also asks its own bundle server for D
    // (which has no D yet: 404).
    f.wait(secs(5), &format!("the agent to ask fetch.base_url for D ({d_path})"), || {
        fleet.server().requests().iter().any(|r| r.path == d_path)
    });
    f.not_rejected(&device, &d, "after 1b")?;

    // 2. Another digest with version u64::MAX, at a server that never answers.
    let silent = HostileHttpServer::start(Hostility::Silent, SERVER_LIMIT)?;
    hint(&fleet, &attacker, &decoy("max"), u64::MAX, 4096, vec![silent.url("x.bundle")])?;
    if f.tried(&silent, "2 (version u64::MAX, no answer)", REPORT) {
        let within = secs(TIMEOUT_SECS) + SLACK;
        f.abandoned(&silent, "2 (version u64::MAX, no answer)", within, "timeout_secs without a response");
    }
    f.not_rejected(&device, &d, "after 2")?;

    // 3. A bundle at two trickling servers: one below min_bytes_per_sec (a byte a
    // second), one above it (ten a second) that only deadline_secs stops. This is the
    // attacker's last announcement: it stays retained.
    let below_rate = HostileHttpServer::start(
        Hostility::Trickle { content_length: 1 << 20, chunk: 1, every: secs(1) },
        SERVER_LIMIT,
    )?;
    let slow = HostileHttpServer::start(
        Hostility::Trickle { content_length: 1 << 20, chunk: 1, every: Duration::from_millis(100) },
        SERVER_LIMIT,
    )?;
    let urls = vec![below_rate.url("y.bundle"), slow.url("y.bundle")];
    hint(&fleet, &attacker, &decoy("slow"), v2.version, 1 << 20, urls)?;
    if f.tried(&below_rate, "3 (below min_bytes_per_sec)", REPORT) {
        let within = secs(TIMEOUT_SECS) + SLACK;
        f.abandoned(
            &below_rate,
            "3 (below min_bytes_per_sec)",
            within,
            "min_bytes_per_sec after timeout_secs",
        );
    }
    f.wait(secs(15), "the slow download (above min_bytes_per_sec) to be in flight", || slow.in_flight());
    let servers =
        [("1a", &huge), ("1b", &wrong), ("2", &silent), ("3 below rate", &below_rate), ("3 slow", &slow)];
    let in_flight = || -> String {
        let busy: Vec<&str> = servers.iter().filter(|(_, s)| s.in_flight()).map(|(n, _)| *n).collect();
        if busy.is_empty() {
            "no hostile download in flight".into()
        } else {
            format!("in flight: {}", busy.join(", "))
        }
    };

    // (i) While it is in flight, drift is repaired within the reconcile interval.
    let during = in_flight();
    fs::write(device.host_path(&conf), "tampered = true\n")?;
    let edited = Instant::now();
    let repaired = wait_until(secs(RECONCILE_SECS) + SLACK, "drift repaired", || {
        Ok(device.sha256(&conf) == Some(sha256_hex(b"release = 1\n")))
    })
    .is_ok();
    f.check(repaired, || {
        format!(
            "drift (a managed file edited while {during}) not repaired within the reconcile interval \
             ({RECONCILE_SECS} s) + {SLACK:?}: the file holds {:?} after {:.1?}",
            device.read(&conf).map(|b| String::from_utf8_lossy(&b).into_owned()),
            edited.elapsed()
        )
    });

    // (ii) ... and `fleet-agent apply` through the running daemon answers promptly
    // (release 1 again: already applied).
    let during = in_flight();
    let asked = Instant::now();
    let out = device.apply_within(&fleet.bundle_path(&v1.digest), SIDELOAD_ANSWER)?;
    let took = asked.elapsed();
    f.check(out.code == Some(0) && out.stdout.contains("already applied"), || {
        format!(
            "`fleet-agent apply` of the applied bundle, while {during}: expected \"already applied\" \
             (exit 0) within {SIDELOAD_ANSWER:?}, got after {took:.1?}:\n{out}"
        )
    });

    // CI uploads release 2 (bundle and pointer file) and publishes nothing: the
    // attacker's announcement stays retained. One poll interval later, it runs.
    let during = in_flight();
    let statuses_before = watch.statuses().len();
    fleet.upload_staged()?;
    let uploaded = Instant::now();
    let bound = secs(POLL_SECS) + SLACK;
    // Applied: what the device holds ...
    let applied = wait_until(bound, "release 2 applied", || {
        Ok(device.local_status().is_ok_and(|l| l["applied"]["digest"] == d.as_str()))
    })
    .is_ok();
    let applied_after = uploaded.elapsed();
    f.check(applied, || {
        format!(
            "release 2 was uploaded (while {during}) and not applied within one poll interval ({POLL_SECS} s) \
             + {SLACK:?}; the device holds {}",
            device.local_status().map_or_else(|e| format!("({e:#})"), |l| l["applied"].to_string())
        )
    });
    // ... and reported: a status saying converged on it, what `fleet-bundler status
    // --wait` waits for.
    let converged = converged_within(&watch, bound.saturating_sub(uploaded.elapsed()).max(secs(1)), &c2);
    match &converged {
        Some(status) => {
            let sane = status["applied"]["digest"] == d.as_str()
                && status["desired"]["digest"] == d.as_str()
                && status["last_error"].is_null();
            f.check(sane, || format!("the status on converging on release 2 is not sane: {status}"));
        }
        None => {
            let states: Vec<String> = watch.statuses()[statuses_before..]
                .iter()
                .map(|s| format!("{} (applied {})", state(s), s["applied"]["version"]))
                .collect();
            f.fail(format!(
                "no status said converged on release 2 within {bound:?} of its upload ({}); states published \
                 since the upload: {states:?}; newest status: {}",
                if applied { format!("applied after {applied_after:.1?}") } else { "not applied".into() },
                watch.latest_status().unwrap_or_default()
            ));
        }
    }
    eprintln!(
        "hostile: release 2 uploaded; applied: {applied} after {applied_after:.1?}; reported converged: {}",
        converged.is_some()
    );
    let local = device.local_status()?;
    f.check(local["applied"]["digest"] == d.as_str() && local["applied"]["version"] == v2.version, || {
        format!(
            "expected release 2 (version {}, digest {d}) applied, the device holds {}",
            v2.version, local["applied"]
        )
    });
    f.check(device.sha256(&conf) == Some(sha256_hex(b"release = 2\n")), || {
        format!("{conf} holds {:?}", device.read(&conf).map(|b| String::from_utf8_lossy(&b).into_owned()))
    });
    f.not_rejected(&device, &d, "after the upload")?;
    // The slow download was given up by deadline_secs at the latest.
    let within = secs(DEADLINE_SECS) + SLACK;
    f.abandoned(&slow, "3 slow (above min_bytes_per_sec)", within, "deadline_secs, or sooner");
    let rejected_d: Vec<Value> =
        watch.events_of("bundle_rejected").into_iter().filter(|e| e["digest"] == d.as_str()).collect();
    f.check(rejected_d.is_empty(), || {
        format!("bundle_rejected events name the genuine bundle D: {rejected_d:?}")
    });

    // A genuine release 3, published over MQTT as CI does, replaces the attacker's
    // retained announcement and is applied too.
    files_app(&fleet, "conf", None, &[("app.conf", "release = 3\n")])?;
    let c3 = ship(&mut fleet, &broker, "release 3")?;
    let v3 = fleet.entry("gw-1")?;
    if converged_within(&watch, REPORT, &c3).is_none() {
        f.fail(format!(
            "a genuine release 3 published over MQTT was not applied within {REPORT:?}; the device holds {}, its newest status: {}",
            device.local_status().map_or_else(|e| format!("({e:#})"), |l| l["applied"].to_string()),
            watch.latest_status().unwrap_or_default()
        ));
    }
    f.not_rejected(&device, &d, "at the end")?;

    // Every attack was exercised (checked above as it happened); the device applied
    // nothing but releases 1, 2 and 3, and trusts no version beyond release 3's.
    let genuine_versions = [v1.version, v2.version, v3.version];
    let foreign: Vec<Value> = watch
        .events_of("apply_started")
        .into_iter()
        .filter(|e| !e["version"].as_u64().is_some_and(|v| genuine_versions.contains(&v)))
        .collect();
    f.check(foreign.is_empty(), || format!("the device started applying other bundles: {foreign:?}"));
    let genuine_digests = [v1.digest.as_str(), d.as_str(), v3.digest.as_str()];
    let odd: Vec<Value> = watch
        .statuses()
        .into_iter()
        .filter(|s| s["applied"]["digest"].as_str().is_some_and(|a| !genuine_digests.contains(&a)))
        .collect();
    f.check(odd.is_empty(), || format!("statuses with another applied bundle: {odd:?}"));
    let local = device.local_status()?;
    f.check(local["trust"]["last_version"].as_u64().is_some_and(|v| v <= v3.version), || {
        format!("the trust state holds a version beyond release 3's ({}): {}", v3.version, local["trust"])
    });

    f.finish(|| {
        let servers: Vec<String> = servers.iter().map(|(n, s)| format!("[{n}] {}", s.describe())).collect();
        format!(
            "genuine: v1 {} {}, v2 {} {d}, v3 {} {}\n{}\n--- hostile servers ---\n{}\n--- local status ---\n{}\n{}",
            v1.version,
            v1.digest,
            v2.version,
            v3.version,
            v3.digest,
            watch.describe(),
            servers.join("\n"),
            device.local_status().map_or_else(|e| format!("({e:#})"), |l| l.to_string()),
            device.log_tail()
        )
    })
}

/// The agent's resident memory (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    line.split_whitespace().nth(1).context("no VmRSS value")?.parse().context("VmRSS is not a number")
}

/// The highest RSS of `pid` over `samples` samples `every` apart.
fn peak_rss_kib(pid: u32, samples: u32, every: Duration) -> Result<u64> {
    let mut peak = 0;
    for _ in 0..samples {
        peak = peak.max(rss_kib(pid)?);
        thread::sleep(every);
    }
    Ok(peak)
}

/// Samples a process's RSS every 20 ms in the background; keeps the peak.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler { peak, stop, thread: Some(thread) }
    }

    /// Stops sampling; returns the peak in KiB.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Publishes each line as one message on `topic` with one `mosquitto_pub -l` (QoS 1),
/// as fast as the broker takes them.
fn publish_lines(broker: &Mosquitto, topic: &str, lines: &[String], retain: bool) -> Result<()> {
    let mut cmd = Command::new(require_program("mosquitto_pub")?);
    cmd.args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-q", "1", "-t", topic, "-l"]);
    if retain {
        cmd.arg("-r");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning mosquitto_pub")?;
    if let Some(mut stdin) = child.stdin.take() {
        for line in lines {
            writeln!(stdin, "{line}").context("writing to mosquitto_pub")?;
        }
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "mosquitto_pub -l failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Issue "Hardening I", MQTT flood bounds: while the agent is busy with a slow download,
/// 2,000 distinct retained announcements and a 1 MiB junk payload arrive on its
/// `desired` topic. Its RSS stays within 8 MiB of its idle RSS, and the genuine next
/// release, uploaded afterwards, lands from the pointer poll within one poll interval.
#[test]
fn an_announcement_flood_stays_in_bounded_memory_and_the_genuine_bundle_still_lands() -> Result<()> {
    const FLOOD: u64 = 2_000;
    const RSS_GROWTH_KIB: u64 = 8 << 10;
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let conf = fleet.app_file("conf", "app.conf");
    let mut device = fetch_limits(&fleet, &broker)?.create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    start(&mut device)?;
    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    deploy(&mut fleet, &broker, &watch, &device, "release 1")?;
    let v1 = fleet.entry("gw-1")?;
    let pid = device.pid().context("the agent runs")?;
    let idle = peak_rss_kib(pid, 20, Duration::from_millis(50))?;

    // Busy: a download that trickles along until deadline_secs.
    let attacker = broker.client();
    let slow = HostileHttpServer::start(
        Hostility::Trickle { content_length: 1 << 20, chunk: 1, every: Duration::from_millis(100) },
        SERVER_LIMIT,
    )?;
    hint(&fleet, &attacker, &decoy("slow"), v1.version + 1, 1 << 20, vec![slow.url("y.bundle")])?;
    wait_until(REPORT, "the slow download to be in flight", || Ok(slow.in_flight()))
        .with_context(|| format!("{}\n{}", slow.describe(), device.log_tail()))?;

    // The flood: 2,000 distinct announcements (growing versions, no URLs: the agent's own
    // bundle server has none of them), then 1 MiB of junk.
    let sampler = RssSampler::start(pid);
    let topic = device.topic("desired");
    let flood: Vec<String> = (0..FLOOD)
        .map(|i| hint_for(&decoy(&format!("flood {i}")), v1.version + 1 + i, 1000 + i, Vec::new()))
        .map(|ann| String::from_utf8_lossy(&ann.to_json()).trim_end().to_string())
        .collect();
    let flooded = Instant::now();
    publish_lines(&broker, &topic, &flood, true)?;
    attacker.publish(&topic, vec![b'x'; 1 << 20], false)?;
    eprintln!("hostile: flood of {FLOOD} announcements and 1 MiB published in {:.1?}", flooded.elapsed());

    // The genuine release 2, built and uploaded by CI after the flood. Not published:
    // the broker retains the flood's last announcement, whose (unsigned) version is
    // higher, and `fleet-bundler publish` refuses to announce below it; the device's
    // pointer poll brings it.
    files_app(&fleet, "conf", None, &[("app.conf", "release = 2\n")])?;
    fleet.commit("release 2")?;
    fleet.build()?;
    let v2 = fleet.entry("gw-1")?;
    let landed = wait_until(secs(POLL_SECS) + SLACK, "release 2 applied after the flood", || {
        Ok(device.local_status().is_ok_and(|l| l["applied"]["digest"] == v2.digest.as_str()))
    });
    let peak = sampler.finish();
    let running = device.is_running();
    let context = || {
        format!(
            "idle RSS {idle} KiB, peak {peak} KiB during the flood; agent running: {running}\n{}\n{}",
            slow.describe(),
            device.log_tail()
        )
    };
    eprintln!("hostile: RSS idle {idle} KiB, peak {peak} KiB (+{} KiB)", peak.saturating_sub(idle));
    ensure!(running, "the agent died in the flood\n{}", context());
    ensure!(
        peak <= idle + RSS_GROWTH_KIB,
        "the agent's RSS grew by {} KiB in the flood (bound: {RSS_GROWTH_KIB} KiB)\n{}",
        peak - idle,
        context()
    );
    landed.with_context(|| {
        format!(
            "the genuine release 2 did not land within one poll interval ({POLL_SECS} s) + {SLACK:?} after the \
             flood; the device holds {}\n{}",
            device.local_status().map_or_else(|e| format!("({e:#})"), |l| l["applied"].to_string()),
            context()
        )
    })?;
    assert_file(&device, &conf, "release = 2\n");
    Ok(())
}
