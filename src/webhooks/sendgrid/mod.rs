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
//! | `bounce` | bounced, class below | |
//! | legacy `blocked` | bounced, soft | "temporary delivery denial" |
//! | `dropped` | dropped | `reason` is the error message |
//! | `open` | opened | `sg_machine_open: true` → machine `sendgrid_machine_open` |
//! | `click` | clicked | `url` → `link_url` |
//! | `spamreport` | complained | |
//! | `unsubscribe`, `group_unsubscribe` | unsubscribed | |
//! | `group_resubscribe`, `account_status_change`, anything else | dead letter `unknown_event_type` | a resubscribe cannot re-activate a contact (SPEC: never back to active here) |
//!
//! Bounce classes (only an invalid address is hard; a wrong hard bounce suppresses a contact
//! forever):
//!
//! | `type` | `bounce_classification` | class |
//! | --- | --- | --- |
//! | `blocked` | any | soft |
//! | any other, or none | `Invalid Address` | hard |
//! | any other, or none | Reputation, Content, Technical, Frequency or Volume, Mailbox Unavailable, Unclassified, unknown | soft |
//! | `bounce` | none (events from before classifications) | hard (SendGrid: "permanent delivery denial") |
//! | missing or unknown | none | soft |
//!
//! Retries and window: SendGrid retries any non-2xx "at increasing intervals for up to 24
//! hours after the event occurs"; it does not document whether a retry is signed again, so
//! a signed timestamp up to [`MAX_SIGNATURE_AGE_SECS`] old (24 h 15 min) or
//! [`MAX_SIGNATURE_AHEAD_SECS`] ahead is accepted. The wide window gives a replayer nothing:
//! the signature covers the body, and a replayed body's events are already stored under the
//! same keys. Body limit [`MAX_BODY_BYTES`]: SendGrid posts batches of up to 768 KB.
//!
//! Dedup key: `sg_event_id` is not stable (SendGrid re-sends an event with a new one), so an
//! event is keyed on its content: message, event, bounce `type`, timestamp, URL,
//! `sg_message_id`, and what tells two real events of one second apart: `ip`, `useragent`,
//! `sg_machine_open` and the click's `url_offset.index` (two opens of one message in one
//! second by an image proxy and a person, or a scanner's and a person's click, stay two
//! rows). A re-delivery repeats all of these, so it is caught; only two events identical in
//! every field (one client, one second, one link position) merge, and nothing in the payload
//! could tell them apart. The bounce `type` is in the key because SendGrid's own examples
//! show a bounce and a block that differ in nothing else. `sg_event_id` is kept in metadata.

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
/// Oldest signed timestamp accepted: SendGrid retries "at increasing intervals for up to 24
/// hours after the event occurs" and does not document whether a retry is signed again, so
/// the window is the whole schedule plus 15 minutes of clock skew.
pub const MAX_SIGNATURE_AGE_SECS: i64 = 24 * 3600 + 15 * 60;
/// Clock skew tolerated the other way.
pub const MAX_SIGNATURE_AHEAD_SECS: i64 = 15 * 60;

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
    let age = now.timestamp() - ts;
    if age > MAX_SIGNATURE_AGE_SECS || -age > MAX_SIGNATURE_AHEAD_SECS {
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
fn map_type(
    event: &str,
    bounce_type: Option<&str>,
    classification: Option<&str>,
) -> Option<(EventType, Option<BounceClass>)> {
    let t = match event.to_ascii_lowercase().as_str() {
        "processed" => (EventType::Sent, None),
        "delivered" => (EventType::Delivered, None),
        "deferred" => (EventType::Deferred, None),
        "bounce" => (
            EventType::Bounced,
            Some(bounce_class(bounce_type, classification)),
        ),
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

/// A `bounce`'s class. Hard only when the address is invalid: `bounce_classification`
/// "Invalid Address", or (events from before classifications) `type` `bounce`, which SendGrid
/// defines as a permanent denial. A `blocked` type, every other classification (Reputation,
/// Content, Technical, Frequency or Volume, Mailbox Unavailable, Unclassified) and a missing
/// or unknown type are soft: a wrong hard bounce suppresses a contact forever.
fn bounce_class(bounce_type: Option<&str>, classification: Option<&str>) -> BounceClass {
    let bounce_type = bounce_type.map(str::to_ascii_lowercase);
    if bounce_type.as_deref() == Some("blocked") {
        return BounceClass::Soft;
    }
    let hard = match classification.map(|c| c.trim().to_ascii_lowercase()) {
        Some(c) => c == "invalid address",
        None => bounce_type.as_deref() == Some("bounce"),
    };
    if hard {
        BounceClass::Hard
    } else {
        BounceClass::Soft
    }
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
    // What tells apart two real events of one message in one second: the client (address,
    // user agent, SendGrid's machine-open flag) and, for clicks, the link's position.
    let machine_open = match ev.get("sg_machine_open") {
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    };
    let url_index = ev
        .get("url_offset")
        .and_then(|o| o.get("index"))
        .map(Value::to_string)
        .unwrap_or_default();
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
                    json_str(ev, "ip").unwrap_or(""),
                    json_str(ev, "useragent").unwrap_or(""),
                    &machine_open,
                    &url_index,
                ],
            )
        });
    let mapped = kind.and_then(|k| map_type(k, bounce_type, json_str(ev, "bounce_classification")));
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
