//! The on-disk spool: where events go when the in-memory buffer is full or the database is
//! down, so that an acknowledged event survives an outage and a restart.
//!
//! Layout: `REACHLY_SPOOL_DIR/spool-<seq>.log` segments of records
//! `[u32 LE payload length][u32 LE CRC-32 of payload][payload: JSON array of records]`, one
//! record per accepted envelope. One thread owns the active segment; it takes appends over a
//! crossbeam channel, writes every append waiting in the channel in one `write`,
//! `fdatasync`s once (group commit), and only then acknowledges them: a webhook is answered 2xx after its record is
//! on disk. If any write or sync of a group fails, every envelope of the group is rejected
//! (its sender answers 503 and retries), not only the one whose write failed, and the
//! group's bytes are cut off the segment again. The replayer asks the thread to *seal* the active segment, reads sealed segments
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
/// Write buffers larger than this (after a huge envelope) are freed, not kept for reuse.
const SCRATCH_KEEP_BYTES: usize = 4 << 20;

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

/// The spool thread, returned by [`Spool::open`]: joined on shutdown, after
/// [`Spool::close`], so the last appends are on disk before the process exits.
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
            unwritten: Vec::new(),
            scratch: Vec::new(),
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
    /// The segment appended to: its path, file and size (including `unwritten`).
    active: Option<(PathBuf, File, u64)>,
    /// The group's records for the active segment, not yet written: a group reaches the
    /// file in one `write` (before its sync, or before the segment is rotated), not one per
    /// envelope, which was the spool thread's pace under a flood of one-event envelopes.
    unwritten: Vec<u8>,
    /// Reused to serialise one envelope's records.
    scratch: Vec<u8>,
    next_seq: u64,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
    metrics: Metrics,
}

/// The appends written since the last `fdatasync` (group commit): acknowledged together once
/// it succeeds; all rejected if any write of the group, the sync of a segment it filled, or
/// its own sync fails. A failed group is cut off the segments again (best effort), so the
/// spool holds what it held before the group and a rejected envelope is not replayed.
#[derive(Default)]
struct Group {
    acks: Vec<(Option<Ack>, usize)>,
    /// Where the group's bytes begin in each segment it wrote to (one, or two if the active
    /// segment was rotated during the group).
    starts: Vec<(PathBuf, u64)>,
    /// Bytes of the group's complete records (accounted in `ThreadState::bytes`).
    bytes: u64,
}

/// Why an append was not written.
enum AppendError {
    /// Refused before anything was written (spool full, unserialisable, no new segment):
    /// the rest of the group is unaffected.
    Refused(NotDurable),
    /// A write or sync failed: the whole group fails.
    Io,
}

