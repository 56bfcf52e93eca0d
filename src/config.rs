//! Configuration: every option is a command-line flag and an environment variable (names as
//! in SPEC.md), parsed once by clap into typed fields (durations are `Duration`s, counts are
//! at least 1) with their defaults beside them, one struct per subsystem: [`DbConfig`],
//! [`ServerConfig`], [`PipelineConfig`], [`PartitionConfig`], [`TrackingConfig`],
//! [`WebhookConfig`], [`LogConfig`]. `--help` lists them all. [`Config::from_args`] keeps only
//! the checks that span fields. A value that does not parse is reported by `main` as one
//! line, with exit code 64, before anything binds.
//!
//! This module sits below the subsystems it configures and imports only leaves (`token`):
//! checks that need a subsystem (webhook secrets that must parse, the database CA file) are
//! made by `app::prepare`, called by `main` before binding.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::token::TokenKeys;

/// Exit code for invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "reachly-ingest",
    version,
    about = "Reachly event ingestion: open pixels, click redirects, one-click unsubscribes and ESP webhooks, bulk-written to PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the public and admin listeners against DATABASE_URL.
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Mint a tracking token (or a full URL with --base) for a message.
    Token(TokenArgs),
    /// Start a private PostgreSQL under ./.reachly/, migrate it, seed a demo tenant, print
    /// sample URLs, then serve.
    Dev(DevArgs),
    /// Convert Apple's iCloud Private Relay egress-ip-ranges.csv (downloaded by the operator)
    /// into the dated, merged list REACHLY_RELAY_RANGES_FILE reads.
    RelayRanges(RelayRangesArgs),
    /// Ask a running instance's admin listener for /healthz (or --path /readyz); exit 0 if it
    /// answers 200, else 1 (the container image's HEALTHCHECK: the slim image has no curl).
    Healthcheck(HealthcheckArgs),
    /// Run partition maintenance of email_events once (make the days ahead, drop expired
    /// ones) and exit; run it as the tables' owner, e.g. from a CronJob.
    Maintain(MaintainArgs),
    /// Archive day partitions of email_events past retention (or the days named) to
    /// REACHLY_ARCHIVE_DIR: export, verify, then drop.
    Archive(ArchiveArgs),
    /// Load archived days back into email_events (idempotent).
    Restore(RestoreArgs),
    /// Print table sizes, partition ages, dead letters, spool and archive at a glance.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct MaintainArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub partitions: PartitionConfig,
    #[command(flatten)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The instance's admin listener; an unspecified address (0.0.0.0, [::]) means loopback.
    #[arg(long, env = "REACHLY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// /healthz (alive) or /readyz (ready for traffic).
    #[arg(long, default_value = "/healthz", value_parser = ["/healthz", "/readyz"])]
    pub path: String,
    /// Milliseconds for the whole exchange.
    #[arg(long = "timeout-ms", default_value = "2000", value_parser = positive_millis)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RelayRangesArgs {
    /// Apple's egress-ip-ranges.csv (prefix,country,region,city per line).
    pub input: PathBuf,
    /// Where to write the merged list (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The date the input was downloaded (YYYY-MM-DD; default: today).
    #[arg(long)]
    pub date: Option<chrono::NaiveDate>,
}

/// A day, YYYY-MM-DD.
fn day(s: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|_| format!("{s:?} is not a day (YYYY-MM-DD)"))
}

/// `archive`: the days (past retention, or `--from`..`--to`) and where the files go.
#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub partitions: PartitionConfig,
    /// First day to archive (with --to); without them, every day past the retention.
    #[arg(long, value_parser = day, requires = "to")]
    pub from: Option<chrono::NaiveDate>,
    /// Last day to archive, inclusive.
    #[arg(long, value_parser = day, requires = "from")]
    pub to: Option<chrono::NaiveDate>,
    /// Test seam: abort the process right after this step (a simulated crash).
    #[arg(long, env = "REACHLY_ARCHIVE_CRASH_AFTER", hide = true)]
    pub crash_after: Option<String>,
    #[command(flatten)]
    pub log: LogConfig,
}

