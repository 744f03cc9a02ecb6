//! Free disk space, checked before artifacts are downloaded or written: a device that
//! fills its disk halfway through a 200 MB download or copy is worse off than one that
//! waits. Sizes come from the signed state; free space from `statvfs` (what an
//! unprivileged writer may use, `f_bavail`), less a configurable reserve
//! (`fetch.disk_reserve_bytes`) kept for logs, the journal and the engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Not enough room on one filesystem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{needed} bytes ({needed_mib} MiB) must land on the filesystem of {at}, which has {free} bytes ({free_mib} MiB) free beyond the reserve of {reserve} bytes (fetch.disk_reserve_bytes); free space there, and the bundle is tried again")]
pub struct Insufficient {
    pub at: PathBuf,
    pub needed: u64,
    pub needed_mib: u64,
    pub free: u64,
    pub free_mib: u64,
    pub reserve: u64,
}

/// Checks that every filesystem can take what lands on it: `needs` are (a path where
/// bytes will be written, how many); paths on one filesystem add up. A path that does
/// not exist yet is judged by its nearest existing ancestor.
pub fn check(needs: &[(PathBuf, u64)], reserve: u64) -> Result<(), Insufficient> {
    // Filesystem id → (first path named, bytes, bytes available).
    let mut per_fs: BTreeMap<u64, (PathBuf, u64, u64)> = BTreeMap::new();
    for (at, bytes) in needs.iter().filter(|(_, b)| *b > 0) {
        let Some((fsid, avail)) = available(at) else {
            // Unknown (no ancestor can be inspected): the write itself will say why.
            continue;
        };
        per_fs.entry(fsid).or_insert_with(|| (at.clone(), 0, avail)).1 += bytes;
    }
    for (at, needed, avail) in per_fs.into_values() {
        let free = avail.saturating_sub(reserve);
        if needed > free {
            return Err(Insufficient {
                at,
                needed,
                needed_mib: needed.div_ceil(1 << 20),
                free,
                free_mib: free >> 20,
                reserve,
            });
        }
    }
    Ok(())
}

/// The filesystem id and the bytes available to unprivileged writers at `path` (or its
/// nearest existing ancestor).
fn available(path: &Path) -> Option<(u64, u64)> {
    let mut at = Some(path);
    while let Some(p) = at {
        if let Ok(st) = rustix::fs::statvfs(p) {
            return Some((st.f_fsid, st.f_bavail.saturating_mul(st.f_frsize)));
        }
        at = p.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_on_one_filesystem_add_up_and_the_reserve_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, avail) = available(dir.path()).expect("statvfs");
        let a = dir.path().join("a");
        let b = dir.path().join("not/yet/b");
        assert_eq!(check(&[(a.clone(), 1), (b.clone(), 1)], 0), Ok(()));
        let half = avail / 2 + 1;
        let e = check(&[(a.clone(), half), (b, half)], 0).expect_err("together they do not fit");
        assert_eq!(e.needed, 2 * half);
        assert!(e.to_string().contains("fetch.disk_reserve_bytes"), "{e}");
        let e = check(&[(a, 1)], avail).expect_err("the reserve is kept");
        assert_eq!(e.free, 0);
    }
}
