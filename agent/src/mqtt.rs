//! The MQTT adapter (rumqttc): announcements in, status and events out.
//!
//! Two tasks:
//! - the *pump* owns the rumqttc event loop and is the only one polling it (its
//!   cancellation safety is not documented, so it is never raced in a `select!`); it
//!   hands the device's `desired` and `bundle` messages to the [`Inbox`] and forwards
//!   connection changes, and sleeps with exponential backoff plus jitter between failed
//!   connection attempts. Inbound is bounded whatever the broker sends: the inbox keeps
//!   the latest message per topic (a flood is one message, not a queue), an announcement
//!   over 16 KiB is dropped, a bundle payload is taken only while the agent waits for
//!   one (`want_blob`), and an artifact blob's chunk only on the one chunk topic the
//!   agent asked for (`want_chunk`), at most [`BLOB_CHUNK`] bytes;
//! - the *publisher* takes the agent's [`Report`]s: events go out at once (QoS 1, not
//!   retained), status reports through the [`StatusLimiter`] (retained, on change, a
//!   burst of a few, then one per `status_min_interval`, always the last). On every (re)connection it
//!   publishes `online = true` (retained; the last will says `false`), subscribes again
//!   (clean session), and republishes the newest status.
//!
//! With the broker down nothing here blocks the agent: reports that cannot be queued
//! are dropped, the newest status is kept and sent on reconnection. This module never
//! interprets a message beyond routing it by topic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_spec::messages::MAX_ANNOUNCEMENT_LEN;
use fleet_spec::messages::{OFFLINE, ONLINE};
use fleet_spec::topic::{Topic, TopicKind, BLOB_CHUNK};
use rumqttc::{
    AsyncClient, Event, Incoming, LastWill, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::agent::Report;
use crate::config::MqttConfig;
use crate::status::StatusLimiter;
use crate::tls::TlsError;

/// What the broker sends the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Payload of the retained announcement on `.../desired`.
    Desired(Vec<u8>),
    /// Payload of the retained bundle on `.../bundle`.
    Bundle(Vec<u8>),
    /// A chunk of an artifact blob, from the topic [`Mqtt::want_chunk`] asked for.
    Chunk { topic: String, bytes: Vec<u8> },
}

/// What the broker sent last on each of the device's inbound topics. Latest wins: a
/// message that arrives before the agent read the previous one replaces it.
pub struct Inbox {
    desired: watch::Receiver<Option<Vec<u8>>>,
    bundle: watch::Receiver<Option<Vec<u8>>>,
    chunk: watch::Receiver<Chunk>,
}

struct InboxSender {
    desired: watch::Sender<Option<Vec<u8>>>,
    bundle: watch::Sender<Option<Vec<u8>>>,
    /// Shared with [`Mqtt`], which empties it when the wanted chunk changes: a chunk
    /// read is not kept in memory until the next one.
    chunk: Arc<watch::Sender<Chunk>>,
}

/// The last blob chunk taken: (topic, payload).
type Chunk = Option<(String, Vec<u8>)>;

fn inbox() -> (InboxSender, Inbox) {
    let (desired_tx, desired) = watch::channel(None);
    let (bundle_tx, bundle) = watch::channel(None);
    let (chunk_tx, chunk) = watch::channel(None);
    (
        InboxSender { desired: desired_tx, bundle: bundle_tx, chunk: Arc::new(chunk_tx) },
        Inbox { desired, bundle, chunk },
    )
}

impl Inbox {
    /// An inbox nothing is ever sent to (no broker configured).
    pub fn none() -> Inbox {
        let (tx, rx) = inbox();
        // Keep the senders alive for the process: a closed channel would end `recv`.
        std::mem::forget(tx);
        rx
    }

