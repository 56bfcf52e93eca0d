//! Webhook events per second through the real server, signatures verified: SendGrid batches
//! of 1,000 events (ECDSA P-256) and single-event Mailgun posts (HMAC-SHA256). Every request
//! is answered only once its events are committed, so requests/s × events per request is
//! the committed rate. PostgreSQL (fsync on) is pinned to CPU 0; this process (server and
//! client) to CPU 1. Requests are signed before the clock starts.
//!
//! `cargo bench --bench webhook_server [-- --batches 100 --posts 20000]`

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use reachly_ingest::config::{Config, Secret, ServeArgs};
use reachly_ingest::pgcluster::PgCluster;
use reachly_ingest::{App, app};
use uuid::Uuid;

mod support;
use support::{arg, pin};

struct Run {
    requests: usize,
    events: usize,
    secs: f64,
    p50: Duration,
    p99: Duration,
}

/// Posts every prepared request with `concurrency` in flight; all must answer 200.
async fn drive(
    url: String,
    requests: Vec<(Vec<(&'static str, String)>, String)>,
    events_per: usize,
    concurrency: usize,
) -> Run {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let n = requests.len();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(requests));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, queue) = (client.clone(), url.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some((headers, body)) = queue.lock().await.pop() else {
                    return lat;
                };
                let mut req = client.post(&url).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let t = Instant::now();
                let r = req.send().await.expect("request");
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Run {
        requests: n,
        events: n * events_per,
        secs,
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

fn main() -> anyhow::Result<()> {
    let batches = arg("--batches", 100);
    let posts = arg("--posts", 20_000);
    let dir =
        std::env::temp_dir().join(format!("reachly-webhook-bench-{}", Uuid::new_v4().simple()));
    let cluster = PgCluster::throwaway(
        &dir,
        false,
        |_| Ok(()),
        &[("shared_buffers", "256MB"), ("max_wal_size", "4GB")],
    )?;
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid"))?;
    let pinned = pid_file
        .lines()
        .next()
        .and_then(|p| p.trim().parse().ok())
        .is_some_and(|p| pin(p, 0))
        && pin(std::process::id(), 1);
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(bench(&cluster, &dir, batches, posts, pinned));
    let _ = cluster.stop("immediate");
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(
    cluster: &PgCluster,
    dir: &std::path::Path,
    batches: usize,
    posts: usize,
    pinned: bool,
) -> anyhow::Result<()> {
    let (url, db) = support::bench_database(cluster).await?;
    let (org, messages) = support::seed_campaign(&db, 50_000).await?;

    let sendgrid = SigningKey::from_slice(&[0x5a; 32]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let public = STANDARD.encode(
        sendgrid
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .as_bytes(),
    );
    let mailgun_key = "key-bench-0123456789abcdef";
    let mut args = ServeArgs::from_argv([
        "serve",
        "--database-url",
        &url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--spool-dir",
        dir.join("spool").to_str().unwrap(),
    ]);
    args.db.migrate_on_start = false;
    args.webhooks.sendgrid_public_key = Some(Secret::new(public));
    args.webhooks.mailgun_signing_key = Some(Secret::new(mailgun_key));
    let config = Config::from_args(args).map_err(anyhow::Error::msg)?;
    let public_l = tokio::net::TcpListener::bind(config.server.listen).await?;
    let admin_l = tokio::net::TcpListener::bind(config.server.admin_listen).await?;
    let prepared = app::prepare_default(&config).map_err(anyhow::Error::msg)?;
    let app = App::build(config, public_l, admin_l, prepared).await?;
    let base = format!("http://{}", app.public_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stop_rx.await;
    }));

    // SendGrid: 1,000 distinct events per batch, each for its own message.
    let now = chrono::Utc::now().timestamp();
    let kinds = ["delivered", "open", "click"];
    let mut sg_requests = Vec::new();
    for b in 0..batches {
        let events: Vec<serde_json::Value> = (0..1000)
            .map(|i| {
                let m = messages[(b * 1000 + i) % messages.len()];
                let kind = kinds[(b * 1000 + i) / messages.len() % kinds.len()];
                serde_json::json!({
                    "email": "someone@example.com", "timestamp": now - 60 + (i as i64 % 50), "event": kind,
                    "sg_event_id": Uuid::new_v4().to_string(), "sg_message_id": format!("sg-{b}-{i}"),
                    "url": "https://example.com/offer", "useragent": "Mozilla/5.0 Chrome/126", "ip": "203.0.113.9",
                    "reachly_message_id": m.to_string(), "reachly_organization_id": org.to_string(),
                })
            })
            .collect();
        let body = serde_json::to_string(&events)?;
        let ts = chrono::Utc::now().timestamp().to_string();
        let mut msg = ts.as_bytes().to_vec();
        msg.extend_from_slice(body.as_bytes());
        let sig: Signature = sendgrid.sign(&msg);
        let headers = vec![
            ("content-type", "application/json".to_string()),
            ("x-twilio-email-event-webhook-timestamp", ts),
            (
                "x-twilio-email-event-webhook-signature",
                STANDARD.encode(sig.to_der().as_bytes()),
            ),
        ];
        sg_requests.push((headers, body));
    }
    // Mailgun: one event per post, a fresh token each.
    let mut mg_requests = Vec::new();
    for p in 0..posts {
        let m = messages[p % messages.len()];
        let (ts, token) = (
            chrono::Utc::now().timestamp().to_string(),
            format!("{}{}", Uuid::new_v4().simple(), "abcdefghijklmnopqr"),
        );
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(mailgun_key.as_bytes())?;
        mac.update(ts.as_bytes());
        mac.update(token.as_bytes());
        let body = serde_json::json!({
            "signature": {"timestamp": ts, "token": token, "signature": hex::encode(mac.finalize().into_bytes())},
            "event-data": {
                "event": "delivered", "timestamp": (now - 30) as f64 + (p % 1000) as f64 / 1000.0, "id": Uuid::new_v4().to_string(),
                "recipient": "someone@example.com", "message": {"headers": {"message-id": format!("mg-{p}@example.com")}},
                "user-variables": {"reachly_message_id": m.to_string(), "reachly_organization_id": org.to_string()},
            }
        });
        mg_requests.push((
            vec![("content-type", "application/json".to_string())],
            body.to_string(),
        ));
    }

    let sg = drive(format!("{base}/webhooks/sendgrid"), sg_requests, 1000, 4).await;
    let mg = drive(format!("{base}/webhooks/mailgun"), mg_requests, 1, 64).await;
    let _ = stop_tx.send(());
    task.await??;
    let stored: i64 = db
        .query_one("SELECT count(*) FROM email_events", &[])
        .await?
        .get(0);
    println!(
        "webhooks through the real server, signatures verified, answered after commit; pinned: {pinned}\n"
    );
    println!("| provider | requests | events | requests/s | events/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in [
        ("SendGrid, 1,000-event batches, 4 in flight", &sg),
        ("Mailgun, single events, 64 in flight", &mg),
    ] {
        println!(
            "| {name} | {} | {} | {:.0} | {:.0} | {:.1} ms | {:.1} ms |",
            r.requests,
            r.events,
            r.requests as f64 / r.secs,
            r.events as f64 / r.secs,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
    println!("\nevents stored: {stored} of {}", sg.events + mg.events);
    anyhow::ensure!(
        stored as usize == sg.events + mg.events,
        "every acknowledged event is stored exactly once"
    );
    Ok(())
}
