//! `build --resolve-digests` against a real Docker Distribution registry, into which
//! the test pushes a minimal image through the Registry HTTP API.

use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::common::{build, bundler, free_port, have, open_bundle, wait_for_port, Daemon, Keys, Repo};

fn registry() -> Option<Daemon> {
    if !have("docker-registry") {
        eprintln!("skipped: docker-registry is not installed (apt-get install -y docker-registry)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let conf = dir.path().join("registry.yml");
    std::fs::write(
        &conf,
        format!(
            "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            dir.path().join("data").display()
        ),
    )
    .expect("config");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start docker-registry");
    wait_for_port(port, "docker-registry");
    Some(Daemon { child, _dir: dir, port })
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build())
}

fn push_blob(base: &str, name: &str, bytes: &[u8]) -> String {
    let digest = sha(bytes);
    let resp = agent().post(&format!("{base}/v2/{name}/blobs/uploads/")).send_empty().expect("start upload");
    assert_eq!(resp.status().as_u16(), 202);
    let location =
        resp.headers().get("location").and_then(|v| v.to_str().ok()).expect("upload location").to_string();
    let url = if location.starts_with("http") { location } else { format!("{base}{location}") };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = agent()
        .put(&format!("{url}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .send(bytes)
        .expect("upload blob");
    assert_eq!(resp.status().as_u16(), 201, "blob upload");
    digest
}

/// Pushes a minimal image `name:tag`; returns the manifest digest the registry reports.
fn push_image(port: u16, name: &str, tag: &str) -> String {
    push_sized_image(port, name, tag, b"not really a tarball, the registry does not look").0
}

/// Pushes an image `name:tag` with one layer of these bytes; returns the manifest digest
/// and the bytes the manifest lists (config and layer).
fn push_sized_image(port: u16, name: &str, tag: &str, layer: &[u8]) -> (String, u64) {
    let base = format!("http://127.0.0.1:{port}");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let config_digest = push_blob(&base, name, config);
    let layer_digest = push_blob(&base, name, layer);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": config_digest},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": layer_digest}],
    });
    let digest =
        put_manifest(&base, name, tag, "application/vnd.docker.distribution.manifest.v2+json", &manifest);
    (digest, (config.len() + layer.len()) as u64)
}

/// Puts a manifest under `reference` (a tag); returns its digest.
fn put_manifest(
    base: &str,
    name: &str,
    reference: &str,
    media_type: &str,
    manifest: &serde_json::Value,
) -> String {
    let body = serde_json::to_vec(manifest).expect("manifest");
    let resp = agent()
        .put(&format!("{base}/v2/{name}/manifests/{reference}"))
        .header("Content-Type", media_type)
        .send(&body[..])
        .expect("put manifest");
    assert_eq!(resp.status().as_u16(), 201, "manifest upload");
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .expect("digest header")
        .to_string();
    assert_eq!(digest, sha(&body));
    digest
}

fn fleet_with_image(image: &str) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: reg\n");
    repo.write("devices/d1.yaml", "labels: {}\n");
    repo.write("apps/app/app.yaml", "{}\n");
    repo.write(
        "apps/app/compose.yaml",
        &format!(
            "services:\n  main:\n    image: {image}\n  pinned:\n    image: busybox:1@sha256:{}\n",
            "a".repeat(64)
        ),
    );
    repo.commit_at("image", 1_800_000_000);
    repo
}

