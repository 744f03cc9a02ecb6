//! Issue 20, "First hour": a new user follows the README and never hits a wall. Each
//! test runs the real binary the way a newcomer would and pins what they see: the
//! message, what to do next, and the exit code.

use crate::common::{bundler, git_in, Repo};

const FLEET: &str = "name: test\n";
const DEVICE: &str = "labels:\n  site: a\n";

/// A small valid fleet, committed.
fn fleet() -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", FLEET);
    repo.write("devices/dev-1.yaml", DEVICE);
    repo.write("apps/web/app.yaml", "{}\n");
    repo.commit_at("fleet", 1_800_000_000);
    repo
}

// Point 1: edit -> validate sees the edit.

#[test]
fn validate_names_the_files_the_commit_does_not_hold_yet() {
    let repo = fleet();
    repo.write("fleet.yaml", "name: test\nbogus: 1\n");
    repo.write("devices/dev-2.yaml", DEVICE);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    // The commit is still valid: that is what `build` would bundle.
    out.assert_code(0)
        .assert_stderr_has("warning: the work tree differs from commit")
        .assert_stderr_has("fleet.yaml (modified)")
        .assert_stderr_has("devices/dev-2.yaml (not committed)")
        .assert_stderr_has("take --worktree");

    let json = bundler(&["validate", "--repo", repo.path_str(), "--json"]);
    json.assert_code(0);
    let uncommitted = &json.json()["uncommitted"];
    assert_eq!(uncommitted[0]["path"], "devices/dev-2.yaml");
    assert_eq!(uncommitted[0]["change"], "not_committed");
    assert_eq!(uncommitted[1]["path"], "fleet.yaml");
    assert_eq!(uncommitted[1]["change"], "modified");
}

#[test]
fn validate_worktree_checks_the_files_on_disk() {
    let repo = fleet();
    repo.write("fleet.yaml", "name: test\nbogus: 1\n");
    let out = bundler(&["validate", "--repo", repo.path_str(), "--worktree"]);
    out.assert_code(65)
        .assert_stderr_has("fleet.yaml:2:1: error: unknown key `bogus`")
        .assert_stderr_has("in the work tree");
    assert!(!out.stderr.contains("work tree differs"), "{}", out.stderr);
}

#[test]
fn a_clean_work_tree_gets_no_warning_and_deleted_files_are_named() {
    let repo = fleet();
    let clean = bundler(&["validate", "--repo", repo.path_str()]);
    clean.assert_code(0);
    assert!(!clean.stderr.contains("warning:"), "{}", clean.stderr);
    repo.remove("devices/dev-1.yaml");
    bundler(&["validate", "--repo", repo.path_str()])
        .assert_code(0)
        .assert_stderr_has("devices/dev-1.yaml (deleted)");
}

#[test]
fn another_revision_than_head_is_not_compared_with_the_work_tree() {
    let repo = fleet();
    repo.write("devices/dev-2.yaml", DEVICE);
    repo.commit_at("second", 1_800_000_100);
    repo.write("fleet.yaml", "name: test\nbogus: 1\n");
    let out = bundler(&["validate", "--repo", repo.path_str(), "--rev", "HEAD~1"]);
    out.assert_code(0);
    assert!(!out.stderr.contains("work tree differs"), "{}", out.stderr);
}

#[test]
fn plan_warns_about_uncommitted_changes_and_worktree_plans_them() {
    let repo = fleet();
    repo.write("devices/dev-2.yaml", DEVICE);
    let head = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD"]);
    head.assert_code(0).assert_stderr_has("devices/dev-2.yaml (not committed)");
    let worktree = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD", "--worktree", "--json"]);
    worktree.assert_code(2);
    let plan = worktree.json();
    assert_eq!(plan["to"], "work tree");
    assert_eq!(plan["devices"][0]["device"], "dev-2");
    assert_eq!(plan["devices"][0]["change"], "added");
    // --worktree replaces --to.
    bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD", "--to", "HEAD", "--worktree"])
        .assert_code(64);
}

