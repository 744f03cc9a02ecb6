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
        .assert_stderr_has("pass --worktree");

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
        .assert_stderr_has("fleet.yaml:2:1: error: unknown")
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
