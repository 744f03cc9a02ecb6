//! Moving the device to a desired state, effect by effect, each journaled when it is
//! part of an apply or a rollback.

use super::*;
use crate::engine::LABEL_SPEC_HASH;
use fleet_spec::model::Entry;

/// How long a `post_start` hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the device is being converged, which decides what is journaled and what may be
/// deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Applying a new bundle: journaled; volumes it no longer wants are kept until the
    /// commit (a rollback must find their data).
    Apply,
    /// Restoring the last good state: journaled.
    Rollback,
    /// Repairing drift of the committed state: not journaled.
    Reconcile,
}

impl Mode {
    fn journaled(self) -> bool {
        self != Mode::Reconcile
    }
}

impl<E: Engine> Agent<E> {
    pub(super) fn step(&mut self, journaled: bool, intent: bool, step: &Step) -> Result<(), AgentError> {
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
    pub(super) async fn converge(
        &mut self,
        state: &DesiredState,
        mode: Mode,
    ) -> Result<Vec<(DriftKind, String)>, AgentError> {
        let journaled = mode.journaled();
        let mut repaired = Vec::new();
        let roots = self.cfg.allowed_roots.clone();

        // Files first: containers may mount them.
        let mut on_disk = BTreeMap::new();
        for f in state.entries() {
            on_disk.insert(f.path().to_string(), files::observe(f.path(), &roots)?);
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
                let file = state.entry(&w.path).expect("planned from the state");
                (w, file, file.sha256_hex())
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
            let foreign =
                !self.managed.contains_key(&w.path) && on_disk.get(&w.path).is_some_and(Option::is_some);
            if foreign {
                // A file the device had before the agent (a provisioning certificate,
                // say): kept, to be put back when the bundle no longer names it
                // (Hardening I, case 11).
                crate::originals::keep(&self.store, &w.path, &roots)?;
            }
            if self.managed.get(&w.path) != Some(&sha) {
                self.managed.insert(w.path.clone(), sha.clone());
                self.store.save_managed(&self.managed)?;
            }
            match file {
                Entry::Inline(file) => files::write_managed(file, &roots)?,
                Entry::Artifact(a) => files::write_managed_blob(a, &self.store.blob_path(&sha), &roots)?,
            };
            self.step(journaled, false, &step)?;
            if let Some(kind) = w.drift {
                repaired.push((kind, w.path.clone()));
            }
        }

        // Containers.
        let view = self.engine_view().await?;
        let cplan = plan::plan_containers(state, &self.cfg.fleet, &view)?;
        let obj_labels = plan::object_labels(&self.cfg.fleet);
        // A network whose spec changed: off with what sits on it, then with it.
        for name in &cplan.detach {
            self.remove_container(journaled, name, state).await?;
        }
        for name in &cplan.recreate_networks {
            let step = Step::RemoveNetwork { name: name.clone() };
            self.step(journaled, true, &step)?;
            self.engine.remove_network(name).await?;
            self.step(journaled, false, &step)?;
        }
        for name in &cplan.create_networks {
            let spec = state.networks.iter().find(|n| &n.name == name).expect("planned from the state");
            let step = Step::CreateNetwork { name: name.clone() };
            self.step(journaled, true, &step)?;
            let mut labels = obj_labels.clone();
            labels.insert(LABEL_SPEC_HASH.to_string(), DesiredState::network_hash(spec));
            self.engine.create_network(spec, &labels).await?;
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
            self.remove_container(journaled, name, state).await?;
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
                        self.pull(spec, false).await?;
                    }
                }
                if s.need == Need::Recreate {
                    self.remove_container(journaled, &s.name, state).await?;
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
            self.post_start(spec).await?;
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
        let remove_volumes = if mode == Mode::Apply { &[][..] } else { &cplan.remove_volumes[..] };
        for name in remove_volumes {
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
            let removed = match crate::originals::restore(&self.store, path, &roots) {
                Ok(true) => Ok(()),
                Ok(false) => files::remove_managed(path, &roots),
                Err(e) => Err(e),
            };
            match removed {
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

    /// Removes a container, journaled, after its `pre_stop` hooks.
    async fn remove_container(
        &mut self,
        journaled: bool,
        name: &str,
        target: &DesiredState,
    ) -> Result<(), AgentError> {
        let step = Step::RemoveContainer { name: name.to_string() };
        self.step(journaled, true, &step)?;
        let spec = self.running_spec(name, target);
        let grace = stop_grace_secs(spec, self.cfg.stop_grace_secs);
        if let Some(spec) = spec {
            self.pre_stop(spec, grace).await;
        }
        self.engine.remove(name, grace).await?;
        self.step(journaled, false, &step)
    }

    /// Container `name` as it runs now: its spec in the applied state, else in `target`.
    fn running_spec<'a>(&'a self, name: &str, target: &'a DesiredState) -> Option<&'a ContainerSpec> {
        let running = self.current.as_ref().and_then(|c| c.state.containers.iter().find(|s| s.name == name));
        running.or_else(|| target.containers.iter().find(|s| s.name == name))
    }

    /// Runs the container's `post_start` hooks; one that fails or exits non-zero fails
    /// the step (an update then rolls back).
    async fn post_start(&self, spec: &fleet_spec::model::ContainerSpec) -> Result<(), EngineError> {
        for hook in &spec.options.post_start {
            let code = self.engine.exec(&spec.name, hook, HOOK_TIMEOUT).await?;
            if code != 0 {
                return Err(EngineError::Api {
                    op: "post_start",
                    object: spec.name.clone(),
                    status: 500,
                    message: format!("post_start `{}` exited with {code}", hook.command.join(" ")),
                });
            }
        }
        Ok(())
    }

    /// Runs the `pre_stop` hooks of a container about to stop: best effort, each within
    /// its stop grace period.
    async fn pre_stop(&self, spec: &ContainerSpec, grace_secs: u32) {
        let (name, grace) = (spec.name.as_str(), Duration::from_secs(grace_secs.into()));
        for hook in &spec.options.pre_stop {
            let command = hook.command.join(" ");
            match self.engine.exec(name, hook, grace).await {
                Ok(0) => {}
                Ok(code) => tracing::warn!(container = name, "pre_stop `{command}` exited with {code}"),
                Err(e) => tracing::warn!(container = name, "pre_stop `{command}`: {e}"),
            }
        }
    }

    pub(super) async fn engine_view(&self) -> Result<EngineView, EngineError> {
        Ok(EngineView {
            containers: self.engine.list_managed().await?,
            networks: self.engine.list_managed_networks(&self.cfg.fleet).await?,
            volumes: self.engine.list_managed_volumes(&self.cfg.fleet).await?,
        })
    }

    /// Waits until the dependencies of `spec` meet their conditions (bounded by the
    /// health timeout; then it goes on and health judges the result).
    pub(super) async fn wait_dependencies(
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
}

/// The longest stop grace period the agent waits for (a signed bundle's
/// `stop_grace_period` beyond it is cut to it): one stopping container must not hold the
/// agent, and so every other repair and update, for hours.
const MAX_STOP_GRACE_SECS: u32 = 15 * 60;

/// How long container `spec` gets to stop: its Compose `stop_grace_period` when it has one
/// (bounded by [`MAX_STOP_GRACE_SECS`]), else the device's `engine.stop_grace_secs`.
pub(super) fn stop_grace_secs(spec: Option<&ContainerSpec>, default_secs: u32) -> u32 {
    match spec.and_then(|s| s.options.stop_timeout_s) {
        Some(secs) => u32::try_from(secs).unwrap_or(u32::MAX).min(MAX_STOP_GRACE_SECS),
        None => default_secs,
    }
}
