//! The engine policy: what a bundle's containers may ask of the device's container
//! engine. The device owns it (`[engine.policy]` in `agent.toml`); the bundler knows
//! the same policy per device (`policy:` in the fleet repository) so that CI hears
//! about a refusal before devices do. One rule, [`check`], serves both.
//!
//! Secure by default: no privileged containers, no host namespaces (`network_mode:
//! host`; `container:<name>` only for containers of the same bundle; `networks` only
//! the bundle's own, never a name the engine reads as a mode), bind sources
//! only at or below the device's roots and never the engine socket, the agent's own
//! directories, an ancestor of them, nor `/`; named volumes only when declared by the
//! bundle; no devices; no added capabilities; images from any registry, tags allowed.
//!
//! The check is lexical: paths are normalized (`.`, `..` and repeated `/` resolved as
//! text) and compared component-wise. Symlinks on the device are not followed here
//! (this module never does I/O), while the engine follows them when it creates a
//! container: roots must not hold symlinks that lead elsewhere (see the agent's README).
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeSet;
use std::fmt;

use crate::model::{ContainerSpec, DesiredState, MountSource};

/// What the device allows beyond the secure defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnginePolicy {
    /// `privileged: true` (all capabilities, all devices, no confinement).
    pub allow_privileged: bool,
    /// `network_mode: host` (the host's network namespace).
    pub allow_host_network: bool,
    /// Host namespaces besides the network's that containers may join: `pid` (see and
    /// signal every process), `ipc` (shared memory), `uts` (the host name), `userns`
    /// (no user namespace remapping), `cgroup` (the host's cgroup tree).
    pub host_namespaces: Vec<String>,
    /// Device cgroup rules containers may add (`c 189:* rmw`), compared as written
    /// (spaces normalized).
    pub device_cgroup_rules: Vec<String>,
    /// `gpus:` (the host's GPUs, through the engine's device requests).
    pub allow_gpus: bool,
    /// Options that lift the engine's confinement short of `privileged`:
    /// `security_opt` `seccomp=unconfined`, `apparmor=unconfined`, `label=disable`,
    /// `systempaths=unconfined`, and a `cgroup_parent` of the bundle's choosing.
    pub allow_unconfined: bool,
    /// A bind of the engine's own socket (root on the device, like `privileged`).
    pub allow_engine_socket: bool,
    /// Directories bind sources may be at or below, besides the device's allowed roots.
    pub bind_roots: Vec<String>,
    /// Host device paths (or directories of them) containers may be given.
    pub devices: Vec<String>,
    /// Capabilities `cap_add` may name (`NET_ADMIN`; `CAP_` prefix and case ignored;
    /// `ALL` allows any).
    pub capabilities: Vec<String>,
    /// Registries images may come from: `host[:port]`, optionally with a repository
    /// prefix (`ghcr.io/acme`). Empty: any registry. Docker Hub is `docker.io`.
    pub registries: Vec<String>,
    /// Every image must be pinned by digest (`image@sha256:...`).
    pub require_digest: bool,
}

/// The device's own paths that the check needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicePaths {
    /// The agent's `allowed_roots`: bind sources may be at or below them.
    pub allowed_roots: Vec<String>,
    /// The engine socket the agent speaks to, if any.
    pub engine_socket: Option<String>,
    /// Paths no bind may reach (be, contain or lie below): the agent's state and
    /// config directories, its key files.
    pub protected: Vec<String>,
}

/// Engine sockets that are never bindable (but for the device's own engine socket with
/// `allow_engine_socket`), whatever the roots say.
pub const WELL_KNOWN_SOCKETS: &[&str] = &[
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/podman/podman.sock",
    "/var/run/balena-engine.sock",
    "/var/run/balena.sock",
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
];

/// How a violation could be allowed, if at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Set the policy key to this value (`allow_privileged` = `true`).
    Set { key: &'static str, value: &'static str },
    /// Add this entry to the policy list `key` (`capabilities` += `NET_ADMIN`).
    Add { key: &'static str, entry: String },
    /// No policy key allows it; the text says why.
    Never(&'static str),
}

/// Which rule a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    Privileged,
    HostNetwork,
    HostNamespace,
    DeviceCgroupRule,
    Gpu,
    Unconfined,
    NetworkMode,
    Network,
    BindSource,
    EngineSocket,
    ProtectedPath,
    Volume,
    Device,
    Capability,
    Registry,
    Digest,
}

/// One thing a container asks for that the policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The container name.
    pub container: String,
    pub app: String,
    pub service: String,
    pub rule: Rule,
    /// What was asked, in Compose terms: `privileged: true`, `cap_add: NET_ADMIN`,
    /// `bind source /var/run/docker.sock`.
    pub asked: String,
    pub opening: Opening,
}

/// How to spell a policy key in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `agent.toml`: `engine.policy.allow_privileged = true`.
    AgentToml,
    /// The fleet repository: `policy.allow_privileged: true`.
    FleetYaml,
}

impl Violation {
    /// The message, naming the container, what it asks and the key that would allow it.
    pub fn describe(&self, style: KeyStyle) -> String {
        let (prefix, assign) = match style {
            KeyStyle::AgentToml => ("engine.policy.", " = "),
            KeyStyle::FleetYaml => ("policy.", ": "),
        };
        let allow = match &self.opening {
            Opening::Set { key, value } => format!("allow it with `{prefix}{key}{assign}{value}`"),
            Opening::Add { key, entry } => match style {
                KeyStyle::AgentToml => format!("allow it by adding \"{entry}\" to `{prefix}{key}`"),
                KeyStyle::FleetYaml => format!("allow it by adding `{entry}` to `{prefix}{key}`"),
            },
            Opening::Never(why) => format!("{why}; no policy key allows it"),
        };
        format!(
            "container `{}` (app `{}`, service `{}`): `{}` is refused by the device's engine policy: {allow}",
            self.container, self.app, self.service, self.asked
        )
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(KeyStyle::AgentToml))
    }
}

