//! TLS to PostgreSQL. Every connection goes through a rustls connector, and `sslmode` in
//! `DATABASE_URL` decides: `disable` never encrypts; `prefer` (tokio-postgres' default)
//! encrypts when the server offers it; `require` insists. Whenever TLS is used the server's
//! certificate is verified against the system's CA store plus `REACHLY_DB_CA_FILE` (PEM):
//! stricter than libpq's `require`, which does not verify, and what managed databases such
//! as Azure Database for PostgreSQL (TLS on by default, DigiCert roots) need.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio_postgres_rustls::MakeRustlsConnect;

pub type Tls = MakeRustlsConnect;

/// A connector trusting the system CAs and, if given, the CAs of a PEM file.
pub fn connector(ca_file: Option<&Path>) -> anyhow::Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading REACHLY_DB_CA_FILE {}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(
                    cert.with_context(|| {
                        format!("{} is not a PEM certificate file", path.display())
                    })?,
                )
                .context("adding a CA certificate")?;
            added += 1;
        }
        anyhow::ensure!(added > 0, "{} holds no certificate", path.display());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The system-CA connector, built once (tools, tests, `dev`).
pub fn default_connector() -> Tls {
    static DEFAULT: OnceLock<Tls> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            connector(None).expect("a TLS connector with the system store always builds")
        })
        .clone()
}
