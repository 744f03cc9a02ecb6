//! Building: signed, content-addressed bundles, `index.json` and the per-device
//! pointer files.
//!
//! Output layout:
//!
//! ```text
//! DIR/bundles/<sha256 of the bundle>.bundle
//! DIR/index.json   {"fleet", "commit", "topic_prefix",
//!                   "devices": {"<id>": {"version", "digest", "size", "commit",
//!                                        "state_digest", "labels"}}}
//! DIR/devices/<id>.json   the device's fleet_spec Announcement, `urls` empty
//! DIR/blobs/<sha256>      the bytes of an artifact (bundle format 5) or of an agent
//!                         binary (bundle format 7), one per content
//! ```
//!
//! `index.json` is for `publish`, `status` and people; agents poll only their own
//! pointer file (`fleet_spec::messages::pointer_path`), so what a device downloads per
//! poll does not grow with the fleet. Bundles are written first, then the index (the
//! record the versioning rule reads), then the pointer files from the index: a pointer
//! file is (re)written when its content differs from the index entry, so unchanged
//! devices' files are left untouched and a build interrupted before its pointer files
//! is completed by the next one. Pointer files of devices no longer in the fleet are
//! deleted.
//!
//! Versioning rule: when `DIR/index.json` exists from an earlier build and a device's
//! `state_digest` (sha256 of its canonical desired state) is unchanged, its bundle and
//! version are kept and nothing is written for it. Otherwise its new version is
//! `max(commit committer time in seconds, previous version + 1)`. Versions therefore
//! only grow across successive builds into the same directory, also from shallow
//! clones and rebased history; building the same commit into an empty directory gives
//! identical bytes (`created_at` is the committer time, `expires_at` adds the fleet's
//! `bundle_expiry`).
//!
//! Renewal: a kept bundle is rebuilt (with a new version) once the commit being built
//! is past half of its validity, so devices never end up with an expired bundle as
//! long as something is committed and built regularly (an empty commit will do).
//!
//! The previous build: `DIR/index.json`, and the published build given with
//! `--previous` ([`crate::previous`]) when CI lost `DIR`; per device the entry with
//! the higher version counts, so versions stay above what devices hold.
//!
//! Artifacts: after rendering, before encoding, the files that [`crate::artifacts`]
//! names (larger than `--artifact-threshold`, or over `--inline-budget`) leave the
//! state's inline files for its `artifacts`, and their bytes are written once as
//! `DIR/blobs/<sha256>`: skipped when a file of that name and size exists, otherwise a
//! temp file in `blobs/`, fsync, rename. Blobs are shared by every device and every
//! version with the same bytes, and never deleted (a device may still be fetching an
//! older version's). Since a state names its artifacts by digest, an unchanged large
//! file keeps its blob and a device that holds it downloads nothing.
//!
//! Agent releases: a device whose rendered state declares an agent release (`fleet.yaml`
//! `agent:`) gets the binaries of that version from `--agent-release`
//! ([`crate::agent_release::Releases::attach`]), one per architecture, named by sha256 and
//! size in its signed state (bundle format 7); each binary is written once as
//! `DIR/blobs/<sha256>` like an artifact's bytes, and only when a device names it.
//!
//! Commit dates are checked against the build's `now` before anything is written
//! ([`check_commit_time`]): a commit dated in the future or whose bundles would be
//! expired already is refused.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use fleet_spec::bundle::{self, BundleMeta, Limits};
use fleet_spec::messages::Announcement;
use fleet_spec::topic::{validate_id, TopicError};
use fleet_spec::{DesiredState, SigningKey};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::agent_release::Releases;
use crate::artifacts;
use crate::previous::Previous;
use crate::render::Fleet;
use crate::repo::Snapshot;
use crate::timefmt;

/// How far a commit may be dated ahead of the build machine's clock (clock skew).
pub const MAX_CLOCK_SKEW: i64 = 300;

