//! The driver: carries the core's decisions out through the adapters, one bundle at a
//! time, writing the journal around every effect.
//!
//! - [`Agent::apply_bundle`]: verify → preflight (paths, images) → stage → apply →
//!   await health → commit, or roll back to the last good bundle.
//! - [`Agent::recover`]: on start, reads the journal and resumes or rolls back.
//! - [`Agent::reconcile`]: repairs drift of the committed state (timer, engine events).
//! - [`Agent::run_due_healthchecks`]: runs the healthchecks an engine does not run by
//!   itself (podman without systemd; see [`Engine::run_healthcheck`]), which the health
//!   waits also do while they wait.
//!
//! It owns the state machine ([`crate::core::Machine`]) and reports every change as a
//! status report or event on its [`Reports`] channel. It never decides what the
//! device should hold (that is the bundle) and never trusts a bundle that did not pass
//! `fleet_spec::bundle::verify`, except the ones it stored itself after verifying them,
//! which it still re-checks for signature and digest before use.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use fleet_spec::bundle::{self, Expectation, Manifest, TrustState};
use fleet_spec::messages::{
    Announcement, ContainerStatus, DeviceState, DriftKind, Event, EventKind, FileCounts, LastError,
    StatusReport, VersionRef, WaitReason, Waiting,
};
use fleet_spec::model::{ContainerSpec, DependencyCondition, DesiredState, PullPolicy};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::Config;
use crate::core::health::{self, Verdict};
use crate::core::plan::{self, EngineView, Need};
use crate::core::{ApplyState, Command, Machine};
use crate::engine::{Engine, EngineError, Health, ObservedContainer};
use crate::files::{self, FileError};
use crate::journal::{self, Journal, Record, Recovery, Step};
use crate::store::{AppliedRecord, Rejection, Store, StoreError};

mod apply;
mod artifacts;
mod converge;
mod gate;
mod healthy;
mod images;
mod reconcile;
mod recover;
mod secrets;
mod update;

use converge::Mode;
pub use gate::{retry_after, LOCK_POLL, WINDOW_RECHECK};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version stamp: a marker, then the version, NUL-padded. A release pipeline (and
/// the self-update tests) may write another version into a built binary
/// (`fleet-agent-stamp`-style: find the marker, overwrite the bytes after it) without
/// rebuilding it; [`version`] reads what is there at run time.
#[used]
static VERSION_STAMP: [u8; 64] = stamp();

/// The marker that starts the stamp (16 bytes, unique in the binary).
pub const STAMP_MARKER: &[u8; 16] = b"\0FLEET-AGENT-VS:";

const fn stamp() -> [u8; 64] {
    let mut out = [0u8; 64];
    let mut i = 0;
    while i < STAMP_MARKER.len() {
        out[i] = STAMP_MARKER[i];
        i += 1;
    }
    let v = AGENT_VERSION.as_bytes();
    let mut j = 0;
    while j < v.len() && 16 + j < 64 {
        out[16 + j] = v[j];
        j += 1;
    }
    out
}

/// This binary's version: its stamp (the crate's version unless re-stamped).
pub fn version() -> &'static str {
    // Read at run time: the compiler may not fold the stamp into the constant it
    // started as.
    let stamp: &'static [u8; 64] = std::hint::black_box(&VERSION_STAMP);
    let v = &stamp[16..];
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).ok().filter(|s| !s.is_empty()).unwrap_or(AGENT_VERSION)
}

/// How long every container must stay running (and healthy) before an update counts
/// as healthy (capped at half the health timeout).
pub const HEALTH_SETTLE: Duration = Duration::from_secs(5);

/// When asking the engine to run a healthcheck failed, ask again after this long.
const HEALTHCHECK_RETRY: Duration = Duration::from_secs(10);

/// What the agent tells the world.
// A few hundred bytes per message on a channel that holds a handful: boxing the status
// would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Report {
    Status(StatusReport),
    Event(Event),
}

/// The sending side of the report channel (`None`: reports are dropped).
pub type Reports = Option<UnboundedSender<Report>>;

/// How an offered bundle ended. Serialized for `fleet-agent apply`'s answer from a
/// running agent (`sideload`): `{"outcome": "committed", "version": 7}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Applied and healthy.
    Committed { version: u64 },
    /// Already the applied bundle.
    AlreadyApplied,
    /// Refused before anything changed; never tried again (unless `retry`).
    Rejected { code: String, reason: String },
    /// Could not be prepared for a reason that may pass (engine down, pull failed,
    /// download failed); nothing changed; tried again later.
    Deferred { code: String, reason: String },
    /// Applied, failed, and the last good state was restored.
    RolledBack { code: String, reason: String },
    /// Applied, failed, and restoring the last good state failed too (retried).
    RollbackIncomplete { code: String, reason: String },
    /// Verified, and held back by its maintenance window or an update lock; applied
    /// when `until` (Unix seconds, if known) comes, or the lock goes. Nothing changed.
    Waiting { reason: WaitReason, until: Option<i64> },
}

