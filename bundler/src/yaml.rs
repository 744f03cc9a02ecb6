//! Location-aware YAML parsing (serde-saphyr) and the small value shapes the repository
//! format shares: any scalar as a string, "a string or a list", "a list or a map".
//!
//! The shapes are written as visitors rather than `#[serde(untagged)]` enums because
//! untagged enums buffer their input and lose the YAML location of errors.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
pub use serde_saphyr::Spanned;

use crate::diag::Diagnostic;

/// A 1-based line and column; `(0, 0)` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    pub fn of<T>(spanned: &Spanned<T>) -> Pos {
        Pos { line: spanned.referenced.line(), column: spanned.referenced.column() }
    }
}

/// Parses one YAML document into `T`, turning a parse error into a diagnostic that
/// names the file, line and column.
pub fn parse<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, Diagnostic> {
    parse_with(file, text, &|_| {})
}

/// Like [`parse`]; `accepted` trims the allowed keys an unknown-key message lists (the
/// Compose file's keys that are known only to be refused are not "allowed").
pub fn parse_with<T: DeserializeOwned>(
    file: &str,
    text: &str,
    accepted: &dyn Fn(&mut Vec<String>),
) -> Result<T, Diagnostic> {
    serde_saphyr::from_str::<T>(text).map_err(|e| to_diagnostic(file, &e, accepted))
}

/// Like [`parse`], but when the document does not parse, every unknown key of it is
/// reported (serde stops at the first problem; `shape` knows the keys of every mapping),
/// and serde's own error unless it is one of those.
pub fn parse_all<T: DeserializeOwned>(file: &str, text: &str, shape: &Shape) -> Result<T, Vec<Diagnostic>> {
    parse::<T>(file, text).map_err(|first| {
        let mut diags = unknown_keys(file, text, shape);
        if !diags.iter().any(|d| (d.line, d.column) == (first.line, first.column)) {
            diags.push(first);
        }
        diags.sort_by_key(|d| (d.line, d.column));
        diags
    })
}

/// How many unknown keys [`parse_each_unknown_key`] reports in one file.
const MAX_UNKNOWN_KEYS: usize = 50;

/// Like [`parse_with`], for Compose files (too rich for a [`Shape`]): when serde stops
/// at an unknown key written in block style, that entry is replaced by an empty
/// extension field (`x-…:`, which Compose mappings skip; lines kept, so every place
/// stays right) and the document parsed again, so that every unknown key is reported
/// at once. A later error that is not an unknown key is dropped: it may be a
/// consequence of the replacement (a required key that was misspelled), and the next
/// run reports it.
pub fn parse_each_unknown_key<T: DeserializeOwned>(
    file: &str,
    text: &str,
    accepted: &dyn Fn(&mut Vec<String>),
) -> Result<T, Vec<Diagnostic>> {
    let first = match parse_with::<T>(file, text, accepted) {
        Ok(v) => return Ok(v),
        Err(d) => d,
    };
    let mut diags = vec![first];
    let mut text = text.to_string();
    while diags.len() < MAX_UNKNOWN_KEYS {
        let last = diags.last().expect("one diagnostic at least");
        if !last.message.starts_with(UNKNOWN_KEY) {
            break;
        }
        let placeholder = format!("x-fleet-unknown-{}", diags.len());
        let Some(blanked) = blank_entry(&text, last.line, last.column, &placeholder) else { break };
        text = blanked;
        match parse_with::<T>(file, &text, accepted) {
            // A mapping that does not skip `x-` keys refuses the placeholder: stop there.
            Err(d)
                if d.message.starts_with(UNKNOWN_KEY)
                    && !diags.iter().any(|p| (p.line, p.column) == (d.line, d.column)) =>
            {
                diags.push(d)
            }
            _ => break,
        }
    }
    Err(diags)
}

const UNKNOWN_KEY: &str = "unknown key `";

/// `text` with the block-style mapping entry whose key is at `line`:`column` replaced
/// by `placeholder:` (no value) and empty lines: its value is on the lines below it
/// that are more indented (or list items at its indentation, which YAML allows for a
/// key's list). `None` when the key does not start its line (a flow mapping, the
/// first key of a list item).
fn blank_entry(text: &str, line: u64, column: u64, placeholder: &str) -> Option<String> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    let index = usize::try_from(line).ok()?.checked_sub(1)?;
    let indent = usize::try_from(column).ok()?.checked_sub(1)?;
    let own = lines.get(index)?;
    if own.len() < indent || !own[..indent].chars().all(|c| c == ' ') || own[indent..].starts_with(' ') {
        return None;
    }
    let replaced = format!("{}{placeholder}:", " ".repeat(indent));
    for l in lines.iter_mut().skip(index + 1) {
        let spaces = l.len() - l.trim_start_matches(' ').len();
        let rest = &l[spaces..];
        if rest.is_empty()
            || rest.starts_with('#')
            || spaces > indent
            || (spaces == indent && (rest == "-" || rest.starts_with("- ")))
        {
            *l = "";
        } else {
            break;
        }
    }
    lines[index] = &replaced;
    Some(lines.join("\n"))
}

