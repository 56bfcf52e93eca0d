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
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::event::Event;
    use crate::webhooks::testing::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::elliptic_curve::Generate;
    use p256::pkcs8::EncodePublicKey;

    /// A fresh key pair: the signing key and the public key as SendGrid shows it.
    fn keypair() -> (SigningKey, String) {
        let sk = SigningKey::generate();
        let der = sk
            .verifying_key()
            .to_public_key_der()
            .expect("DER encoding of a P-256 key");
        (sk, STANDARD.encode(der.as_bytes()))
    }

    fn sign(sk: &SigningKey, timestamp: &str, body: &[u8]) -> String {
        let mut msg = timestamp.as_bytes().to_vec();
        msg.extend_from_slice(body);
        let sig: Signature = sk.sign(&msg);
        STANDARD.encode(sig.to_der().as_bytes())
    }

    fn provider(public_key_b64: &str) -> Arc<dyn Provider> {
        let mut cfg = no_secrets();
        cfg.sendgrid_public_key = Some(Secret::new(public_key_b64));
        from_config(&cfg, &no_network())
            .expect("valid key")
            .expect("configured")
    }

    /// A request signed now with `sk`.
    fn signed(sk: &SigningKey, body: &[u8]) -> TestRequest {
        let now = Utc::now();
        let ts = now.timestamp().to_string();
        TestRequest::post("sendgrid", body.to_vec())
            .at(now)
            .header(TIMESTAMP_HEADER, &ts)
            .header(SIGNATURE_HEADER, &sign(sk, &ts, body))
    }

    fn key_of(message: &str, event: &str, typ: &str, ts: &str, url: &str, sg_msg: &str) -> String {
        content_key(SOURCE, &[message, event, typ, ts, url, sg_msg])
    }

    const SG_MSG: &str = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0";

    #[tokio::test]
    async fn documented_events_map_to_exactly_these_records() {
        let (sk, pk) = keypair();
        let body = fixture("sendgrid/events.json");
        let records = run(&*provider(&pk), &signed(&sk, &body))
            .await
            .expect("signed fixture accepted");
        assert_eq!(records.len(), 14);
        let ev = events(&records);
        let dl = dead_letters(&records);
        assert_eq!(ev.len(), 11);
        assert_eq!(dl.len(), 3);

        let ts = t("2017-12-15T00:59:29Z"); // 1513299569
        let expect = |e: &Event, typ: EventType, msg: &str, at: DateTime<Utc>| {
            assert_eq!(e.event_type, typ, "{e:?}");
            assert_eq!(e.message_id.to_string(), msg, "{e:?}");
            assert_eq!(
                e.claimed_organization_id.map(|o| o.to_string()).as_deref(),
                Some(ORG)
            );
            assert_eq!(e.occurred_at, at, "{e:?}");
            assert_eq!(e.source, Source::Sendgrid);
        };
        // processed
        expect(ev[0], EventType::Sent, M_ENGAGED, ts);
        assert_eq!(
            ev[0].dedup_key.as_deref(),
            Some(
                key_of(
                    M_ENGAGED,
                    "processed",
                    "",
                    "1513299569",
                    "",
                    "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000"
                )
                .as_str()
            )
        );
        assert_eq!(ev[0].metadata["sg_event_id"], "rbtnWrG1DVDGGGFHFyun0A==");
        // deferred (the example's sg_message_id has a leading space: trimmed)
        expect(ev[1], EventType::Deferred, M_SOFT, ts);
        assert_eq!(ev[1].error_message.as_deref(), Some("400 try again later"));
        assert_eq!(ev[1].metadata["attempt"], "5");
        assert_eq!(ev[1].metadata["esp_message_id"], SG_MSG);
        assert_eq!(
            ev[1].dedup_key.as_deref(),
            Some(key_of(M_SOFT, "deferred", "", "1513299569", "", SG_MSG).as_str())
        );
        // delivered
        expect(ev[2], EventType::Delivered, M_ENGAGED, ts);
        assert_eq!(ev[2].metadata["response"], "250 OK");
        assert!(ev[2].error_message.is_none());
        // open: a person (sg_machine_open false, browser user agent)
        expect(ev[3], EventType::Opened, M_ENGAGED, ts);
        assert_eq!(ev[3].ip_address.as_deref(), Some("255.255.255.255"));
        assert!(
            ev[3]
                .user_agent
                .as_deref()
                .is_some_and(|u| u.starts_with("Mozilla/4.0"))
        );
        assert_eq!(ev[3].machine_reason, None);
        assert_eq!(ev[3].metadata["sg_machine_open"], false);
        // click
        expect(
            ev[4],
            EventType::Clicked,
            M_ENGAGED,
            t("2009-08-11T00:00:00Z"),
        );
        assert_eq!(
            ev[4].link_url.as_deref(),
            Some("http://example.com/blog/news.html")
        );
        assert_eq!(ev[4].machine_reason, None);
        assert_eq!(
            ev[4].dedup_key.as_deref(),
            Some(
                key_of(
                    M_ENGAGED,
                    "click",
                    "",
                    "1249948800",
                    "http://example.com/blog/news.html",
                    "sendgrid_internal_message_id"
                )
                .as_str()
            )
        );
        // bounce type=bounce: hard
        expect(ev[5], EventType::Bounced, M_HARD, ts);
        assert_eq!(ev[5].bounce_class, Some(BounceClass::Hard));
        assert_eq!(
            ev[5].error_message.as_deref(),
            Some("500 unknown recipient (status 5.0.0)")
        );
        assert_eq!(ev[5].metadata["bounce_classification"], "Invalid Address");
        assert_eq!(ev[5].metadata["bounce_type"], "bounce");
        // bounce type=blocked: soft, and a key of its own
        expect(ev[6], EventType::Bounced, M_SOFT, ts);
        assert_eq!(ev[6].bounce_class, Some(BounceClass::Soft));
        assert_eq!(ev[6].metadata["bounce_type"], "blocked");
        assert_ne!(ev[5].dedup_key, ev[6].dedup_key);
        // dropped
        expect(ev[7], EventType::Dropped, M_DROPPED, ts);
        assert_eq!(
            ev[7].error_message.as_deref(),
            Some("Bounced Address (status 5.0.0)")
        );
        // spamreport, unsubscribe, group_unsubscribe
        expect(ev[8], EventType::Complained, M_COMPLAINT, ts);
        expect(ev[9], EventType::Unsubscribed, M_UNSUB, ts);
        expect(ev[10], EventType::Unsubscribed, M_UNSUB, ts);
        assert_eq!(ev[10].metadata["asm_group_id"], 10);
        assert_eq!(ev[10].metadata["url"], "http://www.example.com/");
        assert!(ev[10].link_url.is_none());

        // Dead letters: group_resubscribe, the account event, the uncorrelated open.
        assert_eq!(dl[0].reason, "unknown_event_type");
        assert_eq!(dl[0].event_type.as_deref(), Some("group_resubscribe"));
        assert_eq!(dl[1].reason, "unknown_event_type");
        assert_eq!(dl[1].event_type.as_deref(), Some("account_status_change"));
        assert_eq!(dl[2].reason, "no_message_id");
        assert_eq!(dl[2].event_type.as_deref(), Some("open"));
        let doc: Value = serde_json::from_slice(&body).expect("fixture is JSON");
        assert_eq!(dl[2].payload, doc[13].to_string());
        for d in &dl {
            assert!(
                d.dedup_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with("sendgrid:h:"))
            );
        }

        // Every key is distinct: nothing in the batch collapses into another.
        let mut keys: Vec<_> = ev.iter().filter_map(|e| e.dedup_key.clone()).collect();
        keys.extend(dl.iter().filter_map(|d| d.dedup_key.clone()));
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }

    #[tokio::test]
    async fn a_resent_event_with_a_new_sg_event_id_keeps_its_key() {
        let (sk, pk) = keypair();
        let p = provider(&pk);
        let body = fixture("sendgrid/events.json");
        let mut doc: Value = serde_json::from_slice(&body).expect("fixture is JSON");
        let first = run(&*p, &signed(&sk, &body)).await.expect("accepted");
        for (i, ev) in doc.as_array_mut().expect("array").iter_mut().enumerate() {
            ev["sg_event_id"] = Value::from(format!("resent-{i}"));
        }
        let resent = serde_json::to_vec(&doc).expect("serializable");
        let second = run(&*p, &signed(&sk, &resent)).await.expect("accepted");
        let keys = |r: &[Record]| -> Vec<Option<String>> {
            r.iter()
                .map(|r| match r {
                    Record::Event(e) => e.dedup_key.clone(),
                    Record::DeadLetter(d) => d.dedup_key.clone(),
                })
                .collect()
        };
        assert_eq!(keys(&first), keys(&second));
        assert_ne!(events(&first)[0].metadata, events(&second)[0].metadata);
    }

    #[tokio::test]
    async fn sendgrid_machine_open_and_scanner_user_agents_are_flagged() {
        let (sk, pk) = keypair();
        let body = serde_json::json!([
            {"event": "open", "timestamp": 1700000000, "sg_machine_open": true,
             "useragent": "Mozilla/5.0", "reachly_message_id": M_ENGAGED},
            {"event": "click", "timestamp": 1700000001, "url": "https://example.com/a",
             "useragent": "Mozilla/5.0 (compatible; Barracuda Sentinel)", "reachly_message_id": M_ENGAGED},
            {"event": "open", "timestamp": 1700000002, "reachly_message_id": M_ENGAGED}
        ])
        .to_string();
        let records = run(&*provider(&pk), &signed(&sk, body.as_bytes()))
            .await
            .expect("accepted");
        let ev = events(&records);
        assert_eq!(
            ev[0].machine_reason.as_deref(),
            Some("sendgrid_machine_open")
        );
        assert_eq!(
            ev[1].machine_reason.as_deref(),
            Some("user_agent:barracuda")
        );
        // No user agent reported says nothing either way.
        assert_eq!(ev[2].machine_reason, None);
        assert_eq!(ev[2].claimed_organization_id, None);
    }

    #[tokio::test]
    async fn malformed_elements_and_bad_ids_are_dead_letters_not_errors() {
        let (sk, pk) = keypair();
        let body = serde_json::json!([
            42,
            {"timestamp": 1700000000},
            {"event": "delivered", "timestamp": 1700000000, "reachly_message_id": "not-a-uuid"},
            {"event": "delivered", "timestamp": 1700000000, "reachly_message_id": M_ENGAGED,
             "reachly_organization_id": "nope"},
            {"event": "delivered", "timestamp": "garbage", "reachly_message_id": M_ENGAGED}
        ])
        .to_string();
        let req = signed(&sk, body.as_bytes());
        let records = run(&*provider(&pk), &req).await.expect("accepted");
        let dl = dead_letters(&records);
        let reasons: Vec<_> = dl.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "malformed_event",
                "unknown_event_type",
                "invalid_message_id",
                "invalid_organization_id"
            ]
        );
        // An unreadable event time falls back to the arrival time (SPEC).
        let ev = events(&records);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].occurred_at, req.received_at);
    }

    #[tokio::test]
    async fn a_thousand_event_batch_parses_in_full() {
        let (sk, pk) = keypair();
        let batch: Vec<Value> = (0..1000)
            .map(|i| {
                serde_json::json!({
                    "email": format!("r{i}@example.com"), "timestamp": 1700000000 + i,
                    "event": if i % 2 == 0 { "delivered" } else { "open" },
                    "sg_event_id": format!("ev{i}"), "sg_message_id": format!("m{i}"),
                    "reachly_message_id": M_ENGAGED, "reachly_organization_id": ORG
                })
            })
            .collect();
        let body = serde_json::to_vec(&batch).expect("serializable");
        let records = run(&*provider(&pk), &signed(&sk, &body))
            .await
            .expect("accepted");
        assert_eq!(records.len(), 1000);
        assert_eq!(events(&records).len(), 1000);
        let mut keys: Vec<_> = events(&records)
            .iter()
            .filter_map(|e| e.dedup_key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 1000);
    }

    #[tokio::test]
    async fn tampered_body_wrong_key_missing_headers_and_stale_time_are_unauthorized() {
        let (sk, pk) = keypair();
        let p = provider(&pk);
        let body = fixture("sendgrid/events.json");
        let good = signed(&sk, &body);
        assert!(run(&*p, &good).await.is_ok());

        // One byte of the body changed after signing.
        let mut tampered = signed(&sk, &body);
        if let Some(b) = tampered.body.iter_mut().find(|b| **b == b'5') {
            *b = b'6';
        }
        assert!(matches!(
            run(&*p, &tampered).await,
            Err(WebhookError::Unauthorized(_))
        ));

        // Signed by another key.
        let (other, _) = keypair();
        let wrong = signed(&other, &body);
        assert_eq!(
            run(&*p, &wrong).await.err(),
            Some(WebhookError::Unauthorized(AuthFailure::BadSignature))
        );

        // The timestamp changed after signing (it is part of the signed bytes).
        let shifted = (good.received_at.timestamp() + 1).to_string();
        let moved = signed(&sk, &body).header(TIMESTAMP_HEADER, &shifted);
        assert_eq!(
            run(&*p, &moved).await.err(),
            Some(WebhookError::Unauthorized(AuthFailure::BadSignature))
        );

        for header in [SIGNATURE_HEADER, TIMESTAMP_HEADER] {
            let missing = signed(&sk, &body).without(header);
            assert!(matches!(
                run(&*p, &missing).await,
                Err(WebhookError::Unauthorized(_))
            ));
        }
        let garbage = signed(&sk, &body).header(SIGNATURE_HEADER, "%%%not base64");
        assert!(matches!(
            run(&*p, &garbage).await,
            Err(WebhookError::Unauthorized(_))
        ));
        let not_der = signed(&sk, &body).header(SIGNATURE_HEADER, &STANDARD.encode(b"abc"));
        assert!(matches!(
            run(&*p, &not_der).await,
            Err(WebhookError::Unauthorized(_))
        ));

        // Correctly signed, but eleven minutes old (or ahead): refused.
        for skew in [-11 * 60, 11 * 60] {
            let now = Utc::now();
            let ts = (now.timestamp() + skew).to_string();
            let stale = TestRequest::post("sendgrid", body.clone())
                .at(now)
                .header(TIMESTAMP_HEADER, &ts)
                .header(SIGNATURE_HEADER, &sign(&sk, &ts, &body));
            assert_eq!(
                run(&*p, &stale).await.err(),
                Some(WebhookError::Unauthorized(AuthFailure::StaleTimestamp))
            );
        }
        // Nine minutes is inside the window.
        let now = Utc::now();
        let ts = (now.timestamp() - 9 * 60).to_string();
        let recent = TestRequest::post("sendgrid", body.clone())
            .at(now)
            .header(TIMESTAMP_HEADER, &ts)
            .header(SIGNATURE_HEADER, &sign(&sk, &ts, &body));
        assert!(run(&*p, &recent).await.is_ok());
    }

    #[tokio::test]
    async fn bad_bodies_get_the_right_error_after_a_valid_signature() {
        let (sk, pk) = keypair();
        let p = provider(&pk);
        for body in [&b""[..], b"{not json", b"{\"event\":\"open\"}", b"\"text\""] {
            assert!(
                matches!(
                    run(&*p, &signed(&sk, body)).await,
                    Err(WebhookError::BadRequest(_))
                ),
                "{body:?}"
            );
        }
        let form = signed(&sk, b"[]").header("content-type", "application/x-www-form-urlencoded");
        assert!(matches!(
            run(&*p, &form).await,
            Err(WebhookError::UnsupportedMediaType(_))
        ));
        // An empty array is a valid, empty batch.
        assert_eq!(run(&*p, &signed(&sk, b"[]")).await, Ok(vec![]));
    }

    /// SendGrid's own published known-answer vector (the test suites of sendgrid-python's
    /// `test/unit/test_eventwebhook.py` and sendgrid-nodejs's eventwebhook package): a key,
    /// timestamp, exact body (compact JSON and CRLF) and signature made by SendGrid's code.
    /// It proves the signed-bytes layout and the DER/base64 handling, not only our own
    /// round trip.
    #[test]
    fn sendgrids_published_test_vector_verifies() {
        let key = parse_public_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==",
        )
        .expect("SendGrid's test key parses");
        let body = "[{\"email\":\"hello@world.com\",\"event\":\"dropped\",\"reason\":\"Bounced Address\",\"sg_event_id\":\"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA\",\"sg_message_id\":\"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0\",\"smtp-id\":\"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>\",\"timestamp\":1600112492}]\r\n";
        let good = "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=";
        let failing = "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH3j/0=";
        assert_eq!(
            verify_signature(&key, "1600112502", body.as_bytes(), good),
            Ok(())
        );
        assert!(verify_signature(&key, "1600112502", body.as_bytes(), failing).is_err());
        assert!(verify_signature(&key, "1600112503", body.as_bytes(), good).is_err());
        let without_crlf = body.trim_end();
        assert!(verify_signature(&key, "1600112502", without_crlf.as_bytes(), good).is_err());
        // The vector's failing key (sendgrid-ruby's fixtures) rejects the good signature.
        let other = parse_public_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8REntlo7aNDthvj+y7GjUuFDb/R1NGe1OPzpA==",
        )
        .expect("key parses");
        assert!(verify_signature(&other, "1600112502", body.as_bytes(), good).is_err());
    }

    #[test]
    fn from_config_needs_a_valid_p256_key_and_is_absent_without_one() {
        assert!(
            from_config(&no_secrets(), &no_network())
                .expect("ok")
                .is_none()
        );
        for bad in [
            "not base64 at all!",
            "aGVsbG8=",
            "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=",
        ] {
            let mut cfg = no_secrets();
            cfg.sendgrid_public_key = Some(Secret::new(bad));
            let err = from_config(&cfg, &no_network()).err().expect("refused");
            assert!(err.starts_with("REACHLY_SENDGRID_PUBLIC_KEY: "), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        // PEM armour around the same key is accepted.
        let (_, pk) = keypair();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{pk}\n-----END PUBLIC KEY-----\n");
        let mut cfg = no_secrets();
        cfg.sendgrid_public_key = Some(Secret::new(pem));
        assert!(from_config(&cfg, &no_network()).expect("valid").is_some());
    }
}
