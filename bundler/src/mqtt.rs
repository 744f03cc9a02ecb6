//! MQTT: `publish` (retained announcements, optionally retained bundle blobs) and
//! `status` (the fleet table from the agents' retained status and online topics).
//!
//! Every network wait is bounded: connecting, each acknowledgement and the whole
//! `status --wait` have deadlines, so an unreachable broker is an error after
//! `--timeout`, never a hang.
//!
//! `publish` remembers what it announced in `DIR/published.json` (device → sha256 of
//! the announcement payload) and only announces devices whose announcement changed
//! since; `--force` announces every device. Devices that left the index get their
//! retained topics cleared.
//!
//! With `--blobs-over-mqtt`, `publish` also retains the blobs the devices' bundles name
//! (artifacts, and the agent binaries of every architecture of an agent release), as chunks on `<prefix>/<fleet>/blobs/<sha256>/<n>` (see
//! `fleet_spec::topic::blob_chunk_topic`), before the announcements: each distinct blob
//! once, read from `DIR/blobs/` one chunk at a time with a few chunks in flight, so a
//! blob of any size costs a few chunks of memory. `published.json` remembers the blobs
//! retained (`mqtt_blobs`): a later publish sends only new ones (`--force`: all) and
//! clears the chunks of those no bundle names any more.
//!
//! Before announcing, `publish` reads the retained announcements of the devices it is
//! about to announce: a device whose retained version is newer than the new one (or
//! equal, with another bundle) has already seen that version and would refuse the new
//! bundle (`not_newer`), so nothing is published and [`MqttError::NotNewer`] names
//! every such device.
//!
//! Both (and `rollout`) take `--broker` once per node of a cluster that keeps retained
//! messages per node and sends none to wildcard filters (RabbitMQ 3.x, measured in
//! `tests/tests/e2e/cluster.rs`): `publish` checks and retains on every node; `status`
//! subscribes on every node to each indexed device's exact topics (`Readers`) and
//! folds the nodes' messages (`Fold`, by [`replaces`]); `rollout` uses the same
//! `Readers` and rule. One broker takes exactly the path it always did.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_spec::messages::{Announcement, DeviceState, StatusReport};
use fleet_spec::topic::{blob_chunk_len, blob_chunk_topic, blob_chunks, Topic, TopicKind, DEFAULT_PREFIX};
use rumqttc::{
    Client, ConnectReturnCode, Connection, Event, MqttOptions, Packet, QoS, RecvTimeoutError, Transport,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::build::{self, Index};
use crate::timefmt;

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_duration_ms(s).map(Duration::from_millis)
}

/// How to reach the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL: mqtt://host[:1883] or mqtts://host[:8883]. publish, status and rollout
    /// take it once per node of a broker cluster whose nodes keep retained messages to
    /// themselves (RabbitMQ): every node then gets each retained message, and status and
    /// rollout read every node (README "Clustered brokers"); the exporter takes one.
    #[arg(long, env = "FLEET_BROKER", required = true)]
    pub broker: Vec<String>,
    /// CA certificate (PEM) for mqtts:// (default: the system's roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    #[arg(long, env = "FLEET_MQTT_USERNAME")]
    pub username: Option<String>,
    #[arg(long, env = "FLEET_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// MQTT client id (default: fleet-bundler-<pid>).
    #[arg(long)]
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// The build output directory (index.json, bundles/).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Base URL devices fetch `<base-url>/bundles/<digest>.bundle` from (repeatable: mirrors).
    #[arg(long = "base-url")]
    pub base_urls: Vec<String>,
    /// Also retain each bundle's bytes on `<prefix>/<fleet>/devices/<id>/bundle`, and its
    /// artifact blobs in 256 KiB chunks on `<prefix>/<fleet>/blobs/<sha256>/<n>` (each
    /// blob once; blobs retained by an earlier publish are not sent again).
    #[arg(long)]
    pub blobs_over_mqtt: bool,
    /// Announce every device, not only those that changed since the last publish.
    #[arg(long)]
    pub force: bool,
    /// Longest wait for the broker: to connect, and for each acknowledgement.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long to wait for more retained announcements after the last one arrived,
    /// when reading what devices were already announced.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleet id (default: the index's).
    #[arg(long)]
    pub fleet: Option<String>,
    /// Topic prefix (default: the index's, else "fleet").
    #[arg(long)]
    pub prefix: Option<String>,
    /// index.json of the build to compare with (desired versions, device list).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Only devices with this label (`key=value`, repeatable; needs --index).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// Only this device (repeatable).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Wait until every selected device of the index converged (exit 0), one failed
    /// (exit 3) or the timeout passed (exit 4). Needs --index.
    #[arg(long, requires = "index")]
    pub wait: bool,
    /// How long --wait waits for convergence.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Longest wait to connect to the broker.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Without --wait: how long to collect retained messages after the last one arrived.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Instead of printing the table, serve it as Prometheus metrics on
    /// http://ADDR/metrics until Ctrl-C or SIGTERM (the same as `fleet-bundler exporter
    /// --listen ADDR`).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["wait", "json", "selectors", "devices"])]
    pub serve: Option<std::net::SocketAddr>,
    /// With --serve: leave out the per-device series (see `exporter --help`).
    #[arg(long, requires = "serve")]
    pub no_device_metrics: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("broker URL {0:?} is not mqtt://host[:port] or mqtts://host[:port] (--broker or FLEET_BROKER)")]
    Url(String),
    #[error("cannot read {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot connect to {broker}: {message}")]
    Connect { broker: String, message: String },
    #[error("broker {broker} refused the connection: {code:?} (check --username/--password, the client certificate or the ACL)")]
    Refused { broker: String, code: ConnectReturnCode },
    #[error("no answer from {broker} within {timeout:?} while {what} (is the broker up and reachable?)")]
    Timeout { broker: String, timeout: Duration, what: String },
    #[error("connection to {broker} failed while {what}: {message}")]
    Lost { broker: String, what: String, message: String },
    #[error("{0}")]
    Topic(#[from] fleet_spec::topic::TopicError),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    /// A problem of the command line found after parsing: exit 64 like a bad flag.
    #[error("{0}")]
    Usage(String),
    #[error("cannot watch for Ctrl-C: {0}")]
    Signals(std::io::Error),
    #[error("{}nothing was published: devices refuse a version that is not newer than the one they were announced (not_newer). This happens when a build lost its output directory (CI cache) while the commit is dated before the previous build's: rebuild with `fleet-bundler build --previous <URL or directory of the published build>` so that versions exceed the published ones, then publish (or roll out) again. If the retained announcements are stale (the devices were reset), clear them (`mosquitto_pub -r -n -t TOPIC`).", conflicts.iter().map(|c| format!("{c}; ")).collect::<String>())]
    NotNewer { conflicts: Vec<NotNewer> },
}

/// A device whose retained announcement is not older than the one to publish.
#[derive(Debug, Clone)]
pub struct NotNewer {
    pub device: String,
    pub topic: String,
    pub retained_version: u64,
    pub retained_digest: String,
    pub new_version: u64,
    pub new_digest: String,
}

impl std::fmt::Display for NotNewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |d: &str| d.chars().take(12).collect::<String>();
        write!(
            f,
            "device {}: the broker retains version {} (bundle {}) on {}, this build has version {} (bundle {})",
            self.device,
            self.retained_version,
            short(&self.retained_digest),
            self.topic,
            self.new_version,
            short(&self.new_digest)
        )?;
        if self.retained_version == self.new_version {
            f.write_str(", the same version with other content")?;
        }
        Ok(())
    }
}

struct Url {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Url, MqttError> {
    let bad = || MqttError::Url(url.into());
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(bad());
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().map_err(|_| bad())?),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Url { tls, host: host.into(), port })
}

