//! Hardening: limits on what the bundler reads and renders (file size, template work,
//! Git LFS pointers), the commit date checks, and versions that stay newer than what
//! devices hold after a lost build cache.

use std::time::{Duration, Instant};

use crate::common::{bundler, git_in, have, Repo};

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
    // 17 MiB: over the default limit of 16 MiB (zeros: Git stores them compressed).
    let big = vec![0u8; 17 << 20];
    std::fs::write(repo.path().join("apps/web/files/firmware.img"), &big).expect("write");
    repo.commit_at("firmware", 1_800_000_100);

    let out = validate(&repo, &[]);
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
    assert!(!lower.stderr.contains("fleet.yaml: error: missing"), "{}", lower.stderr);
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

#[test]
fn git_lfs_pointer_files_are_refused_as_content() {
    if !have("git-lfs") {
        eprintln!("SKIPPED git_lfs_pointer_files_are_refused_as_content: git-lfs is not installed (apt-get install -y git-lfs)");
        return;
    }
    let app = "files:\n  - source: files/web.conf\n    template: true\n  - source: files/firmware.bin\n";
    let repo = small_fleet(&[("apps/web/app.yaml", app)], 1_800_000_000);
    repo.git(&["lfs", "install", "--local"]);
    repo.git(&["lfs", "track", "*.bin"]);
    std::fs::write(repo.path().join("apps/web/files/firmware.bin"), vec![7u8; 4096]).expect("write");
    repo.commit_at("firmware through LFS", 1_800_000_100);
    // What Git holds is the pointer, made by git-lfs's clean filter.
    let blob = git_in(repo.path(), &["cat-file", "-p", "HEAD:apps/web/files/firmware.bin"], &[]);
    assert!(blob.starts_with("version https://git-lfs.github.com/spec/v1"), "{blob}");

    let out = validate(&repo, &[]);
    out.assert_code(65);
    out.assert_stderr_has(
        "apps/web/files/firmware.bin: error: is a Git LFS pointer, not the file of 4.0 KiB (4096 bytes): \
         the bundler reads what is committed to Git and does not fetch LFS objects",
    );
    out.assert_stderr_has("commit the file itself without LFS");
    out.assert_stderr_has(
        "apps/web/app.yaml:4:13: error: file source `files/firmware.bin` is a Git LFS pointer",
    );
}
