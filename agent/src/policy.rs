//! The engine boundary: what a bundle's containers may ask of this device's engine,
//! bounded by `[engine.policy]` in `agent.toml` (the device's, never the bundle's).
//!
//! The rule itself is `fleet_spec::policy::check`, shared with the bundler so that CI
//! hears about a refusal before devices do. This module only names the device's paths
//! the rule protects (state directory, config directory, key and certificate files,
//! engine socket) and words the refusal. Preflight calls [`refusal`]: a bundle that
//! exceeds the policy is rejected with `policy_denied` before anything changes.
//!
//! The rule is lexical (see `fleet_spec::policy`). The engine, though, follows symlinks
//! in a bind source, and a container with a writable bind of an allowed root can plant
//! `root/x -> /var/run/docker.sock` for a later bundle that binds `root/x`. So every
//! bind source is checked twice: as written, and, where it exists on this device, as the
//! engine will resolve it (`realpath`; the only I/O here).

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
    let paths = device_paths(cfg);
    let mut violations = policy::check(&cfg.engine_policy.policy, state, &paths);
    if let Some((resolved, links)) = with_binds_resolved(state) {
        // The device's own paths resolved the same way (a root may be a symlink itself:
        // `/srv` -> `/data/srv`), besides as written.
        let real = |p: &String| std::fs::canonicalize(p).map(|r| r.to_string_lossy().into_owned());
        let both = |list: &[String]| -> Vec<String> {
            let mut all = list.to_vec();
            all.extend(list.iter().filter_map(|p| real(p).ok()));
            all
        };
        let real_paths = DevicePaths {
            allowed_roots: both(&paths.allowed_roots),
            engine_socket: paths.engine_socket.as_ref().map(|s| real(s).unwrap_or_else(|_| s.clone())),
            protected: both(&paths.protected),
        };
        let mut real_policy = cfg.engine_policy.policy.clone();
        real_policy.bind_roots = both(&real_policy.bind_roots);
        for mut v in policy::check(&real_policy, &resolved, &real_paths) {
            if let Some(real) = v.asked.strip_prefix("bind source ") {
                if let Some(source) = links.get(real) {
                    v.asked = format!("bind source {source} (a symlink to {real})");
                }
            }
            if !violations.contains(&v) {
                violations.push(v);
            }
        }
    }
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

/// The containers of `state` (with its networks and volumes, which the rule also reads)
/// with each bind source that exists replaced by the path it resolves to, and which
/// source each resolved path came from; `None` when no source resolves elsewhere. A
/// source that does not exist is created by the engine as a directory, as written: the
/// check as written covers it.
fn with_binds_resolved(
    state: &DesiredState,
) -> Option<(DesiredState, std::collections::BTreeMap<String, String>)> {
    let mut links = std::collections::BTreeMap::new();
    let mut containers = state.containers.clone();
    for mount in containers.iter_mut().flat_map(|c| c.mounts.iter_mut()) {
        let fleet_spec::model::MountSource::Bind(source) = &mut mount.source else { continue };
        let Ok(real) = std::fs::canonicalize(&*source) else { continue };
        let real = real.to_string_lossy().into_owned();
        if real != *source {
            links.insert(real.clone(), std::mem::replace(source, real));
        }
    }
    let resolved = DesiredState {
        containers,
        networks: state.networks.clone(),
        volumes: state.volumes.clone(),
        ..DesiredState::default()
    };
    (!links.is_empty()).then_some((resolved, links))
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

    fn config_with_root(root: &Path, extra: &str) -> Config {
        let text = format!(
            "device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = \"/var/lib/fleet-agent\"\nallowed_roots = [\"{}\"]\n[trust]\npublic_keys = [\"{KEY}\"]\n{extra}",
            root.display()
        );
        Config::parse(&text, Path::new("/etc/fleet-agent/agent.toml")).expect("valid config")
    }

    /// Hardening II: a container with a writable bind of an allowed root plants a symlink
    /// there; a later bundle binding it is judged as what the engine would mount.
    #[test]
    fn a_bind_source_planted_as_a_symlink_is_judged_where_it_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("data")).expect("mkdir");
        let cfg = config_with_root(&root, "");
        let link = root.join("x");
        std::os::unix::fs::symlink("/usr", &link).expect("symlink");
        let source = link.to_string_lossy().into_owned();
        let reason = refusal(&cfg, &with_bind(&source)).expect("a link out of the roots is refused");
        assert!(reason.contains(&format!("bind source {source} (a symlink to /usr)")), "{reason}");
        assert!(reason.contains("bind_roots"), "says which key would allow it: {reason}");
        // A link to the state directory is refused even where bind_roots would allow /var.
        let state_link = root.join("s");
        std::os::unix::fs::symlink(dir.path(), &state_link).expect("symlink");
        let cfg_state = Config::parse(
            &format!(
                "device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"{}\"]\n[trust]\npublic_keys = [\"{KEY}\"]\n",
                dir.path().join("state").display(),
                root.display()
            ),
            Path::new("/etc/fleet-agent/agent.toml"),
        );
        let cfg_state = cfg_state.expect("valid config");
        let reason = refusal(&cfg_state, &with_bind(&state_link.to_string_lossy())).expect("refused");
        assert!(reason.contains("(a symlink to"), "{reason}");
        // A real directory below the root, and the same through a root that is itself a
        // symlink (`/srv` -> `/data/srv` on many devices), pass.
        assert!(refusal(&cfg, &with_bind(&root.join("data").to_string_lossy())).is_none());
        let root_link = dir.path().join("root-link");
        std::os::unix::fs::symlink(&root, &root_link).expect("symlink");
        let cfg_link = config_with_root(&root_link, "");
        assert!(refusal(&cfg_link, &with_bind(&root_link.join("data").to_string_lossy())).is_none());
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
