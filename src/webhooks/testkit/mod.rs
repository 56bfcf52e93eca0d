//! The webhook test kit, one copy for the unit tests beside each provider and for the API
//! tests (`tests/api/webhooks_*.rs`): signers for every provider's scheme ([`sign`]), the
//! self-signed SNS certificate and its outbound HTTPS seam ([`sns`]), an owned webhook
//! request, the documented fixtures under `tests/fixtures/`, and running a provider the way
//! the HTTP handler does (verify, after_verify, parse) without a server or a database.
//!
//! It is compiled for this crate's tests (`cfg(test)`) and, through the `testkit` feature
//! that the crate's self dev-dependency turns on, for the API test crate, which links the
//! library as any client would. A `#[path]` include would compile it twice, once as a module
//! of each crate, with `crate::` meaning different things in each; the feature keeps one
//! module with one set of paths, and production builds never see it.

pub mod sign;
pub mod sns;

use chrono::{DateTime, Utc};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Uri};

use super::{ParseContext, Provider, WebhookError, WebhookRequest};
use crate::event::{DeadLetter, Event, Record};
use crate::machine::MachineDetector;

/// A request as the handler would see it, owning its parts.
pub struct TestRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub received_at: DateTime<Utc>,
    /// The replay store the provider sees: a fresh one per request unless shared.
    pub replay: std::sync::Arc<super::MemoryReplayStore>,
}

impl TestRequest {
    /// `POST /webhooks/{provider}` with a JSON content type, received now.
    pub fn post(provider: &str, body: impl Into<Vec<u8>>) -> TestRequest {
        let uri: Uri = format!("/webhooks/{provider}")
            .parse()
            .expect("a valid test path");
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        TestRequest {
            method: Method::POST,
            uri,
            headers,
            body: body.into(),
            received_at: Utc::now(),
            replay: Default::default(),
        }
    }

    /// Sets (replaces) a header.
    pub fn header(mut self, name: &str, value: &str) -> TestRequest {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a valid test header name");
        let value = HeaderValue::from_str(value).expect("a valid test header value");
        self.headers.insert(name, value);
        self
    }

    /// Removes a header.
    pub fn without(mut self, name: &str) -> TestRequest {
        self.headers.remove(name);
        self
    }

    /// Shares `store` with other requests (as the instances of a deployment share one).
    pub fn with_replay(mut self, store: &std::sync::Arc<super::MemoryReplayStore>) -> TestRequest {
        self.replay = std::sync::Arc::clone(store);
        self
    }

    pub fn at(mut self, received_at: DateTime<Utc>) -> TestRequest {
        self.received_at = received_at;
        self
    }

    pub fn request(&self) -> WebhookRequest<'_> {
        WebhookRequest {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            body: &self.body,
            received_at: self.received_at,
            replay: &*self.replay,
        }
    }
}

/// What `handle` does before `submit_durable`: verify, after_verify, parse.
pub async fn run(provider: &dyn Provider, req: &TestRequest) -> Result<Vec<Record>, WebhookError> {
    let r = req.request();
    provider.verify(&r).await?;
    provider.after_verify(&r).await?;
    let machine = MachineDetector::default();
    provider.parse(&r, &ParseContext { machine: &machine })
}

/// A fixture file's exact bytes (`tests/fixtures/{path}`).
pub fn fixture(path: &str) -> Vec<u8> {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&full).unwrap_or_else(|e| panic!("fixture {full}: {e}"))
}

pub fn events(records: &[Record]) -> Vec<&Event> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Event(e) => Some(e),
            Record::DeadLetter(_) => None,
        })
        .collect()
}

pub fn dead_letters(records: &[Record]) -> Vec<&DeadLetter> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::DeadLetter(d) => Some(d),
            Record::Event(_) => None,
        })
        .collect()
}

/// The fixtures' organization and messages (see `tests/fixtures/README.md`).
pub const ORG: &str = "0190a6f0-0000-7000-8000-00000000a000";
pub const M_ENGAGED: &str = "0190a6f0-0000-7000-8000-00000000a001";
pub const M_HARD: &str = "0190a6f0-0000-7000-8000-00000000a002";
pub const M_SOFT: &str = "0190a6f0-0000-7000-8000-00000000a003";
pub const M_COMPLAINT: &str = "0190a6f0-0000-7000-8000-00000000a004";
pub const M_UNSUB: &str = "0190a6f0-0000-7000-8000-00000000a005";
pub const M_DROPPED: &str = "0190a6f0-0000-7000-8000-00000000a006";

/// RFC 3339 to a time, for expectations.
pub fn t(s: &str) -> DateTime<Utc> {
    super::extract::rfc3339(s).unwrap_or_else(|| panic!("bad test time {s}"))
}

/// An empty [`crate::config::WebhookConfig`] (every provider unconfigured).
pub fn no_secrets() -> crate::config::WebhookConfig {
    crate::config::WebhookConfig {
        webhook_max_bytes: 10 << 20,
        sendgrid_public_key: None,
        mailgun_signing_key: None,
        mailgun_basic_auth: None,
        ses_topic_arns: Vec::new(),
        postmark_basic_auth: None,
        sparkpost_basic_auth: None,
        sparkpost_token: None,
        sparkpost_initial_open: false,
        mandrill_webhook_key: None,
        mandrill_webhook_url: None,
        resend_webhook_secret: None,
    }
}

/// A [`super::HttpsGet`] that never reaches the network.
pub fn no_network() -> std::sync::Arc<dyn super::HttpsGet> {
    struct NoNetwork;
    impl super::HttpsGet for NoNetwork {
        fn get<'a>(&'a self, _url: &'a url::Url) -> super::BoxFuture<'a, Result<Vec<u8>, String>> {
            Box::pin(async { Err("no network in tests".to_string()) })
        }
    }
    std::sync::Arc::new(NoNetwork)
}
