//! Bundle decoding and verification must never panic, whatever the bytes.
#![no_main]

use fleet_spec::bundle::{verify, Expectation, Limits, TrustState, TrustedKeys};
use fleet_spec::keys::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed(&[1; 32]);
    let trusted = TrustedKeys::new(vec![key.public()], 1).expect("one key, threshold 1");
    let limits = Limits { max_manifest: 4096, max_compressed: 1 << 20, max_uncompressed: 1 << 20 };
    let expect = Expectation { fleet: "acme", device: "gw-01" };
    let _ = verify(data, &trusted, expect, TrustState::default(), 1_800_000_000, &limits);
    // The payload decoder on its own, past the signature check.
    let _ = fleet_spec::bundle::decompress_bounded(data, 1 << 16);
    let _ = fleet_spec::DesiredState::decode(data, 2);
});
