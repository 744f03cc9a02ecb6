//! Publishing status on change, rate-limited: [`StatusLimiter`] decides when a status
//! report goes out, given the reports offered and `now`.
//!
//! Rules: a report whose content equals the last one sent is dropped (timestamps do
//! not count). Otherwise it goes out at once while the token bucket has a token: the
//! bucket holds [`BURST`] tokens and gains one per `min_interval`, so the few
//! transitions of one apply (downloading, applying, converged) are published without
//! delay, while a flapping device sends at most one report per `min_interval` over time.
//! The last token is kept for outcomes (`converged`, `failed`, `rolled_back`, ...): a
//! transient state (`downloading`, `applying`, `awaiting_health`) never takes it, so
//! under a stream of updates the intermediate reports are the ones coalesced and each
//! outcome still goes out at once. Without a token the report waits, replaced by any
//! newer report, and is sent when the next token arrives: so the final state is always
//! published. Pure: the caller passes
//! `now` (a `tokio::time::Instant`).

use std::time::Duration;

use fleet_spec::messages::{DeviceState, StatusReport};
use tokio::time::Instant;

/// Reports that may go out back to back before the rate limit applies.
pub const BURST: u32 = 4;

#[derive(Debug)]
pub struct StatusLimiter {
    min_interval: Duration,
    /// Tokens left, and when the bucket was last topped up.
    tokens: u32,
    refilled_at: Option<Instant>,
    last_sent: Option<StatusReport>,
    pending: Option<StatusReport>,
}

impl StatusLimiter {
    pub fn new(min_interval: Duration) -> Self {
        StatusLimiter { min_interval, tokens: BURST, refilled_at: None, last_sent: None, pending: None }
    }

    /// Adds the tokens earned since the last top-up.
    fn refill(&mut self, now: Instant) {
        let Some(at) = self.refilled_at else {
            self.refilled_at = Some(now);
            return;
        };
        if self.min_interval.is_zero() {
            self.tokens = BURST;
            self.refilled_at = Some(now);
            return;
        }
        let earned = (now.saturating_duration_since(at).as_nanos() / self.min_interval.as_nanos()) as u32;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled_at = Some(if self.tokens == BURST { now } else { at + self.min_interval * earned });
        }
    }

    fn send(&mut self, report: StatusReport, now: Instant) -> StatusReport {
        self.refill(now);
        self.tokens = self.tokens.saturating_sub(1);
        self.pending = None;
        self.last_sent = Some(report.clone());
        report
    }

    /// Offers a report; returns it when it should be sent now.
    pub fn offer(&mut self, report: StatusReport, now: Instant) -> Option<StatusReport> {
        if self.last_sent.as_ref().is_some_and(|last| last.same_content(&report)) {
            self.pending = None;
            return None;
        }
        self.refill(now);
        if self.tokens >= Self::needed(&report) {
            Some(self.send(report, now))
        } else {
            self.pending = Some(report);
            None
        }
    }

    /// Tokens a report needs in the bucket to go out: a transient state leaves the last
    /// one for an outcome.
    fn needed(report: &StatusReport) -> u32 {
        1 + u32::from(is_transient(report.state))
    }

    /// When a waiting report is due: when the bucket holds the tokens it needs.
    pub fn due_at(&self) -> Option<Instant> {
        let needed = Self::needed(self.pending.as_ref()?);
        let at = self.refilled_at?;
        let missing = needed.saturating_sub(self.tokens);
        Some(at + self.min_interval * missing)
    }

    /// The waiting report, if it is due.
    pub fn take_due(&mut self, now: Instant) -> Option<StatusReport> {
        if self.due_at()? > now {
            return None;
        }
        let report = self.pending.take()?;
        Some(self.send(report, now))
    }

    /// The report to send at shutdown or after reconnecting: the newest one known.
    pub fn latest(&self) -> Option<&StatusReport> {
        self.pending.as_ref().or(self.last_sent.as_ref())
    }

    /// Marks the waiting report as sent (shutdown flush, reconnect).
    pub fn sent_latest(&mut self, now: Instant) {
        if let Some(report) = self.pending.take() {
            self.send(report, now);
        }
    }
}

