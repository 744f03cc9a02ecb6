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
//!
//! [`EnrollClaim`] is the device's side of enrollment: retained on
//! `<prefix>/<fleet>/enroll/<device>` by `fleet-agent enroll`, read by
//! `fleet-bundler enroll list|accept`. It is unsigned: an operator accepts it after
//! comparing its key id with the one `fleet-agent identity` shows on the device.

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

/// An agent update that did not happen, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdateError {
    /// Stable snake_case reason code: `agent_update_failed` (the new binary failed its
    /// check or its trial and is never tried again), `agent_downgrade_refused`,
    /// `agent_no_binary` (none for this architecture), `agent_not_launched` (the agent
    /// runs without `fleet-agent launch`, which self-update needs).
    pub code: String,
    pub message: String,
    /// The release version the bundle declares.
    pub version: String,
    /// The binary's sha256 (hex), when there is one for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
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
    /// Why the agent release the applied bundle declares is not the one running
    /// (`agent_update_failed`, `agent_downgrade_refused`, ...); absent when it is, or
    /// when the bundle declares none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_update: Option<AgentUpdateError>,
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
    /// The agent release a committed bundle declares is not taken: `code` as in
    /// [`AgentUpdateError`] (`agent_update_failed`: its check or trial failed, and that
    /// binary is never tried again). Said once per release and reason.
    AgentUpdateRefused {
        version: String,
        code: String,
        reason: String,
    },
    /// This agent switched to release `version` (binary `digest`) and passed its trial.
    AgentUpdated {
        version: String,
        digest: String,
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

/// Longest enrollment claim accepted (bytes of JSON); larger is invalid.
pub const MAX_ENROLL_CLAIM_LEN: usize = 4 * 1024;
/// Most recipients one claim lists: the current key and older ones still kept during a
/// rotation.
pub const MAX_CLAIM_RECIPIENTS: usize = 4;
/// Longest text of one fact of a claim (agent version, arch, os, kernel, hostname,
/// machine id), in bytes.
pub const MAX_FACT_LEN: usize = 128;

/// A device's enrollment claim, retained (QoS 1) on `<prefix>/<fleet>/enroll/<device>`
/// by `fleet-agent enroll`: who it says it is, its age X25519 public keys, and facts to
/// tell it apart. Unsigned, so only a claim: it becomes trust when an operator commits
/// its recipient as the device's `public_key:` (after comparing `key_id` with what
/// `fleet-agent identity` shows on the device). Unknown fields are ignored (newer agents
/// may add facts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollClaim {
    pub device: String,
    pub fleet: String,
    /// The device's age recipients (`age1…`), newest first: the current key, then the
    /// older ones it still holds during a rotation.
    pub recipients: Vec<String>,
    /// Key id of `recipients[0]`: the first 16 hex digits of the sha256 of its public key.
    pub key_id: String,
    pub agent_version: String,
    /// `std::env::consts::ARCH` of the agent binary (`aarch64`, `arm`, `x86_64`, ...).
    pub arch: String,
    /// `std::env::consts::OS` (`linux`).
    pub os: String,
    /// Kernel release (`/proc/sys/kernel/osrelease`), when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Host name (`/proc/sys/kernel/hostname`), when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// An id derived from `/etc/machine-id` for this application (as systemd's
    /// `sd_id128_get_machine_app_specific`: the machine id itself stays on the device),
    /// when readable; `systemd-id128 machine-id --app-specific=<app id>` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// When the claim was made, Unix seconds (the device's clock).
    pub at: i64,
}

/// Why an enrollment claim is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("the claim is {size} bytes, over the limit of {MAX_ENROLL_CLAIM_LEN}")]
    TooLarge { size: usize },
    #[error("not a claim: {0}")]
    Json(String),
    #[error("`{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

impl EnrollClaim {
    /// Parses a claim and checks its shape: the size cap, valid ids, 1 to
    /// [`MAX_CLAIM_RECIPIENTS`] distinct recipients that look like age X25519 recipients
    /// ([`looks_like_recipient`]; the checksum is the reader's to check), a 16-hex key id,
    /// facts of printable text within [`MAX_FACT_LEN`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, ClaimError> {
        if bytes.len() > MAX_ENROLL_CLAIM_LEN {
            return Err(ClaimError::TooLarge { size: bytes.len() });
        }
        let claim: EnrollClaim =
            serde_json::from_slice(bytes).map_err(|e| ClaimError::Json(e.to_string()))?;
        claim.check()?;
        Ok(claim)
    }

    /// The shape checks of [`EnrollClaim::from_json`].
    pub fn check(&self) -> Result<(), ClaimError> {
        let field = |field, reason: String| ClaimError::Field { field, reason };
        crate::topic::validate_id("device id", &self.device).map_err(|e| field("device", e.to_string()))?;
        crate::topic::validate_id("fleet id", &self.fleet).map_err(|e| field("fleet", e.to_string()))?;
        if self.recipients.is_empty() || self.recipients.len() > MAX_CLAIM_RECIPIENTS {
            return Err(field(
                "recipients",
                format!("{} recipients: a claim lists 1 to {MAX_CLAIM_RECIPIENTS}", self.recipients.len()),
            ));
        }
        for (i, r) in self.recipients.iter().enumerate() {
            if !looks_like_recipient(r) {
                return Err(field(
                    "recipients",
                    format!("{:?} is not an age X25519 recipient (age1…)", short(r)),
                ));
            }
            if self.recipients[..i].contains(r) {
                return Err(field("recipients", format!("{r} is listed twice")));
            }
        }
        if self.key_id.len() != 16 || !self.key_id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(field("key_id", format!("{:?} is not 16 lowercase hex digits", short(&self.key_id))));
        }
        let facts: [(&'static str, Option<&str>); 6] = [
            ("agent_version", Some(&self.agent_version)),
            ("arch", Some(&self.arch)),
            ("os", Some(&self.os)),
            ("kernel", self.kernel.as_deref()),
            ("hostname", self.hostname.as_deref()),
            ("machine_id", self.machine_id.as_deref()),
        ];
        for (name, value) in facts {
            let Some(value) = value else { continue };
            if value.len() > MAX_FACT_LEN {
                return Err(field(name, format!("{} bytes, over {MAX_FACT_LEN}", value.len())));
            }
            if value.chars().any(char::is_control) {
                return Err(field(name, format!("{:?} holds control characters", short(value))));
            }
        }
        if self.at < 0 {
            return Err(field("at", format!("{} is before 1970", self.at)));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a claim always serializes")
    }
}

