//! Partition maintenance of `email_events`: daily range partitions named
//! `email_events_pYYYYMMDD` (UTC days) are made `premake_days` ahead, partitions wholly older
//! than `retention_days` are dropped, and the default partition keeps catching the rest.
//! When a day's partition is made and the default partition already holds rows of that day,
//! they are moved into it in the same transaction.
//!
//! Why the first round runs before the writers start: `ATTACH PARTITION` races with
//! statements already planned against the old partition list (an insert routed to the
//! default partition fails with 23514; a reader can momentarily miss rows being moved).
//! With the day's partitions made before the first event, and days made a week ahead, only
//! far-dated events ever meet that window, and the writer's split-and-retry absorbs it.
//!
//! With an archive directory configured ([`maintain_configured`]), a partition past retention
//! is archived and verified before it is dropped (`archive.rs`), rows of the default
//! partition past retention are kept, and dead letters past their own retention expire.
//!
//! Several instances may run this at once: a session advisory lock elects one; the others
//! skip the round. Every DDL statement runs under a short `lock_timeout`, so maintenance
//! never queues an exclusive lock in front of the writers for long; it retries next round.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{Days, NaiveDate, Utc};
use tokio_postgres::Client;

use crate::config::PartitionConfig;
use crate::metrics::{Metrics, PARTITION_MAINTENANCE_TOTAL, PARTITIONS_ARCHIVED_TOTAL};

/// Advisory lock key of partition maintenance.
pub(crate) const PARTITION_LOCK_KEY: i64 = 0x7265_6163_686c_7902;
const PREFIX: &str = "email_events_p";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Another instance held the lock; nothing was done.
    pub skipped: bool,
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    /// Rows moved out of the default partition into a new day's partition.
    pub moved_rows: u64,
    /// Rows older than the retention deleted from the default partition.
    pub expired_default_rows: u64,
    /// Partitions archived (and verified) before they were dropped.
    pub archived: Vec<String>,
    /// Partitions that could not be archived (they stay), with the reason; the round goes
    /// on with the next day instead of retrying a long export every minute.
    pub archive_failures: Vec<(String, String)>,
    /// Dead letters older than their retention deleted.
    pub expired_dead_letters: u64,
}

/// What a round does past the premade days; [`maintain`] archives nothing and keeps dead
/// letters, [`maintain_configured`] follows the configuration.
#[derive(Debug, Clone, Copy, Default)]
struct Retention<'a> {
    archive_dir: Option<&'a std::path::Path>,
    dead_letter_days: u32,
    /// Leave partitions past retention to a later round when they are to be archived (the
    /// round at start must not hold the service back for minutes of exports).
    defer_archiving: bool,
}

/// One maintenance round as configured: archive before drop when `cfg.archive_dir` is set,
/// dead letters expired after `cfg.dead_letter_retention_days`.
pub async fn maintain_configured(
    client: &mut Client,
    today: NaiveDate,
    cfg: &PartitionConfig,
) -> anyhow::Result<MaintenanceReport> {
    let retention = Retention {
        archive_dir: cfg.archive_dir.as_deref(),
        dead_letter_days: cfg.dead_letter_retention_days,
        defer_archiving: false,
    };
    maintain_with(
        client,
        today,
        cfg.premake_days,
        cfg.retention_days,
        retention,
    )
    .await
}

/// The round at start, before the writers: as [`maintain_configured`], except that
/// partitions to archive wait for the first background round.
pub async fn maintain_at_start(
    client: &mut Client,
    today: NaiveDate,
    cfg: &PartitionConfig,
) -> anyhow::Result<MaintenanceReport> {
    let retention = Retention {
        archive_dir: cfg.archive_dir.as_deref(),
        dead_letter_days: cfg.dead_letter_retention_days,
        defer_archiving: true,
    };
    maintain_with(
        client,
        today,
        cfg.premake_days,
        cfg.retention_days,
        retention,
    )
    .await
}

pub fn partition_name(day: NaiveDate) -> String {
    format!("{PREFIX}{}", day.format("%Y%m%d"))
}

pub(crate) fn parse_partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix(PREFIX)?, "%Y%m%d").ok()
}

/// One maintenance round as of `today` (UTC).
pub async fn maintain(
    client: &mut Client,
    today: NaiveDate,
    premake_days: u32,
    retention_days: u32,
) -> anyhow::Result<MaintenanceReport> {
    maintain_with(
        client,
        today,
        premake_days,
        retention_days,
        Retention::default(),
    )
    .await
}

async fn maintain_with(
    client: &mut Client,
    today: NaiveDate,
    premake_days: u32,
    retention_days: u32,
    retention: Retention<'_>,
) -> anyhow::Result<MaintenanceReport> {
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&PARTITION_LOCK_KEY])
        .await?
        .get(0);
    if !got {
        return Ok(MaintenanceReport {
            skipped: true,
            ..Default::default()
        });
    }
    let result = maintain_locked(client, today, premake_days, retention_days, retention).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&PARTITION_LOCK_KEY])
        .await;
    result
}

