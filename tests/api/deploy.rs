//! The deploy artifacts, exercised: the `healthcheck` subcommand the image's HEALTHCHECK
//! runs, the alert rules (`promtool check rules`, `promtool test rules`), every metric the
//! rules and the dashboard name is one a live instance exports, and the Kubernetes manifests
//! (schema-validated by `kubernetes-validate` from PyPI, and checked for the invariants that
//! a schema cannot see: probes on the admin port's paths, timeouts in the right order,
//! hardened security contexts).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::helpers::*;
use crate::observability::{PrometheusServer, app_with_traffic, promtool};

fn healthcheck(admin: &str, extra: &[&str]) -> Output {
    Command::new(binary())
        .arg("healthcheck")
        .args(extra)
        .env("REACHLY_ADMIN_LISTEN", admin)
        .output()
        .expect("run reachly-ingest healthcheck")
}

#[tokio::test]
async fn healthcheck_subcommand_exits_0_when_the_instance_answers_200_and_1_otherwise() {
    let app = spawn_app().await;
    let admin = app.admin_addr.to_string();
    let ok = tokio::task::spawn_blocking(move || healthcheck(&admin, &[]))
        .await
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    // Bound to every interface: the check dials loopback.
    let any = format!("0.0.0.0:{}", app.admin_addr.port());
    let ready = tokio::task::spawn_blocking(move || healthcheck(&any, &["--path", "/readyz"]))
        .await
        .unwrap();
    assert_eq!(ready.status.code(), Some(0), "{ready:?}");

    let closed = format!(
        "127.0.0.1:{}",
        reachly_ingest::pgcluster::free_port().unwrap()
    );
    let down = tokio::task::spawn_blocking(move || healthcheck(&closed, &[]))
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(!down.stderr.is_empty());

    // The public listener answers 404 to /healthz: not healthy.
    let public = app.addr.to_string();
    let wrong = tokio::task::spawn_blocking(move || healthcheck(&public, &[]))
        .await
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
}

#[tokio::test]
async fn healthcheck_of_readiness_fails_while_the_database_is_unreachable() {
    let closed = reachly_ingest::pgcluster::free_port().unwrap();
    let app = spawn_app_with(|a| {
        a.db.database_url = Some(reachly_ingest::config::Secret::new(format!(
            "host=127.0.0.1 port={closed} user=postgres dbname=x"
        )));
        a.db.db_connect_timeout_s = 1;
    })
    .await;
    let admin = app.admin_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        (
            healthcheck(&admin, &[]),
            healthcheck(&admin, &["--path", "/readyz", "--timeout-ms", "5000"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(out.0.status.code(), Some(0), "alive: {:?}", out.0);
    assert_eq!(out.1.status.code(), Some(1), "not ready: {:?}", out.1);
}

#[test]
fn healthcheck_is_listed_in_help() {
    let out = Command::new(binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("healthcheck"), "{help}");
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn alert_rules_and_the_compose_prometheus_config_pass_promtool_and_the_rule_unit_tests() {
    let rules = repo("deploy/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
    let tests = repo("deploy/prometheus/alerts_test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
    let config = repo("deploy/prometheus/prometheus.yml");
    let (ok, out) = promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(ok, "promtool check config:\n{out}");
}

/// Every `reachly_…` name in a text (PromQL in YAML or JSON).
fn reachly_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("reachly_") {
        let start = i + at;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        // The bare prefix is prose ("every reachly_ metric"), not a name.
        if boundary && end > start + "reachly_".len() {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The sample names a scrape can carry: families from `# TYPE`, histograms with their
/// `_bucket`, `_sum` and `_count` series.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

fn dashboard_queries() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/reachly-ingest.json")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

#[tokio::test]
async fn every_metric_the_rules_and_dashboard_name_is_exported_and_prometheus_runs_them() {
    let (app, _) = app_with_traffic().await;
    let exported = exported_names(&app.metrics_text().await);
    let rules = read("deploy/prometheus/alerts.yml");
    let rule_tests = read("deploy/prometheus/alerts_test.yml");
    let dashboard = read("deploy/grafana/reachly-ingest.json");
    for (what, text) in [
        ("alerts.yml", &rules),
        ("alerts_test.yml", &rule_tests),
        ("the dashboard", &dashboard),
    ] {
        let named = reachly_names(text);
        assert!(named.len() > 5, "{what} names too few metrics: {named:?}");
        let missing: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{what} names metrics the service does not export: {missing:?}\nexported: {exported:?}"
        );
    }

    // A real Prometheus loads the rules and evaluates them against the live instance, and
    // every dashboard query is valid PromQL that it runs.
    let prom = PrometheusServer::start(app.admin_addr, Some(&repo("deploy/prometheus/alerts.yml")));
    let client = http_client();
    prom.wait_for(&client, r#"up{job="reachly-ingest"}"#, 1.0)
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = prom.api(&client, "/api/v1/rules", &[]).await;
        let rules: Vec<serde_json::Value> = v
            .as_ref()
            .and_then(|v| v["data"]["groups"][0]["rules"].as_array().cloned())
            .unwrap_or_default();
        let evaluated = rules.len() == 15
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z");
        if evaluated {
            // Nothing is wrong with this instance: no alert may be firing or pending.
            let active: Vec<&serde_json::Value> =
                rules.iter().filter(|r| r["state"] != "inactive").collect();
            assert!(
                active.is_empty(),
                "alerts active on a healthy instance: {active:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rules not all loaded and evaluated: {v:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for expr in dashboard_queries() {
        let q = expr.replace("$__rate_interval", "1m");
        let v = prom.api(&client, "/api/v1/query", &[("query", &q)]).await;
        assert_eq!(
            v.as_ref().map(|v| v["status"].clone()),
            Some(serde_json::json!("success")),
            "dashboard query `{q}`: {v:?}"
        );
    }
}