impl Outcome {
    /// The outcome's name, as `apply --json` and the sideload answer spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Committed { .. } => "committed",
            Outcome::AlreadyApplied => "already_applied",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Deferred { .. } => "deferred",
            Outcome::RolledBack { .. } => "rolled_back",
            Outcome::RollbackIncomplete { .. } => "rollback_incomplete",
            Outcome::Waiting { .. } => "waiting",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Committed { .. } | Outcome::AlreadyApplied => None,
            Outcome::Waiting { reason: WaitReason::Window, .. } => Some("outside the maintenance window"),
            Outcome::Waiting { reason: WaitReason::Lock, .. } => Some("an app holds the update lock"),
            Outcome::Rejected { reason, .. }
            | Outcome::Deferred { reason, .. }
            | Outcome::RolledBack { reason, .. }
            | Outcome::RollbackIncomplete { reason, .. } => Some(reason),
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Committed { .. } | Outcome::AlreadyApplied => None,
            Outcome::Waiting { reason: WaitReason::Window, .. } => Some("window"),
            Outcome::Waiting { reason: WaitReason::Lock, .. } => Some("lock"),
            Outcome::Rejected { code, .. }
            | Outcome::Deferred { code, .. }
            | Outcome::RolledBack { code, .. }
            | Outcome::RollbackIncomplete { code, .. } => Some(code),
        }
    }
}

/// Refusals caused by the device's own config: its roots, its engine, its policy; and, from verification, what `agent.toml` says about trust and
/// identity (a key not yet trusted, a threshold, the device or fleet id, the size
/// limits). Remembered with a fingerprint of that config, and judged again once it
/// changes: a device set up with the wrong key or id recovers when the config is fixed.
/// Every other rejection is about the bytes alone and stays (see `fleet-agent forget`).
pub const CONFIG_CAUSED: [&str; 9] = [
    "path_not_allowed",
    "engine_disabled",
    "policy_denied",
    "unknown_key",
    "threshold_not_met",
    "wrong_fleet",
    "wrong_device",
    "payload_too_large",
    "decompression_bomb",
];

/// Whether to fetch an announced bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Fetch,
    Skip(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Disallowed(#[from] crate::core::Disallowed),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("stored bundle {digest} cannot be used: {reason}")]
    StoredBundle { digest: String, reason: String },
}

impl AgentError {
    /// Reason code for reports.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Engine(EngineError::Unreachable { .. }) => "engine_unavailable",
            AgentError::Engine(EngineError::Pull { .. }) => "pull_failed",
            AgentError::Engine(_) => "engine_error",
            AgentError::File(e) => e.code(),
            AgentError::Plan(_) => "dependency_cycle",
            AgentError::StoredBundle { .. } => "stored_bundle_invalid",
            AgentError::Store(_) | AgentError::Journal(_) => "state_dir_error",
            AgentError::Disallowed(_) => "internal_error",
        }
    }
}

/// The applied (last good) bundle, loaded.
#[derive(Debug, Clone)]
struct Current {
    record: AppliedRecord,
    state: DesiredState,
}

/// The healthchecks the agent runs because the engine does not (see
/// [`Engine::run_healthcheck`]): per running container with a healthcheck, when to ask
/// the engine next.
#[derive(Debug, Default)]
struct Healthchecks {
    /// The engine runs them itself: nothing to do.
    by_engine: bool,
    next: BTreeMap<String, Instant>,
}

/// A rollback still to finish (its first attempt failed).
#[derive(Debug, Clone)]
struct PendingRollback {
    from: String,
    code: String,
    reason: String,
}

