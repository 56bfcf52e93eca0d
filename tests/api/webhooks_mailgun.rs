//! Mailgun webhooks end to end: each documented event signed with a test key and posted over
//! a real socket into a real PostgreSQL; re-deliveries; refusals writing nothing.

use reachly_ingest::config::Secret;
use reachly_ingest::webhooks::testkit::sign::mailgun_signature as hmac_hex;
use serde_json::Value;

use crate::helpers::spawn_app_on;
use crate::webhooks_common::*;

const KEY: &str = "key-0123456789abcdef-test";

const FIXTURES: [&str; 9] = [
    "mailgun/accepted.json",
    "mailgun/delivered.json",
    "mailgun/opened.json",
    "mailgun/clicked.json",
    "mailgun/failed-permanent.json",
    "mailgun/failed-temporary.json",
    "mailgun/unsubscribed.json",
    "mailgun/complained.json",
    "mailgun/delivered-uncorrelated.json",
];

fn fresh_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), "0123456789abcdefff")
}

/// The body with a signature made with `key`, `skew_secs` from now, for `token`.
fn sign(body: &str, key: &str, token: &str, skew_secs: i64) -> String {
    let mut doc: Value = serde_json::from_str(body).expect("json");
    let ts = (chrono::Utc::now().timestamp() + skew_secs).to_string();
    doc["signature"] = serde_json::json!({
        "timestamp": ts, "token": token, "signature": hmac_hex(key, &ts, token)
    });
    serde_json::to_string(&doc).expect("json")
}

async fn mailgun_world(max_bytes: Option<usize>) -> World {
    world(move |a| {
        a.webhooks.mailgun_signing_key = Some(Secret::new(KEY));
        if let Some(n) = max_bytes {
            a.webhooks.webhook_max_bytes = n;
        }
    })
    .await
}

async fn post(w: &World, body: String) -> reqwest::Response {
    w.app
        .post_webhook("mailgun", &[("content-type", "application/json")], body)
        .await
}

async fn post_all(w: &World) -> Vec<String> {
    let mut sent = Vec::new();
    for f in FIXTURES {
        let body = sign(&w.fixture(f), KEY, &fresh_token(), 0);
        assert_eq!(post(w, body.clone()).await.status(), 200, "{f}");
        sent.push(body);
    }
    sent
}

#[tokio::test]
async fn documented_events_are_stored_as_exactly_these_rows() {
    let w = mailgun_world(None).await;
    post_all(&w).await;

    let ev = w.app.events(w.msgs[ENGAGED].message).await;
    assert_eq!(
        w.types(ENGAGED).await,
        ["clicked", "delivered", "opened", "sent"]
    );
    for e in &ev {
        assert_eq!(e.provider, "mailgun");
        assert_eq!(e.organization_id, w.org());
    }
    let of = |t: &str| {
        ev.iter()
            .find(|e| e.event_type == t)
            .expect("event of that type")
    };
    assert_eq!(
        of("sent").dedup_key.as_deref(),
        Some("mailgun:id:CCXMjJ7nQi2N3BPigGOdgQ")
    );
    assert_eq!(
        of("clicked").link_url.as_deref(),
        Some("https://sample.mailgun.com")
    );
    assert_eq!(of("opened").ip_address.as_deref(), Some("38.142.208.0"));
    let m = w.app.message(w.msgs[ENGAGED].message).await;
    assert_eq!(m.status.as_deref(), Some("clicked"));
    same_instant(m.sent_at, "2026-02-03T19:26:38.372891Z");
    same_instant(m.delivered_at, "2026-02-03T19:20:31.658528Z");
    same_instant(m.opened_at, "2026-02-05T21:31:14.554933Z");
    same_instant(m.clicked_at, "2026-02-05T21:31:58.664868Z");
    assert_eq!(w.contact(ENGAGED).await, "active");

    assert_eq!(w.types(HARD).await, ["bounced"]);
    let hard = &w.app.events(w.msgs[HARD].message).await[0];
    assert_eq!(hard.metadata["bounce_class"], "hard");
    assert_eq!(hard.metadata["delivery_code"], 550);
    let m = w.app.message(w.msgs[HARD].message).await;
    assert_eq!(m.status.as_deref(), Some("bounced"));
    assert!(
        m.error_message
            .as_deref()
            .is_some_and(|e| e.starts_with("550 5.5.0 Requested action not taken"))
    );
    assert_eq!(w.contact(HARD).await, "bounced");

    assert_eq!(w.types(SOFT).await, ["deferred"]);
    let m = w.app.message(w.msgs[SOFT].message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    assert!(
        m.error_message
            .as_deref()
            .is_some_and(|e| e.starts_with("421 "))
    );
    assert_eq!(w.contact(SOFT).await, "active");

    assert_eq!(w.types(COMPLAINT).await, ["complained"]);
    assert_eq!(w.contact(COMPLAINT).await, "unsubscribed");
    assert_eq!(w.types(UNSUB).await, ["unsubscribed"]);
    assert_eq!(
        w.app.message(w.msgs[UNSUB].message).await.status.as_deref(),
        Some("unsubscribed")
    );
    assert_eq!(w.contact(UNSUB).await, "unsubscribed");
    assert!(w.types(DROPPED).await.is_empty());

    assert_eq!(total_events(&w.app).await, 8);
    let dl = dead_letters(&w.app).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, "no_message_id");
    assert_eq!(dl[0].event_type.as_deref(), Some("delivered"));
    assert_eq!(
        dl[0].dedup_key.as_deref(),
        Some("mailgun:id:MXcc2gEpS-eN8HfkOnmK2w")
    );
    let raw: Value = serde_json::from_str(&dl[0].payload).expect("json");
    assert_eq!(raw["id"], "MXcc2gEpS-eN8HfkOnmK2w");
}

