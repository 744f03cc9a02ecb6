//! The age file format (<https://age-encryption.org/v1>), X25519 recipients only: what
//! secrets are encrypted with, in the fleet repository (by operators, with the `age` CLI
//! or SOPS) and inside bundles (by the bundler, to each device's key).
//!
//! Why not the `age` crate: the agent decrypts on devices where every hundred KiB
//! counts, and the crate brings scrypt, armor, plugins and localisation the agent does
//! not need. Everything here is built from what both binaries link already: X25519 from
//! curve25519-dalek (ed25519-dalek's curve), HKDF-SHA-256, HMAC-SHA-256 and
//! ChaCha20-Poly1305 from ring (rustls's provider), bech32 for the key strings. The
//! format is small and fixed; interoperability with the real `age` binary is tested in
//! both directions (`fleet-spec/tests/age_cli.rs`).
//!
//! Layout of an encrypted file:
//!
//! ```text
//! age-encryption.org/v1
//! -> X25519 <base64 ephemeral share>
//! <base64 file key wrapped for one recipient>
//! --- <base64 HMAC of the header>
//! <16-byte nonce><payload in 64 KiB ChaCha20-Poly1305 chunks>
//! ```
//!
//! [`encrypt`] is deterministic: the file key, nonce and ephemeral keys are derived from
//! a secret `seed` the caller holds, the recipients and the plaintext, so building the
//! same commit twice gives the same bundle bytes. The cost is that equal plaintexts to
//! equal recipients give equal ciphertexts, which a bundle's digest says anyway.
//!
//! This module never does I/O.

use bech32::primitives::decode::CheckedHrpstring;
use bech32::{Bech32, Hrp};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::{aead, hkdf, hmac};
use sha2::{Digest, Sha256};

const INTRO: &str = "age-encryption.org/v1";
const X25519_INFO: &[u8] = b"age-encryption.org/v1/X25519";
const SECRET_HRP: &str = "AGE-SECRET-KEY-";
const RECIPIENT_HRP: &str = "age";
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";
const ARMOR_END: &str = "-----END AGE ENCRYPTED FILE-----";

/// Why a file cannot be decrypted (or a key string parsed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgeError {
    #[error("not an age file: {0}")]
    Malformed(String),
    #[error("no identity matches this file's recipients (it was encrypted to other keys)")]
    NoMatchingKey,
    #[error("the header's MAC does not match: the file was altered")]
    BadHeaderMac,
    #[error("the payload does not decrypt: the file was altered or truncated")]
    BadPayload,
    #[error("{0}")]
    BadKey(String),
}

/// An X25519 identity: a secret key and its public key.
#[derive(Clone)]
pub struct SecretKey {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("recipient", &self.recipient()).finish_non_exhaustive()
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl SecretKey {
    pub fn from_bytes(secret: [u8; 32]) -> SecretKey {
        SecretKey { secret, public: MontgomeryPoint::mul_base_clamped(secret).to_bytes() }
    }

    /// The secret bytes (to derive other secrets from, or to write a key file).
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.secret
    }

    pub fn public_bytes(&self) -> &[u8; 32] {
        &self.public
    }

    /// Parses one `AGE-SECRET-KEY-1…` string (upper case, bech32 with its checksum).
    pub fn parse(line: &str) -> Result<SecretKey, AgeError> {
        if line != line.to_ascii_uppercase() {
            return Err(AgeError::BadKey("an age secret key is upper case, as age-keygen writes it".into()));
        }
        let checked = CheckedHrpstring::new::<Bech32>(line)
            .map_err(|e| AgeError::BadKey(format!("not an age secret key: {e}")))?;
        if checked.hrp().as_str() != SECRET_HRP {
            return Err(AgeError::BadKey(format!(
                "not an age X25519 secret key (prefix {}1)",
                checked.hrp()
            )));
        }
        let secret: [u8; 32] = checked
            .byte_iter()
            .collect::<Vec<u8>>()
            .try_into()
            .map_err(|_| AgeError::BadKey("not a 32-byte key".into()))?;
        Ok(SecretKey::from_bytes(secret))
    }

    /// The `AGE-SECRET-KEY-1…` string.
    pub fn to_key_string(&self) -> String {
        bech32_encode(SECRET_HRP, &self.secret, true)
    }

    /// The public key as an age recipient, `age1…`.
    pub fn recipient(&self) -> String {
        bech32_encode(RECIPIENT_HRP, &self.public, false)
    }

