//! SendGrid's signed event webhook end to end: signed documented events over a real socket
//! into a real PostgreSQL, re-deliveries, and every refusal writing nothing.

use p256::ecdsa::SigningKey;
use reachly_ingest::config::Secret;
use reachly_ingest::webhooks::testkit::sign::{sendgrid_keypair, sendgrid_signature};
use serde_json::Value;

use crate::webhooks_common::*;

const SIG: &str = "x-twilio-email-event-webhook-signature";
const TS: &str = "x-twilio-email-event-webhook-timestamp";

/// A SendGrid key pair from the test kit.
struct Signer256 {
    key: SigningKey,
    public_key_b64: String,
}

impl Signer256 {
    fn new() -> Signer256 {
        let (key, public_key_b64) = sendgrid_keypair();
        Signer256 {
            key,
            public_key_b64,
        }
    }

    fn public_key_b64(&self) -> String {
        self.public_key_b64.clone()
    }

    /// (timestamp, signature) over `timestamp + body`, signed `skew_secs` from now.
    fn sign(&self, body: &[u8], skew_secs: i64) -> (String, String) {
        let ts = (chrono::Utc::now().timestamp() + skew_secs).to_string();
        let sig = sendgrid_signature(&self.key, &ts, body);
        (ts, sig)
    }
}

async fn sendgrid_world(max_bytes: Option<usize>) -> (World, Signer256) {
    let key = Signer256::new();
    let pk = key.public_key_b64();
    let w = world(move |a| {
        a.webhooks.sendgrid_public_key = Some(Secret::new(pk));
        if let Some(n) = max_bytes {
            a.webhooks.webhook_max_bytes = n;
        }
    })
    .await;
    (w, key)
}

async fn post_signed(w: &World, key: &Signer256, body: &str) -> reqwest::Response {
    let (ts, sig) = key.sign(body.as_bytes(), 0);
    w.app
        .post_webhook(
            "sendgrid",
            &[(TS, &ts), (SIG, &sig), ("content-type", "application/json")],
            body.to_string(),
        )
        .await
}

