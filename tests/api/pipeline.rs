//! The pipeline's guarantees against a real PostgreSQL: row isolation and dead letters,
//! a database outage, a crash with a torn spool, a drain under load, two instances on one
//! database, and a sabotaged schema.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Events without an ESP key are inserted without `ON CONFLICT` (their id is made at
/// arrival); the same event stored before (as after an ambiguous commit or a spool replay)
/// makes the batch go again idempotently: it is stored once, counted as a duplicate, and
/// the new events beside it, with and without an ESP key, are written.
#[tokio::test]
async fn an_event_without_an_esp_key_stored_before_is_stored_once_and_the_batch_beside_it_is_written()
 {
    let app = spawn_app().await;
    let s = app.seed().await;
    let open = Event::new(s.message, EventType::Opened, Utc::now(), Source::Pixel);
    app.state
        .ingest
        .submit_durable(vec![Record::Event(open.clone())])
        .await
        .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 1);
    let click = Event::new(s.message, EventType::Clicked, Utc::now(), Source::Click);
    app.state
        .ingest
        .submit_durable(vec![
            Record::Event(open.clone()),
            Record::Event(click.clone()),
            Record::Event(esp_event(&s, EventType::Delivered, "beside")),
        ])
        .await
        .unwrap();
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        3,
        "the open once, the click and the delivery"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM email_events WHERE id = '{}'",
            open.id
        ))
        .await,
        1
    );
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
    let messages = seed_tenant_messages(&db, 30).await;
    let first = messages[0];
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
    // its message: it is spooled and answered 202 "received" (never "done"); the writer
    // checks the tenant when it writes.
    let mut unsub_received = 0;
    for t in &unsubs[5..20] {
        unsub_received += usize::from(unsubscribe(&app.http, &base, t).await == 202);
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

    assert_eq!(
        (gifs, unsub_ok, unsub_received),
        (40, 15, 15),
        "every request was accepted"
    );
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
        30,
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
        30,
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
        71
    );
    pg.stop().await;
}

/// `REACHLY_BUFFER_MAX_BYTES`: with the database down nothing leaves memory, and once the
/// buffered events' estimated memory reaches the bound the next ones go to the spool, though
/// the event bound is far away; every one is stored when the database returns.
#[tokio::test]
async fn the_buffer_holds_events_up_to_its_byte_bound_and_spills_the_rest_to_the_spool() {
    const MAX_BYTES: usize = 6_000;
    let pg = PrivateCluster::start().await;
    let db = connect(&pg.url).await;
    let messages = seed_tenant_messages(&db, 30).await;
    drop(db);
    let app = spawn_app_on(
        &pg.url,
        |a| {
            a.pipeline.buffer_max_events = 100_000;
            a.pipeline.buffer_max_bytes = MAX_BYTES;
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
    let base = app.url("");
    pg.stop().await;
    let gifs = pixel_hits(&base, &opens).await;
    assert_eq!(gifs, 30, "every pixel was served");
    let (events, bytes) = (
        app.state.ingest.buffered(),
        app.state.ingest.buffered_bytes(),
    );
    assert!(
        events > 0 && events < 30 && bytes > 0 && bytes <= MAX_BYTES,
        "in memory: {events} events, {bytes} bytes (bound {MAX_BYTES})"
    );
    assert_eq!(app.metric("reachly_buffer_bytes").await, bytes as f64);
    // A pixel whose event did not fit in memory is answered once the event is on disk (the
    // disk's pace holds such requests back, so the spool's queue cannot grow without
    // bound): the events past the byte bound are in the spool's segments already.
    let on_disk: usize = std::fs::read_dir(&app.spool_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            reachly_ingest::pipeline::spool::read_segment(&p)
                .unwrap()
                .envelopes
                .iter()
                .map(Vec::len)
                .sum::<usize>()
        })
        .sum();
    assert_eq!(
        events + on_disk,
        30,
        "every answered pixel's event is in memory ({events}) or on disk ({on_disk})"
    );
    pg.start_again().await;
    let db = connect(&pg.url).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'opened'",
        30,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.state.ingest.buffered_bytes() > 0 || app.state.ingest.spool_bytes() > 0 {
        assert!(
            Instant::now() < deadline,
            "memory and spool were not emptied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
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
    let messages = seed_tenant_messages(&db, 8).await;
    drop(db);
    let spool = temp_dir("crash-spool");
    // Webhooks: spooled while the database is down and acknowledged 200 (an unsubscribe is
    // spooled too, but answered 202 "received" since its tenant cannot be checked then).
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
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let u = url_pixel.clone();
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut ok = 0u64;
            for _ in 0..400 {
                match client.get(&u).header("user-agent", BROWSER_UA).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break, // the listener is closed
                }
            }
            ok
        }));
    }
    // SIGTERM in the middle of the load, not before it started (a busy machine can take
    // longer than any fixed sleep to answer the first requests).
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::Relaxed) < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

