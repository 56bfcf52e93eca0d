//! Tracking endpoints end to end: published token vectors, the `token` command, pixel and
//! click over a real socket into real rows, client addresses and proxies, bad and
//! wrong-purpose tokens, machine traffic, one-click unsubscribe.

use std::process::Command;

use base64::Engine as _;
use reachly_ingest::token::TokenKeys;
use reachly_ingest::token::{self, Purpose};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::*;

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/token_vectors.json"
    ))
    .expect("tests/fixtures/token_vectors.json");
    serde_json::from_str(&text).expect("vectors parse")
}

fn purpose_of(s: &str) -> Purpose {
    match s {
        "open" => Purpose::Open,
        "click" => Purpose::Click,
        "unsubscribe" => Purpose::Unsubscribe,
        other => panic!("unknown purpose {other}"),
    }
}

#[test]
fn the_published_token_vectors_mint_and_verify_exactly() {
    let doc = vectors();
    let keys: Vec<(u8, Vec<u8>)> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let key = base64::engine::general_purpose::STANDARD
                .decode(k["key_base64"].as_str().unwrap())
                .unwrap();
            (k["id"].as_u64().unwrap() as u8, key)
        })
        .collect();
    let ring = TokenKeys::new(keys.clone()).unwrap();
    let list = doc["vectors"].as_array().unwrap();
    assert!(list.len() >= 6);
    for v in list {
        let name = v["name"].as_str().unwrap();
        let purpose = purpose_of(v["purpose"].as_str().unwrap());
        let kid = v["key_id"].as_u64().unwrap() as u8;
        let key = &keys.iter().find(|(id, _)| *id == kid).unwrap().1;
        let org = Uuid::parse_str(v["organization_id"].as_str().unwrap()).unwrap();
        let msg = Uuid::parse_str(v["message_id"].as_str().unwrap()).unwrap();
        let url = v["url"].as_str();
        let expected = v["token"].as_str().unwrap();
        assert_eq!(
            token::mint_with(kid, key, purpose, org, msg, url).unwrap(),
            expected,
            "{name}: mint"
        );
        let t = token::verify(&ring, purpose, expected).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (t.key_id, t.organization_id, t.message_id, t.url.as_deref()),
            (kid, org, msg, url),
            "{name}"
        );
    }
}

#[test]
fn the_token_command_prints_tokens_and_urls_and_refuses_unsafe_urls() {
    let org = Uuid::new_v4().to_string();
    let msg = Uuid::new_v4().to_string();
    let run = |args: &[&str]| {
        Command::new(binary())
            .arg("token")
            .args(args)
            .env("REACHLY_TOKEN_KEYS", test_token_keys_arg())
            .output()
            .expect("run token")
    };
    let out = run(&[
        "click",
        "--org-id",
        &org,
        "--message-id",
        &msg,
        "--url",
        "https://example.com/x",
        "--base",
        "https://t.example.com/",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap();
    let t = url
        .trim()
        .strip_prefix("https://t.example.com/c/")
        .expect("a click URL under --base");
    let v = token::verify(&test_token_keys(), Purpose::Click, t).unwrap();
    assert_eq!(v.url.as_deref(), Some("https://example.com/x"));
    assert_eq!(v.message_id.to_string(), msg);
    let out = run(&["open", "--org-id", &org, "--message-id", &msg]);
    assert!(
        token::verify(
            &test_token_keys(),
            Purpose::Open,
            String::from_utf8(out.stdout).unwrap().trim()
        )
        .is_ok()
    );
    let out = run(&[
        "click",
        "--org-id",
        &org,
        "--message-id",
        &msg,
        "--url",
        "javascript:alert(1)",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http(s)"));
}

#[tokio::test]
async fn a_pixel_and_a_click_become_rows_and_move_the_message() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    let r = app.get(&format!("/o/{open}.gif"), Some(BROWSER_UA)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/gif");
    assert_eq!(
        r.headers()["cache-control"],
        "no-store, no-cache, must-revalidate, private, max-age=0"
    );
    assert_eq!(r.headers()["pragma"], "no-cache");
    assert_eq!(r.headers()["expires"], "0");
    assert!(r.bytes().await.unwrap().starts_with(b"GIF89a"));

    let dest = "https://example.com/pricing?plan=pro";
    let click = app.mint(Purpose::Click, &s, Some(dest));
    let r = app.get(&format!("/c/{click}"), Some(BROWSER_UA)).await;
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], dest);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");

    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            s.message
        ),
        2,
    )
    .await;
    let rows = app.events(s.message).await;
    let opened = rows.iter().find(|r| r.event_type == "opened").unwrap();
    let clicked = rows.iter().find(|r| r.event_type == "clicked").unwrap();
    for r in [opened, clicked] {
        assert_eq!(r.organization_id, s.org);
        assert_eq!(
            r.ip_address.as_deref(),
            Some("127.0.0.0"),
            "IPv4 truncated to /24"
        );
        assert_eq!(r.user_agent.as_deref(), Some(BROWSER_UA));
        assert_eq!(r.provider, "reachly");
        assert_eq!(r.metadata.get("machine"), None);
    }
    assert_eq!(clicked.link_url.as_deref(), Some(dest));
    let m = app.message(s.message).await;
    assert_eq!(m.status.as_deref(), Some("clicked"));
    assert_eq!(m.opened_at, Some(opened.created_at));
    assert_eq!(m.clicked_at, Some(clicked.created_at));
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    let r = app
        .http
        .get(app.url(&format!("/o/{open}.gif")))
        .header("user-agent", BROWSER_UA)
        .header("x-forwarded-for", "203.0.113.77")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            s.message
        ),
        1,
    )
    .await;
    assert_eq!(
        app.events(s.message).await[0].ip_address.as_deref(),
        Some("127.0.0.0")
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_from_a_trusted_proxy_and_ip_modes_apply() {
    let app = spawn_app_with(|a| {
        a.tracking.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        a.tracking.ip_mode = reachly_ingest::config::IpMode::Full;
    })
    .await;
    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    app.http
        .get(app.url(&format!("/o/{open}.gif")))
        .header("user-agent", BROWSER_UA)
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.77")
        .send()
        .await
        .unwrap();
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            s.message
        ),
        1,
    )
    .await;
    assert_eq!(
        app.events(s.message).await[0].ip_address.as_deref(),
        Some("203.0.113.77")
    );
}

