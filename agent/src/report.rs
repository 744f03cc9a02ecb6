//! `fleet-agent status`: the device's state as the state directory records it,
//! without network, broker or engine.
//!
//! Reads only; never takes the state directory lock and never changes a file.

use std::collections::BTreeMap;

use fleet_spec::bundle::TrustState;
use fleet_spec::messages::StatusReport;
use serde::Serialize;

use crate::journal::{self, Journal, Recovery};
use crate::store::{AppliedRecord, Rejection, Store, StoreError};

#[derive(Debug, Serialize)]
pub struct LocalStatus {
    pub device: String,
    pub fleet: String,
    /// The last status report the agent made (as published on MQTT).
    pub status: Option<StatusReport>,
    /// The last good bundle.
    pub applied: Option<AppliedRecord>,
    pub trust: TrustState,
    pub managed_files: BTreeMap<String, String>,
    pub rejected: BTreeMap<String, Rejection>,
    /// What a start would do with the journal: `clean`, `resume_apply`, ...
    pub journal: &'static str,
    pub journal_records: usize,
}

pub fn collect(device: &str, fleet: &str, store: &Store) -> Result<LocalStatus, StoreError> {
    let records = Journal::read(&store.journal_path()).map_err(|e| match e {
        journal::JournalError::Io { path, source } => StoreError::Io { path, source },
    })?;
    let journal = match journal::decide(&records) {
        Recovery::Clean => "clean",
        Recovery::FinishCommit { .. } => "finish_commit",
        Recovery::ResumeApply { .. } => "resume_apply",
        Recovery::ResumeHealth { .. } => "resume_health",
        Recovery::RollBack { .. } => "roll_back",
        Recovery::FinishRollback { .. } => "finish_rollback",
    };
    Ok(LocalStatus {
        device: device.into(),
        fleet: fleet.into(),
        status: store.last_status()?,
        applied: store.applied()?,
        trust: store.trust()?,
        managed_files: store.managed()?,
        rejected: store.rejected()?,
        journal,
        journal_records: records.len(),
    })
}

/// `1764120042` as `2025-11-26T01:20:42Z (3 min ago)`: RFC 3339 UTC and the age at `now`.
/// The JSON view keeps Unix seconds.
pub fn human_time(at: i64, now: i64) -> String {
    let ago = now - at;
    let age = match ago {
        i64::MIN..=-1 => format!("{} in the future", span(-ago)),
        0..=9 => "just now".to_string(),
        _ => format!("{} ago", span(ago)),
    };
    format!("{} ({age})", rfc3339(at))
}

