//! Honest engagement, measured. Two parts, on a throwaway PostgreSQL cluster:
//!
//! 1. A labelled synthetic trace (people on many mail clients, Gmail proxy opens, Apple MPP
//!    prefetches, and four scanner behaviours: a security gateway's user agent, HEAD probes,
//!    browser-looking clicks right after delivery, link bursts) is replayed in real time
//!    through the real server (pixels and redirects over sockets, deliveries as a signed
//!    SendGrid batch that arrives *after* the clicks), then every stored open and click is
//!    judged by `db::engagement::EVENT_REASONS_SQL` (the campaign query's own
//!    classification) and precision and recall of each machine reason are printed. Hits are
//!    matched to stored rows per (message, event type) as multisets of labels.
//! 2. `EXPLAIN (ANALYZE, BUFFERS)` of the campaign query on a large seeded campaign (20,000
//!    messages, 65,000 events) beside other campaigns of the same size on the same days
//!    (`--others`, default 15: the campaign is one sixteenth of the day's events).
//!
//! `cargo bench --bench engagement [-- --messages 900 --seconds 30 --large 20000 --others 15]`
//! (`--profile dev` works too: nothing here is timed by the client).

use std::collections::BTreeMap;
use std::time::Duration;

use reachly_ingest::config::{Config, Secret, ServeArgs};
use reachly_ingest::db::engagement::{CAMPAIGN_ENGAGEMENT_SQL, EVENT_REASONS_SQL};
use reachly_ingest::pgcluster::PgCluster;
use reachly_ingest::token::{self, Purpose, TokenKeys};
use reachly_ingest::webhooks::testkit::sign::{sendgrid_keypair, sendgrid_signature};
use reachly_ingest::{App, app};
use uuid::Uuid;

mod support;
use support::arg;

/// Real mail clients and browsers (never to be flagged).
const PEOPLE: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/UD1A.231105.004; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.193 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-S911B Build/TP1A.220624.014; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 10; ROBOT X1 Build/QP1A.190711.020; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/118.0.5993.111 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 13; moto g stylus 5G Build/T1TGS33.93; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 YahooMobile/1.0 (mail; 7.38.0)",
];
const GMAIL_PROXY: &str =
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)";
const GATEWAYS: &[&str] = &[
    "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))",
    "Mimecast/1.0 URL Protect",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/91.0 Safari/537.36 Proofpoint",
];
/// What scanners that pose as browsers send.
const POSING: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
const LINKS: &[&str] = &[
    "https://shop.example.com/sale",
    "https://shop.example.com/new",
    "https://shop.example.com/account",
    "https://example.com/blog/post",
];

/// splitmix64: a deterministic trace without another dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f()
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }
}

#[derive(Clone, Debug)]
struct Hit {
    /// Seconds after the replay starts.
    at: f64,
    message: usize,
    click: Option<&'static str>,
    head: bool,
    ua: Option<&'static str>,
    ip: String,
    /// The truth: `human` or the reason the campaign query should give.
    label: &'static str,
}

