//! Loads a whole fleet from a repository snapshot and renders each device's desired
//! state.
//!
//! [`load`] parses and checks every file independently and returns every problem at
//! once; [`Fleet::render`] then renders one device (label selectors, templated files,
//! Compose translation). Both are pure: the same snapshot always renders the same
//! states. Image digests are pinned afterwards by [`crate::registry`].

use std::collections::{BTreeMap, BTreeSet, HashSet};

use fleet_spec::model::{DesiredState, ManagedFile, Owner};
use fleet_spec::topic::{validate_id, validate_prefix, DEFAULT_PREFIX};
use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::compose::{self, AppContext, ComposeFile, Translated};
use crate::diag::Diagnostic;
use crate::duration::parse_duration_ms;
use crate::format::{AppFile, DeviceFile, FleetFile, APP_SHAPE, DEVICE_SHAPE, FLEET_SHAPE};
use crate::repo;
use crate::repo::Snapshot;
use crate::secrets::{self, SecretVars};
use crate::yaml::{self, Pos, Vars};

pub const DEFAULT_FILE_ROOT: &str = "/srv/fleet";

/// How a problem found while rendering starts when `fleet.yaml` is broken.
pub const CONSEQUENCE: &str = "(maybe because of fleet.yaml) ";

/// The work one template render may do (minijinja fuel: about one unit per instruction
/// and per 64 bytes of data the template makes). Real configuration templates need a
/// few thousand; this bounds a runaway loop to well under a second and the memory it
/// can take to about 256 MB.
pub const TEMPLATE_FUEL: u64 = 4_000_000;

/// Whether `bytes` is a Git LFS pointer (a small text file, the spec says under 1024
/// bytes, beginning with its version line). Reading the repository replaced every valid
/// pointer whose object is in the local LFS store by that object ([`crate::lfs`]), so one
/// seen here is missing its object, or is malformed.
fn is_lfs_pointer(bytes: &[u8]) -> bool {
    crate::lfs::looks_like_pointer(bytes)
}

/// The diagnostic for a file committed as a Git LFS pointer that could not be resolved.
fn lfs_diagnostic(path: &str, content: &[u8], line: u64, column: u64) -> Diagnostic {
    let message = match crate::lfs::parse(content) {
        Ok(Some(pointer)) => format!(
            "is a Git LFS pointer, and its object (sha256 {}, {}) is not in this clone's LFS store: \
             fetch the LFS objects before building (`git lfs pull`; in CI, check out with LFS enabled); \
             a pointer file is never delivered as content",
            pointer.oid,
            human_size(pointer.size)
        ),
        Err(reason) => format!(
            "is a malformed Git LFS pointer ({reason}): commit the file again with Git LFS set up \
             (`git lfs install`, then `git add --renormalize {path}`), or commit its real content without LFS"
        ),
        Ok(None) => "is a Git LFS pointer of an unknown version: commit its real content without LFS".into(),
    };
    Diagnostic::error(path, line, column, message)
}

/// `20.0 MiB (20971520 bytes)`.
pub fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB ({bytes} bytes)", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB ({bytes} bytes)", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

/// A fleet, loaded and checked.
pub struct Fleet {
    pub name: String,
    pub topic_prefix: String,
    /// Seconds a bundle stays valid after its commit.
    pub bundle_expiry: i64,
    pub file_root: String,
    pub vars: Vars,
    /// `policy:` of `fleet.yaml`: every device's default engine policy.
    pub policy: crate::policy::Settings,
    /// `maintenance:` of `fleet.yaml`: every device's default schedule.
    pub maintenance: crate::maintenance::Settings,
    pub devices: BTreeMap<String, Device>,
    pub apps: Vec<App>,
    /// `rollout:` of `fleet.yaml` with each device's wave; `None`: all at once.
    pub rollout: Option<crate::rollout::RolloutPlan>,
    /// `agent:` of `fleet.yaml`: which agent release devices run, first match wins (a
    /// device file's own `agent:` comes first; see [`Fleet::agent_rule`]).
    pub agent: Vec<crate::agent_release::Rule>,
    templates: Environment<'static>,
    /// The largest file a template may render (the snapshot's `max_file_size`).
    max_file_size: u64,
    /// `fleet.yaml` is missing or has errors: devices are not rendered (see
    /// [`Fleet::not_rendered`]).
    root_broken: bool,
    /// Secret (`*.age`) files not decrypted because no age identity was given: their
    /// repository paths. `validate` and `plan` say they skipped them; `build` refuses.
    pub undecrypted: Vec<String>,
    /// `secrets.yaml.age`'s variables (empty without one or without the identity).
    secret_vars: SecretVars,
    /// `devices/<id>.secrets.yaml.age`'s variables, over the fleet's.
    device_secret_vars: BTreeMap<String, SecretVars>,
    /// Secret variable files exist but were not decrypted: names are unknown, so an
    /// unknown Compose `${VAR}` may be one (it is taken as a secret, not an error).
    secret_names_unknown: bool,
    /// Derived from the CI's age identity: makes sealing deterministic (same commit,
    /// same bundle bytes). `None` without an identity.
    seal_seed: Option<[u8; 32]>,
}

/// One device file.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// `public_key:` of the device file: its age X25519 recipients (`age1…`), each
    /// checked, newest first as written; empty when the device has none (not enrolled).
    pub public_keys: Vec<String>,
    pub vars: Vars,
    /// `policy:` of the device file (keys over `fleet.yaml`'s).
    pub policy: crate::policy::Settings,
    /// `maintenance:` of the device file (keys over `fleet.yaml`'s).
    pub maintenance: crate::maintenance::Settings,
    /// `agent:` of the device file: its agent release, before `fleet.yaml`'s rules.
    pub agent: Option<crate::agent_release::Rule>,
}

/// One app directory.
pub struct App {
    pub name: String,
    /// `None`: every device. Otherwise every label must have one of the values.
    pub selector: Option<BTreeMap<String, Vec<String>>>,
    pub files: Vec<FileSpec>,
    compose: Option<ComposeApp>,
}

/// A file an app delivers.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Repository path of the source, e.g. `apps/web/files/nginx.conf`.
    pub repo_path: String,
    pub target: String,
    pub mode: u32,
    pub owner: Option<Owner>,
    /// Content hidden from `plan`.
    pub secret: bool,
    /// A secret file (`*.age` source): decrypted with the CI's identity, sealed to the
    /// device in its bundle.
    pub sealed: bool,
    /// A template that names `secrets`: its output is sealed (so is any template that
    /// reads a secret at render time, through an include or a macro).
    pub uses_secrets: bool,
    content: FileContent,
}

