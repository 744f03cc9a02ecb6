//! The command line: parsing argv into a [`Cli`], the help texts, and exit codes.
//!
//! Parsed with `lexopt` rather than clap: the agent runs on devices where every
//! hundred KiB of binary counts, and its few subcommands need no more than this. For
//! the same reason "did you mean" is a ten-line edit distance ([`suggest`]) rather than
//! a crate. This module never does I/O besides returning text to print.
//!
//! Exit codes follow sysexits, as `fleet-bundler`'s do: 64 (EX_USAGE) a bad command
//! line and an invalid `agent.toml` alike (what the agent was given is wrong; systemd does
//! not restart on it), 65 (EX_DATAERR) a bundle refused.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::LogFormat;

/// Exit codes (documented in `--help` and the README).
pub mod exit {
    pub const OK: u8 = 0;
    /// A runtime failure (including an apply that failed and was rolled back).
    pub const FAILURE: u8 = 1;
    /// Bad command line (sysexits EX_USAGE, as `fleet-bundler`).
    pub const USAGE: u8 = 64;
    /// `apply`: the bundle was rejected (verification or policy); nothing changed
    /// (EX_DATAERR, as `fleet-bundler verify`).
    pub const REJECTED: u8 = 65;
    /// `apply`: the bundle file cannot be read (EX_NOINPUT).
    pub const NO_INPUT: u8 = 66;
    /// `apply`: the container engine is unavailable (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// A temporary failure (image pull failed, ...; or the state directory is locked by
    /// a running agent that takes no sideloads): try again later (EX_TEMPFAIL).
    pub const TEMPFAIL: u8 = 75;
    /// Invalid `agent.toml`: the same code as a bad command line, as since the first
    /// release (scripts and the systemd unit rely on it).
    pub const CONFIG: u8 = 64;
}

pub const HELP: &str = "\
fleet-agent: keeps this device in the state its fleet repository declares.

It verifies signed bundles, applies files and containers atomically, waits for
health and rolls back when an update fails, repairs drift, and reports over MQTT.

USAGE:
    fleet-agent run          [--config FILE] [--log-format human|json]
    fleet-agent launch       [--config FILE] [--log-format human|json]
    fleet-agent apply        [--config FILE] [--json] [--retry] BUNDLE
    fleet-agent status       [--config FILE] [--json]
    fleet-agent check-config [--config FILE] [--json]
    fleet-agent forget       [--config FILE] DIGEST | --all
    fleet-agent identity     [--config FILE | --state-dir DIR] [--json] [--rotate | --retire KEYID]
    fleet-agent enroll       [--config FILE] [--json] [--timeout SECS]
    fleet-agent help COMMAND | COMMAND --help
    fleet-agent --version | --help

