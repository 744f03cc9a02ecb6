//! The JSON messages on the MQTT topics: the bundler's announcement, the agent's status
//! report and its events. Their JSON shape is documented in `fleet-spec/MESSAGES.md`;
//! field names are part of the public contract (dashboards read them).
//!
//! An announcement is only a hint: the agent trusts nothing in it but uses it to know
//! where to fetch; the bundle's signature is what it trusts.
//!
//! The same [`Announcement`] type is the bundler's per-device pointer file
//! ([`pointer_path`]), which agents poll over HTTP(S) so that a missed MQTT announcement
//! is not a missed update.

use serde::{Deserialize, Serialize};

/// Retained on `<prefix>/<fleet>/devices/<id>/desired` by `fleet-bundler publish`, and
/// written by `fleet-bundler build` as each device's pointer file ([`pointer_path`]),
/// there with `urls` empty and `mqtt_blob` false.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    pub fleet: String,
    pub device: String,
    pub version: u64,
    /// Git commit the bundle was built from.
    pub commit: String,
    /// Hex sha256 of the bundle bytes (its content address).
    pub digest: String,
    /// Bundle size in bytes.
    pub size: u64,
    /// Where to fetch `<digest>.bundle`, tried in order. May be empty for broker-only
    /// fleets, which set `mqtt_blob`.
    #[serde(default)]
    pub urls: Vec<String>,
    /// True when the bundle bytes are retained on `<...>/<id>/bundle`.
    #[serde(default)]
    pub mqtt_blob: bool,
}

/// Longest announcement accepted (bytes of JSON); larger is malformed.
pub const MAX_ANNOUNCEMENT_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("message is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed JSON message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("announcement digest {0:?} is not 64 lowercase hex characters")]
    BadDigest(String),
}

impl Announcement {
    /// Parses and sanity-checks an announcement (size cap, digest shape).
    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        if bytes.len() > MAX_ANNOUNCEMENT_LEN {
            return Err(MessageError::TooLarge { size: bytes.len(), limit: MAX_ANNOUNCEMENT_LEN });
        }
        let announcement: Announcement = serde_json::from_slice(bytes)?;
        if !is_sha256_hex(&announcement.digest) {
            return Err(MessageError::BadDigest(announcement.digest));
        }
        Ok(announcement)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an announcement always serializes")
    }
}

/// Where a build output directory holds `device`'s pointer file, relative to that
/// directory (and so to an agent's `fetch.base_url`): `devices/<device>.json`.
///
/// The file is the device's current [`Announcement`] as JSON, with `urls` empty and
/// `mqtt_blob` false: the bundle it names is `bundles/<digest>.bundle` in the same
/// directory. `device` must be a valid id ([`crate::topic::validate_id`]), which makes
/// this a plain file name and a URL path that needs no escaping.
pub fn pointer_path(device: &str) -> String {
    format!("devices/{device}.json")
}

/// True for 64 lowercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The agent's overall state, a small documented set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Started, nothing applied yet.
    Idle,
    /// Fetching a bundle.
    Downloading,
    /// Applying files and containers.
    Applying,
    /// Applied; waiting for containers to run and be healthy.
    AwaitingHealth,
    /// The applied bundle is in place and healthy.
    Converged,
    /// The bundle the device was told to run was refused or could not be applied, and
    /// nothing was changed. (Refused bytes that are not that bundle are only an event.)
    Failed,
    /// An update failed after changing things; the last good state was restored.
    RolledBack,
    /// The device cannot reach its desired state now (e.g. the engine is down); retrying.
    Degraded,
    /// A verified bundle waits for its maintenance window or an app's update lock;
    /// `waiting` in the report says which and until when. The applied state keeps running.
    Waiting,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Idle => "idle",
            DeviceState::Downloading => "downloading",
            DeviceState::Applying => "applying",
            DeviceState::AwaitingHealth => "awaiting_health",
            DeviceState::Converged => "converged",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
            DeviceState::Degraded => "degraded",
            DeviceState::Waiting => "waiting",
        }
    }
}

/// Why a verified bundle is not applied yet (status `waiting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// Outside every maintenance window the bundle declares.
    Window,
    /// An app holds an update lock (a file in the agent's lock directory).
    Lock,
}

