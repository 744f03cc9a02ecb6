//! Reads a fleet repository at one revision through gix, without a checkout.
//!
//! Works on normal clones, bare repositories and shallow clones: only the one commit
//! named by the revision and its tree are read, never its parents (but for
//! [`Snapshot::commit_time`], which is the commit's own committer time).
//!
//! Only the paths the repository format uses are loaded: `fleet.yaml`, `devices/**`
//! and `apps/**`. Everything else (README, CI files) is ignored.
//!
//! Every blob's size is read from its object header before the blob is: a file larger
//! than the limit ([`DEFAULT_MAX_FILE_SIZE`], `--max-file-size`) is never loaded into
//! memory and is listed in [`Snapshot::too_large`] instead, so that loading reports it
//! as a problem of that file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gix::bstr::ByteSlice;

/// The repository format's files at one commit.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Full hex commit id.
    pub commit: String,
    /// Committer time, unix seconds: the bundles' `created_at` and the base of versions.
    pub commit_time: i64,
    /// First line of the commit message.
    pub subject: String,
    /// Repository-relative path → file bytes, for `fleet.yaml`, `devices/**`, `apps/**`.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files not read because they are larger than the limit: path → size in bytes.
    pub too_large: BTreeMap<String, u64>,
    /// The limit the snapshot was read with (bytes per file).
    pub max_file_size: u64,
}

/// The default limit of the size of one file read from Git: 16 MiB. Bundles carry
/// whole files and devices hold a bundle's payload while they apply it.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 16 << 20;

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            commit: String::new(),
            commit_time: 0,
            subject: String::new(),
            files: BTreeMap::new(),
            too_large: BTreeMap::new(),
            max_file_size: DEFAULT_MAX_FILE_SIZE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot open Git repository {path}: {message} (pass the repository root, a bare repository or its .git directory)")]
    Open { path: PathBuf, message: String },
    #[error("revision {rev:?} not found in {path}: {message} (is it fetched? shallow clones only have the commits they were cloned with)")]
    Revision { path: PathBuf, rev: String, message: String },
    #[error("revision {rev:?} does not name a commit: {message}")]
    NotACommit { rev: String, message: String },
    #[error("cannot read {what} of commit {commit}: {message}")]
    Read { commit: String, what: String, message: String },
}

/// Reads the revision `rev` (anything `git rev-parse` understands: branch, tag, sha,
/// `HEAD~1`) of the repository at `path`. Files larger than `max_file_size` bytes are
/// not read (see [`Snapshot::too_large`]).
pub fn read(path: &Path, rev: &str, max_file_size: u64) -> Result<Snapshot, RepoError> {
    let repo = gix::open_opts(path, gix::open::Options::isolated())
        .map_err(|e| RepoError::Open { path: path.into(), message: e.to_string() })?;
    let id = repo.rev_parse_single(rev).map_err(|e| RepoError::Revision {
        path: path.into(),
        rev: rev.into(),
        message: e.to_string(),
    })?;
    let commit = id
        .object()
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| RepoError::NotACommit { rev: rev.into(), message: e.to_string() })?;
    let commit_id = commit.id().to_string();
    let read_err = |what: &str, e: &dyn std::fmt::Display| RepoError::Read {
        commit: commit_id.clone(),
        what: what.into(),
        message: e.to_string(),
    };
    let commit_time = commit.time().map_err(|e| read_err("the committer time", &e))?.seconds;
    let subject = commit
        .message()
        .map(|m| m.summary().to_str_lossy().into_owned())
        .map_err(|e| read_err("the message", &e))?;
    let tree = commit.tree().map_err(|e| read_err("the tree", &e))?;

    let mut out = Files { max_file_size, files: BTreeMap::new(), too_large: BTreeMap::new() };
    for entry in tree.iter() {
        let entry = entry.map_err(|e| read_err("the root tree", &e))?;
        let name = entry.filename().to_str_lossy().into_owned();
        let wanted_dir = name == "devices" || name == "apps";
        if entry.mode().is_tree() && wanted_dir {
            collect(&repo, entry.object_id(), &name, &mut out).map_err(|e| read_err(&name, &e))?;
        } else if entry.mode().is_blob() && name == "fleet.yaml" {
            out.blob(&repo, entry.object_id(), name.clone()).map_err(|e| read_err(&name, &e))?;
        }
    }
    Ok(Snapshot {
        commit: commit_id,
        commit_time,
        subject,
        files: out.files,
        too_large: out.too_large,
        max_file_size,
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What [`read`] collects.
struct Files {
    max_file_size: u64,
    files: BTreeMap<String, Vec<u8>>,
    too_large: BTreeMap<String, u64>,
}

impl Files {
    /// Reads the blob `id` as `path` unless its header says it is over the limit.
    fn blob(&mut self, repo: &gix::Repository, id: gix::ObjectId, path: String) -> Result<(), BoxError> {
        let size = repo.find_header(id)?.size();
        if size > self.max_file_size {
            self.too_large.insert(path, size);
        } else {
            self.files.insert(path, repo.find_object(id)?.detach().data);
        }
        Ok(())
    }
}

/// Collects every blob below the tree `id` into `out`, keyed `prefix/<path>`.
fn collect(repo: &gix::Repository, id: gix::ObjectId, prefix: &str, out: &mut Files) -> Result<(), BoxError> {
    let tree = repo.find_object(id)?.try_into_tree()?;
    for entry in tree.iter() {
        let entry = entry?;
        let path = format!("{prefix}/{}", entry.filename().to_str_lossy());
        if entry.mode().is_tree() {
            collect(repo, entry.object_id(), &path, out)?;
        } else if entry.mode().is_blob() {
            out.blob(repo, entry.object_id(), path)?;
        }
        // Symlinks and submodules are not part of the format; they are skipped.
    }
    Ok(())
}
