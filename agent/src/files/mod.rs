//! The filesystem adapter: managed files written, read and removed below the allowed
//! roots, safely against whoever else can write there.
//!
//! Threat model: a container that has its app directory bind-mounted read-write (the
//! usual Compose pattern) controls everything below that directory, and can rename,
//! replace or symlink any of it between any two system calls of the agent. So a path is
//! never checked and then used again: [`resolve`]'s lexical policy (`core::paths`) picks
//! the root, then the parent directory is opened from the root's descriptor downwards
//! without following any symlink (`beneath`: `openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, or a per-component `O_NOFOLLOW | O_DIRECTORY` walk on kernels
//! without it), and every later operation is relative to that descriptor:
//!
//! - writes: temp file `.<name>.fleet-tmp.<16 random hex digits>` created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW` (never an existing file, FIFO or symlink), written,
//!   `fchown` then `fchmod` on the open descriptor (owner first, so setuid/setgid bits
//!   set by the mode survive the owner change), fsynced, checked to still be the same
//!   inode under its name, `renameat` over the target (a symlink at the target is
//!   replaced, never followed), then the directory fsynced through the same descriptor;
//! - removals: `unlinkat` relative to the held directory (removes a symlink, never its
//!   target; never a directory), then the directory fsynced;
//! - reads (drift detection): `openat` with `O_NOFOLLOW | O_NONBLOCK`, and `fstat` must
//!   say regular file (a FIFO or device never blocks or is read; a symlink is reported
//!   as changed content, so the next write replaces it).
//!
//! A symlinked *directory* anywhere below the root is refused (`symlink_escape`), even
//! one that points inside the root: it is never followed.
//!
//! This module never follows a symlink below an allowed root, never opens an existing
//! file for writing, never changes the mode or owner of anything but the temp file it
//! just created, and never removes a directory. [`write_atomic`] and [`write_cache`]
//! trust the directory path they are given (the agent's own state directory); managed
//! files go through [`write_managed`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use fleet_spec::model::{Artifact, ManagedFile};
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::core::paths::{self, PathError};
use crate::core::plan::OnDisk;

mod beneath;
mod hook;
use hook::Point;
#[cfg(test)]
mod attack_tests;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Policy(#[from] PathError),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a directory (needed as a parent of a managed file): remove it or change the path in the repository")]
    NotADirectory { path: PathBuf },
    #[error("{path} is a directory where a managed file should be; the agent never replaces or removes a directory: remove it or change the path in the repository")]
    IsADirectory { path: PathBuf },
    #[error("{path} is not a regular file; refusing to read it")]
    NotARegularFile { path: PathBuf },
    #[error("the temp file {path} was replaced while the agent wrote it (something else writes in this directory); nothing was put in place, the next apply or reconcile writes it again")]
    TempReplaced { path: PathBuf },
    #[error(
        "no free temp file name next to {path} after {tries} random names; check what fills that directory"
    )]
    NoTempName { path: PathBuf, tries: u32 },
    #[error(
        "the stored artifact for {path} (sha256 {sha256}) is missing; the next apply downloads it again"
    )]
    BlobMissing { path: PathBuf, sha256: String },
    #[error("the stored artifact {blob} for {path} is damaged (not the signed bytes); it was removed and is downloaded again at the next apply; check the disk")]
    BlobMismatch { path: PathBuf, blob: PathBuf },
    #[error("owner {uid}:{gid} of {path} is not a valid user and group id (4294967295 is reserved): fix the owner in the repository")]
    BadOwner { path: PathBuf, uid: u32, gid: u32 },
}

impl FileError {
    pub fn code(&self) -> &'static str {
        match self {
            FileError::Policy(p) => p.code(),
            _ => "file_write_failed",
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io { op, path: path.to_path_buf(), source }
}

fn errno<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> FileError + 'a {
    move |e| FileError::Io { op, path: path.to_path_buf(), source: e.into() }
}

/// A managed path, located: its parent directory opened (held), and its last component.
struct Located {
    dir: OwnedFd,
    name: OsString,
    /// The path as the bundle names it, for messages and hooks.
    shown: PathBuf,
}