/// `DIR/index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub fleet: String,
    /// The commit of the latest build.
    pub commit: String,
    /// MQTT topic prefix of the fleet (from fleet.yaml), for `publish` and `status`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    pub devices: BTreeMap<String, IndexEntry>,
    /// `rollout:` of `fleet.yaml` and each device's wave, when declared: then the
    /// pointer files of this build are in `devices.next/` until `fleet-bundler rollout`
    /// releases them wave by wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::RolloutPlan>,
}

/// Where a build with a declared rollout writes its pointer files; `fleet-bundler
/// rollout` moves them into `devices/` wave by wave.
pub const NEXT_POINTERS: &str = "devices.next";

fn default_prefix() -> String {
    fleet_spec::topic::DEFAULT_PREFIX.into()
}

/// One device's current bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub version: u64,
    /// Hex sha256 of the bundle: `bundles/<digest>.bundle`.
    pub digest: String,
    pub size: u64,
    /// The commit this bundle was built from (older than the index's commit when the
    /// device's state did not change since).
    pub commit: String,
    /// [`DesiredState::digest`] of the bundle's state.
    pub state_digest: String,
    /// The device's labels, so `status --selector` can pick devices.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl IndexEntry {
    /// `device`'s announcement without URLs: the content of its pointer file, and what
    /// `publish` completes with the base URLs.
    pub fn announcement(&self, fleet: &str, device: &str) -> Announcement {
        Announcement {
            fleet: fleet.into(),
            device: device.into(),
            version: self.version,
            commit: self.commit.clone(),
            digest: self.digest.clone(),
            size: self.size,
            urls: Vec::new(),
            mqtt_blob: false,
        }
    }
}

impl Index {
    pub fn read(path: &Path) -> Result<Option<Index>, BuildError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| BuildError::BadIndex { path: path.into(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BuildError::Io { path: path.into(), source }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid index: {message} (remove it to start a fresh version history)")]
    BadIndex { path: PathBuf, message: String },
    #[error("{path} belongs to fleet {found:?}, this repository is fleet {expected:?}: use another output directory")]
    OtherFleet { path: PathBuf, found: String, expected: String },
    #[error("device {device} no longer renders: {message}")]
    Render { device: String, message: String },
    #[error("{0}: a device id names the file devices/<id>.json of the build output")]
    DeviceId(TopicError),
    #[error("zstd: {0}")]
    Compress(std::io::Error),
    #[error("commit {commit} is dated {}, {} ahead of this machine's clock ({}; {} of skew allowed): bundles carry the commit time as their signed creation time and as their version, and devices take the signed creation time as a floor for their own clock, so this build would move every device's clock and versions into the future; fix the clock that is wrong, then re-date the commit (`git commit --amend --no-edit` on a machine whose clock is right) and build again (nothing was written)",
        timefmt::rfc3339(*commit_time), timefmt::age(commit_time - now), timefmt::rfc3339(*now), timefmt::age(MAX_CLOCK_SKEW))]
    FutureCommit { commit: String, commit_time: i64, now: i64 },
    #[error("the bundles of commit {commit} would expire at {} (its committer date {} + bundle_expiry {}), which is already past ({}): devices refuse expired bundles; build a newer commit (`git commit --allow-empty -m renew`) or raise bundle_expiry in fleet.yaml (nothing was written)",
        timefmt::rfc3339(commit_time.saturating_add(*expiry)), timefmt::rfc3339(*commit_time), timefmt::age(*expiry), timefmt::rfc3339(*now))]
    ExpiredAtBuild { commit: String, commit_time: i64, expiry: i64, now: i64 },
    #[error("--previous {location} belongs to fleet {found:?}, this repository is fleet {expected:?}: pass the published output of this fleet")]
    PreviousOtherFleet { location: String, found: String, expected: String },
}

