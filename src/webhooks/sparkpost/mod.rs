//! SparkPost event webhooks, `POST /webhooks/sparkpost`. This module owns authenticating
//! SparkPost's batches (SparkPost does not sign them: it sends the credentials configured on
//! the webhook, HTTP basic auth `REACHLY_SPARKPOST_BASIC_AUTH` or a token
//! `REACHLY_SPARKPOST_TOKEN` as `Authorization: Bearer <token>`; either configured scheme is
//! accepted, compared in constant time) and mapping the batch array of
//! `{"msys": {"<group>_event": {...}}}` objects to SPEC.md's events.
//!
//! Sources:
//! - webhooks, batches, event samples, the `[{"msys":{}}]` validation ping:
//!   <https://developers.sparkpost.com/api/webhooks/>
//! - authentication: <https://www.sparkpost.com/docs/tech-resources/webhook-authentication/>
//! - bounce classes: <https://support.sparkpost.com/docs/deliverability/bounce-classification-codes>
//!
//! The table, in code as [`EVENTS`]:
//!
//! | SparkPost `type` | SPEC type |
//! | --- | --- |
//! | `injection` | sent |
//! | `delivery` | delivered |
//! | `bounce`, `out_of_band` | bounced, class from `bounce_class` (below) |
//! | `delay` | deferred |
//! | `policy_rejection`, `generation_rejection`, `generation_failure` | dropped |
//! | `spam_complaint` | complained |
//! | `open`, `initial_open`, `amp_open`, `amp_initial_open` | opened |
//! | `click`, `amp_click` | clicked (`target_link_url` → `link_url`) |
//! | `list_unsubscribe`, `link_unsubscribe` | unsubscribed |
//! | anything else (`sms_status`, `relay_*`, `ab_test_*`, ...) | dead letter `unknown_event_type` |
//!
//! Bounce class (SparkPost's table): the `Hard` category, 10 Invalid Recipient, 30 Generic
//! Bounce: No RCPT and 90 Unsubscribe, is a hard bounce; every other class (Soft 20-24, 40,
//! 60, 70, 100; Block 50-54; Undetermined 1; Admin 25, 80, which are SparkPost's own policy,
//! not the recipient's address) and a missing or unknown class is soft.
//!
//! Events are keyed on SparkPost's `event_id` with the event `type` beside it (SparkPost's
//! own samples give every type the same `event_id`). The ping batch gets 200 and stores
//! nothing. SparkPost echoes no message headers, so only `rcpt_meta`, then `metadata`,
//! correlate.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::auth::{basic_auth_ok, secrets_equal};
use super::extract::{json_body, json_str, json_time};
use super::records::{
    Engagement, EventTable, Facts, Metadata, content_key, id_key, lookup, malformed,
};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::{Secret, WebhookConfig};
use crate::event::{BounceClass, EventType, Record, Source};

/// Largest body read. Batches of events; SparkPost documents no byte bound.
pub const MAX_BODY_BYTES: usize = 10 << 20;

const SOURCE: Source = Source::Sparkpost;

/// SparkPost's deprecated `auth_token` header (still accepted with the configured token).
pub const LEGACY_TOKEN_HEADER: &str = "x-messagesystems-webhook-token";

/// The SparkPost provider: the configured credentials (at least one).
pub struct SparkPost {
    basic: Option<Secret>,
    token: Option<Secret>,
}

/// The provider if its secret is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    if cfg.sparkpost_basic_auth.is_none() && cfg.sparkpost_token.is_none() {
        return Ok(None);
    }
    if let Some(basic) = &cfg.sparkpost_basic_auth {
        match basic.expose().split_once(':') {
            Some((user, _)) if !user.is_empty() => {}
            _ => return Err("REACHLY_SPARKPOST_BASIC_AUTH must be USER:PASSWORD".into()),
        }
    }
    if let Some(token) = &cfg.sparkpost_token
        && token.expose().trim().is_empty()
    {
        return Err("REACHLY_SPARKPOST_TOKEN must not be blank".into());
    }
    Ok(Some(Arc::new(SparkPost {
        basic: cfg.sparkpost_basic_auth.clone(),
        token: cfg.sparkpost_token.clone(),
    })))
}

impl SparkPost {
    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let authorization = req.headers.get(hyper::header::AUTHORIZATION);
        let legacy = req.headers.get(LEGACY_TOKEN_HEADER);
        if authorization.is_none() && legacy.is_none() {
            return Err(WebhookError::Unauthorized(AuthFailure::MissingCredentials));
        }
        let basic_ok = self
            .basic
            .as_ref()
            .is_some_and(|b| basic_auth_ok(req.headers, b.expose()));
        let token_ok = self.token.as_ref().is_some_and(|t| {
            let expected = t.expose().as_bytes();
            let bearer = authorization
                .map(|v| v.as_bytes())
                .and_then(|v| v.strip_prefix(b"Bearer ").or(v.strip_prefix(b"bearer ")))
                .is_some_and(|given| secrets_equal(given.trim_ascii(), expected));
            let header = legacy.is_some_and(|v| secrets_equal(v.as_bytes().trim_ascii(), expected));
            bearer | header
        });
        if basic_ok || token_ok {
            Ok(())
        } else {
            Err(WebhookError::Unauthorized(AuthFailure::WrongCredentials))
        }
    }
}