/// `restore`: the days to load back from the archive directory.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Directory of the archive files.
    #[arg(long, env = "REACHLY_ARCHIVE_DIR")]
    pub archive_dir: PathBuf,
    /// First day to restore.
    #[arg(long, value_parser = day)]
    pub from: chrono::NaiveDate,
    /// Last day to restore, inclusive (default: --from).
    #[arg(long, value_parser = day)]
    pub to: Option<chrono::NaiveDate>,
    #[command(flatten)]
    pub log: LogConfig,
}

/// `status`: what to look at.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The spool directory whose size to show.
    #[arg(long, env = "REACHLY_SPOOL_DIR", default_value = "./spool")]
    pub spool_dir: PathBuf,
    /// The archive directory whose files to count.
    #[arg(long, env = "REACHLY_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
    /// Size of the database's disk in bytes, to show how full it is.
    #[arg(long, env = "REACHLY_DATABASE_DISK_BYTES")]
    pub database_disk_bytes: Option<u64>,
    #[command(flatten)]
    pub log: LogConfig,
}

/// `serve`: every subsystem's configuration, as parsed.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub server: ServerConfig,
    #[command(flatten)]
    pub pipeline: PipelineConfig,
    #[command(flatten)]
    pub partitions: PartitionConfig,
    #[command(flatten)]
    pub tracking: TrackingConfig,
    #[command(flatten)]
    pub webhooks: WebhookConfig,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub bus: BusConfig,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Directory of the private PostgreSQL cluster and spool.
    #[arg(long, env = "REACHLY_DEV_DIR", default_value = ".reachly")]
    pub dev_dir: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// What the token is for.
    #[arg(value_enum)]
    pub purpose: crate::token::Purpose,
    /// organizations.id of the message's tenant.
    #[arg(long)]
    pub org_id: uuid::Uuid,
    /// campaign_messages.id.
    #[arg(long)]
    pub message_id: uuid::Uuid,
    /// Destination URL (click tokens only; http or https).
    #[arg(long)]
    pub url: Option<String>,
    /// Public base URL of this service (e.g. https://t.example.com); prints the full URL.
    #[arg(long)]
    pub base: Option<String>,
    /// Signing keys, ID:BASE64KEY[,ID:BASE64KEY...]; the first one mints.
    #[arg(long, env = "REACHLY_TOKEN_KEYS", hide_env_values = true)]
    pub token_keys: TokenKeys,
}

// ---- value parsers: units in types ----

/// Milliseconds into a `Duration`.
fn millis(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{s:?} is not a whole number of milliseconds"))
}

/// Milliseconds into a positive `Duration`.
fn positive_millis(s: &str) -> Result<Duration, String> {
    match millis(s)? {
        d if d.is_zero() => Err("must be at least 1 millisecond".into()),
        d => Ok(d),
    }
}

/// Seconds into a `Duration`.
fn seconds(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))
}

/// Seconds into a positive `Duration`.
fn positive_seconds(s: &str) -> Result<Duration, String> {
    match seconds(s)? {
        d if d.is_zero() => Err("must be at least 1 second".into()),
        d => Ok(d),
    }
}

/// A count of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

// ---- one struct per subsystem ----