/// Checks the policy and opens the parent directory from the root downwards without
/// following symlinks; with `create`, missing directories are created (0755). `None`
/// when the root or a parent directory does not exist (and `create` is false).
fn locate(path: &str, roots: &[PathBuf], create: bool) -> Result<Option<Located>, FileError> {
    let lexical = paths::check(path, roots)?;
    let root =
        roots.iter().filter(|r| paths::strictly_under(&lexical, r)).max_by_key(|r| r.as_os_str().len());
    let root = root.expect("paths::check found a root");
    let rel = lexical.strip_prefix(root).expect("path is under its root");
    let mut parts: Vec<&OsStr> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            // paths::check refuses these already; never panic on a bundle's path.
            _ => return Err(PathError::NotNormal { path: path.into() }.into()),
        }
    }
    let name = parts.pop().expect("a path strictly under its root has a last component").to_os_string();
    let Some(root_fd) = beneath::open_root(root, create)? else { return Ok(None) };
    let Some(dir) = beneath::open_dir(&root_fd, root, &parts, create, path)? else { return Ok(None) };
    Ok(Some(Located { dir, name, shown: lexical }))
}

/// Checks a managed path against the policy and the real directories below its root
/// (no symlinked directory on the way, no non-directory as a parent) and returns it.
/// With `create`, missing parent directories are created (0755); without it nothing is
/// changed (a preflight check). Whatever is at the path itself (a symlink, a FIFO) is
/// fine: a write replaces it.
pub fn resolve(path: &str, roots: &[PathBuf], create: bool) -> Result<PathBuf, FileError> {
    locate(path, roots, create)?;
    Ok(PathBuf::from(path))
}

/// Writes a managed file atomically (see the module docs) and returns its path.
pub fn write_managed(file: &ManagedFile, roots: &[PathBuf]) -> Result<PathBuf, FileError> {
    let at = locate(&file.path, roots, true)?.expect("create makes the root and every parent");
    hook::at(Point::AfterResolve, &at.shown);
    let owner = file.owner.map(|o| (o.uid, o.gid));
    replace(&at.dir, &at.name, &at.shown, Content::Bytes(&file.content), file.mode, owner, true)?;
    Ok(at.shown)
}

/// Writes artifact `artifact` atomically like [`write_managed`], its bytes streamed from
/// `blob` (the agent's blob store) in 64 KiB steps and hashed on the way: a blob that is
/// not the signed bytes (a damaged card) is never put in place ([`FileError::BlobMismatch`]).
pub fn write_managed_blob(artifact: &Artifact, blob: &Path, roots: &[PathBuf]) -> Result<PathBuf, FileError> {
    let at = locate(&artifact.path, roots, true)?.expect("create makes the root and every parent");
    hook::at(Point::AfterResolve, &at.shown);
    let owner = artifact.owner.map(|o| (o.uid, o.gid));
    let source = File::open(blob).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            FileError::BlobMissing { path: at.shown.clone(), sha256: artifact.sha256_hex() }
        }
        _ => FileError::Io { op: "open blob", path: blob.into(), source: e },
    })?;
    let content = Content::Blob { source, sha256: artifact.sha256, size: artifact.size, blob };
    let written = replace(&at.dir, &at.name, &at.shown, content, artifact.mode, owner, true);
    if let Err(FileError::BlobMismatch { .. }) = &written {
        let _ = std::fs::remove_file(blob);
    }
    written?;
    Ok(at.shown)
}

/// What a write puts in the temp file.
enum Content<'a> {
    Bytes(&'a [u8]),
    /// Streamed from a blob, checked against the signed digest and size.
    Blob {
        source: File,
        sha256: [u8; 32],
        size: u64,
        blob: &'a Path,
    },
}

/// Atomic replace in a directory the agent owns (its state directory; the directory's
/// path is trusted and may go through symlinks): temp file, write, chown, chmod, fsync,
/// rename, fsync the directory. The target's old content stays in place until the
/// rename, and the new content survives a power cut once this returns.
pub fn write_atomic(
    target: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    let (dir, name) = open_parent(target)?;
    replace(&dir, &name, target, Content::Bytes(content), mode, owner, true)
}

