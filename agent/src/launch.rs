//! `fleet-agent launch`: the supervisor that runs the agent and tries the agent binaries
//! the agent downloads for itself (self-update), going back to the previous one when a
//! new one does not confirm in time.
//!
//! The launcher is the packaged binary (`/usr/bin/fleet-agent launch ...`, under systemd
//! or any init). Self-update never replaces it, so a rollback never depends on the new
//! binary working. It is small and synchronous: one child at a time, polled every
//! 200 ms; the only thread it adds listens for signals.
//!
//! ```text
//! <state_dir>/agent/              (0700)
//!   slots/<sha256>                an agent binary (0755), named by its digest
//!   slots/<sha256>.version        the version that binary reports
//!   current -> slots/<sha256>     the confirmed-good agent; absent: the packaged binary
//!   next    -> slots/<sha256>     staged by the agent ([`stage`]), to be tried
//!   trying  -> slots/<sha256>     the binary on trial (`next`, renamed before it starts)
//!   confirm                       the digest on trial, written by it once healthy ([`confirm`])
//!   interrupted                   `<sha256> <n>`: its trial was stopped on request n times
//!   failed/<sha256>               {"reason","at"}: why that binary was rolled back ([`Failure`])
//! ```
//!
//! How a new binary comes in: the running agent verifies it, [`stage`]s it and exits with
//! [`EXIT_SWITCH`]. The launcher renames `next` to `trying` and starts it with
//! `FLEET_AGENT_TRIAL=<sha256>`. Once healthy (connected, reported, reconciled) the agent
//! calls [`confirm`]; the launcher points `current` at it and keeps that same process
//! running. A binary that exits before confirming, or does not confirm within the trial
//! time, is stopped and recorded in `failed/`, and the previous program starts again at
//! once. Of the binaries, only the current one and the one before it are kept.
//!
//! Every change on disk is one rename (or unlink) followed by an fsync of the directory,
//! and the directory alone says what to do after a kill -9 or a power cut at any instant
//! (`recover`, on start): `trying` with a matching `confirm`, or already `current`, is
//! promoted; `trying` without one means the launcher stopped during the trial, which
//! counts as a failure, so that a binary that panics the kernel or reboots the device is
//! not tried again and again. A stop asked for (SIGTERM: `systemctl restart`, a clean
//! reboot) during a trial is not the binary's fault: the launcher stops it, renames
//! `trying` back to `next` and counts the interruption in `interrupted`, and the next
//! start tries it again; [`MAX_INTERRUPTED_TRIALS`] such stops, and the next one fails it.
//!
//! Architecture invariants: the launcher executes only the packaged binary or a
//! `slots/<sha256>` file named by a link in this directory; it never downloads nor
//! verifies (the agent did, before staging); a digest with a `failed/` record never runs
//! again; it never leaves its child running when it exits on its own.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cli::exit;

/// The exit code of an agent that has staged `next` and wants the launcher to try it.
pub const EXIT_SWITCH: u8 = 42;

/// Set to `1` in the agent's environment when a launcher runs it.
pub const ENV_LAUNCHER: &str = "FLEET_AGENT_LAUNCHER";
/// The slot the agent runs from: its sha256, or [`PACKAGE_SLOT`].
pub const ENV_SLOT: &str = "FLEET_AGENT_SLOT";
/// Set to the agent's sha256 while it is on trial: it must [`confirm`] once healthy.
pub const ENV_TRIAL: &str = "FLEET_AGENT_TRIAL";
/// [`ENV_SLOT`] of the packaged binary.
pub const PACKAGE_SLOT: &str = "package";

const SLOTS: &str = "slots";
const FAILED: &str = "failed";
const CURRENT: &str = "current";
const NEXT: &str = "next";
const TRYING: &str = "trying";
const CONFIRM: &str = "confirm";
/// `<sha256> <count>`: how many times the trial of that binary was stopped on request.
const INTERRUPTED: &str = "interrupted";

/// How many trials of one binary a requested stop (SIGTERM, SIGINT: `systemctl restart`,
/// a reboot) may interrupt and have tried again at the next start; the next interrupted
/// trial fails it, so that a binary that shuts the device down is not tried for ever.
const MAX_INTERRUPTED_TRIALS: u32 = 2;

/// The reason recorded when a trial was cut short by the launcher's own end.
const LAUNCHER_STOPPED: &str =
    "its trial did not end: the launcher stopped during it (power cut, crash or kill)";

/// What `fleet-agent launch` runs, and where it keeps its binaries.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// `<state_dir>/agent`: the layout in the module docs.
    pub dir: PathBuf,
    /// The packaged binary (what runs when there is no `current`): normally
    /// `std::env::current_exe()`, taken once at start (a package upgrade replaces the
    /// file, and `/proc/self/exe` then names a deleted one).
    pub fallback: PathBuf,
    /// The version of the packaged binary (`env!("CARGO_PKG_VERSION")` of the launcher).
    pub fallback_version: String,
    /// Arguments for the child, e.g. `["run", "--config", "/etc/fleet-agent/agent.toml"]`.
    pub args: Vec<OsString>,
    /// How long a new binary has to confirm.
    pub trial: Duration,
}

/// Why a binary was rolled back (`failed/<sha256>`); it is never tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// A sentence a person can act on.
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

/// Copies the binary `bytes_from` into `slots/<sha_hex>` (0755) with its version in
/// `slots/<sha_hex>.version`. Not `next` yet: the caller checks the slot first, then
/// [`point_next`]s it (an agent that crashed between the two never gets an unchecked
/// binary tried). Every step is atomic and durable (temp file, fsync, rename, fsync of
/// the directory). The caller has verified that `bytes_from` hashes to `sha_hex`; this
/// does not. Returns the slot's path.
pub fn stage(dir: &Path, sha_hex: &str, version: &str, bytes_from: &Path) -> io::Result<PathBuf> {
    check_sha(sha_hex)?;
    let layout = Layout::new(dir);
    layout.create()?;
    let slot = layout.slot(sha_hex);
    let tmp = tmp_path(&slot);
    let mut from = File::open(bytes_from).map_err(context("open", bytes_from))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(&tmp)
        .map_err(context("create", &tmp))?;
    io::copy(&mut from, &mut to).map_err(context("copy the binary into", &tmp))?;
    to.set_permissions(Permissions::from_mode(0o755)).map_err(context("chmod", &tmp))?;
    to.sync_all().map_err(context("fsync", &tmp))?;
    drop(to);
    fs::rename(&tmp, &slot).map_err(context("rename into place", &slot))?;
    // Its fsync of `slots/` makes the rename above durable too.
    write_atomic(&layout.version_file(sha_hex), version.as_bytes(), 0o644)?;
    Ok(slot)
}

/// `<state_dir>/agent`: the launcher's directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("agent")
}

/// Points `next` at the slot `sha_hex` (atomically and durably), which must exist: the
/// launcher tries it once the agent exits with [`EXIT_SWITCH`] (or restarts).
pub fn point_next(dir: &Path, sha_hex: &str) -> io::Result<()> {
    check_sha(sha_hex)?;
    let slot = Layout::new(dir).slot(sha_hex);
    runnable(&slot).map_err(|why| io::Error::new(io::ErrorKind::NotFound, why))?;
    set_link(dir, NEXT, sha_hex)
}

/// Undoes a [`stage`] of `sha_hex`: removes `next` when it names it, and its slot
/// (unless that slot is the current one or on trial), durably. Nothing staged is fine;
/// a failure is logged.
pub fn unstage(dir: &Path, sha_hex: &str) {
    let layout = Layout::new(dir);
    let sha = sha_hex.to_owned();
    if layout.link(NEXT) == Link::Slot(sha.clone()) && remove(&layout.path(NEXT)) {
        if let Err(e) = sync_dir(dir) {
            tracing::warn!("{e}");
        }
    }
    if check_sha(sha_hex).is_ok()
        && layout.link(CURRENT) != Link::Slot(sha.clone())
        && layout.link(TRYING) != Link::Slot(sha.clone())
    {
        remove(&layout.slot(&sha));
        remove(&layout.version_file(&sha));
    }
}

