//! [`FakeEngine`]: an in-memory [`Engine`] for the core's tests. It keeps containers,
//! networks, volumes and images in maps, logs every call, and lets a test make drift
//! happen the way a device would see it: a container killed or deleted behind the
//! agent's back, a healthcheck turning unhealthy, a registry that refuses pulls, an
//! engine that went away. By default it runs healthchecks "itself" (the test sets the
//! health), as `dockerd` does; [`FakeEngine::healthchecks_by_caller`] makes it behave as
//! podman without systemd, where health changes only when the agent runs the check.
//!
//! It answers as `dockerd` does where that matters to the core: creating a container
//! whose image is absent, whose name is taken or whose network is missing fails with the
//! same HTTP statuses; removing an object that is not managed is refused (as
//! [`super::docker::DockerEngine`] refuses it); volumes named in mounts come into
//! existence (unlabelled) when a container is created. It never does I/O.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fleet_spec::model::{ContainerSpec, Hook, ImageRef, MountSource, NetworkSpec, VolumeSpec};

use super::{
    Engine, EngineError, EngineEvent, Health, ObservedContainer, ObservedNetwork, RegistryAuth,
    LABEL_MANAGED, LABEL_SPEC_HASH,
};

/// One call the fake received, in order (see [`FakeEngine::calls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Ping,
    ListManaged,
    ImagePresent(String),
    /// The pull reference, and whether credentials came with it.
    Pull {
        image: String,
        with_auth: bool,
    },
    Create(String),
    Start(String),
    /// The container, and the hook's command joined with spaces.
    Exec {
        name: String,
        command: String,
    },
    Remove {
        name: String,
        grace_secs: u32,
    },
    Inspect(String),
    ListNetworks,
    CreateNetwork(String),
    RemoveNetwork(String),
    ListVolumes,
    CreateVolume(String),
    RemoveVolume(String),
    RemoveImage(String),
    NextEvent,
    RunHealthcheck(String),
}

impl Call {
    /// Does this call change the engine (as opposed to only looking)?
    pub fn is_mutation(&self) -> bool {
        matches!(
            self,
            Call::Pull { .. }
                | Call::Create(_)
                | Call::Start(_)
                | Call::Remove { .. }
                | Call::CreateNetwork(_)
                | Call::RemoveNetwork(_)
                | Call::CreateVolume(_)
                | Call::RemoveVolume(_)
                | Call::RemoveImage(_)
        )
    }
}

/// A container the fake holds.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub id: String,
    /// The spec it was created from (a default spec for [`FakeEngine::add_unmanaged`]).
    pub spec: ContainerSpec,
    /// All its labels: the spec's, the caller's and the managed mark.
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    pub health: Health,
    pub restart_count: u64,
    pub exit_code: Option<i64>,
}

impl FakeContainer {
    fn observed(&self) -> ObservedContainer {
        ObservedContainer {
            id: self.id.clone(),
            name: self.spec.name.clone(),
            image: self.spec.image.pull_reference(),
            labels: self.labels.clone(),
            running: self.running,
            health: self.health,
            restart_count: self.restart_count,
            exit_code: self.exit_code,
        }
    }

    fn is_managed(&self) -> bool {
        is_managed(&self.labels)
    }

    fn has_healthcheck(&self) -> bool {
        self.spec.healthcheck.as_ref().is_some_and(|h| h.test.first().is_some_and(|t| t != "NONE"))
    }
}

#[derive(Debug, Default)]
struct State {
    containers: BTreeMap<String, FakeContainer>,
    /// Network name → labels.
    networks: BTreeMap<String, BTreeMap<String, String>>,
    /// Volume name → labels.
    volumes: BTreeMap<String, BTreeMap<String, String>>,
    /// Pull references present locally.
    images: BTreeSet<String>,
    events: VecDeque<EngineEvent>,
    /// The event stream ends once (`next_event` → `Ok(None)`) when set.
    end_events: bool,
    calls: Vec<Call>,
    fail_pulls: bool,
    /// Exit codes of hooks by their command (joined with spaces); others exit 0.
    exec_results: BTreeMap<String, i64>,
    unreachable: bool,
    next_id: u64,
    /// Set: healthchecks run only through `run_healthcheck`, every so often, and
    /// report this health (unless `check_results` names the container).
    checks_by_caller: Option<(Health, Duration)>,
    check_results: BTreeMap<String, Health>,
    /// What `storage_root` answers.
    storage_root: Option<std::path::PathBuf>,
}

