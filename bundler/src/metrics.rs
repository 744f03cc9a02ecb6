//! The fleet as Prometheus metrics: [`FleetView`] folds the agents' retained `status`
//! and `online` messages into per-device state, and the retained rollout state into
//! rollout metrics, and [`FleetView::render`] writes it in the Prometheus text
//! exposition format, version 0.0.4.
//!
//! Pure: no I/O, no clock, no MQTT. The exporter ([`crate::exporter`]) feeds it
//! messages and serves what it renders.
//!
//! Every payload is untrusted. A status message that is not a status report (garbage,
//! or larger than [`MAX_STATUS_LEN`]) is counted as invalid and leaves the device's state
//! `unknown`; it never breaks the exposition. Label values are escaped as the format
//! requires (`\\`, `\"`, `\n`), and values that come from reports are narrowed to what
//! they may legitimately be (a commit is hex, an error code is snake_case), so one
//! device cannot mint unbounded label values: every label set is bounded by the number
//! of devices, and the number of devices by [`MAX_DEVICES`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fleet_spec::messages::{DeviceState, StatusReport};

/// A status payload larger than this is not parsed (reports are a few KiB).
pub const MAX_STATUS_LEN: usize = 256 * 1024;

/// Devices tracked at most; messages for further devices are counted and dropped.
pub const MAX_DEVICES: usize = 200_000;

/// Every state of the documented set, in the order they are rendered.
pub const STATES: [DeviceState; 9] = [
    DeviceState::Idle,
    DeviceState::Downloading,
    DeviceState::Applying,
    DeviceState::AwaitingHealth,
    DeviceState::Converged,
    DeviceState::Failed,
    DeviceState::RolledBack,
    DeviceState::Degraded,
    DeviceState::Waiting,
];

/// The state label of a device without a valid status report.
pub const UNKNOWN: &str = "unknown";

/// Which retained topic a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Status,
    Online,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Status => "status",
            Source::Online => "online",
        }
    }
}

/// Why a message did not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("status payload of {0} bytes exceeds {MAX_STATUS_LEN}")]
    TooLarge(usize),
    #[error("status payload is not a status report: {0}")]
    NotAReport(String),
    #[error("online payload is neither true nor false")]
    NotABool,
    #[error("already tracking {MAX_DEVICES} devices")]
    TooManyDevices,
}

/// What the index (the build CI published) wants a device to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub digest: String,
    pub commit: String,
}

/// The parts of a status report the metrics use, already narrowed to safe label values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    state: DeviceState,
    desired: Option<Wanted>,
    applied: Option<Wanted>,
    error_code: Option<String>,
    timestamp: i64,
}

#[derive(Debug, Default, Clone)]
struct Device {
    /// `None`: no report, or the retained payload is not a report.
    report: Option<Report>,
    online: Option<bool>,
    /// From the index, when one was given.
    wanted: Option<Wanted>,
    /// The retained status is there but is not a report (the device shows as unknown).
    invalid_status: bool,
    /// Seen since the last [`FleetView::begin_resync`].
    status_seen: bool,
    online_seen: bool,
}

/// What the exporter knows about itself, rendered beside the fleet.
#[derive(Debug, Clone)]
pub struct ExporterInfo<'a> {
    pub version: &'a str,
    pub broker_connected: bool,
}

/// The fleet as the retained topics describe it. See the module docs.
#[derive(Debug)]
pub struct FleetView {
    fleet: String,
    prefix: String,
    per_device: bool,
    devices: BTreeMap<String, Device>,
    messages: [u64; 2],
    invalid: [u64; 2],
    dropped: u64,
    /// The retained rollout state (`<prefix>/<fleet>/rollout`), narrowed; `None`: none.
    rollout: Option<Rollout>,
    rollout_seen: bool,
}

/// Waves of a rollout shown at most (a state is untrusted input).
const MAX_WAVES: usize = 32;

/// A rollout state as metrics show it: every label value narrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rollout {
    commit: String,
    /// `running`, `halted`, `done`, `aborted`, or `invalid` (not a rollout state).
    state: &'static str,
    /// The current wave, 1-based.
    wave: u64,
    /// Name and the devices succeeded, failed, pending.
    waves: Vec<(String, [u64; 3])>,
}

