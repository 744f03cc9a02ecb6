//! `fleet-bundler`: the command line. Parses arguments, wires the library modules
//! together and maps outcomes to the documented exit codes. No logic of its own
//! beyond presentation.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use fleet_spec::age::SecretKey;
use fleet_spec::bundle::{self, Expectation, Limits, TrustState, TrustedKeys};
use fleet_spec::keys::file as keyfile;
use fleet_spec::{PublicKey, SigningKey};

use fleet_bundler::build::{self, BuildOptions};
use fleet_bundler::diag::{self, Diagnostic};
use fleet_bundler::registry::{self, Registry};
use fleet_bundler::rollout::drive;
use fleet_bundler::{
    agent_release, artifacts, enroll, export, exporter, mqtt, plan, previous, render, repo, timefmt,
};

mod cli;

use cli::{exit, AgeIdentity, BuildArgs, Cli, Command, ReadLimits, Source};

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
            eprintln!("error: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn rollout_cmd(args: &drive::RolloutArgs) -> anyhow::Result<u8> {
    let (outcome, state) = match drive::run(args) {
        Err(e @ mqtt::MqttError::NotNewer { .. }) => {
            eprintln!("error: {e}");
            return Ok(exit::NOT_NEWER);
        }
        other => other.map_err(usage_exit)?,
    };
    if let Some(state) = &state {
        if args.json {
            println!("{}", serde_json::to_string_pretty(state)?);
        }
        let reason = state.reason.as_deref().unwrap_or("no reason given");
        match outcome {
            drive::Outcome::Done => eprintln!("the rollout of commit {} is done: every wave soaked", short(&state.commit)),
            drive::Outcome::Halted => eprintln!(
                "the rollout of commit {} halted at wave {} ({reason}): no further device gets it; devices that updated \
                 stay, failed ones rolled back by themselves. Fix the cause and build a new commit: its rollout supersedes \
                 this one",
                short(&state.commit),
                state.wave + 1
            ),
            drive::Outcome::Aborted if args.abort => {
                eprintln!("the rollout of commit {} is aborted: a running `fleet-bundler rollout` stops", short(&state.commit))
            }
            drive::Outcome::Aborted => eprintln!(
                "the rollout of commit {} was aborted ({reason}): nothing more is released; build a new commit to roll out again",
                short(&state.commit)
            ),
            drive::Outcome::Running => eprintln!(
                "the rollout of commit {} is still running (wave {}): run `fleet-bundler rollout` again to continue",
                short(&state.commit),
                state.wave + 1
            ),
        }
    }
    Ok(match outcome {
        drive::Outcome::Done => exit::OK,
        drive::Outcome::Aborted if args.abort => exit::OK,
        drive::Outcome::Aborted => exit::ABORTED,
        drive::Outcome::Halted => exit::DEVICE_FAILED,
        drive::Outcome::Running => exit::TIMEOUT,
    })
}

/// The error and its causes, `: `-separated like `{:#}`, but a cause whose text the
/// message already holds is left out: library errors that name their source in their
/// own message (`cannot read key file X: No such file or directory (os error 2)`) also
/// return it as `source()`, which `{:#}` would print a second time.
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Keygen { out, json } => keygen(&out, json),
        Command::Validate { source, json, worktree } => validate(&source, worktree, json),
        Command::Build(args) => build_cmd(args),
        Command::Plan { repo, from, to, worktree, json, context, limits, artifacts, age } => {
            let to = if worktree { None } else { Some(to.as_str()) };
            let how = PlanHow { json, context, limits, artifacts: artifacts.policy() };
            plan_cmd(&repo, &from, to, &how, &age_identities(&age)?)
        }
        Command::Publish(args) => {
            let summary = match mqtt::publish(&args) {
                Err(e @ mqtt::MqttError::NotNewer { .. }) => {
                    eprintln!("error: {e}");
                    return Err(Exit(exit::NOT_NEWER).into());
                }
                other => other.map_err(usage_exit)?,
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
                mqtt::StatusOutcome::Interrupted => exit::INTERRUPTED,
                mqtt::StatusOutcome::Terminated => exit::TERMINATED,
            })
        }
        Command::Export { out, device, file, json } => export_cmd(&out, &device, &file, json),
        Command::Exporter(args) => export(&args),
        Command::Rollout(args) => rollout_cmd(&args),
        Command::Enroll(cli::EnrollCommand::List(args)) => enroll_list(&args),
        Command::Enroll(cli::EnrollCommand::Accept(args)) => enroll_accept(&args),
    }
}

