//! Archive, verify, drop and restore against a real database: the round trip of every
//! column, corrupt files, a kill of the real `archive` process after each step, maintenance
//! archiving before it drops, dead-letter retention, and the sizes `status` prints.

use std::path::Path;
use std::process::Command;

use chrono::NaiveDate;
use reachly_ingest::config::{PartitionConfig, ServeArgs};
use reachly_ingest::db::archive::{
    self, Archived, CrashAfter, Step, archive_day, read_manifest, restore_day, verify_file,
};
use reachly_ingest::db::partitions::{maintain, maintain_configured};

use crate::helpers::*;

const DAY: (i32, u32, u32) = (2024, 3, 1);

fn day() -> NaiveDate {
    NaiveDate::from_ymd_opt(DAY.0, DAY.1, DAY.2).unwrap()
}

/// A database whose partition of [`day`] holds `n` events with awkward values (quotes,
/// commas, newlines, NULLs, empty strings, unicode, nested JSON); returns its URL.
async fn database_with_old_day(n: i32) -> String {
    let url = fresh_database().await;
    let mut db = connect(&url).await;
    maintain(&mut db, day(), 1, 400).await.expect("partitions");
    let s = seed_tenant(&db).await;
    db.execute(
        "INSERT INTO email_events (id, organization_id, message_id, event_type, ip_address, user_agent, link_url, metadata, created_at, provider, dedup_key) \
         SELECT gen_random_uuid(), $1, $2, \
           (ARRAY['sent','delivered','opened','clicked','bounced','complained','unsubscribed','deferred','dropped'])[1 + g % 9], \
           CASE WHEN g % 5 = 0 THEN NULL ELSE '203.0.113.' || (g % 256) END, \
           CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN 'Mozilla/5.0 \"quoted\", with comma' ELSE E'line one\\nline two \\\\ back' END, \
           CASE WHEN g % 3 = 0 THEN 'https://example.com/a?b=c&d=' || g END, \
           jsonb_build_object('g', g, 'text', E'é ✓ \"q\" \\n', 'nested', jsonb_build_object('a', ARRAY[1,2,3]), 'null', NULL), \
           '2024-03-01 00:00:00+00'::timestamptz + (g || ' seconds')::interval, \
           CASE WHEN g % 2 = 0 THEN 'sendgrid' ELSE 'reachly' END, \
           CASE WHEN g % 2 = 0 THEN 'sendgrid:' || g END \
         FROM generate_series(1, $3::int) g",
        &[&s.org, &s.message, &n],
    )
    .await
    .expect("events");
    url
}

/// Every row of the day as text, ordered: what a round trip must keep.
async fn snapshot(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT e::text FROM email_events e WHERE created_at >= '2024-03-01' AND created_at < '2024-03-02' ORDER BY id",
        &[],
    )
    .await
    .expect("snapshot")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn partition_exists(db: &tokio_postgres::Client) -> bool {
    archive::partition_exists(db, day()).await.expect("catalog")
}

#[tokio::test]
async fn archive_then_restore_round_trips_every_column_and_restore_is_idempotent() {
    let url = database_with_old_day(500).await;
    let mut db = connect(&url).await;
    let before = snapshot(&db).await;
    assert_eq!(before.len(), 500);
    let dir = temp_dir("archive");

    let done = archive_day(&mut db, day(), &dir, CrashAfter(None))
        .await
        .expect("archive");
    let Archived::Done(m) = done else {
        panic!("expected an archive, got {done:?}")
    };
    assert_eq!(m.rows, 500);
    assert_eq!(m.day, day());
    assert_eq!(m.format, archive::FORMAT);
    assert!(m.schema_version >= 4, "schema version {}", m.schema_version);
    assert_eq!(m.columns[0].name, "id");
    assert!(m.file_bytes < m.csv_bytes / 2, "compressed: {m:?}");
    assert!(!partition_exists(&db).await, "the partition is dropped");
    assert!(snapshot(&db).await.is_empty());
    assert_eq!(read_manifest(&dir, day()).expect("manifest"), m);
    verify_file(&dir, &m).expect("the file verifies");
    // The file is plain zstd'd CSV that operators' tools read.
    let csv = zstd::decode_all(std::fs::File::open(dir.join(&m.file)).unwrap()).unwrap();
    assert!(csv.starts_with(b"id,organization_id,message_id,event_type,"));

    let again = archive_day(&mut db, day(), &dir, CrashAfter(None))
        .await
        .expect("re-run");
    assert!(
        matches!(again, Archived::AlreadyArchived(ref a) if a.rows == 500),
        "{again:?}"
    );

    let r = restore_day(&mut db, day(), &dir).await.expect("restore");
    assert_eq!(
        (r.rows, r.inserted, r.present, r.orphaned),
        (500, 500, 0, 0)
    );
    assert_eq!(
        snapshot(&db).await,
        before,
        "every column comes back as it was"
    );
    // Again, through the real binary: nothing new.
    let out = Command::new(binary())
        .args(["restore", "--from", "2024-03-01"])
        .env("DATABASE_URL", &url)
        .env("REACHLY_ARCHIVE_DIR", &dir)
        .output()
        .expect("run restore");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("2024-03-01: 500 rows in the archive, 0 inserted, 500 already present"),
        "idempotent: {text}"
    );
    assert_eq!(snapshot(&db).await, before);

    // Archiving the restored day again finds the same content and keeps the same file.
    let third = archive_day(&mut db, day(), &dir, CrashAfter(None))
        .await
        .expect("archive the restored day");
    assert!(matches!(third, Archived::Done(ref t) if t.file_sha256 == m.file_sha256));
    assert!(!partition_exists(&db).await);
}

