//! The writers and the spool replayer.
//!
//! A writer takes the shared receiver, collects a batch (up to `REACHLY_FLUSH_MAX_EVENTS`
//! events, or whatever arrived within `REACHLY_FLUSH_INTERVAL_MS` of the first one), lets go
//! of the receiver for the next writer and writes the batch in one transaction
//! ([`store::write_batch`]).
//!
//! Failures:
//! - a *row* error (SQLSTATE classes 22, 23, 54: bad data, a constraint) splits the batch in
//!   halves until the offending record is alone; it is then kept as a dead letter, and every
//!   record beside it is written;
//! - anything else (connection lost, schema broken, deadlock, a statement or lock timeout)
//!   is *transient*: the batch's durable envelopes are spooled at once (their senders get a
//!   prompt, durable answer), the rest is retried with exponential backoff while new events
//!   pile up in memory and then in the spool. Retrying is safe: every insert is idempotent
//!   on the event id.
//!
//! Every batch transaction runs under `REACHLY_DB_STATEMENT_TIMEOUT_MS` and
//! `REACHLY_DB_LOCK_TIMEOUT_MS` ([`BatchLimits`]), so a lock someone holds on
//! `campaign_messages` shows up as counted, logged timeouts
//! (`reachly_db_timeouts_total{kind}`) and retries, not as writers stalled in silence.
//! Database errors are logged with their SQLSTATE and everything the server said
//! ([`crate::pgerror::describe_error`]).
//!
//! The replayer replays sealed spool segments through the same path whenever there is room,
//! a batch at a time (memory holds one batch of a segment, not the segment), deleting each
//! segment once all its events are committed. A torn record is counted and skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::spool::{SegmentReader, Spool};
use super::store::{self, BatchLimits, BatchOutcome};
use super::{Envelope, Ingest};
use crate::event::{DeadLetter, Record};
use crate::metrics::{self, Metrics};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A batch holding a durable envelope is written once nothing has arrived for this long
/// (at most `durable_linger` after that envelope).
const DURABLE_GAP: Duration = Duration::from_millis(2);
/// How often a writer collecting a batch takes what has arrived (see [`collect`]).
const COLLECT_TICK: Duration = Duration::from_millis(2);
/// Idle writers still beat this often (liveness).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(super) struct WriterContext {
    pub ingest: Ingest,
    /// Where durable envelopes of a failed batch go, and what the replayer replays.
    pub spool: Spool,
    pub pool: deadpool_postgres::Pool,
    /// Statement and lock timeouts of every batch transaction.
    pub limits: BatchLimits,
    /// Tenant and contact of recently seen messages, shared by the writers.
    pub message_cache: Arc<store::MessageCache>,
    pub metrics: Metrics,
    pub flush_max_events: usize,
    pub flush_interval: Duration,
    /// How long a batch holding a durable envelope waits for company.
    pub durable_linger: Duration,
    /// Shutdown began: close the channel, flush what is left without waiting.
    pub closing: CancellationToken,
    /// The drain deadline passed: stop retrying, spool what is left.
    pub deadline: CancellationToken,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    // The source is printed by `describe_error`, which walks the chain.
    #[error("database unavailable")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
}

/// Counts and logs a failed database write with everything the server said; a statement or
/// lock timeout is counted as such too.
fn report_write_error(ctx: &WriterContext, operation: &'static str, e: &WriteError, events: usize) {
    ctx.metrics.db_error(operation);
    let sqlstate = crate::pgerror::sqlstate(e);
    let kind = match sqlstate.as_deref() {
        Some("57014") => Some("statement_timeout"),
        Some("55P03") => Some("lock_timeout"),
        _ => None,
    };
    if let Some(kind) = kind {
        ctx.metrics
            .counter(metrics::DB_TIMEOUTS_TOTAL, &[("kind", kind)])
            .increment(1);
    }
    tracing::warn!(
        operation,
        error = crate::pgerror::describe_error(e),
        sqlstate = sqlstate.as_deref().unwrap_or(""),
        timeout = kind.unwrap_or(""),
        events,
        "database write failed; retrying"
    );
}

/// SQLSTATE classes caused by a row's content: splitting the batch isolates the row.
/// "violates partition constraint" (23514) is the exception: it is a race with a partition
/// being attached (see `db::partitions`), so the batch is retried, not split.
fn is_row_error(e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    let code = db.code().code();
    let row_class = code.starts_with("22") || code.starts_with("23") || code.starts_with("54");
    (row_class && !db.message().contains("partition constraint"))
        .then(|| format!("rejected_by_database: {code} {}", db.message()))
}

