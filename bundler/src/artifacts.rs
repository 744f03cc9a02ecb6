//! Which managed files travel as artifacts (bundle format 5): named in the signed state
//! by sha256 and size, their bytes a blob `blobs/<sha256>` beside the bundles.
//!
//! A device decompresses its bundle in memory, so the bundle must stay small whatever
//! the payload; an artifact is streamed to disk and hashed on the way, and a device that
//! holds the bytes already downloads nothing. Two rules move inline files out of
//! [`DesiredState::files`]:
//!
//! 1. every file larger than the threshold (`build --artifact-threshold`, 256 KiB);
//! 2. then, while the inline files still total more than the inline budget
//!    (`--inline-budget`, 1 MiB), the largest remaining one (ties: the smaller path).
//!
//! Secret files are never moved: they stay in the sealed trailer (`DesiredState::secrets`),
//! since a blob is readable by anyone who can fetch it.
//!
//! Pure: no I/O. `build` writes the returned bytes as blobs; `plan` splits the same way
//! so it names what will travel as an artifact.

use fleet_spec::model::Artifact;
use fleet_spec::DesiredState;
use sha2::{Digest, Sha256};

/// Default of `--artifact-threshold`.
pub const DEFAULT_THRESHOLD: u64 = 256 << 10;
/// Default of `--inline-budget`.
pub const DEFAULT_INLINE_BUDGET: u64 = 1 << 20;

/// Where the line between inline files and artifacts is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A file larger than this (bytes) is an artifact.
    pub threshold: u64,
    /// The inline files of a state total at most this (bytes) after the split.
    pub inline_budget: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { threshold: DEFAULT_THRESHOLD, inline_budget: DEFAULT_INLINE_BUDGET }
    }
}

/// An artifact's bytes, to be written as `blobs/<sha256>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub sha256: [u8; 32],
    pub bytes: Vec<u8>,
}

impl Blob {
    /// `blobs/<this>`.
    pub fn name(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Moves the files of `state` that the policy names into `state.artifacts` and returns
/// their bytes, one [`Blob`] per moved file in path order (the same content twice gives
/// two equal blobs). The result does not depend on the order of `state.files`; call
/// [`DesiredState::canonicalize`] afterwards.
pub fn split(state: &mut DesiredState, policy: &Policy) -> Vec<Blob> {
    let files = std::mem::take(&mut state.files);
    let (mut moved, mut inline): (Vec<_>, Vec<_>) =
        files.into_iter().partition(|f| f.content.len() as u64 > policy.threshold);
    let mut total: u64 = inline.iter().map(|f| f.content.len() as u64).sum();
    if total > policy.inline_budget {
        // Largest first; among equals the smaller path, so the split is deterministic.
        inline.sort_by(|a, b| b.content.len().cmp(&a.content.len()).then_with(|| a.path.cmp(&b.path)));
        let mut rest = inline.into_iter();
        for f in rest.by_ref() {
            total -= f.content.len() as u64;
            moved.push(f);
            if total <= policy.inline_budget {
                break;
            }
        }
        inline = rest.collect();
    }
    state.files = inline;
    moved.sort_by(|a, b| a.path.cmp(&b.path));
    let mut blobs = Vec::with_capacity(moved.len());
    for f in moved {
        let sha256: [u8; 32] = Sha256::digest(&f.content).into();
        state.artifacts.push(Artifact {
            path: f.path,
            mode: f.mode,
            owner: f.owner,
            sha256,
            size: f.content.len() as u64,
        });
        blobs.push(Blob { sha256, bytes: f.content });
    }
    blobs
}

/// `200.0 MiB`, `12.0 KiB`, `512 bytes`: a size for a line of text.
pub fn short_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use fleet_spec::model::ManagedFile;

    use super::*;

    fn file(path: &str, len: usize) -> ManagedFile {
        ManagedFile { path: path.into(), mode: 0o644, owner: None, content: vec![b'x'; len] }
    }

    fn paths(state: &DesiredState) -> (Vec<&str>, Vec<&str>) {
        (
            state.files.iter().map(|f| f.path.as_str()).collect(),
            state.artifacts.iter().map(|a| a.path.as_str()).collect(),
        )
    }

    #[test]
    fn files_above_the_threshold_move_and_carry_their_digest_and_size() {
        let policy = Policy { threshold: 100, inline_budget: 1000 };
        let mut state = DesiredState { files: vec![file("/b", 101), file("/a", 100)], ..Default::default() };
        let blobs = split(&mut state, &policy);
        assert_eq!(paths(&state), (vec!["/a"], vec!["/b"]), "exactly at the threshold stays inline");
        let a = &state.artifacts[0];
        assert_eq!(a.size, 101);
        assert_eq!(a.sha256, <[u8; 32]>::from(Sha256::digest(vec![b'x'; 101])));
        assert_eq!(blobs, vec![Blob { sha256: a.sha256, bytes: vec![b'x'; 101] }]);
        state.canonicalize();
        assert_eq!(state.format(), 5);
    }

    #[test]
    fn the_budget_moves_the_largest_remaining_files_until_it_holds() {
        let policy = Policy { threshold: 100, inline_budget: 150 };
        let files =
            vec![file("/small", 10), file("/c", 90), file("/b", 90), file("/d", 60), file("/big", 500)];
        let mut state = DesiredState { files: files.clone(), ..Default::default() };
        split(&mut state, &policy);
        // 250 inline after /big: /b (the smaller path of the two largest) leaves, 160 > 150: /c too.
        let (mut inline, moved) = paths(&state);
        inline.sort();
        assert_eq!((inline, moved), (vec!["/d", "/small"], vec!["/b", "/big", "/c"]));

        let mut reversed = DesiredState { files: files.into_iter().rev().collect(), ..Default::default() };
        split(&mut reversed, &policy);
        reversed.canonicalize();
        state.canonicalize();
        assert_eq!(reversed, state, "independent of the files' order");
    }

    #[test]
    fn nothing_moves_under_both_limits_and_secrets_never_move() {
        let mut state = DesiredState { files: vec![file("/a", 10)], ..Default::default() };
        state.secrets.files.push(file("/secret", 10 << 20));
        assert!(split(&mut state, &Policy::default()).is_empty());
        assert!(state.artifacts.is_empty());
        assert_eq!(state.secrets.files.len(), 1);
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(short_size(200 << 20), "200.0 MiB");
        assert_eq!(short_size(1536), "1.5 KiB");
        assert_eq!(short_size(512), "512 bytes");
    }
}
