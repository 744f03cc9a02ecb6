//! The apply path as an explicit state machine.
//!
//! ```text
//!  idle ─fetch→ fetching ─verified→ verified ─stage→ staged ─apply→ applying ─applied→ awaiting_health ─healthy→ committed
//!                  │                    │              │              │                       │
//!                  └──── refuse ────────┴──────────────┘→ failed      └──── unhealthy ────────┴→ rolling_back ─rolled_back→ rolled_back
//!                                                          ↑   └──────── retry_rollback ─────────────────────┘ │
//!                                                          └──────────── rollback_stuck ───────────────────────┘
//!   verified ─hold→ waiting (outside the bundle's maintenance window, or an update lock;
//!                   a rest state: the next `fetch` re-checks it) ─unhold→ committed
//! ```
//!
//! `committed`, `failed` and `rolled_back` are rest states: the next `fetch` starts over.
//! A rollback that cannot finish (disk full, engine down) rests in `failed` too, so a
//! newer bundle that verifies is still taken (the fix forward); reconcile retries the
//! rollback from there.
//! Recovery after a crash enters `applying`, `awaiting_health` or `rolling_back`
//! directly from `idle` with the `resume_*` commands.
//!
//! This module is pure: no I/O, no clock. Every impossible transition is an error
//! ([`Disallowed`]) rather than a silent no-op, so a bug in the driver shows up in tests.

use std::fmt;

use fleet_spec::messages::DeviceState;

/// Where the apply path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApplyState {
    Idle,
    Fetching,
    Verified,
    Staged,
    Applying,
    AwaitingHealth,
    Committed,
    RollingBack,
    RolledBack,
    Failed,
    /// A verified bundle waits for its window or an update lock; nothing changed.
    Waiting,
}

impl ApplyState {
    pub const ALL: [ApplyState; 11] = [
        ApplyState::Idle,
        ApplyState::Fetching,
        ApplyState::Verified,
        ApplyState::Staged,
        ApplyState::Applying,
        ApplyState::AwaitingHealth,
        ApplyState::Committed,
        ApplyState::RollingBack,
        ApplyState::RolledBack,
        ApplyState::Failed,
        ApplyState::Waiting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApplyState::Idle => "idle",
            ApplyState::Fetching => "fetching",
            ApplyState::Verified => "verified",
            ApplyState::Staged => "staged",
            ApplyState::Applying => "applying",
            ApplyState::AwaitingHealth => "awaiting_health",
            ApplyState::Committed => "committed",
            ApplyState::RollingBack => "rolling_back",
            ApplyState::RolledBack => "rolled_back",
            ApplyState::Failed => "failed",
            ApplyState::Waiting => "waiting",
        }
    }

    /// A state in which nothing is in flight and a new bundle may be taken.
    pub fn is_rest(self) -> bool {
        matches!(
            self,
            ApplyState::Idle
                | ApplyState::Committed
                | ApplyState::RolledBack
                | ApplyState::Failed
                | ApplyState::Waiting
        )
    }

    /// The state reported on MQTT (the documented small set). `verified` and `staged`
    /// still report `downloading`: the bundle may yet be refused there (preflight, image
    /// pulls), and `applying` means the first change on the device is about to be made.
    pub fn device_state(self) -> DeviceState {
        match self {
            ApplyState::Idle => DeviceState::Idle,
            ApplyState::Fetching | ApplyState::Verified | ApplyState::Staged => DeviceState::Downloading,
            ApplyState::Applying | ApplyState::RollingBack => DeviceState::Applying,
            ApplyState::AwaitingHealth => DeviceState::AwaitingHealth,
            ApplyState::Committed => DeviceState::Converged,
            ApplyState::RolledBack => DeviceState::RolledBack,
            ApplyState::Failed => DeviceState::Failed,
            ApplyState::Waiting => DeviceState::Waiting,
        }
    }
}

impl fmt::Display for ApplyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the driver asks the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Start fetching (or reading) a bundle.
    Fetch,
    /// The bundle passed `fleet_spec::bundle::verify`.
    Verified,
    /// The bundle is stored, its paths are allowed and its images are present.
    Stage,
    /// Start changing the device.
    Apply,
    /// Every effect is done; now wait for health.
    Applied,
    /// Every container runs and is healthy.
    Healthy,
    /// Health failed or an effect failed: restore the last good state.
    Unhealthy,
    /// The last good state is restored.
    RolledBack,
    /// The bundle was refused or could not be prepared; nothing was changed.
    Refuse,
    /// Recovery: an apply was interrupted; redo its (idempotent) effects.
    ResumeApply,
    /// Recovery: effects were done; wait for health again.
    ResumeHealth,
    /// Recovery: a rollback was interrupted, or an apply must not be resumed.
    ResumeRollback,
    /// Recovery found a committed state (or none): rest.
    Recovered,
    /// The rollback could not finish; rest in `failed` until it is retried.
    RollbackStuck,
    /// Retry an unfinished rollback.
    RetryRollback,
    /// The verified bundle may not be applied yet (maintenance window, update lock).
    Hold,
    /// The bundle that waited is no longer wanted: the applied one is again.
    Unhold,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An impossible transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("command {command} is not allowed in state {state}")]
pub struct Disallowed {
    pub command: Command,
    pub state: ApplyState,
}

