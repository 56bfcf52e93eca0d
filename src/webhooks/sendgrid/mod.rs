//! SendGrid signed Event Webhook, `POST /webhooks/sendgrid`. This module owns verifying
//! SendGrid's ECDSA P-256 / SHA-256 signature (over the `X-Twilio-Email-Event-Webhook-Timestamp`
//! header bytes followed by the raw body, DER signature in base64 in
//! `X-Twilio-Email-Event-Webhook-Signature`, public key = base64 DER SubjectPublicKeyInfo from
//! `REACHLY_SENDGRID_PUBLIC_KEY`) and mapping SendGrid's event array to SPEC.md's events.
//!
//! Sources:
//! - payloads: <https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event>
//! - signature: <https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features>
//!
//! | SendGrid `event` | SPEC type | notes |
//! | --- | --- | --- |
//! | `processed` | sent | |
//! | `delivered` | delivered | `response` kept |
//! | `deferred` | deferred | `response` is the error message |
//! | `bounce`, `type` = `bounce` (or absent) | bounced, hard | "permanent delivery denial" |
//! | `bounce`, `type` = `blocked`; legacy `blocked` | bounced, soft | "temporary delivery denial" |
//! | `dropped` | dropped | `reason` is the error message |
//! | `open` | opened | `sg_machine_open: true` → machine `sendgrid_machine_open` |
//! | `click` | clicked | `url` → `link_url` |
//! | `spamreport` | complained | |
//! | `unsubscribe`, `group_unsubscribe` | unsubscribed | |
//! | `group_resubscribe`, `account_status_change`, anything else | dead letter `unknown_event_type` | a resubscribe cannot re-activate a contact (SPEC: never back to active here) |
//!
//! Choices: the timestamp header must be within [`TIMESTAMP_TOLERANCE_SECS`] (10 minutes)
//! of the arrival time, either way, so a captured request cannot be replayed later.
//! `sg_event_id` is not stable (SendGrid re-sends an event with a new one), so an event is
//! keyed on its content (message, event, bounce type, timestamp, URL, `sg_message_id`) and
//! `sg_event_id` is only kept in metadata. The bounce `type` is part of the key because
//! SendGrid's own examples show a bounce and a block that differ in nothing else.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use p256::ecdsa::signature::MultipartVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde_json::Value;

use super::extract::{json_body, json_str, json_time};
use super::records::{Engagement, Facts, Metadata, content_key, malformed};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::WebhookConfig;
use crate::event::{BounceClass, EventType, Record, Source};

pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";
/// How far the signed timestamp may be from the arrival time, either way.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 10 * 60;

/// Largest body read. Batches are posted "every 30 seconds or when the batch size reaches 768 KB"; the event that crosses the mark is still in the batch.
pub const MAX_BODY_BYTES: usize = 2 << 20;

const SOURCE: Source = Source::Sendgrid;

/// The SendGrid provider: its verification key.
pub struct SendGrid {
    key: VerifyingKey,
}

/// The provider if its secret is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    let Some(secret) = &cfg.sendgrid_public_key else {
        return Ok(None);
    };
    let key = parse_public_key(secret.expose())
        .map_err(|why| format!("REACHLY_SENDGRID_PUBLIC_KEY: {why}"))?;
    Ok(Some(Arc::new(SendGrid { key })))
}

/// The verification key as SendGrid shows it: base64 of the DER SubjectPublicKeyInfo of a
/// P-256 key. Whitespace and PEM armour lines are tolerated (people paste either).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let b64: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("-----"))
        .flat_map(str::chars)
        .filter(|c| !c.is_whitespace())
        .collect();
    if b64.is_empty() {
        return Err("empty; expected the base64 DER public key SendGrid shows".into());
    }
    let der = STANDARD.decode(b64.as_bytes()).map_err(|e| {
        format!("not base64 ({e}); expected the base64 DER public key SendGrid shows")
    })?;
    VerifyingKey::from_public_key_der(&der)
        .map_err(|e| format!("not a DER SubjectPublicKeyInfo of a P-256 public key ({e})"))
}

/// Checks SendGrid's signature: ECDSA P-256 with SHA-256 over the timestamp header's exact
/// bytes followed by the raw body. The signature is base64 of its ASN.1 DER form.
pub fn verify_signature(
    key: &VerifyingKey,
    timestamp: &str,
    body: &[u8],
    signature_b64: &str,
) -> Result<(), WebhookError> {
    let der = STANDARD
        .decode(signature_b64.trim().as_bytes())
        .map_err(|_| WebhookError::Unauthorized(AuthFailure::MalformedSignature))?;
    let signature = Signature::from_der(&der)
        .map_err(|_| WebhookError::Unauthorized(AuthFailure::MalformedSignature))?;
    key.multipart_verify(&[timestamp.as_bytes(), body], &signature)
        .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadSignature))
}

/// The signed timestamp must be near the arrival time (replay window).
fn check_fresh(timestamp: &str, now: DateTime<Utc>) -> Result<(), WebhookError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadTimestamp))?;
    if (now.timestamp() - ts).abs() > TIMESTAMP_TOLERANCE_SECS {
        return Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp));
    }
    Ok(())
}

impl SendGrid {
    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let signature = req
            .header(SIGNATURE_HEADER)
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        // The header's exact text is what SendGrid signed: no trimming before verifying.
        let timestamp = req
            .header(TIMESTAMP_HEADER)
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingTimestamp))?;
        check_fresh(timestamp, req.received_at)?;
        verify_signature(&self.key, timestamp, req.body, signature)
    }
}

impl Provider for SendGrid {
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
        let Value::Array(events) = body else {
            return Err(WebhookError::BadRequest(
                "expected a JSON array of SendGrid events".into(),
            ));
        };
        Ok(events
            .iter()
            .map(|ev| map_event(ev, req.received_at, ctx))
            .collect())
    }
}

