//! The `limit` reference: the database's own ceiling for these events, with no HTTP and no
//! service. The events the service stored are dumped (binary COPY) after its phase; after the
//! reset they are loaded back with one `COPY ... FROM STDIN` into `email_events` (the same
//! partitions, indexes and constraints the service writes to) followed by one set-based
//! `UPDATE campaign_messages` of the statuses and timestamps they imply, in one transaction.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, TryStreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Columns of `email_events` written by the service (the product's COPY layout).
pub const COLUMNS: &str = reachly_ingest::event::EVENT_COLUMNS;

/// Writes up to `max_rows` stored events to `path`; the number written.
pub async fn dump(url: &str, path: &Path, max_rows: u64) -> anyhow::Result<u64> {
    let client = reachly_ingest::db::connect(url).await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM public.email_events", &[])
        .await?
        .get(0);
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT {COLUMNS} FROM public.email_events LIMIT {max_rows}) TO STDOUT (FORMAT binary)"
        ))
        .await?;
    futures_util::pin_mut!(stream);
    let mut f = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    while let Some(chunk) = stream.try_next().await? {
        f.write_all(&chunk).await?;
    }
    f.flush().await?;
    Ok((n as u64).min(max_rows))
}

#[derive(Debug, Clone, Copy)]
pub struct LimitResult {
    pub events: u64,
    pub copy: Duration,
    pub update: Duration,
    pub total: Duration,
    pub messages_updated: u64,
}

impl LimitResult {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.total.as_secs_f64()
    }
}

/// The set-based merge of the loaded events into `campaign_messages` (human events only,
/// as the service does: machine traffic moves nothing).
const UPDATE: &str = r#"
UPDATE public.campaign_messages AS m SET
  status = CASE WHEN e.rank > public.reachly_message_status_rank(m.status)
                THEN (ARRAY['sent','delivered','opened','clicked','unsubscribed','complained','bounced'])[e.rank]
                ELSE m.status END,
  delivered_at = LEAST(m.delivered_at, e.delivered_at),
  opened_at = LEAST(m.opened_at, e.opened_at),
  clicked_at = LEAST(m.clicked_at, e.clicked_at),
  updated_at = now()
FROM (
  SELECT message_id,
         max(public.reachly_message_status_rank(event_type)) AS rank,
         min(created_at) FILTER (WHERE event_type = 'delivered') AS delivered_at,
         min(created_at) FILTER (WHERE event_type IN ('opened', 'clicked')) AS opened_at,
         min(created_at) FILTER (WHERE event_type = 'clicked') AS clicked_at
  FROM public.email_events
  WHERE NOT COALESCE((metadata->>'machine')::boolean, false)
  GROUP BY message_id
) AS e
WHERE m.id = e.message_id
"#;

/// Loads the dump at `path` (holding `events` rows) in one transaction.
pub async fn load(url: &str, path: &Path, events: u64) -> anyhow::Result<LimitResult> {
    let mut client = reachly_ingest::db::connect(url).await?;
    let started = Instant::now();
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in(&format!(
            "COPY public.email_events ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    futures_util::pin_mut!(sink);
    let mut f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        sink.send(Bytes::copy_from_slice(&buf[..n])).await?;
    }
    let copied = sink.finish().await?;
    let copy = started.elapsed();
    let t = Instant::now();
    let messages_updated = tx.execute(UPDATE, &[]).await?;
    tx.commit().await?;
    let update = t.elapsed();
    if copied != events {
        anyhow::bail!("the limit reference loaded {copied} rows, expected {events}");
    }
    Ok(LimitResult {
        events: copied,
        copy,
        update,
        total: started.elapsed(),
        messages_updated,
    })
}
