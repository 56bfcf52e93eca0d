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
pub fn init_tracing(format: crate::config::LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr (stdout carries `dev`'s banner and `token`'s output). `json()` must
    // come before `with_writer`: it resets the writer.
    let _ = match format {
        crate::config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter())
            .with_target(false)
            .with_writer(std::io::stderr)
            .try_init(),
        crate::config::LogFormat::Human => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
    };
}
