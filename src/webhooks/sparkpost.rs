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
use serde_json::{Map, Value};

use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
    basic_auth_ok, content_key, correlate, dead_letter, esp_event, id_key, json_body, json_str,
    json_time, keep_fields, secrets_equal,
};
use crate::config::{Secret, WebhookConfig};
use crate::event::{BounceClass, EventType, Record, Source};

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
                None => records.push(dead_letter(
                    SOURCE,
                    "malformed_event",
                    &item.to_string(),
                    None,
                    None,
                )),
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

fn map_type(kind: &str, ev: &Value) -> Option<(EventType, Option<BounceClass>)> {
    let t = match kind {
        "injection" => (EventType::Sent, None),
        "delivery" => (EventType::Delivered, None),
        "bounce" | "out_of_band" => (EventType::Bounced, Some(bounce_class(ev))),
        "delay" => (EventType::Deferred, None),
        "policy_rejection" | "generation_rejection" | "generation_failure" => {
            (EventType::Dropped, None)
        }
        "spam_complaint" => (EventType::Complained, None),
        "open" | "initial_open" | "amp_open" | "amp_initial_open" => (EventType::Opened, None),
        "click" | "amp_click" => (EventType::Clicked, None),
        "list_unsubscribe" | "link_unsubscribe" => (EventType::Unsubscribed, None),
        _ => return None,
    };
    Some(t)
}

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
        return dead_letter(SOURCE, "malformed_event", &raw, None, None);
    }
    let kind = json_str(ev, "type");
    let key = match json_str(ev, "event_id") {
        Some(id) => id_key(SOURCE, &format!("{}:{id}", kind.unwrap_or(""))),
        None => content_key(SOURCE, &["no_event_id", &raw]),
    };
    let Some((event_type, class)) = kind.and_then(|k| map_type(k, ev)) else {
        return dead_letter(SOURCE, "unknown_event_type", &raw, Some(key), kind);
    };
    let (message_id, organization_id) = match correlate(
        meta(ev, "reachly_message_id"),
        meta(ev, "reachly_organization_id"),
    ) {
        Ok(ids) => ids,
        Err(reason) => return dead_letter(SOURCE, reason, &raw, Some(key), kind),
    };
    let occurred_at = ev
        .get("timestamp")
        .and_then(json_time)
        .unwrap_or(received_at);
    let mut e = esp_event(
        SOURCE,
        message_id,
        organization_id,
        event_type,
        occurred_at,
        key,
    );
    e.bounce_class = class;

    let mut metadata = Map::new();
    keep_fields(
        &mut metadata,
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
    keep_fields(&mut metadata, ev.get("geo_ip"), &[("country", "country")]);

    match event_type {
        EventType::Opened | EventType::Clicked | EventType::Unsubscribed => {
            // As SparkPost reports it; the webhook handler then applies REACHLY_IP_MODE
            // (`apply_ip_mode`), as for our own endpoints. (On message events `ip_address` is the
            // receiving server's, so it is not copied there.)
            e.ip_address = json_str(ev, "ip_address").map(str::to_owned);
            e.user_agent = json_str(ev, "user_agent").map(str::to_owned);
            if event_type == EventType::Clicked {
                e.link_url = json_str(ev, "target_link_url").map(str::to_owned);
            }
            if event_type != EventType::Unsubscribed {
                e.machine_reason = ctx.machine.classify_reported(e.user_agent.as_deref());
            }
        }
        EventType::Bounced | EventType::Deferred | EventType::Dropped => {
            // `reason` is SparkPost's text with addresses masked; `raw_reason` is the fallback.
            let text = json_str(ev, "reason").or(json_str(ev, "raw_reason"));
            e.error_message = Some(match (json_str(ev, "error_code"), text) {
                (Some(code), Some(text)) => format!("{code} {text}"),
                (None, Some(text)) => text.to_owned(),
                (Some(code), None) => format!("SMTP {code}"),
                (None, None) => kind.unwrap_or("failed").to_owned(),
            });
        }
        _ => {}
    }
    e.metadata = metadata;
    Record::Event(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::webhooks::testing::*;
    use base64::Engine as _;

    const BASIC: &str = "sparkpost:hook-password";
    const TOKEN: &str = "d2a9b8f7e6c5d4e3f2a1b0c9d8e7f6a5";

    fn provider(basic: Option<&str>, token: Option<&str>) -> Arc<dyn Provider> {
        let mut cfg = no_secrets();
        cfg.sparkpost_basic_auth = basic.map(Secret::new);
        cfg.sparkpost_token = token.map(Secret::new);
        from_config(&cfg, &no_network())
            .expect("valid")
            .expect("configured")
    }

    fn basic(credentials: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    fn authed(body: impl Into<Vec<u8>>) -> TestRequest {
        TestRequest::post("sparkpost", body).header("authorization", &basic(BASIC))
    }

    const SAMPLE_TIME: &str = "2016-04-18T14:25:07Z";
    const EVENT_ID: &str = "92356927693813856";

    fn check(e: &Event, typ: EventType, sparkpost_type: &str, msg: &str) {
        assert_eq!(e.event_type, typ, "{e:?}");
        assert_eq!(e.message_id.to_string(), msg, "{sparkpost_type}");
        assert_eq!(
            e.claimed_organization_id.map(|o| o.to_string()).as_deref(),
            Some(ORG)
        );
        assert_eq!(e.occurred_at, t(SAMPLE_TIME));
        assert_eq!(
            e.dedup_key.as_deref(),
            Some(id_key(SOURCE, &format!("{sparkpost_type}:{EVENT_ID}")).as_str())
        );
        assert_eq!(e.metadata["sparkpost_type"], sparkpost_type);
        // Generation events happen before there is a message id.
        let esp_id = e.metadata.get("esp_message_id").and_then(Value::as_str);
        if sparkpost_type.starts_with("generation_") {
            assert_eq!(esp_id, None);
        } else {
            assert_eq!(esp_id, Some("000443ee14578172be22"));
        }
        assert_eq!(e.source, Source::Sparkpost);
    }

    #[tokio::test]
    async fn documented_samples_map_to_exactly_these_records() {
        let p = provider(Some(BASIC), None);
        let records = run(&*p, &authed(fixture("sparkpost/batch.json")))
            .await
            .expect("accepted");
        assert_eq!(records.len(), 15);
        let ev = events(&records);
        let dl = dead_letters(&records);
        assert_eq!(ev.len(), 14);
        assert_eq!(dl.len(), 1);

        // In the samples' order: bounce, delivery, injection, (sms_status), spam_complaint,
        // out_of_band, policy_rejection, delay, click, open, initial_open,
        // generation_failure, generation_rejection, list_unsubscribe, link_unsubscribe.
        let blacklist = "554 MAIL REFUSED - IP (a.b.c.d) is in black list";
        check(ev[0], EventType::Bounced, "bounce", M_SOFT);
        assert_eq!(ev[0].bounce_class, Some(BounceClass::Soft)); // class 1, Undetermined
        assert_eq!(ev[0].error_message.as_deref(), Some(blacklist));
        assert_eq!(ev[0].ip_address, None);
        check(ev[1], EventType::Delivered, "delivery", M_ENGAGED);
        check(ev[2], EventType::Sent, "injection", M_ENGAGED);
        check(ev[3], EventType::Complained, "spam_complaint", M_COMPLAINT);
        assert_eq!(ev[3].metadata["fbtype"], "abuse");
        check(ev[4], EventType::Bounced, "out_of_band", M_SOFT);
        assert_eq!(ev[4].bounce_class, Some(BounceClass::Soft));
        check(ev[5], EventType::Dropped, "policy_rejection", M_DROPPED);
        assert_eq!(ev[5].error_message.as_deref(), Some(blacklist));
        assert_eq!(ev[5].metadata["bounce_class"], "25");
        check(ev[6], EventType::Deferred, "delay", M_SOFT);
        assert_eq!(ev[6].error_message.as_deref(), Some(blacklist));
        check(ev[7], EventType::Clicked, "click", M_ENGAGED);
        assert_eq!(ev[7].link_url.as_deref(), Some("http://example.com"));
        assert_eq!(ev[7].ip_address.as_deref(), Some("127.0.0.1"));
        assert!(
            ev[7]
                .user_agent
                .as_deref()
                .is_some_and(|u| u.contains("Chrome/41"))
        );
        assert_eq!(ev[7].machine_reason, None);
        assert_eq!(ev[7].metadata["country"], "US");
        check(ev[8], EventType::Opened, "open", M_ENGAGED);
        check(ev[9], EventType::Opened, "initial_open", M_ENGAGED);
        check(ev[10], EventType::Dropped, "generation_failure", M_DROPPED);
        check(
            ev[11],
            EventType::Dropped,
            "generation_rejection",
            M_DROPPED,
        );
        check(ev[12], EventType::Unsubscribed, "list_unsubscribe", M_UNSUB);
        check(ev[13], EventType::Unsubscribed, "link_unsubscribe", M_UNSUB);

        assert_eq!(dl[0].reason, "unknown_event_type");
        assert_eq!(dl[0].event_type.as_deref(), Some("sms_status"));
        let doc: Value = serde_json::from_slice(&fixture("sparkpost/batch.json")).expect("json");
        assert_eq!(dl[0].payload, doc[3]["msys"]["message_event"].to_string());
    }

    #[tokio::test]
    async fn the_validation_ping_is_accepted_and_stores_nothing() {
        let p = provider(Some(BASIC), None);
        assert_eq!(
            run(&*p, &authed(fixture("sparkpost/ping.json"))).await,
            Ok(vec![])
        );
    }

    #[test]
    fn bounce_classes_follow_sparkposts_table_and_amp_and_unix_times_map() {
        let machine = crate::machine::MachineDetector::default();
        let ctx = ParseContext { machine: &machine };
        let with = |kind: &str, extra: Value| {
            let mut ev = serde_json::json!({"type": kind, "event_id": "1", "timestamp": "1460989507",
                "rcpt_meta": {"reachly_message_id": M_HARD}});
            if let (Some(e), Some(x)) = (ev.as_object_mut(), extra.as_object()) {
                for (k, v) in x {
                    e.insert(k.clone(), v.clone());
                }
            }
            match map_event(&ev, Utc::now(), &ctx) {
                Record::Event(e) => e,
                Record::DeadLetter(d) => panic!("{d:?}"),
            }
        };
        for (class, want) in [
            ("10", BounceClass::Hard),
            ("30", BounceClass::Hard),
            ("90", BounceClass::Hard),
            ("1", BounceClass::Soft),
            ("20", BounceClass::Soft),
            ("22", BounceClass::Soft),
            ("25", BounceClass::Soft),
            ("40", BounceClass::Soft),
            ("50", BounceClass::Soft),
            ("54", BounceClass::Soft),
            ("70", BounceClass::Soft),
            ("100", BounceClass::Soft),
            ("bogus", BounceClass::Soft),
        ] {
            let e = with("bounce", serde_json::json!({"bounce_class": class}));
            assert_eq!(e.bounce_class, Some(want), "class {class}");
        }
        assert_eq!(
            with("out_of_band", serde_json::json!({"bounce_class": 10})).bounce_class,
            Some(BounceClass::Hard)
        );
        // Real webhooks carry unix seconds as a string.
        let e = with("amp_open", serde_json::json!({}));
        assert_eq!(
            (e.event_type, e.occurred_at),
            (EventType::Opened, t("2016-04-18T14:25:07Z"))
        );
        let e = with(
            "amp_click",
            serde_json::json!({"target_link_url": "https://x.example/", "user_agent": "python-requests/2.31"}),
        );
        assert_eq!(e.event_type, EventType::Clicked);
        assert_eq!(e.link_url.as_deref(), Some("https://x.example/"));
        assert_eq!(
            e.machine_reason.as_deref(),
            Some("user_agent:python-requests")
        );
        assert_eq!(
            with("amp_initial_open", serde_json::json!({})).event_type,
            EventType::Opened
        );
        // `metadata` correlates when `rcpt_meta` has no id.
        let e = with(
            "delivery",
            serde_json::json!({"rcpt_meta": {}, "metadata": {"reachly_message_id": M_ENGAGED, "reachly_organization_id": ORG}}),
        );
        assert_eq!(e.message_id.to_string(), M_ENGAGED);
        assert_eq!(
            e.claimed_organization_id.map(|o| o.to_string()).as_deref(),
            Some(ORG)
        );
    }

    #[tokio::test]
    async fn malformed_elements_and_uncorrelated_events_are_dead_letters() {
        let p = provider(Some(BASIC), None);
        let body = serde_json::json!([
            {"msys": {}},
            {"not_msys": 1},
            7,
            {"msys": {"message_event": "text"}},
            {"msys": {"relay_event": {"type": "relay_injection", "event_id": "r1"}}},
            {"msys": {"message_event": {"type": "delivery", "event_id": "d1", "rcpt_meta": {"customKey": "customValue"}}}}
        ]);
        let records = run(&*p, &authed(body.to_string())).await.expect("accepted");
        let reasons: Vec<_> = dead_letters(&records)
            .iter()
            .map(|d| d.reason.clone())
            .collect();
        assert_eq!(
            reasons,
            [
                "malformed_event",
                "malformed_event",
                "malformed_event",
                "unknown_event_type",
                "no_message_id"
            ]
        );
        assert_eq!(
            dead_letters(&records)[4].dedup_key.as_deref(),
            Some(id_key(SOURCE, "delivery:d1").as_str())
        );
    }

    #[tokio::test]
    async fn basic_auth_bearer_token_or_legacy_token_header_and_nothing_else() {
        let body = fixture("sparkpost/ping.json");
        let both = provider(Some(BASIC), Some(TOKEN));
        let basic_only = provider(Some(BASIC), None);
        let token_only = provider(None, Some(TOKEN));
        let req = |auth: Option<(&str, String)>| {
            let r = TestRequest::post("sparkpost", body.clone());
            match auth {
                Some((h, v)) => r.header(h, &v),
                None => r,
            }
        };
        let good_basic = || Some(("authorization", basic(BASIC)));
        let good_bearer = || Some(("authorization", format!("Bearer {TOKEN}")));
        let good_legacy = || Some((LEGACY_TOKEN_HEADER, TOKEN.to_owned()));
        for (p, auth, ok) in [
            (&both, good_basic(), true),
            (&both, good_bearer(), true),
            (&both, good_legacy(), true),
            (&basic_only, good_basic(), true),
            (&basic_only, good_bearer(), false),
            (&token_only, good_bearer(), true),
            (&token_only, good_basic(), false),
            (
                &both,
                Some(("authorization", basic("sparkpost:wrong"))),
                false,
            ),
            (
                &both,
                Some(("authorization", format!("Bearer {TOKEN}x"))),
                false,
            ),
            (&both, Some(("authorization", "Bearer ".to_owned())), false),
            (&both, Some(("authorization", TOKEN.to_owned())), false),
            (&both, Some((LEGACY_TOKEN_HEADER, "nope".to_owned())), false),
            (&both, None, false),
        ] {
            let result = run(&**p, &req(auth.clone())).await;
            if ok {
                assert!(result.is_ok(), "{auth:?}");
            } else {
                assert!(
                    matches!(result, Err(WebhookError::Unauthorized(_))),
                    "{auth:?}: {result:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn bad_bodies_get_the_right_error() {
        let p = provider(None, Some(TOKEN));
        let bearer = format!("Bearer {TOKEN}");
        for body in [&b""[..], b"[", b"{\"msys\":{}}", b"null"] {
            let req =
                TestRequest::post("sparkpost", body.to_vec()).header("authorization", &bearer);
            assert!(
                matches!(run(&*p, &req).await, Err(WebhookError::BadRequest(_))),
                "{body:?}"
            );
        }
        let req = TestRequest::post("sparkpost", b"[]".to_vec())
            .header("authorization", &bearer)
            .header("content-type", "application/xml");
        assert!(matches!(
            run(&*p, &req).await,
            Err(WebhookError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn from_config_takes_either_secret_and_refuses_malformed_ones() {
        assert!(
            from_config(&no_secrets(), &no_network())
                .expect("ok")
                .is_none()
        );
        let mut cfg = no_secrets();
        cfg.sparkpost_basic_auth = Some(Secret::new("no-colon"));
        assert!(
            from_config(&cfg, &no_network())
                .err()
                .is_some_and(|e| e.contains("REACHLY_SPARKPOST_BASIC_AUTH"))
        );
        let mut cfg = no_secrets();
        cfg.sparkpost_token = Some(Secret::new("  "));
        assert!(
            from_config(&cfg, &no_network())
                .err()
                .is_some_and(|e| e.contains("REACHLY_SPARKPOST_TOKEN"))
        );
    }
}
