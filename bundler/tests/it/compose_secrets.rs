//! Compose `secrets:` and `configs:` (issue 13) through the real `fleet-bundler`: a
//! secret encrypted with the real `age` CLI in a real Git repository is decrypted with
//! the CI's identity, sealed to the device's own key and mounted read-only at
//! `/run/secrets/NAME`; the plaintext is in no file the build writes nor in `plan`; a
//! changed secret changes the container's hash; a secret in the clear gets a warning.

use std::path::Path;
use std::process::Command;

use fleet_spec::model::{DesiredState, MountSource};

use crate::common::{bundler, have, open_bundle, Keys, Output, Repo};

const SECRET: &str = "pg-password-8c1e77";

/// `age-keygen -o path`; returns the recipient (`age1…`).
fn age_keygen(path: &Path) -> String {
    let out = Command::new("age-keygen").arg("-o").arg(path).output().expect("run age-keygen");
    assert!(out.status.success(), "age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("age-keygen").arg("-y").arg(path).output().expect("run age-keygen -y");
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// Encrypts `plain` to `recipient` with the real `age` into `out`.
fn age_encrypt(recipient: &str, plain: &str, out: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain_file = dir.path().join("plain");
    std::fs::write(&plain_file, plain).expect("write plain");
    std::fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
    let status = Command::new("age").arg("-r").arg(recipient).arg("-o").arg(out).arg(&plain_file).status();
    assert!(status.is_ok_and(|s| s.success()), "age -r {recipient} -o {}", out.display());
}

fn build_with(repo: &Repo, keys: &Keys, out: &Path, identity: Option<&Path>) -> Output {
    let mut args = vec![
        "build".to_string(),
        "--repo".into(),
        repo.path_str().into(),
        "--key".into(),
        keys.secret(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
    ];
    if let Some(id) = identity {
        args.extend(["--age-identity".to_string(), id.to_string_lossy().into_owned()]);
    }
    bundler(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if std::fs::read(&path).expect("read").windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(path.display().to_string());
        }
    }
    found
}

const COMPOSE: &str = "services:
  db:
    image: postgres:16
    environment: {POSTGRES_PASSWORD_FILE: /run/secrets/db_password}
    secrets: [db_password]
    configs:
      - source: pgconf
        target: /etc/postgresql/postgresql.conf
secrets:
  db_password:
    file: ./secrets/db_password.age
configs:
  pgconf:
    file: ./postgresql.conf
";

/// The state of `dev-1` in `out`, its secrets unsealed with `device_key`.
fn unsealed(out: &Path, keys: &Keys, device_key: &Path) -> DesiredState {
    let mut state = open_bundle(out, "dev-1", keys).state;
    assert!(
        state.files.iter().all(|f| !f.path.contains("/.compose/secrets/")),
        "a secret is in the clear part of the bundle"
    );
    let text = std::fs::read_to_string(device_key).expect("device key");
    let identities = fleet_spec::age::parse_identities(&text).expect("device identity");
    state.unseal(&identities).expect("the device's key opens its secrets");
    state
}

#[test]
fn a_compose_secret_encrypted_with_age_is_sealed_to_its_device_and_mounted_read_only() {
    if !have("age") || !have("age-keygen") {
        eprintln!("skipped: the age CLI is not installed (apt-get install -y age)");
        return;
    }
    let keydir = tempfile::tempdir().expect("tempdir");
    let (ci_key, device_key) = (keydir.path().join("ci.txt"), keydir.path().join("device.txt"));
    let ci = age_keygen(&ci_key);
    let device = age_keygen(&device_key);

    let repo = Repo::new();
    repo.write("fleet.yaml", "name: lab\n");
    repo.write("devices/dev-1.yaml", &format!("public_key: {device}\n"));
    repo.write("apps/db/app.yaml", "{}\n");
    repo.write("apps/db/compose.yaml", COMPOSE);
    repo.write("apps/db/postgresql.conf", "listen_addresses = '*'\n");
    let secret_file = repo.path().join("apps/db/secrets/db_password.age");
    age_encrypt(&ci, &format!("{SECRET}-1"), &secret_file);
    let first = repo.commit_at("db with a secret", 1_800_000_000);

    // Without the CI's identity: validate checks the rest and names what it skipped;
    // build refuses.
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(0)
        .assert_stderr_has("not decrypted")
        .assert_stderr_has("apps/db/secrets/db_password.age");
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    build_with(&repo, &keys, out_dir.path(), None).assert_code(64).assert_stderr_has("--age-identity");

    // With it: no warning, and the plaintext is in no file the build wrote.
    let out = build_with(&repo, &keys, out_dir.path(), Some(&ci_key));
    out.assert_code(0);
    assert!(!out.stderr.contains("not encrypted"), "{}", out.stderr);
    assert_eq!(files_holding(out_dir.path(), SECRET), Vec::<String>::new(), "the plaintext leaked");

    let state = unsealed(out_dir.path(), &keys, &device_key);
    let secret_path = "/srv/fleet/db/.compose/secrets/db_password";
    let secret = state.file(secret_path).expect("the secret file");
    assert_eq!(secret.content, format!("{SECRET}-1").as_bytes());
    assert_eq!((secret.mode, secret.owner), (0o600, None), "a secret is its owner's only by default");
    let config = state.file("/srv/fleet/db/.compose/configs/pgconf").expect("the config file");
    assert_eq!(config.content, b"listen_addresses = '*'\n");
    let db = state.containers.iter().find(|c| c.name == "db-db").expect("db-db");
    let mounts: Vec<(&MountSource, &str, bool)> =
        db.mounts.iter().map(|m| (&m.source, m.target.as_str(), m.read_only)).collect();
    assert_eq!(
        mounts,
        [
            (&MountSource::Bind(secret_path.into()), "/run/secrets/db_password", true),
            (
                &MountSource::Bind("/srv/fleet/db/.compose/configs/pgconf".into()),
                "/etc/postgresql/postgresql.conf",
                true
            ),
        ]
    );
    let hash_before = state.container_hash(db);

    // A new secret: the device recreates the container (its hash covers the file).
    age_encrypt(&ci, &format!("{SECRET}-2"), &secret_file);
    let second = repo.commit_at("rotate the db password", 1_800_000_100);
    let out_dir2 = tempfile::tempdir().expect("tempdir");
    build_with(&repo, &keys, out_dir2.path(), Some(&ci_key)).assert_code(0);
    let state2 = unsealed(out_dir2.path(), &keys, &device_key);
    assert_eq!(state2.file(secret_path).expect("secret").content, format!("{SECRET}-2").as_bytes());
    let db2 = state2.containers.iter().find(|c| c.name == "db-db").expect("db-db");
    assert_eq!(db, db2, "the spec itself is unchanged");
    assert_ne!(hash_before, state2.container_hash(db2), "a changed secret recreates the container");

    // plan names the file, never its content (text and JSON).
    let ci_arg = ci_key.to_string_lossy().into_owned();
    for json in [false, true] {
        let mut args = vec![
            "plan",
            "--repo",
            repo.path_str(),
            "--from",
            &first,
            "--to",
            &second,
            "--age-identity",
            &ci_arg,
        ];
        if json {
            args.push("--json");
        }
        let out = bundler(&args);
        out.assert_code(2);
        assert!(out.stdout.contains(secret_path), "{}", out.stdout);
        assert!(
            !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
            "plan shows the secret: {}",
            out.stdout
        );
    }
}

#[test]
fn a_secret_in_the_clear_is_delivered_with_a_warning_and_mistakes_name_their_line() {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: lab\n");
    repo.write("devices/dev-1.yaml", "labels: {}\n");
    repo.write("apps/web/app.yaml", "{}\n");
    repo.write(
        "apps/web/compose.yaml",
        "services:\n  web:\n    image: nginx\n    secrets: [token]\nsecrets:\n  token:\n    file: token.txt\n",
    );
    repo.write("apps/web/token.txt", "not-so-secret\n");
    repo.commit_at("a plain secret", 1_800_000_000);
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build_with(&repo, &keys, out_dir.path(), None);
    out.assert_code(0).assert_stderr_has(
        "apps/web/compose.yaml:7:11: warning: secret `token` is not encrypted in Git: anyone who can read the repository reads it; encrypt it with age -r <CI recipient> -o apps/web/token.txt.age",
    );
    let state = open_bundle(out_dir.path(), "dev-1", &keys).state;
    let file = state.file("/srv/fleet/web/.compose/secrets/token").expect("delivered in the clear part");
    assert_eq!(file.content, b"not-so-secret\n");
    let web = state.containers.iter().find(|c| c.name == "web-web").expect("web-web");
    assert_eq!(web.mounts[0].target, "/run/secrets/token");

    repo.write(
        "apps/web/compose.yaml",
        "services:\n  web:\n    image: nginx\n    secrets: [tokn]\nsecrets:\n  token:\n    external: true\n",
    );
    repo.commit_at("mistakes", 1_800_000_100);
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65)
        .assert_stderr_has("apps/web/compose.yaml:4:15: error: secret `tokn` is not defined under the top-level `secrets:` (defined: token)")
        .assert_stderr_has("apps/web/compose.yaml:7:15: error: `secrets.NAME.external:` is not supported");
}
