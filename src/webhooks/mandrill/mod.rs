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
//! Mapping: `send` → sent, `delivered` → delivered, `deferral` → deferred, `hard_bounce` →
//! bounced (hard), `soft_bounce` → bounced (soft), `open` → opened, `click` → clicked (`url`),
//! `spam` → complained, `unsub` → unsubscribed, `reject` → dropped. Sync events (`type`
//! `blacklist`/`whitelist`, no `event`) and inbound messages are dead-lettered as
//! `unknown_event_type`: they concern addresses, not a Reachly message, but nothing is dropped.
//! The dedup key hashes `_id`, `event`, `ts` (and the URL of a click, so two links clicked in
//! the same second stay two events).

use std::sync::Arc;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value};
use sha1::Sha1;

use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
    content_key, correlate, dead_letter, esp_event, unix_time,
};
use crate::config::WebhookConfig;
use crate::event::{BounceClass, EventType, Record, Source};

type HmacSha1 = hmac::Hmac<Sha1>;

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

fn str_at<'a>(obj: Option<&'a Map<String, Value>>, field: &str) -> Option<&'a str> {
    obj?.get(field)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A JSON number or numeric string as text, for dedup keys (`ts` is an integer in practice).
fn number_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.trim().to_owned(),
        _ => String::new(),
    }
}

fn event_type(event: &str) -> Option<EventType> {
    Some(match event {
        "send" => EventType::Sent,
        "delivered" => EventType::Delivered,
        "deferral" => EventType::Deferred,
        "hard_bounce" | "soft_bounce" => EventType::Bounced,
        "open" => EventType::Opened,
        "click" => EventType::Clicked,
        "spam" => EventType::Complained,
        "unsub" => EventType::Unsubscribed,
        "reject" => EventType::Dropped,
        _ => return None,
    })
}

fn map_event(item: &Value, req: &WebhookRequest<'_>, ctx: &ParseContext<'_>) -> Record {
    let raw = serde_json::to_string(item).unwrap_or_default();
    let Some(obj) = item.as_object() else {
        return dead_letter(Source::Mandrill, "invalid_event", &raw, None, None);
    };
    let Some(event) = str_at(Some(obj), "event") else {
        // A sync event (allowlist/denylist change) or something newer: not about a message.
        let kind = str_at(Some(obj), "type");
        return dead_letter(Source::Mandrill, "unknown_event_type", &raw, None, kind);
    };
    let id = str_at(Some(obj), "_id").unwrap_or_default();
    let ts = number_text(obj.get("ts"));
    let url = str_at(Some(obj), "url");
    let key = content_key(
        Source::Mandrill,
        &[
            id,
            event,
            &ts,
            if event == "click" {
                url.unwrap_or("")
            } else {
                ""
            },
        ],
    );
    let Some(event_type) = event_type(event) else {
        return dead_letter(
            Source::Mandrill,
            "unknown_event_type",
            &raw,
            Some(key),
            Some(event),
        );
    };
    let msg = obj.get("msg").and_then(Value::as_object);
    let metadata = msg
        .and_then(|m| m.get("metadata"))
        .and_then(Value::as_object);
    let (message_id, org_id) = match correlate(
        str_at(metadata, "reachly_message_id"),
        str_at(metadata, "reachly_organization_id"),
    ) {
        Ok(ids) => ids,
        Err(reason) => {
            return dead_letter(Source::Mandrill, reason, &raw, Some(key), Some(event));
        }
    };
    let occurred_at = obj
        .get("ts")
        .and_then(|v| v.as_f64().or_else(|| v.as_str()?.trim().parse().ok()))
        .and_then(unix_time)
        .unwrap_or(req.received_at);
    let mut e = esp_event(
        Source::Mandrill,
        message_id,
        org_id,
        event_type,
        occurred_at,
        key,
    );
    let meta = &mut e.metadata;
    meta.insert("mandrill_event".into(), Value::from(event));
    if !id.is_empty() {
        meta.insert("mandrill_message_id".into(), Value::from(id));
    }
    if let Some(state) = str_at(msg, "state") {
        meta.insert("mandrill_state".into(), Value::from(state));
    }
    match event {
        "hard_bounce" | "soft_bounce" => {
            e.bounce_class = Some(if event == "hard_bounce" {
                BounceClass::Hard
            } else {
                BounceClass::Soft
            });
            let description = str_at(msg, "bounce_description");
            let diag = str_at(msg, "diag");
            if let Some(d) = description {
                e.metadata
                    .insert("bounce_description".into(), Value::from(d));
            }
            if let Some(d) = diag {
                e.metadata.insert("diagnostic_code".into(), Value::from(d));
            }
            if let Some(code) = msg
                .and_then(|m| m.get("bgtools_code"))
                .filter(|c| c.is_number())
            {
                e.metadata.insert("bgtools_code".into(), code.clone());
            }
            e.error_message = diag
                .or(description)
                .map(str::to_owned)
                .or_else(|| Some(event.replace('_', " ")));
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
            if let Some(d) = diag {
                e.metadata.insert("diagnostic_code".into(), Value::from(d));
            }
            e.error_message = Some(diag.unwrap_or("delivery deferred").to_owned());
        }
        "reject" => {
            let reject = msg.and_then(|m| m.get("reject")).and_then(Value::as_object);
            let reason = str_at(reject, "reason").or_else(|| str_at(msg, "reject_reason"));
            if let Some(r) = reason {
                e.metadata.insert("reason".into(), Value::from(r));
            }
            e.error_message = Some(match reason {
                Some(r) => format!("rejected by Mandrill: {r}"),
                None => "rejected by Mandrill".to_owned(),
            });
        }
        "open" | "click" => {
            e.ip_address = str_at(Some(obj), "ip").map(str::to_owned);
            e.user_agent = str_at(Some(obj), "user_agent").map(str::to_owned);
            e.machine_reason = ctx.machine.classify_reported(e.user_agent.as_deref());
            if event == "click" {
                e.link_url = url.map(str::to_owned);
            }
        }
        _ => {}
    }
    Record::Event(e)
}

#[cfg(test)]
mod tests;
