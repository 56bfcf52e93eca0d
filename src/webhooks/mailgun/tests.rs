//! Unit tests of the Mailgun provider: verification and extraction without a server.

use super::*;
use crate::event::Event;
use crate::webhooks::testkit::sign::mailgun_signature as hmac_hex;
use crate::webhooks::testkit::*;

const KEY: &str = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0";

fn provider() -> Arc<dyn Provider> {
    let mut cfg = no_secrets();
    cfg.mailgun_signing_key = Some(Secret::new(KEY));
    from_config(&cfg, &no_network())
        .expect("valid")
        .expect("configured")
}

/// The fixture with its documented signature replaced by one made now with `key`.
fn signed_with(key: &str, path: &str, token: &str, at: DateTime<Utc>) -> TestRequest {
    let mut doc: Value = serde_json::from_slice(&fixture(path)).expect("fixture is JSON");
    let ts = at.timestamp().to_string();
    doc["signature"] = serde_json::json!({
        "timestamp": ts, "token": token, "signature": hmac_hex(key, &ts, token)
    });
    TestRequest::post("mailgun", serde_json::to_vec(&doc).expect("serializable")).at(at)
}

fn signed(path: &str, token: &str) -> TestRequest {
    signed_with(KEY, path, token, Utc::now())
}

fn token(n: u32) -> String {
    format!("{n:050}")
}

async fn one_event(p: &dyn Provider, path: &str, tok: &str) -> Event {
    let records = run(p, &signed(path, tok)).await.expect("accepted");
    assert_eq!(records.len(), 1);
    let ev = events(&records);
    assert_eq!(ev.len(), 1, "{path}: {records:?}");
    ev[0].clone()
}

fn check(e: &Event, typ: EventType, msg: &str, at: &str, id: &str) {
    assert_eq!(e.event_type, typ, "{e:?}");
    assert_eq!(e.message_id.to_string(), msg);
    assert_eq!(
        e.claimed_organization_id.map(|o| o.to_string()).as_deref(),
        Some(ORG)
    );
    // Mailgun's fractional seconds go through an f64: equal to the microsecond.
    let off = (e.occurred_at - t(at)).num_nanoseconds().map(i64::abs);
    assert!(
        off.is_some_and(|ns| ns < 1_000),
        "{} vs {at}",
        e.occurred_at
    );
    assert_eq!(e.dedup_key.as_deref(), Some(id_key(SOURCE, id).as_str()));
    assert_eq!(e.source, Source::Mailgun);
    assert_eq!(e.metadata["mailgun_event_id"], id);
}

