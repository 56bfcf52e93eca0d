//! The application: [`AppState`] shared by every handler, and [`App`], which wires the
//! database pool, migrations, the pipeline, partition maintenance and both listeners, and
//! runs them until a shutdown future resolves. `serve` (main), `dev` and the tests all go
//! through [`App::build`] with already-bound listeners (tests bind port 0).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::machine::MachineDetector;
use crate::metrics::Metrics;
use crate::pipeline::{Ingest, Pipeline};
use crate::server::{self, Listener};
use crate::webhooks::{self, HttpsGet};

/// Everything a handler may need, shared behind one `Arc`.
pub struct AppState {
    pub config: Config,
    pub pool: deadpool_postgres::Pool,
    pub ingest: Ingest,
    pub metrics: Metrics,
    pub machine: MachineDetector,
    pub webhooks: webhooks::Registry,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Test seams and injected parts; production uses `AppOptions::default()`.
#[derive(Default)]
pub struct AppOptions {
    /// Outbound HTTPS for SNS (certificates, subscription confirmation).
    pub https_get: Option<Arc<dyn HttpsGet>>,
    /// Extra or replacement webhook providers (tests).
    pub webhooks: Option<webhooks::Registry>,
}

pub struct App {
    state: Arc<AppState>,
    public: TcpListener,
    admin: TcpListener,
    pipeline: Pipeline,
    background: Vec<JoinHandle<()>>,
    stop_background: CancellationToken,
}

impl App {
    /// Connects, migrates (if configured), checks the schema, opens the spool and starts the
    /// writers. A database that is unreachable at start is not fatal: the service serves
    /// and spools until it returns. A failing migration is fatal.
    pub async fn build(
        config: Config,
        public: TcpListener,
        admin: TcpListener,
        opts: AppOptions,
    ) -> anyhow::Result<App> {
        let metrics = Metrics::new();
        if config.db.migrate_on_start {
            match db::connect_with(config.db.url.expose(), config.db.tls.clone()).await {
                Ok(_) => {
                    db::migrate::run_with(config.db.url.expose(), config.db.tls.clone()).await?;
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "database unreachable at start; serving and spooling until it returns"
                ),
            }
        }
        let pool = db::pool(&config.db)?;
        let mut partitions_ready = false;
        if let Ok(mut client) = pool.get().await {
            db::check_schema(&client).await?;
            let p = &config.partitions;
            match db::partitions::maintain(
                &mut client,
                chrono::Utc::now().date_naive(),
                p.premake_days,
                p.retention_days,
            )
            .await
            {
                Ok(r) => partitions_ready = !r.skipped,
                Err(e) => tracing::warn!(
                    error = db::describe_error(e.as_ref()),
                    sqlstate = db::sqlstate(e.as_ref()).unwrap_or_default(),
                    "partition maintenance at start failed; retrying in the background"
                ),
            }
        }
        let pipeline = Pipeline::start(&config.pipeline, pool.clone(), metrics.clone())?;
        let https: Arc<dyn HttpsGet> = match opts.https_get {
            Some(h) => h,
            None => webhooks::default_https_get()?,
        };
        let mut registry =
            webhooks::Registry::from_config(&config.webhooks, https).map_err(anyhow::Error::msg)?;
        if let Some(extra) = opts.webhooks {
            registry.extend(extra);
        }
        let state = Arc::new(AppState {
            machine: MachineDetector::new(&config.tracking.machine_user_agents),
            webhooks: registry,
            ingest: pipeline.ingest.clone(),
            pool: pool.clone(),
            metrics: metrics.clone(),
            shutting_down: AtomicBool::new(false),
            config,
        });

        let stop_background = CancellationToken::new();
        let mut background = Vec::new();
        background.push(tokio::spawn(db::partitions::run_periodically(
            pool,
            state.config.partitions.clone(),
            metrics.clone(),
            stop_background.clone(),
            partitions_ready,
        )));
        let upkeep_metrics = metrics.clone();
        let upkeep_stop = stop_background.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = upkeep_stop.cancelled() => return,
                    _ = tick.tick() => upkeep_metrics.run_upkeep(),
                }
            }
        }));
        Ok(App {
            state,
            public,
            admin,
            pipeline,
            background,
            stop_background,
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then: stop accepting, finish requests in flight,
    /// flush or spool every buffered event, stop background work.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let timeout = self.state.config.http.shutdown_timeout;
        tracing::info!(public = %self.public_addr(), admin = %self.admin_addr(), "serving");
        let public = tokio::spawn(server::run(
            self.public,
            Listener::Public,
            self.state.clone(),
            stop.clone(),
            timeout,
        ));
        let admin = tokio::spawn(server::run(
            self.admin,
            Listener::Admin,
            self.state.clone(),
            stop.clone(),
            timeout,
        ));
        shutdown.await;
        tracing::info!("shutdown requested: draining");
        self.state.shutting_down.store(true, Ordering::Relaxed);
        stop.cancel();
        public.await.context("public listener task")?;
        admin.await.context("admin listener task")?;
        self.pipeline
            .shutdown(self.state.config.pipeline.shutdown_timeout)
            .await;
        self.stop_background.cancel();
        for h in self.background {
            let _ = h.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}
