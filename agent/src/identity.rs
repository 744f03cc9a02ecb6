//! The device's identity: an age X25519 key pair, made on the device and never sent off.
//!
//! `state_dir/identity.age` holds the secret key in the format of `age-keygen` (comment
//! lines, then `AGE-SECRET-KEY-1…`, 0600), so the standard `age` tool can use it as is;
//! the public half, the **recipient** (`age1…`), is what enrollment publishes and what
//! the fleet repository records (`public_key:`), so that secrets can be encrypted to
//! this device only. The **key id** names a key in listings: the first 16 hex digits of
//! the sha256 of the public key.
//!
//! X25519 comes from curve25519-dalek, which the agent links already (ed25519-dalek);
//! the encoding is bech32 (BIP 173, as age specifies), from the `bech32` crate.

use std::path::{Path, PathBuf};

use bech32::primitives::decode::CheckedHrpstring;
use bech32::{Bech32, Hrp};
use curve25519_dalek::montgomery::MontgomeryPoint;
use sha2::{Digest, Sha256};

/// The identity's file in the state directory.
pub const FILE: &str = "identity.age";
const SECRET_HRP: &str = "AGE-SECRET-KEY-";
const RECIPIENT_HRP: &str = "age";

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
}

/// An X25519 key pair. The secret never leaves this struct but through [`Identity::file_text`].
pub struct Identity {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("recipient", &self.recipient()).finish_non_exhaustive()
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        // The bytes do not linger in freed memory.
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl Identity {
    fn from_secret(secret: [u8; 32]) -> Identity {
        Identity { secret, public: MontgomeryPoint::mul_base_clamped(secret).to_bytes() }
    }

    /// A new key from the system's random source.
    pub fn generate() -> Result<Identity, IdentityError> {
        let mut secret = [0u8; 32];
        let mut filled = 0;
        while filled < secret.len() {
            let n = rustix::rand::getrandom(&mut secret[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(|e| IdentityError::Random(e.into()))?;
            filled += n;
        }
        Ok(Identity::from_secret(secret))
    }

    /// Parses an age identity file: `#` comment lines and blank lines, and exactly one
    /// `AGE-SECRET-KEY-1…` line (upper case, bech32 with its checksum).
    pub fn parse(text: &str) -> Result<Identity, String> {
        let mut keys = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = keys.next().ok_or("no AGE-SECRET-KEY-1… line")?;
        if keys.next().is_some() {
            return Err("more than one key line (one device, one identity)".into());
        }
        if line != line.to_ascii_uppercase() {
            return Err("the key line must be upper case, as age-keygen writes it".into());
        }
        let checked =
            CheckedHrpstring::new::<Bech32>(line).map_err(|e| format!("not an age secret key: {e}"))?;
        if checked.hrp().as_str() != SECRET_HRP {
            return Err(format!("not an age X25519 secret key (prefix {}1)", checked.hrp()));
        }
        let secret: [u8; 32] =
            checked.byte_iter().collect::<Vec<u8>>().try_into().map_err(|_| "not a 32-byte key")?;
        Ok(Identity::from_secret(secret))
    }

    /// The public key as an age recipient, `age1…`.
    pub fn recipient(&self) -> String {
        encode(RECIPIENT_HRP, &self.public, false)
    }

    /// The first 16 hex digits of the sha256 of the public key.
    pub fn key_id(&self) -> String {
        key_id(&self.public)
    }

    /// The identity file's content (what `age-keygen` writes).
    fn file_text(&self, created: &str) -> String {
        format!(
            "# created: {created}\n# public key: {}\n{}\n",
            self.recipient(),
            encode(SECRET_HRP, &self.secret, true)
        )
    }
}

fn encode(hrp: &str, data: &[u8; 32], upper: bool) -> String {
    // Both HRPs are valid and 32 bytes fit Bech32's length limit: these cannot fail.
    let hrp = Hrp::parse(hrp).expect("a valid HRP");
    let encoded =
        if upper { bech32::encode_upper::<Bech32>(hrp, data) } else { bech32::encode::<Bech32>(hrp, data) };
    encoded.expect("32 bytes fit Bech32")
}

fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// The public key of an age recipient (`age1…`, lower case), or why it is not one.
pub fn parse_recipient(recipient: &str) -> Result<[u8; 32], String> {
    let checked =
        CheckedHrpstring::new::<Bech32>(recipient).map_err(|e| format!("not an age recipient: {e}"))?;
    if checked.hrp().as_str() != RECIPIENT_HRP || recipient != recipient.to_ascii_lowercase() {
        return Err("not an age X25519 recipient (age1…, lower case)".into());
    }
    checked.byte_iter().collect::<Vec<u8>>().try_into().map_err(|_| "not a 32-byte key".into())
}

/// The device's identity in `state_dir`, made (and stored, 0600) on first use. Returns
/// it and whether it was made now.
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
        assert_eq!(parse_recipient(&made.recipient()), Ok(made.public));
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
        let good = Identity::from_secret([7; 32]);
        let line = encode(SECRET_HRP, &good.secret, true);
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
            encode("AGE-PLUGIN-YUBIKEY-", &[1; 32], true),
            bech32::encode_upper::<Bech32>(Hrp::parse(SECRET_HRP).expect("hrp"), &[1; 16]).expect("enc"),
            bech32::encode_upper::<bech32::Bech32m>(Hrp::parse(SECRET_HRP).expect("hrp"), &[1; 32])
                .expect("enc"),
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
}