/// The database connection, as parsed: the URL is optional here because `dev` brings its own.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// libpq-style connection string (key=value or postgres:// URL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Connections in the pool (writers, readiness, maintenance, unsubscribe lookups).
    #[arg(long = "db-pool-size", env = "REACHLY_DB_POOL_SIZE", default_value = "4", value_parser = positive)]
    pub pool_size: usize,
    /// Seconds to wait for a pooled connection or a new one.
    #[arg(long = "db-connect-timeout-s", env = "REACHLY_DB_CONNECT_TIMEOUT_S", default_value = "5", value_parser = positive_seconds)]
    pub connect_timeout: Duration,
    /// CA certificates (PEM) to verify the database's TLS certificate and host name against
    /// (libpq's verify-full); without it TLS encrypts but does not authenticate the server,
    /// as libpq's prefer/require. `sslmode` in DATABASE_URL decides whether TLS is used.
    #[arg(long = "db-ca-file", env = "REACHLY_DB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Apply migrations when serve starts (under an advisory lock: safe with several instances).
    #[arg(long, env = "REACHLY_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
}

impl DbArgs {
    /// The database configuration, once a URL is known; the error is one config line.
    pub fn into_config(self) -> Result<DbConfig, String> {
        let url = self.database_url.ok_or(
            "DATABASE_URL is required (or run `reachly-ingest dev` for a private local database)",
        )?;
        tokio_postgres::Config::from_str(url.expose())
            .map_err(|e| format!("DATABASE_URL is not a valid connection string: {e}"))?;
        Ok(DbConfig {
            url,
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            ca_file: self.ca_file,
            migrate_on_start: self.migrate_on_start,
        })
    }
}

/// The database connection.
#[derive(Clone)]
pub struct DbConfig {
    pub url: Secret,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// `REACHLY_DB_CA_FILE`: TLS verification roots (see `db::tls`).
    pub ca_file: Option<PathBuf>,
    pub migrate_on_start: bool,
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbConfig")
            .field("url", &self.url)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("ca_file", &self.ca_file)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

/// The listeners, their timeouts, and the shutdown budget (one home: the HTTP drain and
/// the pipeline's final flush share it).
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Public listener: pixels, clicks, unsubscribes, webhooks.
    #[arg(long, env = "REACHLY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /healthz, /readyz. Never expose publicly.
    #[arg(long, env = "REACHLY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Milliseconds a client may take to send the request head.
    #[arg(long = "header-timeout-ms", env = "REACHLY_HEADER_TIMEOUT_MS", default_value = "5000", value_parser = positive_millis)]
    pub header_timeout: Duration,
    /// Milliseconds a client may take to send a request body.
    #[arg(long = "body-timeout-ms", env = "REACHLY_BODY_TIMEOUT_MS", default_value = "15000", value_parser = positive_millis)]
    pub body_timeout: Duration,
    /// Milliseconds a request may take in all (webhooks include waiting for durability).
    #[arg(long = "request-timeout-ms", env = "REACHLY_REQUEST_TIMEOUT_MS", default_value = "25000", value_parser = positive_millis)]
    pub request_timeout: Duration,
    /// Seconds to finish in-flight requests and flush or spool buffered events on SIGTERM.
    #[arg(long = "shutdown-timeout-s", env = "REACHLY_SHUTDOWN_TIMEOUT_S", default_value = "20", value_parser = seconds)]
    pub shutdown_timeout: Duration,
    /// Milliseconds a connection (HTTP/1 or h2) may stay open with no request in flight.
    #[arg(long = "idle-timeout-ms", env = "REACHLY_IDLE_TIMEOUT_MS", default_value = "30000", value_parser = positive_millis)]
    pub idle_timeout: Duration,
    /// Connections the public listener holds at once; past it new ones wait in the kernel's
    /// backlog. Lowered at start to fit the process's descriptor limit.
    #[arg(long, env = "REACHLY_MAX_CONNECTIONS", default_value = "10000", value_parser = positive)]
    pub max_connections: usize,
    /// Connections the admin listener holds at once (its descriptors are kept apart).
    #[arg(long, env = "REACHLY_ADMIN_MAX_CONNECTIONS", default_value = "32", value_parser = positive)]
    pub admin_max_connections: usize,
    /// Bytes of request bodies all requests together may hold in memory; a body that would
    /// pass it is answered 503 + Retry-After at once. At least REACHLY_WEBHOOK_MAX_BYTES.
    #[arg(long, env = "REACHLY_BODY_BUDGET_BYTES", default_value_t = 64 << 20, value_parser = positive)]
    pub body_budget_bytes: usize,
}

