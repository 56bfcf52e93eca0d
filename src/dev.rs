//! `reachly-ingest dev`: the embedded default. Without `DATABASE_URL` it creates (once) and
//! starts a private PostgreSQL under `./.reachly/pgdata` on a free port, migrates it, seeds a
//! demo tenant (organization, contacts, a campaign and its messages), mints a token key
//! (kept in `./.reachly/token-keys`), prints working sample URLs, and serves. Ctrl-C drains
//! the service and stops the cluster; a second run reuses both. Also `reachly-ingest token`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use uuid::Uuid;

use crate::app::{self, App};
use crate::config::{Config, DevArgs, RelayRangesArgs, Secret, TokenArgs};
use crate::machine::RelayRanges;
use crate::pgcluster::PgCluster;
use crate::token::{self, Purpose, TokenKeys};

/// The demo tenant: fixed ids, so a second run finds the same rows and URLs.
pub const DEMO_ORG: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
pub const DEMO_CAMPAIGN: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0c01);
const DEMO_CONTACTS: [(u128, &str); 3] = [
    (0x0193_0000_0000_7000_8000_0000_0000_0a01, "ada@example.com"),
    (
        0x0193_0000_0000_7000_8000_0000_0000_0a02,
        "grace@example.com",
    ),
    (
        0x0193_0000_0000_7000_8000_0000_0000_0a03,
        "linus@example.com",
    ),
];
const DEMO_MESSAGE_BASE: u128 = 0x0193_0000_0000_7000_8000_0000_0000_0b00;
const DEV_DB: &str = "reachly";

pub fn demo_message(i: usize) -> Uuid {
    Uuid::from_u128(DEMO_MESSAGE_BASE + 1 + i as u128)
}

/// `reachly-ingest relay-ranges FILE`: Apple's egress-ip-ranges.csv into our dated, merged
/// list (to `--out`, or standard output). Returns a one-line summary for standard error.
pub fn relay_ranges_command(args: &RelayRangesArgs) -> Result<String, String> {
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| format!("reading {}: {e}", args.input.display()))?;
    let ranges = RelayRanges::parse(&text).map_err(|e| format!("{}: {e}", args.input.display()))?;
    if ranges.is_empty() {
        return Err(format!("{} holds no IP prefixes", args.input.display()));
    }
    let date = args
        .date
        .unwrap_or_else(|| chrono::Utc::now().date_naive())
        .to_string();
    let source = args
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = ranges.to_file(&date, &source);
    match &args.out {
        Some(out) => {
            std::fs::write(out, &file).map_err(|e| format!("writing {}: {e}", out.display()))?
        }
        None => {
            let _ = std::io::Write::write_all(&mut std::io::stdout(), file.as_bytes());
        }
    }
    Ok(format!(
        "{} prefixes read, {} merged ranges written (date {date})",
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .count(),
        ranges.len()
    ))
}

/// `reachly-ingest token ...`: the token, or the full URL with `--base`.
pub fn token_command(args: &TokenArgs) -> Result<String, String> {
    let t = token::mint(
        &args.token_keys,
        args.purpose,
        args.org_id,
        args.message_id,
        args.url.as_deref(),
    )
    .map_err(|e| match e {
        token::TokenError::Url if args.purpose == Purpose::Click => {
            "click tokens need --url with an absolute http(s) URL".to_string()
        }
        token::TokenError::Url => "--url is only for click tokens".to_string(),
        other => other.to_string(),
    })?;
    Ok(match &args.base {
        Some(base) => tracking_url(base, args.purpose, &t),
        None => t,
    })
}

/// The public URL of a token under `base`.
pub fn tracking_url(base: &str, purpose: Purpose, token: &str) -> String {
    let base = base.trim_end_matches('/');
    match purpose {
        Purpose::Open => format!("{base}/o/{token}.gif"),
        Purpose::Click => format!("{base}/c/{token}"),
        Purpose::Unsubscribe => format!("{base}/u/{token}"),
    }
}

pub async fn run(mut args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dev_dir)
        .with_context(|| format!("creating {}", args.dev_dir.display()))?;
    let dir = std::fs::canonicalize(&args.dev_dir)?;
    let mut cluster = None;
    let url = match args.serve.db.database_url.clone() {
        Some(url) => url.expose().to_owned(),
        None => {
            let c = start_private_cluster(&dir).await?;
            let url = c.url(DEV_DB);
            cluster = Some(c);
            url
        }
    };
    let result = serve_demo(&mut args, &dir, &url).await;
    if let Some(c) = cluster {
        eprintln!("stopping the private PostgreSQL...");
        if let Err(e) = c.stop("fast") {
            eprintln!("could not stop it: {e:#}");
        }
    }
    result
}

async fn start_private_cluster(dir: &Path) -> anyhow::Result<PgCluster> {
    let port_file = dir.join("port");
    let port = match std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        Some(p) => p,
        None => crate::pgcluster::free_port()?,
    };
    let mut c = PgCluster::new(dir.join("pgdata"), port)?;
    if !c.is_initialized() {
        eprintln!(
            "creating a private PostgreSQL cluster in {} ...",
            c.data_dir.display()
        );
        c.init(false)?;
    }
    if !c.is_running() {
        if std::net::TcpListener::bind(("127.0.0.1", c.port)).is_err() {
            c.port = crate::pgcluster::free_port()?; // the old port is taken by someone else
        }
        c.start(&[])?;
    }
    std::fs::write(&port_file, c.port.to_string())?;
    let admin = crate::db::connect(&c.url("postgres")).await?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DEV_DB])
        .await?
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {DEV_DB}"))
            .await?;
    }
    Ok(c)
}

