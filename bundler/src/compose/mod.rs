//! The Compose keys fleet accepts, and their translation to container specs.
//!
//! Every service key of the Compose Specification is accepted (and applied by the agent
//! through `ContainerSpec`, most of the newer ones through `ContainerOptions`), or
//! refused by name with the reason (`build:` above all: devices pull images, CI builds
//! them); the table is in `bundler/README.md`. Extension fields (`x-*`) are skipped,
//! anything else is an unknown key.
//!
//! - `parse`: the file as YAML (serde-saphyr: anchors and merge keys), with places;
//! - `interpolate`: `${VAR}` forms; `dotenv`: `.env` and `env_file:` lines;
//! - `translate`: the specs, with every problem as a diagnostic at its line;
//! - `files`: `secrets:` and `configs:`, files delivered and mounted read-only.
//!
//! Translation rules (documented in `bundler/README.md`):
//! - container name `<app>-<service>` unless `container_name`;
//! - every service joins `<app>_default` (alias: the service name) unless it lists
//!   networks or sets `network_mode`; named networks are `<app>_<net>`, named volumes
//!   `<app>_<vol>` (unless they set `name:`);
//! - a relative bind source `./P` is the device path `<file_root>/<app>/P`, which is
//!   where the app's file with `source: P` is delivered (or that file's `target` when
//!   it sets one), so a container mounting a managed file restarts when it changes;
//! - `${VAR}` (`${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `$VAR`, `$$`)
//!   is interpolated from the device's variables, then the fleet's, then the `.env`
//!   beside the Compose file; a variable that is not set is an error naming it;
//! - a service with `profiles:` runs only where `COMPOSE_PROFILES` names one of them.
//!
//! This module is pure: no I/O. The caller reads `.env`, the `env_file:`s and the
//! `file:`s of secrets and configs (decrypting `.age`) from the commit, and pins image
//! tags to digests later.

mod dotenv;
mod files;
mod interpolate;
mod parse;
mod translate;

use std::collections::{BTreeMap, HashSet};

use fleet_spec::model::{ContainerSpec, ManagedFile, NetworkSpec, VolumeSpec};

use crate::diag::Diagnostic;
use crate::yaml::Pos;

pub use dotenv::{parse_env_file, EnvEntry};
pub use files::{file_source_paths, secret_targets, DEFAULT_MODE};
pub use interpolate::{interpolate, InterpError};
pub use parse::*;
pub use translate::{normalize_relative, parse_expose, parse_image, parse_port, valid_container_name};

/// Parses a Compose file (`file` names it in diagnostics). Extension fields (`x-*`)
/// are skipped at the top level, in services, networks, volumes, `deploy` and `logging`;
/// anchors, aliases and merge keys (`<<: *common`) are expanded by the YAML parser.
pub fn parse_file(file: &str, text: &str) -> Result<ComposeFile, Vec<Diagnostic>> {
    crate::yaml::parse_each_unknown_key::<Ext<ComposeFile>>(file, text, &parse::drop_refused).map(|f| f.0)
}

/// The containers, networks and volumes of one app on one device, and the files its
/// `secrets:` and `configs:` deliver.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    pub containers: Vec<ContainerSpec>,
    pub networks: Vec<NetworkSpec>,
    pub volumes: Vec<VolumeSpec>,
    /// One per secret or config some service is granted, by device path.
    pub files: Vec<DeliveredFile>,
}

/// A file a secret or config delivers.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveredFile {
    pub file: ManagedFile,
    /// Its source was encrypted in Git (`.age`): it travels sealed to the device.
    pub sealed: bool,
}

/// A `file:` of a secret or config, as the caller read it from the commit.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceFile {
    /// The bytes to deliver (decrypted when `sealed`; empty when there was no identity
    /// to decrypt with), or why there are none (said after the entry's name).
    pub content: Result<Vec<u8>, String>,
    /// The file is encrypted in Git (`.age`).
    pub sealed: bool,
}

