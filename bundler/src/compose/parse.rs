//! The Compose file as YAML: the keys fleet knows, with their places in the file.
//!
//! Every struct refuses unknown keys (serde `deny_unknown_fields`); keys the agent cannot
//! apply are parsed as "refused" so the translation can name them with the reason.
//! Parsing only: no interpolation, no I/O.

use std::fmt;
use std::ops::Deref;

use serde::de::{self, DeserializeSeed, IgnoredAny, IntoDeserializer, MapAccess, Visitor};
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
    pub services: SpannedMap<Spanned<Ext<Service>>>,
    #[serde(default)]
    pub networks: SpannedMap<Option<Spanned<Ext<NetworkDef>>>>,
    #[serde(default)]
    pub volumes: SpannedMap<Option<Spanned<Ext<VolumeDef>>>>,
    #[serde(default)]
    pub secrets: SpannedMap<Spanned<Ext<FileDef>>>,
    #[serde(default)]
    pub configs: SpannedMap<Spanned<Ext<FileDef>>>,
}

/// One top-level `secrets:` or `configs:` entry. Only `file:` (and `content:` for a
/// config) says where the bytes come from on a device; the other keys are refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDef {
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// A config's inline content (interpolated); refused for a secret.
    #[serde(default)]
    pub content: Option<Spanned<String>>,
    // Refused by name (see [`FileDef::refused`]).
    #[serde(default)]
    pub external: Refused,
    #[serde(default)]
    pub environment: Refused,
    #[serde(default)]
    pub name: Refused,
    #[serde(default)]
    pub driver: Refused,
    #[serde(default)]
    pub driver_opts: Refused,
    #[serde(default)]
    pub template_driver: Refused,
    #[serde(default)]
    pub labels: Refused,
}

impl FileDef {
    /// The refused keys this entry uses, with their places.
    pub(super) fn refused(&self) -> Vec<(&'static str, Pos)> {
        let all: [(&'static str, &Refused); 7] = [
            ("external", &self.external),
            ("environment", &self.environment),
            ("name", &self.name),
            ("driver", &self.driver),
            ("driver_opts", &self.driver_opts),
            ("template_driver", &self.template_driver),
            ("labels", &self.labels),
        ];
        all.iter().filter_map(|(name, v)| v.as_ref().map(|s| (*name, Pos::of(s)))).collect()
    }
}

/// The long syntax of a service's `secrets:` / `configs:` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGrant {
    pub source: Spanned<String>,
    #[serde(default)]
    pub target: Option<Spanned<String>>,
    #[serde(default)]
    pub uid: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub gid: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub mode: Option<Spanned<Scalar>>,
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
    pub deploy: Option<Spanned<Ext<Deploy>>>,
    #[serde(default)]
    pub profiles: Vec<Spanned<String>>,
    #[serde(default)]
    pub env_file: Option<Spanned<EnvFiles>>,
    #[serde(default)]
    pub logging: Option<Spanned<Ext<LoggingDef>>>,
    #[serde(default)]
    pub init: Option<bool>,
    #[serde(default)]
    pub read_only: Option<bool>,
    #[serde(default)]
    pub security_opt: Vec<Spanned<String>>,
    #[serde(default)]
    pub working_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub shm_size: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub sysctls: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub ulimits: SpannedMap<Spanned<ScalarOrMap<UlimitLong>>>,
    #[serde(default)]
    pub extra_hosts: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub tty: Option<bool>,
    #[serde(default)]
    pub stdin_open: Option<bool>,
    #[serde(default)]
    pub stop_grace_period: Option<Spanned<String>>,
    #[serde(default)]
    pub dns: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub dns_search: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub dns_opt: Vec<Spanned<String>>,
    #[serde(default)]
    pub group_add: Vec<Spanned<Scalar>>,
    #[serde(default)]
    pub oom_score_adj: Option<Spanned<i64>>,
    #[serde(default)]
    pub pids_limit: Option<Spanned<i64>>,
    #[serde(default)]
    pub cpuset: Option<Spanned<String>>,
    #[serde(default)]
    pub ipc: Option<Spanned<String>>,
    #[serde(default)]
    pub pid: Option<Spanned<String>>,
    #[serde(default)]
    pub mac_address: Option<Spanned<String>>,
    #[serde(default)]
    pub mem_reservation: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub memswap_limit: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cpu_shares: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cpu_period: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cpu_quota: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cgroup_parent: Option<Spanned<String>>,

    #[serde(default)]
    pub secrets: Vec<Spanned<ScalarOrMap<FileGrant>>>,
    #[serde(default)]
    pub configs: Vec<Spanned<ScalarOrMap<FileGrant>>>,

