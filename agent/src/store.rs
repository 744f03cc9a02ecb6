//! The state directory: everything the agent remembers across restarts.
//!
//! ```text
//! state_dir/
//!   lock                      held (flock) by the one agent process using this dir
//!   journal                   write-ahead journal of the apply in flight (journal.rs)
//!   trust.json                TrustState: last accepted version, last known time
//!   applied.json              the last good bundle: digest, version, commit, when
//!   managed.json              files the agent wrote: path → sha256
//!   rejected.json             bundles never to try again: digest → code, reason
//!   images.json               images the agent pulled (not on the device before):
//!                             reference → when pulled, unused since (core::images)
//!   status.json               the last status report (for `fleet-agent status`; a cache)
//!   bundles/<digest>.bundle   the last good bundle, and the one being applied or deferred
//!   partial/<digest>          a download in progress (resumed with Range); at most one
//!   blobs/<sha256>            artifacts' bytes (bundle format 5), checked when stored;
//!                             kept while the applied bundle names them (see `prune_blobs`)
//!   blobs/<sha256>.partial    an artifact download in progress (resumed with Range)
//!   originals.json            files the device had before a bundle took them over:
//!                             path → mode, owner, sha256 (restored when the bundle lets go)
//!   originals/<sha256(path)>  their content
//! ```
//!
//! Every JSON file is replaced atomically (fsync, rename) and durably (fsync of the
//! directory), but for `status.json`: it is rewritten at every state change, so it skips
//! the directory fsync, and a power cut may bring back the previous report. A damaged
//! `status.json` (a failing card) reads as absent; a damaged state file is an error. This
//! module only stores and loads; it never decides what to do with what it loads.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use fleet_spec::bundle::TrustState;
use fleet_spec::messages::{Applied, StatusReport};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt: {source} (move it away to start over)")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("state directory {path} is in use by another fleet-agent process (stop the service first, e.g. `systemctl stop fleet-agent`)")]
    Locked { path: PathBuf },
}

/// Why a sideloaded blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("blob {sha256} is not what the signed state says: {got} bytes with sha256 {digest}, expected {size} bytes; the export file is damaged: export it again")]
    Mismatch { sha256: String, size: u64, got: u64, digest: String },
}

/// Why a bundle is never tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: String,
    pub reason: String,
    pub version: Option<u64>,
    /// Unix seconds.
    pub at: i64,
    /// For a refusal caused by the device's own config (paths, engine, policy): a
    /// fingerprint of the config that refused. Under another config the bundle is
    /// judged again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// Rejected bundles kept at most (oldest dropped first).