/// The in-memory buffer, the batch writers and the spool.
#[derive(Debug, Clone, Args)]
pub struct PipelineConfig {
    /// Events held in memory before new ones go to the on-disk spool.
    #[arg(long, env = "REACHLY_BUFFER_MAX_EVENTS", default_value = "100000", value_parser = positive)]
    pub buffer_max_events: usize,
    /// Bytes of memory the buffered events may hold (estimated per event: its strings and
    /// metadata); past it new ones go to the spool, as past REACHLY_BUFFER_MAX_EVENTS.
    /// Keeps the process's memory bounded whatever the events carry and however long an
    /// overload lasts.
    #[arg(long, env = "REACHLY_BUFFER_MAX_BYTES", default_value_t = 24 << 20, value_parser = positive)]
    pub buffer_max_bytes: usize,
    /// Events in one batch (one transaction).
    #[arg(long, env = "REACHLY_FLUSH_MAX_EVENTS", default_value = "5000", value_parser = positive)]
    pub flush_max_events: usize,
    /// Milliseconds a batch may wait for more events before it is written.
    #[arg(long = "flush-interval-ms", env = "REACHLY_FLUSH_INTERVAL_MS", default_value = "200", value_parser = positive_millis)]
    pub flush_interval: Duration,
    /// Milliseconds a batch holding a webhook's or unsubscribe's events (someone waits for the
    /// commit) waits at most for more before it is written, while more keep coming (it is
    /// written after 2 ms without an arrival): group commit. 20 ms: at 4,750 req/s in the load
    /// test, 2 ms made 55-event commits at 100 us of database CPU per event, 20 ms 181-event
    /// commits at 85 us (webhook p50 25 -> 41 ms; ESPs wait seconds).
    #[arg(long = "durable-linger-ms", env = "REACHLY_DURABLE_LINGER_MS", default_value = "20", value_parser = millis)]
    pub durable_linger: Duration,
    /// Concurrent batch writers (each holds one connection while it writes).
    #[arg(long, env = "REACHLY_WRITERS", default_value = "2", value_parser = positive)]
    pub writers: usize,
    /// Directory of the on-disk spool used while the database cannot keep up or is down.
    #[arg(long, env = "REACHLY_SPOOL_DIR", default_value = "./spool")]
    pub spool_dir: PathBuf,
    /// Bytes the spool may hold; past it events are dropped and counted.
    #[arg(long, env = "REACHLY_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    pub spool_max_bytes: u64,
    /// Milliseconds a statement of a batch transaction may run (SET LOCAL statement_timeout);
    /// past it the batch fails, is counted and retried. 0: the server's setting.
    #[arg(long = "db-statement-timeout-ms", env = "REACHLY_DB_STATEMENT_TIMEOUT_MS", default_value = "30000", value_parser = millis)]
    pub statement_timeout: Duration,
    /// Milliseconds a batch transaction may wait for a lock (SET LOCAL lock_timeout), e.g. on
    /// a campaign_messages row someone holds; past it the batch fails, is counted and
    /// retried. 0: the server's setting.
    #[arg(long = "db-lock-timeout-ms", env = "REACHLY_DB_LOCK_TIMEOUT_MS", default_value = "5000", value_parser = millis)]
    pub lock_timeout: Duration,
    /// Nice steps (0-19) the pipeline's own threads (batch writers, spool replay, parsing of
    /// large webhook bodies) run below the request path's, so a pixel or click does not wait
    /// behind a batch being encoded. 0: the same priority (still threads of their own).
    #[arg(long, env = "REACHLY_BACKGROUND_NICE", default_value = "5", value_parser = clap::value_parser!(i32).range(0..=19))]
    pub background_nice: i32,
}