    // Compose keys the agent cannot apply: refused by name.
    #[serde(default)]
    pub build: Refused,
    #[serde(default)]
    pub extends: Refused,
    #[serde(default)]
    pub links: Refused,
    #[serde(default)]
    pub external_links: Refused,
    #[serde(default)]
    pub volumes_from: Refused,
    #[serde(default)]
    pub platform: Option<Spanned<String>>,
    #[serde(default)]
    pub pull_policy: Option<Spanned<String>>,
    #[serde(default)]
    pub domainname: Option<Spanned<String>>,
    #[serde(default)]
    pub runtime: Option<Spanned<String>>,
    #[serde(default)]
    pub scale: Refused,
    #[serde(default)]
    pub userns_mode: Option<Spanned<String>>,
    #[serde(default)]
    pub develop: Refused,
    #[serde(default)]
    pub annotations: Refused,
    #[serde(default)]
    pub attach: Refused,
    #[serde(default)]
    pub blkio_config: Option<Spanned<Ext<BlkioDef>>>,
    #[serde(default)]
    pub cgroup: Option<Spanned<String>>,
    #[serde(default)]
    pub cpu_count: Refused,
    #[serde(default)]
    pub cpu_percent: Refused,
    #[serde(default)]
    pub cpu_rt_period: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub cpu_rt_runtime: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub credential_spec: Refused,
    #[serde(default)]
    pub device_cgroup_rules: Vec<Spanned<String>>,
    #[serde(default)]
    pub gpus: Option<Spanned<GpusDef>>,
    #[serde(default)]
    pub isolation: Refused,
    #[serde(default)]
    pub label_file: Option<Spanned<StringOrList>>,
    #[serde(default)]
    pub mem_swappiness: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub oom_kill_disable: Option<bool>,
    #[serde(default)]
    pub post_start: Vec<Spanned<Ext<HookDef>>>,
    #[serde(default)]
    pub pre_stop: Vec<Spanned<Ext<HookDef>>>,
    #[serde(default)]
    pub storage_opt: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub uts: Option<Spanned<String>>,
    #[serde(default)]
    pub use_api_socket: Refused,
    #[serde(default)]
    pub provider: Refused,
    #[serde(default)]
    pub models: Refused,
}

/// Keys each Compose mapping knows only to refuse them by name (with the reason, in the
/// translation): serde lists them among the fields it knows, and an unknown key's
/// message must not offer them as allowed. Found by the mapping's field list, which
/// serde gives whole.
pub(super) const REFUSED: [(&str, &[&str]); 3] = [
    // A service (the only mapping with `image`).
    (
        "image",
        &[
            "build",
            "extends",
            "links",
            "external_links",
            "volumes_from",
            "scale",
            "develop",
            "annotations",
            "attach",
            "cpu_count",
            "cpu_percent",
            "credential_spec",
            "isolation",
            "use_api_socket",
            "provider",
            "models",
        ],
    ),
    // `deploy:`.
    (
        "replicas",
        &[
            "mode",
            "placement",
            "endpoint_mode",
            "update_config",
            "rollback_config",
            "restart_policy",
            "labels",
        ],
    ),
    // A top-level `secrets:` / `configs:` entry.
    ("file", &["external", "environment", "name", "driver", "driver_opts", "template_driver", "labels"]),
];

/// Drops from `allowed` (the fields serde knows for one mapping) the keys that mapping
/// refuses by name.
pub fn drop_refused(allowed: &mut Vec<String>) {
    for (marker, refused) in REFUSED {
        if allowed.iter().any(|k| k == marker) {
            allowed.retain(|k| !refused.contains(&k.as_str()));
        }
    }
}

