//! Resend webhooks end to end: Resend's documented payloads, Svix-signed with a fresh secret,
//! posted over a real socket to the real server, and what lands in PostgreSQL
//! (`email_events`, `campaign_messages`, `contacts.status`, `webhook_dead_letters`);
//! re-deliveries change nothing; bad signatures and bodies write nothing.

use chrono::{DateTime, Utc};
use reachly_ingest::config::Secret;
use reachly_ingest::webhooks::testkit::sign::{svix_secret, svix_signature};
use uuid::Uuid;

use crate::helpers::*;

/// The ids the fixtures carry in `data.tags` (replaced by seeded ones).
const FIXTURE_MESSAGE: &str = "0190a6f0-0000-7000-8000-000000000002";
const FIXTURE_ORG: &str = "0190a6f0-0000-7000-8000-000000000001";

struct Resend {
    app: TestApp,
    key: Vec<u8>,
}

async fn resend_app() -> Resend {
    let (secret, key) = svix_secret();
    let app = spawn_app_with(move |a| {
        a.webhooks.resend_webhook_secret = Some(Secret::new(secret));
    })
    .await;
    Resend { app, key }
}

fn fixture_for(name: &str, s: &Seeded) -> String {
    let path = format!(
        "{}/tests/fixtures/resend/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .replace(FIXTURE_MESSAGE, &s.message.to_string())
        .replace(FIXTURE_ORG, &s.org.to_string())
}

impl Resend {
    async fn post_signed_at(&self, id: &str, body: &str, at: i64) -> reqwest::Response {
        let sig = svix_signature(&self.key, id, at, body.as_bytes());
        self.app
            .post_webhook(
                "resend",
                &[
                    ("content-type", "application/json"),
                    ("svix-id", id),
                    ("svix-timestamp", &at.to_string()),
                    ("svix-signature", &sig),
                ],
                body.to_owned(),
            )
            .await
    }

    async fn post_signed(&self, id: &str, body: &str) -> u16 {
        self.post_signed_at(id, body, Utc::now().timestamp())
            .await
            .status()
            .as_u16()
    }
}

fn ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

const CREATED: &str = "2024-11-22T23:41:12.126Z";

#[tokio::test]
async fn every_documented_resend_event_lands_once_with_its_effects() {
    let r = resend_app().await;
    let app = &r.app;
    let first = app.seed().await;
    // (fixture, stored type, message status, contact status, error_message, event time)
    let cases = [
        ("email.sent.json", "sent", "sent", "active", None, CREATED),
        (
            "email.delivered.json",
            "delivered",
            "delivered",
            "active",
            None,
            CREATED,
        ),
        (
            "email.delivery_delayed.json",
            "deferred",
            "sent",
            "active",
            Some("delivery delayed"),
            CREATED,
        ),
        (
            "email.complained.json",
            "complained",
            "complained",
            "unsubscribed",
            None,
            CREATED,
        ),
        (
            "email.bounced.json",
            "bounced",
            "bounced",
            "bounced",
            Some(
                "The recipient's email address is on the suppression list because it has a recent history of producing hard bounces.",
            ),
            CREATED,
        ),
        (
            "email.opened.json",
            "opened",
            "opened",
            "active",
            None,
            CREATED,
        ),
        (
            "email.clicked.json",
            "clicked",
            "clicked",
            "active",
            None,
            "2024-11-24T05:00:57.163Z",
        ),
        (
            "email.failed.json",
            "dropped",
            "sent",
            "active",
            Some("reached_daily_quota"),
            CREATED,
        ),
    ];
    let mut seeded = Vec::new();
    let mut bodies = Vec::new();
    for (i, (name, ..)) in cases.iter().enumerate() {
        let s = if i == 0 {
            first
        } else {
            app.seed_message(&first).await
        };
        let body = fixture_for(name, &s);
        let id = format!("msg_{i}_{}", Uuid::new_v4().simple());
        assert_eq!(r.post_signed(&id, &body).await, 200, "{name}");
        seeded.push(s);
        bodies.push((id, body));
    }
    app.wait_count("SELECT count(*) FROM email_events", cases.len() as i64)
        .await;

    let (cases, seeded, bodies) = (&cases, &seeded, &bodies);
    let check = |label: &'static str| async move {
        for ((name, stored, status, contact, error, at), (s, (id, _))) in
            cases.iter().zip(seeded.iter().zip(bodies.iter()))
        {
            let rows = app.events(s.message).await;
            assert_eq!(rows.len(), 1, "{label} {name}: {rows:?}");
            let row = &rows[0];
            assert_eq!(row.event_type, *stored, "{name}");
            assert_eq!(row.organization_id, s.org, "{name}");
            assert_eq!(row.provider, "resend", "{name}");
            assert_eq!(
                row.dedup_key.as_deref(),
                Some(format!("resend:id:{id}").as_str())
            );
            assert_eq!(row.created_at, ts(at), "{name}");
            assert_eq!(
                row.metadata["resend_email_id"], "56761188-7520-42d8-8898-ff6fc54ce618",
                "{name}"
            );
            let m = app.message(s.message).await;
            assert_eq!(m.status.as_deref(), Some(*status), "{label} {name}");
            assert_eq!(m.error_message.as_deref(), *error, "{label} {name}");
            assert_eq!(
                app.contact_status(s.contact).await,
                *contact,
                "{label} {name}"
            );
        }
        let bounced = app.events(seeded[4].message).await;
        assert_eq!(bounced[0].metadata["bounce_class"], "hard");
        assert_eq!(bounced[0].metadata["bounce_sub_type"], "Suppressed");
        let clicked = &app.events(seeded[6].message).await[0];
        assert_eq!(clicked.link_url.as_deref(), Some("https://resend.com"));
        // REACHLY_IP_MODE (default truncate) applies to ESP-reported addresses too.
        assert_eq!(clicked.ip_address.as_deref(), Some("122.115.53.0"));
        assert!(clicked.user_agent.as_deref().unwrap().contains("Safari"));
        let m = app.message(seeded[6].message).await;
        assert_eq!(m.clicked_at, Some(ts("2024-11-24T05:00:57.163Z")));
        assert_eq!(m.opened_at, Some(ts("2024-11-24T05:00:57.163Z")));
        assert_eq!(
            app.message(seeded[1].message).await.delivered_at,
            Some(ts(CREATED))
        );
    };
    check("first delivery").await;

    // Resend retries with the same svix-id: twice more, nothing changes.
    for _ in 0..2 {
        for (id, body) in bodies {
            assert_eq!(r.post_signed(id, body).await, 200);
        }
    }
    check("after re-delivery").await;
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        cases.len() as i64
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
    assert_eq!(
        app.metric("reachly_events_duplicate_total").await,
        2.0 * cases.len() as f64
    );
}