COMMANDS:
    run           Run the agent (as a systemd service): listen for announcements,
                  poll <fetch.base_url>/devices/<device>.json, reconcile, report.
    launch        Run the agent under the self-update supervisor (the service's
                  command): runs the current agent binary, tries a new one a
                  bundle delivers, and restores the previous one if it fails.
    apply         Sideload a bundle file (USB, air-gapped): full verification and the
                  same apply path as `run`; works without broker or network.
    status        Show this device's state from the state directory (no network).
    check-config  Validate agent.toml (every problem at once) and print what it
                  configures.
    forget        Drop a bundle from the rejected set so that it is judged again.
    identity      Print this device's public keys (age recipients) and key ids; the
                  key pair is made on first use and never leaves the device. Rotates
                  (--rotate) and retires (--retire) keys.
    enroll        Publish this device's enrollment claim (its public keys, agent
                  version, hardware facts) on the broker, for `fleet-bundler enroll`.

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
    -h, --help            Print help (`fleet-agent COMMAND --help` for a command's)
    -V, --version         Print the version

ENVIRONMENT:
    FLEET_LOG             log level: error, warn, info (default), debug, trace;
                          overrides log_level in agent.toml

EXAMPLES:
    fleet-agent check-config -c /etc/fleet-agent/agent.toml
    fleet-agent run -c /etc/fleet-agent/agent.toml --log-format json
    fleet-agent apply -c /etc/fleet-agent/agent.toml /media/usb/3f9a...c2.bundle
    fleet-agent status -c /etc/fleet-agent/agent.toml --json | jq .status.state
    fleet-agent enroll -c /etc/fleet-agent/agent.toml

EXIT CODES (sysexits, as fleet-bundler):
    0   ok (run: stopped by SIGTERM/SIGINT; apply: applied and healthy, or already so)
    1   runtime failure (apply: applied, failed health, rolled back)
    64  bad command line, or invalid configuration (every problem listed, with
        line:col and key)
    65  apply: bundle rejected (signature, version, expiry, paths...); nothing changed
    66  apply: bundle file cannot be read
    69  apply: container engine unavailable; nothing changed
    75  temporary failure (apply: image pull failed, ...; or a running agent that
        takes no sideloads; enroll: the broker did not acknowledge): retry
";

const HELP_RUN: &str = "\
fleet-agent run: run the agent (the systemd service).

Listens for announcements on MQTT, polls <fetch.base_url>/devices/<device>.json,
verifies and applies bundles, repairs drift, and reports status and events. Takes
sideloads from `fleet-agent apply` over <state_dir>/agent.sock. SIGTERM/SIGINT stop
it gracefully.

USAGE:
    fleet-agent run [--config FILE] [--log-format human|json]

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --log-format F    human or json; overrides log_format in agent.toml
    -h, --help            Print this help

EXIT CODES:
    0   stopped by SIGTERM/SIGINT
    1   runtime failure (the journal cannot be written: restart to recover)
    64  bad command line or invalid configuration
    75  the state directory is locked by another fleet-agent process

EXAMPLE:
    fleet-agent run -c /etc/fleet-agent/agent.toml --log-format json
";

const HELP_LAUNCH: &str = "\
fleet-agent launch: run the agent under the self-update supervisor (the service).

Runs `fleet-agent run` with the same arguments, from the binary a bundle delivered
and that passed its trial (<state_dir>/agent/current), else this installed binary.
When the running agent stages a new binary (a bundle's `agent:` release), it exits
with code 42 and the launcher starts the new binary on trial: it must connect to the
broker, report its status and pass a reconcile within updates.agent_trial_secs (300).
If it exits, hangs or does not confirm in time, the launcher stops it, records the
binary as failed (never tried again; the status says agent_update_failed with the
reason) and starts the previous binary again. The launcher itself is never replaced
by a self-update: a newer package (apt) replaces it, and when the installed package is
newer than the self-updated binary, the package's binary runs. Any other exit of the
agent restarts it after a backoff (1 s to 30 s); SIGTERM/SIGINT stop both.

USAGE:
    fleet-agent launch [--config FILE] [--log-format human|json]

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --log-format F    human or json; overrides log_format in agent.toml
    -h, --help            Print this help

EXIT CODES:
    0   stopped by SIGTERM/SIGINT (the agent stopped cleanly)
    64  bad command line or invalid configuration (also when the agent says so)

FILES:
    <state_dir>/agent/slots/<sha256>   delivered agent binaries (at most two kept)
    <state_dir>/agent/current          the binary that passed its trial (symlink)
    <state_dir>/agent/failed/<sha256>  binaries that failed, and why

EXAMPLE:
    fleet-agent launch -c /etc/fleet-agent/agent.toml
";

const HELP_APPLY: &str = "\
fleet-agent apply: sideload a bundle file (USB, air-gapped).

Full verification and the same apply path as `run`; works without broker or network.
When the service runs, it applies the bundle itself (over <state_dir>/agent.sock) and
`apply` waits for its outcome; otherwise `apply` does it here.

BUNDLE may be a bundle, or an export file (`fleet-bundler export`): the bundle and the
large files (artifacts) it names. Each artifact is hashed and stored in
<state_dir>/blobs/ first (only those the verified bundle names), then the bundle is
applied. A bundle that names artifacts the device lacks, sideloaded alone, is deferred
(`artifacts_missing`) until they are downloaded or an export brings them.

USAGE:
    fleet-agent apply [--config FILE] [--json] [--retry] BUNDLE

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --json            Print the outcome as JSON on stdout: outcome, digest,
                          version, code and reason (on a refusal or failure)
        --retry           Forget an earlier rejection of this bundle first (see
                          `fleet-agent forget`), so that it is judged again
    -h, --help            Print this help

EXIT CODES:
    0   applied and healthy, or already applied
    1   applied, failed health, rolled back
    64  bad command line or invalid configuration
    65  bundle rejected (signature, version, expiry, paths, policy...), or an export
        file that is damaged (`bad_export`: a blob that is not the signed bytes, a
        broken archive); nothing changed
    66  bundle file cannot be read
    69  container engine unavailable; nothing changed
    75  temporary failure (image pull failed, ...; or a running agent that takes no
        sideloads): retry

EXAMPLE:
    fleet-agent apply -c /etc/fleet-agent/agent.toml /media/usb/3f9a...c2.bundle
    fleet-agent apply /media/usb/gw-munich-01.export    # from `fleet-bundler export`
";

const HELP_STATUS: &str = "\
fleet-agent status: this device's state, from the state directory (no network).

USAGE:
    fleet-agent status [--config FILE] [--json]

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --json            Print JSON (times as Unix seconds)
    -h, --help            Print this help

EXIT CODES:
    0   ok
    1   the state directory cannot be read
    64  bad command line or invalid configuration

EXAMPLE:
    fleet-agent status -c /etc/fleet-agent/agent.toml --json | jq .status.state
";

const HELP_CHECK_CONFIG: &str = "\
fleet-agent check-config: validate agent.toml and print what it configures.

Every problem is reported at once, in file order, as FILE:LINE:COL: `key`: message.
`run` validates the same way: a config accepted here does not fail `run` at start.

USAGE:
    fleet-agent check-config [--config FILE] [--json]

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --json            Print JSON: ok, errors [{line, col, key, message}],
                          warnings, and what it configures
    -h, --help            Print this help

EXIT CODES:
    0   valid (warnings are printed on stderr)
    64  bad command line or invalid configuration

EXAMPLE:
    fleet-agent check-config -c /etc/fleet-agent/agent.toml
";

const HELP_FORGET: &str = "\
fleet-agent forget: drop bundles from the rejected set (rejected.json).

A forgotten bundle is judged again at its next announcement, poll or sideload.
Refusals caused by the device's own config (path_not_allowed, engine_disabled,
policy_denied, ...) are forgotten by themselves when that config changes;
use this for the others, e.g. after fixing a key on the device.

USAGE:
    fleet-agent forget [--config FILE] DIGEST
    fleet-agent forget [--config FILE] --all

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --all             Forget every rejected bundle
    -h, --help            Print this help

EXIT CODES:
    0   forgotten (or there was nothing to forget)
    1   the state directory cannot be written
    64  bad command line or invalid configuration

EXAMPLE:
    fleet-agent status | grep rejected
    fleet-agent forget 3f9a...c2
";

const HELP_IDENTITY: &str = "\
fleet-agent identity: this device's public keys, for enrollment and secrets.

Prints the device's age X25519 recipients (age1...) and key ids, the newest (the
current one) first. The key pair is made on first use in <state_dir>/identity.age
(0600, the format of age-keygen, so the standard `age -d -i` reads it) and never
leaves the device; the package's postinst makes it at install. Compare the key id
with what `fleet-bundler enroll list` shows before accepting a claim.

