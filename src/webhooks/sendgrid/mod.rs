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
use serde_json::{Map, Value};

use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
    content_key, correlate, dead_letter, esp_event, json_body, json_str, json_time, keep_fields,
};
use crate::config::WebhookConfig;
use crate::event::{BounceClass, EventType, Record, Source};

pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";
/// How far the signed timestamp may be from the arrival time, either way.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 10 * 60;

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
        return dead_letter(SOURCE, "malformed_event", &raw, None, None);
    }
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
    let dead_key = || {
        content_key(
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
        )
    };

    let Some((event_type, bounce_class)) = kind.and_then(|k| map_type(k, bounce_type)) else {
        return dead_letter(SOURCE, "unknown_event_type", &raw, Some(dead_key()), kind);
    };
    let (message_id, organization_id) =
        match correlate(message_raw, json_str(ev, "reachly_organization_id")) {
            Ok(ids) => ids,
            Err(reason) => return dead_letter(SOURCE, reason, &raw, Some(dead_key()), kind),
        };
    let occurred_at = ev
        .get("timestamp")
        .and_then(json_time)
        .unwrap_or(received_at);
    let key = content_key(
        SOURCE,
        &[
            &message_id.to_string(),
            kind.unwrap_or(""),
            bounce_type.unwrap_or(""),
            &ts_raw,
            url,
            sg_message_id,
        ],
    );
    let mut e = esp_event(
        SOURCE,
        message_id,
        organization_id,
        event_type,
        occurred_at,
        key,
    );
    e.bounce_class = bounce_class;
    let mut metadata = Map::new();
    keep_fields(&mut metadata, Some(ev), KEPT);

    match event_type {
        EventType::Opened | EventType::Clicked | EventType::Unsubscribed => {
            // The recipient's address and client as SendGrid saw them; the webhook handler
            // then applies REACHLY_IP_MODE (`apply_ip_mode`), as for our own endpoints.
            e.ip_address = json_str(ev, "ip").map(str::to_owned);
            e.user_agent = json_str(ev, "useragent").map(str::to_owned);
            if event_type == EventType::Clicked {
                e.link_url = json_str(ev, "url").map(str::to_owned);
            } else if let Some(u) = json_str(ev, "url") {
                metadata.insert(
                    "url".into(),
                    Value::from(crate::event::pg_text(u, crate::event::MAX_TEXT_BYTES)),
                );
            }
            if event_type != EventType::Unsubscribed {
                e.machine_reason = if ev.get("sg_machine_open") == Some(&Value::Bool(true)) {
                    Some("sendgrid_machine_open".into())
                } else {
                    ctx.machine.classify_reported(e.user_agent.as_deref())
                };
            }
        }
        EventType::Bounced => {
            e.error_message = Some(diagnostic(ev, "bounce"));
        }
        EventType::Deferred => {
            e.error_message = Some(
                json_str(ev, "response")
                    .or(json_str(ev, "reason"))
                    .unwrap_or("deferred")
                    .to_owned(),
            );
        }
        EventType::Dropped => {
            e.error_message = Some(diagnostic(ev, "dropped"));
        }
        _ => {}
    }
    e.metadata = metadata;
    Record::Event(e)
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
