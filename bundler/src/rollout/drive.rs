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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_spec::messages::StatusReport;
use fleet_spec::topic::{Topic, TopicKind, DEFAULT_PREFIX};
use rumqttc::{Event, Packet, QoS};
use sha2::{Digest, Sha256};

use super::judge::{self, Effect, Observed, Phase, RolloutState, Target};
use crate::build::{self, Index, NEXT_POINTERS};
use crate::mqtt::{self, BrokerArgs, MqttError, Session};

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
    /// Also retain each announced bundle's bytes on `<prefix>/<fleet>/devices/<id>/bundle`.
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

/// What the driver hears from the broker.
struct Listener {
    status_prefix: String,
    rollout_topic: String,
    statuses: BTreeMap<String, Observed>,
    retained_state: Option<RolloutState>,
    /// An `aborted` state for our commit seen on the rollout topic.
    aborted: Option<RolloutState>,
    commit: String,
    unacked: usize,
    subacks: usize,
}

impl Listener {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::SubAck(_)) => self.subacks += 1,
            Event::Incoming(Packet::PubAck(_)) => self.unacked = self.unacked.saturating_sub(1),
            Event::Incoming(Packet::Publish(p)) => {
                if p.topic == self.rollout_topic {
                    if let Ok(s) = serde_json::from_slice::<RolloutState>(&p.payload) {
                        if s.state == Phase::Aborted && s.commit == self.commit {
                            self.aborted = Some(s.clone());
                        }
                        self.retained_state = Some(s);
                    }
                } else if let Some(rest) = p.topic.strip_prefix(&self.status_prefix) {
                    if let Some(device) = rest.strip_suffix("/status") {
                        if let Ok(r) = StatusReport::from_json(&p.payload) {
                            self.statuses.insert(device.to_string(), Observed::from_report(&r));
                        } else if p.payload.is_empty() {
                            self.statuses.remove(device);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Processes events until `deadline` (a quiet broker is no error).
    fn pump(&mut self, session: &mut Session, deadline: Instant) -> Result<(), MqttError> {
        loop {
            match session.next(deadline, "reading statuses") {
                Ok(e) => self.handle(e),
                Err(MqttError::Timeout { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every publish so far was acknowledged, each within `timeout`.
    fn flush(&mut self, session: &mut Session) -> Result<(), MqttError> {
        self.flush_to(session, 0)
    }

    /// Waits until at most `max` publishes are unacknowledged, each ack within `timeout`.
    fn flush_to(&mut self, session: &mut Session, max: usize) -> Result<(), MqttError> {
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

fn publish(
    session: &mut Session,
    listener: &mut Listener,
    topic: String,
    payload: Vec<u8>,
) -> Result<(), MqttError> {
    session.client.publish(topic, QoS::AtLeastOnce, true, payload).map_err(|e| MqttError::Lost {
        broker: session.broker.clone(),
        what: "publishing".into(),
        message: e.to_string(),
    })?;
    listener.unacked += 1;
    Ok(())
}

/// Runs `fleet-bundler rollout`; returns how it ended and the last state.
pub fn run(args: &RolloutArgs) -> Result<(Outcome, Option<RolloutState>), MqttError> {
    args.broker.single("rollout")?;
    if args.abort {
        return abort(args);
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

    // Announcements go out with at most MAX_IN_FLIGHT unacknowledged (plus the state).
    let mut session = Session::connect(&args.broker, args.connect_timeout, 2 * MAX_IN_FLIGHT + 64)?;
    let mut listener = Listener {
        status_prefix: format!("{prefix}/{}/devices/", index.fleet),
        rollout_topic: topic.clone(),
        statuses: BTreeMap::new(),
        retained_state: None,
        aborted: None,
        commit: index.commit.clone(),
        unacked: 0,
        subacks: 0,
    };
    let status_filter = Topic::fleet_filter(&prefix, &index.fleet, TopicKind::Status)?;
    session.client.subscribe(&topic, QoS::AtLeastOnce).map_err(|e| mqtt::lost(&session, e))?;
    session.client.subscribe(status_filter, QoS::AtLeastOnce).map_err(|e| mqtt::lost(&session, e))?;
    // The retained messages: until both subscriptions are acknowledged and nothing
    // arrived for --settle.
    let start = Instant::now();
    loop {
        let seen = listener.statuses.len() + usize::from(listener.retained_state.is_some());
        let deadline =
            if listener.subacks < 2 { start + session.timeout } else { Instant::now() + args.settle };
        match session.next(deadline, "reading the retained statuses") {
            Ok(e) => listener.handle(e),
            Err(MqttError::Timeout { .. }) if listener.subacks >= 2 => break,
            Err(e) => return Err(e),
        }
        let now_seen = listener.statuses.len() + usize::from(listener.retained_state.is_some());
        if listener.subacks >= 2 && now_seen == seen && listener.statuses.len() >= index.devices.len() {
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
        let filter = Topic::fleet_filter(&prefix, &index.fleet, TopicKind::Desired)?;
        let conflicts = mqtt::retained_not_newer(&mut session, &[filter], &announcing, args.settle)?;
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
    session: &mut Session,
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
    session: &mut Session,
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

/// `--abort`: marks the retained state of the fleet's rollout aborted.
fn abort(args: &RolloutArgs) -> Result<(Outcome, Option<RolloutState>), MqttError> {
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
    let mut session = Session::connect(&args.broker, args.connect_timeout, 16)?;
    let mut listener = Listener {
        status_prefix: String::new(),
        rollout_topic: topic.clone(),
        statuses: BTreeMap::new(),
        retained_state: None,
        aborted: None,
        commit: String::new(),
        unacked: 0,
        subacks: 0,
    };
    session.client.subscribe(&topic, QoS::AtLeastOnce).map_err(|e| mqtt::lost(&session, e))?;
    let start = Instant::now();
    while listener.retained_state.is_none() {
        let deadline =
            if listener.subacks < 1 { start + session.timeout } else { Instant::now() + args.settle };
        match session.next(deadline, "reading the rollout state") {
            Ok(e) => listener.handle(e),
            Err(MqttError::Timeout { .. }) if listener.subacks >= 1 => break,
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
