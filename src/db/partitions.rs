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
//! Row-level security: PostgreSQL applies the policies of the relation a query names, and
//! policies are not inherited by partitions, so a tenant role reading a partition directly
//! would see every tenant's rows unless the partition has RLS and a policy of its own. Each
//! partition gets both (`public.reachly_secure_tenant_relation`, migration V5) in the
//! transaction that creates it, before it is attached or visible to anyone; every round also
//! re-applies it to every partition (a no-op, without a lock, when already done), so a
//! partition made by hand is covered too.
//!
//! With an archive directory configured ([`maintain_configured`]), a partition past retention
//! is archived and verified before it is dropped (`archive.rs`), rows of the default
//! partition past retention are kept, and dead letters past their own retention expire.
//! Archiving runs after the round's transaction commits (an export is long, and it commits
//! the drop in a transaction of its own), under a session-level hold of the same advisory
//! key, so it needs a session-level connection (a direct one, or a session-mode pooler):
//! see docs/storage.md.
//!
//! Several instances may run this at once: a transaction-scoped advisory lock elects one; the others
//! skip the round. Every DDL statement runs under a short `lock_timeout`, so maintenance
//! never queues an exclusive lock in front of the writers for long; it retries next round.
//!
//! Every instance, whether it ran the round or skipped it, then reads the partition list
//! and reports its horizon (`reachly_partition_horizon_timestamp_seconds`, the end of the
//! last day partition): an alert fires when it comes within two days, long before events
//! start landing in the default partition.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{Days, NaiveDate, Utc};
use tokio_postgres::{Client, Transaction};

use crate::config::PartitionConfig;
use crate::metrics::{
    Metrics, PARTITION_HORIZON_TIMESTAMP_SECONDS, PARTITION_MAINTENANCE_TOTAL,
    PARTITIONS_ARCHIVED_TOTAL,
};

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
    /// Existing partitions that lacked row-level security or its policy and were given them.
    pub secured: u64,
    /// Partitions archived (and verified) before they were dropped.
    pub archived: Vec<String>,
    /// Partitions that could not be archived (they stay), with the reason; the round goes
    /// on with the next day instead of retrying a long export every minute.
    pub archive_failures: Vec<(String, String)>,
    /// Dead letters older than their retention deleted.
    pub expired_dead_letters: u64,
    /// Claimed keys of undated ESP events past their retention deleted.
    pub expired_event_keys: u64,
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

/// One maintenance round as of `today` (UTC): no archiving, dead letters kept.
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
    // One transaction per round with a transaction-scoped lock: through PgBouncer in
    // transaction mode a session lock would stay on a pooled server connection for ever.
    let mut tx = client.transaction().await?;
    let got: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&PARTITION_LOCK_KEY],
        )
        .await?
        .get(0);
    if !got {
        return Ok(MaintenanceReport {
            skipped: true,
            ..Default::default()
        });
    }
    let (mut report, to_archive) =
        maintain_locked(&mut tx, today, premake_days, retention_days, retention).await?;
    tx.commit().await?;
    if let Some(dir) = retention.archive_dir
        && !to_archive.is_empty()
    {
        archive_days(client, dir, &to_archive, &mut report).await?;
    }
    if retention.dead_letter_days > 0 {
        report.expired_dead_letters =
            super::retention::expire_dead_letters(client, retention.dead_letter_days).await?;
    }
    report.expired_event_keys = super::retention::expire_event_keys(client).await?;
    Ok(report)
}

/// Archives then drops each day, under a session-level hold of the maintenance key (the
/// `archive` command takes the same); another process archiving means this round skips it.
async fn archive_days(
    client: &mut Client,
    dir: &std::path::Path,
    days: &[NaiveDate],
    report: &mut MaintenanceReport,
) -> anyhow::Result<()> {
    let got: bool = client
        .query_typed_one(
            "SELECT pg_try_advisory_lock($1)",
            &[(&PARTITION_LOCK_KEY, tokio_postgres::types::Type::INT8)],
        )
        .await?
        .get(0);
    if !got {
        return Ok(());
    }
    for day in days {
        let name = partition_name(*day);
        match super::archive::archive_day(client, *day, dir, Default::default()).await {
            Ok(super::archive::Archived::Done(_)) => {
                report.archived.push(name.clone());
                report.dropped.push(name);
            }
            Ok(_) => {}
            Err(e) => report.archive_failures.push((name, format!("{e:#}"))),
        }
    }
    client
        .query_typed(
            "SELECT pg_advisory_unlock($1)",
            &[(&PARTITION_LOCK_KEY, tokio_postgres::types::Type::INT8)],
        )
        .await?;
    Ok(())
}

