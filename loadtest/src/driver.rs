//! The open-loop driver: requests are *scheduled* at a fixed arrival rate (request `i` at
//! `start + i / rate`), whatever the server does, and each latency is measured from the
//! scheduled time to the end of the response body. A slow server therefore shows up as
//! queueing in the latencies (no coordinated omission), and as an achieved rate below the
//! offered one. (A request sent up to a millisecond early, as the timer's resolution allows,
//! is measured from when it was sent.) Every request of a step, bodies and signatures
//! included, is made before the step's clock starts, so making one does not delay others.
//! Requests go over pooled HTTP/1.1 keep-alive connections (hyper's client);
//! at most `max_in_flight` pixel and click requests and `webhook_max_in_flight` webhook
//! requests are outstanding (two pools: a webhook waits for the commit, and must not hold up
//! the mail clients), later ones wait for a slot (and that wait counts in their latency);
//! each request, wait included, is bounded by a timeout.
//!
//! Every outcome also goes to the phase's [`Ledger`]: which tracking requests were accepted
//! (their row must be stored exactly once), which had tampered tokens (no row), which are
//! uncertain (transport error, timeout: zero or one row), and how many webhook events of
//! each type were acknowledged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::workload::{Expect, Prepared, Route, Workload};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How early the scheduler may wake before a request's time (the timer's resolution).
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Bound on one request, including the wait for a connection slot.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub fn http_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(conn)
}

/// GET `url`; the status and the body as text.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<(u16, String)> {
    let req = Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends one prepared request; the status.
pub async fn send(client: &HttpClient, base: &str, p: &Prepared) -> anyhow::Result<u16> {
    let mut b = Request::builder()
        .method(if p.post { Method::POST } else { Method::GET })
        .uri(format!("{base}{}", p.path));
    for (k, v) in &p.headers {
        b = b.header(*k, v);
    }
    let resp = client.request(b.body(Full::new(p.body.clone()))?).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

// Ledger codes of tracking requests (low bits) and flags.
const UNSENT: u8 = 0;
const ACCEPTED: u8 = 1;
const REFUSED_OK: u8 = 2;
const UNCERTAIN: u8 = 3;
const REFUSED_WRONG: u8 = 4;
const CODE_MASK: u8 = 0x0f;
const CLICK: u8 = 0x10;
const WEBHOOK: u8 = 0x20;

/// The outcome of every request of a phase, indexed by rid.
#[derive(Debug, Default)]
pub struct Ledger {
    codes: Vec<u8>,
    /// Webhook events acknowledged with 2xx, by (provider, stored type).
    pub webhook_accepted: BTreeMap<(&'static str, &'static str), u64>,
    /// Webhook events whose request failed or was refused (zero or one row each).
    pub webhook_uncertain: BTreeMap<(&'static str, &'static str), u64>,
    /// Webhook requests answered 2xx / otherwise.
    pub webhook_requests_ok: u64,
    pub webhook_requests_failed: u64,
}

/// What the ledger says about one tracking rid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingOutcome {
    NotTracking,
    Unsent,
    /// Valid token, 200/302: exactly one row.
    Accepted {
        click: bool,
    },
    /// Tampered token answered as it should: no row.
    Refused,
    /// Transport error or unexpected status: zero or one row.
    Uncertain {
        click: bool,
    },
    /// Tampered token answered as if valid (a redirect to it, or a 5xx): a product bug.
    RefusedWrongly,
}

impl Ledger {
    fn slot(&mut self, rid: u64) -> &mut u8 {
        let i = rid as usize;
        if self.codes.len() <= i {
            self.codes.resize((i + 1).max(self.codes.len() * 2), UNSENT);
        }
        &mut self.codes[i]
    }

    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    pub fn outcome(&self, rid: u64) -> TrackingOutcome {
        let Some(&c) = self.codes.get(rid as usize) else {
            return TrackingOutcome::Unsent;
        };
        if c & WEBHOOK != 0 {
            return TrackingOutcome::NotTracking;
        }
        let click = c & CLICK != 0;
        match c & CODE_MASK {
            ACCEPTED => TrackingOutcome::Accepted { click },
            REFUSED_OK => TrackingOutcome::Refused,
            UNCERTAIN => TrackingOutcome::Uncertain { click },
            REFUSED_WRONG => TrackingOutcome::RefusedWrongly,
            _ => TrackingOutcome::Unsent,
        }
    }

