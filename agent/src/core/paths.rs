//! Which file paths a bundle may name: the lexical half of the file-safety policy.
//!
//! A managed file's path must be absolute, free of `.`/`..`/empty components and NUL
//! bytes, and lie strictly below one of the device's `allowed_roots`. The other half,
//! symlinks on the real filesystem, is enforced by `files`, which opens every directory
//! below the root without following symlinks.
//!
//! Pure: never touches the filesystem.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {path:?} is not absolute")]
    NotAbsolute { path: String },
    #[error("path {path:?} contains a '.', '..' or empty component")]
    NotNormal { path: String },
    #[error("path {path:?} contains a NUL byte")]
    Nul { path: String },
    #[error("path {path:?} is outside the allowed roots {roots:?} (see allowed_roots in agent.toml)")]
    OutsideRoots { path: String, roots: Vec<PathBuf> },
    /// A symlinked directory below the root, wherever it points: never followed.
    #[error("path {path:?} goes through the symlink {link:?}; the agent never follows a symlinked directory below an allowed root: make it a real directory, or name the real path in the repository")]
    SymlinkEscape { path: String, link: PathBuf },
}

impl PathError {
    /// Stable reason code for status reports.
    pub fn code(&self) -> &'static str {
        match self {
            PathError::SymlinkEscape { .. } => "symlink_escape",
            _ => "path_not_allowed",
        }
    }
}

/// Checks `path` against the roots and returns it as a `PathBuf`.
pub fn check(path: &str, roots: &[PathBuf]) -> Result<PathBuf, PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul { path: path.into() });
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute { path: path.into() });
    }
    // `Path::components` silently drops `.` and repeated `/`; check the raw text too.
    let raw_ok = path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if !raw_ok {
        return Err(PathError::NotNormal { path: path.into() });
    }
    let p = Path::new(path);
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(PathError::NotNormal { path: path.into() });
    }
    if !roots.iter().any(|root| strictly_under(p, root)) {
        return Err(PathError::OutsideRoots { path: path.into(), roots: roots.to_vec() });
    }
    Ok(p.to_path_buf())
}

/// True when `path` lies strictly below `root` (component-wise: `/srv/fleetx` is not
/// below `/srv/fleet`).
pub fn strictly_under(path: &Path, root: &Path) -> bool {
    path != root && path.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Vec<PathBuf> {
        vec![PathBuf::from("/srv/fleet"), PathBuf::from("/etc/fleet")]
    }

    #[test]
    fn allows_paths_below_a_root() {
        assert!(check("/srv/fleet/app/a.conf", &roots()).is_ok());
        assert!(check("/etc/fleet/x", &roots()).is_ok());
    }

    #[test]
    fn refuses_traversal_and_escapes() {
        let cases = [
            ("/etc/passwd", "path_not_allowed"),
            ("/srv/fleet", "path_not_allowed"),
            ("/srv/fleetx/a", "path_not_allowed"),
            ("/srv/fleet/../../etc/passwd", "path_not_allowed"),
            ("/srv/fleet/./a", "path_not_allowed"),
            ("/srv/fleet//a", "path_not_allowed"),
            ("/srv/fleet/a/", "path_not_allowed"),
            ("srv/fleet/a", "path_not_allowed"),
            ("/srv/fleet/a\0b", "path_not_allowed"),
        ];
        for (path, code) in cases {
            let err = check(path, &roots()).expect_err(path);
            assert_eq!(err.code(), code, "{path}: {err}");
        }
        assert!(matches!(check("/srv/fleet/../x", &roots()), Err(PathError::NotNormal { .. })));
        assert!(matches!(check("/etc/passwd", &roots()), Err(PathError::OutsideRoots { .. })));
    }
}
