//! The device's identity: an age X25519 key pair, made on the device and never sent off.
//!
//! `state_dir/identity.age` holds the secret key in the format of `age-keygen` (comment
//! lines, then `AGE-SECRET-KEY-1…`, 0600), so the standard `age` tool can use it as is;
//! the public half, the **recipient** (`age1…`), is what enrollment publishes and what
//! the fleet repository records (`public_key:`), so that secrets can be encrypted to
//! this device only. The **key id** names a key in listings: the first 16 hex digits of
//! the sha256 of the public key.
//!
//! **Rotation** (`fleet-agent identity --rotate`) puts a new key in front of the old ones
//! in the same file (age identity files may hold several keys; `age -d -i` tries each),
//! so that secrets encrypted to either key open during the window in which the fleet
//! repository lists both; `--retire KEYID` removes an old key once the repository no
//! longer uses it. The newest key, first in the file, is the current one: enrollment
//! claims it first. Each key keeps the comment lines written above it, so a rotation or
//! a retirement changes only the lines of the key concerned.
//!
//! The key itself (X25519, the bech32 key strings, the key id) is
//! [`fleet_spec::age::SecretKey`], the same code that decrypts the bundle's secrets;
//! this module adds the file: its blocks of lines, rotation and retirement.

use std::path::{Path, PathBuf};

use fleet_spec::age::SecretKey;

/// The identity's file in the state directory.
pub const FILE: &str = "identity.age";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    File { path: PathBuf, source: crate::files::FileError },
    #[error("cannot get random bytes for a new key: {0}")]
    Random(std::io::Error),
    #[error("{path} does not exist: make the device's key with `fleet-agent identity` first")]
    Missing { path: PathBuf },
    /// `--retire` or `--rotate` refused: nothing was changed.
    #[error("{path}: {reason}; nothing was changed")]
    Refused { path: PathBuf, reason: String },
}

/// Most keys one identity file holds: as many as an enrollment claim lists
/// ([`fleet_spec::messages::MAX_CLAIM_RECIPIENTS`]).
pub const MAX_KEYS: usize = fleet_spec::messages::MAX_CLAIM_RECIPIENTS;

/// An X25519 key pair. The secret never leaves it but through [`Identity::file_text`]
/// and [`Identity::into_key`] (to decrypt with).
pub struct Identity(SecretKey);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("recipient", &self.recipient()).finish_non_exhaustive()
    }
}