Rotating a key: --rotate adds a new key in front of the old one (the file then
holds both, and secrets encrypted to either open); enroll again, accept the claim
(the repository lists both keys), and once the device applied a bundle made for
the new key and the old one left devices/<id>.yaml, --retire the old key.

USAGE:
    fleet-agent identity [--config FILE | --state-dir DIR] [--json]
    fleet-agent identity [--config FILE | --state-dir DIR] --rotate
    fleet-agent identity [--config FILE | --state-dir DIR] --retire KEYID

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --state-dir DIR   Use this state directory and do not read agent.toml (the
                          postinst does so, before agent.toml is filled in)
        --rotate          Make a new key and keep the old ones (at most 4 keys)
        --retire KEYID    Remove an old key (never the current one, the newest)
        --json            Print JSON: device (null with --state-dir), recipient,
                          key_id (the current key), created (bool), keys [{recipient,
                          key_id, current}]
    -h, --help            Print this help

EXIT CODES:
    0   printed (made now, or read), rotated or retired
    1   the identity cannot be read or written (a damaged file is never replaced)
    64  bad command line or invalid configuration; --retire of the current key or of
        a key id the file does not hold; --rotate with 4 keys (nothing changed)

EXAMPLES:
    fleet-agent identity -c /etc/fleet-agent/agent.toml
    fleet-agent identity --rotate && fleet-agent enroll
    fleet-agent identity --retire 3f9a0c2b7d41e5a8
