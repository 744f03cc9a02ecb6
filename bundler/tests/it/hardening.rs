//! Hardening: limits on what the bundler reads and renders (file size, template work,
//! Git LFS pointers), the commit date checks, and versions that stay newer than what
//! devices hold after a lost build cache.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    bundle_files, bundler, free_port, git_in, have, mosquitto, read_index, wait_for_port, Daemon, Keys, Repo,
};

const FLEET: &str = "name: test\n";
const DEVICE: &str = "labels:\n  site: a\nvars:\n  port: 8080\n";
const APP: &str = "files:\n  - source: files/web.conf\n    template: true\n";

/// A small valid fleet (one device, one app with a template) plus `extra` files,
/// committed at `time`.
fn small_fleet(extra: &[(&str, &str)], time: i64) -> Repo {
    let repo = Repo::new();
    for (path, content) in [
        ("fleet.yaml", FLEET),
        ("devices/dev-1.yaml", DEVICE),
        ("apps/web/app.yaml", APP),
        ("apps/web/files/web.conf", "listen {{ device.vars.port }};\n"),
    ] {
        repo.write(path, content);
    }
    for (path, content) in extra {
        repo.write(path, content);
    }
    repo.commit_at("test", time);
    repo
}

fn validate(repo: &Repo, extra: &[&str]) -> crate::common::Output {
    let mut args = vec!["validate", "--repo", repo.path_str()];
    args.extend_from_slice(extra);
    bundler(&args)
}

// ---- Hardening II, part 3: what is read from Git and what templates may do ----------

#[test]
fn a_file_larger_than_the_limit_is_refused_with_its_size_and_how_to_raise_it() {
    let app = "files:\n  - source: files/web.conf\n    template: true\n  - source: files/firmware.img\n";
    let repo = small_fleet(&[], 1_800_000_000);
    repo.write("apps/web/app.yaml", app);
    // 17 MiB: over a limit of 16 MiB (zeros: Git stores them compressed).
    let big = vec![0u8; 17 << 20];
    std::fs::write(repo.path().join("apps/web/files/firmware.img"), &big).expect("write");
    repo.commit_at("firmware", 1_800_000_100);

    let out = validate(&repo, &["--max-file-size", "16MiB"]);
    out.assert_code(65);
    out.assert_stderr_has(
        "apps/web/files/firmware.img: error: 17.0 MiB (17825792 bytes) is larger than the limit of \
         16.0 MiB (16777216 bytes) for one file read from Git: pass --max-file-size (e.g. --max-file-size 32MiB)",
    );
    assert!(!out.stderr.contains("does not exist"), "reported once, by size: {}", out.stderr);

    // The flag (or FLEET_MAX_FILE_SIZE) raises it; build and plan take it too.
    validate(&repo, &["--max-file-size", "32MiB"]).assert_code(0);
    let lower = validate(&repo, &["--max-file-size", "10"]);
    lower.assert_code(65);
    lower.assert_stderr_has("apps/web/app.yaml: error: 84 bytes is larger than the limit of 10 bytes");
    lower.assert_stderr_has("fleet.yaml: error: 11 bytes is larger");
    for misleading in ["fleet.yaml: error: missing", "needs an app.yaml", "does not exist"] {
        assert!(!lower.stderr.contains(misleading), "only the sizes are reported: {}", lower.stderr);
    }
    let plan = bundler(&[
        "plan",
        "--repo",
        repo.path_str(),
        "--from",
        "HEAD~1",
        "--to",
        "HEAD",
        "--max-file-size",
        "32m",
    ]);
    plan.assert_code(2);
    bundler(&["validate", "--repo", repo.path_str(), "--max-file-size", "lots"])
        .assert_code(64)
        .assert_stderr_has("invalid size \"lots\"");
}

#[test]
fn a_template_with_nested_loops_runs_out_of_fuel_in_bounded_time() {
    let template =
        "header\n{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}\n";
    let repo = small_fleet(&[("apps/web/files/web.conf", template)], 1_800_000_000);
    let started = Instant::now();
    let out = validate(&repo, &[]);
    let took = started.elapsed();
    out.assert_code(65);
    out.assert_stderr_has("apps/web/files/web.conf:2: error: template: the template does too much work");
    out.assert_stderr_has("(device dev-1)");
    assert!(took < Duration::from_secs(30), "bounded time, took {took:?}");
}

