-- V4: two seed indexes on contacts that duplicate another index. Found by the load test
-- (loadtest/results/2026-11-25T0917-full.md): every suppression (hard bounce, complaint,
-- unsubscribe) updates contacts.status, and no such update is HOT because of
-- idx_contacts_status, so each one inserts an entry into every index of the table
-- (2.3 blocks dirtied per updated row in that run). Every index this service does not need
-- and no query can prefer is pure write cost.
--
-- CHANGE: drop idx_contacts_email (organization_id, email): the UNIQUE (organization_id,
-- email) constraint of the seed already has exactly this index.
DROP INDEX IF EXISTS public.idx_contacts_email;
-- CHANGE: drop idx_contacts_org_id (organization_id): a prefix of that same unique index,
-- which serves any query on organization_id alone.
DROP INDEX IF EXISTS public.idx_contacts_org_id;
-- idx_contacts_status (organization_id, status) stays: tenant-facing queries ("active
-- contacts of this organization") use it, and suppressions are a few percent of events.
