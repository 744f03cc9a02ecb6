//! Holding a verified bundle back: its maintenance windows and the apps' update lock
//! (the rules are in `core::gate`; this reads the lock directory and the clock and
//! keeps `waiting` for the status report).

use fleet_spec::maintenance::Maintenance;

use super::*;
use crate::core::gate::{Gate, Schedule};

/// A bundle that waits (state `waiting`).
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub waiting: Waiting,
    pub maintenance: Maintenance,
}

/// How often a held lock is looked at again.
pub const LOCK_POLL: Duration = Duration::from_secs(2);
/// The longest a window wait sleeps before looking again (a clock that jumps, a
/// timer that drifts, a newer bundle's schedule).
pub const WINDOW_RECHECK: Duration = Duration::from_secs(60);

/// What the gate says, with what the lock directory showed.
struct Verdict {
    gate: Gate,
    entry: Option<String>,
    lock_since: Option<i64>,
}

impl<E: Engine> Agent<E> {
    fn judge(&mut self, m: &Maintenance, now: i64) -> Verdict {
        let schedule = Schedule::new(m, self.cfg.updates.max_deferral.as_secs());
        if !schedule.in_window(now) {
            return Verdict { gate: schedule.gate(now, None), entry: None, lock_since: None };
        }
        let entry = match crate::lockdir::held(&self.cfg.updates.lock_dir) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(
                    dir = %self.cfg.updates.lock_dir.display(),
                    "update lock directory unreadable, read as unlocked: {e}"
                );
                None
            }
        };
        let lock_since = match &entry {
            None => {
                if self.store.lock_since().is_some() {
                    self.clear_lock_since();
                }
                None
            }
            Some(_) => Some(self.store.lock_since().unwrap_or_else(|| {
                if let Err(e) = self.store.save_lock_since(Some(now)) {
                    tracing::warn!("cannot persist when the update lock started: {e}");
                }
                now
            })),
        };
        Verdict { gate: schedule.gate(now, lock_since), entry, lock_since }
    }

    fn clear_lock_since(&self) {
        if let Err(e) = self.store.save_lock_since(None) {
            tracing::warn!("cannot clear the update lock's start: {e}");
        }
    }

    /// Whether the verified bundle `digest` (of `version`) may be applied now. When it
    /// may not, the machine rests in `waiting` and the outcome says until when.
    pub(super) fn hold(
        &mut self,
        digest: &str,
        version: u64,
        m: &Maintenance,
    ) -> Result<Option<Outcome>, AgentError> {
        let now = self.clock.now();
        let verdict = self.judge(m, now);
        match verdict.gate {
            Gate::Open { forced } => {
                if forced {
                    let mut entry = verdict.entry.unwrap_or_default();
                    if entry.len() > 64 {
                        let mut cut = 64;
                        while !entry.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        entry.truncate(cut);
                    }
                    self.event(EventKind::UpdateLockOverridden {
                        version,
                        entry,
                        since: verdict.lock_since.unwrap_or(now),
                    });
                }
                if verdict.lock_since.is_some() {
                    self.clear_lock_since();
                }
                Ok(None)
            }
            Gate::Wait { reason, until } => {
                let since = match &self.held {
                    Some(h) if h.waiting.reason == reason => h.waiting.since,
                    _ => verdict.lock_since.filter(|_| reason == WaitReason::Lock).unwrap_or(now),
                };
                let changed = self.held.as_ref().is_none_or(|h| h.waiting.digest != digest);
                if changed {
                    tracing::info!(digest, ?reason, until, "bundle verified; waiting to apply");
                }
                let waiting = Waiting { reason, since, until, digest: digest.to_string() };
                self.held = Some(Held { waiting, maintenance: m.clone() });
                if self.machine.state() == ApplyState::Verified {
                    self.on(Command::Hold)?;
                } else {
                    self.publish_status();
                }
                Ok(Some(Outcome::Waiting { reason, until }))
            }
        }
    }

    /// For a bundle that waits: still held at `now`? Returns how long to wait before
    /// asking again (`None`: go ahead, verify and apply it). Cheap: no bundle is read.
    pub fn still_waiting(&mut self, digest: &str) -> Option<Duration> {
        if self.machine.state() != ApplyState::Waiting {
            return None;
        }
        let held = self.held.as_ref().filter(|h| h.waiting.digest == digest)?;
        let m = held.maintenance.clone();
        let now = self.clock.now();
        match self.judge(&m, now).gate {
            Gate::Open { .. } => None,
            Gate::Wait { reason, until } => {
                let h = self.held.as_mut().expect("checked above");
                if h.waiting.reason != reason || h.waiting.until != until {
                    if h.waiting.reason != reason {
                        h.waiting.since = now;
                    }
                    h.waiting.reason = reason;
                    h.waiting.until = until;
                    self.publish_status();
                }
                Some(retry_after(reason, until, now))
            }
        }
    }

    /// The bundle that waited is no longer wanted (the applied one is announced again).
    pub fn release_hold(&mut self) -> Result<(), AgentError> {
        if self.machine.state() == ApplyState::Waiting && self.current.is_some() {
            tracing::info!("the waiting bundle is no longer wanted");
            self.on(Command::Unhold)?;
        }
        Ok(())
    }
}

/// How long to sleep before looking at a held bundle again.
pub fn retry_after(reason: WaitReason, until: Option<i64>, now: i64) -> Duration {
    match reason {
        WaitReason::Lock => {
            let left = until.map_or(u64::MAX, |u| u.saturating_sub(now).max(0) as u64);
            LOCK_POLL.min(Duration::from_secs(left.max(1)))
        }
        WaitReason::Window => {
            let left = until.map_or(u64::MAX, |u| u.saturating_sub(now).max(1) as u64);
            WINDOW_RECHECK.min(Duration::from_secs(left))
        }
    }
}
