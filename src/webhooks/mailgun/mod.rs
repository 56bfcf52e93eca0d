//! Mailgun HTTP webhooks, `POST /webhooks/mailgun`. This module owns verifying Mailgun's
//! signature (HMAC-SHA256 with the webhook signing key over `timestamp + token`, hex, sent in
//! the JSON body as `signature.{timestamp, token, signature}`), refusing stale and replayed
//! signatures, and mapping the one event of each request (`event-data`) to SPEC.md's events.
//!
//! Sources:
//! - payloads: <https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhook-payloads>
//! - signature: <https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks>
//! - failure reasons (`old`, `suppress-*`): <https://documentation.mailgun.com/docs/mailgun/user-manual/tracking-messages/>
//!
//! | Mailgun `event` | SPEC type |
//! | --- | --- |
//! | `accepted` | sent |
//! | `delivered` | delivered |
//! | `opened` / `clicked` | opened / clicked (`url` → `link_url`; `client-info.bot` set → machine `mailgun_bot:<bot>`) |
//! | `complained` | complained |
//! | `unsubscribed` | unsubscribed |
//! | `failed`, `severity` = `temporary` | deferred (Mailgun keeps retrying; nothing bounced yet) |
//! | `failed`, permanent, `reason` = `suppress-bounce`/`-unsubscribe`/`-complaint` | dropped (never attempted: the address is on a Mailgun suppression list) |
//! | `failed`, permanent, `reason` = `old` or `delivery-status.bounce-type` = `soft` | bounced, soft (retries expired; the address itself was not refused) |
//! | `failed`, any other permanent failure | bounced, hard |
//! | `rejected` | dropped |
//! | anything else (`stored`, list events, ...) | dead letter `unknown_event_type` |
//!
//! Choices: a signature whose timestamp is more than [`TIMESTAMP_TOLERANCE_SECS`]
//! (15 minutes) from the arrival time either way is refused (401). Mailgun's signature
//! covers `timestamp + token` only, not the event, so each token is remembered (bounded, in
//! memory, per process) with a digest of the body it came with: the same token with the same
//! body is a re-delivery and is accepted idempotently (the event id keys it, so no second
//! row); the same token with another body is refused (401). Events are keyed on Mailgun's
//! `event-data.id` (the token when it is missing).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::extract::{header_message_id, json_body, json_str, json_time};
use super::records::{Engagement, Facts, Metadata, content_key, id_key};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::{Secret, WebhookConfig};
use crate::event::{BounceClass, EventType, Record, Source};

/// How far the signature's timestamp may be from the arrival time, either way.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 15 * 60;
/// Tokens remembered at most (about 100 bytes each).
pub const REPLAY_CACHE_CAPACITY: usize = 100_000;

/// Largest body read. One event per request; user variables are limited to 4 KB and a handful of headers is echoed.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

const SOURCE: Source = Source::Mailgun;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The Mailgun provider: the signing key and the tokens seen recently.
pub struct Mailgun {
    key: Secret,
    seen: Mutex<ReplayCache>,
}

/// The provider if its secret is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    let Some(key) = &cfg.mailgun_signing_key else {
        return Ok(None);
    };
    if key.expose().trim().is_empty() {
        return Err("REACHLY_MAILGUN_SIGNING_KEY must not be blank".into());
    }
    Ok(Some(Arc::new(Mailgun {
        key: key.clone(),
        seen: Mutex::new(ReplayCache::new(REPLAY_CACHE_CAPACITY)),
    })))
}

/// Recently seen signature tokens and the digest of the body each came with. Bounded: tokens
/// whose timestamp has left the window are forgotten first (they are refused as stale
/// anyway), then the oldest.
struct ReplayCache {
    by_token: HashMap<String, [u8; 32]>,
    order: VecDeque<(i64, String)>,
    capacity: usize,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            by_token: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn admit(
        &mut self,
        token: &str,
        signed_at: i64,
        body: [u8; 32],
        now: i64,
    ) -> Result<(), WebhookError> {
        while let Some((at, _)) = self.order.front() {
            if now - *at <= TIMESTAMP_TOLERANCE_SECS {
                break;
            }
            self.forget_oldest();
        }
        match self.by_token.get(token) {
            Some(digest) if *digest == body => Ok(()),
            Some(_) => Err(WebhookError::Unauthorized(AuthFailure::ReplayedToken)),
            None => {
                while self.order.len() >= self.capacity {
                    self.forget_oldest();
                }
                self.by_token.insert(token.to_owned(), body);
                self.order.push_back((signed_at, token.to_owned()));
                Ok(())
            }
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, old)) = self.order.pop_front() {
            self.by_token.remove(&old);
        }
    }
}

