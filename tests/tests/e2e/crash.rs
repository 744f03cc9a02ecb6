//! Scenario 7: crash safety. The agent is killed with SIGKILL at a random moment after
//! each release is announced (while it downloads, verifies, writes files, recreates
//! containers, waits for health, commits, or after it is done), many times. At every
//! kill no managed file is partial (its content hash is the old release's or the new
//! one's), and after a restart the journal recovers and the device converges on the new
//! release, with exactly the new release's container.
//!
//! Two runs: files only (120 files per release, so that applies take a while), and on
//! dockerd with a container that every release recreates (its mounted file and its
//! image change).
//!
//! `FLEET_E2E_CRASH_ITERATIONS` sets the number of kills (default 5 for CI; a soak:
//! `FLEET_E2E_CRASH_ITERATIONS=200 cargo test -p fleet-e2e --test e2e crash`).
//! `FLEET_E2E_CRASH_SEED` replays a run's kill points (the seed is printed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::sha256_hex;
use fleet_e2e::{Device, DeviceWatch, Dockerd, Engine, FleetRepo, Mosquitto};

use crate::common::*;
use crate::engines::{web_app, Health, Images, TestEngine};

const FILE_BYTES: usize = 8 * 1024;

fn iterations() -> usize {
    std::env::var("FLEET_E2E_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
}

/// xorshift64*: reproducible kill points from a printed seed.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Rng {
        let seed =
            std::env::var("FLEET_E2E_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("crash: FLEET_E2E_CRASH_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The content of every file of `release` (`count` files): path (relative to the app) →
/// content. Odd releases also have `odd.conf`, so files are removed and created across
/// releases.
fn release_files(release: usize, count: usize) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for i in 0..count {
        let mut content = format!("release {release} file {i}\n");
        let mut h = sha256_hex(content.as_bytes());
        while content.len() < FILE_BYTES {
            h = sha256_hex(h.as_bytes());
            content.push_str(&h);
            content.push('\n');
        }
        files.insert(format!("data/f{i:03}.txt"), content);
    }
    if release % 2 == 1 {
        files.insert("odd.conf".into(), format!("odd release {release}\n"));
    }
    files
}

/// What a release holds: `files` bulk files, and with `images` the `web` app on
/// alternating images with a mounted file naming the release.
struct Releases<'a> {
    files: usize,
    images: Option<&'a Images>,
}

impl Releases<'_> {
    fn write(&self, fleet: &FleetRepo, release: usize) -> Result<()> {
        fleet.remove("apps/bulk").ok();
        let files = release_files(release, self.files);
        let refs: Vec<(&str, &str)> = files.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        files_app(fleet, "bulk", None, &refs)?;
        if let Some(images) = self.images {
            web_app(fleet, &images.tag(image_of(release)), &web_conf(release), Health::Good)?;
        }
        Ok(())
    }

    /// Every managed path either release can have, with its sha256 in both.
    fn hashes(
        &self,
        fleet: &FleetRepo,
        old: usize,
        new: usize,
    ) -> BTreeMap<String, (Option<String>, Option<String>)> {
        let (old_files, new_files) = (release_files(old, self.files), release_files(new, self.files));
        let hash = |c: &String| sha256_hex(c.as_bytes());
        let mut all = BTreeMap::new();
        for path in old_files.keys().chain(new_files.keys()) {
            all.insert(
                fleet.app_file("bulk", path),
                (old_files.get(path).map(hash), new_files.get(path).map(hash)),
            );
        }
        if self.images.is_some() {
            all.insert(
                fleet.app_file("web", "files/app.conf"),
                (Some(hash(&web_conf(old))), Some(hash(&web_conf(new)))),
            );
        }
        all
    }

    fn managed_files(&self, release: usize) -> usize {
        release_files(release, self.files).len() + usize::from(self.images.is_some())
    }
}

fn image_of(release: usize) -> u8 {
    if release.is_multiple_of(2) {
        1
    } else {
        2
    }
}

fn web_conf(release: usize) -> String {
    format!("release = {release}\n")
}