    /// The next message, the latest of its topic; pending for ever once the MQTT
    /// session is gone.
    pub async fn recv(&mut self) -> Inbound {
        loop {
            tokio::select! {
                r = self.desired.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                    if let Some(m) = self.desired.borrow_and_update().clone() {
                        return Inbound::Desired(m);
                    }
                }
                r = self.bundle.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                    if let Some(m) = self.bundle.borrow_and_update().clone() {
                        return Inbound::Bundle(m);
                    }
                }
                r = self.chunk.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                    if let Some((topic, bytes)) = self.chunk.borrow_and_update().clone() {
                        return Inbound::Chunk { topic, bytes };
                    }
                }
            }
        }
    }
}

/// The device's topics.
#[derive(Debug, Clone)]
pub struct Topics {
    pub desired: String,
    pub status: String,
    pub online: String,
    pub events: String,
    pub bundle: String,
}

impl Topics {
    pub fn new(prefix: &str, fleet: &str, device: &str) -> Result<Topics, fleet_spec::topic::TopicError> {
        let t = |kind| Topic::new(prefix, fleet, device, kind).map(|t| t.to_string());
        Ok(Topics {
            desired: t(TopicKind::Desired)?,
            status: t(TopicKind::Status)?,
            online: t(TopicKind::Online)?,
            events: t(TopicKind::Events)?,
            bundle: t(TopicKind::Bundle)?,
        })
    }
}

/// Exponential backoff with jitter: `min(cap, base·2ⁿ)`, scaled by a random factor in
/// [0.5, 1.0) so a fleet that lost its broker does not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        Backoff { base, cap, attempt: 0, rng: seed | 1 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.cap);
        // xorshift64: jitter needs no cryptographic randomness.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = 0.5 + (self.rng % 1000) as f64 / 2000.0;
        ceiling.mul_f64(fraction)
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// What the agent waits for beyond its announcements (shared by the agent's calls, the
/// pump's routing and the resubscription on reconnection).
#[derive(Default)]
struct Wants {
    /// The retained bundle (`want_blob`).
    blob: AtomicBool,
    /// The one blob chunk topic subscribed to, if any (`want_chunk`).
    chunk: Mutex<Option<String>>,
    /// The broker acknowledged a publish of this session (the online flag or a status):
    /// the agent reaches it and reports (a new agent's trial asks for it).
    acked: AtomicBool,
}

impl Wants {
    fn is_chunk(&self, topic: &str) -> bool {
        self.chunk.lock().expect("wants lock").as_deref() == Some(topic)
    }
}

enum Ctl {
    Connected,
    Disconnected,
}