fn tls_config(args: &BrokerArgs) -> Result<rumqttc::TlsConfiguration, MqttError> {
    // A file named on the command line that does not exist is a usage error.
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => MqttError::Usage(format!("{} does not exist", p.display())),
            _ => MqttError::File { path: p.into(), source },
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    match &args.ca_file {
        Some(ca) => {
            let pem = read(ca)?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| MqttError::Tls(format!("{}: {e}", ca.display())))?;
                roots.add(cert).map_err(|e| MqttError::Tls(format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(MqttError::Tls(format!("{} holds no PEM certificate", ca.display())));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MqttError::Tls(format!("{}: {e}", cert.display())))?;
            let key_pem = read(key)?;
            let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
                .map_err(|e| MqttError::Tls(format!("{}: {e}", key.display())))?
                .ok_or_else(|| MqttError::Tls(format!("{} holds no PEM private key", key.display())))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| MqttError::Tls(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

impl BrokerArgs {
    /// The one broker of a command that reads or writes a single node (`rollout`,
    /// `exporter`): several `--broker` are a usage error there.
    pub(crate) fn single(&self, command: &str) -> Result<&str, MqttError> {
        match self.broker.as_slice() {
            [one] => Ok(one),
            [] => Err(MqttError::Usage("pass --broker URL".into())),
            _ => Err(MqttError::Usage(format!(
                "{command} takes one --broker: several (one per node of a cluster that keeps retained messages \
                 per node) are understood by publish, status and rollout only; point {command} at a broker whose \
                 retained messages every node sees (README \"Clustered brokers\")"
            ))),
        }
    }

    /// The brokers, each URL checked, duplicates refused (at most [`MAX_BROKERS`]).
    pub(crate) fn all(&self) -> Result<&[String], MqttError> {
        if self.broker.is_empty() {
            return Err(MqttError::Usage("pass --broker URL".into()));
        }
        if self.broker.len() > MAX_BROKERS {
            return Err(MqttError::Usage(format!(
                "{} --broker given: at most {MAX_BROKERS} (one per node of one cluster)",
                self.broker.len()
            )));
        }
        for (i, url) in self.broker.iter().enumerate() {
            parse_url(url)?;
            if self.broker[..i].contains(url) {
                return Err(MqttError::Usage(format!("--broker {url} is given twice")));
            }
        }
        Ok(&self.broker)
    }
}

/// The most `--broker` one command takes (each is one connection; node bits in a u64).
pub const MAX_BROKERS: usize = 16;

/// A client for the broker `args` names (clean session, TCP_NODELAY), not yet
/// connected: the connection is made when `Connection` is first polled. The client id
/// defaults to `<default_id>-<pid>`.
pub(crate) fn client(
    args: &BrokerArgs,
    default_id: &str,
    capacity: usize,
) -> Result<(Client, Connection), MqttError> {
    let url = args.single("this command")?.to_string();
    client_to(args, &url, 0, default_id, capacity)
}

/// A client for `broker`, the `node`th of `args`' brokers: nodes after the first get
/// `-<node>` appended to the client id (one cluster refuses two sessions with one id).
pub(crate) fn client_to(
    args: &BrokerArgs,
    broker: &str,
    node: usize,
    default_id: &str,
    capacity: usize,
) -> Result<(Client, Connection), MqttError> {
    let url = parse_url(broker)?;
    let mut client_id =
        args.client_id.clone().unwrap_or_else(|| format!("{default_id}-{}", std::process::id()));
    if node > 0 {
        client_id = format!("{client_id}-{node}");
    }
    let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(256 << 20, 256 << 20);
    if let Some(user) = &args.username {
        options.set_credentials(user.clone(), args.password.clone().unwrap_or_default());
    }
    if url.tls {
        options.set_transport(Transport::tls_with_config(tls_config(args)?));
    }
    let (client, mut connection) = Client::new(options, capacity.max(10));
    // Small packets one after another (subscribe, then the announcements): without
    // TCP_NODELAY each waits for the broker's delayed ACK of the previous (~40 ms).
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    connection.eventloop.set_network_options(network);
    Ok((client, connection))
}

/// A connected MQTT session with bounded waits.
pub(crate) struct Session {
    pub(crate) client: Client,
    connection: Connection,
    pub(crate) broker: String,
    pub(crate) timeout: Duration,
}

impl Session {
    /// Connects to `broker`, the `node`th of `args`' brokers (see [`client_to`]).
    pub(crate) fn connect_to(
        args: &BrokerArgs,
        broker: &str,
        node: usize,
        timeout: Duration,
        capacity: usize,
    ) -> Result<Session, MqttError> {
        let (client, connection) = client_to(args, broker, node, "fleet-bundler", capacity)?;
        let mut session = Session { client, connection, broker: broker.to_string(), timeout };
        let deadline = Instant::now() + timeout;
        loop {
            match session.next(deadline, "connecting")? {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    if ack.code != ConnectReturnCode::Success {
                        return Err(MqttError::Refused { broker: session.broker, code: ack.code });
                    }
                    return Ok(session);
                }
                _ => continue,
            }
        }
    }

    /// The next event before `deadline`; connection errors are final (no reconnect).
    pub(crate) fn next(&mut self, deadline: Instant, what: &str) -> Result<Event, MqttError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(MqttError::Timeout {
                broker: self.broker.clone(),
                timeout: self.timeout,
                what: what.into(),
            });
        }
        match self.connection.recv_timeout(remaining) {
            Ok(Ok(event)) => Ok(event),
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                Err(MqttError::Refused { broker: self.broker.clone(), code })
            }
            Ok(Err(e)) => {
                let message = e.to_string();
                if what == "connecting" {
                    Err(MqttError::Connect { broker: self.broker.clone(), message })
                } else {
                    Err(MqttError::Lost { broker: self.broker.clone(), what: what.into(), message })
                }
            }
            Err(RecvTimeoutError::Timeout) => Err(MqttError::Timeout {
                broker: self.broker.clone(),
                timeout: self.timeout,
                what: what.into(),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(MqttError::Lost {
                broker: self.broker.clone(),
                what: what.into(),
                message: "disconnected".into(),
            }),
        }
    }

    pub(crate) fn disconnect(mut self) {
        let _ = self.client.disconnect();
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.next(deadline, "disconnecting").is_ok() {}
    }
}

/// `DIR/published.json`: what the last publish from this directory announced.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Published {
    /// Device → hex sha256 of its retained announcement payload.
    pub devices: BTreeMap<String, String>,
    /// Whether bundle blobs were retained for the devices.
    #[serde(default)]
    pub blobs: bool,
    /// Artifact blobs retained as chunks (`--blobs-over-mqtt`): hex sha256 → size.
    #[serde(default)]
    pub mqtt_blobs: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct PublishSummary {
    pub fleet: String,
    pub broker: String,
    pub announced: Vec<String>,
    pub unchanged: usize,
    pub cleared: Vec<String>,
    /// Artifact blobs (hex sha256) whose chunks were retained by this publish.
    pub blobs_published: Vec<String>,
    /// Artifact blobs no bundle names any more, their retained chunks cleared.
    pub blobs_cleared: Vec<String>,
}

/// Announces every device whose announcement changed since the last publish.
pub fn publish(args: &PublishArgs) -> Result<PublishSummary, MqttError> {
    if args.base_urls.is_empty() && !args.blobs_over_mqtt {
        return Err(MqttError::Usage(
            "nothing tells devices where to fetch bundles: pass --base-url URL and/or --blobs-over-mqtt"
                .into(),
        ));
    }
    let index_path = args.out.join("index.json");
    let index = Index::read(&index_path)?.ok_or_else(|| {
        MqttError::Usage(format!(
            "{} does not exist: run `fleet-bundler build --out {}` first",
            index_path.display(),
            args.out.display()
        ))
    })?;
    if index.rollout.is_some() {
        return Err(MqttError::Usage(format!(
            "{} declares a rollout (fleet.yaml `rollout:` at commit {}): its pointer files wait in {}/devices.next/; \
             release them wave by wave with `fleet-bundler rollout --out {}` (same broker flags), or remove `rollout:` \
             from fleet.yaml and build again to publish all at once",
            index_path.display(),
            index.commit,
            args.out.display(),
            args.out.display()
        )));
    }
    let previous = read_published(&args.out);
    let mut next =
        Published { devices: BTreeMap::new(), blobs: args.blobs_over_mqtt, mqtt_blobs: BTreeMap::new() };

    // (topic, payload) in order: a blob before its announcement.
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    // Desired topic → (device, version, digest) of what is announced.
    let mut announcing: BTreeMap<String, (String, u64, String)> = BTreeMap::new();
    let mut summary = PublishSummary {
        fleet: index.fleet.clone(),
        broker: args.broker.broker.join(", "),
        ..Default::default()
    };
    for (device, entry) in &index.devices {
        let payload = announcement_payload(&index, device, entry, &args.base_urls, args.blobs_over_mqtt);
        let hash = hex::encode(Sha256::digest(&payload));
        next.devices.insert(device.clone(), hash.clone());
        if !args.force && previous.devices.get(device) == Some(&hash) {
            summary.unchanged += 1;
            continue;
        }
        if args.blobs_over_mqtt {
            messages.push(blob_message(&args.out, &index, device, entry)?);
        }
        let topic = Topic::new(&index.topic_prefix, &index.fleet, device, TopicKind::Desired)?.to_string();
        announcing.insert(topic.clone(), (device.clone(), entry.version, entry.digest.clone()));
        messages.push((topic, payload));
        summary.announced.push(device.clone());
    }
    for device in previous.devices.keys().filter(|d| !index.devices.contains_key(*d)) {
        // An empty retained message deletes the retained one.
        messages.push((
            Topic::new(&index.topic_prefix, &index.fleet, device, TopicKind::Desired)?.to_string(),
            Vec::new(),
        ));
        if previous.blobs {
            messages.push((
                Topic::new(&index.topic_prefix, &index.fleet, device, TopicKind::Bundle)?.to_string(),
                Vec::new(),
            ));
        }
        summary.cleared.push(device.clone());
    }
    // Artifact blobs: those the bundles name now and were not retained before go out
    // (before the announcements); those retained before and named no more are cleared.
    if args.blobs_over_mqtt {
        next.mqtt_blobs = artifact_blobs(&args.out, &index)?;
    }
    let blobs: Vec<(String, u64)> = next
        .mqtt_blobs
        .iter()
        .filter(|(sha, _)| args.force || !previous.mqtt_blobs.contains_key(*sha))
        .map(|(sha, size)| (sha.clone(), *size))
        .collect();
    summary.blobs_published = blobs.iter().map(|(sha, _)| sha.clone()).collect();
    for (sha, size) in previous.mqtt_blobs.iter().filter(|(sha, _)| !next.mqtt_blobs.contains_key(*sha)) {
        for n in 0..blob_chunks(*size) {
            messages.push((blob_chunk_topic(&index.topic_prefix, &index.fleet, sha, n)?, Vec::new()));
        }
        summary.blobs_cleared.push(sha.clone());
    }
    if previous.blobs && !args.blobs_over_mqtt {
        // Blobs were retained before and are not anymore: remove them.
        for device in index.devices.keys() {
            messages.push((
                Topic::new(&index.topic_prefix, &index.fleet, device, TopicKind::Bundle)?.to_string(),
                Vec::new(),
            ));
        }
    }

    if !messages.is_empty() || !blobs.is_empty() {
        // One session per node: every node must hold every retained announcement (a
        // cluster that keeps retained messages per node gives a device only its own
        // node's). All are checked before anything is published anywhere.
        let brokers = args.broker.all()?;
        let mut sessions = Vec::with_capacity(brokers.len());
        // Requests are queued before the connection is polled: room for the
        // unsubscriptions of the exact topics (several nodes) and every message.
        let capacity =
            if brokers.len() > 1 { 2 * messages.len() + 10 } else { messages.len() + 10 } + BLOB_WINDOW;
        for (node, broker) in brokers.iter().enumerate() {
            sessions.push(Session::connect_to(&args.broker, broker, node, args.timeout, capacity)?);
        }
        if !announcing.is_empty() {
            let mut conflicts = Vec::new();
            for session in &mut sessions {
                // Several nodes: exact topics (a broker that keeps retained messages per
                // node, RabbitMQ, also sends none to a wildcard filter).
                let filters = if brokers.len() > 1 {
                    announcing.keys().cloned().collect()
                } else {
                    vec![Topic::fleet_filter(&index.topic_prefix, &index.fleet, TopicKind::Desired)?]
                };
                for c in retained_not_newer(session, &filters, &announcing, args.settle)? {
                    if !conflicts.iter().any(|k: &NotNewer| k.device == c.device) {
                        conflicts.push(c);
                    }
                }
            }
            if !conflicts.is_empty() {
                for session in sessions {
                    session.disconnect();
                }
                return Err(MqttError::NotNewer { conflicts });
            }
        }
        for mut session in sessions {
            publish_blobs(&mut session, &args.out, &index, &blobs)?;
            let total = messages.len();
            for (topic, payload) in &messages {
                session.client.publish(topic.clone(), QoS::AtLeastOnce, true, payload.clone()).map_err(
                    |e| MqttError::Lost {
                        broker: session.broker.clone(),
                        what: "queueing announcements".into(),
                        message: e.to_string(),
                    },
                )?;
            }
            let mut acked = 0;
            // Each acknowledgement must come within --timeout of the previous one.
            let mut deadline = Instant::now() + session.timeout;
            while acked < total {
                if let Event::Incoming(Packet::PubAck(_)) = session.next(deadline, "waiting for PUBACKs")? {
                    acked += 1;
                    deadline = Instant::now() + session.timeout;
                }
            }
            session.disconnect();
        }
    }
    write_published(&args.out, &next)?;
    eprintln!(
        "published fleet {} to {}: {} announced, {} unchanged, {} cleared{}",
        summary.fleet,
        summary.broker,
        summary.announced.len(),
        summary.unchanged,
        summary.cleared.len(),
        if args.blobs_over_mqtt || !summary.blobs_cleared.is_empty() {
            format!(
                "; artifact blobs: {} published, {} cleared",
                summary.blobs_published.len(),
                summary.blobs_cleared.len()
            )
        } else {
            String::new()
        }
    );
    Ok(summary)
}

/// `device`'s announcement of its indexed bundle, as `publish` and `rollout` retain it.
pub(crate) fn announcement_payload(
    index: &Index,
    device: &str,
    entry: &build::IndexEntry,
    base_urls: &[String],
    blobs_over_mqtt: bool,
) -> Vec<u8> {
    let urls = base_urls
        .iter()
        .map(|base| format!("{}/bundles/{}.bundle", base.trim_end_matches('/'), entry.digest))
        .collect();
    Announcement { urls, mqtt_blob: blobs_over_mqtt, ..entry.announcement(&index.fleet, device) }.to_json()
}

/// The retained bundle blob of `device` (`--blobs-over-mqtt`): (topic, bytes).
pub(crate) fn blob_message(
    out: &Path,
    index: &Index,
    device: &str,
    entry: &build::IndexEntry,
) -> Result<(String, Vec<u8>), MqttError> {
    let path = out.join("bundles").join(format!("{}.bundle", entry.digest));
    let bytes = std::fs::read(&path).map_err(|source| MqttError::File { path, source })?;
    Ok((Topic::new(&index.topic_prefix, &index.fleet, device, TopicKind::Bundle)?.to_string(), bytes))
}

/// Chunks of artifact blobs queued or unacknowledged at once while `publish` retains
/// them (the memory a blob costs: this many chunks).
const BLOB_WINDOW: usize = 8;

/// The blobs (hex sha256 → size) the indexed bundles name (artifacts, agent binaries), each checked
/// present in `DIR/blobs/` with its size.
fn artifact_blobs(out: &Path, index: &Index) -> Result<BTreeMap<String, u64>, MqttError> {
    let mut blobs = BTreeMap::new();
    for entry in index.devices.values() {
        blobs.extend(bundle_artifacts(out, entry)?);
    }
    Ok(blobs)
}

/// The blobs (hex sha256 → size) the bundle of `entry` names, each checked present in
/// `DIR/blobs/` with its size: its artifacts' and its agent release's binaries (every
/// architecture's: the bundler does not know the device's).
pub(crate) fn bundle_artifacts(
    out: &Path,
    entry: &build::IndexEntry,
) -> Result<BTreeMap<String, u64>, MqttError> {
    let path = out.join("bundles").join(format!("{}.bundle", entry.digest));
    let bytes = std::fs::read(&path).map_err(|source| MqttError::File { path: path.clone(), source })?;
    let (_, state) = fleet_spec::bundle::open_accepted(&bytes, &fleet_spec::bundle::Limits::default())
        .map_err(|e| MqttError::Usage(format!("{}: {e} ({}); build again", path.display(), e.code())))?;
    let mut blobs: BTreeMap<String, u64> = state.artifacts.iter().map(|a| (a.sha256_hex(), a.size)).collect();
    if let Some(agent) = &state.agent {
        blobs.extend(agent.binaries.iter().map(|b| (b.sha256_hex(), b.size)));
    }
    for (sha, size) in &blobs {
        let path = out.join(build::BLOBS).join(sha);
        let len =
            std::fs::metadata(&path).map_err(|source| MqttError::File { path: path.clone(), source })?.len();
        if len != *size {
            return Err(MqttError::Usage(format!(
                "{}: {len} bytes, the bundles name {size}: the build output is damaged; build again",
                path.display()
            )));
        }
    }
    Ok(blobs)
}

/// Retains every chunk of each blob on `session`, read from `DIR/blobs/` one chunk at
/// a time, at most [`BLOB_WINDOW`] chunks unacknowledged; returns when all are
/// acknowledged (each acknowledgement within the session's timeout of the previous).
fn publish_blobs(
    session: &mut Session,
    out: &Path,
    index: &Index,
    blobs: &[(String, u64)],
) -> Result<(), MqttError> {
    let what = "waiting for PUBACKs of artifact blob chunks";
    let mut in_flight = 0usize;
    let mut deadline = Instant::now() + session.timeout;
    let mut await_ack = |session: &mut Session, in_flight: &mut usize| -> Result<(), MqttError> {
        if let Event::Incoming(Packet::PubAck(_)) = session.next(deadline, what)? {
            *in_flight -= 1;
            deadline = Instant::now() + session.timeout;
        }
        Ok(())
    };
    for (sha, size) in blobs {
        for_each_chunk(out, index, sha, *size, |topic, chunk| {
            while in_flight >= BLOB_WINDOW {
                await_ack(session, &mut in_flight)?;
            }
            session.client.publish(topic, QoS::AtLeastOnce, true, chunk).map_err(|e| MqttError::Lost {
                broker: session.broker.clone(),
                what: "queueing blob chunks".into(),
                message: e.to_string(),
            })?;
            in_flight += 1;
            Ok(())
        })?;
    }
    while in_flight > 0 {
        await_ack(session, &mut in_flight)?;
    }
    Ok(())
}

/// Calls `f` with the topic and bytes of each chunk of blob `sha256` (of `size` bytes),
/// in order, read from `DIR/blobs/` one chunk at a time.
pub(crate) fn for_each_chunk(
    out: &Path,
    index: &Index,
    sha256: &str,
    size: u64,
    mut f: impl FnMut(String, Vec<u8>) -> Result<(), MqttError>,
) -> Result<(), MqttError> {
    use std::io::Read;
    let path = out.join(build::BLOBS).join(sha256);
    let file_err = |source| MqttError::File { path: path.clone(), source };
    let mut file = std::fs::File::open(&path).map_err(file_err)?;
    for n in 0..blob_chunks(size) {
        let mut chunk = vec![0u8; blob_chunk_len(size, n) as usize];
        file.read_exact(&mut chunk).map_err(file_err)?;
        f(blob_chunk_topic(&index.topic_prefix, &index.fleet, sha256, n)?, chunk)?;
    }
    Ok(())
}

/// Reads `DIR/published.json` (an unreadable one counts as empty: everything is
/// announced again).
pub(crate) fn read_published(out: &Path) -> Published {
    match std::fs::read(out.join("published.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(_) => Published::default(),
    }
}

/// Writes `DIR/published.json` atomically.
pub(crate) fn write_published(out: &Path, published: &Published) -> Result<(), MqttError> {
    let mut json = serde_json::to_vec_pretty(published).expect("published state serializes");
    json.push(b'\n');
    build::write_atomic(&out.join("published.json"), &json, true)?;
    Ok(())
}

/// Reads the retained messages on `filter`: subscribes (QoS 0: retained messages come
/// right after the SUBACK, unthrottled) and collects until every topic in `expected` has
/// its retained message (the usual case: every device was announced before, so no
/// waiting at all), or else until nothing arrived for `settle` (MQTT 3.1.1 does not mark
/// the end of the retained messages; a device never announced has none). Unsubscribes
/// before returning, so the session's own publishes do not come back.
///
/// On several nodes (a [`Readers`] of several), every node's retained message of every
/// expected topic is awaited.
fn read_retained<V>(
    session: &mut impl Link,
    filters: &[String],
    expected: &BTreeMap<String, V>,
    settle: Duration,
    mut each: impl FnMut(&str, &[u8]),
) -> Result<(), MqttError> {
    let packets = session.subscribe_to(filters, QoS::AtMostOnce)?;
    let what = "reading the retained announcements";
    let mut retained = std::collections::BTreeSet::new();
    let all = expected.len() * session.nodes();
    let mut subacks = 0;
    let mut subscribed = false;
    let mut deadline = Instant::now() + session.wait();
    loop {
        let event = match session.next_on(deadline, what) {
            Ok(e) => e,
            Err(MqttError::Timeout { .. }) if subscribed => break,
            Err(e) => return Err(e),
        };
        let (node, event) = event;
        match event {
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    return Err(MqttError::Lost {
                        broker: session.name(),
                        what: what.into(),
                        message: format!(
                            "the broker refused the subscription to {}: publish reads the retained \
                             announcements first, so its user needs read access there (check the ACL)",
                            filters.first().map(String::as_str).unwrap_or_default()
                        ),
                    });
                }
                subacks += 1;
                subscribed = subacks == packets;
                deadline = Instant::now() + if subscribed { settle } else { session.wait() };
            }
            Event::Incoming(Packet::Publish(p)) => {
                if p.retain && !p.payload.is_empty() {
                    each(&p.topic, &p.payload);
                    if expected.contains_key(&p.topic) {
                        retained.insert((node, p.topic.clone()));
                    }
                }
                if subscribed {
                    deadline = Instant::now() + settle;
                }
            }
            _ => {}
        }
        if subscribed && retained.len() == all {
            break;
        }
    }
    session.unsubscribe_from(filters)
}

/// What [`read_retained`] needs of a connection: one [`Session`] (`publish` reads each
/// node's in turn) or [`Readers`] (`rollout` reads all nodes at once).
pub(crate) trait Link {
    /// The next event before `deadline`, with the index of the node it came from.
    fn next_on(&mut self, deadline: Instant, what: &str) -> Result<(usize, Event), MqttError>;
    /// Subscribes (every node) to `filters`; returns how many SUBACKs will come.
    fn subscribe_to(&self, filters: &[String], qos: QoS) -> Result<usize, MqttError>;
    fn unsubscribe_from(&self, filters: &[String]) -> Result<(), MqttError>;
    /// How many nodes deliver each retained message.
    fn nodes(&self) -> usize;
    /// The broker(s), for messages.
    fn name(&self) -> String;
    /// The longest wait for an answer.
    fn wait(&self) -> Duration;
}

impl Link for Session {
    fn next_on(&mut self, deadline: Instant, what: &str) -> Result<(usize, Event), MqttError> {
        self.next(deadline, what).map(|e| (0, e))
    }
    fn subscribe_to(&self, filters: &[String], qos: QoS) -> Result<usize, MqttError> {
        subscribe_chunked(self, filters, qos)
    }
    fn unsubscribe_from(&self, filters: &[String]) -> Result<(), MqttError> {
        for filter in filters {
            self.client.unsubscribe(filter).map_err(|e| lost(self, e))?;
        }
        Ok(())
    }
    fn nodes(&self) -> usize {
        1
    }
    fn name(&self) -> String {
        self.broker.clone()
    }
    fn wait(&self) -> Duration {
        self.timeout
    }
}

impl Link for Readers {
    fn next_on(&mut self, deadline: Instant, what: &str) -> Result<(usize, Event), MqttError> {
        self.next(deadline, what)
    }
    fn subscribe_to(&self, filters: &[String], qos: QoS) -> Result<usize, MqttError> {
        match &self.one {
            Some(session) => subscribe_chunked(session, filters, qos),
            None => self.subscribe(filters, qos),
        }
    }
    fn unsubscribe_from(&self, filters: &[String]) -> Result<(), MqttError> {
        if let Some(session) = &self.one {
            return session.unsubscribe_from(filters);
        }
        for (client, broker) in &self.many {
            for filter in filters {
                client.unsubscribe(filter).map_err(|e| MqttError::Lost {
                    broker: broker.clone(),
                    what: "unsubscribing".into(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(())
    }
    fn nodes(&self) -> usize {
        self.nodes()
    }
    fn name(&self) -> String {
        self.brokers()
    }
    fn wait(&self) -> Duration {
        self.timeout
    }
}

/// How many topic filters go into one SUBSCRIBE packet (exact per-device topics).
const FILTERS_PER_PACKET: usize = 100;

/// Subscribes to `filters`, [`FILTERS_PER_PACKET`] per packet; returns the number of
/// packets (each gets one SUBACK).
pub(crate) fn subscribe_chunked(session: &Session, filters: &[String], qos: QoS) -> Result<usize, MqttError> {
    let mut packets = 0;
    for chunk in filters.chunks(FILTERS_PER_PACKET) {
        let subs = chunk.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
        session.client.subscribe_many(subs).map_err(|e| lost(session, e))?;
        packets += 1;
    }
    Ok(packets)
}

/// The devices of `announcing` (topic → device, version, digest) whose retained
/// announcement on `filter` is newer than what is to be announced (see [`not_newer`]),
/// compared as the retained messages arrive (none of them is kept).
pub(crate) fn retained_not_newer(
    session: &mut impl Link,
    filters: &[String],
    announcing: &BTreeMap<String, (String, u64, String)>,
    settle: Duration,
) -> Result<Vec<NotNewer>, MqttError> {
    let mut conflicts = Vec::new();
    read_retained(session, filters, announcing, settle, |topic, payload| {
        if let Some(new) = announcing.get(topic) {
            conflicts.extend(conflict(topic, new, payload));
        }
    })?;
    Ok(conflicts)
}

/// The devices whose retained announcement (topic → payload) has a newer version than
/// the one to announce, or the same version with another bundle. Payloads that are not
/// announcements are ignored (they are hints, like every announcement).
#[cfg(test)]
fn not_newer(
    announcing: &BTreeMap<String, (String, u64, String)>,
    retained: &BTreeMap<String, Vec<u8>>,
) -> Vec<NotNewer> {
    announcing.iter().filter_map(|(topic, new)| conflict(topic, new, retained.get(topic)?)).collect()
}

/// One device's conflict: its retained announcement `payload` on `topic` is newer than
/// `(device, version, digest)`, or the same version with another bundle.
fn conflict(
    topic: &str,
    (device, version, digest): &(String, u64, String),
    payload: &[u8],
) -> Option<NotNewer> {
    let old = Announcement::from_json(payload).ok()?;
    (old.version > *version || (old.version == *version && old.digest != *digest)).then(|| NotNewer {
        device: device.clone(),
        topic: topic.to_string(),
        retained_version: old.version,
        retained_digest: old.digest,
        new_version: *version,
        new_digest: digest.clone(),
    })
}

/// One device's row in the status table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceRow {
    pub device: String,
    pub online: Option<bool>,
    /// The index's version for the device (or what the agent says it wants).
    pub desired_version: Option<u64>,
    pub desired_commit: Option<String>,
    pub applied_version: Option<u64>,
    pub applied_commit: Option<String>,
    pub state: Option<String>,
    pub last_error: Option<String>,
    /// In state `waiting`: why and until when (`window until 2026-12-07T02:00:00Z`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Seconds since the agent's last report.
    pub age: Option<i64>,
    pub report: Option<StatusReport>,
}

/// What `status` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusOutcome {
    /// Without --wait: the table was shown.
    Shown,
    Converged,
    Failed,
    Timeout,
    /// `--wait` was stopped by SIGINT (Ctrl-C).
    Interrupted,
    /// `--wait` was stopped by SIGTERM (e.g. a cancelled CI job).
    Terminated,
}

/// Which fleet to watch: `--fleet`/`--prefix`, else the index's.
pub(crate) struct Scope {
    pub index: Option<Index>,
    pub fleet: String,
    pub prefix: String,
}

impl Scope {
    pub(crate) fn resolve(
        fleet: &Option<String>,
        prefix: &Option<String>,
        index: &Option<PathBuf>,
    ) -> Result<Scope, MqttError> {
        let index = match index {
            Some(p) if p.is_dir() => {
                return Err(MqttError::Usage(format!(
                    "--index {} is a directory: pass the build's index.json ({})",
                    p.display(),
                    p.join("index.json").display()
                )))
            }
            Some(p) => Some(
                Index::read(p)?.ok_or_else(|| MqttError::Usage(format!("{} does not exist", p.display())))?,
            ),
            None => None,
        };
        let fleet = fleet
            .clone()
            .or_else(|| index.as_ref().map(|i| i.fleet.clone()))
            .ok_or_else(|| MqttError::Usage("pass --fleet NAME or --index DIR/index.json".into()))?;
        let prefix = prefix
            .clone()
            .or_else(|| index.as_ref().map(|i| i.topic_prefix.clone()))
            .unwrap_or_else(|| DEFAULT_PREFIX.into());
        // Checked here, so that a bad id is a usage error before anything connects.
        Topic::fleet_filter(&prefix, &fleet, TopicKind::Status)?;
        Ok(Scope { index, fleet, prefix })
    }
}

/// Reads the fleet's status topics and prints the table; with `--wait`, waits for
/// convergence or failure of the selected indexed devices.
pub fn status(args: &StatusArgs) -> Result<StatusOutcome, MqttError> {
    let Scope { mut index, fleet, prefix } = Scope::resolve(&args.fleet, &args.prefix, &args.index)?;
    let mut selectors = Vec::new();
    for s in &args.selectors {
        let (k, v) =
            s.split_once('=').ok_or_else(|| MqttError::Usage(format!("selector {s:?} is not key=value")))?;
        selectors.push((k.to_string(), v.to_string()));
    }
    if !selectors.is_empty() && index.is_none() {
        return Err(MqttError::Usage("--selector needs --index (labels come from the build's index)".into()));
    }
    // The devices that count: the index's (filtered), else whatever reports. Of each
    // entry, status needs the version, digest and commit; the labels (a map per device,
    // ~0.5 KB) serve the filter and are dropped once it ran, with the state digest: at
    // 100,000 devices they would be a fifth of the 256 MB status may use.
    if let Some(i) = index.as_mut() {
        i.devices.retain(|id, e| {
            (args.devices.is_empty() || args.devices.contains(id))
                && selectors.iter().all(|(k, v)| e.labels.get(k) == Some(v))
        });
        for e in i.devices.values_mut() {
            e.labels = BTreeMap::new();
            e.state_digest = String::new();
        }
    }
    let expected: Option<BTreeMap<&str, &build::IndexEntry>> =
        index.as_ref().map(|i| i.devices.iter().map(|(id, e)| (id.as_str(), e)).collect());
    if let Some(exp) = &expected {
        if exp.is_empty() && args.wait {
            return Err(MqttError::Usage(
                "no device of the index matches --device/--selector: nothing to wait for".into(),
            ));
        }
    }

    let status_filter = Topic::fleet_filter(&prefix, &fleet, TopicKind::Status)?;
    let online_filter = Topic::fleet_filter(&prefix, &fleet, TopicKind::Online)?;
    // --wait can run for minutes: Ctrl-C (or a cancelled CI job's SIGTERM) ends it as
    // interrupted, not as a timeout. 0 = no signal yet.
    let signal = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if args.wait {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)
                .map_err(MqttError::Signals)?;
        }
    }
    let rollout_topic = crate::rollout::drive::rollout_topic(&prefix, &fleet)?;
    let brokers = args.broker.all()?;
    // Several nodes (a cluster that keeps retained messages per node): each device's
    // exact topics on every node, since such a broker (RabbitMQ) also sends no retained
    // message to a wildcard filter; the index names the devices.
    let filters: Vec<String> =
        match (&expected, brokers.len()) {
            (_, 1) => vec![status_filter, online_filter, rollout_topic.clone()],
            (Some(exp), _) => {
                let mut f = Vec::with_capacity(2 * exp.len() + 1);
                for id in exp.keys() {
                    f.push(Topic::new(&prefix, &fleet, id, TopicKind::Status)?.to_string());
                    f.push(Topic::new(&prefix, &fleet, id, TopicKind::Online)?.to_string());
                }
                f.push(rollout_topic.clone());
                f
            }
            (None, _) => return Err(MqttError::Usage(
                "several --broker need --index: a broker that keeps retained messages per node (RabbitMQ) \
                 sends them only to exact topics, so status subscribes to each indexed device's topics"
                    .into(),
            )),
        };
    let mut session = Readers::connect(&args.broker, brokers, args.connect_timeout, 10)?;
    let subscriptions = session.subscribe(&filters, QoS::AtLeastOnce)?;
    drop(filters);
    let mut rollout: Option<crate::rollout::judge::RolloutState> = None;

    let mut fold = Fold::new(brokers.len());
    let started = Instant::now();
    let wait_deadline = started + args.timeout;
    let mut subacks = 0;
    let mut last_message = Instant::now();
    let mut last_progress = String::new();
    // With --wait, the expected devices are judged at most every JUDGE_EVERY while
    // messages pour in (each judgement reads them all), and whenever they pause.
    const JUDGE_EVERY: Duration = Duration::from_millis(100);
    let judged = std::cell::Cell::new(Instant::now());
    let mut unjudged = false;
    let mut verdict = |reports: &BTreeMap<String, Seen>, unjudged: &mut bool| -> Option<StatusOutcome> {
        *unjudged = false;
        judged.set(Instant::now());
        let exp = expected.as_ref()?;
        match judge(exp, reports) {
            Judgement::Converged => Some(StatusOutcome::Converged),
            Judgement::Failed => Some(StatusOutcome::Failed),
            Judgement::Pending { converged, total } => {
                let line = format!("waiting: {converged}/{total} device(s) converged");
                if line != last_progress && !args.json {
                    eprintln!("{line}");
                    last_progress = line;
                }
                None
            }
        }
    };
    let outcome = loop {
        let deadline = if args.wait {
            wait_deadline
        } else if subacks < subscriptions {
            started + session.timeout
        } else {
            (last_message + args.settle).min(started + session.timeout + args.settle)
        };
        // Waits in short slices, so that a signal is seen within a fraction of a second.
        let slice = deadline.min(Instant::now() + Duration::from_millis(200));
        let event = match session.next(slice, "reading status") {
            Ok(e) => e,
            Err(MqttError::Timeout { .. }) if signal.load(std::sync::atomic::Ordering::Relaxed) != 0 => {
                if signal.load(std::sync::atomic::Ordering::Relaxed) == signal_hook::consts::SIGTERM as usize
                {
                    break StatusOutcome::Terminated;
                }
                break StatusOutcome::Interrupted;
            }
            Err(MqttError::Timeout { .. }) if Instant::now() < deadline => {
                if unjudged {
                    if let Some(outcome) = verdict(&fold.reports, &mut unjudged) {
                        break outcome;
                    }
                }
                continue;
            }
            Err(MqttError::Timeout { .. }) if args.wait && subacks >= subscriptions => {
                match verdict(&fold.reports, &mut unjudged) {
                    Some(outcome) => break outcome,
                    None => break StatusOutcome::Timeout,
                }
            }
            Err(MqttError::Timeout { .. }) if !args.wait && subacks >= subscriptions => {
                break StatusOutcome::Shown
            }
            Err(e) => return Err(e),
        };
        let (node, event) = event;
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                subacks += 1;
                last_message = Instant::now();
            }
            Event::Incoming(Packet::Publish(p)) => {
                last_message = Instant::now();
                if p.topic == rollout_topic {
                    // Several nodes: the newest (`updated_at`), as `rollout` merges them.
                    if let Ok(r) = serde_json::from_slice(&p.payload) {
                        if brokers.len() == 1 {
                            rollout = Some(r);
                        } else {
                            crate::rollout::drive::keep_newer(&mut rollout, r);
                        }
                    } else if brokers.len() == 1 {
                        rollout = None;
                    }
                    continue;
                }
                let Ok(topic) = Topic::parse(&prefix, &p.topic) else { continue };
                if topic.fleet != fleet {
                    continue;
                }
                fold.absorb(node, topic.kind, topic.device, &p.payload);
                if args.wait {
                    unjudged = true;
                    if judged.get().elapsed() >= JUDGE_EVERY {
                        if let Some(outcome) = verdict(&fold.reports, &mut unjudged) {
                            break outcome;
                        }
                    }
                }
            }
            _ => {}
        }
    };
    session.disconnect();
    let Fold { reports, online, .. } = fold;

    if args.json {
        // Streamed row by row: a tree of every row would take ~10 KB per device. Each
        // row goes through a `Value` so that its keys come out sorted, as they always have.
        let out = StatusJson {
            devices: RowsJson {
                ids: row_ids(expected.as_ref(), &args.devices, &reports, &online),
                expected: expected.as_ref(),
                reports: &reports,
                online: &online,
                now: timefmt::now(),
            },
            fleet: &fleet,
            outcome,
            rollout: rollout.as_ref().map(|r| serde_json::to_value(r).expect("a rollout state serializes")),
        };
        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer_pretty(&mut stdout, &out)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(stdout))
            .and_then(|()| stdout.flush())
            .map_err(|source| MqttError::File { path: "stdout".into(), source })?;
    } else {
        let ids = row_ids(expected.as_ref(), &args.devices, &reports, &online);
        let now = timefmt::now();
        let rows: Vec<DeviceRow> =
            ids.into_iter().map(|id| row(id, expected.as_ref(), &reports, &online, now, false)).collect();
        print!("{}", table(&rows));
        if let Some(r) = &rollout {
            println!("{}", crate::rollout::drive::line(r));
        }
        match outcome {
            StatusOutcome::Converged => eprintln!("every selected device converged"),
            StatusOutcome::Failed => eprintln!("a device failed or rolled back on the indexed version"),
            StatusOutcome::Timeout => {
                eprintln!("timeout after {:?}: not every device converged", args.timeout)
            }
            StatusOutcome::Interrupted | StatusOutcome::Terminated => {
                eprintln!("interrupted after {:.0?}: not every device converged yet", started.elapsed())
            }
            StatusOutcome::Shown => {}
        }
    }
    Ok(outcome)
}