pub(super) async fn run_writer(
    id: usize,
    ctx: WriterContext,
    rx: Arc<Mutex<mpsc::Receiver<Envelope>>>,
) {
    tracing::debug!(writer = id, "writer started");
    while let Some(batch) = collect(id, &ctx, &rx).await {
        flush(&ctx, batch).await;
        ctx.ingest.hold(id, None);
        ctx.ingest.beat();
    }
    tracing::debug!(writer = id, "writer stopped");
}

/// The next batch; `None` once the channel is closed and empty.
async fn collect(
    id: usize,
    ctx: &WriterContext,
    rx: &Mutex<mpsc::Receiver<Envelope>>,
) -> Option<Vec<Envelope>> {
    let mut rx = rx.lock().await;
    let mut batch: Vec<Envelope> = Vec::new();
    // The first envelope: wait as long as it takes, beating meanwhile.
    loop {
        if ctx.closing.is_cancelled() {
            rx.close();
        }
        tokio::select! {
            n = rx.recv_many(&mut batch, ctx.flush_max_events) => {
                if n == 0 {
                    return None;
                }
                ctx.ingest.hold(id, batch.iter().map(|e| e.accepted_ms).min());
                break;
            }
            // Idle means nothing buffered anywhere: while another writer holds a batch, an
            // idle beat would hide that writer being stuck (liveness, readiness).
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => if ctx.ingest.buffered() == 0 { ctx.ingest.beat() },
            _ = ctx.closing.cancelled(), if !ctx.closing.is_cancelled() => {}
        }
    }
    // More, until the batch is full or the first envelope is `flush_interval` old. Once a
    // durable envelope (a webhook, an unsubscribe: someone waits for the commit) is in the
    // batch, sooner: `durable_linger` after it at the latest, or as soon as nothing new has
    // arrived for `DURABLE_GAP`. That is group commit that adapts to the traffic: a steady
    // stream (a campaign's webhooks) fills commits for up to the linger, so the database
    // pays its per-commit cost over more events; a lull (an ESP's last in-flight requests, a
    // closed-loop sender) is written at once, so it is not held for the whole linger.
    //
    // The collecting writer looks at the channel once per `COLLECT_TICK` instead of waiting
    // on it: a waiting receiver is woken by every envelope sent, which at tracking rates is
    // one task wake-up (often a thread wake-up: a futex call and a context switch on the
    // request path's core) per event. Polling the channel per tick costs at most
    // 1 / `COLLECT_TICK` wake-ups a second, whatever the rate.
    let flush_due = Instant::now() + ctx.flush_interval;
    let mut durable_due: Option<Instant> = batch
        .iter()
        .any(|e| e.ack.is_some())
        .then(|| Instant::now() + ctx.durable_linger);
    let mut last_arrival = Instant::now();
    let mut count: usize = batch.iter().map(Envelope::len).sum();
    let due = |durable_due: Option<Instant>, last_arrival: Instant| match durable_due {
        Some(d) => flush_due.min(d).min(last_arrival + DURABLE_GAP),
        None => flush_due,
    };
    while count < ctx.flush_max_events {
        let before = batch.len();
        let closing = ctx.closing.is_cancelled();
        if closing {
            // Draining: take what is there, do not wait for more.
            rx.close();
        } else {
            let now = Instant::now();
            let due = due(durable_due, last_arrival);
            if now >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.min(now + COLLECT_TICK).into()) => {}
                _ = ctx.closing.cancelled() => {}
            }
        }
        // What arrived meanwhile, up to the batch's room.
        let mut ended = false;
        while count < ctx.flush_max_events {
            match rx.try_recv() {
                Ok(env) => {
                    count += env.len();
                    batch.push(env);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        if batch.len() > before {
            last_arrival = Instant::now();
            if durable_due.is_none() && batch[before..].iter().any(|e| e.ack.is_some()) {
                durable_due = Some(last_arrival + ctx.durable_linger);
            }
        } else if closing {
            break;
        }
        if ended {
            break;
        }
    }
    Some(batch)
}

/// Writes one batch, retrying transient failures; never returns with a record unaccounted.
async fn flush(ctx: &WriterContext, mut pending: Vec<Envelope>) {
    let mut backoff = BACKOFF_START;
    let started = Instant::now();
    loop {
        let records: Vec<&Record> = pending.iter().flat_map(|e| e.records.iter()).collect();
        let n = records.len();
        let attempt = tokio::select! {
            r = write_isolating(ctx, &records) => Some(r),
            _ = ctx.deadline.cancelled() => None,
        };
        match attempt {
            Some(Ok(outcome)) => {
                ctx.ingest.set_db_healthy(true);
                ctx.ingest.flushed();
                record_outcome(&ctx.metrics, &outcome);
                ctx.metrics
                    .histogram(metrics::FLUSH_DURATION_SECONDS, &[])
                    .record(started.elapsed().as_secs_f64());
                ctx.metrics
                    .histogram(metrics::FLUSH_BATCH_SIZE, &[])
                    .record(n as f64);
                ctx.ingest
                    .release(n, pending.iter().map(|e| e.memory).sum());
                for env in pending {
                    if let Some(ack) = env.ack {
                        let _ = ack.send(Ok(()));
                    }
                }
                return;
            }
            Some(Err(e)) => {
                ctx.ingest.set_db_healthy(false);
                report_write_error(ctx, "write_batch", &e, n);
                // Durable envelopes go to disk now: their senders are waiting.
                let (durable, rest): (Vec<Envelope>, Vec<Envelope>) =
                    pending.into_iter().partition(|e| e.ack.is_some());
                for env in durable {
                    spool_envelope(ctx, env);
                }
                pending = rest;
            }
            None => {}
        }
        if pending.is_empty() {
            return;
        }
        if ctx.deadline.is_cancelled() {
            for env in pending {
                spool_envelope(ctx, env);
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.deadline.cancelled() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        ctx.ingest.beat();
    }
}

fn spool_envelope(ctx: &WriterContext, env: Envelope) {
    ctx.ingest.release_envelope(&env);
    ctx.spool.append(env);
}

/// Writes `records`; a row the database rejects is isolated by splitting and kept as a dead
/// letter, so one bad row never fails the rows beside it.
pub(super) async fn write_isolating(
    ctx: &WriterContext,
    records: &[&Record],
) -> Result<BatchOutcome, WriteError> {
    let mut conn = ctx.pool.get().await?;
    let mut outcome = BatchOutcome::default();
    let mut stack: Vec<&[&Record]> = vec![records];
    while let Some(part) = stack.pop() {
        match store::write_batch_limited(&mut conn, part, &ctx.limits, Some(&ctx.message_cache))
            .await
        {
            Ok(o) => outcome.absorb(o),
            Err(e) => {
                let Some(reason) = is_row_error(&e) else {
                    return Err(e.into());
                };
                if part.len() > 1 {
                    let mid = part.len() / 2;
                    stack.push(&part[mid..]);
                    stack.push(&part[..mid]);
                    continue;
                }
                tracing::warn!(
                    reason,
                    "a record was rejected by the database; keeping it as a dead letter"
                );
                let dead = match part[0] {
                    Record::Event(ev) => DeadLetter::from_event(ev, &reason),
                    Record::DeadLetter(d) => DeadLetter {
                        reason: format!("{}; {reason}", d.reason),
                        ..d.clone()
                    },
                };
                match store::write_batch_limited(
                    &mut conn,
                    &[&Record::DeadLetter(dead)],
                    &ctx.limits,
                    Some(&ctx.message_cache),
                )
                .await
                {
                    Ok(o) => outcome.absorb(o),
                    Err(e2) if is_row_error(&e2).is_some() => {
                        tracing::error!(
                            error = crate::pgerror::describe_error(&e2),
                            "a rejected record could not be dead-lettered either; dropping it"
                        );
                        ctx.metrics.dropped("rejected", 1);
                    }
                    Err(e2) => return Err(e2.into()),
                }
            }
        }
    }
    Ok(outcome)
}

pub(super) fn record_outcome(m: &Metrics, o: &BatchOutcome) {
    for (t, n) in &o.written {
        m.counter(metrics::EVENTS_WRITTEN_TOTAL, &[("type", t.as_str())])
            .increment(*n);
    }
    if o.duplicates > 0 {
        m.counter(metrics::EVENTS_DUPLICATE_TOTAL, &[])
            .increment(o.duplicates);
    }
    for (reason, n) in &o.dead_lettered {
        let label = reason.split(':').next().unwrap_or("other");
        m.counter(metrics::EVENTS_DEAD_LETTERED_TOTAL, &[("reason", label)])
            .increment(*n);
    }
}

/// Replays the spool whenever it is non-empty and memory has room, until shutdown.
pub(super) async fn run_replayer(ctx: WriterContext) {
    let mut wait = Duration::ZERO; // replay a spool left by an earlier run at once
    loop {
        tokio::select! {
            _ = ctx.closing.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(1);
        if ctx.spool.is_empty() || ctx.ingest.above_high_water() {
            continue;
        }
        if let Err(e) = replay_once(&ctx).await {
            ctx.ingest.set_db_healthy(false);
            report_write_error(&ctx, "spool_replay", &e, 0);
            wait = BACKOFF_MAX;
        }
    }
}

/// Seals the active spool segment and lists every sealed one, oldest first: what a replay
/// (to the database here, to the bus in `bus::edge`) works through.
pub(super) async fn sealed_segments(ctx: &WriterContext) -> Vec<PathBuf> {
    let spool = ctx.spool.clone();
    tokio::task::spawn_blocking(move || spool.seal())
        .await
        .unwrap_or_default()
}

/// Reads sealed segments off the runtime's threads, a batch at a time, logging and counting
/// a torn tail once the segment is read through.
pub(super) struct SealedSegment {
    path: PathBuf,
    reader: Option<SegmentReader>,
}

impl SealedSegment {
    /// `None` when it cannot be opened (it is left for an operator).
    pub(super) async fn open(seg: &Path) -> Option<SealedSegment> {
        let path = seg.to_path_buf();
        match tokio::task::spawn_blocking(move || SegmentReader::open(&path)).await {
            Ok(Ok(reader)) => Some(SealedSegment {
                path: seg.to_path_buf(),
                reader: Some(reader),
            }),
            Ok(Err(e)) => {
                tracing::error!(error = %e, segment = %seg.display(), "cannot read spool segment; leaving it for an operator");
                None
            }
            Err(_) => None,
        }
    }

    /// The next envelopes, holding at least `events` records unless the segment ends:
    /// `Some(empty)` at its end, `None` when it cannot be read on (it is left for an
    /// operator).
    pub(super) async fn next_batch(
        &mut self,
        ctx: &WriterContext,
        events: usize,
    ) -> Option<Vec<Vec<Record>>> {
        let mut reader = self.reader.take()?;
        let (reader, batch) = tokio::task::spawn_blocking(move || {
            let batch = reader.next_batch(events);
            (reader, batch)
        })
        .await
        .ok()?;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, segment = %self.path.display(), "cannot read spool segment; leaving it for an operator");
                return None;
            }
        };
        if batch.is_empty() && reader.torn_records > 0 {
            tracing::warn!(segment = %self.path.display(), torn = reader.torn_records, "spool segment ends in a torn record; skipping it");
            ctx.metrics
                .counter(metrics::SPOOL_TORN_RECORDS_TOTAL, &[])
                .increment(reader.torn_records);
        }
        self.reader = Some(reader);
        Some(batch)
    }
}

/// Replays every sealed segment once (sealing the active one first), deleting each segment
/// whose records are all committed; stops at the first transient failure, leaving that
/// segment and the later ones for the next call.
async fn replay_once(ctx: &WriterContext) -> Result<(), WriteError> {
    for seg in sealed_segments(ctx).await {
        if ctx.closing.is_cancelled() {
            return Ok(());
        }
        let Some(mut segment) = SealedSegment::open(&seg).await else {
            continue;
        };
        let mut events = 0;
        let read_through = loop {
            let Some(batch) = segment.next_batch(ctx, ctx.flush_max_events).await else {
                break false;
            };
            if batch.is_empty() {
                break true;
            }
            let records: Vec<&Record> = batch.iter().flatten().collect();
            for chunk in records.chunks(ctx.flush_max_events) {
                let outcome = write_isolating(ctx, chunk).await?;
                ctx.ingest.set_db_healthy(true);
                ctx.ingest.flushed();
                record_outcome(&ctx.metrics, &outcome);
                ctx.metrics
                    .counter(metrics::EVENTS_REPLAYED_TOTAL, &[])
                    .increment(chunk.len() as u64);
            }
            events += records.len();
        };
        if !read_through {
            continue;
        }
        if let Err(e) = ctx.spool.remove_segment(&seg, &ctx.metrics) {
            tracing::error!(error = %e, segment = %seg.display(), "cannot delete a replayed spool segment");
        }
        tracing::info!(segment = %seg.display(), events, "spool segment replayed");
    }
    Ok(())
}