impl ThreadState {
    fn run(mut self, rx: Receiver<Command>) {
        let gauge = self.metrics.gauge(metrics::SPOOL_BYTES, &[]);
        let mut closed = false;
        while !closed {
            let Ok(first) = rx.recv() else { break };
            // Group commit: everything already waiting is written before one fdatasync.
            let mut group = Group::default();
            for cmd in std::iter::once(first).chain(rx.try_iter().take(4096)) {
                match cmd {
                    Command::Append(env) => {
                        let n = env.records.len();
                        match self.write(&env.records, &mut group) {
                            Ok(()) => group.acks.push((env.ack, n)),
                            Err(AppendError::Refused(why)) => {
                                self.metrics.dropped(why.reason(), n as u64);
                                reject(env.ack, why);
                            }
                            Err(AppendError::Io) => {
                                self.metrics.dropped(NotDurable::SpoolIo.reason(), n as u64);
                                reject(env.ack, NotDurable::SpoolIo);
                                self.fail(&mut group);
                            }
                        }
                    }
                    Command::Seal(reply) => {
                        self.commit(&mut group);
                        self.active = None;
                        let _ = reply.send(list_segments(&self.dir).unwrap_or_default());
                    }
                    Command::Close => closed = true,
                }
            }
            self.commit(&mut group);
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

    /// Appends one envelope's records to the group (buffered in `unwritten`; written by
    /// [`ThreadState::write_out`]).
    fn write(&mut self, records: &[Record], group: &mut Group) -> Result<(), AppendError> {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        let appended = self.append_payload(records, &mut payload, group);
        if payload.capacity() <= SCRATCH_KEEP_BYTES {
            self.scratch = payload;
        }
        appended
    }

    /// `write`'s body, with `payload` the buffer to serialise into.
    fn append_payload(
        &mut self,
        records: &[Record],
        payload: &mut Vec<u8>,
        group: &mut Group,
    ) -> Result<(), AppendError> {
        let refused = AppendError::Refused;
        serde_json::to_writer(&mut *payload, records).map_err(|_| refused(NotDurable::SpoolIo))?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD_BYTES)
            .ok_or(refused(NotDurable::TooLarge))?;
        let total = HEADER_BYTES + u64::from(len);
        if total > self.max_bytes {
            return Err(refused(NotDurable::TooLarge));
        }
        if self.bytes.load(Ordering::Relaxed) + total > self.max_bytes {
            return Err(refused(NotDurable::SpoolFull));
        }
        if self
            .active
            .as_ref()
            .is_some_and(|(_, _, size)| *size >= SEGMENT_TARGET_BYTES)
        {
            // The group's records in the full segment must be on disk before it is let go:
            // only the active segment is synced at the end of the group.
            let written = self.write_out().is_ok();
            let synced = written
                && self.active.as_ref().is_some_and(|(path, f, _)| {
                    f.sync_data()
                        .inspect_err(|e| tracing::error!(error = %e, path = %path.display(), "spool sync failed"))
                        .is_ok()
                });
            if !synced {
                return Err(AppendError::Io);
            }
            self.active = None;
        }
        if self.active.is_none() {
            let path = self.dir.join(format!("spool-{:016}.log", self.next_seq));
            self.next_seq += 1;
            let file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| {
                tracing::error!(error = %e, path = %path.display(), "cannot create spool segment");
                refused(NotDurable::SpoolIo)
            })?;
            // The new file's directory entry must survive a crash too.
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
            self.active = Some((path, file, 0));
        }
        let Some((path, _, size)) = self.active.as_mut() else {
            return Err(refused(NotDurable::SpoolIo));
        };
        if !group.starts.iter().any(|(p, _)| p == path) {
            group.starts.push((path.clone(), *size));
        }
        self.unwritten.extend_from_slice(&len.to_le_bytes());
        self.unwritten
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.unwritten.extend_from_slice(payload);
        *size += total;
        group.bytes += total;
        self.bytes.fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the group's buffered records to the active segment.
    fn write_out(&mut self) -> io::Result<()> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let result = match &mut self.active {
            Some((path, file, _)) => file.write_all(&self.unwritten).inspect_err(
                |e| tracing::error!(error = %e, path = %path.display(), "spool write failed"),
            ),
            None => Err(io::Error::other(
                "no active spool segment for buffered records",
            )),
        };
        self.unwritten.clear();
        if self.unwritten.capacity() > SCRATCH_KEEP_BYTES {
            self.unwritten = Vec::new();
        }
        result
    }

    /// Ends the group: one write and one fdatasync of the active segment, then every ack;
    /// or, if either fails, the group fails.
    fn commit(&mut self, group: &mut Group) {
        if group.acks.is_empty() && group.starts.is_empty() {
            return;
        }
        if self.write_out().is_err() {
            self.fail(group);
            return;
        }
        let synced = match &self.active {
            Some((path, f, _)) => f
                .sync_data()
                .inspect_err(
                    |e| tracing::error!(error = %e, path = %path.display(), "spool sync failed"),
                )
                .is_ok(),
            // Rotated away during the group: that segment was synced then.
            None => true,
        };
        if !synced {
            self.fail(group);
            return;
        }
        let spooled: usize = group.acks.iter().map(|(_, n)| n).sum();
        for (ack, _) in group.acks.drain(..) {
            if let Some(ack) = ack {
                let _ = ack.send(Ok(()));
            }
        }
        self.metrics
            .counter(metrics::EVENTS_SPOOLED_TOTAL, &[])
            .increment(spooled as u64);
        *group = Group::default();
    }

