//! `fleet-agent check-config` and `fleet-agent run` on configurations that are wrong in
//! ways a `stat` does not see (TLS files that do not parse, allowed roots that overlap
//! the agent's own directories) or that are unwise (a password over plain `mqtt://`):
//! the real binary, its exit code and its message. `run` must refuse at start with the
//! same exit code (64) and message as `check-config`, so systemd does not restart it in
//! a loop (`RestartPreventExitStatus=64`).
//!
//! Nothing here needs a broker: `run` either exits before connecting, or is stopped
//! (SIGTERM) once it has logged what the test looks for.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)] // uses only BIN and set_allowed_roots of the shared helpers
mod common;
use common::{set_allowed_roots, BIN};

const KEY: &str = "fleet-ed25519-public:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const PEM_WRAPPED_GARBAGE: &str =
    "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";

/// A device directory: `etc/agent.toml`, `state/`, `root/` (the allowed root).
struct Device {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Device {
    /// `extra` is placed before `[trust]`: top-level keys, or whole tables.
    fn new(extra: &str) -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).expect("mkdir etc");
        let text = format!(
            "device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = {:?}\nallowed_roots = [{:?}]\n{extra}\n[trust]\npublic_keys = [\"{KEY}\"]\n[engine]\nsocket = \"none\"\n",
            dir.path().join("state").display().to_string(),
            dir.path().join("root").display().to_string(),
        );
        let config = etc.join("agent.toml");
        std::fs::write(&config, text).expect("write config");
        Device { dir, config }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn check_config(&self) -> Output {
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&self.config)
            .output()
            .expect("run fleet-agent")
    }

    fn spawn_run(&self) -> Child {
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("FLEET_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleet-agent run")
    }

    /// `run`, which must exit by itself within 10 s (it is killed otherwise).
    fn run_expecting_exit(&self) -> Output {
        let mut child = self.spawn_run();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!("`run` kept running with this config:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("wait")
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `fleet-agent: ...` line a refused config prints.
fn error_line(out: &Output) -> String {
    stderr(out).lines().find(|l| l.starts_with("fleet-agent: ")).unwrap_or_default().to_string()
}

fn assert_refused(out: &Output, key: &str, paths: &[&Path]) {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(64), "exit 64 expected:\n{text}");
    assert!(text.contains(&format!("`{key}`")), "names {key}:\n{text}");
    for path in paths {
        assert!(text.contains(&path.display().to_string()), "names {}:\n{text}", path.display());
    }
}

/// A device whose `[mqtt]` or `[fetch]` table names `file` under `key`.
fn device_with_file(table: &str, key: &str, text: &str) -> (Device, PathBuf) {
    let probe = Device::new("");
    let file = probe.write("file.pem", text);
    let url = if table == "mqtt" { "url = \"mqtts://127.0.0.1:1\"\n" } else { "" };
    let toml = std::fs::read_to_string(&probe.config)
        .expect("read")
        .replace("[trust]", &format!("[{table}]\n{url}{key} = {file:?}\n[trust]"));
    std::fs::write(&probe.config, toml).expect("write");
    (probe, file)
}

#[test]
fn check_config_refuses_a_garbage_mqtt_ca_file_with_64_naming_key_and_file() {
    let (dev, ca) = device_with_file("mqtt", "ca_file", "garbage, not PEM\n");
    assert_refused(&dev.check_config(), "mqtt.ca_file", &[&ca]);
}

#[test]
fn run_refuses_a_garbage_mqtt_ca_file_at_start_with_the_check_config_message() {
    let (dev, ca) = device_with_file("mqtt", "ca_file", PEM_WRAPPED_GARBAGE);
    let check = dev.check_config();
    assert_refused(&check, "mqtt.ca_file", &[&ca]);
    let run = dev.run_expecting_exit();
    assert_refused(&run, "mqtt.ca_file", &[&ca]);
    assert_eq!(error_line(&run), error_line(&check));
}

#[test]
fn run_refuses_a_garbage_fetch_ca_file_at_start_with_the_check_config_message() {
    let (dev, ca) = device_with_file("fetch", "ca_file", PEM_WRAPPED_GARBAGE);
    let check = dev.check_config();
    assert_refused(&check, "fetch.ca_file", &[&ca]);
    let run = dev.run_expecting_exit();
    assert_refused(&run, "fetch.ca_file", &[&ca]);
    assert_eq!(error_line(&run), error_line(&check));
}

#[test]
fn check_config_refuses_a_client_key_that_does_not_parse() {
    let probe = Device::new("");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let key =
        probe.write("key.pem", "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n");
    let toml = std::fs::read_to_string(&probe.config).expect("read").replace(
        "[trust]",
        &format!(
            "[mqtt]\nurl = \"mqtts://127.0.0.1:1\"\nclient_cert = {:?}\nclient_key = {key:?}\n[trust]",
            fixtures.join("client.pem")
        ),
    );
    std::fs::write(&probe.config, toml).expect("write");
    assert_refused(&probe.check_config(), "mqtt.client_key", &[&key]);
}

const PLAIN_PASSWORD: &str =
    "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nusername = \"gw-01\"\npassword = \"s3cret\"\n";

#[test]
fn check_config_warns_about_a_password_over_plain_mqtt() {
    let dev = Device::new(PLAIN_PASSWORD);
    let out = dev.check_config();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "still valid:\n{text}");
    let warning =
        text.lines().find(|l| l.contains("warning")).unwrap_or_else(|| panic!("no warning:\n{text}"));
    assert!(warning.contains("mqtt.password") && warning.contains("mqtt://"), "{warning}");
    assert!(!text.contains("s3cret"), "the warning must not print the password:\n{text}");

    let tls = Device::new(&PLAIN_PASSWORD.replace("mqtt://", "mqtts://"));
    let out = tls.check_config();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "no warning over TLS:\n{}", stderr(&out));
}