/// Records binary `sha_hex` as failed (`failed/<sha_hex>`, atomically and durably), so
/// the launcher never tries it: for a staged binary that fails the agent's own checks
/// (then [`unstage`] it); the launcher records its trials' failures itself. `reason` is a
/// sentence a person can act on.
pub fn record_failure(dir: &Path, sha_hex: &str, reason: &str) -> io::Result<()> {
    check_sha(sha_hex)?;
    let layout = Layout::new(dir);
    let failed = layout.dir.join(FAILED);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&failed).map_err(context("create", &failed))?;
    let failure = Failure { reason: reason.to_owned(), at: unix_now() };
    let json = serde_json::to_vec(&failure).map_err(io::Error::other)?;
    write_atomic(&layout.failed(sha_hex), &json, 0o600)
}

/// Confirms the binary on trial (the agent calls it with its `FLEET_AGENT_TRIAL` once
/// healthy): writes `confirm`, atomically and durably. The launcher then makes it current.
pub fn confirm(dir: &Path, sha_hex: &str) -> io::Result<()> {
    check_sha(sha_hex)?;
    write_atomic(&dir.join(CONFIRM), sha_hex.as_bytes(), 0o600)
}

/// Why binary `sha_hex` was rolled back, if it was: such a binary is never tried again,
/// so the agent should not stage it. A damaged record still counts (its reason says so).
pub fn failure(dir: &Path, sha_hex: &str) -> Option<Failure> {
    if !is_sha(sha_hex) {
        return None;
    }
    read_failure(&Layout::new(dir).failed(sha_hex))
}

/// Every binary rolled back: (sha256, why), oldest first.
pub fn failures(dir: &Path) -> Vec<(String, Failure)> {
    let layout = Layout::new(dir);
    let Ok(entries) = fs::read_dir(layout.dir.join(FAILED)) else {
        return Vec::new();
    };
    let mut all: Vec<(String, Failure)> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_sha(name))
        .filter_map(|sha| read_failure(&layout.failed(&sha)).map(|f| (sha, f)))
        .collect();
    all.sort_by(|a, b| (a.1.at, &a.0).cmp(&(b.1.at, &b.0)));
    all
}

/// The sha256 of the confirmed-good binary (`current`), if there is one; `None` when
/// the packaged binary runs.
pub fn current(dir: &Path) -> Option<String> {
    match Layout::new(dir).link(CURRENT) {
        Link::Slot(sha) => Some(sha),
        Link::Absent | Link::Bad(_) => None,
    }
}

/// Runs the agent until the launcher is stopped (SIGTERM or SIGINT, forwarded to the
/// agent) or the agent's configuration is invalid; returns the launcher's exit code: the
/// agent's own on a stop (0 for a clean one), 64 for an invalid configuration.
pub fn launch(opts: &LaunchOptions) -> u8 {
    let inbox = match listen(&[Sig::Term, Sig::Int, Sig::Hup]) {
        Ok(inbox) => inbox,
        Err(e) => {
            // Without handlers a SIGTERM would kill the launcher and orphan the agent.
            tracing::error!("cannot listen for signals, so the agent is not started: {e}");
            return exit::FAILURE;
        }
    };
    supervise(opts, &inbox, &Tuning::default())
}

// ---------------------------------------------------------------------------------------
// Signals.

/// A signal the launcher handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    Term,
    Int,
    Hup,
}

impl Sig {
    const ALL: [Sig; 3] = [Sig::Term, Sig::Int, Sig::Hup];

    fn index(self) -> usize {
        self as usize
    }

    /// SIGTERM and SIGINT stop the launcher (after the agent); SIGHUP is only passed on.
    fn stops(self) -> bool {
        matches!(self, Sig::Term | Sig::Int)
    }

    fn signal(self) -> rustix::process::Signal {
        match self {
            Sig::Term => rustix::process::Signal::TERM,
            Sig::Int => rustix::process::Signal::INT,
            Sig::Hup => rustix::process::Signal::HUP,
        }
    }

    fn kind(self) -> tokio::signal::unix::SignalKind {
        use tokio::signal::unix::SignalKind;
        match self {
            Sig::Term => SignalKind::terminate(),
            Sig::Int => SignalKind::interrupt(),
            Sig::Hup => SignalKind::hangup(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sig::Term => "SIGTERM",
            Sig::Int => "SIGINT",
            Sig::Hup => "SIGHUP",
        }
    }
}

/// Signals received and not yet handled, counted per kind; the supervisor polls it.
#[derive(Debug, Default)]
struct Inbox {
    counts: [AtomicUsize; 3],
}

impl Inbox {
    fn post(&self, sig: Sig) {
        self.counts[sig.index()].fetch_add(1, Ordering::SeqCst);
    }

    /// The kinds received since the last call (each once, however often it came).
    fn take(&self) -> Vec<Sig> {
        Sig::ALL.into_iter().filter(|s| self.counts[s.index()].swap(0, Ordering::SeqCst) > 0).collect()
    }
}

/// Installs handlers for `sigs` and returns once they are in place. A thread of its own
/// runs a small tokio runtime (the std library cannot catch signals without `unsafe`)
/// that posts every signal to the returned inbox, for the process's lifetime.
fn listen(sigs: &[Sig]) -> io::Result<Arc<Inbox>> {
    let inbox = Arc::new(Inbox::default());
    let posted = Arc::clone(&inbox);
    let sigs = sigs.to_vec();
    let (ready, installed) = std::sync::mpsc::channel::<io::Result<()>>();
    std::thread::Builder::new().name("launch-signals".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            let mut streams = Vec::with_capacity(sigs.len());
            for sig in sigs {
                match tokio::signal::unix::signal(sig.kind()) {
                    Ok(stream) => streams.push((sig, stream)),
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                }
            }
            let _ = ready.send(Ok(()));
            std::future::poll_fn(|cx| {
                for (sig, stream) in &mut streams {
                    while let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                        posted.post(*sig);
                    }
                }
                std::task::Poll::<()>::Pending
            })
            .await;
        });
    })?;
    match installed.recv() {
        Ok(Ok(())) => Ok(inbox),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the signal thread ended before installing its handlers")),
    }
}

// ---------------------------------------------------------------------------------------
// The supervisor.

