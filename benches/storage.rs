//! Storage per event, measured: N events of each of the nine types, shaped as the service
//! stores them (our pixel, click and one-click endpoints; SendGrid-shaped webhook events with
//! the metadata `webhooks/sendgrid.rs` keeps), written through the real pipeline into a
//! throwaway PostgreSQL, each type into a day partition of its own, so that a partition's
//! size is one type's size. After `VACUUM ANALYZE` it prints, per type, the bytes per event
//! of the heap (with TOAST) and of the indexes; then the same with `metadata` compressed by
//! lz4 instead of pglz (`default_toast_compression`); then each partition's archive
//! (`db::archive`, zstd CSV) in bytes per event and its compression ratio; and the bytes per
//! row of `campaign_messages` and `contacts`. docs/storage.md projects disk use from these.
//! It also projects the heap per event with `user_agent` as a 4-byte reference to a
//! dictionary table (not the shipped schema; what issue 14's first goal would need).
//!
//! `cargo bench --bench storage [-- --per-type 20000]`

use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, Utc};
use reachly_ingest::config::{Config, ServeArgs};
use reachly_ingest::db::archive::{Archived, CrashAfter, archive_day};
use reachly_ingest::db::partitions::{maintain, partition_name};
use reachly_ingest::event::{BounceClass, Event, EventType, Record, Source};
use reachly_ingest::pgcluster::PgCluster;
use reachly_ingest::pipeline::Pipeline;
use serde_json::{Map, Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

mod support;
use support::arg;

const CHROME_UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36";
const IPHONE_UA: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148";
const GMAIL_PROXY_UA: &str =
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)";

/// A SendGrid-looking id of `n` base64 characters, different per `i`.
fn sg_id(i: usize, n: usize) -> String {
    let s = format!("{:x}{}", i, Uuid::new_v4().simple());
    s.chars().cycle().take(n).collect()
}

fn sendgrid_meta(i: usize, extra: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("sg_event_id".into(), Value::from(sg_id(i, 22)));
    m.insert(
        "esp_message_id".into(),
        Value::from(format!(
            "{}.filterdrecv-5645d9c87f-6r2ch-1-6650B0E3-{}.0",
            sg_id(i, 22),
            i % 100
        )),
    );
    m.insert(
        "smtp_id".into(),
        Value::from(format!("<{}@geopod-ismtpd-3>", sg_id(i, 22))),
    );
    if let Value::Object(extra) = extra {
        m.extend(extra);
    }
    m
}

/// Event `i` of type `t` at `at`, as the service would store it.
fn event(t: EventType, i: usize, at: DateTime<Utc>, org: Uuid, message: Uuid) -> Event {
    let source = match t {
        EventType::Opened => Source::Pixel,
        EventType::Clicked => Source::Click,
        EventType::Unsubscribed => Source::Unsubscribe,
        _ => Source::Sendgrid,
    };
    let mut e = Event::new(message, t, at, source);
    e.claimed_organization_id = Some(org);
    if source == Source::Sendgrid {
        e.dedup_key = Some(format!("sendgrid:{}", sg_id(i, 43)));
    }
    let ip = format!("198.51.{}.0", i % 256);
    match t {
        EventType::Sent => e.metadata = sendgrid_meta(i, json!({})),
        EventType::Delivered => {
            e.metadata = sendgrid_meta(
                i,
                json!({"response": "250 2.0.0 OK  1716563200 d75a77b69052e-43f8a2b1c3csi1234567qtx.123 - gsmtp", "tls": 1}),
            )
        }
        EventType::Opened => {
            e.ip_address = Some(ip);
            // A third of opens come through Gmail's image proxy (machine traffic).
            if i.is_multiple_of(3) {
                e.user_agent = Some(GMAIL_PROXY_UA.into());
                e.machine_reason = Some("google_image_proxy".into());
            } else {
                e.user_agent = Some(
                    if i.is_multiple_of(2) {
                        CHROME_UA
                    } else {
                        IPHONE_UA
                    }
                    .into(),
                );
            }
        }
        EventType::Clicked => {
            e.ip_address = Some(ip);
            e.user_agent = Some(CHROME_UA.into());
            e.link_url = Some(format!(
                "https://shop.example.com/products/spring-sale?utm_source=reachly&utm_medium=email&utm_campaign=spring-{}&utm_content=hero",
                i % 7
            ));
        }
        EventType::Bounced => {
            e.bounce_class = Some(BounceClass::Hard);
            e.error_message = Some("550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. (status 5.1.1)".into());
            e.metadata = sendgrid_meta(
                i,
                json!({"reason": "550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. For more information, go to https://support.google.com/mail/?p=NoSuchUser", "status": "5.1.1", "bounce_type": "bounce", "bounce_classification": "Invalid Address"}),
            );
        }
        EventType::Complained => e.metadata = sendgrid_meta(i, json!({})),
        EventType::Unsubscribed => {
            e.ip_address = Some(ip);
            e.user_agent = Some(IPHONE_UA.into());
        }
        EventType::Deferred => {
            e.error_message = Some("451 4.7.650 The mail server has been temporarily rate limited due to IP reputation.".into());
            e.metadata = sendgrid_meta(
                i,
                json!({"response": "451 4.7.650 The mail server [167.89.0.1] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://aka.ms/postmaster", "attempt": "3"}),
            );
        }
        EventType::Dropped => {
            e.error_message = Some("Bounced Address".into());
            e.metadata = sendgrid_meta(i, json!({"reason": "Bounced Address", "status": "5.0.0"}));
        }
    }
    e
}

