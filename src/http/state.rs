//! [`AppState`]: everything a handler may need, shared behind one `Arc`. It lives here, in
//! the HTTP layer that reads it, so that `server` and `app` above import it and nothing
//! below knows it exists (the layer rule in the README).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Config;
use crate::machine::MachineDetector;
use crate::metrics::Metrics;
use crate::pipeline::Ingest;
use crate::webhooks;

pub struct AppState {
    pub config: Config,
    pub pool: deadpool_postgres::Pool,
    pub ingest: Ingest,
    pub metrics: Metrics,
    pub machine: MachineDetector,
    pub webhooks: webhooks::Registry,
    /// Request-body bytes all requests together may hold (`REACHLY_BODY_BUDGET_BYTES`).
    pub body_budget: super::BodyBudget,
    /// A bus edge's replay store (it has no database); `None`: the database's.
    pub bus_replay: Option<super::replay::BusReplayStore>,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(
        config: Config,
        pool: deadpool_postgres::Pool,
        ingest: Ingest,
        metrics: Metrics,
        webhooks: webhooks::Registry,
        machine: MachineDetector,
    ) -> AppState {
        AppState {
            machine,
            body_budget: super::BodyBudget::new(config.server.body_budget_bytes, &metrics),
            config,
            pool,
            ingest,
            metrics,
            webhooks,
            bus_replay: None,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Set once the drain starts: `/readyz` turns unready so load balancers move away.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}
