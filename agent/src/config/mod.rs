//! `agent.toml`: the device's own configuration, parsed and validated into [`Config`].
//!
//! Two steps, as in ripgrep: [`RawConfig`] mirrors the file (unknown keys are errors),
//! then [`Config::from_raw`] checks every value and names the key when one is wrong.
//! Every key is documented with an example in `agent/agent.toml.example`.
//!
//! This module reads the config file and the files it points to (keys, password
//! files), and nothing else; it never connects anywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_spec::bundle::{Limits, TrustedKeys};
use fleet_spec::keys::PublicKey;
use fleet_spec::topic;
use serde::Deserialize;

use crate::engine::RegistryAuth;

/// A config error, naming the key (or the file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: impl Into<String>, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Key { key: key.into(), message: message.to_string() }
}

/// Every problem found in `agent.toml`, in file order: `check-config` and `run` report
/// them all at once instead of one per run.
#[derive(Debug)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem, located in the file when it can be (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub line: Option<usize>,
    pub col: Option<usize>,
    /// The key at fault (`engine.policy.bind_roots[0]`), empty for a syntax error.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.problems.len();
        write!(f, "{} is not valid ({n} problem{}):", self.path.display(), if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {}", self.path.display())?;
            if let (Some(line), Some(col)) = (p.line, p.col) {
                write!(f, ":{line}:{col}")?;
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": `{}`: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub device: String,
    pub fleet: String,
    pub topic_prefix: Option<String>,
    pub state_dir: PathBuf,
    #[serde(default)]
    pub allowed_roots: Vec<PathBuf>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub reconcile_interval_secs: Option<u64>,
    pub health_timeout_secs: Option<u64>,
    pub status_min_interval_ms: Option<u64>,
    pub mqtt: Option<RawMqtt>,
    pub trust: RawTrust,
    pub fetch: Option<RawFetch>,
    pub engine: Option<RawEngine>,
    pub updates: Option<RawUpdates>,
}

/// `[updates]`: the apps' update lock.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdates {
    pub lock_dir: Option<PathBuf>,
    pub max_deferral_secs: Option<u64>,
    pub agent_trial_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub url: String,
    pub client_id: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub keepalive_secs: Option<u64>,
    pub reconnect_max_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrust {
    pub public_keys: Vec<String>,
    pub threshold: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFetch {
    pub base_url: Option<String>,
    pub poll_interval_secs: Option<u64>,
    pub ca_file: Option<PathBuf>,
    pub max_bundle_bytes: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub deadline_secs: Option<u64>,
    pub min_bytes_per_sec: Option<u64>,
    pub disk_reserve_bytes: Option<u64>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub bearer_token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    pub socket: Option<String>,
    #[serde(default)]
    pub registry_auth: Vec<RawRegistryAuth>,
    pub stop_grace_secs: Option<u32>,
    pub image_gc: Option<bool>,
    pub image_gc_grace_secs: Option<u64>,
    pub policy: Option<RawEnginePolicy>,
}

/// The host namespaces `engine.policy.host_namespaces` may name.
pub const HOST_NAMESPACES: [&str; 5] = ["pid", "ipc", "uts", "userns", "cgroup"];

/// `[engine.policy]`: what bundles may ask of the engine beyond the secure defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnginePolicy {
    #[serde(default)]
    pub allow_privileged: bool,
    #[serde(default)]
    pub allow_host_network: bool,
    #[serde(default)]
    pub host_namespaces: Vec<String>,
    #[serde(default)]
    pub device_cgroup_rules: Vec<String>,
    #[serde(default)]
    pub allow_unconfined: bool,
    #[serde(default)]
    pub allow_gpus: bool,
    #[serde(default)]
    pub allow_engine_socket: bool,
    #[serde(default)]
    pub bind_roots: Vec<String>,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub registries: Vec<String>,
    #[serde(default)]
    pub require_digest: bool,
}

/// The validated `[engine.policy]` and the directory of `agent.toml`, which no bind
/// may reach (see `crate::policy`).
#[derive(Debug, Clone, Default)]
pub struct EnginePolicyConfig {
    pub policy: fleet_spec::policy::EnginePolicy,
    /// Absolute when the config path could be made absolute.
    pub config_dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistryAuth {
    pub server: String,
    pub username: String,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Where the broker is and how to authenticate.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub client_id: String,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keepalive: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// `<base_url>/devices/<device>.json` (the bundler's pointer file for this device) is
    /// polled; `<base_url>/bundles/<digest>.bundle` fetched.
    pub base_url: Option<String>,
    pub poll_interval: Duration,
    pub ca_file: Option<PathBuf>,
    /// Connecting, and each read of a response: longer without a byte is a failure.
    pub timeout: Duration,
    /// A whole download from one URL, resumes included.
    pub deadline: Duration,
    /// After the first `timeout` of a download, its average rate must stay at or above
    /// this (bytes per second), or the URL is left for now: a server that trickles a
    /// byte now and then cannot hold the agent for the whole deadline.
    pub min_bytes_per_sec: u64,
    /// Bytes kept free on every filesystem where artifacts land (the blob store and the
    /// files' own): a bundle that would eat into them waits (`insufficient_space`).
    pub disk_reserve_bytes: u64,
    /// Client certificate and key (PEM) presented to the bundle server (mutual TLS):
    /// to `base_url`'s origin only.
    pub client_auth: Option<(PathBuf, PathBuf)>,
    /// A file holding the token sent as `Authorization: Bearer <token>` to `base_url`'s
    /// origin only; read again at each request (the token can be rotated in place).
    pub bearer_token_file: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from (`check-config` of a new agent binary reads it
    /// again before a self-update switches to it).
    pub file: PathBuf,
    pub device: String,
    pub fleet: String,
    pub topic_prefix: String,
    pub state_dir: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: tracing::Level,
    pub reconcile_interval: Duration,
    pub health_timeout: Duration,
    pub status_min_interval: Duration,
    pub mqtt: Option<MqttConfig>,
    pub trusted: TrustedKeys,
    pub limits: Limits,
    pub fetch: FetchConfig,
    /// `None` for a files-only device (`socket = "none"`).
    pub engine_socket: Option<PathBuf>,
    pub registry_auth: Vec<RegistryAuth>,
    pub stop_grace_secs: u32,
    /// Images the agent pulled are removed this long after no committed state uses them
    /// (`engine.image_gc_grace_secs`, default 1 hour); `None`: never (`image_gc = false`).
    pub image_gc_grace_secs: Option<u64>,
    pub engine_policy: EnginePolicyConfig,
    pub updates: UpdatesConfig,
}

/// `[updates]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatesConfig {
    /// While any entry exists in this directory, applies wait (within a maintenance
    /// window) up to the maximum deferral. Default `<state_dir>/locks`.
    pub lock_dir: PathBuf,
    /// The longest an update lock may hold an apply back; also caps what a bundle asks
    /// (`update_lock.max_deferral`). Default 24 hours.
    pub max_deferral: Duration,
    /// How long a new agent binary has to confirm (connect, report its status, pass a
    /// reconcile) under `fleet-agent launch` before the previous one is restored.
    /// Default 5 minutes.
    pub agent_trial: Duration,
}

pub const DEFAULT_AGENT_TRIAL_SECS: u64 = 300;

pub const DEFAULT_MAX_DEFERRAL_SECS: u64 = 24 * 3600;

pub const DEFAULT_ENGINE_SOCKET: &str = "/var/run/docker.sock";
/// How long an image the agent pulled stays after no committed state uses it.
pub const DEFAULT_IMAGE_GC_GRACE_SECS: u64 = 3600;
pub const DEFAULT_MAX_BUNDLE: u64 = 64 << 20;
/// A whole download from one URL: 15 minutes (64 MiB at 75 KB/s, a poor cellular link).
pub const DEFAULT_DEADLINE_SECS: u64 = 900;
/// 1 KiB/s: slower than any link a device updates over, faster than a server that
/// trickles bytes to hold the agent.
/// `fetch.disk_reserve_bytes`: 64 MiB.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;
pub const DEFAULT_MIN_BYTES_PER_SEC: u64 = 1024;

impl Config {
    /// Reads and validates `agent.toml`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigErrors {
            path: path.into(),
            problems: vec![Problem {
                line: None,
                col: None,
                key: String::new(),
                message: ConfigError::Read { path: path.into(), source }.to_string(),
            }],
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; relative paths in it are relative to `path`'s directory.
    ///
    /// Every problem in one run: the TOML syntax (all errors, with recovery; when there
    /// are any, nothing else is judged), then the keys and types of every table against
    /// [`schema`], which removes what is wrong, then the values of the rest
    /// ([`Config::from_raw`]), unless a required key is missing.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |problems: Vec<Problem>| ConfigErrors { path: path.into(), problems };
        let (table, syntax) = toml::de::DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            let problems = syntax
                .iter()
                .map(|e| {
                    let (line, col) = e.span().map(|s| line_col(text, s.start)).unzip();
                    Problem { line, col, key: String::new(), message: e.message().trim().to_string() }
                })
                .collect();
            return Err(fail(sorted(problems)));
        }
        // Keys and types; what is wrong is reported and removed, so that the values of
        // the rest are still checked in this run.
        let mut problems = Vec::new();
        let mut clean = table.clone();
        let span = clean.span();
        schema::check(text, clean.get_mut(), schema::ROOT, "", span, &mut problems);
        let raw = match RawConfig::deserialize(toml::de::Deserializer::from(clean)) {
            Ok(raw) => raw,
            // A required key is missing (or was removed): nothing more to check.
            Err(_) if !problems.is_empty() => return Err(fail(sorted(problems))),
            Err(e) => {
                let (line, col) = e.span().map(|s| line_col(text, s.start)).unzip();
                let message = e.message().trim().to_string();
                return Err(fail(vec![Problem { line, col, key: String::new(), message }]));
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        match Config::from_raw(raw, base) {
            Ok(config) if problems.is_empty() => Ok(Config { file: path.to_path_buf(), ..config }),
            Ok(_) => Err(fail(sorted(problems))),
            Err(errors) => {
                problems.extend(errors.into_iter().map(|e| match e {
                    ConfigError::Key { key, message } => {
                        let (line, col) = schema::locate(text, table.get_ref(), &key).unzip();
                        Problem { line, col, key, message }
                    }
                    other => {
                        Problem { line: None, col: None, key: String::new(), message: other.to_string() }
                    }
                }));
                Err(fail(sorted(problems)))
            }
        }
    }

    /// Checks every value; returns every problem found (each naming its key).
    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Config, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let e = &mut errs;
        take(e, topic::validate_id("device id", &raw.device).map_err(|x| key_err("device", x)));
        take(e, topic::validate_id("fleet id", &raw.fleet).map_err(|x| key_err("fleet", x)));
        let topic_prefix = raw.topic_prefix.unwrap_or_else(|| topic::DEFAULT_PREFIX.to_string());
        take(e, topic::validate_prefix(&topic_prefix).map_err(|x| key_err("topic_prefix", x)));
        if !raw.state_dir.is_absolute() {
            e.push(key_err("state_dir", "must be an absolute path, e.g. \"/var/lib/fleet-agent\""));
        }
        let mut allowed_roots = Vec::new();
        for (i, root) in raw.allowed_roots.iter().enumerate() {
            let key = format!("allowed_roots[{i}]");
            let Some(text) = root.to_str() else {
                e.push(key_err(&key, "must be UTF-8"));
                continue;
            };
            if !root.is_absolute() || text.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") {
                e.push(key_err(&key, format!("{text:?} must be an absolute, normalized directory path")));
            } else if root == Path::new("/") {
                e.push(key_err(&key, "\"/\" would let bundles write anywhere: name a dedicated directory"));
            } else {
                allowed_roots.push((i, root.clone()));
            }
        }
        e.extend(check_roots_apart(&allowed_roots, &raw.state_dir, base));
        let allowed_roots: Vec<PathBuf> = allowed_roots.into_iter().map(|(_, r)| r).collect();
        let log_format = match raw.log_format.as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => {
                e.push(key_err("log_format", format!("{other:?} is not \"human\" or \"json\"")));
                LogFormat::Human
            }
        };
        let log_level = take(
            e,
            parse_level(raw.log_level.as_deref().unwrap_or("info")).map_err(|m| key_err("log_level", m)),
        )
        .unwrap_or(tracing::Level::INFO);
        let secs = |e: &mut Vec<ConfigError>, key: &str, v: Option<u64>, default: u64, min: u64| {
            let v = v.unwrap_or(default);
            if v < min {
                e.push(key_err(key, format!("{v} is below the minimum of {min}")));
            }
            Duration::from_secs(v)
        };
        let reconcile_interval = secs(e, "reconcile_interval_secs", raw.reconcile_interval_secs, 60, 1);
        let health_timeout = secs(e, "health_timeout_secs", raw.health_timeout_secs, 60, 1);
        let status_min_interval = Duration::from_millis(raw.status_min_interval_ms.unwrap_or(1000));
        let raw_updates = raw.updates.unwrap_or_default();
        let lock_dir = raw_updates.lock_dir.unwrap_or_else(|| raw.state_dir.join("locks"));
        if !lock_dir.is_absolute() {
            e.push(key_err("updates.lock_dir", "must be an absolute path, e.g. \"/run/fleet-agent/locks\""));
        }
        let updates = UpdatesConfig {
            lock_dir,
            max_deferral: secs(
                e,
                "updates.max_deferral_secs",
                raw_updates.max_deferral_secs,
                DEFAULT_MAX_DEFERRAL_SECS,
                0,
            ),
            agent_trial: secs(
                e,
                "updates.agent_trial_secs",
                raw_updates.agent_trial_secs,
                DEFAULT_AGENT_TRIAL_SECS,
                10,
            ),
        };

        let mqtt = match raw.mqtt {
            Some(m) => take_all(e, mqtt_config(m, &raw.device, base)),
            None => None,
        };

        let mut keys = Vec::new();
        for (i, entry) in raw.trust.public_keys.iter().enumerate() {
            let key = format!("trust.public_keys[{i}]");
            let entry = entry.trim();
            let parsed: Result<PublicKey, ConfigError> = if entry.starts_with("fleet-ed25519-public:") {
                entry.parse().map_err(|x| key_err(&key, x))
            } else {
                let path = resolve_path(base, Path::new(entry));
                fleet_spec::keys::file::load_public(&path).map_err(|x| key_err(&key, x))
            };
            keys.extend(take(e, parsed));
        }
        let threshold = raw.trust.threshold.unwrap_or(1);
        let trusted = if keys.len() == raw.trust.public_keys.len() {
            take(e, TrustedKeys::new(keys, threshold).map_err(|x| key_err("trust", x)))
        } else {
            None
        };

        let fetch_raw = raw.fetch.unwrap_or_default();
        let mut limits = Limits::default();
        let max_bundle = fetch_raw.max_bundle_bytes.unwrap_or(DEFAULT_MAX_BUNDLE);
        if max_bundle < 1024 {
            e.push(key_err("fetch.max_bundle_bytes", format!("{max_bundle} is below the minimum of 1024")));
        }
        limits.max_compressed = max_bundle;
        limits.max_uncompressed = limits.max_uncompressed.max(max_bundle.saturating_mul(4));
        let base_url = match fetch_raw.base_url {
            None => None,
            Some(u) => {
                let u = u.trim_end_matches('/').to_string();
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    e.push(key_err("fetch.base_url", format!("{u:?} must start with http:// or https://")));
                } else {
                    take(
                        e,
                        crate::fetch::Url::parse(&crate::fetch::pointer_url(&u, &raw.device))
                            .map_err(|x| key_err("fetch.base_url", x)),
                    );
                }
                Some(u)
            }
        };
        let fetch = FetchConfig {
            base_url,
            poll_interval: secs(e, "fetch.poll_interval_secs", fetch_raw.poll_interval_secs, 300, 5),
            ca_file: fetch_raw.ca_file.map(|p| resolve_path(base, &p)),
            timeout: secs(e, "fetch.timeout_secs", fetch_raw.timeout_secs, 60, 1),
            deadline: secs(e, "fetch.deadline_secs", fetch_raw.deadline_secs, DEFAULT_DEADLINE_SECS, 1),
            min_bytes_per_sec: fetch_raw.min_bytes_per_sec.unwrap_or(DEFAULT_MIN_BYTES_PER_SEC),
            disk_reserve_bytes: fetch_raw.disk_reserve_bytes.unwrap_or(DEFAULT_DISK_RESERVE),
            client_auth: None,
            bearer_token_file: fetch_raw.bearer_token_file.map(|p| resolve_path(base, &p)),
        };
        if let Some(ca) = &fetch.ca_file {
            take(e, check_ca_file("fetch.ca_file", ca));
        }
        // Credentials for the bundle server: over TLS only, and only to base_url's origin
        // (announcements are unsigned: a URL they name elsewhere gets none).
        let https_base = fetch.base_url.as_deref().is_some_and(|u| u.starts_with("https://"));
        let client_cert = fetch_raw.client_cert.map(|p| resolve_path(base, &p));
        let client_key = fetch_raw.client_key.map(|p| resolve_path(base, &p));
        let mut fetch = fetch;
        match (client_cert, client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if !https_base {
                    e.push(key_err(
                        "fetch.client_cert",
                        "needs an https:// fetch.base_url (the certificate is presented to that server only)",
                    ));
                } else if take(e, check_client_files("fetch", &cert, &key)).is_some() {
                    fetch.client_auth = Some((cert, key));
                }
            }
            _ => e.push(key_err("fetch.client_key", "client_cert and client_key go together")),
        }
        if let Some(path) = &fetch.bearer_token_file {
            if !https_base {
                e.push(key_err(
                    "fetch.bearer_token_file",
                    "needs an https:// fetch.base_url: over plain HTTP anyone on the path reads the token",
                ));
            } else if let Err(reason) = crate::fetch::read_bearer_token(path) {
                e.push(key_err("fetch.bearer_token_file", reason));
            }
        }

        let engine = raw.engine.unwrap_or(RawEngine {
            socket: None,
            registry_auth: Vec::new(),
            stop_grace_secs: None,
            image_gc: None,
            image_gc_grace_secs: None,
            policy: None,
        });
        let engine_socket = match engine.socket.as_deref() {
            None => Some(PathBuf::from(DEFAULT_ENGINE_SOCKET)),
            Some("none") => None,
            Some(s) => {
                let s = s.strip_prefix("unix://").unwrap_or(s);
                if !s.starts_with('/') {
                    e.push(key_err(
                        "engine.socket",
                        format!("{s:?} must be an absolute socket path or \"none\""),
                    ));
                }
                Some(PathBuf::from(s))
            }
        };
        let mut registry_auth = Vec::new();
        for (i, a) in engine.registry_auth.into_iter().enumerate() {
            let key = format!("engine.registry_auth[{i}]");
            match take(e, secret(&key, a.password, a.password_file, base)) {
                Some(Some(password)) => {
                    registry_auth.push(RegistryAuth { username: a.username, password, server: a.server })
                }
                Some(None) => e.push(key_err(&key, "needs password or password_file")),
                None => {}
            }
        }
        let engine_policy = take_all(e, engine_policy(engine.policy.unwrap_or_default(), base));

        let (Some(trusted), Some(engine_policy), true) = (trusted, engine_policy, errs.is_empty()) else {
            return Err(errs);
        };
        Ok(Config {
            file: PathBuf::new(),
            device: raw.device,
            fleet: raw.fleet,
            topic_prefix,
            state_dir: raw.state_dir,
            allowed_roots,
            log_format,
            log_level,
            reconcile_interval,
            health_timeout,
            status_min_interval,
            mqtt,
            trusted,
            limits,
            fetch,
            engine_socket,
            registry_auth,
            stop_grace_secs: engine.stop_grace_secs.unwrap_or(10),
            image_gc_grace_secs: match engine.image_gc {
                Some(false) => None,
                _ => Some(engine.image_gc_grace_secs.unwrap_or(DEFAULT_IMAGE_GC_GRACE_SECS)),
            },
            engine_policy,
            updates,
        })
    }

    /// Settings that are valid but unwise, one sentence each (`check-config` prints
    /// them, `run` logs them at start).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(m) = self.mqtt.as_ref().filter(|m| !m.tls && m.password.is_some()) {
            warnings.push(format!(
                "config key `mqtt.password`: the password (or password_file) is sent in clear text to \
                 mqtt://{}:{} (no TLS), readable by anyone on the network path: use an mqtts:// url",
                m.host, m.port
            ));
        }
        warnings
    }

    /// The registry credentials for an image reference (matched by registry host).
    pub fn auth_for(&self, reference: &str) -> Option<&RegistryAuth> {
        let first = reference.split('/').next().unwrap_or("");
        let host = if reference.contains('/')
            && (first.contains('.') || first.contains(':') || first == "localhost")
        {
            first
        } else {
            "docker.io"
        };
        self.registry_auth
            .iter()
            .find(|a| a.server.trim_end_matches('/').trim_start_matches("https://") == host)
    }
}

