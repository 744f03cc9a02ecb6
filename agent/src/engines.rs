//! Choosing the container engine at run time without compiling the agent twice:
//! [`AnyEngine`] is the Docker API adapter or [`NoEngine`] for files-only devices
//! (`[engine] socket = "none"`).
//!
//! This module only delegates; it never talks to an engine itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fleet_spec::model::{ContainerSpec, Hook, ImageRef, NetworkSpec, VolumeSpec};

use crate::engine::docker::DockerEngine;
use crate::engine::{Engine, EngineError, EngineEvent, ObservedContainer, ObservedNetwork, RegistryAuth};

/// A device without a container engine: nothing is managed, and any attempt to run a
/// container is an error (a bundle with containers is refused before it is applied).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEngine;

fn disabled() -> EngineError {
    EngineError::Unreachable {
        socket: "none".into(),
        reason: "the engine is disabled in agent.toml (engine.socket = \"none\")".into(),
    }
}

impl Engine for NoEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }
    async fn list_managed(&self) -> Result<Vec<ObservedContainer>, EngineError> {
        Ok(Vec::new())
    }
    async fn image_present(&self, _image: &ImageRef) -> Result<bool, EngineError> {
        Err(disabled())
    }
    async fn pull(
        &self,
        _image: &ImageRef,
        _platform: Option<&str>,
        _auth: Option<&RegistryAuth>,
    ) -> Result<(), EngineError> {
        Err(disabled())
    }
    async fn remove_image(&self, _reference: &str) -> Result<bool, EngineError> {
        Err(disabled())
    }
    async fn storage_root(&self) -> Result<Option<PathBuf>, EngineError> {
        Ok(None)
    }
    async fn exec(&self, _name: &str, _hook: &Hook, _timeout: Duration) -> Result<i64, EngineError> {
        Err(disabled())
    }
    async fn create(
        &self,
        _spec: &ContainerSpec,
        _labels: &BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        Err(disabled())
    }
    async fn start(&self, _name: &str) -> Result<(), EngineError> {
        Err(disabled())
    }
    async fn remove(&self, _name: &str, _grace_secs: u32) -> Result<(), EngineError> {
        Ok(())
    }
    async fn inspect(&self, _name: &str) -> Result<Option<ObservedContainer>, EngineError> {
        Ok(None)
    }
    async fn list_managed_networks(&self, _fleet: &str) -> Result<Vec<ObservedNetwork>, EngineError> {
        Ok(Vec::new())
    }
    async fn create_network(
        &self,
        _spec: &NetworkSpec,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        Err(disabled())
    }
    async fn remove_network(&self, _name: &str) -> Result<(), EngineError> {
        Ok(())
    }
    async fn list_managed_volumes(&self, _fleet: &str) -> Result<Vec<String>, EngineError> {
        Ok(Vec::new())
    }
    async fn create_volume(
        &self,
        _spec: &VolumeSpec,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        Err(disabled())
    }
    async fn remove_volume(&self, _name: &str) -> Result<(), EngineError> {
        Ok(())
    }
    async fn next_event(&self) -> Result<Option<EngineEvent>, EngineError> {
        std::future::pending().await
    }
    async fn run_healthcheck(&self, _name: &str) -> Result<Option<Duration>, EngineError> {
        Ok(None)
    }
}

/// The engine chosen by `agent.toml`.
#[derive(Debug)]
pub enum AnyEngine {
    Docker(DockerEngine),
    None(NoEngine),
}

impl AnyEngine {
    pub fn is_none(&self) -> bool {
        matches!(self, AnyEngine::None(_))
    }
}

macro_rules! delegate {
    ($self:ident, $e:ident => $call:expr) => {
        match $self {
            AnyEngine::Docker($e) => $call.await,
            AnyEngine::None($e) => $call.await,
        }
    };
}

impl Engine for AnyEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        delegate!(self, e => e.ping())
    }
    async fn list_managed(&self) -> Result<Vec<ObservedContainer>, EngineError> {
        delegate!(self, e => e.list_managed())
    }
    async fn image_present(&self, image: &ImageRef) -> Result<bool, EngineError> {
        delegate!(self, e => e.image_present(image))
    }
    async fn pull(
        &self,
        image: &ImageRef,
        platform: Option<&str>,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), EngineError> {
        delegate!(self, e => e.pull(image, platform, auth))
    }
    async fn storage_root(&self) -> Result<Option<PathBuf>, EngineError> {
        delegate!(self, e => e.storage_root())
    }
    async fn exec(&self, name: &str, hook: &Hook, timeout: Duration) -> Result<i64, EngineError> {
        delegate!(self, e => e.exec(name, hook, timeout))
    }
    async fn create(
        &self,
        spec: &ContainerSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        delegate!(self, e => e.create(spec, labels))
    }
    async fn start(&self, name: &str) -> Result<(), EngineError> {
        delegate!(self, e => e.start(name))
    }
    async fn remove(&self, name: &str, grace_secs: u32) -> Result<(), EngineError> {
        delegate!(self, e => e.remove(name, grace_secs))
    }
    async fn inspect(&self, name: &str) -> Result<Option<ObservedContainer>, EngineError> {
        delegate!(self, e => e.inspect(name))
    }
    async fn list_managed_networks(&self, fleet: &str) -> Result<Vec<ObservedNetwork>, EngineError> {
        delegate!(self, e => e.list_managed_networks(fleet))
    }
    async fn create_network(
        &self,
        spec: &NetworkSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        delegate!(self, e => e.create_network(spec, labels))
    }
    async fn remove_network(&self, name: &str) -> Result<(), EngineError> {
        delegate!(self, e => e.remove_network(name))
    }
    async fn list_managed_volumes(&self, fleet: &str) -> Result<Vec<String>, EngineError> {
        delegate!(self, e => e.list_managed_volumes(fleet))
    }
    async fn create_volume(
        &self,
        spec: &VolumeSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        delegate!(self, e => e.create_volume(spec, labels))
    }
    async fn remove_volume(&self, name: &str) -> Result<(), EngineError> {
        delegate!(self, e => e.remove_volume(name))
    }
    async fn remove_image(&self, reference: &str) -> Result<bool, EngineError> {
        delegate!(self, e => e.remove_image(reference))
    }
    async fn next_event(&self) -> Result<Option<EngineEvent>, EngineError> {
        delegate!(self, e => e.next_event())
    }
    async fn run_healthcheck(&self, name: &str) -> Result<Option<Duration>, EngineError> {
        delegate!(self, e => e.run_healthcheck(name))
    }
}
