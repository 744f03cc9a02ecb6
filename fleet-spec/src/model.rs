//! The desired state of one device: the files it should hold and the containers,
//! networks and volumes it should run.
//!
//! This is what a bundle's payload carries. It is built by the bundler and applied by
//! the agent. Every collection is ordered (`Vec` sorted by [`DesiredState::canonicalize`],
//! `BTreeMap` for maps), so the same state always encodes to the same bytes.
//!
//! This module never does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything one device should hold, as declared by the fleet repository at one commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DesiredState {
    /// Managed files, sorted by path.
    pub files: Vec<ManagedFile>,
    /// Managed containers, sorted by name.
    pub containers: Vec<ContainerSpec>,
    /// Networks the containers attach to, sorted by name.
    pub networks: Vec<NetworkSpec>,
    /// Named volumes the containers mount, sorted by name.
    pub volumes: Vec<VolumeSpec>,
    /// When the device may apply this state (maintenance windows, update-lock bound).
    /// Outside the state's own encoding: written after it in bundle format 3 only when
    /// set (see [`DesiredState::encode`]).
    #[serde(skip)]
    pub maintenance: crate::maintenance::Maintenance,
    /// Secrets in the clear, not yet sealed: the bundler renders them here (never into
    /// `files` or a container's `env`), so that `plan` can name them without showing
    /// them; [`DesiredState::seal`] encrypts them into `sealed`. Never encoded.
    #[serde(skip)]
    pub secrets: Secrets,
    /// The [`Secrets`] encrypted (age, X25519) to the device's keys: bundle format 4's
    /// trailer. Only the device can read them; the agent merges them into the state with
    /// [`DesiredState::unseal`] after verifying the bundle.
    #[serde(skip)]
    pub sealed: Vec<u8>,
    /// Files too large to travel inside the bundle, named by digest and size; their bytes
    /// are `blobs/<sha256>` beside the bundles (bundle format 5's trailer, sorted by path).
    #[serde(skip)]
    pub artifacts: Vec<Artifact>,
    /// What pulling each pinned image downloads, as its registry reported it when
    /// `build --resolve-digests` pinned it: the agent checks the engine's disk before a
    /// pull (bundle format 6's trailer, sorted by digest; images without a recorded
    /// size are not checked).
    #[serde(skip)]
    pub image_sizes: Vec<ImageSize>,
    /// The agent this device should run (bundle format 7's trailer): the binaries of one
    /// release, one per architecture, as blobs; `None` leaves the agent as it is.
    #[serde(skip)]
    pub agent: Option<AgentRelease>,
}

/// An agent release a fleet declares for a device (`fleet.yaml` `agent:`): the device
/// takes the binary of its architecture, tries it, and keeps it once it confirmed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentRelease {
    /// The release's version (`MAJOR.MINOR.PATCH[-PRE]`), what `fleet-agent --version`
    /// prints after `fleet-agent `.
    pub version: String,
    /// Lets a device go to an older version than the one it runs.
    pub allow_downgrade: bool,
    /// One per architecture, sorted by it.
    pub binaries: Vec<AgentBinary>,
}

/// One architecture's agent binary, a blob (`blobs/<sha256>`) like an artifact's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentBinary {
    /// `std::env::consts::ARCH` of the binary: `aarch64`, `arm`, `x86_64`, ...
    pub arch: String,
    /// sha256 of the binary.
    pub sha256: [u8; 32],
    /// Its length.
    pub size: u64,
}

