//! The container engine as the agent sees it: a small trait over the Docker Engine API.
//!
//! [`docker::DockerEngine`] speaks the Docker Engine API v1.41 over a unix socket (it
//! works against `dockerd`, balenaEngine and podman's compatible service);
//! [`fake::FakeEngine`] is an in-memory engine for tests of the core.
//!
//! Ownership: every object the agent creates carries the label [`LABEL_MANAGED`]`=true`;
//! the agent lists, changes and removes only objects with that label, and never touches
//! anything else on the engine.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use fleet_spec::model::{ContainerSpec, Hook, ImageRef, NetworkSpec, VolumeSpec};

pub mod docker;
pub mod fake;

/// Marks an object as managed by the agent.
pub const LABEL_MANAGED: &str = "io.fleet.managed";
/// The fleet the object belongs to.
pub const LABEL_FLEET: &str = "io.fleet.fleet";
/// The app (fleet repo `apps/<app>`) a container belongs to.
pub const LABEL_APP: &str = "io.fleet.app";
/// `DesiredState::container_hash` of the spec the container was created from.
pub const LABEL_SPEC_HASH: &str = "io.fleet.spec-hash";

/// A managed network as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNetwork {
    pub name: String,
    /// `LABEL_SPEC_HASH`: what the network was created from (`None` before the agent
    /// labelled networks).
    pub spec_hash: Option<String>,
}

/// A managed container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedContainer {
    pub id: String,
    pub name: String,
    /// The image reference the container was created from.
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    pub health: Health,
    pub restart_count: u64,
    /// Exit code of the last run, when it has stopped.
    pub exit_code: Option<i64>,
}

impl ObservedContainer {
    pub fn spec_hash(&self) -> Option<&str> {
        self.labels.get(LABEL_SPEC_HASH).map(String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The container has no healthcheck.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::None => "none",
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Credentials for one registry, from `agent.toml`.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    pub server: String,
}

/// Never prints the password (credentials end up in logs otherwise).
impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("server", &self.server)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot be reached: the device is `degraded` until it is back.
    #[error("container engine at {socket} is unreachable: {reason} (is dockerd/podman running?)")]
    Unreachable { socket: String, reason: String },
    #[error("engine refused {op} on {object}: HTTP {status}: {message}")]
    Api { op: &'static str, object: String, status: u16, message: String },
    #[error("image {image} cannot be pulled: {message}")]
    Pull { image: String, message: String },
    #[error("engine answered {op} with a body that cannot be read: {reason}")]
    Protocol { op: &'static str, reason: String },
}

/// Something the engine reports about a managed container (from `/events`), which
/// makes the agent reconcile now instead of at its next tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    /// Container name.
    pub name: String,
    /// Docker's action: `die`, `stop`, `destroy`, `health_status: unhealthy`, ...
    pub action: String,
}

/// The operations the agent needs from a container engine. Names are engine-wide
/// container/network/volume names; `labels` are added on top of the spec's own.
#[allow(async_fn_in_trait)]
pub trait Engine {
    /// Is the engine reachable?
    fn ping(&self) -> impl Future<Output = Result<(), EngineError>>;

    /// All containers (running or not) with `LABEL_MANAGED=true`.
    fn list_managed(&self) -> impl Future<Output = Result<Vec<ObservedContainer>, EngineError>>;

    /// Is this image (by `ImageRef::pull_reference()`) present locally?
    fn image_present(&self, image: &ImageRef) -> impl Future<Output = Result<bool, EngineError>>;

    /// Pulls the image (by digest when pinned), for `platform` (`linux/arm64`) when
    /// given. Waits until the pull finished and reports a pull that failed half-way as
    /// an error.
    fn pull(
        &self,
        image: &ImageRef,
        platform: Option<&str>,
        auth: Option<&RegistryAuth>,
    ) -> impl Future<Output = Result<(), EngineError>>;

    /// Removes the image `reference` (a pull reference: untags it, and deletes the image
    /// when nothing else names it), never by force. `Ok(true)`: removed, or already gone;
    /// `Ok(false)`: a container (any, managed or not) still uses it, so it stays.
    fn remove_image(&self, reference: &str) -> impl Future<Output = Result<bool, EngineError>>;

    /// Where the engine stores images (`DockerRootDir` of `GET /info`), for the disk
    /// check before a pull; `None` when the engine does not say.
    fn storage_root(&self) -> impl Future<Output = Result<Option<PathBuf>, EngineError>>;

    /// Runs `hook` in the running container `name` and waits, up to `timeout`, for its
    /// exit code (Compose `post_start` / `pre_stop`).
    fn exec(
        &self,
        name: &str,
        hook: &Hook,
        timeout: Duration,
    ) -> impl Future<Output = Result<i64, EngineError>>;

    /// Creates (does not start) a container from the spec, attached to its networks with
    /// their aliases, with `labels` added. Returns the container id.
    fn create(
        &self,
        spec: &ContainerSpec,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<String, EngineError>>;

    /// Starts a container; starting a running one is not an error.
    fn start(&self, name: &str) -> impl Future<Output = Result<(), EngineError>>;

    /// Stops (with the given grace period) and removes a container, and its anonymous
    /// volumes; a missing container is not an error.
    fn remove(&self, name: &str, grace_secs: u32) -> impl Future<Output = Result<(), EngineError>>;

    /// One managed container by name, `None` when it does not exist.
    fn inspect(&self, name: &str) -> impl Future<Output = Result<Option<ObservedContainer>, EngineError>>;

    /// Networks with `LABEL_MANAGED=true`, by name.
    /// (Of fleet `fleet`: another fleet's objects on the same engine are never listed; an
    /// object without a fleet label counts as this fleet's, as for containers.)
    fn list_managed_networks(
        &self,
        fleet: &str,
    ) -> impl Future<Output = Result<Vec<ObservedNetwork>, EngineError>>;
    /// Creates a bridge network with the spec's IPAM pools, IPv6 and driver options (no
    /// error if it exists).
    fn create_network(
        &self,
        spec: &NetworkSpec,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), EngineError>>;
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<(), EngineError>>;

    /// Names of volumes with `LABEL_MANAGED=true` of fleet `fleet` (as for networks).
    fn list_managed_volumes(&self, fleet: &str) -> impl Future<Output = Result<Vec<String>, EngineError>>;
    /// Creates a local volume (no error if it exists; its data is kept).
    fn create_volume(
        &self,
        spec: &VolumeSpec,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), EngineError>>;
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<(), EngineError>>;

    /// Waits for the next event about a managed container. Returns `Ok(None)` when the
    /// event stream ended (the caller reconnects later).
    fn next_event(&self) -> impl Future<Output = Result<Option<EngineEvent>, EngineError>>;

    /// Drives the healthcheck of a managed container on an engine that does not run
    /// healthchecks by itself (podman, which leaves that to systemd timers: without
    /// systemd a container's health stays `starting` for ever).
    ///
    /// `Ok(None)`: the engine runs healthchecks itself (`dockerd`, balenaEngine); the
    /// caller need not call again. `Ok(Some(after))`: the check ran if it was due (the
    /// engine decides from the container's healthcheck interval and start period, and
    /// runs nothing when a check ran recently, e.g. from a systemd timer); call again
    /// after `after`. A container that is gone, stopped or without a healthcheck is not
    /// an error.
    ///
    /// (No default on purpose: a wrapper that forgot to pass it on would leave podman's
    /// containers `starting` for ever.)
    fn run_healthcheck(&self, name: &str) -> impl Future<Output = Result<Option<Duration>, EngineError>>;
}
