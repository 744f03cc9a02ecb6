//! `fleet-bundler rollout`: the adapter around [`super::judge`]. It reads the build
//! output (`index.json` with its `rollout`), the retained rollout state and the
//! devices' retained statuses from the broker, and carries out the core's effects:
//! moving a wave's pointer files from `devices.next/` into `devices/`, running
//! `--sync`, announcing devices (the same retained announcements as `publish`,
//! `published.json` updated the same way), and publishing the rollout state (retained,
//! QoS 1) after every change.
//!
//! Effects are idempotent and the state is published after them, so a run killed at
//! any point and started again redoes at most the last effect (a pointer file written
//! again with the same bytes, a device announced again with the same payload).
//!
//! Several `--broker` (one per node of a cluster that keeps retained messages per node
//! and sends none to wildcard filters, RabbitMQ 3.x): every retained message goes to
//! every node, each acknowledging its copy, and everything read comes from every node
//! on exact topics (the index names every device), merged as `status` merges them
//! ([`mqtt::replaces`] for a device's reports, [`keep_newer`] for the rollout state).
//! One `--broker` takes exactly the path it always did.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_spec::messages::StatusReport;
use fleet_spec::topic::{Topic, TopicKind, DEFAULT_PREFIX};
use rumqttc::{Event, Packet, QoS};
use sha2::{Digest, Sha256};

use super::judge::{self, Effect, Observed, Phase, RolloutState, Target};
use crate::build::{self, Index, NEXT_POINTERS};
use crate::mqtt::{self, BrokerArgs, MqttError, Readers};

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_duration_ms(s).map(Duration::from_millis)
}

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// The build output directory (index.json with a rollout, devices.next/, bundles/).
    #[arg(long, required_unless_present = "abort")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleet id (default: the index's).
    #[arg(long)]
    pub fleet: Option<String>,
    /// Topic prefix (default: the index's, else "fleet").
    #[arg(long)]
    pub prefix: Option<String>,
    /// Base URL devices fetch `<base-url>/bundles/<digest>.bundle` from (repeatable: mirrors).
    #[arg(long = "base-url")]
    pub base_urls: Vec<String>,
    /// Also retain each announced bundle's bytes on `<prefix>/<fleet>/devices/<id>/bundle`,
    /// and its artifact blobs not retained yet in chunks on `<prefix>/<fleet>/blobs/<sha256>/<n>`.
    #[arg(long)]
    pub blobs_over_mqtt: bool,
    /// A shell command run (`sh -c`) after each wave's pointer files were moved into
    /// DIR/devices/, before its devices are announced: the upload, e.g.
    /// `aws s3 sync out/ s3://bucket/fleet/`. Its failure halts the rollout (sync_failed).
    #[arg(long, value_name = "CMD")]
    pub sync: Option<String>,
    /// Stop waiting after this long (exit 4); the rollout stays running and a later run
    /// resumes it. Default: until it is done, halted or aborted.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Print the final rollout state as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Do one step (judge, maybe release/announce/advance/halt, publish the state) and exit.
    #[arg(long, conflicts_with = "abort")]
    pub once: bool,
    /// Mark the fleet's rollout aborted: a running driver sees it and stops moving anything.
    #[arg(long)]
    pub abort: bool,
    /// With --abort: why (published in the state's reason).
    #[arg(long, requires = "abort")]
    pub reason: Option<String>,
    /// Longest wait for the broker: to connect, and for each acknowledgement.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// How long to wait for more retained statuses after the last one arrived, at start.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Halted,
    Aborted,
    /// `--timeout` passed, or `--once` did its step: the rollout is still running.
    Running,
}

/// `<prefix>/<fleet>/rollout`.
pub fn rollout_topic(prefix: &str, fleet: &str) -> Result<String, MqttError> {
    // Validates prefix and fleet the same way as every other topic.
    Topic::fleet_filter(prefix, fleet, TopicKind::Status)?;
    Ok(format!("{prefix}/{fleet}/rollout"))
}

/// Announcements (and blobs) published but not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 100;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Several nodes: keeps in `slot` whichever of it and `new` was updated last (an
/// equal `updated_at`: `new`, the later message). A node that missed the last state
/// (a run stopped between two nodes' publishes) loses to the others.
pub(crate) fn keep_newer(slot: &mut Option<RolloutState>, new: RolloutState) {
    if slot.as_ref().is_none_or(|kept| new.updated_at >= kept.updated_at) {
        *slot = Some(new);
    }
}

