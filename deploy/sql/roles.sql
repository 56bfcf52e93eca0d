-- Least-privilege roles for reachly-ingest (docs/deployment-database.md, "Roles").
--
--   reachly_owner  owns the schema: runs `reachly-ingest migrate` and `reachly-ingest
--                  maintain` (making and dropping partitions needs table ownership).
--   reachly_app    runs `reachly-ingest serve` with REACHLY_MIGRATE_ON_START=false (or true:
--                  nothing is attempted when the schema is current) and
--                  REACHLY_PARTITION_MAINTENANCE=off. It may read and write only what the
--                  writer touches, and needs neither BYPASSRLS (Azure PostgreSQL 15 and below
--                  cannot grant it to non-admin roles) nor ownership.
--
-- Run it as the server's admin (a superuser, or Azure's admin: CREATEROLE) connected to the
-- service's database, twice:
--   1. before the first migration: makes the roles and their database/schema privileges;
--   2. after every `reachly-ingest migrate`: grants on the tables and the writer's row-level
--      security policies (the part guarded by "tables exist" below, run as reachly_owner).
-- It is idempotent. Give the roles passwords separately (psql: \password reachly_owner).
--
-- Why a policy rather than BYPASSRLS: the writer stores every tenant's events in one batch
-- (the tenant of each event comes from its message's row, see README "Tenancy"), so it must
-- see and write all rows of the four tables it touches. A permissive policy for reachly_app
-- alone does that; tenant-facing roles still see only `reachly_current_org()`'s rows.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reachly_owner') THEN
    CREATE ROLE reachly_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reachly_app') THEN
    CREATE ROLE reachly_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
  END IF;
END
$$;

-- The admin must be a member of reachly_owner to act as it below (PostgreSQL 15 does not
-- make the creator a member). Without ADMIN/INHERIT options: SET ROLE only.
DO $$
BEGIN
  IF NOT pg_has_role(current_user, 'reachly_owner', 'MEMBER') THEN
    EXECUTE format('GRANT reachly_owner TO %I', current_user);
  END IF;
END
$$;

DO $$
BEGIN
  -- CREATE: V1 runs CREATE SCHEMA IF NOT EXISTS auth, which checks it even when auth exists.
  EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO reachly_owner', current_database());
  -- TEMPORARY: the writer stages each batch in a temporary table (COPY, then INSERT).
  EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO reachly_app', current_database());
END
$$;

GRANT USAGE, CREATE ON SCHEMA public TO reachly_owner;
GRANT USAGE ON SCHEMA public TO reachly_app;

-- After the migrations: table grants and the writer's policies, made by the tables' owner.
DO $$
DECLARE
  t text;
BEGIN
  IF to_regclass('public.email_events') IS NULL THEN
    RAISE NOTICE 'reachly: tables not there yet; run `reachly-ingest migrate` as reachly_owner, then this file again';
    RETURN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = 'public.email_events'::regclass
                 AND relowner = 'reachly_owner'::regrole) THEN
    RAISE EXCEPTION 'reachly: public.email_events is not owned by reachly_owner; migrate as reachly_owner (or ALTER TABLE ... OWNER TO reachly_owner for each table)';
  END IF;
  SET LOCAL ROLE reachly_owner;

  -- The writer: looks messages up, inserts events (RETURNING their type), merges statuses,
  -- suppresses contacts, keeps dead letters; the startup check selects every column it uses.
  GRANT SELECT ON public.campaign_messages, public.contacts TO reachly_app;
  GRANT UPDATE (status, sent_at, delivered_at, opened_at, clicked_at, error_message, error_at, updated_at)
    ON public.campaign_messages TO reachly_app;
  GRANT UPDATE (status, updated_at) ON public.contacts TO reachly_app;
  GRANT SELECT, INSERT ON public.email_events, public.webhook_dead_letters TO reachly_app;
  -- `serve` reads it to skip migrating when nothing is pending.
  GRANT SELECT ON public.refinery_schema_history TO reachly_app;
  -- Mailgun replay protection shared by every instance (V9) and the dedup keys of ESP events
  -- without a time of their own (V10); neither holds tenant rows. Pruning them is the owner's.
  IF to_regclass('public.webhook_signature_tokens') IS NOT NULL THEN
    -- INSERT ... ON CONFLICT DO UPDATE reads the first body's digest; expired rows are
    -- pruned by the service.
    GRANT SELECT, INSERT, UPDATE, DELETE ON public.webhook_signature_tokens TO reachly_app;
  END IF;
  IF to_regclass('public.webhook_event_keys') IS NOT NULL THEN
    GRANT SELECT, INSERT ON public.webhook_event_keys TO reachly_app;
  END IF;

  FOREACH t IN ARRAY ARRAY['campaign_messages', 'contacts', 'email_events', 'webhook_dead_letters'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = t
                   AND policyname = 'reachly_writer_policy') THEN
      EXECUTE format('CREATE POLICY reachly_writer_policy ON public.%I FOR ALL TO reachly_app USING (true) WITH CHECK (true)', t);
    END IF;
  END LOOP;
END
$$;
