//! The edge side of the bus: the publisher task (the sink of the in-memory channel when a
//! bus is configured) and the spool replayer that publishes what the bus could not take.
//!
//! The publisher takes envelopes from the channel and keeps publishing them concurrently
//! (each: publish every chunk, then wait for every chunk's ack) while fewer than
//! [`MAX_ACKS_IN_FLIGHT`] chunk acks are outstanding. A fully acked envelope is released from memory and its sender
//! (if it waits) answered; a failed one (no ack within `REACHLY_BUS_PUBLISH_TIMEOUT_MS`,
//! stream full, not connected) goes to the spool. A failure marks the sink unhealthy, so
//! durable envelopes spool at once until a publish or a replay succeeds again.
//!
//! Shutdown: the channel closes (later envelopes spool), what it holds is published, and
//! every publish in flight ends within the publish timeout (acked or spooled).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Mutex, mpsc};

use super::super::Envelope;
use super::super::writer::{SealedSegment, WriterContext, sealed_segments};
use super::{
    BUS_PUBLISH_FAILURES_TOTAL, BUS_PUBLISHED_TOTAL, BUS_TRUNCATED_TOTAL, Bus, MAX_ACKS_IN_FLIGHT,
    envelope,
};
use crate::event::Record;
use crate::metrics::{self, Metrics};

/// Publish acks a spool replay keeps in flight before it waits for them (the publisher keeps
/// up to [`MAX_ACKS_IN_FLIGHT`]; the client allows twice that).
const REPLAY_ACKS: usize = 1024;

type Flight = Pin<Box<dyn Future<Output = (Envelope, usize, Result<u64, String>)> + Send>>;

/// Publishes `records` (all chunks), then waits for every ack. `Ok(truncated records)`.
pub async fn publish(bus: &Bus, records: &[Record]) -> Result<u64, String> {
    publish_chunks(bus, envelope::chunk(records, bus.max_payload())).await
}

async fn publish_chunks(bus: &Bus, chunks: Vec<envelope::Chunk>) -> Result<u64, String> {
    let mut acks = Vec::with_capacity(chunks.len());
    let mut truncated = 0;
    for c in chunks {
        truncated += c.truncated as u64;
        let msg = PublishMessage::build()
            .payload(c.payload)
            .message_id(&c.msg_id);
        let ack = bus
            .jetstream()
            .send_publish(bus.subject(&c.shard), msg)
            .await
            .map_err(|e| format!("publish: {e}"))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| format!("publish ack: {e}"))?;
    }
    Ok(truncated)
}

fn count(m: &Metrics, n: usize, truncated: u64) {
    m.counter(BUS_PUBLISHED_TOTAL, &[]).increment(n as u64);
    if truncated > 0 {
        m.counter(BUS_TRUNCATED_TOTAL, &[]).increment(truncated);
    }
}

/// The publisher: runs until the channel is closed (shutdown) and every publish ended.
pub(in crate::pipeline) async fn run_publisher(
    ctx: WriterContext,
    bus: Bus,
    rx: Arc<Mutex<mpsc::Receiver<Envelope>>>,
) {
    let mut rx = rx.lock().await;
    let mut flights: FuturesUnordered<Flight> = FuturesUnordered::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut open = true;
    let mut acks = 0usize; // chunks published and not yet acked
    loop {
        if ctx.closing.is_cancelled() && open {
            rx.close();
        }
        tokio::select! {
            Some((env, k, res)) = flights.next(), if !flights.is_empty() => {
                acks -= k;
                finish(&ctx, env, res);
            }
            got = rx.recv(), if open && acks < MAX_ACKS_IN_FLIGHT => match got {
                Some(env) => {
                    let bus = bus.clone();
                    let chunks = envelope::chunk(&env.records, bus.max_payload());
                    let k = chunks.len();
                    acks += k;
                    flights.push(Box::pin(async move {
                        let r = publish_chunks(&bus, chunks).await;
                        (env, k, r)
                    }));
                }
                None => open = false,
            },
            _ = tick.tick() => {
                ctx.ingest.beat();
                // Each tick: a ready bus makes durable envelopes try it again after a
                // failure (a publish then decides); a lost connection sends them to the
                // spool at once. Before the first connect nothing changes.
                if bus.ready().is_ok() {
                    ctx.ingest.set_db_healthy(true);
                } else if bus.disconnected() {
                    ctx.ingest.set_db_healthy(false);
                }
            }
            _ = ctx.closing.cancelled(), if !ctx.closing.is_cancelled() => {}
        }
        if !open && flights.is_empty() {
            break;
        }
    }
    bus.flush().await;
}

