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
//! | `SubscriptionChange`, `SuppressSending: true` | by `SuppressionReason`: `HardBounce` → bounced hard, `SpamComplaint` → complained, `ManualSuppression` → unsubscribed |
//! | `SubscriptionChange`, `SuppressSending: false` (reactivation) | dead letter `unknown_event_type` (SPEC: a contact never returns to active here) |
//! | anything else | dead letter `unknown_event_type` |
//!
//! Bounce `Type` (Postmark's table): `HardBounce`, `BadEmailAddress` → bounced hard;
//! `Transient`, `DnsError`, `SoftBounce`, `SpamNotification`, `Unknown`, `VirusNotification`,
//! `ChallengeVerification`, `Unconfirmed`, `Blocked`, `DMARCPolicy` → bounced soft (the
//! address is not known to be dead); `SpamComplaint` → complained; `Unsubscribe` (an
//! unsubscribe request by mail) → unsubscribed; `ManuallyDeactivated`, `SMTPApiError`,
//! `TemplateRenderingFailed` → dropped (never sent); `Subscribe`, `AutoResponder`,
//! `AddressChange`, `OpenRelayTest`, `InboundError` (not outcomes of the send) → dead letter
//! `unknown_event_type`. A missing `Type` is read from `TypeCode`.
//!
//! Postmark has no event id, so an event is keyed on its content: `RecordType`,
//! `MessageID`, the record's own time field, the recipient and the URL.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
    basic_auth_ok, content_key, correlate, dead_letter, esp_event, header_message_id, json_body,
    json_str, json_time, keep_fields,
};
use crate::config::{Secret, WebhookConfig};
use crate::event::{BounceClass, EventType, Record, Source};

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
        "Transient"
        | "DnsError"
        | "SoftBounce"
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

