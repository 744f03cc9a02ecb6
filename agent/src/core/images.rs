//! Image garbage collection: which images the agent removes, and when.
//!
//! The rule: an image is removed only when the agent pulled it (it was not on the device
//! before; the agent records every pull of an absent image), no committed state uses it
//! (the applied bundle is also the last good one: a rollback goes back to it, so its
//! images always stay), and it has been unused for the grace period. An image the device
//! had before the agent, or that someone else pulled, is never touched; one a container
//! still uses (any container: the engine refuses without `force`) stays and is tried
//! again later. Artifacts will follow the same rule; stored bundles already do (only the
//! applied one, and one in flight, are kept: see `store`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The most pulled images remembered; the oldest records beyond it are forgotten (and
/// their images kept: forgetting is the safe direction).
pub const MAX_RECORDS: usize = 1000;

/// An image the agent pulled, by pull reference (`images.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// Unix seconds.
    pub pulled_at: i64,
    /// Since when no committed state has used it; `None` while one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_since: Option<i64>,
}

/// Records a pull of `reference`, which was not on the device before.
pub fn record_pull(records: &mut BTreeMap<String, Pulled>, reference: &str, now: i64) {
    records.insert(reference.to_owned(), Pulled { pulled_at: now, unused_since: None });
    while records.len() > MAX_RECORDS {
        let Some(oldest) = records.iter().min_by_key(|(_, p)| p.pulled_at).map(|(r, _)| r.clone()) else {
            break;
        };
        records.remove(&oldest);
    }
}

/// Marks what `used` (the committed state's images) uses and what it no longer does,
/// and returns the images due for removal: unused for at least `grace_secs`.
pub fn due(
    records: &mut BTreeMap<String, Pulled>,
    used: &BTreeSet<String>,
    now: i64,
    grace_secs: u64,
) -> Vec<String> {
    let mut due = Vec::new();
    for (reference, pulled) in records.iter_mut() {
        if used.contains(reference) {
            pulled.unused_since = None;
            continue;
        }
        let since = *pulled.unused_since.get_or_insert(now);
        if now.saturating_sub(since) >= i64::try_from(grace_secs).unwrap_or(i64::MAX) {
            due.push(reference.clone());
        }
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(refs: &[&str]) -> BTreeSet<String> {
        refs.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn only_pulled_images_unused_past_the_grace_are_due() {
        let mut records = BTreeMap::new();
        record_pull(&mut records, "reg/a@sha256:1", 100);
        record_pull(&mut records, "reg/b@sha256:2", 100);
        // Both in use: nothing due, however long.
        assert!(due(&mut records, &used(&["reg/a@sha256:1", "reg/b@sha256:2"]), 10_000, 0).is_empty());
        // a is no longer used (a commit replaced it): the grace starts now.
        assert!(due(&mut records, &used(&["reg/b@sha256:2"]), 1_000, 60).is_empty());
        assert_eq!(records["reg/a@sha256:1"].unused_since, Some(1_000));
        assert!(due(&mut records, &used(&["reg/b@sha256:2"]), 1_059, 60).is_empty());
        assert_eq!(due(&mut records, &used(&["reg/b@sha256:2"]), 1_060, 60), ["reg/a@sha256:1"]);
        // Used again before it went (a revert): the clock stops.
        assert!(due(&mut records, &used(&["reg/a@sha256:1"]), 1_061, 60).is_empty());
        assert_eq!(records["reg/a@sha256:1"].unused_since, None);
        assert_eq!(records["reg/b@sha256:2"].unused_since, Some(1_061));
        // An image never recorded (the device had it) is never due: it is not in the map.
        assert!(!due(&mut records, &used(&[]), 99_999, 0).contains(&"busybox:latest".to_string()));
        // Grace 0: due at the commit that stopped using it.
        let mut records = BTreeMap::new();
        record_pull(&mut records, "x:1", 5);
        assert_eq!(due(&mut records, &used(&[]), 5, 0), ["x:1"]);
        // A clock that went back does not make an image due early.
        let mut records = BTreeMap::new();
        record_pull(&mut records, "x:1", 5);
        assert!(due(&mut records, &used(&[]), 1_000, 60).is_empty());
        assert!(due(&mut records, &used(&[]), 10, u64::MAX).is_empty());
    }

    #[test]
    fn records_are_bounded_by_forgetting_the_oldest() {
        let mut records = BTreeMap::new();
        for i in 0..(MAX_RECORDS as i64 + 5) {
            record_pull(&mut records, &format!("img:{i}"), i);
        }
        assert_eq!(records.len(), MAX_RECORDS);
        assert!(!records.contains_key("img:0") && !records.contains_key("img:4"));
        assert!(records.contains_key("img:5"));
    }
}
