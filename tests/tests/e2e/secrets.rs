//! Issue 13, secrets: a secret file made with the real `age` CLI in a real Git
//! repository reaches the one device it is sealed to, through the real bundler and the
//! real agent (sideloaded: the transport does not matter to sealing). Nothing the build
//! writes (bundles, index.json, pointer files) and nothing `plan` prints holds the
//! plaintext; another device's key cannot open the bundle; a device without a
//! `public_key:` is a build error naming it; and a key rotation keeps the device able to
//! decrypt at every step. A Compose secret reaches its container read-only at
//! `/run/secrets/NAME` on a real dockerd, and a new one recreates the container.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::{bundler, run_command};
use fleet_e2e::{free_port, Device, DeviceWatch, Dockerd, Engine, FleetRepo, Mosquitto};
use fleet_spec::bundle::{self, Limits};

use crate::common::*;
use crate::engines::{Images, TestEngine};

const SECRET: &str = "TOPSECRET-4f1d9c";

fn offline_device(fleet: &FleetRepo, id: &str) -> Result<Device> {
    Device::builder(fleet, id)?.broker(&format!("mqtt://127.0.0.1:{}", free_port())).no_polling().create()
}

/// The device's current recipient (`age1…`), made on first use.
fn recipient(device: &Device) -> Result<String> {
    let out = device.cli(&["identity", "--json"])?.check()?.json()?;
    out["recipient"].as_str().map(str::to_string).context("identity --json has a recipient")
}

fn age_keygen(path: &Path) -> Result<String> {
    run_command(Command::new("age-keygen").arg("-o").arg(path))?.check()?;
    let out = run_command(Command::new("age-keygen").arg("-y").arg(path))?.check()?;
    Ok(out.stdout.trim().to_string())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn assert_no_plaintext(dir: &Path) -> Result<()> {
    let files = files_under(dir);
    ensure!(
        files.iter().any(|f| f.extension().is_some_and(|e| e == "bundle")),
        "no bundle in {}",
        dir.display()
    );
    for f in files {
        let bytes = fs::read(&f)?;
        ensure!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the secret",
            f.display()
        );
    }
    Ok(())
}

fn device_yaml(fleet: &FleetRepo, id: &str, keys: &[&str]) -> Result<()> {
    let list: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    fleet.write(&format!("devices/{id}.yaml"), format!("public_key: [{}]\n", list.join(", ")))
}

