//! A throwaway PKI made with the `openssl` CLI for TLS tests: a CA, a server certificate
//! for `127.0.0.1` (IP SAN) and a client certificate, each v3 (webpki refuses v1), EC
//! P-256. Never trusted anywhere but the test that made it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

use crate::require_program;

pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// A CA, `server.pem`/`server-key.pem` for 127.0.0.1, and a client certificate
    /// `client.pem`/`client-key.pem` with CN `client_cn`, both signed by the CA.
    pub fn new(client_cn: &str) -> Result<TestPki> {
        let openssl = require_program("openssl").context("TLS tests make their certificates with openssl")?;
        let dir = tempfile::tempdir()?;
        let run = |args: &[&str]| -> Result<()> {
            let out = Command::new(&openssl).args(args).current_dir(dir.path()).output()?;
            ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=fleet e2e CA"],
        ]
        .concat())?;
        for (name, subject, ext) in [
            (
                "server",
                "/CN=127.0.0.1",
                "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
            ),
            (
                "client",
                &format!("/CN={client_cn}"),
                "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            let (key, csr, cert, extfile) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            std::fs::write(dir.path().join(&extfile), ext)?;
            run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", subject]].concat())?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ])?;
        }
        Ok(TestPki { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`, `client-key.pem`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
