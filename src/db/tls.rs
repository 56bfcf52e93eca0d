//! TLS to PostgreSQL, with libpq's rules. Every connection goes through a rustls
//! connector and `sslmode` in `DATABASE_URL` decides whether TLS is used: `disable` never,
//! `prefer` (the default) when the server offers it, `require` always. Whether the server's
//! certificate is verified follows libpq too: only when root certificates are given, here
//! with `REACHLY_DB_CA_FILE` (PEM). Then the chain and the host name are checked (libpq's
//! `verify-full`); point it at a private CA, or at the system bundle
//! (`/etc/ssl/certs/ca-certificates.crt`) for a managed database such as Azure's.
//! Without it the connection is encrypted but the server unauthenticated, exactly as libpq's
//! `prefer`/`require` without `sslrootcert`; a stock Debian server with its self-signed
//! "snakeoil" certificate is reachable that way.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

pub type Tls = MakeRustlsConnect;

/// A connector verifying against the CAs of `ca_file` when given; encrypting without
/// authenticating the server otherwise (libpq's behaviour without `sslrootcert`).
pub fn connector(ca_file: Option<&Path>) -> anyhow::Result<Tls> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let config = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading REACHLY_DB_CA_FILE {}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert
                    .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
                // A system bundle holds a few certificates rustls cannot use; skip those.
                let _ = roots.add(cert);
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "{} holds no usable CA certificate",
                path.display()
            );
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The connector of tools, tests and `dev` (no CA file), built once.
pub fn default_connector() -> Tls {
    static DEFAULT: OnceLock<Tls> = OnceLock::new();
    DEFAULT
        .get_or_init(|| connector(None).expect("a TLS connector without roots always builds"))
        .clone()
}

/// Accepts any server certificate but still checks the handshake signatures, so the
/// session is encrypted with the key of whoever presented the certificate: libpq's
/// `sslmode=require` without a root certificate.
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