#[test]
fn build_bundles_the_commit_and_names_what_it_leaves_out() {
    let repo = fleet();
    repo.write("devices/dev-2.yaml", DEVICE);
    let keys = crate::common::Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let o = crate::common::build(repo.path(), "HEAD", &keys, out.path());
    o.assert_code(0).assert_stderr_has("devices/dev-2.yaml (not committed)");
    assert_eq!(o.json()["devices"], 1, "the commit's one device is built");
}

#[test]
fn a_repository_without_a_commit_says_what_to_do() {
    let repo = Repo::new();
    repo.write("fleet.yaml", FLEET);
    repo.write("devices/dev-1.yaml", DEVICE);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(1)
        .assert_stderr_has("has no commit yet: commit your fleet files (git add . && git commit)")
        .assert_stderr_has("--worktree");
    assert!(!out.stderr.contains("rev-spec"), "gix's words leak: {}", out.stderr);
    bundler(&["validate", "--repo", repo.path_str(), "--worktree"]).assert_code(0);
}

#[test]
fn the_repository_is_found_from_a_subdirectory() {
    let repo = fleet();
    let devices = repo.path().join("devices");
    let out = bundler(&["validate", "--repo", devices.to_str().expect("utf-8")]);
    out.assert_code(0).assert_stderr_has("ok: fleet test at");
    let nowhere = tempfile::tempdir().expect("tempdir");
    bundler(&["validate", "--repo", nowhere.path().to_str().expect("utf-8")])
        .assert_code(1)
        .assert_stderr_has("no Git repository at or above");
}

#[test]
fn a_revision_beyond_the_history_says_how_far_it_goes() {
    let repo = fleet();
    repo.commit_at("second", 1_800_000_100);
    let out = bundler(&["validate", "--repo", repo.path_str(), "--rev", "HEAD~5"]);
    out.assert_code(1).assert_stderr_has(
        "\"HEAD~5\" goes back further than the history of HEAD, which has 1 earlier commit(s)",
    );
    assert!(!out.stderr.contains("delegate") && !out.stderr.contains("NthAncestor"), "{}", out.stderr);
    bundler(&["validate", "--repo", repo.path_str(), "--rev", "no-such-branch"])
        .assert_code(1)
        .assert_stderr_has("no branch, tag or commit \"no-such-branch\"");
}

#[test]
fn a_shallow_clone_says_to_fetch_more_history() {
    let repo = fleet();
    repo.commit_at("second", 1_800_000_100);
    let clone = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", repo.path_str());
    git_in(clone.path(), &["clone", "-q", "--depth", "1", &url, "c"], &[]);
    let path = clone.path().join("c");
    let out = bundler(&["validate", "--repo", path.to_str().expect("utf-8"), "--rev", "HEAD~1"]);
    out.assert_code(1).assert_stderr_has("shallow clone").assert_stderr_has("git fetch --unshallow");
}

// Point 8: exit codes and flags.

/// A fleet built into a fresh output directory.
fn built() -> (Repo, crate::common::Keys, tempfile::TempDir) {
    let repo = fleet();
    let keys = crate::common::Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    crate::common::build(repo.path(), "HEAD", &keys, out.path()).assert_code(0);
    (repo, keys, out)
}

#[test]
fn publish_usage_errors_exit_64() {
    let (_repo, _keys, out) = built();
    let dir = out.path().to_str().expect("utf-8");
    bundler(&["publish", "--out", dir, "--broker", "http://broker", "--base-url", "http://x"])
        .assert_code(64)
        .assert_stderr_has("broker URL \"http://broker\" is not mqtt://host[:port]");
    let empty = tempfile::tempdir().expect("tempdir");
    let empty = empty.path().to_str().expect("utf-8");
    bundler(&["publish", "--out", empty, "--broker", "mqtt://127.0.0.1:1", "--base-url", "http://x"])
        .assert_code(64)
        .assert_stderr_has("index.json does not exist: run `fleet-bundler build --out");
    bundler(&["publish", "--out", dir, "--broker", "mqtt://127.0.0.1:1"])
        .assert_code(64)
        .assert_stderr_has("pass --base-url URL and/or --blobs-over-mqtt");
    let missing_ca = out.path().join("no-ca.pem");
    bundler(&[
        "publish",
        "--out",
        dir,
        "--broker",
        "mqtts://127.0.0.1:1",
        "--base-url",
        "http://x",
        "--ca-file",
        missing_ca.to_str().expect("utf-8"),
    ])
    .assert_code(64)
    .assert_stderr_has("no-ca.pem does not exist");
}