impl Service {
    /// The refused keys this service uses, with their places.
    pub(super) fn refused(&self) -> Vec<(&'static str, Pos)> {
        let all: [(&'static str, &Refused); 16] = [
            ("build", &self.build),
            ("extends", &self.extends),
            ("links", &self.links),
            ("external_links", &self.external_links),
            ("volumes_from", &self.volumes_from),
            ("scale", &self.scale),
            ("develop", &self.develop),
            ("annotations", &self.annotations),
            ("attach", &self.attach),
            ("cpu_count", &self.cpu_count),
            ("cpu_percent", &self.cpu_percent),
            ("credential_spec", &self.credential_spec),
            ("isolation", &self.isolation),
            ("use_api_socket", &self.use_api_socket),
            ("provider", &self.provider),
            ("models", &self.models),
        ];
        all.iter().filter_map(|(name, v)| v.as_ref().map(|s| (*name, Pos::of(s)))).collect()
    }
}

/// The message for a refused key: why, and what to write instead.
pub(super) fn refusal(key: &str) -> String {
    let why = match key {
        "build" => "devices pull images, build them in CI and set `image:`",
        "develop" => "it is for `docker compose watch` on a developer's machine",
        "extends" => "it reads other files; inline the service (YAML anchors and `<<:` merge keys work)",
        "links" => "services reach each other by service name on the app's network (use `depends_on:` for the start order)",
        "external_links" => "the agent connects only the app's own containers",
        "volumes_from" => "mount the same named volume in both services",
        "scale" => "a device runs one container per service",
        "cpu_count" | "cpu_percent" => "it is for Windows containers (use `cpus:` or `cpu_quota:`)",
        "credential_spec" | "isolation" => "it is for Windows containers",
        "use_api_socket" => "it hands the engine's API (root on the device) to the container",
        "provider" | "models" => "it runs on the machine of `docker compose`, not in a container",
        "deploy.restart_policy" => "Swarm's restart policy: use `restart:`",
        "deploy.labels" => "Swarm's service labels: use `labels:`",
        "deploy.mode" | "deploy.placement" | "deploy.endpoint_mode" | "deploy.update_config" | "deploy.rollback_config" => {
            "Swarm schedules services over nodes; a device runs one container per service (the agent rolls back by itself)"
        }
        "attach" => "it is about `docker compose up` attaching to logs; the agent runs detached",
        _ => "not yet: the agent does not apply it (see the Compose key table in the bundler README)",
    };
    format!("`{key}:` is not supported: {why}")
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
    pub ipv4_address: Option<Spanned<String>>,
    #[serde(default)]
    pub ipv6_address: Option<Spanned<String>>,
    #[serde(default)]
    pub priority: Option<Spanned<Scalar>>,
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
    /// One container per service on a device: only `1` is accepted.
    #[serde(default)]
    pub replicas: Option<Spanned<u64>>,
    // Swarm's scheduling: refused by name.
    #[serde(default)]
    pub mode: Refused,
    #[serde(default)]
    pub placement: Refused,
    #[serde(default)]
    pub endpoint_mode: Refused,
    #[serde(default)]
    pub update_config: Refused,
    #[serde(default)]
    pub rollback_config: Refused,
    #[serde(default)]
    pub restart_policy: Refused,
    #[serde(default)]
    pub labels: Refused,
}

impl Deploy {
    /// The refused `deploy.*` keys this service uses, with their places.
    pub(super) fn refused(&self) -> Vec<(&'static str, Pos)> {
        let all: [(&'static str, &Refused); 7] = [
            ("deploy.mode", &self.mode),
            ("deploy.placement", &self.placement),
            ("deploy.endpoint_mode", &self.endpoint_mode),
            ("deploy.update_config", &self.update_config),
            ("deploy.rollback_config", &self.rollback_config),
            ("deploy.restart_policy", &self.restart_policy),
            ("deploy.labels", &self.labels),
        ];
        all.iter().filter_map(|(name, v)| v.as_ref().map(|s| (*name, Pos::of(s)))).collect()
    }
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
    pub ipam: Option<Spanned<Ext<IpamDef>>>,
    #[serde(default)]
    pub enable_ipv6: Option<bool>,
    #[serde(default)]
    pub driver_opts: Option<Spanned<ListOrMap>>,
    #[serde(default)]
    pub attachable: Option<IgnoredAny>,
}

/// A network's `ipam:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamDef {
    #[serde(default)]
    pub driver: Option<Spanned<String>>,
    #[serde(default)]
    pub config: Vec<Spanned<Ext<IpamPoolDef>>>,
    #[serde(default)]
    pub options: Option<Spanned<IgnoredAny>>,
}

/// One entry of `ipam.config`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamPoolDef {
    pub subnet: Spanned<String>,
    #[serde(default)]
    pub ip_range: Option<Spanned<String>>,
    #[serde(default)]
    pub gateway: Option<Spanned<String>>,
    #[serde(default)]
    pub aux_addresses: Option<Spanned<ListOrMap>>,
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

/// `logging:` of a service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingDef {
    #[serde(default)]
    pub driver: Option<Spanned<String>>,
    #[serde(default)]
    pub options: Option<Spanned<ListOrMap>>,
}

/// One entry of `post_start:` / `pre_stop:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookDef {
    pub command: Spanned<StringOrList>,
    #[serde(default)]
    pub user: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub privileged: Option<bool>,
    #[serde(default)]
    pub working_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub environment: Option<Spanned<ListOrMap>>,
}

