//! One test per reason a bundle is refused, each asserting the exact error, plus the
//! happy path. Bundles are made here with the format's own `assemble`.

use fleet_spec::bundle::{
    assemble, manifest_for, parse, verify, BundleMeta, Expectation, Limits, Manifest, TrustState,
    TrustedKeys, VerifyError, FORMAT_VERSION, HEADER_LEN, MAX_SIGNATURES, SIGNATURE_LEN,
};
use fleet_spec::keys::SigningKey;
use fleet_spec::model::{ContainerSpec, DesiredState, ImageRef, ManagedFile};

const NOW: i64 = 1_800_000_000;
const FLEET: &str = "acme";
const DEVICE: &str = "gw-01";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32])
}

fn state() -> DesiredState {
    DesiredState {
        files: vec![ManagedFile {
            path: "/srv/fleet/app.conf".into(),
            mode: 0o644,
            owner: None,
            content: b"listen = 8080\n".to_vec(),
        }],
        ..Default::default()
    }
}

fn meta(version: u64) -> BundleMeta {
    BundleMeta {
        fleet: FLEET.into(),
        device: DEVICE.into(),
        version,
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        subject: "deploy".into(),
        created_at: NOW - 60,
        expires_at: NOW + 3600,
    }
}

fn compress(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, 3).expect("compress")
}

/// A bundle signed by `signers`, built from `meta` and `state`.
fn bundle_with(meta: BundleMeta, state: &DesiredState, signers: &[&SigningKey]) -> Vec<u8> {
    let raw = state.encode();
    let payload = compress(&raw);
    assemble(&manifest_for(meta, &raw, &payload), state.format(), &payload, signers)
}

fn bundle(version: u64) -> Vec<u8> {
    bundle_with(meta(version), &state(), &[&key(1)])
}

fn trusted(keys: &[&SigningKey], threshold: usize) -> TrustedKeys {
    TrustedKeys::new(keys.iter().map(|k| k.public()).collect(), threshold).expect("trust config")
}

fn expect() -> Expectation<'static> {
    Expectation { fleet: FLEET, device: DEVICE }
}

fn check(bytes: &[u8]) -> Result<fleet_spec::Verified, VerifyError> {
    verify(bytes, &trusted(&[&key(1)], 1), expect(), TrustState::default(), NOW, &Limits::default())
}

/// Offset of the first payload byte of a single-signature bundle.
fn payload_offset(bytes: &[u8]) -> usize {
    let parsed = parse(bytes, &Limits::default()).expect("parses");
    bytes.len() - parsed.payload.len()
}

#[test]
fn a_good_bundle_verifies_and_advances_trust() {
    let bytes = bundle(7);
    let verified = check(&bytes).expect("verifies");
    assert_eq!(verified.manifest.version, 7);
    assert_eq!(verified.state, state());
    assert_eq!(verified.signed_by, vec![key(1).public().id()]);
    // The time floor moves to the bundle's signed creation time, never to the clock.
    let created_at = verified.manifest.created_at;
    assert!(created_at < NOW);
    assert_eq!(verified.next_trust, TrustState { last_version: Some(7), last_known_time: created_at });
    assert_eq!(verified.digest, fleet_spec::bundle::content_address(&bytes));
}

#[test]
fn building_twice_gives_identical_bytes() {
    assert_eq!(bundle(3), bundle(3));
}

#[test]
fn tampered_manifest_is_a_bad_signature() {
    let mut bytes = bundle(1);
    // The device id sits inside the manifest; flip one of its bytes.
    let at = bytes.windows(DEVICE.len()).position(|w| w == DEVICE.as_bytes()).expect("device id in manifest");
    bytes[at] ^= 0x01;
    assert_eq!(
        check(&bytes).expect_err("refused"),
        VerifyError::BadSignature { key_id: key(1).public().id() }
    );
}

#[test]
fn tampered_payload_fails_the_digest() {
    let mut bytes = bundle(1);
    let at = payload_offset(&bytes) + 4;
    bytes[at] ^= 0xff;
    assert!(matches!(check(&bytes), Err(VerifyError::PayloadDigest { .. })));
}

#[test]
fn unknown_key_is_refused_naming_the_key() {
    let bytes = bundle_with(meta(1), &state(), &[&key(9)]);
    assert_eq!(
        check(&bytes).expect_err("refused"),
        VerifyError::UnknownKey { found: key(9).public().id().to_string() }
    );
}

