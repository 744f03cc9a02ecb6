//! Issue 14: rollouts on real Mosquitto with thirty real files-only agents, each in
//! its own mount namespace. A three-wave rollout converges wave by wave in order and
//! survives a SIGKILL of `fleet-bundler rollout` mid-wave; a rollout whose second wave
//! has failing devices halts, and the third wave never sees the new bundle.
//!
//! The failure is real: the second-wave devices labelled `broken` get an app whose
//! file targets a path outside their `allowed_roots`, so their agents refuse the whole
//! bundle (`path_not_allowed`) and report `failed`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fleet_e2e::{wait_until, workspace_bin, Device, FleetRepo, Message, Mosquitto, Subscription};
use serde_json::Value;

use crate::common::*;

const DEVICES: usize = 30;

/// `ring` 1: 3 devices, 2: 9, 3: 18; `broken` on three of ring 2 when asked.
fn ring(i: usize) -> usize {
    match i {
        1..=3 => 1,
        4..=12 => 2,
        _ => 3,
    }
}

struct Setup {
    devices: Vec<Device>,
    broker: Mosquitto,
    fleet: FleetRepo,
    ids: Vec<String>,
    /// Everything on `fleet/<fleet>/#`, in broker order.
    all: Subscription,
    old_digest: BTreeMap<String, String>,
}

/// Thirty devices converged on release 1 (no rollout declared yet), then release 2
/// committed and built with `rollout` (the given fleet.yaml lines) and `broken_app`.
fn setup(name: &str, rollout_yaml: &str, broken: bool) -> Result<Setup> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new(name)?;
    let ids: Vec<String> = (1..=DEVICES).map(|i| format!("dev-{i:02}")).collect();
    for (k, id) in ids.iter().enumerate() {
        let i = k + 1;
        let r = ring(i).to_string();
        let b = if broken && matches!(i, 5 | 8 | 11) { "yes" } else { "no" };
        fleet.add_device(id, &[("ring", &r), ("broken", b)])?;
    }
    files_app(&fleet, "base", None, &[("release.conf", "release = 1\nid = {{ device.id }}\n")])?;
    fleet.commit("release 1")?;
    fleet.build()?;
    let mut devices = Vec::new();
    for id in &ids {
        devices.push(Device::builder(&fleet, id)?.broker(&broker.url()).private_root().start()?);
    }
    fleet.publish(&broker.url())?;
    let gate = fleet.status_wait(&broker.url(), secs(90))?;
    ensure!(gate.code == Some(0), "release 1 did not converge: {gate}");
    let mut old_digest = BTreeMap::new();
    for id in &ids {
        old_digest.insert(id.clone(), fleet.entry(id)?.digest);
    }
    let all = broker.client().subscribe(&format!("fleet/{name}/#"))?;

    // FleetRepo::new's fleet.yaml, and the rollout.
    let yaml = format!("name: {name}\nbundle_expiry: 30d\nfile_root: {}\n", fleet.file_root().display());
    fleet.write("fleet.yaml", format!("{yaml}{rollout_yaml}"))?;
    files_app(&fleet, "base", None, &[("release.conf", "release = 2\nid = {{ device.id }}\n")])?;
    if broken {
        let outside = fleet.scratch("outside")?;
        fleet.write(
            "apps/broken/app.yaml",
            format!(
                "selector:\n  broken: \"yes\"\nfiles:\n  - source: evil.conf\n    target: {}\n",
                outside.join("evil.conf").display()
            ),
        )?;
        fleet.write("apps/broken/evil.conf", "not allowed here\n")?;
    }
    fleet.commit("release 2, rolled out")?;
    let summary = fleet.build()?;
    ensure!(summary["rollout"] == true, "build did not see the rollout: {summary}");
    Ok(Setup { broker, fleet, devices, ids, all, old_digest })
}

impl Drop for Setup {
    /// The agents go first, all at once (a graceful stop of thirty takes long), before
    /// the broker and the fleet's directories.
    fn drop(&mut self) {
        for d in &mut self.devices {
            d.kill9();
        }
    }
}

