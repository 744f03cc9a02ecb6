//! Artifacts (bundle format 5): files whose bytes are blobs in `state_dir/blobs/`, not
//! in the bundle. The runner downloads the missing ones beside its loop before it hands
//! a bundle to the apply path ([`Agent::missing_artifacts`]); a sideloaded export brings
//! them along. Here the apply path checks they are all there and that their targets'
//! disks can take them, before anything changes; after a commit, blobs no committed
//! state names are deleted.

use std::collections::BTreeSet;
use std::path::PathBuf;

use fleet_spec::model::{Artifact, DesiredState};

use super::*;

/// Blobs changed this recently are never collected: a download or a sideload may be
/// storing them for a bundle not applied yet.
const BLOB_GRACE: Duration = Duration::from_secs(3600);

impl<E: Engine> Agent<E> {
    /// The artifacts of a bundle that verifies and is not applied yet, which are neither
    /// stored nor already at their path: what must be downloaded before it can apply.
    /// Empty for anything else (the apply path judges it, and says why).
    pub fn missing_artifacts(&self, bytes: &[u8]) -> Vec<Artifact> {
        // Only format 5 names artifacts: every other bundle is verified once, by the
        // apply path, not here too.
        if bundle::parse(bytes, &self.cfg.limits).map_or(true, |p| p.format < 5) {
            return Vec::new();
        }
        let digest = bundle::content_address(bytes);
        if self.applied_digest() == Some(digest.as_str()) {
            return Vec::new();
        }
        let Ok(trust) = self.store.trust() else { return Vec::new() };
        let expect = Expectation { fleet: &self.cfg.fleet, device: &self.cfg.device };
        let now = self.clock.now();
        match bundle::verify(bytes, &self.cfg.trusted, expect, trust, now, &self.cfg.limits) {
            Ok(v) => {
                let mut missing: Vec<Artifact> =
                    self.pending(&v.state).into_iter().filter(|a| !self.stored(a)).cloned().collect();
                // The agent binary this bundle would switch to, fetched like an artifact.
                if let Some(b) = self.wanted_agent_binary(v.state.agent.as_ref()) {
                    if !self.store.has_blob(&b.sha256_hex(), b.size) {
                        missing.push(Artifact {
                            path: format!(
                                "(agent {} for {})",
                                v.state.agent.as_ref().map_or("", |r| r.version.as_str()),
                                b.arch
                            ),
                            mode: 0o755,
                            owner: None,
                            sha256: b.sha256,
                            size: b.size,
                        });
                    }
                }
                missing
            }
            Err(_) => Vec::new(),
        }
    }

    /// The artifacts whose bytes are not at their path yet (hashed, streaming): what the
    /// apply writes.
    fn pending<'s>(&self, state: &'s DesiredState) -> Vec<&'s Artifact> {
        let in_place = |a: &Artifact| matches!(files::observe(&a.path, &self.cfg.allowed_roots), Ok(Some(d)) if d.sha256 == a.sha256_hex());
        state.artifacts.iter().filter(|a| !in_place(a)).collect()
    }

    fn stored(&self, a: &Artifact) -> bool {
        self.store.has_blob(&a.sha256_hex(), a.size)
    }

    /// Hashes the stored blobs the apply will copy, and deletes any that are not the
    /// signed bytes (a card that rots): found here, they are downloaded again before the
    /// apply begins, instead of failing it halfway (after which only a newer version
    /// would be taken).
    fn drop_damaged_blobs(&self, pending: &[&Artifact]) {
        for a in pending {
            let sha = a.sha256_hex();
            let path = self.store.blob_path(&sha);
            if files::sha256_file(&path).is_ok_and(|got| got != sha) {
                tracing::warn!(blob = %path.display(), "a stored artifact is damaged; it is downloaded again");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Before the apply changes anything: every artifact's blob is stored (or its bytes
    /// are in place), and the disks where the copies land can take them, with `images`
    /// (where the images to pull land, and their room) on top.
    pub(super) fn artifacts_ready(
        &self,
        state: &DesiredState,
        images: &[(PathBuf, u64)],
    ) -> Option<(&'static str, String)> {
        let pending = self.pending(state);
        self.drop_damaged_blobs(&pending);
        let missing: Vec<&Artifact> = pending.iter().copied().filter(|a| !self.stored(a)).collect();
        if !missing.is_empty() {
            let bytes: u64 = missing.iter().map(|a| a.size).sum();
            let paths: Vec<&str> = missing.iter().take(3).map(|a| a.path.as_str()).collect();
            return Some((
                "artifacts_missing",
                format!(
                    "{} artifact(s) of {bytes} bytes are not on the device ({}{}): they are downloaded from the bundle server first (fetch.base_url or the announcement's URLs), or come in an export file (fleet-bundler export, then fleet-agent apply FILE)",
                    missing.len(),
                    paths.join(", "),
                    if missing.len() > 3 { ", ..." } else { "" },
                ),
            ));
        }
        let mut writes: Vec<(PathBuf, u64)> =
            pending.iter().map(|a| (PathBuf::from(&a.path), a.size)).collect();
        writes.extend_from_slice(images);
        match crate::space::check(&writes, self.cfg.fetch.disk_reserve_bytes) {
            Ok(()) => None,
            Err(e) => Some(("insufficient_space", e.to_string())),
        }
    }

    /// After a commit: deletes the blobs the committed state does not name (the last good
    /// state is the committed one, so a rollback never needs the network).
    pub(super) fn collect_blobs(&self) {
        let Some(current) = self.current.as_ref() else { return };
        let mut keep: BTreeSet<String> = current.state.artifacts.iter().map(Artifact::sha256_hex).collect();
        // The declared agent binary stays until the next commit (staged from it).
        if let Some(b) = current.state.agent.as_ref().and_then(|r| r.binary(std::env::consts::ARCH)) {
            keep.insert(b.sha256_hex());
        }
        let freed = self.store.prune_blobs(&keep, BLOB_GRACE);
        if freed > 0 {
            tracing::info!(bytes = freed, "removed artifacts no committed bundle names");
        }
    }
}
