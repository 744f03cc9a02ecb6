//! The devices' engine policy as the fleet repository states it: `policy:` in
//! `fleet.yaml` (every device's default) and in `devices/<id>.yaml` (per key, the
//! device's value wins). [`Fleet::render`](crate::render::Fleet::render) checks each
//! device's containers with `fleet_spec::policy::check`, the rule the agent applies in
//! its preflight, so that `validate` and `build` tell CI which service a device would
//! refuse, before anything is published.
//!
//! The repository is not the authority: each device's `agent.toml` is. This copy only
//! lets CI hear about a refusal early, so keep the two in step.
//!
//! Pure: no I/O.

use fleet_spec::model::DesiredState;
use fleet_spec::policy::{self, DevicePaths, EnginePolicy, KeyStyle, Rule, Violation};
use serde::Deserialize;

use crate::compose::Service;
use crate::diag::Diagnostic;
use crate::yaml::{Pos, Spanned};

/// Where the agent keeps its state and config by default (the `.deb`, the tarball and
/// `agent.toml.example`); binds never reach them.
pub const AGENT_STATE_DIR: &str = "/var/lib/fleet-agent";
pub const AGENT_CONFIG_DIR: &str = "/etc/fleet-agent";
pub const ENGINE_SOCKET: &str = "/var/run/docker.sock";

/// The keys of `policy:`, for reporting every unknown key of a file at once.
pub const POLICY_SHAPE: crate::yaml::Shape = crate::yaml::Shape::Keys(&[
    ("allowed_roots", crate::yaml::Shape::Any),
    ("allow_privileged", crate::yaml::Shape::Any),
    ("allow_host_network", crate::yaml::Shape::Any),
    ("host_namespaces", crate::yaml::Shape::Any),
    ("device_cgroup_rules", crate::yaml::Shape::Any),
    ("allow_unconfined", crate::yaml::Shape::Any),
    ("allow_gpus", crate::yaml::Shape::Any),
    ("allow_engine_socket", crate::yaml::Shape::Any),
    ("bind_roots", crate::yaml::Shape::Any),
    ("devices", crate::yaml::Shape::Any),
    ("capabilities", crate::yaml::Shape::Any),
    ("registries", crate::yaml::Shape::Any),
    ("require_digest", crate::yaml::Shape::Any),
]);

/// `policy:` in `fleet.yaml` or `devices/<id>.yaml`. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The device's `allowed_roots` (top level of `agent.toml`). Default: `[file_root]`.
    #[serde(default)]
    pub allowed_roots: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub allow_privileged: Option<bool>,
    #[serde(default)]
    pub allow_host_network: Option<bool>,
    #[serde(default)]
    pub host_namespaces: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub device_cgroup_rules: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub allow_unconfined: Option<bool>,
    #[serde(default)]
    pub allow_gpus: Option<bool>,
    #[serde(default)]
    pub allow_engine_socket: Option<bool>,
    #[serde(default)]
    pub bind_roots: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub devices: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub capabilities: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub registries: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub require_digest: Option<bool>,
}

/// A checked `policy:`: a key left out is `None` (the fleet's value, then the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub allowed_roots: Option<Vec<String>>,
    pub allow_privileged: Option<bool>,
    pub allow_host_network: Option<bool>,
    pub host_namespaces: Option<Vec<String>>,
    pub device_cgroup_rules: Option<Vec<String>>,
    pub allow_unconfined: Option<bool>,
    pub allow_gpus: Option<bool>,
    pub allow_engine_socket: Option<bool>,
    pub bind_roots: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    pub capabilities: Option<Vec<String>>,
    pub registries: Option<Vec<String>>,
    pub require_digest: Option<bool>,
}