/// The round inside its transaction; returns the report and the days to archive (when an
/// archive directory is configured, days past retention are archived after the commit
/// instead of dropped here).
async fn maintain_locked(
    client: &mut Transaction<'_>,
    today: NaiveDate,
    premake_days: u32,
    retention_days: u32,
    retention: Retention<'_>,
) -> anyhow::Result<(MaintenanceReport, Vec<NaiveDate>)> {
    client
        .batch_execute("SET LOCAL lock_timeout = '3s'")
        .await?;
    let mut report = MaintenanceReport::default();
    let existing = partition_days(&*client).await?;

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

    let mut to_archive = Vec::new();
    for day in existing
        .iter()
        .filter(|d| d.succ_opt().is_some_and(|end| end <= cutoff))
    {
        if retention.archive_dir.is_some() {
            if !retention.defer_archiving {
                to_archive.push(*day);
            }
            continue;
        }
        let name = partition_name(*day);
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS public.{name}"))
            .await
            .with_context(|| format!("dropping {name}"))?;
        report.dropped.push(name);
    }
    report.secured = client
        .query_one(
            "SELECT count(*) FILTER (WHERE public.reachly_secure_tenant_relation(i.inhrelid::regclass)) \
             FROM pg_inherits i WHERE i.inhparent = 'public.email_events'::regclass",
            &[],
        )
        .await
        .context("enabling row-level security on the partitions")?
        .get::<_, i64>(0) as u64;
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
    Ok((report, to_archive))
}

/// The days that have a partition of `email_events`.
pub(crate) async fn partition_days(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<BTreeSet<NaiveDate>> {
    // An unnamed statement (query_typed): outside a transaction, through PgBouncer in
    // transaction mode, a named one could be prepared on one server connection and run or
    // closed on another.
    Ok(client
        .query_typed(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'public.email_events'::regclass",
            &[],
        )
        .await
        .context("listing partitions")?
        .iter()
        .filter_map(|r| parse_partition_day(r.get::<_, &str>(0)))
        .collect())
}

/// The partition horizon: the end (exclusive, 00:00 UTC) of the last day partition, as
/// unix seconds; `None` when there is no day partition.
pub async fn horizon(client: &Client) -> anyhow::Result<Option<i64>> {
    let last = partition_days(client).await?.last().copied();
    Ok(last
        .and_then(|d| d.succ_opt())
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp()))
}

async fn record_horizon(pool: &deadpool_postgres::Pool, metrics: &Metrics) {
    let read = async {
        let conn = pool.get().await.context("getting a connection")?;
        horizon(&conn).await
    };
    match read.await {
        Ok(Some(end)) => metrics.set_gauge(PARTITION_HORIZON_TIMESTAMP_SECONDS, &[], end as f64),
        Ok(None) => {}
        Err(e) => tracing::debug!(
            error = format!("{e:#}"),
            "cannot read the partition horizon"
        ),
    }
}

/// Makes one day's partition, moving that day's rows out of the default partition first.
pub(crate) async fn create_partition(
    client: &mut Transaction<'_>,
    day: NaiveDate,
) -> anyhow::Result<u64> {
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
    // Before anyone can see it: RLS and the tenant policy (not inherited from the parent).
    tx.execute(
        "SELECT public.reachly_secure_tenant_relation($1::text::regclass)",
        &[&format!("public.{name}")],
    )
    .await
    .with_context(|| format!("enabling row-level security on {name}"))?;
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
        record_horizon(&pool, &metrics).await;
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
                    || r.secured > 0
                    || r.expired_dead_letters > 0
                    || r.expired_event_keys > 0
                {
                    tracing::info!(created = ?r.created, dropped = ?r.dropped, archived = ?r.archived, moved_rows = r.moved_rows, secured = r.secured, expired_dead_letters = r.expired_dead_letters, expired_event_keys = r.expired_event_keys, "partition maintenance");
                }
                record_horizon(&pool, &metrics).await;
            }
            Err(e) => {
                metrics
                    .counter(PARTITION_MAINTENANCE_TOTAL, &[("outcome", "error")])
                    .increment(1);
                metrics.db_error("partition_maintenance");
                tracing::warn!(
                    error = super::describe_error(e.as_ref()),
                    sqlstate = super::sqlstate(e.as_ref()).unwrap_or_default(),
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
