//! Postmark webhooks, `POST /webhooks/postmark`. This module owns checking the HTTP basic
//! auth configured on the webhook URL (`REACHLY_POSTMARK_BASIC_AUTH`, compared in constant
//! time) and mapping Postmark's one record per request (`RecordType`) to SPEC.md's events.
//!
//! Sources:
//! - payloads: <https://postmarkapp.com/developer/webhooks/delivery-webhook>,
//!   <https://postmarkapp.com/developer/webhooks/bounce-webhook>,
//!   <https://postmarkapp.com/developer/webhooks/spam-complaint-webhook>,
//!   <https://postmarkapp.com/developer/webhooks/open-tracking-webhook>,
//!   <https://postmarkapp.com/developer/webhooks/click-webhook>,
//!   <https://postmarkapp.com/developer/webhooks/subscription-change-webhook>
//! - bounce types: <https://postmarkapp.com/developer/api/bounce-api#bounce-types>
//! - basic auth: <https://postmarkapp.com/developer/webhooks/webhooks-overview#protecting-your-webhook>
//!
//! | `RecordType` | SPEC type |
//! | --- | --- |
//! | `Delivery` | delivered |
//! | `Bounce` | by `Type`, below |
//! | `SpamComplaint` | complained |
//! | `Open` / `Click` | opened / clicked (`OriginalLink` → `link_url`) |
//! | `SubscriptionChange`, `SuppressSending: true`, `SuppressionReason` `ManualSuppression`, `Origin` `Recipient` | unsubscribed (the recipient's own choice) |
//! | `SubscriptionChange`, `SuppressSending: true`, any other reason or origin | dead letter `suppression_notice` (see below) |
//! | `SubscriptionChange`, `SuppressSending: false` (reactivation) | dead letter `unknown_event_type` (SPEC: a contact never returns to active here) |
//! | anything else | dead letter `unknown_event_type` |
//!
//! Bounce classes, by `Type` (Postmark's table): `HardBounce`, `BadEmailAddress` → bounced
//! hard; `Transient` (a delay) and `DnsError` (a temporary DNS failure) → deferred: Postmark
//! keeps trying, nothing has bounced; `SoftBounce`, `SpamNotification`, `Unknown`,
//! `VirusNotification`, `ChallengeVerification`, `Unconfirmed`, `Blocked`, `DMARCPolicy` →
//! bounced soft (the address is not known to be dead); `SpamComplaint` → complained;
//! `Unsubscribe` (an unsubscribe request by mail) → unsubscribed; `ManuallyDeactivated`,
//! `SMTPApiError`, `TemplateRenderingFailed` → dropped (never sent); `Subscribe`,
//! `AutoResponder`, `AddressChange`, `OpenRelayTest`, `InboundError` (not outcomes of the
//! send) → dead letter `unknown_event_type`. A missing `Type` is read from `TypeCode`.
//!
//! SubscriptionChange: Postmark sends one after every hard bounce and spam complaint (its own
//! suppression of the address), on top of the Bounce or SpamComplaint record that reports
//! the event. Storing both would count one bounce twice, so only a recipient's own
//! suppression is an event; the others are kept as `suppression_notice` dead letters and move
//! nothing (a suppression by the sender, `Origin` `Customer`, or by Postmark, `Admin`, is not
//! the recipient unsubscribing either).
//!
//! Retries: no signature, so no time window (basic auth on every request). Postmark's
//! current schedule retries 5xx, 408, 429 and timeouts only (9 retries over about 72
//! minutes); earlier it retried any non-200 but 403 over about 10.5 hours. Either way a 401
//! (a wrong `REACHLY_POSTMARK_BASIC_AUTH`) loses the event. Body limit [`MAX_BODY_BYTES`]: one
//! record per request ("Include bounce content" must stay off).
//!
//! Dedup key: Postmark sends no event id (its `ID` exists on bounces only), so a record is
//! keyed on its content: `RecordType`, `MessageID`, the record's own time field, the
//! recipient, the URL, the bounce `Type`, `TypeCode` and `ID`, and the client's user agent
//! and address. A re-delivery repeats every field, so it is caught; two real records of one
//! message differ in their time, their bounce ID or type, or their client (two opens of one
//! second from two devices). A record without its time field (a real `Unsubscribe` bounce
//! has no `BouncedAt`) is stored at its arrival and deduplicated on the key alone
//! (`undated`), so its re-delivery, arriving later, is still one row.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::auth::basic_auth_ok;
use super::extract::{header_message_id, json_body, json_str, json_time};
use super::records::{DeadReason, Engagement, Facts, Metadata, content_key};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::{Secret, WebhookConfig};
use crate::event::{BounceClass, EventType, Record, Source};

