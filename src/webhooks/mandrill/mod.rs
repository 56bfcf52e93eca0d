//! Mandrill (Mailchimp Transactional) webhooks (`POST /webhooks/mandrill`): this module owns
//! the `X-Mandrill-Signature` check (base64 HMAC-SHA1, keyed with the webhook key, over the
//! webhook URL exactly as configured in Mandrill followed by every POST variable's key and
//! value, keys sorted) and the mapping of the form field `mandrill_events` (a JSON array of
//! up to 1,000 events) to SPEC.md's events.
//!
//! Documentation this follows:
//! - <https://mailchimp.com/developer/transactional/guides/track-respond-activity-webhooks/>
//!   ("Authenticating webhook requests"; also
//!   <https://mandrill.zendesk.com/hc/en-us/articles/360039232513-How-to-Authenticate-Webhook-Requests>)
//! - <https://mailchimp.com/developer/transactional/docs/webhooks/> (format, event types,
//!   sync events, the unsigned HEAD that checks a URL before it is saved)
//! - <https://mandrill.zendesk.com/hc/en-us/articles/205583307-Message-Event-Webhook-Format>
//!   (keys of message events: `ts`, `event`, `url`, `ip`, `user_agent`, `msg`)
//!
//! The URL check: the framework answers `HEAD /webhooks/mandrill` with 200 before any
//! verification (Mandrill's HEAD carries no signature); the test batch Mandrill posts when a
//! webhook is saved, `mandrill_events=[]`, is signed and answers 200 with no records.
//!
//! Mapping, in code as [`EVENTS`]:
//!
//! | Mandrill `event` | SPEC type |
//! | --- | --- |
//! | `send` | sent |
//! | `delivered` | delivered |
//! | `deferral` | deferred (the last SMTP attempt's `diag` is the error) |
//! | `hard_bounce` | bounced, hard |
//! | `soft_bounce` | bounced, soft |
//! | `open` | opened |
//! | `click` | clicked (`url` → `link_url`) |
//! | `spam` | complained |
//! | `unsub` | unsubscribed |
//! | `reject` | dropped |
//! | sync events (`type` `blacklist`/`whitelist`, no `event`), inbound, anything else | dead letter `unknown_event_type` |
//!
//! Sync events and inbound messages concern addresses, not a Reachly message, but nothing
//! is dropped: they are dead letters.
//!
//! Dedup key: Mandrill gives no event id, so the key hashes `_id` (the message), `event`,
//! `ts`, the URL of a click, and the client's `ip` and `user_agent`: two links clicked in one
//! second, or two opens of one second by an image proxy and a person (two devices, a scanner
//! and a person), stay two events. A re-delivered batch repeats every field, so it is caught;
//! only two events alike in all of them (one client, one second, one link) merge, and
//! nothing in the payload could tell them apart. The signature has no timestamp, so there is
//! no window; a replayed batch stores nothing new. Mandrill retries failed batches (its
//! documentation gives no schedule). Body limit [`MAX_BODY_BYTES`].
//!
//! Bounce classes: `hard_bounce` → hard, `soft_bounce` → soft (Mandrill's own verdict),
//! `reject` → dropped, `deferral` → deferred.

use std::sync::Arc;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value};
use sha1::Sha1;

use super::extract::{obj_at, str_at, unix_time};
use super::records::{Engagement, EventTable, Facts, Metadata, content_key, lookup, malformed};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::WebhookConfig;
use crate::event::{BounceClass, EventType, Record, Source};

type HmacSha1 = hmac::Hmac<Sha1>;

/// Largest body read. Up to 1,000 events per batch, form-encoded, each with its `msg` object (opens, clicks, SMTP events): Mandrill documents no byte bound.
pub const MAX_BODY_BYTES: usize = 10 << 20;

pub struct Mandrill {
    key: Vec<u8>,
    /// The webhook URL exactly as configured in Mandrill: the first part of the signed string.
    url: String,
}

/// The provider if its secret is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    let Some(key) = &cfg.mandrill_webhook_key else {
        return Ok(None);
    };
    let url = cfg
        .mandrill_webhook_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or("REACHLY_MANDRILL_WEBHOOK_URL is required with REACHLY_MANDRILL_WEBHOOK_KEY (it is part of the signed string)")?;
    Ok(Some(Arc::new(Mandrill {
        key: key.expose().as_bytes().to_vec(),
        url: url.to_owned(),
    })))
}

/// The POST variables, decoded, in the order Mandrill signs them (sorted by key).
fn form_params(body: &[u8]) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> =
        url::form_urlencoded::parse(body).into_owned().collect();
    // Stable: repeated keys keep their order.
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

fn require_form(req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
    match req.header("content-type") {
        None => Ok(()),
        Some(ct)
            if ct
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded") =>
        {
            Ok(())
        }
        Some(ct) => Err(WebhookError::UnsupportedMediaType(format!(
            "expected application/x-www-form-urlencoded, got {ct}"
        ))),
    }
}

impl Mandrill {
    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        require_form(req)?;
        let Some(given) = req.header("x-mandrill-signature").map(str::trim) else {
            return Err(WebhookError::Unauthorized(AuthFailure::MissingSignature));
        };
        let given = base64::engine::general_purpose::STANDARD
            .decode(given)
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadSignature))?;
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(&self.key)
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadKey))?;
        mac.update(self.url.as_bytes());
        for (k, v) in form_params(req.body) {
            mac.update(k.as_bytes());
            mac.update(v.as_bytes());
        }
        mac.verify_slice(&given)
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadSignature))
    }
}

