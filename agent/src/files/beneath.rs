//! Opening a directory below an allowed root without ever following a symlink.
//!
//! The root itself is opened by path (it comes from `agent.toml`, so it is trusted, and
//! may itself lie behind a symlink such as `/var/run`). Everything below it is hostile:
//! a container with a bind mount can rename, replace or symlink any of it at any time.
//! So the directories below the root are opened relative to the root's descriptor,
//! either in one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` call where the kernel
//! has it (Linux ≥ 5.6, and not blocked by a seccomp filter), or one component at a
//! time with `openat(O_DIRECTORY | O_NOFOLLOW)`, each relative to the previous one's
//! descriptor. The resulting descriptor stays valid, and keeps naming the same
//! directory, whatever is renamed afterwards: every later operation goes through it.
//!
//! This module never follows a symlink below a root, never resolves `..`, and never
//! creates anything but directories (0755 before the umask), and only when asked to.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::{io_err, FileError};
use crate::core::paths::PathError;

/// How directories are opened: flags every directory descriptor of this module has.
const DIR_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Whether `openat2` works here: unknown until the first call, then remembered.
static OPENAT2: AtomicU8 = AtomicU8::new(OPENAT2_UNKNOWN);
const OPENAT2_UNKNOWN: u8 = 0;
const OPENAT2_YES: u8 = 1;
const OPENAT2_NO: u8 = 2;

/// Opens the allowed root (following symlinks: it is the device's configuration, not
/// the bundle's). `None` when it does not exist and `create` is false.
pub(super) fn open_root(root: &Path, create: bool) -> Result<Option<OwnedFd>, FileError> {
    if create {
        std::fs::create_dir_all(root).map_err(io_err("create root", root))?;
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rustix::fs::openat(rustix::fs::CWD, root, flags, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) if !create => Ok(None),
        Err(e) => Err(io_err("open root", root)(e.into())),
    }
}

/// Opens the directory `root/parts...` without following any symlink, creating missing
/// directories when `create` is set. `None` when a component is missing and `create`
/// is false. `path` (the managed path) and `root_path` are for error messages only.
pub(super) fn open_dir(
    root: &OwnedFd,
    root_path: &Path,
    parts: &[&OsStr],
    create: bool,
    path: &str,
) -> Result<Option<OwnedFd>, FileError> {
    if parts.is_empty() {
        let fd = rustix::fs::openat(root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| io_err("open root", root_path)(e.into()))?;
        return Ok(Some(fd));
    }
    if use_openat2() {
        let rel: PathBuf = parts.iter().collect();
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(root, &rel, DIR_FLAGS, Mode::empty(), how) {
            Ok(fd) => {
                OPENAT2.store(OPENAT2_YES, Ordering::Relaxed);
                super::hook::note_openat2();
                return Ok(Some(fd));
            }
            // Not in this kernel, refused by a seccomp filter, or a kernel that does not
            // know these flags: walk from now on (just as safe, one call per component).
            Err(Errno::NOSYS | Errno::PERM | Errno::INVAL | Errno::TOOBIG) => {
                OPENAT2.store(OPENAT2_NO, Ordering::Relaxed)
            }
            // A missing directory (to create), a symlink or a non-directory on the way:
            // the walk below creates the first, and names the component for the others.
            Err(_) => {}
        }
    }
    walk(root, root_path, parts, create, path)
}

fn use_openat2() -> bool {
    !super::hook::walk_forced() && OPENAT2.load(Ordering::Relaxed) != OPENAT2_NO
}

/// True once `openat2` has worked in this process (for tests and diagnostics).
#[cfg(test)]
pub(super) fn openat2_works() -> bool {
    OPENAT2.load(Ordering::Relaxed) == OPENAT2_YES
}

/// One component at a time, each opened relative to the previous descriptor with
/// `O_NOFOLLOW | O_DIRECTORY`: the fallback for kernels without `openat2`.
fn walk(
    root: &OwnedFd,
    root_path: &Path,
    parts: &[&OsStr],
    create: bool,
    path: &str,
) -> Result<Option<OwnedFd>, FileError> {
    let mut cur: Option<OwnedFd> = None;
    let mut shown = root_path.to_path_buf();
    for part in parts {
        shown.push(part);
        let dir = cur.as_ref().map_or(root.as_fd(), |fd| fd.as_fd());
        let next = match rustix::fs::openat(dir, *part, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(dir, *part, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err("create directory", &shown)(e.into())),
                }
                // Opened again without following: whatever was put there meanwhile
                // (a symlink) is refused like any other.
                rustix::fs::openat(dir, *part, DIR_FLAGS, Mode::empty())
                    .map_err(|e| not_a_dir(dir, part, e, &shown, path))?
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(not_a_dir(dir, part, e, &shown, path)),
        };
        cur = Some(next);
    }
    Ok(cur)
}

/// Names why `part` could not be opened as a directory: a symlink (never followed),
/// something else that is not a directory, or another error.
fn not_a_dir(dir: impl AsFd, part: &OsStr, e: Errno, shown: &Path, path: &str) -> FileError {
    if !matches!(e, Errno::LOOP | Errno::NOTDIR) {
        return io_err("open directory", shown)(e.into());
    }
    match rustix::fs::statat(dir, part, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
            PathError::SymlinkEscape { path: path.into(), link: shown.to_path_buf() }.into()
        }
        _ => FileError::NotADirectory { path: shown.to_path_buf() },
    }
}