/// `gpus:`: `all`, or a list of requests.
#[derive(Debug)]
pub enum GpusDef {
    All,
    List(Vec<Spanned<GpuDef>>),
}

impl<'de> Deserialize<'de> for GpusDef {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GpusDef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all` or a list of GPU requests")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GpusDef, E> {
                if v == "all" {
                    Ok(GpusDef::All)
                } else {
                    Err(E::custom(format!("`gpus: {v}`: write `all` or a list of requests")))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<GpusDef, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(GpusDef::List(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// One request of `gpus:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuDef {
    #[serde(default)]
    pub driver: Option<Spanned<String>>,
    #[serde(default)]
    pub count: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub device_ids: Vec<Spanned<String>>,
    #[serde(default)]
    pub capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    pub options: Option<Spanned<IgnoredAny>>,
}

/// `blkio_config:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkioDef {
    #[serde(default)]
    pub weight: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub weight_device: Vec<Spanned<BlkioDevice>>,
    #[serde(default)]
    pub device_read_bps: Vec<Spanned<BlkioDevice>>,
    #[serde(default)]
    pub device_write_bps: Vec<Spanned<BlkioDevice>>,
    #[serde(default)]
    pub device_read_iops: Vec<Spanned<BlkioDevice>>,
    #[serde(default)]
    pub device_write_iops: Vec<Spanned<BlkioDevice>>,
}

/// One device entry of `blkio_config`: `{path, weight}` or `{path, rate}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkioDevice {
    pub path: Spanned<String>,
    #[serde(default)]
    pub weight: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub rate: Option<Spanned<Scalar>>,
}

/// The long form of one `ulimits:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UlimitLong {
    pub soft: Spanned<i64>,
    pub hard: Spanned<i64>,
}

/// A mapping whose extension fields (`x-*` keys, which the Compose specification lets
/// users put anywhere for anchors and tools) are skipped before `T` sees the mapping, so
/// `T` can still refuse every other unknown key. Keys are read as text; values of the
/// other keys keep their places in the file.
#[derive(Debug)]
pub struct Ext<T>(pub T);

impl<T> Deref for Ext<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Default> Default for Ext<T> {
    fn default() -> Self {
        Ext(T::default())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ext<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ext<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(SkipExtensions(map))).map(Ext)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

struct SkipExtensions<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipExtensions<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(Scalar(key)) = self.0.next_key::<Scalar>()? else { return Ok(None) };
            if key.starts_with("x-") {
                self.0.next_value::<IgnoredAny>()?;
                continue;
            }
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        None
    }
}

/// `env_file:`: one path, or a list of paths and `{path, required}` maps.
#[derive(Debug)]
pub enum EnvFiles {
    One(String),
    List(Vec<Spanned<ScalarOrMap<EnvFileLong>>>),
}

impl<'de> Deserialize<'de> for EnvFiles {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EnvFiles;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path or a list of paths")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvFiles, E> {
                Ok(EnvFiles::One(v.into()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<EnvFiles, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(EnvFiles::List(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// The long form of one `env_file:` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFileLong {
    pub path: String,
    #[serde(default = "yes")]
    pub required: bool,
    /// `raw` (no interpolation) or absent.
    #[serde(default)]
    pub format: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

impl Service {
    /// Every `env_file:` entry: path as written, whether it must exist, no
    /// interpolation (`format: raw`), and its place.
    /// The `label_file:` paths as written, with their places.
    pub fn label_files(&self) -> Vec<(String, Pos)> {
        match &self.label_file {
            None => Vec::new(),
            Some(v) => match &v.value {
                StringOrList::String(path) => vec![(path.clone(), Pos::of(v))],
                StringOrList::List(paths) => paths.iter().map(|p| (p.value.0.clone(), Pos::of(p))).collect(),
            },
        }
    }

    pub fn env_files(&self) -> Vec<(String, bool, bool, Pos)> {
        let Some(files) = &self.env_file else { return Vec::new() };
        match &files.value {
            EnvFiles::One(path) => vec![(path.clone(), true, false, Pos::of(files))],
            EnvFiles::List(items) => items
                .iter()
                .map(|item| match &item.value {
                    ScalarOrMap::Short(path) => (path.clone(), true, false, Pos::of(item)),
                    ScalarOrMap::Long(l) => (
                        l.path.clone(),
                        l.required,
                        l.format.as_ref().is_some_and(|f| f.value == "raw"),
                        Pos::of(item),
                    ),
                })
                .collect(),
        }
    }
}
