//! Database access: the connection pool, migrations (`migrate`), partition maintenance
//! (`partitions`), archive and restore of old partitions (`archive`), dead-letter retention
//! (`retention`), table sizes (`sizes`) and the startup schema check that fails with a hint
//! instead of letting the first batch discover a missing column. [`describe_error`] renders a
//! database error with everything PostgreSQL said (SQLSTATE, message, detail, hint, where,
//! the object), since tokio-postgres's own `Display` of a server error is only "db error".

pub use crate::pgerror::{describe, describe_error, sqlstate, with_sqlstate};

pub mod archive;
pub mod engagement;
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
    // Verified: a connection is checked with an empty query before it is handed out, so
    // after a failover (or a database host that vanished) a pooled connection to the old
    // server is dropped and replaced (following `target_session_attrs` of a multi-host
    // DATABASE_URL) instead of failing the next batch. One round trip per checkout, which
    // is per batch for the writers.
    let mgr = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
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

/// `reachly-ingest maintain`: one partition maintenance round as of today (UTC), on a
/// connection of its own. Run it as the owner of `email_events` (making and dropping
/// partitions needs ownership). A round skipped because another instance holds the lock is
/// reported as such (not an error: that instance does the work).
pub async fn maintain_once(
    url: &str,
    tls: tls::Tls,
    cfg: &crate::config::PartitionConfig,
) -> anyhow::Result<partitions::MaintenanceReport> {
    let mut client = connect_with(url, tls).await?;
    let r = partitions::maintain(
        &mut client,
        chrono::Utc::now().date_naive(),
        cfg.premake_days,
        cfg.retention_days,
    )
    .await
    .map_err(with_sqlstate)
    .context("partition maintenance (run it as the owner of public.email_events)")?;
    if r.skipped {
        tracing::warn!("partition maintenance skipped: another session holds its lock");
    } else {
        tracing::info!(created = ?r.created, dropped = ?r.dropped, moved_rows = r.moved_rows, "partition maintenance done");
    }
    Ok(r)
}

/// One line for a maintenance report.
pub fn describe_report(r: &partitions::MaintenanceReport) -> String {
    if r.skipped {
        return "skipped (another session holds the maintenance lock)".into();
    }
    format!(
        "created {} [{}], dropped {} [{}], moved {} rows out of the default partition, expired {} rows of it",
        r.created.len(),
        r.created.join(" "),
        r.dropped.len(),
        r.dropped.join(" "),
        r.moved_rows,
        r.expired_default_rows
    )
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
        // Partition maintenance secures each partition it makes with it (migration V5).
        "SELECT 'public.reachly_secure_tenant_relation(regclass)'::regprocedure".to_string(),
    ];
    for sql in probes {
        client
            .simple_query(&sql)
            .await
            .map_err(describe)
            .with_context(|| {
                format!("schema check failed ({sql}); run `reachly-ingest migrate`")
            })?;
    }
    Ok(())
}