/// [`write_atomic`] without the directory fsync, for caches the agent rewrites often:
/// the file is still synced before the rename, so a crash or power cut leaves the old or
/// the new content, never a mix; but the rename itself may be lost, and the old content
/// come back. One fsync less per write (10-50 ms and some wear on an SD card).
pub fn write_cache(target: &Path, content: &[u8], mode: u32) -> Result<(), FileError> {
    let (dir, name) = open_parent(target)?;
    replace(&dir, &name, target, Content::Bytes(content), mode, None, false)
}

/// Opens the parent of a path in a trusted directory (following symlinks).
fn open_parent(target: &Path) -> Result<(OwnedFd, OsString), FileError> {
    let name = target.file_name().ok_or_else(|| FileError::NotADirectory { path: target.into() })?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(rustix::fs::CWD, dir, flags, Mode::empty())
        .map_err(errno("open directory", dir))?;
    Ok((fd, name.to_os_string()))
}

/// How many random temp names are tried before giving up (each taken one means
/// something else created exactly that name: 64 random bits make a collision by chance
/// practically impossible).
const TEMP_TRIES: u32 = 16;

fn replace(
    dir: &OwnedFd,
    name: &OsStr,
    shown: &Path,
    content: Content<'_>,
    mode: u32,
    owner: Option<(u32, u32)>,
    durable_rename: bool,
) -> Result<(), FileError> {
    if let Some((uid, gid)) = owner {
        if uid == u32::MAX || gid == u32::MAX {
            return Err(FileError::BadOwner { path: shown.into(), uid, gid });
        }
    }
    let (file, tmp) = create_temp(dir, name, shown)?;
    let tmp_shown = shown.with_file_name(&tmp);
    let result =
        fill_and_rename(dir, name, shown, &file, &tmp, &tmp_shown, content, mode, owner, durable_rename);
    if result.is_err() && same_inode(dir, &tmp, &file) {
        let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
    }
    result
}

/// Creates a temp file next to `name` that did not exist before (`O_EXCL`), under an
/// unpredictable name.
fn create_temp(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<(File, OsString), FileError> {
    // Keep the temp name within NAME_MAX (255): ".", 11 bytes of ".fleet-tmp.", 16 hex.
    let stem = &name.as_bytes()[..name.len().min(200)];
    let flags =
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
    for _ in 0..TEMP_TRIES {
        let mut tmp = Vec::with_capacity(stem.len() + 28);
        tmp.push(b'.');
        tmp.extend_from_slice(stem);
        tmp.extend_from_slice(b".fleet-tmp.");
        tmp.extend_from_slice(hex::encode(random_u64(shown)?.to_le_bytes()).as_bytes());
        let tmp = OsString::from_vec(tmp);
        let tmp_shown = shown.with_file_name(&tmp);
        hook::at(Point::BeforeTempOpen, &tmp_shown);
        match rustix::fs::openat(dir, &tmp, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok((File::from(fd), tmp)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(errno("create temp file", &tmp_shown)(e)),
        }
    }
    Err(FileError::NoTempName { path: shown.into(), tries: TEMP_TRIES })
}

/// 64 random bits from `getrandom`, or `/dev/urandom` where the kernel lacks it.
fn random_u64(shown: &Path) -> Result<u64, FileError> {
    let mut buf = [0u8; 8];
    let got = rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty());
    if got != Ok(buf.len()) {
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(io_err("random temp file name for", shown))?;
    }
    Ok(u64::from_le_bytes(buf))
}

#[allow(clippy::too_many_arguments)]
fn fill_and_rename(
    dir: &OwnedFd,
    name: &OsStr,
    shown: &Path,
    mut file: &File,
    tmp: &OsStr,
    tmp_shown: &Path,
    content: Content<'_>,
    mode: u32,
    owner: Option<(u32, u32)>,
    durable_rename: bool,
) -> Result<(), FileError> {
    match content {
        Content::Bytes(bytes) => file.write_all(bytes).map_err(io_err("write", tmp_shown))?,
        Content::Blob { mut source, sha256, size, blob } => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut copied = 0u64;
            loop {
                let n = source.read(&mut buf).map_err(io_err("read", blob))?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_err("write", tmp_shown))?;
            }
            if copied != size || hasher.finalize()[..] != sha256[..] {
                return Err(FileError::BlobMismatch { path: shown.into(), blob: blob.into() });
            }
        }
    }
    hook::at(Point::BeforeChmod, tmp_shown);
    // Owner first: a later chown would clear setuid/setgid bits the mode sets.
    if let Some((uid, gid)) = owner {
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        rustix::fs::fchown(file, Some(uid), Some(gid)).map_err(errno("chown", tmp_shown))?;
    }
    rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777)).map_err(errno("chmod", tmp_shown))?;
    file.sync_all().map_err(io_err("fsync", tmp_shown))?;
    hook::at(Point::BeforeRename, tmp_shown);
    // Whatever is renamed into place must be the file just written: not something
    // renamed over the temp name meanwhile (that is left alone, and reported).
    if !same_inode(dir, tmp, file) {
        return Err(FileError::TempReplaced { path: tmp_shown.into() });
    }
    rustix::fs::renameat(dir, tmp, dir, name).map_err(|e| match e {
        Errno::ISDIR => FileError::IsADirectory { path: shown.into() },
        e => errno("rename into place", shown)(e),
    })?;
    if durable_rename {
        rustix::fs::fsync(dir).map_err(errno("fsync directory", shown.parent().unwrap_or(shown)))?;
    }
    Ok(())
}