impl FleetView {
    /// A view of fleet `fleet` under topic prefix `prefix`. `wanted` (from the build's
    /// index) lists the devices that should exist and what they should run; without
    /// it, the devices are whichever report, and what they want is what they say.
    /// `per_device` adds one series per device to a few metrics (see the README).
    pub fn new(fleet: &str, prefix: &str, wanted: BTreeMap<String, Wanted>, per_device: bool) -> FleetView {
        let devices =
            wanted.into_iter().map(|(id, w)| (id, Device { wanted: Some(w), ..Device::default() })).collect();
        FleetView {
            fleet: fleet.into(),
            prefix: prefix.into(),
            per_device,
            devices,
            messages: [0; 2],
            invalid: [0; 2],
            dropped: 0,
            rollout: None,
            rollout_seen: false,
        }
    }

    /// Folds the retained rollout state in (empty: deleted). What does not parse as a
    /// rollout state shows as state `invalid`.
    pub fn apply_rollout(&mut self, payload: &[u8]) {
        self.rollout_seen = true;
        if payload.is_empty() {
            self.rollout = None;
            return;
        }
        let parsed = (payload.len() <= MAX_STATUS_LEN)
            .then(|| serde_json::from_slice::<crate::rollout::judge::RolloutState>(payload).ok())
            .flatten();
        self.rollout = Some(match parsed {
            Some(s) => Rollout {
                commit: commit_label(&s.commit),
                state: s.state.as_str(),
                wave: s.wave as u64 + 1,
                waves: s
                    .waves
                    .iter()
                    .take(MAX_WAVES)
                    .map(|w| (name_label(&w.name), [w.succeeded, w.failed, w.pending].map(|n| n as u64)))
                    .collect(),
            },
            None => Rollout { commit: "invalid".into(), state: "invalid", wave: 0, waves: Vec::new() },
        });
    }

    /// Folds one retained message for `device` in. An empty payload clears what the
    /// topic said (a retained message deleted).
    pub fn apply(&mut self, source: Source, device: &str, payload: &[u8]) -> Result<(), Rejected> {
        let i = source as usize;
        self.messages[i] += 1;
        if !self.devices.contains_key(device) {
            if payload.is_empty() {
                return Ok(());
            }
            if self.devices.len() >= MAX_DEVICES {
                self.dropped += 1;
                return Err(Rejected::TooManyDevices);
            }
        }
        let entry = self.devices.entry(device.to_string()).or_default();
        let result = match source {
            Source::Status => {
                entry.status_seen = true;
                let parsed = parse_report(payload);
                entry.report = parsed.as_ref().ok().cloned().flatten();
                entry.invalid_status = parsed.is_err();
                parsed.map(|_| ())
            }
            Source::Online => {
                entry.online_seen = true;
                let parsed = match payload {
                    b"" => Ok(None),
                    b"true" => Ok(Some(true)),
                    b"false" => Ok(Some(false)),
                    _ => Err(Rejected::NotABool),
                };
                entry.online = parsed.clone().unwrap_or(None);
                parsed.map(|_| ())
            }
        };
        if result.is_err() {
            self.invalid[i] += 1;
        }
        self.forget_if_empty(device);
        result
    }

    /// A new session is about to receive every retained message again: what is not
    /// received before [`FleetView::finish_resync`] was deleted meanwhile.
    pub fn begin_resync(&mut self) {
        self.rollout_seen = false;
        for d in self.devices.values_mut() {
            d.status_seen = false;
            d.online_seen = false;
        }
    }

    /// Drops what the broker no longer retains (see [`FleetView::begin_resync`]).
    pub fn finish_resync(&mut self) {
        if !self.rollout_seen {
            self.rollout = None;
        }
        let stale: Vec<String> = self.devices.keys().cloned().collect();
        for id in stale {
            let d = self.devices.get_mut(&id).expect("listed above");
            if !d.status_seen {
                d.report = None;
                d.invalid_status = false;
            }
            if !d.online_seen {
                d.online = None;
            }
            self.forget_if_empty(&id);
        }
    }

    fn forget_if_empty(&mut self, id: &str) {
        let empty =
            |d: &Device| d.report.is_none() && d.online.is_none() && d.wanted.is_none() && !d.invalid_status;
        if self.devices.get(id).is_some_and(empty) {
            self.devices.remove(id);
        }
    }

