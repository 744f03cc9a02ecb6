//! Issue 13, the whole credentials flow on real parts: a device enrolls over a real
//! Mosquitto, the operator accepts its claim with a commit, and a secret file and a
//! secret variable made with the real `age` CLI reach the device and its container on a
//! real Docker engine, the bundle fetched from the real HTTP server. The bundle, the
//! build output (index.json, pointer files) and the retained announcement hold no
//! plaintext; another device's key cannot open the bundle.

use std::fs;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::bundler;
use fleet_e2e::{Device, DeviceWatch, Dockerd, Engine, Mosquitto};

use crate::common::*;
use crate::engines::{Images, TestEngine};

const TOKEN: &str = "tok-e2e-5a1f0c9d";
const PASSWORD: &str = "pw-e2e-8b3e7a21";

fn holds(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn no_plaintext_under(dir: &Path) -> Result<usize> {
    let mut checked = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = fs::read(&path)?;
            ensure!(!holds(&bytes, TOKEN) && !holds(&bytes, PASSWORD), "{} holds a secret", path.display());
            checked += 1;
        }
    }
    Ok(checked)
}

#[test]
fn a_device_enrolls_and_its_secrets_reach_its_container_and_nothing_else() -> Result<()> {
    let engine = TestEngine::Dockerd(Dockerd::start()?);
    let images = Images::push(&engine)?;
    let broker = Mosquitto::start()?;
    let mut fleet = fleet_e2e::FleetRepo::new("acme")?;
    let ci = fleet.use_new_age_identity()?;
    let mut device =
        Device::builder(&fleet, "gw-1")?.broker(&broker.url()).engine(engine.socket_path()).create()?;
    let other = Device::builder(&fleet, "gw-2")?.broker(&broker.url()).create()?;

    // 1. Enrollment: the device claims, the operator accepts with a commit.
    let claim = device.cli(&["enroll", "--json"])?;
    ensure!(claim.code == Some(0), "{claim}");
    let repo = fleet.repo_dir().to_string_lossy().into_owned();
    let url = broker.url();
    let accepted =
        bundler(&["enroll", "accept", "gw-1", "--repo", &repo, "--broker", &url, "--labels", "site=berlin"])?;
    ensure!(accepted.code == Some(0), "{accepted}");
    let identity = device.cli(&["identity", "--json"])?.check()?.json()?;
    let recipient = identity["recipient"].as_str().context("recipient")?;
    ensure!(fleet.read("devices/gw-1.yaml")?.contains(recipient), "{}", fleet.read("devices/gw-1.yaml")?);
    fleet.commit("accept gw-1")?;

    // 2. Secrets made with the real age, used by a Compose service.
    fleet.write_age("apps/web/files/token.age", &format!("{TOKEN}\n"), &ci)?;
    fleet.write_age("secrets.yaml.age", &format!("db_password: {PASSWORD}\n"), &ci)?;
    fleet.write("apps/web/app.yaml", "files:\n  - source: files/token.age\n")?;
    fleet.write(
        "apps/web/compose.yaml",
        format!(
            "services:
  web:
    image: {}
    command: [\"sleep\", \"3600\"]
    environment:
      DB_PASSWORD: ${{db_password}}
    volumes:
      - ./files/token:/run/secrets/token:ro
    healthcheck:
      test: [\"CMD\", \"sh\", \"-c\", \"test -s /run/secrets/token && test -n \\\"$$DB_PASSWORD\\\"\"]
      interval: 1s
      timeout: 1s
      retries: 3
",
            images.tag(1)
        ),
    )?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let commit = deploy(&mut fleet, &broker, &watch, &device, "web with secrets")?;
    ensure!(!commit.is_empty());

    // 3. They reached the container, and the file is 0600 on the device.
    let token = engine.docker(&["exec", "web-web", "cat", "/run/secrets/token"])?;
    ensure!(token.trim() == TOKEN, "the container reads {token:?}");
    let env = engine.docker(&["exec", "web-web", "sh", "-c", "echo \"$DB_PASSWORD\""])?;
    ensure!(env.trim() == PASSWORD, "the container's DB_PASSWORD is {env:?}");
    let target = fleet.app_file("web", "files/token");
    let mode = fs::metadata(device.host_path(&target))?.permissions();
    ensure!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o600, "mode {mode:?}");

    // 4. No plaintext in the build output (bundles, index.json, pointer files) nor in
    //    the retained announcement.
    let checked = no_plaintext_under(fleet.out_dir())?;
    ensure!(checked >= 3, "only {checked} files in the build output");
    let announcement = broker.client().retained(&fleet.topic("gw-1", "desired"))?.context("announcement")?;
    ensure!(!announcement.contains(TOKEN) && !announcement.contains(PASSWORD), "{announcement}");
    ensure!(!device.log().contains(TOKEN) && !device.log().contains(PASSWORD), "the agent logged a secret");

    // 5. Another device's key cannot open gw-1's bundle.
    other.cli(&["identity"])?.check()?;
    let keys =
        fleet_spec::age::parse_identities(&fs::read_to_string(other.state_dir().join("identity.age"))?)?;
    let (_, mut state) =
        fleet_spec::bundle::open_accepted(&fleet.bundle_of("gw-1")?, &fleet_spec::bundle::Limits::default())?;
    ensure!(state.unseal(&keys).is_err(), "gw-2 opened gw-1's secrets");
    Ok(())
}
