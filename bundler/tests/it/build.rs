//! `build`, `verify` and `keygen` on real Git repositories: determinism, the
//! versioning rule, shallow and bare clones, merges, and bundles that verify.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use fleet_spec::messages::Announcement;
use fleet_spec::model::MountSource;

use crate::common::{build, bundle_files, bundler, bundler_env, git_in, open_bundle, read_index, Keys, Repo};

#[test]
fn keygen_writes_a_0600_key_and_prints_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("k");
    let out = bundler(&["keygen", "--out", keys.to_str().expect("utf-8")]);
    out.assert_code(0);
    let id = out.stdout.trim();
    assert_eq!(id.len(), 16, "key id: {id:?}");
    let mode = std::fs::metadata(keys.join("signing.key")).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let public = fleet_spec::keys::file::load_public(&keys.join("signing.pub")).expect("public");
    assert_eq!(public.id().to_string(), id);
    let again = bundler(&["keygen", "--out", keys.to_str().expect("utf-8")]);
    again.assert_code(1);
    again.assert_stderr_has("already exists: refusing to overwrite a key");
}

#[test]
fn builds_the_example_fleet_into_bundles_that_verify() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    let summary = out.json();
    assert_eq!(summary["devices"], 6, "four devices at the sites, two in the lab");
    assert_eq!(summary["written"], 6);
    // Every image of the example is pinned but the lab gateway's (README: a registry of
    // the user's, pinned with --resolve-digests).
    out.assert_stderr_has("warning: image localhost:5000/busybox:1.36 is not pinned by digest");
    assert_eq!(out.stderr.matches("is not pinned").count(), 1, "warned once per image");

    let index = read_index(out_dir.path());
    let commit = repo.git(&["rev-parse", "HEAD"]).trim().to_string();
    assert_eq!(index["fleet"], "acme");
    assert_eq!(index["commit"], commit.as_str());
    assert_eq!(index["topic_prefix"], "fleet");
    let entry = &index["devices"]["gw-berlin-01"];
    assert_eq!(entry["version"], 1_800_000_000u64, "first version = commit time");
    assert_eq!(entry["commit"], commit.as_str());
    assert_eq!(entry["labels"]["channel"], "canary");
    let digest = entry["digest"].as_str().expect("digest");
    let bytes = std::fs::read(out_dir.path().join(format!("bundles/{digest}.bundle"))).expect("bundle file");
    assert_eq!(entry["size"], bytes.len() as u64);
    assert_eq!(fleet_spec::bundle::content_address(&bytes), digest);

    // Verify as a device: fleet, device, version, expiry, state.
    let verified = open_bundle(out_dir.path(), "gw-berlin-01", &keys);
    assert_eq!(verified.manifest.created_at, 1_800_000_000);
    assert_eq!(verified.manifest.expires_at, 1_800_000_000 + 90 * 86_400);
    assert_eq!(verified.manifest.subject, "initial fleet");
    assert_eq!(verified.state.digest(), entry["state_digest"].as_str().expect("state digest"));
    let state = &verified.state;
    let nginx_conf = state.file("/srv/fleet/edge-proxy/files/nginx.conf").expect("templated file delivered");
    let text = String::from_utf8(nginx_conf.content.clone()).expect("utf-8");
    assert!(text.contains("Managed by fleet for gw-berlin-01 (Berlin, hall 1)"), "{text}");
    assert!(text.contains("proxy_pass http://api:8081/;"), "{text}");
    let telegraf = state.file("/srv/fleet/telemetry/files/telegraf.conf").expect("telegraf.conf");
    assert_eq!(telegraf.mode, 0o640);
    let telegraf = String::from_utf8(telegraf.content.clone()).expect("utf-8");
    assert!(telegraf.contains("debug = true") && telegraf.contains("channel = \"canary\""), "{telegraf}");
    // The proxy bind-mounts the managed file, so it restarts when the file changes.
    let proxy = state.containers.iter().find(|c| c.name == "edge-proxy-proxy").expect("proxy container");
    assert!(proxy
        .mounts
        .iter()
        .any(|m| m.source == MountSource::Bind("/srv/fleet/edge-proxy/files/nginx.conf".into())
            && m.target == "/etc/nginx/conf.d/default.conf"
            && m.read_only));
    assert_eq!(proxy.networks[0].network, "edge-proxy_default");
    assert_eq!(proxy.networks[0].aliases, vec!["proxy".to_string()]);
    assert_eq!(proxy.depends_on[0].container, "edge-proxy-api");
    assert_eq!(proxy.memory_bytes, Some(64 << 20));
    let api = state.containers.iter().find(|c| c.name == "edge-proxy-api").expect("api");
    assert_eq!(api.env.get("PORT").map(String::as_str), Some("8081"), "${{upstream_port}} from device vars");
    assert_eq!(api.env.get("LOG_LEVEL").map(String::as_str), Some("debug"), "device var overrides fleet var");
    assert!(api.image.digest.as_deref().is_some_and(|d| d.starts_with("sha256:")), "pinned image kept");
    assert_eq!(api.healthcheck.as_ref().and_then(|h| h.interval_ms), Some(10_000));
    assert_eq!(api.nano_cpus, Some(500_000_000));
    // Selectors: the Munich-only app is absent in Berlin, the canary app present.
    assert!(!state.containers.iter().any(|c| c.app == "modbus-gateway"));
    assert!(state.containers.iter().any(|c| c.name == "canary-tools-netcheck"));

    // The `verify` command agrees, human and JSON.
    let path = out_dir.path().join(format!("bundles/{digest}.bundle"));
    let v = bundler(&["verify", "--pub", &keys.public(), path.to_str().expect("utf-8")]);
    v.assert_code(0);
    assert!(v.stdout.contains("fleet/device  acme/gw-berlin-01"), "{}", v.stdout);
    let v = bundler(&["verify", "--pub", &keys.public(), "--json", path.to_str().expect("utf-8")]);
    v.assert_code(0);
    assert_eq!(v.json()["version"], 1_800_000_000u64);
    assert_eq!(v.json()["digest"], digest);
}

