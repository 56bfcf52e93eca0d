//! The throwaway PostgreSQL, shaped like an Azure Database for PostgreSQL Flexible Server
//! B1ms (1 vCore, 2 GiB): the memory and WAL settings Azure computes for that size (sources
//! in `loadtest/README.md`), `fsync`, `synchronous_commit` and `full_page_writes` on as
//! Azure forces them, and every postgres process pinned to one CPU. It wraps the product's
//! [`PgCluster`] (initdb, pg_ctl; run as the `postgres` user when we are root) and adds the
//! pinning, a watchdog that stops the cluster if this process dies, and the statistics a
//! step needs (WAL position and counters, page writes, commits, CPU of the server processes).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use reachly_ingest::pgcluster::{self, PgCluster};

use crate::{pin, procstat};

/// Database name used by every phase.
pub const DB_NAME: &str = "reachly";

/// The settings of an Azure B1ms (PostgreSQL 15 defaults for that SKU), with the reason.
pub const B1MS_SETTINGS: &[(&str, &str, &str)] = &[
    (
        "max_connections",
        "50",
        "B1ms default (Limits: maximum connections)",
    ),
    (
        "shared_buffers",
        "256MB",
        "32768 x 8 kB: memoryGiB * 16384 for VMs up to 2 GiB",
    ),
    (
        "effective_cache_size",
        "1792MB",
        "229376 x 8 kB: memoryGiB * 131072 - shared_buffers",
    ),
    ("work_mem", "4MB", "4096 kB, Azure default"),
    (
        "maintenance_work_mem",
        "99328kB",
        "(82.5 * ln(2) + 40) * 1024 kB",
    ),
    ("wal_buffers", "16MB", "2048 x 8 kB for VMs up to 4 vCores"),
    ("max_wal_size", "2048MB", "for the smallest disk, 32 GiB"),
    ("min_wal_size", "80MB", "Azure default"),
    ("checkpoint_timeout", "600s", "Azure default"),
    ("checkpoint_completion_target", "0.9", "Azure default"),
    ("wal_compression", "on", "Azure default"),
    ("random_page_cost", "2", "Azure default"),
    ("fsync", "on", "read-only on Azure"),
    ("synchronous_commit", "on", "read-only on Azure"),
    ("full_page_writes", "on", "read-only on Azure"),
    ("wal_sync_method", "fdatasync", "read-only on Azure"),
    ("wal_level", "replica", "Azure default"),
];

/// Whether the server's library directory has `pg_stat_statements` (contrib): beside the
/// real `bin/` directory (symlinks resolved), or where `pg_config --pkglibdir` says.
fn has_pg_stat_statements() -> bool {
    let beside_bin = pgcluster::find_bin_dir()
        .ok()
        .and_then(|bin| std::fs::canonicalize(bin.join("postgres")).ok())
        .and_then(|postgres| Some(postgres.parent()?.parent()?.join("lib")));
    let pg_config = Command::new("pg_config")
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    [beside_bin, pg_config]
        .into_iter()
        .flatten()
        .any(|dir| dir.join("pg_stat_statements.so").is_file())
}

/// `pg_stat_statements` is preloaded on Azure by default (with `pg_cron`, which is not needed
/// here); it is added when the server has it.
const PRELOAD: &str = "pg_stat_statements";

#[derive(Debug, Clone)]
pub struct Cluster {
    pub pg: PgCluster,
    pub cpu: usize,
    pub preload_stats: bool,
    /// Extra settings given on the command line (`--pg-setting name=value`).
    pub extra: Vec<(String, String)>,
}

impl Cluster {
    /// initdb in `dir/data` on a free port, start it pinned to `cpu`, and leave a watchdog
    /// that stops it and removes `dir` when this process is gone (`keep` keeps `dir`).
    pub fn create(
        dir: &Path,
        cpu: usize,
        extra: Vec<(String, String)>,
        keep: bool,
    ) -> anyhow::Result<Cluster> {
        let pg = PgCluster::new(dir.join("data"), pgcluster::free_port()?)?;
        pg.init(false)?;
        let preload_stats = has_pg_stat_statements();
        let c = Cluster {
            pg,
            cpu,
            preload_stats,
            extra,
        };
        c.pg.watch_until_exit((!keep).then_some(dir))?;
        c.start()?;
        Ok(c)
    }

    fn settings(&self) -> Vec<(String, String)> {
        let mut s: Vec<(String, String)> = B1MS_SETTINGS
            .iter()
            .map(|(k, v, _)| (k.to_string(), v.to_string()))
            .collect();
        if self.preload_stats {
            s.push(("shared_preload_libraries".into(), PRELOAD.into()));
        }
        s.push(("log_min_messages".into(), "warning".into()));
        for (k, v) in &self.extra {
            s.retain(|(name, _)| name != k);
            s.push((k.clone(), v.clone()));
        }
        s
    }

