//! Archive, then drop; and restore. A day partition of `email_events` that has passed its
//! retention (or any past day an operator names) is exported to a self-describing file in
//! an archive directory, the file is verified against the partition, and only then is the
//! partition detached and dropped. `restore` loads an archived day back, idempotently.
//!
//! Files, per day (`email_events-YYYY-MM-DD.*`):
//!
//! | file | content |
//! | --- | --- |
//! | `.csv.zst` | PostgreSQL's own `COPY … TO STDOUT (FORMAT csv, HEADER)` of the partition, rows ordered by `(id, created_at)`, one zstd frame with its content checksum |
//! | `.manifest.json` | format and version, day, row count, SHA-256 of the CSV and of the file, byte sizes, the columns with their types, the database schema version |
//!
//! Why zstd-compressed CSV and not Parquet: an operator reads it with what is already on a
//! server (`zstdcat f.csv.zst | head`, `psql \copy … FROM PROGRAM 'zstdcat …'`), DuckDB and
//! pandas read `.csv.zst` directly, and PostgreSQL renders and parses every value itself
//! (jsonb, timestamptz, NULL vs empty string), so a restore is lossless without a type
//! mapping of ours. Parquet would be smaller and columnar, at the price of arrow's compile
//! and a mapping of every type; for a file that is mostly read back whole, CSV wins.
//!
//! The steps, and why a kill at any of them loses nothing ([`Step`] names them; a hidden
//! flag aborts the process right after one, for the crash tests):
//!
//! 1. `exported`: the partition is streamed into `.<name>.tmp-<pid>` and fsync'd, while the
//!    CSV's rows are counted and hashed (in a REPEATABLE READ snapshot, `TimeZone` UTC).
//! 2. `renamed`: the file is renamed into place and the directory fsync'd.
//! 3. `manifested`: the manifest is written the same way (tmp, fsync, rename, fsync dir).
//! 4. `verified_file`: the file is read back from disk, decompressed, counted and hashed;
//!    it must match the manifest.
//! 5. `verified_partition`: one transaction takes a SHARE lock on the partition (no row can
//!    change), renders it again and checks count and hash against the manifest;
//! 6. `detached`: … detaches it; 7. `dropped`: … drops it and commits.
//!
//! Until the commit of 5–7 the partition is untouched, so a crash leaves the partition (and
//! maybe a file that a re-run overwrites). After the commit, a verified archive exists. A
//! re-run of a day whose partition is gone re-verifies the archive and reports it.
//!
//! An archive is never overwritten with different content: when a day's partition exists
//! again (a restore, then new rows) and its export differs from the verified archive already
//! there, archiving that day fails with a message saying so, and the partition stays.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_postgres::{Client, GenericClient};

use super::partitions::partition_name;

/// `format` of every manifest.
pub const FORMAT: &str = "reachly-email-events-csv-zstd";
/// Bumped when the file layout changes (not when the table gains a column: the manifest
/// lists the columns, and a restore names them).
pub const FORMAT_VERSION: u32 = 1;
/// zstd level: 9 compresses this data close to level 19 at a fraction of the CPU
/// (benches/storage.rs measures it); archiving runs once a day per partition.
const ZSTD_LEVEL: i32 = 9;
/// Bytes handed between the database stream and the (blocking) file thread at a time.
const CHUNK: usize = 256 * 1024;

