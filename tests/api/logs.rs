//! The README's promise about logs, at the most verbose level an operator can set: the real
//! binary at `RUST_LOG=trace`, real traffic (pixels, clicks, unsubscribes, webhooks carrying
//! recipient addresses, bounce texts and client addresses, a database connection doing real
//! writes), and its stderr searched for every secret and personal datum it was given.

use std::time::Duration;

use base64::Engine as _;
use reachly_ingest::token::{self, Purpose};

use crate::helpers::*;

const POSTMARK_AUTH: (&str, &str) = ("pm-hook", "Sw0rdf1shPostmark");
const SPARKPOST_AUTH: &str = "sp-hook:Sw0rdf1shSparkpost";
/// The client, as a trusted proxy reports it, and an address an ESP reports for an open.
const CLIENT_IP: &str = "203.0.113.77";
const ESP_REPORTED_IP: &str = "198.51.100.23";

/// Every full e-mail address in `text` (a plain scan: local@domain.tld).
fn addresses(text: &str) -> Vec<String> {
    let is_local = |c: char| c.is_ascii_alphanumeric() || "._%+-".contains(c);
    let is_domain = |c: char| c.is_ascii_alphanumeric() || ".-".contains(c);
    let mut found = Vec::new();
    for (at, _) in text.match_indices('@') {
        let local: String = text[..at]
            .chars()
            .rev()
            .take_while(|c| is_local(*c))
            .collect();
        let domain: String = text[at + 1..]
            .chars()
            .take_while(|c| is_domain(*c))
            .collect();
        let domain = domain.trim_end_matches('.');
        if !local.is_empty() && domain.contains('.') && !domain.ends_with('-') {
            found.push(format!(
                "{}@{domain}",
                local.chars().rev().collect::<String>()
            ));
        }
    }
    found
}

