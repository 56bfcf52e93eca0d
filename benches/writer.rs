//! Writer throughput, with references, on one throwaway PostgreSQL (fsync and synchronous
//! commit on), in one run:
//! - **writer**: N events fed straight into the pipeline (`Ingest::submit_durable`, 2 writers,
//!   5,000-event batches): COPY into staging, idempotent insert, set-based merge;
//! - **copy**: the same rows loaded by plain `psql \copy` plus one set-based UPDATE of
//!   `campaign_messages` (no idempotency, no suppression: the database's own ceiling);
//! - **per-event**: one `INSERT` + `UPDATE` transaction per event (a sample, rate extrapolated).
//!
//! For each schema variant, from the seed's indexes to the shipped schema (migration V3: no
//! `(campaign_id, status)` index, fillfactor 70, no redundant `idx_events_org_id`), it prints
//! events/s, write-ahead-log bytes per event (`pg_current_wal_lsn()`), and the share of HOT
//! updates of `campaign_messages`.
//!
//! `cargo bench --bench writer [-- --messages 50000]`

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reachly_ingest::config::{Config, ServeArgs};
use reachly_ingest::event::{BounceClass, Event, EventType, Record, Source};
use reachly_ingest::pgcluster::PgCluster;
use reachly_ingest::pipeline::Pipeline;
use tokio_postgres::Client;
use uuid::Uuid;

mod support;
use support::arg;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A realistic campaign's events: every message delivered, 40% opened (twice on average),
/// 10% clicked, 2% hard-bounced, 0.2% complaints, 0.5% unsubscribes; shuffled.
fn events(org: Uuid, messages: &[Uuid], rng: &mut Rng) -> Vec<Event> {
    let base = DateTime::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
    let at = |rng: &mut Rng| base + chrono::Duration::milliseconds((rng.next() % 3_000_000) as i64);
    let mut out = Vec::new();
    let push = |m: Uuid, t: EventType, rng: &mut Rng, out: &mut Vec<Event>| {
        let mut e = Event::new(m, t, at(rng), Source::Sendgrid);
        e.claimed_organization_id = Some(org);
        e.dedup_key = Some(format!("sendgrid:id:{}", Uuid::new_v4().simple()));
        if t == EventType::Bounced {
            e.bounce_class = Some(BounceClass::Hard);
            e.error_message = Some("550 5.1.1 user unknown".into());
        }
        if t == EventType::Clicked {
            e.link_url = Some("https://example.com/pricing?utm_source=reachly".into());
        }
        if matches!(t, EventType::Opened | EventType::Clicked) {
            e.user_agent = Some("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0".into());
            e.ip_address = Some("203.0.113.0".into());
        }
        out.push(e);
    };
    for (i, m) in messages.iter().enumerate() {
        push(*m, EventType::Delivered, rng, &mut out);
        if i % 10 < 4 {
            for _ in 0..1 + rng.below(3) {
                push(*m, EventType::Opened, rng, &mut out);
            }
        }
        if i % 10 == 0 {
            push(*m, EventType::Clicked, rng, &mut out);
        }
        if i % 50 == 7 {
            push(*m, EventType::Bounced, rng, &mut out);
        }
        if i % 500 == 3 {
            push(*m, EventType::Complained, rng, &mut out);
        }
        if i % 200 == 11 {
            push(*m, EventType::Unsubscribed, rng, &mut out);
        }
    }
    for i in (1..out.len()).rev() {
        let j = rng.below(i + 1);
        out.swap(i, j);
    }
    out
}

async fn wal_lsn(db: &Client) -> i64 {
    db.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0)
}

