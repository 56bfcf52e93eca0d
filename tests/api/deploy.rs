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
async fn healthcheck_of_readiness_fails_while_the_database_is_unreachable_and_the_spool_is_full() {
    let closed = reachly_ingest::pgcluster::free_port().unwrap();
    let app = spawn_app_with(|a| {
        a.db.database_url = Some(reachly_ingest::config::Secret::new(format!(
            "host=127.0.0.1 port={closed} user=postgres dbname=x"
        )));
        a.db.connect_timeout = std::time::Duration::from_secs(1);
        // No spool room either: a database outage alone keeps an instance ready (SPEC.md),
        // an outage with nowhere to put events does not.
        a.pipeline.spool_max_bytes = 0;
    })
    .await;
    // One event for the writers to try: they learn that the database is down.
    let open = reachly_ingest::token::mint(
        &test_token_keys(),
        reachly_ingest::token::Purpose::Open,
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        None,
    )
    .unwrap();
    assert_eq!(app.get(&format!("/o/{open}.gif"), None).await.status(), 200);
    let admin = app.admin_addr.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let admin = admin.clone();
        let out = tokio::task::spawn_blocking(move || {
            (
                healthcheck(&admin, &[]),
                healthcheck(&admin, &["--path", "/readyz", "--timeout-ms", "5000"]),
            )
        })
        .await
        .unwrap();
        if out.1.status.code() == Some(1) || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
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

/// The `kubernetes-validate` command (PyPI), or a failure saying how to get it.
fn kubernetes_validate() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("kubernetes-validate"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`kubernetes-validate` is not installed: run `pip install kubernetes-validate` (scripts/test.sh does it when pip is there)"
            )
        })
}

const MANIFESTS: &[&str] = &[
    "deploy/k8s/reachly-ingest.yaml",
    "deploy/k8s/migrate-job.yaml",
    "deploy/k8s/secret.example.yaml",
    "deploy/k8s/servicemonitor.yaml",
];

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .args(MANIFESTS.iter().map(|m| repo(m)))
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate:\n{text}");
    // Every built-in kind was checked (only the ServiceMonitor CRD has no bundled schema).
    for kind in [
        "statefulset/reachly-ingest",
        "service/reachly-ingest",
        "service/reachly-ingest-admin",
        "poddisruptionbudget/reachly-ingest",
        "networkpolicy/reachly-ingest",
        "job/reachly-ingest-migrate",
        "secret/reachly-ingest",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind} ")),
            "{kind} not validated:\n{text}"
        );
    }
}

type Doc = serde_yaml::Value;