#[tokio::test]
async fn a_dead_letter_carries_the_message_rows_organization_never_the_claimed_one() {
    let app = spawn_app().await;
    let a = app.seed().await;
    let b = app.seed().await;
    // Claims tenant B for tenant A's message.
    let mut foreign = esp_event(&a, EventType::Delivered, "claims-b");
    foreign.claimed_organization_id = Some(b.org);
    // Claims tenant B for a message that does not exist.
    let mut unknown = esp_event(&b, EventType::Delivered, "no-such-message");
    unknown.message_id = Uuid::new_v4();
    // A dead letter a webhook made itself, naming A's message.
    let mut brought = reachly_ingest::event::DeadLetter::new("sendgrid", "no_event_type", "{}");
    brought.message_id = Some(a.message);
    brought.organization_id = Some(b.org);
    app.state
        .ingest
        .submit_durable(vec![
            Record::Event(foreign.clone()),
            Record::Event(unknown.clone()),
            Record::DeadLetter(brought.clone()),
        ])
        .await
        .expect("durable");
    let rows: Vec<(String, Option<Uuid>, Option<Uuid>)> = app
        .db
        .query(
            "SELECT reason, message_id, organization_id FROM webhook_dead_letters ORDER BY reason",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("no_event_type".to_string(), Some(a.message), Some(a.org)),
            (
                "organization_mismatch".to_string(),
                Some(a.message),
                Some(a.org)
            ),
            (
                "unknown_message".to_string(),
                Some(unknown.message_id),
                None
            ),
        ]
    );
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);
}

/// Holds a lock on a message row while an event for it is written (`configure` sets the
/// timeouts): the timeout of `kind` is counted while the lock is held, nothing is committed,
/// the event is written once the lock is gone, and no pooled connection keeps the settings.
async fn write_past_a_held_row_lock(
    configure: impl FnOnce(&mut reachly_ingest::config::ServeArgs),
    kind: &str,
) {
    let app = spawn_app_with(configure).await;
    let s = app.seed().await;
    let mut locker = connect(&app.db_url).await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM campaign_messages WHERE id = $1 FOR UPDATE",
        &[&s.message],
    )
    .await
    .unwrap();
    app.state
        .ingest
        .submit(vec![Record::Event(esp_event(
            &s,
            EventType::Delivered,
            "behind-a-lock",
        ))])
        .await;
    let sample = format!(r#"reachly_db_timeouts_total{{kind="{kind}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.metric(&sample).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no {kind} counted while the row was locked:\n{}",
            app.metrics_text().await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        app.metric(r#"reachly_db_errors_total{operation="write_batch"}"#)
            .await
            >= 1.0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        0,
        "nothing is committed while the lock is held"
    );
    tx.rollback().await.unwrap();
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("delivered")
    );
    // SET LOCAL: no pooled connection keeps the batch's timeouts.
    let pool = &app.state.pool;
    let mut held = Vec::new();
    for _ in 0..pool.status().max_size {
        held.push(pool.get().await.unwrap());
    }
    for c in &held {
        for setting in ["lock_timeout", "statement_timeout", "client_min_messages"] {
            let v: String = c
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .unwrap()
                .get(0);
            let server_default = if setting == "client_min_messages" {
                "notice"
            } else {
                "0"
            };
            assert_eq!(v, server_default, "{setting} leaked to a pooled connection");
        }
    }
}