#[test]
fn status_usage_errors_exit_64() {
    let (_repo, _keys, out) = built();
    let index = out.path().join("index.json");
    let index = index.to_str().expect("utf-8");
    let broker = "mqtt://127.0.0.1:1";
    for (args, says) in [
        (vec!["status", "--broker", "foo://x", "--fleet", "acme"], "is not mqtt://host[:port]"),
        (
            vec!["status", "--broker", broker, "--index", "/no/such/index.json"],
            "/no/such/index.json does not exist",
        ),
        (vec!["status", "--broker", broker, "--index", index, "--selector", "channel"], "is not key=value"),
        (
            vec!["status", "--broker", broker, "--fleet", "acme", "--selector", "a=b"],
            "--selector needs --index",
        ),
        (vec!["status", "--broker", broker, "--fleet", "acme", "--wait"], "--index"),
        (
            vec!["status", "--broker", broker, "--fleet", "acme", "--serve", "127.0.0.1:0", "--json"],
            "cannot be used with",
        ),
        (vec!["status", "--broker", broker], "pass --fleet NAME or --index"),
        (vec!["status", "--broker", broker, "--fleet", "bad/fleet"], "bad/fleet"),
        (vec!["exporter", "--broker", "foo://x", "--fleet", "acme"], "is not mqtt://host[:port]"),
    ] {
        let o = bundler(&args);
        assert_eq!(o.code, 64, "{args:?}: {o:?}");
        o.assert_stderr_has(says);
    }
}