/// SendGrid's event name (and bounce `type`) to a SPEC type and bounce class.
fn map_type(event: &str, bounce_type: Option<&str>) -> Option<(EventType, Option<BounceClass>)> {
    let t = match event.to_ascii_lowercase().as_str() {
        "processed" => (EventType::Sent, None),
        "delivered" => (EventType::Delivered, None),
        "deferred" => (EventType::Deferred, None),
        "bounce" => match bounce_type.map(str::to_ascii_lowercase).as_deref() {
            Some("blocked") => (EventType::Bounced, Some(BounceClass::Soft)),
            _ => (EventType::Bounced, Some(BounceClass::Hard)),
        },
        "blocked" => (EventType::Bounced, Some(BounceClass::Soft)),
        "dropped" => (EventType::Dropped, None),
        "open" => (EventType::Opened, None),
        "click" => (EventType::Clicked, None),
        "spamreport" => (EventType::Complained, None),
        "unsubscribe" | "group_unsubscribe" => (EventType::Unsubscribed, None),
        _ => return None,
    };
    Some(t)
}

/// SendGrid fields kept in `metadata` (SendGrid name, our name).
const KEPT: &[(&str, &str)] = &[
    ("sg_event_id", "sg_event_id"),
    ("sg_message_id", "esp_message_id"),
    ("smtp-id", "smtp_id"),
    ("reason", "reason"),
    ("status", "status"),
    ("response", "response"),
    ("attempt", "attempt"),
    ("type", "bounce_type"),
    ("bounce_classification", "bounce_classification"),
    ("asm_group_id", "asm_group_id"),
    ("tls", "tls"),
    ("sg_machine_open", "sg_machine_open"),
    ("marketing_campaign_id", "marketing_campaign_id"),
];

/// One element of the array to a record. Never fails: what cannot be mapped is a dead letter.
fn map_event(ev: &Value, received_at: DateTime<Utc>, ctx: &ParseContext<'_>) -> Record {
    let raw = ev.to_string();
    if !ev.is_object() {
        return malformed(SOURCE, &raw);
    }
    facts(ev).into_record(SOURCE, &raw, received_at, ctx.machine)
}

/// What one SendGrid event says.
fn facts(ev: &Value) -> Facts<'_> {
    let kind = json_str(ev, "event");
    let bounce_type = json_str(ev, "type");
    let ts_raw = ev
        .get("timestamp")
        .map(Value::to_string)
        .unwrap_or_default();
    let url = json_str(ev, "url").unwrap_or("");
    let sg_message_id = json_str(ev, "sg_message_id").unwrap_or("");
    let message_raw = json_str(ev, "reachly_message_id");
    // A dead letter's key leaves out sg_event_id (it changes on re-delivery) and adds the
    // recipient, which tells apart uncorrelated events that share everything else.
    let dead_letter_key = content_key(
        SOURCE,
        &[
            "dead_letter",
            message_raw.unwrap_or(""),
            kind.unwrap_or(""),
            bounce_type.unwrap_or(""),
            &ts_raw,
            url,
            sg_message_id,
            json_str(ev, "email").unwrap_or(""),
        ],
    );
    // The event's key names the message as parsed (a malformed id is a dead letter anyway).
    let key = message_raw
        .and_then(|m| uuid::Uuid::parse_str(m).ok())
        .map(|message| {
            content_key(
                SOURCE,
                &[
                    &message.to_string(),
                    kind.unwrap_or(""),
                    bounce_type.unwrap_or(""),
                    &ts_raw,
                    url,
                    sg_message_id,
                ],
            )
        });
    let mapped = kind.and_then(|k| map_type(k, bounce_type));
    let mut metadata = Metadata::default();
    metadata.keep(Some(ev), KEPT);
    let mut engagement = Engagement::default();
    let mut error = None;
    match mapped.map(|(t, _)| t) {
        Some(t @ (EventType::Opened | EventType::Clicked | EventType::Unsubscribed)) => {
            engagement.ip = json_str(ev, "ip");
            engagement.user_agent = json_str(ev, "useragent");
            engagement.link_url = json_str(ev, "url");
            if t != EventType::Clicked {
                metadata.text("url", json_str(ev, "url"));
            }
            if ev.get("sg_machine_open") == Some(&Value::Bool(true)) {
                engagement.machine = Some("sendgrid_machine_open".into());
            }
        }
        Some(EventType::Bounced) => error = Some(diagnostic(ev, "bounce")),
        Some(EventType::Deferred) => {
            error = Some(
                json_str(ev, "response")
                    .or(json_str(ev, "reason"))
                    .unwrap_or("deferred")
                    .to_owned(),
            );
        }
        Some(EventType::Dropped) => error = Some(diagnostic(ev, "dropped")),
        _ => {}
    }
    Facts {
        kind: kind.map(Into::into),
        mapped,
        key,
        dead_letter_key: Some(dead_letter_key),
        message_id: message_raw,
        organization_id: json_str(ev, "reachly_organization_id"),
        occurred_at: ev.get("timestamp").and_then(json_time),
        engagement,
        error,
        metadata,
        ..Facts::default()
    }
}

/// "reason (status x.y.z)", or what there is of it.
fn diagnostic(ev: &Value, fallback: &str) -> String {
    match (json_str(ev, "reason"), json_str(ev, "status")) {
        (Some(r), Some(s)) => format!("{r} (status {s})"),
        (Some(r), None) => r.to_owned(),
        (None, Some(s)) => format!("{fallback} (status {s})"),
        (None, None) => fallback.to_owned(),
    }
}

#[cfg(test)]
mod tests;