/// `enroll`'s errors with their exit codes: usage 64, an invalid file 65 (each problem
/// printed), the rest 1.
fn enroll_exit(e: enroll::EnrollError) -> anyhow::Error {
    match e {
        enroll::EnrollError::Mqtt(e) => usage_exit(e),
        enroll::EnrollError::Usage(message) => {
            eprintln!("error: {message}");
            Exit(exit::USAGE).into()
        }
        enroll::EnrollError::Repository(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("error: {}", enroll::EnrollError::Repository(diags));
            Exit(exit::INVALID_REPO).into()
        }
        e => e.into(),
    }
}

fn enroll_list(args: &enroll::ListArgs) -> anyhow::Result<u8> {
    let rows = enroll::list(args).map_err(enroll_exit)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", enroll::table(&rows, timefmt::now()));
        if rows.iter().any(|r| r.valid) {
            eprintln!(
                "compare each key id with `fleet-agent identity` on the device, then: fleet-bundler enroll accept ID \
                 --broker URL --repo DIR"
            );
        }
    }
    Ok(exit::OK)
}

fn enroll_accept(args: &enroll::AcceptArgs) -> anyhow::Result<u8> {
    let done = enroll::accept(args).map_err(enroll_exit)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
        return Ok(exit::OK);
    }
    let value = |keys: &[String]| match keys {
        [] => "(none)".to_string(),
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    if done.labels_ignored {
        eprintln!("warning: {} exists: --labels is ignored (edit its labels: there)", done.file);
    }
    if !done.changed {
        println!("{} lists public_key {} already: nothing changed", done.file, value(&done.public_keys));
        return Ok(exit::OK);
    }
    if done.created {
        println!("{}: new device file, public_key: {}", done.file, value(&done.public_keys));
    } else {
        println!("{}: public_key: {} -> {}", done.file, value(&done.previous), value(&done.public_keys));
    }
    println!("key id {}: compare it with `fleet-agent identity` on {}", done.key_id, done.device);
    if done.public_keys.len() > 1 {
        println!(
            "both keys are accepted during the rotation: once {} runs a bundle built after this commit, remove \
             the old key from {} (commit), then `fleet-agent identity --retire OLDID` on the device",
            done.device, done.file
        );
    }
    let repo = done.repo.display();
    println!("review and commit it:\n  git -C {repo} add {}", done.file);
    println!("  git -C {repo} commit -m 'Enroll {} (key id {})'", done.device, done.key_id);
    Ok(exit::OK)
}

/// A usage problem found after parsing (no fleet named, a bad fleet id or prefix, a
/// bad broker URL, a file named by a flag that does not exist, a bad --selector) is
/// printed and exits 64 like a bad flag; anything else stays an error.
fn usage_exit(e: mqtt::MqttError) -> anyhow::Error {
    match e {
        mqtt::MqttError::Usage(_) | mqtt::MqttError::Topic(_) | mqtt::MqttError::Url(_) => {
            eprintln!("error: {e}");
            Exit(exit::USAGE).into()
        }
        e => e.into(),
    }
}

