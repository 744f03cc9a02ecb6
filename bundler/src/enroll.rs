//! `fleet-bundler enroll list|accept`: the operator's side of enrollment.
//!
//! Devices retain a claim on `<prefix>/<fleet>/enroll/<device>` (`fleet-agent enroll`;
//! [`EnrollClaim`]). `list` reads every retained claim for a settle time and checks each
//! ([`check_claim`]): a claim that is not JSON, names another device or fleet than its
//! topic, carries a recipient whose checksum fails or a key id that is not its first
//! recipient's, or is too large, is listed as invalid with the reason, never trusted.
//! With `--repo`, each valid claim is compared with `devices/<id>.yaml` of the work tree
//! ([`Standing`]).
//!
//! `accept ID` writes the claim's recipients into `devices/<ID>.yaml` of the work tree,
//! never commits: acceptance is a reviewed commit like every change. An existing file
//! changes only in its `public_key:` lines ([`set_public_key`]); comments and every
//! other line stay byte for byte.
//!
//! A claim is unsigned: what makes it trusted is the operator's comparison of its key id
//! with what `fleet-agent identity` prints on the device, and the commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_spec::messages::EnrollClaim;
use fleet_spec::topic::{enroll_filter, enroll_topic, parse_enroll_topic, validate_id, DEFAULT_PREFIX};
use rumqttc::{Event, Packet, QoS};
use serde::Serialize;

use crate::diag::Diagnostic;
use crate::mqtt::{BrokerArgs, MqttError, Session};
use crate::recipient;

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_duration_ms(s).map(Duration::from_millis)
}

/// Most claims `list` keeps; more are left out with a warning (a flood of topics).
pub const MAX_CLAIMS: usize = 100_000;

/// Which fleet and broker, shared by `list` and `accept`.
#[derive(Debug, Clone, clap::Args)]
pub struct Where {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleet id (default: `name:` of fleet.yaml in --repo).
    #[arg(long)]
    pub fleet: Option<String>,
    /// Topic prefix (default: `topic_prefix:` of fleet.yaml in --repo, else "fleet").
    #[arg(long)]
    pub prefix: Option<String>,
    /// Longest wait for the broker: to connect, and for the subscription.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long to wait for more retained claims after the last one arrived.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub at: Where,
    /// The fleet repository's work tree: each claim is compared with devices/<id>.yaml
    /// (accepted, pending, rotation).
    #[arg(long)]
    pub repo: Option<PathBuf>,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AcceptArgs {
    /// The device id whose claim is accepted.
    #[arg(value_name = "ID")]
    pub device: String,
    #[command(flatten)]
    pub at: Where,
    /// The fleet repository's work tree (or a directory in it): devices/<ID>.yaml is
    /// written there, not committed.
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Labels of a new device file: `key=value,key=value` (an existing file keeps its
    /// own: edit them there).
    #[arg(long)]
    pub labels: Option<String>,
    /// Print what changed as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    /// A problem of the command line found after parsing: exit 64.
    #[error("{0}")]
    Usage(String),
    #[error(
        "no enrollment claim of {device} on {topic}: run `fleet-agent enroll` on the device (its broker \
         account needs `pattern write <prefix>/+/enroll/%u`), then accept again"
    )]
    NoClaim { device: String, topic: String },
    #[error("the claim of {device} on {topic} is invalid ({reason}); nothing was written: run `fleet-agent enroll` on the device again")]
    Invalid { device: String, topic: String, reason: String },
    /// The work tree's files are invalid: exit 65, each problem printed.
    #[error("{} is invalid: fix it, then accept again", .0.first().map(|d| d.file.as_str()).unwrap_or("the repository"))]
    Repository(Vec<Diagnostic>),
    #[error(
        "{path}: its public_key cannot be set line by line ({reason}); nothing was written: set it by hand: \
         public_key: {value}"
    )]
    Edit { path: String, reason: String, value: String },
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// The fleet and prefix: the flags', else fleet.yaml's in the work tree `root`.
fn scope(at: &Where, root: Option<&Path>) -> Result<(String, String), EnrollError> {
    let from_file = match (&at.fleet, root) {
        (Some(_), _) if at.prefix.is_some() => None,
        (_, Some(root)) => Some(read_fleet_yaml(root)?),
        (None, None) => {
            return Err(EnrollError::Usage(
                "pass --fleet NAME, or --repo DIR (its fleet.yaml names the fleet)".into(),
            ))
        }
        (Some(_), None) => None,
    };
    let fleet = match (&at.fleet, &from_file) {
        (Some(f), _) => f.clone(),
        (None, Some((name, _))) => name.clone(),
        (None, None) => return Err(EnrollError::Usage("pass --fleet NAME".into())),
    };
    let prefix = at
        .prefix
        .clone()
        .or_else(|| from_file.and_then(|(_, p)| p))
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    // Checked here, so that a bad id is a usage error before anything connects.
    enroll_filter(&prefix, &fleet).map_err(|e| EnrollError::Usage(e.to_string()))?;
    Ok((fleet, prefix))
}

