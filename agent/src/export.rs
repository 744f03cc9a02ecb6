//! Export files (`fleet-bundler export`): one file with a bundle and the artifacts it
//! names, for a device with no network (`fleet-agent apply FILE` from a USB stick).
//!
//! The file is a POSIX ustar archive: the entry `bundle` first, then `blobs/<sha256>`
//! per artifact (`fleet-spec/FORMAT.md`, "Export files"). Read here by hand, streaming,
//! rather than with the `tar` crate: the agent needs a dozen lines of it, and every
//! dependency costs on the device. Nothing in the archive is trusted: the bundle is
//! verified like any other, and a blob is stored only when the verified state names it,
//! and only after its bytes hashed to that name at that size (`Store::import_blob`).
//! Anything else in the archive is skipped unread.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use fleet_spec::bundle::{self, Expectation, TrustState};

use crate::config::Config;
use crate::store::{ImportError, Store};

const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid export file ({reason}); export it again with `fleet-bundler export`")]
    Malformed { path: PathBuf, reason: String },
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// What an export file held.
#[derive(Debug, Default)]
pub struct Opened {
    pub bundle: Vec<u8>,
    /// Blobs stored from the file (named by the bundle, not held before).
    pub imported: usize,
    pub imported_bytes: u64,
}

/// Reads `path`: a plain bundle (returned as it is, at most `max_bundle` bytes) or an
/// export file, whose artifacts go to the blob store on the way. Memory stays at one
/// bundle and a 64 KiB buffer whatever the artifacts weigh.
pub fn open(path: &Path, cfg: &Config, store: &Store) -> Result<Opened, ExportError> {
    let io_err = |source| ExportError::Io { path: path.to_path_buf(), source };
    let malformed = |reason: &str| ExportError::Malformed { path: path.to_path_buf(), reason: reason.into() };
    let max_bundle = cfg.limits.max_bundle_len();
    let mut file = File::open(path).map_err(io_err)?;
    let mut header = [0u8; BLOCK];
    let got = read_full(&mut file, &mut header).map_err(io_err)?;
    if got < BLOCK || &header[257..262] != b"ustar" {
        // A plain bundle: what was read, and the rest.
        let mut bytes = header[..got].to_vec();
        file.take(max_bundle.saturating_sub(got as u64) + 1).read_to_end(&mut bytes).map_err(io_err)?;
        return Ok(Opened { bundle: bytes, ..Opened::default() });
    }
    let first = Header::parse(&header).map_err(|r| malformed(&r))?;
    if first.name != "bundle" || first.size > max_bundle {
        return Err(malformed("the first entry must be `bundle`, within fetch.max_bundle_bytes"));
    }
    let mut bundle = Vec::with_capacity(first.size as usize);
    (&mut file).take(first.size).read_to_end(&mut bundle).map_err(io_err)?;
    if bundle.len() as u64 != first.size {
        return Err(malformed("truncated in `bundle`"));
    }
    skip(&mut file, padding(first.size)).map_err(io_err)?;
    let mut opened = Opened { bundle, ..Opened::default() };

    // The artifacts (and agent binary) the bundle names, if it verifies (replay and expiry are the apply
    // path's to judge, with the device's trust state; here only the signature and the
    // address matter). A bundle that does not verify imports nothing; the apply says why.
    let expect = Expectation { fleet: &cfg.fleet, device: &cfg.device };
    let no_trust = TrustState { last_version: None, last_known_time: 0 };
    let named: BTreeMap<String, u64> =
        match bundle::verify(&opened.bundle, &cfg.trusted, expect, no_trust, i64::MIN / 2, &cfg.limits) {
            Ok(v) => {
                let mut named: BTreeMap<String, u64> =
                    v.state.artifacts.iter().map(|a| (a.sha256_hex(), a.size)).collect();
                // The agent binary of this device's architecture (bundle format 7).
                if let Some(b) = v.state.agent.as_ref().and_then(|r| r.binary(std::env::consts::ARCH)) {
                    named.insert(b.sha256_hex(), b.size);
                }
                named
            }
            Err(_) => BTreeMap::new(),
        };
    loop {
        let got = read_full(&mut file, &mut header).map_err(io_err)?;
        if got == 0 || header.iter().all(|&b| b == 0) {
            return Ok(opened); // end of archive
        }
        if got < BLOCK {
            return Err(malformed("truncated header"));
        }
        let h = Header::parse(&header).map_err(|r| malformed(&r))?;
        let sha = h.name.strip_prefix("blobs/").unwrap_or_default();
        let wanted = h.regular && named.get(sha) == Some(&h.size) && !store.has_blob(sha, h.size);
        if wanted {
            store.import_blob(&mut (&mut file).take(h.size), sha, h.size)?;
            opened.imported += 1;
            opened.imported_bytes += h.size;
            skip(&mut file, padding(h.size)).map_err(io_err)?;
        } else {
            skip(&mut file, h.size + padding(h.size)).map_err(io_err)?;
        }
    }
}

