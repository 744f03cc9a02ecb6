//! The keys and types of `agent.toml`, checked on the parsed table before serde sees
//! it, so that every unknown key and type error is reported at once with its line and
//! column (serde stops at the first). It mirrors the `Raw*` structs; serde's
//! `deny_unknown_fields` stays as a backstop, and `the_documented_example_is_valid`
//! keeps the two in step for every documented key.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::{line_col, Problem};

#[derive(Clone, Copy)]
pub enum Ty {
    Str,
    Int,
    Bool,
    Strs,
    Table(&'static [Field]),
    Tables(&'static [Field]),
}

/// A key, its type, and whether it is required.
pub struct Field(&'static str, Ty, bool);

use Ty::*;

pub const ROOT: &[Field] = &[
    Field("device", Str, true),
    Field("fleet", Str, true),
    Field("topic_prefix", Str, false),
    Field("state_dir", Str, true),
    Field("allowed_roots", Strs, false),
    Field("log_format", Str, false),
    Field("log_level", Str, false),
    Field("reconcile_interval_secs", Int, false),
    Field("health_timeout_secs", Int, false),
    Field("status_min_interval_ms", Int, false),
    Field("mqtt", Table(MQTT), false),
    Field("trust", Table(TRUST), true),
    Field("fetch", Table(FETCH), false),
    Field("engine", Table(ENGINE), false),
    Field("updates", Table(UPDATES), false),
];
const UPDATES: &[Field] = &[
    Field("lock_dir", Str, false),
    Field("max_deferral_secs", Int, false),
    Field("agent_trial_secs", Int, false),
];
const MQTT: &[Field] = &[
    Field("url", Str, true),
    Field("client_id", Str, false),
    Field("ca_file", Str, false),
    Field("client_cert", Str, false),
    Field("client_key", Str, false),
    Field("username", Str, false),
    Field("password", Str, false),
    Field("password_file", Str, false),
    Field("keepalive_secs", Int, false),
    Field("reconnect_max_secs", Int, false),
];
const TRUST: &[Field] = &[Field("public_keys", Strs, true), Field("threshold", Int, false)];
const FETCH: &[Field] = &[
    Field("base_url", Str, false),
    Field("poll_interval_secs", Int, false),
    Field("ca_file", Str, false),
    Field("max_bundle_bytes", Int, false),
    Field("timeout_secs", Int, false),
    Field("deadline_secs", Int, false),
    Field("min_bytes_per_sec", Int, false),
    Field("disk_reserve_bytes", Int, false),
    Field("client_cert", Str, false),
    Field("client_key", Str, false),
    Field("bearer_token_file", Str, false),
];
const ENGINE: &[Field] = &[
    Field("socket", Str, false),
    Field("registry_auth", Tables(REGISTRY_AUTH), false),
    Field("stop_grace_secs", Int, false),
    Field("image_gc", Bool, false),
    Field("image_gc_grace_secs", Int, false),
    Field("policy", Table(POLICY), false),
];
const REGISTRY_AUTH: &[Field] = &[
    Field("server", Str, true),
    Field("username", Str, true),
    Field("password", Str, false),
    Field("password_file", Str, false),
];
const POLICY: &[Field] = &[
    Field("allow_privileged", Bool, false),
    Field("allow_host_network", Bool, false),
    Field("host_namespaces", Strs, false),
    Field("device_cgroup_rules", Strs, false),
    Field("allow_unconfined", Bool, false),
    Field("allow_gpus", Bool, false),
    Field("allow_engine_socket", Bool, false),
    Field("bind_roots", Strs, false),
    Field("devices", Strs, false),
    Field("capabilities", Strs, false),
    Field("registries", Strs, false),
    Field("require_digest", Bool, false),
];

fn problem(text: &str, at: Range<usize>, key: String, message: String) -> Problem {
    let (line, col) = line_col(text, at.start);
    Problem { line: Some(line), col: Some(col), key, message }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Checks `table` (at `prefix`, spanning `span`) against `fields`.
/// Checks `table` (at `prefix`, spanning `span`) against `fields`, and removes what
/// is wrong (unknown keys, values of the wrong type), so that the rest can still be
/// deserialized and its values checked in the same run.
pub fn check(
    text: &str,
    table: &mut DeTable<'_>,
    fields: &'static [Field],
    prefix: &str,
    span: Range<usize>,
    out: &mut Vec<Problem>,
) {
    let mut wrong: Vec<String> = Vec::new();
    for (key, value) in table.iter_mut() {
        let name = key.get_ref().as_ref();
        let path = format!("{prefix}{name}");
        let Some(field) = fields.iter().find(|f| f.0 == name) else {
            let names: Vec<&str> = fields.iter().map(|f| f.0).collect();
            let hint = crate::cli::did_you_mean(name, &names, "");
            let within = if prefix.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in [{}]", prefix.trim_end_matches('.'))
            };
            out.push(problem(text, key.span(), path, format!("unknown key {within}{hint}")));
            wrong.push(name.to_string());
            continue;
        };
        let at = value.span();
        if !check_value(text, value.get_mut(), field.1, &path, at, out) {
            wrong.push(name.to_string());
        }
    }
    for name in &wrong {
        table.remove(name.as_str());
    }
    for f in fields.iter().filter(|f| f.2) {
        if !table.keys().any(|k| k.get_ref().as_ref() == f.0) && !wrong.iter().any(|w| w == f.0) {
            let key = format!("{prefix}{}", f.0);
            let message = "missing (required)".to_string();
            out.push(if prefix.is_empty() {
                // The whole file: no place to point at.
                Problem { line: None, col: None, key, message }
            } else {
                problem(text, span.clone(), key, message)
            });
        }
    }
}

/// Whether `v` may stay (problems inside a table are removed there).
fn check_value(
    text: &str,
    v: &mut DeValue<'_>,
    ty: Ty,
    path: &str,
    span: Range<usize>,
    out: &mut Vec<Problem>,
) -> bool {
    let expected = match ty {
        Str => "a string",
        Int => "a non-negative integer",
        Bool => "true or false",
        Strs => "an array of strings",
        Table(_) => "a table",
        Tables(_) => "an array of tables ([[...]])",
    };
    let ok = match (ty, &mut *v) {
        (Str, DeValue::String(_)) | (Bool, DeValue::Boolean(_)) => true,
        (Int, DeValue::Integer(i)) => {
            let digits = i.as_str().trim_start_matches('+').replace('_', "");
            !digits.starts_with('-')
        }
        (Strs, DeValue::Array(items)) => {
            let mut all = true;
            for (i, item) in items.iter().enumerate() {
                if !matches!(item.get_ref(), DeValue::String(_)) {
                    let found = type_name(item.get_ref());
                    out.push(problem(
                        text,
                        item.span(),
                        format!("{path}[{i}]"),
                        format!("must be a string, not {found}"),
                    ));
                    all = false;
                }
            }
            return all;
        }
        (Table(fields), DeValue::Table(t)) => {
            check(text, t, fields, &format!("{path}."), span.clone(), out);
            true
        }
        (Tables(fields), DeValue::Array(items)) => {
            let mut all = true;
            for (i, item) in items.iter_mut().enumerate() {
                let at = item.span();
                match item.get_mut() {
                    DeValue::Table(t) => check(text, t, fields, &format!("{path}[{i}]."), at, out),
                    other => {
                        out.push(problem(
                            text,
                            at,
                            format!("{path}[{i}]"),
                            format!("must be a table, not {}", type_name(other)),
                        ));
                        all = false;
                    }
                }
            }
            return all;
        }
        _ => false,
    };
    if !ok {
        let found = match v {
            DeValue::Integer(i) if matches!(ty, Int) => format!("{i}"),
            other => type_name(other).to_string(),
        };
        out.push(problem(text, span, path.to_string(), format!("must be {expected}, not {found}")));
    }
    ok
}

/// Line and column of `key` (`engine.policy.bind_roots[0]`) in the file: of its
/// value, or of the nearest enclosing key that is there.
pub fn locate(text: &str, root: &DeTable<'_>, key: &str) -> Option<(usize, usize)> {
    let mut table = root;
    let mut found: Option<Range<usize>> = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else { break };
        let mut value = value;
        if let (Some(i), DeValue::Array(items)) = (index, value.get_ref()) {
            match items.get(i) {
                Some(item) => value = item,
                None => {
                    found = Some(value.span());
                    break;
                }
            }
        }
        found = Some(value.span());
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    found.map(|s| line_col(text, s.start))
}
