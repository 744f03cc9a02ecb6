//! The daemon (`fleet-agent run`): wires the agent to MQTT, the bundle source, the
//! engine's event stream and the timers, and runs until SIGTERM/SIGINT.
//!
//! One task drives the agent, so only one bundle is ever in flight. Work comes from:
//! announcements and MQTT blobs, the reconcile timer (which also retries a deferred
//! bundle), the poll timer (`<fetch.base_url>/devices/<id>.json`), engine events about
//! managed containers (coalesced, then a reconcile), and the healthchecks the engine
//! does not run itself (podman without systemd: [`Agent::run_due_healthchecks`]), and
//! bundles sideloaded by `fleet-agent apply` over the state directory's socket
//! ([`crate::sideload`]). A
//! shutdown signal stops the work in progress at its next await point: every effect is
//! journaled and idempotent, so the next start resumes or rolls back (see `journal`),
//! then publishes `online=false`.
//!
//! This module decides nothing about bundles itself; it routes work to the agent.

use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::time::Duration;

use fleet_spec::messages::{Announcement, VersionRef};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};

use crate::agent::{Agent, AgentError, Offer, Outcome};
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Engine, EngineEvent};
use crate::fetch::{self, Fetcher};
use crate::mqtt::{Inbound, Mqtt, Topics};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("MQTT setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("MQTT topics: {0}")]
    Topic(#[from] fleet_spec::topic::TopicError),
}

/// Engine actions that may mean drift (others are the agent's own doing).
fn is_drift_action(action: &str) -> bool {
    matches!(action, "die" | "stop" | "kill" | "destroy" | "oom" | "pause")
        || action.starts_with("health_status") && action.contains("unhealthy")
}

enum Work {
    Inbound(Inbound),
    Reconcile,
    Poll,
    EngineEvent(EngineEvent),
    EngineStreamEnded,
    Healthchecks,
    Sideload(tokio::net::UnixStream),
}

struct Runner<E: Engine> {
    agent: Agent<E>,
    fetcher: Fetcher,
    mqtt: Option<Mqtt>,
    pending: Option<Announcement>,
    blob: Option<Vec<u8>>,
}

/// Runs the daemon until `shutdown` completes.
pub async fn run<E: Engine>(
    cfg: Config,
    engine: Rc<E>,
    clock: Rc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let store = Store::new(&cfg.state_dir);
    store.create()?;
    let _lock = store.lock()?;
    // Without the socket the daemon still runs; `apply` then asks to stop it first.
    let sideload = match crate::sideload::listen(&cfg.state_dir) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("no sideload socket ({e}): `fleet-agent apply` will need the service stopped");
            None
        }
    };
    let (report_tx, report_rx) = unbounded_channel();
    let (mqtt, mut inbound) = start_mqtt(&cfg, report_rx)?;
    let agent = Agent::new(cfg.clone(), engine.clone(), clock, Some(report_tx))?;
    let fetcher = Fetcher::new(cfg.fetch.ca_file.clone(), cfg.fetch.timeout, cfg.limits.max_bundle_len());
    let mut runner = Runner { agent, fetcher, mqtt, pending: None, blob: None };
    let mut shutdown = pin!(shutdown);

    tracing::info!(device = %cfg.device, fleet = %cfg.fleet, version = crate::agent::AGENT_VERSION, "fleet-agent starting");
    let started = tokio::select! {
        r = runner.agent.recover() => Some(r),
        _ = &mut shutdown => None,
    };
    if let Some(r) = started {
        if let Err(e) = r {
            tracing::error!("recovery failed: {e}");
        }
        let mut reconcile_tick =
            interval_at(Instant::now() + Duration::from_millis(10), cfg.reconcile_interval);
        reconcile_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let polling = cfg.fetch.base_url.is_some();
        let mut poll_tick = interval_at(Instant::now() + Duration::from_millis(50), cfg.fetch.poll_interval);
        poll_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let event_engine = engine.clone();
        let mut events: Pin<Box<dyn Future<Output = Option<EngineEvent>> + '_>> =
            Box::pin(next_event(&*event_engine, Duration::ZERO));
        let mut stream_retry = Duration::from_secs(1);

        loop {
            let healthcheck_at = runner.agent.next_healthcheck();
            let work = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(msg) = inbound.recv() => Work::Inbound(msg),
                ev = &mut events => match ev {
                    Some(ev) => Work::EngineEvent(ev),
                    None => Work::EngineStreamEnded,
                },
                _ = reconcile_tick.tick() => Work::Reconcile,
                _ = poll_tick.tick(), if polling => Work::Poll,
                Ok((stream, _)) = accept(sideload.as_ref()) => Work::Sideload(stream),
                _ = sleep_until(healthcheck_at.unwrap_or_else(Instant::now)), if healthcheck_at.is_some() => {
                    Work::Healthchecks
                }
            };
            match &work {
                Work::EngineEvent(_) => {
                    stream_retry = Duration::from_secs(1);
                    events = Box::pin(next_event(&*event_engine, Duration::ZERO));
                }
                Work::EngineStreamEnded => {
                    events = Box::pin(next_event(&*event_engine, stream_retry));
                    stream_retry = (stream_retry * 2).min(Duration::from_secs(60));
                    continue;
                }
                _ => {}
            }
            let interrupted = tokio::select! {
                r = runner.handle(work) => {
                    if let Err(e) = r {
                        tracing::error!("{e}");
                    }
                    false
                }
                _ = &mut shutdown => true,
            };
            if interrupted {
                tracing::warn!(
                    "shutdown interrupted work in progress; the journal resumes it on the next start"
                );
                break;
            }
        }
    }
    tracing::info!("fleet-agent stopping");
    if sideload.is_some() {
        let _ = std::fs::remove_file(crate::sideload::socket_path(&cfg.state_dir));
    }
    drop(runner.agent);
    if let Some(mqtt) = runner.mqtt {
        mqtt.shutdown(Duration::from_secs(3)).await;
    }
    Ok(())
}

