//! Issue 14 on the command line: `rollout:` in fleet.yaml is checked with file:line:col,
//! `build` keeps the new pointer files in `devices.next/` and records the waves, and
//! `publish` refuses such a build. (The rollout itself runs in the e2e tests.)

use crate::common::*;

const ROLLOUT: &str = "rollout:\n  waves:\n    - name: canary\n      selector: {channel: canary}\n      soak: 1m\n    - name: early\n      percent: 50\n    - name: rest\n  halt:\n    max_failed: 1\n";

fn fleet(rollout: &str) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", &format!("name: acme\n{rollout}"));
    for i in 0..10 {
        let channel = if i < 2 { "canary" } else { "stable" };
        repo.write(&format!("devices/dev-{i}.yaml"), &format!("labels:\n  channel: {channel}\n"));
    }
    repo.write("apps/motd/app.yaml", "files:\n  - source: motd\n");
    repo.write("apps/motd/motd", "hello\n");
    repo.commit_at("fleet", 1_800_000_000);
    repo
}

#[test]
fn rollout_mistakes_are_named_with_file_line_and_column() {
    let repo = fleet(
        "rollout:\n  waves:\n    - name: canary\n      selector: {channel: canary}\n      sok: 1m\n    - name: rest\n  halt:\n    max_failed_rate: 2\n",
    );
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65).assert_stderr_has("fleet.yaml:6:7: error: unknown key `sok`: did you mean `soak`?");
    let repo = fleet("rollout:\n  waves:\n    - name: a\n      percent: 150\n    - name: b\n  halt:\n    max_failed_rate: 2\n");
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65)
        .assert_stderr_has("fleet.yaml:5:16: error: percent must be above 0 and at most 100")
        .assert_stderr_has("fleet.yaml:8:22: error: max_failed_rate is a fraction from 0 to 1");
    // A last wave with a selector leaves devices in no wave.
    let repo = fleet("rollout:\n  waves:\n    - name: canary\n      selector: {channel: canary}\n");
    bundler(&["validate", "--repo", repo.path_str()])
        .assert_code(65)
        .assert_stderr_has("8 device(s) are in no wave");
}

#[test]
fn a_build_with_a_rollout_keeps_its_pointer_files_aside_and_records_the_waves() {
    let repo = fleet(ROLLOUT);
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert_eq!(out.json()["rollout"], true);
    let index = read_index(out_dir.path());
    let waves = index["rollout"]["devices"].as_object().expect("waves of the devices");
    let count = |w: u64| waves.values().filter(|v| v.as_u64() == Some(w)).count();
    assert_eq!((count(0), count(1), count(2)), (2, 4, 4), "{index}");
    assert_eq!(index["rollout"]["waves"][0]["soak_ms"], 60_000);
    for i in 0..10 {
        assert!(out_dir.path().join(format!("devices.next/dev-{i}.json")).exists());
        assert!(!out_dir.path().join(format!("devices/dev-{i}.json")).exists(), "polled before its wave");
    }
    let publish = bundler(&[
        "publish",
        "--out",
        out_dir.path().to_str().expect("utf-8"),
        "--broker",
        "mqtt://127.0.0.1:1",
        "--base-url",
        "http://x",
    ]);
    publish.assert_code(64).assert_stderr_has("fleet-bundler rollout --out");
}