    /// The number of devices known.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The whole exposition, Prometheus text format 0.0.4.
    pub fn render(&self, info: &ExporterInfo) -> String {
        let mut out =
            Exposition::with_capacity(4096 + if self.per_device { self.devices.len() * 256 } else { 0 });

        out.family(
            "fleet_exporter_build_info",
            "gauge",
            "The exporter's version, and the fleet and topic prefix it watches; always 1.",
        );
        out.sample(
            "fleet_exporter_build_info",
            &[("version", info.version), ("fleet", &self.fleet), ("prefix", &self.prefix)],
            1,
        );
        out.family("fleet_exporter_broker_connected", "gauge", "1 while the exporter's MQTT session is up, else 0 (the other metrics then show the last known state).");
        out.sample("fleet_exporter_broker_connected", &[], u64::from(info.broker_connected));
        out.family(
            "fleet_exporter_messages_total",
            "counter",
            "Retained status and online messages received, by topic.",
        );
        out.family_samples(
            "fleet_exporter_messages_total",
            "topic",
            [Source::Status, Source::Online].map(|s| (s.as_str(), self.messages[s as usize])),
        );
        out.family(
            "fleet_exporter_invalid_messages_total",
            "counter",
            "Messages that were not a status report (garbage, too large) or not true/false, by topic.",
        );
        out.family_samples(
            "fleet_exporter_invalid_messages_total",
            "topic",
            [Source::Status, Source::Online].map(|s| (s.as_str(), self.invalid[s as usize])),
        );
        out.family(
            "fleet_exporter_dropped_messages_total",
            "counter",
            "Messages for devices beyond the exporter's device limit, dropped.",
        );
        out.sample("fleet_exporter_dropped_messages_total", &[], self.dropped);

        let mut by_state: BTreeMap<&str, u64> = STATES.iter().map(|s| (s.as_str(), 0)).collect();
        by_state.insert(UNKNOWN, 0);
        let mut by_online: BTreeMap<&str, u64> = [("true", 0), ("false", 0), (UNKNOWN, 0)].into();
        let mut by_desired: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_applied: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_error: BTreeMap<&str, u64> = BTreeMap::new();
        let mut outdated = 0u64;
        for d in self.devices.values() {
            let report = d.report.as_ref();
            *by_state.entry(report.map_or(UNKNOWN, |r| r.state.as_str())).or_default() += 1;
            let online = match d.online {
                Some(true) => "true",
                Some(false) => "false",
                None => UNKNOWN,
            };
            *by_online.entry(online).or_default() += 1;
            let desired = d.wanted.as_ref().or(report.and_then(|r| r.desired.as_ref()));
            if let Some(w) = desired {
                *by_desired.entry(&w.commit).or_default() += 1;
            }
            let applied = report.and_then(|r| r.applied.as_ref());
            *by_applied.entry(applied.map_or("none", |a| a.commit.as_str())).or_default() += 1;
            if let Some(w) = desired {
                if applied.is_none_or(|a| a.digest != w.digest) {
                    outdated += 1;
                }
            }
            if let Some(r) = report.filter(|r| is_trouble(r.state)) {
                *by_error.entry(r.error_code.as_deref().unwrap_or("none")).or_default() += 1;
            }
        }

        out.family("fleet_devices", "gauge", "Devices known: those of the index, if given, and every device with a retained status or online message.");
        out.sample("fleet_devices", &[], self.devices.len() as u64);
        out.family(
            "fleet_devices_by_state",
            "gauge",
            "Devices by the state of their retained status report (unknown: no valid report).",
        );
        out.family_samples("fleet_devices_by_state", "state", by_state);
        out.family(
            "fleet_devices_by_online",
            "gauge",
            "Devices by their retained online flag (unknown: none retained).",
        );
        out.family_samples("fleet_devices_by_online", "online", by_online);
        out.family(
            "fleet_devices_by_desired_commit",
            "gauge",
            "Devices by the commit they should run (the index's, else the one their report names).",
        );
        out.family_samples("fleet_devices_by_desired_commit", "commit", by_desired);
        out.family(
            "fleet_devices_by_applied_commit",
            "gauge",
            "Devices by the commit of the bundle they have applied (none: nothing applied or no report).",
        );
        out.family_samples("fleet_devices_by_applied_commit", "commit", by_applied);
        out.family("fleet_devices_outdated", "gauge", "Devices whose applied bundle is not the desired one (including devices that have applied nothing).");
        out.sample("fleet_devices_outdated", &[], outdated);
        out.family(
            "fleet_devices_in_trouble_by_error",
            "gauge",
            "Devices in state failed, rolled_back or degraded, by the reason code of their last error.",
        );
        out.family_samples("fleet_devices_in_trouble_by_error", "code", by_error);

        if let Some(r) = &self.rollout {
            out.family(
                "fleet_rollout_info",
                "gauge",
                "The rollout retained on <prefix>/<fleet>/rollout: 1 for its commit and state (running, halted, done, aborted; invalid: not a rollout state).",
            );
            out.sample("fleet_rollout_info", &[("commit", &r.commit), ("state", r.state)], 1);
            out.family("fleet_rollout_wave", "gauge", "The rollout's current wave, 1-based.");
            out.sample("fleet_rollout_wave", &[], r.wave);
            out.family(
                "fleet_rollout_wave_devices",
                "gauge",
                "Devices of each wave of the rollout by result: succeeded, failed (or rolled back), pending.",
            );
            let mut shown = std::collections::BTreeSet::new();
            // A name twice (a hostile state) would be a duplicate series: the first counts.
            for (name, counts) in r.waves.iter().filter(|(name, _)| shown.insert(name.as_str())) {
                for (result, n) in ["succeeded", "failed", "pending"].into_iter().zip(counts) {
                    out.sample("fleet_rollout_wave_devices", &[("wave", name), ("result", result)], *n);
                }
            }
        }

        if self.per_device {
            out.family("fleet_device_last_report_timestamp_seconds", "gauge", "Unix time of the device's latest status report (the agent's clock). Agents report on change: use fleet_device_online for liveness.");
            for (id, d) in &self.devices {
                if let Some(r) = &d.report {
                    out.sample_i64(
                        "fleet_device_last_report_timestamp_seconds",
                        &[("device", id)],
                        r.timestamp,
                    );
                }
            }
            out.family(
                "fleet_device_online",
                "gauge",
                "1 if the device's retained online flag is true, 0 if false; absent when unknown.",
            );
            for (id, d) in &self.devices {
                if let Some(online) = d.online {
                    out.sample("fleet_device_online", &[("device", id)], u64::from(online));
                }
            }
            out.family(
                "fleet_device_state",
                "gauge",
                "1 for the device's current state (one series per device).",
            );
            for (id, d) in &self.devices {
                let state = d.report.as_ref().map_or(UNKNOWN, |r| r.state.as_str());
                out.sample("fleet_device_state", &[("device", id), ("state", state)], 1);
            }
        }
        out.text
    }
}