/// Every way `state`'s containers exceed `policy` on a device with `paths`, in
/// container order (empty: allowed).
pub fn check(policy: &EnginePolicy, state: &DesiredState, paths: &DevicePaths) -> Vec<Violation> {
    let limits = Limits::new(policy, paths);
    let names: BTreeSet<&str> = state.containers.iter().map(|c| c.name.as_str()).collect();
    let volumes: BTreeSet<&str> = state.volumes.iter().map(|v| v.name.as_str()).collect();
    let networks: BTreeSet<&str> = state.networks.iter().map(|n| n.name.as_str()).collect();
    let mut out = Vec::new();
    for c in &state.containers {
        let mut deny = |rule: Rule, asked: String, opening: Opening| {
            out.push(Violation {
                container: c.name.clone(),
                app: c.app.clone(),
                service: c.service.clone(),
                rule,
                asked,
                opening,
            });
        };
        let declared = Declared { containers: &names, volumes: &volumes, networks: &networks };
        check_container(policy, &limits, c, &declared, &mut deny);
    }
    out
}

/// The policy's paths and names, normalized once.
struct Limits {
    /// The device's `allowed_roots`, normalized.
    allowed_roots: Vec<String>,
    /// `allowed_roots` and `bind_roots`.
    bind_roots: Vec<String>,
    /// Normalized protected paths with their `/run` ⇄ `/var/run` aliases.
    protected: Vec<String>,
    /// The device's own engine socket (and alias), bindable with `allow_engine_socket`.
    own_socket: Vec<String>,
    devices: Vec<String>,
    capabilities: BTreeSet<String>,
    registries: Vec<(String, String)>,
}

impl Limits {
    fn new(policy: &EnginePolicy, paths: &DevicePaths) -> Limits {
        let norm_all =
            |list: &[String]| -> Vec<String> { list.iter().filter_map(|p| normalize(p)).collect() };
        let allowed_roots = norm_all(&paths.allowed_roots);
        let mut bind_roots = allowed_roots.clone();
        bind_roots.extend(norm_all(&policy.bind_roots));
        let own_socket: Vec<String> =
            paths.engine_socket.iter().filter_map(|s| normalize(s)).flat_map(|s| with_alias(&s)).collect();
        let mut protected: Vec<String> =
            norm_all(&paths.protected).iter().flat_map(|p| with_alias(p)).collect();
        protected.extend(WELL_KNOWN_SOCKETS.iter().flat_map(|s| with_alias(s)));
        protected.extend(own_socket.iter().cloned());
        Limits {
            allowed_roots,
            bind_roots,
            protected,
            own_socket,
            devices: norm_all(&policy.devices),
            capabilities: policy.capabilities.iter().map(|c| normalize_capability(c)).collect(),
            registries: policy.registries.iter().filter_map(|r| split_registry_entry(r)).collect(),
        }
    }
}

/// What the bundle itself declares.
struct Declared<'a> {
    containers: &'a BTreeSet<&'a str>,
    volumes: &'a BTreeSet<&'a str>,
    networks: &'a BTreeSet<&'a str>,
}

/// Network names the engines read as a mode, not as a network: a container attached to
/// a "network" `host` gets the host's network namespace.
const RESERVED_NETWORKS: &[&str] = &["host", "bridge", "none", "default", "slirp4netns", "pasta", "private"];

