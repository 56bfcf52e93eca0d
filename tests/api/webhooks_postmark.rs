//! Postmark webhooks end to end: the documented records posted with basic auth over a real
//! socket into a real PostgreSQL; re-deliveries; refusals writing nothing.

use reachly_ingest::config::Secret;
use reachly_ingest::webhooks::testkit::sign::basic;
use serde_json::Value;

use crate::webhooks_common::*;

const CREDENTIALS: &str = "postmark-hook:correct horse battery";

const FIXTURES: [&str; 7] = [
    "postmark/delivery.json",
    "postmark/bounce.json",
    "postmark/open.json",
    "postmark/click.json",
    "postmark/spam-complaint.json",
    "postmark/subscription-change.json",
    "postmark/delivery-uncorrelated.json",
];

async fn postmark_world(max_bytes: Option<usize>) -> World {
    world(move |a| {
        a.webhooks.postmark_basic_auth = Some(Secret::new(CREDENTIALS));
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
    w.app.post_webhook("postmark", &headers, body).await
}

async fn post(w: &World, body: String) -> reqwest::Response {
    post_as(w, Some(&basic(CREDENTIALS)), body).await
}

async fn post_all(w: &World) {
    for f in FIXTURES {
        assert_eq!(post(w, w.fixture(f)).await.status(), 200, "{f}");
    }
}

#[tokio::test]
async fn documented_records_are_stored_as_exactly_these_rows() {
    let w = postmark_world(None).await;
    post_all(&w).await;

    let ev = w.app.events(w.msgs[ENGAGED].message).await;
    assert_eq!(w.types(ENGAGED).await, ["clicked", "delivered", "opened"]);
    for e in &ev {
        assert_eq!(e.provider, "postmark");
        assert_eq!(e.organization_id, w.org());
        assert!(
            e.dedup_key
                .as_deref()
                .is_some_and(|k| k.starts_with("postmark:h:"))
        );
    }
    let of = |t: &str| {
        ev.iter()
            .find(|e| e.event_type == t)
            .expect("event of that type")
    };
    assert_eq!(
        of("clicked").link_url.as_deref(),
        Some("https://example.com")
    );
    assert_eq!(of("clicked").ip_address.as_deref(), Some("8.8.8.0"));
    assert_eq!(of("opened").ip_address.as_deref(), Some("188.2.95.0"));
    assert_eq!(of("opened").metadata["first_open"], true);
    let m = w.app.message(w.msgs[ENGAGED].message).await;
    assert_eq!(m.status.as_deref(), Some("clicked"));
    same_instant(m.delivered_at, "2019-11-05T16:33:54.907026Z");
    // The click example is dated 2017, before the open: a click implies an open.
    same_instant(m.opened_at, "2017-10-25T15:21:11.906562Z");
    same_instant(m.clicked_at, "2017-10-25T15:21:11.906562Z");
    assert_eq!(w.contact(ENGAGED).await, "active");

    assert_eq!(w.types(HARD).await, ["bounced"]);
    let m = w.app.message(w.msgs[HARD].message).await;
    assert_eq!(m.status.as_deref(), Some("bounced"));
    assert_eq!(
        m.error_message.as_deref(),
        Some("Hard bounce: Test bounce details")
    );
    assert_eq!(w.contact(HARD).await, "bounced");

    assert_eq!(w.types(COMPLAINT).await, ["complained"]);
    assert_eq!(w.contact(COMPLAINT).await, "unsubscribed");

    // The subscription change example is Postmark's notice that it suppressed the address
    // after a hard bounce: the Bounce record carries that event, so the notice is kept as a
    // dead letter and moves nothing.
    assert!(w.types(UNSUB).await.is_empty());
    assert_eq!(w.contact(UNSUB).await, "active");
    assert!(w.types(SOFT).await.is_empty());
    assert!(w.types(DROPPED).await.is_empty());

    assert_eq!(total_events(&w.app).await, 5);
    let dl = dead_letters(&w.app).await;
    assert_eq!(dl.len(), 2);
    assert_eq!(
        (dl[0].reason.as_str(), dl[0].event_type.as_deref()),
        ("no_message_id", Some("Delivery"))
    );
    assert_eq!(
        (dl[1].reason.as_str(), dl[1].event_type.as_deref()),
        ("suppression_notice", Some("SubscriptionChange/HardBounce"))
    );
    let raw: Value = serde_json::from_str(&dl[0].payload).expect("json");
    assert_eq!(raw["Metadata"]["a_key"], "a_value");
}

#[tokio::test]
async fn re_deliveries_change_nothing() {
    let w = postmark_world(None).await;
    post_all(&w).await;
    let before = snapshot(&w.app).await;
    assert_eq!(before.events.len(), 5);
    post_all(&w).await;
    post_all(&w).await;
    assert_eq!(snapshot(&w.app).await, before);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_401_and_write_nothing() {
    let w = postmark_world(None).await;
    let body = w.fixture("postmark/bounce.json");
    for auth in [
        Some(basic("postmark-hook:wrong")),
        Some(basic("someone:correct horse battery")),
        Some("Bearer correct horse battery".to_string()),
        None,
    ] {
        let r = post_as(&w, auth.as_deref(), body.clone()).await;
        assert_eq!(r.status(), 401, "{auth:?}");
    }
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
    assert_eq!(
        w.app
            .metric(r#"reachly_webhook_auth_failures_total{provider="postmark"}"#)
            .await,
        4.0
    );
}

#[tokio::test]
async fn malformed_empty_wrongly_typed_and_oversized_bodies_are_4xx_and_write_nothing() {
    let w = postmark_world(Some(8 * 1024)).await;
    assert_eq!(post(&w, "{\"RecordType\":".into()).await.status(), 400);
    assert_eq!(post(&w, String::new()).await.status(), 400);
    assert_eq!(post(&w, "[]".into()).await.status(), 400);
    let typed = w
        .app
        .post_webhook(
            "postmark",
            &[
                ("content-type", "text/plain"),
                ("authorization", &basic(CREDENTIALS)),
            ],
            w.fixture("postmark/delivery.json"),
        )
        .await;
    assert_eq!(typed.status(), 415);
    let mut big: Value = serde_json::from_str(&w.fixture("postmark/bounce.json")).expect("json");
    big["Content"] = Value::from("x".repeat(16 * 1024));
    assert_eq!(post(&w, big.to_string()).await.status(), 413);
    assert_eq!(total_events(&w.app).await, 0);
    assert_eq!(total_dead_letters(&w.app).await, 0);
}

/// The fixture's text with its message id moved to message `to` of the world.
fn for_message(w: &World, path: &str, from: usize, to: usize) -> String {
    w.fixture(path).replace(
        &w.msgs[from].message.to_string(),
        &w.msgs[to].message.to_string(),
    )
}

#[tokio::test]
async fn a_hard_bounce_and_its_subscription_change_are_one_bounce() {
    let w = postmark_world(None).await;
    assert_eq!(
        post(&w, w.fixture("postmark/bounce.json")).await.status(),
        200
    );
    // Postmark then reports its own suppression of the address, for the same message.
    let change = for_message(&w, "postmark/subscription-change.json", UNSUB, HARD);
    assert_eq!(post(&w, change.clone()).await.status(), 200);
    assert_eq!(post(&w, change).await.status(), 200);
    assert_eq!(w.types(HARD).await, ["bounced"]);
    let m = w.app.message(w.msgs[HARD].message).await;
    assert_eq!(m.status.as_deref(), Some("bounced"));
    assert_eq!(w.contact(HARD).await, "bounced");
    assert_eq!(total_events(&w.app).await, 1);
    let dl = dead_letters(&w.app).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, "suppression_notice");
}

#[tokio::test]
async fn only_a_recipients_own_suppression_is_an_unsubscribe() {
    let w = postmark_world(None).await;
    let own = w.fixture("postmark/subscription-change-manual.json");
    assert_eq!(post(&w, own.clone()).await.status(), 200);
    assert_eq!(w.types(UNSUB).await, ["unsubscribed"]);
    assert_eq!(w.contact(UNSUB).await, "unsubscribed");
    // The sender's own suppression (Origin Customer) of another contact is not theirs.
    let mut by_sender: Value = serde_json::from_str(&own).expect("json");
    by_sender["Origin"] = Value::from("Customer");
    by_sender["Metadata"]["reachly_message_id"] = Value::from(w.msgs[ENGAGED].message.to_string());
    assert_eq!(post(&w, by_sender.to_string()).await.status(), 200);
    assert!(w.types(ENGAGED).await.is_empty());
    assert_eq!(w.contact(ENGAGED).await, "active");
    let dl = dead_letters(&w.app).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, "suppression_notice");
}

#[tokio::test]
async fn a_re_delivered_record_without_a_time_of_its_own_is_stored_once() {
    let w = postmark_world(None).await;
    // A real Bounce of Type Unsubscribe carries no BouncedAt: it is stored at its arrival.
    let body = w.fixture("postmark/bounce-unsubscribe-no-time.json");
    assert_eq!(post(&w, body.clone()).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(post(&w, body.clone()).await.status(), 200);
    assert_eq!(post(&w, body).await.status(), 200);
    assert_eq!(w.types(UNSUB).await, ["unsubscribed"]);
    assert_eq!(w.contact(UNSUB).await, "unsubscribed");
    assert_eq!(total_events(&w.app).await, 1);
    assert_eq!(total_dead_letters(&w.app).await, 0);
}

#[tokio::test]
async fn transient_and_dns_error_bounces_are_deferrals() {
    let w = postmark_world(None).await;
    for (kind, code) in [("Transient", 2), ("DnsError", 512)] {
        let mut b: Value =
            serde_json::from_str(&for_message(&w, "postmark/bounce.json", HARD, SOFT))
                .expect("json");
        b["Type"] = Value::from(kind);
        b["TypeCode"] = Value::from(code);
        b["ID"] = Value::from(code);
        assert_eq!(post(&w, b.to_string()).await.status(), 200, "{kind}");
    }
    assert_eq!(w.types(SOFT).await, ["deferred", "deferred"]);
    let m = w.app.message(w.msgs[SOFT].message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    assert_eq!(w.contact(SOFT).await, "active");
}
