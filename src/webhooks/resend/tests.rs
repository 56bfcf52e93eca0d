//! Unit tests of the Resend provider: verification and extraction without a server.

use super::*;
use crate::event::Event;
use crate::machine::MachineDetector;
use crate::webhooks::testkit::sign::{svix_secret as secret, svix_signature as sign};
use chrono::{DateTime, Utc};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Uri};

const MESSAGE: &str = "0190a6f0-0000-7000-8000-000000000002";
const ORG: &str = "0190a6f0-0000-7000-8000-000000000001";

fn provider(secret: &str) -> Resend {
    Resend {
        key: decode_secret(secret).unwrap(),
    }
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
    at: DateTime<Utc>,
}

impl Req {
    fn new(body: &[u8], headers: &[(&str, &str)], at: DateTime<Utc>) -> Req {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        for (k, v) in headers {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Req {
            method: Method::POST,
            uri: Uri::from_static("/webhooks/resend"),
            headers: h,
            body: body.to_vec(),
            at,
        }
    }

    fn signed(key: &[u8], id: &str, body: &[u8], at: DateTime<Utc>) -> Req {
        let ts = at.timestamp();
        let sig = sign(key, id, ts, body);
        Req::new(
            body,
            &[
                ("svix-id", id),
                ("svix-timestamp", &ts.to_string()),
                ("svix-signature", &sig),
            ],
            at,
        )
    }

    fn get(&self) -> WebhookRequest<'_> {
        WebhookRequest {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            body: &self.body,
            received_at: self.at,
            replay: crate::webhooks::MemoryReplayStore::shared(),
        }
    }
}

fn verify(p: &Resend, r: &Req) -> Result<(), WebhookError> {
    p.check(&r.get())
}

