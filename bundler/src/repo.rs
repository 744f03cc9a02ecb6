//! Reads a fleet repository at one revision through gix, without a checkout; or, for
//! `validate --worktree` and `plan --worktree`, the same paths from the work tree on
//! disk, and which of them differ from HEAD's commit ([`worktree_changes`]). The
//! repository is found at the given path or above it, like `git` finds it. gix's
//! errors are translated here into what the user should do ([`RepoError`]).
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
//!
//! Files committed with Git LFS are read as their real content from the repository's
//! local LFS store ([`crate::lfs`]); a pointer whose object is missing stays a pointer,
//! which loading reports as that file's problem.

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
    /// The CI's age identities, to decrypt the repository's secret (`*.age`) files;
    /// empty: they are not decrypted (see `render::Fleet::undecrypted`).
    pub age_identities: Vec<fleet_spec::age::SecretKey>,
}

/// The fleet's secret variables (age-encrypted YAML) beside `fleet.yaml`.
pub const FLEET_SECRETS: &str = "secrets.yaml.age";

/// The default limit of the size of one file read from Git: 16 MiB. Bundles carry
/// whole files and devices hold a bundle's payload while they apply it.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 256 << 20;

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            commit: String::new(),
            commit_time: 0,
            subject: String::new(),
            files: BTreeMap::new(),
            too_large: BTreeMap::new(),
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            age_identities: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no Git repository at or above {path}: run the command inside the fleet repository's clone, or pass --repo with its root, a bare repository or its .git directory")]
    NotFound { path: PathBuf },
    #[error("cannot open Git repository {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("the repository {path} has no commit yet: commit your fleet files (git add . && git commit), or check the files as they are with --worktree (validate, plan)")]
    NoCommit { path: PathBuf },
    #[error("no branch, tag or commit {rev:?} in {path}: check the name (`git branch -a`, `git tag`); if it exists elsewhere, fetch it (`git fetch origin {rev}`)")]
    UnknownRevision { path: PathBuf, rev: String },
    #[error("{rev:?} goes back further than the history of {base}, which has {available} earlier commit(s){shallow}")]
    BeyondHistory { rev: String, base: String, available: usize, shallow: &'static str },
    #[error("revision {rev:?} does not name a commit: {message}")]
    NotACommit { rev: String, message: String },
    #[error("cannot read {what} of commit {commit}: {message}")]
    Read { commit: String, what: String, message: String },
    #[error(
        "{path} is a bare repository: it has no work tree for --worktree; check a commit with --rev instead"
    )]
    Bare { path: PathBuf },
    #[error("cannot read {path} in the work tree: {source}")]
    WorkTree { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Lfs(#[from] crate::lfs::LfsError),
}

/// The repository's local Git LFS object store (see [`crate::lfs::store`]).
fn lfs_store(repo: &gix::Repository) -> PathBuf {
    let storage = repo.config_snapshot().string("lfs.storage").map(|s| s.to_str_lossy().into_owned());
    crate::lfs::store(repo.common_dir(), storage.as_deref())
}

/// The `commit` of a [`Snapshot`] of the work tree (it has no commit id).
pub const WORKTREE: &str = "work tree";

/// The root of the work tree of the repository at or above `path`: where `enroll
/// accept` writes `devices/<id>.yaml` (never committed).
pub fn worktree_root(path: &Path) -> Result<PathBuf, RepoError> {
    let repo = open(path)?;
    Ok(repo.workdir().ok_or_else(|| RepoError::Bare { path: path.into() })?.to_path_buf())
}

/// Finds the repository at `path` or in a directory above it, like `git` does, so that
/// `--repo .` works from any subdirectory of a clone.
fn open(path: &Path) -> Result<gix::Repository, RepoError> {
    gix::discover_opts(path, Default::default(), gix::open::Options::isolated()).map_err(|e| {
        let message = e.to_string();
        // gix's discovery error says "could not find a git repository"; anything else
        // (permissions, a broken .git) is worth its own words.
        if message.contains("not find") || message.contains("does not appear") || !path.exists() {
            RepoError::NotFound { path: path.into() }
        } else {
            RepoError::Open { path: path.into(), message }
        }
    })
}

/// The repository's commit for `rev`, with gix's errors translated into what the
/// user should do: no commit yet, an unknown name, `HEAD~N` beyond the (shallow)
/// history.
fn resolve<'r>(repo: &'r gix::Repository, path: &Path, rev: &str) -> Result<gix::Commit<'r>, RepoError> {
    let id = match repo.rev_parse_single(rev) {
        Ok(id) => id,
        Err(_)
            if repo.head_id().is_err()
                && repo.references().is_ok_and(|r| r.all().is_ok_and(|mut a| a.next().is_none())) =>
        {
            return Err(RepoError::NoCommit { path: path.into() })
        }
        Err(_) => return Err(revision_error(repo, path, rev)),
    };
    id.object()
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| RepoError::NotACommit { rev: rev.into(), message: e.to_string() })
}

