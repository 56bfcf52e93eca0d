//! `reachly-loadtest full|smoke`: the entry point (normally through `loadtest/run.sh`, which
//! builds the release binaries first). It parses the options, runs the phases
//! ([`reachly_loadtest::run`]), prints the report, writes it (and the chart) under
//! `--results-dir`, and exits non-zero when any exactly-once check fails or the service
//! misbehaves (crash, non-zero exit on SIGTERM, dropped events).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use reachly_loadtest::report::SaturationRule;
use reachly_loadtest::run::{self, Mode, Options, Webhooks};
use reachly_loadtest::workload::Mix;

#[derive(Debug, Parser)]
#[command(
    name = "reachly-loadtest",
    about = "End-to-end load test of reachly-ingest on a B1ms-shaped PostgreSQL (see loadtest/README.md)"
)]
struct Cli {
    /// full: service ramp, outage, naive and limit references, report; smoke: one short
    /// low-rate service step with the exactly-once check.
    #[arg(value_enum, default_value = "full")]
    mode: Mode,
    /// The product's release binary (default: next to this one).
    #[arg(long)]
    service_bin: Option<PathBuf>,
    /// The naive reference server (default: next to this one).
    #[arg(long)]
    naive_bin: Option<PathBuf>,
    /// Another build of the service (for example main at an older commit, built in a git
    /// worktree) ramped the same way after the service, on the same freshly reset database,
    /// so the report can set the two side by side as ratios measured in one run.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// What to call the baseline in the report (e.g. "main at 9e3c73a").
    #[arg(long, default_value = "baseline")]
    baseline_name: String,
    /// SQL run on the reset database before the baseline starts, to give it the schema it
    /// was measured with where this build's migrations changed what its writes meet (e.g.
    /// `loadtest/baseline/before-v11.sql` puts back the foreign keys V11 replaced). The
    /// database is migrated by this build; the baseline ignores migrations it does not know.
    #[arg(long, requires = "baseline_bin", requires = "baseline_restore_sql")]
    baseline_schema_sql: Option<PathBuf>,
    /// SQL run after the baseline phase, undoing `--baseline-schema-sql` so the naive and
    /// limit references meet this build's schema (e.g. `loadtest/baseline/after-v11.sql`).
    #[arg(long, requires = "baseline_schema_sql")]
    baseline_restore_sql: Option<PathBuf>,
    /// Where the throwaway cluster, spool and logs go (a directory the postgres user can
    /// enter when run as root).
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// Keep the work directory (cluster, logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Write latest.md / latest.png and dated copies here (full runs default to
    /// loadtest/results; the smoke writes nothing unless given).
    #[arg(long)]
    results_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    db_cpu: usize,
    #[arg(long, default_value_t = 1)]
    app_cpu: usize,
    /// Contacts to seed (messages are about twice as many). Default: 120000 (full), 1000 (smoke).
    #[arg(long)]
    contacts: Option<usize>,
    /// Seconds per step.
    #[arg(long, default_value_t = 20)]
    step_seconds: u64,
    /// First offered rate of the service ramp (req/s); it doubles until a step saturates.
    #[arg(long, default_value_t = 500.0)]
    start_rate: f64,
    #[arg(long, default_value_t = 64000.0)]
    max_rate: f64,
    /// Steps that narrow the knee after the first saturated step.
    #[arg(long, default_value_t = 2)]
    bisect: u32,
    #[arg(long, default_value_t = 250.0)]
    naive_start_rate: f64,
    /// The smoke's rate (req/s).
    #[arg(long, default_value_t = 200.0)]
    smoke_rate: f64,
    #[arg(long, value_enum, default_value = "auto")]
    webhooks: Webhooks,
    /// Shares of the request mix (relative weights).
    #[arg(long, default_value_t = 72.0)]
    pixel: f64,
    #[arg(long, default_value_t = 20.0)]
    click: f64,
    #[arg(long, default_value_t = 0.5)]
    sendgrid: f64,
    #[arg(long, default_value_t = 7.5)]
    mailgun: f64,
    /// Share of tracking tokens tampered with.
    #[arg(long, default_value_t = 0.02)]
    invalid: f64,
    #[arg(long, default_value_t = 100)]
    sendgrid_batch: usize,
    /// Share of tracking requests from a mail security scanner (machine traffic).
    #[arg(long, default_value_t = 0.03)]
    scanner: f64,
    /// REACHLY_DB_POOL_SIZE of the service.
    #[arg(long, default_value_t = 4)]
    pool_size: usize,
    /// REACHLY_WRITERS.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// REACHLY_FLUSH_MAX_EVENTS.
    #[arg(long, default_value_t = 5000)]
    flush_max_events: usize,
    /// REACHLY_FLUSH_INTERVAL_MS.
    #[arg(long, default_value_t = 200)]
    flush_interval_ms: u64,
    /// REACHLY_BUFFER_MAX_EVENTS.
    #[arg(long, default_value_t = 100_000)]
    buffer_max_events: usize,
    /// Connections of the naive server's pool (a B1ms allows 50, 35 for users).
    #[arg(long, default_value_t = 16)]
    naive_pool_size: usize,
    /// Pixel and click requests outstanding at once (mail clients' connections).
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Webhook requests outstanding at once (ESPs' connections; a webhook is answered only
    /// after its commit, ~0.2-0.5 s, so an ESP posting 1,000 req/s keeps hundreds open).
    #[arg(long, default_value_t = 1024)]
    webhook_max_in_flight: usize,
    /// A step saturates when the tracking p99 exceeds this (ms).
    #[arg(long, default_value_t = 100.0)]
    p99_bound_ms: f64,
    #[arg(long, default_value_t = 30)]
    outage_seconds: u64,
    /// Offered rate during the outage phase (default: a quarter of the service's best
    /// sustained rate, between 100 and 2000 req/s).
    #[arg(long)]
    outage_rate: Option<f64>,
    /// Most events loaded by the limit reference.
    #[arg(long, default_value_t = 1_000_000)]
    limit_max_events: u64,
    /// Run exactly these rates (comma-separated req/s) instead of the ramp and the
    /// half-rate step (for experiments).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// With --rates: after them, the two half-rate steps (the mix, then SendGrid's batches
    /// 10x larger) at this rate (for experiments).
    #[arg(long, requires = "rates")]
    half_rate: Option<f64>,
    /// Before each step, wait at most this many seconds for both cores to be quiet (other
    /// work on a shared machine); 0 disables it.
    #[arg(long, default_value_t = 180)]
    quiet_wait: u64,
    #[arg(long)]
    skip_outage: bool,
    #[arg(long)]
    skip_naive: bool,
    #[arg(long)]
    skip_limit: bool,
    /// Leave out the bus mode (2 edges + 2 writers over a 3-node NATS JetStream cluster,
    /// ramped like the single process; needs `nats-server`).
    #[arg(long)]
    skip_bus: bool,
    /// Edge processes of the bus mode.
    #[arg(long, default_value_t = 2)]
    bus_edges: usize,
    /// Writer processes of the bus mode.
    #[arg(long, default_value_t = 2)]
    bus_writers: usize,
    /// Extra PostgreSQL setting, NAME=VALUE (repeatable; overrides the B1ms shape).
    #[arg(long = "pg-setting", value_parser = parse_setting)]
    pg_settings: Vec<(String, String)>,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    if k.is_empty() || v.contains(' ') {
        return Err("expected NAME=VALUE without spaces".into());
    }
    Ok((k.to_string(), v.to_string()))
}

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("."));
    let results_dir = cli.results_dir.clone().or_else(|| {
        (cli.mode == Mode::Full).then(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"))
    });
    let opts = Options {
        mode: cli.mode,
        service_bin: cli
            .service_bin
            .unwrap_or_else(|| here.join("reachly-ingest")),
        naive_bin: cli.naive_bin.unwrap_or_else(|| here.join("naive-server")),
        baseline: cli.baseline_bin.map(|b| (b, cli.baseline_name.clone())),
        baseline_schema_sql: cli.baseline_schema_sql.zip(cli.baseline_restore_sql),
        work_dir: cli.work_dir,
        keep: cli.keep,
        results_dir: results_dir.clone(),
        db_cpu: cli.db_cpu,
        app_cpu: cli.app_cpu,
        contacts: cli.contacts.unwrap_or(match cli.mode {
            Mode::Full => 120_000,
            Mode::Smoke => 1_000,
        }),
        step: Duration::from_secs(cli.step_seconds.max(1)),
        start_rate: cli.start_rate,
        max_rate: cli.max_rate,
        bisect: cli.bisect,
        naive_start_rate: cli.naive_start_rate,
        smoke_rate: cli.smoke_rate,
        webhooks: cli.webhooks,
        mix: Mix {
            pixel: cli.pixel,
            click: cli.click,
            sendgrid: cli.sendgrid,
            mailgun: cli.mailgun,
            invalid: cli.invalid,
            sendgrid_batch: cli.sendgrid_batch,
            scanner: cli.scanner,
        },
        pool_size: cli.pool_size,
        writers: cli.writers,
        flush_max_events: cli.flush_max_events,
        flush_interval_ms: cli.flush_interval_ms,
        buffer_max_events: cli.buffer_max_events,
        naive_pool_size: cli.naive_pool_size,
        max_in_flight: cli.max_in_flight,
        webhook_max_in_flight: cli.webhook_max_in_flight,
        rule: SaturationRule {
            min_achieved: 0.95,
            max_p99_ms: cli.p99_bound_ms,
        },
        outage: Duration::from_secs(cli.outage_seconds),
        outage_rate: cli.outage_rate,
        limit_max_events: cli.limit_max_events,
        rates: cli.rates,
        half_rate: cli.half_rate,
        quiet_wait: Duration::from_secs(cli.quiet_wait),
        skip_outage: cli.skip_outage,
        skip_naive: cli.skip_naive,
        skip_limit: cli.skip_limit,
        skip_bus: cli.skip_bus,
        bus_edges: cli.bus_edges.max(1),
        bus_writers: cli.bus_writers.max(1),
        pg_settings: cli.pg_settings,
    };
    // One thread for the generator and the orchestration: it shares its CPU with the server
    // under test, and a single-threaded runtime is the cheapest way to drive it.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reachly-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // Ctrl-C or SIGTERM: stop the run; the server processes are stopped as they are dropped
    // and the cluster by its watchdog.
    let outcome = match rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run::run(opts) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    }) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("reachly-loadtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    println!("\n{}", outcome.report);
    if let Some(dir) = results_dir {
        match write_results(&dir, cli.mode, &outcome) {
            Ok(files) => eprintln!("results written: {}", files.join(", ")),
            Err(e) => eprintln!("reachly-loadtest: could not write the results: {e:#}"),
        }
    }
    if outcome.passed {
        eprintln!("reachly-loadtest: PASS");
        ExitCode::SUCCESS
    } else {
        eprintln!("reachly-loadtest: FAIL (see the exactly-once checks above)");
        ExitCode::from(1)
    }
}

