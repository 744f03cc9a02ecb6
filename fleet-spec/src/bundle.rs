//! The bundle: one device's signed, compressed desired state.
//!
//! Byte layout (documented for third parties in `FORMAT.md`):
//!
//! ```text
//! magic            8 bytes   "FLEETBDL"
//! format version   u16 LE    1
//! manifest length  u32 LE    ≤ Limits::max_manifest
//! manifest         postcard(Manifest)
//! signature count  u8        1..=MAX_SIGNATURES
//! signatures       count × (key id 8 bytes ‖ ed25519 signature 64 bytes)
//! payload          zstd(postcard(DesiredState)), exactly manifest.compressed_size bytes
//! ```
//!
//! Signatures cover every byte from the magic to the end of the manifest, so the
//! format version is signed too. The manifest carries the sha256 and both sizes of the
//! payload, so the payload is authenticated through the manifest.
//!
//! [`verify`] checks a bundle in numbered steps that mirror the trust model; it takes the
//! caller's [`TrustState`] and `now`, and returns the new trust state for the caller to
//! persist once it has used the bundle. It never does I/O and never reads the clock.

use std::collections::BTreeSet;
use std::io::Read;

use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{KeyId, PublicKey, SigningKey};
use crate::model::DesiredState;

pub const MAGIC: &[u8; 8] = b"FLEETBDL";
/// The newest bundle format this build writes and reads. Format 1 is the desired state
/// as it was first defined; format 2 adds the containers' engine options after it (see
/// [`DesiredState::encode`]); format 3 adds the maintenance schedule after that
/// (`fleet_spec::maintenance`); format 4 adds the device's secrets, age-encrypted to its
/// keys (`DesiredState::seal`); format 5 adds artifacts, files named by digest and size
/// whose bytes travel beside the bundle (`DesiredState::artifacts`); format 6 adds the
/// pinned images' download sizes (`DesiredState::image_sizes`); format 7 the agent
/// release the device should run (`DesiredState::agent`). A bundle is written in format 1 whenever its state uses
/// nothing newer, so agents that read only format 1 keep taking it; one that needs
/// format 2 is refused by them with "upgrade the agent" instead of half applied.
pub const FORMAT_VERSION: u16 = 7;
/// The oldest bundle format this build reads.
pub const OLDEST_FORMAT_VERSION: u16 = 1;
/// Bytes before the manifest: magic, format version, manifest length.
pub const HEADER_LEN: usize = 8 + 2 + 4;
pub const SIGNATURE_LEN: usize = KeyId::LEN + 64;
/// More signatures than this is malformed, not "more secure".
pub const MAX_SIGNATURES: usize = 16;

/// What a bundle says about itself. Signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub fleet: String,
    /// The one device this bundle is for.
    pub device: String,
    /// Grows with every change of this device's desired state; never reused.
    pub version: u64,
    /// Git commit id (hex) the state was rendered from.
    pub commit: String,
    /// First line of the commit message.
    pub subject: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; a device refuses the bundle from then on (freeze protection).
    pub expires_at: i64,
    /// sha256 of the compressed payload bytes.
    pub payload_sha256: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

impl Manifest {
    pub fn payload_sha256_hex(&self) -> String {
        hex::encode(self.payload_sha256)
    }
}

/// Size caps, checked before any work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_manifest: usize,
    pub max_compressed: u64,
    pub max_uncompressed: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_manifest: 16 * 1024, max_compressed: 64 << 20, max_uncompressed: 256 << 20 }
    }
}

impl Limits {
    /// The largest well-formed bundle under these limits.
    pub fn max_bundle_len(&self) -> u64 {
        (HEADER_LEN + self.max_manifest + 1 + MAX_SIGNATURES * SIGNATURE_LEN) as u64 + self.max_compressed
    }
}

/// The public keys a verifier trusts and how many distinct ones must sign.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
    threshold: usize,
}

