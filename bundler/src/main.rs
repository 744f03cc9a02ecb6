//! `fleet-bundler`: the command line. Parses arguments, wires the library modules
//! together and maps outcomes to the documented exit codes. No logic of its own
//! beyond presentation.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use fleet_spec::bundle::{self, Expectation, Limits, TrustState, TrustedKeys};
use fleet_spec::keys::file as keyfile;
use fleet_spec::{PublicKey, SigningKey};

use fleet_bundler::build::{self, BuildOptions};
use fleet_bundler::diag::{self, Diagnostic};
use fleet_bundler::registry::{self, Registry};
use fleet_bundler::{duration, exporter, mqtt, plan, previous, render, repo, timefmt};

/// Exit codes, also listed in `--help` and the README.
mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const CHANGES: u8 = 2;
    pub const DEVICE_FAILED: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const NOT_NEWER: u8 = 5;
    pub const USAGE: u8 = 64;
    pub const INVALID_REPO: u8 = 65;
}

#[derive(Parser)]
#[command(
    name = "fleet-bundler",
    version,
    about = "Turns a fleet Git repository into signed per-device bundles, announces them over MQTT and gates CI on fleet status.",
    after_help = concat!("Typical CI flow:
  fleet-bundler validate --repo .
  fleet-bundler plan --repo . --from origin/main --to HEAD
  fleet-bundler build --repo . --rev HEAD --key signing.key --out out/
  fleet-bundler publish --out out/ --broker mqtts://broker:8883 --base-url https://cdn.example/fleet
  fleet-bundler status --broker mqtts://broker:8883 --index out/index.json --selector channel=canary --wait --timeout 10m

Repository format and rules: bundler/README.md

Exit codes:
  0   success (plan: no changes; status --wait: every device converged)
  1   failure: I/O, Git, keys, registry, broker, or a bundle that does not verify
  2   plan: there are changes
  3   status --wait: a device failed or rolled back on the indexed version
  4   status --wait: timeout before every device converged
  5   publish: the broker retains a version for a device that this build's is not newer than (nothing published)
  64  usage error (bad flags)
  65  the repository is invalid (validation errors are printed with file:line:column)")
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a signing key pair: DIR/signing.key (0600) and DIR/signing.pub.
    #[command(
        after_help = "Example:\n  fleet-bundler keygen --out keys/\n\nPut the one line of signing.key into a CI secret (FLEET_SIGNING_KEY) and signing.pub into every agent's trusted keys.\n\nExit codes: 0 ok, 1 failure (e.g. the key files exist already)."
    )]
    Keygen {
        /// Directory for the key files (created if needed; existing keys are never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a repository revision: every file, every device; all problems at once.
    #[command(
        after_help = "Examples:\n  fleet-bundler validate --repo .\n  fleet-bundler validate --repo /srv/git/fleet.git --rev feature/x --json\n\nExit codes: 0 valid (warnings allowed), 65 invalid (each problem printed as file:line:column), 1 failure (Git, I/O), 64 usage."
    )]
    Validate {
        #[command(flatten)]
        source: Source,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Render, sign and write every device's bundle, DIR/index.json, DIR/devices/<id>.json and the live dashboard DIR/dashboard/.
    #[command(
        after_help = "Examples:\n  fleet-bundler build --repo . --key keys/signing.key --out out/\n  FLEET_SIGNING_KEY=\"$KEY\" fleet-bundler build --repo . --rev v1.2 --out out/ --resolve-digests --json\n  fleet-bundler build --repo . --key keys/signing.key --out out/ --previous https://cdn.example/fleet\n  fleet-bundler build --repo . --key keys/signing.key --out out/ --dashboard-broker wss://broker.example.com:8084/mqtt\n\nReuse the same --out directory across builds: unchanged devices keep their bundle and version.\nWithout it (no CI cache), pass --previous with the published output: versions stay newer than what devices hold.\nA commit dated more than 5 minutes ahead of this machine's clock, or whose bundles would already be expired, is refused (exit 1).\nUpload DIR as is: agents poll DIR/devices/<their id>.json and fetch DIR/bundles/<digest>.bundle.\nDIR/dashboard/index.html is a static live view of the fleet (open it from disk or any static server; it reads the broker over MQTT-over-WebSockets).\nThe signing key may also come from the environment: FLEET_SIGNING_KEY=<the line of signing.key>.\n\nExit codes: 0 built, 65 invalid repository (nothing written), 1 failure (Git, key, registry, I/O, --previous, a commit dated in the future or already expired; nothing written), 64 usage."
    )]
    Build(BuildArgs),
    /// Show what changes per device between two revisions (secrets-free).
    #[command(
        after_help = "Examples:\n  fleet-bundler plan --repo . --from origin/main --to HEAD\n  fleet-bundler plan --repo . --from v1 --to v2 --json\n\nExit codes: 0 no changes, 2 changes, 65 a revision is invalid, 1 failure, 64 usage."
    )]
    Plan {
        /// Repository: a clone, a bare repository or its .git directory.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// The revision deployed now.
        #[arg(long)]
        from: String,
        /// The revision to deploy.
        #[arg(long, default_value = "HEAD")]
        to: String,
        /// Print the plan as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Lines of context around each change in file diffs.
        #[arg(long, default_value_t = 3)]
        context: usize,
        #[command(flatten)]
        limits: ReadLimits,
    },
    /// Announce changed bundles over MQTT (retained, QoS 1, confirmed).
    #[command(
        after_help = "Examples:\n  fleet-bundler publish --out out/ --broker mqtt://127.0.0.1:1883 --base-url http://files.local/fleet\n  fleet-bundler publish --out out/ --broker mqtts://broker:8883 --ca-file ca.pem --username ci --blobs-over-mqtt\n\nOnly devices whose bundle changed since the last publish from this directory (DIR/published.json) are announced; --force announces all.\nThe retained announcements are read first: a device whose retained version is newer than this build's (or equal with another bundle) would refuse it, so nothing is published (exit 5).\n\nExit codes: 0 every announcement acknowledged, 5 a device already has a newer (or equal) version (nothing published; rebuild with --previous), 1 failure (broker unreachable or refused, timeout, missing index), 64 usage."
    )]
    Publish(mqtt::PublishArgs),
    /// Check a bundle exactly as a device would and print its manifest.
    #[command(
        after_help = "Examples:\n  fleet-bundler verify --pub keys/signing.pub out/bundles/<digest>.bundle\n  fleet-bundler verify --pub a.pub --pub b.pub --threshold 2 --json bundle\n\nExit codes: 0 the bundle verifies, 1 it does not (the reason code is printed, e.g. (expired), (unknown_key)), 64 usage."
    )]
    Verify {
        /// A trusted public key file (repeatable).
        #[arg(long = "pub", required = true)]
        pubs: Vec<PathBuf>,
        /// How many distinct trusted keys must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Expected fleet (default: the one the manifest names).
        #[arg(long)]
        fleet: Option<String>,
        /// Expected device (default: the one the manifest names).
        #[arg(long)]
        device: Option<String>,
        /// Print the manifest as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// The bundle file.
        bundle: PathBuf,
    },
    /// Show the fleet's status from MQTT; with --wait, gate CI on convergence.
    #[command(
        after_help = "Examples:\n  fleet-bundler status --broker mqtt://127.0.0.1:1883 --fleet acme\n  fleet-bundler status --broker mqtt://broker:1883 --index out/index.json --selector channel=canary --wait --timeout 10m\n  fleet-bundler status --broker mqtt://broker:1883 --fleet acme --serve 127.0.0.1:9810   # Prometheus metrics (see `exporter --help`)\n\nWith --wait: exit 0 when every selected device of the index runs its indexed version and is converged, 3 as soon as one failed or rolled back on it, 4 at the timeout.\nExit codes: 0 ok/converged (--serve: stopped by a signal), 3 failed or rolled back, 4 timeout, 1 failure (broker; --serve: cannot listen), 64 usage."
    )]
    Status(mqtt::StatusArgs),
    /// Serve the fleet's status as Prometheus metrics on http://ADDR/metrics, live from MQTT.
    #[command(after_help = "Examples:
  fleet-bundler exporter --broker mqtt://127.0.0.1:1883 --fleet acme
  fleet-bundler exporter --broker mqtts://broker:8883 --ca-file ca.pem --username metrics --index out/index.json --listen 0.0.0.0:9810
  fleet-bundler status --broker mqtt://broker:1883 --fleet acme --serve 127.0.0.1:9810     # the same exporter
  curl -s http://127.0.0.1:9810/metrics | grep '^fleet_devices_by_state'

