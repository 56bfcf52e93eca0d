//! The hostile internet, over real sockets (issue 11): connections that never ask for
//! anything (silent, a partial HTTP/1 head, a partial h2 preface) are closed by a timeout
//! while real requests keep being answered; the real binary under a small descriptor limit
//! never runs out of descriptors and its admin listener stays answerable; idle h2 and
//! HTTP/1 keep-alive connections are closed; request bodies share one memory budget; a
//! batch that could never be stored is 413, counted as such; a validly signed unsubscribe
//! token naming another organization's message is refused; a request head past the read
//! buffer's bound is 431 while the longest legitimate click passes.

use std::time::{Duration, Instant};

use base64::Engine as _;
use reachly_ingest::config::Secret;
use reachly_ingest::token::{self, Purpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// What an idle attacker sends: nothing, half a request head, half an h2 preface, or a
/// whole h2 preface without the SETTINGS frame that must follow it.
const OPENINGS: [&[u8]; 4] = [
    b"",
    b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\n",
    b"PRI * HTTP/2.0\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
];

/// Opens up to `n` connections sending `OPENINGS` in turn; stops early once connects stop
/// succeeding (the server's backlog is full: what an attacker would see too).
async fn open_silent(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut socks = Vec::with_capacity(n);
    let mut failures = 0;
    for i in 0..n {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(mut s)) => {
                let opening = OPENINGS[i % OPENINGS.len()];
                if !opening.is_empty() {
                    let _ = s.write_all(opening).await;
                }
                socks.push(s);
            }
            _ => {
                failures += 1;
                if failures >= 5 {
                    break;
                }
            }
        }
    }
    socks
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. hyper's 408 or an h2 GOAWAY before the close
        }
    }
}