";

const HELP_ENROLL: &str = "\
fleet-agent enroll: publish this device's enrollment claim on the broker.

The claim (JSON, see fleet-spec/MESSAGES.md) lists the device's age recipients,
newest first (two during a key rotation), the current key id, the agent's version
and facts read from the system: arch, os, kernel release, host name and an id
derived from /etc/machine-id (never the machine id itself). It is retained (QoS 1)
on <prefix>/<fleet>/enroll/<device>; the command ends once the broker acknowledged
it. The identity is made first if there is none.

It connects with its own client id, <mqtt client id>-enroll (a running agent keeps
its session), with the credentials and TLS settings of [mqtt]. The device's broker
account needs `pattern write <prefix>/+/enroll/%u` (README \"Enrollment\"). A broker
speaking MQTT 3.1.1 acknowledges a publish its ACL dropped too: `fleet-bundler enroll
list` is where the claim shows.

The claim is unsigned: an operator accepts it (fleet-bundler enroll accept) after
comparing its key id with what `fleet-agent identity` prints here.

USAGE:
    fleet-agent enroll [--config FILE] [--json] [--timeout SECS]

OPTIONS:
    -c, --config FILE     agent.toml (default: /etc/fleet-agent/agent.toml)
        --json            Print JSON: topic and the claim as published
        --timeout SECS    Longest wait for the broker's acknowledgement (default 30)
    -h, --help            Print this help

EXIT CODES:
    0   published and acknowledged
    1   the identity cannot be read or made; the broker refused the connection
        (credentials, certificate)
    64  bad command line or invalid configuration (or no [mqtt])
    75  the broker did not acknowledge within the timeout: retry

EXAMPLE:
    fleet-agent enroll -c /etc/fleet-agent/agent.toml
    # then, in the fleet repository:
    fleet-bundler enroll list --broker mqtts://broker:8883 --repo .
";

pub const DEFAULT_CONFIG: &str = "/etc/fleet-agent/agent.toml";

/// The subcommands, for `help` and suggestions.
pub const COMMANDS: [&str; 8] =
    ["run", "launch", "apply", "status", "check-config", "forget", "identity", "enroll"];

/// The help text of a subcommand (`None`: the global help).
pub fn help(command: Option<&str>) -> &'static str {
    match command {
        Some("run") => HELP_RUN,
        Some("launch") => HELP_LAUNCH,
        Some("apply") => HELP_APPLY,
        Some("status") => HELP_STATUS,
        Some("check-config") => HELP_CHECK_CONFIG,
        Some("forget") => HELP_FORGET,
        Some("identity") => HELP_IDENTITY,
        Some("enroll") => HELP_ENROLL,
        _ => HELP,
    }
}

/// What `identity` does besides printing the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityAction {
    Show,
    /// `--rotate`
    Rotate,
    /// `--retire KEYID`
    Retire(String),
}

/// `enroll`'s default `--timeout`.
pub const ENROLL_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forget {
    Digest(String),
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    /// `run` under the self-update supervisor.
    Launch,
    Apply {
        bundle: PathBuf,
        json: bool,
        retry: bool,
    },
    Status {
        json: bool,
    },
    CheckConfig {
        json: bool,
    },
    Forget(Forget),
    Identity {
        json: bool,
        /// `--state-dir`: agent.toml is not read.
        state_dir: Option<PathBuf>,
        action: IdentityAction,
    },
    Enroll {
        json: bool,
        /// `--timeout`: the longest wait for the broker's acknowledgement.
        timeout: std::time::Duration,
    },
    /// The help of a subcommand, or the global one.
    Help(Option<&'static str>),
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub command: Command,
    pub config: PathBuf,
    pub log_format: Option<LogFormat>,
}

/// The long options each subcommand takes (besides `--config` and `--help`).
fn flags_of(command: &str) -> &'static [&'static str] {
    match command {
        "run" | "launch" => &["log-format"],
        "apply" => &["json", "retry"],
        "status" | "check-config" => &["json"],
        "identity" => &["json", "state-dir", "rotate", "retire"],
        "enroll" => &["json", "timeout"],
        "forget" => &["all"],
        _ => &[],
    }
}