pub struct Agent<E: Engine> {
    cfg: Config,
    engine: Rc<E>,
    clock: Rc<dyn Clock>,
    store: Store,
    journal: Journal,
    machine: Machine,
    current: Option<Current>,
    desired: Option<VersionRef>,
    last_error: Option<LastError>,
    file_drift_repaired: u64,
    engine_down: bool,
    containers: Vec<ContainerStatus>,
    managed: BTreeMap<String, String>,
    pending_rollback: Option<PendingRollback>,
    /// Why the last good bundle on record cannot be read (its stored copy is missing or
    /// damaged). While set, nothing is ever converged to "empty" in its place: the device
    /// keeps what it runs and reports `degraded`.
    last_good_unreadable: Option<String>,
    /// The digest of a download in flight beside the main loop that is the device's
    /// state (status `downloading`; see `run`).
    downloading: Option<String>,
    /// The verified bundle held back by its schedule (state `waiting`), and why.
    held: Option<gate::Held>,
    reports: Reports,
    last_saved_status: Option<StatusReport>,
    healthchecks: Healthchecks,
    /// Self-update: what the launcher told this process, and the declared release's fate.
    update: update::SelfUpdate,
    /// Test hook: the process dies right after the journal's `Begin` (case 6).
    #[cfg(test)]
    crash_after_begin: bool,
}

impl<E: Engine> Agent<E> {
    /// Opens the state directory (creating it). The caller holds the state dir lock.
    pub fn new(
        cfg: Config,
        engine: Rc<E>,
        clock: Rc<dyn Clock>,
        reports: Reports,
    ) -> Result<Self, AgentError> {
        let store = Store::new(&cfg.state_dir);
        store.create()?;
        let journal = Journal::new(store.journal_path());
        let managed = store.managed()?;
        let last_saved_status = store.last_status()?;
        // Refusals of another config are forgotten: under this one they are judged
        // again, and `status` no longer lists them with the old config's reason.
        let current = config_fingerprint(&cfg);
        let stale = store.retain_rejected(|r| r.config.as_ref().is_none_or(|c| *c == current))?;
        if stale > 0 {
            tracing::info!(
                forgotten = stale,
                "the config changed: bundles it refused before will be judged again"
            );
        }
        Ok(Agent {
            cfg,
            engine,
            clock,
            store,
            journal,
            machine: Machine::default(),
            current: None,
            desired: None,
            last_error: None,
            file_drift_repaired: 0,
            engine_down: false,
            containers: Vec::new(),
            managed,
            pending_rollback: None,
            last_good_unreadable: None,
            downloading: None,
            held: None,
            reports,
            last_saved_status,
            healthchecks: Healthchecks::default(),
            update: update::SelfUpdate::from_env(),
            #[cfg(test)]
            crash_after_begin: false,
        })
    }

    pub fn state(&self) -> ApplyState {
        self.machine.state()
    }

    /// Test hook: the next apply "dies" right after its journal `Begin` record.
    #[cfg(test)]
    pub(crate) fn crash_after_begin(&mut self) {
        self.crash_after_begin = true;
    }

    /// Test hook: see `Journal::crash_at`.
    #[cfg(test)]
    pub(crate) fn journal_mut(&mut self) -> &mut Journal {
        &mut self.journal
    }