Subscribes to <prefix>/<fleet>/devices/+/status and .../online (retained) and updates the metrics as messages arrive; nothing is stored, so a restart shows the same fleet. With --index, the build's devices count before they report, and what they should run is the index's.
A broker that is down or goes away is retried for as long as the exporter runs (fleet_exporter_broker_connected shows it); the metrics keep the last known state meanwhile.
Metrics (the README has the table): fleet_devices, fleet_devices_by_state{state}, fleet_devices_by_online{online}, fleet_devices_by_desired_commit{commit}, fleet_devices_by_applied_commit{commit}, fleet_devices_outdated, fleet_devices_in_trouble_by_error{code}, per device (unless --no-device-metrics) fleet_device_state{device,state}, fleet_device_online{device}, fleet_device_last_report_timestamp_seconds{device}; and fleet_exporter_build_info, fleet_exporter_broker_connected, fleet_exporter_*_messages_total.
For a read-only broker account, the ACL needs only: topic read <prefix>/<fleet>/devices/+/status and topic read <prefix>/<fleet>/devices/+/online.
Prometheus scrape config:
  scrape_configs:
    - job_name: fleet
      static_configs: [{ targets: ['exporter-host:9810'] }]

Runs until Ctrl-C or SIGTERM (then exit 0).
Exit codes: 0 stopped by a signal, 1 failure at start (cannot listen on ADDR, unreadable --index or TLS files), 64 usage (bad flags, fleet or prefix).")]
    Exporter(exporter::ExporterArgs),
}