const ALL_FLAGS: [&str; 11] = [
    "config",
    "help",
    "version",
    "json",
    "log-format",
    "retry",
    "all",
    "state-dir",
    "rotate",
    "retire",
    "timeout",
];

/// Parses the arguments (without the program name). Errors are usage messages.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut command: Option<String> = None;
    let mut config = None;
    let mut log_format = None;
    let mut state_dir = None;
    let mut retire = None;
    let mut timeout = None;
    let mut flags: Vec<&'static str> = Vec::new();
    let mut positional: Vec<OsString> = Vec::new();
    let mut help_wanted = false;
    let mut version = false;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => help_wanted = true,
            Short('V') | Long("version") => version = true,
            Short('c') | Long("config") => {
                config = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Long("log-format") => {
                let v = parser.value().map_err(|e| e.to_string())?;
                log_format = Some(match v.to_str() {
                    Some("human") => LogFormat::Human,
                    Some("json") => LogFormat::Json,
                    _ => return Err(format!("--log-format takes human or json, not {v:?}")),
                });
                flags.push("log-format");
            }
            Long("state-dir") => {
                state_dir = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
                flags.push("state-dir");
            }
            Long("retire") => {
                let v = parser.value().map_err(|e| e.to_string())?;
                let id = v.into_string().map_err(|v| format!("--retire {v:?} is not a key id"))?;
                if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "--retire {id:?} is not a key id (16 hex digits, as `fleet-agent identity` lists them)"
                    ));
                }
                retire = Some(id.to_ascii_lowercase());
                flags.push("retire");
            }
            Long("timeout") => {
                let v = parser.value().map_err(|e| e.to_string())?;
                let secs = v.to_str().and_then(|s| s.parse::<u64>().ok()).filter(|s| (1..=3600).contains(s));
                timeout =
                    Some(secs.ok_or_else(|| format!("--timeout takes seconds from 1 to 3600, not {v:?}"))?);
                flags.push("timeout");
            }
            Long("rotate") => flags.push("rotate"),
            Long("json") => flags.push("json"),
            Long("retry") => flags.push("retry"),
            Long("all") => flags.push("all"),
            Value(v) if command.is_none() => {
                command = Some(v.into_string().map_err(|v| format!("unknown command {v:?}"))?);
            }
            Value(v) => positional.push(v),
            Long(name) => {
                let name = name.to_string();
                return Err(format!("unknown option --{name}{}", did_you_mean(&name, &ALL_FLAGS, "--")));
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let known = |name: &str| COMMANDS.iter().copied().find(|c| *c == name);
    if help_wanted || command.as_deref() == Some("help") {
        // `fleet-agent help apply`, `fleet-agent apply --help`.
        let topic = match command.as_deref() {
            Some("help") => positional.first().and_then(|p| p.to_str()).and_then(known),
            Some(name) => known(name),
            None => None,
        };
        return Ok(Cli { command: Command::Help(topic), config: PathBuf::new(), log_format });
    }
    if version {
        return Ok(Cli { command: Command::Version, config: PathBuf::new(), log_format });
    }
    let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let Some(name) = command else {
        return Err(
            "missing command: run, launch, apply, status, check-config, forget, identity or enroll (see --help)"
                .into(),
        );
    };
    let Some(name) = known(&name) else {
        return Err(format!(
            "unknown command {name:?}{}: run, launch, apply, status, check-config, forget, identity or enroll (see --help)",
            did_you_mean(&name, &COMMANDS, "")
        ));
    };
    for flag in &flags {
        if !flags_of(name).contains(flag) {
            let takes: Vec<String> = flags_of(name).iter().map(|f| format!("--{f}")).collect();
            let takes = if takes.is_empty() { "only --config".to_string() } else { takes.join(", ") };
            return Err(format!(
                "--{flag} is not an option of `{name}` (it takes {takes}; see {name} --help)"
            ));
        }
    }
    let has = |flag: &str| flags.contains(&flag);
    let mut positional = positional.into_iter();
    let no_more = |positional: &mut std::vec::IntoIter<OsString>| match positional.next() {
        Some(p) => Err(format!("unexpected argument {p:?} for `{name}` (see {name} --help)")),
        None => Ok(()),
    };
    let command = match name {
        "run" => Command::Run,
        "launch" => Command::Launch,
        "apply" => {
            let bundle = positional
                .next()
                .map(PathBuf::from)
                .ok_or("`apply` needs a BUNDLE file: fleet-agent apply --config FILE BUNDLE")?;
            Command::Apply { bundle, json: has("json"), retry: has("retry") }
        }
        "status" => Command::Status { json: has("json") },
        "check-config" => Command::CheckConfig { json: has("json") },
        "identity" => {
            let action = match (has("rotate"), retire.take()) {
                (false, None) => IdentityAction::Show,
                (true, None) => IdentityAction::Rotate,
                (false, Some(id)) => IdentityAction::Retire(id),
                (true, Some(_)) => return Err("`identity` takes --rotate or --retire, not both".into()),
            };
            Command::Identity { json: has("json"), state_dir: state_dir.take(), action }
        }
        "enroll" => Command::Enroll {
            json: has("json"),
            timeout: std::time::Duration::from_secs(timeout.unwrap_or(ENROLL_TIMEOUT_SECS)),
        },
        _ => {
            let target = match (positional.next(), has("all")) {
                (None, true) => Forget::All,
                (Some(d), false) => {
                    let d = d.into_string().map_err(|d| format!("{d:?} is not a digest"))?;
                    if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!(
                            "{d:?} is not a bundle digest (64 hex digits, as `fleet-agent status` lists them)"
                        ));
                    }
                    Forget::Digest(d.to_ascii_lowercase())
                }
                (Some(_), true) => return Err("`forget` takes a DIGEST or --all, not both".into()),
                (None, false) => return Err("`forget` needs a DIGEST or --all (see forget --help)".into()),
            };
            Command::Forget(target)
        }
    };
    no_more(&mut positional)?;
    Ok(Cli { command, config, log_format })
}