#[test]
fn a_template_that_renders_more_than_the_file_limit_is_refused() {
    let template = "{{ 'x' * 3000000 }}\n";
    let repo = small_fleet(&[("apps/web/files/web.conf", template)], 1_800_000_000);
    let out = validate(&repo, &["--max-file-size", "2m"]);
    out.assert_code(65);
    out.assert_stderr_has(
        "apps/web/files/web.conf: error: template: renders more than 2.0 MiB (2097152 bytes), the limit of one file",
    );
    validate(&repo, &["--max-file-size", "4m"]).assert_code(0);
}

/// A fleet whose `apps/web/files/firmware.bin` (4 KiB) is tracked with the real git-lfs;
/// `None` (test skipped) when git-lfs is not installed.
fn lfs_fleet(test: &str) -> Option<(Repo, Vec<u8>)> {
    if !have("git-lfs") {
        eprintln!("SKIPPED {test}: git-lfs is not installed (apt-get install -y git-lfs)");
        return None;
    }
    let app = "files:\n  - source: files/web.conf\n    template: true\n  - source: files/firmware.bin\n";
    let repo = small_fleet(&[("apps/web/app.yaml", app)], 1_800_000_000);
    repo.git(&["lfs", "install", "--local"]);
    repo.git(&["lfs", "track", "*.bin"]);
    let firmware: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(repo.path().join("apps/web/files/firmware.bin"), &firmware).expect("write");
    repo.commit_at("firmware through LFS", 1_800_000_100);
    // What Git holds is the pointer, made by git-lfs's clean filter.
    let blob = git_in(repo.path(), &["cat-file", "-p", "HEAD:apps/web/files/firmware.bin"], &[]);
    assert!(blob.starts_with("version https://git-lfs.github.com/spec/v1"), "{blob}");
    Some((repo, firmware))
}

fn lfs_objects(repo: &Repo) -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                walk(&entry.path(), out);
            } else {
                out.push(entry.path());
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo.path().join(".git/lfs/objects"), &mut out);
    out
}

#[test]
fn git_lfs_files_are_delivered_as_their_real_content() {
    let Some((repo, firmware)) = lfs_fleet("git_lfs_files_are_delivered_as_their_real_content") else {
        return;
    };
    validate(&repo, &[]).assert_code(0);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    crate::common::build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    let verified = crate::common::open_bundle(out.path(), "dev-1", &keys);
    let file =
        verified.state.files.iter().find(|f| f.path.ends_with("/firmware.bin")).expect("firmware delivered");
    assert_eq!(file.content, firmware, "the LFS object's bytes, not the pointer");

    // A CI clone made without LFS has the pointer only: refused with the file, the object
    // and what to do; nothing built. After `git lfs pull` it builds the same bundle.
    let ci = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", repo.path_str());
    git_in(ci.path(), &["clone", "-q", &url, "clone"], &[]);
    let clone = ci.path().join("clone");
    let clone_str = clone.to_str().expect("utf-8");
    assert!(!clone.join(".git/lfs/objects").exists(), "the clone fetched LFS objects by itself");
    let o = bundler(&["validate", "--repo", clone_str]);
    o.assert_code(65);
    o.assert_stderr_has("apps/web/files/firmware.bin: error: is a Git LFS pointer, and its object (sha256 ");
    o.assert_stderr_has(
        "4.0 KiB (4096 bytes)) is not in this clone's LFS store: fetch the LFS objects before building (`git lfs pull`",
    );
    o.assert_stderr_has(
        "apps/web/app.yaml:4:13: error: file source `files/firmware.bin` is a Git LFS pointer",
    );
    let out2 = tempfile::tempdir().expect("tempdir");
    crate::common::build(&clone, "HEAD", &keys, out2.path()).assert_code(65);
    assert!(!out2.path().join("index.json").exists());

    git_in(&clone, &["lfs", "pull"], &[]);
    crate::common::build(&clone, "HEAD", &keys, out2.path()).assert_code(0);
    let index = |dir: &Path| crate::common::read_index(dir)["devices"]["dev-1"]["digest"].clone();
    assert_eq!(index(out2.path()), index(out.path()), "the clone builds the same bundle");
}

