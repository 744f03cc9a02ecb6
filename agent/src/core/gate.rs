//! When a verified bundle may be applied: its maintenance windows (in the device's local
//! time, from the signed POSIX `TZ` rule) and the apps' update lock, bounded by a
//! maximum deferral.
//!
//! The rules:
//! - The schedule is the one the **new** bundle carries (a fix can widen its own window).
//! - Outside every window: wait for the next opening (`until` = that instant). Windows
//!   are read on the local wall clock; one past midnight belongs to the day it opens.
//! - Inside a window, an update lock holds the apply until the lock is gone or the
//!   maximum deferral, counted from when the lock first held an update, has passed; then
//!   the apply goes ahead anyway. The deferral never lets an apply leave its window.
//! - Nothing here rejects: a held bundle is only waiting, and a newer one replaces it.
//!
//! Pure: no I/O, no clock. `now` (Unix seconds) and whether a lock is held are inputs.

use fleet_spec::maintenance::{weekday, Maintenance, TzRule, Window};
use fleet_spec::messages::WaitReason;

/// How far ahead a window opening is looked for (a week and a day covers every rule).
const HORIZON_DAYS: i64 = 8;

/// The verdict for one bundle at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Apply now. `forced` when an update lock was still held but its maximum deferral
    /// had passed.
    Open { forced: bool },
    /// Wait; `until` is when the apply will happen if known.
    Wait { reason: WaitReason, until: Option<i64> },
}

/// The bundle's schedule, ready to evaluate. A rule that does not parse (the bundler
/// checks it, so only a bug gets here) is read as UTC rather than holding updates.
#[derive(Debug, Clone)]
pub struct Schedule {
    windows: Vec<Window>,
    tz: TzRule,
    /// The maximum deferral in effect, seconds: the bundle's, capped by the device's.
    max_deferral: u64,
}

impl Schedule {
    pub fn new(m: &Maintenance, cap: u64) -> Schedule {
        let tz = TzRule::parse(&m.tz_rule).unwrap_or(TzRule::UTC);
        let max_deferral = m.max_deferral_s.unwrap_or(cap).min(cap);
        Schedule { windows: m.windows.clone(), tz, max_deferral }
    }

