//! Table sizes, watched: what fills a small database's disk. [`measure`] reads, from the
//! catalog only (no table scan, a few milliseconds), the bytes of `email_events` grouped by
//! partition age, of `campaign_messages`, `contacts` and `webhook_dead_letters` (each with
//! its indexes and TOAST), the oldest partition's age and the database's size. The service
//! samples it every minute into gauges ([`run_periodically`]); `reachly-ingest status`
//! prints the same ([`Sizes::render`]).
//!
//! Partitions are grouped in age buckets, not exported one by one: a series per partition
//! would add a new series every day and lose it 400 days later. The buckets say where the
//! bytes are (this week's hot data vs history the archive could take); the disk-full alert
//! (`deploy/prometheus/storage-rules.yml`) extrapolates `reachly_database_bytes`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{NaiveDate, Utc};
use tokio_postgres::Client;

use crate::metrics::{
    DATABASE_BYTES, DATABASE_DISK_BYTES, EMAIL_EVENTS_BYTES, Metrics, OLDEST_PARTITION_AGE_SECONDS,
    TABLE_BYTES,
};

/// Age buckets of partitions: (label, highest age in days). Premade days (negative age)
/// count as the newest bucket.
pub const AGE_BUCKETS: [(&str, i64); 5] = [
    ("0-7d", 7),
    ("8-30d", 30),
    ("31-90d", 90),
    ("91-365d", 365),
    ("366d+", i64::MAX),
];
/// The tables besides `email_events` whose bytes are watched.
pub const TABLES: [&str; 3] = ["campaign_messages", "contacts", "webhook_dead_letters"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    pub label: &'static str,
    pub bytes: i64,
    pub partitions: usize,
    /// Estimated rows (`reltuples`; -1 for a never-analysed table counts as 0).
    pub rows: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sizes {
    pub today: Option<NaiveDate>,
    /// One per [`AGE_BUCKETS`] entry, in order, then `default` (the default partition).
    pub events: Vec<Bucket>,
    /// (table, bytes, estimated rows), in [`TABLES`] order.
    pub tables: Vec<(&'static str, i64, i64)>,
    pub oldest_partition: Option<NaiveDate>,
    pub database_bytes: i64,
}

impl Sizes {
    pub fn events_bytes(&self) -> i64 {
        self.events.iter().map(|b| b.bytes).sum()
    }

    /// Days between the oldest day partition and today.
    pub fn oldest_partition_age_days(&self) -> Option<i64> {
        Some((self.today? - self.oldest_partition?).num_days())
    }

    /// Sets the storage gauges.
    pub fn record(&self, metrics: &Metrics) {
        for b in &self.events {
            metrics
                .gauge(EMAIL_EVENTS_BYTES, &[("age", b.label)])
                .set(b.bytes as f64);
        }
        for (table, bytes, _) in &self.tables {
            metrics
                .gauge(TABLE_BYTES, &[("table", table)])
                .set(*bytes as f64);
        }
        metrics
            .gauge(OLDEST_PARTITION_AGE_SECONDS, &[])
            .set(self.oldest_partition_age_days().unwrap_or(0) as f64 * 86_400.0);
        metrics
            .gauge(DATABASE_BYTES, &[])
            .set(self.database_bytes as f64);
    }

    /// The `status` text: sizes at a glance.
    pub fn render(&self, disk_bytes: Option<u64>) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "database                {:>12}",
            human(self.database_bytes)
        );
        match disk_bytes {
            Some(d) if d > 0 => {
                let _ = writeln!(
                    out,
                    "  of {} ({:.1}% used)",
                    human(d as i64),
                    100.0 * self.database_bytes as f64 / d as f64
                );
            }
            _ => out.push('\n'),
        }
        let parts: usize = self.events.iter().map(|b| b.partitions).sum();
        let rows: i64 = self.events.iter().map(|b| b.rows).sum();
        let _ = writeln!(
            out,
            "email_events            {:>12}  {parts} partitions, ~{rows} rows",
            human(self.events_bytes())
        );
        for b in &self.events {
            let _ = writeln!(
                out,
                "  {:<21} {:>12}  {} partitions, ~{} rows",
                b.label,
                human(b.bytes),
                b.partitions,
                b.rows
            );
        }
        match (self.oldest_partition, self.oldest_partition_age_days()) {
            (Some(d), Some(age)) => {
                let _ = writeln!(out, "oldest partition        {d} ({age} days old)");
            }
            _ => {
                let _ = writeln!(out, "oldest partition        (none)");
            }
        }
        for (table, bytes, rows) in &self.tables {
            let _ = writeln!(out, "{table:<23} {:>12}  ~{rows} rows", human(*bytes));
        }
        out
    }
}