#[tokio::test]
async fn silent_sockets_and_partial_prefaces_are_closed_within_twice_the_header_timeout() {
    let timeout = Duration::from_millis(500);
    let app = spawn_app_with(|a| a.server.header_timeout = timeout).await;
    let mut socks = open_silent(app.addr, 40).await;
    assert_eq!(socks.len(), 40);
    let started = Instant::now();
    for (i, s) in socks.iter_mut().enumerate() {
        let left = (2 * timeout).saturating_sub(started.elapsed()) + Duration::from_millis(200);
        assert!(
            closed_within(s, left).await,
            "connection {i} (opening {:?}) still open after {:?}",
            String::from_utf8_lossy(OPENINGS[i % OPENINGS.len()]),
            started.elapsed()
        );
    }
    let r = app.get("/o/x.gif", None).await;
    assert_eq!(r.status(), 200, "real requests are still answered");
    let timed_out = app
        .metric(
            r#"reachly_http_connections_timed_out_total{listener="public",phase="first_request"}"#,
        )
        .await;
    assert_eq!(timed_out, 40.0);
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed() {
    let timeout = Duration::from_millis(500);
    let app = spawn_app_with(|a| a.server.header_timeout = timeout).await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET /o/x.gif HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(
        closed_within(&mut s, 2 * timeout + Duration::from_millis(200)).await,
        "an idle keep-alive connection stays open"
    );
}

/// An h2 connection after one request, on a listener with the given idle timeout: how long
/// until the server ends it (the client never sends anything more but answers PINGs).
async fn idle_h2_lifetime(addr: std::net::SocketAddr) -> Duration {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let req = hyper::Request::get(format!("http://{addr}/o/x.gif"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).expect("send");
    let resp = resp.await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("body");
    }
    let answered = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(20), driver)
        .await
        .expect("the idle h2 connection was never closed")
        .unwrap();
    ended - answered
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(600);
    let app = spawn_app_with(|a| {
        a.server.idle_timeout = idle;
        a.server.header_timeout = Duration::from_millis(400);
    })
    .await;
    let lived = idle_h2_lifetime(app.addr).await;
    assert!(
        lived >= idle / 2 && lived <= 2 * idle + Duration::from_millis(400),
        "closed {lived:?} after its last request; idle timeout {idle:?}"
    );
    assert_eq!(
        app.metric(r#"reachly_http_connections_timed_out_total{listener="public",phase="idle"}"#)
            .await,
        1.0
    );
}

/// The real binary under `ulimit -n 512`: 2,000 idle connections (silent, half heads, half
/// h2 prefaces) neither exhaust its descriptors nor silence either listener.
#[tokio::test]
async fn thousands_of_silent_sockets_never_exhaust_descriptors_and_admin_stays_answerable() {
    let url = fresh_database().await;
    let service = ServeProcess::spawn_with_fd_limit(
        &url,
        &temp_dir("silent-spool"),
        &[
            ("REACHLY_MIGRATE_ON_START", "false"),
            ("REACHLY_HEADER_TIMEOUT_MS", "1000"),
        ],
        Some(512),
    );
    service.wait_admin_ok("/healthz").await;
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", service.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let mut socks = open_silent(service.public, 2000).await;
    let opened = socks.len();
    assert!(opened > 512, "the attack reached past the limit: {opened}");
    let client = http_client();
    let during = client
        .get(service.admin_url("/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("admin answers while the public listener is saturated");
    assert_eq!(during.status(), 200);
    let text = during.text().await.unwrap();
    let cap = metric_value(&text, r#"reachly_http_connections_max{listener="public"}"#);
    assert!(
        cap > 0.0 && cap < 512.0,
        "public cap fitted to the limit: {cap}"
    );
    let peak = fds();
    assert!(peak < 512, "descriptors in use at the peak: {peak}");
    // A real request waits in the backlog for a slot, which the timeouts free.
    let started = Instant::now();
    let pixel = client
        .get(service.url("/o/x.gif"))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .expect("a real request is answered while the attack goes on");
    assert_eq!(pixel.status(), 200);
    let waited = started.elapsed();
    let mut still_open = 0;
    for s in &mut socks {
        if !closed_within(s, Duration::from_secs(10)).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "of {opened} idle connections");
    let text = client
        .get(service.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timed_out = metric_value(
        &text,
        r#"reachly_http_connections_timed_out_total{listener="public",phase="first_request"}"#,
    );
    assert!(
        timed_out >= (opened - 10) as f64,
        "{timed_out} of {opened} closed by the timeout"
    );
    assert!(
        metric_value(
            &text,
            r#"reachly_http_connection_cap_reached_total{listener="public"}"#
        ) >= 1.0
    );
    service.signal("-TERM");
    let log = service.log.clone();
    assert_eq!(service.wait(Duration::from_secs(20)).await, Some(0));
    let log = log.lock().unwrap().join("\n");
    assert!(
        !log.contains("Too many open files"),
        "the process ran out of descriptors"
    );
    eprintln!(
        "{opened} idle connections; peak descriptors {peak}; public cap {cap}; a pixel waited {waited:?}"
    );
}

const SPARKPOST_AUTH: &str = "sparkpost-hook:s3cret";

fn sparkpost_basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(SPARKPOST_AUTH)
    )
}

/// A SparkPost batch of `n` hard bounces for `message`, each with an address and a bounce text.
fn sparkpost_batch(message: uuid::Uuid, n: usize) -> String {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({"msys": {"message_event": {
                "type": "bounce", "bounce_class": "10", "event_id": format!("9{i:015}"),
                "timestamp": "1460989507", "error_code": "550",
                "rcpt_to": format!("person{i}@example.org"),
                "reason": "550 5.1.1 <person@example.org>: Recipient address rejected: User unknown",
                "rcpt_meta": {"reachly_message_id": message.to_string()}
            }}})
        })
        .collect();
    serde_json::Value::Array(events).to_string()
}

#[tokio::test]
async fn a_batch_that_could_never_fit_is_413_and_counted_as_too_large() {
    let app = spawn_app_with(|a| {
        a.webhooks.sparkpost_basic_auth = Some(Secret::new(SPARKPOST_AUTH));
        a.pipeline.buffer_max_events = 10;
        a.pipeline.flush_max_events = 10;
        a.pipeline.spool_max_bytes = 16 << 10;
    })
    .await;
    let s = app.seed().await;
    let auth = sparkpost_basic();
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let r = app
        .post_webhook("sparkpost", &headers, sparkpost_batch(s.message, 200))
        .await;
    assert_eq!(r.status(), 413, "{:?}", r.text().await);
    assert_eq!(
        app.metric(r#"reachly_events_dropped_total{reason="batch_too_large"}"#)
            .await,
        200.0
    );
    assert_eq!(
        app.metric(r#"reachly_events_dropped_total{reason="spool_full"}"#)
            .await,
        0.0
    );
    assert_eq!(app.state.ingest.spool_bytes(), 0, "nothing was spooled");
    // A batch that fits is still taken.
    let r = app
        .post_webhook("sparkpost", &headers, sparkpost_batch(s.message, 3))
        .await;
    assert_eq!(r.status(), 200);
}

/// Sends a request head announcing `len` body bytes and `sent` of them, then holds.
async fn start_body(addr: std::net::SocketAddr, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /webhooks/sparkpost HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

#[tokio::test]
async fn request_bodies_share_one_budget_and_past_it_the_answer_is_503_with_retry_after() {
    let app = spawn_app_with(|a| {
        a.webhooks.sparkpost_basic_auth = Some(Secret::new(SPARKPOST_AUTH));
        a.webhooks.webhook_max_bytes = 512 << 10;
        a.server.body_budget_bytes = 1 << 20;
    })
    .await;
    // Two unauthenticated bodies of 400 KiB each take 800 KiB of the 1 MiB budget.
    let held = [
        start_body(app.addr, 400 << 10, 1000).await,
        start_body(app.addr, 400 << 10, 1000).await,
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.state.body_budget.available(), (1 << 20) - (800 << 10));
    // ... and the scrape says so (what the load test reads at an RSS peak).
    assert_eq!(
        app.metric("reachly_http_body_bytes_held").await,
        (800 << 10) as f64
    );
    assert_eq!(
        app.metric("reachly_http_body_budget_bytes").await,
        (1 << 20) as f64
    );
    // A third announced one does not fit: refused at once, before its body is read.
    let r = app
        .post_webhook("sparkpost", &[], vec![b' '; 400 << 10])
        .await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    // A chunked one (no length announced) is refused as it grows past the budget.
    let mut c = TcpStream::connect(app.addr).await.unwrap();
    c.write_all(
        b"POST /webhooks/sparkpost HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..10 {
        let chunk = format!("{:x}\r\n{}\r\n", 40 << 10, " ".repeat(40 << 10));
        if c.write_all(chunk.as_bytes()).await.is_err() {
            break; // the server answered and closed
        }
    }
    let mut head = [0u8; 12];
    c.read_exact(&mut head).await.expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 503");
    // Small requests still pass; once the held bodies go away the budget is whole again.
    let r = app.post_webhook("sparkpost", &[], vec![b' '; 1000]).await;
    assert_eq!(r.status(), 401, "read, then refused for its credentials");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.state.body_budget.available() != 1 << 20 {
        assert!(Instant::now() < deadline, "the budget was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.metric("reachly_http_body_bytes_held").await, 0.0);
    let r = app
        .post_webhook("sparkpost", &[], vec![b' '; 400 << 10])
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        app.metric("reachly_http_body_budget_exhausted_total").await,
        2.0
    );
}

#[tokio::test]
async fn an_unsubscribe_token_naming_another_organizations_message_is_refused() {
    let app = spawn_app().await;
    let victim = app.seed().await;
    let attacker = app.seed().await;
    // Validly signed, but the organization is not the message's.
    let forged = token::mint(
        &test_token_keys(),
        Purpose::Unsubscribe,
        attacker.org,
        victim.message,
        None,
    )
    .unwrap();
    let r = app
        .http
        .post(app.url(&format!("/u/{forged}")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.unwrap().contains("unsubscribed"));
    // A message that does not exist at all is refused the same way.
    let nowhere = token::mint(
        &test_token_keys(),
        Purpose::Unsubscribe,
        victim.org,
        uuid::Uuid::new_v4(),
        None,
    )
    .unwrap();
    let r = app
        .http
        .post(app.url(&format!("/u/{nowhere}")))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The genuine token still works, and only it.
    let genuine = app.mint(Purpose::Unsubscribe, &victim, None);
    let r = app
        .http
        .post(app.url(&format!("/u/{genuine}")))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}' AND event_type = 'unsubscribed'",
            victim.message
        ),
        1,
    )
    .await;
    assert_eq!(app.contact_status(victim.contact).await, "unsubscribed");
    assert_eq!(
        app.metric(r#"reachly_invalid_tokens_total{purpose="unsubscribe"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn an_unsubscribe_that_cannot_be_checked_is_kept_answered_202_received_and_checked_by_the_writer()
 {
    let pg = PrivateCluster::start().await;
    let db = connect(&pg.url).await;
    let s = seed_tenant(&db).await;
    let victim = seed_tenant(&db).await;
    drop(db);
    let app = spawn_app_on(
        &pg.url,
        |a| a.db.connect_timeout = Duration::from_secs(1),
        Default::default(),
    )
    .await;
    pg.stop().await;
    // While the database is down the tenant cannot be checked: the request is kept (a
    // one-click POST is not retried by mailbox providers) and answered 202 "received",
    // never "you have been unsubscribed".
    let good = app.mint(Purpose::Unsubscribe, &s, None);
    // Validly signed, but naming another organization's message.
    let mismatched = app.mint(
        Purpose::Unsubscribe,
        &Seeded {
            org: s.org,
            ..victim
        },
        None,
    );
    for t in [&good, &mismatched] {
        let r = app
            .http
            .post(app.url(&format!("/u/{t}")))
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let body = r.text().await.unwrap();
        assert!(body.contains("received"), "{body}");
        assert!(!body.contains("You have been unsubscribed"), "{body}");
    }
    pg.start_again().await;
    let db = connect(&pg.url).await;
    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM contacts WHERE id = '{}' AND status = 'unsubscribed'",
            s.contact
        ),
        1,
    )
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM webhook_dead_letters WHERE reason = 'organization_mismatch'",
        1,
    )
    .await;
    let victim_status: String = db
        .query_one(
            "SELECT status FROM contacts WHERE id = $1",
            &[&victim.contact],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        victim_status, "active",
        "a mismatched token suppresses nobody"
    );
    // Once the database answers, a checked unsubscribe is answered as done.
    let r = app
        .http
        .post(app.url(&format!("/u/{good}")))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
    pg.stop().await;
}

/// Sends `head` (a whole HTTP/1 request head) on a fresh connection; returns the status
/// line's code and whether the server closed the connection after answering.
async fn raw_request(addr: std::net::SocketAddr, head: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it has read everything we send.
    let _ = s.write_all(head).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false, // still open, nothing more to read
        }
    };
    let text = String::from_utf8_lossy(&got);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .unwrap_or_else(|| panic!("no HTTP/1.1 answer, got {text:?}"))
        .to_string();
    (code, closed)
}

#[tokio::test]
async fn a_request_head_past_the_read_buffer_is_431_and_the_longest_legitimate_click_passes() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let max = reachly_ingest::server::MAX_READ_BUFFER_BYTES;
    // The longest click the product mints (a 4 kB destination) from a browser carrying
    // 12 kB of cookies for the tracking domain: followed.
    let url = format!(
        "https://shop.example.com/landing?{}",
        "q".repeat(token::MAX_URL_BYTES - 33)
    );
    assert_eq!(url.len(), token::MAX_URL_BYTES);
    let t = app.mint(Purpose::Click, &s, Some(&url));
    let cookies = format!("Cookie: session={}\r\n", "c".repeat(12 << 10));
    let head = format!(
        "GET /c/{t} HTTP/1.1\r\nHost: t\r\nUser-Agent: {BROWSER_UA}\r\n{cookies}Accept: text/html\r\nConnection: close\r\n\r\n"
    );
    assert!(head.len() > 16 << 10 && head.len() < max, "{}", head.len());
    let (code, _) = raw_request(app.addr, head.as_bytes()).await;
    assert_eq!(code, "302");
    // A head of more than the bound (one header of 40 kB): 431, closed, nothing stored.
    let open = app.mint(Purpose::Open, &s, None);
    let huge = format!(
        "GET /o/{open}.gif HTTP/1.1\r\nHost: t\r\nUser-Agent: {BROWSER_UA}\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(40 << 10)
    );
    assert!(huge.len() > max);
    let (code, closed) = raw_request(app.addr, huge.as_bytes()).await;
    assert_eq!(code, "431");
    assert!(closed, "the connection is closed after the 431");
    // The click was stored, the oversized open was not; the server still answers.
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}' AND event_type = 'clicked'",
            s.message
        ),
        1,
    )
    .await;
    let r = app.get(&format!("/o/{open}.gif"), Some(BROWSER_UA)).await;
    assert_eq!(r.status(), 200);
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}' AND event_type = 'opened'",
            s.message
        ),
        1,
    )
    .await;
}
