//! Unit tests of the SparkPost provider: verification and extraction without a server.

use super::*;
use crate::event::Event;
use crate::webhooks::testkit::sign::basic;
use crate::webhooks::testkit::*;

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
    assert_eq!(ev.len(), 13);
    assert_eq!(dl.len(), 2);

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
    // One open, two pixels: by default the bottom pixel's `open` counts.
    check(ev[8], EventType::Opened, "open", M_ENGAGED);
    check(ev[9], EventType::Dropped, "generation_failure", M_DROPPED);
    check(
        ev[10],
        EventType::Dropped,
        "generation_rejection",
        M_DROPPED,
    );
    check(ev[11], EventType::Unsubscribed, "list_unsubscribe", M_UNSUB);
    check(ev[12], EventType::Unsubscribed, "link_unsubscribe", M_UNSUB);

    assert_eq!(dl[0].reason, "unknown_event_type");
    assert_eq!(dl[0].event_type.as_deref(), Some("sms_status"));
    let doc: Value = serde_json::from_slice(&fixture("sparkpost/batch.json")).expect("json");
    assert_eq!(dl[0].payload, doc[3]["msys"]["message_event"].to_string());
    assert_eq!(dl[1].reason, "initial_open_not_counted");
    assert_eq!(dl[1].event_type.as_deref(), Some("initial_open"));
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
        match map_event(&ev, Utc::now(), &ctx, false) {
            Record::Event(e) => e,
            Record::DeadLetter(d) => panic!("{d:?}"),
        }
    };
    for (class, want) in [
        ("10", BounceClass::Hard),
        ("30", BounceClass::Hard),
        ("1", BounceClass::Soft),
        ("20", BounceClass::Soft),
        ("22", BounceClass::Soft),
        ("40", BounceClass::Soft),
        ("50", BounceClass::Soft),
        ("54", BounceClass::Soft),
        ("70", BounceClass::Soft),
        ("bogus", BounceClass::Soft),
    ] {
        let e = with("bounce", serde_json::json!({"bounce_class": class}));
        assert_eq!(e.event_type, EventType::Bounced, "class {class}");
        assert_eq!(e.bounce_class, Some(want), "class {class}");
    }
    // 90 is the recipient's unsubscribe request; 25 and 26 SparkPost's own refusal.
    let e = with(
        "bounce",
        serde_json::json!({"bounce_class": "90", "ip_address": "10.0.0.1"}),
    );
    assert_eq!(
        (e.event_type, e.bounce_class),
        (EventType::Unsubscribed, None)
    );
    assert_eq!(
        e.ip_address, None,
        "a message event's address is the server's"
    );
    for class in ["25", "26"] {
        let e = with("bounce", serde_json::json!({"bounce_class": class}));
        assert_eq!((e.event_type, e.bounce_class), (EventType::Dropped, None));
    }
    // 60, 80, 100: an auto-reply, a subscribe request, a challenge: no failure.
    for class in ["60", "80", "100"] {
        let ev = serde_json::json!({"type": "bounce", "event_id": "1", "bounce_class": class,
            "rcpt_meta": {"reachly_message_id": M_HARD}});
        match map_event(&ev, Utc::now(), &ctx, false) {
            Record::DeadLetter(d) => assert_eq!(d.reason, "not_a_failure", "{class}"),
            other => panic!("{class}: {other:?}"),
        }
    }
    // Which pixel counts is configured: the other one is kept, not counted.
    let open = serde_json::json!({"type": "open", "event_id": "1",
        "rcpt_meta": {"reachly_message_id": M_HARD}});
    let initial = serde_json::json!({"type": "initial_open", "event_id": "1",
        "rcpt_meta": {"reachly_message_id": M_HARD}});
    let reason = |r: Record| match r {
        Record::DeadLetter(d) => Some(d.reason),
        Record::Event(_) => None,
    };
    assert_eq!(reason(map_event(&open, Utc::now(), &ctx, false)), None);
    assert_eq!(
        reason(map_event(&initial, Utc::now(), &ctx, false)).as_deref(),
        Some("initial_open_not_counted")
    );
    assert_eq!(reason(map_event(&initial, Utc::now(), &ctx, true)), None);
    assert_eq!(
        reason(map_event(&open, Utc::now(), &ctx, true)).as_deref(),
        Some("open_counted_as_initial_open")
    );
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
        let req = TestRequest::post("sparkpost", body.to_vec()).header("authorization", &bearer);
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

#[test]
fn the_module_doc_shows_the_event_table() {
    crate::webhooks::records::assert_doc_shows(include_str!("mod.rs"), EVENTS);
}
