//! Integration tests: one binary, so one throwaway PostgreSQL serves them all (see
//! `helpers`). Each test gets its own database and its own app on port 0.

mod helpers;

mod admin;
mod archive;
mod bus;
mod db_tls;
mod deploy;
mod engagement;
mod failover;
mod hostile;
mod least_privilege;
mod lifecycle;
mod logs;
mod merge_property;
mod observability;
mod partitions;
mod pgbouncer;
mod pipeline;
mod probes;
mod scaling_doc;
mod schema;
mod tracking;
mod webhooks_common;
mod webhooks_mailgun;
mod webhooks_mandrill;
mod webhooks_postmark;
mod webhooks_resend;
mod webhooks_sendgrid;
mod webhooks_ses;
mod webhooks_sparkpost;