/// What `status` knows of the devices: each one's report and online flag, folded from
/// the messages of one or several broker nodes.
///
/// One node: the latest message wins, an empty retained message clears. Several nodes
/// (each keeps the retained messages it was given; live messages reach every node): a
/// report replaces the kept one only if its `timestamp` is not older, so the stale
/// report a node still retains for a device that moved to another node loses to the
/// device's newer one, and an empty message clears nothing (another node may hold the
/// device's report); a device is online when any node says so (the node it left holds
/// its last will, `false`, the node it is on `true`).
pub(crate) struct Fold {
    nodes: usize,
    reports: BTreeMap<String, Seen>,
    online: BTreeMap<String, bool>,
    /// Several nodes: per device, bit n set when node n last said online.
    online_nodes: BTreeMap<String, u64>,
}

impl Fold {
    pub(crate) fn new(nodes: usize) -> Fold {
        Fold { nodes, reports: BTreeMap::new(), online: BTreeMap::new(), online_nodes: BTreeMap::new() }
    }

    /// One message on a device's `kind` topic, as node `node` delivered it.
    pub(crate) fn absorb(&mut self, node: usize, kind: TopicKind, device: String, payload: &[u8]) {
        match kind {
            TopicKind::Status => {
                if let Ok(r) = StatusReport::from_json(payload) {
                    if self.nodes == 1 {
                        self.reports.insert(device, Seen::new(&r, payload));
                    } else if replaces(
                        self.reports.get(&device).and_then(Seen::report).map(|kept| kept.timestamp),
                        r.timestamp,
                    ) {
                        // An equal timestamp: the later message (reports in one second).
                        // The kept report is parsed again rather than its timestamp kept
                        // beside it: one broker's `status` keeps its memory (BENCHMARKS.md).
                        self.reports.insert(device, Seen::new(&r, payload));
                    }
                } else if payload.is_empty() && self.nodes == 1 {
                    self.reports.remove(&device);
                }
            }
            TopicKind::Online => {
                let says = payload == b"true";
                if self.nodes == 1 {
                    self.online.insert(device, says);
                } else {
                    let bits = self.online_nodes.entry(device.clone()).or_default();
                    let bit = 1u64 << node.min(63);
                    if says {
                        *bits |= bit;
                    } else {
                        *bits &= !bit;
                    }
                    let any = *bits != 0;
                    self.online.insert(device, any);
                }
            }
            _ => {}
        }
    }
}