/// The steps of archiving a day, in order; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Exported,
    Renamed,
    Manifested,
    VerifiedFile,
    VerifiedPartition,
    Detached,
    Dropped,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Exported,
        Step::Renamed,
        Step::Manifested,
        Step::VerifiedFile,
        Step::VerifiedPartition,
        Step::Detached,
        Step::Dropped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Exported => "exported",
            Step::Renamed => "renamed",
            Step::Manifested => "manifested",
            Step::VerifiedFile => "verified_file",
            Step::VerifiedPartition => "verified_partition",
            Step::Detached => "detached",
            Step::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Result<Step, String> {
        Step::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
                format!("unknown archive step {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Where to abort the process (a simulated crash); `None` in production.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashAfter(pub Option<Step>);

impl CrashAfter {
    fn at(self, step: Step) {
        if self.0 == Some(step) {
            eprintln!(
                "reachly-ingest archive: crashing after step {}",
                step.name()
            );
            std::process::abort();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// `format_type` of the column, e.g. `timestamp with time zone`.
    #[serde(rename = "type")]
    pub type_name: String,
}

/// The `.manifest.json` of one archived day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub table: String,
    pub day: NaiveDate,
    /// Rows in the CSV (the header line not counted).
    pub rows: u64,
    /// SHA-256 (hex) of the uncompressed CSV, header included.
    pub csv_sha256: String,
    pub csv_bytes: u64,
    /// The compressed file's name in the archive directory, its size and SHA-256 (hex), so
    /// `sha256sum` checks it without our code.
    pub file: String,
    pub file_bytes: u64,
    pub file_sha256: String,
    pub columns: Vec<Column>,
    /// Highest applied migration (refinery) of the database it came from.
    pub schema_version: i32,
    pub archived_at: DateTime<Utc>,
}

pub fn data_file_name(day: NaiveDate) -> String {
    format!("email_events-{}.csv.zst", day.format("%Y-%m-%d"))
}

pub fn manifest_file_name(day: NaiveDate) -> String {
    format!("email_events-{}.manifest.json", day.format("%Y-%m-%d"))
}

/// What archiving one day did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Archived {
    /// Exported, verified, detached and dropped now.
    Done(Manifest),
    /// No partition; the archive there verifies.
    AlreadyArchived(Manifest),
    /// Neither a partition nor an archive of that day.
    Nothing,
}

/// Rows, bytes and SHA-256 of a CSV stream, as it passes.
#[derive(Clone)]
struct CsvDigest {
    sha: Sha256,
    bytes: u64,
    /// Record ends seen (newlines outside quotes); the header is one of them.
    records: u64,
    in_quotes: bool,
    header: Vec<u8>,
    header_done: bool,
}

impl CsvDigest {
    fn new() -> CsvDigest {
        CsvDigest {
            sha: Sha256::new(),
            bytes: 0,
            records: 0,
            in_quotes: false,
            header: Vec::new(),
            header_done: false,
        }
    }

    fn update(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.bytes += chunk.len() as u64;
        // PostgreSQL's CSV quotes every value holding a quote, comma, CR or LF and doubles
        // quotes inside, so a newline outside quotes ends a record (a doubled quote toggles
        // twice).
        for &b in chunk {
            if !self.header_done {
                if b == b'\n' {
                    self.header_done = true;
                } else if self.header.len() < 4096 {
                    self.header.push(b);
                }
            }
            match b {
                b'"' => self.in_quotes = !self.in_quotes,
                b'\n' if !self.in_quotes => self.records += 1,
                _ => {}
            }
        }
    }

    /// (data rows, hex SHA-256, bytes, header line).
    fn finish(self) -> anyhow::Result<(u64, String, u64, String)> {
        if self.in_quotes {
            bail!("the CSV ends inside a quoted value (truncated)");
        }
        if !self.header_done {
            bail!("the CSV has no header line");
        }
        Ok((
            self.records - 1,
            hex::encode(self.sha.finalize()),
            self.bytes,
            String::from_utf8_lossy(&self.header).into_owned(),
        ))
    }
}

/// A writer that hashes and counts what goes through it.
struct HashingWriter<W> {
    inner: W,
    sha: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what comes through it.
struct HashingReader<R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The columns of `email_events` in table order, with their types.
pub async fn columns(client: &impl GenericClient) -> anyhow::Result<Vec<Column>> {
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'public.email_events'::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
            &[],
        )
        .await
        .context("reading the columns of email_events")?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_name: r.get(1),
        })
        .collect())
}

async fn schema_version(client: &impl GenericClient) -> i32 {
    client
        .query_one(
            "SELECT COALESCE(max(version), 0)::int4 FROM refinery_schema_history",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// Whether `email_events_pYYYYMMDD` exists as a partition of `email_events`.
pub async fn partition_exists(client: &impl GenericClient, day: NaiveDate) -> anyhow::Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'public.email_events'::regclass AND c.relname = $1",
            &[&partition_name(day)],
        )
        .await?
        .is_some())
}

