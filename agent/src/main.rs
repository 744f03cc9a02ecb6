//! `fleet-agent`: parse arguments (exit 64 when wrong), load the config (exit 64 when
//! invalid, with every problem listed), wire the
//! adapters, run, and map the outcome to a documented exit code (see `--help`).

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;

use fleet_agent::agent::CONFIG_CAUSED;
use fleet_agent::agent::{Agent, Outcome};
use fleet_agent::cli::{self, exit, Command, Forget, IdentityAction};
use fleet_agent::clock::SystemClock;
use fleet_agent::config::{Config, LogFormat};
use fleet_agent::engine::docker::DockerEngine;
use fleet_agent::engine::Engine;
use fleet_agent::engines::{AnyEngine, NoEngine};
use fleet_agent::fetch;
use fleet_agent::store::{Store, StoreError};

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    match cli.command {
        Command::Help(topic) => {
            print!("{}", cli::help(topic));
            return ExitCode::from(exit::OK);
        }
        Command::Version => {
            println!("fleet-agent {}", fleet_agent::agent::version());
            return ExitCode::from(exit::OK);
        }
        Command::Identity { json, state_dir: Some(ref dir), ref action } => {
            return ExitCode::from(identity(None, dir, json, action))
        }
        _ => {}
    }
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            if matches!(cli.command, Command::CheckConfig { json: true }) {
                let out = serde_json::json!({
                    "ok": false,
                    "config": cli.config.display().to_string(),
                    "errors": e.problems,
                });
                println!("{out:#}");
            } else {
                eprintln!("fleet-agent: {e}");
            }
            return ExitCode::from(exit::CONFIG);
        }
    };
    init_logging(&cfg, cli.log_format);
    let code = match cli.command {
        Command::CheckConfig { json } => check_config(&cfg, &cli.config, json),
        Command::Status { json } => status(&cfg, json),
        Command::Forget(target) => forget(&cfg, &target),
        Command::Identity { json, ref action, .. } => {
            identity(Some(&cfg.device), &cfg.state_dir, json, action)
        }
        Command::Enroll { json, timeout } => with_runtime(enroll(&cfg, json, timeout)),
        Command::Run => with_runtime(run(cfg)),
        Command::Launch => launch(&cfg, &cli.config, cli.log_format),
        Command::Apply { bundle, json, retry } => with_runtime(apply(cfg, &bundle, json, retry)),
        Command::Help(_) | Command::Version => unreachable!("handled above"),
    };
    ExitCode::from(code)
}

fn init_logging(cfg: &Config, format: Option<LogFormat>) {
    let level = std::env::var("FLEET_LOG")
        .ok()
        .and_then(|v| fleet_agent::config::parse_level(&v).ok())
        .unwrap_or(cfg.log_level);
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(ansi);
    let _ = match format.unwrap_or(cfg.log_format) {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

fn with_runtime(fut: impl std::future::Future<Output = u8>) -> u8 {
    // Current-thread: the agent does one thing at a time and must stay small.
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("fleet-agent: cannot start the async runtime: {e}");
            exit::FAILURE
        }
    }
}

fn engine_for(cfg: &Config) -> AnyEngine {
    match &cfg.engine_socket {
        Some(socket) => AnyEngine::Docker(DockerEngine::new(socket.clone())),
        None => AnyEngine::None(NoEngine),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = launcher_gone() => tracing::warn!("the launcher that started this agent is gone: stopping"),
    }
}

/// Resolves when this agent was started by `fleet-agent launch` and that launcher has
/// died (the agent is re-parented): an agent left behind would hold the state
/// directory, and the launcher started again could run no agent at all. systemd kills
/// the whole unit anyway; this covers a launcher killed alone under another supervisor.
/// A poll every 2 s: no signal reaches a child when its parent dies, short of
/// `PR_SET_PDEATHSIG`, which needs `unsafe` in the child.
async fn launcher_gone() {
    if std::env::var_os(fleet_agent::launch::ENV_LAUNCHER).is_none_or(|v| v != "1") {
        return std::future::pending().await;
    }
    let launcher = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != launcher {
            return;
        }
    }
}