#[tokio::test]
async fn a_lock_held_on_a_message_row_times_out_is_counted_and_the_batch_is_written_later() {
    write_past_a_held_row_lock(
        |a| {
            a.pipeline.lock_timeout = Duration::from_millis(200);
            a.pipeline.statement_timeout = Duration::ZERO;
        },
        "lock_timeout",
    )
    .await;
}

#[tokio::test]
async fn a_statement_stuck_behind_a_lock_hits_the_statement_timeout_and_is_retried() {
    write_past_a_held_row_lock(
        |a| {
            a.pipeline.lock_timeout = Duration::ZERO;
            a.pipeline.statement_timeout = Duration::from_millis(300);
        },
        "statement_timeout",
    )
    .await;
}

#[tokio::test]
async fn batches_log_no_notice_of_the_staging_table() {
    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let spool = temp_dir("notice-spool");
    let service = ServeProcess::spawn(
        &url,
        &spool,
        &[
            ("REACHLY_FLUSH_INTERVAL_MS", "5"),
            ("REACHLY_MIGRATE_ON_START", "false"),
        ],
    );
    service.wait_admin_ok("/readyz").await;
    let open = token::mint(&test_token_keys(), Purpose::Open, s.org, s.message, None).unwrap();
    let client = http_client();
    // One batch per hit: each waits until the previous one is committed.
    for n in 1..=12 {
        let r = client
            .get(service.url(&format!("/o/{open}.gif")))
            .header("user-agent", BROWSER_UA)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        wait_for_count(&db, "SELECT count(*) FROM email_events", n).await;
    }
    let log = service.log.lock().unwrap().clone();
    service.kill9();
    let notices: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("NOTICE") || l.contains("already exists"))
        .collect();
    assert!(notices.is_empty(), "{notices:#?}");
    assert!(
        log.iter().any(|l| l.contains("serving")),
        "the log was captured: {log:#?}"
    );
}

#[tokio::test]
async fn a_database_error_is_described_with_its_sqlstate_message_and_detail() {
    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let err = db
        .execute(
            "INSERT INTO contacts (organization_id, email) SELECT organization_id, email FROM contacts WHERE organization_id = $1",
            &[&s.org],
        )
        .await
        .expect_err("a duplicate contact");
    let text = reachly_ingest::db::describe_error(&err);
    assert!(
        text.starts_with("ERROR 23505: duplicate key value violates unique constraint"),
        "{text}"
    );
    assert!(
        text.contains("detail: Key (organization_id, email)="),
        "{text}"
    );
    assert!(
        text.contains("constraint: contacts_organization_id_email_key"),
        "{text}"
    );
    assert!(!text.contains("db error"), "{text}");
    let wrapped = anyhow::Error::new(err).context("seeding");
    assert!(
        reachly_ingest::db::describe_error(wrapped.as_ref()).starts_with("seeding: ERROR 23505: "),
        "{wrapped:#}"
    );
    assert_eq!(
        reachly_ingest::db::sqlstate(wrapped.as_ref()).as_deref(),
        Some("23505")
    );
}

#[tokio::test]
async fn a_described_check_failure_names_the_constraint_but_not_the_rows_content() {
    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let err = db
        .execute(
            "INSERT INTO email_events (organization_id, message_id, event_type, user_agent) \
             VALUES ($1, $2, 'exploded', 'secret-agent')",
            &[&s.org, &s.message],
        )
        .await
        .expect_err("check constraint");
    let text = reachly_ingest::db::describe_error(&err);
    assert!(text.starts_with("ERROR 23514: "), "{text}");
    assert!(
        text.contains("constraint: email_events_event_type_check"),
        "{text}"
    );
    assert!(text.contains("row data not logged"), "{text}");
    assert!(!text.contains("secret-agent"), "{text}");
}

