//! The integration-test harness: a real PostgreSQL and the real server on real sockets.
//!
//! - One throwaway cluster per test process (temp dir, free port, fsync off), started on
//!   first use and stopped by a watchdog process when the test process exits; or the server
//!   of `REACHLY_TEST_DATABASE_URL` when that is set.
//! - A migrated template database; each test gets its own database cloned from it, so tests
//!   run in parallel without seeing each other's rows.
//! - `spawn_app()` starts the service in-process on port 0 (public and admin) against that
//!   database, with test token keys and a private spool directory; `TestApp` has helpers to
//!   seed tenants, mint tokens, send requests and read rows back. The app shuts down
//!   gracefully on `stop()`, or is signalled to on drop.
//! - `PrivateCluster` is a cluster of a test's own, for tests that stop the database.

// Each test module uses a different part of the harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use reachly_ingest::config::ServeArgs;
use reachly_ingest::pgcluster::PgCluster;
use reachly_ingest::token::{self, Purpose, TokenKeys};
use reachly_ingest::webhooks::HttpsGet;
use reachly_ingest::{App, AppState, Config, app};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Token keys of every test app: key 1 mints, key 2 is a rotated older key.
pub const TEST_KEY_1: [u8; 32] = [0x41; 32];
pub const TEST_KEY_2: [u8; 32] = [0x42; 32];

pub fn test_token_keys_arg() -> String {
    let b = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    format!("1:{},2:{}", b(&TEST_KEY_1), b(&TEST_KEY_2))
}

pub fn test_token_keys() -> TokenKeys {
    test_token_keys_arg().parse().expect("test keys parse")
}

/// Where test databases live: the server (libpq keywords without dbname) and the template.
struct TestServer {
    /// `host=... port=... user=...` without dbname.
    base: String,
    template: String,
}

static SERVER: OnceLock<Result<TestServer, String>> = OnceLock::new();

fn server() -> &'static TestServer {
    let s = SERVER.get_or_init(|| {
        // Runs on a thread of its own: the caller may be inside a tokio runtime.
        std::thread::spawn(init_server)
            .join()
            .unwrap_or_else(|_| Err("test server setup panicked".into()))
    });
    match s {
        Ok(s) => s,
        Err(e) => panic!("cannot set up the test database: {e}"),
    }
}

/// Test databases are named `reachly_t<pid>_...` after the test process that made them, so
/// a run on a shared server (`REACHLY_TEST_DATABASE_URL`) can drop what earlier, finished
/// runs left behind without touching a concurrent run's.
fn db_name(kind: &str) -> String {
    let unique = Uuid::new_v4().simple().to_string();
    format!("reachly_t{}_{kind}_{}", std::process::id(), &unique[..12])
}

async fn drop_leftovers(admin: &tokio_postgres::Client) -> Result<(), String> {
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'reachly\\_t%'",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    for row in rows {
        let name: String = row.get(0);
        let pid: Option<u32> = name
            .strip_prefix("reachly_t")
            .and_then(|r| r.split('_').next())
            .and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
    Ok(())
}

fn init_server() -> Result<TestServer, String> {
    let (base, shared) = match std::env::var("REACHLY_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => (strip_dbname(&url)?, true),
        _ => (start_shared_cluster().map_err(|e| format!("{e:#}"))?, false),
    };
    let template = db_name("template");
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let admin = reachly_ingest::db::connect(&format!("{base} dbname=postgres"))
            .await
            .map_err(|e| format!("{e:#}"))?;
        if shared {
            drop_leftovers(&admin).await?;
        }
        admin
            .batch_execute(&format!("CREATE DATABASE {template}"))
            .await
            .map_err(|e| e.to_string())?;
        reachly_ingest::db::migrate::run(&format!("{base} dbname={template}"))
            .await
            .map_err(|e| format!("migrating the template: {e:#}"))?;
        Ok::<(), String>(())
    })?;
    Ok(TestServer { base, template })
}