fn export_cmd(out: &Path, device: &str, file: &Path, json: bool) -> anyhow::Result<u8> {
    let done = match export::export(out, device, file) {
        Ok(done) => done,
        Err(export::ExportError::Usage(message)) => {
            eprintln!("error: {message}");
            return Err(Exit(exit::USAGE).into());
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    }
    let blobs: u64 = done.artifacts.iter().map(|a| a.size).sum();
    let agent = match &done.agent {
        Some(a) => {
            let archs: Vec<&str> = a.binaries.iter().map(|b| b.arch.as_str()).collect();
            let size: u64 = a.binaries.iter().map(|b| b.size).sum();
            format!(
                ", and the agent {} binaries for {} ({}; the device takes its own architecture's)",
                a.version,
                archs.join(", "),
                artifacts::short_size(size)
            )
        }
        None => String::new(),
    };
    eprintln!(
        "wrote {} ({} bytes): bundle {} of {} (version {}) and {} artifact(s), {}{agent}",
        done.file.display(),
        done.bytes,
        short(&done.bundle),
        done.device,
        done.version,
        done.artifacts.len(),
        artifacts::short_size(blobs)
    );
    Ok(exit::OK)
}

fn export(args: &exporter::ExporterArgs) -> anyhow::Result<u8> {
    match exporter::run(args) {
        Ok(()) => Ok(exit::OK),
        Err(exporter::ExporterError::Mqtt(e)) => Err(usage_exit(e)),
        Err(e) => Err(e.into()),
    }
}

fn keygen(out: &Path, json: bool) -> anyhow::Result<u8> {
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {} is a file, not a directory: pass the directory for signing.key and signing.pub",
            out.display()
        );
    }
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let (secret, public) = keyfile::save_pair(out, &key)?;
    if json {
        let out = serde_json::json!({
            "key_id": key.public().id().to_string(),
            "secret": secret,
            "public": public,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", key.public().id());
    }
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

/// Reads `rev` of the repository at or above `repo`, or its work tree when `rev` is
/// `None` (`--worktree`).
fn read_source(
    repo: &Path,
    rev: Option<&str>,
    limits: ReadLimits,
    age: &[SecretKey],
) -> Result<repo::Snapshot, repo::RepoError> {
    let mut snapshot = match rev {
        Some(rev) => repo::read(repo, rev, limits.max_file_size),
        None => repo::read_worktree(repo, limits.max_file_size),
    }?;
    snapshot.age_identities = age.to_vec();
    Ok(snapshot)
}

/// The CI's age identities from `--age-identity FILE` or `FLEET_AGE_IDENTITY`; none
/// when neither is set.
fn age_identities(age: &AgeIdentity) -> anyhow::Result<Vec<SecretKey>> {
    let from_env = std::env::var("FLEET_AGE_IDENTITY").ok().filter(|t| !t.trim().is_empty());
    let (text, origin) = match (&age.path, from_env) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the age identity {}", path.display()))?;
            (text, path.display().to_string())
        }
        (None, Some(text)) => (text, "FLEET_AGE_IDENTITY".to_string()),
        (None, None) => return Ok(Vec::new()),
    };
    fleet_spec::age::parse_identities(&text).map_err(|e| {
        anyhow::anyhow!("{origin}: {e} (an age identity is what age-keygen writes: AGE-SECRET-KEY-1… lines)")
    })
}

/// What `validate` and `plan` say when secrets were not decrypted.
fn skipped_secrets(fleet: &render::Fleet) {
    if !fleet.undecrypted.is_empty() {
        eprintln!(
            "note: {} secret file(s) not decrypted (no --age-identity): their content was not checked: {}",
            fleet.undecrypted.len(),
            some_of(&fleet.undecrypted)
        );
    }
}

/// The files of the work tree that differ from `snapshot` when it is HEAD's commit,
/// with a warning on stderr naming them (unless `quiet`, for `--json`): `validate` and
/// `plan` check commits, which is what `build` bundles, so an edit that is not
/// committed yet would otherwise go unseen.
fn uncommitted(repo: &Path, snapshot: &repo::Snapshot, quiet: bool) -> Vec<(String, repo::Change)> {
    let changes = match repo::worktree_changes(repo, snapshot) {
        Ok(changes) => changes.unwrap_or_default(),
        Err(e) => {
            eprintln!("warning: cannot compare the work tree with the commit: {e}");
            return Vec::new();
        }
    };
    if !changes.is_empty() && !quiet {
        let named: Vec<String> = changes.iter().map(|(path, change)| format!("{path} ({change})")).collect();
        eprintln!(
            "warning: the work tree differs from commit {} (HEAD), which is what was checked: {}; \
             commit the changes (git add . && git commit); validate and plan take --worktree to check the files on disk",
            short(&snapshot.commit),
            some_of(&named),
        );
    }
    changes
}

