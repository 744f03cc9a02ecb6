//! Artifacts (bundle format 5) on real Git repositories: large files leave the bundle
//! for `OUT/blobs/<sha256>`, shared and written once; the inline budget; reproducible
//! builds; `plan` and `verify` name them; `export` writes the bundle and its blobs as one
//! ustar file.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::common::{bundler, bundler_env, have, open_bundle, read_index, Keys, Output, Repo};

const MODEL: &str = "/srv/fleet/web/files/model.bin";
const SMALL: &str = "/srv/fleet/web/files/small.conf";
const T: i64 = 1_800_000_000;

/// `len` bytes that do not repeat in any short period.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Two devices with the app `web`: `files/small.conf` and the files of `big` (name, bytes).
fn fleet(big: &[(&str, Vec<u8>)]) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: test\n");
    repo.write("devices/dev-1.yaml", "labels:\n  site: a\n");
    repo.write("devices/dev-2.yaml", "labels:\n  site: b\n");
    let mut app = String::from("files:\n  - source: files/small.conf\n");
    for (name, content) in big {
        app.push_str(&format!("  - source: files/{name}\n"));
        std::fs::create_dir_all(repo.path().join("apps/web/files")).expect("mkdir");
        std::fs::write(repo.path().join("apps/web/files").join(name), content).expect("write");
    }
    repo.write("apps/web/app.yaml", &app);
    repo.write("apps/web/files/small.conf", "level = 1\n");
    repo.commit_at("fleet", T);
    repo
}

fn build(repo: &Repo, keys: &Keys, out: &Path, extra: &[&str]) -> Output {
    let key = keys.secret();
    let mut args = vec![
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &key,
        "--out",
        out.to_str().expect("utf-8"),
        "--no-dashboard",
        "--json",
    ];
    args.extend_from_slice(extra);
    bundler(&args)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn blob_names(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("blobs"))
        .map(|d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn export(out: &Path, device: &str, file: &Path, json: bool) -> Output {
    let mut args = vec![
        "export",
        "--out",
        out.to_str().expect("utf-8"),
        "--device",
        device,
        "--file",
        file.to_str().expect("utf-8"),
    ];
    if json {
        args.push("--json");
    }
    bundler(&args)
}

#[test]
fn a_file_above_the_threshold_travels_as_one_blob_shared_by_both_devices() {
    let model = bytes(300 << 10, 1);
    let repo = fleet(&[("model.bin", model.clone())]);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let built = build(&repo, &keys, out.path(), &[]);
    built.assert_code(0);
    let summary = built.json();
    assert_eq!((summary["blobs"].as_u64(), summary["blobs_written"].as_u64()), (Some(1), Some(1)));
    built.assert_stderr_has("1 artifact blob(s) (1 written)");

    let sha = sha256_hex(&model);
    for device in ["dev-1", "dev-2"] {
        let verified = open_bundle(out.path(), device, &keys);
        let state = &verified.state;
        assert!(state.file(MODEL).is_none(), "not inline");
        assert!(state.file(SMALL).is_some(), "the small file stays inline");
        assert_eq!(state.artifacts.len(), 1);
        let a = &state.artifacts[0];
        assert_eq!((a.path.as_str(), a.size, a.sha256_hex()), (MODEL, model.len() as u64, sha.clone()));
        assert_eq!(a.mode, 0o644);
        assert_eq!(state.format(), 5);
        assert!(verified.manifest.compressed_size < 4096, "the bundle stays small");
    }
    assert_eq!(blob_names(out.path()), std::slice::from_ref(&sha), "one blob for both devices");
    assert_eq!(std::fs::read(out.path().join("blobs").join(&sha)).expect("blob"), model);

    // `verify` lists it, with --json too.
    let digest = read_index(out.path())["devices"]["dev-1"]["digest"].as_str().expect("digest").to_string();
    let bundle = out.path().join(format!("bundles/{digest}.bundle"));
    let bundle = bundle.to_str().expect("utf-8");
    let text = bundler(&["verify", "--pub", &keys.public(), bundle]);
    text.assert_code(0);
    assert!(text.stdout.contains(&format!("0644   307200 {MODEL} sha256 {sha}")), "{}", text.stdout);
    let json = bundler(&["verify", "--pub", &keys.public(), "--json", bundle]);
    let json = json.assert_code(0).json();
    assert_eq!(json["artifacts"][0]["path"], MODEL);
    assert_eq!(json["artifacts"][0]["sha256"], sha.as_str());
    assert_eq!(json["artifacts"][0]["size"], model.len() as u64);
    assert_eq!(json["artifacts"][0]["blob"], format!("blobs/{sha}").as_str());
    assert_eq!(json["files"].as_array().map(Vec::len), Some(1));
}

#[test]
fn changing_a_small_file_beside_a_big_one_keeps_the_artifact_and_does_not_rewrite_its_blob() {
    let model = bytes(512 << 10, 2);
    let repo = fleet(&[("model.bin", model.clone())]);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &[]).assert_code(0);
    let sha = sha256_hex(&model);
    let blob = out.path().join("blobs").join(&sha);
    let before = std::fs::metadata(&blob).expect("blob");
    let first = open_bundle(out.path(), "dev-1", &keys);

    repo.write("apps/web/files/small.conf", "level = 2\n");
    repo.commit_at("level 2", T + 100);
    let again = build(&repo, &keys, out.path(), &[]);
    again.assert_code(0);
    let summary = again.json();
    assert_eq!(summary["written"], 2, "both devices changed");
    assert_eq!((summary["blobs"].as_u64(), summary["blobs_written"].as_u64()), (Some(1), Some(0)));
    let second = open_bundle(out.path(), "dev-1", &keys);
    assert!(second.manifest.version > first.manifest.version);
    assert_eq!(second.state.file(SMALL).map(|f| f.content.clone()), Some(b"level = 2\n".to_vec()));
    assert_eq!(second.state.artifacts, first.state.artifacts, "same digest, same size");
    let after = std::fs::metadata(&blob).expect("blob");
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec()),
        (before.ino(), before.mtime(), before.mtime_nsec())
    );
    assert_eq!(blob_names(out.path()), [sha]);
}

