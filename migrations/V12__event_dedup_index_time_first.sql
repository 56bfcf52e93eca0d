-- V12: the ESP deduplication index leads with the event time, so new entries go near the
-- index's right edge instead of to a random leaf.
--
-- Why: idx_events_dedup (dedup_key, created_at) orders ESP events by their key, a random
-- string (SendGrid's sg_event_id, Mailgun's event id, a content hash), so each ESP event's
-- entry lands on a random leaf of today's partition's index: once that index outgrows the
-- cache, every insert reads a leaf from disk and dirties it, and the checkpoint writes as
-- many leaves as were touched. ESP events arrive close to their own time (seconds to
-- minutes; a retry carries its original time and goes to its own day's partition), so
-- with the time first the entries of a batch fall on the last few leaves.
--
-- Measured with loadtest/experiments/insert-under-load.sh (PostgreSQL 15 with the B1ms
-- settings; today's partition grown from empty to 2,000,000 events, 38% of them ESP events,
-- under each shape of the index; then 100,000 ESP events inserted in batches of 500 as the
-- writer does: staged, INSERT ... ON CONFLICT DO NOTHING, one commit per batch; the
-- INSERT's database CPU from /proc; three passes, each after 100,000 pixel events;
-- 2026-12-07):
--
-- | idx_events_dedup                  | INSERT CPU us per ESP event | pixel events (no key) |
-- |-----------------------------------|-----------------------------|-----------------------|
-- | (dedup_key, created_at), V1       | 27.3, 20.7, 22.8 (mean 23.6)| 16.1, 10.5, 10.9      |
-- | (created_at, dedup_key), this one | 17.7, 18.9, 18.0 (mean 18.2)| 16.8, 11.3, 13.5      |
--
-- A second run of the script the same day: 30.9, 22.6, 22.3 (mean 25.3) against 18.8, 18.3,
-- 18.3 (mean 18.5), pixel events 11.6-19.5 both ways.
--
-- In the load test the difference is inside its noise: the same build on each order, one
-- run, 8,000 / 11,300 / 8,000 / 11,300 req/s, 49.8 / 42.0 / 49.1 / 49.2 us of database CPU
-- per event with this order against 46.6 / 41.9 / 49.2 / 46.4 with V1's; its phases store
-- 0.5-2.1 million events, and an index of their ESP events stays in shared buffers, where
-- a random leaf costs little more than the last one. The order matters once a day's index
-- outgrows the cache (a large campaign's day on a 2 GiB server), which is when every
-- random insert would be a read.
--
-- 23-27% less for an ESP event's insert, nothing changed for pixel events (which have no
-- entry); in the load test's mix (38% ESP events) about 2 us of the ~40 us of database CPU
-- per event. The load test's per-relation page writes give the index's share of the data
-- pages written before and after (README, Measured performance).
--
-- What stays the same: the index's purpose and rule. It is the arbiter of the writer's
-- ON CONFLICT DO NOTHING (a re-delivered ESP event is stored once), which matches on both
-- columns, so their order does not change which rows conflict; no query reads it by
-- dedup_key alone (events without their own time are deduplicated on dedup_key alone in
-- webhook_event_keys, V10). It stays partial (WHERE dedup_key IS NOT NULL): pixel and click
-- events have no key and no entry.
--
-- Cost of applying it: the index is rebuilt on every partition, holding a lock that blocks
-- writes to email_events meanwhile (seconds per million events; the service keeps accepting
-- events into memory and its spool and writes them after). On a long history, apply it in
-- a quiet hour, or drop old partitions first (retention).
--
-- CHANGE: idx_events_dedup becomes (created_at, dedup_key), same uniqueness.
DO $$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    WHERE c.relname = 'idx_events_dedup'
      AND c.relnamespace = 'public'::regnamespace
      AND pg_get_indexdef(i.indexrelid) LIKE '%(created_at, dedup_key)%'
  ) THEN
    DROP INDEX IF EXISTS public.idx_events_dedup;
    CREATE UNIQUE INDEX idx_events_dedup ON public.email_events (created_at, dedup_key)
      WHERE dedup_key IS NOT NULL;
  END IF;
END
$$;