    /// Rejects every envelope of the group, cuts the group's bytes off the segments it wrote
    /// to, and seals the active segment (after a failed write or sync its state is unknown:
    /// later appends go to a new one).
    fn fail(&mut self, group: &mut Group) {
        self.unwritten.clear();
        for (ack, n) in group.acks.drain(..) {
            self.metrics.dropped(NotDurable::SpoolIo.reason(), n as u64);
            reject(ack, NotDurable::SpoolIo);
        }
        for (path, start) in group.starts.drain(..) {
            let cut = match &self.active {
                Some((p, f, _)) if *p == path => f.set_len(start).and_then(|()| f.sync_data()),
                _ => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(start).and_then(|()| f.sync_data())),
            };
            if let Err(e) = cut {
                // Its complete records may then be replayed: at least once, never acked-and-lost.
                tracing::error!(error = %e, path = %path.display(), "cannot cut a failed spool group off its segment");
            }
        }
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(group.bytes))
            });
        *group = Group::default();
        self.active = None;
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

/// Reads a whole sealed segment (tests and tools; the replayers read with
/// [`SegmentReader`], a batch at a time).
pub fn read_segment(path: &Path) -> io::Result<SegmentContents> {
    let mut reader = SegmentReader::open(path)?;
    let mut out = SegmentContents::default();
    while let Some(records) = reader.next_envelope()? {
        out.envelopes.push(records);
    }
    out.torn_records = reader.torn_records;
    Ok(out)
}

/// Reads a sealed segment envelope by envelope, so a replay holds one batch of it in memory
/// rather than the whole segment (up to 32 MiB of JSON, more once parsed, and outside the
/// buffer's bounds). Stops at the first record that is cut short or fails its checksum:
/// its length prefix cannot be trusted to find the next one.
pub struct SegmentReader {
    r: BufReader<File>,
    ended: bool,
    /// Records found cut short, corrupt or unparsable (at most one: reading stops there).
    pub torn_records: u64,
}

impl SegmentReader {
    pub fn open(path: &Path) -> io::Result<SegmentReader> {
        Ok(SegmentReader {
            r: BufReader::new(File::open(path)?),
            ended: false,
            torn_records: 0,
        })
    }

    /// The next envelope's records; `None` at the end of the segment or at a torn record.
    pub fn next_envelope(&mut self) -> io::Result<Option<Vec<Record>>> {
        if self.ended {
            return Ok(None);
        }
        let record = self.read_record();
        if !matches!(record, Ok(Some(_))) {
            self.ended = true;
        }
        record
    }

    /// Envelopes until they hold at least `events` records, or the segment ends (empty then).
    pub fn next_batch(&mut self, events: usize) -> io::Result<Vec<Vec<Record>>> {
        let mut batch = Vec::new();
        let mut n = 0;
        while n < events {
            let Some(records) = self.next_envelope()? else {
                break;
            };
            n += records.len();
            batch.push(records);
        }
        Ok(batch)
    }