fn check_container(
    policy: &EnginePolicy,
    limits: &Limits,
    c: &ContainerSpec,
    declared: &Declared<'_>,
    deny: &mut impl FnMut(Rule, String, Opening),
) {
    let (containers, volumes) = (declared.containers, declared.volumes);
    if c.privileged && !policy.allow_privileged {
        deny(
            Rule::Privileged,
            "privileged: true".into(),
            Opening::Set { key: "allow_privileged", value: "true" },
        );
    }

    // Host namespaces: the model has one field that selects one, `network_mode`.
    if let Some(mode) = &c.network_mode {
        match mode.as_str() {
            "none" | "bridge" | "default" => {}
            "host" => {
                if !policy.allow_host_network {
                    deny(
                        Rule::HostNetwork,
                        "network_mode: host".into(),
                        Opening::Set { key: "allow_host_network", value: "true" },
                    );
                }
            }
            other => match other.strip_prefix("container:") {
                Some(name) if containers.contains(name) => {}
                Some(_) => deny(
                    Rule::NetworkMode,
                    format!("network_mode: {other}"),
                    Opening::Never("a container may only join the network of a container of the same bundle"),
                ),
                None => deny(
                    Rule::NetworkMode,
                    format!("network_mode: {other}"),
                    Opening::Never("network_mode must be none, bridge, host or container:<name>"),
                ),
            },
        }
    }

    // The other host namespaces, and joining another container's, live in the options.
    let o = &c.options;
    let host_allowed = |ns: &str| policy.host_namespaces.iter().any(|n| n.trim() == ns);
    let rule = Rule::HostNamespace;
    for (key, ns, mode) in [
        ("pid", "pid", &o.pid),
        ("ipc", "ipc", &o.ipc),
        ("uts", "uts", &o.uts),
        ("userns_mode", "userns", &o.userns_mode),
        ("cgroup", "cgroup", &o.cgroupns),
    ] {
        let Some(mode) = mode else { continue };
        match mode.as_str() {
            "host" if !host_allowed(ns) => {
                deny(rule, format!("{key}: host"), Opening::Add { key: "host_namespaces", entry: ns.into() })
            }
            "host" | "private" | "shareable" | "none" | "" => {}
            other => match other.strip_prefix("container:") {
                Some(name) if containers.contains(name) => {}
                Some(_) => deny(
                    rule,
                    format!("{key}: {other}"),
                    Opening::Never(
                        "a container may only join the namespace of a container of the same bundle",
                    ),
                ),
                None => deny(
                    rule,
                    format!("{key}: {other}"),
                    Opening::Never("must be host, private, shareable, none or container:<name>"),
                ),
            },
        }
    }
    if !policy.allow_privileged {
        let hooks =
            o.post_start.iter().map(|h| ("post_start", h)).chain(o.pre_stop.iter().map(|h| ("pre_stop", h)));
        for (key, _) in hooks.filter(|(_, h)| h.privileged) {
            deny(
                Rule::Privileged,
                format!("{key}: privileged: true"),
                Opening::Set { key: "allow_privileged", value: "true" },
            );
        }
    }
    if !o.gpus.is_empty() && !policy.allow_gpus {
        deny(Rule::Gpu, "gpus".into(), Opening::Set { key: "allow_gpus", value: "true" });
    }
    for r in &o.device_cgroup_rules {
        let normal = normalize_rule(r);
        if !policy.device_cgroup_rules.iter().any(|allowed| normalize_rule(allowed) == normal) {
            deny(
                Rule::DeviceCgroupRule,
                format!("device_cgroup_rules: {r}"),
                Opening::Add { key: "device_cgroup_rules", entry: normal },
            );
        }
    }
    if !policy.allow_unconfined {
        for opt in &o.security_opt {
            if lifts_confinement(opt) {
                deny(
                    Rule::Unconfined,
                    format!("security_opt: {opt}"),
                    Opening::Set { key: "allow_unconfined", value: "true" },
                );
            }
        }
        if let Some(parent) = &o.cgroup_parent {
            deny(
                Rule::Unconfined,
                format!("cgroup_parent: {parent}"),
                Opening::Set { key: "allow_unconfined", value: "true" },
            );
        }
    }

    // The first network becomes the engine's `NetworkMode`: only plain names of networks
    // the bundle declares (and creates as bridges) are networks.
    if c.network_mode.is_none() {
        for attachment in &c.networks {
            let name = attachment.network.as_str();
            if !is_plain_name(name) || RESERVED_NETWORKS.contains(&name) {
                deny(
                    Rule::Network,
                    format!("networks: {name}"),
                    Opening::Never("a network name must be plain ([A-Za-z0-9][A-Za-z0-9_.-]*) and not an engine mode (host, bridge, none, ...); use network_mode"),
                );
            } else if !declared.networks.contains(name) {
                deny(
                    Rule::Network,
                    format!("networks: {name}"),
                    Opening::Never("containers may only join networks the bundle declares"),
                );
            }
        }
    }
    for mount in &c.mounts {
        // `Binds` entries are `source:target[:options]`: a `:` in the target would add
        // options (`rshared` propagation, `Z` relabeling of the host path).
        if !matches!(mount.source, MountSource::Tmpfs) && mount.target.contains(':') {
            deny(
                Rule::BindSource,
                format!("mount target {}", mount.target),
                Opening::Never(
                    "a mount target must not contain `:` (the engine would read mount options from it)",
                ),
            );
        }
        match &mount.source {
            MountSource::Tmpfs => {}
            MountSource::Volume(name) => {
                // The engine reads a `Binds` entry whose source starts with `/` as a host
                // path: only a plain, declared volume name is a volume.
                if !is_plain_name(name) {
                    deny(
                        Rule::Volume,
                        format!("volume {name}"),
                        Opening::Never("a volume name must match [A-Za-z0-9][A-Za-z0-9_.-]*"),
                    );
                } else if !volumes.contains(name.as_str()) {
                    deny(
                        Rule::Volume,
                        format!("volume {name}"),
                        Opening::Never("containers may only mount volumes the bundle declares"),
                    );
                }
            }
            MountSource::Bind(source) => check_bind(policy, limits, source, deny),
        }
    }

    for d in &c.devices {
        let allowed = normalize(&d.host_path)
            .is_some_and(|p| limits.devices.iter().any(|allowed| at_or_below(&p, allowed)));
        if !allowed {
            deny(
                Rule::Device,
                format!("devices: {}", d.host_path),
                Opening::Add {
                    key: "devices",
                    entry: normalize(&d.host_path).unwrap_or(d.host_path.clone()),
                },
            );
        }
    }

    if !limits.capabilities.contains("ALL") {
        for cap in &c.cap_add {
            let name = normalize_capability(cap);
            if !limits.capabilities.contains(&name) {
                deny(
                    Rule::Capability,
                    format!("cap_add: {cap}"),
                    Opening::Add { key: "capabilities", entry: name },
                );
            }
        }
    }

    let reference = &c.image.reference;
    if !limits.registries.is_empty() {
        match image_location(reference) {
            Some((host, repo)) => {
                let allowed = limits
                    .registries
                    .iter()
                    .any(|(h, prefix)| *h == host && (prefix.is_empty() || at_or_below_name(&repo, prefix)));
                if !allowed {
                    deny(
                        Rule::Registry,
                        format!("image {reference}"),
                        Opening::Add { key: "registries", entry: host },
                    );
                }
            }
            None => deny(
                Rule::Registry,
                format!("image {reference}"),
                Opening::Never("the image reference cannot be parsed"),
            ),
        }
    }
    if policy.require_digest && !is_pinned(c) {
        deny(
            Rule::Digest,
            format!("image {reference} (not pinned by digest)"),
            Opening::Set { key: "require_digest", value: "false" },
        );
    }
}

