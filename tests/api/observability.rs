//! What an operator sees: a live instance's `/metrics` after real traffic passes
//! `promtool check metrics`, known series exist at zero before anything happened, the new
//! gauges carry the figures they promise, and Debian's real Prometheus scrapes the instance
//! and answers a query with a value this test's traffic caused.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package; `scripts/test.sh`
//! installs it when missing, otherwise these tests fail saying what to install.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reachly_ingest::config::Secret;
use reachly_ingest::token::Purpose;

use crate::helpers::*;

/// The absolute path of a Debian `prometheus` package tool, or a failure saying how to get it.
pub fn prometheus_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: run `apt-get install prometheus` (scripts/test.sh does it when run as root)"
        )
    })
}

/// Runs `promtool ARGS` with `stdin`; returns (success, stdout + stderr).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(prometheus_tool("promtool"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).expect("write to promtool");
    }
    drop(pipe);
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An app with Mailgun configured, and traffic of every kind the dashboards show: a valid
/// pixel (written), a bad pixel token, a webhook with a bad signature.
pub async fn app_with_traffic() -> (TestApp, Seeded) {
    let app = spawn_app_with(|a| {
        a.webhooks.mailgun_signing_key = Some(Secret::new("key-observability-test"));
    })
    .await;
    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    assert_eq!(
        app.get(&format!("/o/{open}.gif"), Some(BROWSER_UA))
            .await
            .status(),
        200
    );
    let _ = app.get("/o/not-a-token.gif", Some(BROWSER_UA)).await;
    let bad = r#"{"signature":{"timestamp":"1","token":"x","signature":"00"},"event-data":{}}"#;
    let r = app
        .post_webhook("mailgun", &[("content-type", "application/json")], bad)
        .await;
    assert_eq!(r.status(), 401);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    (app, s)
}

#[tokio::test]
async fn metrics_of_a_live_instance_after_traffic_pass_promtool_check_metrics() {
    let (app, _) = app_with_traffic().await;
    let text = app.metrics_text().await;
    assert!(text.contains("reachly_events_written_total"), "{text}");
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(
        ok,
        "promtool check metrics failed:\n{out}\n--- scraped:\n{text}"
    );
    assert!(out.trim().is_empty(), "promtool has lint findings:\n{out}");
}

