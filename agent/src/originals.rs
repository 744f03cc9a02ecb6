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

use std::path::PathBuf;

use fleet_spec::model::{ManagedFile, Owner};
use sha2::{Digest, Sha256};

use crate::files::{self, FileError};
use crate::store::{Original, Store, StoreError};

/// Larger originals are not kept (and the takeover is refused): the state directory is
/// not a backup store, and the copy is made in memory.
pub const MAX_ORIGINAL: u64 = 16 << 20;

/// Keeps the file at managed path `path`, if it is a regular file and none is kept yet.
pub fn keep(store: &Store, path: &str, roots: &[PathBuf]) -> Result<(), StoreError> {
    if store.original(path)?.is_some() {
        return Ok(());
    }
    let Some(existing) = files::read_existing(path, roots, MAX_ORIGINAL)? else {
        return Ok(());
    };
    let original = Original {
        mode: existing.mode,
        uid: existing.uid,
        gid: existing.gid,
        sha256: hex::encode(Sha256::digest(&existing.content)),
    };
    tracing::info!(path, "keeping the device's own file before a bundle replaces it");
    store.save_original(path, original, &existing.content)
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
