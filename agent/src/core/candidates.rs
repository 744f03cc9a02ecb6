//! Announced bundles the agent may fetch next: at most one per source, the latest.
//!
//! An announcement is a hint: unsigned, so anyone who can publish on the broker or sit on
//! the path can forge one. The rules here make sure a hint can make the agent *look*
//! somewhere and nothing more:
//!
//! - **Latest wins per source.** One candidate from the pointer file (`fetch.base_url`,
//!   polled) and one from MQTT (`.../desired`); a new announcement replaces its source's
//!   previous one. A flood is one candidate, not a queue.
//! - **No unsigned ranking.** Versions, sizes and URLs in an announcement are never
//!   compared: a forged `version: u64::MAX` outranks nothing. When the sources disagree
//!   the pointer file is tried first: it comes from the device's own configured server.
//! - **Failures back off, then drop.** A candidate whose fetch failed (or that was
//!   deferred) is tried again after a growing delay, and dropped after
//!   [`MAX_FAILURES`]; a failure never turns into a rejection (only bytes that fail
//!   verification are rejected, by the driver, keyed by their own hash).
//! - The pointer is polled on its own slow timer, so each poll makes its candidate due
//!   at once: once the genuine bundle is on the server, the next poll fetches it.
//!
//! Pure: no I/O, no clock (`now` is a parameter).

use fleet_spec::messages::Announcement;
use tokio::time::{Duration, Instant};

/// Where an announcement came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The device's pointer file, `<fetch.base_url>/devices/<id>.json`.
    Pointer,
    /// The retained announcement on `<prefix>/<fleet>/devices/<id>/desired`.
    Mqtt,
}

/// Consecutive failures after which a candidate is dropped.
pub const MAX_FAILURES: u32 = 6;
/// The first retry delay; doubles per failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub ann: Announcement,
    pub source: Source,
    pub failures: u32,
    pub next_try: Instant,
}

#[derive(Debug, Default)]
pub struct Candidates {
    pointer: Option<Candidate>,
    mqtt: Option<Candidate>,
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

impl Candidates {
    fn slot(&mut self, source: Source) -> &mut Option<Candidate> {
        match source {
            Source::Pointer => &mut self.pointer,
            Source::Mqtt => &mut self.mqtt,
        }
    }

    /// Takes an announcement from `source`, replacing that source's previous one. A
    /// pointer announcement is due at once (polls are the pointer's pace); an MQTT one
    /// that repeats the current candidate (a retained message delivered again on
    /// reconnection) keeps its backoff, a changed one is due at once.
    pub fn offer(&mut self, source: Source, ann: Announcement, now: Instant) {
        let slot = self.slot(source);
        let keep_backoff = source == Source::Mqtt && slot.as_ref().is_some_and(|c| c.ann == ann);
        if keep_backoff {
            return;
        }
        let failures = match slot {
            Some(c) if c.ann.digest == ann.digest => c.failures,
            _ => 0,
        };
        *slot = Some(Candidate { ann, source, failures, next_try: now });
    }

    /// The candidate to try at `now`, if any is due: the pointer's first.
    pub fn due(&self, now: Instant) -> Option<&Candidate> {
        [&self.pointer, &self.mqtt].into_iter().flatten().find(|c| c.next_try <= now)
    }

    /// When the next candidate falls due (`None`: nothing waits).
    pub fn wake_at(&self) -> Option<Instant> {
        [&self.pointer, &self.mqtt].into_iter().flatten().map(|c| c.next_try).min()
    }

    /// A try of `digest` from `source` failed or was deferred: back off, and drop the
    /// candidate after [`MAX_FAILURES`].
    pub fn failed(&mut self, source: Source, digest: &str, now: Instant) {
        let slot = self.slot(source);
        if let Some(c) = slot.as_mut().filter(|c| c.ann.digest == digest) {
            c.failures += 1;
            c.next_try = now + backoff(c.failures);
            if c.failures >= MAX_FAILURES {
                *slot = None;
            }
        }
    }

    /// Waits with `digest` from `source` until `until`, without counting a failure (the
    /// bundle is expected on MQTT, or the agent is busy).
    pub fn postpone(&mut self, source: Source, digest: &str, until: Instant) {
        if let Some(c) = self.slot(source).as_mut().filter(|c| c.ann.digest == digest) {
            c.next_try = until;
        }
    }

    /// Makes every candidate naming `digest` due at `now` (its bytes just arrived).
    pub fn wake(&mut self, digest: &str, now: Instant) {
        for c in [&mut self.pointer, &mut self.mqtt].into_iter().flatten() {
            if c.ann.digest == digest {
                c.next_try = now;
            }
        }
    }

