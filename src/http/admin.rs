//! The admin listener's handlers: `/metrics` (Prometheus text), `/healthz` (the process and
//! its writers are alive) and `/readyz` (the database answers and the buffer is below its
//! high-water mark, so a load balancer can steer traffic away before events spill to disk).

use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use super::state::AppState;
use super::{Resp, text};

/// A writer that has not shown life for this long is stuck.
const WRITER_STALL: Duration = Duration::from_secs(60);
const READINESS_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn metrics(state: &AppState) -> Resp {
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
    // With a bus, events go to the bus, not to the database: readiness is the bus's.
    if let Some(bus) = state.ingest.bus_ready() {
        return match bus {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
    }
    let probe = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(READINESS_QUERY_TIMEOUT, probe).await {
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
