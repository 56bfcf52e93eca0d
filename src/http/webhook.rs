//! The HTTP side of ESP webhooks: `POST|HEAD /webhooks/{provider}`. It reads the body
//! within its limits, asks the provider (`webhooks`) to verify and parse it, applies the IP
//! privacy mode, and answers 2xx only once every record of the request is committed or
//! fsync'd to the spool (`Ingest::submit_durable`). Refusals are [`Reject`]s: 401 on failed
//! authentication (counted by provider, the reason logged, never sent), 400 on an
//! unparseable body, 413 past the provider's body limit (`Provider::max_body_bytes`, capped by
//! `REACHLY_WEBHOOK_MAX_BYTES`) or for a batch whose events could never fit the spool
//! (retrying it cannot help), 503 when the events cannot be made durable now or the body
//! budget is spent, and 404 for a provider with no secret configured.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};

use super::reject::{NotDurableWhat, Reject};
use super::replay::PgReplayStore;
use super::state::AppState;
use super::{Req, Resp, read_body, stored_ip, text};
use crate::config::IpMode;
use crate::event::Record;
use crate::metrics::WEBHOOK_AUTH_FAILURES_TOTAL;
use crate::pipeline::NotDurable;
use crate::webhooks::{ParseContext, Provider, WebhookError, WebhookRequest};

/// `POST|HEAD /webhooks/{provider}`.
pub async fn handle(req: Req, state: Arc<AppState>, name: &str) -> Result<Resp, Reject> {
    let Some(provider) = state.webhooks.get(name).cloned() else {
        return Err(Reject::NotFound);
    };
    if req.method() == Method::HEAD {
        // Mandrill validates a webhook URL with an unsigned HEAD; it reveals nothing.
        return Ok(text(StatusCode::OK, ""));
    }
    let received_at = Utc::now();
    let cfg = &state.config;
    let limit = provider
        .max_body_bytes()
        .min(cfg.webhooks.webhook_max_bytes);
    // `_held` keeps the body's bytes counted against the budget until the request is done.
    let (parts, body, _held) =
        read_body(req, limit, cfg.server.body_timeout, &state.body_budget).await?;
    let source = provider.source().label();
    {
        let in_database = PgReplayStore { pool: &state.pool };
        let wreq = webhook_request(&state, &in_database, &parts, &body, received_at);
        if let Err(e) = provider.verify(&wreq).await {
            if let WebhookError::Unauthorized(reason) = &e {
                state
                    .metrics
                    .counter(WEBHOOK_AUTH_FAILURES_TOTAL, &[("provider", source)])
                    .increment(1);
                tracing::info!(
                    provider = source,
                    reason = reason.reason(),
                    "webhook authentication failed"
                );
            }
            return Err(e.into());
        }
        provider.after_verify(&wreq).await?;
    }
    let parsed = if body.len() > PARSE_ON_BLOCKING_POOL_BYTES {
        let (job_state, provider) = (state.clone(), provider.clone());
        let job = move || parse(&job_state, provider.as_ref(), &parts, &body, received_at);
        match state.ingest.spawn_blocking(job).await {
            Ok(parsed) => parsed,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down: the ESP retries.
            Err(_) => {
                return Err(Reject::NotDurable {
                    what: NotDurableWhat::Webhook,
                    why: NotDurable::ShuttingDown.to_string(),
                });
            }
        }
    } else {
        parse(&state, provider.as_ref(), &parts, &body, received_at)
    };
    let mut records = match parsed {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(provider = source, error = %e, "webhook body refused");
            return Err(e.into());
        }
    };
    apply_ip_mode(&mut records, cfg.tracking.ip_mode);
    let n = records.len();
    match state.ingest.submit_durable(records).await {
        Ok(()) => Ok(text(StatusCode::OK, "ok\n")),
        Err(NotDurable::TooLarge) => {
            tracing::warn!(
                provider = source,
                records = n,
                "webhook batch too large to ever store; refused with 413"
            );
            Err(Reject::BatchTooLarge)
        }
        Err(why) => {
            tracing::warn!(provider = source, records = n, %why, "webhook not durable; asking the ESP to retry");
            Err(Reject::NotDurable {
                what: NotDurableWhat::Webhook,
                why: why.to_string(),
            })
        }
    }
}