#[test]
fn the_address_scan_finds_addresses_and_nothing_else() {
    assert_eq!(
        addresses(r#"x "550 <jane.doe+1@mail.example.org>: unknown" a@b"#),
        ["jane.doe+1@mail.example.org"]
    );
    assert!(addresses("user@localhost, @example.com, none").is_empty());
}

#[tokio::test]
async fn at_rust_log_trace_no_secret_address_or_client_ip_reaches_stderr() {
    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let spool = temp_dir("logs-spool");
    let service = ServeProcess::spawn(
        &url,
        &spool,
        &[
            ("RUST_LOG", "trace"),
            ("REACHLY_MIGRATE_ON_START", "false"),
            ("REACHLY_TRUSTED_PROXIES", "127.0.0.0/8"),
            ("REACHLY_IP_MODE", "full"),
            ("REACHLY_FLUSH_INTERVAL_MS", "20"),
            (
                "REACHLY_POSTMARK_BASIC_AUTH",
                &format!("{}:{}", POSTMARK_AUTH.0, POSTMARK_AUTH.1),
            ),
            ("REACHLY_SPARKPOST_BASIC_AUTH", SPARKPOST_AUTH),
        ],
    );
    service.wait_admin_ok("/readyz").await;
    let client = http_client();
    let keys = test_token_keys();
    let get = |path: String| {
        client
            .get(service.url(&path))
            .header("user-agent", BROWSER_UA)
            .header("x-forwarded-for", CLIENT_IP)
            .send()
    };
    let open = token::mint(&keys, Purpose::Open, s.org, s.message, None).unwrap();
    assert_eq!(get(format!("/o/{open}.gif")).await.unwrap().status(), 200);
    let click = token::mint(
        &keys,
        Purpose::Click,
        s.org,
        s.message,
        Some("https://example.com/landing?who=reader@example.net"),
    )
    .unwrap();
    assert_eq!(get(format!("/c/{click}")).await.unwrap().status(), 302);
    assert_eq!(
        get("/o/not-a-token.gif".into()).await.unwrap().status(),
        200
    );

    // A Postmark bounce with the recipient and a bounce text naming it.
    let bounce = serde_json::json!({
        "RecordType": "Bounce", "ID": 4323372036854775807u64, "Type": "HardBounce",
        "TypeCode": 1, "MessageID": uuid::Uuid::new_v4().to_string(),
        "Email": "bounced.person@example.com", "From": "sender@example.com",
        "BouncedAt": "2026-01-05T16:33:54Z", "Inactive": true,
        "Description": "The server was unable to deliver your message",
        "Details": "smtp;550 5.1.1 <bounced.person@example.com>: Recipient address rejected",
        "Metadata": {"reachly_message_id": s.message.to_string()}
    });
    let r = client
        .post(service.url("/webhooks/postmark"))
        .basic_auth(POSTMARK_AUTH.0, Some(POSTMARK_AUTH.1))
        .header("content-type", "application/json")
        .body(bounce.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A SparkPost batch: an open with the client address the ESP saw, a soft bounce, and an
    // uncorrelated event (dead-lettered with its raw payload).
    let other = seed_message_in(&db, &s).await;
    let batch = serde_json::json!([
        {"msys": {"track_event": {"type": "open", "event_id": "11", "timestamp": "1767630000",
            "ip_address": ESP_REPORTED_IP, "rcpt_to": "opener@example.com",
            "user_agent": BROWSER_UA, "rcpt_meta": {"reachly_message_id": other.message.to_string()}}}},
        {"msys": {"message_event": {"type": "bounce", "bounce_class": "21", "event_id": "12",
            "timestamp": "1767630001", "rcpt_to": "soft.bounce@example.com",
            "raw_reason": "452 4.2.2 <soft.bounce@example.com>: mailbox full",
            "reason": "452 4.2.2 <soft.bounce@example.com>: mailbox full",
            "rcpt_meta": {"reachly_message_id": other.message.to_string()}}}},
        {"msys": {"message_event": {"type": "delivery", "event_id": "13",
            "timestamp": "1767630002", "rcpt_to": "nobody.known@example.com"}}}
    ]);
    let r = client
        .post(service.url("/webhooks/sparkpost"))
        .header(
            "authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(SPARKPOST_AUTH)
            ),
        )
        .header("content-type", "application/json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A refused webhook (wrong credentials) and a forged unsubscribe are logged too.
    let r = client
        .post(service.url("/webhooks/postmark"))
        .basic_auth(POSTMARK_AUTH.0, Some("wrong-password"))
        .body(bounce.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let unsub = token::mint(&keys, Purpose::Unsubscribe, s.org, s.message, None).unwrap();
    let post_unsub = |t: String| {
        client
            .post(service.url(&format!("/u/{t}")))
            .header("x-forwarded-for", CLIENT_IP)
            .body("List-Unsubscribe=One-Click")
            .send()
    };
    assert_eq!(post_unsub(unsub).await.unwrap().status(), 200);
    let forged = token::mint(
        &keys,
        Purpose::Unsubscribe,
        uuid::Uuid::new_v4(),
        other.message,
        None,
    )
    .unwrap();
    assert_eq!(post_unsub(forged).await.unwrap().status(), 404);

    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id IN ('{}', '{}')",
            s.message, other.message
        ),
        6,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.signal("-TERM");
    let log = service.log.clone();
    assert_eq!(service.wait(Duration::from_secs(20)).await, Some(0));
    let stderr = log.lock().unwrap().join("\n");
    assert!(
        stderr.lines().count() > 10 && stderr.contains("serving"),
        "the log was captured: {stderr}"
    );

    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let basic = |c: &str| base64::engine::general_purpose::STANDARD.encode(c);
    let forbidden = [
        ("token key 1 (base64)", b64(&TEST_KEY_1)),
        ("token key 2 (base64)", b64(&TEST_KEY_2)),
        (
            "token key 1 (raw)",
            String::from_utf8(TEST_KEY_1.to_vec()).unwrap(),
        ),
        ("Postmark password", POSTMARK_AUTH.1.to_string()),
        ("SparkPost secret", "Sw0rdf1shSparkpost".to_string()),
        ("SparkPost authorization", basic(SPARKPOST_AUTH)),
        (
            "Postmark authorization",
            basic(&format!("{}:{}", POSTMARK_AUTH.0, POSTMARK_AUTH.1)),
        ),
        ("client IP", CLIENT_IP.to_string()),
        ("ESP-reported IP", ESP_REPORTED_IP.to_string()),
    ];
    for (what, needle) in &forbidden {
        if let Some(line) = stderr.lines().find(|l| l.contains(needle.as_str())) {
            panic!("stderr carries the {what}: {line}");
        }
    }
    let found = addresses(&stderr);
    assert!(
        found.is_empty(),
        "stderr carries full e-mail addresses {found:?}; first line: {}",
        stderr
            .lines()
            .find(|l| l.contains(found[0].as_str()))
            .unwrap_or_default()
    );
}
