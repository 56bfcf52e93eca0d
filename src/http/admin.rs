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

use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use super::state::AppState;
use super::{Resp, text};

/// Writers with events waiting and no sign of life for this long: the process is stuck
/// (liveness fails, the orchestrator restarts it; the events wait in memory or the spool).
pub const WRITER_STALL: Duration = Duration::from_secs(60);
/// ... for this long: take the instance out of rotation before liveness gives up on it.
/// Longer than a writer's worst quiet stretch while the database is down (a 5 s connect
/// timeout plus a 5 s backoff).
pub const READY_STALL: Duration = Duration::from_secs(30);

pub fn metrics(state: &AppState) -> Resp {
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
