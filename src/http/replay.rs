//! Webhook replay protection shared by every instance. [`PgReplayStore`] implements
//! `webhooks::ReplayStore` over `webhook_signature_tokens` (migration V9), so a signature
//! token is remembered by every instance and across restarts, not per process.
//!
//! Mailgun signs `timestamp + token` only, not the event: the provider asks the store to
//! record the token with the SHA-256 of the body it came with, and refuses the request when
//! the token was first recorded with another body. One statement does both, atomically
//! (`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` returns the digest recorded first, even
//! when two instances race on the same token). Rows older than the provider's window are
//! deleted at most once a minute by whichever request comes next; a stale signature is
//! refused before the store is asked, so an old row is never needed.
//!
//! The claim commits with `synchronous_commit = off` (for its own transaction only): it
//! does not wait for its WAL to reach the disk. An fsync per Mailgun request was most of the
//! database's I/Os in the load test (0.042 fsyncs per event against 0.006 for the batch
//! commits, on a B1ms whose 640 IOPS bind). What a crash can lose is the last few hundred
//! milliseconds of claims (`wal_writer_delay`), so a request replayed right after a crash
//! could be admitted once more; its events would still be stored once (the dedup key).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_postgres::types::Type;

use crate::pipeline::bus::Bus;
use crate::webhooks::{BoxFuture, ReplayStore};

/// Seconds between two deletions of expired tokens (per process).
const PRUNE_EVERY_SECS: i64 = 60;

/// When this process last deleted expired tokens (unix seconds).
static LAST_PRUNE: AtomicI64 = AtomicI64::new(0);

/// `webhooks::ReplayStore` over the service's pool.
pub struct PgReplayStore<'a> {
    pub pool: &'a deadpool_postgres::Pool,
}

impl ReplayStore for PgReplayStore<'_> {
    fn admit<'a>(
        &'a self,
        provider: &'a str,
        token: &'a str,
        body_sha256: [u8; 32],
        signed_at: DateTime<Utc>,
        expires_before: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
            let now = Utc::now().timestamp();
            let last = LAST_PRUNE.load(Ordering::Relaxed);
            if now - last >= PRUNE_EVERY_SECS
                && LAST_PRUNE
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                // Best effort: a failed prune is retried a minute later.
                if let Err(e) = client
                    .query_typed(
                        "DELETE FROM public.webhook_signature_tokens WHERE signed_at < $1",
                        &[(&expires_before, Type::TIMESTAMPTZ)],
                    )
                    .await
                {
                    tracing::warn!(
                        error = crate::pgerror::describe_error(&e),
                        "deleting expired webhook signature tokens failed"
                    );
                }
            }
            let digest: &[u8] = &body_sha256;
            // Unnamed statements (query_typed): on a pooled connection outside a transaction,
            // through PgBouncer in transaction mode, a named statement could be prepared on
            // one server connection and run on another.
            let describe = |e: tokio_postgres::Error| crate::pgerror::describe_error(&e);
            let tx = client.transaction().await.map_err(describe)?;
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .map_err(describe)?;
            let row = tx
                .query_typed_one(
                    "INSERT INTO public.webhook_signature_tokens (provider, token, body_sha256, signed_at) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (provider, token) DO UPDATE SET token = EXCLUDED.token \
                     RETURNING body_sha256",
                    &[
                        (&provider, Type::VARCHAR),
                        (&token, Type::TEXT),
                        (&digest, Type::BYTEA),
                        (&signed_at, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(describe)?;
            let first: Vec<u8> = row.get(0);
            tx.commit().await.map_err(describe)?;
            Ok(first.as_slice() == digest)
        })
    }
}

/// The JetStream bucket of a bus edge's signature tokens.
pub const TOKEN_BUCKET: &str = "REACHLY_WEBHOOK_TOKENS";

/// How long the bucket remembers a token: as long as a provider that asks the store accepts
/// the token's signature (Mailgun: signed up to 8 h 15 min ago or 15 min ahead).
pub const TOKEN_MAX_AGE: Duration = Duration::from_secs(
    (crate::webhooks::mailgun::MAX_SIGNATURE_AGE_SECS
        + crate::webhooks::mailgun::MAX_SIGNATURE_AHEAD_SECS) as u64,
);

/// `webhooks::ReplayStore` of a bus edge, which has no database: a JetStream key-value
/// bucket ([`TOKEN_BUCKET`], replicated like the stream) shared by every edge. The key is
/// the SHA-256 of provider and token (keys allow few characters), the value the body's
/// digest. `create` stores a key only if it is absent, atomically across the cluster, so of
/// two edges racing on one token exactly one records its body and the other compares with
/// it, as the database's `INSERT ... ON CONFLICT` does. Entries expire with the bucket's
/// `max_age`. The bucket is opened on first use (the bus may be down when the edge starts);
/// while it cannot be reached the webhook is answered 503 and the ESP retries.
pub struct BusReplayStore {
    bus: Bus,
    store: tokio::sync::OnceCell<kv::Store>,
}

impl BusReplayStore {
    pub fn new(bus: Bus) -> BusReplayStore {
        BusReplayStore {
            bus,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether the bucket is open (readiness of an edge that takes Mailgun webhooks).
    pub fn is_open(&self) -> bool {
        self.store.initialized()
    }

    async fn store(&self) -> Result<&kv::Store, String> {
        self.store
            .get_or_try_init(|| self.bus.key_value(TOKEN_BUCKET, TOKEN_MAX_AGE))
            .await
            .map_err(|e| format!("{e:#}"))
    }

    /// Opens (or creates) the bucket ahead of the first webhook, retrying every second until
    /// it succeeds: creating a replicated bucket takes seconds, which the first Mailgun
    /// requests would otherwise wait for (measured: p99 4.8 s in the load-test smoke).
    /// Until it is open the edge is not ready (when it takes Mailgun webhooks: `/readyz`);
    /// a failure is logged as a warning once a minute (JetStream storage too small for the
    /// stream and the bucket, say).
    pub async fn warm(&self) {
        let mut attempt: u64 = 0;
        while let Err(e) = self.store().await {
            if attempt % 60 == 59 {
                tracing::warn!(error = %e, "the signature-token bucket cannot be opened; Mailgun webhooks are answered 503 until it can");
            } else {
                tracing::debug!(error = %e, "the signature-token bucket is not ready yet");
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl ReplayStore for BusReplayStore {
    fn admit<'a>(
        &'a self,
        provider: &'a str,
        token: &'a str,
        body_sha256: [u8; 32],
        _signed_at: DateTime<Utc>,
        _expires_before: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let store = self.store().await?;
            let mut h = Sha256::new();
            h.update(provider.as_bytes());
            h.update([0u8]);
            h.update(token.as_bytes());
            let key = hex::encode(h.finalize());
            match store
                .create(&key, bytes::Bytes::copy_from_slice(&body_sha256))
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    match store.get(&key).await {
                        Ok(Some(first)) => Ok(first.as_ref() == body_sha256.as_slice()),
                        // Expired between the two calls: the ESP's retry will record it.
                        Ok(None) => Err("the token's entry expired while it was read".into()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            }
        })
    }
}
