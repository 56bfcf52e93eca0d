//! Unit tests of the Postmark provider: verification and extraction without a server.

use super::*;
use crate::event::Event;
use crate::webhooks::testkit::sign::basic;
use crate::webhooks::testkit::*;

const CREDENTIALS: &str = "postmark:s3cret-pässword";

fn provider() -> Arc<dyn Provider> {
    let mut cfg = no_secrets();
    cfg.postmark_basic_auth = Some(Secret::new(CREDENTIALS));
    from_config(&cfg, &no_network())
        .expect("valid")
        .expect("configured")
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
    // Then what tells apart two records of one message and time: bounce type, type code and
    // bounce ID, the client's user agent and address (as the fixture has them, parsed).
    let text = |k: &str| match e.metadata.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let (typ, code, id) = (
        text("bounce_type"),
        text("bounce_type_code"),
        text("bounce_id"),
    );
    let ua = e.user_agent.clone().unwrap_or_default();
    let ip = e.ip_address.clone().unwrap_or_default();
    let mut parts: Vec<&str> = key.to_vec();
    parts.extend([
        typ.as_str(),
        code.as_str(),
        id.as_str(),
        ua.as_str(),
        ip.as_str(),
    ]);
    assert_eq!(
        e.dedup_key.as_deref(),
        Some(content_key(SOURCE, &parts).as_str())
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

    // The documented SubscriptionChange is Postmark's suppression after a hard bounce: the
    // Bounce record carries the event, so this one is kept as a dead letter.
    match one("postmark/subscription-change.json").await {
        Record::DeadLetter(d) => {
            assert_eq!(d.reason, "suppression_notice");
            assert_eq!(
                d.event_type.as_deref(),
                Some("SubscriptionChange/HardBounce")
            );
        }
        other => panic!("{other:?}"),
    }
    // A recipient's own suppression (captured by django-anymail) is an unsubscribe.
    let e = event(one("postmark/subscription-change-manual.json").await);
    check(
        &e,
        EventType::Unsubscribed,
        M_UNSUB,
        "2022-06-05T17:17:32Z",
        [
            "SubscriptionChange",
            "a4909a96-73d7-4c49-b148-a54522d3f7ac",
            "\"2022-06-05T17:17:32Z\"",
            "john@example.com",
            "",
        ],
    );
    assert_eq!(e.metadata["suppression_reason"], "ManualSuppression");
    assert!(!e.undated);
    // A real Bounce without BouncedAt: stored at its arrival, deduplicated on its key alone.
    let e = event(one("postmark/bounce-unsubscribe-no-time.json").await);
    assert_eq!(e.event_type, EventType::Unsubscribed);
    assert!(e.undated);

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
                    "",
                    "",
                    "",
                    "",
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
        ("Transient", Some((EventType::Deferred, None))),
        ("DnsError", Some((EventType::Deferred, None))),
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
    // Postmark's own suppression after a complaint or a hard bounce, or one by the sender:
    // the SpamComplaint or Bounce record carries the event; this moves nothing.
    for (reason, origin) in [
        ("SpamComplaint", "Recipient"),
        ("HardBounce", "Recipient"),
        ("ManualSuppression", "Customer"),
        ("ManualSuppression", "Admin"),
    ] {
        let notice = with(
            "postmark/subscription-change.json",
            serde_json::json!({"SuppressionReason": reason, "Origin": origin}),
        );
        assert_eq!(
            map(&notice),
            Err((
                "suppression_notice".into(),
                Some(format!("SubscriptionChange/{reason}"))
            )),
            "{reason} {origin}"
        );
    }
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