/// `REACHLY_TEST_DATABASE_URL` as libpq keywords without a dbname.
fn strip_dbname(url: &str) -> Result<String, String> {
    use std::str::FromStr;
    let cfg = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("REACHLY_TEST_DATABASE_URL: {e}"))?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let mut s = format!("host={host} port={port} user={user}");
    if let Some(pw) = cfg.get_password() {
        s.push_str(&format!(
            " password='{}'",
            String::from_utf8_lossy(pw).replace('\'', "\\'")
        ));
    }
    Ok(s)
}

fn start_shared_cluster() -> anyhow::Result<String> {
    let c = start_cluster_in(
        &std::env::temp_dir().join(format!("reachly-test-pg-{}", Uuid::new_v4().simple())),
    )?;
    Ok(format!("host=127.0.0.1 port={} user=postgres", c.port))
}

/// Starts a throwaway cluster in `dir`, and a watchdog that stops it and removes `dir` once
/// this test process is gone (whatever way it ends).
fn start_cluster_in(dir: &Path) -> anyhow::Result<PgCluster> {
    start_cluster_with(dir, |_| Ok(()), &[])
}

/// Like `start_cluster_in`, running `prepare(data_dir)` after initdb (to add files) and
/// passing extra server settings.
pub fn start_cluster_with(
    dir: &Path,
    prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
    extra: &[(&str, &str)],
) -> anyhow::Result<PgCluster> {
    let mut settings = vec![
        ("fsync", "off"),
        ("synchronous_commit", "off"),
        ("full_page_writes", "off"),
        ("max_connections", "300"),
        ("shared_buffers", "64MB"),
    ];
    settings.extend_from_slice(extra);
    PgCluster::throwaway(dir, true, prepare, &settings)
}

/// A cluster of one test's own (for tests that stop or crash the database).
pub struct PrivateCluster {
    pub cluster: PgCluster,
    pub url: String,
}

impl PrivateCluster {
    /// A fresh migrated cluster with database `reachly`.
    pub async fn start() -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!(
            "reachly-test-private-pg-{}",
            Uuid::new_v4().simple()
        ));
        let cluster = tokio::task::spawn_blocking(move || start_cluster_in(&dir))
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("cannot start a private PostgreSQL: {e:#}"));
        let admin = reachly_ingest::db::connect(&cluster.url("postgres"))
            .await
            .expect("connect");
        admin
            .batch_execute("CREATE DATABASE reachly")
            .await
            .expect("create db");
        let url = cluster.url("reachly");
        reachly_ingest::db::migrate::run(&url)
            .await
            .expect("migrate");
        PrivateCluster { cluster, url }
    }

    pub async fn stop(&self) {
        let c = self.cluster.clone();
        tokio::task::spawn_blocking(move || c.stop("fast"))
            .await
            .expect("join")
            .expect("pg_ctl stop");
    }

    pub async fn start_again(&self) {
        let c = self.cluster.clone();
        tokio::task::spawn_blocking(move || {
            c.start(&[
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
            ])
        })
        .await
        .expect("join")
        .expect("pg_ctl start");
    }
}

/// A fresh database cloned from the migrated template; returns its libpq URL.
pub async fn fresh_database() -> String {
    let s = server();
    let name = db_name("db");
    let admin = reachly_ingest::db::connect(&format!("{} dbname=postgres", s.base))
        .await
        .expect("connect to test server");
    admin
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {}", s.template))
        .await
        .expect("create test database from template");
    format!("{} dbname={name}", s.base)
}