#[test]
fn threshold_counts_distinct_keys_only() {
    let (a, b) = (key(1), key(2));
    let trust = trusted(&[&a, &b], 2);
    let run = |bytes: &[u8]| verify(bytes, &trust, expect(), TrustState::default(), NOW, &Limits::default());

    let twice_by_a = bundle_with(meta(1), &state(), &[&a, &a]);
    assert_eq!(
        run(&twice_by_a).expect_err("refused"),
        VerifyError::ThresholdNotMet { valid: 1, threshold: 2 }
    );

    let a_and_stranger = bundle_with(meta(1), &state(), &[&a, &key(9)]);
    assert_eq!(
        run(&a_and_stranger).expect_err("refused"),
        VerifyError::ThresholdNotMet { valid: 1, threshold: 2 }
    );

    let both = bundle_with(meta(1), &state(), &[&a, &b]);
    assert_eq!(run(&both).expect("verifies").signed_by.len(), 2);
}

#[test]
fn impossible_thresholds_are_configuration_errors() {
    let a = key(1);
    assert!(TrustedKeys::new(vec![a.public(), a.public()], 2).is_err(), "the same key twice is one key");
    assert!(TrustedKeys::new(vec![a.public()], 0).is_err());
    assert!(TrustedKeys::new(vec![], 1).is_err());
}

#[test]
fn wrong_fleet_is_refused() {
    let mut m = meta(1);
    m.fleet = "other".into();
    let err = check(&bundle_with(m, &state(), &[&key(1)])).expect_err("refused");
    assert_eq!(err, VerifyError::WrongFleet { expected: FLEET.into(), got: "other".into() });
}

#[test]
fn wrong_device_is_refused() {
    let mut m = meta(1);
    m.device = "gw-02".into();
    let err = check(&bundle_with(m, &state(), &[&key(1)])).expect_err("refused");
    assert_eq!(err, VerifyError::WrongDevice { expected: DEVICE.into(), got: "gw-02".into() });
}

fn with_trust(bytes: &[u8], trust: TrustState, now: i64) -> Result<fleet_spec::Verified, VerifyError> {
    verify(bytes, &trusted(&[&key(1)], 1), expect(), trust, now, &Limits::default())
}

#[test]
fn replayed_older_version_is_refused() {
    let trust = TrustState { last_version: Some(5), last_known_time: NOW - 10 };
    assert_eq!(
        with_trust(&bundle(4), trust, NOW).expect_err("refused"),
        VerifyError::NotNewer { got: 4, last: 5 }
    );
}

#[test]
fn equal_version_is_refused() {
    let trust = TrustState { last_version: Some(5), last_known_time: NOW - 10 };
    assert_eq!(
        with_trust(&bundle(5), trust, NOW).expect_err("refused"),
        VerifyError::NotNewer { got: 5, last: 5 }
    );
    assert!(with_trust(&bundle(6), trust, NOW).is_ok());
}

#[test]
fn expired_bundle_is_refused() {
    let m = meta(1);
    let expires_at = m.expires_at;
    let err = with_trust(&bundle(1), TrustState::default(), expires_at).expect_err("refused");
    assert_eq!(err, VerifyError::Expired { expires_at, now: expires_at });
}

#[test]
fn a_clock_behind_the_time_floor_checks_expiry_at_the_floor() {
    let m = meta(1);
    // A device with no RTC boots at 1970: the floor from earlier bundles stands in.
    let floor = TrustState { last_version: None, last_known_time: m.created_at };
    let verified = with_trust(&bundle(1), floor, 0).expect("the floor is before expiry");
    assert_eq!(verified.next_trust.last_known_time, m.created_at);
    // A floor past the expiry expires the bundle, whatever the clock says.
    let late = TrustState { last_version: None, last_known_time: m.expires_at };
    let err = with_trust(&bundle(1), late, 0).expect_err("expired at the floor");
    assert_eq!(err, VerifyError::Expired { expires_at: m.expires_at, now: m.expires_at });
}

#[test]
fn a_clock_ahead_does_not_move_the_time_floor() {
    let m = meta(1);
    let verified = with_trust(&bundle(1), TrustState::default(), m.expires_at - 1).expect("valid");
    assert_eq!(verified.next_trust.last_known_time, m.created_at, "the clock is not persisted");
}

