//! Age X25519 recipients (`age1…`): the devices' public keys, as `public_key:` of
//! `devices/<id>.yaml` and enrollment claims carry them. Lower-case Bech32 (BIP 173, as
//! age specifies) with the human-readable part `age`, a valid checksum and 32 bytes.
//! The **key id** names a key in listings, as `fleet-agent identity` prints it: the first
//! 16 hex digits of the sha256 of the public key.
//!
//! Pure: no I/O.

use bech32::primitives::decode::CheckedHrpstring;
use bech32::Bech32;
use sha2::{Digest, Sha256};

/// The public key of an age X25519 recipient, or why `text` is not one.
pub fn parse(text: &str) -> Result<[u8; 32], String> {
    let shown: String = text.chars().take(70).collect();
    if text != text.to_ascii_lowercase() || !text.starts_with("age1") {
        return Err(format!("{shown:?} is not an age X25519 recipient (age1…, lower case)"));
    }
    let checked = CheckedHrpstring::new::<Bech32>(text)
        .map_err(|e| format!("{shown:?} is not an age X25519 recipient: {e}"))?;
    if checked.hrp().as_str() != "age" {
        return Err(format!("{shown:?} is not an age X25519 recipient (age1…)"));
    }
    checked
        .byte_iter()
        .collect::<Vec<u8>>()
        .try_into()
        .map_err(|_| format!("{shown:?} is not an age X25519 recipient: not a 32-byte key"))
}

/// The key id of a public key: the first 16 hex digits of its sha256.
pub fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `age-keygen`'s recipient and the key id `fleet-agent identity` prints for it.
    const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    #[test]
    fn a_recipient_parses_and_hostile_ones_are_refused() {
        let key = parse(RECIPIENT).expect("age's example recipient");
        assert_eq!(key_id(&key).len(), 16);
        let mut flipped = RECIPIENT.to_string();
        flipped.replace_range(61.., if RECIPIENT.ends_with('p') { "q" } else { "p" });
        for bad in [
            RECIPIENT.to_uppercase(),
            flipped,
            RECIPIENT.replace("age1", "agf1"),
            format!("{RECIPIENT}q"),
            "age1".into(),
            String::new(),
            "AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZ0L9E7N".into(),
            "ssh-ed25519 AAAA".into(),
            "age1".to_string() + &"q".repeat(10_000),
        ] {
            let e = parse(&bad).expect_err(&bad);
            assert!(e.contains("not an age X25519 recipient") && e.len() < 300, "{e}");
        }
    }
}