fn dev_token_keys(dir: &Path) -> anyhow::Result<TokenKeys> {
    let path = dir.join("token-keys");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return s
            .trim()
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()));
    }
    let mut key = [0u8; 32];
    for chunk in key.chunks_mut(16) {
        chunk.copy_from_slice(Uuid::new_v4().as_bytes());
    }
    let line = format!(
        "1:{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    std::fs::write(&path, &line)?;
    line.parse().map_err(anyhow::Error::msg)
}

async fn serve_demo(args: &mut DevArgs, dir: &Path, url: &str) -> anyhow::Result<()> {
    crate::db::migrate::run(url).await?;
    seed_demo(url).await?;
    let keys = match args.serve.tracking.token_keys.clone() {
        Some(k) => k,
        None => dev_token_keys(dir)?,
    };
    let serve = &mut args.serve;
    serve.db.database_url = Some(Secret::new(url));
    serve.tracking.token_keys = Some(keys.clone());
    if serve.pipeline.spool_dir == Path::new("./spool") {
        serve.pipeline.spool_dir = dir.join("spool");
    }
    let config = Config::from_args(serve.clone()).map_err(anyhow::Error::msg)?;
    let prepared = app::prepare_default(&config).map_err(anyhow::Error::msg)?;
    let public = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| {
            format!(
                "binding {} (set REACHLY_LISTEN to another address)",
                config.server.listen
            )
        })?;
    let admin = tokio::net::TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| {
            format!(
                "binding {} (set REACHLY_ADMIN_LISTEN to another address)",
                config.server.admin_listen
            )
        })?;
    let app = App::build(config, public, admin, prepared).await?;
    let public_addr = app.public_addr();
    let host = if public_addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        public_addr.ip().to_string()
    };
    let base = format!("http://{host}:{}", public_addr.port());
    print_banner(&base, app.admin_addr(), url, &keys)?;
    app.run_until_stopped(crate::shutdown::shutdown_signal())
        .await
}

fn print_banner(
    base: &str,
    admin: std::net::SocketAddr,
    url: &str,
    keys: &TokenKeys,
) -> anyhow::Result<()> {
    let m = demo_message(0);
    let open = token::mint(keys, Purpose::Open, DEMO_ORG, m, None).map_err(anyhow::Error::msg)?;
    let click = token::mint(
        keys,
        Purpose::Click,
        DEMO_ORG,
        m,
        Some("https://example.com/welcome?from=reachly"),
    )
    .map_err(anyhow::Error::msg)?;
    let unsub = token::mint(keys, Purpose::Unsubscribe, DEMO_ORG, demo_message(1), None)
        .map_err(anyhow::Error::msg)?;
    // One write, errors ignored: a closed stdout (`dev | head`) must not stop the service.
    let mut out = String::new();
    out.push('\n');
    let _ = writeln!(out, "reachly-ingest dev is running.");
    let _ = writeln!(out, "  database:     {url}");
    let _ = writeln!(
        out,
        "  demo tenant:  organization {DEMO_ORG}, campaign {DEMO_CAMPAIGN}, messages {} .. {}",
        demo_message(0),
        demo_message(2)
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "  open pixel:   {}",
        tracking_url(base, Purpose::Open, &open)
    );
    let _ = writeln!(
        out,
        "  click:        {}",
        tracking_url(base, Purpose::Click, &click)
    );
    let _ = writeln!(
        out,
        "  unsubscribe:  {}",
        tracking_url(base, Purpose::Unsubscribe, &unsub)
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "  try:  curl -s -A 'Mozilla/5.0' -o /dev/null -w '%{{http_code}}\\n' '{}'",
        tracking_url(base, Purpose::Open, &open)
    );
    let _ = writeln!(
        out,
        "        curl -s -A 'Mozilla/5.0' -o /dev/null -w '%{{http_code}} %{{redirect_url}}\\n' '{}'",
        tracking_url(base, Purpose::Click, &click)
    );
    let _ = writeln!(
        out,
        "        psql '{url}' -c 'SELECT event_type, created_at, metadata FROM email_events ORDER BY created_at'"
    );
    let _ = writeln!(
        out,
        "  (curl's own User-Agent is recorded as machine traffic, which moves no status; -A sets a browser's)"
    );
    let _ = writeln!(
        out,
        "  metrics:      http://{admin}/metrics   health: http://{admin}/healthz   ready: http://{admin}/readyz"
    );
    let _ = writeln!(
        out,
        "  Ctrl-C drains the service and stops the private database."
    );
    out.push('\n');
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}

/// The demo tenant's rows (idempotent).
pub async fn seed_demo(url: &str) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    client
        .execute(
            "INSERT INTO organizations (id, name, slug) VALUES ($1, 'Demo Company', 'demo') ON CONFLICT DO NOTHING",
            &[&DEMO_ORG],
        )
        .await?;
    client
        .execute(
            "INSERT INTO campaigns (id, organization_id, name, subject, from_email, status) \
             VALUES ($1, $2, 'Welcome series', 'Welcome!', 'hello@example.com', 'sending') ON CONFLICT DO NOTHING",
            &[&DEMO_CAMPAIGN, &DEMO_ORG],
        )
        .await?;
    for (i, (contact, email)) in DEMO_CONTACTS.iter().enumerate() {
        let contact = Uuid::from_u128(*contact);
        client
            .execute(
                "INSERT INTO contacts (id, organization_id, email) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&contact, &DEMO_ORG, email],
            )
            .await?;
        client
            .execute(
                "INSERT INTO campaign_messages (id, organization_id, campaign_id, contact_id, status) \
                 VALUES ($1, $2, $3, $4, 'sent') ON CONFLICT DO NOTHING",
                &[&demo_message(i), &DEMO_ORG, &DEMO_CAMPAIGN, &contact],
            )
            .await?;
    }
    Ok(())
}
