//! `fleet-bundler export`: one device's current bundle and the blobs its state names, as
//! one file to carry to a device that has no network (a sideload).
//!
//! The file is a POSIX ustar archive: first an entry `bundle` (the bundle's bytes), then
//! one entry `blobs/<sha256>` per distinct artifact content of the bundle's state, in the
//! state's order (by path), then one per binary of the state's agent release (bundle
//! format 7), by architecture: all of them, since the bundler does not know the device's
//! architecture (a content already written is not written twice). Every entry is a regular file with mode 0644, mtime 0, uid
//! and gid 0 and no user or group names, so the same build output gives the same bytes.
//! `fleet-spec/FORMAT.md` ("Export files") says how a reader takes it.
//!
//! The device's bundle is the one its pointer file (`DIR/devices/<id>.json`) names, or,
//! without one, its entry of `DIR/index.json`. The bundle is only parsed here (structure
//! and payload digest, [`bundle::open_accepted`]), never trusted: the device verifies it.
//! Every blob is checked against the size and sha256 the state names while it is copied,
//! so an export never carries bytes the device would refuse. FILE is written to a temp
//! file beside it, synced, then renamed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleet_spec::bundle::{self, Limits};
use fleet_spec::messages::{pointer_path, Announcement};
use fleet_spec::topic::{validate_id, TopicError};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build::{BuildError, Index, BLOBS};

/// The name of the first entry.
pub const BUNDLE_ENTRY: &str = "bundle";

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// The file written.
    pub file: PathBuf,
    pub device: String,
    pub version: u64,
    /// The bundle's digest (`bundles/<digest>.bundle`).
    pub bundle: String,
    /// Every artifact of the state, in the state's order (a content shared by two paths
    /// is one entry of the file).
    pub artifacts: Vec<ExportedArtifact>,
    /// The agent release of the state, whose binaries follow the artifacts' blobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<ExportedAgent>,
    /// The size of the file.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedAgent {
    pub version: String,
    pub allow_downgrade: bool,
    /// By architecture.
    pub binaries: Vec<ExportedBinary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedBinary {
    /// `std::env::consts::ARCH` of the binary.
    pub arch: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedArtifact {
    /// Where the device writes it.
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The command line's mistake: a bad device id, a directory that is no build output,
    /// a device it does not hold.
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid pointer file: {message} (build again into this directory)")]
    BadPointer { path: PathBuf, message: String },
    #[error(transparent)]
    Index(#[from] BuildError),
    #[error("{path} is missing: the build output is incomplete (build again into this directory)")]
    MissingBundle { path: PathBuf },
    #[error("{path} is not the bundle of device {device}: {message} (build again into this directory)")]
    BadBundle { path: PathBuf, device: String, message: String },
    #[error(
        "blob {blob} is missing: {file} of device {device} needs it; copy the blobs/ directory of the build \
         output along with bundles/ (a build into this directory writes it again)"
    )]
    MissingBlob { blob: PathBuf, file: String, device: String },
    #[error(
        "blob {blob} does not hold the bytes {file} needs ({expected}, got {got}): it is damaged; delete it \
         and build again into this directory"
    )]
    BadBlob { blob: PathBuf, file: String, expected: String, got: String },
}