/// Several nodes: whether a device's report stamped `timestamp` replaces the one kept
/// (stamped `kept`, if any): when it is not older. An equal timestamp: the later message
/// (reports within one second). `status` and `rollout` merge the nodes by this rule.
pub(crate) fn replaces(kept: Option<i64>, timestamp: i64) -> bool {
    kept.is_none_or(|kept| timestamp >= kept)
}

/// `status`'s and `rollout`'s connections: one session read in this thread (as it always was), or one
/// per node, each read by a thread of its own into one channel, every event tagged with
/// its node.
pub(crate) struct Readers {
    one: Option<Session>,
    many: Vec<(Client, String)>,
    rx: Option<std::sync::mpsc::Receiver<(usize, Result<Event, MqttError>)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub(crate) timeout: Duration,
}

impl Readers {
    /// Connects to every broker; `capacity`: requests each client queues (publishes
    /// not yet sent).
    pub(crate) fn connect(
        args: &BrokerArgs,
        brokers: &[String],
        timeout: Duration,
        capacity: usize,
    ) -> Result<Readers, MqttError> {
        if let [one] = brokers {
            let session = Session::connect_to(args, one, 0, timeout, capacity)?;
            return Ok(Readers {
                one: Some(session),
                many: Vec::new(),
                rx: None,
                threads: Vec::new(),
                timeout,
            });
        }
        let mut sessions = Vec::with_capacity(brokers.len());
        for (node, broker) in brokers.iter().enumerate() {
            sessions.push(Session::connect_to(args, broker, node, timeout, capacity)?);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);
        let mut many = Vec::new();
        let mut threads = Vec::new();
        for (node, mut session) in sessions.into_iter().enumerate() {
            many.push((session.client.clone(), session.broker.clone()));
            let tx = tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("mqtt-node-{node}"))
                .spawn(move || loop {
                    let event = session.next(Instant::now() + Duration::from_secs(3600), "reading status");
                    if matches!(event, Err(MqttError::Timeout { .. })) {
                        continue; // a quiet hour: the caller keeps its own deadlines
                    }
                    let end =
                        event.is_err() || matches!(event, Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)));
                    if tx.send((node, event)).is_err() || end {
                        break;
                    }
                })
                .map_err(|e| MqttError::Lost {
                    broker: brokers[node].clone(),
                    what: "starting a reader thread".into(),
                    message: e.to_string(),
                })?;
            threads.push(thread);
        }
        Ok(Readers { one: None, many, rx: Some(rx), threads, timeout })
    }

    /// Subscribes every node to `filters`; returns how many SUBACKs will come.
    pub(crate) fn subscribe(&self, filters: &[String], qos: QoS) -> Result<usize, MqttError> {
        if let Some(session) = &self.one {
            for f in filters {
                session.client.subscribe(f.clone(), qos).map_err(|e| lost(session, e))?;
            }
            return Ok(filters.len());
        }
        let mut packets = 0;
        for (client, broker) in &self.many {
            for chunk in filters.chunks(FILTERS_PER_PACKET) {
                let subs = chunk.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
                client.subscribe_many(subs).map_err(|e| MqttError::Lost {
                    broker: broker.clone(),
                    what: "subscribing".into(),
                    message: e.to_string(),
                })?;
                packets += 1;
            }
        }
        Ok(packets)
    }

    /// How many nodes (connections).
    pub(crate) fn nodes(&self) -> usize {
        if self.one.is_some() {
            1
        } else {
            self.many.len()
        }
    }

    /// The brokers, for messages.
    pub(crate) fn brokers(&self) -> String {
        match &self.one {
            Some(session) => session.broker.clone(),
            None => self.many.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Publishes a retained QoS 1 message on every node; returns how many PUBACKs will
    /// come (one per node, each node acknowledging its own copy).
    pub(crate) fn publish_retained(&self, topic: String, payload: Vec<u8>) -> Result<usize, MqttError> {
        let failed = |broker: &str, e: rumqttc::ClientError| MqttError::Lost {
            broker: broker.to_string(),
            what: "publishing".into(),
            message: e.to_string(),
        };
        if let Some(session) = &self.one {
            session
                .client
                .publish(topic, QoS::AtLeastOnce, true, payload)
                .map_err(|e| failed(&session.broker, e))?;
            return Ok(1);
        }
        for (client, broker) in &self.many {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, true, payload.clone())
                .map_err(|e| failed(broker, e))?;
        }
        Ok(self.many.len())
    }

    /// The next event of any node before `deadline`, with its node.
    pub(crate) fn next(&mut self, deadline: Instant, what: &str) -> Result<(usize, Event), MqttError> {
        if let Some(session) = &mut self.one {
            return session.next(deadline, what).map(|e| (0, e));
        }
        let brokers = || self.brokers();
        let timeout = MqttError::Timeout { broker: brokers(), timeout: self.timeout, what: what.into() };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timeout);
        }
        let rx = self.rx.as_ref().expect("several nodes have a channel");
        match rx.recv_timeout(remaining) {
            Ok((node, Ok(event))) => Ok((node, event)),
            Ok((_, Err(e))) => Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(timeout),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(MqttError::Lost { broker: brokers(), what: what.into(), message: "disconnected".into() })
            }
        }
    }

    pub(crate) fn disconnect(self) {
        if let Some(session) = self.one {
            return session.disconnect();
        }
        for (client, _) in &self.many {
            let _ = client.disconnect();
        }
        // The readers end at their DISCONNECT (or error); the channel is drained so
        // none waits on a full one.
        let rx = self.rx;
        let deadline = Instant::now() + Duration::from_millis(500);
        for thread in self.threads {
            while !thread.is_finished() && Instant::now() < deadline {
                if let Some(rx) = &rx {
                    let _ = rx.recv_timeout(Duration::from_millis(10));
                }
            }
        }
    }
}