pub const MAX_REJECTED: usize = 64;

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory layout (0700: bundles may hold secrets).
    pub fn create(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            self.dir.clone(),
            self.dir.join("bundles"),
            self.dir.join("partial"),
            self.dir.join("originals"),
            self.dir.join("blobs"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|source| StoreError::Io { path: d.clone(), source })?;
        }
        Ok(())
    }

    /// Takes the exclusive lock for this process's lifetime (released on exit).
    pub fn lock(&self) -> Result<fs::File, StoreError> {
        let path = self.dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path: self.dir.clone() }),
            Err(fs::TryLockError::Error(source)) => Err(StoreError::Io { path, source }),
        }
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        self.dir.join("bundles").join(format!("{digest}.bundle"))
    }

    pub fn partial_path(&self, digest: &str) -> PathBuf {
        self.dir.join("partial").join(digest)
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// Where artifact `sha256`'s bytes are kept (`sha256` is hex from a signed state).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs_dir().join(sha256)
    }

    pub fn blob_partial_path(&self, sha256: &str) -> PathBuf {
        self.blobs_dir().join(format!("{sha256}.partial"))
    }

    /// Whether the blob is stored. Blobs are hashed when stored and again when copied
    /// into place, so the size is checked here, the content there.
    pub fn has_blob(&self, sha256: &str, size: u64) -> bool {
        fs::symlink_metadata(self.blob_path(sha256)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Stores a blob from `reader` (a sideloaded export): streamed into a temp file,
    /// hashed on the way, renamed into place only when the sha256 and the size match.
    /// Reads at most `size + 1` bytes.
    pub fn import_blob(
        &self,
        reader: &mut impl std::io::Read,
        sha256: &str,
        size: u64,
    ) -> Result<(), ImportError> {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Write};
        let tmp = self.blobs_dir().join(format!("{sha256}.import"));
        let io = |source| ImportError::Io { path: tmp.clone(), source };
        let mut out = fs::File::create(&tmp).map_err(io)?;
        let mut sha = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut limited = reader.take(size + 1);
        loop {
            let n = limited.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            got += n as u64;
            sha.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io)?;
        }
        let digest = hex::encode(sha.finalize());
        if got != size || digest != sha256 {
            let _ = fs::remove_file(&tmp);
            return Err(ImportError::Mismatch { sha256: sha256.into(), size, got, digest });
        }
        out.sync_all().map_err(io)?;
        fs::rename(&tmp, self.blob_path(sha256)).map_err(io)?;
        Ok(())
    }

    /// Deletes blobs (and partial blob downloads) that `keep` does not name, unless
    /// changed within `grace` (a download or a sideload in flight). Returns how many
    /// bytes were freed.
    pub fn prune_blobs(&self, keep: &std::collections::BTreeSet<String>, grace: std::time::Duration) -> u64 {
        let Ok(entries) = fs::read_dir(self.blobs_dir()) else { return 0 };
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let recent = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_none_or(|age| age < grace);
            if !recent && fs::remove_file(entry.path()).is_ok() {
                freed += meta.len();
            }
        }
        freed
    }

    fn load<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, StoreError> {
        let path = self.dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        files::write_atomic(&self.dir.join(name), &encode(value), 0o600, None)?;
        Ok(())
    }

    pub fn trust(&self) -> Result<TrustState, StoreError> {
        self.load("trust.json")
    }

    pub fn save_trust(&self, trust: &TrustState) -> Result<(), StoreError> {
        self.save("trust.json", trust)
    }

    /// The last good bundle.
    pub fn applied(&self) -> Result<Option<AppliedRecord>, StoreError> {
        self.load("applied.json")
    }

    pub fn save_applied(&self, applied: &AppliedRecord) -> Result<(), StoreError> {
        self.save("applied.json", &Some(applied))
    }

    pub fn managed(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.load("managed.json")
    }

    pub fn save_managed(&self, managed: &BTreeMap<String, String>) -> Result<(), StoreError> {
        self.save("managed.json", managed)
    }

    pub fn pulled_images(&self) -> Result<BTreeMap<String, crate::core::images::Pulled>, StoreError> {
        self.load("images.json")
    }

    pub fn save_pulled_images(
        &self,
        images: &BTreeMap<String, crate::core::images::Pulled>,
    ) -> Result<(), StoreError> {
        self.save("images.json", images)
    }

    pub fn rejected(&self) -> Result<BTreeMap<String, Rejection>, StoreError> {
        self.load("rejected.json")
    }

    /// Remembers a rejected bundle (bounded: the oldest entries are dropped).
    pub fn add_rejected(&self, digest: &str, rejection: Rejection) -> Result<(), StoreError> {
        let mut all = self.rejected()?;
        all.insert(digest.to_string(), rejection);
        while all.len() > MAX_REJECTED {
            let oldest = all.iter().min_by_key(|(_, r)| r.at).map(|(d, _)| d.clone()).expect("not empty");
            all.remove(&oldest);
        }
        self.save("rejected.json", &all)
    }

    /// Forgets the rejection of `digest` (`None`: of every bundle), so that it is judged
    /// again; returns how many entries were dropped.
    pub fn forget_rejected(&self, digest: Option<&str>) -> Result<usize, StoreError> {
        let mut all = self.rejected()?;
        let before = all.len();
        match digest {
            Some(d) => {
                all.remove(d);
            }
            None => all.clear(),
        }
        let dropped = before - all.len();
        if dropped > 0 {
            self.save("rejected.json", &all)?;
        }
        Ok(dropped)
    }

    /// Keeps only the rejections `keep` accepts; returns how many were dropped.
    pub fn retain_rejected(&self, keep: impl Fn(&Rejection) -> bool) -> Result<usize, StoreError> {
        let mut all = self.rejected()?;
        let before = all.len();
        all.retain(|_, r| keep(r));
        let dropped = before - all.len();
        if dropped > 0 {
            self.save("rejected.json", &all)?;
        }
        Ok(dropped)
    }

    /// Since when an update lock has held updates back (Unix seconds), kept across
    /// restarts so a restart does not reset the maximum deferral. A damaged file reads
    /// as "not held" (the deferral starts over; nothing wedges).
    pub fn lock_since(&self) -> Option<i64> {
        self.load::<Option<i64>>("lock_since.json").unwrap_or_default()
    }

    pub fn save_lock_since(&self, since: Option<i64>) -> Result<(), StoreError> {
        self.save("lock_since.json", &since)
    }

    /// The last status report saved, or `None` when there is none or it is damaged: it is
    /// only a cache, and must not keep the agent from starting.
    pub fn last_status(&self) -> Result<Option<StatusReport>, StoreError> {
        match self.load("status.json") {
            Err(StoreError::Corrupt { path, source }) => {
                tracing::warn!("ignoring {} ({source}): it is rewritten at the next status", path.display());
                Ok(None)
            }
            other => other,
        }
    }

    /// Saves the status report for `fleet-agent status`, without the directory fsync (see
    /// the module doc).
    pub fn save_status(&self, status: &StatusReport) -> Result<(), StoreError> {
        files::write_cache(&self.dir.join("status.json"), &encode(&Some(status)), 0o600)?;
        Ok(())
    }

    /// Stores a bundle under its content address.
    pub fn save_bundle(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.bundle_path(digest);
        if path.exists() {
            return Ok(());
        }
        files::write_atomic(&path, bytes, 0o600, None)?;
        Ok(())
    }

    pub fn read_bundle(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.bundle_path(digest);
        fs::read(&path).map_err(|source| StoreError::Io { path, source })
    }

    /// Deletes partial downloads except those of the digests named: what `partial/` may
    /// hold is bounded by the downloads the agent still wants.
    pub fn prune_partials(&self, keep: &[&str]) -> Result<(), StoreError> {
        let dir = self.dir.join("partial");
        let entries = fs::read_dir(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name.as_str()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn original_path(&self, path: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        self.dir.join("originals").join(hex::encode(Sha256::digest(path.as_bytes())))
    }

    /// Keeps a file the device had before a bundle took it over: its content first, then
    /// the record (a crash between the two leaves an orphan content file, never a record
    /// without content).
    pub fn save_original(&self, path: &str, original: Original, content: &[u8]) -> Result<(), StoreError> {
        files::write_atomic(&self.original_path(path), content, 0o600, None)?;
        let mut all: BTreeMap<String, Original> = self.load("originals.json")?;
        all.insert(path.to_string(), original);
        self.save("originals.json", &all)
    }

    /// The original kept for `path`, with its content.
    pub fn original(&self, path: &str) -> Result<Option<(Original, Vec<u8>)>, StoreError> {
        let all: BTreeMap<String, Original> = self.load("originals.json")?;
        let Some(original) = all.get(path).cloned() else { return Ok(None) };
        let file = self.original_path(path);
        let content = fs::read(&file).map_err(|source| StoreError::Io { path: file, source })?;
        Ok(Some((original, content)))
    }

    /// Forgets the original of `path` (it was put back).
    pub fn forget_original(&self, path: &str) -> Result<(), StoreError> {
        let mut all: BTreeMap<String, Original> = self.load("originals.json")?;
        if all.remove(path).is_some() {
            self.save("originals.json", &all)?;
        }
        let _ = fs::remove_file(self.original_path(path));
        Ok(())
    }

    /// Deletes stored bundles except those named.
    pub fn prune_bundles(&self, keep: &[&str]) -> Result<(), StoreError> {
        let dir = self.dir.join("bundles");
        let entries = fs::read_dir(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name.strip_suffix(".bundle").unwrap_or(&name);
            if !keep.contains(&digest) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("state files always serialize")
}

/// A file the device had before a bundle named it (`originals.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Original {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub sha256: String,
}

/// `applied.json`: the last good bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub digest: String,
    pub version: u64,
    pub commit: String,
    /// Unix seconds of the commit.
    pub at: i64,
}

impl AppliedRecord {
    pub fn to_status(&self) -> Applied {
        Applied {
            version: self.version,
            digest: self.digest.clone(),
            commit: self.commit.clone(),
            at: self.at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_and_the_lock_is_exclusive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path().join("state"));
        store.create().expect("create");
        let _held = store.lock().expect("lock");
        assert!(matches!(Store::new(store.dir()).lock(), Err(StoreError::Locked { .. })));
        assert_eq!(store.trust().expect("default"), TrustState::default());
        let trust = TrustState { last_version: Some(3), last_known_time: 10 };
        store.save_trust(&trust).expect("save");
        assert_eq!(store.trust().expect("load"), trust);
        for i in 0..(MAX_REJECTED + 3) {
            let r = Rejection {
                code: "expired".into(),
                reason: "r".into(),
                version: None,
                at: i as i64,
                config: None,
            };
            store.add_rejected(&format!("{i:064}"), r).expect("add");
        }
        let rejected = store.rejected().expect("load");
        assert_eq!(rejected.len(), MAX_REJECTED);
        assert!(!rejected.contains_key(&format!("{:064}", 0)), "oldest dropped");
    }

    /// Hardening I, case 7: `partial/` holds only the downloads still wanted.
    #[test]
    fn partial_downloads_of_digests_no_longer_wanted_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path().join("state"));
        store.create().expect("create");
        let (keep, gone) = ("a".repeat(64), "b".repeat(64));
        fs::write(store.partial_path(&keep), b"half").expect("write");
        fs::write(store.partial_path(&gone), b"junk from a hostile server").expect("write");
        store.prune_partials(&[&keep]).expect("prune");
        assert!(store.partial_path(&keep).exists());
        assert!(!store.partial_path(&gone).exists());
    }

    #[test]
    fn originals_round_trip_and_are_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path().join("state"));
        store.create().expect("create");
        let original = Original { mode: 0o600, uid: 0, gid: 0, sha256: "x".into() };
        store.save_original("/srv/app/device.pem", original.clone(), b"cert").expect("save");
        assert_eq!(store.original("/srv/app/device.pem").expect("load"), Some((original, b"cert".to_vec())));
        assert_eq!(store.original("/srv/app/other").expect("load"), None);
        store.forget_original("/srv/app/device.pem").expect("forget");
        assert_eq!(store.original("/srv/app/device.pem").expect("load"), None);
        assert_eq!(fs::read_dir(store.dir().join("originals")).expect("ls").count(), 0);
    }

    #[test]
    fn a_damaged_status_cache_reads_as_absent_but_damaged_state_is_an_error() {
        use fleet_spec::messages::{DeviceState, FileCounts};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path().join("state"));
        store.create().expect("create");
        let report = StatusReport {
            device: "d".into(),
            fleet: "f".into(),
            agent_version: "0".into(),
            state: DeviceState::Converged,
            desired: None,
            applied: None,
            containers: vec![],
            files: FileCounts::default(),
            last_error: None,
            waiting: None,
            agent_update: None,
            timestamp: 7,
        };
        store.save_status(&report).expect("save");
        assert_eq!(store.last_status().expect("load"), Some(report));
        let leftovers: Vec<_> = fs::read_dir(store.dir())
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.contains("fleet-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

        // What a failing card can leave.
        for damaged in [&b""[..], b"{\"device\": \"d\", \"fle", b"\0\0\0\0"] {
            fs::write(store.dir().join("status.json"), damaged).expect("write");
            assert_eq!(store.last_status().expect("damaged cache is not an error"), None);
        }
        fs::write(store.dir().join("trust.json"), b"").expect("write");
        assert!(matches!(store.trust(), Err(StoreError::Corrupt { .. })), "state files stay strict");
    }
}
