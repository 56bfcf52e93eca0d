//! Metrics: the names (all `reachly_`-prefixed), their histogram buckets, and one
//! Prometheus recorder per running app. The recorder is *not* installed globally: every
//! component records through the [`Metrics`] handle it was given, so several apps (tests)
//! can run in one process without sharing counters, and `/metrics` renders exactly this
//! app's figures.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

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
pub const SPOOL_BYTES: &str = "reachly_spool_bytes";
pub const FLUSH_DURATION_SECONDS: &str = "reachly_flush_duration_seconds";
pub const FLUSH_BATCH_SIZE: &str = "reachly_flush_batch_size";
pub const DB_ERRORS_TOTAL: &str = "reachly_db_errors_total";
pub const INVALID_TOKENS_TOTAL: &str = "reachly_invalid_tokens_total";
pub const WEBHOOK_AUTH_FAILURES_TOTAL: &str = "reachly_webhook_auth_failures_total";
pub const PARTITION_MAINTENANCE_TOTAL: &str = "reachly_partition_maintenance_total";
pub const HTTP_CONNECTIONS: &str = "reachly_http_connections";
pub const HTTP_CONNECTIONS_MAX: &str = "reachly_http_connections_max";
pub const HTTP_CONNECTION_CAP_REACHED_TOTAL: &str = "reachly_http_connection_cap_reached_total";
pub const HTTP_CONNECTIONS_TIMED_OUT_TOTAL: &str = "reachly_http_connections_timed_out_total";
pub const HTTP_BODY_BUDGET_EXHAUSTED_TOTAL: &str = "reachly_http_body_budget_exhausted_total";

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
        m
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
            INVALID_TOKENS_TOTAL,
            "Tracking requests with a bad token, by expected purpose.",
        );
        d(
            WEBHOOK_AUTH_FAILURES_TOTAL,
            "Webhook requests refused for authentication, by provider.",
        );
        self.recorder.describe_gauge(
            BUFFER_EVENTS.into(),
            None,
            "Events held in memory awaiting a write.".into(),
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

    /// Prometheus text exposition of this app's metrics.
    pub fn render(&self) -> String {
        self.handle.render()
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
}
