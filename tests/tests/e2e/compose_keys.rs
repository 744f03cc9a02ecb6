//! Issue 17: the Compose file of the issue, an app with fixed addresses on a network
//! with `ipam`, and an app with the other keys no policy governs, deployed by the whole
//! loop (build, publish, agent) on dockerd and podman, every key checked in `docker
//! inspect` of the running containers; changing one key (the log size) recreates the
//! container, changing a network's `ipam` recreates the network.
//!
//! Two changes to the issue's file, both for this machine: the image is the test
//! registry's busybox, and the `nofile` ulimit is 16384 because this sandbox's hard
//! limit is 20000 and forbids raising it; on podman `nproc` is set too (podman raises
//! it to its maximum when only `nofile` is given, which the sandbox forbids).

use anyhow::{ensure, Result};
use fleet_e2e::{Dockerd, Engine, FleetRepo, Mosquitto, Podman};
use serde_json::{json, Value};

use crate::common::*;
use crate::engines::{Images, TestEngine};

fn issue_17_app(fleet: &FleetRepo, engine: &TestEngine, image: &str, max_size: &str) -> Result<()> {
    let ulimits = match engine {
        TestEngine::Podman(_) => "{nofile: 16384, nproc: 4096}",
        TestEngine::Dockerd(_) => "{nofile: 16384}",
    };
    fleet.write("apps/web/app.yaml", "{}\n")?;
    fleet.write("apps/web/.env", "GREETING=hello from .env\n")?;
    fleet.write(
        "apps/web/compose.yaml",
        format!(
            "x-common: &common
  restart: unless-stopped
  logging: {{driver: json-file, options: {{max-size: \"{max_size}\", max-file: \"3\"}}}}
services:
  web:
    <<: *common
    image: {image}
    env_file: .env
    sysctls: {{net.core.somaxconn: 1024}}
    ulimits: {ulimits}
    extra_hosts: [\"broker:10.0.0.5\"]
    init: {init}
    read_only: true
    security_opt: [\"no-new-privileges:true\"]
    working_dir: /srv
    shm_size: 64m
",
            init = true,
        ),
    )
}

/// An app whose resolver has a fixed address on a network with its own subnet (the shape
/// of awesome-compose's pihole-cloudflared-DoH), and that network's `ip_range`.
fn fixed_address_app(fleet: &FleetRepo, image: &str, subnet: &str, ip_range: &str) -> Result<()> {
    fleet.write("apps/dns/app.yaml", "{}\n")?;
    fleet.write(
        "apps/dns/compose.yaml",
        format!(
            "services:
  resolver:
    image: {image}
    command: [sh, -c, \"sleep 3600\"]
    networks:
      dns: {{ipv4_address: {subnet}.53, priority: 5}}
      default: {{}}
networks:
  dns:
    driver_opts: {{com.docker.network.driver.mtu: \"1400\"}}
    ipam:
      config:
        - {{subnet: {subnet}.0/24, gateway: {subnet}.1, ip_range: {ip_range}}}
"
        ),
    )
}

/// An app using the other keys the agent applies that no device policy governs.
fn more_keys_app(fleet: &FleetRepo, image: &str) -> Result<()> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    fleet.write("apps/more/app.yaml", "{}\n")?;
    fleet.write("apps/more/box.labels", "com.example.tier=edge\n")?;
    fleet.write(
        "apps/more/compose.yaml",
        format!(
            "services:
  box:
    image: {image}
    command: [sh, -c, \"sleep 3600\"]
    pull_policy: always
    platform: linux/{arch}
    label_file: box.labels
    post_start:
      - command: [sh, -c, \"echo \\\"$$WHO\\\" > /tmp/post_start\"]
        environment: {{WHO: hooked}}
    tty: true
    stdin_open: true
    stop_grace_period: 7s
    dns: [10.0.0.53]
    dns_search: [fleet.lan]
    group_add: [\"20\"]
    oom_score_adj: 300
    pids_limit: 64
    cpuset: \"0\"
    cpu_shares: 512
    mem_limit: 64m
    mem_reservation: 32m
    mem_swappiness: 10
    oom_kill_disable: true
    ipc: shareable
    runtime: runc
    mac_address: 02:42:ac:11:00:42
    blkio_config:
      device_read_bps: [{{path: {device}, rate: 1mb}}]
",
            device = host_block_device()
        ),
    )
}

/// A block device of this machine, for the I/O throttle.
fn host_block_device() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"));
    names.retain(|n| std::path::Path::new("/dev").join(n).exists());
    names.sort();
    format!("/dev/{}", names.first().map_or("sda", String::as_str))
}

/// Checks the running `more-box` in `docker inspect`.
fn more_keys_applied(engine: &TestEngine) -> Result<()> {
    let c = engine.container("more-box")?;
    ensure!(c.running(), "more-box is not running: {}", c.0["State"]);
    let (config, host) = (&c.0["Config"], &c.0["HostConfig"]);
    let mut wrong = Vec::new();
    let mut want = |what: &str, got: &Value, expected: Value| {
        if *got != expected {
            wrong.push(format!("{what}: {got} (want {expected})"));
        }
    };
    want("Config.Labels.com.example.tier", &config["Labels"]["com.example.tier"], json!("edge"));
    want("Config.Tty", &config["Tty"], json!(true));
    want("Config.OpenStdin", &config["OpenStdin"], json!(true));
    want("HostConfig.Dns", &host["Dns"], json!(["10.0.0.53"]));
    want("HostConfig.DnsSearch", &host["DnsSearch"], json!(["fleet.lan"]));
    want("HostConfig.OomScoreAdj", &host["OomScoreAdj"], json!(300));
    want("HostConfig.PidsLimit", &host["PidsLimit"], json!(64));
    want("HostConfig.CpusetCpus", &host["CpusetCpus"], json!("0"));
    want("HostConfig.CpuShares", &host["CpuShares"], json!(512));
    want("HostConfig.MemoryReservation", &host["MemoryReservation"], json!(32 << 20));
    want("HostConfig.MemorySwappiness", &host["MemorySwappiness"], json!(10));
    want("HostConfig.OomKillDisable", &host["OomKillDisable"], json!(true));
    want("HostConfig.IpcMode", &host["IpcMode"], json!("shareable"));
    want(
        "HostConfig.BlkioDeviceReadBps",
        &host["BlkioDeviceReadBps"],
        json!([{"Path": host_block_device(), "Rate": 1 << 20}]),
    );
    ensure!(host["GroupAdd"].to_string().contains("20"), "group_add: {}", host["GroupAdd"]);
    match engine {
        TestEngine::Dockerd(_) => {
            want("Config.StopTimeout", &config["StopTimeout"], json!(7));
            want("HostConfig.Runtime", &host["Runtime"], json!("runc"));
            want("Config.MacAddress", &config["MacAddress"], json!("02:42:ac:11:00:42"));
        }
        TestEngine::Podman(podman) => {
            // podman's compatible inspect names neither the runtime nor the MAC address.
            let runtime = podman.podman(&["inspect", "--format", "{{.OCIRuntime}}", "more-box"])?;
            want("OCIRuntime", &json!(runtime.trim()), json!("runc"));
        }
    }
    let hooked = engine.docker(&["exec", "more-box", "cat", "/tmp/post_start"])?;
    ensure!(hooked.trim() == "hooked", "post_start did not run with its environment: {hooked:?}");
    let mac = engine.docker(&["exec", "more-box", "cat", "/sys/class/net/eth0/address"])?;
    ensure!(mac.trim() == "02:42:ac:11:00:42", "mac_address inside: {mac}");
    ensure!(wrong.is_empty(), "not as set in inspect: {wrong:#?}");
    Ok(())
}

/// The resolver's address on `dns_dns`, and that network's id.
fn fixed_address_state(engine: &TestEngine) -> Result<(String, String)> {
    let resolver = engine.container("dns-resolver")?;
    ensure!(resolver.running(), "dns-resolver is not running: {}", resolver.0["State"]);
    let on_dns = &resolver.0["NetworkSettings"]["Networks"]["dns_dns"];
    let ip = on_dns["IPAddress"].as_str().unwrap_or_default().to_string();
    let network: Value = serde_json::from_str(&engine.docker(&["network", "inspect", "dns_dns"])?)?;
    let id = network[0]["Id"].as_str().unwrap_or_default().to_string();
    Ok((ip, id))
}

fn issue_17_example_runs(engine: &TestEngine, images: &Images) -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[("site", "berlin")])?;
    let mut device = fleet_e2e::Device::builder(&fleet, "gw-1")?
        .broker(&broker.url())
        .engine(engine.socket_path())
        .create()?;
    let watch = fleet_e2e::DeviceWatch::of(&broker.client(), &device)?;

    issue_17_app(&fleet, engine, &images.tag(1), "10m")?;
    // Both engines run at once on this host: a subnet each.
    let subnet = match engine {
        TestEngine::Dockerd(_) => "172.29.1",
        TestEngine::Podman(_) => "172.29.2",
    };
    fixed_address_app(&fleet, &images.tag(1), subnet, &format!("{subnet}.128/25"))?;
    more_keys_app(&fleet, &images.tag(1))?;
    let c1 = fleet.commit("issue 17")?;
    fleet.build()?;
    device.start()?;
    fleet.publish(&broker.url())?;
    wait_converged(&watch, &device, &c1)?;

    let web = engine.container("web-web")?;
    ensure!(web.running(), "web-web is not running: {}", web.0["State"]);
    let (config, host) = (&web.0["Config"], &web.0["HostConfig"]);
    let env = config["Env"].as_array().cloned().unwrap_or_default();
    ensure!(env.contains(&json!("GREETING=hello from .env")), "env_file: {env:?}");
    ensure!(host["RestartPolicy"]["Name"] == "unless-stopped", "restart: {}", host["RestartPolicy"]);
    ensure!(host["LogConfig"]["Type"] == "json-file", "logging: {}", host["LogConfig"]);
    ensure!(host["ReadonlyRootfs"] == true, "read_only");
    ensure!(config["WorkingDir"] == "/srv", "working_dir: {}", config["WorkingDir"]);
    ensure!(host["ShmSize"] == 64 << 20, "shm_size: {}", host["ShmSize"]);
    let security = host["SecurityOpt"].to_string();
    ensure!(security.contains("no-new-privileges"), "security_opt: {security}");
    ensure!(
        host["ExtraHosts"].to_string().contains("broker:10.0.0.5"),
        "extra_hosts: {}",
        host["ExtraHosts"]
    );
    ensure!(host["Ulimits"].to_string().contains("16384"), "ulimits: {}", host["Ulimits"]);
    // podman's compatible inspect shows neither sysctls nor log options: read them inside.
    let somaxconn = engine.docker(&["exec", "web-web", "cat", "/proc/sys/net/core/somaxconn"])?;
    ensure!(somaxconn.trim() == "1024", "sysctls: {somaxconn}");
    ensure!(engine.docker(&["exec", "web-web", "grep", "broker", "/etc/hosts"])?.contains("10.0.0.5"));
    // init: PID 1 is the engine's init (docker-init, or podman's catatonit).
    let pid1 = engine.docker(&["exec", "web-web", "cat", "/proc/1/cmdline"])?;
    ensure!(pid1.contains("init") || pid1.contains("catatonit"), "init: PID 1 is {pid1:?}");
    match engine {
        TestEngine::Dockerd(_) => {
            ensure!(host["Init"] == true, "init: {}", host["Init"]);
            ensure!(
                host["LogConfig"]["Config"] == json!({"max-size": "10m", "max-file": "3"}),
                "{}",
                host["LogConfig"]
            );
            ensure!(host["Sysctls"]["net.core.somaxconn"] == "1024", "sysctls: {}", host["Sysctls"]);
        }
        TestEngine::Podman(podman) => {
            let log = podman.podman(&["inspect", "--format", "{{json .HostConfig.LogConfig}}", "web-web"])?;
            let log: Value = serde_json::from_str(log.trim())?;
            ensure!(log["Size"] == "10MB", "logging max-size: {log}");
        }
    }

    more_keys_applied(engine)?;

    // networks.<name>.ipv4_address on a network with ipam (subnet, gateway, ip_range).
    let (ip, network_id) = fixed_address_state(engine)?;
    ensure!(ip == format!("{subnet}.53"), "ipv4_address: {ip}");
    let network: Value = serde_json::from_str(&engine.docker(&["network", "inspect", "dns_dns"])?)?;
    let pool = &network[0]["IPAM"]["Config"][0];
    ensure!(pool["Subnet"] == format!("{subnet}.0/24"), "ipam subnet: {pool}");
    ensure!(pool["Gateway"] == format!("{subnet}.1"), "ipam gateway: {pool}");
    // priority: the `dns` network (priority 5) is the one the container was created on
    // (podman's compatible inspect says `bridge` for any network); both are joined.
    let resolver = engine.container("dns-resolver")?;
    let networks = &resolver.0["NetworkSettings"]["Networks"];
    ensure!(networks.get("dns_default").is_some(), "not on dns_default: {networks}");
    if matches!(engine, TestEngine::Dockerd(_)) {
        let mode = &resolver.0["HostConfig"]["NetworkMode"];
        ensure!(mode == "dns_dns", "priority: created on {mode}");
    }

    // Changing one key (the log size) recreates the container.
    let before = web.id().to_string();
    issue_17_app(&fleet, engine, &images.tag(1), "20m")?;
    deploy(&mut fleet, &broker, &watch, &device, "bigger logs")?;
    let web = engine.container("web-web")?;
    ensure!(web.id() != before, "web-web was not recreated when its logging changed");
    ensure!(web.running(), "web-web is not running after the change");
    let (_, same_network) = fixed_address_state(engine)?;
    ensure!(same_network == network_id, "dns_dns was recreated although its spec did not change");

    // Changing the network's ipam recreates the network, and its container, which keeps
    // its fixed address.
    fixed_address_app(&fleet, &images.tag(1), subnet, &format!("{subnet}.64/26"))?;
    deploy(&mut fleet, &broker, &watch, &device, "narrower range")?;
    let (ip, new_network) = fixed_address_state(engine)?;
    ensure!(new_network != network_id, "dns_dns was not recreated when its ipam changed");
    ensure!(ip == format!("{subnet}.53"), "ipv4_address after the network was recreated: {ip}");
    Ok(())
}

#[test]
fn dockerd_runs_the_issue_17_example() -> Result<()> {
    let engine = TestEngine::Dockerd(Dockerd::start()?);
    let images = Images::push(&engine)?;
    issue_17_example_runs(&engine, &images)
}

#[test]
fn podman_runs_the_issue_17_example() -> Result<()> {
    let engine = TestEngine::Podman(Podman::start()?);
    let images = Images::push(&engine)?;
    issue_17_example_runs(&engine, &images)
}