/// Looks a variable up for `${VAR}` interpolation.
pub trait VarLookup {
    fn get(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> VarLookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// What the translation needs to know about the app besides its Compose file.
pub struct AppContext<'a> {
    pub app: &'a str,
    /// Repository path of the Compose file, for diagnostics.
    pub file: &'a str,
    /// `<file_root>/<app>`: where relative bind sources land on the device.
    pub app_root: &'a str,
    /// App files: normalized source path (relative to the app dir) → device target.
    pub file_targets: &'a BTreeMap<String, String>,
    /// The `env_file:` files the commit holds: repository path → content (see
    /// [`env_file_paths`]).
    pub env_files: &'a BTreeMap<String, Vec<u8>>,
    /// The `file:`s of `secrets:` and `configs:`: repository path → what was read (see
    /// [`file_source_paths`]).
    pub sources: &'a BTreeMap<String, SourceFile>,
}

/// The repository path of an `env_file:` entry: relative to the Compose file's
/// directory, and inside `apps/<app>/` (`None` when it leaves it).
pub fn env_file_path(compose_file: &str, app: &str, written: &str) -> Option<String> {
    let app_dir = format!("apps/{app}");
    let compose_rel = compose_file.strip_prefix(&format!("{app_dir}/")).unwrap_or(compose_file);
    let compose_dir = compose_rel.rsplit_once('/').map_or("", |(dir, _)| dir);
    if written.starts_with('/') {
        return None;
    }
    let rel = normalize_relative(&format!("{compose_dir}/{written}")).filter(|r| !r.is_empty())?;
    Some(format!("{app_dir}/{rel}"))
}

/// The repository paths of every `env_file:` and `label_file:` of `file`, for the caller
/// to read.
pub fn env_file_paths(file: &ComposeFile, compose_file: &str, app: &str) -> Vec<String> {
    let mut out: Vec<String> = file
        .services
        .0
        .iter()
        .flat_map(|(_, svc)| {
            let env = svc.value.env_files().into_iter().map(|(written, ..)| written);
            env.chain(svc.value.label_files().into_iter().map(|(written, _)| written)).collect::<Vec<_>>()
        })
        .filter_map(|written| env_file_path(compose_file, app, &written))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Translates a Compose file. With `lenient`, unset variables interpolate to "" and
/// problems in the values that used them are not reported: that is how a file is
/// checked once for every device. Returns the translation and its diagnostics.
pub fn translate(
    file: &ComposeFile,
    ctx: &AppContext<'_>,
    vars: &dyn VarLookup,
    lenient: bool,
) -> (Translated, Vec<Diagnostic>) {
    let mut t = Translator {
        ctx,
        vars,
        lenient,
        diags: Vec::new(),
        tainted: HashSet::new(),
        pools: BTreeMap::new(),
        file_defs: files::Defs::default(),
        delivered: BTreeMap::new(),
    };
    let out = t.run(file);
    (out, t.diags)
}

pub(super) struct Translator<'a, 'b> {
    ctx: &'a AppContext<'b>,
    vars: &'a dyn VarLookup,
    lenient: bool,
    diags: Vec<Diagnostic>,
    /// Places whose values used a variable that is not set: no further errors there.
    tainted: HashSet<Pos>,
    /// The IPAM pools of each network (by engine name), for static addresses.
    pools: BTreeMap<String, Vec<fleet_spec::model::IpamPool>>,
    /// The top-level `secrets:` and `configs:`, checked.
    file_defs: files::Defs,
    /// The files granted so far, by device path: with the first grant's place and service.
    delivered: BTreeMap<String, (DeliveredFile, Pos, String)>,
}

#[cfg(test)]
mod tests {
    use fleet_spec::model::{LogConfig, Protocol, PullPolicy, RestartPolicy, Ulimit};

    use super::*;

    /// Parses and translates `yaml` as app `shop` for a device with the variables of
    /// [`vars`]; returns the containers and every diagnostic as `line:column: message`.
    fn check(yaml: &str) -> (Vec<ContainerSpec>, Vec<String>) {
        let (t, diags) = check_full(yaml);
        (t.containers, diags)
    }

    fn check_full(yaml: &str) -> (Translated, Vec<String>) {
        let file = match parse_file("compose.yaml", yaml) {
            Ok(f) => f,
            Err(found) => {
                let empty = Translated::default();
                return (
                    empty,
                    found.iter().map(|d| format!("{}:{}: {}", d.line, d.column, d.message)).collect(),
                );
            }
        };
        let targets = BTreeMap::new();
        let env_files = BTreeMap::from([
            (
                "apps/shop/conf/web.env".to_string(),
                b"# defaults\nA=from-file\nB=${TZ}\nC='${LITERAL}'\n".to_vec(),
            ),
            ("apps/shop/conf/web.labels".to_string(), b"com.example.tier=edge\nteam=ops\n".to_vec()),
        ]);
        let ctx = AppContext {
            app: "shop",
            file: "apps/shop/compose.yaml",
            app_root: "/srv/fleet/shop",
            file_targets: &targets,
            env_files: &env_files,
            sources: &BTreeMap::new(),
        };
        let (t, diags) = translate(&file, &ctx, &vars, false);
        (t, diags.iter().map(|d| format!("{}:{}: {}", d.line, d.column, d.message)).collect())
    }

    fn ok(yaml: &str) -> ContainerSpec {
        let (containers, diags) = check(yaml);
        assert!(diags.is_empty(), "{diags:#?}");
        let web = containers.iter().position(|c| c.name == "shop-web").unwrap_or(0);
        containers.into_iter().nth(web).expect("a container")
    }

    fn has(diags: &[String], part: &str) {
        assert!(diags.iter().any(|d| d.contains(part)), "no diagnostic with {part:?} in {diags:#?}");
    }

    #[test]
    fn extension_fields_are_ignored_at_every_level() {
        let c = ok("x-top: {a: 1}
services:
  web:
    x-note: anything
    image: nginx
    deploy: {x-d: 1, resources: {limits: {memory: 64m}}}
    logging: {x-l: 1, driver: json-file, options: {max-size: 1m}}
networks:
  front: {x-n: 1}
volumes:
  data: {x-v: 1}
");
        assert_eq!(c.memory_bytes, Some(64 << 20));
        assert_eq!(c.options.logging.map(|l| l.driver).as_deref(), Some("json-file"));
    }

    #[test]
    fn unknown_keys_are_still_refused_beside_extension_fields() {
        let (_, diags) = check("x-a: 1\nservices:\n  web:\n    x-b: 2\n    image: nginx\n    imagee: x\n");
        has(&diags, "unknown key `imagee`: did you mean `image`?");
        assert!(diags[0].starts_with("6:"), "the error names its line: {diags:?}");
    }

    #[test]
    fn every_unknown_key_of_a_compose_file_is_reported() {
        let (_, diags) = check(
            "services:\n  web:\n    imagee: nginx\n    port:\n    - 80:80\n    restrat: always\n  db:\n    image: pg\n    enviroment: {A: b}\nvolume: {}\n",
        );
        let places: Vec<&str> = diags.iter().map(|d| d.split(": ").next().expect("place")).collect();
        assert_eq!(places, ["3:5", "4:5", "6:5", "9:5", "10:1"], "{diags:?}");
        has(&diags, "unknown key `restrat`: did you mean `restart`?");
        has(&diags, "unknown key `enviroment`: did you mean `environment`?");
        // `imagee` was blanked out: that `web` has no image is for the next run to say.
        assert!(
            !diags.iter().any(|d| d.contains("image` is required") || d.contains("missing")),
            "{diags:?}"
        );
    }

    #[test]
    fn an_unknown_key_does_not_offer_refused_keys_as_allowed() {
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    biuld: .\n");
        let message = diags.iter().find(|d| d.contains("biuld")).expect("refused");
        let allowed = message.split("(allowed keys: ").nth(1).expect("the allowed keys");
        for refused in ["build", "links", "extends", "volumes_from", "scale"] {
            assert!(
                !allowed.split(", ").any(|k| k.trim_end_matches(')') == refused),
                "{refused} offered: {message}"
            );
        }
        assert!(allowed.contains("image, container_name"), "{message}");
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    deploy:\n      placment: {}\n");
        let message = diags.iter().find(|d| d.contains("placment")).expect("refused");
        assert!(!message.contains("placement") && message.contains("resources, replicas"), "{message}");
    }

    #[test]
    fn every_service_key_the_parser_knows_is_in_the_readme_table() {
        // An unknown key's message lists the accepted keys; the refused ones are listed
        // in parse.rs.
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    not_a_compose_key: 1\n");
        let message = diags.iter().find(|d| d.contains("not_a_compose_key")).expect("refused");
        let list = message.split("(allowed keys: ").nth(1).unwrap_or_default().trim_end_matches(')');
        let mut known: Vec<&str> = list.split(", ").map(|k| k.trim_matches('`').trim()).collect();
        known.extend(parse::REFUSED[0].1);
        assert!(known.len() > 60, "the known keys were not read from {message:?}");
        let readme = include_str!("../../README.md");
        let table: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
        let missing: Vec<&&str> = known
            .iter()
            .filter(|k| {
                !table.iter().any(|row| row.split('|').nth(1).is_some_and(|c| c.contains(&format!("`{k}`"))))
            })
            .collect();
        assert!(missing.is_empty(), "service keys missing from bundler/README.md's table: {missing:?}");
    }

    #[test]
    fn anchors_and_merge_keys_are_expanded_and_the_service_wins() {
        let c = ok("x-common: &common
  restart: always
  environment: {A: \"1\"}
services:
  web:
    <<: *common
    image: nginx
    restart: unless-stopped
");
        assert_eq!(c.restart, RestartPolicy::UnlessStopped);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn issue_17_example_translates_every_key() {
        let yaml =
            include_str!("../../tests/fixtures/compose/issue-17.yaml").replace("    env_file: .env\n", "");
        let c = ok(&yaml);
        let o = &c.options;
        assert_eq!(c.restart, RestartPolicy::UnlessStopped);
        assert_eq!(
            o.logging,
            Some(LogConfig {
                driver: "json-file".into(),
                options: BTreeMap::from([("max-file".into(), "3".into()), ("max-size".into(), "10m".into())]),
            })
        );
        assert_eq!(o.sysctls, BTreeMap::from([("net.core.somaxconn".into(), "1024".into())]));
        assert_eq!(o.ulimits, BTreeMap::from([("nofile".into(), Ulimit { soft: 65536, hard: 65536 })]));
        assert_eq!(o.extra_hosts, ["broker:10.0.0.5"]);
        assert_eq!((o.init, o.read_only), (Some(true), true));
        assert_eq!(o.security_opt, ["no-new-privileges:true"]);
        assert_eq!(o.working_dir.as_deref(), Some("/srv"));
        assert_eq!(o.shm_size_bytes, Some(64 << 20));
    }

    #[test]
    fn the_other_keys_translate() {
        let c = ok("services:
  db: {image: postgres}
  web:
    image: nginx
    tty: true
    stdin_open: true
    stop_grace_period: 1m30.5s
    dns: 10.0.0.53
    dns_search: [lan, fleet.lan]
    dns_opt: [ndots:1]
    group_add: [20, video]
    oom_score_adj: -500
    pids_limit: 100
    cpuset: 0-1
    ipc: service:db
    pid: host
    ulimits: {nproc: {soft: 100, hard: 200}}
    extra_hosts: {gw: host-gateway, v6: \"::1\"}
");
        let o = &c.options;
        assert!(o.tty && o.stdin_open);
        assert_eq!(o.stop_timeout_s, Some(91), "rounded up to whole seconds");
        assert_eq!(o.dns, ["10.0.0.53"]);
        assert_eq!(o.dns_search, ["lan", "fleet.lan"]);
        assert_eq!(o.dns_opt, ["ndots:1"]);
        assert_eq!(o.group_add, ["20", "video"]);
        assert_eq!((o.oom_score_adj, o.pids_limit), (Some(-500), Some(100)));
        assert_eq!(o.cpuset.as_deref(), Some("0-1"));
        assert_eq!(o.ipc.as_deref(), Some("container:shop-db"));
        assert_eq!(o.pid.as_deref(), Some("host"));
        assert_eq!(o.ulimits["nproc"], Ulimit { soft: 100, hard: 200 });
        assert_eq!(o.extra_hosts, ["gw:host-gateway", "v6:::1"]);
    }

    #[test]
    fn deploy_replicas_one_is_accepted_and_swarm_keys_are_refused_with_the_reason() {
        ok("services:\n  web:\n    image: nginx\n    deploy: {replicas: 1}\n");
        let (_, diags) = check(
            "services:\n  web:\n    image: nginx\n    deploy:\n      replicas: 3\n      placement: {constraints: []}\n      restart_policy: {condition: any}\n",
        );
        has(&diags, "5:17: `deploy.replicas: 3` is not supported: a device runs one container per service");
        has(&diags, "6:18: `deploy.placement:` is not supported: Swarm schedules services");
        has(
            &diags,
            "7:23: `deploy.restart_policy:` is not supported: Swarm's restart policy: use `restart:`",
        );
    }

    #[test]
    fn resource_and_cgroup_keys_translate() {
        let c = ok("services:
  web:
    image: nginx
    mem_limit: 64m
    mac_address: 02:42:ac:11:00:09
    mem_reservation: 32m
    memswap_limit: 128m
    cpu_shares: 512
    cpu_period: 100ms
    cpu_quota: 50000
    cgroup_parent: /fleet
");
        let o = &c.options;
        assert_eq!(o.mac_address.as_deref(), Some("02:42:ac:11:00:09"));
        assert_eq!((o.mem_reservation_bytes, o.memswap_limit_bytes), (Some(32 << 20), Some(128 << 20)));
        assert_eq!((o.cpu_shares, o.cpu_period_us, o.cpu_quota_us), (Some(512), Some(100_000), Some(50_000)));
        assert_eq!(o.cgroup_parent.as_deref(), Some("/fleet"));
        let (_, diags) = check(
            "services:
  web:
    image: nginx
    mac_address: 02:42
    memswap_limit: 1g
    cpu_shares: 1
    cpu_quota: 10
",
        );
        has(&diags, "4:18: mac_address `02:42` is not six hex bytes");
        has(&diags, "5:20: memswap_limit needs a memory limit");
        has(&diags, "6:17: cpu_shares `1` is not a weight of at least 2");
        has(&diags, "7:16: cpu_quota `10` is not a time of at least 1000 microseconds");
    }

    #[test]
    fn logging_without_max_size_warns_and_bad_options_are_errors_at_their_line() {
        let (_, diags) =
            check("services:\n  web:\n    image: nginx\n    logging:\n      driver: json-file\n");
        has(&diags, "5:7: the json-file log of this service grows without bound");
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    logging: {driver: local}\n");
        has(&diags, "4:23: logging driver `local` exists on dockerd only");
        let (_, diags) = check(
            "services:\n  web:\n    image: nginx\n    logging:\n      driver: local\n      options: {max-size: ten, max-file: 0}\n",
        );
        has(&diags, "6:16: logging option `max-file`");
        has(&diags, "6:16: logging option `max-size`: invalid size \"ten\"");
    }

    #[test]
    fn invalid_values_are_errors_naming_the_key() {
        let (_, diags) = check(
            "services:
  web:
    image: nginx
    working_dir: srv
    shm_size: lots
    ulimits: {nofile: {soft: 20, hard: 10}, core: many}
    extra_hosts: [broker]
    stop_grace_period: soon
    dns: [resolver]
    oom_score_adj: 2000
    pids_limit: 0
    cpuset: all
    ipc: service:nope
    pid: shareable
",
        );
        for part in [
            "4:18: working_dir `srv` must be an absolute path",
            "5:15: shm_size: invalid size",
            "6:23: ulimit `nofile`: soft limit 20 is above the hard limit 10",
            "6:51: ulimit `core` must be a number",
            "7:19: extra_hosts entry `broker`",
            "8:24: stop_grace_period: invalid duration",
            "9:10: dns server `resolver` is not an IP address",
            "10:20: oom_score_adj 2000 is out of range",
            "11:17: pids_limit 0 is not valid",
            "12:13: cpuset `all` is not a CPU list",
            "13:10: ipc `service:nope` names no service of this app",
            "14:10: pid `shareable` is not valid",
        ] {
            has(&diags, part);
        }
    }

    #[test]
    fn env_file_is_read_relative_to_the_compose_file_and_environment_wins() {
        let c = ok(
            "services:\n  web:\n    image: nginx\n    env_file: [conf/web.env]\n    environment: {A: mine}\n",
        );
        assert_eq!(c.env.get("A").map(String::as_str), Some("mine"));
        assert_eq!(
            c.env.get("B").map(String::as_str),
            Some("Europe/Berlin"),
            "interpolated from device vars"
        );
        assert_eq!(c.env.get("C").map(String::as_str), Some("${LITERAL}"), "single quotes are literal");
        let c =
            ok("services:\n  web:\n    image: nginx\n    env_file: [{path: missing.env, required: false}]\n");
        assert!(c.env.is_empty());
    }

    #[test]
    fn env_file_errors_name_the_file() {
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    env_file: .env\n");
        has(&diags, "4:15: env_file `.env` is not in the commit (looked for apps/shop/.env)");
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    env_file: ../other/.env\n");
        has(&diags, "4:15: env_file `../other/.env` is outside the app directory");
    }

    #[test]
    fn profiles_select_services_by_the_compose_profiles_variable() {
        let yaml = "services:
  web: {image: nginx, depends_on: [debug]}
  debug: {image: busybox, profiles: [debug]}
  metrics: {image: telegraf, profiles: [metrics, full]}
";
        let names = |profiles: Option<&str>| {
            let lookup =
                |name: &str| (name == "COMPOSE_PROFILES").then(|| profiles.map(str::to_string)).flatten();
            let file = parse_file("compose.yaml", yaml).expect("parses");
            let (targets, env_files) = (BTreeMap::new(), BTreeMap::new());
            let ctx = AppContext {
                app: "shop",
                file: "apps/shop/compose.yaml",
                app_root: "/srv/fleet/shop",
                file_targets: &targets,
                env_files: &env_files,
                sources: &BTreeMap::new(),
            };
            let (t, diags) = translate(&file, &ctx, &lookup, false);
            let names: Vec<String> = t.containers.into_iter().map(|c| c.service).collect();
            (
                names,
                diags
                    .into_iter()
                    .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                    .collect::<Vec<_>>(),
            )
        };
        let (all, diags) = names(Some("debug, full"));
        assert_eq!(all, ["web", "debug", "metrics"], "{diags:?}");
        assert_eq!(names(Some("*")).0, ["web", "debug", "metrics"]);
        let (some, diags) = names(None);
        assert_eq!(some, ["web"]);
        has(&diags, "2:36: `web` depends on `debug`, whose profiles (debug) are not enabled on this device");
    }

    #[test]
    fn sysctls_must_be_namespaced_and_ulimits_known() {
        let (_, diags) = check(
            "services:
  web:
    image: nginx
    ulimits: {files: 1, nofile: 10}
    sysctls: [vm.swappiness=10, net.core.somaxconn=1024, kernel.shmmax=1, kernel.sem=1, fs.mqueue.msg_max=10]
",
        );
        has(&diags, "4:15: ulimit `files` is not one the engine knows");
        has(&diags, "5:14: sysctl `vm.swappiness` is not namespaced");
        assert_eq!(diags.len(), 2, "{diags:#?}");
        let (_, diags) =
            check("services:\n  web:\n    image: nginx\n    network_mode: host\n    sysctls: {net.core.somaxconn: 1}\n");
        has(&diags, "5:14: sysctl `net.core.somaxconn` would change the host's network");
    }

    #[test]
    fn pull_policy_and_platform_are_translated_and_bad_values_named() {
        let c =
            ok("services:\n  web:\n    image: nginx\n    pull_policy: never\n    platform: linux/arm/v7\n");
        assert_eq!(c.options.pull_policy, Some(PullPolicy::Never));
        assert_eq!(c.options.platform.as_deref(), Some("linux/arm/v7"));
        for (text, want) in [
            ("always", PullPolicy::Always),
            ("missing", PullPolicy::Missing),
            ("if_not_present", PullPolicy::Missing),
        ] {
            let c = ok(&format!("services:\n  web:\n    image: nginx\n    pull_policy: {text}\n"));
            assert_eq!(c.options.pull_policy, Some(want), "{text}");
        }
        let (_, diags) =
            check("services:\n  web:\n    image: nginx\n    pull_policy: build\n    platform: arm64\n");
        has(&diags, "4:18: pull_policy `build` is not supported: devices pull images");
        has(&diags, "5:15: platform `arm64` must be `os/arch[/variant]`");
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    pull_policy: daily\n");
        has(&diags, "pull_policy `daily` is not supported: use `missing`");
    }

    #[test]
    fn ipam_static_addresses_and_priority_are_translated() {
        // The shape of awesome-compose's pihole-cloudflared-DoH: a fixed DNS chain.
        let (t, diags) = check_full(
            "services:
  web:
    image: pihole
    networks:
      front: {priority: 1}
      dns: {ipv4_address: 172.28.0.10, priority: 10}
  cloudflared:
    image: cloudflared
    networks:
      dns:
        ipv4_address: 172.28.0.11
networks:
  front: {}
  dns:
    enable_ipv6: true
    driver_opts: {com.docker.network.driver.mtu: 1400}
    ipam:
      config:
        - subnet: 172.28.0.0/24
          ip_range: 172.28.0.128/25
          gateway: 172.28.0.1
          aux_addresses: {router: 172.28.0.2}
",
        );
        assert!(diags.is_empty(), "{diags:#?}");
        let dns = t.networks.iter().find(|n| n.name == "shop_dns").expect("dns network");
        assert!(dns.options.enable_ipv6);
        assert_eq!(dns.options.driver_opts["com.docker.network.driver.mtu"], "1400");
        let pool = &dns.options.ipam[0];
        assert_eq!(
            (pool.subnet.as_str(), pool.ip_range.as_deref(), pool.gateway.as_deref()),
            ("172.28.0.0/24", Some("172.28.0.128/25"), Some("172.28.0.1"))
        );
        assert_eq!(pool.aux_addresses["router"], "172.28.0.2");
        let web = t.containers.iter().find(|c| c.name == "shop-web").expect("web");
        let order: Vec<&str> = web.networks.iter().map(|n| n.network.as_str()).collect();
        assert_eq!(order, ["shop_dns", "shop_front"], "the highest priority first");
        assert_eq!(web.options.addresses["shop_dns"].ipv4.as_deref(), Some("172.28.0.10"));
        assert!(!web.options.addresses.contains_key("shop_front"));
    }

    #[test]
    fn static_addresses_outside_a_declared_subnet_are_errors_naming_the_network() {
        let (_, diags) = check(
            "services:
  web:
    image: nginx
    networks:
      back: {ipv4_address: 10.1.0.5}
      dns: {ipv4_address: 10.9.9.9, ipv6_address: 10.0.0.1}
networks:
  back: {}
  dns:
    ipam:
      driver: dhcp
      config: [{subnet: 172.28.0.0/24, gateway: 10.0.0.1}, {subnet: nonsense}]
",
        );
        has(
            &diags,
            "5:28: ipv4_address `10.1.0.5` is not inside a subnet of network `back`: declare one with `ipam:",
        );
        has(&diags, "6:27: ipv4_address `10.9.9.9` is not inside a subnet of network `dns`");
        has(&diags, "6:51: ipv6_address `10.0.0.1` is not an IPv6 address");
        has(&diags, "11:15: IPAM driver `dhcp` is not supported");
        has(&diags, "gateway `10.0.0.1` is not an address inside the subnet `172.28.0.0/24`");
        has(&diags, "subnet `nonsense` is not an address range");
    }

    #[test]
    fn blkio_config_and_storage_opt_are_translated_and_bad_values_named() {
        let c = ok("services:
  web:
    image: nginx
    storage_opt: {size: 1G}
    blkio_config:
      weight: 300
      weight_device: [{path: /dev/sda, weight: 400}]
      device_read_bps: [{path: /dev/sda, rate: 12mb}]
      device_write_iops: [{path: /dev/sdb, rate: 120}]
");
        let b = &c.options.blkio;
        assert_eq!(b.weight, Some(300));
        assert_eq!(b.weight_device, [("/dev/sda".to_string(), 400)]);
        assert_eq!(b.device_read_bps, [("/dev/sda".to_string(), 12 << 20)]);
        assert_eq!(b.device_write_iops, [("/dev/sdb".to_string(), 120)]);
        assert_eq!(c.options.storage_opt["size"], "1G");
        let (_, diags) = check(
            "services:
  web:
    image: nginx
    blkio_config:
      weight: 5
      device_read_bps: [{path: sda, rate: fast}]
      device_write_iops: [{path: /dev/sdb}]
",
        );
        has(&diags, "5:15: blkio weight `5` must be a whole number from 10 to 1000");
        has(&diags, "6:32: blkio device `sda` must be a device path under /dev");
        has(&diags, "6:43: rate `fast` is not a number of bytes per second");
        has(&diags, "throttle entries need `path` and `rate`");
    }

    #[test]
    fn namespaces_device_cgroup_rules_and_the_smaller_keys_are_translated() {
        let c = ok("services:
  web:
    image: nginx
    uts: host
    userns_mode: host
    cgroup: private
    device_cgroup_rules: ['c  189:*  rmw']
    mem_swappiness: 10
    oom_kill_disable: true
    cpu_rt_period: 1s
    cpu_rt_runtime: 950ms
    runtime: crun
");
        let o = &c.options;
        assert_eq!((o.uts.as_deref(), o.userns_mode.as_deref()), (Some("host"), Some("host")));
        assert_eq!(o.cgroupns.as_deref(), Some("private"));
        assert_eq!(o.device_cgroup_rules, ["c 189:* rmw"]);
        assert_eq!((o.mem_swappiness, o.oom_kill_disable), (Some(10), true));
        assert_eq!((o.cpu_rt_period_us, o.cpu_rt_runtime_us), (Some(1_000_000), Some(950_000)));
        assert_eq!(o.runtime.as_deref(), Some("crun"));
        let (_, diags) = check(
            "services:
  web:
    image: nginx
    cgroup: shared
    device_cgroup_rules: ['c 189 rmw']
    mem_swappiness: 101
    cpu_count: 2
",
        );
        has(&diags, "4:13: cgroup `shared` must be `host` or `private`");
        has(&diags, "5:27: device_cgroup_rules entry `c 189 rmw` is not a rule");
        has(&diags, "6:21: mem_swappiness `101` must be a whole number from 0 to 100");
        has(&diags, "`cpu_count:` is not supported: it is for Windows containers");
    }

    #[test]
    fn label_file_labels_are_read_from_the_commit_and_labels_win() {
        let c = ok("services:\n  web:\n    image: nginx\n    label_file: conf/web.labels\n    labels: {team: platform}\n");
        assert_eq!(c.labels["com.example.tier"], "edge");
        assert_eq!(c.labels["team"], "platform", "labels: wins over the file");
        let (_, diags) =
            check("services:\n  web:\n    image: nginx\n    label_file: [conf/missing.labels]\n");
        has(&diags, "4:18: label_file `conf/missing.labels` is not in the commit");
    }

    #[test]
    fn gpus_and_domainname_are_translated() {
        let c = ok("services:\n  web:\n    image: nginx\n    domainname: fleet.lan\n    gpus: all\n");
        assert_eq!(c.options.domainname.as_deref(), Some("fleet.lan"));
        assert_eq!(c.options.gpus[0].count, Some(-1));
        assert_eq!(c.options.gpus[0].capabilities, ["gpu"]);
        let c = ok("services:
  web:
    image: nginx
    gpus:
      - {driver: nvidia, device_ids: ['0', '3'], capabilities: [compute, utility]}
      - {count: 1}
");
        let g = &c.options.gpus;
        assert_eq!((g[0].driver.as_deref(), g[0].count), (Some("nvidia"), None));
        assert_eq!(
            (g[0].device_ids.clone(), g[0].capabilities.clone()),
            (vec!["0".to_string(), "3".into()], vec!["compute".to_string(), "utility".into()])
        );
        assert_eq!((g[1].count, g[1].capabilities.clone()), (Some(1), vec!["gpu".to_string()]));
        let (_, diags) = check(
            "services:\n  web:\n    image: nginx\n    gpus: [{count: 0}, {count: 1, device_ids: ['0']}]\n",
        );
        has(&diags, "gpu count `0` must be `all` or a positive number");
        has(&diags, "a GPU request takes `count` or `device_ids`, not both");
    }

    #[test]
    fn post_start_and_pre_stop_hooks_are_translated() {
        let c = ok("services:
  web:
    image: nginx
    post_start:
      - command: ./warm-up.sh --fast
        user: root
        working_dir: /srv
        environment: {MODE: fast}
    pre_stop:
      - command: [nginx, -s, quit]
        privileged: true
");
        let (post, pre) = (&c.options.post_start[0], &c.options.pre_stop[0]);
        assert_eq!(post.command, ["./warm-up.sh", "--fast"]);
        assert_eq!((post.user.as_deref(), post.working_dir.as_deref()), (Some("root"), Some("/srv")));
        assert_eq!(post.env["MODE"], "fast");
        assert_eq!(
            (pre.command.clone(), pre.privileged),
            (vec!["nginx".to_string(), "-s".into(), "quit".into()], true)
        );
        let (_, diags) =
            check("services:\n  web:\n    image: nginx\n    post_start: [{command: '', working_dir: srv}]\n");
        has(&diags, "a hook's `command` is empty");
        has(&diags, "hook working_dir `srv` must be an absolute path");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let (_, diags) = check("services:\n  web:\n    image: nginx\n    image: other\n");
        assert!(!diags.is_empty(), "a duplicate key in a service passed");
        let (_, diags) =
            check("services:\n  web:\n    image: nginx\n    ulimits: {nofile: 1}\n    ulimits: {nproc: 1}\n");
        has(&diags, "5:5: duplicate mapping key: ulimits");
        let (_, diags) = check("services:\n  web:\n    image: nginx\nservices:\n  db:\n    image: pg\n");
        assert!(!diags.is_empty(), "a duplicate top-level key passed");
    }

    #[test]
    fn an_unset_variable_is_named_once_and_not_followed_by_an_empty_one() {
        let (_, diags) = check(
            "services:\n  web:\n    image: nginx\n    environment:\n      - ${PG_USER}\n      - B=${PG_PW}\n",
        );
        has(&diags, "5:9: variable `PG_USER` is not set");
        has(&diags, "6:9: variable `PG_PW` is not set");
        assert_eq!(diags.len(), 2, "{diags:#?}");
    }

    fn vars(name: &str) -> Option<String> {
        // `TZ` and `EMPTY` only.
        match name {
            "TZ" => Some("Europe/Berlin".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_forms() {
        let v: &dyn VarLookup = &vars;
        assert_eq!(interpolate("TZ=${TZ}", v), Ok("TZ=Europe/Berlin".into()));
        assert_eq!(interpolate("$TZ/x", v), Ok("Europe/Berlin/x".into()));
        assert_eq!(interpolate("$${TZ}", v), Ok("${TZ}".into()));
        assert_eq!(interpolate("${NOPE:-d}", v), Ok("d".into()));
        assert_eq!(interpolate("${EMPTY:-d}", v), Ok("d".into()));
        assert_eq!(interpolate("${EMPTY-d}", v), Ok("".into()));
        assert_eq!(interpolate("${TZ:+set}", v), Ok("set".into()));
        assert_eq!(interpolate("cost $ 5", v), Ok("cost $ 5".into()));
        assert_eq!(interpolate("${NOPE}", v), Err(InterpError::Unset { name: "NOPE".into(), message: None }));
        assert_eq!(
            interpolate("${NOPE:?set NOPE}", v),
            Err(InterpError::Unset { name: "NOPE".into(), message: Some("set NOPE".into()) })
        );
        assert!(matches!(interpolate("${TZ", v), Err(InterpError::Syntax(_))));
    }

    #[test]
    fn short_port_syntax() {
        let p = parse_port("8080:80").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port, p[0].protocol), (Some(8080), 80, Protocol::Tcp));
        let p = parse_port("127.0.0.1:5000:5000/udp").expect("valid");
        assert_eq!((p[0].host_ip.as_deref(), p[0].protocol), (Some("127.0.0.1"), Protocol::Udp));
        let p = parse_port("[::1]:53:53").expect("valid");
        assert_eq!(p[0].host_ip.as_deref(), Some("::1"));
        let p = parse_port("3000").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port), (None, 3000));
        let p = parse_port("127.0.0.1::80").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port), (None, 80));
        let p = parse_port("8000-8002:9000-9002").expect("valid");
        assert_eq!(
            p.iter().map(|m| (m.host_port, m.container_port)).collect::<Vec<_>>(),
            vec![(Some(8000), 9000), (Some(8001), 9001), (Some(8002), 9002)]
        );
        for bad in ["x", "80:80/sctp", "70000", "8000-8001:80", "::1:80:80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(normalize_relative("./conf/../files/a.conf").as_deref(), Some("files/a.conf"));
        assert_eq!(normalize_relative(".").as_deref(), Some(""));
        assert_eq!(normalize_relative("../other"), None);
    }
}
