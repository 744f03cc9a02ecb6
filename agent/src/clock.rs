//! The wall clock, behind a trait so tests choose `now`.
//!
//! Only bundle verification and timestamps in reports use wall time (unix seconds);
//! every timer and timeout uses `tokio::time`, which tests pause and advance. Nothing
//! else in the agent reads the system clock.

use std::cell::Cell;

pub trait Clock {
    /// Unix seconds.
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// Unix time that starts at a fixed value and follows `tokio::time` (so a paused test
/// runtime moves it with `advance` and auto-advance).
#[derive(Debug)]
pub struct TokioClock {
    start_unix: i64,
    start: tokio::time::Instant,
    offset: Cell<i64>,
}

impl TokioClock {
    pub fn starting_at(unix: i64) -> Self {
        TokioClock { start_unix: unix, start: tokio::time::Instant::now(), offset: Cell::new(0) }
    }

    /// Jumps the wall clock (e.g. backwards, to test clock-rollback detection).
    pub fn jump(&self, secs: i64) {
        self.offset.set(self.offset.get() + secs);
    }
}

impl Clock for TokioClock {
    fn now(&self) -> i64 {
        self.start_unix + self.start.elapsed().as_secs() as i64 + self.offset.get()
    }
}
