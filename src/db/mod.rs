//! Database access: the connection pool, migrations (`migrate`), partition maintenance
//! (`partitions`) and the startup schema check that fails with a hint instead of letting the
//! first batch discover a missing column. [`describe_error`] renders a database error with
//! everything PostgreSQL said (SQLSTATE, message, detail, hint, where, the object), since
//! tokio-postgres's own `Display` of a server error is only "db error".

pub mod migrate;
pub mod partitions;
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
        // Partition maintenance secures each partition it makes with it (migration V5).
        "SELECT 'public.reachly_secure_tenant_relation(regclass)'::regprocedure".to_string(),
    ];
    for sql in probes {
        client.simple_query(&sql).await.with_context(|| {
            format!("schema check failed ({sql}); run `reachly-ingest migrate`")
        })?;
    }
    Ok(())
}

/// The SQLSTATE of the first server error in `e`'s chain, if any (a log field and a metric
/// label source).
pub fn sqlstate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
            return Some(db.code().code().to_owned());
        }
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>()
            && let Some(db) = pg.as_db_error()
        {
            return Some(db.code().code().to_owned());
        }
        cur = err.source();
    }
    None
}

/// `e` and every error under it, joined by ": ", with a server error rendered in full:
/// `ERROR 55P03: canceling statement due to lock timeout (detail: ...; where: ...)`, except a
/// failing row's content. A link whose text the previous one already ends with (a wrapper
/// printing its source) is skipped.
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(describe_db_error(db))
        } else if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            // Its Display is "db error"; the server error is its source, rendered next.
            pg.as_db_error().is_none().then(|| pg.to_string())
        } else {
            Some(err.to_string())
        };
        if let Some(text) = text.filter(|t| !t.is_empty() && !out.ends_with(t.as_str())) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    out
}

fn describe_db_error(db: &tokio_postgres::error::DbError) -> String {
    let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    // A check or partition-constraint failure's detail is the whole row (addresses, user
    // agents, payloads): logs say which row failed by the constraint, never its content.
    let detail = db.detail().map(|d| {
        if d.starts_with("Failing row contains") {
            "Failing row contains (row data not logged)"
        } else {
            d
        }
    });
    let extras = [
        ("detail", detail),
        ("hint", db.hint()),
        ("where", db.where_()),
        ("schema", db.schema()),
        ("table", db.table()),
        ("column", db.column()),
        ("constraint", db.constraint()),
    ];
    let extras: Vec<String> = extras
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
        .collect();
    if !extras.is_empty() {
        s.push_str(&format!(" ({})", extras.join("; ")));
    }
    s
}