/// `name:` and `topic_prefix:` of `root/fleet.yaml`.
fn read_fleet_yaml(root: &Path) -> Result<(String, Option<String>), EnrollError> {
    let path = root.join("fleet.yaml");
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => EnrollError::Usage(format!(
            "{} does not exist: pass the fleet repository's work tree as --repo, or --fleet NAME",
            path.display()
        )),
        _ => EnrollError::Io { what: "read", path: path.clone(), source },
    })?;
    let file: crate::format::FleetFile =
        crate::yaml::parse_all("fleet.yaml", &text, &crate::format::FLEET_SHAPE)
            .map_err(EnrollError::Repository)?;
    Ok((file.name.value, file.topic_prefix.map(|p| p.value)))
}

/// Checks one claim read on `topic`: the topic's shape, the claim's
/// ([`EnrollClaim::from_json`]), that it names the device of its topic and this fleet,
/// every recipient's checksum, and that `key_id` is its first recipient's. Returns the
/// device id (of the topic; `None` when the topic names none) and the claim or why it
/// is invalid.
pub fn check_claim(
    prefix: &str,
    fleet: &str,
    topic: &str,
    payload: &[u8],
) -> (Option<String>, Result<EnrollClaim, String>) {
    let device = match parse_enroll_topic(prefix, fleet, topic) {
        Ok(d) => d.to_string(),
        Err(e) => return (None, Err(format!("topic: {e}"))),
    };
    let verdict = (|| {
        let claim = EnrollClaim::from_json(payload).map_err(|e| e.to_string())?;
        if claim.device != device {
            return Err(format!(
                "the claim names device {:?}, but its topic is {device}'s",
                printable(&claim.device)
            ));
        }
        if claim.fleet != fleet {
            return Err(format!("the claim names fleet {:?}, not {fleet}", printable(&claim.fleet)));
        }
        let mut first = None;
        for r in &claim.recipients {
            let key = recipient::parse(r).map_err(|e| format!("`recipients`: {e}"))?;
            first.get_or_insert(key);
        }
        let first = first.expect("a checked claim lists a recipient");
        let want = recipient::key_id(&first);
        if claim.key_id != want {
            return Err(format!("`key_id` {} is not the first recipient's ({want})", claim.key_id));
        }
        Ok(claim)
    })();
    (Some(device), verdict)
}

/// How a valid claim stands against `devices/<id>.yaml` of the work tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// The file lists the claim's current key (its first recipient).
    Accepted,
    /// No file, or a file without `public_key:`: a new device.
    Pending,
    /// The file lists other keys than the claim's current one: the device rotated its
    /// key (or is another device with this id: compare the key id on the device).
    Rotation,
    /// The device file does not load; `validate --worktree` says why.
    FileInvalid,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Accepted => "accepted",
            Standing::Pending => "pending",
            Standing::Rotation => "rotation",
            Standing::FileInvalid => "file_invalid",
        }
    }

    /// The standing of `claim` when the device file lists `file_keys`.
    pub fn of(claim: &EnrollClaim, file_keys: &[String]) -> Standing {
        match claim.recipients.first() {
            _ if file_keys.is_empty() => Standing::Pending,
            Some(current) if file_keys.contains(current) => Standing::Accepted,
            _ => Standing::Rotation,
        }
    }
}

