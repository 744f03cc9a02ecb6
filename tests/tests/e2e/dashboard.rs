//! The static live dashboard (issue 18) in a real browser: `fleet-bundler build
//! --dashboard-broker ws://...` writes `dashboard/index.html`, headless Chromium opens it
//! from disk, and it reads real Mosquitto over MQTT-over-WebSockets while real agents
//! report. A screenshot is left at `target/e2e-artifacts/dashboard.png`.
//!
//! The page is also attacked: retained messages anyone with write access to the broker
//! could leave (garbage JSON, HTML and scripts in device ids, error reasons, events) must
//! show as text and never run.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::{last_error_code, now_unix, state};
use fleet_e2e::{artifact_path, Chromium, Device, FleetRepo, Mosquitto, Page};
use fleet_spec::SigningKey;
use serde_json::{json, Value};

use crate::common::*;

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// A JS expression: what the table's row of `device` shows (or null).
fn row_js(device: &str) -> String {
    format!(
        "(() => {{ const r = Array.from(document.querySelectorAll('#rows tr[data-device]')).find(r => r.dataset.device === {id}); \
         if (!r) return null; const c = (k) => r.querySelector('.c-' + k); \
         return {{state: r.dataset.state, class: r.className, text: r.textContent, applied: c('applied').title, \
         error: c('error').textContent, online: c('online').textContent, labels: c('labels').textContent, \
         error_color: getComputedStyle(c('error')).color}}; }})()",
        id = json!(device)
    )
}

const DESCRIBE: &str = "JSON.stringify({conn: document.getElementById('conn-text').textContent, \
    stats: window.fleetDashboard && window.fleetDashboard.stats(), \
    rows: Array.from(document.querySelectorAll('#rows tr')).map(r => r.textContent)})";

fn open_dashboard(browser: &Chromium, fleet: &FleetRepo, query: &str) -> Result<Page> {
    let index = fleet.out_dir().join("dashboard/index.html");
    ensure!(index.is_file(), "build wrote no {}", index.display());
    let mut page = browser.open(&format!("{}{query}", file_url(&index)))?;
    page.wait_for(
        secs(20),
        "the page to connect to the broker",
        "document.querySelector('#conn.up') !== null",
        DESCRIBE,
    )?;
    Ok(page)
}

#[test]
fn dashboard_shows_a_device_converging_and_a_failing_device_red_with_its_reason() -> Result<()> {
    let broker = Mosquitto::builder().websockets(true).start()?;
    let ws = broker.ws_url().context("a websockets listener")?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-ok", &[("site", "berlin")])?;
    fleet.add_device("gw-bad", &[("site", "paris")])?;
    files_app(&fleet, "greeting", None, &[("files/motd", "Hello from {{ device.id }}\n")])?;
    let commit = fleet.commit("greeting for every device")?;
    fleet.build_output(&["--dashboard-broker", &ws])?.check()?;

    // gw-bad trusts another key only: it refuses the fleet's bundle, and says why.
    let stranger = SigningKey::from_seed(&[42; 32]).public().to_string();
    let mut ok = Device::builder(&fleet, "gw-ok")?.broker(&broker.url()).no_polling().create()?;
    let mut bad = Device::builder(&fleet, "gw-bad")?
        .broker(&broker.url())
        .no_polling()
        .trust(vec![stranger])
        .create()?;
    ok.start()?;
    bad.start()?;

    // The page is open before the publish: what follows arrives live.
    let browser = Chromium::start(1400, 860)?;
    let mut page = open_dashboard(&browser, &fleet, "")?;
    page.wait_for(
        secs(30),
        "both agents to report",
        "window.fleetDashboard.stats().reported >= 2",
        DESCRIBE,
    )?;
    fleet.publish(&broker.url())?;

    let converged = page
        .wait_for(
            secs(60),
            "gw-ok converged on the published commit",
            &format!("(() => {{ const r = {}; return r && r.state === 'converged' && r.applied.startsWith({}) ? r : null; }})()", row_js("gw-ok"), json!(commit)),
            DESCRIBE,
        )
        .with_context(|| ok.log_tail())?;
    ensure!(
        converged["text"].as_str().is_some_and(|t| t.contains(&commit[..8])),
        "short commit shown: {converged}"
    );
    ensure!(converged["labels"] == "site=berlin" && converged["online"] == "yes", "{converged}");
    ensure!(
        !converged["class"].as_str().unwrap_or("").contains("bad"),
        "a converged row is not red: {converged}"
    );

    // The failing device: the page agrees with its retained status, in red, with the code.
    let failing = page
        .wait_for(
            secs(60),
            "gw-bad shown failing",
            &format!("(() => {{ const r = {}; return r && r.class.includes('bad') && r.error.includes('unknown_key') ? r : null; }})()", row_js("gw-bad")),
            DESCRIBE,
        )
        .with_context(|| bad.log_tail())?;
    let status: Value = serde_json::from_str(
        &broker.client().retained(&bad.topic("status"))?.context("gw-bad's retained status")?,
    )?;
    ensure!(last_error_code(&status) == Some("unknown_key"), "{status}");
    ensure!(failing["state"] == state(&status), "page {failing} vs status {status}");
    ensure!(failing["error_color"] == "rgb(208, 49, 45)", "the reason is red: {failing}");
    let message = status["last_error"]["message"].as_str().unwrap_or_default();
    ensure!(
        failing["error"].as_str().is_some_and(|e| e.contains(message)),
        "whole reason shown: {failing} vs {status}"
    );

    // The summary counts them, and the detail of the failing device shows its reason.
    let stats = page.eval("window.fleetDashboard.stats()")?;
    ensure!(stats["devices"] == 2 && stats["reported"] == 2, "{stats}");
    let totals = page.eval("document.getElementById('totals').textContent")?;
    ensure!(totals.as_str().is_some_and(|t| t.contains("1failing") && t.contains("1converged")), "{totals}");
    page.eval("document.querySelector('#rows tr[data-device=\"gw-bad\"]').click()")?;
    let detail = page.wait_for(
        secs(5),
        "gw-bad's detail",
        "(() => { const d = document.getElementById('detail'); return !d.hidden && d.querySelector('.error') ? d.textContent : null; })()",
        DESCRIBE,
    )?;
    ensure!(detail.as_str().is_some_and(|d| d.contains("gw-bad") && d.contains("unknown_key")), "{detail}");

    let shot = artifact_path("dashboard.png");
    page.screenshot(&shot)?;
    println!("dashboard screenshot: {}", shot.display());
    Ok(())
}

