//! Self-update, carried out (the rules are [`crate::core::self_update`]): after a
//! commit, the agent release the committed state declares is decided; a binary to
//! switch to is taken from the blob store (downloaded before the apply like an
//! artifact, see `missing_artifacts`), staged under `<state_dir>/agent/slots/`, checked
//! (`--version` must print the declared version, `check-config` must accept the live
//! config), and pointed at as `next`; the daemon then exits with
//! [`crate::launch::EXIT_SWITCH`] and `fleet-agent launch` runs it on trial. A binary
//! that fails its check is recorded as failed exactly as one that fails its trial:
//! never tried again. Why a declared release is not running is in the status
//! (`agent_update`) and, once per release and reason, an event.

use std::cell::OnceCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fleet_spec::messages::AgentUpdateError;
use fleet_spec::model::{AgentBinary, AgentRelease};

use super::*;
use crate::core::self_update::{self, Decision, Running};
use crate::launch;

/// How long `--version` or `check-config` of a staged binary may take (qemu, a slow card).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// What this process knows about itself for self-update.
#[derive(Debug, Default)]
pub(super) struct SelfUpdate {
    /// Started by `fleet-agent launch` (`FLEET_AGENT_LAUNCHER=1`).
    pub(super) launched: bool,
    /// `FLEET_AGENT_SLOT`: the slot's sha256 the launcher started, or `package`.
    slot: Option<String>,
    /// The running binary's sha256 (hex), found once.
    sha: OnceCell<String>,
    /// `FLEET_AGENT_TRIAL`: this binary is on trial and must confirm.
    pub(super) trial: Option<String>,
    /// Why the declared release is not the one running (status `agent_update`).
    pub(super) refused: Option<AgentUpdateError>,
    /// The committed bundle the release was last decided for.
    decided: Option<String>,
    /// A binary staged as `next`: the daemon exits for the launcher.
    pub(super) staged: Option<String>,
    /// (sha or version, code) already said in an event.
    said: BTreeSet<(String, &'static str)>,
}

fn is_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl SelfUpdate {
    /// From the environment the launcher sets.
    pub(super) fn from_env() -> SelfUpdate {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        SelfUpdate {
            launched: var(launch::ENV_LAUNCHER).as_deref() == Some("1"),
            slot: var(launch::ENV_SLOT).filter(|s| is_sha(s)),
            trial: var(launch::ENV_TRIAL).filter(|s| is_sha(s)),
            ..SelfUpdate::default()
        }
    }

    /// The running binary's sha256: the slot the launcher named, else the executable
    /// hashed (the packaged binary; read once, about 2 MiB).
    fn sha(&self) -> &str {
        self.sha.get_or_init(|| {
            if let Some(slot) = &self.slot {
                return slot.clone();
            }
            std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| files::sha256_file(&exe).map_err(|e| e.to_string()))
                .unwrap_or_else(|e| {
                    tracing::warn!(
                        "cannot hash the running agent binary ({e}): any declared release counts as new"
                    );
                    String::new()
                })
        })
    }
}

impl<E: Engine> Agent<E> {
    /// `<state_dir>/agent`: the launcher's layout.
    fn launch_dir(&self) -> PathBuf {
        launch::dir(&self.cfg.state_dir)
    }