/// `launch`: the self-update supervisor runs `run` with the same config.
fn launch(cfg: &Config, config: &Path, log_format: Option<LogFormat>) -> u8 {
    let fallback = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("fleet-agent: cannot find this executable ({e}): run `fleet-agent run` instead");
            return exit::FAILURE;
        }
    };
    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into(), config.into()];
    if let Some(format) = log_format {
        let name = match format {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        };
        args.extend(["--log-format".into(), name.into()]);
    }
    let opts = fleet_agent::launch::LaunchOptions {
        dir: fleet_agent::launch::dir(&cfg.state_dir),
        fallback,
        fallback_version: fleet_agent::agent::version().to_string(),
        args,
        trial: cfg.updates.agent_trial,
    };
    fleet_agent::launch::launch(&opts)
}

async fn run(cfg: Config) -> u8 {
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let engine = Rc::new(engine_for(&cfg));
    match fleet_agent::run::run(cfg, engine, Rc::new(SystemClock), shutdown_signal()).await {
        Ok(fleet_agent::run::Stopped::Shutdown) => exit::OK,
        Ok(fleet_agent::run::Stopped::SwitchAgent) => fleet_agent::launch::EXIT_SWITCH,
        Err(fleet_agent::run::RunError::Store(e @ StoreError::Locked { .. })) => {
            eprintln!("fleet-agent: {e}");
            exit::TEMPFAIL
        }
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            exit::FAILURE
        }
    }
}

async fn apply(cfg: Config, bundle: &Path, json: bool, retry: bool) -> u8 {
    let store = Store::new(&cfg.state_dir);
    let created = store.create();
    // A bundle, or an export file whose artifacts are stored on the way.
    let bytes = match fleet_agent::export::open(bundle, &cfg, &store) {
        Ok(opened) => {
            if opened.imported > 0 {
                eprintln!(
                    "fleet-agent: stored {} artifact(s), {} bytes, from {}",
                    opened.imported,
                    opened.imported_bytes,
                    bundle.display()
                );
            }
            opened.bundle
        }
        Err(fleet_agent::export::ExportError::Io { path, source }) => {
            let reason = format!("cannot read bundle {}: {source}", path.display());
            return fail(json, None, "no_input", &reason, exit::NO_INPUT);
        }
        Err(e @ fleet_agent::export::ExportError::Import(fleet_agent::store::ImportError::Io { .. })) => {
            return fail(json, None, "state_dir_error", &e.to_string(), exit::FAILURE)
        }
        Err(e) => return fail(json, None, "bad_export", &e.to_string(), exit::REJECTED),
    };
    let digest = fleet_spec::bundle::content_address(&bytes);
    let lock = created.and_then(|()| store.lock());
    if retry {
        // Under the lock, or beside a running agent, which reads rejected.json afresh
        // for every bundle it is offered.
        match store.forget_rejected(Some(&digest)) {
            Ok(0) => {}
            Ok(_) => eprintln!("fleet-agent: forgot the earlier rejection of {digest}: judging it again"),
            Err(e) => return fail(json, Some(&digest), "state_dir_error", &e.to_string(), exit::FAILURE),
        }
    }
    let _lock = match lock {
        Ok(l) => l,
        Err(StoreError::Locked { .. }) => return apply_through_daemon(&cfg, &bytes, &digest, json).await,
        Err(e) => return fail(json, Some(&digest), "state_dir_error", &e.to_string(), exit::FAILURE),
    };
    let engine = Rc::new(engine_for(&cfg));
    if !engine.is_none() {
        if let Err(e) = engine.ping().await {
            // Said in the outcome if the bundle needs the engine; a files-only bundle
            // applies without it.
            tracing::debug!("{e}");
        }
    }
    let mut agent = match Agent::new(cfg, engine, Rc::new(SystemClock), None) {
        Ok(a) => a,
        Err(e) => return fail(json, Some(&digest), e.code(), &e.to_string(), exit::FAILURE),
    };
    if let Err(e) = agent.recover().await {
        let reason = format!("recovery before applying failed: {e}");
        return fail(json, Some(&digest), e.code(), &reason, exit::FAILURE);
    }
    match agent.apply_bundle_now(&bytes).await {
        Ok(outcome) => {
            let version = agent.store().applied().ok().flatten().map(|a| a.version);
            report_outcome(&outcome, &digest, version, json)
        }
        Err(e) => fail(json, Some(&digest), e.code(), &e.to_string(), exit::FAILURE),
    }
}

/// `apply` ends without an outcome: says why (as JSON with `--json`), returns `code`.
fn fail(json: bool, digest: Option<&str>, code: &str, reason: &str, exit_code: u8) -> u8 {
    if json {
        let out = serde_json::json!({"outcome": "error", "digest": digest, "code": code, "reason": reason});
        println!("{out}");
    } else {
        eprintln!("fleet-agent: {reason}");
    }
    exit_code
}

