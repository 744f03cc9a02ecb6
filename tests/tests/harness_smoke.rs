//! Smoke tests of the end-to-end harness itself, against the real components: each
//! helper in `fleet_e2e` is exercised the way the fleet's end-to-end tests will use it.
//! Needs the packages of `scripts/setup.sh` and root (dockerd, podman).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fleet_e2e::{
    build_busybox_image, free_port, http_get, push_image, wait_until, Dockerd, Engine, GitRepo, Mosquitto,
    Podman, Registry, StaticHttpOptions, StaticHttpServer,
};
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) {
            continue; // zombie: already dead
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            found.push(pid);
        }
    }
    found
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(String::from)
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Asserts a stopped engine left nothing behind: processes, mounts, bridge, temp dir.
fn assert_cleaned_up(dir: &Path, bridge: Option<&str>) {
    assert!(processes_mentioning(dir).is_empty(), "processes left: {:?}", processes_mentioning(dir));
    assert!(mounts_under(dir).is_empty(), "mounts left: {:?}", mounts_under(dir));
    assert!(!dir.exists(), "{} was not removed", dir.display());
    if let Some(bridge) = bridge {
        assert!(!link_exists(bridge), "bridge {bridge} was not deleted");
    }
}

#[test]
fn wait_until_names_what_timed_out() {
    let start = Instant::now();
    let err = wait_until(Duration::from_millis(200), "the moon to turn blue", || Ok(false)).unwrap_err();
    assert!(err.to_string().contains("the moon to turn blue"), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(200));
    let err = wait_until(Duration::from_millis(100), "x", || anyhow::bail!("last problem")).unwrap_err();
    assert!(format!("{err:#}").contains("last problem"), "{err:#}");
    let mut n = 0;
    wait_until(SECS(5), "three polls", || {
        n += 1;
        Ok(n == 3)
    })
    .unwrap();
    let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
}

#[test]
fn mosquitto_pub_sub_retained_and_restart_on_same_port() -> Result<()> {
    let mut broker = Mosquitto::start()?;
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));
    let client = broker.client();
    let sub = client.subscribe("fleet/+/status")?;

    client.publish("fleet/a/status", "online", true)?;
    let binary = [0u8, 1, 2, b'\n', 0xff];
    client.publish("fleet/b/status", binary, false)?;
    client.publish("other/topic", "ignored", false)?;
    let msgs = sub.wait_count(2, SECS(5))?;
    assert_eq!(msgs[0].topic, "fleet/a/status");
    assert_eq!(msgs[0].text(), "online");
    assert_eq!(msgs[1].payload, binary);
    assert!(msgs.iter().all(|m| m.topic.starts_with("fleet/")));

    assert_eq!(client.retained("fleet/a/status")?.as_deref(), Some("online"));
    assert_eq!(fleet_e2e::mqtt::retained(broker.port(), "fleet/nothing")?, None);

    // Outage: the broker goes away and comes back on the same port; the background
    // subscriber reconnects and resubscribes by itself.
    let port = broker.port();
    broker.stop();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(client.publish("fleet/c/status", "x", false).is_err());
    broker.restart()?;
    assert_eq!(broker.port(), port);
    sub.clear();
    wait_until(SECS(15), "the subscriber to resubscribe", || Ok(sub.subacks() >= 2))?;
    client.publish("fleet/c/status", "back", false)?;
    sub.wait_for(SECS(5), "the message after the restart", |m| m.text() == "back")?;
    // Without persistence, retained messages do not survive a restart.
    assert_eq!(client.retained("fleet/a/status")?, None);
    Ok(())
}

#[test]
fn mosquitto_persistence_keeps_retained_messages_across_restart() -> Result<()> {
    let mut broker = Mosquitto::builder().persistence(true).start()?;
    broker.client().publish("fleet/f/announce", "{\"v\":1}", true)?;
    broker.restart()?;
    let msg = broker.client().retained_message("fleet/f/announce")?.context("retained message lost")?;
    assert!(msg.retained);
    assert_eq!(msg.json()?, json!({"v": 1}));
    Ok(())
}

