//! `fleet-agent`: the device side of the fleet. It verifies signed bundles, applies
//! their files and containers through a journaled state machine, waits for health and
//! rolls back, repairs drift, and reports over MQTT.
//!
//! Code map:
//! - [`core`]: the deterministic decisions (state machine, plans, health verdicts,
//!   path policy). No I/O, no clock.
//! - [`agent`]: the driver that carries those decisions out; [`run`]: the daemon loop.
//! - Adapters: [`files`] (atomic writes, symlink-safe paths), [`journal`] (write-ahead
//!   log), [`store`] (state directory), [`engine`] (Docker API; by another hand),
//!   [`engines`] (engine choice), [`fetch`] (HTTP(S) with Range resume), [`mqtt`],
//!   [`tls`], [`clock`], [`notify`] (systemd readiness and watchdog keep-alives).
//! - [`policy`]: the engine policy a bundle's containers must keep (pure).
//! - [`config`]: `agent.toml`; [`cli`]: argv, help and exit codes; [`status`]: the
//!   status rate limiter; [`report`]: the local `status` command; [`sideload`]: how
//!   `apply` hands a bundle to a running agent (a unix socket in the state directory).
//!
//! Architecture invariants: only bundles that pass `fleet_spec::bundle::verify` are
//! applied; nothing outside `allowed_roots` is written; no file, container, network or
//! volume the agent did not create is changed or removed.

#![forbid(unsafe_code)]

pub mod engine;

pub mod agent;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod engines;
pub mod enroll;
pub mod export;
pub mod fetch;
pub mod files;
pub mod identity;
pub mod journal;
pub mod launch;
pub mod lockdir;
pub mod mqtt;
pub mod mqtt_blob;
pub mod notify;
pub mod originals;
pub mod policy;
pub mod report;
pub mod run;
pub mod sideload;
pub mod space;
pub mod status;
pub mod store;
pub mod tls;