/// Daily partitions of `email_events`: made ahead, archived (when a directory is given) and
/// dropped past retention; dead letters expire; the database's disk size for the alert.
#[derive(Debug, Clone, Args)]
pub struct PartitionConfig {
    /// Daily partitions of email_events made ahead of today.
    #[arg(
        long = "partition-premake-days",
        env = "REACHLY_PARTITION_PREMAKE_DAYS",
        default_value_t = 7
    )]
    pub premake_days: u32,
    /// Partitions entirely older than this many days are dropped.
    #[arg(
        long = "event-retention-days",
        env = "REACHLY_EVENT_RETENTION_DAYS",
        default_value_t = 400
    )]
    pub retention_days: u32,
    /// Seconds between partition maintenance runs.
    #[arg(long = "partition-maintenance-interval-s", env = "REACHLY_PARTITION_MAINTENANCE_INTERVAL_S", default_value = "3600", value_parser = positive_seconds)]
    pub interval: Duration,
    /// Partition maintenance in this process: `on`, or `off` when `reachly-ingest maintain`
    /// runs it as the tables' owner (a CronJob): a least-privilege role cannot make partitions.
    #[arg(long = "partition-maintenance", env = "REACHLY_PARTITION_MAINTENANCE", default_value = "on", value_parser = on_off)]
    pub in_process: bool,
    /// Directory where partitions past retention are archived (zstd CSV + manifest) and
    /// verified before they are dropped. Without it they are dropped, and their events gone.
    #[arg(long, env = "REACHLY_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
    /// Dead letters older than this many days are deleted by maintenance (0: kept forever).
    #[arg(
        long = "dead-letter-retention-days",
        env = "REACHLY_DEAD_LETTER_RETENTION_DAYS",
        default_value_t = 90
    )]
    pub dead_letter_retention_days: u32,
    /// Size of the database's disk in bytes (e.g. 34359738368 for 32 GiB), exported as
    /// reachly_database_disk_bytes for the disk-full alert; unset: not exported.
    #[arg(long, env = "REACHLY_DATABASE_DISK_BYTES")]
    pub database_disk_bytes: Option<u64>,
}

/// `on`/`off` (also `true`/`false`).
fn on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
    }
}

/// Our own tracking routes: token keys, client addresses, machine traffic.
#[derive(Debug, Clone, Args)]
pub struct TrackingConfig {
    /// Token keys, ID:BASE64KEY[,ID:BASE64KEY...], each at least 32 bytes; the first mints,
    /// all verify. Without keys the tracking routes answer as for a bad token.
    #[arg(long, env = "REACHLY_TOKEN_KEYS", hide_env_values = true)]
    pub token_keys: Option<TokenKeys>,
    /// How client IPs are stored: truncate (IPv4 /24, IPv6 /48), full or none.
    #[arg(long, env = "REACHLY_IP_MODE", value_enum, default_value_t = IpMode::Truncate)]
    pub ip_mode: IpMode,
    /// CIDRs whose X-Forwarded-For is believed (comma-separated).
    #[arg(long, env = "REACHLY_TRUSTED_PROXIES", value_delimiter = ',', num_args = 0..)]
    pub trusted_proxies: Vec<IpNet>,
    /// Extra user-agent substrings (case-insensitive, comma-separated) marking machine
    /// traffic, added to the built-in list of prefetchers and link scanners.
    #[arg(long, env = "REACHLY_MACHINE_USER_AGENTS", value_delimiter = ',', num_args = 0..)]
    pub machine_user_agents: Vec<String>,
    /// Apple iCloud Private Relay egress ranges (a file written by `reachly-ingest
    /// relay-ranges`, or Apple's egress-ip-ranges.csv itself) to recognise Apple Mail Privacy
    /// Protection prefetches; default: the dated list shipped in data/.
    #[arg(long, env = "REACHLY_RELAY_RANGES_FILE")]
    pub relay_ranges_file: Option<PathBuf>,
}

