//! Artifact blobs over MQTT, for devices whose only source is the broker (`fleet-bundler
//! publish --blobs-over-mqtt`, an announcement with `mqtt_blob: true` and no URL).
//!
//! The bundler retains each blob as chunks of [`BLOB_CHUNK`] bytes on
//! `<prefix>/<fleet>/blobs/<sha256>/<n>` (the last chunk shorter). A [`ChunkFetch`]
//! takes the missing blobs one after another, and each blob one chunk at a time: it names
//! the one topic it wants ([`ChunkFetch::wanted`]; the daemon subscribes to exactly
//! that), checks the length of what arrives, appends it to `blobs/<sha256>.partial`,
//! hashes it on the way, and wants the next. When the blob is whole, its sha256 must be
//! the signed one before it is renamed to `blobs/<sha256>`; a mismatch deletes the
//! partial file. A partial file left by an earlier attempt (MQTT or HTTP) is resumed at
//! its last whole chunk, re-hashed from disk first.
//!
//! Memory stays bounded: one chunk in memory at a time, whatever the blob's size. No
//! byte of a blob is used before it hashed to the digest of the signed state, so a
//! hostile broker can cost a download, never an apply.
//!
//! This module does no MQTT itself and keeps no clock: the daemon (`run.rs`) feeds it
//! chunks and `now`, and turns its deadline into a timeout.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use fleet_spec::topic::{blob_chunk_len, blob_chunk_topic, BLOB_CHUNK};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::fetch::FetchError;
use crate::store::Store;

/// What the fetch needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The chunk on this topic.
    Want(String),
    /// Every blob is stored.
    Done,
}

/// The blob being downloaded.
struct Current {
    sha256: String,
    size: u64,
    file: File,
    hasher: Sha256,
    /// Bytes in the partial file (and hashed).
    have: u64,
    /// The topic of the chunk that starts at `have`.
    topic: String,
}

/// The download of a bundle's missing blobs over MQTT.
pub struct ChunkFetch {
    store: Store,
    prefix: String,
    fleet: String,
    /// (sha256 hex, size) still to download, distinct.
    queue: VecDeque<(String, u64)>,
    current: Option<Current>,
    timeout: Duration,
    deadline: Instant,
}

/// Where a partial file of `len` bytes, of a blob of `size` bytes, is resumed: at its
/// last whole chunk (all of it when complete; from 0 when longer than the blob).
pub fn resume_offset(len: u64, size: u64) -> u64 {
    if len > size {
        0
    } else if len == size {
        len
    } else {
        len - len % BLOB_CHUNK
    }
}

impl ChunkFetch {
    /// Starts on `missing` (sha256 hex, size; duplicates and blobs stored meanwhile are
    /// skipped); each chunk must arrive within `timeout` of the previous one.
    pub fn start(
        store: Store,
        prefix: &str,
        fleet: &str,
        missing: impl IntoIterator<Item = (String, u64)>,
        timeout: Duration,
        now: Instant,
    ) -> Result<(ChunkFetch, Step), FetchError> {
        let mut queue: VecDeque<(String, u64)> = VecDeque::new();
        for (sha, size) in missing {
            if !queue.iter().any(|(s, _)| *s == sha) {
                queue.push_back((sha, size));
            }
        }
        let mut fetch = ChunkFetch {
            store,
            prefix: prefix.into(),
            fleet: fleet.into(),
            queue,
            current: None,
            timeout,
            deadline: now + timeout,
        };
        let step = fetch.advance()?;
        Ok((fetch, step))
    }