struct Row {
    heap: f64,
    index: f64,
}

/// Bytes per event of the heap (main fork, TOAST, maps) and of the indexes of `day`'s
/// partition holding `n` events.
async fn per_event(db: &Client, day: NaiveDate, n: usize) -> anyhow::Result<Row> {
    let p = partition_name(day);
    let r = db
        .query_one(
            &format!("SELECT pg_table_size('public.{p}'), pg_indexes_size('public.{p}')"),
            &[],
        )
        .await?;
    let (heap, index): (i64, i64) = (r.get(0), r.get(1));
    Ok(Row {
        heap: heap as f64 / n as f64,
        index: index as f64 / n as f64,
    })
}

async fn write_all(url: &str, events: Vec<Event>) -> anyhow::Result<()> {
    let spool =
        std::env::temp_dir().join(format!("reachly-bench-spool-{}", Uuid::new_v4().simple()));
    let args = ServeArgs::from_argv([
        "serve",
        "--database-url",
        url,
        "--spool-dir",
        spool.to_str().unwrap_or("/tmp/reachly-bench-spool"),
        "--buffer-max-events",
        "2000000",
        // The whole run in memory: past the default byte bound (24 MiB) events would be
        // spooled, acknowledged, and left in the spool this bench deletes.
        "--buffer-max-bytes",
        "2147483648",
        "--flush-interval-ms",
        "50",
    ]);
    let cfg = Config::from_args(args).map_err(anyhow::Error::msg)?;
    let pool = reachly_ingest::db::pool(&cfg.db, reachly_ingest::db::tls::connector(None)?)?;
    let pipeline = Pipeline::start(&cfg.pipeline, pool, reachly_ingest::metrics::Metrics::new())?;
    let acks: Vec<_> = events
        .chunks(1000)
        .map(|c| {
            pipeline
                .ingest
                .submit_durable(c.iter().cloned().map(Record::Event).collect())
        })
        .collect();
    for r in futures_util::future::join_all(acks).await {
        r.map_err(|_| anyhow::anyhow!("an event was not made durable"))?;
    }
    pipeline.shutdown(Duration::from_secs(30)).await;
    let _ = std::fs::remove_dir_all(&spool);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let per_type = arg("--per-type", 20_000usize);
        let dir =
            std::env::temp_dir().join(format!("reachly-bench-pg-{}", Uuid::new_v4().simple()));
        let cluster = PgCluster::throwaway(
            &dir,
            true,
            |_| Ok(()),
            &[("fsync", "off"), ("shared_buffers", "256MB")],
        )?;
        let result = bench(&cluster, per_type).await;
        let _ = cluster.stop("immediate");
        let _ = std::fs::remove_dir_all(&dir);
        result
    })
}