fn column_list(cols: &[Column]) -> String {
    cols.iter()
        .map(|c| format!("\"{}\"", c.name.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn header_of(cols: &[Column]) -> String {
    cols.iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn copy_out_sql(day: NaiveDate, cols: &[Column]) -> String {
    format!(
        "COPY (SELECT {} FROM public.{} ORDER BY id, created_at) TO STDOUT (FORMAT csv, HEADER true)",
        column_list(cols),
        partition_name(day)
    )
}

/// Renders the partition through `client` (inside a transaction that set `TimeZone`) and
/// returns its digest without storing it.
async fn digest_partition(
    client: &tokio_postgres::Transaction<'_>,
    day: NaiveDate,
    cols: &[Column],
) -> anyhow::Result<(u64, String)> {
    let stream = client
        .copy_out(&copy_out_sql(day, cols))
        .await
        .with_context(|| format!("reading {}", partition_name(day)))?;
    let mut stream = std::pin::pin!(stream);
    let mut digest = CsvDigest::new();
    while let Some(chunk) = stream.next().await {
        digest.update(&chunk.with_context(|| format!("reading {}", partition_name(day)))?);
    }
    let (rows, sha, _, _) = digest.finish()?;
    Ok((rows, sha))
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Exports the partition of `day` to a temporary file in `dir` (fsync'd); returns the
/// temporary path and the manifest the file will have.
async fn export(
    client: &mut Client,
    day: NaiveDate,
    dir: &Path,
) -> anyhow::Result<(PathBuf, Manifest)> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'")
        .await?;
    let cols = columns(&tx).await?;
    let schema_version = schema_version(&tx).await;
    let file = data_file_name(day);
    let tmp = tmp_path(dir, &file);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
    let tmp_for_writer = tmp.clone();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let f = File::create(&tmp_for_writer)
            .with_context(|| format!("creating {}", tmp_for_writer.display()))?;
        let hashing = HashingWriter {
            inner: BufWriter::with_capacity(CHUNK, f),
            sha: Sha256::new(),
            bytes: 0,
        };
        let mut enc = zstd::stream::Encoder::new(hashing, ZSTD_LEVEL)?;
        enc.include_checksum(true)?;
        let mut digest = CsvDigest::new();
        while let Some(chunk) = receiver.blocking_recv() {
            digest.update(&chunk);
            enc.write_all(&chunk)
                .with_context(|| format!("writing {}", tmp_for_writer.display()))?;
        }
        let mut hashing = enc.finish()?;
        hashing.flush()?;
        let file_sha = hex::encode(hashing.sha.finalize());
        let file_bytes = hashing.bytes;
        let f = hashing
            .inner
            .into_inner()
            .map_err(|e| anyhow::anyhow!("flushing {}: {}", tmp_for_writer.display(), e.error()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp_for_writer.display()))?;
        Ok((digest, file_sha, file_bytes))
    });
    let pumped = async {
        let stream = tx
            .copy_out(&copy_out_sql(day, &cols))
            .await
            .with_context(|| format!("exporting {}", partition_name(day)))?;
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("exporting {}", partition_name(day)))?;
            if sender.send(chunk).await.is_err() {
                break; // the writer failed; its error is the one to report
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(sender);
    let written = writer.await.context("archive writer thread")?;
    let (digest, file_sha256, file_bytes) = match (pumped, written) {
        (Ok(()), Ok(w)) => w,
        (Err(e), _) | (_, Err(e)) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    tx.commit().await?;
    let (rows, csv_sha256, csv_bytes, _) = digest.finish()?;
    Ok((
        tmp,
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            table: "email_events".into(),
            day,
            rows,
            csv_sha256,
            csv_bytes,
            file,
            file_bytes,
            file_sha256,
            columns: cols,
            schema_version,
            archived_at: Utc::now(),
        },
    ))
}

/// Reads a manifest; a missing, unreadable or foreign one is a clear error.
pub fn read_manifest(dir: &Path, day: NaiveDate) -> anyhow::Result<Manifest> {
    let path = dir.join(manifest_file_name(day));
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an archive manifest", path.display()))?;
    if m.format != FORMAT || m.format_version != FORMAT_VERSION {
        bail!(
            "{}: format {} version {} is not {FORMAT} version {FORMAT_VERSION}",
            path.display(),
            m.format,
            m.format_version
        );
    }
    if m.day != day || m.file != data_file_name(day) {
        bail!(
            "{}: the manifest is of day {} (file {}), not of {day}",
            path.display(),
            m.day,
            m.file
        );
    }
    Ok(m)
}

/// Reads the archive file of `m` from `dir` and checks it against the manifest: file
/// size and SHA-256, then the decompressed CSV's header, row count and SHA-256. Blocking.
pub fn verify_file(dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let path = dir.join(&m.file);
    let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut raw = HashingReader {
        inner: f,
        sha: Sha256::new(),
        bytes: 0,
    };
    let mut digest = CsvDigest::new();
    {
        let mut dec = zstd::stream::Decoder::new(&mut raw)
            .with_context(|| format!("{}: not a zstd file", path.display()))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = dec
                .read(&mut buf)
                .with_context(|| format!("{} is corrupt: decompressing failed", path.display()))?;
            if n == 0 {
                break;
            }
            digest.update(&buf[..n]);
        }
    }
    // Anything after the zstd frame is read (and hashed) too.
    std::io::copy(&mut raw, &mut std::io::sink())?;
    let file_sha = hex::encode(raw.sha.finalize());
    if raw.bytes != m.file_bytes || file_sha != m.file_sha256 {
        bail!(
            "{} is corrupt: {} bytes with SHA-256 {file_sha}, the manifest says {} bytes with {}",
            path.display(),
            raw.bytes,
            m.file_bytes,
            m.file_sha256
        );
    }
    let (rows, sha, _, header) = digest
        .finish()
        .with_context(|| format!("{} is corrupt", path.display()))?;
    if header != header_of(&m.columns) {
        bail!(
            "{} is corrupt: its header {header:?} is not the manifest's columns",
            path.display()
        );
    }
    if rows != m.rows || sha != m.csv_sha256 {
        bail!(
            "{} is corrupt: {rows} rows with SHA-256 {sha}, the manifest says {} rows with {}",
            path.display(),
            m.rows,
            m.csv_sha256
        );
    }
    Ok(())
}

async fn verify_file_async(dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let (dir, m) = (dir.to_path_buf(), m.clone());
    tokio::task::spawn_blocking(move || verify_file(&dir, &m))
        .await
        .context("archive verification thread")?
}

/// Removes what a killed archiver of `day` left half-written (we hold the maintenance lock:
/// no other archiver is writing).
fn remove_stale_temporaries(dir: &Path, day: NaiveDate) {
    let prefixes = [
        format!(".{}.tmp-", data_file_name(day)),
        format!(".{}.tmp-", manifest_file_name(day)),
    ];
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn write_manifest(dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let name = manifest_file_name(m.day);
    let tmp = tmp_path(dir, &name);
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut text = serde_json::to_vec_pretty(m)?;
    text.push(b'\n');
    f.write_all(&text)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(&name)).with_context(|| format!("renaming {}", tmp.display()))?;
    fsync_dir(dir)
}

/// Archives one day: export, verify, then detach and drop its partition (module doc).
/// Run under the partition maintenance lock (the caller holds it).
pub async fn archive_day(
    client: &mut Client,
    day: NaiveDate,
    dir: &Path,
    crash: CrashAfter,
) -> anyhow::Result<Archived> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let existing = match dir.join(manifest_file_name(day)).exists() {
        true => Some(read_manifest(dir, day)?),
        false => None,
    };
    if !partition_exists(client, day).await? {
        return match existing {
            Some(m) => {
                verify_file_async(dir, &m).await?;
                Ok(Archived::AlreadyArchived(m))
            }
            None => Ok(Archived::Nothing),
        };
    }
    remove_stale_temporaries(dir, day);
    let (tmp, exported) = export(client, day, dir).await?;
    crash.at(Step::Exported);
    let old_verified = match &existing {
        Some(old) => verify_file_async(dir, old).await.is_ok(),
        None => false,
    };
    let manifest = match existing {
        Some(old) if old_verified => {
            let _ = fs::remove_file(&tmp);
            if old.rows != exported.rows || old.csv_sha256 != exported.csv_sha256 {
                bail!(
                    "{} already holds a verified archive of {day} with other content ({} rows; the partition has {}); \
                     move it away (or restore it) before archiving this day again",
                    dir.display(),
                    old.rows,
                    exported.rows
                );
            }
            // Archived before (a crash after the manifest, or a restore): keep that file.
            old
        }
        // None, or a pair a crash left half-replaced: the partition is the truth.
        _ => {
            fs::rename(&tmp, dir.join(&exported.file))
                .with_context(|| format!("renaming {}", tmp.display()))?;
            fsync_dir(dir)?;
            crash.at(Step::Renamed);
            write_manifest(dir, &exported)?;
            crash.at(Step::Manifested);
            exported
        }
    };
    verify_file_async(dir, &manifest).await?;
    crash.at(Step::VerifiedFile);
    drop_verified(client, day, &manifest, crash).await?;
    crash.at(Step::Dropped);
    Ok(Archived::Done(manifest))
}

/// One transaction: lock the partition, check it still renders to the manifest's rows and
/// hash, detach it, drop it, commit. (Public for the test of a partition that changed.)
pub async fn drop_verified(
    client: &mut Client,
    day: NaiveDate,
    m: &Manifest,
    crash: CrashAfter,
) -> anyhow::Result<()> {
    let name = partition_name(day);
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '3s'; SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; \
         LOCK TABLE public.{name} IN SHARE MODE"
    ))
    .await
    .with_context(|| format!("locking {name}"))?;
    let (rows, sha) = digest_partition(&tx, day, &m.columns).await?;
    if rows != m.rows || sha != m.csv_sha256 {
        bail!(
            "{name} changed since it was exported ({rows} rows now, {} archived); it stays, archive it again",
            m.rows
        );
    }
    crash.at(Step::VerifiedPartition);
    tx.batch_execute(&format!(
        "ALTER TABLE public.email_events DETACH PARTITION public.{name}"
    ))
    .await
    .with_context(|| format!("detaching {name}"))?;
    crash.at(Step::Detached);
    tx.batch_execute(&format!("DROP TABLE public.{name}"))
        .await
        .with_context(|| format!("dropping {name}"))?;
    tx.commit()
        .await
        .with_context(|| format!("committing the drop of {name}"))?;
    Ok(())
}

