//! `fleet-demo`: the README's main job (`scripts/demo.sh`). Shows a newcomer the whole
//! loop on one machine, without root: the example fleet repository → a Git commit →
//! signed bundles → an MQTT broker → a `fleet-agent` → the fleet status table; then a
//! second commit that changes one config file, its plan, and the device converging on it.
//!
//! Every step is printed as a numbered heading with the command that does the same by
//! hand. Everything runs on embedded defaults unless told otherwise: an in-process MQTT
//! broker (rumqttd) on 127.0.0.1 (`--broker URL` for Mosquitto, EMQX, HiveMQ...), the
//! harness's static HTTP server for the bundles (`--nginx` for Debian's nginx, configured
//! as the README says), and a files-only device (no container
//! engine; `--engine-socket PATH` runs the containers too). All state lives in one work
//! directory (`./demo-work` by default), which the next run replaces.
//!
//! The example repository names device paths (`/srv/fleet/...`, `/etc/fleet/...`) that
//! need root, and containers that need an engine. The demo's copy of it is adapted, in
//! the open (the step prints the equivalent `sed`/`rm`): those roots are moved under
//! `<work dir>/device/`, and without an engine the apps' `compose.yaml` files are left out.
//!
//! The agent and every command are children of this process: they are stopped on
//! success, on failure and on Ctrl-C (SIGINT/SIGTERM), and the agent gets SIGTERM if
//! this process dies (`PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, IsTerminal};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use fleet_e2e::{free_port, log_tail, wait_until, workspace_bin, GitRepo, Nginx, StaticHttpServer};
use serde_json::Value;
use sha2::{Digest, Sha256};

const HELP: &str = "\
fleet-demo: the whole fleet loop on this machine, step by step (what scripts/demo.sh runs).

  example fleet repo -> Git commit -> signed bundles -> MQTT broker -> fleet-agent -> status table,
  then a second commit changing one config file: plan, build, publish, converge again.

Usage: fleet-demo [OPTIONS]