async fn bench(cluster: &PgCluster, per_type: usize) -> anyhow::Result<()> {
    let (url, db) = support::bench_database(cluster).await?;
    let (org, messages) = support::seed_campaign(&db, per_type).await?;
    let first = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap_or_default();
    let day_of = |pass: u64, t: usize| {
        first
            .checked_add_days(Days::new(pass * 10 + t as u64))
            .unwrap_or(first)
    };
    {
        let mut m = reachly_ingest::db::connect(&url).await?;
        maintain(&mut m, first.succ_opt().unwrap_or(first), 30, 4000).await?;
    }
    // Pass 0: pglz (PostgreSQL's default); pass 1: lz4, for the writers' new connections.
    for (pass, compression) in [(0u64, "pglz"), (1, "lz4")] {
        db.batch_execute(&format!(
            "ALTER DATABASE bench SET default_toast_compression = '{compression}'"
        ))
        .await?;
        let mut events = Vec::with_capacity(per_type * 9);
        for (ti, t) in EventType::ALL.into_iter().enumerate() {
            let midnight = day_of(pass, ti)
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default()
                .and_utc();
            for i in 0..per_type {
                let at = midnight
                    + chrono::Duration::milliseconds((i as i64 * 86_000_000) / per_type as i64);
                events.push(event(t, i, at, org, messages[i % messages.len()]));
            }
        }
        write_all(&url, events).await?;
    }
    db.batch_execute("VACUUM ANALYZE").await?;

    println!("## Bytes per event, {per_type} events of each type (after VACUUM ANALYZE)\n");
    println!(
        "| type | heap+TOAST B/ev | indexes B/ev | total B/ev | total with lz4 B/ev | metadata B (avg) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut totals = Vec::new();
    for (ti, t) in EventType::ALL.into_iter().enumerate() {
        let stored: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM public.{}",
                    partition_name(day_of(0, ti))
                ),
                &[],
            )
            .await?
            .get(0);
        // Every event written must be there: a shortfall means the bench measured a part.
        anyhow::ensure!(
            stored as usize == per_type,
            "{}: {stored} of {per_type} events stored",
            t.as_str()
        );
        let pglz = per_event(&db, day_of(0, ti), stored as usize).await?;
        let lz4 = per_event(&db, day_of(1, ti), stored as usize).await?;
        let meta: f64 = db
            .query_one(
                &format!(
                    "SELECT avg(pg_column_size(metadata))::float8 FROM public.{}",
                    partition_name(day_of(0, ti))
                ),
                &[],
            )
            .await?
            .get(0);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            t.as_str(),
            pglz.heap,
            pglz.index,
            pglz.heap + pglz.index,
            lz4.heap + lz4.index,
            meta
        );
        totals.push((t, pglz.heap + pglz.index, stored));
    }
    let toasted: i64 = db
        .query_one(
            "SELECT count(*) FROM public.email_events WHERE pg_column_compression(metadata) IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    println!("\nmetadata values stored compressed (either method): {toasted}");

    // What a user-agent dictionary would save (issue 14's first goal: the events heap is
    // most of the data pages written per event). Not the shipped schema: each partition with
    // a user agent is copied with `user_agent` replaced by a 4-byte reference to a table of
    // the distinct strings, and the copy's heap measured beside the original's.
    println!(
        "\n## Projection: user_agent as a 4-byte reference to a dictionary table (heap only)\n"
    );
    println!(
        "| type | user_agent B (avg) | heap+TOAST B/ev | with a dictionary B/ev | saved | distinct user agents |"
    );
    println!("|---|---|---|---|---|---|");
    db.batch_execute(
        "CREATE TABLE bench_user_agents (id int4 GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_agent text UNIQUE)",
    )
    .await?;
    for (ti, t) in EventType::ALL.into_iter().enumerate() {
        let part = partition_name(day_of(0, ti));
        let r = db
            .query_one(
                &format!(
                    "SELECT count(*), avg(octet_length(user_agent))::float8, count(DISTINCT user_agent) FROM public.{part}"
                ),
                &[],
            )
            .await?;
        let (n, ua_bytes, distinct): (i64, Option<f64>, i64) = (r.get(0), r.get(1), r.get(2));
        let Some(ua_bytes) = ua_bytes.filter(|_| n > 0) else {
            continue;
        };
        db.batch_execute(&format!(
            "INSERT INTO bench_user_agents (user_agent) SELECT DISTINCT user_agent FROM public.{part} \
               WHERE user_agent IS NOT NULL ON CONFLICT DO NOTHING; \
             CREATE TABLE bench_dict_{ti} AS SELECT e.id, e.organization_id, e.message_id, e.event_type, \
               e.ip_address, u.id AS user_agent_id, e.link_url, e.metadata, e.created_at, e.provider, e.dedup_key \
               FROM public.{part} e LEFT JOIN bench_user_agents u ON u.user_agent = e.user_agent"
        ))
        .await?;
        db.batch_execute(&format!("VACUUM ANALYZE bench_dict_{ti}"))
            .await?;
        let r = db
            .query_one(
                &format!("SELECT pg_table_size('public.{part}'), pg_table_size('bench_dict_{ti}')"),
                &[],
            )
            .await?;
        let (heap, dict): (i64, i64) = (r.get(0), r.get(1));
        let (heap, dict) = (heap as f64 / n as f64, dict as f64 / n as f64);
        println!(
            "| {} | {ua_bytes:.0} | {heap:.0} | {dict:.0} | {:.0}% | {distinct} |",
            t.as_str(),
            100.0 * (1.0 - dict / heap)
        );
        db.batch_execute(&format!("DROP TABLE bench_dict_{ti}"))
            .await?;
    }
    db.batch_execute("DROP TABLE bench_user_agents").await?;

    let archive_dir =
        std::env::temp_dir().join(format!("reachly-bench-archive-{}", Uuid::new_v4().simple()));
    println!("\n## Archive (zstd CSV, db::archive), per type\n");
    println!("| type | CSV B/ev | archive B/ev | CSV/archive | table/archive |");
    println!("|---|---|---|---|---|");
    let mut client = reachly_ingest::db::connect(&url).await?;
    let (mut all_rows, mut all_file, mut all_csv, mut all_table) = (0u64, 0u64, 0u64, 0f64);
    for (ti, (t, table_per_event, _)) in totals.iter().enumerate() {
        let started = std::time::Instant::now();
        let Archived::Done(m) =
            archive_day(&mut client, day_of(0, ti), &archive_dir, CrashAfter(None)).await?
        else {
            anyhow::bail!("{} was not archived", t.as_str());
        };
        let secs = started.elapsed().as_secs_f64();
        let rows = m.rows.max(1) as f64;
        println!(
            "| {} | {:.0} | {:.1} | {:.1}x | {:.1}x |",
            t.as_str(),
            m.csv_bytes as f64 / rows,
            m.file_bytes as f64 / rows,
            m.csv_bytes as f64 / m.file_bytes as f64,
            table_per_event / (m.file_bytes as f64 / rows),
        );
        eprintln!("archived {} in {secs:.2} s", t.as_str());
        all_rows += m.rows;
        all_file += m.file_bytes;
        all_csv += m.csv_bytes;
        all_table += table_per_event * m.rows as f64;
    }
    println!(
        "| all | {:.0} | {:.1} | {:.1}x | {:.1}x |",
        all_csv as f64 / all_rows as f64,
        all_file as f64 / all_rows as f64,
        all_csv as f64 / all_file as f64,
        all_table / all_file as f64
    );
    let _ = std::fs::remove_dir_all(&archive_dir);

    let row = |table: &'static str| {
        let db = &db;
        async move {
            let r = db
                .query_one(
                    &format!(
                        "SELECT pg_table_size('public.{table}'), pg_indexes_size('public.{table}'), count(*) FROM public.{table}"
                    ),
                    &[],
                )
                .await?;
            let (h, i, n): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            anyhow::Ok((h as f64 / n as f64, i as f64 / n as f64))
        }
    };
    println!("\n## Other tables, bytes per row\n");
    println!("| table | heap B/row | indexes B/row |");
    println!("|---|---|---|");
    for table in ["campaign_messages", "contacts"] {
        let (h, i) = row(table).await?;
        println!("| {table} | {h:.0} | {i:.0} |");
    }
    Ok(())
}
