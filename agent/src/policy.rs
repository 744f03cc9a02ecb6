//! The engine boundary: what a bundle's containers may ask of this device's engine,
//! bounded by `[engine.policy]` in `agent.toml` (the device's, never the bundle's).
//!
//! The rule itself is `fleet_spec::policy::check`, shared with the bundler so that CI
//! hears about a refusal before devices do. This module only names the device's paths
//! the rule protects (state directory, config directory, key and certificate files,
//! engine socket) and words the refusal. Preflight calls [`refusal`]: a bundle that
//! exceeds the policy is rejected with `policy_denied` before anything changes.
//!
//! Pure: no I/O. The check is lexical (see `fleet_spec::policy`): symlinks below the
//! roots are not followed here.

use fleet_spec::model::DesiredState;
use fleet_spec::policy::{self, DevicePaths, KeyStyle};

use crate::config::Config;

/// The reason code of a bundle refused by the engine policy.
pub const CODE: &str = "policy_denied";

/// The device's paths as the policy rule sees them.
pub fn device_paths(cfg: &Config) -> DevicePaths {
    let text = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut protected = vec![text(&cfg.state_dir), text(&cfg.engine_policy.config_dir)];
    let mqtt_files = cfg
        .mqtt
        .iter()
        .flat_map(|m| [m.ca_file.as_deref(), m.client_cert.as_deref(), m.client_key.as_deref()]);
    protected.extend(mqtt_files.chain([cfg.fetch.ca_file.as_deref()]).flatten().map(text));
    protected.retain(|p| p.starts_with('/'));
    DevicePaths {
        allowed_roots: cfg.allowed_roots.iter().map(|p| text(p)).collect(),
        engine_socket: cfg.engine_socket.as_deref().map(text),
        protected,
    }
}

/// How many violations a refusal spells out; the rest are counted.
const SHOWN: usize = 8;
/// The longest refusal reason (it goes to the log, `rejected.json`, status and events).
const MAX_REASON: usize = 4096;

/// Why `state` exceeds the device's engine policy (the violations, `; `-separated, the
/// first [`SHOWN`] spelled out and the text bounded, control characters escaped: the
/// bundle's names and paths are not to be trusted), or `None` when it does not.
pub fn refusal(cfg: &Config, state: &DesiredState) -> Option<String> {
    let violations = policy::check(&cfg.engine_policy.policy, state, &device_paths(cfg));
    if violations.is_empty() {
        return None;
    }
    let shown: Vec<String> = violations.iter().take(SHOWN).map(|v| v.describe(KeyStyle::AgentToml)).collect();
    let mut reason: String = shown
        .join("; ")
        .chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] })
        .collect();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    if violations.len() > SHOWN {
        reason.push_str(&format!("; and {} more violation(s)", violations.len() - SHOWN));
    }
    Some(reason)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fleet_spec::model::{ContainerSpec, Mount, MountSource};

    use super::*;

    const KEY: &str = "fleet-ed25519-public:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn config(extra: &str) -> Config {
        let text = format!(
            "device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = \"/var/lib/fleet-agent\"\nallowed_roots = [\"/srv/fleet\"]\n[trust]\npublic_keys = [\"{KEY}\"]\n{extra}"
        );
        Config::parse(&text, Path::new("/etc/fleet-agent/agent.toml")).expect("valid config")
    }

    fn with_bind(source: &str) -> DesiredState {
        DesiredState {
            containers: vec![ContainerSpec {
                name: "shop-web".into(),
                app: "shop".into(),
                service: "web".into(),
                mounts: vec![Mount {
                    source: MountSource::Bind(source.into()),
                    target: "/x".into(),
                    read_only: true,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn state_dir_config_dir_and_socket_of_the_config_are_protected() {
        let cfg = config("[engine]\nsocket = \"/run/balena-engine.sock\"\n[engine.policy]\nbind_roots = [\"/var\", \"/etc\", \"/run\"]\n");
        for source in ["/var/lib/fleet-agent/trust.json", "/etc/fleet-agent", "/run/balena-engine.sock"] {
            let reason = refusal(&cfg, &with_bind(source)).expect(source);
            assert!(reason.contains(&format!("bind source {source}")), "{reason}");
        }
        assert!(refusal(&cfg, &with_bind("/etc/nginx")).is_none());
        assert!(refusal(&cfg, &with_bind("/srv/fleet/shop/a.conf")).is_none());
    }

    #[test]
    fn the_refusal_names_every_violation_and_the_key_that_allows_it() {
        let cfg = config("");
        let mut state = with_bind("/var/run/docker.sock");
        state.containers[0].privileged = true;
        let reason = refusal(&cfg, &state).expect("refused");
        assert!(reason.contains("`shop-web` (app `shop`, service `web`)"), "{reason}");
        assert!(reason.contains("engine.policy.allow_privileged = true"), "{reason}");
        assert!(reason.contains("engine.policy.allow_engine_socket = true"), "{reason}");
        let open = config("[engine.policy]\nallow_privileged = true\nallow_engine_socket = true\n");
        assert_eq!(refusal(&open, &state), None);
    }

    #[test]
    fn a_bundle_with_many_violations_gets_a_bounded_reason_with_control_characters_escaped() {
        let cfg = config("");
        let mut state = with_bind(&format!("/evil\n{}", "x".repeat(10_000)));
        let template = state.containers[0].clone();
        for i in 0..100 {
            let mut c = template.clone();
            c.name = format!("c{i}");
            c.privileged = true;
            state.containers.push(c);
        }
        let reason = refusal(&cfg, &state).expect("refused");
        assert!(!reason.contains('\n'), "control characters are escaped");
        assert!(reason.len() < MAX_REASON + 100, "bounded: {} bytes", reason.len());
        assert!(reason.ends_with("; and 193 more violation(s)"), "{}", &reason[reason.len() - 60..]);
    }
}
