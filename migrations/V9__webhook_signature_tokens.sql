-- V9: replay protection for Mailgun webhooks, shared by every instance.
-- Mailgun signs only `timestamp + token`, not the event, so a captured signature could be
-- reused with a forged body (a forged hard bounce suppresses a real contact). Each token is
-- recorded with a digest of the body it first came with: the same token with the same body
-- is a re-delivery (accepted, and its event is deduplicated as usual); with another body it
-- is refused. A per-process cache cannot do this: a second instance, or the same one after a
-- restart, would accept the forgery. Rows are useful only while the signature's timestamp is
-- inside the accepted window (about 8 hours, Mailgun's retry schedule); the service deletes
-- older ones itself (signed_at index). No tenant data: a random token and a SHA-256 digest,
-- so no organization_id and no RLS policy.
CREATE TABLE IF NOT EXISTS public.webhook_signature_tokens (
  provider VARCHAR(32) NOT NULL,
  token TEXT NOT NULL,
  body_sha256 BYTEA NOT NULL,
  signed_at TIMESTAMP WITH TIME ZONE NOT NULL,
  PRIMARY KEY (provider, token)
);
CREATE INDEX IF NOT EXISTS idx_signature_tokens_signed_at ON public.webhook_signature_tokens (signed_at);
