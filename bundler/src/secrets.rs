//! Secrets in the fleet repository: age-encrypted files and variables, decrypted with
//! the CI's identity, and the bookkeeping that keeps them out of everything the bundler
//! prints or writes in the clear.
//!
//! - A file source ending in `.age` (app.yaml `files:`, Compose `secrets:`/`configs:`)
//!   is a secret file: its plaintext is delivered sealed to the device (see `render`).
//! - Secret variables live in `secrets.yaml.age` (the fleet's) and
//!   `devices/<id>.secrets.yaml.age` (a device's, over the fleet's): an age-encrypted
//!   YAML mapping of names to text, numbers or booleans. Templates read them as
//!   `{{ secrets.NAME }}` and Compose as `${NAME}`. A template that reads one is sealed
//!   whole; a Compose value that uses one must be an `environment:` value, which is
//!   sealed (moved to the state's secret environment).
//!
//! Nothing here echoes a secret: YAML errors in a secret file give its position only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fleet_spec::age::SecretKey;
use fleet_spec::model::{ContainerSpec, Secrets};
use minijinja::value::{Enumerator, Object, Value};

use crate::diag::Diagnostic;

/// Name → value of secret variables.
pub type SecretVars = BTreeMap<String, String>;

/// The device secrets file of `devices/<id>.secrets.yaml.age`, if `path` is one.
pub fn device_secrets_id(path: &str) -> Option<&str> {
    path.strip_prefix("devices/")?.strip_suffix(".secrets.yaml.age").filter(|id| !id.contains('/'))
}

/// Decrypts one `.age` file of the repository with the CI's identities.
pub fn decrypt(repo_path: &str, bytes: &[u8], identities: &[SecretKey]) -> Result<Vec<u8>, String> {
    fleet_spec::age::decrypt_file(bytes, identities).map_err(|e| {
        let ids: Vec<String> = identities.iter().map(SecretKey::key_id).collect();
        let recipient = identities.first().map(SecretKey::recipient).unwrap_or_default();
        format!(
            "{repo_path} cannot be decrypted with the CI's age identity (key id {}): {e}; encrypt it to the \
             CI's recipient: age -r {recipient} -o {repo_path} <plain file>",
            ids.join(", ")
        )
    })
}

/// Decrypts and parses a secret variables file. `Ok(None)`: no identity, not decrypted.
pub fn load_vars(
    repo_path: &str,
    bytes: &[u8],
    identities: &[SecretKey],
) -> Result<Option<SecretVars>, Diagnostic> {
    if identities.is_empty() {
        return Ok(None);
    }
    let plain = decrypt(repo_path, bytes, identities).map_err(|m| Diagnostic::error(repo_path, 0, 0, m))?;
    let shape_error = |line: u64, column: u64| {
        Diagnostic::error(
            repo_path,
            line,
            column,
            "the decrypted content is not a YAML mapping of names to text, numbers or booleans \
             (e.g. `api_token: \"...\"`); values are not shown",
        )
    };
    let text = std::str::from_utf8(&plain).map_err(|_| shape_error(0, 0))?;
    if text.trim().is_empty() {
        return Ok(Some(SecretVars::new()));
    }
    let parsed: BTreeMap<String, serde_json::Value> = serde_saphyr::from_str(text).map_err(|e| {
        // The error's own text may quote the content: only its position is kept.
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        shape_error(line, column)
    })?;
    let mut vars = SecretVars::new();
    for (name, value) in parsed {
        if !valid_name(&name) {
            return Err(Diagnostic::error(
                repo_path,
                0,
                0,
                format!(
                    "secret variable name `{}` must be letters, digits and `_`, not starting with a digit",
                    name.escape_debug()
                ),
            ));
        }
        let value = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(Diagnostic::error(
                    repo_path,
                    0,
                    0,
                    format!(
                    "secret variable `{name}` must be text, a number or a boolean (not a list or mapping)"
                ),
                ))
            }
        };
        vars.insert(name, value);
    }
    Ok(Some(vars))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `secrets` in a template's context: the device's secret variables, noting whether the
/// template read any (then its output is sealed).
#[derive(Debug)]
pub struct Tracker {
    vars: SecretVars,
    touched: AtomicBool,
}

impl Tracker {
    pub fn new(vars: SecretVars) -> Arc<Tracker> {
        Arc::new(Tracker { vars, touched: AtomicBool::new(false) })
    }

    pub fn value(self: &Arc<Self>) -> Value {
        Value::from_dyn_object(self.clone())
    }

    /// Whether a secret was read since the last call.
    pub fn take_touched(&self) -> bool {
        self.touched.swap(false, Ordering::SeqCst)
    }
}

impl Object for Tracker {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.touched.store(true, Ordering::SeqCst);
        self.vars.get(key.as_str()?).map(|v| Value::from(v.as_str()))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.touched.store(true, Ordering::SeqCst);
        Enumerator::Values(self.vars.keys().map(|k| Value::from(k.as_str())).collect())
    }
}

/// What a secret variable interpolates to in a Compose file before it is known where
/// it went: a marker no Compose file can contain, replaced by the value in
/// `environment:` values (which are then sealed) and refused anywhere else.
pub fn marker(name: &str) -> String {
    format!("{MARKER_OPEN}{name}{MARKER_CLOSE}")
}

const MARKER_OPEN: &str = "\u{1}fleet-secret:";
const MARKER_CLOSE: &str = "\u{1}";

