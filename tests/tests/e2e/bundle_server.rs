//! nginx (Debian's package) as the bundle server, configured as the README says (issue
//! 19): a device polls its pointer file through nginx, an unchanged file costs a `304`,
//! a new build is found and applied; a download cut by a killed agent resumes with a
//! `Range` request that nginx answers `206`. Every claim is read from nginx's own access
//! log.

use std::fs;

use anyhow::{ensure, Context, Result};
use fleet_e2e::fleet::sha256_hex;
use fleet_e2e::nginx::BUNDLE_SERVER_LOCATIONS;
use fleet_e2e::pki::TestPki;
use fleet_e2e::{wait_until, Device, DeviceWatch, FleetRepo, Mosquitto, Nginx};

use crate::common::{assert_file, files_app, secs, wait_converged};

/// `fetch.base_url = "<nginx>"` for a device.
fn polling_nginx(fleet: &FleetRepo, id: &str, broker: &Mosquitto, nginx: &Nginx) -> Result<Device> {
    Device::builder(fleet, id)?
        .broker(&broker.url())
        .setting("fetch", "base_url", &format!("{:?}", nginx.base_url()))
        .create()
}

#[test]
fn nginx_answers_polls_of_an_unchanged_pointer_file_with_304_and_a_new_build_still_arrives() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    let conf = fleet.app_file("conf", "app.conf");
    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    let c1 = fleet.commit("release 1")?;
    fleet.build()?;
    let nginx = Nginx::serve(fleet.out_dir())?;
    // Polling every 5 s; nothing is published on the broker (it carries status only).
    let mut device = polling_nginx(&fleet, "gw-1", &broker, &nginx)?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    wait_converged(&watch, &device, &c1)?;
    assert_file(&device, &conf, "release = 1\n");

    // The first poll is a 200 with nginx's ETag; the next ones send it back and get a
    // 304 with no body.
    let pointer = "/devices/gw-1.json";
    wait_until(secs(15), "two polls of the unchanged pointer file answered 304", || {
        Ok(nginx.requests_for(pointer)?.iter().filter(|r| r.status == 304).count() >= 2)
    })
    .with_context(|| format!("{:#?}\n{}", nginx.requests(), device.log_tail()))?;
    let polls = nginx.requests_for(pointer)?;
    let first = &polls[0];
    ensure!(first.status == 200 && first.if_none_match.is_empty(), "{polls:#?}");
    ensure!(first.etag.starts_with('"') && first.cache_control == "no-cache", "{polls:#?}");
    for poll in &polls[1..] {
        ensure!(poll.status == 304 && poll.body_bytes == 0, "a later poll was not a 304: {polls:#?}");
        ensure!(poll.if_none_match == first.etag, "the poll did not send the ETag back: {polls:#?}");
    }
    ensure!(device.log().contains("304, unchanged"), "{}", device.log_tail());
    // The bundle was downloaded once, with the long-lived cache header.
    let bundle = format!("/bundles/{}.bundle", fleet.entry("gw-1")?.digest);
    let downloads = nginx.requests_for(&bundle)?;
    ensure!(downloads.len() == 1 && downloads[0].status == 200, "{downloads:#?}");
    ensure!(downloads[0].cache_control == "public, max-age=31536000, immutable", "{downloads:#?}");

    // CI builds release 2 and uploads it (bundles first, then the pointer files, each
    // renamed into place); nothing is announced. The next poll's tag no longer matches.
    files_app(&fleet, "conf", None, &[("app.conf", "release = 2\n")])?;
    let c2 = fleet.commit("release 2")?;
    fleet.build_staged()?;
    let seen = polls.len();
    fleet.upload_staged()?;
    wait_converged(&watch, &device, &c2)?;
    assert_file(&device, &conf, "release = 2\n");
    let after = nginx.requests_for(pointer)?;
    let changed = after[seen..]
        .iter()
        .find(|r| r.status == 200)
        .with_context(|| format!("no 200 for the changed pointer file: {after:#?}"))?;
    ensure!(changed.if_none_match == first.etag && changed.etag != first.etag, "{after:#?}");
    Ok(())
}