impl TrustedKeys {
    /// `threshold` distinct trusted keys must sign; it must be between 1 and the number
    /// of distinct keys.
    pub fn new(keys: Vec<PublicKey>, threshold: usize) -> Result<Self, TrustConfigError> {
        let distinct: BTreeSet<KeyId> = keys.iter().map(PublicKey::id).collect();
        if keys.is_empty() {
            return Err(TrustConfigError::NoKeys);
        }
        if threshold == 0 || threshold > distinct.len() {
            return Err(TrustConfigError::BadThreshold { threshold, keys: distinct.len() });
        }
        Ok(TrustedKeys { keys, threshold })
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    fn find(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.id() == *id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustConfigError {
    #[error("no trusted public key is configured: add at least one")]
    NoKeys,
    #[error("threshold {threshold} is impossible with {keys} distinct trusted key(s): use 1..={keys}")]
    BadThreshold { threshold: usize, keys: usize },
}

/// What the device remembers between bundles. Persisted by the caller, only after a
/// bundle passed every check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustState {
    /// Highest version accepted so far; `None` before the first bundle.
    pub last_version: Option<u64>,
    /// The time floor (unix seconds): the newest signed `created_at` of an accepted
    /// bundle. Time checks use `max(now, floor)`, so a device whose clock is behind (no
    /// RTC after a reboot, a clock set back) still checks expiry against a time it can
    /// trust, and a clock that once jumped ahead leaves nothing behind: the device's own
    /// clock is never persisted here.
    pub last_known_time: i64,
}

/// Who the verifier is and what it expects.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    pub fleet: &'a str,
    pub device: &'a str,
}

/// A bundle that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub state: DesiredState,
    /// sha256 of the whole bundle (its content address), hex.
    pub digest: String,
    /// Key ids whose valid signatures were counted.
    pub signed_by: Vec<KeyId>,
    /// The trust state to persist once the bundle is accepted.
    pub next_trust: TrustState,
}

/// Why a bundle was refused. Each variant is one step of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("bundle is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("bundle is truncated in the {section} (needs {needed} bytes, {available} left)")]
    Truncated { section: &'static str, needed: u64, available: u64 },
    #[error("not a fleet bundle (bad magic bytes)")]
    BadMagic,
    #[error(
        "bundle format version {found} is not supported (this build reads formats up to {supported}): upgrade the agent"
    )]
    UnsupportedFormat { found: u16, supported: u16 },
    #[error("manifest is {size} bytes, over the limit of {limit}")]
    ManifestTooLarge { size: u64, limit: u64 },
    #[error("signature count {count} is outside 1..={max}")]
    BadSignatureCount { count: usize, max: usize },
    #[error("no signature is from a trusted key (signed by {found}): add the bundler's public key to the trusted keys")]
    UnknownKey { found: String },
    #[error(
        "signature by key {key_id} does not match the manifest: the bundle was tampered with or corrupted"
    )]
    BadSignature { key_id: KeyId },
    #[error("only {valid} distinct trusted key(s) signed, {threshold} required")]
    ThresholdNotMet { valid: usize, threshold: usize },
    #[error("manifest cannot be decoded: {reason}")]
    BadManifest { reason: String },
    #[error("bundle is for fleet {got:?}, this device belongs to fleet {expected:?}")]
    WrongFleet { expected: String, got: String },
    #[error("bundle is for device {got:?}, this is device {expected:?}")]
    WrongDevice { expected: String, got: String },
    #[error("bundle version {got} is not newer than the accepted version {last}: replayed or stale bundle")]
    NotNewer { got: u64, last: u64 },
    #[error("bundle expired at {expires_at} (now {now}): rebuild and publish a fresh bundle")]
    Expired { expires_at: i64, now: i64 },
    #[error("declared payload size {declared} is over the limit of {limit}")]
    PayloadTooLarge { declared: u64, limit: u64 },
    #[error("{section} has {got} bytes, the manifest declares {declared}")]
    SizeMismatch { section: &'static str, declared: u64, got: u64 },
    #[error("payload digest is {got}, the manifest declares {expected}: the payload was tampered with or corrupted")]
    PayloadDigest { expected: String, got: String },
    #[error("payload decompresses beyond its declared {declared} bytes (decompression bomb?)")]
    DecompressedTooLarge { declared: u64 },
    #[error("payload cannot be decompressed: {reason}")]
    BadCompression { reason: String },
    #[error("payload cannot be decoded: {reason}")]
    BadPayload { reason: String },
}

