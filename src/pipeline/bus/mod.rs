//! The scale-out bus: NATS JetStream between stateless edges and database writers
//! (issue 13). With `REACHLY_BUS_URL` set, the pipeline's sink is the bus instead of the
//! database; without it nothing here runs and one process does everything.
//!
//! ```text
//!  edge: handlers ─► Ingest ─► channel ─► publisher ──publish, await ack──► stream (R3, file)
//!                      │                     │ no ack / stream full                 │
//!                      └─► spool (fsync) ◄───┘  replayed to the bus                 │
//!  writer:                      fetch (durable pull consumer, explicit acks) ◄──────┘
//!                               ─► same batch transaction ─► commit ─► ack
//! ```
//!
//! - Edge ([`edge`]): every envelope goes through the bounded in-memory channel to one
//!   publisher task, which publishes its chunks ([`envelope`]) with `Nats-Msg-Id` and keeps
//!   the publish acks in flight. A durable envelope (webhook, unsubscribe) is acknowledged to
//!   its sender only once every chunk's publish ack arrived, i.e. once the stream's replicas
//!   hold it; pixels and clicks never wait. A publish that fails or times out (bus down,
//!   leader election, stream full: `discard: new`) sends the envelope to the local spool,
//!   which the replayer publishes later; past the spool's bound a durable sender gets 503.
//!   While a publish failed last, durable envelopes go straight to the spool (a prompt
//!   answer), exactly as they do while the database is down in the embedded mode.
//! - Stream: `REACHLY_BUS_REPLICAS` (3) replicas, file storage, work-queue retention (a
//!   message is deleted once a writer acks it, so the stream *is* the backlog), bounded by
//!   `REACHLY_BUS_MAX_BYTES` with `discard: new`, and a `REACHLY_BUS_DUPLICATE_WINDOW_S`
//!   duplicate window. Edges and writers both create it if it is missing.
//! - Writer ([`consumer`]): `REACHLY_WRITERS` tasks fetch from one durable pull consumer
//!   (explicit acks), run the same batch transaction as the embedded writers (row errors
//!   isolated as dead letters), commit, then ack. While the database is down they send
//!   in-progress acks for what they hold and fetch nothing more; the stream keeps the
//!   backlog. A message that does not decode is stored as a dead letter and terminated.
//!
//! Exactly once end to end = at-least-once transport (redelivery after a crash before the
//! ack, re-publish after a lost publish ack) + the idempotent sink (event ids and ESP dedup
//! keys, `ON CONFLICT DO NOTHING`, and the commutative status merge).
//!
//! Durability of an acknowledged publish depends on the server: an R3 stream acks once a
//! quorum (2 of 3) has the message in its log. nats-server fsyncs that log every
//! `sync_interval` (2 minutes by default; `sync_interval: always` exists from 2.10 on, not
//! in Debian's 2.9.10), so a simultaneous power loss of a quorum can lose acked messages;
//! see docs/scaling.md.

pub mod consumer;
pub mod edge;
pub mod envelope;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;

/// Metric names of the bus (kept here, beside their only users).
pub const BUS_PUBLISHED_TOTAL: &str = "reachly_bus_published_total";
pub const BUS_PUBLISH_FAILURES_TOTAL: &str = "reachly_bus_publish_failures_total";
pub const BUS_CONSUMED_TOTAL: &str = "reachly_bus_consumed_total";
pub const BUS_REDELIVERED_TOTAL: &str = "reachly_bus_redelivered_total";
pub const BUS_TRUNCATED_TOTAL: &str = "reachly_bus_truncated_records_total";
pub const BUS_READY: &str = "reachly_bus_ready";

/// The server's `max_payload` until it tells us its own (its default).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Publish acks an edge's publisher keeps in flight; past it the channel fills and envelopes
/// spool. The client is built to allow twice this (room for the spool replayer).
pub const MAX_ACKS_IN_FLIGHT: usize = 8192;
/// How often the keeper checks the connection and (re)creates stream and consumer.
const KEEP_EVERY: Duration = Duration::from_millis(500);