/// `TYPE MAJOR:MINOR ACCESS`: `a`, `b` or `c`; numbers or `*`; some of `rwm`.
pub fn is_device_cgroup_rule(rule: &str) -> bool {
    let parts: Vec<&str> = rule.split_whitespace().collect();
    let number = |n: &str| n == "*" || (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match parts[..] {
        [kind, numbers, access] => {
            matches!(kind, "a" | "b" | "c")
                && numbers.split_once(':').is_some_and(|(major, minor)| number(major) && number(minor))
                && !access.is_empty()
                && access.bytes().all(|b| matches!(b, b'r' | b'w' | b'm'))
        }
        _ => false,
    }
}

/// A device cgroup rule with single spaces (`c 189:* rmw`).
pub fn normalize_rule(rule: &str) -> String {
    rule.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a `security_opt` entry turns a confinement off. Docker reads `key=value` and
/// the older `key:value`; keys and values are compared without case or spaces.
fn lifts_confinement(opt: &str) -> bool {
    let opt = opt.trim().to_ascii_lowercase();
    let Some((key, value)) = opt.split_once(['=', ':']) else { return false };
    matches!(
        (key.trim(), value.trim()),
        ("seccomp", "unconfined")
            | ("apparmor", "unconfined")
            | ("label", "disable")
            | ("label", "disabled")
            | ("systempaths", "unconfined")
    )
}

fn check_bind(
    policy: &EnginePolicy,
    limits: &Limits,
    source: &str,
    deny: &mut impl FnMut(Rule, String, Opening),
) {
    let asked = format!("bind source {source}");
    let Some(path) = normalize(source).filter(|_| !source.contains(':')) else {
        deny(Rule::BindSource, asked, Opening::Never("a bind source must be an absolute path without `:`"));
        return;
    };
    if path == "/" {
        deny(Rule::ProtectedPath, asked, Opening::Never("the host's root directory is never mounted"));
        return;
    }
    if limits.own_socket.contains(&path) {
        if !policy.allow_engine_socket {
            deny(Rule::EngineSocket, asked, Opening::Set { key: "allow_engine_socket", value: "true" });
        }
        return;
    }
    // A root the device put inside a protected directory (a test's temp dir holding
    // `agent.toml` and the root) is the device's choice: binds inside it pass that one.
    let nested_root = |p: &String| {
        limits.allowed_roots.iter().any(|r| r != p && at_or_below(r, p) && at_or_below(&path, r))
    };
    let reaches = |p: &&String| (at_or_below(&path, p) || at_or_below(p, &path)) && !nested_root(p);
    if let Some(p) = limits.protected.iter().find(reaches) {
        let why = if WELL_KNOWN_SOCKETS.iter().any(|s| with_alias(s).contains(p)) {
            "it is or holds a container engine's socket"
        } else {
            "it is, holds or lies below the agent's own state, config or keys"
        };
        deny(Rule::ProtectedPath, asked, Opening::Never(why));
        return;
    }
    if !limits.bind_roots.iter().any(|root| at_or_below(&path, root)) {
        deny(Rule::BindSource, asked, Opening::Add { key: "bind_roots", entry: path });
    }
}

/// Normalizes an absolute path lexically: repeated `/` and `.` dropped, `..` removes
/// the previous component (and stays at `/`), no trailing `/`. `None` for a relative
/// path or one with a NUL byte.
pub fn normalize(path: &str) -> Option<String> {
    if !path.starts_with('/') || path.contains('\0') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// `path` equals `root` or lies below it, component-wise (`/srv/app-evil` is not below
/// `/srv/app`). Both normalized.
fn at_or_below(path: &str, root: &str) -> bool {
    root == "/" || path == root || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
}

/// The same for `/`-separated names without a leading `/` (repository paths).
fn at_or_below_name(name: &str, prefix: &str) -> bool {
    name == prefix || (name.starts_with(prefix) && name.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// `path` and, for paths below `/run` or `/var/run` (one is a symlink to the other on
/// most systems), the same path below the other.
fn with_alias(path: &str) -> Vec<String> {
    let mut out = vec![path.to_string()];
    if let Some(rest) = path.strip_prefix("/var/run/") {
        out.push(format!("/run/{rest}"));
    } else if let Some(rest) = path.strip_prefix("/run/") {
        out.push(format!("/var/run/{rest}"));
    } else if path == "/run" {
        out.push("/var/run".into());
    } else if path == "/var/run" {
        out.push("/run".into());
    }
    out
}

/// A capability as the engine reads it: trimmed, upper case, without `CAP_`.
pub fn normalize_capability(cap: &str) -> String {
    let upper = cap.trim().to_ascii_uppercase();
    match upper.strip_prefix("CAP_") {
        Some(rest) => rest.to_string(),
        None => upper,
    }
}

fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A `registries` entry: (`host`, repository prefix or empty), lower-case host with
/// Docker Hub's aliases folded into `docker.io`.
fn split_registry_entry(entry: &str) -> Option<(String, String)> {
    let entry = entry.trim().trim_end_matches('/');
    let (host, prefix) = entry.split_once('/').unwrap_or((entry, ""));
    if host.is_empty() {
        return None;
    }
    Some((canonical_host(host), prefix.to_string()))
}

fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        _ => host,
    }
}

/// Where an image comes from, as the engine reads its reference: (registry host,
/// repository path). The first component is a registry when it has a `.` or `:` or is
/// `localhost`; otherwise the image is on Docker Hub (`docker.io`, `library/` for
/// single names).
pub fn image_location(reference: &str) -> Option<(String, String)> {
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    if name.is_empty() || name.starts_with('/') || name.contains("//") || name.contains(char::is_whitespace) {
        return None;
    }
    let (host, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (canonical_host(first), rest.to_string())
        }
        Some(_) => ("docker.io".to_string(), name.to_string()),
        None => ("docker.io".to_string(), format!("library/{name}")),
    };
    let start = path.rfind('/').map_or(0, |i| i + 1);
    let repo = match path[start..].find(':') {
        Some(i) => path[..start + i].to_string(),
        None => path,
    };
    if repo.is_empty() {
        return None;
    }
    Some((host, repo))
}

/// True when what the engine is asked to pull names a `sha256` digest.
fn is_pinned(c: &ContainerSpec) -> bool {
    let pinned = |d: &str| {
        d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    match &c.image.digest {
        Some(d) => pinned(d),
        None => c.image.reference.split_once('@').is_some_and(|(_, d)| pinned(d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ContainerOptions, DeviceMapping, GpuRequest, Hook, ImageRef, Mount, NetworkAttachment, NetworkSpec,
        VolumeSpec,
    };

    fn paths() -> DevicePaths {
        DevicePaths {
            allowed_roots: vec!["/srv/fleet".into(), "/srv/app".into()],
            engine_socket: Some("/var/run/docker.sock".into()),
            protected: vec!["/var/lib/fleet-agent".into(), "/etc/fleet-agent".into()],
        }
    }

    fn container() -> ContainerSpec {
        ContainerSpec {
            name: "shop-web".into(),
            app: "shop".into(),
            service: "web".into(),
            image: ImageRef { reference: "nginx:1.27".into(), digest: None },
            ..Default::default()
        }
    }

    fn state_of(c: ContainerSpec) -> DesiredState {
        DesiredState { containers: vec![c], ..Default::default() }
    }

    fn bind(source: &str) -> ContainerSpec {
        ContainerSpec {
            mounts: vec![Mount {
                source: MountSource::Bind(source.into()),
                target: "/x".into(),
                read_only: false,
            }],
            ..container()
        }
    }

    fn violations(policy: &EnginePolicy, c: ContainerSpec) -> Vec<Violation> {
        check(policy, &state_of(c), &paths())
    }

    fn rules(policy: &EnginePolicy, c: ContainerSpec) -> Vec<Rule> {
        violations(policy, c).into_iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_plain_container_passes_the_default_policy() {
        assert!(violations(&EnginePolicy::default(), container()).is_empty());
    }

    #[test]
    fn privileged_is_denied_by_default_and_allowed_by_allow_privileged() {
        let c = ContainerSpec { privileged: true, ..container() };
        let v = violations(&EnginePolicy::default(), c.clone());
        assert_eq!(v.len(), 1);
        let msg = v[0].describe(KeyStyle::AgentToml);
        assert!(msg.contains("`shop-web`") && msg.contains("service `web`"), "{msg}");
        assert!(msg.contains("privileged: true"), "{msg}");
        assert!(msg.contains("engine.policy.allow_privileged = true"), "{msg}");
        assert!(v[0].describe(KeyStyle::FleetYaml).contains("policy.allow_privileged: true"));
        let open = EnginePolicy { allow_privileged: true, ..Default::default() };
        assert!(violations(&open, c).is_empty());
    }

    #[test]
    fn host_network_is_denied_by_default_and_allowed_by_allow_host_network() {
        let c = ContainerSpec { network_mode: Some("host".into()), ..container() };
        let v = violations(&EnginePolicy::default(), c.clone());
        assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::HostNetwork]);
        assert!(v[0].to_string().contains("network_mode: host"));
        assert!(v[0].to_string().contains("engine.policy.allow_host_network = true"));
        let open = EnginePolicy { allow_host_network: true, ..Default::default() };
        assert!(violations(&open, c).is_empty());
    }

    fn with_options(set: impl FnOnce(&mut ContainerOptions)) -> ContainerSpec {
        let mut c = container();
        set(&mut c.options);
        c
    }

    fn namespaces(list: &[&str]) -> EnginePolicy {
        EnginePolicy { host_namespaces: list.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn host_namespaces_are_denied_by_default_and_allowed_one_by_one() {
        let pid = with_options(|o| o.pid = Some("host".into()));
        let v = violations(&EnginePolicy::default(), pid.clone());
        assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::HostNamespace]);
        assert!(v[0].to_string().contains("`pid: host`"), "{}", v[0]);
        assert!(v[0].to_string().contains("adding \"pid\" to `engine.policy.host_namespaces`"), "{}", v[0]);
        assert!(violations(&namespaces(&["pid"]), pid.clone()).is_empty());
        assert_eq!(rules(&namespaces(&["ipc"]), pid), [Rule::HostNamespace], "ipc does not open pid");
        type Set = fn(&mut ContainerOptions);
        let each: [(&str, Set); 4] = [
            ("ipc", |o| o.ipc = Some("host".into())),
            ("uts", |o| o.uts = Some("host".into())),
            ("userns", |o| o.userns_mode = Some("host".into())),
            ("cgroup", |o| o.cgroupns = Some("host".into())),
        ];
        for (ns, set) in each {
            let c = with_options(set);
            assert_eq!(rules(&EnginePolicy::default(), c.clone()), [Rule::HostNamespace], "{ns}");
            assert!(violations(&namespaces(&[ns]), c).is_empty(), "{ns}");
        }
        for fine in ["private", "shareable", "container:shop-web"] {
            let c = with_options(|o| o.ipc = Some(fine.into()));
            assert!(rules(&EnginePolicy::default(), c).is_empty(), "ipc: {fine}");
        }
        let open = namespaces(&["pid", "ipc"]);
        for (key, bad) in [("pid", "container:vpn"), ("ipc", "container:vpn"), ("pid", "ns:/proc/1/ns/pid")] {
            let c = with_options(|o| match key {
                "pid" => o.pid = Some(bad.into()),
                _ => o.ipc = Some(bad.into()),
            });
            assert_eq!(violations(&open, c).len(), 1, "{key}: {bad} is never allowed");
        }
    }

    #[test]
    fn privileged_hooks_need_allow_privileged() {
        let hook = Hook { command: vec!["true".into()], privileged: true, ..Default::default() };
        let c = with_options(|o| o.pre_stop = vec![hook]);
        let v = violations(&EnginePolicy::default(), c.clone());
        assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::Privileged]);
        assert!(v[0].to_string().contains("`pre_stop: privileged: true`"), "{}", v[0]);
        assert!(violations(&EnginePolicy { allow_privileged: true, ..Default::default() }, c).is_empty());
    }

    #[test]
    fn gpus_are_denied_by_default_and_allowed_by_allow_gpus() {
        let c = with_options(|o| o.gpus = vec![GpuRequest { count: Some(-1), ..Default::default() }]);
        let v = violations(&EnginePolicy::default(), c.clone());
        assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::Gpu]);
        assert!(v[0].to_string().contains("engine.policy.allow_gpus = true"), "{}", v[0]);
        assert!(violations(&EnginePolicy { allow_gpus: true, ..Default::default() }, c).is_empty());
    }

    #[test]
    fn device_cgroup_rules_must_each_be_allowed_as_written() {
        let c = with_options(|o| o.device_cgroup_rules = vec!["c  189:*   rmw".into()]);
        let v = violations(&EnginePolicy::default(), c.clone());
        assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::DeviceCgroupRule]);
        assert!(
            v[0].to_string().contains("adding \"c 189:* rmw\" to `engine.policy.device_cgroup_rules`"),
            "{}",
            v[0]
        );
        let open = EnginePolicy { device_cgroup_rules: vec!["c 189:* rmw".into()], ..Default::default() };
        assert!(violations(&open, c).is_empty());
        let other = with_options(|o| o.device_cgroup_rules = vec!["a *:* rwm".into()]);
        assert_eq!(rules(&open, other), [Rule::DeviceCgroupRule], "one rule does not open another");
    }

    #[test]
    fn options_that_lift_confinement_are_denied_by_default_and_allowed_by_allow_unconfined() {
        for opt in [
            "seccomp=unconfined",
            "seccomp:unconfined",
            "apparmor=unconfined",
            "label=disable",
            "label:disable",
            "systempaths=unconfined",
            " SECCOMP = Unconfined ",
        ] {
            let c = with_options(|o| o.security_opt = vec![opt.into()]);
            let v = violations(&EnginePolicy::default(), c.clone());
            assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::Unconfined], "{opt}");
            assert!(v[0].to_string().contains("engine.policy.allow_unconfined = true"), "{}", v[0]);
            let open = EnginePolicy { allow_unconfined: true, ..Default::default() };
            assert!(violations(&open, c).is_empty(), "{opt}");
        }
        for harmless in ["no-new-privileges:true", "no-new-privileges", "label=type:svirt_apache_t"] {
            let c = with_options(|o| o.security_opt = vec![harmless.into()]);
            assert!(rules(&EnginePolicy::default(), c).is_empty(), "{harmless}");
        }
        let c = with_options(|o| o.cgroup_parent = Some("/system.slice".into()));
        assert_eq!(rules(&EnginePolicy::default(), c.clone()), [Rule::Unconfined]);
        assert!(violations(&EnginePolicy { allow_unconfined: true, ..Default::default() }, c).is_empty());
    }

    #[test]
    fn network_mode_container_must_name_a_container_of_the_bundle() {
        let joined = ContainerSpec {
            network_mode: Some("container:shop-web".into()),
            name: "shop-side".into(),
            ..container()
        };
        let state = DesiredState { containers: vec![container(), joined.clone()], ..Default::default() };
        assert!(check(&EnginePolicy::default(), &state, &paths()).is_empty());
        let foreign = ContainerSpec { network_mode: Some("container:vpn".into()), ..container() };
        assert_eq!(rules(&EnginePolicy::default(), foreign), [Rule::NetworkMode]);
        // podman's `ns:<path>` and other modes are not Compose's and are refused even
        // with every key open.
        let all_open =
            EnginePolicy { allow_host_network: true, allow_privileged: true, ..Default::default() };
        let ns = ContainerSpec { network_mode: Some("ns:/proc/1/ns/net".into()), ..container() };
        assert_eq!(rules(&all_open, ns), [Rule::NetworkMode]);
        for mode in ["none", "bridge"] {
            assert!(rules(
                &EnginePolicy::default(),
                ContainerSpec { network_mode: Some(mode.into()), ..container() }
            )
            .is_empty());
        }
    }

    #[test]
    fn networks_must_be_declared_plain_names_not_engine_modes() {
        let on = |name: &str| ContainerSpec {
            networks: vec![NetworkAttachment { network: name.into(), aliases: vec![] }],
            ..container()
        };
        let declare = |c: ContainerSpec, names: &[&str]| DesiredState {
            containers: vec![c],
            networks: names.iter().map(|n| NetworkSpec { name: (*n).into(), ..Default::default() }).collect(),
            ..Default::default()
        };
        let all_open =
            EnginePolicy { allow_host_network: true, allow_privileged: true, ..Default::default() };
        assert!(check(&EnginePolicy::default(), &declare(on("shop_default"), &["shop_default"]), &paths())
            .is_empty());
        // The engine reads a first network named `host` as `NetworkMode: host`: the
        // host's namespace through the back door, refused even when declared.
        for name in ["host", "none", "bridge", "container:vpn", "ns:/proc/1/ns/net"] {
            let v = check(&all_open, &declare(on(name), &[name]), &paths());
            assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::Network], "{name}");
            assert!(v[0].to_string().contains("no policy key allows it"), "{}", v[0]);
        }
        let undeclared = check(&EnginePolicy::default(), &declare(on("macvlan_lan"), &[]), &paths());
        assert_eq!(undeclared[0].rule, Rule::Network);
        // With a network_mode, the engine ignores `networks` (and so does the check).
        let moded = ContainerSpec { network_mode: Some("none".into()), ..on("host") };
        assert!(check(&EnginePolicy::default(), &declare(moded, &[]), &paths()).is_empty());
    }

    #[test]
    fn binds_below_the_allowed_roots_pass() {
        for source in ["/srv/fleet/shop/nginx.conf", "/srv/fleet", "/srv/app/", "/srv/app//data/./x"] {
            assert!(rules(&EnginePolicy::default(), bind(source)).is_empty(), "{source}");
        }
    }

    #[test]
    fn binds_outside_the_roots_are_denied_and_bind_roots_opens_them() {
        let v = violations(&EnginePolicy::default(), bind("/data/db"));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].rule, Rule::BindSource);
        assert!(v[0].to_string().contains("bind source /data/db"), "{}", v[0]);
        assert!(v[0].to_string().contains("\"/data/db\" to `engine.policy.bind_roots`"), "{}", v[0]);
        let open = EnginePolicy { bind_roots: vec!["/data/".into()], ..Default::default() };
        assert!(rules(&open, bind("/data/db")).is_empty());
    }

    #[test]
    fn bind_root_prefix_trick_is_denied() {
        assert_eq!(rules(&EnginePolicy::default(), bind("/srv/app-evil/x")), [Rule::BindSource]);
        assert_eq!(rules(&EnginePolicy::default(), bind("/srv/appx")), [Rule::BindSource]);
    }

    #[test]
    fn dot_dot_escapes_are_resolved_before_the_check() {
        assert_eq!(rules(&EnginePolicy::default(), bind("/srv/fleet/../../etc/shadow")), [Rule::BindSource]);
        assert_eq!(rules(&EnginePolicy::default(), bind("/srv/fleet/../../../../")), [Rule::ProtectedPath]);
    }

    #[test]
    fn the_engine_socket_is_denied_in_every_spelling() {
        let open_roots =
            EnginePolicy { bind_roots: vec!["/var".into(), "/run".into()], ..Default::default() };
        for source in [
            "/var/run/docker.sock",
            "/var/run/../run/docker.sock",
            "/run/docker.sock",
            "//var/run/./docker.sock/",
            "/var/run",
            "/run",
            "/var",
        ] {
            let r = rules(&open_roots, bind(source));
            assert!(r == [Rule::EngineSocket] || r == [Rule::ProtectedPath], "{source}: {r:?}");
        }
        let podman = rules(&open_roots, bind("/run/podman/podman.sock"));
        assert_eq!(podman, [Rule::ProtectedPath], "another engine's socket is never bindable");
    }

    #[test]
    fn allow_engine_socket_opens_the_devices_own_socket_only() {
        let open = EnginePolicy { allow_engine_socket: true, ..Default::default() };
        assert!(rules(&open, bind("/var/run/docker.sock")).is_empty());
        assert!(rules(&open, bind("/run/docker.sock")).is_empty());
        assert_eq!(rules(&open, bind("/var/run")), [Rule::ProtectedPath], "its directory stays closed");
        let v = violations(&EnginePolicy::default(), bind("/var/run/docker.sock"));
        assert!(v[0].to_string().contains("engine.policy.allow_engine_socket = true"), "{}", v[0]);
    }

    #[test]
    fn root_state_dir_and_config_dir_are_never_bindable() {
        let wide_open = EnginePolicy {
            bind_roots: vec!["/".into()],
            allow_privileged: true,
            allow_engine_socket: true,
            ..Default::default()
        };
        for source in [
            "/",
            "/var/lib/fleet-agent",
            "/var/lib/fleet-agent/trust.json",
            "/var/lib",
            "/etc",
            "/etc/fleet-agent/",
            "/etc/../etc/fleet-agent",
        ] {
            let v = violations(&wide_open, bind(source));
            assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), [Rule::ProtectedPath], "{source}");
            assert!(v[0].to_string().contains("no policy key allows it"), "{}", v[0]);
        }
        assert!(rules(&wide_open, bind("/etc/nginx")).is_empty());
    }

    #[test]
    fn an_allowed_root_inside_the_config_dir_is_bindable_but_not_its_parent() {
        let nested = DevicePaths {
            allowed_roots: vec!["/tmp/dev/root".into()],
            engine_socket: None,
            protected: vec!["/tmp/dev".into(), "/tmp/dev/state".into()],
        };
        let check_one = |source: &str| {
            check(&EnginePolicy::default(), &state_of(bind(source)), &nested)
                .into_iter()
                .map(|v| v.rule)
                .collect::<Vec<_>>()
        };
        assert!(check_one("/tmp/dev/root/app").is_empty());
        assert!(check_one("/tmp/dev/root").is_empty());
        assert_eq!(check_one("/tmp/dev/root/../agent.toml"), [Rule::ProtectedPath]);
        assert_eq!(check_one("/tmp/dev"), [Rule::ProtectedPath]);
        let wide = EnginePolicy { bind_roots: vec!["/tmp".into()], ..Default::default() };
        assert_eq!(check(&wide, &state_of(bind("/tmp/dev/state")), &nested)[0].rule, Rule::ProtectedPath);
        assert_eq!(check(&wide, &state_of(bind("/tmp/dev/other")), &nested)[0].rule, Rule::ProtectedPath);
    }

    #[test]
    fn bind_sources_that_are_not_plain_absolute_paths_are_denied() {
        for source in ["relative/x", "/srv/fleet/a:/etc", "/srv/fleet/\0"] {
            assert_eq!(rules(&EnginePolicy::default(), bind(source)), [Rule::BindSource], "{source:?}");
        }
    }

    #[test]
    fn mount_targets_cannot_smuggle_mount_options() {
        let mut c = bind("/srv/fleet/app");
        c.mounts[0].target = "/x:rshared".into();
        assert_eq!(rules(&EnginePolicy::default(), c), [Rule::BindSource]);
    }

    #[test]
    fn volumes_must_be_declared_names_not_host_paths() {
        let mount = |name: &str| ContainerSpec {
            mounts: vec![Mount {
                source: MountSource::Volume(name.into()),
                target: "/d".into(),
                read_only: false,
            }],
            ..container()
        };
        let mut state = state_of(mount("shop_data"));
        state.volumes.push(VolumeSpec { name: "shop_data".into(), ..Default::default() });
        assert!(check(&EnginePolicy::default(), &state, &paths()).is_empty());
        state.containers = vec![mount("/var/run/docker.sock")];
        assert_eq!(check(&EnginePolicy::default(), &state, &paths())[0].rule, Rule::Volume);
        state.containers = vec![mount("other_data")];
        assert_eq!(check(&EnginePolicy::default(), &state, &paths())[0].rule, Rule::Volume);
    }

    #[test]
    fn devices_are_denied_by_default_and_allowed_when_listed() {
        let dev = |p: &str| ContainerSpec {
            devices: vec![DeviceMapping {
                host_path: p.into(),
                container_path: "/dev/x".into(),
                permissions: "rwm".into(),
            }],
            ..container()
        };
        let v = violations(&EnginePolicy::default(), dev("/dev/ttyUSB0"));
        assert_eq!(v[0].rule, Rule::Device);
        assert!(v[0].to_string().contains("\"/dev/ttyUSB0\" to `engine.policy.devices`"), "{}", v[0]);
        let open = EnginePolicy {
            devices: vec!["/dev/ttyUSB0".into(), "/dev/bus/usb/".into()],
            ..Default::default()
        };
        assert!(rules(&open, dev("/dev/ttyUSB0")).is_empty());
        assert!(rules(&open, dev("/dev/bus/usb/001/002")).is_empty(), "below a listed directory");
        assert_eq!(rules(&open, dev("/dev/ttyUSB0/../sda")), [Rule::Device]);
        assert_eq!(rules(&open, dev("/dev/ttyUSB01")), [Rule::Device]);
        assert_eq!(rules(&open, dev("/dev/bus")), [Rule::Device]);
    }

    #[test]
    fn capabilities_are_denied_by_default_and_matched_without_case_or_cap_prefix() {
        let caps = |list: &[&str]| ContainerSpec {
            cap_add: list.iter().map(|s| s.to_string()).collect(),
            ..container()
        };
        let v = violations(&EnginePolicy::default(), caps(&["NET_ADMIN"]));
        assert_eq!(v[0].rule, Rule::Capability);
        assert!(v[0].to_string().contains("cap_add: NET_ADMIN"), "{}", v[0]);
        assert!(v[0].to_string().contains("\"NET_ADMIN\" to `engine.policy.capabilities`"), "{}", v[0]);
        let open = EnginePolicy { capabilities: vec!["cap_net_admin".into()], ..Default::default() };
        assert!(
            rules(&open, caps(&["NET_ADMIN", "CAP_NET_ADMIN", "net_admin", " Cap_Net_Admin "])).is_empty()
        );
        assert_eq!(rules(&open, caps(&["CAP_SYS_ADMIN"])), [Rule::Capability]);
        let sys = EnginePolicy { capabilities: vec!["SYS_ADMIN".into()], ..Default::default() };
        assert!(rules(&sys, caps(&["CAP_SYS_ADMIN"])).is_empty());
        // `ALL` asks for every capability: only `ALL` in the policy allows it.
        assert_eq!(rules(&sys, caps(&["ALL"])), [Rule::Capability]);
        assert_eq!(rules(&sys, caps(&["all"])), [Rule::Capability]);
        let all = EnginePolicy { capabilities: vec!["ALL".into()], ..Default::default() };
        assert!(rules(&all, caps(&["ALL", "SYS_ADMIN"])).is_empty());
    }

    #[test]
    fn cap_drop_needs_no_policy() {
        let c = ContainerSpec { cap_drop: vec!["ALL".into()], ..container() };
        assert!(rules(&EnginePolicy::default(), c).is_empty());
    }

    #[test]
    fn registries_empty_means_any_and_a_list_restricts_by_host_and_prefix() {
        let image =
            |r: &str| ContainerSpec { image: ImageRef { reference: r.into(), digest: None }, ..container() };
        assert!(rules(&EnginePolicy::default(), image("evil.example/x:1")).is_empty());
        let open = EnginePolicy {
            registries: vec!["docker.io".into(), "ghcr.io/acme".into(), "registry.local:5000".into()],
            ..Default::default()
        };
        for ok in [
            "nginx:1",
            "library/nginx",
            "index.docker.io/acme/x",
            "ghcr.io/acme/app:1",
            "ghcr.io/acme/sub/app",
            "registry.local:5000/a",
        ] {
            assert!(rules(&open, image(ok)).is_empty(), "{ok}");
        }
        for bad in [
            "ghcr.io/acme-evil/app",
            "ghcr.io/other/app",
            "docker.io.evil.com/x",
            "registry.local:5001/a",
            "registry.local/a",
            "localhost/x",
        ] {
            assert_eq!(rules(&open, image(bad)), [Rule::Registry], "{bad}");
        }
        let v = violations(&open, image("quay.io/x/y:2"));
        assert!(v[0].to_string().contains("\"quay.io\" to `engine.policy.registries`"), "{}", v[0]);
    }

    #[test]
    fn require_digest_denies_tags_and_accepts_pinned_images() {
        let hex = "a".repeat(64);
        let policy = EnginePolicy { require_digest: true, ..Default::default() };
        let tag = container();
        assert_eq!(rules(&policy, tag.clone()), [Rule::Digest]);
        assert!(violations(&policy, tag)
            .remove(0)
            .to_string()
            .contains("engine.policy.require_digest = false"));
        let pinned = ContainerSpec {
            image: ImageRef { reference: "nginx:1.27".into(), digest: Some(format!("sha256:{hex}")) },
            ..container()
        };
        assert!(rules(&policy, pinned).is_empty());
        let inline = ContainerSpec {
            image: ImageRef { reference: format!("nginx@sha256:{hex}"), digest: None },
            ..container()
        };
        assert!(rules(&policy, inline).is_empty());
        let short = ContainerSpec {
            image: ImageRef { reference: "nginx".into(), digest: Some("sha256:abc".into()) },
            ..container()
        };
        assert_eq!(rules(&policy, short), [Rule::Digest]);
    }

    #[test]
    fn every_violation_is_reported_not_just_the_first() {
        let c = ContainerSpec {
            privileged: true,
            network_mode: Some("host".into()),
            cap_add: vec!["NET_ADMIN".into(), "SYS_ADMIN".into()],
            ..bind("/var/run/docker.sock")
        };
        let other = ContainerSpec { name: "shop-db".into(), service: "db".into(), ..bind("/") };
        let state = DesiredState { containers: vec![c, other], ..Default::default() };
        let v = check(&EnginePolicy::default(), &state, &paths());
        let got: Vec<(&str, Rule)> = v.iter().map(|v| (v.container.as_str(), v.rule)).collect();
        assert_eq!(
            got,
            [
                ("shop-web", Rule::Privileged),
                ("shop-web", Rule::HostNetwork),
                ("shop-web", Rule::EngineSocket),
                ("shop-web", Rule::Capability),
                ("shop-web", Rule::Capability),
                ("shop-db", Rule::ProtectedPath),
            ]
        );
    }

    #[test]
    fn normalize_resolves_dots_lexically() {
        assert_eq!(normalize("/a//b/./c/").as_deref(), Some("/a/b/c"));
        assert_eq!(normalize("/a/../../b").as_deref(), Some("/b"));
        assert_eq!(normalize("/..").as_deref(), Some("/"));
        assert_eq!(normalize("a/b"), None);
    }
}
