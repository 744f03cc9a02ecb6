//! Secrets in Git (issue 13): files and variables encrypted with the real `age` CLI,
//! decrypted with the CI's identity, sealed to each device's key. Every output the
//! bundler prints or writes is searched for the plaintext.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{bundler, open_bundle, Keys, Repo};

const TOKEN: &str = "tok-91c3e0-SECRET";
const FLEET_PW: &str = "pw-7d2b44-SECRET";

struct Age {
    dir: tempfile::TempDir,
}

impl Age {
    fn new() -> Age {
        Age { dir: tempfile::tempdir().expect("tempdir") }
    }

    /// A new identity file (age-keygen); returns its path and recipient.
    fn keygen(&self, name: &str) -> (PathBuf, String) {
        let path = self.dir.path().join(name);
        let out =
            Command::new("age-keygen").arg("-o").arg(&path).output().expect("age-keygen (apt install age)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new("age-keygen").arg("-y").arg(&path).output().expect("age-keygen -y");
        (path, String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Encrypts `plain` to `recipient` into `repo/rel` with the real age.
    fn encrypt(&self, repo: &Repo, rel: &str, plain: &str, recipient: &str) {
        let src = self.dir.path().join("plain");
        std::fs::write(&src, plain).expect("write");
        let dest = repo.path().join(rel);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        let out = Command::new("age")
            .arg("-r")
            .arg(recipient)
            .arg("-o")
            .arg(&dest)
            .arg(&src)
            .output()
            .expect("age");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

fn device_keys(path: &Path) -> Vec<fleet_spec::age::SecretKey> {
    fleet_spec::age::parse_identities(&std::fs::read_to_string(path).expect("key")).expect("parses")
}

fn assert_nowhere(dir: &Path, needles: &[&str]) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).expect("read");
        for n in needles {
            assert!(!bytes.windows(n.len()).any(|w| w == n.as_bytes()), "{} holds {n}", entry.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A fleet with secret variables (fleet and device level) used by a template and by a
/// Compose `environment:` value.
fn fleet_with_secret_vars(age: &Age, ci: &str, device: &str) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: acme\nvars:\n  region: eu\n");
    repo.write("devices/gw-1.yaml", &format!("public_key: {device}\n"));
    age.encrypt(
        &repo,
        "secrets.yaml.age",
        &format!("db_password: {FLEET_PW}\napi_token: fleet-default\n"),
        ci,
    );
    age.encrypt(&repo, "devices/gw-1.secrets.yaml.age", &format!("api_token: {TOKEN}\n"), ci);
    repo.write(
        "apps/web/app.yaml",
        "files:\n  - source: files/plain.conf\n    template: true\n  - source: files/creds.conf\n    template: true\n",
    );
    repo.write("apps/web/files/plain.conf", "region = {{ device.vars.region }}\n");
    repo.write("apps/web/files/creds.conf", "token = {{ secrets.api_token }}\n");
    repo.write(
        "apps/web/compose.yaml",
        "services:\n  web:\n    image: registry.local/web@sha256:0000000000000000000000000000000000000000000000000000000000000000\n    environment:\n      REGION: ${region}\n      DB_PASSWORD: ${db_password}\n",
    );
    repo
}

#[test]
fn secret_variables_reach_templates_and_compose_environment_sealed() {
    let age = Age::new();
    let (ci_key, ci) = age.keygen("ci.txt");
    let (dev_key, dev) = age.keygen("gw-1.txt");
    let repo = fleet_with_secret_vars(&age, &ci, &dev);
    repo.commit_at("secrets", 1_800_000_000);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("out");
    let ci_arg = ci_key.to_str().expect("utf-8");

    // Without the identity, validate checks everything else and names what it skipped.
    let v = bundler(&["validate", "--repo", repo.path_str()]);
    v.assert_code(0);
    v.assert_stderr_has("secrets.yaml.age");
    v.assert_stderr_has("devices/gw-1.secrets.yaml.age");

    let b = bundler(&[
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &keys.secret(),
        "--out",
        out.path().to_str().expect("utf-8"),
        "--age-identity",
        ci_arg,
        "--json",
    ]);
    b.assert_code(0);
    assert!(!b.stdout.contains(TOKEN) && !b.stderr.contains(TOKEN), "{} {}", b.stdout, b.stderr);
    assert_nowhere(out.path(), &[TOKEN, FLEET_PW]);

    let verified = open_bundle(out.path(), "gw-1", &keys);
    let mut state = verified.state;
    assert!(state.file("/srv/fleet/web/files/creds.conf").is_none(), "the secret template is in the clear");
    assert!(state.file("/srv/fleet/web/files/plain.conf").is_some(), "a plain template stays plain");
    assert!(!state.containers[0].env.contains_key("DB_PASSWORD"));
    assert_eq!(state.containers[0].env.get("REGION").map(String::as_str), Some("eu"));
    state.unseal(&device_keys(&dev_key)).expect("the device opens it");
    let creds = state.file("/srv/fleet/web/files/creds.conf").expect("creds.conf");
    assert_eq!(creds.content, format!("token = {TOKEN}\n").as_bytes(), "the device's value wins");
    assert_eq!(creds.mode, 0o600, "a template reading secrets defaults to 0600");
    assert_eq!(state.containers[0].env.get("DB_PASSWORD").map(String::as_str), Some(FLEET_PW));

    // plan names what changed, shows no secret value, text or JSON.
    age.encrypt(&repo, "devices/gw-1.secrets.yaml.age", "api_token: rotated-SECRET\n", &ci);
    age.encrypt(&repo, "secrets.yaml.age", "db_password: changed-SECRET\napi_token: x\n", &ci);
    repo.commit_at("rotate the token", 1_800_000_100);
    for json in [false, true] {
        let mut args = vec![
            "plan",
            "--repo",
            repo.path_str(),
            "--from",
            "HEAD~1",
            "--to",
            "HEAD",
            "--age-identity",
            ci_arg,
        ];
        if json {
            args.push("--json");
        }
        let p = bundler(&args);
        p.assert_code(2);
        for secret in [TOKEN, FLEET_PW, "rotated-SECRET", "changed-SECRET"] {
            assert!(
                !p.stdout.contains(secret) && !p.stderr.contains(secret),
                "plan shows {secret}: {}",
                p.stdout
            );
        }
        assert!(p.stdout.contains("creds.conf"), "{}", p.stdout);
        assert!(p.stdout.contains("env.DB_PASSWORD (secret)"), "{}", p.stdout);
    }
}

#[test]
fn a_secret_outside_environment_or_for_an_unknown_device_or_malformed_is_an_error_without_its_value() {
    let age = Age::new();
    let (ci_key, ci) = age.keygen("ci.txt");
    let (_, dev) = age.keygen("gw-1.txt");
    let ci_arg = ci_key.to_str().expect("utf-8");
    let repo = fleet_with_secret_vars(&age, &ci, &dev);
    repo.write("apps/web/compose.yaml", "services:\n  web:\n    image: registry.local/web:${db_password}\n");
    age.encrypt(&repo, "devices/gw-9.secrets.yaml.age", "a: b\n", &ci);
    repo.commit_at("misuse", 1_800_000_000);
    let v = bundler(&["validate", "--repo", repo.path_str(), "--age-identity", ci_arg]);
    v.assert_code(65);
    v.assert_stderr_has("secret variable `db_password` is used by service `web` outside `environment:`");
    v.assert_stderr_has("devices/gw-9.secrets.yaml.age: error: no device `gw-9`");
    assert!(!v.stderr.contains(FLEET_PW), "{}", v.stderr);

    // A secrets file that does not parse: its position, never its content.
    age.encrypt(&repo, "secrets.yaml.age", &format!("db_password: [{FLEET_PW}\n"), &ci);
    repo.remove("devices/gw-9.secrets.yaml.age");
    repo.commit_at("broken", 1_800_000_100);
    let v = bundler(&["validate", "--repo", repo.path_str(), "--age-identity", ci_arg]);
    v.assert_code(65);
    v.assert_stderr_has("secrets.yaml.age:");
    assert!(!v.stderr.contains(FLEET_PW), "{}", v.stderr);

    // Encrypted to someone else: says which key the CI has and how to fix it.
    let (_, stranger) = age.keygen("stranger.txt");
    age.encrypt(&repo, "secrets.yaml.age", "a: b\n", &stranger);
    repo.commit_at("wrong key", 1_800_000_200);
    let v = bundler(&["validate", "--repo", repo.path_str(), "--age-identity", ci_arg]);
    v.assert_code(65);
    v.assert_stderr_has(&format!("age -r {ci}"));
}
