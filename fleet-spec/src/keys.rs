//! ed25519 keys: generation, text encoding, key ids.
//!
//! Key files are one line of text, so they paste into CI secrets and `agent.toml`:
//!
//! ```text
//! fleet-ed25519-secret:<64 hex chars of the 32-byte seed>
//! fleet-ed25519-public:<64 hex chars of the 32-byte public key>
//! ```
//!
//! A key id is the first 8 bytes of sha256(public key), written as 16 hex chars. Ids
//! let a device trust several keys at once, so keys rotate without touching devices
//! twice.
//!
//! Pure: file reading and writing lives in [`file`], behind the `keyfile` feature.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{SigningKey as DalekSigning, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};

const SECRET_PREFIX: &str = "fleet-ed25519-secret:";
const PUBLIC_PREFIX: &str = "fleet-ed25519-public:";

/// First 8 bytes of sha256(public key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; KeyId::LEN]);

impl KeyId {
    pub const LEN: usize = 8;
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A public key a device trusts.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn id(&self) -> KeyId {
        let digest = Sha256::digest(self.0.as_bytes());
        KeyId(digest[..KeyId::LEN].try_into().expect("sha256 is longer than a key id"))
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Refuses bytes that are not a point and weak (small-order) keys, for which
    /// signatures can be forged.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::NotAPoint)?;
        if key.is_weak() {
            return Err(KeyError::Weak);
        }
        Ok(PublicKey(key))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = decode_line(s, PUBLIC_PREFIX, "public")?;
        PublicKey::from_bytes(&bytes)
    }
}

/// The bundler's signing key. Never on a device.
pub struct SigningKey(DalekSigning);

impl SigningKey {
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        SigningKey(DalekSigning::generate(rng))
    }

    pub fn from_seed(seed: &[u8; 32]) -> Self {
        SigningKey(DalekSigning::from_bytes(seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn inner(&self) -> &DalekSigning {
        &self.0
    }

    /// The secret key file's one line (keep it secret).
    pub fn to_secret_line(&self) -> String {
        format!("{SECRET_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public().id())
    }
}

impl FromStr for SigningKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_line(s, SECRET_PREFIX, "secret").map(|seed| SigningKey::from_seed(&seed))
    }
}

fn decode_line(s: &str, prefix: &str, kind: &'static str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    let Some(hex_part) = s.strip_prefix(prefix) else {
        return Err(KeyError::Prefix { kind, expected: prefix_str(prefix) });
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| KeyError::Hex { kind })?;
    Ok(out)
}

fn prefix_str(prefix: &str) -> &'static str {
    if prefix == SECRET_PREFIX {
        SECRET_PREFIX
    } else {
        PUBLIC_PREFIX
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a {kind} key: it must start with {expected:?} (make one with `fleet-bundler keygen`)")]
    Prefix { kind: &'static str, expected: &'static str },
    #[error("{kind} key must be 64 hex characters after its prefix")]
    Hex { kind: &'static str },
    #[error("public key is not a valid ed25519 point")]
    NotAPoint,
    #[error("public key is a weak (small-order) ed25519 key, for which signatures can be forged: use a key made by `fleet-bundler keygen`")]
    Weak,
}

/// Key files on disk: the only I/O of this crate, opt-in through the `keyfile` feature.
#[cfg(feature = "keyfile")]
pub mod file {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};

    use super::{KeyError, PublicKey, SigningKey};

    #[derive(Debug, thiserror::Error)]
    pub enum KeyFileError {
        #[error("cannot read key file {path}: {source}")]
        Read { path: PathBuf, source: std::io::Error },
        #[error("cannot write key file {path}: {source}")]
        Write { path: PathBuf, source: std::io::Error },
        #[error("{path} already exists: refusing to overwrite a key (remove it first)")]
        Exists { path: PathBuf },
        #[error("key file {path}: {source}")]
        Parse { path: PathBuf, source: KeyError },
    }

    pub fn load_signing(path: &Path) -> Result<SigningKey, KeyFileError> {
        let text = read(path)?;
        text.parse().map_err(|source| KeyFileError::Parse { path: path.into(), source })
    }

    pub fn load_public(path: &Path) -> Result<PublicKey, KeyFileError> {
        let text = read(path)?;
        text.parse().map_err(|source| KeyFileError::Parse { path: path.into(), source })
    }

    fn read(path: &Path) -> Result<String, KeyFileError> {
        std::fs::read_to_string(path).map_err(|source| KeyFileError::Read { path: path.into(), source })
    }

    /// Writes `DIR/signing.key` (created 0600, never overwritten) and `DIR/signing.pub`.
    pub fn save_pair(dir: &Path, key: &SigningKey) -> Result<(PathBuf, PathBuf), KeyFileError> {
        std::fs::create_dir_all(dir).map_err(|source| KeyFileError::Write { path: dir.into(), source })?;
        let secret = dir.join("signing.key");
        let public = dir.join("signing.pub");
        write_new(&secret, 0o600, &key.to_secret_line())?;
        write_new(&public, 0o644, &key.public().to_string())?;
        Ok((secret, public))
    }

    fn write_new(path: &Path, mode: u32, line: &str) -> Result<(), KeyFileError> {
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(
                |source| match source.kind() {
                    std::io::ErrorKind::AlreadyExists => KeyFileError::Exists { path: path.into() },
                    _ => KeyFileError::Write { path: path.into(), source },
                },
            )?;
        file.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyFileError::Write { path: path.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_text() {
        let key = SigningKey::from_seed(&[7; 32]);
        let again: SigningKey = key.to_secret_line().parse().expect("secret line parses");
        assert_eq!(again.public(), key.public());
        let public: PublicKey = key.public().to_string().parse().expect("public line parses");
        assert_eq!(public.id(), key.public().id());
        assert_eq!(public.id().to_string().len(), 16);
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point (all zeros but the sign byte) and the all-zero encoding
        // are small-order points.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        for bytes in [[0u8; 32], identity] {
            let line = format!("{PUBLIC_PREFIX}{}", hex::encode(bytes));
            assert_eq!(line.parse::<PublicKey>().expect_err("weak"), KeyError::Weak, "{line}");
        }
    }

    #[test]
    fn a_secret_is_not_accepted_as_public() {
        let key = SigningKey::from_seed(&[7; 32]);
        let err = key.to_secret_line().parse::<PublicKey>().expect_err("wrong prefix");
        assert!(matches!(err, KeyError::Prefix { kind: "public", .. }), "{err}");
    }

    #[cfg(feature = "keyfile")]
    #[test]
    fn private_key_file_is_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_seed(&[1; 32]);
        let (secret, public) = file::save_pair(dir.path(), &key).expect("saved");
        let mode = std::fs::metadata(&secret).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(file::load_public(&public).expect("load").id(), key.public().id());
        assert!(matches!(file::save_pair(dir.path(), &key), Err(file::KeyFileError::Exists { .. })));
    }
}