#[tokio::test]
async fn bad_tokens_get_the_gif_or_a_404_and_write_nothing() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    let click = app.mint(Purpose::Click, &s, Some("https://example.com/"));
    let mut tampered = click.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let other_key = token::mint_with(9, &[7u8; 32], Purpose::Open, s.org, s.message, None).unwrap();

    for bad in ["garbage", &click, &other_key, "", "%00"] {
        let r = app.get(&format!("/o/{bad}.gif"), Some(BROWSER_UA)).await;
        assert_eq!(r.status(), 200, "pixel for {bad:?}");
        assert_eq!(r.headers()["content-type"], "image/gif");
    }
    // A javascript: URL with a valid MAC (a buggy minter elsewhere) is never a redirect.
    let mut raw = vec![1u8, 2, 1];
    raw.extend_from_slice(s.org.as_bytes());
    raw.extend_from_slice(s.message.as_bytes());
    raw.extend_from_slice(b"javascript:alert(document.cookie)");
    let forged = forge_mac(raw);
    for bad in ["garbage", &open, &tampered, &other_key, &forged] {
        let r = app.get(&format!("/c/{bad}"), Some(BROWSER_UA)).await;
        assert_eq!(r.status(), 404, "click for {bad:?}");
        assert!(r.headers().get("location").is_none());
    }
    for bad in [&open, &click] {
        let r = app
            .http
            .post(app.url(&format!("/u/{bad}")))
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            404,
            "an open or click token is not an unsubscribe token"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);
    assert_eq!(app.contact_status(s.contact).await, "active");
    let text = app.metrics_text().await;
    assert_eq!(
        metric_value(&text, r#"reachly_invalid_tokens_total{purpose="open"}"#),
        5.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, r#"reachly_invalid_tokens_total{purpose="click"}"#),
        5.0
    );
}

/// A click token body with a correct MAC under the test key 1.
fn forge_mac(mut raw: Vec<u8>) -> String {
    use hmac::{KeyInit, Mac};
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&TEST_KEY_1).unwrap();
    m.update(&raw);
    let tag = m.finalize().into_bytes();
    raw.extend_from_slice(&tag[..16]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

#[tokio::test]
async fn head_requests_and_scanners_are_recorded_as_machine_and_move_nothing() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    let click = app.mint(Purpose::Click, &s, Some("https://example.com/"));
    let r = app
        .http
        .head(app.url(&format!("/o/{open}.gif")))
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .get(
            &format!("/c/{click}"),
            Some("Mozilla/5.0 (compatible; Barracuda Sentinel)"),
        )
        .await;
    assert_eq!(r.status(), 302, "scanners are redirected too");
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            s.message
        ),
        2,
    )
    .await;
    let rows = app.events(s.message).await;
    for r in &rows {
        assert_eq!(r.metadata["machine"], true, "{r:?}");
    }
    let reasons: Vec<&str> = rows
        .iter()
        .map(|r| r.metadata["machine_reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"head_request") && reasons.contains(&"user_agent:barracuda"),
        "{reasons:?}"
    );
    let m = app.message(s.message).await;
    assert_eq!(m.status.as_deref(), Some("sent"));
    assert_eq!((m.opened_at, m.clicked_at), (None, None));
}

