//! The write-ahead journal of the apply path (`state_dir/journal`).
//!
//! Every change to the device is written here as an intent before it is made and as
//! done after it; the begin, applied, commit and rollback milestones frame them. On
//! start, [`decide`] reads what survived and says whether to resume, roll back, or rest.
//!
//! Format: a sequence of records, each
//!
//! ```text
//! length   u32 LE   bytes of the body
//! crc32    u32 LE   CRC-32 (IEEE) of the body
//! body     JSON     one `Record`
//! ```
//!
//! A torn last record (short, or with a checksum mismatch) is the mark of a crash while
//! appending: it and anything after it are ignored (and cut off before appending again).
//! Every append is fsynced before the effect it announces is made. After a commit or a
//! finished rollback the journal is emptied, so it holds at most one transaction.
//!
//! The journal never decides anything itself; [`decide`] is pure.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One effect on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    WriteFile { path: String, sha256: String },
    RemoveFile { path: String },
    CreateNetwork { name: String },
    CreateVolume { name: String },
    RemoveContainer { name: String },
    CreateContainer { name: String, spec_hash: String },
    StartContainer { name: String },
    RemoveNetwork { name: String },
    RemoveVolume { name: String },
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum Record {
    /// An apply of bundle `digest` starts; `prev` is the last good bundle (if any).
    Begin {
        digest: String,
        version: u64,
        commit: String,
        prev: Option<String>,
    },
    Intent {
        step: Step,
    },
    Done {
        step: Step,
    },
    /// Every effect of the apply is done; health is being awaited.
    Applied {
        digest: String,
    },
    /// The bundle is healthy and is now the last good one.
    Commit {
        digest: String,
        version: u64,
        commit: String,
        at: i64,
    },
    /// Restoring `to` (the last good bundle; `None` = nothing) after `from` failed.
    RollbackBegin {
        from: String,
        to: Option<String>,
        code: String,
        reason: String,
    },
    RollbackDone {
        from: String,
        to: Option<String>,
    },
}

/// What to do on start, from the surviving records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// No transaction in flight.
    Clean,
    /// A commit was recorded but maybe not finished (applied.json, journal reset).
    FinishCommit { digest: String, version: u64, commit: String, at: i64 },
    /// An apply was interrupted before all effects were done: redo them (they are
    /// idempotent), then wait for health.
    ResumeApply { digest: String, prev: Option<String>, interrupted: Option<Step> },
    /// Every effect was done; health was being awaited: wait again.
    ResumeHealth { digest: String, prev: Option<String> },
    /// Restore the last good state: a rollback was interrupted, or the apply was already
    /// resumed once and was interrupted again (a bundle that kills the agent).
    RollBack { from: String, to: Option<String>, code: String, reason: String },
    /// A rollback finished but the journal was not reset.
    FinishRollback { from: String, to: Option<String> },
}

/// How many times an interrupted apply of one bundle is resumed before rolling back.
pub const MAX_RESUMES: usize = 1;