#[test]
fn a_damaged_or_oversized_git_lfs_object_is_refused() {
    let Some((repo, _)) = lfs_fleet("a_damaged_or_oversized_git_lfs_object_is_refused") else { return };
    let objects = lfs_objects(&repo);
    assert_eq!(objects.len(), 1, "{objects:?}");
    // Over --max-file-size: the pointer's size is what counts, the object is not read.
    let o = validate(&repo, &["--max-file-size", "1k"]);
    o.assert_code(65);
    o.assert_stderr_has("apps/web/files/firmware.bin");
    o.assert_stderr_has("4.0 KiB (4096 bytes)");
    // Damaged: other bytes under the object's name (a broken cache, a tampered store).
    std::fs::write(&objects[0], vec![0u8; 4096]).expect("write");
    let o = validate(&repo, &[]);
    o.assert_code(1);
    o.assert_stderr_has("apps/web/files/firmware.bin: the Git LFS object ");
    o.assert_stderr_has("is damaged (its sha256 is ");
    o.assert_stderr_has("delete it and fetch it again (`git lfs pull`)");
    // A malformed pointer committed by hand is refused, never delivered.
    let pointer = git_in(repo.path(), &["cat-file", "-p", "HEAD:apps/web/files/firmware.bin"], &[]);
    let swapped: String = {
        let mut lines: Vec<&str> = pointer.lines().collect();
        lines.swap(1, 2); // size before oid: not in the spec's order
        lines.join("\n") + "\n"
    };
    repo.git(&["lfs", "untrack", "*.bin"]);
    std::fs::write(repo.path().join("apps/web/files/firmware.bin"), swapped).expect("write");
    repo.commit_at("a hand-made pointer", 1_800_000_200);
    let o = validate(&repo, &[]);
    o.assert_code(65);
    o.assert_stderr_has(
        "apps/web/files/firmware.bin: error: is a malformed Git LFS pointer (keys not in sorted order",
    );
}

// ---- Hardening I, case 10: commit dates ----------------------------------------------

const T: i64 = 1_800_000_000;

fn build_at(repo: &Repo, keys: &Keys, out: &Path, now: i64, extra: &[&str]) -> crate::common::Output {
    let now = now.to_string();
    let secret = keys.secret();
    let mut args = vec![
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &secret,
        "--out",
        out.to_str().expect("utf-8"),
        "--json",
        "--now",
        &now,
    ];
    args.extend_from_slice(extra);
    bundler(&args)
}

#[test]
fn case_10_a_commit_dated_in_the_future_is_refused() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    // The build machine's clock is an hour behind the commit.
    let o = build_at(&repo, &keys, out.path(), T - 3600, &[]);
    o.assert_code(1);
    o.assert_stderr_has("is dated 2027-01-15T08:00:00Z, 60m ahead of this machine's clock (2027-01-15T07:00:00Z; 5m of skew allowed)");
    o.assert_stderr_has("devices take the signed creation time as a floor for their own clock");
    o.assert_stderr_has("git commit --amend --no-edit");
    o.assert_stderr_has("(nothing was written)");
    assert!(!out.path().join("index.json").exists(), "nothing written");
    assert!(bundle_files(out.path()).is_empty(), "nothing written");

    // Within the allowed skew (5 minutes) the build goes ahead.
    build_at(&repo, &keys, out.path(), T - 240, &[]).assert_code(0);

    // Without --now the machine's own clock counts: a commit dated tomorrow is refused.
    let tomorrow = fleet_bundler::timefmt::now() + 86_400;
    let secret = keys.secret();
    repo.commit_at("from a clock a day ahead", tomorrow);
    let fresh = tempfile::tempdir().expect("tempdir");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-bundler"))
        .args(["build", "--repo", repo.path_str(), "--key", &secret])
        .arg("--out")
        .arg(fresh.path())
        .env_remove("FLEET_BUILD_NOW")
        .env_remove("FLEET_SIGNING_KEY")
        .env("FLEET_AGE_IDENTITY_FILE", crate::common::example_dir().join("EXAMPLE-ONLY-ci-age.txt"))
        .output()
        .expect("run fleet-bundler");
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("ahead of this machine's clock"), "{stderr}");
    assert!(!fresh.path().join("index.json").exists());
}

