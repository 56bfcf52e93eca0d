//! Metrics: the names (all `reachly_`-prefixed), their help texts and histogram buckets, and
//! one Prometheus recorder per running app. The recorder is *not* installed globally: every
//! component records through the [`Metrics`] handle it was given, so several apps (tests)
//! can run in one process without sharing counters, and `/metrics` renders exactly this
//! app's figures.
//!
//! What an operator alerts on must be there before anything happens: every family has a
//! `# HELP` line (`promtool check metrics` is clean, tested against a live instance), and
//! every known label combination of the counters is registered at zero when the app starts,
//! so `increase()` sees the first drop, auth failure or bad token instead of a series that
//! appears at 1. Gauges whose data lives elsewhere (pool, buffer, spool, database probe) are
//! set by the admin listener just before it renders; process metrics are read from `/proc`
//! at render time ([`process`]).

mod process;

pub use process::cpu_seconds as process_cpu_seconds;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::event::EventType;

pub const HTTP_REQUESTS_TOTAL: &str = "reachly_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "reachly_http_request_duration_seconds";
pub const EVENTS_RECEIVED_TOTAL: &str = "reachly_events_received_total";
pub const EVENTS_WRITTEN_TOTAL: &str = "reachly_events_written_total";
pub const EVENTS_DROPPED_TOTAL: &str = "reachly_events_dropped_total";
pub const EVENTS_DUPLICATE_TOTAL: &str = "reachly_events_duplicate_total";
pub const EVENTS_DEAD_LETTERED_TOTAL: &str = "reachly_events_dead_lettered_total";
pub const EVENTS_SPOOLED_TOTAL: &str = "reachly_events_spooled_total";
pub const EVENTS_REPLAYED_TOTAL: &str = "reachly_events_replayed_total";
pub const SPOOL_TORN_RECORDS_TOTAL: &str = "reachly_spool_torn_records_total";
pub const BUFFER_EVENTS: &str = "reachly_buffer_events";
pub const BUFFER_BYTES: &str = "reachly_buffer_bytes";
pub const SPOOL_BYTES: &str = "reachly_spool_bytes";
pub const FLUSH_DURATION_SECONDS: &str = "reachly_flush_duration_seconds";
pub const FLUSH_BATCH_SIZE: &str = "reachly_flush_batch_size";
pub const DB_ERRORS_TOTAL: &str = "reachly_db_errors_total";
pub const DB_TIMEOUTS_TOTAL: &str = "reachly_db_timeouts_total";
pub const INVALID_TOKENS_TOTAL: &str = "reachly_invalid_tokens_total";
pub const WEBHOOK_AUTH_FAILURES_TOTAL: &str = "reachly_webhook_auth_failures_total";
pub const PARTITION_MAINTENANCE_TOTAL: &str = "reachly_partition_maintenance_total";
pub const BUILD_INFO: &str = "reachly_build_info";
pub const LAST_FLUSH_TIMESTAMP_SECONDS: &str = "reachly_last_flush_timestamp_seconds";
pub const DATABASE_UP: &str = "reachly_database_up";
pub const DB_POOL_CONNECTIONS: &str = "reachly_db_pool_connections";
pub const DB_POOL_MAX_CONNECTIONS: &str = "reachly_db_pool_max_connections";
pub const DB_POOL_WAITING: &str = "reachly_db_pool_waiting";
pub const BUFFER_CAPACITY_EVENTS: &str = "reachly_buffer_capacity_events";
pub const BUFFER_CAPACITY_BYTES: &str = "reachly_buffer_capacity_bytes";
pub const SPOOL_CAPACITY_BYTES: &str = "reachly_spool_capacity_bytes";
pub const BUFFER_OLDEST_EVENT_AGE_SECONDS: &str = "reachly_buffer_oldest_event_age_seconds";
pub const PARTITION_HORIZON_TIMESTAMP_SECONDS: &str = "reachly_partition_horizon_timestamp_seconds";

