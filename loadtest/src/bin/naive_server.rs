//! The `naive` reference server: what most open-source e-mail trackers do. Each pixel or
//! click request verifies its token (the product's `token::verify`, same keys), then, before
//! answering, runs one `INSERT` into `email_events` and one `UPDATE` of the message's row in
//! `campaign_messages`, each its own autocommitted statement through a connection pool.
//! Same routes as the service (`/o/{token}.gif`, `/c/{token}`), same answers (the GIF, a 302,
//! a 404 for a bad token), plus `/healthz`. It stores the tenant from the token, the client
//! address and the user agent, like the service.
//!
//! Usage: `naive-server --listen 127.0.0.1:8081 --database-url ... --pool-size 16`, with the
//! token keys in `REACHLY_TOKEN_KEYS`. Not part of the product.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reachly_ingest::config::{DbConfig, Secret};
use reachly_ingest::http::tracking::PIXEL_GIF;
use reachly_ingest::token::TokenKeys;
use reachly_ingest::token::{self, Purpose};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "naive-server",
    about = "One INSERT + one UPDATE per tracking request (load-test reference)"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    #[arg(long, env = "REACHLY_TOKEN_KEYS", hide_env_values = true)]
    token_keys: TokenKeys,
}

struct State {
    pool: deadpool_postgres::Pool,
    keys: TokenKeys,
}

const INSERT: &str = "INSERT INTO public.email_events \
    (id, organization_id, message_id, event_type, ip_address, user_agent, link_url, created_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, now())";
const UPDATE_OPEN: &str = "UPDATE public.campaign_messages SET \
    status = CASE WHEN status IN ('pending', 'sent', 'delivered') THEN 'opened' ELSE status END, \
    opened_at = COALESCE(opened_at, now()), updated_at = now() WHERE id = $1";
const UPDATE_CLICK: &str = "UPDATE public.campaign_messages SET \
    status = CASE WHEN status IN ('pending', 'sent', 'delivered', 'opened') THEN 'clicked' ELSE status END, \
    opened_at = COALESCE(opened_at, now()), clicked_at = COALESCE(clicked_at, now()), updated_at = now() WHERE id = $1";

fn resp(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r
}

async fn record(
    state: &State,
    t: &token::Token,
    peer: SocketAddr,
    ua: Option<&str>,
) -> anyhow::Result<()> {
    let client = state.pool.get().await?;
    let (kind, update) = match t.purpose {
        Purpose::Click => ("clicked", UPDATE_CLICK),
        _ => ("opened", UPDATE_OPEN),
    };
    let insert = client.prepare_cached(INSERT).await?;
    let update = client.prepare_cached(update).await?;
    let ip = peer.ip().to_string();
    client
        .execute(
            &insert,
            &[
                &Uuid::now_v7(),
                &t.organization_id,
                &t.message_id,
                &kind,
                &ip,
                &ua,
                &t.url,
            ],
        )
        .await?;
    client.execute(&update, &[&t.message_id]).await?;
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: Arc<State>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let ua = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if path == "/healthz" {
        return resp(StatusCode::OK, Bytes::from_static(b"ok\n"));
    }
    if let Some(raw) = path
        .strip_prefix("/o/")
        .and_then(|p| p.strip_suffix(".gif"))
    {
        if let Ok(t) = token::verify(&state.keys, Purpose::Open, raw)
            && let Err(e) = record(&state, &t, peer, ua.as_deref()).await
        {
            eprintln!("naive-server: {e:#}");
            return resp(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
        }
        let mut r = resp(StatusCode::OK, Bytes::from_static(PIXEL_GIF));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
        return r;
    }
    if let Some(raw) = path.strip_prefix("/c/") {
        let Ok(t) = token::verify(&state.keys, Purpose::Click, raw) else {
            return resp(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n"));
        };
        if let Err(e) = record(&state, &t, peer, ua.as_deref()).await {
            eprintln!("naive-server: {e:#}");
            return resp(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
        }
        let mut r = resp(StatusCode::FOUND, Bytes::new());
        if let Some(loc) = t.url.as_deref().and_then(|u| HeaderValue::from_str(u).ok()) {
            r.headers_mut().insert(header::LOCATION, loc);
        }
        return r;
    }
    resp(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = reachly_ingest::db::pool(
        &DbConfig {
            url: Secret::new(args.database_url.clone()),
            pool_size: NonZeroUsize::new(args.pool_size).map_or(1, |n| n.get()),
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
            migrate_on_start: false,
        },
        // libpq's rules, as the service: TLS when the server offers it, no verification
        // without a CA file (the throwaway cluster offers none).
        reachly_ingest::db::tls::connector(None)?,
    )?;
    let state = Arc::new(State {
        pool,
        keys: args.token_keys,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => r?,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, peer, state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
