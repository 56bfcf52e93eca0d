//! Configuration: every option is a command-line flag and an environment variable (names as
//! in SPEC.md), parsed once by clap into typed fields with their defaults beside them, one
//! struct per subsystem. `--help` lists them all. A value that does not parse is reported by
//! `main` as one line, with exit code 64, before anything binds.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

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

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub partitions: PartitionArgs,
    #[command(flatten)]
    pub tracking: TrackingArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub log: LogArgs,
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

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// libpq-style connection string (key=value or postgres:// URL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Connections in the pool (writers, readiness, maintenance, unsubscribe lookups).
    #[arg(long, env = "REACHLY_DB_POOL_SIZE", default_value_t = NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN))]
    pub db_pool_size: NonZeroUsize,
    /// Seconds to wait for a pooled connection or a new one.
    #[arg(long, env = "REACHLY_DB_CONNECT_TIMEOUT_S", default_value_t = 5)]
    pub db_connect_timeout_s: u64,
    /// CA certificates (PEM) to verify the database's TLS certificate and host name against
    /// (libpq's verify-full); without it TLS encrypts but does not authenticate the server,
    /// as libpq's prefer/require. `sslmode` in DATABASE_URL decides whether TLS is used.
    #[arg(long, env = "REACHLY_DB_CA_FILE")]
    pub db_ca_file: Option<PathBuf>,
}

impl DbArgs {
    /// The TLS connector these arguments ask for; the error is one config line.
    pub fn tls(&self) -> Result<crate::db::tls::Tls, String> {
        crate::db::tls::connector(self.db_ca_file.as_deref()).map_err(|e| format!("{e:#}"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Public listener: pixels, clicks, unsubscribes, webhooks.
    #[arg(long, env = "REACHLY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /healthz, /readyz. Never expose publicly.
    #[arg(long, env = "REACHLY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Apply migrations when serve starts (under an advisory lock: safe with several instances).
    #[arg(long, env = "REACHLY_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
    /// Milliseconds a client may take to send the request head.
    #[arg(long, env = "REACHLY_HEADER_TIMEOUT_MS", default_value_t = 5_000)]
    pub header_timeout_ms: u64,
    /// Milliseconds a client may take to send a request body.
    #[arg(long, env = "REACHLY_BODY_TIMEOUT_MS", default_value_t = 15_000)]
    pub body_timeout_ms: u64,
    /// Milliseconds a request may take in all (webhooks include waiting for durability).
    #[arg(long, env = "REACHLY_REQUEST_TIMEOUT_MS", default_value_t = 25_000)]
    pub request_timeout_ms: u64,
    /// Seconds to finish in-flight requests and flush or spool buffered events on SIGTERM.
    #[arg(long, env = "REACHLY_SHUTDOWN_TIMEOUT_S", default_value_t = 20)]
    pub shutdown_timeout_s: u64,
}

#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Events held in memory before new ones go to the on-disk spool.
    #[arg(long, env = "REACHLY_BUFFER_MAX_EVENTS", default_value_t = NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN))]
    pub buffer_max_events: NonZeroUsize,
    /// Events in one batch (one transaction).
    #[arg(long, env = "REACHLY_FLUSH_MAX_EVENTS", default_value_t = NonZeroUsize::new(5_000).unwrap_or(NonZeroUsize::MIN))]
    pub flush_max_events: NonZeroUsize,
    /// Milliseconds a batch may wait for more events before it is written.
    #[arg(long, env = "REACHLY_FLUSH_INTERVAL_MS", default_value_t = 200)]
    pub flush_interval_ms: u64,
    /// Milliseconds a batch holding a webhook's or unsubscribe's events (someone waits for the
    /// commit) waits for more before it is written: group commit.
    #[arg(long, env = "REACHLY_DURABLE_LINGER_MS", default_value_t = 2)]
    pub durable_linger_ms: u64,
    /// Concurrent batch writers (each holds one connection while it writes).
    #[arg(long, env = "REACHLY_WRITERS", default_value_t = NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN))]
    pub writers: NonZeroUsize,
    /// Directory of the on-disk spool used while the database cannot keep up or is down.
    #[arg(long, env = "REACHLY_SPOOL_DIR", default_value = "./spool")]
    pub spool_dir: PathBuf,
    /// Bytes the spool may hold; past it events are dropped and counted.
    #[arg(long, env = "REACHLY_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    pub spool_max_bytes: u64,
    /// Milliseconds a statement of a batch transaction may run (SET LOCAL statement_timeout);
    /// past it the batch fails, is counted and retried. 0: the server's setting.
    #[arg(
        long,
        env = "REACHLY_DB_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub db_statement_timeout_ms: u64,
    /// Milliseconds a batch transaction may wait for a lock (SET LOCAL lock_timeout), e.g. on
    /// a campaign_messages row someone holds; past it the batch fails, is counted and
    /// retried. 0: the server's setting.
    #[arg(long, env = "REACHLY_DB_LOCK_TIMEOUT_MS", default_value_t = 5_000)]
    pub db_lock_timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct PartitionArgs {
    /// Daily partitions of email_events made ahead of today.
    #[arg(long, env = "REACHLY_PARTITION_PREMAKE_DAYS", default_value_t = 7)]
    pub partition_premake_days: u32,
    /// Partitions entirely older than this many days are dropped.
    #[arg(long, env = "REACHLY_EVENT_RETENTION_DAYS", default_value_t = 400)]
    pub event_retention_days: u32,
    /// Seconds between partition maintenance runs.
    #[arg(
        long,
        env = "REACHLY_PARTITION_MAINTENANCE_INTERVAL_S",
        default_value_t = 3600
    )]
    pub partition_maintenance_interval_s: u64,
}

#[derive(Debug, Clone, Args)]
pub struct TrackingArgs {
    /// Token keys, ID:BASE64KEY[,ID:BASE64KEY...], each at least 32 bytes; the first mints,
    /// all verify.
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

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Largest webhook body accepted (413 past it).
    #[arg(long, env = "REACHLY_WEBHOOK_MAX_BYTES", default_value_t = 10 << 20)]
    pub webhook_max_bytes: usize,
    /// SendGrid signed event webhook: verification key, base64 DER (as SendGrid shows it).
    #[arg(long, env = "REACHLY_SENDGRID_PUBLIC_KEY", hide_env_values = true)]
    pub sendgrid_public_key: Option<Secret>,
    /// Mailgun HTTP webhook signing key.
    #[arg(long, env = "REACHLY_MAILGUN_SIGNING_KEY", hide_env_values = true)]
    pub mailgun_signing_key: Option<Secret>,
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

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
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

/// Minimum token key length in bytes (SPEC.md).
pub const MIN_TOKEN_KEY_BYTES: usize = 32;

/// The token keys: `(key id, key bytes)`, the first one mints.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKeys(Vec<(u8, Vec<u8>)>);

impl TokenKeys {
    pub fn new(keys: Vec<(u8, Vec<u8>)>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("at least one key is required".into());
        }
        for (i, (id, key)) in keys.iter().enumerate() {
            if key.len() < MIN_TOKEN_KEY_BYTES {
                return Err(format!(
                    "key id {id} is {} bytes; at least {MIN_TOKEN_KEY_BYTES} are required",
                    key.len()
                ));
            }
            if keys[..i].iter().any(|(other, _)| other == id) {
                return Err(format!("key id {id} appears twice"));
            }
        }
        Ok(TokenKeys(keys))
    }
    /// The minting key.
    pub fn primary(&self) -> (u8, &[u8]) {
        let (id, key) = &self.0[0];
        (*id, key)
    }
    pub fn get(&self, id: u8) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, v)| v.as_slice())
    }
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.0.iter().map(|(id, _)| *id).collect();
        write!(f, "TokenKeys(ids={ids:?}, keys=[redacted])")
    }
}

