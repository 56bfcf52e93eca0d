//! Mandrill webhooks end to end: Mandrill's example batch, signed like Mandrill does (HMAC-SHA1
//! over the configured URL and the sorted POST variables), posted over a real socket to the
//! real server, and what lands in PostgreSQL; the unsigned HEAD URL check and the empty test
//! batch; re-deliveries change nothing; bad signatures and bodies write nothing.

use chrono::{DateTime, Utc};
use reachly_ingest::config::Secret;
use reachly_ingest::webhooks::testkit::sign::{form, mandrill_signature as signature};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::*;

/// The URL "configured in Mandrill": part of the signed string, not the address posted to.
const HOOK_URL: &str = "https://hooks.example.test/webhooks/mandrill";

struct Mandrill {
    app: TestApp,
    key: String,
}

async fn mandrill_app() -> Mandrill {
    let key = Uuid::new_v4().simple().to_string();
    let k = key.clone();
    let app = spawn_app_with(move |a| {
        a.webhooks.mandrill_webhook_key = Some(Secret::new(k));
        a.webhooks.mandrill_webhook_url = Some(HOOK_URL.to_string());
    })
    .await;
    Mandrill { app, key }
}

impl Mandrill {
    async fn post_with(&self, sig: Option<&str>, body: String) -> u16 {
        let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(sig) = sig {
            headers.push(("x-mandrill-signature", sig));
        }
        self.app
            .post_webhook("mandrill", &headers, body)
            .await
            .status()
            .as_u16()
    }

    async fn post_events(&self, events: &str) -> u16 {
        let params = [("mandrill_events", events)];
        let sig = signature(&self.key, HOOK_URL, &params);
        self.post_with(Some(&sig), form(&params)).await
    }
}

/// Mandrill's example batch, each message event pointed at its own seeded message.
fn batch_for(messages: &[Seeded]) -> String {
    let path = format!(
        "{}/tests/fixtures/mandrill/mandrill_events.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut batch: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut next = messages.iter();
    for item in &mut batch {
        if let Some(meta) = item.pointer_mut("/msg/metadata") {
            let s = next.next().expect("a seeded message per message event");
            meta["reachly_message_id"] = Value::from(s.message.to_string());
            meta["reachly_organization_id"] = Value::from(s.org.to_string());
        }
    }
    serde_json::to_string(&batch).unwrap()
}

#[tokio::test]
async fn the_url_check_and_the_empty_test_batch_answer_200() {
    let m = mandrill_app().await;
    let head = m
        .app
        .http
        .head(m.app.url("/webhooks/mandrill"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200, "unsigned HEAD");
    assert_eq!(m.post_events("[]").await, 200);
    assert_eq!(m.app.count("SELECT count(*) FROM email_events").await, 0);
    assert_eq!(
        m.app
            .count("SELECT count(*) FROM webhook_dead_letters")
            .await,
        0
    );
}

#[tokio::test]
async fn the_example_batch_lands_once_with_its_effects() {
    let m = mandrill_app().await;
    let app = &m.app;
    let first = app.seed().await;
    let mut seeded = vec![first];
    for _ in 1..9 {
        seeded.push(app.seed_message(&first).await);
    }
    let batch = batch_for(&seeded);
    assert_eq!(m.post_events(&batch).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 9).await;
    app.wait_count("SELECT count(*) FROM webhook_dead_letters", 5)
        .await;

    let at = DateTime::<Utc>::from_timestamp(1_384_954_004, 0).unwrap();
    // (stored type, message status, contact status, error_message)
    let expected = [
        ("sent", "sent", "active", None),
        (
            "deferred",
            "sent",
            "active",
            Some("451 4.3.5 Temporarily unavailable, try again later."),
        ),
        (
            "bounced",
            "bounced",
            "bounced",
            Some(
                "smtp;550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces.",
            ),
        ),
        (
            "bounced",
            "sent",
            "active",
            Some("smtp;552 5.2.2 Over Quota"),
        ),
        ("opened", "opened", "active", None),
        ("clicked", "clicked", "active", None),
        ("complained", "complained", "unsubscribed", None),
        ("unsubscribed", "unsubscribed", "unsubscribed", None),
        ("dropped", "sent", "active", Some("rejected by Mandrill")),
    ];
    let (seeded, expected) = (&seeded, &expected);
    let check = |label: &'static str| async move {
        for (s, (stored, status, contact, error)) in seeded.iter().zip(expected) {
            let rows = app.events(s.message).await;
            assert_eq!(rows.len(), 1, "{label} {stored}: {rows:?}");
            let row = &rows[0];
            assert_eq!(row.event_type, *stored, "{label}");
            assert_eq!(row.organization_id, s.org);
            assert_eq!(row.provider, "mandrill");
            assert_eq!(row.created_at, at, "{stored}");
            assert!(row.dedup_key.as_deref().unwrap().starts_with("mandrill:h:"));
            let msg = app.message(s.message).await;
            assert_eq!(msg.status.as_deref(), Some(*status), "{label} {stored}");
            assert_eq!(msg.error_message.as_deref(), *error, "{label} {stored}");
            assert_eq!(
                app.contact_status(s.contact).await,
                *contact,
                "{label} {stored}"
            );
        }
        let hard = &app.events(seeded[2].message).await[0];
        assert_eq!(hard.metadata["bounce_class"], "hard");
        assert_eq!(hard.metadata["bounce_description"], "bad_mailbox");
        let soft = &app.events(seeded[3].message).await[0];
        assert_eq!(soft.metadata["bounce_class"], "soft");
        let open = &app.events(seeded[4].message).await[0];
        assert_eq!(open.ip_address.as_deref(), Some("127.0.0.0"), "truncated");
        assert!(open.user_agent.as_deref().unwrap().contains("Postbox"));
        let click = &app.events(seeded[5].message).await[0];
        assert_eq!(click.link_url.as_deref(), Some("http://mandrill.com"));
        let dead: Vec<(String, Option<String>)> = app
            .db
            .query(
                "SELECT reason, event_type FROM webhook_dead_letters ORDER BY event_type, payload",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(dead.len(), 5, "{label}: {dead:?}");
        for (i, (reason, kind)) in dead.iter().enumerate() {
            assert_eq!(reason, "unknown_event_type");
            let want = if i < 3 { "blacklist" } else { "whitelist" };
            assert_eq!(kind.as_deref(), Some(want));
        }
    };
    check("first delivery").await;

    // Mandrill re-posts a batch it thinks failed: twice more, nothing changes.
    assert_eq!(m.post_events(&batch).await, 200);
    assert_eq!(m.post_events(&batch).await, 200);
    check("after re-delivery").await;
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 9);
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        5
    );
}