    /// The first 16 hex digits of the sha256 of the public key: a key's name in listings.
    pub fn key_id(&self) -> String {
        key_id(&self.public)
    }
}

/// Parses an identity file as `age-keygen` writes it: `#` comments, blank lines, and one
/// or more `AGE-SECRET-KEY-1…` lines (in file order).
pub fn parse_identities(text: &str) -> Result<Vec<SecretKey>, AgeError> {
    let keys: Vec<SecretKey> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(SecretKey::parse)
        .collect::<Result<_, _>>()?;
    if keys.is_empty() {
        return Err(AgeError::BadKey("no AGE-SECRET-KEY-1… line".into()));
    }
    Ok(keys)
}

/// The public key of an age X25519 recipient (`age1…`, lower case), or why it is not one.
pub fn parse_recipient(recipient: &str) -> Result<[u8; 32], AgeError> {
    let checked = CheckedHrpstring::new::<Bech32>(recipient)
        .map_err(|e| AgeError::BadKey(format!("not an age recipient: {e}")))?;
    if checked.hrp().as_str() != RECIPIENT_HRP || recipient != recipient.to_ascii_lowercase() {
        return Err(AgeError::BadKey("not an age X25519 recipient (age1…, lower case)".into()));
    }
    checked
        .byte_iter()
        .collect::<Vec<u8>>()
        .try_into()
        .map_err(|_| AgeError::BadKey("not a 32-byte key".into()))
}

/// The key id of a public key (see [`SecretKey::key_id`]).
pub fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

fn bech32_encode(hrp: &str, data: &[u8; 32], upper: bool) -> String {
    // Both HRPs are valid and 32 bytes fit Bech32's length limit: these cannot fail.
    let hrp = Hrp::parse(hrp).expect("a valid HRP");
    let encoded =
        if upper { bech32::encode_upper::<Bech32>(hrp, data) } else { bech32::encode::<Bech32>(hrp, data) };
    encoded.expect("32 bytes fit Bech32")
}

// ---- encryption -----------------------------------------------------------------------

/// Encrypts `plaintext` to every recipient (public keys), deterministically from `seed`
/// (a secret of the caller's; see the module documentation).
pub fn encrypt(plaintext: &[u8], recipients: &[[u8; 32]], seed: &[u8; 32]) -> Vec<u8> {
    let mut context = Sha256::new();
    context.update(b"fleet age seal v1");
    for r in recipients {
        context.update(r);
    }
    context.update(Sha256::digest(plaintext));
    let context = context.finalize();
    let derive = |label: &[u8], extra: &[u8], out: &mut [u8]| {
        let key = hmac::Key::new(hmac::HMAC_SHA256, seed);
        let tag = hmac::sign(&key, &[label, &context, extra].concat());
        out.copy_from_slice(&tag.as_ref()[..out.len()]);
    };
    let mut file_key = [0u8; 16];
    derive(b"file key", &[], &mut file_key);
    let mut nonce = [0u8; 16];
    derive(b"nonce", &[], &mut nonce);

    let mut header = format!("{INTRO}\n");
    for (i, recipient) in recipients.iter().enumerate() {
        let mut ephemeral = [0u8; 32];
        derive(b"ephemeral", &(i as u64).to_be_bytes(), &mut ephemeral);
        let share = MontgomeryPoint::mul_base_clamped(ephemeral).to_bytes();
        let shared = MontgomeryPoint(*recipient).mul_clamped(ephemeral).to_bytes();
        zeroize::Zeroize::zeroize(&mut ephemeral);
        let wrap_key = hkdf32(&[&share[..], recipient].concat(), &shared, X25519_INFO);
        let mut body = file_key.to_vec();
        seal(&wrap_key, [0u8; 12], &mut body);
        header.push_str(&format!("-> X25519 {}\n{}\n", b64_encode(&share), wrap_lines(&b64_encode(&body))));
    }
    header.push_str("---");
    let mac =
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &hkdf32(&[], &file_key, b"header")), header.as_bytes());
    let mut out = format!("{header} {}\n", b64_encode(mac.as_ref())).into_bytes();

    out.extend_from_slice(&nonce);
    let payload_key = hkdf32(&nonce, &file_key, b"payload");
    zeroize::Zeroize::zeroize(&mut file_key);
    let mut chunks = plaintext.chunks(CHUNK).peekable();
    let mut counter = 0u64;
    if chunks.peek().is_none() {
        let mut empty = Vec::new();
        seal(&payload_key, chunk_nonce(counter, true), &mut empty);
        out.extend_from_slice(&empty);
    }
    while let Some(chunk) = chunks.next() {
        let mut buf = chunk.to_vec();
        seal(&payload_key, chunk_nonce(counter, chunks.peek().is_none()), &mut buf);
        out.extend_from_slice(&buf);
        counter += 1;
    }
    out
}