/// The names of the secret variables whose markers `text` holds.
pub fn markers_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARKER_OPEN) {
        let after = &rest[at + MARKER_OPEN.len()..];
        let Some(end) = after.find(MARKER_CLOSE) else { break };
        out.push(after[..end].to_string());
        rest = &after[end + MARKER_CLOSE.len()..];
    }
    out
}

/// `text` with every marker replaced by its variable's value (`None`: a marker of a
/// variable not in `vars`).
pub fn unmark(text: &str, vars: &SecretVars) -> Option<String> {
    let mut out = text.to_string();
    for name in markers_in(text) {
        out = out.replace(&marker(&name), vars.get(&name)?);
    }
    Some(out)
}

/// `text` with every marker replaced by `<secret NAME>`: for messages.
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for name in markers_in(text) {
        out = out.replace(&marker(&name), &format!("<secret {name}>"));
    }
    out
}

/// `text` with every secret value in it replaced by `<secret NAME>` (values shorter than
/// 4 characters are left: they would match everywhere and reveal little).
pub fn redact_values(text: &str, vars: &SecretVars) -> String {
    let mut out = text.to_string();
    for (name, value) in vars {
        if value.len() >= 4 && out.contains(value.as_str()) {
            out = out.replace(value.as_str(), &format!("<secret {name}>"));
        }
    }
    out
}

/// Moves every container `environment:` value that uses a secret variable into
/// `out.env` (sealed at build), and refuses a secret anywhere else in a container.
pub fn seal_compose_env(
    file: &str,
    containers: &mut [ContainerSpec],
    vars: &SecretVars,
    out: &mut Secrets,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for c in containers.iter_mut() {
        let keys: Vec<String> =
            c.env.iter().filter(|(_, v)| !markers_in(v).is_empty()).map(|(k, _)| k.clone()).collect();
        for key in keys {
            let Some(value) = c.env.remove(&key) else { continue };
            // Not decrypted (validate, plan): an empty value stands in.
            let value = unmark(&value, vars).unwrap_or_default();
            out.env.entry(c.name.clone()).or_default().insert(key, value);
        }
        let mut texts = Vec::new();
        strings(&serde_json::to_value(&*c).unwrap_or_default(), &mut texts);
        strings(&serde_json::to_value(&c.options).unwrap_or_default(), &mut texts);
        let Some(name) = texts.iter().flat_map(|t| markers_in(t)).next() else { continue };
        let message = if vars.contains_key(&name) {
            format!(
                "secret variable `{name}` is used by service `{}` outside `environment:`: a secret reaches a \
                 container only as an environment value or as a file (a Compose `secrets:` entry or a template)",
                c.service
            )
        } else {
            format!(
                "`${{{name}}}` (service `{}`) is set nowhere, unless it is a secret variable: they were not \
                 decrypted (pass --age-identity to check)",
                c.service
            )
        };
        diags.push(Diagnostic::error(file, 0, 0, message));
    }
    diags
}

/// Every string in a JSON value, keys included.
fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                strings(v, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_redact() {
        let vars = SecretVars::from([("A".into(), "1".into()), ("B_2".into(), "x y".into())]);
        let text = format!("pre {} mid {} post", marker("A"), marker("B_2"));
        assert_eq!(markers_in(&text), ["A", "B_2"]);
        assert_eq!(unmark(&text, &vars).as_deref(), Some("pre 1 mid x y post"));
        assert_eq!(redact(&text), "pre <secret A> mid <secret B_2> post");
        assert_eq!(unmark(&marker("C"), &vars), None);
        assert!(markers_in("no marker \u{1} here").is_empty());
    }

    #[test]
    fn values_are_redacted_from_messages() {
        let vars = SecretVars::from([("T".into(), "hunter22".into()), ("S".into(), "no".into())]);
        assert_eq!(redact_values("bad value 'hunter22' (no)", &vars), "bad value '<secret T>' (no)");
    }

    #[test]
    fn device_secret_files_are_recognised() {
        assert_eq!(device_secrets_id("devices/gw-1.secrets.yaml.age"), Some("gw-1"));
        assert_eq!(device_secrets_id("devices/a/gw-1.secrets.yaml.age"), None);
        assert_eq!(device_secrets_id("devices/gw-1.yaml"), None);
    }

    #[test]
    fn variable_files_keep_their_values_out_of_errors() {
        let key = SecretKey::from_bytes([4; 32]);
        let seal = |text: &str| fleet_spec::age::encrypt(text.as_bytes(), &[*key.public_bytes()], &[1; 32]);
        let ids = std::slice::from_ref(&key);
        let vars = load_vars("secrets.yaml.age", &seal("token: abc\nport: 8080\non: true\n"), ids)
            .expect("valid")
            .expect("decrypted");
        assert_eq!(vars.get("token").map(String::as_str), Some("abc"));
        assert_eq!(vars.get("port").map(String::as_str), Some("8080"));
        for bad in ["token: [hunter2]\n", "- hunter2\n", "hunter2: {\n", "\"bad-name\": hunter2\n"] {
            let d = load_vars("secrets.yaml.age", &seal(bad), ids).expect_err(bad);
            assert!(!d.message.contains("hunter2"), "{bad}: {}", d.message);
        }
        assert!(load_vars("secrets.yaml.age", b"not age", ids).is_err());
        assert_eq!(load_vars("secrets.yaml.age", b"whatever", &[]).expect("skipped"), None);
    }
}