/// Largest body read. One record per request. "Include bounce content" adds the full bounce message and must stay off (docs/providers.md).
pub const MAX_BODY_BYTES: usize = 1 << 20;

const SOURCE: Source = Source::Postmark;

/// The Postmark provider: the expected `USER:PASSWORD`.
pub struct Postmark {
    credentials: Secret,
}

/// The provider if its secret is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    let Some(credentials) = &cfg.postmark_basic_auth else {
        return Ok(None);
    };
    match credentials.expose().split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {}
        _ => return Err("REACHLY_POSTMARK_BASIC_AUTH must be USER:PASSWORD".into()),
    }
    Ok(Some(Arc::new(Postmark {
        credentials: credentials.clone(),
    })))
}

impl Provider for Postmark {
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
        Box::pin(async move {
            if !req.headers.contains_key(hyper::header::AUTHORIZATION) {
                return Err(WebhookError::Unauthorized(AuthFailure::MissingCredentials));
            }
            if !basic_auth_ok(req.headers, self.credentials.expose()) {
                return Err(WebhookError::Unauthorized(AuthFailure::WrongCredentials));
            }
            Ok(())
        })
    }

    fn parse(
        &self,
        req: &WebhookRequest<'_>,
        ctx: &ParseContext<'_>,
    ) -> Result<Vec<Record>, WebhookError> {
        let record = json_body(req)?;
        if !record.is_object() {
            return Err(WebhookError::BadRequest(
                "expected one Postmark record (a JSON object)".into(),
            ));
        }
        Ok(vec![map_record(&record, req.received_at, ctx)])
    }
}

/// Bounce `Type` names by `TypeCode` (Postmark's bounce type table).
const TYPE_CODES: &[(i64, &str)] = &[
    (1, "HardBounce"),
    (2, "Transient"),
    (16, "Unsubscribe"),
    (32, "Subscribe"),
    (64, "AutoResponder"),
    (128, "AddressChange"),
    (256, "DnsError"),
    (512, "SpamNotification"),
    (1024, "OpenRelayTest"),
    (2048, "Unknown"),
    (4096, "SoftBounce"),
    (8192, "VirusNotification"),
    (16384, "ChallengeVerification"),
    (100000, "BadEmailAddress"),
    (100001, "SpamComplaint"),
    (100002, "ManuallyDeactivated"),
    (100003, "Unconfirmed"),
    (100006, "Blocked"),
    (100007, "SMTPApiError"),
    (100008, "InboundError"),
    (100009, "DMARCPolicy"),
    (100010, "TemplateRenderingFailed"),
];

/// A bounce record's `Type` to a SPEC type (see the module table).
fn bounce_type(name: &str) -> Option<(EventType, Option<BounceClass>)> {
    let t = match name {
        "HardBounce" | "BadEmailAddress" => (EventType::Bounced, Some(BounceClass::Hard)),
        // Postmark keeps trying after these: "Transient" is a delay, "DnsError" a temporary
        // DNS failure. Nothing has bounced yet.
        "Transient" | "DnsError" => (EventType::Deferred, None),
        "SoftBounce"
        | "SpamNotification"
        | "Unknown"
        | "VirusNotification"
        | "ChallengeVerification"
        | "Unconfirmed"
        | "Blocked"
        | "DMARCPolicy" => (EventType::Bounced, Some(BounceClass::Soft)),
        "SpamComplaint" => (EventType::Complained, None),
        "Unsubscribe" => (EventType::Unsubscribed, None),
        "ManuallyDeactivated" | "SMTPApiError" | "TemplateRenderingFailed" => {
            (EventType::Dropped, None)
        }
        _ => return None,
    };
    Some(t)
}

