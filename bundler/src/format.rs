//! The fleet repository format: the YAML documents of `fleet.yaml`, `devices/<id>.yaml`
//! and `apps/<app>/app.yaml`. Unknown keys are errors everywhere.
//!
//! The reference for users is `bundler/README.md`; keep the two in step.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::agent_release::{AGENT_SHAPE, DEVICE_AGENT_SHAPE};
use crate::maintenance::MAINTENANCE_SHAPE;
use crate::policy::POLICY_SHAPE;
use crate::yaml::{Scalar, Shape, Spanned, Vars};

/// The keys of `fleet.yaml`, for reporting every unknown key at once.
pub const FLEET_SHAPE: Shape = Shape::Keys(&[
    ("name", Shape::Any),
    ("topic_prefix", Shape::Any),
    ("bundle_expiry", Shape::Any),
    ("file_root", Shape::Any),
    ("vars", Shape::Any),
    ("policy", POLICY_SHAPE),
    ("rollout", crate::rollout::ROLLOUT_SHAPE),
    ("maintenance", MAINTENANCE_SHAPE),
    ("agent", AGENT_SHAPE),
]);

/// The keys of `devices/<id>.yaml`.
pub const DEVICE_SHAPE: Shape = Shape::Keys(&[
    ("public_key", Shape::Any),
    ("labels", Shape::Any),
    ("vars", Shape::Any),
    ("policy", POLICY_SHAPE),
    ("maintenance", MAINTENANCE_SHAPE),
    ("agent", DEVICE_AGENT_SHAPE),
]);

/// The keys of one entry of `files:` in `app.yaml`.
const FILE_SHAPE: Shape = Shape::Keys(&[
    ("source", Shape::Any),
    ("target", Shape::Any),
    ("mode", Shape::Any),
    ("owner", Shape::Any),
    ("template", Shape::Any),
    ("secret", Shape::Any),
]);

/// The keys of `apps/<app>/app.yaml`.
pub const APP_SHAPE: Shape = Shape::Keys(&[
    ("description", Shape::Any),
    ("selector", Shape::Any),
    ("files", Shape::List(&FILE_SHAPE)),
    ("compose", Shape::Any),
]);

/// `fleet.yaml` at the repository root.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// The fleet id (`[A-Za-z0-9][A-Za-z0-9._-]*`), part of every MQTT topic and bundle.
    pub name: Spanned<String>,
    /// MQTT topic prefix, default `fleet`.
    #[serde(default)]
    pub topic_prefix: Option<Spanned<String>>,
    /// How long a bundle stays valid after its commit, default `90d`.
    #[serde(default)]
    pub bundle_expiry: Option<Spanned<String>>,
    /// Where app files land on devices by default: `<file_root>/<app>/<source>`.
    /// Default `/srv/fleet`.
    #[serde(default)]
    pub file_root: Option<Spanned<String>>,
    /// Variables for every device (`fleet.vars.*`), also the defaults of `device.vars.*`.
    #[serde(default)]
    pub vars: Vars,
    /// Every device's engine policy (what the device's `[engine.policy]` allows);
    /// a device's own `policy:` overrides it key by key. See `crate::policy`.
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyFile>,
    /// How a new build reaches the devices: waves, halt criteria, pace
    /// (`crate::rollout::plan`). Absent: all at once.
    #[serde(default)]
    pub rollout: Option<Spanned<crate::rollout::plan::RolloutFile>>,
    /// When devices may apply their bundles (windows, zone, update lock); a device's
    /// own `maintenance:` overrides it key by key. See `crate::maintenance`.
    #[serde(default)]
    pub maintenance: Option<crate::maintenance::MaintenanceFile>,
    /// Which agent version devices run (bundle format 7): one rule or a list, the
    /// first rule whose selector matches wins. See `crate::agent_release`.
    #[serde(default)]
    pub agent: Option<crate::agent_release::AgentFile>,
}