#[test]
fn verify_refuses_like_a_device() {
    let repo = Repo::example();
    let keys = Keys::new();
    let other = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    let digest =
        read_index(out_dir.path())["devices"]["gw-munich-01"]["digest"].as_str().expect("digest").to_string();
    let path = out_dir.path().join(format!("bundles/{digest}.bundle"));
    let path = path.to_str().expect("utf-8");
    let v = bundler(&["verify", "--pub", &other.public(), path]);
    v.assert_code(1);
    v.assert_stderr_has("(unknown_key)");
    let v = bundler(&["verify", "--pub", &keys.public(), "--device", "gw-berlin-01", path]);
    v.assert_code(1);
    v.assert_stderr_has("(wrong_device)");
    let v = bundler(&["verify", "--pub", &keys.public(), "--pub", &other.public(), "--threshold", "2", path]);
    v.assert_code(1);
    v.assert_stderr_has("(threshold_not_met)");
    // A flipped payload byte.
    let mut bytes = std::fs::read(path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = out_dir.path().join("tampered.bundle");
    std::fs::write(&tampered, &bytes).expect("write");
    let v = bundler(&["verify", "--pub", &keys.public(), tampered.to_str().expect("utf-8")]);
    v.assert_code(1);
    v.assert_stderr_has("(payload_digest)");
}

#[test]
fn the_same_commit_builds_identical_bytes() {
    let repo = Repo::example();
    let keys = Keys::new();
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    build(repo.path(), "HEAD", &keys, a.path()).assert_code(0);
    build(repo.path(), "HEAD", &keys, b.path()).assert_code(0);
    assert_eq!(
        std::fs::read(a.path().join("index.json")).expect("a"),
        std::fs::read(b.path().join("index.json")).expect("b")
    );
    for device in ["gw-berlin-01", "sensor-hub-01"] {
        let pointer = fleet_spec::messages::pointer_path(device);
        assert_eq!(
            std::fs::read(a.path().join(&pointer)).expect("a"),
            std::fs::read(b.path().join(&pointer)).expect("b")
        );
    }
    let files = bundle_files(a.path());
    assert_eq!(files, bundle_files(b.path()));
    for f in &files {
        assert_eq!(
            std::fs::read(a.path().join("bundles").join(f)).expect("a"),
            std::fs::read(b.path().join("bundles").join(f)).expect("b")
        );
    }
    // Rebuilding into the same directory writes nothing.
    let again = build(repo.path(), "HEAD", &keys, a.path());
    again.assert_code(0);
    assert_eq!(again.json()["written"], 0);
    assert_eq!(again.json()["unchanged"], 6);
}

#[test]
fn one_changed_device_gets_exactly_one_new_bundle() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    let before = read_index(out_dir.path());
    let files_before = bundle_files(out_dir.path());

    repo.write(
        "devices/gw-berlin-02.yaml",
        "labels:\n  site: berlin\n  hardware: rpi4\n  channel: stable\nvars:\n  location: \"Berlin, hall 2b\"\n  upstream_port: 8081\n",
    );
    let commit = repo.commit_at("move gw-berlin-02", 1_800_000_500);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    let summary = out.json();
    assert_eq!(summary["written"], 1);
    assert_eq!(summary["unchanged"], 5);
    assert_eq!(summary["changed"], serde_json::json!(["gw-berlin-02"]));
    assert_eq!(bundle_files(out_dir.path()).len(), files_before.len() + 1);

    let after = read_index(out_dir.path());
    assert_eq!(after["commit"], commit.as_str());
    assert_eq!(after["devices"]["gw-berlin-02"]["version"], 1_800_000_500u64);
    assert_eq!(after["devices"]["gw-berlin-02"]["commit"], commit.as_str());
    for kept in ["gw-berlin-01", "gw-munich-01", "sensor-hub-01"] {
        assert_eq!(
            after["devices"][kept], before["devices"][kept],
            "{kept} keeps bundle, version and commit"
        );
    }
}

