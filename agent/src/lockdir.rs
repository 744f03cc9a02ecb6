//! The apps' update lock: while any entry exists in the lock directory, applies wait
//! (bounded by the maximum deferral; see `core::gate`).
//!
//! Apps write in this directory (bind-mounted into their containers), so what is in it
//! is hostile input: a symlink, a FIFO, a subdirectory, millions of entries. Nothing in
//! it is ever opened, followed or stat'ed: one `readdir` batch says whether it holds an
//! entry, which is all that is asked. The directory itself is the device's own (its
//! path comes from `agent.toml`); it is refused when it is a symlink.

use std::io;
use std::path::Path;

/// Whether the lock directory holds any entry (`.`/`..` aside). A missing directory
/// holds no lock. Any error is returned for the caller to log; it then reads as "no
/// lock": a broken lock directory must not hold updates forever.
pub fn held(dir: &Path) -> io::Result<Option<String>> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory (a symlink is not followed)",
            dir.display()
        )));
    }
    let mut entries = std::fs::read_dir(dir)?;
    match entries.next() {
        None => Ok(None),
        Some(entry) => Ok(Some(entry?.file_name().to_string_lossy().into_owned())),
    }
}

/// Creates the lock directory (mode 0755; owner: the agent's user) when it is missing.
pub fn create(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_missing_holds_nothing_and_any_entry_holds() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("locks");
        assert_eq!(held(&dir).expect("missing is fine"), None);
        create(&dir).expect("create");
        assert_eq!(held(&dir).expect("empty"), None);
        std::fs::write(dir.join("updates.lock"), b"").expect("lock");
        assert_eq!(held(&dir).expect("held").as_deref(), Some("updates.lock"));
        std::fs::remove_file(dir.join("updates.lock")).expect("unlock");
        assert_eq!(held(&dir).expect("released"), None);
    }

    #[test]
    fn hostile_entries_hold_without_being_opened_or_followed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("locks");
        create(&dir).expect("create");
        // A FIFO nobody writes to: opening it would block forever.
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(status.success());
        assert!(held(&dir).expect("a FIFO").is_some());
        std::fs::remove_file(&fifo).expect("rm fifo");
        // A dangling symlink and one pointing at /dev/zero.
        std::os::unix::fs::symlink("/nonexistent", dir.join("dangling")).expect("symlink");
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).expect("symlink");
        assert!(held(&dir).expect("symlinks").is_some());
        for n in ["dangling", "zero"] {
            std::fs::remove_file(dir.join(n)).expect("rm");
        }
        // A directory instead of a file, with content.
        std::fs::create_dir_all(dir.join("sub/deeper")).expect("dir");
        assert!(held(&dir).expect("a directory").is_some());
        std::fs::remove_dir_all(dir.join("sub")).expect("rm dir");
        // Many entries: one readdir batch answers.
        for i in 0..20_000 {
            std::fs::write(dir.join(format!("l{i}")), b"").expect("lock");
        }
        let started = std::time::Instant::now();
        assert!(held(&dir).expect("many").is_some());
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }

    #[test]
    fn a_lock_dir_that_is_a_symlink_or_a_file_is_an_error_not_a_lock() {
        let tmp = tempfile::tempdir().expect("tmp");
        let real = tmp.path().join("real");
        create(&real).expect("create");
        std::fs::write(real.join("x"), b"").expect("lock");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(held(&link).is_err());
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").expect("file");
        assert!(held(&file).is_err());
    }
}
