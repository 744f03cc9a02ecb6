//! Diagnostics: every problem found in a fleet repository, with file, line and column.
//!
//! A run collects all of them (each file is checked independently) and reports them
//! together; identical problems seen while rendering many devices are merged into one
//! diagnostic that lists the devices.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem at one place in the repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Repository-relative path, e.g. `apps/web/compose.yaml`.
    pub file: String,
    /// 1-based; 0 when the problem concerns the whole file.
    pub line: u64,
    /// 1-based; 0 when unknown.
    pub column: u64,
    pub message: String,
    /// Devices whose rendering hit this problem (empty when it is not device-specific).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

impl Diagnostic {
    pub fn error(file: impl Into<String>, line: u64, column: u64, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            file: file.into(),
            line,
            column,
            message: message.into(),
            devices: Vec::new(),
        }
    }

    pub fn warning(file: impl Into<String>, line: u64, column: u64, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(file, line, column, message) }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// How many device names a merged diagnostic prints before "and N more".
const SHOWN_DEVICES: usize = 5;

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {kind}: {}", self.file, self.message)?,
            (line, 0) => write!(f, "{}:{line}: {kind}: {}", self.file, self.message)?,
            (line, column) => write!(f, "{}:{line}:{column}: {kind}: {}", self.file, self.message)?,
        }
        if !self.devices.is_empty() {
            let shown: Vec<&str> = self.devices.iter().take(SHOWN_DEVICES).map(String::as_str).collect();
            write!(f, " (device {}", shown.join(", "))?;
            if self.devices.len() > SHOWN_DEVICES {
                write!(f, " and {} more", self.devices.len() - SHOWN_DEVICES)?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Where a file's problems come in a report: `fleet.yaml` first (every device depends
/// on it), then the devices, then the apps, so that root causes come before what they
/// may cause; within a file by line and column.
fn rank(file: &str) -> u8 {
    if file == "fleet.yaml" {
        0
    } else if file.starts_with("devices/") {
        1
    } else if file.starts_with("apps/") {
        2
    } else {
        3
    }
}

/// Merges diagnostics that differ only by device, and sorts them by place (see [`rank`]).
pub fn merge(diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
    let mut merged: BTreeMap<(String, u64, u64, Severity, String), Vec<String>> = BTreeMap::new();
    for d in diagnostics {
        let devices = merged.entry((d.file, d.line, d.column, d.severity, d.message)).or_default();
        devices.extend(d.devices);
    }
    let mut out: Vec<Diagnostic> = merged
        .into_iter()
        .map(|((file, line, column, severity, message), mut devices)| {
            devices.sort();
            devices.dedup();
            Diagnostic { severity, file, line, column, message, devices }
        })
        .collect();
    // Stable: the merged map's order (file, line, column, severity, message) within a rank.
    out.sort_by_key(|d| rank(&d.file));
    out
}

/// Counts errors.
pub fn error_count(diagnostics: &[Diagnostic]) -> usize {
    diagnostics.iter().filter(|d| d.is_error()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_yaml_comes_first_then_devices_then_apps_each_in_file_order() {
        let d = |file: &str, line| Diagnostic::error(file, line, 1, "x");
        let merged = merge(vec![
            d("apps/a/app.yaml", 1),
            d("fleet.yaml", 3),
            d("devices/b.yaml", 2),
            d("fleet.yaml", 1),
        ]);
        let order: Vec<(&str, u64)> = merged.iter().map(|d| (d.file.as_str(), d.line)).collect();
        assert_eq!(
            order,
            [("fleet.yaml", 1), ("fleet.yaml", 3), ("devices/b.yaml", 2), ("apps/a/app.yaml", 1)]
        );
    }
}
