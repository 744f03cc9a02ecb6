//! Integration tests of `fleet-bundler` on real components: Git repositories made with
//! the `git` CLI, Mosquitto, and the Docker registry.

mod agent_release;
mod artifacts;
mod awesome;
mod build;
mod common;
mod compose_keys;
mod compose_secrets;
mod first_hour;
mod hardening;
mod mqtt;
mod plan;
mod policy;
mod registry;
mod rollout;
mod secrets;
mod validate;