    /// Whether some window is open at `now`.
    pub fn in_window(&self, now: i64) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let local = self.tz.local(now);
        let day = local.div_euclid(86400);
        // A window opened yesterday may still be open (past midnight).
        (day - 1..=day).any(|d| {
            self.windows.iter().any(|w| {
                let start = d * 86400 + i64::from(w.from_min) * 60;
                w.on_day(weekday(d)) && start <= local && local < start + w.minutes() * 60
            })
        })
    }

    /// The next instant after `now` at which a window opens (`None`: no day allows any).
    pub fn next_opening(&self, now: i64) -> Option<i64> {
        let local = self.tz.local(now);
        let today = local.div_euclid(86400);
        (today..=today + HORIZON_DAYS)
            .flat_map(|d| {
                self.windows
                    .iter()
                    .filter(move |w| w.on_day(weekday(d)))
                    .map(move |w| self.tz.to_utc(d * 86400 + i64::from(w.from_min) * 60))
            })
            .filter(|&t| t > now)
            .min()
    }

    /// The verdict at `now`. `lock_since` is when an update lock first held an update
    /// back (`None`: no lock is held now).
    pub fn gate(&self, now: i64, lock_since: Option<i64>) -> Gate {
        if !self.in_window(now) {
            return Gate::Wait { reason: WaitReason::Window, until: self.next_opening(now) };
        }
        match lock_since {
            None => Gate::Open { forced: false },
            Some(since) => {
                let deadline = since.saturating_add(self.max_deferral as i64);
                if now >= deadline {
                    Gate::Open { forced: true }
                } else {
                    Gate::Wait { reason: WaitReason::Lock, until: Some(deadline) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fleet_spec::maintenance::{days_from_civil, EVERY_DAY};

    use super::*;

    const BERLIN: &str = "CET-1CEST,M3.5.0,M10.5.0/3";

    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60
    }

    fn hm(h: u16, m: u16) -> u16 {
        h * 60 + m
    }

    fn schedule(windows: &[Window], rule: &str, max_deferral_s: Option<u64>) -> Schedule {
        let m = Maintenance {
            windows: windows.to_vec(),
            timezone: String::new(),
            tz_rule: rule.into(),
            max_deferral_s,
        };
        Schedule::new(&m, 24 * 3600)
    }

    #[test]
    fn no_windows_means_always() {
        let s = schedule(&[], "", None);
        assert!(s.in_window(0));
        assert_eq!(s.gate(123, None), Gate::Open { forced: false });
    }

    #[test]
    fn a_window_past_midnight_belongs_to_the_day_it_opens() {
        // Fridays 22:00 → 02:00 (UTC).
        let fri = 1 << 4;
        let s = schedule(&[Window { days: fri, from_min: hm(22, 0), to_min: hm(2, 0) }], "UTC0", None);
        // 2026-12-04 is a Friday.
        assert!(!s.in_window(at(2026, 12, 4, 21, 59)));
        assert!(s.in_window(at(2026, 12, 4, 22, 0)));
        assert!(s.in_window(at(2026, 12, 5, 1, 59)), "Saturday 01:59 is Friday's window");
        assert!(!s.in_window(at(2026, 12, 5, 2, 0)));
        assert!(!s.in_window(at(2026, 12, 5, 22, 30)), "Saturday has no window of its own");
        assert!(!s.in_window(at(2026, 12, 4, 1, 0)), "Friday 01:00 would be Thursday's");
        assert_eq!(s.next_opening(at(2026, 12, 5, 2, 0)), Some(at(2026, 12, 11, 22, 0)));
        assert_eq!(
            s.gate(at(2026, 12, 4, 12, 0), None),
            Gate::Wait { reason: WaitReason::Window, until: Some(at(2026, 12, 4, 22, 0)) }
        );
    }

    #[test]
    fn days_of_the_week_select_the_openings() {
        // Weekdays 03:00-04:00 UTC; 2026-12-05 is a Saturday.
        let s = schedule(&[Window { days: 0b0011111, from_min: hm(3, 0), to_min: hm(4, 0) }], "", None);
        assert!(!s.in_window(at(2026, 12, 5, 3, 30)));
        assert_eq!(s.next_opening(at(2026, 12, 5, 3, 30)), Some(at(2026, 12, 7, 3, 0)), "Monday");
        assert!(s.in_window(at(2026, 12, 7, 3, 30)));
        let never = schedule(&[Window { days: 0, from_min: 0, to_min: 60 }], "", None);
        assert_eq!(never.next_opening(0), None);
        assert_eq!(never.gate(0, None), Gate::Wait { reason: WaitReason::Window, until: None });
    }

    #[test]
    fn windows_follow_the_local_clock_across_dst_changes() {
        let s = schedule(&[Window { days: EVERY_DAY, from_min: hm(2, 30), to_min: hm(4, 0) }], BERLIN, None);
        // Summer: 02:30 CEST is 00:30 UTC.
        assert!(s.in_window(at(2026, 7, 1, 0, 30)));
        assert!(!s.in_window(at(2026, 7, 1, 2, 30)));
        // Winter: 02:30 CET is 01:30 UTC.
        assert!(s.in_window(at(2026, 12, 1, 1, 30)));
        // 2026-03-29: 02:30 does not exist; the window opens when the clock jumps to 03:00
        // (01:00 UTC) and closes at 04:00 CEST (02:00 UTC).
        assert_eq!(s.next_opening(at(2026, 3, 28, 12, 0)), Some(at(2026, 3, 29, 1, 0)));
        assert!(s.in_window(at(2026, 3, 29, 1, 0)));
        assert!(!s.in_window(at(2026, 3, 29, 2, 0)));
        // 2026-10-25: 02:30 happens twice; the window opens at the first (00:30 UTC).
        assert_eq!(s.next_opening(at(2026, 10, 24, 12, 0)), Some(at(2026, 10, 25, 0, 30)));
        assert!(s.in_window(at(2026, 10, 25, 2, 59)), "04:00 CET is 03:00 UTC");
    }

    #[test]
    fn a_lock_holds_until_the_maximum_deferral_then_the_apply_goes_ahead() {
        let s = schedule(&[], "", Some(3600));
        let t0 = 1_000_000;
        assert_eq!(s.gate(t0, Some(t0)), Gate::Wait { reason: WaitReason::Lock, until: Some(t0 + 3600) });
        assert_eq!(
            s.gate(t0 + 3599, Some(t0)),
            Gate::Wait { reason: WaitReason::Lock, until: Some(t0 + 3600) }
        );
        assert_eq!(s.gate(t0 + 3600, Some(t0)), Gate::Open { forced: true });
        assert_eq!(s.gate(t0 + 10, None), Gate::Open { forced: false }, "lock gone");
    }

    #[test]
    fn the_device_caps_the_bundles_deferral_and_the_window_comes_first() {
        let m = Maintenance { max_deferral_s: Some(10 * 24 * 3600), ..Default::default() };
        let s = Schedule::new(&m, 600);
        assert_eq!(s.gate(0, Some(0)), Gate::Wait { reason: WaitReason::Lock, until: Some(600) });
        let unset = Schedule::new(&Maintenance::default(), 600);
        assert_eq!(unset.gate(600, Some(0)), Gate::Open { forced: true }, "the cap is the default");
        // A deferral that ran out outside the window still waits for the window.
        let w = schedule(&[Window { days: EVERY_DAY, from_min: hm(3, 0), to_min: hm(4, 0) }], "", Some(60));
        assert_eq!(
            w.gate(at(2026, 12, 6, 5, 0), Some(0)),
            Gate::Wait { reason: WaitReason::Window, until: Some(at(2026, 12, 7, 3, 0)) }
        );
    }
}
