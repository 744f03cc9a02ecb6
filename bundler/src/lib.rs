//! `fleet-bundler`: turns a fleet Git repository into signed per-device bundles.
//!
//! The pipeline, one module per step:
//!
//! - [`repo`]: finds the repository (upward from `--repo`, like git) and reads it at one
//!   revision through gix, without a checkout; or reads its work tree (`--worktree`) and
//!   names the files in which the work tree differs from HEAD.
//! - [`yaml`] and [`diag`]: location-aware YAML parsing and the diagnostics that name
//!   file, line and column.
//! - [`format`]: the repository format (`fleet.yaml`, `devices/*.yaml`, `apps/*/app.yaml`).
//! - [`compose`]: the supported Compose subset and its translation to container specs.
//! - [`render`]: loads a whole fleet and renders each device's [`fleet_spec::DesiredState`].
//! - [`policy`]: the devices' engine policy (`policy:`), checked while rendering.
//! - [`registry`]: pins image tags to digests through the Registry HTTP API v2.
//! - [`artifacts`]: which files leave a state for blobs (bundle format 5); pure.
//! - [`agent_release`]: `agent:` of `fleet.yaml` (which agent version each device runs)
//!   and the release directories of `build --agent-release` (bundle format 7).
//! - [`build`]: versioning, signing, content-addressed bundles, `index.json`, the
//!   per-device pointer files (`devices/<id>.json`) that agents poll, and the blobs of
//!   artifacts (`blobs/<sha256>`).
//! - [`export`]: one device's bundle and its blobs as one tar file (sideloads).
//! - [`plan`]: the per-device difference between two revisions.
//! - [`previous`]: the published build (`build --previous`), read from a server or a
//!   directory, so versions stay newer than what devices hold.
//! - [`mqtt`]: `publish` (retained announcements) and `status` (the fleet table).
//! - [`metrics`] and [`exporter`]: the fleet as Prometheus metrics (`exporter`,
//!   `status --serve`); `metrics` is pure, `exporter` speaks MQTT and HTTP.
//! - [`dashboard`]: the static live dashboard written next to the build output.
//! - [`rollout`]: `rollout:` of `fleet.yaml`, the pure rollout core and
//!   `fleet-bundler rollout`'s driver (MQTT, pointer files, `--sync`).
//! - [`enroll`]: `enroll list|accept`: devices' enrollment claims from MQTT, checked,
//!   and their acceptance written into `devices/<id>.yaml` of the work tree (line-level,
//!   never committed); [`recipient`]: age X25519 recipients (`public_key:`).
//!
//! Architecture invariant: only [`repo`], [`build`], [`export`], [`previous`], [`registry`],
//! [`dashboard`], [`mqtt`], [`exporter`], [`enroll`], [`rollout::drive`] and the loading of
//! release directories in [`agent_release`] do I/O;
//! loading and rendering are pure functions of the repository snapshot, so the same
//! commit always renders the same states.

#![forbid(unsafe_code)]

pub mod agent_release;
pub mod artifacts;
pub mod build;
pub mod compose;
pub mod dashboard;
pub mod diag;
pub mod duration;
pub mod enroll;
pub mod export;
pub mod exporter;
pub mod format;
pub mod lfs;
pub mod maintenance;
pub mod metrics;
pub mod mqtt;
pub mod plan;
pub mod policy;
pub mod previous;
pub mod recipient;
pub mod registry;
pub mod render;
pub mod repo;
pub mod rollout;
pub mod secrets;
pub mod timefmt;
pub mod yaml;