/// The first 70 characters of `s`, for messages about hostile input.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(70).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The characters of Bech32's data part.
const BECH32_CHARSET: &str = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";

/// True for the shape of an age X25519 recipient: `age1` and 58 lower-case Bech32
/// characters (32 bytes and the checksum). The checksum is not verified here.
pub fn looks_like_recipient(s: &str) -> bool {
    s.len() == 62 && s.starts_with("age1") && s[4..].chars().all(|c| BECH32_CHARSET.contains(c))
}

/// A fact read from the device made fit for a claim: trimmed, control characters
/// replaced with `?`, cut to [`MAX_FACT_LEN`] bytes on a character boundary; `None`
/// when nothing is left.
pub fn sanitize_fact(raw: &str) -> Option<String> {
    let mut out = String::new();
    for c in raw.trim().chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_FACT_LEN {
            break;
        }
        out.push(c);
    }
    let out = out.trim_end().to_string();
    (!out.is_empty()).then_some(out)
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

    fn claim() -> EnrollClaim {
        EnrollClaim {
            device: "gw-01".into(),
            fleet: "acme".into(),
            recipients: vec![format!("age1{}", "q".repeat(58))],
            key_id: "0123456789abcdef".into(),
            agent_version: "0.1.0".into(),
            arch: "aarch64".into(),
            os: "linux".into(),
            kernel: Some("6.1.0-rpi7".into()),
            hostname: Some("gw-01".into()),
            machine_id: None,
            at: 1_800_000_000,
        }
    }

    #[test]
    fn a_claim_round_trips_and_leaves_out_unknown_facts() {
        let c = claim();
        let json = c.to_json();
        assert_eq!(EnrollClaim::from_json(&json).expect("parses"), c);
        let text = String::from_utf8(json).expect("utf-8");
        assert!(!text.contains("machine_id"), "{text}");
        // A newer agent's extra field is ignored.
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["cpu_model"] = "Cortex-A72".into();
        assert_eq!(EnrollClaim::from_json(v.to_string().as_bytes()).expect("parses"), c);
    }

    #[test]
    fn hostile_claims_are_refused_with_the_field_that_is_wrong() {
        let refused = |f: &dyn Fn(&mut EnrollClaim), what: &str| {
            let mut c = claim();
            f(&mut c);
            let e = EnrollClaim::from_json(&c.to_json()).expect_err(what);
            assert!(e.to_string().contains(what), "{what}: {e}");
        };
        refused(&|c| c.device = "../x".into(), "`device`");
        refused(&|c| c.fleet = "a/+".into(), "`fleet`");
        refused(&|c| c.recipients.clear(), "0 recipients");
        refused(&|c| c.recipients = vec![c.recipients[0].clone(); 2], "listed twice");
        refused(&|c| c.recipients = vec![format!("age1{}", "b".repeat(58))], "not an age X25519");
        refused(&|c| c.recipients = vec![c.recipients[0].to_uppercase()], "not an age X25519");
        refused(&|c| c.recipients = vec!["age1qqq".into()], "not an age X25519");
        refused(
            &|c| c.recipients = (0..5).map(|i| format!("age1{}{i}", "q".repeat(57))).collect(),
            "5 recipients",
        );
        refused(&|c| c.key_id = "XYZ".into(), "`key_id`");
        refused(&|c| c.hostname = Some("a\u{1b}[2Jb".into()), "control characters");
        refused(&|c| c.agent_version = "v".repeat(MAX_FACT_LEN + 1), "`agent_version`");
        refused(&|c| c.at = -1, "`at`");
        let huge = vec![b' '; MAX_ENROLL_CLAIM_LEN + 1];
        assert_eq!(
            EnrollClaim::from_json(&huge),
            Err(ClaimError::TooLarge { size: MAX_ENROLL_CLAIM_LEN + 1 })
        );
        for garbage in [&b"not json"[..], b"{}", b"[]", b"null", b"{\"device\":1}", &[0xff, 0xfe]] {
            assert!(matches!(EnrollClaim::from_json(garbage), Err(ClaimError::Json(_))), "{garbage:?}");
        }
    }

    #[test]
    fn facts_are_trimmed_cleaned_and_cut() {
        assert_eq!(sanitize_fact("  6.1.0\n").as_deref(), Some("6.1.0"));
        assert_eq!(sanitize_fact("a\u{1b}b\tc").as_deref(), Some("a?b?c"));
        assert_eq!(sanitize_fact(" \n"), None);
        let long = "é".repeat(MAX_FACT_LEN);
        let cut = sanitize_fact(&long).expect("some");
        assert!(cut.len() <= MAX_FACT_LEN && cut.chars().all(|c| c == 'é'), "{cut}");
    }
}
