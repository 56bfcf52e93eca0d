-- V5: row-level security on every relation that holds tenant rows, partitions included.
--
-- Why: V1 enabled RLS and a policy on email_events, but its partitions (email_events_default
-- and the daily email_events_pYYYYMMDD the service makes) had neither. PostgreSQL applies the
-- policies of the relation a query *names*: a query on email_events uses email_events'
-- policies (the partitions' are ignored), a query naming a partition uses only that
-- partition's. Policies are not inherited, and neither CREATE TABLE ... LIKE nor ATTACH
-- PARTITION copies them. A tenant role with SELECT on a partition (Supabase-style default
-- privileges grant it on every table the service creates) therefore read every tenant's
-- events. What protects a direct SELECT on a partition is RLS enabled on that partition and
-- its own policy: enabled without a policy denies every row (safe, but the tenant could not
-- read its own rows there either). FORCE ROW LEVEL SECURITY is not the answer: it only
-- concerns the table owner, which is this service (it writes every tenant's rows), never a
-- tenant role.
--
-- CHANGE: reachly_secure_tenant_relation(rel) enables RLS on rel and gives it the tenant
-- policy when it has none; it changes nothing (and takes no lock) when both are there. It is
-- applied here to every relation with an organization_id column, and partition maintenance
-- (src/db/partitions.rs) applies it to each partition it makes, in the transaction that makes
-- it (so no partition is ever visible without it), and to every partition each round (so a
-- partition made by hand is covered too).
CREATE OR REPLACE FUNCTION public.reachly_secure_tenant_relation(rel regclass) RETURNS boolean
  LANGUAGE plpgsql
  AS $$
DECLARE
  changed boolean := false;
BEGIN
  IF NOT (SELECT c.relrowsecurity FROM pg_catalog.pg_class c WHERE c.oid = rel) THEN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', rel);
    changed := true;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = rel) THEN
    EXECUTE format('CREATE POLICY org_isolation_policy ON %s FOR ALL '
      'USING (organization_id = public.reachly_current_org()) '
      'WITH CHECK (organization_id = public.reachly_current_org())', rel);
    changed := true;
  END IF;
  RETURN changed;
END
$$;

SELECT public.reachly_secure_tenant_relation(c.oid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
  AND a.attname = 'organization_id' AND NOT a.attisdropped;

-- CHANGE: V1 described webhook_dead_letters.organization_id as the claimed tenant; the writer
-- now stores the message row's organization (or NULL), so RLS never shows tenant B a dead
-- letter about tenant A's message.
COMMENT ON COLUMN public.webhook_dead_letters.organization_id IS
  'organization of the message row the dead letter names, when that message exists; else NULL (never the organization a request claimed)';
