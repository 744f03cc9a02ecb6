//! The daemon (`fleet-agent run`): wires the agent to MQTT, the bundle source, the
//! engine's event stream and the timers, and runs until SIGTERM/SIGINT.
//!
//! One task drives the agent, so only one bundle is ever applied at a time. Work comes
//! from: announcements and MQTT blobs (latest per topic, see `mqtt::Inbox`), the
//! reconcile timer, the poll timer (`<fetch.base_url>/devices/<id>.json`), engine events
//! about managed containers (coalesced, then a reconcile), the healthchecks the engine
//! does not run itself (podman without systemd: [`Agent::run_due_healthchecks`]),
//! bundles sideloaded by `fleet-agent apply` over the state directory's socket
//! ([`crate::sideload`]), and the network work that runs *beside* the loop: the pointer
//! poll and at most one bundle download. A download, however slow, never holds
//! reconcile, health or sideloads (Hardening I, case 3); its bytes are applied by the
//! loop when they are complete. The one exception is artifacts over MQTT (no URL, an
//! announcement with `mqtt_blob`): their chunks arrive through the inbox, so that
//! download is a [`ChunkFetch`] the loop feeds one chunk at a time, with a timeout.
//!
//! The pointer poll is conditional once the server sent a sane `ETag` with the file
//! ([`PointerSeen`]): a `304 Not Modified` offers the announcement read from that file
//! again, exactly as re-reading the same bytes would, without a body or a parse.
//!
//! Announcements are candidates ([`Candidates`]): one per source, the latest, tried in
//! order (the pointer file first), backed off when they fail, never ranked by anything
//! unsigned. A bundle deferred after verification (engine down, pull failed, expired) is
//! retried from its stored copy, not downloaded again.
//!
//! A shutdown signal stops the work in progress at its next await point: every effect is
//! journaled and idempotent, so the next start resumes or rolls back (see `journal`),
//! then publishes `online=false`. An error that leaves the apply path mid-flight (the
//! journal cannot be written) ends the daemon too, so that journal recovery runs on the
//! restart (systemd restarts it).
//!
//! This module decides nothing about bundles itself; it routes work to the agent.

use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::time::Duration;

use fleet_spec::messages::{Announcement, VersionRef};
use tokio::sync::mpsc::unbounded_channel;
use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};

use crate::agent::{Agent, AgentError, Offer, Outcome};
use crate::clock::Clock;
use crate::config::Config;
use crate::core::candidates::{Candidates, Source};
use crate::engine::{Engine, EngineEvent};
use crate::fetch::{self, FetchError, Fetcher};
use crate::mqtt::{Inbound, Inbox, Mqtt, Topics};
use crate::mqtt_blob::{ChunkFetch, Step};
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
    #[error("the apply path cannot continue ({0}); restart the agent (systemd does) so that journal recovery finishes it")]
    Wedged(AgentError),
}

/// Engine actions that may mean drift (others are the agent's own doing).
fn is_drift_action(action: &str) -> bool {
    matches!(action, "die" | "stop" | "kill" | "destroy" | "oom" | "pause")
        || action.starts_with("health_status") && action.contains("unhealthy")
}

/// How long one step of work (an apply with its health waits, a recovery) keeps the
/// systemd watchdog fed beyond twice the health timeout. Past that the pings stop and
/// systemd restarts a hung agent; recovery resumes from the journal.
const MAX_STEP_BESIDES_HEALTH: Duration = Duration::from_secs(30 * 60);

/// Network work that runs beside the main loop: a task of its own, so it makes progress
/// whenever the loop awaits (an apply's engine calls, a health wait), not only between
/// work items; aborted when dropped.
struct Task<T>(tokio::task::JoinHandle<Result<T, FetchError>>);