impl FromStr for TokenKeys {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut keys = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, b64) = part
                .split_once(':')
                .ok_or_else(|| "expected ID:BASE64KEY[,ID:BASE64KEY...]".to_string())?;
            let id: u8 = id
                .trim()
                .parse()
                .map_err(|_| format!("key id {id:?} is not a number 0-255"))?;
            let key = decode_base64_any(b64.trim())
                .ok_or_else(|| format!("key id {id} is not valid base64"))?;
            keys.push((id, key));
        }
        TokenKeys::new(keys)
    }
}

/// Accepts standard or URL-safe base64, padded or not.
pub fn decode_base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// Typed configuration of `serve`, built from [`ServeArgs`].
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub db: DbConfig,
    pub http: HttpConfig,
    pub pipeline: PipelineConfig,
    pub partitions: PartitionConfig,
    pub tracking: TrackingConfig,
    pub webhooks: WebhookArgs,
    pub log_format: LogFormat,
}

#[derive(Clone)]
pub struct DbConfig {
    pub url: Secret,
    pub tls: crate::db::tls::Tls,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub migrate_on_start: bool,
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbConfig")
            .field("url", &self.url)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub buffer_max_events: usize,
    pub flush_max_events: usize,
    pub flush_interval: Duration,
    pub durable_linger: Duration,
    pub writers: usize,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// Budget of the pipeline's final flush (`Pipeline::shutdown`), which starts once the
    /// HTTP drain is over; what is not committed within it is spooled. The same value
    /// (`REACHLY_SHUTDOWN_TIMEOUT_S`) as `HttpConfig::shutdown_timeout`, but each phase has
    /// it in full, so a stop can take up to twice as long.
    pub shutdown_timeout: Duration,
    /// `statement_timeout` of each batch transaction (`None`: the server's).
    pub statement_timeout: Option<Duration>,
    /// `lock_timeout` of each batch transaction (`None`: the server's).
    pub lock_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct PartitionConfig {
    pub premake_days: u32,
    pub retention_days: u32,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct TrackingConfig {
    /// `None`: the tracking routes answer as for a bad token (pixel GIF, click 404).
    pub token_keys: Option<TokenKeys>,
    pub ip_mode: IpMode,
    pub trusted_proxies: Vec<IpNet>,
    pub machine_user_agents: Vec<String>,
}

impl Config {
    /// Builds the typed config; the error is one line for `main` to print (exit 64).
    pub fn from_args(args: ServeArgs) -> Result<Config, String> {
        let tls = args.db.tls()?;
        let url = args.db.database_url.ok_or(
            "DATABASE_URL is required (or run `reachly-ingest dev` for a private local database)",
        )?;
        tokio_postgres::Config::from_str(url.expose())
            .map_err(|e| format!("DATABASE_URL is not a valid connection string: {e}"))?;
        if args.pipeline.flush_max_events.get() > args.pipeline.buffer_max_events.get() {
            return Err(format!(
                "REACHLY_FLUSH_MAX_EVENTS ({}) must not exceed REACHLY_BUFFER_MAX_EVENTS ({})",
                args.pipeline.flush_max_events, args.pipeline.buffer_max_events
            ));
        }
        if args.partitions.event_retention_days == 0 {
            return Err("REACHLY_EVENT_RETENTION_DAYS must be at least 1".into());
        }
        if args.server.request_timeout_ms == 0 || args.server.header_timeout_ms == 0 {
            return Err("request and header timeouts must be positive".into());
        }
        if let (Some(_), None) = (
            &args.webhooks.mandrill_webhook_key,
            &args.webhooks.mandrill_webhook_url,
        ) {
            return Err("REACHLY_MANDRILL_WEBHOOK_URL is required with REACHLY_MANDRILL_WEBHOOK_KEY (it is part of the signed string)".into());
        }
        crate::webhooks::validate(&args.webhooks)?;
        let shutdown_timeout = Duration::from_secs(args.server.shutdown_timeout_s);
        Ok(Config {
            listen: args.server.listen,
            admin_listen: args.server.admin_listen,
            db: DbConfig {
                url,
                tls,
                pool_size: args.db.db_pool_size.get(),
                connect_timeout: Duration::from_secs(args.db.db_connect_timeout_s.max(1)),
                migrate_on_start: args.server.migrate_on_start,
            },
            http: HttpConfig {
                header_timeout: Duration::from_millis(args.server.header_timeout_ms),
                body_timeout: Duration::from_millis(args.server.body_timeout_ms.max(1)),
                request_timeout: Duration::from_millis(args.server.request_timeout_ms),
                shutdown_timeout,
            },
            pipeline: PipelineConfig {
                buffer_max_events: args.pipeline.buffer_max_events.get(),
                flush_max_events: args.pipeline.flush_max_events.get(),
                flush_interval: Duration::from_millis(args.pipeline.flush_interval_ms.max(1)),
                durable_linger: Duration::from_millis(args.pipeline.durable_linger_ms),
                writers: args.pipeline.writers.get(),
                spool_dir: args.pipeline.spool_dir,
                spool_max_bytes: args.pipeline.spool_max_bytes,
                shutdown_timeout,
                statement_timeout: (args.pipeline.db_statement_timeout_ms > 0)
                    .then(|| Duration::from_millis(args.pipeline.db_statement_timeout_ms)),
                lock_timeout: (args.pipeline.db_lock_timeout_ms > 0)
                    .then(|| Duration::from_millis(args.pipeline.db_lock_timeout_ms)),
            },
            partitions: PartitionConfig {
                premake_days: args.partitions.partition_premake_days,
                retention_days: args.partitions.event_retention_days,
                interval: Duration::from_secs(
                    args.partitions.partition_maintenance_interval_s.max(1),
                ),
            },
            tracking: TrackingConfig {
                token_keys: args.tracking.token_keys,
                ip_mode: args.tracking.ip_mode,
                trusted_proxies: args.tracking.trusted_proxies,
                machine_user_agents: args.tracking.machine_user_agents,
            },
            webhooks: args.webhooks,
            log_format: args.log.log_format,
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
    fn token_keys_parse_rotation_list_and_reject_short_keys() {
        let k32 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let k40 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9u8; 40]);
        let keys: TokenKeys = format!("2:{k32}, 1:{k40}").parse().unwrap();
        assert_eq!(keys.primary().0, 2);
        assert_eq!(keys.get(1).unwrap().len(), 40);
        assert!(keys.get(3).is_none());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert!(format!("1:{short}").parse::<TokenKeys>().is_err());
        assert!(format!("1:{k32},1:{k32}").parse::<TokenKeys>().is_err());
        assert!("nonsense".parse::<TokenKeys>().is_err());
        assert!(!format!("{keys:?}").contains(&k32));
    }

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
}
