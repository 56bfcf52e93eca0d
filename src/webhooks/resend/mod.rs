//! Resend webhooks (`POST /webhooks/resend`): this module owns Svix signature verification
//! (HMAC-SHA256 over `svix-id.svix-timestamp.body` with the base64 key of the `whsec_`
//! secret, any `v1,` entry of `svix-signature` may match, timestamps within 5 minutes either
//! way) and the mapping of Resend's `email.*` events to SPEC.md's event types. One request
//! carries one event; `svix-id` (stable across Resend's retries) is its dedup key.
//!
//! Documentation this follows:
//! - <https://docs.svix.com/receiving/verifying-payloads/how-manual> (signed content, header
//!   format, secret format, tolerance)
//! - <https://resend.com/docs/dashboard/webhooks/verify-webhooks-requests>
//! - <https://resend.com/docs/dashboard/webhooks/event-types> and the per-event pages under
//!   <https://resend.com/docs/webhooks/emails/> (`bounced`, `clicked`, `failed`, ...): payloads,
//!   `bounce.type` (`Permanent`, `Temporary`/`Transient`), `click.link`, and `data.tags`, which
//!   the reference documents as an array of `{name, value}` while its examples show an object
//!   (both are read).
//!
//! Mapping, in code as [`EVENTS`]:
//!
//! | Resend `type` | SPEC type |
//! | --- | --- |
//! | `email.sent` | sent |
//! | `email.delivered` | delivered |
//! | `email.delivery_delayed` | deferred |
//! | `email.complained` | complained |
//! | `email.bounced` | bounced (`bounce.type` `Permanent` hard, any other type soft; no type: read from `bounce.message`, below) |
//! | `email.opened` | opened |
//! | `email.clicked` | clicked (`click.link` → `link_url`) |
//! | `email.failed`, `email.suppressed` | dropped (Resend never handed the message to the recipient's server) |
//! | anything else (`email.scheduled`, `email.received`, `contact.*`, `domain.*`, ...) | dead letter `unknown_event_type` |
//!
//! Bounce classes: `bounce.type` `Permanent` → hard (its sub-types General, NoEmail,
//! Suppressed: the address is dead or has a history of hard bounces); `Transient`,
//! `Temporary`, `Undetermined` → soft. An `email.bounced` without `bounce.type` (the shape of
//! real payloads in 2023: only `bounce.message`) is read from its text: "suppressed sending"
//! (Resend refused, never attempted) → dropped; "hard bounce" → hard; anything else → soft.
//!
//! Retries and window: Svix retries any non-2xx immediately, then after 5 s, 5 min, 30 min,
//! 2 h, 5 h, 10 h and 10 h (about 27.5 h). Every attempt is signed afresh (`svix-timestamp` is
//! the attempt's time: django-anymail notes it changes on every repost), so the 5-minute
//! window ([`TIMESTAMP_TOLERANCE_SECS`]) loses no retry. Body limit [`MAX_BODY_BYTES`].
//!
//! Dedup key: `svix-id`, the same on every attempt and distinct for every event, so a
//! re-delivery is caught and two events never share a key. An event without `created_at`
//! is stored at its arrival and deduplicated on the key alone (`undated`).
use std::sync::Arc;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::extract::{obj_at, require_json, rfc3339, str_at};
use super::records::{Engagement, EventTable, Facts, Mapped, Metadata, id_key, lookup};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::WebhookConfig;
use crate::event::{BounceClass, EventType, Record, Source};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Svix's tolerance for `svix-timestamp`, in both directions.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// Longest `svix-signature` header looked at (a handful of `v1,<44 chars>` entries).
const MAX_SIGNATURE_HEADER_BYTES: usize = 4096;

/// Largest body read. One event per request (Svix).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

pub struct Resend {
    /// The HMAC key: the base64-decoded part of `whsec_<base64>`.
    key: Vec<u8>,
}

/// The provider if its secret is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    let Some(secret) = &cfg.resend_webhook_secret else {
        return Ok(None);
    };
    let key = decode_secret(secret.expose())
        .map_err(|why| format!("REACHLY_RESEND_WEBHOOK_SECRET {why}"))?;
    Ok(Some(Arc::new(Resend { key })))
}