fn parse(p: &Resend, r: &Req) -> Result<Vec<Record>, WebhookError> {
    let machine = MachineDetector::default();
    p.parse(&r.get(), &ParseContext { machine: &machine })
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/resend/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn now() -> DateTime<Utc> {
    rfc3339("2024-11-22T23:41:20Z").unwrap()
}

fn event(r: &Record) -> &Event {
    match r {
        Record::Event(e) => e,
        Record::DeadLetter(d) => panic!("expected an event, got dead letter {d:?}"),
    }
}

/// Parses a signed fixture and returns its one event.
fn parse_fixture(name: &str) -> Event {
    let (s, key) = secret();
    let p = provider(&s);
    let r = Req::signed(
        &key,
        "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        &fixture(name),
        now(),
    );
    verify(&p, &r).unwrap();
    let recs = parse(&p, &r).unwrap();
    assert_eq!(recs.len(), 1, "{name}");
    event(&recs[0]).clone()
}

fn ts(s: &str) -> DateTime<Utc> {
    rfc3339(s).unwrap()
}

#[test]
fn svix_documented_test_vector_verifies() {
    // The example of Svix's verification docs and libraries.
    let p = provider("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let body = br#"{"test": 2432232314}"#;
    let at = DateTime::from_timestamp(1_614_265_330, 0).unwrap();
    let r = Req::new(
        body,
        &[
            ("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("svix-timestamp", "1614265330"),
            (
                "svix-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ],
        at,
    );
    assert_eq!(verify(&p, &r), Ok(()));
}

#[test]
fn a_signature_made_with_a_fresh_secret_verifies() {
    let (s, key) = secret();
    let body = fixture("email.delivered.json");
    let r = Req::signed(&key, "msg_1", &body, Utc::now());
    assert_eq!(verify(&provider(&s), &r), Ok(()));
}

#[test]
fn any_of_several_signatures_may_match() {
    let (s, key) = secret();
    let (_, other) = secret();
    let body = fixture("email.delivered.json");
    let at = Utc::now();
    let t = at.timestamp();
    let header = format!(
        "{} {}",
        sign(&other, "msg_1", t, &body),
        sign(&key, "msg_1", t, &body)
    );
    let r = Req::new(
        &body,
        &[
            ("svix-id", "msg_1"),
            ("svix-timestamp", &t.to_string()),
            ("svix-signature", &header),
        ],
        at,
    );
    assert_eq!(verify(&provider(&s), &r), Ok(()));
    // Only the wrong one: refused.
    let only_wrong = sign(&other, "msg_1", t, &body);
    let r = Req::new(
        &body,
        &[
            ("svix-id", "msg_1"),
            ("svix-timestamp", &t.to_string()),
            ("svix-signature", &only_wrong),
        ],
        at,
    );
    assert_eq!(
        verify(&provider(&s), &r),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
    // The right signature under another version tag: refused.
    let wrong_version = sign(&key, "msg_1", t, &body).replacen("v1,", "v2,", 1);
    let r = Req::new(
        &body,
        &[
            ("svix-id", "msg_1"),
            ("svix-timestamp", &t.to_string()),
            ("svix-signature", &wrong_version),
        ],
        at,
    );
    assert_eq!(
        verify(&provider(&s), &r),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
}

#[test]
fn tampered_body_wrong_key_missing_header_and_stale_timestamps_are_refused() {
    let (s, key) = secret();
    let p = provider(&s);
    let body = fixture("email.bounced.json");
    let at = Utc::now();

    let mut tampered = Req::signed(&key, "msg_1", &body, at);
    tampered.body = String::from_utf8(body.clone())
        .unwrap()
        .replace("Permanent", "Transient")
        .into_bytes();
    assert_eq!(
        verify(&p, &tampered),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    let (_, wrong) = secret();
    let r = Req::signed(&wrong, "msg_1", &body, at);
    assert_eq!(
        verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    // The id is signed too.
    let mut other_id = Req::signed(&key, "msg_1", &body, at);
    other_id
        .headers
        .insert("svix-id", HeaderValue::from_static("msg_2"));
    assert_eq!(
        verify(&p, &other_id),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    for missing in ["svix-id", "svix-timestamp", "svix-signature"] {
        let mut r = Req::signed(&key, "msg_1", &body, at);
        r.headers.remove(missing);
        assert_eq!(
            verify(&p, &r),
            Err(WebhookError::Unauthorized(AuthFailure::MissingSignature)),
            "{missing}"
        );
    }

    // Signed 6 minutes before arrival, or 6 minutes after: refused; 4 minutes: fine.
    for (offset, ok) in [(-360, false), (360, false), (-240, true), (240, true)] {
        let mut r = Req::signed(&key, "msg_1", &body, at + chrono::Duration::seconds(offset));
        r.at = at;
        let expected = if ok {
            Ok(())
        } else {
            Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp))
        };
        assert_eq!(verify(&p, &r), expected, "{offset}");
    }

    let mut garbage_ts = Req::signed(&key, "msg_1", &body, at);
    garbage_ts
        .headers
        .insert("svix-timestamp", HeaderValue::from_static("soon"));
    assert_eq!(
        verify(&p, &garbage_ts),
        Err(WebhookError::Unauthorized(AuthFailure::BadTimestamp))
    );
}

#[test]
fn fixtures_map_to_the_expected_events() {
    let message = uuid::Uuid::parse_str(MESSAGE).unwrap();
    let org = uuid::Uuid::parse_str(ORG).unwrap();
    let key = id_key(Source::Resend, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W");

    let sent = parse_fixture("email.sent.json");
    assert_eq!(sent.event_type, EventType::Sent);
    assert_eq!(sent.message_id, message);
    assert_eq!(sent.claimed_organization_id, Some(org));
    assert_eq!(sent.occurred_at, ts("2024-11-22T23:41:12.126Z"));
    assert_eq!(sent.dedup_key.as_deref(), Some(key.as_str()));
    assert_eq!(sent.source, Source::Resend);
    assert_eq!(
        sent.metadata["resend_email_id"],
        "56761188-7520-42d8-8898-ff6fc54ce618"
    );

    let delivered = parse_fixture("email.delivered.json");
    assert_eq!(delivered.event_type, EventType::Delivered);
    assert_eq!(delivered.error_message, None);

    let delayed = parse_fixture("email.delivery_delayed.json");
    assert_eq!(delayed.event_type, EventType::Deferred);
    assert_eq!(delayed.error_message.as_deref(), Some("delivery delayed"));

    let complained = parse_fixture("email.complained.json");
    assert_eq!(complained.event_type, EventType::Complained);

    let bounced = parse_fixture("email.bounced.json");
    assert_eq!(bounced.event_type, EventType::Bounced);
    assert_eq!(bounced.bounce_class, Some(BounceClass::Hard));
    assert_eq!(bounced.metadata["bounce_type"], "Permanent");
    assert_eq!(bounced.metadata["bounce_sub_type"], "Suppressed");
    assert_eq!(
        bounced.error_message.as_deref(),
        Some(
            "The recipient's email address is on the suppression list because it has a recent history of producing hard bounces."
        )
    );

    let opened = parse_fixture("email.opened.json");
    assert_eq!(opened.event_type, EventType::Opened);
    assert_eq!(opened.machine_reason, None);

    let clicked = parse_fixture("email.clicked.json");
    assert_eq!(clicked.event_type, EventType::Clicked);
    assert_eq!(clicked.link_url.as_deref(), Some("https://resend.com"));
    assert_eq!(clicked.ip_address.as_deref(), Some("122.115.53.11"));
    assert_eq!(clicked.occurred_at, ts("2024-11-24T05:00:57.163Z"));
    assert!(clicked.user_agent.as_deref().unwrap().contains("Safari"));
    assert_eq!(clicked.machine_reason, None);

    let failed = parse_fixture("email.failed.json");
    assert_eq!(failed.event_type, EventType::Dropped);
    assert_eq!(failed.error_message.as_deref(), Some("reached_daily_quota"));
    assert_eq!(failed.metadata["reason"], "reached_daily_quota");
}

#[test]
fn tags_as_an_array_of_name_value_correlate_too() {
    let (s, key) = secret();
    let p = provider(&s);
    let body = format!(
        r#"{{"type":"email.bounced","created_at":"2024-11-22T23:41:12.126Z","data":{{"email_id":"e1","bounce":{{"type":"Transient","subType":"MailboxFull","message":"full"}},"tags":[{{"name":"x","value":"y"}},{{"name":"reachly_message_id","value":"{MESSAGE}"}}]}}}}"#
    );
    let r = Req::signed(&key, "msg_9", body.as_bytes(), now());
    verify(&p, &r).unwrap();
    let recs = parse(&p, &r).unwrap();
    let e = event(&recs[0]);
    assert_eq!(e.message_id.to_string(), MESSAGE);
    assert_eq!(e.claimed_organization_id, None);
    assert_eq!(e.bounce_class, Some(BounceClass::Soft));
    assert_eq!(e.error_message.as_deref(), Some("full"));
}

#[test]
fn a_scanner_click_is_flagged_as_machine() {
    let (s, key) = secret();
    let p = provider(&s);
    let body = format!(
        r#"{{"type":"email.clicked","created_at":"2024-11-22T23:41:12.126Z","data":{{"click":{{"link":"https://x.test/","userAgent":"Mozilla/5.0 (compatible; Barracuda Sentinel)","timestamp":"2024-11-22T23:41:13Z"}},"tags":{{"reachly_message_id":"{MESSAGE}"}}}}}}"#
    );
    let r = Req::signed(&key, "msg_10", body.as_bytes(), now());
    let recs = parse(&p, &r).unwrap();
    assert_eq!(
        event(&recs[0]).machine_reason.as_deref(),
        Some("user_agent:barracuda")
    );
}

#[test]
fn unknown_types_and_uncorrelatable_events_become_keyed_dead_letters() {
    let (s, key) = secret();
    let p = provider(&s);
    for (body, reason, etype) in [
        (
            r#"{"type":"contact.created","created_at":"2024-11-22T23:41:12Z","data":{"id":"c1"}}"#.to_string(),
            "unknown_event_type",
            "contact.created",
        ),
        (
            r#"{"type":"email.delivered","created_at":"2024-11-22T23:41:12Z","data":{"email_id":"e1","tags":{"category":"x"}}}"#.to_string(),
            "no_message_id",
            "email.delivered",
        ),
        (
            r#"{"type":"email.delivered","data":{"tags":{"reachly_message_id":"nope"}}}"#
                .to_string(),
            "invalid_message_id",
            "email.delivered",
        ),
    ] {
        let r = Req::signed(&key, "msg_dl", body.as_bytes(), now());
        let recs = parse(&p, &r).unwrap();
        assert_eq!(recs.len(), 1);
        let Record::DeadLetter(d) = &recs[0] else {
            panic!("expected a dead letter for {body}");
        };
        assert_eq!(d.reason, reason);
        assert_eq!(d.event_type.as_deref(), Some(etype));
        assert_eq!(d.payload, body);
        assert_eq!(
            d.dedup_key.as_deref(),
            Some(id_key(Source::Resend, "msg_dl").as_str())
        );
    }
}

#[test]
fn malformed_bodies_and_wrong_content_types_are_refused_without_panic() {
    let (s, key) = secret();
    let p = provider(&s);
    for body in [
        &b""[..],
        b"{",
        b"[]",
        b"\"x\"",
        b"{\"data\":{}}",
        b"\xff\xfe",
    ] {
        let r = Req::signed(&key, "msg_1", body, now());
        assert_eq!(verify(&p, &r), Ok(()));
        assert!(
            matches!(parse(&p, &r), Err(WebhookError::BadRequest(_))),
            "{body:?}"
        );
    }
    let mut r = Req::signed(&key, "msg_1", &fixture("email.sent.json"), now());
    r.headers
        .insert("content-type", HeaderValue::from_static("text/html"));
    assert!(matches!(
        verify(&p, &r),
        Err(WebhookError::UnsupportedMediaType(_))
    ));
}

#[test]
fn secrets_must_be_whsec_base64() {
    assert!(decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
    assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
    assert!(decode_secret("whsec_!!!").is_err());
    assert!(decode_secret("whsec_").is_err());
    let from = |secret: &str| {
        let args =
            crate::config::ServeArgs::from_argv(["serve", "--resend-webhook-secret", secret]);
        let https: Arc<dyn HttpsGet> = Arc::new(NoNetwork);
        from_config(&args.webhooks, &https).map(|p| p.is_some())
    };
    assert_eq!(from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Ok(true));
    let err = from("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err();
    assert!(err.starts_with("REACHLY_RESEND_WEBHOOK_SECRET"), "{err}");
    assert!(!err.contains("MfKQ9r8"), "the secret is not echoed: {err}");
}

struct NoNetwork;
impl HttpsGet for NoNetwork {
    fn get<'a>(&'a self, _url: &'a url::Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async { Err("no network in tests".to_string()) })
    }
}

#[test]
fn the_module_doc_shows_the_event_table() {
    crate::webhooks::records::assert_doc_shows(include_str!("mod.rs"), EVENTS);
}

#[test]
fn kept_text_is_bounded_and_nul_free() {
    let (s, key) = secret();
    let p = provider(&s);
    let mut doc: Value = serde_json::from_slice(&fixture("email.bounced.json")).unwrap();
    doc["data"]["bounce"]["subType"] = Value::from("Supp\u{0}ressed");
    doc["data"]["bounce"]["diagnosticCode"] = Value::from("é".repeat(3000));
    let body = serde_json::to_vec(&doc).unwrap();
    let r = Req::signed(&key, "msg_bounded", &body, now());
    verify(&p, &r).unwrap();
    let recs = parse(&p, &r).unwrap();
    let e = event(&recs[0]);
    assert_eq!(e.metadata["bounce_sub_type"], "Supp\u{FFFD}ressed");
    let diag = e.metadata["diagnostic_code"].as_str().unwrap();
    assert!(diag.len() <= crate::event::MAX_TEXT_BYTES && diag.len() > 4000);
}

#[test]
fn a_bounce_without_a_type_is_read_from_its_message() {
    use crate::event::BounceClass;
    let hard = "The recipient's email provider sent a hard bounce message, but didn't specify the reason for the hard bounce.";
    let suppressed = "Resend has suppressed sending to this address because it is on the account-level suppression list.";
    assert_eq!(
        bounce_outcome(None, Some(hard)),
        (EventType::Bounced, Some(BounceClass::Hard))
    );
    assert_eq!(
        bounce_outcome(None, Some(suppressed)),
        (EventType::Dropped, None)
    );
    assert_eq!(
        bounce_outcome(None, Some("The recipient's inbox was full.")),
        (EventType::Bounced, Some(BounceClass::Soft))
    );
    assert_eq!(
        bounce_outcome(None, None),
        (EventType::Bounced, Some(BounceClass::Soft))
    );
    assert_eq!(
        bounce_outcome(Some("Permanent"), Some(suppressed)),
        (EventType::Bounced, Some(BounceClass::Hard))
    );
    assert_eq!(
        bounce_outcome(Some("Transient"), Some(hard)),
        (EventType::Bounced, Some(BounceClass::Soft))
    );
}