impl Setup {
    fn rollout_cmd(&self, extra: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(workspace_bin("fleet-bundler")?);
        cmd.args(["rollout", "--out"])
            .arg(self.fleet.out_dir())
            .args(["--broker", &self.broker.url(), "--base-url", &self.fleet.base_url(), "--json"])
            .args(extra)
            .env_remove("FLEET_BROKER")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    fn spawn_rollout(&self, log: &str) -> Result<Child> {
        let path = self.fleet.scratch("logs")?.join(log);
        let file = std::fs::File::create(&path)?;
        Ok(self.rollout_cmd(&[])?.stdout(Stdio::null()).stderr(file).spawn()?)
    }

    fn log(&self, log: &str) -> String {
        self.fleet
            .scratch("logs")
            .ok()
            .and_then(|d| std::fs::read_to_string(d.join(log)).ok())
            .unwrap_or_default()
    }

    /// The index's wave of every device.
    fn waves(&self) -> Result<BTreeMap<String, usize>> {
        let index = self.fleet.index()?;
        let devices = index["rollout"]["devices"].as_object().context("index.json has no rollout")?;
        devices.iter().map(|(id, w)| Ok((id.clone(), w.as_u64().context("wave")? as usize))).collect()
    }

    fn new_digest(&self, id: &str) -> Result<String> {
        Ok(self.fleet.entry(id)?.digest)
    }

    fn rollout_states(&self) -> Vec<Value> {
        let topic = format!("fleet/{}/rollout", self.fleet.name);
        self.all.messages().iter().filter(|m| m.topic == topic).filter_map(|m| m.json().ok()).collect()
    }

    fn latest_state(&self) -> Option<Value> {
        self.rollout_states().pop()
    }

    fn diagnose(&self) -> String {
        let mut out = String::new();
        for d in &self.devices {
            out.push_str(&format!("--- {}\n{}\n", d.id, d.log_tail()));
        }
        out
    }
}

fn device_of<'a>(m: &'a Message, fleet: &str, kind: &str) -> Option<&'a str> {
    m.topic.strip_prefix(&format!("fleet/{fleet}/devices/"))?.strip_suffix(&format!("/{kind}"))
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_three_wave_rollout_converges_wave_by_wave_and_resumes_after_a_kill() -> Result<()> {
    let started = Instant::now();
    let s = setup(
        "waves",
        "rollout:\n  waves:\n    - name: canary\n      selector: {ring: \"1\"}\n      soak: 2s\n    - name: early\n      \
         percent: 50\n      soak: 2s\n    - name: rest\n      soak: 1s\n  halt:\n    max_failed: 0\n    wave_timeout: 60s\n  \
         pace:\n    devices_per_minute: 60\n    growth: 2\n  jitter: 300ms\n",
        false,
    )?;
    let waves = s.waves()?;
    let count = |w: usize| waves.values().filter(|x| **x == w).count();
    assert_eq!((count(0), count(1), count(2)), (3, 14, 13), "{waves:?}");
    let pointer = |id: &str| std::fs::read(s.fleet.out_dir().join(format!("devices/{id}.json"))).ok();
    let before: BTreeMap<String, Option<Vec<u8>>> =
        s.ids.iter().map(|id| (id.clone(), pointer(id))).collect();

    // Killed once wave 2 is part-way through its announcements.
    let mut first = s.spawn_rollout("rollout-1.log")?;
    let mut killed_at: Option<Value> = None;
    wait_until(secs(90), "wave 2 part-way announced", || {
        let st = s.latest_state();
        if let Some(st) = &st {
            let announced = st["waves"][1]["announced"].as_u64().unwrap_or(0);
            if st["wave"] == 1 && (2..10).contains(&announced) {
                kill9(&mut first);
                killed_at = Some(st.clone());
                return Ok(true);
            }
        }
        ensure!(matches!(first.try_wait(), Ok(None)), "rollout ended early: {}", s.log("rollout-1.log"));
        Ok(false)
    })
    .with_context(|| s.log("rollout-1.log"))?;
    let killed_at = killed_at.context("killed")?;
    // While nobody drives it, wave 3's pointer files stay as they were.
    for (id, w) in &waves {
        if *w == 2 {
            assert_eq!(pointer(id), before[id], "{id}'s pointer file moved before its wave");
        }
    }
    let states_before_restart = s.rollout_states().len();
    let desired_before_restart = s.all.messages().len();

    let out = s.rollout_cmd(&["--timeout", "90s"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", s.diagnose());
    assert!(stderr.contains("resuming the rollout"), "{stderr}");
    let done: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(done["state"], "done", "{done}");

    // State continuous: the resumed run started where the killed one was.
    assert_eq!(done["started_at"], killed_at["started_at"], "{done}\n{killed_at}");
    for w in 0..2 {
        assert_eq!(
            done["waves"][w]["started_at"], killed_at["waves"][w]["started_at"],
            "wave {w} released again"
        );
    }
    for w in 0..3 {
        assert_eq!(done["waves"][w]["succeeded"].as_u64(), Some(count(w) as u64), "{done}");
    }
    let after: Vec<Value> = s.rollout_states()[states_before_restart..].to_vec();
    for st in &after {
        assert!(st["wave"].as_u64() >= Some(1), "a wave repeated after the restart: {st}");
    }

    // Order, from what the broker carried: no device of a wave was announced, and no
    // device of a wave applied the new bundle, before the previous wave soaked.
    let messages = s.all.messages();
    let rollout_topic = "fleet/waves/rollout";
    let soaked_index = |w: usize| {
        messages.iter().position(|m| {
            m.topic == rollout_topic && m.json().is_ok_and(|j| !j["waves"][w]["soaked_at"].is_null())
        })
    };
    for w in 1..3 {
        let soaked = soaked_index(w - 1).with_context(|| format!("wave {w} never soaked"))?;
        for (i, m) in messages.iter().enumerate() {
            for kind in ["desired", "status"] {
                let Some(id) = device_of(m, "waves", kind) else { continue };
                if waves.get(id) != Some(&w) {
                    continue;
                }
                let new = s.new_digest(id)?;
                let j = m.json().unwrap_or(Value::Null);
                let got_new = match kind {
                    "desired" => j["digest"] == new.as_str(),
                    _ => j["applied"]["digest"] == new.as_str(),
                };
                assert!(
                    !got_new || i > soaked,
                    "{id} (wave {}) had the new bundle ({kind}) before wave {w} soaked",
                    w + 1
                );
            }
        }
    }
    // Wave 1 was not announced again by the resumed run.
    for m in &messages[desired_before_restart..] {
        if let Some(id) = device_of(m, "waves", "desired") {
            assert_ne!(waves.get(id), Some(&0), "{id} of wave 1 announced again after the restart");
        }
    }
    // Every pointer file is the new one now, and devices.next/ is empty.
    for id in &s.ids {
        let p: Value = serde_json::from_slice(&pointer(id).context("pointer")?)?;
        assert_eq!(p["digest"], s.new_digest(id)?.as_str());
    }
    assert_eq!(std::fs::read_dir(s.fleet.out_dir().join("devices.next"))?.count(), 0);

    // `status` shows the rollout.
    let shown = s.fleet.status(&s.broker.url(), &[])?.check()?;
    assert!(shown.stdout.contains("rollout waves of") && shown.stdout.contains("done"), "{shown}");
    let json = s.fleet.status(&s.broker.url(), &["--json"])?.check()?.json()?;
    assert_eq!(json["rollout"]["state"], "done", "{json}");
    eprintln!("rollout e2e (3 waves, kill and resume) took {:.1?}", started.elapsed());
    Ok(())
}

#[test]
fn a_rollout_whose_second_wave_fails_halts_and_the_third_wave_never_sees_the_bundle() -> Result<()> {
    let started = Instant::now();
    let s = setup(
        "halting",
        "rollout:\n  waves:\n    - name: canary\n      selector: {ring: \"1\"}\n      soak: 1s\n    - name: ring2\n      \
         selector: {ring: \"2\"}\n      soak: 1s\n    - name: rest\n  halt:\n    max_failed: 1\n    wave_timeout: 60s\n",
        true,
    )?;
    let waves = s.waves()?;
    let third: Vec<String> = waves.iter().filter(|(_, w)| **w == 2).map(|(id, _)| id.clone()).collect();
    assert_eq!(third.len(), 18);
    let pointer = |id: &str| std::fs::read(s.fleet.out_dir().join(format!("devices/{id}.json"))).ok();
    let before: BTreeMap<String, Option<Vec<u8>>> =
        third.iter().map(|id| (id.clone(), pointer(id))).collect();

    let mut child = s.spawn_rollout("rollout.log")?;
    // The moment the second failure of the new bundle shows in the statuses.
    let mut threshold: Option<Instant> = None;
    let mut halted: Option<Instant> = None;
    wait_until(secs(90), "the rollout to halt", || {
        let messages = s.all.messages();
        if threshold.is_none() {
            let mut failed = BTreeSet::new();
            for m in &messages {
                let Some(id) = device_of(m, "halting", "status") else { continue };
                let j = m.json().unwrap_or(Value::Null);
                if matches!(j["state"].as_str(), Some("failed" | "rolled_back"))
                    && j["desired"]["digest"] == s.new_digest(id)?.as_str()
                {
                    failed.insert(id.to_string());
                }
            }
            if failed.len() >= 2 {
                threshold = Some(Instant::now());
            }
        }
        if s.latest_state().is_some_and(|st| st["state"] == "halted") {
            halted = Some(Instant::now());
            return Ok(true);
        }
        Ok(false)
    })
    .with_context(|| format!("{}\n{}", s.log("rollout.log"), s.diagnose()))?;
    let status = child.wait()?;
    assert_eq!(status.code(), Some(3), "{}", s.log("rollout.log"));
    let (threshold, halted) = (threshold.unwrap_or_else(Instant::now), halted.context("halted")?);
    let lag = halted.saturating_duration_since(threshold);
    assert!(lag < Duration::from_secs(2), "halted {lag:?} after the threshold was crossed");
    let state = s.latest_state().context("state")?;
    assert!(state["reason"].as_str().is_some_and(|r| r.starts_with("max_failed:")), "{state}");
    assert_eq!(state["wave"], 1, "{state}");
    assert!(state["waves"][2]["started_at"].is_null(), "{state}");
    assert!(s.log("rollout.log").contains("halted"), "{}", s.log("rollout.log"));

    // A later run changes nothing and says why.
    let again = s.rollout_cmd(&[])?.output()?;
    assert_eq!(again.status.code(), Some(3), "{}", String::from_utf8_lossy(&again.stderr));

    // Given up on: aborted (the abort itself exits 0); a later run says so (6).
    let mut abort = Command::new(workspace_bin("fleet-bundler")?);
    abort.args([
        "rollout",
        "--abort",
        "--broker",
        &s.broker.url(),
        "--fleet",
        "halting",
        "--reason",
        "bad release",
    ]);
    let aborted = abort.env_remove("FLEET_BROKER").output()?;
    assert_eq!(aborted.status.code(), Some(0), "{}", String::from_utf8_lossy(&aborted.stderr));
    let state = s.broker.client().retained("fleet/halting/rollout")?.context("a retained state")?;
    let state: Value = serde_json::from_str(&state)?;
    assert_eq!(
        (state["state"].as_str(), state["reason"].as_str()),
        (Some("aborted"), Some("aborted: bad release"))
    );
    let again = s.rollout_cmd(&[])?.output()?;
    assert_eq!(again.status.code(), Some(6), "{}", String::from_utf8_lossy(&again.stderr));

    // Wave 3: a few poll intervals later, no announcement, no pointer file moved, old bundle.
    std::thread::sleep(Duration::from_secs(6));
    let messages = s.all.messages();
    for id in &third {
        assert_eq!(pointer(id), before[id], "{id}'s pointer file changed");
        let new = s.new_digest(id)?;
        assert!(
            !messages.iter().any(|m| device_of(m, "halting", "desired") == Some(id.as_str())
                && m.json().is_ok_and(|j| j["digest"] == new.as_str())),
            "{id} (wave 3) was announced"
        );
        for m in messages.iter().filter(|m| device_of(m, "halting", "status") == Some(id.as_str())) {
            let j = m.json()?;
            assert_ne!(j["desired"]["digest"], new.as_str(), "{id} (wave 3) wanted the new bundle: {j}");
        }
        let latest =
            s.broker.client().retained(&s.fleet.topic(id, "status"))?.context("a retained status")?;
        let latest: Value = serde_json::from_str(&latest)?;
        assert_eq!(latest["applied"]["digest"], s.old_digest[id].as_str(), "{id}: {latest}");
    }
    eprintln!("rollout e2e (halt in wave 2) took {:.1?}", started.elapsed());
    Ok(())
}
