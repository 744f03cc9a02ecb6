//! The shared vocabulary of the fleet.
//!
//! - [`model`]: a device's desired state (files, containers, networks, volumes).
//! - [`bundle`]: the signed bundle format and its verification in numbered steps.
//! - [`keys`]: ed25519 keys and key ids.
//! - [`messages`]: the JSON announcement, status report and events on MQTT; the
//!   announcement is also each device's pointer file in the bundler's output.
//! - [`topic`]: the MQTT topic scheme.
//! - [`policy`]: the engine policy: what a bundle's containers may ask of a device.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and knows no async
//! runtime. Callers pass `now` and their trust state in, and persist what comes out. The
//! one exception is the opt-in `keyfile` feature ([`keys::file`]).

#![forbid(unsafe_code)]

#[cfg(feature = "age")]
pub mod age;
pub mod bundle;
pub mod keys;
pub mod maintenance;
pub mod messages;
pub mod model;
pub mod policy;
pub mod topic;

pub use bundle::{verify, Expectation, Limits, Manifest, TrustState, TrustedKeys, Verified, VerifyError};
pub use keys::{KeyId, PublicKey, SigningKey};
pub use model::DesiredState;