#[test]
fn run_logs_a_warning_about_a_password_over_plain_mqtt_at_start() {
    let dev = Device::new(PLAIN_PASSWORD);
    let mut child = dev.spawn_run();
    let mut pipe = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut text = String::new();
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = tx.send(text.clone());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    while !log.contains("fleet-agent starting") && Instant::now() < deadline {
        if let Ok(text) = rx.recv_timeout(Duration::from_millis(100)) {
            log = text;
        }
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    while let Ok(text) = rx.recv_timeout(Duration::from_millis(200)) {
        log = text;
    }
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("mqtt.password"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(warning.contains("mqtt://"), "{warning}");
    assert!(!log.contains("s3cret"), "the log must not show the password:\n{log}");
}

#[test]
fn check_config_and_run_refuse_an_allowed_root_containing_the_state_dir() {
    let dev = Device::new("");
    // The device's directory as the root: it holds state/ (and etc/).
    let (root, state) = (dev.dir.path().to_path_buf(), dev.path("state"));
    set_allowed_roots(&dev.config, &[&root]);
    let check = dev.check_config();
    assert_refused(&check, "allowed_roots[0]", &[&root, &state]);
    let run = dev.run_expecting_exit();
    assert_refused(&run, "allowed_roots[0]", &[&root, &state]);
    assert_eq!(error_line(&run), error_line(&check));
    assert!(!state.exists(), "refused before the state directory was created");
}

#[test]
fn check_config_refuses_an_allowed_root_that_holds_agent_toml() {
    let dev = Device::new("");
    let etc = dev.path("etc");
    set_allowed_roots(&dev.config, &[&dev.path("root"), &etc]);
    assert_refused(&dev.check_config(), "allowed_roots[1]", &[&etc]);
}

#[test]
fn check_config_accepts_roots_beside_the_state_and_config_dirs() {
    let dev = Device::new("");
    set_allowed_roots(&dev.config, &[&dev.path("root"), &dev.path("state2"), &dev.path("etc2")]);
    let out = dev.check_config();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn agent(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run fleet-agent")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run` for `secs` seconds (then SIGTERM); its stderr.
fn run_for(dev: &Device, secs: u64) -> String {
    let mut child = dev.spawn_run();
    let mut pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_secs(secs));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    reader.join().expect("reader")
}

/// Issue 20, point 6: twelve mistakes, one run. Every problem is listed in file order
/// with line:col and key, and the exit code is 64, for `check-config` and
/// `run` alike; `--json` gives the same list.
#[test]
fn check_config_reports_every_mistake_at_once_in_file_order() {
    let dev = Device::new("");
    let text = std::fs::read_to_string(&dev.config).expect("read");
    let text = text.replace("device = \"gw-01\"", "device = \"gw/01\"").replace("fleet = \"acme\"", "flet = \"acme\"")
        + "\n[mqtt]\nurl = \"tcp://broker\"\nkeepalive_secs = \"30\"\nclientid = \"x\"\n\
           [fetch]\nbase_url = \"ftp://x\"\npoll_interval_secs = -5\n\
           [engine.policy]\nallow_privileged = \"yes\"\nbind_roots = [\"relative\"]\ncapabilities = [1]\ndevice = [\"ttyUSB0\"]\n";
    std::fs::write(&dev.config, &text).expect("write");
    let out = dev.check_config();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    // Types and keys first (values are judged once those are right): every one of them.
    let keys = [
        "flet",
        "mqtt.keepalive_secs",
        "mqtt.clientid",
        "fetch.poll_interval_secs",
        "engine.policy.allow_privileged",
        "engine.policy.capabilities[0]",
        "engine.policy.device",
        "fleet",
    ];
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(": `")).collect();
    assert_eq!(lines.len(), keys.len(), "{err}");
    for (line, key) in lines.iter().zip(keys) {
        assert!(line.contains(&format!("`{key}`")), "{key} expected in order, got {line}\n{err}");
    }
    assert!(err.contains("8 problems"), "{err}");
    assert!(err.contains("did you mean `fleet`?"), "{err}");
    assert!(err.contains("did you mean `client_id`?"), "{err}");
    assert!(err.contains("did you mean `devices`?"), "{err}");
    let config = dev.config.display().to_string();
    assert!(err.contains(&format!("{config}:2:1: `flet`: unknown key at the top level")), "{err}");

    let json = agent(&["check-config", "--json", "--config", &config]);
    assert_eq!(json.status.code(), Some(64));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v["ok"], false);
    let errors = v["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), keys.len(), "{v}");
    assert_eq!((errors[0]["line"].as_u64(), errors[0]["col"].as_u64()), (Some(2), Some(1)), "{v}");
    assert_eq!(errors[0]["key"], "flet");
    let run = dev.run_expecting_exit();
    assert_eq!(run.status.code(), Some(64));
    assert_eq!(stderr(&run).trim_end(), err.trim_end(), "run says the same as check-config");

    // Once keys and types are right, every bad value, in one run too.
    let text = text
        .replace("flet", "fleet")
        .replace("keepalive_secs = \"30\"", "keepalive_secs = 1")
        .replace("clientid", "client_id")
        .replace("= -5", "= 1")
        .replace("\"yes\"", "true")
        .replace("[1]", "[\"NET ADMIN\"]")
        .replace("device = [", "devices = [");
    std::fs::write(&dev.config, &text).expect("write");
    let out = dev.check_config();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for key in [
        "device",
        "mqtt.url",
        "mqtt.keepalive_secs",
        "fetch.base_url",
        "fetch.poll_interval_secs",
        "engine.policy.bind_roots[0]",
        "engine.policy.capabilities[0]",
        "engine.policy.devices[0]",
    ] {
        assert!(err.contains(&format!("`{key}`")), "{key} missing:\n{err}");
    }
    let located = err.lines().filter(|l| l.contains(&format!("{config}:"))).count();
    assert!(located >= 8, "each located:\n{err}");
}

/// Issue 20, point 5: a config that names no broker and no base URL says that bundles
/// only come by sideload; `--json` says what the file configures.
#[test]
fn check_config_says_when_there_is_no_bundle_source() {
    let dev = Device::new("");
    let out = dev.check_config();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no bundle source: only sideloads (fleet-agent apply)"),
        "{}",
        stdout(&out)
    );
    let config = dev.config.display().to_string();
    let out = agent(&["check-config", "--json", "-c", &config]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["configures"]["device"], "gw-01");
    assert_eq!(v["configures"]["bundle_source"], "sideload_only");
    let with_broker = Device::new("[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n");
    assert!(!stdout(&with_broker.check_config()).contains("no bundle source"));
}

/// Issue 20, point 5: a broker that cannot be reached is said once, at WARN, with its
/// address and the error, not retried silently nor logged at every attempt; the same
/// for a base URL whose polls fail.
#[test]
fn run_says_once_that_the_broker_is_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dev = Device::new(&format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_max_secs = 1\n\
         [fetch]\nbase_url = \"http://127.0.0.1:{port}/fleet\"\npoll_interval_secs = 5\n"
    ));
    let log = run_for(&dev, 7);
    // Two polls (at start and 5 s later), one line, naming the URL once.
    let polls: Vec<&str> = log.lines().filter(|l| l.contains("polling failed")).collect();
    assert_eq!(polls.len(), 1, "{log}");
    assert!(polls[0].contains("WARN"), "{log}");
    assert_eq!(polls[0].matches(&format!("127.0.0.1:{port}/fleet/devices/gw-01.json")).count(), 1, "{log}");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("unreachable")).collect();
    assert_eq!(said.len(), 1, "once, however many attempts:\n{log}");
    assert!(said[0].contains("WARN"), "{log}");
    assert!(said[0].contains(&format!("127.0.0.1:{port}")), "names the broker: {log}");
    assert!(said[0].to_lowercase().contains("refused"), "says why: {log}");
    assert!(!log.contains("recovery"), "a clean journal is not news at INFO:\n{log}");
}

