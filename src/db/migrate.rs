//! Migrations: the plain SQL files under `migrations/`, embedded at build time and applied
//! by refinery. Two instances starting at once are serialised by a session advisory lock
//! held around the run, so the second one finds everything applied and does nothing.

use anyhow::Context as _;

refinery::embed_migrations!("migrations");

/// Advisory lock key of the migration run ("reachly" in ASCII, arbitrary but fixed).
const MIGRATION_LOCK_KEY: i64 = 0x7265_6163_686c_7901;

/// Applies pending migrations (system-CA TLS); returns how many this call applied.
pub async fn run(url: &str) -> anyhow::Result<usize> {
    run_with(url, super::tls::default_connector()).await
}

/// Applies pending migrations over the given TLS connector.
pub async fn run_with(url: &str, tls: super::tls::Tls) -> anyhow::Result<usize> {
    let mut client = super::connect_with(url, tls).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the migration lock")?;
    let result = migrations::runner().run_async(&mut client).await;
    // Unlock even on failure; closing the connection would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result.context("applying migrations")?;
    for m in report.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "migration applied");
    }
    Ok(report.applied_migrations().len())
}