/// Where the repository is.
#[derive(Args)]
struct Source {
    /// Repository: a clone, a bare repository or its .git directory.
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Revision: branch, tag, commit id, HEAD~1, ...
    #[arg(long, default_value = "HEAD")]
    rev: String,
    #[command(flatten)]
    limits: ReadLimits,
}

/// Limits of what is read from Git.
#[derive(Args, Clone, Copy)]
struct ReadLimits {
    /// Largest file read from Git, in bytes or with k/m/g (powers of 1024). A larger file
    /// is an error that names it; its size is read from the Git object header first.
    #[arg(long, default_value = "16MiB", value_parser = parse_size, env = "FLEET_MAX_FILE_SIZE")]
    max_file_size: u64,
}

#[derive(Args)]
struct BuildArgs {
    #[command(flatten)]
    source: Source,
    /// Signing key file (repeatable, for k-of-n signing).
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// The signing key line itself, for CI secrets (used when no --key is given).
    #[arg(long = "key-env", env = "FLEET_SIGNING_KEY", hide_env_values = true, hide = true)]
    key_line: Option<String>,
    /// Output directory: bundles/ and index.json.
    #[arg(long)]
    out: PathBuf,
    /// Pin image tags to digests through the Docker Registry HTTP API v2.
    #[arg(long)]
    resolve_digests: bool,
    /// A registry (host[:port]) spoken to over plain HTTP (loopback ones always are).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Timeout of each registry request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    registry_timeout: Duration,
    /// zstd compression level (1-22). 19 makes bundles ~10% smaller at ~10x the time.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    /// The published build (an http(s) URL of the uploaded output, or a directory):
    /// versions are chosen newer than its index's, and unchanged devices keep its
    /// bundles. Use it when the output directory is not kept between CI runs.
    #[arg(long, value_name = "URL|DIR")]
    previous: Option<String>,
    /// Timeout of each request to the --previous server.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    previous_timeout: Duration,
    /// Check the commit's date against this time (unix seconds) instead of this
    /// machine's clock; the bundles do not depend on it. For tests and for rebuilding a
    /// past commit as it was built then.
    #[arg(long, env = "FLEET_BUILD_NOW", value_name = "UNIX_SECONDS")]
    now: Option<i64>,
    /// The broker's MQTT-over-WebSockets URL for the live dashboard written into
    /// OUT/dashboard/ (e.g. ws://broker:9001 or wss://broker/mqtt); without it the page
    /// asks for one (`index.html?broker=ws://...` overrides it either way).
    #[arg(long, value_name = "WS_URL", env = "FLEET_DASHBOARD_BROKER", value_parser = parse_ws_url)]
    dashboard_broker: Option<String>,
    /// Do not write OUT/dashboard/.
    #[arg(long, conflicts_with = "dashboard_broker")]
    no_dashboard: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Progress on stderr (default: when stderr is a terminal).
    #[arg(long)]
    progress: bool,
}