impl Provider for SparkPost {
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
        let Value::Array(batch) = body else {
            return Err(WebhookError::BadRequest(
                "expected a JSON array of SparkPost events".into(),
            ));
        };
        let mut records = Vec::with_capacity(batch.len());
        for item in &batch {
            match item.get("msys").and_then(Value::as_object) {
                // One group (message_event, track_event, ...) per element; an empty `msys`
                // is SparkPost's validation ping and holds nothing.
                Some(groups) => {
                    for event in groups.values() {
                        records.push(map_event(event, req.received_at, ctx));
                    }
                }
                None => records.push(malformed(SOURCE, &item.to_string())),
            }
        }
        Ok(records)
    }
}

/// A bounce class to hard or soft (SparkPost's table; see the module doc).
fn bounce_class(ev: &Value) -> BounceClass {
    let code = match ev.get("bounce_class") {
        Some(Value::String(s)) => s.trim().parse::<u32>().ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    match code {
        Some(10 | 30 | 90) => BounceClass::Hard,
        _ => BounceClass::Soft,
    }
}

/// SparkPost's event types (the module table); a bounce's class comes from `bounce_class`.
pub const EVENTS: &EventTable = &[
    ("injection", EventType::Sent, None),
    ("delivery", EventType::Delivered, None),
    ("bounce", EventType::Bounced, None),
    ("out_of_band", EventType::Bounced, None),
    ("delay", EventType::Deferred, None),
    ("policy_rejection", EventType::Dropped, None),
    ("generation_rejection", EventType::Dropped, None),
    ("generation_failure", EventType::Dropped, None),
    ("spam_complaint", EventType::Complained, None),
    ("open", EventType::Opened, None),
    ("initial_open", EventType::Opened, None),
    ("amp_open", EventType::Opened, None),
    ("amp_initial_open", EventType::Opened, None),
    ("click", EventType::Clicked, None),
    ("amp_click", EventType::Clicked, None),
    ("list_unsubscribe", EventType::Unsubscribed, None),
    ("link_unsubscribe", EventType::Unsubscribed, None),
];

/// A Reachly id from `rcpt_meta`, then `metadata`.
fn meta<'a>(ev: &'a Value, key: &str) -> Option<&'a str> {
    ["rcpt_meta", "metadata"]
        .iter()
        .find_map(|m| ev.get(*m).and_then(|m| json_str(m, key)))
}

/// One event object to a record. Never fails: what cannot be mapped is a dead letter.
fn map_event(ev: &Value, received_at: DateTime<Utc>, ctx: &ParseContext<'_>) -> Record {
    let raw = ev.to_string();
    if !ev.is_object() {
        return malformed(SOURCE, &raw);
    }
    facts(ev, &raw).into_record(SOURCE, &raw, received_at, ctx.machine)
}

/// What one SparkPost event says.
fn facts<'a>(ev: &'a Value, raw: &str) -> Facts<'a> {
    let kind = json_str(ev, "type");
    let key = match json_str(ev, "event_id") {
        Some(id) => id_key(SOURCE, &format!("{}:{id}", kind.unwrap_or(""))),
        None => content_key(SOURCE, &["no_event_id", raw]),
    };
    let mapped = kind
        .and_then(|k| lookup(EVENTS, k))
        .map(|(t, class)| match t {
            EventType::Bounced => (t, Some(bounce_class(ev))),
            _ => (t, class),
        });

    let mut metadata = Metadata::default();
    metadata.keep(
        Some(ev),
        &[
            ("type", "sparkpost_type"),
            ("event_id", "event_id"),
            ("message_id", "esp_message_id"),
            ("transmission_id", "transmission_id"),
            ("campaign_id", "campaign_id"),
            ("bounce_class", "bounce_class"),
            ("error_code", "error_code"),
            ("reason", "reason"),
            ("num_retries", "num_retries"),
            ("fbtype", "fbtype"),
            ("target_link_name", "link_name"),
            ("subaccount_id", "subaccount_id"),
        ],
    );
    metadata.keep(ev.get("geo_ip"), &[("country", "country")]);

    let mut engagement = Engagement::default();
    let mut error = None;
    match mapped.map(|(t, _)| t) {
        Some(EventType::Opened | EventType::Clicked | EventType::Unsubscribed) => {
            // (On message events `ip_address` is the receiving server's: not copied there.)
            engagement.ip = json_str(ev, "ip_address");
            engagement.user_agent = json_str(ev, "user_agent");
            engagement.link_url = json_str(ev, "target_link_url");
        }
        Some(EventType::Bounced | EventType::Deferred | EventType::Dropped) => {
            // `reason` is SparkPost's text with addresses masked; `raw_reason` is the fallback.
            let text = json_str(ev, "reason").or(json_str(ev, "raw_reason"));
            error = Some(match (json_str(ev, "error_code"), text) {
                (Some(code), Some(text)) => format!("{code} {text}"),
                (None, Some(text)) => text.to_owned(),
                (Some(code), None) => format!("SMTP {code}"),
                (None, None) => kind.unwrap_or("failed").to_owned(),
            });
        }
        _ => {}
    }
    Facts {
        kind: kind.map(Into::into),
        mapped,
        key: Some(key),
        dead_letter_key: None,
        message_id: meta(ev, "reachly_message_id"),
        organization_id: meta(ev, "reachly_organization_id"),
        occurred_at: ev.get("timestamp").and_then(json_time),
        engagement,
        error,
        metadata,
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests;