/// An in-memory container engine; see the module docs.
#[derive(Debug, Default)]
pub struct FakeEngine {
    state: Mutex<State>,
    /// Wakes a `next_event` waiting for an event.
    event_ready: tokio::sync::Notify,
}

const SOCKET: &str = "fake://engine";

fn is_managed(labels: &BTreeMap<String, String>) -> bool {
    labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
}

fn of_fleet(labels: &BTreeMap<String, String>, fleet: &str) -> bool {
    labels.get(super::LABEL_FLEET).is_none_or(|f| f == fleet)
}

fn api(op: &'static str, object: &str, status: u16, message: impl Into<String>) -> EngineError {
    EngineError::Api { op, object: object.to_owned(), status, message: message.into() }
}

fn merged_labels(
    own: &BTreeMap<String, String>,
    added: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = own.clone();
    labels.extend(added.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
    labels
}

impl FakeEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake with these images already present (by pull reference).
    pub fn with_images<I, S>(images: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let fake = Self::new();
        fake.lock().images.extend(images.into_iter().map(Into::into));
        fake
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; the state
        // is still good enough to read.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs the call, then fails it if the engine is "unreachable".
    fn enter(&self, call: Call) -> Result<MutexGuard<'_, State>, EngineError> {
        let mut state = self.lock();
        state.calls.push(call);
        if state.unreachable {
            return Err(EngineError::Unreachable {
                socket: SOCKET.to_owned(),
                reason: "set_unreachable(true)".into(),
            });
        }
        Ok(state)
    }

    fn push_event_locked(&self, state: &mut State, name: &str, action: &str) {
        state.events.push_back(EngineEvent { name: name.to_owned(), action: action.to_owned() });
        self.event_ready.notify_one();
    }

    // ---- what tests look at -------------------------------------------------------

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Only the calls that changed something (pull, create, start, remove, ...).
    pub fn mutations(&self) -> Vec<Call> {
        self.lock().calls.iter().filter(|c| c.is_mutation()).cloned().collect()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// A container by name, managed or not.
    pub fn container(&self, name: &str) -> Option<FakeContainer> {
        self.lock().containers.get(name).cloned()
    }

    /// Names of all containers, managed or not.
    pub fn container_names(&self) -> Vec<String> {
        self.lock().containers.keys().cloned().collect()
    }

    pub fn network_names(&self) -> Vec<String> {
        self.lock().networks.keys().cloned().collect()
    }

    pub fn volume_names(&self) -> Vec<String> {
        self.lock().volumes.keys().cloned().collect()
    }

    pub fn has_image(&self, pull_reference: &str) -> bool {
        self.lock().images.contains(pull_reference)
    }

    // ---- what tests do to it ------------------------------------------------------

    /// Makes an image present, as if pulled or side-loaded.
    pub fn add_image(&self, pull_reference: &str) {
        self.lock().images.insert(pull_reference.to_owned());
    }

    /// A container somebody else runs (no managed label): the agent must leave it alone.
    pub fn add_unmanaged(&self, name: &str, labels: BTreeMap<String, String>) {
        self.add_unmanaged_spec(ContainerSpec { name: name.to_owned(), ..Default::default() }, labels);
    }

    /// A container somebody else runs from `spec` (its name, its image).
    pub fn add_unmanaged_spec(&self, spec: ContainerSpec, labels: BTreeMap<String, String>) {
        let mut state = self.lock();
        state.next_id += 1;
        let id = format!("{:064x}", state.next_id);
        let name = spec.name.clone();
        let container = FakeContainer {
            id,
            spec,
            labels,
            running: true,
            health: Health::None,
            restart_count: 0,
            exit_code: None,
        };
        state.containers.insert(name, container);
    }

    /// A network somebody else made (no managed label).
    pub fn add_unmanaged_network(&self, name: &str) {
        self.lock().networks.insert(name.to_owned(), BTreeMap::new());
    }

    /// A volume somebody else made (no managed label).
    pub fn add_unmanaged_volume(&self, name: &str) {
        self.lock().volumes.insert(name.to_owned(), BTreeMap::new());
    }

    /// A volume another fleet's agent manages on the same engine.
    pub fn add_foreign_fleet_volume(&self, name: &str, fleet: &str) {
        let labels = BTreeMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (super::LABEL_FLEET.to_owned(), fleet.to_owned()),
        ]);
        self.lock().volumes.insert(name.to_owned(), labels);
    }

    /// The container's process died (`docker kill`): stopped with exit code 137, and a
    /// `die` event. Returns false when there is no such container.
    pub fn kill(&self, name: &str) -> bool {
        let mut state = self.lock();
        let Some(container) = state.containers.get_mut(name) else { return false };
        container.running = false;
        container.exit_code = Some(137);
        if container.has_healthcheck() {
            container.health = Health::Unhealthy;
        }
        self.push_event_locked(&mut state, name, "die");
        true
    }

    /// The container's process exited by itself with `code`, with a `die` event.
    pub fn exit(&self, name: &str, code: i64) -> bool {
        let mut state = self.lock();
        let Some(container) = state.containers.get_mut(name) else { return false };
        container.running = false;
        container.exit_code = Some(code);
        self.push_event_locked(&mut state, name, "die");
        true
    }

    /// Somebody ran `docker rm -f`: the container is gone, with a `destroy` event.
    pub fn delete(&self, name: &str) -> bool {
        let mut state = self.lock();
        let Some(container) = state.containers.remove(name) else { return false };
        if container.running {
            self.push_event_locked(&mut state, name, "die");
        }
        self.push_event_locked(&mut state, name, "destroy");
        true
    }

    /// The healthcheck now reports `health`, with a `health_status: ...` event.
    pub fn set_health(&self, name: &str, health: Health) -> bool {
        let mut state = self.lock();
        let Some(container) = state.containers.get_mut(name) else { return false };
        container.health = health;
        let action = format!("health_status: {}", health.as_str());
        self.push_event_locked(&mut state, name, &action);
        true
    }

    /// The restart policy restarted the container this many times in total.
    pub fn set_restart_count(&self, name: &str, count: u64) -> bool {
        let mut state = self.lock();
        let Some(container) = state.containers.get_mut(name) else { return false };
        container.restart_count = count;
        true
    }

    /// While set, every pull fails with [`EngineError::Pull`].
    /// Makes a hook whose command (joined with spaces) is `command` exit with `code`.
    pub fn exec_result(&self, command: &str, code: i64) {
        self.lock().exec_results.insert(command.to_owned(), code);
    }

    pub fn fail_pulls(&self, fail: bool) {
        self.lock().fail_pulls = fail;
    }

    /// While set, every call fails with [`EngineError::Unreachable`] (and the event
    /// stream ends, as a real one does when the engine goes away).
    pub fn set_unreachable(&self, unreachable: bool) {
        let mut state = self.lock();
        state.unreachable = unreachable;
        if unreachable {
            state.end_events = true;
            self.event_ready.notify_one();
        }
    }

    /// From now on the fake runs no healthcheck itself, as podman without systemd:
    /// `run_healthcheck` runs it, makes a running container's health `result` (see
    /// [`FakeEngine::set_check_result`]) and asks to be called again after `every`.
    pub fn healthchecks_by_caller(&self, result: Health, every: Duration) {
        self.lock().checks_by_caller = Some((result, every));
    }

    /// What the healthcheck of `name` finds from now on (with
    /// [`FakeEngine::healthchecks_by_caller`]).
    pub fn set_check_result(&self, name: &str, result: Health) {
        self.lock().check_results.insert(name.to_owned(), result);
    }

    /// Makes `storage_root` answer `root` (where pulled images would land).
    pub fn set_storage_root(&self, root: &std::path::Path) {
        self.lock().storage_root = Some(root.to_owned());
    }

    /// Queues an event for `next_event`.
    pub fn push_event(&self, name: &str, action: &str) {
        let mut state = self.lock();
        self.push_event_locked(&mut state, name, action);
    }

    /// Makes the event stream end once: the next `next_event` without a queued event
    /// returns `Ok(None)`.
    pub fn end_event_stream(&self) {
        self.lock().end_events = true;
        self.event_ready.notify_one();
    }
}