impl AgentBinary {
    /// The digest in hex: the blob's name.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

impl AgentRelease {
    /// The binary for architecture `arch`.
    pub fn binary(&self, arch: &str) -> Option<&AgentBinary> {
        self.binaries.iter().find(|b| b.arch == arch)
    }
}

/// Checks a release version as the fleet writes them (an agent release in `fleet.yaml`,
/// a bundle's [`AgentRelease::version`], what `fleet-agent --version` prints):
/// `MAJOR.MINOR.PATCH[-PRE]`, semver 2.0 without build metadata: numbers without leading
/// zeros, pre-release fields of letters, digits and `-`. The error says what is wrong.
/// The one parser of versions: the bundler refuses what [`compare_versions`] cannot order.
pub fn check_version(v: &str) -> Result<(), String> {
    if let Some((_, build)) = v.split_once('+') {
        return Err(format!("build metadata `+{build}` is not part of it"));
    }
    let (core, pre) = match v.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (v, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3 {
        return Err(format!("{} dot-separated number(s) before any `-`, three wanted", parts.len()));
    }
    for p in parts {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{p}` is not a number"));
        }
        if p.len() > 1 && p.starts_with('0') {
            return Err(format!("`{p}` has a leading zero"));
        }
        if p.parse::<u64>().is_err() {
            return Err(format!("`{p}` is too large"));
        }
    }
    if let Some(pre) = pre {
        for field in pre.split('.') {
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!(
                    "the pre-release `{pre}` has a field `{field}` that is not letters, digits and `-`"
                ));
            }
        }
    }
    Ok(())
}

/// Orders two release versions as semver does (a pre-release sorts before its release,
/// pre-release fields compare numerically when both are numbers); `None` when either
/// fails [`check_version`].
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    fn parse(v: &str) -> Option<([u64; 3], Option<&str>)> {
        check_version(v).ok()?;
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (v, None),
        };
        let mut nums = [0u64; 3];
        for (n, p) in nums.iter_mut().zip(core.split('.')) {
            *n = p.parse().ok()?;
        }
        Some((nums, pre))
    }
    let (a, b) = (parse(a)?, parse(b)?);
    Some(a.0.cmp(&b.0).then_with(|| match (a.1, b.1) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(_), None) => std::cmp::Ordering::Less,
        (Some(x), Some(y)) => {
            let mut xs = x.split('.');
            let mut ys = y.split('.');
            loop {
                match (xs.next(), ys.next()) {
                    (None, None) => break std::cmp::Ordering::Equal,
                    (None, Some(_)) => break std::cmp::Ordering::Less,
                    (Some(_), None) => break std::cmp::Ordering::Greater,
                    (Some(p), Some(q)) => {
                        let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                            (Ok(m), Ok(n)) => m.cmp(&n),
                            (Ok(_), Err(_)) => std::cmp::Ordering::Less,
                            (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
                            (Err(_), Err(_)) => p.cmp(q),
                        };
                        if o != std::cmp::Ordering::Equal {
                            break o;
                        }
                    }
                }
            }
        }
    }))
}

/// The download size of one image manifest: its config and layers as the registry
/// lists them (compressed), the largest platform's for a multi-platform index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageSize {
    /// The manifest digest a container's image is pinned to (`sha256:<64 hex>`).
    pub digest: String,
    /// Bytes the registry lists for the image (compressed layers and config).
    pub bytes: u64,
}

/// A managed file whose bytes are not in the bundle: the signed state names them by
/// sha256 and size, and the device fetches them (`blobs/<sha256>` beside the bundles)
/// only when it does not hold them already. Written like any managed file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Artifact {
    /// Absolute path on the device, as [`ManagedFile::path`].
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    /// Owner; `None` keeps the agent's own user.
    pub owner: Option<Owner>,
    /// sha256 of the bytes.
    pub sha256: [u8; 32],
    /// Length of the bytes.
    pub size: u64,
}

impl Artifact {
    /// The digest in hex: the blob's name and the file's content hash.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// A managed file of a state, whichever way its bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// Bytes inside the bundle.
    Inline(&'a ManagedFile),
    /// Bytes in a blob (format 5).
    Artifact(&'a Artifact),
}

impl<'a> Entry<'a> {
    pub fn path(&self) -> &'a str {
        match self {
            Entry::Inline(f) => &f.path,
            Entry::Artifact(a) => &a.path,
        }
    }

    pub fn mode(&self) -> u32 {
        match self {
            Entry::Inline(f) => f.mode,
            Entry::Artifact(a) => a.mode,
        }
    }

    pub fn owner(&self) -> Option<Owner> {
        match self {
            Entry::Inline(f) => f.owner,
            Entry::Artifact(a) => a.owner,
        }
    }

    /// Hex sha256 of the file's bytes.
    pub fn sha256_hex(&self) -> String {
        match self {
            Entry::Inline(f) => f.content_sha256(),
            Entry::Artifact(a) => a.sha256_hex(),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Entry::Inline(f) => f.content.len() as u64,
            Entry::Artifact(a) => a.size,
        }
    }
}

/// What only the device may read.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Secrets {
    /// Secret files, whole (path, mode, owner, content).
    pub files: Vec<ManagedFile>,
    /// Secret environment variables: container name → variable → value.
    pub env: BTreeMap<String, BTreeMap<String, String>>,
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.env.values().all(BTreeMap::is_empty)
    }
}

/// Why a bundle's secrets could not be merged into its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsealError {
    #[error("the bundle's secrets cannot be decrypted: {0}")]
    Decrypt(String),
    #[error("the bundle's secrets are not a valid secret set: {0}")]
    Invalid(String),
}

/// A file the agent writes atomically and keeps in place.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ManagedFile {
    /// Absolute path on the device. The agent refuses paths outside its allowed roots.
    pub path: String,
    /// Unix permission bits, e.g. `0o644`.
    pub mode: u32,
    /// Owner; `None` keeps the agent's own user.
    pub owner: Option<Owner>,
    /// The bytes of the file.
    #[serde(with = "serde_bytes_compat")]
    pub content: Vec<u8>,
}

/// Numeric owner of a managed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl ManagedFile {
    /// Hex sha256 of the content: how drift and "mounted file changed" are detected.
    pub fn content_sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.content))
    }
}

/// One container, in the terms of the Docker Engine API.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Engine-wide container name, `<app>-<service>` unless the Compose file sets
    /// `container_name`. Matches `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
    pub name: String,
    /// The app (fleet repo `apps/<app>`) this container belongs to.
    pub app: String,
    /// The Compose service name.
    pub service: String,
    pub image: ImageRef,
    /// Overrides the image's `CMD`.
    pub command: Option<Vec<String>>,
    /// Overrides the image's `ENTRYPOINT`.
    pub entrypoint: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub ports: Vec<PortMapping>,
    /// Ports exposed to other containers only (`expose:`), e.g. `"8080/tcp"`.
    pub expose: Vec<String>,
    pub mounts: Vec<Mount>,
    pub networks: Vec<NetworkAttachment>,
    /// Docker's network mode (`host`, `none`, ...) when set; then `networks` is empty.
    pub network_mode: Option<String>,
    pub restart: RestartPolicy,
    pub healthcheck: Option<Healthcheck>,
    pub labels: BTreeMap<String, String>,
    pub depends_on: Vec<Dependency>,
    pub devices: Vec<DeviceMapping>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub privileged: bool,
    pub stop_signal: Option<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in billionths of a CPU (Docker's `NanoCpus`).
    pub nano_cpus: Option<u64>,
    /// Further engine settings (Compose `logging`, `init`, `sysctls`, ...). Not part of
    /// the container's own encoding: [`DesiredState::encode`] writes them after the
    /// state (bundle format 2) when any is set, so a state using none of them encodes,
    /// and every container hashes, exactly as before they existed.
    #[serde(skip)]
    pub options: ContainerOptions,
}

/// Engine settings of a container beyond the basics, in Docker Engine API terms. Every
/// field's default means "not set: the engine's default". Fields marked *host access*
/// reach outside the container and are what a device's container policy governs.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerOptions {
    /// `HostConfig.LogConfig`: the log driver and its options (`max-size`, `max-file`).
    pub logging: Option<LogConfig>,
    /// `HostConfig.Init`: run an init process (tini) as PID 1.
    pub init: Option<bool>,
    /// `HostConfig.ReadonlyRootfs`.
    pub read_only: bool,
    /// `HostConfig.SecurityOpt`, e.g. `no-new-privileges:true`. *Host access* for
    /// `seccomp=unconfined`, `apparmor=unconfined`, `label=disable`.
    pub security_opt: Vec<String>,
    /// `Config.WorkingDir`.
    pub working_dir: Option<String>,
    /// `HostConfig.ShmSize` in bytes.
    pub shm_size_bytes: Option<u64>,
    /// `HostConfig.Sysctls` (namespaced kernel parameters, e.g. `net.core.somaxconn`).
    pub sysctls: BTreeMap<String, String>,
    /// `HostConfig.Ulimits`, by name (`nofile`, `nproc`, ...).
    pub ulimits: BTreeMap<String, Ulimit>,
    /// `HostConfig.ExtraHosts`: `host:ip` entries for `/etc/hosts`.
    pub extra_hosts: Vec<String>,
    /// `Config.Tty`.
    pub tty: bool,
    /// `Config.OpenStdin`.
    pub stdin_open: bool,
    /// `Config.StopTimeout` in seconds (Compose `stop_grace_period`).
    pub stop_timeout_s: Option<u64>,
    /// `HostConfig.Dns`.
    pub dns: Vec<String>,
    /// `HostConfig.DnsSearch`.
    pub dns_search: Vec<String>,
    /// `HostConfig.DnsOptions`.
    pub dns_opt: Vec<String>,
    /// `HostConfig.GroupAdd`: supplementary groups of the container's user.
    pub group_add: Vec<String>,
    /// `HostConfig.OomScoreAdj`.
    pub oom_score_adj: Option<i64>,
    /// `HostConfig.PidsLimit` (`-1`: unlimited).
    pub pids_limit: Option<i64>,
    /// `HostConfig.CpusetCpus`, e.g. `0-1`.
    pub cpuset: Option<String>,
    /// `HostConfig.IpcMode` (`private`, `shareable`, `container:<name>`). *Host access*
    /// for `host`.
    pub ipc: Option<String>,
    /// `HostConfig.PidMode` (`container:<name>`). *Host access* for `host`.
    pub pid: Option<String>,
    /// `Config.MacAddress` (of the first network).
    pub mac_address: Option<String>,
    /// `HostConfig.MemoryReservation` in bytes (a soft limit).
    pub mem_reservation_bytes: Option<u64>,
    /// `HostConfig.MemorySwap` in bytes: memory plus swap (`-1`: unlimited swap).
    pub memswap_limit_bytes: Option<i64>,
    /// `HostConfig.CpuShares` (relative weight).
    pub cpu_shares: Option<u64>,
    /// `HostConfig.CpuPeriod` in microseconds.
    pub cpu_period_us: Option<u64>,
    /// `HostConfig.CpuQuota` in microseconds per period.
    pub cpu_quota_us: Option<i64>,
    /// `HostConfig.CgroupParent`. *Host access*: places the container in a cgroup of
    /// the host's choosing.
    pub cgroup_parent: Option<String>,
    /// Compose `pull_policy`: when the agent pulls the image (`None`: `missing`).
    pub pull_policy: Option<PullPolicy>,
    /// Compose `platform` (`linux/arm64/v8`): the image variant pulled and run.
    pub platform: Option<String>,
    /// Static addresses per network (Compose `networks.<name>.ipv4_address` and
    /// `ipv6_address`), by network name.
    pub addresses: BTreeMap<String, StaticAddresses>,
    /// Compose `blkio_config`: block I/O weight and per-device throttles.
    pub blkio: BlkioConfig,
    /// `HostConfig.StorageOpt` (Compose `storage_opt`, e.g. `size: 1G`): what the
    /// engine's storage driver takes (overlay2 only on xfs with `pquota`).
    pub storage_opt: BTreeMap<String, String>,
    /// `HostConfig.UTSMode` (`host`: the host's name). *Host access*.
    pub uts: Option<String>,
    /// `HostConfig.UsernsMode` (`host`: no remapping). *Host access*.
    pub userns_mode: Option<String>,
    /// `HostConfig.CgroupnsMode` (Compose `cgroup`: `host` or `private`). *Host access*
    /// for `host`.
    pub cgroupns: Option<String>,
    /// `HostConfig.DeviceCgroupRules` (`c 189:* rmw`). *Host access*: device nodes.
    pub device_cgroup_rules: Vec<String>,
    /// `HostConfig.MemorySwappiness` (0..=100).
    pub mem_swappiness: Option<u8>,
    /// `HostConfig.OomKillDisable`.
    pub oom_kill_disable: bool,
    /// `HostConfig.CpuRealtimePeriod` / `CpuRealtimeRuntime` in microseconds.
    pub cpu_rt_period_us: Option<u64>,
    pub cpu_rt_runtime_us: Option<i64>,
    /// `HostConfig.Runtime` (an OCI runtime the engine is configured with: `runc`,
    /// `crun`, `nvidia`, ...).
    pub runtime: Option<String>,
    /// `Config.Domainname` (Compose `domainname`).
    pub domainname: Option<String>,
    /// `HostConfig.DeviceRequests` (Compose `gpus`). *Host access*: the host's GPUs.
    pub gpus: Vec<GpuRequest>,
    /// Compose `post_start`: commands run in the container after it started; one that
    /// fails fails the update (which rolls back).
    pub post_start: Vec<Hook>,
    /// Compose `pre_stop`: commands run in the container before the agent stops it
    /// (best effort, within the stop grace period).
    pub pre_stop: Vec<Hook>,
}

/// A command run inside a running container (`POST /containers/{id}/exec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hook {
    pub command: Vec<String>,
    pub user: Option<String>,
    /// *Host access*, as `privileged: true` is.
    pub privileged: bool,
    pub working_dir: Option<String>,
    pub env: BTreeMap<String, String>,
}

/// One request for GPUs: `count` of them (`-1`: all) or the listed `device_ids`, from
/// `driver` (`nvidia`), with `capabilities` (`gpu`, `compute`, `utility`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GpuRequest {
    pub driver: Option<String>,
    pub count: Option<i64>,
    pub device_ids: Vec<String>,
    pub capabilities: Vec<String>,
}

/// Block I/O settings (`HostConfig.BlkioWeight`, `BlkioWeightDevice`,
/// `BlkioDevice{Read,Write}{Bps,IOps}`); device entries are host paths with a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlkioConfig {
    /// 10..=1000; `None`: the engine's default.
    pub weight: Option<u16>,
    pub weight_device: Vec<(String, u16)>,
    /// Bytes per second.
    pub device_read_bps: Vec<(String, u64)>,
    pub device_write_bps: Vec<(String, u64)>,
    /// Operations per second.
    pub device_read_iops: Vec<(String, u64)>,
    pub device_write_iops: Vec<(String, u64)>,
}

