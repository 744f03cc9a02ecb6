//! The rollout as `fleet.yaml` declares it (`rollout:`), its validation, and which wave
//! each device belongs to. Pure: no I/O, no clock.
//!
//! Wave membership: a device belongs to the first wave that takes it. A wave with a
//! `selector:` considers only the remaining devices whose labels match; a wave with
//! `percent:` takes `ceil(percent % × n)` of the `n` devices it considers, those with
//! the lowest `sha256(fleet + "/" + device id)`; a wave with neither takes every
//! remaining device. The hash does not depend on the commit, so a device stays in its
//! wave across rollouts; adding or removing devices moves at most the devices at a
//! wave's boundary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::diag::Diagnostic;
use crate::duration::parse_duration_ms;
use crate::format::SelectorValue;
use crate::yaml::{Pos, Scalar, Shape, Spanned};

const WAVE_SHAPE: Shape = Shape::Keys(&[
    ("name", Shape::Any),
    ("selector", Shape::Any),
    ("percent", Shape::Any),
    ("soak", Shape::Any),
]);
const HALT_SHAPE: Shape = Shape::Keys(&[
    ("max_failed", Shape::Any),
    ("max_failed_rate", Shape::Any),
    ("min_reporting", Shape::Any),
    ("wave_timeout", Shape::Any),
]);
const PACE_SHAPE: Shape = Shape::Keys(&[("devices_per_minute", Shape::Any), ("growth", Shape::Any)]);

/// The keys of `rollout:` in `fleet.yaml`.
pub const ROLLOUT_SHAPE: Shape = Shape::Keys(&[
    ("waves", Shape::List(&WAVE_SHAPE)),
    ("halt", HALT_SHAPE),
    ("pace", PACE_SHAPE),
    ("jitter", Shape::Any),
]);

/// `rollout:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutFile {
    pub waves: Vec<Spanned<WaveFile>>,
    #[serde(default)]
    pub halt: Option<HaltFile>,
    #[serde(default)]
    pub pace: Option<PaceFile>,
    #[serde(default)]
    pub jitter: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub selector: Option<Spanned<BTreeMap<String, Spanned<SelectorValue>>>>,
    #[serde(default)]
    pub percent: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub soak: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaltFile {
    #[serde(default)]
    pub max_failed: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub max_failed_rate: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub min_reporting: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub wave_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaceFile {
    #[serde(default)]
    pub devices_per_minute: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub growth: Option<Spanned<Scalar>>,
}

/// A checked rollout: what `build` records in `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub waves: Vec<Wave>,
    pub halt: Halt,
    pub pace: Pace,
    /// Announcements of a wave are spread by a per-device delay up to this (ms).
    #[serde(default)]
    pub jitter_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default)]
    pub soak_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    /// Halt when more devices than this failed or rolled back on the new bundle.
    #[serde(default)]
    pub max_failed: Option<u64>,
    /// Halt when failed / reported exceeds this (0..=1), once `min_reporting` reported.
    #[serde(default)]
    pub max_failed_rate: Option<f64>,
    #[serde(default = "one")]
    pub min_reporting: u64,
    #[serde(default)]
    pub wave_timeout_ms: Option<u64>,
}

fn one() -> u64 {
    1
}

impl Default for Halt {
    /// No `halt:`: the first failed device halts the rollout.
    fn default() -> Self {
        Halt { max_failed: Some(0), max_failed_rate: None, min_reporting: 1, wave_timeout_ms: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pace {
    #[serde(default)]
    pub devices_per_minute: Option<f64>,
    #[serde(default = "growth_one")]
    pub growth: f64,
}

fn growth_one() -> f64 {
    1.0
}

impl Default for Pace {
    fn default() -> Self {
        Pace { devices_per_minute: None, growth: 1.0 }
    }
}

/// The rollout and each device's wave, as `index.json` records it (`rollout`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    #[serde(flatten)]
    pub rollout: Rollout,
    /// Device id → index of its wave in `waves`.
    pub devices: BTreeMap<String, usize>,
}

impl Wave {
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|sel| sel.iter().all(|(k, values)| labels.get(k).is_some_and(|v| values.contains(v))))
    }
}

/// The stable hash that orders devices for `percent:` (and announcements).
pub fn device_hash(fleet: &str, device: &str) -> [u8; 32] {
    Sha256::digest(format!("{fleet}/{device}").as_bytes()).into()
}