/// Bytes in a human unit (KiB, MiB, GiB).
pub fn human(bytes: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Reads the sizes from the catalog as of `today`.
///
/// Unnamed statements only (`query_typed`): the service runs this every minute on a pooled
/// connection outside any transaction, where a named statement could be prepared on one
/// PgBouncer server connection and executed or closed on another.
pub async fn measure(client: &Client, today: NaiveDate) -> anyhow::Result<Sizes> {
    let rows = client
        .query_typed(
            "SELECT c.relname::text, pg_total_relation_size(c.oid), greatest(c.reltuples, 0)::int8 \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'public.email_events'::regclass",
            &[],
        )
        .await
        .context("reading partition sizes")?;
    let mut events: Vec<Bucket> = AGE_BUCKETS
        .iter()
        .chain(std::iter::once(&("default", 0)))
        .map(|(label, _)| Bucket {
            label,
            ..Bucket::default()
        })
        .collect();
    let mut oldest: Option<NaiveDate> = None;
    for r in &rows {
        let (name, bytes, tuples): (&str, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let bucket = match super::partitions::parse_partition_day(name) {
            Some(day) => {
                oldest = Some(oldest.map_or(day, |o| o.min(day)));
                let age = (today - day).num_days();
                AGE_BUCKETS
                    .iter()
                    .position(|(_, max)| age <= *max)
                    .unwrap_or(AGE_BUCKETS.len() - 1)
            }
            None => AGE_BUCKETS.len(),
        };
        let b = &mut events[bucket];
        b.bytes += bytes;
        b.rows += tuples;
        b.partitions += 1;
    }
    let mut tables = Vec::new();
    for table in TABLES {
        let r = client
            .query_typed_one(
                "SELECT pg_total_relation_size(c.oid), greatest(c.reltuples, 0)::int8 \
                 FROM pg_class c WHERE c.oid = to_regclass('public.' || $1)",
                &[(&table, tokio_postgres::types::Type::TEXT)],
            )
            .await
            .with_context(|| format!("reading the size of {table}"))?;
        tables.push((table, r.get(0), r.get(1)));
    }
    let database_bytes: i64 = client
        .query_typed_one("SELECT pg_database_size(current_database())", &[])
        .await
        .context("reading the database size")?
        .get(0);
    Ok(Sizes {
        today: Some(today),
        events,
        tables,
        oldest_partition: oldest,
        database_bytes,
    })
}

/// Samples the sizes into gauges every `interval` until `stop` fires; sets the disk-size
/// gauge once when it is configured.
pub async fn run_periodically(
    pool: deadpool_postgres::Pool,
    metrics: Metrics,
    disk_bytes: Option<u64>,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    if let Some(d) = disk_bytes {
        metrics.gauge(DATABASE_DISK_BYTES, &[]).set(d as f64);
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sampled = async {
            let conn = pool.get().await.context("getting a connection")?;
            measure(&conn, Utc::now().date_naive()).await
        }
        .await;
        match sampled {
            Ok(s) => s.record(&metrics),
            Err(e) => {
                metrics.db_error("table_sizes");
                tracing::debug!(error = format!("{e:#}"), "sampling table sizes failed");
            }
        }
    }
}

/// Bytes and regular files under `dir` (recursively); (0, 0) when it does not exist.
pub fn dir_usage(dir: &std::path::Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    bytes += m.len();
                    files += 1;
                }
                Err(_) => {}
            }
        }
    }
    (bytes, files)
}

/// `reachly-ingest status`: the sizes, the spool and the archive directory.
pub async fn status_command(
    client: &Client,
    args: &crate::config::StatusArgs,
) -> anyhow::Result<String> {
    let sizes = measure(client, Utc::now().date_naive()).await?;
    let mut out = sizes.render(args.database_disk_bytes);
    let (spool, _) = dir_usage(&args.spool_dir);
    let _ = writeln!(
        out,
        "spool                   {:>12}  {}",
        human(spool as i64),
        args.spool_dir.display()
    );
    if let Some(dir) = &args.archive_dir {
        let days = std::fs::read_dir(dir)
            .map(|it| {
                it.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest.json"))
                    .count()
            })
            .unwrap_or(0);
        let (bytes, _) = dir_usage(dir);
        let _ = writeln!(
            out,
            "archive                 {:>12}  {days} days in {}",
            human(bytes as i64),
            dir.display()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(32 << 30), "32.0 GiB");
    }
}
