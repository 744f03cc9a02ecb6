//! Plan: what changes on which device between two revisions.
//!
//! Per device: files added, removed or changed (with a unified diff), containers added,
//! removed or changed (with the names of the changed fields), networks and volumes
//! added or removed. Secrets-free by construction: file content is hidden for files
//! marked `secret: true` or named like secrets (see [`crate::render::looks_secret`]),
//! and container changes name fields (`env.DB_PASSWORD`), never values, except the
//! image reference.
//!
//! Files that travel as artifacts (bundle format 5; the caller splits the states as
//! `build` does, [`crate::artifacts::split`]) are named with their size and short
//! sha256, never diffed.
//!
//! The agent release a device is declared to run (`fleet.yaml` `agent:`) is compared by
//! version and `allow_downgrade` (rendered states carry no binaries: `build` adds them
//! from `--agent-release`, so a rebuilt binary of the same version is not seen here).
//!
//! Pure: takes two sets of rendered states, returns a [`Plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use fleet_spec::model::{ContainerSpec, Entry};
use fleet_spec::DesiredState;
use serde::Serialize;

use crate::artifacts::short_size;
use crate::render::{looks_secret, Fleet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

impl Change {
    fn sign(self) -> char {
        match self {
            Change::Added => '+',
            Change::Removed => '-',
            Change::Changed => '~',
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileChange {
    pub path: String,
    pub change: Change,
    /// `[from, to]` in octal text when the mode changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<[String; 2]>,
    /// Whether the content changed (for `changed`).
    pub content_changed: bool,
    /// True when the content is not shown (secret or binary).
    pub hidden: bool,
    /// Unified diff of the content, when shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// `[from, to]` when the file travels as an artifact on either side: how its bytes
    /// travel there (`null` where the file is absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact: Option<[Option<Travel>; 2]>,
}

/// How a file's bytes travel in one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Travel {
    /// True: a blob beside the bundle; false: inside the bundle.
    pub artifact: bool,
    pub size: u64,
    /// Hex sha256 of the bytes; left out for files whose content is hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Travel {
    fn of(entry: &Entry<'_>, hidden: bool) -> Travel {
        Travel {
            artifact: matches!(entry, Entry::Artifact(_)),
            size: entry.size(),
            sha256: (!hidden).then(|| entry.sha256_hex()),
        }
    }

    /// `artifact, 200.0 MiB, sha256 ab12cd34ef56…` or `inline, 12.0 KiB`.
    fn text(&self) -> String {
        let mut text =
            format!("{}, {}", if self.artifact { "artifact" } else { "inline" }, short_size(self.size));
        if let (true, Some(sha)) = (self.artifact, &self.sha256) {
            let _ = write!(text, ", sha256 {}…", &sha[..sha.len().min(12)]);
        }
        text
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerChange {
    pub name: String,
    pub change: Change,
    /// Changed fields (`image`, `ports`, `env.KEY`, ...). `mounted_files` when only a
    /// bind-mounted managed file changed: the agent recreates the container.
    pub fields: Vec<String>,
    /// `[from, to]` when the image changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<[String; 2]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamedChange {
    pub name: String,
    pub change: Change,
}

#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    pub device: String,
    pub change: Change,
    pub files: Vec<FileChange>,
    pub containers: Vec<ContainerChange>,
    pub networks: Vec<NamedChange>,
    pub volumes: Vec<NamedChange>,
    /// `[from, to]` when the maintenance schedule changed (see
    /// [`crate::maintenance::describe`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<[String; 2]>,
    /// `[from, to]` when the declared agent release changed (`null`: none declared,
    /// the device's agent is left as it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<[Option<AgentDecl>; 2]>,
}

/// The agent release a revision declares for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentDecl {
    pub version: String,
    pub allow_downgrade: bool,
}

impl AgentDecl {
    fn of(state: &DesiredState) -> Option<AgentDecl> {
        state
            .agent
            .as_ref()
            .map(|a| AgentDecl { version: a.version.clone(), allow_downgrade: a.allow_downgrade })
    }

    /// `0.10.0` or `0.9.0 (allow_downgrade)`.
    fn text(&self) -> String {
        if self.allow_downgrade {
            format!("{} (allow_downgrade)", self.version)
        } else {
            self.version.clone()
        }
    }
}

/// The plan's line for an agent release change.
fn agent_line(from: Option<&AgentDecl>, to: Option<&AgentDecl>) -> String {
    match (from, to) {
        (None, Some(b)) => format!("    + agent {}", b.text()),
        (Some(a), None) => {
            format!("    - agent {} (no rule any more: the device keeps the agent it runs)", a.text())
        }
        (Some(a), Some(b)) => {
            let older =
                fleet_spec::model::compare_versions(&b.version, &a.version) == Some(std::cmp::Ordering::Less);
            let note = if older && !b.allow_downgrade {
                " (older: a device that runs a newer agent refuses it, agent_downgrade_refused, unless \
                 allow_downgrade: true)"
            } else {
                ""
            };
            format!("    ~ agent {} -> {}{note}", a.text(), b.text())
        }
        (None, None) => String::new(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub from: String,
    pub to: String,
    /// Devices with changes only.
    pub devices: Vec<DevicePlan>,
    pub unchanged: usize,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.devices.is_empty()
    }

    /// A readable summary for people and CI comments.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let short = |c: &str| c[..c.len().min(12)].to_string();
        let _ = writeln!(
            out,
            "Plan {} -> {}: {} device(s) change, {} unchanged",
            short(&self.from),
            short(&self.to),
            self.devices.len(),
            self.unchanged
        );
        for d in &self.devices {
            let _ = writeln!(out, "\n{} device {}", d.change.sign(), d.device);
            for f in &d.files {
                let mut line = format!("    {} file {}", f.change.sign(), f.path);
                if let Some([a, b]) = &f.mode {
                    let _ = write!(line, " (mode {a} -> {b})");
                }
                match &f.artifact {
                    Some(sides) => {
                        match sides {
                            [Some(a), Some(b)] if a.text() != b.text() => {
                                let _ = write!(line, " ({} -> {})", a.text(), b.text());
                            }
                            [Some(t), None] | [_, Some(t)] => {
                                let _ = write!(line, " ({})", t.text());
                            }
                            [None, None] => {}
                        }
                        // A hidden artifact of the same size: its digest is not shown.
                        let named = sides.iter().flatten().any(|t| t.sha256.is_some());
                        if f.change == Change::Changed && f.content_changed && !named {
                            line.push_str(": content changed (hidden)");
                        }
                    }
                    None if f.hidden && f.content_changed => line.push_str(": content changed (hidden)"),
                    None => {}
                }
                let _ = writeln!(out, "{line}");
                if let Some(diff) = &f.diff {
                    for l in diff.lines() {
                        let _ = writeln!(out, "        {l}");
                    }
                }
            }
            for c in &d.containers {
                let mut line = format!("    {} container {}", c.change.sign(), c.name);
                if c.change == Change::Changed {
                    if c.fields == ["mounted_files"] {
                        line.push_str(": restarts (a mounted file changed)");
                    } else {
                        let _ = write!(line, ": {}", c.fields.join(", "));
                    }
                }
                let _ = writeln!(out, "{line}");
                if let Some([a, b]) = &c.image {
                    let _ = writeln!(out, "        image {a} -> {b}");
                }
            }
            for n in &d.networks {
                let _ = writeln!(out, "    {} network {}", n.change.sign(), n.name);
            }
            for v in &d.volumes {
                let _ = writeln!(out, "    {} volume {}", v.change.sign(), v.name);
            }
            if let Some([a, b]) = &d.maintenance {
                let _ = writeln!(out, "    ~ maintenance: {a} -> {b}");
            }
            if let Some([a, b]) = &d.agent {
                let _ = writeln!(out, "{}", agent_line(a.as_ref(), b.as_ref()));
            }
        }
        out
    }
}

/// Device paths whose content must not be shown, from either revision.
pub fn secret_paths(from: &Fleet, to: &Fleet) -> BTreeSet<String> {
    [from, to]
        .iter()
        .flat_map(|f| f.apps.iter())
        .flat_map(|a| a.secret_targets())
        .map(str::to_string)
        .collect()
}

/// Compares two renderings.
pub fn plan(
    from_commit: &str,
    to_commit: &str,
    from: &BTreeMap<String, DesiredState>,
    to: &BTreeMap<String, DesiredState>,
    secret: &BTreeSet<String>,
    context: usize,
) -> Plan {
    let empty = DesiredState::default();
    let ids: BTreeSet<&String> = from.keys().chain(to.keys()).collect();
    let mut devices = Vec::new();
    let mut unchanged = 0;
    for id in ids {
        let (a, b) = (from.get(id), to.get(id));
        let change = match (a, b) {
            (None, Some(_)) => Change::Added,
            (Some(_), None) => Change::Removed,
            _ => Change::Changed,
        };
        let (a, b) = (a.unwrap_or(&empty), b.unwrap_or(&empty));
        if change == Change::Changed && a == b {
            unchanged += 1;
            continue;
        }
        let d = DevicePlan {
            device: id.clone(),
            change,
            files: diff_files(a, b, secret, context),
            containers: diff_containers(a, b),
            networks: diff_names(a.networks.iter().map(|n| &n.name), b.networks.iter().map(|n| &n.name)),
            volumes: diff_names(a.volumes.iter().map(|v| &v.name), b.volumes.iter().map(|v| &v.name)),
            maintenance: (a.maintenance != b.maintenance).then(|| {
                [crate::maintenance::describe(&a.maintenance), crate::maintenance::describe(&b.maintenance)]
            }),
            agent: {
                let (from, to) = (AgentDecl::of(a), AgentDecl::of(b));
                (from != to).then_some([from, to])
            },
        };
        devices.push(d);
    }
    Plan { from: from_commit.into(), to: to_commit.into(), devices, unchanged }
}

fn diff_names<'a>(
    a: impl Iterator<Item = &'a String>,
    b: impl Iterator<Item = &'a String>,
) -> Vec<NamedChange> {
    let a: BTreeSet<&String> = a.collect();
    let b: BTreeSet<&String> = b.collect();
    let mut out: Vec<NamedChange> =
        a.difference(&b).map(|n| NamedChange { name: (*n).clone(), change: Change::Removed }).collect();
    out.extend(b.difference(&a).map(|n| NamedChange { name: (*n).clone(), change: Change::Added }));
    out.sort_by(|x, y| x.name.cmp(&y.name));
    out
}

fn diff_files<'a>(
    a: &'a DesiredState,
    b: &'a DesiredState,
    secret: &BTreeSet<String>,
    context: usize,
) -> Vec<FileChange> {
    // Secret files (sealed to the device) are listed too; their paths are in `secret`.
    let entries = |s: &'a DesiredState| -> BTreeMap<&'a str, Entry<'a>> {
        s.entries().chain(s.secrets.files.iter().map(Entry::Inline)).map(|e| (e.path(), e)).collect()
    };
    let (a_files, b_files) = (entries(a), entries(b));
    let paths: BTreeSet<&str> = a_files.keys().chain(b_files.keys()).copied().collect();
    let mut out = Vec::new();
    for path in paths {
        let hidden_by_name = secret.contains(path) || looks_secret(path);
        let (fa, fb) = (a_files.get(path), b_files.get(path));
        let change = match (fa, fb) {
            (None, Some(_)) => Change::Added,
            (Some(_), None) => Change::Removed,
            (Some(x), Some(y)) if x == y => continue,
            (Some(_), Some(_)) => Change::Changed,
            (None, None) => continue,
        };
        let mode = match (fa, fb) {
            (Some(x), Some(y)) if x.mode() != y.mode() => {
                Some([format!("{:04o}", x.mode()), format!("{:04o}", y.mode())])
            }
            _ => None,
        };
        let inline = |e: Option<&Entry<'a>>| match e {
            None => Some(&[][..]),
            Some(Entry::Inline(f)) => Some(f.content.as_slice()),
            Some(Entry::Artifact(_)) => None,
        };
        let (old, new) = match (inline(fa), inline(fb)) {
            (Some(old), Some(new)) => (old, new),
            // An artifact on either side: its bytes are not in the state; named, not diffed.
            _ => {
                let content_changed = match (fa, fb) {
                    (Some(x), Some(y)) => x.size() != y.size() || x.sha256_hex() != y.sha256_hex(),
                    _ => true,
                };
                let travel = |e: Option<&Entry<'a>>| e.map(|e| Travel::of(e, hidden_by_name));
                out.push(FileChange {
                    path: path.to_string(),
                    change,
                    mode,
                    content_changed,
                    hidden: true,
                    diff: None,
                    artifact: Some([travel(fa), travel(fb)]),
                });
                continue;
            }
        };
        let content_changed = old != new;
        let text = std::str::from_utf8(old).ok().zip(std::str::from_utf8(new).ok());
        let hidden = hidden_by_name || text.is_none();
        let diff = match text {
            Some((o, n)) if !hidden && content_changed => Some(
                similar::TextDiff::from_lines(o, n)
                    .unified_diff()
                    .context_radius(context)
                    .header(&format!("a{path}"), &format!("b{path}"))
                    .to_string(),
            ),
            _ => None,
        };
        out.push(FileChange {
            path: path.to_string(),
            change,
            mode,
            content_changed,
            hidden,
            diff,
            artifact: None,
        });
    }
    out
}

