//! The application: [`App`] wires the database pool, migrations, the pipeline, partition
//! maintenance and both listeners into one [`AppState`], and runs them until a shutdown
//! future resolves. `serve` (main), `dev` and the tests all go through [`prepare`] (the
//! checks that exit 64) and [`App::build`] with already-bound listeners (tests bind port 0).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::http::state::AppState;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::server::{self, Listener};
use crate::webhooks::{self, HttpsGet};

/// What is built from the configuration before anything binds; a failure here is a
/// configuration error (`main` prints it as one line and exits 64).
pub struct Prepared {
    /// The configured ESP providers (a secret that does not parse fails here).
    pub webhooks: webhooks::Registry,
}

/// Checks what only a subsystem can check (the database CA file, each webhook secret) and
/// builds the provider registry. `https` is the outbound HTTPS used by SNS (certificates,
/// subscription confirmation): [`webhooks::default_https_get`] in production, a seam in tests.
pub fn prepare(config: &Config, https: Arc<dyn HttpsGet>) -> Result<Prepared, String> {
    db::tls::connector(config.db.ca_file.as_deref()).map_err(|e| format!("{e:#}"))?;
    let webhooks = webhooks::Registry::from_config(&config.webhooks, https)?;
    Ok(Prepared { webhooks })
}

/// [`prepare`] with production outbound HTTPS.
pub fn prepare_default(config: &Config) -> Result<Prepared, String> {
    let https = webhooks::default_https_get().map_err(|e| format!("{e:#}"))?;
    prepare(config, https)
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
        prepared: Prepared,
    ) -> anyhow::Result<App> {
        let metrics = Metrics::new();
        let tls = db::tls::connector(config.db.ca_file.as_deref())?;
        let url = config.db.url.expose();
        // A bus edge never touches the database (its pool stays empty).
        let edge = config.bus.enabled() && !config.bus.consumes();
        if config.db.migrate_on_start && !edge {
            match db::connect_with(url, tls.clone()).await {
                Ok(_) => {
                    db::migrate::run_with(url, tls.clone()).await?;
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "database unreachable at start; serving and spooling until it returns"
                ),
            }
        }
        let pool = db::pool(&config.db, tls)?;
        let mut partitions_ready = false;
        if edge {
            partitions_ready = true; // not an edge's job
        } else if let Ok(mut client) = pool.get().await {
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
                    error = format!("{e:#}"),
                    "partition maintenance at start failed; retrying in the background"
                ),
            }
        }
        let bus = match config.bus.enabled() {
            true => Some(crate::pipeline::bus::Bus::connect(&config.bus).await?),
            false => None,
        };
        let pipeline =
            Pipeline::start_with_bus(&config.pipeline, pool.clone(), metrics.clone(), bus)?;
        let state = Arc::new(AppState::new(
            config,
            pool.clone(),
            pipeline.ingest.clone(),
            metrics.clone(),
            prepared.webhooks,
        ));

        let stop_background = CancellationToken::new();
        let mut background = Vec::new();
        if !edge {
            background.push(tokio::spawn(db::partitions::run_periodically(
                pool,
                state.config.partitions.clone(),
                metrics.clone(),
                stop_background.clone(),
                partitions_ready,
            )));
        }
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
        let timeout = self.state.config.server.shutdown_timeout;
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
        self.state.begin_shutdown();
        stop.cancel();
        public.await.context("public listener task")?;
        admin.await.context("admin listener task")?;
        self.pipeline
            .shutdown(self.state.config.server.shutdown_timeout)
            .await;
        self.stop_background.cancel();
        for h in self.background {
            let _ = h.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}
