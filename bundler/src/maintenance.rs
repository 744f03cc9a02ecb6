//! `maintenance:` of `fleet.yaml` (every device's default) and `devices/<id>.yaml`
//! (key by key over it): when a device may apply its bundle.
//!
//! ```yaml
//! maintenance:
//!   windows:                       # absent: any time
//!     - days: [mon-fri]            # absent: every day
//!       from: "02:00"
//!       to: "04:30"                # to <= from: past midnight
//!   timezone: Europe/Berlin        # IANA name; default UTC
//!   timezone_label: tz             # a device label naming its zone (wins over timezone)
//!   update_lock:
//!     max_deferral: 6h             # capped by the device's [updates] max_deferral_secs
//! ```
//!
//! The zone is resolved here, in CI, to the POSIX `TZ` rule in the footer of its TZif
//! file (`$TZDIR` or `/usr/share/zoneinfo`), so the device needs no zone database; the
//! rule is signed into the bundle (`fleet_spec::maintenance`). A tzdata update on the CI
//! machine that changes a zone's rule changes the bundles of the devices in it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use fleet_spec::maintenance::{Maintenance, TzRule, Window, DAY_NAMES, EVERY_DAY};
use serde::Deserialize;

use crate::diag::Diagnostic;
use crate::duration::parse_duration_ms;
use crate::yaml::{Pos, Shape, Spanned};

const WINDOW_SHAPE: Shape = Shape::Keys(&[("days", Shape::Any), ("from", Shape::Any), ("to", Shape::Any)]);

/// The keys of `maintenance:`.
pub const MAINTENANCE_SHAPE: Shape = Shape::Keys(&[
    ("windows", Shape::List(&WINDOW_SHAPE)),
    ("timezone", Shape::Any),
    ("timezone_label", Shape::Any),
    ("update_lock", Shape::Keys(&[("max_deferral", Shape::Any)])),
]);

/// The longest maximum deferral a repository may ask for; devices cap it further.
pub const MAX_DEFERRAL_LIMIT_MS: u64 = 30 * 86_400_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceFile {
    #[serde(default)]
    pub windows: Option<Vec<Spanned<WindowFile>>>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub timezone_label: Option<Spanned<String>>,
    #[serde(default)]
    pub update_lock: Option<UpdateLockFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    #[serde(default)]
    pub days: Option<Vec<Spanned<String>>>,
    pub from: Spanned<String>,
    pub to: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateLockFile {
    #[serde(default)]
    pub max_deferral: Option<Spanned<String>>,
}

/// Validated settings of one file; `None`: not set there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub windows: Option<Vec<Window>>,
    /// (name, rule).
    pub timezone: Option<(String, String)>,
    /// (label, file, line, column) for the diagnostics of a device's label value.
    pub timezone_label: Option<(String, String, u64, u64)>,
    pub max_deferral_s: Option<u64>,
}

impl Settings {
    pub fn from_file(file: &str, m: &MaintenanceFile, diags: &mut Vec<Diagnostic>) -> Settings {
        let mut err =
            |at: Pos, message: String| diags.push(Diagnostic::error(file, at.line, at.column, message));
        let mut out = Settings::default();
        if let Some(windows) = &m.windows {
            let mut list = Vec::new();
            for w in windows {
                let v = &w.value;
                let days = match &v.days {
                    None => Some(EVERY_DAY),
                    Some(days) => {
                        let mut mask = 0u8;
                        let mut ok = true;
                        for d in days {
                            match parse_days(&d.value) {
                                Ok(bits) => mask |= bits,
                                Err(m) => {
                                    err(Pos::of(d), m);
                                    ok = false;
                                }
                            }
                        }
                        if ok && mask == 0 {
                            err(Pos::of(w), "`days` is empty: leave it out for every day".into());
                        }
                        ok.then_some(mask)
                    }
                };
                let from =
                    parse_hm(&v.from.value).map_err(|m| err(Pos::of(&v.from), format!("`from`: {m}"))).ok();
                let to = parse_hm(&v.to.value).map_err(|m| err(Pos::of(&v.to), format!("`to`: {m}"))).ok();
                if let (Some(days), Some(from), Some(to)) = (days, from, to) {
                    if from == to {
                        err(
                            Pos::of(&v.to),
                            "`from` and `to` are equal: for the whole day use \"00:00\" to \"23:59\", or leave out the windows"
                                .into(),
                        );
                    } else {
                        list.push(Window { days, from_min: from, to_min: to });
                    }
                }
            }
            out.windows = Some(list);
        }
        if let Some(tz) = &m.timezone {
            match resolve_timezone(&tz.value) {
                Ok(rule) => out.timezone = Some((tz.value.clone(), rule)),
                Err(m) => err(Pos::of(tz), m),
            }
        }
        if let Some(label) = &m.timezone_label {
            let at = Pos::of(label);
            if label.value.trim().is_empty() {
                err(at, "`timezone_label` names a device label, e.g. `tz`".into());
            } else {
                out.timezone_label = Some((label.value.clone(), file.to_string(), at.line, at.column));
            }
        }
        if let Some(d) = m.update_lock.as_ref().and_then(|u| u.max_deferral.as_ref()) {
            match parse_duration_ms(&d.value) {
                Ok(ms) if ms <= MAX_DEFERRAL_LIMIT_MS => out.max_deferral_s = Some(ms / 1000),
                Ok(_) => err(
                    Pos::of(d),
                    "max_deferral is at most 30d: an update lock must not hold a device forever".into(),
                ),
                Err(m) => err(Pos::of(d), m),
            }
        }
        out
    }

