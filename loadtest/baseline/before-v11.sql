-- For a baseline built before migration V11 (`--baseline-schema-sql`): email_events' two
-- seed foreign keys in place of V11's (organization_id, message_id) key, so the baseline's
-- inserts run the two referential checks they ran when it was built. Leaves V11's unique
-- key on campaign_messages (status updates never touch it).
ALTER TABLE public.email_events DROP CONSTRAINT IF EXISTS email_events_message_fkey;
ALTER TABLE public.email_events
  ADD CONSTRAINT email_events_message_id_fkey FOREIGN KEY (message_id)
    REFERENCES public.campaign_messages (id) ON DELETE CASCADE,
  ADD CONSTRAINT email_events_organization_id_fkey FOREIGN KEY (organization_id)
    REFERENCES public.organizations (id) ON DELETE CASCADE;
-- And V12's dedup index back in V1's order (dedup_key, created_at), the one it was built for.
DROP INDEX IF EXISTS public.idx_events_dedup;
CREATE UNIQUE INDEX idx_events_dedup ON public.email_events (dedup_key, created_at)
  WHERE dedup_key IS NOT NULL;