impl VerifyError {
    /// A stable snake_case code for status reports and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "too_large",
            VerifyError::Truncated { .. } => "truncated",
            VerifyError::BadMagic => "bad_magic",
            VerifyError::UnsupportedFormat { .. } => "unsupported_format",
            VerifyError::ManifestTooLarge { .. } => "manifest_too_large",
            VerifyError::BadSignatureCount { .. } => "bad_signature_count",
            VerifyError::UnknownKey { .. } => "unknown_key",
            VerifyError::BadSignature { .. } => "bad_signature",
            VerifyError::ThresholdNotMet { .. } => "threshold_not_met",
            VerifyError::BadManifest { .. } => "bad_manifest",
            VerifyError::WrongFleet { .. } => "wrong_fleet",
            VerifyError::WrongDevice { .. } => "wrong_device",
            VerifyError::NotNewer { .. } => "not_newer",
            VerifyError::Expired { .. } => "expired",
            VerifyError::PayloadTooLarge { .. } => "payload_too_large",
            VerifyError::SizeMismatch { .. } => "size_mismatch",
            VerifyError::PayloadDigest { .. } => "payload_digest",
            VerifyError::DecompressedTooLarge { .. } => "decompression_bomb",
            VerifyError::BadCompression { .. } => "bad_compression",
            VerifyError::BadPayload { .. } => "bad_payload",
        }
    }
}

/// The sections of a bundle, split but not yet trusted.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// The signed bytes: header and manifest.
    pub signed: &'a [u8],
    pub manifest_bytes: &'a [u8],
    pub signatures: Vec<(KeyId, Signature)>,
    pub payload: &'a [u8],
    /// The format version from the header (signed).
    pub format: u16,
}

/// A cursor that reports truncation by section name.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, section: &'static str) -> Result<&'a [u8], VerifyError> {
        let available = self.bytes.len() - self.pos;
        if n > available {
            return Err(VerifyError::Truncated { section, needed: n as u64, available: available as u64 });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
}

/// Splits a bundle into its sections, checking structure and size caps only.
pub fn parse<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, VerifyError> {
    let limit = limits.max_bundle_len();
    if bytes.len() as u64 > limit {
        return Err(VerifyError::TooLarge { size: bytes.len() as u64, limit });
    }
    let mut r = Reader { bytes, pos: 0 };
    if r.take(8, "magic")? != MAGIC {
        return Err(VerifyError::BadMagic);
    }
    let version = u16::from_le_bytes(r.take(2, "format version")?.try_into().expect("2 bytes"));
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(VerifyError::UnsupportedFormat { found: version, supported: FORMAT_VERSION });
    }
    let manifest_len =
        u32::from_le_bytes(r.take(4, "manifest length")?.try_into().expect("4 bytes")) as usize;
    if manifest_len > limits.max_manifest {
        return Err(VerifyError::ManifestTooLarge {
            size: manifest_len as u64,
            limit: limits.max_manifest as u64,
        });
    }
    let manifest_bytes = r.take(manifest_len, "manifest")?;
    let signed = &bytes[..r.pos];
    let count = r.take(1, "signature count")?[0] as usize;
    if count == 0 || count > MAX_SIGNATURES {
        return Err(VerifyError::BadSignatureCount { count, max: MAX_SIGNATURES });
    }
    let mut signatures = Vec::with_capacity(count);
    for _ in 0..count {
        let entry = r.take(SIGNATURE_LEN, "signatures")?;
        let key_id = KeyId(entry[..KeyId::LEN].try_into().expect("key id length"));
        let signature = Signature::from_bytes(entry[KeyId::LEN..].try_into().expect("signature length"));
        signatures.push((key_id, signature));
    }
    let payload = &bytes[r.pos..];
    Ok(Parsed { signed, manifest_bytes, signatures, payload, format: version })
}

