//! Database failover: a primary with a synchronous streaming standby (`pg_basebackup -R`,
//! run as the postgres user), the service on a multi-host `DATABASE_URL` with
//! `target_session_attrs=read-write`, webhooks under way while the primary crashes and the
//! standby is promoted. Every webhook acknowledged 2xx (committed, or fsync'd to the spool
//! and replayed later) is in the new primary; the service follows it without a restart
//! (pooled connections to the dead primary are dropped, new ones skip the old host).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reachly_ingest::pgcluster::{self, PgCluster};
use uuid::Uuid;

use crate::helpers::*;

const POSTMARK_AUTH: &str = "hook:failover";

/// Runs a PostgreSQL client program as the postgres user when we are root (like PgCluster).
fn pg_program(program: &str, args: &[&str]) -> std::process::Output {
    let bin = pgcluster::find_bin_dir()
        .expect("PostgreSQL binaries")
        .join(program);
    let bin = if bin.is_file() {
        bin
    } else {
        std::path::PathBuf::from(program)
    };
    let mut c = if pgcluster::running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let out = c.args(args).output().expect("run a PostgreSQL program");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A streaming standby of `primary` (pg_basebackup -R), started, with a watchdog that stops
/// it when this test process is gone.
fn start_standby(primary: &PgCluster) -> PgCluster {
    let dir =
        std::env::temp_dir().join(format!("reachly-test-standby-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("standby dir");
    if pgcluster::running_as_root() {
        let ok = Command::new("chown")
            .arg("postgres:")
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(ok.success());
    }
    let data = dir.join("data");
    let port = primary.port.to_string();
    pg_program(
        "pg_basebackup",
        &[
            "-D",
            data.to_str().expect("utf-8 path"),
            "-R",
            "-c",
            "fast",
            "-X",
            "stream",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
        ],
    );
    let standby = PgCluster::new(&data, pgcluster::free_port().expect("port")).expect("cluster");
    standby
        .start(&[("fsync", "off"), ("max_connections", "300")])
        .expect("start the standby");
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        stop = standby.stop_command_line("immediate"),
        dir = dir.display()
    );
    use std::os::unix::process::CommandExt as _;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .process_group(0)
        .spawn()
        // The watchdog outlives this test on purpose (it waits for the test process to end).
        .map(|_watchdog| ())
        .expect("watchdog");
    standby
}

#[tokio::test]
async fn acknowledged_webhooks_survive_a_promotion_under_traffic() {
    let _heavy = heavy_test_guard().await;
    let dir =
        std::env::temp_dir().join(format!("reachly-test-primary-{}", Uuid::new_v4().simple()));
    // synchronous_commit on: an acknowledged commit is on the standby too (with an
    // asynchronous standby a crash may lose acknowledged commits whatever the client does).
    let primary = tokio::task::spawn_blocking(move || {
        start_cluster_with(&dir, |_| Ok(()), &[("synchronous_commit", "on")])
    })
    .await
    .unwrap()
    .expect("primary");
    let admin = connect(&primary.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE reachly")
        .await
        .unwrap();
    reachly_ingest::db::migrate::run(&primary.url("reachly"))
        .await
        .expect("migrate");
    let db = connect(&primary.url("reachly")).await;
    let s = seed_tenant(&db).await;
    const MESSAGES: usize = 400;
    db.batch_execute(&format!(
        "INSERT INTO contacts (id, organization_id, email) \
           SELECT gen_random_uuid(), '{org}', 'c' || i || '@example.com' FROM generate_series(1, {MESSAGES}) i; \
         INSERT INTO campaign_messages (organization_id, campaign_id, contact_id, status) \
           SELECT '{org}', '{campaign}', id, 'sent' FROM contacts WHERE organization_id = '{org}' AND id <> '{contact}'",
        org = s.org,
        campaign = s.campaign,
        contact = s.contact
    ))
    .await
    .unwrap();
    let messages: Vec<Uuid> = db
        .query(
            "SELECT id FROM campaign_messages WHERE id <> $1 ORDER BY id",
            &[&s.message],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(messages.len(), MESSAGES);

    let p = primary.clone();
    let standby = tokio::task::spawn_blocking(move || start_standby(&p))
        .await
        .unwrap();
    // Wait until it streams, then make it synchronous.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "standby never streamed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=reachly \
         target_session_attrs=read-write connect_timeout=2",
        primary.port, standby.port
    );
    let app = spawn_app_on(
        &url,
        |a| {
            a.webhooks.postmark_basic_auth =
                Some(reachly_ingest::config::Secret::new(POSTMARK_AUTH));
            a.db.connect_timeout = Duration::from_secs(2);
        },
        None,
    )
    .await;

    // Webhooks, 8 at a time, one message each, until told to stop.
    let acked = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let next = Arc::new(Mutex::new(messages.clone().into_iter()));
    let stop = tokio_util::sync::CancellationToken::new();
    let auth = basic_auth(POSTMARK_AUTH);
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (acked, refused, next, stop) =
            (acked.clone(), refused.clone(), next.clone(), stop.clone());
        let (http, url, auth, org) = (
            app.http.clone(),
            app.url("/webhooks/postmark"),
            auth.clone(),
            s.org,
        );
        senders.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Some(msg) = next.lock().unwrap().next() else {
                    return;
                };
                let r = http
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(postmark_bounce(org, msg))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => acked.lock().unwrap().push(msg),
                    _ => *refused.lock().unwrap() += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while acked.lock().unwrap().len() < n {
                assert!(tokio::time::Instant::now() < deadline, "traffic stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_acked(60).await;

    // The primary crashes; the standby is promoted.
    let p = primary.clone();
    tokio::task::spawn_blocking(move || p.stop("immediate"))
        .await
        .unwrap()
        .expect("crash the primary");
    let at_crash = acked.lock().unwrap().len();
    let standby_dir = standby.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        pg_program(
            "pg_ctl",
            &[
                "-D",
                standby_dir.to_str().expect("utf-8"),
                "-w",
                "-t",
                "60",
                "promote",
            ],
        )
    })
    .await
    .unwrap();
    wait_acked(at_crash + 60).await;
    stop.cancel();
    for t in senders {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Every acknowledged webhook is in the new primary (spooled ones once replayed).
    let new_primary = connect(&standby.url("reachly")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stored: i64 = new_primary
            .query_one(
                "SELECT count(DISTINCT message_id) FROM email_events WHERE message_id = ANY($1)",
                &[&acked],
            )
            .await
            .unwrap()
            .get(0);
        if stored == acked.len() as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} acknowledged webhooks are in the new primary ({} refused)",
            stored,
            acked.len(),
            refused.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "failover: {} acknowledged ({at_crash} before the crash), {} refused",
        acked.len(),
        refused.lock().unwrap()
    );
    // Each once.
    let rows: i64 = new_primary
        .query_one(
            "SELECT count(*) FROM email_events WHERE message_id = ANY($1)",
            &[&acked],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, acked.len() as i64);
    // The service writes to the new primary now: readiness is green, a fresh webhook lands.
    let (_, body) = {
        let r = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(body.starts_with("ready"), "{body}");
    let spare = seed_message_in(&new_primary, &s).await;
    let r = app
        .post_webhook(
            "postmark",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            postmark_bounce(s.org, spare.message),
        )
        .await;
    assert_eq!(r.status(), 200);
    wait_for_count(
        &new_primary,
        &format!(
            "SELECT count(*) FROM email_events WHERE message_id = '{}'",
            spare.message
        ),
        1,
    )
    .await;
    let c = standby.clone();
    let _ = tokio::task::spawn_blocking(move || c.stop("immediate")).await;
}
