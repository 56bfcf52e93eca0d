//! The pixel route through the real server (token verification, machine classification,
//! event building, hand-off to the pipeline, and the writers committing to a real
//! PostgreSQL behind it) against a minimal hyper server that returns the same GIF and headers
//! and does nothing else. Both run in this process on the same runtime and are driven by
//! `wrk` in turn, so the ratio is the cost of the service's work per request.
//!
//! Both run on the service binary's allocator (jemalloc, same options).
//!
//! `cargo bench --bench pixel_server [-- --seconds 10 --connections 32]` (needs `wrk`:
//! `apt-get install wrk`, and PostgreSQL's server binaries).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reachly_ingest::config::{Config, ServeArgs};
use reachly_ingest::http::tracking::PIXEL_GIF;
use reachly_ingest::pgcluster::PgCluster;
use reachly_ingest::token::{self, Purpose};
use reachly_ingest::{App, app};
use uuid::Uuid;

mod support;
use support::{arg, pin};

/// The service binary's allocator and options (src/main.rs), so the bench measures what ships:
/// jemalloc, its freed pages returned by its background thread.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static u8> =
    Some(&b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0]);

/// The do-nothing baseline: same bytes, same headers.
async fn serve_noop(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                let mut r = Response::new(Full::new(Bytes::from_static(PIXEL_GIF)));
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
                h.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static(
                        "no-store, no-cache, must-revalidate, private, max-age=0",
                    ),
                );
                h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
                h.insert(header::EXPIRES, HeaderValue::from_static("0"));
                Ok::<_, Infallible>(r)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct WrkResult {
    rps: f64,
    /// CPU time of this process (both servers, the service's writers and its database
    /// client; not wrk, not PostgreSQL) per request answered, in microseconds: steadier than
    /// the request rate on a machine whose other tenants take a varying share of the CPU.
    cpu_us: f64,
    p50: String,
    p99: String,
    non_2xx: u64,
}

/// CPU seconds of this process so far (the service's own `/proc/self/stat` reader).
fn process_cpu_seconds() -> f64 {
    reachly_ingest::metrics::process_cpu_seconds().unwrap_or(0.0)
}

fn wrk(url: &str, seconds: u64, connections: u64) -> WrkResult {
    let cpu_before = process_cpu_seconds();
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk"])
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args([
            "-H",
            "User-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0",
        ])
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("taskset is required: apt-get install util-linux ({e})"));
    // taskset runs even when wrk is missing, and then exits non-zero with nothing on stdout:
    // without this check the bench would print a table of zeros.
    assert!(
        out.status.success(),
        "wrk failed ({}): {} (wrk is required: apt-get install wrk)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(prefix)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_default()
    };
    let cpu = process_cpu_seconds() - cpu_before;
    let rps: f64 = find("Requests/sec:").parse().unwrap_or(0.0);
    WrkResult {
        rps,
        cpu_us: cpu * 1e6 / (rps * seconds as f64).max(1.0),
        p50: find("50%"),
        p99: find("99%"),
        non_2xx: find("Non-2xx or 3xx responses:").parse().unwrap_or(0),
    }
}

