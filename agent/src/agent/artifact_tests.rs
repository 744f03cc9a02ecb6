//! Artifacts (bundle format 5) through the apply path, with the fake engine: written
//! from the blob store, repaired from it, refused with a reason when a blob is missing
//! or damaged or the disk too small, and collected after a commit.

use fleet_spec::model::Artifact;
use sha2::{Digest, Sha256};

use super::*;

/// `v1` plus an artifact at `app/model.bin` holding `bytes`.
fn with_artifact(h: &H, base: DesiredState, bytes: &[u8]) -> DesiredState {
    let mut s = base;
    s.artifacts = vec![Artifact {
        path: h.path("app/model.bin"),
        mode: 0o640,
        owner: None,
        sha256: Sha256::digest(bytes).into(),
        size: bytes.len() as u64,
    }];
    s.canonicalize();
    s
}

fn store_blob(agent: &Agent<FakeEngine>, bytes: &[u8]) -> PathBuf {
    let sha = hex::encode(Sha256::digest(bytes));
    agent.store().import_blob(&mut &bytes[..], &sha, bytes.len() as u64).expect("import");
    agent.store().blob_path(&sha)
}

fn model(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test(start_paused = true)]
async fn an_artifact_is_written_from_its_blob_and_repaired_from_it() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let bytes = model(1, 300_000);
    let v1 = with_artifact(&h, v1(&h), &bytes);
    let bundle = h.bundle(1, &v1);
    assert!(agent.missing_artifacts(&h.bundle(1, &super::v1(&h))).is_empty(), "a bundle without artifacts");
    assert_eq!(agent.missing_artifacts(&bundle).len(), 1, "not stored yet");
    store_blob(&agent, &bytes);
    assert!(agent.missing_artifacts(&bundle).is_empty());
    assert_eq!(agent.apply_bundle(&bundle).await.expect("apply"), Outcome::Committed { version: 1 });
    assert_eq!(std::fs::read(h.path("app/model.bin")).expect("written"), bytes);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.path("app/model.bin")).expect("meta").permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);

    // Drift: changed on disk, put back from the stored blob (no network).
    std::fs::write(h.path("app/model.bin"), b"tampered").expect("tamper");
    let repaired = agent.reconcile().await.expect("reconcile");
    assert_eq!(repaired.len(), 1, "drift repaired: {repaired:?}");
    assert_eq!(std::fs::read(h.path("app/model.bin")).expect("repaired"), bytes);
}

#[tokio::test(start_paused = true)]
async fn a_missing_or_damaged_blob_changes_nothing_and_says_why() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    let bytes = model(2, 100_000);
    let mut v2 = with_artifact(&h, v1(&h), &bytes);
    v2.files[0].content = b"a2".to_vec();
    let bundle = h.bundle(2, &v2);

    let outcome = agent.apply_bundle(&bundle).await.expect("settled");
    assert_eq!(outcome.code(), Some("artifacts_missing"), "{outcome:?}");
    assert!(matches!(outcome, Outcome::Deferred { .. }));
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"), "nothing changed");
    assert!(!Path::new(&h.path("app/model.bin")).exists());

    // A blob that rots on the card after it was stored: found before the apply begins,
    // dropped (downloaded again), nothing changed, the bundle not blamed.
    let blob = store_blob(&agent, &bytes);
    let mut rotten = bytes.clone();
    rotten[5000] ^= 1;
    std::fs::write(&blob, &rotten).expect("rot");
    let outcome = agent.apply_bundle(&bundle).await.expect("settled");
    assert_eq!(outcome.code(), Some("artifacts_missing"), "{outcome:?}");
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"));
    assert!(!Path::new(&h.path("app/model.bin")).exists(), "never the wrong bytes");
    assert!(!blob.exists(), "the damaged blob is gone");
    let digest = bundle::content_address(&bundle);
    assert!(!agent.store().rejected().unwrap_or_default().contains_key(&digest), "the disk's fault");

    store_blob(&agent, &bytes);
    assert_eq!(agent.apply_bundle(&bundle).await.expect("apply"), Outcome::Committed { version: 2 });
    assert_eq!(std::fs::read(h.path("app/model.bin")).expect("written"), bytes);
}