/// `devices/<id>.yaml`; the id is the file name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceFile {
    /// The device's age X25519 recipient(s) (`age1…`): one, or a list during a key
    /// rotation (both accepted). Written by `fleet-bundler enroll accept`.
    #[serde(default)]
    pub public_key: Option<Spanned<crate::yaml::StringOrList>>,
    /// Labels apps select on (`site`, `hardware`, `channel`, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, Spanned<Scalar>>,
    /// Variables for templates (`device.vars.*`) and Compose `${VAR}` interpolation.
    #[serde(default)]
    pub vars: Vars,
    /// This device's engine policy, key by key over `fleet.yaml`'s.
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyFile>,
    /// This device's maintenance settings, key by key over `fleet.yaml`'s.
    #[serde(default)]
    pub maintenance: Option<crate::maintenance::MaintenanceFile>,
    /// This device's agent version, before every rule of `fleet.yaml`'s `agent:`.
    #[serde(default)]
    pub agent: Option<crate::agent_release::DeviceAgentFile>,
}

/// `apps/<app>/app.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    /// Free text for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Which devices run the app: every label listed must match (a list of values
    /// means any of them). Absent: every device.
    #[serde(default)]
    pub selector: Option<Spanned<BTreeMap<String, Spanned<SelectorValue>>>>,
    /// Files delivered to the devices.
    #[serde(default)]
    pub files: Vec<Spanned<FileEntry>>,
    /// The Compose file of the app, relative to the app directory. Default
    /// `compose.yaml` when it exists.
    #[serde(default)]
    pub compose: Option<Spanned<String>>,
}

/// One label's accepted value(s).
#[derive(Debug, Clone)]
pub struct SelectorValue(pub Vec<String>);

impl<'de> Deserialize<'de> for SelectorValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SelectorValue(crate::yaml::StringOrListOfScalars::deserialize(d)?.0))
    }
}

/// One file of an app.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the app directory, e.g. `files/nginx.conf`.
    pub source: Spanned<String>,
    /// Absolute path on the device. Default `<file_root>/<app>/<source>`.
    #[serde(default)]
    pub target: Option<Spanned<String>>,
    /// Octal permission bits, e.g. `"0644"` (default `0644`).
    #[serde(default)]
    pub mode: Option<Spanned<Scalar>>,
    /// Numeric owner `"uid:gid"`; default: the agent's user.
    #[serde(default)]
    pub owner: Option<Spanned<Scalar>>,
    /// Render the file with minijinja (`{{ device.vars.x }}`). Default false.
    #[serde(default)]
    pub template: bool,
    /// Never show the content in `plan` output. Files named `*.key`, `*.pem` or
    /// containing `secret`, `password` or `token` are treated as secret anyway.
    #[serde(default)]
    pub secret: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::Shape;

    /// The keys serde knows for `T`, from its message for an unknown key.
    fn serde_keys<T: serde::de::DeserializeOwned>() -> Vec<String> {
        let e = crate::yaml::parse::<T>("f", "zzz_not_a_key: 1\n").err().expect("refused");
        let list = e.message.split("(allowed keys: ").nth(1).expect("an unknown-key message");
        list.trim_end_matches(')').split(", ").map(String::from).collect()
    }

    fn keys_of(shape: &Shape, key: &str) -> Vec<String> {
        match shape {
            Shape::Keys(keys) => {
                keys.iter().find(|(k, _)| *k == key).map(|(_, s)| s.names()).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    #[test]
    fn the_shapes_know_exactly_the_keys_serde_knows() {
        assert_eq!(FLEET_SHAPE.names(), serde_keys::<FleetFile>());
        assert_eq!(DEVICE_SHAPE.names(), serde_keys::<DeviceFile>());
        assert_eq!(APP_SHAPE.names(), serde_keys::<AppFile>());
        assert_eq!(FILE_SHAPE.names(), serde_keys::<FileEntry>());
        assert_eq!(keys_of(&FLEET_SHAPE, "policy"), serde_keys::<crate::policy::PolicyFile>());
        let Shape::OneOrList(rule) = crate::agent_release::AGENT_SHAPE else { panic!("one or a list") };
        assert_eq!(rule.names(), serde_keys::<crate::agent_release::RuleFile>());
        assert_eq!(keys_of(&DEVICE_SHAPE, "agent"), serde_keys::<crate::agent_release::DeviceAgentFile>());
    }
}