#[test]
fn a_download_cut_by_a_killed_agent_resumes_from_nginx_with_a_206() -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    // 64 KiB that do not compress, sent by nginx at 16 KiB/s: a download takes about 4 s,
    // time enough to kill the agent in the middle of it.
    let mut blob = String::new();
    let mut h = sha256_hex(b"seed");
    while blob.len() < 64 * 1024 {
        h = sha256_hex(h.as_bytes());
        blob.push_str(&h);
        blob.push('\n');
    }
    files_app(&fleet, "data", None, &[("blob.txt", &blob)])?;
    let c1 = fleet.commit("a big file")?;
    fleet.build()?;
    let entry = fleet.entry("gw-1")?;
    let nginx = Nginx::serve_with(fleet.out_dir(), &format!("limit_rate 16k;\n{BUNDLE_SERVER_LOCATIONS}"))?;
    let mut device = polling_nginx(&fleet, "gw-1", &broker, &nginx)?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;

    // Killed mid-download: what a power cut leaves is the first part in partial/<digest>.
    let partial = device.state_dir().join("partial").join(&entry.digest);
    wait_until(secs(20), "the download to be under way", || {
        Ok(fs::metadata(&partial).is_ok_and(|m| m.len() >= 8 * 1024))
    })
    .with_context(|| device.log_tail())?;
    device.kill9();
    let have = fs::metadata(&partial)?.len();
    ensure!(have < entry.size, "the download finished before the kill ({have} bytes)");

    device.start()?;
    wait_converged(&watch, &device, &c1)?;
    assert_file(&device, &fleet.app_file("data", "blob.txt"), &blob);
    ensure!(!partial.exists(), "the partial download was left behind");

    // nginx answered the resume with the rest of the file, and only the rest.
    let path = format!("/bundles/{}.bundle", entry.digest);
    let downloads = nginx.requests_for(&path)?;
    let resumed = downloads
        .iter()
        .find(|r| r.status == 206)
        .with_context(|| format!("no 206 for {path}: {downloads:#?}"))?;
    ensure!(resumed.range == format!("bytes={have}-"), "{downloads:#?}");
    ensure!(
        resumed.content_range == format!("bytes {have}-{}/{}", entry.size - 1, entry.size),
        "{downloads:#?}"
    );
    ensure!(resumed.body_bytes == entry.size - have, "{downloads:#?}");
    ensure!(downloads.iter().all(|r| r.status == 200 || r.status == 206), "{downloads:#?}");
    Ok(())
}

// ---- an authenticated bundle server (issue 13) --------------------------------------

/// A device polling `nginx` over HTTPS (trusting the test CA), with these `[fetch]`
/// settings on top.
fn polling_https(
    fleet: &FleetRepo,
    id: &str,
    broker: &Mosquitto,
    nginx: &Nginx,
    pki: &TestPki,
    fetch: &[(&str, String)],
) -> Result<Device> {
    let mut builder = Device::builder(fleet, id)?
        .broker(&broker.url())
        .setting("fetch", "base_url", &format!("{:?}", nginx.base_url()))
        .setting("fetch", "ca_file", &format!("{:?}", pki.file("ca.pem")));
    for (key, value) in fetch {
        builder = builder.setting("fetch", key, &format!("{value:?}"));
    }
    builder.create()
}

fn tls_lines(pki: &TestPki) -> String {
    format!(
        "ssl_certificate {};\nssl_certificate_key {};\n",
        pki.file("server.pem").display(),
        pki.file("server-key.pem").display()
    )
}

/// Two devices, one fleet build, `server_extra` for nginx; returns what each needs.
fn two_devices() -> Result<(Mosquitto, FleetRepo, String)> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    fleet.add_device("gw-2", &[])?;
    files_app(&fleet, "conf", None, &[("app.conf", "release = 1\n")])?;
    let c1 = fleet.commit("release 1")?;
    fleet.build()?;
    Ok((broker, fleet, c1))
}

