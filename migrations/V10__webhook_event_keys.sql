-- V10: deduplication of ESP events that carry no time of their own.
-- The unique index idx_events_dedup is (dedup_key, created_at), because a unique index on a
-- partitioned table must contain the partition key. An event whose ESP sent no timestamp
-- (a real Postmark Bounce of Type Unsubscribe has no BouncedAt) is stored at its arrival
-- time, which differs on every re-delivery, so that index cannot catch the re-delivery.
-- The writer claims the key of each such event here first (one unpartitioned unique key)
-- and stores the event only if the claim is new. Events with their own time never touch
-- this table, so it stays small (a few rows per malformed event). No tenant data (a
-- provider-prefixed id or hash), so no organization_id and no RLS policy; first_seen_at lets
-- an operator prune keys older than every ESP's retry schedule (the longest, Resend's, is
-- about 28 hours).
CREATE TABLE IF NOT EXISTS public.webhook_event_keys (
  dedup_key TEXT PRIMARY KEY,
  first_seen_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()
);