pub(crate) fn lost(session: &Session, e: rumqttc::ClientError) -> MqttError {
    MqttError::Lost { broker: session.broker.clone(), what: "subscribing".into(), message: e.to_string() }
}

/// A device's last status report as `status` keeps it: what `--wait` judges, and the
/// message itself, parsed again when its row is printed. A parsed report takes about
/// 1.4 KB of heap, the message about 0.4 KB: at 100,000 devices, the difference between
/// fitting in 256 MB or not (BENCHMARKS.md).
struct Seen {
    state: DeviceState,
    /// Version and digest.
    applied: Option<(u64, Box<str>)>,
    desired: Option<(u64, Box<str>)>,
    raw: Box<[u8]>,
}

impl Seen {
    fn new(r: &StatusReport, raw: &[u8]) -> Seen {
        Seen {
            state: r.state,
            applied: r.applied.as_ref().map(|a| (a.version, a.digest.as_str().into())),
            desired: r.desired.as_ref().map(|d| (d.version, d.digest.as_str().into())),
            raw: raw.into(),
        }
    }

    /// The report again (it parsed when it arrived).
    fn report(&self) -> Option<StatusReport> {
        StatusReport::from_json(&self.raw).ok()
    }
}

enum Judgement {
    Converged,
    Failed,
    Pending { converged: usize, total: usize },
}