#[tokio::test]
async fn image_proxies_and_phones_named_robot_are_people() {
    let app = spawn_app().await;
    let gmail = app.seed().await;
    let phone = app.seed_message(&gmail).await;
    let gmail_open = app.mint(Purpose::Open, &gmail, None);
    let phone_open = app.mint(Purpose::Open, &phone, None);
    let gmail_ua =
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)";
    // An Android phone whose model name contains "bot": the old substring list flagged it.
    let phone_ua = "Mozilla/5.0 (Linux; Android 10; ROBOT X1 Build/QP1A.190711.020; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/118.0.5993.111 Mobile Safari/537.36";
    for (token, ua) in [(&gmail_open, gmail_ua), (&phone_open, phone_ua)] {
        let r = app.get(&format!("/o/{token}.gif"), Some(ua)).await;
        assert_eq!(r.status(), 200);
    }
    for (s, proxy) in [(gmail, Some("gmail")), (phone, None)] {
        app.wait_count(
            &format!(
                "SELECT count(*) FROM email_events WHERE message_id = '{}'",
                s.message
            ),
            1,
        )
        .await;
        let rows = app.events(s.message).await;
        assert_eq!(rows[0].metadata.get("machine"), None, "{rows:?}");
        assert_eq!(
            rows[0].metadata.get("proxy").and_then(|v| v.as_str()),
            proxy,
            "{rows:?}"
        );
        let m = app.message(s.message).await;
        assert_eq!(
            m.status.as_deref(),
            Some("opened"),
            "a person's open moves the status"
        );
    }
}

#[tokio::test]
async fn apple_mpp_prefetches_from_the_relay_are_machine_and_people_through_it_are_not() {
    // The operator's refresh: Apple's CSV format in, our dated list out, by the real command.
    let dir = temp_dir("relay");
    let apple_csv = dir.join("egress-ip-ranges.csv");
    std::fs::write(
        &apple_csv,
        "172.225.46.0/24,US,US-CA,Los Angeles,\n172.225.47.0/24,US,US-CA,Los Angeles,\n2a02:26f7:b3c0:4000::/64,GB,GB-EN,London,\n",
    )
    .unwrap();
    let list = dir.join("relay.csv");
    let out = std::process::Command::new(binary())
        .args([
            "relay-ranges",
            apple_csv.to_str().unwrap(),
            "--date",
            "2026-11-30",
            "--out",
        ])
        .arg(&list)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 prefixes read, 2 merged ranges"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_to_string(&list).unwrap();
    assert!(written.contains("# date: 2026-11-30") && written.contains("172.225.46.0/23"));

    let app = spawn_app_with(|a| {
        a.tracking.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        a.tracking.relay_ranges_file = Some(list.clone());
    })
    .await;
    let prefetched = app.seed().await;
    let person = app.seed_message(&prefetched).await;
    let elsewhere = app.seed_message(&prefetched).await;
    let safari = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148";
    for (s, ua, ip) in [
        (&prefetched, "Mozilla/5.0", "172.225.47.12"),
        (&person, safari, "172.225.47.12"),
        (&elsewhere, "Mozilla/5.0", "198.51.100.7"),
    ] {
        let open = app.mint(Purpose::Open, s, None);
        let r = app
            .http
            .get(app.url(&format!("/o/{open}.gif")))
            .header("user-agent", ua)
            .header("x-forwarded-for", ip)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for (s, reason, status) in [
        (prefetched, Some("apple_mpp"), "sent"),
        (person, None, "opened"),
        (elsewhere, None, "opened"),
    ] {
        app.wait_count(
            &format!(
                "SELECT count(*) FROM email_events WHERE message_id = '{}'",
                s.message
            ),
            1,
        )
        .await;
        let rows = app.events(s.message).await;
        assert_eq!(
            rows[0]
                .metadata
                .get("machine_reason")
                .and_then(|v| v.as_str()),
            reason,
            "{rows:?}"
        );
        assert_eq!(
            app.message(s.message).await.status.as_deref(),
            Some(status),
            "an MPP prefetch is kept but moves no open status"
        );
    }
    // A list that does not parse is a configuration error before anything binds.
    std::fs::write(&list, "not a prefix,US\n").unwrap();
    let out = std::process::Command::new(binary())
        .args(["serve", "--database-url", "host=x", "--relay-ranges-file"])
        .arg(&list)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
}

#[tokio::test]
async fn one_click_unsubscribe_suppresses_and_a_get_does_not() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let t = app.mint(Purpose::Unsubscribe, &s, None);
    let page = app.get(&format!("/u/{t}"), Some(BROWSER_UA)).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("method=\"post\"") && html.contains("One-Click"),
        "{html}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        app.contact_status(s.contact).await,
        "active",
        "a GET never unsubscribes"
    );
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);

    let r = app
        .http
        .post(app.url(&format!("/u/{t}")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Answered after commit: no waiting needed.
    assert_eq!(app.contact_status(s.contact).await, "unsubscribed");
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("unsubscribed")
    );
    let r = app
        .http
        .post(app.url(&format!("/u/{t}")))
        .body("nothing")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "a POST without the RFC 8058 body is refused"
    );
}