fn is_trouble(state: DeviceState) -> bool {
    matches!(state, DeviceState::Failed | DeviceState::RolledBack | DeviceState::Degraded)
}

/// `Ok(None)`: an empty payload (the retained report was deleted).
fn parse_report(payload: &[u8]) -> Result<Option<Report>, Rejected> {
    if payload.is_empty() {
        return Ok(None);
    }
    if payload.len() > MAX_STATUS_LEN {
        return Err(Rejected::TooLarge(payload.len()));
    }
    let r = StatusReport::from_json(payload).map_err(|e| Rejected::NotAReport(e.to_string()))?;
    let version =
        |digest: &str, commit: &str| Wanted { digest: digest.to_string(), commit: commit_label(commit) };
    Ok(Some(Report {
        state: r.state,
        desired: r.desired.as_ref().map(|d| version(&d.digest, &d.commit)),
        applied: r.applied.as_ref().map(|a| version(&a.digest, &a.commit)),
        error_code: r.last_error.as_ref().map(|e| code_label(&e.code)),
        timestamp: r.timestamp,
    }))
}

/// A commit as a label value: a Git object id (hex, up to SHA-256's 64), else `invalid`.
pub fn commit_label(commit: &str) -> String {
    let ok = (4..=64).contains(&commit.len()) && commit.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        commit.to_ascii_lowercase()
    } else {
        "invalid".into()
    }
}

/// A wave name as a label value: `[A-Za-z0-9_.-]` up to 64 characters, else `invalid`.
fn name_label(name: &str) -> String {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        name.into()
    } else {
        "invalid".into()
    }
}