/// An empty database (no migrations), for migration tests.
pub async fn empty_database() -> String {
    let s = server();
    let name = db_name("empty");
    let admin = reachly_ingest::db::connect(&format!("{} dbname=postgres", s.base))
        .await
        .expect("connect");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create empty database");
    format!("{} dbname={name}", s.base)
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    reachly_ingest::db::connect(url)
        .await
        .expect("connect to test database")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reachly-test-{tag}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// `serve` arguments for a test app: port 0 everywhere, test keys, fast flushes, a private
/// spool, migrations already applied (the template).
pub fn test_args(db_url: &str, spool_dir: &Path) -> ServeArgs {
    let keys = test_token_keys_arg();
    ServeArgs::from_argv([
        "serve",
        "--database-url",
        db_url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--token-keys",
        &keys,
        "--flush-interval-ms",
        "20",
        "--spool-dir",
        spool_dir.to_str().expect("utf-8 temp path"),
        "--migrate-on-start",
        "false",
        "--shutdown-timeout-s",
        "10",
    ])
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub db_url: String,
    pub db: tokio_postgres::Client,
    /// Does not follow redirects.
    pub http: reqwest::Client,
    pub state: Arc<AppState>,
    pub spool_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A seeded tenant with one campaign and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seeded {
    pub org: Uuid,
    pub campaign: Uuid,
    pub contact: Uuid,
    pub message: Uuid,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut ServeArgs)) -> TestApp {
    spawn_app_on(&fresh_database().await, configure, None).await
}

/// The app against an existing database; `https` replaces the outbound HTTPS of SNS (a
/// test seam: the allowlist checks run before it is called).
pub async fn spawn_app_on(
    db_url: &str,
    configure: impl FnOnce(&mut ServeArgs),
    https: Option<Arc<dyn HttpsGet>>,
) -> TestApp {
    let spool_dir = temp_dir("spool");
    let mut args = test_args(db_url, &spool_dir);
    configure(&mut args);
    let spool_dir = args.pipeline.spool_dir.clone();
    let config = Config::from_args(args).expect("test config is valid");
    let prepared = match https {
        Some(h) => app::prepare(&config, h),
        None => app::prepare_default(&config),
    }
    .expect("test config prepares");
    let public = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .expect("bind public");
    let admin = tokio::net::TcpListener::bind(config.server.admin_listen)
        .await
        .expect("bind admin");
    let app = App::build(config, public, admin, prepared)
        .await
        .expect("build app");
    let (addr, admin_addr, state) = (app.public_addr(), app.admin_addr(), app.state());
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        admin_addr,
        db_url: db_url.to_string(),
        db: connect(db_url).await,
        http: http_client(),
        state,
        spool_dir,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

pub const BROWSER_UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Graceful shutdown, as on SIGTERM; returns once the drain is complete.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("app task").expect("app stopped cleanly");
        }
    }

    /// A new organization with a contact, a campaign and one message (status `sent`).
    pub async fn seed(&self) -> Seeded {
        seed_tenant(&self.db).await
    }

    /// Another message (and contact) in the same organization and campaign.
    pub async fn seed_message(&self, s: &Seeded) -> Seeded {
        seed_message_in(&self.db, s).await
    }

    pub fn mint(&self, purpose: Purpose, s: &Seeded, url: Option<&str>) -> String {
        token::mint(&test_token_keys(), purpose, s.org, s.message, url).expect("mint")
    }

    pub async fn get(&self, path: &str, ua: Option<&str>) -> reqwest::Response {
        let mut r = self.http.get(self.url(path));
        if let Some(ua) = ua {
            r = r.header("user-agent", ua);
        }
        r.send().await.expect("GET")
    }

    pub async fn post_webhook(
        &self,
        provider: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut r = self
            .http
            .post(self.url(&format!("/webhooks/{provider}")))
            .body(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.expect("POST webhook")
    }

    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The value of one sample, e.g. `metric("reachly_events_written_total{type=\"opened\"}")`;
    /// 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics_text().await, sample)
    }

    pub async fn events(&self, message: Uuid) -> Vec<EventRow> {
        events_of(&self.db, message).await
    }

    pub async fn message(&self, id: Uuid) -> MessageRow {
        message_row(&self.db, id).await
    }

    pub async fn contact_status(&self, id: Uuid) -> String {
        self.db
            .query_one(
                "SELECT COALESCE(status, '') FROM contacts WHERE id = $1",
                &[&id],
            )
            .await
            .expect("contact")
            .get(0)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Waits until `sql` (a count) reaches `n`; panics with the last value after 15 s.
    pub async fn wait_count(&self, sql: &str, n: i64) {
        wait_for_count(&self.db, sql, n).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn wait_for_count(db: &tokio_postgres::Client, sql: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got: i64 = db
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0);
        if got == n {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for `{sql}` to be {n}; it is {got}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap_or(f64::NAN))
        .unwrap_or(0.0)
}

pub async fn seed_tenant(db: &tokio_postgres::Client) -> Seeded {
    let org = Uuid::new_v4();
    db.execute(
        "INSERT INTO organizations (id, name) VALUES ($1, 'Test org')",
        &[&org],
    )
    .await
    .expect("org");
    let campaign = Uuid::new_v4();
    db.execute(
        "INSERT INTO campaigns (id, organization_id, name) VALUES ($1, $2, 'Test campaign')",
        &[&campaign, &org],
    )
    .await
    .expect("campaign");
    seed_message_in(
        db,
        &Seeded {
            org,
            campaign,
            contact: Uuid::nil(),
            message: Uuid::nil(),
        },
    )
    .await
}

/// A new tenant with `n` messages (the first as [`seed_tenant`] makes it, the others in
/// its campaign, each to a contact of its own).
pub async fn seed_tenant_messages(db: &tokio_postgres::Client, n: usize) -> Vec<Seeded> {
    let first = seed_tenant(db).await;
    let mut messages = vec![first];
    for _ in 1..n {
        messages.push(seed_message_in(db, &first).await);
    }
    messages
}

pub async fn seed_message_in(db: &tokio_postgres::Client, s: &Seeded) -> Seeded {
    let contact = Uuid::new_v4();
    db.execute(
        "INSERT INTO contacts (id, organization_id, email) VALUES ($1, $2, $3)",
        &[
            &contact,
            &s.org,
            &format!("{}@example.com", contact.simple()),
        ],
    )
    .await
    .expect("contact");
    let message = Uuid::new_v4();
    db.execute(
        "INSERT INTO campaign_messages (id, organization_id, campaign_id, contact_id, status) VALUES ($1, $2, $3, $4, 'sent')",
        &[&message, &s.org, &s.campaign, &contact],
    )
    .await
    .expect("message");
    Seeded {
        org: s.org,
        campaign: s.campaign,
        contact,
        message,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub organization_id: Uuid,
    pub event_type: String,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub link_url: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub provider: String,
    pub dedup_key: Option<String>,
}

pub async fn events_of(db: &tokio_postgres::Client, message: Uuid) -> Vec<EventRow> {
    db.query(
        "SELECT organization_id, event_type, ip_address, user_agent, link_url, metadata, created_at, provider, dedup_key \
         FROM email_events WHERE message_id = $1 ORDER BY created_at, id",
        &[&message],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| EventRow {
        organization_id: r.get(0),
        event_type: r.get(1),
        ip_address: r.get(2),
        user_agent: r.get(3),
        link_url: r.get(4),
        metadata: r.get(5),
        created_at: r.get(6),
        provider: r.get(7),
        dedup_key: r.get(8),
    })
    .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub status: Option<String>,
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub opened_at: Option<chrono::DateTime<chrono::Utc>>,
    pub clicked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub error_message: Option<String>,
}

pub async fn message_row(db: &tokio_postgres::Client, id: Uuid) -> MessageRow {
    let r = db
        .query_one(
            "SELECT status, sent_at, delivered_at, opened_at, clicked_at, error_message FROM campaign_messages WHERE id = $1",
            &[&id],
        )
        .await
        .expect("message row");
    MessageRow {
        status: r.get(0),
        sent_at: r.get(1),
        delivered_at: r.get(2),
        opened_at: r.get(3),
        clicked_at: r.get(4),
        error_message: r.get(5),
    }
}

/// The built binary, for tests that need a real process (signals, crashes).
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_reachly-ingest")
}

/// `reachly-ingest serve` as a child process on ports of its own choosing (port 0), found
/// from its JSON log line `serving`; its stderr is drained (and kept for failure messages).
pub struct ServeProcess {
    pub child: std::process::Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    pub fn spawn(db_url: &str, spool: &Path, extra_env: &[(&str, &str)]) -> ServeProcess {
        Self::spawn_with_fd_limit(db_url, spool, extra_env, None)
    }

    /// Like `spawn`, under a soft descriptor limit (`ulimit -n`) when one is given.
    pub fn spawn_with_fd_limit(
        db_url: &str,
        spool: &Path,
        extra_env: &[(&str, &str)],
        nofile: Option<u32>,
    ) -> ServeProcess {
        use std::io::BufRead as _;
        let mut c = match nofile {
            None => Command::new(binary()),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    &format!("ulimit -n {n} && exec \"$0\" \"$@\""),
                    binary(),
                ]);
                sh
            }
        };
        c.arg("serve")
            .env("DATABASE_URL", db_url)
            .env("REACHLY_TOKEN_KEYS", test_token_keys_arg())
            .env("REACHLY_LISTEN", "127.0.0.1:0")
            .env("REACHLY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("REACHLY_SPOOL_DIR", spool)
            .env("REACHLY_DB_CONNECT_TIMEOUT_S", "1")
            .env("REACHLY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn reachly-ingest serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["fields"]["message"] == "serving"
                {
                    let addr = |k: &str| {
                        v["fields"][k]
                            .as_str()
                            .and_then(|s| s.parse::<SocketAddr>().ok())
                    };
                    if let (Some(p), Some(a)) = (addr("public"), addr("admin")) {
                        let _ = tx.send((p, a));
                    }
                }
                sink.lock().map(|mut l| l.push(line)).ok();
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((public, admin)) => ServeProcess {
                child,
                public,
                admin,
                log,
            },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "serve did not start; its log:\n{}",
                    log.lock().map(|l| l.join("\n")).unwrap_or_default()
                );
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig} failed");
    }

    /// Waits for exit (at most `within`), returning the exit code.
    pub async fn wait(mut self, within: Duration) -> Option<i32> {
        let log = self.log.clone();
        let status = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + within;
            loop {
                if let Some(s) = self.child.try_wait().expect("try_wait") {
                    return Some(s);
                }
                if std::time::Instant::now() > deadline {
                    let _ = self.child.kill();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        })
        .await
        .expect("join");
        match status {
            Some(s) => s.code(),
            None => panic!(
                "serve did not exit within {within:?}; log:\n{}",
                log.lock().map(|l| l.join("\n")).unwrap_or_default()
            ),
        }
    }

    /// Waits until `path` on the admin listener answers 200.
    pub async fn wait_admin_ok(&self, path: &str) {
        let client = http_client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let last = match client
                .get(self.admin_url(path))
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => format!("{}", r.status()),
                Err(e) => format!("{e}"),
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never answered 200 (last: {last})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

/// A cluster of a test's own with no database made and nothing migrated (roles, poolers,
/// standbys: things that are cluster-wide or need the server to themselves).
pub async fn private_unmigrated_cluster(tag: &str) -> PgCluster {
    let dir = std::env::temp_dir().join(format!("reachly-test-{tag}-{}", Uuid::new_v4().simple()));
    tokio::task::spawn_blocking(move || start_cluster_with(&dir, |_| Ok(()), &[]))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("cannot start a private PostgreSQL: {e:#}"))
}

