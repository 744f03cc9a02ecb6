//! The real-world test: Compose files of docker/awesome-compose, unchanged, each as an
//! app of a real Git repository (fixtures and their sources in
//! `tests/fixtures/awesome-compose/README.md`).

use fleet_spec::model::{DependencyCondition, MountSource, Protocol};

use crate::common::{build, bundler, fixtures, open_bundle, Keys, Repo};

/// Device variables for the files that use `${...}`.
const DEVICE: &str = "labels:
  site: lab
vars:
  TIMEZONE: Europe/Berlin
  PIHOLE_PW: secret
  PIHOLE_ROUTER_IP: 192.168.1.1
  PIHOLE_NETWORK_DOMAIN: lan
  PIHOLE_REVERSE_DNS: 192.168.1.0/24
  PIHOLE_HOST_IP: 192.168.1.2
  PIHOLE_HOST_IPV6: \"::1\"
  POSTGRES_USER: pg
  POSTGRES_PW: pw
  POSTGRES_DB: db
  PGADMIN_MAIL: a@b.c
  PGADMIN_PW: pw
  PLEX_MEDIA_PATH: /srv/media
# What the examples ask of the engine beyond the defaults, allowed by this device.
policy:
  allow_host_network: true
  bind_roots: [/etc/pihole, /etc/dnsmasq.d, /srv/media]
  capabilities: [NET_ADMIN]
";

const ACCEPTED: [&str; 7] = [
    "gitea-postgres",
    "pihole-cloudflared-DoH",
    "nextcloud-redis-mariadb",
    "wordpress-mysql",
    "postgresql-pgadmin",
    "elasticsearch-logstash-kibana",
    "plex",
];

fn app_name(example: &str) -> String {
    example.to_ascii_lowercase()
}

fn repo_with(examples: &[&str], dir: &str) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: lab\n");
    repo.write("devices/lab-1.yaml", DEVICE);
    for ex in examples {
        let app = app_name(ex);
        let compose = std::fs::read_to_string(fixtures().join(format!("awesome-compose/{dir}{ex}.yaml")))
            .expect("fixture");
        repo.write(&format!("apps/{app}/app.yaml"), "{}\n");
        repo.write(&format!("apps/{app}/compose.yaml"), &compose);
    }
    repo.commit_at("awesome", 1_800_000_000);
    repo
}

#[test]
fn image_only_examples_are_accepted_unchanged() {
    // Each alone (container names like `postgres` would collide between examples).
    for ex in ACCEPTED {
        let repo = repo_with(&[ex], "");
        let out = bundler(&["validate", "--repo", repo.path_str()]);
        assert_eq!(out.code, 0, "{ex} refused:\n{}", out.stderr);
    }
}