/// ESP webhooks: the body limit and each provider's secret (a provider without one is 404).
#[derive(Debug, Clone, Args)]
pub struct WebhookConfig {
    /// Largest webhook body accepted (413 past it).
    #[arg(long, env = "REACHLY_WEBHOOK_MAX_BYTES", default_value_t = 10 << 20)]
    pub webhook_max_bytes: usize,
    /// SendGrid signed event webhook: verification key, base64 DER (as SendGrid shows it).
    #[arg(long, env = "REACHLY_SENDGRID_PUBLIC_KEY", hide_env_values = true)]
    pub sendgrid_public_key: Option<Secret>,
    /// Mailgun HTTP webhook signing key.
    #[arg(long, env = "REACHLY_MAILGUN_SIGNING_KEY", hide_env_values = true)]
    pub mailgun_signing_key: Option<Secret>,
    /// Mailgun: optional USER:PASSWORD put in the webhook URL (`https://USER:PASSWORD@host/...`),
    /// required on every request when set: a second factor beside the signature, which does
    /// not cover the event.
    #[arg(long, env = "REACHLY_MAILGUN_BASIC_AUTH", hide_env_values = true)]
    pub mailgun_basic_auth: Option<Secret>,
    /// Amazon SNS topic ARNs allowed to post SES notifications (comma-separated).
    #[arg(long, env = "REACHLY_SES_TOPIC_ARNS", value_delimiter = ',', num_args = 0..)]
    pub ses_topic_arns: Vec<String>,
    /// Postmark webhook basic auth, USER:PASSWORD.
    #[arg(long, env = "REACHLY_POSTMARK_BASIC_AUTH", hide_env_values = true)]
    pub postmark_basic_auth: Option<Secret>,
    /// SparkPost webhook basic auth, USER:PASSWORD.
    #[arg(long, env = "REACHLY_SPARKPOST_BASIC_AUTH", hide_env_values = true)]
    pub sparkpost_basic_auth: Option<Secret>,
    /// SparkPost webhook bearer token (alternative to basic auth).
    #[arg(long, env = "REACHLY_SPARKPOST_TOKEN", hide_env_values = true)]
    pub sparkpost_token: Option<Secret>,
    /// SparkPost sends `initial_open` (top pixel) and `open` (bottom pixel) for one open:
    /// true counts `initial_open` and keeps `open` as a dead letter; false (default) the
    /// reverse. Enable only one of them at SparkPost (docs/providers.md).
    #[arg(long, env = "REACHLY_SPARKPOST_INITIAL_OPEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub sparkpost_initial_open: bool,
    /// Mandrill webhook key.
    #[arg(long, env = "REACHLY_MANDRILL_WEBHOOK_KEY", hide_env_values = true)]
    pub mandrill_webhook_key: Option<Secret>,
    /// The exact URL configured in Mandrill (it is part of the signed string).
    #[arg(long, env = "REACHLY_MANDRILL_WEBHOOK_URL")]
    pub mandrill_webhook_url: Option<String>,
    /// Resend (Svix) signing secret, whsec_...
    #[arg(long, env = "REACHLY_RESEND_WEBHOOK_SECRET", hide_env_values = true)]
    pub resend_webhook_secret: Option<Secret>,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log format: human or json.
    #[arg(long, env = "REACHLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpMode {
    /// IPv4 /24, IPv6 /48.
    Truncate,
    Full,
    None,
}

