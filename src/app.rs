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
use crate::machine::{MachineDetector, RelayRanges};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::server::{self, Listener};
use crate::webhooks::{self, HttpsGet};

/// What is built from the configuration before anything binds; a failure here is a
/// configuration error (`main` prints it as one line and exits 64).
pub struct Prepared {
    /// The configured ESP providers (a secret that does not parse fails here).
    pub webhooks: webhooks::Registry,
    /// Machine-traffic rules, with the relay egress list (a file that does not parse fails
    /// here).
    pub machine: MachineDetector,
}

/// Checks what only a subsystem can check (the database CA file, each webhook secret) and
/// builds the provider registry. `https` is the outbound HTTPS used by SNS (certificates,
/// subscription confirmation): [`webhooks::default_https_get`] in production, a seam in tests.
pub fn prepare(config: &Config, https: Arc<dyn HttpsGet>) -> Result<Prepared, String> {
    db::tls::connector(config.db.ca_file.as_deref()).map_err(|e| format!("{e:#}"))?;
    let webhooks = webhooks::Registry::from_config(&config.webhooks, https)?;
    let mut machine = MachineDetector::new(&config.tracking.machine_user_agents);
    if let Some(path) = &config.tracking.relay_ranges_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("REACHLY_RELAY_RANGES_FILE {}: {e}", path.display()))?;
        let ranges = RelayRanges::parse(&text)
            .map_err(|e| format!("REACHLY_RELAY_RANGES_FILE {}: {e}", path.display()))?;
        machine = machine.with_relay_ranges(ranges);
    }
    Ok(Prepared { webhooks, machine })
}

/// [`prepare`] with production outbound HTTPS.
pub fn prepare_default(config: &Config) -> Result<Prepared, String> {
    let https = webhooks::default_https_get().map_err(|e| format!("{e:#}"))?;
    prepare(config, https)
}

/// `REACHLY_MIGRATE_ON_START`: nothing is changed when the schema is current (so a role
/// that may not change the schema starts fine); otherwise the migrations are applied, and a
/// failure says what to do instead.
async fn migrate_on_start(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    match db::migrate::pending(client).await {
        Ok(p) if p.is_empty() => {
            tracing::info!("schema is current; no migration to apply");
            return Ok(());
        }
        Ok(p) => tracing::info!(pending = ?p, "applying migrations"),
        Err(e) => tracing::info!(
            reason = format!("{e:#}"),
            "cannot tell which migrations are applied; migrating"
        ),
    }
    db::migrate::run_on(client).await.map(|_| ()).map_err(|e| {
        anyhow::anyhow!(
            "applying migrations at start failed: {e:#}. If DATABASE_URL's role is not meant to \
             change the schema (least privilege), apply them with `reachly-ingest migrate` as the \
             owner role and set REACHLY_MIGRATE_ON_START=false (docs/deployment-database.md)"
        )
    })
}

/// Serves the admin listener while the app starts, until `stop`; then hands it back.
/// One request per connection, so no connection outlives the handover for long.
async fn serve_starting(listener: TcpListener, stop: CancellationToken) -> TcpListener {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return listener,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(crate::http::admin::starting(req.uri().path()))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
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
    /// Binds nothing: `admin` is served at once (`/healthz` 200, `/readyz` 503 "starting")
    /// while this connects, migrates (if configured), checks the schema, makes the first
    /// partitions, opens the spool and starts the writers; then the real handlers take over
    /// the same listener. A database that is unreachable at start is not fatal: the service
    /// serves and spools until it returns. A failing migration is fatal.
    pub async fn build(
        config: Config,
        public: TcpListener,
        admin: TcpListener,
        prepared: Prepared,
    ) -> anyhow::Result<App> {
        let stop_starting = CancellationToken::new();
        let starting = tokio::spawn(serve_starting(admin, stop_starting.clone()));
        let built = Self::start_parts(config, prepared).await;
        stop_starting.cancel();
        let admin = starting.await.context("admin listener while starting")?;
        let (state, pipeline, background, stop_background) = built?;
        Ok(App {
            state,
            public,
            admin,
            pipeline,
            background,
            stop_background,
        })
    }

    async fn start_parts(
        config: Config,
        prepared: Prepared,
    ) -> anyhow::Result<(
        Arc<AppState>,
        Pipeline,
        Vec<JoinHandle<()>>,
        CancellationToken,
    )> {
        let metrics = Metrics::new();
        let tls = db::tls::connector(config.db.ca_file.as_deref())?;
        let url = config.db.url.expose();
        // A bus edge never touches the database (its pool stays empty).
        let edge = config.bus.enabled() && !config.bus.consumes();
        if config.db.migrate_on_start && !edge {
            match db::connect_with(url, tls.clone()).await {
                Ok(mut client) => migrate_on_start(&mut client).await?,
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "database unreachable at start; serving and spooling until it returns"
                ),
            }
        }
        let pool = db::pool(&config.db, tls)?;
        let mut partitions_ready = false;
        let in_process = config.partitions.in_process && !edge;
        if !config.partitions.in_process {
            tracing::info!(
                "partition maintenance is off in this process (REACHLY_PARTITION_MAINTENANCE=off); run `reachly-ingest maintain` as the tables' owner"
            );
        }
        if edge {
            partitions_ready = true; // not an edge's job
        } else if let Ok(mut client) = pool.get().await {
            db::check_schema(&client).await?;
            let p = &config.partitions;
            if in_process {
                match db::partitions::maintain_at_start(
                    &mut client,
                    chrono::Utc::now().date_naive(),
                    p,
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
        }
        let bus = match config.bus.enabled() {
            true => Some(crate::pipeline::bus::Bus::connect(&config.bus).await?),
            false => None,
        };
        // An edge has no database: Mailgun's signature tokens are remembered on the bus.
        let bus_replay = match (&bus, edge) {
            (Some(b), true) => Some(crate::http::replay::BusReplayStore::new(b.clone())),
            _ => None,
        };
        let pipeline =
            Pipeline::start_with_bus(&config.pipeline, pool.clone(), metrics.clone(), bus)?;
        let mut state = AppState::new(
            config,
            pool.clone(),
            pipeline.ingest.clone(),
            metrics.clone(),
            prepared.webhooks,
            prepared.machine,
        );
        state.bus_replay = bus_replay;
        let state = Arc::new(state);
        if state.bus_replay.is_some() {
            let warming = state.clone();
            tokio::spawn(async move {
                if let Some(r) = &warming.bus_replay {
                    r.warm().await;
                }
            });
        }

        let stop_background = CancellationToken::new();
        let mut background = Vec::new();
        if in_process {
            background.push(tokio::spawn(db::partitions::run_periodically(
                pool.clone(),
                state.config.partitions.clone(),
                metrics.clone(),
                stop_background.clone(),
                partitions_ready,
            )));
        }
        if !edge {
            background.push(tokio::spawn(db::sizes::run_periodically(
                pool.clone(),
                metrics.clone(),
                state.config.partitions.database_disk_bytes,
                Duration::from_secs(60),
                stop_background.clone(),
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
        Ok((state, pipeline, background, stop_background))
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
