//! The deterministic core of the agent: given the desired state, what was observed
//! (file hashes, containers the engine reports) and `now`, decide what to do.
//!
//! Architecture invariant: nothing in `core` does I/O, reads a clock, sleeps or spawns.
//! Every input is a parameter and every decision a return value, so each rule is tested
//! with plain values. The adapters (`files`, `engine`, `journal`, `mqtt`, `fetch`) and the
//! driver (`agent`) carry the decisions out.

pub mod candidates;
pub mod gate;
pub mod health;
pub mod images;
pub mod machine;
pub mod paths;
pub mod plan;
pub mod self_update;

pub use machine::{transition, ApplyState, Command, Disallowed, Machine};