#[tokio::test]
async fn bad_signatures_are_401_and_write_nothing() {
    let r = resend_app().await;
    let app = &r.app;
    let s = app.seed().await;
    let body = fixture_for("email.bounced.json", &s);
    let now = Utc::now().timestamp();

    // Tampered after signing.
    let sig = svix_signature(&r.key, "msg_t", now, body.as_bytes());
    let tampered = body.replace("Permanent", "Transient");
    let statuses = [
        app.post_webhook(
            "resend",
            &[
                ("content-type", "application/json"),
                ("svix-id", "msg_t"),
                ("svix-timestamp", &now.to_string()),
                ("svix-signature", &sig),
            ],
            tampered,
        )
        .await
        .status()
        .as_u16(),
        // Signed with another secret.
        app.post_webhook(
            "resend",
            &[
                ("content-type", "application/json"),
                ("svix-id", "msg_w"),
                ("svix-timestamp", &now.to_string()),
                (
                    "svix-signature",
                    &svix_signature(&[7u8; 24], "msg_w", now, body.as_bytes()),
                ),
            ],
            body.clone(),
        )
        .await
        .status()
        .as_u16(),
        // No signature header.
        app.post_webhook(
            "resend",
            &[
                ("content-type", "application/json"),
                ("svix-id", "msg_m"),
                ("svix-timestamp", &now.to_string()),
            ],
            body.clone(),
        )
        .await
        .status()
        .as_u16(),
        // Correctly signed, ten minutes old.
        r.post_signed_at("msg_s", &body, now - 600)
            .await
            .status()
            .as_u16(),
    ];
    assert_eq!(statuses, [401, 401, 401, 401]);
    assert_eq!(
        app.metric(r#"reachly_webhook_auth_failures_total{provider="resend"}"#)
            .await,
        4.0
    );

    // A good request afterwards is the only thing ever written.
    assert_eq!(r.post_signed("msg_ok", &body).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
    assert_eq!(app.events(s.message).await[0].event_type, "bounced");
    assert_eq!(
        app.events(s.message).await[0].dedup_key.as_deref(),
        Some("resend:id:msg_ok")
    );
}

#[tokio::test]
async fn malformed_bodies_are_4xx_and_write_nothing() {
    let r = resend_app().await;
    let app = &r.app;
    let s = app.seed().await;
    for body in ["", "{", "[]", r#"{"data":{}}"#] {
        assert_eq!(r.post_signed("msg_bad", body).await, 400, "{body:?}");
    }
    let body = fixture_for("email.delivered.json", &s);
    let now = Utc::now().timestamp();
    let sig = svix_signature(&r.key, "msg_ct", now, body.as_bytes());
    let wrong_type = app
        .post_webhook(
            "resend",
            &[
                ("content-type", "text/html"),
                ("svix-id", "msg_ct"),
                ("svix-timestamp", &now.to_string()),
                ("svix-signature", &sig),
            ],
            body.clone(),
        )
        .await;
    assert_eq!(wrong_type.status().as_u16(), 415);

    assert_eq!(r.post_signed("msg_good", &body).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
}

#[tokio::test]
async fn unknown_types_and_uncorrelatable_events_are_dead_lettered_once() {
    let r = resend_app().await;
    let app = &r.app;
    let s = app.seed().await;
    let stranger = Seeded {
        message: Uuid::new_v4(),
        ..s
    };
    let cases = [
        (
            "msg_contact",
            r#"{"type":"contact.created","created_at":"2024-11-22T23:41:12.126Z","data":{"id":"c1","email":"x@example.com"}}"#.to_string(),
            "unknown_event_type",
        ),
        (
            "msg_untagged",
            r#"{"type":"email.delivered","created_at":"2024-11-22T23:41:12.126Z","data":{"email_id":"e1","tags":{"category":"confirm_email"}}}"#.to_string(),
            "no_message_id",
        ),
        (
            "msg_stranger",
            fixture_for("email.delivered.json", &stranger),
            "unknown_message",
        ),
    ];
    for _ in 0..2 {
        for (id, body, _) in &cases {
            assert_eq!(r.post_signed(id, body).await, 200, "{id}");
        }
    }
    app.wait_count("SELECT count(*) FROM webhook_dead_letters", 3)
        .await;
    let rows: Vec<(String, String, Option<String>)> = app
        .db
        .query(
            "SELECT reason, provider, dedup_key FROM webhook_dead_letters ORDER BY reason",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            (
                "no_message_id".to_string(),
                "resend".to_string(),
                Some("resend:id:msg_untagged".to_string())
            ),
            (
                "unknown_event_type".to_string(),
                "resend".to_string(),
                Some("resend:id:msg_contact".to_string())
            ),
            (
                "unknown_message".to_string(),
                "resend".to_string(),
                Some("resend:id:msg_stranger".to_string())
            ),
        ]
    );
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("sent"),
        "untouched"
    );
}

#[tokio::test]
async fn without_a_secret_resend_is_404() {
    let app = spawn_app().await;
    let resp = app
        .post_webhook("resend", &[("content-type", "application/json")], "{}")
        .await;
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn a_bounce_without_a_type_is_read_from_its_message() {
    let r = resend_app().await;
    let app = &r.app;
    let hard = app.seed().await;
    let suppressed = app.seed_message(&hard).await;
    // Captured in 2023: `bounce` carries only the message text.
    let body = fixture_for("email.bounced-no-type-hard.json", &hard);
    assert_eq!(r.post_signed("msg_no_type_hard", &body).await, 200);
    let ev = app.events(hard.message).await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event_type, "bounced");
    assert_eq!(ev[0].metadata["bounce_class"], "hard");
    assert_eq!(app.contact_status(hard.contact).await, "bounced");
    // "Resend has suppressed sending": never attempted, a drop (the address is on the
    // account's list for an earlier event, already recorded then).
    let body = fixture_for("email.bounced-no-type-suppressed.json", &suppressed);
    assert_eq!(r.post_signed("msg_no_type_suppressed", &body).await, 200);
    let ev = app.events(suppressed.message).await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event_type, "dropped");
    assert_eq!(app.contact_status(suppressed.contact).await, "active");
    // A message text we cannot read is a soft bounce: never a contact suppressed on a guess.
    let unknown = app.seed_message(&hard).await;
    let mut doc: serde_json::Value =
        serde_json::from_str(&fixture_for("email.bounced-no-type-hard.json", &unknown)).unwrap();
    doc["data"]["bounce"]["message"] = serde_json::Value::from("Something happened.");
    assert_eq!(
        r.post_signed("msg_no_type_unknown", &doc.to_string()).await,
        200
    );
    let ev = app.events(unknown.message).await;
    assert_eq!(ev[0].metadata["bounce_class"], "soft");
    assert_eq!(app.contact_status(unknown.contact).await, "active");
}
