//! Integration tests: one binary, so one throwaway PostgreSQL serves them all (see
//! `helpers`). Each test gets its own database and its own app on port 0.

mod helpers;

mod admin;
mod db_tls;
mod hostile;
mod lifecycle;
mod logs;
mod merge_property;
mod partitions;
mod pipeline;
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