#[tokio::test]
async fn documented_events_map_to_exactly_these_records() {
    let p = provider();
    let e = one_event(&*p, "mailgun/accepted.json", &token(1)).await;
    check(
        &e,
        EventType::Sent,
        M_ENGAGED,
        "2026-02-03T19:26:38.372891Z",
        "CCXMjJ7nQi2N3BPigGOdgQ",
    );
    assert_eq!(
        e.metadata["esp_message_id"],
        "20260203192638.000be97f99f8cea1@sample.mailgun.com"
    );

    let e = one_event(&*p, "mailgun/delivered.json", &token(2)).await;
    check(
        &e,
        EventType::Delivered,
        M_ENGAGED,
        "2026-02-03T19:20:31.658528Z",
        "MXcc2gEpS-eN8HfkOnmK2w",
    );
    assert_eq!(e.metadata["delivery_code"], 250);
    assert!(e.error_message.is_none());

    let e = one_event(&*p, "mailgun/opened.json", &token(3)).await;
    check(
        &e,
        EventType::Opened,
        M_ENGAGED,
        "2026-02-05T21:31:14.554933Z",
        "q7DMpbLFRKW1QuiLC9XV4Q",
    );
    assert_eq!(e.ip_address.as_deref(), Some("38.142.208.162"));
    assert!(
        e.user_agent
            .as_deref()
            .is_some_and(|u| u.contains("Chrome/144"))
    );
    assert_eq!(e.machine_reason, None);

    let e = one_event(&*p, "mailgun/clicked.json", &token(4)).await;
    check(
        &e,
        EventType::Clicked,
        M_ENGAGED,
        "2026-02-05T21:31:58.664868Z",
        "A9dLUrCXQjK92TlnW3zkIA",
    );
    assert_eq!(e.link_url.as_deref(), Some("https://sample.mailgun.com"));
    assert_eq!(e.ip_address.as_deref(), Some("9.169.124.21"));

    let e = one_event(&*p, "mailgun/failed-permanent.json", &token(5)).await;
    check(
        &e,
        EventType::Bounced,
        M_HARD,
        "2026-02-12T17:42:55.592369Z",
        "2kFItcrLQuKTdp-Ia2Xr7w",
    );
    assert_eq!(e.bounce_class, Some(BounceClass::Hard));
    assert!(
        e.error_message
            .as_deref()
            .is_some_and(|m| m.starts_with("550 5.5.0 Requested action not taken"))
    );
    assert_eq!(e.metadata["bounce_type"], "hard");
    assert_eq!(e.metadata["severity"], "permanent");

    let e = one_event(&*p, "mailgun/failed-temporary.json", &token(6)).await;
    check(
        &e,
        EventType::Deferred,
        M_SOFT,
        "2026-02-12T18:01:07.428860Z",
        "YusK9KhoTwe2C00iRxsEqQ",
    );
    assert!(e.error_message.as_deref().is_some_and(|m| {
        m.starts_with("421 Your IP (161.38.194.10) is temporary blacklisted")
    }));
    assert_eq!(e.bounce_class, None);
    assert_eq!(e.metadata["retry_seconds"], 600);

    let e = one_event(&*p, "mailgun/unsubscribed.json", &token(7)).await;
    check(
        &e,
        EventType::Unsubscribed,
        M_UNSUB,
        "2026-02-05T21:31:30.465629Z",
        "89QcW8YuSv6lhSeN3n4qnA",
    );
    assert_eq!(e.machine_reason, None);

    let e = one_event(&*p, "mailgun/complained.json", &token(8)).await;
    check(
        &e,
        EventType::Complained,
        M_COMPLAINT,
        "2026-02-12T18:26:12.268415Z",
        "rIVDlyk8SY-mJauQoYmNFA",
    );

    // The documented example as is (`user-variables: []`): a dead letter, keyed by id.
    let records = run(
        &*p,
        &signed("mailgun/delivered-uncorrelated.json", &token(9)),
    )
    .await
    .expect("accepted");
    let dl = dead_letters(&records);
    assert_eq!(records.len(), 1);
    assert_eq!(dl[0].reason, "no_message_id");
    assert_eq!(dl[0].event_type.as_deref(), Some("delivered"));
    assert_eq!(
        dl[0].dedup_key.as_deref(),
        Some(id_key(SOURCE, "MXcc2gEpS-eN8HfkOnmK2w").as_str())
    );
    let doc: Value =
        serde_json::from_slice(&fixture("mailgun/delivered-uncorrelated.json")).expect("json");
    assert_eq!(dl[0].payload, doc["event-data"].to_string());
}