#[test]
fn versions_grow_across_rebased_history_and_shallow_clones() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    repo.write(
        "fleet.yaml",
        "name: acme\nvars:\n  log_level: warn\n  mqtt_host: m\n  telemetry_interval: 10s\npolicy:\n  allowed_roots: [/srv/fleet, /etc/fleet]\n  bind_roots: [/proc]\n",
    );
    repo.commit_at("later commit", 1_900_000_000);
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    assert_eq!(read_index(out_dir.path())["devices"]["sensor-hub-01"]["version"], 1_900_000_000u64);

    // History is rewritten: a different commit with an older committer time.
    repo.git(&["reset", "-q", "--hard", "HEAD~1"]);
    repo.write(
        "fleet.yaml",
        "name: acme\nvars:\n  log_level: warn\n  mqtt_host: m\n  telemetry_interval: 20s\npolicy:\n  allowed_roots: [/srv/fleet, /etc/fleet]\n  bind_roots: [/proc]\n",
    );
    repo.commit_at("rebased", 1_850_000_000);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    let index = read_index(out_dir.path());
    assert_eq!(
        index["devices"]["sensor-hub-01"]["version"], 1_900_000_001u64,
        "previous version + 1, never older"
    );

    // A shallow clone (one commit, no parents) builds the same bundles.
    let clone_parent = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", repo.path_str());
    git_in(clone_parent.path(), &["clone", "-q", "--depth", "1", "--branch", "main", &url, "shallow"], &[]);
    let shallow = clone_parent.path().join("shallow");
    assert_eq!(git_in(&shallow, &["rev-parse", "--is-shallow-repository"], &[]).trim(), "true");
    let out = build(&shallow, "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["written"], 0, "same commit, same states: nothing new");
    let fresh = tempfile::tempdir().expect("tempdir");
    build(&shallow, "HEAD", &keys, fresh.path()).assert_code(0);
    let from_full = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, from_full.path()).assert_code(0);
    assert_eq!(
        read_index(fresh.path()),
        read_index(from_full.path()),
        "shallow and full clones build the same"
    );
}