#[tokio::test(start_paused = true)]
async fn an_artifact_larger_than_the_disk_defers_with_insufficient_space() {
    let Some(h) = H::on_small_disk(4096) else { return };
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    // The blob fits in the store, its copy does not fit beside it (reserve 0: the
    // config's default of 64 MiB would refuse anything on a 4 MiB disk).
    agent.cfg.fetch.disk_reserve_bytes = 0;
    let bytes = model(3, 2_500_000);
    store_blob(&agent, &bytes);
    let v2 = with_artifact(&h, v1(&h), &bytes);
    let bundle = h.bundle(2, &v2);
    let outcome = agent.apply_bundle(&bundle).await.expect("settled");
    assert_eq!(outcome.code(), Some("insufficient_space"), "{outcome:?}");
    let reason = outcome.reason().unwrap_or_default();
    assert!(reason.contains("2500000 bytes") && reason.contains("free"), "{reason}");
    assert!(!Path::new(&h.path("app/model.bin")).exists(), "nothing changed");
    assert!(agent.state().is_rest());
}

#[tokio::test(start_paused = true)]
async fn blobs_the_committed_state_no_longer_names_are_collected() {
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    let (old, new) = (model(4, 10_000), model(5, 10_000));
    let old_blob = store_blob(&agent, &old);
    assert_eq!(
        agent.apply_bundle(&h.bundle(1, &with_artifact(&h, v1(&h), &old))).await.expect("v1"),
        Outcome::Committed { version: 1 }
    );
    let new_blob = store_blob(&agent, &new);
    // Old enough to be collected (a blob changed in the last hour may be in flight).
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for b in [&old_blob, &new_blob] {
        std::fs::File::options().write(true).open(b).and_then(|f| f.set_modified(long_ago)).expect("age");
    }
    assert_eq!(
        agent.apply_bundle(&h.bundle(2, &with_artifact(&h, v1(&h), &new))).await.expect("v2"),
        Outcome::Committed { version: 2 }
    );
    assert!(!old_blob.exists(), "no committed state names it");
    assert!(new_blob.exists(), "the committed state's blob stays: a repair needs no network");
}

/// `v1` with `app-web` on a pinned image the engine lacks, whose registry listed `bytes`.
fn with_sized_image(h: &H, bytes: u64) -> DesiredState {
    let mut s = v1(h);
    let digest = format!("sha256:{}", "e".repeat(64));
    s.containers[0].image = fleet_spec::model::ImageRef {
        reference: "registry.local:5000/app:2".into(),
        digest: Some(digest.clone()),
    };
    s.image_sizes = vec![fleet_spec::model::ImageSize { digest, bytes }];
    s.canonicalize();
    s
}

#[tokio::test(start_paused = true)]
async fn an_image_larger_than_the_engines_disk_defers_with_insufficient_space() {
    let Some(h) = H::on_small_disk(4096) else { return };
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    commit_v1(&h, &mut agent).await;
    agent.cfg.fetch.disk_reserve_bytes = 0;
    let images = h.path("engine");
    std::fs::create_dir_all(&images).expect("engine dir");
    h.fake.set_storage_root(Path::new(&images));
    let pulls = |h: &H| h.fake.calls().iter().filter(|c| matches!(c, Call::Pull { .. })).count();

    // 2 MiB listed: about 6 MiB unpacked, on a 4 MiB disk.
    let mut v2 = with_sized_image(&h, 2 << 20);
    v2.files[0].content = b"a2".to_vec();
    let outcome = agent.apply_bundle(&h.bundle(2, &v2)).await.expect("settled");
    assert_eq!(outcome.code(), Some("insufficient_space"), "{outcome:?}");
    assert!(matches!(outcome, Outcome::Deferred { .. }), "tried again: {outcome:?}");
    let reason = outcome.reason().unwrap_or_default();
    assert!(reason.contains(&format!("{} bytes", 3 * (2 << 20))) && reason.contains(&images), "{reason}");
    assert_eq!(pulls(&h), 0, "nothing pulled");
    assert_eq!(h.read("app/a.conf").as_deref(), Some("a1"), "nothing changed");

    // A storage the agent cannot see (an agent in a container): not checked, pulled.
    h.fake.set_storage_root(Path::new("/nonexistent/engine"));
    let outcome = agent.apply_bundle(&h.bundle(3, &with_sized_image(&h, 2 << 20))).await.expect("settled");
    assert_eq!(outcome, Outcome::Committed { version: 3 });
    assert_eq!(pulls(&h), 1);

    // Room enough (300 KiB listed): pulled and committed.
    h.fake.set_storage_root(Path::new(&images));
    let mut v4 = with_sized_image(&h, 300 << 10);
    v4.containers[0].image.digest = Some(format!("sha256:{}", "f".repeat(64)));
    v4.image_sizes[0].digest = format!("sha256:{}", "f".repeat(64));
    let outcome = agent.apply_bundle(&h.bundle(4, &v4)).await.expect("settled");
    assert_eq!(outcome, Outcome::Committed { version: 4 });
    assert_eq!(pulls(&h), 2);
}

