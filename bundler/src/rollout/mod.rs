//! Rollouts (issue 14): the new build reaches the fleet wave by wave, paced, and halts
//! by itself when devices fail.
//!
//! - [`plan`]: `rollout:` of `fleet.yaml`, checked, and each device's wave (pure).
//! - [`judge`]: the deterministic core: given the rollout state, the devices' latest
//!   statuses and `now`, what happens next (release a wave, announce devices, advance,
//!   halt, done). No I/O, no clock.
//! - [`drive`]: the adapter: MQTT (statuses in, announcements and the retained state
//!   out), the pointer files, `--sync`, the clock.
//!
//! Architecture invariant: the rollout keeps no state of its own beyond the retained
//! message on `<prefix>/<fleet>/rollout` and the build output directory, so a restart
//! anywhere resumes (PRODUCT.md: "No server of our own").

pub mod drive;
pub mod judge;
pub mod plan;

pub use plan::{Rollout, RolloutPlan, ROLLOUT_SHAPE};