Options:
  --work-dir DIR        Where everything goes (default ./demo-work). Replaced on every run;
                        a non-empty directory that fleet-demo did not make is refused.
  --device ID           The device the local agent plays (default: the first file of
                        <example>/devices, gw-berlin-01 in the example repo).
  --broker URL          Use this MQTT broker (mqtt://host:1883, mqtts://host:8883): Mosquitto,
                        EMQX, HiveMQ... Default: an in-process broker on 127.0.0.1 (free port).
  --dashboard-broker URL  The broker's MQTT-over-WebSockets URL the dashboard page connects to
                        (ws://host:9001). Default: the in-process broker's WebSocket listener;
                        with --broker, the page asks for one (or add ?broker=ws://... to its URL).
  --engine-socket PATH  Also run the apps' containers, through this Docker Engine API socket
                        (dockerd, podman's service; e.g. /var/run/docker.sock). The device's
                        images must then be pullable by that engine: with the example, play
                        lab-gateway-01 (one image, localhost:5000/busybox:1.36; acme's own
                        devices name registry.acme.example). Default: files only (no engine).
  --nginx               Serve the build output with nginx (Debian's nginx-light, on PATH or
                        /usr/sbin) instead of the in-process static server: the README's
                        config (cache headers), its files and logs in <work-dir>/nginx/.
  --example DIR         The fleet repository to start from (default examples/fleet).
  --timeout SECS        How long to wait for the device to converge (default 120).
  --keep-running        At the end, leave the broker, bundle server and agent running until
                        Ctrl-C, to poke around (mosquitto_sub, edit a managed file...).
  --bundler-bin PATH    The fleet-bundler binary (default: next to fleet-demo, else built).
  --agent-bin PATH      The fleet-agent binary (default: next to fleet-demo, else built).
  -h, --help            This help.

No root is needed: the device's files land under <work-dir>/device/ (the demo's copy of
the example repo is adapted for that, and says how). Ctrl-C stops everything.

Exit codes: 0 done, 1 a step failed (the message says which and why), 2 bad command line,
130 interrupted.
";

/// The device directories of the example repository (agent.toml.example's allowed
/// roots). The demo's copy of the repository moves them under `<work dir>/device/`.
const DEVICE_ROOTS: [&str; 2] = ["/srv/fleet", "/etc/fleet"];

/// The config file the second commit changes, and how.
const CHANGED_FILE: &str = "apps/telemetry/files/telegraf.conf";
const CHANGE_AFTER: &str = "[[inputs.disk]]";
const CHANGE_LINE: &str = "[[inputs.net]]";
const SECOND_COMMIT_MESSAGE: &str = "telemetry: collect network counters too";

// ---------------------------------------------------------------------------------------
// Command line

#[derive(Debug)]
struct Options {
    work_dir: PathBuf,
    device: Option<String>,
    broker: Option<String>,
    dashboard_broker: Option<String>,
    engine_socket: Option<PathBuf>,
    nginx: bool,
    example: Option<PathBuf>,
    timeout: Duration,
    keep_running: bool,
    bundler_bin: Option<PathBuf>,
    agent_bin: Option<PathBuf>,
}

enum Parsed {
    Run(Box<Options>),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Parsed> {
    let mut opts = Options {
        work_dir: PathBuf::from("demo-work"),
        device: None,
        broker: None,
        dashboard_broker: None,
        engine_socket: None,
        nginx: false,
        example: None,
        timeout: Duration::from_secs(120),
        keep_running: false,
        bundler_bin: None,
        agent_bin: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| anyhow!("argument {a:?} is not UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| anyhow!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--work-dir" => opts.work_dir = value(&flag)?.into(),
            "--device" => opts.device = Some(value(&flag)?),
            "--broker" => {
                let url = value(&flag)?;
                if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) {
                    bail!("--broker must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT], not `{url}`");
                }
                opts.broker = Some(url);
            }
            "--dashboard-broker" => {
                let url = value(&flag)?;
                if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                    bail!("--dashboard-broker must be ws://HOST:PORT[/PATH] or wss://..., not `{url}`");
                }
                opts.dashboard_broker = Some(url);
            }
            "--engine-socket" => opts.engine_socket = Some(value(&flag)?.into()),
            "--nginx" => opts.nginx = true,
            "--example" => opts.example = Some(value(&flag)?.into()),
            "--timeout" => {
                let v = value(&flag)?;
                let secs: u64 = v.parse().map_err(|_| anyhow!("--timeout takes seconds, not `{v}`"))?;
                opts.timeout = Duration::from_secs(secs.max(1));
            }
            "--keep-running" => opts.keep_running = true,
            "--bundler-bin" => opts.bundler_bin = Some(value(&flag)?.into()),
            "--agent-bin" => opts.agent_bin = Some(value(&flag)?.into()),
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok(Parsed::Run(Box::new(opts)))
}

// ---------------------------------------------------------------------------------------
// Ctrl-C

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM only set a flag: every wait of the demo polls it, stops its
/// children and unwinds.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; always reaped.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------
// Output

struct Ui {
    bold: bool,
    step: usize,
}

impl Ui {
    fn heading(&mut self, title: &str) {
        self.step += 1;
        if self.bold {
            println!("\n\x1b[1m{}. {title}\x1b[0m", self.step);
        } else {
            println!("\n{}. {title}", self.step);
        }
    }

    /// The command line that does the same by hand.
    fn command(&self, words: &[String]) {
        self.command_then(words, "");
    }

    /// A command line followed by shell syntax (`> log 2>&1 &`), shown as is.
    fn command_then(&self, words: &[String], raw: &str) {
        let mut line = words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ");
        if !raw.is_empty() {
            line.push(' ');
            line.push_str(raw);
        }
        if self.bold {
            println!("  \x1b[36m$ {line}\x1b[0m");
        } else {
            println!("  $ {line}");
        }
    }

    fn note(&self, text: &str) {
        for line in text.lines() {
            println!("  {line}");
        }
    }

    /// Output of a command (or of the demo itself), indented under its command line.
    fn output(&self, line: &str) {
        println!("    {line}");
    }
}

fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else if !s.is_empty() && s.chars().all(|c| safe(c) || c == '*') && !s.starts_with('*') {
        // Globs are shown unquoted: they are meant for the shell.
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------
// Paths and binaries

/// The work directory's layout.
struct Layout {
    root: PathBuf,
    repo: PathBuf,
    keys: PathBuf,
    out: PathBuf,
    www: PathBuf,
    device: PathBuf,
    agent: PathBuf,
}

impl Layout {
    fn new(root: PathBuf) -> Layout {
        Layout {
            repo: root.join("fleet-repo"),
            keys: root.join("keys"),
            out: root.join("out"),
            www: root.join("www"),
            device: root.join("device"),
            agent: root.join("agent"),
            root,
        }
    }

    fn agent_toml(&self) -> PathBuf {
        self.agent.join("agent.toml")
    }

    fn agent_log(&self) -> PathBuf {
        self.agent.join("agent.log")
    }

    fn state_dir(&self) -> PathBuf {
        self.agent.join("state")
    }

    /// Where a device root (`/srv/fleet`) is on this machine.
    fn device_root(&self, root: &str) -> PathBuf {
        self.device.join(root.trim_start_matches('/'))
    }
}

/// The marker that lets the next run replace a work directory.
const MARKER: &str = ".fleet-demo";

fn prepare_work_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        let empty = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_none();
        if !empty && !dir.join(MARKER).is_file() {
            bail!(
                "refusing to use {}: it is not empty and was not made by fleet-demo \
                 (pick another --work-dir, or remove it yourself)",
                dir.display()
            );
        }
        if !empty {
            fs::remove_dir_all(dir)
                .with_context(|| format!("removing the previous run's {}", dir.display()))?;
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join(MARKER), "made by fleet-demo: the next run replaces this directory\n")?;
    fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))
}

/// `path` as the user would type it: relative to the current directory when below it.
fn disp(path: &Path) -> String {
    if let Ok(cwd) = std::env::current_dir() {
        if let Ok(rel) = path.strip_prefix(&cwd) {
            if !rel.as_os_str().is_empty() {
                return rel.display().to_string();
            }
        }
    }
    path.display().to_string()
}

fn find_example(given: Option<&Path>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match given {
        Some(p) => vec![p.to_path_buf()],
        None => vec![
            PathBuf::from("examples/fleet"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet"),
        ],
    };
    for c in &candidates {
        if c.join("fleet.yaml").is_file() {
            return fs::canonicalize(c).with_context(|| format!("resolving {}", c.display()));
        }
    }
    bail!(
        "no fleet repository at {} (a directory with fleet.yaml; run from the repository root or pass --example DIR)",
        candidates[0].display()
    )
}

fn devices_of(example: &Path) -> Result<Vec<String>> {
    let dir = example.join("devices");
    let mut ids: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".yaml")).map(str::to_string))
        .collect();
    ids.sort();
    Ok(ids)
}