/// Checks a bundle in the order of the trust model and returns its state.
///
/// 1. Size caps and structure, before any other work.
/// 2. Signatures over header and manifest: at least `threshold` *distinct* trusted key
///    ids must have signed validly; a bad signature by a trusted key is a hard error.
/// 3. The manifest decodes.
/// 4. Fleet and device match the verifier.
/// 5. The version is strictly newer than the last accepted one (no replay, no rollback).
/// 6. The bundle has not expired at `max(now, trust.last_known_time)`: the time floor
///    of signed `created_at`s already accepted stands in for a clock that is behind.
/// 7. Declared sizes are within the limits and the payload has the declared length.
/// 8. The payload's sha256 matches the manifest (before decompressing anything).
/// 9. Decompression is bounded by the declared size and must produce exactly it.
/// 10. The desired state decodes.
pub fn verify(
    bytes: &[u8],
    trusted: &TrustedKeys,
    expect: Expectation<'_>,
    trust: TrustState,
    now: i64,
    limits: &Limits,
) -> Result<Verified, VerifyError> {
    // 1.
    let parsed = parse(bytes, limits)?;

    // 2.
    let signed_by = check_signatures(&parsed, trusted)?;

    // 3.
    let manifest = decode_manifest(parsed.manifest_bytes)?;

    // 4.
    if manifest.fleet != expect.fleet {
        return Err(VerifyError::WrongFleet { expected: expect.fleet.into(), got: manifest.fleet });
    }
    if manifest.device != expect.device {
        return Err(VerifyError::WrongDevice { expected: expect.device.into(), got: manifest.device });
    }

    // 5.
    if let Some(last) = trust.last_version {
        if manifest.version <= last {
            return Err(VerifyError::NotNewer { got: manifest.version, last });
        }
    }

    // 6.
    let now = now.max(trust.last_known_time);
    if now >= manifest.expires_at {
        return Err(VerifyError::Expired { expires_at: manifest.expires_at, now });
    }

    // 7. + 8. + 9. + 10.
    let state = open_payload(&manifest, parsed.format, parsed.payload, limits)?;

    Ok(Verified {
        next_trust: TrustState {
            last_version: Some(manifest.version),
            last_known_time: manifest.created_at.max(trust.last_known_time),
        },
        digest: hex::encode(Sha256::digest(bytes)),
        manifest,
        state,
        signed_by,
    })
}

/// Opens a bundle the caller accepted earlier (it passed [`verify`] then) and stored
/// itself: structure, sizes and the payload digest are checked, signatures, addressing,
/// version and time are not. The caller checks the bytes' content address against the
/// digest it stored them under (the disk is not trusted). This is how a device keeps its
/// last good state readable after the key that signed it was rotated out: what it
/// accepted stays accepted. Never use it for bytes that did not pass `verify` before.
pub fn open_accepted(bytes: &[u8], limits: &Limits) -> Result<(Manifest, DesiredState), VerifyError> {
    let parsed = parse(bytes, limits)?;
    let manifest = decode_manifest(parsed.manifest_bytes)?;
    let state = open_payload(&manifest, parsed.format, parsed.payload, limits)?;
    Ok((manifest, state))
}

fn check_signatures(parsed: &Parsed<'_>, trusted: &TrustedKeys) -> Result<Vec<KeyId>, VerifyError> {
    let mut valid = BTreeSet::new();
    for (key_id, signature) in &parsed.signatures {
        let Some(key) = trusted.find(key_id) else { continue };
        // Strict: rejects non-canonical signatures and small-order components, which
        // plain `verify` accepts (forgeries against weak keys).
        key.verifying_key()
            .verify_strict(parsed.signed, signature)
            .map_err(|_| VerifyError::BadSignature { key_id: *key_id })?;
        valid.insert(*key_id);
    }
    if valid.is_empty() {
        let found = parsed.signatures.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(", ");
        return Err(VerifyError::UnknownKey { found });
    }
    if valid.len() < trusted.threshold {
        return Err(VerifyError::ThresholdNotMet { valid: valid.len(), threshold: trusted.threshold });
    }
    Ok(valid.into_iter().collect())
}

/// Decodes a manifest; trailing bytes are an error.
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, VerifyError> {
    match postcard::take_from_bytes::<Manifest>(bytes) {
        Ok((manifest, [])) => Ok(manifest),
        Ok((_, rest)) => Err(VerifyError::BadManifest { reason: format!("{} trailing bytes", rest.len()) }),
        Err(e) => Err(VerifyError::BadManifest { reason: e.to_string() }),
    }
}