    /// The agent's clock, Unix seconds.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Digest of the applied (last good) bundle.
    pub fn applied_digest(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.record.digest.as_str())
    }

    pub(super) fn on(&mut self, command: Command) -> Result<ApplyState, AgentError> {
        let from = self.machine.state();
        let to = self.machine.on(command)?;
        if to != ApplyState::Waiting {
            self.held = None;
        }
        tracing::debug!(%from, %to, %command, "apply state");
        self.publish_status();
        Ok(to)
    }

    // ---- reports --------------------------------------------------------------------

    /// The status report as of now.
    pub fn status_report(&self) -> StatusReport {
        let rest = self.machine.state().is_rest();
        let state = if rest && (self.engine_down || self.last_good_unreadable.is_some()) {
            DeviceState::Degraded
        } else if rest && self.downloading.is_some() {
            DeviceState::Downloading
        } else {
            self.machine.state().device_state()
        };
        StatusReport {
            device: self.cfg.device.clone(),
            fleet: self.cfg.fleet.clone(),
            agent_version: version().to_string(),
            state,
            desired: self.desired.clone(),
            applied: self.current.as_ref().map(|c| c.record.to_status()),
            containers: self.containers.clone(),
            files: FileCounts {
                managed: self.managed.len() as u64,
                drift_repaired: self.file_drift_repaired,
            },
            last_error: self.last_error.clone(),
            waiting: self.held.as_ref().filter(|_| state == DeviceState::Waiting).map(|h| h.waiting.clone()),
            agent_update: self.agent_update_status(),
            timestamp: self.clock.now(),
        }
    }

    fn publish_status(&mut self) {
        let report = self.status_report();
        let changed = self.last_saved_status.as_ref().is_none_or(|last| !last.same_content(&report));
        if changed {
            if let Err(e) = self.store.save_status(&report) {
                tracing::warn!("cannot save status.json: {e}");
            }
            self.last_saved_status = Some(report.clone());
        }
        if let Some(tx) = &self.reports {
            let _ = tx.send(Report::Status(report));
        }
    }

    fn event(&self, kind: EventKind) {
        log_event(&kind);
        if let Some(tx) = &self.reports {
            let _ =
                tx.send(Report::Event(Event { device: self.cfg.device.clone(), at: self.clock.now(), kind }));
        }
    }

    fn set_error(&mut self, code: &str, message: &str) {
        self.last_error =
            Some(LastError { code: code.into(), message: message.into(), at: self.clock.now() });
    }

    /// Records what the fleet wants this device to run (from an announcement).
    pub fn set_desired(&mut self, desired: VersionRef) {
        if self.desired.as_ref() != Some(&desired) {
            self.desired = Some(desired);
            self.publish_status();
        }
    }

    // ---- offers ---------------------------------------------------------------------

    /// Decides whether an announced bundle is worth fetching. Nothing unsigned in the
    /// announcement (version, size, URLs) is judged: only whether it is addressed to this
    /// device, already applied, or bytes already refused (keyed by their own hash).
    pub fn offer(&self, ann: &Announcement) -> Result<Offer, AgentError> {
        if ann.fleet != self.cfg.fleet || ann.device != self.cfg.device {
            return Ok(Offer::Skip("announcement is for another device"));
        }
        if self.applied_digest() == Some(ann.digest.as_str()) {
            return Ok(Offer::Skip("already applied"));
        }
        if !self.machine.state().is_rest() {
            return Ok(Offer::Skip("busy"));
        }
        if self.rejection(&ann.digest)?.is_some() {
            return Ok(Offer::Skip("rejected before"));
        }
        Ok(Offer::Fetch)
    }

    /// Why bytes with this digest were refused before, if they were. Entries an older
    /// agent wrote for transport failures (which say nothing about the bytes) are not
    /// rejections.
    fn rejection(&self, digest: &str) -> Result<Option<Rejection>, AgentError> {
        const TRANSPORT: [&str; 3] = ["fetch_failed", "download_digest", "too_large"];
        let all = self.store.rejected()?;
        let current = self.config_fingerprint();
        Ok(all
            .get(digest)
            .filter(|r| !TRANSPORT.contains(&r.code.as_str()))
            // A refusal of the device's own config holds only under that config.
            .filter(|r| r.config.as_ref().is_none_or(|c| *c == current))
            .cloned())
    }

    fn config_fingerprint(&self) -> String {
        config_fingerprint(&self.cfg)
    }

    /// A download of `digest` starts (or, `None`, ends) beside the main loop.
    pub fn set_downloading(&mut self, digest: Option<&str>) {
        if self.downloading.as_deref() != digest {
            self.downloading = digest.map(str::to_string);
            self.publish_status();
        }
    }

    /// A fetch failed: a transport failure says nothing about the bundle, so nothing is
    /// rejected and nothing changes; the caller tries again later (see `fetch`).
    pub fn fetch_failed(&mut self, digest: &str, code: &str, reason: &str) -> Outcome {
        tracing::warn!(digest, code, "fetch failed: {reason}");
        self.set_error(code, reason);
        self.downloading = None;
        self.publish_status();
        Outcome::Deferred { code: code.into(), reason: reason.into() }
    }

    fn reject(&mut self, digest: &str, code: &str, reason: &str, version: Option<u64>) {
        let config = CONFIG_CAUSED.contains(&code).then(|| self.config_fingerprint());
        let rejection =
            Rejection { code: code.into(), reason: reason.into(), version, at: self.clock.now(), config };
        if let Err(e) = self.store.add_rejected(digest, rejection) {
            tracing::error!("cannot remember rejected bundle {digest}: {e}");
        }
        self.event(EventKind::BundleRejected {
            digest: digest.into(),
            code: code.into(),
            reason: reason.into(),
        });
    }

    /// Refuses bytes that did not verify. When they are not what the fleet wants this
    /// device to run (a stale announcement fetched late, a replay, another device's
    /// sideload) and the device rests on a bundle it applied, the refusal is an event and
    /// the last error, not the device's state: it stays `converged` (or `rolled_back`).
    /// The bundle the device was told to run failing verification is its state: `failed`.
    fn refuse_unverified(
        &mut self,
        digest: &str,
        e: bundle::VerifyError,
        permanent: bool,
    ) -> Result<Outcome, AgentError> {
        let resting_on_applied = matches!(
            self.machine.state(),
            ApplyState::Committed | ApplyState::RolledBack | ApplyState::Waiting
        ) && self.current.is_some();
        let wanted = self.desired.as_ref().is_some_and(|d| d.digest == digest);
        if wanted || !resting_on_applied {
            self.on(Command::Fetch)?;
            return Ok(self.refuse(digest, e.code(), e.to_string(), permanent, None));
        }
        let (code, reason) = (e.code(), e.to_string());
        if !permanent {
            tracing::warn!(digest, code, reason, "bundle deferred (not the desired one; state unchanged)");
        }
        self.set_error(code, &reason);
        let outcome = if permanent {
            self.reject(digest, code, &reason, None);
            Outcome::Rejected { code: code.into(), reason }
        } else {
            Outcome::Deferred { code: code.into(), reason }
        };
        self.publish_status();
        Ok(outcome)
    }

    fn refuse(
        &mut self,
        digest: &str,
        code: &str,
        reason: String,
        permanent: bool,
        version: Option<u64>,
    ) -> Outcome {
        if !permanent && version.is_none() {
            // Otherwise it is logged once, as its `bundle_rejected` or `apply_failed` event.
            tracing::warn!(digest, code, reason, "bundle deferred");
        }
        self.set_error(code, &reason);
        if self.machine.state() != ApplyState::Failed {
            let _ = self.on(Command::Refuse);
        }
        if permanent {
            self.reject(digest, code, &reason, version);
            Outcome::Rejected { code: code.into(), reason }
        } else {
            if let Some(version) = version {
                self.event(EventKind::ApplyFailed { version, code: code.into(), reason: reason.clone() });
            }
            self.publish_status();
            Outcome::Deferred { code: code.into(), reason }
        }
    }
}