/// Checks the commit date against `now` (unix seconds, the build machine's clock):
/// refuses a commit dated more than [`MAX_CLOCK_SKEW`] ahead, or whose bundles
/// (`created_at` = commit time, `expires_at` = + `expiry`) would be expired already.
/// Returns a warning when less than half of the validity is left.
pub fn check_commit_time(
    commit: &str,
    commit_time: i64,
    expiry: i64,
    now: i64,
) -> Result<Option<String>, BuildError> {
    let short: String = commit.chars().take(12).collect();
    if commit_time > now + MAX_CLOCK_SKEW {
        return Err(BuildError::FutureCommit { commit: short, commit_time, now });
    }
    let expires_at = commit_time.saturating_add(expiry);
    if expires_at <= now {
        return Err(BuildError::ExpiredAtBuild { commit: short, commit_time, expiry, now });
    }
    if expires_at - now < expiry / 2 {
        return Ok(Some(format!(
            "the bundles of commit {short} expire at {} (in {}), less than half of bundle_expiry ({}) from now: \
             devices refuse them after that; build a newer commit before (`git commit --allow-empty -m renew`)",
            timefmt::rfc3339(expires_at),
            timefmt::age(expires_at - now),
            timefmt::age(expiry)
        )));
    }
    Ok(None)
}

pub struct BuildOptions<'a> {
    pub out: &'a Path,
    pub keys: &'a [SigningKey],
    pub level: i32,
    pub progress: bool,
    /// Image reference → its pin (digest, download size), applied to every tag-only image.
    pub digests: &'a BTreeMap<String, crate::registry::Resolved>,
    /// The build machine's clock (unix seconds), for [`check_commit_time`] and to renew
    /// kept bundles that expired. Bundles do not depend on it.
    pub now: i64,
    /// The published build (`--previous`), when given.
    pub previous: Option<&'a Previous>,
    /// Which files travel as artifacts (`--artifact-threshold`, `--inline-budget`).
    pub artifacts: artifacts::Policy,
    /// The agent releases (`--agent-release`) the states' declared versions are taken
    /// from; every declared version must be among them ([`Releases::missing`] checks).
    pub agent_releases: &'a Releases,
}

/// `DIR/blobs`: the bytes of artifacts and agent binaries, beside `bundles/`.
pub const BLOBS: &str = "blobs";

#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildSummary {
    pub fleet: String,
    pub commit: String,
    pub devices: usize,
    /// Bundles written by this build.
    pub written: usize,
    /// Devices whose bundle was kept.
    pub unchanged: usize,
    /// Devices renewed because their kept bundle was past half its validity.
    pub renewed: usize,
    /// Devices in the previous index but not in this commit.
    pub removed: Vec<String>,
    /// Devices that got a new bundle.
    pub changed: Vec<String>,
    /// Pointer files (`devices/<id>.json`) written because they were missing or held
    /// another announcement.
    pub pointers_written: usize,
    /// Devices whose pointer file was deleted because they are no longer in the fleet.
    pub pointers_deleted: Vec<String>,
    /// Kept bundles taken over from the `--previous` build (copied into `DIR/bundles`).
    pub adopted: usize,
    /// Distinct blobs (`DIR/blobs/<sha256>`) the devices' states name.
    pub blobs: usize,
    /// Blobs written by this build (the others were there with their size already).
    pub blobs_written: usize,
    /// `fleet.yaml` declares a rollout: the pointer files were written to
    /// `devices.next/`, for `fleet-bundler rollout` to release wave by wave.
    pub rollout: bool,
    /// The agent releases the devices' states name (`fleet.yaml` `agent:`), by version;
    /// left out of `--json` when there is none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agent_releases: Vec<AgentReleaseSummary>,
    /// What the build wants people to know (printed on stderr as `warning: ...`).
    pub warnings: Vec<String>,
}