/// Issue 20, point 8: each subcommand has its own help (usage, options, exit codes,
/// example); a bad command line exits 64 (EX_USAGE, as fleet-bundler) with a
/// suggestion for a typo.
#[test]
fn each_command_has_its_own_help_and_typos_get_a_suggestion() {
    for (args, head, option) in [
        (&["run", "--help"][..], "fleet-agent run:", "--log-format"),
        (&["apply", "--help"][..], "fleet-agent apply:", "--retry"),
        (&["help", "check-config"][..], "fleet-agent check-config:", "--json"),
        (&["status", "-h"][..], "fleet-agent status:", "--json"),
        (&["forget", "--help"][..], "fleet-agent forget:", "--all"),
    ] {
        let out = agent(args);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(text.starts_with(head), "{args:?}:\n{text}");
        for part in ["USAGE:", option, "EXIT CODES:", "EXAMPLE"] {
            assert!(text.contains(part), "{args:?} lacks {part}:\n{text}");
        }
        assert!(!text.contains("COMMANDS:"), "not the global help:\n{text}");
    }
    let global = stdout(&agent(&["--help"]));
    assert!(
        global.contains("COMMANDS:") && global.contains("64  bad command line, or invalid configuration"),
        "{global}"
    );

    for (args, hint) in [
        (&["aply", "x.bundle"][..], "did you mean `apply`?"),
        (&["check"][..], "did you mean `check-config`?"),
        (&["status", "--jsno"][..], "did you mean `--json`?"),
        (&["run", "--log-fromat", "json"][..], "did you mean `--log-format`?"),
    ] {
        let out = agent(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(hint), "{args:?}: {}", stderr(&out));
    }
    let out = agent(&["run", "--json"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--json is not an option of `run`"), "{}", stderr(&out));
}

/// Issue 20, point 7: a missing file is named, with its OS error said once.
#[test]
fn a_missing_file_is_named_and_its_error_said_once() {
    let dev = Device::new("");
    let missing = dev.path("etc/nope.toml");
    let out = agent(&["check-config", "-c", &missing.display().to_string()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let dev = Device::new("[mqtt]\nurl = \"mqtts://127.0.0.1:1\"\nca_file = \"missing-ca.pem\"\n");
    let err = stderr(&dev.check_config());
    assert!(err.contains("missing-ca.pem"), "names the file: {err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let dev = Device::new(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nusername = \"u\"\npassword_file = \"missing-pw\"\n",
    );
    let err = stderr(&dev.check_config());
    assert!(err.contains("missing-pw"), "names the file: {err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let dev = Device::new("");
    let text = std::fs::read_to_string(&dev.config).expect("read").replace(KEY, "keys/missing.pub");
    std::fs::write(&dev.config, text).expect("write");
    let err = stderr(&dev.check_config());
    assert!(err.contains("missing.pub"), "names the file: {err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

/// Issue 20, point 6, literally: twelve mistakes of every kind (unknown keys, types,
/// values), one run, in file order.
#[test]
fn twelve_mistakes_are_reported_in_one_run() {
    let dev = Device::new("");
    let text = std::fs::read_to_string(&dev.config).expect("read");
    let text = text
        .replace("device = \"gw-01\"", "device = \"gw/01\"\nlog_levle = \"debug\"\nlog_format = \"xml\"")
        + "\n[mqtt]\nurl = \"tcp://broker\"\nkeepalive_secs = \"30\"\nclientid = \"x\"\n\
           [fetch]\nbase_url = \"ftp://x\"\npoll_interval_secs = -5\ntimeout_secs = 0\n\
           [engine.policy]\nallow_privileged = \"yes\"\nbind_roots = [\"relative\"]\ndevice = [\"/dev/x\"]\n";
    std::fs::write(&dev.config, &text).expect("write");
    let out = dev.check_config();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let want = [
        "device",
        "log_levle",
        "log_format",
        "mqtt.url",
        "mqtt.keepalive_secs",
        "mqtt.clientid",
        "fetch.base_url",
        "fetch.poll_interval_secs",
        "fetch.timeout_secs",
        "engine.policy.allow_privileged",
        "engine.policy.bind_roots[0]",
        "engine.policy.device",
    ];
    assert!(err.contains("12 problems"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(": `")).collect();
    assert_eq!(lines.len(), want.len(), "{err}");
    let config = dev.config.display().to_string();
    for (line, key) in lines.iter().zip(want) {
        assert!(line.contains(&format!("`{key}`")), "{key} expected in file order, got {line}\n{err}");
        assert!(line.trim_start().starts_with(&format!("{config}:")), "located: {line}");
    }
}