/// Converged: every expected device applied its indexed version and is `converged`.
/// Failed: some expected device is `failed`/`rolled_back` while wanting (or having
/// tried) its indexed version.
fn judge(expected: &BTreeMap<&str, &build::IndexEntry>, reports: &BTreeMap<String, Seen>) -> Judgement {
    let mut converged = 0;
    for (id, entry) in expected {
        let Some(r) = reports.get(*id) else { continue };
        let applied = r.applied.as_ref().is_some_and(|(v, d)| *v == entry.version && **d == *entry.digest);
        if applied && r.state == DeviceState::Converged {
            converged += 1;
            continue;
        }
        let tried = r.desired.as_ref().is_some_and(|(v, d)| *v == entry.version || **d == *entry.digest);
        if tried && matches!(r.state, DeviceState::Failed | DeviceState::RolledBack) {
            return Judgement::Failed;
        }
    }
    if converged == expected.len() {
        Judgement::Converged
    } else {
        Judgement::Pending { converged, total: expected.len() }
    }
}

/// The devices of the table, in order: the index's (filtered), else whatever reports.
fn row_ids<'a>(
    expected: Option<&BTreeMap<&'a str, &build::IndexEntry>>,
    only: &[String],
    reports: &'a BTreeMap<String, Seen>,
    online: &'a BTreeMap<String, bool>,
) -> Vec<&'a str> {
    match expected {
        Some(e) => e.keys().copied().collect(),
        None => {
            let mut all: Vec<&str> = reports.keys().chain(online.keys()).map(String::as_str).collect();
            all.sort_unstable();
            all.dedup();
            all.retain(|d| only.is_empty() || only.iter().any(|o| o == d));
            all
        }
    }
}