#[derive(Debug, Clone)]
enum FileContent {
    Static(Vec<u8>),
    /// A minijinja template, registered under the repository path.
    Template,
}

struct ComposeApp {
    file: String,
    parsed: ComposeFile,
    file_targets: BTreeMap<String, String>,
    app_root: String,
    /// The `.env` beside the Compose file: variables for `${VAR}` that neither the
    /// device nor the fleet sets.
    dotenv: BTreeMap<String, String>,
    /// The `env_file:`s the commit holds: repository path → content.
    env_files: BTreeMap<String, Vec<u8>>,
    /// The `file:`s of `secrets:` and `configs:`, read (and decrypted).
    sources: BTreeMap<String, compose::SourceFile>,
    /// Device paths of the Compose secrets (and encrypted configs): hidden from `plan`.
    secret_targets: Vec<String>,
    /// The translation when the file uses no `${VAR}`: the same for every device.
    fixed: Option<Translated>,
    /// Diagnostics already reported by the device-independent check.
    known: HashSet<(u64, u64, String)>,
}

impl App {
    /// Device paths whose content `plan` never shows: files marked or named secret, and
    /// the Compose secrets (and encrypted configs).
    pub fn secret_targets(&self) -> impl Iterator<Item = &str> + '_ {
        let files = self.files.iter().filter(|f| f.secret).map(|f| f.target.as_str());
        files.chain(self.compose.iter().flat_map(|c| c.secret_targets.iter().map(String::as_str)))
    }

    pub fn selects(&self, device: &Device) -> bool {
        match &self.selector {
            None => true,
            Some(sel) => {
                sel.iter().all(|(k, values)| device.labels.get(k).is_some_and(|v| values.contains(v)))
            }
        }
    }
}

/// True for file names whose content `plan` never shows.
pub fn looks_secret(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    name.ends_with(".key")
        || name.ends_with(".pem")
        || name.contains("secret")
        || name.contains("password")
        || name.contains("token")
}

