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
}

/// The in-memory buffer, the batch writers and the spool.
#[derive(Debug, Clone, Args)]
pub struct PipelineConfig {
    /// Events held in memory before new ones go to the on-disk spool.
    #[arg(long, env = "REACHLY_BUFFER_MAX_EVENTS", default_value = "100000", value_parser = positive)]
    pub buffer_max_events: usize,
    /// Events in one batch (one transaction).
    #[arg(long, env = "REACHLY_FLUSH_MAX_EVENTS", default_value = "5000", value_parser = positive)]
    pub flush_max_events: usize,
    /// Milliseconds a batch may wait for more events before it is written.
    #[arg(long = "flush-interval-ms", env = "REACHLY_FLUSH_INTERVAL_MS", default_value = "200", value_parser = positive_millis)]
    pub flush_interval: Duration,
    /// Milliseconds a batch holding a webhook's or unsubscribe's events (someone waits for the
    /// commit) waits for more before it is written: group commit.
    #[arg(long = "durable-linger-ms", env = "REACHLY_DURABLE_LINGER_MS", default_value = "2", value_parser = millis)]
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
}

/// Daily partitions of `email_events`: made ahead, dropped past retention.
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
        if args.partitions.retention_days == 0 {
            return Err("REACHLY_EVENT_RETENTION_DAYS must be at least 1".into());
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