/// Decides recovery from the records of the (single) transaction in the journal.
pub fn decide(records: &[Record]) -> Recovery {
    let Some(first_begin) = records.iter().position(|r| matches!(r, Record::Begin { .. })) else {
        return Recovery::Clean;
    };
    let txn = &records[first_begin..];
    let (digest, prev) = match &txn[0] {
        Record::Begin { digest, prev, .. } => (digest.clone(), prev.clone()),
        _ => unreachable!("position found a Begin"),
    };
    let mut begins = 0;
    let mut applied = false;
    let mut open: Option<Step> = None;
    let mut outcome = None;
    for r in txn {
        match r {
            Record::Begin { digest: d, .. } if *d == digest => {
                begins += 1;
                applied = false;
            }
            Record::Begin { .. } => {}
            Record::Intent { step } => open = Some(step.clone()),
            Record::Done { step } if open.as_ref() == Some(step) => open = None,
            Record::Done { .. } => {}
            Record::Applied { .. } => applied = true,
            Record::Commit { digest, version, commit, at } => {
                outcome = Some(Recovery::FinishCommit {
                    digest: digest.clone(),
                    version: *version,
                    commit: commit.clone(),
                    at: *at,
                })
            }
            Record::RollbackBegin { from, to, code, reason } => {
                outcome = Some(Recovery::RollBack {
                    from: from.clone(),
                    to: to.clone(),
                    code: code.clone(),
                    reason: reason.clone(),
                })
            }
            Record::RollbackDone { from, to } => {
                outcome = Some(Recovery::FinishRollback { from: from.clone(), to: to.clone() })
            }
        }
    }
    if let Some(outcome) = outcome {
        return outcome;
    }
    if applied {
        return Recovery::ResumeHealth { digest, prev };
    }
    if begins > MAX_RESUMES {
        return Recovery::RollBack {
            from: digest,
            to: prev,
            code: "interrupted".into(),
            reason: format!("the apply was interrupted {begins} times (power loss or agent crash)"),
        };
    }
    Recovery::ResumeApply { digest, prev, interrupted: open }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Option<File>,
    /// Test hook: simulate a crash while appending record number `.0` (counted from 0
    /// over the journal's life); `.1` = torn (half the record reaches the disk). Every
    /// append from then on fails, as if the process were gone.
    #[cfg(test)]
    pub crash_at: Option<(usize, bool)>,
    #[cfg(test)]
    pub appended: usize,
}

const HEADER: usize = 8;
/// A record longer than this is corruption, not a record.
const MAX_RECORD: usize = 1 << 20;

impl Journal {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Journal {
            path: path.into(),
            file: None,
            #[cfg(test)]
            crash_at: None,
            #[cfg(test)]
            appended: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> JournalError {
        JournalError::Io { path: self.path.clone(), source }
    }

    /// Reads every intact record and cuts a torn tail off the file, so appends follow
    /// the last intact record.
    pub fn open(&mut self) -> Result<Vec<Record>, JournalError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.io(e)),
        };
        let (records, intact) = parse(&bytes);
        let file = OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| self.io(e))?;
        if intact < bytes.len() {
            tracing::warn!(path = %self.path.display(), torn_bytes = bytes.len() - intact, "journal ends in a torn record; ignoring it");
            file.set_len(intact as u64).map_err(|e| self.io(e))?;
            file.sync_all().map_err(|e| self.io(e))?;
        }
        self.file = Some(file);
        Ok(records)
    }

    /// Appends one record and fsyncs it.
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        if self.file.is_none() {
            self.open()?;
        }
        let frame = frame(record);
        let file = self.file.as_mut().expect("opened above");
        #[cfg(test)]
        {
            let n = self.appended;
            self.appended += 1;
            if let Some((at, torn)) = self.crash_at {
                if n >= at {
                    if n == at && torn {
                        let _ = file.write_all(&frame[..frame.len() / 2]);
                    }
                    let crashed = std::io::Error::other("simulated crash");
                    return Err(JournalError::Io { path: self.path.clone(), source: crashed });
                }
            }
        }
        let result = file.write_all(&frame).and_then(|()| file.sync_data());
        result.map_err(|e| self.io(e))
    }

    /// Empties the journal (after a commit or a finished rollback).
    pub fn reset(&mut self) -> Result<(), JournalError> {
        if self.file.is_none() {
            self.open()?;
        }
        #[cfg(test)]
        if self.crash_at.is_some_and(|(at, _)| self.appended > at) {
            return Err(self.io(std::io::Error::other("simulated crash")));
        }
        let file = self.file.as_mut().expect("opened above");
        let result = file.set_len(0).and_then(|()| file.sync_all());
        result.map_err(|e| self.io(e))
    }

    /// Reads the intact records without opening for append (for `fleet-agent status`).
    pub fn read(path: &Path) -> Result<Vec<Record>, JournalError> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(|source| JournalError::Io { path: path.into(), source })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(JournalError::Io { path: path.into(), source }),
        }
        Ok(parse(&bytes).0)
    }
}