/// True when `name` in `dir` (not followed) is the inode `file` has open.
fn same_inode(dir: &OwnedFd, name: &OsStr, file: &File) -> bool {
    match (rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW), rustix::fs::fstat(file)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// fsyncs a directory so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::openat(rustix::fs::CWD, dir, flags, Mode::empty())
        .and_then(rustix::fs::fsync)
        .map_err(errno("fsync directory", dir))
}

/// Removes a managed file (never a directory; a symlink there is removed, never its
/// target); a missing file, or a missing parent directory, is fine.
pub fn remove_managed(path: &str, roots: &[PathBuf]) -> Result<(), FileError> {
    let Some(at) = locate(path, roots, false)? else { return Ok(()) };
    hook::at(Point::AfterResolve, &at.shown);
    match rustix::fs::statat(&at.dir, &at.name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            return Err(FileError::IsADirectory { path: at.shown })
        }
        Ok(_) => {}
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(errno("inspect", &at.shown)(e)),
    }
    hook::at(Point::BeforeUnlink, &at.shown);
    // unlinkat without AT_REMOVEDIR never removes a directory, whatever is there now.
    match rustix::fs::unlinkat(&at.dir, &at.name, AtFlags::empty()) {
        Ok(()) => {}
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR | Errno::PERM) if is_dir(&at.dir, &at.name) => {
            return Err(FileError::IsADirectory { path: at.shown })
        }
        Err(e) => return Err(errno("remove", &at.shown)(e)),
    }
    rustix::fs::fsync(&at.dir).map_err(errno("fsync directory", at.shown.parent().unwrap_or(&at.shown)))
}

fn is_dir(dir: &OwnedFd, name: &OsStr) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

/// What is at a managed path now: `None` when missing or not a regular file (a FIFO, a
/// device: never opened for reading if seen first, never read); a symlink reads as
/// changed content (`sha256` "symlink"), so the plan rewrites it.
pub fn observe(path: &str, roots: &[PathBuf]) -> Result<Option<OnDisk>, FileError> {
    let Some(at) = locate(path, roots, false)? else { return Ok(None) };
    let symlink = || Some(OnDisk { sha256: "symlink".into(), mode: 0 });
    // Look before opening, so a device node planted there is not even opened.
    match rustix::fs::statat(&at.dir, &at.name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => return Ok(symlink()),
            _ => return Ok(None),
        },
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(errno("inspect", &at.shown)(e)),
    }
    hook::at(Point::BeforeRead, &at.shown);
    let file = match open_regular(&at.dir, &at.name, &at.shown) {
        Ok(f) => f,
        Err(Opened::Missing) | Err(Opened::NotRegular) => return Ok(None),
        Err(Opened::Symlink) => return Ok(symlink()),
        Err(Opened::Failed(e)) => return Err(e),
    };
    let st = rustix::fs::fstat(&file).map_err(errno("inspect", &at.shown))?;
    let mode = Mode::from_raw_mode(st.st_mode).bits() & 0o7777;
    Ok(Some(OnDisk { sha256: hash(file, &at.shown)?, mode }))
}

