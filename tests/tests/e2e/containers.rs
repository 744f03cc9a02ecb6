//! Scenarios 1–4 with containers, on both engines (scenario 8): first deploy, updates,
//! a failed update rolled back, drift repaired.
//!
//! Each scenario is a function over a [`TestEngine`]. The dockerd tests start their own
//! daemon each (they run in parallel); podman allows one instance per machine, so one
//! test runs all three scenarios on one podman service, clearing it between them.
//!
//! The scenarios are the same on both engines, healthchecks included: podman runs
//! healthchecks only from systemd timers, and on a machine without systemd (like this
//! one) the agent runs them through libpod's API (see `agent/src/engine/docker.rs`).

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::{applied_commit, last_error_code, state};
use fleet_e2e::{wait_until, Device, DeviceWatch, Dockerd, Engine, FleetRepo, Mosquitto, Podman};

use crate::common::*;
use crate::engines::{web_app, Container, Health, Images, TestEngine};

/// App `tools`: a sleeping container (`tools-sleeper`) and a file.
fn tools_app(fleet: &FleetRepo, image: &str) -> Result<()> {
    fleet.write("apps/tools/app.yaml", "files:\n  - source: tools.conf\n")?;
    fleet.write("apps/tools/tools.conf", "verbose = false\n")?;
    fleet.write(
        "apps/tools/compose.yaml",
        format!("services:\n  sleeper:\n    image: {image}\n    command: [\"sleep\", \"3600\"]\n    restart: always\n"),
    )
}

/// What every container scenario starts with: an engine with images, a broker, a fleet
/// with one device `gw-1`, and its agent (created, not started) with a watch.
/// (Fields drop in order: the agent stops before its broker and files go away.)
struct Setup<'e> {
    device: Device,
    watch: DeviceWatch,
    engine: &'e TestEngine,
    broker: Mosquitto,
    fleet: FleetRepo,
}