/// A connection to the bus. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: Arc<BusConfig>,
    state: Arc<BusState>,
}

struct BusState {
    /// Stream (and, for writers, consumer) known to exist since the last connect.
    ensured: AtomicBool,
    max_payload: AtomicUsize,
    last_error: std::sync::Mutex<String>,
}

impl Bus {
    /// Starts connecting (in the background, retrying forever: a bus that is down at start
    /// is not fatal, envelopes spool until it is up). Errors only on unusable URLs.
    pub async fn connect(cfg: &BusConfig) -> anyhow::Result<Bus> {
        let addrs = cfg
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("REACHLY_BUS_URL: {e}"))?;
        let name = match cfg.role {
            crate::config::BusRole::Edge => "reachly-ingest-edge",
            crate::config::BusRole::Writer => "reachly-ingest-writer",
            crate::config::BusRole::Both => "reachly-ingest",
        };
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2000))
            })
            .event_callback(|ev| async move {
                tracing::info!(event = %ev, "bus connection event");
            })
            .connect(addrs)
            .await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.publish_timeout)
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT * 2)
            .backpressure_on_inflight(false)
            .build(client.clone());
        Ok(Bus {
            client,
            js,
            cfg: Arc::new(cfg.clone()),
            state: Arc::new(BusState {
                ensured: AtomicBool::new(false),
                max_payload: AtomicUsize::new(DEFAULT_MAX_PAYLOAD),
                last_error: std::sync::Mutex::new("not connected yet".into()),
            }),
        })
    }

    pub fn config(&self) -> &BusConfig {
        &self.cfg
    }

    /// The JetStream key-value bucket `bucket` (file storage, one value per key, as many
    /// replicas as the stream, entries expiring after `max_age`), created if missing. Two
    /// processes creating it at once with the same settings both succeed.
    ///
    /// The bucket's stream is made here with the settings async-nats' `create_key_value`
    /// would give it (`KV_<bucket>`, subjects `$KV.<bucket>.>`, rollups allowed, deletes
    /// denied, direct gets, discard new): that function first asks for the account's info,
    /// whose answer from Debian's nats-server 2.9.10 async-nats 0.51 cannot parse.
    pub async fn key_value(
        &self,
        bucket: &str,
        max_age: Duration,
    ) -> anyhow::Result<jetstream::kv::Store> {
        if let Ok(store) = self.js.get_key_value(bucket).await {
            return Ok(store);
        }
        // The event stream first: JetStream reserves each stream's max_bytes, and a server
        // with room for only one of the two must give it to the events.
        self.ready().map_err(|e| {
            anyhow::anyhow!("not creating the bucket {bucket} before the stream: {e}")
        })?;
        self.js
            .get_or_create_stream(stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age,
                // Bounded like the stream (JetStream reserves it): a sixteenth of
                // REACHLY_BUS_MAX_BYTES, at least 16 MiB.
                max_bytes: (self.cfg.max_bytes / 16).max(16 << 20),
                storage: stream::StorageType::File,
                num_replicas: self.cfg.replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the key-value bucket {bucket}: {e}"))?;
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| anyhow::anyhow!("opening the key-value bucket {bucket}: {e}"))
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Lost the connection it had (not: still making the first one).
    pub fn disconnected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Disconnected
    }

    /// Readiness: connected, and the stream (and consumer) exist.
    pub fn ready(&self) -> Result<(), String> {
        if !self.connected() {
            return Err("bus not connected".into());
        }
        if !self.state.ensured.load(Ordering::Relaxed) {
            let e = self
                .state
                .last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            return Err(format!("bus stream not ready: {e}"));
        }
        Ok(())
    }

    pub fn max_payload(&self) -> usize {
        self.state.max_payload.load(Ordering::Relaxed)
    }

    pub fn subject(&self, shard: &str) -> String {
        format!("{}.{shard}", self.cfg.subject_prefix)
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![format!("{}.>", self.cfg.subject_prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.cfg.replicas,
            duplicate_window: self.cfg.duplicate_window,
            max_bytes: self.cfg.max_bytes,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        }
    }

    fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.cfg.consumer.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.cfg.ack_wait,
            max_deliver: -1,
            max_ack_pending: 100_000,
            ..Default::default()
        }
    }

    /// Creates the stream if it is missing (and the consumer, for a writer).
    async fn ensure(&self) -> Result<(), String> {
        let stream = self
            .js
            .get_or_create_stream(self.stream_config())
            .await
            .map_err(|e| format!("stream {}: {e}", self.cfg.stream))?;
        if self.cfg.consumes() {
            stream
                .get_or_create_consumer::<pull::Config>(&self.cfg.consumer, self.consumer_config())
                .await
                .map_err(|e| format!("consumer {}: {e}", self.cfg.consumer))?;
        }
        Ok(())
    }

    /// The writers' durable pull consumer.
    pub async fn consumer(&self) -> Result<jetstream::consumer::PullConsumer, String> {
        let stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.cfg.stream))?;
        stream
            .get_or_create_consumer::<pull::Config>(&self.cfg.consumer, self.consumer_config())
            .await
            .map_err(|e| format!("consumer {}: {e}", self.cfg.consumer))
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Keeps readiness current: after every (re)connect, makes sure the stream (and
    /// consumer) exist and learns the server's `max_payload`.
    pub async fn run_keeper(self, metrics: crate::metrics::Metrics, stop: CancellationToken) {
        let ready_gauge = metrics.gauge(BUS_READY, &[]);
        let mut was_connected = false;
        loop {
            let connected = self.connected();
            if connected {
                let mp = self.client.server_info().max_payload;
                if mp > 0 {
                    self.state.max_payload.store(mp, Ordering::Relaxed);
                }
            }
            if connected && (!was_connected || !self.state.ensured.load(Ordering::Relaxed)) {
                match tokio::time::timeout(Duration::from_secs(10), self.ensure()).await {
                    Ok(Ok(())) => {
                        self.state.ensured.store(true, Ordering::Relaxed);
                        tracing::info!(stream = %self.cfg.stream, "bus stream ready");
                    }
                    Ok(Err(e)) => self.fail(e),
                    Err(_) => self.fail("creating the stream timed out".into()),
                }
            }
            was_connected = connected;
            ready_gauge.set(if self.ready().is_ok() { 1.0 } else { 0.0 });
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(KEEP_EVERY) => {}
            }
        }
    }

    fn fail(&self, e: String) {
        tracing::warn!(error = %e, "bus not ready");
        self.state.ensured.store(false, Ordering::Relaxed);
        if let Ok(mut l) = self.state.last_error.lock() {
            *l = e;
        }
    }

    /// Flushes what the client still buffers (shutdown).
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

/// Starts the bus side of the pipeline: the publisher (the channel's sink), the consumers
/// (unless an edge) and the keeper as the pipeline's "writers" (drained at shutdown), and
/// the spool replayer.
pub(super) fn spawn(
    cfg: &crate::config::PipelineConfig,
    ctx: super::writer::WriterContext,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<super::Envelope>>>,
    bus: Bus,
    closing: CancellationToken,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    tokio::task::JoinHandle<()>,
) {
    let mut tasks = vec![tokio::spawn(edge::run_publisher(
        ctx.clone(),
        bus.clone(),
        rx,
    ))];
    if bus.config().consumes() {
        for i in 0..cfg.writers {
            tasks.push(tokio::spawn(consumer::run_consumer(
                i,
                ctx.clone(),
                bus.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(
        bus.clone().run_keeper(ctx.metrics.clone(), closing),
    ));
    let replayer = tokio::spawn(edge::run_replayer(ctx, bus));
    (tasks, replayer)
}