#[tokio::test]
async fn documented_events_are_stored_as_exactly_these_rows() {
    let (w, key) = sendgrid_world(None).await;
    let r = post_signed(&w, &key, &w.fixture("sendgrid/events.json")).await;
    assert_eq!(r.status(), 200);
    let ts = "2017-12-15T00:59:29Z";

    // Engaged: processed, delivered, open, click (the click example is dated 2009).
    let ev = w.app.events(w.msgs[ENGAGED].message).await;
    assert_eq!(
        w.types(ENGAGED).await,
        ["clicked", "delivered", "opened", "sent"]
    );
    for e in &ev {
        assert_eq!(e.provider, "sendgrid");
        assert_eq!(e.organization_id, w.org());
        assert!(
            e.dedup_key
                .as_deref()
                .is_some_and(|k| k.starts_with("sendgrid:h:"))
        );
    }
    let of = |t: &str| {
        ev.iter()
            .find(|e| e.event_type == t)
            .expect("event of that type")
    };
    same_instant(Some(of("clicked").created_at), "2009-08-11T00:00:00Z");
    assert_eq!(
        of("clicked").link_url.as_deref(),
        Some("http://example.com/blog/news.html")
    );
    assert_eq!(of("clicked").ip_address.as_deref(), Some("255.255.255.0"));
    let open = of("opened");
    same_instant(Some(open.created_at), ts);
    assert_eq!(open.metadata["sg_event_id"], "FOTFFO0ecsBE-zxFXfs6WA==");
    assert_eq!(open.metadata.get("machine"), None);
    assert!(
        open.user_agent
            .as_deref()
            .is_some_and(|u| u.starts_with("Mozilla/4.0"))
    );
    let m = w.app.message(w.msgs[ENGAGED].message).await;
    assert_eq!(m.status.as_deref(), Some("clicked"));
    same_instant(m.sent_at, ts);
    same_instant(m.delivered_at, ts);
    same_instant(m.opened_at, "2009-08-11T00:00:00Z"); // a click implies an open
    same_instant(m.clicked_at, "2009-08-11T00:00:00Z");
    assert_eq!(m.error_message, None);
    assert_eq!(w.contact(ENGAGED).await, "active");

    // Hard bounce: bounced, contact suppressed.
    assert_eq!(w.types(HARD).await, ["bounced"]);
    let bounce = &w.app.events(w.msgs[HARD].message).await[0];
    assert_eq!(bounce.metadata["bounce_class"], "hard");
    assert_eq!(bounce.metadata["bounce_classification"], "Invalid Address");
    let m = w.app.message(w.msgs[HARD].message).await;
    assert_eq!(m.status.as_deref(), Some("bounced"));
    assert_eq!(
        m.error_message.as_deref(),
        Some("500 unknown recipient (status 5.0.0)")
    );
    assert_eq!(w.contact(HARD).await, "bounced");

    // Deferred and blocked (soft): the error only.
    let soft = w.app.events(w.msgs[SOFT].message).await;
    assert_eq!(w.types(SOFT).await, ["bounced", "deferred"]);
    assert!(soft.iter().any(|e| e.metadata["bounce_class"] == "soft"));
    let m = w.app.message(w.msgs[SOFT].message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    // Two errors of one instant: the merge keeps the greater text (order-independent).
    assert_eq!(
        m.error_message.as_deref(),
        Some("500 unknown recipient (status 5.0.0)")
    );
    assert_eq!(w.contact(SOFT).await, "active");

    // Complaint, unsubscribes, drop.
    assert_eq!(w.types(COMPLAINT).await, ["complained"]);
    assert_eq!(
        w.app
            .message(w.msgs[COMPLAINT].message)
            .await
            .status
            .as_deref(),
        Some("complained")
    );
    assert_eq!(w.contact(COMPLAINT).await, "unsubscribed");
    assert_eq!(w.types(UNSUB).await, ["unsubscribed", "unsubscribed"]);
    assert_eq!(
        w.app.message(w.msgs[UNSUB].message).await.status.as_deref(),
        Some("unsubscribed")
    );
    assert_eq!(w.contact(UNSUB).await, "unsubscribed");
    assert_eq!(w.types(DROPPED).await, ["dropped"]);
    let m = w.app.message(w.msgs[DROPPED].message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    assert_eq!(
        m.error_message.as_deref(),
        Some("Bounced Address (status 5.0.0)")
    );
    assert_eq!(w.contact(DROPPED).await, "active");

    assert_eq!(total_events(&w.app).await, 11);
    let dl = dead_letters(&w.app).await;
    let got: Vec<_> = dl
        .iter()
        .map(|d| (d.reason.as_str(), d.event_type.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("no_message_id", Some("open")),
            ("unknown_event_type", Some("account_status_change")),
            ("unknown_event_type", Some("group_resubscribe")),
        ]
    );
    assert!(
        dl.iter()
            .all(|d| d.provider == "sendgrid" && d.dedup_key.is_some())
    );
    let raw: Value = serde_json::from_str(&dl[0].payload).expect("payload is the event's JSON");
    assert_eq!(raw["email"], "john.doe@sendgrid.com");
}

#[tokio::test]
async fn re_deliveries_and_new_sg_event_ids_change_nothing() {
    let (w, key) = sendgrid_world(None).await;
    let body = w.fixture("sendgrid/events.json");
    assert_eq!(post_signed(&w, &key, &body).await.status(), 200);
    let before = snapshot(&w.app).await;
    assert_eq!(before.events.len(), 11);

    for _ in 0..2 {
        assert_eq!(post_signed(&w, &key, &body).await.status(), 200);
    }
    // SendGrid re-sends with new sg_event_ids (and re-serialized JSON).
    let mut doc: Value = serde_json::from_str(&body).expect("json");
    for (i, ev) in doc.as_array_mut().expect("array").iter_mut().enumerate() {
        ev["sg_event_id"] = Value::from(format!("resent-{i}"));
    }
    let resent = serde_json::to_string_pretty(&doc).expect("json");
    assert_eq!(post_signed(&w, &key, &resent).await.status(), 200);
    assert_eq!(snapshot(&w.app).await, before);
    assert!(w.app.metric("reachly_events_duplicate_total").await >= 33.0);
}

/// What is wrong, the headers, the body.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn bad_signatures_are_401_and_write_nothing() {
    let (w, key) = sendgrid_world(None).await;
    let body = w.fixture("sendgrid/events.json");
    let json = ("content-type", "application/json");

    let (ts, sig) = key.sign(body.as_bytes(), 0);
    let tampered = body.replacen("processed", "delivered", 1);
    let other = Signer256::new();
    let (ots, osig) = other.sign(body.as_bytes(), 0);
    let (sts, ssig) = key.sign(body.as_bytes(), -(24 * 3600 + 16 * 60));
    let cases: Vec<Case> = vec![
        (
            "tampered body",
            vec![(TS, &ts), (SIG, &sig), json],
            &tampered,
        ),
        ("wrong key", vec![(TS, &ots), (SIG, &osig), json], &body),
        ("missing signature", vec![(TS, &ts), json], &body),
        ("missing timestamp", vec![(SIG, &sig), json], &body),
        (
            "stale timestamp",
            vec![(TS, &sts), (SIG, &ssig), json],
            &body,
        ),
    ];
    for (what, headers, body) in &cases {
        let r = w
            .app
            .post_webhook("sendgrid", headers, body.to_string())
            .await;
        assert_eq!(r.status(), 401, "{what}");
    }
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
    assert_eq!(
        w.app
            .metric(r#"reachly_webhook_auth_failures_total{provider="sendgrid"}"#)
            .await,
        cases.len() as f64
    );
}

#[tokio::test]
async fn malformed_empty_wrongly_typed_and_oversized_bodies_are_4xx_and_write_nothing() {
    let (w, key) = sendgrid_world(Some(64 * 1024)).await;
    assert_eq!(
        post_signed(&w, &key, "{\"not\": \"an array\"")
            .await
            .status(),
        400
    );
    assert_eq!(post_signed(&w, &key, "").await.status(), 400);
    assert_eq!(
        post_signed(&w, &key, "{\"event\":\"open\"}").await.status(),
        400
    );
    // Bodies past 16 KiB are parsed on the blocking pool (src/http/webhook.rs): the same
    // refusals there, for a truncated batch and for a batch that is not an array of events.
    let events: Vec<Value> = (0..400)
        .map(|i| serde_json::json!({"event": "delivered", "timestamp": 1_700_000_000 + i}))
        .collect();
    let whole = serde_json::to_string(&events).expect("json");
    assert!(whole.len() > 16 * 1024 && whole.len() < 64 * 1024);
    let truncated = &whole[..whole.len() - 10];
    assert_eq!(post_signed(&w, &key, truncated).await.status(), 400);
    let not_an_array = format!("{{\"events\": {whole}}}");
    assert_eq!(post_signed(&w, &key, &not_an_array).await.status(), 400);
    let (ts, sig) = key.sign(b"[]", 0);
    let form = w
        .app
        .post_webhook(
            "sendgrid",
            &[
                (TS, &ts),
                (SIG, &sig),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "[]",
        )
        .await;
    assert_eq!(form.status(), 415);
    // Past REACHLY_WEBHOOK_MAX_BYTES (64 KiB here): 413, even when correctly signed.
    let big: Vec<Value> = (0..2000)
        .map(|i| {
            serde_json::json!({"event": "delivered", "timestamp": 1_700_000_000 + i,
                "reachly_message_id": w.msgs[0].message.to_string()})
        })
        .collect();
    let big = serde_json::to_string(&big).expect("json");
    assert!(big.len() > 64 * 1024);
    assert_eq!(post_signed(&w, &key, &big).await.status(), 413);
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
}

#[tokio::test]
async fn a_thousand_event_batch_is_accepted_in_one_request_and_written_in_full() {
    let (w, key) = sendgrid_world(None).await;
    let types = ["processed", "delivered", "open", "click", "deferred"];
    let batch: Vec<Value> = (0..1000)
        .map(|i| {
            let m = &w.msgs[i % w.msgs.len()];
            serde_json::json!({
                "email": format!("r{i}@example.com"),
                "timestamp": 1_700_000_000 + i as i64,
                "event": types[i % types.len()],
                "url": "https://example.com/landing",
                "response": "451 try later",
                "sg_event_id": format!("ev-{i}"),
                "sg_message_id": format!("sgm-{}", i % w.msgs.len()),
                "reachly_message_id": m.message.to_string(),
                "reachly_organization_id": m.org.to_string(),
            })
        })
        .collect();
    let body = serde_json::to_string(&batch).expect("json");
    let r = post_signed(&w, &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(total_events(&w.app).await, 1000);
    assert_eq!(
        w.app
            .count("SELECT count(DISTINCT dedup_key) FROM email_events WHERE provider = 'sendgrid'")
            .await,
        1000
    );
    assert_eq!(total_dead_letters(&w.app).await, 0);
    // Every message was clicked (i % 6 and i % 5 meet on every residue).
    for m in &w.msgs {
        assert_eq!(
            w.app.message(m.message).await.status.as_deref(),
            Some("clicked")
        );
    }
}

async fn post_signed_at(w: &World, key: &Signer256, body: &str, skew: i64) -> reqwest::Response {
    let (ts, sig) = key.sign(body.as_bytes(), skew);
    w.app
        .post_webhook(
            "sendgrid",
            &[(TS, &ts), (SIG, &sig), ("content-type", "application/json")],
            body.to_string(),
        )
        .await
}

#[tokio::test]
async fn same_second_opens_and_clicks_from_different_clients_are_distinct_rows_and_a_redelivery_adds_none()
 {
    let (w, key) = sendgrid_world(None).await;
    let body = w.fixture("sendgrid/same-second.json");
    assert_eq!(post_signed(&w, &key, &body).await.status(), 200);
    // The documented open, the Apple proxy's fetch of it and a phone's, all in one second;
    // the documented click, a scanner's click of it, and the same URL at its second place.
    let ev = w.app.events(w.msgs[ENGAGED].message).await;
    assert_eq!(
        w.types(ENGAGED).await,
        [
            "clicked", "clicked", "clicked", "opened", "opened", "opened"
        ]
    );
    let machine: Vec<bool> = {
        let mut m: Vec<bool> = ev
            .iter()
            .filter(|e| e.event_type == "opened")
            .map(|e| e.metadata.get("machine") == Some(&Value::Bool(true)))
            .collect();
        m.sort();
        m
    };
    assert_eq!(machine, [false, false, true]);
    let before = snapshot(&w.app).await;
    // Re-delivered (SendGrid retries the whole batch, re-signed or not): nothing new.
    assert_eq!(post_signed_at(&w, &key, &body, 5).await.status(), 200);
    assert_eq!(snapshot(&w.app).await, before);
}

#[tokio::test]
async fn a_retry_signed_hours_ago_is_stored_and_one_past_the_schedule_is_not() {
    let (w, key) = sendgrid_world(None).await;
    let body = w.fixture("sendgrid/events.json");
    // SendGrid retries for up to 24 hours; whether it re-signs is not documented.
    assert_eq!(
        post_signed_at(&w, &key, &body, -23 * 3600).await.status(),
        200
    );
    assert_eq!(w.types(HARD).await, ["bounced"]);
    let before = snapshot(&w.app).await;
    let stale = post_signed_at(&w, &key, &body, -(24 * 3600 + 16 * 60)).await;
    assert_eq!(stale.status(), 401);
    let future = post_signed_at(&w, &key, &body, 16 * 60).await;
    assert_eq!(future.status(), 401);
    assert_eq!(snapshot(&w.app).await, before);
}

#[tokio::test]
async fn only_an_invalid_address_is_a_hard_bounce() {
    let (w, key) = sendgrid_world(None).await;
    let events: Vec<Value> =
        serde_json::from_str(&w.fixture("sendgrid/events.json")).expect("json");
    let bounce = events
        .iter()
        .find(|e| e["event"] == "bounce" && e["type"] == "bounce")
        .expect("the documented bounce")
        .clone();
    let with = |msg: usize, class: Option<&str>, typ: Option<&str>, second: i64| {
        let mut b = bounce.clone();
        b["reachly_message_id"] = Value::from(w.msgs[msg].message.to_string());
        b["timestamp"] = Value::from(1513299569 + second);
        match class {
            Some(c) => b["bounce_classification"] = Value::from(c),
            None => {
                b.as_object_mut()
                    .expect("object")
                    .remove("bounce_classification");
            }
        }
        match typ {
            Some(t) => b["type"] = Value::from(t),
            None => {
                b.as_object_mut().expect("object").remove("type");
            }
        }
        b
    };
    let batch = Value::Array(vec![
        with(HARD, Some("Invalid Address"), Some("bounce"), 0),
        with(SOFT, Some("Reputation"), Some("bounce"), 1),
        with(SOFT, Some("Content"), Some("bounce"), 2),
        with(SOFT, Some("Technical"), Some("bounce"), 3),
        with(SOFT, Some("Frequency or Volume"), Some("bounce"), 4),
        with(SOFT, Some("Invalid Address"), Some("blocked"), 5),
        with(SOFT, None, None, 6),
        with(SOFT, None, Some("something-new"), 7),
    ]);
    assert_eq!(
        post_signed(&w, &key, &batch.to_string()).await.status(),
        200
    );
    assert_eq!(w.types(HARD).await, ["bounced"]);
    assert_eq!(w.contact(HARD).await, "bounced");
    let soft = w.app.events(w.msgs[SOFT].message).await;
    assert_eq!(soft.len(), 7);
    for e in &soft {
        assert_eq!(e.metadata["bounce_class"], "soft", "{:?}", e.metadata);
    }
    assert_eq!(w.contact(SOFT).await, "active");
}