    fn running(&self) -> Running<'_> {
        Running {
            version: version(),
            sha256: self.update.sha(),
            arch: std::env::consts::ARCH,
            launched: self.update.launched,
        }
    }

    /// [`self_update::decide`] for `release` with what this agent is. Without a release
    /// nothing is looked at (the running binary is hashed only when a release needs it).
    fn decide_release<'r>(&self, release: Option<&'r AgentRelease>) -> Decision<'r> {
        if release.is_none() {
            return Decision::Keep;
        }
        let dir = self.launch_dir();
        self_update::decide(release, &self.running(), |sha| launch::failure(&dir, sha).map(|f| f.reason))
    }

    /// The binary of `release` this agent would switch to, if any: what the runner
    /// downloads beside a verified bundle's artifacts.
    pub(super) fn wanted_agent_binary<'r>(
        &self,
        release: Option<&'r AgentRelease>,
    ) -> Option<&'r AgentBinary> {
        match self.decide_release(release) {
            Decision::Switch(b) => Some(b),
            _ => None,
        }
    }

    /// A binary staged for the launcher: the daemon should exit with
    /// [`launch::EXIT_SWITCH`].
    pub fn agent_switch_staged(&self) -> bool {
        self.update.staged.is_some()
    }

    /// The sha256 of this binary when it runs on trial and has not confirmed yet.
    pub fn agent_trial(&self) -> Option<&str> {
        self.update.trial.as_deref()
    }

    /// The trial passed (connected, reported, reconciled): tells the launcher, which
    /// keeps this binary.
    pub fn confirm_trial(&mut self) {
        let Some(sha) = self.update.trial.clone() else { return };
        match launch::confirm(&self.launch_dir(), &sha) {
            Ok(()) => {
                tracing::info!(digest = sha, version = version(), "the new agent passed its trial");
                self.update.trial = None;
                self.event(EventKind::AgentUpdated { version: version().to_string(), digest: sha });
            }
            Err(e) => tracing::warn!("cannot confirm the trial ({e}); tried again at the next step"),
        }
    }

    /// Why the declared agent release is not running, for the status.
    pub(super) fn agent_update_status(&self) -> Option<AgentUpdateError> {
        self.update.refused.clone()
    }

    /// At rest after a commit (and once after a start): decides the committed state's
    /// agent release and, when it names a new binary, stages and checks it. Decided once
    /// per committed bundle.
    pub async fn check_agent_release(&mut self) {
        let at_rest =
            self.machine.state().is_rest() && self.held.is_none() && self.pending_rollback.is_none();
        let Some(current) = self.current.as_ref().filter(|_| at_rest && self.update.staged.is_none()) else {
            return;
        };
        if self.update.decided.as_deref() == Some(current.record.digest.as_str()) {
            return;
        }
        self.update.decided = Some(current.record.digest.clone());
        let release = current.state.agent.clone();
        let dir = self.launch_dir();
        let decision = self.decide_release(release.as_ref());
        let version = release.as_ref().map(|r| r.version.clone()).unwrap_or_default();
        let before = self.update.refused.clone();
        match decision {
            Decision::Keep => self.update.refused = None,
            Decision::Refuse { code, reason, digest } => self.refuse_release(&version, code, reason, digest),
            Decision::Switch(binary) => {
                let binary = binary.clone();
                match self.stage_agent(&binary, &version).await {
                    Ok(()) => {
                        tracing::info!(
                            version,
                            digest = binary.sha256_hex(),
                            "new agent staged and checked: handing over to the launcher for its trial"
                        );
                        self.update.refused = None;
                        self.update.staged = Some(binary.sha256_hex());
                    }
                    Err(Staging::Missing(reason)) => {
                        // Not the binary's fault: decided again with the next bundle.
                        self.update.decided = None;
                        self.refuse_release(
                            &version,
                            "agent_binary_missing",
                            reason,
                            Some(binary.sha256_hex()),
                        );
                    }
                    Err(Staging::Failed(reason)) => {
                        let sha = binary.sha256_hex();
                        if let Err(e) = launch::record_failure(&dir, &sha, &reason) {
                            tracing::warn!(
                                "cannot record the failed binary ({e}); it would be checked again"
                            );
                        }
                        launch::unstage(&dir, &sha);
                        let reason =
                            format!("agent {version} (binary {}) failed its check: {reason}", &sha[..12]);
                        self.refuse_release(&version, "agent_update_failed", reason, Some(sha));
                    }
                }
            }
        }
        if self.update.refused != before {
            self.publish_status();
        }
    }

    fn refuse_release(&mut self, version: &str, code: &'static str, reason: String, digest: Option<String>) {
        tracing::warn!(version, code, "the declared agent release is not taken: {reason}");
        let key = (digest.clone().unwrap_or_else(|| version.to_string()), code);
        if self.update.said.insert(key) {
            self.event(EventKind::AgentUpdateRefused {
                version: version.to_string(),
                code: code.to_string(),
                reason: reason.clone(),
            });
        }
        self.update.refused = Some(AgentUpdateError {
            code: code.to_string(),
            message: reason,
            version: version.to_string(),
            digest,
        });
    }

    /// Copies the stored binary into its slot, runs its checks, and points `next` at it.
    async fn stage_agent(&self, binary: &AgentBinary, version: &str) -> Result<(), Staging> {
        let sha = binary.sha256_hex();
        let blob = self.store.blob_path(&sha);
        if !self.store.has_blob(&sha, binary.size) {
            return Err(Staging::Missing(format!(
                "the agent binary {} is not stored on the device: it is downloaded with the next bundle",
                &sha[..12]
            )));
        }
        if files::sha256_file(&blob).ok().as_deref() != Some(sha.as_str()) {
            let _ = std::fs::remove_file(&blob);
            return Err(Staging::Missing(format!(
                "the stored agent binary {} is damaged (deleted): it is downloaded with the next bundle",
                &sha[..12]
            )));
        }
        let dir = self.launch_dir();
        let slot = launch::stage(&dir, &sha, version, &blob).map_err(|e| {
            Staging::Missing(format!("cannot stage the agent binary in {}: {e}", dir.display()))
        })?;
        let out = run_check(&slot, &["--version".as_ref()], &dir).await.map_err(Staging::Failed)?;
        let expected = format!("fleet-agent {version}");
        if out.trim() != expected {
            return Err(Staging::Failed(format!(
                "`--version` printed {:?}, not {expected:?}",
                out.trim().chars().take(200).collect::<String>()
            )));
        }
        run_check(&slot, &["check-config".as_ref(), "--config".as_ref(), self.cfg.file.as_os_str()], &dir)
            .await
            .map_err(Staging::Failed)?;
        launch::point_next(&dir, &sha).map_err(|e| {
            Staging::Missing(format!("cannot point `next` at the new agent in {}: {e}", dir.display()))
        })
    }
}

/// Why staging stopped.
enum Staging {
    /// Not the binary's fault (not stored, disk): tried again later.
    Missing(String),
    /// The binary failed a check: never tried again.
    Failed(String),
}

/// Runs `program args` with a timeout; its stdout when it exits 0, else why not (with
/// the end of what it printed). Output goes to a file (no pipe to fill).
async fn run_check(program: &Path, args: &[&std::ffi::OsStr], dir: &Path) -> Result<String, String> {
    let out_path = dir.join("check.out");
    let shown = || {
        format!(
            "`{} {}`",
            program.display(),
            args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        )
    };
    let file =
        std::fs::File::create(&out_path).map_err(|e| format!("cannot create {}: {e}", out_path.display()))?;
    let err_file = file.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new(program)
        .args(args)
        .env_remove("FLEET_AGENT_TRIAL")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("{} cannot start: {e}", shown()))?;
    let deadline = tokio::time::Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if tokio::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} did not finish within {} s", shown(), CHECK_TIMEOUT.as_secs()));
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(format!("{}: {e}", shown())),
        }
    };
    let text = std::fs::read(&out_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    if status.success() {
        Ok(text)
    } else {
        let tail: String = text.chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("{} exited with {status}: {}", shown(), tail.trim()))
    }
}