fn classify(rec: &Value) -> Result<Kind, String> {
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
                .ok_or_else(|| format!("Bounce/{name}"))
        }
        "SubscriptionChange" => {
            let reason = json_str(rec, "SuppressionReason").unwrap_or("");
            let mapped = match (suppress_sending(rec), reason) {
                (Some(true), "HardBounce") => Some((EventType::Bounced, Some(BounceClass::Hard))),
                (Some(true), "SpamComplaint") => Some((EventType::Complained, None)),
                (Some(true), "ManualSuppression") => Some((EventType::Unsubscribed, None)),
                _ => None,
            };
            match mapped {
                Some((t, c)) => Ok(kind(t, c, "ChangedAt", "Recipient")),
                None if suppress_sending(rec) == Some(false) => {
                    Err("SubscriptionChange/reactivated".into())
                }
                None => Err(format!("SubscriptionChange/{reason}")),
            }
        }
        other => Err(other.to_owned()),
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
    let record_type = json_str(rec, "RecordType").unwrap_or("");
    let kind = classify(rec);
    let (time_field, recipient_field) = match &kind {
        Ok(k) => (k.time_field, k.recipient_field),
        Err(_) => ("", ""),
    };
    let ts_raw = rec
        .get(time_field)
        .map(Value::to_string)
        .unwrap_or_default();
    let key = content_key(
        SOURCE,
        &[
            record_type,
            json_str(rec, "MessageID").unwrap_or(""),
            &ts_raw,
            json_str(rec, recipient_field).unwrap_or(""),
            json_str(rec, "OriginalLink").unwrap_or(""),
        ],
    );
    let kind = match kind {
        Ok(k) => k,
        Err(name) => {
            // Unknown records have no known time field: key the whole record.
            let key = content_key(SOURCE, &["dead_letter", &raw]);
            return dead_letter(SOURCE, "unknown_event_type", &raw, Some(key), Some(&name));
        }
    };
    let metadata_ids = rec.get("Metadata").filter(|m| m.is_object());
    let message_raw = metadata_ids
        .and_then(|m| json_str(m, "reachly_message_id"))
        .or_else(|| header_id(rec));
    let org_raw = metadata_ids.and_then(|m| json_str(m, "reachly_organization_id"));
    let (message_id, organization_id) = match correlate(message_raw, org_raw) {
        Ok(ids) => ids,
        Err(reason) => {
            return dead_letter(SOURCE, reason, &raw, Some(key), Some(record_type));
        }
    };
    let occurred_at = rec
        .get(kind.time_field)
        .and_then(json_time)
        .unwrap_or(received_at);
    let mut e = esp_event(
        SOURCE,
        message_id,
        organization_id,
        kind.event_type,
        occurred_at,
        key,
    );
    e.bounce_class = kind.bounce_class;

    let mut metadata = Map::new();
    keep_fields(
        &mut metadata,
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
    keep_fields(&mut metadata, rec.get("Client"), &[("Name", "client_name")]);
    keep_fields(&mut metadata, rec.get("OS"), &[("Name", "os_name")]);
    keep_fields(
        &mut metadata,
        rec.get("Geo"),
        &[("CountryISOCode", "country")],
    );

    match kind.event_type {
        EventType::Opened | EventType::Clicked => {
            // As Postmark reports it; the webhook handler then applies REACHLY_IP_MODE
            // (`apply_ip_mode`), as for our own endpoints.
            e.ip_address = rec
                .get("Geo")
                .and_then(|g| json_str(g, "IP"))
                .map(str::to_owned);
            e.user_agent = json_str(rec, "UserAgent").map(str::to_owned);
            if kind.event_type == EventType::Clicked {
                e.link_url = json_str(rec, "OriginalLink").map(str::to_owned);
            }
            e.machine_reason = ctx.machine.classify_reported(e.user_agent.as_deref());
        }
        EventType::Bounced | EventType::Dropped => {
            let name = json_str(rec, "Name")
                .or(json_str(rec, "Type"))
                .or(json_str(rec, "SuppressionReason"))
                .unwrap_or("bounce");
            e.error_message = Some(
                match json_str(rec, "Details").or(json_str(rec, "Description")) {
                    Some(details) => format!("{name}: {details}"),
                    None => name.to_owned(),
                },
            );
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

    const CREDENTIALS: &str = "postmark:s3cret-pässword";

    fn provider() -> Arc<dyn Provider> {
        let mut cfg = no_secrets();
        cfg.postmark_basic_auth = Some(Secret::new(CREDENTIALS));
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
        TestRequest::post("postmark", body).header("authorization", &basic(CREDENTIALS))
    }

    async fn one(path: &str) -> Record {
        let mut records = run(&*provider(), &authed(fixture(path)))
            .await
            .expect("accepted");
        assert_eq!(records.len(), 1, "{path}");
        records.remove(0)
    }

    fn event(r: Record) -> Event {
        match r {
            Record::Event(e) => e,
            Record::DeadLetter(d) => panic!("dead letter {d:?}"),
        }
    }

    fn check(e: &Event, typ: EventType, msg: &str, at: &str, key: [&str; 5]) {
        assert_eq!(e.event_type, typ, "{e:?}");
        assert_eq!(e.message_id.to_string(), msg);
        assert_eq!(
            e.claimed_organization_id.map(|o| o.to_string()).as_deref(),
            Some(ORG)
        );
        assert_eq!(e.occurred_at, t(at));
        assert_eq!(
            e.dedup_key.as_deref(),
            Some(content_key(SOURCE, &key).as_str())
        );
        assert_eq!(e.source, Source::Postmark);
    }

    const PM_ID: &str = "883953f4-6105-42a2-a16a-77a8eac79483";
    const ZERO_ID: &str = "00000000-0000-0000-0000-000000000000";

    #[tokio::test]
    async fn documented_records_map_to_exactly_these_events() {
        let e = event(one("postmark/delivery.json").await);
        check(
            &e,
            EventType::Delivered,
            M_ENGAGED,
            "2019-11-05T16:33:54.9070259Z",
            [
                "Delivery",
                PM_ID,
                "\"2019-11-05T16:33:54.9070259Z\"",
                "john@example.com",
                "",
            ],
        );
        assert_eq!(e.metadata["details"], "Test delivery webhook details");
        assert_eq!(e.metadata["esp_message_id"], PM_ID);

        let e = event(one("postmark/bounce.json").await);
        check(
            &e,
            EventType::Bounced,
            M_HARD,
            "2019-11-05T16:33:54.9070259Z",
            [
                "Bounce",
                PM_ID,
                "\"2019-11-05T16:33:54.9070259Z\"",
                "john@example.com",
                "",
            ],
        );
        assert_eq!(e.bounce_class, Some(BounceClass::Hard));
        assert_eq!(
            e.error_message.as_deref(),
            Some("Hard bounce: Test bounce details")
        );
        assert_eq!(e.metadata["bounce_type"], "HardBounce");
        assert_eq!(e.metadata["bounce_id"], 4323372036854775807_i64);
        assert!(!e.metadata.contains_key("Content"));

        let e = event(one("postmark/open.json").await);
        check(
            &e,
            EventType::Opened,
            M_ENGAGED,
            "2019-11-05T16:33:54.9070259Z",
            [
                "Open",
                PM_ID,
                "\"2019-11-05T16:33:54.9070259Z\"",
                "john@example.com",
                "",
            ],
        );
        assert_eq!(e.ip_address.as_deref(), Some("188.2.95.4"));
        assert!(
            e.user_agent
                .as_deref()
                .is_some_and(|u| u.contains("Chrome/35"))
        );
        assert_eq!(e.machine_reason, None);
        assert_eq!(e.metadata["first_open"], true);

        let e = event(one("postmark/click.json").await);
        check(
            &e,
            EventType::Clicked,
            M_ENGAGED,
            "2017-10-25T15:21:11.9065619Z",
            [
                "Click",
                ZERO_ID,
                "\"2017-10-25T15:21:11.9065619Z\"",
                "john@example.com",
                "https://example.com",
            ],
        );
        assert_eq!(e.link_url.as_deref(), Some("https://example.com"));
        assert_eq!(e.ip_address.as_deref(), Some("8.8.8.8"));
        assert_eq!(e.metadata["click_location"], "HTML");

        let e = event(one("postmark/spam-complaint.json").await);
        check(
            &e,
            EventType::Complained,
            M_COMPLAINT,
            "2019-11-05T16:33:54.9070259Z",
            [
                "SpamComplaint",
                ZERO_ID,
                "\"2019-11-05T16:33:54.9070259Z\"",
                "john@example.com",
                "",
            ],
        );

        let e = event(one("postmark/subscription-change.json").await);
        check(
            &e,
            EventType::Bounced,
            M_UNSUB,
            "2020-02-01T10:53:34.416071Z",
            [
                "SubscriptionChange",
                PM_ID,
                "\"2020-02-01T10:53:34.416071Z\"",
                "bounced-address@wildbit.com",
                "",
            ],
        );
        assert_eq!(e.bounce_class, Some(BounceClass::Hard));
        assert_eq!(e.metadata["suppression_reason"], "HardBounce");

        // The documented example as is (its Metadata has no Reachly ids): a dead letter.
        match one("postmark/delivery-uncorrelated.json").await {
            Record::DeadLetter(d) => {
                assert_eq!(d.reason, "no_message_id");
                assert_eq!(d.event_type.as_deref(), Some("Delivery"));
                let doc: Value =
                    serde_json::from_slice(&fixture("postmark/delivery-uncorrelated.json"))
                        .expect("json");
                assert_eq!(d.payload, doc.to_string());
                let key = content_key(
                    SOURCE,
                    &[
                        "Delivery",
                        PM_ID,
                        "\"2019-11-05T16:33:54.9070259Z\"",
                        "john@example.com",
                        "",
                    ],
                );
                assert_eq!(d.dedup_key.as_deref(), Some(key.as_str()));
            }
            other => panic!("{other:?}"),
        }
    }

    fn with(path: &str, changes: Value) -> Value {
        let mut doc: Value = serde_json::from_slice(&fixture(path)).expect("json");
        if let (Some(d), Some(c)) = (doc.as_object_mut(), changes.as_object()) {
            for (k, v) in c {
                d.insert(k.clone(), v.clone());
            }
        }
        doc
    }

    #[test]
    fn every_bounce_type_of_postmarks_table_has_a_mapping() {
        let machine = crate::machine::MachineDetector::default();
        let ctx = ParseContext { machine: &machine };
        let expect = [
            (
                "HardBounce",
                Some((EventType::Bounced, Some(BounceClass::Hard))),
            ),
            (
                "BadEmailAddress",
                Some((EventType::Bounced, Some(BounceClass::Hard))),
            ),
            (
                "SoftBounce",
                Some((EventType::Bounced, Some(BounceClass::Soft))),
            ),
            (
                "Transient",
                Some((EventType::Bounced, Some(BounceClass::Soft))),
            ),
            (
                "DnsError",
                Some((EventType::Bounced, Some(BounceClass::Soft))),
            ),
            (
                "Blocked",
                Some((EventType::Bounced, Some(BounceClass::Soft))),
            ),
            (
                "DMARCPolicy",
                Some((EventType::Bounced, Some(BounceClass::Soft))),
            ),
            ("SpamComplaint", Some((EventType::Complained, None))),
            ("Unsubscribe", Some((EventType::Unsubscribed, None))),
            ("ManuallyDeactivated", Some((EventType::Dropped, None))),
            ("TemplateRenderingFailed", Some((EventType::Dropped, None))),
            ("AutoResponder", None),
            ("OpenRelayTest", None),
            ("NoSuchType", None),
        ];
        for (name, want) in expect {
            let rec = with("postmark/bounce.json", serde_json::json!({"Type": name}));
            let got = match map_record(&rec, Utc::now(), &ctx) {
                Record::Event(e) => Some((e.event_type, e.bounce_class)),
                Record::DeadLetter(d) => {
                    assert_eq!(d.reason, "unknown_event_type");
                    assert_eq!(d.event_type, Some(format!("Bounce/{name}")));
                    None
                }
            };
            assert_eq!(got, want, "{name}");
        }
        for (code, name) in TYPE_CODES {
            assert!(
                bounce_type(name).is_some()
                    || [
                        "Subscribe",
                        "AutoResponder",
                        "AddressChange",
                        "OpenRelayTest",
                        "InboundError"
                    ]
                    .contains(name),
                "{code} {name}"
            );
        }
        // Type missing: read from TypeCode (4096 = SoftBounce).
        let mut rec = with(
            "postmark/bounce.json",
            serde_json::json!({"TypeCode": 4096}),
        );
        rec.as_object_mut().expect("object").remove("Type");
        match map_record(&rec, Utc::now(), &ctx) {
            Record::Event(e) => assert_eq!(e.bounce_class, Some(BounceClass::Soft)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subscription_changes_headers_and_scanners() {
        let machine = crate::machine::MachineDetector::default();
        let ctx = ParseContext { machine: &machine };
        let map = |rec: &Value| match map_record(rec, Utc::now(), &ctx) {
            Record::Event(e) => Ok((e.event_type, e.message_id.to_string(), e.machine_reason)),
            Record::DeadLetter(d) => Err((d.reason, d.event_type)),
        };
        let unsub = with(
            "postmark/subscription-change.json",
            serde_json::json!({"SuppressionReason": "ManualSuppression"}),
        );
        assert_eq!(
            map(&unsub),
            Ok((EventType::Unsubscribed, M_UNSUB.into(), None))
        );
        let complaint = with(
            "postmark/subscription-change.json",
            serde_json::json!({"SuppressionReason": "SpamComplaint"}),
        );
        assert_eq!(map(&complaint).map(|x| x.0), Ok(EventType::Complained));
        let reactivated = with(
            "postmark/subscription-change.json",
            serde_json::json!({"SuppressSending": false, "SuppressionReason": null}),
        );
        assert_eq!(
            map(&reactivated),
            Err((
                "unknown_event_type".into(),
                Some("SubscriptionChange/reactivated".into())
            ))
        );
        // Correlation by an echoed header when Metadata has no ids.
        let by_header = with(
            "postmark/delivery-uncorrelated.json",
            serde_json::json!({
            "Headers": [{"Name": "X-Reachly-Message-Id", "Value": M_ENGAGED}]}),
        );
        assert_eq!(
            map(&by_header),
            Ok((EventType::Delivered, M_ENGAGED.into(), None))
        );
        // A scanner's click is machine traffic.
        let scanner = with(
            "postmark/click.json",
            serde_json::json!({"UserAgent": "Mimecast URL Protect"}),
        );
        assert_eq!(
            map(&scanner).map(|x| x.2),
            Ok(Some("user_agent:mimecast".into()))
        );
        // Inbound and unknown records.
        let inbound = serde_json::json!({"RecordType": "Inbound", "MessageID": "x"});
        assert_eq!(
            map(&inbound),
            Err(("unknown_event_type".into(), Some("Inbound".into())))
        );
    }

    #[tokio::test]
    async fn wrong_or_missing_credentials_are_unauthorized() {
        let p = provider();
        let body = fixture("postmark/delivery.json");
        assert!(run(&*p, &authed(body.clone())).await.is_ok());
        for header in [
            basic("postmark:wrong"),
            basic("other:s3cret-pässword"),
            basic("postmark:s3cret-pässword "),
            "Bearer s3cret-pässword".into(),
            "Basic %%%".into(),
        ] {
            let req = TestRequest::post("postmark", body.clone()).header("authorization", &header);
            assert_eq!(
                run(&*p, &req).await.err(),
                Some(WebhookError::Unauthorized(AuthFailure::WrongCredentials)),
                "{header}"
            );
        }
        let none = TestRequest::post("postmark", body);
        assert_eq!(
            run(&*p, &none).await.err(),
            Some(WebhookError::Unauthorized(AuthFailure::MissingCredentials))
        );
    }

    #[tokio::test]
    async fn bad_bodies_get_the_right_error() {
        let p = provider();
        for body in [&b""[..], b"{", b"[]", b"\"Delivery\""] {
            assert!(
                matches!(
                    run(&*p, &authed(body.to_vec())).await,
                    Err(WebhookError::BadRequest(_))
                ),
                "{body:?}"
            );
        }
        let form = authed(fixture("postmark/delivery.json")).header("content-type", "text/plain");
        assert!(matches!(
            run(&*p, &form).await,
            Err(WebhookError::UnsupportedMediaType(_))
        ));
    }

    #[tokio::test]
    async fn a_redelivered_record_has_the_same_key() {
        let p = provider();
        let a = run(&*p, &authed(fixture("postmark/open.json")))
            .await
            .expect("ok");
        let b = run(&*p, &authed(fixture("postmark/open.json")))
            .await
            .expect("ok");
        assert_eq!(events(&a)[0].dedup_key, events(&b)[0].dedup_key);
        assert_ne!(events(&a)[0].id, events(&b)[0].id);
    }

    #[test]
    fn from_config_needs_user_and_password() {
        assert!(
            from_config(&no_secrets(), &no_network())
                .expect("ok")
                .is_none()
        );
        for bad in ["nocolon", ":password", "user:"] {
            let mut cfg = no_secrets();
            cfg.postmark_basic_auth = Some(Secret::new(bad));
            let err = from_config(&cfg, &no_network()).err().expect("refused");
            assert!(err.contains("REACHLY_POSTMARK_BASIC_AUTH"), "{err}");
        }
    }
}
