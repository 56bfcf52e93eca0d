//! The writer side of the bus: `REACHLY_WRITERS` tasks share one durable pull consumer.
//!
//! One round: fetch up to `REACHLY_FLUSH_MAX_EVENTS` messages (waiting at most
//! `REACHLY_FLUSH_INTERVAL_MS` for them), decode them ([`envelope::decode`]), write their
//! records in batch transactions of at most `REACHLY_FLUSH_MAX_EVENTS` (the embedded
//! writers' path: row errors are isolated as dead letters), commit, then ack every message (an undecodable one is terminated after its
//! dead letter is committed). Only a commit leads to an ack, so a writer killed anywhere
//! before its acks leaves the messages to be redelivered after `REACHLY_BUS_ACK_WAIT_S`,
//! and the idempotent sink absorbs the second write.
//!
//! A transient database error keeps the batch: the writer retries with backoff, sending an
//! in-progress ack for every held message each round so none is redelivered meanwhile, and
//! fetches nothing new: the backlog stays in the stream. At shutdown a writer finishes (or,
//! past the drain deadline, abandons unacked) the batch it holds and stops fetching.

use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt as _;

use super::super::writer::{self, WriterContext};
use super::envelope::{self, Decoded};
use super::{BUS_CONSUMED_TOTAL, BUS_REDELIVERED_TOTAL, Bus};
use crate::event::Record;
use crate::metrics;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Shortest fetch wait (JetStream needs room for its own request timeout).
const MIN_FETCH_WAIT: Duration = Duration::from_millis(100);

pub(in crate::pipeline) async fn run_consumer(id: usize, ctx: WriterContext, bus: Bus) {
    tracing::debug!(writer = id, "bus writer started");
    let mut backoff = BACKOFF_START;
    let mut consumer = None;
    while !ctx.closing.is_cancelled() {
        ctx.ingest.beat();
        let c = match &consumer {
            Some(c) => c,
            None => match bus.consumer().await {
                Ok(c) => consumer.insert(c),
                Err(e) => {
                    tracing::debug!(writer = id, error = %e, "bus consumer not available yet");
                    pause(&ctx, &mut backoff).await;
                    continue;
                }
            },
        };
        let wait = ctx.flush_interval.max(MIN_FETCH_WAIT);
        let batch = match c
            .batch()
            .max_messages(ctx.flush_max_events)
            .expires(wait)
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(writer = id, error = %e, "bus fetch failed");
                consumer = None;
                pause(&ctx, &mut backoff).await;
                continue;
            }
        };
        // The server ends the batch by `wait`; the extra second bounds a lost end marker.
        let messages: Vec<Message> = tokio::time::timeout(
            wait + Duration::from_secs(1),
            batch
                .filter_map(|m| async move { m.ok() })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap_or_default();
        backoff = BACKOFF_START;
        if messages.is_empty() {
            continue;
        }
        if !store(&ctx, &bus, &messages).await {
            return; // drain deadline: the unacked messages will be redelivered
        }
    }
    tracing::debug!(writer = id, "bus writer stopped");
}

async fn pause(ctx: &WriterContext, backoff: &mut Duration) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = ctx.closing.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

/// Writes the records of `messages` until committed, then acks them. `false` if the drain
/// deadline passed first (nothing acked).
async fn store(ctx: &WriterContext, bus: &Bus, messages: &[Message]) -> bool {
    let progress_every = (bus.config().ack_wait / 3).max(Duration::from_millis(100));
    let started = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    let mut undecodable = vec![false; messages.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.info().is_ok_and(|info| info.delivered > 1) {
            ctx.metrics.counter(BUS_REDELIVERED_TOTAL, &[]).increment(1);
        }
        match envelope::decode(&m.payload) {
            Decoded::Records(rs) => records.extend(rs),
            Decoded::Undecodable(d) => {
                tracing::warn!(reason = %d.reason, "undecodable bus message; keeping it as a dead letter");
                undecodable[i] = true;
                records.push(Record::DeadLetter(d));
            }
        }
    }
    let refs: Vec<&Record> = records.iter().collect();
    // A fetch counts messages, and one message may hold a webhook's hundred events: the
    // records are written in transactions of at most REACHLY_FLUSH_MAX_EVENTS, and acked
    // after the last one commits (a crash in between re-writes the committed parts: no-ops).
    let parts: Vec<&[&Record]> = refs.chunks(ctx.flush_max_events.max(1)).collect();
    let last = parts.len().saturating_sub(1);
    for (n, part) in parts.into_iter().enumerate() {
        if !write_part(ctx, messages, part, progress_every, started).await {
            return false;
        }
        if n < last {
            progress(messages).await;
        }
    }
    if bus.config().fault.as_deref() == Some("abort-after-commit") {
        tracing::error!("fault injection: aborting after a commit, before its acks");
        std::process::abort();
    }
    for (m, bad) in messages.iter().zip(undecodable) {
        let kind = if bad { AckKind::Term } else { AckKind::Ack };
        if let Err(e) = m.ack_with(kind).await {
            // Committed but not acked: the redelivery is absorbed by the idempotent sink.
            tracing::warn!(error = %e, "bus ack failed");
        }
    }
    ctx.metrics
        .counter(BUS_CONSUMED_TOTAL, &[])
        .increment(messages.len() as u64);
    true
}

/// In-progress acks: the held messages stay ours for another ack wait.
async fn progress(messages: &[Message]) {
    for m in messages {
        let _ = m.ack_with(AckKind::Progress).await;
    }
}

/// Writes one part until it commits; `false` if the drain deadline passed first.
async fn write_part(
    ctx: &WriterContext,
    messages: &[Message],
    part: &[&Record],
    progress_every: Duration,
    started: Instant,
) -> bool {
    let mut backoff = BACKOFF_START;
    loop {
        let attempt = tokio::select! {
            r = writer::write_isolating(ctx, part) => Some(r),
            _ = ctx.deadline.cancelled() => None,
        };
        match attempt {
            Some(Ok(outcome)) => {
                writer::record_outcome(&ctx.metrics, &outcome);
                ctx.metrics
                    .histogram(metrics::FLUSH_DURATION_SECONDS, &[])
                    .record(started.elapsed().as_secs_f64());
                ctx.metrics
                    .histogram(metrics::FLUSH_BATCH_SIZE, &[])
                    .record(part.len() as f64);
                return true;
            }
            Some(Err(e)) => {
                ctx.metrics.db_error("write_batch");
                tracing::warn!(error = %e, events = part.len(), retry_in_ms = backoff.as_millis() as u64, "bus batch write failed; holding it");
            }
            None => return false,
        }
        // Back off, keeping the held messages ours (in-progress acks) while the database
        // is away, so no other writer gets them meanwhile.
        let until = Instant::now() + backoff;
        loop {
            progress(messages).await;
            let now = Instant::now();
            if now >= until {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep((until - now).min(progress_every)) => {}
                _ = ctx.deadline.cancelled() => return false,
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        ctx.ingest.beat();
    }
}