// ---- decryption -----------------------------------------------------------------------

/// Decrypts an age file, binary or ASCII-armored (as `age -a` writes it), with any of
/// `identities`: what people commit.
pub fn decrypt_file(file: &[u8], identities: &[SecretKey]) -> Result<Vec<u8>, AgeError> {
    if file.starts_with(ARMOR_BEGIN.as_bytes()) {
        decrypt(&dearmor(file)?, identities)
    } else {
        decrypt(file, identities)
    }
}

/// Decrypts a binary age file with any of `identities` (what a bundle carries; the
/// device needs no armor).
pub fn decrypt(file: &[u8], identities: &[SecretKey]) -> Result<Vec<u8>, AgeError> {
    let (header, mac, payload) = split_header(file)?;
    let stanzas = parse_stanzas(header)?;
    let mut file_key = None;
    for stanza in stanzas.iter().filter(|s| s.kind == "X25519") {
        let [share] = stanza.args[..] else {
            return Err(AgeError::Malformed("an X25519 stanza has one argument".into()));
        };
        let share: [u8; 32] = b64_decode(share)?
            .try_into()
            .map_err(|_| AgeError::Malformed("an X25519 share is 32 bytes".into()))?;
        if stanza.body.len() != 32 {
            return Err(AgeError::Malformed("an X25519 stanza's body is 32 bytes".into()));
        }
        for id in identities {
            let shared = MontgomeryPoint(share).mul_clamped(id.secret).to_bytes();
            if shared == [0u8; 32] {
                return Err(AgeError::Malformed("an X25519 share of low order".into()));
            }
            let wrap_key = hkdf32(&[&share[..], &id.public[..]].concat(), &shared, X25519_INFO);
            let mut body = stanza.body.clone();
            if let Ok(key) = open(&wrap_key, [0u8; 12], &mut body) {
                let key: [u8; 16] = key.try_into().map_err(|_| AgeError::Malformed("file key".into()))?;
                file_key = Some(key);
                break;
            }
        }
        if file_key.is_some() {
            break;
        }
    }
    let mut file_key = file_key.ok_or(AgeError::NoMatchingKey)?;
    let mac_key = hmac::Key::new(hmac::HMAC_SHA256, &hkdf32(&[], &file_key, b"header"));
    hmac::verify(&mac_key, header, &b64_decode(mac)?).map_err(|_| AgeError::BadHeaderMac)?;

    if payload.len() < 16 {
        return Err(AgeError::BadPayload);
    }
    let (nonce, mut rest) = payload.split_at(16);
    let payload_key = hkdf32(nonce, &file_key, b"payload");
    zeroize::Zeroize::zeroize(&mut file_key);
    let mut out = Vec::with_capacity(rest.len());
    let mut counter = 0u64;
    loop {
        let take = rest.len().min(CHUNK + TAG);
        let (chunk, after) = rest.split_at(take);
        let last = after.is_empty();
        let mut buf = chunk.to_vec();
        let plain =
            open(&payload_key, chunk_nonce(counter, last), &mut buf).map_err(|()| AgeError::BadPayload)?;
        // Only the first chunk may be empty (an empty file); a full chunk may be last.
        if plain.is_empty() && counter > 0 {
            return Err(AgeError::BadPayload);
        }
        out.extend_from_slice(plain);
        if last {
            return Ok(out);
        }
        rest = after;
        counter += 1;
    }
}

struct Stanza<'a> {
    kind: &'a str,
    args: Vec<&'a str>,
    body: Vec<u8>,
}

/// Splits a file into the header (through `---`, what the MAC covers), the MAC's
/// base64 and the payload.
fn split_header(file: &[u8]) -> Result<(&[u8], &str, &[u8]), AgeError> {
    let malformed = |m: &str| AgeError::Malformed(m.into());
    if !file.starts_with(format!("{INTRO}\n").as_bytes()) {
        return Err(malformed("it does not start with age-encryption.org/v1"));
    }
    let mut at = 0;
    loop {
        let end =
            file[at..].iter().position(|&b| b == b'\n').ok_or_else(|| malformed("the header never ends"))?;
        let line = &file[at..at + end];
        if let Some(mac) = line.strip_prefix(b"--- ") {
            let mac = std::str::from_utf8(mac).map_err(|_| malformed("the MAC is not text"))?;
            return Ok((&file[..at + 3], mac, &file[at + end + 1..]));
        }
        at += end + 1;
    }
}

