//! The Compose file as YAML: the keys fleet knows, with their places in the file.
//!
//! Every struct refuses unknown keys (serde `deny_unknown_fields`); keys the agent cannot
//! apply are parsed as "refused" so the translation can name them with the reason.
//! Parsing only: no interpolation, no I/O.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

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
    pub(super) fn refused(&self) -> Vec<(&'static str, Pos)> {
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
pub(super) fn refusal(key: &str) -> String {
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
