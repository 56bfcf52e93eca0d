//! The ingest pipeline: request handlers hand records to [`Ingest`], which never blocks a thread; the
//! writers (`writer.rs`) batch them into one transaction each (`store.rs`, `merge.rs`); when
//! memory is full or the database is down, records go to the on-disk spool (`spool.rs`) and
//! are replayed when it returns.
//!
//! Routing of one submission (an *envelope*: the records of one request):
//! - room in memory (`REACHLY_BUFFER_MAX_EVENTS` events and `REACHLY_BUFFER_MAX_BYTES` of
//!   their estimated memory, [`Record::memory_bytes`]) → the bounded channel to the writers;
//! - no room, or a durable submission while the database is known down → the spool;
//! - spool full too → dropped and counted (`reachly_events_dropped_total{reason}`), and a
//!   durable submission learns it was not made durable (its webhook answers 503).
//!
//! Pixel and click hits are fire-and-forget ([`Ingest::submit`]): they never wait on the
//! database, only, when memory is full, on the spool's disk (one group commit), so that the
//! spool's in-memory queue holds at most one envelope per request in flight instead of
//! growing without bound when events arrive faster than the disk takes them. Webhooks and
//! unsubscribes use [`Ingest::submit_durable`]: one completion per request, resolved when
//! every record of it is committed or fsync'd to the spool.
//!
//! The writers and the replayer run on the pipeline's own runtime (`runtime.rs`): threads
//! of their own, below the request path's CPU priority, so the kernel can preempt a batch
//! being encoded when a pixel arrives.
//!
//! Channel choice: tokio's bounded mpsc. The writers are async tasks that share one
//! receiver (the lock holder collects the next batch while the others write theirs), and
//! `recv_many` plus a deadline is the batching loop. crossbeam-channel serves the spool,
//! which is a plain thread doing blocking file I/O.

pub mod bus;
pub mod merge;
pub mod runtime;
pub mod spool;
pub mod store;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use ::metrics::Gauge;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::event::Record;
use crate::metrics::{self, Metrics};
use spool::{Spool, SpoolThread};

/// Entries per generation of the writers' [`store::MessageCache`] (two generations: at
/// most 200,000 messages: two hash tables of 131,072 buckets x 49 bytes, 6.1 MiB each once
/// full, which jemalloc serves from its 7 MiB size class: the two 7 MiB regions seen at
/// the load test's RSS peaks).
const MESSAGE_CACHE_ENTRIES: usize = 100_000;

/// Longest a fire-and-forget request waits for its events to reach the spool's disk. A
/// group commit takes milliseconds; a disk that takes longer is failing, and the request is
/// answered anyway (its events stay queued for the spool thread).
pub const SPOOL_WAIT_MAX: Duration = Duration::from_secs(5);

/// Completion of a durable submission.
pub type Ack = oneshot::Sender<Result<(), NotDurable>>;

/// Why a durable submission could not be made durable (the caller answers 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    #[error("the spool is full")]
    SpoolFull,
    #[error("the spool could not be written")]
    SpoolIo,
    #[error("the service is shutting down")]
    ShuttingDown,
    /// Larger than the spool could hold even empty: retrying cannot help (HTTP 413).
    #[error("the request's events are too large to ever store")]
    TooLarge,
}

impl NotDurable {
    /// The `reason` label of `reachly_events_dropped_total`.
    pub fn reason(self) -> &'static str {
        match self {
            NotDurable::SpoolFull => "spool_full",
            NotDurable::SpoolIo => "spool_io_error",
            NotDurable::ShuttingDown => "shutting_down",
            NotDurable::TooLarge => "batch_too_large",
        }
    }
}

/// The records of one request, and who waits for them (if anyone).
pub struct Envelope {
    pub records: Vec<Record>,
    pub ack: Option<Ack>,
    /// Unix millis when the service accepted it (`reachly_buffer_oldest_event_age_seconds`).
    pub accepted_ms: i64,
    /// Estimated bytes of memory its records hold ([`Record::memory_bytes`]), counted
    /// against `REACHLY_BUFFER_MAX_BYTES` while it is in memory (set when it is routed).
    pub memory: usize,
}

impl Envelope {
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The handlers' side of the pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    shared: Arc<Shared>,
}