/// The scale-out bus (NATS JetStream, see `pipeline::bus`). Without `REACHLY_BUS_URL` one
/// process does everything (the embedded default) and none of the rest applies.
#[derive(Debug, Clone, Args)]
pub struct BusConfig {
    /// NATS server URLs (comma-separated, e.g. nats://n1:4222,nats://n2:4222). With one,
    /// `serve` publishes every envelope to JetStream and, unless an edge, consumes it.
    #[arg(long = "bus-url", env = "REACHLY_BUS_URL", value_delimiter = ',', num_args = 0..)]
    pub urls: Vec<String>,
    /// edge: accept and publish; writer: consume and write to the database (its public
    /// listener, if used, publishes like an edge); both.
    #[arg(long = "bus-role", env = "REACHLY_BUS_ROLE", value_enum, default_value_t = BusRole::Both)]
    pub role: BusRole,
    /// JetStream stream name.
    #[arg(
        long = "bus-stream",
        env = "REACHLY_BUS_STREAM",
        default_value = "REACHLY_EVENTS"
    )]
    pub stream: String,
    /// Subject prefix; messages go to PREFIX.<organization hash>.
    #[arg(
        long = "bus-subject-prefix",
        env = "REACHLY_BUS_SUBJECT_PREFIX",
        default_value = "reachly.events"
    )]
    pub subject_prefix: String,
    /// Durable pull consumer shared by all writers.
    #[arg(
        long = "bus-consumer",
        env = "REACHLY_BUS_CONSUMER",
        default_value = "writers"
    )]
    pub consumer: String,
    /// Stream replicas (3 survives one node's loss; 1 for a single-node bus).
    #[arg(long = "bus-replicas", env = "REACHLY_BUS_REPLICAS", default_value = "3", value_parser = positive)]
    pub replicas: usize,
    /// Bytes the stream may hold (the backlog); past it publishes fail (discard new) and
    /// edges spool, then answer 503.
    #[arg(long = "bus-max-bytes", env = "REACHLY_BUS_MAX_BYTES", default_value_t = 1 << 30)]
    pub max_bytes: i64,
    /// Seconds the stream remembers a Nats-Msg-Id (re-publishes inside it are dropped).
    #[arg(long = "bus-duplicate-window-s", env = "REACHLY_BUS_DUPLICATE_WINDOW_S", default_value = "120", value_parser = positive_seconds)]
    pub duplicate_window: Duration,
    /// Milliseconds an edge waits for a publish ack before spooling the envelope instead.
    #[arg(long = "bus-publish-timeout-ms", env = "REACHLY_BUS_PUBLISH_TIMEOUT_MS", default_value = "5000", value_parser = positive_millis)]
    pub publish_timeout: Duration,
    /// Seconds a fetched message may stay unacknowledged before it is redelivered to
    /// another writer (writers send in-progress acks while they retry).
    #[arg(long = "bus-ack-wait-s", env = "REACHLY_BUS_ACK_WAIT_S", default_value = "30", value_parser = positive_seconds)]
    pub ack_wait: Duration,
    /// Fault injection for the crash tests only: `abort-after-commit` makes a writer abort
    /// the process (as kill -9 would) right after its first commit, before acking.
    #[arg(long = "bus-fault", env = "REACHLY_BUS_FAULT", hide = true)]
    pub fault: Option<String>,
}

impl BusConfig {
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }
    /// This process runs the consumer (writer or both).
    pub fn consumes(&self) -> bool {
        self.enabled() && self.role != BusRole::Edge
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BusRole {
    Edge,
    Writer,
    Both,
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Secret(s.to_owned()))
    }
}

/// Typed configuration of `serve`: the subsystems' configurations, checked across fields.
#[derive(Debug, Clone)]
pub struct Config {
    pub db: DbConfig,
    pub server: ServerConfig,
    pub pipeline: PipelineConfig,
    pub partitions: PartitionConfig,
    pub tracking: TrackingConfig,
    pub webhooks: WebhookConfig,
    pub log: LogConfig,
    pub bus: BusConfig,
}

