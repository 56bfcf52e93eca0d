//! Database access: the connection pool, migrations (`migrate`), partition maintenance
//! (`partitions`), archive and restore of old partitions (`archive`), dead-letter retention
//! (`retention`), table sizes (`sizes`) and the startup schema check that fails with a hint
//! instead of letting the first batch discover a missing column.

pub mod archive;
pub mod migrate;
pub mod partitions;
pub mod retention;
pub mod sizes;
pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::config::DbConfig;

/// Builds the pool over `tls` (from [`tls::connector`] and `cfg.ca_file`). Connections are
/// made lazily; nothing here touches the network.
pub fn pool(cfg: &DbConfig, tls: tls::Tls) -> anyhow::Result<Pool> {
    let mut pg =
        tokio_postgres::Config::from_str(cfg.url.expose()).context("parsing DATABASE_URL")?;
    if pg.get_application_name().is_none() {
        pg.application_name("reachly-ingest");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(cfg.connect_timeout);
    }
    // TCP keepalives detect a database host that vanished without closing the socket.
    pg.keepalives_idle(Duration::from_secs(30));
    let mgr = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(cfg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(cfg.connect_timeout))
        .create_timeout(Some(cfg.connect_timeout))
        .recycle_timeout(Some(cfg.connect_timeout))
        .build()
        .context("building the connection pool")
}

/// Opens one connection (migrations, tools) with the system-CA TLS connector.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    connect_with(url, tls::default_connector()).await
}

/// Opens one connection with the given TLS connector, its driver task spawned.
pub async fn connect_with(url: &str, tls: tls::Tls) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tls).await.with_context(
        || "connecting to the database (check DATABASE_URL and that PostgreSQL runs)",
    )?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Fails with a hint if the tables the service writes lack a column it needs (a missed
/// migration, a hand-made schema): better at start than as a failing batch at 3 a.m.
pub async fn check_schema(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let probes = [
        format!("SELECT {} FROM public.email_events LIMIT 0", crate::event::EVENT_COLUMNS),
        "SELECT id, organization_id, contact_id, status, sent_at, delivered_at, opened_at, clicked_at, error_message, error_at, updated_at FROM public.campaign_messages LIMIT 0".to_string(),
        "SELECT id, organization_id, status, updated_at FROM public.contacts LIMIT 0".to_string(),
        "SELECT id, received_at, provider, reason, organization_id, message_id, event_type, dedup_key, payload FROM public.webhook_dead_letters LIMIT 0".to_string(),
    ];
    for sql in probes {
        client.simple_query(&sql).await.with_context(|| {
            format!("schema check failed ({sql}); run `reachly-ingest migrate`")
        })?;
    }
    Ok(())
}