impl Settings {
    /// Checks a `policy:` of `file`; problems go to `diags`, bad entries are dropped.
    pub fn from_file(file: &str, p: &PolicyFile, diags: &mut Vec<Diagnostic>) -> Settings {
        let mut paths = |key: &str, list: &Option<Vec<Spanned<String>>>| {
            list.as_ref().map(|list| {
                let mut out = Vec::new();
                for entry in list {
                    let text = entry.value.as_str();
                    let ok = text.starts_with('/')
                        && text != "/"
                        && text[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
                    if ok {
                        out.push(text.to_string());
                    } else {
                        let at = Pos::of(entry);
                        diags.push(Diagnostic::error(
                            file,
                            at.line,
                            at.column,
                            format!(
                                "policy.{key}: `{text}` must be an absolute, normalized path other than `/`"
                            ),
                        ));
                    }
                }
                out
            })
        };
        let allowed_roots = paths("allowed_roots", &p.allowed_roots);
        let bind_roots = paths("bind_roots", &p.bind_roots);
        let devices = paths("devices", &p.devices);
        let names = |list: &Option<Vec<Spanned<String>>>| {
            list.as_ref().map(|l| l.iter().map(|s| s.value.trim().to_string()).collect::<Vec<_>>())
        };
        let mut check =
            |key: &str, list: &Option<Vec<Spanned<String>>>, ok: &dyn Fn(&str) -> bool, what: &str| {
                for entry in list.iter().flatten() {
                    if !ok(entry.value.trim()) {
                        let at = Pos::of(entry);
                        diags.push(Diagnostic::error(
                            file,
                            at.line,
                            at.column,
                            format!("policy.{key}: `{}` is not {what}", entry.value),
                        ));
                    }
                }
            };
        check(
            "host_namespaces",
            &p.host_namespaces,
            &|ns| ["pid", "ipc", "uts", "userns", "cgroup"].contains(&ns),
            "one of pid, ipc, uts, userns, cgroup (the network's is `allow_host_network`)",
        );
        check(
            "device_cgroup_rules",
            &p.device_cgroup_rules,
            &fleet_spec::policy::is_device_cgroup_rule,
            "a device cgroup rule like `c 189:* rmw`",
        );
        Settings {
            allowed_roots,
            allow_privileged: p.allow_privileged,
            allow_host_network: p.allow_host_network,
            host_namespaces: names(&p.host_namespaces),
            device_cgroup_rules: names(&p.device_cgroup_rules),
            allow_unconfined: p.allow_unconfined,
            allow_gpus: p.allow_gpus,
            allow_engine_socket: p.allow_engine_socket,
            bind_roots,
            devices,
            capabilities: names(&p.capabilities),
            registries: names(&p.registries),
            require_digest: p.require_digest,
        }
    }

    /// This device's policy: each key from `self` (the device's `policy:`), else from
    /// `fleet` (`fleet.yaml`), else the secure default. Lists replace, never merge.
    pub fn over(&self, fleet: &Settings) -> Settings {
        fn pick<T: Clone>(device: &Option<T>, fleet: &Option<T>) -> Option<T> {
            device.clone().or_else(|| fleet.clone())
        }
        Settings {
            allowed_roots: pick(&self.allowed_roots, &fleet.allowed_roots),
            allow_privileged: pick(&self.allow_privileged, &fleet.allow_privileged),
            allow_host_network: pick(&self.allow_host_network, &fleet.allow_host_network),
            host_namespaces: pick(&self.host_namespaces, &fleet.host_namespaces),
            device_cgroup_rules: pick(&self.device_cgroup_rules, &fleet.device_cgroup_rules),
            allow_unconfined: pick(&self.allow_unconfined, &fleet.allow_unconfined),
            allow_gpus: pick(&self.allow_gpus, &fleet.allow_gpus),
            allow_engine_socket: pick(&self.allow_engine_socket, &fleet.allow_engine_socket),
            bind_roots: pick(&self.bind_roots, &fleet.bind_roots),
            devices: pick(&self.devices, &fleet.devices),
            capabilities: pick(&self.capabilities, &fleet.capabilities),
            registries: pick(&self.registries, &fleet.registries),
            require_digest: pick(&self.require_digest, &fleet.require_digest),
        }
    }

    /// The rule's inputs: the policy and the device's paths (`allowed_roots`, default
    /// `[file_root]`; the agent's default state and config directories and socket).
    pub fn rule(&self, file_root: &str) -> (EnginePolicy, DevicePaths) {
        let policy = EnginePolicy {
            allow_privileged: self.allow_privileged.unwrap_or(false),
            allow_host_network: self.allow_host_network.unwrap_or(false),
            host_namespaces: self.host_namespaces.clone().unwrap_or_default(),
            device_cgroup_rules: self.device_cgroup_rules.clone().unwrap_or_default(),
            allow_unconfined: self.allow_unconfined.unwrap_or(false),
            allow_gpus: self.allow_gpus.unwrap_or(false),
            allow_engine_socket: self.allow_engine_socket.unwrap_or(false),
            bind_roots: self.bind_roots.clone().unwrap_or_default(),
            devices: self.devices.clone().unwrap_or_default(),
            capabilities: self.capabilities.clone().unwrap_or_default(),
            registries: self.registries.clone().unwrap_or_default(),
            require_digest: self.require_digest.unwrap_or(false),
        };
        let paths = DevicePaths {
            allowed_roots: self.allowed_roots.clone().unwrap_or_else(|| vec![file_root.to_string()]),
            engine_socket: Some(ENGINE_SOCKET.to_string()),
            protected: vec![AGENT_STATE_DIR.to_string(), AGENT_CONFIG_DIR.to_string()],
        };
        (policy, paths)
    }
}

/// Every violation of a device's policy by its rendered `state`.
pub fn violations(settings: &Settings, file_root: &str, state: &DesiredState) -> Vec<Violation> {
    let (policy, paths) = settings.rule(file_root);
    policy::check(&policy, state, &paths)
}

/// The message of a violation in the repository's terms.
pub fn message(v: &Violation) -> String {
    format!(
        "{} (in devices/<id>.yaml for this device, or in fleet.yaml for every device)",
        v.describe(KeyStyle::FleetYaml)
    )
}

/// Where in the Compose file a violation is best shown: the key at fault when the
/// service names it, else the service.
pub fn position(v: &Violation, service_at: Pos, service: &Service) -> Pos {
    let found = match v.rule {
        Rule::HostNetwork | Rule::NetworkMode => service.network_mode.as_ref().map(Pos::of),
        Rule::Registry | Rule::Digest => service.image.as_ref().map(Pos::of),
        Rule::Capability => v.asked.strip_prefix("cap_add: ").and_then(|asked| {
            let asked = policy::normalize_capability(asked);
            service.cap_add.iter().find(|c| policy::normalize_capability(&c.value) == asked).map(Pos::of)
        }),
        Rule::Device => service.devices.first().map(Pos::of),
        _ => None,
    };
    found.unwrap_or(service_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_policy_wins_per_key_and_lists_replace() {
        let fleet = Settings {
            bind_roots: Some(vec!["/proc".into()]),
            capabilities: Some(vec!["NET_ADMIN".into()]),
            allow_privileged: Some(true),
            ..Default::default()
        };
        let device = Settings {
            capabilities: Some(vec!["SYS_TIME".into()]),
            allow_privileged: Some(false),
            ..Default::default()
        };
        let merged = device.over(&fleet);
        assert_eq!(merged.bind_roots, Some(vec!["/proc".to_string()]));
        assert_eq!(merged.capabilities, Some(vec!["SYS_TIME".to_string()]));
        assert_eq!(merged.allow_privileged, Some(false));
        let (policy, paths) = Settings::default().rule("/srv/fleet");
        assert_eq!(policy, EnginePolicy::default());
        assert_eq!(paths.allowed_roots, ["/srv/fleet"]);
    }
}