/// The transition function: `(state, command) → state`, or [`Disallowed`].
pub fn transition(state: ApplyState, command: Command) -> Result<ApplyState, Disallowed> {
    use ApplyState as S;
    use Command as C;
    let next = match (command, state) {
        (C::Fetch, s) if s.is_rest() => S::Fetching,
        (C::Verified, S::Fetching) => S::Verified,
        (C::Stage, S::Verified) => S::Staged,
        (C::Apply, S::Staged) => S::Applying,
        (C::Applied, S::Applying) => S::AwaitingHealth,
        (C::Healthy, S::AwaitingHealth) => S::Committed,
        (C::Unhealthy, S::Applying | S::AwaitingHealth) => S::RollingBack,
        (C::RolledBack, S::RollingBack) => S::RolledBack,
        (C::Refuse, S::Fetching | S::Verified | S::Staged) => S::Failed,
        (C::ResumeApply, S::Idle) => S::Applying,
        (C::ResumeHealth, S::Idle) => S::AwaitingHealth,
        (C::ResumeRollback, S::Idle) => S::RollingBack,
        (C::Recovered, S::Idle) => S::Committed,
        (C::RollbackStuck, S::RollingBack) => S::Failed,
        (C::RetryRollback, S::Failed) => S::RollingBack,
        (C::Hold, S::Verified) => S::Waiting,
        (C::Unhold, S::Waiting) => S::Committed,
        (command, state) => return Err(Disallowed { command, state }),
    };
    Ok(next)
}

/// The machine itself: a state and the transition function.
#[derive(Debug, Clone)]
pub struct Machine {
    state: ApplyState,
}

impl Default for Machine {
    fn default() -> Self {
        Machine { state: ApplyState::Idle }
    }
}

impl Machine {
    pub fn state(&self) -> ApplyState {
        self.state
    }

    /// Applies a command; on [`Disallowed`] the state is unchanged.
    pub fn on(&mut self, command: Command) -> Result<ApplyState, Disallowed> {
        self.state = transition(self.state, command)?;
        Ok(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ApplyState as S;
    use Command as C;

    const COMMANDS: [Command; 17] = [
        C::Fetch,
        C::Verified,
        C::Stage,
        C::Apply,
        C::Applied,
        C::Healthy,
        C::Unhealthy,
        C::RolledBack,
        C::Refuse,
        C::ResumeApply,
        C::ResumeHealth,
        C::ResumeRollback,
        C::Recovered,
        C::RollbackStuck,
        C::RetryRollback,
        C::Hold,
        C::Unhold,
    ];

    /// The whole table, written out: every allowed transition, and nothing else.
    const ALLOWED: &[(ApplyState, Command, ApplyState)] = &[
        (S::Idle, C::Fetch, S::Fetching),
        (S::Committed, C::Fetch, S::Fetching),
        (S::RolledBack, C::Fetch, S::Fetching),
        (S::Failed, C::Fetch, S::Fetching),
        (S::Fetching, C::Verified, S::Verified),
        (S::Verified, C::Stage, S::Staged),
        (S::Staged, C::Apply, S::Applying),
        (S::Applying, C::Applied, S::AwaitingHealth),
        (S::AwaitingHealth, C::Healthy, S::Committed),
        (S::Applying, C::Unhealthy, S::RollingBack),
        (S::AwaitingHealth, C::Unhealthy, S::RollingBack),
        (S::RollingBack, C::RolledBack, S::RolledBack),
        (S::Fetching, C::Refuse, S::Failed),
        (S::Verified, C::Refuse, S::Failed),
        (S::Staged, C::Refuse, S::Failed),
        (S::Idle, C::ResumeApply, S::Applying),
        (S::Idle, C::ResumeHealth, S::AwaitingHealth),
        (S::Idle, C::ResumeRollback, S::RollingBack),
        (S::Idle, C::Recovered, S::Committed),
        (S::RollingBack, C::RollbackStuck, S::Failed),
        (S::Failed, C::RetryRollback, S::RollingBack),
        (S::Waiting, C::Fetch, S::Fetching),
        (S::Verified, C::Hold, S::Waiting),
        (S::Waiting, C::Unhold, S::Committed),
    ];

    #[test]
    fn every_state_and_command_pair_matches_the_table() {
        for state in ApplyState::ALL {
            for command in COMMANDS {
                let expected =
                    ALLOWED.iter().find(|(s, c, _)| *s == state && *c == command).map(|(_, _, n)| *n);
                match (transition(state, command), expected) {
                    (Ok(next), Some(want)) => assert_eq!(next, want, "{state} --{command}-->"),
                    (Err(e), None) => assert_eq!(e, Disallowed { command, state }),
                    (got, want) => panic!("{state} --{command}--> gave {got:?}, table says {want:?}"),
                }
            }
        }
    }

    #[test]
    fn happy_path_and_rollback_path() {
        let mut m = Machine::default();
        for c in [C::Fetch, C::Verified, C::Stage, C::Apply, C::Applied, C::Healthy] {
            m.on(c).expect("allowed");
        }
        assert_eq!(m.state(), S::Committed);
        assert_eq!(m.state().device_state(), DeviceState::Converged);
        for c in [C::Fetch, C::Verified, C::Stage, C::Apply, C::Applied, C::Unhealthy, C::RolledBack] {
            m.on(c).expect("allowed");
        }
        assert_eq!(m.state(), S::RolledBack);
        let err = m.on(C::Healthy).expect_err("not from rolled_back");
        assert_eq!(err.to_string(), "command Healthy is not allowed in state rolled_back");
        assert_eq!(m.state(), S::RolledBack, "a disallowed command changes nothing");
    }

    #[test]
    fn applying_is_reported_only_once_the_first_change_is_made() {
        for s in [S::Fetching, S::Verified, S::Staged] {
            assert_eq!(s.device_state(), DeviceState::Downloading, "{s}");
        }
        assert_eq!(S::Applying.device_state(), DeviceState::Applying);
    }
}