/// `reachly_events_dropped_total{reason}`: every reason the code can count.
pub const DROP_REASONS: &[&str] = &["spool_full", "spool_io_error", "shutting_down", "rejected"];
/// `reachly_webhook_auth_failures_total{provider}` and the ESP sources of
/// `reachly_events_received_total`.
pub const PROVIDERS: &[&str] = &[
    "sendgrid",
    "mailgun",
    "ses",
    "postmark",
    "sparkpost",
    "mandrill",
    "resend",
];
/// `reachly_invalid_tokens_total{purpose}`.
pub const TOKEN_PURPOSES: &[&str] = &["open", "click", "unsubscribe"];
/// `reachly_db_errors_total{operation}`.
pub const DB_OPERATIONS: &[&str] = &["write_batch", "spool_replay", "partition_maintenance"];
/// `reachly_partition_maintenance_total{outcome}`.
pub const MAINTENANCE_OUTCOMES: &[&str] = &["ok", "skipped", "error"];
/// `reachly_events_dead_lettered_total{reason}` known up front (providers add their own,
/// such as `unknown_event_type`, when they meet one).
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "unknown_message",
    "organization_mismatch",
    "rejected_by_database",
];
/// Our own endpoints as `reachly_events_received_total{type, source}`.
const TRACKING_SOURCES: &[(&str, &str)] = &[
    ("opened", "pixel"),
    ("clicked", "click"),
    ("unsubscribed", "unsubscribe"),
];
// Storage (src/db/sizes.rs), sampled every minute: bytes include indexes and TOAST.
/// `{age}`: email_events partitions by age bucket (`0-7d` … `366d+`, `default`).
pub const EMAIL_EVENTS_BYTES: &str = "reachly_email_events_bytes";
/// `{table}`: campaign_messages, contacts, webhook_dead_letters.
pub const TABLE_BYTES: &str = "reachly_table_bytes";
pub const OLDEST_PARTITION_AGE_SECONDS: &str = "reachly_oldest_partition_age_seconds";
pub const DATABASE_BYTES: &str = "reachly_database_bytes";
/// REACHLY_DATABASE_DISK_BYTES, exported for the disk-full alert.
pub const DATABASE_DISK_BYTES: &str = "reachly_database_disk_bytes";
/// `{outcome}` = ok | error: partitions archived by maintenance (src/db/archive.rs).
pub const PARTITIONS_ARCHIVED_TOTAL: &str = "reachly_partitions_archived_total";
pub const HTTP_CONNECTIONS: &str = "reachly_http_connections";
pub const HTTP_CONNECTIONS_MAX: &str = "reachly_http_connections_max";
pub const HTTP_CONNECTION_CAP_REACHED_TOTAL: &str = "reachly_http_connection_cap_reached_total";
pub const HTTP_CONNECTIONS_TIMED_OUT_TOTAL: &str = "reachly_http_connections_timed_out_total";
pub const HTTP_BODY_BUDGET_EXHAUSTED_TOTAL: &str = "reachly_http_body_budget_exhausted_total";
pub const HTTP_BODY_BYTES_HELD: &str = "reachly_http_body_bytes_held";
pub const HTTP_BODY_BUDGET_BYTES: &str = "reachly_http_body_budget_bytes";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const FLUSH_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
];

static METADATA: Metadata<'static> = Metadata::new(
    "reachly_ingest",
    metrics::Level::INFO,
    Some("reachly_ingest"),
);

/// This app's metrics: a cheap-to-clone handle on its own recorder.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    hot: Arc<HotHandles>,
}

