//! Every validation error path: the message names the file, line and column, what is
//! wrong and what is allowed; all problems of a run are reported together.

use crate::common::{bundler, Repo};

const FLEET: &str = "name: test\n";
const DEVICE: &str = "labels:\n  site: a\nvars:\n  port: 8080\n";
const APP: &str = "files:\n  - source: files/web.conf\n    template: true\n";
const TEMPLATE: &str = "listen {{ device.vars.port }};\n";
const COMPOSE: &str = "services:
  web:
    image: nginx:1.27@sha256:0000000000000000000000000000000000000000000000000000000000000000
    ports:
      - \"${port}:80\"
    volumes:
      - ./files/web.conf:/etc/nginx/conf.d/default.conf:ro
";

/// A small valid fleet with `changes` applied (`None` deletes a file), committed.
fn repo_with(changes: &[(&str, Option<&str>)]) -> Repo {
    let repo = Repo::new();
    for (path, content) in [
        ("fleet.yaml", FLEET),
        ("devices/dev-1.yaml", DEVICE),
        ("apps/web/app.yaml", APP),
        ("apps/web/files/web.conf", TEMPLATE),
        ("apps/web/compose.yaml", COMPOSE),
    ] {
        repo.write(path, content);
    }
    for (path, content) in changes {
        match content {
            Some(c) => repo.write(path, c),
            None => repo.remove(path),
        }
    }
    repo.commit_at("test", 1_800_000_000);
    repo
}

/// Validates and expects exit 65 with every `expected` text on stderr.
#[track_caller]
fn check(changes: &[(&str, Option<&str>)], expected: &[&str]) {
    let repo = repo_with(changes);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65);
    for e in expected {
        out.assert_stderr_has(e);
    }
}

#[test]
fn the_base_fleet_is_valid() {
    let repo = repo_with(&[]);
    let out = bundler(&["validate", "--repo", repo.path_str(), "--json"]);
    out.assert_code(0);
    let json = out.json();
    assert_eq!(json["ok"], true);
    assert_eq!(json["devices"], 1);
    assert_eq!(json["errors"], 0);
}

#[test]
fn fleet_yaml_errors() {
    check(&[("fleet.yaml", None)], &["fleet.yaml: error: missing: the repository root needs a fleet.yaml"]);
    check(
        &[("fleet.yaml", Some("name: test\nbogus: 1\n"))],
        &["fleet.yaml:2:1: error: unknown key `bogus` (allowed keys: name,"],
    );
    check(
        &[("fleet.yaml", Some("name: bad/name\n"))],
        &["fleet.yaml:1:7: error: fleet id \"bad/name\" contains '/'"],
    );
    check(
        &[("fleet.yaml", Some("name: t\nbundle_expiry: soon\n"))],
        &["fleet.yaml:2:16: error: invalid duration \"soon\""],
    );
    check(
        &[("fleet.yaml", Some("name: t\nbundle_expiry: 5m\n"))],
        &["fleet.yaml:2:16: error: bundle_expiry must be at least 1h"],
    );
    check(
        &[("fleet.yaml", Some("name: t\ntopic_prefix: a/+\n"))],
        &["fleet.yaml:2:15: error: topic prefix level \"+\""],
    );
    check(
        &[("fleet.yaml", Some("name: t\nfile_root: relative\n"))],
        &["fleet.yaml:2:12: error: file_root `relative` must be an absolute path"],
    );
    check(&[("fleet.yaml", Some("name: [t\n"))], &["fleet.yaml:1:"]);
}

