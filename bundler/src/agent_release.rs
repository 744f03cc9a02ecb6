//! Agent releases (bundle format 7): which version of `fleet-agent` a device should run,
//! as the fleet repository declares it, and the release directories `build` takes the
//! binaries from.
//!
//! The declaration: `agent:` of `fleet.yaml` is one rule or a list of rules, each
//! `{version, selector, allow_downgrade}`; a device takes the first rule whose selector
//! its labels match (a rule without selector matches every device), and `agent:` of its
//! own `devices/<id>.yaml` (`{version, allow_downgrade}`) comes before every rule. A
//! device that no rule matches gets no agent release: `DesiredState::agent` stays `None`
//! and its agent is left as it is. Rendering puts the declaration into the state with no
//! binaries ([`Rule::declared`]); `build` fills them in from the release of that version
//! ([`Releases::attach`]), so `plan` sees a declared version change without binaries.
//!
//! A release directory (`build --agent-release DIR`, as `cross/build.sh` writes `dist/`)
//! holds `release.json`:
//!
//! ```json
//! {"version": "0.10.0", "binaries": {"aarch64": "fleet-agent-aarch64-unknown-linux-musl",
//!                                    "arm": "fleet-agent-armv7-unknown-linux-musleabihf",
//!                                    "x86_64": "fleet-agent-x86_64-unknown-linux-musl"}}
//! ```
//!
//! Architectures are named as the agent names its own (`std::env::consts::ARCH`), file
//! names are relative to DIR. Each binary is read whole (at most [`MAX_BINARY_SIZE`]),
//! hashed, and checked against its architecture when it is an ELF file; `build` writes
//! it once as `blobs/<sha256>`, like an artifact's bytes, and each device picks the
//! binary of its own architecture.
//!
//! Pure but for [`Release::load`] and [`Releases::load`], which read release directories.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use fleet_spec::model::{check_version, AgentBinary, AgentRelease};
use fleet_spec::DesiredState;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::diag::Diagnostic;
use crate::format::SelectorValue;
use crate::yaml::{Pos, Scalar, Shape, Spanned};

/// The keys of one rule of `agent:` in `fleet.yaml`.
const RULE_SHAPE: Shape =
    Shape::Keys(&[("version", Shape::Any), ("selector", Shape::Any), ("allow_downgrade", Shape::Any)]);

/// `agent:` of `fleet.yaml`: one rule, or a list of rules.
pub const AGENT_SHAPE: Shape = Shape::OneOrList(&RULE_SHAPE);

/// `agent:` of `devices/<id>.yaml`.
pub const DEVICE_AGENT_SHAPE: Shape =
    Shape::Keys(&[("version", Shape::Any), ("allow_downgrade", Shape::Any)]);

/// The file in a release directory that names the version and the binaries.
pub const RELEASE_FILE: &str = "release.json";

/// The largest agent binary read (a release binary is a few MiB; a debug build is
/// larger, and no device should be sent one).
pub const MAX_BINARY_SIZE: u64 = 128 << 20;

/// One rule of `agent:` in `fleet.yaml`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// `MAJOR.MINOR.PATCH[-PRE]`, as `fleet-agent --version` prints it.
    pub version: Spanned<Scalar>,
    /// Which devices the rule is for: every label listed must match (a list of values
    /// means any of them). Absent: every device.
    #[serde(default)]
    pub selector: Option<Spanned<BTreeMap<String, Spanned<SelectorValue>>>>,
    /// Lets a device go to an older version than the one it runs (default false).
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// `agent:` of a device file: this device's version, before every rule of `fleet.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceAgentFile {
    pub version: Spanned<Scalar>,
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// `agent:` of `fleet.yaml`: the short form (one rule) or a list of rules.
#[derive(Debug, Default)]
pub struct AgentFile(pub Vec<RuleFile>);

impl<'de> Deserialize<'de> for AgentFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AgentFile;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a rule {version, selector, allow_downgrade} or a list of such rules")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AgentFile, A::Error> {
                RuleFile::deserialize(de::value::MapAccessDeserializer::new(map)).map(|r| AgentFile(vec![r]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AgentFile, A::Error> {
                let mut rules = Vec::new();
                while let Some(rule) = seq.next_element::<RuleFile>()? {
                    rules.push(rule);
                }
                Ok(AgentFile(rules))
            }
        }
        d.deserialize_any(V)
    }
}

/// A checked rule: the agent release of the devices it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub version: String,
    pub allow_downgrade: bool,
    /// `None`: every device. Otherwise every label must have one of the values.
    pub selector: Option<BTreeMap<String, Vec<String>>>,
    /// The file that declares it (`fleet.yaml` or `devices/<id>.yaml`) and where its
    /// version is written, for the errors that concern the rule.
    pub file: String,
    pub at: Pos,
}