/// A reason code as a label value: snake_case up to 64 characters, else `other`.
pub fn code_label(code: &str) -> String {
    let ok = (1..=64).contains(&code.len())
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        code.into()
    } else {
        "other".into()
    }
}

/// Escapes a label value: backslash, double quote and line feed (format 0.0.4).
pub fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes `# HELP` text: backslash and line feed.
fn escape_help(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The text being written.
struct Exposition {
    text: String,
}

impl Exposition {
    fn with_capacity(n: usize) -> Self {
        Exposition { text: String::with_capacity(n) }
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.text.push_str("# HELP ");
        self.text.push_str(name);
        self.text.push(' ');
        escape_help(help, &mut self.text);
        let _ = writeln!(self.text, "\n# TYPE {name} {kind}");
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_label_value(v, &mut self.text);
                self.text.push('"');
            }
            self.text.push('}');
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    fn sample_i64(&mut self, name: &str, labels: &[(&str, &str)], value: i64) {
        self.labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    fn family_samples<'a>(
        &mut self,
        name: &str,
        label: &str,
        values: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        for (v, n) in values {
            self.sample(name, &[(label, v)], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::messages::{Applied, FileCounts, LastError, VersionRef};

    type Series = BTreeMap<(String, BTreeMap<String, String>), f64>;

    /// A strict reader of the text format 0.0.4: every line is a HELP, a TYPE or a
    /// sample of a declared family; label values use only the three escapes; no series
    /// twice. Panics with the line on anything else.
    fn parse(text: &str) -> Series {
        let mut types = BTreeMap::new();
        let mut series = Series::new();
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert!(["gauge", "counter"].contains(&kind), "{line}");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice: {line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                assert!(!line.contains('\r'), "{line}");
                continue;
            }
            let name_end = line.find(['{', ' ']).expect(line);
            let name = &line[..name_end];
            assert!(
                !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && !name.starts_with(|c: char| c.is_ascii_digit()),
                "metric name in {line:?}"
            );
            assert!(types.contains_key(name), "sample before its TYPE: {line:?}");
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(r) = rest.strip_prefix('{') {
                rest = r;
                loop {
                    let eq = rest.find("=\"").expect(line);
                    let key = &rest[..eq];
                    assert!(
                        !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line:?}"
                    );
                    let mut value = String::new();
                    let mut chars = rest[eq + 2..].char_indices();
                    let end = loop {
                        match chars.next().expect(line) {
                            (_, '\\') => match chars.next().expect(line).1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                c => panic!("bad escape \\{c} in {line:?}"),
                            },
                            (i, '"') => break eq + 2 + i + 1,
                            (_, c) => value.push(c),
                        }
                    };
                    assert!(labels.insert(key.to_string(), value).is_none(), "label twice: {line:?}");
                    rest = &rest[end..];
                    if let Some(r) = rest.strip_prefix(',') {
                        rest = r;
                    } else {
                        rest = rest.strip_prefix('}').expect(line);
                        break;
                    }
                }
            }
            let value: f64 = rest.strip_prefix(' ').expect(line).parse().expect(line);
            assert!(series.insert((name.to_string(), labels), value).is_none(), "series twice: {line:?}");
        }
        series
    }

    fn get(series: &Series, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        series.get(&(name.to_string(), labels)).copied()
    }

    fn report(
        state: DeviceState,
        desired: Option<(&str, &str)>,
        applied: Option<(&str, &str)>,
    ) -> StatusReport {
        StatusReport {
            device: "d".into(),
            fleet: "acme".into(),
            agent_version: "0.1.0".into(),
            state,
            desired: desired.map(|(digest, commit)| VersionRef {
                version: 2,
                digest: digest.into(),
                commit: commit.into(),
            }),
            applied: applied.map(|(digest, commit)| Applied {
                version: 1,
                digest: digest.into(),
                commit: commit.into(),
                at: 5,
            }),
            containers: Vec::new(),
            files: FileCounts::default(),
            last_error: None,
            waiting: None,
            agent_update: None,
            timestamp: 1_700_000_000,
        }
    }

    const INFO: ExporterInfo<'static> = ExporterInfo { version: "0.1.0", broker_connected: true };

    #[test]
    fn the_retained_rollout_state_is_shown_and_a_hostile_one_never_breaks_the_exposition() {
        let mut view = FleetView::new("acme", "fleet", BTreeMap::new(), true);
        let series = parse(&view.render(&INFO));
        assert!(get(&series, "fleet_rollout_wave", &[]).is_none(), "no rollout, no rollout metrics");
        let state = serde_json::json!({"fleet": "acme", "commit": "a".repeat(40), "state": "halted", "wave": 1,
        "reason": "max_failed: 3", "started_at": 1, "updated_at": 2, "halt": {"min_reporting": 1},
        "waves": [
            {"name": "canary", "devices": 2, "announced": 2, "succeeded": 2, "failed": 0, "pending": 0},
            {"name": "rest", "devices": 8, "announced": 8, "succeeded": 4, "failed": 3, "pending": 1},
        ]});
        view.apply_rollout(state.to_string().as_bytes());
        let series = parse(&view.render(&INFO));
        assert_eq!(
            get(&series, "fleet_rollout_info", &[("commit", &"a".repeat(40)), ("state", "halted")]),
            Some(1.0)
        );
        assert_eq!(get(&series, "fleet_rollout_wave", &[]), Some(2.0));
        assert_eq!(
            get(&series, "fleet_rollout_wave_devices", &[("wave", "rest"), ("result", "failed")]),
            Some(3.0)
        );
        assert_eq!(
            get(&series, "fleet_rollout_wave_devices", &[("wave", "canary"), ("result", "succeeded")]),
            Some(2.0)
        );

        // Names that are no label value, a name twice, a hundred waves, garbage: narrowed,
        // deduplicated, capped; the exposition still parses (parse() panics otherwise).
        let waves: Vec<_> = ["a\"b\n", "rest", "rest"]
            .iter()
            .map(|n| n.to_string())
            .chain((0..100).map(|i| format!("w{i}")))
            .map(|name| serde_json::json!({"name": name, "devices": 1, "announced": 0, "succeeded": 0, "failed": 0, "pending": 1}))
            .collect();
        let hostile = serde_json::json!({"commit": "<script>", "state": "running", "wave": 0,
            "started_at": 1, "updated_at": 2, "halt": {"min_reporting": 1}, "waves": waves});
        view.apply_rollout(hostile.to_string().as_bytes());
        let series = parse(&view.render(&INFO));
        assert_eq!(
            get(&series, "fleet_rollout_info", &[("commit", "invalid"), ("state", "running")]),
            Some(1.0)
        );
        assert!(get(&series, "fleet_rollout_wave_devices", &[("wave", "invalid"), ("result", "pending")])
            .is_some());
        let shown = series
            .keys()
            .filter(|(name, l)| name == "fleet_rollout_wave_devices" && l["result"] == "pending")
            .count();
        assert_eq!(shown, MAX_WAVES - 1, "32 waves kept, the second `rest` dropped");
        view.apply_rollout(b"{not json");
        let series = parse(&view.render(&INFO));
        assert_eq!(
            get(&series, "fleet_rollout_info", &[("commit", "invalid"), ("state", "invalid")]),
            Some(1.0)
        );
        view.apply_rollout(b"");
        assert!(
            get(
                &parse(&view.render(&INFO)),
                "fleet_rollout_info",
                &[("commit", "invalid"), ("state", "invalid")]
            )
            .is_none(),
            "deleted"
        );
    }

    #[test]
    fn counts_devices_by_state_online_and_commit_and_the_outdated_ones() {
        let (c1, c2) =
            ("1111111111111111111111111111111111111111", "2222222222222222222222222222222222222222");
        let wanted: BTreeMap<String, Wanted> = ["gw-1", "gw-2", "gw-3"]
            .into_iter()
            .map(|id| (id.to_string(), Wanted { digest: "b".repeat(64), commit: c2.into() }))
            .collect();
        let mut view = FleetView::new("acme", "fleet", wanted, true);
        let converged =
            report(DeviceState::Converged, Some((&"b".repeat(64), c2)), Some((&"b".repeat(64), c2)));
        view.apply(Source::Status, "gw-1", &converged.to_json()).expect("a report");
        view.apply(Source::Online, "gw-1", b"true").expect("a flag");
        let mut failed =
            report(DeviceState::Failed, Some((&"b".repeat(64), c2)), Some((&"a".repeat(64), c1)));
        failed.last_error = Some(LastError { code: "health_timeout".into(), message: "web".into(), at: 9 });
        view.apply(Source::Status, "gw-2", &failed.to_json()).expect("a report");
        view.apply(Source::Online, "gw-2", b"false").expect("a flag");
        // A device the index does not know still counts, with what it says it wants.
        view.apply(Source::Status, "stray", &report(DeviceState::Idle, None, None).to_json())
            .expect("a report");

        let s = parse(&view.render(&INFO));
        assert_eq!(get(&s, "fleet_devices", &[]), Some(4.0));
        assert_eq!(get(&s, "fleet_devices_by_state", &[("state", "converged")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_state", &[("state", "failed")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_state", &[("state", "idle")]), Some(1.0));
        assert_eq!(
            get(&s, "fleet_devices_by_state", &[("state", "unknown")]),
            Some(1.0),
            "gw-3 never reported"
        );
        assert_eq!(
            get(&s, "fleet_devices_by_state", &[("state", "rolled_back")]),
            Some(0.0),
            "every state, even at 0"
        );
        assert_eq!(get(&s, "fleet_devices_by_online", &[("online", "true")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_online", &[("online", "false")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_online", &[("online", "unknown")]), Some(2.0));
        assert_eq!(get(&s, "fleet_devices_by_desired_commit", &[("commit", c2)]), Some(3.0));
        assert_eq!(get(&s, "fleet_devices_by_applied_commit", &[("commit", c2)]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_applied_commit", &[("commit", c1)]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_applied_commit", &[("commit", "none")]), Some(2.0));
        assert_eq!(get(&s, "fleet_devices_outdated", &[]), Some(2.0), "gw-2 runs c1, gw-3 nothing");
        assert_eq!(get(&s, "fleet_devices_in_trouble_by_error", &[("code", "health_timeout")]), Some(1.0));
        assert_eq!(get(&s, "fleet_device_state", &[("device", "gw-2"), ("state", "failed")]), Some(1.0));
        assert_eq!(get(&s, "fleet_device_online", &[("device", "gw-2")]), Some(0.0));
        assert_eq!(get(&s, "fleet_device_online", &[("device", "gw-3")]), None, "unknown is absent");
        assert_eq!(get(&s, "fleet_device_last_report_timestamp_seconds", &[("device", "gw-1")]), Some(1.7e9));
        assert_eq!(get(&s, "fleet_exporter_broker_connected", &[]), Some(1.0));
        assert_eq!(
            get(
                &s,
                "fleet_exporter_build_info",
                &[("version", "0.1.0"), ("fleet", "acme"), ("prefix", "fleet")]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn label_values_escape_backslash_quote_and_line_feed() {
        let mut out = String::new();
        escape_label_value("a\\b\"c\nd\te", &mut out);
        assert_eq!(out, "a\\\\b\\\"c\\nd\te");
    }

    #[test]
    fn hostile_payloads_and_names_never_break_the_exposition() {
        let mut view = FleetView::new("acme", "fleet", BTreeMap::new(), true);
        // Garbage, a huge payload, JSON of the wrong shape, invalid UTF-8.
        assert!(matches!(view.apply(Source::Status, "g1", b"{not json"), Err(Rejected::NotAReport(_))));
        let huge = vec![b' '; MAX_STATUS_LEN + 1];
        assert_eq!(view.apply(Source::Status, "g2", &huge), Err(Rejected::TooLarge(MAX_STATUS_LEN + 1)));
        assert!(view.apply(Source::Status, "g3", br#"{"state":"converged"}"#).is_err());
        assert!(view.apply(Source::Status, "g4", b"\xff\xfe\x00").is_err());
        assert_eq!(view.apply(Source::Online, "g5", b"maybe\n"), Err(Rejected::NotABool));
        // A name with quotes, backslashes and line feeds (the topic parser refuses such
        // ids; the rendering must not depend on it), and report fields that try to
        // smuggle label text.
        let weird = "we\"ird\\na\nme}";
        let mut r = report(DeviceState::Failed, Some(("x", "c0ffee\"} 1\nevil 2")), Some(("y", "ABCDEF12")));
        r.last_error = Some(LastError { code: "x\"y\nz".into(), message: "\"}\n".into(), at: 1 });
        view.apply(Source::Status, weird, &r.to_json()).expect("a valid report");

        let text = view.render(&ExporterInfo { version: "0.1.0\"\n", broker_connected: false });
        assert!(text.contains(r#"device="we\"ird\\na\nme}""#), "{text}");
        let s = parse(&text);
        assert_eq!(
            get(&s, "fleet_devices_by_state", &[("state", "unknown")]),
            Some(4.0),
            "g1-g4 known, unknown"
        );
        assert_eq!(get(&s, "fleet_devices_by_state", &[("state", "failed")]), Some(1.0));
        assert_eq!(get(&s, "fleet_exporter_invalid_messages_total", &[("topic", "status")]), Some(4.0));
        assert_eq!(get(&s, "fleet_exporter_invalid_messages_total", &[("topic", "online")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_desired_commit", &[("commit", "invalid")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_by_applied_commit", &[("commit", "abcdef12")]), Some(1.0));
        assert_eq!(get(&s, "fleet_devices_in_trouble_by_error", &[("code", "other")]), Some(1.0));
        assert_eq!(get(&s, "fleet_device_state", &[("device", weird), ("state", "failed")]), Some(1.0));
        assert_eq!(get(&s, "fleet_exporter_broker_connected", &[]), Some(0.0));
        assert!(!s.keys().any(|(name, _)| name == "evil"), "no smuggled sample");
    }

    #[test]
    fn deleted_retained_messages_and_a_resync_forget_what_the_broker_no_longer_holds() {
        let mut view = FleetView::new("acme", "fleet", BTreeMap::new(), true);
        let r = report(DeviceState::Converged, None, None).to_json();
        view.apply(Source::Status, "a", &r).expect("report");
        view.apply(Source::Status, "b", &r).expect("report");
        view.apply(Source::Online, "b", b"true").expect("flag");
        view.apply(Source::Status, "c", b"garbage").expect_err("garbage");
        assert_eq!(view.len(), 3);
        // A deleted retained status (empty payload) forgets the device.
        view.apply(Source::Status, "a", b"").expect("a deletion");
        assert_eq!(view.len(), 2);
        view.apply(Source::Status, "c", b"").expect("a deletion");
        assert_eq!(view.len(), 1);
        // After a reconnect, only what the broker sends again remains.
        view.begin_resync();
        view.apply(Source::Online, "b", b"false").expect("flag");
        view.finish_resync();
        let s = parse(&view.render(&INFO));
        assert_eq!(get(&s, "fleet_devices", &[]), Some(1.0));
        assert_eq!(
            get(&s, "fleet_devices_by_state", &[("state", "unknown")]),
            Some(1.0),
            "its status is gone"
        );
        assert_eq!(get(&s, "fleet_device_online", &[("device", "b")]), Some(0.0));
    }

    #[test]
    fn without_per_device_metrics_the_series_do_not_grow_with_the_fleet() {
        let commit = "3".repeat(40);
        let r = report(DeviceState::Converged, Some(("d", &commit)), Some(("d", &commit))).to_json();
        let series = |devices: usize, per_device: bool| {
            let mut view = FleetView::new("acme", "fleet", BTreeMap::new(), per_device);
            for i in 0..devices {
                view.apply(Source::Status, &format!("dev-{i:05}"), &r).expect("report");
                view.apply(Source::Online, &format!("dev-{i:05}"), b"true").expect("flag");
            }
            parse(&view.render(&INFO)).len()
        };
        assert_eq!(series(10, false), series(10_000, false));
        assert_eq!(series(10_000, true) - series(10_000, false), 3 * 10_000);
    }

    #[test]
    fn the_grafana_dashboard_queries_only_metrics_the_exporter_renders() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grafana/fleet.json");
        let dashboard = std::fs::read_to_string(path).expect("examples/grafana/fleet.json in the workspace");
        let mut view = FleetView::new("acme", "fleet", BTreeMap::new(), true);
        view.apply(Source::Status, "d", &report(DeviceState::Idle, None, None).to_json()).expect("report");
        let rendered = view.render(&INFO);
        let mut names: Vec<&str> = dashboard
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("fleet_"))
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() >= 10, "{names:?}");
        for name in names {
            assert!(
                rendered.contains(&format!("# TYPE {name} ")),
                "the dashboard queries {name}, not rendered"
            );
        }
    }
}