fn diff_containers(a: &DesiredState, b: &DesiredState) -> Vec<ContainerChange> {
    let a_c: BTreeMap<&str, &ContainerSpec> = a.containers.iter().map(|c| (c.name.as_str(), c)).collect();
    let b_c: BTreeMap<&str, &ContainerSpec> = b.containers.iter().map(|c| (c.name.as_str(), c)).collect();
    let names: BTreeSet<&str> = a_c.keys().chain(b_c.keys()).copied().collect();
    let mut out = Vec::new();
    for name in names {
        match (a_c.get(name), b_c.get(name)) {
            (None, Some(_)) => out.push(ContainerChange {
                name: name.into(),
                change: Change::Added,
                fields: vec![],
                image: None,
            }),
            (Some(_), None) => out.push(ContainerChange {
                name: name.into(),
                change: Change::Removed,
                fields: vec![],
                image: None,
            }),
            (Some(x), Some(y)) => {
                let mut fields = changed_fields(x, y);
                // Secret variables: named, never shown.
                let none = BTreeMap::new();
                let (sa, sb) =
                    (a.secrets.env.get(name).unwrap_or(&none), b.secrets.env.get(name).unwrap_or(&none));
                let keys: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
                fields.extend(
                    keys.into_iter()
                        .filter(|k| sa.get(*k) != sb.get(*k))
                        .map(|k| format!("env.{k} (secret)")),
                );
                if fields.is_empty() && a.container_hash(x) != b.container_hash(y) {
                    fields.push("mounted_files".into());
                }
                if fields.is_empty() {
                    continue;
                }
                let image =
                    (x.image != y.image).then(|| [x.image.pull_reference(), y.image.pull_reference()]);
                out.push(ContainerChange { name: name.into(), change: Change::Changed, fields, image });
            }
            (None, None) => {}
        }
    }
    out
}

