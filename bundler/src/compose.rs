//! The Compose subset fleet accepts, and its translation to container specs.
//!
//! Accepted service keys: `image`, `container_name`, `command`, `entrypoint`,
//! `environment`, `labels`, `user`, `hostname`, `ports`, `expose`, `volumes`, `tmpfs`,
//! `networks`, `network_mode`, `restart`, `healthcheck`, `depends_on`, `devices`,
//! `cap_add`, `cap_drop`, `privileged`, `stop_signal`, `mem_limit`, `cpus`,
//! `deploy.resources.limits`. Top level: `services`, `networks`, `volumes`, and the
//! obsolete `version` and `name` (ignored). Compose keys the agent cannot apply are
//! refused by name (`build:` above all: devices pull images, CI builds them); anything
//! else is an unknown key.
//!
//! Translation rules (documented in `bundler/README.md`):
//! - container name `<app>-<service>` unless `container_name`;
//! - every service joins `<app>_default` (alias: the service name) unless it lists
//!   networks or sets `network_mode`; named networks are `<app>_<net>`, named volumes
//!   `<app>_<vol>` (unless they set `name:`);
//! - a relative bind source `./P` is the device path `<file_root>/<app>/P`, which is
//!   where the app's file with `source: P` is delivered (or that file's `target` when
//!   it sets one), so a container mounting a managed file restarts when it changes;
//! - `${VAR}` (`${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `$VAR`, `$$`)
//!   is interpolated from the device's variables, then the fleet's; a variable that is
//!   not set is an error.
//!
//! This module is pure: no I/O. Image tags are pinned to digests later, by the caller.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use fleet_spec::model::{
    ContainerSpec, Dependency, DependencyCondition, DeviceMapping, Healthcheck, ImageRef, Mount, MountSource,
    NetworkAttachment, NetworkSpec, PortMapping, Protocol, RestartPolicy, VolumeSpec,
};
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::diag::Diagnostic;
use crate::duration::{parse_bytes, parse_duration_ms, parse_nano_cpus};
use crate::yaml::{ListOrMap, NamesOrMap, Pos, Scalar, Spanned, SpannedMap, StringOrList};

type Refused = Option<Spanned<IgnoredAny>>;

/// A Compose file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeFile {
    /// Obsolete in the Compose specification; ignored.
    #[serde(default)]
    pub version: Option<IgnoredAny>,
    /// The project name; ignored (the app name is the project name).
    #[serde(default)]
    pub name: Option<IgnoredAny>,
    pub services: SpannedMap<Spanned<Service>>,
    #[serde(default)]
    pub networks: SpannedMap<Option<Spanned<NetworkDef>>>,
    #[serde(default)]
    pub volumes: SpannedMap<Option<Spanned<VolumeDef>>>,
    #[serde(default)]
    pub secrets: Refused,
    #[serde(default)]
    pub configs: Refused,
}

/// One service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default)]
    pub image: Option<Spanned<String>>,
    #[serde(default)]
    pub container_name: Option<Spanned<String>>,
    #[serde(default)]
    pub command: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub entrypoint: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub environment: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub labels: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub user: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub hostname: Option<Spanned<String>>,
    #[serde(default)]
    pub ports: Vec<Spanned<ScalarOrMap<PortLong>>>,
    #[serde(default)]
    pub expose: Vec<Spanned<Scalar>>,
    #[serde(default)]
    pub volumes: Vec<Spanned<ScalarOrMap<VolumeLong>>>,
    #[serde(default)]
    pub tmpfs: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub networks: Option<NamesOrMap<ServiceNetwork>>,
    #[serde(default)]
    pub network_mode: Option<Spanned<String>>,
    #[serde(default)]
    pub restart: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub healthcheck: Option<Spanned<HealthcheckDef>>,
    #[serde(default)]
    pub depends_on: Option<NamesOrMap<DependsOnLong>>,
    #[serde(default)]
    pub devices: Vec<Spanned<String>>,
    #[serde(default)]
    pub cap_add: Vec<Spanned<String>>,
    #[serde(default)]
    pub cap_drop: Vec<Spanned<String>>,
    #[serde(default)]
    pub privileged: Option<bool>,
    #[serde(default)]
    pub stop_signal: Option<Spanned<String>>,
    #[serde(default)]
    pub mem_limit: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cpus: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub deploy: Option<Spanned<Deploy>>,

    // Compose keys the agent cannot apply: refused by name.
    #[serde(default)]
    pub build: Refused,
    #[serde(default)]
    pub env_file: Refused,
    #[serde(default)]
    pub secrets: Refused,
    #[serde(default)]
    pub configs: Refused,
    #[serde(default)]
    pub extends: Refused,
    #[serde(default)]
    pub profiles: Refused,
    #[serde(default)]
    pub links: Refused,
    #[serde(default)]
    pub external_links: Refused,
    #[serde(default)]
    pub volumes_from: Refused,
    #[serde(default)]
    pub ulimits: Refused,
    #[serde(default)]
    pub logging: Refused,
    #[serde(default)]
    pub sysctls: Refused,
    #[serde(default)]
    pub security_opt: Refused,
    #[serde(default)]
    pub working_dir: Refused,
    #[serde(default)]
    pub tty: Refused,
    #[serde(default)]
    pub stdin_open: Refused,
    #[serde(default)]
    pub init: Refused,
    #[serde(default)]
    pub platform: Refused,
    #[serde(default)]
    pub pull_policy: Refused,
    #[serde(default)]
    pub shm_size: Refused,
    #[serde(default)]
    pub extra_hosts: Refused,
    #[serde(default)]
    pub dns: Refused,
    #[serde(default)]
    pub dns_search: Refused,
    #[serde(default)]
    pub ipc: Refused,
    #[serde(default)]
    pub pid: Refused,
    #[serde(default)]
    pub cgroup_parent: Refused,
    #[serde(default)]
    pub stop_grace_period: Refused,
    #[serde(default)]
    pub domainname: Refused,
    #[serde(default)]
    pub mac_address: Refused,
    #[serde(default)]
    pub runtime: Refused,
    #[serde(default)]
    pub scale: Refused,
    #[serde(default)]
    pub group_add: Refused,
    #[serde(default)]
    pub read_only: Refused,
    #[serde(default)]
    pub userns_mode: Refused,
    #[serde(default)]
    pub oom_score_adj: Refused,
    #[serde(default)]
    pub mem_reservation: Refused,
    #[serde(default)]
    pub memswap_limit: Refused,
    #[serde(default)]
    pub cpu_shares: Refused,
    #[serde(default)]
    pub cpuset: Refused,
    #[serde(default)]
    pub develop: Refused,
}