#[test]
fn mosquitto_acl_and_passwords_are_enforced() -> Result<()> {
    let broker = Mosquitto::builder()
        .allow_anonymous(false)
        .user("admin", "admin-pw")
        .user("dev1", "dev1-pw")
        .acl("user admin\ntopic readwrite #\n\npattern readwrite fleet/+/devices/%c/#\n")
        .start()?;
    let admin = broker.client_as("admin", "admin-pw");
    let sub = admin.subscribe("fleet/#")?;
    let dev1 = broker.client_as("dev1", "dev1-pw").with_client_id("dev1");
    dev1.publish("fleet/f1/devices/dev2/status", "spoofed", false)?; // silently dropped
    dev1.publish("fleet/f1/devices/dev1/status", "mine", false)?;
    let got = sub.wait_for(SECS(5), "dev1's own status", |m| m.topic == "fleet/f1/devices/dev1/status")?;
    assert_eq!(got.text(), "mine");
    assert!(sub.messages().iter().all(|m| m.text() != "spoofed"), "{:?}", sub.messages());
    assert!(broker.log().contains("Denied PUBLISH"), "{}", broker.log());

    let err = broker.client().publish("fleet/x", "anon", false).unwrap_err();
    assert!(format!("{err:#}").contains("not authorised"), "{err:#}");
    assert!(broker.client_as("dev1", "wrong").retained("fleet/x").is_err());
    Ok(())
}