#[test]
fn device_file_errors() {
    check(
        &[("devices/dev-1.yaml", Some("labels:\n  site: a\ncolour: red\n"))],
        &["devices/dev-1.yaml:3:1: error: unknown key `colour` (allowed keys: public_key, labels, vars, policy, maintenance, agent)"],
    );
    // Issue 13: `public_key:` is an age X25519 recipient, checked where it is written.
    check(
        &[("devices/dev-1.yaml", Some("labels:\n  site: a\npublic_key: age1notarecipient\n"))],
        &["devices/dev-1.yaml:3:13: error: `public_key`: \"age1notarecipient\" is not an age X25519 recipient"],
    );
    check(
        &[("devices/bad+id.yaml", Some("labels: {}\n"))],
        &["devices/bad+id.yaml: error: the file name is the device id: device id \"bad+id\" contains '+'"],
    );
    check(
        &[("devices/readme.txt", Some("x"))],
        &["devices/readme.txt: error: devices/ holds one <device id>.yaml file per device"],
    );
    check(&[("devices/dev-1.yaml", Some("labels:\n  site: [a\n"))], &["devices/dev-1.yaml:2:"]);
    check(&[("devices/dev-1.yaml", Some("labels:\n  site: {a: b}\n"))], &["devices/dev-1.yaml:2:9: error:"]);
}

#[test]
fn app_yaml_errors() {
    check(
        &[("apps/web/app.yaml", None)],
        &["apps/web/app.yaml: error: missing: every app directory needs an app.yaml"],
    );
    check(
        &[("apps/web/app.yaml", Some("files: []\nselect: {}\n"))],
        &["apps/web/app.yaml:2:1: error: unknown key `select`: did you mean `selector`?"],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: files/missing.conf\n"))],
        &["apps/web/app.yaml:2:13: error: file source `files/missing.conf` does not exist: expected apps/web/files/missing.conf in the commit"],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: ../other/x\n"))],
        &["apps/web/app.yaml:2:13: error: file source `../other/x` must be a path inside apps/web/"],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: files/web.conf\n    mode: rw\n"))],
        &["apps/web/app.yaml:3:11: error: mode `rw` is not octal permission bits"],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: files/web.conf\n    target: etc/web.conf\n"))],
        &["apps/web/app.yaml:3:13: error: file target `etc/web.conf` must be an absolute file path"],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: files/web.conf\n    owner: root\n"))],
        &["apps/web/app.yaml:3:12: error: owner `root` must be numeric \"uid:gid\""],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: files/web.conf\n    target: /etc/a\n  - source: files/web.conf\n    target: /etc/a\n"))],
        &["apps/web/app.yaml:4:13: error: target /etc/a is also written by the file at line 2"],
    );
    check(
        &[("apps/web/app.yaml", Some("files:\n  - source: files/web.conf\n    templat: true\n"))],
        &["apps/web/app.yaml:3:5: error: unknown key `templat`: did you mean `template`?"],
    );
    check(
        &[("apps/web/app.yaml", Some("compose: other.yaml\n"))],
        &["apps/web/app.yaml:1:10: error: compose file `other.yaml` does not exist"],
    );
    check(
        &[("apps/Bad+App/app.yaml", Some("{}\n"))],
        &["apps/Bad+App: error: the directory name is the app name"],
    );
}

#[test]
fn template_errors_name_file_line_and_device() {
    check(
        &[("apps/web/files/web.conf", Some("a\n{% if %}\n"))],
        &["apps/web/files/web.conf:2: error: template: syntax error"],
    );
    check(
        &[("apps/web/files/web.conf", Some("a\nb {{ device.vars.nope }}\n"))],
        &["apps/web/files/web.conf:2: error: template: undefined value", "(device dev-1)"],
    );
}

#[test]
fn compose_refused_keys_are_named() {
    let compose = "services:\n  web:\n    build: .\n    image: x:1\n    annotations: {a: b}\n";
    check(
        &[("apps/web/compose.yaml", Some(compose))],
        &[
            "apps/web/compose.yaml:3:12: error: `build:` is not supported: devices pull images, build them in CI",
            "apps/web/compose.yaml:5:18: error: `annotations:` is not supported",
        ],
    );
    check(
        &[("apps/web/compose.yaml", Some("services:\n  web:\n    build: .\n"))],
        &["apps/web/compose.yaml:3:12: error: `build:` is not supported"],
    );
    check(
        &[("apps/web/compose.yaml", Some("services:\n  web:\n    image: x:1\n    env_file: .env\n"))],
        &["apps/web/compose.yaml:4:15: error: env_file `.env` is not in the commit (looked for apps/web/.env)"],
    );
    check(
        &[("apps/web/compose.yaml", Some("services:\n  web:\n    image: x:1\n    imagee: y\n"))],
        &["apps/web/compose.yaml:4:5: error: unknown key `imagee`: did you mean `image`?"],
    );
    check(
        &[("apps/web/compose.yaml", Some("services:\n  web:\n    image: x:1\nsecrets:\n  a: {external: true}\n"))],
        &["apps/web/compose.yaml:5:17: error: `secrets.NAME.external:` is not supported: the agent delivers every secret from the commit"],
    );
}