/// States the device passes through on its way to an outcome.
fn is_transient(state: DeviceState) -> bool {
    matches!(state, DeviceState::Downloading | DeviceState::Applying | DeviceState::AwaitingHealth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::messages::{DeviceState, FileCounts};

    fn report(state: DeviceState, ts: i64) -> StatusReport {
        StatusReport {
            device: "d".into(),
            fleet: "f".into(),
            agent_version: "0".into(),
            state,
            desired: None,
            applied: None,
            containers: vec![],
            files: FileCounts::default(),
            last_error: None,
            waiting: None,
            agent_update: None,
            timestamp: ts,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_apply_goes_out_at_once_then_at_most_once_per_interval_and_always_the_last() {
        let second = Duration::from_secs(1);
        let mut l = StatusLimiter::new(second);
        let t0 = Instant::now();
        assert!(l.offer(report(DeviceState::Idle, 1), t0).is_some(), "first goes out");
        assert!(l.offer(report(DeviceState::Idle, 2), t0).is_none(), "same content is dropped");
        // An apply's transitions use the burst: no delay.
        for (i, state) in
            [DeviceState::Downloading, DeviceState::Applying, DeviceState::Converged].into_iter().enumerate()
        {
            assert!(l.offer(report(state, 3 + i as i64), t0).is_some(), "{state:?} goes out at once");
        }
        // The bucket is empty: a flapping device waits for tokens, the newest report wins.
        assert!(l.offer(report(DeviceState::Degraded, 7), t0).is_none(), "no token: waits");
        assert!(l.offer(report(DeviceState::Failed, 8), t0).is_none(), "replaced");
        assert_eq!(l.due_at(), Some(t0 + second));
        assert!(l.take_due(t0 + Duration::from_millis(500)).is_none());
        let sent = l.take_due(t0 + second).expect("due");
        assert_eq!(sent.state, DeviceState::Failed, "the newest waiting report wins");
        assert_eq!(l.due_at(), None);
        assert!(l.offer(report(DeviceState::Degraded, 9), t0 + second).is_none(), "one per interval");
        assert_eq!(l.take_due(t0 + second * 2).map(|r| r.state), Some(DeviceState::Degraded));
        // After a quiet spell the burst is back.
        let later = t0 + Duration::from_secs(60);
        for state in
            [DeviceState::Downloading, DeviceState::Applying, DeviceState::Converged, DeviceState::Idle]
        {
            assert!(l.offer(report(state, 100), later).is_some(), "{state:?} after a quiet spell");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_stream_of_updates_outcomes_go_out_at_once_and_transients_are_coalesced() {
        let second = Duration::from_secs(1);
        let mut l = StatusLimiter::new(second);
        let mut now = Instant::now();
        let mut outcomes_delayed = 0;
        for update in 0..20i64 {
            // One update a second, each passing through three transient states.
            let version = |state| StatusReport {
                files: FileCounts { managed: update as u64, drift_repaired: 0 },
                ..report(state, update)
            };
            for state in [DeviceState::Downloading, DeviceState::Applying, DeviceState::AwaitingHealth] {
                let _ = l.offer(version(state), now);
            }
            if l.offer(version(DeviceState::Converged), now).is_none() {
                outcomes_delayed += 1;
            }
            now += second;
            let _ = l.take_due(now);
        }
        assert_eq!(outcomes_delayed, 0, "every converged report went out without delay");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_transient_does_not_take_the_last_token() {
        let second = Duration::from_secs(1);
        let mut l = StatusLimiter::new(second);
        let t0 = Instant::now();
        for state in [DeviceState::Converged, DeviceState::Downloading, DeviceState::Applying] {
            assert!(l.offer(report(state, 1), t0).is_some(), "{state:?}");
        }
        assert!(l.offer(report(DeviceState::AwaitingHealth, 2), t0).is_none(), "keeps the last token");
        assert_eq!(l.due_at(), Some(t0 + second), "due when a second token arrives, not now");
        assert!(l.take_due(t0).is_none(), "not due yet");
        let sent = l.offer(report(DeviceState::Converged, 3), t0).expect("the outcome goes out at once");
        assert_eq!(sent.state, DeviceState::Converged);
        assert_eq!(l.due_at(), None, "the outcome replaced the waiting transient");
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_never_delays() {
        let mut l = StatusLimiter::new(Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..20 {
            let state = if i % 2 == 0 { DeviceState::Applying } else { DeviceState::Converged };
            assert!(l.offer(report(state, i), t0).is_some());
        }
    }
}