/// A fingerprint of what in the config can refuse a bundle by itself: the allowed
/// roots, whether there is an engine, the engine policy, the trusted keys and threshold,
/// the device and fleet ids, the size limits.
pub fn config_fingerprint(cfg: &Config) -> String {
    use sha2::{Digest, Sha256};
    let keys: Vec<String> = cfg.trusted.keys().iter().map(|k| k.id().to_string()).collect();
    let what = format!(
        "{:?}|{}|{:?}|{:?}|{:?}|{}|{}|{}|{:?}",
        cfg.allowed_roots,
        cfg.engine_socket.is_some(),
        cfg.engine_policy.policy,
        cfg.engine_policy.config_dir,
        keys,
        cfg.trusted.threshold(),
        cfg.device,
        cfg.fleet,
        cfg.limits,
    );
    hex::encode(Sha256::digest(what.as_bytes()))
}

/// Logs an event once, at INFO, under its documented name (`fleet-spec/MESSAGES.md`) with
/// its fields: `bundle_rejected digest=... code=... reason=...`, the same in JSON logs.
fn log_event(kind: &EventKind) {
    match kind {
        EventKind::BundleRejected { digest, code, reason } => {
            tracing::info!(event = "bundle_rejected", digest, code, reason, "bundle_rejected")
        }
        EventKind::ApplyStarted { version, commit } => {
            tracing::info!(event = "apply_started", version, commit, "apply_started")
        }
        EventKind::ApplyFinished { version, commit } => {
            tracing::info!(event = "apply_finished", version, commit, "apply_finished")
        }
        EventKind::ApplyFailed { version, code, reason } => {
            tracing::info!(event = "apply_failed", version, code, reason, "apply_failed")
        }
        EventKind::RolledBack { from_version, to_version, reason } => {
            tracing::info!(event = "rolled_back", from_version, to_version, reason, "rolled_back")
        }
        EventKind::UpdateLockOverridden { version, entry, since } => {
            tracing::warn!(event = "update_lock_overridden", version, entry, since, "update_lock_overridden")
        }
        EventKind::AgentUpdateRefused { version, code, reason } => {
            tracing::warn!(event = "agent_update_refused", version, code, reason, "agent_update_refused")
        }
        EventKind::AgentUpdated { version, digest } => {
            tracing::info!(event = "agent_updated", version, digest, "agent_updated")
        }
        EventKind::DriftRepaired { kind, name } => {
            let kind = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string));
            tracing::info!(event = "drift_repaired", kind, name, "drift_repaired")
        }
    }
}

fn container_statuses(state: &DesiredState, observed: &[ObservedContainer]) -> Vec<ContainerStatus> {
    state
        .containers
        .iter()
        .map(|spec| {
            let seen = observed.iter().find(|c| c.name == spec.name);
            ContainerStatus {
                name: spec.name.clone(),
                image: spec.image.pull_reference(),
                running: seen.is_some_and(|c| c.running),
                health: seen.map_or("missing", |c| c.health.as_str()).to_string(),
                restarts: seen.map_or(0, |c| c.restart_count),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
