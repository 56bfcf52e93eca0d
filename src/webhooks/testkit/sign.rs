//! Signers for every provider's scheme, written independently of the verifiers (from the
//! providers' documentation), so a test that signs with these and passes through `verify`
//! proves the verifier reads the scheme as the ESP writes it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::Generate as _;
use p256::pkcs8::EncodePublicKey as _;

/// `Authorization: Basic ...` for `USER:PASSWORD` (Postmark, SparkPost).
pub fn basic(credentials: &str) -> String {
    format!("Basic {}", STANDARD.encode(credentials))
}

/// SendGrid: a fresh P-256 key pair, the signing key and the public key as SendGrid shows
/// it (base64 of the DER SubjectPublicKeyInfo).
pub fn sendgrid_keypair() -> (SigningKey, String) {
    let sk = SigningKey::generate();
    let der = sk
        .verifying_key()
        .to_public_key_der()
        .expect("DER encoding of a P-256 key");
    (sk, STANDARD.encode(der.as_bytes()))
}

/// SendGrid: base64 DER ECDSA signature over the timestamp header's bytes then the body.
pub fn sendgrid_signature(sk: &SigningKey, timestamp: &str, body: &[u8]) -> String {
    let mut msg = timestamp.as_bytes().to_vec();
    msg.extend_from_slice(body);
    let sig: Signature = sk.sign(&msg);
    STANDARD.encode(sig.to_der().as_bytes())
}

/// Mailgun: hex HMAC-SHA256 of `timestamp + token` with the signing key.
pub fn mailgun_signature(key: &str, timestamp: &str, token: &str) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Mandrill: base64 HMAC-SHA1 of the configured URL then each POST variable's key and
/// value, sorted by key.
pub fn mandrill_signature(key: &str, url: &str, params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// An `application/x-www-form-urlencoded` body (Mandrill posts one).
pub fn form(params: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

/// Svix (Resend): a fresh random `whsec_` secret and its key bytes.
pub fn svix_secret() -> (String, Vec<u8>) {
    // 32 random bytes (UUIDv4 draws from the OS RNG).
    let key: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|u| u.as_bytes().to_vec())
        .collect();
    (format!("whsec_{}", STANDARD.encode(&key)), key)
}

/// Svix (Resend): the `svix-signature` entry `v1,<base64 HMAC-SHA256 of id.ts.body>`.
pub fn svix_signature(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
        .expect("HMAC takes any key length");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}