impl Config {
    /// Checks what spans fields; the error is one line for `main` to print (exit 64).
    pub fn from_args(args: ServeArgs) -> Result<Config, String> {
        let db = args.db.into_config()?;
        if args.pipeline.flush_max_events > args.pipeline.buffer_max_events {
            return Err(format!(
                "REACHLY_FLUSH_MAX_EVENTS ({}) must not exceed REACHLY_BUFFER_MAX_EVENTS ({})",
                args.pipeline.flush_max_events, args.pipeline.buffer_max_events
            ));
        }
        for u in &args.bus.urls {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("REACHLY_BUS_URL: {u:?} is not a NATS server URL: {e}"))?;
        }
        if args.partitions.retention_days == 0 {
            return Err("REACHLY_EVENT_RETENTION_DAYS must be at least 1".into());
        }
        if args.server.body_budget_bytes < args.webhooks.webhook_max_bytes {
            return Err(format!(
                "REACHLY_BODY_BUDGET_BYTES ({}) must be at least REACHLY_WEBHOOK_MAX_BYTES ({}): a webhook of the largest allowed size must fit",
                args.server.body_budget_bytes, args.webhooks.webhook_max_bytes
            ));
        }
        if u32::try_from(args.webhooks.webhook_max_bytes).is_err() {
            return Err("REACHLY_WEBHOOK_MAX_BYTES must be below 4 GiB".into());
        }
        if let (Some(_), None) = (
            &args.webhooks.mandrill_webhook_key,
            &args.webhooks.mandrill_webhook_url,
        ) {
            return Err("REACHLY_MANDRILL_WEBHOOK_URL is required with REACHLY_MANDRILL_WEBHOOK_KEY (it is part of the signed string)".into());
        }
        Ok(Config {
            db,
            server: args.server,
            pipeline: args.pipeline,
            partitions: args.partitions,
            tracking: args.tracking,
            webhooks: args.webhooks,
            log: args.log,
            bus: args.bus,
        })
    }
}

impl ServeArgs {
    /// Parses `serve` arguments from an argv (environment variables still apply where no flag
    /// is given); used by tests and tools.
    pub fn from_argv<I, T>(argv: I) -> ServeArgs
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Wrapper {
            #[command(subcommand)]
            cmd: Only,
        }
        #[derive(Subcommand)]
        enum Only {
            Serve(ServeArgs),
        }
        let argv = std::iter::once(std::ffi::OsString::from("reachly-ingest"))
            .chain(argv.into_iter().map(Into::into));
        match Wrapper::parse_from(argv).cmd {
            Only::Serve(a) => a,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed_by_debug() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn flush_size_larger_than_buffer_is_refused() {
        let args = ServeArgs::from_argv([
            "serve",
            "--database-url",
            "host=localhost",
            "--buffer-max-events",
            "10",
            "--flush-max-events",
            "20",
        ]);
        assert!(
            Config::from_args(args)
                .unwrap_err()
                .contains("REACHLY_FLUSH_MAX_EVENTS")
        );
    }

    #[test]
    fn a_bus_url_that_does_not_parse_is_a_config_error() {
        let args = |url: &str| {
            ServeArgs::from_argv([
                "serve",
                "--database-url",
                "host=localhost",
                "--bus-url",
                url,
            ])
        };
        let bad = Config::from_args(args("nats://host:notaport")).unwrap_err();
        assert!(bad.contains("REACHLY_BUS_URL"), "{bad}");
        let ok = Config::from_args(args("nats://a:4222,nats://b:4222")).expect("two urls");
        assert_eq!(ok.bus.urls.len(), 2);
        assert!(ok.bus.enabled() && ok.bus.consumes());
    }

    #[test]
    fn durations_and_counts_are_typed_at_parse_time() {
        let args = ServeArgs::from_argv([
            "serve",
            "--header-timeout-ms",
            "1500",
            "--shutdown-timeout-s",
            "3",
        ]);
        assert_eq!(args.server.header_timeout, Duration::from_millis(1500));
        assert_eq!(args.server.shutdown_timeout, Duration::from_secs(3));
        assert_eq!(positive("0"), Err("must be at least 1".to_string()));
        assert!(positive_millis("0").is_err());
        assert!(millis("1.5").is_err());
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
    }
}