impl<T: Send + 'static> Task<T> {
    fn spawn(work: impl Future<Output = Result<T, FetchError>> + Send + 'static) -> Self {
        Task(tokio::spawn(work))
    }

    async fn join(&mut self) -> Result<T, FetchError> {
        (&mut self.0).await.unwrap_or_else(|e| {
            Err(FetchError::Network { url: "(download task)".into(), reason: e.to_string() })
        })
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Work {
    Inbound(Inbound),
    Reconcile,
    Poll,
    Polled(Result<fetch::Polled, FetchError>),
    /// A bundle's bytes, or (after its artifacts were stored) the bytes of the bundle
    /// that needed them: either way, what to apply.
    Fetched(Result<Vec<u8>, FetchError>),
    /// The blob chunk the MQTT download wants did not come in time.
    ChunkLate,
    Retry,
    EngineEvent(EngineEvent),
    EngineStreamEnded,
    Healthchecks,
    Sideload(tokio::net::UnixStream),
}

/// The last `200` of the pointer file that came with a sane `ETag`: a `304` to a poll
/// with that tag means these same bytes.
struct PointerSeen {
    etag: String,
    /// What the file announced (`None`: it was refused, and the same bytes would be again).
    announcement: Option<Announcement>,
}

/// The one download in flight: a bundle, or the artifacts of one.
struct Download {
    source: Source,
    digest: String,
    via: Via,
}

/// How a download makes progress.
enum Via {
    /// HTTP, in a task beside the loop.
    Http(Task<Vec<u8>>),
    /// Artifact chunks over MQTT, fed by the loop; then `bundle` is applied.
    Mqtt { fetch: Box<ChunkFetch>, bundle: Vec<u8> },
}

impl Download {
    fn task(&mut self) -> Option<&mut Task<Vec<u8>>> {
        match &mut self.via {
            Via::Http(task) => Some(task),
            Via::Mqtt { .. } => None,
        }
    }

    fn chunks(&self) -> Option<&ChunkFetch> {
        match &self.via {
            Via::Http(_) => None,
            Via::Mqtt { fetch, .. } => Some(fetch),
        }
    }
}

struct Runner<E: Engine> {
    agent: Agent<E>,
    fetcher: std::sync::Arc<Fetcher>,
    mqtt: Option<Mqtt>,
    candidates: Candidates,
    blob: Option<Vec<u8>>,
    download: Option<Download>,
    poll: Option<Task<fetch::Polled>>,
    /// The pointer file as last read with an `ETag`, sent back in `If-None-Match`.
    pointer_seen: Option<PointerSeen>,
    /// The last poll's error: a poll that keeps failing the same way is said once.
    poll_error: Option<String>,
    /// A reconcile passed since the start (a new agent's trial asks for one).
    reconciled: bool,
}

/// Why the daemon stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// A shutdown signal.
    Shutdown,
    /// A new agent binary is staged: `fleet-agent launch` runs it on trial (exit
    /// [`crate::launch::EXIT_SWITCH`]).
    SwitchAgent,
}

/// Runs `work` to its end while sending systemd's keep-alives (`ping`, given when the
/// work began) every tick of `keepalive` when `enabled`: for work on the loop that is not
/// a step of the apply path but can still take minutes.
async fn with_keepalive<F: Future>(
    work: F,
    keepalive: &mut tokio::time::Interval,
    enabled: bool,
    ping: &impl Fn(Instant),
) -> F::Output {
    let started = Instant::now();
    let mut work = pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = keepalive.tick(), if enabled => ping(started),
        }
    }
}