/// A workspace binary: `--X-bin`, else next to this executable (scripts/demo.sh builds
/// all three together), else built with cargo by the harness.
fn locate_bin(name: &str, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()));
        }
        bail!("{} does not exist", p.display());
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        let sibling = dir.join(name);
        if sibling.is_file() {
            return Ok(sibling);
        }
    }
    workspace_bin(name).with_context(|| format!("finding or building {name}"))
}

/// Replaces every device root in `text` by its place under the work dir, in one pass.
fn relocate(text: &str, layout: &Layout) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for root in DEVICE_ROOTS {
            if let Some(after) = rest.strip_prefix(root) {
                out.push_str(&layout.device_root(root).to_string_lossy());
                rest = after;
                continue 'outer;
            }
        }
        let c = rest.chars().next().expect("rest is not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Regular files below `dir`, sorted, with (mode, size, sha256).
fn list_files(dir: &Path) -> Vec<(PathBuf, u32, u64, String)> {
    fn walk(dir: &Path, found: &mut Vec<(PathBuf, u32, u64, String)>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                walk(&path, found);
            } else if meta.is_file() {
                let sha = fs::read(&path).map(|b| hex::encode(Sha256::digest(b))).unwrap_or_default();
                found.push((path, meta.permissions().mode() & 0o7777, meta.len(), sha));
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, &mut found);
    found
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

// ---------------------------------------------------------------------------------------
// The embedded broker

/// Starts rumqttd in this process on `127.0.0.1:<free port>` (MQTT 3.1.1, anonymous,
/// retained messages and last wills) and waits until it accepts connections. Its
/// threads end with the process; it logs nothing (no tracing subscriber is installed).
fn start_embedded_broker(ws_port: Option<u16>) -> Result<u16> {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    let mut last_err = None;
    for _ in 0..3 {
        let port = free_port();
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let settings = |name: &str, listen| ServerSettings {
            name: name.into(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: 16 << 20,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let server = settings("fleet-demo", listen);
        // MQTT over WebSockets, for the dashboard page.
        let ws = ws_port.map(|p| {
            let ws = settings("fleet-demo-ws", SocketAddr::from(([127, 0, 0, 1], p)));
            [("ws".to_string(), ws)].into_iter().collect()
        });
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 200,
                max_segment_size: 16 << 20,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some([("v4".to_string(), server)].into_iter().collect()),
            ws,
            ..Default::default()
        };
        let handle = thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
            let mut broker = Broker::new(config);
            // Returns only when its server threads end (e.g. the port was taken).
            let _ = broker.start();
        })?;
        let ready = wait_until(Duration::from_secs(5), "the embedded MQTT broker", || {
            if handle.is_finished() {
                bail!("the broker stopped (port {port} taken?)");
            }
            Ok(TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok())
        });
        match ready {
            Ok(()) => return Ok(port),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("the embedded MQTT broker did not start")))
}

/// Fails early, with a clear message, when nothing listens at the `--broker` URL.
fn check_broker_reachable(url: &str) -> Result<()> {
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtts", rest)) => (true, rest),
        Some((_, rest)) => (false, rest),
        None => (false, url),
    };
    let host_port = rest.split('/').next().unwrap_or(rest);
    let has_port = host_port.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !host_port.ends_with(']');
    let addr = if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:{}", if tls { 8883 } else { 1883 })
    };
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .with_context(|| format!("resolving the broker address {addr}"))?
        .collect();
    for a in &addrs {
        if TcpStream::connect_timeout(a, Duration::from_secs(5)).is_ok() {
            return Ok(());
        }
    }
    bail!("no MQTT broker answers at {url} ({addr}): start it, or leave out --broker for the built-in one")
}

// ---------------------------------------------------------------------------------------
// The demo

/// What serves `<work dir>/www`: the harness's own static server, or nginx (`--nginx`).
/// Stopped on drop.
enum BundleServer {
    Own(StaticHttpServer),
    Nginx(Nginx),
}

struct Demo {
    opts: Options,
    ui: Ui,
    started: Instant,
    layout: Layout,
    example: PathBuf,
    device: String,
    bundler: PathBuf,
    agent_bin: PathBuf,
    broker_url: String,
    /// The in-process broker's WebSocket port (chosen before the build, which writes it
    /// into the dashboard).
    ws_port: Option<u16>,
    server: Option<BundleServer>,
    agent: Option<Child>,
    git_repo: Option<GitRepo>,
    last_commit_time: u64,
}

impl Demo {
    fn new(opts: Options) -> Result<Demo> {
        let example = find_example(opts.example.as_deref())?;
        let devices = devices_of(&example)?;
        let device = match &opts.device {
            Some(d) if devices.contains(d) => d.clone(),
            Some(d) => {
                bail!("device `{d}` is not in {}/devices (there: {})", disp(&example), devices.join(", "))
            }
            None => {
                devices.first().cloned().ok_or_else(|| anyhow!("{}/devices has no device", disp(&example)))?
            }
        };
        if let Some(sock) = &opts.engine_socket {
            let is_socket = fs::metadata(sock).map(|m| m.file_type().is_socket()).unwrap_or(false);
            if !is_socket {
                bail!("--engine-socket {}: no unix socket there (is the engine running?)", sock.display());
            }
        }
        let bundler = locate_bin("fleet-bundler", opts.bundler_bin.as_deref())?;
        let agent_bin = locate_bin("fleet-agent", opts.agent_bin.as_deref())?;
        let root = prepare_work_dir(&opts.work_dir)?;
        Ok(Demo {
            ui: Ui { bold: std::io::stdout().is_terminal(), step: 0 },
            started: Instant::now(),
            layout: Layout::new(root),
            example,
            device,
            bundler,
            agent_bin,
            broker_url: opts.broker.clone().unwrap_or_default(),
            ws_port: if opts.broker.is_none() { Some(free_port()) } else { None },
            server: None,
            agent: None,
            git_repo: None,
            last_commit_time: 0,
            opts,
        })
    }