fn parse_stanzas(header: &[u8]) -> Result<Vec<Stanza<'_>>, AgeError> {
    let malformed = |m: &str| AgeError::Malformed(m.into());
    let text = std::str::from_utf8(header).map_err(|_| malformed("the header is not text"))?;
    let mut lines = text.lines().skip(1).peekable();
    let mut stanzas = Vec::new();
    while let Some(line) = lines.next() {
        if line == "---" {
            break;
        }
        let mut words =
            line.strip_prefix("-> ").ok_or_else(|| malformed("a stanza starts with ->"))?.split(' ');
        let kind = words.next().filter(|k| !k.is_empty()).ok_or_else(|| malformed("a stanza has a type"))?;
        let args: Vec<&str> = words.collect();
        let mut body = String::new();
        loop {
            let line = lines.next().ok_or_else(|| malformed("a stanza's body never ends"))?;
            if line.len() > 64 {
                return Err(malformed("a stanza's body line is longer than 64 columns"));
            }
            body.push_str(line);
            if line.len() < 64 {
                break;
            }
        }
        stanzas.push(Stanza { kind, args, body: b64_decode(&body)? });
    }
    if stanzas.is_empty() {
        return Err(malformed("the header has no recipient"));
    }
    Ok(stanzas)
}

fn dearmor(file: &[u8]) -> Result<Vec<u8>, AgeError> {
    let text = std::str::from_utf8(file).map_err(|_| AgeError::Malformed("armor that is not text".into()))?;
    let body = text
        .trim_end()
        .strip_prefix(ARMOR_BEGIN)
        .and_then(|t| t.strip_suffix(ARMOR_END))
        .ok_or_else(|| AgeError::Malformed(format!("armor without {ARMOR_END}")))?;
    let joined: String = body.lines().map(str::trim_end).collect();
    b64_decode(joined.trim_end_matches('='))
}

// ---- primitives -------------------------------------------------------------------------

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA-256's limit: neither step can fail.
    prk.expand(&[info], Len(32)).and_then(|okm| okm.fill(&mut out)).expect("HKDF of 32 bytes");
    out
}

fn chunk_nonce(counter: u64, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[3..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce
}

fn aead_key(key: &[u8; 32]) -> aead::LessSafeKey {
    // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("a 32-byte key"))
}

fn seal(key: &[u8; 32], nonce: [u8; 12], buf: &mut Vec<u8>) {
    aead_key(key)
        .seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), buf)
        .expect("sealing in memory cannot fail");
}

fn open<'a>(key: &[u8; 32], nonce: [u8; 12], buf: &'a mut [u8]) -> Result<&'a mut [u8], ()> {
    aead_key(key)
        .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), buf)
        .map_err(|_| ())
}

// Standard base64 without padding, strict (age rejects non-canonical encodings). Hand
// written: thirty lines instead of a crate on the device.
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(text: &str) -> Result<Vec<u8>, AgeError> {
    let bad = || AgeError::Malformed("invalid base64".into());
    if text.len() % 4 == 1 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = B64.iter().position(|&b| b == c).ok_or_else(bad)? as u32;
            n |= v << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        let len = chunk.len() - 1;
        out.extend_from_slice(&bytes[1..1 + len]);
        // Bits below the last byte must be zero (canonical encoding).
        if len < 3 && n & (0xff_ffff >> (8 * len)) != 0 {
            return Err(bad());
        }
    }
    Ok(out)
}