/// A regular file found at a managed path (see [`read_existing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads the regular file at managed path `path`, as [`observe`] looks at it (never
/// through a symlink, never blocking on a FIFO): `None` when there is none. A file over
/// `max` bytes is an error that names it.
pub fn read_existing(path: &str, roots: &[PathBuf], max: u64) -> Result<Option<Existing>, FileError> {
    let Some(at) = locate(path, roots, false)? else { return Ok(None) };
    let file = match open_regular(&at.dir, &at.name, &at.shown) {
        Ok(f) => f,
        Err(Opened::Missing | Opened::Symlink | Opened::NotRegular) => return Ok(None),
        Err(Opened::Failed(e)) => return Err(e),
    };
    let st = rustix::fs::fstat(&file).map_err(errno("inspect", &at.shown))?;
    let size = st.st_size as u64;
    if size > max {
        let too_big = std::io::Error::other(format!(
            "it is {size} bytes, over {max}: move it away, or leave this path out of the bundle"
        ));
        return Err(io_err("keep", &at.shown)(too_big));
    }
    let mut content = Vec::with_capacity(size as usize);
    file.take(max + 1).read_to_end(&mut content).map_err(io_err("read", &at.shown))?;
    Ok(Some(Existing {
        content,
        mode: Mode::from_raw_mode(st.st_mode).bits() & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
    }))
}

enum Opened {
    Missing,
    Symlink,
    NotRegular,
    Failed(FileError),
}

/// Opens `name` for reading without following a symlink and without blocking on a FIFO,
/// and only if it is a regular file.
fn open_regular(dir: impl AsFd, name: &OsStr, shown: &Path) -> Result<File, Opened> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(Opened::Missing),
        Err(Errno::LOOP) => return Err(Opened::Symlink),
        // A unix socket.
        Err(Errno::NXIO) => return Err(Opened::NotRegular),
        Err(e) => return Err(Opened::Failed(errno("open", shown)(e))),
    };
    match rustix::fs::fstat(&fd) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => Ok(File::from(fd)),
        Ok(_) => Err(Opened::NotRegular),
        Err(e) => Err(Opened::Failed(errno("inspect", shown)(e))),
    }
}

/// Hex sha256 of a regular file, streamed; never follows a symlink at `path` itself,
/// never blocks on a FIFO.
pub fn sha256_file(path: &Path) -> Result<String, FileError> {
    match open_regular(rustix::fs::CWD, path.as_os_str(), path) {
        Ok(f) => hash(f, path),
        Err(Opened::Missing) => Err(errno("open", path)(Errno::NOENT)),
        Err(Opened::Symlink | Opened::NotRegular) => Err(FileError::NotARegularFile { path: path.into() }),
        Err(Opened::Failed(e)) => Err(e),
    }
}

