//! The pipeline's guarantees against a real PostgreSQL: row isolation and dead letters,
//! a database outage, a crash with a torn spool, a drain under load, two instances on one
//! database, and a sabotaged schema.

use std::time::{Duration, Instant};

use chrono::Utc;
use reachly_ingest::event::{BounceClass, Event, EventType, Record, Source};
use reachly_ingest::token::{self, Purpose};
use uuid::Uuid;

use crate::helpers::*;

fn esp_event(s: &Seeded, t: EventType, key: &str) -> Event {
    let mut e = Event::new(s.message, t, Utc::now(), Source::Sendgrid);
    e.claimed_organization_id = Some(s.org);
    e.dedup_key = Some(format!("sendgrid:id:{key}"));
    e
}

#[tokio::test]
async fn an_unknown_message_and_a_rejected_row_do_not_fail_the_rows_beside_them() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let others: Vec<Seeded> = vec![app.seed_message(&s).await, app.seed_message(&s).await];
    // A row the database rejects: a constraint only this test's database has.
    app.db
        .batch_execute("ALTER TABLE email_events ADD CONSTRAINT test_reject CHECK (user_agent IS DISTINCT FROM 'reject-me')")
        .await
        .unwrap();
    let mut records = vec![Record::Event(esp_event(&s, EventType::Delivered, "a"))];
    let mut bad = esp_event(&others[0], EventType::Opened, "b");
    bad.user_agent = Some("reject-me".into());
    records.push(Record::Event(bad));
    records.push(Record::Event(esp_event(
        &others[1],
        EventType::Delivered,
        "c",
    )));
    let mut unknown = esp_event(&s, EventType::Delivered, "d");
    unknown.message_id = Uuid::new_v4();
    records.push(Record::Event(unknown.clone()));
    let mut foreign = esp_event(&others[1], EventType::Opened, "e");
    foreign.claimed_organization_id = Some(Uuid::new_v4());
    records.push(Record::Event(foreign));

    app.state
        .ingest
        .submit_durable(records)
        .await
        .expect("durable");
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 2);
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("delivered")
    );
    assert_eq!(
        app.message(others[1].message).await.status.as_deref(),
        Some("delivered")
    );
    let dead: Vec<(String, Option<Uuid>)> = app
        .db
        .query(
            "SELECT reason, message_id FROM webhook_dead_letters ORDER BY reason",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert_eq!(dead[0].0, "organization_mismatch");
    assert!(
        dead[1].0.starts_with("rejected_by_database: 23514"),
        "{dead:?}"
    );
    assert_eq!(dead[1].1, Some(others[0].message));
    assert_eq!(
        dead[2],
        ("unknown_message".to_string(), Some(unknown.message_id))
    );
    let text = app.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            r#"reachly_events_dead_lettered_total{reason="unknown_message"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"reachly_events_dead_lettered_total{reason="rejected_by_database"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(&text, r#"reachly_events_written_total{type="delivered"}"#),
        2.0
    );
}

#[tokio::test]
async fn a_redelivered_esp_event_is_stored_once_and_counted_as_duplicate() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let e = esp_event(&s, EventType::Delivered, "same");
    let mut again = e.clone();
    again.id = Uuid::now_v7();
    app.state
        .ingest
        .submit_durable(vec![Record::Event(e)])
        .await
        .unwrap();
    app.state
        .ingest
        .submit_durable(vec![Record::Event(again)])
        .await
        .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 1);
    assert_eq!(app.metric("reachly_events_duplicate_total").await, 1.0);
}