    fn run(&mut self) -> Result<()> {
        self.intro();
        let first = self.make_repo()?;
        self.keygen()?;
        self.validate()?;
        self.build()?;
        self.start_broker_and_server()?;
        self.start_agent()?;
        self.upload()?;
        self.publish()?;
        self.wait_converged(&first)?;
        let before = self.show_files(None)?;
        self.agent_status()?;

        let second = self.second_commit()?;
        self.plan(&first, &second)?;
        self.build()?;
        self.upload()?;
        self.publish()?;
        self.wait_converged(&second)?;
        self.show_files(Some(&before))?;
        self.fleet_table()?;
        self.outro(&second)?;
        Ok(())
    }

    fn intro(&self) {
        let bin_dir = self.bundler.parent().map(disp).unwrap_or_default();
        // For PATH, a relative directory must become absolute.
        let path_dir = if bin_dir.starts_with('/') { bin_dir.clone() } else { format!("$PWD/{bin_dir}") };
        println!(
            "fleet demo: the example fleet repository, bundled, published and applied by a local agent."
        );
        println!(
            "  device      {} (one of {}/devices; --device ID for another)",
            self.device,
            disp(&self.example)
        );
        match &self.opts.broker {
            Some(url) => println!("  broker      {url} (--broker)"),
            None => println!("  broker      in-process MQTT broker on 127.0.0.1 (--broker URL for Mosquitto, EMQX, HiveMQ)"),
        }
        if self.opts.nginx {
            println!("  bundles     served by nginx (--nginx)");
        } else {
            println!("  bundles     served by an in-process static HTTP server (--nginx for nginx)");
        }
        match &self.opts.engine_socket {
            Some(sock) => println!("  containers  run through {} (--engine-socket)", sock.display()),
            None => {
                let hint = if Path::new("/var/run/docker.sock").exists() {
                    " (a Docker socket exists: --engine-socket /var/run/docker.sock runs them, if the example's images are pullable)"
                } else {
                    ""
                };
                println!("  containers  NOT run: files only, no container engine{hint}");
            }
        }
        println!("  work dir    {}", disp(&self.layout.root));
        println!(
            "  binaries    {bin_dir}/ (to repeat the commands by hand: export PATH=\"{path_dir}:$PATH\")"
        );
    }

    fn bundler_cmd(&self, args: &[String]) -> (Command, Vec<String>) {
        let mut cmd = Command::new(&self.bundler);
        cmd.args(args);
        let mut shown = vec!["fleet-bundler".to_string()];
        shown.extend(args.iter().cloned());
        (cmd, shown)
    }

    /// Runs a command, streaming its output (stdout and stderr, indented, in the order it
    /// wrote them) while watching for Ctrl-C and, once it runs, for the agent dying.
    /// Returns the exit code; fails unless it is one of `ok`.
    fn run_cmd(&mut self, mut cmd: Command, shown: &[String], ok: &[i32]) -> Result<i32> {
        check_interrupt()?;
        self.ui.command(shown);
        // One pipe for stdout and stderr: lines keep the order the command wrote them in.
        let (reader, writer) = std::io::pipe().context("creating a pipe")?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(writer.try_clone().context("duplicating a pipe")?)
            .stderr(writer)
            .spawn()
            .with_context(|| format!("starting {}", shown.join(" ")))?;
        // The parent's copies of the write end are gone with `cmd`: EOF comes with the child's exit.
        drop(cmd);
        let (tx, rx) = mpsc::channel::<String>();
        let reader_thread = thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut failure = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    self.ui.output(&line);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if interrupted() {
                failure = Some(anyhow!("interrupted"));
            } else if let Err(e) = self.check_agent() {
                failure = Some(e);
            }
            if failure.is_some() {
                stop_child(&mut child, Duration::from_secs(2));
                break;
            }
        }
        let status = child.wait().context("waiting for the command")?;
        // A grandchild could hold the pipe open: do not wait for EOF after a failure.
        if failure.is_none() {
            let _ = reader_thread.join();
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let code = status.code().unwrap_or(-1);
        if !ok.contains(&code) {
            bail!("`{}` failed ({status})", shown.join(" "));
        }
        Ok(code)
    }

