//! The database side of webhook replay protection: [`PgReplayStore`] implements
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

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;

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
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
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
            let row = client
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
                .map_err(|e| crate::pgerror::describe_error(&e))?;
            let first: Vec<u8> = row.get(0);
            Ok(first.as_slice() == digest)
        })
    }
}