async fn reset(db: &Client) {
    // One statement per call: VACUUM cannot run inside the implicit transaction of a
    // multi-statement query.
    for sql in [
        "TRUNCATE email_events, webhook_dead_letters",
        "UPDATE campaign_messages SET status = 'sent', sent_at = NULL, delivered_at = NULL, opened_at = NULL, \
           clicked_at = NULL, error_message = NULL, error_at = NULL",
        "UPDATE contacts SET status = 'active'",
        "VACUUM (ANALYZE) campaign_messages",
        "VACUUM (ANALYZE) contacts",
        "CHECKPOINT",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
}

async fn hot_stats(db: &Client) -> (i64, i64) {
    tokio::time::sleep(Duration::from_millis(1200)).await; // stats are flushed within a second
    let r = db
        .query_one("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'campaign_messages'", &[])
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

struct Measure {
    events_per_s: f64,
    wal_per_event: f64,
    hot_share: Option<f64>,
}

async fn run_writer(url: &str, db: &Client, events: &[Event]) -> Measure {
    let spool =
        std::env::temp_dir().join(format!("reachly-bench-spool-{}", Uuid::new_v4().simple()));
    let args = ServeArgs::from_argv([
        "serve",
        "--database-url",
        url,
        "--spool-dir",
        spool.to_str().unwrap(),
        "--buffer-max-events",
        "2000000",
        "--flush-interval-ms",
        "50",
    ]);
    let cfg = Config::from_args(args).unwrap();
    let tls = reachly_ingest::db::tls::connector(None).unwrap();
    let pool = reachly_ingest::db::pool(&cfg.db, tls).unwrap();
    let pipeline =
        Pipeline::start(&cfg.pipeline, pool, reachly_ingest::metrics::Metrics::new()).unwrap();
    let (upd0, hot0) = hot_stats(db).await;
    let wal0 = wal_lsn(db).await;
    let started = Instant::now();
    let acks: Vec<_> = events
        .chunks(500)
        .map(|c| {
            pipeline
                .ingest
                .submit_durable(c.iter().cloned().map(Record::Event).collect())
        })
        .collect();
    for r in futures_util::future::join_all(acks).await {
        r.expect("durable");
    }
    let secs = started.elapsed().as_secs_f64();
    let wal1 = wal_lsn(db).await;
    pipeline.shutdown(Duration::from_secs(30)).await;
    let (upd1, hot1) = hot_stats(db).await;
    let stored: i64 = db
        .query_one("SELECT count(*) FROM email_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, events.len(), "every event stored");
    let _ = std::fs::remove_dir_all(spool);
    Measure {
        events_per_s: events.len() as f64 / secs,
        wal_per_event: (wal1 - wal0) as f64 / events.len() as f64,
        hot_share: (upd1 > upd0).then(|| (hot1 - hot0) as f64 / (upd1 - upd0) as f64),
    }
}

fn csv_field(s: Option<&str>) -> String {
    match s {
        None => String::new(),
        Some(s) => format!("\"{}\"", s.replace('"', "\"\"")),
    }
}

async fn run_copy(url: &str, db: &Client, org: Uuid, events: &[Event]) -> Measure {
    let path = std::env::temp_dir().join(format!("reachly-bench-{}.csv", Uuid::new_v4().simple()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for e in events {
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{}",
            e.id,
            org,
            e.message_id,
            e.event_type.as_str(),
            csv_field(e.ip_address.as_deref()),
            csv_field(e.user_agent.as_deref()),
            csv_field(e.link_url.as_deref()),
            csv_field(Some(&e.metadata_json().to_string())),
            e.occurred_at.to_rfc3339(),
            e.source.provider(),
            csv_field(e.dedup_key.as_deref()),
        )
        .unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let wal0 = wal_lsn(db).await;
    let started = Instant::now();
    let out = std::process::Command::new("psql")
        .arg(url)
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-c")
        .arg(format!(
            "\\copy email_events ({}) FROM '{}' WITH (FORMAT csv)",
            reachly_ingest::event::EVENT_COLUMNS,
            path.display()
        ))
        .output()
        .expect("psql (install postgresql-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.batch_execute(
        "UPDATE campaign_messages m SET \
           status = CASE WHEN u.rank > reachly_message_status_rank(m.status) THEN u.status ELSE m.status END, \
           delivered_at = LEAST(m.delivered_at, u.delivered_at), opened_at = LEAST(m.opened_at, u.opened_at), \
           clicked_at = LEAST(m.clicked_at, u.clicked_at), updated_at = now() \
         FROM (SELECT message_id, \
                 (array['pending','sent','delivered','opened','clicked','unsubscribed','complained','bounced'])[max(reachly_message_status_rank(event_type)) + 1] AS status, \
                 max(reachly_message_status_rank(event_type)) AS rank, \
                 min(created_at) FILTER (WHERE event_type = 'delivered') AS delivered_at, \
                 min(created_at) FILTER (WHERE event_type IN ('opened', 'clicked')) AS opened_at, \
                 min(created_at) FILTER (WHERE event_type = 'clicked') AS clicked_at \
               FROM email_events GROUP BY message_id) u \
         WHERE m.id = u.message_id",
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let wal1 = wal_lsn(db).await;
    let _ = std::fs::remove_file(path);
    Measure {
        events_per_s: events.len() as f64 / secs,
        wal_per_event: (wal1 - wal0) as f64 / events.len() as f64,
        hot_share: None,
    }
}

async fn run_per_event(db: &Client, org: Uuid, events: &[Event]) -> Measure {
    let insert = db
        .prepare(&format!(
            "INSERT INTO email_events ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            reachly_ingest::event::EVENT_COLUMNS
        ))
        .await
        .unwrap();
    let update = db
        .prepare(
            "UPDATE campaign_messages SET \
               status = CASE WHEN reachly_message_status_rank($2) > reachly_message_status_rank(status) THEN $2 ELSE status END, \
               opened_at = CASE WHEN $2 IN ('opened', 'clicked') THEN LEAST(opened_at, $3) ELSE opened_at END, \
               updated_at = now() WHERE id = $1",
        )
        .await
        .unwrap();
    let wal0 = wal_lsn(db).await;
    let started = Instant::now();
    for e in events {
        db.batch_execute("BEGIN").await.unwrap();
        let meta = e.metadata_json();
        db.execute(
            &insert,
            &[
                &e.id,
                &org,
                &e.message_id,
                &e.event_type.as_str(),
                &e.ip_address,
                &e.user_agent,
                &e.link_url,
                &meta,
                &e.occurred_at,
                &e.source.provider(),
                &e.dedup_key,
            ],
        )
        .await
        .unwrap();
        db.execute(
            &update,
            &[&e.message_id, &e.event_type.as_str(), &e.occurred_at],
        )
        .await
        .unwrap();
        db.batch_execute("COMMIT").await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let wal1 = wal_lsn(db).await;
    Measure {
        events_per_s: events.len() as f64 / secs,
        wal_per_event: (wal1 - wal0) as f64 / events.len() as f64,
        hot_share: None,
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let n_messages = arg("--messages", 50_000);
        let sample = arg("--per-event-sample", 3_000);
        let dir =
            std::env::temp_dir().join(format!("reachly-bench-pg-{}", Uuid::new_v4().simple()));
        let cluster = PgCluster::throwaway(
            &dir,
            false,
            |_| Ok(()),
            &[
                ("shared_buffers", "256MB"),
                ("max_wal_size", "4GB"),
                ("checkpoint_timeout", "30min"),
            ],
        )?;
        let result = bench(&cluster, n_messages, sample).await;
        let _ = cluster.stop("immediate");
        let _ = std::fs::remove_dir_all(&dir);
        result
    })
}

async fn bench(cluster: &PgCluster, n_messages: usize, sample: usize) -> anyhow::Result<()> {
    let (url, db) = support::bench_database(cluster).await?;
    let (org, messages) = support::seed_campaign(&db, n_messages).await?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let all = events(org, &messages, &mut rng);
    let mut maintenance_conn = reachly_ingest::db::connect(&url).await?;
    reachly_ingest::db::partitions::maintain(
        &mut maintenance_conn,
        Utc::now().date_naive(),
        2,
        400,
    )
    .await?;
    println!(
        "writer benchmark: {} messages, {} events; per-event sample {}; PostgreSQL with fsync and synchronous_commit on\n",
        messages.len(),
        all.len(),
        sample
    );
    let mut table = String::from(
        "| campaign_messages schema | writer ev/s | writer WAL B/ev | HOT updates | psql \\copy + UPDATE ev/s | copy WAL B/ev | per-event ev/s | per-event WAL B/ev | writer / copy | writer / per-event |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, ddl) in [
        (
            "seed: (campaign_id, status) index, fillfactor 100",
            "CREATE INDEX IF NOT EXISTS idx_messages_status ON campaign_messages (campaign_id, status); \
             CREATE INDEX IF NOT EXISTS idx_events_org_id ON email_events (organization_id); \
             ALTER TABLE campaign_messages SET (fillfactor = 100); VACUUM FULL campaign_messages;",
        ),
        (
            "without the status index",
            "DROP INDEX IF EXISTS idx_messages_status;",
        ),
        (
            "without the status index, fillfactor 70",
            "ALTER TABLE campaign_messages SET (fillfactor = 70); VACUUM FULL campaign_messages;",
        ),
        (
            "... and without the redundant idx_events_org_id (the shipped schema, V3)",
            "DROP INDEX IF EXISTS idx_events_org_id;",
        ),
    ] {
        for sql in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            db.batch_execute(sql).await?;
        }
        reset(&db).await;
        let w = run_writer(&url, &db, &all).await;
        reset(&db).await;
        let c = run_copy(&url, &db, org, &all).await;
        reset(&db).await;
        let p = run_per_event(&db, org, &all[..sample.min(all.len())]).await;
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% | {:.1}x |",
            w.events_per_s,
            w.wal_per_event,
            w.hot_share
                .map_or("n/a".into(), |h| format!("{:.0}%", h * 100.0)),
            c.events_per_s,
            c.wal_per_event,
            p.events_per_s,
            p.wal_per_event,
            100.0 * w.events_per_s / c.events_per_s,
            w.events_per_s / p.events_per_s,
        );
        println!(
            "{name}: writer {:.0} ev/s, copy {:.0} ev/s, per-event {:.0} ev/s",
            w.events_per_s, c.events_per_s, p.events_per_s
        );
    }
    println!("\n{table}");
    Ok(())
}
