//! The scale-out bus end to end (issue 13): a 3-node JetStream cluster of real `nats-server`
//! processes on free loopback ports, edges and writers as real `reachly-ingest serve`
//! processes (so a crash is a real `kill -9`), a real PostgreSQL, real sockets. Every case
//! ends with the exactly-once check from the database: each acknowledged event stored once,
//! none twice.
//!
//! Traffic per seeded message: an open pixel, a click, a Postmark delivery webhook (durable,
//! its content key makes an ESP retry a duplicate the sink drops), and for every third
//! message a one-click unsubscribe (durable).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use reachly_ingest::token::Purpose;
use uuid::Uuid;

use crate::helpers::*;

const POSTMARK: &str = "postmark-hook:correct horse battery";
const STREAM: &str = "REACHLY_EVENTS";
/// Small enough that the large-envelope case is chunked.
const MAX_PAYLOAD: usize = 64 << 10;

// ---- a JetStream cluster of nats-server processes ----

fn nats_server() -> &'static str {
    for p in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("nats-server is not installed (scripts/test.sh installs Debian's `nats-server` package)")
}

/// A free port *below* the kernel's ephemeral range (32768+). Ports from port-0 binds come
/// from that range, so a nats-server restarting on its port never finds it taken by some
/// client's connection, and no test's database (whose port comes from a port-0 bind) can
/// lose its port to a nats-server while it is stopped.
fn nats_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(104_729)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for nats-server below 32000")
}