/// Validates `[engine.policy]`: paths absolute and normalized, names well-formed.
fn engine_policy(raw: RawEnginePolicy, base: &Path) -> Result<EnginePolicyConfig, Vec<ConfigError>> {
    let mut errs = Vec::new();
    let mut paths = |key: &str, list: &[String]| {
        for (i, p) in list.iter().enumerate() {
            let normal = p.starts_with('/')
                && p != "/"
                && !p.contains('\0')
                && p[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
            if !normal {
                errs.push(key_err(
                    format!("engine.policy.{key}[{i}]"),
                    format!("{p:?} must be an absolute, normalized path other than \"/\""),
                ));
            }
        }
    };
    paths("bind_roots", &raw.bind_roots);
    paths("devices", &raw.devices);
    for (i, ns) in raw.host_namespaces.iter().enumerate() {
        if !HOST_NAMESPACES.contains(&ns.trim()) {
            errs.push(key_err(
                format!("engine.policy.host_namespaces[{i}]"),
                format!("{ns:?} is not one of {HOST_NAMESPACES:?} (the network's is `allow_host_network`)"),
            ));
        }
    }
    for (i, r) in raw.device_cgroup_rules.iter().enumerate() {
        if !fleet_spec::policy::is_device_cgroup_rule(r) {
            errs.push(key_err(
                format!("engine.policy.device_cgroup_rules[{i}]"),
                format!("{r:?} is not a device cgroup rule like \"c 189:* rmw\" (type a, b or c; major:minor; r, w, m)"),
            ));
        }
    }
    for (i, c) in raw.capabilities.iter().enumerate() {
        let name = c.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            errs.push(key_err(
                format!("engine.policy.capabilities[{i}]"),
                format!("{c:?} is not a capability name like \"NET_ADMIN\""),
            ));
        }
    }
    for (i, r) in raw.registries.iter().enumerate() {
        if r.is_empty() || r.starts_with('/') || r.contains("://") || r.contains(char::is_whitespace) {
            errs.push(key_err(
                format!("engine.policy.registries[{i}]"),
                format!("{r:?} must be a registry host[:port], optionally with a repository prefix (\"ghcr.io/acme\")"),
            ));
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let config_dir = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    Ok(EnginePolicyConfig {
        policy: fleet_spec::policy::EnginePolicy {
            allow_privileged: raw.allow_privileged,
            allow_host_network: raw.allow_host_network,
            host_namespaces: raw.host_namespaces,
            device_cgroup_rules: raw.device_cgroup_rules,
            allow_unconfined: raw.allow_unconfined,
            allow_gpus: raw.allow_gpus,
            allow_engine_socket: raw.allow_engine_socket,
            bind_roots: raw.bind_roots,
            devices: raw.devices,
            capabilities: raw.capabilities,
            registries: raw.registries,
            require_digest: raw.require_digest,
        },
        config_dir,
    })
}

/// Parses `[mqtt]`; every problem found.
fn mqtt_config(m: RawMqtt, device: &str, base: &Path) -> Result<MqttConfig, Vec<ConfigError>> {
    let mut errs = Vec::new();
    let (tls, rest) = if let Some(r) = m.url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = m.url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        errs.push(key_err("mqtt.url", format!("{:?} must start with mqtt:// or mqtts://", m.url)));
        (false, "")
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p.parse::<u16>().unwrap_or_else(|_| {
                errs.push(key_err("mqtt.url", format!("port {p:?} is not a number")));
                0
            });
            (h.trim_start_matches('[').trim_end_matches(']').to_string(), port)
        }
        _ => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    if errs.is_empty() && (host.is_empty() || host.contains('/')) {
        errs.push(key_err("mqtt.url", format!("{:?} has no valid host", m.url)));
    }
    let client_id = m.client_id.unwrap_or_else(|| device.to_string());
    let ca_file = m.ca_file.map(|p| resolve_path(base, &p));
    let client_cert = m.client_cert.map(|p| resolve_path(base, &p));
    let client_key = m.client_key.map(|p| resolve_path(base, &p));
    if !tls && (ca_file.is_some() || client_cert.is_some()) {
        errs.push(key_err("mqtt.url", "ca_file/client_cert need an mqtts:// url"));
    }
    if client_cert.is_some() != client_key.is_some() {
        errs.push(key_err("mqtt.client_key", "client_cert and client_key go together"));
    }
    if let Some(ca) = &ca_file {
        take(&mut errs, check_ca_file("mqtt.ca_file", ca));
    }
    if let (Some(cert), Some(key)) = (&client_cert, &client_key) {
        take(&mut errs, check_client_files("mqtt", cert, key));
    }
    let password = take(&mut errs, secret("mqtt", m.password, m.password_file, base)).flatten();
    if password.is_some() && m.username.is_none() {
        errs.push(key_err("mqtt.username", "a password needs a username"));
    }
    let keepalive = m.keepalive_secs.unwrap_or(30);
    if !(5..=3600).contains(&keepalive) {
        errs.push(key_err("mqtt.keepalive_secs", format!("{keepalive} is outside 5..=3600")));
    }
    let reconnect_max = m.reconnect_max_secs.unwrap_or(60).max(1);
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(MqttConfig {
        host,
        port,
        tls,
        client_id,
        ca_file,
        client_cert,
        client_key,
        username: m.username,
        password,
        keepalive: Duration::from_secs(keepalive),
        reconnect_max: Duration::from_secs(reconnect_max),
    })
}

/// The value of `r`, or `None` with its error recorded.
fn take<T>(errs: &mut Vec<ConfigError>, r: Result<T, ConfigError>) -> Option<T> {
    r.map_err(|e| errs.push(e)).ok()
}

/// The value of `r`, or `None` with its errors recorded.
fn take_all<T>(errs: &mut Vec<ConfigError>, r: Result<T, Vec<ConfigError>>) -> Option<T> {
    r.map_err(|e| errs.extend(e)).ok()
}

/// Problems sorted in file order (unlocated ones last, in the order found).
fn sorted(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by_key(|p| (p.line.is_none(), p.line, p.col));
    problems
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn secret(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    base: &Path,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            Err(key_err(format!("{key}.password_file"), "set password or password_file, not both"))
        }
        (Some(p), None) => Ok(Some(p)),
        (None, Some(f)) => {
            let path = resolve_path(base, &f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| key_err(format!("{key}.password_file"), format!("{}: {e}", path.display())))?;
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
        }
        (None, None) => Ok(None),
    }
}

fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

// Checks that read the files a key names (TLS) or compare paths on this machine
// (allowed roots), each on its own so that `from_raw` only calls them.

/// A PEM CA file, loaded as `run` loads it: at least one certificate, each a valid
/// trust anchor.
fn check_ca_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    crate::tls::load_roots(path).map(drop).map_err(|e| key_err(key, e))
}

/// The client certificate chain and key, loaded as `run` loads them: at least one
/// certificate, a key the ring provider can sign with, and the two must go together.
fn check_client_files(table: &str, cert: &Path, key: &Path) -> Result<(), ConfigError> {
    use crate::tls::{self, TlsError};
    let (cert_key, key_key) = (format!("{table}.client_cert"), format!("{table}.client_key"));
    let chain = tls::load_certs(cert).map_err(|e| key_err(&cert_key, e))?;
    let der = tls::load_key(key).map_err(|e| key_err(&key_key, e))?;
    tls::check_client_auth(chain, der).map_err(|e| match e {
        TlsError::Rustls(e @ rustls::Error::InvalidCertificate(_)) => {
            key_err(&cert_key, format!("{}: the certificate does not parse ({e})", cert.display()))
        }
        e => key_err(
            &key_key,
            format!("{} does not go with the certificate in {} ({e})", key.display(), cert.display()),
        ),
    })
}