#[tokio::test]
async fn bad_signatures_are_401_and_write_nothing() {
    let m = mandrill_app().await;
    let app = &m.app;
    let s = app.seed().await;
    let one = format!(
        r#"[{{"event":"hard_bounce","_id":"m1","ts":1700000000,"msg":{{"metadata":{{"reachly_message_id":"{}"}},"diag":"smtp;550 5.1.1 unknown"}}}}]"#,
        s.message
    );
    let params = [("mandrill_events", one.as_str())];
    let good = signature(&m.key, HOOK_URL, &params);
    let tampered = form(&[(
        "mandrill_events",
        &one.replace("hard_bounce", "soft_bounce"),
    )]);
    let statuses = [
        m.post_with(Some(&good), tampered).await,
        m.post_with(
            Some(&signature("another key", HOOK_URL, &params)),
            form(&params),
        )
        .await,
        m.post_with(None, form(&params)).await,
        // Signed for the URL the request really went to, not the configured one.
        m.post_with(
            Some(&signature(&m.key, &app.url("/webhooks/mandrill"), &params)),
            form(&params),
        )
        .await,
    ];
    assert_eq!(statuses, [401, 401, 401, 401]);
    assert_eq!(
        app.metric(r#"reachly_webhook_auth_failures_total{provider="mandrill"}"#)
            .await,
        4.0
    );
    assert_eq!(m.post_with(Some(&good), form(&params)).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("bounced")
    );
    assert_eq!(app.contact_status(s.contact).await, "bounced");
}

#[tokio::test]
async fn malformed_bodies_are_4xx_and_write_nothing() {
    let m = mandrill_app().await;
    let app = &m.app;
    let s = app.seed().await;
    let other = [("other", "[]")];
    assert_eq!(
        m.post_with(Some(&signature(&m.key, HOOK_URL, &other)), form(&other))
            .await,
        400
    );
    assert_eq!(m.post_events("{").await, 400);
    assert_eq!(m.post_events(r#"{"event":"send"}"#).await, 400);
    let params = [("mandrill_events", "[]")];
    let as_json = app
        .post_webhook(
            "mandrill",
            &[
                ("content-type", "application/json"),
                (
                    "x-mandrill-signature",
                    &signature(&m.key, HOOK_URL, &params),
                ),
            ],
            form(&params),
        )
        .await;
    assert_eq!(as_json.status().as_u16(), 415);

    let send = format!(
        r#"[{{"event":"send","_id":"m2","ts":1700000000,"msg":{{"metadata":{{"reachly_message_id":"{}"}}}}}}]"#,
        s.message
    );
    assert_eq!(m.post_events(&send).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
}

#[tokio::test]
async fn same_second_opens_from_two_clients_are_two_rows_and_a_redelivery_adds_none() {
    let m = mandrill_app().await;
    let app = &m.app;
    let s = app.seed().await;
    let path = format!(
        "{}/tests/fixtures/mandrill/mandrill_events.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let batch: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut open = batch
        .iter()
        .find(|e| e["event"] == "open")
        .expect("the example open")
        .clone();
    open["msg"]["metadata"]["reachly_message_id"] = Value::from(s.message.to_string());
    open["msg"]["metadata"]["reachly_organization_id"] = Value::from(s.org.to_string());
    // The same message opened in the same second by an image proxy and by a phone.
    let mut proxy = open.clone();
    proxy["ip"] = Value::from("66.249.84.1");
    proxy["user_agent"] = Value::from(
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    );
    let events = Value::Array(vec![open, proxy]).to_string();
    assert_eq!(m.post_events(&events).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 2).await;
    let rows = app.events(s.message).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|e| e.event_type == "opened"));
    assert_eq!(m.post_events(&events).await, 200);
    assert_eq!(app.events(s.message).await.len(), 2);
}
