//! The command line: parsing argv into a [`Cli`], the help text, and exit codes.
//!
//! Parsed with `lexopt` rather than clap: the agent runs on devices where every
//! hundred KiB of binary counts, and its few subcommands need no more than this.
//! This module never does I/O besides returning text to print.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::LogFormat;

/// Exit codes (documented in `--help` and the README).
pub mod exit {
    pub const OK: u8 = 0;
    /// A runtime failure (including an apply that failed and was rolled back).
    pub const FAILURE: u8 = 1;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// Invalid `agent.toml` (sysexits EX_USAGE... EX_CONFIG is 78; we follow linkerd: 64).
    pub const CONFIG: u8 = 64;
    /// `apply`: the bundle was rejected (verification or policy); nothing changed.
    pub const REJECTED: u8 = 65;
    /// `apply`: the bundle file cannot be read.
    pub const NO_INPUT: u8 = 66;
    /// `apply`: the container engine is unavailable.
    pub const UNAVAILABLE: u8 = 69;
    /// A temporary failure (image pull failed, ...; or the state directory is locked by
    /// a running agent that takes no sideloads): try again later.
    pub const TEMPFAIL: u8 = 75;
}

pub const HELP: &str = "\
fleet-agent: keeps this device in the state its fleet repository declares.

It verifies signed bundles, applies files and containers atomically, waits for
health and rolls back when an update fails, repairs drift, and reports over MQTT.

USAGE:
    fleet-agent run          --config FILE [--log-format human|json]
    fleet-agent apply        --config FILE BUNDLE
    fleet-agent status       --config FILE [--json]
    fleet-agent check-config --config FILE
    fleet-agent --version | --help

COMMANDS:
    run           Run the agent (as a systemd service): listen for announcements,
                  poll <fetch.base_url>/devices/<device>.json, reconcile, report.
    apply         Sideload a bundle file (USB, air-gapped): full verification and the
                  same apply path as `run`; works without broker or network. When the
                  service runs, it applies the bundle itself (over <state_dir>/agent.sock)
                  and `apply` waits for its outcome; otherwise `apply` does it here.
    status        Show this device's state from the state directory (no network).
    check-config  Validate agent.toml and print what it configures.

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --json            `status`: print JSON
        --log-format F    human (default) or json; overrides log_format in agent.toml
    -h, --help            Print this help
    -V, --version         Print the version

ENVIRONMENT:
    FLEET_LOG             log level: error, warn, info (default), debug, trace;
                          overrides log_level in agent.toml

EXAMPLES:
    fleet-agent check-config -c /etc/fleet-agent/agent.toml
    fleet-agent run -c /etc/fleet-agent/agent.toml --log-format json
    fleet-agent apply -c /etc/fleet-agent/agent.toml /media/usb/3f9a...c2.bundle
    fleet-agent status -c /etc/fleet-agent/agent.toml --json | jq .status.state

EXIT CODES:
    0   ok (run: stopped by SIGTERM/SIGINT; apply: applied and healthy, or already so)
    1   runtime failure (apply: applied, failed health, rolled back)
    2   bad command line
    64  invalid configuration (the message names the key)
    65  apply: bundle rejected (signature, version, expiry, paths...); nothing changed
    66  apply: bundle file cannot be read
    69  apply: container engine unavailable; nothing changed
    75  temporary failure (apply: image pull failed, ...; or a running agent that
        takes no sideloads): retry
";

pub const DEFAULT_CONFIG: &str = "/etc/fleet-agent/agent.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    Apply { bundle: PathBuf },
    Status { json: bool },
    CheckConfig,
    Help,
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub command: Command,
    pub config: PathBuf,
    pub log_format: Option<LogFormat>,
}

/// Parses the arguments (without the program name). Errors are usage messages.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut command: Option<String> = None;
    let mut config = None;
    let mut log_format = None;
    let mut json = false;
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut help = false;
    let mut version = false;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => help = true,
            Short('V') | Long("version") => version = true,
            Short('c') | Long("config") => {
                config = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Long("json") => json = true,
            Long("log-format") => {
                let v = parser.value().map_err(|e| e.to_string())?;
                log_format = Some(match v.to_str() {
                    Some("human") => LogFormat::Human,
                    Some("json") => LogFormat::Json,
                    _ => return Err(format!("--log-format takes human or json, not {v:?}")),
                });
            }
            Value(v) if command.is_none() => {
                command = Some(v.into_string().map_err(|v| format!("unknown command {v:?}"))?);
            }
            Value(v) => positional.push(PathBuf::from(v)),
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    if help {
        return Ok(Cli { command: Command::Help, config: PathBuf::new(), log_format });
    }
    if version {
        return Ok(Cli { command: Command::Version, config: PathBuf::new(), log_format });
    }
    let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let Some(name) = command else {
        return Err("missing command: run, apply, status or check-config (see --help)".into());
    };
    let no_more = |positional: &[PathBuf]| match positional.first() {
        Some(p) => Err(format!("unexpected argument {p:?} for `{name}`")),
        None => Ok(()),
    };
    let command = match name.as_str() {
        "run" => {
            no_more(&positional)?;
            Command::Run
        }
        "apply" => {
            let mut it = positional.into_iter();
            let bundle =
                it.next().ok_or("`apply` needs a BUNDLE file: fleet-agent apply --config FILE BUNDLE")?;
            if let Some(extra) = it.next() {
                return Err(format!("unexpected argument {extra:?}: `apply` takes one BUNDLE"));
            }
            Command::Apply { bundle }
        }
        "status" => {
            no_more(&positional)?;
            Command::Status { json }
        }
        "check-config" => {
            no_more(&positional)?;
            Command::CheckConfig
        }
        "help" => Command::Help,
        other => {
            return Err(format!("unknown command {other:?}: run, apply, status or check-config (see --help)"))
        }
    };
    if json && !matches!(command, Command::Status { .. }) {
        return Err("--json is only for `status`".into());
    }
    Ok(Cli { command, config, log_format })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_each_command() {
        assert_eq!(p(&["run", "--config", "a.toml"]).expect("ok").command, Command::Run);
        assert_eq!(p(&["run", "-c", "a.toml"]).expect("ok").config, PathBuf::from("a.toml"));
        assert_eq!(
            p(&["apply", "--config", "a.toml", "x.bundle"]).expect("ok").command,
            Command::Apply { bundle: "x.bundle".into() }
        );
        assert_eq!(p(&["status", "--json", "-c", "a"]).expect("ok").command, Command::Status { json: true });
        assert_eq!(p(&["check-config", "--config=a"]).expect("ok").command, Command::CheckConfig);
        assert_eq!(p(&["--version"]).expect("ok").command, Command::Version);
        assert_eq!(p(&["run", "--help"]).expect("ok").command, Command::Help);
        assert_eq!(p(&["run", "--log-format", "json"]).expect("ok").log_format, Some(LogFormat::Json));
        assert_eq!(p(&["status"]).expect("ok").config, PathBuf::from(DEFAULT_CONFIG));
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        assert!(p(&[]).expect_err("no command").contains("missing command"));
        assert!(p(&["apply", "-c", "a"]).expect_err("no bundle").contains("BUNDLE"));
        assert!(p(&["frobnicate"]).expect_err("unknown").contains("unknown command"));
        assert!(p(&["run", "--bogus"]).expect_err("unknown flag").contains("bogus"));
        assert!(p(&["run", "--json"]).expect_err("json").contains("--json"));
        assert!(p(&["run", "--log-format", "xml"]).expect_err("format").contains("human or json"));
    }
}
