//! Amazon SNS for tests: a locally generated RSA key with a self-signed certificate (made
//! once per process), the documented string to sign, envelope signing (signature version 1
//! or 2), and an [`HttpsGet`] seam that serves the certificate at an allowlisted URL,
//! answers subscription confirmations and records every URL it is asked for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::webhooks::{BoxFuture, HttpsGet};

/// Where the seam serves the test certificate (allowlisted: https, `sns.us-east-1`).
pub const CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";
pub const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:MyTopic";
pub const SUBSCRIBE_URL: &str = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:MyTopic&Token=2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82efd087cc3b7849e05798d2d2785c03b0879594eeac82c01f235d0e717736";

/// The signing key and its self-signed certificate (PEM).
pub struct TestCert {
    pub key: rsa::PrivateKey,
    pub pem: Vec<u8>,
}

/// The test certificate, generated on first use.
pub fn certificate() -> &'static TestCert {
    static CERT: OnceLock<TestCert> = OnceLock::new();
    CERT.get_or_init(generate)
}

/// A second key, whose signatures the test certificate must not accept.
pub fn other_key() -> &'static rsa::PrivateKey {
    static KEY: OnceLock<rsa::PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key"))
}

fn generate() -> TestCert {
    use std::str::FromStr;
    use x509_cert::builder::profile::BuilderProfile;
    use x509_cert::builder::{Builder, CertificateBuilder};
    use x509_cert::der::EncodePem;
    use x509_cert::name::Name;
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::SubjectPublicKeyInfo;
    use x509_cert::time::Validity;

    /// Self-signed, no extensions: all SNS verification reads is the key and validity.
    struct SelfSigned(Name);
    impl BuilderProfile for SelfSigned {
        fn get_issuer(&self, subject: &Name) -> Name {
            subject.clone()
        }
        fn get_subject(&self) -> Name {
            self.0.clone()
        }
        fn build_extensions(
            &self,
            _spk: x509_cert::spki::SubjectPublicKeyInfoRef<'_>,
            _issuer_spk: x509_cert::spki::SubjectPublicKeyInfoRef<'_>,
            _tbs: &x509_cert::TbsCertificate,
        ) -> x509_cert::builder::Result<Vec<x509_cert::ext::Extension>> {
            Ok(Vec::new())
        }
    }

    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key generation");
    let spki = SubjectPublicKeyInfo::from_key(&key.to_public_key()).expect("SPKI");
    let profile = SelfSigned(Name::from_str("CN=sns.amazonaws.com").expect("name"));
    // Valid from an hour ago (tests may take their "now" before the key exists) for a day.
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    let validity = Validity::new(
        x509_cert::time::Time::try_from(now - hour).expect("time"),
        x509_cert::time::Time::try_from(now + 24 * hour).expect("time"),
    );
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key.clone());
    let cert = CertificateBuilder::new(profile, SerialNumber::from(42u32), validity, spki)
        .expect("builder")
        .build::<_, rsa::pkcs1v15::Signature>(&signer)
        .expect("self-signed certificate");
    let pem = cert
        .to_pem(x509_cert::der::pem::LineEnding::LF)
        .expect("PEM");
    TestCert {
        key,
        pem: pem.into_bytes(),
    }
}

/// An SNS `Timestamp` (milliseconds, `Z`).
pub fn sns_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The string to sign, built independently of the provider: every signable key present,
/// in the documented (alphabetical) order, name and value each followed by a newline.
pub fn string_to_sign(env: &Map<String, Value>) -> String {
    let mut s = String::new();
    for k in [
        "Message",
        "MessageId",
        "Subject",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ] {
        if let Some(v) = env.get(k).and_then(Value::as_str) {
            s.push_str(&format!("{k}\n{v}\n"));
        }
    }
    s
}

/// Signs the envelope with `key`, SHA1withRSA for `SignatureVersion` 1, else SHA256withRSA.
pub fn sign_with(env: &mut Map<String, Value>, key: &rsa::PrivateKey) {
    let text = string_to_sign(env);
    let sig = match env.get("SignatureVersion").and_then(Value::as_str) {
        Some("1") => key.pkcs1v15_sign::<sha1::Sha1>(text.as_bytes()),
        _ => key.pkcs1v15_sign::<sha2::Sha256>(text.as_bytes()),
    }
    .expect("signature");
    env.insert(
        "Signature".into(),
        Value::from(base64::engine::general_purpose::STANDARD.encode(sig)),
    );
}

/// Signs with the test certificate's key.
pub fn sign(env: &mut Map<String, Value>) {
    sign_with(env, &certificate().key);
}

/// An SNS notification carrying `message` at `at`, as SNS posts it (not yet signed).
pub fn notification(
    message: &str,
    sns_id: &str,
    version: &str,
    at: DateTime<Utc>,
) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in [
        ("Type", "Notification"),
        ("MessageId", sns_id),
        ("TopicArn", TOPIC),
        ("Subject", "Amazon SES Email Event Notification"),
        ("Message", message),
        ("Timestamp", &sns_time(at)),
        ("SignatureVersion", version),
        ("SigningCertURL", CERT_URL),
        (
            "UnsubscribeURL",
            "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-1:123456789012:MyTopic:c9135db0-26c4-47ec-8998-413945fb5a96",
        ),
    ] {
        m.insert(k.to_owned(), Value::from(v));
    }
    m
}

/// The outbound HTTPS seam: serves [`certificate`] (or what it was told to) at
/// [`CERT_URL`], answers confirmation URLs of the test region, refuses anything else, and
/// records every URL asked for; `down` makes every request fail.
pub struct Seam {
    calls: Mutex<Vec<String>>,
    cert: Result<Vec<u8>, String>,
    pub down: AtomicBool,
}

impl Seam {
    pub fn new() -> Arc<Seam> {
        Seam::serving(Ok(certificate().pem.clone()))
    }

    /// A seam answering `cert` at [`CERT_URL`] (a bad certificate, or an error).
    pub fn serving(cert: Result<Vec<u8>, String>) -> Arc<Seam> {
        Arc::new(Seam {
            calls: Mutex::new(Vec::new()),
            cert,
            down: AtomicBool::new(false),
        })
    }

    /// The URLs asked for so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl HttpsGet for Seam {
    fn get<'a>(&'a self, url: &'a url::Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(url.to_string());
        let answer = if self.down.load(Ordering::SeqCst) {
            Err("connection refused".to_string())
        } else if url.as_str() == CERT_URL {
            self.cert.clone()
        } else if url
            .as_str()
            .starts_with("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription")
        {
            Ok(b"<ConfirmSubscriptionResponse/>".to_vec())
        } else {
            Err(format!("unexpected URL {url}"))
        };
        Box::pin(async move { answer })
    }
}