fn to_diagnostic(file: &str, e: &serde_saphyr::Error, accepted: &dyn Fn(&mut Vec<String>)) -> Diagnostic {
    let options = serde_saphyr::render_options! { snippets: serde_saphyr::SnippetMode::Off };
    let rendered = e.render_with_options(options);
    let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
    let suffix = format!(" at line {line}, column {column}");
    let mut message = rendered.strip_suffix(&suffix).unwrap_or(&rendered).to_string();
    if let Some((key, mut allowed)) = unknown_field(&message) {
        accepted(&mut allowed);
        message = unknown_key_message(&key, &allowed);
    }
    Diagnostic::error(file, line, column, message)
}

/// The key and the allowed keys of serde's "unknown field `x`, expected one of a, b".
pub fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let (key, rest) = message.strip_prefix("unknown field `")?.split_once('`')?;
    let list = rest.strip_prefix(", expected one of ").or_else(|| rest.strip_prefix(", expected "))?;
    let allowed = list
        .split(", ")
        .flat_map(|part| part.split(" or "))
        .map(|k| k.trim().trim_matches('`').to_string())
        .filter(|k| !k.is_empty())
        .collect();
    Some((key.to_string(), allowed))
}

/// `unknown key `imagee`: did you mean `image`? (allowed keys: ...)`.
pub fn unknown_key_message(key: &str, allowed: &[String]) -> String {
    let hint = nearest(key, allowed.iter().map(String::as_str))
        .map(|k| format!(": did you mean `{k}`?"))
        .unwrap_or_default();
    format!("{UNKNOWN_KEY}{key}`{hint} (allowed keys: {})", allowed.join(", "))
}

/// The candidate closest to `name` if it is a likely typo of it: at most one edit
/// (insertion, deletion, substitution or swap of neighbours) per three characters.
pub fn nearest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    // Ties go to the candidate sharing the longer prefix (`prot`: `proto` over `port`).
    candidates
        .map(|c| (strsim::damerau_levenshtein(c, name), strsim::jaro_winkler(c, name), c))
        .filter(|(distance, _, _)| *distance <= limit)
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
}