#[tokio::test]
async fn a_lock_timeout_is_logged_with_its_sqlstate_and_message() {
    let url = fresh_database().await;
    let mut db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let spool = temp_dir("lock-log-spool");
    let service = ServeProcess::spawn(
        &url,
        &spool,
        &[
            ("REACHLY_FLUSH_INTERVAL_MS", "5"),
            ("REACHLY_DB_LOCK_TIMEOUT_MS", "200"),
            ("REACHLY_MIGRATE_ON_START", "false"),
        ],
    );
    service.wait_admin_ok("/readyz").await;
    let tx = db.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM campaign_messages WHERE id = $1 FOR UPDATE",
        &[&s.message],
    )
    .await
    .unwrap();
    let open = token::mint(&test_token_keys(), Purpose::Open, s.org, s.message, None).unwrap();
    let r = http_client()
        .get(service.url(&format!("/o/{open}.gif")))
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    let line = loop {
        let found = service
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("database write failed"))
            .cloned();
        if let Some(l) = found {
            break l;
        }
        assert!(Instant::now() < deadline, "no log line of the lock timeout");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["sqlstate"], "55P03", "{line}");
    assert_eq!(v["fields"]["timeout"], "lock_timeout", "{line}");
    let error = v["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("ERROR 55P03: canceling statement due to lock timeout"),
        "{line}"
    );
    tx.rollback().await.unwrap();
    wait_for_count(&db, "SELECT count(*) FROM email_events", 1).await;
    service.kill9();
}

/// Group commit adapts to the traffic: a durable request (an unsubscribe waits for its
/// commit) with nothing arriving behind it is written once the 2 ms gap passes, not held for
/// the whole `REACHLY_DURABLE_LINGER_MS` (here 60 s, so holding it would time the request out).
#[tokio::test]
async fn a_lone_durable_request_is_written_after_the_gap_not_the_whole_linger() {
    let app = spawn_app_on(
        &fresh_database().await,
        |a| a.pipeline.durable_linger = Duration::from_secs(60),
        Default::default(),
    )
    .await;
    let s = app.seed().await;
    let t = token::mint(
        &test_token_keys(),
        Purpose::Unsubscribe,
        s.org,
        s.message,
        None,
    )
    .unwrap();
    let started = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        unsubscribe(&app.http, &app.url(""), &t),
    )
    .await
    .expect("the unsubscribe was held for the linger (no answer within 20 s)");
    assert_eq!(
        status,
        200,
        "unsubscribe answered {status} after {:?}",
        started.elapsed()
    );
    assert_eq!(app.contact_status(s.contact).await, "unsubscribed");
}

/// The writers remember each message's tenant and contact; a message deleted after its
/// first event must still turn a later event into an `unknown_message` dead letter (the
/// insert fails on the foreign key, and the batch is retried with the cache emptied), and
/// the events beside it are written.
#[tokio::test]
async fn an_event_for_a_message_deleted_after_it_was_cached_is_an_unknown_message_dead_letter() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let doomed = app.seed_message(&s).await;
    app.state
        .ingest
        .submit_durable(vec![
            Record::Event(esp_event(&s, EventType::Delivered, "k1")),
            Record::Event(esp_event(&doomed, EventType::Delivered, "k2")),
        ])
        .await
        .expect("durable");
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 2);
    app.db
        .execute(
            "DELETE FROM campaign_messages WHERE id = $1",
            &[&doomed.message],
        )
        .await
        .unwrap();
    app.state
        .ingest
        .submit_durable(vec![
            Record::Event(esp_event(&s, EventType::Opened, "k3")),
            Record::Event(esp_event(&doomed, EventType::Opened, "k4")),
        ])
        .await
        .expect("durable");
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        2,
        "the delivered and opened events of the surviving message"
    );
    let dead: Vec<(String, Option<Uuid>)> = app
        .db
        .query("SELECT reason, message_id FROM webhook_dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        dead,
        vec![("unknown_message".to_string(), Some(doomed.message))]
    );
}

