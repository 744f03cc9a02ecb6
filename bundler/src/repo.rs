//! Reads a fleet repository at one revision through gix, without a checkout.
//!
//! Works on normal clones, bare repositories and shallow clones: only the one commit
//! named by the revision and its tree are read, never its parents (but for
//! [`Snapshot::commit_time`], which is the commit's own committer time).
//!
//! Only the paths the repository format uses are loaded: `fleet.yaml`, `devices/**`
//! and `apps/**`. Everything else (README, CI files) is ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gix::bstr::ByteSlice;

/// The repository format's files at one commit.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Full hex commit id.
    pub commit: String,
    /// Committer time, unix seconds: the bundles' `created_at` and the base of versions.
    pub commit_time: i64,
    /// First line of the commit message.
    pub subject: String,
    /// Repository-relative path → file bytes, for `fleet.yaml`, `devices/**`, `apps/**`.
    pub files: BTreeMap<String, Vec<u8>>,
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
/// `HEAD~1`) of the repository at `path`.
pub fn read(path: &Path, rev: &str) -> Result<Snapshot, RepoError> {
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

    let mut files = BTreeMap::new();
    for entry in tree.iter() {
        let entry = entry.map_err(|e| read_err("the root tree", &e))?;
        let name = entry.filename().to_str_lossy().into_owned();
        let wanted_dir = name == "devices" || name == "apps";
        if entry.mode().is_tree() && wanted_dir {
            collect(&repo, entry.object_id(), &name, &mut files).map_err(|e| read_err(&name, &e))?;
        } else if entry.mode().is_blob() && name == "fleet.yaml" {
            let data = blob(&repo, entry.object_id()).map_err(|e| read_err(&name, &e))?;
            files.insert(name, data);
        }
    }
    Ok(Snapshot { commit: commit_id, commit_time, subject, files })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn blob(repo: &gix::Repository, id: gix::ObjectId) -> Result<Vec<u8>, BoxError> {
    Ok(repo.find_object(id)?.detach().data)
}

/// Collects every blob below the tree `id` into `out`, keyed `prefix/<path>`.
fn collect(
    repo: &gix::Repository,
    id: gix::ObjectId,
    prefix: &str,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), BoxError> {
    let tree = repo.find_object(id)?.try_into_tree()?;
    for entry in tree.iter() {
        let entry = entry?;
        let path = format!("{prefix}/{}", entry.filename().to_str_lossy());
        if entry.mode().is_tree() {
            collect(repo, entry.object_id(), &path, out)?;
        } else if entry.mode().is_blob() {
            out.insert(path, blob(repo, entry.object_id())?);
        }
        // Symlinks and submodules are not part of the format; they are skipped.
    }
    Ok(())
}
