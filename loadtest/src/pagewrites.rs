//! Where the data-page writes go, per relation (issue 14): PostgreSQL 15 counts written
//! pages only in total (`pg_stat_bgwriter`), so a sampler reads the dirty buffers from
//! `pg_buffercache` once a second during a phase. A buffer that was dirty in one sample and
//! is clean or gone in the next was written (a dirty page leaves shared buffers only through
//! a write: checkpointer, background writer or a backend evicting it); the buffers still
//! dirty at the end are written by the phase's final CHECKPOINT, which the caller runs
//! right after [`Sampler::finish`]. A page written and dirtied again between two samples is
//! counted once, so the attribution is a lower bound; the report sets its sum beside the
//! server's own count as the coverage.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;

/// Dirty buffers of this database: (relfilenode, fork, block).
type Dirty = HashSet<(u32, i16, i64)>;

const DIRTY_SQL: &str = "SELECT relfilenode::int8, relforknumber::int2, relblocknumber::int8 \
     FROM pg_buffercache \
     WHERE isdirty AND reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())";

async fn dirty(c: &tokio_postgres::Client) -> anyhow::Result<Dirty> {
    Ok(c.query(DIRTY_SQL, &[])
        .await
        .context("reading pg_buffercache")?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get(1), r.get(2)))
        .collect())
}

/// Pages written (estimated) per relation of one phase.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    /// (relation, kind, parent table or index of a partition's relation, pages), most first.
    pub rows: Vec<(String, String, String, u64)>,
    pub samples: u64,
}

impl Attribution {
    pub fn total(&self) -> u64 {
        self.rows.iter().map(|r| r.3).sum()
    }

    /// A Markdown table: pages per relation, per 1,000 events, share; `counted` is the
    /// server's own count of pages written in the phase (for the coverage line) and
    /// `extended` the pages added to relations in it (PostgreSQL 15 counts each such
    /// extension as a backend write; the sampler sees the page's later write of its data).
    pub fn markdown(
        &self,
        events: f64,
        counted: Option<(f64, [i64; 3])>,
        extended: Option<f64>,
    ) -> String {
        let total = self.total().max(1) as f64;
        let mut s = String::from(
            "| relation | kind | of | pages written | per 1,000 events | share |\n| --- | --- | --- | --- | --- | --- |\n",
        );
        for (rel, kind, parent, pages) in &self.rows {
            if (*pages as f64) < total * 0.002 {
                continue;
            }
            s.push_str(&format!(
                "| {rel} | {kind} | {parent} | {pages} | {:.1} | {:.1}% |\n",
                1000.0 * *pages as f64 / events.max(1.0),
                100.0 * *pages as f64 / total
            ));
        }
        s.push_str(&format!(
            "\n{} samples of `pg_buffercache`, one a second, plus the buffers dirty before the final CHECKPOINT; relations under 0.2% left out. Attributed: {} pages{}.\n",
            self.samples,
            self.total(),
            match counted {
                Some((c, by)) if c > 0.0 => {
                    let ext = extended.unwrap_or(0.0).clamp(0.0, c);
                    format!(
                        " of the {} the server counted (`pg_stat_bgwriter`: {} by the checkpointer, {} by the background writer, {} by backends and autovacuum workers), of which {} are relation extensions (zero-filled pages added to a file, which PostgreSQL 15 counts as backend writes; their data is written later and counted again): {:.0}% of the {} writes of data covered; a page written and dirtied again within a second counts once, and one that is dirtied and written within a second (a VACUUM's ring buffer, a backend's bulk-write ring) is not seen",
                        c as u64,
                        by[0],
                        by[1],
                        by[2],
                        ext as u64,
                        100.0 * self.total() as f64 / (c - ext).max(1.0),
                        (c - ext) as u64
                    )
                }
                _ => String::new(),
            }
        ));
        s
    }
}