#[test]
fn dockerd_builds_runs_lists_and_cleans_up() -> Result<()> {
    let dockerd = Dockerd::start()?;
    let dir = dockerd.dir().to_path_buf();
    let bridge = dockerd.bridge().context("no bridge")?;
    build_busybox_image(&dockerd, "fe2e/bb:1", &["sleep", "3600"])?;

    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let id = dockerd.docker(&[
        "run",
        "-d",
        "--name",
        "smoke-web",
        "-p",
        &publish,
        "--label",
        "io.fleet.managed=true",
        "fe2e/bb:1",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    let id = id.trim();
    assert_eq!(dockerd.docker(&["ps", "-q", "--no-trunc"])?.trim(), id);

    // Listed through the API over the unix socket.
    let (status, body) = fleet_e2e::engine_get(dockerd.socket_path(), "/v1.41/containers/json?all=1")?;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&body)?;
    let c = &list.as_array().context("not a list")?[0];
    assert_eq!(c["Id"], id);
    assert_eq!(c["Names"][0], "/smoke-web");
    assert_eq!(c["Labels"]["io.fleet.managed"], "true");

    // The published port answers on loopback.
    let addr = format!("127.0.0.1:{port}");
    wait_until(SECS(10), "httpd on the published port", || Ok(http_get(&addr, "/")?.0 == 200))?;
    assert_eq!(http_get(&addr, "/")?.1.trim(), "fe2e/bb:1");

    // User-defined networks resolve containers by alias (Compose service names).
    dockerd.docker(&["network", "create", "smoke-net"])?;
    dockerd.docker(&[
        "run",
        "-d",
        "--name",
        "smoke-alias",
        "--network",
        "smoke-net",
        "--network-alias",
        "web",
        "fe2e/bb:1",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    let fetched = dockerd.docker(&[
        "run",
        "--rm",
        "--network",
        "smoke-net",
        "fe2e/bb:1",
        "wget",
        "-qO-",
        "http://web/",
    ])?;
    assert_eq!(fetched.trim(), "fe2e/bb:1");

    // Dropping it with containers running removes everything.
    assert!(!mounts_under(&dir).is_empty());
    drop(dockerd);
    assert_cleaned_up(&dir, Some(&bridge));
    Ok(())
}

#[test]
fn dockerd_killed_hard_is_still_cleaned_up() -> Result<()> {
    let dockerd = Dockerd::start()?;
    let dir = dockerd.dir().to_path_buf();
    let bridge = dockerd.bridge().context("no bridge")?;
    build_busybox_image(&dockerd, "fe2e/bb:crash", &["sleep", "3600"])?;
    let port = free_port();
    dockerd.docker(&[
        "run",
        "-d",
        "--name",
        "doomed",
        "-p",
        &format!("127.0.0.1:{port}:80"),
        "fe2e/bb:crash",
    ])?;
    // Simulate a crash: no chance to stop containers through the API.
    let pid = dockerd.pid().context("no pid")?;
    Command::new("kill").args(["-9", &pid.to_string()]).status()?;
    drop(dockerd);
    assert_cleaned_up(&dir, Some(&bridge));
    ensure!(TcpStream::connect(("127.0.0.1", port)).is_err(), "docker-proxy still listens on {port}");
    Ok(())
}

#[test]
fn two_dockerds_run_side_by_side() -> Result<()> {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(Dockerd::start);
        let b = s.spawn(Dockerd::start);
        (a.join(), b.join())
    });
    let (a, b) = (a.expect("thread")?, b.expect("thread")?);
    assert_ne!(a.bridge(), b.bridge());
    let mut ips = Vec::new();
    for (i, d) in [&a, &b].into_iter().enumerate() {
        build_busybox_image(d, "fe2e/bb:pair", &[])?;
        let port = free_port();
        let publish = format!("127.0.0.1:{port}:80");
        d.docker(&[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            &publish,
            "fe2e/bb:pair",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ])?;
        ips.push(d.docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"])?.trim().to_string());
        let addr = format!("127.0.0.1:{port}");
        wait_until(SECS(10), &format!("httpd of dockerd {i}"), || Ok(http_get(&addr, "/")?.0 == 200))?;
    }
    assert_ne!(ips[0], ips[1], "both daemons handed out the same container IP");
    Ok(())
}

#[test]
fn registry_push_then_podman_pulls_and_runs() -> Result<()> {
    let registry = Registry::start()?;
    let dockerd = Dockerd::start()?;
    let image = registry.image("bb:1");
    assert_eq!(image, format!("{}/bb:1", registry.addr()));
    build_busybox_image(&dockerd, &image, &["httpd", "-f", "-p", "80", "-h", "/www"])?;
    let digest = push_image(&dockerd, &image)?;
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    // Pushing again reports the same content digest.
    assert_eq!(push_image(&dockerd, &image)?, digest);
    drop(dockerd);

    let podman = Podman::start()?;
    let dir = podman.dir().to_path_buf();
    // Isolated storage, and the runtime and network stack the harness configured.
    let info = podman.get_json("/v4.0.0/libpod/info")?;
    assert!(
        info["store"]["graphRoot"].as_str().is_some_and(|r| r.starts_with(&*dir.to_string_lossy())),
        "{info}"
    );
    assert_eq!(info["host"]["ociRuntime"]["name"], "runc");
    assert_eq!(info["host"]["networkBackend"], "netavark");
    // Through the Docker-compatible API, by tag and by digest.
    let (status, body) =
        podman.post(&format!("/v1.41/images/create?fromImage={}/bb&tag=1", registry.addr()), None)?;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("\"error\""), "{body}");
    let pinned = format!("{}/bb@{digest}", registry.addr());
    podman.pull(&pinned)?;
    let images = podman.get_json("/v1.41/images/json")?;
    let digests: Vec<&str> = images
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["RepoDigests"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(digests.iter().any(|d| d.ends_with(&digest)), "{digests:?}");

    // Create and start a container the way the agent does.
    let port = free_port();
    let spec = json!({
        "Image": pinned,
        "Labels": {"io.fleet.managed": "true"},
        "ExposedPorts": {"80/tcp": {}},
        "HostConfig": {"PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": port.to_string()}]}},
    });
    let (status, body) =
        podman.post("/v1.41/containers/create?name=smoke-podman", Some(&spec.to_string()))?;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body)?["Id"].as_str().context("no Id")?.to_string();
    let (status, body) = podman.post(&format!("/v1.41/containers/{id}/start"), None)?;
    assert_eq!(status, 204, "{body}");
    let listed = podman.containers()?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["State"], "running");
    assert_eq!(listed[0]["Labels"]["io.fleet.managed"], "true");
    let addr = format!("127.0.0.1:{port}");
    wait_until(SECS(10), "httpd in the podman container", || Ok(http_get(&addr, "/")?.0 == 200))?;
    assert_eq!(http_get(&addr, "/")?.1.trim(), image);

    // The Docker CLI works against podman's socket too.
    assert!(podman.docker(&["ps", "--format", "{{.Names}}"])?.contains("smoke-podman"));
    drop(podman);
    assert_cleaned_up(&dir, None);
    ensure!(TcpStream::connect(&addr).is_err(), "the podman container still serves {addr}");
    Ok(())
}