/// Bodies larger than this are parsed on the pipeline's blocking threads
/// ([`crate::pipeline::runtime`]: below the request path's CPU priority), not on the runtime
/// worker that serves pixels and clicks. Parsing costs about 25 us per event (a SendGrid batch of
/// 1,000 events, ~350 kB: ~25 ms of CPU, measured with `perf` in the load test); on the
/// service's one worker that was a 25 ms stall for every tracking request behind it
/// (pixel p99 1.3 -> 11 ms at 1,500 req/s when SendGrid's batches went from 100 to 1,000
/// events). On a thread of its own the kernel time-slices the parse against the worker,
/// and at the lower priority lets the worker preempt it when a request arrives. A
/// body under this (about 40 events) parses in under a millisecond, less than the
/// hand-off is worth.
const PARSE_ON_BLOCKING_POOL_BYTES: usize = 16 * 1024;

/// The request as the providers see it, with the replay store in use (the bus's when this
/// is a bus edge, else the database's).
fn webhook_request<'a>(
    state: &'a AppState,
    in_database: &'a PgReplayStore<'a>,
    parts: &'a Parts,
    body: &'a [u8],
    received_at: DateTime<Utc>,
) -> WebhookRequest<'a> {
    let replay: &dyn crate::webhooks::ReplayStore = match &state.bus_replay {
        Some(on_the_bus) => on_the_bus,
        None => in_database,
    };
    WebhookRequest {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        body,
        received_at,
        replay,
    }
}

/// The provider's records of a verified request (CPU only: no I/O).
fn parse(
    state: &AppState,
    provider: &dyn Provider,
    parts: &Parts,
    body: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Vec<Record>, WebhookError> {
    let in_database = PgReplayStore { pool: &state.pool };
    let wreq = webhook_request(state, &in_database, parts, body, received_at);
    provider.parse(
        &wreq,
        &ParseContext {
            machine: &state.machine,
        },
    )
}

/// `REACHLY_IP_MODE` for the addresses ESPs report (opens, clicks), as for our own hits:
/// truncated, kept or dropped; anything that is not an IP address is dropped.
fn apply_ip_mode(records: &mut [Record], mode: IpMode) {
    for r in records {
        if let Record::Event(e) = r {
            e.ip_address = e
                .ip_address
                .take()
                .and_then(|ip| ip.trim().parse().ok())
                .and_then(|ip| stored_ip(ip, mode));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType, Source};
    use uuid::Uuid;

    #[test]
    fn esp_reported_ips_follow_the_ip_mode() {
        let with_ip = |ip: &str| {
            let mut e = Event::new(Uuid::nil(), EventType::Opened, Utc::now(), Source::Mandrill);
            e.ip_address = Some(ip.to_owned());
            Record::Event(e)
        };
        let ip_of = |r: &Record| match r {
            Record::Event(e) => e.ip_address.clone(),
            Record::DeadLetter(_) => None,
        };
        let mut recs = vec![
            with_ip("192.0.2.77"),
            with_ip("2001:db8:abcd:12::1"),
            with_ip("nope"),
        ];
        apply_ip_mode(&mut recs, IpMode::Truncate);
        let got: Vec<Option<String>> = recs.iter().map(ip_of).collect();
        assert_eq!(
            got,
            [
                Some("192.0.2.0".into()),
                Some("2001:db8:abcd::".into()),
                None
            ]
        );
        let mut recs = vec![with_ip(" 192.0.2.77 ")];
        apply_ip_mode(&mut recs, IpMode::Full);
        assert_eq!(ip_of(&recs[0]).as_deref(), Some("192.0.2.77"));
        apply_ip_mode(&mut recs, IpMode::None);
        assert_eq!(ip_of(&recs[0]), None);
    }
}