#[test]
fn the_inline_budget_moves_the_largest_files_until_the_rest_fits() {
    // All under the threshold; 120 + 110 + 100 KiB + the small file > 250 KiB.
    let files =
        [("a.bin", bytes(120 << 10, 3)), ("b.bin", bytes(110 << 10, 4)), ("c.bin", bytes(100 << 10, 5))];
    let repo = fleet(&files);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &[]).assert_code(0);
    let state = open_bundle(out.path(), "dev-1", &keys).state;
    assert!(state.artifacts.is_empty(), "340 KiB fit the default budget of 1 MiB");

    let budget = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, budget.path(), &["--inline-budget", "250KiB"]).assert_code(0);
    let state = open_bundle(budget.path(), "dev-1", &keys).state;
    let moved: Vec<&str> = state.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(moved, ["/srv/fleet/web/files/a.bin"], "the largest, then 220 KiB fit");
    assert_eq!(state.files.len(), 3);

    // The environment variable and a threshold that takes them all.
    let env = tempfile::tempdir().expect("tempdir");
    let args = [
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &keys.secret(),
        "--out",
        env.path().to_str().expect("utf-8"),
        "--no-dashboard",
    ];
    bundler_env(&args, &[("FLEET_INLINE_BUDGET", "250KiB"), ("FLEET_ARTIFACT_THRESHOLD", "50k")])
        .assert_code(0);
    let state = open_bundle(env.path(), "dev-1", &keys).state;
    assert_eq!(state.artifacts.len(), 3);
    assert_eq!(state.files.len(), 1);
    assert_eq!(blob_names(env.path()).len(), 3);
}

/// Every file under `dir`, by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn a_build_with_artifacts_is_byte_for_byte_reproducible() {
    let repo = fleet(&[("model.bin", bytes(700 << 10, 6)), ("fw.img", bytes(260 << 10, 7))]);
    let keys = Keys::new();
    let (one, two) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    build(&repo, &keys, one.path(), &[]).assert_code(0);
    build(&repo, &keys, two.path(), &[]).assert_code(0);
    let (a, b) = (tree(one.path()), tree(two.path()));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a == b, "the same commit builds the same bytes");
    assert_eq!(a.keys().filter(|k| k.starts_with("blobs/")).count(), 2);
}

