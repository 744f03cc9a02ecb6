//! Git LFS: files committed as LFS pointers are delivered as their real content.
//!
//! A file tracked with Git LFS is committed as a small pointer (spec v1:
//! `version https://git-lfs.github.com/spec/v1`, `oid sha256:<hex>`, `size <n>`), and its
//! bytes live in the repository's local LFS store, `<git dir>/lfs/objects/<aa>/<bb>/<oid>`
//! (or under `lfs.storage`), where `git lfs pull` (or a CI checkout with LFS enabled) put
//! them. [`resolve`] swaps a pointer for those bytes, checked against the pointer's sha256
//! and size (a damaged object is an error). A pointer whose object is missing, or that
//! is malformed, is left as it is: loading reports it as a problem of that file, with
//! what to do ([`crate::render`]), so a pointer is never shipped as a file's content.
//!
//! Which files are LFS files is decided by their content, not by `.gitattributes`: a
//! blob that starts with the spec's `version` line is a pointer (and must be a valid one);
//! nothing else is. The `git-lfs` program is not needed to build, only its store.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Pointer files are at most this long (the spec says "< 1024 bytes").
const MAX_POINTER_LEN: usize = 1024;
const VERSION_LINES: [&[u8]; 2] =
    [b"version https://git-lfs.github.com/spec/v1\n", b"version https://hawser.github.com/spec/v1\n"];

/// What a pointer names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    /// Lower-case hex sha256 of the content.
    pub oid: String,
    pub size: u64,
}

/// A damaged object in the LFS store: the environment's problem, not the commit's.
#[derive(Debug, thiserror::Error)]
pub enum LfsError {
    #[error("{path}: the Git LFS object {object} is damaged ({reason}): delete it and fetch it again (`git lfs pull`)")]
    Damaged { path: String, object: PathBuf, reason: String },
    #[error("{path}: cannot read the Git LFS object {object}: {source}")]
    Io { path: String, object: PathBuf, source: std::io::Error },
}

/// Whether `blob` begins like an LFS pointer (either spec version line, and under the
/// spec's size), valid or not: what must never be delivered as content.
pub fn looks_like_pointer(blob: &[u8]) -> bool {
    blob.len() < MAX_POINTER_LEN && VERSION_LINES.iter().any(|v| blob.starts_with(&v[..v.len() - 1]))
}

/// Parses `blob` as an LFS pointer: `None` when it is not one (it does not start with
/// the spec's `version` line), an error when it starts like one but is not valid.
pub fn parse(blob: &[u8]) -> Result<Option<Pointer>, &'static str> {
    if !VERSION_LINES.iter().any(|v| blob.starts_with(v)) {
        return Ok(None);
    }
    if blob.len() >= MAX_POINTER_LEN {
        return Err("over 1023 bytes");
    }
    let text = std::str::from_utf8(blob).map_err(|_| "not UTF-8")?;
    let body = text.strip_suffix('\n').ok_or("no final newline")?;
    let (mut oid, mut size) = (None, None);
    let mut previous_key = "";
    for line in body.lines().skip(1) {
        let (key, value) = line.split_once(' ').ok_or("a line without a value")?;
        let key_ok =
            !key.is_empty() && key.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'));
        if !key_ok || key <= previous_key {
            return Err("keys not in sorted order, repeated or malformed");
        }
        previous_key = key;
        match key {
            "oid" => {
                let hex = value.strip_prefix("sha256:").ok_or("the oid is not sha256")?;
                if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err("the oid is not 64 lower-case hex digits");
                }
                oid = Some(hex.to_string());
            }
            "size" => {
                let digits_ok = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                size =
                    Some(value.parse::<u64>().ok().filter(|_| digits_ok).ok_or("the size is not a number")?);
            }
            // Extension keys (`ext-0-…`) name smudge filters this reader does not run.
            _ if key.starts_with("ext-") => return Err("it uses an LFS extension, which is not supported"),
            _ => {}
        }
    }
    match (oid, size) {
        (Some(oid), Some(size)) => Ok(Some(Pointer { oid, size })),
        _ => Err("no oid or no size"),
    }
}

/// The local LFS object store of the repository whose Git directory (common dir, for
/// linked work trees) is `git_dir`: `lfs.storage` when set (relative to `git_dir`),
/// else `<git_dir>/lfs`; objects are in its `objects/` directory.
pub fn store(git_dir: &Path, lfs_storage: Option<&str>) -> PathBuf {
    match lfs_storage.filter(|s| !s.is_empty()) {
        Some(s) => git_dir.join(s).join("objects"),
        None => git_dir.join("lfs").join("objects"),
    }
}

/// A file's content as delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The bytes: the LFS object, or the blob itself (not a pointer; or a pointer that
    /// is malformed or whose object is missing, which loading reports).
    Content(Vec<u8>),
    /// An LFS object over the size limit, not read: its size from the pointer.
    TooLarge(u64),
}