    /// The device's settings over the fleet's, key by key.
    pub fn over(&self, fleet: &Settings) -> Settings {
        Settings {
            windows: self.windows.clone().or_else(|| fleet.windows.clone()),
            timezone: self.timezone.clone().or_else(|| fleet.timezone.clone()),
            timezone_label: self.timezone_label.clone().or_else(|| fleet.timezone_label.clone()),
            max_deferral_s: self.max_deferral_s.or(fleet.max_deferral_s),
        }
    }

    /// The signed schedule of a device with these (merged) settings and `labels`.
    pub fn resolve(
        &self,
        device: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Maintenance, Diagnostic> {
        let mut timezone = self.timezone.clone();
        if let Some((label, file, line, column)) = &self.timezone_label {
            if let Some(value) = labels.get(label) {
                let rule = resolve_timezone(value).map_err(|m| {
                    Diagnostic::error(
                        file.as_str(),
                        *line,
                        *column,
                        format!("device {device}: label `{label}`: {m}"),
                    )
                })?;
                timezone = Some((value.clone(), rule));
            }
        }
        let (timezone, tz_rule) = match (&self.windows, timezone) {
            // Without windows the zone means nothing: leave it out of the bundle.
            (None, _) => (String::new(), String::new()),
            (Some(_), Some((name, rule))) => (name, rule),
            (Some(_), None) => ("UTC".to_string(), "UTC0".to_string()),
        };
        Ok(Maintenance {
            windows: self.windows.clone().unwrap_or_default(),
            timezone,
            tz_rule,
            max_deferral_s: self.max_deferral_s,
        })
    }
}

/// A schedule in one line, for `plan`: `any time`, or its windows, zone and bound,
/// e.g. `mon,tue 22:00-02:00 (Europe/Berlin), update lock at most 6h`.
pub fn describe(m: &Maintenance) -> String {
    let hm = |min: u16| format!("{:02}:{:02}", min / 60, min % 60);
    let mut out = if m.windows.is_empty() {
        "any time".to_string()
    } else {
        let windows: Vec<String> = m
            .windows
            .iter()
            .map(|w| {
                let days: Vec<&str> = DAY_NAMES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| w.on_day(*i as u32))
                    .map(|(_, d)| *d)
                    .collect();
                let days = if w.days & EVERY_DAY == EVERY_DAY { "daily".to_string() } else { days.join(",") };
                format!("{days} {}-{}", hm(w.from_min), hm(w.to_min))
            })
            .collect();
        format!("{} ({})", windows.join("; "), m.timezone)
    };
    if let Some(s) = m.max_deferral_s {
        out.push_str(&format!(", update lock at most {s}s"));
    }
    out
}