/// Refuses an allowed root that is, contains or lies inside the state directory or the
/// config directory (`base`, where agent.toml is): a bundle could otherwise rewrite the
/// agent's trust state, journal, bundles, config or keys. Paths are compared lexically
/// (after applying `.` and `..`), then with symlinks resolved as far as they exist.
fn check_roots_apart(roots: &[(usize, PathBuf)], state_dir: &Path, base: &Path) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    let config_dir = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    let dirs = [
        ("the state directory", "state_dir", normalize(state_dir)),
        ("the config directory", "the directory of agent.toml", normalize(&config_dir)),
    ];
    for (i, root) in roots {
        let root = normalize(root);
        let real_root = resolve_existing(&root);
        for (what, which, dir) in &dirs {
            let real_dir = resolve_existing(dir);
            let (relation, via) = match (overlap(&root, dir), overlap(&real_root, &real_dir)) {
                (Some(r), _) => (r, String::new()),
                (None, Some(r)) => (r, format!(" (through symlinks: {real_root:?} and {real_dir:?})")),
                (None, None) => continue,
            };
            errs.push(key_err(
                format!("allowed_roots[{i}]"),
                format!(
                    "{root:?} {relation} {what} {dir:?} ({which}){via}: bundles could rewrite the \
                     agent's own files; allowed roots must lie apart from state_dir and the config directory"
                ),
            ));
            break;
        }
    }
    errs
}