    /// The topic of the chunk wanted now.
    pub fn wanted(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.topic.as_str())
    }

    /// When the wanted chunk is late.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The error of a chunk that did not come by [`ChunkFetch::deadline`]. The partial
    /// file stays: the next attempt resumes it.
    pub fn timed_out(&self) -> FetchError {
        let topic = self.wanted().unwrap_or("(none)");
        FetchError::Network {
            url: format!("mqtt:{topic}"),
            reason: format!(
                "no blob chunk within {} s (fetch.timeout_secs); is the blob retained (fleet-bundler publish --blobs-over-mqtt) and readable by this device (topic read <prefix>/<fleet>/blobs/#)?",
                self.timeout.as_secs()
            ),
        }
    }

    /// Takes a chunk that arrived on `topic`: `None` when it is not the one wanted (a
    /// late or repeated one, ignored), else the next step. An error ends this fetch.
    pub fn on_chunk(&mut self, topic: &str, bytes: &[u8], now: Instant) -> Option<Result<Step, FetchError>> {
        let c = self.current.as_mut().filter(|c| c.topic == topic)?;
        let expected = blob_chunk_len(c.size, c.have / BLOB_CHUNK);
        if bytes.len() as u64 != expected {
            return Some(Err(FetchError::Network {
                url: format!("mqtt:{topic}"),
                reason: format!("a chunk of {} bytes, expected {expected}", bytes.len()),
            }));
        }
        let path = self.store.blob_partial_path(&c.sha256);
        if let Err(source) = c.file.write_all(bytes) {
            return Some(Err(FetchError::Io { path: path.display().to_string(), source }));
        }
        c.hasher.update(bytes);
        c.have += expected;
        self.deadline = now + self.timeout;
        Some(self.advance())
    }

    /// Moves on: finishes the current blob when whole, opens the next one when there is
    /// none, and says which chunk comes next.
    fn advance(&mut self) -> Result<Step, FetchError> {
        loop {
            let Some(c) = &mut self.current else {
                let Some((sha, size)) = self.queue.pop_front() else {
                    return Ok(Step::Done);
                };
                if !self.store.has_blob(&sha, size) {
                    self.current = Some(self.open(sha, size)?);
                }
                continue;
            };
            if c.have < c.size {
                let n = c.have / BLOB_CHUNK;
                c.topic = blob_chunk_topic(&self.prefix, &self.fleet, &c.sha256, n).map_err(|_| {
                    FetchError::Url { url: c.sha256.clone(), reason: "not a blob chunk topic" }
                })?;
                return Ok(Step::Want(c.topic.clone()));
            }
            let c = self.current.take().expect("checked above");
            self.finish(c)?;
        }
    }

    /// Opens (or resumes) the partial file of a blob.
    fn open(&self, sha256: String, size: u64) -> Result<Current, FetchError> {
        let path = self.store.blob_partial_path(&sha256);
        let io = |source| FetchError::Io { path: path.display().to_string(), source };
        std::fs::create_dir_all(self.store.blobs_dir()).map_err(io)?;
        let mut file =
            File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let have = resume_offset(file.metadata().map_err(io)?.len(), size);
        file.set_len(have).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut prefix = (&mut file).take(have);
        loop {
            let n = prefix.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        file.seek(SeekFrom::Start(have)).map_err(io)?;
        if have > 0 {
            tracing::info!(blob = %sha256, bytes = have, "resuming a partial blob download over MQTT");
        }
        Ok(Current { sha256, size, file, hasher, have, topic: String::new() })
    }

    /// A whole blob: stored when its sha256 is the signed one, else deleted.
    fn finish(&self, c: Current) -> Result<(), FetchError> {
        let partial = self.store.blob_partial_path(&c.sha256);
        let got = hex::encode(c.hasher.finalize());
        if got != c.sha256 {
            drop(c.file);
            let _ = std::fs::remove_file(&partial);
            return Err(FetchError::Digest {
                url: format!("mqtt:{}/{}/blobs/{}", self.prefix, self.fleet, c.sha256),
                expected: c.sha256,
                got,
                got_size: c.have,
            });
        }
        let io = |source| FetchError::Io { path: partial.display().to_string(), source };
        c.file.sync_all().map_err(io)?;
        drop(c.file);
        std::fs::rename(&partial, self.store.blob_path(&c.sha256)).map_err(io)?;
        tracing::info!(blob = %c.sha256, bytes = c.size, "blob stored (over MQTT)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn chunks(bytes: &[u8]) -> Vec<&[u8]> {
        bytes.chunks(BLOB_CHUNK as usize).collect()
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        store.create().expect("store");
        (dir, store)
    }

    #[test]
    fn resume_starts_at_the_last_whole_chunk() {
        let c = BLOB_CHUNK;
        assert_eq!(resume_offset(0, 3 * c), 0);
        assert_eq!(resume_offset(c - 1, 3 * c), 0);
        assert_eq!(resume_offset(c, 3 * c), c);
        assert_eq!(resume_offset(2 * c + 17, 3 * c), 2 * c);
        assert_eq!(resume_offset(2 * c + 5, 2 * c + 5), 2 * c + 5, "complete: kept whole");
        assert_eq!(resume_offset(3 * c + 1, 3 * c), 0, "longer than the blob: from 0");
    }

    #[test]
    fn a_blob_arrives_chunk_by_chunk_and_is_stored() {
        let (_dir, store) = setup();
        let bytes = blob(2 * BLOB_CHUNK as usize + 1000);
        let digest = sha(&bytes);
        let now = Instant::now();
        let (mut fetch, step) = ChunkFetch::start(
            store.clone(),
            "fleet",
            "acme",
            vec![(digest.clone(), bytes.len() as u64); 2],
            Duration::from_secs(5),
            now,
        )
        .expect("start");
        assert_eq!(step, Step::Want(format!("fleet/acme/blobs/{digest}/0")));
        assert!(fetch.on_chunk("fleet/acme/blobs/other/0", b"x", now).is_none(), "another topic is ignored");
        let parts = chunks(&bytes);
        for (n, part) in parts.iter().enumerate() {
            assert_eq!(fetch.wanted(), Some(format!("fleet/acme/blobs/{digest}/{n}").as_str()));
            let step = fetch
                .on_chunk(&format!("fleet/acme/blobs/{digest}/{n}"), part, now)
                .expect("wanted")
                .expect("ok");
            if n + 1 < parts.len() {
                assert_eq!(step, Step::Want(format!("fleet/acme/blobs/{digest}/{}", n + 1)));
            } else {
                assert_eq!(step, Step::Done, "the duplicate entry is not fetched twice");
            }
        }
        assert_eq!(std::fs::read(store.blob_path(&digest)).expect("stored"), bytes);
        assert!(!store.blob_partial_path(&digest).exists());
    }

    #[test]
    fn a_partial_download_resumes_at_its_last_whole_chunk() {
        let (_dir, store) = setup();
        let bytes = blob(3 * BLOB_CHUNK as usize - 10);
        let digest = sha(&bytes);
        // An earlier attempt left one chunk and a half.
        std::fs::write(store.blob_partial_path(&digest), &bytes[..BLOB_CHUNK as usize * 3 / 2])
            .expect("partial");
        let now = Instant::now();
        let (mut fetch, step) = ChunkFetch::start(
            store.clone(),
            "fleet",
            "acme",
            [(digest.clone(), bytes.len() as u64)],
            Duration::from_secs(5),
            now,
        )
        .expect("start");
        assert_eq!(step, Step::Want(format!("fleet/acme/blobs/{digest}/1")));
        let parts = chunks(&bytes);
        fetch.on_chunk(&format!("fleet/acme/blobs/{digest}/1"), parts[1], now).expect("wanted").expect("ok");
        let step = fetch
            .on_chunk(&format!("fleet/acme/blobs/{digest}/2"), parts[2], now)
            .expect("wanted")
            .expect("ok");
        assert_eq!(step, Step::Done);
        assert_eq!(std::fs::read(store.blob_path(&digest)).expect("stored"), bytes);
    }

    #[test]
    fn a_wrong_chunk_is_refused_by_the_digest_and_the_partial_deleted() {
        let (_dir, store) = setup();
        let bytes = blob(BLOB_CHUNK as usize + 100);
        let digest = sha(&bytes);
        let now = Instant::now();
        let (mut fetch, _) = ChunkFetch::start(
            store.clone(),
            "fleet",
            "acme",
            [(digest.clone(), bytes.len() as u64)],
            Duration::from_secs(5),
            now,
        )
        .expect("start");
        let t = |n| format!("fleet/acme/blobs/{digest}/{n}");
        fetch.on_chunk(&t(0), &bytes[..BLOB_CHUNK as usize], now).expect("wanted").expect("ok");
        // Too short: refused as it arrives, the partial kept for a retry.
        let short = fetch.on_chunk(&t(1), &[0u8; 99], now).expect("wanted");
        assert!(matches!(short, Err(FetchError::Network { .. })), "{short:?}");
        // The right length, the wrong bytes: the digest refuses the blob.
        let err = fetch.on_chunk(&t(1), &[0u8; 100], now).expect("wanted").expect_err("mismatch");
        assert!(
            matches!(&err, FetchError::Digest { expected, got_size, .. } if *expected == digest && *got_size == bytes.len() as u64),
            "{err}"
        );
        assert!(!store.blob_path(&digest).exists(), "nothing stored");
        assert!(!store.blob_partial_path(&digest).exists(), "the bad partial is deleted");
    }

    #[test]
    fn each_chunk_moves_the_deadline() {
        let (_dir, store) = setup();
        let bytes = blob(BLOB_CHUNK as usize + 1);
        let digest = sha(&bytes);
        let t0 = Instant::now();
        let (mut fetch, _) = ChunkFetch::start(
            store,
            "fleet",
            "acme",
            [(digest.clone(), bytes.len() as u64)],
            Duration::from_secs(5),
            t0,
        )
        .expect("start");
        assert_eq!(fetch.deadline(), t0 + Duration::from_secs(5));
        let t1 = t0 + Duration::from_secs(3);
        fetch
            .on_chunk(&format!("fleet/acme/blobs/{digest}/0"), &bytes[..BLOB_CHUNK as usize], t1)
            .expect("wanted")
            .expect("ok");
        assert_eq!(fetch.deadline(), t1 + Duration::from_secs(5));
        assert!(fetch.timed_out().to_string().contains(&format!("blobs/{digest}/1")));
    }
}
