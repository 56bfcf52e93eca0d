//! The on-disk spool: where events go when the in-memory buffer is full or the database is
//! down, so that an acknowledged event survives an outage and a restart.
//!
//! Layout: `REACHLY_SPOOL_DIR/spool-<seq>.log` segments of records
//! `[u32 LE payload length][u32 LE CRC-32 of payload][payload: JSON array of records]`, one
//! record per accepted envelope. One thread owns the active segment; it takes appends over a
//! crossbeam channel, writes every append waiting in the channel, `fdatasync`s once (group
//! commit), and only then acknowledges them: a webhook is answered 2xx after its record is
//! on disk. The replayer asks the thread to *seal* the active segment, reads sealed segments
//! back, and deletes each one once its events are committed. A record cut short by a crash
//! (or whose checksum fails) ends its segment's replay and is counted, never replayed as
//! garbage. A lock file keeps two processes from sharing one spool directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context as _;
use crossbeam_channel::{Receiver, Sender};

use super::{Ack, Envelope, NotDurable};
use crate::event::Record;
use crate::metrics::{self, Metrics};

/// A record larger than this is not believed (a corrupt length prefix).
const MAX_RECORD_BYTES: u32 = 256 << 20;
/// The active segment is sealed once it grows past this, so replay can start on it.
const SEGMENT_TARGET_BYTES: u64 = 32 << 20;
const HEADER_BYTES: u64 = 8;

enum Command {
    Append(Envelope),
    /// Seal the active segment (if it holds anything) and reply with all sealed segments.
    Seal(crossbeam_channel::Sender<Vec<PathBuf>>),
    /// Sync and stop; later appends are refused.
    Close,
}

/// Cheap-to-clone handle on the spool thread.
#[derive(Clone)]
pub struct Spool {
    tx: Sender<Command>,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
    dir: PathBuf,
}

/// What the spool thread needs; returned by [`Spool::open`] with its join handle.
pub struct SpoolThread {
    pub handle: JoinHandle<()>,
}

impl Spool {
    /// Opens (creating) the spool directory, locks it, accounts existing segments, and starts
    /// the spool thread. Existing segments are sealed: they await replay.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        metrics: Metrics,
    ) -> anyhow::Result<(Spool, SpoolThread)> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating spool directory {}", dir.display()))?;
        let lock = File::create(dir.join("spool.lock")).context("creating the spool lock file")?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "spool directory {} is in use by another process; give each instance its own REACHLY_SPOOL_DIR",
                dir.display()
            )
        })?;
        let segments = list_segments(dir)?;
        let bytes: u64 = segments
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let next_seq = segments
            .iter()
            .filter_map(|p| segment_seq(p))
            .max()
            .map_or(1, |s| s + 1);
        let bytes = Arc::new(AtomicU64::new(bytes));
        let (tx, rx) = crossbeam_channel::unbounded();
        let state = ThreadState {
            dir: dir.to_path_buf(),
            lock,
            active: None,
            next_seq,
            bytes: bytes.clone(),
            max_bytes,
            metrics: metrics.clone(),
        };
        metrics
            .gauge(metrics::SPOOL_BYTES, &[])
            .set(bytes.load(Ordering::Relaxed) as f64);
        let handle = std::thread::Builder::new()
            .name("reachly-spool".into())
            .spawn(move || state.run(rx))
            .context("starting the spool thread")?;
        Ok((
            Spool {
                tx,
                bytes,
                max_bytes,
                dir: dir.to_path_buf(),
            },
            SpoolThread { handle },
        ))
    }

    /// Hands an envelope to the spool thread; its ack (if any) resolves once it is on disk,
    /// or with an error if it could not be (spool full, I/O error, spool closed).
    pub fn append(&self, envelope: Envelope) {
        if let Err(crossbeam_channel::SendError(Command::Append(env))) =
            self.tx.send(Command::Append(envelope))
        {
            reject(env.ack, NotDurable::ShuttingDown);
        }
    }

    /// Stops the spool thread once everything before this call is on disk.
    pub fn close(&self) {
        let _ = self.tx.send(Command::Close);
    }

    /// Seals the active segment and returns every sealed segment, oldest first.
    pub fn seal(&self) -> Vec<PathBuf> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Command::Seal(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Deletes a replayed segment and releases its bytes.
    pub fn remove_segment(&self, path: &Path, metrics: &Metrics) -> io::Result<()> {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(path)?;
        let _ = File::open(&self.dir).and_then(|d| d.sync_all());
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(len))
            });
        metrics
            .gauge(metrics::SPOOL_BYTES, &[])
            .set(self.bytes() as f64);
        Ok(())
    }
}