/// `1764120042` as `2025-11-26T01:20:42Z`.
pub fn rfc3339(at: i64) -> String {
    let days = at.div_euclid(86_400);
    let secs = at.rem_euclid(86_400);
    // H. Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// A duration in its largest whole unit: `42 s`, `3 min`, `5 h`, `12 days`.
fn span(secs: i64) -> String {
    match secs {
        ..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// The human view (times as RFC 3339 UTC with their age at `now`).
pub fn render(s: &LocalStatus, now: i64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = s.status.as_ref().map_or("unknown (the agent has not run yet)", |r| r.state.as_str());
    let _ = writeln!(out, "device    {} (fleet {})", s.device, s.fleet);
    let _ = writeln!(out, "state     {state}");
    if let Some(r) = &s.status {
        let _ = writeln!(out, "reported  {}", human_time(r.timestamp, now));
    }
    match &s.applied {
        Some(a) => {
            let _ = writeln!(
                out,
                "applied   version {} commit {} digest {} at {}",
                a.version,
                a.commit,
                a.digest,
                human_time(a.at, now)
            );
        }
        None => {
            let _ = writeln!(out, "applied   nothing yet");
        }
    }
    if let Some(d) = s.status.as_ref().and_then(|r| r.desired.as_ref()) {
        let _ = writeln!(out, "desired   version {} commit {} digest {}", d.version, d.commit, d.digest);
    }
    if let Some(w) = s.status.as_ref().and_then(|r| r.waiting.as_ref()) {
        let reason = match w.reason {
            fleet_spec::messages::WaitReason::Window => "outside its maintenance window",
            fleet_spec::messages::WaitReason::Lock => "an app holds the update lock",
        };
        let until = w.until.map_or_else(|| "when the lock is released".to_string(), |u| human_time(u, now));
        let _ = writeln!(out, "waiting   {reason} since {}; applies {until}", human_time(w.since, now));
    }
    if let Some(e) = s.status.as_ref().and_then(|r| r.last_error.as_ref()) {
        let _ = writeln!(out, "error     {}: {} (at {})", e.code, e.message, human_time(e.at, now));
    }
    if let Some(r) = &s.status {
        for c in &r.containers {
            let run = if c.running { "running" } else { "stopped" };
            let _ = writeln!(
                out,
                "container {} {} {run} health={} restarts={}",
                c.name, c.image, c.health, c.restarts
            );
        }
    }
    let _ = writeln!(out, "files     {} managed", s.managed_files.len());
    let _ = writeln!(
        out,
        "trust     last version {} last known time {}",
        s.trust.last_version.map_or("-".to_string(), |v| v.to_string()),
        if s.trust.last_known_time > 0 { human_time(s.trust.last_known_time, now) } else { "-".into() }
    );
    for (digest, r) in &s.rejected {
        let _ = writeln!(out, "rejected  {digest} {}: {} (at {})", r.code, r.reason, human_time(r.at, now));
    }
    let _ = writeln!(out, "journal   {} ({} record(s))", s.journal, s.journal_records);
    out
}

#[cfg(test)]
mod tests {
    use super::human_time;

    #[test]
    fn times_are_rfc3339_utc_with_their_age() {
        assert_eq!(human_time(0, 0), "1970-01-01T00:00:00Z (just now)");
        assert_eq!(human_time(1_764_120_042, 1_764_120_042 + 180), "2025-11-26T01:20:42Z (3 min ago)");
        assert_eq!(human_time(951_782_400, 951_782_400 + 7200), "2000-02-29T00:00:00Z (2 h ago)");
        assert_eq!(human_time(100, 40), "1970-01-01T00:01:40Z (1 min in the future)");
        assert_eq!(human_time(0, 3 * 86_400 + 5), "1970-01-01T00:00:00Z (3 days ago)");
    }

    #[test]
    fn a_waiting_device_says_why_and_when_it_applies() {
        let report = |waiting: &str| {
            let json = format!(
                r#"{{"device":"gw-1","fleet":"acme","agent_version":"0.1.0","state":"waiting","desired":null,
                "applied":null,"containers":[],"files":{{"managed":0,"drift_repaired":0}},"last_error":null,
                "waiting":{waiting},"timestamp":1000}}"#
            );
            fleet_spec::messages::StatusReport::from_json(json.as_bytes()).expect("a report")
        };
        let status = |r| super::LocalStatus {
            device: "gw-1".into(),
            fleet: "acme".into(),
            status: Some(r),
            applied: None,
            trust: fleet_spec::bundle::TrustState::default(),
            managed_files: Default::default(),
            rejected: Default::default(),
            journal: "clean",
            journal_records: 0,
        };
        let window = super::render(
            &status(report(r#"{"reason":"window","since":900,"until":4600,"digest":"d"}"#)),
            1000,
        );
        assert!(
            window.contains("waiting   outside its maintenance window since 1970-01-01T00:15:00Z (1 min ago); applies 1970-01-01T01:16:40Z (1 h in the future)"),
            "{window}"
        );
        let lock = super::render(
            &status(report(r#"{"reason":"lock","since":990,"until":null,"digest":"d"}"#)),
            1000,
        );
        assert!(
            lock.contains("an app holds the update lock since")
                && lock.contains("applies when the lock is released"),
            "{lock}"
        );
    }
}