/// One ustar header, as far as it is used here.
struct Header {
    name: String,
    size: u64,
    regular: bool,
}

impl Header {
    fn parse(b: &[u8; BLOCK]) -> Result<Header, String> {
        let stored = octal(&b[148..156]).ok_or("bad header checksum field")?;
        let sum: u64 =
            b.iter().enumerate().map(|(i, &c)| if (148..156).contains(&i) { 32 } else { c as u64 }).sum();
        if stored != sum {
            return Err("header checksum mismatch: the file is damaged".into());
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &b[r];
            let end = f.iter().position(|&c| c == 0).unwrap_or(f.len());
            String::from_utf8_lossy(&f[..end]).into_owned()
        };
        let (name, prefix) = (field(0..100), field(345..500));
        let name = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let size = octal(&b[124..136]).ok_or("bad size field")?;
        Ok(Header { name, size, regular: matches!(b[156], b'0' | 0) })
    }
}

/// An octal number field (NUL- or space-terminated, maybe space-padded).
fn octal(f: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(f).ok()?.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let skipped = io::copy(&mut r.take(n), &mut io::sink())?;
    if skipped == n {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends inside an entry"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::bundle::BundleMeta;
    use fleet_spec::keys::SigningKey;
    use fleet_spec::model::{Artifact, DesiredState};
    use sha2::{Digest, Sha256};

    /// A ustar archive of `entries`, as `fleet-bundler export` writes one.
    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, bytes) in entries {
            let mut h = [0u8; BLOCK];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..108].copy_from_slice(b"0000644\0");
            h[124..136].copy_from_slice(format!("{:011o}\0", bytes.len()).as_bytes());
            h[136..148].copy_from_slice(b"00000000000\0");
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u64 = h.iter().map(|&b| b as u64).sum();
            h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(bytes);
            out.resize(out.len() + padding(bytes.len() as u64) as usize, 0);
        }
        out.resize(out.len() + 2 * BLOCK, 0);
        out
    }

    struct Setup {
        dir: tempfile::TempDir,
        cfg: Config,
        store: Store,
        key: SigningKey,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_seed(&[4; 32]);
        let text = format!(
            "device = \"gw\"\nfleet = \"acme\"\nstate_dir = \"{}\"\nallowed_roots = [\"/srv\"]\n[trust]\npublic_keys = [\"{}\"]\n",
            dir.path().join("state").display(),
            key.public()
        );
        let cfg = Config::parse(&text, Path::new("/etc/agent.toml")).expect("config");
        let store = Store::new(&cfg.state_dir);
        store.create().expect("store");
        Setup { dir, cfg, store, key }
    }

    fn signed(s: &Setup, blobs: &[&[u8]]) -> Vec<u8> {
        let mut state = DesiredState::default();
        for (i, b) in blobs.iter().enumerate() {
            state.artifacts.push(Artifact {
                path: format!("/srv/m{i}.bin"),
                mode: 0o644,
                owner: None,
                sha256: Sha256::digest(b).into(),
                size: b.len() as u64,
            });
        }
        let meta = BundleMeta {
            fleet: "acme".into(),
            device: "gw".into(),
            version: 1,
            commit: "c".into(),
            subject: "t".into(),
            created_at: 1,
            expires_at: i64::MAX / 2,
        };
        bundle::build(meta, &state, &[&s.key], 3)
    }

    fn write(s: &Setup, bytes: &[u8]) -> PathBuf {
        let p = s.dir.path().join("export.tar");
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn an_export_stores_the_blobs_its_bundle_names_and_nothing_else() {
        let s = setup();
        let (a, b) = (vec![1u8; 70_000], vec![2u8; 513]);
        let stray = vec![3u8; 100];
        let bundle = signed(&s, &[&a, &b]);
        let (na, nb, ns) =
            (format!("blobs/{}", sha(&a)), format!("blobs/{}", sha(&b)), format!("blobs/{}", sha(&stray)));
        let file =
            write(&s, &tar(&[("bundle", &bundle), (&na, &a), (&ns, &stray), ("../../etc/x", &b), (&nb, &b)]));
        let opened = open(&file, &s.cfg, &s.store).expect("opens");
        assert_eq!(opened.bundle, bundle);
        assert_eq!((opened.imported, opened.imported_bytes), (2, 70_513));
        assert!(s.store.has_blob(&sha(&a), a.len() as u64) && s.store.has_blob(&sha(&b), b.len() as u64));
        assert!(!s.store.blob_path(&sha(&stray)).exists(), "a blob the bundle does not name is skipped");
        assert_eq!(std::fs::read_dir(s.store.blobs_dir()).expect("ls").count(), 2, "nothing else written");

        // A plain bundle is a plain bundle.
        let plain = s.dir.path().join("plain.bundle");
        std::fs::write(&plain, &bundle).expect("write");
        assert_eq!(open(&plain, &s.cfg, &s.store).expect("plain").bundle, bundle);
    }

    #[test]
    fn hostile_export_files_are_refused_or_import_nothing() {
        let s = setup();
        let a = vec![7u8; 5000];
        let bundle = signed(&s, &[&a]);
        let name = format!("blobs/{}", sha(&a));
        // Other bytes under the blob's name: refused, not stored.
        let mut wrong = a.clone();
        wrong[0] = 8;
        let e = open(&write(&s, &tar(&[("bundle", &bundle), (&name, &wrong)])), &s.cfg, &s.store)
            .expect_err("wrong");
        assert!(matches!(e, ExportError::Import(ImportError::Mismatch { .. })), "{e}");
        assert!(!s.store.has_blob(&sha(&a), a.len() as u64));
        // An archive cut inside a blob: the file is damaged, and nothing is stored.
        let mut cut = tar(&[("bundle", &bundle), (&name, &a)]);
        cut.truncate(3 * BLOCK);
        let e = open(&write(&s, &cut), &s.cfg, &s.store).expect_err("truncated");
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!s.store.has_blob(&sha(&a), a.len() as u64));
        // A damaged header, a first entry that is not the bundle.
        let mut damaged = tar(&[("bundle", &bundle), (&name, &a)]);
        damaged[BLOCK + bundle.len().div_ceil(BLOCK) * BLOCK + 3] ^= 0x20;
        let e = open(&write(&s, &damaged), &s.cfg, &s.store).expect_err("damaged");
        assert!(e.to_string().contains("checksum"), "{e}");
        let e =
            open(&write(&s, &tar(&[(&name, &a), ("bundle", &bundle)])), &s.cfg, &s.store).expect_err("order");
        assert!(e.to_string().contains("first entry"), "{e}");
        // A bundle signed by another key imports nothing (the apply says why).
        let other = Setup { key: SigningKey::from_seed(&[5; 32]), ..setup() };
        let forged = signed(&other, &[&a]);
        let opened =
            open(&write(&s, &tar(&[("bundle", &forged), (&name, &a)])), &s.cfg, &s.store).expect("opens");
        assert_eq!(opened.imported, 0);
        assert!(!s.store.has_blob(&sha(&a), a.len() as u64));
    }
}