#[test]
fn hostile_retained_messages_are_shown_as_text_never_run_as_html() -> Result<()> {
    let broker = Mosquitto::builder().websockets(true).start()?;
    let ws = broker.ws_url().context("a websockets listener")?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[("site", "berlin")])?;
    fleet.commit("one device")?;
    fleet.build_output(&["--dashboard-broker", &ws])?.check()?;
    let mqtt = broker.client();
    let topic = |device: &str, kind: &str| format!("fleet/acme/devices/{device}/{kind}");
    let now = now_unix();
    // Every payload tries to run script; success would set window.pwned.
    let html_reason =
        "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\"><b id=injected>bold</b>";
    let status = json!({
        "device": "gw-1", "fleet": "acme", "state": "failed", "timestamp": now,
        "last_error": {"code": "<img src=x onerror=window.pwned=3>", "message": html_reason},
        "containers": [{"name": "<svg onload=window.pwned=4>", "image": "<iframe src=javascript:window.pwned=5>", "running": false}],
        "applied": {"commit": "<i id=injected2>c</i>", "version": 1},
    });
    mqtt.publish(&topic("gw-1", "status"), status.to_string(), true)?;
    let hostile_ids =
        ["<img src=x onerror=window.pwned=6>", "x\"><svg onload=window.pwned=7>", "__proto__", "constructor"];
    mqtt.publish(&topic(hostile_ids[0], "status"), "{not json <b>", true)?;
    mqtt.publish(&topic(hostile_ids[1], "online"), "<script>window.pwned=8</script>", true)?;
    mqtt.publish(
        &topic(hostile_ids[2], "status"),
        r#"{"state":"converged","__proto__":{"polluted":1}}"#,
        true,
    )?;
    mqtt.publish(&topic(hostile_ids[3], "status"), "[1,2,3]", true)?;
    mqtt.publish(&topic("gw-huge", "status"), vec![b'{'; 200 * 1024], true)?;
    mqtt.publish(
        &topic("gw-state", "status"),
        json!({"state": "<b id=injected3>odd</b>"}).to_string(),
        true,
    )?;
    // A rollout state from whoever could write it: shown as text, its waves capped.
    let waves: Vec<Value> = (0..100)
        .map(|i| {
            json!({"name": format!("<b id=injected4>w{i}</b>"), "devices": 1, "announced": 0,
            "succeeded": 0, "failed": 0, "pending": 1})
        })
        .collect();
    mqtt.publish(
        "fleet/acme/rollout",
        json!({"commit": "<svg onload=window.pwned=10>", "state": "halted", "wave": 1,
            "reason": html_reason, "waves": waves})
        .to_string(),
        true,
    )?;
    mqtt.publish("fleet/acme/devices/a/b/status", "{}", true)?; // not a device topic
    mqtt.publish("fleet/other/devices/gw-9/status", "{}", true)?; // another fleet

    let browser = Chromium::start(1400, 860)?;
    let mut page = open_dashboard(&browser, &fleet, "")?;
    // gw-1 (known from the build) plus the 6 devices above reported something.
    page.wait_for(secs(30), "every hostile message", "window.fleetDashboard.stats().devices >= 7", DESCRIBE)?;
    // A live event, and the detail panes, which draw more fields.
    mqtt.publish(
        &topic("gw-1", "events"),
        json!({"device": "gw-1", "at": now, "event": "<img src=x onerror=window.pwned=9>", "reason": html_reason})
            .to_string(),
        false,
    )?;
    for device in ["gw-1", hostile_ids[0], hostile_ids[1], "gw-huge"] {
        page.eval(&format!("window.__pick = {}; document.querySelector('#rows tr[data-device]') && Array.from(document.querySelectorAll('#rows tr[data-device]')).find(r => r.dataset.device === window.__pick).click()", json!(device)))?;
        page.wait_for(
            secs(5),
            "the detail pane",
            &format!("(() => {{ const h = document.querySelector('#detail h3'); return h && h.textContent === {}; }})()", json!(device)),
            DESCRIBE,
        )?;
        if device == "gw-1" {
            page.wait_for(
                secs(10),
                "the hostile event listed",
                "document.getElementById('detail').textContent.includes('onerror=window.pwned=9')",
                DESCRIBE,
            )?;
            let detail = page.eval("document.getElementById('detail').textContent")?;
            let detail = detail.as_str().unwrap_or_default();
            for shown in
                ["<svg onload=window.pwned=4>", "<iframe src=javascript:window.pwned=5>", html_reason]
            {
                ensure!(detail.contains(shown), "{shown:?} is not shown as text in the detail: {detail}");
            }
        }
    }

    let verdict = page.eval(
        "({pwned: window.pwned === undefined ? null : window.pwned, \
          injected: document.querySelectorAll('#injected, #injected2, #injected3, #injected4').length, \
          elements: document.querySelectorAll('img, svg, iframe, object, embed, b#injected').length, \
          scripts: document.scripts.length, polluted: ({}).polluted === undefined ? null : 1, \
          text: document.body.textContent})",
    )?;
    ensure!(verdict["pwned"].is_null(), "a message ran script: {verdict}");
    let rollout = page.wait_for(
        secs(10),
        "the hostile rollout state drawn",
        "(() => { const r = window.fleetDashboard.rollout(); return r && r.text.includes('w31') ? r : null; })()",
        DESCRIBE,
    )?;
    ensure!(rollout["state"] == "halted", "the hostile rollout state: {rollout}");
    let shown = rollout["text"].as_str().unwrap_or_default();
    ensure!(shown.contains(html_reason) && shown.contains("w31<") && !shown.contains("w32<"), "{shown}");
    ensure!(
        verdict["injected"] == 0 && verdict["elements"] == 0,
        "a message became markup: {}",
        verdict["injected"]
    );
    ensure!(verdict["scripts"] == 3, "the page's own three scripts only: {}", verdict["scripts"]);
    ensure!(verdict["polluted"].is_null(), "Object.prototype polluted");
    let text = verdict["text"].as_str().unwrap_or_default();
    for shown in [html_reason, hostile_ids[0], hostile_ids[1], "<b id=injected3>odd</b>"] {
        ensure!(text.contains(shown), "{shown:?} is not shown as text");
    }
    ensure!(!text.contains("gw-9") && !text.contains("a/b"), "messages of other topics are ignored");

    let garbage = page_row(&mut page, hostile_ids[0])?;
    ensure!(
        garbage["state"] == "invalid"
            && garbage["error"].as_str().is_some_and(|e| e.contains("unreadable_status")),
        "{garbage}"
    );
    ensure!(garbage["text"].as_str().is_some_and(|t| t.contains("(invalid id)")), "{garbage}");
    let array = page_row(&mut page, "constructor")?;
    ensure!(array["state"] == "invalid", "a JSON array is no status: {array}");
    let huge = page_row(&mut page, "gw-huge")?;
    ensure!(huge["error"].as_str().is_some_and(|e| e.contains("oversized_status")), "{huge}");
    let proto = page_row(&mut page, "__proto__")?;
    ensure!(proto["state"] == "converged", "{proto}");
    Ok(())
}