/// `mon`, `monday`, a range `mon-fri` (may wrap: `sat-mon`) → bits.
fn parse_days(text: &str) -> Result<u8, String> {
    let day = |s: &str| {
        let s = s.trim().to_ascii_lowercase();
        DAY_NAMES.iter().position(|d| s.len() >= 3 && d.starts_with(&s[..3]) && is_day_name(&s))
    };
    let bad = || format!("day {text:?}: use mon, tue, wed, thu, fri, sat, sun, or a range like mon-fri");
    match text.split_once('-') {
        None => day(text).map(|d| 1 << d).ok_or_else(bad),
        Some((a, b)) => {
            let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
            let mut bits = 0u8;
            let mut d = a;
            loop {
                bits |= 1 << d;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
            Ok(bits)
        }
    }
}

fn is_day_name(s: &str) -> bool {
    const FULL: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    s.len() == 3 || FULL.contains(&s)
}

/// `HH:MM` (24-hour) → minutes after midnight.
fn parse_hm(text: &str) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time of day: use \"HH:MM\", e.g. \"02:30\" (quoted)");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// An IANA zone name → its POSIX `TZ` rule, from the TZif file's footer. A POSIX rule
/// with an explicit offset (`UTC0`, `<+0530>-5:30`) is taken as it is.
pub fn resolve_timezone(name: &str) -> Result<String, String> {
    static CACHE: Mutex<BTreeMap<String, Result<String, String>>> = Mutex::new(BTreeMap::new());
    if let Some(hit) = CACHE.lock().ok().and_then(|c| c.get(name).cloned()) {
        return hit;
    }
    let result = resolve_uncached(name);
    if let Ok(mut c) = CACHE.lock() {
        c.insert(name.to_string(), result.clone());
    }
    result
}

fn resolve_uncached(name: &str) -> Result<String, String> {
    let valid_name = !name.is_empty()
        && !name.starts_with('/')
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
    let dir = std::env::var_os("TZDIR").unwrap_or_else(|| "/usr/share/zoneinfo".into());
    if valid_name {
        let path = std::path::Path::new(&dir).join(name);
        if let Ok(bytes) = read_small(&path) {
            return footer(&bytes).ok_or_else(|| {
                format!("time zone {name:?}: {} has no POSIX TZ rule (TZif v2+ footer)", path.display())
            });
        }
    }
    // A POSIX rule written out (it needs an offset, so a digit).
    if name.chars().any(|c| c.is_ascii_digit()) && TzRule::parse(name).is_ok() {
        return Ok(name.to_string());
    }
    if name == "UTC" || name == "Etc/UTC" {
        return Ok("UTC0".to_string());
    }
    Err(format!(
        "{name:?} is not a time zone known under {}: use an IANA name such as \"Europe/Berlin\" (install tzdata, or set TZDIR), or a POSIX rule such as \"UTC0\"",
        std::path::Path::new(&dir).display()
    ))
}