    fn read_record(&mut self) -> io::Result<Option<Vec<Record>>> {
        let mut header = [0u8; HEADER_BYTES as usize];
        match read_full(&mut self.r, &mut header)? {
            0 => return Ok(None),
            n if n < header.len() => return Ok(self.torn()),
            _ => {}
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD_BYTES {
            return Ok(self.torn());
        }
        let mut payload = vec![0u8; len as usize];
        if read_full(&mut self.r, &mut payload)? < payload.len() || crc32fast::hash(&payload) != crc
        {
            return Ok(self.torn());
        }
        match serde_json::from_slice::<Vec<Record>>(&payload) {
            Ok(records) => Ok(Some(records)),
            Err(_) => Ok(self.torn()),
        }
    }

    fn torn(&mut self) -> Option<Vec<Record>> {
        self.torn_records += 1;
        None
    }
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
            accepted_ms: 0,
            memory: 0,
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

    /// Envelopes queued together are each acknowledged and read back a batch at a time (a
    /// replay holds one batch of a segment, not the segment), the batches ending where a
    /// torn tail begins.
    #[tokio::test]
    async fn queued_envelopes_are_acknowledged_and_read_back_a_batch_at_a_time() {
        let dir = tempdir();
        let (spool, thread) = Spool::open(&dir, 1 << 20, Metrics::new()).unwrap();
        let sizes = [2, 3, 4, 1, 5];
        let mut acks = Vec::new();
        let mut sent = Vec::new();
        for n in sizes {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let batch = records(n);
            sent.push(batch.clone());
            spool.append(Envelope {
                records: batch,
                ack: Some(tx),
                accepted_ms: 0,
                memory: 0,
            });
            acks.push(rx);
        }
        for rx in acks {
            assert_eq!(rx.await.unwrap(), Ok(()));
        }
        let sealed = spool.seal();
        assert_eq!(sealed.len(), 1);
        // A torn record after the five: the reader stops there and counts it.
        let mut f = OpenOptions::new().append(true).open(&sealed[0]).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut reader = SegmentReader::open(&sealed[0]).unwrap();
        let lens = |b: Vec<Vec<Record>>| b.iter().map(Vec::len).collect::<Vec<_>>();
        let first = reader.next_batch(5).unwrap();
        assert_eq!(
            first,
            sent[..2].to_vec(),
            "2 + 3 events reach the batch size"
        );
        assert_eq!(lens(reader.next_batch(5).unwrap()), vec![4, 1]);
        assert_eq!(lens(reader.next_batch(5).unwrap()), vec![5]);
        assert_eq!(reader.torn_records, 0);
        assert!(reader.next_batch(5).unwrap().is_empty(), "the end");
        assert_eq!(reader.torn_records, 1);
        assert!(
            reader.next_batch(5).unwrap().is_empty(),
            "and it stays ended"
        );
        assert_eq!(reader.torn_records, 1);
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
            accepted_ms: 0,
            memory: 0,
        });
        assert_eq!(rx.await.unwrap(), Ok(()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append(Envelope {
            records: records(5),
            ack: Some(tx),
            accepted_ms: 0,
            memory: 0,
        });
        assert_eq!(rx.await.unwrap(), Err(NotDurable::SpoolFull));
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append(Envelope {
            records: records(50),
            ack: Some(tx),
            accepted_ms: 0,
            memory: 0,
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

    /// A tmpfs of `bytes` mounted on a fresh directory (the test runs as root, as the suite
    /// does); unmounted and removed on drop, however the test ends.
    struct TinyFilesystem(PathBuf);

    impl TinyFilesystem {
        fn mount(bytes: u64) -> TinyFilesystem {
            let dir = tempdir();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(&dir)
                .output()
                .expect("run mount");
            assert!(
                out.status.success(),
                "this test mounts a small tmpfs to make a real write fail (needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            TinyFilesystem(dir)
        }
    }

    impl Drop for TinyFilesystem {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn envelope(
        records: Vec<Record>,
    ) -> (
        Envelope,
        tokio::sync::oneshot::Receiver<Result<(), NotDurable>>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Envelope {
                records,
                ack: Some(tx),
                accepted_ms: 0,
                memory: 0,
            },
            rx,
        )
    }

    fn outcome(
        mut rx: tokio::sync::oneshot::Receiver<Result<(), NotDurable>>,
    ) -> Result<(), NotDurable> {
        rx.try_recv().expect("every envelope is answered")
    }

    #[test]
    fn a_failed_write_fails_every_envelope_of_its_group_and_leaves_the_spool_as_before() {
        let fs_ = TinyFilesystem::mount(64 << 10);
        let dir = fs_.0.join("spool");
        fs::create_dir_all(&dir).unwrap();
        let metrics = Metrics::new();
        let bytes = Arc::new(AtomicU64::new(0));
        let state = ThreadState {
            dir: dir.clone(),
            lock: File::create(dir.join("spool.lock")).unwrap(),
            active: None,
            unwritten: Vec::new(),
            scratch: Vec::new(),
            next_seq: 1,
            bytes: bytes.clone(),
            max_bytes: 1 << 30,
            metrics: metrics.clone(),
        };
        let big = |n: usize| -> Vec<Record> {
            (0..n)
                .map(|_| {
                    let mut e =
                        Event::new(Uuid::new_v4(), EventType::Opened, Utc::now(), Source::Pixel);
                    e.user_agent = Some("x".repeat(1000));
                    Record::Event(e)
                })
                .collect()
        };
        let (before, before_rx) = envelope(records(2));
        let (a, a_rx) = envelope(records(2));
        let (b, b_rx) = envelope(records(3));
        // About 100 KiB: more than the whole filesystem.
        let (c, c_rx) = envelope(big(100));
        let (after, after_rx) = envelope(records(4));
        let kept = [before.records.clone(), after.records.clone()];
        // Queued before the thread runs, so the groups are exactly: [before] (ended by a
        // seal), then [a, b, c] (ended by a seal; the group's one write fails, since c does
        // not fit), then [after].
        let (tx, rx) = crossbeam_channel::unbounded();
        let (seal_tx, seal_rx) = crossbeam_channel::bounded(1);
        let (seal2_tx, seal2_rx) = crossbeam_channel::bounded(1);
        tx.send(Command::Append(before)).unwrap();
        tx.send(Command::Seal(seal_tx)).unwrap();
        for env in [a, b, c] {
            tx.send(Command::Append(env)).unwrap();
        }
        tx.send(Command::Seal(seal2_tx)).unwrap();
        tx.send(Command::Append(after)).unwrap();
        tx.send(Command::Close).unwrap();
        state.run(rx);

        assert_eq!(seal_rx.try_recv().unwrap().len(), 1);
        assert!(seal2_rx.try_recv().is_ok(), "the second seal was answered");
        assert_eq!(outcome(before_rx), Ok(()));
        assert_eq!(
            outcome(a_rx),
            Err(NotDurable::SpoolIo),
            "a was in the failed group"
        );
        assert_eq!(
            outcome(b_rx),
            Err(NotDurable::SpoolIo),
            "b was in the failed group"
        );
        assert_eq!(outcome(c_rx), Err(NotDurable::SpoolIo));
        assert_eq!(outcome(after_rx), Ok(()), "the next group starts afresh");
        // On disk: exactly the acknowledged envelopes, no torn record of the failed group.
        let mut envelopes = Vec::new();
        let mut on_disk = 0;
        for seg in list_segments(&dir).unwrap() {
            let contents = read_segment(&seg).unwrap();
            assert_eq!(contents.torn_records, 0, "{}", seg.display());
            envelopes.extend(contents.envelopes);
            on_disk += fs::metadata(&seg).unwrap().len();
        }
        assert_eq!(envelopes, kept);
        assert_eq!(bytes.load(Ordering::Relaxed), on_disk, "accounted bytes");
        let text = metrics.render();
        assert!(
            text.contains(r#"reachly_events_dropped_total{reason="spool_io_error"} 105"#),
            "{text}"
        );
        assert!(text.contains("reachly_events_spooled_total 6"), "{text}");
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
