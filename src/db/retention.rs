//! Retention of the two unpartitioned side tables, by partition maintenance after its
//! round. Event keys: `webhook_event_keys` rows (claimed keys of ESP events that carry no
//! time, migration V10) older than [`EVENT_KEY_RETENTION_DAYS`] are deleted every round; no
//! ESP re-delivers that late, and without this the table grows for ever.
//! Dead letters: `webhook_dead_letters` rows older than
//! `REACHLY_DEAD_LETTER_RETENTION_DAYS` are deleted by partition maintenance. The table is
//! not partitioned (it is small when healthy, and a flood of bad webhooks is what fills it),
//! so the delete goes in batches of [`BATCH`] rows by `received_at` (indexed), each its own
//! statement: no long lock, no huge transaction, and a round can stop between batches.

use anyhow::Context as _;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// Rows deleted per statement.
pub const BATCH: i64 = 5_000;

/// Deletes dead letters received more than `days` days ago; returns how many.
pub async fn expire_dead_letters(client: &Client, days: u32) -> anyhow::Result<u64> {
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    let mut total = 0;
    loop {
        // Unnamed statements (query_typed): outside a transaction, through PgBouncer in
        // transaction mode, a named statement may be prepared on one server connection and
        // run on another.
        let n = client
            .query_typed_one(
                "WITH gone AS (DELETE FROM public.webhook_dead_letters WHERE id IN ( \
                   SELECT id FROM public.webhook_dead_letters \
                   WHERE received_at < now() - make_interval(days => $1) LIMIT $2) RETURNING 1) \
                 SELECT count(*) FROM gone",
                &[(&days, Type::INT4), (&BATCH, Type::INT8)],
            )
            .await
            .context("expiring dead letters")?
            .get::<_, i64>(0) as u64;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Days a claimed event key is kept: far past every ESP's retry schedule (the longest,
/// Resend's, is about 28 hours), so any re-delivery is still recognised.
pub const EVENT_KEY_RETENTION_DAYS: i32 = 7;

/// Deletes event keys first seen more than [`EVENT_KEY_RETENTION_DAYS`] ago, in batches of
/// [`BATCH`]; returns how many.
pub async fn expire_event_keys(client: &Client) -> anyhow::Result<u64> {
    let mut total = 0;
    loop {
        let n = client
            .query_typed_one(
                "WITH gone AS (DELETE FROM public.webhook_event_keys WHERE dedup_key IN ( \
                   SELECT dedup_key FROM public.webhook_event_keys \
                   WHERE first_seen_at < now() - make_interval(days => $1) LIMIT $2) RETURNING 1) \
                 SELECT count(*) FROM gone",
                &[
                    (&EVENT_KEY_RETENTION_DAYS, Type::INT4),
                    (&BATCH, Type::INT8),
                ],
            )
            .await
            .context("expiring webhook event keys")?
            .get::<_, i64>(0) as u64;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}