/// One agent release of a build.
#[derive(Debug, Clone, Serialize)]
pub struct AgentReleaseSummary {
    pub version: String,
    /// The `--agent-release` directory it was read from.
    pub dir: PathBuf,
    /// How many devices' states name it (kept bundles included).
    pub devices: usize,
    pub binaries: Vec<AgentBinarySummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentBinarySummary {
    pub arch: String,
    pub sha256: String,
    pub size: u64,
    /// `blobs/<sha256>`.
    pub blob: String,
}

enum Outcome {
    Kept { entry: IndexEntry, adopted: bool },
    New { entry: IndexEntry, renewed: bool, wrote: bool },
}

/// Renders, signs and writes every device's bundle into `opts.out`, one device at a
/// time per thread (memory stays flat for large fleets), then writes `index.json`, then
/// the pointer files. The fleet must have been checked ([`Fleet::check_all`]) before: a
/// device that fails to render here aborts the build before the index is written.
pub fn build(
    fleet: &Fleet,
    snapshot: &Snapshot,
    opts: &BuildOptions<'_>,
) -> Result<BuildSummary, BuildError> {
    // Loading the fleet checked the ids already; they become file names below.
    for id in fleet.devices.keys() {
        validate_id("device id", id).map_err(BuildError::DeviceId)?;
    }
    let mut warnings: Vec<String> =
        check_commit_time(&snapshot.commit, snapshot.commit_time, fleet.bundle_expiry, opts.now)?
            .into_iter()
            .collect();
    let bundles_dir = opts.out.join("bundles");
    std::fs::create_dir_all(&bundles_dir)
        .map_err(|source| BuildError::Io { path: bundles_dir.clone(), source })?;
    let index_path = opts.out.join("index.json");
    let previous = Index::read(&index_path)?;
    if let Some(prev) = &previous {
        if prev.fleet != fleet.name {
            return Err(BuildError::OtherFleet {
                path: index_path,
                found: prev.fleet.clone(),
                expected: fleet.name.clone(),
            });
        }
    }
    // Per device, the higher version of this directory's index and the published one.
    let mut merged: Option<BTreeMap<String, IndexEntry>> = previous.map(|p| p.devices);
    if let Some(published) = opts.previous {
        match &published.index {
            Some(p) if p.fleet != fleet.name => {
                return Err(BuildError::PreviousOtherFleet {
                    location: published.describe(),
                    found: p.fleet.clone(),
                    expected: fleet.name.clone(),
                })
            }
            Some(p) => {
                let devices = merged.get_or_insert_with(BTreeMap::new);
                for (id, e) in &p.devices {
                    if devices.get(id).is_none_or(|mine| mine.version < e.version) {
                        devices.insert(id.clone(), e.clone());
                    }
                }
            }
            None => warnings.push(format!(
                "--previous {} holds no index.json (nothing published there yet?): versions start at the commit time",
                published.describe()
            )),
        }
    } else if merged.is_none() {
        warnings.push(format!(
            "{} does not exist and no --previous was given: versions start at the commit time; if this fleet was \
             built and published before (a lost CI cache), devices refuse bundles not newer than theirs: pass \
             --previous <URL or directory of the published build>",
            index_path.display()
        ));
    }
    let prev_devices = merged.as_ref();
    let keys: Vec<&SigningKey> = opts.keys.iter().collect();
    let done = AtomicUsize::new(0);
    let total = fleet.devices.len();
    let commit_time = snapshot.commit_time.max(0) as u64;
    let blobs_dir = opts.out.join(BLOBS);
    // Each blob is checked or written by the first device that names it.
    let blobs_seen: Mutex<HashSet<[u8; 32]>> = Mutex::new(HashSet::new());
    let blobs_written = AtomicUsize::new(0);
    // Agent release version → how many devices name it.
    let agent_devices: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

    let outcomes: Vec<Result<(String, Outcome), BuildError>> = fleet
        .devices
        .par_iter()
        .map(|(id, device)| {
            let (mut state, diags) = fleet.render(device);
            if let Some(d) = diags.iter().find(|d| d.is_error()) {
                return Err(BuildError::Render { device: id.clone(), message: d.to_string() });
            }
            crate::registry::pin(&mut state, opts.digests);
            if let Some(message) = fleet.unpinned_refusal(device, &state) {
                return Err(BuildError::Render { device: id.clone(), message });
            }
            // Large files leave the bundle; every device writes its blobs, kept or not, so
            // an output directory without them (--previous) is completed.
            let blobs = artifacts::split(&mut state, &opts.artifacts);
            for blob in blobs {
                let first = blobs_seen.lock().expect("no thread panics holding it").insert(blob.sha256);
                if first && write_blob(&blobs_dir, &blob.sha256, &blob.bytes)? {
                    blobs_written.fetch_add(1, Ordering::Relaxed);
                }
            }
            // The declared agent release gets its binaries, each a blob like an artifact's.
            let release = opts
                .agent_releases
                .attach(&mut state)
                .map_err(|message| BuildError::Render { device: id.clone(), message })?;
            if let Some(release) = release {
                *agent_devices
                    .lock()
                    .expect("no thread panics holding it")
                    .entry(release.version.clone())
                    .or_default() += 1;
                for binary in &release.binaries {
                    let first = blobs_seen.lock().expect("no thread panics holding it").insert(binary.sha256);
                    if first && write_blob(&blobs_dir, &binary.sha256, &binary.bytes)? {
                        blobs_written.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // One canonical encoding serves the state digest and the payload.
            state.canonicalize();
            fleet
                .seal(device, &mut state)
                .map_err(|message| BuildError::Render { device: id.clone(), message })?;
            let raw = postcard_encode(&state);
            let format = state.format();
            let state_digest = hex::encode(Sha256::digest(&raw));
            drop(state);
            let labels = device.labels.clone();
            let prev = prev_devices.and_then(|d| d.get(id));
            let mut renewed = false;
            if let Some(prev) = prev {
                if prev.state_digest == state_digest {
                    let mut adopted = false;
                    let mut times = kept_bundle_times(&bundles_dir, &prev.digest, &fleet.name, id);
                    if let (None, Some(published)) = (times, opts.previous) {
                        times = adopt_bundle(published, &bundles_dir, &prev.digest, &fleet.name, id)?;
                        adopted = times.is_some();
                    }
                    match times {
                        Some((created_at, expires_at))
                            if snapshot.commit_time < created_at + fleet.bundle_expiry / 2
                                && opts.now < expires_at =>
                        {
                            tick(&done, total, opts.progress);
                            let entry = IndexEntry { labels, ..prev.clone() };
                            return Ok((id.clone(), Outcome::Kept { entry, adopted }));
                        }
                        Some(_) => renewed = true,
                        None => {}
                    }
                }
            }
            let version = prev.map_or(commit_time, |p| commit_time.max(p.version + 1));
            let meta = BundleMeta {
                fleet: fleet.name.clone(),
                device: id.clone(),
                version,
                commit: snapshot.commit.clone(),
                subject: snapshot.subject.clone(),
                created_at: snapshot.commit_time,
                expires_at: snapshot.commit_time + fleet.bundle_expiry,
            };
            let payload = compress(&raw, opts.level)?;
            let manifest = bundle::manifest_for(meta, &raw, &payload);
            let bytes = bundle::assemble(&manifest, format, &payload, &keys);
            let digest = bundle::content_address(&bytes);
            let wrote = write_bundle(&bundles_dir, &digest, &bytes)?;
            tick(&done, total, opts.progress);
            let entry = IndexEntry {
                version,
                digest,
                size: bytes.len() as u64,
                commit: snapshot.commit.clone(),
                state_digest,
                labels,
            };
            Ok((id.clone(), Outcome::New { entry, renewed, wrote }))
        })
        .collect();

    let agent_devices = agent_devices.into_inner().expect("no thread panicked holding it");
    for release in opts.agent_releases.0.values() {
        if !agent_devices.contains_key(&release.version) {
            warnings.push(format!(
                "--agent-release {} (version {}): no device's agent: rule names this version, so its binaries \
                 were not written",
                release.dir.display(),
                release.version
            ));
        }
    }
    let agent_releases = agent_devices
        .iter()
        .filter_map(|(version, devices)| {
            let release = opts.agent_releases.get(version)?;
            let binaries = release
                .binaries
                .iter()
                .map(|b| AgentBinarySummary {
                    arch: b.arch.clone(),
                    sha256: hex::encode(b.sha256),
                    size: b.bytes.len() as u64,
                    blob: format!("{BLOBS}/{}", hex::encode(b.sha256)),
                })
                .collect();
            Some(AgentReleaseSummary {
                version: version.clone(),
                dir: release.dir.clone(),
                devices: *devices,
                binaries,
            })
        })
        .collect();
    let mut summary = BuildSummary {
        fleet: fleet.name.clone(),
        commit: snapshot.commit.clone(),
        devices: fleet.devices.len(),
        blobs: blobs_seen.into_inner().expect("no thread panicked holding it").len(),
        blobs_written: blobs_written.into_inner(),
        warnings,
        agent_releases,
        ..Default::default()
    };
    let mut devices = BTreeMap::new();
    for outcome in outcomes {
        let (id, outcome) = outcome?;
        match outcome {
            Outcome::Kept { entry, adopted } => {
                summary.unchanged += 1;
                summary.adopted += usize::from(adopted);
                devices.insert(id, entry);
            }
            Outcome::New { entry, renewed, wrote } => {
                summary.written += usize::from(wrote);
                summary.renewed += usize::from(renewed);
                summary.changed.push(id.clone());
                devices.insert(id, entry);
            }
        }
    }
    if let Some(prev) = prev_devices {
        summary.removed = prev.keys().filter(|id| !devices.contains_key(*id)).cloned().collect();
    }
    let index = Index {
        fleet: fleet.name.clone(),
        commit: snapshot.commit.clone(),
        topic_prefix: fleet.topic_prefix.clone(),
        devices,
        rollout: fleet.rollout.clone(),
    };
    let mut json = serde_json::to_vec(&index).expect("an index always serializes");
    json.push(b'\n');
    write_atomic(&index_path, &json, true)?;
    if index.rollout.is_some() {
        // Devices keep polling their previous pointer file until their wave is released.
        (summary.pointers_written, _) = write_pointers(opts.out, NEXT_POINTERS, &index)?;
        summary.pointers_deleted = delete_stale_pointers(&opts.out.join("devices"), &index)?;
        summary.rollout = true;
    } else {
        (summary.pointers_written, summary.pointers_deleted) = write_pointers(opts.out, "devices", &index)?;
    }
    Ok(summary)
}

/// Writes `DIR/devices/<id>.json` for every device of `index` whose file does not hold
/// its announcement yet, and deletes the pointer files of devices that are not in
/// `index` (only files named `<valid device id>.json`: nothing else there is touched).
/// Returns how many files were written and which devices' files were deleted.
fn write_pointers(out: &Path, subdir: &str, index: &Index) -> Result<(usize, Vec<String>), BuildError> {
    // The directory of `pointer_path`.
    let dir = out.join(subdir);
    std::fs::create_dir_all(&dir).map_err(|source| BuildError::Io { path: dir.clone(), source })?;
    let written: Vec<bool> = index
        .devices
        .par_iter()
        .map(|(id, entry)| {
            let path = dir.join(format!("{id}.json"));
            let json = pointer_json(&index.fleet, id, entry);
            if std::fs::read(&path).is_ok_and(|existing| existing == json) {
                return Ok(false);
            }
            // No fsync, as for bundles: the next build rewrites a damaged file.
            write_atomic(&path, &json, false)?;
            Ok(true)
        })
        .collect::<Result<_, BuildError>>()?;
    let deleted = delete_stale_pointers(&dir, index)?;
    Ok((written.into_iter().filter(|w| *w).count(), deleted))
}

/// The content of `device`'s pointer file.
pub fn pointer_json(fleet: &str, device: &str, entry: &IndexEntry) -> Vec<u8> {
    let mut json = entry.announcement(fleet, device).to_json();
    json.push(b'\n');
    json
}

/// Deletes the pointer files in `dir` of devices that are not in `index` (only files
/// named `<valid device id>.json`: nothing else there is touched).
fn delete_stale_pointers(dir: &Path, index: &Index) -> Result<Vec<String>, BuildError> {
    let io = |source| BuildError::Io { path: dir.to_path_buf(), source };
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut deleted = Vec::new();
    for file in std::fs::read_dir(dir).map_err(io)? {
        let file = file.map_err(io)?;
        let name = file.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
        if index.devices.contains_key(id) || validate_id("device id", id).is_err() {
            continue;
        }
        match std::fs::remove_file(file.path()) {
            Ok(()) => deleted.push(id.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(BuildError::Io { path: file.path(), source }),
        }
    }
    deleted.sort();
    Ok(deleted)
}

/// The canonical postcard encoding of an already canonical state (what
/// [`DesiredState::encode`] gives, without its defensive copy).
fn postcard_encode(state: &DesiredState) -> Vec<u8> {
    let raw = state.encode_canonical();
    debug_assert_eq!(raw, state.encode());
    raw
}

thread_local! {
    /// One zstd context per thread and level: contexts are large at high levels.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// zstd at `level`; the same bytes as `zstd::bulk::compress` (a reused context
/// compresses each frame from scratch), so bundles stay deterministic.
fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>, BuildError> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).map_err(BuildError::Compress)?));
        }
        let (_, compressor) = slot.as_mut().expect("set above");
        compressor.compress(raw).map_err(BuildError::Compress)
    })
}

