//! SparkPost webhooks end to end: the documented sample batch posted with each configured
//! credential over a real socket into a real PostgreSQL; the validation ping; re-deliveries;
//! refusals writing nothing.

use reachly_ingest::config::Secret;
use reachly_ingest::webhooks::testkit::sign::basic;
use serde_json::Value;

use crate::webhooks_common::*;

const BASIC: &str = "sparkpost-hook:s3cret";
const TOKEN: &str = "3f1c9a7e5b2d4f6a8c0e1b3d5f7a9c2e";

async fn sparkpost_world(max_bytes: Option<usize>) -> World {
    world(move |a| {
        a.webhooks.sparkpost_basic_auth = Some(Secret::new(BASIC));
        a.webhooks.sparkpost_token = Some(Secret::new(TOKEN));
        if let Some(n) = max_bytes {
            a.webhooks.webhook_max_bytes = n;
        }
    })
    .await
}

async fn post_as(w: &World, authorization: Option<&str>, body: String) -> reqwest::Response {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = authorization {
        headers.push(("authorization", a));
    }
    w.app.post_webhook("sparkpost", &headers, body).await
}

async fn post(w: &World, body: String) -> reqwest::Response {
    post_as(w, Some(&basic(BASIC)), body).await
}

/// A hard bounce (class 10) for a message: SparkPost's samples only show class 1.
fn hard_bounce(message: uuid::Uuid) -> String {
    serde_json::json!([{"msys": {"message_event": {
        "type": "bounce", "bounce_class": "10", "event_id": "4125363211543716",
        "timestamp": "1460989507", "error_code": "550",
        "reason": "550 5.1.1 <...@...>: Recipient address rejected: User unknown",
        "rcpt_meta": {"reachly_message_id": message.to_string()}
    }}}])
    .to_string()
}