impl Service {
    /// The refused keys this service uses, with their places.
    fn refused(&self) -> Vec<(&'static str, Pos)> {
        let all: [(&'static str, &Refused); 40] = [
            ("build", &self.build),
            ("env_file", &self.env_file),
            ("secrets", &self.secrets),
            ("configs", &self.configs),
            ("extends", &self.extends),
            ("profiles", &self.profiles),
            ("links", &self.links),
            ("external_links", &self.external_links),
            ("volumes_from", &self.volumes_from),
            ("ulimits", &self.ulimits),
            ("logging", &self.logging),
            ("sysctls", &self.sysctls),
            ("security_opt", &self.security_opt),
            ("working_dir", &self.working_dir),
            ("tty", &self.tty),
            ("stdin_open", &self.stdin_open),
            ("init", &self.init),
            ("platform", &self.platform),
            ("pull_policy", &self.pull_policy),
            ("shm_size", &self.shm_size),
            ("extra_hosts", &self.extra_hosts),
            ("dns", &self.dns),
            ("dns_search", &self.dns_search),
            ("ipc", &self.ipc),
            ("pid", &self.pid),
            ("cgroup_parent", &self.cgroup_parent),
            ("stop_grace_period", &self.stop_grace_period),
            ("domainname", &self.domainname),
            ("mac_address", &self.mac_address),
            ("runtime", &self.runtime),
            ("scale", &self.scale),
            ("group_add", &self.group_add),
            ("read_only", &self.read_only),
            ("userns_mode", &self.userns_mode),
            ("oom_score_adj", &self.oom_score_adj),
            ("mem_reservation", &self.mem_reservation),
            ("memswap_limit", &self.memswap_limit),
            ("cpu_shares", &self.cpu_shares),
            ("cpuset", &self.cpuset),
            ("develop", &self.develop),
        ];
        all.iter().filter_map(|(name, v)| v.as_ref().map(|s| (*name, Pos::of(s)))).collect()
    }
}

/// The message for a refused key.
fn refusal(key: &str) -> String {
    match key {
        "build" => "`build:` is not supported: devices pull images, build them in CI and set `image:`".into(),
        "env_file" => "`env_file:` is not supported: set the variables under `environment:` (values may use ${VAR} from device vars)".into(),
        "secrets" | "configs" => format!("`{key}:` is not supported: deliver the file with `files:` in app.yaml and bind-mount it"),
        key => format!("`{key}:` is not supported: the fleet agent cannot apply it (see the supported keys in the bundler README)"),
    }
}

/// A value written either as a scalar (short syntax) or as a map (long syntax).
#[derive(Debug, Clone)]
pub enum ScalarOrMap<T> {
    Short(String),
    Long(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ScalarOrMap<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = ScalarOrMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string (short syntax) or a map (long syntax)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ScalarOrMap::Short(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ScalarOrMap::Short(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(ScalarOrMap::Short(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(ScalarOrMap::Long)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortLong {
    pub target: Spanned<Scalar>,
    #[serde(default)]
    pub published: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub host_ip: Option<Spanned<String>>,
    #[serde(default)]
    pub protocol: Option<Spanned<String>>,
    /// `host` or `ingress`; meaningless on one host, accepted.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeLong {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    #[serde(default)]
    pub source: Option<Spanned<String>>,
    pub target: Spanned<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub bind: Option<IgnoredAny>,
    #[serde(default)]
    pub volume: Option<IgnoredAny>,
    #[serde(default)]
    pub tmpfs: Option<IgnoredAny>,
    #[serde(default)]
    pub consistency: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceNetwork {
    #[serde(default)]
    pub aliases: Vec<Spanned<String>>,
    #[serde(default)]
    pub ipv4_address: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub ipv6_address: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub priority: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependsOnLong {
    #[serde(default)]
    pub condition: Option<Spanned<String>>,
    #[serde(default)]
    pub restart: Option<bool>,
    #[serde(default)]
    pub required: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthcheckDef {
    #[serde(default)]
    pub test: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub interval: Option<Spanned<String>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub start_period: Option<Spanned<String>>,
    #[serde(default)]
    pub start_interval: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub retries: Option<Spanned<u32>>,
    #[serde(default)]
    pub disable: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub reservations: Option<Spanned<IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub memory: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cpus: Option<Spanned<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    #[serde(default)]
    pub driver: Option<Spanned<String>>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub labels: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub external: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub ipam: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub enable_ipv6: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub driver_opts: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub attachable: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDef {
    #[serde(default)]
    pub driver: Option<Spanned<String>>,
    #[serde(default)]
    pub labels: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub external: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub driver_opts: Option<Spanned<IgnoredAny>>,
}

/// The containers, networks and volumes of one app on one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    pub containers: Vec<ContainerSpec>,
    pub networks: Vec<NetworkSpec>,
    pub volumes: Vec<VolumeSpec>,
}

/// Looks a variable up for `${VAR}` interpolation.
pub trait VarLookup {
    fn get(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> VarLookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// What the translation needs to know about the app besides its Compose file.
pub struct AppContext<'a> {
    pub app: &'a str,
    /// Repository path of the Compose file, for diagnostics.
    pub file: &'a str,
    /// `<file_root>/<app>`: where relative bind sources land on the device.
    pub app_root: &'a str,
    /// App files: normalized source path (relative to the app dir) → device target.
    pub file_targets: &'a BTreeMap<String, String>,
}

/// Translates a Compose file. With `lenient`, unset variables interpolate to "" and
/// problems in the values that used them are not reported: that is how a file is
/// checked once for every device. Returns the translation and its diagnostics.
pub fn translate(
    file: &ComposeFile,
    ctx: &AppContext<'_>,
    vars: &dyn VarLookup,
    lenient: bool,
) -> (Translated, Vec<Diagnostic>) {
    let mut t = Translator { ctx, vars, lenient, diags: Vec::new(), tainted: HashSet::new() };
    let out = t.run(file);
    (out, t.diags)
}

struct Translator<'a, 'b> {
    ctx: &'a AppContext<'b>,
    vars: &'a dyn VarLookup,
    lenient: bool,
    diags: Vec<Diagnostic>,
    /// Places whose values used a variable that is not set (lenient mode only).
    tainted: HashSet<Pos>,
}

/// Container names Docker accepts: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn valid_container_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..].iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Translator<'_, '_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        if self.lenient && self.tainted.contains(&pos) {
            return;
        }
        self.diags.push(Diagnostic::error(self.ctx.file, pos.line, pos.column, message));
    }

    fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic::warning(self.ctx.file, pos.line, pos.column, message));
    }

    /// Interpolates `${VAR}` forms in `text`, found at `pos`.
    fn interp(&mut self, text: &str, pos: Pos) -> String {
        if !text.contains('$') {
            return text.to_string();
        }
        match interpolate(text, self.vars) {
            Ok(s) => s,
            Err(InterpError::Unset { name, message }) => {
                if self.lenient {
                    self.tainted.insert(pos);
                } else {
                    let msg = match message {
                        Some(m) => format!("variable `{name}` is not set: {m}"),
                        None => format!(
                            "variable `{name}` is not set for this device: add it under `vars:` in the device file or fleet.yaml, or write ${{{name}:-default}}"
                        ),
                    };
                    self.error(pos, msg);
                }
                String::new()
            }
            Err(InterpError::Syntax(msg)) => {
                self.error(pos, msg);
                String::new()
            }
        }
    }

    fn s(&mut self, v: &Spanned<String>) -> String {
        self.interp(&v.value, Pos::of(v))
    }

    fn scalar(&mut self, v: &Spanned<Scalar>) -> String {
        self.interp(&v.value.0, Pos::of(v))
    }

    fn run(&mut self, file: &ComposeFile) -> Translated {
        let app = self.ctx.app;
        if let Some(s) = &file.secrets {
            self.error(Pos::of(s), refusal("secrets"));
        }
        if let Some(s) = &file.configs {
            self.error(Pos::of(s), refusal("configs"));
        }

        // Top-level networks.
        let mut networks: BTreeMap<String, NetworkSpec> = BTreeMap::new();
        let mut network_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, def) in &file.networks.0 {
            let name = match def.as_ref().and_then(|d| d.value.name.as_ref()) {
                Some(n) => self.s(n),
                None => format!("{app}_{}", key.value),
            };
            let mut spec = NetworkSpec { name: name.clone(), ..Default::default() };
            if let Some(def) = def {
                let d = &def.value;
                if let Some(driver) = &d.driver {
                    if driver.value != "bridge" {
                        self.error(Pos::of(driver), format!("network driver `{}` is not supported: devices use single-host `bridge` networks", driver.value));
                    }
                }
                if let Some(x) = &d.external {
                    self.error(Pos::of(x), "`external:` networks are not supported: the agent creates and owns every network of an app");
                }
                for (what, v) in
                    [("ipam", &d.ipam), ("enable_ipv6", &d.enable_ipv6), ("driver_opts", &d.driver_opts)]
                {
                    if let Some(v) = v {
                        self.warning(
                            Pos::of(v),
                            format!("network `{what}:` is ignored: the engine assigns addresses"),
                        );
                    }
                }
                spec.internal = d.internal;
                if let Some(labels) = &d.labels {
                    spec.labels = self.key_values(labels, "label", false);
                }
            }
            network_names.insert(key.value.clone(), name.clone());
            networks.insert(name, spec);
        }
        let default_network =
            network_names.get("default").cloned().unwrap_or_else(|| format!("{app}_default"));

        // Top-level volumes.
        let mut volumes: BTreeMap<String, VolumeSpec> = BTreeMap::new();
        let mut volume_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, def) in &file.volumes.0 {
            let name = match def.as_ref().and_then(|d| d.value.name.as_ref()) {
                Some(n) => self.s(n),
                None => format!("{app}_{}", key.value),
            };
            let mut spec = VolumeSpec { name: name.clone(), ..Default::default() };
            if let Some(def) = def {
                let d = &def.value;
                if let Some(driver) = &d.driver {
                    if driver.value != "local" {
                        self.error(
                            Pos::of(driver),
                            format!(
                                "volume driver `{}` is not supported: devices use `local` volumes",
                                driver.value
                            ),
                        );
                    }
                }
                if let Some(x) = &d.external {
                    self.error(Pos::of(x), "`external:` volumes are not supported: the agent creates and owns every volume of an app");
                }
                if let Some(x) = &d.driver_opts {
                    self.error(Pos::of(x), "volume `driver_opts:` is not supported");
                }
                if let Some(labels) = &d.labels {
                    spec.labels = self.key_values(labels, "label", false);
                }
            }
            volume_names.insert(key.value.clone(), name.clone());
            volumes.insert(name, spec);
        }

        // Service name → container name, for depends_on and network_mode: service:x.
        let mut container_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, svc) in &file.services.0 {
            let name = match &svc.value.container_name {
                Some(n) => self.s(n),
                None => format!("{app}-{}", key.value),
            };
            container_names.insert(key.value.clone(), name);
        }

        if file.services.0.is_empty() {
            self.error(Pos::default(), "`services:` is empty: declare at least one service");
        }
        let mut containers = Vec::new();
        let mut default_used = false;
        let mut seen_names: BTreeMap<String, Pos> = BTreeMap::new();
        for (key, svc) in &file.services.0 {
            let service = key.value.as_str();
            let pos = Pos::of(key);
            if !valid_service_name(service) {
                self.error(pos, format!("service name `{service}` is invalid: use letters, digits, '.', '_' and '-', starting with a letter or digit"));
            }
            let Some(spec) = self.service(
                service,
                &svc.value,
                pos,
                &container_names,
                &network_names,
                &volume_names,
                &default_network,
                &mut volumes,
            ) else {
                continue;
            };
            if let Some(first) = seen_names.insert(spec.name.clone(), pos) {
                self.error(pos, format!("container name `{}` is also used by the service at line {}: container names must be unique", spec.name, first.line));
            }
            default_used |= spec.networks.iter().any(|n| n.network == default_network);
            containers.push(spec);
        }
        if default_used && !networks.contains_key(&default_network) {
            networks
                .insert(default_network.clone(), NetworkSpec { name: default_network, ..Default::default() });
        }
        self.check_cycles(file, &container_names);
        Translated {
            containers,
            networks: networks.into_values().collect(),
            volumes: volumes.into_values().collect(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn service(
        &mut self,
        service: &str,
        svc: &Service,
        pos: Pos,
        container_names: &BTreeMap<String, String>,
        network_names: &BTreeMap<String, String>,
        volume_names: &BTreeMap<String, String>,
        default_network: &str,
        volumes: &mut BTreeMap<String, VolumeSpec>,
    ) -> Option<ContainerSpec> {
        let app = self.ctx.app;
        let mut refused = svc.refused();
        if let Some(r) =
            svc.deploy.as_ref().and_then(|d| d.value.resources.as_ref()).and_then(|r| r.reservations.as_ref())
        {
            refused.push(("deploy.resources.reservations", Pos::of(r)));
        }
        for (key, at) in &refused {
            self.error(*at, refusal(key));
        }
        let image = match &svc.image {
            Some(image) => {
                let text = self.s(image);
                let text = text.trim();
                if (text.is_empty() || text.contains(char::is_whitespace))
                    && !self.tainted.contains(&Pos::of(image))
                {
                    self.error(Pos::of(image), format!("image `{text}` is not a valid image reference"));
                }
                parse_image(text)
            }
            None => {
                if svc.build.is_none() {
                    self.error(
                        pos,
                        format!("service `{service}` has no `image:`: every service runs a prebuilt image"),
                    );
                }
                return None;
            }
        };
        let name = container_names.get(service).cloned().unwrap_or_default();
        if !valid_container_name(&name) {
            let at = svc.container_name.as_ref().map(Pos::of).unwrap_or(pos);
            self.error(
                at,
                format!("container name `{name}` is invalid: it must match [a-zA-Z0-9][a-zA-Z0-9_.-]+"),
            );
        }
        let mut spec = ContainerSpec {
            name,
            app: app.to_string(),
            service: service.to_string(),
            image,
            restart: RestartPolicy::No,
            privileged: svc.privileged.unwrap_or(false),
            ..Default::default()
        };
        spec.command = svc.command.as_ref().map(|c| self.words(c));
        spec.entrypoint = svc.entrypoint.as_ref().map(|c| self.words(c));
        if let Some(env) = &svc.environment {
            spec.env = self.key_values(env, "environment variable", true);
        }
        if let Some(labels) = &svc.labels {
            spec.labels = self.key_values(labels, "label", false);
        }
        spec.user = svc.user.as_ref().map(|u| self.scalar(u));
        spec.hostname = svc.hostname.as_ref().map(|h| self.s(h));
        for port in &svc.ports {
            let mut mapped = self.port(port);
            spec.ports.append(&mut mapped);
        }
        for e in &svc.expose {
            let text = self.scalar(e);
            match parse_expose(&text) {
                Ok(mut list) => spec.expose.append(&mut list),
                Err(msg) => self.error(Pos::of(e), msg),
            }
        }
        let mut mount_targets: BTreeMap<String, Pos> = BTreeMap::new();
        for v in &svc.volumes {
            if let Some(m) = self.volume(service, v, volume_names, volumes) {
                let target = m.target.trim_end_matches('/').to_string();
                if let Some(first) = mount_targets.insert(target.clone(), Pos::of(v)) {
                    self.error(Pos::of(v), format!("{target} is already mounted at line {}: the engine refuses duplicate mount points", first.line));
                }
                spec.mounts.push(m);
            }
        }
        if let Some(tmpfs) = &svc.tmpfs {
            for target in self.words_plain(tmpfs) {
                let target = target.split(':').next().unwrap_or_default().to_string();
                if !target.starts_with('/') {
                    self.error(Pos::of(tmpfs), format!("tmpfs target `{target}` must be an absolute path"));
                }
                spec.mounts.push(Mount { source: MountSource::Tmpfs, target, read_only: false });
            }
        }
        // Networks.
        if let Some(mode) = &svc.network_mode {
            let text = self.s(mode);
            let resolved = if let Some(other) = text.strip_prefix("service:") {
                match container_names.get(other) {
                    Some(c) => format!("container:{c}"),
                    None => {
                        self.error(
                            Pos::of(mode),
                            format!("network_mode `{text}` names no service of this app"),
                        );
                        text.clone()
                    }
                }
            } else if matches!(text.as_str(), "host" | "none" | "bridge") || text.starts_with("container:") {
                text.clone()
            } else {
                self.error(Pos::of(mode), format!("network_mode `{text}` is not supported: use host, none, bridge, service:<name> or container:<name>"));
                text.clone()
            };
            if let Some(nets) = &svc.networks {
                if let Some((first, _)) = nets.0.first() {
                    self.error(Pos::of(first), "`networks:` cannot be combined with `network_mode:`");
                }
            }
            spec.network_mode = Some(resolved);
        } else {
            match &svc.networks {
                None => spec.networks.push(NetworkAttachment {
                    network: default_network.to_string(),
                    aliases: vec![service.to_string()],
                }),
                Some(nets) => {
                    for (net, settings) in &nets.0 {
                        let engine_name = if net.value == "default" {
                            default_network.to_string()
                        } else {
                            match network_names.get(&net.value) {
                                Some(n) => n.clone(),
                                None => {
                                    self.error(
                                        Pos::of(net),
                                        format!(
                                            "network `{}` is not declared under the top-level `networks:`",
                                            net.value
                                        ),
                                    );
                                    continue;
                                }
                            }
                        };
                        let mut aliases = vec![service.to_string()];
                        if let Some(settings) = settings {
                            for a in &settings.aliases {
                                let alias = self.s(a);
                                if !aliases.contains(&alias) {
                                    aliases.push(alias);
                                }
                            }
                            for (what, v) in [
                                ("ipv4_address", &settings.ipv4_address),
                                ("ipv6_address", &settings.ipv6_address),
                            ] {
                                if let Some(v) = v {
                                    self.warning(Pos::of(v), format!("`{what}:` is ignored: the engine assigns addresses; reach services by name"));
                                }
                            }
                        }
                        spec.networks.push(NetworkAttachment { network: engine_name, aliases });
                    }
                }
            }
        }
        if let Some(r) = &svc.restart {
            let text = self.scalar(r);
            spec.restart = match text.as_str() {
                "no" | "false" => RestartPolicy::No,
                "always" => RestartPolicy::Always,
                "unless-stopped" => RestartPolicy::UnlessStopped,
                t if t == "on-failure" || t.starts_with("on-failure:") => {
                    if t != "on-failure" {
                        self.warning(
                            Pos::of(r),
                            "the retry count of `on-failure:N` is ignored: the engine retries without limit",
                        );
                    }
                    RestartPolicy::OnFailure
                }
                other => {
                    self.error(Pos::of(r), format!("restart policy `{other}` is not valid: use no, always, on-failure or unless-stopped"));
                    RestartPolicy::No
                }
            };
        }
        if let Some(h) = &svc.healthcheck {
            spec.healthcheck = self.healthcheck(h);
        }
        if let Some(deps) = &svc.depends_on {
            for (dep, settings) in &deps.0 {
                let Some(container) = container_names.get(&dep.value) else {
                    self.error(
                        Pos::of(dep),
                        format!("depends_on names `{}`, which is not a service of this app", dep.value),
                    );
                    continue;
                };
                if dep.value == service {
                    self.error(Pos::of(dep), "a service cannot depend on itself");
                    continue;
                }
                let condition = match settings.as_ref().and_then(|s| s.condition.as_ref()) {
                    None => DependencyCondition::Started,
                    Some(c) => match c.value.as_str() {
                        "service_started" => DependencyCondition::Started,
                        "service_healthy" => DependencyCondition::Healthy,
                        "service_completed_successfully" => DependencyCondition::CompletedSuccessfully,
                        other => {
                            self.error(Pos::of(c), format!("depends_on condition `{other}` is not valid: use service_started, service_healthy or service_completed_successfully"));
                            DependencyCondition::Started
                        }
                    },
                };
                spec.depends_on.push(Dependency { container: container.clone(), condition });
            }
        }
        for d in &svc.devices {
            let text = self.s(d);
            let parts: Vec<&str> = text.split(':').collect();
            let (host, container, perms) = match parts.as_slice() {
                [h] => (*h, *h, "rwm"),
                [h, c] => (*h, *c, "rwm"),
                [h, c, p] => (*h, *c, *p),
                _ => {
                    self.error(Pos::of(d), format!("device `{text}` is not HOST[:CONTAINER[:PERMISSIONS]]"));
                    continue;
                }
            };
            if !host.starts_with('/')
                || !container.starts_with('/')
                || perms.is_empty()
                || !perms.chars().all(|c| "rwm".contains(c))
            {
                self.error(Pos::of(d), format!("device `{text}` is not HOST[:CONTAINER[:PERMISSIONS]] with absolute paths and permissions of r, w, m"));
                continue;
            }
            spec.devices.push(DeviceMapping {
                host_path: host.into(),
                container_path: container.into(),
                permissions: perms.into(),
            });
        }
        spec.cap_add = svc.cap_add.iter().map(|c| c.value.clone()).collect();
        spec.cap_drop = svc.cap_drop.iter().map(|c| c.value.clone()).collect();
        spec.stop_signal = svc.stop_signal.as_ref().map(|s| s.value.clone());
        // Resource limits: `mem_limit`/`cpus` or `deploy.resources.limits`, not both.
        let limits =
            svc.deploy.as_ref().and_then(|d| d.value.resources.as_ref()).and_then(|r| r.limits.as_ref());
        let memory = match (&svc.mem_limit, limits.and_then(|l| l.memory.as_ref())) {
            (Some(a), Some(_)) => {
                self.error(Pos::of(a), "set the memory limit either with `mem_limit:` or with `deploy.resources.limits.memory:`, not both");
                None
            }
            (a, b) => a.as_ref().or(b),
        };
        if let Some(m) = memory {
            let text = self.scalar(m);
            match parse_bytes(&text) {
                Ok(b) => spec.memory_bytes = Some(b),
                Err(msg) => self.error(Pos::of(m), msg),
            }
        }
        let cpus = match (&svc.cpus, limits.and_then(|l| l.cpus.as_ref())) {
            (Some(a), Some(_)) => {
                self.error(
                    Pos::of(a),
                    "set the CPU limit either with `cpus:` or with `deploy.resources.limits.cpus:`, not both",
                );
                None
            }
            (a, b) => a.as_ref().or(b),
        };
        if let Some(c) = cpus {
            let text = self.scalar(c);
            match parse_nano_cpus(&text) {
                Ok(n) => spec.nano_cpus = Some(n),
                Err(msg) => self.error(Pos::of(c), msg),
            }
        }
        Some(spec)
    }

    /// `command:`/`entrypoint:`: a string is split like a shell would (no expansion).
    fn words(&mut self, v: &Spanned<StringOrList>) -> Vec<String> {
        match &v.value {
            StringOrList::String(s) => {
                let text = self.interp(s, Pos::of(v));
                match shell_words::split(&text) {
                    Ok(words) => words,
                    Err(e) => {
                        self.error(
                            Pos::of(v),
                            format!(
                                "cannot split `{text}` into words ({e}): check the quotes, or write a list"
                            ),
                        );
                        Vec::new()
                    }
                }
            }
            StringOrList::List(items) => items.iter().map(|i| self.scalar(i)).collect(),
        }
    }

    /// A string or a list, without word splitting (`tmpfs:`).
    fn words_plain(&mut self, v: &Spanned<StringOrList>) -> Vec<String> {
        match &v.value {
            StringOrList::String(s) => vec![self.interp(s, Pos::of(v))],
            StringOrList::List(items) => items.iter().map(|i| self.scalar(i)).collect(),
        }
    }

    /// `environment:`/`labels:` in list or map form.
    fn key_values(
        &mut self,
        v: &Spanned<ListOrMap>,
        what: &str,
        need_value: bool,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match &v.value {
            ListOrMap::List(items) => {
                for item in items {
                    let text = self.scalar(item);
                    match text.split_once('=') {
                        Some((k, val)) if !k.is_empty() => {
                            out.insert(k.to_string(), val.to_string());
                        }
                        None if !need_value && !text.is_empty() => {
                            out.insert(text, String::new());
                        }
                        _ => self.error(Pos::of(item), format!("{what} `{text}` has no value: write KEY=VALUE (a value may use ${{VAR}} from the device's vars)")),
                    }
                }
            }
            ListOrMap::Map(entries) => {
                for (k, val) in entries {
                    match val {
                        Some(val) => {
                            let text = self.scalar(val);
                            out.insert(k.value.clone(), text);
                        }
                        None if !need_value => {
                            out.insert(k.value.clone(), String::new());
                        }
                        None => self.error(Pos::of(k), format!("{what} `{}` has no value: write {}: VALUE (a value may use ${{VAR}} from the device's vars)", k.value, k.value)),
                    }
                }
            }
        }
        out
    }

    fn port(&mut self, v: &Spanned<ScalarOrMap<PortLong>>) -> Vec<PortMapping> {
        let pos = Pos::of(v);
        match &v.value {
            ScalarOrMap::Short(s) => {
                let text = self.interp(s, pos);
                match parse_port(&text) {
                    Ok(list) => list,
                    Err(msg) => {
                        self.error(pos, msg);
                        Vec::new()
                    }
                }
            }
            ScalarOrMap::Long(p) => {
                let target_text = self.scalar(&p.target);
                let protocol = match p.protocol.as_ref().map(|x| x.value.as_str()) {
                    None | Some("tcp") => Protocol::Tcp,
                    Some("udp") => Protocol::Udp,
                    Some(other) => {
                        let at = p.protocol.as_ref().map(Pos::of).unwrap_or(pos);
                        self.error(at, format!("protocol `{other}` is not supported: use tcp or udp"));
                        Protocol::Tcp
                    }
                };
                let Ok(container_port) = target_text.parse::<u16>() else {
                    self.error(
                        Pos::of(&p.target),
                        format!("port target `{target_text}` is not a port number (1-65535)"),
                    );
                    return Vec::new();
                };
                let host_port = match &p.published {
                    None => None,
                    Some(pub_) => {
                        let text = self.scalar(pub_);
                        match text.parse::<u16>() {
                            Ok(n) if n > 0 => Some(n),
                            _ => {
                                self.error(
                                    Pos::of(pub_),
                                    format!("published port `{text}` is not a port number (1-65535)"),
                                );
                                None
                            }
                        }
                    }
                };
                let host_ip = p.host_ip.as_ref().map(|h| self.s(h));
                vec![PortMapping { host_ip, host_port, container_port, protocol }]
            }
        }
    }

    fn volume(
        &mut self,
        service: &str,
        v: &Spanned<ScalarOrMap<VolumeLong>>,
        volume_names: &BTreeMap<String, String>,
        volumes: &mut BTreeMap<String, VolumeSpec>,
    ) -> Option<Mount> {
        let pos = Pos::of(v);
        let (kind, source, target, read_only) = match &v.value {
            ScalarOrMap::Short(s) => {
                let text = self.interp(s, pos);
                let parts: Vec<&str> = text.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [t] => (None, *t, ""),
                    [s, t] => (Some(*s), *t, ""),
                    [s, t, m] => (Some(*s), *t, *m),
                    _ => {
                        self.error(pos, format!("volume `{text}` is not [SOURCE:]TARGET[:MODE]"));
                        return None;
                    }
                };
                let mut read_only = false;
                for opt in mode.split(',').filter(|o| !o.is_empty()) {
                    match opt {
                        "ro" => read_only = true,
                        "rw" | "z" | "Z" | "cached" | "delegated" | "consistent" | "nocopy" => {}
                        other => {
                            self.error(pos, format!("volume mode `{other}` is not supported: use ro or rw"));
                        }
                    }
                }
                let kind = match source {
                    None => "volume",
                    Some(s) if s.starts_with('/') || s.starts_with('.') || s.starts_with('~') => "bind",
                    Some(_) => "volume",
                };
                (kind.to_string(), source.map(str::to_string), target.to_string(), read_only)
            }
            ScalarOrMap::Long(l) => {
                let source = l.source.as_ref().map(|s| self.s(s));
                let target = self.s(&l.target);
                (l.kind.value.clone(), source, target, l.read_only)
            }
        };
        if !target.starts_with('/') {
            self.error(
                pos,
                format!("volume target `{target}` must be an absolute path inside the container"),
            );
            return None;
        }
        let source = match (kind.as_str(), source) {
            ("bind", Some(src)) => MountSource::Bind(self.bind_source(&src, pos)?),
            ("bind", None) => {
                self.error(pos, "a bind mount needs a `source:`");
                return None;
            }
            ("volume", Some(name)) => match volume_names.get(&name) {
                Some(engine) => MountSource::Volume(engine.clone()),
                None => {
                    self.error(
                        pos,
                        format!("volume `{name}` is not declared under the top-level `volumes:`"),
                    );
                    return None;
                }
            },
            ("volume", None) => {
                // An anonymous volume becomes a named one, so it survives recreation.
                let suffix: String = target
                    .trim_matches('/')
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
                    .collect();
                let name = format!("{}_{service}_{suffix}", self.ctx.app);
                volumes
                    .entry(name.clone())
                    .or_insert_with(|| VolumeSpec { name: name.clone(), ..Default::default() });
                MountSource::Volume(name)
            }
            ("tmpfs", _) => MountSource::Tmpfs,
            (other, _) => {
                self.error(pos, format!("volume type `{other}` is not supported: use bind, volume or tmpfs"));
                return None;
            }
        };
        Some(Mount { source, target, read_only })
    }

    /// Resolves a bind source to a device path.
    fn bind_source(&mut self, src: &str, pos: Pos) -> Option<String> {
        if src.starts_with('~') {
            self.error(pos, format!("bind source `{src}` is home-relative: devices have no login user; use an absolute path, a relative path (./...) or a named volume"));
            return None;
        }
        if src.starts_with('/') {
            let trimmed = src.trim_end_matches('/');
            return Some(if trimmed.is_empty() { "/".into() } else { trimmed.into() });
        }
        let Some(rel) = normalize_relative(src) else {
            self.error(pos, format!("bind source `{src}` leaves the app directory: relative sources must stay inside apps/{}/", self.ctx.app));
            return None;
        };
        if let Some(target) = self.ctx.file_targets.get(&rel) {
            return Some(target.clone());
        }
        let root = self.ctx.app_root.trim_end_matches('/');
        let device_path = if rel.is_empty() { root.to_string() } else { format!("{root}/{rel}") };
        let prefix = if rel.is_empty() { String::new() } else { format!("{rel}/") };
        let under: Vec<(&String, &String)> =
            self.ctx.file_targets.iter().filter(|(source, _)| source.starts_with(&prefix)).collect();
        if under.is_empty() {
            self.warning(pos, format!("bind source `{src}` is not a file delivered by this app (see `files:` in app.yaml): the device path {device_path} is mounted as it is"));
        } else if let Some((source, target)) =
            under.iter().find(|(source, target)| **target != format!("{root}/{source}"))
        {
            self.error(pos, format!("directory bind `{src}` contains `{source}`, which is delivered to {target}: a directory bind only covers files at their default place under {device_path}; bind the file itself or drop its `target:`"));
        }
        Some(device_path)
    }

    fn healthcheck(&mut self, h: &Spanned<HealthcheckDef>) -> Option<Healthcheck> {
        let d = &h.value;
        if d.disable == Some(true) {
            return Some(Healthcheck { test: vec!["NONE".into()], ..Default::default() });
        }
        if let Some(s) = &d.start_interval {
            self.warning(Pos::of(s), "`start_interval:` is ignored by the agent");
        }
        let test = match &d.test {
            None => {
                self.error(Pos::of(h), "a healthcheck needs a `test:` (or `disable: true`)");
                return None;
            }
            Some(t) => match &t.value {
                StringOrList::String(s) => vec!["CMD-SHELL".into(), self.interp(s, Pos::of(t))],
                StringOrList::List(items) => {
                    let words: Vec<String> = items.iter().map(|i| self.scalar(i)).collect();
                    match words.first().map(String::as_str) {
                        Some("CMD" | "CMD-SHELL" | "NONE") => words,
                        _ => {
                            self.error(Pos::of(t), "a healthcheck `test:` list must start with \"CMD\", \"CMD-SHELL\" or \"NONE\"");
                            return None;
                        }
                    }
                }
            },
        };
        let mut dur = |v: &Option<Spanned<String>>| -> Option<u64> {
            let v = v.as_ref()?;
            let text = self.s(v);
            match parse_duration_ms(&text) {
                Ok(ms) => Some(ms),
                Err(msg) => {
                    self.error(Pos::of(v), msg);
                    None
                }
            }
        };
        let interval_ms = dur(&d.interval);
        let timeout_ms = dur(&d.timeout);
        let start_period_ms = dur(&d.start_period);
        Some(Healthcheck {
            test,
            interval_ms,
            timeout_ms,
            retries: d.retries.as_ref().map(|r| r.value),
            start_period_ms,
        })
    }

    /// Reports dependency cycles between services.
    fn check_cycles(&mut self, file: &ComposeFile, container_names: &BTreeMap<String, String>) {
        let mut edges: BTreeMap<&str, Vec<(&str, Pos)>> = BTreeMap::new();
        for (key, svc) in &file.services.0 {
            let deps = svc.value.depends_on.as_ref().map(|d| d.0.as_slice()).unwrap_or_default();
            edges.insert(
                key.value.as_str(),
                deps.iter()
                    .filter(|(d, _)| container_names.contains_key(&d.value) && d.value != key.value)
                    .map(|(d, _)| (d.value.as_str(), Pos::of(d)))
                    .collect(),
            );
        }
        // Colors: 0 unvisited, 1 on the stack, 2 done.
        let mut color: BTreeMap<&str, u8> = BTreeMap::new();
        let mut reported = BTreeSet::new();
        for start in edges.keys().copied().collect::<Vec<_>>() {
            let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
            if color.get(start).copied().unwrap_or(0) != 0 {
                continue;
            }
            color.insert(start, 1);
            while let Some((node, i)) = stack.pop() {
                let next = edges.get(node).and_then(|e| e.get(i)).copied();
                match next {
                    Some((dep, at)) => {
                        stack.push((node, i + 1));
                        match color.get(dep).copied().unwrap_or(0) {
                            0 => {
                                color.insert(dep, 1);
                                stack.push((dep, 0));
                            }
                            1 if reported.insert((node, dep)) => {
                                self.error(at, format!("depends_on cycle: `{node}` depends on `{dep}`, which (indirectly) depends on `{node}`"));
                            }
                            _ => {}
                        }
                    }
                    None => {
                        color.insert(node, 2);
                    }
                }
            }
        }
    }
}

/// `name[:tag][@sha256:...]` → reference without digest, and the digest.
pub fn parse_image(text: &str) -> ImageRef {
    match text.split_once('@') {
        Some((reference, digest)) => ImageRef { reference: reference.into(), digest: Some(digest.into()) },
        None => ImageRef { reference: text.into(), digest: None },
    }
}

/// Normalizes `./a/../b` to `b`; `None` when it climbs above the app directory.
pub fn normalize_relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Compose's short port syntax: `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]`, with
/// port ranges (`8000-8002:8000-8002`) and bracketed IPv6 host addresses.
pub fn parse_port(text: &str) -> Result<Vec<PortMapping>, String> {
    let err = |why: &str| {
        format!("port `{text}` is not valid ({why}): use [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/tcp|udp], e.g. \"8080:80\"")
    };
    let (spec, protocol) = match text.rsplit_once('/') {
        Some((s, "tcp")) => (s, Protocol::Tcp),
        Some((s, "udp")) => (s, Protocol::Udp),
        Some(_) => return Err(err("protocol must be tcp or udp")),
        None => (text, Protocol::Tcp),
    };
    let (host_ip, rest) = if let Some(stripped) = spec.strip_prefix('[') {
        let (ip, rest) = stripped.split_once(']').ok_or_else(|| err("unclosed ["))?;
        let rest = rest.strip_prefix(':').ok_or_else(|| err("expected ':' after the IPv6 address"))?;
        (Some(ip.to_string()), rest)
    } else {
        let colons = spec.matches(':').count();
        if colons == 2 {
            let (ip, rest) = spec.split_once(':').ok_or_else(|| err("bad address"))?;
            (Some(ip.to_string()), rest)
        } else if colons > 2 {
            return Err(err("write IPv6 host addresses in brackets"));
        } else {
            (None, spec)
        }
    };
    let (host, container) = match rest.split_once(':') {
        Some((h, c)) => (if h.is_empty() { None } else { Some(h) }, c),
        None => (None, rest),
    };
    let range = |s: &str| -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let a: u16 = a.parse().map_err(|_| err("not a port number"))?;
        let b: u16 = b.parse().map_err(|_| err("not a port number"))?;
        if a == 0 || b < a {
            return Err(err("bad port range"));
        }
        Ok((a, b))
    };
    let (c0, c1) = range(container)?;
    let host_range = host.map(range).transpose()?;
    if let Some((h0, h1)) = host_range {
        if h1 - h0 != c1 - c0 {
            return Err(err("host and container ranges differ in length"));
        }
    }
    Ok((c0..=c1)
        .enumerate()
        .map(|(i, c)| PortMapping {
            host_ip: host_ip.clone(),
            host_port: host_range.map(|(h0, _)| h0 + i as u16),
            container_port: c,
            protocol,
        })
        .collect())
}

/// `expose:` entries: `80`, `80/udp`, `8000-8002` → `80/tcp`, ...
pub fn parse_expose(text: &str) -> Result<Vec<String>, String> {
    let err = || format!("expose `{text}` is not PORT[-PORT][/tcp|udp]");
    let (ports, proto) = match text.split_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some(_) => return Err(err()),
        None => (text, "tcp"),
    };
    let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
    let a: u16 = a.parse().map_err(|_| err())?;
    let b: u16 = b.parse().map_err(|_| err())?;
    if a == 0 || b < a {
        return Err(err());
    }
    Ok((a..=b).map(|p| format!("{p}/{proto}")).collect())
}

/// Why interpolation failed.
#[derive(Debug, PartialEq)]
pub enum InterpError {
    Unset { name: String, message: Option<String> },
    Syntax(String),
}

/// Compose-style interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}`.
pub fn interpolate(text: &str, vars: &dyn VarLookup) -> Result<String, InterpError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end =
                r.find('}').ok_or_else(|| InterpError::Syntax(format!("unclosed `${{` in `{text}`")))?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            let name_len =
                inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_len);
            if name.is_empty() {
                return Err(InterpError::Syntax(format!("`${{{inner}}}` has no variable name")));
            }
            let value = vars.get(name);
            let resolved = match op {
                "" => value.ok_or(InterpError::Unset { name: name.into(), message: None })?,
                _ if op.starts_with(":-") => value.filter(|v| !v.is_empty()).unwrap_or_else(|| op[2..].to_string()),
                _ if op.starts_with('-') => value.unwrap_or_else(|| op[1..].to_string()),
                _ if op.starts_with(":?") => value
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| InterpError::Unset { name: name.into(), message: Some(op[2..].to_string()) })?,
                _ if op.starts_with('?') => {
                    value.ok_or_else(|| InterpError::Unset { name: name.into(), message: Some(op[1..].to_string()) })?
                }
                _ if op.starts_with(":+") => {
                    if value.is_some_and(|v| !v.is_empty()) {
                        op[2..].to_string()
                    } else {
                        String::new()
                    }
                }
                _ if op.starts_with('+') => {
                    if value.is_some() {
                        op[1..].to_string()
                    } else {
                        String::new()
                    }
                }
                _ => return Err(InterpError::Syntax(format!("`${{{inner}}}` is not a supported interpolation: use ${{VAR}}, ${{VAR:-default}} or ${{VAR:?message}}"))),
            };
            out.push_str(&resolved);
        } else {
            let name_len =
                rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if name_len == 0 {
                // A lone `$` stays as it is, as in Compose.
                out.push('$');
                continue;
            }
            let name = &rest[..name_len];
            out.push_str(&vars.get(name).ok_or(InterpError::Unset { name: name.into(), message: None })?);
            rest = &rest[name_len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "TZ" => Some("Europe/Berlin".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_forms() {
        let v: &dyn VarLookup = &vars;
        assert_eq!(interpolate("TZ=${TZ}", v), Ok("TZ=Europe/Berlin".into()));
        assert_eq!(interpolate("$TZ/x", v), Ok("Europe/Berlin/x".into()));
        assert_eq!(interpolate("$${TZ}", v), Ok("${TZ}".into()));
        assert_eq!(interpolate("${NOPE:-d}", v), Ok("d".into()));
        assert_eq!(interpolate("${EMPTY:-d}", v), Ok("d".into()));
        assert_eq!(interpolate("${EMPTY-d}", v), Ok("".into()));
        assert_eq!(interpolate("${TZ:+set}", v), Ok("set".into()));
        assert_eq!(interpolate("cost $ 5", v), Ok("cost $ 5".into()));
        assert_eq!(interpolate("${NOPE}", v), Err(InterpError::Unset { name: "NOPE".into(), message: None }));
        assert_eq!(
            interpolate("${NOPE:?set NOPE}", v),
            Err(InterpError::Unset { name: "NOPE".into(), message: Some("set NOPE".into()) })
        );
        assert!(matches!(interpolate("${TZ", v), Err(InterpError::Syntax(_))));
    }

    #[test]
    fn short_port_syntax() {
        let p = parse_port("8080:80").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port, p[0].protocol), (Some(8080), 80, Protocol::Tcp));
        let p = parse_port("127.0.0.1:5000:5000/udp").expect("valid");
        assert_eq!((p[0].host_ip.as_deref(), p[0].protocol), (Some("127.0.0.1"), Protocol::Udp));
        let p = parse_port("[::1]:53:53").expect("valid");
        assert_eq!(p[0].host_ip.as_deref(), Some("::1"));
        let p = parse_port("3000").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port), (None, 3000));
        let p = parse_port("127.0.0.1::80").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port), (None, 80));
        let p = parse_port("8000-8002:9000-9002").expect("valid");
        assert_eq!(
            p.iter().map(|m| (m.host_port, m.container_port)).collect::<Vec<_>>(),
            vec![(Some(8000), 9000), (Some(8001), 9001), (Some(8002), 9002)]
        );
        for bad in ["x", "80:80/sctp", "70000", "8000-8001:80", "::1:80:80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(normalize_relative("./conf/../files/a.conf").as_deref(), Some("files/a.conf"));
        assert_eq!(normalize_relative(".").as_deref(), Some(""));
        assert_eq!(normalize_relative("../other"), None);
    }
}
