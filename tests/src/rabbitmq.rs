//! A private RabbitMQ 3.10 cluster with its MQTT plugin: N nodes on one machine, each
//! with its own node name, AMQP, Erlang distribution and MQTT ports, data and log
//! directories, all in one temp dir.
//!
//! The nodes form the cluster as they boot: the first boots alone, then the others all at
//! once, each joining it (`cluster_formation.peer_discovery_backend = classic_config`),
//! so no `stop_app` / `join_cluster` round trip is needed; [`RabbitCluster::start`] returns once
//! `rabbitmqctl cluster_status` shows all of them running and every node accepts an MQTT
//! client.
//!
//! Isolation from a system RabbitMQ: the harness runs `/usr/lib/rabbitmq/bin/rabbitmq-server`
//! as root (not Debian's wrapper, which switches to user `rabbitmq`) with `HOME` in the
//! temp dir (its own Erlang cookie) and its own `epmd` on a free port (`ERL_EPMD_PORT`),
//! started by the harness in the foreground. Teardown (also on a panic: `Drop`) sends
//! SIGTERM to every node (RabbitMQ shuts down cleanly on it; SIGKILL after 3 s, the data
//! is thrown away anyway), then stops epmd, then SIGKILLs whatever still mentions the
//! temp dir (`erl_child_setup`, `inet_gethost`).

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::mqtt::Mqtt;
use crate::process::{kill_leftovers, process_tree, remove_tempdir, Daemon};
use crate::{free_port, log_tail, require_program, wait_until};

/// Where Debian's package keeps the real scripts (`/usr/sbin/rabbitmq-server` is a
/// wrapper that switches to user `rabbitmq`).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to boot (5–15 s alone here; more with three at once and a
/// compiler beside them).
const BOOT: Duration = Duration::from_secs(120);

struct Node {
    name: String,
    mqtt_port: u16,
    daemon: Option<Daemon>,
}

/// A running RabbitMQ cluster. See the module docs.
pub struct RabbitCluster {
    nodes: Vec<Node>,
    epmd: Option<Daemon>,
    epmd_port: u16,
    dir: Option<TempDir>,
    root: PathBuf,
}

