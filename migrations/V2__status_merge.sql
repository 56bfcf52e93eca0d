-- V2: the order in which statuses may move (SPEC.md "Data rules"), used by the writer's
-- set-based merge. IMMUTABLE SQL functions are inlined by the planner.
-- Unknown or NULL statuses rank as pending, so any event can move them.

CREATE OR REPLACE FUNCTION public.reachly_message_status_rank(status text) RETURNS int
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$ SELECT CASE status
    WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2 WHEN 'opened' THEN 3 WHEN 'clicked' THEN 4
    WHEN 'unsubscribed' THEN 5 WHEN 'complained' THEN 6 WHEN 'bounced' THEN 7
    ELSE 0 END $$;

-- contacts.status: active < unsubscribed < bounced; never back to active through this service.
CREATE OR REPLACE FUNCTION public.reachly_contact_status_rank(status text) RETURNS int
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$ SELECT CASE status WHEN 'unsubscribed' THEN 1 WHEN 'bounced' THEN 2 ELSE 0 END $$;
