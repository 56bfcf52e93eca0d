//! The phases of a run.
//!
//! Full: set up the B1ms-shaped cluster and seed it; **service** ramp (the rate doubles from
//! `--start-rate` until a step saturates, then `--bisect` steps narrow the knee), one step at
//! half the saturation rate, the exactly-once check, and a dump of the stored events;
//! **outage** (reset; at a moderate rate, the database is stopped for `--outage-seconds` in
//! the middle of the step; click latency before, during and after; exactly-once after the
//! drain); SIGTERM to the service, which must exit 0; **naive** ramp (reset; pixels and
//! clicks only; exactly-once); **limit** (reset; the dumped events loaded with one COPY and
//! one UPDATE). Then the report. Smoke: a small seed and one low-rate service step, with the
//! exactly-once check.
//!
//! A step is measured between two probes: CPU ticks of the server, of this process (the
//! load generator) and of the database processes, the database's WAL/fsync/page counters, and
//! the service's metrics; the step row derives rates and per-event costs from the deltas.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cluster::{Cluster, DbStats, Monitor};
use crate::driver::{Driver, HttpClient, Ledger, StepResult, StepSpec};
use crate::nats::NatsCluster;
use crate::report::{
    self, ChartData, MemoryPeak, MemorySample, Projection, SaturationRule, StepRow,
};
use crate::seed::{self, Tenants};
use crate::service::{ServerProcess, ServerSpec, ServiceMetrics};
use crate::target::Target;
use crate::verify::{self, Verdict};
use crate::workload::{Mix, Route, Secrets, Workload};
use crate::{limit, pin, procstat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Full,
    Smoke,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Webhooks {
    /// Include them if the service answers for both providers, else leave them out (noted).
    Auto,
    /// Include them; fail if the service does not implement them.
    On,
    Off,
}

/// Everything a run is configured with (the command line).
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub service_bin: PathBuf,
    pub naive_bin: PathBuf,
    /// Another build of the service and its name in the report (`--baseline-bin`).
    pub baseline: Option<(PathBuf, String)>,
    /// SQL run before the baseline phase and SQL run after it (`--baseline-schema-sql`,
    /// `--baseline-restore-sql`).
    pub baseline_schema_sql: Option<(PathBuf, PathBuf)>,
    pub work_dir: PathBuf,
    pub keep: bool,
    pub results_dir: Option<PathBuf>,
    pub db_cpu: usize,
    pub app_cpu: usize,
    pub contacts: usize,
    pub step: Duration,
    pub start_rate: f64,
    pub max_rate: f64,
    pub bisect: u32,
    pub naive_start_rate: f64,
    pub smoke_rate: f64,
    pub webhooks: Webhooks,
    pub mix: Mix,
    pub pool_size: usize,
    pub writers: usize,
    pub flush_max_events: usize,
    pub flush_interval_ms: u64,
    pub buffer_max_events: usize,
    pub naive_pool_size: usize,
    pub max_in_flight: usize,
    pub webhook_max_in_flight: usize,
    pub rule: SaturationRule,
    pub outage: Duration,
    pub outage_rate: Option<f64>,
    pub limit_max_events: u64,
    /// Run exactly these rates instead of the ramp (experiments).
    pub rates: Vec<f64>,
    /// With `rates`: the two half-rate steps at this rate after them (experiments).
    pub half_rate: Option<f64>,
    /// Longest wait for a quiet machine before a step.
    pub quiet_wait: Duration,
    pub skip_outage: bool,
    pub skip_naive: bool,
    pub skip_limit: bool,
    /// Leave out the bus mode (edges, writers and NATS JetStream).
    pub skip_bus: bool,
    pub bus_edges: usize,
    pub bus_writers: usize,
    pub pg_settings: Vec<(String, String)>,
}

/// One server's CPU and memory, this process's CPU, the database's CPU and counters, and
/// (for the service) its metrics, at one instant.
struct Probe {
    at: Instant,
    server_ticks: u64,
    gen_ticks: u64,
    db_ticks: Option<u64>,
    /// The same by kind of server process ([`procstat::PG_KINDS`]).
    db_kinds: Option<[u64; 7]>,
    db: Option<DbStats>,
    metrics: Option<ServiceMetrics>,
    /// Messages in the bus's stream (bus mode only).
    backlog: Option<u64>,
    rss: (u64, u64),
    /// (busy, total) ticks of the database's CPU and of the application's CPU.
    db_cpu_busy: (u64, u64),
    app_cpu_busy: (u64, u64),
}

struct Ctx {
    opts: Options,
    cluster: Cluster,
    monitor: Monitor,
    tenants: Arc<Tenants>,
    secrets: Arc<Secrets>,
    ticks: f64,
    dir: PathBuf,
    client: crate::driver::HttpClient,
    /// Median 8 kB write + fdatasync on the work directory's disk.
    fsync_us: Option<f64>,
    /// Time spent waiting for the machine to be quiet before steps.
    quiet_waited: Duration,
}

/// What a phase produced.
#[derive(Debug, Clone, Default)]
pub struct PhaseResult {
    pub rows: Vec<StepRow>,
    pub verdict: Option<Verdict>,
    /// Highest offered rate that did not saturate; lowest that did.
    pub best_ok: Option<f64>,
    pub first_saturated: Option<f64>,
    pub notes: Vec<String>,
}

