//! The binary as a process: invalid configuration, `--help`, SIGTERM with a request in
//! flight, and `reachly-ingest dev` on a fresh directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reachly_ingest::token::Purpose;

use crate::helpers::*;

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

async fn wait_http_ok(url: &str) {
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match client.get(url).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status() == 200 => return,
            Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => format!("{e:?}"),
        };
        if Instant::now() > deadline {
            eprintln!("{url} never answered 200; last: {last}");
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn an_invalid_value_is_one_line_and_exit_code_64() {
    for (args, needle) in [
        (
            vec![
                "serve",
                "--database-url",
                "host=x",
                "--listen",
                "not-an-address",
            ],
            "--listen",
        ),
        (
            vec![
                "serve",
                "--database-url",
                "host=x",
                "--ip-mode",
                "sometimes",
            ],
            "--ip-mode",
        ),
        (
            vec![
                "serve",
                "--database-url",
                "host=x",
                "--token-keys",
                "1:c2hvcnQ=",
            ],
            "--token-keys",
        ),
        (
            vec![
                "serve",
                "--database-url",
                "host=x",
                "--background-nice",
                "20",
            ],
            "--background-nice",
        ),
        (vec!["serve"], "DATABASE_URL"),
    ] {
        let out = Command::new(binary())
            .args(&args)
            .env_remove("DATABASE_URL")
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn help_lists_every_option_with_its_environment_name() {
    let out = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "DATABASE_URL",
        "REACHLY_DB_POOL_SIZE",
        "REACHLY_DB_CA_FILE",
        "REACHLY_LISTEN",
        "REACHLY_ADMIN_LISTEN",
        "REACHLY_TOKEN_KEYS",
        "REACHLY_BUFFER_MAX_EVENTS",
        "REACHLY_BUFFER_MAX_BYTES",
        "REACHLY_FLUSH_INTERVAL_MS",
        "REACHLY_FLUSH_MAX_EVENTS",
        "REACHLY_WRITERS",
        "REACHLY_BACKGROUND_NICE",
        "REACHLY_SPOOL_DIR",
        "REACHLY_SPOOL_MAX_BYTES",
        "REACHLY_PARTITION_PREMAKE_DAYS",
        "REACHLY_EVENT_RETENTION_DAYS",
        "REACHLY_IP_MODE",
        "REACHLY_TRUSTED_PROXIES",
        "REACHLY_LOG_FORMAT",
        "REACHLY_SHUTDOWN_TIMEOUT_S",
        "REACHLY_WEBHOOK_MAX_BYTES",
        "REACHLY_SENDGRID_PUBLIC_KEY",
        "REACHLY_MAILGUN_SIGNING_KEY",
        "REACHLY_SES_TOPIC_ARNS",
        "REACHLY_POSTMARK_BASIC_AUTH",
        "REACHLY_SPARKPOST_BASIC_AUTH",
        "REACHLY_SPARKPOST_TOKEN",
        "REACHLY_MANDRILL_WEBHOOK_KEY",
        "REACHLY_RESEND_WEBHOOK_SECRET",
    ] {
        assert!(help.contains(&format!("env: {env}")), "--help lacks {env}");
    }
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let url = fresh_database().await;
    let db = connect(&url).await;
    let s = seed_tenant(&db).await;
    let token = reachly_ingest::token::mint(
        &test_token_keys(),
        Purpose::Unsubscribe,
        s.org,
        s.message,
        None,
    )
    .unwrap();
    let service = ServeProcess::spawn(
        &url,
        &temp_dir("sigterm-spool"),
        &[("REACHLY_MIGRATE_ON_START", "false")],
    );
    service.wait_admin_ok("/healthz").await;
    let port = service.public.port();

    let body = "List-Unsubscribe=One-Click";
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        conn,
        "POST /u/{token} HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        &body[..10]
    )
    .unwrap();
    conn.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    service.signal("-TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no new connections after SIGTERM"
    );
    conn.write_all(&body.as_bytes()[10..]).unwrap();
    let mut response = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.read_to_string(&mut response).expect("read response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(service.wait(Duration::from_secs(20)).await, Some(0));
    assert_eq!(
        message_row(&db, s.message).await.status.as_deref(),
        Some("unsubscribed")
    );
    let contact: String = db
        .query_one("SELECT status FROM contacts WHERE id = $1", &[&s.contact])
        .await
        .unwrap()
        .get(0);
    assert_eq!(contact, "unsubscribed");
}

#[tokio::test]
async fn dev_on_a_fresh_directory_prints_demo_urls_and_serves() {
    let dir = temp_dir("dev");
    let mut child = Command::new(binary())
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(&dir)
        .env_remove("DATABASE_URL")
        .env_remove("REACHLY_TOKEN_KEYS")
        .env_remove("REACHLY_SPOOL_DIR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("dev.log")).unwrap())
        .spawn()
        .expect("spawn dev");
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.unwrap_or_default();
            let done = line.trim_start().starts_with("metrics:");
            seen.push(line);
            if done {
                break;
            }
        }
        // Keep draining, as a terminal would.
        std::thread::spawn(move || lines.for_each(drop));
        seen
    });
    let lines = tokio::time::timeout(Duration::from_secs(120), lines)
        .await
        .expect("banner within 2 min")
        .unwrap();
    let find = |label: &str| {
        lines
            .iter()
            .find_map(|l| {
                l.trim_start()
                    .strip_prefix(label)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| panic!("no `{label}` line in {lines:#?}"))
    };
    let pixel = find("open pixel:");
    let click = find("click:");
    let health = find("metrics:").replace("/metrics", "/healthz");
    if tokio::time::timeout(Duration::from_secs(40), wait_http_ok(&health))
        .await
        .is_err()
        || child.try_wait().unwrap().is_some()
    {
        panic!(
            "dev is not serving; exit: {:?}; its log:\n{}",
            child.try_wait(),
            std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default()
        );
    }
    let client = http_client();
    let r = client
        .get(&pixel)
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/gif");
    let r = client
        .get(&click)
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        "https://example.com/welcome?from=reachly"
    );
    signal(&child, "-INT");
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(60)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !dir.join(".reachly/pgdata/postmaster.pid").exists(),
        "the private cluster was stopped"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The binary's compiled-in jemalloc options take effect: freed memory is returned to the
/// OS by jemalloc's background thread (named `jemalloc_bg_thd`), not inline in a request or
/// a writer. Were the `_rjem_malloc_conf` symbol misnamed or mistyped, jemalloc would
/// ignore it silently and no such thread would run.
#[tokio::test(flavor = "multi_thread")]
async fn the_allocator_returns_freed_memory_from_a_background_thread() {
    let url = fresh_database().await;
    let service = ServeProcess::spawn(&url, &temp_dir("jemalloc-spool"), &[]);
    service.wait_admin_ok("/healthz").await;
    let pid = service.child.id();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task");
    let names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == "jemalloc_bg_thd"),
        "no jemalloc background thread among the service's threads: {names:?}"
    );
    service.kill9();
}
