//! The workspace's own binaries (`fleet-bundler`, `fleet-agent`) for end-to-end tests:
//! built with `cargo build -p <package> --bin <name>` once per test process (cargo is
//! incremental, so this is quick when they are up to date), then run from
//! `target/debug/<name>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, Result};

/// (package, bin) -> path of the built binary, or the build error.
type BuildCache = HashMap<(String, String), Result<PathBuf, String>>;

/// The workspace root (the parent of this crate).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The x86_64 agent as shipped (`cross/build.sh --targets x86_64`: static musl, release,
/// stripped), if it was built: what memory bounds are about.
pub fn shipped_agent() -> Option<PathBuf> {
    let path = workspace_root().join("dist/fleet-agent-x86_64-unknown-linux-musl");
    path.is_file().then_some(path)
}

/// The amd64 `.deb` that `cross/package.sh --arch amd64` makes of the shipped agent,
/// when it is there.
pub fn shipped_deb() -> Option<PathBuf> {
    let dist = workspace_root().join("dist");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dist)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("fleet-agent_") && name.ends_with("_amd64.deb")
        })
        .collect();
    debs.sort();
    debs.pop()
}

/// The marker before the version stamp in an agent binary
/// (`fleet_agent::agent::VERSION_STAMP`): 16 bytes, then 48 for the version.
const STAMP_MARKER: &[u8] = b"\0FLEET-AGENT-VS:";

/// An agent binary's bytes with `version` written into its stamp: the same agent,
/// reporting (and compared as) another version.
pub fn stamp_version(binary: &[u8], version: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(version.len() <= 48, "a stamp holds 48 bytes: {version}");
    let mut bytes = binary.to_vec();
    let at = bytes
        .windows(STAMP_MARKER.len())
        .position(|w| w == STAMP_MARKER)
        .ok_or_else(|| anyhow::anyhow!("the agent binary has no version stamp"))?;
    let stamp = bytes
        .get_mut(at + STAMP_MARKER.len()..at + STAMP_MARKER.len() + 48)
        .ok_or_else(|| anyhow::anyhow!("the agent binary's version stamp is cut short"))?;
    stamp.fill(0);
    stamp[..version.len()].copy_from_slice(version.as_bytes());
    Ok(bytes)
}

/// `<cargo target dir>/e2e-artifacts/<name>`: where tests leave files for people and
/// CI to look at (screenshots), never committed.
pub fn artifact_path(name: &str) -> PathBuf {
    target_dir().join("e2e-artifacts").join(name)
}

/// Path of workspace binary `name` from the package of the same name
/// (`workspace_bin("fleet-agent")`), building it first (once per process).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    workspace_bin_of(name, name)
}

/// Path of binary `bin` of workspace package `package`, building it first (once per
/// process). `CARGO_BIN_EXE_<bin>`, when set in the environment, wins.
pub fn workspace_bin_of(package: &str, bin: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{bin}")) {
        return Ok(PathBuf::from(path));
    }
    static BUILT: OnceLock<Mutex<BuildCache>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    // Held during the build: concurrent tests wait for one build instead of racing cargo.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let key = (package.to_string(), bin.to_string());
    let result = built.entry(key).or_insert_with(|| build(package, bin)).clone();
    result.map_err(|e| anyhow!(e))
}

fn build(package: &str, bin: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cargo:?} build -p {package}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        return Err(format!("cargo build -p {package} --bin {bin} failed ({}):\n{tail}", out.status));
    }
    let path = target_dir().join("debug").join(bin);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("cargo build -p {package} --bin {bin} succeeded but {} does not exist", path.display()))
    }
}