/// A running MQTT session.
pub struct Mqtt {
    client: AsyncClient,
    topics: Topics,
    wants: Arc<Wants>,
    chunk_tx: Arc<watch::Sender<Chunk>>,
    pump: JoinHandle<()>,
    publisher: JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Builds the rumqttc options: client id, keepalive, credentials, last will, TLS.
pub fn options(cfg: &MqttConfig, topics: &Topics, max_incoming: usize) -> Result<MqttOptions, TlsError> {
    let mut opts = base_options(cfg, &cfg.client_id, max_incoming)?;
    opts.set_last_will(LastWill::new(&topics.online, OFFLINE.to_vec(), QoS::AtLeastOnce, true));
    Ok(opts)
}

/// The options every connection of this device shares (keepalive, clean session,
/// credentials, TLS), under `client_id` and without a last will: `fleet-agent enroll`
/// connects so, beside a running agent.
pub fn base_options(cfg: &MqttConfig, client_id: &str, max_incoming: usize) -> Result<MqttOptions, TlsError> {
    let mut opts = MqttOptions::new(client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(cfg.keepalive);
    opts.set_clean_session(true);
    opts.set_max_packet_size(max_incoming, 256 * 1024);
    if let Some(user) = &cfg.username {
        opts.set_credentials(user, cfg.password.clone().unwrap_or_default());
    }
    if cfg.tls {
        let client = cfg.client_cert.as_deref().zip(cfg.client_key.as_deref());
        let config = crate::tls::client_config(cfg.ca_file.as_deref(), client)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    Ok(opts)
}

/// The socket options of the session. TCP_NODELAY: small packets go one after another
/// (status, events); without it each waits for the broker's delayed ACK of the previous
/// one (~40 ms each). A connection attempt (TCP, TLS, CONNECT → CONNACK) may take as long
/// as the keep-alive (rumqttc's default is 5 s): a broker that just restarted takes every
/// device's handshake at once, and 10,000 agents measured here saw attempts time out
/// after 5 s in the queue, be abandoned after the broker had done the work, and retried,
/// adding to the queue that made them late (BENCHMARKS.md, "10,000 agents").
pub(crate) fn network_options(keepalive: Duration) -> rumqttc::NetworkOptions {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(keepalive.as_secs().max(5));
    network
}

impl Mqtt {
    /// Starts the session. `reports` is the agent's report channel; inbound messages
    /// arrive on the returned receiver.
    pub fn start(
        cfg: &MqttConfig,
        topics: Topics,
        reports: UnboundedReceiver<Report>,
        status_min_interval: Duration,
        max_incoming: usize,
    ) -> Result<(Mqtt, Inbox), TlsError> {
        let opts = options(cfg, &topics, max_incoming)?;
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // Small packets, sent one after another (status, events): without TCP_NODELAY
        // each waits for the broker's delayed ACK of the previous one (~40 ms each).
        eventloop.set_network_options(network_options(cfg.keepalive));
        let (in_tx, in_rx) = inbox();
        let chunk_tx = in_tx.chunk.clone();
        let (ctl_tx, ctl_rx) = unbounded_channel();
        let wants: Arc<Wants> = Arc::default();
        let pump_wants = wants.clone();
        let reconnect_max = cfg.reconnect_max;
        let broker = format!("{}:{}", cfg.host, cfg.port);

        let pump_topics = topics.clone();
        let pump = tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(500), reconnect_max, seed());
            let mut connected = false;
            let mut last_error: Option<String> = None;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        backoff.reset();
                        connected = true;
                        last_error = None;
                        tracing::info!(%broker, "connected to the MQTT broker");
                        let _ = ctl_tx.send(Ctl::Connected);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if p.topic == pump_topics.desired {
                            if p.payload.len() > MAX_ANNOUNCEMENT_LEN {
                                tracing::warn!(
                                    bytes = p.payload.len(),
                                    "dropping an announcement over {MAX_ANNOUNCEMENT_LEN} bytes"
                                );
                                continue;
                            }
                            in_tx.desired.send_replace(Some(p.payload.to_vec()));
                        } else if p.topic == pump_topics.bundle {
                            if !pump_wants.blob.load(Ordering::SeqCst) {
                                tracing::debug!("dropping a bundle payload nobody waits for");
                                continue;
                            }
                            in_tx.bundle.send_replace(Some(p.payload.to_vec()));
                        } else if pump_wants.is_chunk(&p.topic) {
                            if p.payload.len() as u64 > BLOB_CHUNK {
                                tracing::warn!(
                                    topic = p.topic,
                                    bytes = p.payload.len(),
                                    "dropping a blob chunk over {BLOB_CHUNK} bytes"
                                );
                                continue;
                            }
                            in_tx.chunk.send_replace(Some((p.topic.clone(), p.payload.to_vec())));
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        pump_wants.acked.store(true, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        tracing::debug!("MQTT disconnect sent");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Said once at WARN, then again only when it changes (connected
                        // again, another error): a broker down for hours is one line.
                        let error = e.to_string();
                        if connected {
                            tracing::warn!(%broker, error, "MQTT connection lost; reconnecting");
                            let _ = ctl_tx.send(Ctl::Disconnected);
                        } else if last_error.as_deref() != Some(error.as_str()) {
                            tracing::warn!(%broker, error, "MQTT broker unreachable; retrying (said again only when this changes)");
                        } else {
                            tracing::debug!(%broker, error, "MQTT connection failed again");
                        }
                        last_error = Some(error);
                        connected = false;
                        let delay = backoff.next_delay();
                        tracing::debug!(?delay, "reconnecting to the MQTT broker later");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        });

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let publisher = tokio::spawn(publisher(
            client.clone(),
            topics.clone(),
            wants.clone(),
            reports,
            ctl_rx,
            stop_rx,
            status_min_interval,
        ));
        Ok((Mqtt { client, topics, wants, chunk_tx, pump, publisher, stop: Some(stop_tx) }, in_rx))
    }

    /// Whether the broker acknowledged a publish (the online flag, a status) since the
    /// start.
    pub fn acknowledged(&self) -> bool {
        self.wants.acked.load(Ordering::SeqCst)
    }

    /// Subscribes to (or leaves) the retained bundle topic.
    pub fn want_blob(&self, want: bool) {
        if self.wants.blob.swap(want, Ordering::SeqCst) != want {
            let r = if want {
                self.client.try_subscribe(&self.topics.bundle, QoS::AtLeastOnce)
            } else {
                self.client.try_unsubscribe(&self.topics.bundle)
            };
            if let Err(e) = r {
                tracing::debug!("bundle topic (un)subscribe queued for reconnection: {e}");
            }
        }
    }

    /// Subscribes to exactly `topic` (a blob chunk's), leaving the one subscribed before;
    /// `None` leaves it. Only that topic's payloads reach the inbox.
    pub fn want_chunk(&self, topic: Option<String>) {
        let mut current = self.wants.chunk.lock().expect("wants lock");
        if *current == topic {
            return;
        }
        // Before the pump may take the new topic's chunk (the lock is held): drops the
        // chunk already read.
        self.chunk_tx.send_replace(None);
        let previous = std::mem::replace(&mut *current, topic.clone());
        drop(current);
        if let Some(previous) = previous {
            if let Err(e) = self.client.try_unsubscribe(previous) {
                tracing::debug!("blob chunk unsubscribe not queued: {e}");
            }
        }
        if let Some(topic) = topic {
            if let Err(e) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
                tracing::debug!("blob chunk subscribe queued for reconnection: {e}");
            }
        }
    }

    /// Publishes the last status and `online = false`, disconnects, and waits (at most
    /// `grace`) for that to reach the broker.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(grace, &mut self.publisher).await;
        if tokio::time::timeout(grace, &mut self.pump).await.is_err() {
            self.pump.abort();
        }
        self.publisher.abort();
    }
}

async fn publisher(
    client: AsyncClient,
    topics: Topics,
    wants: Arc<Wants>,
    mut reports: UnboundedReceiver<Report>,
    mut ctl: UnboundedReceiver<Ctl>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    min_interval: Duration,
) {
    let mut limiter = StatusLimiter::new(min_interval);
    let publish_status = |report: &fleet_spec::messages::StatusReport| {
        if let Err(e) = client.try_publish(&topics.status, QoS::AtLeastOnce, true, report.to_json()) {
            tracing::debug!("status not queued: {e}");
        }
    };
    loop {
        let due = limiter.due_at();
        tokio::select! {
            _ = &mut stop => break,
            c = ctl.recv() => match c {
                Some(Ctl::Connected) => {
                    let _ = client.try_subscribe(&topics.desired, QoS::AtLeastOnce);
                    if wants.blob.load(Ordering::SeqCst) {
                        let _ = client.try_subscribe(&topics.bundle, QoS::AtLeastOnce);
                    }
                    if let Some(chunk) = wants.chunk.lock().expect("wants lock").clone() {
                        let _ = client.try_subscribe(chunk, QoS::AtLeastOnce);
                    }
                    let _ = client.try_publish(&topics.online, QoS::AtLeastOnce, true, ONLINE.to_vec());
                    if let Some(latest) = limiter.latest() {
                        publish_status(latest);
                    }
                    limiter.sent_latest(Instant::now());
                }
                Some(Ctl::Disconnected) => {}
                None => break,
            },
            r = reports.recv() => match r {
                Some(Report::Status(s)) => {
                    if let Some(s) = limiter.offer(s, Instant::now()) {
                        publish_status(&s);
                    }
                }
                Some(Report::Event(e)) => {
                    if let Err(err) = client.try_publish(&topics.events, QoS::AtLeastOnce, false, e.to_json()) {
                        tracing::debug!("event not queued: {err}");
                    }
                }
                None => break,
            },
            _ = sleep_until_opt(due), if due.is_some() => {
                if let Some(s) = limiter.take_due(Instant::now()) {
                    publish_status(&s);
                }
            }
        }
    }
    // Drain what the agent said last, then say goodbye.
    while let Ok(r) = reports.try_recv() {
        match r {
            Report::Status(s) => {
                limiter.offer(s, Instant::now());
            }
            Report::Event(e) => {
                let _ = client.try_publish(&topics.events, QoS::AtLeastOnce, false, e.to_json());
            }
        }
    }
    if let Some(latest) = limiter.latest() {
        publish_status(latest);
    }
    let _ = client.try_publish(&topics.online, QoS::AtLeastOnce, true, OFFLINE.to_vec());
    let _ = client.try_disconnect();
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 42);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_secs(1 << i.min(6)).min(Duration::from_secs(60));
            assert!(
                *d >= ceiling / 2 && *d < ceiling,
                "attempt {i}: {d:?} not in [{:?}, {ceiling:?})",
                ceiling / 2
            );
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_secs(1));
    }

    /// A broker that answers CONNECT after 6 s: over rumqttc's default 5 s connect
    /// timeout, within the 10 s keep-alive. The session must wait for it on its first
    /// connection rather than give up and connect again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_connack_within_the_keepalive_is_waited_for() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cfg = MqttConfig {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            client_id: "gw-01".into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            keepalive: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(1),
        };
        let topics = Topics::new("fleet", "acme", "gw-01").expect("valid");
        let (_reports_tx, reports) = unbounded_channel();
        let (mqtt, _inbox) =
            Mqtt::start(&cfg, topics, reports, Duration::from_secs(1), 64 * 1024).expect("start");
        let started = Instant::now();
        let (mut conn, _) = listener.accept().await.expect("first connection");
        let mut buf = [0u8; 512];
        let n = conn.read(&mut buf).await.expect("CONNECT");
        assert!(n > 0 && buf[0] == 0x10, "expected CONNECT, got {:?}", &buf[..n]);
        tokio::time::sleep(Duration::from_secs(6)).await;
        conn.write_all(&[0x20, 0x02, 0x00, 0x00]).await.expect("CONNACK");
        // After the CONNACK the session subscribes and says it is online on this
        // connection; a client that gave up at 5 s has closed it (read returns 0).
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("a packet after CONNACK")
            .expect("read");
        assert!(n > 0, "the client closed the connection it was waiting on");
        assert!(matches!(buf[0] >> 4, 3 | 8), "expected PUBLISH or SUBSCRIBE, got {:#04x}", buf[0]);
        // No second attempt was made meanwhile.
        let again = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(again.is_err(), "the client connected again after {:?}", started.elapsed());
        mqtt.shutdown(Duration::from_millis(100)).await;
    }

    #[test]
    fn network_options_wait_a_keepalive_for_the_connection() {
        assert_eq!(network_options(Duration::from_secs(30)).connection_timeout(), 30);
        // keepalive_secs is at least 5 (config), and rumqttc's 5 s stays the floor.
        assert_eq!(network_options(Duration::from_secs(1)).connection_timeout(), 5);
    }

    #[test]
    fn topics_follow_the_scheme() {
        let t = Topics::new("fleet", "acme", "gw-01").expect("valid");
        assert_eq!(t.status, "fleet/acme/devices/gw-01/status");
        assert_eq!(t.online, "fleet/acme/devices/gw-01/online");
    }
}
