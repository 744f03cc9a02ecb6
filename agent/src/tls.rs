//! rustls client configurations (ring provider, no aws-lc), for MQTT and HTTPS.
//!
//! Trust roots come from a PEM CA file when configured, else from the system's store
//! (rustls-native-certs). A client certificate and key (PEM) enable mutual TLS. This
//! module reads those files and nothing else.
//!
//! `fleet-agent check-config` (through [`crate::config`]) loads the files with the same
//! functions as [`client_config`] ([`load_roots`], [`load_certs`], [`load_key`],
//! [`check_client_auth`]), so a file `run` could not use is refused before `run`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("no trusted CA certificate: set a ca_file (the system store had none)")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.into(), reason: reason.to_string() }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The trust roots of a PEM CA file: every certificate must parse as a trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1), which the ring
/// provider must be able to sign with.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))?;
    provider().key_provider.load_private_key(key.clone_key()).map_err(|e| file_err(path, e))?;
    Ok(key)
}

/// Whether `key` goes with the first certificate of `chain` (which must parse), as
/// `with_client_auth_cert` checks when `run` builds its config.
pub fn check_client_auth(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    builder(RootCertStore::empty())?.with_client_auth_cert(chain, key)?;
    Ok(())
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn builder(
    roots: RootCertStore,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    Ok(ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots))
}

/// A client config with the given roots and optional client certificate.
pub fn client_config(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca_file {
        Some(path) => load_roots(path)?,
        None => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(TlsError::NoRoots);
            }
            roots
        }
    };
    let builder = builder(roots)?;
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
