//! The Compose keys of issue 17 through the real `fleet-bundler`: the issue's example
//! (`tests/fixtures/compose/issue-17.yaml`) validates and builds into a bundle carrying
//! every key; `.env` and `env_file:` are read from the commit; errors name the variable.

use std::collections::BTreeMap;

use fleet_spec::model::{LogConfig, RestartPolicy, Ulimit};

use crate::common::{build, bundler, fixtures, open_bundle, Keys, Repo};

fn repo(files: &[(&str, &str)]) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: lab\n");
    repo.write("devices/dev-1.yaml", "labels: {site: a}\nvars: {POSTGRES_DB: from-device}\n");
    repo.write("apps/web/app.yaml", "{}\n");
    for (path, content) in files {
        repo.write(path, content);
    }
    repo.commit_at("compose keys", 1_800_000_000);
    repo
}

fn issue_17_example() -> String {
    std::fs::read_to_string(fixtures().join("compose/issue-17.yaml")).expect("fixture")
}

#[test]
fn issue_17_example_validates_and_builds_with_every_key() {
    let compose = issue_17_example();
    let repo = repo(&[("apps/web/compose.yaml", &compose), ("apps/web/.env", "NGINX_HOST=example.org\n")]);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build(repo.path(), "HEAD", &keys, out_dir.path()).assert_code(0);
    let state = open_bundle(out_dir.path(), "dev-1", &keys).state;
    let web = state.containers.iter().find(|c| c.name == "web-web").expect("web-web");
    let o = &web.options;
    assert_eq!(web.restart, RestartPolicy::UnlessStopped, "merged from x-common");
    assert_eq!(web.env.get("NGINX_HOST").map(String::as_str), Some("example.org"), "env_file: .env");
    assert_eq!(
        o.logging,
        Some(LogConfig {
            driver: "json-file".into(),
            options: BTreeMap::from([("max-file".into(), "3".into()), ("max-size".into(), "10m".into())]),
        })
    );
    assert_eq!(o.sysctls.get("net.core.somaxconn").map(String::as_str), Some("1024"));
    assert_eq!(o.ulimits.get("nofile"), Some(&Ulimit { soft: 65536, hard: 65536 }));
    assert_eq!(o.extra_hosts, ["broker:10.0.0.5"]);
    assert_eq!((o.init, o.read_only), (Some(true), true));
    assert_eq!(o.security_opt, ["no-new-privileges:true"]);
    assert_eq!(o.working_dir.as_deref(), Some("/srv"));
    assert_eq!(o.shm_size_bytes, Some(64 << 20));
}

#[test]
fn dotenv_beside_the_compose_file_fills_variables_and_device_vars_win() {
    let compose =
        std::fs::read_to_string(fixtures().join("awesome-compose/postgresql-pgadmin.yaml")).expect("fixture");
    // The .env of awesome-compose's postgresql-pgadmin, as committed there.
    let dotenv = "POSTGRES_USER=yourUser\nPOSTGRES_PW=changeit\nPOSTGRES_DB=postgres\nPGADMIN_MAIL=your@email.com\nPGADMIN_PW=changeit\n";
    let repo = repo(&[("apps/web/compose.yaml", &compose), ("apps/web/.env", dotenv)]);
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let state = open_bundle(out_dir.path(), "dev-1", &keys).state;
    let pg = state.containers.iter().find(|c| c.name == "postgres").expect("postgres");
    assert_eq!(pg.env["POSTGRES_USER"], "yourUser");
    assert_eq!(pg.env["POSTGRES_DB"], "from-device", "device vars take precedence over .env");
}

#[test]
fn an_unset_variable_is_named_and_no_empty_name_follows() {
    let compose =
        std::fs::read_to_string(fixtures().join("awesome-compose/postgresql-pgadmin.yaml")).expect("fixture");
    let repo = repo(&[("apps/web/compose.yaml", &compose)]);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65);
    out.assert_stderr_has(
        "apps/web/compose.yaml:6:9: error: variable `POSTGRES_USER` is not set for this device",
    );
    out.assert_stderr_has("variable `PGADMIN_PW` is not set");
    assert!(!out.stderr.contains("``"), "an empty name in:\n{}", out.stderr);
}

#[test]
fn dotenv_and_env_file_errors_name_file_and_line() {
    let compose = "services:\n  web:\n    image: nginx\n    env_file: [conf/web.env, missing.env]\n";
    let repo = repo(&[
        ("apps/web/compose.yaml", compose),
        ("apps/web/.env", "OK=1\nBROKEN\n"),
        ("apps/web/conf/web.env", "A=\"unclosed\n"),
    ]);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65);
    out.assert_stderr_has("apps/web/.env:2: error: `BROKEN` has no value: write KEY=VALUE");
    out.assert_stderr_has("apps/web/compose.yaml:4:16: error: env_file apps/web/conf/web.env:1: the value of `A` has no closing \"");
    out.assert_stderr_has("apps/web/compose.yaml:4:30: error: env_file `missing.env` is not in the commit (looked for apps/web/missing.env)");
}