/// The `waiting` object of a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub reason: WaitReason,
    /// Unix seconds since when the device waits for this reason.
    pub since: i64,
    /// Unix seconds when the bundle will be applied, if known: the window's opening, or
    /// the end of the lock's maximum deferral. `None`: a lock without a bound.
    pub until: Option<i64>,
    /// The digest of the bundle that waits.
    pub digest: String,
}

/// One version of the desired state, as named in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRef {
    pub version: u64,
    pub digest: String,
    pub commit: String,
}

/// What is applied, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: u64,
    pub digest: String,
    pub commit: String,
    /// Unix seconds.
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    pub running: bool,
    /// `healthy`, `unhealthy`, `starting`, or `none` without a healthcheck.
    pub health: String,
    pub restarts: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    pub managed: u64,
    /// Drift repairs since the agent started.
    pub drift_repaired: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// Stable snake_case reason code (e.g. `bad_signature`, `health_timeout`).
    pub code: String,
    pub message: String,
    /// Unix seconds.
    pub at: i64,
}

/// Retained on `<prefix>/<fleet>/devices/<id>/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub device: String,
    pub fleet: String,
    pub agent_version: String,
    pub state: DeviceState,
    pub desired: Option<VersionRef>,
    pub applied: Option<Applied>,
    pub containers: Vec<ContainerStatus>,
    pub files: FileCounts,
    pub last_error: Option<LastError>,
    /// Set while the state is `waiting`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Unix seconds when this report was made.
    pub timestamp: i64,
}

impl StatusReport {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status report always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Whether two reports differ in anything but their timestamp (publish on change).
    pub fn same_content(&self, other: &StatusReport) -> bool {
        let mut a = self.clone();
        a.timestamp = other.timestamp;
        a == *other
    }
}

/// What happened, published (not retained) on `<prefix>/<fleet>/devices/<id>/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    BundleRejected {
        digest: String,
        code: String,
        reason: String,
    },
    ApplyStarted {
        version: u64,
        commit: String,
    },
    ApplyFinished {
        version: u64,
        commit: String,
    },
    ApplyFailed {
        version: u64,
        code: String,
        reason: String,
    },
    RolledBack {
        from_version: u64,
        to_version: Option<u64>,
        reason: String,
    },
    DriftRepaired {
        kind: DriftKind,
        name: String,
    },
    /// An update lock still held when its maximum deferral ran out: the apply of
    /// `version` went ahead anyway. `entry` names one entry of the lock directory (at
    /// most 64 bytes), `since` is when the lock started holding updates back.
    UpdateLockOverridden {
        version: u64,
        entry: String,
        since: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    FileChanged,
    FileMissing,
    ContainerMissing,
    ContainerStopped,
    ContainerChanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub device: String,
    /// Unix seconds.
    pub at: i64,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// The `online` topic's payloads.
pub const ONLINE: &[u8] = b"true";
pub const OFFLINE: &[u8] = b"false";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_rejects_bad_digest_and_unknown_fields() {
        let good = br#"{"fleet":"f","device":"d","version":1,"commit":"c","digest":"0000000000000000000000000000000000000000000000000000000000000000","size":3}"#;
        assert!(Announcement::from_json(good).is_ok());
        let bad_digest = br#"{"fleet":"f","device":"d","version":1,"commit":"c","digest":"../etc","size":3}"#;
        assert!(matches!(Announcement::from_json(bad_digest), Err(MessageError::BadDigest(_))));
        let extra = br#"{"fleet":"f","device":"d","version":1,"commit":"c","digest":"0000000000000000000000000000000000000000000000000000000000000000","size":3,"x":1}"#;
        assert!(matches!(Announcement::from_json(extra), Err(MessageError::Json(_))));
    }

    #[test]
    fn event_json_is_flat_and_tagged() {
        let event = Event {
            device: "gw".into(),
            at: 5,
            kind: EventKind::DriftRepaired { kind: DriftKind::FileChanged, name: "/etc/a".into() },
        };
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).expect("json");
        assert_eq!(json["event"], "drift_repaired");
        assert_eq!(json["kind"], "file_changed");
        assert_eq!(Event::from_json(&event.to_json()).expect("round trip"), event);
    }
}