impl Provider for Mandrill {
    fn source(&self) -> Source {
        Source::Mandrill
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
        let mut events = form_params(req.body)
            .into_iter()
            .filter(|(k, _)| k == "mandrill_events")
            .map(|(_, v)| v);
        let (Some(json), None) = (events.next(), events.next()) else {
            return Err(WebhookError::BadRequest(
                "expected exactly one mandrill_events field".into(),
            ));
        };
        let batch: Vec<Value> = serde_json::from_str(&json).map_err(|e| {
            WebhookError::BadRequest(format!("mandrill_events is not a JSON array: {e}"))
        })?;
        Ok(batch.iter().map(|item| map_event(item, req, ctx)).collect())
    }
}

/// A JSON number or numeric string as text, for dedup keys (`ts` is an integer in practice).
fn number_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.trim().to_owned(),
        _ => String::new(),
    }
}

/// Mandrill's message events (the module's mapping).
pub const EVENTS: &EventTable = &[
    ("send", EventType::Sent, None),
    ("delivered", EventType::Delivered, None),
    ("deferral", EventType::Deferred, None),
    ("hard_bounce", EventType::Bounced, Some(BounceClass::Hard)),
    ("soft_bounce", EventType::Bounced, Some(BounceClass::Soft)),
    ("open", EventType::Opened, None),
    ("click", EventType::Clicked, None),
    ("spam", EventType::Complained, None),
    ("unsub", EventType::Unsubscribed, None),
    ("reject", EventType::Dropped, None),
];

fn map_event(item: &Value, req: &WebhookRequest<'_>, ctx: &ParseContext<'_>) -> Record {
    let raw = serde_json::to_string(item).unwrap_or_default();
    let Some(obj) = item.as_object() else {
        return malformed(Source::Mandrill, &raw);
    };
    facts(obj).into_record(Source::Mandrill, &raw, req.received_at, ctx.machine)
}

/// What one Mandrill event says.
fn facts(obj: &Map<String, Value>) -> Facts<'_> {
    let Some(event) = str_at(Some(obj), "event") else {
        // A sync event (allowlist/denylist change) or something newer: not about a message.
        return Facts {
            kind: str_at(Some(obj), "type").map(Into::into),
            ..Facts::default()
        };
    };
    let id = str_at(Some(obj), "_id").unwrap_or_default();
    let ts = number_text(obj.get("ts"));
    let url = str_at(Some(obj), "url");
    let click_url = if event == "click" { url } else { None };
    // Two opens or clicks of one message in one second (an image proxy and a person, two
    // devices, a scanner and a person) differ only in their client: part of the key.
    let key = content_key(
        Source::Mandrill,
        &[
            id,
            event,
            &ts,
            click_url.unwrap_or(""),
            str_at(Some(obj), "ip").unwrap_or(""),
            str_at(Some(obj), "user_agent").unwrap_or(""),
        ],
    );
    let msg = obj_at(Some(obj), "msg");
    let ids = obj_at(msg, "metadata");

    let mut metadata = Metadata::default();
    metadata.text("mandrill_event", Some(event));
    metadata.text("mandrill_message_id", Some(id));
    metadata.text("mandrill_state", str_at(msg, "state"));
    let mut engagement = Engagement::default();
    let mut error = None;
    match event {
        "hard_bounce" | "soft_bounce" => {
            let description = str_at(msg, "bounce_description");
            let diag = str_at(msg, "diag");
            metadata.text("bounce_description", description);
            metadata.text("diagnostic_code", diag);
            if let Some(code) = msg
                .and_then(|m| m.get("bgtools_code"))
                .filter(|c| c.is_number())
            {
                metadata.value("bgtools_code", code.clone());
            }
            error = Some(
                diag.or(description)
                    .map_or_else(|| event.replace('_', " "), str::to_owned),
            );
        }
        "deferral" => {
            // The latest SMTP attempt says why.
            let diag = msg
                .and_then(|m| m.get("smtp_events"))
                .and_then(Value::as_array)
                .and_then(|attempts| {
                    attempts
                        .iter()
                        .rev()
                        .find_map(|a| str_at(a.as_object(), "diag"))
                });
            metadata.text("diagnostic_code", diag);
            error = Some(diag.unwrap_or("delivery deferred").to_owned());
        }
        "reject" => {
            let reason =
                str_at(obj_at(msg, "reject"), "reason").or_else(|| str_at(msg, "reject_reason"));
            metadata.text("reason", reason);
            error = Some(match reason {
                Some(r) => format!("rejected by Mandrill: {r}"),
                None => "rejected by Mandrill".to_owned(),
            });
        }
        "open" | "click" => {
            engagement.ip = str_at(Some(obj), "ip");
            engagement.user_agent = str_at(Some(obj), "user_agent");
            engagement.link_url = url;
        }
        _ => {}
    }
    Facts {
        kind: Some(event.into()),
        mapped: lookup(EVENTS, event),
        key: Some(key),
        dead_letter_key: None,
        message_id: str_at(ids, "reachly_message_id"),
        organization_id: str_at(ids, "reachly_organization_id"),
        occurred_at: obj
            .get("ts")
            .and_then(|v| v.as_f64().or_else(|| v.as_str()?.trim().parse().ok()))
            .and_then(unix_time),
        engagement,
        error,
        metadata,
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests;