/// Parses and checks a snapshot. Always returns a fleet (with defaults where a file
/// was broken) so that every file's problems are found in one run; the caller stops
/// when there is any error diagnostic.
pub fn load(snapshot: &Snapshot) -> (Fleet, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    for (path, size) in &snapshot.too_large {
        diags.push(Diagnostic::error(
            path.as_str(),
            0,
            0,
            format!(
                "{} is larger than the limit of {} for one file read from Git: pass --max-file-size \
                 (e.g. --max-file-size {}) to raise it; the bundler holds every file it reads in memory (a file over --artifact-threshold travels as an artifact, beside the bundles)",
                human_size(*size),
                human_size(snapshot.max_file_size),
                suggest_limit(*size)
            ),
        ));
    }

    // fleet.yaml
    let mut name = String::from("invalid");
    let mut topic_prefix = DEFAULT_PREFIX.to_string();
    let mut bundle_expiry = 90 * 86_400;
    let mut file_root = DEFAULT_FILE_ROOT.to_string();
    let mut vars = Vars::new();
    let mut policy = crate::policy::Settings::default();
    let mut rollout: Option<(crate::rollout::Rollout, Pos)> = None;
    let mut maintenance = crate::maintenance::Settings::default();
    let mut agent = Vec::new();
    match snapshot.files.get("fleet.yaml") {
        None if snapshot.too_large.contains_key("fleet.yaml") => {}
        None => diags.push(Diagnostic::error(
            "fleet.yaml",
            0,
            0,
            "missing: the repository root needs a fleet.yaml with at least `name: <fleet id>`",
        )),
        Some(bytes) => {
            let parsed = text("fleet.yaml", bytes)
                .map_err(|d| vec![d])
                .and_then(|t| yaml::parse_all::<FleetFile>("fleet.yaml", t, &FLEET_SHAPE));
            match parsed {
                Err(found) => diags.extend(found),
                Ok(f) => {
                    let at = Pos::of(&f.name);
                    match validate_id("fleet id", &f.name.value) {
                        Ok(()) => name = f.name.value.clone(),
                        Err(e) => {
                            diags.push(Diagnostic::error("fleet.yaml", at.line, at.column, e.to_string()))
                        }
                    }
                    if let Some(p) = &f.topic_prefix {
                        match validate_prefix(&p.value) {
                            Ok(()) => topic_prefix = p.value.clone(),
                            Err(e) => {
                                let at = Pos::of(p);
                                diags.push(Diagnostic::error(
                                    "fleet.yaml",
                                    at.line,
                                    at.column,
                                    e.to_string(),
                                ));
                            }
                        }
                    }
                    if let Some(e) = &f.bundle_expiry {
                        let at = Pos::of(e);
                        match parse_duration_ms(&e.value) {
                            Ok(ms) if ms >= 3_600_000 => bundle_expiry = (ms / 1000) as i64,
                            Ok(_) => diags.push(Diagnostic::error(
                                "fleet.yaml",
                                at.line,
                                at.column,
                                "bundle_expiry must be at least 1h: devices refuse expired bundles",
                            )),
                            Err(m) => diags.push(Diagnostic::error("fleet.yaml", at.line, at.column, m)),
                        }
                    }
                    if let Some(r) = &f.file_root {
                        let at = Pos::of(r);
                        match normalize_absolute(&r.value) {
                            Some(p) => file_root = p,
                            None => diags.push(Diagnostic::error(
                                "fleet.yaml",
                                at.line,
                                at.column,
                                format!("file_root `{}` must be an absolute path without `..`", r.value),
                            )),
                        }
                    }
                    vars = f.vars;
                    if let Some(p) = &f.policy {
                        policy = crate::policy::Settings::from_file("fleet.yaml", p, &mut diags);
                    }
                    if let Some(r) = &f.rollout {
                        rollout = crate::rollout::Rollout::from_file("fleet.yaml", r, &mut diags)
                            .map(|checked| (checked, Pos::of(r)));
                    }
                    if let Some(m) = &f.maintenance {
                        maintenance = crate::maintenance::Settings::from_file("fleet.yaml", m, &mut diags);
                    }
                    if let Some(a) = &f.agent {
                        agent = crate::agent_release::rules_from_file("fleet.yaml", a, &mut diags);
                    }
                }
            }
        }
    }

    // devices/<id>.yaml, parsed in parallel (large fleets have thousands).
    let device_files: Vec<(&String, &Vec<u8>)> = snapshot
        .files
        .iter()
        .filter(|(p, _)| p.starts_with("devices/") && secrets::device_secrets_id(p).is_none())
        .collect();
    let parsed: Vec<Result<Device, Vec<Diagnostic>>> =
        device_files.par_iter().map(|(path, bytes)| load_device(path, bytes)).collect();
    let mut devices = BTreeMap::new();
    for r in parsed {
        match r {
            Ok(d) => {
                devices.insert(d.id.clone(), d);
            }
            Err(found) => diags.extend(found),
        }
    }
    if devices.is_empty() && !diags.iter().any(|d| d.file.starts_with("devices/")) {
        diags.push(Diagnostic::warning("devices/", 0, 0, "no devices: add devices/<id>.yaml files"));
    }

    // Secret variables: the fleet's, then each device's.
    let mut undecrypted = Vec::new();
    let mut secret_vars = SecretVars::new();
    let mut device_secret_vars = BTreeMap::new();
    let mut secret_names_unknown = false;
    let ids = &snapshot.age_identities;
    if let Some(bytes) = snapshot.files.get(repo::FLEET_SECRETS) {
        match secrets::load_vars(repo::FLEET_SECRETS, bytes, ids) {
            Ok(Some(vars)) => secret_vars = vars,
            Ok(None) => {
                undecrypted.push(repo::FLEET_SECRETS.to_string());
                secret_names_unknown = true;
            }
            Err(d) => diags.push(d),
        }
    }
    for (path, bytes) in &snapshot.files {
        let Some(id) = secrets::device_secrets_id(path) else { continue };
        if !devices.contains_key(id) {
            diags.push(Diagnostic::error(
                path.as_str(),
                0,
                0,
                format!("no device `{id}`: a device's secret variables go beside its devices/{id}.yaml"),
            ));
            continue;
        }
        match secrets::load_vars(path, bytes, ids) {
            Ok(Some(vars)) => {
                device_secret_vars.insert(id.to_string(), vars);
            }
            Ok(None) => {
                undecrypted.push(path.clone());
                secret_names_unknown = true;
            }
            Err(d) => diags.push(d),
        }
    }

    // apps/<app>/
    let mut templates = Environment::new();
    templates.set_undefined_behavior(UndefinedBehavior::Strict);
    templates.set_fuel(Some(TEMPLATE_FUEL));
    templates.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build() {
        templates.set_syntax(syntax);
    }
    let app_names: BTreeSet<&str> = snapshot
        .files
        .keys()
        .filter_map(|p| p.strip_prefix("apps/"))
        .filter_map(|rest| rest.split_once('/').map(|(app, _)| app))
        .collect();
    let mut apps = Vec::new();
    for app in app_names {
        if let Some(a) =
            load_app(snapshot, app, &file_root, &vars, &mut templates, &mut diags, &mut undecrypted)
        {
            apps.push(a);
        }
    }
    for path in snapshot.files.keys() {
        if let Some(rest) = path.strip_prefix("apps/") {
            if !rest.contains('/') {
                diags.push(Diagnostic::warning(
                    path.as_str(),
                    0,
                    0,
                    "ignored: apps/ holds one directory per app",
                ));
            }
        }
    }

    let rollout = rollout.map(|(r, at)| {
        let (devices_waves, unassigned) =
            crate::rollout::plan::assign(&name, &r, devices.iter().map(|(id, d)| (id, &d.labels)));
        if !unassigned.is_empty() {
            let shown: Vec<&str> = unassigned.iter().take(5).map(String::as_str).collect();
            diags.push(Diagnostic::error(
                "fleet.yaml",
                at.line,
                at.column,
                format!(
                    "{} device(s) are in no wave of rollout: ({}{}): end `waves:` with a wave without selector \
                     and percent, which takes every remaining device",
                    unassigned.len(),
                    shown.join(", "),
                    if unassigned.len() > 5 { ", ..." } else { "" }
                ),
            ));
        }
        crate::rollout::RolloutPlan { rollout: r, devices: devices_waves }
    });
    let root_broken = diags.iter().any(|d| d.is_error() && d.file == "fleet.yaml");
    let fleet = Fleet {
        rollout,
        agent,
        root_broken,
        name,
        topic_prefix,
        bundle_expiry,
        file_root,
        vars,
        policy,
        maintenance,
        devices,
        apps,
        templates,
        max_file_size: snapshot.max_file_size,
        undecrypted,
        secret_vars,
        device_secret_vars,
        secret_names_unknown,
        seal_seed: snapshot.age_identities.first().map(|k| {
            let mut seed = Sha256::new();
            seed.update(b"fleet-bundler seal seed v1");
            seed.update(k.secret_bytes());
            seed.finalize().into()
        }),
    };
    (fleet, diags)
}

/// A limit in whole MiB that `size` fits in, for the hint of a too-large file.
fn suggest_limit(size: u64) -> String {
    format!("{}MiB", size.div_ceil(1 << 20).next_power_of_two())
}

fn text<'a>(path: &str, bytes: &'a [u8]) -> Result<&'a str, Diagnostic> {
    if is_lfs_pointer(bytes) {
        return Err(lfs_diagnostic(path, bytes, 0, 0));
    }
    std::str::from_utf8(bytes).map_err(|e| Diagnostic::error(path, 0, 0, format!("not UTF-8 text: {e}")))
}

/// Loads `devices/<id>.yaml` (`path`, repository-relative) from its bytes.
pub(crate) fn load_device(path: &str, bytes: &[u8]) -> Result<Device, Vec<Diagnostic>> {
    let rest = &path["devices/".len()..];
    let Some(id) = rest.strip_suffix(".yaml").filter(|id| !id.contains('/')) else {
        return Err(vec![Diagnostic::error(
            path,
            0,
            0,
            "devices/ holds one <device id>.yaml file per device, nothing else",
        )]);
    };
    validate_id("device id", id)
        .map_err(|e| vec![Diagnostic::error(path, 0, 0, format!("the file name is the device id: {e}"))])?;
    let text = text(path, bytes).map_err(|d| vec![d])?;
    let file: DeviceFile = if text.trim().is_empty() {
        DeviceFile::default()
    } else {
        yaml::parse_all(path, text, &DEVICE_SHAPE)?
    };
    let labels = file.labels.into_iter().map(|(k, v)| (k, v.value.0)).collect();
    let mut problems = Vec::new();
    let public_keys = match &file.public_key {
        Some(keys) => public_keys(path, keys, &mut problems),
        None => Vec::new(),
    };
    let policy = match &file.policy {
        Some(p) => crate::policy::Settings::from_file(path, p, &mut problems),
        None => crate::policy::Settings::default(),
    };
    let maintenance = match &file.maintenance {
        Some(m) => crate::maintenance::Settings::from_file(path, m, &mut problems),
        None => crate::maintenance::Settings::default(),
    };
    let agent = file.agent.as_ref().and_then(|a| crate::agent_release::device_rule(path, a, &mut problems));
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Device { id: id.to_string(), labels, public_keys, vars: file.vars, policy, maintenance, agent })
}