/// The public keys `devices/<device>.yaml` of the work tree `root` lists: `None` when
/// there is no such file.
fn file_keys(root: &Path, device: &str) -> Result<Option<(Vec<String>, String)>, EnrollError> {
    let rel = format!("devices/{device}.yaml");
    let path = root.join(&rel);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(EnrollError::Io { what: "read", path, source }),
    };
    let loaded = crate::render::load_device(&rel, &bytes).map_err(EnrollError::Repository)?;
    let text = String::from_utf8(bytes).expect("a device file that loaded is UTF-8");
    Ok(Some((loaded.public_keys, text)))
}

/// One claim as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The device of the topic (`null` when the topic names none).
    pub device: Option<String>,
    pub topic: String,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<EnrollClaim>,
    /// With `--repo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standing: Option<Standing>,
}

/// Subscribes to `filter` and collects the claims (topic → payload, the latest per
/// topic) until `settle` passed without one after the subscription was granted.
fn read_claims(at: &Where, filter: &str) -> Result<BTreeMap<String, Vec<u8>>, EnrollError> {
    let url = at.broker.single("enroll")?;
    let mut session = Session::connect_to(&at.broker, url, 0, at.timeout, 10)?;
    session.client.subscribe(filter, QoS::AtLeastOnce).map_err(|e| crate::mqtt::lost(&session, e))?;
    let what = "reading the enrollment claims";
    let mut claims = BTreeMap::new();
    let mut subscribed = false;
    let mut warned = false;
    let mut deadline = Instant::now() + at.timeout;
    loop {
        match session.next(deadline, what) {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    return Err(MqttError::Lost {
                        broker: session.broker.clone(),
                        what: what.into(),
                        message: format!(
                            "the broker refused the subscription to {filter}: the bundler's account needs \
                             read access there (ACL: topic read <prefix>/+/enroll/#)"
                        ),
                    }
                    .into());
                }
                subscribed = true;
                deadline = Instant::now() + at.settle;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.payload.is_empty() {
                    claims.remove(&p.topic);
                } else if claims.len() < MAX_CLAIMS || claims.contains_key(&p.topic) {
                    claims.insert(p.topic.clone(), p.payload.to_vec());
                } else if !warned {
                    warned = true;
                    eprintln!("warning: more than {MAX_CLAIMS} enrollment claims on {filter}: the rest are left out");
                }
                if subscribed {
                    deadline = Instant::now() + at.settle;
                }
            }
            Ok(_) => {}
            Err(MqttError::Timeout { .. }) if subscribed => break,
            Err(e) => return Err(e.into()),
        }
    }
    session.disconnect();
    Ok(claims)
}

/// `enroll list`: the rows, checked, in topic order (valid first).
pub fn list(args: &ListArgs) -> Result<Vec<Row>, EnrollError> {
    let root = match &args.repo {
        Some(r) => Some(crate::repo::worktree_root(r)?),
        None => None,
    };
    let (fleet, prefix) = scope(&args.at, root.as_deref())?;
    let filter = enroll_filter(&prefix, &fleet).map_err(|e| EnrollError::Usage(e.to_string()))?;
    let claims = read_claims(&args.at, &filter)?;
    let mut rows = Vec::with_capacity(claims.len());
    for (topic, payload) in claims {
        let (device, verdict) = check_claim(&prefix, &fleet, &topic, &payload);
        let row = match verdict {
            Ok(claim) => {
                let standing = match (&root, &device) {
                    (Some(root), Some(device)) => Some(match file_keys(root, device) {
                        Ok(Some((keys, _))) => Standing::of(&claim, &keys),
                        Ok(None) => Standing::Pending,
                        Err(EnrollError::Repository(_)) => Standing::FileInvalid,
                        Err(e) => return Err(e),
                    }),
                    _ => None,
                };
                Row { device, topic, valid: true, reason: None, claim: Some(claim), standing }
            }
            Err(reason) => {
                Row { device, topic, valid: false, reason: Some(reason), claim: None, standing: None }
            }
        };
        rows.push(row);
    }
    rows.sort_by_key(|r| !r.valid);
    Ok(rows)
}

/// `s` with everything but printable ASCII escaped: claims come from devices, and a
/// table must not carry a terminal's escape sequences or bidirectional overrides.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| if c == ' ' || c.is_ascii_graphic() { vec![c] } else { c.escape_unicode().collect() })
        .collect()
}