impl Identity {
    /// A new key from the system's random source.
    pub fn generate() -> Result<Identity, IdentityError> {
        let mut secret = [0u8; 32];
        let mut filled = 0;
        while filled < secret.len() {
            let n = rustix::rand::getrandom(&mut secret[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(|e| IdentityError::Random(e.into()))?;
            filled += n;
        }
        Ok(Identity(SecretKey::from_bytes(secret)))
    }

    /// Parses an age identity file and returns its newest key (the first): see
    /// [`Identity::parse_all`].
    pub fn parse(text: &str) -> Result<Identity, String> {
        Identity::parse_all(text)?.into_iter().next().ok_or_else(|| "no AGE-SECRET-KEY-1… line".into())
    }

    /// Parses an age identity file: `#` comment lines and blank lines, and one or more
    /// `AGE-SECRET-KEY-1…` lines (upper case, bech32 with its checksum, each key once),
    /// newest first.
    pub fn parse_all(text: &str) -> Result<Vec<Identity>, String> {
        Ok(parse_blocks(text)?.0.into_iter().map(|b| b.identity).collect())
    }

    /// The key, to decrypt what was encrypted to this recipient.
    pub fn into_key(self) -> SecretKey {
        self.0
    }

    /// The public key as an age recipient, `age1…`.
    pub fn recipient(&self) -> String {
        self.0.recipient()
    }

    /// The first 16 hex digits of the sha256 of the public key.
    pub fn key_id(&self) -> String {
        self.0.key_id()
    }

    /// The identity file's content (what `age-keygen` writes).
    fn file_text(&self, created: &str) -> String {
        format!("# created: {created}\n# public key: {}\n{}\n", self.recipient(), self.0.to_key_string())
    }
}

/// The public key of an age recipient (`age1…`, lower case), or why it is not one.
pub fn parse_recipient(recipient: &str) -> Result<[u8; 32], String> {
    fleet_spec::age::parse_recipient(recipient).map_err(|e| e.to_string())
}

/// One key of an identity file with the lines that belong to it: the comment and blank
/// lines above it (age-keygen's `# created:` and `# public key:`), and the key line.
struct Block {
    text: String,
    identity: Identity,
}

/// The keys of an identity file, newest first, each with its lines, and the lines after
/// the last key.
fn parse_blocks(text: &str) -> Result<(Vec<Block>, String), String> {
    let mut blocks: Vec<Block> = Vec::new();
    let mut pending = String::new();
    for (n, raw) in text.lines().enumerate() {
        pending.push_str(raw);
        pending.push('\n');
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let identity = SecretKey::parse(line).map(Identity).map_err(|e| format!("line {}: {e}", n + 1))?;
        if blocks.iter().any(|b| b.identity.0.public_bytes() == identity.0.public_bytes()) {
            return Err(format!("line {}: key {} is in the file twice", n + 1, identity.key_id()));
        }
        blocks.push(Block { text: std::mem::take(&mut pending), identity });
    }
    if blocks.is_empty() {
        return Err("no AGE-SECRET-KEY-1… line".into());
    }
    Ok((blocks, pending))
}

/// Every key of the device's identity in `state_dir`, newest (the current one) first.
/// An absent file is an error ([`IdentityError::Missing`]): `fleet-agent identity`
/// makes it.
pub fn load_all(state_dir: &Path) -> Result<Vec<Identity>, IdentityError> {
    let (path, text) = read(state_dir)?;
    Identity::parse_all(&text).map_err(|reason| IdentityError::Invalid { path, reason })
}

fn read(state_dir: &Path) -> Result<(PathBuf, String), IdentityError> {
    let path = state_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(IdentityError::Missing { path }),
        Err(source) => Err(IdentityError::Io { path, source }),
    }
}

fn write(path: &Path, text: &str) -> Result<(), IdentityError> {
    crate::files::write_atomic(path, text.as_bytes(), 0o600, None)
        .map_err(|source| IdentityError::File { path: path.into(), source })
}

/// `fleet-agent identity --rotate`: makes a new key and writes it in front of the old
/// ones (which stay, byte for byte), atomically, 0600. Returns every key, the new one
/// first. Refused when the file holds [`MAX_KEYS`] keys already.
pub fn rotate(state_dir: &Path, now: i64) -> Result<Vec<Identity>, IdentityError> {
    let (path, text) = read(state_dir)?;
    let (blocks, _) =
        parse_blocks(&text).map_err(|reason| IdentityError::Invalid { path: path.clone(), reason })?;
    if blocks.len() >= MAX_KEYS {
        return Err(IdentityError::Refused {
            path,
            reason: format!(
                "it holds {MAX_KEYS} keys already: retire an old one first (fleet-agent identity --retire KEYID)"
            ),
        });
    }
    let new = Identity::generate()?;
    let mut out = new.file_text(&crate::report::rfc3339(now));
    out.push_str(&text);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    write(&path, &out)?;
    let mut all = vec![new];
    all.extend(blocks.into_iter().map(|b| b.identity));
    Ok(all)
}

/// `fleet-agent identity --retire KEYID`: removes an old key (with the comment lines
/// above it) and writes the file atomically, 0600. The newest key, the current one, is
/// never removed. Returns the keys that remain.
pub fn retire(state_dir: &Path, key_id: &str) -> Result<Vec<Identity>, IdentityError> {
    let (path, text) = read(state_dir)?;
    let (blocks, trailing) =
        parse_blocks(&text).map_err(|reason| IdentityError::Invalid { path: path.clone(), reason })?;
    let wanted = key_id.to_ascii_lowercase();
    let refused = |reason: String| IdentityError::Refused { path: path.clone(), reason };
    let Some(index) = blocks.iter().position(|b| b.identity.key_id() == wanted) else {
        let ids: Vec<String> = blocks.iter().map(|b| b.identity.key_id()).collect();
        return Err(refused(format!("no key has the id {key_id:?} (the keys: {})", ids.join(", "))));
    };
    if index == 0 {
        return Err(refused(format!(
            "{wanted} is the current key{}: a device keeps its newest key (rotate first, \
             fleet-agent identity --rotate, to replace it)",
            if blocks.len() == 1 { " and the only one" } else { "" }
        )));
    }
    let mut out = String::new();
    let mut kept = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        if i != index {
            out.push_str(&block.text);
            kept.push(block.identity);
        }
    }
    out.push_str(&trailing);
    write(&path, &out)?;
    Ok(kept)
}