#[test]
fn truncation_at_every_section_boundary_is_refused() {
    let bytes = bundle(1);
    let manifest_len = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
    let after_manifest = HEADER_LEN + manifest_len;
    let boundaries = [
        (0, "magic"),
        (4, "magic"),
        (8, "format version"),
        (10, "manifest length"),
        (HEADER_LEN, "manifest"),
        (after_manifest, "signature count"),
        (after_manifest + 1, "signatures"),
        (after_manifest + 1 + SIGNATURE_LEN - 1, "signatures"),
    ];
    for (cut, section) in boundaries {
        match check(&bytes[..cut]).expect_err("refused") {
            VerifyError::Truncated { section: got, .. } => assert_eq!(got, section, "cut at {cut}"),
            other => panic!("cut at {cut}: expected truncation in {section}, got {other}"),
        }
    }
    // Cut inside the payload: the manifest's declared size catches it.
    let cut = bytes.len() - 1;
    assert!(matches!(check(&bytes[..cut]), Err(VerifyError::SizeMismatch { section: "payload", .. })));
    let cut = payload_offset(&bytes);
    assert!(matches!(
        check(&bytes[..cut]),
        Err(VerifyError::SizeMismatch { section: "payload", got: 0, .. })
    ));
}

#[test]
fn trailing_garbage_is_refused() {
    let mut bytes = bundle(1);
    bytes.extend_from_slice(b"junk");
    assert!(matches!(check(&bytes), Err(VerifyError::SizeMismatch { section: "payload", .. })));
}

#[test]
fn oversized_manifest_is_refused_before_parsing_it() {
    let mut bytes = bundle(1);
    let huge = (Limits::default().max_manifest as u32 + 1).to_le_bytes();
    bytes[10..14].copy_from_slice(&huge);
    assert!(matches!(check(&bytes), Err(VerifyError::ManifestTooLarge { .. })));
}

#[test]
fn oversized_bundle_is_refused_before_any_work() {
    let limits = Limits { max_manifest: 1024, max_compressed: 16, max_uncompressed: 1024 };
    let bytes = vec![0u8; limits.max_bundle_len() as usize + 1];
    let err = verify(&bytes, &trusted(&[&key(1)], 1), expect(), TrustState::default(), NOW, &limits)
        .expect_err("refused");
    assert!(matches!(err, VerifyError::TooLarge { .. }), "{err}");
}

#[test]
fn declared_payload_over_the_limit_is_refused() {
    let limits = Limits { max_uncompressed: 8, ..Limits::default() };
    let err = verify(&bundle(1), &trusted(&[&key(1)], 1), expect(), TrustState::default(), NOW, &limits)
        .expect_err("refused");
    assert!(matches!(err, VerifyError::PayloadTooLarge { limit: 8, .. }), "{err}");
}

/// A validly signed bundle whose manifest lies about the payload size.
fn lying_bundle(raw: &[u8], declared_uncompressed: u64) -> Vec<u8> {
    let payload = compress(raw);
    let mut manifest: Manifest = manifest_for(meta(1), raw, &payload);
    manifest.uncompressed_size = declared_uncompressed;
    assemble(&manifest, 1, &payload, &[&key(1)])
}

#[test]
fn declared_size_smaller_than_real_is_refused() {
    let raw = state().encode();
    let err = check(&lying_bundle(&raw, raw.len() as u64 - 1)).expect_err("refused");
    assert_eq!(err, VerifyError::DecompressedTooLarge { declared: raw.len() as u64 - 1 });
}

#[test]
fn declared_size_larger_than_real_is_refused() {
    let raw = state().encode();
    let err = check(&lying_bundle(&raw, raw.len() as u64 + 1)).expect_err("refused");
    assert!(matches!(err, VerifyError::SizeMismatch { section: "decompressed payload", .. }), "{err}");
}

#[test]
fn decompression_bomb_stops_at_the_declared_size() {
    // 64 MiB of zeros compress to a few KiB; the manifest claims 1 KiB.
    let bomb = vec![0u8; 64 << 20];
    let err = check(&lying_bundle(&bomb, 1024)).expect_err("refused");
    assert_eq!(err, VerifyError::DecompressedTooLarge { declared: 1024 });
}

#[test]
fn unknown_format_version_is_refused() {
    let mut bytes = bundle(1);
    bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(
        check(&bytes).expect_err("refused"),
        VerifyError::UnsupportedFormat { found: FORMAT_VERSION + 1, supported: FORMAT_VERSION }
    );
}

#[test]
fn bad_magic_is_refused() {
    let mut bytes = bundle(1);
    bytes[0] = b'X';
    assert_eq!(check(&bytes).expect_err("refused"), VerifyError::BadMagic);
}

