-- V11: one foreign-key check per stored event instead of two, and the database itself
-- refusing an event filed under a tenant other than its message's.
--
-- Why: every row inserted into email_events ran two referential-integrity checks, each an
-- SPI query that probes the parent's key and locks the parent row FOR KEY SHARE:
-- message_id -> campaign_messages(id) and organization_id -> organizations(id). Measured on
-- the load test's database (PostgreSQL 15, 247,200 messages, 5 organizations; 80,000 events
-- inserted with EXPLAIN ANALYZE, twice each way, 2026-12-01):
--
-- | foreign keys of email_events                      | INSERT, ms | trigger time, ms    |
-- |---------------------------------------------------|------------|---------------------|
-- | seed: message_id, organization_id (two checks)    | 1586-1724  | 507-627 + 295-309   |
-- | (organization_id, message_id) composite (one)     | 1251-1317  | 506-529             |
--
-- A fifth of the insert's time, and in `perf` of the database core at 6,000 req/s the FK
-- checks (SPI_execute_snapshot) were 24% of PostgreSQL's CPU. The organization check is
-- redundant once the message check includes the tenant: a message row's organization
-- exists (campaign_messages_organization_id_fkey), so an event whose (organization_id,
-- message_id) names a message row has an existing organization too.
--
-- What stays the same: deleting a message deletes its events (ON DELETE CASCADE through
-- the new key); deleting an organization deletes its messages, which deletes their events
-- (the path changes, the outcome does not); the writer's retry on a foreign-key violation
-- (a message deleted after the writer cached it) sees the same SQLSTATE 23503.
-- What is stronger: an event can no longer be stored under another tenant than its
-- message's, whoever inserts it (the writer already never did; now the database says so).
--
-- CHANGE: UNIQUE (organization_id, id) on campaign_messages, the key the new foreign key
-- references (id alone is already unique, so this adds no rule, only the index a composite
-- foreign key needs; tenant first, as docs/scaling.md's Citus layout wants it). Status
-- updates do not touch it (neither column changes), so they stay HOT.
ALTER TABLE public.campaign_messages
  ADD CONSTRAINT campaign_messages_organization_id_id_key UNIQUE (organization_id, id);

-- CHANGE: email_events (organization_id, message_id) -> campaign_messages (organization_id,
-- id), replacing the two single-column keys. Adding it checks every existing event (an
-- event whose organization is not its message's fails the migration, which then changes
-- nothing: it runs in one transaction).
ALTER TABLE public.email_events
  ADD CONSTRAINT email_events_message_fkey FOREIGN KEY (organization_id, message_id)
    REFERENCES public.campaign_messages (organization_id, id) ON DELETE CASCADE;
ALTER TABLE public.email_events
  DROP CONSTRAINT IF EXISTS email_events_message_id_fkey,
  DROP CONSTRAINT IF EXISTS email_events_organization_id_fkey;
