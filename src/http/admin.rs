//! The admin listener's handlers: `/metrics` (Prometheus text), `/healthz` (the process and
//! its writers are alive) and `/readyz` (the database answers and the buffer is below its
//! high-water mark, so a load balancer can steer traffic away before events spill to disk).
//!
//! Before rendering `/metrics`, the gauges whose data lives elsewhere are set from it: pool
//! status, buffer and spool bounds, the age of the oldest uncommitted event, the last commit
//! time, and `reachly_database_up` (a `SELECT 1` with a short timeout, and the writers' last
//! outcome).

use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use super::state::AppState;
use super::{Resp, text};
use crate::metrics as m;

/// A writer that has not shown life for this long is stuck.
const WRITER_STALL: Duration = Duration::from_secs(60);
const READINESS_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Shorter than any sane scrape timeout: a scrape must not fail because the database hangs.
const SCRAPE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn metrics(state: &AppState) -> Resp {
    refresh_gauges(state).await;
    let mut r = text(StatusCode::OK, state.metrics.render());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

pub fn healthz(state: &AppState) -> Resp {
    let age = state.ingest.heartbeat_age();
    if age > WRITER_STALL {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("writers stalled for {}s\n", age.as_secs()),
        );
    }
    text(StatusCode::OK, "ok\n")
}

pub async fn readyz(state: &AppState) -> Resp {
    if state.shutting_down() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if state.ingest.above_high_water() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "buffer above high-water mark ({} events)\n",
                state.ingest.buffered()
            ),
        );
    }
    match tokio::time::timeout(READINESS_QUERY_TIMEOUT, probe_database(state)).await {
        Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "database did not answer in time\n",
        ),
    }
}

async fn probe_database(state: &AppState) -> Result<(), String> {
    let client = state.pool.get().await.map_err(|e| e.to_string())?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Sets the gauges that are read from other components at scrape time.
async fn refresh_gauges(state: &AppState) {
    let metrics = &state.metrics;
    let set = |name: &'static str, v: f64| metrics.set_gauge(name, &[], v);
    let pool = state.pool.status();
    let in_use = pool.size.saturating_sub(pool.available);
    metrics.set_gauge(
        m::DB_POOL_CONNECTIONS,
        &[("state", "in_use")],
        in_use as f64,
    );
    metrics.set_gauge(
        m::DB_POOL_CONNECTIONS,
        &[("state", "idle")],
        pool.available as f64,
    );
    set(m::DB_POOL_MAX_CONNECTIONS, pool.max_size as f64);
    set(m::DB_POOL_WAITING, pool.waiting as f64);
    let ingest = &state.ingest;
    set(m::BUFFER_CAPACITY_EVENTS, ingest.capacity() as f64);
    set(
        m::SPOOL_CAPACITY_BYTES,
        ingest.spool_capacity_bytes() as f64,
    );
    set(
        m::BUFFER_OLDEST_EVENT_AGE_SECONDS,
        ingest.oldest_buffered_age().as_secs_f64(),
    );
    set(
        m::LAST_FLUSH_TIMESTAMP_SECONDS,
        ingest.last_flush_unix_ms().unwrap_or(0) as f64 / 1000.0,
    );
    let probed = matches!(
        tokio::time::timeout(SCRAPE_PROBE_TIMEOUT, probe_database(state)).await,
        Ok(Ok(()))
    );
    let up = probed && ingest.db_healthy();
    set(m::DATABASE_UP, if up { 1.0 } else { 0.0 });
}