#[tokio::test]
async fn a_corrupt_or_foreign_archive_is_refused_with_a_clear_error() {
    let url = database_with_old_day(200).await;
    let mut db = connect(&url).await;
    let dir = temp_dir("archive-corrupt");
    let Archived::Done(m) = archive_day(&mut db, day(), &dir, CrashAfter(None))
        .await
        .unwrap()
    else {
        panic!("archived")
    };
    let file = dir.join(&m.file);
    let good = std::fs::read(&file).unwrap();

    // One flipped byte in the middle.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&file, &bad).unwrap();
    let e = format!("{:#}", restore_day(&mut db, day(), &dir).await.unwrap_err());
    assert!(e.contains("is corrupt"), "{e}");

    // Truncated.
    std::fs::write(&file, &good[..good.len() / 3]).unwrap();
    let e = format!("{:#}", restore_day(&mut db, day(), &dir).await.unwrap_err());
    assert!(e.contains("is corrupt"), "{e}");

    // Not zstd at all, and a missing file.
    std::fs::write(&file, b"id,organization_id\n1,2\n").unwrap();
    let e = format!("{:#}", restore_day(&mut db, day(), &dir).await.unwrap_err());
    assert!(e.contains("corrupt") || e.contains("zstd"), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = format!("{:#}", restore_day(&mut db, day(), &dir).await.unwrap_err());
    assert!(e.contains("opening"), "{e}");

    // A manifest that is not one.
    std::fs::write(&file, &good).unwrap();
    let manifest = dir.join(archive::manifest_file_name(day()));
    std::fs::write(&manifest, b"{\"format\": 3").unwrap();
    let e = format!("{:#}", restore_day(&mut db, day(), &dir).await.unwrap_err());
    assert!(e.contains("is not an archive manifest"), "{e}");
    assert_eq!(snapshot(&db).await.len(), 0, "nothing half-restored");
}

#[tokio::test]
async fn archiving_never_overwrites_a_verified_archive_with_other_content() {
    let url = database_with_old_day(50).await;
    let mut db = connect(&url).await;
    let dir = temp_dir("archive-other");
    archive_day(&mut db, day(), &dir, CrashAfter(None))
        .await
        .unwrap();
    restore_day(&mut db, day(), &dir).await.unwrap();
    let s = seed_tenant(&db).await;
    db.execute(
        "INSERT INTO email_events (organization_id, message_id, event_type, created_at) VALUES ($1, $2, 'opened', '2024-03-01 12:00:00+00')",
        &[&s.org, &s.message],
    )
    .await
    .unwrap();
    let e = format!(
        "{:#}",
        archive_day(&mut db, day(), &dir, CrashAfter(None))
            .await
            .unwrap_err()
    );
    assert!(e.contains("other content"), "{e}");
    assert!(partition_exists(&db).await, "the partition stays");
    // Maintenance reports it and goes on (the partition stays there too).
    let today = NaiveDate::from_ymd_opt(2024, 5, 1).unwrap();
    let r = maintain_configured(&mut db, today, &partition_config(Some(&dir), 0))
        .await
        .expect("the round goes on");
    assert_eq!(r.archive_failures.len(), 1, "{r:?}");
    assert!(r.archive_failures[0].1.contains("other content"), "{r:?}");
    assert!(!r.dropped.contains(&"email_events_p20240301".to_string()));
    assert!(partition_exists(&db).await, "the partition stays");
    assert_eq!(snapshot(&db).await.len(), 51);
    assert_eq!(
        read_manifest(&dir, day()).unwrap().rows,
        50,
        "the old archive stays"
    );
}

/// Runs `reachly-ingest archive` for [`day`] as a real process; (success, stdout+stderr).
fn run_archive(url: &str, dir: &Path, crash_after: Option<Step>) -> (bool, String) {
    let mut c = Command::new(binary());
    c.args(["archive", "--from", "2024-03-01", "--to", "2024-03-01"])
        .env("DATABASE_URL", url)
        .env("REACHLY_ARCHIVE_DIR", dir)
        .env("RUST_LOG", "warn");
    if let Some(step) = crash_after {
        c.env("REACHLY_ARCHIVE_CRASH_AFTER", step.name());
    }
    let out = c.output().expect("run reachly-ingest archive");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn a_kill_after_any_step_leaves_the_partition_or_a_verified_archive_and_a_rerun_completes() {
    for step in Step::ALL {
        let url = database_with_old_day(300).await;
        let db = connect(&url).await;
        let before = snapshot(&db).await;
        let dir = temp_dir("archive-crash");

        let (ok, log) = run_archive(&url, &dir, Some(step));
        assert!(!ok, "{}: the process must die: {log}", step.name());
        assert!(log.contains("crashing after step"), "{log}");

        let partition = partition_exists(&db).await;
        let archive = read_manifest(&dir, day())
            .ok()
            .filter(|m| m.rows == 300 && verify_file(&dir, m).is_ok());
        assert!(
            partition || archive.is_some(),
            "{}: neither the partition nor a verified archive is left",
            step.name()
        );
        if partition {
            assert_eq!(
                snapshot(&db).await,
                before,
                "{}: partition intact",
                step.name()
            );
        }
        assert_eq!(
            partition,
            step < Step::Dropped,
            "{}: the partition goes only with the commit",
            step.name()
        );

        let (ok, log) = run_archive(&url, &dir, None);
        assert!(ok, "{}: the re-run completes: {log}", step.name());
        assert!(
            log.contains("2024-03-01: archived 300 rows")
                || log.contains("2024-03-01: already archived (300 rows"),
            "{}: {log}",
            step.name()
        );
        assert!(!partition_exists(&db).await, "{}", step.name());
        let m = read_manifest(&dir, day()).expect("manifest");
        verify_file(&dir, &m).expect("verified archive");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{}: {leftovers:?}", step.name());
        let mut db = connect(&url).await;
        restore_day(&mut db, day(), &dir).await.expect("restore");
        assert_eq!(
            snapshot(&db).await,
            before,
            "{}: the rows come back",
            step.name()
        );
    }
}

#[tokio::test]
async fn a_partition_that_changed_after_its_export_is_not_dropped() {
    let url = database_with_old_day(40).await;
    let dir = temp_dir("archive-changed");
    // Exported, written and verified, then the process dies before the drop.
    let (ok, log) = run_archive(&url, &dir, Some(Step::VerifiedFile));
    assert!(!ok, "{log}");
    let m = read_manifest(&dir, day()).expect("manifest");
    let mut db = connect(&url).await;
    let s = seed_tenant(&db).await;
    db.execute(
        "INSERT INTO email_events (organization_id, message_id, event_type, created_at) VALUES ($1, $2, 'opened', '2024-03-01 08:00:00+00')",
        &[&s.org, &s.message],
    )
    .await
    .unwrap();
    let e = format!(
        "{:#}",
        archive::drop_verified(&mut db, day(), &m, CrashAfter(None))
            .await
            .unwrap_err()
    );
    assert!(e.contains("changed since it was exported"), "{e}");
    assert!(partition_exists(&db).await);
    assert_eq!(snapshot(&db).await.len(), 41, "nothing lost");
}

fn partition_config(archive_dir: Option<&Path>, dead_letter_days: u32) -> PartitionConfig {
    let mut argv = vec![
        "serve".to_string(),
        "--dead-letter-retention-days".into(),
        dead_letter_days.to_string(),
        "--event-retention-days".into(),
        "30".into(),
        "--partition-premake-days".into(),
        "1".into(),
    ];
    if let Some(d) = archive_dir {
        argv.push("--archive-dir".into());
        argv.push(d.display().to_string());
    }
    ServeArgs::from_argv(argv).partitions
}

#[tokio::test]
async fn maintenance_archives_before_it_drops_when_an_archive_directory_is_configured() {
    let url = database_with_old_day(120).await;
    let mut db = connect(&url).await;
    let before = snapshot(&db).await;
    let dir = temp_dir("archive-maint");
    let today = NaiveDate::from_ymd_opt(2024, 5, 1).unwrap();
    let r = maintain_configured(&mut db, today, &partition_config(Some(&dir), 0))
        .await
        .expect("maintenance");
    assert!(
        r.archived.contains(&"email_events_p20240301".to_string()),
        "{r:?}"
    );
    assert_eq!(
        r.archived, r.dropped,
        "every dropped partition was archived first"
    );
    let m = read_manifest(&dir, day()).expect("manifest");
    assert_eq!(m.rows, 120);
    verify_file(&dir, &m).unwrap();
    assert!(!partition_exists(&db).await);
    restore_day(&mut db, day(), &dir).await.unwrap();
    assert_eq!(snapshot(&db).await, before);

    // Without a directory: dropped, as before.
    let url = database_with_old_day(10).await;
    let mut db = connect(&url).await;
    let r = maintain_configured(&mut db, today, &partition_config(None, 0))
        .await
        .unwrap();
    assert!(r.archived.is_empty());
    assert!(r.dropped.contains(&"email_events_p20240301".to_string()));
    assert!(!partition_exists(&db).await);
}

#[tokio::test]
async fn dead_letters_past_their_retention_are_deleted_by_maintenance() {
    let url = fresh_database().await;
    let mut db = connect(&url).await;
    db.execute(
        "INSERT INTO webhook_dead_letters (received_at, provider, reason, payload) \
         SELECT now() - (g || ' days')::interval + interval '1 hour', 'sendgrid', 'unknown_message', '{}' FROM generate_series(0, 99) g",
        &[],
    )
    .await
    .unwrap();
    let today = chrono::Utc::now().date_naive();
    // 0 keeps them forever.
    let r = maintain_configured(&mut db, today, &partition_config(None, 0))
        .await
        .unwrap();
    assert_eq!(r.expired_dead_letters, 0);
    let r = maintain_configured(&mut db, today, &partition_config(None, 30))
        .await
        .unwrap();
    assert_eq!(r.expired_dead_letters, 69, "31..=99 days old");
    let left: i64 = db
        .query_one("SELECT count(*) FROM webhook_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 31);
}

#[tokio::test]
async fn status_prints_sizes_by_partition_age_and_the_service_exports_them() {
    let url = database_with_old_day(1000).await;
    let db = connect(&url).await;
    db.batch_execute("ANALYZE email_events_p20240301")
        .await
        .unwrap();
    let today = NaiveDate::from_ymd_opt(2024, 3, 20).unwrap();
    let sizes = reachly_ingest::db::sizes::measure(&db, today)
        .await
        .unwrap();
    let by = |label: &str| {
        sizes
            .events
            .iter()
            .find(|b| b.label == label)
            .unwrap()
            .clone()
    };
    assert_eq!(by("8-30d").partitions, 3, "{sizes:?}");
    assert_eq!(by("8-30d").rows, 1000);
    assert!(by("8-30d").bytes > 100_000, "{sizes:?}");
    assert_eq!(by("0-7d").partitions, 0);
    assert_eq!(by("default").partitions, 1);
    assert_eq!(sizes.oldest_partition_age_days(), Some(20));
    assert!(sizes.database_bytes > sizes.events_bytes());

    let spool = temp_dir("status-spool");
    std::fs::write(spool.join("segment"), vec![0u8; 4096]).unwrap();
    let out = Command::new(binary())
        .args(["status"])
        .env("DATABASE_URL", &url)
        .env("REACHLY_SPOOL_DIR", &spool)
        .env("REACHLY_DATABASE_DISK_BYTES", (32u64 << 30).to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "of 32.0 GiB",
        "email_events",
        "366d+",
        "campaign_messages",
        "contacts",
        "webhook_dead_letters",
        "oldest partition        2024-02-29",
        "spool                        4.0 KiB",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }

    let app = spawn_app_on(
        &url,
        |a| {
            a.partitions.database_disk_bytes = Some(32 << 30);
            a.partitions.retention_days = 5000;
        },
        None,
    )
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = app.metrics_text().await;
        if metric_value(&text, "reachly_database_bytes") > 0.0 {
            assert!(
                metric_value(&text, "reachly_email_events_bytes{age=\"366d+\"}") > 100_000.0,
                "{text}"
            );
            assert_eq!(
                metric_value(&text, "reachly_database_disk_bytes"),
                (32u64 << 30) as f64
            );
            assert!(metric_value(&text, "reachly_oldest_partition_age_seconds") > 365.0 * 86_400.0);
            assert!(text.contains("reachly_table_bytes{table=\"campaign_messages\"}"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no sizes: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[test]
fn the_disk_full_alerts_pass_their_promtool_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        &["check", "rules", "storage-rules.yml"][..],
        &["test", "rules", "storage-rules.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "promtool not found ({e}): install Debian's `prometheus` (scripts/test.sh does)"
                )
            });
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