fn hash(mut f: File, shown: &Path) -> Result<String, FileError> {
    let before = rustix::fs::fstat(&f).ok().map(|st| Stamp::of(&st)).filter(|s| s.size >= HASH_CACHE_MIN);
    if let Some(sha) = before.and_then(|s| hash_cache::get(&s)) {
        return Ok(sha);
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", shown))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha = hex::encode(hasher.finalize());
    if let Some(before) = before {
        // Unchanged while it was read, and not changed in the last seconds (a change
        // within the timestamps' granularity after now would look the same).
        let after = rustix::fs::fstat(&f).ok().map(|st| Stamp::of(&st));
        if after == Some(before) && before.settled() {
            hash_cache::put(before, &sha);
        }
    }
    Ok(sha)
}

/// Files at least this big have their hash remembered (see [`hash_cache`]).
const HASH_CACHE_MIN: u64 = 1 << 20;

/// What identifies a file's content without reading it: which inode, its size, and its
/// modification and change times. The change time (`ctime`) is set by the kernel on
/// every write, truncate, chmod or rename, and no unprivileged program can set it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)] // field types differ per target
    fn of(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }

    /// Changed more than 2 s ago (git's "racily clean" rule): a write right after the
    /// hash, within the filesystem's timestamp granularity, could keep the same stamp.
    fn settled(&self) -> bool {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.ctime.0.saturating_add(2) < now as i64
    }
}

/// The hashes of big managed files and blobs, by [`Stamp`]: drift detection (every
/// reconcile) and the apply's checks read a 200 MB artifact once, not at every pass, on
/// the agent's one thread. A file whose stamp changed is hashed again. In memory only,
/// at most [`HASH_CACHE_ENTRIES`] entries.
mod hash_cache {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::Stamp;

    pub const HASH_CACHE_ENTRIES: usize = 1024;

    static CACHE: Mutex<BTreeMap<(u64, u64), (Stamp, String)>> = Mutex::new(BTreeMap::new());

    pub fn get(stamp: &Stamp) -> Option<String> {
        let cache = CACHE.lock().ok()?;
        cache.get(&(stamp.dev, stamp.ino)).filter(|(s, _)| s == stamp).map(|(_, sha)| sha.clone())
    }

    pub fn put(stamp: Stamp, sha: &str) {
        if let Ok(mut cache) = CACHE.lock() {
            if cache.len() >= HASH_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert((stamp.dev, stamp.ino), (stamp, sha.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn file(path: &str, content: &[u8]) -> ManagedFile {
        ManagedFile { path: path.into(), mode: 0o640, owner: None, content: content.to_vec() }
    }

    #[test]
    fn writes_atomically_with_mode_and_creates_parents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let roots = vec![root.clone()];
        let path = format!("{}/app/conf/a.conf", root.display());
        write_managed(&file(&path, b"one"), &roots).expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"one");
        assert_eq!(fs::metadata(&path).expect("stat").permissions().mode() & 0o7777, 0o640);
        write_managed(&file(&path, b"two"), &roots).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let leftovers: Vec<_> = fs::read_dir(root.join("app/conf")).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left behind");
        let seen = observe(&path, &roots).expect("observe").expect("present");
        assert_eq!(seen.sha256, file(&path, b"two").content_sha256());
        remove_managed(&path, &roots).expect("remove");
        assert_eq!(observe(&path, &roots).expect("observe"), None);
    }

    #[test]
    fn symlinked_directory_escaping_the_root_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&root).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        symlink(&outside, root.join("evil")).expect("symlink");
        let roots = vec![root.clone()];
        let path = format!("{}/evil/passwd", root.display());
        let err = write_managed(&file(&path, b"x"), &roots).expect_err("escape");
        assert!(matches!(err, FileError::Policy(PathError::SymlinkEscape { .. })), "{err}");
        assert_eq!(err.code(), "symlink_escape");
        assert!(!outside.join("passwd").exists(), "nothing written outside the root");
        // A symlinked directory that stays inside the root is refused as well: never
        // followed (see attack_tests::symlinked_directory_inside_the_root_is_refused_not_followed).
        fs::create_dir_all(root.join("real")).expect("mkdir");
        symlink(root.join("real"), root.join("alias")).expect("symlink");
        let err =
            write_managed(&file(&format!("{}/alias/ok", root.display()), b"y"), &roots).expect_err("alias");
        assert_eq!(err.code(), "symlink_escape", "{err}");
        assert!(!root.join("real/ok").exists(), "nothing written through the alias");
    }

