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

/// The human view.
pub fn render(s: &LocalStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = s.status.as_ref().map_or("unknown (the agent has not run yet)", |r| r.state.as_str());
    let _ = writeln!(out, "device    {} (fleet {})", s.device, s.fleet);
    let _ = writeln!(out, "state     {state}");
    match &s.applied {
        Some(a) => {
            let _ = writeln!(
                out,
                "applied   version {} commit {} digest {} at {}",
                a.version, a.commit, a.digest, a.at
            );
        }
        None => {
            let _ = writeln!(out, "applied   nothing yet");
        }
    }
    if let Some(d) = s.status.as_ref().and_then(|r| r.desired.as_ref()) {
        let _ = writeln!(out, "desired   version {} commit {} digest {}", d.version, d.commit, d.digest);
    }
    if let Some(e) = s.status.as_ref().and_then(|r| r.last_error.as_ref()) {
        let _ = writeln!(out, "error     {}: {} (at {})", e.code, e.message, e.at);
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
        s.trust.last_known_time
    );
    for (digest, r) in &s.rejected {
        let _ = writeln!(out, "rejected  {digest} {}: {}", r.code, r.reason);
    }
    let _ = writeln!(out, "journal   {} ({} record(s))", s.journal, s.journal_records);
    out
}