struct Shared {
    tx: mpsc::Sender<Envelope>,
    /// Events in memory: in the channel or in a writer's batch. The real bound.
    buffered: AtomicUsize,
    max: usize,
    /// Their estimated memory ([`Envelope::memory`]), and its bound: the event bound alone
    /// let a buffer of large events (long user agents, links, bounce diagnostics, dead
    /// letters carrying whole bodies) hold hundreds of MB or more.
    buffered_bytes: AtomicUsize,
    max_bytes: usize,
    spool: Spool,
    /// False after a failed write, true after a successful one. With a bus, the sink is the
    /// bus: false after a failed publish or while disconnected.
    db_healthy: AtomicBool,
    /// The scale-out bus, when configured (see `bus`).
    bus: Option<bus::Bus>,
    /// Unix millis of the last writer loop iteration (liveness).
    heartbeat_ms: AtomicI64,
    /// Unix millis of the last committed batch (writers and replayer); 0: none yet.
    last_flush_ms: AtomicI64,
    /// Per writer: unix millis at which the oldest envelope of the batch it holds
    /// uncommitted was accepted; 0 while it holds none
    /// (`reachly_buffer_oldest_event_age_seconds`).
    holding_since_ms: Box<[AtomicI64]>,
    metrics: Metrics,
    buffer_gauge: Gauge,
    buffer_bytes_gauge: Gauge,
    /// The pipeline's runtime ([`runtime`]), for CPU work a request hands off.
    background: tokio::runtime::Handle,
}

impl Ingest {
    /// Fire-and-forget (pixel, click): returns at once while memory has room. When the
    /// records must go to the spool instead (memory full), it returns once they are on disk
    /// (or refused and counted), at most [`SPOOL_WAIT_MAX`] later: the disk's pace holds
    /// the requests feeding it back, so a spool that cannot keep up does not queue their
    /// events in memory without bound. The caller answers as usual either way.
    pub async fn submit(&self, records: Vec<Record>) {
        let spooling = self.route(Envelope {
            records,
            ack: None,
            accepted_ms: now_ms(),
            memory: 0,
        });
        if let Some(on_disk) = spooling {
            let _ = tokio::time::timeout(SPOOL_WAIT_MAX, on_disk).await;
        }
    }

    /// Resolves once every record is committed or on disk; `Err` if that cannot be done
    /// (the caller answers 503 so the sender retries).
    pub async fn submit_durable(&self, records: Vec<Record>) -> Result<(), NotDurable> {
        let (tx, rx) = oneshot::channel();
        // Its ack is set: the spool resolves `rx`, nothing else to wait for.
        let _ = self.route(Envelope {
            records,
            ack: Some(tx),
            accepted_ms: now_ms(),
            memory: 0,
        });
        rx.await.unwrap_or(Err(NotDurable::ShuttingDown))
    }

    /// Sends `env` to memory or to the spool. Returns, for a fire-and-forget envelope that
    /// went to the spool, what resolves once it is on disk.
    fn route(&self, mut env: Envelope) -> Option<oneshot::Receiver<Result<(), NotDurable>>> {
        let s = &self.shared;
        let mut memory = 0;
        for r in &env.records {
            if let Record::Event(e) = r {
                s.metrics
                    .event_received(e.event_type.as_str(), e.source.label(), 1);
            }
            memory += r.memory_bytes();
        }
        env.memory = memory;
        if env.is_empty() {
            if let Some(ack) = env.ack {
                let _ = ack.send(Ok(()));
            }
            return None;
        }
        let n = env.len();
        // A durable submission while the database is down goes straight to disk: the sender
        // gets its answer in milliseconds instead of waiting on a database that is not there.
        let skip_memory = env.ack.is_some() && !s.db_healthy.load(Ordering::Relaxed);
        if !skip_memory && self.reserve(n, memory) {
            match s.tx.try_send(env) {
                Ok(()) => return None,
                Err(
                    mpsc::error::TrySendError::Full(env) | mpsc::error::TrySendError::Closed(env),
                ) => {
                    self.release(n, memory);
                    return self.spool(env);
                }
            }
        }
        self.spool(env)
    }

    /// Hands `env` to the spool thread. A fire-and-forget envelope gets an ack here too, so
    /// its request can wait for the disk: the spool's queue then holds at most one envelope
    /// per request in flight, whatever the arrival rate.
    fn spool(&self, mut env: Envelope) -> Option<oneshot::Receiver<Result<(), NotDurable>>> {
        let on_disk = env.ack.is_none().then(|| {
            let (tx, rx) = oneshot::channel();
            env.ack = Some(tx);
            rx
        });
        self.shared.spool.append(env);
        on_disk
    }