/// `apply` while `run` holds the state directory: the running agent applies the bundle
/// (`sideload`), on the same path, and answers with the outcome.
async fn apply_through_daemon(cfg: &Config, bytes: &[u8], digest: &str, json: bool) -> u8 {
    use fleet_agent::sideload::{self, Reply, SideloadError};
    eprintln!("fleet-agent: the agent service is running: handing the bundle to it");
    match sideload::submit(&cfg.state_dir, bytes).await {
        Ok(Reply::Outcome(outcome)) => {
            let version = Store::new(&cfg.state_dir).applied().ok().flatten().map(|a| a.version);
            report_outcome(&outcome, digest, version, json)
        }
        Ok(Reply::Error(e)) => {
            let reason = format!("the running agent could not apply the bundle: {e}");
            fail(json, Some(digest), "agent_error", &reason, exit::FAILURE)
        }
        Err(e @ SideloadError::NotListening { .. }) => {
            let reason = format!(
                "the state directory {} is locked by a running agent, and {e}; \
                 stop the service (systemctl stop fleet-agent) and run apply again",
                cfg.state_dir.display()
            );
            fail(json, Some(digest), "locked", &reason, exit::TEMPFAIL)
        }
        Err(e) => fail(json, Some(digest), "sideload_failed", &e.to_string(), exit::FAILURE),
    }
}

/// Prints how an apply ended and returns its exit code (the same for a local apply and
/// one made by the running agent). `version` is the applied one after the apply.
fn report_outcome(outcome: &Outcome, digest: &str, version: Option<u64>, json: bool) -> u8 {
    let code = match outcome {
        Outcome::Committed { .. } | Outcome::AlreadyApplied => exit::OK,
        Outcome::Rejected { .. } => exit::REJECTED,
        Outcome::Deferred { code, .. } if code == "engine_unavailable" => exit::UNAVAILABLE,
        // A sideload applies at once; only the daemon's own fetches wait.
        Outcome::Deferred { .. } | Outcome::Waiting { .. } => exit::TEMPFAIL,
        Outcome::RolledBack { .. } | Outcome::RollbackIncomplete { .. } => exit::FAILURE,
    };
    if json {
        let version = match outcome {
            Outcome::Committed { version } => Some(*version),
            _ => version,
        };
        let out = serde_json::json!({
            "outcome": outcome.name(),
            "digest": digest,
            // committed / already applied: the version now applied; otherwise the one
            // the device still runs.
            "version": version,
            "code": outcome.code(),
            "reason": outcome.reason(),
        });
        println!("{out}");
        return code;
    }
    match outcome {
        Outcome::Committed { version } => println!("applied version {version}: converged"),
        Outcome::AlreadyApplied => println!("already applied: nothing to do"),
        Outcome::Rejected { code, reason } => {
            eprintln!("fleet-agent: bundle rejected ({code}): {reason}; nothing was changed");
            if CONFIG_CAUSED.contains(&code.as_str()) {
                eprintln!(
                    "fleet-agent: this refusal comes from this device's agent.toml: once it allows \
                     the bundle, the bundle is judged again by itself"
                );
            } else {
                eprintln!("fleet-agent: to judge it again: fleet-agent apply --retry, or fleet-agent forget {digest}");
            }
        }
        Outcome::Deferred { code, reason } if code == "engine_unavailable" => {
            eprintln!("fleet-agent: {reason}; nothing was changed")
        }
        Outcome::Deferred { code, reason } => {
            eprintln!("fleet-agent: not applied ({code}): {reason}; nothing was changed, try again")
        }
        Outcome::Waiting { .. } => eprintln!(
            "fleet-agent: verified, waiting ({}): {}; applied by the agent when the wait ends",
            outcome.code().unwrap_or_default(),
            outcome.reason().unwrap_or_default()
        ),
        Outcome::RolledBack { code, reason } => eprintln!(
            "fleet-agent: the bundle was applied but failed ({code}): {reason}; rolled back to the last good state"
        ),
        Outcome::RollbackIncomplete { code, reason } => eprintln!(
            "fleet-agent: the bundle failed ({code}): {reason}; the rollback is incomplete and resumes on the next start"
        ),
    }
    code
}