#[test]
fn a_secret_made_with_age_reaches_only_its_device_and_survives_a_key_rotation() -> Result<()> {
    let mut fleet = FleetRepo::new("acme")?;
    let ci_key = fleet.scratch("ci")?.join("ci-identity.txt");
    let ci_recipient = age_keygen(&ci_key)?;
    let ci_key_arg = ci_key.to_string_lossy().into_owned();
    let d1 = offline_device(&fleet, "gw-1")?;
    let d2 = offline_device(&fleet, "gw-2")?;
    let (r1, r2) = (recipient(&d1)?, recipient(&d2)?);
    device_yaml(&fleet, "gw-1", &[&r1])?;
    device_yaml(&fleet, "gw-2", &[&r2])?;

    // A plain release first, then the secret (encrypted to the CI with the real age).
    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    let before = fleet.commit("plain")?;
    let plain_file = fleet.scratch("plain")?.join("token");
    fs::write(&plain_file, format!("token = {SECRET}\n"))?;
    let sealed_path = fleet.repo_dir().join("apps/creds/files/token.age");
    fs::create_dir_all(sealed_path.parent().context("parent")?)?;
    run_command(
        Command::new("age").arg("-r").arg(&ci_recipient).arg("-o").arg(&sealed_path).arg(&plain_file),
    )?
    .check()?;
    fleet.write("apps/creds/app.yaml", "files:\n  - source: files/token.age\n")?;
    fleet.commit("a secret")?;
    let repo = fleet.repo_dir().to_string_lossy().into_owned();

    // Without the CI's identity: validate checks the rest and says what it skipped;
    // build refuses (usage) and writes nothing.
    let out = bundler(&["validate", "--repo", &repo])?;
    ensure!(out.code == Some(0), "{out}");
    ensure!(
        out.stderr.contains("not decrypted") && out.stderr.contains("apps/creds/files/token.age"),
        "{out}"
    );
    let out = fleet.build_output(&[])?;
    ensure!(out.code == Some(64), "{out}");
    ensure!(out.stderr.contains("--age-identity"), "{out}");
    ensure!(!fleet.out_dir().join("index.json").exists(), "a refused build wrote index.json");

    // With it: built, and nothing written holds the plaintext.
    fleet.build_output(&["--age-identity", &ci_key_arg])?.check()?;
    assert_no_plaintext(fleet.out_dir())?;
    let out = bundler(&[
        "plan",
        "--repo",
        &repo,
        "--from",
        &before,
        "--to",
        "HEAD",
        "--age-identity",
        &ci_key_arg,
    ])?;
    ensure!(out.code == Some(2), "{out}");
    ensure!(out.stdout.contains("/token") && !out.stdout.contains(SECRET), "plan shows the secret: {out}");
    let out = bundler(&[
        "plan",
        "--repo",
        &repo,
        "--from",
        &before,
        "--to",
        "HEAD",
        "--age-identity",
        &ci_key_arg,
        "--json",
    ])?;
    ensure!(!out.stdout.contains(SECRET), "plan --json shows the secret: {out}");

    // gw-1 gets the file, 0600; gw-2's key cannot open gw-1's bundle.
    let target = fleet.app_file("creds", "files/token");
    let bundle1 = fleet.scratch("usb")?.join("gw-1.bundle");
    fs::write(&bundle1, fleet.bundle_of("gw-1")?)?;
    let out = d1.apply(&bundle1)?;
    ensure!(out.code == Some(0), "{out}\n{}", d1.log_tail());
    assert_file(&d1, &target, &format!("token = {SECRET}\n"));
    let mode = fs::metadata(d1.host_path(&target))?.permissions();
    ensure!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o600, "mode {mode:?}");
    let d2_keys =
        fleet_spec::age::parse_identities(&fs::read_to_string(d2.state_dir().join("identity.age"))?)?;
    let (_, mut state) = bundle::open_accepted(&fleet.bundle_of("gw-1")?, &Limits::default())?;
    ensure!(state.unseal(&d2_keys).is_err(), "gw-2's key opened gw-1's secrets");
    ensure!(state.files.iter().all(|f| f.path != target), "the secret is in the clear part");

    // A device without public_key: is a build error that names it.
    fleet.add_device("gw-3", &[])?;
    fleet.commit("gw-3 without a key")?;
    let out = fleet.build_output(&["--age-identity", &ci_key_arg])?;
    ensure!(out.code != Some(0) && out.stderr.contains("gw-3") && out.stderr.contains("public_key"), "{out}");
    fleet.remove("devices/gw-3.yaml")?;

    // Rotation: a new key on the device; the fleet lists both, then the new one only.
    // The device decrypts at every step, and the old key is retired last.
    let rotated = d1.cli(&["identity", "--rotate", "--json"])?.check()?.json()?;
    let r1_new = rotated["recipient"].as_str().context("new recipient")?.to_string();
    ensure!(r1_new != r1, "--rotate made no new key: {rotated}");
    for (step, keys) in
        [("both keys", vec![r1_new.as_str(), r1.as_str()]), ("new key only", vec![r1_new.as_str()])]
    {
        fs::write(&plain_file, format!("token = {SECRET} {step}\n"))?;
        run_command(
            Command::new("age").arg("-r").arg(&ci_recipient).arg("-o").arg(&sealed_path).arg(&plain_file),
        )?
        .check()?;
        device_yaml(&fleet, "gw-1", &keys)?;
        fleet.commit(step)?;
        fleet.build_output(&["--age-identity", &ci_key_arg])?.check()?;
        fs::write(&bundle1, fleet.bundle_of("gw-1")?)?;
        let out = d1.apply(&bundle1)?;
        ensure!(out.code == Some(0), "{step}: {out}\n{}", d1.log_tail());
        assert_file(&d1, &target, &format!("token = {SECRET} {step}\n"));
    }
    let old_id = fleet_spec::age::key_id(&fleet_spec::age::parse_recipient(&r1)?);
    d1.cli(&["identity", "--retire", &old_id])?.check()?;
    let keys = fleet_spec::age::parse_identities(&fs::read_to_string(d1.state_dir().join("identity.age"))?)?;
    ensure!(keys.len() == 1 && keys[0].recipient() == r1_new, "after --retire: {keys:?}");
    // The bundle it runs is still readable with what is left (a restart reopens it).
    let status = d1.local_status()?;
    ensure!(status["status"]["state"] == "converged", "{status}");
    Ok(())
}