/// (route name, HTTP status).
type RouteStatus = (&'static str, u16);

/// Handles of the per-request metrics, registered once per label set: registering builds
/// a key with owned label strings, which would otherwise be allocated on every request.
#[derive(Default)]
struct HotHandles {
    http: RwLock<HashMap<RouteStatus, (Counter, Histogram)>>,
    received: RwLock<HashMap<(&'static str, &'static str), Counter>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builder = [
            (HTTP_REQUEST_DURATION_SECONDS, LATENCY_BUCKETS),
            (FLUSH_DURATION_SECONDS, FLUSH_BUCKETS),
            (FLUSH_BATCH_SIZE, BATCH_SIZE_BUCKETS),
        ]
        .into_iter()
        .fold(PrometheusBuilder::new(), |b, (name, buckets)| {
            b.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                .expect("bucket lists are non-empty constants")
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let m = Metrics {
            recorder: Arc::new(recorder),
            handle,
            hot: Arc::default(),
        };
        m.describe();
        m.register_known_series();
        m
    }

    /// Every known label combination at zero, and the build info at 1.
    fn register_known_series(&self) {
        let zero = |name: &'static str, label: &'static str, values: &[&str]| {
            for v in values {
                self.counter(name, &[(label, v)]).increment(0);
            }
        };
        zero(EVENTS_DROPPED_TOTAL, "reason", DROP_REASONS);
        zero(WEBHOOK_AUTH_FAILURES_TOTAL, "provider", PROVIDERS);
        zero(INVALID_TOKENS_TOTAL, "purpose", TOKEN_PURPOSES);
        zero(DB_ERRORS_TOTAL, "operation", DB_OPERATIONS);
        zero(PARTITION_MAINTENANCE_TOTAL, "outcome", MAINTENANCE_OUTCOMES);
        zero(EVENTS_DEAD_LETTERED_TOTAL, "reason", DEAD_LETTER_REASONS);
        let types: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        zero(EVENTS_WRITTEN_TOTAL, "type", &types);
        for name in [
            EVENTS_DUPLICATE_TOTAL,
            EVENTS_SPOOLED_TOTAL,
            EVENTS_REPLAYED_TOTAL,
            SPOOL_TORN_RECORDS_TOTAL,
        ] {
            self.counter(name, &[]).increment(0);
        }
        for (t, source) in TRACKING_SOURCES {
            self.counter(EVENTS_RECEIVED_TOTAL, &[("type", t), ("source", source)])
                .increment(0);
        }
        for source in PROVIDERS {
            for t in &types {
                self.counter(EVENTS_RECEIVED_TOTAL, &[("type", t), ("source", source)])
                    .increment(0);
            }
        }
        for name in [
            LAST_FLUSH_TIMESTAMP_SECONDS,
            DATABASE_UP,
            DB_POOL_MAX_CONNECTIONS,
            DB_POOL_WAITING,
            BUFFER_CAPACITY_EVENTS,
            BUFFER_CAPACITY_BYTES,
            SPOOL_CAPACITY_BYTES,
            BUFFER_OLDEST_EVENT_AGE_SECONDS,
            PARTITION_HORIZON_TIMESTAMP_SECONDS,
            HTTP_BODY_BYTES_HELD,
            HTTP_BODY_BUDGET_BYTES,
        ] {
            self.gauge(name, &[]).set(0.0);
        }
        for state in ["in_use", "idle"] {
            self.gauge(DB_POOL_CONNECTIONS, &[("state", state)])
                .set(0.0);
        }
        self.gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))])
            .set(1.0);
    }

    fn describe(&self) {
        let d = |name: &'static str, help: &'static str| {
            self.recorder
                .describe_counter(name.into(), None, help.into());
        };
        d(
            HTTP_REQUESTS_TOTAL,
            "HTTP requests answered, by route name and status code.",
        );
        d(
            EVENTS_RECEIVED_TOTAL,
            "Events accepted into the pipeline, by type and source.",
        );
        d(
            EVENTS_WRITTEN_TOTAL,
            "Events committed to email_events, by type.",
        );
        d(
            EVENTS_DROPPED_TOTAL,
            "Events lost on purpose, by reason (every bound exceeded, rejected rows).",
        );
        d(
            EVENTS_DUPLICATE_TOTAL,
            "Events not stored because the same event was already stored.",
        );
        d(
            EVENTS_DEAD_LETTERED_TOTAL,
            "Events kept in the dead-letter table, by reason.",
        );
        d(
            DB_ERRORS_TOTAL,
            "Database errors met by the writer and maintenance, by operation.",
        );
        d(
            DB_TIMEOUTS_TOTAL,
            "Batch transactions that hit REACHLY_DB_STATEMENT_TIMEOUT_MS or REACHLY_DB_LOCK_TIMEOUT_MS (then retried), by kind.",
        );
        d(
            INVALID_TOKENS_TOTAL,
            "Tracking requests with a bad token, by expected purpose.",
        );
        d(
            WEBHOOK_AUTH_FAILURES_TOTAL,
            "Webhook requests refused for authentication, by provider.",
        );
        d(
            EVENTS_SPOOLED_TOTAL,
            "Events written to the on-disk spool (memory full or database down).",
        );
        d(
            EVENTS_REPLAYED_TOTAL,
            "Spooled events written to the database by the replayer.",
        );
        d(
            SPOOL_TORN_RECORDS_TOTAL,
            "Spool records skipped at replay because they were torn (crash mid-write).",
        );
        d(
            HTTP_CONNECTION_CAP_REACHED_TOTAL,
            "Times a listener stopped accepting because it held its connection cap, by listener.",
        );
        d(
            HTTP_CONNECTIONS_TIMED_OUT_TOTAL,
            "Connections closed for sending no request head in time or idling, by phase.",
        );
        d(
            HTTP_BODY_BUDGET_EXHAUSTED_TOTAL,
            "Requests answered 503 because REACHLY_BODY_BUDGET_BYTES of bodies were already buffered.",
        );
        d(
            PARTITIONS_ARCHIVED_TOTAL,
            "Day partitions archived before their drop by maintenance, by outcome (ok, error: the partition stays).",
        );
        d(
            PARTITION_MAINTENANCE_TOTAL,
            "Partition maintenance rounds, by outcome (ok, skipped: another instance ran it, error).",
        );
        let g = |name: &'static str, help: &'static str| {
            self.recorder.describe_gauge(name.into(), None, help.into());
        };
        g(
            BUILD_INFO,
            "Always 1; the version label is the running build's.",
        );
        g(
            EMAIL_EVENTS_BYTES,
            "Bytes of email_events partitions (heap, indexes, TOAST), by age bucket; sampled every minute.",
        );
        g(
            TABLE_BYTES,
            "Bytes of campaign_messages, contacts and webhook_dead_letters (with indexes), by table.",
        );
        g(
            OLDEST_PARTITION_AGE_SECONDS,
            "Age of the oldest day partition of email_events (steady near the retention when maintenance works).",
        );
        g(
            DATABASE_BYTES,
            "Size of the whole database (pg_database_size).",
        );
        g(HTTP_CONNECTIONS, "Open connections, by listener.");
        g(
            HTTP_BODY_BYTES_HELD,
            "Bytes of request bodies held in memory now (taken from REACHLY_BODY_BUDGET_BYTES).",
        );
        g(
            HTTP_BODY_BUDGET_BYTES,
            "Bound of the request-body bytes held in memory at once (REACHLY_BODY_BUDGET_BYTES).",
        );
        g(
            HTTP_CONNECTIONS_MAX,
            "Connection cap, by listener (the public one fitted to the descriptor limit).",
        );
        g(
            DATABASE_DISK_BYTES,
            "REACHLY_DATABASE_DISK_BYTES: the database disk's size, for the disk-full alerts.",
        );
        g(
            LAST_FLUSH_TIMESTAMP_SECONDS,
            "Unix time of the last batch committed by a writer or the replayer (0: none yet).",
        );
        g(
            DATABASE_UP,
            "1 if the database answered the last probe and the last write did not fail, else 0.",
        );
        g(
            DB_POOL_CONNECTIONS,
            "Connections of this instance's pool, by state (in_use, idle).",
        );
        g(
            DB_POOL_MAX_CONNECTIONS,
            "Size bound of this instance's pool (REACHLY_DB_POOL_SIZE).",
        );
        g(DB_POOL_WAITING, "Tasks waiting for a pooled connection.");
        g(
            BUFFER_CAPACITY_EVENTS,
            "Bound of the in-memory buffer (REACHLY_BUFFER_MAX_EVENTS).",
        );
        g(
            BUFFER_CAPACITY_BYTES,
            "Bound of the in-memory buffer's estimated memory (REACHLY_BUFFER_MAX_BYTES).",
        );
        g(
            SPOOL_CAPACITY_BYTES,
            "Bound of the on-disk spool (REACHLY_SPOOL_MAX_BYTES).",
        );
        g(
            BUFFER_OLDEST_EVENT_AGE_SECONDS,
            "Age of the oldest event in memory not yet committed, since it was accepted (0: none).",
        );
        g(
            PARTITION_HORIZON_TIMESTAMP_SECONDS,
            "Unix time up to which email_events has daily partitions (the end of the last one; 0: unknown).",
        );
        self.recorder.describe_gauge(
            BUFFER_EVENTS.into(),
            None,
            "Events held in memory awaiting a write.".into(),
        );
        self.recorder.describe_gauge(
            BUFFER_BYTES.into(),
            None,
            "Estimated bytes of memory the events held in memory awaiting a write take.".into(),
        );
        self.recorder.describe_gauge(
            SPOOL_BYTES.into(),
            None,
            "Bytes in the on-disk spool.".into(),
        );
        self.recorder.describe_histogram(
            HTTP_REQUEST_DURATION_SECONDS.into(),
            Some(metrics::Unit::Seconds),
            "Time to answer an HTTP request, by route name.".into(),
        );
        self.recorder.describe_histogram(
            FLUSH_DURATION_SECONDS.into(),
            Some(metrics::Unit::Seconds),
            "Time to write one batch (one transaction).".into(),
        );
        self.recorder.describe_histogram(
            FLUSH_BATCH_SIZE.into(),
            None,
            "Events in a written batch.".into(),
        );
    }

    /// Prometheus text exposition of this app's metrics, then this process's own
    /// (CPU, memory, file descriptors, threads, start time).
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        process::render(&mut text);
        text
    }

    /// Sets a gauge (one without labels, or with the given ones).
    pub fn set_gauge(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.gauge(name, labels).set(value);
    }

    /// Drains histogram buffers; run on a timer (render-only exporters need it).
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    pub fn http_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        let cached = self
            .hot
            .http
            .read()
            .ok()
            .and_then(|m| m.get(&(route, status)).cloned());
        let (counter, histogram) = cached.unwrap_or_else(|| {
            let pair = (
                self.counter(
                    HTTP_REQUESTS_TOTAL,
                    &[("route", route), ("status", &status.to_string())],
                ),
                self.histogram(HTTP_REQUEST_DURATION_SECONDS, &[("route", route)]),
            );
            if let Ok(mut m) = self.hot.http.write() {
                m.insert((route, status), pair.clone());
            }
            pair
        });
        counter.increment(1);
        histogram.record(elapsed.as_secs_f64());
    }

    /// `reachly_events_received_total{type, source}`.
    pub fn event_received(&self, event_type: &'static str, source: &'static str, n: u64) {
        let cached = self
            .hot
            .received
            .read()
            .ok()
            .and_then(|m| m.get(&(event_type, source)).cloned());
        let counter = cached.unwrap_or_else(|| {
            let c = self.counter(
                EVENTS_RECEIVED_TOTAL,
                &[("type", event_type), ("source", source)],
            );
            if let Ok(mut m) = self.hot.received.write() {
                m.insert((event_type, source), c.clone());
            }
            c
        });
        counter.increment(n);
    }

    pub fn db_error(&self, operation: &'static str) {
        self.counter(DB_ERRORS_TOTAL, &[("operation", operation)])
            .increment(1);
    }

    pub fn dropped(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.counter(EVENTS_DROPPED_TOTAL, &[("reason", reason)])
                .increment(n);
        }
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_app_renders_only_its_own_counters_with_prefix_and_buckets() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.http_request("pixel", 200, Duration::from_millis(2));
        a.run_upkeep();
        let text = a.render();
        assert!(
            text.contains(r#"reachly_http_requests_total{route="pixel",status="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("reachly_http_request_duration_seconds_bucket"),
            "histogram, not summary: {text}"
        );
        assert!(!b.render().contains("route=\"pixel\""));
    }

    #[test]
    fn known_label_sets_are_present_at_zero_before_anything_happens() {
        let text = Metrics::new().render();
        for sample in [
            r#"reachly_events_dropped_total{reason="spool_full"} 0"#,
            r#"reachly_webhook_auth_failures_total{provider="resend"} 0"#,
            r#"reachly_invalid_tokens_total{purpose="unsubscribe"} 0"#,
            r#"reachly_events_written_total{type="opened"} 0"#,
            "reachly_spool_torn_records_total 0",
            "reachly_build_info{version=\"",
        ] {
            assert!(text.contains(sample), "{sample} missing from:\n{text}");
        }
    }

    #[test]
    fn every_family_has_help_and_type() {
        let text = Metrics::new().render();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(families.len() > 20, "{text}");
        for f in families {
            assert!(text.contains(&format!("# HELP {f} ")), "{f} has no HELP");
        }
    }
}