/// Runs the daemon until `shutdown` completes.
pub async fn run<E: Engine>(
    cfg: Config,
    engine: Rc<E>,
    clock: Rc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, RunError> {
    let store = Store::new(&cfg.state_dir);
    store.create()?;
    let _lock = store.lock()?;
    // Where apps put their update locks (bind-mounted into their containers).
    if let Err(e) = crate::lockdir::create(&cfg.updates.lock_dir) {
        tracing::warn!(dir = %cfg.updates.lock_dir.display(), "cannot create the update lock directory: {e}");
    }
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
    let fetcher = std::sync::Arc::new(Fetcher::new(&cfg.fetch, cfg.limits.max_bundle_len()));
    let mut runner = Runner {
        poll_error: None,
        agent,
        fetcher,
        mqtt,
        candidates: Candidates::default(),
        blob: None,
        download: None,
        poll: None,
        pointer_seen: None,
        reconciled: false,
    };
    let mut shutdown = pin!(shutdown);
    let mut result = Ok(Stopped::Shutdown);

    // systemd's notify protocol: READY once started, WATCHDOG keep-alives from this loop
    // (a hung loop stops them, and systemd restarts the agent), STOPPING at the end.
    let notifier = crate::notify::Notifier::from_env();
    let keepalive_every = notifier.as_ref().and_then(|n| n.keepalive_interval());
    let mut keepalive = tokio::time::interval(keepalive_every.unwrap_or(Duration::from_secs(3600)));
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let max_step = cfg.health_timeout * 2 + MAX_STEP_BESIDES_HEALTH;
    let ping = |since: Instant| {
        if let Some(n) = notifier.as_ref().filter(|_| since.elapsed() < max_step) {
            n.ping();
        }
    };
    // Before recovery: it may wait for health longer than systemd's start timeout.
    if let Some(n) = &notifier {
        n.ready();
    }

    tracing::info!(device = %cfg.device, fleet = %cfg.fleet, version = crate::agent::version(), "fleet-agent starting");
    let step_started = Instant::now();
    let started = {
        let mut recovering = pin!(runner.agent.recover());
        loop {
            tokio::select! {
                r = &mut recovering => break Some(r),
                _ = &mut shutdown => break None,
                _ = keepalive.tick(), if keepalive_every.is_some() => ping(step_started),
            }
        }
    };
    if let Some(r) = started {
        if let Err(e) = r {
            tracing::error!("recovery failed: {e}");
        }
        with_keepalive(runner.agent.check_agent_release(), &mut keepalive, keepalive_every.is_some(), &ping)
            .await;
        // While this binary is on trial: checked every second until it confirms.
        let mut trial_tick = tokio::time::interval(Duration::from_secs(1));
        trial_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
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
            if runner.agent.agent_switch_staged() {
                tracing::info!("exiting for the launcher, which starts the new agent on trial");
                result = Ok(Stopped::SwitchAgent);
                break;
            }
            let on_trial = runner.agent.agent_trial().is_some();
            let healthcheck_at = runner.agent.next_healthcheck();
            let retry_at = runner.retry_at();
            runner.want_chunk();
            let chunk_due = runner.download.as_ref().and_then(Download::chunks).map(ChunkFetch::deadline);
            // Not `biased`: a flood on one source (the broker, say) must not starve the
            // timers.
            let work = tokio::select! {
                _ = &mut shutdown => break,
                _ = keepalive.tick(), if keepalive_every.is_some() => {
                    ping(Instant::now());
                    continue;
                }
                r = maybe(runner.download.as_mut().and_then(Download::task)) => Work::Fetched(r),
                _ = sleep_until(chunk_due.unwrap_or_else(Instant::now)), if chunk_due.is_some() => Work::ChunkLate,
                r = maybe(runner.poll.as_mut()) => Work::Polled(r),
                msg = inbound.recv() => Work::Inbound(msg),
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
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => Work::Retry,
                _ = trial_tick.tick(), if on_trial => {
                    runner.trial_step();
                    continue;
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
            let step_started = Instant::now();
            let handled = {
                let mut handling = pin!(runner.handle(work));
                loop {
                    tokio::select! {
                        r = &mut handling => break Some(r),
                        _ = &mut shutdown => break None,
                        _ = keepalive.tick(), if keepalive_every.is_some() => ping(step_started),
                    }
                }
            };
            let interrupted = match handled {
                None => true,
                Some(Err(e)) if !runner.agent.state().is_rest() => {
                    // Mid-flight with the journal unwritable: only a restart's recovery
                    // can finish this (case 4).
                    tracing::error!(
                        state = %runner.agent.state(),
                        "{e}; the apply path cannot continue: exiting so that journal recovery runs on the restart"
                    );
                    result = Err(RunError::Wedged(e));
                    break;
                }
                Some(Err(e)) => {
                    tracing::error!("{e}");
                    false
                }
                Some(Ok(())) => {
                    // Checking a staged binary runs it (up to a minute per check).
                    with_keepalive(
                        runner.agent.check_agent_release(),
                        &mut keepalive,
                        keepalive_every.is_some(),
                        &ping,
                    )
                    .await;
                    runner.trial_step();
                    false
                }
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
    // Not when handing over to a new binary: the service goes on (the launcher starts
    // it), and systemd takes STOPPING=1 from any process of the unit as the service
    // stopping (`deactivating`, then killed after TimeoutStopSec).
    if let (Some(n), false) = (&notifier, matches!(result, Ok(Stopped::SwitchAgent))) {
        n.stopping();
    }
    if sideload.is_some() {
        let _ = std::fs::remove_file(crate::sideload::socket_path(&cfg.state_dir));
    }
    drop(runner.agent);
    if let Some(mqtt) = runner.mqtt {
        mqtt.shutdown(Duration::from_secs(3)).await;
    }
    result
}

/// Waits for a task; never, without one.
async fn maybe<T: Send + 'static>(task: Option<&mut Task<T>>) -> Result<T, FetchError> {
    match task {
        Some(task) => task.join().await,
        None => std::future::pending().await,
    }
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
    reports: tokio::sync::mpsc::UnboundedReceiver<crate::agent::Report>,
) -> Result<(Option<Mqtt>, Inbox), RunError> {
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
            Ok((None, Inbox::none()))
        }
    }
}

impl<E: Engine> Runner<E> {
    /// On trial: confirms once the agent reconciled and the broker acknowledged its
    /// status (an agent without MQTT: once it reconciled).
    fn trial_step(&mut self) {
        let reported = self.mqtt.as_ref().is_none_or(Mqtt::acknowledged);
        if self.agent.agent_trial().is_some() && self.reconciled && reported {
            self.agent.confirm_trial();
        }
    }

    async fn handle(&mut self, work: Work) -> Result<(), AgentError> {
        match work {
            Work::Inbound(Inbound::Desired(bytes)) => {
                if bytes.is_empty() {
                    return Ok(()); // a cleared retained message
                }
                match Announcement::from_json(&bytes) {
                    Ok(ann) => self.announced(Source::Mqtt, ann).await?,
                    Err(e) => tracing::warn!("ignoring a malformed announcement: {e}"),
                }
            }
            Work::Inbound(Inbound::Bundle(bytes)) => {
                if !bytes.is_empty() {
                    // The candidate that waits for these bytes is due now.
                    self.candidates.wake(&fleet_spec::bundle::content_address(&bytes), Instant::now());
                    self.blob = Some(bytes);
                    self.try_next().await?;
                }
            }
            Work::Reconcile => {
                self.agent.reconcile().await?;
                self.reconciled = true;
                self.try_next().await?;
            }
            Work::Poll => {
                if self.poll.is_none() {
                    let base = self.agent.config().fetch.base_url.clone().expect("polling needs a base url");
                    let url = fetch::pointer_url(&base, &self.agent.config().device);
                    let fetcher = self.fetcher.clone();
                    let etag = self.pointer_seen.as_ref().map(|p| p.etag.clone());
                    self.poll = Some(Task::spawn(async move {
                        fetcher.get_small(&url, fetch::MAX_POINTER, etag.as_deref()).await
                    }));
                }
            }
            Work::Polled(result) => {
                self.poll = None;
                let cfg = self.agent.config();
                let base = cfg.fetch.base_url.clone().expect("polling needs a base url");
                let url = fetch::pointer_url(&base, &cfg.device);
                if result.is_ok() && self.poll_error.take().is_some() {
                    tracing::info!(%url, "polling works again");
                }
                match result {
                    Ok(fetch::Polled::Body { bytes, etag }) => {
                        let parsed = fetch::announcement_from_pointer(&bytes, &base, &cfg.fleet, &cfg.device);
                        self.pointer_seen = etag
                            .map(|etag| PointerSeen { etag, announcement: parsed.as_ref().ok().cloned() });
                        match parsed {
                            Ok(ann) => self.announced(Source::Pointer, ann).await?,
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                    Ok(fetch::Polled::NotModified) => {
                        tracing::debug!("{url}: 304, unchanged");
                        // Offered again as the same bytes would be: a candidate dropped
                        // after failures is retried at the poll's pace, as without ETags.
                        if let Some(ann) = self.pointer_seen.as_ref().and_then(|p| p.announcement.clone()) {
                            self.announced(Source::Pointer, ann).await?;
                        }
                    }
                    Ok(fetch::Polled::NotFound) => {
                        self.pointer_seen = None;
                        tracing::debug!("{url}: 404, no bundle for this device");
                    }
                    Err(e) => {
                        // Said once at WARN, then only when it changes (the error names
                        // the URL).
                        let error = e.to_string();
                        if self.poll_error.as_deref() == Some(error.as_str()) {
                            tracing::debug!("polling failed again: {error}");
                        } else {
                            tracing::warn!("polling failed (said again only when this changes): {error}");
                        }
                        self.poll_error = Some(error);
                    }
                }
            }
            Work::Fetched(result) => {
                let d = self.download.take().expect("a download was in flight");
                self.downloaded(d.source, &d.digest, result).await?;
            }
            Work::Inbound(Inbound::Chunk { topic, bytes }) => {
                let now = Instant::now();
                let Some(Via::Mqtt { fetch, .. }) = self.download.as_mut().map(|d| &mut d.via) else {
                    return Ok(());
                };
                match fetch.on_chunk(&topic, &bytes, now) {
                    None | Some(Ok(Step::Want(_))) => {}
                    Some(result) => self.chunks_ended(result.map(drop)).await?,
                }
            }
            Work::ChunkLate => {
                if let Some(e) = self.download.as_ref().and_then(Download::chunks).map(ChunkFetch::timed_out)
                {
                    self.chunks_ended(Err(e)).await?;
                }
            }
            Work::Retry => self.try_next().await?,
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
                        match self.agent.apply_bundle_now(&bytes).await {
                            Ok(outcome) => crate::sideload::Reply::Outcome(outcome),
                            Err(e) => crate::sideload::Reply::Error(e.to_string()),
                        }
                    }
                    Err(reply) => reply,
                };
                crate::sideload::send_reply(&mut stream, &reply).await;
                // A bundle announced meanwhile may still be newer.
                self.try_next().await?;
            }
        }
        Ok(())
    }

    /// Settles a download that ended: its bundle applied (still `downloading` until the
    /// apply path takes over: one status change, one status.json write, less), or its
    /// candidate failed; then the next candidate.
    async fn downloaded(
        &mut self,
        source: Source,
        digest: &str,
        result: Result<Vec<u8>, FetchError>,
    ) -> Result<(), AgentError> {
        match result {
            Ok(bytes) => self.apply(source, digest, &bytes).await?,
            Err(e) => {
                self.agent.fetch_failed(digest, e.code(), &e.to_string());
                self.candidates.failed(source, digest, Instant::now());
            }
        }
        self.try_next().await
    }

    /// Ends the download of artifacts over MQTT: every blob stored (the bundle is
    /// applied), or failed. A failed one keeps the bundle's bytes as the MQTT bundle
    /// (latest wins): the retained bundle is not sent again while the agent stays
    /// subscribed, and the retry needs it to resume.
    async fn chunks_ended(&mut self, result: Result<(), FetchError>) -> Result<(), AgentError> {
        let d = self.download.take().expect("a download was in flight");
        let Via::Mqtt { bundle, .. } = d.via else { unreachable!("an MQTT download") };
        let result = match result {
            Ok(()) => Ok(bundle),
            Err(e) => {
                self.blob = Some(bundle);
                Err(e)
            }
        };
        self.downloaded(d.source, &d.digest, result).await
    }

    /// Takes an announcement as a candidate (see `core::candidates`).
    async fn announced(&mut self, source: Source, ann: Announcement) -> Result<(), AgentError> {
        let digest = ann.digest.clone();
        self.candidates.offer(source, ann.clone(), Instant::now());
        // What the device was told last (informational: unsigned, like the hint itself).
        if self.agent.applied_digest() != Some(digest.as_str()) {
            self.agent.set_desired(VersionRef {
                version: ann.version,
                digest: digest.clone(),
                commit: ann.commit.clone(),
            });
        }
        // A download nobody wants any more, or of an MQTT hint while the pointer file
        // names another bundle this device does not run, makes way.
        if let Some(d) = &self.download {
            let pointer_disagrees = source == Source::Pointer
                && d.source == Source::Mqtt
                && digest != d.digest
                && self.agent.applied_digest() != Some(digest.as_str());
            if !self.candidates.holds(d.source, &d.digest) || pointer_disagrees {
                tracing::info!(digest = %d.digest, "download superseded by a newer announcement");
                self.download = None;
                self.agent.set_downloading(None);
            }
        }
        self.try_next().await
    }

    /// Starts on the next due candidate: from its stored copy or the MQTT blob if there
    /// is one (applied now), else a download beside the loop.
    /// When the loop must wake to try the next candidate. Not while a download runs: its
    /// end wakes the loop (and tries the next one), and a candidate already due would
    /// otherwise wake it at once, again and again, for as long as a slow server holds the
    /// download (a busy loop that burned a core per stalled device).
    fn retry_at(&self) -> Option<Instant> {
        if self.download.is_some() {
            return None;
        }
        self.candidates.wake_at()
    }

    async fn try_next(&mut self) -> Result<(), AgentError> {
        // Each pass settles one candidate (applied, dropped, backed off) or returns.
        for _ in 0..4 {
            if self.download.is_some() {
                return Ok(());
            }
            let now = Instant::now();
            let Some(c) = self.candidates.due(now).cloned() else {
                break;
            };
            let digest = c.ann.digest.clone();
            match self.agent.offer(&c.ann)? {
                Offer::Fetch => {}
                Offer::Skip("busy") => {
                    self.candidates.postpone(c.source, &digest, now + Duration::from_secs(1));
                    return Ok(());
                }
                Offer::Skip(why) => {
                    tracing::debug!(%digest, "not fetching: {why}");
                    if why == "already applied" {
                        // A bundle that waited for its window is superseded by a return
                        // to the applied one.
                        self.agent.release_hold()?;
                    }
                    self.candidates.done(&digest);
                    continue;
                }
            }
            if let Some(wait) = self.agent.still_waiting(&digest) {
                self.candidates.postpone(c.source, &digest, now + wait);
                continue;
            }
            if let Some(bytes) = self.stored_copy(&digest) {
                tracing::info!(%digest, "applying the stored copy of a deferred or waiting bundle");
                self.apply(c.source, &digest, &bytes).await?;
                continue;
            }
            if self.blob.as_ref().is_some_and(|b| fleet_spec::bundle::content_address(b) == digest) {
                let bytes = self.blob.take().expect("checked above");
                self.apply(c.source, &digest, &bytes).await?;
                continue;
            }
            let urls = fetch::bundle_urls(&c.ann, self.agent.config().fetch.base_url.as_deref());
            if urls.is_empty() {
                if c.ann.mqtt_blob {
                    tracing::debug!("waiting for the bundle on MQTT");
                    self.want_blob(true);
                    self.candidates.postpone(c.source, &digest, now + Duration::from_secs(60));
                } else {
                    let e = FetchError::NoSource { digest: digest.clone() };
                    self.agent.fetch_failed(&digest, e.code(), &e.to_string());
                    self.candidates.failed(c.source, &digest, now);
                }
                continue;
            }
            // partial/ holds at most the downloads still wanted.
            if let Err(e) = self.agent.store().prune_partials(&self.candidates.digests()) {
                tracing::warn!("cannot prune partial downloads: {e}");
            }
            let partial = self.agent.store().partial_path(&digest);
            let fetcher = self.fetcher.clone();
            let wanted = digest.clone();
            let task = Task::spawn(async move { fetcher.fetch_bundle(&urls, &wanted, &partial).await });
            // A download is the device's state only when its own server (the pointer
            // file) asked for it, or when the broker is its only source: a hint on the
            // broker must not keep a converged device from reporting `converged`.
            let own = c.source == Source::Pointer || self.agent.config().fetch.base_url.is_none();
            self.agent.set_downloading(own.then_some(digest.as_str()));
            self.download = Some(Download { source: c.source, digest, via: Via::Http(task) });
            return Ok(());
        }
        self.want_blob(self.candidates.wants_blob());
        Ok(())
    }

    /// Applies a bundle's bytes, and settles its candidate: done when applied or refused
    /// for good, backed off when deferred.
    async fn apply(&mut self, source: Source, digest: &str, bytes: &[u8]) -> Result<(), AgentError> {
        if self.fetch_artifacts(source, digest, bytes) {
            return Ok(());
        }
        let outcome = self.agent.apply_bundle(bytes).await?;
        tracing::debug!(digest, outcome = outcome.name(), code = outcome.code(), "bundle handled");
        let refused = self.agent.store().rejected().map(|r| r.contains_key(digest)).unwrap_or(false);
        let settled =
            matches!(outcome, Outcome::Committed { .. } | Outcome::AlreadyApplied | Outcome::Rejected { .. });
        if let Outcome::Waiting { reason, until } = outcome {
            // Not a failure: looked at again when the wait may end (no bundle is read
            // until then; see `Agent::still_waiting`).
            let wait = crate::agent::retry_after(reason, until, self.agent.now());
            self.candidates.postpone(source, digest, Instant::now() + wait);
        } else if settled || refused {
            self.candidates.done(digest);
        } else {
            self.candidates.failed(source, digest, Instant::now());
        }
        Ok(())
    }

    /// Starts the download of the artifacts a verified bundle needs and the device does
    /// not hold, beside the loop (the bundle is applied when they are stored); `false`
    /// when there is nothing to download. Too little disk for them defers the bundle
    /// (`insufficient_space`) before a byte is fetched.
    fn fetch_artifacts(&mut self, source: Source, digest: &str, bytes: &[u8]) -> bool {
        let missing = self.agent.missing_artifacts(bytes);
        if missing.is_empty() {
            return false;
        }
        let cfg = self.agent.config();
        let store = self.agent.store().clone();
        let needed: u64 = missing
            .iter()
            .map(|a| {
                let have = std::fs::metadata(store.blob_partial_path(&a.sha256_hex())).map_or(0, |m| m.len());
                a.size.saturating_sub(have)
            })
            .sum();
        let need = [(store.blobs_dir(), needed)];
        if let Err(e) = crate::space::check(&need, cfg.fetch.disk_reserve_bytes) {
            self.agent.fetch_failed(digest, "insufficient_space", &e.to_string());
            self.candidates.failed(source, digest, Instant::now());
            return true;
        }
        let bundle_urls = match self.candidates.announcement(digest) {
            Some(ann) => fetch::bundle_urls(ann, cfg.fetch.base_url.as_deref()),
            None => cfg.fetch.base_url.iter().map(|b| format!("{b}/bundles/{digest}.bundle")).collect(),
        };
        let base_url = cfg.fetch.base_url.clone();
        let total: u64 = missing.iter().map(|a| a.size).sum();
        let own = source == Source::Pointer || cfg.fetch.base_url.is_none();
        let over_mqtt = bundle_urls.is_empty()
            && base_url.is_none()
            && self.mqtt.is_some()
            && self.candidates.announcement(digest).is_some_and(|a| a.mqtt_blob);
        if over_mqtt {
            tracing::info!(
                digest,
                artifacts = missing.len(),
                bytes = total,
                "downloading artifacts over MQTT"
            );
            let missing = missing.iter().map(|a| (a.sha256_hex(), a.size));
            let (prefix, fleet, timeout) = (&cfg.topic_prefix, &cfg.fleet, cfg.fetch.timeout);
            match ChunkFetch::start(store, prefix, fleet, missing, timeout, Instant::now()) {
                // Complete partial files, stored now: nothing to wait for.
                Ok((_, Step::Done)) => return false,
                Ok((fetch, Step::Want(_))) => {
                    self.agent.set_downloading(own.then_some(digest));
                    let via = Via::Mqtt { fetch: Box::new(fetch), bundle: bytes.to_vec() };
                    self.download = Some(Download { source, digest: digest.to_string(), via });
                }
                Err(e) => {
                    self.agent.fetch_failed(digest, e.code(), &e.to_string());
                    self.candidates.failed(source, digest, Instant::now());
                }
            }
            return true;
        }
        tracing::info!(digest, artifacts = missing.len(), bytes = total, "downloading artifacts");
        let fetcher = self.fetcher.clone();
        let bytes = bytes.to_vec();
        let task = Task::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            for a in missing {
                let sha = a.sha256_hex();
                if !seen.insert(sha.clone()) || store.has_blob(&sha, a.size) {
                    continue;
                }
                let urls = fetch::blob_urls(&bundle_urls, base_url.as_deref(), &sha);
                let (partial, dest) = (store.blob_partial_path(&sha), store.blob_path(&sha));
                fetcher.fetch_blob(&urls, &sha, a.size, &partial, &dest).await?;
            }
            Ok(bytes)
        });
        self.agent.set_downloading(own.then_some(digest));
        self.download = Some(Download { source, digest: digest.to_string(), via: Via::Http(task) });
        true
    }

    /// The stored copy of a bundle deferred after verification, if it is intact.
    fn stored_copy(&self, digest: &str) -> Option<Vec<u8>> {
        let path = self.agent.store().bundle_path(digest);
        let bytes = std::fs::read(path).ok()?;
        (fleet_spec::bundle::content_address(&bytes) == digest).then_some(bytes)
    }

    /// Subscribes to the blob chunk the download wants, and to none without one.
    fn want_chunk(&self) {
        if let Some(m) = &self.mqtt {
            let wanted = self.download.as_ref().and_then(Download::chunks).and_then(ChunkFetch::wanted);
            m.want_chunk(wanted.map(str::to_string));
        }
    }

    fn want_blob(&self, want: bool) {
        if let Some(m) = &self.mqtt {
            m.want_blob(want);
        }
    }
}
