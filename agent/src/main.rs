//! `fleet-agent`: parse arguments, load the config (exit 64 when invalid), wire the
//! adapters, run, and map the outcome to a documented exit code (see `--help`).

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;

use fleet_agent::agent::{Agent, Outcome};
use fleet_agent::cli::{self, exit, Command};
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
        Command::Help => {
            print!("{}", cli::HELP);
            return ExitCode::from(exit::OK);
        }
        Command::Version => {
            println!("fleet-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::from(exit::OK);
        }
        _ => {}
    }
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    init_logging(&cfg, cli.log_format);
    let code = match cli.command {
        Command::CheckConfig => check_config(&cfg, &cli.config),
        Command::Status { json } => status(&cfg, json),
        Command::Run => with_runtime(run(cfg)),
        Command::Apply { bundle } => with_runtime(apply(cfg, &bundle)),
        Command::Help | Command::Version => unreachable!("handled above"),
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
    }
}

async fn run(cfg: Config) -> u8 {
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let engine = Rc::new(engine_for(&cfg));
    match fleet_agent::run::run(cfg, engine, Rc::new(SystemClock), shutdown_signal()).await {
        Ok(()) => exit::OK,
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

async fn apply(cfg: Config, bundle: &Path) -> u8 {
    let bytes = match std::fs::read(bundle) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fleet-agent: cannot read bundle {}: {e}", bundle.display());
            return exit::NO_INPUT;
        }
    };
    let store = Store::new(&cfg.state_dir);
    let lock = store.create().and_then(|()| store.lock());
    let _lock = match lock {
        Ok(l) => l,
        Err(StoreError::Locked { .. }) => return apply_through_daemon(&cfg, &bytes).await,
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            return exit::FAILURE;
        }
    };
    let engine = Rc::new(engine_for(&cfg));
    if !engine.is_none() {
        if let Err(e) = engine.ping().await {
            tracing::warn!("{e}");
        }
    }
    let mut agent = match Agent::new(cfg, engine, Rc::new(SystemClock), None) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            return exit::FAILURE;
        }
    };
    if let Err(e) = agent.recover().await {
        eprintln!("fleet-agent: recovery before applying failed: {e}");
        return exit::FAILURE;
    }
    match agent.apply_bundle(&bytes).await {
        Ok(outcome) => report_outcome(&outcome),
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            exit::FAILURE
        }
    }
}

/// `apply` while `run` holds the state directory: the running agent applies the bundle
/// (`sideload`), on the same path, and answers with the outcome.
async fn apply_through_daemon(cfg: &Config, bytes: &[u8]) -> u8 {
    use fleet_agent::sideload::{self, Reply, SideloadError};
    eprintln!("fleet-agent: the agent service is running: handing the bundle to it");
    match sideload::submit(&cfg.state_dir, bytes).await {
        Ok(Reply::Outcome(outcome)) => report_outcome(&outcome),
        Ok(Reply::Error(e)) => {
            eprintln!("fleet-agent: the running agent could not apply the bundle: {e}");
            exit::FAILURE
        }
        Err(e @ SideloadError::NotListening { .. }) => {
            eprintln!(
                "fleet-agent: the state directory {} is locked by a running agent, and {e}; \
                 stop the service (systemctl stop fleet-agent) and run apply again",
                cfg.state_dir.display()
            );
            exit::TEMPFAIL
        }
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            exit::FAILURE
        }
    }
}

/// Prints how an apply ended and returns its exit code (the same for a local apply and
/// one made by the running agent).
fn report_outcome(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Committed { version } => {
            println!("applied version {version}: converged");
            exit::OK
        }
        Outcome::AlreadyApplied => {
            println!("already applied: nothing to do");
            exit::OK
        }
        Outcome::Rejected { code, reason } => {
            eprintln!("fleet-agent: bundle rejected ({code}): {reason}; nothing was changed");
            exit::REJECTED
        }
        Outcome::Deferred { code, reason } if code == "engine_unavailable" => {
            eprintln!("fleet-agent: {reason}; nothing was changed");
            exit::UNAVAILABLE
        }
        Outcome::Deferred { code, reason } => {
            eprintln!("fleet-agent: not applied ({code}): {reason}; nothing was changed, try again");
            exit::TEMPFAIL
        }
        Outcome::RolledBack { code, reason } => {
            eprintln!("fleet-agent: the bundle was applied but failed ({code}): {reason}; rolled back to the last good state");
            exit::FAILURE
        }
        Outcome::RollbackIncomplete { code, reason } => {
            eprintln!("fleet-agent: the bundle failed ({code}): {reason}; the rollback is incomplete and resumes on the next start");
            exit::FAILURE
        }
    }
}

fn status(cfg: &Config, json: bool) -> u8 {
    let store = Store::new(&cfg.state_dir);
    match fleet_agent::report::collect(&cfg.device, &cfg.fleet, &store) {
        Ok(s) if json => {
            println!("{}", serde_json::to_string_pretty(&s).expect("status serializes"));
            exit::OK
        }
        Ok(s) => {
            print!("{}", fleet_agent::report::render(&s));
            exit::OK
        }
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            exit::FAILURE
        }
    }
}

fn check_config(cfg: &Config, path: &Path) -> u8 {
    for warning in cfg.warnings() {
        eprintln!("fleet-agent: warning: {warning}");
    }
    println!("{}: ok", path.display());
    println!(
        "  device        {} (fleet {}, topics {}/{}/devices/{}/...)",
        cfg.device, cfg.fleet, cfg.topic_prefix, cfg.fleet, cfg.device
    );
    let ids: Vec<String> = cfg.trusted.keys().iter().map(|k| k.id().to_string()).collect();
    println!("  trust         {} of [{}]", cfg.trusted.threshold(), ids.join(", "));
    println!("  state_dir     {}", cfg.state_dir.display());
    let roots: Vec<String> = cfg.allowed_roots.iter().map(|r| r.display().to_string()).collect();
    println!("  allowed_roots [{}]", roots.join(", "));
    match &cfg.mqtt {
        Some(m) => println!(
            "  mqtt          {}://{}:{} as {}",
            if m.tls { "mqtts" } else { "mqtt" },
            m.host,
            m.port,
            m.client_id
        ),
        None => println!("  mqtt          none (poll only)"),
    }
    match &cfg.fetch.base_url {
        Some(u) => println!(
            "  fetch         {} every {} s",
            fetch::pointer_url(u, &cfg.device),
            cfg.fetch.poll_interval.as_secs()
        ),
        None => println!("  fetch         announcement URLs only"),
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