/// `identity`: prints the device's keys, made on first use; `--rotate`, `--retire`.
fn identity(device: Option<&str>, state_dir: &Path, json: bool, action: &IdentityAction) -> u8 {
    use fleet_agent::identity::{self as id, IdentityError};
    let now = fleet_agent::clock::Clock::now(&SystemClock);
    if let Err(e) = Store::new(state_dir).create() {
        eprintln!("fleet-agent: {e}");
        return exit::FAILURE;
    }
    let result = match action {
        IdentityAction::Show => id::load_or_create(state_dir, now)
            .and_then(|(_, created)| Ok((id::load_all(state_dir)?, created))),
        IdentityAction::Rotate => id::rotate(state_dir, now).map(|keys| (keys, false)),
        IdentityAction::Retire(key_id) => id::retire(state_dir, key_id).map(|keys| (keys, false)),
    };
    let (keys, created) = match result {
        Ok(r) => r,
        Err(e @ IdentityError::Refused { .. }) => {
            eprintln!("fleet-agent: {e}");
            return exit::USAGE;
        }
        Err(e @ IdentityError::Missing { .. }) => {
            eprintln!("fleet-agent: {e}");
            return exit::FAILURE;
        }
        Err(e) => {
            eprintln!(
                "fleet-agent: {e} (the identity file is never replaced: move it away to make a new key)"
            );
            return exit::FAILURE;
        }
    };
    let current = &keys[0];
    if json {
        let list: Vec<serde_json::Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| serde_json::json!({"recipient": k.recipient(), "key_id": k.key_id(), "current": i == 0}))
            .collect();
        let out = serde_json::json!({
            "device": device,
            "recipient": current.recipient(),
            "key_id": current.key_id(),
            "created": created,
            "keys": list,
        });
        println!("{out:#}");
        return exit::OK;
    }
    let file = state_dir.join(id::FILE);
    match action {
        IdentityAction::Show if created => eprintln!("made a new identity in {}", file.display()),
        IdentityAction::Show => {}
        IdentityAction::Rotate => eprintln!(
            "made a new key in {} and kept the old one: publish both with `fleet-agent enroll`, accept the \
             claim in the fleet repository (fleet-bundler enroll accept), and retire the old key once \
             devices/<id>.yaml no longer lists it",
            file.display()
        ),
        IdentityAction::Retire(key_id) => eprintln!("retired key {key_id} from {}", file.display()),
    }
    if let Some(device) = device {
        println!("device:    {device}");
    }
    println!("recipient: {}\nkey id:    {}", current.recipient(), current.key_id());
    if keys.len() > 1 {
        println!("keys (newest first; the first is the current one):");
        for (i, k) in keys.iter().enumerate() {
            println!("  {}  {}{}", k.key_id(), k.recipient(), if i == 0 { "  (current)" } else { "" });
        }
    }
    exit::OK
}

/// `enroll`: publishes the claim; 75 when the broker does not acknowledge it in time.
async fn enroll(cfg: &Config, json: bool, timeout: std::time::Duration) -> u8 {
    use fleet_agent::enroll::{self, EnrollError};
    if let Err(e) = Store::new(&cfg.state_dir).create() {
        eprintln!("fleet-agent: {e}");
        return exit::FAILURE;
    }
    let now = fleet_agent::clock::Clock::now(&SystemClock);
    match enroll::enroll(cfg, now, timeout).await {
        Ok(done) => {
            if json {
                let out = serde_json::json!({"topic": done.topic, "claim": done.claim});
                println!("{out:#}");
            } else {
                println!("published the enrollment claim of {} on {} (retained)", cfg.device, done.topic);
                println!("key id:     {}", done.claim.key_id);
                for r in &done.claim.recipients {
                    println!("recipient:  {r}");
                }
                println!(
                    "next, in the fleet repository: fleet-bundler enroll list --broker URL --repo . (check that \
                     it shows key id {}), then fleet-bundler enroll accept {} --broker URL --repo .",
                    done.claim.key_id, cfg.device
                );
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            match e {
                EnrollError::Timeout { .. } => exit::TEMPFAIL,
                EnrollError::NoBroker | EnrollError::Topic(_) => exit::CONFIG,
                _ => exit::FAILURE,
            }
        }
    }
}

fn forget(cfg: &Config, target: &Forget) -> u8 {
    let store = Store::new(&cfg.state_dir);
    // Held when no agent runs; a running agent reads rejected.json afresh for every
    // bundle it is offered, so the change is seen without a restart.
    let _lock = store.lock().ok();
    let digest = match target {
        Forget::Digest(d) => Some(d.as_str()),
        Forget::All => None,
    };
    match store.forget_rejected(digest) {
        Ok(0) => {
            match digest {
                Some(d) => println!("nothing to forget: {d} is not in the rejected set"),
                None => println!("nothing to forget: the rejected set is empty"),
            }
            exit::OK
        }
        Ok(n) => {
            println!("forgot {n} rejected bundle(s): judged again at the next announcement, poll or apply");
            exit::OK
        }
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            exit::FAILURE
        }
    }
}