impl RabbitCluster {
    /// Starts `n` nodes (anonymous MQTT allowed, as user `guest`) clustered together.
    pub fn start(n: usize) -> Result<RabbitCluster> {
        let server = require_program(&format!("{RABBITMQ_BIN}/rabbitmq-server"))
            .context("RabbitMQ (apt package rabbitmq-server)")?;
        let epmd_program = require_program("epmd")?;
        let dir = crate::short_tempdir("rmq")?;
        let root = dir.path().to_path_buf();
        let home = root.join("home");
        fs::create_dir_all(&home)?;
        // The nodes and rabbitmqctl authenticate to each other with this cookie.
        let cookie = home.join(".erlang.cookie");
        fs::write(
            &cookie,
            format!("fleete2e{}", crate::fleet::sha256_hex(root.to_string_lossy().as_bytes())),
        )?;
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))?;

        let epmd_port = free_port();
        let mut epmd_cmd = Command::new(&epmd_program);
        epmd_cmd.arg("-port").arg(epmd_port.to_string()).arg("-address").arg("127.0.0.1");
        let mut epmd = Daemon::spawn("epmd", epmd_cmd, &root.join("epmd.log"))?;
        let epmd_addr = format!("127.0.0.1:{epmd_port}");
        epmd.wait_ready(Duration::from_secs(10), || TcpStream::connect(&epmd_addr).is_ok())?;

        let tag = epmd_port;
        let names: Vec<String> = (1..=n).map(|i| format!("fe2e{tag}n{i}@localhost")).collect();
        let mut cluster =
            RabbitCluster { nodes: Vec::new(), epmd: Some(epmd), epmd_port, dir: Some(dir), root };
        for (i, name) in names.iter().enumerate() {
            let node_dir = cluster.root.join(format!("n{}", i + 1));
            fs::create_dir_all(&node_dir)?;
            let mqtt_port = free_port();
            let mut conf = String::new();
            writeln!(conf, "listeners.tcp.default = 127.0.0.1:{}", free_port())?;
            writeln!(conf, "mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}")?;
            writeln!(conf, "mqtt.allow_anonymous = true\nloopback_users = none")?;
            writeln!(conf, "management_agent.disable_metrics_collector = true")?;
            if i > 0 {
                // The others join the first, which is up by then (see below).
                writeln!(conf, "cluster_formation.peer_discovery_backend = classic_config")?;
                writeln!(conf, "cluster_formation.classic_config.nodes.1 = {}", names[0])?;
            }
            fs::write(node_dir.join("rabbitmq.conf"), conf)?;
            fs::write(node_dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n")?;
            let mut cmd = Command::new(&server);
            cluster.env(&mut cmd);
            cmd.env("RABBITMQ_NODENAME", name)
                .env("RABBITMQ_CONFIG_FILE", node_dir.join("rabbitmq"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", node_dir.join("enabled_plugins"))
                .env("RABBITMQ_MNESIA_BASE", node_dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", node_dir.join("log"))
                .env("RABBITMQ_DIST_PORT", free_port().to_string());
            let mut daemon = Daemon::spawn(&format!("rabbitmq {name}"), cmd, &node_dir.join("server.log"))?;
            if i == 0 {
                // The first boots alone: nodes that all boot at once each look for a
                // peer that is up, give up after a few seconds and may boot apart.
                let addr = format!("127.0.0.1:{mqtt_port}");
                daemon.wait_ready(BOOT, || TcpStream::connect(&addr).is_ok())?;
            }
            cluster.nodes.push(Node { name: name.clone(), mqtt_port, daemon: Some(daemon) });
        }
        // The others boot at once; each is ready when its MQTT listener answers (after
        // it joined the first).
        for node in &mut cluster.nodes {
            let addr = format!("127.0.0.1:{}", node.mqtt_port);
            let daemon = node.daemon.as_mut().expect("just started");
            daemon.wait_ready(BOOT, || TcpStream::connect(&addr).is_ok())?;
        }
        let expected = names.clone();
        wait_until(Duration::from_secs(60), "every RabbitMQ node running in one cluster", || {
            let out = cluster.ctl(0, &["cluster_status", "--formatter", "json"])?;
            let v: serde_json::Value = serde_json::from_str(&out).context("cluster_status JSON")?;
            let running: Vec<&str> =
                v["running_nodes"].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect();
            Ok(expected.iter().all(|n| running.contains(&n.as_str())))
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", cluster.logs()))?;
        // A node's MQTT listener is up before the plugin's client-id tracking (a Raft
        // cluster over the nodes) has a leader; until then it refuses connections
        // ("server unavailable"). Ready when every node accepts an MQTT client.
        for i in 0..cluster.nodes.len() {
            let client = cluster.client(i);
            wait_until(Duration::from_secs(60), &format!("node {} accepting MQTT clients", i + 1), || {
                client.publish("fe2e/ready", "", false).map(|()| true)
            })
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", cluster.logs()))?;
        }
        Ok(cluster)
    }

    /// The environment every RabbitMQ program of this cluster runs with.
    fn env(&self, cmd: &mut Command) {
        // RABBITMQ_ALLOW_INPUT unset: the node runs with -noinput (stdin is /dev/null).
        cmd.env("HOME", self.root.join("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env_remove("RABBITMQ_ALLOW_INPUT");
    }

    /// `rabbitmqctl -n <node i> ARGS`: its stdout, or an error with its output.
    pub fn ctl(&self, node: usize, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"));
        self.env(&mut cmd);
        // The plugin's commands (list_mqtt_connections) need its enabled_plugins file.
        let plugins = self.root.join(format!("n{}", node + 1)).join("enabled_plugins");
        cmd.env("RABBITMQ_ENABLED_PLUGINS_FILE", plugins);
        cmd.arg("-n").arg(&self.nodes[node].name).args(args);
        let out = cmd.output().with_context(|| format!("running rabbitmqctl {args:?}"))?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds `user` with full AMQP permissions on vhost `/` and the MQTT topic
    /// permissions `write`/`read` (regular expressions over the routing key, where MQTT's
    /// `/` is `.`) on `amq.topic`, the exchange of the MQTT plugin. Users and
    /// permissions are cluster-wide: set through node 0.
    pub fn add_user(&self, user: &str, password: &str, write: &str, read: &str) -> Result<()> {
        self.ctl(0, &["add_user", user, password])?;
        self.ctl(0, &["set_permissions", "-p", "/", user, ".*", ".*", ".*"])?;
        self.ctl(0, &["set_topic_permissions", "-p", "/", user, "amq.topic", write, read])?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `mqtt://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// Every node's URL, in order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Node `i`'s MQTT port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].mqtt_port
    }

    /// An anonymous client of node `i`.
    pub fn client(&self, i: usize) -> Mqtt {
        Mqtt::new(self.nodes[i].mqtt_port)
    }

    /// The temp dir (node directories with `server.log` and `log/`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let dir = self.root.join(format!("n{}", i + 1));
            out.push_str(&format!("--- node {} ---\n{}\n", node.name, log_tail(&dir.join("server.log"), 15)));
            let log = dir.join("log").join(format!("{}.log", node.name));
            out.push_str(&log_tail(&log, 15));
            out.push('\n');
        }
        out
    }

    /// Stops every node, then epmd, then anything left in the temp dir. Idempotent.
    pub fn stop(&mut self) {
        let mut pids = std::collections::HashSet::new();
        for node in &self.nodes {
            if let Some(pid) = node.daemon.as_ref().and_then(Daemon::pid) {
                pids.extend(process_tree(pid));
            }
        }
        // In parallel, and briefly: the data dies with the temp dir, so a node that
        // takes more than a few seconds to shut down cleanly is killed.
        std::thread::scope(|s| {
            for node in &mut self.nodes {
                if let Some(mut d) = node.daemon.take() {
                    s.spawn(move || d.stop(Duration::from_secs(3)));
                }
            }
        });
        if let Some(mut epmd) = self.epmd.take() {
            if let Some(pid) = epmd.pid() {
                pids.extend(process_tree(pid));
            }
            epmd.stop(Duration::from_secs(5));
        }
        let killed = kill_leftovers(&self.root, &pids);
        if killed > 0 {
            eprintln!("fleet-e2e: killed {killed} RabbitMQ leftover process(es)");
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            remove_tempdir(dir);
        }
    }
}