/// Each thread of `pid`: (name, nice value), from `/proc/<pid>/task/*/stat` (the name is
/// between the first `(` and the last `)`; nice is the 19th field).
fn threads_and_nice(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task") {
        let Ok(stat) = std::fs::read_to_string(entry.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        let name = stat[open + 1..close].to_string();
        // After ") ": state(3) ppid(4) ... nice is field 19, the 17th after the name.
        let nice: i32 = stat[close + 2..]
            .split(' ')
            .nth(16)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("nice field of {stat:?}"));
        out.push((name, nice));
    }
    out
}

#[tokio::test]
async fn the_writers_and_large_webhook_parses_run_on_threads_below_the_request_paths_priority() {
    use reachly_ingest::webhooks::testkit::sign::{sendgrid_keypair, sendgrid_signature};

    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let spool = temp_dir("nice-spool");
    let (key, public_key) = sendgrid_keypair();
    let service = ServeProcess::spawn(
        &url,
        &spool,
        &[
            ("REACHLY_BACKGROUND_NICE", "7"),
            ("REACHLY_WRITERS", "2"),
            ("REACHLY_SENDGRID_PUBLIC_KEY", &public_key),
            ("REACHLY_MIGRATE_ON_START", "false"),
        ],
    );
    service.wait_admin_ok("/readyz").await;
    let pid = service.child.id();
    let own_nice = threads_and_nice(std::process::id())[0].1;

    // A SendGrid batch well past the size parsed off the request path (16 kB), and pixels.
    let batch: Vec<serde_json::Value> = (0..300)
        .map(|i| {
            serde_json::json!({
                "email": "alex@example.com",
                "timestamp": Utc::now().timestamp(),
                "event": "delivered",
                "sg_event_id": format!("nice-{i:04}-{}", Uuid::new_v4()),
                "sg_message_id": format!("nice.{i}.filter0001"),
                "response": "250 OK",
                "reachly_message_id": s.message.to_string(),
                "reachly_organization_id": s.org.to_string(),
            })
        })
        .collect();
    let body = serde_json::to_string(&batch).unwrap();
    assert!(body.len() > 32 * 1024, "{} bytes", body.len());
    let ts = Utc::now().timestamp().to_string();
    let sig = sendgrid_signature(&key, &ts, body.as_bytes());
    let client = http_client();
    let r = client
        .post(service.url("/webhooks/sendgrid"))
        .header("x-twilio-email-event-webhook-timestamp", &ts)
        .header("x-twilio-email-event-webhook-signature", &sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let open = token::mint(&test_token_keys(), Purpose::Open, s.org, s.message, None).unwrap();
    for _ in 0..50 {
        let r = client
            .get(service.url(&format!("/o/{open}.gif")))
            .header("user-agent", BROWSER_UA)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The webhook was answered after its commit; the pixels are written by the writers.
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'delivered'",
        300,
    )
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM email_events WHERE event_type = 'opened'",
        50,
    )
    .await;

    let threads = threads_and_nice(pid);
    let background: Vec<i32> = threads
        .iter()
        .filter(|(name, _)| name == "reachly-bg")
        .map(|t| t.1)
        .collect();
    let workers = 2.min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    // The runtime's workers, and at least one blocking thread: the parse of the batch.
    assert!(
        background.len() > workers,
        "expected {workers} workers and a blocking thread named reachly-bg: {threads:?}"
    );
    assert!(
        background.iter().all(|&n| n == (own_nice + 7).min(19)),
        "every reachly-bg thread at nice {} : {threads:?}",
        own_nice + 7
    );
    // The request path (the main runtime's workers, `tokio-rt-worker`) keeps the
    // process's priority.
    let request_path: Vec<i32> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("tokio-r"))
        .map(|t| t.1)
        .collect();
    assert!(!request_path.is_empty(), "{threads:?}");
    assert!(
        request_path.iter().all(|&n| n == own_nice),
        "request threads at nice {own_nice}: {threads:?}"
    );
    service.signal("-TERM");
    assert_eq!(service.wait(Duration::from_secs(30)).await, Some(0));
}