impl PhaseResult {
    /// Highest committed events/s over steps that did not saturate.
    pub fn sustained(&self) -> Option<(f64, &StepRow)> {
        self.rows
            .iter()
            .filter(|r| r.saturated.is_none() && !r.phase.contains("half"))
            .map(|r| (r.committed_per_s, r))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
    /// Highest committed events/s of any step.
    pub fn peak(&self) -> Option<(f64, &StepRow)> {
        self.rows
            .iter()
            .map(|r| (r.committed_per_s, r))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

pub struct Outcome {
    pub passed: bool,
    /// The Markdown report.
    pub report: String,
    pub chart: Option<ChartData>,
}

pub async fn run(opts: Options) -> anyhow::Result<Outcome> {
    pin::require_taskset()?;
    let cpus = pin::online_cpus();
    if opts.db_cpu.max(opts.app_cpu) >= cpus || opts.db_cpu == opts.app_cpu {
        bail!(
            "this machine has {cpus} CPU(s); the database (--db-cpu {}) and the service (--app-cpu {}) need two different ones",
            opts.db_cpu,
            opts.app_cpu
        );
    }
    pin::pin_pid(std::process::id(), opts.app_cpu)?;
    if let Some((b, _)) = &opts.baseline
        && !b.is_file()
    {
        bail!("--baseline-bin {} is not a file", b.display());
    }
    if let Some((before, after)) = &opts.baseline_schema_sql {
        for f in [before, after] {
            if !f.is_file() {
                bail!("{} is not a file", f.display());
            }
        }
    }
    for (what, p) in [
        ("reachly-ingest", &opts.service_bin),
        ("naive-server", &opts.naive_bin),
    ] {
        if !p.is_file()
            && (what == "reachly-ingest" || (opts.mode == Mode::Full && !opts.skip_naive))
        {
            bail!(
                "{what} binary not found at {} (loadtest/run.sh builds it)",
                p.display()
            );
        }
    }
    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Cluster, schema, seed.
    std::fs::create_dir_all(&opts.work_dir)?;
    let dir = opts.work_dir.join(format!(
        "reachly-loadtest-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    // The postgres user must be able to enter it when we are root.
    let _ = std::process::Command::new("chmod")
        .arg("755")
        .arg(&dir)
        .status();
    eprintln!("work dir {} (removed at exit unless --keep)", dir.display());
    let fsync_us = procstat::fdatasync_micros(&dir, 200);
    let cluster = {
        let (dir, cpu, extra, keep) = (
            dir.clone(),
            opts.db_cpu,
            opts.pg_settings.clone(),
            opts.keep,
        );
        tokio::task::spawn_blocking(move || Cluster::create(&dir, cpu, extra, keep)).await??
    };
    let admin = reachly_ingest::db::connect(&cluster.admin_url()).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", crate::cluster::DB_NAME))
        .await?;
    let url = cluster.url();
    reachly_ingest::db::migrate::run(&url)
        .await
        .context("migrating")?;
    {
        seed::make_day_partitions(&url).await?;
        let c = reachly_ingest::db::connect(&url).await?;
        if cluster.preload_stats {
            c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
        }
    }
    let t = Instant::now();
    let tenants = Arc::new(seed::seed(&url, opts.contacts).await.context("seeding")?);
    eprintln!(
        "seeded {} organizations, {} contacts, {} campaigns, {} messages in {:.1} s",
        tenants.orgs.len(),
        tenants.contacts,
        tenants.campaigns.len(),
        tenants.messages.len(),
        t.elapsed().as_secs_f64()
    );
    let settings = cluster.effective_settings().await?;
    let pg_version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let mut ctx = Ctx {
        monitor: Monitor::new(url.clone()),
        cluster,
        tenants,
        secrets: Arc::new(Secrets::generate()?),
        ticks: procstat::clock_ticks_per_second(),
        dir: dir.clone(),
        client: crate::driver::http_client(),
        fsync_us,
        quiet_waited: Duration::ZERO,
        opts,
    };

    let result = match ctx.opts.mode {
        Mode::Smoke => smoke(&mut ctx).await,
        Mode::Full => full(&mut ctx).await,
    };
    // Whatever happened, stop the cluster (the watchdog also would, when we exit).
    let c = ctx.cluster.pg.clone();
    let _ = tokio::task::spawn_blocking(move || c.stop("immediate")).await;
    if !ctx.opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (passed, body, chart) = result?;
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let header = header(
        &ctx,
        &settings,
        &pg_version,
        &load_before,
        &load_after,
        started.elapsed(),
    );
    Ok(Outcome {
        passed,
        report: format!("{header}{body}"),
        chart,
    })
}

fn header(
    ctx: &Ctx,
    settings: &[(String, String)],
    pg_version: &str,
    load_before: &str,
    load_after: &str,
    took: Duration,
) -> String {
    let o = &ctx.opts;
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut s = format!(
        "# reachly-ingest load test ({mode})\n\n\
         - date: {date} UTC; run time {took:.0} s\n\
         - machine: {cpus} CPUs ({cpu_model}), Linux {kernel}; load average before {lb}, after {la}\n\
         - PostgreSQL {pg_version} on CPU {dbcpu} (taskset); service and load generator on CPU {appcpu}; an 8 kB write + fdatasync takes {fsync} on this disk (median of 200)\n\
         - seed: {orgs} organizations, {contacts} contacts, {campaigns} campaigns, {messages} messages\n\
         - mix: {mix}\n\
         - service: REACHLY_DB_POOL_SIZE={pool}, REACHLY_WRITERS={writers}, REACHLY_FLUSH_MAX_EVENTS={fme}, REACHLY_FLUSH_INTERVAL_MS={fi}, REACHLY_BUFFER_MAX_EVENTS={bme}\n\
         - before each step the run waited for both cores to be at most {cpct:.0}% busy (at most {qw} s): {waited:.0} s in all\n\
         - open loop: latency from the scheduled send time; at most {mif} pixel/click and {wmif} webhook requests in flight; steps of {step} s; a step saturates when achieved < {minach:.0}% of offered, or tracking p99 > {p99} ms, or the service's buffer grows / spools\n\n\
         <details><summary>PostgreSQL settings in force (B1ms shape)</summary>\n\n| setting | value |\n| --- | --- |\n",
        mode = match o.mode {
            Mode::Full => "full",
            Mode::Smoke => "smoke",
        },
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        took = took.as_secs_f64(),
        cpus = pin::online_cpus(),
        kernel = kernel.trim(),
        lb = load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        la = load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        dbcpu = o.db_cpu,
        fsync = ctx.fsync_us.map_or("?".into(), |us| format!("{us:.0} us")),
        appcpu = o.app_cpu,
        orgs = ctx.tenants.orgs.len(),
        contacts = ctx.tenants.contacts,
        campaigns = ctx.tenants.campaigns.len(),
        messages = ctx.tenants.messages.len(),
        mix = o.mix.describe(),
        pool = o.pool_size,
        writers = o.writers,
        fme = o.flush_max_events,
        fi = o.flush_interval_ms,
        bme = o.buffer_max_events,
        mif = o.max_in_flight,
        wmif = o.webhook_max_in_flight,
        cpct = report::CONTENDED_PCT,
        qw = o.quiet_wait.as_secs(),
        waited = ctx.quiet_waited.as_secs_f64(),
        step = o.step.as_secs(),
        minach = o.rule.min_achieved * 100.0,
        p99 = o.rule.max_p99_ms,
    );
    for (k, v) in settings {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s.push_str("\n</details>\n\n");
    s
}

// ---- probes and steps ----

/// The phase's ledger, once its requests are all answered.
fn take_ledger(l: &Arc<Mutex<Ledger>>) -> Ledger {
    l.lock()
        .map(|mut g| std::mem::take(&mut *g))
        .unwrap_or_default()
}

/// The load of a phase: the driver (its target), the request mix and the ledger.
struct Load {
    driver: Driver,
    workload: Workload,
    ledger: Arc<Mutex<Ledger>>,
}

impl Load {
    fn new(bases: Vec<String>, ctx: &Ctx, mix: Mix, seed: u64) -> Load {
        Load {
            driver: Driver::new(
                bases,
                ctx.opts.max_in_flight,
                ctx.opts.webhook_max_in_flight,
            ),
            workload: Workload::new(ctx.tenants.clone(), ctx.secrets.clone(), mix, seed),
            ledger: Arc::new(Mutex::new(Ledger::default())),
        }
    }
}

async fn probe(ctx: &mut Ctx, target: &mut Target) -> Probe {
    let metrics = target.metrics(&ctx.client).await;
    let backlog = target.backlog().await;
    let db = ctx.monitor.stats().await.ok();
    let pids = target.pids();
    // Memory summed over the processes (the high-water marks too: an upper bound).
    let rss = pids
        .iter()
        .filter_map(|p| procstat::memory(*p))
        .fold((0, 0), |a, m| (a.0 + m.0, a.1 + m.1));
    Probe {
        at: Instant::now(),
        server_ticks: pids.iter().filter_map(|p| procstat::cpu_ticks(*p)).sum(),
        gen_ticks: procstat::cpu_ticks(std::process::id()).unwrap_or(0),
        db_ticks: ctx.cluster.cpu_ticks(),
        db_kinds: ctx.cluster.cpu_by_kind(),
        db,
        metrics,
        backlog,
        rss,
        db_cpu_busy: procstat::cpu_busy(ctx.opts.db_cpu).unwrap_or((0, 0)),
        app_cpu_busy: procstat::cpu_busy(ctx.opts.app_cpu).unwrap_or((0, 0)),
    }
}

/// Database CPU in µs per event by kind of server process, between two readings.
fn kinds_per_event(
    ticks: f64,
    before: Option<[u64; 7]>,
    after: Option<[u64; 7]>,
    events: f64,
) -> Option<[f64; 7]> {
    let (b, a) = (before?, after?);
    (events > 0.0)
        .then(|| std::array::from_fn(|i| 1e6 * a[i].saturating_sub(b[i]) as f64 / ticks / events))
}

/// Share (%) of a CPU's time that was busy between two `/proc/stat` readings.
fn busy(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    100.0 * after.0.saturating_sub(before.0) as f64 / total as f64
}

fn row_from(
    ctx: &Ctx,
    phase: String,
    before: &Probe,
    after: &Probe,
    result: &StepResult,
) -> StepRow {
    let secs = (after.at - before.at).as_secs_f64().max(1e-3);
    let pct = |a: u64, b: u64| 100.0 * (a.saturating_sub(b)) as f64 / ctx.ticks / secs;
    let total = result.total();
    let mut latency = [[None; 3]; 4];
    for r in Route::ALL {
        let st = total.route(r);
        latency[r.index()] = [st.ms(0.5), st.ms(0.99), st.ms(0.999)];
    }
    let acked = total.events_acked() as f64;
    let (committed, per_commit, buffer_end, spool_end) = match (&before.metrics, &after.metrics) {
        (Some(b), Some(a)) => {
            let batches = a.batches - b.batches;
            let events = a.batch_events - b.batch_events;
            (
                (a.written_total() - b.written_total()).max(0.0),
                (batches > 0.0).then(|| events / batches),
                Some(a.buffer_events),
                Some(a.spool_bytes),
            )
        }
        _ => (acked, Some(1.0), None, None),
    };
    let (spooled, replayed) = match (&before.metrics, &after.metrics) {
        (Some(b), Some(a)) => (
            Some((a.spooled - b.spooled).max(0.0)),
            Some((a.replayed - b.replayed).max(0.0)),
        ),
        _ => (None, None),
    };
    let db = match (&before.db, &after.db) {
        (Some(b), Some(a)) => Some(a.delta(b)),
        _ => None,
    };
    let db_secs = match (before.db_ticks, after.db_ticks) {
        (Some(b), Some(a)) if a >= b => Some((a - b) as f64 / ctx.ticks),
        _ => None,
    };
    let per_event = |x: f64| (committed > 0.0).then(|| x / committed);
    let wal = db.and_then(|d| per_event(d.wal_lsn as f64));
    let fsync = db.and_then(|d| per_event(d.wal_sync as f64));
    let fpi = db.and_then(|d| per_event(d.wal_fpi as f64));
    let pages = db.and_then(|d| per_event(d.page_writes as f64));
    let cpu_per_event = db_secs.and_then(per_event);
    let db_cpu_by_kind = kinds_per_event(ctx.ticks, before.db_kinds, after.db_kinds, committed);
    let projection = match (wal, fsync, pages, cpu_per_event) {
        (Some(w), Some(f), Some(p), Some(c)) => Some(Projection::from_costs(w, f + p, c)),
        _ => None,
    };
    StepRow {
        phase,
        offered: result.offered,
        achieved: result.achieved,
        requests: total.requests(),
        failures: total.routes.iter().map(|r| r.bad_status + r.errors).sum(),
        latency,
        acked_per_s: acked / secs,
        committed_per_s: committed / secs,
        events_per_commit: per_commit,
        buffer_end,
        spool_end,
        spooled,
        replayed,
        connections_end: after.metrics.as_ref().and_then(|m| m.connections),
        server_cpu: pct(after.server_ticks, before.server_ticks),
        server_rss_mb: after.rss.0 as f64 / 1048576.0,
        server_hwm_mb: after.rss.1 as f64 / 1048576.0,
        generator_cpu: pct(after.gen_ticks, before.gen_ticks),
        db_cpu: db_secs.map_or(0.0, |s| 100.0 * s / secs),
        wal_bytes_per_event: wal,
        fpi_per_event: fpi,
        fsyncs_per_event: fsync,
        page_writes_per_event: pages,
        db_cpu_us_per_event: cpu_per_event.map(|s| s * 1e6),
        db_cpu_by_kind,
        commits_per_s: db.map_or(0.0, |d| d.xact_commit as f64 / secs),
        db_core_busy: busy(before.db_cpu_busy, after.db_cpu_busy),
        app_core_busy: busy(before.app_cpu_busy, after.app_cpu_busy),
        saturated: None,
        contended: None,
        projection,
        memory_peak: None,
    }
}

/// RSS summed over the processes (bytes).
fn rss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| procstat::memory(*p))
        .map(|m| m.0)
        .sum()
}

/// Reads the server's RSS every 250 ms for `duration`, scraping its metrics with every
/// fourth read ([`report::MemoryPeak`]).
async fn watch_memory(target: &Target, client: &HttpClient, duration: Duration) -> MemoryPeak {
    const MB: f64 = 1048576.0;
    let pids = target.pids();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = MemoryPeak::default();
    while started.elapsed() < duration {
        tick.tick().await;
        let at_s = started.elapsed().as_secs_f64();
        let rss_mb = rss_bytes(&pids) as f64 / MB;
        if rss_mb > peak.rss_mb {
            (peak.rss_mb, peak.at_s) = (rss_mb, at_s);
        }
        if peak.reads % 4 == 0
            && let Some(m) = target.metrics(client).await
            && peak.scraped.as_ref().is_none_or(|s| rss_mb > s.rss_mb)
        {
            peak.scraped = Some(MemorySample {
                rss_mb,
                at_s,
                buffer_events: m.buffer_events,
                buffer_mb: m.buffer_bytes.map(|b| b / MB),
                bodies_mb: m.body_bytes_held.map(|b| b / MB),
                connections: m.connections,
            });
        }
        peak.reads += 1;
    }
    peak
}

/// Runs and measures one step.
async fn step(
    ctx: &mut Ctx,
    load: &mut Load,
    target: &mut Target,
    label: String,
    rate: f64,
    judge: bool,
) -> anyhow::Result<StepRow> {
    let before = probe(ctx, target).await;
    let spec = StepSpec {
        rate,
        duration: ctx.opts.step,
        segment_starts: vec![],
    };
    // Memory through the schedule; the buffer and spool when the schedule ends (not after
    // the stragglers are answered).
    let at_end = async {
        let peak = watch_memory(target, &ctx.client, spec.duration).await;
        (peak, target.metrics(&ctx.client).await)
    };
    let (result, (memory_peak, end_metrics)) = tokio::join!(
        load.driver.run(&mut load.workload, &load.ledger, &spec),
        at_end
    );
    let after = probe(ctx, target).await;
    if let Some(dead) = target.exited() {
        bail!("during the step: {dead}");
    }
    let mut row = row_from(ctx, label, &before, &after, &result);
    row.memory_peak = Some(memory_peak);
    if let Some(m) = end_metrics {
        row.buffer_end = Some(m.buffer_events);
        row.spool_end = Some(m.spool_bytes);
        row.connections_end = m.connections;
    }
    if judge {
        let accepted = row.acked_per_s * (after.at - before.at).as_secs_f64();
        row.saturated = ctx.opts.rule.judge(
            &row,
            before.metrics.as_ref().map(|m| m.buffer_events),
            accepted,
        );
        // The bus's writers falling behind: the stream's backlog grew during the step by
        // more than 5% of the requests (a request is one message), past 1,000.
        if let (Some(b0), Some(b1)) = (before.backlog, after.backlog) {
            let grew = b1.saturating_sub(b0);
            if grew as f64 > (0.05 * row.requests as f64).max(1000.0) {
                let note = format!("the stream's backlog grew by {grew} messages");
                row.saturated = Some(match row.saturated.take() {
                    Some(w) => format!("{w}; {note}"),
                    None => note,
                });
            }
        }
        if result.max_schedule_lag > Duration::from_millis(200) {
            let note = format!(
                "load generator fell {} ms behind schedule",
                result.max_schedule_lag.as_millis()
            );
            row.saturated = Some(match row.saturated.take() {
                Some(w) => format!("{w}; {note}"),
                None => note,
            });
        }
    }
    row.mark_contention();
    println!("{}", row.console());
    Ok(row)
}

/// Waits until the service's buffer and spool are empty.
async fn drain(
    ctx: &mut Ctx,
    target: &mut Target,
    timeout: Duration,
) -> anyhow::Result<ServiceMetrics> {
    if !target.has_metrics() {
        return Ok(ServiceMetrics::default());
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dead) = target.exited() {
            bail!("{dead}");
        }
        // The bus: also nothing left in the stream (a writer acks only after its commit).
        let backlog = if target.is_bus() {
            target.backlog().await
        } else {
            Some(0)
        };
        if let Some(m) = target.metrics(&ctx.client).await
            && m.buffer_events == 0.0
            && m.spool_bytes == 0.0
            && backlog == Some(0)
        {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!(
                "the service did not drain within {timeout:?} (buffer, spool or stream not empty)"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Before a step, while this test is idle: waits (at most `--quiet-wait`) until neither core
/// is more than [`report::CONTENDED_PCT`] busy over two seconds, so that other work on a
/// shared machine does not land in the measurement. Returns how long it waited.
async fn wait_quiet(ctx: &mut Ctx) -> Duration {
    let max = ctx.opts.quiet_wait;
    let started = Instant::now();
    let mut said = false;
    loop {
        let a = (
            procstat::cpu_busy(ctx.opts.db_cpu),
            procstat::cpu_busy(ctx.opts.app_cpu),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = (
            procstat::cpu_busy(ctx.opts.db_cpu),
            procstat::cpu_busy(ctx.opts.app_cpu),
        );
        let pct = |x: Option<(u64, u64)>, y: Option<(u64, u64)>| match (x, y) {
            (Some(x), Some(y)) => busy(x, y),
            _ => 0.0,
        };
        let (db, app) = (pct(a.0, b.0), pct(a.1, b.1));
        let waited = started.elapsed();
        if (db <= report::CONTENDED_PCT && app <= report::CONTENDED_PCT) || waited >= max {
            if said {
                eprintln!(
                    "... waited {:.0} s (cores now {db:.0}% / {app:.0}% busy)",
                    waited.as_secs_f64()
                );
            }
            ctx.quiet_waited += waited;
            return waited;
        }
        if !said {
            eprintln!(
                "the machine is busy (database core {db:.0}%, application core {app:.0}%): waiting up to {} s before the next step",
                max.as_secs()
            );
            said = true;
        }
    }
}

/// A judged step at `rate`, pushed to `phase`; a step that saturated while other processes
/// took a large share of a core is run once more after a pause (both rows are kept), and the
/// second one decides. Whether it saturated.
async fn judged_step(
    ctx: &mut Ctx,
    load: &mut Load,
    target: &mut Target,
    phase: &mut PhaseResult,
    name: &str,
    rate: f64,
) -> anyhow::Result<bool> {
    drain(ctx, target, Duration::from_secs(180)).await?;
    wait_quiet(ctx).await;
    let mut row = step(ctx, load, target, format!("{name} {rate:.0}/s"), rate, true).await?;
    if row.saturated.is_some() && row.contended.is_some() {
        row.phase.push_str(" (contended; repeated)");
        phase.rows.push(row);
        eprintln!("the step saturated while contended: repeating it in 10 s");
        tokio::time::sleep(Duration::from_secs(10)).await;
        drain(ctx, target, Duration::from_secs(180)).await?;
        wait_quiet(ctx).await;
        row = step(ctx, load, target, format!("{name} {rate:.0}/s"), rate, true).await?;
    }
    let saturated = row.saturated.is_some();
    phase.rows.push(row);
    Ok(saturated)
}

/// Steps the rate up until a step saturates, then narrows the knee.
async fn ramp(
    ctx: &mut Ctx,
    load: &mut Load,
    target: &mut Target,
    name: &str,
    start: f64,
) -> anyhow::Result<PhaseResult> {
    let mut phase = PhaseResult::default();
    if !ctx.opts.rates.is_empty() {
        for rate in ctx.opts.rates.clone() {
            if judged_step(ctx, load, target, &mut phase, name, rate).await? {
                phase.first_saturated =
                    Some(phase.first_saturated.map_or(rate, |r: f64| r.min(rate)));
            } else {
                phase.best_ok = Some(phase.best_ok.map_or(rate, |r: f64| r.max(rate)));
            }
        }
        return Ok(phase);
    }
    let mut rate = start;
    loop {
        if judged_step(ctx, load, target, &mut phase, name, rate).await? {
            phase.first_saturated = Some(rate);
            break;
        }
        phase.best_ok = Some(rate);
        if rate * 2.0 > ctx.opts.max_rate {
            phase.notes.push(format!(
                "{name}: did not saturate up to {rate:.0} req/s (--max-rate)"
            ));
            break;
        }
        rate *= 2.0;
    }
    if let (Some(mut lo), Some(mut hi)) = (phase.best_ok, phase.first_saturated) {
        for _ in 0..ctx.opts.bisect {
            let mid = ((lo * hi).sqrt() / 50.0).round() * 50.0;
            if mid <= lo || mid >= hi {
                break;
            }
            if judged_step(ctx, load, target, &mut phase, name, mid).await? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        phase.best_ok = Some(lo);
        phase.first_saturated = Some(hi);
    }
    Ok(phase)
}

// ---- the service ----

fn service_env(
    ctx: &Ctx,
    public: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    spool: &std::path::Path,
) -> Vec<(String, String)> {
    let o = &ctx.opts;
    let s = &ctx.secrets;
    [
        ("DATABASE_URL", ctx.cluster.url()),
        ("REACHLY_LISTEN", public.to_string()),
        ("REACHLY_ADMIN_LISTEN", admin.to_string()),
        ("REACHLY_TOKEN_KEYS", s.token_keys_env.clone()),
        ("REACHLY_SPOOL_DIR", spool.display().to_string()),
        (
            "REACHLY_SENDGRID_PUBLIC_KEY",
            s.sendgrid_public_key_b64.clone(),
        ),
        ("REACHLY_MAILGUN_SIGNING_KEY", s.mailgun_key.clone()),
        ("REACHLY_DB_POOL_SIZE", o.pool_size.to_string()),
        ("REACHLY_WRITERS", o.writers.to_string()),
        ("REACHLY_FLUSH_MAX_EVENTS", o.flush_max_events.to_string()),
        ("REACHLY_FLUSH_INTERVAL_MS", o.flush_interval_ms.to_string()),
        ("REACHLY_BUFFER_MAX_EVENTS", o.buffer_max_events.to_string()),
        ("REACHLY_MIGRATE_ON_START", "false".into()),
        ("RUST_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(format!("127.0.0.1:{}", reachly_ingest::pgcluster::free_port()?).parse()?)
}

/// One `reachly-ingest serve` process pinned to the application CPU, with `extra`
/// environment on top of [`service_env`] and its own spool directory.
async fn spawn_serve(
    ctx: &mut Ctx,
    name: &'static str,
    tag: &str,
    extra: &[(String, String)],
) -> anyhow::Result<ServerProcess> {
    let program = ctx.opts.service_bin.clone();
    spawn_serve_bin(ctx, &program, name, tag, extra).await
}

/// [`spawn_serve`] of a given build of the service.
async fn spawn_serve_bin(
    ctx: &mut Ctx,
    program: &std::path::Path,
    name: &'static str,
    tag: &str,
    extra: &[(String, String)],
) -> anyhow::Result<ServerProcess> {
    let (public, admin) = (free_addr()?, free_addr()?);
    let spool = ctx.dir.join(format!("spool-{tag}"));
    std::fs::create_dir_all(&spool)?;
    let mut env = service_env(ctx, public, admin, &spool);
    env.extend_from_slice(extra);
    let mut s = ServerProcess::spawn(ServerSpec {
        name,
        program,
        args: &["serve"],
        env: &env,
        cpu: ctx.opts.app_cpu,
        public,
        admin: Some(admin),
        log: ctx.dir.join(format!("{tag}.log")),
    })?;
    s.wait_ready(&ctx.client, Duration::from_secs(60)).await?;
    Ok(s)
}

/// The single process: everything in one `reachly-ingest serve` (the embedded default).
async fn start_service(ctx: &mut Ctx) -> anyhow::Result<Target> {
    Ok(Target::single(
        spawn_serve(ctx, "reachly-ingest", "service", &[]).await?,
    ))
}

/// The bus deployment on this box: a 3-node NATS JetStream cluster, `--bus-writers`
/// writer processes (durable pull consumer, same batch transaction) and `--bus-edges` edge
/// processes (accept and publish), everything on the application CPU as the single
/// process is. Writers start first, so the stream and its consumer exist when traffic comes.
async fn start_bus(ctx: &mut Ctx) -> anyhow::Result<Target> {
    let nats = NatsCluster::start(&ctx.dir, ctx.opts.app_cpu).await?;
    let urls = nats.urls();
    let bus = |role: &str| {
        vec![
            ("REACHLY_BUS_URL".to_string(), urls.clone()),
            ("REACHLY_BUS_ROLE".to_string(), role.to_string()),
        ]
    };
    let mut writers = Vec::new();
    for i in 0..ctx.opts.bus_writers {
        writers
            .push(spawn_serve(ctx, "writer", &format!("writer-{}", i + 1), &bus("writer")).await?);
    }
    let mut edges = Vec::new();
    for i in 0..ctx.opts.bus_edges {
        edges.push(spawn_serve(ctx, "edge", &format!("edge-{}", i + 1), &bus("edge")).await?);
    }
    Ok(Target::bus(edges, writers, nats))
}

/// Stops a target with SIGTERM; whether every process exited 0, and what each did.
async fn stop_target(target: Target, timeout: Duration) -> anyhow::Result<(bool, String)> {
    let exits = target.stop(timeout).await?;
    let ok = exits.iter().all(|(_, st)| st.success());
    let text = exits
        .iter()
        .map(|(n, st)| format!("{n}: {st}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((ok, text))
}

/// Whether both webhook providers answer (200 for a signed empty SendGrid batch, 401 for a
/// badly signed Mailgun post); the mix to use and a note.
async fn webhook_mix(ctx: &Ctx, base: &str) -> anyhow::Result<(Mix, Option<String>)> {
    let mix = ctx.opts.mix.clone();
    if ctx.opts.webhooks == Webhooks::Off || (mix.sendgrid == 0.0 && mix.mailgun == 0.0) {
        return Ok((
            mix.without_webhooks(),
            Some("webhooks left out (--webhooks off)".into()),
        ));
    }
    let w = Workload::new(ctx.tenants.clone(), ctx.secrets.clone(), mix.clone(), 1);
    let sg = crate::driver::send(&ctx.client, base, &w.sendgrid_probe()).await?;
    let mg = crate::driver::send(&ctx.client, base, &w.mailgun_probe()).await?;
    let ok = sg == 200 && mg == 401;
    match (ok, ctx.opts.webhooks) {
        (true, _) => Ok((mix, None)),
        (false, Webhooks::On) => bail!(
            "the service does not take the webhooks (SendGrid probe {sg}, expected 200; Mailgun probe {mg}, expected 401)"
        ),
        (false, _) => {
            let note = format!(
                "webhooks left out: the service does not implement them yet (SendGrid probe answered {sg}, Mailgun {mg}); the mix is pixels and clicks only"
            );
            eprintln!("NOTE: {note}");
            Ok((mix.without_webhooks(), Some(note)))
        }
    }
}

/// One smoke step against `target` at the smoke rate, drained and checked exactly once;
/// whether it passed and its Markdown. The database is reset first.
async fn smoke_step(
    ctx: &mut Ctx,
    mut target: Target,
    label: &str,
) -> anyhow::Result<(bool, String)> {
    let (mix, note) = webhook_mix(ctx, &target.bases()[0]).await?;
    let mut load = Load::new(target.bases(), ctx, mix, 42);
    let rate = ctx.opts.smoke_rate;
    let row = step(
        ctx,
        &mut load,
        &mut target,
        format!("{label} {rate:.0}/s"),
        rate,
        true,
    )
    .await?;
    let drained = drain(ctx, &mut target, Duration::from_secs(120)).await?;
    let verdict = verify::check(&ctx.cluster.url(), &take_ledger(&load.ledger)).await?;
    println!("{label}: {}", verdict.summary());
    let (exit_ok, exits) = stop_target(target, Duration::from_secs(30)).await?;
    let mut passed = verdict.ok && exit_ok && drained.dropped_total() == 0.0;
    let mut s = String::new();
    if let Some(n) = note {
        s.push_str(&format!("> {n}\n\n"));
    }
    s.push_str(&report::steps_table(std::slice::from_ref(&row), true));
    s.push_str(&format!(
        "\n{}\n\nexit on SIGTERM: {exits}; events dropped: {}\n",
        verdict.summary(),
        drained.dropped_total()
    ));
    if row.failures > 0 {
        s.push_str(&format!(
            "\n{} requests failed (unexpected status or no answer)\n",
            row.failures
        ));
        passed = false;
    }
    Ok((passed, s))
}

/// The smoke: one low-rate step of the single process, then (unless `--skip-bus`) one of
/// the bus deployment, each with the exactly-once check.
async fn smoke(ctx: &mut Ctx) -> anyhow::Result<(bool, String, Option<ChartData>)> {
    let target = start_service(ctx).await?;
    let (mut passed, mut s) = smoke_step(ctx, target, "smoke").await?;
    if !ctx.opts.skip_bus {
        eprintln!("== bus smoke");
        seed::reset(&ctx.cluster.url()).await?;
        let target = start_bus(ctx).await?;
        let (ok, md) = smoke_step(ctx, target, "bus smoke").await?;
        passed &= ok;
        s.push_str(&format!(
            "\n### Bus mode ({} edges, {} writers, 3-node NATS JetStream)\n\n{md}",
            ctx.opts.bus_edges, ctx.opts.bus_writers
        ));
    }
    Ok((passed, s, None))
}

/// The rate of a phase's half-rate steps: half its first saturated rate (or of its best
/// rate if none saturated); with `--rates`, `--half-rate` or none.
fn half_rate(ctx: &Ctx, phase: &PhaseResult) -> Option<f64> {
    if !ctx.opts.rates.is_empty() {
        return ctx.opts.half_rate;
    }
    Some(match (phase.first_saturated, phase.best_ok) {
        (Some(s), _) => s / 2.0,
        (None, Some(ok)) => ok / 2.0,
        _ => ctx.opts.start_rate / 2.0,
    })
}

/// How many times larger (and rarer) SendGrid's batches are in the step after the half
/// step: 100 -> 1,000 events per request at the default mix.
const SENDGRID_BATCH_FACTOR: usize = 10;

/// The steps at half the saturation rate, after the ramp: the phase's mix, then the same
/// events per request with SendGrid's batches [`SENDGRID_BATCH_FACTOR`] times larger (issue
/// 14: tracking latency must not feel large webhook batches arriving beside steady pixel
/// traffic). The mix is the phase's again afterwards.
async fn half_steps(
    ctx: &mut Ctx,
    load: &mut Load,
    target: &mut Target,
    name: &str,
    half_rate: f64,
    phase: &mut PhaseResult,
) -> anyhow::Result<()> {
    drain(ctx, target, Duration::from_secs(180)).await?;
    wait_quiet(ctx).await;
    let half = step(
        ctx,
        load,
        target,
        format!("{name} half {half_rate:.0}/s"),
        half_rate,
        true,
    )
    .await?;
    phase.rows.push(half);
    let mix = load.workload.mix().clone();
    if mix.sendgrid > 0.0 {
        let big = mix.with_sendgrid_batches_times(SENDGRID_BATCH_FACTOR);
        let label = format!(
            "{name} half {half_rate:.0}/s, SendGrid batches of {}",
            big.sendgrid_batch
        );
        load.workload.set_mix(big);
        drain(ctx, target, Duration::from_secs(180)).await?;
        wait_quiet(ctx).await;
        let row = step(ctx, load, target, label, half_rate, true).await;
        load.workload.set_mix(mix);
        phase.rows.push(row?);
    }
    Ok(())
}

// ---- the full run ----

async fn full(ctx: &mut Ctx) -> anyhow::Result<(bool, String, Option<ChartData>)> {
    let mut passed = true;
    let mut verdicts: Vec<(String, Verdict)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // 1. The service. Reset first, as before every other phase (the reset compacts contacts,
    // so every phase starts on the same contacts pages).
    eprintln!("== service ramp");
    seed::reset(&ctx.cluster.url()).await?;
    let mut server = start_service(ctx).await?;
    let (mix, note) = webhook_mix(ctx, &server.bases()[0]).await?;
    notes.extend(note);
    let mut load = Load::new(server.bases(), ctx, mix.clone(), 42);
    if ctx.cluster.preload_stats {
        ctx.monitor
            .execute("SELECT pg_stat_statements_reset()")
            .await?;
    }
    // Per-table counters of this phase only (pg_stat_wal and pg_stat_bgwriter are shared
    // statistics, not reset by this).
    ctx.monitor.execute("SELECT pg_stat_reset()").await?;
    let phase_start_db = ctx.monitor.stats().await.ok();
    let page_sampler = if crate::pagewrites::available(&ctx.cluster.url()).await {
        Some(crate::pagewrites::Sampler::start(&ctx.cluster.url(), ctx.opts.db_cpu).await?)
    } else {
        notes.push("pg_buffercache is not available: no per-relation page writes".into());
        None
    };
    let phase_start_metrics = server
        .metrics(&ctx.client)
        .await
        .context("the service's metrics")?;
    let mut service = ramp(ctx, &mut load, &mut server, "service", ctx.opts.start_rate).await?;
    if let Some(half_rate) = half_rate(ctx, &service) {
        half_steps(
            ctx,
            &mut load,
            &mut server,
            "service",
            half_rate,
            &mut service,
        )
        .await?;
    }
    let drained = drain(ctx, &mut server, Duration::from_secs(300)).await?;
    let page_attribution = match page_sampler {
        Some(s) => match s.finish().await {
            Ok(a) => Some(a),
            Err(e) => {
                notes.push(format!("per-relation page writes not measured: {e:#}"));
                None
            }
        },
        None => None,
    };
    ctx.monitor.execute("CHECKPOINT").await?;
    let phase_end_db = ctx.monitor.stats().await.ok();
    let verdict = verify::check(&ctx.cluster.url(), &take_ledger(&load.ledger)).await?;
    println!("service: {}", verdict.summary());
    passed &= verdict.ok && drained.dropped_total() == 0.0;
    service.verdict = Some(verdict.clone());
    verdicts.push(("service ramp".into(), verdict));
    let phase_events = drained.written_total() - phase_start_metrics.written_total();
    let phase_pages_counted = match (phase_start_db, phase_end_db) {
        (Some(a), Some(b)) => {
            let d = b.delta(&a);
            Some((d.page_writes as f64, d.pages_by))
        }
        _ => None,
    };
    let phase_pages_per_event = per_event(phase_start_db, phase_end_db, phase_events, |s| {
        s.page_writes
    });
    let phase_extended_per_event = per_event(phase_start_db, phase_end_db, phase_events, |s| {
        s.relation_pages
    });
    report::apply_phase_pages(&mut service.rows, phase_pages_per_event);
    let statements = top_statements(&ctx.cluster.url()).await;
    let tables = table_stats(&ctx.cluster.url()).await;
    let dump_path = ctx.dir.join("events.bin");
    let dumped = if ctx.opts.skip_limit {
        0
    } else {
        limit::dump(&ctx.cluster.url(), &dump_path, ctx.opts.limit_max_events).await?
    };

    // 2. The outage.
    let mut outage_result = None;
    if !ctx.opts.skip_outage {
        eprintln!("== outage");
        seed::reset(&ctx.cluster.url()).await?;
        let rate = ctx.opts.outage_rate.unwrap_or_else(|| {
            (service.best_ok.unwrap_or(ctx.opts.start_rate) * 0.25).clamp(100.0, 2000.0)
        });
        wait_quiet(ctx).await;
        let o = outage(ctx, &load.driver, &mut server, mix.clone(), rate).await?;
        passed &= o.ok;
        verdicts.push(("outage".into(), o.verdict.clone()));
        outage_result = Some(o);
    }
    let (exit_ok, exits) = stop_target(server, Duration::from_secs(60)).await?;
    if !exit_ok {
        passed = false;
        notes.push(format!("the service did not exit 0 on SIGTERM ({exits})"));
    }

    // 2b. The bus deployment, ramped like the single process.
    let mut bus = PhaseResult::default();
    if !ctx.opts.skip_bus {
        eprintln!(
            "== bus ramp ({} edges, {} writers, 3-node NATS JetStream)",
            ctx.opts.bus_edges, ctx.opts.bus_writers
        );
        seed::reset(&ctx.cluster.url()).await?;
        let mut target = start_bus(ctx).await?;
        let mut bload = Load::new(target.bases(), ctx, mix.clone(), 4343);
        bus = ramp(ctx, &mut bload, &mut target, "bus", ctx.opts.start_rate).await?;
        let bus_half = match (bus.first_saturated, bus.best_ok) {
            (Some(s), _) => s / 2.0,
            (None, Some(ok)) => ok / 2.0,
            _ => ctx.opts.start_rate / 2.0,
        };
        if ctx.opts.rates.is_empty() {
            drain(ctx, &mut target, Duration::from_secs(180)).await?;
            wait_quiet(ctx).await;
            let half = step(
                ctx,
                &mut bload,
                &mut target,
                format!("bus half {bus_half:.0}/s"),
                bus_half,
                true,
            )
            .await?;
            bus.rows.push(half);
        }
        let drained = drain(ctx, &mut target, Duration::from_secs(300)).await?;
        let verdict = verify::check(&ctx.cluster.url(), &take_ledger(&bload.ledger)).await?;
        println!("bus: {}", verdict.summary());
        passed &= verdict.ok && drained.dropped_total() == 0.0;
        bus.verdict = Some(verdict.clone());
        verdicts.push(("bus ramp".into(), verdict));
        let (exit_ok, exits) = stop_target(target, Duration::from_secs(60)).await?;
        if !exit_ok {
            passed = false;
            notes.push(format!("a bus process did not exit 0 on SIGTERM ({exits})"));
        }
    }

    // 2c. The baseline: another build of the service, ramped like this one on the freshly
    // reset database, with the same request sequence (same generator seed).
    let mut baseline: Option<BaselineResult> = None;
    if let Some((bin, name)) = ctx.opts.baseline.clone() {
        eprintln!("== baseline ramp ({name}: {})", bin.display());
        seed::reset(&ctx.cluster.url()).await?;
        // The baseline makes its own day partitions at start-up, as it would in production.
        seed::drop_day_partitions(&ctx.cluster.url()).await?;
        if let Some((before, _)) = &ctx.opts.baseline_schema_sql {
            apply_sql_file(&ctx.cluster.url(), before).await?;
        }
        wait_quiet(ctx).await;
        let mut target =
            Target::single(spawn_serve_bin(ctx, &bin, "baseline", "baseline", &[]).await?);
        let mut bload = Load::new(target.bases(), ctx, mix.clone(), 42);
        ctx.monitor.execute("SELECT pg_stat_reset()").await?;
        let db0 = ctx.monitor.stats().await.ok();
        let m0 = target
            .metrics(&ctx.client)
            .await
            .context("the baseline's metrics")?;
        let sampler = if crate::pagewrites::available(&ctx.cluster.url()).await {
            Some(crate::pagewrites::Sampler::start(&ctx.cluster.url(), ctx.opts.db_cpu).await?)
        } else {
            None
        };
        let mut phase = ramp(
            ctx,
            &mut bload,
            &mut target,
            "baseline",
            ctx.opts.start_rate,
        )
        .await?;
        if let Some(half_rate) = half_rate(ctx, &phase) {
            half_steps(
                ctx,
                &mut bload,
                &mut target,
                "baseline",
                half_rate,
                &mut phase,
            )
            .await?;
        }
        let drained = drain(ctx, &mut target, Duration::from_secs(300)).await?;
        let attribution = match sampler {
            Some(s) => s.finish().await.ok(),
            None => None,
        };
        ctx.monitor.execute("CHECKPOINT").await?;
        let db1 = ctx.monitor.stats().await.ok();
        let verdict = verify::check(&ctx.cluster.url(), &take_ledger(&bload.ledger)).await?;
        println!("baseline: {}", verdict.summary());
        passed &= verdict.ok && drained.dropped_total() == 0.0;
        verdicts.push((format!("baseline ramp ({name})"), verdict.clone()));
        phase.verdict = Some(verdict);
        let events = drained.written_total() - m0.written_total();
        let pages_per_event = per_event(db0, db1, events, |s| s.page_writes);
        let extended = per_event(db0, db1, events, |s| s.relation_pages);
        report::apply_phase_pages(&mut phase.rows, pages_per_event);
        let (exit_ok, exits) = stop_target(target, Duration::from_secs(60)).await?;
        if !exit_ok {
            notes.push(format!("the baseline did not exit 0 on SIGTERM ({exits})"));
        }
        // Its own row counts (the statistics were reset at its start), before its day
        // partitions go.
        let tables = table_stats(&ctx.cluster.url()).await;
        // The phases after this one run on this build's partitions again.
        seed::drop_day_partitions(&ctx.cluster.url()).await?;
        seed::make_day_partitions(&ctx.cluster.url()).await?;
        baseline = Some(BaselineResult {
            name,
            phase,
            pages_per_event,
            extended_per_event: extended,
            attribution,
            events,
            tables,
            schema_sql: ctx
                .opts
                .baseline_schema_sql
                .clone()
                .map(|(before, _)| before),
        });
        if let Some((_, after)) = &ctx.opts.baseline_schema_sql {
            seed::reset(&ctx.cluster.url()).await?;
            apply_sql_file(&ctx.cluster.url(), after).await?;
        }
    }

    // 3. The naive server.
    let mut naive = PhaseResult::default();
    let mut naive_pages_per_event = None;
    if !ctx.opts.skip_naive {
        eprintln!("== naive ramp");
        seed::reset(&ctx.cluster.url()).await?;
        let port = reachly_ingest::pgcluster::free_port()?;
        let public: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let env = vec![
            ("DATABASE_URL".to_string(), ctx.cluster.url()),
            (
                "REACHLY_TOKEN_KEYS".to_string(),
                ctx.secrets.token_keys_env.clone(),
            ),
        ];
        let pool = ctx.opts.naive_pool_size.to_string();
        let listen = public.to_string();
        let mut np = ServerProcess::spawn(ServerSpec {
            name: "naive-server",
            program: &ctx.opts.naive_bin,
            args: &["--listen", &listen, "--pool-size", &pool],
            env: &env,
            cpu: ctx.opts.app_cpu,
            public,
            admin: None,
            log: ctx.dir.join("naive.log"),
        })?;
        np.wait_ready(&ctx.client, Duration::from_secs(30)).await?;
        let mut nserver = Target::single(np);
        let mut nload = Load::new(nserver.bases(), ctx, mix.without_webhooks(), 4242);
        let naive_db0 = ctx.monitor.stats().await.ok();
        naive = ramp(
            ctx,
            &mut nload,
            &mut nserver,
            "naive",
            ctx.opts.naive_start_rate,
        )
        .await?;
        ctx.monitor.execute("CHECKPOINT").await?;
        let naive_db1 = ctx.monitor.stats().await.ok();
        let verdict = verify::check(&ctx.cluster.url(), &take_ledger(&nload.ledger)).await?;
        println!("naive: {}", verdict.summary());
        passed &= verdict.ok;
        let pages = per_event(
            naive_db0,
            naive_db1,
            verdict.stored_tracking_rows as f64,
            |s| s.page_writes,
        );
        report::apply_phase_pages(&mut naive.rows, pages);
        naive_pages_per_event = pages;
        verdicts.push(("naive ramp".into(), verdict));
        let _ = nserver.stop(Duration::from_secs(20)).await;
    }

    // 4. The limit.
    let mut limit_row: Option<(limit::LimitResult, StepRow)> = None;
    if !ctx.opts.skip_limit && dumped > 0 {
        eprintln!("== limit: {dumped} events, one COPY + one UPDATE");
        seed::reset(&ctx.cluster.url()).await?;
        wait_quiet(ctx).await;
        let db0 = ctx.monitor.stats().await.ok();
        let t0 = ctx.cluster.cpu_ticks();
        let k0 = ctx.cluster.cpu_by_kind();
        let r = limit::load(&ctx.cluster.url(), &dump_path, dumped).await?;
        ctx.monitor.execute("CHECKPOINT").await?;
        let db1 = ctx.monitor.stats().await.ok();
        let t1 = ctx.cluster.cpu_ticks();
        let k1 = ctx.cluster.cpu_by_kind();
        let secs = r.total.as_secs_f64();
        let ev = r.events as f64;
        let d = match (db0, db1) {
            (Some(a), Some(b)) => Some(b.delta(&a)),
            _ => None,
        };
        let cpu = match (t0, t1) {
            (Some(a), Some(b)) => Some((b - a) as f64 / ctx.ticks),
            _ => None,
        };
        let wal = d.map(|d| d.wal_lsn as f64 / ev);
        let ios = d.map(|d| (d.wal_sync + d.page_writes) as f64 / ev);
        let row = StepRow {
            phase: format!("limit ({} events)", report::fmt_num(ev)),
            committed_per_s: r.events_per_second(),
            db_cpu: cpu.map_or(0.0, |c| 100.0 * c / secs),
            wal_bytes_per_event: wal,
            fpi_per_event: d.map(|d| d.wal_fpi as f64 / ev),
            fsyncs_per_event: d.map(|d| d.wal_sync as f64 / ev),
            page_writes_per_event: d.map(|d| d.page_writes as f64 / ev),
            db_cpu_us_per_event: cpu.map(|c| 1e6 * c / ev),
            db_cpu_by_kind: kinds_per_event(ctx.ticks, k0, k1, ev),
            projection: match (wal, ios, cpu) {
                (Some(w), Some(i), Some(c)) => Some(Projection::from_costs(w, i, c / ev)),
                _ => None,
            },
            ..Default::default()
        };
        println!(
            "limit: {} events in {:.1} s (COPY {:.1} s, UPDATE {:.1} s, {} messages): {:.0} events/s",
            r.events,
            secs,
            r.copy.as_secs_f64(),
            r.update.as_secs_f64(),
            r.messages_updated,
            r.events_per_second()
        );
        limit_row = Some((r, row));
    }

    // 5. The report.
    let body = full_report(FullReport {
        baseline: baseline.as_ref(),
        service: &service,
        bus: &bus,
        bus_shape: (ctx.opts.bus_edges, ctx.opts.bus_writers),
        naive: &naive,
        limit: limit_row.as_ref(),
        outage: outage_result.as_ref(),
        verdicts: &verdicts,
        notes: &notes,
        phase_pages_per_event,
        phase_extended_per_event,
        naive_pages_per_event,
        page_attribution: page_attribution
            .as_ref()
            .map(|a| (a, phase_events, phase_pages_counted)),
        statements: &statements,
        tables: &tables,
    });
    let chart = chart_data(
        &service,
        &naive,
        limit_row.as_ref().map(|(l, _)| l.events_per_second()),
    );
    Ok((passed, body, Some(chart)))
}

/// What the outage phase found.
struct OutageResult {
    md: String,
    verdict: Verdict,
    ok: bool,
    click_p99_before: Option<f64>,
    click_p99_during: Option<f64>,
    click_failures_during: u64,
}

/// The outage phase: the database stopped in the middle of a step.
async fn outage(
    ctx: &mut Ctx,
    driver: &Driver,
    server: &mut Target,
    mix: Mix,
    rate: f64,
) -> anyhow::Result<OutageResult> {
    let before_s = Duration::from_secs(10);
    let after_s = Duration::from_secs(20);
    let outage = ctx.opts.outage;
    let spec = StepSpec {
        rate,
        duration: before_s + outage + after_s,
        segment_starts: vec![Duration::ZERO, before_s, before_s + outage],
    };
    let mut workload = Workload::new(ctx.tenants.clone(), ctx.secrets.clone(), mix, 777);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let client = ctx.client.clone();
    let start = server.metrics(&ctx.client).await.unwrap_or_default();
    let peaks = Arc::new(Mutex::new((0f64, 0f64)));
    let cluster = ctx.cluster.clone();
    let chaos = async move {
        let t0 = Instant::now();
        tokio::time::sleep(before_s).await;
        let c = cluster.clone();
        let stopped = tokio::task::spawn_blocking(move || c.stop()).await;
        let down_at = t0.elapsed();
        tokio::time::sleep_until((t0 + before_s + outage).into()).await;
        let c = cluster.clone();
        let up = tokio::task::spawn_blocking(move || c.start()).await;
        (stopped, up, down_at)
    };
    let observed: &Target = server;
    let sampler = {
        let peaks = peaks.clone();
        async move {
            loop {
                if let Some(m) = observed.metrics(&client).await
                    && let Ok(mut p) = peaks.lock()
                {
                    p.0 = p.0.max(m.buffer_events);
                    p.1 = p.1.max(m.spool_bytes);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let script = async {
        tokio::select! {
            r = chaos => r,
            () = sampler => unreachable!("the sampler never ends"),
        }
    };
    let (result, (stopped, up, down_at)) =
        tokio::join!(driver.run(&mut workload, &ledger, &spec), script);
    stopped.context("join")?.context("stopping the database")?;
    up.context("join")?.context("restarting the database")?;
    ctx.monitor.forget();
    let drained = drain(ctx, server, Duration::from_secs(300)).await?;
    let verdict = verify::check(&ctx.cluster.url(), &take_ledger(&ledger)).await?;
    println!("outage: {}", verdict.summary());
    let (peak_buffer, peak_spool) = peaks.lock().map(|p| *p).unwrap_or_default();
    let names = ["before", "database down", "after restart"];
    let mut s = format!(
        "Offered {rate:.0} req/s for {:.0} s; the database was stopped (`pg_ctl stop -m fast`) at {:.1} s and started again {:.0} s after the stop began. Peak buffer {} events, peak spool {} bytes (sampled every 0.5 s); {} events written to the spool and {} replayed from it into the database (the phase through its drain); {} events dropped.\n\n\
         | window | requests | pixel p50 / p99 ms | click p50 / p99 / p99.9 ms | click failures | webhook p99 ms | webhook answers |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        spec.duration.as_secs_f64(),
        down_at.as_secs_f64(),
        outage.as_secs_f64(),
        report::fmt_num(peak_buffer),
        report::fmt_num(peak_spool),
        report::fmt_num(drained.spooled - start.spooled),
        report::fmt_num(drained.replayed - start.replayed),
        drained.dropped_total(),
    );
    let ms = |v: Option<f64>| v.map_or("-".into(), report::fmt_ms);
    for (i, seg) in result.segments.iter().enumerate() {
        let px = seg.route(Route::Pixel);
        let ck = seg.route(Route::Click);
        let mut wh = seg.route(Route::Sendgrid).clone();
        wh.merge(seg.route(Route::Mailgun));
        let answers = wh
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "| {} | {} | {} / {} | {} / {} / {} | {} | {} | {} |\n",
            names.get(i).unwrap_or(&"?"),
            seg.requests(),
            ms(px.ms(0.5)),
            ms(px.ms(0.99)),
            ms(ck.ms(0.5)),
            ms(ck.ms(0.99)),
            ms(ck.ms(0.999)),
            ck.bad_status + ck.errors,
            ms(wh.ms(0.99)),
            if answers.is_empty() {
                "-".into()
            } else {
                answers
            },
        ));
    }
    let click_p99_before = result
        .segments
        .first()
        .and_then(|s| s.route(Route::Click).ms(0.99));
    let click_p99_during = result
        .segments
        .get(1)
        .and_then(|s| s.route(Route::Click).ms(0.99));
    let click_failures_during = result.segments.get(1).map_or(0, |s| {
        s.route(Route::Click).bad_status + s.route(Route::Click).errors
    });
    s.push_str(&format!(
        "\nClick p99 before the outage {} ms, during it {} ms; {} click failures during it.\n\n{}\n",
        ms(click_p99_before),
        ms(click_p99_during),
        click_failures_during,
        verdict.summary()
    ));
    Ok(OutageResult {
        md: s,
        ok: verdict.ok && drained.dropped_total() == 0.0,
        verdict,
        click_p99_before,
        click_p99_during,
        click_failures_during,
    })
}

/// Rows inserted and updated (HOT or not) and sizes of the tables the service writes, as a
/// Markdown table (empty on error).
async fn table_stats(url: &str) -> String {
    let Ok(c) = reachly_ingest::db::connect(url).await else {
        return String::new();
    };
    let Ok(rows) = c
        .query(
            "SELECT CASE WHEN relname LIKE 'email_events%' THEN 'email_events (all partitions)' ELSE relname::text END, \
                    sum(n_tup_ins)::int8, sum(n_tup_upd)::int8, sum(n_tup_hot_upd)::int8, \
                    sum(pg_table_size(relid))::int8, sum(pg_indexes_size(relid))::int8, \
                    max((SELECT count(*) FROM pg_index i WHERE i.indrelid = relid))::int8, \
                    sum(autovacuum_count)::int8, sum(autoanalyze_count)::int8 \
             FROM pg_stat_user_tables \
             WHERE schemaname = 'public' AND (relname LIKE 'email_events%' OR relname IN ('campaign_messages', 'contacts')) \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
    else {
        return String::new();
    };
    let mut s = String::from(
        "| table | rows inserted | rows updated | of which HOT | heap MB | indexes MB | indexes | autovacuums / autoanalyzes in the phase |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let (name, ins, upd, hot, heap, idx, n): (String, i64, i64, i64, i64, i64, i64) = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        let (vacuums, analyzes): (i64, i64) = (r.get(7), r.get(8));
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {:.0} | {:.0} | {n} | {vacuums} / {analyzes} |\n",
            report::fmt_num(ins as f64),
            report::fmt_num(upd as f64),
            report::fmt_num(hot as f64),
            heap as f64 / 1048576.0,
            idx as f64 / 1048576.0,
        ));
    }
    s
}

/// A row of pg_stat_statements: calls, total ms, rows, blocks dirtied, blocks written, WAL
/// bytes, the statement's start.
type Statement = (i64, f64, i64, i64, i64, i64, String);

async fn top_statements(url: &str) -> Vec<Statement> {
    let Ok(c) = reachly_ingest::db::connect(url).await else {
        return Vec::new();
    };
    let Ok(rows) = c
        .query(
            "SELECT calls, total_exec_time, rows, shared_blks_dirtied, shared_blks_written, wal_bytes::int8, \
                    regexp_replace(query, '\\s+', ' ', 'g') \
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_exec_time DESC LIMIT 8",
            &[],
        )
        .await
    else {
        return Vec::new();
    };
    rows.iter()
        .map(|r| {
            let q: String = r.get(6);
            let q: String = q.chars().take(140).collect();
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                q,
            )
        })
        .collect()
}

/// How much of each core went to something other than the measured processes (other
/// tenants of the machine, kernel threads, interrupts), on average over the steps.
fn unaccounted_note(rows: &[StepRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let n = rows.len() as f64;
    let db = rows.iter().map(|r| r.unaccounted().0).sum::<f64>() / n;
    let app = rows.iter().map(|r| r.unaccounted().1).sum::<f64>() / n;
    let contended = rows.iter().filter(|r| r.contended.is_some()).count();
    format!(
        "\nCPU not accounted to the measured processes (other tenants of this machine, kernel threads, interrupts), mean over the steps: {db:.0}% of the database core, {app:.0}% of the application core; {contended} of {} steps contended (over {:.0}% of a core).\n",
        rows.len(),
        report::CONTENDED_PCT
    )
}

/// Per-relation page writes of a phase, its events, and the server's count of pages written
/// (total, and by checkpointer, background writer, backends).
type PageAttribution<'a> = (
    &'a crate::pagewrites::Attribution,
    f64,
    Option<(f64, [i64; 3])>,
);

struct FullReport<'a> {
    baseline: Option<&'a BaselineResult>,
    service: &'a PhaseResult,
    bus: &'a PhaseResult,
    bus_shape: (usize, usize),
    naive: &'a PhaseResult,
    limit: Option<&'a (limit::LimitResult, StepRow)>,
    outage: Option<&'a OutageResult>,
    verdicts: &'a [(String, Verdict)],
    notes: &'a [String],
    phase_pages_per_event: Option<f64>,
    /// Of those, relation extensions (new pages; see [`DbStats::relation_pages`]).
    phase_extended_per_event: Option<f64>,
    naive_pages_per_event: Option<f64>,
    /// Per-relation page writes of the service phase, its events and the server's count.
    page_attribution: Option<PageAttribution<'a>>,
    statements: &'a [Statement],
    tables: &'a str,
}

/// What the baseline phase (`--baseline-bin`) measured.
pub struct BaselineResult {
    pub name: String,
    pub phase: PhaseResult,
    pub pages_per_event: Option<f64>,
    /// Of those, relation extensions.
    pub extended_per_event: Option<f64>,
    pub attribution: Option<crate::pagewrites::Attribution>,
    /// Events it committed in its phase.
    pub events: f64,
    /// Rows inserted and updated per table over its phase ([`table_stats`]).
    pub tables: String,
    /// The `--baseline-schema-sql` file applied before it, if any.
    pub schema_sql: Option<PathBuf>,
}

/// A server counter's growth between two readings, per event (page writes, relation
/// extensions); never negative.
fn per_event(
    a: Option<DbStats>,
    b: Option<DbStats>,
    events: f64,
    counter: impl Fn(&DbStats) -> i64,
) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if events > 0.0 => {
            Some((counter(&b) - counter(&a)).max(0) as f64 / events)
        }
        _ => None,
    }
}

/// Runs the SQL of `file` on the database at `url` (`--baseline-schema-sql`).
async fn apply_sql_file(url: &str, file: &Path) -> anyhow::Result<()> {
    let sql =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    reachly_ingest::db::connect(url)
        .await?
        .batch_execute(&sql)
        .await
        .with_context(|| format!("applying {}", file.display()))?;
    eprintln!("schema: applied {}", file.display());
    Ok(())
}

/// The best step that did not saturate (the most events committed per second).
fn sustained(rows: &[StepRow]) -> Option<&StepRow> {
    rows.iter()
        .filter(|r| r.saturated.is_none())
        .max_by(|a, b| a.committed_per_s.total_cmp(&b.committed_per_s))
}

/// The ramp's steps that both phases ran, paired by offered rate (the half-rate steps and a
/// contended step's first try left out; a rate run twice counts by its last row). When one
/// build's ramp goes deeper, its phase totals include overload the other never saw; these
/// pairs compare like with like.
fn common_steps<'a>(a: &'a [StepRow], b: &'a [StepRow]) -> Vec<(&'a StepRow, &'a StepRow)> {
    let ramp = |rows: &'a [StepRow]| -> Vec<&'a StepRow> {
        rows.iter()
            .filter(|r| !r.phase.contains("half") && !r.phase.contains("repeated"))
            .collect()
    };
    let (a, b) = (ramp(a), ramp(b));
    let mut pairs: Vec<(&StepRow, &StepRow)> = Vec::new();
    for x in &a {
        if pairs.iter().any(|(p, _)| p.offered == x.offered) {
            continue;
        }
        let last =
            |rows: &[&'a StepRow]| rows.iter().rev().find(|r| r.offered == x.offered).copied();
        if let (Some(x), Some(y)) = (last(&a), last(&b)) {
            pairs.push((x, y));
        }
    }
    pairs.sort_by(|p, q| p.0.offered.total_cmp(&q.0.offered));
    pairs
}

/// A per-event figure over several steps, each weighted by the events it committed (the
/// steps last equally long, so events per second weigh them); `None` when a step lacks it.
fn per_event_over<'a>(
    rows: impl Iterator<Item = &'a StepRow>,
    figure: impl Fn(&StepRow) -> Option<f64>,
) -> Option<f64> {
    let (mut sum, mut weight) = (0.0, 0.0);
    for r in rows {
        sum += figure(r)? * r.committed_per_s;
        weight += r.committed_per_s;
    }
    (weight > 0.0).then(|| sum / weight)
}

/// The goals set side by side: this build against the baseline, as ratios.
fn baseline_section(
    service: &PhaseResult,
    service_pages: Option<f64>,
    service_extended: Option<f64>,
    service_attr: Option<(&crate::pagewrites::Attribution, f64)>,
    b: &BaselineResult,
) -> String {
    let schema = match &b.schema_sql {
        Some(f) => format!(
            " The database was migrated by this build; `{}` was applied before the baseline started, to give it the schema it was built for where this build's migrations changed what its writes meet.",
            f.display()
        ),
        None => " The database was migrated by this build, and the baseline ran on that schema."
            .to_string(),
    };
    let mut s = format!(
        "## Against the baseline ({}), measured in this run\n\nThe baseline build was ramped after the service on the same freshly reset database, with the same request sequence.{schema} Ratios are this build / the baseline.\n\n",
        b.name
    );
    s.push_str(&report::steps_table(&b.phase.rows, true));
    s.push_str(&report::memory_table(&b.phase.rows));
    let half = |p: &PhaseResult| {
        p.rows
            .iter()
            .find(|r| r.phase.contains("half"))
            .or_else(|| p.rows.last())
            .map(|r| {
                let p99 = |i: usize| r.latency[i][1].unwrap_or(f64::NAN);
                (r.phase.clone(), p99(0).max(p99(1)))
            })
    };
    let peak_rss = |p: &PhaseResult| p.rows.iter().map(|r| r.server_hwm_mb).fold(0.0, f64::max);
    let (a, z) = (sustained(&service.rows), sustained(&b.phase.rows));
    let mut t = String::from("\n| | this build | baseline | ratio |\n| --- | --- | --- | --- |\n");
    let mut line = |what: &str, x: Option<f64>, y: Option<f64>, digits: usize| {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let ratio = match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "-".into(),
        };
        t.push_str(&format!("| {what} | {} | {} | {ratio} |\n", f(x), f(y)));
    };
    line(
        "events committed/s, best step that did not saturate",
        a.map(|r| r.committed_per_s),
        z.map(|r| r.committed_per_s),
        0,
    );
    line(
        "database CPU us/event at that step",
        a.and_then(|r| r.db_cpu_us_per_event),
        z.and_then(|r| r.db_cpu_us_per_event),
        1,
    );
    line(
        "data pages written per event (phase, final CHECKPOINT included)",
        service_pages,
        b.pages_per_event,
        4,
    );
    line(
        "of which relation extensions (new pages, written again with their data)",
        service_extended,
        b.extended_per_event,
        4,
    );
    let sub = |p: Option<f64>, e: Option<f64>| Some(p? - e?);
    line(
        "data pages written per event, extensions not counted",
        sub(service_pages, service_extended),
        sub(b.pages_per_event, b.extended_per_event),
        4,
    );
    line(
        "projected B1ms ceiling, bursting (events/s)",
        a.and_then(|r| r.projection.map(|p| p.burst())),
        z.and_then(|r| r.projection.map(|p| p.burst())),
        0,
    );
    line(
        "projected B1ms ceiling, at baseline CPU (events/s)",
        a.and_then(|r| r.projection.map(|p| p.baseline())),
        z.and_then(|r| r.projection.map(|p| p.baseline())),
        0,
    );
    let (ha, hz) = (half(service), half(&b.phase));
    line(
        &format!(
            "tracking p99 ms (worse of pixel, click) at {} / {}",
            ha.as_ref().map_or("-", |h| h.0.as_str()),
            hz.as_ref().map_or("-", |h| h.0.as_str())
        ),
        ha.map(|h| h.1),
        hz.map(|h| h.1),
        2,
    );
    let batches = |p: &PhaseResult| {
        p.rows
            .iter()
            .find(|r| r.phase.contains("SendGrid batches"))
            .and_then(StepRow::tracking_p99)
    };
    line(
        &format!(
            "tracking p99 ms at the same rates with SendGrid batches {SENDGRID_BATCH_FACTOR} times larger"
        ),
        batches(service),
        batches(&b.phase),
        2,
    );
    line(
        "peak server RSS MB over the phase",
        Some(peak_rss(service)),
        Some(peak_rss(&b.phase)),
        0,
    );
    let common = common_steps(&service.rows, &b.phase.rows);
    if let (Some(lo), Some(hi)) = (common.first(), common.last()) {
        let over = format!(
            "over the {} ramp steps both ran ({}-{} req/s offered)",
            common.len(),
            report::fmt_num(lo.0.offered),
            report::fmt_num(hi.0.offered)
        );
        let mine = || common.iter().map(|p| p.0);
        let theirs = || common.iter().map(|p| p.1);
        line(
            &format!("database CPU us/event {over}"),
            per_event_over(mine(), |r| r.db_cpu_us_per_event),
            per_event_over(theirs(), |r| r.db_cpu_us_per_event),
            1,
        );
        line(
            &format!(
                "data pages written per event {over}, as each step counted them (pages dirtied in the last of them and written later not counted)"
            ),
            per_event_over(mine(), |r| r.page_writes_per_event),
            per_event_over(theirs(), |r| r.page_writes_per_event),
            4,
        );
        line(
            &format!("peak server RSS MB {over}"),
            Some(mine().map(|r| r.server_hwm_mb).fold(0.0, f64::max)),
            Some(theirs().map(|r| r.server_hwm_mb).fold(0.0, f64::max)),
            0,
        );
    }
    s.push_str(&t);
    if let (Some((mine, my_events)), Some(theirs)) = (service_attr, b.attribution.as_ref()) {
        s.push_str("\n| relation | kind | this build, pages per 1,000 events | baseline | ratio |\n| --- | --- | --- | --- | --- |\n");
        let per = |pages: u64, ev: f64| 1000.0 * pages as f64 / ev.max(1.0);
        let mut names: Vec<(String, String)> = Vec::new();
        for (rel, kind, _, _) in mine.rows.iter().chain(theirs.rows.iter()) {
            if !names.iter().any(|(n, _)| n == rel) {
                names.push((rel.clone(), kind.clone()));
            }
        }
        let find = |a: &crate::pagewrites::Attribution, rel: &str| {
            a.rows.iter().find(|r| r.0 == rel).map_or(0, |r| r.3)
        };
        let total = (mine.total() + theirs.total()).max(1) as f64;
        for (rel, kind) in names {
            let (x, y) = (find(mine, &rel), find(theirs, &rel));
            if ((x + y) as f64) < total * 0.004 {
                continue;
            }
            let (px, py) = (per(x, my_events), per(y, b.events));
            let ratio = if py > 0.0 {
                format!("{:.2}", px / py)
            } else {
                "-".into()
            };
            s.push_str(&format!(
                "| {rel} | {kind} | {px:.1} | {py:.1} | {ratio} |\n"
            ));
        }
        s.push_str(&format!(
            "| **all attributed** | | {:.1} | {:.1} | {} |\n",
            per(mine.total(), my_events),
            per(theirs.total(), b.events),
            if theirs.total() > 0 {
                format!(
                    "{:.2}",
                    per(mine.total(), my_events) / per(theirs.total(), b.events)
                )
            } else {
                "-".into()
            }
        ));
    }
    s.push('\n');
    s
}

fn full_report(r: FullReport<'_>) -> String {
    let mut s = String::new();
    for n in r
        .notes
        .iter()
        .chain(&r.service.notes)
        .chain(&r.bus.notes)
        .chain(&r.naive.notes)
    {
        s.push_str(&format!("> {n}\n\n"));
    }
    s.push_str("## Service (reachly-ingest serve)\n\n");
    s.push_str(&report::steps_table(&r.service.rows, true));
    s.push_str(&unaccounted_note(&r.service.rows));
    s.push_str(&report::memory_table(&r.service.rows));
    if !r.bus.rows.is_empty() {
        s.push_str(&bus_section(r.service, r.bus, r.bus_shape));
    }
    if !r.naive.rows.is_empty() {
        s.push_str(
            "\n## Naive reference (one INSERT + one UPDATE per request, before answering)\n\n",
        );
        s.push_str(&report::steps_table(&r.naive.rows, false));
        s.push_str(&unaccounted_note(&r.naive.rows));
    }
    if let Some((lr, row)) = r.limit {
        s.push_str(&format!(
            "\n## Limit reference (one COPY into email_events + one set-based UPDATE, no HTTP)\n\n\
             {} events in {:.1} s (COPY {:.1} s, UPDATE of {} messages {:.1} s): **{} events/s**; database CPU {:.0}%, {} bytes of WAL and {} us of database CPU per event.\n",
            report::fmt_num(lr.events as f64),
            lr.total.as_secs_f64(),
            lr.copy.as_secs_f64(),
            lr.messages_updated,
            lr.update.as_secs_f64(),
            report::fmt_num(row.committed_per_s),
            row.db_cpu,
            row.wal_bytes_per_event.map_or("-".into(), |v| format!("{v:.0}")),
            row.db_cpu_us_per_event.map_or("-".into(), |v| format!("{v:.1}")),
        ));
    }
    if let Some(o) = r.outage {
        s.push_str("\n## Database outage during a step\n\n");
        s.push_str(&o.md);
    }

    // Summary and ratios.
    s.push_str("\n## Summary\n\n");
    let svc = r.service.sustained();
    let svc_peak = r.service.peak();
    let nv = r.naive.sustained();
    let lim = r.limit.map(|(l, _)| l.events_per_second());
    let f = |v: Option<f64>| v.map_or("-".into(), report::fmt_num);
    let capacity = |row: &StepRow| {
        row.db_cpu_us_per_event
            .filter(|c| *c > 0.0)
            .map(|c| 1e6 / c)
    };
    let ceiling = |row: &StepRow| {
        row.projection.map_or("-".into(), |p| {
            format!(
                "{} / {}",
                report::fmt_num(p.burst()),
                report::fmt_num(p.baseline())
            )
        })
    };
    s.push_str(
        "| | step | events committed/s here | DB CPU us/event | events/s one database core could take (1e6 / us) | B1ms ceiling, burst / baseline |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    let mut line = |name: &str, x: Option<(f64, &StepRow)>| {
        if let Some((v, row)) = x {
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} |\n",
                row.phase,
                report::fmt_num(v),
                row.db_cpu_us_per_event
                    .map_or("-".into(), |c| format!("{c:.1}")),
                f(capacity(row)),
                ceiling(row)
            ));
        }
    };
    line("service, sustained (best step that did not saturate)", svc);
    line("service, peak (any step)", svc_peak);
    line("naive, sustained", nv);
    if let Some((_, row)) = r.limit {
        line(
            "limit (bulk COPY, one transaction)",
            Some((row.committed_per_s, row)),
        );
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ratio_naive = ratio(svc.map(|x| x.0), nv.map(|x| x.0));
    let ratio_limit = ratio(svc.map(|x| x.0), lim);
    let cap_svc = svc_peak.and_then(|x| capacity(x.1));
    let cap_naive = nv.and_then(|x| capacity(x.1));
    let cap_limit = r.limit.and_then(|(_, row)| capacity(row));
    let b1ms =
        |x: Option<(f64, &StepRow)>| x.and_then(|(_, row)| row.projection.map(|p| p.burst()));
    let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}x"));
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0}%", v * 100.0));
    s.push_str(&format!(
        "\n| ratio | measured here | by database CPU per event (what one database core could take) | projected on a B1ms (burst) |\n| --- | --- | --- | --- |\n\
         | service / naive | **{}** | {} | {} |\n\
         | service / limit | **{}** | {} | {} |\n",
        x(ratio_naive),
        x(ratio(cap_svc, cap_naive)),
        x(ratio(b1ms(svc_peak), b1ms(nv))),
        pct(ratio_limit),
        pct(ratio(cap_svc, cap_limit)),
        pct(ratio(b1ms(svc_peak), r.limit.and_then(|(_, row)| row.projection.map(|p| p.burst())))),
    ));
    s.push_str(
        "\n\"Measured here\" is bounded by whatever saturated first on this machine (see the core-busy columns: the service shares its core with the load generator). \
         The middle column divides the events one database core could take at each one's measured database CPU cost, which is what a 1-vCore database would see.\n",
    );

    // Projection from the service's peak step (the busiest, biggest batches).
    if let Some(b) = r.baseline {
        s.push('\n');
        s.push_str(&baseline_section(
            r.service,
            r.phase_pages_per_event,
            r.phase_extended_per_event,
            r.page_attribution.map(|(a, ev, _)| (a, ev)),
            b,
        ));
    }
    s.push_str("\n## Projected ceiling on a real B1ms\n\n");
    if let Some((_, row)) = svc_peak
        && let (Some(wal), Some(fs), Some(cpu)) = (
            row.wal_bytes_per_event,
            row.fsyncs_per_event,
            row.db_cpu_us_per_event,
        )
    {
        let pages = r
            .phase_pages_per_event
            .or(row.page_writes_per_event)
            .unwrap_or(0.0);
        let p = Projection::from_costs(wal, fs + pages, cpu * 1e-6);
        s.push_str(&format!(
            "From the service's busiest step ({}; {:.0} events per commit) for WAL, fsyncs and CPU, and from the whole service phase, final CHECKPOINT included, for data page writes ({pages:.4} per event):\n\n",
            row.phase,
            row.events_per_commit.unwrap_or(0.0),
        ));
        s.push_str(&report::projection_table(&p, wal, fs + pages, cpu));
        let no_pages = Projection::from_costs(wal, fs, cpu * 1e-6);
        s.push_str(&format!(
            "\nCounting every 8 kB data page written as its own I/O is the pessimistic end: the kernel merges adjacent writes and Azure counts an I/O of up to 256 KiB as one. \
             With the WAL fsyncs alone as I/Os (the optimistic end) the ceiling is {} events/s bursting, {} at baseline.\n",
            report::fmt_num(no_pages.burst()),
            report::fmt_num(no_pages.baseline()),
        ));
        if let Some(ext) = r.phase_extended_per_event {
            let written = (pages - ext).max(0.0);
            let p = Projection::from_costs(wal, fs + written, cpu * 1e-6);
            s.push_str(&format!(
                "\nOf the {pages:.4} data page writes per event, {ext:.4} are relation extensions: PostgreSQL 15 counts each page added to a relation (written zero-filled when the relation grows) in `buffers_backend`, and the same page is written again with its data; the growth of the relations' files over the phase gives their number. \
                 Counting each page once ({written:.4} per event, with the fsyncs {:.4} I/Os) the ceiling is {} events/s bursting, {} at baseline ({} binds).\n",
                fs + written,
                report::fmt_num(p.burst()),
                report::fmt_num(p.baseline()),
                p.binding(),
            ));
        }
        if let (Some((_, nrow)), Some(np)) = (nv, nv.and_then(|(_, row)| row.projection)) {
            s.push_str(&format!(
                "\nThe naive server, from its best step ({}): {} fsyncs and {} page writes per event (phase average), {:.1} us of database CPU per event: ceiling {} events/s bursting, {} at baseline ({} binds).\n",
                nrow.phase,
                nrow.fsyncs_per_event.map_or("-".into(), |v| format!("{v:.3}")),
                r.naive_pages_per_event.map_or("-".into(), |v| format!("{v:.4}")),
                nrow.db_cpu_us_per_event.unwrap_or(0.0),
                report::fmt_num(np.burst()),
                report::fmt_num(np.baseline()),
                np.binding(),
            ));
        }
        s.push_str(
            "\nWAL term: 10 MiB/s divided by the WAL bytes per committed event (`pg_current_wal_lsn()` difference over the step). \
             IOPS term: 640 divided by the I/Os per event, counting each WAL fsync (`pg_stat_wal.wal_sync`, at least one per commit, so the batch size divides it) \
             and each 8 kB data page written (`pg_stat_bgwriter`: checkpoint, background writer and backend writes) as one I/O. \
             CPU term: one vCore divided by the database CPU-seconds per event (utime+stime of all postgres processes, on this machine's core), at 100% while burst credits last and at the 20% baseline after. \
             This machine's core and an Azure vCore differ in speed; the storage tier's own IOPS can bind before the VM's 640 on the smallest disk.\n",
        );
    }
    s.push_str("\nEach step's own projection (its WAL, fsync and CPU costs with its phase's page writes) is in the tables' last-but-one column.\n\n");

    // Targets.
    s.push_str("\n## Targets\n\n| target | result | evidence |\n| --- | --- | --- |\n");
    let met = |b: bool| if b { "met" } else { "missed" };
    if let (Some(a), Some(rn)) = (svc, ratio_naive) {
        s.push_str(&format!(
            "| sustained events/s >= 10x naive | {} | {} vs {} events/s ({rn:.1}x) |\n",
            met(rn >= 10.0),
            report::fmt_num(a.0),
            f(nv.map(|x| x.0))
        ));
    }
    if let (Some(a), Some(rl)) = (svc, ratio_limit) {
        s.push_str(&format!(
            "| sustained events/s >= 70% of limit | {} | {} vs {} events/s ({:.0}%) |\n",
            met(rl >= 0.7),
            report::fmt_num(a.0),
            f(lim),
            rl * 100.0
        ));
    }
    if let Some(half) = r.service.rows.iter().find(|row| row.phase.contains("half")) {
        let px = half.p(Route::Pixel, 1);
        let ck = half.p(Route::Click, 1);
        let ok = px.is_some_and(|v| v < 10.0) && ck.is_some_and(|v| v < 10.0);
        s.push_str(&format!(
            "| pixel and click p99 < 10 ms at 50% of the saturation rate | {} | {}: pixel p99 {} ms, click p99 {} ms |\n",
            met(ok),
            half.phase,
            px.map_or("-".into(), report::fmt_ms),
            ck.map_or("-".into(), report::fmt_ms)
        ));
    }
    // Issue 14's bar: under 5 ms at half the saturation rate, large webhook batches included.
    let halves: Vec<&StepRow> = r
        .service
        .rows
        .iter()
        .filter(|row| row.phase.contains("half"))
        .collect();
    if !halves.is_empty() {
        let worst = |row: &StepRow| row.tracking_p99().unwrap_or(f64::INFINITY);
        let ok = halves.iter().all(|row| worst(row) < 5.0);
        let evidence: Vec<String> = halves
            .iter()
            .map(|row| format!("{}: {} ms", row.phase, report::fmt_ms(worst(row))))
            .collect();
        s.push_str(&format!(
            "| pixel and click p99 < 5 ms at 50% of the saturation rate, also with SendGrid's batches {SENDGRID_BATCH_FACTOR}x larger (issue 14) | {} | worse of pixel and click p99, {} |\n",
            met(ok),
            evidence.join("; ")
        ));
    }
    if let Some(o) = r.outage {
        let (before, during, fails) = (
            o.click_p99_before,
            o.click_p99_during,
            o.click_failures_during,
        );
        let ok = fails == 0
            && matches!((before, during), (Some(b), Some(d)) if d <= (b * 1.5).max(b + 2.0));
        s.push_str(&format!(
            "| click p99 unaffected while the database is down | {} | p99 {} ms before, {} ms during; {} failures |\n",
            met(ok),
            before.map_or("-".into(), report::fmt_ms),
            during.map_or("-".into(), report::fmt_ms),
            fails
        ));
    }
    let all_ok = r.verdicts.iter().all(|(_, v)| v.ok);
    s.push_str(&format!(
        "| zero accepted events lost, in every phase | {} | {} |\n",
        met(all_ok),
        r.verdicts
            .iter()
            .map(|(n, v)| format!("{n}: {}", if v.ok { "PASS" } else { "FAIL" }))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(sat) = r
        .service
        .rows
        .iter()
        .filter(|row| row.saturated.is_some())
        .max_by(|a, b| a.offered.total_cmp(&b.offered))
    {
        let max_rss = r
            .service
            .rows
            .iter()
            .map(|row| row.server_hwm_mb)
            .fold(0.0, f64::max);
        s.push_str(&format!(
            "| service RSS < 150 MB at saturation | {} | {:.0} MB at the end of {} (peak {:.0} MB over the phase) |\n",
            met(max_rss < 150.0),
            sat.server_rss_mb,
            sat.phase,
            max_rss
        ));
    }

    s.push_str("\n## Exactly-once checks\n\n");
    for (name, v) in r.verdicts {
        s.push_str(&format!("- {name}: {}\n", v.summary()));
    }
    if !r.tables.is_empty() {
        s.push_str("\n## Tables after the service phase\n\n");
        s.push_str(r.tables);
        if let Some(b) = r.baseline.filter(|b| !b.tables.is_empty()) {
            // The same counts for the baseline's phase, to compare (contacts suppressed,
            // messages updated, HOT or not).
            s.push_str(&format!("\nAfter the baseline phase ({}):\n\n", b.name));
            s.push_str(&b.tables);
        }
        s.push_str(
            "\nAn update is HOT (no index entry added) only when no indexed column changes and the page has room; any other update adds an entry to every index of the table (`contacts.status` is in `idx_contacts_status`).\n",
        );
    }
    if let Some((a, events, counted)) = r.page_attribution {
        s.push_str("\n## Where the data pages were written (service phase)\n\n");
        let extended = r.phase_extended_per_event.map(|e| e * events);
        s.push_str(&a.markdown(events, counted, extended));
    }
    let by_kind: Vec<(&str, f64, [f64; 7])> = r
        .service
        .rows
        .iter()
        .chain(r.baseline.iter().flat_map(|b| b.phase.rows.iter()))
        .chain(r.limit.iter().map(|(_, row)| row))
        .filter_map(|row| {
            Some((
                row.phase.as_str(),
                row.db_cpu_us_per_event?,
                row.db_cpu_by_kind?,
            ))
        })
        .collect();
    if !by_kind.is_empty() {
        s.push_str(
            "\n## Database CPU per event by server process\n\n\
             µs of CPU per committed event, from `/proc` (`utime + stime`) of each server process, told apart by the title PostgreSQL gives it; \
             processes that ended during the step (autovacuum workers, short connections such as this load test's statistics and `pg_buffercache` queries) are known only through the postmaster's reaped-children time. \
             Client backends are the writers' connections (and, for the limit, its one COPY), plus this load test's monitoring connection.\n\n",
        );
        s.push_str("| step | all |");
        for k in procstat::PG_KINDS {
            s.push_str(&format!(" {k} |"));
        }
        s.push_str("\n| --- | --- |");
        for _ in procstat::PG_KINDS {
            s.push_str(" --- |");
        }
        s.push('\n');
        for (phase, all, kinds) in by_kind {
            s.push_str(&format!("| {phase} | {all:.1} |"));
            for v in kinds {
                s.push_str(&format!(" {v:.1} |"));
            }
            s.push('\n');
        }
    }
    if !r.statements.is_empty() {
        s.push_str("\n## Where the database time went (pg_stat_statements, service phase)\n\n| calls | total ms | rows | blocks dirtied | blocks written | WAL bytes | statement |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for (calls, ms, rows, dirtied, written, wal, q) in r.statements {
            s.push_str(&format!(
                "| {calls} | {ms:.0} | {rows} | {dirtied} | {written} | {} | `{}` |\n",
                report::fmt_num(*wal as f64),
                q.replace('|', "\\|")
            ));
        }
    }
    s
}

/// The bus mode's steps and its comparison with the single process, measured in this run.
fn bus_section(
    single: &PhaseResult,
    bus: &PhaseResult,
    (edges, writers): (usize, usize),
) -> String {
    let mut s = format!(
        "\n## Bus mode ({edges} edges + {writers} writers, 3-node NATS JetStream, R3 file stream)\n\n\
         The same mix, ramp and saturation rule, after a reset of the database. The edges take the traffic round robin and publish every request's envelope to the stream \
         (webhooks answered after the publish ack of the replicas, pixels and clicks at once); the writers fetch from one durable pull consumer, run the same batch transaction, commit, then ack. \
         Every process of this mode (edges, writers, the three `nats-server`s) runs on the application CPU beside the load generator, as the single process does: \
         the same hardware, so the comparison shows what the bus costs on it. A step also saturates when the stream's backlog grows.\n\n"
    );
    s.push_str(&report::steps_table(&bus.rows, true));
    s.push_str(&unaccounted_note(&bus.rows));
    s.push_str(&report::memory_table(&bus.rows));
    let half = |p: &PhaseResult| p.rows.iter().find(|r| r.phase.contains("half")).cloned();
    let f = |v: Option<f64>| v.map_or("-".into(), report::fmt_num);
    let ms = |v: Option<f64>| v.map_or("-".into(), report::fmt_ms);
    let (ss, bs) = (single.sustained(), bus.sustained());
    let ratio = match (ss, bs) {
        (Some(a), Some(b)) if a.0 > 0.0 => format!("{:.0}%", 100.0 * b.0 / a.0),
        _ => "-".into(),
    };
    let (sh, bh) = (half(single), half(bus));
    let p99 = |r: &Option<StepRow>, route| r.as_ref().and_then(|r| r.p(route, 1));
    let cpu_per_event = |x: Option<(f64, &StepRow)>| {
        x.and_then(|(ev, r)| (ev > 0.0).then(|| format!("{:.0}", 1e4 * r.server_cpu / ev)))
            .unwrap_or_else(|| "-".into())
    };
    let verdict = |p: &PhaseResult| {
        p.verdict.as_ref().map_or("-".into(), |v| {
            if v.ok {
                "PASS".to_string()
            } else {
                "FAIL".to_string()
            }
        })
    };
    let max_rss = |p: &PhaseResult| p.rows.iter().map(|r| r.server_hwm_mb).fold(0.0, f64::max);
    s.push_str(&format!(
        "\n| measured in this run | single process | bus | bus / single |\n| --- | --- | --- | --- |\n\
         | events committed/s, best step that did not saturate | {} | {} | {ratio} |\n\
         | first saturated step (req/s offered) | {} | {} | |\n\
         | pixel p99 / click p99 at half the saturation rate (ms) | {} / {} | {} / {} | |\n\
         | service-side CPU per 1,000 committed events at the sustained step (ms) | {} | {} | |\n\
         | DB CPU us per event at the sustained step | {} | {} | |\n\
         | peak memory, summed over the mode's processes (MB) | {:.0} | {:.0} | |\n\
         | exactly once | {} | {} | |\n",
        f(ss.map(|x| x.0)),
        f(bs.map(|x| x.0)),
        f(single.first_saturated),
        f(bus.first_saturated),
        ms(p99(&sh, Route::Pixel)),
        ms(p99(&sh, Route::Click)),
        ms(p99(&bh, Route::Pixel)),
        ms(p99(&bh, Route::Click)),
        cpu_per_event(ss),
        cpu_per_event(bs),
        ss.and_then(|x| x.1.db_cpu_us_per_event).map_or("-".into(), |v| format!("{v:.1}")),
        bs.and_then(|x| x.1.db_cpu_us_per_event).map_or("-".into(), |v| format!("{v:.1}")),
        max_rss(single),
        max_rss(bus),
        verdict(single),
        verdict(bus),
    ));
    s.push_str(
        "\nOn one shared core the bus mode pays for what buys its guarantees elsewhere: every envelope is published, replicated to three file-backed logs and fetched again, \
         by processes that here compete with each other and with the load generator. On separate machines, edges, writers and NATS nodes each get their own cores; \
         the database side (DB CPU per event, batch sizes) is what carries over.\n",
    );
    s
}

/// The chart's series from a run's phases.
pub fn chart_data(service: &PhaseResult, naive: &PhaseResult, limit: Option<f64>) -> ChartData {
    let series = |p: &PhaseResult| -> Vec<(f64, f64, f64)> {
        let mut v: Vec<(f64, f64, f64)> = p
            .rows
            .iter()
            .filter(|r| !r.phase.contains("half") && !r.phase.contains("repeated"))
            .filter_map(|r| r.tracking_p99().map(|l| (r.offered, l, r.committed_per_s)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let mut d = ChartData {
        limit,
        ..Default::default()
    };
    if !service.rows.is_empty() {
        d.series.push(("reachly-ingest".into(), series(service)));
    }
    if !naive.rows.is_empty() {
        d.series
            .push(("naive (INSERT + UPDATE per request)".into(), series(naive)));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase: &str, offered: f64, committed: f64, cpu: f64) -> StepRow {
        StepRow {
            phase: phase.into(),
            offered,
            committed_per_s: committed,
            db_cpu_us_per_event: Some(cpu),
            ..Default::default()
        }
    }

    #[test]
    fn the_builds_are_compared_over_the_ramp_steps_both_ran() {
        let service = [
            row("service 500/s", 500.0, 700.0, 100.0),
            row("service 1000/s", 1000.0, 1400.0, 70.0),
            row("service 2000/s (contended; repeated)", 2000.0, 900.0, 90.0),
            row("service 2000/s", 2000.0, 2800.0, 50.0),
            row("service 1400/s", 1400.0, 2000.0, 60.0),
            row("service half 700/s", 700.0, 1000.0, 80.0),
        ];
        let baseline = [
            row("baseline 500/s", 500.0, 700.0, 90.0),
            row("baseline 1000/s", 1000.0, 1400.0, 60.0),
            row("baseline 2000/s", 2000.0, 2800.0, 40.0),
            row("baseline 4000/s", 4000.0, 5600.0, 30.0),
            row("baseline half 1000/s", 1000.0, 1400.0, 99.0),
        ];
        let pairs = common_steps(&service, &baseline);
        let rates: Vec<f64> = pairs.iter().map(|p| p.0.offered).collect();
        assert_eq!(rates, [500.0, 1000.0, 2000.0]);
        // The repeated step's decisive row and the ramp's rows, never a half-rate step.
        assert_eq!(pairs[2].0.phase, "service 2000/s");
        assert_eq!(pairs[1].1.phase, "baseline 1000/s");
        // Weighted by events: (700*100 + 1400*70 + 2800*50) / 4900 = 62.857...
        let mine = per_event_over(pairs.iter().map(|p| p.0), |r| r.db_cpu_us_per_event);
        assert!((mine.unwrap() - 308000.0 / 4900.0).abs() < 1e-9, "{mine:?}");
        let theirs = per_event_over(pairs.iter().map(|p| p.1), |r| r.db_cpu_us_per_event);
        assert!(
            (theirs.unwrap() - 259000.0 / 4900.0).abs() < 1e-9,
            "{theirs:?}"
        );
        // A step without the figure makes the whole figure unknown, not a partial mean.
        assert_eq!(
            per_event_over(pairs.iter().map(|p| p.0), |r| r.page_writes_per_event),
            None
        );
        assert!(common_steps(&service, &[]).is_empty());
    }
}