#[test]
fn plan_names_artifact_changes_with_size_and_short_digest() {
    let old = bytes(300 << 10, 8);
    let repo = fleet(&[("model.bin", old.clone())]);
    let new = bytes(400 << 10, 9);
    std::fs::write(repo.path().join("apps/web/files/model.bin"), &new).expect("write");
    repo.commit_at("new model", T + 100);
    let out = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD~1", "--to", "HEAD"]);
    out.assert_code(2);
    let line = format!(
        "~ file {MODEL} (artifact, 300.0 KiB, sha256 {}… -> artifact, 400.0 KiB, sha256 {}…)",
        &sha256_hex(&old)[..12],
        &sha256_hex(&new)[..12]
    );
    assert!(out.stdout.contains(&line), "{}", out.stdout);
    assert!(!out.stdout.contains("@@"), "an artifact is not diffed: {}", out.stdout);

    let json = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD~1", "--json"]);
    let json = json.assert_code(2).json();
    let file = &json["devices"][0]["files"][0];
    assert_eq!(file["path"], MODEL);
    assert_eq!(file["artifact"][1]["artifact"], true);
    assert_eq!(file["artifact"][1]["size"], new.len() as u64);
    assert_eq!(file["artifact"][1]["sha256"], sha256_hex(&new).as_str());

    // With a higher threshold plan splits as that build would: inline, hidden (binary).
    let high =
        bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD~1", "--artifact-threshold", "1MiB"]);
    high.assert_code(2);
    assert!(high.stdout.contains(&format!("~ file {MODEL}: content changed (hidden)")), "{}", high.stdout);
}

#[test]
fn export_writes_the_bundle_then_its_blobs_as_a_reproducible_ustar_file() {
    let model = bytes(300 << 10, 10);
    let fw = bytes(270 << 10, 11);
    let repo = fleet(&[("model.bin", model.clone()), ("fw.img", fw.clone())]);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &[]).assert_code(0);
    let file = out.path().join("dev-1.tar");
    let done = export(out.path(), "dev-1", &file, true);
    done.assert_code(0);
    let json = done.json();
    let digest = read_index(out.path())["devices"]["dev-1"]["digest"].as_str().expect("digest").to_string();
    assert_eq!(json["bundle"], digest.as_str());
    assert_eq!(json["device"], "dev-1");
    assert_eq!(json["bytes"], std::fs::metadata(&file).expect("file").len());
    // The state's order: by path.
    let (fw_sha, model_sha) = (sha256_hex(&fw), sha256_hex(&model));
    assert_eq!(json["artifacts"][0]["path"], "/srv/fleet/web/files/fw.img");
    assert_eq!(json["artifacts"][0]["sha256"], fw_sha.as_str());
    assert_eq!(json["artifacts"][1]["size"], model.len() as u64);

    // Read back: names, order, bytes, and the fields that make it reproducible.
    let bundle = std::fs::read(out.path().join(format!("bundles/{digest}.bundle"))).expect("bundle");
    let expected: [(String, &[u8]); 3] = [
        ("bundle".into(), &bundle),
        (format!("blobs/{fw_sha}"), &fw),
        (format!("blobs/{model_sha}"), &model),
    ];
    let mut archive = tar::Archive::new(std::fs::File::open(&file).expect("open"));
    let mut seen = 0;
    for (entry, (name, content)) in archive.entries().expect("entries").zip(&expected) {
        let mut entry = entry.expect("entry");
        let h = entry.header();
        assert_eq!(h.path().expect("path").to_str(), Some(name.as_str()));
        assert!(h.as_ustar().is_some(), "ustar");
        assert_eq!(h.entry_type(), tar::EntryType::Regular);
        assert_eq!(
            (h.mode().ok(), h.mtime().ok(), h.uid().ok(), h.gid().ok()),
            (Some(0o644), Some(0), Some(0), Some(0))
        );
        let mut got = Vec::new();
        entry.read_to_end(&mut got).expect("read");
        assert!(got == *content, "{name}");
        seen += 1;
    }
    assert_eq!(seen, 3);
    assert_eq!(
        tar::Archive::new(std::fs::File::open(&file).expect("open")).entries().expect("entries").count(),
        3
    );

    if have("tar") {
        let listing = Command::new("tar").arg("tvf").arg(&file).output().expect("tar tvf");
        assert!(listing.status.success());
        let listing = String::from_utf8_lossy(&listing.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(lines[0].starts_with("-rw-r--r-- 0/0") && lines[0].ends_with(" bundle"), "{listing}");
        assert!(lines[1].ends_with(&format!(" blobs/{fw_sha}")), "{listing}");
        assert!(
            lines[2].contains(&format!(" {} 1970-01-01 00:00 blobs/{model_sha}", model.len())),
            "{listing}"
        );
    }

    // The same output exports the same bytes; FILE is replaced, no temp file is left.
    let first = std::fs::read(&file).expect("file");
    export(out.path(), "dev-1", &file, false).assert_code(0).assert_stderr_has("and 2 artifact(s)");
    assert!(std::fs::read(&file).expect("file") == first);
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn export_without_a_pointer_file_takes_the_index_and_without_artifacts_holds_the_bundle_only() {
    let repo = fleet(&[]);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &[]).assert_code(0);
    std::fs::remove_file(out.path().join("devices/dev-2.json")).expect("rm pointer");
    let file = out.path().join("dev-2.tar");
    let json = export(out.path(), "dev-2", &file, true).assert_code(0).json();
    assert_eq!(json["artifacts"], serde_json::json!([]));
    let names: Vec<String> = tar::Archive::new(std::fs::File::open(&file).expect("open"))
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["bundle"]);
}