/// The launcher's timings (shortened by the tests).
#[derive(Debug, Clone)]
struct Tuning {
    /// How often the child, `confirm` and the signals are looked at.
    poll: Duration,
    /// How long a binary that failed its trial has between SIGTERM and SIGKILL.
    grace: Duration,
    /// The first restart delay after the agent exits; it doubles up to `backoff_max`.
    backoff_min: Duration,
    backoff_max: Duration,
    /// A child that ran this long resets the restart delay to `backoff_min`.
    healthy_after: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            poll: Duration::from_millis(200),
            grace: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// The launcher's loop: recovery, then trials and normal runs until a stop.
fn supervise(opts: &LaunchOptions, inbox: &Inbox, tuning: &Tuning) -> u8 {
    let launcher = Launcher { opts, layout: Layout::new(&opts.dir), inbox, tuning };
    tracing::info!(
        dir = %opts.dir.display(),
        package = %opts.fallback.display(),
        package_version = %opts.fallback_version,
        "launcher started"
    );
    if let Err(e) = launcher.layout.create() {
        tracing::error!(
            "{e}; self-update cannot work until this is fixed (the packaged agent runs meanwhile)"
        );
    }
    launcher.recover();
    let mut backoff = tuning.backoff_min;
    let mut candidate = launcher.pick_next();
    loop {
        if launcher.stop_asked() {
            return exit::OK;
        }
        let watched = match candidate.take() {
            Some(sha) => launcher.trial(&sha),
            None => {
                let program = launcher.normal_program();
                let slot = program.slot.as_deref().unwrap_or(PACKAGE_SLOT);
                let version = match &program.slot {
                    Some(sha) => launcher.layout.version(sha),
                    None => Some(opts.fallback_version.clone()),
                };
                tracing::info!(slot, version = version.as_deref().unwrap_or("unknown"), "starting the agent");
                match launcher.spawn(&program, None) {
                    Ok(child) => launcher.watch(child, None),
                    Err(e) => Watched::NotStarted { program, error: e },
                }
            }
        };
        let (status, ran) = match watched {
            Watched::Stopped(code) => {
                tracing::info!(code, "the agent has stopped; so does the launcher");
                return code;
            }
            // Back to the previous program, at once.
            Watched::TrialFailed => continue,
            Watched::NotStarted { program: Program { slot: Some(sha), path }, error } => {
                tracing::error!(
                    slot = %sha,
                    "cannot start {}: {error}; going back to the packaged agent",
                    path.display()
                );
                launcher.forget_current();
                continue;
            }
            Watched::NotStarted { program: Program { slot: None, path }, error } => {
                tracing::error!(
                    "cannot start the packaged agent {}: {error}; is the package intact? Trying again in {} s",
                    path.display(),
                    secs(backoff)
                );
                (None, Duration::ZERO)
            }
            Watched::Exited { status, ran } => (Some(status), ran),
        };
        if let Some(status) = status {
            if status.code() == Some(EXIT_SWITCH.into()) {
                candidate = launcher.pick_next();
                if candidate.is_some() {
                    continue;
                }
                tracing::warn!(
                    "the agent exited to switch to a staged binary, but none is usable; restarting it"
                );
            } else if status.code() == Some(exit::CONFIG.into()) {
                tracing::error!(
                    "the agent's configuration is invalid (exit code {}); restarting cannot fix it: correct the configuration (its errors are logged just above) and start the service again",
                    exit::CONFIG
                );
                return exit::CONFIG;
            } else {
                if ran >= tuning.healthy_after {
                    backoff = tuning.backoff_min;
                }
                tracing::warn!(
                    ran_secs = ran.as_secs(),
                    "the agent {}; restarting it in {} s",
                    describe(status),
                    secs(backoff)
                );
            }
        }
        if !launcher.pause(backoff) {
            return exit::OK;
        }
        backoff = (backoff * 2).min(tuning.backoff_max);
        candidate = launcher.pick_next();
    }
}

/// What to run: a slot, or the packaged binary.
#[derive(Debug)]
struct Program {
    path: PathBuf,
    /// The slot's sha256; `None` for the packaged binary.
    slot: Option<String>,
}

/// How a child's supervision ended.
#[derive(Debug)]
enum Watched {
    /// The launcher was asked to stop and the child has ended: the launcher's exit code.
    Stopped(u8),
    /// The binary on trial failed; it is recorded, and `trying` is gone.
    TrialFailed,
    /// The child (a normal one, or a promoted one) exited on its own.
    Exited { status: ExitStatus, ran: Duration },
    /// A normal program could not be started.
    NotStarted { program: Program, error: io::Error },
}

/// A trial in progress.
#[derive(Debug)]
struct Trial {
    sha: String,
    deadline: Instant,
    /// `current` when it began: kept after a promotion.
    previous: Option<String>,
}

struct Launcher<'a> {
    opts: &'a LaunchOptions,
    layout: Layout,
    inbox: &'a Inbox,
    tuning: &'a Tuning,
}

