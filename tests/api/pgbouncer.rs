//! Every database path through PgBouncer in transaction mode (Debian's `pgbouncer`, 1.18 on
//! bookworm-era systems: no prepared-statement support) with a pool smaller than the
//! instances' pools together: three concurrent `migrate` processes, two `serve` instances
//! with partition maintenance every second, traffic; then every event is stored once, no
//! statement error was logged, no advisory lock is left, no server connection holds a
//! prepared statement or a leaked `lock_timeout`, and a later `migrate` works.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reachly_ingest::token::Purpose;

use crate::helpers::*;

const POSTMARK_AUTH: &str = "hook:through the pooler";
/// PgBouncer's server connections to the database; the two instances' pools total 6.
const POOL_SIZE: usize = 3;

/// A `pgbouncer` process of the test's own, in transaction mode; killed on drop. Server
/// connections are handed out round-robin instead of last-in-first-out, so that consecutive
/// statements of one client land on different server connections as they do under load
/// (with LIFO and a quiet pooler a client often gets its previous connection back, which
/// hides every session-state leak).
struct Pgbouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Pgbouncer {
    fn start(pg_port: u16) -> Pgbouncer {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .map(str::to_string)
            .or_else(|| {
                Command::new("sh")
                    .args(["-c", "command -v pgbouncer"])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            })
            .unwrap_or_else(|| {
                panic!(
                    "this test needs PgBouncer: install it with `apt-get install -y pgbouncer` \
                     (scripts/test.sh does when run as root)"
                )
            });
        let dir = temp_dir("pgbouncer");
        let port = reachly_ingest::pgcluster::free_port().expect("free port");
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 reachly = host=127.0.0.1 port={pg_port} dbname=reachly user=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {dir}/userlist.txt\n\
                 pool_mode = transaction\n\
                 server_round_robin = 1\n\
                 default_pool_size = {POOL_SIZE}\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 200\n\
                 logfile = {dir}/pgbouncer.log\n\
                 log_connections = 0\n\
                 log_disconnections = 0\n",
                dir = dir.display()
            ),
        )
        .expect("pgbouncer.ini");
        let mut c = Command::new(&bin);
        c.arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // PgBouncer refuses to run as root: run it as the postgres user, like the clusters.
        if reachly_ingest::pgcluster::running_as_root() {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id postgres");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("the postgres user exists (it runs the test clusters)")
            };
            let (uid, gid) = (id("-u"), id("-g"));
            let chown = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(chown.success());
            c.uid(uid).gid(gid);
        }
        let child = c.spawn().expect("spawn pgbouncer");
        let b = Pgbouncer { child, port, dir };
        // Wait until it accepts connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer did not listen; its log:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=reachly connect_timeout=10",
            self.port
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn simple_count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn everything_works_through_pgbouncer_in_transaction_mode() {
    let _heavy = heavy_test_guard().await;
    let c = private_unmigrated_cluster("pgbouncer").await;
    let direct = connect(&c.url("postgres")).await;
    direct
        .batch_execute("CREATE DATABASE reachly")
        .await
        .unwrap();
    let direct = connect(&c.url("reachly")).await;
    let port = c.port;
    let bouncer = tokio::task::spawn_blocking(move || Pgbouncer::start(port))
        .await
        .unwrap();
    let url = bouncer.url();

    // Three concurrent migrations through the pooler: one applies, the others wait and
    // find nothing to do; none fails.
    let runs = (0..3).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { run_binary(&["migrate"], &[("DATABASE_URL", &url)]).await })
    });
    let mut applied = 0;
    for r in futures_util::future::join_all(runs).await {
        let (code, out, err) = r.unwrap();
        assert_eq!(code, Some(0), "concurrent migrate: {out}{err}");
        applied += out
            .trim()
            .strip_prefix("migrations applied: ")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("unexpected output: {out}"));
    }
    let versions = simple_count(&direct, "SELECT count(*) FROM refinery_schema_history").await;
    assert_eq!(
        applied as i64, versions,
        "each migration applied exactly once"
    );

    // Two instances, pools of 3 each against the pooler's 3, maintenance every second.
    let s = seed_tenant(&direct).await;
    let bounced = seed_message_in(&direct, &s).await;
    let env = [
        ("REACHLY_DB_POOL_SIZE", "3"),
        ("REACHLY_PARTITION_MAINTENANCE_INTERVAL_S", "1"),
        ("REACHLY_POSTMARK_BASIC_AUTH", POSTMARK_AUTH),
        ("REACHLY_FLUSH_INTERVAL_MS", "20"),
        ("REACHLY_DB_CONNECT_TIMEOUT_S", "10"),
    ];
    let instances = [
        ServeProcess::spawn(&url, &temp_dir("spool-pgb-a"), &env),
        ServeProcess::spawn(&url, &temp_dir("spool-pgb-b"), &env),
    ];
    for i in &instances {
        i.wait_admin_ok("/readyz").await;
    }

    // Traffic on both: pixels (fire-and-forget) and bounce webhooks (acknowledged), while
    // a migrate runs through the same pooler.
    let keys = test_token_keys();
    let http = http_client();
    let auth = basic_auth(POSTMARK_AUTH);
    const PIXELS: usize = 300;
    const WEBHOOKS: usize = 60;
    let mut tasks = Vec::new();
    for i in 0..PIXELS {
        let u = instances[i % 2].url(&format!(
            "/o/{}.gif",
            reachly_ingest::token::mint(&keys, Purpose::Open, s.org, s.message, None).unwrap()
        ));
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .get(u)
                .header("user-agent", BROWSER_UA)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
    }
    for i in 0..WEBHOOKS {
        let u = instances[i % 2].url("/webhooks/postmark");
        let (http, auth) = (http.clone(), auth.clone());
        let body = postmark_bounce(s.org, bounced.message);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(u)
                .header("authorization", auth)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
    }
    let late_migrate = {
        let url = url.clone();
        tokio::spawn(async move { run_binary(&["migrate"], &[("DATABASE_URL", &url)]).await })
    };
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (code, out, err) = late_migrate.await.unwrap();
    assert_eq!(code, Some(0), "migrate under traffic: {out}{err}");

    // Every event stored once.
    wait_for_count(
        &direct,
        "SELECT count(*) FROM email_events",
        (PIXELS + WEBHOOKS) as i64,
    )
    .await;
    // Let maintenance run a few more rounds on both instances, then stop them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rounds = [0.0; 3];
    for i in &instances {
        let text = http
            .get(i.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for (n, outcome) in ["ok", "skipped", "error"].iter().enumerate() {
            rounds[n] += metric_value(
                &text,
                &format!("reachly_partition_maintenance_total{{outcome=\"{outcome}\"}}"),
            );
        }
    }
    assert!(
        rounds[0] >= 4.0,
        "maintenance rounds ok/skipped/error: {rounds:?}"
    );
    assert_eq!(
        rounds[2], 0.0,
        "maintenance rounds ok/skipped/error: {rounds:?}"
    );
    let mut logs = String::new();
    for i in instances {
        i.signal("-TERM");
        logs.push_str(&i.log.lock().map(|l| l.join("\n")).unwrap_or_default());
        assert_eq!(i.wait(Duration::from_secs(30)).await, Some(0));
    }
    assert_eq!(
        simple_count(&direct, "SELECT count(*) FROM email_events").await,
        (PIXELS + WEBHOOKS) as i64,
        "nothing written twice"
    );
    for bad in [
        "prepared statement",
        "batch write failed",
        "partition maintenance failed",
    ] {
        assert!(!logs.contains(bad), "{bad:?} in the service logs:\n{logs}");
    }

    // Nothing left behind on the server connections PgBouncer keeps open.
    assert_eq!(
        simple_count(
            &direct,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        )
        .await,
        0,
        "no advisory lock left"
    );
    // Hold POOL_SIZE transactions at once: each is on a different server connection, so
    // together they look at every one of them.
    let mut held = Vec::new();
    for _ in 0..POOL_SIZE {
        held.push(connect(&url).await);
    }
    let mut seen = std::collections::BTreeSet::new();
    for client in &held {
        client.batch_execute("BEGIN").await.unwrap();
        seen.insert(simple_count(client, "SELECT pg_backend_pid()").await);
        assert_eq!(
            simple_count(client, "SELECT count(*) FROM pg_prepared_statements").await,
            0,
            "a prepared statement was left on a pooled server connection"
        );
        let rows = client.simple_query("SHOW lock_timeout").await.unwrap();
        let lock_timeout = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(lock_timeout.as_deref(), Some("0"), "lock_timeout leaked");
    }
    assert_eq!(seen.len(), POOL_SIZE, "one server connection each");
    for client in &held {
        client.batch_execute("COMMIT").await.unwrap();
    }

    // A later migrate through the pooler works and finds nothing to do.
    let (code, out, err) = run_binary(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert_eq!(code, Some(0), "later migrate: {out}{err}");
    assert!(out.contains("migrations applied: 0"), "{out}");
    let log = bouncer.log();
    assert!(!log.contains("prepared statement"), "{log}");
}
