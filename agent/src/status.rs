//! Publishing status on change, rate-limited: [`StatusLimiter`] decides when a status
//! report goes out, given the reports offered and `now`.
//!
//! Rules: a report whose content equals the last one sent is dropped (timestamps do
//! not count); otherwise it is sent at once if the last send was at least
//! `min_interval` ago, else it waits, replaced by any newer report, and is sent when
//! the interval has passed: so the final state is always published. Pure: the caller
//! passes `now` (a `tokio::time::Instant`).

use std::time::Duration;

use fleet_spec::messages::StatusReport;
use tokio::time::Instant;

#[derive(Debug)]
pub struct StatusLimiter {
    min_interval: Duration,
    last_sent: Option<(Instant, StatusReport)>,
    pending: Option<StatusReport>,
}

impl StatusLimiter {
    pub fn new(min_interval: Duration) -> Self {
        StatusLimiter { min_interval, last_sent: None, pending: None }
    }

    /// Offers a report; returns it when it should be sent now.
    pub fn offer(&mut self, report: StatusReport, now: Instant) -> Option<StatusReport> {
        if let Some((_, last)) = &self.last_sent {
            if last.same_content(&report) {
                self.pending = None;
                return None;
            }
        }
        match &self.last_sent {
            Some((at, _)) if now.duration_since(*at) < self.min_interval => {
                self.pending = Some(report);
                None
            }
            _ => {
                self.pending = None;
                self.last_sent = Some((now, report.clone()));
                Some(report)
            }
        }
    }

    /// When a waiting report is due.
    pub fn due_at(&self) -> Option<Instant> {
        let (at, _) = self.last_sent.as_ref()?;
        self.pending.as_ref().map(|_| *at + self.min_interval)
    }

    /// The waiting report, if it is due.
    pub fn take_due(&mut self, now: Instant) -> Option<StatusReport> {
        if self.due_at()? > now {
            return None;
        }
        let report = self.pending.take()?;
        self.last_sent = Some((now, report.clone()));
        Some(report)
    }

    /// The report to send at shutdown or after reconnecting: the newest one known.
    pub fn latest(&self) -> Option<&StatusReport> {
        self.pending.as_ref().or(self.last_sent.as_ref().map(|(_, r)| r))
    }

    /// Marks the waiting report as sent (shutdown flush, reconnect).
    pub fn sent_latest(&mut self, now: Instant) {
        if let Some(report) = self.pending.take() {
            self.last_sent = Some((now, report));
        }
    }
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
            timestamp: ts,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sends_on_change_at_most_once_per_interval_and_always_the_last() {
        let mut l = StatusLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(l.offer(report(DeviceState::Idle, 1), t0).is_some(), "first goes out");
        assert!(l.offer(report(DeviceState::Idle, 2), t0).is_none(), "same content is dropped");
        assert!(l.offer(report(DeviceState::Downloading, 3), t0).is_none(), "too soon: waits");
        assert!(l.offer(report(DeviceState::Applying, 4), t0).is_none(), "replaced");
        assert_eq!(l.due_at(), Some(t0 + Duration::from_secs(1)));
        assert!(l.take_due(t0 + Duration::from_millis(500)).is_none());
        let sent = l.take_due(t0 + Duration::from_secs(1)).expect("due");
        assert_eq!(sent.state, DeviceState::Applying, "the newest waiting report wins");
        assert_eq!(l.due_at(), None);
        let later = t0 + Duration::from_secs(5);
        assert!(l.offer(report(DeviceState::Converged, 5), later).is_some(), "after the interval: at once");
    }
}
