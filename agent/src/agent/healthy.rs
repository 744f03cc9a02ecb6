//! Health: waiting for an applied state to be healthy, the container statuses, and the
//! healthchecks the engine does not run itself.

use super::*;

impl<E: Engine> Agent<E> {
    /// Polls the engine until the state is healthy, failed, or the timeout passed.
    pub(super) async fn wait_healthy(&mut self, state: &DesiredState) -> Verdict {
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

    pub(super) async fn refresh_containers(&mut self) {
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
    pub(super) fn track_healthchecks(&mut self, observed: &[ObservedContainer]) {
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
    pub(super) async fn drive_healthchecks(&mut self, observed: &[ObservedContainer]) {
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
    pub(super) async fn run_healthcheck(&mut self, name: &str) {
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
}
