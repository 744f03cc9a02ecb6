//! The devices' engine policy (`policy:` in `fleet.yaml` and `devices/<id>.yaml`):
//! `validate` and `build` refuse a service a device's agent would refuse, naming the
//! file and line, the device, the service, what it asks and the policy key that allows
//! it; the same service passes once the device's policy allows it.

use crate::common::{build, bundler, Keys, Repo};

const FLEET: &str = "name: test\n";
const DEVICE: &str = "labels:\n  site: a\n";
const COMPOSE: &str = "services:
  web:
    image: nginx:1.27
    privileged: true
    cap_add:
      - NET_ADMIN
    volumes:
      - /var/run/docker.sock:/var/run/docker.sock
";

fn repo_with(files: &[(&str, &str)]) -> Repo {
    let repo = Repo::new();
    for (path, content) in [
        ("fleet.yaml", FLEET),
        ("devices/dev-1.yaml", DEVICE),
        ("apps/web/app.yaml", "{}\n"),
        ("apps/web/compose.yaml", COMPOSE),
    ] {
        repo.write(path, content);
    }
    for (path, content) in files {
        repo.write(path, content);
    }
    repo.commit_at("test", 1_800_000_000);
    repo
}

fn validate(repo: &Repo) -> crate::common::Output {
    bundler(&["validate", "--repo", repo.path_str()])
}

#[test]
fn policy_validate_refuses_a_service_the_device_policy_denies_with_file_and_line() {
    let repo = repo_with(&[]);
    let out = validate(&repo);
    out.assert_code(65);
    out.assert_stderr_has(
        "apps/web/compose.yaml:2:3: error: container `web-web` (app `web`, service `web`): `privileged: true` \
         is refused by the device's engine policy: allow it with `policy.allow_privileged: true` \
         (in devices/<id>.yaml for this device, or in fleet.yaml for every device) (device dev-1)",
    );
    out.assert_stderr_has(
        "apps/web/compose.yaml:6:9: error: container `web-web` (app `web`, service `web`): `cap_add: NET_ADMIN` \
         is refused by the device's engine policy: allow it by adding `NET_ADMIN` to `policy.capabilities`",
    );
    out.assert_stderr_has("`bind source /var/run/docker.sock` is refused by the device's engine policy: allow it with `policy.allow_engine_socket: true`");
    out.assert_stderr_has("3 error(s)");
}

#[test]
fn policy_validate_passes_when_the_device_policy_allows_the_service() {
    let device = "labels:\n  site: a\npolicy:\n  allow_privileged: true\n  allow_engine_socket: true\n  capabilities: [cap_net_admin]\n";
    let repo = repo_with(&[("devices/dev-1.yaml", device)]);
    validate(&repo).assert_code(0);
}

#[test]
fn policy_fleet_default_applies_and_a_device_key_overrides_it() {
    let fleet = "name: test\npolicy:\n  allow_privileged: true\n  allow_engine_socket: true\n  capabilities: [NET_ADMIN]\n";
    let repo =
        repo_with(&[("fleet.yaml", fleet), ("devices/dev-2.yaml", "policy:\n  allow_privileged: false\n")]);
    let out = validate(&repo);
    out.assert_code(65);
    out.assert_stderr_has("`privileged: true` is refused by the device's engine policy: allow it with `policy.allow_privileged: true` (in devices/<id>.yaml for this device, or in fleet.yaml for every device) (device dev-2)");
    out.assert_stderr_has("1 error(s)");
}

#[test]
fn policy_bind_sources_outside_the_allowed_roots_are_refused_until_listed() {
    let compose = "services:\n  web:\n    image: nginx:1.27\n    volumes:\n      - /data/db:/db\n      - ./files/a.conf:/a.conf\n";
    let repo = repo_with(&[("apps/web/compose.yaml", compose)]);
    let out = validate(&repo);
    out.assert_code(65);
    out.assert_stderr_has("`bind source /data/db` is refused by the device's engine policy: allow it by adding `/data/db` to `policy.bind_roots`");
    out.assert_stderr_has("1 error(s)");
    let fleet = "name: test\npolicy:\n  bind_roots: [/data]\n";
    let repo = repo_with(&[("apps/web/compose.yaml", compose), ("fleet.yaml", fleet)]);
    validate(&repo).assert_code(0);
}