impl Mailgun {
    /// HMAC-SHA256(key, timestamp + token) against the hex `given`, in constant time.
    fn signature_ok(&self, timestamp: &str, token: &str, given_hex: &str) -> bool {
        let Ok(given) = hex::decode(given_hex.trim()) else {
            return false;
        };
        let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(self.key.expose().as_bytes())
        else {
            return false;
        };
        mac.update(timestamp.as_bytes());
        mac.update(token.as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let body = json_body(req)?;
        let sig = body
            .get("signature")
            .filter(|s| s.is_object())
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        // The exact values Mailgun signed (the timestamp may come as a string or a number).
        let timestamp = match sig.get("timestamp") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(WebhookError::Unauthorized(AuthFailure::MissingTimestamp)),
        };
        let token = sig
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        let signed_at: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadTimestamp))?;
        let now = req.received_at.timestamp();
        if (now - signed_at).abs() > TIMESTAMP_TOLERANCE_SECS {
            return Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp));
        }
        let signature = json_str(sig, "signature")
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        // A subaccount's events also carry `parent-signature`, made with the primary
        // account's key: either may match the configured key.
        let parent = json_str(sig, "parent-signature");
        let ok = self.signature_ok(&timestamp, token, signature)
            | parent.is_some_and(|p| self.signature_ok(&timestamp, token, p));
        if !ok {
            return Err(WebhookError::Unauthorized(AuthFailure::BadSignature));
        }
        let digest: [u8; 32] = Sha256::digest(req.body).into();
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| WebhookError::Unavailable("replay cache unavailable".into()))?;
        seen.admit(token, signed_at, digest, now)
    }
}

impl Provider for Mailgun {
    fn source(&self) -> Source {
        SOURCE
    }

    fn max_body_bytes(&self) -> usize {
        MAX_BODY_BYTES
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        Box::pin(async move { self.check(req) })
    }

    fn parse(
        &self,
        req: &WebhookRequest<'_>,
        ctx: &ParseContext<'_>,
    ) -> Result<Vec<Record>, WebhookError> {
        let body = json_body(req)?;
        let data = body
            .get("event-data")
            .filter(|d| d.is_object())
            .ok_or_else(|| WebhookError::BadRequest("no event-data object".into()))?;
        let token = body
            .get("signature")
            .and_then(|s| s.get("token"))
            .and_then(Value::as_str);
        Ok(vec![map_event(data, token, req.received_at, ctx)])
    }
}

/// Mailgun's event (with `severity`, `reason` and the bounce type of failures) to a SPEC type.
fn map_type(data: &Value) -> Option<(EventType, Option<BounceClass>)> {
    let kind = json_str(data, "event")?.to_ascii_lowercase();
    let t = match kind.as_str() {
        "accepted" => (EventType::Sent, None),
        "delivered" => (EventType::Delivered, None),
        "opened" => (EventType::Opened, None),
        "clicked" => (EventType::Clicked, None),
        "complained" => (EventType::Complained, None),
        "unsubscribed" => (EventType::Unsubscribed, None),
        "rejected" => (EventType::Dropped, None),
        "failed" => {
            let severity = json_str(data, "severity").map(str::to_ascii_lowercase);
            let reason = json_str(data, "reason").unwrap_or("").to_ascii_lowercase();
            let bounce_type = data
                .get("delivery-status")
                .and_then(|d| json_str(d, "bounce-type"))
                .map(str::to_ascii_lowercase);
            if severity.as_deref() == Some("temporary") {
                (EventType::Deferred, None)
            } else if reason.starts_with("suppress-") {
                (EventType::Dropped, None)
            } else if reason == "old" || bounce_type.as_deref() == Some("soft") {
                (EventType::Bounced, Some(BounceClass::Soft))
            } else {
                (EventType::Bounced, Some(BounceClass::Hard))
            }
        }
        _ => return None,
    };
    Some(t)
}

