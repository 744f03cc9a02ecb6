//! Compose-style `${VAR}` interpolation. Pure: variables come from a [`VarLookup`].

use super::VarLookup;

/// Why interpolation failed.
#[derive(Debug, PartialEq)]
pub enum InterpError {
    Unset { name: String, message: Option<String> },
    Syntax(String),
}

/// Compose-style interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}`.
pub fn interpolate(text: &str, vars: &dyn VarLookup) -> Result<String, InterpError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end =
                r.find('}').ok_or_else(|| InterpError::Syntax(format!("unclosed `${{` in `{text}`")))?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            let name_len =
                inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_len);
            if name.is_empty() {
                return Err(InterpError::Syntax(format!("`${{{inner}}}` has no variable name")));
            }
            let value = vars.get(name);
            let resolved = match op {
                "" => value.ok_or(InterpError::Unset { name: name.into(), message: None })?,
                _ if op.starts_with(":-") => value.filter(|v| !v.is_empty()).unwrap_or_else(|| op[2..].to_string()),
                _ if op.starts_with('-') => value.unwrap_or_else(|| op[1..].to_string()),
                _ if op.starts_with(":?") => value
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| InterpError::Unset { name: name.into(), message: Some(op[2..].to_string()) })?,
                _ if op.starts_with('?') => {
                    value.ok_or_else(|| InterpError::Unset { name: name.into(), message: Some(op[1..].to_string()) })?
                }
                _ if op.starts_with(":+") => {
                    if value.is_some_and(|v| !v.is_empty()) {
                        op[2..].to_string()
                    } else {
                        String::new()
                    }
                }
                _ if op.starts_with('+') => {
                    if value.is_some() {
                        op[1..].to_string()
                    } else {
                        String::new()
                    }
                }
                _ => return Err(InterpError::Syntax(format!("`${{{inner}}}` is not a supported interpolation: use ${{VAR}}, ${{VAR:-default}} or ${{VAR:?message}}"))),
            };
            out.push_str(&resolved);
        } else {
            let name_len =
                rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if name_len == 0 {
                // A lone `$` stays as it is, as in Compose.
                out.push('$');
                continue;
            }
            let name = &rest[..name_len];
            out.push_str(&vars.get(name).ok_or(InterpError::Unset { name: name.into(), message: None })?);
            rest = &rest[name_len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}
