//! The apply path: verify → preflight → stage → apply → await health → commit, or
//! roll back to the last good state.

use std::path::PathBuf;

use super::*;

/// What an image takes on disk for each byte its registry lists: layers are compressed
/// (gzip commonly unpacks to 2 to 3 times), and the engine holds a layer's download
/// while it unpacks it. An estimate on the safe side, for the disk check before a pull.
const IMAGE_UNPACK_FACTOR: u64 = 3;

impl<E: Engine> Agent<E> {
    // ---- the apply path -------------------------------------------------------------

    /// Verifies and applies a bundle: the one path for announced, polled, MQTT-blob and
    /// sideloaded bundles.
    ///
    /// Whatever fails, the machine ends in a rest state (Hardening I, case 4): an error
    /// before the first change ends in `failed` (nothing changed, the bundle is not
    /// blamed: it is tried again later); an error after it rolls back to the last good
    /// state. Only when even that cannot be written (the journal) is the error returned
    /// with the machine still mid-flight: the daemon then exits, and journal recovery
    /// finishes the job on the next start.
    pub async fn apply_bundle(&mut self, bytes: &[u8]) -> Result<Outcome, AgentError> {
        self.apply_gated(bytes, true).await
    }

    /// [`Agent::apply_bundle`] without waiting for the bundle's maintenance window or an
    /// update lock: a sideload is an operator at the device, who chose the moment.
    pub async fn apply_bundle_now(&mut self, bytes: &[u8]) -> Result<Outcome, AgentError> {
        self.apply_gated(bytes, false).await
    }