/// The failure text: "code message" from `delivery-status`, else the reject reason.
fn diagnostic(data: &Value) -> Option<String> {
    if let Some(ds) = data.get("delivery-status") {
        let text = json_str(ds, "message").or(json_str(ds, "description"));
        let code = ds.get("code").and_then(|c| match c {
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            _ => None,
        });
        match (code, text) {
            (Some(c), Some(t)) => return Some(format!("{c} {t}")),
            (None, Some(t)) => return Some(t.to_owned()),
            (Some(c), None) => return Some(format!("SMTP {c}")),
            (None, None) => {}
        }
    }
    data.get("reject")
        .and_then(|r| json_str(r, "reason").or(json_str(r, "description")))
        .or(json_str(data, "reason"))
        .map(str::to_owned)
}

/// `X-Reachly-Message-Id` from the echoed `message.headers` object (names any case).
fn header_id(data: &Value) -> Option<&str> {
    let headers = data.get("message")?.get("headers")?.as_object()?;
    header_message_id(
        headers
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v))),
    )
}

/// One `event-data` to a record. Never fails: what cannot be mapped is a dead letter.
fn map_event(
    data: &Value,
    token: Option<&str>,
    received_at: DateTime<Utc>,
    ctx: &ParseContext<'_>,
) -> Record {
    let raw = data.to_string();
    facts(data, token, &raw).into_record(SOURCE, &raw, received_at, ctx.machine)
}

/// What one Mailgun event says; `token` (the signature's) keys an event without an id.
fn facts<'a>(data: &'a Value, token: Option<&str>, raw: &str) -> Facts<'a> {
    let kind = json_str(data, "event");
    let key = match json_str(data, "id").or(token) {
        Some(id) => id_key(SOURCE, id),
        None => content_key(SOURCE, &["dead_letter", raw]),
    };
    let mapped = map_type(data);
    // `user-variables` is an object of the `v:` variables, or `[]` when there are none.
    let vars = data.get("user-variables").filter(|v| v.is_object());
    let message_id = vars
        .and_then(|v| json_str(v, "reachly_message_id"))
        .or_else(|| header_id(data));

    let mut metadata = Metadata::default();
    metadata.keep(
        Some(data),
        &[
            ("id", "mailgun_event_id"),
            ("reason", "reason"),
            ("severity", "severity"),
            ("recipient-domain", "recipient_domain"),
        ],
    );
    metadata.keep(
        data.get("message").and_then(|m| m.get("headers")),
        &[("message-id", "esp_message_id")],
    );
    metadata.keep(
        data.get("delivery-status"),
        &[
            ("code", "delivery_code"),
            ("enhanced-code", "enhanced_code"),
            ("message", "smtp_response"),
            ("description", "description"),
            ("bounce-type", "bounce_type"),
            ("mx-host", "mx_host"),
            ("attempt-no", "attempt"),
            ("retry-seconds", "retry_seconds"),
        ],
    );
    let client = data.get("client-info");
    metadata.keep(
        client,
        &[
            ("client-name", "client_name"),
            ("device-type", "device_type"),
            ("bot", "bot"),
        ],
    );
    metadata.keep(data.get("geolocation"), &[("country", "country")]);

    let mut engagement = Engagement::default();
    let mut error = None;
    match mapped.map(|(t, _)| t) {
        Some(EventType::Opened | EventType::Clicked | EventType::Unsubscribed) => {
            engagement.ip = json_str(data, "ip");
            engagement.user_agent = client.and_then(|c| json_str(c, "user-agent"));
            engagement.link_url = json_str(data, "url");
            engagement.machine = client
                .and_then(|c| json_str(c, "bot"))
                .map(|bot| format!("mailgun_bot:{bot}"));
        }
        Some(EventType::Bounced | EventType::Deferred | EventType::Dropped) => {
            error = Some(diagnostic(data).unwrap_or_else(|| kind.unwrap_or("failed").to_owned()));
        }
        _ => {}
    }
    Facts {
        kind: kind.map(Into::into),
        mapped,
        key: Some(key),
        dead_letter_key: None,
        message_id,
        organization_id: vars.and_then(|v| json_str(v, "reachly_organization_id")),
        occurred_at: data.get("timestamp").and_then(json_time),
        engagement,
        error,
        metadata,
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests;