/// What restoring one day did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restored {
    /// Rows in the archive.
    pub rows: u64,
    /// Rows inserted now.
    pub inserted: u64,
    /// Rows already in the table (an earlier restore, or never dropped).
    pub present: u64,
    /// Rows whose message (or organization) no longer exists: they cannot be stored in
    /// `email_events` (foreign keys) and are left in the archive.
    pub orphaned: u64,
}

/// Loads an archived day back into its partition (made if missing), skipping rows already
/// there: running it twice inserts nothing the second time. The file is verified first and
/// hashed again while it loads; any mismatch rolls back.
pub async fn restore_day(
    client: &mut Client,
    day: NaiveDate,
    dir: &Path,
) -> anyhow::Result<Restored> {
    let m = read_manifest(dir, day)?;
    verify_file_async(dir, &m).await?;
    let current = columns(client).await?;
    for c in &m.columns {
        if !current.iter().any(|k| k.name == c.name) {
            bail!(
                "the archive of {day} has column {:?}, which email_events no longer has; restore it into a database of schema version {}",
                c.name,
                m.schema_version
            );
        }
    }
    if !partition_exists(client, day).await? {
        let mut tx = client.transaction().await?;
        super::partitions::create_partition(&mut tx, day).await?;
        tx.commit().await?;
    }
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; \
         CREATE TEMP TABLE reachly_restore (LIKE public.email_events INCLUDING DEFAULTS) ON COMMIT DROP",
    )
    .await?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!(
            "COPY reachly_restore ({}) FROM STDIN (FORMAT csv, HEADER MATCH)",
            column_list(&m.columns)
        ))
        .await?;
    let mut sink = std::pin::pin!(sink);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<anyhow::Result<Bytes>>(8);
    let path = dir.join(&m.file);
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, String)> {
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut dec = zstd::stream::Decoder::new(f)?;
        let mut digest = CsvDigest::new();
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = dec
                .read(&mut buf)
                .with_context(|| format!("{} is corrupt", path.display()))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            digest.update(&buf);
            if sender.blocking_send(Ok(Bytes::from(buf))).is_err() {
                bail!("the database side of the restore stopped");
            }
        }
        let (rows, sha, _, _) = digest.finish()?;
        Ok((rows, sha))
    });
    while let Some(chunk) = receiver.recv().await {
        sink.send(chunk?)
            .await
            .with_context(|| format!("loading the archive of {day}"))?;
    }
    let read = reader.await.context("archive reader thread")?;
    let (rows, sha) = read?;
    if rows != m.rows || sha != m.csv_sha256 {
        bail!("the archive of {day} changed while it was loaded; nothing was restored");
    }
    let loaded = sink
        .as_mut()
        .finish()
        .await
        .with_context(|| format!("loading the archive of {day}"))?;
    let orphaned = tx
        .execute(
            "DELETE FROM reachly_restore r WHERE NOT EXISTS \
             (SELECT 1 FROM public.campaign_messages m WHERE m.id = r.message_id) \
             OR NOT EXISTS (SELECT 1 FROM public.organizations o WHERE o.id = r.organization_id)",
            &[],
        )
        .await?;
    let inserted = tx
        .execute(
            "INSERT INTO public.email_events SELECT * FROM reachly_restore ON CONFLICT DO NOTHING",
            &[],
        )
        .await
        .with_context(|| format!("inserting the archived rows of {day}"))?;
    tx.commit().await?;
    Ok(Restored {
        rows: loaded,
        inserted,
        present: loaded - orphaned - inserted,
        orphaned,
    })
}