fn reject(ack: Option<Ack>, why: NotDurable) {
    if let Some(ack) = ack {
        let _ = ack.send(Err(why));
    }
}

struct ThreadState {
    dir: PathBuf,
    /// Held for the thread's life: the directory lock.
    #[allow(dead_code)]
    lock: File,
    active: Option<(PathBuf, File, u64)>,
    next_seq: u64,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
    metrics: Metrics,
}

impl ThreadState {
    fn run(mut self, rx: Receiver<Command>) {
        let gauge = self.metrics.gauge(metrics::SPOOL_BYTES, &[]);
        let mut closed = false;
        while !closed {
            let Ok(first) = rx.recv() else { break };
            // Group commit: everything already waiting is written before one fdatasync.
            let mut pending: Vec<(Option<Ack>, usize)> = Vec::new();
            let mut dirty = false;
            for cmd in std::iter::once(first).chain(rx.try_iter().take(4096)) {
                match cmd {
                    Command::Append(env) => {
                        let n = env.records.len();
                        match self.write(&env.records) {
                            Ok(()) => {
                                dirty = true;
                                pending.push((env.ack, n));
                            }
                            Err(why) => {
                                self.metrics.dropped(why.reason(), n as u64);
                                reject(env.ack, why);
                            }
                        }
                    }
                    Command::Seal(reply) => {
                        if dirty {
                            self.sync(&mut pending);
                            dirty = false;
                        }
                        self.active = None;
                        let _ = reply.send(list_segments(&self.dir).unwrap_or_default());
                    }
                    Command::Close => closed = true,
                }
            }
            if dirty {
                self.sync(&mut pending);
            }
            gauge.set(self.bytes.load(Ordering::Relaxed) as f64);
        }
        // Anything sent after Close is refused and counted, not silently dropped.
        for cmd in rx.try_iter() {
            if let Command::Append(env) = cmd {
                self.metrics
                    .dropped(NotDurable::ShuttingDown.reason(), env.len() as u64);
                reject(env.ack, NotDurable::ShuttingDown);
            }
        }
    }

    fn write(&mut self, records: &[Record]) -> Result<(), NotDurable> {
        let payload = serde_json::to_vec(records).map_err(|_| NotDurable::SpoolIo)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD_BYTES)
            .ok_or(NotDurable::TooLarge)?;
        let total = HEADER_BYTES + u64::from(len);
        if total > self.max_bytes {
            return Err(NotDurable::TooLarge);
        }
        if self.bytes.load(Ordering::Relaxed) + total > self.max_bytes {
            return Err(NotDurable::SpoolFull);
        }
        if self
            .active
            .as_ref()
            .is_some_and(|(_, _, size)| *size >= SEGMENT_TARGET_BYTES)
        {
            self.active = None;
        }
        if self.active.is_none() {
            let path = self.dir.join(format!("spool-{:016}.log", self.next_seq));
            self.next_seq += 1;
            let file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| {
                tracing::error!(error = %e, path = %path.display(), "cannot create spool segment");
                NotDurable::SpoolIo
            })?;
            // The new file's directory entry must survive a crash too.
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
            self.active = Some((path, file, 0));
        }
        let Some((_, file, size)) = self.active.as_mut() else {
            return Err(NotDurable::SpoolIo);
        };
        let mut buf = Vec::with_capacity(total as usize);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        if let Err(e) = file.write_all(&buf) {
            tracing::error!(error = %e, "spool write failed");
            // The segment may now end in a partial record: seal it (replay detects the tear).
            self.active = None;
            return Err(NotDurable::SpoolIo);
        }
        *size += total;
        self.bytes.fetch_add(total, Ordering::Relaxed);
        self.metrics
            .counter(metrics::EVENTS_SPOOLED_TOTAL, &[])
            .increment(records.len() as u64);
        Ok(())
    }

    fn sync(&mut self, pending: &mut Vec<(Option<Ack>, usize)>) {
        let ok = match &self.active {
            Some((_, f, _)) => f.sync_data().is_ok(),
            None => true, // sealed after a failed write: those were already rejected
        };
        for (ack, n) in pending.drain(..) {
            if ok {
                if let Some(ack) = ack {
                    let _ = ack.send(Ok(()));
                }
            } else {
                self.metrics.dropped("spool_io_error", n as u64);
                reject(ack, NotDurable::SpoolIo);
            }
        }
    }
}

