//! The accept loops of the public and admin listeners: hyper-util's auto (HTTP/1.1 + h2)
//! builder with a header-read timeout, a per-request timeout, route-name metrics, and
//! graceful shutdown (stop accepting, let in-flight requests finish within a deadline).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::reject::Reject;
use crate::http::routes::Route;
use crate::http::state::AppState;
use crate::http::{Req, Resp};

/// Which router a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

/// Accepts connections until `stop` fires, then waits (at most `drain`) for the requests in
/// flight to finish.
pub async fn run(
    listener: TcpListener,
    kind: Listener,
    state: Arc<AppState>,
    stop: CancellationToken,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.server.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = service_fn(move |req| dispatch(req, kind, peer, state.clone()));
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?kind,
            "in-flight requests did not finish within the shutdown timeout"
        );
    }
}

async fn dispatch(
    req: Req,
    kind: Listener,
    peer: SocketAddr,
    state: Arc<AppState>,
) -> Result<Resp, Infallible> {
    let started = Instant::now();
    let route = match kind {
        Listener::Public => Route::public(req.method(), req.uri().path()),
        Listener::Admin => Route::admin(req.method(), req.uri().path()),
    };
    let name = route.name();
    let resp = if route.may_wait() {
        let fut = route.handle(req, peer, state.clone());
        match tokio::time::timeout(state.config.server.request_timeout, fut).await {
            Ok(resp) => resp,
            Err(_) => Reject::Timeout.into_response(),
        }
    } else {
        route.handle(req, peer, state.clone()).await
    };
    state
        .metrics
        .http_request(name, resp.status().as_u16(), started.elapsed());
    Ok(resp)
}