fn tick(done: &AtomicUsize, total: usize, progress: bool) {
    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
    if progress && (n.is_multiple_of(1000) || n == total) {
        eprintln!("  signed {n}/{total} devices");
    }
}

/// `created_at` and `expires_at` of a kept bundle, or `None` when the file is gone,
/// damaged, unreadable or not the device's (then the device gets a fresh bundle).
fn kept_bundle_times(dir: &Path, digest: &str, fleet: &str, device: &str) -> Option<(i64, i64)> {
    let bytes = std::fs::read(dir.join(format!("{digest}.bundle"))).ok()?;
    bundle_times(&bytes, digest, fleet, device)
}

fn bundle_times(bytes: &[u8], digest: &str, fleet: &str, device: &str) -> Option<(i64, i64)> {
    if bundle::content_address(bytes) != digest {
        return None;
    }
    let parsed = bundle::parse(bytes, &Limits::default()).ok()?;
    let m = bundle::decode_manifest(parsed.manifest_bytes).ok()?;
    (m.fleet == fleet && m.device == device).then_some((m.created_at, m.expires_at))
}

/// Takes the published bundle `digest` over from the `--previous` build into `dir`,
/// so an unchanged device keeps its bundle and version after a lost output directory.
fn adopt_bundle(
    published: &Previous,
    dir: &Path,
    digest: &str,
    fleet: &str,
    device: &str,
) -> Result<Option<(i64, i64)>, BuildError> {
    let Some(bytes) = published.bundle(digest) else { return Ok(None) };
    let Some(times) = bundle_times(&bytes, digest, fleet, device) else { return Ok(None) };
    write_bundle(dir, digest, &bytes)?;
    Ok(Some(times))
}