fn open_payload(
    manifest: &Manifest,
    format: u16,
    payload: &[u8],
    limits: &Limits,
) -> Result<DesiredState, VerifyError> {
    if manifest.compressed_size > limits.max_compressed {
        return Err(VerifyError::PayloadTooLarge {
            declared: manifest.compressed_size,
            limit: limits.max_compressed,
        });
    }
    if manifest.uncompressed_size > limits.max_uncompressed {
        return Err(VerifyError::PayloadTooLarge {
            declared: manifest.uncompressed_size,
            limit: limits.max_uncompressed,
        });
    }
    if payload.len() as u64 != manifest.compressed_size {
        return Err(VerifyError::SizeMismatch {
            section: "payload",
            declared: manifest.compressed_size,
            got: payload.len() as u64,
        });
    }
    let digest: [u8; 32] = Sha256::digest(payload).into();
    if digest != manifest.payload_sha256 {
        return Err(VerifyError::PayloadDigest {
            expected: manifest.payload_sha256_hex(),
            got: hex::encode(digest),
        });
    }
    let raw = decompress_bounded(payload, manifest.uncompressed_size)?;
    DesiredState::decode(&raw, format).map_err(|e| VerifyError::BadPayload { reason: e.to_string() })
}

/// Decompresses a zstd payload, refusing to produce more than `declared` bytes and
/// requiring exactly `declared` bytes.
pub fn decompress_bounded(payload: &[u8], declared: u64) -> Result<Vec<u8>, VerifyError> {
    let decoder = ruzstd::decoding::StreamingDecoder::new(payload)
        .map_err(|e| VerifyError::BadCompression { reason: e.to_string() })?;
    let mut out = Vec::with_capacity(declared.min(1 << 20) as usize);
    decoder
        .take(declared + 1)
        .read_to_end(&mut out)
        .map_err(|e| VerifyError::BadCompression { reason: e.to_string() })?;
    if out.len() as u64 > declared {
        return Err(VerifyError::DecompressedTooLarge { declared });
    }
    if (out.len() as u64) < declared {
        return Err(VerifyError::SizeMismatch {
            section: "decompressed payload",
            declared,
            got: out.len() as u64,
        });
    }
    Ok(out)
}

/// Assembles and signs a bundle from an already-compressed payload encoded in `format`
/// (see [`DesiredState::format`]). The bundler's side; it lives here so the format has
/// one definition.
pub fn assemble(manifest: &Manifest, format: u16, payload: &[u8], keys: &[&SigningKey]) -> Vec<u8> {
    assert!(!keys.is_empty() && keys.len() <= MAX_SIGNATURES, "1..=16 signing keys");
    let manifest_bytes = postcard::to_stdvec(manifest).expect("encoding into a Vec cannot fail");
    let mut out = Vec::with_capacity(
        HEADER_LEN + manifest_bytes.len() + 1 + keys.len() * SIGNATURE_LEN + payload.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&manifest_bytes);
    let signature_input = out.clone();
    out.push(keys.len() as u8);
    for key in keys {
        out.extend_from_slice(&key.public().id().0);
        out.extend_from_slice(&key.inner().sign(&signature_input).to_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// The inputs of a bundle besides its state.
#[derive(Debug, Clone)]
pub struct BundleMeta {
    pub fleet: String,
    pub device: String,
    pub version: u64,
    pub commit: String,
    pub subject: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// Builds a complete bundle: encode, compress (zstd, deterministic for a given level),
/// fill in the manifest, sign.
#[cfg(feature = "build")]
pub fn build(meta: BundleMeta, state: &DesiredState, keys: &[&SigningKey], level: i32) -> Vec<u8> {
    let raw = state.encode();
    let payload = zstd::bulk::compress(&raw, level).expect("zstd compression into memory cannot fail");
    let manifest = manifest_for(meta, &raw, &payload);
    assemble(&manifest, state.format(), &payload, keys)
}

/// The manifest for a payload: digest and sizes filled in.
pub fn manifest_for(meta: BundleMeta, raw: &[u8], compressed: &[u8]) -> Manifest {
    Manifest {
        fleet: meta.fleet,
        device: meta.device,
        version: meta.version,
        commit: meta.commit,
        subject: meta.subject,
        created_at: meta.created_at,
        expires_at: meta.expires_at,
        payload_sha256: Sha256::digest(compressed).into(),
        compressed_size: compressed.len() as u64,
        uncompressed_size: raw.len() as u64,
    }
}

/// Hex sha256 of a whole bundle: its content address (`<digest>.bundle`).
pub fn content_address(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