/// A container's fixed addresses on one network; the network's `ipam` must hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StaticAddresses {
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
}

/// Network settings beyond the basics (Compose `ipam`, `enable_ipv6`, `driver_opts`).
/// Like [`ContainerOptions`], outside the network's own encoding (bundle format 2).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkOptions {
    /// `EnableIPv6`.
    pub enable_ipv6: bool,
    /// `IPAM.Config`: the address pools (the `default` IPAM driver).
    pub ipam: Vec<IpamPool>,
    /// `Options` of the bridge driver, e.g. `com.docker.network.bridge.name`.
    pub driver_opts: BTreeMap<String, String>,
}

/// One IPAM pool: `subnet` (CIDR), and optionally the range containers get addresses
/// from, the gateway, and addresses kept out of the pool by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpamPool {
    pub subnet: String,
    pub ip_range: Option<String>,
    pub gateway: Option<String>,
    pub aux_addresses: BTreeMap<String, String>,
}

/// When the agent pulls a container's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Pull when the image is not on the device (Compose `missing`, `if_not_present`).
    Missing,
    /// Pull on every apply of a bundle, even when the image is on the device; drift
    /// repair still pulls only a missing image.
    Always,
    /// Never pull: the image must be on the device already (loaded by other means).
    Never,
}

/// A log driver and its options, e.g. `json-file` with `max-size: 10m`, `max-file: 3`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogConfig {
    pub driver: String,
    pub options: BTreeMap<String, String>,
}

/// Soft and hard limit of one ulimit (`-1`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ulimit {
    pub soft: i64,
    pub hard: i64,
}

/// An image reference, pinned by digest where the bundler could resolve one.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageRef {
    /// The reference as written, e.g. `registry:5000/app:1.2` (without `@digest`).
    pub reference: String,
    /// `sha256:<hex>` when pinned.
    pub digest: Option<String>,
}

impl ImageRef {
    /// What to ask the engine for: `repo@sha256:...` when pinned, else the tag reference.
    pub fn pull_reference(&self) -> String {
        match &self.digest {
            Some(d) => {
                let repo = strip_tag(&self.reference);
                format!("{repo}@{d}")
            }
            None => self.reference.clone(),
        }
    }
}