/// `blob`, the content of `path`, as delivered: the object it points to when it is an
/// LFS pointer whose object is in `store` (checked against the pointer), else `blob`.
pub fn resolve(path: &str, blob: Vec<u8>, store: &Path, max_size: u64) -> Result<Resolved, LfsError> {
    let Ok(Some(pointer)) = parse(&blob) else { return Ok(Resolved::Content(blob)) };
    if pointer.size > max_size {
        return Ok(Resolved::TooLarge(pointer.size));
    }
    let object = store.join(&pointer.oid[..2]).join(&pointer.oid[2..4]).join(&pointer.oid);
    let bytes = match std::fs::read(&object) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Resolved::Content(blob)),
        Err(source) => return Err(LfsError::Io { path: path.into(), object, source }),
    };
    let damaged = |reason| LfsError::Damaged { path: path.into(), object: object.clone(), reason };
    if bytes.len() as u64 != pointer.size {
        return Err(damaged(format!("{} bytes, the pointer says {}", bytes.len(), pointer.size)));
    }
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != pointer.oid {
        return Err(damaged(format!("its sha256 is {digest}")));
    }
    Ok(Resolved::Content(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OID: &str = "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393";

    fn pointer(lines: &str) -> Vec<u8> {
        format!("version https://git-lfs.github.com/spec/v1\n{lines}").into_bytes()
    }

    #[test]
    fn a_pointer_is_parsed_and_anything_else_is_content() {
        let p = parse(&pointer(&format!("oid sha256:{OID}\nsize 12345\n"))).expect("valid");
        assert_eq!(p, Some(Pointer { oid: OID.into(), size: 12345 }));
        assert_eq!(parse(b"hello\n"), Ok(None));
        // Either spec version line marks a pointer that must never become content.
        assert!(looks_like_pointer(b"version https://hawser.github.com/spec/v1\noid sha256:x\n"));
        assert!(looks_like_pointer(b"version https://git-lfs.github.com/spec/v1\r\n"));
        assert!(!looks_like_pointer(b"hello\n") && !looks_like_pointer(&[b'v'; 2000]));
        assert_eq!(parse(b""), Ok(None));
        // The version line must start the file: a README quoting a pointer is content.
        assert_eq!(
            parse(format!("x\n{}", String::from_utf8_lossy(&pointer("size 1\n"))).as_bytes()),
            Ok(None)
        );
        // Unknown (non-extension) keys in order are allowed by the spec.
        assert!(parse(&pointer(&format!("foo bar\noid sha256:{OID}\nsize 1\n"))).expect("valid").is_some());
    }

    #[test]
    fn hostile_pointers_are_refused_not_shipped() {
        let bad = [
            pointer(&format!("oid sha256:{OID}\nsize 12")), // no final newline
            pointer(&format!("size 12\noid sha256:{OID}\n")), // not sorted
            pointer(&format!("oid sha256:{OID}\noid sha256:{OID}\nsize 1\n")), // repeated
            pointer("oid sha256:../../../../etc/passwd\nsize 1\n"), // path in the oid
            pointer(&format!("oid sha256:{}\nsize 1\n", OID.to_uppercase())),
            pointer(&format!("oid sha1:{}\nsize 1\n", &OID[..40])),
            pointer(&format!("oid sha256:{OID}\nsize -1\n")),
            pointer(&format!("oid sha256:{OID}\nsize +1\n")),
            pointer(&format!("oid sha256:{OID}\nsize 99999999999999999999999\n")),
            pointer(&format!("oid sha256:{OID}\n")), // no size
            pointer("size 1\n"),                     // no oid
            pointer(&format!("ext-0-foo sha256:{OID}\noid sha256:{OID}\nsize 1\n")),
            pointer(&format!("oid sha256:{OID}\nsize 1\n{}\n", "x y\n".repeat(300))), // too long
            pointer(&format!("oid sha256:{OID}\nsize 1\n\u{0}\n")),
            [pointer("oid sha256:"), vec![0xff], b"\nsize 1\n".to_vec()].concat(),
        ];
        for blob in bad {
            assert!(parse(&blob).is_err(), "{:?}", String::from_utf8_lossy(&blob));
        }
    }

    #[test]
    fn objects_are_read_and_checked_and_missing_ones_left_for_loading_to_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), None);
        let content = b"model weights".to_vec();
        let oid = hex::encode(Sha256::digest(&content));
        let blob = pointer(&format!("oid sha256:{oid}\nsize {}\n", content.len()));

        // Missing: the pointer is left as it is, for loading to report.
        assert_eq!(
            resolve("m.bin", blob.clone(), &store, 1 << 20).expect("ok"),
            Resolved::Content(blob.clone())
        );
        let malformed = pointer("size 1\n");
        assert_eq!(
            resolve("m.bin", malformed.clone(), &store, 1 << 20).expect("ok"),
            Resolved::Content(malformed)
        );

        let object = store.join(&oid[..2]).join(&oid[2..4]).join(&oid);
        std::fs::create_dir_all(object.parent().expect("parent")).expect("mkdir");
        std::fs::write(&object, &content).expect("write");
        assert_eq!(
            resolve("m.bin", blob.clone(), &store, 1 << 20).expect("ok"),
            Resolved::Content(content.clone())
        );
        // Over the size limit: not read, reported with the pointer's size.
        assert_eq!(
            resolve("m.bin", blob.clone(), &store, 3).expect("ok"),
            Resolved::TooLarge(content.len() as u64)
        );
        // Plain content passes through untouched.
        assert_eq!(
            resolve("m.bin", b"plain".to_vec(), &store, 1 << 20).expect("ok"),
            Resolved::Content(b"plain".to_vec())
        );

        // A damaged object: other bytes of the same length, then another length.
        std::fs::write(&object, b"model weightZ").expect("write");
        assert!(matches!(resolve("m.bin", blob.clone(), &store, 1 << 20), Err(LfsError::Damaged { .. })));
        std::fs::write(&object, b"short").expect("write");
        assert!(matches!(resolve("m.bin", blob, &store, 1 << 20), Err(LfsError::Damaged { .. })));
    }

    #[test]
    fn the_store_follows_lfs_storage() {
        let git = Path::new("/r/.git");
        assert_eq!(store(git, None), Path::new("/r/.git/lfs/objects"));
        assert_eq!(store(git, Some("")), Path::new("/r/.git/lfs/objects"));
        assert_eq!(store(git, Some("/big/lfs")), Path::new("/big/lfs/objects"));
        assert_eq!(store(git, Some("lfs-elsewhere")), Path::new("/r/.git/lfs-elsewhere/objects"));
    }
}