#[test]
fn policy_keys_are_checked_with_file_and_line() {
    let repo = repo_with(&[("devices/dev-1.yaml", "policy:\n  allow_everything: true\n")]);
    validate(&repo)
        .assert_code(65)
        .assert_stderr_has("devices/dev-1.yaml:2:3: error: unknown key `allow_everything`");
    let repo = repo_with(&[("fleet.yaml", "name: test\npolicy:\n  bind_roots:\n    - /srv/../etc\n")]);
    validate(&repo).assert_code(65).assert_stderr_has(
        "fleet.yaml:4:7: error: policy.bind_roots: `/srv/../etc` must be an absolute, normalized path",
    );
}

#[test]
fn policy_require_digest_warns_in_validate_and_fails_a_build_without_pinning() {
    let compose = "services:\n  web:\n    image: nginx:1.27\n";
    let repo = repo_with(&[
        ("apps/web/compose.yaml", compose),
        ("fleet.yaml", "name: test\npolicy:\n  require_digest: true\n"),
    ]);
    validate(&repo)
        .assert_code(0)
        .assert_stderr_has("apps/web/compose.yaml:3:12: warning: container `web-web` (app `web`, service `web`): `image nginx:1.27 (not pinned by digest)` is refused by the device's engine policy: allow it with `policy.require_digest: false`");
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    assert_ne!(out.code, 0, "{out:?}");
    out.assert_stderr_has("dev-1").assert_stderr_has("not pinned by digest");
    assert!(!out_dir.path().join("index.json").exists(), "nothing was written");
}

#[test]
fn policy_host_namespaces_confinement_and_device_rules_are_refused_until_allowed() {
    let compose = "services:
  web:
    image: nginx:1.27
    pid: host
    uts: host
    security_opt: [seccomp=unconfined, no-new-privileges:true]
    device_cgroup_rules: ['c 189:* rmw']
";
    let repo = repo_with(&[("apps/web/compose.yaml", compose)]);
    let out = validate(&repo);
    out.assert_code(65);
    out.assert_stderr_has("`pid: host` is refused by the device's engine policy: allow it by adding `pid` to `policy.host_namespaces`");
    out.assert_stderr_has("`uts: host` is refused by the device's engine policy: allow it by adding `uts` to `policy.host_namespaces`");
    out.assert_stderr_has("`security_opt: seccomp=unconfined` is refused by the device's engine policy: allow it with `policy.allow_unconfined: true`");
    out.assert_stderr_has("`device_cgroup_rules: c 189:* rmw` is refused by the device's engine policy: allow it by adding `c 189:* rmw` to `policy.device_cgroup_rules`");
    out.assert_stderr_has("4 error(s)");
    let fleet = "name: test\npolicy:\n  host_namespaces: [pid, uts]\n  allow_unconfined: true\n  device_cgroup_rules: ['c 189:* rmw']\n";
    let repo = repo_with(&[("apps/web/compose.yaml", compose), ("fleet.yaml", fleet)]);
    validate(&repo).assert_code(0);
    let fleet = "name: test\npolicy:\n  host_namespaces: [net]\n  device_cgroup_rules: ['c 189 rmw']\n";
    let repo = repo_with(&[("fleet.yaml", fleet)]);
    let out = validate(&repo);
    out.assert_code(65);
    out.assert_stderr_has(
        "fleet.yaml:3:21: error: policy.host_namespaces: `net` is not one of pid, ipc, uts, userns, cgroup",
    );
    out.assert_stderr_has(
        "fleet.yaml:4:25: error: policy.device_cgroup_rules: `c 189 rmw` is not a device cgroup rule",
    );
}
