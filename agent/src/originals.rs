//! Files the device had before a bundle took them over (Hardening I, case 11).
//!
//! A bundle may name a path where an unmanaged file already lives (a provisioning
//! certificate, a vendor config). Before the first write over it, its content, mode and
//! owner are kept in the state directory ([`Store::save_original`]); when the file leaves
//! the desired state (a later bundle drops it, or a rollback to a state without it), the
//! original is put back instead of the file being deleted. A file the agent created is
//! deleted as before.
//!
//! This module never keeps anything but a regular file, and never reads through a
//! symlink.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use fleet_spec::model::{ManagedFile, Owner};
use sha2::{Digest, Sha256};

use crate::files::{self, FileError};
use crate::store::{Original, Store, StoreError};

// Linux values, the same on x86_64, aarch64 and arm (std exposes no constants for them).
const O_NONBLOCK: i32 = 0o4000;
const ELOOP: i32 = 40;

/// Larger originals are not kept (and the takeover is refused): the state directory is
/// not a backup store, and the copy is made in memory.
pub const MAX_ORIGINAL: u64 = 16 << 20;

/// Keeps the file at managed path `path`, if it is a regular file and none is kept yet.
pub fn keep(store: &Store, path: &str, roots: &[PathBuf]) -> Result<(), StoreError> {
    if store.original(path)?.is_some() {
        return Ok(());
    }
    let real = files::resolve(path, roots, false)?;
    let io = |op: &'static str| {
        let real = real.clone();
        move |source| StoreError::File(FileError::Io { op, path: real, source })
    };
    // O_NOFOLLOW: a symlink is not a file to keep; O_NONBLOCK: a FIFO cannot hold us.
    let file =
        match std::fs::OpenOptions::new().read(true).custom_flags(files::O_NOFOLLOW | O_NONBLOCK).open(&real)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(ELOOP) => return Ok(()),
            Err(e) => return Err(io("open the original of")(e)),
        };
    let meta = file.metadata().map_err(io("inspect the original of"))?;
    if !meta.is_file() {
        return Ok(());
    }
    if meta.len() > MAX_ORIGINAL {
        return Err(io("keep the original of")(std::io::Error::other(format!(
            "it is {} bytes, over {MAX_ORIGINAL}: move it away, or leave this path out of the bundle",
            meta.len()
        ))));
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_ORIGINAL + 1).read_to_end(&mut content).map_err(io("read the original of"))?;
    let original = Original {
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        sha256: hex::encode(Sha256::digest(&content)),
    };
    tracing::info!(path, "keeping the device's own file before a bundle replaces it");
    store.save_original(path, original, &content)
}

/// Puts back the original of `path`, if one was kept; `false` when there is none.
pub fn restore(store: &Store, path: &str, roots: &[PathBuf]) -> Result<bool, FileError> {
    let as_file = |e: StoreError| match e {
        StoreError::File(f) => f,
        other => FileError::Io {
            op: "restore the original of",
            path: path.into(),
            source: std::io::Error::other(other.to_string()),
        },
    };
    let Some((original, content)) = store.original(path).map_err(as_file)? else {
        return Ok(false);
    };
    let file = ManagedFile {
        path: path.into(),
        mode: original.mode,
        owner: Some(Owner { uid: original.uid, gid: original.gid }),
        content,
    };
    files::write_managed(&file, roots)?;
    tracing::info!(path, "the device's own file is back");
    store.forget_original(path).map_err(as_file)?;
    Ok(true)
}
