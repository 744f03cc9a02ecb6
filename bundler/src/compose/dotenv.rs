//! `.env` and `env_file:` files: `KEY=VALUE` lines, as Compose reads them. Pure parsing.
//!
//! Per line: blank lines and `#` comments are skipped; an optional `export ` prefix is
//! dropped; the value is taken literally between single quotes, with `\n`, `\t`, `\\`
//! and `\"` escapes between double quotes, and otherwise up to a ` #` comment, trimmed.
//! Values spanning several lines are not supported.

/// One `KEY=VALUE` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    /// 1-based line in the file.
    pub line: u64,
    pub key: String,
    pub value: String,
    /// Single-quoted: not interpolated.
    pub literal: bool,
}

/// Parses a whole file; the error is the 1-based line and what is wrong with it.
pub fn parse_env_file(text: &str) -> Result<Vec<EnvEntry>, (u64, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let trimmed = trimmed.strip_prefix("export ").map_or(trimmed, str::trim_start);
        let Some((key, rest)) = trimmed.split_once('=') else {
            return Err((line, format!("`{trimmed}` has no value: write KEY=VALUE")));
        };
        let key = key.trim_end();
        let valid_key = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid_key {
            return Err((line, format!("`{key}` is not a variable name: use letters, digits and '_'")));
        }
        let rest = rest.trim_start();
        let (value, literal) = if let Some(quoted) = rest.strip_prefix('\'') {
            let end =
                quoted.find('\'').ok_or_else(|| (line, format!("the value of `{key}` has no closing '")))?;
            check_after(&quoted[end + 1..], key, line)?;
            (quoted[..end].to_string(), true)
        } else if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err((line, format!("the value of `{key}` has no closing \""))),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, 't')) => value.push('\t'),
                        Some((_, c @ ('\\' | '"' | '$'))) => {
                            // `\$` is a literal `$`: kept as `$$` for interpolation.
                            if c == '$' {
                                value.push('$');
                            }
                            value.push(c);
                        }
                        Some((_, c)) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => return Err((line, format!("the value of `{key}` has no closing \""))),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            check_after(&quoted[end + 1..], key, line)?;
            (value, false)
        } else {
            let value = match rest.find(" #").or_else(|| rest.find("\t#")) {
                Some(i) => &rest[..i],
                None => rest,
            };
            (value.trim_end().to_string(), false)
        };
        out.push(EnvEntry { line, key: key.to_string(), value, literal });
    }
    Ok(out)
}

/// After a closing quote only blanks and a comment may follow.
fn check_after(after: &str, key: &str, line: u64) -> Result<(), (u64, String)> {
    let after = after.trim_start();
    if after.is_empty() || after.starts_with('#') {
        Ok(())
    } else {
        Err((line, format!("the value of `{key}` continues after its closing quote: `{after}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Vec<(String, String, bool)> {
        parse_env_file(text).expect("valid").into_iter().map(|e| (e.key, e.value, e.literal)).collect()
    }

    #[test]
    fn dotenv_forms() {
        let text =
            "# comment\n\nA=1\nexport B = two words # note\nC='lit ${X}'\nD=\"q\\\"\\n\" # c\nE=\nF=a#b\n";
        assert_eq!(
            entries(text),
            vec![
                ("A".into(), "1".into(), false),
                ("B".into(), "two words".into(), false),
                ("C".into(), "lit ${X}".into(), true),
                ("D".into(), "q\"\n".into(), false),
                ("E".into(), "".into(), false),
                ("F".into(), "a#b".into(), false),
            ]
        );
    }

    #[test]
    fn dotenv_errors_name_the_line() {
        assert_eq!(parse_env_file("A=1\nNOVALUE\n").map_err(|e| e.0), Err(2));
        assert_eq!(parse_env_file("1A=x\n").map_err(|e| e.0), Err(1));
        assert_eq!(parse_env_file("A=\"open\n").map_err(|e| e.0), Err(1));
        assert_eq!(parse_env_file("A='x' y\n").map_err(|e| e.0), Err(1));
    }
}