#[tokio::test]
async fn a_dropped_column_spools_events_and_they_are_written_once_it_is_back() {
    let app = spawn_app().await;
    let s = app.seed().await;
    app.db
        .batch_execute("ALTER TABLE email_events DROP COLUMN user_agent")
        .await
        .unwrap();
    let mut e = esp_event(&s, EventType::Bounced, "x");
    e.bounce_class = Some(BounceClass::Hard);
    // Durable: the failed batch is spooled at once and acknowledged.
    app.state
        .ingest
        .submit_durable(vec![Record::Event(e)])
        .await
        .expect("spooled, hence durable");
    let text = app.metrics_text().await;
    assert!(
        metric_value(&text, r#"reachly_db_errors_total{operation="write_batch"}"#) >= 1.0,
        "{text}"
    );
    assert!(
        metric_value(&text, "reachly_events_spooled_total") >= 1.0,
        "{text}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0,
        "a schema error is not the row's fault"
    );
    app.db
        .batch_execute("ALTER TABLE email_events ADD COLUMN user_agent TEXT")
        .await
        .unwrap();
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(app.contact_status(s.contact).await, "bounced");
}

/// Sends one pixel hit per message; returns how many got the GIF.
async fn pixel_hits(app_url: &str, tokens: &[String]) -> usize {
    let client = http_client();
    let mut ok = 0;
    for t in tokens {
        if let Ok(r) = client
            .get(format!("{app_url}/o/{t}.gif"))
            .header("user-agent", BROWSER_UA)
            .send()
            .await
            && r.status() == 200
        {
            ok += 1;
        }
    }
    ok
}

async fn unsubscribe(client: &reqwest::Client, app_url: &str, t: &str) -> u16 {
    client
        .post(format!("{app_url}/u/{t}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A Postmark delivery webhook for `message` (basic auth `pm:secret`); the status code.
async fn postmark_delivery(client: &reqwest::Client, app_url: &str, message: uuid::Uuid) -> u16 {
    let body = serde_json::json!({
        "RecordType": "Delivery", "MessageID": uuid::Uuid::new_v4().to_string(),
        "Recipient": "someone@example.com", "DeliveredAt": "2026-01-05T16:33:54Z",
        "Metadata": {"reachly_message_id": message.to_string()}
    });
    client
        .post(format!("{app_url}/webhooks/postmark"))
        .basic_auth("pm", Some("secret"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_outage_loses_no_acknowledged_event_and_empties_the_spool() {
    let pg = PrivateCluster::start().await;
    let db = connect(&pg.url).await;
    let first = seed_tenant(&db).await;
    let mut messages = vec![first];
    for _ in 0..29 {
        messages.push(seed_message_in(&db, &first).await);
    }
    drop(db);
    let app = spawn_app_on(
        &pg.url,
        |a| {
            a.pipeline.buffer_max_events = 10;
            a.pipeline.flush_max_events = 5;
            a.db.connect_timeout = Duration::from_secs(1);
        },
        Default::default(),
    )
    .await;
    let keys = test_token_keys();
    let opens: Vec<String> = messages
        .iter()
        .map(|m| token::mint(&keys, Purpose::Open, m.org, m.message, None).unwrap())
        .collect();
    let unsubs: Vec<String> = messages
        .iter()
        .map(|m| token::mint(&keys, Purpose::Unsubscribe, m.org, m.message, None).unwrap())
        .collect();
    let base = app.url("");
    let mut gifs = pixel_hits(&base, &opens[..10]).await;
    let mut unsub_ok = 0;
    for t in &unsubs[..5] {
        unsub_ok += usize::from(unsubscribe(&app.http, &base, t).await == 200);
    }

    pg.stop().await;
    gifs += pixel_hits(&base, &opens).await; // 30 more: past the 10 in memory, into the spool
    // While the database is down an unsubscribe's organization cannot be checked against
    // its message: it is refused with 503 (retry), never spooled as done.
    for t in &unsubs[5..20] {
        assert_eq!(unsubscribe(&app.http, &base, t).await, 503);
    }
    let click = token::mint(
        &keys,
        Purpose::Click,
        first.org,
        first.message,
        Some("https://example.com/down"),
    )
    .unwrap();
    let r = app.get(&format!("/c/{click}"), Some(BROWSER_UA)).await;
    assert_eq!(
        r.status(),
        302,
        "a click redirects while the database is down"
    );
    assert!(
        app.state.ingest.spool_bytes() > 0,
        "events spilled to the spool"
    );
    pg.start_again().await;
    for t in &unsubs[20..] {
        unsub_ok += usize::from(unsubscribe(&app.http, &base, t).await == 200);
    }

    assert_eq!((gifs, unsub_ok), (40, 15), "every request was accepted");
    let db = connect(&pg.url).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'opened'",
        40,
    )
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'unsubscribed'",
        15,
    )
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'clicked'",
        1,
    )
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM contacts WHERE status = 'unsubscribed'",
        15,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.state.ingest.spool_bytes() > 0 {
        assert!(Instant::now() < deadline, "the spool was not emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.metric(r#"reachly_events_dropped_total{reason="spool_full"}"#)
            .await,
        0.0
    );
    let segments = std::fs::read_dir(&app.spool_dir).unwrap().filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("spool-"))
    });
    assert_eq!(segments.count(), 0, "replayed segments are deleted");
    app.stop().await;
    assert_eq!(
        db.query_one("SELECT count(*) FROM email_events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        56
    );
    pg.stop().await;
}

fn newest_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("spool-")
        })
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .collect();
    segs.sort();
    segs.pop().expect("a non-empty spool segment")
}