#[test]
fn bare_clones_and_merges_build_at_any_revision() {
    let repo = Repo::example();
    let keys = Keys::new();
    repo.git(&["checkout", "-q", "-b", "feature"]);
    repo.write(
        "apps/canary-tools/compose.yaml",
        "services:\n  netcheck:\n    image: busybox:1.37\n    network_mode: host\n",
    );
    repo.commit_at("canary: busybox 1.37", 1_800_000_100);
    repo.git(&["checkout", "-q", "main"]);
    repo.write("devices/gw-new-01.yaml", "labels:\n  site: berlin\n  hardware: x86\n  channel: stable\n");
    repo.commit_at("add gw-new-01", 1_800_000_200);
    let date = "@1800000300 +0000";
    git_in(
        repo.path(),
        &["merge", "-q", "--no-ff", "-m", "merge feature", "feature"],
        &[("GIT_COMMITTER_DATE", date), ("GIT_AUTHOR_DATE", date)],
    );

    let parent = tempfile::tempdir().expect("tempdir");
    git_in(parent.path(), &["clone", "-q", "--bare", repo.path_str(), "fleet.git"], &[]);
    let bare = parent.path().join("fleet.git");
    let bare_str = bare.to_str().expect("utf-8");
    bundler(&["validate", "--repo", bare_str, "--rev", "main"]).assert_code(0);
    bundler(&["validate", "--repo", bare_str, "--rev", "feature"]).assert_code(0);

    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(&bare, "main", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["devices"], 7);
    let index = read_index(out_dir.path());
    assert_eq!(index["commit"], repo.git(&["rev-parse", "HEAD"]).trim());
    let verified = open_bundle(out_dir.path(), "gw-berlin-01", &keys);
    let netcheck =
        verified.state.containers.iter().find(|c| c.name == "canary-tools-netcheck").expect("netcheck");
    assert_eq!(netcheck.image.reference, "busybox:1.37", "the merge has the feature's change");
    assert!(index["devices"]["gw-new-01"].is_object(), "and main's new device");
}

#[test]
fn the_signing_key_can_come_from_the_environment() {
    let repo = Repo::example();
    let keys = Keys::new();
    let line = std::fs::read_to_string(keys.secret()).expect("key");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out_path = out_dir.path().to_str().expect("utf-8");
    let out = bundler_env(
        &["build", "--repo", repo.path_str(), "--out", out_path],
        &[("FLEET_SIGNING_KEY", line.trim())],
    );
    out.assert_code(0);
    open_bundle(out_dir.path(), "gw-munich-01", &keys);
    let out = bundler(&["build", "--repo", repo.path_str(), "--out", out_path]);
    out.assert_code(64);
    out.assert_stderr_has("no signing key: pass --key FILE or set FLEET_SIGNING_KEY");
    let out = bundler_env(
        &["build", "--repo", repo.path_str(), "--out", out_path],
        &[("FLEET_SIGNING_KEY", "garbage")],
    );
    out.assert_code(1);
    out.assert_stderr_has("FLEET_SIGNING_KEY: not a secret key");
}

#[test]
fn an_invalid_repository_writes_nothing() {
    let repo = Repo::example();
    repo.write("apps/canary-tools/compose.yaml", "services:\n  netcheck:\n    build: .\n");
    repo.commit_at("break it", 1_800_000_100);
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(65);
    out.assert_stderr_has("apps/canary-tools/compose.yaml:3:12: error: `build:` is not supported");
    assert!(!out_dir.path().join("index.json").exists());
    assert!(!out_dir.path().join("devices").exists());
}

#[test]
fn an_index_of_another_fleet_is_not_overwritten() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    repo.write(
        "fleet.yaml",
        "name: other\nvars:\n  log_level: info\n  mqtt_host: m\n  telemetry_interval: 1s\npolicy:\n  allowed_roots: [/srv/fleet, /etc/fleet]\n  bind_roots: [/proc]\n",
    );
    repo.commit_at("rename", 1_800_000_100);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(1);
    out.assert_stderr_has("belongs to fleet \"acme\", this repository is fleet \"other\"");
}

#[test]
fn kept_bundles_are_renewed_past_half_their_validity() {
    let repo = Repo::example();
    repo.write("fleet.yaml", "name: acme\nbundle_expiry: 10d\nvars:\n  log_level: info\n  mqtt_host: m\n  telemetry_interval: 30s\npolicy:\n  allowed_roots: [/srv/fleet, /etc/fleet]\n  bind_roots: [/proc]\n");
    repo.commit_at("short expiry", 1_800_000_000);
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    // Four days later nothing changed: bundles are kept.
    repo.commit_at("day 4", 1_800_000_000 + 4 * 86_400);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    assert_eq!(out.json()["written"], 0);
    // Six days later (past half of 10 days): every bundle is renewed with a new version.
    let commit = repo.commit_at("day 6", 1_800_000_000 + 6 * 86_400);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["renewed"], 6);
    assert_eq!(out.json()["written"], 6);
    let index = read_index(out_dir.path());
    assert_eq!(index["devices"]["gw-berlin-01"]["version"], 1_800_000_000u64 + 6 * 86_400);
    assert_eq!(index["devices"]["gw-berlin-01"]["commit"], commit.as_str());
    let verified = open_bundle(out_dir.path(), "gw-berlin-01", &keys);
    assert_eq!(verified.manifest.expires_at, 1_800_000_000 + 16 * 86_400);
}

