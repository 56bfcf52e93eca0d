//! Migrations: the plain SQL files under `migrations/`, embedded at build time and applied
//! by refinery, all inside **one transaction of ours**:
//!
//! ```text
//! BEGIN; SELECT pg_advisory_xact_lock(K);           -- serialises concurrent migrators
//!        [refinery: history table, applied list, each pending migration + its history row]
//! COMMIT;                                           -- the lock goes with the transaction
//! ```
//!
//! Why one transaction: through PgBouncer in transaction mode a session-level advisory lock
//! (`pg_advisory_lock`) stays on whichever server connection took it and leaks to the next
//! client; a transaction-scoped lock cannot. Every statement is sent with the simple query
//! protocol (no named prepared statement ever reaches the server, so nothing is left behind
//! for another client's `s0` to collide with). A second migrator blocks on the lock, then
//! finds everything applied. A failure rolls everything back: no half-migrated schema.
//! The cost: a migration cannot use statements that refuse a transaction block
//! (`CREATE INDEX CONCURRENTLY`, `VACUUM`); none does, and a future one would have to be run
//! by hand.
//!
//! Supabase (and any database whose `auth.users` belongs to someone else): V1 creates
//! `auth.users` only when absent, but `CREATE TABLE IF NOT EXISTS` still needs CREATE on
//! schema `auth`, which the migrating role there lacks. V1 cannot be edited (applied
//! migrations are checksummed), so when V1 is pending and `auth.users` already exists, V1 is
//! applied without its two `auth` statements and recorded under its real checksum.

use anyhow::Context as _;
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use refinery_core::{Migration, Target};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::{SimpleQueryMessage, Transaction};

refinery::embed_migrations!("migrations");

/// Advisory lock key of the migration run ("reachly" in ASCII, arbitrary but fixed).
pub const MIGRATION_LOCK_KEY: i64 = 0x7265_6163_686c_7901;

/// The statements of V1 that touch schema `auth`, skipped where `auth.users` exists.
const V1_AUTH_SCHEMA: &str = "CREATE SCHEMA IF NOT EXISTS auth;";
const V1_AUTH_USERS_START: &str = "CREATE TABLE IF NOT EXISTS auth.users (";

/// Applies pending migrations (system-CA TLS); returns how many this call applied.
pub async fn run(url: &str) -> anyhow::Result<usize> {
    run_with(url, super::tls::default_connector()).await
}

/// Applies pending migrations over the given TLS connector.
pub async fn run_with(url: &str, tls: super::tls::Tls) -> anyhow::Result<usize> {
    let mut client = super::connect_with(url, tls).await?;
    run_on(&mut client).await
}

/// Applies pending migrations on an open connection (one transaction, see the module doc).
pub async fn run_on(client: &mut tokio_postgres::Client) -> anyhow::Result<usize> {
    let tx = client
        .transaction()
        .await
        .map_err(super::describe)
        .context("starting the migration transaction")?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
    ))
    .await
    .map_err(super::describe)
    .context("taking the migration lock")?;
    let mut driver = InTransaction(tx);
    let runner = migrations::runner();
    let mut applied = Vec::new();
    if v1_needs_foreign_auth(&driver.0).await? {
        applied.push(apply_v1_without_auth(&mut driver, &runner).await?);
    }
    let report = runner
        .run_async(&mut driver)
        .await
        .map_err(|e| anyhow::anyhow!("applying migrations: {}", refinery_reason(&e)))?;
    for m in report.applied_migrations() {
        applied.push((m.version(), m.name().to_string()));
    }
    driver
        .0
        .commit()
        .await
        .map_err(super::describe)
        .context("committing the migrations")?;
    for (version, name) in &applied {
        tracing::info!(version, name, "migration applied");
    }
    Ok(applied.len())
}

/// Versions embedded here and not yet recorded as applied (read-only: needs only SELECT on
/// refinery's history table; an error when it cannot be read).
pub async fn pending(client: &tokio_postgres::Client) -> anyhow::Result<Vec<i32>> {
    let exists = client
        .simple_query("SELECT (to_regclass('refinery_schema_history') IS NOT NULL)::text")
        .await
        .map_err(super::describe)?;
    let applied: Vec<i32> = if first_value(&exists).as_deref() == Some("true") {
        client
            .simple_query("SELECT version FROM refinery_schema_history")
            .await
            .map_err(super::describe)
            .context("reading refinery_schema_history")?
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .filter(|v| !applied.contains(v))
        .collect())
}

/// refinery's error, with the database's SQLSTATE and message when there is one.
fn refinery_reason(e: &refinery_core::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(db) = s
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|pg| pg.as_db_error())
        {
            return format!("{e}: {} {}", db.code().code(), db.message());
        }
        source = s.source();
    }
    e.to_string()
}