impl Launcher<'_> {
    /// Step 1: settles what a launcher stopped at any instant left behind.
    fn recover(&self) {
        match self.layout.link(TRYING) {
            Link::Absent => {}
            Link::Bad(why) => {
                tracing::warn!("{why}; removing it");
                self.remove_and_sync(&self.layout.path(TRYING));
            }
            Link::Slot(sha) => {
                let current = current(&self.layout.dir);
                if current.as_deref() == Some(&sha) || self.confirmed(&sha) {
                    tracing::info!(slot = %sha, "finishing the promotion the launcher was stopped during");
                    let previous = current.filter(|c| *c != sha);
                    self.promote(&sha, previous.as_deref());
                } else if self.layout.failed(&sha).exists() {
                    // Recorded, then stopped before `trying` was removed: keep that reason.
                    self.fail(&sha, None);
                } else {
                    self.fail(&sha, Some(LAUNCHER_STOPPED.into()));
                }
            }
        }
        self.remove_and_sync(&self.layout.path(CONFIRM));
        for dir in [self.layout.dir.clone(), self.layout.slots(), self.layout.dir.join(FAILED)] {
            remove_temps(&dir);
        }
    }

    /// Step 2: the staged binary to try, if `next` names one that may run. A bad or
    /// failed one is removed (and recorded, if its slot is bad).
    fn pick_next(&self) -> Option<String> {
        let next = self.layout.path(NEXT);
        let sha = match self.layout.link(NEXT) {
            Link::Absent => return None,
            Link::Bad(why) => {
                tracing::warn!("{why}; removing it");
                self.remove_and_sync(&next);
                return None;
            }
            Link::Slot(sha) => sha,
        };
        if let Some(failure) = failure(&self.layout.dir, &sha) {
            tracing::warn!(
                slot = %sha,
                "not trying the staged agent binary: it failed before ({}), and a failed binary is never tried again",
                failure.reason
            );
            self.remove_and_sync(&next);
            return None;
        }
        if current(&self.layout.dir).as_deref() == Some(&sha) {
            tracing::info!(slot = %sha, "the staged agent binary is already the current one");
            self.remove_and_sync(&next);
            return None;
        }
        if let Err(why) = runnable(&self.layout.slot(&sha)) {
            self.record(&sha, &format!("its staged binary {why}: it was never started"));
            self.remove_and_sync(&next);
            return None;
        }
        Some(sha)
    }

    /// Step 3: what runs when nothing is on trial: `current`, unless it is unusable or
    /// older than the packaged binary (a package upgrade over a self-updated device).
    fn normal_program(&self) -> Program {
        let package = Program { path: self.opts.fallback.clone(), slot: None };
        let sha = match self.layout.link(CURRENT) {
            Link::Absent => return package,
            Link::Bad(why) => {
                tracing::error!("{why}; running the packaged agent");
                self.forget_current();
                return package;
            }
            Link::Slot(sha) => sha,
        };
        let path = self.layout.slot(&sha);
        if let Err(why) = runnable(&path) {
            tracing::error!(slot = %sha, "the current agent binary {why}; running the packaged agent");
            self.forget_current();
            return package;
        }
        if let Some(version) = self.layout.version(&sha) {
            let older = fleet_spec::model::compare_versions(&version, &self.opts.fallback_version)
                == Some(std::cmp::Ordering::Less);
            if older {
                tracing::info!(
                    slot = %sha,
                    version = %version,
                    package_version = %self.opts.fallback_version,
                    "a newer package was installed over the self-updated agent; running the packaged one"
                );
                self.forget_current();
                self.remove_slot(&sha);
                return package;
            }
        }
        Program { path, slot: Some(sha) }
    }

    /// Removes `current` (the packaged binary runs instead), durably.
    fn forget_current(&self) {
        self.remove_and_sync(&self.layout.path(CURRENT));
    }

    /// Steps 4-5: starts `sha` on trial (`next` becomes `trying` first) and watches it.
    fn trial(&self, sha: &str) -> Watched {
        let previous = current(&self.layout.dir);
        // A `confirm` left behind names another binary; start from none.
        self.remove_and_sync(&self.layout.path(CONFIRM));
        let moved = fs::rename(self.layout.path(NEXT), self.layout.path(TRYING))
            .and_then(|()| sync_dir(&self.layout.dir));
        if let Err(e) = moved {
            tracing::error!(
                slot = %sha,
                "cannot rename {} to {}: {e}; the staged binary is not tried, so that a crash of the launcher cannot leave it unaccounted for",
                self.layout.path(NEXT).display(),
                self.layout.path(TRYING).display()
            );
            self.remove_and_sync(&self.layout.path(NEXT));
            return Watched::TrialFailed;
        }
        let version = self.layout.version(sha);
        tracing::info!(
            slot = %sha,
            version = version.as_deref().unwrap_or("unknown"),
            trial_secs = %secs(self.opts.trial),
            "trying a new agent binary"
        );
        let program = Program { path: self.layout.slot(sha), slot: Some(sha.to_owned()) };
        match self.spawn(&program, Some(sha)) {
            Ok(child) => {
                let trial =
                    Trial { sha: sha.to_owned(), deadline: Instant::now() + self.opts.trial, previous };
                self.watch(child, Some(trial))
            }
            Err(e) => {
                let reason = format!(
                    "could not be started: {e} (a binary for another architecture, or not a program at all)"
                );
                self.fail(sha, Some(reason));
                Watched::TrialFailed
            }
        }
    }

    /// Starts `program` with the launcher's environment plus its own.
    fn spawn(&self, program: &Program, trial: Option<&str>) -> io::Result<Child> {
        let mut command = Command::new(&program.path);
        command
            .args(&self.opts.args)
            .env(ENV_LAUNCHER, "1")
            .env(ENV_SLOT, program.slot.as_deref().unwrap_or(PACKAGE_SLOT))
            .env_remove(ENV_TRIAL)
            // systemd names the unit's main process (this launcher) in WATCHDOG_PID, but
            // the keep-alives come from the agent (NotifyAccess=all): without this, the
            // agent takes the watchdog as another process's and never pings.
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null());
        if let Some(sha) = trial {
            command.env(ENV_TRIAL, sha);
        }
        // ETXTBSY: another thread of this process was forking while the file was open for
        // writing (the tests stage binaries while launchers spawn); it passes at once.
        let mut tries = 0;
        loop {
            match command.spawn() {
                Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                result => return result,
            }
        }
    }

    /// Steps 5-7: watches `child` until it ends or, on trial, fails; signals are passed
    /// on; a confirmed trial is promoted and the same child is watched on.
    fn watch(&self, mut child: Child, mut trial: Option<Trial>) -> Watched {
        let started = Instant::now();
        let mut stopping: Option<Sig> = None;
        loop {
            for sig in self.inbox.take() {
                tracing::info!(signal = sig.name(), "passing the signal on to the agent");
                let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&child), sig.signal());
                if sig.stops() {
                    stopping = Some(sig);
                }
            }
            // Before looking at the child: a confirm counts even if it exited right after.
            if let Some(t) = trial.take_if(|t| self.confirmed(&t.sha)) {
                self.promote(&t.sha, t.previous.as_deref());
            }
            let exited = match child.try_wait() {
                Ok(status) => status,
                Err(e) => {
                    tracing::error!("cannot wait for the agent (process {}): {e}; killing it", child.id());
                    let _ = child.kill();
                    Some(child.wait().unwrap_or(ExitStatus::from_raw(1 << 8)))
                }
            };
            if let Some(status) = exited {
                return match (trial, stopping) {
                    (None, None) => Watched::Exited { status, ran: started.elapsed() },
                    (None, Some(sig)) => Watched::Stopped(stop_code(status, sig)),
                    (Some(t), Some(sig)) => {
                        self.interrupted(&t.sha, sig);
                        Watched::Stopped(stop_code(status, sig))
                    }
                    (Some(t), None) => {
                        let reason = format!(
                            "{} during its trial (before confirming); its log lines just before say why",
                            describe(status)
                        );
                        self.fail(&t.sha, Some(reason));
                        Watched::TrialFailed
                    }
                };
            }
            if let Some(t) = trial.as_ref().filter(|t| stopping.is_none() && Instant::now() >= t.deadline) {
                tracing::warn!(slot = %t.sha, "the agent on trial did not confirm in time; stopping it");
                let status = self.terminate(&mut child);
                let reason = format!(
                    "did not confirm within {} s (it hangs, or cannot connect, report or reconcile; it {} when stopped)",
                    secs(self.opts.trial),
                    status.map_or_else(|| "could not be waited for".to_owned(), describe),
                );
                self.fail(&t.sha, Some(reason));
                return Watched::TrialFailed;
            }
            std::thread::sleep(self.tuning.poll);
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the child.
    fn terminate(&self, child: &mut Child) -> Option<ExitStatus> {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(child),
            rustix::process::Signal::TERM,
        );
        let until = Instant::now() + self.tuning.grace;
        while Instant::now() < until {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(self.tuning.poll.min(Duration::from_millis(50)));
        }
        tracing::warn!("the agent on trial ignored SIGTERM for {} s; killing it", secs(self.tuning.grace));
        let _ = child.kill();
        child.wait().ok()
    }

    /// True when `confirm` holds `sha`.
    fn confirmed(&self, sha: &str) -> bool {
        read_capped(&self.layout.path(CONFIRM), 256).is_ok_and(|c| c.trim() == sha)
    }

    /// Makes `sha` current: `current` replaced, then `trying` and `confirm` removed,
    /// each durably; then the slots but `sha`, `previous` and `next`'s are removed.
    fn promote(&self, sha: &str, previous: Option<&str>) {
        if let Err(e) = set_link(&self.layout.dir, CURRENT, sha) {
            // `trying` and `confirm` stay: the next start finishes the promotion.
            tracing::error!(slot = %sha, "the new agent binary confirmed, but it cannot be made current: {e}");
            return;
        }
        self.remove_and_sync(&self.layout.path(TRYING));
        self.remove_and_sync(&self.layout.path(CONFIRM));
        self.remove_and_sync(&self.layout.path(INTERRUPTED));
        tracing::info!(
            slot = %sha,
            version = self.layout.version(sha).as_deref().unwrap_or("unknown"),
            "the new agent binary confirmed: it is now the current one"
        );
        let next = match self.layout.link(NEXT) {
            Link::Slot(next) => Some(next),
            Link::Absent | Link::Bad(_) => None,
        };
        let keep = [Some(sha), previous, next.as_deref()];
        let Ok(entries) = fs::read_dir(self.layout.slots()) else { return };
        for name in entries.flatten().filter_map(|e| e.file_name().into_string().ok()) {
            let base = name.strip_suffix(".version").unwrap_or(&name);
            // Only slots and their versions: a `.tmp` may be a staging in progress.
            if is_sha(base) && !keep.contains(&Some(base)) {
                remove(&self.layout.slots().join(&name));
            }
        }
    }

    /// Records `sha` as failed (unless `reason` is `None`: already recorded), removes
    /// `trying` and `confirm`, and deletes the binary (its record stays).
    fn fail(&self, sha: &str, reason: Option<String>) {
        if let Some(reason) = reason {
            self.record(sha, &reason);
        }
        self.remove_and_sync(&self.layout.path(TRYING));
        self.remove_and_sync(&self.layout.path(CONFIRM));
        self.remove_and_sync(&self.layout.path(INTERRUPTED));
        self.remove_slot(sha);
    }

    /// The trial of `sha` was stopped on request (`sig`) before it confirmed: it is
    /// tried again at the next start (`trying` back to `next`, the interruption counted
    /// first, so that a cut in between leaves an unconfirmed `trying`: a failure), unless
    /// that was one interruption too many, or `next` names a newer binary.
    fn interrupted(&self, sha: &str, sig: Sig) {
        let count = self.interruptions(sha).saturating_add(1);
        let again = if count > MAX_INTERRUPTED_TRIALS {
            Err(format!(
                "was stopped {count} times during its trial ({} each time, before it confirmed)",
                sig.name()
            ))
        } else if self.layout.link(NEXT) != Link::Absent {
            Err(format!("had its trial interrupted ({}) while another binary was staged", sig.name()))
        } else {
            let requeue =
                write_atomic(&self.layout.path(INTERRUPTED), format!("{sha} {count}\n").as_bytes(), 0o600)
                    .and_then(|()| fs::rename(self.layout.path(TRYING), self.layout.path(NEXT)))
                    .and_then(|()| sync_dir(&self.layout.dir));
            requeue.map_err(|e| {
                format!("had its trial interrupted ({}) and cannot be queued again: {e}", sig.name())
            })
        };
        match again {
            Ok(()) => tracing::info!(
                slot = %sha,
                signal = sig.name(),
                "the trial was stopped before it confirmed: it is tried again at the next start ({count} of {MAX_INTERRUPTED_TRIALS} such stops)"
            ),
            Err(reason) => self.fail(sha, Some(reason)),
        }
    }

    /// How many trials of `sha` a requested stop has interrupted (`interrupted`).
    fn interruptions(&self, sha: &str) -> u32 {
        let text = fs::read_to_string(self.layout.path(INTERRUPTED)).unwrap_or_default();
        match text.trim().split_once(' ') {
            Some((named, count)) if named == sha => count.parse().unwrap_or(MAX_INTERRUPTED_TRIALS),
            _ => 0,
        }
    }

    /// Writes `failed/<sha>`, durably.
    fn record(&self, sha: &str, reason: &str) {
        tracing::warn!(
            slot = %sha,
            version = self.layout.version(sha).as_deref().unwrap_or("unknown"),
            "the new agent binary {reason}; it is rolled back and never tried again"
        );
        if let Err(e) = record_failure(&self.layout.dir, sha, reason) {
            tracing::error!(slot = %sha, "cannot record the failure: {e}");
        }
    }

    /// Deletes a slot and its version, unless `current` names it.
    fn remove_slot(&self, sha: &str) {
        if current(&self.layout.dir).as_deref() == Some(sha) {
            return;
        }
        remove(&self.layout.slot(sha));
        remove(&self.layout.version_file(sha));
    }

    /// Removes a file or link and fsyncs its directory; failures are logged.
    fn remove_and_sync(&self, path: &Path) {
        if remove(path) {
            if let Err(e) = sync_dir(path.parent().unwrap_or(&self.layout.dir)) {
                tracing::warn!("cannot fsync the directory of {}: {e}", path.display());
            }
        }
    }

    /// True when SIGTERM or SIGINT came (while no child runs); SIGHUP is dropped.
    fn stop_asked(&self) -> bool {
        self.inbox.take().into_iter().any(|sig| {
            tracing::info!(signal = sig.name(), "received while no agent runs");
            sig.stops()
        })
    }

    /// Sleeps `delay`; false when a stop was asked for meanwhile.
    fn pause(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.stop_asked() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep(self.tuning.poll.min(until - now));
        }
    }
}