#[tokio::test]
async fn known_series_are_exported_at_zero_from_the_start() {
    let app = spawn_app().await;
    let text = app.metrics_text().await;
    for provider in reachly_ingest::metrics::PROVIDERS {
        let s = format!(r#"reachly_webhook_auth_failures_total{{provider="{provider}"}}"#);
        assert!(text.contains(&format!("{s} 0\n")), "{s} missing:\n{text}");
    }
    for reason in reachly_ingest::metrics::DROP_REASONS {
        let s = format!(r#"reachly_events_dropped_total{{reason="{reason}"}}"#);
        assert!(text.contains(&format!("{s} 0\n")), "{s} missing:\n{text}");
    }
    for purpose in ["open", "click", "unsubscribe"] {
        let s = format!(r#"reachly_invalid_tokens_total{{purpose="{purpose}"}}"#);
        assert!(text.contains(&format!("{s} 0\n")), "{s} missing:\n{text}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric_value(
            &text,
            &format!(r#"reachly_build_info{{version="{version}"}}"#)
        ),
        1.0
    );
    assert!(metric_value(&text, "reachly_process_resident_memory_bytes") > 1e6);
    assert!(metric_value(&text, "reachly_process_open_fds") >= 3.0);
}

#[tokio::test]
async fn gauges_report_bounds_pool_database_flush_time_and_partition_horizon() {
    let before = chrono::Utc::now().timestamp() as f64;
    let app = spawn_app_with(|a| {
        a.pipeline.buffer_max_events = 1234;
        a.pipeline.buffer_max_bytes = 4_321_000;
        a.pipeline.flush_max_events = 100;
        a.pipeline.spool_max_bytes = 5_000_000;
        a.db.pool_size = 3;
    })
    .await;
    let text = app.metrics_text().await;
    assert_eq!(
        metric_value(&text, "reachly_buffer_capacity_events"),
        1234.0
    );
    assert_eq!(
        metric_value(&text, "reachly_buffer_capacity_bytes"),
        4_321_000.0
    );
    assert_eq!(metric_value(&text, "reachly_buffer_bytes"), 0.0);
    assert_eq!(metric_value(&text, "reachly_spool_capacity_bytes"), 5e6);
    assert_eq!(metric_value(&text, "reachly_db_pool_max_connections"), 3.0);
    assert_eq!(metric_value(&text, "reachly_database_up"), 1.0, "{text}");
    assert_eq!(
        metric_value(&text, "reachly_last_flush_timestamp_seconds"),
        0.0,
        "nothing committed yet"
    );
    assert_eq!(
        metric_value(&text, "reachly_buffer_oldest_event_age_seconds"),
        0.0
    );
    // The first maintenance round made today + 7 days; the horizon is the end of the last.
    let horizon = metric_value(&text, "reachly_partition_horizon_timestamp_seconds");
    let days_ahead = (horizon - before) / 86_400.0;
    assert!(
        (7.0..=8.0).contains(&days_ahead),
        "horizon {days_ahead} days ahead"
    );

    let s = app.seed().await;
    let open = app.mint(Purpose::Open, &s, None);
    app.get(&format!("/o/{open}.gif"), Some(BROWSER_UA)).await;
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    let text = app.metrics_text().await;
    let flushed = metric_value(&text, "reachly_last_flush_timestamp_seconds");
    assert!(
        flushed >= before && flushed <= chrono::Utc::now().timestamp() as f64 + 1.0,
        "last flush {flushed}, test began {before}"
    );
    let in_use = metric_value(&text, r#"reachly_db_pool_connections{state="in_use"}"#);
    let idle = metric_value(&text, r#"reachly_db_pool_connections{state="idle"}"#);
    assert!(
        in_use + idle >= 1.0 && in_use + idle <= 3.0,
        "{in_use} + {idle}"
    );
}

#[tokio::test]
async fn database_up_is_0_and_the_held_batch_ages_while_the_database_is_down() {
    let cluster = PrivateCluster::start().await;
    let app = spawn_app_on(
        &cluster.url,
        |a| a.db.connect_timeout = std::time::Duration::from_secs(1),
        None,
    )
    .await;
    let s = app.seed().await;
    assert_eq!(app.metric("reachly_database_up").await, 1.0);
    cluster.stop().await;
    let open = app.mint(Purpose::Open, &s, None);
    app.get(&format!("/o/{open}.gif"), Some(BROWSER_UA)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = app.metrics_text().await;
        let age = metric_value(&text, "reachly_buffer_oldest_event_age_seconds");
        if metric_value(&text, "reachly_database_up") == 0.0 && age >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "never saw the outage:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.start_again().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.metric("reachly_database_up").await != 1.0 {
        assert!(Instant::now() < deadline, "database_up never returned to 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Debian's Prometheus server on a free port, scraping `target` every second (and loading
/// `rules`, if given), with its configuration and storage in a temp dir; killed on drop.
pub struct PrometheusServer {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl PrometheusServer {
    pub fn start(
        target: std::net::SocketAddr,
        rules: Option<&std::path::Path>,
    ) -> PrometheusServer {
        let bin = prometheus_tool("prometheus");
        let dir = temp_dir("prometheus");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: reachly-ingest\n    scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
        );
        if let Some(rules) = rules {
            std::fs::copy(rules, dir.join("rules.yml")).expect("copy rules");
            config.push_str("rule_files:\n  - rules.yml\n");
        }
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        let port = reachly_ingest::pgcluster::free_port().expect("free port");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        PrometheusServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The JSON answer of an API call (`/api/v1/...` with query parameters).
    pub async fn api(
        &self,
        client: &reqwest::Client,
        path: &str,
        params: &[(&str, &str)],
    ) -> Option<serde_json::Value> {
        let url = url::Url::parse_with_params(&format!("{}{path}", self.url), params).ok()?;
        let r = client.get(url).send().await.ok()?;
        serde_json::from_str(&r.text().await.ok()?).ok()
    }

    /// The value of an instant query's first sample, if it has one.
    pub async fn query(&self, client: &reqwest::Client, promql: &str) -> Option<f64> {
        let v = self
            .api(client, "/api/v1/query", &[("query", promql)])
            .await?;
        let s = v["data"]["result"][0]["value"][1].as_str()?;
        s.parse().ok()
    }

    /// Waits (at most a minute) until `promql` gives `want`.
    pub async fn wait_for(&self, client: &reqwest::Client, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(client, promql).await;
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "Prometheus never answered {want} to `{promql}` (last: {last:?}); its log:\n{}",
            self.log()
        );
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_instance_and_reads_back_what_the_traffic_did() {
    let (app, s) = app_with_traffic().await;
    let prom = PrometheusServer::start(app.admin_addr, None);
    let client = http_client();
    prom.wait_for(&client, r#"up{job="reachly-ingest"}"#, 1.0)
        .await;
    prom.wait_for(
        &client,
        r#"reachly_events_written_total{type="opened"}"#,
        1.0,
    )
    .await;
    prom.wait_for(
        &client,
        r#"reachly_webhook_auth_failures_total{provider="mailgun"}"#,
        1.0,
    )
    .await;
    // More traffic moves the series Prometheus keeps: two more opens.
    let open = app.mint(Purpose::Open, &s, None);
    for _ in 0..2 {
        app.get(&format!("/o/{open}.gif"), Some(BROWSER_UA)).await;
    }
    prom.wait_for(
        &client,
        r#"reachly_events_received_total{type="opened",source="pixel"}"#,
        3.0,
    )
    .await;
}
