//! The accept loops of the public and admin listeners: hyper-util's auto (HTTP/1.1 + h2)
//! builder, a per-request timeout, route-name metrics, graceful shutdown (stop accepting,
//! let in-flight requests finish within a deadline), and the defences against connections
//! that hold a socket without asking for anything.
//!
//! Connection policy (docs/security.md gives the threat model):
//! - **Cap.** Each listener holds at most its cap of connections (`REACHLY_MAX_CONNECTIONS`,
//!   `REACHLY_ADMIN_MAX_CONNECTIONS`). At the cap the loop stops accepting: new connections
//!   wait in the kernel's backlog (costing no descriptor of ours) until one closes, and
//!   `reachly_http_connection_cap_reached_total` counts each time that happened. The public
//!   cap is lowered at start to what the process's descriptor limit leaves after the admin
//!   cap, the database pool and a reserve, so the process never meets `EMFILE` and the
//!   admin listener always has descriptors of its own.
//! - **First request.** A connection must deliver a complete request head within
//!   `REACHLY_HEADER_TIMEOUT_MS` of being accepted, whatever the protocol: hyper-util's
//!   protocol sniff and the h2 preface have no timer of their own, and hyper's
//!   header-read timeout only starts once HTTP/1 is chosen. Past it the socket is closed.
//! - **Idle.** A connection with no request in flight for `REACHLY_IDLE_TIMEOUT_MS` is shut
//!   down gracefully (h2: GOAWAY; HTTP/1: closed between requests; hyper's header-read
//!   timeout already closes an idle HTTP/1 keep-alive sooner), and dropped if it has not
//!   finished `REACHLY_HEADER_TIMEOUT_MS` later. h2 PINGs keep-alive probes find dead
//!   peers; they do not keep an idle connection open.
//! - **Head and read buffer.** An HTTP/1 connection's read buffer holds at most
//!   [`MAX_READ_BUFFER_BYTES`]: a request head that does not fit is answered 431 and the
//!   connection closed, and a body is read in pieces of at most that size (each taken into
//!   the body budget as it arrives). h2 heads have the same bound
//!   (`SETTINGS_MAX_HEADER_LIST_SIZE`). hyper's HTTP/1 default (~400 kB) lets every
//!   connection hold ~400 kB that no budget counts: with the cap's 10,000 connections,
//!   gigabytes. (hyper-util's auto builder has no separate head limit, so the buffer's bound
//!   is the head's.)
//! - **No per-IP limit.** The peer of the public listener is usually a load balancer, a
//!   mail provider's image proxy or an ESP: a few addresses that legitimately carry
//!   thousands of recipients' connections. Limiting per socket peer would refuse exactly
//!   those; per-client limits belong in front of the service, where the client is known.
//!   The timeouts above bound what any one connection can hold, whoever opened it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::reject::Reject;
use crate::http::routes::Route;
use crate::http::state::AppState;
use crate::http::{Req, Resp};
use crate::metrics::{
    HTTP_CONNECTION_CAP_REACHED_TOTAL, HTTP_CONNECTIONS, HTTP_CONNECTIONS_MAX,
    HTTP_CONNECTIONS_TIMED_OUT_TOTAL,
};

/// Which router a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

impl Listener {
    /// The `listener` label.
    pub fn label(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Admin => "admin",
        }
    }
}

/// Descriptors kept out of the public cap beyond the admin cap and the database pool: the
/// spool, stdio, epoll, outbound HTTPS (SNS certificates), migrations, the listeners.
const FD_RESERVE: usize = 64;
/// Concurrent h2 streams per connection (hyper's default is 200).
const H2_MAX_STREAMS: u32 = 100;

/// Largest HTTP/1 read buffer, and so the largest request head taken. The longest
/// legitimate head is a click: its token carries the destination URL (up to
/// `token::MAX_URL_BYTES`, 4 kB, so a path of ~5.5 kB), beside a browser's headers and
/// whatever cookies a customer's tracking domain collects; 32 kB is what nginx allows by
/// default (4 buffers of 8 kB), and twice hyper's h2 default for a header list.
pub const MAX_READ_BUFFER_BYTES: usize = 32 << 10;

/// The connection cap of a listener: the configured one, and for the public listener no
/// more than the descriptor limit leaves (see the module doc).
pub fn connection_cap(kind: Listener, state: &AppState) -> usize {
    let server = &state.config.server;
    match kind {
        Listener::Admin => server.admin_max_connections,
        Listener::Public => {
            let configured = server.max_connections;
            let Some(limit) = open_files_limit() else {
                return configured;
            };
            let reserved = server.admin_max_connections
                + state.config.db.pool_size
                + state.config.pipeline.writers
                + FD_RESERVE;
            let fits = limit.saturating_sub(reserved).max(1);
            if fits < configured {
                tracing::warn!(
                    configured,
                    open_files_limit = limit,
                    cap = fits,
                    "REACHLY_MAX_CONNECTIONS lowered to fit the descriptor limit (raise `ulimit -n` for more)"
                );
            }
            configured.min(fits)
        }
    }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&text)
}

