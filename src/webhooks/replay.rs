//! Replay protection that every instance shares. Mailgun signs `timestamp + token`, not the
//! event, so a captured signature could carry a forged body; [`ReplayStore`] remembers each
//! token with the SHA-256 of the body it first came with, and a provider refuses the token
//! with any other body. The production store is the database (`http::replay`, table
//! `webhook_signature_tokens`, migration V9): a per-process memory would let a second
//! instance, or a restart, accept the forgery. This layer cannot import `db`, hence the
//! trait; [`MemoryReplayStore`] is the unit tests' stand-in.
//!
//! An unavailable store is answered 503 (`WebhookError::Unavailable`): the ESP retries
//! (Mailgun retries any answer but 200 and 406), and nothing unverifiable is accepted.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::BoxFuture;

/// Signature tokens seen, with the digest of the body each first came with.
pub trait ReplayStore: Send + Sync {
    /// Records `token` (of `provider`) with `body_sha256`, or compares with the digest it was
    /// first recorded with. `Ok(true)`: first use, or a re-delivery of the same body;
    /// `Ok(false)`: the token came before with another body; `Err`: the store is unavailable.
    /// Tokens whose signature was made before `expires_before` may be forgotten (they are
    /// refused as stale before the store is asked).
    fn admit<'a>(
        &'a self,
        provider: &'a str,
        token: &'a str,
        body_sha256: [u8; 32],
        signed_at: DateTime<Utc>,
        expires_before: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// (provider, token) -> (digest of the first body, signature time).
type Seen = HashMap<(String, String), ([u8; 32], DateTime<Utc>)>;

/// A process-local [`ReplayStore`], for unit tests (production uses the database).
#[derive(Default)]
pub struct MemoryReplayStore {
    seen: Mutex<Seen>,
}

impl ReplayStore for MemoryReplayStore {
    fn admit<'a>(
        &'a self,
        provider: &'a str,
        token: &'a str,
        body_sha256: [u8; 32],
        signed_at: DateTime<Utc>,
        expires_before: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| "replay store poisoned".to_string())?;
            seen.retain(|_, (_, at)| *at >= expires_before);
            let first = seen
                .entry((provider.to_owned(), token.to_owned()))
                .or_insert((body_sha256, signed_at));
            Ok(first.0 == body_sha256)
        })
    }
}

impl MemoryReplayStore {
    /// One store for the whole process: for tests whose provider never asks it.
    pub fn shared() -> &'static MemoryReplayStore {
        static SHARED: std::sync::OnceLock<MemoryReplayStore> = std::sync::OnceLock::new();
        SHARED.get_or_init(MemoryReplayStore::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_is_admitted_again_with_its_body_only_and_forgotten_once_expired() {
        let s = MemoryReplayStore::default();
        let now = Utc::now();
        let old = now - chrono::TimeDelta::hours(1);
        assert_eq!(s.admit("mailgun", "t", [1; 32], now, old).await, Ok(true));
        assert_eq!(s.admit("mailgun", "t", [1; 32], now, old).await, Ok(true));
        assert_eq!(s.admit("mailgun", "t", [2; 32], now, old).await, Ok(false));
        // Another provider's token of the same text is another token.
        assert_eq!(s.admit("other", "t", [2; 32], now, old).await, Ok(true));
        let later = now + chrono::TimeDelta::seconds(1);
        assert_eq!(
            s.admit("mailgun", "t", [2; 32], later, later).await,
            Ok(true)
        );
    }
}