#[tokio::test]
async fn re_deliveries_change_nothing() {
    let w = mailgun_world(None).await;
    let sent = post_all(&w).await;
    let before = snapshot(&w.app).await;
    assert_eq!(before.events.len(), 8);
    assert_eq!(before.dead_letters.len(), 1);
    // The same requests again (same tokens), twice...
    for _ in 0..2 {
        for body in &sent {
            assert_eq!(post(&w, body.clone()).await.status(), 200);
        }
    }
    // ...and re-signed with new tokens, as a later retry would be.
    for f in FIXTURES {
        let body = sign(&w.fixture(f), KEY, &fresh_token(), 0);
        assert_eq!(post(&w, body).await.status(), 200, "{f}");
    }
    assert_eq!(snapshot(&w.app).await, before);
}

#[tokio::test]
async fn bad_signatures_stale_times_and_replays_are_401_and_write_nothing() {
    let w = mailgun_world(None).await;
    let body = w.fixture("mailgun/failed-permanent.json");
    let good = sign(&body, KEY, &fresh_token(), 0);

    let mut tampered: Value = serde_json::from_str(&good).expect("json");
    let ts = tampered["signature"]["timestamp"]
        .as_str()
        .expect("ts")
        .to_owned();
    tampered["signature"]["timestamp"] =
        Value::from((ts.parse::<i64>().expect("n") + 1).to_string());
    let mut no_signature: Value = serde_json::from_str(&good).expect("json");
    no_signature
        .as_object_mut()
        .expect("object")
        .remove("signature");
    let cases = [
        ("tampered signed field", tampered.to_string()),
        ("wrong key", sign(&body, "key-wrong", &fresh_token(), 0)),
        ("missing signature", no_signature.to_string()),
        (
            "stale timestamp",
            sign(&body, KEY, &fresh_token(), -(8 * 3600 + 16 * 60)),
        ),
    ];
    for (what, b) in &cases {
        assert_eq!(post(&w, b.clone()).await.status(), 401, "{what}");
    }
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);

    // A captured signature reused with an edited event: its token is known, the body is not.
    assert_eq!(post(&w, good.clone()).await.status(), 200);
    let before = snapshot(&w.app).await;
    let mut forged: Value = serde_json::from_str(&good).expect("json");
    forged["event-data"]["id"] = Value::from("forged-id");
    forged["event-data"]["event"] = Value::from("complained");
    assert_eq!(post(&w, forged.to_string()).await.status(), 401);
    assert_eq!(snapshot(&w.app).await, before);
    assert_eq!(
        w.app
            .metric(r#"reachly_webhook_auth_failures_total{provider="mailgun"}"#)
            .await,
        (cases.len() + 1) as f64
    );
}

