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

    // The subscription change example suppresses for a hard bounce.
    assert_eq!(w.types(UNSUB).await, ["bounced"]);
    assert_eq!(
        w.app.message(w.msgs[UNSUB].message).await.status.as_deref(),
        Some("bounced")
    );
    assert_eq!(w.contact(UNSUB).await, "bounced");
    assert!(w.types(SOFT).await.is_empty());
    assert!(w.types(DROPPED).await.is_empty());

    assert_eq!(total_events(&w.app).await, 6);
    let dl = dead_letters(&w.app).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(
        (dl[0].reason.as_str(), dl[0].event_type.as_deref()),
        ("no_message_id", Some("Delivery"))
    );
    let raw: Value = serde_json::from_str(&dl[0].payload).expect("json");
    assert_eq!(raw["Metadata"]["a_key"], "a_value");
}

#[tokio::test]
async fn re_deliveries_change_nothing() {
    let w = postmark_world(None).await;
    post_all(&w).await;
    let before = snapshot(&w.app).await;
    assert_eq!(before.events.len(), 6);
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