#[test]
fn export_names_a_missing_blob_and_the_file_that_needs_it_and_writes_nothing() {
    let model = bytes(300 << 10, 12);
    let repo = fleet(&[("model.bin", model.clone())]);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &[]).assert_code(0);
    let blob = out.path().join("blobs").join(sha256_hex(&model));
    std::fs::remove_file(&blob).expect("rm blob");
    let file = out.path().join("dev-1.tar");
    let failed = export(out.path(), "dev-1", &file, false);
    failed.assert_code(1);
    failed
        .assert_stderr_has(&format!("blob {} is missing: {MODEL} of device dev-1 needs it", blob.display()));
    assert!(!file.exists(), "nothing written");

    // A blob whose bytes are not the signed ones (same size) is refused too.
    let mut damaged = model.clone();
    damaged[1000] ^= 1;
    std::fs::write(&blob, &damaged).expect("write");
    let failed = export(out.path(), "dev-1", &file, false);
    failed.assert_code(1);
    failed.assert_stderr_has(&format!("blob {} does not hold the bytes {MODEL} needs", blob.display()));
    assert!(!file.exists(), "nothing written");
    let leftovers = std::fs::read_dir(out.path())
        .expect("read_dir")
        .filter(|e| e.as_ref().expect("entry").file_name().to_string_lossy().contains(".tmp."))
        .count();
    assert_eq!(leftovers, 0);

    // A build into the directory writes it again (a device whose bundle is kept too).
    std::fs::remove_file(&blob).expect("rm blob");
    let again = build(&repo, &keys, out.path(), &[]);
    assert_eq!(again.assert_code(0).json()["blobs_written"], 1);
    assert_eq!(std::fs::read(&blob).expect("blob rewritten"), model);
    export(out.path(), "dev-1", &file, false).assert_code(0);
}

#[test]
fn hostile_sizes_and_devices_are_usage_errors() {
    let repo = fleet(&[]);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    for bad in ["lots", "0", "-1", "1TiB", "1.5.5k", ""] {
        // `=`: so "-1" is the flag's value, not a flag of its own.
        build(&repo, &keys, out.path(), &[&format!("--artifact-threshold={bad}")])
            .assert_code(64)
            .assert_stderr_has("for '--artifact-threshold <BYTES>'");
    }
    build(&repo, &keys, out.path(), &["--inline-budget", "zero"]).assert_code(64);
    assert!(!out.path().join("index.json").exists(), "nothing written");

    build(&repo, &keys, out.path(), &[]).assert_code(0);
    let file = out.path().join("x.tar");
    export(out.path(), "dev-9", &file, false).assert_code(64).assert_stderr_has("device dev-9 is not in");
    export(out.path(), "../etc", &file, false).assert_code(64).assert_stderr_has("--device");
    let empty = tempfile::tempdir().expect("tempdir");
    export(empty.path(), "dev-1", &file, false)
        .assert_code(64)
        .assert_stderr_has("pass the output directory");
    assert!(!file.exists());
}