impl Rule {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        match &self.selector {
            None => true,
            Some(sel) => sel.iter().all(|(k, values)| labels.get(k).is_some_and(|v| values.contains(v))),
        }
    }

    /// The release as rendering puts it into a state: no binaries yet.
    pub fn declared(&self) -> AgentRelease {
        AgentRelease {
            version: self.version.clone(),
            allow_downgrade: self.allow_downgrade,
            binaries: Vec::new(),
        }
    }
}

/// Checks `agent:` of `file` (fleet.yaml); every problem becomes a diagnostic.
pub fn rules_from_file(file: &str, f: &AgentFile, diags: &mut Vec<Diagnostic>) -> Vec<Rule> {
    let mut rules = Vec::new();
    let count = f.0.len();
    for (i, r) in f.0.iter().enumerate() {
        let at = Pos::of(&r.version);
        let version = checked_version(file, &r.version, diags);
        let selector = r.selector.as_ref().map(|s| {
            for (k, v) in &s.value {
                if v.value.0.is_empty() {
                    let at = Pos::of(v);
                    diags.push(Diagnostic::error(
                        file,
                        at.line,
                        at.column,
                        format!(
                            "agent: selector label `{k}` lists no value: give a value or a list of values"
                        ),
                    ));
                }
            }
            s.value.iter().map(|(k, v)| (k.clone(), v.value.0.clone())).collect::<BTreeMap<_, _>>()
        });
        if selector.is_none() && i + 1 < count {
            diags.push(Diagnostic::error(
                file,
                at.line,
                at.column,
                "agent: this rule has no selector, so it matches every device and the rules after it \
                 match none (the first matching rule wins): make it the last rule, or give it a selector",
            ));
        }
        if let Some(version) = version {
            rules.push(Rule { version, allow_downgrade: r.allow_downgrade, selector, file: file.into(), at });
        }
    }
    rules
}

/// Checks `agent:` of the device file `file`.
pub fn device_rule(file: &str, f: &DeviceAgentFile, diags: &mut Vec<Diagnostic>) -> Option<Rule> {
    let version = checked_version(file, &f.version, diags)?;
    Some(Rule {
        version,
        allow_downgrade: f.allow_downgrade,
        selector: None,
        file: file.into(),
        at: Pos::of(&f.version),
    })
}

fn checked_version(file: &str, v: &Spanned<Scalar>, diags: &mut Vec<Diagnostic>) -> Option<String> {
    match check_version(&v.value.0) {
        Ok(()) => Some(v.value.0.clone()),
        Err(why) => {
            let at = Pos::of(v);
            diags.push(Diagnostic::error(
                file,
                at.line,
                at.column,
                format!(
                    "agent: version `{}` is not MAJOR.MINOR.PATCH[-PRE] ({why}): write it as `fleet-agent \
                     --version` prints it, e.g. \"0.10.0\" or \"0.10.0-rc.1\" (quoted, so YAML keeps it text)",
                    v.value.0
                ),
            ));
            None
        }
    }
}

/// The architectures a release may name (`std::env::consts::ARCH` of Linux targets) and
/// their ELF machine number (`e_machine`), to catch a binary filed under the wrong one.
const ARCHS: &[(&str, u16)] = &[
    ("aarch64", 183),
    ("arm", 40),
    ("x86_64", 62),
    ("x86", 3),
    ("riscv64", 243),
    ("powerpc", 20),
    ("powerpc64", 21),
    ("s390x", 22),
    ("mips", 8),
    ("mips64", 8),
    ("loongarch64", 258),
    ("sparc64", 43),
    ("m68k", 4),
    ("csky", 252),
];

/// The architecture meant by a name that is not one (`arm64`, `armv7`, a triple).
fn meant_arch(name: &str) -> Option<&'static str> {
    let first = name.split('-').next().unwrap_or(name);
    match first {
        "aarch64" | "arm64" => Some("aarch64"),
        "arm" | "armv7" | "armv7l" | "armv6" | "armv6l" | "armhf" | "armel" | "armv7hf" => Some("arm"),
        "x86_64" | "amd64" | "x64" => Some("x86_64"),
        "i386" | "i586" | "i686" | "x86" => Some("x86"),
        "riscv64gc" | "riscv64" => Some("riscv64"),
        _ => None,
    }
}

fn machine_arch(machine: u16) -> String {
    let names: Vec<&str> = ARCHS.iter().filter(|(_, m)| *m == machine).map(|(a, _)| *a).collect();
    if names.is_empty() {
        format!("ELF machine {machine}")
    } else {
        names.join("/")
    }
}