/// `whsec_<base64>` → the key bytes.
fn decode_secret(secret: &str) -> Result<Vec<u8>, &'static str> {
    let b64 = secret
        .trim()
        .strip_prefix("whsec_")
        .ok_or("must start with whsec_ (the signing secret as Resend shows it)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
        .map_err(|_| "must be whsec_ followed by base64")?;
    if key.is_empty() {
        return Err("must be whsec_ followed by a non-empty base64 key");
    }
    Ok(key)
}

/// A Svix header, also under the white-labelled `webhook-` prefix Svix's libraries accept.
fn svix_header<'a>(req: &'a WebhookRequest<'a>, name: &str) -> Option<&'a str> {
    req.header(&format!("svix-{name}"))
        .or_else(|| req.header(&format!("webhook-{name}")))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

impl Resend {
    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        require_json(req)?;
        let (Some(id), Some(ts), Some(sigs)) = (
            svix_header(req, "id"),
            svix_header(req, "timestamp"),
            svix_header(req, "signature"),
        ) else {
            return Err(WebhookError::Unauthorized(AuthFailure::MissingSignature));
        };
        let ts_secs: i64 = ts
            .parse()
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadTimestamp))?;
        let skew = req.received_at.timestamp().saturating_sub(ts_secs);
        if skew.abs() > TIMESTAMP_TOLERANCE_SECS {
            return Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp));
        }
        if sigs.len() > MAX_SIGNATURE_HEADER_BYTES {
            return Err(WebhookError::Unauthorized(AuthFailure::BadSignature));
        }
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadKey))?;
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(req.body);
        let engine = base64::engine::general_purpose::STANDARD;
        let matched = sigs
            .split_ascii_whitespace()
            .filter_map(|entry| entry.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .filter_map(|(_, sig)| engine.decode(sig).ok())
            // Every entry is checked (no early exit), each comparison in constant time.
            .fold(false, |ok, sig| mac.clone().verify_slice(&sig).is_ok() | ok);
        if matched {
            Ok(())
        } else {
            Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
        }
    }
}

impl Provider for Resend {
    fn source(&self) -> Source {
        Source::Resend
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
        let svix_id = svix_header(req, "id")
            .ok_or_else(|| WebhookError::BadRequest("missing svix-id".into()))?;
        let value: Value = serde_json::from_slice(req.body)
            .map_err(|e| WebhookError::BadRequest(format!("invalid JSON: {e}")))?;
        let Some(obj) = value.as_object() else {
            return Err(WebhookError::BadRequest(
                "expected a JSON object with type and data".into(),
            ));
        };
        let Some(kind) = obj.get("type").and_then(Value::as_str) else {
            return Err(WebhookError::BadRequest("missing event type".into()));
        };
        let raw = String::from_utf8_lossy(req.body);
        let key = id_key(Source::Resend, svix_id);
        Ok(vec![facts(obj, kind, key).into_record(
            Source::Resend,
            &raw,
            req.received_at,
            ctx.machine,
        )])
    }
}

/// Resend's `email.*` types (the module's mapping); a bounce's class comes from `bounce.type`.
pub const EVENTS: &EventTable = &[
    ("email.sent", EventType::Sent, None),
    ("email.delivered", EventType::Delivered, None),
    ("email.delivery_delayed", EventType::Deferred, None),
    ("email.complained", EventType::Complained, None),
    ("email.bounced", EventType::Bounced, None),
    ("email.opened", EventType::Opened, None),
    ("email.clicked", EventType::Clicked, None),
    ("email.failed", EventType::Dropped, None),
    ("email.suppressed", EventType::Dropped, None),
];

/// `data.tags[name]`, whether tags is an object (`{"name": "value"}`, as in Resend's examples)
/// or an array of `{name, value}` (as in its reference).
fn tag<'a>(data: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a str> {
    match data?.get("tags")? {
        Value::Object(map) => map.get(name).and_then(Value::as_str),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_object)
            .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|t| t.get("value"))
            .and_then(Value::as_str),
        _ => None,
    }
}