/// The launcher's exit code once the child it asked to stop (with `sig`) has ended: the
/// child's own, 0 when the child died of that very signal, 128 + the signal otherwise.
fn stop_code(status: ExitStatus, sig: Sig) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(exit::FAILURE),
        (None, Some(s)) if s == sig.signal().as_raw() => exit::OK,
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(exit::FAILURE),
        (None, None) => exit::FAILURE,
    }
}

/// "exited with exit code 1", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with exit code {code}"),
        (None, Some(9)) => "was killed by signal 9 (SIGKILL)".to_owned(),
        (None, Some(15)) => "was killed by signal 15 (SIGTERM)".to_owned(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// `2`, `0.5`: seconds for a message.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{:.1}", d.as_secs_f64())
    }
}

/// Why `path` cannot be run, if it cannot: it must be a regular executable file.
fn runnable(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!("{} is missing", path.display())),
        Err(e) => Err(format!("{} cannot be inspected ({e})", path.display())),
        Ok(m) if !m.is_file() => Err(format!("{} is not a regular file", path.display())),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(format!("{} is not executable", path.display())),
        Ok(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// The directory.

/// The paths of the layout in the module docs.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
}

/// What a link (`current`, `next`, `trying`) names.
#[derive(Debug, PartialEq, Eq)]
enum Link {
    Absent,
    /// `slots/<sha256>`: the digest.
    Slot(String),
    /// Anything else, and why it is not used.
    Bad(String),
}

impl Layout {
    fn new(dir: &Path) -> Self {
        Layout { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn slots(&self) -> PathBuf {
        self.dir.join(SLOTS)
    }

    fn slot(&self, sha: &str) -> PathBuf {
        self.slots().join(sha)
    }

    fn version_file(&self, sha: &str) -> PathBuf {
        self.slots().join(format!("{sha}.version"))
    }

    fn failed(&self, sha: &str) -> PathBuf {
        self.dir.join(FAILED).join(sha)
    }

    /// The directory and its subdirectories, 0700 (the agent's state).
    fn create(&self) -> io::Result<()> {
        for d in [self.dir.clone(), self.slots(), self.dir.join(FAILED)] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(context("create", &d))?;
        }
        Ok(())
    }

    /// The version `slots/<sha>.version` records, if readable.
    fn version(&self, sha: &str) -> Option<String> {
        read_capped(&self.version_file(sha), 256).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// What link `name` names. Only its last component counts: the launcher always runs
    /// `slots/<that>` of this directory, whatever else the link says.
    fn link(&self, name: &str) -> Link {
        let path = self.path(name);
        match fs::read_link(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Link::Absent,
            Err(e) => Link::Bad(format!("{} is not a symlink to a slot ({e})", path.display())),
            Ok(target) => match target.file_name().and_then(|n| n.to_str()) {
                Some(sha) if is_sha(sha) => Link::Slot(sha.to_owned()),
                _ => Link::Bad(format!(
                    "{} points at {}, not at slots/<sha256>",
                    path.display(),
                    target.display()
                )),
            },
        }
    }
}

/// A sha256 in lowercase hex, as the slots are named.
fn is_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_sha(sha: &str) -> io::Result<()> {
    if is_sha(sha) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{sha:?} is not a sha256 digest (64 lowercase hex digits)"),
        ))
    }
}

fn read_failure(path: &Path) -> Option<Failure> {
    let damaged = |why: String| Failure {
        reason: format!(
            "it is recorded as failed, but its record {} is damaged ({why}); it stays failed",
            path.display()
        ),
        at: 0,
    };
    match read_capped(path, 64 * 1024) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(damaged(e.to_string())),
        Ok(text) => Some(serde_json::from_str(&text).unwrap_or_else(|e| damaged(e.to_string()))),
    }
}

/// A small text file's content (at most `max` bytes are read).
fn read_capped(path: &Path, max: u64) -> io::Result<String> {
    let mut text = String::new();
    File::open(path)?.take(max).read_to_string(&mut text)?;
    Ok(text)
}

/// `<path>.tmp`: the launcher removes these on start.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replaces `path` with `content`: `<path>.tmp`, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_path(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(context("create", &tmp))?;
    file.write_all(content).map_err(context("write", &tmp))?;
    file.sync_all().map_err(context("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(context("rename into place", path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Points link `name` in `dir` at `slots/<sha>`: `<name>.tmp`, rename, fsync of `dir`.
fn set_link(dir: &Path, name: &str, sha: &str) -> io::Result<()> {
    let link = dir.join(name);
    let tmp = tmp_path(&link);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(context("remove", &tmp)(e)),
        _ => {}
    }
    symlink(Path::new(SLOTS).join(sha), &tmp).map_err(context("create the symlink", &tmp))?;
    fs::rename(&tmp, &link).map_err(context("rename into place", &link))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(context("fsync the directory", dir))
}

/// Removes a file or link; true when something was removed. A failure is logged.
fn remove(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!("cannot remove {}: {e}", path.display());
            false
        }
    }
}

/// Removes the `*.tmp` files a stopped launcher or agent left in `dir`.
fn remove_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut removed = false;
    for entry in entries.flatten() {
        if entry.file_name().as_encoded_bytes().ends_with(b".tmp") {
            removed |= remove(&entry.path());
        }
    }
    if removed {
        let _ = sync_dir(dir);
    }
}