/// The next sideload connection; never, without a socket.
async fn accept(
    listener: Option<&tokio::net::UnixListener>,
) -> std::io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn next_event<E: Engine>(engine: &E, delay: Duration) -> Option<EngineEvent> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match engine.next_event().await {
        Ok(ev) => ev,
        Err(e) => {
            tracing::debug!("engine event stream: {e}");
            None
        }
    }
}

fn start_mqtt(
    cfg: &Config,
    reports: UnboundedReceiver<crate::agent::Report>,
) -> Result<(Option<Mqtt>, UnboundedReceiver<Inbound>), RunError> {
    match &cfg.mqtt {
        Some(m) => {
            let topics = Topics::new(&cfg.topic_prefix, &cfg.fleet, &cfg.device)?;
            let max_incoming = (cfg.limits.max_bundle_len() + 4096).min(usize::MAX as u64) as usize;
            let (mqtt, inbound) = Mqtt::start(m, topics, reports, cfg.status_min_interval, max_incoming)?;
            Ok((Some(mqtt), inbound))
        }
        None => {
            // No broker: reports are only logged (and status.json written by the agent).
            let mut reports = reports;
            tokio::spawn(async move { while reports.recv().await.is_some() {} });
            let (tx, rx) = unbounded_channel();
            std::mem::forget(tx);
            Ok((None, rx))
        }
    }
}

