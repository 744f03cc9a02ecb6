//! The rollout's deterministic core: given the rollout state, the devices' latest
//! statuses and `now`, decide what happens next. No I/O, no clock, no randomness: the
//! per-device delays (jitter) come from a hash of commit and device id, so a resumed
//! rollout announces in exactly the order the killed one would have.
//!
//! One [`step`] does, in order:
//! 1. count every released wave's devices: succeeded (`converged` with the new bundle
//!    applied), failed (`failed` or `rolled_back` while wanting the new bundle), pending;
//! 2. halt when a criterion trips (`max_failed`, `max_failed_rate` once `min_reporting`
//!    devices reported, `wave_timeout`): nothing more is released or announced;
//! 3. release the current wave if it is not yet ([`Effect::Release`]: its pointer files
//!    are moved, `--sync` runs), then announce the devices whose time has come
//!    ([`Effect::Announce`], at the wave's pace, each delayed by its jitter);
//! 4. a wave whose devices all settled (succeeded, or failed within the limits) starts
//!    its soak; when the soak passed without a halt the next wave is released, or the
//!    rollout is done after the last.

use std::collections::BTreeMap;

use fleet_spec::messages::DeviceState;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::plan::{device_hash, Rollout, RolloutPlan};

/// `state` of the retained rollout state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Halted,
    Done,
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Halted => "halted",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }
}

/// The retained JSON on `<prefix>/<fleet>/rollout` (fleet-spec/MESSAGES.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    #[serde(default)]
    pub fleet: String,
    pub commit: String,
    pub state: Phase,
    /// Why it halted or was aborted: `<code>: <text>`; codes `max_failed`,
    /// `max_failed_rate`, `wave_timeout`, `sync_failed`, `aborted`.
    #[serde(default)]
    pub reason: Option<String>,
    /// Index of the current wave in `waves`.
    pub wave: usize,
    pub started_at: i64,
    pub updated_at: i64,
    pub waves: Vec<WaveState>,
    pub halt: HaltView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveState {
    pub name: String,
    pub devices: usize,
    /// How many of the wave's devices were announced, in the wave's announcement
    /// order (a resumed rollout continues after them).
    pub announced: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub pending: usize,
    /// When the wave was released (its pointer files moved); `None`: not yet.
    #[serde(default)]
    pub started_at: Option<i64>,
    #[serde(default)]
    pub converged_at: Option<i64>,
    #[serde(default)]
    pub soaked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaltView {
    pub max_failed: Option<u64>,
    pub max_failed_rate: Option<f64>,
    pub min_reporting: u64,
    #[serde(default)]
    pub wave_timeout: Option<u64>,
}

/// What a device's latest retained status says, as far as the rollout cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub state: DeviceState,
    pub applied_digest: Option<String>,
    pub desired_digest: Option<String>,
}

impl Observed {
    pub fn from_report(r: &fleet_spec::messages::StatusReport) -> Observed {
        Observed {
            state: r.state,
            applied_digest: r.applied.as_ref().map(|a| a.digest.clone()),
            desired_digest: r.desired.as_ref().map(|d| d.digest.clone()),
        }
    }
}

/// One device of a wave: its new bundle and when, after the wave's release, it is
/// announced (pace and jitter).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetDevice {
    pub id: String,
    pub digest: String,
    pub due_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TargetWave {
    pub name: String,
    pub soak_ms: u64,
    /// In announcement order (by `due_ms`).
    pub devices: Vec<TargetDevice>,
}

/// The rollout of one build: its waves with their devices, from `index.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub fleet: String,
    pub commit: String,
    pub rollout: Rollout,
    pub waves: Vec<TargetWave>,
}

/// A per-device delay in `0..=jitter_ms`, fixed by commit and device.
fn jitter(commit: &str, device: &str, jitter_ms: u64) -> u64 {
    if jitter_ms == 0 {
        return 0;
    }
    let h = Sha256::digest(format!("{commit}/{device}").as_bytes());
    let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    n % (jitter_ms + 1)
}