/// `public_key:` of a device file: one recipient or a list, each a valid age X25519
/// recipient, none twice, the list not empty.
fn public_keys(
    path: &str,
    value: &yaml::Spanned<yaml::StringOrList>,
    problems: &mut Vec<Diagnostic>,
) -> Vec<String> {
    let at = yaml::Pos::of(value);
    let items: Vec<(String, yaml::Pos)> = match &value.value {
        yaml::StringOrList::String(s) => vec![(s.clone(), at)],
        yaml::StringOrList::List(list) => {
            list.iter().map(|s| (s.value.0.clone(), yaml::Pos::of(s))).collect()
        }
    };
    if items.is_empty() {
        problems.push(Diagnostic::error(
            path,
            at.line,
            at.column,
            "`public_key`: an empty list: give the device's recipient (age1…, `fleet-agent identity` prints \
             it), or remove the key",
        ));
    }
    let mut keys: Vec<String> = Vec::new();
    for (key, pos) in items {
        if let Err(e) = crate::recipient::parse(&key) {
            problems.push(Diagnostic::error(
                path,
                pos.line,
                pos.column,
                format!(
                    "`public_key`: {e}: use the recipient `fleet-agent identity` prints on the device \
                     (or `fleet-bundler enroll accept` writes)"
                ),
            ));
        } else if keys.contains(&key) {
            problems.push(Diagnostic::error(
                path,
                pos.line,
                pos.column,
                format!("`public_key`: {key} is listed twice"),
            ));
        } else {
            keys.push(key);
        }
    }
    keys
}