/// Assigns every device to the first wave that takes it; returns the assignment and the
/// devices no wave takes.
pub fn assign<'a>(
    fleet: &str,
    rollout: &Rollout,
    devices: impl IntoIterator<Item = (&'a String, &'a BTreeMap<String, String>)>,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut remaining: Vec<([u8; 32], &String, &BTreeMap<String, String>)> =
        devices.into_iter().map(|(id, labels)| (device_hash(fleet, id), id, labels)).collect();
    remaining.sort();
    let mut assigned = BTreeMap::new();
    for (i, wave) in rollout.waves.iter().enumerate() {
        let candidates: Vec<usize> = (0..remaining.len()).filter(|&k| wave.selects(remaining[k].2)).collect();
        let take = match wave.percent {
            Some(p) => ((candidates.len() as f64) * p / 100.0 - 1e-9).ceil().max(0.0) as usize,
            None => candidates.len(),
        };
        let mut taken = vec![false; remaining.len()];
        for k in candidates.into_iter().take(take) {
            taken[k] = true;
            assigned.insert(remaining[k].1.clone(), i);
        }
        let mut k = 0;
        remaining.retain(|_| {
            k += 1;
            !taken[k - 1]
        });
    }
    let unassigned = remaining.iter().map(|(_, id, _)| (*id).clone()).collect();
    (assigned, unassigned)
}

fn number(file: &str, s: &Spanned<Scalar>, what: &str, diags: &mut Vec<Diagnostic>) -> Option<f64> {
    let at = Pos::of(s);
    match s.value.0.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Some(n),
        _ => {
            diags.push(Diagnostic::error(
                file,
                at.line,
                at.column,
                format!("{what} must be a number, not `{}`", s.value.0),
            ));
            None
        }
    }
}

fn duration(file: &str, s: &Spanned<String>, diags: &mut Vec<Diagnostic>) -> Option<u64> {
    let at = Pos::of(s);
    match parse_duration_ms(&s.value) {
        Ok(ms) => Some(ms),
        Err(m) => {
            diags.push(Diagnostic::error(file, at.line, at.column, m));
            None
        }
    }
}