/// Loads and renders a revision (`None`: the work tree), printing diagnostics on stderr.
fn load_and_render(
    repo: &Path,
    rev: Option<&str>,
    limits: ReadLimits,
    age: &[SecretKey],
) -> anyhow::Result<Rendered> {
    let snapshot = read_source(repo, rev, limits, age)?;
    let (fleet, mut diags) = render::load(&snapshot);
    skipped_secrets(&fleet);
    let (states, render_diags) = fleet.render_all();
    diags.extend(render_diags);
    let diags = diag::merge(diags);
    for d in &diags {
        eprintln!("{d}");
    }
    Ok(Rendered { snapshot, fleet, states, diags })
}

fn validate(source: &Source, worktree: bool, json: bool) -> anyhow::Result<u8> {
    let rev = (!worktree).then_some(source.rev.as_str());
    let snapshot = read_source(&source.repo, rev, source.limits, &age_identities(&source.age)?)?;
    let changes = if worktree { Vec::new() } else { uncommitted(&source.repo, &snapshot, json) };
    let (fleet, mut diags) = render::load(&snapshot);
    if !json {
        skipped_secrets(&fleet);
    }
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
            "worktree": worktree,
            "secrets_not_decrypted": fleet.undecrypted,
            "uncommitted": changes.iter().map(|(path, change)| serde_json::json!({"path": path, "change": change})).collect::<Vec<_>>(),
            "devices": fleet.devices.len(),
            "apps": fleet.apps.len(),
            "errors": errors,
            "warnings": warnings,
            "diagnostics": diags,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        eprintln!(
            "{}: fleet {} {}: {} devices, {} apps, {errors} error(s), {warnings} warning(s)",
            if errors == 0 { "ok" } else { "invalid" },
            fleet.name,
            place(&snapshot),
            fleet.devices.len(),
            fleet.apps.len(),
        );
    }
    Ok(if errors == 0 { exit::OK } else { exit::INVALID_REPO })
}

/// `at <commit> (<subject>)`, or `in the work tree`.
fn place(snapshot: &repo::Snapshot) -> String {
    if snapshot.commit == repo::WORKTREE {
        "in the work tree (uncommitted changes included)".into()
    } else {
        format!("at {} ({})", short(&snapshot.commit), snapshot.subject)
    }
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

/// A key file flag given the directory `keygen --out` made: say which file in it to pass.
fn not_a_directory(path: &Path, flag: &str, file: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {} is a directory: pass the key file in it ({})",
            path.display(),
            path.join(file).display()
        );
    }
    Ok(())
}

fn load_keys(args: &BuildArgs) -> anyhow::Result<Vec<SigningKey>> {
    if !args.keys.is_empty() {
        return args
            .keys
            .iter()
            .map(|p| {
                not_a_directory(p, "--key", "signing.key")?;
                keyfile::load_signing(p).map_err(anyhow::Error::from)
            })
            .collect();
    }
    match &args.key_line {
        Some(line) => Ok(vec![line.parse::<SigningKey>().context("FLEET_SIGNING_KEY")?]),
        None => {
            // Nothing on the command line or in the environment: a usage error.
            eprintln!("error: no signing key: pass --key FILE or set FLEET_SIGNING_KEY to the key line (make one with `fleet-bundler keygen`)");
            Err(Exit(exit::USAGE).into())
        }
    }
}

/// The `--agent-release` directories, read: a directory that does not exist or two of
/// the same version are usage errors (64), a bad release.json or binary a failure (1).
fn load_agent_releases(dirs: &[PathBuf]) -> anyhow::Result<agent_release::Releases> {
    match agent_release::Releases::load(dirs) {
        Ok(releases) => {
            for w in releases.0.values().flat_map(|r| &r.warnings) {
                eprintln!("warning: {w}");
            }
            Ok(releases)
        }
        Err(e) if e.is_usage() => {
            eprintln!("error: {e}");
            Err(Exit(exit::USAGE).into())
        }
        Err(e) => Err(e.into()),
    }
}