impl Target {
    /// `digests`: device → its bundle digest in the build.
    pub fn new(fleet: &str, commit: &str, plan: &RolloutPlan, digests: &BTreeMap<String, String>) -> Target {
        let r = &plan.rollout;
        let waves = r
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut ids: Vec<&String> =
                    plan.devices.iter().filter(|(_, wave)| **wave == i).map(|(id, _)| id).collect();
                ids.sort_by_cached_key(|id| device_hash(fleet, id));
                let interval_ms = r
                    .pace
                    .devices_per_minute
                    .map(|d| 60_000.0 / (d * r.pace.growth.powi(i as i32)))
                    .unwrap_or(0.0);
                let mut devices: Vec<TargetDevice> = ids
                    .into_iter()
                    .filter_map(|id| digests.get(id).map(|digest| (id, digest)))
                    .enumerate()
                    .map(|(k, (id, digest))| TargetDevice {
                        id: id.clone(),
                        digest: digest.clone(),
                        due_ms: (k as f64 * interval_ms) as u64 + jitter(commit, id, r.jitter_ms),
                    })
                    .collect();
                devices.sort_by(|a, b| a.due_ms.cmp(&b.due_ms).then_with(|| a.id.cmp(&b.id)));
                TargetWave { name: w.name.clone(), soak_ms: w.soak_ms, devices }
            })
            .collect();
        Target { fleet: fleet.into(), commit: commit.into(), rollout: r.clone(), waves }
    }

    /// A fresh rollout of this target, started at `now_ms`; nothing released yet.
    pub fn start(&self, now_ms: i64) -> RolloutState {
        let h = &self.rollout.halt;
        RolloutState {
            fleet: self.fleet.clone(),
            commit: self.commit.clone(),
            state: Phase::Running,
            reason: None,
            wave: 0,
            started_at: now_ms / 1000,
            updated_at: now_ms / 1000,
            waves: self
                .waves
                .iter()
                .map(|w| WaveState {
                    name: w.name.clone(),
                    devices: w.devices.len(),
                    announced: 0,
                    succeeded: 0,
                    failed: 0,
                    pending: 0,
                    started_at: None,
                    converged_at: None,
                    soaked_at: None,
                })
                .collect(),
            halt: HaltView {
                max_failed: h.max_failed,
                max_failed_rate: h.max_failed_rate,
                min_reporting: h.min_reporting,
                wave_timeout: h.wave_timeout_ms.map(|ms| ms / 1000),
            },
        }
    }

    /// Where a run starts from what the broker retains: the retained state when it is
    /// this commit's (whatever its phase), else a fresh rollout (a retained state of
    /// another commit is superseded: returned as the second value when it was running).
    pub fn resume(
        &self,
        retained: Option<RolloutState>,
        now_ms: i64,
    ) -> (RolloutState, Option<RolloutState>) {
        match retained {
            Some(r) if r.commit == self.commit && r.waves.len() == self.waves.len() => (r, None),
            Some(r) => {
                let superseded = (r.state == Phase::Running).then_some(r);
                (self.start(now_ms), superseded)
            }
            None => (self.start(now_ms), None),
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Move the wave's pointer files into `devices/` and run `--sync`.
    Release(usize),
    /// Announce these devices (their new bundle) over MQTT.
    Announce(Vec<String>),
}

fn halt(state: &mut RolloutState, code: &str, text: String) {
    state.state = Phase::Halted;
    state.reason = Some(format!("{code}: {text}"));
}

/// Marks the rollout aborted (by `--abort`).
pub fn abort(state: &mut RolloutState, reason: Option<&str>, now_ms: i64) {
    state.state = Phase::Aborted;
    state.reason = Some(format!("aborted: {}", reason.unwrap_or("by fleet-bundler rollout --abort")));
    state.updated_at = now_ms / 1000;
}

/// Halts the rollout because `--sync` failed after releasing a wave.
pub fn sync_failed(state: &mut RolloutState, message: &str, now_ms: i64) {
    halt(state, "sync_failed", message.to_string());
    state.updated_at = now_ms / 1000;
}

/// One step of the rollout; see the module docs. Changes `state` only while it is
/// running; `updated_at` is set when anything else changed.
pub fn step(
    target: &Target,
    state: &mut RolloutState,
    observed: &BTreeMap<String, Observed>,
    now_ms: i64,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    if state.state != Phase::Running {
        return effects;
    }
    let before = state.clone();
    let now_s = now_ms / 1000;
    let w = state.wave.min(target.waves.len());
    if w >= target.waves.len() || target.waves.is_empty() {
        state.state = Phase::Done;
        state.updated_at = now_s;
        return effects;
    }
    // 1. Count the released waves.
    let mut failed_devices: Vec<&str> = Vec::new();
    for (i, tw) in target.waves.iter().enumerate().take(w + 1) {
        let ws = &mut state.waves[i];
        if ws.started_at.is_none() {
            continue;
        }
        let (mut ok, mut bad) = (0, 0);
        for d in &tw.devices {
            match observed.get(&d.id) {
                Some(o)
                    if o.state == DeviceState::Converged
                        && o.applied_digest.as_deref() == Some(&d.digest) =>
                {
                    ok += 1
                }
                Some(o)
                    if matches!(o.state, DeviceState::Failed | DeviceState::RolledBack)
                        && o.desired_digest.as_deref() == Some(&d.digest) =>
                {
                    bad += 1;
                    failed_devices.push(&d.id);
                }
                _ => {}
            }
        }
        (ws.succeeded, ws.failed, ws.pending) = (ok, bad, tw.devices.len() - ok - bad);
    }
    // 2. Halt criteria, over the whole rollout.
    let failed: usize = state.waves.iter().map(|w| w.failed).sum();
    let reported: usize = state.waves.iter().map(|w| w.failed + w.succeeded).sum();
    let h = &target.rollout.halt;
    let names = || {
        let mut s = failed_devices.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        if failed_devices.len() > 5 {
            s.push_str(", ...");
        }
        s
    };
    if let Some(max) = h.max_failed {
        if failed as u64 > max {
            halt(
                state,
                "max_failed",
                format!("{failed} device(s) failed or rolled back on the new bundle, more than max_failed {max} ({})", names()),
            );
        }
    }
    if let Some(rate) = h.max_failed_rate {
        if state.state == Phase::Running
            && reported as u64 >= h.min_reporting
            && failed as f64 > rate * reported as f64
        {
            halt(
                state,
                "max_failed_rate",
                format!(
                    "{failed} of {reported} reporting device(s) failed or rolled back ({:.0} %), above max_failed_rate {rate} ({})",
                    100.0 * failed as f64 / reported as f64,
                    names()
                ),
            );
        }
    }
    let ws = &state.waves[w];
    let settled = ws.started_at.is_some() && ws.announced == ws.devices && ws.pending == 0;
    if let (Some(timeout), Some(started), Phase::Running) = (h.wave_timeout_ms, ws.started_at, state.state) {
        if !settled && now_ms - started * 1000 > timeout as i64 {
            let text = format!(
                "wave {} ({}) not settled {}s after its start: {} of {} device(s) pending",
                w + 1,
                ws.name,
                timeout / 1000,
                ws.pending,
                ws.devices
            );
            halt(state, "wave_timeout", text);
        }
    }
    if state.state != Phase::Running {
        state.updated_at = now_s;
        return effects;
    }
    // 3. Release, then announce what is due.
    if state.waves[w].started_at.is_none() {
        state.waves[w].started_at = Some(now_s);
        state.waves[w].pending = state.waves[w].devices;
        effects.push(Effect::Release(w));
    }
    let ws = &mut state.waves[w];
    let start_ms = ws.started_at.unwrap_or(now_s) * 1000;
    let due: Vec<String> = target.waves[w].devices[ws.announced.min(ws.devices)..]
        .iter()
        .take_while(|d| start_ms + d.due_ms as i64 <= now_ms)
        .map(|d| d.id.clone())
        .collect();
    if !due.is_empty() {
        ws.announced += due.len();
        effects.push(Effect::Announce(due));
    }
    // 4. Soak, advance, done.
    let settled = ws.announced == ws.devices
        && ws.pending == 0
        && !effects.iter().any(|e| matches!(e, Effect::Release(_)));
    if settled {
        let converged = *ws.converged_at.get_or_insert(now_s);
        if now_ms >= converged * 1000 + target.waves[w].soak_ms as i64 {
            ws.soaked_at = Some(now_s);
            if w + 1 == target.waves.len() {
                state.state = Phase::Done;
            } else {
                state.wave = w + 1;
                state.waves[w + 1].started_at = Some(now_s);
                state.waves[w + 1].pending = state.waves[w + 1].devices;
                effects.push(Effect::Release(w + 1));
            }
        }
    } else if effects.is_empty() {
        ws.converged_at = None;
    }
    if *state != before {
        state.updated_at = now_s;
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::plan::{Halt, Pace, Wave};

    const COMMIT: &str = "c0ffee";

    /// Waves of `sizes` devices `w<i>-<k>`, each device's digest `new-<id>`.
    fn target(sizes: &[usize], soak_ms: u64, halt: Halt, pace: Pace, jitter_ms: u64) -> Target {
        let mut devices = BTreeMap::new();
        let mut digests = BTreeMap::new();
        let mut waves = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            waves.push(Wave { name: format!("w{i}"), selector: None, percent: None, soak_ms });
            for k in 0..*n {
                let id = format!("w{i}-{k:02}");
                digests.insert(id.clone(), format!("new-{id}"));
                devices.insert(id, i);
            }
        }
        let plan = RolloutPlan { rollout: Rollout { waves, halt, pace, jitter_ms }, devices };
        Target::new("acme", COMMIT, &plan, &digests)
    }

    fn simple(sizes: &[usize], soak_ms: u64, halt: Halt) -> Target {
        target(sizes, soak_ms, halt, Pace::default(), 0)
    }

    fn converged(id: &str) -> Observed {
        Observed {
            state: DeviceState::Converged,
            applied_digest: Some(format!("new-{id}")),
            desired_digest: Some(format!("new-{id}")),
        }
    }

    fn failed(id: &str) -> Observed {
        Observed {
            state: DeviceState::RolledBack,
            applied_digest: Some("old".into()),
            desired_digest: Some(format!("new-{id}")),
        }
    }

    fn wave_ids(t: &Target, w: usize) -> Vec<String> {
        t.waves[w].devices.iter().map(|d| d.id.clone()).collect()
    }

    fn converge_wave(t: &Target, w: usize, seen: &mut BTreeMap<String, Observed>) {
        for id in wave_ids(t, w) {
            seen.insert(id.clone(), converged(&id));
        }
    }

    #[test]
    fn waves_are_released_in_order_after_their_soak() {
        let t = simple(&[2, 3, 4], 10_000, Halt::default());
        let mut s = t.start(0);
        let mut seen = BTreeMap::new();
        assert_eq!(step(&t, &mut s, &seen, 0), vec![Effect::Release(0), Effect::Announce(wave_ids(&t, 0))]);
        assert!(step(&t, &mut s, &seen, 1_000).is_empty(), "nothing before wave 0 converged");
        converge_wave(&t, 0, &mut seen);
        assert!(step(&t, &mut s, &seen, 2_000).is_empty(), "soaking");
        assert_eq!(s.waves[0].converged_at, Some(2));
        assert!(step(&t, &mut s, &seen, 11_999).is_empty(), "still soaking");
        assert_eq!(step(&t, &mut s, &seen, 12_000), vec![Effect::Release(1)]);
        assert_eq!((s.wave, s.waves[0].soaked_at), (1, Some(12)));
        assert_eq!(step(&t, &mut s, &seen, 12_100), vec![Effect::Announce(wave_ids(&t, 1))]);
        converge_wave(&t, 1, &mut seen);
        step(&t, &mut s, &seen, 13_000);
        assert_eq!(step(&t, &mut s, &seen, 23_000), vec![Effect::Release(2)]);
        step(&t, &mut s, &seen, 23_000);
        converge_wave(&t, 2, &mut seen);
        step(&t, &mut s, &seen, 24_000);
        assert_eq!(s.state, Phase::Running, "the last wave soaks too");
        assert!(step(&t, &mut s, &seen, 34_000).is_empty());
        assert_eq!(s.state, Phase::Done);
        assert_eq!(s.waves.iter().map(|w| w.succeeded).collect::<Vec<_>>(), [2, 3, 4]);
    }

    #[test]
    fn the_failed_count_halts_and_nothing_more_is_announced() {
        let t = simple(&[2, 4, 4], 0, Halt { max_failed: Some(1), ..Halt::default() });
        let mut s = t.start(0);
        let mut seen = BTreeMap::new();
        step(&t, &mut s, &seen, 0);
        converge_wave(&t, 0, &mut seen);
        assert_eq!(step(&t, &mut s, &seen, 1_000), vec![Effect::Release(1)]);
        step(&t, &mut s, &seen, 1_000);
        let w1 = wave_ids(&t, 1);
        seen.insert(w1[0].clone(), failed(&w1[0]));
        assert!(step(&t, &mut s, &seen, 2_000).is_empty());
        assert_eq!(s.state, Phase::Running, "one failure is within max_failed 1");
        seen.insert(w1[1].clone(), failed(&w1[1]));
        assert!(step(&t, &mut s, &seen, 3_000).is_empty());
        assert_eq!(s.state, Phase::Halted);
        let reason = s.reason.clone().expect("a reason");
        assert!(reason.starts_with("max_failed: 2 device(s)"), "{reason}");
        assert!(reason.contains(&w1[0]), "{reason}");
        converge_wave(&t, 1, &mut seen);
        assert!(step(&t, &mut s, &seen, 100_000).is_empty(), "halted stays halted");
        assert_eq!((s.wave, s.waves[2].started_at, s.waves[2].announced), (1, None, 0));
    }

    #[test]
    fn the_failure_rate_is_judged_once_enough_devices_reported() {
        let halt =
            Halt { max_failed: None, max_failed_rate: Some(0.25), min_reporting: 4, wave_timeout_ms: None };
        let t = simple(&[8], 0, halt);
        let mut s = t.start(0);
        let mut seen = BTreeMap::new();
        step(&t, &mut s, &seen, 0);
        let ids = wave_ids(&t, 0);
        seen.insert(ids[0].clone(), failed(&ids[0]));
        seen.insert(ids[1].clone(), converged(&ids[1]));
        step(&t, &mut s, &seen, 1_000);
        assert_eq!(s.state, Phase::Running, "1 of 2 is 50 %, but only 2 reported");
        for id in &ids[2..5] {
            seen.insert(id.clone(), converged(id));
        }
        step(&t, &mut s, &seen, 2_000);
        assert_eq!(s.state, Phase::Running, "1 of 5 is 20 %");
        seen.insert(ids[5].clone(), failed(&ids[5]));
        step(&t, &mut s, &seen, 3_000);
        assert_eq!(s.state, Phase::Halted, "2 of 6 is 33 %");
        assert!(
            s.reason.as_deref().is_some_and(|r| r.starts_with("max_failed_rate: 2 of 6")),
            "{:?}",
            s.reason
        );
    }

    #[test]
    fn a_wave_that_does_not_settle_in_time_halts() {
        let halt = Halt { wave_timeout_ms: Some(30_000), ..Halt::default() };
        let t = simple(&[2, 2], 0, halt);
        let mut s = t.start(0);
        let mut seen = BTreeMap::new();
        step(&t, &mut s, &seen, 0);
        let ids = wave_ids(&t, 0);
        seen.insert(ids[0].clone(), converged(&ids[0]));
        step(&t, &mut s, &seen, 30_000);
        assert_eq!(s.state, Phase::Running);
        step(&t, &mut s, &seen, 30_001);
        assert_eq!(s.state, Phase::Halted);
        assert!(
            s.reason.as_deref().is_some_and(|r| r.starts_with("wave_timeout: wave 1 (w0)")),
            "{:?}",
            s.reason
        );
    }

    #[test]
    fn a_status_of_another_bundle_counts_for_nothing() {
        let t = simple(&[1], 0, Halt::default());
        let mut s = t.start(0);
        step(&t, &mut s, &BTreeMap::new(), 0);
        let id = wave_ids(&t, 0).remove(0);
        let old =
            Observed { state: DeviceState::Failed, applied_digest: None, desired_digest: Some("old".into()) };
        let stale = Observed {
            state: DeviceState::Converged,
            applied_digest: Some("old".into()),
            desired_digest: None,
        };
        for o in [old, stale] {
            step(&t, &mut s, &[(id.clone(), o)].into(), 1_000);
            assert_eq!((s.state, s.waves[0].pending), (Phase::Running, 1));
        }
    }

    #[test]
    fn the_pace_grows_per_wave_and_jitter_is_bounded_and_fixed() {
        let pace = Pace { devices_per_minute: Some(60.0), growth: 2.0 };
        let t = target(&[4, 8], 0, Halt::default(), pace.clone(), 0);
        let due = |w: usize| t.waves[w].devices.iter().map(|d| d.due_ms).collect::<Vec<_>>();
        assert_eq!(due(0), [0, 1_000, 2_000, 3_000]);
        assert_eq!(due(1), [0, 500, 1_000, 1_500, 2_000, 2_500, 3_000, 3_500]);
        let mut s = t.start(0);
        let seen = BTreeMap::new();
        assert_eq!(
            step(&t, &mut s, &seen, 0),
            vec![Effect::Release(0), Effect::Announce(vec![t.waves[0].devices[0].id.clone()])]
        );
        assert_eq!(step(&t, &mut s, &seen, 2_500), vec![Effect::Announce(wave_ids(&t, 0)[1..3].to_vec())]);
        assert_eq!(s.waves[0].announced, 3);
        let jittered = target(&[50], 0, Halt::default(), Pace::default(), 5_000);
        let again = target(&[50], 0, Halt::default(), Pace::default(), 5_000);
        assert_eq!(jittered, again, "the same commit gives the same delays");
        let delays: Vec<u64> = jittered.waves[0].devices.iter().map(|d| d.due_ms).collect();
        assert!(delays.iter().all(|d| *d <= 5_000));
        assert!(delays.windows(2).all(|p| p[0] <= p[1]), "announcement order follows the delays");
        assert!(delays.iter().collect::<std::collections::BTreeSet<_>>().len() > 40, "spread: {delays:?}");
    }

    #[test]
    fn a_retained_state_of_the_same_commit_resumes_where_it_was() {
        let pace = Pace { devices_per_minute: Some(60.0), growth: 1.0 };
        let t = target(&[2, 4], 0, Halt::default(), pace, 0);
        let mut s = t.start(0);
        let mut seen = BTreeMap::new();
        step(&t, &mut s, &seen, 0);
        step(&t, &mut s, &seen, 1_000);
        converge_wave(&t, 0, &mut seen);
        step(&t, &mut s, &seen, 2_000);
        step(&t, &mut s, &seen, 2_000);
        step(&t, &mut s, &seen, 3_000);
        assert_eq!((s.wave, s.waves[1].announced), (1, 2));
        // Killed here; the retained JSON is all that is left.
        let retained: RolloutState =
            serde_json::from_slice(&serde_json::to_vec(&s).expect("json")).expect("json");
        let (mut resumed, superseded) = t.resume(Some(retained), 60_000);
        assert!(superseded.is_none());
        assert_eq!(resumed, s);
        let effects = step(&t, &mut resumed, &seen, 60_000);
        assert_eq!(
            effects,
            vec![Effect::Announce(wave_ids(&t, 1)[2..].to_vec())],
            "no wave released again, no device twice"
        );
        // Halted and aborted states stay what they are.
        let mut halted = s.clone();
        halted.state = Phase::Halted;
        let (r, _) = t.resume(Some(halted), 0);
        assert_eq!(r.state, Phase::Halted);
        assert!(step(&t, &mut r.clone(), &seen, 70_000).is_empty());
    }

    #[test]
    fn a_newer_commit_supersedes_a_running_rollout() {
        let t = simple(&[1, 1], 0, Halt::default());
        let mut old = t.start(0);
        old.commit = "older".into();
        old.wave = 1;
        let (fresh, superseded) = t.resume(Some(old.clone()), 5_000);
        assert_eq!((fresh.commit.as_str(), fresh.wave, fresh.started_at), (COMMIT, 0, 5));
        assert_eq!(superseded, Some(old));
    }

    #[test]
    fn an_aborted_rollout_does_nothing_more() {
        let t = simple(&[1, 1], 0, Halt::default());
        let mut s = t.start(0);
        step(&t, &mut s, &BTreeMap::new(), 0);
        abort(&mut s, Some("bad config"), 1_000);
        assert_eq!(s.reason.as_deref(), Some("aborted: bad config"));
        let mut seen = BTreeMap::new();
        converge_wave(&t, 0, &mut seen);
        assert!(step(&t, &mut s, &seen, 10_000).is_empty());
        assert_eq!((s.state, s.wave), (Phase::Aborted, 0));
    }

    #[test]
    fn tolerated_failures_let_a_wave_settle() {
        let t = simple(&[3, 1], 0, Halt { max_failed: Some(1), ..Halt::default() });
        let mut s = t.start(0);
        let mut seen = BTreeMap::new();
        step(&t, &mut s, &seen, 0);
        converge_wave(&t, 0, &mut seen);
        let id = wave_ids(&t, 0).remove(0);
        seen.insert(id.clone(), failed(&id));
        assert_eq!(step(&t, &mut s, &seen, 1_000), vec![Effect::Release(1)]);
    }
}
