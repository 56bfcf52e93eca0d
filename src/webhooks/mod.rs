//! ESP webhooks, from bytes to records. Each provider is one module implementing
//! [`Provider`]: `verify` authenticates the raw request (nothing in the body is trusted
//! before it returns `Ok`), `parse` turns it into records: events mapped to SPEC.md's types,
//! and dead letters for what cannot be correlated or mapped. Adding a provider is one file
//! plus one line in [`Registry::from_config`].
//!
//! This layer builds no HTTP responses: refusals are [`WebhookError`]s, which the HTTP
//! layer (`http::webhook`, `http::reject`) turns into statuses. It sits beside `pipeline`
//! and `db` and imports neither.

mod error;
pub mod mailgun;
pub mod mandrill;
pub mod postmark;
pub mod resend;
pub mod sendgrid;
pub mod ses;
pub mod sparkpost;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hyper::header::HeaderMap;
use hyper::{Method, Uri};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::WebhookConfig;
use crate::event::{DeadLetter, Event, EventType, Record, Source};
use crate::machine::MachineDetector;

pub use error::{AuthFailure, WebhookError};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An ESP's request as received: headers and the exact body bytes the signature covers.
pub struct WebhookRequest<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub received_at: DateTime<Utc>,
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

// ---- helpers shared by the providers ----

/// The message and claimed tenant of an ESP event, from the values the sending application
/// attached. `Err(reason)` is a dead-letter reason.
pub fn correlate(
    message_id: Option<&str>,
    organization_id: Option<&str>,
) -> Result<(Uuid, Option<Uuid>), &'static str> {
    let raw = message_id
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or("no_message_id")?;
    let message = Uuid::parse_str(raw).map_err(|_| "invalid_message_id")?;
    let org = match organization_id.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(o) => Some(Uuid::parse_str(o).map_err(|_| "invalid_organization_id")?),
    };
    Ok((message, org))
}

/// `X-Reachly-Message-Id` from a list of echoed headers (name, value), case-insensitively.
pub fn header_message_id<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<&'a str> {
    headers
        .into_iter()
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-reachly-message-id"))
        .map(|(_, v)| v.trim())
}

/// Dedup key from the provider's own stable event id.
pub fn id_key(source: Source, id: &str) -> String {
    format!("{}:id:{}", source.label(), id.trim())
}

/// Dedup key from a hash of the event's content (provider, message, type, time, URL ...).
pub fn content_key(source: Source, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}:h:{hex}", source.label())
}

/// A new ESP event with its dedup key and claimed tenant.
pub fn esp_event(
    source: Source,
    message_id: Uuid,
    organization_id: Option<Uuid>,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    dedup_key: String,
) -> Event {
    let mut e = Event::new(message_id, event_type, occurred_at, source);
    e.claimed_organization_id = organization_id;
    e.dedup_key = Some(dedup_key);
    e
}

/// A dead letter of one ESP event (its raw JSON), keyed so a re-delivery adds no second one.
pub fn dead_letter(
    source: Source,
    reason: &str,
    raw: &str,
    dedup_key: Option<String>,
    event_type: Option<&str>,
) -> Record {
    let mut d = DeadLetter::new(source.label(), reason, raw);
    d.dedup_key = dedup_key.or_else(|| Some(content_key(source, &["dead_letter", raw])));
    d.event_type = event_type.map(str::to_owned);
    Record::DeadLetter(d)
}

/// Seconds (possibly fractional) since the epoch.
pub fn unix_time(secs: f64) -> Option<DateTime<Utc>> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    let whole = secs.trunc() as i64;
    let nanos = ((secs - secs.trunc()) * 1e9).round().min(999_999_999.0) as u32;
    DateTime::from_timestamp(whole, nanos)
}

/// RFC 3339 / ISO 8601 with offset.
pub fn rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.to_utc())
}

/// Constant-time equality of secrets.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// HTTP basic auth against `USER:PASSWORD`, in constant time.
pub fn basic_auth_ok(headers: &HeaderMap, expected: &str) -> bool {
    use base64::Engine as _;
    let Some(v) = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return false;
    };
    match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
        Ok(given) => secrets_equal(&given, expected.as_bytes()),
        Err(_) => false,
    }
}

/// The body of a JSON webhook: a JSON content type (or none), then valid JSON; else the
/// matching 415 or 400.
pub fn json_body(req: &WebhookRequest<'_>) -> Result<serde_json::Value, WebhookError> {
    require_json(req)?;
    serde_json::from_slice(req.body)
        .map_err(|e| WebhookError::BadRequest(format!("body is not JSON: {e}")))
}