    /// Starts the server and pins all its processes (later backends inherit the pinning
    /// from the postmaster).
    pub fn start(&self) -> anyhow::Result<()> {
        let settings = self.settings();
        let refs: Vec<(&str, &str)> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.pg.start(&refs)?;
        let pm = self
            .postmaster_pid()
            .context("the server started but wrote no postmaster.pid")?;
        pin::pin_pid(pm, self.cpu)?;
        for child in procstat::children(pm) {
            // A child may exit between listing and pinning; that is fine.
            let _ = pin::pin_pid(child, self.cpu);
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg.stop("fast")
    }

    pub fn postmaster_pid(&self) -> Option<u32> {
        procstat::postmaster_pid(&self.pg.data_dir)
    }

    /// CPU ticks of all server processes (see [`procstat::postgres_cpu_ticks`]).
    pub fn cpu_ticks(&self) -> Option<u64> {
        procstat::postgres_cpu_ticks(self.postmaster_pid()?)
    }

    /// CPU ticks of the server processes by kind (see [`procstat::postgres_cpu_by_kind`]).
    pub fn cpu_by_kind(&self) -> Option<[u64; 7]> {
        procstat::postgres_cpu_by_kind(self.postmaster_pid()?)
    }

    pub fn url(&self) -> String {
        self.pg.url(DB_NAME)
    }

    pub fn admin_url(&self) -> String {
        self.pg.url("postgres")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.pg.data_dir.clone()
    }

    /// The settings in force, as the server reports them (for the report).
    pub async fn effective_settings(&self) -> anyhow::Result<Vec<(String, String)>> {
        let client = reachly_ingest::db::connect(&self.url()).await?;
        let mut names: Vec<&str> = B1MS_SETTINGS.iter().map(|(k, _, _)| *k).collect();
        names.push("shared_preload_libraries");
        let rows = client
            .query(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1) ORDER BY name",
                &[&names],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

/// Counters of the whole server at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DbStats {
    /// `pg_current_wal_lsn()` in bytes.
    pub wal_lsn: i64,
    pub wal_records: i64,
    pub wal_fpi: i64,
    pub wal_write: i64,
    /// WAL fsyncs (`pg_stat_wal.wal_sync`).
    pub wal_sync: i64,
    /// Data pages written by checkpoints, the background writer and backends.
    pub page_writes: i64,
    /// The same by writer: checkpointer, background writer, backends (autovacuum included).
    pub pages_by: [i64; 3],
    pub xact_commit: i64,
    /// Pages of every permanent relation of this database, all forks: its growth over a
    /// phase is the number of relation *extensions*. PostgreSQL 15 counts each extension
    /// (a zero-filled page appended to the file) in `pg_stat_bgwriter.buffers_backend`,
    /// and the same page is written again with its data later (PostgreSQL 16's `pg_stat_io`
    /// tells the two apart as `extends` and `writes`), so `page_writes` counts a new page twice.
    pub relation_pages: i64,
}

impl DbStats {
    pub fn delta(&self, earlier: &DbStats) -> DbStats {
        DbStats {
            wal_lsn: self.wal_lsn - earlier.wal_lsn,
            wal_records: self.wal_records - earlier.wal_records,
            wal_fpi: self.wal_fpi - earlier.wal_fpi,
            wal_write: self.wal_write - earlier.wal_write,
            wal_sync: self.wal_sync - earlier.wal_sync,
            page_writes: self.page_writes - earlier.page_writes,
            pages_by: [
                self.pages_by[0] - earlier.pages_by[0],
                self.pages_by[1] - earlier.pages_by[1],
                self.pages_by[2] - earlier.pages_by[2],
            ],
            xact_commit: self.xact_commit - earlier.xact_commit,
            relation_pages: self.relation_pages - earlier.relation_pages,
        }
    }
}

/// A monitoring connection that survives the database being stopped (it reconnects).
pub struct Monitor {
    url: String,
    client: Option<tokio_postgres::Client>,
}

impl Monitor {
    pub fn new(url: String) -> Monitor {
        Monitor { url, client: None }
    }

    async fn client(&mut self) -> anyhow::Result<&tokio_postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(reachly_ingest::db::connect(&self.url).await?);
        }
        self.client.as_ref().context("no monitoring connection")
    }

    /// The server's counters (PostgreSQL 14-16: `pg_stat_wal`, `pg_stat_bgwriter`).
    pub async fn stats(&mut self) -> anyhow::Result<DbStats> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8, \
                        w.wal_records::int8, w.wal_fpi::int8, w.wal_write::int8, w.wal_sync::int8, \
                        (b.buffers_checkpoint + b.buffers_clean + b.buffers_backend)::int8, \
                        (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())::int8, \
                        b.buffers_checkpoint::int8, b.buffers_clean::int8, b.buffers_backend::int8, \
                        (SELECT coalesce(sum(pg_relation_size(c.oid, f.fork)), 0) / 8192 \
                         FROM pg_class c, (VALUES ('main'), ('fsm'), ('vm'), ('init')) f(fork) \
                         WHERE c.relpersistence <> 't' AND c.relkind IN ('r', 'i', 't', 'm', 'S'))::int8 \
                 FROM pg_stat_wal w, pg_stat_bgwriter b",
                &[],
            )
            .await;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                self.client = None;
                return Err(e).context("reading pg_stat_wal / pg_stat_bgwriter");
            }
        };
        Ok(DbStats {
            wal_lsn: row.get(0),
            wal_records: row.get(1),
            wal_fpi: row.get(2),
            wal_write: row.get(3),
            wal_sync: row.get(4),
            page_writes: row.get(5),
            xact_commit: row.get(6),
            pages_by: [row.get(7), row.get(8), row.get(9)],
            relation_pages: row.get(10),
        })
    }

    pub async fn execute(&mut self, sql: &str) -> anyhow::Result<()> {
        let client = self.client().await?;
        if let Err(e) = client.batch_execute(sql).await {
            self.client = None;
            return Err(e).with_context(|| format!("running {sql}"));
        }
        Ok(())
    }

    pub fn forget(&mut self) {
        self.client = None;
    }
}