/// Kills the agent at random points of `FLEET_E2E_CRASH_ITERATIONS` releases and checks
/// every kill and every recovery.
fn crash_loop(releases: &Releases, engine: Option<&TestEngine>) -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let mut builder = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling();
    if let Some(engine) = engine {
        builder = builder.engine(engine.socket_path());
    }
    let mut device = builder.create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;

    // Release 0, undisturbed: how long does a release take from publish to converged?
    releases.write(&fleet, 0)?;
    let c0 = fleet.commit("release 0")?;
    fleet.build()?;
    let t = Instant::now();
    fleet.publish(&broker.url())?;
    wait_converged(&watch, &device, &c0)?;
    let span = t.elapsed().max(Duration::from_millis(200));
    eprintln!("crash: an undisturbed release takes {span:?}");

    let mut rng = Rng::from_env_or_clock();
    let mut mid_apply = 0;
    let n = iterations();
    for release in 1..=n {
        releases.write(&fleet, release)?;
        let commit = fleet.commit(&format!("release {release}"))?;
        fleet.build()?;
        fleet.publish(&broker.url())?;
        // The random kill point (a deliberate delay, not a wait for a condition).
        let delay = Duration::from_millis(rng.below(span.as_millis() as u64 * 3 / 2));
        std::thread::sleep(delay);
        device.kill9();

        // No file is ever partial.
        let journal = std::fs::metadata(device.state_dir().join("journal")).map_or(0, |m| m.len());
        let (mut old_count, mut new_count) = (0, 0);
        for (path, (old, new)) in releases.hashes(&fleet, release - 1, release) {
            let got = device.sha256(&path);
            ensure!(
                got == old || got == new,
                "release {release}, killed after {delay:?}: {path} is neither the old nor the new content (sha256 {got:?})"
            );
            old_count += usize::from(got == old && old != new);
            new_count += usize::from(got == new && old != new);
        }
        if journal > 0 {
            mid_apply += 1;
        }
        eprintln!(
            "crash: release {release}: killed after {delay:?}: {new_count} files new, {old_count} old, journal {journal} bytes"
        );

        // After a restart the journal recovers and the device converges on the release.
        device.start()?;
        wait_converged(&watch, &device, &commit)
            .with_context(|| format!("release {release}, killed after {delay:?}"))?;
        for (path, (_, new)) in releases.hashes(&fleet, release - 1, release) {
            ensure!(
                device.sha256(&path) == new,
                "release {release}: {path} is not the new content after recovery"
            );
        }
        let local = device.local_status()?;
        ensure!(
            local["journal"] == "clean" && local["journal_records"] == 0,
            "journal not recovered: {local}"
        );
        ensure!(local["applied"]["commit"] == commit.as_str(), "{local}");
        ensure!(
            local["managed_files"].as_object().map(|m| m.len()) == Some(releases.managed_files(release)),
            "managed files after release {release}: {local}"
        );
        if let (Some(engine), Some(images)) = (engine, releases.images) {
            // Exactly one managed container: the new release's, running.
            let managed: Vec<String> = engine
                .containers()?
                .iter()
                .filter(|c| c["Labels"]["io.fleet.managed"] == "true")
                .filter_map(|c| c["Names"][0].as_str().map(|n| n.trim_start_matches('/').to_string()))
                .collect();
            ensure!(managed == ["web-web"], "release {release}: managed containers {managed:?}");
            let web = engine.container("web-web")?;
            ensure!(
                web.running() && web.image() == images.pinned(image_of(release)),
                "release {release}: {:?}",
                web.0
            );
            let conf = engine.docker(&["exec", "web-web", "cat", "/etc/app.conf"])?;
            ensure!(conf == web_conf(release), "release {release}: the container sees {conf:?}");
        }
    }
    eprintln!("crash: {mid_apply} of {n} kills landed while the journal was open");
    ensure!(watch.events_of("rolled_back").is_empty(), "a crash caused a rollback: {}", watch.describe());
    Ok(())
}

#[test]
fn files_only_device_killed_at_random_points_always_recovers() -> Result<()> {
    crash_loop(&Releases { files: 120, images: None }, None)
}

#[test]
fn dockerd_device_killed_at_random_points_always_recovers() -> Result<()> {
    let engine = TestEngine::Dockerd(Dockerd::start()?);
    let images = Images::push(&engine)?;
    crash_loop(&Releases { files: 40, images: Some(&images) }, Some(&engine))
}