fn parse_ws_url(s: &str) -> Result<String, String> {
    fleet_bundler::dashboard::check_broker_url(s).map(|()| s.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse_duration_ms(s).map(Duration::from_millis)
}

fn parse_size(s: &str) -> Result<u64, String> {
    duration::parse_bytes(s)
}

/// An error that maps to a specific exit code.
#[derive(Debug)]
struct Exit(u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => exit::OK,
                _ => exit::USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*code);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Validate { source, json } => validate(&source, json),
        Command::Build(args) => build_cmd(args),
        Command::Plan { repo, from, to, json, context, limits } => {
            plan_cmd(&repo, &from, &to, json, context, limits)
        }
        Command::Publish(args) => {
            let summary = match mqtt::publish(&args) {
                Err(e @ mqtt::MqttError::NotNewer { .. }) => {
                    eprintln!("error: {e}");
                    return Err(Exit(exit::NOT_NEWER).into());
                }
                other => other?,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            }
            Ok(exit::OK)
        }
        Command::Verify { pubs, threshold, fleet, device, json, bundle } => {
            verify(&pubs, threshold, fleet.as_deref(), device.as_deref(), json, &bundle)
        }
        Command::Status(args) => {
            if let Some(listen) = args.serve {
                return export(&exporter::ExporterArgs::from_status(&args, listen));
            }
            Ok(match mqtt::status(&args).map_err(usage_exit)? {
                mqtt::StatusOutcome::Shown | mqtt::StatusOutcome::Converged => exit::OK,
                mqtt::StatusOutcome::Failed => exit::DEVICE_FAILED,
                mqtt::StatusOutcome::Timeout => exit::TIMEOUT,
            })
        }
        Command::Exporter(args) => export(&args),
    }
}

/// A usage problem found after parsing (no fleet named, a bad fleet id or prefix) is
/// printed and exits 64 like a bad flag; anything else stays an error.
fn usage_exit(e: mqtt::MqttError) -> anyhow::Error {
    match e {
        mqtt::MqttError::Usage(_) | mqtt::MqttError::Topic(_) => {
            eprintln!("error: {e}");
            Exit(exit::USAGE).into()
        }
        e => e.into(),
    }
}

fn export(args: &exporter::ExporterArgs) -> anyhow::Result<u8> {
    match exporter::run(args) {
        Ok(()) => Ok(exit::OK),
        Err(exporter::ExporterError::Mqtt(e)) => Err(usage_exit(e)),
        Err(e) => Err(e.into()),
    }
}

fn keygen(out: &Path) -> anyhow::Result<u8> {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let (secret, public) = keyfile::save_pair(out, &key)?;
    println!("{}", key.public().id());
    eprintln!("wrote {} (secret, 0600) and {}", secret.display(), public.display());
    Ok(exit::OK)
}

/// One revision, rendered.
struct Rendered {
    snapshot: repo::Snapshot,
    fleet: render::Fleet,
    states: std::collections::BTreeMap<String, fleet_spec::DesiredState>,
    diags: Vec<Diagnostic>,
}

/// Loads and renders a revision, printing diagnostics on stderr.
fn load_and_render(source: &Source) -> anyhow::Result<Rendered> {
    let snapshot = repo::read(&source.repo, &source.rev, source.limits.max_file_size)?;
    let (fleet, mut diags) = render::load(&snapshot);
    let (states, render_diags) = fleet.render_all();
    diags.extend(render_diags);
    let diags = diag::merge(diags);
    for d in &diags {
        eprintln!("{d}");
    }
    Ok(Rendered { snapshot, fleet, states, diags })
}