#[test]
fn a_bundle_server_that_wants_a_bearer_token_gets_it_from_the_token_file_and_only_there() -> Result<()> {
    let (broker, fleet, c1) = two_devices()?;
    let pki = TestPki::new("gw-1")?;
    let conf = fleet.app_file("conf", "app.conf");
    let server = format!(
        "{}if ($http_authorization != \"Bearer tok-gw-1.sesame\") {{ return 401; }}\n{BUNDLE_SERVER_LOCATIONS}",
        tls_lines(&pki)
    );
    let nginx = Nginx::serve_tls(fleet.out_dir(), &server)?;
    let tokens = tempfile::tempdir()?;
    let (good, bad) = (tokens.path().join("good"), tokens.path().join("bad"));
    fs::write(&good, "tok-gw-1.sesame\n")?;
    fs::write(&bad, "tok-guessed\n")?;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut with =
        polling_https(&fleet, "gw-1", &broker, &nginx, &pki, &[("bearer_token_file", path(&good))])?;
    let mut without =
        polling_https(&fleet, "gw-2", &broker, &nginx, &pki, &[("bearer_token_file", path(&bad))])?;
    let watch = DeviceWatch::of(&broker.client(), &with)?;
    with.start()?;
    without.start()?;
    wait_converged(&watch, &with, &c1)?;
    assert_file(&with, &conf, "release = 1\n");
    let ok = nginx.requests_for("/devices/gw-1.json")?;
    ensure!(ok.first().is_some_and(|r| r.status == 200), "{ok:#?}");
    // The wrong token is refused by the server; that device applies nothing and says why.
    wait_until(secs(15), "gw-2's poll refused with 401", || {
        Ok(nginx.requests_for("/devices/gw-2.json")?.iter().any(|r| r.status == 401))
    })
    .with_context(|| without.log_tail())?;
    ensure!(without.log().contains("HTTP 401"), "{}", without.log_tail());
    let gw2_bundle = format!("/bundles/{}.bundle", fleet.entry("gw-2")?.digest);
    ensure!(nginx.requests()?.iter().all(|r| r.uri != gw2_bundle), "gw-2's bundle was served");
    // The token never appears in the agent's logs.
    ensure!(!with.log().contains("sesame"), "the token was logged:\n{}", with.log());
    Ok(())
}

#[test]
fn a_bundle_server_that_wants_a_client_certificate_gets_the_devices() -> Result<()> {
    let (broker, fleet, c1) = two_devices()?;
    let pki = TestPki::new("gw-1")?;
    let conf = fleet.app_file("conf", "app.conf");
    let server = format!(
        "{}ssl_client_certificate {};\nssl_verify_client on;\n{BUNDLE_SERVER_LOCATIONS}",
        tls_lines(&pki),
        pki.file("ca.pem").display()
    );
    let nginx = Nginx::serve_tls(fleet.out_dir(), &server)?;
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let client =
        [("client_cert", path(pki.file("client.pem"))), ("client_key", path(pki.file("client-key.pem")))];
    let mut with = polling_https(&fleet, "gw-1", &broker, &nginx, &pki, &client)?;
    let mut without = polling_https(&fleet, "gw-2", &broker, &nginx, &pki, &[])?;
    let watch = DeviceWatch::of(&broker.client(), &with)?;
    with.start()?;
    without.start()?;
    wait_converged(&watch, &with, &c1)?;
    assert_file(&with, &conf, "release = 1\n");
    // Without a certificate nginx answers 400 ("No required SSL certificate was sent").
    wait_until(secs(15), "gw-2's poll refused with 400", || {
        Ok(nginx.requests_for("/devices/gw-2.json")?.iter().any(|r| r.status == 400))
    })
    .with_context(|| without.log_tail())?;
    ensure!(without.log().contains("HTTP 400"), "{}", without.log_tail());
    Ok(())
}
