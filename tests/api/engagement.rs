//! The campaign engagement query (`reachly_ingest::db::engagement`, docs/engagement.md) over
//! events sent through the real server: two campaigns with a known mix of people, user-agent
//! machines, HEAD probes, an Apple MPP prefetch, an instant click whose delivery arrives
//! *after* it, and a link burst; the query's numbers must be exactly these.

use reachly_ingest::config::Secret;
use reachly_ingest::db::engagement::{EngagementRow, campaign_engagement, message_engagement};
use reachly_ingest::token::Purpose;
use reachly_ingest::webhooks::testkit::sign::{sendgrid_keypair, sendgrid_signature};
use uuid::Uuid;

use crate::helpers::*;

const THUNDERBIRD: &str =
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0";
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148";
const GMAIL_PROXY: &str =
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)";

#[tokio::test]
async fn the_campaign_query_counts_people_and_each_kind_of_machine_exactly() {
    let (key, public) = sendgrid_keypair();
    let app = spawn_app_with(|a| {
        a.tracking.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        a.webhooks.sendgrid_public_key = Some(Secret::new(public));
    })
    .await;
    let a1 = app.seed().await;
    let (a2, a3, a4) = (
        app.seed_message(&a1).await,
        app.seed_message(&a1).await,
        app.seed_message(&a1).await,
    );
    let campaign_b = Uuid::new_v4();
    app.db
        .execute(
            "INSERT INTO campaigns (id, organization_id, name) VALUES ($1, $2, 'B')",
            &[&campaign_b, &a1.org],
        )
        .await
        .unwrap();
    let b = Seeded {
        campaign: campaign_b,
        ..a1
    };
    let (b1, b2, b3) = (
        app.seed_message(&b).await,
        app.seed_message(&b).await,
        app.seed_message(&b).await,
    );

    let sendgrid = |events: Vec<serde_json::Value>| {
        let body = serde_json::to_string(&events).unwrap();
        let ts = chrono::Utc::now().timestamp().to_string();
        let sig = sendgrid_signature(&key, &ts, body.as_bytes());
        let app = &app;
        async move {
            let r = app
                .post_webhook(
                    "sendgrid",
                    &[
                        ("x-twilio-email-event-webhook-timestamp", &ts),
                        ("x-twilio-email-event-webhook-signature", &sig),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
                .await;
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        }
    };
    let sg = |s: &Seeded, kind: &str, at: i64, url: Option<&str>, ua: Option<&str>| {
        serde_json::json!({
            "email": "someone@example.com", "timestamp": at, "event": kind,
            "sg_event_id": Uuid::new_v4().to_string(), "sg_message_id": format!("sg-{}", s.message),
            "url": url, "useragent": ua, "ip": "203.0.113.9",
            "reachly_message_id": s.message.to_string(), "reachly_organization_id": s.org.to_string(),
        })
    };
    let open = |s: &Seeded, ua: Option<&'static str>, xff: Option<&'static str>| {
        let token = app.mint(Purpose::Open, s, None);
        let app = &app;
        async move {
            let mut r = app.http.get(app.url(&format!("/o/{token}.gif")));
            if let Some(ua) = ua {
                r = r.header("user-agent", ua);
            }
            if let Some(ip) = xff {
                r = r.header("x-forwarded-for", ip);
            }
            assert_eq!(r.send().await.unwrap().status(), 200);
        }
    };
    let click = |s: &Seeded, link: &str, ua: &'static str| {
        let token = app.mint(Purpose::Click, s, Some(link));
        let app = &app;
        async move {
            let r = app.get(&format!("/c/{token}"), Some(ua)).await;
            assert_eq!(r.status(), 302);
        }
    };
    let now = chrono::Utc::now().timestamp();

    // Campaign A. a1: a person opens and clicks an hour after delivery; a HEAD probe.
    sendgrid(vec![sg(&a1, "delivered", now - 3600, None, None)]).await;
    open(&a1, Some(BROWSER_UA), None).await;
    click(&a1, "https://shop.example.com/a", BROWSER_UA).await;
    let head = app.mint(Purpose::Open, &a1, None);
    let r = app
        .http
        .head(app.url(&format!("/o/{head}.gif")))
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // a2: an Apple MPP prefetch (bare Mozilla/5.0 from the relay) and a curl click.
    open(&a2, Some("Mozilla/5.0"), Some("17.1.2.3")).await;
    click(&a2, "https://shop.example.com/a", "curl/8.5.0").await;
    // a3: a browser-looking click two seconds after delivery; the delivery arrives late.
    let before_click = chrono::Utc::now().timestamp();
    click(&a3, "https://shop.example.com/a", BROWSER_UA).await;
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            a3.message
        ),
        1,
    )
    .await;
    sendgrid(vec![sg(&a3, "delivered", before_click - 2, None, None)]).await;
    // a4: a Gmail proxy open (a person) and a scanner clicking three links at once.
    open(&a4, Some(GMAIL_PROXY), None).await;
    for link in ["/a", "/b", "/c"] {
        click(&a4, &format!("https://shop.example.com{link}"), BROWSER_UA).await;
    }

    // Campaign B. b1: a person on two clients, two links 1.5 s apart.
    open(&b1, Some(THUNDERBIRD), None).await;
    open(&b1, Some(IPHONE), None).await;
    click(&b1, "https://shop.example.com/a", IPHONE).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    click(&b1, "https://shop.example.com/b", IPHONE).await;
    // b2: a security gateway's click and an open without a user agent.
    click(
        &b2,
        "https://shop.example.com/a",
        "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))",
    )
    .await;
    open(&b2, None, None).await;
    // b3: ESP-reported: delivered, a person's click an hour later, a script's open.
    sendgrid(vec![
        sg(&b3, "delivered", now - 7200, None, None),
        sg(
            &b3,
            "click",
            now - 3600,
            Some("https://shop.example.com/a"),
            Some(IPHONE),
        ),
        sg(
            &b3,
            "open",
            now - 3500,
            None,
            Some("python-requests/2.31.0"),
        ),
    ])
    .await;

    app.wait_count("SELECT count(*) FROM email_events", 21)
        .await;
    let got = campaign_engagement(&app.db, &[a1.campaign, campaign_b])
        .await
        .unwrap();
    let row = |c: Uuid, t: &str, r: &str, events: i64, messages: i64| EngagementRow {
        campaign_id: c,
        event_type: t.into(),
        reason: r.into(),
        events,
        messages,
    };
    let (a, b) = (a1.campaign, campaign_b);
    let mut want = vec![
        row(a, "clicked", "human", 1, 1),
        row(a, "clicked", "scanner_burst", 3, 1),
        row(a, "clicked", "scanner_timing", 1, 1),
        row(a, "clicked", "user_agent:curl", 1, 1),
        row(a, "opened", "apple_mpp", 1, 1),
        row(a, "opened", "head_request", 1, 1),
        row(a, "opened", "human", 2, 2),
        row(b, "clicked", "human", 3, 2),
        row(b, "clicked", "user_agent:barracuda", 1, 1),
        row(b, "opened", "human", 2, 1),
        row(b, "opened", "no_user_agent", 1, 1),
        row(b, "opened", "user_agent:python-requests", 1, 1),
    ];
    want.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, want);

    // Per message: the stored status counts the behavioural scanners (a3's instant click,
    // a4's burst) and the honest one does not; machines that the write path flagged never
    // moved the stored status (a2, b2 stay `sent`).
    let per_message = message_engagement(&app.db, &[a1.campaign, campaign_b])
        .await
        .unwrap();
    let mut got: Vec<(Uuid, Uuid, String, String, bool, bool, i64)> = per_message
        .iter()
        .map(|m| {
            (
                m.message_id,
                m.contact_id,
                m.status.clone(),
                m.honest_status.clone(),
                m.human_opened_at.is_some(),
                m.human_clicked_at.is_some(),
                m.machine_events,
            )
        })
        .collect();
    got.sort();
    let msg = |s: &Seeded, raw: &str, honest: &str, opened: bool, clicked: bool, machine: i64| {
        (
            s.message,
            s.contact,
            raw.to_string(),
            honest.to_string(),
            opened,
            clicked,
            machine,
        )
    };
    let mut want = vec![
        msg(&a1, "clicked", "clicked", true, true, 1),
        msg(&a2, "sent", "sent", false, false, 2),
        msg(&a3, "clicked", "delivered", false, false, 1),
        msg(&a4, "clicked", "opened", true, false, 3),
        msg(&b1, "clicked", "clicked", true, true, 0),
        msg(&b2, "sent", "sent", false, false, 2),
        msg(&b3, "clicked", "clicked", false, true, 1),
    ];
    want.sort();
    assert_eq!(got, want);

    // The query uses the indexes named in docs/engagement.md (forced off sequential scans,
    // since a test database is tiny: this checks the indexes exist and fit the query).
    app.db
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = app
        .db
        .query(
            &format!(
                "EXPLAIN {}",
                reachly_ingest::db::engagement::CAMPAIGN_ENGAGEMENT_SQL
            ),
            &[&vec![a, b]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("idx_messages_campaign_id"), "{plan}");
    assert!(plan.contains("message_id"), "{plan}");
    let plan: Vec<String> = app
        .db
        .query(
            &format!(
                "EXPLAIN {}",
                reachly_ingest::db::engagement::MESSAGE_ENGAGEMENT_SQL
            ),
            &[&vec![a, b]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("idx_messages_campaign_id"), "{plan}");
    assert!(plan.contains("e.message_id"), "{plan}");
}

/// The behaviour verdicts depend only on the set of stored events: the same deliveries and
/// clicks (ESP-reported, with their own times) sent one per request in opposite orders into
/// two campaigns give the same rows.
#[tokio::test]
async fn behaviour_verdicts_do_not_depend_on_arrival_order() {
    let (key, public) = sendgrid_keypair();
    let app = spawn_app_with(|a| {
        a.webhooks.sendgrid_public_key = Some(Secret::new(public));
    })
    .await;
    let x = app.seed().await;
    let campaign_y = Uuid::new_v4();
    app.db
        .execute(
            "INSERT INTO campaigns (id, organization_id, name) VALUES ($1, $2, 'Y')",
            &[&campaign_y, &x.org],
        )
        .await
        .unwrap();
    let y = Seeded {
        campaign: campaign_y,
        ..x
    };
    let t = chrono::Utc::now().timestamp() - 7200;
    let mut per_campaign = Vec::new();
    for (n, first) in [(0, x), (1, y)] {
        let m = [
            app.seed_message(&first).await,
            app.seed_message(&first).await,
            app.seed_message(&first).await,
        ];
        // m0: a click 3 s after delivery; m1: three links in one second; m2: a person.
        let ev = |s: &Seeded, kind: &str, at: i64, url: Option<&str>| {
            serde_json::json!({
                "email": "someone@example.com", "timestamp": at, "event": kind,
                "sg_event_id": Uuid::new_v4().to_string(), "sg_message_id": format!("sg-{}", s.message),
                "url": url, "useragent": BROWSER_UA, "ip": "203.0.113.9",
                "reachly_message_id": s.message.to_string(), "reachly_organization_id": s.org.to_string(),
            })
        };
        let mut events = vec![
            ev(&m[0], "delivered", t, None),
            ev(&m[0], "click", t + 3, Some("https://shop.example.com/a")),
            ev(&m[1], "delivered", t, None),
            ev(&m[1], "click", t + 100, Some("https://shop.example.com/a")),
            ev(&m[1], "click", t + 100, Some("https://shop.example.com/b")),
            ev(&m[1], "click", t + 100, Some("https://shop.example.com/c")),
            ev(&m[2], "delivered", t, None),
            ev(&m[2], "click", t + 600, Some("https://shop.example.com/a")),
            ev(&m[2], "click", t + 700, Some("https://shop.example.com/b")),
        ];
        if n == 1 {
            events.reverse();
        }
        for e in events {
            let body = serde_json::to_string(&vec![e]).unwrap();
            let ts = chrono::Utc::now().timestamp().to_string();
            let sig = sendgrid_signature(&key, &ts, body.as_bytes());
            let r = app
                .post_webhook(
                    "sendgrid",
                    &[
                        ("x-twilio-email-event-webhook-timestamp", &ts),
                        ("x-twilio-email-event-webhook-signature", &sig),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
                .await;
            assert_eq!(r.status(), 200);
        }
        per_campaign.push(first.campaign);
    }
    app.wait_count("SELECT count(*) FROM email_events", 18)
        .await;
    let rows = campaign_engagement(&app.db, &per_campaign).await.unwrap();
    let of = |c: Uuid| -> Vec<(String, String, i64, i64)> {
        let mut v: Vec<_> = rows
            .iter()
            .filter(|r| r.campaign_id == c)
            .map(|r| (r.event_type.clone(), r.reason.clone(), r.events, r.messages))
            .collect();
        v.sort();
        v
    };
    let want: Vec<(String, String, i64, i64)> = [
        ("clicked", "human", 2, 1),
        ("clicked", "scanner_burst", 3, 1),
        ("clicked", "scanner_timing", 1, 1),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), *c, *d))
    .collect();
    assert_eq!(of(x.campaign), want);
    assert_eq!(of(campaign_y), want, "the reversed order judges the same");
}