async fn maintain_locked(
    client: &mut Client,
    today: NaiveDate,
    premake_days: u32,
    retention_days: u32,
    retention: Retention<'_>,
) -> anyhow::Result<MaintenanceReport> {
    client.batch_execute("SET lock_timeout = '3s'").await?;
    let mut report = MaintenanceReport::default();
    let existing: BTreeSet<NaiveDate> = client
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'public.email_events'::regclass",
            &[],
        )
        .await
        .context("listing partitions")?
        .iter()
        .filter_map(|r| parse_partition_day(r.get::<_, &str>(0)))
        .collect();

    // Yesterday too: late ESP events (deferred retries, slow webhooks) are common.
    let first = today.checked_sub_days(Days::new(1)).unwrap_or(today);
    let last = today
        .checked_add_days(Days::new(premake_days.into()))
        .unwrap_or(today);
    let cutoff = today
        .checked_sub_days(Days::new(retention_days.into()))
        .unwrap_or(NaiveDate::MIN);
    let mut day = first.max(cutoff);
    while day <= last {
        if !existing.contains(&day) {
            let moved = create_partition(client, day).await?;
            report.moved_rows += moved;
            report.created.push(partition_name(day));
        }
        day = match day.succ_opt() {
            Some(d) => d,
            None => break,
        };
    }

    for day in existing
        .iter()
        .filter(|d| d.succ_opt().is_some_and(|end| end <= cutoff))
    {
        let name = partition_name(*day);
        if let Some(dir) = retention.archive_dir {
            if retention.defer_archiving {
                continue;
            }
            match super::archive::archive_day(client, *day, dir, Default::default()).await {
                Ok(super::archive::Archived::Done(_)) => {
                    report.archived.push(name.clone());
                    report.dropped.push(name);
                }
                Ok(_) => {}
                Err(e) => report.archive_failures.push((name, format!("{e:#}"))),
            }
            continue;
        }
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS public.{name}"))
            .await
            .with_context(|| format!("dropping {name}"))?;
        report.dropped.push(name);
    }
    // With an archive, late rows of archived days stay in the default partition (rare; a
    // day's archive is never rewritten behind the operator's back).
    if retention.archive_dir.is_none() {
        report.expired_default_rows = client
            .execute(
                "DELETE FROM public.email_events_default WHERE created_at < $1::date::timestamp AT TIME ZONE 'UTC'",
                &[&cutoff],
            )
            .await
            .context("expiring rows of the default partition")?;
    }
    if retention.dead_letter_days > 0 {
        report.expired_dead_letters =
            super::retention::expire_dead_letters(client, retention.dead_letter_days).await?;
    }
    client.batch_execute("RESET lock_timeout").await?;
    Ok(report)
}

/// Makes one day's partition, moving that day's rows out of the default partition first.
pub(crate) async fn create_partition(client: &mut Client, day: NaiveDate) -> anyhow::Result<u64> {
    let name = partition_name(day);
    let next = day.succ_opt().context("date overflow")?;
    let (from, to) = (
        day.format("%Y-%m-%d 00:00:00+00"),
        next.format("%Y-%m-%d 00:00:00+00"),
    );
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "CREATE TABLE public.{name} (LIKE public.email_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    ))
    .await
    .with_context(|| format!("creating {name}"))?;
    let moved = tx
        .execute(
            &format!(
                "WITH moved AS (DELETE FROM public.email_events_default \
                 WHERE created_at >= '{from}' AND created_at < '{to}' RETURNING *) \
                 INSERT INTO public.{name} SELECT * FROM moved"
            ),
            &[],
        )
        .await
        .with_context(|| format!("moving default-partition rows into {name}"))?;
    tx.batch_execute(&format!(
        "ALTER TABLE public.email_events ATTACH PARTITION public.{name} FOR VALUES FROM ('{from}') TO ('{to}')"
    ))
    .await
    .with_context(|| format!("attaching {name}"))?;
    tx.commit().await?;
    Ok(moved)
}

/// Runs maintenance every `cfg.interval` until `stop` fires; at once too unless
/// `already_done` (the app runs the first round itself, before any event is written).
pub async fn run_periodically(
    pool: deadpool_postgres::Pool,
    cfg: PartitionConfig,
    metrics: Metrics,
    stop: tokio_util::sync::CancellationToken,
    already_done: bool,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if already_done {
        tick.tick().await;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let outcome = async {
            let mut conn = pool.get().await.context("getting a connection")?;
            maintain_configured(&mut conn, Utc::now().date_naive(), &cfg).await
        }
        .await;
        match outcome {
            Ok(r) => {
                metrics
                    .counter(
                        PARTITION_MAINTENANCE_TOTAL,
                        &[("outcome", if r.skipped { "skipped" } else { "ok" })],
                    )
                    .increment(1);
                for (outcome, n) in [
                    ("ok", r.archived.len()),
                    ("error", r.archive_failures.len()),
                ] {
                    if n > 0 {
                        metrics
                            .counter(PARTITIONS_ARCHIVED_TOTAL, &[("outcome", outcome)])
                            .increment(n as u64);
                    }
                }
                for (partition, error) in &r.archive_failures {
                    tracing::warn!(partition, error, "archiving failed; the partition stays");
                }
                if !r.created.is_empty()
                    || !r.dropped.is_empty()
                    || r.moved_rows > 0
                    || r.expired_dead_letters > 0
                {
                    tracing::info!(created = ?r.created, dropped = ?r.dropped, archived = ?r.archived, moved_rows = r.moved_rows, expired_dead_letters = r.expired_dead_letters, "partition maintenance");
                }
            }
            Err(e) => {
                metrics
                    .counter(PARTITION_MAINTENANCE_TOTAL, &[("outcome", "error")])
                    .increment(1);
                metrics.db_error("partition_maintenance");
                tracing::warn!(
                    error = format!("{e:#}"),
                    "partition maintenance failed; retrying in a minute"
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60).min(cfg.interval)) => {}
                }
                tick.reset_immediately();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        let d = NaiveDate::from_ymd_opt(2026, 11, 25).unwrap();
        assert_eq!(partition_name(d), "email_events_p20261125");
        assert_eq!(parse_partition_day("email_events_p20261125"), Some(d));
        assert_eq!(parse_partition_day("email_events_default"), None);
    }
}