/// Writes `file`: the current bundle of `device` in the build output `out`, then the
/// blobs its state names.
pub fn export(out: &Path, device: &str, file: &Path) -> Result<Exported, ExportError> {
    validate_id("device id", device).map_err(|e: TopicError| ExportError::Usage(format!("--device: {e}")))?;
    let announcement = current(out, device)?;
    let bundle_path = out.join("bundles").join(format!("{}.bundle", announcement.digest));
    let bytes = match std::fs::read(&bundle_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ExportError::MissingBundle { path: bundle_path })
        }
        Err(source) => return Err(ExportError::Io { path: bundle_path, source }),
    };
    let bad = |message: String| ExportError::BadBundle {
        path: bundle_path.clone(),
        device: device.into(),
        message,
    };
    if bundle::content_address(&bytes) != announcement.digest {
        return Err(bad("its sha256 is not its name".into()));
    }
    let (manifest, state) =
        bundle::open_accepted(&bytes, &Limits::default()).map_err(|e| bad(format!("{e} ({})", e.code())))?;
    if manifest.device != device {
        return Err(bad(format!("it is device {}'s", manifest.device)));
    }

    let artifacts: Vec<ExportedArtifact> = state
        .artifacts
        .iter()
        .map(|a| ExportedArtifact { path: a.path.clone(), sha256: a.sha256_hex(), size: a.size })
        .collect();
    let agent = state.agent.as_ref().map(|r| ExportedAgent {
        version: r.version.clone(),
        allow_downgrade: r.allow_downgrade,
        binaries: r
            .binaries
            .iter()
            .map(|b| ExportedBinary { arch: b.arch.clone(), sha256: b.sha256_hex(), size: b.size })
            .collect(),
    });
    // Every blob in the file's order: (sha256, size, what needs it).
    let mut blobs: Vec<(&str, u64, String)> =
        artifacts.iter().map(|a| (a.sha256.as_str(), a.size, a.path.clone())).collect();
    if let Some(agent) = &agent {
        for b in &agent.binaries {
            let what = format!("the agent {} binary for {}", agent.version, b.arch);
            blobs.push((b.sha256.as_str(), b.size, what));
        }
    }
    // Every blob present with its size before anything is written.
    for (sha256, size, what) in &blobs {
        let blob = out.join(BLOBS).join(sha256);
        match std::fs::metadata(&blob) {
            Ok(m) if m.is_file() && m.len() == *size => {}
            Ok(m) => {
                return Err(ExportError::BadBlob {
                    blob,
                    file: what.clone(),
                    expected: format!("{size} bytes"),
                    got: format!("{} bytes", m.len()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ExportError::MissingBlob { blob, file: what.clone(), device: device.into() })
            }
            Err(source) => return Err(ExportError::Io { path: blob, source }),
        }
    }

    let tmp = Temp::beside(file);
    let io = |source| ExportError::Io { path: tmp.path.clone(), source };
    let mut tar = tar::Builder::new(File::create(&tmp.path).map_err(io)?);
    tar.append(&header(BUNDLE_ENTRY, bytes.len() as u64), bytes.as_slice()).map_err(io)?;
    let mut written = std::collections::HashSet::new();
    for (sha256, size, what) in &blobs {
        if !written.insert(*sha256) {
            continue;
        }
        let blob = out.join(BLOBS).join(sha256);
        let source = File::open(&blob).map_err(|source| ExportError::Io { path: blob.clone(), source })?;
        let mut reader = Hashing { inner: source.take(*size), hasher: Sha256::new(), len: 0 };
        let name = format!("{BLOBS}/{sha256}");
        tar.append(&header(&name, *size), &mut reader)
            .map_err(|source| ExportError::Io { path: blob.clone(), source })?;
        let got = hex::encode(reader.hasher.finalize());
        if reader.len != *size || got != *sha256 {
            return Err(ExportError::BadBlob {
                blob,
                file: what.clone(),
                expected: format!("sha256 {sha256}"),
                got: format!("sha256 {got} of {} bytes", reader.len),
            });
        }
    }
    let mut f = tar.into_inner().map_err(io)?;
    f.flush().map_err(io)?;
    f.sync_all().map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    drop(f);
    tmp.persist(file)?;
    Ok(Exported {
        file: file.into(),
        device: device.into(),
        version: manifest.version,
        bundle: announcement.digest,
        artifacts,
        agent,
        bytes: size,
    })
}

/// The device's announcement: its pointer file, or its entry of `index.json`.
fn current(out: &Path, device: &str) -> Result<Announcement, ExportError> {
    let pointer = out.join(pointer_path(device));
    match std::fs::read(&pointer) {
        Ok(bytes) => {
            let a = Announcement::from_json(&bytes)
                .map_err(|e| ExportError::BadPointer { path: pointer.clone(), message: e.to_string() })?;
            if a.device != device {
                let message = format!("it names device {}", a.device);
                return Err(ExportError::BadPointer { path: pointer, message });
            }
            return Ok(a);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ExportError::Io { path: pointer, source }),
    }
    let index_path = out.join("index.json");
    let Some(index) = Index::read(&index_path)? else {
        return Err(ExportError::Usage(format!(
            "{} holds neither {} nor index.json: pass the output directory of `fleet-bundler build` as --out",
            out.display(),
            pointer_path(device)
        )));
    };
    match index.devices.get(device) {
        Some(entry) => Ok(entry.announcement(&index.fleet, device)),
        None => Err(ExportError::Usage(format!(
            "device {device} is not in {} (fleet {}, {} device(s)): check --device",
            index_path.display(),
            index.fleet,
            index.devices.len()
        ))),
    }
}

/// A regular file entry: mode 0644, mtime 0, uid/gid 0, no names.
fn header(path: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).expect("entry names are short ASCII");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

/// Hashes and counts what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// A temp file beside the target, removed unless persisted.
struct Temp {
    path: PathBuf,
    persisted: bool,
}

impl Temp {
    fn beside(target: &Path) -> Temp {
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("export");
        Temp { path: dir_of(target).join(format!(".{name}.tmp.{}", std::process::id())), persisted: false }
    }

    /// Renames it to `target`, then syncs the directory.
    fn persist(mut self, target: &Path) -> Result<(), ExportError> {
        std::fs::rename(&self.path, target)
            .map_err(|source| ExportError::Io { path: target.into(), source })?;
        self.persisted = true;
        let dir = dir_of(target);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| ExportError::Io { path: dir.into(), source })
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}