#[tokio::test]
async fn after_kill_9_the_intact_spool_is_replayed_and_a_torn_record_is_skipped() {
    let pg = PrivateCluster::start().await;
    let db = connect(&pg.url).await;
    let first = seed_tenant(&db).await;
    let mut messages = vec![first];
    for _ in 0..7 {
        messages.push(seed_message_in(&db, &first).await);
    }
    drop(db);
    let spool = temp_dir("crash-spool");
    // Webhooks, not unsubscribes: an unsubscribe is refused (503) while its token's
    // organization cannot be checked against the message, a webhook is spooled.
    let postmark = [("REACHLY_POSTMARK_BASIC_AUTH", "pm:secret")];
    let service = ServeProcess::spawn(&pg.url, &spool, &postmark);
    service.wait_admin_ok("/readyz").await;
    pg.stop().await;
    let client = http_client();
    for m in &messages {
        assert_eq!(
            postmark_delivery(&client, &service.url(""), m.message).await,
            200,
            "acknowledged while the database is down"
        );
    }
    service.kill9();
    // The crash tore the last record: cut it short by a few bytes.
    let seg = newest_segment(&spool);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 3).unwrap();
    drop(f);

    pg.start_again().await;
    let service = ServeProcess::spawn(&pg.url, &spool, &postmark);
    let db = connect(&pg.url).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'delivered'",
        7,
    )
    .await;
    let text = http_client()
        .get(service.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(&text, "reachly_spool_torn_records_total"),
        1.0,
        "{text}"
    );
    assert_eq!(metric_value(&text, "reachly_spool_bytes"), 0.0, "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        db.query_one("SELECT count(*) FROM email_events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        7
    );
    service.kill9();
    pg.stop().await;
}

#[tokio::test]
async fn sigterm_under_load_loses_nothing_that_was_accepted() {
    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let spool = temp_dir("drain-spool");
    // Long flush interval: at SIGTERM most accepted events are still in memory.
    let service = ServeProcess::spawn(
        &url,
        &spool,
        &[
            ("REACHLY_FLUSH_INTERVAL_MS", "5000"),
            ("REACHLY_MIGRATE_ON_START", "false"),
        ],
    );
    service.wait_admin_ok("/readyz").await;
    let open = token::mint(&test_token_keys(), Purpose::Open, s.org, s.message, None).unwrap();
    let url_pixel = service.url(&format!("/o/{open}.gif"));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let u = url_pixel.clone();
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut ok = 0u64;
            for _ in 0..400 {
                match client.get(&u).header("user-agent", BROWSER_UA).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(_) => {}
                    Err(_) => break, // the listener is closed
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.signal("-TERM");
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    assert_eq!(service.wait(Duration::from_secs(30)).await, Some(0));
    assert!(accepted > 0);
    let stored: i64 = db
        .query_one("SELECT count(*) FROM email_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored as u64, accepted,
        "every GIF answered is a stored event"
    );
}

#[tokio::test]
async fn two_instances_on_one_database_neither_deadlock_nor_lose_updates() {
    let url = fresh_database().await;
    let a = spawn_app_on(&url, |_| {}, Default::default()).await;
    let b = spawn_app_on(&url, |_| {}, Default::default()).await;
    let first = a.seed().await;
    let mut messages = vec![first];
    for _ in 0..19 {
        messages.push(a.seed_message(&first).await);
    }
    // Every message gets opens, clicks and deliveries from both instances; every other one
    // a hard bounce, every third a complaint. Each envelope touches many rows, in
    // different orders on each side, to provoke lock-order conflicts.
    let kinds = [EventType::Delivered, EventType::Opened, EventType::Clicked];
    let mut jobs = Vec::new();
    for round in 0..10 {
        for (side, app) in [(0, &a), (1, &b)] {
            let mut records = Vec::new();
            let order: Vec<&Seeded> = if (round + side) % 2 == 0 {
                messages.iter().collect()
            } else {
                messages.iter().rev().collect()
            };
            for (i, m) in order.into_iter().enumerate() {
                let mut e = esp_event(
                    m,
                    kinds[(i + round) % 3],
                    &format!("{round}-{side}-{i}-{}", m.message),
                );
                if round == 0 && i % 2 == 0 {
                    e.event_type = EventType::Bounced;
                    e.bounce_class = Some(BounceClass::Hard);
                } else if round == 1 && i % 3 == 0 {
                    e.event_type = EventType::Complained;
                }
                records.push(Record::Event(e));
            }
            let ingest = app.state.ingest.clone();
            jobs.push(tokio::spawn(
                async move { ingest.submit_durable(records).await },
            ));
        }
    }
    let all = futures_util::future::join_all(jobs);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no deadlock: both finish");
    for r in results {
        r.unwrap().expect("durable");
    }
    assert_eq!(a.count("SELECT count(*) FROM email_events").await, 400);
    for m in &messages {
        let row = a.message(m.message).await;
        let status = row.status.as_deref().unwrap_or("");
        assert!(
            ["clicked", "complained", "bounced"].contains(&status),
            "every message was clicked at least; got {status}"
        );
        assert!(row.opened_at.is_some() && row.clicked_at.is_some() && row.delivered_at.is_some());
    }
    let bounced = a
        .count("SELECT count(*) FROM campaign_messages WHERE status = 'bounced'")
        .await;
    let contacts_bounced = a
        .count("SELECT count(*) FROM contacts WHERE status = 'bounced'")
        .await;
    assert_eq!(bounced, contacts_bounced);
    assert!(bounced > 0);
    a.stop().await;
    b.stop().await;
}
