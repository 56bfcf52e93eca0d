//! reachly-ingest: the event ingestion and tracking service of Reachly.
//!
//! Components, in the order a request meets them:
//! - [`server`]: accept loops of the public and admin listeners (hyper 1, graceful drain);
//! - [`http`]: route table and handlers: open pixel, click redirect, one-click unsubscribe
//!   ([`http::tracking`]), admin endpoints ([`http::admin`]);
//! - [`webhooks`]: one module per ESP, behind the `Provider` trait;
//! - [`token`]: tracking tokens v1 (mint, verify);
//! - [`machine`]: machine-traffic detection;
//! - [`event`]: the event model and its COPY layout;
//! - [`pipeline`]: in-memory buffer, batch writers, status merge, spool and replay;
//! - [`db`]: pool, migrations, partition maintenance;
//! - [`metrics`]: metric names and the per-app Prometheus recorder;
//! - [`config`]: flags and environment;
//! - [`app`]: wiring and lifecycle; [`dev`] and [`pgcluster`]: the embedded local database;
//! - [`healthcheck`]: the `healthcheck` subcommand (the container image's HEALTHCHECK).
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod db;
pub mod dev;
pub mod event;
pub mod healthcheck;
pub mod http;
pub mod machine;
pub mod metrics;
pub mod pgcluster;
pub mod pgerror;
pub mod pipeline;
pub mod server;
pub mod shutdown;
pub mod token;
pub mod webhooks;

pub use app::App;
pub use config::Config;
pub use http::state::AppState;

/// Sets up `tracing`: human-readable by default, JSON lines with `REACHLY_LOG_FORMAT=json`;
/// the level comes from `RUST_LOG` (default `info`).
///
/// Whatever `RUST_LOG` says, other crates' events below INFO are never written: their
/// debug and trace output carries data this service promises never to log
/// (`tokio_postgres::query` logs every bound parameter: addresses, bounce texts; h2 and
/// hyper trace frames and headers, `Authorization` included). Our own code's debug and
/// trace events stay available; they name no address, secret or client IP
/// (`tests/api/logs.rs` runs the binary at `RUST_LOG=trace` to keep it so).
pub fn init_tracing(format: crate::config::LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::filter::{EnvFilter, FilterExt as _, filter_fn};
    use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
    use tracing_subscriber::util::SubscriberInitExt as _;
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = env.and(filter_fn(|meta| may_log(meta.target(), *meta.level())));
    // Logs go to stderr (stdout carries `dev`'s banner and `token`'s output). `json()` must
    // come before `with_writer`: it resets the writer.
    let layer = match format {
        crate::config::LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
        crate::config::LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

/// Whether an event of `target` at `level` may be written at all (before `RUST_LOG`).
pub fn may_log(target: &str, level: tracing::Level) -> bool {
    let ours = target == "reachly_ingest" || target.starts_with("reachly_ingest::");
    ours || level <= tracing::Level::INFO
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    #[test]
    fn other_crates_are_capped_at_info_and_ours_are_not() {
        assert!(!super::may_log("tokio_postgres::query", Level::DEBUG));
        assert!(!super::may_log("h2::codec::framed_read", Level::TRACE));
        assert!(super::may_log("tokio_postgres::connection", Level::INFO));
        assert!(super::may_log("hyper::proto", Level::WARN));
        assert!(super::may_log("reachly_ingest::server", Level::TRACE));
        assert!(!super::may_log("reachly_ingest_evil", Level::DEBUG));
    }
}
