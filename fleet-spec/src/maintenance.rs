//! When a device may apply a bundle: maintenance windows in the device's local time and
//! the update-lock bound, as signed inside the bundle (bundle format 3).
//!
//! The time zone travels as a POSIX `TZ` rule (`CET-1CEST,M3.5.0,M10.5.0/3`), which the
//! bundler takes from the footer of the IANA zone's TZif file: the device needs no time
//! zone database, and [`TzRule::offset_at`] evaluates the rule (DST included) with a
//! few lines of calendar arithmetic instead of a tz crate.
//!
//! Pure: no I/O, no clock.

use serde::{Deserialize, Serialize};

/// The schedule a bundle carries. The default (no windows, no bound) is "apply at once",
/// and a state with the default encodes exactly as before this existed.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Maintenance {
    /// When applying is allowed; empty: always.
    pub windows: Vec<Window>,
    /// The IANA name the rule came from (for people: logs and status), or the rule itself.
    pub timezone: String,
    /// The POSIX `TZ` rule the windows are read in; empty: UTC.
    pub tz_rule: String,
    /// How long an update lock may hold an apply back, in seconds (`None`: the agent's
    /// own cap, `[updates] max_deferral`). Bounded by that cap on the device.
    pub max_deferral_s: Option<u64>,
}

/// One window: opens at `from` (minutes after local midnight) on each of `days`, and
/// closes at `to`, on the next day when `to <= from` (a window past midnight belongs to
/// the day it opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Window {
    /// Bit 0 Monday … bit 6 Sunday.
    pub days: u8,
    pub from_min: u16,
    pub to_min: u16,
}

/// Every day of the week.
pub const EVERY_DAY: u8 = 0x7f;
/// Day names, Monday first, as `fleet.yaml` spells them.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    /// Length in minutes: `to - from`, wrapping past midnight; equal ends mean 24 hours.
    pub fn minutes(&self) -> i64 {
        let d = (i64::from(self.to_min) - i64::from(self.from_min)).rem_euclid(1440);
        if d == 0 {
            1440
        } else {
            d
        }
    }

    pub fn on_day(&self, weekday: u32) -> bool {
        self.days & (1 << weekday) != 0
    }
}

/// Why a `TZ` rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a POSIX TZ rule ({0}): expected e.g. `UTC0` or `CET-1CEST,M3.5.0,M10.5.0/3`")]
pub struct TzError(&'static str);

/// A transition date: `Mm.w.d`, `Jn` (1..=365, no Feb 29) or `n` (0..=365).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleDate {
    Month { month: u32, week: u32, weekday: u32 },
    Julian1(u32),
    Julian0(u32),
}

/// A parsed POSIX `TZ` rule. Offsets are seconds east of UTC (the opposite sign of the
/// string's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TzRule {
    std: i64,
    dst: Option<Dst>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dst {
    offset: i64,
    start: (RuleDate, i64),
    end: (RuleDate, i64),
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn num(&mut self, max: u32) -> Result<u32, TzError> {
        let start = self.i;
        let mut n: u32 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n.saturating_mul(10).saturating_add(u32::from(c - b'0'));
            self.i += 1;
        }
        if self.i == start || n > max {
            return Err(TzError("a number is missing or out of range"));
        }
        Ok(n)
    }
    fn name(&mut self) -> Result<(), TzError> {
        if self.eat(b'<') {
            while let Some(c) = self.peek() {
                self.i += 1;
                if c == b'>' {
                    return Ok(());
                }
            }
            return Err(TzError("unclosed `<`"));
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
            self.i += 1;
        }
        if self.i - start < 3 {
            return Err(TzError("a zone abbreviation needs 3 letters"));
        }
        Ok(())
    }
    /// `[+-]hh[:mm[:ss]]` in seconds, hours up to `max_h`.
    fn time(&mut self, max_h: u32) -> Result<i64, TzError> {
        let sign = if self.eat(b'-') {
            -1
        } else {
            self.eat(b'+');
            1
        };
        let mut secs = i64::from(self.num(max_h)?) * 3600;
        if self.eat(b':') {
            secs += i64::from(self.num(59)?) * 60;
            if self.eat(b':') {
                secs += i64::from(self.num(59)?);
            }
        }
        Ok(sign * secs)
    }
    fn date(&mut self) -> Result<(RuleDate, i64), TzError> {
        let date = if self.eat(b'M') {
            let month = self.num(12)?;
            if month == 0 || !self.eat(b'.') {
                return Err(TzError("bad `Mm.w.d` date"));
            }
            let week = self.num(5)?;
            if week == 0 || !self.eat(b'.') {
                return Err(TzError("bad `Mm.w.d` date"));
            }
            RuleDate::Month { month, week, weekday: self.num(6)? }
        } else if self.eat(b'J') {
            let n = self.num(365)?;
            if n == 0 {
                return Err(TzError("`Jn` counts from 1"));
            }
            RuleDate::Julian1(n)
        } else {
            RuleDate::Julian0(self.num(365)?)
        };
        // RFC 8536 extends the time of day to -167..=167 hours.
        let time = if self.eat(b'/') { self.time(167)? } else { 7200 };
        Ok((date, time))
    }
}

