-- Undoes before-v11.sql after the baseline phase (`--baseline-restore-sql`): V11's
-- (organization_id, message_id) key again, so the naive and limit references that follow
-- meet this build's schema.
ALTER TABLE public.email_events
  DROP CONSTRAINT IF EXISTS email_events_message_id_fkey,
  DROP CONSTRAINT IF EXISTS email_events_organization_id_fkey;
ALTER TABLE public.email_events
  ADD CONSTRAINT email_events_message_fkey FOREIGN KEY (organization_id, message_id)
    REFERENCES public.campaign_messages (organization_id, id) ON DELETE CASCADE;
-- And V12's dedup index, time first.
DROP INDEX IF EXISTS public.idx_events_dedup;
CREATE UNIQUE INDEX idx_events_dedup ON public.email_events (created_at, dedup_key)
  WHERE dedup_key IS NOT NULL;