/// Why `rev` did not resolve: when its base (before `~`/`^`) names a commit, the
/// history is too short (or cut by a shallow clone); otherwise the name is unknown.
fn revision_error(repo: &gix::Repository, path: &Path, rev: &str) -> RepoError {
    let base = rev.find(['~', '^']).map_or(rev, |i| &rev[..i]);
    let base = if base.is_empty() { "HEAD" } else { base };
    let Some(commit) = (base != rev)
        .then(|| repo.rev_parse_single(base).ok())
        .flatten()
        .and_then(|id| id.object().ok())
        .and_then(|o| o.peel_to_commit().ok())
    else {
        return RepoError::UnknownRevision { path: path.into(), rev: rev.into() };
    };
    // First-parent ancestors the repository has (bounded: this is for a message).
    let mut available = 0;
    let mut current = commit;
    while available < 100_000 {
        let Some(parent) = current.parent_ids().next().and_then(|p| p.object().ok()?.try_into_commit().ok())
        else {
            break;
        };
        available += 1;
        current = parent;
    }
    let shallow = if repo.is_shallow().unwrap_or(false) {
        ": this is a shallow clone, fetch more history (`git fetch --deepen=N` or `git fetch --unshallow`; in CI, a deeper checkout such as `fetch-depth: 0`)"
    } else {
        ""
    };
    RepoError::BeyondHistory { rev: rev.into(), base: base.into(), available, shallow }
}