/// The table of `list`.
pub fn table(rows: &[Row], now: i64) -> String {
    let mut out = String::new();
    let with_standing = rows.iter().any(|r| r.standing.is_some());
    let valid: Vec<&Row> = rows.iter().filter(|r| r.valid).collect();
    let device_width =
        rows.iter().filter_map(|r| r.device.as_ref()).map(String::len).max().unwrap_or(6).max(6);
    if valid.is_empty() {
        out.push_str("no valid enrollment claim\n");
    } else {
        out.push_str(&format!(
            "{:<device_width$}  {:<16}  {:<62}  {:<10}  {:<8}  {:>6}{}\n",
            "DEVICE",
            "KEY ID",
            "RECIPIENT",
            "AGENT",
            "ARCH",
            "AGE",
            if with_standing { "  STANDING" } else { "" }
        ));
        for row in &valid {
            let Some(claim) = &row.claim else { continue };
            out.push_str(&format!(
                "{:<device_width$}  {:<16}  {:<62}  {:<10}  {:<8}  {:>6}{}\n",
                claim.device,
                claim.key_id,
                claim.recipients[0],
                printable(&claim.agent_version),
                printable(&claim.arch),
                crate::timefmt::age(now - claim.at),
                row.standing.map(|s| format!("  {}", s.as_str())).unwrap_or_default()
            ));
            for older in &claim.recipients[1..] {
                out.push_str(&format!(
                    "{:<device_width$}  {:<16}  {older}  (older key, kept during a rotation)\n",
                    "", ""
                ));
            }
        }
    }
    for row in rows.iter().filter(|r| !r.valid) {
        out.push_str(&format!(
            "invalid claim on {}: {}\n",
            printable(&row.topic),
            printable(row.reason.as_deref().unwrap_or_default())
        ));
    }
    out
}

/// What `accept` did.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub device: String,
    /// Repository-relative: `devices/<id>.yaml`.
    pub file: String,
    /// The file is new.
    pub created: bool,
    /// The file changed (false: it listed exactly these keys already).
    pub changed: bool,
    pub key_id: String,
    pub public_keys: Vec<String>,
    /// What `public_key:` listed before.
    pub previous: Vec<String>,
    /// The work tree's root.
    pub repo: PathBuf,
    /// `--labels` left out because the file exists.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub labels_ignored: bool,
}

/// `enroll accept`: reads and checks the claim of `args.device` and writes its keys into
/// `devices/<id>.yaml` of the work tree.
pub fn accept(args: &AcceptArgs) -> Result<Accepted, EnrollError> {
    validate_id("device id", &args.device).map_err(|e| EnrollError::Usage(e.to_string()))?;
    let labels = match &args.labels {
        Some(l) => parse_labels(l).map_err(EnrollError::Usage)?,
        None => Vec::new(),
    };
    let root = crate::repo::worktree_root(&args.repo)?;
    let (fleet, prefix) = scope(&args.at, Some(&root))?;
    let topic = enroll_topic(&prefix, &fleet, &args.device).map_err(|e| EnrollError::Usage(e.to_string()))?;
    // Read the file first: a broken one is said before anything connects.
    let existing = file_keys(&root, &args.device)?;
    let claims = read_claims(&args.at, &topic)?;
    let payload = claims
        .get(&topic)
        .ok_or_else(|| EnrollError::NoClaim { device: args.device.clone(), topic: topic.clone() })?;
    let claim = match check_claim(&prefix, &fleet, &topic, payload).1 {
        Ok(c) => c,
        Err(reason) => return Err(EnrollError::Invalid { device: args.device.clone(), topic, reason }),
    };
    let rel = format!("devices/{}.yaml", args.device);
    let path = root.join(&rel);
    let keys = claim.recipients.clone();
    let (text, previous, created) = match &existing {
        None => (new_device_file(&keys, &labels), Vec::new(), true),
        Some((old_keys, old_text)) => {
            let value = public_key_value(&keys);
            let edit_error = |reason: &str| EnrollError::Edit {
                path: rel.clone(),
                reason: reason.into(),
                value: value.clone(),
            };
            let text = set_public_key(old_text, &keys)
                .ok_or_else(|| edit_error("its top level is not a block mapping"))?;
            // The edit must change the keys and nothing else the bundler reads.
            let before =
                crate::render::load_device(&rel, old_text.as_bytes()).map_err(EnrollError::Repository)?;
            let after = crate::render::load_device(&rel, text.as_bytes())
                .map_err(|_| edit_error("the edited file does not load"))?;
            if after.public_keys != keys || after.labels != before.labels || after.vars != before.vars {
                return Err(edit_error("the edit would change more than public_key"));
            }
            (text, old_keys.clone(), false)
        }
    };
    let changed = existing.as_ref().is_none_or(|(_, old)| *old != text);
    if changed {
        write_file(&path, &text)?;
    }
    Ok(Accepted {
        device: args.device.clone(),
        file: rel,
        created,
        changed,
        key_id: claim.key_id,
        public_keys: keys,
        previous,
        repo: root,
        labels_ignored: !created && !labels.is_empty(),
    })
}

