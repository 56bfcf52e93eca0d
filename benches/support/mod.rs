//! What the database-backed benchmarks share: their `--name value` arguments, pinning a
//! process to a CPU, and a migrated database with one seeded campaign.

// Each benchmark uses a different part of this.
#![allow(dead_code)]

use std::str::FromStr;

use reachly_ingest::pgcluster::PgCluster;
use uuid::Uuid;

/// The value after `--name` on the command line, or `default`.
pub fn arg<T: FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pins a process (all its threads) to one CPU; false if `taskset` is unavailable.
pub fn pin(pid: u32, cpu: u32) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Creates and migrates database `bench` on the cluster; its URL and a connection.
pub async fn bench_database(
    cluster: &PgCluster,
) -> anyhow::Result<(String, tokio_postgres::Client)> {
    let admin = reachly_ingest::db::connect(&cluster.url("postgres")).await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    let url = cluster.url("bench");
    reachly_ingest::db::migrate::run(&url).await?;
    let db = reachly_ingest::db::connect(&url).await?;
    Ok((url, db))
}

/// One organization, one campaign, `n` contacts each with a message (status `sent`).
pub async fn seed_campaign(
    db: &tokio_postgres::Client,
    n: usize,
) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
    let (org, campaign) = (Uuid::new_v4(), Uuid::new_v4());
    db.execute(
        "INSERT INTO organizations (id, name) VALUES ($1, 'bench')",
        &[&org],
    )
    .await?;
    db.execute(
        "INSERT INTO campaigns (id, organization_id, name) VALUES ($1, $2, 'bench')",
        &[&campaign, &org],
    )
    .await?;
    db.execute(
        "INSERT INTO contacts (id, organization_id, email) \
         SELECT gen_random_uuid(), $1, 'c' || g || '@example.com' FROM generate_series(1, $2::int) g",
        &[&org, &(n as i32)],
    )
    .await?;
    db.execute(
        "INSERT INTO campaign_messages (id, organization_id, campaign_id, contact_id, status) \
         SELECT gen_random_uuid(), $1, $2, id, 'sent' FROM contacts WHERE organization_id = $1",
        &[&org, &campaign],
    )
    .await?;
    let messages = db
        .query(
            "SELECT id FROM campaign_messages WHERE organization_id = $1",
            &[&org],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((org, messages))
}