/// The ELF machine of `bytes`, `None` when it is not an ELF file.
fn elf_machine(bytes: &[u8]) -> Option<u16> {
    if bytes.len() < 20 || !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    match bytes[5] {
        1 => Some(u16::from_le_bytes([bytes[18], bytes[19]])),
        2 => Some(u16::from_be_bytes([bytes[18], bytes[19]])),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(
        "--agent-release {}: no such directory: pass the directory cross/build.sh wrote (dist/), or a release \
         directory holding release.json and the binaries it names",
        .dir.display()
    )]
    NoDir { dir: PathBuf },
    #[error(
        "{} does not exist: --agent-release takes the directory cross/build.sh wrote (dist/, with release.json \
         since it builds every required target), or a directory holding a release.json like {{\"version\": \
         \"0.10.0\", \"binaries\": {{\"aarch64\": \"FILE\"}}}}",
        .path.display()
    )]
    NoReleaseFile { path: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{} is not a valid release file: {message} (expected {{\"version\": \"0.10.0\", \"binaries\": \
         {{\"aarch64\": \"FILE\", \"arm\": \"FILE\", \"x86_64\": \"FILE\"}}}}, file names relative to its \
         directory; cross/build.sh writes it)",
        .path.display()
    )]
    Malformed { path: PathBuf, message: String },
    #[error(
        "{} names the {arch} binary {}, which does not exist: build it again (cross/build.sh) or correct \
         release.json",
        .release.display(), .binary.display()
    )]
    MissingBinary { release: PathBuf, arch: String, binary: PathBuf },
    #[error(
        "{} (the {arch} binary of {}) is {}: an agent binary is a file of at most {} bytes (is it a \
         release build?)",
        .binary.display(), .release.display(), .what, MAX_BINARY_SIZE
    )]
    BadBinary { release: PathBuf, arch: String, binary: PathBuf, what: String },
    #[error(
        "{} is named the {arch} binary by {}, but it is an ELF executable for {found}: correct release.json \
         (the architecture as the agent names its own: aarch64, arm, x86_64)",
        .binary.display(), .release.display()
    )]
    WrongArch { release: PathBuf, arch: String, binary: PathBuf, found: String },
    #[error(
        "--agent-release {} and {} both hold version {version}: pass one directory per version",
        .first.display(), .second.display()
    )]
    SameVersion { version: String, first: PathBuf, second: PathBuf },
}

impl ReleaseError {
    /// The command line's mistake (exit 64) rather than a bad file (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, ReleaseError::NoDir { .. } | ReleaseError::SameVersion { .. })
    }
}

/// `release.json` as written.
#[derive(Debug, Deserialize)]
struct ReleaseFile {
    version: String,
    binaries: BTreeMap<String, String>,
}

/// One architecture's binary of a release, read.
#[derive(Clone)]
pub struct Binary {
    pub arch: String,
    /// Where it was read.
    pub path: PathBuf,
    pub sha256: [u8; 32],
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binary")
            .field("arch", &self.arch)
            .field("path", &self.path)
            .field("sha256", &hex::encode(self.sha256))
            .field("size", &self.bytes.len())
            .finish()
    }
}

impl Binary {
    /// What the signed state names.
    pub fn named(&self) -> AgentBinary {
        AgentBinary { arch: self.arch.clone(), sha256: self.sha256, size: self.bytes.len() as u64 }
    }
}

/// A release directory, read and checked.
#[derive(Debug, Clone)]
pub struct Release {
    pub dir: PathBuf,
    pub version: String,
    /// One per architecture, sorted by it.
    pub binaries: Vec<Binary>,
    /// What a person should know (a binary that is not an ELF file).
    pub warnings: Vec<String>,
}

