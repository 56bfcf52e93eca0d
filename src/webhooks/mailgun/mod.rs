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
//! | `failed`, permanent, `reason` = `old` | bounced, soft (retries expired; the address itself was not refused) |
//! | `failed`, permanent, `delivery-status.bounce-type` = `hard` / `soft` | bounced, hard / soft |
//! | `failed`, permanent, no `bounce-type` | bounced, hard only for a dead mailbox (enhanced status 5.1.x in `enhanced-code` or the SMTP message), else soft |
//! | `rejected` | dropped |
//! | anything else (`stored`, list events, ...) | dead letter `unknown_event_type` |
//!
//! Bounce classes, in short: hard = `bounce-type` `hard`, or no `bounce-type` and a 5.1.x
//! status (the receiver says the address does not exist: the captured 2018 shape in
//! `tests/fixtures/mailgun/failed-permanent-no-bounce-type.json`); soft = everything else
//! that failed permanently. A wrong hard bounce suppresses a contact forever; a missed one
//! costs one more attempt, which Mailgun then drops itself (`suppress-bounce`).
//!
//! Retries and window: Mailgun retries any answer but 200 and 406 after 5, 10 and 15
//! minutes, 1, 2 and 4 hours (about 8 hours; delivered notifications are never retried), with
//! the signature object of the first attempt. A signature up to [`MAX_SIGNATURE_AGE_SECS`]
//! old (8 h 15 min: the schedule plus skew) or [`MAX_SIGNATURE_AHEAD_SECS`] ahead is
//! accepted; later, 401. This service never answers 406.
//!
//! Replay protection: the signature covers `timestamp + token` only, not the event. Each
//! token is recorded with the SHA-256 of its body in the shared [`super::ReplayStore`] (the
//! database, table `webhook_signature_tokens`, so every instance and every restart sees it):
//! the same token with the same body is a re-delivery, accepted (its event key stores no
//! second row); with another body it is a forgery under a captured signature, 401. The store
//! unavailable is 503 (Mailgun retries). Before any of it, only the `signature` object is
//! deserialized (the event is skipped, not built), from a body of at most
//! [`MAX_BODY_BYTES`]. First come wins: a forgery that reaches us before the genuine request
//! would make the genuine one 401. Against that, and against a captured signature used at
//! all, `REACHLY_MAILGUN_BASIC_AUTH` adds a second factor: Mailgun sends the user info of
//! the webhook URL (`https://USER:PASSWORD@host/webhooks/mailgun`) as basic auth, checked
//! first, before the body is read.
//!
//! Dedup key: `event-data.id` (Mailgun's event id, the same on every retry, distinct for
//! every event), else the signature token (the same on every retry of that POST); so a
//! re-delivery is caught and two events never share a key. An event without `timestamp` is
//! stored at its arrival and deduplicated on the key alone (`undated`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::auth::basic_auth_ok;
use super::extract::{header_message_id, json_body, json_str, json_time, require_json};
use super::records::{Engagement, Facts, Metadata, content_key, id_key};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::{Secret, WebhookConfig};
use crate::event::{BounceClass, EventType, Record, Source};

/// Oldest signature accepted: Mailgun retries a failed POST after 5, 10 and 15 minutes, 1,
/// 2 and 4 hours (7 h 30 min in all, "8 hours" in its words) with the signature of the first
/// attempt, so the window is the whole schedule, rounded up to 8 hours, plus 15 minutes of
/// clock skew.
pub const MAX_SIGNATURE_AGE_SECS: i64 = 8 * 3600 + 15 * 60;
/// Clock skew tolerated the other way (a signature from the future).
pub const MAX_SIGNATURE_AHEAD_SECS: i64 = 15 * 60;

/// Largest body read. One event per request; user variables are limited to 4 KB and a handful of headers is echoed.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

const SOURCE: Source = Source::Mailgun;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The Mailgun provider: its signing key (the tokens seen are in the shared replay store).
pub struct Mailgun {
    key: Secret,
    /// `REACHLY_MAILGUN_BASIC_AUTH`: credentials Mailgun sends from the webhook URL.
    basic: Option<Secret>,
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
    if let Some(basic) = &cfg.mailgun_basic_auth {
        match basic.expose().split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {}
            _ => return Err("REACHLY_MAILGUN_BASIC_AUTH must be USER:PASSWORD".into()),
        }
    }
    Ok(Some(Arc::new(Mailgun {
        key: key.clone(),
        basic: cfg.mailgun_basic_auth.clone(),
    })))
}

/// The body's `signature` object and nothing else: read before anything is trusted, without
/// building the event's tree (serde skips `event-data` as it scans).
#[derive(serde::Deserialize)]
struct Signed {
    signature: Option<SignatureFields>,
}