fn wrap_lines(b64: &str) -> String {
    // Lines of 64 columns; a body whose length is a multiple of 64 ends with an empty line.
    let mut out = String::new();
    let mut rest = b64;
    while rest.len() >= 64 {
        out.push_str(&rest[..64]);
        out.push('\n');
        rest = &rest[64..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_bytes([n; 32])
    }

    #[test]
    fn base64_round_trips_and_refuses_non_canonical_text() {
        for len in 0..70 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64_decode(&b64_encode(&bytes)).expect("decodes"), bytes);
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_encode(b"fo"), "Zm8");
        assert!(b64_decode("Zm9=").is_err(), "padding");
        assert!(b64_decode("Zm8").is_ok_and(|b| b == b"fo"));
        assert!(b64_decode("Zm9").is_err(), "trailing bits set");
        assert!(b64_decode("Zm-").is_err(), "alphabet");
        assert!(b64_decode("Zm9vY").is_err(), "a length that no byte count gives");
        assert!(b64_decode("Zm9vYmFz").is_ok());
        assert!(b64_decode("Zm/").is_err(), "trailing bits set");
    }

    #[test]
    fn round_trips_for_every_recipient_and_sizes_around_the_chunk() {
        let (a, b, c) = (key(1), key(2), key(3));
        let recipients = [*a.public_bytes(), *b.public_bytes()];
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = encrypt(&plain, &recipients, &[9; 32]);
            assert_eq!(
                decrypt(&sealed, std::slice::from_ref(&a)).unwrap_or_else(|_| panic!("a {len}")),
                plain,
                "{len}"
            );
            assert_eq!(decrypt(&sealed, std::slice::from_ref(&b)).expect("b"), plain, "{len}");
            assert_eq!(decrypt(&sealed, std::slice::from_ref(&c)), Err(AgeError::NoMatchingKey));
            assert_eq!(decrypt(&sealed, &[c.clone(), b.clone()]).expect("c or b"), plain);
        }
    }

    #[test]
    fn encryption_is_deterministic_in_its_seed() {
        let r = [*key(1).public_bytes()];
        assert_eq!(encrypt(b"x", &r, &[1; 32]), encrypt(b"x", &r, &[1; 32]));
        assert_ne!(encrypt(b"x", &r, &[1; 32]), encrypt(b"x", &r, &[2; 32]));
        assert_ne!(encrypt(b"x", &r, &[1; 32]), encrypt(b"y", &r, &[1; 32]));
    }

    #[test]
    fn any_altered_byte_truncation_or_extension_is_refused() {
        let a = key(1);
        let sealed = encrypt(&vec![7u8; CHUNK + 10], &[*a.public_bytes()], &[3; 32]);
        let ids = std::slice::from_ref(&a);
        for i in (0..sealed.len()).step_by(97).chain([sealed.len() - 1]) {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(decrypt(&bad, ids).is_err(), "byte {i} flipped");
        }
        for cut in [1, 16, 17, CHUNK + TAG, sealed.len() - 1] {
            assert!(decrypt(&sealed[..cut.min(sealed.len() - 1)], ids).is_err(), "cut at {cut}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(decrypt(&longer, ids).is_err());
        // Dropping the last chunk leaves a full chunk that is not marked last.
        let header_end = sealed.len() - (16 + CHUNK + TAG + 10 + TAG);
        assert_eq!(decrypt(&sealed[..header_end + 16 + CHUNK + TAG], ids), Err(AgeError::BadPayload));
    }

    #[test]
    fn hostile_headers_are_refused_without_a_panic() {
        let a = key(1);
        let ids = std::slice::from_ref(&a);
        for file in [
            &b""[..],
            b"age-encryption.org/v1\n",
            b"age-encryption.org/v1\n---  \n",
            b"age-encryption.org/v1\n-> X25519\n\n--- AAAA\n",
            b"age-encryption.org/v1\n-> X25519 AAAA\nAAAA\n--- AAAA\n",
            b"age-encryption.org/v1\n-> \n--- x\n",
            b"age-encryption.org/v2\n-> X25519 AAAA\n--- x\n",
            b"-----BEGIN AGE ENCRYPTED FILE-----\n!!!!\n",
        ] {
            assert!(decrypt_file(file, ids).is_err(), "{}", String::from_utf8_lossy(file));
        }
        // An all-zero share (low order point) must not decrypt to a known key.
        let zero = b64_encode(&[0u8; 32]);
        let file = format!("age-encryption.org/v1\n-> X25519 {zero}\n{}\n--- AAAA\n", b64_encode(&[0u8; 32]));
        assert!(decrypt(file.as_bytes(), ids).is_err());
    }

    #[test]
    fn keys_and_recipients_parse_back() {
        let a = key(5);
        let parsed = SecretKey::parse(&a.to_key_string()).expect("parses");
        assert_eq!(parsed.recipient(), a.recipient());
        assert_eq!(parse_recipient(&a.recipient()).expect("recipient"), *a.public_bytes());
        assert!(parse_recipient(&a.recipient().to_uppercase()).is_err());
        assert!(SecretKey::parse(&a.to_key_string().to_lowercase()).is_err());
        assert!(parse_recipient(&a.to_key_string()).is_err());
        let two = format!("# a comment\n{}\n\n{}\n", a.to_key_string(), key(6).to_key_string());
        assert_eq!(parse_identities(&two).expect("two").len(), 2);
        assert!(parse_identities("# nothing\n").is_err());
    }
}