/// V1 is pending and `auth.users` exists already (Supabase and the like).
async fn v1_needs_foreign_auth(tx: &Transaction<'_>) -> anyhow::Result<bool> {
    let probe = |sql: &'static str| async move {
        tx.simple_query(sql)
            .await
            .map(|rows| first_value(&rows).as_deref() == Some("true"))
            .map_err(super::describe)
            .context("looking for an existing auth.users")
    };
    if !probe("SELECT (to_regclass('auth.users') IS NOT NULL)::text").await? {
        return Ok(false);
    }
    if !probe("SELECT (to_regclass('refinery_schema_history') IS NOT NULL)::text").await? {
        return Ok(true);
    }
    Ok(
        !probe("SELECT EXISTS (SELECT 1 FROM refinery_schema_history WHERE version = 1)::text")
            .await?,
    )
}

/// Applies V1 minus its `auth` statements and records it as refinery would (same checksum),
/// so refinery later sees V1 as applied and unchanged.
async fn apply_v1_without_auth(
    driver: &mut InTransaction<'_>,
    runner: &refinery_core::Runner,
) -> anyhow::Result<(i32, String)> {
    let v1 = runner
        .get_migrations()
        .iter()
        .find(|m| m.version() == 1)
        .context("migration V1 is not embedded")?;
    let sql = v1_without_auth(v1.sql().unwrap_or_default())?;
    tracing::info!("auth.users exists: applying V1 without creating schema auth");
    driver
        .0
        .batch_execute(&sql)
        .await
        .map_err(super::describe)
        .context("applying V1 (auth.users exists; needs USAGE on schema auth and REFERENCES on auth.users)")?;
    // Records V1 (history table made if absent) without running it.
    migrations::runner()
        .set_target(Target::FakeVersion(1))
        .run_async(driver)
        .await
        .map_err(|e| anyhow::anyhow!("recording V1: {}", refinery_reason(&e)))?;
    Ok((1, v1.name().to_string()))
}

/// V1's SQL without `CREATE SCHEMA auth` and `CREATE TABLE auth.users (...)`.
fn v1_without_auth(sql: &str) -> anyhow::Result<String> {
    let start = sql
        .find(V1_AUTH_USERS_START)
        .context("V1 no longer creates auth.users as expected")?;
    let len = sql[start..]
        .find(");")
        .context("V1's auth.users statement has no end")?
        + 2;
    let mut out = sql.to_string();
    out.replace_range(start..start + len, "-- auth.users exists: left alone");
    if !out.contains(V1_AUTH_SCHEMA) {
        anyhow::bail!("V1 no longer creates schema auth as expected");
    }
    Ok(out.replacen(V1_AUTH_SCHEMA, "-- schema auth exists: left alone", 1))
}

fn first_value(rows: &[SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// refinery's driver over our transaction: its "transactions" are statements of ours, sent
/// with the simple query protocol (no prepared statements).
struct InTransaction<'c>(Transaction<'c>);

impl AsyncTransaction for InTransaction<'_> {
    type Error = tokio_postgres::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut count = 0;
        for query in queries {
            self.0.batch_execute(query).await?;
            count += 1;
        }
        Ok(count)
    }
}

impl AsyncQuery<Vec<Migration>> for InTransaction<'_> {
    async fn query<'a>(&'a mut self, query: &'a str) -> Result<Vec<Migration>, Self::Error> {
        let rows = self.0.simple_query(query).await?;
        Ok(rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => applied_migration(r),
                _ => None,
            })
            .collect())
    }
}

impl AsyncMigrate for InTransaction<'_> {}

/// A row of refinery's history table (`version, name, applied_on, checksum`, as text).
/// A row that does not parse is left out; refinery then reports V as missing or divergent.
fn applied_migration(r: &tokio_postgres::SimpleQueryRow) -> Option<Migration> {
    let version = r.get(0)?.parse().ok()?;
    let name = r.get(1)?.to_string();
    let applied_on = OffsetDateTime::parse(r.get(2)?, &Rfc3339).ok()?;
    let checksum = r.get(3)?.parse().ok()?;
    Some(Migration::applied(version, name, applied_on, checksum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_without_auth_removes_exactly_the_two_auth_statements() {
        let runner = migrations::runner();
        let v1 = runner
            .get_migrations()
            .iter()
            .find(|m| m.version() == 1)
            .expect("V1 embedded");
        let original = v1.sql().expect("sql");
        let stripped = v1_without_auth(original).expect("strips");
        assert!(!stripped.contains("CREATE SCHEMA IF NOT EXISTS auth"));
        assert!(!stripped.contains("CREATE TABLE IF NOT EXISTS auth.users"));
        // Everything else is still there, e.g. the references to auth.users.
        assert!(stripped.contains("REFERENCES auth.users(id)"));
        assert!(stripped.contains("CREATE TABLE IF NOT EXISTS public.organizations"));
        assert!(original.len() - stripped.len() > 200);
    }
}