    /// Records the answer to `p` (`None`: no answer).
    pub fn record(&mut self, p: &Prepared, status: Option<u16>) {
        match &p.expect {
            Expect::Tracking { valid, .. } => {
                let flag = if p.route == Route::Click { CLICK } else { 0 };
                let code = match (valid, status) {
                    (true, Some(s)) if p.status_ok(s) => ACCEPTED,
                    (true, _) => UNCERTAIN,
                    (false, Some(s)) if p.status_ok(s) => REFUSED_OK,
                    // No answer for a tampered token: nothing to check either way.
                    (false, None) => REFUSED_OK,
                    (false, Some(_)) => REFUSED_WRONG,
                };
                *self.slot(p.rid) = code | flag;
            }
            Expect::Webhook {
                provider,
                event_types,
            } => {
                *self.slot(p.rid) = WEBHOOK;
                let ok = status.is_some_and(|s| p.status_ok(s));
                let map = if ok {
                    self.webhook_requests_ok += 1;
                    &mut self.webhook_accepted
                } else {
                    self.webhook_requests_failed += 1;
                    &mut self.webhook_uncertain
                };
                for t in event_types {
                    *map.entry((*provider, *t)).or_default() += 1;
                }
            }
        }
    }

    /// Tracking requests by outcome: (accepted, refused, uncertain, refused wrongly).
    pub fn tracking_summary(&self) -> (u64, u64, u64, u64) {
        let mut s = (0, 0, 0, 0);
        for &c in &self.codes {
            if c & WEBHOOK != 0 {
                continue;
            }
            match c & CODE_MASK {
                ACCEPTED => s.0 += 1,
                REFUSED_OK => s.1 += 1,
                UNCERTAIN => s.2 += 1,
                REFUSED_WRONG => s.3 += 1,
                _ => {}
            }
        }
        s
    }
}

/// Latencies and answers of one route.
#[derive(Debug, Clone)]
pub struct RouteStats {
    /// Microseconds from the scheduled time to the end of the response.
    pub hist: Histogram<u64>,
    /// Expected answers.
    pub ok: u64,
    /// Answers with another status.
    pub bad_status: u64,
    /// No answer (connection error, timeout).
    pub errors: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Events the expected answers acknowledged (a valid pixel or click: one; a webhook: its
    /// events; a tampered token: none).
    pub events_acked: u64,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ok: 0,
            bad_status: 0,
            errors: 0,
            statuses: BTreeMap::new(),
            events_acked: 0,
        }
    }
}

impl RouteStats {
    pub fn count(&self) -> u64 {
        self.ok + self.bad_status + self.errors
    }
    /// Quantile in milliseconds (`None` without samples).
    pub fn ms(&self, q: f64) -> Option<f64> {
        (!self.hist.is_empty()).then(|| self.hist.value_at_quantile(q) as f64 / 1000.0)
    }
    pub fn merge(&mut self, other: &RouteStats) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.bad_status += other.bad_status;
        self.errors += other.errors;
        self.events_acked += other.events_acked;
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
    }
}

/// Stats of one time segment of a step, per route.
#[derive(Debug, Clone, Default)]
pub struct SegmentStats {
    pub routes: [RouteStats; 4],
}