/// `v1` declaring agent release `version` whose binary for this architecture is `binary`.
fn with_agent_release(h: &H, version: &str, binary: &[u8]) -> DesiredState {
    let mut s = v1(h);
    s.agent = Some(fleet_spec::model::AgentRelease {
        version: version.into(),
        allow_downgrade: false,
        binaries: vec![fleet_spec::model::AgentBinary {
            arch: std::env::consts::ARCH.into(),
            sha256: Sha256::digest(binary).into(),
            size: binary.len() as u64,
        }],
    });
    s.canonicalize();
    s
}

#[tokio::test(start_paused = true)]
async fn a_declared_agent_release_is_refused_with_a_reason_until_its_binary_checks_out() {
    use std::os::unix::fs::PermissionsExt;
    let h = H::new();
    let (mut agent, _rx) = h.agent();
    agent.recover().await.expect("recover");
    // A binary that lies about its version.
    let liar = b"#!/bin/sh\necho 'fleet-agent 0.0.1'\n".to_vec();
    let state = with_agent_release(&h, "99.0.0", &liar);
    let bundle = h.bundle(1, &state);

    // Not started by the launcher: the binary is not even downloaded; refused, said why.
    assert!(agent.missing_artifacts(&bundle).is_empty());
    assert_eq!(agent.apply_bundle(&bundle).await.expect("apply"), Outcome::Committed { version: 1 });
    agent.check_agent_release().await;
    let refused = agent.agent_update_status().expect("refused");
    assert_eq!(refused.code, "agent_not_launched", "{refused:?}");
    assert!(agent.status_report().agent_update.is_some(), "in the status");

    // Launched: the binary is wanted before the apply, then staged, checked, refused.
    agent.update.launched = true;
    let bundle = h.bundle(2, &state);
    let missing = agent.missing_artifacts(&bundle);
    assert_eq!(missing.len(), 1, "the agent binary is downloaded with the bundle");
    store_blob(&agent, &liar);
    assert_eq!(agent.apply_bundle(&bundle).await.expect("apply"), Outcome::Committed { version: 2 });
    agent.check_agent_release().await;
    let refused = agent.agent_update_status().expect("refused");
    assert_eq!(refused.code, "agent_update_failed", "{refused:?}");
    assert!(refused.message.contains("printed"), "{refused:?}");
    assert!(!agent.agent_switch_staged(), "not handed to the launcher");
    let dir = crate::launch::dir(&agent.cfg.state_dir);
    let sha = hex::encode(Sha256::digest(&liar));
    assert!(crate::launch::failure(&dir, &sha).is_some(), "recorded: never tried again");
    assert!(!dir.join("next").exists() && !dir.join("slots").join(&sha).exists());

    // A binary that checks out (its version, and check-config accepting the live
    // config) is staged as `next` and the daemon is asked to exit for the launcher.
    let good = b"#!/bin/sh\n[ \"$1\" = --version ] && echo 'fleet-agent 99.0.1'\nexit 0\n".to_vec();
    let state = with_agent_release(&h, "99.0.1", &good);
    store_blob(&agent, &good);
    assert_eq!(
        agent.apply_bundle(&h.bundle(3, &state)).await.expect("apply"),
        Outcome::Committed { version: 3 }
    );
    agent.check_agent_release().await;
    assert!(agent.agent_switch_staged(), "{:?}", agent.agent_update_status());
    let sha = hex::encode(Sha256::digest(&good));
    assert_eq!(std::fs::read_link(dir.join("next")).expect("next"), Path::new("slots").join(&sha));
    let mode = std::fs::metadata(dir.join("slots").join(&sha)).expect("slot").permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "executable");
}