#[test]
fn case_10_bundles_already_expired_at_build_time_are_refused() {
    let repo = Repo::example();
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    // The example fleet's bundles are valid 90 days; building the commit 91 days later
    // would make bundles every device refuses as expired.
    let o = build_at(&repo, &keys, out.path(), T + 91 * 86_400, &[]);
    o.assert_code(1);
    o.assert_stderr_has(
        "would expire at 2027-04-15T08:00:00Z (its committer date 2027-01-15T08:00:00Z + bundle_expiry 90d), \
         which is already past (2027-04-16T08:00:00Z): devices refuse expired bundles; build a newer commit",
    );
    assert!(!out.path().join("index.json").exists(), "nothing written");

    // With less than half of the validity left: built, with a warning.
    let o = build_at(&repo, &keys, out.path(), T + 50 * 86_400, &[]);
    o.assert_code(0);
    o.assert_stderr_has("warning: the bundles of commit ");
    o.assert_stderr_has(
        "expire at 2027-04-15T08:00:00Z (in 40d), less than half of bundle_expiry (90d) from now",
    );
    assert!(o.json()["warnings"][0].as_str().is_some_and(|w| w.contains("less than half")));
}

// ---- Hardening I, case 12: a lost build cache and a committer clock behind ------------

/// The example fleet built at `T` into `published` (what the bundle server holds), then
/// one device changed in a commit dated 1000 s *before* the first (a clock behind).
fn published_then_changed_behind() -> (Repo, Keys, tempfile::TempDir) {
    let repo = Repo::example();
    let keys = Keys::new();
    let published = tempfile::tempdir().expect("tempdir");
    build_at(&repo, &keys, published.path(), T + 60, &[]).assert_code(0);
    repo.edit("devices/gw-munich-01.yaml", "Munich, line 3", "Munich, line 5");
    repo.commit_at("munich: line 5 (committer clock behind)", T - 1000);
    (repo, keys, published)
}

/// Whether a device holding `held` (version) accepts `device`'s bundle of `out`.
fn device_accepts(out: &Path, device: &str, keys: &Keys, held: u64) -> Result<(), String> {
    let index = read_index(out);
    let digest = index["devices"][device]["digest"].as_str().expect("digest");
    let bytes = std::fs::read(out.join(format!("bundles/{digest}.bundle"))).expect("bundle");
    let trusted = fleet_spec::TrustedKeys::new(vec![keys.public_key()], 1).expect("trust");
    let trust = fleet_spec::TrustState { last_version: Some(held), last_known_time: T };
    fleet_spec::verify(
        &bytes,
        &trusted,
        fleet_spec::Expectation { fleet: "acme", device },
        trust,
        T + 120,
        &fleet_spec::Limits::default(),
    )
    .map(drop)
    .map_err(|e| e.code().to_string())
}

#[test]
fn case_12_without_previous_the_versions_are_older_and_the_build_says_so() {
    let (repo, keys, _published) = published_then_changed_behind();
    let lost_cache = tempfile::tempdir().expect("tempdir");
    let o = build_at(&repo, &keys, lost_cache.path(), T + 120, &[]);
    o.assert_code(0);
    o.assert_stderr_has(
        "index.json does not exist and no --previous was given: versions start at the commit time",
    );
    o.assert_stderr_has("pass --previous <URL or directory of the published build>");
    // What the issue saw: every device refuses the new bundles.
    assert_eq!(read_index(lost_cache.path())["devices"]["gw-munich-01"]["version"], (T - 1000) as u64);
    assert_eq!(device_accepts(lost_cache.path(), "gw-munich-01", &keys, T as u64), Err("not_newer".into()));
}