/// Serves `/email` (the HTML in `email`, set once the port is known) and `/landing` (the
/// tracked link's destination), recording every path requested in `hits`.
async fn serve_mail_pages(
    email: std::sync::Arc<std::sync::Mutex<String>>,
    hits: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let html = email.lock().map(|h| h.clone()).unwrap_or_default();
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                if let Ok(mut h) = hits.lock() {
                    h.push(path.to_string());
                }
                let (status, body) = if path.starts_with("/email") {
                    ("200 OK", html)
                } else if path.starts_with("/landing") {
                    ("200 OK", "<!doctype html><html><body><h1>Landed on the campaign page</h1></body></html>".to_string())
                } else {
                    ("404 Not Found", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_real_mail_client_opens_the_email_and_follows_the_link() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is required for this test: install Debian's `chromium` package \
                 (apt-get install chromium); scripts/test.sh installs it when run as root"
            )
        });
    let app = spawn_app().await;
    let s = app.seed().await;
    let email = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let pages = serve_mail_pages(email.clone(), hits.clone()).await;
    let landing = format!("http://{pages}/landing?from=email");
    let open = app.mint(Purpose::Open, &s, None);
    let click = app.mint(Purpose::Click, &s, Some(&landing));
    *email.lock().unwrap() = format!(
        "<!doctype html><html><body><p>Hello!</p>\
         <img src=\"{pixel}\" width=\"1\" height=\"1\" alt=\"\">\
         <p><a id=\"cta\" href=\"{link}\">Read more</a></p>\
         <script>window.addEventListener('load', function () {{ \
           setTimeout(function () {{ document.getElementById('cta').click(); }}, 200); }});</script>\
         </body></html>",
        pixel = app.url(&format!("/o/{open}.gif")),
        link = app.url(&format!("/c/{click}")),
    );
    // The browser runs until the landing page has been requested (headless Chromium's
    // --dump-dom never returns after a script-driven navigation, so it is not used).
    let profile = temp_dir("chromium-profile");
    let err_file = profile.join("stderr.txt");
    let mut browser = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-crash-reporter",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("data").display()
        ))
        .arg(format!("--user-agent={BROWSER_UA}"))
        .arg(format!("http://{pages}/email"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .expect("run chromium");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let landed = loop {
        if hits
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with("/landing?from=email"))
        {
            break true;
        }
        if tokio::time::Instant::now() > deadline || browser.try_wait().unwrap().is_some() {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = browser.kill();
    let _ = browser.wait();
    assert!(
        landed,
        "chromium did not follow the link to the landing page; pages requested: {:?}\nstderr: {}",
        hits.lock().unwrap(),
        std::fs::read_to_string(&err_file).unwrap_or_default()
    );

    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            s.message
        ),
        2,
    )
    .await;
    let rows = app.events(s.message).await;
    let kinds: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    assert!(
        kinds.contains(&"opened") && kinds.contains(&"clicked"),
        "{kinds:?}"
    );
    let clicked = rows.iter().find(|r| r.event_type == "clicked").unwrap();
    assert_eq!(clicked.link_url.as_deref(), Some(landing.as_str()));
    assert!(
        rows.iter().all(|r| r.metadata.get("machine").is_none()),
        "a person's browser is not a machine: {rows:?}"
    );
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("clicked")
    );
}