/// One device's row; `with_report`: with a copy of its report (only `--json` shows it).
fn row(
    id: &str,
    expected: Option<&BTreeMap<&str, &build::IndexEntry>>,
    reports: &BTreeMap<String, Seen>,
    online: &BTreeMap<String, bool>,
    now: i64,
    with_report: bool,
) -> DeviceRow {
    let parsed = reports.get(id).and_then(Seen::report);
    let r = parsed.as_ref();
    let entry = expected.and_then(|e| e.get(id));
    let mut row = DeviceRow {
        online: online.get(id).copied(),
        desired_version: entry
            .map(|e| e.version)
            .or_else(|| r.and_then(|r| r.desired.as_ref().map(|d| d.version))),
        desired_commit: entry
            .map(|e| e.commit.clone())
            .or_else(|| r.and_then(|r| r.desired.as_ref().map(|d| d.commit.clone()))),
        applied_version: r.and_then(|r| r.applied.as_ref().map(|a| a.version)),
        applied_commit: r.and_then(|r| r.applied.as_ref().map(|a| a.commit.clone())),
        state: r.map(|r| r.state.as_str().to_string()),
        waiting: r.and_then(|r| r.waiting.as_ref()).map(waiting_text),
        last_error: r.and_then(|r| r.last_error.as_ref().map(|e| format!("{}: {}", e.code, e.message))),
        age: r.map(|r| now - r.timestamp),
        report: None,
        device: id.to_string(),
    };
    if with_report {
        row.report = parsed;
    }
    row
}

/// `status --json`, its keys in sorted order (as a `serde_json::Value` has them).
#[derive(Serialize)]
struct StatusJson<'a> {
    devices: RowsJson<'a>,
    fleet: &'a str,
    outcome: StatusOutcome,
    rollout: Option<serde_json::Value>,
}

/// The rows, each made and serialized when its turn comes.
struct RowsJson<'a> {
    ids: Vec<&'a str>,
    expected: Option<&'a BTreeMap<&'a str, &'a build::IndexEntry>>,
    reports: &'a BTreeMap<String, Seen>,
    online: &'a BTreeMap<String, bool>,
    now: i64,
}

