//! Unit tests of the SendGrid provider: verification and extraction without a server.

use super::*;
use crate::config::Secret;
use crate::event::Event;
use crate::webhooks::testkit::sign::{sendgrid_keypair as keypair, sendgrid_signature as sign};
use crate::webhooks::testkit::*;
use p256::ecdsa::SigningKey;

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

/// The key of an event without client data (no address, user agent, machine flag or link
/// position).
fn key_of(message: &str, event: &str, typ: &str, ts: &str, url: &str, sg_msg: &str) -> String {
    content_key(
        SOURCE,
        &[message, event, typ, ts, url, sg_msg, "", "", "", ""],
    )
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
            content_key(
                SOURCE,
                &[
                    M_ENGAGED,
                    "click",
                    "",
                    "1249948800",
                    "http://example.com/blog/news.html",
                    "sendgrid_internal_message_id",
                    "255.255.255.255",
                    "Mozilla/5.0 (iPhone; CPU iPhone OS 7_1_2 like Mac OS X) AppleWebKit/537.51.2 (KHTML, like Gecko) Version/7.0 Mobile/11D257 Safari/9537.53",
                    "",
                    "0",
                ]
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
    // Signed at a fixed second, presented one second later: signing "now" twice could
    // straddle a second boundary and sign exactly the shifted time.
    let at = Utc::now();
    let signed_ts = at.timestamp().to_string();
    let shifted = (at.timestamp() + 1).to_string();
    let moved = TestRequest::post("sendgrid", body.clone())
        .at(at)
        .header(TIMESTAMP_HEADER, &shifted)
        .header(SIGNATURE_HEADER, &sign(&sk, &signed_ts, &body));
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

    // Correctly signed, but past the 24-hour retry schedule plus skew (or 16 minutes
    // ahead): refused.
    for skew in [-(24 * 3600 + 16 * 60), 16 * 60] {
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

#[test]
fn only_an_invalid_address_is_a_hard_bounce() {
    use BounceClass::{Hard, Soft};
    for (typ, class, want) in [
        (Some("bounce"), Some("Invalid Address"), Hard),
        (Some("bounce"), None, Hard),
        (None, Some("invalid address"), Hard),
        (Some("bounce"), Some("Reputation"), Soft),
        (Some("bounce"), Some("Content"), Soft),
        (Some("bounce"), Some("Technical"), Soft),
        (Some("bounce"), Some("Frequency or Volume"), Soft),
        (Some("bounce"), Some("Mailbox Unavailable"), Soft),
        (Some("bounce"), Some("Unclassified"), Soft),
        (Some("blocked"), Some("Invalid Address"), Soft),
        (None, None, Soft),
        (Some("new-type"), None, Soft),
    ] {
        assert_eq!(bounce_class(typ, class), want, "{typ:?} {class:?}");
    }
}