#[test]
fn failure_variants_and_other_events_map_as_documented() {
    let machine = crate::machine::MachineDetector::default();
    let ctx = ParseContext { machine: &machine };
    let base = |extra: Value| {
        let mut d = serde_json::json!({
            "event": "failed", "id": "x", "timestamp": 1770918175.5,
            "user-variables": {"reachly_message_id": M_HARD}
        });
        if let (Some(d), Some(x)) = (d.as_object_mut(), extra.as_object()) {
            for (k, v) in x {
                d.insert(k.clone(), v.clone());
            }
        }
        d
    };
    let map = |d: Value| match map_event(&d, None, Utc::now(), &ctx) {
        Record::Event(e) => (e.event_type, e.bounce_class, e.error_message),
        Record::DeadLetter(dl) => panic!("dead letter {dl:?}"),
    };
    let suppressed = base(
        serde_json::json!({"severity": "permanent", "reason": "suppress-bounce",
        "delivery-status": {"code": 605, "description": "Not delivering to previously bounced address", "message": ""}}),
    );
    assert_eq!(
        map(suppressed),
        (
            EventType::Dropped,
            None,
            Some("605 Not delivering to previously bounced address".into())
        )
    );
    let expired = base(serde_json::json!({"severity": "permanent", "reason": "old"}));
    assert_eq!(map(expired).1, Some(BounceClass::Soft));
    let soft = base(
        serde_json::json!({"severity": "permanent", "reason": "bounce",
        "delivery-status": {"bounce-type": "soft"}}),
    );
    assert_eq!(map(soft).1, Some(BounceClass::Soft));
    // Without bounce-type, only a dead mailbox (5.1.x) is hard; without anything, soft.
    let no_severity = base(serde_json::json!({}));
    assert_eq!(
        map(no_severity),
        (
            EventType::Bounced,
            Some(BounceClass::Soft),
            Some("failed".into())
        )
    );
    let unknown_user = base(
        serde_json::json!({"severity": "permanent", "reason": "bounce",
        "delivery-status": {"code": 550, "message": "5.1.1 The email account that you tried to reach does not exist."}}),
    );
    assert_eq!(map(unknown_user).1, Some(BounceClass::Hard));
    let enhanced = base(
        serde_json::json!({"severity": "permanent", "reason": "bounce",
        "delivery-status": {"code": 550, "enhanced-code": "5.1.10", "message": "Recipient address rejected"}}),
    );
    assert_eq!(map(enhanced).1, Some(BounceClass::Hard));
    let policy = base(
        serde_json::json!({"severity": "permanent", "reason": "bounce",
        "delivery-status": {"code": 550, "message": "5.7.1 Message rejected due to local policy"}}),
    );
    assert_eq!(map(policy).1, Some(BounceClass::Soft));
    let typed_soft = base(
        serde_json::json!({"severity": "permanent", "reason": "bounce",
        "delivery-status": {"bounce-type": "soft", "message": "5.1.1 no such user"}}),
    );
    assert_eq!(map(typed_soft).1, Some(BounceClass::Soft));
    let rejected = base(serde_json::json!({"event": "rejected",
        "reject": {"reason": "Sandbox subdomains are for test purposes only"}}));
    assert_eq!(
        map(rejected),
        (
            EventType::Dropped,
            None,
            Some("Sandbox subdomains are for test purposes only".into())
        )
    );
    // A bot-flagged open is machine traffic; the header echo correlates.
    let bot = serde_json::json!({"event": "opened", "id": "o", "timestamp": 1770918175,
        "client-info": {"bot": "apple", "user-agent": "Mozilla/5.0"},
        "message": {"headers": {"X-Reachly-Message-Id": M_ENGAGED}}});
    match map_event(&bot, None, Utc::now(), &ctx) {
        Record::Event(e) => {
            assert_eq!(e.machine_reason.as_deref(), Some("mailgun_bot:apple"));
            assert_eq!(e.message_id.to_string(), M_ENGAGED);
            assert_eq!(e.claimed_organization_id, None);
        }
        other => panic!("{other:?}"),
    }
    // Unknown events are dead letters keyed by their id (or the token).
    let stored = serde_json::json!({"event": "stored", "timestamp": 1770918175});
    match map_event(&stored, Some("tok"), Utc::now(), &ctx) {
        Record::DeadLetter(d) => {
            assert_eq!(d.reason, "unknown_event_type");
            assert_eq!(d.dedup_key.as_deref(), Some(id_key(SOURCE, "tok").as_str()));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_key_tampered_signature_missing_parts_and_stale_time_are_unauthorized() {
    let p = provider();
    let path = "mailgun/delivered.json";
    let unauthorized = |r: Result<Vec<Record>, WebhookError>| {
        assert!(matches!(r, Err(WebhookError::Unauthorized(_))), "{r:?}");
    };
    // Wrong key.
    unauthorized(run(&*p, &signed_with("key-other", path, &token(20), Utc::now())).await);
    // Signed fields changed after signing: timestamp, token, signature.
    for field in ["timestamp", "token", "signature"] {
        let req = signed(path, &token(21));
        let mut doc: Value = serde_json::from_slice(&req.body).expect("json");
        let v = doc["signature"][field].as_str().expect("string").to_owned();
        let changed = if field == "timestamp" {
            (v.parse::<i64>().expect("number") - 1).to_string()
        } else {
            // Change the last character to one it is not (a fixed "0" left a signature
            // that already ended in 0 unchanged, about one run in sixteen).
            let last = if v.ends_with('0') { '1' } else { '0' };
            format!("{}{last}", &v[..v.len() - 1])
        };
        doc["signature"][field] = Value::from(changed);
        let body = serde_json::to_vec(&doc).expect("json");
        unauthorized(run(&*p, &TestRequest::post("mailgun", body).at(req.received_at)).await);
    }
    // Missing signature object, or any part of it.
    for field in ["signature", "timestamp", "token"] {
        let req = signed(path, &token(22));
        let mut doc: Value = serde_json::from_slice(&req.body).expect("json");
        if field == "signature" {
            doc.as_object_mut().expect("object").remove("signature");
        } else {
            doc["signature"]
                .as_object_mut()
                .expect("object")
                .remove(field);
        }
        let body = serde_json::to_vec(&doc).expect("json");
        unauthorized(run(&*p, &TestRequest::post("mailgun", body)).await);
    }
    let garbage = signed(path, &token(23));
    let mut doc: Value = serde_json::from_slice(&garbage.body).expect("json");
    doc["signature"]["signature"] = Value::from("zz-not-hex");
    unauthorized(
        run(
            &*p,
            &TestRequest::post("mailgun", serde_json::to_vec(&doc).expect("json")),
        )
        .await,
    );

    // Correctly signed past the retry schedule plus skew, or 16 minutes ahead: stale.
    for skew in [-(8 * 60 + 16), 16] {
        let signed_at = Utc::now() + chrono::TimeDelta::minutes(skew);
        let mut req = signed_with(KEY, path, &token(24), signed_at);
        req.received_at = Utc::now();
        assert_eq!(
            run(&*p, &req).await.err(),
            Some(WebhookError::Unauthorized(AuthFailure::StaleTimestamp))
        );
    }
    // The last retry, 7 h 35 min after the first attempt's signature, is inside the window.
    let signed_at = Utc::now() - chrono::TimeDelta::minutes(7 * 60 + 35);
    let mut req = signed_with(KEY, path, &token(25), signed_at);
    req.received_at = Utc::now();
    assert!(run(&*p, &req).await.is_ok());
}

#[tokio::test]
async fn a_subaccount_event_verifies_with_the_parent_signature() {
    let p = provider();
    let req = signed_with(
        "key-of-the-subaccount",
        "mailgun/delivered.json",
        &token(30),
        Utc::now(),
    );
    let mut doc: Value = serde_json::from_slice(&req.body).expect("json");
    let ts = doc["signature"]["timestamp"]
        .as_str()
        .expect("ts")
        .to_owned();
    doc["signature"]["parent-signature"] = Value::from(hmac_hex(KEY, &ts, &token(30)));
    let body = serde_json::to_vec(&doc).expect("json");
    assert!(run(&*p, &TestRequest::post("mailgun", body)).await.is_ok());
}

#[tokio::test]
async fn a_replayed_token_is_idempotent_for_the_same_body_and_refused_for_another() {
    let p = provider();
    // One store, as the instances of a deployment share the database's.
    let store = std::sync::Arc::new(crate::webhooks::MemoryReplayStore::default());
    let first = signed("mailgun/failed-permanent.json", &token(40)).with_replay(&store);
    let a = run(&*p, &first).await.expect("accepted");
    // The very same request again (a re-delivery): accepted, and the same key, so the
    // writer stores nothing new.
    let b = run(&*p, &first).await.expect("re-delivery accepted");
    assert_eq!(events(&a)[0].dedup_key, events(&b)[0].dedup_key);
    // Mailgun does not sign the event: a captured signature with an edited event is
    // refused because its token was already used with another body.
    let mut doc: Value = serde_json::from_slice(&first.body).expect("json");
    doc["event-data"]["user-variables"]["reachly_message_id"] = Value::from(M_ENGAGED);
    doc["event-data"]["event"] = Value::from("delivered");
    let forged = TestRequest::post("mailgun", serde_json::to_vec(&doc).expect("json"))
        .at(first.received_at)
        .with_replay(&store);
    assert_eq!(
        run(&*p, &forged).await.err(),
        Some(WebhookError::Unauthorized(AuthFailure::ReplayedToken))
    );
}

#[tokio::test]
async fn an_unavailable_replay_store_is_503_so_mailgun_retries() {
    struct Down;
    impl crate::webhooks::ReplayStore for Down {
        fn admit<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: [u8; 32],
            _: DateTime<Utc>,
            _: DateTime<Utc>,
        ) -> crate::webhooks::BoxFuture<'a, Result<bool, String>> {
            Box::pin(async { Err("database unreachable".to_string()) })
        }
    }
    let p = provider();
    let req = signed("mailgun/delivered.json", &token(60));
    let r = req.request();
    let r = WebhookRequest { replay: &Down, ..r };
    assert!(matches!(
        p.verify(&r).await,
        Err(WebhookError::Unavailable(_))
    ));
}

#[tokio::test]
async fn bad_bodies_and_content_types_get_the_right_error() {
    let p = provider();
    for body in [&b""[..], b"{", b"not json"] {
        assert!(
            matches!(
                run(&*p, &TestRequest::post("mailgun", body.to_vec())).await,
                Err(WebhookError::BadRequest(_))
            ),
            "{body:?}"
        );
    }
    // JSON without a signature cannot be authenticated.
    assert!(matches!(
        run(&*p, &TestRequest::post("mailgun", b"[]".to_vec())).await,
        Err(WebhookError::Unauthorized(_))
    ));
    // Signed, but no event-data.
    let ts = Utc::now().timestamp().to_string();
    let body = serde_json::json!({"signature": {"timestamp": ts, "token": token(50),
        "signature": hmac_hex(KEY, &ts, &token(50))}});
    assert!(matches!(
        run(&*p, &TestRequest::post("mailgun", body.to_string())).await,
        Err(WebhookError::BadRequest(_))
    ));
    // Mailgun's legacy form-encoded webhooks are not accepted.
    let form = signed("mailgun/delivered.json", &token(51))
        .header("content-type", "application/x-www-form-urlencoded");
    assert!(matches!(
        run(&*p, &form).await,
        Err(WebhookError::UnsupportedMediaType(_))
    ));
}

#[test]
fn from_config_is_absent_without_a_key_and_refuses_a_blank_one() {
    assert!(
        from_config(&no_secrets(), &no_network())
            .expect("ok")
            .is_none()
    );
    let mut cfg = no_secrets();
    cfg.mailgun_signing_key = Some(Secret::new("   "));
    let err = from_config(&cfg, &no_network()).err().expect("refused");
    assert!(err.contains("REACHLY_MAILGUN_SIGNING_KEY"), "{err}");
}

#[tokio::test]
async fn with_basic_auth_configured_a_signed_request_without_it_is_refused() {
    use base64::Engine as _;
    let mut cfg = no_secrets();
    cfg.mailgun_signing_key = Some(Secret::new(KEY));
    cfg.mailgun_basic_auth = Some(Secret::new("mailgun:s3cret"));
    let p = from_config(&cfg, &no_network())
        .expect("valid")
        .expect("configured");
    let req = signed("mailgun/delivered.json", &token(70));
    assert_eq!(
        run(&*p, &req).await.err(),
        Some(WebhookError::Unauthorized(AuthFailure::MissingCredentials))
    );
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let wrong = signed("mailgun/delivered.json", &token(71))
        .header("authorization", &format!("Basic {}", b64("mailgun:nope")));
    assert_eq!(
        run(&*p, &wrong).await.err(),
        Some(WebhookError::Unauthorized(AuthFailure::WrongCredentials))
    );
    let good = signed("mailgun/delivered.json", &token(72))
        .header("authorization", &format!("Basic {}", b64("mailgun:s3cret")));
    assert!(run(&*p, &good).await.is_ok());
    cfg.mailgun_basic_auth = Some(Secret::new("no-colon"));
    let err = from_config(&cfg, &no_network()).err().expect("refused");
    assert!(err.contains("REACHLY_MAILGUN_BASIC_AUTH"), "{err}");
}