fn page_row(page: &mut Page, device: &str) -> Result<Value> {
    let v = page.eval(&row_js(device))?;
    ensure!(!v.is_null(), "no row for {device:?}");
    Ok(v)
}

/// The README's broker setup: a `dashboard` account that may only read status, online
/// and events. The page logs in through its broker form and shows the device; the same
/// account cannot publish a status, nor read announcements.
#[test]
fn a_read_only_dashboard_account_sees_the_fleet_and_can_change_nothing() -> Result<()> {
    let acl = "user bundler\ntopic readwrite fleet/#\n\n\
               user dashboard\ntopic read fleet/+/devices/+/status\ntopic read fleet/+/devices/+/online\ntopic read fleet/+/devices/+/events\ntopic read fleet/+/rollout\n";
    let broker = Mosquitto::builder()
        .allow_anonymous(false)
        .user("bundler", "b-secret")
        .user("dashboard", "d-secret")
        .acl(acl)
        .websockets(true)
        .start()?;
    let ws = broker.ws_url().context("a websockets listener")?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[("site", "berlin")])?;
    fleet.commit("one device")?;
    fleet.build_output(&["--dashboard-broker", &ws])?.check()?;
    let bundler = broker.client_as("bundler", "b-secret");
    let status = json!({"device": "gw-1", "fleet": "acme", "state": "converged", "timestamp": now_unix(),
        "applied": {"commit": "a".repeat(40), "version": 1}});
    bundler.publish(&fleet.topic("gw-1", "status"), status.to_string(), true)?;
    bundler.publish(&fleet.topic("gw-1", "desired"), "{\"announcement\":1}", true)?;

    let browser = Chromium::start(1200, 800)?;
    let index = fleet.out_dir().join("dashboard/index.html");
    let mut page = browser.open(&file_url(&index))?;
    // Anonymous is refused: the page says so instead of showing an empty fleet as fine.
    page.wait_for(secs(20), "the refusal shown", "document.querySelector('#conn.down') !== null", DESCRIBE)?;
    page.eval(
        "document.getElementById('set-user').value = 'dashboard'; document.getElementById('set-pass').value = 'd-secret'; \
         document.getElementById('settings-form').requestSubmit(); true",
    )?;
    page.wait_for(
        secs(20),
        "connected as dashboard",
        "document.querySelector('#conn.up') !== null",
        DESCRIBE,
    )?;
    let row = page.wait_for(
        secs(20),
        "gw-1 converged",
        &format!(
            "(() => {{ const r = {}; return r && r.state === 'converged' ? r : null; }})()",
            row_js("gw-1")
        ),
        DESCRIBE,
    )?;
    ensure!(row["applied"].as_str().is_some_and(|a| a.starts_with("aaaaaaaa")), "{row}");
    // A running rollout (as `fleet-bundler rollout` publishes it) is shown, live.
    let state = json!({"fleet": "acme", "commit": "b".repeat(40), "state": "running", "wave": 1,
    "started_at": 1, "updated_at": 2, "halt": {"min_reporting": 1},
    "waves": [
        {"name": "canary", "devices": 1, "announced": 1, "succeeded": 1, "failed": 0, "pending": 0, "started_at": 1},
        {"name": "rest", "devices": 9, "announced": 9, "succeeded": 4, "failed": 0, "pending": 5, "started_at": 2},
    ]});
    bundler.publish("fleet/acme/rollout", state.to_string(), true)?;
    let shown = page.wait_for(
        secs(20),
        "the rollout shown",
        "(() => { const r = window.fleetDashboard.rollout(); return r && r.state === 'running' && r.text.includes('rest:') ? r : null; })()",
        DESCRIBE,
    )?;
    let text = shown["text"].as_str().unwrap_or_default();
    ensure!(
        text.contains("rollout of bbbbbbbb: running")
            && text.contains("wave 2 of 2")
            && text.contains("rest: 9 devices, 4 updated, 0 failed, 5 pending"),
        "{text}"
    );

    // The same account writes nothing and reads no announcement.
    let dashboard = broker.client_as("dashboard", "d-secret");
    dashboard.publish(&fleet.topic("gw-1", "status"), "{\"state\":\"failed\"}", true)?;
    let stored = bundler.retained(&fleet.topic("gw-1", "status"))?.context("the status")?;
    let expected = status.to_string();
    ensure!(stored == expected, "the dashboard account changed the status: {stored}");
    ensure!(
        dashboard.retained(&fleet.topic("gw-1", "desired"))?.is_none(),
        "the dashboard account read an announcement"
    );
    Ok(())
}