#[test]
fn compose_value_errors() {
    let cases: &[(&str, &str)] = &[
        ("services:\n  web:\n    ports: [\"80:80\"]\n", "apps/web/compose.yaml:2:3: error: service `web` has no `image:`"),
        ("services:\n  web:\n    image: x:1\n    volumes: [\"data:/d\"]\n", "apps/web/compose.yaml:4:15: error: volume `data` is not declared under the top-level `volumes:`"),
        ("services:\n  web:\n    image: x:1\n    networks: [front]\n", "apps/web/compose.yaml:4:16: error: network `front` is not declared under the top-level `networks:`"),
        ("services:\n  web:\n    image: x:1\n    ports: [\"99999:80\"]\n", "apps/web/compose.yaml:4:13: error: port `99999:80` is not valid"),
        ("services:\n  web:\n    image: x:1\n    depends_on: [db]\n", "apps/web/compose.yaml:4:18: error: depends_on names `db`, which is not a service of this app"),
        ("services:\n  a:\n    image: x:1\n    depends_on: [b]\n  b:\n    image: x:1\n    depends_on: [a]\n", "error: depends_on cycle"),
        ("services:\n  web:\n    image: x:1\n    restart: sometimes\n", "apps/web/compose.yaml:4:14: error: restart policy `sometimes` is not valid: use no, always, on-failure or unless-stopped"),
        ("services:\n  web:\n    image: x:1\n    healthcheck:\n      test: [CMD, x]\n      interval: 10 seconds\n", "apps/web/compose.yaml:6:17: error: invalid duration \"10 seconds\""),
        ("services:\n  web:\n    image: x:1\n    healthcheck:\n      test: [curl, x]\n", "apps/web/compose.yaml:5:13: error: a healthcheck `test:` list must start with \"CMD\""),
        ("services:\n  web:\n    image: x:1\n    environment:\n      - DEBUG\n", "apps/web/compose.yaml:5:9: error: environment variable `DEBUG` has no value"),
        ("services:\n  web:\n    image: x:1\n    volumes: [\"~/data:/d\"]\n", "apps/web/compose.yaml:4:15: error: bind source `~/data` is home-relative"),
        ("services:\n  web:\n    image: x:1\n    volumes: [\"../../etc:/d\"]\n", "apps/web/compose.yaml:4:15: error: bind source `../../etc` leaves the app directory"),
        ("services:\n  web:\n    image: x:1\n    mem_limit: lots\n", "apps/web/compose.yaml:4:16: error: invalid size \"lots\""),
        ("services:\n  web:\n    image: x:1\n    command: \"echo 'unclosed\"\n", "apps/web/compose.yaml:4:14: error: cannot split `echo 'unclosed` into words"),
        ("services:\n  web:\n    image: x:1\n    container_name: a\n", "apps/web/compose.yaml:4:21: error: container name `a` is invalid"),
        ("services:\n  web:\n    image: x:1\n    network_mode: host\n    networks: [default]\n", "apps/web/compose.yaml:5:16: error: `networks:` cannot be combined with `network_mode:`"),
        ("services:\n  web:\n    image: x:1\nnetworks:\n  n:\n    driver: overlay\n", "apps/web/compose.yaml:6:13: error: network driver `overlay` is not supported"),
        ("services:\n  web:\n    image: x:1\n    volumes: [\"/a:/d\", \"/b:/d\"]\n", "apps/web/compose.yaml:4:24: error: /d is already mounted at line 4"),
        ("services:\n  web:\n    image: x:1\n    ports: [{target: 80, protocol: sctp}]\n", "apps/web/compose.yaml:4:36: error: protocol `sctp` is not supported"),
        ("services: {}\n", "apps/web/compose.yaml: error: `services:` is empty"),
    ];
    let mut failures = Vec::new();
    for (compose, expected) in cases {
        let repo = repo_with(&[("apps/web/compose.yaml", Some(compose))]);
        let out = bundler(&["validate", "--repo", repo.path_str()]);
        if out.code != 65 || !out.stderr.contains(expected) {
            failures
                .push(format!("{compose}\n  expected {expected:?}\n  got ({}): {}", out.code, out.stderr));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn unset_compose_variables_name_the_device() {
    let compose = "services:\n  web:\n    image: x:1\n    environment:\n      TZ: ${TIMEZONE}\n";
    check(
        &[("apps/web/compose.yaml", Some(compose))],
        &[
            "apps/web/compose.yaml:5:11: error: variable `TIMEZONE` is not set for this device",
            "(device dev-1)",
        ],
    );
    // A default makes it valid.
    let repo = repo_with(&[(
        "apps/web/compose.yaml",
        Some("services:\n  web:\n    image: x:1\n    environment:\n      TZ: ${TIMEZONE:-UTC}\n"),
    )]);
    bundler(&["validate", "--repo", repo.path_str()]).assert_code(0);
}

#[test]
fn conflicts_between_apps_on_one_device() {
    check(
        &[
            (
                "apps/other/app.yaml",
                Some("files:\n  - source: f\n    target: /srv/fleet/web/files/web.conf\n"),
            ),
            ("apps/other/f", Some("x")),
            (
                "apps/other/compose.yaml",
                Some("services:\n  x:\n    image: x:1\n    container_name: web-web\n"),
            ),
        ],
        &[
            "target /srv/fleet/web/files/web.conf is also delivered by app `other` to this device",
            "container name `web-web` is also used by app `other` on this device",
        ],
    );
}

#[test]
fn all_errors_of_a_run_are_reported_together() {
    let repo = repo_with(&[
        ("fleet.yaml", Some("name: test\nbogus: 1\n")),
        ("devices/dev-2.yaml", Some("labls: {}\n")),
        ("apps/db/app.yaml", Some("{}\n")),
        ("apps/db/compose.yaml", Some("services:\n  db:\n    build: .\n")),
        ("apps/web/files/web.conf", Some("{{ device.vars.nope }}\n")),
    ]);
    let out = bundler(&["validate", "--repo", repo.path_str(), "--json"]);
    out.assert_code(65);
    let json = out.json();
    let files: Vec<String> = json["diagnostics"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["file"].as_str().expect("file").to_string())
        .collect();
    for f in ["fleet.yaml", "devices/dev-2.yaml", "apps/db/compose.yaml", "apps/web/files/web.conf"] {
        assert!(files.iter().any(|x| x == f), "no diagnostic for {f}: {files:?}");
    }
    assert!(json["errors"].as_u64().expect("count") >= 4);
}

#[test]
fn warnings_do_not_fail_validation() {
    let compose = "services:\n  web:\n    image: x:1\n    volumes: [\"./data:/d\"]\n";
    let repo = repo_with(&[("apps/web/compose.yaml", Some(compose))]);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(0);
    out.assert_stderr_has(
        "apps/web/compose.yaml:4:15: warning: bind source `./data` is not a file delivered by this app",
    );
}

#[test]
fn a_missing_revision_is_a_clear_failure() {
    let repo = repo_with(&[]);
    let out = bundler(&["validate", "--repo", repo.path_str(), "--rev", "no-such-branch"]);
    out.assert_code(1);
    out.assert_stderr_has("no branch, tag or commit \"no-such-branch\"");
    let out = bundler(&["validate", "--repo", "/nonexistent/repo"]);
    out.assert_code(1);
    out.assert_stderr_has("no Git repository at or above /nonexistent/repo");
}

#[test]
fn bad_flags_exit_64() {
    bundler(&["validate", "--no-such-flag"]).assert_code(64);
    bundler(&["--help"]).assert_code(0);
}