fn write_results(
    dir: &std::path::Path,
    mode: Mode,
    o: &run::Outcome,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let stamp = chrono::Utc::now().format("%Y-%m-%dT%H%M");
    let kind = match mode {
        Mode::Full => "full",
        Mode::Smoke => "smoke",
    };
    let latest = if mode == Mode::Full {
        "latest".to_string()
    } else {
        "smoke-latest".to_string()
    };
    let mut files = Vec::new();
    let mut report = o.report.clone();
    if let Some(chart) = &o.chart {
        let png = dir.join(format!("{latest}.png"));
        match reachly_loadtest::report::chart(chart, &png) {
            Ok(()) => {
                let dated = dir.join(format!("{stamp}-{kind}.png"));
                std::fs::copy(&png, &dated)?;
                files.push(png.display().to_string());
                files.push(dated.display().to_string());
                report.push_str(&format!(
                    "\n![latency and throughput against offered rate]({stamp}-{kind}.png)\n"
                ));
            }
            Err(e) => eprintln!("reachly-loadtest: no chart: {e:#}"),
        }
    }
    for name in [format!("{latest}.md"), format!("{stamp}-{kind}.md")] {
        let p = dir.join(name);
        std::fs::write(&p, &report)?;
        files.push(p.display().to_string());
    }
    Ok(files)
}