impl Serialize for RowsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = serializer.serialize_seq(Some(self.ids.len()))?;
        for id in &self.ids {
            let row = row(id, self.expected, self.reports, self.online, self.now, true);
            seq.serialize_element(&serde_json::to_value(&row).map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

/// `window until 2026-12-07T02:00:00Z`, `lock` (no bound), for a `waiting` device.
fn waiting_text(w: &fleet_spec::messages::Waiting) -> String {
    let reason = match w.reason {
        fleet_spec::messages::WaitReason::Window => "window",
        fleet_spec::messages::WaitReason::Lock => "lock",
    };
    match w.until {
        Some(until) => format!("{reason} until {}", timefmt::rfc3339(until)),
        None => reason.to_string(),
    }
}

fn table(rows: &[DeviceRow]) -> String {
    let short =
        |c: &Option<String>| c.as_deref().map(|c| c[..c.len().min(8)].to_string()).unwrap_or_default();
    let version = |v: Option<u64>, c: &Option<String>| match v {
        Some(v) => format!("{v} {}", short(c)),
        None => "-".into(),
    };
    let mut lines = vec![[
        "DEVICE".to_string(),
        "ONLINE".into(),
        "DESIRED".into(),
        "APPLIED".into(),
        "STATE".into(),
        "AGE".into(),
        "LAST ERROR".into(),
    ]];
    for r in rows {
        lines.push([
            r.device.clone(),
            match r.online {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "?".into(),
            },
            version(r.desired_version, &r.desired_commit),
            version(r.applied_version, &r.applied_commit),
            match (&r.state, &r.waiting) {
                (Some(s), Some(w)) => format!("{s} ({w})"),
                (Some(s), None) => s.clone(),
                (None, _) => "no report".into(),
            },
            r.age.map(timefmt::age).unwrap_or_else(|| "-".into()),
            r.last_error.clone().unwrap_or_default(),
        ]);
    }
    let mut widths = [0usize; 7];
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_older_retained_version_or_the_same_bundle_may_be_announced_over() {
        let topic = "fleet/acme/devices/d/desired".to_string();
        let announcing: BTreeMap<_, _> = [(topic.clone(), ("d".to_string(), 10, "a".repeat(64)))].into();
        let retained = |version: u64, digest: &str| -> BTreeMap<String, Vec<u8>> {
            let a = Announcement {
                fleet: "acme".into(),
                device: "d".into(),
                version,
                commit: "c".into(),
                digest: digest.into(),
                size: 1,
                urls: Vec::new(),
                mqtt_blob: false,
            };
            [(topic.clone(), a.to_json())].into()
        };
        assert!(not_newer(&announcing, &BTreeMap::new()).is_empty(), "nothing retained");
        assert!(not_newer(&announcing, &retained(9, &"b".repeat(64))).is_empty(), "older");
        assert!(
            not_newer(&announcing, &retained(10, &"a".repeat(64))).is_empty(),
            "the same announcement again"
        );
        let same_version = not_newer(&announcing, &retained(10, &"c".repeat(64)));
        assert_eq!(same_version.len(), 1);
        assert!(same_version[0].to_string().contains("the same version with other content"));
        let newer = not_newer(&announcing, &retained(11, &"d".repeat(64)));
        assert_eq!((newer[0].retained_version, newer[0].new_version), (11, 10));
        let garbage: BTreeMap<String, Vec<u8>> = [(topic.clone(), b"not json".to_vec())].into();
        assert!(not_newer(&announcing, &garbage).is_empty(), "not an announcement: a hint, ignored");
    }

    fn report(state: DeviceState, version: u64, timestamp: i64) -> Vec<u8> {
        StatusReport {
            device: "d1".into(),
            fleet: "acme".into(),
            agent_version: "0".into(),
            state,
            desired: None,
            applied: Some(fleet_spec::messages::Applied {
                version,
                digest: "a".repeat(64),
                commit: "c".repeat(40),
                at: timestamp,
            }),
            containers: Vec::new(),
            files: Default::default(),
            last_error: None,
            waiting: None,
            agent_update: None,
            timestamp,
        }
        .to_json()
    }

    fn kept(fold: &Fold) -> Option<(u64, i64)> {
        fold.reports
            .get("d1")
            .and_then(Seen::report)
            .map(|r| (r.applied.map_or(0, |a| a.version), r.timestamp))
    }

    #[test]
    fn several_nodes_the_newest_report_wins_whatever_the_order() {
        let mut fold = Fold::new(3);
        // The device moved from node 0 to node 1: node 1's report is newer.
        fold.absorb(1, TopicKind::Status, "d1".into(), &report(DeviceState::Converged, 2, 200));
        fold.absorb(0, TopicKind::Status, "d1".into(), &report(DeviceState::Converged, 1, 100));
        assert_eq!(kept(&fold), Some((2, 200)), "a stale report of the node it left arrived last");
        // The same live report, delivered by every node: no change.
        fold.absorb(2, TopicKind::Status, "d1".into(), &report(DeviceState::Converged, 2, 200));
        assert_eq!(kept(&fold), Some((2, 200)));
        // Two reports within one second: the later message wins.
        fold.absorb(1, TopicKind::Status, "d1".into(), &report(DeviceState::Applying, 3, 200));
        assert_eq!(fold.reports["d1"].state, DeviceState::Applying);
    }

    #[test]
    fn several_nodes_garbage_and_empty_messages_clear_nothing() {
        let mut fold = Fold::new(2);
        fold.absorb(0, TopicKind::Status, "d1".into(), &report(DeviceState::Converged, 2, 200));
        for hostile in [&b""[..], b"not json", b"{\"timestamp\": 999999999999}", &[0xff; 64]] {
            fold.absorb(1, TopicKind::Status, "d1".into(), hostile);
            assert_eq!(kept(&fold), Some((2, 200)), "{:?}", String::from_utf8_lossy(hostile));
        }
        // One node: an empty retained message clears, as it always did.
        let mut one = Fold::new(1);
        one.absorb(0, TopicKind::Status, "d1".into(), &report(DeviceState::Converged, 2, 200));
        one.absorb(0, TopicKind::Status, "d1".into(), &report(DeviceState::Converged, 1, 100));
        assert_eq!(kept(&one), Some((1, 100)), "one node: the latest message, whatever its timestamp");
        one.absorb(0, TopicKind::Status, "d1".into(), b"");
        assert_eq!(kept(&one), None);
    }

    #[test]
    fn several_nodes_online_when_any_node_says_so() {
        let mut fold = Fold::new(3);
        fold.absorb(0, TopicKind::Online, "d1".into(), b"false"); // the will on the node it left
        fold.absorb(1, TopicKind::Online, "d1".into(), b"true");
        fold.absorb(2, TopicKind::Online, "d1".into(), b"garbage");
        assert_eq!(fold.online.get("d1"), Some(&true));
        fold.absorb(1, TopicKind::Online, "d1".into(), b"false"); // its will, live on every node
        assert_eq!(fold.online.get("d1"), Some(&false));
        // A node index beyond 63 (refused by --broker's limit) still folds somewhere.
        fold.absorb(99, TopicKind::Online, "d1".into(), b"true");
        assert_eq!(fold.online.get("d1"), Some(&true));
    }

    #[test]
    fn several_brokers_are_checked_and_the_exporter_takes_one() {
        let args = |urls: &[&str]| BrokerArgs {
            broker: urls.iter().map(|u| u.to_string()).collect(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            client_id: None,
        };
        let two = args(&["mqtt://a:1883", "mqtt://b:1883"]);
        assert_eq!(two.all().expect("two nodes").len(), 2);
        let refused = two.single("exporter").expect_err("the exporter takes one");
        assert!(refused.to_string().contains("exporter takes one --broker"), "{refused}");
        assert!(
            matches!(args(&["mqtt://a", "mqtt://a"]).all(), Err(MqttError::Usage(m)) if m.contains("twice"))
        );
        assert!(matches!(args(&["mqtt://a", "http://b"]).all(), Err(MqttError::Url(_))));
        let many: Vec<String> = (0..=MAX_BROKERS).map(|i| format!("mqtt://n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(args(&many).all(), Err(MqttError::Usage(m)) if m.contains("at most")));
        assert_eq!(args(&["mqtt://a"]).single("exporter").expect("one"), "mqtt://a");
    }

    #[test]
    fn broker_urls() {
        let u = parse_url("mqtt://127.0.0.1:18830").expect("valid");
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 18830));
        let u = parse_url("mqtts://broker.example").expect("valid");
        assert_eq!((u.tls, u.port), (true, 8883));
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
    }
}