/// Takes the partition maintenance lock (a running round finishes first), waiting up to
/// `within`; the commands and the service's rounds never archive or create at once.
pub async fn lock_maintenance(client: &Client, within: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&super::partitions::PARTITION_LOCK_KEY],
            )
            .await?
            .get(0);
        if got {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("partition maintenance of another process holds its lock; try again later");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The days `reachly-ingest archive` works on: `from..=to` when given (none of them may be
/// yesterday or later: those are still written to), else every day partition past the
/// retention as of `today`.
pub async fn days_to_archive(
    client: &Client,
    today: NaiveDate,
    retention_days: u32,
    range: Option<(NaiveDate, NaiveDate)>,
) -> anyhow::Result<Vec<NaiveDate>> {
    let yesterday = today.pred_opt().unwrap_or(today);
    if let Some((from, to)) = range {
        if to < from {
            bail!("--to {to} is before --from {from}");
        }
        if to >= yesterday {
            bail!(
                "--to {to}: days from {yesterday} on are still written to; archive only older days"
            );
        }
        return Ok(from.iter_days().take_while(|d| *d <= to).collect());
    }
    let cutoff = today
        .checked_sub_days(chrono::Days::new(retention_days.into()))
        .unwrap_or(NaiveDate::MIN);
    // The partition list, sorted: the same query maintenance uses.
    Ok(super::partitions::partition_days(client)
        .await?
        .into_iter()
        .filter(|d| d.succ_opt().is_some_and(|end| end <= cutoff))
        .collect())
}

/// `reachly-ingest archive`: one line per day on stdout; stops at the first failure (the
/// day it names keeps its partition).
pub async fn archive_command(
    client: &mut Client,
    dir: &Path,
    retention_days: u32,
    range: Option<(NaiveDate, NaiveDate)>,
    crash: CrashAfter,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    lock_maintenance(client, std::time::Duration::from_secs(60)).await?;
    let days = days_to_archive(client, Utc::now().date_naive(), retention_days, range).await?;
    if days.is_empty() {
        let _ = writeln!(out, "nothing to archive");
    }
    for day in days {
        let line = match archive_day(client, day, dir, crash)
            .await
            .with_context(|| format!("archiving {day}"))?
        {
            Archived::Done(m) => format!(
                "{day}: archived {} rows, {} bytes CSV -> {} bytes ({}), partition dropped",
                m.rows,
                m.csv_bytes,
                m.file_bytes,
                dir.join(&m.file).display()
            ),
            Archived::AlreadyArchived(m) => format!(
                "{day}: already archived ({} rows, verified); no partition",
                m.rows
            ),
            Archived::Nothing => format!("{day}: no partition and no archive"),
        };
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

/// `reachly-ingest restore`: one line per day on stdout.
pub async fn restore_command(
    client: &mut Client,
    dir: &Path,
    from: NaiveDate,
    to: NaiveDate,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if to < from {
        bail!("--to {to} is before --from {from}");
    }
    lock_maintenance(client, std::time::Duration::from_secs(60)).await?;
    for day in from.iter_days().take_while(|d| *d <= to) {
        let r = restore_day(client, day, dir)
            .await
            .with_context(|| format!("restoring {day}"))?;
        let mut line = format!(
            "{day}: {} rows in the archive, {} inserted, {} already present",
            r.rows, r.inserted, r.present
        );
        if r.orphaned > 0 {
            line.push_str(&format!(
                ", {} skipped (their message or organization no longer exists)",
                r.orphaned
            ));
        }
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records_are_counted_outside_quotes_only() {
        let mut d = CsvDigest::new();
        d.update(b"id,user_agent\n1,\"a\nb\"\n2,\"say \"\"hi\"\"\"\n");
        let (rows, _, bytes, header) = d.finish().unwrap();
        assert_eq!(rows, 2);
        assert_eq!(bytes, 37);
        assert_eq!(header, "id,user_agent");
    }

    #[test]
    fn a_csv_cut_inside_a_quoted_value_is_refused() {
        let mut d = CsvDigest::new();
        d.update(b"id,user_agent\n1,\"a\nb");
        assert!(d.finish().is_err());
    }

    #[test]
    fn step_names_round_trip() {
        for s in Step::ALL {
            assert_eq!(Step::parse(s.name()), Ok(s));
        }
        assert!(Step::parse("nope").is_err());
    }
}