/// `SuppressSending` as Postmark sends it (a boolean; a string tolerated).
fn suppress_sending(rec: &Value) -> Option<bool> {
    match rec.get("SuppressSending")? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// What a record is: its SPEC type and class, and the name of its time and recipient fields;
/// `Err(name)` is the event type a dead letter records.
struct Kind {
    event_type: EventType,
    bounce_class: Option<BounceClass>,
    time_field: &'static str,
    recipient_field: &'static str,
}

fn classify(rec: &Value) -> Result<Kind, (String, DeadReason)> {
    let record_type = json_str(rec, "RecordType").unwrap_or("");
    let kind = |event_type, bounce_class, time_field, recipient_field| Kind {
        event_type,
        bounce_class,
        time_field,
        recipient_field,
    };
    match record_type {
        "Delivery" => Ok(kind(EventType::Delivered, None, "DeliveredAt", "Recipient")),
        "Open" => Ok(kind(EventType::Opened, None, "ReceivedAt", "Recipient")),
        "Click" => Ok(kind(EventType::Clicked, None, "ReceivedAt", "Recipient")),
        "SpamComplaint" => Ok(kind(EventType::Complained, None, "BouncedAt", "Email")),
        "Bounce" => {
            let name = json_str(rec, "Type").map(str::to_owned).or_else(|| {
                let code = rec.get("TypeCode").and_then(Value::as_i64)?;
                TYPE_CODES
                    .iter()
                    .find(|(c, _)| *c == code)
                    .map(|(_, n)| (*n).to_owned())
            });
            let name = name.unwrap_or_default();
            bounce_type(&name)
                .map(|(t, c)| kind(t, c, "BouncedAt", "Email"))
                .ok_or_else(|| (format!("Bounce/{name}"), DeadReason::UnknownEventType))
        }
        "SubscriptionChange" => {
            let reason = json_str(rec, "SuppressionReason").unwrap_or("");
            let origin = json_str(rec, "Origin").unwrap_or("");
            match (suppress_sending(rec), reason, origin) {
                // The recipient's own unsubscribe (a link, a List-Unsubscribe).
                (Some(true), "ManualSuppression", "Recipient") => Ok(kind(
                    EventType::Unsubscribed,
                    None,
                    "ChangedAt",
                    "Recipient",
                )),
                // Postmark's suppression after a hard bounce or a complaint, which its Bounce
                // or SpamComplaint record reports; or a suppression by the sender or
                // Postmark, which is not the recipient's choice.
                (Some(true), _, _) => Err((
                    format!("SubscriptionChange/{reason}"),
                    DeadReason::SuppressionNotice,
                )),
                (Some(false), _, _) => Err((
                    "SubscriptionChange/reactivated".into(),
                    DeadReason::UnknownEventType,
                )),
                _ => Err((
                    format!("SubscriptionChange/{reason}"),
                    DeadReason::UnknownEventType,
                )),
            }
        }
        other => Err((other.to_owned(), DeadReason::UnknownEventType)),
    }
}

/// `X-Reachly-Message-Id` from a `Headers` array of `{Name, Value}` (some records carry it).
fn header_id(rec: &Value) -> Option<&str> {
    let headers = rec.get("Headers")?.as_array()?;
    header_message_id(
        headers
            .iter()
            .filter_map(|h| Some((json_str(h, "Name")?, json_str(h, "Value")?))),
    )
}

/// The record to an event or a dead letter. Never fails.
fn map_record(rec: &Value, received_at: DateTime<Utc>, ctx: &ParseContext<'_>) -> Record {
    let raw = rec.to_string();
    facts(rec, &raw).into_record(SOURCE, &raw, received_at, ctx.machine)
}

/// What one Postmark record says.
fn facts<'a>(rec: &'a Value, raw: &str) -> Facts<'a> {
    let record_type = json_str(rec, "RecordType").unwrap_or("");
    let kind = match classify(rec) {
        Ok(k) => k,
        Err((name, reason)) => {
            // Unknown records have no known time field: key the whole record.
            return Facts {
                kind: Some(name.into()),
                unmapped: Some(reason),
                key: Some(content_key(SOURCE, &["dead_letter", raw])),
                ..Facts::default()
            };
        }
    };
    let ts_raw = rec
        .get(kind.time_field)
        .map(Value::to_string)
        .unwrap_or_default();
    let key = content_key(
        SOURCE,
        &[
            record_type,
            json_str(rec, "MessageID").unwrap_or(""),
            &ts_raw,
            json_str(rec, kind.recipient_field).unwrap_or(""),
            json_str(rec, "OriginalLink").unwrap_or(""),
            // Two bounces of one message at one time differ in their type and Postmark's
            // bounce ID; two opens or clicks of one second, in their client.
            json_str(rec, "Type").unwrap_or(""),
            &rec.get("TypeCode")
                .map(Value::to_string)
                .unwrap_or_default(),
            &rec.get("ID").map(Value::to_string).unwrap_or_default(),
            json_str(rec, "UserAgent").unwrap_or(""),
            rec.get("Geo").and_then(|g| json_str(g, "IP")).unwrap_or(""),
        ],
    );
    let metadata_ids = rec.get("Metadata").filter(|m| m.is_object());

    let mut metadata = Metadata::default();
    metadata.keep(
        Some(rec),
        &[
            ("RecordType", "record_type"),
            ("MessageID", "esp_message_id"),
            ("MessageStream", "message_stream"),
            ("ServerID", "server_id"),
            ("Tag", "tag"),
            ("Details", "details"),
            ("Type", "bounce_type"),
            ("TypeCode", "bounce_type_code"),
            ("ID", "bounce_id"),
            ("Inactive", "inactive"),
            ("CanActivate", "can_activate"),
            ("FirstOpen", "first_open"),
            ("Platform", "platform"),
            ("ClickLocation", "click_location"),
            ("Origin", "origin"),
            ("SuppressionReason", "suppression_reason"),
        ],
    );
    metadata.keep(rec.get("Client"), &[("Name", "client_name")]);
    metadata.keep(rec.get("OS"), &[("Name", "os_name")]);
    metadata.keep(rec.get("Geo"), &[("CountryISOCode", "country")]);

    let mut engagement = Engagement::default();
    let mut error = None;
    match kind.event_type {
        EventType::Opened | EventType::Clicked => {
            engagement.ip = rec.get("Geo").and_then(|g| json_str(g, "IP"));
            engagement.user_agent = json_str(rec, "UserAgent");
            engagement.link_url = json_str(rec, "OriginalLink");
        }
        EventType::Bounced | EventType::Dropped => {
            let name = json_str(rec, "Name")
                .or(json_str(rec, "Type"))
                .or(json_str(rec, "SuppressionReason"))
                .unwrap_or("bounce");
            error = Some(
                match json_str(rec, "Details").or(json_str(rec, "Description")) {
                    Some(details) => format!("{name}: {details}"),
                    None => name.to_owned(),
                },
            );
        }
        _ => {}
    }
    Facts {
        kind: Some(record_type.into()),
        mapped: Some((kind.event_type, kind.bounce_class)),
        key: Some(key),
        dead_letter_key: None,
        message_id: metadata_ids
            .and_then(|m| json_str(m, "reachly_message_id"))
            .or_else(|| header_id(rec)),
        organization_id: metadata_ids.and_then(|m| json_str(m, "reachly_organization_id")),
        occurred_at: rec.get(kind.time_field).and_then(json_time),
        engagement,
        error,
        metadata,
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests;
