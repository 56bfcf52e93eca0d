//! The deploy artifacts, exercised: the `healthcheck` subcommand the image's HEALTHCHECK
//! runs, the alert rules (`promtool check rules`, `promtool test rules`), every metric the
//! rules and the dashboard name is one a live instance exports, and the Kubernetes manifests
//! (schema-validated by `kubernetes-validate` from PyPI, and checked for the invariants that
//! a schema cannot see: probes on the admin port's paths, timeouts in the right order,
//! hardened security contexts).

use std::process::{Command, Output};

use crate::helpers::*;

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