/// The keys of a YAML mapping and of the mappings below it, for [`parse_all`]. The
/// lists are the serde structs' fields; tests keep them equal.
#[derive(Debug)]
pub enum Shape {
    /// Anything: variables, labels, free text.
    Any,
    /// A mapping with these keys.
    Keys(&'static [(&'static str, Shape)]),
    /// A list whose items have this shape.
    List(&'static Shape),
    /// One item of this shape, or a list of them (`agent:` of `fleet.yaml`).
    OneOrList(&'static Shape),
}

impl Shape {
    /// The keys of a [`Shape::Keys`].
    pub fn names(&self) -> Vec<String> {
        match self {
            Shape::Keys(keys) => keys.iter().map(|(k, _)| k.to_string()).collect(),
            _ => Vec::new(),
        }
    }
}

/// A YAML document as mappings with located keys, lists and scalars.
enum Node {
    Map(Vec<(Spanned<Scalar>, Node)>),
    List(Vec<Node>),
    Scalar,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    out.push(item);
                }
                Ok(Node::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Spanned<Scalar>>()? {
                    out.push((key, map.next_value::<Node>()?));
                }
                Ok(Node::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every key of `text` that `shape` does not know, each with the allowed keys. Empty
/// when the text is not YAML at all (the parse error says so).
pub fn unknown_keys(file: &str, text: &str, shape: &Shape) -> Vec<Diagnostic> {
    fn walk(file: &str, node: &Node, shape: &Shape, out: &mut Vec<Diagnostic>) {
        match (node, shape) {
            (Node::Map(entries), Shape::Keys(keys)) => {
                for (key, value) in entries {
                    match keys.iter().find(|(k, _)| *k == key.value.0) {
                        Some((_, inner)) => walk(file, value, inner, out),
                        None => {
                            let at = Pos::of(key);
                            let message = unknown_key_message(&key.value.0, &shape.names());
                            out.push(Diagnostic::error(file, at.line, at.column, message));
                        }
                    }
                }
            }
            (Node::List(items), Shape::List(inner) | Shape::OneOrList(inner)) => {
                for item in items {
                    walk(file, item, inner, out);
                }
            }
            (Node::Map(_), Shape::OneOrList(inner)) => walk(file, node, inner, out),
            // Anything else is a type problem, which serde reports.
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(node) = serde_saphyr::from_str::<Node>(text) {
        walk(file, &node, shape, &mut out);
    }
    out
}

/// Any YAML scalar, kept as its string form: `80`, `true` and `"x"` are all accepted
/// where Compose accepts "a string" (environment values, ports, user ids).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar (string, number or boolean)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value that is either one string or a list of strings (`command:`, `test:`).
#[derive(Debug, Clone, PartialEq)]
pub enum StringOrList {
    String(String),
    List(Vec<Spanned<Scalar>>),
}

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrList, E> {
                Ok(StringOrList::String(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrList, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Scalar>>()? {
                    out.push(item);
                }
                Ok(StringOrList::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Compose's "list or map" shape (`environment:`, `labels:`): either `["K=V", ...]` or
/// `{K: V}`. Map values may be null (`K:`), kept as `None`.
#[derive(Debug, Clone, PartialEq)]
pub enum ListOrMap {
    List(Vec<Spanned<Scalar>>),
    Map(Vec<(Spanned<String>, Option<Spanned<Scalar>>)>),
}

impl<'de> Deserialize<'de> for ListOrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ListOrMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of \"KEY=VALUE\" strings or a map of KEY: VALUE")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListOrMap, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Scalar>>()? {
                    out.push(item);
                }
                Ok(ListOrMap::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ListOrMap, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value::<Option<Spanned<Scalar>>>()?;
                    out.push((key, value));
                }
                Ok(ListOrMap::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of names or a map of name → optional settings (`depends_on:`, service
/// `networks:`). List items come with `None` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NamesOrMap<T>(pub Vec<(Spanned<String>, Option<T>)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NamesOrMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = NamesOrMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of names or a map of name: settings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NamesOrMap<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    out.push((item, None));
                }
                Ok(NamesOrMap(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NamesOrMap<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value::<Option<T>>()?;
                    out.push((key, value));
                }
                Ok(NamesOrMap(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A map that keeps each key's location, in document order.
#[derive(Debug, Clone, PartialEq)]
pub struct SpannedMap<T>(pub Vec<(Spanned<String>, T)>);

impl<T> Default for SpannedMap<T> {
    fn default() -> Self {
        SpannedMap(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for SpannedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = SpannedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_unit<E: de::Error>(self) -> Result<SpannedMap<T>, E> {
                Ok(SpannedMap(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpannedMap<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    out.push((key, map.next_value::<T>()?));
                }
                Ok(SpannedMap(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Converts YAML variables (any shape) to JSON values for templates.
pub type Vars = BTreeMap<String, serde_json::Value>;

/// One scalar or a list of scalars, as strings (selector values).
#[derive(Debug, Clone, PartialEq)]
pub struct StringOrListOfScalars(pub Vec<String>);

impl<'de> Deserialize<'de> for StringOrListOfScalars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrListOfScalars;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StringOrListOfScalars(vec![v.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(StringOrListOfScalars(vec![v.to_string()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StringOrListOfScalars(vec![v.to_string()]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StringOrListOfScalars(vec![v.to_string()]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(StringOrListOfScalars(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Scalar>()? {
                    out.push(item.0);
                }
                Ok(StringOrListOfScalars(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_blanked_with_its_value_and_nothing_else() {
        let text = "a:\n  b: 1\n  bad:\n    c: 2\n  list:\n  - x\n  d: 3\ne: 4";
        let blank = |line, column| blank_entry(text, line, column, "x-0");
        assert_eq!(blank(3, 3).as_deref(), Some("a:\n  b: 1\n  x-0:\n\n  list:\n  - x\n  d: 3\ne: 4"));
        assert_eq!(blank(5, 3).as_deref(), Some("a:\n  b: 1\n  bad:\n    c: 2\n  x-0:\n\n  d: 3\ne: 4"));
        assert_eq!(blank_entry("- k: 1\n  v: 2", 1, 3, "x-0"), None, "the first key of a list item");
        assert_eq!(blank_entry("a: {b: 1, c: 2}", 1, 11, "x-0"), None, "a flow mapping");
    }
}
