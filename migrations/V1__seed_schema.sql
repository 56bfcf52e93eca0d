-- V1: the seed schema (../shared/seed-schema.md) with the changes reachly-ingest needs.
-- Every change from the seed carries a "CHANGE:" comment saying why.
--
-- CHANGE: UUID defaults use gen_random_uuid(), built into PostgreSQL 13+, instead of the
-- seed's uuid_generate_v4() (uuid-ossp), so the schema installs on plain PostgreSQL 15 with
-- no extension and no superuser.
-- CHANGE: every CREATE is IF NOT EXISTS (tables, indexes) or guarded (policies), so the
-- schema coexists with a managed `auth` schema (Supabase) and with objects made by hand.

CREATE SCHEMA IF NOT EXISTS auth;

-- Managed by Supabase Auth where it exists: created only if absent, never altered.
CREATE TABLE IF NOT EXISTS auth.users (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  email VARCHAR(255) NOT NULL UNIQUE,
  password_hash VARCHAR(255) NOT NULL,
  email_confirmed BOOLEAN DEFAULT FALSE,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS public.organizations (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  name VARCHAR(255) NOT NULL,
  slug VARCHAR(100) UNIQUE,
  logo_url TEXT,
  website VARCHAR(255),
  industry VARCHAR(100),
  size VARCHAR(50),
  settings JSONB DEFAULT '{}',
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS public.organization_members (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  user_id UUID NOT NULL REFERENCES auth.users(id) ON DELETE CASCADE,
  role VARCHAR(50) NOT NULL DEFAULT 'member',
  status VARCHAR(50) NOT NULL DEFAULT 'pending',
  invited_by UUID REFERENCES auth.users(id),
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  UNIQUE(organization_id, user_id)
);

CREATE TABLE IF NOT EXISTS public.profiles (
  id UUID PRIMARY KEY REFERENCES auth.users(id),
  first_name VARCHAR(100),
  last_name VARCHAR(100),
  avatar_url TEXT,
  title VARCHAR(100),
  phone VARCHAR(50),
  timezone VARCHAR(50) DEFAULT 'UTC',
  preferences JSONB DEFAULT '{}',
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS public.contacts (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  email VARCHAR(255) NOT NULL,
  first_name VARCHAR(100),
  last_name VARCHAR(100),
  phone VARCHAR(50),
  company VARCHAR(100),
  job_title VARCHAR(100),
  status VARCHAR(50) DEFAULT 'active', -- active, unsubscribed, bounced
  source VARCHAR(50),
  custom_fields JSONB DEFAULT '{}',
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  UNIQUE(organization_id, email)
);

CREATE TABLE IF NOT EXISTS public.contact_lists (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  name VARCHAR(255) NOT NULL,
  description TEXT,
  is_dynamic BOOLEAN DEFAULT FALSE,
  filter_criteria JSONB,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS public.contact_list_members (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  list_id UUID NOT NULL REFERENCES public.contact_lists(id) ON DELETE CASCADE,
  contact_id UUID NOT NULL REFERENCES public.contacts(id) ON DELETE CASCADE,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  UNIQUE(list_id, contact_id)
);

CREATE TABLE IF NOT EXISTS public.email_templates (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  name VARCHAR(255) NOT NULL,
  description TEXT,
  subject VARCHAR(255),
  html_content TEXT,
  text_content TEXT,
  variables JSONB DEFAULT '[]',
  category VARCHAR(50),
  is_archived BOOLEAN DEFAULT FALSE,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS public.campaigns (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  name VARCHAR(255) NOT NULL,
  description TEXT,
  template_id UUID REFERENCES public.email_templates(id),
  subject VARCHAR(255),
  from_name VARCHAR(100),
  from_email VARCHAR(255),
  reply_to VARCHAR(255),
  status VARCHAR(50) DEFAULT 'draft',
  scheduled_at TIMESTAMP WITH TIME ZONE,
  sent_at TIMESTAMP WITH TIME ZONE,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS public.campaign_lists (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  campaign_id UUID NOT NULL REFERENCES public.campaigns(id) ON DELETE CASCADE,
  list_id UUID NOT NULL REFERENCES public.contact_lists(id) ON DELETE CASCADE,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  UNIQUE(campaign_id, list_id)
);

CREATE TABLE IF NOT EXISTS public.campaign_messages (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  -- CHANGE: organization_id (NOT NULL, FK, indexed below). The seed's principle 1 says every
  -- tenant table carries it; the writer reads a message's tenant from here in one lookup,
  -- and RLS can filter this table without joining campaigns.
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  campaign_id UUID NOT NULL REFERENCES public.campaigns(id) ON DELETE CASCADE,
  contact_id UUID NOT NULL REFERENCES public.contacts(id) ON DELETE CASCADE,
  status VARCHAR(50) DEFAULT 'pending', -- pending, sent, delivered, opened, clicked, unsubscribed, complained, bounced
  sent_at TIMESTAMP WITH TIME ZONE,
  delivered_at TIMESTAMP WITH TIME ZONE,
  opened_at TIMESTAMP WITH TIME ZONE,
  clicked_at TIMESTAMP WITH TIME ZONE,
  error_message TEXT,
  -- CHANGE: error_at, the time of the event whose text is in error_message. SPEC.md wants
  -- the final row to depend only on the set of events, not their order: keeping the text
  -- of the latest error (ties broken by the text) needs that event's time beside it.
  error_at TIMESTAMP WITH TIME ZONE,
  created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  UNIQUE(campaign_id, contact_id)
);

-- CHANGE: email_events is range-partitioned by day on created_at (the time the event
-- happened), so retention is DROP of a partition instead of a huge DELETE, and today's
-- inserts touch only today's small indexes. A partitioned table's primary key must contain
-- the partition key, hence PRIMARY KEY (id, created_at); ids are UUIDv7 made by the service.
-- CHANGE: provider (who reported the event: an ESP name, or 'reachly' for our own pixel,
-- click and unsubscribe endpoints) and dedup_key (the ESP's stable event id, or a content
-- hash, provider-prefixed) with the unique index below: a re-delivered ESP event is not
-- stored twice. The ESP's event time is part of the key because a unique index on a
-- partitioned table must include the partition key; a re-delivery carries the same time.
-- CHANGE: event_type is checked against SPEC.md's nine types.
CREATE TABLE IF NOT EXISTS public.email_events (
  id UUID NOT NULL DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL REFERENCES public.organizations(id) ON DELETE CASCADE,
  message_id UUID NOT NULL REFERENCES public.campaign_messages(id) ON DELETE CASCADE,
  event_type VARCHAR(50) NOT NULL CONSTRAINT email_events_event_type_check CHECK (event_type IN
    ('sent', 'delivered', 'opened', 'clicked', 'bounced', 'complained', 'unsubscribed', 'deferred', 'dropped')),
  ip_address VARCHAR(50),
  user_agent TEXT,
  link_url TEXT,
  metadata JSONB DEFAULT '{}',
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  provider VARCHAR(32) NOT NULL DEFAULT 'reachly',
  dedup_key TEXT,
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- Catches any event outside the premade daily partitions (far future, far past); the
-- service moves a day's rows out of it when it makes that day's partition.
CREATE TABLE IF NOT EXISTS public.email_events_default PARTITION OF public.email_events DEFAULT;

CREATE UNIQUE INDEX IF NOT EXISTS idx_events_dedup ON public.email_events (dedup_key, created_at)
  WHERE dedup_key IS NOT NULL;

-- CHANGE: dead letters. SPEC.md: an ESP event that cannot be correlated, or names an
-- unknown message, is kept with its raw payload and the reason, never silently lost.
-- organization_id is the tenant the payload *claimed* (unverified; NULL if none).
CREATE TABLE IF NOT EXISTS public.webhook_dead_letters (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  received_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  provider VARCHAR(32) NOT NULL,
  reason TEXT NOT NULL,
  organization_id UUID,
  message_id UUID,
  event_type TEXT,
  dedup_key TEXT,
  payload TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_dead_letters_dedup ON public.webhook_dead_letters (dedup_key)
  WHERE dedup_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_dead_letters_received ON public.webhook_dead_letters (received_at);
CREATE INDEX IF NOT EXISTS idx_dead_letters_org_id ON public.webhook_dead_letters (organization_id);

-- Indexes: the seed's, by name.
CREATE INDEX IF NOT EXISTS idx_org_members_org_id ON public.organization_members(organization_id);
CREATE INDEX IF NOT EXISTS idx_org_members_user_id ON public.organization_members(user_id);
CREATE INDEX IF NOT EXISTS idx_org_members_status ON public.organization_members(organization_id, status);
CREATE INDEX IF NOT EXISTS idx_contacts_org_id ON public.contacts(organization_id);
CREATE INDEX IF NOT EXISTS idx_contacts_email ON public.contacts(organization_id, email);
CREATE INDEX IF NOT EXISTS idx_contacts_status ON public.contacts(organization_id, status);
CREATE INDEX IF NOT EXISTS idx_contact_lists_org_id ON public.contact_lists(organization_id);
CREATE INDEX IF NOT EXISTS idx_list_members_list_id ON public.contact_list_members(list_id);
CREATE INDEX IF NOT EXISTS idx_list_members_contact_id ON public.contact_list_members(contact_id);
CREATE INDEX IF NOT EXISTS idx_templates_org_id ON public.email_templates(organization_id);
CREATE INDEX IF NOT EXISTS idx_templates_archived ON public.email_templates(organization_id, is_archived);
CREATE INDEX IF NOT EXISTS idx_campaigns_org_id ON public.campaigns(organization_id);
CREATE INDEX IF NOT EXISTS idx_campaigns_status ON public.campaigns(organization_id, status);
CREATE INDEX IF NOT EXISTS idx_campaigns_scheduled ON public.campaigns(organization_id, scheduled_at)
  WHERE status = 'scheduled';
CREATE INDEX IF NOT EXISTS idx_messages_campaign_id ON public.campaign_messages(campaign_id);
CREATE INDEX IF NOT EXISTS idx_messages_contact_id ON public.campaign_messages(contact_id);
CREATE INDEX IF NOT EXISTS idx_messages_status ON public.campaign_messages(campaign_id, status);
-- CHANGE: the new tenant column is indexed like every other one (seed principle 2).
CREATE INDEX IF NOT EXISTS idx_messages_org_id ON public.campaign_messages(organization_id);
CREATE INDEX IF NOT EXISTS idx_events_org_id ON public.email_events(organization_id);
CREATE INDEX IF NOT EXISTS idx_events_message_id ON public.email_events(message_id);
CREATE INDEX IF NOT EXISTS idx_events_type ON public.email_events(organization_id, event_type);
CREATE INDEX IF NOT EXISTS idx_events_created ON public.email_events(organization_id, created_at);

-- Row-level security.
-- CHANGE: the seed's example policies call current_setting(name) without missing_ok, which
-- raises an error in any session that never set it, and ''::uuid raises too (a setting is ''
-- after RESET). reachly_current_org() reads it with missing_ok and maps '' to NULL, so an
-- unset session sees no rows instead of failing. Every tenant table gets a policy, not only
-- the seed's two examples; tables without organization_id check through their parent.
CREATE OR REPLACE FUNCTION public.reachly_current_org() RETURNS uuid
  LANGUAGE sql STABLE PARALLEL SAFE
  AS $$ SELECT NULLIF(current_setting('app.current_organization_id', true), '')::uuid $$;

ALTER TABLE public.organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.organization_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.contacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.contact_lists ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.contact_list_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.email_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.campaigns ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.campaign_lists ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.campaign_messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.email_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.webhook_dead_letters ENABLE ROW LEVEL SECURITY;

DO $$
DECLARE
  p record;
BEGIN
  FOR p IN SELECT * FROM (VALUES
    ('organizations', 'org_isolation_policy', 'id = public.reachly_current_org()'),
    ('organization_members', 'org_member_policy', 'organization_id = public.reachly_current_org()'),
    ('contacts', 'org_isolation_policy', 'organization_id = public.reachly_current_org()'),
    ('contact_lists', 'org_isolation_policy', 'organization_id = public.reachly_current_org()'),
    ('contact_list_members', 'org_isolation_policy',
      'EXISTS (SELECT 1 FROM public.contact_lists l WHERE l.id = list_id AND l.organization_id = public.reachly_current_org())'),
    ('email_templates', 'org_isolation_policy', 'organization_id = public.reachly_current_org()'),
    ('campaigns', 'org_isolation_policy', 'organization_id = public.reachly_current_org()'),
    ('campaign_lists', 'org_isolation_policy',
      'EXISTS (SELECT 1 FROM public.campaigns c WHERE c.id = campaign_id AND c.organization_id = public.reachly_current_org())'),
    ('campaign_messages', 'org_isolation_policy', 'organization_id = public.reachly_current_org()'),
    ('email_events', 'org_isolation_policy', 'organization_id = public.reachly_current_org()'),
    ('webhook_dead_letters', 'org_isolation_policy', 'organization_id = public.reachly_current_org()')
  ) AS t(tbl, pol, expr)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = p.tbl AND policyname = p.pol) THEN
      EXECUTE format('CREATE POLICY %I ON public.%I FOR ALL USING (%s) WITH CHECK (%s)', p.pol, p.tbl, p.expr, p.expr);
    END IF;
  END LOOP;
END
$$;