impl TzRule {
    /// UTC: what an empty rule means.
    pub const UTC: TzRule = TzRule { std: 0, dst: None };

    pub fn parse(rule: &str) -> Result<TzRule, TzError> {
        if rule.is_empty() {
            return Ok(TzRule::UTC);
        }
        let mut p = P { s: rule.as_bytes(), i: 0 };
        p.name()?;
        let std = -p.time(24)?;
        let mut dst = None;
        if p.peek().is_some() {
            p.name()?;
            let offset =
                if matches!(p.peek(), Some(b'+' | b'-' | b'0'..=b'9')) { -p.time(24)? } else { std + 3600 };
            // Without a rule, POSIX leaves it to the implementation: the US rule, as glibc.
            let (start, end) = if p.eat(b',') {
                let start = p.date()?;
                if !p.eat(b',') {
                    return Err(TzError("a DST rule needs a start and an end"));
                }
                (start, p.date()?)
            } else {
                (
                    (RuleDate::Month { month: 3, week: 2, weekday: 0 }, 7200),
                    (RuleDate::Month { month: 11, week: 1, weekday: 0 }, 7200),
                )
            };
            dst = Some(Dst { offset, start, end });
        }
        if p.peek().is_some() {
            return Err(TzError("unexpected characters at the end"));
        }
        Ok(TzRule { std, dst })
    }

    /// The offset east of UTC, in seconds, in effect at `utc` (Unix seconds).
    pub fn offset_at(&self, utc: i64) -> i64 {
        let Some(dst) = self.dst else {
            return self.std;
        };
        let (year, _, _) = civil_from_days((utc + self.std).div_euclid(86400));
        // Transitions are given in the local time in effect before them.
        let start = days_of(dst.start.0, year) * 86400 + dst.start.1 - self.std;
        let end = days_of(dst.end.0, year) * 86400 + dst.end.1 - dst.offset;
        let in_dst = if start <= end { start <= utc && utc < end } else { !(end <= utc && utc < start) };
        if in_dst {
            dst.offset
        } else {
            self.std
        }
    }

    /// Local wall-clock seconds (as if local time were UTC) at `utc`.
    pub fn local(&self, utc: i64) -> i64 {
        utc + self.offset_at(utc)
    }