#[test]
fn accepted_examples_translate_as_compose_would_run_them() {
    let repo = repo_with(&["gitea-postgres", "pihole-cloudflared-DoH", "nextcloud-redis-mariadb"], "");
    let keys = Keys::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = build(repo.path(), "HEAD", &keys, out_dir.path());
    out.assert_code(0);
    assert!(!out.stderr.contains("is ignored"), "ipam and ipv4_address are applied now:\n{}", out.stderr);
    let state = open_bundle(out_dir.path(), "lab-1", &keys).state;

    // gitea: service names as aliases on the per-app default network, named volumes.
    let gitea = state.containers.iter().find(|c| c.name == "gitea-postgres-gitea").expect("gitea");
    assert_eq!(gitea.networks[0].network, "gitea-postgres_default");
    assert_eq!(gitea.mounts[0].source, MountSource::Volume("gitea-postgres_git_data".into()));
    assert_eq!(gitea.ports[0].host_port, Some(3000));
    let db = state.containers.iter().find(|c| c.name == "gitea-postgres-db").expect("db");
    assert_eq!(db.networks[0].aliases, vec!["db".to_string()]);
    assert_eq!(db.expose, vec!["5432/tcp".to_string()]);
    assert!(state.volumes.iter().any(|v| v.name == "gitea-postgres_db_data"));

    // pihole: container_name, ${VAR} from device vars, udp ports, depends_on, named network.
    let pihole = state.containers.iter().find(|c| c.name == "pihole").expect("pihole");
    assert_eq!(pihole.env.get("TZ").map(String::as_str), Some("Europe/Berlin"));
    assert_eq!(pihole.env.get("PIHOLE_DNS_").map(String::as_str), Some("172.20.0.2#5054;1.1.1.1"));
    assert!(pihole.ports.iter().any(|p| p.container_port == 67 && p.protocol == Protocol::Udp));
    assert_eq!(pihole.depends_on[0].container, "cloudflared");
    assert_eq!(pihole.depends_on[0].condition, DependencyCondition::Started);
    assert_eq!(pihole.networks[0].network, "pihole-cloudflared-doh_dns-net");
    // Its DNS chain names cloudflared by a fixed address on a subnet of its own.
    let cloudflared = state.containers.iter().find(|c| c.name == "cloudflared").expect("cloudflared");
    let fixed = &cloudflared.options.addresses["pihole-cloudflared-doh_dns-net"];
    assert_eq!(fixed.ipv4.as_deref(), Some("172.20.0.2"));
    let dns_net =
        state.networks.iter().find(|n| n.name == "pihole-cloudflared-doh_dns-net").expect("dns-net");
    assert_eq!(dns_net.options.ipam[0].subnet, "172.20.0.0/24");
    assert_eq!(pihole.cap_add, vec!["NET_ADMIN".to_string()]);
    assert!(pihole
        .mounts
        .iter()
        .any(|m| m.source == MountSource::Bind("/etc/pihole".into()) && m.target == "/etc/pihole/"));

    // nextcloud: command string split like a shell, two named networks.
    let mariadb = state.containers.iter().find(|c| c.name == "nextcloud-redis-mariadb-db").expect("mariadb");
    assert_eq!(
        mariadb.command.as_deref(),
        Some(&["--transaction-isolation=READ-COMMITTED".to_string(), "--binlog-format=ROW".to_string()][..])
    );
    let nc = state.containers.iter().find(|c| c.name == "nextcloud-redis-mariadb-nc").expect("nc");
    let nets: Vec<&str> = nc.networks.iter().map(|n| n.network.as_str()).collect();
    assert_eq!(nets, ["nextcloud-redis-mariadb_redisnet", "nextcloud-redis-mariadb_dbnet"]);
    assert!(
        !state.networks.iter().any(|n| n.name == "nextcloud-redis-mariadb_default"),
        "unused default network"
    );
}

#[test]
fn examples_that_build_images_or_need_a_home_are_refused() {
    let repo = repo_with(&["flask", "nginx-golang-postgres", "minecraft", "prometheus-grafana"], "refused/");
    let out = bundler(&["validate", "--repo", repo.path_str()]);
    out.assert_code(65);
    out.assert_stderr_has("apps/flask/compose.yaml:4:7: error: `build:` is not supported: devices pull images, build them in CI");
    out.assert_stderr_has("apps/nginx-golang-postgres/compose.yaml:4:7: error: `build:` is not supported");
    // Its `secrets:` are accepted; the fixture holds only the Compose file, not db/password.txt.
    out.assert_stderr_has(
        "apps/nginx-golang-postgres/compose.yaml:48:11: error: secret `db-password`: `file: db/password.txt` does not exist: expected apps/nginx-golang-postgres/db/password.txt in the commit",
    );
    out.assert_stderr_has(
        "apps/minecraft/compose.yaml:13:8: error: bind source `~/minecraft_data` is home-relative",
    );
    out.assert_stderr_has(
        "apps/prometheus-grafana/compose.yaml:12:9: error: /prometheus is already mounted at line 11",
    );
}