/// `c.url(db)` as another user.
pub fn as_user(c: &PgCluster, user: &str, db: &str) -> String {
    c.url(db).replace("user=postgres", &format!("user={user}"))
}

/// Runs the real binary to completion; returns (exit code, stdout, stderr).
pub async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut c = Command::new(binary());
    c.args(args).env("RUST_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || c.output())
        .await
        .expect("join")
        .expect("run reachly-ingest");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Postmark hard bounce of `msg` happening now (distinct each call: a fresh Postmark id).
pub fn postmark_bounce(org: Uuid, msg: Uuid) -> String {
    serde_json::json!({
        "RecordType": "Bounce", "MessageStream": "outbound",
        "ID": u64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or([1; 8])) >> 2,
        "Type": "HardBounce", "TypeCode": 1, "Name": "Hard bounce",
        "MessageID": Uuid::new_v4().to_string(),
        "Metadata": {"reachly_message_id": msg.to_string(), "reachly_organization_id": org.to_string()},
        "Description": "mailbox not found", "Details": "550 5.1.1", "Email": "x@example.com",
        "BouncedAt": chrono::Utc::now().to_rfc3339(), "Inactive": true
    })
    .to_string()
}

/// `Authorization` for Postmark with these `USER:PASSWORD` credentials.
pub fn basic_auth(credentials: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// Tests that start clusters, poolers or standbys of their own take this first, so that at
/// most one of them loads the 2-core machine at a time (timing-sensitive tests of other
/// modules run beside them).
pub async fn heavy_test_guard() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    HEAVY
        .get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}