    async fn apply_gated(&mut self, bytes: &[u8], gated: bool) -> Result<Outcome, AgentError> {
        let digest = bundle::content_address(bytes);
        match self.try_apply(&digest, bytes, gated).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => self.settle(&digest, e).await,
        }
    }

    /// Brings the machine to rest after an error on the apply path (see `apply_bundle`).
    async fn settle(&mut self, digest: &str, e: AgentError) -> Result<Outcome, AgentError> {
        #[cfg(test)]
        if self.crash_after_begin {
            return Err(e); // a dead process settles nothing
        }
        let code = e.code();
        let reason = e.to_string();
        let rolls_back = matches!(self.machine.state(), ApplyState::Applying | ApplyState::AwaitingHealth);
        if !rolls_back {
            // A rollback logs the reason itself.
            tracing::error!(digest, code, reason, "apply failed");
        }
        match self.machine.state() {
            s if s.is_rest() => {
                self.set_error(code, &reason);
                self.publish_status();
                Ok(Outcome::Deferred { code: code.into(), reason })
            }
            ApplyState::Fetching | ApplyState::Verified | ApplyState::Staged => {
                // Nothing on the device changed yet; the bundle is not to blame.
                if self.journal_holds(digest) {
                    // The apply was begun in the journal only: take that back.
                    self.journal.reset()?;
                }
                self.set_error(code, &reason);
                self.on(Command::Refuse)?;
                Ok(Outcome::Deferred { code: code.into(), reason })
            }
            ApplyState::Applying | ApplyState::AwaitingHealth => {
                self.rollback(digest, None, code, &reason, false).await
            }
            _ => Err(e),
        }
    }

    /// Whether the journal's open transaction is the apply of `digest`.
    fn journal_holds(&mut self, digest: &str) -> bool {
        let records = self.journal.open().unwrap_or_default();
        matches!(journal::decide(&records), Recovery::ResumeApply { digest: d, .. } if d == digest)
    }

    async fn try_apply(&mut self, digest: &str, bytes: &[u8], gated: bool) -> Result<Outcome, AgentError> {
        let digest = digest.to_string();
        // A download beside the loop ends here: `fetching` reports `downloading` too.
        self.downloading = None;
        if self.applied_digest() == Some(digest.as_str()) {
            self.publish_status();
            return Ok(Outcome::AlreadyApplied);
        }
        if let Some(r) = self.rejection(&digest)? {
            let reason = format!("rejected before: {}", r.reason);
            let code = r.code.clone();
            self.set_error(&code, &reason);
            self.on(Command::Fetch)?;
            self.on(Command::Refuse)?;
            return Ok(Outcome::Rejected { code, reason });
        }

        // 1. Verify, with the persisted trust state (its time floor stands in for a
        //    clock that is behind) and the clock.
        let trust = self.store.trust()?;
        let now = self.clock.now();
        let expect = Expectation { fleet: &self.cfg.fleet, device: &self.cfg.device };
        let mut verified =
            match bundle::verify(bytes, &self.cfg.trusted, expect, trust, now, &self.cfg.limits) {
                Ok(v) => v,
                Err(e @ bundle::VerifyError::Expired { .. }) => {
                    // Expiry is judged by a clock, and this device's may run fast: defer, and
                    // keep the bytes so the retry (when time or the bundle changes) reads
                    // them from disk instead of downloading them again.
                    self.keep_deferred(&digest, bytes)?;
                    return self.refuse_unverified(&digest, e, false);
                }
                Err(e) => return self.refuse_unverified(&digest, e, true),
            };
        self.on(Command::Fetch)?;
        let m = verified.manifest.clone();
        self.set_desired(VersionRef { version: m.version, digest: digest.clone(), commit: m.commit.clone() });
        self.on(Command::Verified)?;
        // Secrets are decrypted in memory only, never written but as their files.
        if let Err((code, reason)) = self.unseal(&mut verified.state) {
            return Ok(self.refuse(&digest, code, reason, true, Some(m.version)));
        }

        // 2. Preflight: nothing on the device changes before every check passed.
        if let Some((code, reason)) = self.preflight(&verified.state) {
            // A root that is a file, a directory where a file goes, a disk error, a
            // directory on the way that is a symlink (a container with the directory
            // bind-mounted can plant one): the device's own state, which its operator
            // (or the container) changes; the bundle is not blamed and is tried again
            // from its stored copy, with backoff. The rest is about the bundle.
            let permanent = !matches!(code, "file_write_failed" | "symlink_escape");
            if !permanent {
                self.keep_deferred(&digest, bytes)?;
            }
            return Ok(self.refuse(&digest, code, reason, permanent, Some(m.version)));
        }
        self.keep_deferred(&digest, bytes)?;
        // 2a. Artifacts: stored (the runner downloads them first; an export brings them),
        //     and room for their copies and for the images to pull. Both may pass: the
        //     bundle is tried again.
        let images = match self.image_room(&verified.state).await {
            Ok(room) => room,
            Err(e) => return Ok(self.engine_refusal(&digest, e, m.version)),
        };
        if let Some((code, reason)) = self.artifacts_ready(&verified.state, &images) {
            return Ok(self.refuse(&digest, code, reason, false, Some(m.version)));
        }
        if let Err(e) = self.ensure_images(&verified.state).await {
            return Ok(self.engine_refusal(&digest, e, m.version));
        }
        self.engine_down = false;
        // 2b. The bundle's own schedule: downloaded, verified and its images present, it
        //     may still have to wait for its maintenance window or an app's update lock
        //     (state `waiting`; the stored copy is applied when the wait ends).
        if gated {
            if let Some(waiting) = self.hold(&digest, m.version, &verified.state.maintenance)? {
                return Ok(waiting);
            }
        }
        self.on(Command::Stage)?;

        // 3. The journal first, then trust (Hardening I, case 6): a crash between the two
        //    resumes this apply from the journal, and recovery raises the trust state to
        //    the resumed bundle. A rollback still to finish is superseded: a newer bundle
        //    that verifies is the fix forward (case 5); the failed one stays rejected.
        let prev = self.applied_digest().map(str::to_string);
        self.journal.open()?;
        if self.pending_rollback.take().is_some() {
            tracing::info!(digest, "a newer bundle supersedes the unfinished rollback");
            self.journal.reset()?;
        }
        self.journal.append(&Record::Begin {
            digest: digest.clone(),
            version: m.version,
            commit: m.commit.clone(),
            prev,
        })?;
        #[cfg(test)]
        if self.crash_after_begin {
            let crash = std::io::Error::other("simulated crash after Begin");
            return Err(journal::JournalError::Io { path: self.store.journal_path(), source: crash }.into());
        }
        // Trust is persisted here: the bundle passed every check and its images are
        // present; from now on an older or equal version is never accepted again.
        self.store.save_trust(&verified.next_trust)?;
        self.on(Command::Apply)?;
        self.event(EventKind::ApplyStarted { version: m.version, commit: m.commit.clone() });
        self.finish_apply(&digest, &m, &verified.state).await
    }

    /// Stores a verified (or expired-but-signed) bundle under its content address so a
    /// deferred bundle is retried from disk, not downloaded again (Hardening I, case 7).
    /// At most one such bundle is kept beside the last good one.
    fn keep_deferred(&mut self, digest: &str, bytes: &[u8]) -> Result<(), AgentError> {
        let applied = self.applied_digest().map(str::to_string);
        let keep: Vec<&str> = applied.iter().map(String::as_str).chain([digest]).collect();
        self.store.prune_bundles(&keep)?;
        self.store.save_bundle(digest, bytes)?;
        Ok(())
    }

    /// Applies, waits for health, commits or rolls back. Entered from `Applying`.
    pub(super) async fn finish_apply(
        &mut self,
        digest: &str,
        m: &Manifest,
        state: &DesiredState,
    ) -> Result<Outcome, AgentError> {
        if let Err(e) = self.converge(state, Mode::Apply).await {
            let code = e.code().to_string();
            let blame = !is_device_fault(&code);
            return self.rollback(digest, Some(m.version), &code, &e.to_string(), blame).await;
        }
        self.journal.append(&Record::Applied { digest: digest.to_string() })?;
        self.on(Command::Applied)?;
        self.await_health(digest, m, state).await
    }

    /// Waits for health, then commits or rolls back. Entered from `AwaitingHealth`.
    pub(super) async fn await_health(
        &mut self,
        digest: &str,
        m: &Manifest,
        state: &DesiredState,
    ) -> Result<Outcome, AgentError> {
        match self.wait_healthy(state).await {
            Verdict::Healthy => {
                self.commit(digest, m, state)?;
                // Only now, with no way back needed, are volumes no longer desired deleted
                // (Hardening I, case 9): a rollback must find its data where it left it.
                self.remove_stale_volumes(state).await;
                self.collect_images().await;
                self.collect_blobs();
                Ok(Outcome::Committed { version: m.version })
            }
            Verdict::Failed { code, reason } => {
                self.rollback(digest, Some(m.version), code, &reason, true).await
            }
            Verdict::Waiting { reason } => {
                self.rollback(digest, Some(m.version), "health_timeout", &reason, true).await
            }
        }
    }

    pub(super) fn commit(
        &mut self,
        digest: &str,
        m: &Manifest,
        state: &DesiredState,
    ) -> Result<(), AgentError> {
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

    pub(super) fn finish_commit(
        &mut self,
        record: AppliedRecord,
        state: DesiredState,
    ) -> Result<(), AgentError> {
        self.store.save_applied(&record)?;
        self.store.prune_bundles(&[&record.digest])?;
        self.journal.reset()?;
        self.current = Some(Current { record, state });
        self.last_good_unreadable = None;
        Ok(())
    }

    /// Restores the last good state after bundle `from` failed, and rejects `from` when
    /// it is to `blame` (its health, its containers); a failure of the device itself (its
    /// disk, its engine) rolls back without blaming the bundle, which is tried again later.
    pub(super) async fn rollback(
        &mut self,
        from: &str,
        version: Option<u64>,
        code: &str,
        reason: &str,
        blame: bool,
    ) -> Result<Outcome, AgentError> {
        if version.is_some() {
            // Its `apply_failed` event (below) carries the reason.
            tracing::warn!(digest = from, code, "rolling back to the last good state");
        } else {
            tracing::warn!(digest = from, code, reason, "rolling back to the last good state");
        }
        let to = self.current.as_ref().map(|c| c.record.digest.clone());
        self.journal.append(&Record::RollbackBegin {
            from: from.to_string(),
            to: to.clone(),
            code: code.into(),
            reason: reason.into(),
        })?;
        // Remembered first: whatever happens next, this bundle is not tried again.
        if blame {
            let rejection = Rejection {
                code: code.into(),
                reason: reason.into(),
                version,
                at: self.clock.now(),
                config: None,
            };
            self.store.add_rejected(from, rejection)?;
        }
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

    pub(super) async fn finish_rollback(&mut self, from_version: Option<u64>) -> Result<Outcome, AgentError> {
        let Some(p) = self.pending_rollback.clone() else {
            return Ok(Outcome::AlreadyApplied);
        };
        if self.machine.state() == ApplyState::Failed {
            self.on(Command::RetryRollback)?;
        }
        // Never "roll back" to nothing while a last good bundle is on record but cannot
        // be read (Hardening I, case 8): that would delete every managed file, container
        // and volume. The device keeps what it runs and reports `degraded`.
        if let Some(why) = self.last_good_unreadable.clone().filter(|_| self.current.is_none()) {
            tracing::error!("not rolling back {}: the last good bundle cannot be read ({why})", p.from);
            self.pending_rollback = None;
            self.journal.reset()?;
            self.set_error(
                &p.code,
                &format!("{}; not rolled back: the last good bundle cannot be read: {why}", p.reason),
            );
            self.on(Command::RollbackStuck)?;
            return Ok(Outcome::RollbackIncomplete { code: p.code, reason: p.reason });
        }
        let target = self.current.as_ref().map(|c| c.state.clone()).unwrap_or_default();
        if let Err(e) = self.converge(&target, Mode::Rollback).await {
            // At rest in `failed`: reconcile retries the rollback, and a newer bundle
            // that verifies is still taken (the fix forward, Hardening I, case 5).
            tracing::error!("rollback of {} is incomplete, will retry: {e}", p.from);
            self.engine_down = matches!(e, AgentError::Engine(EngineError::Unreachable { .. }));
            self.set_error(&p.code, &format!("{}; rollback incomplete: {e}", p.reason));
            self.on(Command::RollbackStuck)?;
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
    pub(super) fn preflight(&self, state: &DesiredState) -> Option<(&'static str, String)> {
        for file in state.entries() {
            if let Err(e) = files::resolve(file.path(), &self.cfg.allowed_roots, false) {
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

    /// A bundle deferred by the engine: unreachable, or a pull that failed.
    fn engine_refusal(&mut self, digest: &str, e: EngineError, version: u64) -> Outcome {
        self.engine_down = matches!(e, EngineError::Unreachable { .. });
        let code = if self.engine_down { "engine_unavailable" } else { "pull_failed" };
        self.refuse(digest, code, e.to_string(), false, Some(version))
    }

    /// Where the images `state` still needs land, and the room they take there: the
    /// download sizes `build --resolve-digests` recorded (bundle format 6) of the images
    /// the engine lacks, times [`IMAGE_UNPACK_FACTOR`]. Empty when nothing is to be
    /// pulled, no size is known, or the engine's storage is not visible from here (an
    /// agent in a container without it mounted): those pulls are not checked.
    pub(super) async fn image_room(&self, state: &DesiredState) -> Result<Vec<(PathBuf, u64)>, EngineError> {
        if state.image_sizes.is_empty() {
            return Ok(Vec::new());
        }
        // By digest: two containers on one image pull it once.
        let mut missing: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &state.containers {
            let (Some(digest), Some(bytes)) = (c.image.digest.as_deref(), state.image_size(&c.image)) else {
                continue;
            };
            if c.options.pull_policy != Some(PullPolicy::Never)
                && !self.engine.image_present(&c.image).await?
            {
                missing.insert(digest, bytes);
            }
        }
        let needed =
            missing.values().fold(0u64, |sum, b| sum.saturating_add(*b)).saturating_mul(IMAGE_UNPACK_FACTOR);
        if needed == 0 {
            return Ok(Vec::new());
        }
        match self.engine.storage_root().await? {
            Some(root) if root.is_dir() => Ok(vec![(root, needed)]),
            root => {
                tracing::debug!(
                    ?root,
                    "the engine's image storage is not visible here: image sizes are not checked"
                );
                Ok(Vec::new())
            }
        }
    }

    /// Every image of `state` on the device, by each container's `pull_policy` (a
    /// present image is pulled again only with `always`).
    pub(super) async fn ensure_images(&self, state: &DesiredState) -> Result<(), EngineError> {
        for c in &state.containers {
            let always = c.options.pull_policy == Some(PullPolicy::Always);
            let present = self.engine.image_present(&c.image).await?;
            if always || !present {
                self.pull(c, present).await?;
            }
        }
        Ok(())
    }

    /// Pulls a container's image, unless its `pull_policy` is `never`. The pull of an
    /// image that was not `present` is recorded for image garbage collection.
    pub(super) async fn pull(&self, c: &ContainerSpec, present: bool) -> Result<(), EngineError> {
        let image = c.image.pull_reference();
        if c.options.pull_policy == Some(PullPolicy::Never) {
            return Err(EngineError::Pull {
                image,
                message: "it is not on the device and the service's pull_policy is `never`: load it on the device (docker load) or change pull_policy".into(),
            });
        }
        tracing::info!(image, "pulling image");
        let platform = c.options.platform.as_deref();
        self.engine.pull(&c.image, platform, self.cfg.auth_for(&c.image.reference)).await?;
        if !present {
            self.record_pull(&image);
        }
        Ok(())
    }

    /// Deletes managed volumes the committed state no longer wants (best effort: a
    /// volume still in use stays, and the next reconcile tries again).
    async fn remove_stale_volumes(&mut self, state: &DesiredState) {
        let view = match self.engine_view().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("cannot list volumes after the commit: {e}");
                return;
            }
        };
        let plan = match plan::plan_containers(state, &self.cfg.fleet, &view) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot plan volume removal: {e}");
                return;
            }
        };
        for name in &plan.remove_volumes {
            if let Err(e) = self.engine.remove_volume(name).await {
                tracing::warn!("cannot remove volume {name} (still in use?): {e}");
            }
        }
    }
}

/// Failures of the device itself (its state directory, its disk, its engine), not of the
/// bundle: a rollback for one of these does not reject the bundle.
fn is_device_fault(code: &str) -> bool {
    matches!(code, "state_dir_error" | "engine_unavailable" | "file_write_failed" | "internal_error")
}