#[tokio::test]
async fn malformed_empty_wrongly_typed_and_oversized_bodies_are_4xx_and_write_nothing() {
    let w = mailgun_world(Some(16 * 1024)).await;
    assert_eq!(post(&w, "{\"signature\": ".into()).await.status(), 400);
    assert_eq!(post(&w, String::new()).await.status(), 400);
    // Signed, but no event-data.
    let signed_empty = sign("{}", KEY, &fresh_token(), 0);
    assert_eq!(post(&w, signed_empty).await.status(), 400);
    let form = w
        .app
        .post_webhook(
            "mailgun",
            &[("content-type", "application/x-www-form-urlencoded")],
            "event=delivered&timestamp=1&token=x&signature=y",
        )
        .await;
    assert_eq!(form.status(), 415);
    let mut big: Value = serde_json::from_str(&w.fixture("mailgun/delivered.json")).expect("json");
    big["event-data"]["padding"] = Value::from("x".repeat(20 * 1024));
    let big = sign(&big.to_string(), KEY, &fresh_token(), 0);
    assert_eq!(post(&w, big).await.status(), 413);
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
}

#[tokio::test]
async fn a_retry_hours_late_with_its_original_signature_is_stored_and_one_past_the_schedule_is_not()
{
    let w = mailgun_world(None).await;
    // Mailgun retries after 5, 10, 15 min, 1, 2 and 4 h with the signature of the first
    // attempt: the last retry arrives about 7.5 h after it was signed.
    let late = sign(
        &w.fixture("mailgun/failed-permanent.json"),
        KEY,
        &fresh_token(),
        -(7 * 3600 + 35 * 60),
    );
    assert_eq!(post(&w, late).await.status(), 200);
    assert_eq!(w.types(HARD).await, ["bounced"]);
    assert_eq!(w.contact(HARD).await, "bounced");
    // Beyond the schedule plus skew (8 h 15 min): refused, nothing written.
    let before = snapshot(&w.app).await;
    let stale = sign(
        &w.fixture("mailgun/delivered.json"),
        KEY,
        &fresh_token(),
        -(8 * 3600 + 16 * 60),
    );
    assert_eq!(post(&w, stale).await.status(), 401);
    assert_eq!(snapshot(&w.app).await, before);
}

#[tokio::test]
async fn a_replayed_signature_with_a_forged_body_at_a_second_instance_is_401_and_writes_nothing() {
    let w = mailgun_world(None).await;
    let second = spawn_app_on(
        &w.app.db_url,
        |a| a.webhooks.mailgun_signing_key = Some(Secret::new(KEY)),
        None,
    )
    .await;
    // The genuine delivery notice reaches the first instance.
    let genuine = sign(&w.fixture("mailgun/delivered.json"), KEY, &fresh_token(), 0);
    assert_eq!(post(&w, genuine.clone()).await.status(), 200);
    let before = snapshot(&w.app).await;
    // Its captured signature, with a forged hard bounce of another contact, at the second.
    let mut forged: Value = serde_json::from_str(&genuine).expect("json");
    let bounce: Value =
        serde_json::from_str(&w.fixture("mailgun/failed-permanent.json")).expect("json");
    forged["event-data"] = bounce["event-data"].clone();
    let r = second
        .post_webhook(
            "mailgun",
            &[("content-type", "application/json")],
            forged.to_string(),
        )
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(snapshot(&w.app).await, before);
    assert_eq!(w.contact(HARD).await, "active");
    // The genuine request re-delivered to the second instance is still accepted (same body).
    let r = second
        .post_webhook("mailgun", &[("content-type", "application/json")], genuine)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(snapshot(&w.app).await, before);
    second.stop().await;
}