/// The trace: hits and each message's delivery time (seconds after the start; negative is
/// before the replay began).
fn trace(messages: usize, seconds: f64, rng: &mut Rng) -> (Vec<Hit>, Vec<f64>) {
    let mut hits = Vec::new();
    let mut delivered = Vec::new();
    let person_ip = |rng: &mut Rng| format!("198.51.{}.{}", rng.next() % 100, rng.next() % 250 + 1);
    for m in 0..messages {
        let r = rng.f();
        let end = seconds - 1.0;
        let mut hit = |at: f64,
                       click: Option<&'static str>,
                       head: bool,
                       ua: Option<&'static str>,
                       ip: String,
                       label: &'static str| {
            hits.push(Hit {
                at,
                message: m,
                click,
                head,
                ua,
                ip,
                label,
            })
        };
        let d;
        if r < 0.40 {
            // A person: delivered minutes to hours ago (1 in 50 reads it as it lands), opens,
            // maybe clicks one or two links seconds apart, sometimes double-clicks.
            let ua = *rng.pick(PEOPLE);
            let ip = person_ip(rng);
            let first = rng.range(0.0, end - 12.0);
            d = if rng.f() < 0.02 {
                first - rng.range(2.0, 5.0)
            } else {
                first - rng.range(60.0, 3.0 * 3600.0)
            };
            hit(first, None, false, Some(ua), ip.clone(), "human");
            if rng.f() < 0.5 {
                let link = *rng.pick(LINKS);
                let t = first + rng.range(3.0, 6.0);
                hit(t, Some(link), false, Some(ua), ip.clone(), "human");
                if rng.f() < 0.1 {
                    hit(t + 0.25, Some(link), false, Some(ua), ip.clone(), "human");
                }
                if rng.f() < 0.3 {
                    let other = LINKS.iter().find(|l| **l != link).copied().unwrap();
                    hit(
                        t + rng.range(1.5, 6.0),
                        Some(other),
                        false,
                        Some(ua),
                        ip,
                        "human",
                    );
                }
            }
        } else if r < 0.50 {
            // A Gmail user: the proxy fetches when the person opens; a click from the phone.
            let first = rng.range(0.0, end - 8.0);
            d = first - rng.range(300.0, 7200.0);
            hit(
                first,
                None,
                false,
                Some(GMAIL_PROXY),
                "66.249.84.1".into(),
                "human",
            );
            if rng.f() < 0.4 {
                let ua = PEOPLE[4];
                hit(
                    first + rng.range(2.0, 7.0),
                    Some(*rng.pick(LINKS)),
                    false,
                    Some(ua),
                    person_ip(rng),
                    "human",
                );
            }
        } else if r < 0.65 {
            // Apple Mail with MPP: the prefetch at delivery; a third read it later.
            d = rng.range(0.0, end - 12.0);
            let relay = format!(
                "17.{}.{}.{}",
                rng.next() % 250,
                rng.next() % 250,
                rng.next() % 250 + 1
            );
            hit(
                d + rng.range(0.5, 4.0),
                None,
                false,
                Some("Mozilla/5.0"),
                relay,
                "apple_mpp",
            );
            if rng.f() < 0.33 {
                hit(
                    d + rng.range(6.0, 10.0),
                    None,
                    false,
                    Some(PEOPLE[1]),
                    person_ip(rng),
                    "human",
                );
            }
        } else if r < 0.73 {
            // A security gateway naming itself fetches the pixel and every link.
            d = rng.range(-600.0, end - 6.0);
            let ua = *rng.pick(GATEWAYS);
            let t = d.max(0.0) + rng.range(0.5, 3.0);
            hit(t, None, false, Some(ua), "52.1.2.3".into(), "user_agent");
            for (i, link) in LINKS.iter().enumerate() {
                hit(
                    t + 0.3 * i as f64,
                    Some(link),
                    false,
                    Some(ua),
                    "52.1.2.3".into(),
                    "user_agent",
                );
            }
        } else if r < 0.80 {
            // HEAD probes of the pixel and of one or two links (link checkers).
            d = rng.range(-3600.0, 0.0);
            let t = rng.range(0.0, end - 3.0);
            hit(
                t,
                None,
                true,
                Some(POSING),
                "40.94.1.1".into(),
                "head_request",
            );
            hit(
                t + 1.5,
                Some(*rng.pick(LINKS)),
                true,
                Some(POSING),
                "40.94.1.1".into(),
                "head_request",
            );
        } else if r < 0.90 {
            // A scanner posing as a browser, clicking as the message lands, a link at a time.
            d = rng.range(0.0, end - 9.0);
            let link = *rng.pick(LINKS);
            hit(
                d + rng.range(0.3, 4.0),
                Some(link),
                false,
                Some(POSING),
                "40.107.1.1".into(),
                "scanner_timing",
            );
            if rng.f() < 0.5 {
                let other = LINKS.iter().find(|l| **l != link).copied().unwrap();
                hit(
                    d + rng.range(5.2, 8.0),
                    Some(other),
                    false,
                    Some(POSING),
                    "40.107.1.1".into(),
                    "scanner_timing",
                );
            }
        } else {
            // A sandbox posing as a browser: every link within a fraction of a second,
            // long after delivery (when the message is first opened or re-scanned).
            d = rng.range(-7200.0, -60.0);
            let t = rng.range(0.0, end - 2.0);
            let n = 3 + (rng.next() % 2) as usize;
            let mut at = t;
            for link in &LINKS[..n] {
                hit(
                    at,
                    Some(link),
                    false,
                    Some(POSING),
                    "40.107.2.2".into(),
                    "scanner_burst",
                );
                at += rng.range(0.02, 0.25);
            }
        }
        delivered.push(d);
    }
    hits.sort_by(|a, b| a.at.total_cmp(&b.at));
    (hits, delivered)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("reachly-engagement-{}", Uuid::new_v4().simple()));
    let cluster = PgCluster::throwaway(&dir, false, |_| Ok(()), &[("shared_buffers", "256MB")])?;
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(bench(&cluster, &dir));
    let _ = cluster.stop("immediate");
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(cluster: &PgCluster, dir: &std::path::Path) -> anyhow::Result<()> {
    let messages = arg("--messages", 900usize);
    let seconds = arg("--seconds", 30.0f64);
    let large = arg("--large", 20_000usize);
    let others = arg("--others", 15usize);
    let (url, db) = support::bench_database(cluster).await?;
    let (org, ids) = support::seed_campaign(&db, messages).await?;
    let campaign: Uuid = db
        .query_one(
            "SELECT campaign_id FROM campaign_messages WHERE id = $1",
            &[&ids[0]],
        )
        .await?
        .get(0);

    let (sg_key, sg_public) = sendgrid_keypair();
    let keys_arg = "1:QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
    let mut args = ServeArgs::from_argv([
        "serve",
        "--database-url",
        &url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--token-keys",
        keys_arg,
        "--flush-interval-ms",
        "50",
        "--spool-dir",
        dir.join("spool").to_str().unwrap(),
    ]);
    args.db.migrate_on_start = false;
    args.tracking.trusted_proxies = vec!["127.0.0.1/32".parse()?];
    args.webhooks.sendgrid_public_key = Some(Secret::new(sg_public));
    let config = Config::from_args(args).map_err(anyhow::Error::msg)?;
    let keys: TokenKeys = keys_arg.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let public_l = tokio::net::TcpListener::bind(config.server.listen).await?;
    let admin_l = tokio::net::TcpListener::bind(config.server.admin_listen).await?;
    let prepared = app::prepare_default(&config).map_err(anyhow::Error::msg)?;
    let app = App::build(config, public_l, admin_l, prepared).await?;
    let base = format!("http://{}", app.public_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stop_rx.await;
    }));

    let mut rng = Rng(15);
    let (hits, delivered) = trace(messages, seconds, &mut rng);
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let start = tokio::time::Instant::now();
    let start_epoch = chrono::Utc::now();
    let mut tasks = Vec::new();
    for h in hits.clone() {
        let (client, base, keys) = (client.clone(), base.clone(), keys.clone());
        let msg = ids[h.message];
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(h.at)).await;
            let path = match h.click {
                Some(link) => format!(
                    "/c/{}",
                    token::mint(&keys, Purpose::Click, org, msg, Some(link)).unwrap()
                ),
                None => format!(
                    "/o/{}.gif",
                    token::mint(&keys, Purpose::Open, org, msg, None).unwrap()
                ),
            };
            let url = format!("{base}{path}");
            let mut r = if h.head {
                client.head(url)
            } else {
                client.get(url)
            };
            if let Some(ua) = h.ua {
                r = r.header("user-agent", ua);
            }
            let r = r.header("x-forwarded-for", h.ip).send().await.expect("hit");
            assert!(r.status() == 200 || r.status() == 302, "{}", r.status());
        }));
    }
    for t in tasks {
        t.await?;
    }
    // The ESP's delivery events arrive after the clicks, as one signed SendGrid batch.
    let events: Vec<serde_json::Value> = delivered
        .iter()
        .enumerate()
        .map(|(m, d)| {
            let at = start_epoch + chrono::Duration::milliseconds((d * 1000.0) as i64);
            serde_json::json!({
                "email": "someone@example.com", "timestamp": at.timestamp(), "event": "delivered",
                "sg_event_id": Uuid::new_v4().to_string(), "sg_message_id": format!("sg-{m}"),
                "reachly_message_id": ids[m].to_string(), "reachly_organization_id": org.to_string(),
            })
        })
        .collect();
    let body = serde_json::to_string(&events)?;
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = sendgrid_signature(&sg_key, &ts, body.as_bytes());
    let r = client
        .post(format!("{base}/webhooks/sendgrid"))
        .header("x-twilio-email-event-webhook-timestamp", ts)
        .header("x-twilio-email-event-webhook-signature", sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "sendgrid: {}", r.text().await?);
    let _ = stop_tx.send(());
    task.await??;
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM email_events WHERE event_type IN ('opened','clicked')",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        stored as usize == hits.len(),
        "stored {stored} of {} hits",
        hits.len()
    );

    // Truth and judgement, per (message, type) as multisets of reasons.
    let index: BTreeMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut truth: BTreeMap<(usize, bool, &str), i64> = BTreeMap::new();
    for h in &hits {
        *truth
            .entry((h.message, h.click.is_some(), h.label))
            .or_default() += 1;
    }
    let mut judged: BTreeMap<(usize, bool, String), i64> = BTreeMap::new();
    for r in db.query(EVENT_REASONS_SQL, &[&vec![campaign]]).await? {
        let m: Uuid = r.get(1);
        let t: String = r.get(2);
        let reason: String = r.get(3);
        let reason = if reason.starts_with("user_agent:") {
            "user_agent".to_string()
        } else {
            reason
        };
        *judged
            .entry((index[&m], t == "clicked", reason))
            .or_default() += 1;
    }
    let reasons = [
        "apple_mpp",
        "head_request",
        "user_agent",
        "scanner_timing",
        "scanner_burst",
    ];
    println!(
        "labelled trace: {messages} messages, {} hits over {seconds} s through the real server\n",
        hits.len()
    );
    println!("| reason | labelled | judged | correct | precision | recall |");
    println!("|---|---|---|---|---|---|");
    let score = |label: &str| {
        let (mut t, mut j, mut tp) = (0i64, 0i64, 0i64);
        let keys: std::collections::BTreeSet<(usize, bool)> = truth
            .keys()
            .map(|(m, c, _)| (*m, *c))
            .chain(judged.keys().map(|(m, c, _)| (*m, *c)))
            .collect();
        for (m, c) in keys {
            let want = truth.get(&(m, c, label)).copied().unwrap_or(0);
            let got = judged.get(&(m, c, label.to_string())).copied().unwrap_or(0);
            t += want;
            j += got;
            tp += want.min(got);
        }
        (t, j, tp)
    };
    let row = |name: &str, (t, j, tp): (i64, i64, i64)| {
        println!(
            "| {name} | {t} | {j} | {tp} | {:.3} | {:.3} |",
            tp as f64 / j.max(1) as f64,
            tp as f64 / t.max(1) as f64
        );
    };
    let mut all = (0, 0, 0);
    for reason in reasons {
        let s = score(reason);
        all = (all.0 + s.0, all.1 + s.1, all.2 + s.2);
        row(reason, s);
    }
    // "machine" as one class: labelled machine vs judged machine, whatever the reason.
    let human = score("human");
    let total = hits.len() as i64;
    let machine_truth = total - human.0;
    let machine_judged = total - human.1;
    let machine_tp = machine_judged - (human.0 - human.2);
    row(
        "machine (any reason)",
        (machine_truth, machine_judged, machine_tp),
    );
    row("human", human);
    let clients: Vec<String> = PEOPLE
        .iter()
        .chain([&GMAIL_PROXY])
        .map(|s| s.to_string())
        .collect();
    let flagged: i64 = db
        .query_one(
            "SELECT count(*) FROM email_events WHERE user_agent = ANY($1) AND metadata ? 'machine_reason'",
            &[&clients],
        )
        .await?
        .get(0);
    println!(
        "\npeople's hits judged machine (by behaviour): {} of {}; hits of real mail clients flagged by the write path: {flagged}",
        human.0 - human.2,
        human.0,
    );

    // Part 2: the campaign query on a large campaign beside other campaigns' events.
    let (big_org, big) = support::seed_campaign(&db, large).await?;
    for _ in 0..others {
        let (o, _) = support::seed_campaign(&db, large).await?;
        seed_events(&db, o).await?;
    }
    seed_events(&db, big_org).await?;
    db.batch_execute("VACUUM ANALYZE").await?;
    let big_campaign: Uuid = db
        .query_one(
            "SELECT campaign_id FROM campaign_messages WHERE id = $1",
            &[&big[0]],
        )
        .await?
        .get(0);
    let counts: (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), (SELECT count(*) FROM email_events) FROM email_events WHERE organization_id = $1",
                &[&big_org],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    println!(
        "\nlarge campaign: {large} messages, {} events (of {} in email_events)\n",
        counts.0, counts.1
    );
    for (name, settings) in [
        ("the planner's choice (default costs)", "RESET ALL"),
        (
            "random_page_cost = 1.1 (the usual setting for SSD storage)",
            "SET random_page_cost = 1.1",
        ),
        (
            "nested loop forced (enable_hashjoin, enable_mergejoin off)",
            "SET enable_hashjoin = off; SET enable_mergejoin = off",
        ),
    ] {
        db.batch_execute(&format!("RESET ALL; {settings}")).await?;
        // Once unmeasured, so every plan reads a warm cache.
        db.query(CAMPAIGN_ENGAGEMENT_SQL, &[&vec![big_campaign]])
            .await?;
        let plan = db
            .query(
                &format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {CAMPAIGN_ENGAGEMENT_SQL}"),
                &[&vec![big_campaign]],
            )
            .await?;
        println!("{name}:\n\n```text");
        for r in plan {
            println!("{}", r.get::<_, String>(0));
        }
        println!("```\n");
    }
    db.batch_execute("RESET ALL").await?;
    let result = db
        .query(CAMPAIGN_ENGAGEMENT_SQL, &[&vec![big_campaign]])
        .await?;
    println!("\n| type | reason | events | messages |\n|---|---|---|---|");
    for r in result {
        println!(
            "| {} | {} | {} | {} |",
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4)
        );
    }
    Ok(())
}