/// What the driver hears from the broker (one node or several, see the module docs).
struct Listener {
    status_prefix: String,
    rollout_topic: String,
    statuses: BTreeMap<String, Observed>,
    /// Several nodes: the `timestamp` of each device's kept report.
    stamps: BTreeMap<String, i64>,
    nodes: usize,
    retained_state: Option<RolloutState>,
    /// Bit n: node n delivered a rollout state.
    state_nodes: u64,
    /// An `aborted` state for our commit seen on the rollout topic (of any node).
    aborted: Option<RolloutState>,
    commit: String,
    /// PUBACKs still to come (one per node for each message).
    unacked: usize,
    subacks: usize,
}

impl Listener {
    fn new(nodes: usize, status_prefix: String, rollout_topic: String, commit: String) -> Listener {
        Listener {
            status_prefix,
            rollout_topic,
            statuses: BTreeMap::new(),
            stamps: BTreeMap::new(),
            nodes,
            retained_state: None,
            state_nodes: 0,
            aborted: None,
            commit,
            unacked: 0,
            subacks: 0,
        }
    }

    fn handle(&mut self, (node, event): (usize, Event)) {
        match event {
            Event::Incoming(Packet::SubAck(_)) => self.subacks += 1,
            Event::Incoming(Packet::PubAck(_)) => self.unacked = self.unacked.saturating_sub(1),
            Event::Incoming(Packet::Publish(p)) => {
                if p.topic == self.rollout_topic {
                    if let Ok(s) = serde_json::from_slice::<RolloutState>(&p.payload) {
                        if s.state == Phase::Aborted && s.commit == self.commit {
                            self.aborted = Some(s.clone());
                        }
                        self.state_nodes |= 1 << node.min(63);
                        if self.nodes == 1 {
                            self.retained_state = Some(s);
                        } else {
                            keep_newer(&mut self.retained_state, s);
                        }
                    }
                } else if let Some(rest) = p.topic.strip_prefix(&self.status_prefix) {
                    if let Some(device) = rest.strip_suffix("/status") {
                        if let Ok(r) = StatusReport::from_json(&p.payload) {
                            if self.nodes == 1 {
                                self.statuses.insert(device.to_string(), Observed::from_report(&r));
                            } else if mqtt::replaces(self.stamps.get(device).copied(), r.timestamp) {
                                // A node's stale report of a device that moved loses.
                                self.stamps.insert(device.to_string(), r.timestamp);
                                self.statuses.insert(device.to_string(), Observed::from_report(&r));
                            }
                        } else if p.payload.is_empty() && self.nodes == 1 {
                            // Several nodes: another node may hold the device's report.
                            self.statuses.remove(device);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Processes events until `deadline` (a quiet broker is no error).
    fn pump(&mut self, session: &mut Readers, deadline: Instant) -> Result<(), MqttError> {
        loop {
            match session.next(deadline, "reading statuses") {
                Ok(e) => self.handle(e),
                Err(MqttError::Timeout { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every publish so far was acknowledged, each within `timeout`.
    fn flush(&mut self, session: &mut Readers) -> Result<(), MqttError> {
        self.flush_to(session, 0)
    }

    /// Waits until at most `max` PUBACKs are still to come, each within `timeout`.
    fn flush_to(&mut self, session: &mut Readers, max: usize) -> Result<(), MqttError> {
        let mut deadline = Instant::now() + session.timeout;
        while self.unacked > max {
            let before = self.unacked;
            let e = session.next(deadline, "waiting for PUBACKs")?;
            self.handle(e);
            if self.unacked < before {
                deadline = Instant::now() + session.timeout;
            }
        }
        Ok(())
    }
}

/// Retains `payload` on `topic`, on every node.
fn publish(
    session: &mut Readers,
    listener: &mut Listener,
    topic: String,
    payload: Vec<u8>,
) -> Result<(), MqttError> {
    listener.unacked += session.publish_retained(topic, payload)?;
    Ok(())
}

/// Runs `fleet-bundler rollout`; returns how it ended and the last state.
pub fn run(args: &RolloutArgs) -> Result<(Outcome, Option<RolloutState>), MqttError> {
    let brokers = args.broker.all()?;
    if args.abort {
        return abort(args, brokers);
    }
    let out = args.out.clone().ok_or_else(|| MqttError::Usage("pass --out DIR (the build output)".into()))?;
    if args.base_urls.is_empty() && !args.blobs_over_mqtt {
        return Err(MqttError::Usage(
            "nothing tells devices where to fetch bundles: pass --base-url URL and/or --blobs-over-mqtt"
                .into(),
        ));
    }
    let index_path = out.join("index.json");
    let index = Index::read(&index_path)?.ok_or_else(|| {
        MqttError::Usage(format!(
            "{} does not exist: run `fleet-bundler build --out {}` first",
            index_path.display(),
            out.display()
        ))
    })?;
    let plan = index.rollout.clone().ok_or_else(|| {
        MqttError::Usage(format!(
            "{} has no rollout: fleet.yaml of commit {} declares no `rollout:`, so `build` wrote the pointer files \
             to {}/devices/ already; announce with `fleet-bundler publish`",
            index_path.display(),
            index.commit,
            out.display()
        ))
    })?;
    if let Some(f) = &args.fleet {
        if *f != index.fleet {
            return Err(MqttError::Usage(format!(
                "--fleet {f} but {} is fleet {}",
                index_path.display(),
                index.fleet
            )));
        }
    }
    let prefix = args.prefix.clone().unwrap_or_else(|| index.topic_prefix.clone());
    let topic = rollout_topic(&prefix, &index.fleet)?;
    let digests: BTreeMap<String, String> =
        index.devices.iter().map(|(id, e)| (id.clone(), e.digest.clone())).collect();
    let target = Target::new(&index.fleet, &index.commit, &plan, &digests);

    // Announcements go out with at most MAX_IN_FLIGHT PUBACKs to come (plus the state).
    let mut session = Readers::connect(&args.broker, brokers, args.connect_timeout, 2 * MAX_IN_FLIGHT + 64)?;
    let nodes = brokers.len();
    let mut listener = Listener::new(
        nodes,
        format!("{prefix}/{}/devices/", index.fleet),
        topic.clone(),
        index.commit.clone(),
    );
    // Several nodes: each device's exact status topic (a broker that keeps retained
    // messages per node, RabbitMQ, sends none to a wildcard filter).
    let mut filters = vec![topic.clone()];
    if nodes == 1 {
        filters.push(Topic::fleet_filter(&prefix, &index.fleet, TopicKind::Status)?);
    } else {
        for device in index.devices.keys() {
            filters.push(Topic::new(&prefix, &index.fleet, device, TopicKind::Status)?.to_string());
        }
    }
    let subscriptions = session.subscribe(&filters, QoS::AtLeastOnce)?;
    drop(filters);
    // The retained messages: until every subscription is acknowledged and nothing
    // arrived for --settle.
    let start = Instant::now();
    loop {
        let seen = listener.statuses.len() + usize::from(listener.retained_state.is_some());
        let subscribed = listener.subacks >= subscriptions;
        let deadline = if !subscribed { start + session.timeout } else { Instant::now() + args.settle };
        match session.next(deadline, "reading the retained statuses") {
            Ok(e) => listener.handle(e),
            Err(MqttError::Timeout { .. }) if subscribed => break,
            Err(e) => return Err(e),
        }
        let now_seen = listener.statuses.len() + usize::from(listener.retained_state.is_some());
        // Several nodes: always the settle (a device's newer report may be on another
        // node than the one whose report came first).
        if nodes == 1
            && listener.subacks >= subscriptions
            && now_seen == seen
            && listener.statuses.len() >= index.devices.len()
        {
            // Every device reported already: no need to wait for stragglers.
            if listener.retained_state.is_some() {
                break;
            }
        }
    }

    let retained = listener.retained_state.take().filter(|s| s.fleet.is_empty() || s.fleet == index.fleet);
    let (mut state, superseded) = target.resume(retained, now_ms());
    if let Some(old) = superseded {
        eprintln!(
            "rollout of commit {} (wave {} of {}) is superseded by commit {}: starting at wave 1",
            short(&old.commit),
            old.wave + 1,
            old.waves.len(),
            short(&index.commit)
        );
    } else if state.started_at == state.updated_at && state.waves.iter().all(|w| w.started_at.is_none()) {
        eprintln!("starting the rollout of commit {} in {} wave(s)", short(&index.commit), state.waves.len());
    } else if state.state == Phase::Running {
        eprintln!(
            "resuming the rollout of commit {} at wave {} ({})",
            short(&index.commit),
            state.wave + 1,
            state.waves[state.wave.min(state.waves.len() - 1)].name
        );
    }
    if state.state != Phase::Running {
        session.disconnect();
        return Ok((outcome_of(state.state), Some(state)));
    }
    if state.waves.iter().all(|w| w.started_at.is_none()) {
        // A rollout that starts checks, as `publish` does, that devices will not refuse
        // its versions as not newer than what the broker retains for them (a build
        // that lost its output directory): the canary wave would fail on it. No status
        // about this commit can arrive yet, so nothing is missed meanwhile.
        let mut announcing = BTreeMap::new();
        for (device, entry) in &index.devices {
            let topic = Topic::new(&prefix, &index.fleet, device, TopicKind::Desired)?.to_string();
            announcing.insert(topic, (device.clone(), entry.version, entry.digest.clone()));
        }
        let filters = if nodes == 1 {
            vec![Topic::fleet_filter(&prefix, &index.fleet, TopicKind::Desired)?]
        } else {
            announcing.keys().cloned().collect()
        };
        let conflicts = mqtt::retained_not_newer(&mut session, &filters, &announcing, args.settle)?;
        if !conflicts.is_empty() {
            session.disconnect();
            return Err(MqttError::NotNewer { conflicts });
        }
    }

    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut published = mqtt::read_published(&out);
    let mut last_published: Option<RolloutState> = None;
    let mut last_line = String::new();
    loop {
        if let Some(aborted) = listener.aborted.take() {
            state = aborted;
        }
        let now = now_ms();
        let effects = judge::step(&target, &mut state, &listener.statuses, now);
        for effect in effects {
            if state.state != Phase::Running {
                break;
            }
            match effect {
                Effect::Release(w) => {
                    release(&out, &index, &target, w, &mut session, &mut listener)?;
                    eprintln!(
                        "wave {} ({}): {} device(s) released",
                        w + 1,
                        target.waves[w].name,
                        target.waves[w].devices.len()
                    );
                    if let Some(cmd) = &args.sync {
                        if let Err(message) =
                            sync(cmd, &out, &target.waves[w].name, &mut session, &mut listener)
                        {
                            judge::sync_failed(&mut state, &message, now_ms());
                        }
                    }
                }
                Effect::Announce(devices) => {
                    for device in &devices {
                        let Some(entry) = index.devices.get(device) else { continue };
                        if args.blobs_over_mqtt {
                            // Its artifact blobs not retained yet, chunk by chunk.
                            for (sha, size) in mqtt::bundle_artifacts(&out, entry)? {
                                if published.mqtt_blobs.contains_key(&sha) {
                                    continue;
                                }
                                mqtt::for_each_chunk(&out, &index, &sha, size, |t, chunk| {
                                    publish(&mut session, &mut listener, t, chunk)?;
                                    listener.flush_to(&mut session, MAX_IN_FLIGHT)
                                })?;
                                published.mqtt_blobs.insert(sha, size);
                            }
                            let (t, bytes) = mqtt::blob_message(&out, &index, device, entry)?;
                            publish(&mut session, &mut listener, t, bytes)?;
                            listener.flush_to(&mut session, MAX_IN_FLIGHT)?;
                        }
                        let payload = mqtt::announcement_payload(
                            &index,
                            device,
                            entry,
                            &args.base_urls,
                            args.blobs_over_mqtt,
                        );
                        published.devices.insert(device.clone(), hex::encode(Sha256::digest(&payload)));
                        let t = Topic::new(&prefix, &index.fleet, device, TopicKind::Desired)?.to_string();
                        publish(&mut session, &mut listener, t, payload)?;
                        // Bounded: one payload built at a time, the broker's acks pace us.
                        listener.flush_to(&mut session, MAX_IN_FLIGHT)?;
                    }
                    published.blobs = args.blobs_over_mqtt;
                    listener.flush(&mut session)?;
                    mqtt::write_published(&out, &published)?;
                }
            }
        }
        if last_published.as_ref() != Some(&state) {
            let json = serde_json::to_vec(&state).expect("a rollout state serializes");
            publish(&mut session, &mut listener, topic.clone(), json)?;
            listener.flush(&mut session)?;
            last_published = Some(state.clone());
            let line = line(&state);
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        }
        if state.state != Phase::Running || args.once {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!(
                "timeout: the rollout is still running; run `fleet-bundler rollout` again to resume it"
            );
            break;
        }
        listener.pump(&mut session, Instant::now() + Duration::from_millis(200))?;
    }
    listener.flush(&mut session)?;
    session.disconnect();
    Ok((outcome_of(state.state), Some(state)))
}

fn outcome_of(phase: Phase) -> Outcome {
    match phase {
        Phase::Running => Outcome::Running,
        Phase::Halted => Outcome::Halted,
        Phase::Done => Outcome::Done,
        Phase::Aborted => Outcome::Aborted,
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// One line about a rollout state, as `rollout` and `status` print it.
pub fn line(s: &RolloutState) -> String {
    let w = s.waves.get(s.wave);
    let mut text = format!(
        "rollout {} of {}: {}, wave {}/{}",
        s.fleet,
        short(&s.commit),
        s.state.as_str(),
        (s.wave + 1).min(s.waves.len()),
        s.waves.len()
    );
    if let Some(w) = w {
        text.push_str(&format!(
            " ({}): {} announced, {} succeeded, {} failed, {} pending of {}",
            w.name, w.announced, w.succeeded, w.failed, w.pending, w.devices
        ));
    }
    if let Some(r) = &s.reason {
        text.push_str(&format!("; {r}"));
    }
    text
}

/// Moves wave `w`'s pointer files from `DIR/devices.next/` into `DIR/devices/`: one
/// rename(2) each, then one fsync of both directories. A file already moved (a run
/// stopped mid-wave) is written again from the index if it differs, so this is
/// idempotent. The MQTT session is polled at least every second meanwhile, so that the
/// broker does not drop it at the keep-alive during a long wave.
fn release(
    out: &Path,
    index: &Index,
    target: &Target,
    w: usize,
    session: &mut Readers,
    listener: &mut Listener,
) -> Result<(), MqttError> {
    let dir = out.join("devices");
    let next_dir = out.join(NEXT_POINTERS);
    std::fs::create_dir_all(&dir).map_err(|source| MqttError::File { path: dir.clone(), source })?;
    let mut polled = Instant::now();
    for d in &target.waves[w].devices {
        let Some(entry) = index.devices.get(&d.id) else { continue };
        let name = format!("{}.json", d.id);
        let path = dir.join(&name);
        let next = next_dir.join(&name);
        match std::fs::rename(&next, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let json = build::pointer_json(&index.fleet, &d.id, entry);
                if std::fs::read(&path).ok().as_deref() != Some(&json[..]) {
                    build::write_atomic(&path, &json, false)?;
                }
            }
            Err(source) => return Err(MqttError::File { path: next, source }),
        }
        if polled.elapsed() >= Duration::from_secs(1) {
            listener.pump(session, Instant::now() + Duration::from_millis(1))?;
            polled = Instant::now();
        }
    }
    for d in [&dir, &next_dir] {
        match std::fs::File::open(d).and_then(|f| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(MqttError::File { path: d.clone(), source }),
        }
    }
    Ok(())
}

/// Runs `--sync` (`sh -c CMD`, with FLEET_OUT and FLEET_ROLLOUT_WAVE set) while
/// keeping the MQTT session alive. `Err`: why it failed.
fn sync(
    cmd: &str,
    out: &Path,
    wave: &str,
    session: &mut Readers,
    listener: &mut Listener,
) -> Result<(), String> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("FLEET_OUT", out)
        .env("FLEET_ROLLOUT_WAVE", wave)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("--sync {cmd:?} could not start: {e}"))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!("--sync {cmd:?} failed ({status}) for wave {wave}: fix the upload and run `fleet-bundler rollout` again after `--abort`, or build a new commit"))
            }
            Ok(None) => {}
            Err(e) => return Err(format!("--sync {cmd:?}: {e}")),
        }
        if let Err(e) = listener.pump(session, Instant::now() + Duration::from_millis(100)) {
            let _ = child.kill();
            return Err(format!("the broker connection failed during --sync: {e}"));
        }
    }
}

/// `--abort`: marks the retained state of the fleet's rollout aborted (on every node:
/// the newest state of any node is the one aborted).
fn abort(args: &RolloutArgs, brokers: &[String]) -> Result<(Outcome, Option<RolloutState>), MqttError> {
    let index = match &args.out {
        Some(out) => Index::read(&out.join("index.json"))?,
        None => None,
    };
    let fleet =
        args.fleet.clone().or_else(|| index.as_ref().map(|i| i.fleet.clone())).ok_or_else(|| {
            MqttError::Usage("--abort needs --fleet NAME (or --out DIR of the build)".into())
        })?;
    let prefix = args
        .prefix
        .clone()
        .or_else(|| index.as_ref().map(|i| i.topic_prefix.clone()))
        .unwrap_or_else(|| DEFAULT_PREFIX.into());
    let topic = rollout_topic(&prefix, &fleet)?;
    let mut session = Readers::connect(&args.broker, brokers, args.connect_timeout, 16)?;
    let nodes = brokers.len();
    let mut listener = Listener::new(nodes, String::new(), topic.clone(), String::new());
    let subscriptions = session.subscribe(std::slice::from_ref(&topic), QoS::AtLeastOnce)?;
    let start = Instant::now();
    // Until every node delivered its state, or nothing more came for --settle.
    let every_node = if nodes >= 64 { u64::MAX } else { (1u64 << nodes) - 1 };
    while listener.state_nodes != every_node {
        let subscribed = listener.subacks >= subscriptions;
        let deadline = if !subscribed { start + session.timeout } else { Instant::now() + args.settle };
        match session.next(deadline, "reading the rollout state") {
            Ok(e) => listener.handle(e),
            Err(MqttError::Timeout { .. }) if subscribed => break,
            Err(e) => return Err(e),
        }
    }
    let Some(mut state) = listener.retained_state.take() else {
        session.disconnect();
        return Err(MqttError::Usage(format!(
            "no rollout state is retained on {topic}: nothing to abort (check --fleet and --prefix)"
        )));
    };
    if matches!(state.state, Phase::Running | Phase::Halted) {
        judge::abort(&mut state, args.reason.as_deref(), now_ms());
        let json = serde_json::to_vec(&state).expect("a rollout state serializes");
        publish(&mut session, &mut listener, topic, json)?;
        listener.flush(&mut session)?;
    } else {
        eprintln!(
            "the rollout of commit {} is {} already: nothing to abort",
            short(&state.commit),
            state.state.as_str()
        );
    }
    session.disconnect();
    Ok((outcome_of(state.state), Some(state)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::messages::{Applied, DeviceState};

    const TOPIC: &str = "fleet/acme/rollout";

    fn state(phase: Phase, commit: &str, updated_at: i64) -> RolloutState {
        serde_json::from_value(serde_json::json!({
            "fleet": "acme", "commit": commit, "state": phase.as_str(), "wave": 0,
            "started_at": 1, "updated_at": updated_at, "waves": [],
            "halt": {"max_failed": null, "max_failed_rate": null, "min_reporting": 0}
        }))
        .expect("a rollout state")
    }

    fn report(digest: &str, timestamp: i64) -> Vec<u8> {
        StatusReport {
            device: "d1".into(),
            fleet: "acme".into(),
            agent_version: "0".into(),
            state: DeviceState::Converged,
            desired: None,
            applied: Some(Applied {
                version: 1,
                digest: digest.into(),
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

    fn message(node: usize, topic: &str, payload: &[u8]) -> (usize, Event) {
        let mut p = rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.retain = true;
        (node, Event::Incoming(Packet::Publish(p)))
    }

    fn listener(nodes: usize) -> Listener {
        Listener::new(nodes, "fleet/acme/devices/".into(), TOPIC.into(), "c1".into())
    }

    fn applied(l: &Listener) -> Option<&str> {
        l.statuses.get("d1").and_then(|o| o.applied_digest.as_deref())
    }

    #[test]
    fn several_nodes_the_newest_status_wins_and_nothing_clears_it() {
        let status = "fleet/acme/devices/d1/status";
        let mut l = listener(3);
        // d1 moved from node 0 to node 1: node 0's stale report arrives last and loses.
        l.handle(message(1, status, &report("new", 200)));
        l.handle(message(0, status, &report("old", 100)));
        assert_eq!(applied(&l), Some("new"));
        // Hostile or empty messages of any node change nothing.
        for hostile in [&b""[..], b"not json", b"{\"timestamp\": 999999999999}", &[0xff; 32]] {
            l.handle(message(2, status, hostile));
            assert_eq!(applied(&l), Some("new"), "{:?}", String::from_utf8_lossy(hostile));
        }
        // The same second: the later message.
        l.handle(message(2, status, &report("later", 200)));
        assert_eq!(applied(&l), Some("later"));
        // A topic of another fleet or kind is no status.
        l.handle(message(0, "fleet/other/devices/d1/status", &report("x", 900)));
        l.handle(message(0, "fleet/acme/devices/d1/online", &report("x", 900)));
        assert_eq!(applied(&l), Some("later"));

        // One node: the latest message, whatever its timestamp; an empty one clears.
        let mut one = listener(1);
        one.handle(message(0, status, &report("new", 200)));
        one.handle(message(0, status, &report("old", 100)));
        assert_eq!(applied(&one), Some("old"));
        one.handle(message(0, status, b""));
        assert_eq!(applied(&one), None);
    }

    #[test]
    fn several_nodes_the_newest_rollout_state_wins_and_an_abort_on_any_node_counts() {
        let mut l = listener(3);
        l.handle(message(2, TOPIC, &serde_json::to_vec(&state(Phase::Running, "c1", 300)).expect("json")));
        // A node that missed the last publish (a run stopped between nodes) loses.
        l.handle(message(0, TOPIC, &serde_json::to_vec(&state(Phase::Running, "c0", 100)).expect("json")));
        l.handle(message(1, TOPIC, b"{not a state"));
        assert_eq!(l.retained_state.as_ref().map(|s| (s.commit.as_str(), s.updated_at)), Some(("c1", 300)));
        assert_eq!(l.state_nodes, 0b101, "node 1 delivered no state");
        assert!(l.aborted.is_none());
        l.handle(message(1, TOPIC, &serde_json::to_vec(&state(Phase::Aborted, "c1", 400)).expect("json")));
        assert_eq!(l.aborted.as_ref().map(|s| s.state), Some(Phase::Aborted));
        assert_eq!(l.retained_state.as_ref().map(|s| s.state), Some(Phase::Aborted));
        // An abort of another commit is not ours.
        let mut other = listener(2);
        other.handle(message(0, TOPIC, &serde_json::to_vec(&state(Phase::Aborted, "c9", 1)).expect("json")));
        assert!(other.aborted.is_none());

        // keep_newer: an equal updated_at takes the later message.
        let mut slot = Some(state(Phase::Running, "a", 5));
        keep_newer(&mut slot, state(Phase::Halted, "b", 5));
        assert_eq!(slot.as_ref().map(|s| s.commit.as_str()), Some("b"));
        keep_newer(&mut slot, state(Phase::Running, "c", 4));
        assert_eq!(slot.as_ref().map(|s| s.commit.as_str()), Some("b"));

        // One node: the latest message, as before.
        let mut one = listener(1);
        one.handle(message(0, TOPIC, &serde_json::to_vec(&state(Phase::Running, "c1", 300)).expect("json")));
        one.handle(message(0, TOPIC, &serde_json::to_vec(&state(Phase::Running, "c0", 100)).expect("json")));
        assert_eq!(one.retained_state.as_ref().map(|s| s.commit.as_str()), Some("c0"));
    }

    #[test]
    fn every_node_acknowledges_its_copy() {
        let mut l = listener(3);
        l.unacked = 3;
        for node in 0..3 {
            l.handle((node, Event::Incoming(Packet::PubAck(rumqttc::PubAck::new(1)))));
        }
        assert_eq!(l.unacked, 0);
        l.handle((0, Event::Incoming(Packet::PubAck(rumqttc::PubAck::new(1)))));
        assert_eq!(l.unacked, 0, "a stray PUBACK does not wrap");
    }
}