/// Reads the revision `rev` (anything `git rev-parse` understands: branch, tag, sha,
/// `HEAD~1`) of the repository at or above `path`. Files larger than `max_file_size`
/// bytes are not read (see [`Snapshot::too_large`]).
pub fn read(path: &Path, rev: &str, max_file_size: u64) -> Result<Snapshot, RepoError> {
    let repo = open(path)?;
    let commit = resolve(&repo, path, rev)?;
    let commit_id = commit.id().to_string();
    let read_err = |what: &str, e: &dyn std::fmt::Display| RepoError::Read {
        commit: commit_id.clone(),
        what: what.into(),
        message: e.to_string(),
    };
    // An LFS error (a damaged object) names its file and what to do: passed on as it is.
    let walk_err = |what: &str, e: BoxError| match e.downcast::<crate::lfs::LfsError>() {
        Ok(lfs) => RepoError::Lfs(*lfs),
        Err(e) => read_err(what, &e),
    };
    let commit_time = commit.time().map_err(|e| read_err("the committer time", &e))?.seconds;
    let subject = commit
        .message()
        .map(|m| m.summary().to_str_lossy().into_owned())
        .map_err(|e| read_err("the message", &e))?;
    let tree = commit.tree().map_err(|e| read_err("the tree", &e))?;

    let mut out = Files {
        max_file_size,
        lfs_store: lfs_store(&repo),
        files: BTreeMap::new(),
        too_large: BTreeMap::new(),
    };
    for entry in tree.iter() {
        let entry = entry.map_err(|e| read_err("the root tree", &e))?;
        let name = entry.filename().to_str_lossy().into_owned();
        let wanted_dir = name == "devices" || name == "apps";
        if entry.mode().is_tree() && wanted_dir {
            collect(&repo, entry.object_id(), &name, &mut out).map_err(|e| walk_err(&name, e))?;
        } else if entry.mode().is_blob() && (name == "fleet.yaml" || name == FLEET_SECRETS) {
            out.blob(&repo, entry.object_id(), name.clone()).map_err(|e| walk_err(&name, e))?;
        }
    }
    Ok(Snapshot {
        commit: commit_id,
        commit_time,
        subject,
        files: out.files,
        too_large: out.too_large,
        max_file_size,
        age_identities: Vec::new(),
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What [`read`] collects.
struct Files {
    max_file_size: u64,
    lfs_store: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
    too_large: BTreeMap<String, u64>,
}

impl Files {
    /// Reads the blob `id` as `path` unless its header says it is over the limit; an LFS
    /// pointer is read as the object it points to, under the same limit.
    fn blob(&mut self, repo: &gix::Repository, id: gix::ObjectId, path: String) -> Result<(), BoxError> {
        let size = repo.find_header(id)?.size();
        if size > self.max_file_size {
            self.too_large.insert(path, size);
            return Ok(());
        }
        let blob = repo.find_object(id)?.detach().data;
        match crate::lfs::resolve(&path, blob, &self.lfs_store, self.max_file_size)? {
            crate::lfs::Resolved::Content(content) => {
                self.files.insert(path, content);
            }
            crate::lfs::Resolved::TooLarge(size) => {
                self.too_large.insert(path, size);
            }
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

/// Reads the repository format's files as they are on disk in the work tree of the
/// repository at or above `path` (`validate --worktree`, `plan --worktree`): what the
/// next commit would hold if every change were committed. Symlinks are skipped, like in
/// a commit; ignored files are read too (`.gitignore` is not evaluated: gix's excludes
/// are not part of this build), which only matters for checking, never for `build`,
/// which reads commits only.
pub fn read_worktree(path: &Path, max_file_size: u64) -> Result<Snapshot, RepoError> {
    let repo = open(path)?;
    let root = repo.workdir().ok_or_else(|| RepoError::Bare { path: path.into() })?.to_path_buf();
    let (files, too_large) = worktree_files(&root, &lfs_store(&repo), max_file_size)?;
    Ok(Snapshot {
        commit: WORKTREE.into(),
        commit_time: 0,
        subject: "the files on disk, uncommitted changes included".into(),
        files,
        too_large,
        max_file_size,
        age_identities: Vec::new(),
    })
}

/// How a file of the work tree differs from the commit that was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Modified,
    /// On disk, not in the commit: untracked, or added but not committed.
    NotCommitted,
    /// In the commit, not on disk.
    Deleted,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::Modified => "modified",
            Change::NotCommitted => "not committed",
            Change::Deleted => "deleted",
        })
    }
}

/// The files of the repository format (`fleet.yaml`, `devices/**`, `apps/**`) whose
/// work tree version differs from `snapshot`, when `snapshot` is the commit checked out
/// (HEAD) of a repository with a work tree; `None` otherwise (a bare repository, or
/// another revision, where the work tree says nothing about what was checked).
///
/// This compares file contents on disk with the commit's directly rather than using
/// gix's worktree status: that needs gix's `status` feature (gix-status, gix-dir,
/// attributes and filters), a large dependency for one warning, and what matters here
/// is exactly "would the files on disk check differently", which a content comparison
/// answers (the index is not consulted: staged but uncommitted is still uncommitted).
/// Content filters are not applied either: with `core.autocrlf` checkouts every text
/// file would show as modified, which a Linux CI or a fleet repository without CRLF
/// conversion never sees.
pub fn worktree_changes(
    path: &Path,
    snapshot: &Snapshot,
) -> Result<Option<Vec<(String, Change)>>, RepoError> {
    let repo = open(path)?;
    let Some(root) = repo.workdir().map(Path::to_path_buf) else { return Ok(None) };
    let head = repo.head_id().ok().and_then(|id| id.object().ok()?.peel_to_commit().ok());
    if head.is_none_or(|c| c.id() != snapshot.commit.as_str()) {
        return Ok(None);
    }
    let (files, too_large) = worktree_files(&root, &lfs_store(&repo), snapshot.max_file_size)?;
    let mut changes = BTreeMap::new();
    for (path, bytes) in &files {
        match snapshot.files.get(path) {
            Some(committed) if committed == bytes => {}
            Some(_) => {
                changes.insert(path.clone(), Change::Modified);
            }
            None if snapshot.too_large.contains_key(path) => {
                changes.insert(path.clone(), Change::Modified);
            }
            None => {
                changes.insert(path.clone(), Change::NotCommitted);
            }
        }
    }
    for (path, size) in &too_large {
        // Too large to read on either side: compared by size only.
        match snapshot.too_large.get(path) {
            Some(committed) if committed == size => {}
            Some(_) => {
                changes.insert(path.clone(), Change::Modified);
            }
            None if snapshot.files.contains_key(path) => {
                changes.insert(path.clone(), Change::Modified);
            }
            None => {
                changes.insert(path.clone(), Change::NotCommitted);
            }
        }
    }
    for path in snapshot.files.keys().chain(snapshot.too_large.keys()) {
        if !files.contains_key(path) && !too_large.contains_key(path) {
            changes.insert(path.clone(), Change::Deleted);
        }
    }
    Ok(Some(changes.into_iter().collect()))
}

type FileMaps = (BTreeMap<String, Vec<u8>>, BTreeMap<String, u64>);

/// `fleet.yaml`, `devices/**` and `apps/**` under the work tree `root`.
/// Files not pulled from LFS yet (pointers on disk) are read from the LFS store.
fn worktree_files(root: &Path, lfs_store: &Path, max_file_size: u64) -> Result<FileMaps, RepoError> {
    let mut maps = (BTreeMap::new(), BTreeMap::new());
    let limits = (lfs_store, max_file_size);
    for name in ["fleet.yaml", FLEET_SECRETS] {
        let file = root.join(name);
        if file.is_file() && !file.is_symlink() {
            read_disk_file(&file, name.into(), limits, &mut maps)?;
        }
    }
    for dir in ["devices", "apps"] {
        let path = root.join(dir);
        if path.is_dir() && !path.is_symlink() {
            walk(&path, dir, limits, &mut maps)?;
        }
    }
    Ok(maps)
}

fn walk(dir: &Path, prefix: &str, limits: (&Path, u64), maps: &mut FileMaps) -> Result<(), RepoError> {
    let io = |source| RepoError::WorkTree { path: dir.into(), source };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let kind = entry.file_type().map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}/{name}");
        if kind.is_dir() {
            walk(&entry.path(), &rel, limits, maps)?;
        } else if kind.is_file() {
            read_disk_file(&entry.path(), rel, limits, maps)?;
        }
        // Symlinks are skipped, as in a commit.
    }
    Ok(())
}

fn read_disk_file(
    path: &Path,
    rel: String,
    (lfs_store, max_file_size): (&Path, u64),
    maps: &mut FileMaps,
) -> Result<(), RepoError> {
    let io = |source| RepoError::WorkTree { path: path.into(), source };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > max_file_size {
        maps.1.insert(rel, size);
        return Ok(());
    }
    let content = std::fs::read(path).map_err(io)?;
    match crate::lfs::resolve(&rel, content, lfs_store, max_file_size)? {
        crate::lfs::Resolved::Content(content) => {
            maps.0.insert(rel, content);
        }
        crate::lfs::Resolved::TooLarge(size) => {
            maps.1.insert(rel, size);
        }
    }
    Ok(())
}