#[test]
fn signature_count_out_of_range_is_refused() {
    let mut bytes = bundle(1);
    let manifest_len = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
    let count_at = HEADER_LEN + manifest_len;
    bytes[count_at] = 0;
    assert!(matches!(check(&bytes), Err(VerifyError::BadSignatureCount { count: 0, .. })));
    bytes[count_at] = (MAX_SIGNATURES + 1) as u8;
    assert!(matches!(check(&bytes), Err(VerifyError::BadSignatureCount { .. })));
}

#[test]
fn payload_that_is_not_zstd_is_refused_after_the_digest_check() {
    let raw = state().encode();
    let not_zstd = b"plain bytes, not a zstd frame".to_vec();
    let manifest = manifest_for(meta(1), &raw, &not_zstd);
    let bytes = assemble(&manifest, 1, &not_zstd, &[&key(1)]);
    assert!(matches!(check(&bytes), Err(VerifyError::BadCompression { .. })));
}

#[test]
fn every_error_has_a_distinct_code() {
    let errors = [
        VerifyError::BadMagic.code(),
        VerifyError::UnknownKey { found: String::new() }.code(),
        VerifyError::NotNewer { got: 1, last: 1 }.code(),
        VerifyError::Expired { expires_at: 0, now: 0 }.code(),
        VerifyError::DecompressedTooLarge { declared: 0 }.code(),
    ];
    let distinct: std::collections::BTreeSet<_> = errors.iter().collect();
    assert_eq!(distinct.len(), errors.len());
}

/// A state with one container; `with_options` sets one engine option on it.
fn container_state(with_options: bool) -> DesiredState {
    let mut container = ContainerSpec {
        name: "shop-web".into(),
        app: "shop".into(),
        service: "web".into(),
        image: ImageRef { reference: "nginx:1.27".into(), digest: None },
        ..Default::default()
    };
    if with_options {
        container.options.read_only = true;
    }
    DesiredState { containers: vec![container], ..state() }
}

fn format_of(bytes: &[u8]) -> u16 {
    u16::from_le_bytes([bytes[8], bytes[9]])
}

#[test]
fn a_state_without_engine_options_is_written_in_format_1_which_older_agents_read() {
    let state = container_state(false);
    assert_eq!(state.format(), 1);
    let bytes = bundle_with(meta(1), &state, &[&key(1)]);
    assert_eq!(format_of(&bytes), 1, "agents that read only format 1 keep taking it");
    // Format 1's payload is the state's own encoding, as before options existed.
    assert_eq!(state.encode(), postcard::to_stdvec(&state).expect("encode"));
    assert_eq!(check(&bytes).expect("verifies").state, state);
}

#[test]
fn a_state_with_engine_options_is_written_in_format_2_and_reads_back_whole() {
    let state = container_state(true);
    assert_eq!(state.format(), 2);
    let bytes = bundle_with(meta(1), &state, &[&key(1)]);
    // An agent that reads only format 1 refuses this with "upgrade the agent" instead
    // of running the container without the options it asks for.
    assert_eq!(format_of(&bytes), 2);
    let verified = check(&bytes).expect("verifies");
    assert!(verified.state.containers[0].options.read_only, "the option survives the trip");
    assert_eq!(verified.state, state);
}

#[test]
fn a_format_2_payload_labelled_format_1_is_refused_and_the_reverse_too() {
    let with = container_state(true);
    let raw = with.encode();
    let payload = compress(&raw);
    let labelled_1 = assemble(&manifest_for(meta(1), &raw, &payload), 1, &payload, &[&key(1)]);
    assert!(matches!(check(&labelled_1), Err(VerifyError::BadPayload { .. })), "trailing options");
    let without = container_state(false);
    let raw = without.encode();
    let payload = compress(&raw);
    let labelled_2 = assemble(&manifest_for(meta(1), &raw, &payload), 2, &payload, &[&key(1)]);
    assert!(matches!(check(&labelled_2), Err(VerifyError::BadPayload { .. })), "options missing");
}

#[test]
fn format_2_options_for_more_or_fewer_containers_than_the_state_has_are_refused() {
    let with = container_state(true);
    let mut raw = postcard::to_stdvec(&with).expect("encode");
    let options = vec![with.containers[0].options.clone(), with.containers[0].options.clone()];
    let networks: Vec<fleet_spec::model::NetworkOptions> = Vec::new();
    raw.extend(postcard::to_stdvec(&(options, networks)).expect("encode"));
    let payload = compress(&raw);
    let bytes = assemble(&manifest_for(meta(1), &raw, &payload), 2, &payload, &[&key(1)]);
    assert!(matches!(check(&bytes), Err(VerifyError::BadPayload { .. })));
}