#[tokio::test]
async fn a_permanent_failure_without_bounce_type_is_hard_only_for_a_dead_mailbox() {
    let w = mailgun_world(None).await;
    // Captured 2018 shape: no bounce-type; 550 5.1.1 "does not exist".
    let dead = w.fixture("mailgun/failed-permanent-no-bounce-type.json");
    assert_eq!(
        post(&w, sign(&dead, KEY, &fresh_token(), 0)).await.status(),
        200
    );
    assert_eq!(w.types(HARD).await, ["bounced"]);
    let e = &w.app.events(w.msgs[HARD].message).await[0];
    assert_eq!(e.metadata["bounce_class"], "hard");
    assert_eq!(w.contact(HARD).await, "bounced");
    // The same shape refused for a policy reason (5.7.1): the address is not known dead.
    let mut blocked: Value = serde_json::from_str(&dead).expect("json");
    blocked["event-data"]["delivery-status"]["message"] =
        Value::from("5.7.1 Message rejected due to local policy");
    blocked["event-data"]["user-variables"]["reachly_message_id"] =
        Value::from(w.msgs[SOFT].message.to_string());
    assert_eq!(
        post(&w, sign(&blocked.to_string(), KEY, &fresh_token(), 0))
            .await
            .status(),
        200
    );
    assert_eq!(w.types(SOFT).await, ["bounced"]);
    let e = &w.app.events(w.msgs[SOFT].message).await[0];
    assert_eq!(e.metadata["bounce_class"], "soft");
    assert_eq!(w.contact(SOFT).await, "active");
}

#[tokio::test]
async fn with_basic_auth_in_the_url_a_captured_signature_alone_is_401_and_writes_nothing() {
    use base64::Engine as _;
    let w = world(|a| {
        a.webhooks.mailgun_signing_key = Some(Secret::new(KEY));
        a.webhooks.mailgun_basic_auth = Some(Secret::new("mailgun:url-password"));
    })
    .await;
    let body = sign(
        &w.fixture("mailgun/failed-permanent.json"),
        KEY,
        &fresh_token(),
        0,
    );
    // Signed, but without the credentials of the webhook URL.
    assert_eq!(post(&w, body.clone()).await.status(), 401);
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(w.contact(HARD).await, "active");
    // As Mailgun sends it, the URL's user info as basic auth.
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("mailgun:url-password")
    );
    let r = w
        .app
        .post_webhook(
            "mailgun",
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            body,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(w.types(HARD).await, ["bounced"]);
    assert_eq!(w.contact(HARD).await, "bounced");
}

/// The token claim does not wait for its WAL to be flushed (`synchronous_commit = off` for
/// its own transaction): an fsync per Mailgun request was most of the database's I/Os in the
/// load test. The database here commits synchronously by default (`ALTER DATABASE`), so a
/// claim committed the usual way would add one WAL flush per request; replays of one token
/// with other bodies are refused after their claim and write no event, so only the claims
/// commit.
#[tokio::test]
async fn a_token_claim_does_not_flush_the_wal_per_request() {
    let url = crate::helpers::fresh_database().await;
    let db = crate::helpers::connect(&url).await;
    let name: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "ALTER DATABASE {name} SET synchronous_commit = on"
    ))
    .await
    .unwrap();
    let app = spawn_app_on(
        &url,
        |a| a.webhooks.mailgun_signing_key = Some(Secret::new(KEY)),
        None,
    )
    .await;
    let first = app.seed().await;
    let mut msgs = vec![first];
    for _ in 1..FIXTURE_MESSAGES.len() {
        msgs.push(app.seed_message(&first).await);
    }
    let w = World { app, msgs };
    let sync: String = w
        .app
        .db
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sync, "on", "the test database must commit synchronously");
    let token = fresh_token();
    let genuine = sign(&w.fixture("mailgun/delivered.json"), KEY, &token, 0);
    assert_eq!(post(&w, genuine.clone()).await.status(), 200);
    let syncs = || async {
        w.app
            .db
            .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    const REPLAYS: i64 = 200;
    let before = syncs().await;
    for i in 0..REPLAYS {
        let mut forged: Value = serde_json::from_str(&genuine).expect("json");
        forged["event-data"]["id"] = Value::from(format!("forged-{i}"));
        assert_eq!(post(&w, forged.to_string()).await.status(), 401);
    }
    let flushed = syncs().await - before;
    assert!(
        flushed < REPLAYS / 2,
        "{flushed} WAL flushes for {REPLAYS} refused replays: the claims commit synchronously"
    );
}
