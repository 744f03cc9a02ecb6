//! The MQTT topic scheme: `<prefix>/<fleet>/devices/<device>/<kind>`.
//!
//! Every device owns the subtree `<prefix>/<fleet>/devices/<device>/#`, so a broker ACL
//! such as Mosquitto's `pattern readwrite fleet/+/devices/%c/#` confines each device to
//! its own topics. Ids are checked so that no id can break out of that tree: MQTT
//! wildcards (`+`, `#`), the level separator `/`, empty and over-long ids are refused.
//!
//! One topic per device lies outside that subtree: the enrollment claim,
//! `<prefix>/<fleet>/enroll/<device>` ([`enroll_topic`]), written by `fleet-agent enroll`
//! and read by `fleet-bundler enroll`. A device may write its own (`pattern write
//! fleet/+/enroll/%u`); only the bundler's account reads them.
//!
//! Artifact blobs of broker-only fleets are shared by the whole fleet, outside every
//! device's subtree: chunk `n` of blob `<sha256>` is retained on
//! `<prefix>/<fleet>/blobs/<sha256>/<n>` ([`blob_chunk_topic`]), [`BLOB_CHUNK`] bytes
//! each (the last one shorter). Devices read them (`topic read fleet/+/blobs/#`); only
//! the bundler writes them. A blob is no secret (see `model::Artifact`).

use std::fmt;
use std::str::FromStr;

/// Longest fleet or device id.
pub const MAX_ID_LEN: usize = 64;
pub const DEFAULT_PREFIX: &str = "fleet";

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Retained announcement from the bundler.
    Desired,
    /// Retained JSON status from the agent.
    Status,
    /// Retained `true`/`false`, with a last will.
    Online,
    /// Non-retained JSON events.
    Events,
    /// Retained bundle bytes, for broker-only fleets.
    Bundle,
}

impl TopicKind {
    pub const ALL: [TopicKind; 5] =
        [TopicKind::Desired, TopicKind::Status, TopicKind::Online, TopicKind::Events, TopicKind::Bundle];

    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Desired => "desired",
            TopicKind::Status => "status",
            TopicKind::Online => "online",
            TopicKind::Events => "events",
            TopicKind::Bundle => "bundle",
        }
    }
}

impl FromStr for TopicKind {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, TopicError> {
        TopicKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| TopicError::UnknownKind(s.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {id:?} is longer than {MAX_ID_LEN} characters")]
    TooLong { what: &'static str, id: String },
    #[error("{what} {id:?} contains {ch:?}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")]
    BadChar { what: &'static str, id: String, ch: char },
    #[error("topic {0:?} is not <prefix>/<fleet>/devices/<device>/<kind>")]
    Shape(String),
    #[error("unknown topic kind {0:?}: expected desired, status, online, events or bundle")]
    UnknownKind(String),
}

/// Checks a fleet or device id: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`. The same rule keeps
/// ids valid as container-name parts and file names.
pub fn validate_id(what: &'static str, id: &str) -> Result<(), TopicError> {
    if id.is_empty() {
        return Err(TopicError::Empty { what });
    }
    if id.len() > MAX_ID_LEN {
        return Err(TopicError::TooLong { what, id: id.into() });
    }
    for (i, ch) in id.chars().enumerate() {
        let ok = ch.is_ascii_alphanumeric() || (i > 0 && matches!(ch, '.' | '_' | '-'));
        if !ok {
            return Err(TopicError::BadChar { what, id: id.into(), ch });
        }
    }
    Ok(())
}

/// Checks a topic prefix: one or more `/`-separated levels, each a valid id.
pub fn validate_prefix(prefix: &str) -> Result<(), TopicError> {
    if prefix.is_empty() {
        return Err(TopicError::Empty { what: "topic prefix" });
    }
    prefix.split('/').try_for_each(|level| validate_id("topic prefix level", level))
}

/// A device topic, built from checked parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub prefix: String,
    pub fleet: String,
    pub device: String,
    pub kind: TopicKind,
}

impl Topic {
    pub fn new(prefix: &str, fleet: &str, device: &str, kind: TopicKind) -> Result<Self, TopicError> {
        validate_prefix(prefix)?;
        validate_id("fleet id", fleet)?;
        validate_id("device id", device)?;
        Ok(Topic { prefix: prefix.into(), fleet: fleet.into(), device: device.into(), kind })
    }

    /// Parses a concrete topic under a known prefix.
    pub fn parse(prefix: &str, topic: &str) -> Result<Self, TopicError> {
        validate_prefix(prefix)?;
        let rest = topic
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::Shape(topic.into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [fleet, "devices", device, kind] = parts.as_slice() else {
            return Err(TopicError::Shape(topic.into()));
        };
        Topic::new(prefix, fleet, device, kind.parse()?)
    }

    /// `<prefix>/<fleet>/devices/+/<kind>`: every device's topic of one kind.
    pub fn fleet_filter(prefix: &str, fleet: &str, kind: TopicKind) -> Result<String, TopicError> {
        validate_prefix(prefix)?;
        validate_id("fleet id", fleet)?;
        Ok(format!("{prefix}/{fleet}/devices/+/{}", kind.as_str()))
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/devices/{}/{}", self.prefix, self.fleet, self.device, self.kind.as_str())
    }
}

/// The level between fleet and device of the enrollment topics.
pub const ENROLL: &str = "enroll";

/// `<prefix>/<fleet>/enroll/<device>`: where `device` retains its enrollment claim
/// ([`crate::messages::EnrollClaim`]).
pub fn enroll_topic(prefix: &str, fleet: &str, device: &str) -> Result<String, TopicError> {
    validate_prefix(prefix)?;
    validate_id("fleet id", fleet)?;
    validate_id("device id", device)?;
    Ok(format!("{prefix}/{fleet}/{ENROLL}/{device}"))
}

/// `<prefix>/<fleet>/enroll/+`: every device's enrollment claim.
pub fn enroll_filter(prefix: &str, fleet: &str) -> Result<String, TopicError> {
    validate_prefix(prefix)?;
    validate_id("fleet id", fleet)?;
    Ok(format!("{prefix}/{fleet}/{ENROLL}/+"))
}

/// The device id of an enrollment topic of `fleet` under `prefix`, checked.
pub fn parse_enroll_topic<'t>(prefix: &str, fleet: &str, topic: &'t str) -> Result<&'t str, TopicError> {
    let device = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(fleet))
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(ENROLL))
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| TopicError::Shape(topic.into()))?;
    validate_id("device id", device)?;
    Ok(device)
}