impl Engine for FakeEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        self.enter(Call::Ping).map(drop)
    }

    async fn list_managed(&self) -> Result<Vec<ObservedContainer>, EngineError> {
        let state = self.enter(Call::ListManaged)?;
        Ok(state.containers.values().filter(|c| c.is_managed()).map(FakeContainer::observed).collect())
    }

    async fn image_present(&self, image: &ImageRef) -> Result<bool, EngineError> {
        let reference = image.pull_reference();
        let state = self.enter(Call::ImagePresent(reference.clone()))?;
        Ok(state.images.contains(&reference))
    }

    async fn storage_root(&self) -> Result<Option<std::path::PathBuf>, EngineError> {
        Ok(self.lock().storage_root.clone())
    }

    async fn pull(
        &self,
        image: &ImageRef,
        _platform: Option<&str>,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), EngineError> {
        let reference = image.pull_reference();
        let mut state = self.enter(Call::Pull { image: reference.clone(), with_auth: auth.is_some() })?;
        if state.fail_pulls {
            return Err(EngineError::Pull { image: reference, message: "fail_pulls(true)".into() });
        }
        state.images.insert(reference);
        Ok(())
    }

    async fn exec(&self, name: &str, hook: &Hook, _timeout: Duration) -> Result<i64, EngineError> {
        let command = hook.command.join(" ");
        let state = self.enter(Call::Exec { name: name.to_owned(), command: command.clone() })?;
        match state.containers.get(name) {
            Some(c) if c.running => Ok(state.exec_results.get(&command).copied().unwrap_or(0)),
            _ => Err(api("exec", name, 409, format!("Container {name} is not running"))),
        }
    }

    async fn create(
        &self,
        spec: &ContainerSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        let mut state = self.enter(Call::Create(spec.name.clone()))?;
        let image = spec.image.pull_reference();
        if !state.images.contains(&image) {
            return Err(api("create", &spec.name, 404, format!("No such image: {image}")));
        }
        if state.containers.contains_key(&spec.name) {
            let message = format!("Conflict. The container name \"/{}\" is already in use", spec.name);
            return Err(api("create", &spec.name, 409, message));
        }
        if spec.network_mode.is_none() {
            if let Some(missing) = spec.networks.iter().find(|n| !state.networks.contains_key(&n.network)) {
                return Err(api("create", &spec.name, 404, format!("network {} not found", missing.network)));
            }
        }
        for mount in &spec.mounts {
            if let MountSource::Volume(volume) = &mount.source {
                state.volumes.entry(volume.clone()).or_default();
            }
        }
        state.next_id += 1;
        let id = format!("{:064x}", state.next_id);
        let container = FakeContainer {
            id: id.clone(),
            spec: spec.clone(),
            labels: merged_labels(&spec.labels, labels),
            running: false,
            health: Health::None,
            restart_count: 0,
            exit_code: None,
        };
        state.containers.insert(spec.name.clone(), container);
        self.push_event_locked(&mut state, &spec.name, "create");
        Ok(id)
    }

    async fn start(&self, name: &str) -> Result<(), EngineError> {
        let mut state = self.enter(Call::Start(name.to_owned()))?;
        let Some(container) = state.containers.get_mut(name) else {
            return Err(api("start", name, 404, format!("No such container: {name}")));
        };
        if container.running {
            return Ok(());
        }
        container.running = true;
        container.exit_code = None;
        container.health = if container.has_healthcheck() { Health::Starting } else { Health::None };
        self.push_event_locked(&mut state, name, "start");
        Ok(())
    }

    async fn remove(&self, name: &str, grace_secs: u32) -> Result<(), EngineError> {
        let mut state = self.enter(Call::Remove { name: name.to_owned(), grace_secs })?;
        let Some(container) = state.containers.get(name) else { return Ok(()) };
        if !container.is_managed() {
            return Err(api(
                "remove",
                name,
                409,
                format!("refusing to touch it: it has no {LABEL_MANAGED}=true label"),
            ));
        }
        let was_running = container.running;
        state.containers.remove(name);
        if was_running {
            self.push_event_locked(&mut state, name, "die");
        }
        self.push_event_locked(&mut state, name, "destroy");
        Ok(())
    }

    async fn inspect(&self, name: &str) -> Result<Option<ObservedContainer>, EngineError> {
        let state = self.enter(Call::Inspect(name.to_owned()))?;
        Ok(state.containers.get(name).filter(|c| c.is_managed()).map(FakeContainer::observed))
    }

    async fn list_managed_networks(&self, fleet: &str) -> Result<Vec<ObservedNetwork>, EngineError> {
        let state = self.enter(Call::ListNetworks)?;
        Ok(state
            .networks
            .iter()
            .filter(|(_, labels)| is_managed(labels) && of_fleet(labels, fleet))
            .map(|(name, labels)| ObservedNetwork {
                name: name.clone(),
                spec_hash: labels.get(LABEL_SPEC_HASH).cloned(),
            })
            .collect())
    }

    async fn create_network(
        &self,
        spec: &NetworkSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        let mut state = self.enter(Call::CreateNetwork(spec.name.clone()))?;
        state.networks.entry(spec.name.clone()).or_insert_with(|| merged_labels(&spec.labels, labels));
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<(), EngineError> {
        let mut state = self.enter(Call::RemoveNetwork(name.to_owned()))?;
        let Some(labels) = state.networks.get(name) else { return Ok(()) };
        if !is_managed(labels) {
            return Err(api(
                "remove network",
                name,
                409,
                format!("refusing to touch it: no {LABEL_MANAGED}=true label"),
            ));
        }
        let in_use =
            state.containers.values().any(|c| c.running && c.spec.networks.iter().any(|n| n.network == name));
        if in_use {
            return Err(api(
                "remove network",
                name,
                403,
                format!("error while removing network: network {name} has active endpoints"),
            ));
        }
        state.networks.remove(name);
        Ok(())
    }

    async fn list_managed_volumes(&self, fleet: &str) -> Result<Vec<String>, EngineError> {
        let state = self.enter(Call::ListVolumes)?;
        Ok(state
            .volumes
            .iter()
            .filter(|(_, labels)| is_managed(labels) && of_fleet(labels, fleet))
            .map(|(name, _)| name.clone())
            .collect())
    }

    async fn create_volume(
        &self,
        spec: &VolumeSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        let mut state = self.enter(Call::CreateVolume(spec.name.clone()))?;
        // Like dockerd: an existing volume is kept as it is, data and labels.
        state.volumes.entry(spec.name.clone()).or_insert_with(|| merged_labels(&spec.labels, labels));
        Ok(())
    }

    async fn remove_image(&self, reference: &str) -> Result<bool, EngineError> {
        let mut state = self.enter(Call::RemoveImage(reference.to_owned()))?;
        // Like dockerd without `force`: an image a container uses stays (409).
        if state.containers.values().any(|c| c.spec.image.pull_reference() == reference) {
            return Ok(false);
        }
        state.images.remove(reference);
        Ok(true)
    }

    async fn remove_volume(&self, name: &str) -> Result<(), EngineError> {
        let mut state = self.enter(Call::RemoveVolume(name.to_owned()))?;
        let Some(labels) = state.volumes.get(name) else { return Ok(()) };
        if !is_managed(labels) {
            return Err(api(
                "remove volume",
                name,
                409,
                format!("refusing to touch it: no {LABEL_MANAGED}=true label"),
            ));
        }
        let in_use = state
            .containers
            .values()
            .any(|c| c.spec.mounts.iter().any(|m| matches!(&m.source, MountSource::Volume(v) if v == name)));
        if in_use {
            return Err(api("remove volume", name, 409, format!("remove {name}: volume is in use")));
        }
        state.volumes.remove(name);
        Ok(())
    }

    /// Returns queued events in order; waits while there is none (forever, as a real
    /// stream does, unless the test ends the stream or makes the engine unreachable).
    async fn next_event(&self) -> Result<Option<EngineEvent>, EngineError> {
        self.lock().calls.push(Call::NextEvent);
        loop {
            {
                let mut state = self.lock();
                if let Some(event) = state.events.pop_front() {
                    return Ok(Some(event));
                }
                if state.end_events {
                    state.end_events = false;
                    return Ok(None);
                }
                if state.unreachable {
                    return Err(EngineError::Unreachable {
                        socket: SOCKET.to_owned(),
                        reason: "set_unreachable(true)".into(),
                    });
                }
            }
            // `notify_one` stores a permit when nobody waits, so an event pushed
            // between the check above and this await is not missed.
            self.event_ready.notified().await;
        }
    }

    async fn run_healthcheck(&self, name: &str) -> Result<Option<Duration>, EngineError> {
        let mut state = self.enter(Call::RunHealthcheck(name.to_owned()))?;
        let Some((default, every)) = state.checks_by_caller else { return Ok(None) };
        let result = state.check_results.get(name).copied().unwrap_or(default);
        let Some(container) = state.containers.get_mut(name) else { return Ok(Some(every)) };
        if container.is_managed() && container.running && container.has_healthcheck() {
            let changed = container.health != result;
            container.health = result;
            if changed {
                let action = format!("health_status: {}", result.as_str());
                self.push_event_locked(&mut state, name, &action);
            }
        }
        Ok(Some(every))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::model::{Healthcheck, Mount, NetworkAttachment};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(f)
    }

    fn web() -> ContainerSpec {
        ContainerSpec {
            name: "app-web".into(),
            image: ImageRef { reference: "reg/web:1".into(), digest: Some("sha256:ab".into()) },
            networks: vec![NetworkAttachment { network: "app_default".into(), aliases: vec!["web".into()] }],
            mounts: vec![Mount {
                source: MountSource::Volume("app_data".into()),
                target: "/d".into(),
                read_only: false,
            }],
            healthcheck: Some(Healthcheck { test: vec!["CMD".into(), "true".into()], ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_container_lives_through_pull_create_start_and_drift() {
        block_on(async {
            let engine = FakeEngine::new();
            let spec = web();
            assert!(!engine.image_present(&spec.image).await.expect("reachable"));
            engine.pull(&spec.image, None, None).await.expect("pull works");
            assert!(engine.has_image("reg/web@sha256:ab"));

            let no_network = engine.create(&spec, &BTreeMap::new()).await;
            assert!(matches!(no_network, Err(EngineError::Api { status: 404, .. })), "{no_network:?}");
            engine
                .create_network(
                    &NetworkSpec { name: "app_default".into(), ..Default::default() },
                    &BTreeMap::new(),
                )
                .await
                .expect("network");
            let labels = BTreeMap::from([("io.fleet.app".to_owned(), "app".to_owned())]);
            engine.create(&spec, &labels).await.expect("create");
            let again = engine.create(&spec, &labels).await;
            assert!(matches!(again, Err(EngineError::Api { status: 409, .. })), "{again:?}");
            engine.start("app-web").await.expect("start");

            let listed = engine.list_managed().await.expect("list");
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
            assert_eq!(listed[0].labels.get("io.fleet.app").map(String::as_str), Some("app"));
            assert_eq!((listed[0].running, listed[0].health), (true, Health::Starting));
            assert_eq!(engine.volume_names(), ["app_data"], "a mounted volume comes into existence");

            assert!(engine.set_health("app-web", Health::Healthy));
            assert!(engine.kill("app-web"));
            let killed = engine.inspect("app-web").await.expect("inspect").expect("still there");
            assert_eq!((killed.running, killed.exit_code), (false, Some(137)));

            let mut actions = Vec::new();
            while let Some(event) = engine.lock().events.pop_front() {
                actions.push(event.action);
            }
            assert_eq!(actions, ["create", "start", "health_status: healthy", "die"]);

            assert!(engine.delete("app-web"));
            assert_eq!(engine.inspect("app-web").await.expect("inspect"), None);
            assert_eq!(
                engine.mutations(),
                [
                    Call::Pull { image: "reg/web@sha256:ab".into(), with_auth: false },
                    Call::Create("app-web".into()),
                    Call::CreateNetwork("app_default".into()),
                    Call::Create("app-web".into()),
                    Call::Create("app-web".into()),
                    Call::Start("app-web".into()),
                ]
            );
        });
    }

    #[test]
    fn unmanaged_objects_are_invisible_and_untouchable() {
        block_on(async {
            let engine = FakeEngine::new();
            engine.add_unmanaged("theirs", BTreeMap::from([("x".to_owned(), "y".to_owned())]));
            engine.add_unmanaged_network("their_net");
            engine.add_unmanaged_volume("their_vol");
            assert!(engine.list_managed().await.expect("list").is_empty());
            assert_eq!(engine.inspect("theirs").await.expect("inspect"), None);
            assert!(engine.list_managed_networks("acme").await.expect("list").is_empty());
            assert!(engine.list_managed_volumes("acme").await.expect("list").is_empty());
            assert!(matches!(engine.remove("theirs", 1).await, Err(EngineError::Api { status: 409, .. })));
            assert!(matches!(
                engine.remove_network("their_net").await,
                Err(EngineError::Api { status: 409, .. })
            ));
            assert!(matches!(
                engine.remove_volume("their_vol").await,
                Err(EngineError::Api { status: 409, .. })
            ));
            assert_eq!(engine.container_names(), ["theirs"]);
            engine.remove("not-there", 1).await.expect("a missing container is not an error");
        });
    }

    #[test]
    fn failure_switches_fail_the_right_calls() {
        block_on(async {
            let engine = FakeEngine::new();
            engine.fail_pulls(true);
            let image = ImageRef { reference: "reg/a:1".into(), digest: None };
            assert!(matches!(engine.pull(&image, None, None).await, Err(EngineError::Pull { .. })));
            engine.fail_pulls(false);
            engine.pull(&image, None, None).await.expect("pulls again");

            engine.set_unreachable(true);
            assert!(matches!(engine.ping().await, Err(EngineError::Unreachable { .. })));
            assert!(matches!(engine.list_managed().await, Err(EngineError::Unreachable { .. })));
            assert_eq!(engine.next_event().await.expect("stream ends"), None);
            assert!(matches!(engine.next_event().await, Err(EngineError::Unreachable { .. })));
            engine.set_unreachable(false);
            engine.ping().await.expect("back");
        });
    }

    #[test]
    fn next_event_waits_for_an_event_pushed_later() {
        block_on(async {
            let engine = FakeEngine::new();
            let waiter = engine.next_event();
            let pusher = async {
                tokio::task::yield_now().await;
                engine.push_event("a", "die");
            };
            let (event, ()) = tokio::join!(waiter, pusher);
            assert_eq!(event.expect("ok"), Some(EngineEvent { name: "a".into(), action: "die".into() }));
            engine.end_event_stream();
            assert_eq!(engine.next_event().await.expect("ok"), None);
        });
    }
}