struct Node {
    name: String,
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

/// Three `nats-server` processes clustered on loopback, JetStream on file storage under a
/// temp dir; a watchdog kills them (by the pids in the dir) if the test process dies.
pub struct NatsCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let dir = temp_dir("nats");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (nats_port(), nats_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nmax_payload: {MAX_PAYLOAD}\n\
                     jetstream {{ store_dir: \"{store}\", max_memory_store: 64MB, max_file_store: 1GB }}\n\
                     cluster {{ name: reachly-test, listen: 127.0.0.1:{cport}, routes: [{routes}] }}\n",
                    store = dir.join(&name).display(),
                    routes = routes.join(", "),
                ),
            )
            .expect("write nats conf");
            nodes.push(Node {
                name,
                port: *port,
                conf,
                child: None,
            });
        }
        let mut c = NatsCluster { dir, nodes };
        for i in 0..3 {
            c.spawn(i);
        }
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; for f in '{dir}'/*.pid; do kill -9 $(cat \"$f\") 2>/dev/null; done; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = c.dir.display()
        );
        use std::os::unix::process::CommandExt as _;
        // The watchdog must outlive this process: never waited for, by design.
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("watchdog");
        c
    }

    fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", n.name))).expect("log");
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&n.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        std::fs::write(
            self.dir.join(format!("{}.pid", n.name)),
            child.id().to_string(),
        )
        .expect("pid file");
        n.child = Some(child);
    }

    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn kill9(&mut self, name: &str) {
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node");
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill9_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.spawn(i);
            }
        }
    }

    async fn client(&self) -> async_nats::Client {
        let alive: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| {
                format!("nats://127.0.0.1:{}", n.port)
                    .parse()
                    .expect("addr")
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(alive.clone())
                .await
            {
                Ok(c) => return c,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot connect to the NATS cluster: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (bounded) until JetStream answers: a meta leader is elected.
    pub async fn wait_jetstream(&self) {
        // A raw `$JS.API.INFO` request: async-nats 0.51's typed account info does not parse
        // 2.9.10's answer (newer fields), and this only needs "no error".
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
        loop {
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                client.request("$JS.API.INFO", bytes::Bytes::new()),
            )
            .await;
            match answer {
                Ok(Ok(m)) if !String::from_utf8_lossy(&m.payload).contains("\"error\"") => return,
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "JetStream never became available: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The server name of the stream's leader (bounded wait for one).
    pub async fn stream_leader(&self) -> String {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(3), js.get_stream(STREAM)).await
                && let Ok(info) = s.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream never had a leader"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Messages in the stream (the writers' backlog: work-queue retention).
    pub async fn stream_messages(&self) -> u64 {
        let js = async_nats::jetstream::new(self.client().await);
        match tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = js.get_stream(STREAM).await.ok()?;
            s.info().await.ok().map(|i| i.state.messages)
        })
        .await
        {
            Ok(Some(n)) => n,
            _ => 0,
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill9_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- the service's processes ----

fn bus_env<'a>(urls: &'a str, role: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("REACHLY_BUS_URL", urls),
        ("REACHLY_BUS_ROLE", role),
        ("REACHLY_BUS_ACK_WAIT_S", "3"),
        ("REACHLY_BUS_PUBLISH_TIMEOUT_MS", "2000"),
        ("REACHLY_BUS_DUPLICATE_WINDOW_S", "60"),
        ("REACHLY_POSTMARK_BASIC_AUTH", POSTMARK),
        ("REACHLY_FLUSH_INTERVAL_MS", "50"),
        ("REACHLY_SHUTDOWN_TIMEOUT_S", "5"),
    ]
}

/// A service process that is killed (-9) when dropped, so that a case ending (or failing)
/// leaves no process behind.
struct Proc(Option<ServeProcess>);

impl Proc {
    fn into_inner(mut self) -> ServeProcess {
        self.0.take().expect("process present until taken")
    }
}

impl std::ops::Deref for Proc {
    type Target = ServeProcess;
    fn deref(&self) -> &ServeProcess {
        self.0.as_ref().expect("process present until taken")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.kill9();
        }
    }
}

fn spawn_role(db: &str, urls: &str, role: &str, extra: &[(&str, &str)]) -> Proc {
    spawn_role_in(&temp_dir(&format!("bus-{role}")), db, urls, role, extra)
}

fn spawn_role_in(spool: &Path, db: &str, urls: &str, role: &str, extra: &[(&str, &str)]) -> Proc {
    let mut env = bus_env(urls, role);
    env.extend_from_slice(extra);
    Proc(Some(ServeProcess::spawn(db, spool, &env)))
}

/// Waits (bounded) until the admin listener's /readyz is 200.
async fn ready(p: &ServeProcess) {
    p.wait_admin_ok("/readyz").await;
}

struct World {
    db: tokio_postgres::Client,
    db_url: String,
    msgs: Vec<Seeded>,
    http: reqwest::Client,
}

async fn world(db_url: String, n: usize) -> World {
    let db = connect(&db_url).await;
    let first = seed_tenant(&db).await;
    let mut msgs = vec![first];
    // A second tenant, so the traffic spans shards.
    let other = seed_tenant(&db).await;
    for i in 1..n {
        let base = if i % 2 == 0 { &first } else { &other };
        msgs.push(seed_message_in(&db, base).await);
    }
    World {
        db,
        db_url,
        msgs,
        http: http_client(),
    }
}

fn mint(purpose: Purpose, s: &Seeded, url: Option<&str>) -> String {
    reachly_ingest::token::mint(&test_token_keys(), purpose, s.org, s.message, url).expect("mint")
}

fn delivery(s: &Seeded) -> String {
    serde_json::json!({
        "MessageID": format!("pm-{}", s.message),
        "Recipient": "someone@example.com",
        "DeliveredAt": "2026-11-30T08:00:00Z",
        "Details": "ok",
        "Metadata": {
            "reachly_message_id": s.message.to_string(),
            "reachly_organization_id": s.org.to_string(),
        },
        "RecordType": "Delivery",
        "MessageStream": "outbound"
    })
    .to_string()
}

impl World {
    async fn pixel(&self, edge: &ServeProcess, s: &Seeded) -> bool {
        let t = mint(Purpose::Open, s, None);
        matches!(self.http.get(edge.url(&format!("/o/{t}.gif"))).header("user-agent", BROWSER_UA).send().await, Ok(r) if r.status() == 200)
    }

    async fn click(&self, edge: &ServeProcess, s: &Seeded) -> bool {
        let t = mint(Purpose::Click, s, Some("https://example.com/landing"));
        matches!(self.http.get(edge.url(&format!("/c/{t}"))).header("user-agent", BROWSER_UA).send().await, Ok(r) if r.status() == 302)
    }

    /// The webhook's status, or None if the connection failed (an ESP retries both).
    async fn webhook(&self, edge: &ServeProcess, s: &Seeded) -> Option<u16> {
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(POSTMARK)
        );
        self.http
            .post(edge.url("/webhooks/postmark"))
            .header("content-type", "application/json")
            .header("authorization", auth)
            .timeout(Duration::from_secs(15))
            .body(delivery(s))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    async fn unsubscribe(&self, edge: &ServeProcess, s: &Seeded) -> Option<u16> {
        let t = mint(Purpose::Unsubscribe, s, None);
        self.http
            .post(edge.url(&format!("/u/{t}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .timeout(Duration::from_secs(15))
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// All kinds for message `i` through `edge`; durable ones retried (as an ESP or a mail
    /// client would) until a 200, on `fallback` after a failure. Returns the expected kinds.
    async fn traffic(
        &self,
        i: usize,
        edge: &ServeProcess,
        fallback: &ServeProcess,
    ) -> Vec<&'static str> {
        let s = &self.msgs[i];
        let mut kinds = Vec::new();
        if self.pixel(edge, s).await {
            kinds.push("opened");
        }
        if self.click(edge, s).await {
            kinds.push("clicked");
        }
        let mut target = edge;
        for attempt in 0..20 {
            match self.webhook(target, s).await {
                Some(200) => {
                    kinds.push("delivered");
                    break;
                }
                _ => target = fallback,
            }
            assert!(attempt < 19, "webhook for message {i} never accepted");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if i.is_multiple_of(3) {
            let mut target = edge;
            for attempt in 0..20 {
                match self.unsubscribe(target, s).await {
                    // An edge cannot check the tenant: 202 "received".
                    Some(200 | 202) => {
                        kinds.push("unsubscribed");
                        break;
                    }
                    _ => target = fallback,
                }
                assert!(attempt < 19, "unsubscribe for message {i} never accepted");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        kinds
    }

    /// The exactly-once check (of the traffic's kinds; `deferred` is the large-envelope
    /// case's, checked by id): waits (bounded) until every expected (message, kind) is
    /// stored, then asserts none is stored twice and nothing unexpected is there.
    async fn assert_exactly_once(&self, expected: &[(usize, Vec<&'static str>)], within: Duration) {
        let want: i64 = expected.iter().map(|(_, k)| k.len() as i64).sum();
        let ids: Vec<Uuid> = self.msgs.iter().map(|m| m.message).collect();
        let deadline = tokio::time::Instant::now() + within;
        let mut stored = 0;
        while tokio::time::Instant::now() < deadline {
            stored = self.count_events(&ids).await;
            if stored >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let stragglers (a redelivery, a late replay) land before judging duplicates.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rows = self
            .db
            .query(
                "SELECT message_id, event_type, count(*) FROM email_events WHERE message_id = ANY($1) AND event_type <> 'deferred' GROUP BY 1, 2",
                &[&ids],
            )
            .await
            .expect("query");
        let mut dupes = Vec::new();
        let mut have = std::collections::HashSet::new();
        for r in &rows {
            let (m, t, c): (Uuid, String, i64) = (r.get(0), r.get(1), r.get(2));
            if c > 1 {
                dupes.push(format!("{m} {t} x{c}"));
            }
            have.insert((m, t));
        }
        let mut missing = Vec::new();
        for (i, kinds) in expected {
            for k in kinds {
                if !have.contains(&(self.msgs[*i].message, k.to_string())) {
                    missing.push(format!("message {i} {k}"));
                }
            }
        }
        assert!(dupes.is_empty(), "duplicated: {dupes:?}");
        assert!(
            missing.is_empty(),
            "acknowledged but not stored after {within:?} ({stored}/{want} rows): {missing:?}"
        );
        let dead: i64 = self
            .db
            .query_one("SELECT count(*) FROM webhook_dead_letters", &[])
            .await
            .expect("dead letters")
            .get(0);
        assert_eq!(dead, 0, "unexpected dead letters");
        eprintln!(
            "exactly-once: {want} acknowledged events expected, {} rows stored, 0 duplicates",
            rows.len()
        );
    }

    async fn count_events(&self, ids: &[Uuid]) -> i64 {
        self.db
            .query_one(
                "SELECT count(*) FROM email_events WHERE message_id = ANY($1) AND event_type <> 'deferred'",
                &[&ids],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0)
    }
}

async fn metric_of(p: &ServeProcess, sample: &str) -> f64 {
    match http_client().get(p.admin_url("/metrics")).send().await {
        Ok(r) => metric_value(&r.text().await.unwrap_or_default(), sample),
        Err(_) => 0.0,
    }
}

/// At most two bus cases at once: each runs ~8 processes, and the rest of the suite (with
/// timing-sensitive cases of its own) shares the same two cores.
static BUS_CASES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn up(n_msgs: usize, db_url: String) -> (NatsCluster, World, BusSlot) {
    let slot = BUS_CASES.acquire().await.expect("semaphore never closed");
    let nats = tokio::task::spawn_blocking(NatsCluster::start)
        .await
        .expect("join");
    nats.wait_jetstream().await;
    (nats, world(db_url, n_msgs).await, slot)
}

type BusSlot = tokio::sync::SemaphorePermit<'static>;

// ---- the cases ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_two_edges_two_writers_store_every_kind_exactly_once() {
    let (nats, w, _slot) = up(30, fresh_database().await).await;
    let urls = nats.urls();
    // Small transactions, so a fetched batch of chunks is written in several parts.
    let small_batches = [("REACHLY_FLUSH_MAX_EVENTS", "300")];
    let writers = [
        spawn_role(&w.db_url, &urls, "writer", &small_batches),
        spawn_role(&w.db_url, &urls, "writer", &small_batches),
    ];
    let edges = [
        spawn_role(&w.db_url, &urls, "edge", &[]),
        spawn_role(&w.db_url, &urls, "edge", &[]),
    ];
    for p in edges.iter().chain(&writers) {
        ready(p).await;
    }
    let mut expected = Vec::new();
    for i in 0..w.msgs.len() {
        let edge = &edges[i % 2];
        let kinds = w.traffic(i, edge, &edges[(i + 1) % 2]).await;
        assert_eq!(
            kinds.len(),
            if i.is_multiple_of(3) { 4 } else { 3 },
            "message {i}"
        );
        expected.push((i, kinds));
    }
    // An ESP re-delivers a batch: the same webhooks again are answered 200 and stored once.
    for i in 0..5 {
        assert_eq!(w.webhook(&edges[1], &w.msgs[i]).await, Some(200));
    }
    // A large envelope (2,000 records, far over the 64 KiB max_payload) published through
    // the library is chunked, and every record is stored once.
    let big = big_envelope(&w, 2000);
    let bus = reachly_ingest::pipeline::bus::Bus::connect(&bus_config(&urls))
        .await
        .expect("bus");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !bus.connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "test bus client never connected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The keeper learns max_payload; here we use the server's directly.
    let chunks = reachly_ingest::pipeline::bus::envelope::chunk(&big, MAX_PAYLOAD);
    assert!(chunks.len() > 5, "{} chunks", chunks.len());
    publish_chunks(&bus, &chunks).await;
    w.assert_exactly_once(&expected, Duration::from_secs(60))
        .await;
    let big_ids: Vec<Uuid> = big
        .iter()
        .map(|r| match r {
            reachly_ingest::event::Record::Event(e) => e.id,
            reachly_ingest::event::Record::DeadLetter(d) => d.id,
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 =
            w.db.query_one(
                "SELECT count(*) FROM email_events WHERE id = ANY($1)",
                &[&big_ids],
            )
            .await
            .expect("count")
            .get(0);
        if n == big_ids.len() as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "big envelope: {n}/{} stored",
            big_ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A message that is not a chunk of ours becomes one dead letter and is terminated.
    let ack = bus
        .jetstream()
        .publish(
            bus.subject("unknown"),
            bytes::Bytes::from_static(b"\xffnot a chunk"),
        )
        .await
        .expect("publish garbage");
    ack.await.expect("garbage ack");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = w
            .db
            .query_one(
                "SELECT count(*) FROM webhook_dead_letters WHERE reason = 'undecodable_bus_message' AND provider = 'bus'",
                &[],
            )
            .await
            .expect("dead letters")
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            n < 2 && tokio::time::Instant::now() < deadline,
            "undecodable message: {n} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let published: f64 = metric_of(&edges[0], "reachly_bus_published_total").await
        + metric_of(&edges[1], "reachly_bus_published_total").await;
    let consumed: f64 = metric_of(&writers[0], "reachly_bus_consumed_total").await
        + metric_of(&writers[1], "reachly_bus_consumed_total").await;
    eprintln!("edges published {published} events; writers consumed {consumed} messages");
    assert!(published >= 100.0 && consumed > 0.0);
    for p in edges.into_iter().chain(writers) {
        let p = p.into_inner();
        p.signal("-TERM");
        let log = p.log.clone();
        let code = p.wait(Duration::from_secs(20)).await;
        assert_eq!(
            code,
            Some(0),
            "a bus process did not stop cleanly; its log:\n{}",
            log.lock().map(|l| l.join("\n")).unwrap_or_default()
        );
    }
}

fn bus_config(urls: &str) -> reachly_ingest::config::BusConfig {
    reachly_ingest::config::ServeArgs::from_argv(["serve", "--bus-url", urls]).bus
}

fn big_envelope(w: &World, n: usize) -> Vec<reachly_ingest::event::Record> {
    use reachly_ingest::event::{Event, EventType, Record, Source};
    (0..n)
        .map(|i| {
            let s = &w.msgs[i % w.msgs.len()];
            let mut e = Event::new(
                s.message,
                EventType::Deferred,
                chrono::Utc::now(),
                Source::Postmark,
            );
            e.claimed_organization_id = Some(s.org);
            e.dedup_key = Some(format!("postmark:big-{i}-{}", Uuid::new_v4()));
            e.metadata.insert("pad".into(), "y".repeat(100).into());
            Record::Event(e)
        })
        .collect()
}

async fn publish_chunks(
    bus: &reachly_ingest::pipeline::bus::Bus,
    chunks: &[reachly_ingest::pipeline::bus::envelope::Chunk],
) {
    use async_nats::jetstream::message::PublishMessage;
    for c in chunks {
        let ack = bus
            .jetstream()
            .send_publish(
                bus.subject(&c.shard),
                PublishMessage::build()
                    .payload(c.payload.clone())
                    .message_id(&c.msg_id),
            )
            .await
            .expect("publish");
        ack.await.expect("publish ack");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_stream_leader_killed_mid_traffic_loses_and_duplicates_nothing() {
    let (mut nats, w, _slot) = up(40, fresh_database().await).await;
    let urls = nats.urls();
    let writers = [
        spawn_role(&w.db_url, &urls, "writer", &[]),
        spawn_role(&w.db_url, &urls, "writer", &[]),
    ];
    let edges = [
        spawn_role(&w.db_url, &urls, "edge", &[]),
        spawn_role(&w.db_url, &urls, "edge", &[]),
    ];
    for p in edges.iter().chain(&writers) {
        ready(p).await;
    }
    let mut expected = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..w.msgs.len() {
        if i == 10 {
            let leader = nats.stream_leader().await;
            eprintln!("kill -9 of the stream leader {leader}");
            nats.kill9(&leader);
        }
        let t = std::time::Instant::now();
        let kinds = w.traffic(i, &edges[i % 2], &edges[(i + 1) % 2]).await;
        slowest = slowest.max(t.elapsed());
        expected.push((i, kinds));
    }
    let sent: usize = expected.iter().map(|(_, k)| k.len()).sum();
    let spooled = metric_of(&edges[0], "reachly_bus_publish_failures_total").await
        + metric_of(&edges[1], "reachly_bus_publish_failures_total").await;
    eprintln!(
        "leader kill: {sent} events acknowledged; slowest message's traffic {slowest:?}; {spooled} publishes failed over to the spool"
    );
    w.assert_exactly_once(&expected, Duration::from_secs(90))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_edge_killed_mid_webhook_esp_retry_is_not_duplicated() {
    let (nats, w, _slot) = up(40, fresh_database().await).await;
    let urls = nats.urls();
    let writers = [
        spawn_role(&w.db_url, &urls, "writer", &[]),
        spawn_role(&w.db_url, &urls, "writer", &[]),
    ];
    let victim_spool = temp_dir("bus-victim");
    let victim = spawn_role_in(&victim_spool, &w.db_url, &urls, "edge", &[]);
    let survivor = spawn_role(&w.db_url, &urls, "edge", &[]);
    for p in [&victim, &survivor].into_iter().chain(&writers) {
        ready(p).await;
    }
    // Webhooks to the victim, all at once; kill -9 it while they are in flight.
    let w = std::sync::Arc::new(w);
    let victim_url = victim.url("/webhooks/postmark");
    let mut inflight = Vec::new();
    let oks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..w.msgs.len() {
        let w = w.clone();
        let url = victim_url.clone();
        let counter = oks.clone();
        // Staggered, so the kill finds some answered, some in flight, some not yet sent.
        tokio::time::sleep(Duration::from_millis(3)).await;
        inflight.push(tokio::spawn(async move {
            let auth = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(POSTMARK)
            );
            let status = w
                .http
                .post(url)
                .header("content-type", "application/json")
                .header("authorization", auth)
                .timeout(Duration::from_secs(15))
                .body(delivery(&w.msgs[i]))
                .send()
                .await
                .ok()
                .map(|r| r.status().as_u16());
            if status == Some(200) {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            status
        }));
        if oks.load(std::sync::atomic::Ordering::SeqCst) >= 10 {
            break;
        }
    }
    victim.into_inner().kill9();
    let mut acked = 0;
    let mut retried = 0;
    let sent = inflight.len();
    let mut statuses: Vec<Option<u16>> = Vec::new();
    for h in inflight {
        statuses.push(h.await.expect("join"));
    }
    statuses.resize(w.msgs.len(), None); // never sent: the ESP sends them later
    for (i, status) in statuses.into_iter().enumerate() {
        if status == Some(200) {
            acked += 1;
        }
        // The ESP retries whatever did not get a 200, and (at-least-once on its side too)
        // re-delivers some that did.
        if status != Some(200) || i % 4 == 0 {
            retried += 1;
            let mut ok = false;
            for _ in 0..20 {
                if w.webhook(&survivor, &w.msgs[i]).await == Some(200) {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert!(ok, "retry of message {i} never accepted");
        }
    }
    eprintln!(
        "edge kill: {sent} webhooks sent to the edge, {acked} acked by it before its kill -9, {retried} (re)tried on the survivor"
    );
    // Whatever the killed edge acknowledged from its spool (the bus was slower than its
    // fsync) is on its disk: it is published when the edge comes back on the same disk.
    let back = spawn_role_in(&victim_spool, &w.db_url, &urls, "edge", &[]);
    ready(&back).await;
    let expected: Vec<(usize, Vec<&'static str>)> =
        (0..w.msgs.len()).map(|i| (i, vec!["delivered"])).collect();
    w.assert_exactly_once(&expected, Duration::from_secs(60))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_writer_killed_after_commit_before_ack_redelivery_is_absorbed() {
    let (nats, w, _slot) = up(20, fresh_database().await).await;
    let urls = nats.urls();
    // The first writer aborts (as kill -9) right after its first commit, before any ack.
    let doomed = spawn_role(
        &w.db_url,
        &urls,
        "writer",
        &[("REACHLY_BUS_FAULT", "abort-after-commit")],
    );
    let edge = spawn_role(&w.db_url, &urls, "edge", &[]);
    ready(&edge).await;
    ready(&doomed).await;
    let mut expected = Vec::new();
    for i in 0..w.msgs.len() {
        expected.push((i, w.traffic(i, &edge, &edge).await));
    }
    // The doomed writer committed one batch and died without acking it.
    let code = doomed.into_inner().wait(Duration::from_secs(30)).await;
    eprintln!("writer exited with {code:?} (abort)");
    assert_ne!(code, Some(0));
    let committed = w
        .count_events(&w.msgs.iter().map(|m| m.message).collect::<Vec<_>>())
        .await;
    assert!(committed > 0, "the doomed writer committed nothing");
    // A second writer gets the unacked messages again after the ack wait (3 s).
    let rescuer = spawn_role(&w.db_url, &urls, "writer", &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric_of(&rescuer, "reachly_bus_redelivered_total").await == 0.0
        || nats.stream_messages().await > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unacked messages were not redelivered and drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.assert_exactly_once(&expected, Duration::from_secs(60))
        .await;
    let redelivered = metric_of(&rescuer, "reachly_bus_redelivered_total").await;
    let dupes = metric_of(&rescuer, "reachly_events_duplicate_total").await;
    eprintln!(
        "writer kill: {committed} rows committed before the abort; rescuer saw {redelivered} redelivered messages, skipped {dupes} duplicate events"
    );
    assert!(redelivered > 0.0, "nothing was redelivered");
    assert!(
        dupes > 0.0,
        "the redelivered batch was not recognised as already stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_database_down_backlog_waits_in_the_stream_then_drains() {
    let pg = PrivateCluster::start().await;
    let (nats, w, _slot) = up(20, pg.url.clone()).await;
    let urls = nats.urls();
    let writers = [
        spawn_role(
            &w.db_url,
            &urls,
            "writer",
            &[("REACHLY_DB_CONNECT_TIMEOUT_S", "1")],
        ),
        spawn_role(
            &w.db_url,
            &urls,
            "writer",
            &[("REACHLY_DB_CONNECT_TIMEOUT_S", "1")],
        ),
    ];
    let edge = spawn_role(&w.db_url, &urls, "edge", &[]);
    for p in writers.iter().chain([&edge]) {
        ready(p).await;
    }
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push((i, w.traffic(i, &edge, &edge).await));
    }
    pg.stop().await;
    let down_at = std::time::Instant::now();
    // The database is down ~10 s (shortened from 30 s to keep the suite quick): the edge
    // still acknowledges (the bus has the events), the stream holds the backlog.
    for i in 5..w.msgs.len() {
        let kinds = w.traffic(i, &edge, &edge).await;
        assert!(kinds.contains(&"delivered"));
        expected.push((i, kinds));
    }
    let backlog = nats.stream_messages().await;
    eprintln!("database down: {backlog} messages waiting in the stream");
    assert!(
        backlog > 0,
        "the stream holds no backlog while the database is down"
    );
    let rest = Duration::from_secs(10).saturating_sub(down_at.elapsed());
    tokio::time::sleep(rest).await;
    pg.start_again().await;
    eprintln!("database back after {:?}", down_at.elapsed());
    let w = World {
        db: connect(&w.db_url).await,
        ..w
    };
    w.assert_exactly_once(&expected, Duration::from_secs(60))
        .await;
    let left = nats.stream_messages().await;
    assert_eq!(left, 0, "the backlog was not drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_whole_bus_down_edges_spool_then_replay() {
    let (mut nats, w, _slot) = up(20, fresh_database().await).await;
    let urls = nats.urls();
    let writers = [
        spawn_role(&w.db_url, &urls, "writer", &[]),
        spawn_role(&w.db_url, &urls, "writer", &[]),
    ];
    let edge = spawn_role(&w.db_url, &urls, "edge", &[]);
    for p in writers.iter().chain([&edge]) {
        ready(p).await;
    }
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push((i, w.traffic(i, &edge, &edge).await));
    }
    nats.kill9_all();
    // Readiness follows the bus.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = w
            .http
            .get(edge.admin_url("/readyz"))
            .send()
            .await
            .expect("readyz");
        if r.status() == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge still ready with the bus down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 5..w.msgs.len() {
        let kinds = w.traffic(i, &edge, &edge).await;
        assert!(
            kinds.contains(&"delivered"),
            "webhook {i} not acknowledged via the spool"
        );
        expected.push((i, kinds));
    }
    let spooled = metric_of(&edge, "reachly_spool_bytes").await;
    eprintln!("bus down: edge spool holds {spooled} bytes");
    assert!(spooled > 0.0, "nothing was spooled");
    nats.restart_all();
    nats.wait_jetstream().await;
    ready(&edge).await;
    w.assert_exactly_once(&expected, Duration::from_secs(90))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metric_of(&edge, "reachly_spool_bytes").await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge spool was not emptied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_full_stream_spools_then_answers_503_and_drains_after() {
    let (nats, w, _slot) = up(60, fresh_database().await).await;
    let urls = nats.urls();
    // No writer yet: the stream (bounded to 16 KiB, discard new) fills, publishes fail, the
    // edge spools (bounded to 16 KiB), then answers 503: the back-pressure chain.
    let small = [
        ("REACHLY_BUS_MAX_BYTES", "16384"),
        ("REACHLY_SPOOL_MAX_BYTES", "16384"),
    ];
    let edge = spawn_role(&w.db_url, &urls, "edge", &small);
    ready(&edge).await;
    let mut statuses = Vec::new();
    for i in 0..w.msgs.len() {
        let s = w.webhook(&edge, &w.msgs[i]).await;
        statuses.push(s);
        if s == Some(503) {
            break;
        }
    }
    let accepted = statuses.iter().filter(|s| **s == Some(200)).count();
    let failures = metric_of(&edge, "reachly_bus_publish_failures_total").await;
    let spooled = metric_of(&edge, "reachly_spool_bytes").await;
    eprintln!(
        "full stream: {accepted} webhooks accepted, then {:?}; {failures} failed publishes, spool {spooled} bytes, stream {} messages",
        statuses.last(),
        nats.stream_messages().await
    );
    let log = || edge.log.lock().map(|l| l.join("\n")).unwrap_or_default();
    assert_eq!(
        statuses.last(),
        Some(&Some(503)),
        "never answered 503; log:\n{}",
        log()
    );
    assert!(
        accepted > 0 && failures > 0.0 && spooled > 0.0,
        "not the chain stream full -> spool -> 503; log:\n{}",
        log()
    );
    // Writers arrive: the stream drains, the spool replays into it, the ESP retries the 503s.
    let _writer = spawn_role(&w.db_url, &urls, "writer", &[]);
    let mut expected = Vec::new();
    for (i, s) in statuses.iter().enumerate() {
        if *s != Some(200) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while w.webhook(&edge, &w.msgs[i]).await != Some(200) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "retry of {i} never accepted"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        expected.push((i, vec!["delivered"]));
    }
    w.assert_exactly_once(&expected, Duration::from_secs(60))
        .await;
}

/// A bus edge has no database, so Mailgun's replay protection (a signature token remembered
/// with its body's digest by every instance) lives in a JetStream key-value bucket: two edges
/// whose `DATABASE_URL` points at nothing take a Mailgun delivery, its re-delivery at the
/// other edge, and refuse the captured signature with a forged body at the other edge; they
/// take pixels and clicks too, and everything accepted is stored once by the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_edges_without_a_database_share_mailgun_replay_protection_through_the_bus() {
    const KEY: &str = "key-0123456789abcdef-bus";
    let (nats, w, _slot) = up(2, fresh_database().await).await;
    let urls = nats.urls();
    // Room in the test cluster's 1 GB file store for the token bucket (1/16 of this).
    let room = ("REACHLY_BUS_MAX_BYTES", "268435456");
    let writer = spawn_role(&w.db_url, &urls, "writer", &[room]);
    // Nothing listens on port 1: any use of the database by an edge would fail.
    let nowhere = "postgres://reachly@127.0.0.1:1/nothing";
    let mailgun = [
        ("REACHLY_MAILGUN_SIGNING_KEY", KEY),
        ("REACHLY_MIGRATE_ON_START", "false"),
        room,
    ];
    let edges = [
        spawn_role(nowhere, &urls, "edge", &mailgun),
        spawn_role(nowhere, &urls, "edge", &mailgun),
    ];
    for p in edges.iter().chain(std::iter::once(&writer)) {
        ready(p).await;
    }
    let fixture = std::fs::read_to_string(format!(
        "{}/tests/fixtures/mailgun/delivered.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture");
    let signed = |i: usize, event_id: &str, token: &str| -> String {
        let text = fixture
            .replace(
                crate::webhooks_common::FIXTURE_ORG,
                &w.msgs[i].org.to_string(),
            )
            .replace(
                crate::webhooks_common::FIXTURE_MESSAGES[0],
                &w.msgs[i].message.to_string(),
            );
        let mut doc: serde_json::Value = serde_json::from_str(&text).expect("json");
        doc["event-data"]["id"] = serde_json::Value::from(event_id);
        let ts = chrono::Utc::now().timestamp().to_string();
        doc["signature"] = serde_json::json!({
            "timestamp": ts, "token": token,
            "signature": reachly_ingest::webhooks::testkit::sign::mailgun_signature(KEY, &ts, token),
        });
        doc.to_string()
    };
    let post = |edge: &ServeProcess, body: String| {
        let req = w
            .http
            .post(edge.url("/webhooks/mailgun"))
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(15))
            .body(body);
        async move {
            let r = req.send().await.ok()?;
            let status = r.status().as_u16();
            if status != 200 {
                eprintln!(
                    "mailgun at an edge: {status} {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Some(status)
        }
    };
    let token = format!("{}{}", Uuid::new_v4().simple(), "0123456789abcdefff");
    let genuine = signed(0, "bus-mg-1", &token);
    assert_eq!(post(&edges[0], genuine.clone()).await, Some(200));
    // The ESP re-delivers the same request to the other edge: accepted, stored once.
    assert_eq!(post(&edges[1], genuine).await, Some(200));
    // The captured signature with another body (message 1's event) at the other edge.
    let forged = signed(1, "bus-mg-forged", &token);
    assert_eq!(post(&edges[1], forged).await, Some(401));
    // A new token is a new request.
    let token2 = format!("{}{}", Uuid::new_v4().simple(), "0123456789abcdefff");
    assert_eq!(
        post(&edges[1], signed(1, "bus-mg-2", &token2)).await,
        Some(200)
    );
    // Pixels and clicks need no database at an edge either.
    assert!(
        w.pixel(&edges[0], &w.msgs[0]).await,
        "pixel at a database-less edge"
    );
    assert!(
        w.click(&edges[1], &w.msgs[0]).await,
        "click at a database-less edge"
    );
    let tracked = || {
        let (db, m) = (&w.db, w.msgs[0].message);
        async move {
            db.query_one(
                "SELECT count(*) FROM email_events WHERE provider = 'reachly' AND message_id = $1",
                &[&m],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    let count = |i: usize| {
        let (db, m) = (&w.db, w.msgs[i].message);
        async move {
            db.query_one(
                "SELECT count(*) FROM email_events WHERE provider = 'mailgun' AND message_id = $1",
                &[&m],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(0).await < 1 || count(1).await < 1 || tracked().await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the accepted Mailgun events did not reach the database"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let anything still in flight land before the final count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tracked().await, 2, "the open and the click, once each");
    assert_eq!(count(0).await, 1, "the genuine event, once");
    assert_eq!(
        count(1).await,
        1,
        "only the newly signed event, not the forged one"
    );
    let forged_rows: i64 =
        w.db.query_one(
            "SELECT count(*) FROM email_events WHERE metadata::text LIKE '%bus-mg-forged%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(forged_rows, 0);
}