/// Requires a JSON-ish content type (absent is tolerated: some ESPs omit it).
pub fn require_json(req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
    match req.header("content-type") {
        None => Ok(()),
        Some(ct) if ct.to_ascii_lowercase().contains("json") => Ok(()),
        Some(ct) => Err(WebhookError::UnsupportedMediaType(format!(
            "expected application/json, got {ct}"
        ))),
    }
}

/// A non-empty string field of a JSON object, trimmed.
pub fn json_str<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// An ESP's event time: seconds since the epoch (a JSON number or a numeric string, as
/// SendGrid, Mailgun and SparkPost send it) or RFC 3339 text (Postmark, SparkPost samples).
pub fn json_time(v: &serde_json::Value) -> Option<DateTime<Utc>> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().and_then(unix_time),
        serde_json::Value::String(s) => {
            let s = s.trim();
            match s.parse::<f64>() {
                Ok(secs) => unix_time(secs),
                Err(_) => rfc3339(s),
            }
        }
        _ => None,
    }
}

/// Copies scalar fields of an ESP event into `metadata` (`(field, our name)` pairs), text made
/// storable: bounded and NUL-free, since one NUL in a JSONB value fails the whole COPY.
pub fn keep_fields(
    metadata: &mut serde_json::Map<String, serde_json::Value>,
    event: Option<&serde_json::Value>,
    fields: &[(&str, &str)],
) {
    use serde_json::Value;
    let Some(event) = event else { return };
    for (from, to) in fields {
        match event.get(*from) {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                let text = crate::event::pg_text(s.trim(), crate::event::MAX_TEXT_BYTES);
                metadata.insert((*to).to_owned(), Value::String(text));
            }
            Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                metadata.insert((*to).to_owned(), v.clone());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_requires_a_uuid_message_id() {
        let m = "0190a6f0-0000-7000-8000-000000000002";
        assert_eq!(correlate(Some(m), None).unwrap().0.to_string(), m);
        assert_eq!(correlate(None, None), Err("no_message_id"));
        assert_eq!(correlate(Some("x"), None), Err("invalid_message_id"));
        assert_eq!(
            correlate(Some(m), Some("y")),
            Err("invalid_organization_id")
        );
    }

    #[test]
    fn content_keys_are_stable_and_unambiguous() {
        assert_eq!(
            content_key(Source::Sendgrid, &["a", "b"]),
            content_key(Source::Sendgrid, &["a", "b"])
        );
        assert_ne!(
            content_key(Source::Sendgrid, &["ab", ""]),
            content_key(Source::Sendgrid, &["a", "b"])
        );
        assert!(content_key(Source::Mailgun, &["x"]).starts_with("mailgun:h:"));
    }

    #[test]
    fn basic_auth_is_checked() {
        use base64::Engine as _;
        let mut h = HeaderMap::new();
        let good = base64::engine::general_purpose::STANDARD.encode("u:p");
        h.insert("authorization", format!("Basic {good}").parse().unwrap());
        assert!(basic_auth_ok(&h, "u:p"));
        assert!(!basic_auth_ok(&h, "u:q"));
        assert!(!basic_auth_ok(&HeaderMap::new(), "u:p"));
    }

    #[test]
    fn esp_times_and_kept_fields_are_read_leniently_and_stored_safely() {
        use serde_json::json;
        let at = json_time(&json!(1_700_000_000)).unwrap();
        assert_eq!(at.timestamp(), 1_700_000_000);
        assert_eq!(json_time(&json!("1700000000")), Some(at));
        assert_eq!(json_time(&json!("2023-11-14T22:13:20Z")), Some(at));
        assert_eq!(json_time(&json!("2023-11-14T22:13:20.000+00:00")), Some(at));
        for bad in [
            json!("soon"),
            json!(null),
            json!(-1),
            json!("NaN"),
            json!({}),
        ] {
            assert_eq!(json_time(&bad), None, "{bad}");
        }
        let mut meta = serde_json::Map::new();
        let ev = json!({"a": " x\u{0}y ", "n": 5, "b": true, "o": {"k": 1}, "e": ""});
        keep_fields(
            &mut meta,
            Some(&ev),
            &[("a", "A"), ("n", "N"), ("b", "B"), ("o", "O"), ("e", "E")],
        );
        assert_eq!(meta["A"], "x\u{FFFD}y");
        assert_eq!(meta["N"], 5);
        assert_eq!(meta["B"], true);
        assert!(!meta.contains_key("O") && !meta.contains_key("E"));
        assert_eq!(json_str(&ev, "e"), None);
    }

    #[test]
    fn unix_times_with_fractions_parse() {
        let t = unix_time(1_700_000_000.5).unwrap();
        assert_eq!(t.timestamp(), 1_700_000_000);
        assert_eq!(t.timestamp_subsec_millis(), 500);
        assert!(unix_time(f64::NAN).is_none());
    }
}