#[test]
fn case_12_build_previous_dir_keeps_versions_newer_than_the_published_ones() {
    let (repo, keys, published) = published_then_changed_behind();
    let before = read_index(published.path());
    let lost_cache = tempfile::tempdir().expect("tempdir");
    let previous = published.path().to_str().expect("utf-8");
    let o = build_at(&repo, &keys, lost_cache.path(), T + 120, &["--previous", previous]);
    o.assert_code(0);
    assert!(!o.stderr.contains("versions start at the commit time"), "{}", o.stderr);
    assert_eq!(o.json()["warnings"], serde_json::json!([]));
    let summary = o.json();
    assert_eq!(
        summary["changed"],
        serde_json::json!(["gw-munich-01"]),
        "only the changed device gets a bundle"
    );
    assert_eq!(summary["adopted"], 5, "the others keep the published bundles");
    let after = read_index(lost_cache.path());
    assert_eq!(after["devices"]["gw-munich-01"]["version"], (T + 1) as u64, "published version + 1");
    for kept in ["gw-berlin-01", "gw-berlin-02", "sensor-hub-01"] {
        assert_eq!(after["devices"][kept], before["devices"][kept], "{kept} keeps bundle and version");
        let digest = after["devices"][kept]["digest"].as_str().expect("digest");
        assert!(
            lost_cache.path().join(format!("bundles/{digest}.bundle")).exists(),
            "{kept}'s bundle copied"
        );
    }
    device_accepts(lost_cache.path(), "gw-munich-01", &keys, T as u64).expect("the device accepts it");

    // A directory of another fleet is refused; a directory that does not exist too.
    let other = tempfile::tempdir().expect("tempdir");
    std::fs::write(other.path().join("index.json"), r#"{"fleet":"other","commit":"c","devices":{}}"#)
        .expect("write");
    let o = build_at(
        &repo,
        &keys,
        lost_cache.path(),
        T + 120,
        &["--previous", other.path().to_str().expect("utf-8")],
    );
    o.assert_code(1);
    o.assert_stderr_has("belongs to fleet \"other\", this repository is fleet \"acme\"");
    let o = build_at(&repo, &keys, lost_cache.path(), T + 120, &["--previous", "/nonexistent/published"]);
    o.assert_code(1);
    o.assert_stderr_has("--previous /nonexistent/published: no such directory");
}

#[test]
fn case_12_build_previous_url_reads_the_published_index_over_http() {
    if !have("python3") {
        eprintln!("SKIPPED case_12_build_previous_url_reads_the_published_index_over_http: python3 (its http.server) is not installed");
        return;
    }
    let (repo, keys, published) = published_then_changed_behind();
    let server = static_server(published.path());
    let url = format!("http://127.0.0.1:{}/", server.port);
    let lost_cache = tempfile::tempdir().expect("tempdir");
    let o = build_at(&repo, &keys, lost_cache.path(), T + 120, &["--previous", &url]);
    o.assert_code(0);
    assert_eq!(o.json()["adopted"], 5);
    assert_eq!(read_index(lost_cache.path())["devices"]["gw-munich-01"]["version"], (T + 1) as u64);
    device_accepts(lost_cache.path(), "gw-munich-01", &keys, T as u64).expect("the device accepts it");

    // Nothing published there yet (404): a warning, versions from the commit time.
    let empty = tempfile::tempdir().expect("tempdir");
    let server = static_server(empty.path());
    let url = format!("http://127.0.0.1:{}", server.port);
    let fresh = tempfile::tempdir().expect("tempdir");
    let o = build_at(&repo, &keys, fresh.path(), T + 120, &["--previous", &url]);
    o.assert_code(0);
    o.assert_stderr_has("holds no index.json (nothing published there yet?)");

    // An unreachable server fails the build: it cannot know which versions are newer.
    let url = format!("http://127.0.0.1:{}", free_port());
    let o = build_at(&repo, &keys, fresh.path(), T + 120, &["--previous", &url, "--previous-timeout", "5s"]);
    o.assert_code(1);
    o.assert_stderr_has(&format!("--previous: cannot fetch {url}/index.json"));
}

/// `python3 -m http.server` serving `dir` on a free loopback port.
fn static_server(dir: &Path) -> Daemon {
    let port = free_port();
    let child = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start python3 -m http.server");
    wait_for_port(port, "http.server");
    Daemon { child, _dir: tempfile::tempdir().expect("tempdir"), port }
}

#[test]
fn case_12_publish_refuses_a_version_not_newer_than_the_retained_one() {
    let broker = mosquitto("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let (repo, keys, published) = published_then_changed_behind();
    let publish = |out: &Path| {
        bundler(&[
            "publish",
            "--out",
            out.to_str().expect("utf-8"),
            "--broker",
            &url,
            "--base-url",
            "http://files.local/fleet",
            "--settle",
            "300ms",
            "--json",
        ])
    };
    publish(published.path()).assert_code(0);

    // The lost-cache build (versions from a commit dated before the published one).
    let lost_cache = tempfile::tempdir().expect("tempdir");
    build_at(&repo, &keys, lost_cache.path(), T + 120, &[]).assert_code(0);
    let o = publish(lost_cache.path());
    o.assert_code(5);
    o.assert_stderr_has(&format!(
        "device gw-munich-01: the broker retains version {T} (bundle {}) on fleet/acme/devices/gw-munich-01/desired, \
         this build has version {} (bundle ",
        &read_index(published.path())["devices"]["gw-munich-01"]["digest"].as_str().expect("digest")[..12],
        T - 1000
    ));
    o.assert_stderr_has("nothing was published: devices refuse a version that is not newer");
    o.assert_stderr_has(
        "rebuild with `fleet-bundler build --previous <URL or directory of the published build>`",
    );
    assert!(!lost_cache.path().join("published.json").exists(), "nothing recorded as published");
    let retained = retained_version(broker.port, "gw-munich-01");
    assert_eq!(retained, T as u64, "the retained announcement is untouched");

    // Rebuilt with --previous: publishes; unchanged devices are re-announced as they were.
    let rebuilt = tempfile::tempdir().expect("tempdir");
    let previous = published.path().to_str().expect("utf-8");
    build_at(&repo, &keys, rebuilt.path(), T + 120, &["--previous", previous]).assert_code(0);
    let o = publish(rebuilt.path());
    o.assert_code(0);
    assert_eq!(o.json()["announced"].as_array().expect("list").len(), 6);
    assert_eq!(retained_version(broker.port, "gw-munich-01"), (T + 1) as u64);
}

/// Case 12 for rollouts: `rollout` reads the retained announcements as `publish` does,
/// before it releases or announces anything.
#[test]
fn case_12_a_rollout_does_not_start_with_versions_not_newer_than_the_retained_ones() {
    let broker = mosquitto("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let (repo, keys, published) = published_then_changed_behind();
    let out = |dir: &Path| dir.to_str().expect("utf-8").to_string();
    bundler(&[
        "publish",
        "--out",
        &out(published.path()),
        "--broker",
        &url,
        "--base-url",
        "http://f/x",
        "--settle",
        "300ms",
    ])
    .assert_code(0);
    // The change is rolled out this time, from a build that lost its output directory.
    let fleet_yaml = std::fs::read_to_string(repo.path().join("fleet.yaml")).expect("fleet.yaml");
    repo.write("fleet.yaml", &format!("{fleet_yaml}rollout:\n  waves:\n    - name: all\n"));
    repo.commit_at("roll out", T - 999);
    let lost_cache = tempfile::tempdir().expect("tempdir");
    build_at(&repo, &keys, lost_cache.path(), T + 120, &[]).assert_code(0);
    let o = bundler(&[
        "rollout",
        "--out",
        &out(lost_cache.path()),
        "--broker",
        &url,
        "--base-url",
        "http://f/x",
        "--settle",
        "300ms",
        "--once",
    ]);
    o.assert_code(5);
    o.assert_stderr_has("device gw-munich-01: the broker retains version");
    o.assert_stderr_has("then publish (or roll out) again");
    assert!(!lost_cache.path().join("devices/gw-munich-01.json").exists(), "no wave released");
    assert_eq!(retained_version(broker.port, "gw-munich-01"), T as u64, "nothing announced");
    let state = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "fleet/acme/rollout",
            "-C",
            "1",
            "-W",
            "1",
        ])
        .output()
        .expect("mosquitto_sub");
    assert!(
        state.stdout.is_empty(),
        "no rollout state published: {}",
        String::from_utf8_lossy(&state.stdout)
    );
}

fn retained_version(port: u16, device: &str) -> u64 {
    let out = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &format!("fleet/acme/devices/{device}/desired"), "-C", "1", "-W", "5"])
        .output()
        .expect("mosquitto_sub");
    let a = fleet_spec::messages::Announcement::from_json(out.stdout.trim_ascii()).expect("announcement");
    a.version
}