/// Encodes one record with its length and checksum.
pub fn frame(record: &Record) -> Vec<u8> {
    let body = serde_json::to_vec(record).expect("a journal record always serializes");
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes records up to the first torn or corrupt one; returns them and the length of
/// the intact prefix.
pub fn parse(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut pos = 0;
    while bytes.len() - pos >= HEADER {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || bytes.len() - pos - HEADER < len {
            break;
        }
        let body = &bytes[pos + HEADER..pos + HEADER + len];
        if crc32(body) != sum {
            break;
        }
        let Ok(record) = serde_json::from_slice::<Record>(body) else { break };
        records.push(record);
        pos += HEADER + len;
    }
    (records, pos)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib), bitwise: journal records are small and few.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(d: &str) -> Record {
        Record::Begin { digest: d.into(), version: 2, commit: "c2".into(), prev: Some("old".into()) }
    }

    fn write(p: &str) -> Step {
        Step::WriteFile { path: p.into(), sha256: "s".into() }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn torn_and_corrupt_tails_are_ignored() {
        let a = frame(&begin("new"));
        let b = frame(&Record::Intent { step: write("/r/a") });
        let mut bytes = [a.clone(), b.clone()].concat();
        assert_eq!(parse(&bytes).0.len(), 2);
        for cut in 0..bytes.len() {
            let (records, intact) = parse(&bytes[..cut]);
            let expect = if cut >= a.len() { 1 } else { 0 };
            assert_eq!(records.len(), expect, "cut at {cut}");
            assert_eq!(intact, if expect == 1 { a.len() } else { 0 });
        }
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(parse(&bytes).0.len(), 1, "a flipped bit fails the checksum");
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(&[]), Recovery::Clean);
        let intent = Record::Intent { step: write("/r/a") };
        assert_eq!(
            decide(&[begin("new"), intent.clone()]),
            Recovery::ResumeApply {
                digest: "new".into(),
                prev: Some("old".into()),
                interrupted: Some(write("/r/a"))
            }
        );
        assert_eq!(
            decide(&[begin("new"), intent.clone(), Record::Done { step: write("/r/a") }]),
            Recovery::ResumeApply { digest: "new".into(), prev: Some("old".into()), interrupted: None }
        );
        assert_eq!(
            decide(&[begin("new"), Record::Applied { digest: "new".into() }]),
            Recovery::ResumeHealth { digest: "new".into(), prev: Some("old".into()) }
        );
        assert!(matches!(
            decide(&[begin("new"), intent.clone(), begin("new")]),
            Recovery::RollBack { code, .. } if code == "interrupted"
        ));
        let rb = Record::RollbackBegin {
            from: "new".into(),
            to: Some("old".into()),
            code: "health_timeout".into(),
            reason: "r".into(),
        };
        assert!(
            matches!(decide(&[begin("new"), rb.clone()]), Recovery::RollBack { code, .. } if code == "health_timeout")
        );
        assert_eq!(
            decide(&[begin("new"), rb, Record::RollbackDone { from: "new".into(), to: Some("old".into()) }]),
            Recovery::FinishRollback { from: "new".into(), to: Some("old".into()) }
        );
        let commit = Record::Commit { digest: "new".into(), version: 2, commit: "c2".into(), at: 9 };
        assert!(matches!(decide(&[begin("new"), commit]), Recovery::FinishCommit { .. }));
    }

    #[test]
    fn journal_file_round_trip_cuts_torn_tail_before_appending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let mut j = Journal::new(&path);
        assert!(j.open().expect("open").is_empty());
        j.append(&begin("new")).expect("append");
        j.append(&Record::Intent { step: write("/r/a") }).expect("append");
        drop(j);
        let len = std::fs::metadata(&path).expect("stat").len();
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 3).expect("truncate");
        let mut j = Journal::new(&path);
        assert_eq!(j.open().expect("open"), vec![begin("new")]);
        j.append(&Record::Applied { digest: "new".into() }).expect("append");
        assert_eq!(
            Journal::read(&path).expect("read"),
            vec![begin("new"), Record::Applied { digest: "new".into() }]
        );
        j.reset().expect("reset");
        assert!(Journal::read(&path).expect("read").is_empty());
    }
}