/// `" (did you mean `x`?)"` when one of `candidates` is close to `typed`, else "".
pub fn did_you_mean(typed: &str, candidates: &[&str], prefix: &str) -> String {
    match suggest(typed, candidates) {
        Some(c) => format!(" (did you mean `{prefix}{c}`?)"),
        None => String::new(),
    }
}

/// The candidate closest to `typed` by edit distance, if close enough to be a typo
/// (at most a third of its length, at least 1; or a prefix of it).
pub fn suggest<'a>(typed: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (typed.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(typed, c), *c))
        .filter(|(d, c)| *d <= limit || (typed.len() >= 3 && c.starts_with(typed)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance with adjacent transpositions (optimal string alignment): `jsno` is one
/// edit from `json`. Full matrix: the strings are command and option names.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().take(w).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1).min(d[i * w + j - 1] + 1).min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
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
            Command::Apply { bundle: "x.bundle".into(), json: false, retry: false }
        );
        assert_eq!(
            p(&["apply", "--json", "--retry", "x.bundle"]).expect("ok").command,
            Command::Apply { bundle: "x.bundle".into(), json: true, retry: true }
        );
        assert_eq!(p(&["status", "--json", "-c", "a"]).expect("ok").command, Command::Status { json: true });
        assert_eq!(
            p(&["check-config", "--config=a"]).expect("ok").command,
            Command::CheckConfig { json: false }
        );
        assert_eq!(p(&["check-config", "--json"]).expect("ok").command, Command::CheckConfig { json: true });
        let digest = "ab".repeat(32);
        assert_eq!(p(&["forget", &digest]).expect("ok").command, Command::Forget(Forget::Digest(digest)));
        assert_eq!(p(&["forget", "--all"]).expect("ok").command, Command::Forget(Forget::All));
        assert_eq!(p(&["--version"]).expect("ok").command, Command::Version);
        assert_eq!(p(&["--help"]).expect("ok").command, Command::Help(None));
        assert_eq!(p(&["run", "--help"]).expect("ok").command, Command::Help(Some("run")));
        assert_eq!(p(&["help", "apply"]).expect("ok").command, Command::Help(Some("apply")));
        assert_eq!(p(&["run", "--log-format", "json"]).expect("ok").log_format, Some(LogFormat::Json));
        assert_eq!(p(&["status"]).expect("ok").config, PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(
            p(&["identity", "--json"]).expect("ok").command,
            Command::Identity { json: true, state_dir: None, action: IdentityAction::Show }
        );
        assert_eq!(
            p(&["identity", "--state-dir", "/var/lib/fleet-agent"]).expect("ok").command,
            Command::Identity {
                json: false,
                state_dir: Some("/var/lib/fleet-agent".into()),
                action: IdentityAction::Show
            }
        );
        assert_eq!(
            p(&["identity", "--rotate"]).expect("ok").command,
            Command::Identity { json: false, state_dir: None, action: IdentityAction::Rotate }
        );
        assert_eq!(
            p(&["identity", "--retire", "3F9A0C2B7D41E5A8"]).expect("ok").command,
            Command::Identity {
                json: false,
                state_dir: None,
                action: IdentityAction::Retire("3f9a0c2b7d41e5a8".into())
            }
        );
        assert_eq!(
            p(&["enroll", "-c", "a.toml"]).expect("ok").command,
            Command::Enroll { json: false, timeout: std::time::Duration::from_secs(ENROLL_TIMEOUT_SECS) }
        );
        assert_eq!(
            p(&["enroll", "--json", "--timeout", "5"]).expect("ok").command,
            Command::Enroll { json: true, timeout: std::time::Duration::from_secs(5) }
        );
    }

    #[test]
    fn each_command_has_its_own_help() {
        for c in COMMANDS {
            let text = help(Some(c));
            assert!(text.starts_with(&format!("fleet-agent {c}:")), "{c}");
            for part in ["USAGE:", "OPTIONS:", "EXIT CODES:", "EXAMPLE"] {
                assert!(text.contains(part), "{c} help lacks {part}");
            }
        }
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        assert!(p(&[]).expect_err("no command").contains("missing command"));
        assert!(p(&["apply", "-c", "a"]).expect_err("no bundle").contains("BUNDLE"));
        assert!(p(&["frobnicate"]).expect_err("unknown").contains("unknown command"));
        assert!(p(&["run", "--bogus"]).expect_err("unknown flag").contains("bogus"));
        assert!(p(&["run", "--json"]).expect_err("json").contains("--json"));
        assert!(p(&["run", "--log-format", "xml"]).expect_err("format").contains("human or json"));
        assert!(p(&["forget", "abc"]).expect_err("digest").contains("64 hex"));
        assert!(p(&["forget"]).expect_err("nothing").contains("--all"));
        assert!(p(&["run", "--state-dir", "/x"]).expect_err("identity only").contains("--state-dir"));
        assert!(p(&["identity", "--state-dir"]).expect_err("no value").contains("state-dir"));
        assert!(p(&["identity", "--rotate", "--retire", "0123456789abcdef"])
            .expect_err("both")
            .contains("not both"));
        assert!(p(&["identity", "--retire", "xyz"]).expect_err("id").contains("16 hex"));
        assert!(p(&["enroll", "--timeout", "0"]).expect_err("zero").contains("1 to 3600"));
        assert!(p(&["enroll", "--rotate"]).expect_err("identity only").contains("--rotate"));
        assert!(p(&["run", "--timeout", "3"]).expect_err("enroll only").contains("--timeout"));
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert!(p(&["aply", "x"]).expect_err("typo").contains("did you mean `apply`?"));
        assert!(p(&["check"]).expect_err("prefix").contains("did you mean `check-config`?"));
        assert!(p(&["stauts"]).expect_err("swap").contains("did you mean `status`?"));
        assert!(p(&["status", "--jsn"]).expect_err("flag").contains("did you mean `--json`?"));
        assert!(p(&["run", "--confg", "a"]).expect_err("flag").contains("did you mean `--config`?"));
        assert!(!p(&["zzzzzzz"]).expect_err("far").contains("did you mean"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("jsno", "json"), 1);
    }
}