/// Names of the top-level fields that differ; for maps (`env`, `labels`), the keys; for
/// `options`, the option (`options.logging`).
fn changed_fields(a: &ContainerSpec, b: &ContainerSpec) -> Vec<String> {
    // `options` is outside the spec's own encoding (bundle format 2 carries it apart).
    let json = |c: &ContainerSpec| {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("options".into(), serde_json::to_value(&c.options).unwrap_or_default());
        }
        v
    };
    let (serde_json::Value::Object(ja), serde_json::Value::Object(jb)) = (json(a), json(b)) else {
        return vec!["spec".into()];
    };
    let mut out = Vec::new();
    for (key, va) in &ja {
        let vb = jb.get(key).unwrap_or(&serde_json::Value::Null);
        if va == vb {
            continue;
        }
        match (va, vb) {
            (serde_json::Value::Object(ma), serde_json::Value::Object(mb)) if key == "options" => {
                // `options.logging`, `options.sysctls`, ...: the Compose keys, not one blob.
                let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
                for k in keys {
                    if ma.get(k) != mb.get(k) {
                        out.push(format!("options.{k}"));
                    }
                }
            }
            (serde_json::Value::Object(ma), serde_json::Value::Object(mb))
                if key == "env" || key == "labels" =>
            {
                let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
                for k in keys {
                    if ma.get(k) != mb.get(k) {
                        out.push(format!("{key}.{k}"));
                    }
                }
            }
            _ => out.push(key.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use fleet_spec::model::{ContainerOptions, ContainerSpec};

    use super::changed_fields;

    #[test]
    fn a_changed_option_is_named() {
        let a = ContainerSpec::default();
        let b = ContainerSpec {
            options: ContainerOptions { read_only: true, tty: true, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(changed_fields(&a, &b), ["options.read_only", "options.tty"]);
    }
}