fn load_app(
    snapshot: &Snapshot,
    app: &str,
    file_root: &str,
    fleet_vars: &Vars,
    templates: &mut Environment<'static>,
    diags: &mut Vec<Diagnostic>,
    undecrypted: &mut Vec<String>,
) -> Option<App> {
    let dir = format!("apps/{app}");
    let app_yaml = format!("{dir}/app.yaml");
    if let Err(e) = validate_id("app name", app) {
        diags.push(Diagnostic::error(dir.as_str(), 0, 0, format!("the directory name is the app name: {e}")));
        return None;
    }
    let Some(bytes) = snapshot.files.get(&app_yaml) else {
        if snapshot.too_large.contains_key(&app_yaml) {
            return None; // reported with its size
        }
        diags.push(Diagnostic::error(
            app_yaml.as_str(),
            0,
            0,
            "missing: every app directory needs an app.yaml (it may be empty: `{}`)",
        ));
        return None;
    };
    let parsed: AppFile = match text(&app_yaml, bytes) {
        Ok(t) if t.trim().is_empty() => AppFile::default(),
        Ok(t) => match yaml::parse_all(&app_yaml, t, &APP_SHAPE) {
            Ok(a) => a,
            Err(found) => {
                diags.extend(found);
                return None;
            }
        },
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let app_root = format!("{file_root}/{app}");
    let err = |diags: &mut Vec<Diagnostic>, pos: Pos, msg: String| {
        diags.push(Diagnostic::error(app_yaml.as_str(), pos.line, pos.column, msg));
    };

    let selector = parsed
        .selector
        .as_ref()
        .map(|s| s.value.iter().map(|(k, v)| (k.clone(), v.value.0.clone())).collect::<BTreeMap<_, _>>());
    if let Some(sel) = &parsed.selector {
        for (k, v) in &sel.value {
            if v.value.0.is_empty() {
                err(
                    diags,
                    Pos::of(v),
                    format!("selector label `{k}` lists no value: give a value or a list of values"),
                );
            }
        }
    }

    let mut files = Vec::new();
    let mut file_targets = BTreeMap::new();
    let mut targets_seen: BTreeMap<String, Pos> = BTreeMap::new();
    for entry in &parsed.files {
        let e = &entry.value;
        let src_pos = Pos::of(&e.source);
        let Some(source) = compose::normalize_relative(&e.source.value).filter(|s| !s.is_empty()) else {
            err(
                diags,
                src_pos,
                format!("file source `{}` must be a path inside apps/{app}/", e.source.value),
            );
            continue;
        };
        let repo_path = format!("{dir}/{source}");
        let Some(content) = snapshot.files.get(&repo_path) else {
            if snapshot.too_large.contains_key(&repo_path) {
                continue; // reported with the file's size
            }
            err(
                diags,
                src_pos,
                format!(
                    "file source `{}` does not exist: expected {repo_path} in the commit",
                    e.source.value
                ),
            );
            continue;
        };
        // A `.age` source is a secret: delivered without the suffix, 0600 by default.
        let sealed = source.ends_with(".age");
        let target = match &e.target {
            None => format!("{app_root}/{}", source.strip_suffix(".age").unwrap_or(&source)),
            Some(t) => match normalize_absolute(&t.value) {
                Some(p) if p != "/" => p,
                _ => {
                    err(
                        diags,
                        Pos::of(t),
                        format!("file target `{}` must be an absolute file path without `..`", t.value),
                    );
                    continue;
                }
            },
        };
        if let Some(first) = targets_seen.insert(target.clone(), src_pos) {
            err(
                diags,
                src_pos,
                format!("target {target} is also written by the file at line {}", first.line),
            );
        }
        let mut mode = match &e.mode {
            None if sealed => 0o600,
            None => 0o644,
            Some(m) => match u32::from_str_radix(m.value.0.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o7777 => v,
                _ => {
                    err(
                        diags,
                        Pos::of(m),
                        format!(
                            "mode `{}` is not octal permission bits such as \"0644\" or \"0600\"",
                            m.value.0
                        ),
                    );
                    continue;
                }
            },
        };
        let owner = match &e.owner {
            None => None,
            Some(o) => {
                let parsed = o
                    .value
                    .0
                    .split_once(':')
                    .and_then(|(u, g)| Some(Owner { uid: u.parse().ok()?, gid: g.parse().ok()? }));
                if parsed.is_none() {
                    err(
                        diags,
                        Pos::of(o),
                        format!("owner `{}` must be numeric \"uid:gid\", e.g. \"1000:1000\"", o.value.0),
                    );
                    continue;
                }
                parsed
            }
        };
        if is_lfs_pointer(content) {
            diags.push(lfs_diagnostic(&repo_path, content, 0, 0));
            err(
                diags,
                src_pos,
                format!("file source `{}` is a Git LFS pointer (see {repo_path})", e.source.value),
            );
            continue;
        }
        let mut uses_secrets = false;
        let content = if sealed {
            if e.template {
                err(
                    diags,
                    src_pos,
                    format!(
                        "{repo_path} is a secret (.age) and cannot be a template: drop `template: true`, or \
                         render a plain template from secret variables"
                    ),
                );
                continue;
            }
            match decrypt_secret(snapshot, &repo_path, content, undecrypted) {
                Ok(plain) => FileContent::Static(plain),
                Err(message) => {
                    err(diags, src_pos, message);
                    continue;
                }
            }
        } else if e.template {
            let Ok(source_text) = std::str::from_utf8(content) else {
                err(
                    diags,
                    src_pos,
                    format!(
                        "{repo_path} is not UTF-8 text, so it cannot be a template: drop `template: true`"
                    ),
                );
                continue;
            };
            if let Err(te) = templates.add_template_owned(repo_path.clone(), source_text.to_string()) {
                diags.push(template_diagnostic(&repo_path, &te));
                continue;
            }
            uses_secrets = templates
                .get_template(&repo_path)
                .is_ok_and(|t| t.undeclared_variables(false).contains("secrets"));
            if uses_secrets && e.mode.is_none() {
                mode = 0o600;
            }
            FileContent::Template
        } else {
            FileContent::Static(content.clone())
        };
        // Compose bind-mounts a secret file by its name on the device (no `.age`) too.
        if let Some(plain) = source.strip_suffix(".age").filter(|_| sealed) {
            file_targets.insert(plain.to_string(), target.clone());
        }
        file_targets.insert(source, target.clone());
        files.push(FileSpec {
            secret: sealed || uses_secrets || e.secret || looks_secret(&target) || looks_secret(&repo_path),
            sealed,
            uses_secrets,
            repo_path,
            target,
            mode,
            owner,
            content,
        });
    }

    let compose_name = match &parsed.compose {
        Some(c) => match compose::normalize_relative(&c.value).filter(|s| !s.is_empty()) {
            Some(n) if committed(snapshot, &format!("{dir}/{n}")) => Some(n),
            _ => {
                err(diags, Pos::of(c), format!("compose file `{}` does not exist in apps/{app}/", c.value));
                None
            }
        },
        None => {
            let default = format!("{dir}/compose.yaml");
            if committed(snapshot, &default) {
                Some("compose.yaml".to_string())
            } else {
                for alt in ["docker-compose.yaml", "docker-compose.yml", "compose.yml"] {
                    if snapshot.files.contains_key(&format!("{dir}/{alt}")) {
                        diags.push(Diagnostic::warning(
                            format!("{dir}/{alt}"),
                            0,
                            0,
                            format!("ignored: name it compose.yaml or set `compose: {alt}` in app.yaml"),
                        ));
                    }
                }
                None
            }
        }
    };
    let compose = compose_name.and_then(|name| {
        let file = format!("{dir}/{name}");
        let bytes = snapshot.files.get(&file)?;
        let source = match text(&file, bytes) {
            Ok(t) => t,
            Err(d) => {
                diags.push(d);
                return None;
            }
        };
        let parsed: ComposeFile = match compose::parse_file(&file, source) {
            Ok(p) => p,
            Err(found) => {
                diags.extend(found);
                return None;
            }
        };
        let env_files: BTreeMap<String, Vec<u8>> = compose::env_file_paths(&parsed, &file, app)
            .into_iter()
            .filter_map(|path| snapshot.files.get(&path).map(|bytes| (path, bytes.clone())))
            .collect();
        let dotenv = read_dotenv(snapshot, &file, diags);
        let sources = compose_sources(snapshot, &parsed, &file, app, diags, undecrypted);
        // Check once for every device: unset variables are not errors here.
        let ctx = AppContext {
            app,
            file: &file,
            app_root: &app_root,
            file_targets: &file_targets,
            env_files: &env_files,
            sources: &sources,
        };
        // Per device: `${VAR}`s, env files that use them, and profiles (COMPOSE_PROFILES).
        let has_vars = source.contains('$')
            || env_files.values().any(|bytes| bytes.contains(&b'$'))
            || parsed.services.0.iter().any(|(_, svc)| !svc.value.profiles.is_empty());
        let lookup =
            |name: &str| fleet_vars.get(name).and_then(scalar_var).or_else(|| dotenv.get(name).cloned());
        let (translated, found) = compose::translate(&parsed, &ctx, &lookup, has_vars);
        let known = found.iter().map(|d| (d.line, d.column, d.message.clone())).collect();
        let failed = found.iter().any(Diagnostic::is_error);
        diags.extend(found);
        if failed {
            return None;
        }
        Some(ComposeApp {
            secret_targets: compose::secret_targets(&parsed, &app_root),
            file,
            parsed,
            file_targets: file_targets.clone(),
            app_root: app_root.clone(),
            dotenv,
            env_files,
            sources,
            fixed: (!has_vars).then_some(translated),
            known,
        })
    });
    Some(App { name: app.to_string(), selector, files, compose })
}

/// The plain bytes of a secret file (`*.age`) of the commit, decrypted with the CI's age
/// identity. Without an identity: empty, and `repo_path` is recorded in `undecrypted`
/// (validate and plan say they skipped it; build refuses). `Err` says what to do.
fn decrypt_secret(
    snapshot: &Snapshot,
    repo_path: &str,
    content: &[u8],
    undecrypted: &mut Vec<String>,
) -> Result<Vec<u8>, String> {
    if snapshot.age_identities.is_empty() {
        undecrypted.push(repo_path.to_string());
        return Ok(Vec::new());
    }
    secrets::decrypt(repo_path, content, &snapshot.age_identities)
}

/// The `file:`s of a Compose file's `secrets:` and `configs:` the commit holds, read
/// (`.age` decrypted with [`decrypt_secret`]); the translation reports the missing ones.
fn compose_sources(
    snapshot: &Snapshot,
    parsed: &ComposeFile,
    compose_file: &str,
    app: &str,
    diags: &mut Vec<Diagnostic>,
    undecrypted: &mut Vec<String>,
) -> BTreeMap<String, compose::SourceFile> {
    let mut out = BTreeMap::new();
    for path in compose::file_source_paths(parsed, compose_file, app) {
        let sealed = path.ends_with(".age");
        let content = match snapshot.files.get(&path) {
            None if snapshot.too_large.contains_key(&path) => {
                Err(format!("{path} is larger than the limit for one file read from Git (see its error)"))
            }
            None => continue,
            Some(bytes) if is_lfs_pointer(bytes) => {
                diags.push(lfs_diagnostic(&path, bytes, 0, 0));
                Err(format!("{path} is a Git LFS pointer, not the file (see its error)"))
            }
            Some(bytes) if sealed => decrypt_secret(snapshot, &path, bytes, undecrypted),
            Some(bytes) => Ok(bytes.clone()),
        };
        out.insert(path, compose::SourceFile { content, sealed });
    }
    out
}

/// The `.env` beside `compose_file` (Compose's default variables), if the commit holds
/// one; its problems are reported with its path and line.
fn read_dotenv(
    snapshot: &Snapshot,
    compose_file: &str,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, String> {
    let dir = compose_file.rsplit_once('/').map_or("", |(dir, _)| dir);
    let path = format!("{dir}/.env");
    let Some(bytes) = snapshot.files.get(&path) else { return BTreeMap::new() };
    let Ok(text) = std::str::from_utf8(bytes) else {
        diags.push(Diagnostic::error(path, 0, 0, "not UTF-8 text: a .env file holds KEY=VALUE lines"));
        return BTreeMap::new();
    };
    match compose::parse_env_file(text) {
        Ok(entries) => entries.into_iter().map(|e| (e.key, e.value)).collect(),
        Err((line, message)) => {
            diags.push(Diagnostic::error(path, line, 0, message));
            BTreeMap::new()
        }
    }
}

/// Whether the commit holds `path`, read or too large to read (reported with its size).
fn committed(snapshot: &Snapshot, path: &str) -> bool {
    snapshot.files.contains_key(path) || snapshot.too_large.contains_key(path)
}

/// A variable's value for `${VAR}`: scalars only.
fn scalar_var(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn template_diagnostic(repo_path: &str, e: &minijinja::Error) -> Diagnostic {
    let detail = match (e.kind(), e.detail()) {
        (minijinja::ErrorKind::OutOfFuel, _) => format!(
            "the template does too much work (more than {TEMPLATE_FUEL} steps or about {} of data in one \
             render): loops nested over large ranges or lists, or very large strings; make it do less",
            human_size(TEMPLATE_FUEL * 64)
        ),
        (_, Some(d)) => format!("{}: {d}", e.kind()),
        (_, None) => e.kind().to_string(),
    };
    Diagnostic::error(
        e.name().unwrap_or(repo_path),
        e.line().unwrap_or(0) as u64,
        0,
        format!("template: {detail}"),
    )
}

/// What to add to a strict-mode "`device.vars.prot` is undefined" message: the
/// nearest name defined where the missing one was looked up (`names` holds what the
/// template sees), or where such a variable is set.
fn undefined_hint(message: &str, names: &serde_json::Value) -> Option<String> {
    let (_, rest) = message.split_once('`')?;
    let (expr, _) = rest.split_once("` is undefined")?;
    let parts: Vec<&str> = expr.split('.').collect();
    let (missing, parent) = parts.split_last()?;
    let mut node = names;
    for part in parent {
        node = node.get(part)?;
    }
    let defined = node.as_object()?;
    if let Some(name) = yaml::nearest(missing, defined.keys().map(String::as_str)) {
        let path = parent.iter().copied().chain([name]).collect::<Vec<_>>().join(".");
        return Some(format!(": did you mean `{path}`?"));
    }
    match parent {
        ["device", "vars"] => Some(": set it under `vars:` in devices/<id>.yaml or fleet.yaml".into()),
        ["device", "labels"] => Some(": set it under `labels:` in devices/<id>.yaml".into()),
        ["fleet", "vars"] => Some(": set it under `vars:` in fleet.yaml".into()),
        [] => Some(": templates see `device`, `fleet` and `app`".into()),
        _ => None,
    }
}

/// `/a//b/./c/` → `/a/b/c`; `None` for relative paths or `..`.
pub fn normalize_absolute(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

#[derive(Serialize)]
struct TemplateDevice<'a> {
    id: &'a str,
    labels: &'a BTreeMap<String, String>,
    vars: &'a Vars,
}

#[derive(Serialize)]
struct TemplateFleet<'a> {
    name: &'a str,
    topic_prefix: &'a str,
    vars: &'a Vars,
}

#[derive(Serialize)]
struct TemplateApp<'a> {
    name: &'a str,
}

/// An output that refuses to grow past `limit` bytes.
struct Capped {
    out: Vec<u8>,
    limit: u64,
    exceeded: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() as u64 + buf.len() as u64 > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Fleet {
    /// Renders one template into at most `max_file_size` bytes, within the fuel limit.
    fn render_template(&self, repo_path: &str, ctx: minijinja::Value) -> Result<Vec<u8>, Diagnostic> {
        let template =
            self.templates.get_template(repo_path).map_err(|e| template_diagnostic(repo_path, &e))?;
        let mut out = Capped { out: Vec::new(), limit: self.max_file_size, exceeded: false };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => Ok(out.out),
            Err(_) if out.exceeded => Err(Diagnostic::error(
                repo_path,
                0,
                0,
                format!(
                    "template: renders more than {}, the limit of one file: make it output less, or raise \
                     --max-file-size",
                    human_size(self.max_file_size)
                ),
            )),
            Err(e) => Err(template_diagnostic(repo_path, &e)),
        }
    }

    /// The agent release rule of `device`: its own `agent:`, else the first rule of
    /// `fleet.yaml`'s `agent:` its labels match; `None`: its agent is left as it is.
    pub fn agent_rule<'a>(&'a self, device: &'a Device) -> Option<&'a crate::agent_release::Rule> {
        device.agent.as_ref().or_else(|| self.agent.iter().find(|r| r.selects(&device.labels)))
    }

    /// Every agent release rule: `fleet.yaml`'s, then the device files' (by device id).
    pub fn agent_rules(&self) -> impl Iterator<Item = &crate::agent_release::Rule> + '_ {
        self.agent.iter().chain(self.devices.values().filter_map(|d| d.agent.as_ref()))
    }

    /// The apps a device runs.
    pub fn apps_of<'a>(&'a self, device: &'a Device) -> impl Iterator<Item = &'a App> + 'a {
        self.apps.iter().filter(move |a| a.selects(device))
    }

    /// Renders one device's desired state (images not yet pinned). Diagnostics name
    /// the device.
    pub fn render(&self, device: &Device) -> (DesiredState, Vec<Diagnostic>) {
        let mut diags = Vec::new();
        let mut state = DesiredState::default();
        let mut merged_vars = self.vars.clone();
        merged_vars.extend(device.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        let tdevice = TemplateDevice { id: &device.id, labels: &device.labels, vars: &merged_vars };
        let tfleet = TemplateFleet { name: &self.name, topic_prefix: &self.topic_prefix, vars: &self.vars };
        let device_value = minijinja::Value::from(Serde(&tdevice));
        let fleet_value = minijinja::Value::from(Serde(&tfleet));
        let mut device_secrets = self.secret_vars.clone();
        if let Some(own) = self.device_secret_vars.get(&device.id) {
            device_secrets.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let tracker = secrets::Tracker::new(device_secrets.clone());
        let mut file_owner: BTreeMap<String, &str> = BTreeMap::new();
        let mut container_owner: BTreeMap<String, &str> = BTreeMap::new();
        let tag = |mut d: Diagnostic| {
            d.devices = vec![device.id.clone()];
            d
        };
        for app in self.apps_of(device) {
            for f in &app.files {
                let mut sealed = f.sealed || f.uses_secrets;
                let content = match &f.content {
                    FileContent::Static(bytes) => bytes.clone(),
                    // Secrets not decrypted (validate, plan): named in `undecrypted`.
                    FileContent::Template if f.uses_secrets && self.secret_names_unknown => Vec::new(),
                    FileContent::Template => {
                        let ctx = minijinja::context! {
                            device => device_value.clone(),
                            fleet => fleet_value.clone(),
                            app => minijinja::Value::from(Serde(TemplateApp { name: &app.name })),
                            secrets => tracker.value(),
                        };
                        tracker.take_touched();
                        let rendered = self.render_template(&f.repo_path, ctx);
                        sealed |= tracker.take_touched();
                        match rendered {
                            Ok(bytes) => bytes,
                            Err(mut d) => {
                                let names = serde_json::json!({
                                    "device": &tdevice,
                                    "fleet": &tfleet,
                                    "app": TemplateApp { name: &app.name },
                                });
                                if let Some(hint) = undefined_hint(&d.message, &names) {
                                    d.message.push_str(&hint);
                                }
                                diags.push(tag(d));
                                continue;
                            }
                        }
                    }
                };
                if let Some(other) = file_owner.insert(f.target.clone(), &app.name) {
                    diags.push(tag(Diagnostic::error(
                        f.repo_path.as_str(),
                        0,
                        0,
                        format!("target {} is also delivered by app `{other}` to this device", f.target),
                    )));
                    continue;
                }
                let file = ManagedFile { path: f.target.clone(), mode: f.mode, owner: f.owner, content };
                if sealed {
                    state.secrets.files.push(file);
                } else {
                    state.files.push(file);
                }
            }
            let Some(c) = &app.compose else { continue };
            let translated = match &c.fixed {
                Some(t) => t.clone(),
                None => {
                    let ctx = AppContext {
                        app: &app.name,
                        file: &c.file,
                        app_root: &c.app_root,
                        file_targets: &c.file_targets,
                        env_files: &c.env_files,
                        sources: &c.sources,
                    };
                    // A secret interpolates to a marker; `seal_compose_env` puts it where it went.
                    let lookup = |name: &str| {
                        if device_secrets.contains_key(name) {
                            return Some(secrets::marker(name));
                        }
                        let plain = merged_vars
                            .get(name)
                            .and_then(scalar_var)
                            .or_else(|| c.dotenv.get(name).cloned());
                        match plain {
                            None if self.secret_names_unknown => Some(secrets::marker(name)),
                            found => found,
                        }
                    };
                    let (mut t, found) = compose::translate(&c.parsed, &ctx, &lookup, false);
                    for mut d in found {
                        d.message = secrets::redact(&d.message);
                        if !c.known.contains(&(d.line, d.column, d.message.clone())) {
                            diags.push(tag(d));
                        }
                    }
                    for d in secrets::seal_compose_env(
                        &c.file,
                        &mut t.containers,
                        &device_secrets,
                        &mut state.secrets,
                    ) {
                        diags.push(tag(d));
                    }
                    t
                }
            };
            for f in translated.files {
                if let Some(other) = file_owner.insert(f.file.path.clone(), &app.name) {
                    diags.push(tag(Diagnostic::error(
                        c.file.as_str(),
                        0,
                        0,
                        format!("target {} is also delivered by app `{other}` to this device", f.file.path),
                    )));
                    continue;
                }
                if f.sealed {
                    state.secrets.files.push(f.file);
                } else {
                    state.files.push(f.file);
                }
            }
            for spec in translated.containers {
                if let Some(other) = container_owner.insert(spec.name.clone(), &app.name) {
                    diags.push(tag(Diagnostic::error(
                        c.file.as_str(),
                        0,
                        0,
                        format!(
                            "container name `{}` is also used by app `{other}` on this device",
                            spec.name
                        ),
                    )));
                    continue;
                }
                state.containers.push(spec);
            }
            for n in translated.networks {
                if !state.networks.iter().any(|x| x.name == n.name) {
                    state.networks.push(n);
                }
            }
            for v in translated.volumes {
                if !state.volumes.iter().any(|x| x.name == v.name) {
                    state.volumes.push(v);
                }
            }
        }
        match device.maintenance.over(&self.maintenance).resolve(&device.id, &device.labels) {
            Ok(m) => state.maintenance = m,
            Err(d) => diags.push(tag(d)),
        }
        // The declared release; `build` fills in its binaries (`--agent-release`).
        state.agent = self.agent_rule(device).map(crate::agent_release::Rule::declared);
        state.canonicalize();
        diags.extend(self.policy_diagnostics(device, &state).into_iter().map(tag));
        // A template or Compose error may quote a value it rendered: never a secret's.
        for d in &mut diags {
            d.message = secrets::redact_values(&d.message, &device_secrets);
        }
        (state, diags)
    }

    /// Seals `state`'s secrets to `device`'s keys (`public_key:`), or says why not.
    pub fn seal(&self, device: &Device, state: &mut DesiredState) -> Result<(), String> {
        if state.secrets.is_empty() {
            return Ok(());
        }
        let names = || {
            let files = state.secrets.files.iter().map(|f| f.path.clone());
            let env = state
                .secrets
                .env
                .iter()
                .flat_map(|(c, vars)| vars.keys().map(move |k| format!("{c}: env {k}")));
            files.chain(env).collect::<Vec<_>>().join(", ")
        };
        let Some(seed) = &self.seal_seed else {
            return Err(format!(
                "secrets ({}) need the CI's age identity to be decrypted: pass --age-identity FILE \
                 (or FLEET_AGE_IDENTITY_FILE, or the key itself in FLEET_AGE_IDENTITY)",
                names()
            ));
        };
        if device.public_keys.is_empty() {
            return Err(format!(
                "device {} gets secrets ({}) but has no `public_key:` in devices/{}.yaml to encrypt them to: \
                 enroll it (fleet-agent enroll, then fleet-bundler enroll accept {})",
                device.id,
                names(),
                device.id,
                device.id
            ));
        }
        let mut recipients = Vec::new();
        for key in &device.public_keys {
            recipients.push(
                fleet_spec::age::parse_recipient(key)
                    .map_err(|e| format!("devices/{}.yaml: {e}", device.id))?,
            );
        }
        state.seal(&recipients, seed);
        Ok(())
    }

    /// Where `device`'s engine policy would refuse its `state`, at the Compose service
    /// (or key) at fault. An unpinned image on a `require_digest` device is a warning
    /// here (`build --resolve-digests` pins it; the build checks again after pinning).
    fn policy_diagnostics(&self, device: &Device, state: &DesiredState) -> Vec<Diagnostic> {
        let settings = device.policy.over(&self.policy);
        crate::policy::violations(&settings, &self.file_root, state)
            .iter()
            .map(|v| {
                let place =
                    self.apps.iter().find(|a| a.name == v.app).and_then(|a| a.compose.as_ref()).and_then(
                        |c| {
                            let (key, svc) =
                                c.parsed.services.0.iter().find(|(k, _)| k.value == v.service)?;
                            Some((c.file.as_str(), crate::policy::position(v, Pos::of(key), &svc.value)))
                        },
                    );
                let (file, at) = place.unwrap_or(("fleet.yaml", Pos::default()));
                let message = crate::policy::message(v);
                if v.rule == fleet_spec::policy::Rule::Digest {
                    Diagnostic::warning(
                        file,
                        at.line,
                        at.column,
                        format!("{message}; or pin it with `build --resolve-digests`"),
                    )
                } else {
                    Diagnostic::error(file, at.line, at.column, message)
                }
            })
            .collect()
    }

    /// After pinning: the first image `device`'s policy refuses for want of a digest.
    pub fn unpinned_refusal(&self, device: &Device, state: &DesiredState) -> Option<String> {
        let settings = device.policy.over(&self.policy);
        let v = crate::policy::violations(&settings, &self.file_root, state);
        v.iter().find(|v| v.rule == fleet_spec::policy::Rule::Digest).map(crate::policy::message)
    }

    /// When `fleet.yaml` is broken, devices are rendered with defaults in place of its
    /// vars, policy and file_root, so a problem found while rendering may be only a
    /// consequence of it: each is marked as such, after one note that says why.
    fn mark_consequences(&self, diags: &mut Vec<Diagnostic>) {
        if !self.root_broken {
            return;
        }
        for d in diags.iter_mut() {
            d.message = format!("{CONSEQUENCE}{}", d.message);
        }
        diags.push(Diagnostic::warning(
            "devices/",
            0,
            0,
            "fleet.yaml has errors, so devices were rendered without its vars, policy and file_root: \
             problems marked \"maybe because of fleet.yaml\" may go away once it is fixed; fix it first",
        ));
    }

    /// Renders every device in parallel to check it, keeping no state (memory stays
    /// flat for large fleets). Returns the merged diagnostics and the image references
    /// that are not pinned by digest.
    pub fn check_all(&self) -> (Vec<Diagnostic>, BTreeSet<String>) {
        let results: Vec<(Vec<Diagnostic>, BTreeSet<String>)> = self
            .devices
            .par_iter()
            .map(|(_, device)| {
                let (state, diags) = self.render(device);
                (diags, crate::registry::unpinned([&state]))
            })
            .collect();
        let mut diags = Vec::new();
        let mut images = BTreeSet::new();
        for (d, i) in results {
            diags.extend(d);
            images.extend(i);
        }
        self.mark_consequences(&mut diags);
        (crate::diag::merge(diags), images)
    }

    /// Renders every device in parallel. Returns the states of the devices that
    /// rendered without error, and all diagnostics (merged across devices).
    pub fn render_all(&self) -> (BTreeMap<String, DesiredState>, Vec<Diagnostic>) {
        let results: Vec<(String, DesiredState, Vec<Diagnostic>)> = self
            .devices
            .par_iter()
            .map(|(id, device)| {
                let (state, diags) = self.render(device);
                (id.clone(), state, diags)
            })
            .collect();
        let mut states = BTreeMap::new();
        let mut diags = Vec::new();
        for (id, state, d) in results {
            if !d.iter().any(Diagnostic::is_error) {
                states.insert(id, state);
            }
            diags.extend(d);
        }
        self.mark_consequences(&mut diags);
        (states, crate::diag::merge(diags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_names() {
        assert!(looks_secret("/etc/app/tls.key"));
        assert!(looks_secret("apps/x/files/db-password.txt"));
        assert!(!looks_secret("/etc/nginx/nginx.conf"));
    }

    #[test]
    fn an_undefined_variable_gets_the_nearest_defined_name() {
        let names = serde_json::json!({
            "device": {"id": "d", "labels": {"site": "a"}, "vars": {"port": 1, "proto": "tcp"}},
            "fleet": {"name": "f", "topic_prefix": "fleet", "vars": {}},
            "app": {"name": "web"},
        });
        let hint = |m: &str| undefined_hint(m, &names);
        assert_eq!(
            hint("undefined value: `device.vars.prot` is undefined").as_deref(),
            Some(": did you mean `device.vars.proto`?")
        );
        assert_eq!(
            hint("undefined value: `devce` is undefined").as_deref(),
            Some(": did you mean `device`?")
        );
        assert_eq!(
            hint("undefined value: `device.lables` is undefined").as_deref(),
            Some(": did you mean `device.labels`?")
        );
        assert_eq!(
            hint("undefined value: `device.vars.zzz` is undefined").as_deref(),
            Some(": set it under `vars:` in devices/<id>.yaml or fleet.yaml")
        );
        assert_eq!(hint("syntax error: unexpected end of input"), None);
    }

    #[test]
    fn absolute_paths_normalize() {
        assert_eq!(normalize_absolute("/a//b/./c/").as_deref(), Some("/a/b/c"));
        assert_eq!(normalize_absolute("a/b"), None);
        assert_eq!(normalize_absolute("/a/../b"), None);
    }
}