/// Writes `<digest>.bundle` unless it exists; returns whether it wrote.
fn write_bundle(dir: &Path, digest: &str, bytes: &[u8]) -> Result<bool, BuildError> {
    let path = dir.join(format!("{digest}.bundle"));
    if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
        return Ok(false);
    }
    // No fsync per bundle: the index is synced last, and a damaged bundle is detected
    // by its digest and rebuilt by the next build.
    write_atomic(&path, bytes, false)?;
    Ok(true)
}

/// Writes `blobs/<sha256>` (an artifact's or an agent binary's bytes) unless a file of
/// that name and size exists; returns whether it wrote. Synced: a blob is written once
/// and then only ever checked by its size.
fn write_blob(dir: &Path, sha256: &[u8; 32], bytes: &[u8]) -> Result<bool, BuildError> {
    let path = dir.join(hex::encode(sha256));
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(|source| BuildError::Io { path: dir.into(), source })?;
    write_atomic(&path, bytes, true)?;
    Ok(true)
}

/// Temp file in the same directory, write, (fsync,) rename.
pub fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<(), BuildError> {
    let io = |source| BuildError::Io { path: path.into(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    if sync {
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::model::ManagedFile;

    #[test]
    fn a_device_id_that_is_not_a_safe_file_name_is_refused_before_anything_is_written() {
        let snapshot = Snapshot {
            commit: "c".repeat(40),
            commit_time: 1_800_000_000,
            subject: "s".into(),
            files: [("fleet.yaml".to_string(), b"name: acme\n".to_vec())].into(),
            ..Default::default()
        };
        let (mut fleet, diags) = crate::render::load(&snapshot);
        assert!(!diags.iter().any(|d| d.is_error()), "{diags:?}");
        // Loading refuses such ids; a library caller could still put one in.
        let id = "../../etc/x".to_string();
        let device = crate::render::Device {
            id: id.clone(),
            labels: BTreeMap::new(),
            public_keys: Vec::new(),
            vars: Default::default(),
            policy: Default::default(),
            maintenance: Default::default(),
            agent: None,
        };
        fleet.devices.insert(id, device);
        let out = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_seed(&[9; 32]);
        let digests = BTreeMap::new();
        let opts = BuildOptions {
            out: out.path(),
            keys: &[key],
            level: 3,
            progress: false,
            digests: &digests,
            now: snapshot.commit_time,
            previous: None,
            artifacts: Default::default(),
            agent_releases: &Releases::default(),
        };
        let err = build(&fleet, &snapshot, &opts).expect_err("refused");
        assert!(matches!(err, BuildError::DeviceId(_)), "{err}");
        assert!(err.to_string().contains("devices/<id>.json"), "{err}");
        assert_eq!(std::fs::read_dir(out.path()).expect("read").count(), 0, "nothing written");
    }

    #[test]
    fn commit_dates_against_the_clock() {
        let day = 86_400;
        let c = "c".repeat(40);
        let t = 1_800_000_000;
        assert!(matches!(check_commit_time(&c, t, 90 * day, t), Ok(None)));
        assert!(
            matches!(check_commit_time(&c, t + MAX_CLOCK_SKEW, 90 * day, t), Ok(None)),
            "within the skew"
        );
        assert!(matches!(
            check_commit_time(&c, t + MAX_CLOCK_SKEW + 1, 90 * day, t),
            Err(BuildError::FutureCommit { .. })
        ));
        assert!(matches!(check_commit_time(&c, t, 90 * day, t + 44 * day), Ok(None)));
        assert!(matches!(check_commit_time(&c, t, 90 * day, t + 46 * day), Ok(Some(_))), "under half left");
        assert!(matches!(
            check_commit_time(&c, t, 90 * day, t + 90 * day),
            Err(BuildError::ExpiredAtBuild { .. })
        ));
    }

    #[test]
    fn the_streaming_path_gives_fleet_spec_bytes() {
        let mut state = DesiredState {
            files: vec![
                ManagedFile { path: "/b".into(), mode: 0o644, owner: None, content: b"bee\n".repeat(100) },
                ManagedFile { path: "/a".into(), mode: 0o600, owner: None, content: b"a".to_vec() },
            ],
            ..Default::default()
        };
        let key = SigningKey::from_seed(&[9; 32]);
        let meta = BundleMeta {
            fleet: "f".into(),
            device: "d".into(),
            version: 7,
            commit: "c".into(),
            subject: "s".into(),
            created_at: 1,
            expires_at: 2,
        };
        let expected = bundle::build(meta.clone(), &state, &[&key], 19);
        state.canonicalize();
        let raw = postcard_encode(&state);
        assert_eq!(hex::encode(Sha256::digest(&raw)), state.digest());
        for _ in 0..2 {
            // Twice: a reused context gives the same bytes.
            let payload = compress(&raw, 19).expect("compress");
            let bytes =
                bundle::assemble(&bundle::manifest_for(meta.clone(), &raw, &payload), 1, &payload, &[&key]);
            assert_eq!(bytes, expected);
        }
    }
}