/// Compose `secrets:` on a real dockerd: a secret encrypted with the real `age` reaches
/// the container read-only at `/run/secrets/token` (its healthcheck waits for it), a
/// config at its target; a new secret in Git recreates the container with it.
#[test]
fn a_compose_secret_is_mounted_read_only_at_run_secrets_on_dockerd() -> Result<()> {
    let engine = TestEngine::Dockerd(Dockerd::start()?);
    let images = Images::push(&engine)?;
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let mut device =
        Device::builder(&fleet, "gw-1")?.broker(&broker.url()).engine(engine.socket_path()).create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    let ci_key = fleet.scratch("ci")?.join("ci-identity.txt");
    let ci_recipient = age_keygen(&ci_key)?;
    let ci_key_arg = ci_key.to_string_lossy().into_owned();
    device_yaml(&fleet, "gw-1", &[&recipient(&device)?])?;

    let plain_file = fleet.scratch("plain")?.join("token");
    let sealed_path = fleet.repo_dir().join("apps/creds/token.age");
    fs::create_dir_all(sealed_path.parent().context("parent")?)?;
    let encrypt = |content: &str| -> Result<()> {
        fs::write(&plain_file, content)?;
        run_command(
            Command::new("age").arg("-r").arg(&ci_recipient).arg("-o").arg(&sealed_path).arg(&plain_file),
        )?
        .check()?;
        Ok(())
    };
    encrypt(&format!("{SECRET}-1\n"))?;
    fleet.write("apps/creds/app.yaml", "{}\n")?;
    fleet.write(
        "apps/creds/compose.yaml",
        format!(
            "services:
  app:
    image: {}
    command: [\"sleep\", \"3600\"]
    restart: unless-stopped
    secrets: [token]
    configs: [{{source: settings, target: /etc/settings.conf}}]
    healthcheck:
      test: [\"CMD\", \"test\", \"-s\", \"/run/secrets/token\"]
      interval: 1s
      timeout: 1s
      retries: 2
secrets:
  token: {{file: ./token.age}}
configs:
  settings: {{content: \"mode = test\\n\"}}
",
            images.tag(1)
        ),
    )?;
    let ship = |fleet: &mut FleetRepo, message: &str| -> Result<String> {
        let commit = fleet.commit(message)?;
        fleet.build_output(&["--age-identity", &ci_key_arg])?.check()?;
        fleet.publish(&broker.url())?;
        Ok(commit)
    };
    let c1 = ship(&mut fleet, "creds with a secret")?;
    device.start()?;
    wait_converged(&watch, &device, &c1)?;
    assert_no_plaintext(fleet.out_dir())?;
    assert_eq!(engine.docker(&["exec", "creds-app", "cat", "/run/secrets/token"])?, format!("{SECRET}-1\n"));
    assert_eq!(engine.docker(&["exec", "creds-app", "cat", "/etc/settings.conf"])?, "mode = test\n");
    let write = engine.docker(&["exec", "creds-app", "sh", "-c", "echo x > /run/secrets/token"]);
    ensure!(write.is_err(), "the secret is writable in the container: {write:?}");
    let on_device = fleet.app_file("creds", ".compose/secrets/token");
    assert_file(&device, &on_device, &format!("{SECRET}-1\n"));
    let before = engine.container("creds-app")?.id().to_string();

    // A new secret in Git: the container is recreated and reads it.
    encrypt(&format!("{SECRET}-2\n"))?;
    let c2 = ship(&mut fleet, "rotate the token")?;
    wait_converged(&watch, &device, &c2)?;
    let after = engine.container("creds-app")?;
    ensure!(after.id() != before && after.running(), "creds-app was not recreated with the new secret");
    assert_eq!(engine.docker(&["exec", "creds-app", "cat", "/run/secrets/token"])?, format!("{SECRET}-2\n"));
    ensure!(watch.events_of("apply_failed").is_empty(), "{}", watch.describe());
    Ok(())
}