/// Every segment in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| segment_seq(p).is_some())
        .collect();
    segs.sort_by_key(|p| segment_seq(p));
    Ok(segs)
}

fn segment_seq(p: &Path) -> Option<u64> {
    p.file_name()?
        .to_str()?
        .strip_prefix("spool-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The records of one segment, and whether it ended in a torn or corrupt record.
#[derive(Debug, Default)]
pub struct SegmentContents {
    pub envelopes: Vec<Vec<Record>>,
    pub torn_records: u64,
}

/// Reads a sealed segment. Stops at the first record that is cut short or fails its
/// checksum: its length prefix cannot be trusted to find the next one.
pub fn read_segment(path: &Path) -> io::Result<SegmentContents> {
    let mut r = BufReader::new(File::open(path)?);
    let mut out = SegmentContents::default();
    loop {
        let mut header = [0u8; HEADER_BYTES as usize];
        match read_full(&mut r, &mut header)? {
            0 => break,
            n if n < header.len() => {
                out.torn_records += 1;
                break;
            }
            _ => {}
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD_BYTES {
            out.torn_records += 1;
            break;
        }
        let mut payload = vec![0u8; len as usize];
        if read_full(&mut r, &mut payload)? < payload.len() || crc32fast::hash(&payload) != crc {
            out.torn_records += 1;
            break;
        }
        match serde_json::from_slice::<Vec<Record>>(&payload) {
            Ok(records) => out.envelopes.push(records),
            Err(_) => {
                out.torn_records += 1;
                break;
            }
        }
    }
    Ok(out)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType, Source};
    use chrono::Utc;
    use uuid::Uuid;

    fn records(n: usize) -> Vec<Record> {
        (0..n)
            .map(|_| {
                Record::Event(Event::new(
                    Uuid::new_v4(),
                    EventType::Opened,
                    Utc::now(),
                    Source::Pixel,
                ))
            })
            .collect()
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("reachly-spool-test-{}", Uuid::new_v4()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn appended_records_are_acknowledged_after_sync_and_read_back() {
        let dir = tempdir();
        let (spool, thread) = Spool::open(&dir, 1 << 20, Metrics::new()).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = records(3);
        spool.append(Envelope {
            records: batch.clone(),
            ack: Some(tx),
        });
        assert_eq!(rx.await.unwrap(), Ok(()));
        let sealed = spool.seal();
        assert_eq!(sealed.len(), 1);
        let contents = read_segment(&sealed[0]).unwrap();
        assert_eq!(contents.envelopes, vec![batch]);
        assert_eq!(contents.torn_records, 0);
        assert!(spool.bytes() > 0);
        drop(spool);
        thread.handle.join().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_a_torn_tail_is_detected() {
        let dir = tempdir();
        // Room for five records, or one, but not both; fifty never fit.
        let size = |n| HEADER_BYTES + serde_json::to_vec(&records(n)).unwrap().len() as u64;
        let (spool, thread) = Spool::open(&dir, size(5) + size(1) / 2, Metrics::new()).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append(Envelope {
            records: records(1),
            ack: Some(tx),
        });
        assert_eq!(rx.await.unwrap(), Ok(()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append(Envelope {
            records: records(5),
            ack: Some(tx),
        });
        assert_eq!(rx.await.unwrap(), Err(NotDurable::SpoolFull));
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append(Envelope {
            records: records(50),
            ack: Some(tx),
        });
        assert_eq!(rx.await.unwrap(), Err(NotDurable::TooLarge));
        let sealed = spool.seal();
        drop(spool);
        thread.handle.join().unwrap();
        // Tear the last record by a few bytes, as a crash mid-write would.
        let f = OpenOptions::new().write(true).open(&sealed[0]).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 3).unwrap();
        let contents = read_segment(&sealed[0]).unwrap();
        assert_eq!(contents.envelopes.len(), 0);
        assert_eq!(contents.torn_records, 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_second_process_cannot_share_the_spool_directory() {
        let dir = tempdir();
        let (spool, thread) = Spool::open(&dir, 1 << 20, Metrics::new()).unwrap();
        let err = Spool::open(&dir, 1 << 20, Metrics::new()).err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(spool);
        thread.handle.join().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