impl<E: Engine> Runner<E> {
    async fn handle(&mut self, work: Work) -> Result<(), AgentError> {
        match work {
            Work::Inbound(Inbound::Desired(bytes)) => {
                if bytes.is_empty() {
                    return Ok(()); // a cleared retained message
                }
                match Announcement::from_json(&bytes) {
                    Ok(ann) => self.announced(ann).await?,
                    Err(e) => tracing::warn!("ignoring a malformed announcement: {e}"),
                }
            }
            Work::Inbound(Inbound::Bundle(bytes)) => {
                if !bytes.is_empty() {
                    self.blob = Some(bytes);
                    self.try_pending().await?;
                }
            }
            Work::Reconcile => {
                self.agent.reconcile().await?;
                self.try_pending().await?;
            }
            Work::Poll => {
                let base = self.agent.config().fetch.base_url.clone().expect("polling needs a base url");
                let url = fetch::pointer_url(&base, &self.agent.config().device);
                match self.fetcher.get_small(&url, fetch::MAX_POINTER).await {
                    Ok(Some(bytes)) => {
                        let cfg = self.agent.config();
                        match fetch::announcement_from_pointer(&bytes, &base, &cfg.fleet, &cfg.device) {
                            Ok(ann) => self.announced(ann).await?,
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                    Ok(None) => tracing::debug!("{url}: 404, no bundle for this device"),
                    Err(e) => tracing::info!("polling {url} failed: {e}"),
                }
            }
            Work::EngineEvent(ev) => {
                if is_drift_action(&ev.action) {
                    tracing::info!(container = %ev.name, action = %ev.action, "engine event");
                    // Coalesce the burst of events one change makes (kill, die, stop...).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.agent.reconcile().await?;
                }
            }
            Work::EngineStreamEnded => {}
            Work::Healthchecks => self.agent.run_due_healthchecks().await,
            Work::Sideload(mut stream) => {
                let max = self.agent.config().limits.max_bundle_len();
                let reply = match crate::sideload::read_bundle(&mut stream, max).await {
                    Ok(bytes) => {
                        tracing::info!(bytes = bytes.len(), "sideloaded bundle received");
                        match self.agent.apply_bundle(&bytes).await {
                            Ok(outcome) => crate::sideload::Reply::Outcome(outcome),
                            Err(e) => crate::sideload::Reply::Error(e.to_string()),
                        }
                    }
                    Err(reply) => reply,
                };
                crate::sideload::send_reply(&mut stream, &reply).await;
                // A bundle announced meanwhile may still be newer.
                self.try_pending().await?;
            }
        }
        Ok(())
    }

    async fn announced(&mut self, ann: Announcement) -> Result<(), AgentError> {
        let newer = self.pending.as_ref().is_none_or(|p| p.version < ann.version || p.digest == ann.digest);
        if !newer {
            return Ok(());
        }
        if self.agent.applied_digest() != Some(ann.digest.as_str()) {
            self.agent.set_desired(VersionRef {
                version: ann.version,
                digest: ann.digest.clone(),
                commit: ann.commit.clone(),
            });
        }
        if ann.mqtt_blob {
            if let Some(m) = &self.mqtt {
                m.want_blob(true);
            }
        }
        self.pending = Some(ann);
        self.try_pending().await
    }

    /// Fetches and applies the pending announcement if the agent wants it.
    async fn try_pending(&mut self) -> Result<(), AgentError> {
        let Some(ann) = self.pending.clone() else { return Ok(()) };
        match self.agent.offer(&ann)? {
            Offer::Skip("busy") => return Ok(()),
            Offer::Skip(why) => {
                tracing::debug!(digest = %ann.digest, "not fetching: {why}");
                self.done_with(&ann);
                return Ok(());
            }
            Offer::Fetch => {}
        }
        let blob_matches =
            self.blob.as_ref().is_some_and(|b| fleet_spec::bundle::content_address(b) == ann.digest);
        let urls = fetch::bundle_urls(&ann, self.agent.config().fetch.base_url.as_deref());
        if ann.mqtt_blob && !blob_matches && urls.is_empty() {
            tracing::debug!("waiting for the bundle on MQTT");
            return Ok(());
        }
        self.agent.begin_fetch()?;
        let bytes = if blob_matches {
            self.blob.take().expect("checked above")
        } else {
            let partial = self.agent.store().partial_path(&ann.digest);
            match self.fetcher.fetch_bundle(&urls, &ann.digest, ann.size, &partial).await {
                Ok(b) => b,
                Err(e) => {
                    let outcome =
                        self.agent.fetch_failed(&ann.digest, e.code(), &e.to_string(), e.is_permanent());
                    if matches!(outcome, Outcome::Rejected { .. }) {
                        self.done_with(&ann);
                    }
                    return Ok(());
                }
            }
        };
        let outcome = self.agent.apply_bundle(&bytes).await?;
        tracing::info!(?outcome, version = ann.version, "bundle handled");
        if !matches!(outcome, Outcome::Deferred { .. }) {
            self.done_with(&ann);
        }
        Ok(())
    }

    fn done_with(&mut self, ann: &Announcement) {
        if self.pending.as_ref().is_some_and(|p| p.digest == ann.digest) {
            self.pending = None;
        }
        if ann.mqtt_blob {
            self.blob = None;
            if let Some(m) = &self.mqtt {
                m.want_blob(false);
            }
        }
    }
}