    /// The UTC instant of local wall-clock `local`. In a DST gap, the instant the wall
    /// clock jumps past it; in an overlap, the first of the two.
    pub fn to_utc(&self, local: i64) -> i64 {
        let std = local - self.std;
        let Some(dst) = self.dst else {
            return std;
        };
        let daylight = local - dst.offset;
        let fits: Vec<i64> = [std, daylight].into_iter().filter(|&t| self.local(t) == local).collect();
        if let Some(first) = fits.iter().min() {
            return *first;
        }
        // A gap: the transition lies between the two readings; find its first second.
        let (mut lo, mut hi) = (std.min(daylight), std.max(daylight));
        let before = self.offset_at(lo);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.offset_at(mid) == before {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }
}

/// Days since 1970-01-01 of a rule date in `year`.
fn days_of(date: RuleDate, year: i64) -> i64 {
    let jan1 = days_from_civil(year, 1, 1);
    match date {
        RuleDate::Julian0(n) => jan1 + i64::from(n),
        RuleDate::Julian1(n) => {
            let leap = is_leap(year) && n >= 60;
            jan1 + i64::from(n) - 1 + i64::from(leap)
        }
        RuleDate::Month { month, week, weekday } => {
            let first = days_from_civil(year, month, 1);
            // 1970-01-01 was a Thursday (Sunday = 0).
            let wd_first = (first + 4).rem_euclid(7);
            let mut day = first + (i64::from(weekday) - wd_first).rem_euclid(7) + 7 * (i64::from(week) - 1);
            let next_month = if month == 12 {
                days_from_civil(year + 1, 1, 1)
            } else {
                days_from_civil(year, month + 1, 1)
            };
            while day >= next_month {
                day -= 7;
            }
            day
        }
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// (year, month, day) of days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Monday = 0 … Sunday = 6, of days since 1970-01-01 (a Thursday).
pub fn weekday(days: i64) -> u32 {
    (days + 3).rem_euclid(7) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60
    }

    #[test]
    fn civil_round_trip_and_weekday() {
        for z in [-1000, 0, 59, 60, 11016, 20000, 30000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(weekday(0), 3, "1970-01-01 was a Thursday");
        assert_eq!(weekday(days_from_civil(2026, 12, 6)), 6, "2026-12-06 is a Sunday");
    }

    #[test]
    fn berlin_switches_on_the_last_sundays_of_march_and_october() {
        let rule = TzRule::parse("CET-1CEST,M3.5.0,M10.5.0/3").expect("parses");
        // 2026-03-29 01:00 UTC: clocks go 02:00 → 03:00.
        assert_eq!(rule.offset_at(utc(2026, 3, 29, 0, 59)), 3600);
        assert_eq!(rule.offset_at(utc(2026, 3, 29, 1, 0)), 7200);
        // 2026-10-25 01:00 UTC: clocks go 03:00 → 02:00.
        assert_eq!(rule.offset_at(utc(2026, 10, 25, 0, 59)), 7200);
        assert_eq!(rule.offset_at(utc(2026, 10, 25, 1, 0)), 3600);
        assert_eq!(rule.offset_at(utc(2026, 7, 1, 12, 0)), 7200);
        assert_eq!(rule.offset_at(utc(2026, 12, 6, 12, 0)), 3600);
    }

    #[test]
    fn southern_hemisphere_and_new_york_and_fixed_offsets() {
        let sydney = TzRule::parse("AEST-10AEDT,M10.1.0,M4.1.0/3").expect("parses");
        assert_eq!(sydney.offset_at(utc(2026, 1, 15, 0, 0)), 11 * 3600);
        assert_eq!(sydney.offset_at(utc(2026, 6, 15, 0, 0)), 10 * 3600);
        let ny = TzRule::parse("EST5EDT,M3.2.0,M11.1.0").expect("parses");
        assert_eq!(ny.offset_at(utc(2026, 3, 8, 6, 59)), -5 * 3600);
        assert_eq!(ny.offset_at(utc(2026, 3, 8, 7, 0)), -4 * 3600);
        let kolkata = TzRule::parse("IST-5:30").expect("parses");
        assert_eq!(kolkata.offset_at(0), 5 * 3600 + 1800);
        let named = TzRule::parse("<+0545>-5:45").expect("parses");
        assert_eq!(named.offset_at(0), 5 * 3600 + 45 * 60);
        assert_eq!(TzRule::parse("UTC0").expect("parses"), TzRule::UTC);
        assert_eq!(TzRule::parse("").expect("empty is UTC"), TzRule::UTC);
    }

    #[test]
    fn local_to_utc_across_the_gap_and_the_overlap() {
        let rule = TzRule::parse("CET-1CEST,M3.5.0,M10.5.0/3").expect("parses");
        let local = |y, mo, d, h, mi| utc(y, mo, d, h, mi);
        assert_eq!(rule.to_utc(local(2026, 7, 1, 12, 0)), utc(2026, 7, 1, 10, 0));
        // 02:30 does not exist on 2026-03-29: the wall clock passes it at 01:00 UTC.
        assert_eq!(rule.to_utc(local(2026, 3, 29, 2, 30)), utc(2026, 3, 29, 1, 0));
        // 02:30 happens twice on 2026-10-25: the first is 00:30 UTC.
        assert_eq!(rule.to_utc(local(2026, 10, 25, 2, 30)), utc(2026, 10, 25, 0, 30));
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in ["C", "CET", "CET-1CEST,M3.5.0", "CET-1CEST,M13.5.0,M10.5.0", "CET-1x", "CET-1CEST,J0,J5"]
        {
            assert!(TzRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn window_length_wraps_past_midnight() {
        assert_eq!(Window { days: EVERY_DAY, from_min: 22 * 60, to_min: 2 * 60 }.minutes(), 240);
        assert_eq!(Window { days: EVERY_DAY, from_min: 60, to_min: 120 }.minutes(), 60);
        assert_eq!(Window { days: EVERY_DAY, from_min: 60, to_min: 60 }.minutes(), 1440);
    }
}