impl Rollout {
    /// Checks `rollout:` of `file` (fleet.yaml); every problem becomes a diagnostic.
    /// `None` when there is an error.
    pub fn from_file(file: &str, f: &Spanned<RolloutFile>, diags: &mut Vec<Diagnostic>) -> Option<Rollout> {
        let before = diags.iter().filter(|d| d.is_error()).count();
        let mut err =
            |at: Pos, message: String| diags.push(Diagnostic::error(file, at.line, at.column, message));
        let mut waves: Vec<Wave> = Vec::new();
        if f.value.waves.is_empty() {
            err(Pos::of(f), "rollout: lists no waves: give at least one under `waves:`".into());
        }
        let mut pending: Vec<Diagnostic> = Vec::new();
        for (i, w) in f.value.waves.iter().enumerate() {
            let name = w.value.name.value.trim().to_string();
            let at = Pos::of(&w.value.name);
            if name.is_empty() {
                err(at, "a wave needs a name".into());
            } else if waves.iter().any(|o| o.name == name) {
                err(at, format!("two waves are named `{name}`: names must be unique"));
            }
            let selector = w.value.selector.as_ref().map(|s| {
                s.value.iter().map(|(k, v)| (k.clone(), v.value.0.clone())).collect::<BTreeMap<_, _>>()
            });
            if let Some(s) = &w.value.selector {
                for (k, v) in &s.value {
                    if v.value.0.is_empty() {
                        let at = Pos::of(v);
                        err(
                            at,
                            format!("selector label `{k}` lists no value: give a value or a list of values"),
                        );
                    }
                }
            }
            let percent = w.value.percent.as_ref().and_then(|p| {
                let n = number(file, p, "percent", &mut pending)?;
                if n <= 0.0 || n > 100.0 {
                    let at = Pos::of(p);
                    pending.push(Diagnostic::error(
                        file,
                        at.line,
                        at.column,
                        format!("percent must be above 0 and at most 100, not {n}"),
                    ));
                    return None;
                }
                Some(n)
            });
            let soak_ms = w.value.soak.as_ref().and_then(|s| duration(file, s, &mut pending)).unwrap_or(0);
            if selector.is_none() && w.value.percent.is_none() && i + 1 < f.value.waves.len() {
                err(
                    Pos::of(w),
                    format!(
                        "wave `{name}` has neither selector nor percent, so it takes every remaining device and \
                         the waves after it get none: make it the last wave, or give it a selector or a percent"
                    ),
                );
            }
            waves.push(Wave { name, selector, percent, soak_ms });
        }
        let mut halt = Halt::default();
        if let Some(h) = &f.value.halt {
            halt.max_failed = h
                .max_failed
                .as_ref()
                .and_then(|n| number(file, n, "max_failed", &mut pending))
                .map(|n| n as u64);
            halt.max_failed_rate = h.max_failed_rate.as_ref().and_then(|r| {
                let n = number(file, r, "max_failed_rate", &mut pending)?;
                if n > 1.0 {
                    let at = Pos::of(r);
                    pending.push(Diagnostic::error(
                        file,
                        at.line,
                        at.column,
                        format!("max_failed_rate is a fraction from 0 to 1 (0.2 = 20 %), not {n}"),
                    ));
                    return None;
                }
                Some(n)
            });
            if let Some(m) = &h.min_reporting {
                halt.min_reporting =
                    number(file, m, "min_reporting", &mut pending).map_or(1, |n| (n as u64).max(1));
            }
            halt.wave_timeout_ms = h.wave_timeout.as_ref().and_then(|t| duration(file, t, &mut pending));
            if h.max_failed.is_none() && h.max_failed_rate.is_none() {
                // Neither limit: the first failure halts, as without `halt:`.
                halt.max_failed = Some(0);
            }
        }
        let mut pace = Pace::default();
        if let Some(p) = &f.value.pace {
            pace.devices_per_minute = p.devices_per_minute.as_ref().and_then(|d| {
                let n = number(file, d, "devices_per_minute", &mut pending)?;
                if n <= 0.0 {
                    let at = Pos::of(d);
                    pending.push(Diagnostic::error(
                        file,
                        at.line,
                        at.column,
                        "devices_per_minute must be above 0 (leave it out for no limit)".to_string(),
                    ));
                    return None;
                }
                Some(n)
            });
            if let Some(g) = &p.growth {
                match number(file, g, "growth", &mut pending) {
                    Some(n) if n >= 1.0 => pace.growth = n,
                    Some(n) => {
                        let at = Pos::of(g);
                        pending.push(Diagnostic::error(
                            file,
                            at.line,
                            at.column,
                            format!("growth must be at least 1 (the pace grows per wave), not {n}"),
                        ));
                    }
                    None => {}
                }
            }
        }
        let jitter_ms = f.value.jitter.as_ref().and_then(|j| duration(file, j, &mut pending)).unwrap_or(0);
        diags.extend(pending);
        let after = diags.iter().filter(|d| d.is_error()).count();
        (after == before).then_some(Rollout { waves, halt, pace, jitter_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(waves: Vec<Wave>) -> Rollout {
        Rollout { waves, halt: Halt::default(), pace: Pace::default(), jitter_ms: 0 }
    }

    fn wave(name: &str, selector: Option<(&str, &str)>, percent: Option<f64>) -> Wave {
        Wave {
            name: name.into(),
            selector: selector.map(|(k, v)| [(k.to_string(), vec![v.to_string()])].into()),
            percent,
            soak_ms: 0,
        }
    }

    fn fleet(n: usize) -> BTreeMap<String, BTreeMap<String, String>> {
        (0..n)
            .map(|i| {
                let channel = if i < 5 { "canary" } else { "stable" };
                (format!("dev-{i:03}"), [("channel".to_string(), channel.to_string())].into())
            })
            .collect()
    }

    fn count(assigned: &BTreeMap<String, usize>, wave: usize) -> usize {
        assigned.values().filter(|w| **w == wave).count()
    }

    #[test]
    fn membership_is_stable_across_rollouts_and_commits() {
        let r =
            rollout(vec![wave("a", None, Some(10.0)), wave("b", None, Some(50.0)), wave("rest", None, None)]);
        let devices = fleet(100);
        let (first, none) = assign("acme", &r, &devices);
        assert!(none.is_empty());
        let (again, _) = assign("acme", &r, &devices);
        assert_eq!(first, again, "the same fleet gives the same waves");
        // One device more moves at most one device per wave boundary.
        let mut more = devices.clone();
        more.insert("dev-new".into(), BTreeMap::new());
        let (grown, _) = assign("acme", &r, &more);
        let moved = first.iter().filter(|(id, w)| grown.get(*id) != Some(w)).count();
        assert!(moved <= 2, "{moved} devices moved");
        // Another fleet name hashes differently.
        let (other, _) = assign("other", &r, &devices);
        assert_ne!(first, other);
    }

    #[test]
    fn percentages_are_of_the_remaining_devices() {
        let r =
            rollout(vec![wave("a", None, Some(10.0)), wave("b", None, Some(50.0)), wave("rest", None, None)]);
        let (assigned, none) = assign("acme", &r, &fleet(100));
        assert!(none.is_empty());
        assert_eq!((count(&assigned, 0), count(&assigned, 1), count(&assigned, 2)), (10, 45, 45));
        // Rounded up: a small fleet's first wave is never empty.
        let (small, _) = assign("acme", &r, &fleet(3));
        assert_eq!((count(&small, 0), count(&small, 1), count(&small, 2)), (1, 1, 1));
    }

    #[test]
    fn selector_and_percent_take_a_share_of_the_matching_devices() {
        let r = rollout(vec![
            wave("half-canary", Some(("channel", "canary")), Some(40.0)),
            wave("rest", None, None),
        ]);
        let devices = fleet(20);
        let (assigned, _) = assign("acme", &r, &devices);
        assert_eq!(count(&assigned, 0), 2, "40 % of the 5 canaries");
        for (id, w) in &assigned {
            if *w == 0 {
                assert_eq!(devices[id]["channel"], "canary");
            }
        }
    }

    #[test]
    fn the_first_wave_that_takes_a_device_wins() {
        let r = rollout(vec![
            wave("canary", Some(("channel", "canary")), None),
            wave("canary-again", Some(("channel", "canary")), None),
            wave("rest", None, None),
        ]);
        let (assigned, _) = assign("acme", &r, &fleet(20));
        assert_eq!((count(&assigned, 0), count(&assigned, 1), count(&assigned, 2)), (5, 0, 15));
        // A rollout whose last wave has a selector leaves devices out.
        let r = rollout(vec![wave("canary", Some(("channel", "canary")), None)]);
        let (_, none) = assign("acme", &r, &fleet(20));
        assert_eq!(none.len(), 15);
    }

    fn check(yaml: &str) -> (Option<Rollout>, Vec<Diagnostic>) {
        #[derive(Deserialize)]
        struct Doc {
            rollout: Spanned<RolloutFile>,
        }
        let doc: Doc =
            match crate::yaml::parse_all("fleet.yaml", yaml, &Shape::Keys(&[("rollout", ROLLOUT_SHAPE)])) {
                Ok(d) => d,
                Err(diags) => return (None, diags),
            };
        let mut diags = Vec::new();
        (Rollout::from_file("fleet.yaml", &doc.rollout, &mut diags), diags)
    }

    #[test]
    fn the_declared_shape_parses() {
        let (r, diags) = check(
            "rollout:\n  waves:\n    - name: canary\n      selector: {channel: canary}\n      soak: 2m\n    - name: early\n      percent: 10\n      soak: 10m\n    - name: rest\n  halt:\n    max_failed: 5\n    max_failed_rate: 0.2\n    min_reporting: 10\n    wave_timeout: 30m\n  pace:\n    devices_per_minute: 60\n    growth: 2\n  jitter: 30s\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        let r = r.expect("valid");
        assert_eq!(r.waves.len(), 3);
        assert_eq!(r.waves[0].soak_ms, 120_000);
        assert_eq!(r.waves[1].percent, Some(10.0));
        assert_eq!(
            r.halt,
            Halt {
                max_failed: Some(5),
                max_failed_rate: Some(0.2),
                min_reporting: 10,
                wave_timeout_ms: Some(1_800_000)
            }
        );
        assert_eq!(r.pace, Pace { devices_per_minute: Some(60.0), growth: 2.0 });
        assert_eq!(r.jitter_ms, 30_000);
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        let (_, diags) =
            check("rollout:\n  waves:\n    - name: a\n      precent: 10\n  halt:\n    max_faild: 1\n");
        let messages: Vec<String> =
            diags.iter().map(|d| format!("{}:{} {}", d.line, d.column, d.message)).collect();
        assert!(
            messages.iter().any(|m| m.starts_with("4:7 ") && m.contains("did you mean `percent`")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.starts_with("6:5 ") && m.contains("did you mean `max_failed`")),
            "{messages:?}"
        );
        let (r, diags) = check(
            "rollout:\n  waves:\n    - name: all\n    - name: all\n      percent: 150\n      soak: soon\n",
        );
        assert!(r.is_none());
        let text = format!("{diags:?}");
        for wanted in
            ["takes every remaining device", "names must be unique", "at most 100", "invalid duration"]
        {
            assert!(text.contains(wanted), "{wanted}: {text}");
        }
    }
}