/// An `email.bounced`: by `bounce.type` (`Permanent` hard; `Transient`, `Temporary`,
/// `Undetermined` soft). Real payloads of 2023 carry no type, only `bounce.message`
/// (captured by django-anymail): read as django-anymail reads it, "suppressed" (Resend
/// refused to send to a suppressed address: never attempted) is a drop, "hard bounce" is
/// hard, anything else soft, so a contact is never suppressed on a guess.
fn bounce_outcome(bounce_type: Option<&str>, message: Option<&str>) -> Mapped {
    let hard = (EventType::Bounced, Some(BounceClass::Hard));
    let soft = (EventType::Bounced, Some(BounceClass::Soft));
    match bounce_type {
        Some(t) if t.eq_ignore_ascii_case("permanent") => hard,
        Some(_) => soft,
        None => {
            let text = message.unwrap_or("").to_ascii_lowercase();
            if text.contains("suppress") {
                (EventType::Dropped, None)
            } else if text.contains("hard bounce") {
                hard
            } else {
                soft
            }
        }
    }
}

/// What the request's one event says; `key` is its `svix-id` key.
fn facts<'a>(obj: &'a Map<String, Value>, kind: &'a str, key: String) -> Facts<'a> {
    let data = obj_at(Some(obj), "data");
    let mut mapped = lookup(EVENTS, kind);
    let click = obj_at(data, "click");
    let action = click.or(obj_at(data, "open"));

    let mut metadata = Metadata::default();
    metadata.text("resend_event_type", Some(kind));
    metadata.text("resend_email_id", str_at(data, "email_id"));
    metadata.text("resend_broadcast_id", str_at(data, "broadcast_id"));
    let mut engagement = Engagement::default();
    let mut error = None;
    match mapped.map(|(t, _)| t) {
        Some(EventType::Bounced) => {
            let bounce = obj_at(data, "bounce");
            let bounce_type = str_at(bounce, "type");
            mapped = Some(bounce_outcome(bounce_type, str_at(bounce, "message")));
            let diagnostic: Vec<&str> = bounce
                .and_then(|b| b.get("diagnosticCode"))
                .map(|d| match d {
                    Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                    Value::String(s) => vec![s.as_str()],
                    _ => Vec::new(),
                })
                .unwrap_or_default();
            let diagnostic = (!diagnostic.is_empty()).then(|| diagnostic.join("; "));
            metadata.text("bounce_type", bounce_type);
            metadata.text("bounce_sub_type", str_at(bounce, "subType"));
            metadata.text("diagnostic_code", diagnostic.as_deref());
            error = str_at(bounce, "message")
                .map(str::to_owned)
                .or(diagnostic)
                .or_else(|| bounce_type.map(|t| format!("{t} bounce")));
        }
        Some(EventType::Dropped) => {
            let reason = str_at(obj_at(data, "failed"), "reason")
                .or_else(|| str_at(obj_at(data, "suppressed"), "message"));
            metadata.text("reason", reason);
            error = Some(match (kind, reason) {
                (_, Some(r)) => r.to_owned(),
                ("email.suppressed", None) => "suppressed by Resend".to_owned(),
                _ => "Resend failed to send the email".to_owned(),
            });
        }
        Some(EventType::Deferred) => error = Some("delivery delayed".to_owned()),
        Some(EventType::Opened | EventType::Clicked) => {
            engagement.ip = str_at(action, "ipAddress");
            engagement.user_agent = str_at(action, "userAgent");
            engagement.link_url = str_at(click, "link");
        }
        _ => {}
    }
    Facts {
        kind: Some(kind.into()),
        mapped,
        key: Some(key),
        dead_letter_key: None,
        message_id: tag(data, "reachly_message_id"),
        organization_id: tag(data, "reachly_organization_id"),
        // The event's own time: the click's (or open's) timestamp, else the event's created_at.
        occurred_at: str_at(action, "timestamp")
            .and_then(rfc3339)
            .or_else(|| str_at(Some(obj), "created_at").and_then(rfc3339)),
        engagement,
        error,
        metadata,
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests;