/// A raw GET (the server closes the connection): status line, headers, body.
fn raw_get(addr: &str, path: &str, range: Option<&str>) -> Result<(String, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{range}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no header end")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    Ok((status.to_string(), headers.to_string(), raw[end + 4..].to_vec()))
}

#[test]
fn static_http_server_ranges_and_dropped_first_transfer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir_all(dir.path().join("blobs"))?;
    std::fs::write(dir.path().join("blobs/big.bin"), &data)?;
    let server = StaticHttpServer::start_with(
        dir.path(),
        StaticHttpOptions { drop_first_after: Some(1000), ..Default::default() },
    )?;
    let addr = server.addr();
    assert_eq!(server.url("/blobs/big.bin"), format!("http://{addr}/blobs/big.bin"));

    // First transfer: full length announced, connection dropped after 1000 bytes.
    let (status, headers, body) = raw_get(&addr, "/blobs/big.bin", None)?;
    assert!(status.contains(" 200 "), "{status}");
    assert!(headers.contains("Content-Length: 10000"), "{headers}");
    assert_eq!(body, &data[..1000]);

    // Resume from there.
    let (status, headers, body) = raw_get(&addr, "/blobs/big.bin", Some("bytes=1000-"))?;
    assert!(status.contains(" 206 "), "{status}");
    assert!(headers.contains("Content-Range: bytes 1000-9999/10000"), "{headers}");
    assert_eq!(body, &data[1000..]);

    // Later transfers are complete; bounded ranges; errors.
    assert_eq!(raw_get(&addr, "/blobs/big.bin", None)?.2, data);
    assert_eq!(raw_get(&addr, "/blobs/big.bin", Some("bytes=10-19"))?.2, &data[10..20]);
    assert!(raw_get(&addr, "/blobs/big.bin", Some("bytes=10000-"))?.0.contains(" 416 "));
    assert!(raw_get(&addr, "/missing", None)?.0.contains(" 404 "));
    assert!(raw_get(&addr, "/../etc/passwd", None)?.0.contains(" 404 "));

    let log = server.requests();
    assert_eq!(log.len(), 7);
    assert!(log[0].dropped && log[0].body_bytes == 1000);
    assert_eq!(log[1].range.as_deref(), Some("bytes=1000-"));
    assert!(!log[2].dropped && log[2].body_bytes == 10_000);
    Ok(())
}

#[test]
fn git_commit_ids_are_reproducible() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let make = |name: &str, date: &str| -> Result<(String, String)> {
        let mut repo = GitRepo::init(tmp.path().join(name))?;
        repo.set_date(date);
        repo.write("apps/web/app.toml", "image = \"bb:1\"\n")?;
        repo.write("fleet.toml", "name = \"demo\"\n")?;
        let first = repo.commit("first")?;
        repo.remove("fleet.toml")?;
        repo.write("apps/web/app.toml", "image = \"bb:2\"\n")?;
        let second = repo.commit("second")?;
        assert_eq!(repo.head()?, second);
        let shown = repo.git(&["show", "-s", "--format=%an <%ae> %ad %cd", "--date=raw", "HEAD~1"])?;
        assert_eq!(shown.trim(), format!("Fleet Test <fleet-test@example.invalid> {0} {0}", raw_date(date)));
        Ok((first, second))
    };
    let a = make("a", "2024-01-01T00:00:00+0000")?;
    let b = make("b", "2024-01-01T00:00:00+0000")?;
    let c = make("c", "2024-06-01T00:00:00+0000")?;
    assert_eq!(a, b);
    assert_eq!(a.0.len(), 40);
    assert_ne!(a.0, a.1);
    assert_ne!(a.0, c.0);
    Ok(())
}

/// `git --date=raw` form of the dates used above.
fn raw_date(date: &str) -> &'static str {
    match date {
        "2024-01-01T00:00:00+0000" => "1704067200 +0000",
        "2024-06-01T00:00:00+0000" => "1717200000 +0000",
        other => panic!("no raw form for {other}"),
    }
}