/// Adds what was done, and to which path, to an error.
fn context<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::thread::JoinHandle;

    fn sha(c: char) -> String {
        c.to_string().repeat(64)
    }

    /// A scratch state directory, `#!/bin/sh` agents that log their start, and a log.
    struct Fixture {
        tmp: tempfile::TempDir,
        dir: PathBuf,
        log: PathBuf,
        scripts: Cell<usize>,
    }

    /// Confirms when on trial, then serves until stopped.
    const GOOD: &str = "[ -n \"$FLEET_AGENT_TRIAL\" ] && printf %s \"$FLEET_AGENT_TRIAL\" > \"$DIR/confirm\"\nexec sleep 120";
    /// Serves until stopped, never confirms.
    const SERVE: &str = "exec sleep 120";
    const CRASH: &str = "exit 1";
    /// Ignores SIGTERM and never confirms.
    const HANG: &str = "trap '' TERM\nwhile :; do sleep 0.1; done";

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("state/agent");
            let log = tmp.path().join("log");
            fs::create_dir(tmp.path().join("src")).expect("mkdir src");
            Fixture { tmp, dir, log, scripts: Cell::new(0) }
        }

        /// An agent that appends `start slot=.. trial=.. launcher=.. args=.. pid=..` to
        /// the log, then runs `body` (with `$DIR` the state directory, `$MARK` a scratch
        /// file).
        fn script(&self, body: &str) -> PathBuf {
            let n = self.scripts.get();
            self.scripts.set(n + 1);
            let path = self.tmp.path().join("src").join(n.to_string());
            let text = format!(
                "#!/bin/sh\nDIR='{}'\nMARK='{}'\necho \"start slot=$FLEET_AGENT_SLOT trial=$FLEET_AGENT_TRIAL launcher=$FLEET_AGENT_LAUNCHER args=$* pid=$$\" >> '{}'\n{body}\n",
                self.dir.display(),
                self.tmp.path().join(format!("mark{n}")).display(),
                self.log.display(),
            );
            fs::write(&path, text).expect("write script");
            fs::set_permissions(&path, Permissions::from_mode(0o755)).expect("chmod script");
            path
        }

        fn stage(&self, sha: &str, version: &str, body: &str) {
            stage(&self.dir, sha, version, &self.script(body)).expect("stage");
            point_next(&self.dir, sha).expect("point next");
        }

        /// Stages `sha` and makes it current (as a past promotion would have).
        fn install_current(&self, sha: &str, version: &str, body: &str) {
            self.stage(sha, version, body);
            fs::rename(self.dir.join(NEXT), self.dir.join(CURRENT)).expect("next -> current");
        }

        fn opts(&self, fallback: PathBuf, trial: Duration) -> LaunchOptions {
            LaunchOptions {
                dir: self.dir.clone(),
                fallback,
                fallback_version: "0.1.0".into(),
                args: vec!["run".into(), "--config".into(), "/etc/fleet-agent/agent.toml".into()],
                trial,
            }
        }

        /// `slot=<slot> trial=<trial>` of every start, in order.
        fn starts(&self) -> Vec<String> {
            fs::read_to_string(&self.log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("start "))
                .map(|l| l.split(" launcher=").next().unwrap_or(l).to_owned())
                .collect()
        }

        fn log(&self) -> String {
            fs::read_to_string(&self.log).unwrap_or_default()
        }

        fn exists(&self, name: &str) -> bool {
            fs::symlink_metadata(self.dir.join(name)).is_ok()
        }
    }

    fn starts_of(slot: &str, trial: &str) -> String {
        format!("slot={slot} trial={trial}")
    }

    /// Short timings: the suite stays fast.
    fn fast() -> Tuning {
        Tuning {
            poll: Duration::from_millis(50),
            grace: Duration::from_millis(500),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            healthy_after: Duration::from_secs(60),
        }
    }

    /// A launcher on a thread; stopped (as by SIGTERM) when dropped.
    struct Running {
        inbox: Arc<Inbox>,
        handle: Option<JoinHandle<u8>>,
    }

    impl Running {
        fn start(opts: LaunchOptions) -> Self {
            Running::start_with(opts, fast())
        }

        fn start_with(opts: LaunchOptions, tuning: Tuning) -> Self {
            let inbox = Arc::new(Inbox::default());
            let posted = Arc::clone(&inbox);
            let handle = std::thread::spawn(move || supervise(&opts, &posted, &tuning));
            Running { inbox, handle: Some(handle) }
        }

        /// SIGTERM, as the init system sends it; the launcher's exit code.
        fn stop(mut self) -> u8 {
            self.inbox.post(Sig::Term);
            self.join()
        }

        /// The exit code of a launcher that stops by itself.
        fn finish(mut self) -> u8 {
            wait_for("the launcher to exit", || self.handle.as_ref().is_none_or(|h| h.is_finished()));
            self.join()
        }

        fn join(&mut self) -> u8 {
            self.handle.take().expect("running").join().expect("the launcher panicked")
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(handle) = self.handle.take() {
                self.inbox.post(Sig::Term);
                let _ = handle.join();
            }
        }
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid_of(log: &str, start: &str) -> rustix::process::Pid {
        let line = log.lines().find(|l| l.contains(start)).expect("started");
        let pid = line.rsplit("pid=").next().and_then(|p| p.trim().parse().ok()).expect("a pid");
        rustix::process::Pid::from_raw(pid).expect("a positive pid")
    }

    #[test]
    fn stage_makes_an_executable_slot_and_point_next_points_at_it_atomically() {
        let f = Fixture::new();
        let (a, b) = (sha('a'), sha('b'));
        let source = f.script(SERVE);
        stage(&f.dir, &a, "1.2.3", &source).expect("stage");
        assert!(!f.exists(NEXT), "not pointed at before it is checked");
        point_next(&f.dir, &a).expect("point");
        let slot = f.dir.join("slots").join(&a);
        let mode = fs::metadata(&slot).expect("slot").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read(&slot).expect("slot"), fs::read(&source).expect("source"));
        assert_eq!(
            fs::read_to_string(f.dir.join("slots").join(format!("{a}.version"))).expect("version"),
            "1.2.3"
        );
        assert_eq!(fs::read_link(f.dir.join(NEXT)).expect("next"), Path::new("slots").join(&a));
        assert_eq!(fs::metadata(&f.dir).expect("dir").permissions().mode() & 0o777, 0o700);
        stage(&f.dir, &b, "1.2.4", &source).expect("stage again");
        point_next(&f.dir, &b).expect("point again");
        assert_eq!(fs::read_link(f.dir.join(NEXT)).expect("next"), Path::new("slots").join(&b));
        for d in [f.dir.clone(), f.dir.join("slots")] {
            let temps: Vec<_> = fs::read_dir(&d)
                .expect("list")
                .flatten()
                .filter(|e| e.file_name().as_encoded_bytes().ends_with(b".tmp"))
                .collect();
            assert!(temps.is_empty(), "temp files left in {}: {temps:?}", d.display());
        }
        for bad in ["../../../etc/passwd", "ABC", &a.to_uppercase(), ""] {
            let e = stage(&f.dir, bad, "1", &source).expect_err("not a digest");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        let e = stage(&f.dir, &sha('c'), "1", &f.tmp.path().join("missing")).expect_err("no source");
        assert!(e.to_string().contains("missing"), "{e}");
        assert_eq!(
            fs::read_link(f.dir.join(NEXT)).expect("next"),
            Path::new("slots").join(&b),
            "next unchanged"
        );
    }

    #[test]
    fn a_binary_checked_after_staging_is_pointed_at_or_unstaged_and_recorded() {
        let f = Fixture::new();
        let (a, b) = (sha('a'), sha('b'));
        assert_eq!(dir(Path::new("/var/lib/fleet-agent")), Path::new("/var/lib/fleet-agent/agent"));
        f.install_current(&a, "0.1.0", SERVE);
        let slot = stage(&f.dir, &b, "0.2.0", &f.script(SERVE)).expect("stage");
        assert_eq!(slot, f.dir.join("slots").join(&b));
        point_next(&f.dir, &b).expect("point again: idempotent");
        assert_eq!(fs::read_link(f.dir.join(NEXT)).expect("next"), Path::new("slots").join(&b));
        let e = point_next(&f.dir, &sha('c')).expect_err("no such slot");
        assert!(e.to_string().contains("is missing"), "{e}");

        record_failure(&f.dir, &b, "`--version` printed \"x\"").expect("record");
        unstage(&f.dir, &b);
        assert!(!f.exists(NEXT));
        assert!(!slot.exists() && !f.dir.join("slots").join(format!("{b}.version")).exists());
        assert_eq!(failure(&f.dir, &b).expect("recorded").reason, "`--version` printed \"x\"");
        assert!(record_failure(&f.dir, "nope", "x").is_err());

        // The current binary staged again, then unstaged: it stays.
        fs::rename(f.dir.join(CURRENT), f.dir.join("keep")).expect("mv");
        stage(&f.dir, &a, "0.1.0", &f.script(SERVE)).expect("stage");
        fs::rename(f.dir.join("keep"), f.dir.join(CURRENT)).expect("mv");
        unstage(&f.dir, &a);
        assert!(f.dir.join("slots").join(&a).exists());
        unstage(&f.dir, &sha('c')); // nothing staged: fine
    }

    #[test]
    fn confirm_current_and_failure_records_read_back() {
        let f = Fixture::new();
        let (a, b) = (sha('a'), sha('b'));
        assert_eq!(current(&f.dir), None);
        assert!(failures(&f.dir).is_empty());
        f.install_current(&a, "1.0.0", SERVE);
        assert_eq!(current(&f.dir), Some(a.clone()));
        confirm(&f.dir, &b).expect("confirm");
        assert_eq!(fs::read_to_string(f.dir.join(CONFIRM)).expect("confirm"), b);
        assert!(confirm(&f.dir, "../x").is_err());

        let failed = f.dir.join(FAILED);
        fs::write(failed.join(&b), r#"{"reason":"exited","at":20}"#).expect("record");
        fs::write(failed.join(&a), r#"{"reason":"hung","at":10}"#).expect("record");
        fs::write(failed.join(sha('c')), "{torn").expect("record");
        fs::write(failed.join("notes.txt"), "not a record").expect("other file");
        assert_eq!(failure(&f.dir, &b), Some(Failure { reason: "exited".into(), at: 20 }));
        assert_eq!(failure(&f.dir, &sha('d')), None);
        assert_eq!(failure(&f.dir, "../../etc/passwd"), None);
        let damaged = failure(&f.dir, &sha('c')).expect("a damaged record still counts");
        assert!(damaged.reason.contains("damaged"), "{}", damaged.reason);
        let listed: Vec<String> = failures(&f.dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(listed, [sha('c'), a.clone(), b]);

        // `current` pointing outside the slots names no slot.
        fs::remove_file(f.dir.join(CURRENT)).expect("rm");
        symlink("/usr/bin/true", f.dir.join(CURRENT)).expect("symlink");
        assert_eq!(current(&f.dir), None);
    }

    #[test]
    fn a_good_new_binary_is_promoted_and_keeps_running() {
        let f = Fixture::new();
        let (a, b, c) = (sha('a'), sha('b'), sha('c'));
        f.install_current(&a, "0.1.0", SERVE);
        f.stage(&c, "0.1.5", SERVE); // staged once, then replaced by b: pruned
        f.stage(&b, "0.2.0", GOOD);
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(1)));
        // `current` first, then `trying` and `confirm` go.
        wait_for("b to become current", || {
            current(&f.dir).as_deref() == Some(&b) && !f.exists(TRYING) && !f.exists(CONFIRM)
        });
        assert!(!f.exists(NEXT));
        // Past the trial time: the same process still runs, never restarted.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(f.starts(), [starts_of(&b, &b)]);
        let pid = pid_of(&f.log(), &format!("slot={b}"));
        rustix::process::test_kill_process(pid).expect("the promoted agent still runs");
        let mut slots: Vec<String> = fs::read_dir(f.dir.join("slots"))
            .expect("slots")
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        slots.sort();
        assert_eq!(slots, [a.clone(), format!("{a}.version"), b.clone(), format!("{b}.version")]);
        assert!(failures(&f.dir).is_empty());
        assert_eq!(running.stop(), 0, "a clean stop");
        assert!(rustix::process::test_kill_process(pid).is_err(), "the agent is stopped with the launcher");
    }

    #[test]
    fn a_crashing_new_binary_is_rolled_back_to_the_previous_one() {
        let f = Fixture::new();
        let (a, b) = (sha('a'), sha('b'));
        f.install_current(&a, "0.1.0", SERVE);
        f.stage(&b, "0.2.0", CRASH);
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(30)));
        wait_for("a to run again", || f.starts().contains(&starts_of(&a, "")));
        assert_eq!(f.starts(), [starts_of(&b, &b), starts_of(&a, "")]);
        let failed = failure(&f.dir, &b).expect("b is recorded");
        assert!(failed.reason.contains("exited with exit code 1 during its trial"), "{}", failed.reason);
        assert!(failed.at > 0);
        assert_eq!(current(&f.dir), Some(a.clone()));
        assert!(!f.exists(TRYING) && !f.exists(CONFIRM));
        assert!(!f.dir.join("slots").join(&b).exists(), "the failed binary is deleted");
        assert!(f.dir.join("slots").join(&a).exists());
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn a_hanging_new_binary_is_killed_after_its_trial_and_rolled_back() {
        let f = Fixture::new();
        let b = sha('b');
        f.stage(&b, "0.2.0", HANG);
        let started = Instant::now();
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(1)));
        wait_for("the package to run again", || f.starts().contains(&starts_of(PACKAGE_SLOT, "")));
        assert!(started.elapsed() >= Duration::from_secs(1), "the trial lasted its time");
        assert_eq!(f.starts(), [starts_of(&b, &b), starts_of(PACKAGE_SLOT, "")]);
        let reason = failure(&f.dir, &b).expect("b is recorded").reason;
        assert!(reason.contains("did not confirm within 1 s"), "{reason}");
        assert!(reason.contains("SIGKILL"), "it ignored SIGTERM: {reason}");
        let pid = pid_of(&f.log(), &format!("slot={b}"));
        assert!(rustix::process::test_kill_process(pid).is_err(), "the hung binary is gone");
        assert_eq!(current(&f.dir), None);
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn a_failed_binary_staged_again_is_never_started() {
        let f = Fixture::new();
        let b = sha('b');
        f.stage(&b, "0.2.0", GOOD);
        fs::write(f.dir.join(FAILED).join(&b), r#"{"reason":"exited with exit code 1","at":5}"#)
            .expect("record");
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(1)));
        wait_for("the package to run", || !f.starts().is_empty());
        assert_eq!(f.starts(), [starts_of(PACKAGE_SLOT, "")]);
        assert!(!f.exists(NEXT), "the staged binary is dropped");
        assert_eq!(failure(&f.dir, &b), Some(Failure { reason: "exited with exit code 1".into(), at: 5 }));
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn a_trial_the_launcher_did_not_see_end_counts_as_failed() {
        let f = Fixture::new();
        let (a, b) = (sha('a'), sha('b'));
        f.install_current(&a, "0.1.0", SERVE);
        f.stage(&b, "0.2.0", GOOD);
        fs::rename(f.dir.join(NEXT), f.dir.join(TRYING))
            .expect("as a launcher killed during the trial left it");
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(1)));
        wait_for("a to run", || !f.starts().is_empty());
        assert_eq!(f.starts(), [starts_of(&a, "")], "b is not tried again");
        assert_eq!(failure(&f.dir, &b).expect("b is recorded").reason, LAUNCHER_STOPPED);
        assert!(!f.exists(TRYING));
        assert_eq!(current(&f.dir), Some(a));
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn a_trial_confirmed_before_the_launcher_stopped_is_promoted_on_start() {
        let f = Fixture::new();
        let (a, b) = (sha('a'), sha('b'));
        f.install_current(&a, "0.1.0", SERVE);
        f.stage(&b, "0.2.0", GOOD);
        fs::rename(f.dir.join(NEXT), f.dir.join(TRYING)).expect("trying");
        confirm(&f.dir, &b).expect("confirm");
        // Temp files of writes cut short.
        fs::write(f.dir.join("current.tmp"), "").expect("tmp");
        fs::write(f.dir.join("slots").join(format!("{b}.tmp")), "").expect("tmp");
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(1)));
        wait_for("b to run", || !f.starts().is_empty());
        assert_eq!(f.starts(), [starts_of(&b, "")], "b runs as the current agent, not on trial");
        assert_eq!(current(&f.dir), Some(b.clone()));
        assert!(!f.exists(TRYING) && !f.exists(CONFIRM) && !f.exists("current.tmp"));
        assert!(!f.dir.join("slots").join(format!("{b}.tmp")).exists());
        assert!(f.dir.join("slots").join(&a).exists(), "the previous binary is kept");
        assert!(failures(&f.dir).is_empty());
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn a_current_binary_older_than_the_package_gives_way_to_the_package() {
        let f = Fixture::new();
        let a = sha('a');
        f.install_current(&a, "0.0.9", SERVE);
        let running = Running::start(f.opts(f.script(SERVE), Duration::from_secs(1)));
        wait_for("the package to run", || !f.starts().is_empty());
        assert_eq!(f.starts(), [starts_of(PACKAGE_SLOT, "")]);
        assert_eq!(current(&f.dir), None);
        assert!(!f.exists(CURRENT));
        assert!(!f.dir.join("slots").join(&a).exists());
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn a_current_binary_as_new_as_the_package_or_of_unknown_version_stays() {
        let f = Fixture::new();
        let inbox = Inbox::default();
        let opts = f.opts(f.script(SERVE), Duration::from_secs(1));
        let tuning = fast();
        let launcher = Launcher { opts: &opts, layout: Layout::new(&f.dir), inbox: &inbox, tuning: &tuning };
        for (i, version) in ["0.1.0", "0.2.0", "nightly", ""].into_iter().enumerate() {
            let a = sha(char::from(b'a' + i as u8));
            f.install_current(&a, version, SERVE);
            assert_eq!(launcher.normal_program().slot, Some(a), "version {version:?}");
        }
        // A current that is not executable: the package, and `current` goes.
        let e = sha('e');
        f.install_current(&e, "0.2.0", SERVE);
        fs::set_permissions(f.dir.join("slots").join(&e), Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(launcher.normal_program().slot, None);
        assert!(!f.exists(CURRENT));
    }

    #[test]
    fn exit_switch_from_the_running_agent_tries_the_staged_binary() {
        let f = Fixture::new();
        let b = sha('b');
        f.stage(&b, "0.2.0", GOOD);
        fs::remove_file(f.dir.join(NEXT)).expect("staged later, by the running agent");
        let package = f.script(&format!(
            "if [ ! -e \"$MARK\" ]; then touch \"$MARK\"; ln -s slots/{b} \"$DIR/next\"; exit {EXIT_SWITCH}; fi\nexec sleep 120"
        ));
        let running = Running::start(f.opts(package, Duration::from_secs(2)));
        wait_for("b to become current", || current(&f.dir).as_deref() == Some(&b));
        assert_eq!(f.starts(), [starts_of(PACKAGE_SLOT, ""), starts_of(&b, &b)]);
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn exit_switch_with_nothing_staged_restarts_the_agent() {
        let f = Fixture::new();
        let package = f.script(&format!(
            "if [ ! -e \"$MARK\" ]; then touch \"$MARK\"; exit {EXIT_SWITCH}; fi\nexec sleep 120"
        ));
        let running = Running::start(f.opts(package, Duration::from_secs(1)));
        wait_for("a restart", || f.starts().len() == 2);
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn an_invalid_configuration_stops_the_launcher_with_64() {
        let f = Fixture::new();
        let running = Running::start(f.opts(f.script("exit 64"), Duration::from_secs(1)));
        assert_eq!(running.finish(), 64);
        assert_eq!(f.starts(), [starts_of(PACKAGE_SLOT, "")], "not restarted");
    }

    #[test]
    fn a_crashed_agent_is_restarted_after_a_pause() {
        let f = Fixture::new();
        let package = f.script("if [ ! -e \"$MARK\" ]; then touch \"$MARK\"; exit 3; fi\nexec sleep 120");
        let started = Instant::now();
        let running = Running::start(f.opts(package, Duration::from_secs(1)));
        wait_for("a restart", || f.starts().len() == 2);
        assert!(started.elapsed() >= fast().backoff_min);
        assert_eq!(running.stop(), 0);
    }

    #[test]
    fn the_agent_gets_its_environment_and_its_stop_code_becomes_the_launchers() {
        let f = Fixture::new();
        let package = f.script("trap 'exit 7' TERM\nwhile :; do sleep 0.1; done");
        let running = Running::start(f.opts(package, Duration::from_secs(1)));
        wait_for("the package to run", || !f.starts().is_empty());
        let log = f.log();
        assert!(
            log.contains("slot=package trial= launcher=1 args=run --config /etc/fleet-agent/agent.toml pid="),
            "{log}"
        );
        assert_eq!(running.stop(), 7, "the agent's own exit code");
    }

    #[test]
    fn a_stop_during_a_trial_is_tried_again_at_the_next_start_twice_at_most() {
        let f = Fixture::new();
        let b = sha('b');
        f.stage(&b, "0.2.0", SERVE);
        let package = f.script(SERVE);
        for stop in 1..=MAX_INTERRUPTED_TRIALS {
            let running = Running::start(f.opts(package.clone(), Duration::from_secs(60)));
            wait_for("b on trial", || f.starts().len() == stop as usize);
            assert_eq!(running.stop(), 0);
            assert!(failure(&f.dir, &b).is_none(), "stop {stop} failed b");
            assert!(f.exists(NEXT) && !f.exists(TRYING), "b is not queued again after stop {stop}");
            assert_eq!(
                fs::read_to_string(f.dir.join(INTERRUPTED)).expect("counted"),
                format!("{b} {stop}\n")
            );
        }
        // One stop too many: a binary whose every trial ends in a shutdown is failed.
        let running = Running::start(f.opts(package, Duration::from_secs(60)));
        wait_for("b on its last trial", || f.starts().len() == 3);
        assert_eq!(running.stop(), 0);
        assert_eq!(f.starts(), [starts_of(&b, &b), starts_of(&b, &b), starts_of(&b, &b)]);
        let reason = failure(&f.dir, &b).expect("recorded").reason;
        assert!(reason.contains("stopped 3 times during its trial (SIGTERM"), "{reason}");
        assert!(!f.exists(TRYING) && !f.exists(NEXT) && !f.exists(INTERRUPTED));
    }

    #[test]
    fn a_damaged_interruption_count_counts_as_the_most_and_another_binarys_as_none() {
        let f = Fixture::new();
        let (b, c) = (sha('b'), sha('c'));
        let package = f.script(SERVE);
        // Unreadable for this binary: its next interrupted trial is its last.
        f.stage(&b, "0.2.0", SERVE);
        fs::create_dir_all(&f.dir).expect("dir");
        fs::write(f.dir.join(INTERRUPTED), format!("{b} lots\n")).expect("write");
        let running = Running::start(f.opts(package.clone(), Duration::from_secs(60)));
        wait_for("b on trial", || f.starts().len() == 1);
        assert_eq!(running.stop(), 0);
        assert!(failure(&f.dir, &b).is_some(), "a damaged count let b be tried again");
        // A count of another binary: this one's first interruption.
        f.stage(&c, "0.3.0", SERVE);
        fs::write(f.dir.join(INTERRUPTED), format!("{b} 2\n")).expect("write");
        let running = Running::start(f.opts(package, Duration::from_secs(60)));
        wait_for("c on trial", || f.starts().len() == 2);
        assert_eq!(running.stop(), 0);
        assert!(failure(&f.dir, &c).is_none());
        assert_eq!(fs::read_to_string(f.dir.join(INTERRUPTED)).expect("counted"), format!("{c} 1\n"));
    }

    #[test]
    fn an_interrupted_trial_that_then_confirms_is_promoted_and_its_count_forgotten() {
        let f = Fixture::new();
        let b = sha('b');
        // Serves without confirming on its first run (stopped then), confirms on the next.
        f.stage(
            &b,
            "0.2.0",
            &format!("if [ -e \"$MARK\" ]; then\n{GOOD}\nfi\ntouch \"$MARK\"\nexec sleep 120"),
        );
        let package = f.script(SERVE);
        let running = Running::start(f.opts(package.clone(), Duration::from_secs(60)));
        wait_for("b on trial", || f.starts().len() == 1);
        assert_eq!(running.stop(), 0);
        assert!(f.exists(NEXT) && f.exists(INTERRUPTED));
        let running = Running::start(f.opts(package, Duration::from_secs(60)));
        wait_for("b promoted", || current(&f.dir).as_deref() == Some(b.as_str()));
        assert_eq!(running.stop(), 0);
        assert_eq!(f.starts(), [starts_of(&b, &b), starts_of(&b, &b)]);
        assert!(failure(&f.dir, &b).is_none());
        assert!(!f.exists(INTERRUPTED) && !f.exists(TRYING) && !f.exists(NEXT));
    }

    #[test]
    fn a_stop_while_no_agent_runs_ends_the_launcher_at_once() {
        let f = Fixture::new();
        let slow = Tuning { backoff_min: Duration::from_secs(30), ..fast() };
        let running = Running::start_with(f.opts(f.script(CRASH), Duration::from_secs(1)), slow);
        wait_for("a crash", || !f.starts().is_empty());
        std::thread::sleep(Duration::from_millis(300)); // the launcher waits to restart it
        let started = Instant::now();
        assert_eq!(running.stop(), 0);
        assert!(started.elapsed() < Duration::from_secs(5), "the pause is cut short");
        assert_eq!(f.starts().len(), 1);
    }

    #[test]
    fn signals_reach_the_inbox() {
        let inbox = listen(&[Sig::Hup]).expect("listen");
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::HUP).expect("kill");
        wait_for("SIGHUP", || inbox.counts[Sig::Hup.index()].load(Ordering::SeqCst) > 0);
        assert_eq!(inbox.take(), [Sig::Hup]);
        assert_eq!(inbox.take(), []);
    }
}