fn finish(ctx: &WriterContext, env: Envelope, res: Result<u64, String>) {
    match res {
        Ok(truncated) => {
            ctx.ingest.set_db_healthy(true);
            count(&ctx.metrics, env.len(), truncated);
            ctx.ingest.release_envelope(&env);
            if let Some(ack) = env.ack {
                let _ = ack.send(Ok(()));
            }
        }
        Err(e) => {
            ctx.ingest.set_db_healthy(false);
            ctx.metrics
                .counter(BUS_PUBLISH_FAILURES_TOTAL, &[])
                .increment(1);
            tracing::warn!(error = %e, events = env.len(), "bus publish failed; spooling the envelope");
            ctx.ingest.release_envelope(&env);
            ctx.spool.append(env);
        }
    }
}

/// Publishes the spool to the bus whenever it is non-empty and the bus is ready.
pub(in crate::pipeline) async fn run_replayer(ctx: WriterContext, bus: Bus) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = ctx.closing.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(1);
        if ctx.spool.is_empty() || bus.ready().is_err() {
            continue;
        }
        if let Err(e) = replay_once(&ctx, &bus).await {
            tracing::warn!(error = %e, "spool replay to the bus paused");
            wait = Duration::from_secs(3);
        }
    }
}

/// Publishes a batch of a segment's envelopes, in windows of at most REPLAY_ACKS chunks
/// awaiting their acks at once; returns the events published.
async fn publish_batch(
    ctx: &WriterContext,
    bus: &Bus,
    envelopes: &[Vec<Record>],
) -> Result<usize, String> {
    let mut events = 0;
    let mut pending = envelopes.iter().peekable();
    while pending.peek().is_some() {
        // A window of envelopes holding at most REPLAY_ACKS chunks (at least one envelope).
        let mut window = Vec::new();
        let mut chunks = 0;
        while let Some(records) = pending.peek() {
            let c = envelope::chunk(records, bus.max_payload());
            if !window.is_empty() && chunks + c.len() > REPLAY_ACKS {
                break;
            }
            chunks += c.len();
            window.push((records.len(), c));
            pending.next();
        }
        let n: usize = window.iter().map(|(n, _)| n).sum();
        let results = futures_util::future::join_all(
            window
                .into_iter()
                .map(|(n, c)| async move { (n, publish_chunks(bus, c).await) }),
        )
        .await;
        for (n, r) in results {
            count(&ctx.metrics, n, r?);
        }
        events += n;
        ctx.metrics
            .counter(metrics::EVENTS_REPLAYED_TOTAL, &[])
            .increment(n as u64);
    }
    Ok(events)
}

/// Publishes every sealed segment once, deleting each after all its envelopes are acked.
pub(in crate::pipeline) async fn replay_once(ctx: &WriterContext, bus: &Bus) -> Result<(), String> {
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
            events += publish_batch(ctx, bus, &batch).await?;
        };
        if !read_through {
            continue;
        }
        ctx.ingest.set_db_healthy(true);
        if let Err(e) = ctx.spool.remove_segment(&seg, &ctx.metrics) {
            tracing::error!(error = %e, segment = %seg.display(), "cannot delete a replayed spool segment");
        }
        tracing::info!(segment = %seg.display(), events, "spool segment published to the bus");
    }
    Ok(())
}
