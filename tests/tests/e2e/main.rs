//! End-to-end scenarios: the whole loop on real components, as an operator uses it.
//!
//! A Git commit goes in (a fleet repository made by the test), `fleet-bundler build` and
//! `publish` run as CI runs them, a real Mosquitto carries the announcements, a static
//! HTTP server serves the bundles, and `fleet-agent run` processes apply them to files
//! and to containers on a real `dockerd` or podman; the scenarios assert the device's
//! files by content hash, its containers through the engine API, and the retained
//! status JSON and the events it publishes.
//!
//! Each scenario starts its own components on free loopback ports and temp dirs, and
//! stops them by PID when it ends (see `fleet_e2e`). Waits are on conditions with
//! deadlines, never sleeps. Needs root and the packages of `scripts/setup.sh`.
//!
//! `FLEET_E2E_KEEP=1` keeps every temp dir (agent logs, state dirs, broker logs) and
//! prints each agent's log when it stops.
//!
//! | module | scenarios (issue 5) |
//! |---|---|
//! | [`first_deploy`] | 1 first deploy (files only) |
//! | [`containers`] | 1 first deploy, 2 updates, 3 failed update → rollback, 4 drift, each on dockerd and podman (8) |
//! | [`compose_keys`] | issue 17's Compose example on dockerd and podman; a changed key recreates the container |
//! | [`engines`] | (the engines, images and `web` app the container scenarios share) |
//! | [`attacks`] | 5 attacks and bad input |
//! | [`exporter`] | `fleet-bundler exporter`: `/metrics` scraped and parsed after agents converge or fail; hostile retained messages (issue 18) |
//! | [`maintenance`] | a maintenance window and an update lock each hold an apply and release it; a lock past its maximum deferral (issue 14) |
//! | [`hostile`] | hostile broker and servers: unsigned hints never keep the genuine bundle out; MQTT flood bounds (issue "Hardening I") |
//! | [`bundle_server`] | nginx as the bundle server: pointer polls answered 304 while unchanged, a new build arrives; a killed download resumed with a 206 (issue 19) |
//! | [`outages`] | 6 broker and bundle server outages, an update never announced (polling) |
//! | [`crash`] | 7 crash safety, files only and on dockerd (`FLEET_E2E_CRASH_ITERATIONS`, default 5) |
//! | [`small_fleet`] | 9 twenty devices |
//! | [`rollout`] | issue 14: a three-wave rollout in order, resumed after SIGKILL; a failing second wave halts it (thirty agents) |
//! | [`acl`] | 10 broker ACLs |
//! | [`enroll`] | issue 13: a device enrolls under the documented ACL (beside its running agent), `enroll list` shows it pending, `enroll accept` writes its key into the work tree, a commit makes it accepted; a key rotation is accepted with both keys, comments kept; hostile claims are listed as invalid; an unreachable broker is exit 75 |
//! | [`cluster`] | issue 19: a three-node RabbitMQ cluster: what crosses nodes; three agents spread over it, publish/status with every node listed; a two-wave rollout (`--once`, then resumed to done) with every node listed, the agents' nodes not first |
//! | [`secrets`] | issue 13: a secret made with the real age CLI reaches only its device (sideloaded), survives a key rotation; a Compose secret is mounted read-only at `/run/secrets/NAME` on dockerd and a new one recreates the container |
//! | [`sideload`] | 11 `fleet-agent apply` without a broker |
//! | [`artifacts`] | bundle format 5: a 200 MB artifact through a server that cuts it, in bounded agent memory, not fetched again for a change beside it; an export file applied offline; a disk too small defers with `insufficient_space` until space is freed |
//! | [`artifacts_mqtt`] | a broker-only fleet: an artifact of a few MB in retained 256 KiB chunks reaches the device (`--blobs-over-mqtt`, no URL); a second publish sends no blob again; a wrong chunk gets the blob refused by its digest, nothing applied, until it is fixed; a missing chunk times out and the download resumes from the partial file |
//! | [`dashboard`] | the static live dashboard in headless Chromium: a device converging, a failing one in red, hostile messages as text (issue 18) |
//! | [`self_update`] | issue 15, under `fleet-agent launch`: an update to a newly built agent (the shipped static build, another version) converges and reports it; a binary that crashes, hangs or never reaches the broker is rolled back, reported (`agent_update_failed`) and not tried again; `kill -9` while staged, on trial, and after the promotion leaves one working agent; an agent whose launcher was killed alone stops, and the restarted launcher runs one; the cross-built aarch64 agent (launcher and slots run through binfmt_misc and qemu) updates itself and rolls back one that never connects |
//! | [`systemd`] | issue 15 under systemd (its PID 1 in a `systemd-nspawn` machine, the real `.deb` and unit): an update switches inside the running service, a crashing binary is rolled back, `dpkg -i` of a newer package takes over; a hanging binary is caught by systemd's watchdog and rolled back |
//! | [`aarch64`] | the cross-built aarch64 agent under qemu, on dockerd (issue 6) |

mod aarch64;
mod acl;
mod artifacts;
mod artifacts_mqtt;
mod attacks;
mod bundle_server;
mod cluster;
mod common;
mod compose_keys;
mod containers;
mod crash;
mod credentials;
mod dashboard;
mod engines;
mod enroll;
mod exporter;
mod first_deploy;
mod hostile;
mod maintenance;
mod outages;
mod rollout;
mod secrets;
mod self_update;
mod sideload;
mod small_fleet;
mod systemd;