impl Release {
    /// Reads `dir/release.json` and every binary it names.
    pub fn load(dir: &Path) -> Result<Release, ReleaseError> {
        if !dir.is_dir() {
            return Err(ReleaseError::NoDir { dir: dir.into() });
        }
        let path = dir.join(RELEASE_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReleaseError::NoReleaseFile { path })
            }
            Err(source) => return Err(ReleaseError::Io { path, source }),
        };
        let malformed = |message: String| ReleaseError::Malformed { path: path.clone(), message };
        let file: ReleaseFile = serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
        check_version(&file.version).map_err(|why| {
            malformed(format!("version `{}` is not MAJOR.MINOR.PATCH[-PRE] ({why})", file.version))
        })?;
        if file.binaries.is_empty() {
            return Err(malformed("`binaries` names no binary".into()));
        }
        let mut binaries = Vec::new();
        let mut warnings = Vec::new();
        for (arch, name) in &file.binaries {
            let machine = match ARCHS.iter().find(|(a, _)| a == arch) {
                Some((_, machine)) => *machine,
                None => {
                    let hint = match meant_arch(arch) {
                        Some(meant) => format!("did you mean `{meant}`? "),
                        None => String::new(),
                    };
                    return Err(malformed(format!(
                        "`{arch}` is not an architecture as the agent names its own ({hint}std::env::consts::ARCH: \
                         aarch64, arm, x86_64, ...)"
                    )));
                }
            };
            let relative = Path::new(name);
            if name.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(malformed(format!(
                    "the {arch} binary `{name}` is not a file name relative to the release directory"
                )));
            }
            let binary = dir.join(relative);
            let bad = |what: String| ReleaseError::BadBinary {
                release: path.clone(),
                arch: arch.clone(),
                binary: binary.clone(),
                what,
            };
            let meta = match std::fs::metadata(&binary) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ReleaseError::MissingBinary {
                        release: path.clone(),
                        arch: arch.clone(),
                        binary,
                    })
                }
                Err(source) => return Err(ReleaseError::Io { path: binary, source }),
            };
            if !meta.is_file() {
                return Err(bad("not a regular file".into()));
            }
            if meta.len() > MAX_BINARY_SIZE {
                return Err(bad(format!("{} bytes", meta.len())));
            }
            let bytes =
                std::fs::read(&binary).map_err(|source| ReleaseError::Io { path: binary.clone(), source })?;
            if bytes.is_empty() {
                return Err(bad("empty".into()));
            }
            if bytes.len() as u64 > MAX_BINARY_SIZE {
                return Err(bad(format!("{} bytes", bytes.len())));
            }
            match elf_machine(&bytes) {
                Some(found) if found != machine => {
                    return Err(ReleaseError::WrongArch {
                        release: path.clone(),
                        arch: arch.clone(),
                        binary,
                        found: machine_arch(found),
                    })
                }
                Some(_) => {}
                None => warnings.push(format!(
                    "{} (the {arch} binary of {}) is not an ELF executable: devices will fail to start it",
                    binary.display(),
                    path.display()
                )),
            }
            let sha256 = Sha256::digest(&bytes).into();
            binaries.push(Binary { arch: arch.clone(), path: binary, sha256, bytes });
        }
        // A BTreeMap: already sorted by architecture.
        Ok(Release { dir: dir.into(), version: file.version, binaries, warnings })
    }

    /// The release a state names (bundle format 7).
    pub fn agent(&self, allow_downgrade: bool) -> AgentRelease {
        AgentRelease {
            version: self.version.clone(),
            allow_downgrade,
            binaries: self.binaries.iter().map(Binary::named).collect(),
        }
    }

    /// `aarch64, arm, x86_64`.
    pub fn archs(&self) -> String {
        self.binaries.iter().map(|b| b.arch.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The releases of a build (`--agent-release`), by version.
#[derive(Debug, Clone, Default)]
pub struct Releases(pub BTreeMap<String, Release>);

impl Releases {
    /// Reads every directory; two of the same version are refused.
    pub fn load(dirs: &[PathBuf]) -> Result<Releases, ReleaseError> {
        let mut out: BTreeMap<String, Release> = BTreeMap::new();
        for dir in dirs {
            let release = Release::load(dir)?;
            if let Some(first) = out.get(&release.version) {
                return Err(ReleaseError::SameVersion {
                    version: release.version,
                    first: first.dir.clone(),
                    second: dir.clone(),
                });
            }
            out.insert(release.version.clone(), release);
        }
        Ok(Releases(out))
    }

    pub fn get(&self, version: &str) -> Option<&Release> {
        self.0.get(version)
    }

    /// One error per rule whose version no release provides, at the rule's version.
    pub fn missing<'a>(&self, rules: impl Iterator<Item = &'a Rule>) -> Vec<Diagnostic> {
        let given = if self.0.is_empty() {
            "no --agent-release was given".to_string()
        } else {
            let list: Vec<String> =
                self.0.values().map(|r| format!("{} in {}", r.version, r.dir.display())).collect();
            format!("the --agent-release directories hold {}", list.join(", "))
        };
        rules
            .filter(|r| !self.0.contains_key(&r.version))
            .map(|r| {
                Diagnostic::error(
                    r.file.as_str(),
                    r.at.line,
                    r.at.column,
                    format!(
                        "agent: version {} is not among the agent releases of this build ({given}): pass \
                         --agent-release DIR with the directory cross/build.sh wrote (dist/) for {}, whose \
                         release.json names that version",
                        r.version, r.version
                    ),
                )
            })
            .collect()
    }

    /// Fills in the binaries of the release `state` declares (rendering left them out);
    /// returns that release, or `None` when the state declares none. `Err` names a
    /// version no release provides.
    pub fn attach(&self, state: &mut DesiredState) -> Result<Option<&Release>, String> {
        let Some(declared) = &mut state.agent else { return Ok(None) };
        let Some(release) = self.0.get(&declared.version) else {
            return Err(format!(
                "agent version {} is not among the agent releases of this build: pass --agent-release DIR with \
                 the directory cross/build.sh wrote (dist/)",
                declared.version
            ));
        };
        *declared = release.agent(declared.allow_downgrade);
        Ok(Some(release))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> (Vec<Rule>, Vec<Diagnostic>) {
        #[derive(Deserialize)]
        struct Doc {
            agent: AgentFile,
        }
        let doc: Doc =
            match crate::yaml::parse_all("fleet.yaml", yaml, &Shape::Keys(&[("agent", AGENT_SHAPE)])) {
                Ok(d) => d,
                Err(diags) => return (Vec::new(), diags),
            };
        let mut diags = Vec::new();
        (rules_from_file("fleet.yaml", &doc.agent, &mut diags), diags)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_short_form_is_one_rule_for_every_device() {
        let (r, diags) = rules("agent:\n  version: \"0.10.0\"\n");
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].version.as_str(), r[0].allow_downgrade, r[0].at),
            ("0.10.0", false, Pos { line: 2, column: 12 })
        );
        assert!(r[0].selects(&labels(&[])));
        assert_eq!(r[0].declared().binaries, Vec::new());
    }

    #[test]
    fn a_list_of_rules_keeps_its_order_and_selectors() {
        let (r, diags) = rules(
            "agent:\n  - version: 0.11.0-rc.1\n    selector: {channel: [canary, beta]}\n  - version: 0.10.0\n    allow_downgrade: true\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(r.iter().map(|r| r.version.as_str()).collect::<Vec<_>>(), ["0.11.0-rc.1", "0.10.0"]);
        assert!(r[0].selects(&labels(&[("channel", "beta"), ("site", "x")])));
        assert!(!r[0].selects(&labels(&[("channel", "stable")])));
        assert!(!r[0].selects(&labels(&[])));
        assert!(r[1].allow_downgrade);
        assert_eq!(r[1].at, Pos { line: 4, column: 14 });
    }

    #[test]
    fn mistakes_are_named_at_their_place() {
        let (_, diags) = rules("agent:\n  - version: 0.10\n  - versoin: 1.0.0\n");
        let text: Vec<String> =
            diags.iter().map(|d| format!("{}:{} {}", d.line, d.column, d.message)).collect();
        assert!(
            text.iter().any(|m| m.starts_with("3:5 ") && m.contains("did you mean `version`")),
            "{text:?}"
        );

        let (_, diags) = rules("agent:\n  version: 1.0\n");
        assert!(diags[0].message.contains("version `1` is not MAJOR.MINOR.PATCH"), "{diags:?}");
        assert_eq!((diags[0].line, diags[0].column), (2, 12));

        let (r, diags) = rules("agent:\n  - version: 1.0.0\n  - version: 2.0.0\n    selector: {site: []}\n");
        assert_eq!(r.len(), 2);
        let text = format!("{diags:?}");
        assert!(text.contains("make it the last rule"), "{text}");
        assert!(text.contains("selector label `site` lists no value"), "{text}");

        let (_, diags) = rules("agent:\n  version: 1.0.0\n  selectr: {a: b}\n");
        assert!(
            diags.iter().any(|d| d.line == 3 && d.message.contains("did you mean `selector`")),
            "{diags:?}"
        );
    }

    #[test]
    fn elf_machines_are_read_in_either_byte_order() {
        let mut le = b"\x7fELF\x02\x01\x01".to_vec();
        le.resize(20, 0);
        le[18] = 183;
        assert_eq!(elf_machine(&le), Some(183));
        let mut be = le.clone();
        be[5] = 2;
        be[18] = 0;
        be[19] = 40;
        assert_eq!(elf_machine(&be), Some(40));
        assert_eq!(elf_machine(b"#!/bin/sh\necho not an elf file\n"), None);
        assert_eq!(machine_arch(62), "x86_64");
        assert_eq!(meant_arch("armv7-unknown-linux-musleabihf"), Some("arm"));
        assert_eq!(meant_arch("arm64"), Some("aarch64"));
    }
}