fn status(cfg: &Config, json: bool) -> u8 {
    let store = Store::new(&cfg.state_dir);
    let current = fleet_agent::agent::config_fingerprint(cfg);
    let collected = fleet_agent::report::collect(&cfg.device, &cfg.fleet, &store).map(|mut s| {
        // Refusals of another config no longer hold (the agent forgets them at start).
        s.rejected.retain(|_, r| r.config.as_ref().is_none_or(|c| *c == current));
        s
    });
    match collected {
        Ok(s) if json => {
            println!("{}", serde_json::to_string_pretty(&s).expect("status serializes"));
            exit::OK
        }
        Ok(s) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            print!("{}", fleet_agent::report::render(&s, now));
            exit::OK
        }
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            exit::FAILURE
        }
    }
}

fn check_config(cfg: &Config, path: &Path, json: bool) -> u8 {
    let warnings = cfg.warnings();
    let ids: Vec<String> = cfg.trusted.keys().iter().map(|k| k.id().to_string()).collect();
    let roots: Vec<String> = cfg.allowed_roots.iter().map(|r| r.display().to_string()).collect();
    let mqtt = cfg
        .mqtt
        .as_ref()
        .map(|m| format!("{}://{}:{}", if m.tls { "mqtts" } else { "mqtt" }, m.host, m.port));
    let pointer = cfg.fetch.base_url.as_ref().map(|u| fetch::pointer_url(u, &cfg.device));
    // Without a broker and a base URL nothing ever tells the agent about a bundle.
    let sideload_only = cfg.mqtt.is_none() && pointer.is_none();
    if json {
        let out = serde_json::json!({
            "ok": true,
            "config": path.display().to_string(),
            "errors": [],
            "warnings": warnings,
            "configures": {
                "device": cfg.device,
                "fleet": cfg.fleet,
                "topics": format!("{}/{}/devices/{}/", cfg.topic_prefix, cfg.fleet, cfg.device),
                "trust": {"threshold": cfg.trusted.threshold(), "keys": ids},
                "state_dir": cfg.state_dir,
                "allowed_roots": roots,
                "mqtt": mqtt,
                "mqtt_client_id": cfg.mqtt.as_ref().map(|m| &m.client_id),
                "fetch": pointer,
                "poll_interval_secs": cfg.fetch.poll_interval.as_secs(),
                "bundle_source": if sideload_only { "sideload_only" } else { "network" },
                "engine": cfg.engine_socket,
                "reconcile_interval_secs": cfg.reconcile_interval.as_secs(),
                "health_timeout_secs": cfg.health_timeout.as_secs(),
            },
        });
        println!("{out:#}");
        return exit::OK;
    }
    for warning in &warnings {
        eprintln!("fleet-agent: warning: {warning}");
    }
    println!("{}: ok", path.display());
    println!(
        "  device        {} (fleet {}, topics {}/{}/devices/{}/...)",
        cfg.device, cfg.fleet, cfg.topic_prefix, cfg.fleet, cfg.device
    );
    println!("  trust         {} of [{}]", cfg.trusted.threshold(), ids.join(", "));
    println!("  state_dir     {}", cfg.state_dir.display());
    println!("  allowed_roots [{}]", roots.join(", "));
    match (&mqtt, &cfg.mqtt) {
        (Some(url), Some(m)) => println!("  mqtt          {url} as {}", m.client_id),
        _ => println!("  mqtt          none"),
    }
    match &pointer {
        Some(u) => println!("  fetch         {u} every {} s", cfg.fetch.poll_interval.as_secs()),
        None if cfg.mqtt.is_some() => println!("  fetch         announcement URLs only"),
        None => println!("  fetch         none"),
    }
    if sideload_only {
        println!("  source        no bundle source: only sideloads (fleet-agent apply)");
    }
    match &cfg.engine_socket {
        Some(s) => println!("  engine        {}", s.display()),
        None => println!("  engine        none (files only)"),
    }
    println!(
        "  timers        reconcile {} s, health timeout {} s",
        cfg.reconcile_interval.as_secs(),
        cfg.health_timeout.as_secs()
    );
    exit::OK
}