impl<'e> Setup<'e> {
    fn new(engine: &'e TestEngine) -> Result<Setup<'e>> {
        Setup::with_settings(engine, &[])
    }

    /// With `(table, key, value)` settings in the device's `agent.toml`.
    fn with_settings(engine: &'e TestEngine, settings: &[(&str, &str, &str)]) -> Result<Setup<'e>> {
        let broker = Mosquitto::start()?;
        let fleet = FleetRepo::new("acme")?;
        fleet.add_device("gw-1", &[("site", "berlin")])?;
        let mut builder = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).engine(engine.socket_path());
        for (table, key, value) in settings {
            builder = builder.setting(table, key, value);
        }
        let device = builder.create()?;
        let watch = DeviceWatch::of(&broker.client(), &device)?;
        Ok(Setup { engine, broker, fleet, device, watch })
    }

    fn deploy(&mut self, message: &str) -> Result<String> {
        deploy(&mut self.fleet, &self.broker, &self.watch, &self.device, message)
            .with_context(|| format!("on {}", self.engine.name()))
    }

    fn gate(&self) -> Result<fleet_e2e::CmdOutput> {
        self.fleet.status_wait(&self.broker.url(), secs(90))
    }
}

// ---- scenario 1 + 2: first deploy, then updates -----------------------------------

fn first_deploy_then_updates(engine: &TestEngine, images: &Images) -> Result<()> {
    let mut s = Setup::new(engine)?;
    let conf = s.fleet.app_file("web", "files/app.conf");
    let tools_conf = s.fleet.app_file("tools", "tools.conf");

    // Neighbours the agent does not manage: a container and a file next to managed ones.
    engine.docker(&["run", "-d", "--name", "bystander", &images.tag(1), "sleep", "3600"])?;
    let bystander = engine.container("bystander")?.id().to_string();
    let notes = s.fleet.file_root().join("web/files/notes.txt");
    fs::create_dir_all(notes.parent().expect("has a parent"))?;
    fs::write(&notes, "written by hand\n")?;

    // 1. First deploy: two apps, two containers, two files.
    web_app(&s.fleet, &images.tag(1), "greeting = hello\n", Health::Good)?;
    tools_app(&s.fleet, &images.tag(1))?;
    let c1 = s.fleet.commit("web and tools")?;
    s.fleet.build()?;
    s.device.start()?;
    s.fleet.publish(&s.broker.url())?;
    let gate = s.gate()?;
    assert_eq!(gate.code, Some(0), "{gate}\n{}", s.device.log_tail());
    let status = wait_converged(&s.watch, &s.device, &c1)?;
    check_status_shape(&status, "gw-1", "acme")?;
    let reported: Vec<(&str, &str, bool)> = status["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c["name"].as_str().unwrap_or(""), c["image"].as_str().unwrap_or(""), c["running"] == true))
        .collect();
    assert_eq!(
        reported,
        [("tools-sleeper", images.pinned(1).as_str(), true), ("web-web", images.pinned(1).as_str(), true)],
        "{status}"
    );
    assert_file(&s.device, &conf, "greeting = hello\n");
    assert_file(&s.device, &tools_conf, "verbose = false\n");
    let web = engine.container("web-web")?;
    assert!(web.running(), "web-web is not running");
    assert_eq!(web.image(), images.pinned(1), "web-web runs the image pinned by digest");
    assert_eq!(web.label("io.fleet.managed"), Some("true"));
    assert_eq!(engine.docker(&["exec", "web-web", "cat", "/etc/app.conf"])?, "greeting = hello\n");
    let tools = engine.container("tools-sleeper")?.id().to_string();

    // 2a. A config file change restarts (recreates) the container that mounts it, and only that one.
    let web_before = engine.container("web-web")?.id().to_string();
    web_app(&s.fleet, &images.tag(1), "greeting = bonjour\n", Health::Good)?;
    s.deploy("french greeting")?;
    assert_file(&s.device, &conf, "greeting = bonjour\n");
    let web = engine.container("web-web")?;
    assert_ne!(web.id(), web_before, "web-web was not recreated after its mounted file changed");
    assert!(web.running());
    assert_eq!(engine.docker(&["exec", "web-web", "cat", "/etc/app.conf"])?, "greeting = bonjour\n");
    assert_eq!(engine.container("tools-sleeper")?.id(), tools, "tools-sleeper was recreated needlessly");

    // 2b. An image change recreates the container on the new image.
    let web_before = web.id().to_string();
    web_app(&s.fleet, &images.tag(2), "greeting = bonjour\n", Health::Good)?;
    s.deploy("web on bb:2")?;
    let web = engine.container("web-web")?;
    assert_ne!(web.id(), web_before, "web-web was not recreated for its new image");
    assert_eq!(web.image(), images.pinned(2));
    assert!(web.running());
    assert_eq!(engine.docker(&["exec", "web-web", "cat", "/www/index.html"])?.trim(), images.tag(2));
    assert_eq!(engine.container("tools-sleeper")?.id(), tools);

    // 2c. Removing an app removes its containers, network and files.
    s.fleet.remove("apps/tools")?;
    let c4 = s.deploy("tools retired")?;
    assert!(engine.inspect("tools-sleeper")?.is_none(), "tools-sleeper still exists");
    assert_no_file(&s.device, &tools_conf);
    assert!(!engine.networks()?.contains(&"tools_default".to_string()), "tools_default still exists");
    let status = s.watch.latest_status().context("a status")?;
    assert_eq!(status["containers"].as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(status["files"]["managed"], 1, "{status}");
    assert_eq!(applied_commit(&status), Some(c4.as_str()));

    // The neighbours were never touched.
    let b = engine.container("bystander")?;
    assert_eq!(b.id(), bystander, "the unmanaged container was recreated");
    assert!(b.running(), "the unmanaged container was stopped");
    assert_eq!(fs::read_to_string(&notes)?, "written by hand\n", "the unmanaged file changed");
    assert!(s.watch.events_of("apply_failed").is_empty(), "{}", s.watch.describe());
    Ok(())
}

// ---- scenario 3: a failed update is rolled back -----------------------------------

fn failed_update_rolls_back(engine: &TestEngine, images: &Images) -> Result<()> {
    let mut s = Setup::new(engine)?;
    let conf = s.fleet.app_file("web", "files/app.conf");
    let extra = s.fleet.app_file("web", "files/extra.conf");
    s.device.start()?;
    web_app(&s.fleet, &images.tag(1), "mode = stable\n", Health::Good)?;
    let good = s.deploy("stable web")?;
    let good_version = s.fleet.entry("gw-1")?.version;
    let spec_hash = engine.container("web-web")?.label("io.fleet.spec-hash").map(str::to_string);

    // The bad update: a broken web service, a changed config file and a new file.
    web_app(&s.fleet, &images.tag(2), "mode = broken\n", Health::Broken)?;
    s.fleet
        .write("apps/web/app.yaml", "files:\n  - source: files/app.conf\n  - source: files/extra.conf\n")?;
    s.fleet.write("apps/web/files/extra.conf", "extra = 1\n")?;
    let bad = ship(&mut s.fleet, &s.broker, "broken web")?;
    let bad_entry = s.fleet.entry("gw-1")?;

    // CI's gate fails.
    let gate = s.gate()?;
    assert_eq!(
        gate.code,
        Some(3),
        "status --wait must fail on a rolled back device\n{gate}\n{}",
        s.device.log_tail()
    );

    // The status says rolled back, why, and which version runs.
    let status = s
        .watch
        .wait_status(CONVERGE, "rolled_back", |st| state(st) == "rolled_back")
        .with_context(|| s.device.log_tail())?;
    let expected_code = "unhealthy";
    assert_eq!(last_error_code(&status), Some(expected_code), "{status}");
    assert!(status["last_error"]["message"].as_str().is_some_and(|m| m.contains("web-web")), "{status}");
    assert_eq!(applied_commit(&status), Some(good.as_str()), "{status}");
    assert_eq!(status["desired"]["commit"], bad.as_str(), "{status}");

    // Events: started, failed with the reason, rolled back from bad to good.
    let apply_failed = events_for_version(&s.watch, "apply_failed", bad_entry.version);
    assert_eq!(apply_failed.len(), 1, "{}", s.watch.describe());
    assert_eq!(apply_failed[0]["code"], expected_code);
    // The agent reports the state before it publishes the event, and the two topics are
    // not ordered with respect to each other: wait for the event too.
    s.watch.wait_event(secs(10), "the rolled_back event", |e| e["event"] == "rolled_back")?;
    let rolled_back = s.watch.events_of("rolled_back");
    assert_eq!(rolled_back.len(), 1, "{}", s.watch.describe());
    assert_eq!(rolled_back[0]["from_version"], bad_entry.version);
    assert_eq!(rolled_back[0]["to_version"], good_version);
    assert!(
        rolled_back[0]["reason"].as_str().is_some_and(|r| r.contains(expected_code)),
        "{}",
        s.watch.describe()
    );

    // The device is back in the good state: files, and the container on its old spec.
    assert_file(&s.device, &conf, "mode = stable\n");
    assert_no_file(&s.device, &extra);
    let web = engine.container("web-web")?;
    assert!(web.running(), "web-web is not running after the rollback");
    assert_eq!(web.image(), images.pinned(1));
    assert_eq!(web.label("io.fleet.spec-hash").map(str::to_string), spec_hash);

    // No retry loop: two more polls of the device's pointer file (which still names the
    // bad bundle) and a repeated announcement later, the bad bundle was fetched once and
    // applied once.
    let polls = |fleet: &FleetRepo| {
        fleet.server().requests().iter().filter(|r| r.path == "/devices/gw-1.json" && r.status == 200).count()
    };
    let polled = polls(&s.fleet);
    s.fleet.publish_output(&s.broker.url(), &["--force"])?.check()?;
    wait_until(secs(30), "two more polls of devices/gw-1.json", || Ok(polls(&s.fleet) >= polled + 2))?;
    let bad_path = format!("/bundles/{}.bundle", bad_entry.digest);
    let bad_fetches = s.fleet.server().requests().iter().filter(|r| r.path == bad_path).count();
    assert_eq!(bad_fetches, 1, "the bad bundle was downloaded {bad_fetches} times");
    assert_eq!(
        events_for_version(&s.watch, "apply_started", bad_entry.version).len(),
        1,
        "{}",
        s.watch.describe()
    );
    assert_eq!(state(&s.watch.latest_status().context("status")?), "rolled_back");

    // The next good commit applies.
    web_app(&s.fleet, &images.tag(2), "mode = fixed\n", Health::Good)?;
    s.fleet.write("apps/web/app.yaml", "files:\n  - source: files/app.conf\n")?;
    s.fleet.remove("apps/web/files/extra.conf")?;
    let fixed = s.deploy("fixed web")?;
    let gate = s.gate()?;
    assert_eq!(gate.code, Some(0), "{gate}");
    assert_file(&s.device, &conf, "mode = fixed\n");
    let web = engine.container("web-web")?;
    assert_eq!(web.image(), images.pinned(2));
    assert!(web.running());
    let status = s.watch.latest_status().context("status")?;
    assert!(status["last_error"].is_null(), "{status}");
    assert_eq!(applied_commit(&status), Some(fixed.as_str()));
    Ok(())
}

// ---- scenario 4: drift is repaired ------------------------------------------------

fn drift_is_repaired(engine: &TestEngine, images: &Images) -> Result<()> {
    let mut s = Setup::new(engine)?;
    let conf = s.fleet.app_file("web", "files/app.conf");
    s.device.start()?;
    web_app(&s.fleet, &images.tag(1), "color = blue\n", Health::Good)?;
    s.deploy("blue web")?;
    // Repairs must come within the reconcile interval (2 s) plus time to do them.
    let within = secs(2 + 8);

    let repaired = |kind: &str, name: &str, since: Instant| -> Result<Duration> {
        s.watch
            .wait_event(within, &format!("drift_repaired {kind} {name}"), |e| {
                e["event"] == "drift_repaired" && e["kind"] == kind && e["name"] == name
            })
            .with_context(|| s.device.log_tail())?;
        let took = since.elapsed();
        eprintln!("drift on {}: {kind} {name} repaired after {took:?}", engine.name());
        Ok(took)
    };

    // A managed file edited by hand.
    let t = Instant::now();
    fs::write(&conf, "color = red\n")?;
    repaired("file_changed", &conf, t)?;
    assert_file(&s.device, &conf, "color = blue\n");

    // A managed file deleted.
    let t = Instant::now();
    fs::remove_file(&conf)?;
    repaired("file_missing", &conf, t)?;
    assert_file(&s.device, &conf, "color = blue\n");

    // A managed container stopped.
    let t = Instant::now();
    engine.docker(&["stop", "-t", "1", "web-web"])?;
    repaired("container_stopped", "web-web", t)?;
    wait_until(within, "web-web running again", || Ok(engine.container("web-web")?.running()))?;

    // A managed container removed.
    let before = engine.container("web-web")?.id().to_string();
    let t = Instant::now();
    engine.docker(&["rm", "-f", "web-web"])?;
    repaired("container_missing", "web-web", t)?;
    wait_until(within, "web-web recreated and running", || {
        Ok(engine.inspect("web-web")?.map(Container).is_some_and(|c| c.running() && c.id() != before))
    })?;
    assert_eq!(engine.container("web-web")?.image(), images.pinned(1));

    let status = s.watch.wait_status(REPORT, "the drift counted in the status", |st| {
        st["files"]["drift_repaired"].as_u64() >= Some(2)
    })?;
    assert_eq!(state(&status), "converged", "{status}");
    ensure!(
        s.watch.events_of("apply_started").len() == 1,
        "drift repair must not re-apply the bundle: {}",
        s.watch.describe()
    );
    Ok(())
}

// ---- image garbage collection (issue 16) ----------------------------------------

/// Whether the engine holds an image by this reference.
fn has_image(engine: &TestEngine, reference: &str) -> Result<bool> {
    let (status, body) = engine.get(&format!("/v1.41/images/{reference}/json"))?;
    match status {
        200 => Ok(true),
        404 => Ok(false),
        _ => anyhow::bail!("inspecting image {reference}: HTTP {status}: {body}"),
    }
}

/// Images the agent pulled go at the commit that stops using them (grace 0 here); an
/// image the device had before the agent stays; a failed update rolls back onto the
/// last good bundle's image, which is still there.
fn image_gc(engine: &TestEngine, images: &Images) -> Result<()> {
    // The device has bb:2 before the agent; bb:1 is only in the registry.
    engine.docker(&["rmi", &images.tag(1)])?;
    ensure!(!has_image(engine, &images.pinned(1))?, "bb:1 is still on the engine");
    ensure!(has_image(engine, &images.pinned(2))?, "bb:2 is not on the engine");
    let mut s = Setup::with_settings(engine, &[("engine", "image_gc_grace_secs", "0")])?;
    s.device.start()?;

    web_app(&s.fleet, &images.tag(1), "v = 1\n", Health::Good)?;
    s.deploy("web on bb:1 (pulled by the agent)")?;
    ensure!(has_image(engine, &images.pinned(1))?, "bb:1 was not pulled");
    let records = fs::read_to_string(s.device.state_dir().join("images.json"))?;
    ensure!(records.contains(&images.pinned(1)), "the pull is not recorded: {records}");

    web_app(&s.fleet, &images.tag(2), "v = 2\n", Health::Good)?;
    s.deploy("web on bb:2 (the device had it)")?;
    wait_until(secs(20), "bb:1 removed after the commit that stopped using it", || {
        Ok(!has_image(engine, &images.pinned(1))?)
    })
    .with_context(|| s.device.log_tail())?;
    ensure!(engine.container("web-web")?.image() == images.pinned(2));

    web_app(&s.fleet, &images.tag(1), "v = 3\n", Health::Good)?;
    s.deploy("back on bb:1 (pulled again)")?;
    ensure!(has_image(engine, &images.pinned(1))?, "bb:1 was not pulled again");
    // Two reconciles later, bb:2 (unused, but never pulled by the agent) is still there.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(has_image(engine, &images.pinned(2))?, "an image the device had before the agent was removed");

    // A failed update (a broken healthcheck on bb:2) rolls back to bb:1, which the
    // commit kept: the last good bundle's image is never collected.
    web_app(&s.fleet, &images.tag(2), "v = 4\n", Health::Broken)?;
    ship(&mut s.fleet, &s.broker, "broken web")?;
    s.watch
        .wait_status(CONVERGE, "rolled_back", |st| state(st) == "rolled_back")
        .with_context(|| s.device.log_tail())?;
    let web = engine.container("web-web")?;
    ensure!(web.running() && web.image() == images.pinned(1), "web-web is not back on bb:1");
    ensure!(has_image(engine, &images.pinned(1))?);
    ensure!(s.device.log().contains("removed an image no committed bundle uses"), "{}", s.device.log_tail());
    Ok(())
}

// ---- disk check before a pull (issue 16) --------------------------------------------

/// The reserve that leaves no room anywhere: every pull of a sized image is refused.
const NO_ROOM: &str = "1152921504606846976";

/// `build --resolve-digests` records what the registry lists for bb:1; the agent, whose
/// engine lacks it, checks that size (unpacked) against the engine's `DockerRootDir`
/// before pulling: with no room beyond the reserve the bundle waits with
/// `insufficient_space` naming the bytes and that directory, nothing is pulled or
/// changed; with room (the reserve lowered, the agent restarted) the stored bundle
/// applies without a new build.
fn image_space(engine: &TestEngine, images: &Images) -> Result<()> {
    engine.docker(&["rmi", &images.tag(1)])?;
    ensure!(!has_image(engine, &images.pinned(1))?, "bb:1 is still on the engine");
    let mut s = Setup::with_settings(engine, &[("fetch", "disk_reserve_bytes", NO_ROOM)])?;
    s.device.start()?;
    web_app(&s.fleet, &images.tag(1), "v = 1\n", Health::Good)?;
    let commit = ship(&mut s.fleet, &s.broker, "web on bb:1, no room for it")?;
    let deferred = s
        .watch
        .wait_status(CONVERGE, "insufficient_space", |st| last_error_code(st) == Some("insufficient_space"))
        .with_context(|| s.device.log_tail())?;
    let message = deferred["last_error"]["message"].as_str().unwrap_or_default().to_string();
    let root = engine.get_json("/v1.41/info")?["DockerRootDir"].as_str().unwrap_or_default().to_string();
    ensure!(!root.is_empty() && message.contains(&root), "the message does not name {root:?}: {message}");
    ensure!(message.contains("bytes") && message.contains("free"), "{message}");
    ensure!(!has_image(engine, &images.pinned(1))?, "bb:1 was pulled");
    ensure!(engine.inspect("web-web")?.is_none(), "a container was created");

    s.device.stop();
    let config = fs::read_to_string(s.device.config_path())?;
    ensure!(config.contains(NO_ROOM), "{config}");
    fs::write(s.device.config_path(), config.replace(NO_ROOM, "0"))?;
    s.device.start()?;
    wait_converged(&s.watch, &s.device, &commit)?;
    ensure!(has_image(engine, &images.pinned(1))?, "bb:1 was not pulled");
    ensure!(engine.container("web-web")?.running());
    Ok(())
}

// ---- the tests ----------------------------------------------------------------------

/// A container scenario, run on an engine with the test images pushed.
type Scenario = fn(&TestEngine, &Images) -> Result<()>;

fn on_dockerd(scenario: Scenario) -> Result<()> {
    let engine = TestEngine::Dockerd(Dockerd::start()?);
    let images = Images::push(&engine)?;
    scenario(&engine, &images)
}

#[test]
fn dockerd_first_deploy_then_updates() -> Result<()> {
    on_dockerd(first_deploy_then_updates)
}

#[test]
fn dockerd_failed_update_rolls_back() -> Result<()> {
    on_dockerd(failed_update_rolls_back)
}

#[test]
fn dockerd_drift_is_repaired() -> Result<()> {
    on_dockerd(drift_is_repaired)
}

#[test]
fn dockerd_image_gc_removes_what_the_agent_pulled_and_keeps_the_last_good() -> Result<()> {
    on_dockerd(image_gc)
}

#[test]
fn dockerd_an_image_without_room_on_the_engines_disk_waits_with_insufficient_space() -> Result<()> {
    on_dockerd(image_space)
}

/// The three scenarios on one podman service (one podman per machine at a time).
#[test]
fn podman_first_deploy_updates_rollback_and_drift() -> Result<()> {
    let engine = TestEngine::Podman(Podman::start()?);
    let images = Images::push(&engine)?;
    let scenarios: [(&str, Scenario); 3] = [
        ("first deploy then updates", first_deploy_then_updates),
        ("failed update rolls back", failed_update_rolls_back),
        ("drift is repaired", drift_is_repaired),
    ];
    for (name, scenario) in scenarios {
        scenario(&engine, &images).with_context(|| format!("podman: {name}"))?;
        engine.clear()?;
    }
    Ok(())
}