/// Pins the calling thread (not its process) to `cpu`.
fn pin_this_thread(cpu: usize) -> anyhow::Result<()> {
    let link = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
    let tid: u32 = link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no thread id in {}", link.display()))?;
    let out = std::process::Command::new("taskset")
        .args(["-p", "-c", &cpu.to_string(), &tid.to_string()])
        .output()
        .context("running taskset (install util-linux)")?;
    anyhow::ensure!(
        out.status.success(),
        "taskset -p -c {cpu} {tid} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// What the sampling task hands back: pages written per relfilenode, the last sample, and
/// how many samples it took.
type Sampled = (HashMap<u32, u64>, Dirty, u64);

pub struct Sampler {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<Sampled>>,
    url: String,
}

/// Whether the server can load `pg_buffercache` (Debian's postgresql-15 ships it).
pub async fn available(url: &str) -> bool {
    match reachly_ingest::db::connect(url).await {
        Ok(c) => c
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_buffercache")
            .await
            .is_ok(),
        Err(_) => false,
    }
}

impl Sampler {
    /// Starts sampling (the extension must exist: [`available`]) on a thread of its own,
    /// pinned to `cpu` (the database's core). Not on the generator's runtime: late in a
    /// phase a sample is up to 32,768 dirty buffers (all of `shared_buffers`), several
    /// milliseconds of decoding and set arithmetic every second, which on the generator's
    /// one thread delayed the requests due meanwhile and showed as tracking latency.
    pub async fn start(url: &str, cpu: usize) -> anyhow::Result<Sampler> {
        let c = reachly_ingest::db::connect(url).await?;
        let first = dirty(&c).await?;
        drop(c);
        let (stop, mut stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<()>>();
        let owned_url = url.to_string();
        let thread = std::thread::Builder::new()
            .name("page-sampler".into())
            .spawn(move || -> anyhow::Result<Sampled> {
                let started = pin_this_thread(cpu).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("the sampler's runtime")
                });
                let rt = match started {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(()));
                        rt
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        anyhow::bail!(msg);
                    }
                };
                rt.block_on(async move {
                    let c = reachly_ingest::db::connect(&owned_url).await?;
                    let mut written: HashMap<u32, u64> = HashMap::new();
                    let mut prev = first;
                    let mut samples = 1u64;
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        // The database may be briefly unreachable; skip a sample then.
                        let Ok(cur) = dirty(&c).await else { continue };
                        for k in prev.difference(&cur) {
                            *written.entry(k.0).or_default() += 1;
                        }
                        prev = cur;
                        samples += 1;
                    }
                    Ok((written, prev, samples))
                })
            })
            .context("starting the sampler's thread")?;
        ready_rx.await.context("the sampler's thread")??;
        Ok(Sampler {
            stop,
            thread,
            url: url.to_string(),
        })
    }

    /// The last sample and the attribution; the caller then runs its CHECKPOINT, which
    /// writes what was still dirty.
    pub async fn finish(self) -> anyhow::Result<Attribution> {
        let _ = self.stop.send(());
        let thread = self.thread;
        let (mut written, prev, samples) = tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("the sampler")?
            .map_err(|_| anyhow::anyhow!("the sampler's thread panicked"))??;
        let c = reachly_ingest::db::connect(&self.url).await?;
        let last = dirty(&c).await?;
        for k in prev.difference(&last) {
            *written.entry(k.0).or_default() += 1;
        }
        for k in &last {
            *written.entry(k.0).or_default() += 1;
        }
        // Names: a partition's relation also names its parent table or index.
        let names: HashMap<u32, (String, String, String)> = c
            .query(
                "SELECT pg_relation_filenode(c.oid)::int8, c.relname::text, \
                        CASE c.relkind WHEN 'r' THEN 'table' WHEN 'i' THEN 'index' WHEN 't' THEN 'toast' \
                             WHEN 'S' THEN 'sequence' ELSE c.relkind::text END, \
                        COALESCE((SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                                  WHERE i.inhrelid = c.oid LIMIT 1), '') \
                 FROM pg_class c WHERE pg_relation_filenode(c.oid) IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u32, (r.get(1), r.get(2), r.get(3))))
            .collect();
        let mut rows: Vec<(String, String, String, u64)> = written
            .into_iter()
            .map(|(node, pages)| {
                let (rel, kind, parent) = names
                    .get(&node)
                    .cloned()
                    .unwrap_or_else(|| (format!("filenode {node}"), "?".into(), String::new()));
                (rel, kind, parent, pages)
            })
            .collect();
        rows.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| a.0.cmp(&b.0)));
        Ok(Attribution {
            rows,
            samples: samples + 1,
        })
    }
}