/// The level between fleet and blob digest of the blob chunk topics.
pub const BLOBS: &str = "blobs";

/// Bytes in one chunk of a blob published over MQTT; the last chunk holds the rest
/// (1 to `BLOB_CHUNK` bytes). An empty blob has no chunk.
pub const BLOB_CHUNK: u64 = 256 << 10;

/// How many chunks a blob of `size` bytes is published as.
pub fn blob_chunks(size: u64) -> u64 {
    size.div_ceil(BLOB_CHUNK)
}

/// The length of chunk `n` of a blob of `size` bytes (0 past its last chunk).
pub fn blob_chunk_len(size: u64, n: u64) -> u64 {
    size.saturating_sub(n.saturating_mul(BLOB_CHUNK)).min(BLOB_CHUNK)
}

/// `<prefix>/<fleet>/blobs/<sha256>/<n>`: where chunk `n` (0, 1, 2, ... in decimal) of
/// the blob whose hex sha256 is `sha256` is retained.
pub fn blob_chunk_topic(prefix: &str, fleet: &str, sha256: &str, n: u64) -> Result<String, TopicError> {
    validate_prefix(prefix)?;
    validate_id("fleet id", fleet)?;
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(TopicError::Shape(format!("{prefix}/{fleet}/{BLOBS}/{sha256}/{n}")));
    }
    Ok(format!("{prefix}/{fleet}/{BLOBS}/{sha256}/{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_each_kind() {
        for kind in TopicKind::ALL {
            let topic = Topic::new("fleet", "acme", "gw-01", kind).expect("valid");
            let text = topic.to_string();
            assert_eq!(text, format!("fleet/acme/devices/gw-01/{}", kind.as_str()));
            assert_eq!(Topic::parse("fleet", &text).expect("parses"), topic);
        }
        let nested = Topic::new("corp/iot", "acme", "gw-01", TopicKind::Status).expect("valid");
        assert_eq!(Topic::parse("corp/iot", &nested.to_string()).expect("parses"), nested);
    }

    #[test]
    fn ids_that_break_the_tree_are_refused() {
        for bad in ["+", "#", "a/b", "a+", "a#", "", "-lead", "sp ace", "ü"] {
            assert!(validate_id("device id", bad).is_err(), "{bad:?} must be refused");
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(matches!(validate_id("device id", &long), Err(TopicError::TooLong { .. })));
        assert!(validate_id("device id", &"a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn malformed_topics_are_refused() {
        for bad in [
            "fleet/acme/devices/gw/unknown",
            "fleet/acme/devices/gw",
            "fleet/acme/device/gw/status",
            "other/acme/devices/gw/status",
            "fleet/acme/devices/gw/status/extra",
            "fleet/acme/devices/+/status",
            "fleet//devices/gw/status",
        ] {
            assert!(Topic::parse("fleet", bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn enrollment_topics_name_one_device_each() {
        assert_eq!(enroll_topic("fleet", "acme", "gw-01").expect("valid"), "fleet/acme/enroll/gw-01");
        assert_eq!(enroll_filter("corp/iot", "acme").expect("valid"), "corp/iot/acme/enroll/+");
        assert_eq!(parse_enroll_topic("fleet", "acme", "fleet/acme/enroll/gw-01"), Ok("gw-01"));
        assert!(enroll_topic("fleet", "acme", "+").is_err());
        for bad in [
            "fleet/acme/enroll/",
            "fleet/acme/enroll/a/b",
            "fleet/acme/enroll/+",
            "fleet/other/enroll/gw",
            "fleet/acme/devices/gw",
            "fleet/acmeX/enroll/gw",
        ] {
            assert!(parse_enroll_topic("fleet", "acme", bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn blobs_are_chunked_under_the_fleet() {
        let sha = "ab".repeat(32);
        assert_eq!(
            blob_chunk_topic("fleet", "acme", &sha, 12).expect("valid"),
            format!("fleet/acme/blobs/{sha}/12")
        );
        for bad in ["+".repeat(64), "AB".repeat(32), "ab".repeat(31), "ab/".repeat(21) + "a"] {
            assert!(blob_chunk_topic("fleet", "acme", &bad, 0).is_err(), "{bad:?} must be refused");
        }
        assert!(blob_chunk_topic("fleet", "+", &sha, 0).is_err());
        let c = BLOB_CHUNK;
        assert_eq!([blob_chunks(0), blob_chunks(1), blob_chunks(c), blob_chunks(c + 1)], [0, 1, 1, 2]);
        assert_eq!(blob_chunk_len(c + 5, 0), c);
        assert_eq!(blob_chunk_len(c + 5, 1), 5);
        assert_eq!(blob_chunk_len(c + 5, 2), 0);
        assert_eq!(blob_chunk_len(2 * c, 1), c);
    }
}