/// `host:5000/a/b:tag` → `host:5000/a/b` (a registry port is not a tag).
fn strip_tag(reference: &str) -> &str {
    let name_start = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[name_start..].rfind(':') {
        Some(i) => &reference[..name_start + i],
        None => reference,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    /// Host address to bind, e.g. `127.0.0.1`; `None` binds all.
    pub host_ip: Option<String>,
    pub host_port: Option<u16>,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mount {
    pub source: MountSource,
    /// Path inside the container.
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MountSource {
    /// A host path. When it is a managed file, the container is recreated when the
    /// file's content changes.
    Bind(String),
    /// A named volume of [`DesiredState::volumes`].
    Volume(String),
    /// An anonymous tmpfs.
    Tmpfs,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// A network of [`DesiredState::networks`].
    pub network: String,
    /// Names other containers on the network resolve to this one (the service name).
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    No,
    Always,
    OnFailure,
    UnlessStopped,
}

impl RestartPolicy {
    /// The Docker Engine API name.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }
}

/// A healthcheck in Docker's terms; durations in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Healthcheck {
    /// `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]`.
    pub test: Vec<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
    pub start_period_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dependency {
    /// The container name this one depends on.
    pub container: String,
    pub condition: DependencyCondition,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DependencyCondition {
    #[default]
    Started,
    Healthy,
    CompletedSuccessfully,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceMapping {
    pub host_path: String,
    pub container_path: String,
    /// cgroup permissions, e.g. `rwm`.
    pub permissions: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Engine-wide name, e.g. `<app>_default`.
    pub name: String,
    pub internal: bool,
    pub labels: BTreeMap<String, String>,
    /// Outside the network's own encoding: see [`DesiredState::encode`].
    #[serde(skip)]
    pub options: NetworkOptions,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Engine-wide name, e.g. `<app>_data`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl DesiredState {
    /// Sorts every collection so equal states encode to equal bytes.
    pub fn canonicalize(&mut self) {
        // By name first (what readers expect), then by everything, so that even
        // duplicates (which the bundler refuses) have one order.
        self.files.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.cmp(b)));
        self.containers.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.cmp(b)));
        self.networks.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.cmp(b)));
        self.volumes.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.cmp(b)));
        self.artifacts.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.cmp(b)));
        self.image_sizes.sort();
        if let Some(agent) = &mut self.agent {
            agent.binaries.sort();
        }
    }

    /// The recorded download size of `image`, when it is pinned and the bundler knew it.
    pub fn image_size(&self, image: &ImageRef) -> Option<u64> {
        let digest = image.digest.as_deref()?;
        let i = self.image_sizes.binary_search_by(|s| s.digest.as_str().cmp(digest)).ok()?;
        Some(self.image_sizes[i].bytes)
    }

    /// Every managed file, inline ones first, then artifacts.
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        self.files.iter().map(Entry::Inline).chain(self.artifacts.iter().map(Entry::Artifact))
    }

    /// The managed file at `path`, inline or artifact.
    pub fn entry(&self, path: &str) -> Option<Entry<'_>> {
        self.entries().find(|e| e.path() == path)
    }

    /// The bundle format this state needs: 1 unless a container sets engine options
    /// (2), the state carries a maintenance schedule (3), sealed secrets (4) or
    /// artifacts (5), image sizes (6) or an agent release (7).
    pub fn format(&self) -> u16 {
        if self.agent.is_some() {
            return 7;
        }
        if !self.image_sizes.is_empty() {
            return 6;
        }
        if !self.artifacts.is_empty() {
            return 5;
        }
        if !self.sealed.is_empty() {
            return 4;
        }
        if self.maintenance != crate::maintenance::Maintenance::default() {
            return 3;
        }
        let plain = self.containers.iter().all(|c| c.options == ContainerOptions::default())
            && self.networks.iter().all(|n| n.options == NetworkOptions::default());
        if plain {
            1
        } else {
            2
        }
    }

    /// The canonical postcard encoding (the bundle payload before compression).
    ///
    /// Format 1 is the state's own encoding. Format 2 appends the containers' options
    /// and the networks' options, one per container and per network in canonical order: postcard is not self-describing, so a new
    /// field inside `ContainerSpec` would have changed every bundle's bytes and made
    /// every older agent misread them; this way only the bundles that need the new
    /// fields change, and older agents refuse those by their format version. Format 3
    /// appends the maintenance schedule after format 2's trailer (written even when
    /// every option is default), the same way.
    pub fn encode(&self) -> Vec<u8> {
        let mut canonical = self.clone();
        canonical.canonicalize();
        canonical.encode_canonical()
    }

    /// [`DesiredState::encode`] of a state that is already canonical, without the copy.
    pub fn encode_canonical(&self) -> Vec<u8> {
        let mut out = postcard::to_stdvec(self).expect("encoding into a Vec cannot fail");
        if self.format() >= 2 {
            let containers: Vec<&ContainerOptions> = self.containers.iter().map(|c| &c.options).collect();
            let networks: Vec<&NetworkOptions> = self.networks.iter().map(|n| &n.options).collect();
            out.extend(
                postcard::to_stdvec(&(containers, networks)).expect("encoding into a Vec cannot fail"),
            );
        }
        if self.format() >= 3 {
            out.extend(postcard::to_stdvec(&self.maintenance).expect("encoding into a Vec cannot fail"));
        }
        if self.format() >= 4 {
            out.extend(postcard::to_stdvec(&self.sealed).expect("encoding into a Vec cannot fail"));
        }
        if self.format() >= 5 {
            out.extend(postcard::to_stdvec(&self.artifacts).expect("encoding into a Vec cannot fail"));
        }
        if self.format() >= 6 {
            out.extend(postcard::to_stdvec(&self.image_sizes).expect("encoding into a Vec cannot fail"));
        }
        if let Some(agent) = self.agent.as_ref().filter(|_| self.format() >= 7) {
            out.extend(postcard::to_stdvec(agent).expect("encoding into a Vec cannot fail"));
        }
        out
    }

    /// Decodes a payload written in bundle format `format`; trailing bytes are an error.
    pub fn decode(bytes: &[u8], format: u16) -> Result<Self, postcard::Error> {
        let (mut state, mut rest) = postcard::take_from_bytes::<DesiredState>(bytes)?;
        if format >= 2 {
            type Trailer = (Vec<ContainerOptions>, Vec<NetworkOptions>);
            let ((containers, networks), after) = postcard::take_from_bytes::<Trailer>(rest)?;
            if containers.len() != state.containers.len() || networks.len() != state.networks.len() {
                return Err(postcard::Error::DeserializeBadEncoding);
            }
            for (container, options) in state.containers.iter_mut().zip(containers) {
                container.options = options;
            }
            for (network, options) in state.networks.iter_mut().zip(networks) {
                network.options = options;
            }
            rest = after;
        }
        if format >= 3 {
            let (maintenance, after) = postcard::take_from_bytes(rest)?;
            state.maintenance = maintenance;
            rest = after;
        }
        if format >= 4 {
            let (sealed, after) = postcard::take_from_bytes::<Vec<u8>>(rest)?;
            // Format 5 writes the trailer even without secrets.
            if sealed.is_empty() && format == 4 {
                return Err(postcard::Error::DeserializeBadEncoding);
            }
            state.sealed = sealed;
            rest = after;
        }
        if format >= 5 {
            let (artifacts, after) = postcard::take_from_bytes::<Vec<Artifact>>(rest)?;
            // One canonical encoding: sorted by path, never empty (format 6 writes the
            // trailer even without artifacts), no path twice (an inline file's included).
            let sorted = artifacts.windows(2).all(|w| w[0].path < w[1].path);
            let clash = artifacts.iter().any(|a| state.file(&a.path).is_some());
            if (artifacts.is_empty() && format == 5) || !sorted || clash {
                return Err(postcard::Error::DeserializeBadEncoding);
            }
            state.artifacts = artifacts;
            rest = after;
        }
        if format >= 6 {
            let (sizes, after) = postcard::take_from_bytes::<Vec<ImageSize>>(rest)?;
            // Sorted by digest, never empty, no digest twice, each a sha256 digest.
            let sorted = sizes.windows(2).all(|w| w[0].digest < w[1].digest);
            let digests = sizes.iter().all(|s| {
                s.digest.strip_prefix("sha256:").is_some_and(|h| {
                    h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
            });
            if (sizes.is_empty() && format == 6) || !sorted || !digests {
                return Err(postcard::Error::DeserializeBadEncoding);
            }
            state.image_sizes = sizes;
            rest = after;
        }
        if format >= 7 {
            let (agent, after) = postcard::take_from_bytes::<AgentRelease>(rest)?;
            // Canonical: a version, at least one binary, sorted by architecture, each once.
            let sorted = agent.binaries.windows(2).all(|w| w[0].arch < w[1].arch);
            let version = compare_versions(&agent.version, &agent.version).is_some();
            if agent.binaries.is_empty() || !sorted || !version {
                return Err(postcard::Error::DeserializeBadEncoding);
            }
            state.agent = Some(agent);
            rest = after;
        }
        if rest.is_empty() {
            Ok(state)
        } else {
            Err(postcard::Error::DeserializeBadEncoding)
        }
    }

    /// Encrypts [`DesiredState::secrets`] to `recipients` (age X25519 public keys) into
    /// `sealed`, deterministically from `seed` (see [`crate::age::encrypt`]), and clears
    /// them. A state without secrets stays as it is.
    #[cfg(feature = "age")]
    pub fn seal(&mut self, recipients: &[[u8; 32]], seed: &[u8; 32]) {
        let mut secrets = std::mem::take(&mut self.secrets);
        if secrets.is_empty() {
            return;
        }
        secrets.files.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.cmp(b)));
        let plain =
            zeroize::Zeroizing::new(postcard::to_stdvec(&secrets).expect("encoding into a Vec cannot fail"));
        self.sealed = crate::age::encrypt(&plain, recipients, seed);
        for f in &mut secrets.files {
            zeroize::Zeroize::zeroize(&mut f.content);
        }
    }

    /// Decrypts `sealed` with any of `identities` and merges the secrets into the state:
    /// secret files join `files`, secret variables their container's `env`. A secret may
    /// not replace what the state declares in the clear (a file path, a variable), and
    /// its variables must belong to containers of the state.
    #[cfg(feature = "age")]
    pub fn unseal(&mut self, identities: &[crate::age::SecretKey]) -> Result<(), UnsealError> {
        if self.sealed.is_empty() {
            return Ok(());
        }
        let plain = zeroize::Zeroizing::new(
            crate::age::decrypt(&self.sealed, identities).map_err(|e| UnsealError::Decrypt(e.to_string()))?,
        );
        let secrets: Secrets = match postcard::take_from_bytes(&plain) {
            Ok((secrets, [])) => secrets,
            _ => return Err(UnsealError::Invalid("not a secret set of this format".into())),
        };
        for file in &secrets.files {
            if self.entry(&file.path).is_some()
                || secrets.files.iter().filter(|f| f.path == file.path).count() > 1
            {
                return Err(UnsealError::Invalid(format!("{} is declared twice", file.path)));
            }
        }
        for (name, vars) in &secrets.env {
            let container = self.containers.iter().find(|c| &c.name == name).ok_or_else(|| {
                UnsealError::Invalid(format!("no container {name} for its secret variables"))
            })?;
            if let Some(var) = vars.keys().find(|v| container.env.contains_key(*v)) {
                return Err(UnsealError::Invalid(format!("{name}: variable {var} is declared twice")));
            }
        }
        for (name, vars) in secrets.env {
            if let Some(container) = self.containers.iter_mut().find(|c| c.name == name) {
                container.env.extend(vars);
            }
        }
        self.files.extend(secrets.files);
        self.canonicalize();
        self.sealed.clear();
        Ok(())
    }

    /// Hex sha256 of the canonical encoding: "did this device's desired state change?"
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.encode()))
    }

    pub fn file(&self, path: &str) -> Option<&ManagedFile> {
        self.files.iter().find(|f| f.path == path)
    }

    /// The hash the agent stores in a container's label to know whether it must be
    /// recreated: the spec itself plus the content of every managed file it bind-mounts
    /// (so editing a mounted config file in Git restarts the container).
    ///
    /// The hash the agent stores in a network's label to know whether it must be
    /// recreated. A network without options hashes as its plain spec.
    pub fn network_hash(network: &NetworkSpec) -> String {
        let mut hasher = Sha256::new();
        hasher.update(postcard::to_stdvec(network).expect("encoding into a Vec cannot fail"));
        if network.options != NetworkOptions::default() {
            hasher.update(b"\0options\0");
            hasher.update(postcard::to_stdvec(&network.options).expect("encoding into a Vec cannot fail"));
        }
        hex::encode(hasher.finalize())
    }

    /// A container whose `options` are all default hashes without them, exactly as
    /// before `options` existed, so an agent upgrade does not recreate unchanged
    /// containers; set options are hashed after the spec (its own encoding skips them).
    pub fn container_hash(&self, container: &ContainerSpec) -> String {
        let mut hasher = Sha256::new();
        hasher.update(postcard::to_stdvec(container).expect("encoding into a Vec cannot fail"));
        if container.options != ContainerOptions::default() {
            hasher.update(b"\0options\0");
            hasher.update(postcard::to_stdvec(&container.options).expect("encoding into a Vec cannot fail"));
        }
        for mount in &container.mounts {
            if let MountSource::Bind(source) = &mount.source {
                let mounted = self.files.iter().filter(|f| f.path == *source || is_under(&f.path, source));
                for file in mounted {
                    hasher.update(file.path.as_bytes());
                    hasher.update([0]);
                    hasher.update(Sha256::digest(&file.content));
                }
                // After the inline files, so a state without artifacts hashes as before.
                let mounted =
                    self.artifacts.iter().filter(|a| a.path == *source || is_under(&a.path, source));
                for artifact in mounted {
                    hasher.update(artifact.path.as_bytes());
                    hasher.update([0]);
                    hasher.update(artifact.sha256);
                }
            }
        }
        hex::encode(hasher.finalize())
    }
}