fn build_cmd(args: BuildArgs) -> anyhow::Result<u8> {
    let keys = load_keys(&args)?;
    let agent_releases = load_agent_releases(&args.agent_releases)?;
    // One reading of the clock for the whole build.
    let now = args.now.unwrap_or_else(timefmt::now);
    let progress = args.progress || std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    if progress {
        eprintln!("reading {} at {}", args.source.repo.display(), args.source.rev);
    }
    let mut snapshot = repo::read(&args.source.repo, &args.source.rev, args.source.limits.max_file_size)?;
    snapshot.age_identities = age_identities(&args.source.age)?;
    // The commit is what is bundled; uncommitted edits are named so they are not lost.
    uncommitted(&args.source.repo, &snapshot, false);
    let (fleet, mut diags) = render::load(&snapshot);
    if !fleet.undecrypted.is_empty() {
        eprintln!(
            "error: the repository has secrets ({}) and no age identity decrypts them: pass --age-identity FILE \
             (or FLEET_AGE_IDENTITY_FILE, or the key itself in FLEET_AGE_IDENTITY); nothing was written",
            some_of(&fleet.undecrypted)
        );
        return Err(Exit(exit::USAGE).into());
    }
    if diag::error_count(&diags) == 0 {
        // Before the expensive part: the commit date alone can stop the build.
        build::check_commit_time(&snapshot.commit, snapshot.commit_time, fleet.bundle_expiry, now)?;
    }
    let (render_diags, images) = fleet.check_all();
    diags.extend(render_diags);
    // Every declared agent version needs its release (binaries) from --agent-release.
    diags.extend(agent_releases.missing(fleet.agent_rules()));
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
        let (found, failures) = registry::resolve_all(&registry, &images, !args.no_image_sizes);
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
            artifacts: args.artifacts.policy(),
            agent_releases: &agent_releases,
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
    let mut blobs = match summary.blobs {
        0 => String::new(),
        n => format!(", {n} artifact blob(s) ({} written)", summary.blobs_written),
    };
    for r in &summary.agent_releases {
        let archs: Vec<&str> = r.binaries.iter().map(|b| b.arch.as_str()).collect();
        blobs.push_str(&format!(", agent {} ({}) for {} device(s)", r.version, archs.join(", "), r.devices));
    }
    eprintln!(
        "built fleet {} at {}: {} devices, {} new bundle(s), {} unchanged, {} removed, {} pointer file(s) written{blobs}, in {:.1?}",
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

/// How `plan` reads and prints.
struct PlanHow {
    json: bool,
    context: usize,
    limits: ReadLimits,
    /// As `build` would split the states, so artifacts are named as such.
    artifacts: artifacts::Policy,
}

fn plan_cmd(
    repo_path: &Path,
    from: &str,
    to: Option<&str>,
    how: &PlanHow,
    age: &[SecretKey],
) -> anyhow::Result<u8> {
    let PlanHow { json, context, limits, artifacts: policy } = *how;
    let mut states = Vec::new();
    for rev in [Some(from), to] {
        let mut r = load_and_render(repo_path, rev, limits, age)?;
        for state in r.states.values_mut() {
            artifacts::split(state, &policy);
            state.canonicalize();
        }
        let errors = diag::error_count(&r.diags);
        if errors > 0 {
            eprintln!("plan stopped: {errors} error(s) in the repository {}", place(&r.snapshot));
            return Err(Exit(exit::INVALID_REPO).into());
        }
        states.push(r);
    }
    if to.is_some() {
        // Stderr only: the plan on stdout stays what was asked for.
        uncommitted(repo_path, &states[1].snapshot, false);
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

/// Why `verify` refused: a reason code (the bundle's refusal code as a device reports
/// it, or `key_file`, `unreadable`, `usage`), the message and the exit code.
struct Refusal {
    reason: String,
    message: String,
    exit: u8,
}

/// Reads the trusted keys and the bundle and verifies it as a device would.
fn check_bundle(
    pubs: &[PathBuf],
    threshold: usize,
    fleet: Option<&str>,
    device: Option<&str>,
    path: &Path,
) -> Result<bundle::Verified, Refusal> {
    let refusal =
        |reason: &str, message: String| Refusal { reason: reason.into(), message, exit: exit::FAILURE };
    let keys: Vec<PublicKey> = pubs
        .iter()
        .map(|p| {
            not_a_directory(p, "--pub", "signing.pub")?;
            keyfile::load_public(p).map_err(anyhow::Error::from)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| refusal("key_file", chain(&e)))?;
    // Fewer distinct keys than --threshold is the command line's mistake.
    let trusted = TrustedKeys::new(keys, threshold).map_err(|e| Refusal {
        exit: exit::USAGE,
        ..refusal("usage", format!("{e} (--pub and --threshold)"))
    })?;
    let bytes = std::fs::read(path)
        .map_err(|e| refusal("unreadable", format!("cannot read {}: {e}", path.display())))?;
    let limits = Limits::default();
    let refused = |e: bundle::VerifyError| {
        refusal(e.code(), format!("{} does not verify ({}): {e}", path.display(), e.code()))
    };
    // Fleet and device come from the manifest unless given; they are checked after the
    // signature like on a device, so an unsigned manifest can never pass.
    let claimed = bundle::parse(&bytes, &limits)
        .and_then(|p| bundle::decode_manifest(p.manifest_bytes))
        .map_err(refused)?;
    let expect =
        Expectation { fleet: fleet.unwrap_or(&claimed.fleet), device: device.unwrap_or(&claimed.device) };
    bundle::verify(&bytes, &trusted, expect, TrustState::default(), timefmt::now(), &limits).map_err(refused)
}

fn verify(
    pubs: &[PathBuf],
    threshold: usize,
    fleet: Option<&str>,
    device: Option<&str>,
    json: bool,
    path: &Path,
) -> anyhow::Result<u8> {
    let verified = match check_bundle(pubs, threshold, fleet, device, path) {
        Ok(v) => v,
        Err(refusal) => {
            if json {
                let out = serde_json::json!({
                    "ok": false,
                    "bundle": path,
                    "reason": refusal.reason,
                    "message": refusal.message,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            eprintln!("error: {}", refusal.message);
            return Err(Exit(refusal.exit).into());
        }
    };
    let now = timefmt::now();
    let m = &verified.manifest;
    let state = &verified.state;
    if json {
        let mut out = serde_json::json!({
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
            "artifacts": state.artifacts.iter().map(|a| serde_json::json!({"path": a.path, "mode": format!("{:04o}", a.mode), "size": a.size, "sha256": a.sha256_hex(), "blob": format!("{}/{}", build::BLOBS, a.sha256_hex())})).collect::<Vec<_>>(),
            "containers": state.containers.iter().map(|c| serde_json::json!({"name": c.name, "app": c.app, "service": c.service, "image": c.image.pull_reference()})).collect::<Vec<_>>(),
            "networks": state.networks.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
            "volumes": state.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        });
        if let Some(agent) = &state.agent {
            out["agent"] = serde_json::json!({
                "version": agent.version,
                "allow_downgrade": agent.allow_downgrade,
                "binaries": agent.binaries.iter().map(|b| serde_json::json!({"arch": b.arch, "size": b.size, "sha256": b.sha256_hex(), "blob": format!("{}/{}", build::BLOBS, b.sha256_hex())})).collect::<Vec<_>>(),
            });
        }
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
        if !state.artifacts.is_empty() {
            println!(
                "  artifacts ({}): bytes in {}/<sha256> beside bundles/",
                state.artifacts.len(),
                build::BLOBS
            );
            for a in &state.artifacts {
                println!("    {:04o} {:>8} {} sha256 {}", a.mode, a.size, a.path, a.sha256_hex());
            }
        }
        println!("  containers ({})", state.containers.len());
        for c in &state.containers {
            println!("    {} ({}/{}) {}", c.name, c.app, c.service, c.image.pull_reference());
        }
        if let Some(agent) = &state.agent {
            println!(
                "  agent         {}{}: one binary per architecture, bytes in {}/<sha256>; the device takes its own",
                agent.version,
                if agent.allow_downgrade { " (allow_downgrade)" } else { "" },
                build::BLOBS
            );
            for b in &agent.binaries {
                println!("    {:<8} {:>8} sha256 {}", b.arch, b.size, b.sha256_hex());
            }
        }
    }
    Ok(exit::OK)
}