fn read_small(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a file"));
    }
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The POSIX rule in a TZif (v2+) file's footer: the text between its last two newlines.
fn footer(bytes: &[u8]) -> Option<String> {
    if !bytes.starts_with(b"TZif") || bytes.get(4).is_none_or(|v| *v < b'2') {
        return None;
    }
    let body = bytes.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|b| *b == b'\n')? + 1;
    let rule = std::str::from_utf8(&body[start..]).ok()?;
    (!rule.is_empty() && TzRule::parse(rule).is_ok()).then(|| rule.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> (Settings, Vec<Diagnostic>) {
        let file: MaintenanceFile = crate::yaml::parse("fleet.yaml", yaml).expect("parses");
        let mut diags = Vec::new();
        (Settings::from_file("fleet.yaml", &file, &mut diags), diags)
    }

    #[test]
    fn windows_days_and_times_parse() {
        let (s, diags) = settings(
            "windows:\n  - days: [mon-fri, sun]\n    from: \"22:00\"\n    to: \"02:30\"\n  - from: \"12:00\"\n    to: \"13:00\"\nupdate_lock:\n  max_deferral: 6h\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(
            s.windows,
            Some(vec![
                Window { days: 0b1011111, from_min: 22 * 60, to_min: 150 },
                Window { days: EVERY_DAY, from_min: 720, to_min: 780 },
            ])
        );
        assert_eq!(s.max_deferral_s, Some(6 * 3600));
        assert_eq!(parse_days("sat-mon"), Ok(0b1100001));
        assert_eq!(parse_days("Tuesday"), Ok(0b10));
    }

    #[test]
    fn bad_values_are_reported_at_their_place() {
        let (_, diags) = settings(
            "windows:\n  - days: [mon, funday]\n    from: \"25:00\"\n    to: \"2\"\n  - from: \"01:00\"\n    to: \"01:00\"\ntimezone: Mars/Olympus\nupdate_lock:\n  max_deferral: 90d\n",
        );
        let got: Vec<(u64, u64, &str)> =
            diags.iter().map(|d| (d.line, d.column, d.message.as_str())).collect();
        assert_eq!(got.len(), 6, "{got:#?}");
        assert!(got[0].2.contains("funday") && got[0].0 == 2, "{got:?}");
        assert!(got[1].2.starts_with("`from`") && got[1].0 == 3, "{got:?}");
        assert!(got[2].2.starts_with("`to`") && got[2].0 == 4, "{got:?}");
        assert!(got[3].2.contains("equal") && got[3].0 == 6, "{got:?}");
        assert!(got[4].2.contains("Mars/Olympus") && got[4].0 == 7, "{got:?}");
        assert!(got[5].2.contains("30d") && got[5].0 == 9, "{got:?}");
    }

    #[test]
    fn unknown_keys_get_a_did_you_mean() {
        let text = "name: f\nmaintenance:\n  window:\n    - from: \"01:00\"\n      to: \"02:00\"\n  update_lock:\n    max_defferal: 1h\n";
        let err = crate::yaml::parse_all::<crate::format::FleetFile>(
            "fleet.yaml",
            text,
            &crate::format::FLEET_SHAPE,
        )
        .expect_err("unknown keys");
        let messages: Vec<String> =
            err.iter().map(|d| format!("{}:{} {}", d.line, d.column, d.message)).collect();
        assert!(messages.iter().any(|m| m.starts_with("3:") && m.contains("windows")), "{messages:?}");
        assert!(messages.iter().any(|m| m.starts_with("7:") && m.contains("max_deferral")), "{messages:?}");
    }

    #[test]
    fn zones_resolve_to_their_posix_rule_and_labels_win() {
        if !std::path::Path::new("/usr/share/zoneinfo/Europe/Berlin").exists() {
            eprintln!("no tzdata here: skipped");
            return;
        }
        assert_eq!(resolve_timezone("Europe/Berlin").as_deref(), Ok("CET-1CEST,M3.5.0,M10.5.0/3"));
        assert_eq!(resolve_timezone("UTC").as_deref(), Ok("UTC0"));
        assert_eq!(resolve_timezone("<+0530>-5:30").as_deref(), Ok("<+0530>-5:30"));
        assert!(resolve_timezone("../../etc/passwd").is_err());
        assert!(resolve_timezone("Europe").is_err(), "a directory is not a zone");
        let (s, diags) = settings(
            "windows:\n  - from: \"01:00\"\n    to: \"02:00\"\ntimezone: America/New_York\ntimezone_label: tz\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        let plain = s.resolve("d1", &BTreeMap::new()).expect("resolves");
        assert_eq!(
            (plain.timezone.as_str(), plain.tz_rule.as_str()),
            ("America/New_York", "EST5EDT,M3.2.0,M11.1.0")
        );
        let labels = BTreeMap::from([("tz".to_string(), "Asia/Kolkata".to_string())]);
        assert_eq!(s.resolve("d2", &labels).expect("resolves").tz_rule, "IST-5:30");
        let bad = BTreeMap::from([("tz".to_string(), "Nowhere/Land".to_string())]);
        let d = s.resolve("d3", &bad).expect_err("unknown zone");
        assert_eq!((d.line, d.column), (5, 17));
        assert!(d.message.starts_with("device d3: label `tz`"), "{}", d.message);
    }

    #[test]
    fn a_device_overrides_key_by_key_and_no_windows_means_no_schedule() {
        let (fleet, _) =
            settings("windows:\n  - from: \"01:00\"\n    to: \"02:00\"\nupdate_lock:\n  max_deferral: 1h\n");
        let (device, _) = settings("update_lock:\n  max_deferral: 2h\n");
        let merged = device.over(&fleet);
        assert_eq!(merged.windows, fleet.windows);
        assert_eq!(merged.max_deferral_s, Some(7200));
        let m = merged.resolve("d", &BTreeMap::new()).expect("resolves");
        assert_eq!(m.tz_rule, "UTC0", "windows without a zone are UTC");
        let none = Settings::default().resolve("d", &BTreeMap::new()).expect("resolves");
        assert_eq!(none, Maintenance::default(), "nothing set: the bundle stays in its old format");
        assert_eq!(describe(&none), "any time");
        assert_eq!(describe(&m), "daily 01:00-02:00 (UTC), update lock at most 7200s");
    }
}
