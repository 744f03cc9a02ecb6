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
    StatusReport, VersionRef,
};
use fleet_spec::model::{DependencyCondition, DesiredState};
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

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long every container must stay running (and healthy) before an update counts
/// as healthy (capped at half the health timeout).
pub const HEALTH_SETTLE: Duration = Duration::from_secs(5);

/// When asking the engine to run a healthcheck failed, ask again after this long.
const HEALTHCHECK_RETRY: Duration = Duration::from_secs(10);

/// What the agent tells the world.
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
}

impl Outcome {
    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Committed { .. } | Outcome::AlreadyApplied => None,
            Outcome::Rejected { code, .. }
            | Outcome::Deferred { code, .. }
            | Outcome::RolledBack { code, .. }
            | Outcome::RollbackIncomplete { code, .. } => Some(code),
        }
    }
}

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
    reports: Reports,
    last_saved_status: Option<StatusReport>,
    healthchecks: Healthchecks,
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
            reports,
            last_saved_status,
            healthchecks: Healthchecks::default(),
        })
    }

    pub fn state(&self) -> ApplyState {
        self.machine.state()
    }

    /// Test hook: see `Journal::crash_at`.
    #[cfg(test)]
    pub(crate) fn journal_mut(&mut self) -> &mut Journal {
        &mut self.journal
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

    fn on(&mut self, command: Command) -> Result<ApplyState, AgentError> {
        let from = self.machine.state();
        let to = self.machine.on(command)?;
        tracing::debug!(%from, %to, %command, "apply state");
        self.publish_status();
        Ok(to)
    }

    // ---- reports --------------------------------------------------------------------

    /// The status report as of now.
    pub fn status_report(&self) -> StatusReport {
        let state = if self.engine_down && self.machine.state().is_rest() {
            DeviceState::Degraded
        } else {
            self.machine.state().device_state()
        };
        StatusReport {
            device: self.cfg.device.clone(),
            fleet: self.cfg.fleet.clone(),
            agent_version: AGENT_VERSION.to_string(),
            state,
            desired: self.desired.clone(),
            applied: self.current.as_ref().map(|c| c.record.to_status()),
            containers: self.containers.clone(),
            files: FileCounts {
                managed: self.managed.len() as u64,
                drift_repaired: self.file_drift_repaired,
            },
            last_error: self.last_error.clone(),
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
        tracing::info!(event = ?kind, "event");
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

    /// Decides whether an announced bundle is worth fetching.
    pub fn offer(&self, ann: &Announcement) -> Result<Offer, AgentError> {
        if ann.fleet != self.cfg.fleet || ann.device != self.cfg.device {
            return Ok(Offer::Skip("announcement is for another device"));
        }
        if self.applied_digest() == Some(ann.digest.as_str()) {
            return Ok(Offer::Skip("already applied"));
        }
        if !self.machine.state().is_rest() || self.pending_rollback.is_some() {
            return Ok(Offer::Skip("busy"));
        }
        if self.store.rejected()?.contains_key(&ann.digest) {
            return Ok(Offer::Skip("rejected before"));
        }
        if self.store.trust()?.last_version.is_some_and(|v| ann.version <= v) {
            return Ok(Offer::Skip("not newer than the accepted version"));
        }
        if ann.size > self.cfg.limits.max_bundle_len() {
            return Ok(Offer::Skip("larger than fetch.max_bundle_bytes"));
        }
        Ok(Offer::Fetch)
    }

    /// A fetch starts (status `downloading`).
    pub fn begin_fetch(&mut self) -> Result<(), AgentError> {
        self.on(Command::Fetch)?;
        Ok(())
    }

    /// A fetch failed: nothing changed; the announcement is tried again later. A
    /// permanent failure (an oversized bundle, or a finished download that does not match
    /// the announced digest) is remembered as rejected, with a `bundle_rejected` event.
    pub fn fetch_failed(&mut self, digest: &str, code: &str, reason: &str, permanent: bool) -> Outcome {
        self.set_error(code, reason);
        if self.machine.state() == ApplyState::Fetching {
            let _ = self.on(Command::Refuse);
        }
        tracing::warn!(digest, code, "fetch failed: {reason}");
        self.publish_status();
        if permanent {
            self.reject(digest, code, reason, None);
            return Outcome::Rejected { code: code.into(), reason: reason.into() };
        }
        Outcome::Deferred { code: code.into(), reason: reason.into() }
    }

    fn reject(&mut self, digest: &str, code: &str, reason: &str, version: Option<u64>) {
        let rejection = Rejection { code: code.into(), reason: reason.into(), version, at: self.clock.now() };
        if let Err(e) = self.store.add_rejected(digest, rejection) {
            tracing::error!("cannot remember rejected bundle {digest}: {e}");
        }
        self.event(EventKind::BundleRejected {
            digest: digest.into(),
            code: code.into(),
            reason: reason.into(),
        });
    }

    fn refuse(
        &mut self,
        digest: &str,
        code: &str,
        reason: String,
        permanent: bool,
        version: Option<u64>,
    ) -> Outcome {
        tracing::warn!(digest, code, "bundle refused: {reason}");
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

    // ---- the apply path -------------------------------------------------------------

    /// Verifies and applies a bundle: the one path for announced, polled, MQTT-blob and
    /// sideloaded bundles.
    pub async fn apply_bundle(&mut self, bytes: &[u8]) -> Result<Outcome, AgentError> {
        let digest = bundle::content_address(bytes);
        if self.applied_digest() == Some(digest.as_str()) {
            if self.machine.state() == ApplyState::Fetching {
                self.machine = Machine::default();
                self.on(Command::Recovered)?;
            }
            return Ok(Outcome::AlreadyApplied);
        }
        if self.machine.state().is_rest() {
            self.on(Command::Fetch)?;
        }
        if let Some(r) = self.store.rejected()?.get(&digest) {
            let reason = format!("rejected before: {}", r.reason);
            let code = r.code.clone();
            self.set_error(&code, &reason);
            self.on(Command::Refuse)?;
            return Ok(Outcome::Rejected { code, reason });
        }

        // 1. Verify, with the persisted trust state and the clock.
        let trust = self.store.trust()?;
        let now = self.clock.now();
        let expect = Expectation { fleet: &self.cfg.fleet, device: &self.cfg.device };
        let verified = match bundle::verify(bytes, &self.cfg.trusted, expect, trust, now, &self.cfg.limits) {
            Ok(v) => v,
            Err(e) => {
                // A wrong clock is the device's fault, not the bundle's: try it again later.
                let permanent = !matches!(e, bundle::VerifyError::ClockRollback { .. });
                return Ok(self.refuse(&digest, e.code(), e.to_string(), permanent, None));
            }
        };
        let m = verified.manifest.clone();
        self.set_desired(VersionRef { version: m.version, digest: digest.clone(), commit: m.commit.clone() });
        self.on(Command::Verified)?;

        // 2. Preflight: nothing on the device changes before every check passed.
        if let Some((code, reason)) = self.preflight(&verified.state) {
            return Ok(self.refuse(&digest, code, reason, true, Some(m.version)));
        }
        self.store.save_bundle(&digest, bytes)?;
        if let Err(e) = self.ensure_images(&verified.state).await {
            self.engine_down = matches!(e, EngineError::Unreachable { .. });
            let code = if self.engine_down { "engine_unavailable" } else { "pull_failed" };
            return Ok(self.refuse(&digest, code, e.to_string(), false, Some(m.version)));
        }
        self.engine_down = false;
        self.on(Command::Stage)?;

        // 3. Trust is persisted here: the bundle passed every check and its images are
        //    present; from now on an older or equal version is never accepted again.
        self.store.save_trust(&verified.next_trust)?;
        let prev = self.applied_digest().map(str::to_string);
        self.journal.open()?;
        self.journal.append(&Record::Begin {
            digest: digest.clone(),
            version: m.version,
            commit: m.commit.clone(),
            prev,
        })?;
        self.on(Command::Apply)?;
        self.event(EventKind::ApplyStarted { version: m.version, commit: m.commit.clone() });
        self.finish_apply(&digest, &m, &verified.state).await
    }

    /// Applies, waits for health, commits or rolls back. Entered from `Applying`.
    async fn finish_apply(
        &mut self,
        digest: &str,
        m: &Manifest,
        state: &DesiredState,
    ) -> Result<Outcome, AgentError> {
        if let Err(e) = self.converge(state, true).await {
            let code = e.code().to_string();
            return self.rollback(digest, Some(m.version), &code, &e.to_string()).await;
        }
        self.journal.append(&Record::Applied { digest: digest.to_string() })?;
        self.on(Command::Applied)?;
        self.await_health(digest, m, state).await
    }

    /// Waits for health, then commits or rolls back. Entered from `AwaitingHealth`.
    async fn await_health(
        &mut self,
        digest: &str,
        m: &Manifest,
        state: &DesiredState,
    ) -> Result<Outcome, AgentError> {
        match self.wait_healthy(state).await {
            Verdict::Healthy => {
                self.commit(digest, m, state)?;
                Ok(Outcome::Committed { version: m.version })
            }
            Verdict::Failed { code, reason } => self.rollback(digest, Some(m.version), code, &reason).await,
            Verdict::Waiting { reason } => {
                self.rollback(digest, Some(m.version), "health_timeout", &reason).await
            }
        }
    }

    fn commit(&mut self, digest: &str, m: &Manifest, state: &DesiredState) -> Result<(), AgentError> {
        let record = AppliedRecord {
            digest: digest.to_string(),
            version: m.version,
            commit: m.commit.clone(),
            at: self.clock.now(),
        };
        self.journal.append(&Record::Commit {
            digest: record.digest.clone(),
            version: record.version,
            commit: record.commit.clone(),
            at: record.at,
        })?;
        self.finish_commit(record, state.clone())?;
        self.last_error = None;
        self.on(Command::Healthy)?;
        self.event(EventKind::ApplyFinished { version: m.version, commit: m.commit.clone() });
        tracing::info!(version = m.version, digest, "bundle committed");
        Ok(())
    }

    fn finish_commit(&mut self, record: AppliedRecord, state: DesiredState) -> Result<(), AgentError> {
        self.store.save_applied(&record)?;
        self.store.prune_bundles(&[&record.digest])?;
        self.journal.reset()?;
        self.current = Some(Current { record, state });
        Ok(())
    }

    /// Restores the last good state after bundle `from` failed, and rejects `from`.
    async fn rollback(
        &mut self,
        from: &str,
        version: Option<u64>,
        code: &str,
        reason: &str,
    ) -> Result<Outcome, AgentError> {
        tracing::warn!(digest = from, code, "rolling back: {reason}");
        let to = self.current.as_ref().map(|c| c.record.digest.clone());
        self.journal.append(&Record::RollbackBegin {
            from: from.to_string(),
            to: to.clone(),
            code: code.into(),
            reason: reason.into(),
        })?;
        // Remembered first: whatever happens next, this bundle is not tried again.
        let rejection = Rejection { code: code.into(), reason: reason.into(), version, at: self.clock.now() };
        self.store.add_rejected(from, rejection)?;
        if matches!(self.machine.state(), ApplyState::Applying | ApplyState::AwaitingHealth) {
            self.on(Command::Unhealthy)?;
        }
        self.set_error(code, reason);
        if let Some(version) = version {
            self.event(EventKind::ApplyFailed { version, code: code.into(), reason: reason.into() });
        }
        self.pending_rollback =
            Some(PendingRollback { from: from.into(), code: code.into(), reason: reason.into() });
        self.finish_rollback(version).await
    }

    async fn finish_rollback(&mut self, from_version: Option<u64>) -> Result<Outcome, AgentError> {
        let Some(p) = self.pending_rollback.clone() else {
            return Ok(Outcome::AlreadyApplied);
        };
        let target = self.current.as_ref().map(|c| c.state.clone()).unwrap_or_default();
        if let Err(e) = self.converge(&target, true).await {
            tracing::error!("rollback of {} is incomplete, will retry: {e}", p.from);
            self.engine_down = matches!(e, AgentError::Engine(EngineError::Unreachable { .. }));
            self.set_error(&p.code, &format!("{}; rollback incomplete: {e}", p.reason));
            self.publish_status();
            return Ok(Outcome::RollbackIncomplete { code: p.code, reason: p.reason });
        }
        let to = self.current.as_ref().map(|c| c.record.digest.clone());
        self.journal.append(&Record::RollbackDone { from: p.from.clone(), to: to.clone() })?;
        let keep: Vec<&str> = to.iter().map(String::as_str).collect();
        self.store.prune_bundles(&keep)?;
        self.journal.reset()?;
        self.pending_rollback = None;
        self.refresh_containers().await;
        self.on(Command::RolledBack)?;
        self.event(EventKind::RolledBack {
            from_version: from_version.unwrap_or(0),
            to_version: self.current.as_ref().map(|c| c.record.version),
            reason: format!("{}: {}", p.code, p.reason),
        });
        Ok(Outcome::RolledBack { code: p.code, reason: p.reason })
    }

    /// Checks that would refuse the bundle, before anything changes.
    fn preflight(&self, state: &DesiredState) -> Option<(&'static str, String)> {
        for file in &state.files {
            if let Err(e) = files::resolve(&file.path, &self.cfg.allowed_roots, false) {
                return Some((e.code(), e.to_string()));
            }
        }
        if !state.containers.is_empty() && self.cfg.engine_socket.is_none() {
            return Some((
                "engine_disabled",
                format!(
                    "the bundle has {} container(s) but this device has no engine (engine.socket = \"none\")",
                    state.containers.len()
                ),
            ));
        }
        if let Some(reason) = crate::policy::refusal(&self.cfg, state) {
            return Some((crate::policy::CODE, reason));
        }
        if let Err(e) = plan::dependency_order(&state.containers) {
            return Some(("dependency_cycle", e.to_string()));
        }
        None
    }

    /// Pulls every image that is not present (never re-pulls a present one).
    async fn ensure_images(&self, state: &DesiredState) -> Result<(), EngineError> {
        for c in &state.containers {
            if !self.engine.image_present(&c.image).await? {
                tracing::info!(image = %c.image.pull_reference(), "pulling image");
                self.engine.pull(&c.image, self.cfg.auth_for(&c.image.reference)).await?;
            }
        }
        Ok(())
    }

    fn step(&mut self, journaled: bool, intent: bool, step: &Step) -> Result<(), AgentError> {
        if journaled {
            let record = if intent {
                Record::Intent { step: step.clone() }
            } else {
                Record::Done { step: step.clone() }
            };
            self.journal.append(&record)?;
        }
        Ok(())
    }

    /// Moves the device to `state`: files, networks, volumes, containers in dependency
    /// order, then removals. Every effect is idempotent, so a repeat after a crash is
    /// safe. Returns the drift it repaired (for reconcile reports).
    async fn converge(
        &mut self,
        state: &DesiredState,
        journaled: bool,
    ) -> Result<Vec<(DriftKind, String)>, AgentError> {
        let mut repaired = Vec::new();
        let roots = self.cfg.allowed_roots.clone();

        // Files first: containers may mount them.
        let mut on_disk = BTreeMap::new();
        for f in &state.files {
            on_disk.insert(f.path.clone(), files::observe(&f.path, &roots)?);
        }
        let file_plan = plan::plan_files(state, &on_disk, &self.managed);
        // Every file is recorded as managed before its write, so a crash never leaves an
        // unrecorded file of ours behind. Files that are absent or already ours are
        // recorded all at once (one durable write of managed.json, not one per file: each
        // costs two fsyncs). A file that exists and was never ours is recorded just before
        // it is replaced, so a crash cannot make the agent own, and a rollback delete, a
        // file it never wrote.
        let writes: Vec<_> = file_plan
            .write
            .iter()
            .map(|w| {
                let file = state.file(&w.path).expect("planned from the state");
                (w, file, file.content_sha256())
            })
            .collect();
        let mut recorded = false;
        for (w, _, sha) in &writes {
            let ours = self.managed.contains_key(&w.path) || on_disk.get(&w.path).is_none_or(Option::is_none);
            if ours && self.managed.get(&w.path) != Some(sha) {
                self.managed.insert(w.path.clone(), sha.clone());
                recorded = true;
            }
        }
        if recorded {
            self.store.save_managed(&self.managed)?;
        }
        for (w, file, sha) in writes {
            let step = Step::WriteFile { path: w.path.clone(), sha256: sha.clone() };
            self.step(journaled, true, &step)?;
            if self.managed.get(&w.path) != Some(&sha) {
                self.managed.insert(w.path.clone(), sha);
                self.store.save_managed(&self.managed)?;
            }
            files::write_managed(file, &roots)?;
            self.step(journaled, false, &step)?;
            if let Some(kind) = w.drift {
                repaired.push((kind, w.path.clone()));
            }
        }

        // Containers.
        let view = self.engine_view().await?;
        let cplan = plan::plan_containers(state, &self.cfg.fleet, &view)?;
        let obj_labels = plan::object_labels(&self.cfg.fleet);
        for name in &cplan.create_networks {
            let spec = state.networks.iter().find(|n| &n.name == name).expect("planned from the state");
            let step = Step::CreateNetwork { name: name.clone() };
            self.step(journaled, true, &step)?;
            self.engine.create_network(spec, &obj_labels).await?;
            self.step(journaled, false, &step)?;
        }
        for name in &cplan.create_volumes {
            let spec = state.volumes.iter().find(|v| &v.name == name).expect("planned from the state");
            let step = Step::CreateVolume { name: name.clone() };
            self.step(journaled, true, &step)?;
            self.engine.create_volume(spec, &obj_labels).await?;
            self.step(journaled, false, &step)?;
        }
        for name in &cplan.remove_containers {
            let step = Step::RemoveContainer { name: name.clone() };
            self.step(journaled, true, &step)?;
            self.engine.remove(name, self.cfg.stop_grace_secs).await?;
            self.step(journaled, false, &step)?;
        }
        for s in &cplan.steps {
            let spec = state.containers.iter().find(|c| c.name == s.name).expect("planned from the state");
            if s.need == Need::Keep {
                continue;
            }
            self.wait_dependencies(spec, state).await?;
            if matches!(s.need, Need::Create | Need::Recreate) {
                if !journaled {
                    // Drift repair: an image removed behind our back comes back too.
                    if !self.engine.image_present(&spec.image).await? {
                        self.engine.pull(&spec.image, self.cfg.auth_for(&spec.image.reference)).await?;
                    }
                }
                if s.need == Need::Recreate {
                    let step = Step::RemoveContainer { name: s.name.clone() };
                    self.step(journaled, true, &step)?;
                    self.engine.remove(&s.name, self.cfg.stop_grace_secs).await?;
                    self.step(journaled, false, &step)?;
                }
                let step = Step::CreateContainer { name: s.name.clone(), spec_hash: s.spec_hash.clone() };
                self.step(journaled, true, &step)?;
                self.engine
                    .create(spec, &plan::container_labels(spec, &self.cfg.fleet, &s.spec_hash))
                    .await?;
                self.step(journaled, false, &step)?;
            }
            let step = Step::StartContainer { name: s.name.clone() };
            self.step(journaled, true, &step)?;
            self.engine.start(&s.name).await?;
            self.step(journaled, false, &step)?;
            if let Some(kind) = s.need.drift() {
                repaired.push((kind, s.name.clone()));
            }
        }
        for name in &cplan.remove_networks {
            let step = Step::RemoveNetwork { name: name.clone() };
            self.step(journaled, true, &step)?;
            if let Err(e) = self.engine.remove_network(name).await {
                tracing::warn!("cannot remove network {name} (still in use?): {e}");
            }
            self.step(journaled, false, &step)?;
        }
        for name in &cplan.remove_volumes {
            let step = Step::RemoveVolume { name: name.clone() };
            self.step(journaled, true, &step)?;
            if let Err(e) = self.engine.remove_volume(name).await {
                tracing::warn!("cannot remove volume {name} (still in use?): {e}");
            }
            self.step(journaled, false, &step)?;
        }

        // Files no longer desired, last (containers that mounted them are gone).
        for path in &file_plan.remove {
            let step = Step::RemoveFile { path: path.clone() };
            self.step(journaled, true, &step)?;
            match files::remove_managed(path, &roots) {
                Ok(()) => {}
                Err(FileError::Policy(e)) => {
                    tracing::warn!("not removing {path}: {e}; forgetting it");
                }
                Err(e) => return Err(e.into()),
            }
            self.managed.remove(path);
            self.store.save_managed(&self.managed)?;
            self.step(journaled, false, &step)?;
        }
        self.engine_down = false;
        Ok(repaired)
    }

    async fn engine_view(&self) -> Result<EngineView, EngineError> {
        Ok(EngineView {
            containers: self.engine.list_managed().await?,
            networks: self.engine.list_managed_networks().await?,
            volumes: self.engine.list_managed_volumes().await?,
        })
    }

    /// Waits until the dependencies of `spec` meet their conditions (bounded by the
    /// health timeout; then it goes on and health judges the result).
    async fn wait_dependencies(
        &mut self,
        spec: &fleet_spec::model::ContainerSpec,
        state: &DesiredState,
    ) -> Result<(), AgentError> {
        let deadline = Instant::now() + self.cfg.health_timeout;
        for dep in &spec.depends_on {
            if dep.condition == DependencyCondition::Started
                || !state.containers.iter().any(|c| c.name == dep.container)
            {
                continue;
            }
            loop {
                let seen = self.engine.inspect(&dep.container).await?;
                let ok = match (dep.condition, &seen) {
                    (DependencyCondition::Healthy, Some(c)) => {
                        c.running
                            && matches!(
                                c.health,
                                crate::engine::Health::Healthy | crate::engine::Health::None
                            )
                    }
                    (DependencyCondition::CompletedSuccessfully, Some(c)) => {
                        !c.running && c.exit_code == Some(0)
                    }
                    _ => false,
                };
                if ok || Instant::now() >= deadline {
                    break;
                }
                if let Some(c) = &seen {
                    self.drive_healthchecks(std::slice::from_ref(c)).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    /// Polls the engine until the state is healthy, failed, or the timeout passed.
    async fn wait_healthy(&mut self, state: &DesiredState) -> Verdict {
        let timeout = self.cfg.health_timeout;
        let deadline = Instant::now() + timeout;
        let mut baseline: Option<BTreeMap<String, u64>> = None;
        let settle =
            if state.containers.is_empty() { Duration::ZERO } else { HEALTH_SETTLE.min(timeout / 2) };
        let mut healthy_since: Option<Instant> = None;
        loop {
            let verdict = match self.engine.list_managed().await {
                Ok(observed) => {
                    let ours: Vec<ObservedContainer> =
                        observed.into_iter().filter(|c| plan::is_ours(c, &self.cfg.fleet)).collect();
                    let base = baseline.get_or_insert_with(|| {
                        ours.iter().map(|c| (c.name.clone(), c.restart_count)).collect()
                    });
                    let verdict = health::judge(state, &ours, base);
                    self.containers = container_statuses(state, &ours);
                    self.track_healthchecks(&ours);
                    if !matches!(verdict, Verdict::Failed { .. }) {
                        self.drive_healthchecks(&ours).await;
                    }
                    verdict
                }
                Err(e) => Verdict::Waiting { reason: format!("engine: {e}") },
            };
            // Healthy counts once it held for the settle time: a container that
            // crashes a second after starting is not a success.
            let verdict = match verdict {
                Verdict::Healthy => {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= settle {
                        return Verdict::Healthy;
                    }
                    Verdict::Waiting { reason: "settling".into() }
                }
                other => {
                    healthy_since = None;
                    other
                }
            };
            match verdict {
                Verdict::Waiting { .. } if Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(left.min(Duration::from_secs(1))).await;
                }
                Verdict::Waiting { reason } if reason == "settling" => return Verdict::Healthy,
                Verdict::Waiting { .. } => return health::at_timeout(verdict, timeout.as_secs()),
                done => return done,
            }
        }
    }

    async fn refresh_containers(&mut self) {
        let Some(current) = &self.current else {
            self.containers.clear();
            self.healthchecks.next.clear();
            return;
        };
        if current.state.containers.is_empty() {
            self.containers.clear();
            self.healthchecks.next.clear();
            return;
        }
        match self.engine.list_managed().await {
            Ok(observed) => {
                self.containers = container_statuses(&current.state, &observed);
                let ours: Vec<ObservedContainer> =
                    observed.into_iter().filter(|c| plan::is_ours(c, &self.cfg.fleet)).collect();
                self.track_healthchecks(&ours);
                self.engine_down = false;
            }
            Err(e) => {
                self.engine_down = matches!(e, EngineError::Unreachable { .. });
                tracing::warn!("cannot list containers: {e}");
            }
        }
    }

    // ---- healthchecks the engine does not run -----------------------------------------

    /// Follows the observed managed containers: a running one with a healthcheck is
    /// due for a check now when it is new; the others are forgotten.
    fn track_healthchecks(&mut self, observed: &[ObservedContainer]) {
        let checked = |c: &ObservedContainer| c.running && c.health != Health::None;
        let hc = &mut self.healthchecks;
        hc.next.retain(|name, _| observed.iter().any(|c| &c.name == name && checked(c)));
        if !hc.by_engine {
            let now = Instant::now();
            for c in observed.iter().filter(|c| checked(c)) {
                hc.next.entry(c.name.clone()).or_insert(now);
            }
        }
    }

    /// Runs the due healthchecks of these containers (running ones with a healthcheck),
    /// where the engine does not run them itself.
    async fn drive_healthchecks(&mut self, observed: &[ObservedContainer]) {
        for c in observed {
            if self.healthchecks.by_engine {
                return;
            }
            let due = self.healthchecks.next.get(&c.name).is_none_or(|at| *at <= Instant::now());
            if c.running && c.health != Health::None && due {
                self.run_healthcheck(&c.name).await;
            }
        }
    }

    /// Asks the engine to run the healthcheck of `name` if due, and when to ask again.
    async fn run_healthcheck(&mut self, name: &str) {
        let after = match self.engine.run_healthcheck(name).await {
            Ok(Some(after)) => after.max(Duration::from_millis(100)),
            Ok(None) => {
                tracing::debug!("the engine runs healthchecks itself");
                self.healthchecks.by_engine = true;
                self.healthchecks.next.clear();
                return;
            }
            Err(e) => {
                tracing::debug!(container = name, "cannot run the healthcheck: {e}");
                HEALTHCHECK_RETRY
            }
        };
        self.healthchecks.next.insert(name.to_owned(), Instant::now() + after);
    }

    /// When [`Agent::run_due_healthchecks`] has something to do; `None`: nothing
    /// planned (no container with a healthcheck, or the engine runs them itself).
    pub fn next_healthcheck(&self) -> Option<Instant> {
        self.healthchecks.next.values().min().copied()
    }

    /// Runs the due healthchecks of the applied state's containers that the engine does
    /// not run itself (the daemon calls this at [`Agent::next_healthcheck`]).
    pub async fn run_due_healthchecks(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .healthchecks
            .next
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            if self.healthchecks.by_engine {
                return;
            }
            self.run_healthcheck(&name).await;
        }
    }

    // ---- recovery -------------------------------------------------------------------

    /// Loads the last good bundle and finishes whatever the journal says was in flight.
    pub async fn recover(&mut self) -> Result<Option<Outcome>, AgentError> {
        if let Some(record) = self.store.applied()? {
            match self.load_stored(&record.digest) {
                Ok((_, state)) => self.current = Some(Current { record, state }),
                Err(e) => {
                    tracing::error!("the last good bundle cannot be loaded; continuing without it: {e}");
                    self.set_error(e.code(), &e.to_string());
                }
            }
        }
        let records = self.journal.open()?;
        let decision = journal::decide(&records);
        tracing::info!(?decision, records = records.len(), "recovery");
        let outcome = match decision {
            Recovery::Clean => {
                self.journal.reset()?;
                if self.current.is_some() {
                    self.on(Command::Recovered)?;
                }
                None
            }
            Recovery::FinishCommit { digest, version, commit, at } => {
                let (_, state) = self.load_stored(&digest)?;
                self.finish_commit(AppliedRecord { digest, version, commit, at }, state)?;
                self.on(Command::Recovered)?;
                None
            }
            Recovery::ResumeApply { digest, interrupted, .. } => {
                tracing::warn!(digest, ?interrupted, "resuming an interrupted apply");
                match self.load_stored(&digest) {
                    Ok((m, state)) => {
                        self.desired = Some(VersionRef {
                            version: m.version,
                            digest: digest.clone(),
                            commit: m.commit.clone(),
                        });
                        self.journal.append(&Record::Begin {
                            digest: digest.clone(),
                            version: m.version,
                            commit: m.commit.clone(),
                            prev: self.applied_digest().map(str::to_string),
                        })?;
                        self.on(Command::ResumeApply)?;
                        Some(self.finish_apply(&digest, &m, &state).await?)
                    }
                    Err(e) => {
                        self.on(Command::ResumeRollback)?;
                        Some(self.rollback(&digest, None, e.code(), &e.to_string()).await?)
                    }
                }
            }
            Recovery::ResumeHealth { digest, .. } => match self.load_stored(&digest) {
                Ok((m, state)) => {
                    self.desired = Some(VersionRef {
                        version: m.version,
                        digest: digest.clone(),
                        commit: m.commit.clone(),
                    });
                    self.on(Command::ResumeHealth)?;
                    Some(self.await_health(&digest, &m, &state).await?)
                }
                Err(e) => {
                    self.on(Command::ResumeRollback)?;
                    Some(self.rollback(&digest, None, e.code(), &e.to_string()).await?)
                }
            },
            Recovery::RollBack { from, code, reason, .. } => {
                self.on(Command::ResumeRollback)?;
                let version = self.load_stored(&from).ok().map(|(m, _)| m.version);
                Some(self.rollback(&from, version, &code, &reason).await?)
            }
            Recovery::FinishRollback { from, .. } => {
                if !self.store.rejected()?.contains_key(&from) {
                    let r = Rejection {
                        code: "rolled_back".into(),
                        reason: "rolled back".into(),
                        version: None,
                        at: self.clock.now(),
                    };
                    self.store.add_rejected(&from, r)?;
                }
                let keep: Vec<String> = self.applied_digest().map(str::to_string).into_iter().collect();
                self.store.prune_bundles(&keep.iter().map(String::as_str).collect::<Vec<_>>())?;
                self.journal.reset()?;
                self.on(Command::ResumeRollback)?;
                self.on(Command::RolledBack)?;
                None
            }
        };
        self.refresh_containers().await;
        self.publish_status();
        Ok(outcome)
    }

    /// Loads a bundle the agent stored itself: content address, signature and payload
    /// are checked again (the disk is not trusted), version and expiry are not (it was
    /// accepted when it came).
    fn load_stored(&self, digest: &str) -> Result<(Manifest, DesiredState), AgentError> {
        let bad = |reason: String| AgentError::StoredBundle { digest: digest.into(), reason };
        let bytes = self.store.read_bundle(digest).map_err(|e| bad(e.to_string()))?;
        if bundle::content_address(&bytes) != digest {
            return Err(bad("its content does not match its digest".into()));
        }
        let parsed = bundle::parse(&bytes, &self.cfg.limits).map_err(|e| bad(e.to_string()))?;
        let manifest = bundle::decode_manifest(parsed.manifest_bytes).map_err(|e| bad(e.to_string()))?;
        let then = manifest.created_at.min(manifest.expires_at.saturating_sub(1));
        let expect = Expectation { fleet: &self.cfg.fleet, device: &self.cfg.device };
        let v =
            bundle::verify(&bytes, &self.cfg.trusted, expect, TrustState::default(), then, &self.cfg.limits)
                .map_err(|e| bad(e.to_string()))?;
        Ok((v.manifest, v.state))
    }

    // ---- reconcile ------------------------------------------------------------------

    /// Repairs drift of the applied state and reports each repair. Does nothing while
    /// an apply is in flight; finishes a pending rollback first.
    pub async fn reconcile(&mut self) -> Result<Vec<(DriftKind, String)>, AgentError> {
        if self.pending_rollback.is_some() {
            self.finish_rollback(None).await?;
            return Ok(Vec::new());
        }
        if !self.machine.state().is_rest() {
            return Ok(Vec::new());
        }
        let Some(current) = self.current.clone() else {
            return Ok(Vec::new());
        };
        let was_down = self.engine_down;
        let repaired = match self.converge(&current.state, false).await {
            Ok(r) => r,
            Err(AgentError::Engine(e)) => {
                self.engine_down = matches!(e, EngineError::Unreachable { .. });
                if self.engine_down && !was_down {
                    tracing::warn!("engine unavailable, device degraded: {e}");
                }
                self.set_error(
                    if self.engine_down { "engine_unavailable" } else { "engine_error" },
                    &e.to_string(),
                );
                self.publish_status();
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        for (kind, name) in &repaired {
            if matches!(kind, DriftKind::FileChanged | DriftKind::FileMissing) {
                self.file_drift_repaired += 1;
            }
            tracing::info!(?kind, name, "drift repaired");
            self.event(EventKind::DriftRepaired { kind: *kind, name: name.clone() });
        }
        if was_down && self.last_error.as_ref().is_some_and(|e| e.code == "engine_unavailable") {
            self.last_error = None;
        }
        self.refresh_containers().await;
        self.publish_status();
        Ok(repaired)
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
#[path = "agent_tests.rs"]
mod tests;