fn main() -> anyhow::Result<()> {
    let seconds = arg("--seconds", 10);
    let connections = arg("--connections", 32);
    let dir = std::env::temp_dir().join(format!("reachly-pixel-bench-{}", Uuid::new_v4().simple()));
    let cluster = PgCluster::throwaway(
        &dir,
        false,
        |_| Ok(()),
        &[("shared_buffers", "256MB"), ("max_wal_size", "4GB")],
    )?;
    // PostgreSQL on CPU 0 (its backends inherit the postmaster's affinity); this process,
    // both servers and wrk on CPU 1: the database's work does not eat the servers' CPU.
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid"))?;
    let postmaster: u32 = pid_file.lines().next().unwrap_or("").trim().parse()?;
    let pinned = pin(postmaster, 0) && pin(std::process::id(), 1);
    if !pinned {
        eprintln!("taskset (util-linux) not found or failed: running unpinned");
    }
    // The runtime's threads start after the pinning above, and inherit it.
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let admin = reachly_ingest::db::connect(&cluster.url("postgres")).await?;
        admin.batch_execute("CREATE DATABASE bench").await?;
        let url = cluster.url("bench");
        reachly_ingest::db::migrate::run(&url).await?;
        let db = reachly_ingest::db::connect(&url).await?;
        reachly_ingest::dev::seed_demo(&url).await?;
        let keys = "1:QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        let spool = dir.join("spool");
        let mut args = ServeArgs::from_argv([
            "serve",
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--token-keys",
            keys,
            "--spool-dir",
            spool.to_str().unwrap(),
            "--buffer-max-events",
            "3000000",
        ]);
        args.db.migrate_on_start = false;
        let config = Config::from_args(args).map_err(anyhow::Error::msg)?;
        let public = tokio::net::TcpListener::bind(config.server.listen).await?;
        let admin_l = tokio::net::TcpListener::bind(config.server.admin_listen).await?;
        let keys_parsed = config.tracking.token_keys.clone().unwrap();
        let prepared = app::prepare_default(&config).map_err(anyhow::Error::msg)?;
        let app = App::build(config, public, admin_l, prepared).await?;
        let app_addr: SocketAddr = app.public_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app_task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stop_rx.await;
        }));
        let noop = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let noop_addr = noop.local_addr()?;
        tokio::spawn(serve_noop(noop));

        let t = token::mint(&keys_parsed, Purpose::Open, reachly_ingest::dev::DEMO_ORG, reachly_ingest::dev::demo_message(0), None)
            .map_err(anyhow::Error::msg)?;
        let path = format!("/o/{t}.gif");
        let noop_url = format!("http://{noop_addr}{path}");
        let app_url = format!("http://{app_addr}{path}");
        let bad_url = format!("http://{app_addr}/o/not-a-valid-token.gif");
        let (n, a, b) = tokio::task::spawn_blocking(move || {
            let _warm = wrk(&noop_url, 2, connections);
            let n = wrk(&noop_url, seconds, connections);
            let b = wrk(&bad_url, seconds, connections);
            let _warm = wrk(&app_url, 2, connections);
            let a = wrk(&app_url, seconds, connections);
            (n, a, b)
        })
        .await?;
        let _ = stop_tx.send(());
        app_task.await??;
        let stored: i64 = db.query_one("SELECT count(*) FROM email_events", &[]).await?.get(0);
        println!(
            "pixel route, {seconds} s per server, wrk -t1 -c{connections}; PostgreSQL on CPU 0, servers and wrk on CPU 1 (pinned: {pinned}); the service's events are committed to PostgreSQL behind it\n"
        );
        println!("| server | requests/s | p50 | p99 | non-2xx | CPU us per request (this process) |");
        println!("|---|---|---|---|---|---|");
        println!("| do-nothing hyper server (same GIF) | {:.0} | {} | {} | {} | {:.2} |", n.rps, n.p50, n.p99, n.non_2xx, n.cpu_us);
        println!("| reachly-ingest pixel route, invalid token (no event) | {:.0} | {} | {} | {} | {:.2} |", b.rps, b.p50, b.p99, b.non_2xx, b.cpu_us);
        println!("| reachly-ingest pixel route, valid token (event written) | {:.0} | {} | {} | {} | {:.2} |", a.rps, a.p50, a.p99, a.non_2xx, a.cpu_us);
        println!(
            "\npixel route / do-nothing: {:.0}% with the event written (writers included); {:.0}% for the HTTP path alone (invalid token)",
            100.0 * a.rps / n.rps.max(1.0),
            100.0 * b.rps / n.rps.max(1.0)
        );
        println!(
            "by CPU per request (what a core to itself would serve): {:.0}% with the event written; {:.0}% for the HTTP path alone",
            100.0 * n.cpu_us / a.cpu_us.max(0.001),
            100.0 * n.cpu_us / b.cpu_us.max(0.001)
        );
        println!("events committed by the service during its runs (incl. warm-up, drained at shutdown): {stored}");
        Ok::<(), anyhow::Error>(())
    });
    let _ = cluster.stop("immediate");
    let _ = std::fs::remove_dir_all(&dir);
    result
}
