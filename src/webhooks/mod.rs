//! ESP webhooks, from bytes to records. Each provider is one folder implementing
//! [`Provider`] and doing two things only: `verify` authenticates the raw request (nothing in
//! the body is trusted before it returns `Ok`; a refusal says why as an [`AuthFailure`]),
//! and `parse` extracts typed [`records::Facts`] from each ESP event (its name and SPEC type,
//! dedup key material, the echoed Reachly ids, time, engagement data, error text, fields
//! worth keeping). One shared path, [`records`], turns facts into records: correlation, dead
//! letters with one vocabulary ([`records::DeadReason`]), the arrival-time fallback, the
//! machine-traffic verdict, and bounded, NUL-free text. [`extract`] reads JSON fields and
//! times the same way for every ESP; [`auth`] holds the shared-secret checks.
//!
//! ```text
//! webhooks/
//!   mod.rs       Provider, WebhookRequest, HttpsGet, Registry
//!   error.rs     WebhookError, AuthFailure (reason() is a log field)
//!   records.rs   Facts -> Record
//!   extract.rs   JSON body, fields, times, echoed headers
//!   auth.rs      constant-time secrets, basic auth
//!   <esp>/       mod.rs (verify + extract), tests.rs; ses/ also sns.rs and mapping.rs
//!   testkit/     signers, SNS certificate and seam, fixtures (tests and feature "testkit")
//! ```
//!
//! Adding a provider is one folder plus one line in [`Registry::from_config`]. This layer
//! builds no HTTP responses: refusals are [`WebhookError`]s, which the HTTP layer
//! (`http::webhook`, `http::reject`) turns into statuses. It sits beside `pipeline` and `db`
//! and imports neither.

pub mod auth;
mod error;
pub mod extract;
pub mod mailgun;
pub mod mandrill;
pub mod postmark;
pub mod records;
pub mod replay;
pub mod resend;
pub mod sendgrid;
pub mod ses;
pub mod sparkpost;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hyper::header::HeaderMap;
use hyper::{Method, Uri};

use crate::config::WebhookConfig;
use crate::event::{Record, Source};
use crate::machine::MachineDetector;

pub use error::{AuthFailure, WebhookError};
pub use replay::{MemoryReplayStore, ReplayStore};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An ESP's request as received: headers and the exact body bytes the signature covers.
pub struct WebhookRequest<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub received_at: DateTime<Utc>,
    /// Signature tokens seen by every instance (Mailgun's replay protection).
    pub replay: &'a dyn ReplayStore,
}

impl WebhookRequest<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What parsers share.
pub struct ParseContext<'a> {
    pub machine: &'a MachineDetector,
}

/// One ESP's webhook.
pub trait Provider: Send + Sync {
    fn source(&self) -> Source;

    /// The largest body this ESP really sends (one event, or its largest batch), with
    /// headroom: the HTTP layer reads at most this much (and never more than
    /// `REACHLY_WEBHOOK_MAX_BYTES`) before anything is checked. Each provider's doc says why.
    fn max_body_bytes(&self) -> usize;

    /// Authenticates the request. Must compare secrets in constant time.
    fn verify<'a>(&'a self, req: &'a WebhookRequest<'a>)
    -> BoxFuture<'a, Result<(), WebhookError>>;

    /// Side effects after authentication (SNS subscription confirmation). Default: none.
    fn after_verify<'a>(
        &'a self,
        _req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        Box::pin(async { Ok(()) })
    }

    /// Maps the authenticated request to records. Unknown event types and uncorrelatable
    /// events become dead letters, not errors; only an unparseable body is an error.
    fn parse(
        &self,
        req: &WebhookRequest<'_>,
        ctx: &ParseContext<'_>,
    ) -> Result<Vec<Record>, WebhookError>;
}

/// Outbound HTTPS GET (SNS signing certificates, subscription confirmation). A seam for
/// tests: the allowlist checks happen *before* this is called, in the provider, so a test
/// implementation cannot widen what production would fetch.
pub trait HttpsGet: Send + Sync {
    fn get<'a>(&'a self, url: &'a url::Url) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// Production outbound HTTPS: https only, no redirects followed (a redirect could leave the
/// allowlisted host), short timeouts, bounded response size.
struct ReqwestGet(reqwest::Client);

/// Largest response read (an SNS certificate is ~2 KiB).
const MAX_HTTPS_RESPONSE_BYTES: usize = 256 * 1024;

impl HttpsGet for ReqwestGet {
    fn get<'a>(&'a self, url: &'a url::Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            if url.scheme() != "https" {
                return Err(format!("refusing non-https URL {url}"));
            }
            let mut resp = self
                .0
                .get(url.as_str())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("{url} answered {}", resp.status()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_HTTPS_RESPONSE_BYTES {
                    return Err(format!(
                        "{url} answered more than {MAX_HTTPS_RESPONSE_BYTES} bytes"
                    ));
                }
            }
            Ok(body)
        })
    }
}

/// The production [`HttpsGet`].
pub fn default_https_get() -> anyhow::Result<Arc<dyn HttpsGet>> {
    let client = reqwest::Client::builder()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    Ok(Arc::new(ReqwestGet(client)))
}

/// The configured providers; a provider without a secret is absent (404).
#[derive(Default, Clone)]
pub struct Registry {
    providers: HashMap<&'static str, Arc<dyn Provider>>,
}

impl Registry {
    /// Builds every provider whose secret is configured. The error is one config line.
    pub fn from_config(cfg: &WebhookConfig, https: Arc<dyn HttpsGet>) -> Result<Registry, String> {
        type Constructor =
            fn(&WebhookConfig, &Arc<dyn HttpsGet>) -> Result<Option<Arc<dyn Provider>>, String>;
        let all: [(&'static str, Constructor); 7] = [
            ("sendgrid", sendgrid::from_config),
            ("mailgun", mailgun::from_config),
            ("ses", ses::from_config),
            ("postmark", postmark::from_config),
            ("sparkpost", sparkpost::from_config),
            ("mandrill", mandrill::from_config),
            ("resend", resend::from_config),
        ];
        let mut r = Registry::default();
        for (name, make) in all {
            if let Some(p) = make(cfg, &https)? {
                r.providers.insert(name, p);
            }
        }
        Ok(r)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.providers.keys().copied().collect();
        v.sort_unstable();
        v
    }
}