    #[test]
    fn final_symlink_is_replaced_never_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("mkdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").expect("write");
        symlink(&victim, root.join("link")).expect("symlink");
        let roots = vec![root.clone()];
        write_managed(&file(&format!("{}/link", root.display()), b"x"), &roots).expect("replaced");
        assert_eq!(fs::read(&victim).expect("read"), b"keep");
        assert_eq!(fs::read(root.join("link")).expect("read"), b"x");
        assert!(fs::symlink_metadata(root.join("link")).expect("lstat").is_file());
    }

    #[test]
    fn store_style_writes_in_a_trusted_directory_leave_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        fs::create_dir_all(&state).expect("mkdir");
        // The state directory may itself be reached through a symlink: it is trusted.
        symlink(&state, dir.path().join("via")).expect("symlink");
        write_atomic(&dir.path().join("via/trust.json"), b"{}", 0o600, None).expect("write_atomic");
        write_cache(&dir.path().join("via/status.json"), b"{}", 0o600).expect("write_cache");
        let names: Vec<_> =
            fs::read_dir(&state).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
        assert_eq!(fs::metadata(state.join("trust.json")).expect("stat").permissions().mode() & 0o777, 0o600);
        assert_eq!(sha256_file(&state.join("trust.json")).expect("sha"), hex::encode(Sha256::digest(b"{}")));
    }

    #[test]
    fn sha256_file_refuses_symlinks_and_fifos() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("f"), b"x").expect("write");
        symlink(dir.path().join("f"), dir.path().join("l")).expect("symlink");
        let err = sha256_file(&dir.path().join("l")).expect_err("symlink");
        assert!(matches!(err, FileError::NotARegularFile { .. }), "{err}");
    }

    #[test]
    fn temp_names_are_unpredictable() {
        let shown = Path::new("/x/a.conf");
        let (a, b) = (random_u64(shown).expect("random"), random_u64(shown).expect("random"));
        assert_ne!(a, b);
    }

    #[test]
    fn openat2_is_used_where_the_kernel_has_it_and_the_walk_can_be_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let roots = vec![root.clone()];
        let path = format!("{}/a/b/c.conf", root.display());
        write_managed(&file(&path, b"1"), &roots).expect("write");
        let before = hook::openat2_hits();
        write_managed(&file(&path, b"2"), &roots).expect("rewrite");
        // The x86_64 test machines run a kernel with openat2; the ARM builds' tests run
        // under qemu-user, which has no openat2 (ENOSYS): there the walk is all there is,
        // which is exactly the fallback this module promises.
        if cfg!(target_arch = "x86_64") {
            assert!(
                beneath::openat2_works() && hook::openat2_hits() > before,
                "openat2 is unavailable here (old kernel or seccomp): the tests' openat2 half ran the walk"
            );
        } else if !beneath::openat2_works() {
            assert_eq!(hook::openat2_hits(), before, "no openat2: every write walked");
        }
        let _walk = hook::force_walk(true);
        let before = hook::openat2_hits();
        write_managed(&file(&path, b"3"), &roots).expect("rewrite by walking");
        assert_eq!(hook::openat2_hits(), before, "the forced walk never calls openat2");
        assert_eq!(fs::read(&path).expect("read"), b"3");
    }

    #[test]
    fn a_directory_at_a_managed_path_is_never_replaced_nor_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("app/conf.d")).expect("mkdir");
        let roots = vec![root.clone()];
        let path = format!("{}/app/conf.d", root.display());
        let err = write_managed(&file(&path, b"x"), &roots).expect_err("write over a directory");
        assert!(matches!(err, FileError::IsADirectory { .. }), "{err}");
        let err = remove_managed(&path, &roots).expect_err("remove a directory");
        assert!(matches!(err, FileError::IsADirectory { .. }), "{err}");
        assert!(root.join("app/conf.d").is_dir());
        let leftovers: Vec<_> = fs::read_dir(root.join("app")).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "the temp file was cleaned up");
    }

    #[test]
    fn a_file_as_a_parent_directory_is_named_in_the_error() {
        for walk in [false, true] {
            let _walk = hook::force_walk(walk);
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("root");
            fs::create_dir_all(&root).expect("mkdir");
            fs::write(root.join("app"), b"a file").expect("write");
            let roots = vec![root.clone()];
            let err = write_managed(&file(&format!("{}/app/a.conf", root.display()), b"x"), &roots)
                .expect_err("parent is a file");
            assert!(matches!(&err, FileError::NotADirectory { path } if path == &root.join("app")), "{err}");
            assert_eq!(err.code(), "file_write_failed");
        }
    }

    #[test]
    fn the_reserved_owner_id_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let roots = vec![root.clone()];
        let mut f = file(&format!("{}/a", root.display()), b"x");
        f.owner = Some(fleet_spec::model::Owner { uid: u32::MAX, gid: 0 });
        let err = write_managed(&f, &roots).expect_err("uid -1 means 'unchanged' to the kernel");
        assert!(matches!(err, FileError::BadOwner { .. }), "{err}");
        assert!(!root.join("a").exists());
    }

    #[test]
    fn preflight_through_a_symlinked_directory_creates_nothing_and_names_the_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("mkdir");
        symlink(dir.path(), root.join("up")).expect("symlink");
        let roots = vec![root.clone()];
        let err = resolve(&format!("{}/up/new/x", root.display()), &roots, false).expect_err("refused");
        assert!(
            matches!(&err, FileError::Policy(PathError::SymlinkEscape { link, .. }) if link == &root.join("up")),
            "{err}"
        );
        assert!(!dir.path().join("new").exists());
    }

    #[test]
    fn preflight_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let roots = vec![root.clone()];
        resolve(&format!("{}/a/b/c", root.display()), &roots, false).expect("allowed");
        assert!(!root.exists(), "preflight created nothing");
    }

    #[test]
    fn an_artifact_is_streamed_from_its_blob_and_a_damaged_blob_is_never_put_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("mkdir");
        let roots = [root.clone()];
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let blob = dir.path().join("blob");
        fs::write(&blob, &bytes).expect("blob");
        let path = format!("{}/models/m.bin", root.display());
        let artifact = Artifact {
            path: path.clone(),
            mode: 0o600,
            owner: None,
            sha256: Sha256::digest(&bytes).into(),
            size: bytes.len() as u64,
        };
        write_managed_blob(&artifact, &blob, &roots).expect("written");
        assert_eq!(fs::read(&path).expect("read"), bytes);
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o7777, 0o600);

        let mut rotten = bytes.clone();
        rotten[10] ^= 1;
        fs::write(&blob, &rotten).expect("rot");
        fs::write(&path, b"old").expect("old");
        let e = write_managed_blob(&artifact, &blob, &roots).expect_err("refused");
        assert!(matches!(e, FileError::BlobMismatch { .. }), "{e}");
        assert_eq!(fs::read(&path).expect("read"), b"old", "the old content stays");
        assert!(!blob.exists(), "the damaged blob is dropped");
        let leftovers: Vec<_> = fs::read_dir(root.join("models")).expect("ls").flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
        let e = write_managed_blob(&artifact, &blob, &roots).expect_err("missing");
        assert!(matches!(e, FileError::BlobMissing { .. }), "{e}");
    }

    /// The hash cache never hides a change: a settled big file is read once, and a write
    /// of the same size (even with its mtime put back) is seen at the next look.
    #[test]
    fn a_remembered_hash_never_hides_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.bin");
        let one = vec![1u8; HASH_CACHE_MIN as usize];
        fs::write(&path, &one).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(3100));
        let first = sha256_file(&path).expect("hash");
        assert_eq!(first, hex::encode(Sha256::digest(&one)));
        let st = rustix::fs::stat(&path).expect("stat");
        assert_eq!(hash_cache::get(&Stamp::of(&st)).as_deref(), Some(first.as_str()), "remembered");
        // Same size, mtime put back: the ctime moved, so it is read again.
        let mtime = fs::metadata(&path).expect("meta").modified().expect("mtime");
        let mut two = one.clone();
        two[7] = 2;
        fs::write(&path, &two).expect("rewrite");
        fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(mtime)).expect("backdate");
        assert_eq!(sha256_file(&path).expect("hash"), hex::encode(Sha256::digest(&two)));
    }
}
