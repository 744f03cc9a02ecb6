//! Reconcile: repairing drift of the committed state (timer, engine events).

use super::*;

impl<E: Engine> Agent<E> {
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
        let repaired = match self.converge(&current.state, Mode::Reconcile).await {
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
            self.event(EventKind::DriftRepaired { kind: *kind, name: name.clone() });
        }
        if was_down && self.last_error.as_ref().is_some_and(|e| e.code == "engine_unavailable") {
            self.last_error = None;
        }
        self.refresh_containers().await;
        self.publish_status();
        self.collect_images().await;
        Ok(repaired)
    }
}