/// How `root` and `dir` overlap, if they do (component-wise: `/srv/a` does not contain
/// `/srv/ab`).
fn overlap(root: &Path, dir: &Path) -> Option<&'static str> {
    if root == dir {
        Some("is")
    } else if dir.starts_with(root) {
        Some("contains")
    } else if root.starts_with(dir) {
        Some("is inside")
    } else {
        None
    }
}

/// `path` with `.` dropped and `..` applied lexically, without a trailing slash
/// (`/a/b/../c/.` is `/a/c`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `path` with symlinks resolved as far as it exists: its longest existing ancestor
/// canonicalized, the rest appended. Unchanged when nothing of it can be resolved.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        if let Ok(mut real) = std::fs::canonicalize(cur) {
            real.extend(rest.iter().rev());
            return real;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                cur = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

mod schema;

/// Parses a log level name (`error`, `warn`, `info`, `debug`, `trace`).
pub fn parse_level(s: &str) -> Result<tracing::Level, String> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Ok(tracing::Level::ERROR),
        "warn" | "warning" => Ok(tracing::Level::WARN),
        "info" => Ok(tracing::Level::INFO),
        "debug" => Ok(tracing::Level::DEBUG),
        "trace" => Ok(tracing::Level::TRACE),
        other => Err(format!("{other:?} is not one of error, warn, info, debug, trace")),
    }
}

#[cfg(test)]
mod tests;
