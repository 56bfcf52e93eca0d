//! Probe semantics (SPEC.md "Admin listener", src/http/admin.rs): readiness means "can
//! accept and make durable", so a database outage with spool room keeps an instance ready
//! and a full spool with the database down does not; the admin listener answers while
//! migrations wait (liveness 200, readiness 503 "starting").

use std::time::Duration;

use reachly_ingest::token::Purpose;
use uuid::Uuid;

use crate::helpers::*;

fn unreachable_db(a: &mut reachly_ingest::config::ServeArgs) {
    let closed = reachly_ingest::pgcluster::free_port().unwrap();
    a.db.database_url = Some(reachly_ingest::config::Secret::new(format!(
        "host=127.0.0.1 port={closed} user=postgres dbname=x"
    )));
    a.db.connect_timeout = Duration::from_secs(1);
}

/// A pixel hit for a message that exists nowhere: enough to make the writers try the database.
async fn hit_pixel(app: &TestApp) {
    let s = Seeded {
        org: Uuid::new_v4(),
        campaign: Uuid::new_v4(),
        contact: Uuid::new_v4(),
        message: Uuid::new_v4(),
    };
    let t = app.mint(Purpose::Open, &s, None);
    assert_eq!(
        app.get(&format!("/o/{t}.gif"), Some(BROWSER_UA))
            .await
            .status(),
        200
    );
}

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    let r = app.http.get(app.admin_url(path)).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls `path` until its body contains `needle`; returns (status, body).
async fn wait_body(app: &TestApp, path: &str, needle: &str) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(app, path).await;
        if body.contains(needle) {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never said {needle:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_database_outage_with_spool_room_keeps_the_instance_ready_and_alive() {
    let app = spawn_app_with(unreachable_db).await;
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    hit_pixel(&app).await;
    let (status, body) = wait_body(&app, "/readyz", "database unavailable").await;
    assert_eq!(status, 200, "ready while spooling: {body}");
    let (status, body) = get(&app, "/healthz").await;
    assert_eq!(status, 200, "retrying writers are alive: {body}");
}

#[tokio::test]
async fn a_full_spool_with_the_database_down_makes_the_instance_unready() {
    let app = spawn_app_with(|a| {
        unreachable_db(a);
        a.pipeline.spool_max_bytes = 0;
    })
    .await;
    hit_pixel(&app).await;
    let (status, body) = wait_body(&app, "/readyz", "no room").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("spool full"), "{body}");
    let (status, _) = get(&app, "/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_admin_listener_answers_while_migrations_wait() {
    let url = empty_database().await;
    // Another migrator holds the lock: this instance's migration waits behind it.
    let mut holder = connect(&url).await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({})",
        reachly_ingest::db::migrate::MIGRATION_LOCK_KEY
    ))
    .await
    .unwrap();

    let spool = temp_dir("spool");
    let mut args = test_args(&url, &spool);
    args.db.migrate_on_start = true;
    let config = reachly_ingest::Config::from_args(args).unwrap();
    let prepared = reachly_ingest::app::prepare_default(&config).unwrap();
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let build = tokio::spawn(reachly_ingest::App::build(config, public, admin, prepared));

    let http = http_client();
    let probe = |path: &'static str| {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("http://{admin_addr}{path}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!build.is_finished(), "the build should wait for the lock");
    let (status, body) = probe("/healthz").await;
    assert_eq!(status, 200, "alive while migrating: {body}");
    let (status, body) = probe("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("starting"), "{body}");

    tx.commit().await.unwrap();
    let app = tokio::time::timeout(Duration::from_secs(30), build)
        .await
        .expect("build finishes once the lock is free")
        .unwrap()
        .expect("build");
    assert_eq!(app.admin_addr(), admin_addr);
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let run = tokio::spawn(app.run_until_stopped(async move { s.cancelled().await }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = probe("/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn writers_blocked_with_events_waiting_make_the_instance_unready_but_still_alive() {
    // Without lock and statement timeouts (0: the server's, none), so the writer really
    // blocks; with them it times out, retries and stays alive, which is what they are for.
    let app = spawn_app_with(|a| {
        a.pipeline.lock_timeout = Duration::ZERO;
        a.pipeline.statement_timeout = Duration::ZERO;
    })
    .await;
    let s = app.seed().await;
    // Another session holds campaign_messages: the writer's first query waits behind it.
    let mut blocker = connect(&app.db_url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE campaign_messages IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let t = app.mint(Purpose::Open, &s, None);
    assert_eq!(
        app.get(&format!("/o/{t}.gif"), Some(BROWSER_UA))
            .await
            .status(),
        200
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let (status, body) = loop {
        let (status, body) = get(&app, "/readyz").await;
        if body.contains("writers stalled") || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("writers stalled"), "{body}");
    let (status, body) = get(&app, "/healthz").await;
    assert_eq!(status, 200, "liveness waits longer (60 s): {body}");

    tx.rollback().await.unwrap();
    app.wait_count(
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            s.message
        ),
        1,
    )
    .await;
    let (status, body) = wait_body(&app, "/readyz", "ready").await;
    assert_eq!(status, 200, "{body}");
}