fn parse_open_files_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
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
    let server = &state.config.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        .max_buf_size(MAX_READ_BUFFER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_READ_BUFFER_BYTES as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Duration::from_secs(30));
    let limits = ConnLimits {
        first_request: server.header_timeout,
        idle: server.idle_timeout,
        grace: server.header_timeout,
    };

    let cap = connection_cap(kind, &state);
    let label = kind.label();
    let metrics = &state.metrics;
    metrics
        .gauge(HTTP_CONNECTIONS_MAX, &[("listener", label)])
        .set(cap as f64);
    let open = metrics.gauge(HTTP_CONNECTIONS, &[("listener", label)]);
    open.set(0.0);
    let cap_reached = metrics.counter(HTTP_CONNECTION_CAP_REACHED_TOTAL, &[("listener", label)]);
    let slots = Arc::new(Semaphore::new(cap));
    let tracker = TaskTracker::new();

    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                cap_reached.increment(1);
                tracing::debug!(listener = label, cap, "connection cap reached");
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends (the cap should prevent them): back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let svc = {
            let (state, activity) = (state.clone(), activity.clone());
            service_fn(move |req| {
                let busy = activity.begin();
                let state = state.clone();
                async move {
                    let resp = dispatch(req, kind, peer, state).await;
                    drop(busy);
                    resp
                }
            })
        };
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let (stop, open, metrics) = (stop.clone(), open.clone(), state.metrics.clone());
        open.increment(1.0);
        tracker.spawn(async move {
            let outcome = drive(conn, |c| c.graceful_shutdown(), &activity, limits, &stop).await;
            if let Some(phase) = outcome.timed_out() {
                metrics
                    .counter(
                        HTTP_CONNECTIONS_TIMED_OUT_TOTAL,
                        &[("listener", label), ("phase", phase)],
                    )
                    .increment(1);
            }
            open.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            ?kind,
            "in-flight requests did not finish within the shutdown timeout"
        );
    }
}

/// The timers of one connection.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    /// Accept to the first complete request head.
    first_request: Duration,
    /// No request in flight for this long: shut down gracefully.
    idle: Duration,
    /// A graceful idle shutdown that has not finished after this is dropped.
    grace: Duration,
}

/// What one connection's requests are doing, as its watchdog sees it.
#[derive(Debug)]
struct Activity {
    /// Requests whose head has arrived and whose response is not yet handed back.
    in_flight: AtomicUsize,
    /// Requests begun so far.
    begun: AtomicU64,
    /// When the last request ended (or the connection was accepted).
    last: std::sync::Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            last: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.begun.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn last(&self) -> Instant {
        self.last
            .lock()
            .map(|l| *l)
            .unwrap_or_else(|p| *p.into_inner())
    }
}

/// One request in flight; its drop (response handed back, or the request cancelled) marks
/// the connection's last activity.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.last.lock() {
            *l = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The protocol ended it (client closed, error, graceful shutdown finished).
    Ended,
    /// No complete request head within the first-request timeout.
    NoRequest,
    /// Idle past the idle timeout.
    Idle,
}

impl Outcome {
    fn timed_out(self) -> Option<&'static str> {
        match self {
            Outcome::Ended => None,
            Outcome::NoRequest => Some("first_request"),
            Outcome::Idle => Some("idle"),
        }
    }
}

/// Drives one connection under its watchdog: one timer, re-armed to the next deadline that
/// matters (so an idle connection wakes about once per idle timeout, not on a tick).
/// `shutdown` starts the connection's graceful shutdown (hyper's `graceful_shutdown`).
async fn drive<C, F>(
    conn: C,
    shutdown: F,
    activity: &Activity,
    limits: ConnLimits,
    stop: &CancellationToken,
) -> Outcome
where
    C: std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
    F: Fn(std::pin::Pin<&mut C>),
{
    let mut conn = pin!(conn);
    let accepted = Instant::now();
    let mut idle_since: Option<Instant> = None;
    let mut stopping = false;
    let timer = tokio::time::sleep_until(accepted + limits.first_request);
    let mut timer = pin!(timer);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if idle_since.is_some() {
                    return Outcome::Idle;
                }
                let Err(e) = r else { return Outcome::Ended };
                tracing::debug!(error = %e, "connection ended with an error");
                // hyper's own HTTP/1 header-read timer got there first.
                let header_timeout = e
                    .downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout);
                return match (header_timeout, activity.begun.load(Ordering::Acquire)) {
                    (false, _) => Outcome::Ended,
                    (true, 0) => Outcome::NoRequest,
                    (true, _) => Outcome::Idle,
                };
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                shutdown(conn.as_mut());
            }
            _ = timer.as_mut() => {
                let now = Instant::now();
                if let Some(since) = idle_since {
                    if now >= since + limits.grace {
                        return Outcome::Idle;
                    }
                    timer.as_mut().reset(since + limits.grace);
                    continue;
                }
                if activity.begun.load(Ordering::Acquire) == 0 {
                    return Outcome::NoRequest;
                }
                if activity.in_flight.load(Ordering::Acquire) > 0 {
                    // Requests bound themselves (body and request timeouts); look again later.
                    timer.as_mut().reset(now + limits.idle);
                    continue;
                }
                let due = activity.last() + limits.idle;
                if now >= due {
                    idle_since = Some(now);
                    shutdown(conn.as_mut());
                    timer.as_mut().reset(now + limits.grace);
                } else {
                    timer.as_mut().reset(due);
                }
            }
        }
    }
}

async fn dispatch(
    req: Req,
    kind: Listener,
    peer: SocketAddr,
    state: Arc<AppState>,
) -> Result<Resp, Infallible> {
    let started = std::time::Instant::now();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_descriptor_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             127431               127431               processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files_limit(text), Some(1024));
        assert_eq!(
            parse_open_files_limit("Max open files  unlimited unlimited files"),
            None
        );
        assert_eq!(parse_open_files_limit(""), None);
    }
}
