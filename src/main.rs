//! The `reachly-ingest` binary: parse flags and environment, then run one subcommand.
//! Invalid configuration is one line on stderr and exit code 64, before anything binds.

use std::io::Write as _;

use clap::Parser as _;
use reachly_ingest::config::{Cli, Command, Config, EXIT_CONFIG};
use reachly_ingest::{App, app, init_tracing};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, compiled in (the `_RJEM_MALLOC_CONF` environment variable still
/// overrides them). `background_thread`: freed pages are returned to the OS by jemalloc's
/// own thread, not inline in whichever request or writer frees memory; the decay times make
/// that return prompt (1 s for dirty pages instead of 10 s, muzzy pages at once), so a
/// drained buffer stops counting in RSS. Load test, same build, steps 4,000 -> 8,000 ->
/// 16,000 -> 9,500 req/s: RSS at the end of the 4,000 step 54 -> 30 MB, at the end of the
/// overloaded 16,000 step 183 -> 148 MB.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static u8> =
    Some(&b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0]);

fn config_error(msg: impl std::fmt::Display) -> ! {
    eprintln!("reachly-ingest: invalid configuration: {msg}");
    std::process::exit(EXIT_CONFIG);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => config_error(
            e.to_string()
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: "),
        ),
    };
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log.log_format);
            let config = Config::from_args(args).unwrap_or_else(|e| config_error(e));
            let prepared = app::prepare_default(&config).unwrap_or_else(|e| config_error(e));
            let public = tokio::net::TcpListener::bind(config.server.listen).await?;
            let admin = tokio::net::TcpListener::bind(config.server.admin_listen).await?;
            let app = App::build(config, public, admin, prepared).await?;
            app.run_until_stopped(reachly_ingest::shutdown::shutdown_signal())
                .await
        }
        Command::Migrate(args) => {
            init_tracing(args.log.log_format);
            let db = args.db.into_config().unwrap_or_else(|e| config_error(e));
            let tls = reachly_ingest::db::tls::connector(db.ca_file.as_deref())
                .unwrap_or_else(|e| config_error(format!("{e:#}")));
            let applied = reachly_ingest::db::migrate::run_with(db.url.expose(), tls).await?;
            let _ = writeln!(std::io::stdout(), "migrations applied: {applied}");
            Ok(())
        }
        Command::Token(args) => match reachly_ingest::dev::token_command(&args) {
            Ok(out) => {
                let _ = writeln!(std::io::stdout(), "{out}");
                Ok(())
            }
            Err(e) => config_error(e),
        },
        Command::RelayRanges(args) => match reachly_ingest::dev::relay_ranges_command(&args) {
            Ok(summary) => {
                eprintln!("{summary}");
                Ok(())
            }
            Err(e) => {
                eprintln!("reachly-ingest relay-ranges: {e}");
                std::process::exit(1);
            }
        },
        Command::Maintain(args) => {
            init_tracing(args.log.log_format);
            let db = args.db.into_config().unwrap_or_else(|e| config_error(e));
            let tls = reachly_ingest::db::tls::connector(db.ca_file.as_deref())
                .unwrap_or_else(|e| config_error(format!("{e:#}")));
            let r =
                reachly_ingest::db::maintain_once(db.url.expose(), tls, &args.partitions).await?;
            let _ = writeln!(
                std::io::stdout(),
                "partition maintenance: {}",
                reachly_ingest::db::describe_report(&r)
            );
            Ok(())
        }
        Command::Dev(args) => {
            init_tracing(args.serve.log.log_format);
            reachly_ingest::dev::run(args).await
        }
        Command::Healthcheck(args) => {
            let healthy = reachly_ingest::healthcheck::run(&args).await;
            std::process::exit(if healthy { 0 } else { 1 })
        }
        Command::Archive(args) => {
            init_tracing(args.log.log_format);
            use reachly_ingest::db::archive::{CrashAfter, Step, archive_command};
            let dir = args.partitions.archive_dir.clone().unwrap_or_else(|| {
                config_error("REACHLY_ARCHIVE_DIR (--archive-dir) is required for archive")
            });
            let crash = match args.crash_after.as_deref() {
                Some(s) => CrashAfter(Some(Step::parse(s).unwrap_or_else(|e| config_error(e)))),
                None => CrashAfter(None),
            };
            let range = args.from.zip(args.to);
            let mut client = connect(args.db).await?;
            let retention = args.partitions.retention_days;
            archive_command(
                &mut client,
                &dir,
                retention,
                range,
                crash,
                &mut std::io::stdout(),
            )
            .await
        }
        Command::Restore(args) => {
            init_tracing(args.log.log_format);
            let to = args.to.unwrap_or(args.from);
            let mut client = connect(args.db).await?;
            reachly_ingest::db::archive::restore_command(
                &mut client,
                &args.archive_dir,
                args.from,
                to,
                &mut std::io::stdout(),
            )
            .await
        }
        Command::Status(args) => {
            init_tracing(args.log.log_format);
            let client = connect(args.db.clone()).await?;
            let text = reachly_ingest::db::sizes::status_command(&client, &args).await?;
            let _ = write!(std::io::stdout(), "{text}");
            Ok(())
        }
    }
}

/// One connection to DATABASE_URL for a tool subcommand (its TLS as `serve`'s).
async fn connect(db: reachly_ingest::config::DbArgs) -> anyhow::Result<tokio_postgres::Client> {
    let db = db.into_config().unwrap_or_else(|e| config_error(e));
    let tls = reachly_ingest::db::tls::connector(db.ca_file.as_deref())
        .unwrap_or_else(|e| config_error(format!("{e:#}")));
    reachly_ingest::db::connect_with(db.url.expose(), tls).await
}