#[test]
fn a_damaged_kept_bundle_is_rebuilt() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    let digest = read_index(out_dir.path())["devices"]["sensor-hub-01"]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let path = out_dir.path().join(format!("bundles/{digest}.bundle"));
    let mut bytes = std::fs::read(&path).expect("bundle");
    bytes[20] ^= 0xff;
    std::fs::write(&path, &bytes).expect("damage");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["changed"], serde_json::json!(["sensor-hub-01"]));
    open_bundle(out_dir.path(), "sensor-hub-01", &keys);
}

/// `out/devices/<id>.json` → (inode, mtime in ns) of every pointer file.
fn pointer_files(out: &Path) -> BTreeMap<String, (u64, i128)> {
    std::fs::read_dir(out.join("devices"))
        .expect("devices/")
        .map(|e| {
            let e = e.expect("entry");
            let meta = e.metadata().expect("metadata");
            let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
            (e.file_name().to_string_lossy().into_owned(), (meta.ino(), mtime))
        })
        .collect()
}

/// Every device of the index has a pointer file holding its entry as an announcement.
#[track_caller]
fn assert_pointers_match_the_index(out: &Path) {
    let index = read_index(out);
    let devices = index["devices"].as_object().expect("devices");
    let mut names: Vec<String> = devices.keys().map(|id| format!("{id}.json")).collect();
    names.sort();
    assert_eq!(pointer_files(out).into_keys().collect::<Vec<_>>(), names, "one pointer file per device");
    for (id, entry) in devices {
        let bytes = std::fs::read(out.join(fleet_spec::messages::pointer_path(id))).expect("pointer file");
        assert!(bytes.ends_with(b"}\n") && bytes.len() < 1024, "one short line: {bytes:?}");
        let pointer = Announcement::from_json(&bytes).expect("a valid announcement");
        assert_eq!(
            pointer,
            Announcement {
                fleet: index["fleet"].as_str().expect("fleet").into(),
                device: id.clone(),
                version: entry["version"].as_u64().expect("version"),
                commit: entry["commit"].as_str().expect("commit").into(),
                digest: entry["digest"].as_str().expect("digest").into(),
                size: entry["size"].as_u64().expect("size"),
                urls: vec![],
                mqtt_blob: false,
            },
            "{id}"
        );
    }
}

#[test]
fn pointer_files_follow_the_index_and_only_changed_ones_are_rewritten() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["pointers_written"], 6);
    assert_eq!(out.json()["pointers_deleted"], serde_json::json!([]));
    out.assert_stderr_has("6 pointer file(s) written");
    assert_pointers_match_the_index(out_dir.path());
    let first = pointer_files(out_dir.path());

    // The same commit again: no pointer file is touched.
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    assert_eq!(out.json()["pointers_written"], 0);
    assert_eq!(pointer_files(out_dir.path()), first, "inodes and mtimes unchanged");

    // One device changes: only its pointer file is replaced.
    repo.write(
        "devices/gw-berlin-02.yaml",
        "labels:\n  site: berlin\n  hardware: rpi4\n  channel: stable\nvars:\n  location: \"Berlin, hall 2b\"\n  upstream_port: 8081\n",
    );
    repo.commit_at("move gw-berlin-02", 1_800_000_500);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["pointers_written"], 1);
    assert_pointers_match_the_index(out_dir.path());
    let second = pointer_files(out_dir.path());
    for (name, before) in &first {
        if name == "gw-berlin-02.json" {
            assert_ne!(&second[name], before, "{name} was rewritten");
        } else {
            assert_eq!(&second[name], before, "{name} was left alone");
        }
    }

    // A device leaves the fleet: its pointer file is deleted, and the build says so.
    // Other files in devices/ are not the bundler's and stay.
    std::fs::write(out_dir.path().join("devices/README"), "not a pointer\n").expect("write");
    std::fs::write(out_dir.path().join("devices/.x.json"), "{}").expect("write");
    repo.remove("devices/sensor-hub-01.yaml");
    repo.commit_at("retire sensor-hub-01", 1_800_000_600);
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["removed"], serde_json::json!(["sensor-hub-01"]));
    assert_eq!(out.json()["pointers_deleted"], serde_json::json!(["sensor-hub-01"]));
    out.assert_stderr_has("deleted the pointer files of 1 device(s) no longer in the fleet: sensor-hub-01");
    assert!(!out_dir.path().join("devices/sensor-hub-01.json").exists());
    assert!(
        out_dir.path().join("devices/README").exists() && out_dir.path().join("devices/.x.json").exists()
    );
    std::fs::remove_file(out_dir.path().join("devices/README")).expect("rm");
    std::fs::remove_file(out_dir.path().join("devices/.x.json")).expect("rm");
    assert_pointers_match_the_index(out_dir.path());
}

