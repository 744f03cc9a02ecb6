//! Durations (`10s`, `1m30s`, `90d`), byte sizes (`512m`, `1.5G`) and CPU counts
//! (`0.5`) as Compose and `fleet.yaml` write them. Pure parsing, no I/O.

/// Parses a Compose-style duration into milliseconds: a sequence of `<number><unit>`
/// with units `us`, `ms`, `s`, `m`, `h`, `d`, `w` (e.g. `1m30s`, `90d`, `1.5s`).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let err = || {
        format!("invalid duration {text:?}: use a number with a unit, e.g. \"10s\", \"1m30s\", \"500ms\", \"90d\"")
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err());
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(err());
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let factor_ms = match &rest[..unit_len] {
            "us" | "µs" => 0.001,
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            "w" => 604_800_000.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += number * factor_ms;
    }
    if !total.is_finite() || total > u64::MAX as f64 / 2.0 {
        return Err(err());
    }
    Ok(total.round() as u64)
}

/// Parses a byte size: a plain number of bytes, or a number with a unit `b`, `k`, `m`,
/// `g` (optionally followed by `b`, any case; powers of 1024), e.g. `512m`, `1.5G`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let err =
        || format!("invalid size {text:?}: use bytes or a number with k, m or g, e.g. \"512m\", \"1.5g\"");
    let s = text.trim().to_ascii_lowercase();
    let num_len = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    if num_len == 0 {
        return Err(err());
    }
    let number: f64 = s[..num_len].parse().map_err(|_| err())?;
    let factor: f64 = match &s[num_len..] {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let bytes = number * factor;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

/// Parses a CPU count (`0.5`, `2`) into billionths of a CPU (Docker's `NanoCpus`).
pub fn parse_nano_cpus(text: &str) -> Result<u64, String> {
    let err = || format!("invalid CPU count {text:?}: use a positive number such as \"0.5\" or \"2\"");
    let cpus: f64 = text.trim().parse().map_err(|_| err())?;
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 4096.0 {
        return Err(err());
    }
    Ok((cpus * 1e9).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_compose_writes_them() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        assert_eq!(parse_duration_ms("90d"), Ok(90 * 86_400_000));
        assert_eq!(parse_duration_ms("2h1m"), Ok(7_260_000));
        for bad in ["", "10", "s", "10x", "1m30", "-1s"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(1536 << 20));
        assert_eq!(parse_bytes("1gb"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_nano_cpus("0.5"), Ok(500_000_000));
        assert!(parse_nano_cpus("0").is_err());
    }
}
