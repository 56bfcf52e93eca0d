//! The admin listener's handlers: `/metrics` (Prometheus text), `/healthz` (liveness) and
//! `/readyz` (readiness), with the meanings SPEC.md gives them:
//!
//! | probe | 200 means | 503 when |
//! | --- | --- | --- |
//! | `/healthz` | the event loop answers and the writers make progress | writers showed no life for [`WRITER_STALL`] while events wait in memory |
//! | `/readyz` | this instance can accept events and make them durable, in the database, in memory or in the spool | starting (migrations), shutting down, writers stalled for [`READY_STALL`] with events waiting, or no room left (spool full while the database is down or the memory buffer is above its high-water mark) |
//!
//! A database outage alone is *not* unready: clicks still redirect, pixels still answer,
//! webhooks and unsubscribes are fsync'd to the spool. Taking every replica out of the
//! Service then would break every link. Idle writers (nothing to write) beat every second,
//! so they are alive. While the app is being built (migrations can take minutes) the
//! listener is already bound and answers through [`starting`].

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

/// Writers with events waiting and no sign of life for this long: the process is stuck
/// (liveness fails, the orchestrator restarts it; the events wait in memory or the spool).
pub const WRITER_STALL: Duration = Duration::from_secs(60);
/// ... for this long: take the instance out of rotation before liveness gives up on it.
/// Longer than a writer's worst quiet stretch while the database is down (a 5 s connect
/// timeout plus a 5 s backoff).
pub const READY_STALL: Duration = Duration::from_secs(30);
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

/// Liveness.
pub fn healthz(state: &AppState) -> Resp {
    let age = state.ingest.heartbeat_age();
    let waiting = state.ingest.buffered();
    if age > WRITER_STALL && waiting > 0 {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "writers made no progress for {}s with {waiting} events waiting\n",
                age.as_secs()
            ),
        );
    }
    text(StatusCode::OK, "ok\n")
}

/// Readiness. Reads only in-process state: it never waits on the database.
pub async fn readyz(state: &AppState) -> Resp {
    if state.shutting_down() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let age = state.ingest.heartbeat_age();
    let waiting = state.ingest.buffered();
    if age > READY_STALL && waiting > 0 {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "writers stalled for {}s with {waiting} events waiting\n",
                age.as_secs()
            ),
        );
    }
    // With a bus, events go to the bus, not to the database: readiness is the bus's.
    if let Some(bus) = state.ingest.bus_ready() {
        if let Err(e) = bus {
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
        }
        // An edge taking Mailgun webhooks needs its signature-token bucket: until it is
        // open they would be answered 503, so a load balancer should not send them yet.
        if let Some(tokens) = &state.bus_replay
            && state.config.webhooks.mailgun_signing_key.is_some()
            && !tokens.is_open()
        {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the signature-token bucket (Mailgun replay protection) is not open yet\n",
            );
        }
        return text(StatusCode::OK, "ready\n");
    }
    let spool = state.ingest.spool_bytes();
    let spool_max = state.config.pipeline.spool_max_bytes;
    let spool_full = spool >= spool_max;
    let db_up = state.ingest.db_healthy();
    if spool_full && (!db_up || state.ingest.above_high_water()) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no room: spool full ({spool} of {spool_max} bytes), {}\n",
                if db_up {
                    "memory buffer above its high-water mark"
                } else {
                    "database unavailable"
                }
            ),
        );
    }
    if !db_up {
        return text(
            StatusCode::OK,
            format!("ready (database unavailable: spooling, {spool} of {spool_max} bytes)\n"),
        );
    }
    text(StatusCode::OK, "ready\n")
}

/// The admin listener while the app is being built: alive, not ready.
pub fn starting(path: &str) -> Resp {
    match path {
        "/healthz" => text(StatusCode::OK, "ok (starting)\n"),
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting (migrations, schema check, partitions)\n",
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
    set(m::HTTP_BODY_BYTES_HELD, state.body_budget.held() as f64);
    set(
        m::HTTP_BODY_BUDGET_BYTES,
        state.body_budget.capacity() as f64,
    );
    let ingest = &state.ingest;
    set(m::BUFFER_CAPACITY_EVENTS, ingest.capacity() as f64);
    set(m::BUFFER_CAPACITY_BYTES, ingest.capacity_bytes() as f64);
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