#[test]
fn damaged_or_missing_pointer_files_are_written_again() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    // A truncated file (a crash, a bad upload), a missing one, and a stray device's file
    // left by an output directory whose index.json was deleted.
    let devices = out_dir.path().join("devices");
    std::fs::write(devices.join("gw-munich-01.json"), "{\"fleet\":").expect("truncate");
    std::fs::remove_file(devices.join("gw-berlin-01.json")).expect("rm");
    std::fs::write(devices.join("gw-gone-01.json"), "{}").expect("stray");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["written"], 0, "no bundle changed");
    assert_eq!(out.json()["pointers_written"], 2);
    assert_eq!(out.json()["pointers_deleted"], serde_json::json!(["gw-gone-01"]));
    assert_pointers_match_the_index(out_dir.path());
}

/// Issue 18: `build` writes the static dashboard next to the bundles, with the broker's
/// WebSocket URL and the fleet in `config.js`; the same commit gives the same bytes.
#[test]
fn build_writes_the_dashboard_with_its_broker_url_and_no_dashboard_skips_it() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().to_str().expect("utf-8");
    let key = keys.secret();
    let base = ["build", "--repo", repo.path_str(), "--rev", "HEAD", "--key", &key, "--out"];
    let with = |out: &str, extra: &[&str]| {
        let mut args = base.to_vec();
        args.push(out);
        args.extend(extra);
        bundler(&args)
    };
    with(out, &["--dashboard-broker", "wss://broker.example.com:8084/mqtt"]).assert_code(0);
    let dash = out_dir.path().join("dashboard");
    let files =
        ["index.html", "style.css", "app.js", "config.js", "vendor/mqtt.min.js", "vendor/mqtt.LICENSE.md"];
    let read_all =
        || files.map(|f| std::fs::read(dash.join(f)).unwrap_or_else(|e| panic!("dashboard/{f}: {e}")));
    let first = read_all();
    let config = String::from_utf8(first[3].clone()).expect("utf-8");
    assert!(config.contains("\"broker\":\"wss://broker.example.com:8084/mqtt\""), "{config}");
    assert!(
        config.contains("\"fleet\":\"acme\"") && config.contains("\"topic_prefix\":\"fleet\""),
        "{config}"
    );
    assert!(config.contains("\"gw-berlin-01\":{\"labels\":{\"channel\":\"canary\""), "{config}");
    with(out, &["--dashboard-broker", "wss://broker.example.com:8084/mqtt"]).assert_code(0);
    assert!(read_all() == first, "a rebuild of the same commit changed the dashboard");

    // Not a WebSocket URL: a usage error before anything is written.
    let bad_dir = tempfile::tempdir().expect("tempdir");
    let bad = with(bad_dir.path().to_str().expect("utf-8"), &["--dashboard-broker", "mqtt://broker:1883"]);
    bad.assert_code(64);
    bad.assert_stderr_has("is not a WebSocket URL");
    assert!(!bad_dir.path().join("index.json").exists(), "nothing is written");

    let none_dir = tempfile::tempdir().expect("tempdir");
    with(none_dir.path().to_str().expect("utf-8"), &["--no-dashboard"]).assert_code(0);
    assert!(!none_dir.path().join("dashboard").exists(), "--no-dashboard wrote a dashboard");
    assert!(none_dir.path().join("index.json").exists());
}