impl SegmentStats {
    pub fn route(&self, r: Route) -> &RouteStats {
        &self.routes[r.index()]
    }
    pub fn ok(&self) -> u64 {
        self.routes.iter().map(|r| r.ok).sum()
    }
    pub fn requests(&self) -> u64 {
        self.routes.iter().map(|r| r.count()).sum()
    }
    pub fn events_acked(&self) -> u64 {
        self.routes.iter().map(|r| r.events_acked).sum()
    }
    /// Latency quantile over the tracking routes (pixel and click).
    pub fn tracking_ms(&self, q: f64) -> Option<f64> {
        let mut h = self.routes[Route::Pixel.index()].hist.clone();
        let _ = h.add(&self.routes[Route::Click.index()].hist);
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// One step: the offered rate, its duration, and where its time segments start (offsets
/// from the start; an empty list is one segment).
#[derive(Debug, Clone)]
pub struct StepSpec {
    pub rate: f64,
    pub duration: Duration,
    pub segment_starts: Vec<Duration>,
}

#[derive(Debug, Clone)]
pub struct StepResult {
    pub offered: f64,
    pub scheduled: u64,
    /// Expected answers per second, over the step (or until the last answer, if later).
    pub achieved: f64,
    /// From the first scheduled request to the last answer.
    pub elapsed: Duration,
    pub segments: Vec<SegmentStats>,
    /// Largest number of requests outstanding at once.
    pub peak_in_flight: usize,
    /// How far the scheduler itself fell behind (a saturated load generator).
    pub max_schedule_lag: Duration,
}

impl StepResult {
    /// All segments merged.
    pub fn total(&self) -> SegmentStats {
        let mut t = SegmentStats::default();
        for s in &self.segments {
            for (a, b) in t.routes.iter_mut().zip(&s.routes) {
                a.merge(b);
            }
        }
        t
    }
}

pub struct Driver {
    pub client: HttpClient,
    /// Base URLs of the servers; request *i* goes to `bases[i % len]` (the bus mode's edges
    /// share the traffic as behind a round-robin load balancer).
    pub bases: Vec<String>,
    /// Outstanding pixel and click requests at most.
    pub max_in_flight: usize,
    /// Outstanding webhook requests at most (ESPs post with bounded concurrency).
    pub webhook_max_in_flight: usize,
}

struct Shared {
    segments: Vec<SegmentStats>,
    last_answer: Instant,
}

impl Driver {
    pub fn new(bases: Vec<String>, max_in_flight: usize, webhook_max_in_flight: usize) -> Driver {
        assert!(!bases.is_empty(), "a driver needs a server");
        Driver {
            client: http_client(),
            bases,
            max_in_flight,
            webhook_max_in_flight,
        }
    }

    /// Runs one step; returns once every request has been answered or timed out.
    pub async fn run(
        &self,
        workload: &mut Workload,
        ledger: &Arc<Mutex<Ledger>>,
        spec: &StepSpec,
    ) -> StepResult {
        let n_segments = spec.segment_starts.len().max(1);
        // Every request of the step is made before its clock starts: a SendGrid batch of
        // 1,000 events is several milliseconds of JSON and signing, and made on time it
        // delayed every request due meanwhile on this one thread (the lag counted as the
        // server's latency).
        let mut prepared_all: Vec<Prepared> = Vec::new();
        while Duration::from_secs_f64(prepared_all.len() as f64 / spec.rate) < spec.duration {
            prepared_all.push(workload.next_request());
        }
        let mut prepared_all = prepared_all.into_iter();
        let start = Instant::now();
        let shared = Arc::new(Mutex::new(Shared {
            segments: vec![SegmentStats::default(); n_segments],
            last_answer: start,
        }));
        // Two pools of slots: mail clients (pixels, clicks) and ESPs (webhooks) are different
        // clients, and webhooks wait for the commit: they must not hold up the mail clients.
        let tracking = Arc::new(Semaphore::new(self.max_in_flight));
        let webhooks = Arc::new(Semaphore::new(self.webhook_max_in_flight));
        let mut tasks = JoinSet::new();
        let mut i: u64 = 0;
        let mut peak_in_flight = 0usize;
        let mut max_lag = Duration::ZERO;
        loop {
            let offset = Duration::from_secs_f64(i as f64 / spec.rate);
            if offset >= spec.duration {
                break;
            }
            let due = start + offset;
            // The timer ticks in whole milliseconds and rounds up: sleeping until `due` would
            // add up to a millisecond to every latency. Wake up to a millisecond early instead,
            // and measure such a request from when it was really sent.
            if due > Instant::now() + TIMER_SLACK {
                tokio::time::sleep_until((due - TIMER_SLACK).into()).await;
            }
            let now = Instant::now();
            if now > due {
                max_lag = max_lag.max(now - due);
            }
            // Late (queued behind the schedule): from the scheduled time; early: from now.
            let sent_from = now.min(due);
            let Some(prepared) = prepared_all.next() else {
                break;
            };
            let segment = spec
                .segment_starts
                .iter()
                .filter(|s| offset >= **s)
                .count()
                .saturating_sub(1)
                .min(n_segments - 1);
            let client = self.client.clone();
            let base = self.bases[i as usize % self.bases.len()].clone();
            let slots = match prepared.route {
                Route::Pixel | Route::Click => tracking.clone(),
                Route::Sendgrid | Route::Mailgun => webhooks.clone(),
            };
            let shared = shared.clone();
            let ledger = ledger.clone();
            tasks.spawn(async move {
                let attempt = async {
                    let _slot = slots.acquire_owned().await.ok();
                    send(&client, &base, &prepared).await
                };
                let status = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
                    Ok(Ok(s)) => Some(s),
                    _ => None,
                };
                let done = Instant::now();
                let micros = done.saturating_duration_since(sent_from).as_micros() as u64;
                if let Ok(mut l) = ledger.lock() {
                    l.record(&prepared, status);
                }
                if let Ok(mut s) = shared.lock() {
                    s.last_answer = s.last_answer.max(done);
                    let r = &mut s.segments[segment].routes[prepared.route.index()];
                    let _ = r.hist.record(micros.max(1));
                    match status {
                        Some(st) => {
                            *r.statuses.entry(st).or_default() += 1;
                            if prepared.status_ok(st) {
                                r.ok += 1;
                                r.events_acked += prepared.events() as u64;
                            } else {
                                r.bad_status += 1
                            }
                        }
                        None => r.errors += 1,
                    }
                }
            });
            i += 1;
            peak_in_flight = peak_in_flight.max(tasks.len());
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        let s = shared.lock().map(|s| (s.segments.clone(), s.last_answer));
        let (segments, last) =
            s.unwrap_or_else(|_| (vec![SegmentStats::default(); n_segments], start));
        let elapsed = (last - start).max(spec.duration);
        let ok: u64 = segments.iter().map(|s| s.ok()).sum();
        StepResult {
            offered: spec.rate,
            scheduled: i,
            achieved: ok as f64 / elapsed.as_secs_f64(),
            elapsed,
            segments,
            peak_in_flight,
            max_schedule_lag: max_lag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn prepared(rid: u64, route: Route, expect: Expect) -> Prepared {
        Prepared {
            rid,
            route,
            post: false,
            path: String::new(),
            headers: vec![],
            body: Bytes::new(),
            expect,
        }
    }

    #[test]
    fn the_ledger_classifies_answers() {
        let mut l = Ledger::default();
        let valid = Expect::Tracking {
            valid: true,
            event_type: "clicked",
        };
        let bad = Expect::Tracking {
            valid: false,
            event_type: "clicked",
        };
        l.record(&prepared(0, Route::Click, valid.clone()), Some(302));
        l.record(&prepared(1, Route::Click, bad.clone()), Some(404));
        l.record(&prepared(2, Route::Click, bad), Some(302));
        l.record(&prepared(3, Route::Click, valid), None);
        l.record(
            &prepared(
                4,
                Route::Sendgrid,
                Expect::Webhook {
                    provider: "sendgrid",
                    event_types: vec!["opened", "opened"],
                },
            ),
            Some(200),
        );
        assert_eq!(l.outcome(0), TrackingOutcome::Accepted { click: true });
        assert_eq!(l.outcome(1), TrackingOutcome::Refused);
        assert_eq!(l.outcome(2), TrackingOutcome::RefusedWrongly);
        assert_eq!(l.outcome(3), TrackingOutcome::Uncertain { click: true });
        assert_eq!(l.outcome(4), TrackingOutcome::NotTracking);
        assert_eq!(l.outcome(99), TrackingOutcome::Unsent);
        assert_eq!(l.webhook_accepted[&("sendgrid", "opened")], 2);
        assert_eq!(l.tracking_summary(), (1, 1, 1, 1));
    }
}