fn validate(source: &Source, json: bool) -> anyhow::Result<u8> {
    let snapshot = repo::read(&source.repo, &source.rev, source.limits.max_file_size)?;
    let (fleet, mut diags) = render::load(&snapshot);
    diags.extend(fleet.check_all().0);
    let diags = diag::merge(diags);
    if !json {
        for d in &diags {
            eprintln!("{d}");
        }
    }
    let errors = diag::error_count(&diags);
    let warnings = diags.len() - errors;
    if json {
        let out = serde_json::json!({
            "ok": errors == 0,
            "fleet": fleet.name,
            "commit": snapshot.commit,
            "devices": fleet.devices.len(),
            "apps": fleet.apps.len(),
            "errors": errors,
            "warnings": warnings,
            "diagnostics": diags,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        eprintln!(
            "{}: fleet {} at {} ({}): {} devices, {} apps, {errors} error(s), {warnings} warning(s)",
            if errors == 0 { "ok" } else { "invalid" },
            fleet.name,
            short(&snapshot.commit),
            snapshot.subject,
            fleet.devices.len(),
            fleet.apps.len(),
        );
    }
    Ok(if errors == 0 { exit::OK } else { exit::INVALID_REPO })
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// The first few of `ids`, then how many more.
fn some_of(ids: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = ids.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    text
}

fn load_keys(args: &BuildArgs) -> anyhow::Result<Vec<SigningKey>> {
    if !args.keys.is_empty() {
        return args.keys.iter().map(|p| keyfile::load_signing(p).map_err(anyhow::Error::from)).collect();
    }
    match &args.key_line {
        Some(line) => Ok(vec![line.parse::<SigningKey>().context("FLEET_SIGNING_KEY")?]),
        None => bail!("no signing key: pass --key FILE or set FLEET_SIGNING_KEY to the key line (make one with `fleet-bundler keygen`)"),
    }
}

fn build_cmd(args: BuildArgs) -> anyhow::Result<u8> {
    let keys = load_keys(&args)?;
    // One reading of the clock for the whole build.
    let now = args.now.unwrap_or_else(timefmt::now);
    let progress = args.progress || std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    if progress {
        eprintln!("reading {} at {}", args.source.repo.display(), args.source.rev);
    }
    let snapshot = repo::read(&args.source.repo, &args.source.rev, args.source.limits.max_file_size)?;
    let (fleet, mut diags) = render::load(&snapshot);
    if diag::error_count(&diags) == 0 {
        // Before the expensive part: the commit date alone can stop the build.
        build::check_commit_time(&snapshot.commit, snapshot.commit_time, fleet.bundle_expiry, now)?;
    }
    let (render_diags, images) = fleet.check_all();
    diags.extend(render_diags);
    let diags = diag::merge(diags);
    for d in &diags {
        eprintln!("{d}");
    }
    let errors = diag::error_count(&diags);
    if errors > 0 {
        eprintln!("build stopped: {errors} error(s) in the repository (nothing was written)");
        return Err(Exit(exit::INVALID_REPO).into());
    }
    if progress {
        eprintln!("checked {} devices in {:.1?}", fleet.devices.len(), started.elapsed());
    }
    let mut digests = std::collections::BTreeMap::new();
    if args.resolve_digests {
        let registry = Registry::new(args.registry_timeout, args.insecure_registries.clone());
        let (found, failures) = registry::resolve_all(&registry, &images);
        if !failures.is_empty() {
            for (image, e) in &failures {
                eprintln!("error: cannot resolve image {image}: {e}");
            }
            bail!("{} image(s) could not be pinned to a digest (nothing was written)", failures.len());
        }
        digests = found;
    } else {
        for image in &images {
            eprintln!("warning: image {image} is not pinned by digest: devices may run different builds of it (pass --resolve-digests or write image@sha256:...)");
        }
    }
    let previous = match &args.previous {
        Some(p) => Some(previous::Previous::load(p, args.previous_timeout)?),
        None => None,
    };
    let summary = build::build(
        &fleet,
        &snapshot,
        &BuildOptions {
            out: &args.out,
            keys: &keys,
            level: args.level,
            progress,
            digests: &digests,
            now,
            previous: previous.as_ref(),
        },
    )?;
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    if !args.no_dashboard {
        fleet_bundler::dashboard::write(&args.out, args.dashboard_broker.as_deref())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if !summary.pointers_deleted.is_empty() {
        eprintln!(
            "deleted the pointer files of {} device(s) no longer in the fleet: {}",
            summary.pointers_deleted.len(),
            some_of(&summary.pointers_deleted)
        );
    }
    eprintln!(
        "built fleet {} at {}: {} devices, {} new bundle(s), {} unchanged, {} removed, {} pointer file(s) written, in {:.1?}",
        summary.fleet,
        short(&summary.commit),
        summary.devices,
        summary.written,
        summary.unchanged,
        summary.removed.len(),
        summary.pointers_written,
        started.elapsed()
    );
    Ok(exit::OK)
}

fn plan_cmd(
    repo_path: &Path,
    from: &str,
    to: &str,
    json: bool,
    context: usize,
    limits: ReadLimits,
) -> anyhow::Result<u8> {
    let mut states = Vec::new();
    for rev in [from, to] {
        let source = Source { repo: repo_path.into(), rev: rev.into(), limits };
        let r = load_and_render(&source)?;
        let errors = diag::error_count(&r.diags);
        if errors > 0 {
            eprintln!("plan stopped: {errors} error(s) in the repository at {rev}");
            return Err(Exit(exit::INVALID_REPO).into());
        }
        states.push(r);
    }
    let to = states.pop().expect("two revisions");
    let from = states.pop().expect("two revisions");
    let secret_paths = plan::secret_paths(&from.fleet, &to.fleet);
    let p = plan::plan(
        &from.snapshot.commit,
        &to.snapshot.commit,
        &from.states,
        &to.states,
        &secret_paths,
        context,
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", p.render_text());
    }
    Ok(if p.has_changes() { exit::CHANGES } else { exit::OK })
}

fn verify(
    pubs: &[PathBuf],
    threshold: usize,
    fleet: Option<&str>,
    device: Option<&str>,
    json: bool,
    path: &Path,
) -> anyhow::Result<u8> {
    let keys: Vec<PublicKey> = pubs.iter().map(|p| keyfile::load_public(p)).collect::<Result<_, _>>()?;
    let trusted = TrustedKeys::new(keys, threshold)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let limits = Limits::default();
    // Fleet and device come from the manifest unless given; they are checked after the
    // signature like on a device, so an unsigned manifest can never pass.
    let claimed = bundle::parse(&bytes, &limits)
        .and_then(|p| bundle::decode_manifest(p.manifest_bytes))
        .map_err(|e| anyhow::anyhow!("{} does not verify ({}): {e}", path.display(), e.code()))?;
    let expect =
        Expectation { fleet: fleet.unwrap_or(&claimed.fleet), device: device.unwrap_or(&claimed.device) };
    let now = timefmt::now();
    let verified = bundle::verify(&bytes, &trusted, expect, TrustState::default(), now, &limits)
        .map_err(|e| anyhow::anyhow!("{} does not verify ({}): {e}", path.display(), e.code()))?;
    let m = &verified.manifest;
    let state = &verified.state;
    if json {
        let out = serde_json::json!({
            "ok": true,
            "digest": verified.digest,
            "fleet": m.fleet,
            "device": m.device,
            "version": m.version,
            "commit": m.commit,
            "subject": m.subject,
            "created_at": m.created_at,
            "expires_at": m.expires_at,
            "payload_sha256": m.payload_sha256_hex(),
            "compressed_size": m.compressed_size,
            "uncompressed_size": m.uncompressed_size,
            "signed_by": verified.signed_by.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "state_digest": state.digest(),
            "files": state.files.iter().map(|f| serde_json::json!({"path": f.path, "mode": format!("{:04o}", f.mode), "size": f.content.len(), "sha256": f.content_sha256()})).collect::<Vec<_>>(),
            "containers": state.containers.iter().map(|c| serde_json::json!({"name": c.name, "app": c.app, "service": c.service, "image": c.image.pull_reference()})).collect::<Vec<_>>(),
            "networks": state.networks.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
            "volumes": state.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("OK: {} verifies", path.display());
        println!("  digest        {}", verified.digest);
        println!("  fleet/device  {}/{}", m.fleet, m.device);
        println!("  version       {}", m.version);
        println!("  commit        {} {}", m.commit, m.subject);
        println!("  created       {}", timefmt::rfc3339(m.created_at));
        println!(
            "  expires       {} (in {})",
            timefmt::rfc3339(m.expires_at),
            timefmt::age(m.expires_at - now)
        );
        println!(
            "  signed by     {}",
            verified.signed_by.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
        );
        println!("  payload       {} bytes compressed, {} bytes raw", m.compressed_size, m.uncompressed_size);
        println!("  files ({})", state.files.len());
        for f in &state.files {
            println!("    {:04o} {:>8} {}", f.mode, f.content.len(), f.path);
        }
        println!("  containers ({})", state.containers.len());
        for c in &state.containers {
            println!("    {} ({}/{}) {}", c.name, c.app, c.service, c.image.pull_reference());
        }
    }
    Ok(exit::OK)
}
