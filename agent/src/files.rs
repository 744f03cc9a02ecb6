//! The filesystem adapter: safe resolution of managed paths and atomic file replacement.
//!
//! Every path goes through [`resolve`] before anything is read, written or removed:
//! the lexical policy of `core::paths`, then the real directories from the allowed root
//! down, so that a symlinked directory cannot lead outside the root, and the final
//! component is never a symlink. Writes are atomic: a temp file in the same directory,
//! written, chmod/chown'ed, fsynced, renamed over the target, then the directory fsynced.
//!
//! This module never touches a path the caller did not name, and never follows a
//! symlink out of the allowed roots.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleet_spec::model::ManagedFile;
use sha2::{Digest, Sha256};

use crate::core::paths::{self, PathError};
use crate::core::plan::OnDisk;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Policy(#[from] PathError),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a directory (needed as a parent of a managed file)")]
    NotADirectory { path: PathBuf },
}

impl FileError {
    pub fn code(&self) -> &'static str {
        match self {
            FileError::Policy(p) => p.code(),
            _ => "file_write_failed",
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io { op, path: path.to_path_buf(), source }
}

/// Resolves a managed path to the real path to use, checking the policy on the real
/// filesystem. With `create`, missing parent directories are created (0755); without
/// it nothing is changed (a preflight check).
pub fn resolve(path: &str, roots: &[PathBuf], create: bool) -> Result<PathBuf, FileError> {
    let lexical = paths::check(path, roots)?;
    let root =
        roots.iter().filter(|r| paths::strictly_under(&lexical, r)).max_by_key(|r| r.as_os_str().len());
    let root = root.expect("paths::check found a root");
    if create {
        fs::create_dir_all(root).map_err(io("create root", root))?;
    }
    let real_root = match fs::canonicalize(root) {
        Ok(p) => p,
        // A root that does not exist yet: nothing below it exists either.
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(lexical),
        Err(e) => return Err(io("resolve root", root)(e)),
    };
    let rel = lexical.strip_prefix(root).expect("path is under its root");
    let mut real = real_root.clone();
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        let next = real.join(part);
        let is_last = parts.peek().is_none();
        let meta = match fs::symlink_metadata(&next) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("inspect", &next)(e)),
        };
        if is_last {
            if meta.is_some_and(|m| m.file_type().is_symlink()) {
                return Err(PathError::FinalSymlink { path: path.into() }.into());
            }
            return Ok(next);
        }
        match meta {
            None if create => {
                fs::create_dir(&next)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => Ok(()),
                        _ => Err(e),
                    })
                    .map_err(io("create directory", &next))?;
                real = next;
            }
            None => {
                // Nothing below exists: the rest will be created as real directories.
                for rest in parts.by_ref() {
                    real.push(rest);
                }
                return Ok(real);
            }
            Some(m) if m.file_type().is_symlink() => {
                let target = fs::canonicalize(&next).map_err(io("resolve symlink", &next))?;
                if !target.starts_with(&real_root) {
                    return Err(PathError::SymlinkEscape { path: path.into(), link: next }.into());
                }
                if !target.is_dir() {
                    return Err(FileError::NotADirectory { path: next });
                }
                real = target;
            }
            Some(m) if m.is_dir() => real = next,
            Some(_) => return Err(FileError::NotADirectory { path: next }),
        }
    }
    Ok(real)
}

/// Writes a managed file atomically at its resolved path.
pub fn write_managed(file: &ManagedFile, roots: &[PathBuf]) -> Result<PathBuf, FileError> {
    let target = resolve(&file.path, roots, true)?;
    write_atomic(&target, &file.content, file.mode, file.owner.map(|o| (o.uid, o.gid)))?;
    Ok(target)
}

/// Atomic replace: temp file in the same directory, write, chmod, chown, fsync, rename,
/// fsync the directory. The target's old content stays in place until the rename, and
/// the new content survives a power cut once this returns.
pub fn write_atomic(
    target: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    replace(target, content, mode, owner, true)
}

/// [`write_atomic`] without the directory fsync, for caches the agent rewrites often:
/// the file is still synced before the rename, so a crash or power cut leaves the old or
/// the new content, never a mix; but the rename itself may be lost, and the old content
/// come back. One fsync less per write (10-50 ms and some wear on an SD card).
pub fn write_cache(target: &Path, content: &[u8], mode: u32) -> Result<(), FileError> {
    replace(target, content, mode, None, false)
}

fn replace(
    target: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    durable_rename: bool,
) -> Result<(), FileError> {
    let dir = target.parent().ok_or_else(|| FileError::NotADirectory { path: target.into() })?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.fleet-tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&tmp)
            .map_err(io("create temp file", &tmp))?;
        f.write_all(content).map_err(io("write", &tmp))?;
        fs::set_permissions(&tmp, Permissions::from_mode(mode & 0o7777)).map_err(io("chmod", &tmp))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(io("chown", &tmp))?;
        }
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, target).map_err(io("rename into place", target))?;
        if durable_rename {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `O_NOFOLLOW` on Linux.
pub const O_NOFOLLOW: i32 = libc_o_nofollow();

/// `O_NOFOLLOW` on Linux (all architectures the agent targets use this value).
const fn libc_o_nofollow() -> i32 {
    #[cfg(any(
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    ))]
    {
        0o100000
    }
    #[cfg(not(any(
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    )))]
    {
        0o400000
    }
}

/// fsyncs a directory so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))
}

/// Removes a managed file (never a directory); a missing file is fine.
pub fn remove_managed(path: &str, roots: &[PathBuf]) -> Result<(), FileError> {
    let target = resolve(path, roots, false)?;
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => return Err(FileError::NotADirectory { path: target }),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspect", &target)(e)),
    }
    fs::remove_file(&target).map_err(io("remove", &target))?;
    if let Some(dir) = target.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// What is at a managed path now: `None` when missing (or not a regular file).
pub fn observe(path: &str, roots: &[PathBuf]) -> Result<Option<OnDisk>, FileError> {
    let target = match resolve(path, roots, false) {
        Ok(t) => t,
        // A symlink where a managed file should be: report it as changed content.
        Err(FileError::Policy(PathError::FinalSymlink { .. })) => {
            return Ok(Some(OnDisk { sha256: "symlink".into(), mode: 0 }))
        }
        Err(e) => return Err(e),
    };
    let meta = match fs::symlink_metadata(&target) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("inspect", &target)(e)),
    };
    Ok(Some(OnDisk { sha256: sha256_file(&target)?, mode: meta.permissions().mode() & 0o7777 }))
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, FileError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

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
        // A symlinked directory that stays inside the root is fine.
        fs::create_dir_all(root.join("real")).expect("mkdir");
        symlink(root.join("real"), root.join("alias")).expect("symlink");
        write_managed(&file(&format!("{}/alias/ok", root.display()), b"y"), &roots).expect("inside");
        assert_eq!(fs::read(root.join("real/ok")).expect("read"), b"y");
    }

    #[test]
    fn final_symlink_is_never_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("mkdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").expect("write");
        symlink(&victim, root.join("link")).expect("symlink");
        let roots = vec![root.clone()];
        let err =
            write_managed(&file(&format!("{}/link", root.display()), b"x"), &roots).expect_err("refused");
        assert!(matches!(err, FileError::Policy(PathError::FinalSymlink { .. })), "{err}");
        assert_eq!(fs::read(&victim).expect("read"), b"keep");
    }

    #[test]
    fn preflight_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let roots = vec![root.clone()];
        resolve(&format!("{}/a/b/c", root.display()), &roots, false).expect("allowed");
        assert!(!root.exists(), "preflight created nothing");
    }
}
