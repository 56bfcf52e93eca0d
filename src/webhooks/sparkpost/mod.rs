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
//! | `bounce`, `out_of_band` | bounced, hard or soft by `bounce_class`; some classes are unsubscribed, dropped or a dead letter (below) |
//! | `delay` | deferred |
//! | `policy_rejection`, `generation_rejection`, `generation_failure` | dropped |
//! | `spam_complaint` | complained |
//! | `open`, `amp_open` | opened (bottom pixel); dead letter `open_counted_as_initial_open` with `REACHLY_SPARKPOST_INITIAL_OPEN=true` |
//! | `initial_open`, `amp_initial_open` | opened (top pixel) with `REACHLY_SPARKPOST_INITIAL_OPEN=true`; else dead letter `initial_open_not_counted` |
//! | `click`, `amp_click` | clicked (`target_link_url` → `link_url`) |
//! | `list_unsubscribe`, `link_unsubscribe` | unsubscribed |
//! | anything else (`sms_status`, `relay_*`, `ab_test_*`, ...) | dead letter `unknown_event_type` |
//!
//! Bounce classes (SparkPost's table; a wrong hard bounce suppresses a contact forever):
//!
//! | `bounce_class` | outcome |
//! | --- | --- |
//! | 10 Invalid Recipient, 30 Generic Bounce: No RCPT | bounced, hard |
//! | 90 Unsubscribe (an unsubscribe request by mail) | unsubscribed |
//! | 25, 26 Admin Failure (SparkPost's own policy or suppression) | dropped |
//! | 60 Auto-Reply, 80 Subscribe, 100 Challenge-Response | no failure: dead letter `not_a_failure` |
//! | 1 Undetermined, 20-24 Soft, 40 Generic, 50-54 Block, 70 Transient, missing or unknown | bounced, soft |
//!
//! Opens: SparkPost fires `initial_open` when the top pixel loads and `open` when the bottom
//! one does: one human open, two events. Only one of the two counts (like django-anymail's
//! `SPARKPOST_TRACK_INITIAL_OPEN_AS_OPENED`); the other is kept as a dead letter.
//! docs/providers.md says to enable only the counted one at SparkPost.
//!
//! Retries: a batch not answered 200 is retried for 8 hours (`X-MessageSystems-Batch-ID`
//! stays the same). No signature, so no time window: basic auth or a bearer token on every
//! request. Body limit [`MAX_BODY_BYTES`].
//!
//! Dedup key: SparkPost's `event_id` with the event `type` beside it (SparkPost's own samples
//! give every type the same `event_id`). `event_id` is unique per event and the same on
//! every retry of the batch, so a re-delivery is caught and two events never share a key. The ping batch gets 200 and stores
//! nothing. SparkPost echoes no message headers, so only `rcpt_meta`, then `metadata`,
//! correlate.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::auth::{basic_auth_ok, secrets_equal};
use super::extract::{json_body, json_str, json_time};
use super::records::{
    DeadReason, Engagement, EventTable, Facts, Mapped, Metadata, content_key, id_key, lookup,
    malformed,
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
    /// `REACHLY_SPARKPOST_INITIAL_OPEN`: which of SparkPost's two pixels counts as the open.
    count_initial_open: bool,
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
        count_initial_open: cfg.sparkpost_initial_open,
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
                        records.push(map_event(
                            event,
                            req.received_at,
                            ctx,
                            self.count_initial_open,
                        ));
                    }
                }
                None => records.push(malformed(SOURCE, &item.to_string())),
            }
        }
        Ok(records)
    }
}

/// What a bounce's class means (SparkPost's table; see the module doc): a hard or soft
/// bounce, an unsubscribe, a drop, or no failure at all (`Err`, a dead letter).
fn bounce_outcome(ev: &Value) -> Result<Mapped, DeadReason> {
    let code = match ev.get("bounce_class") {
        Some(Value::String(s)) => s.trim().parse::<u32>().ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    match code {
        // Invalid Recipient, Generic Bounce: No RCPT.
        Some(10 | 30) => Ok((EventType::Bounced, Some(BounceClass::Hard))),
        // Unsubscribe: the recipient asked to be removed (by replying).
        Some(90) => Ok((EventType::Unsubscribed, None)),
        // Admin Failure: SparkPost's own policy or suppression refused to send.
        Some(25 | 26) => Ok((EventType::Dropped, None)),
        // Auto-Reply, Subscribe, Challenge-Response: answers, not failures.
        Some(60 | 80 | 100) => Err(DeadReason::NotAFailure),
        _ => Ok((EventType::Bounced, Some(BounceClass::Soft))),
    }
}

/// Whether an open event is the one counted: SparkPost fires `initial_open` (top pixel) and
/// `open` (bottom pixel) for one open, so only one of the two is an event.
fn open_not_counted(kind: &str, count_initial_open: bool) -> Option<DeadReason> {
    match (kind, count_initial_open) {
        ("initial_open" | "amp_initial_open", false) => Some(DeadReason::InitialOpenNotCounted),
        ("open" | "amp_open", true) => Some(DeadReason::OpenCountedAsInitialOpen),
        _ => None,
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
fn map_event(
    ev: &Value,
    received_at: DateTime<Utc>,
    ctx: &ParseContext<'_>,
    count_initial_open: bool,
) -> Record {
    let raw = ev.to_string();
    if !ev.is_object() {
        return malformed(SOURCE, &raw);
    }
    facts(ev, &raw, count_initial_open).into_record(SOURCE, &raw, received_at, ctx.machine)
}

/// What one SparkPost event says.
fn facts<'a>(ev: &'a Value, raw: &str, count_initial_open: bool) -> Facts<'a> {
    let kind = json_str(ev, "type");
    let key = match json_str(ev, "event_id") {
        Some(id) => id_key(SOURCE, &format!("{}:{id}", kind.unwrap_or(""))),
        None => content_key(SOURCE, &["no_event_id", raw]),
    };
    let mut unmapped = kind.and_then(|k| open_not_counted(k, count_initial_open));
    let mut mapped = kind
        .and_then(|k| lookup(EVENTS, k))
        .filter(|_| unmapped.is_none());
    if mapped.is_some_and(|(t, _)| t == EventType::Bounced) {
        match bounce_outcome(ev) {
            Ok(m) => mapped = Some(m),
            Err(reason) => {
                mapped = None;
                unmapped = Some(reason);
            }
        }
    }
    // A bounce reporting an unsubscribe request is a message event: its `ip_address` is the
    // receiving server's, not the recipient's.
    let message_event = matches!(kind, Some("bounce" | "out_of_band"));

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
        Some(EventType::Opened | EventType::Clicked | EventType::Unsubscribed)
            if !message_event =>
        {
            // (On message events `ip_address` is the receiving server's: not copied there.)
            engagement.ip = json_str(ev, "ip_address");
            engagement.user_agent = json_str(ev, "user_agent");
            engagement.link_url = json_str(ev, "target_link_url");
        }
        Some(
            EventType::Bounced | EventType::Deferred | EventType::Dropped | EventType::Unsubscribed,
        ) => {
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
        unmapped,
        key: Some(key),
        dead_letter_key: None,
        message_id: meta(ev, "reachly_message_id"),
        organization_id: meta(ev, "reachly_organization_id"),
        occurred_at: ev.get("timestamp").and_then(json_time),
        engagement,
        error,
        metadata,
    }
}

#[cfg(test)]
mod tests;