#[derive(serde::Deserialize)]
struct SignatureFields {
    /// A string as documented; a number tolerated (its decimal text is what was signed).
    timestamp: Option<Value>,
    token: Option<String>,
    signature: Option<String>,
    /// A subaccount's events: the same HMAC made with the primary account's key.
    #[serde(rename = "parent-signature")]
    parent_signature: Option<String>,
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

    /// Everything but the replay check: content type, the signature object (parsed alone),
    /// the window, the HMAC. Returns the token and the signature time.
    fn check_signature(&self, req: &WebhookRequest<'_>) -> Result<(String, i64), WebhookError> {
        // The second factor, when configured, before anything in the body is read.
        if let Some(basic) = &self.basic {
            if !req.headers.contains_key(hyper::header::AUTHORIZATION) {
                return Err(WebhookError::Unauthorized(AuthFailure::MissingCredentials));
            }
            if !basic_auth_ok(req.headers, basic.expose()) {
                return Err(WebhookError::Unauthorized(AuthFailure::WrongCredentials));
            }
        }
        require_json(req)?;
        let signed: Signed = match serde_json::from_slice(req.body) {
            Ok(s) => s,
            // Valid JSON of another shape (an array, a string) carries no signature.
            Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(req.body).is_ok() => {
                return Err(WebhookError::Unauthorized(AuthFailure::MissingSignature));
            }
            Err(e) => return Err(WebhookError::BadRequest(format!("body is not JSON: {e}"))),
        };
        let sig = signed
            .signature
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        // The exact values Mailgun signed (the timestamp may come as a string or a number).
        let timestamp = match sig.timestamp {
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(WebhookError::Unauthorized(AuthFailure::MissingTimestamp)),
        };
        let token = sig
            .token
            .filter(|t| !t.is_empty())
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        let signed_at: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadTimestamp))?;
        let age = req.received_at.timestamp() - signed_at;
        if age > MAX_SIGNATURE_AGE_SECS || -age > MAX_SIGNATURE_AHEAD_SECS {
            return Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp));
        }
        let signature = sig
            .signature
            .filter(|s| !s.trim().is_empty())
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        // A subaccount's events also carry `parent-signature`, made with the primary
        // account's key: either may match the configured key.
        let ok = self.signature_ok(&timestamp, &token, &signature)
            | sig
                .parent_signature
                .is_some_and(|p| self.signature_ok(&timestamp, &token, &p));
        if !ok {
            return Err(WebhookError::Unauthorized(AuthFailure::BadSignature));
        }
        Ok((token, signed_at))
    }

    /// The signature, then the token against every instance's record of it: the same token
    /// with another body is a forgery under a captured signature.
    async fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let (token, signed_at) = self.check_signature(req)?;
        let digest: [u8; 32] = Sha256::digest(req.body).into();
        let signed_at = DateTime::from_timestamp(signed_at, 0)
            .ok_or(WebhookError::Unauthorized(AuthFailure::BadTimestamp))?;
        let expires_before = req.received_at - chrono::TimeDelta::seconds(MAX_SIGNATURE_AGE_SECS);
        match req
            .replay
            .admit(SOURCE.label(), &token, digest, signed_at, expires_before)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(WebhookError::Unauthorized(AuthFailure::ReplayedToken)),
            Err(why) => Err(WebhookError::Unavailable(format!(
                "cannot check the Mailgun signature token: {why}"
            ))),
        }
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
        Box::pin(self.check(req))
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
            } else if reason == "old" {
                (EventType::Bounced, Some(BounceClass::Soft))
            } else {
                let hard = match bounce_type.as_deref() {
                    Some(t) => t == "hard",
                    // Older events (and some failures still) carry no bounce-type: only a
                    // mailbox the receiver says does not exist is known dead.
                    None => dead_mailbox(data.get("delivery-status")),
                };
                let class = if hard {
                    BounceClass::Hard
                } else {
                    BounceClass::Soft
                };
                (EventType::Bounced, Some(class))
            }
        }
        _ => return None,
    };
    Some(t)
}

/// Whether a failure without `bounce-type` says the address itself is dead: an enhanced
/// status 5.1.x (RFC 3463 "addressing status": bad mailbox, bad domain, bad syntax, moved),
/// from `enhanced-code` or the start of the SMTP message. A policy block (5.7.x), a full
/// mailbox (5.2.x) or anything unreadable is not: a wrong hard bounce suppresses a contact
/// forever, a missed one costs one more attempt that Mailgun then drops (`suppress-bounce`).
fn dead_mailbox(status: Option<&Value>) -> bool {
    let Some(status) = status else { return false };
    let enhanced = json_str(status, "enhanced-code")
        .or_else(|| json_str(status, "message").and_then(|m| m.split_whitespace().next()));
    enhanced.is_some_and(|code| code.starts_with("5.1."))
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