    /// Whether a candidate expects its bundle as a retained MQTT message.
    pub fn wants_blob(&self) -> bool {
        [&self.pointer, &self.mqtt].into_iter().flatten().any(|c| c.ann.mqtt_blob)
    }

    /// Forgets every candidate naming `digest` (applied, or its bytes were refused).
    pub fn done(&mut self, digest: &str) {
        for slot in [&mut self.pointer, &mut self.mqtt] {
            if slot.as_ref().is_some_and(|c| c.ann.digest == digest) {
                *slot = None;
            }
        }
    }

    /// Whether `digest` from `source` is still a candidate.
    pub fn holds(&self, source: Source, digest: &str) -> bool {
        match source {
            Source::Pointer => &self.pointer,
            Source::Mqtt => &self.mqtt,
        }
        .as_ref()
        .is_some_and(|c| c.ann.digest == digest)
    }

    /// The announcement of a candidate naming `digest`, if any.
    pub fn announcement(&self, digest: &str) -> Option<&Announcement> {
        [&self.pointer, &self.mqtt].into_iter().flatten().map(|c| &c.ann).find(|a| a.digest == digest)
    }

    /// Digests of every candidate (their partial downloads are worth keeping).
    pub fn digests(&self) -> Vec<&str> {
        [&self.pointer, &self.mqtt].into_iter().flatten().map(|c| c.ann.digest.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(version: u64, digest: char) -> Announcement {
        Announcement {
            fleet: "f".into(),
            device: "d".into(),
            version,
            commit: "c".into(),
            digest: digest.to_string().repeat(64),
            size: 10,
            urls: vec![],
            mqtt_blob: false,
        }
    }

    #[test]
    fn an_unsigned_version_outranks_nothing_and_the_latest_announcement_wins() {
        let now = Instant::now();
        let mut c = Candidates::default();
        c.offer(Source::Mqtt, ann(u64::MAX, 'a'), now);
        c.offer(Source::Mqtt, ann(2, 'b'), now);
        assert_eq!(c.due(now).map(|c| c.ann.version), Some(2), "latest wins, not highest");
        assert_eq!(c.digests(), ["b".repeat(64)]);
    }

    #[test]
    fn the_pointer_file_is_preferred_when_the_sources_disagree() {
        let now = Instant::now();
        let mut c = Candidates::default();
        c.offer(Source::Mqtt, ann(u64::MAX, 'a'), now);
        c.offer(Source::Pointer, ann(3, 'b'), now);
        assert_eq!(c.due(now).map(|c| c.ann.version), Some(3));
        // While the pointer's candidate backs off, MQTT's is still tried.
        c.failed(Source::Pointer, &"b".repeat(64), now);
        assert_eq!(c.due(now).map(|c| c.source), Some(Source::Mqtt));
    }

    #[test]
    fn failures_back_off_then_drop_the_candidate() {
        let now = Instant::now();
        let mut c = Candidates::default();
        let d = "a".repeat(64);
        c.offer(Source::Mqtt, ann(5, 'a'), now);
        c.failed(Source::Mqtt, &d, now);
        assert!(c.due(now).is_none());
        assert_eq!(c.wake_at(), Some(now + FIRST_BACKOFF));
        c.failed(Source::Mqtt, &d, now);
        assert_eq!(c.wake_at(), Some(now + FIRST_BACKOFF * 2));
        // The same retained message delivered again keeps the backoff.
        c.offer(Source::Mqtt, ann(5, 'a'), now);
        assert!(c.due(now).is_none());
        for _ in 2..MAX_FAILURES {
            c.failed(Source::Mqtt, &d, now);
        }
        assert_eq!(c.wake_at(), None, "dropped after {MAX_FAILURES} failures");
        assert!(backoff(40) <= MAX_BACKOFF);
    }

    #[test]
    fn each_poll_makes_the_pointer_candidate_due_at_once() {
        let now = Instant::now();
        let mut c = Candidates::default();
        let d = "a".repeat(64);
        c.offer(Source::Pointer, ann(5, 'a'), now);
        c.failed(Source::Pointer, &d, now);
        assert!(c.due(now).is_none());
        c.offer(Source::Pointer, ann(5, 'a'), now);
        assert!(c.due(now).is_some(), "the genuine bundle is fetched at the next poll");
        assert!(c.holds(Source::Pointer, &d));
        c.done(&d);
        assert!(!c.holds(Source::Pointer, &d));
        assert_eq!(c.wake_at(), None);
    }
}