#[test]
fn tags_are_pinned_to_the_registry_digest() {
    let Some(reg) = registry() else { return };
    let digest = push_image(reg.port, "team/app", "1.0");
    let image = format!("127.0.0.1:{}/team/app:1.0", reg.port);
    let repo = fleet_with_image(&image);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let o = bundler(&[
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &keys.secret(),
        "--out",
        out.path().to_str().expect("utf-8"),
        "--resolve-digests",
    ]);
    o.assert_code(0);
    assert!(!o.stderr.contains("not pinned"), "{}", o.stderr);
    let state = open_bundle(out.path(), "d1", &keys).state;
    let main = state.containers.iter().find(|c| c.service == "main").expect("main");
    assert_eq!(main.image.reference, image);
    assert_eq!(main.image.digest.as_deref(), Some(digest.as_str()));
    assert_eq!(main.image.pull_reference(), format!("127.0.0.1:{}/team/app@{digest}", reg.port));
    let pinned = state.containers.iter().find(|c| c.service == "pinned").expect("pinned");
    assert_eq!(pinned.image.digest, Some(format!("sha256:{}", "a".repeat(64))), "an explicit digest is kept");
    // The download size the manifest lists is recorded for the resolved image only.
    let listed =
        (br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#
            .len()
            + b"not really a tarball, the registry does not look".len()) as u64;
    assert_eq!(state.image_size(&main.image), Some(listed));
    assert_eq!(state.image_size(&pinned.image), None, "an image pinned in the repository has no size");
    assert_eq!(state.image_sizes.len(), 1);

    // Without --resolve-digests: a warning, once.
    let plain = tempfile::tempdir().expect("tempdir");
    let o = build(repo.path(), "HEAD", &keys, plain.path());
    o.assert_code(0);
    o.assert_stderr_has(&format!("warning: image {image} is not pinned by digest"));
}

#[test]
fn an_unknown_tag_fails_the_build() {
    let Some(reg) = registry() else { return };
    push_image(reg.port, "team/app", "1.0");
    let image = format!("127.0.0.1:{}/team/app:9.9", reg.port);
    let repo = fleet_with_image(&image);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let o = bundler(&[
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &keys.secret(),
        "--out",
        out.path().to_str().expect("utf-8"),
        "--resolve-digests",
    ]);
    o.assert_code(1);
    o.assert_stderr_has(&format!("error: cannot resolve image {image}"));
    o.assert_stderr_has("HTTP 404 (no such image or tag)");
    assert!(!out.path().join("index.json").exists());
}

#[test]
fn an_index_records_its_largest_platform_and_no_image_sizes_keeps_format_5() {
    let Some(reg) = registry() else { return };
    let base = format!("http://127.0.0.1:{}", reg.port);
    let (small, small_bytes) = push_sized_image(reg.port, "team/multi", "amd64", &[1; 1000]);
    let (large, large_bytes) = push_sized_image(reg.port, "team/multi", "arm64", &[2; 3000]);
    let entry = |digest: &str, arch: &str, os: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "digest": digest,
            "size": 100,
            "platform": {"architecture": arch, "os": os},
        })
    };
    // A buildkit-style attestation manifest (platform unknown/unknown) is not a platform.
    let (attestation, _) = push_sized_image(reg.port, "team/multi", "att", &[3; 9000]);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [entry(&small, "amd64", "linux"), entry(&large, "arm64", "linux"), entry(&attestation, "unknown", "unknown")],
    });
    let digest = put_manifest(
        &base,
        "team/multi",
        "1.0",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        &index,
    );
    let image = format!("127.0.0.1:{}/team/multi:1.0", reg.port);
    let repo = fleet_with_image(&image);
    let keys = Keys::new();
    let secret = keys.secret();
    let build_with = |extra: &[&str]| {
        let out = tempfile::tempdir().expect("tempdir");
        let mut args = vec!["build", "--repo", repo.path_str(), "--key", &secret];
        let out_str = out.path().to_str().expect("utf-8").to_string();
        args.extend(["--out", &out_str, "--resolve-digests"]);
        args.extend(extra);
        bundler(&args).assert_code(0);
        out
    };
    let out = build_with(&[]);
    let verified = open_bundle(out.path(), "d1", &keys);
    let main = verified.state.containers.iter().find(|c| c.service == "main").expect("main");
    assert_eq!(main.image.digest.as_deref(), Some(digest.as_str()));
    assert!(large_bytes > small_bytes);
    assert_eq!(verified.state.image_size(&main.image), Some(large_bytes), "the largest platform's");
    assert_eq!(verified.state.format(), 6);

    let out = build_with(&["--no-image-sizes"]);
    let verified = open_bundle(out.path(), "d1", &keys);
    assert!(verified.state.image_sizes.is_empty());
    assert_eq!(verified.state.format(), 1, "pinned without sizes: readable by older agents");
    assert_eq!(
        verified.state.containers.iter().find(|c| c.service == "main").and_then(|c| c.image.digest.clone()),
        Some(digest),
        "still pinned"
    );
}