/// Runs `status --wait` (plus `extra`) against `broker`, sends it `signal` after it has
/// connected, and returns its exit code, stdout and stderr.
fn interrupted_wait(
    port: u16,
    index: &std::path::Path,
    signal: &str,
    extra: &[&str],
) -> (Option<i32>, String, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-bundler"))
        .args(["status", "--broker", &format!("mqtt://127.0.0.1:{port}"), "--index"])
        .arg(index)
        .args(["--wait", "--timeout", "60s"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start status --wait");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let kill =
        std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let output = child.wait_with_output().expect("status exits");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn ctrl_c_during_status_wait_is_an_interruption_not_a_timeout() {
    let broker = crate::common::mosquitto("allow_anonymous true");
    let (_repo, _keys, out) = built();
    let index = out.path().join("index.json");
    let (code, _, stderr) = interrupted_wait(broker.port, &index, "-INT", &[]);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after"), "{stderr}");
    assert!(!stderr.contains("timeout"), "{stderr}");
    // A cancelled CI job (SIGTERM), with --json: 143 and the outcome on stdout.
    let (code, stdout, stderr) = interrupted_wait(broker.port, &index, "-TERM", &["--json"]);
    assert_eq!(code, Some(143), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(json["outcome"], "terminated");
}

#[test]
fn keygen_json_names_the_key_id_and_both_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    let o = bundler(&["keygen", "--out", keys.to_str().expect("utf-8"), "--json"]);
    o.assert_code(0);
    let json = o.json();
    let id = json["key_id"].as_str().expect("key_id");
    assert_eq!(id.len(), 16, "{json}");
    assert_eq!(json["secret"], keys.join("signing.key").to_str().expect("utf-8"));
    assert_eq!(json["public"], keys.join("signing.pub").to_str().expect("utf-8"));
    // A file where the directory should be is named as such.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    bundler(&["keygen", "--out", file.to_str().expect("utf-8")])
        .assert_code(1)
        .assert_stderr_has("a-file is a file, not a directory");
}

#[test]
fn verify_json_reports_a_refusal_with_its_reason() {
    let (_repo, keys, out) = built();
    let dir = out.path().to_str().expect("utf-8");
    let garbage = out.path().join("garbage.bundle");
    std::fs::write(&garbage, b"not a bundle").expect("write");
    let o = bundler(&["verify", "--pub", &keys.public(), "--json", garbage.to_str().expect("utf-8")]);
    o.assert_code(1);
    let json = o.json();
    assert_eq!(json["ok"], false);
    assert!(json["reason"].as_str().is_some_and(|r| !r.is_empty()), "{json}");
    assert!(json["message"].as_str().expect("message").contains("does not verify"), "{json}");

    // More signatures asked than keys given: the command line's mistake.
    let o = bundler(&[
        "verify",
        "--pub",
        &keys.public(),
        "--threshold",
        "2",
        "--json",
        garbage.to_str().expect("utf-8"),
    ]);
    o.assert_code(64).assert_stderr_has("threshold 2 is impossible with 1 distinct trusted key(s)");
    assert_eq!(o.json()["reason"], "usage");

    let missing = format!("{dir}/missing.pub");
    let o = bundler(&["verify", "--pub", &missing, "--json", garbage.to_str().expect("utf-8")]);
    o.assert_code(1);
    assert_eq!(o.json()["reason"], "key_file");
    // The OS error once, naming the file.
    assert_eq!(o.stderr.matches("(os error 2)").count(), 1, "{}", o.stderr);
    o.assert_stderr_has("missing.pub");
}

#[test]
fn an_os_error_is_printed_once_and_names_the_file() {
    let repo = fleet();
    let out = tempfile::tempdir().expect("tempdir");
    let o = bundler(&[
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        "/no/such/signing.key",
        "--out",
        out.path().to_str().expect("utf-8"),
    ]);
    o.assert_code(1)
        .assert_stderr_has("cannot read key file /no/such/signing.key: No such file or directory");
    assert_eq!(o.stderr.matches("(os error 2)").count(), 1, "{}", o.stderr);
}

#[test]
fn every_subcommand_help_lists_its_exit_codes() {
    for sub in ["keygen", "validate", "build", "plan", "publish", "verify", "status", "exporter", "rollout"] {
        let o = bundler(&[sub, "--help"]);
        o.assert_code(0);
        assert!(o.stdout.contains("Exit codes:"), "{sub} --help has no exit codes:\n{}", o.stdout);
        assert!(o.stdout.contains("64 usage"), "{sub} --help lacks the usage code:\n{}", o.stdout);
    }
    let top = bundler(&["--help"]);
    assert!(top.stdout.contains("130"), "{}", top.stdout);
}

// Point 6: every problem of a run at once, root causes first.

#[test]
fn a_broken_fleet_yaml_comes_first_and_what_it_may_cause_is_marked() {
    let repo = fleet();
    repo.write("fleet.yaml", "name: test\nvars: {greeting: hi\n");
    repo.write("apps/web/app.yaml", "files:\n  - source: files/motd\n    template: true\n");
    repo.write("apps/web/files/motd", "{{ fleet.vars.greeting }}\n");
    repo.commit_at("broken", 1_800_000_100);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65).assert_stderr_has("fleet.yaml has errors, so devices were rendered without its vars");
    let first = out.stderr.lines().next().expect("a line");
    assert!(first.starts_with("fleet.yaml:2:"), "fleet.yaml first: {}", out.stderr);
    // The template is fine; only a fleet.yaml without its vars makes it fail: marked.
    out.assert_stderr_has(
        "apps/web/files/motd:1: error: (maybe because of fleet.yaml) template: undefined value: `fleet.vars.greeting`",
    );
    let motd = out.stderr.lines().position(|l| l.contains("motd")).expect("motd");
    assert!(motd > 0, "after fleet.yaml's error: {}", out.stderr);
}

#[test]
fn every_unknown_key_of_every_file_is_reported_in_file_order() {
    let repo = fleet();
    repo.write("fleet.yaml", "name: test\nbogus: 1\nvar: {}\n");
    repo.write(
        "devices/dev-1.yaml",
        "lables: {site: a}\npolicy:\n  capabilitis: []\n  allow_everything: true\n",
    );
    repo.write("apps/web/app.yaml", "selectr: {}\nfiles:\n  - source: x\n    templat: true\n");
    repo.commit_at("typos", 1_800_000_100);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains(": error: ")).collect();
    let places: Vec<&str> = errors.iter().map(|l| l.split(": error: ").next().expect("place")).collect();
    assert_eq!(
        places,
        [
            "fleet.yaml:2:1",
            "fleet.yaml:3:1",
            "devices/dev-1.yaml:1:1",
            "devices/dev-1.yaml:3:3",
            "devices/dev-1.yaml:4:3",
            "apps/web/app.yaml:1:1",
            "apps/web/app.yaml:4:5",
        ],
        "{}",
        out.stderr
    );
    out.assert_stderr_has("fleet.yaml:3:1: error: unknown key `var`: did you mean `vars`?")
        .assert_stderr_has("devices/dev-1.yaml:1:1: error: unknown key `lables`: did you mean `labels`?")
        .assert_stderr_has(
            "devices/dev-1.yaml:3:3: error: unknown key `capabilitis`: did you mean `capabilities`?",
        )
        .assert_stderr_has("apps/web/app.yaml:4:5: error: unknown key `templat`: did you mean `template`?");
    // No suggestion that is not a likely typo.
    assert!(!errors[4].contains("did you mean"), "{}", errors[4]);
}

// Point 7: messages that say what is wrong and what to do.

#[test]
fn an_undefined_template_variable_is_named_with_the_nearest_defined_one() {
    let repo = fleet();
    repo.write("devices/dev-1.yaml", "labels:\n  site: a\nvars:\n  proto: tcp\n");
    repo.write("apps/web/app.yaml", "files:\n  - source: files/conf\n    template: true\n");
    repo.write("apps/web/files/conf", "listen\n{{ device.vars.prot }}\n");
    repo.commit_at("typo", 1_800_000_100);
    bundler(&["validate", "--repo", repo.path_str()]).assert_code(65).assert_stderr_has(
        "apps/web/files/conf:2: error: template: undefined value: `device.vars.prot` is undefined: did you mean `device.vars.proto`? (device dev-1)",
    );
}

#[test]
fn every_unknown_key_of_a_compose_file_is_reported() {
    let repo = fleet();
    repo.write(
        "apps/web/compose.yaml",
        "services:\n  web:\n    image: nginx\n    port:\n      - 80:80\n    restrat: always\nvolume: {}\n",
    );
    repo.commit_at("compose", 1_800_000_100);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65)
        .assert_stderr_has("apps/web/compose.yaml:4:5: error: unknown key `port`: did you mean `ports`?")
        .assert_stderr_has("apps/web/compose.yaml:6:5: error: unknown key `restrat`: did you mean `restart`?")
        .assert_stderr_has("apps/web/compose.yaml:7:1: error: unknown key `volume`: did you mean `volumes`?")
        .assert_stderr_has("3 error(s)");
}

