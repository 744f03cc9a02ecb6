//! Recovery on start: the last good bundle, and whatever the journal says was in flight.

use super::*;

impl<E: Engine> Agent<E> {
    // ---- recovery -------------------------------------------------------------------

    /// Loads the last good bundle and finishes whatever the journal says was in flight.
    pub async fn recover(&mut self) -> Result<Option<Outcome>, AgentError> {
        if let Some(record) = self.store.applied()? {
            match self.load_stored(&record.digest) {
                Ok((_, state)) => self.current = Some(Current { record, state }),
                Err(e) => {
                    // Nothing is converged in its place, least of all "nothing" (case 8).
                    tracing::error!(
                        "the last good bundle cannot be loaded; keeping the device as it is: {e}"
                    );
                    self.set_error("last_good_unreadable", &e.to_string());
                    self.last_good_unreadable = Some(e.to_string());
                }
            }
        }
        let records = self.journal.open()?;
        let decision = journal::decide(&records);
        // The clean case (every start, every `apply`) is not news.
        if matches!(decision, Recovery::Clean) {
            tracing::debug!(records = records.len(), "recovery: journal clean");
        } else {
            tracing::info!(?decision, records = records.len(), "recovery");
        }
        let outcome = match decision {
            Recovery::Clean => {
                self.journal.reset()?;
                if self.current.is_some() {
                    self.on(Command::Recovered)?;
                }
                None
            }
            Recovery::FinishCommit { digest, version, commit, at } => {
                let (m, state) = self.load_stored(&digest)?;
                self.raise_trust(&m)?;
                self.finish_commit(AppliedRecord { digest, version, commit, at }, state)?;
                self.on(Command::Recovered)?;
                None
            }
            Recovery::ResumeApply { digest, interrupted, .. } => {
                tracing::warn!(digest, ?interrupted, "resuming an interrupted apply");
                match self.load_stored(&digest) {
                    Ok((m, state)) => {
                        self.resuming(&digest, &m)?;
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
                        Some(self.rollback(&digest, None, e.code(), &e.to_string(), false).await?)
                    }
                }
            }
            Recovery::ResumeHealth { digest, .. } => match self.load_stored(&digest) {
                Ok((m, state)) => {
                    self.resuming(&digest, &m)?;
                    self.on(Command::ResumeHealth)?;
                    Some(self.await_health(&digest, &m, &state).await?)
                }
                Err(e) => {
                    self.on(Command::ResumeRollback)?;
                    Some(self.rollback(&digest, None, e.code(), &e.to_string(), false).await?)
                }
            },
            Recovery::RollBack { from, code, reason, .. } => {
                self.on(Command::ResumeRollback)?;
                let version = self.load_stored(&from).ok().map(|(m, _)| m.version);
                Some(self.rollback(&from, version, &code, &reason, true).await?)
            }
            Recovery::FinishRollback { from, .. } => {
                if !self.store.rejected()?.contains_key(&from) {
                    let r = Rejection {
                        code: "rolled_back".into(),
                        reason: "rolled back".into(),
                        version: None,
                        at: self.clock.now(),
                        config: None,
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

    /// A bundle resumed from the journal is what the device runs toward: it is desired,
    /// and trusted as far as its version and creation time.
    fn resuming(&mut self, digest: &str, m: &Manifest) -> Result<(), AgentError> {
        self.raise_trust(m)?;
        self.desired =
            Some(VersionRef { version: m.version, digest: digest.into(), commit: m.commit.clone() });
        Ok(())
    }

    /// Raises the trust state to a bundle resumed from the journal: the journal's `Begin`
    /// is written before the trust state (case 6), so a crash between the two leaves a
    /// journal that knows a newer version than `trust.json`.
    fn raise_trust(&mut self, m: &Manifest) -> Result<(), AgentError> {
        let trust = self.store.trust()?;
        let raised = TrustState {
            last_version: Some(trust.last_version.map_or(m.version, |v| v.max(m.version))),
            last_known_time: trust.last_known_time.max(m.created_at),
        };
        if raised != trust {
            tracing::info!(version = m.version, "raising the trust state to the resumed bundle");
            self.store.save_trust(&raised)?;
        }
        Ok(())
    }

    /// Loads a bundle the agent stored itself after it passed verification: its content
    /// address and payload are checked again (the disk is not trusted); signatures,
    /// version and expiry are not (they were when it came). So a last good bundle stays
    /// readable after its signing key was rotated out (case 8).
    pub(super) fn load_stored(&self, digest: &str) -> Result<(Manifest, DesiredState), AgentError> {
        let bad = |reason: String| AgentError::StoredBundle { digest: digest.into(), reason };
        let bytes = self.store.read_bundle(digest).map_err(|e| bad(e.to_string()))?;
        if bundle::content_address(&bytes) != digest {
            return Err(bad("its content does not match its digest".into()));
        }
        let (manifest, mut state) =
            bundle::open_accepted(&bytes, &self.cfg.limits).map_err(|e| bad(e.to_string()))?;
        if manifest.fleet != self.cfg.fleet || manifest.device != self.cfg.device {
            return Err(bad(format!("it is for device {} of fleet {}", manifest.device, manifest.fleet)));
        }
        self.unseal(&mut state).map_err(|(_, reason)| bad(reason))?;
        Ok((manifest, state))
    }
}