/// Three events per message of `org` on average: a delivery an hour ago; an open (a person,
/// an MPP prefetch or a HEAD probe); clicks (a person later, a scanner at delivery, or a
/// burst of two links).
async fn seed_events(db: &tokio_postgres::Client, org: Uuid) -> anyhow::Result<()> {
    db.batch_execute(&format!(
        "UPDATE campaign_messages SET delivered_at = now() - interval '1 hour', status = 'delivered'
           WHERE organization_id = '{org}';
         INSERT INTO email_events (organization_id, message_id, event_type, created_at, metadata, link_url, user_agent)
         SELECT '{org}', m.id, v.t, now() - interval '1 hour' + v.after, v.meta::jsonb, v.link, 'Mozilla/5.0'
         FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM campaign_messages WHERE organization_id = '{org}') m
         CROSS JOIN LATERAL (VALUES
           ('delivered', interval '0', '{{}}', NULL),
           ('opened', interval '20 minutes', CASE m.n % 5 WHEN 0 THEN '{{\"machine\":true,\"machine_reason\":\"apple_mpp\"}}'
                                                     WHEN 1 THEN '{{\"machine\":true,\"machine_reason\":\"head_request\"}}'
                                                     ELSE '{{}}' END, NULL),
           ('clicked', CASE m.n % 4 WHEN 0 THEN interval '3 seconds' ELSE interval '25 minutes' END, '{{}}', 'https://x.example/a'),
           ('clicked', CASE m.n % 4 WHEN 1 THEN interval '25 minutes 300 milliseconds' ELSE interval '40 minutes' END, '{{}}', 'https://x.example/b')
         ) AS v(t, after, meta, link)
         WHERE v.link IS DISTINCT FROM 'https://x.example/b' OR m.n % 4 = 1;"
    ))
    .await?;
    Ok(())
}