#[tokio::test]
async fn the_documented_batch_is_stored_as_exactly_these_rows() {
    let w = sparkpost_world(None).await;
    assert_eq!(
        post(&w, w.fixture("sparkpost/ping.json")).await.status(),
        200
    );
    assert_eq!(total_events(&w.app).await, 0);
    let r = post_as(
        &w,
        Some(&format!("Bearer {TOKEN}")),
        w.fixture("sparkpost/batch.json"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        post(&w, hard_bounce(w.msgs[HARD].message)).await.status(),
        200
    );

    let sample = "2016-04-18T14:25:07Z";
    let ev = w.app.events(w.msgs[ENGAGED].message).await;
    assert_eq!(
        w.types(ENGAGED).await,
        ["clicked", "delivered", "opened", "sent"]
    );
    for e in &ev {
        assert_eq!(e.provider, "sparkpost");
        assert_eq!(e.organization_id, w.org());
        same_instant(Some(e.created_at), sample);
    }
    let click = ev
        .iter()
        .find(|e| e.event_type == "clicked")
        .expect("click");
    assert_eq!(click.link_url.as_deref(), Some("http://example.com"));
    assert_eq!(
        click.dedup_key.as_deref(),
        Some("sparkpost:id:click:92356927693813856")
    );
    let m = w.app.message(w.msgs[ENGAGED].message).await;
    assert_eq!(m.status.as_deref(), Some("clicked"));
    same_instant(m.sent_at, sample);
    same_instant(m.delivered_at, sample);
    same_instant(m.opened_at, sample);
    same_instant(m.clicked_at, sample);

    assert_eq!(w.types(HARD).await, ["bounced"]);
    assert_eq!(
        w.app.message(w.msgs[HARD].message).await.status.as_deref(),
        Some("bounced")
    );
    assert_eq!(w.contact(HARD).await, "bounced");

    // Bounce and out-of-band of class 1 (soft) and a delay: the error only.
    assert_eq!(w.types(SOFT).await, ["bounced", "bounced", "deferred"]);
    let m = w.app.message(w.msgs[SOFT].message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    assert_eq!(
        m.error_message.as_deref(),
        Some("554 MAIL REFUSED - IP (a.b.c.d) is in black list")
    );
    assert_eq!(w.contact(SOFT).await, "active");

    assert_eq!(w.types(COMPLAINT).await, ["complained"]);
    assert_eq!(w.contact(COMPLAINT).await, "unsubscribed");
    assert_eq!(w.types(UNSUB).await, ["unsubscribed", "unsubscribed"]);
    assert_eq!(w.contact(UNSUB).await, "unsubscribed");
    assert_eq!(w.types(DROPPED).await, ["dropped", "dropped", "dropped"]);
    let m = w.app.message(w.msgs[DROPPED].message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    assert!(m.error_message.is_some());
    assert_eq!(w.contact(DROPPED).await, "active");

    assert_eq!(total_events(&w.app).await, 14);
    let dl = dead_letters(&w.app).await;
    assert_eq!(dl.len(), 2);
    // The top pixel's open is the same human open as the bottom pixel's: kept, not counted.
    assert_eq!(
        (dl[0].reason.as_str(), dl[0].event_type.as_deref()),
        ("initial_open_not_counted", Some("initial_open"))
    );
    assert_eq!(
        (dl[1].reason.as_str(), dl[1].event_type.as_deref()),
        ("unknown_event_type", Some("sms_status"))
    );
    let raw: Value = serde_json::from_str(&dl[1].payload).expect("json");
    assert_eq!(raw["type"], "sms_status");
}

#[tokio::test]
async fn re_deliveries_change_nothing() {
    let w = sparkpost_world(None).await;
    let batch = w.fixture("sparkpost/batch.json");
    assert_eq!(post(&w, batch.clone()).await.status(), 200);
    let before = snapshot(&w.app).await;
    assert_eq!(before.events.len(), 13);
    assert_eq!(post(&w, batch.clone()).await.status(), 200);
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(post_as(&w, Some(&bearer), batch).await.status(), 200);
    assert_eq!(
        post(&w, w.fixture("sparkpost/ping.json")).await.status(),
        200
    );
    assert_eq!(snapshot(&w.app).await, before);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_401_and_write_nothing() {
    let w = sparkpost_world(None).await;
    let batch = w.fixture("sparkpost/batch.json");
    for auth in [
        Some(basic("sparkpost-hook:wrong")),
        Some(format!("Bearer {TOKEN}0")),
        Some(TOKEN.to_string()),
        None,
    ] {
        assert_eq!(
            post_as(&w, auth.as_deref(), batch.clone()).await.status(),
            401,
            "{auth:?}"
        );
    }
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
    assert_eq!(
        w.app
            .metric(r#"reachly_webhook_auth_failures_total{provider="sparkpost"}"#)
            .await,
        4.0
    );
}

#[tokio::test]
async fn malformed_empty_wrongly_typed_and_oversized_bodies_are_4xx_and_write_nothing() {
    let w = sparkpost_world(Some(32 * 1024)).await;
    assert_eq!(post(&w, "[{\"msys\": ".into()).await.status(), 400);
    assert_eq!(post(&w, String::new()).await.status(), 400);
    assert_eq!(post(&w, "{\"msys\": {}}".into()).await.status(), 400);
    let typed = w
        .app
        .post_webhook(
            "sparkpost",
            &[
                ("content-type", "application/xml"),
                ("authorization", &basic(BASIC)),
            ],
            "[]",
        )
        .await;
    assert_eq!(typed.status(), 415);
    // The sample batch (about 23 KB) three times over is past 32 KiB.
    let batch: Value = serde_json::from_str(&w.fixture("sparkpost/batch.json")).expect("json");
    let mut big = Vec::new();
    for _ in 0..3 {
        big.extend(batch.as_array().expect("array").iter().cloned());
    }
    let big = serde_json::to_string_pretty(&big).expect("json");
    assert!(big.len() > 32 * 1024);
    assert_eq!(post(&w, big).await.status(), 413);
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
}

#[tokio::test]
async fn with_initial_open_configured_the_top_pixel_counts_and_the_bottom_one_does_not() {
    let w = world(|a| {
        a.webhooks.sparkpost_basic_auth = Some(Secret::new(BASIC));
        a.webhooks.sparkpost_initial_open = true;
    })
    .await;
    assert_eq!(
        post(&w, w.fixture("sparkpost/batch.json")).await.status(),
        200
    );
    assert_eq!(
        w.types(ENGAGED).await,
        ["clicked", "delivered", "opened", "sent"]
    );
    let opened: Vec<_> = w
        .app
        .events(w.msgs[ENGAGED].message)
        .await
        .into_iter()
        .filter(|e| e.event_type == "opened")
        .collect();
    assert_eq!(opened[0].metadata["sparkpost_type"], "initial_open");
    let dl = dead_letters(&w.app).await;
    assert_eq!(
        (dl[0].reason.as_str(), dl[0].event_type.as_deref()),
        ("open_counted_as_initial_open", Some("open"))
    );
}

/// One bounce of `class` for message `to`, with its own event id.
fn bounce_of_class(to: uuid::Uuid, class: &str) -> Value {
    serde_json::json!({"msys": {"message_event": {
        "type": "bounce", "bounce_class": class, "event_id": format!("41253632115437{class:0>3}"),
        "timestamp": "1460989507", "error_code": "550",
        "reason": format!("class {class}"),
        "rcpt_meta": {"reachly_message_id": to.to_string()}
    }}})
}

#[tokio::test]
async fn bounce_classes_follow_sparkposts_table() {
    let w = sparkpost_world(None).await;
    let batch = Value::Array(vec![
        bounce_of_class(w.msgs[HARD].message, "10"),
        bounce_of_class(w.msgs[HARD].message, "30"),
        bounce_of_class(w.msgs[UNSUB].message, "90"),
        bounce_of_class(w.msgs[DROPPED].message, "25"),
        bounce_of_class(w.msgs[DROPPED].message, "26"),
        bounce_of_class(w.msgs[SOFT].message, "21"),
        bounce_of_class(w.msgs[SOFT].message, "50"),
        bounce_of_class(w.msgs[SOFT].message, "1"),
        bounce_of_class(w.msgs[ENGAGED].message, "60"),
        bounce_of_class(w.msgs[ENGAGED].message, "80"),
        bounce_of_class(w.msgs[ENGAGED].message, "100"),
    ]);
    assert_eq!(post(&w, batch.to_string()).await.status(), 200);
    assert_eq!(w.types(HARD).await, ["bounced", "bounced"]);
    assert_eq!(w.contact(HARD).await, "bounced");
    assert_eq!(w.types(UNSUB).await, ["unsubscribed"]);
    assert_eq!(w.contact(UNSUB).await, "unsubscribed");
    assert_eq!(w.types(DROPPED).await, ["dropped", "dropped"]);
    assert_eq!(w.contact(DROPPED).await, "active");
    assert_eq!(w.types(SOFT).await, ["bounced", "bounced", "bounced"]);
    for e in w.app.events(w.msgs[SOFT].message).await {
        assert_eq!(e.metadata["bounce_class"], "soft");
    }
    assert_eq!(w.contact(SOFT).await, "active");
    // Auto-reply, subscribe and challenge-response are no failure: kept, moving nothing.
    assert!(w.types(ENGAGED).await.is_empty());
    assert_eq!(w.contact(ENGAGED).await, "active");
    let reasons: Vec<String> = dead_letters(&w.app)
        .await
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(reasons, ["not_a_failure", "not_a_failure", "not_a_failure"]);
}