/// `key=value,key=value`: keys as label names are (`[A-Za-z0-9][A-Za-z0-9._/-]*`),
/// values without `,`.
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("--labels: {part:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        let key_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(format!("--labels: {k:?} is not a label name (letters, digits, '.', '_', '-', '/')"));
        }
        if v.chars().any(char::is_control) {
            return Err(format!("--labels: the value of {k} holds control characters"));
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("--labels: {k} is given twice"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// The YAML value of `public_key:`: one recipient, or a flow list of several.
fn public_key_value(keys: &[String]) -> String {
    match keys {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    }
}

/// A new `devices/<id>.yaml`: the keys, then the labels (values quoted).
pub fn new_device_file(keys: &[String], labels: &[(String, String)]) -> String {
    let mut text = format!("public_key: {}\n", public_key_value(keys));
    if !labels.is_empty() {
        text.push_str("labels:\n");
        for (k, v) in labels {
            let quoted = serde_json::to_string(v).expect("a string serializes");
            text.push_str(&format!("  {k}: {quoted}\n"));
        }
    }
    text
}

/// `text` (a device file) with its top-level `public_key:` set to `keys`, line by line:
/// the lines of an existing `public_key:` entry (its line and the indented or `- `
/// lines under it) become one line; without one, the line goes after the leading
/// comments (and `---`). Every other line stays as it is. `None` when the file's top
/// level is not a block mapping (a flow mapping `{...}`), which a line cannot edit.
pub fn set_public_key(text: &str, keys: &[String]) -> Option<String> {
    let line = format!("public_key: {}\n", public_key_value(keys));
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let is_entry = |l: &str| {
        ["public_key:", "\"public_key\":", "'public_key':"].iter().any(|k| l.starts_with(k))
            || l.trim_end() == "public_key"
    };
    let mut out = String::with_capacity(text.len() + line.len());
    if let Some(start) = lines.iter().position(|l| is_entry(l)) {
        let mut end = start + 1;
        while let Some(l) = lines.get(end) {
            let indented = (l.starts_with(' ') || l.starts_with('\t')) && !l.trim().is_empty();
            let item = l.starts_with('-') && !l.starts_with("---");
            if !(indented || item) {
                break;
            }
            end += 1;
        }
        lines[..start].iter().for_each(|l| out.push_str(l));
        out.push_str(&line);
        lines[end..].iter().for_each(|l| out.push_str(l));
        return Some(out);
    }
    let first_content = lines.iter().position(|l| {
        let t = l.trim();
        !(t.is_empty() || t.starts_with('#') || l.starts_with("---") || l.starts_with('%'))
    });
    if first_content.is_some_and(|i| lines[i].trim_start().starts_with(['{', '['])) {
        return None;
    }
    // After the leading comments, but before blank lines that end them.
    let mut at = first_content.unwrap_or(lines.len());
    while at > 0 && lines[at - 1].trim().is_empty() && first_content.is_some() {
        at -= 1;
    }
    lines[..at].iter().for_each(|l| out.push_str(l));
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&line);
    lines[at..].iter().for_each(|l| out.push_str(l));
    Some(out)
}

/// Writes `text` to `path` through a temp file in the same directory and a rename.
fn write_file(path: &Path, text: &str) -> Result<(), EnrollError> {
    let dir = path.parent().expect("devices/<id>.yaml has a directory");
    std::fs::create_dir_all(dir).map_err(|source| EnrollError::Io {
        what: "create",
        path: dir.into(),
        source,
    })?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.enroll-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|source| EnrollError::Io {
        what: "write",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        EnrollError::Io { what: "write", path: path.into(), source }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn key_b() -> String {
        // Another valid recipient: the same key bytes with one changed, re-encoded.
        let mut key = recipient::parse(A).expect("valid");
        key[0] ^= 1;
        bech32::encode::<bech32::Bech32>(bech32::Hrp::parse("age").expect("hrp"), &key).expect("encodes")
    }

    fn claim(device: &str, recipients: Vec<String>) -> EnrollClaim {
        let key_id = recipient::key_id(&recipient::parse(&recipients[0]).expect("valid"));
        EnrollClaim {
            device: device.into(),
            fleet: "acme".into(),
            recipients,
            key_id,
            agent_version: "0.1.0".into(),
            arch: "aarch64".into(),
            os: "linux".into(),
            kernel: None,
            hostname: None,
            machine_id: None,
            at: 1_800_000_000,
        }
    }

    fn check(topic: &str, payload: &[u8]) -> Result<EnrollClaim, String> {
        check_claim("fleet", "acme", topic, payload).1
    }

    #[test]
    fn a_good_claim_passes_and_hostile_ones_are_invalid_with_a_reason() {
        let good = claim("gw-1", vec![A.into()]);
        assert_eq!(check("fleet/acme/enroll/gw-1", &good.to_json()), Ok(good.clone()));
        let reason = |topic: &str, payload: &[u8]| check(topic, payload).expect_err("invalid");
        assert!(reason("fleet/acme/enroll/gw-2", &good.to_json()).contains("its topic is gw-2's"));
        assert!(reason("fleet/acme/enroll/-x", &good.to_json()).starts_with("topic:"));
        assert!(reason("fleet/acme/enroll/gw-1", b"\xff\xfegarbage").starts_with("not a claim"));
        assert!(reason("fleet/acme/enroll/gw-1", &vec![b'{'; 100_000]).contains("over the limit"));
        let mut other_fleet = good.clone();
        other_fleet.fleet = "other".into();
        assert!(reason("fleet/acme/enroll/gw-1", &other_fleet.to_json()).contains("fleet \"other\""));
        let mut bad_checksum = good.clone();
        let flipped = if A.ends_with('p') { "q" } else { "p" };
        bad_checksum.recipients = vec![format!("{}{flipped}", &A[..61])];
        assert!(reason("fleet/acme/enroll/gw-1", &bad_checksum.to_json()).contains("`recipients`"));
        let mut wrong_id = good.clone();
        wrong_id.key_id = "0000000000000000".into();
        assert!(reason("fleet/acme/enroll/gw-1", &wrong_id.to_json()).contains("not the first recipient's"));
        let mut hostile = good;
        hostile.device = "gw-1\u{202e}".into();
        let r = reason("fleet/acme/enroll/gw-1", &hostile.to_json());
        assert!(!r.contains('\u{202e}'), "{r}");
    }

    #[test]
    fn standing_compares_the_current_key_with_the_file() {
        let b = key_b();
        let one = claim("gw-1", vec![A.into()]);
        let rotating = claim("gw-1", vec![b.clone(), A.into()]);
        assert_eq!(Standing::of(&one, &[]), Standing::Pending);
        assert_eq!(Standing::of(&one, &[A.into()]), Standing::Accepted);
        assert_eq!(Standing::of(&rotating, &[A.into()]), Standing::Rotation);
        assert_eq!(Standing::of(&rotating, &[b.clone(), A.into()]), Standing::Accepted);
        assert_eq!(Standing::of(&rotating, &[b]), Standing::Accepted, "the old key already left the file");
    }

    #[test]
    fn the_table_escapes_what_devices_say() {
        let mut c = claim("gw-1", vec![A.into()]);
        c.agent_version = "1\u{202e}0".into();
        let rows = vec![
            Row {
                device: Some("gw-1".into()),
                topic: "t".into(),
                valid: true,
                reason: None,
                claim: Some(c),
                standing: Some(Standing::Pending),
            },
            Row {
                device: None,
                topic: "fleet/acme/enroll/\u{1b}[2J".into(),
                valid: false,
                reason: Some("topic: x".into()),
                claim: None,
                standing: None,
            },
        ];
        let text = table(&rows, 1_800_000_060);
        assert!(text.contains("STANDING") && text.contains("pending") && text.contains("60s"), "{text}");
        assert!(text.contains(r"1\u{202e}0") && text.contains(r"\u{1b}[2J"), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'));
    }

    #[test]
    fn a_new_device_file_has_the_key_and_the_labels() {
        let labels = parse_labels("site=berlin, channel=canary").expect("labels");
        let text = new_device_file(&[A.into()], &labels);
        assert_eq!(text, format!("public_key: {A}\nlabels:\n  site: \"berlin\"\n  channel: \"canary\"\n"));
        let device = crate::render::load_device("devices/gw-1.yaml", text.as_bytes()).expect("loads");
        assert_eq!(device.public_keys, [A]);
        assert_eq!(device.labels.get("site").map(String::as_str), Some("berlin"));
        for bad in ["site", "-x=1", "a b=1", "a=1,a=2"] {
            assert!(parse_labels(bad).is_err(), "{bad}");
        }
    }

    /// Each case: the file before, the keys, the file after (byte for byte).
    #[test]
    fn the_public_key_is_set_line_by_line_and_comments_stay() {
        let b = key_b();
        let two = vec![b.clone(), A.to_string()];
        let cases: Vec<(String, Vec<String>, String)> = vec![
            // No key yet: after the leading comment block, before its blank line.
            (
                "# gateway in hall 1\n\nlabels:\n  site: berlin  # the site\n".into(),
                vec![A.into()],
                format!("# gateway in hall 1\npublic_key: {A}\n\nlabels:\n  site: berlin  # the site\n"),
            ),
            ("labels: {}\n".into(), vec![A.into()], format!("public_key: {A}\nlabels: {{}}\n")),
            (String::new(), vec![A.into()], format!("public_key: {A}\n")),
            ("---\nvars:\n  x: 1".into(), vec![A.into()], format!("---\npublic_key: {A}\nvars:\n  x: 1")),
            // One key becomes two (a rotation); the comment line above stays.
            (
                format!("labels:\n  a: b\n# the device's key\npublic_key: {A} # since May\nvars:\n  v: 1\n"),
                two.clone(),
                format!("labels:\n  a: b\n# the device's key\npublic_key: [{b}, {A}]\nvars:\n  v: 1\n"),
            ),
            // A block list becomes one key.
            (
                format!("public_key:\n  - {b}\n  - {A}\n# end\nlabels:\n  a: b\n"),
                vec![b.clone()],
                format!("public_key: {b}\n# end\nlabels:\n  a: b\n"),
            ),
            (
                format!("public_key:\n- {b}\n- {A}\nlabels: {{a: b}}\n"),
                vec![A.into()],
                format!("public_key: {A}\nlabels: {{a: b}}\n"),
            ),
        ];
        for (before, keys, after) in cases {
            let got = set_public_key(&before, &keys).expect("editable");
            assert_eq!(got, after, "from {before:?}");
            let device = crate::render::load_device("devices/gw-1.yaml", got.as_bytes()).expect("loads");
            assert_eq!(device.public_keys, keys);
        }
        assert_eq!(set_public_key("{labels: {a: b}}\n", &[A.into()]), None);
    }

    #[test]
    fn the_device_file_checks_public_key_with_its_line() {
        let load = |text: &str| crate::render::load_device("devices/gw-1.yaml", text.as_bytes());
        let b = key_b();
        assert_eq!(
            load(&format!("public_key: [{b}, {A}]\n")).expect("two").public_keys,
            [b.clone(), A.to_string()]
        );
        for (text, line, needle) in [
            ("labels: {}\npublic_key: age1nope\n".to_string(), 2, "not an age X25519 recipient"),
            (format!("public_key:\n  - {A}\n  - {}\n", A.to_uppercase()), 3, "not an age X25519 recipient"),
            (format!("public_key: [{A}, {A}]\n"), 1, "listed twice"),
            ("public_key: []\n".to_string(), 1, "an empty list"),
            ("public_key: {a: b}\n".to_string(), 1, "expected a string or a list of strings"),
        ] {
            let diags = load(&text).expect_err(&text);
            assert!(
                diags.iter().any(|d| d.line == line && d.message.contains(needle)),
                "{text:?}: {diags:?}"
            );
        }
    }
}