/// True when `path` lies strictly below directory `dir`.
fn is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path.len() > dir.len() + 1 && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

/// Serializes `Vec<u8>` as a byte string (compact in postcard, base-16-free in JSON).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_reference_pins_by_digest_and_keeps_registry_port() {
        let image =
            ImageRef { reference: "127.0.0.1:5000/team/app:1.2".into(), digest: Some("sha256:ab".into()) };
        assert_eq!(image.pull_reference(), "127.0.0.1:5000/team/app@sha256:ab");
        let untagged = ImageRef { reference: "127.0.0.1:5000/app".into(), digest: Some("sha256:cd".into()) };
        assert_eq!(untagged.pull_reference(), "127.0.0.1:5000/app@sha256:cd");
        let tag_only = ImageRef { reference: "busybox:1".into(), digest: None };
        assert_eq!(tag_only.pull_reference(), "busybox:1");
    }

    fn plain_container() -> ContainerSpec {
        ContainerSpec {
            name: "shop-web".into(),
            app: "shop".into(),
            service: "web".into(),
            image: ImageRef { reference: "nginx:1.27".into(), digest: None },
            env: [("A".to_string(), "1".to_string())].into(),
            restart: RestartPolicy::UnlessStopped,
            ..Default::default()
        }
    }

    #[test]
    fn container_hash_without_options_is_the_hash_from_before_options_existed() {
        // Computed by the model before `ContainerSpec::options` was added (commit 497a0e3).
        let c = plain_container();
        let state = DesiredState { containers: vec![c.clone()], ..Default::default() };
        assert_eq!(
            state.container_hash(&c),
            "9e91a59890c9919901ee0ee6512e25499486eb4f07d53f79e4b218cbb3619de6"
        );
    }

    #[test]
    fn container_hash_covers_every_option() {
        let base = plain_container();
        let state = DesiredState::default();
        let h0 = state.container_hash(&base);
        type SetOption = fn(&mut ContainerOptions);
        let variants: Vec<(&str, SetOption)> = vec![
            ("logging", |o| o.logging = Some(LogConfig { driver: "local".into(), options: BTreeMap::new() })),
            ("init", |o| o.init = Some(true)),
            ("read_only", |o| o.read_only = true),
            ("security_opt", |o| o.security_opt = vec!["no-new-privileges:true".into()]),
            ("working_dir", |o| o.working_dir = Some("/srv".into())),
            ("shm_size", |o| o.shm_size_bytes = Some(1 << 26)),
            ("sysctls", |o| o.sysctls = [("net.core.somaxconn".to_string(), "1024".to_string())].into()),
            ("ulimits", |o| o.ulimits = [("nofile".to_string(), Ulimit { soft: 1, hard: 1 })].into()),
            ("extra_hosts", |o| o.extra_hosts = vec!["broker:10.0.0.5".into()]),
            ("tty", |o| o.tty = true),
            ("stdin_open", |o| o.stdin_open = true),
            ("stop_grace_period", |o| o.stop_timeout_s = Some(30)),
            ("dns", |o| o.dns = vec!["1.1.1.1".into()]),
            ("dns_search", |o| o.dns_search = vec!["lan".into()]),
            ("dns_opt", |o| o.dns_opt = vec!["ndots:1".into()]),
            ("group_add", |o| o.group_add = vec!["20".into()]),
            ("oom_score_adj", |o| o.oom_score_adj = Some(-500)),
            ("pids_limit", |o| o.pids_limit = Some(100)),
            ("cpuset", |o| o.cpuset = Some("0".into())),
            ("ipc", |o| o.ipc = Some("shareable".into())),
            ("pid", |o| o.pid = Some("host".into())),
            ("mac_address", |o| o.mac_address = Some("02:42:ac:11:00:09".into())),
            ("mem_reservation", |o| o.mem_reservation_bytes = Some(1 << 20)),
            ("memswap_limit", |o| o.memswap_limit_bytes = Some(-1)),
            ("cpu_shares", |o| o.cpu_shares = Some(512)),
            ("cpu_period", |o| o.cpu_period_us = Some(100_000)),
            ("cpu_quota", |o| o.cpu_quota_us = Some(50_000)),
            ("cgroup_parent", |o| o.cgroup_parent = Some("fleet".into())),
            ("pull_policy", |o| o.pull_policy = Some(PullPolicy::Never)),
            ("platform", |o| o.platform = Some("linux/arm64".into())),
            ("ipv4_address", |o| {
                o.addresses =
                    [("n".to_string(), StaticAddresses { ipv4: Some("10.0.0.2".into()), ipv6: None })].into()
            }),
            ("blkio_config", |o| o.blkio.weight = Some(300)),
            ("storage_opt", |o| o.storage_opt = [("size".to_string(), "1G".to_string())].into()),
            ("uts", |o| o.uts = Some("host".into())),
            ("userns_mode", |o| o.userns_mode = Some("host".into())),
            ("cgroup", |o| o.cgroupns = Some("private".into())),
            ("device_cgroup_rules", |o| o.device_cgroup_rules = vec!["c 1:3 rmw".into()]),
            ("mem_swappiness", |o| o.mem_swappiness = Some(10)),
            ("oom_kill_disable", |o| o.oom_kill_disable = true),
            ("cpu_rt_period", |o| o.cpu_rt_period_us = Some(1_000_000)),
            ("cpu_rt_runtime", |o| o.cpu_rt_runtime_us = Some(950_000)),
            ("runtime", |o| o.runtime = Some("crun".into())),
            ("domainname", |o| o.domainname = Some("lan".into())),
            ("gpus", |o| o.gpus = vec![GpuRequest { count: Some(1), ..Default::default() }]),
        ];
        let mut seen = std::collections::BTreeSet::from([h0]);
        for (key, set) in variants {
            let mut c = base.clone();
            set(&mut c.options);
            assert!(seen.insert(state.container_hash(&c)), "{key} does not change the container hash");
            let with = DesiredState { containers: vec![c.clone()], ..Default::default() };
            assert_eq!(with.format(), 2, "{key} needs bundle format 2");
            assert_eq!(
                DesiredState::decode(&with.encode(), 2).expect("decodes").containers[0],
                c,
                "{key} round-trips"
            );
        }
    }

    #[cfg(feature = "age")]
    #[test]
    fn secrets_are_sealed_to_the_device_and_merged_back_only_by_its_key() {
        use crate::age::SecretKey;
        let device = SecretKey::from_bytes([1; 32]);
        let other = SecretKey::from_bytes([2; 32]);
        let mut state = DesiredState { containers: vec![plain_container()], ..Default::default() };
        let public = state.encode();
        let name = state.containers[0].name.clone();
        state.secrets.files.push(ManagedFile {
            path: "/etc/app/token".into(),
            mode: 0o600,
            owner: None,
            content: b"s3cr3t-file".to_vec(),
        });
        state.secrets.env.insert(name.clone(), BTreeMap::from([("API_TOKEN".into(), "s3cr3t-env".into())]));
        let mut clear = state.clone();
        state.seal(&[*device.public_bytes()], &[7; 32]);
        assert!(state.secrets.is_empty(), "sealing consumes the secrets");
        assert_eq!(state.format(), 4);
        let bytes = state.encode();
        assert!(bytes.starts_with(&public), "format 4 only appends");
        for needle in [&b"s3cr3t"[..], b"API_TOKEN", b"/etc/app/token"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{needle:?} in the clear");
        }
        let decoded = DesiredState::decode(&bytes, 4).expect("decodes");
        assert!(DesiredState::decode(&bytes, 3).is_err(), "the trailer is not ignored");

        let mut wrong = decoded.clone();
        assert!(matches!(wrong.unseal(&[other]), Err(UnsealError::Decrypt(_))));
        let mut opened = decoded.clone();
        opened.unseal(std::slice::from_ref(&device)).expect("the device's key opens it");
        assert_eq!(opened.file("/etc/app/token").map(|f| &f.content[..]), Some(&b"s3cr3t-file"[..]));
        assert_eq!(opened.containers[0].env.get("API_TOKEN").map(String::as_str), Some("s3cr3t-env"));
        assert!(opened.sealed.is_empty());

        // A secret may not replace what the state says in the clear.
        clear.files.push(ManagedFile {
            path: "/etc/app/token".into(),
            mode: 0o644,
            owner: None,
            content: vec![],
        });
        clear.seal(&[*device.public_bytes()], &[7; 32]);
        let mut clash = DesiredState::decode(&clear.encode(), 4).expect("decodes");
        assert!(matches!(clash.unseal(std::slice::from_ref(&device)), Err(UnsealError::Invalid(_))));
        // Variables for a container the state does not have are refused.
        let mut orphan = DesiredState::default();
        orphan.secrets.env.insert("ghost".into(), BTreeMap::from([("A".into(), "b".into())]));
        orphan.seal(&[*device.public_bytes()], &[7; 32]);
        assert!(matches!(orphan.unseal(&[device]), Err(UnsealError::Invalid(_))));
        // An empty sealed trailer is not a format-4 payload.
        let mut empty = public.clone();
        empty.push(0);
        assert!(DesiredState::decode(&empty, 4).is_err());
    }

    #[test]
    fn maintenance_needs_format_3_and_round_trips_while_older_states_keep_their_bytes() {
        use crate::maintenance::{Maintenance, Window};
        let plain = DesiredState { containers: vec![plain_container()], ..Default::default() };
        let before = plain.encode();
        assert_eq!(plain.format(), 1);
        let mut held = plain.clone();
        held.maintenance = Maintenance {
            windows: vec![Window { days: 0b0011111, from_min: 22 * 60, to_min: 2 * 60 }],
            timezone: "Europe/Berlin".into(),
            tz_rule: "CET-1CEST,M3.5.0,M10.5.0/3".into(),
            max_deferral_s: Some(6 * 3600),
        };
        assert_eq!(held.format(), 3);
        let bytes = held.encode();
        assert!(bytes.starts_with(&before), "format 3 only appends");
        assert_eq!(DesiredState::decode(&bytes, 3).expect("decodes"), held);
        assert_eq!(DesiredState::decode(&before, 1).expect("format 1 still decodes"), plain);
        assert!(DesiredState::decode(&bytes, 2).is_err(), "the trailer is not ignored");
    }

    fn artifact(path: &str, byte: u8) -> Artifact {
        Artifact { path: path.into(), mode: 0o644, owner: None, sha256: [byte; 32], size: 200 << 20 }
    }

    #[test]
    fn artifacts_need_format_5_round_trip_and_hostile_trailers_are_refused() {
        let mut state = DesiredState { containers: vec![plain_container()], ..Default::default() };
        state.files.push(ManagedFile {
            path: "/etc/app/a.conf".into(),
            mode: 0o644,
            owner: None,
            content: b"x".to_vec(),
        });
        let before = state.encode();
        assert_eq!(state.format(), 1);
        state.artifacts = vec![artifact("/var/lib/app/model.bin", 1), artifact("/var/lib/app/fw.bin", 2)];
        assert_eq!(state.format(), 5);
        let bytes = state.encode();
        assert!(bytes.starts_with(&before), "format 5 only appends");
        let decoded = DesiredState::decode(&bytes, 5).expect("decodes");
        assert_eq!(decoded.artifacts.len(), 2);
        assert_eq!(decoded.artifacts[0].path, "/var/lib/app/fw.bin", "sorted by path");
        assert_eq!(decoded.entry("/var/lib/app/model.bin").map(|e| e.size()), Some(200 << 20));
        assert_eq!(decoded.entries().count(), 3);
        assert!(DesiredState::decode(&bytes, 4).is_err(), "the trailer is not ignored");

        // Unsorted, duplicated, empty, or clashing with an inline file: not canonical.
        let mut canonical = state.clone();
        canonical.canonicalize();
        let encode_raw = |s: &DesiredState| s.encode_canonical();
        let mut unsorted = canonical.clone();
        unsorted.artifacts.reverse();
        assert!(DesiredState::decode(&encode_raw(&unsorted), 5).is_err(), "unsorted");
        let mut twice = canonical.clone();
        twice.artifacts[1] = twice.artifacts[0].clone();
        assert!(DesiredState::decode(&encode_raw(&twice), 5).is_err(), "duplicate path");
        let mut clash = canonical.clone();
        clash.artifacts[0].path = "/etc/app/a.conf".into();
        clash.artifacts.sort();
        assert!(DesiredState::decode(&encode_raw(&clash), 5).is_err(), "clashes with an inline file");
        let mut empty = canonical.encode_canonical();
        let trailer = postcard::to_stdvec(&canonical.artifacts).expect("encodes");
        empty.truncate(empty.len() - trailer.len());
        empty.push(0);
        assert!(DesiredState::decode(&empty, 5).is_err(), "an empty artifact list");
    }

    #[test]
    fn image_sizes_need_format_6_round_trip_and_hostile_trailers_are_refused() {
        let mut c = plain_container();
        c.image.digest = Some(format!("sha256:{}", "b".repeat(64)));
        let mut state = DesiredState { containers: vec![c.clone()], ..Default::default() };
        let before = state.encode();
        let hash = state.container_hash(&c);
        let size =
            |d: char, bytes| ImageSize { digest: format!("sha256:{}", d.to_string().repeat(64)), bytes };
        state.image_sizes = vec![size('b', 7 << 20), size('a', 1)];
        assert_eq!(state.format(), 6);
        let bytes = state.encode();
        assert!(bytes.starts_with(&before), "format 6 only appends");
        let decoded = DesiredState::decode(&bytes, 6).expect("decodes");
        assert_eq!(decoded.image_size(&c.image), Some(7 << 20));
        assert_eq!(decoded.image_size(&plain_container().image), None, "an unpinned image has no size");
        assert!(decoded.artifacts.is_empty(), "format 6 without artifacts");
        assert_eq!(decoded.container_hash(&c), hash, "a size does not restart a container");
        assert!(DesiredState::decode(&bytes, 5).is_err(), "the trailer is not ignored");

        let mut canonical = state.clone();
        canonical.canonicalize();
        let mut unsorted = canonical.clone();
        unsorted.image_sizes.reverse();
        assert!(DesiredState::decode(&unsorted.encode_canonical(), 6).is_err(), "unsorted");
        let mut twice = canonical.clone();
        twice.image_sizes[1] = twice.image_sizes[0].clone();
        assert!(DesiredState::decode(&twice.encode_canonical(), 6).is_err(), "duplicate digest");
        let mut odd = canonical.clone();
        odd.image_sizes[0].digest = "sha256:../../etc".into();
        assert!(DesiredState::decode(&odd.encode_canonical(), 6).is_err(), "not a digest");
        let mut empty = canonical.encode_canonical();
        let trailer = postcard::to_stdvec(&canonical.image_sizes).expect("encodes");
        empty.truncate(empty.len() - trailer.len());
        empty.push(0);
        assert!(DesiredState::decode(&empty, 6).is_err(), "an empty size list");
    }

    #[test]
    fn an_agent_release_needs_format_7_and_hostile_trailers_are_refused() {
        let mut state = DesiredState { containers: vec![plain_container()], ..Default::default() };
        let before = state.encode();
        let binary = |arch: &str, b| AgentBinary { arch: arch.into(), sha256: [b; 32], size: 2 << 20 };
        state.agent = Some(AgentRelease {
            version: "0.10.0-rc.1".into(),
            allow_downgrade: false,
            binaries: vec![binary("x86_64", 1), binary("aarch64", 2)],
        });
        assert_eq!(state.format(), 7);
        let bytes = state.encode();
        assert!(bytes.starts_with(&before), "format 7 only appends");
        let decoded = DesiredState::decode(&bytes, 7).expect("decodes");
        let agent = decoded.agent.as_ref().expect("agent");
        assert_eq!(agent.binaries[0].arch, "aarch64", "sorted by architecture");
        assert_eq!(agent.binary("x86_64").map(|b| b.sha256), Some([1; 32]));
        assert!(agent.binary("arm").is_none());
        assert!(DesiredState::decode(&bytes, 6).is_err(), "the trailer is not ignored");

        let mut canonical = state.clone();
        canonical.canonicalize();
        let hostile = |f: &dyn Fn(&mut AgentRelease)| {
            let mut s = canonical.clone();
            f(s.agent.as_mut().expect("agent"));
            DesiredState::decode(&s.encode_canonical(), 7).is_err()
        };
        assert!(hostile(&|a| a.binaries.reverse()), "unsorted");
        assert!(hostile(&|a| a.binaries[1].arch = "aarch64".into()), "an architecture twice");
        assert!(hostile(&|a| a.binaries.clear()), "no binary");
        assert!(hostile(&|a| a.version = "latest".into()), "not a version");
        assert!(hostile(&|a| a.version = "1.0.0+build.5".into()), "build metadata: the bundler writes none");
        assert!(hostile(&|a| a.version = "1.02.0".into()), "a leading zero");
    }

    #[test]
    fn versions_are_three_numbers_and_an_optional_pre_release() {
        for good in ["0.10.0", "1.2.3", "0.10.0-rc.1", "1.0.0-alpha-2.x"] {
            assert_eq!(check_version(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("0.10", "three wanted"),
            ("1", "three wanted"),
            ("1.2.3.4", "three wanted"),
            ("v1.2.3", "not a number"),
            ("1.02.3", "leading zero"),
            ("1.2.3+build.5", "build metadata"),
            ("1.2.3-", "pre-release"),
            ("1.2.3-rc..1", "pre-release"),
            ("1.2.3-rc_1", "pre-release"),
            ("", "three wanted"),
        ] {
            let err = check_version(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn versions_order_as_semver() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("0.9.0", "0.10.0"), Some(Less));
        assert_eq!(compare_versions("1.0.0", "1.0.0+build.5"), None, "build metadata is not a fleet version");
        assert_eq!(compare_versions("1.0.0-rc.1", "1.0.0"), Some(Less));
        assert_eq!(compare_versions("1.0.0-rc.2", "1.0.0-rc.10"), Some(Less));
        assert_eq!(compare_versions("1.0.0-alpha", "1.0.0-alpha.1"), Some(Less));
        assert_eq!(compare_versions("1.0.0-1", "1.0.0-alpha"), Some(Less));
        for bad in ["1.0", "1.0.0.0", "v1.0.0", "1.0.0-", "1..0", "", "1.0.x"] {
            assert_eq!(compare_versions(bad, "1.0.0"), None, "{bad:?}");
        }
    }

    #[test]
    fn container_hash_covers_a_mounted_artifact() {
        let mut c = plain_container();
        c.mounts = vec![Mount {
            source: MountSource::Bind("/var/lib/app".into()),
            target: "/models".into(),
            read_only: true,
        }];
        let mut state = DesiredState { containers: vec![c.clone()], ..Default::default() };
        let without = state.container_hash(&c);
        state.artifacts = vec![artifact("/var/lib/app/model.bin", 1)];
        let one = state.container_hash(&c);
        state.artifacts = vec![artifact("/var/lib/app/model.bin", 2)];
        assert_ne!(without, one);
        assert_ne!(one, state.container_hash(&c), "a new model restarts the container that mounts it");
    }

    #[test]
    fn container_hash_changes_when_a_mounted_file_changes() {
        let container = ContainerSpec {
            name: "web".into(),
            mounts: vec![Mount {
                source: MountSource::Bind("/etc/app".into()),
                target: "/conf".into(),
                read_only: true,
            }],
            ..Default::default()
        };
        let mut state = DesiredState {
            files: vec![ManagedFile {
                path: "/etc/app/a.conf".into(),
                mode: 0o644,
                owner: None,
                content: b"1".to_vec(),
            }],
            containers: vec![container.clone()],
            ..Default::default()
        };
        let before = state.container_hash(&container);
        state.files[0].content = b"2".to_vec();
        assert_ne!(before, state.container_hash(&container));
        state.files.push(ManagedFile {
            path: "/etc/application".into(),
            mode: 0o644,
            owner: None,
            content: b"x".to_vec(),
        });
        let unrelated = state.container_hash(&container);
        state.files[1].content = b"y".to_vec();
        assert_eq!(unrelated, state.container_hash(&container), "a sibling path is not under the mount");
    }
}