    fn bundler(&mut self, args: &[&str], ok: &[i32]) -> Result<i32> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (cmd, shown) = self.bundler_cmd(&args);
        self.run_cmd(cmd, &shown, ok)
    }

    /// Fails with the tail of the agent's log when the agent has exited.
    fn check_agent(&mut self) -> Result<()> {
        let Some(agent) = self.agent.as_mut() else { return Ok(()) };
        if let Some(status) = agent.try_wait()? {
            self.agent = None;
            bail!("the agent exited ({status})\n{}", log_tail(&self.layout.agent_log(), 30));
        }
        Ok(())
    }

    fn git(&mut self, repo: &GitRepo, args: &[&str]) -> Result<String> {
        check_interrupt()?;
        let mut shown = vec!["git".to_string(), "-C".into(), disp(repo.path())];
        shown.extend(args.iter().map(|a| a.to_string()));
        self.ui.command(&shown);
        repo.git(args)
    }

    /// The fleet repository, for a commit made now: commit times must be recent, since a
    /// bundle expires `bundle_expiry` after its commit (and versions follow commit times).
    fn repo(&mut self) -> Result<GitRepo> {
        let mut repo =
            self.git_repo.clone().ok_or_else(|| anyhow!("the fleet repository is not made yet"))?;
        let now = unix_now().max(self.last_commit_time + 1);
        self.last_commit_time = now;
        repo.set_date(&format!("{now} +0000"));
        Ok(repo)
    }

    fn make_repo(&mut self) -> Result<String> {
        self.ui.heading("Make a fleet repository: a Git commit of the example");
        let (example, repo_dir) = (disp(&self.example), disp(&self.layout.repo));
        self.ui.command(&["cp".into(), "-r".into(), example.clone(), repo_dir.clone()]);
        copy_dir(&self.example, &self.layout.repo)?;

        // The example's device paths need root: move them under the work dir.
        let mut yaml = vec![self.layout.repo.join("fleet.yaml")];
        let mut composes = Vec::new();
        let apps = self.layout.repo.join("apps");
        if let Ok(entries) = fs::read_dir(&apps) {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
            dirs.sort();
            for d in dirs {
                yaml.push(d.join("app.yaml"));
                composes.push(d.join("compose.yaml"));
            }
        }
        let files_only = self.opts.engine_socket.is_none();
        let sed_script = DEVICE_ROOTS
            .iter()
            .map(|r| format!("s#{r}#{}#g", self.layout.device_root(r).display()))
            .collect::<Vec<_>>()
            .join("; ");
        let mut sed = vec!["sed".to_string(), "-i".into(), sed_script];
        sed.extend([
            format!("{repo_dir}/fleet.yaml"),
            format!("{repo_dir}/apps/*/app.yaml"),
            format!("{repo_dir}/apps/*/compose.yaml"),
        ]);
        self.ui.command(&sed);
        for f in yaml.iter().chain(composes.iter()).filter(|f| f.is_file()) {
            let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            fs::write(f, relocate(&text, &self.layout))?;
        }
        if files_only {
            self.ui.command(&["rm".into(), "-f".into(), format!("{repo_dir}/apps/*/compose.yaml")]);
            for f in composes.iter().filter(|f| f.is_file()) {
                fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
            }
        }
        self.ui.note(&format!(
            "This machine plays the device: its paths {} move under {}/, so no root is needed.",
            DEVICE_ROOTS.join(" and "),
            disp(&self.layout.device),
        ));
        if files_only {
            self.ui.note(
                "FILES ONLY: there is no container engine, so the apps' compose.yaml files are left out:\n\
                 the device gets every app's files and runs no container (--engine-socket PATH runs them).",
            );
        }
        self.ui.command(&[
            "git".into(),
            "-C".into(),
            repo_dir.clone(),
            "init".into(),
            "-q".into(),
            "-b".into(),
            "main".into(),
        ]);
        let mut repo = GitRepo::init(&self.layout.repo)?;
        repo.set_author("Fleet Demo", "fleet-demo@example.invalid");
        self.git_repo = Some(repo);
        let repo = self.repo()?;
        self.git(&repo, &["add", "-A"])?;
        let message = format!("Example fleet from {example}");
        self.git(&repo, &["commit", "-q", "-m", &message])?;
        let commit = repo.head()?;
        self.ui.output(&format!("commit {commit} \"{message}\""));
        Ok(commit)
    }

    fn keygen(&mut self) -> Result<()> {
        self.ui.heading("Make a signing key (CI keeps signing.key secret; devices trust signing.pub)");
        let keys = disp(&self.layout.keys);
        self.bundler(&["keygen", "--out", &keys], &[0])?;
        Ok(())
    }

    fn validate(&mut self) -> Result<()> {
        self.ui.heading("Validate the repository (every file, every device, all problems at once)");
        let repo = disp(&self.layout.repo);
        self.bundler(&["validate", "--repo", &repo], &[0])?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        self.ui.heading("Build signed bundles, one per device, their pointer files and index.json");
        let (repo, key, out) =
            (disp(&self.layout.repo), disp(&self.layout.keys.join("signing.key")), disp(&self.layout.out));
        let mut args = vec!["build", "--repo", &repo, "--rev", "HEAD", "--key", &key, "--out", &out];
        // The example's secrets decrypt with its published, example-only CI identity.
        let example_identity = disp(&self.layout.repo.join("EXAMPLE-ONLY-ci-age.txt"));
        if self.layout.repo.join("EXAMPLE-ONLY-ci-age.txt").is_file() {
            args.extend(["--age-identity", &example_identity]);
        }
        let ws = self.dashboard_broker();
        if let Some(ws) = &ws {
            args.extend(["--dashboard-broker", ws]);
        }
        self.bundler(&args, &[0])?;
        let index = self.index()?;
        let entry = &index["devices"][&self.device];
        self.ui.output(&format!(
            "{}: version {}, bundle {}/bundles/{}.bundle ({} bytes)",
            self.device,
            entry["version"],
            out,
            entry["digest"].as_str().unwrap_or("?"),
            entry["size"]
        ));
        Ok(())
    }

    /// The WebSocket URL the dashboard connects to, if one is known.
    fn dashboard_broker(&self) -> Option<String> {
        self.opts.dashboard_broker.clone().or_else(|| self.ws_port.map(|p| format!("ws://127.0.0.1:{p}")))
    }

    /// The dashboard page `build` wrote, as a URL to open from disk.
    fn dashboard_url(&self) -> String {
        let page = self.layout.out.join("dashboard/index.html");
        let page = fs::canonicalize(&page).unwrap_or(page);
        match self.dashboard_broker() {
            Some(_) => format!("file://{}", page.display()),
            None => format!("file://{}?broker=ws://BROKER:PORT", page.display()),
        }
    }

    fn index(&self) -> Result<Value> {
        let path = self.layout.out.join("index.json");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn start_broker_and_server(&mut self) -> Result<()> {
        check_interrupt()?;
        self.ui.heading("Start an MQTT broker and a bundle server (any static HTTP server)");
        fs::create_dir_all(&self.layout.www)?;
        if self.opts.broker.is_none() {
            let port = start_embedded_broker(self.ws_port).context("starting the in-process MQTT broker")?;
            self.broker_url = format!("mqtt://127.0.0.1:{port}");
            self.ui.command(&["mosquitto".into(), "-p".into(), port.to_string()]);
            self.ui.output(&format!(
                "{} (in-process; any MQTT 3.1.1 broker with retained messages does)",
                self.broker_url
            ));
        } else {
            check_broker_reachable(&self.broker_url)?;
            self.ui.output(&format!("{} (given with --broker): reachable", self.broker_url));
        }
        if self.opts.nginx {
            let nginx = Nginx::serve_in(&self.layout.www, &self.layout.root.join("nginx"))
                .context("starting nginx (--nginx)")?;
            let config = disp(&nginx.config_path());
            self.ui.command(&["cat".into(), config.clone()]);
            for line in nginx.config().lines() {
                self.ui.output(line);
            }
            self.ui.command(&[
                "nginx".into(),
                "-c".into(),
                config,
                "-p".into(),
                disp(nginx.dir()),
                "-e".into(),
                disp(&nginx.dir().join("error.log")),
                "-g".into(),
                "daemon off;".into(),
            ]);
            self.ui.output(&format!("{} serves {}/ (nginx)", nginx.base_url(), disp(&self.layout.www)));
            self.server = Some(BundleServer::Nginx(nginx));
        } else {
            let server = StaticHttpServer::start(&self.layout.www).context("starting the bundle server")?;
            self.ui.command(&[
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                server.port().to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--directory".into(),
                disp(&self.layout.www),
            ]);
            self.ui.output(&format!("{} serves {}/ (in-process)", server.url(""), disp(&self.layout.www)));
            self.server = Some(BundleServer::Own(server));
        }
        Ok(())
    }

    fn base_url(&self) -> String {
        match &self.server {
            Some(BundleServer::Own(s)) => s.url("").trim_end_matches('/').to_string(),
            Some(BundleServer::Nginx(n)) => n.base_url(),
            None => String::new(),
        }
    }

    fn start_agent(&mut self) -> Result<()> {
        check_interrupt()?;
        self.ui.heading(&format!("Start the device's agent, as device {}", self.device));
        let index = self.index()?;
        let fleet = index["fleet"].as_str().unwrap_or("acme").to_string();
        let prefix = index["topic_prefix"].as_str().unwrap_or("fleet").to_string();
        let state = self.layout.state_dir();
        fs::create_dir_all(&state)?;
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
        let q = |p: &Path| format!("{:?}", p.to_string_lossy());
        let roots: Vec<String> = DEVICE_ROOTS.iter().map(|r| q(&self.layout.device_root(r))).collect();
        let engine = match &self.opts.engine_socket {
            Some(sock) => q(sock),
            None => "\"none\"  # files only: no container engine".to_string(),
        };
        let toml = format!(
            "# fleet-agent configuration for the demo (see agent/agent.toml.example).\n\
             device = {device:?}\n\
             fleet = {fleet:?}\n\
             topic_prefix = {prefix:?}\n\
             state_dir = {state}\n\
             # Managed files may only be written below these (on a real device: {real}).\n\
             allowed_roots = [{roots}]\n\
             \n\
             [mqtt]\n\
             url = {broker:?}\n\
             \n\
             [trust]\n\
             public_keys = [{pubkey}]\n\
             \n\
             [fetch]\n\
             # Polled every 5 minutes; the MQTT announcement is what makes updates quick.\n\
             base_url = {base:?}\n\
             \n\
             [engine]\n\
             socket = {engine}\n\
             \n\
             # What bundles may ask of the engine beyond the secure defaults: what the\n\
             # example's devices need (examples/fleet: fleet.yaml and devices/*.yaml, policy:).\n\
             [engine.policy]\n\
             allow_host_network = true        # canary-tools (the canary gw-berlin-01)\n\
             bind_roots = [\"/proc\"]           # telemetry reads the host's /proc\n\
             devices = [\"/dev/ttyUSB0\", \"/dev/ttyS1\"]   # modbus-gateway (the Munich devices)\n\
             registries = [\"docker.io\", \"registry.acme.example\", \"localhost:5000\"]\n",
            device = self.device,
            state = q(&state),
            real = DEVICE_ROOTS.join(", "),
            roots = roots.join(", "),
            broker = self.broker_url,
            pubkey = q(&self.layout.keys.join("signing.pub")),
            base = self.base_url(),
        );
        fs::create_dir_all(&self.layout.agent)?;
        fs::write(self.layout.agent_toml(), &toml)?;
        self.ui.command(&["cat".into(), disp(&self.layout.agent_toml())]);
        for line in toml.lines() {
            self.ui.output(line);
        }
        let config = disp(&self.layout.agent_toml());
        let mut check = Command::new(&self.agent_bin);
        check.args(["check-config", "--config", &config]);
        self.run_cmd(
            check,
            &["fleet-agent".into(), "check-config".into(), "--config".into(), config.clone()],
            &[0],
        )?;

        let log = File::create(self.layout.agent_log())?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.args(["run", "--config", &config]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // The agent gets SIGTERM when the demo dies, however it dies.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        self.ui.command_then(
            &["fleet-agent".into(), "run".into(), "--config".into(), config],
            &format!("> {} 2>&1 &", shell_quote(&disp(&self.layout.agent_log()))),
        );
        self.agent = Some(cmd.spawn().context("starting fleet-agent")?);
        self.ui.output(&format!(
            "running (pid {}); it has no bundle yet: nothing is on the bundle server",
            self.agent.as_ref().map_or(0, Child::id)
        ));
        Ok(())
    }

    /// Copies the build output to the served directory: bundles first, then the
    /// devices' pointer files and the index, so that neither names a bundle the server
    /// does not have.
    fn upload(&mut self) -> Result<()> {
        check_interrupt()?;
        self.ui.heading("Upload the build output to the bundle server");
        let (out, www) = (disp(&self.layout.out), disp(&self.layout.www));
        self.ui.command(&[
            "cp".into(),
            "-r".into(),
            format!("{out}/bundles"),
            format!("{out}/devices"),
            format!("{out}/index.json"),
            www,
        ]);
        let bundles = self.layout.www.join("bundles");
        fs::create_dir_all(&bundles)?;
        let mut count = 0;
        for e in fs::read_dir(self.layout.out.join("bundles"))?.flatten() {
            let dst = bundles.join(e.file_name());
            if !dst.exists() {
                fs::copy(e.path(), &dst)?;
                count += 1;
            }
        }
        // The pointer file the agent polls (`devices/<id>.json`), then the index.
        let devices = self.layout.www.join("devices");
        fs::create_dir_all(&devices)?;
        for e in fs::read_dir(self.layout.out.join("devices"))?.flatten() {
            fs::copy(e.path(), devices.join(e.file_name()))?;
        }
        fs::copy(self.layout.out.join("index.json"), self.layout.www.join("index.json"))?;
        self.ui.output(&format!("{count} new bundle(s), the pointer file(s) in devices/ and index.json"));
        Ok(())
    }

    fn publish(&mut self) -> Result<()> {
        self.ui.heading("Announce the new bundles over MQTT (retained; the agent fetches and verifies)");
        let (out, broker, base) = (disp(&self.layout.out), self.broker_url.clone(), self.base_url());
        self.bundler(&["publish", "--out", &out, "--broker", &broker, "--base-url", &base], &[0])?;
        Ok(())
    }

    fn wait_converged(&mut self, commit: &str) -> Result<()> {
        self.ui.heading(&format!("Wait until {} converged on commit {}", self.device, short(commit)));
        let (broker, index, device) =
            (self.broker_url.clone(), disp(&self.layout.out.join("index.json")), self.device.clone());
        let timeout = format!("{}s", self.opts.timeout.as_secs());
        let args = [
            "status",
            "--broker",
            &broker,
            "--index",
            &index,
            "--device",
            &device,
            "--wait",
            "--timeout",
            &timeout,
        ];
        let code = self.bundler(&args, &[0, 3, 4])?;
        match code {
            0 => {}
            3 => bail!(
                "{} failed to apply commit {} (see LAST ERROR above and {}){}",
                self.device,
                short(commit),
                disp(&self.layout.agent_log()),
                if self.opts.engine_socket.is_some() {
                    "; with --engine-socket the example's images must be pullable by the engine"
                } else {
                    ""
                }
            ),
            _ => bail!(
                "{} did not converge within {}s\n{}",
                self.device,
                self.opts.timeout.as_secs(),
                log_tail(&self.layout.agent_log(), 20)
            ),
        }
        // The device's own record must name the commit too.
        let applied = self.layout.state_dir().join("applied.json");
        let record: Value = serde_json::from_str(&fs::read_to_string(&applied)?)?;
        if record["commit"].as_str() != Some(commit) {
            bail!("{} says it applied {}, expected {commit}", applied.display(), record["commit"]);
        }
        self.ui.output(&format!("=> {} converged on commit {}", self.device, short(commit)));
        Ok(())
    }

    fn show_files(
        &mut self,
        before: Option<&BTreeMap<PathBuf, String>>,
    ) -> Result<BTreeMap<PathBuf, String>> {
        check_interrupt()?;
        self.ui.heading("The files the agent wrote (atomically, only below its allowed roots)");
        self.ui.command(&["find".into(), disp(&self.layout.device), "-type".into(), "f".into()]);
        let mut now = BTreeMap::new();
        for (path, mode, size, sha) in list_files(&self.layout.device) {
            let mark = match before.map(|b| b.get(&path)) {
                Some(Some(old)) if *old != sha => "  <- changed by the second commit",
                Some(None) => "  <- new",
                _ => "",
            };
            self.ui.output(&format!("{mode:04o} {size:>6} B  sha256 {}  {}{mark}", &sha[..12], disp(&path)));
            now.insert(path, sha);
        }
        if now.is_empty() {
            bail!("the agent wrote no file under {}", disp(&self.layout.device));
        }
        if before.is_some() {
            // The device's copy of the changed file has the second commit's line.
            let name = Path::new(CHANGED_FILE).file_name().unwrap_or_default();
            for path in now.keys().filter(|p| p.file_name() == Some(name)) {
                self.ui.command(&["grep".into(), "-n".into(), "-F".into(), CHANGE_LINE.into(), disp(path)]);
                let text = fs::read_to_string(path).unwrap_or_default();
                let hits: Vec<String> = text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| l.contains(CHANGE_LINE))
                    .map(|(i, l)| format!("{}:{l}", i + 1))
                    .collect();
                if hits.is_empty() {
                    bail!("{} does not have the second commit's change", disp(path));
                }
                for h in hits {
                    self.ui.output(&h);
                }
            }
        }
        Ok(now)
    }

    fn agent_status(&mut self) -> Result<()> {
        self.ui.heading("The device's own view (local state, no network)");
        let config = disp(&self.layout.agent_toml());
        let mut cmd = Command::new(&self.agent_bin);
        cmd.args(["status", "--config", &config]);
        self.run_cmd(cmd, &["fleet-agent".into(), "status".into(), "--config".into(), config], &[0])?;
        Ok(())
    }

    fn second_commit(&mut self) -> Result<String> {
        self.ui.heading("Change one config file in a second commit");
        let path = self.layout.repo.join(CHANGED_FILE);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("the second commit changes {CHANGED_FILE}, which the example lacks"))?;
        let changed = match text.find(CHANGE_AFTER) {
            Some(i) => {
                let end = i + CHANGE_AFTER.len();
                format!("{}\n{CHANGE_LINE}{}", &text[..end], &text[end..])
            }
            None => format!("{text}{CHANGE_LINE}\n"),
        };
        let shown = disp(&path);
        self.ui.command(&[
            "sed".into(),
            "-i".into(),
            format!(
                "s/^\\[\\[inputs.disk\\]\\]$/&\\n{}/",
                CHANGE_LINE.replace('[', "\\[").replace(']', "\\]")
            ),
            shown,
        ]);
        fs::write(&path, changed)?;
        let repo = self.repo()?;
        self.git(&repo, &["commit", "-q", "-a", "-m", SECOND_COMMIT_MESSAGE])?;
        let commit = repo.head()?;
        self.ui.output(&format!("commit {commit} \"{SECOND_COMMIT_MESSAGE}\""));
        Ok(commit)
    }

    fn plan(&mut self, from: &str, to: &str) -> Result<()> {
        self.ui.heading("Plan: what the second commit changes, per device (as CI shows on a merge request)");
        let repo = disp(&self.layout.repo);
        let code =
            self.bundler(&["plan", "--repo", &repo, "--from", short(from), "--to", short(to)], &[0, 2])?;
        if code == 0 {
            bail!("the plan shows no change between {} and {}", short(from), short(to));
        }
        self.ui.note("(exit code 2: there are changes)");
        Ok(())
    }

    fn fleet_table(&mut self) -> Result<()> {
        self.ui.heading("The whole fleet's status, from the retained MQTT status topics");
        let (broker, index) = (self.broker_url.clone(), disp(&self.layout.out.join("index.json")));
        self.bundler(&["status", "--broker", &broker, "--index", &index], &[0])?;
        self.ui.note(&format!(
            "(only {} runs an agent in this demo; the other devices never reported)",
            self.device
        ));
        Ok(())
    }

    fn outro(&mut self, commit: &str) -> Result<()> {
        let secs = self.started.elapsed().as_secs_f64();
        println!(
            "\nDone in {secs:.1} s: {} converged on commit {} (\"{SECOND_COMMIT_MESSAGE}\").",
            self.device,
            short(commit)
        );
        println!(
            "Everything is in {}/ (agent log: {}).",
            disp(&self.layout.root),
            disp(&self.layout.agent_log())
        );
        println!("Live dashboard (static page, written by the build): {}", self.dashboard_url());
        if !self.opts.keep_running {
            println!(
                "Run with --keep-running to keep the broker, bundle server and agent up and poke around (and watch the dashboard live)."
            );
            return Ok(());
        }
        let example =
            list_files(&self.layout.device).into_iter().next().map(|(p, ..)| disp(&p)).unwrap_or_default();
        println!("\nStill running, until Ctrl-C:");
        println!("  broker         {}", self.broker_url);
        println!("  bundle server  {}", self.base_url());
        println!("  agent          {} (log {})", self.device, disp(&self.layout.agent_log()));
        println!("  dashboard      {}", self.dashboard_url());
        println!("Try:");
        if let Some(port) = self.broker_url.strip_prefix("mqtt://127.0.0.1:") {
            println!(
                "  mosquitto_sub -h 127.0.0.1 -p {port} -t 'fleet/#' -v      # status, online, announcements"
            );
        }
        println!("  echo drift >> {example}   # the agent repairs it at its next reconcile (60 s)");
        let (index, broker) = (disp(&self.layout.out.join("index.json")), &self.broker_url);
        println!("  fleet-bundler status --broker {broker} --index {index}");
        while !interrupted() {
            self.check_agent()?;
            thread::sleep(Duration::from_millis(100));
        }
        // Asked for: a Ctrl-C here is the normal end, not an interruption.
        INTERRUPTED.store(false, Ordering::SeqCst);
        println!("\nStopping the agent, the bundle server and the broker.");
        Ok(())
    }

    /// Stops the agent (gracefully: it publishes `online = false`) and the bundle server;
    /// the in-process broker ends with the process.
    fn shutdown(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            stop_child(&mut agent, Duration::from_secs(10));
        }
        self.server = None;
    }
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fleet-demo: {e:#} (see fleet-demo --help)");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    let mut demo = match Demo::new(*opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("fleet-demo: {e:#}");
            return ExitCode::from(1);
        }
    };
    let result = demo.run();
    demo.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if interrupted() => {
            eprintln!("\nfleet-demo: interrupted; the agent, the bundle server and the broker are stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\nfleet-demo: FAILED at step {}: {e:#}", demo.ui.step);
            let log = demo.layout.agent_log();
            let log =
                if log.is_file() { format!("; the agent's log: {}", disp(&log)) } else { String::new() };
            eprintln!("(everything the demo made is in {}{log})", disp(&demo.layout.root));
            ExitCode::from(1)
        }
    }
}