    /// Takes room for `n` events holding `memory` bytes, if both bounds allow it. An
    /// envelope larger than the whole byte bound is still taken into an empty buffer (one
    /// request's events are bounded by the body limits), so no size of request is spooled
    /// for ever while memory sits idle.
    fn reserve(&self, n: usize, memory: usize) -> bool {
        let s = &self.shared;
        let bytes_ok = s
            .buffered_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == 0 || cur + memory <= s.max_bytes).then_some(cur + memory)
            })
            .is_ok();
        if !bytes_ok {
            return false;
        }
        let ok = s
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= s.max).then_some(cur + n)
            })
            .is_ok();
        if ok {
            s.buffer_gauge
                .set(s.buffered.load(Ordering::Relaxed) as f64);
            s.buffer_bytes_gauge
                .set(s.buffered_bytes.load(Ordering::Relaxed) as f64);
        } else {
            s.buffered_bytes.fetch_sub(memory, Ordering::AcqRel);
        }
        ok
    }

    /// Gives back the room of `n` events holding `memory` bytes (what [`Ingest::reserve`]
    /// took for them).
    fn release(&self, n: usize, memory: usize) {
        let s = &self.shared;
        let after = s.buffered.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        s.buffer_gauge.set(after as f64);
        let after = s
            .buffered_bytes
            .fetch_sub(memory, Ordering::AcqRel)
            .saturating_sub(memory);
        s.buffer_bytes_gauge.set(after as f64);
    }

    /// Gives back the room of `env`, which leaves memory (committed, published or spooled).
    fn release_envelope(&self, env: &Envelope) {
        self.release(env.len(), env.memory);
    }

    /// Runs `job` on the pipeline's runtime's blocking threads, below the request path's CPU
    /// priority ([`runtime`]): for CPU work a request hands off, such as parsing a large
    /// webhook body. The handle fails (cancelled) once the pipeline has shut down.
    pub fn spawn_blocking<F, R>(&self, job: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.shared.background.spawn_blocking(job)
    }

    /// Events held in memory.
    pub fn buffered(&self) -> usize {
        self.shared.buffered.load(Ordering::Relaxed)
    }

    /// Estimated bytes of memory the buffered events hold.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffered_bytes.load(Ordering::Relaxed)
    }

    /// Above the high-water mark (80% of either memory bound) the instance reports not
    /// ready, so a load balancer sends traffic elsewhere before events spill to disk.
    pub fn above_high_water(&self) -> bool {
        let s = &self.shared;
        self.buffered() * 5 > s.max * 4 || self.buffered_bytes() / 4 * 5 > s.max_bytes
    }

    pub fn spool_bytes(&self) -> u64 {
        self.shared.spool.bytes()
    }

    /// With a bus configured: whether it is ready (connected, stream there); `None` without.
    pub fn bus_ready(&self) -> Option<Result<(), String>> {
        self.shared.bus.as_ref().map(bus::Bus::ready)
    }

    pub fn db_healthy(&self) -> bool {
        self.shared.db_healthy.load(Ordering::Relaxed)
    }

    /// The memory bound (`REACHLY_BUFFER_MAX_EVENTS`).
    pub fn capacity(&self) -> usize {
        self.shared.max
    }

    /// The memory bound in bytes (`REACHLY_BUFFER_MAX_BYTES`).
    pub fn capacity_bytes(&self) -> usize {
        self.shared.max_bytes
    }

    /// The spool bound (`REACHLY_SPOOL_MAX_BYTES`).
    pub fn spool_capacity_bytes(&self) -> u64 {
        self.shared.spool.max_bytes()
    }

    /// Unix millis of the last committed batch, if any.
    pub fn last_flush_unix_ms(&self) -> Option<i64> {
        Some(self.shared.last_flush_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// Age of the oldest event a writer holds uncommitted, since it was accepted (zero if
    /// none). The channel is FIFO and events wait in it only while every writer holds an
    /// older batch, so this is the age of the oldest event in memory.
    pub fn oldest_buffered_age(&self) -> Duration {
        let oldest = self
            .shared
            .holding_since_ms
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|ms| *ms > 0)
            .min();
        oldest.map_or(Duration::ZERO, |ms| {
            Duration::from_millis((now_ms() - ms).max(0) as u64)
        })
    }

    /// Writer `writer` now holds a batch whose oldest event was accepted at `since_ms`
    /// (`None`: it holds none).
    fn hold(&self, writer: usize, since_ms: Option<i64>) {
        if let Some(slot) = self.shared.holding_since_ms.get(writer) {
            slot.store(since_ms.unwrap_or(0).max(0), Ordering::Relaxed);
        }
    }

    fn flushed(&self) {
        self.shared.last_flush_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since a writer last showed life.
    pub fn heartbeat_age(&self) -> Duration {
        let last = self.shared.heartbeat_ms.load(Ordering::Relaxed);
        Duration::from_millis((now_ms() - last).max(0) as u64)
    }

    fn beat(&self) {
        self.shared.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn set_db_healthy(&self, ok: bool) {
        self.shared.db_healthy.store(ok, Ordering::Relaxed);
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The running pipeline: writers, replayer and spool thread.
pub struct Pipeline {
    pub ingest: Ingest,
    writers: Vec<JoinHandle<()>>,
    replayer: JoinHandle<()>,
    spool_thread: SpoolThread,
    closing: CancellationToken,
    deadline: CancellationToken,
    /// Runs the writers and the replayer; declared last, so dropped after everything that
    /// might still reach it.
    background: runtime::BackgroundRuntime,
}

impl Pipeline {
    /// Opens the spool and starts `cfg.writers` writers and the spool replayer (which
    /// replays any spool left by an earlier run first).
    pub fn start(
        cfg: &PipelineConfig,
        pool: deadpool_postgres::Pool,
        metrics: Metrics,
    ) -> anyhow::Result<Pipeline> {
        Pipeline::start_with_bus(cfg, pool, metrics, None)
    }

    /// [`Pipeline::start`], with the bus as the sink when one is given: the channel feeds
    /// the bus publisher instead of the writers, the spool replays to the bus, and (unless
    /// an edge) `cfg.writers` bus consumers write to the database.
    pub fn start_with_bus(
        cfg: &PipelineConfig,
        pool: deadpool_postgres::Pool,
        metrics: Metrics,
        bus: Option<bus::Bus>,
    ) -> anyhow::Result<Pipeline> {
        let (spool, spool_thread) =
            Spool::open(&cfg.spool_dir, cfg.spool_max_bytes, metrics.clone())?;
        let workers = cfg
            .writers
            .min(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let background = runtime::BackgroundRuntime::new(workers, cfg.background_nice)?;
        let (tx, rx) = mpsc::channel(cfg.buffer_max_events);
        let ingest = Ingest {
            shared: Arc::new(Shared {
                tx,
                buffered: AtomicUsize::new(0),
                max: cfg.buffer_max_events,
                buffered_bytes: AtomicUsize::new(0),
                max_bytes: cfg.buffer_max_bytes,
                spool,
                db_healthy: AtomicBool::new(true),
                bus: bus.clone(),
                heartbeat_ms: AtomicI64::new(now_ms()),
                last_flush_ms: AtomicI64::new(0),
                holding_since_ms: (0..cfg.writers).map(|_| AtomicI64::new(0)).collect(),
                buffer_gauge: metrics.gauge(metrics::BUFFER_EVENTS, &[]),
                buffer_bytes_gauge: metrics.gauge(metrics::BUFFER_BYTES, &[]),
                metrics: metrics.clone(),
                background: background.handle().clone(),
            }),
        };
        ingest.shared.buffer_gauge.set(0.0);
        ingest.shared.buffer_bytes_gauge.set(0.0);
        let closing = CancellationToken::new();
        let deadline = CancellationToken::new();
        let rx = Arc::new(Mutex::new(rx));
        let ctx = writer::WriterContext {
            ingest: ingest.clone(),
            spool: ingest.shared.spool.clone(),
            pool,
            limits: store::BatchLimits {
                // Zero keeps the server's setting.
                statement_timeout: Some(cfg.statement_timeout).filter(|d| !d.is_zero()),
                lock_timeout: Some(cfg.lock_timeout).filter(|d| !d.is_zero()),
            },
            message_cache: Arc::new(store::MessageCache::new(MESSAGE_CACHE_ENTRIES)),
            metrics,
            flush_max_events: cfg.flush_max_events,
            flush_interval: cfg.flush_interval,
            durable_linger: cfg.durable_linger,
            closing: closing.clone(),
            deadline: deadline.clone(),
        };
        // Everything below spawns onto the pipeline's runtime.
        let entered = background.handle().enter();
        let (writers, replayer) = match bus {
            None => (
                (0..cfg.writers)
                    .map(|i| tokio::spawn(writer::run_writer(i, ctx.clone(), rx.clone())))
                    .collect(),
                tokio::spawn(writer::run_replayer(ctx)),
            ),
            Some(bus) => bus::spawn(cfg, ctx, rx, bus, closing.clone()),
        };
        drop(entered);
        Ok(Pipeline {
            background,
            ingest,
            writers,
            replayer,
            spool_thread,
            closing,
            deadline,
        })
    }

    /// Drains: writers flush everything buffered; whatever is not committed within
    /// `timeout` is spooled. Returns once the spool is synced and closed.
    pub async fn shutdown(self, timeout: Duration) {
        self.closing.cancel();
        let writers = futures_util::future::join_all(self.writers);
        tokio::pin!(writers);
        tokio::select! {
            _ = &mut writers => {}
            _ = tokio::time::sleep(timeout) => {
                tracing::warn!("drain timeout reached; spooling what is left");
                self.deadline.cancel();
                writers.await;
            }
        }
        let _ = self.replayer.await;
        self.ingest.shared.spool.close();
        let handle = self.spool_thread.handle;
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        let left = self.ingest.buffered();
        if left > 0 {
            tracing::error!(
                events = left,
                "events still counted in memory after the drain"
            );
        }
        // Nothing of the pipeline runs any more. Pool connections opened by the writers
        // have their I/O task on this runtime and close with it (the pool replaces them).
        drop(self.background);
    }
}