fn documents() -> Vec<Doc> {
    let mut docs = Vec::new();
    for m in MANIFESTS {
        for d in serde_yaml::Deserializer::from_str(&read(m)) {
            let v = Doc::deserialize(d).unwrap_or_else(|e| panic!("{m}: {e}"));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env_of<'a>(container: &'a Doc, name: &str) -> Option<&'a str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

fn num(v: Option<&str>, what: &str) -> u64 {
    v.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what} is not set to a number"))
}

fn port_of(listen: Option<&str>, what: &str) -> u64 {
    num(listen.and_then(|l| l.rsplit(':').next()), what)
}

fn assert_hardened(pod: &Doc, container: &Doc, what: &str) {
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true),
        "{what}: runAsNonRoot"
    );
    assert!(
        pod["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u > 0),
        "{what}: runAsUser"
    );
    let sc = &container["securityContext"];
    assert_eq!(
        sc["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{what}: read-only root"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{what}: escalation"
    );
    let drops: Vec<&str> = sc["capabilities"]["drop"]
        .as_sequence()
        .map(|s| s.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(drops.contains(&"ALL"), "{what}: capabilities drop ALL");
}

fn labels_match(selector: &Doc, labels: &Doc) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

use serde::Deserialize as _;

#[test]
fn kubernetes_manifests_keep_probes_ports_timeouts_security_and_pool_sizing_in_order() {
    let docs = documents();
    let sts = find(&docs, "StatefulSet", "reachly-ingest");
    let pod = &sts["spec"]["template"]["spec"];
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let c = &pod["containers"][0];
    assert_hardened(pod, c, "StatefulSet");

    // Ports: the container ports are the ports the service listens on.
    let ports: Vec<(&str, u64)> = c["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["containerPort"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let admin = port_of(env_of(c, "REACHLY_ADMIN_LISTEN"), "REACHLY_ADMIN_LISTEN");
    let public = port_of(env_of(c, "REACHLY_LISTEN"), "REACHLY_LISTEN");
    assert!(
        ports.contains(&("admin", admin)),
        "{ports:?} vs admin {admin}"
    );
    assert!(
        ports.contains(&("public", public)),
        "{ports:?} vs public {public}"
    );

    // Probes: on the admin port, readiness on /readyz, liveness and startup on /healthz.
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"].as_str(), Some("admin"), "{probe} port");
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
    }

    // Timeouts: request < drain; grace > preStop + HTTP drain + pipeline drain.
    let request_ms = num(
        env_of(c, "REACHLY_REQUEST_TIMEOUT_MS"),
        "REACHLY_REQUEST_TIMEOUT_MS",
    );
    let body_ms = num(
        env_of(c, "REACHLY_BODY_TIMEOUT_MS"),
        "REACHLY_BODY_TIMEOUT_MS",
    );
    let drain_s = num(
        env_of(c, "REACHLY_SHUTDOWN_TIMEOUT_S"),
        "REACHLY_SHUTDOWN_TIMEOUT_S",
    );
    let grace_s = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    let pre_stop_s: u64 = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .and_then(|cmd| cmd.get(1))
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        body_ms <= request_ms,
        "body timeout {body_ms} ms > request timeout {request_ms} ms"
    );
    assert!(
        request_ms < drain_s * 1000,
        "request timeout {request_ms} ms >= drain {drain_s} s"
    );
    assert!(
        grace_s > pre_stop_s + 2 * drain_s,
        "grace {grace_s} s <= preStop {pre_stop_s} s + 2 x drain {drain_s} s"
    );

    // Database TLS: the CA file is mounted where REACHLY_DB_CA_FILE points.
    let ca = env_of(c, "REACHLY_DB_CA_FILE").expect("REACHLY_DB_CA_FILE");
    let mounted = c["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .any(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| ca.starts_with(&format!("{p}/")))
        });
    assert!(mounted, "{ca} is not under a volume mount");
    let secret = find(&docs, "Secret", "reachly-ingest");
    for key in ["DATABASE_URL", "MIGRATE_DATABASE_URL"] {
        let url = secret["stringData"][key].as_str().expect(key);
        assert!(
            url.contains("sslmode=require") || url.contains("sslmode=verify-full"),
            "{key}: {url}"
        );
        assert!(!url.contains("sslmode=disable"), "{key}: {url}");
    }

    // The migrate Job: hardened, migrate subcommand, same CA.
    let job = find(&docs, "Job", "reachly-ingest-migrate");
    let jpod = &job["spec"]["template"]["spec"];
    let jc = &jpod["containers"][0];
    assert_hardened(jpod, jc, "migrate Job");
    assert_eq!(jc["args"][0].as_str(), Some("migrate"));
    assert_eq!(env_of(jc, "REACHLY_DB_CA_FILE"), Some(ca));
    assert_eq!(env_of(c, "REACHLY_MIGRATE_ON_START"), Some("false"));

    // Services: the public one never carries the admin port; the ServiceMonitor finds the
    // admin port through the headless one.
    let public_svc = find(&docs, "Service", "reachly-ingest");
    let targets: Vec<&str> = public_svc["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["targetPort"].as_str())
        .collect();
    assert_eq!(targets, ["public"]);
    let admin_svc = find(&docs, "Service", "reachly-ingest-admin");
    assert_eq!(
        sts["spec"]["serviceName"].as_str(),
        Some("reachly-ingest-admin")
    );
    let sm = find(&docs, "ServiceMonitor", "reachly-ingest");
    assert!(labels_match(
        &sm["spec"]["selector"]["matchLabels"],
        &admin_svc["metadata"]["labels"]
    ));
    let sm_port = sm["spec"]["endpoints"][0]["port"].as_str().expect("port");
    assert!(
        admin_svc["spec"]["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .any(|p| p["name"].as_str() == Some(sm_port)
                && p["targetPort"].as_str() == Some("admin"))
    );
    assert_eq!(
        sm["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
    for (kind, name) in [
        ("Service", "reachly-ingest"),
        ("Service", "reachly-ingest-admin"),
    ] {
        assert!(
            labels_match(&find(&docs, kind, name)["spec"]["selector"], pod_labels),
            "{name}"
        );
    }

    // PDB and NetworkPolicy select the pods; the admin port only from monitoring.
    let pdb = find(&docs, "PodDisruptionBudget", "reachly-ingest");
    assert!(labels_match(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let np = find(&docs, "NetworkPolicy", "reachly-ingest");
    assert!(labels_match(
        &np["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    let rules = np["spec"]["ingress"].as_sequence().expect("ingress");
    for rule in rules {
        let opens_admin = rule["ports"]
            .as_sequence()
            .is_some_and(|ps| ps.iter().any(|p| p["port"].as_u64() == Some(admin)));
        if opens_admin {
            let from = rule["from"]
                .as_sequence()
                .expect("admin port rule without `from`");
            assert!(from.iter().all(|f| {
                f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str()
                    == Some("monitoring")
            }));
        }
    }
    assert!(
        rules
            .iter()
            .any(|r| r["from"].is_null() && r["ports"][0]["port"].as_u64() == Some(public))
    );

    // Pool sizing: every replica's pool fits in PgBouncer's pool.
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    let pool = num(env_of(c, "REACHLY_DB_POOL_SIZE"), "REACHLY_DB_POOL_SIZE");
    let ini = read("deploy/pgbouncer/pgbouncer.ini");
    let setting = |key: &str| {
        ini.lines()
            .filter(|l| !l.trim_start().starts_with(';'))
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("pgbouncer.ini has no {key}"))
    };
    assert_eq!(setting("pool_mode"), "transaction");
    let pooler: u64 = setting("default_pool_size").parse().expect("number");
    assert!(
        replicas * pool <= pooler,
        "{replicas} replicas x pool {pool} > PgBouncer default_pool_size {pooler}"
    );
    let max_db: u64 = setting("max_db_connections").parse().expect("number");
    let reserve: u64 = setting("reserve_pool_size").parse().expect("number");
    assert!(pooler + reserve <= max_db);
}

#[test]
fn every_variable_the_deploy_files_set_is_one_the_service_reads() {
    let help = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for file in [
        "deploy/k8s/reachly-ingest.yaml",
        "deploy/k8s/migrate-job.yaml",
        "deploy/k8s/secret.example.yaml",
        "deploy/compose.yaml",
        "deploy/Dockerfile",
    ] {
        let text = read(file);
        let mut i = 0;
        while let Some(at) = text[i..].find("REACHLY_") {
            let start = i + at;
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .map_or(text.len(), |e| start + e);
            let var = &text[start..end];
            // `[env: NAME=value]`, or `[env: NAME]` for secrets (values hidden).
            let listed =
                help.contains(&format!("env: {var}=")) || help.contains(&format!("env: {var}]"));
            assert!(listed, "{file} sets {var}, which `serve` does not read");
            i = end;
        }
    }
}

#[test]
fn the_image_has_a_healthcheck_and_the_build_context_leaves_target_out() {
    let dockerfile = read("deploy/Dockerfile");
    let healthcheck = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(healthcheck.contains("\"healthcheck\""), "{healthcheck}");
    let ignore = read(".dockerignore");
    for must in ["target/", ".git/", ".reachly/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == must),
            ".dockerignore lacks {must}"
        );
    }
}

/// `key=value` pairs of a libpq keyword string.
fn libpq_keywords(url: &str) -> std::collections::HashMap<String, String> {
    url.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// Debian's PgBouncer running the shipped `pgbouncer.ini` with only what a test must change
/// rewritten: the addresses (a free port, the test server), the userlist path and client TLS
/// (no certificate here). Killed on drop.
struct PgBouncer {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    fn start(server_host: &str, server_port: &str, password: &str) -> PgBouncer {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!("`pgbouncer` is not installed: run `apt-get install pgbouncer` (scripts/test.sh does it when run as root)")
            });
        let dir = temp_dir("pgbouncer");
        let port = reachly_ingest::pgcluster::free_port().expect("free port");
        let mut ini = String::new();
        for line in read("deploy/pgbouncer/pgbouncer.ini").lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            let line = match key {
                "reachly" => format!("* = host={server_host} port={server_port}"),
                "listen_addr" => "listen_addr = 127.0.0.1".into(),
                "listen_port" => format!("listen_port = {port}"),
                "auth_file" => format!("auth_file = {}", dir.join("userlist.txt").display()),
                "client_tls_sslmode" => "client_tls_sslmode = disable".into(),
                "client_tls_key_file" | "client_tls_cert_file" => String::new(),
                _ => line.to_string(),
            };
            ini.push_str(&line);
            ini.push('\n');
        }
        ini.push_str(&format!("unix_socket_dir = {}\n", dir.display()));
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("write ini");
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{password}\"\n\"pgbouncer_admin\" \"{password}\"\n"),
        )
        .expect("write userlist");
        let log = std::fs::File::create(dir.join("pgbouncer.log")).expect("log");
        // PgBouncer refuses to run as root, like PostgreSQL: run it as `postgres` directly
        // (not through runuser, whose SIGKILL would leave PgBouncer running).
        let mut cmd = Command::new(&bin);
        if reachly_ingest::pgcluster::running_as_root() {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("postgres user id")
            };
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(ok.success());
            use std::os::unix::process::CommandExt as _;
            cmd.uid(id("-u")).gid(id("-g"));
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pgbouncer");
        PgBouncer { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// Connects (simple-query only: PgBouncer's console and transaction pooling both allow it).
    async fn connect(&self, dbname: &str, user: &str, password: &str) -> tokio_postgres::Client {
        let url = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={dbname} sslmode=disable",
            self.port
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    return client;
                }
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("cannot connect through PgBouncer: {e}\n{}", self.log())
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn simple_rows(
    msgs: Vec<tokio_postgres::SimpleQueryMessage>,
) -> Vec<tokio_postgres::SimpleQueryRow> {
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_shipped_pgbouncer_ini_runs_in_debians_pgbouncer_with_scram_and_transaction_pooling() {
    let db_url = fresh_database().await;
    let kw = libpq_keywords(&db_url);
    let (host, port, dbname) = (&kw["host"], &kw["port"], &kw["dbname"]);
    let password = kw
        .get("password")
        .cloned()
        .unwrap_or_else(|| "reachly-test".into());
    let bouncer = PgBouncer::start(host, port, &password);

    // A client authenticates with SCRAM and its queries reach the server.
    let client = bouncer.connect(dbname, "postgres", &password).await;
    let rows = simple_rows(
        client
            .simple_query("SELECT count(*) FROM email_events")
            .await
            .unwrap_or_else(|e| panic!("query through PgBouncer: {e}\n{}", bouncer.log())),
    );
    assert_eq!(rows[0].get(0), Some("0"));
    // A wrong password is refused.
    let wrong = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres password=wrong dbname={dbname} sslmode=disable",
            bouncer.port
        ),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(wrong.is_err(), "a wrong password was accepted");

    // The settings in force are the shipped ones.
    let console = bouncer
        .connect("pgbouncer", "pgbouncer_admin", &password)
        .await;
    let config = simple_rows(
        console
            .simple_query("SHOW CONFIG")
            .await
            .expect("SHOW CONFIG"),
    );
    let setting = |key: &str| {
        config
            .iter()
            .find(|r| r.get(0) == Some(key))
            .and_then(|r| r.get(1).map(str::to_string))
            .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))
    };
    assert_eq!(setting("pool_mode"), "transaction");
    assert_eq!(setting("default_pool_size"), "10");
    assert_eq!(setting("query_wait_timeout"), "15");
    assert_eq!(setting("auth_type"), "scram-sha-256");
    let pools = simple_rows(
        console
            .simple_query("SHOW POOLS")
            .await
            .expect("SHOW POOLS"),
    );
    assert!(
        pools
            .iter()
            .any(|r| r.get(0) == Some(dbname.as_str()) && r.get(1) == Some("postgres")),
        "no pool for {dbname}"
    );
}

/// A duration of compose's form (`45s`, `2m`) in seconds.
fn compose_seconds(v: &str) -> u64 {
    if let Some(s) = v.strip_suffix('s') {
        s.parse().expect("seconds")
    } else if let Some(m) = v.strip_suffix('m') {
        m.parse::<u64>().expect("minutes") * 60
    } else {
        panic!("unexpected duration {v}")
    }
}

#[test]
fn the_compose_stack_mounts_files_that_exist_and_keeps_timeouts_and_pool_in_order() {
    let compose: Doc = serde_yaml::from_str(&read("deploy/compose.yaml")).expect("compose YAML");
    let services = &compose["services"];
    for name in [
        "postgres",
        "pgbouncer",
        "migrate",
        "reachly-ingest",
        "prometheus",
        "grafana",
    ] {
        assert!(services.get(name).is_some(), "compose has no {name}");
    }
    // Every bind mount and build context names something in deploy/.
    for (name, svc) in services.as_mapping().expect("services") {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let src = v.as_str().and_then(|v| v.split(':').next()).unwrap_or("");
            if src.starts_with("./") {
                assert!(
                    repo("deploy").join(src).exists(),
                    "{name:?} mounts missing {src}"
                );
            }
        }
        if let Some(ctx) = svc["build"]["context"].as_str() {
            let file = svc["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
            let dir = repo("deploy").join(ctx);
            assert!(
                dir.join(file).is_file(),
                "{name:?}: no {file} in {}",
                dir.display()
            );
        }
    }
    let app = &services["reachly-ingest"]["environment"];
    let env = |k: &str| {
        app[k]
            .as_str()
            .unwrap_or_else(|| panic!("compose sets no {k}"))
    };
    let request_ms: u64 = env("REACHLY_REQUEST_TIMEOUT_MS").parse().expect("ms");
    let drain_s: u64 = env("REACHLY_SHUTDOWN_TIMEOUT_S").parse().expect("s");
    let grace = compose_seconds(
        services["reachly-ingest"]["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period"),
    );
    assert!(request_ms < drain_s * 1000 && grace > 2 * drain_s);
    // The service reaches PgBouncer on its port, within PgBouncer's pool.
    let url = libpq_keywords(env("DATABASE_URL"));
    let ini = read("deploy/pgbouncer/pgbouncer.ini");
    let setting = |key: &str| -> String {
        ini.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(url["host"], "pgbouncer");
    assert_eq!(url["port"], setting("listen_port"));
    let pool: u64 = env("REACHLY_DB_POOL_SIZE").parse().expect("pool");
    assert!(pool <= setting("default_pool_size").parse().expect("pool size"));
    // Migrations go around the pooler, straight to PostgreSQL.
    let migrate = services["migrate"]["environment"]["DATABASE_URL"]
        .as_str()
        .expect("migrate DATABASE_URL");
    assert_eq!(libpq_keywords(migrate)["host"], "postgres");
}