#[test]
fn a_compose_unknown_key_does_not_offer_refused_keys() {
    let repo = fleet();
    repo.write("apps/web/compose.yaml", "services:\n  web:\n    image: nginx\n    imagee: x\n");
    repo.commit_at("compose", 1_800_000_100);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65)
        .assert_stderr_has("apps/web/compose.yaml:4:5: error: unknown key `imagee`: did you mean `image`?");
    let line = out.stderr.lines().find(|l| l.contains("imagee")).expect("the error");
    for refused in ["build", "extends", "links", "volumes_from"] {
        assert!(!line.contains(&format!(" {refused},")), "{refused} is offered: {line}");
    }
}

#[test]
fn a_directory_where_a_file_belongs_names_the_file_to_pass() {
    let (repo, keys, out) = built();
    let key_dir =
        std::path::Path::new(&keys.secret()).parent().expect("keys/").to_str().expect("utf-8").to_string();
    let o = bundler(&[
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &key_dir,
        "--out",
        out.path().to_str().expect("utf-8"),
    ]);
    o.assert_code(1).assert_stderr_has(&format!(
        "--key {key_dir} is a directory: pass the key file in it ({key_dir}/signing.key)"
    ));
    let bundle = out.path().join("index.json");
    bundler(&["verify", "--pub", &key_dir, bundle.to_str().expect("utf-8")])
        .assert_code(1)
        .assert_stderr_has(&format!("({key_dir}/signing.pub)"));
    let dir = out.path().to_str().expect("utf-8");
    bundler(&["status", "--broker", "mqtt://127.0.0.1:1", "--index", dir]).assert_code(64).assert_stderr_has(
        &format!("--index {dir} is a directory: pass the build's index.json ({dir}/index.json)"),
    );
}