/// The device's identity in `state_dir`, made (and stored, 0600) on first use. Returns
/// its newest key and whether it was made now.
pub fn load_or_create(state_dir: &Path, now: i64) -> Result<(Identity, bool), IdentityError> {
    let path = state_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let identity = Identity::parse(&text)
                .map_err(|reason| IdentityError::Invalid { path: path.clone(), reason })?;
            Ok((identity, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir)
                .map_err(|source| IdentityError::Io { path: state_dir.into(), source })?;
            let identity = Identity::generate()?;
            let created = crate::report::rfc3339(now);
            crate::files::write_atomic(&path, identity.file_text(&created).as_bytes(), 0o600, None)
                .map_err(|source| IdentityError::File { path: path.clone(), source })?;
            Ok((identity, true))
        }
        Err(source) => Err(IdentityError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_identity_reads_back_and_its_recipient_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (made, new) = load_or_create(dir.path(), 1_800_000_000).expect("made");
        assert!(new);
        let (read, new) = load_or_create(dir.path(), 1_800_000_000).expect("read");
        assert!(!new);
        assert_eq!(made.recipient(), read.recipient());
        assert!(made.recipient().starts_with("age1") && made.recipient().len() == 62, "{}", made.recipient());
        assert_eq!(parse_recipient(&made.recipient()), Ok(*made.0.public_bytes()));
        assert_eq!(made.key_id().len(), 16);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(dir.path().join(FILE)).expect("read");
        assert!(text.contains(&format!("# public key: {}\n", made.recipient())), "{text}");
        assert!(format!("{made:?}").contains("age1") && !format!("{made:?}").contains("SECRET"));
    }

    #[test]
    fn hostile_identity_files_and_recipients_are_refused() {
        use bech32::{Bech32, Hrp};
        let good = Identity(SecretKey::from_bytes([7; 32]));
        let line = good.0.to_key_string();
        let secret_hrp = Hrp::parse("AGE-SECRET-KEY-").expect("hrp");
        assert!(Identity::parse(&format!("# c\n\n{line}\n")).is_ok());
        let mut flipped = line.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'Q' { b'P' } else { b'Q' };
        let bad = [
            String::new(),
            "# only comments\n".into(),
            format!("{line}\n{line}\n"),
            line.to_ascii_lowercase(),
            String::from_utf8(flipped).expect("ascii"),
            bech32::encode_upper::<Bech32>(Hrp::parse("AGE-PLUGIN-YUBIKEY-").expect("hrp"), &[1; 32])
                .expect("enc"),
            bech32::encode_upper::<Bech32>(secret_hrp, &[1; 16]).expect("enc"),
            bech32::encode_upper::<bech32::Bech32m>(secret_hrp, &[1; 32]).expect("enc"),
        ];
        for text in bad {
            assert!(Identity::parse(&text).is_err(), "{text:?}");
        }
        let recipient = good.recipient();
        assert!(parse_recipient(&recipient).is_ok());
        for bad in [
            recipient.to_ascii_uppercase(),
            recipient.replace("age1", "agf1"),
            format!("{recipient}q"),
            "age1".into(),
        ] {
            assert!(parse_recipient(&bad).is_err(), "{bad}");
        }
    }

    /// The standard `age` tool (Debian's package) reads our identity file and encrypts
    /// to our recipient; `age-keygen`'s keys read here with the same recipient.
    #[test]
    fn the_real_age_tool_agrees() {
        let have = |p: &str| std::process::Command::new(p).arg("--version").output().is_ok();
        if !have("age") || !have("age-keygen") {
            assert!(std::env::var_os("CI").is_none(), "age is not installed: run scripts/setup.sh");
            eprintln!("SKIPPED: age is not installed (apt-get install age)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (identity, _) = load_or_create(dir.path(), 1_800_000_000).expect("made");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"a secret for this device\n").expect("write");
        let sealed = dir.path().join("sealed.age");
        let run = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("run");
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        };
        let r = identity.recipient();
        run(&[
            "age".as_ref(),
            "-r".as_ref(),
            r.as_ref(),
            "-o".as_ref(),
            sealed.as_os_str(),
            plain.as_os_str(),
        ]);
        let key = dir.path().join(FILE);
        let opened =
            run(&["age".as_ref(), "-d".as_ref(), "-i".as_ref(), key.as_os_str(), sealed.as_os_str()]);
        assert_eq!(opened, b"a secret for this device\n");

        let theirs = dir.path().join("theirs.key");
        run(&["age-keygen".as_ref(), "-o".as_ref(), theirs.as_os_str()]);
        let public = run(&["age-keygen".as_ref(), "-y".as_ref(), theirs.as_os_str()]);
        let parsed =
            Identity::parse(&std::fs::read_to_string(&theirs).expect("read")).expect("age-keygen's file");
        assert_eq!(parsed.recipient(), String::from_utf8(public).expect("utf-8").trim());
    }

    #[test]
    fn an_identity_file_holds_several_keys_newest_first() {
        let (a, b) = (Identity(SecretKey::from_bytes([1; 32])), Identity(SecretKey::from_bytes([2; 32])));
        let text = format!("{}\n# an older key\n{}", a.file_text("now"), b.file_text("before"));
        let all = Identity::parse_all(&text).expect("two keys");
        assert_eq!(all.iter().map(Identity::recipient).collect::<Vec<_>>(), [a.recipient(), b.recipient()]);
        assert_eq!(Identity::parse(&text).expect("newest").recipient(), a.recipient());
        assert_eq!(all[1].0.secret_bytes(), &[2; 32]);
        let e = Identity::parse_all(&format!("{text}{}", a.file_text("again"))).expect_err("twice");
        assert!(e.contains("line 11") && e.contains("twice"), "{e}");
        let e = Identity::parse_all(&format!("{text}AGE-SECRET-KEY-1QQQ\n")).expect_err("bad line");
        assert!(e.starts_with("line 9: "), "{e}");
    }

    #[test]
    fn rotate_puts_a_new_key_first_and_retire_removes_an_old_one_with_its_comments() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load_all(dir.path()), Err(IdentityError::Missing { .. })));
        assert!(matches!(rotate(dir.path(), 1), Err(IdentityError::Missing { .. })));
        let (first, _) = load_or_create(dir.path(), 1_800_000_000).expect("made");
        let before = std::fs::read_to_string(dir.path().join(FILE)).expect("read");
        let all = rotate(dir.path(), 1_800_000_100).expect("rotated");
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].recipient(), first.recipient());
        let after = std::fs::read_to_string(dir.path().join(FILE)).expect("read");
        assert!(after.ends_with(&before), "the old key's lines stay as they were:\n{after}");
        assert!(
            after.starts_with(&format!(
                "# created: {}\n# public key: {}\n",
                crate::report::rfc3339(1_800_000_100),
                all[0].recipient()
            )),
            "{after}"
        );
        let loaded = load_all(dir.path()).expect("load");
        assert_eq!(
            loaded.iter().map(Identity::key_id).collect::<Vec<_>>(),
            all.iter().map(Identity::key_id).collect::<Vec<_>>()
        );
        let (current, made) = load_or_create(dir.path(), 0).expect("read");
        assert!(!made);
        assert_eq!(current.recipient(), all[0].recipient());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // The current key is never retired; an unknown id names the keys there are.
        let e = retire(dir.path(), &all[0].key_id()).expect_err("current");
        assert!(e.to_string().contains("is the current key"), "{e}");
        let e = retire(dir.path(), "0000000000000000").expect_err("unknown");
        assert!(e.to_string().contains(&all[1].key_id()), "{e}");
        assert_eq!(std::fs::read_to_string(dir.path().join(FILE)).expect("read"), after);

        let kept = retire(dir.path(), &all[1].key_id().to_uppercase()).expect("retired");
        assert_eq!(kept.len(), 1);
        let text = std::fs::read_to_string(dir.path().join(FILE)).expect("read");
        assert_eq!(text, after.strip_suffix(&before).expect("prefix"), "only the new key's lines are left");
        let e = retire(dir.path(), &kept[0].key_id()).expect_err("last");
        assert!(e.to_string().contains("the only one"), "{e}");

        for _ in 1..MAX_KEYS {
            rotate(dir.path(), 2).expect("rotate");
        }
        let e = rotate(dir.path(), 3).expect_err("full");
        assert!(e.to_string().contains("--retire"), "{e}");
    }

    /// A rotated identity file opens, with the real `age -d -i`, what was encrypted to
    /// either of its recipients; after `--retire`, only what was encrypted to the new one.
    #[test]
    fn the_real_age_tool_reads_a_rotated_identity_file() {
        let have = |p: &str| std::process::Command::new(p).arg("--version").output().is_ok();
        if !have("age") {
            assert!(std::env::var_os("CI").is_none(), "age is not installed: run scripts/setup.sh");
            eprintln!("SKIPPED: age is not installed (apt-get install age)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, _) = load_or_create(dir.path(), 1_800_000_000).expect("made");
        let new = rotate(dir.path(), 1_800_000_100).expect("rotated").remove(0);
        let key = dir.path().join(FILE);
        let age = |args: &[&str], input: &[u8]| {
            use std::io::Write;
            let mut child = std::process::Command::new("age")
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("age runs");
            child.stdin.take().expect("stdin").write_all(input).expect("write");
            child.wait_with_output().expect("age ends")
        };
        let seal = |recipient: &str, plain: &[u8]| {
            let out = age(&["-r", recipient], plain);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        };
        let key_arg = key.to_str().expect("utf-8 path");
        let to_old = seal(&old.recipient(), b"for the old key");
        let to_new = seal(&new.recipient(), b"for the new key");
        for (sealed, plain) in [(&to_old, &b"for the old key"[..]), (&to_new, b"for the new key")] {
            let out = age(&["-d", "-i", key_arg], sealed);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.stdout, plain);
        }
        retire(dir.path(), &old.key_id()).expect("retired");
        assert!(!age(&["-d", "-i", key_arg], &to_old).status.success(), "the retired key is gone");
        assert_eq!(age(&["-d", "-i", key_arg], &to_new).stdout, b"for the new key");
    }
}
