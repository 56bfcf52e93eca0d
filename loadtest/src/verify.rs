//! The exactly-once check of a phase, from the database, after the drain.
//!
//! Pixels and clicks: every stored `reachly` row carries its request id at the end of its
//! user agent (` lt/<rid>`). The rows' rids are streamed out with COPY and counted against
//! the phase's [`Ledger`]: an accepted request must have exactly one row of its type, a
//! tampered token none, an uncertain request (no answer) at most one; a row whose rid was
//! never sent is foreign. Webhooks: the stored rows per (provider, type) must equal the
//! events acknowledged with 2xx, plus at most the events of requests without a 2xx. No dead
//! letter is expected (every generated event names a seeded message of the right tenant).
//! Any difference fails the run.

use std::collections::BTreeMap;

use futures_util::TryStreamExt as _;

use crate::driver::{Ledger, TrackingOutcome};

#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub ok: bool,
    /// Tracking requests accepted / refused (tampered) / uncertain / refused wrongly.
    pub accepted: u64,
    pub refused: u64,
    pub uncertain: u64,
    pub refused_wrongly: u64,
    pub stored_tracking_rows: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub tampered_stored: u64,
    pub foreign_rows: u64,
    pub wrong_type: u64,
    pub uncertain_stored: u64,
    pub webhook_expected: u64,
    pub webhook_stored: u64,
    pub webhook_mismatches: Vec<String>,
    pub dead_letters: BTreeMap<String, i64>,
}

impl Verdict {
    pub fn summary(&self) -> String {
        let status = if self.ok { "PASS" } else { "FAIL" };
        let mut s = format!(
            "exactly-once {status}: tracking {} accepted -> {} rows ({} lost, {} duplicated, {} wrong type), {} tampered -> {} rows, {} unanswered -> {} rows, {} foreign rows; webhooks {} events acknowledged -> {} rows",
            self.accepted,
            self.stored_tracking_rows,
            self.lost,
            self.duplicated,
            self.wrong_type,
            self.refused,
            self.tampered_stored,
            self.uncertain,
            self.uncertain_stored,
            self.foreign_rows,
            self.webhook_expected,
            self.webhook_stored,
        );
        if self.refused_wrongly > 0 {
            s.push_str(&format!(
                "; {} tampered tokens answered as valid",
                self.refused_wrongly
            ));
        }
        for m in &self.webhook_mismatches {
            s.push_str(&format!("; {m}"));
        }
        if !self.dead_letters.is_empty() {
            s.push_str(&format!("; dead letters {:?}", self.dead_letters));
        }
        s
    }
}

pub async fn check(url: &str, ledger: &Ledger) -> anyhow::Result<Verdict> {
    let client = reachly_ingest::db::connect(url).await?;
    let mut v = Verdict::default();
    (v.accepted, v.refused, v.uncertain, v.refused_wrongly) = ledger.tracking_summary();

    // Per-rid row counts of our own tracking events.
    let mut counts = vec![0u8; ledger.len()];
    let stream = client
        .copy_out(
            "COPY (SELECT event_type, substring(user_agent from ' lt/([0-9]+)$') \
                   FROM public.email_events WHERE provider = 'reachly') TO STDOUT",
        )
        .await?;
    futures_util::pin_mut!(stream);
    let mut partial = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        partial.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = partial[start..].iter().position(|b| *b == b'\n') {
            let line = &partial[start..start + nl];
            start += nl + 1;
            v.stored_tracking_rows += 1;
            let line = String::from_utf8_lossy(line);
            let (etype, rid) = line.split_once('\t').unwrap_or((&line, "\\N"));
            let Ok(rid) = rid.parse::<u64>() else {
                v.foreign_rows += 1;
                continue;
            };
            match ledger.outcome(rid) {
                TrackingOutcome::Accepted { click } | TrackingOutcome::Uncertain { click } => {
                    let want = if click { "clicked" } else { "opened" };
                    if etype != want {
                        v.wrong_type += 1;
                    }
                    let c = &mut counts[rid as usize];
                    *c = c.saturating_add(1);
                }
                TrackingOutcome::Refused | TrackingOutcome::RefusedWrongly => {
                    v.tampered_stored += 1
                }
                TrackingOutcome::NotTracking | TrackingOutcome::Unsent => v.foreign_rows += 1,
            }
        }
        partial.drain(..start);
    }
    for (rid, &n) in counts.iter().enumerate() {
        match ledger.outcome(rid as u64) {
            TrackingOutcome::Accepted { .. } => {
                if n == 0 {
                    v.lost += 1;
                } else if n > 1 {
                    v.duplicated += (n - 1) as u64;
                }
            }
            TrackingOutcome::Uncertain { .. } => {
                if n > 1 {
                    v.duplicated += (n - 1) as u64;
                }
                v.uncertain_stored += n.min(1) as u64;
            }
            _ => {}
        }
    }

    // Webhook rows per (provider, type).
    let mut stored: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in client
        .query(
            "SELECT provider::text, event_type::text, count(*) FROM public.email_events \
             WHERE provider <> 'reachly' GROUP BY 1, 2",
            &[],
        )
        .await?
    {
        stored.insert((row.get(0), row.get(1)), row.get(2));
    }
    let mut keys: Vec<(String, String)> = stored.keys().cloned().collect();
    for (p, t) in ledger
        .webhook_accepted
        .keys()
        .chain(ledger.webhook_uncertain.keys())
    {
        keys.push((p.to_string(), t.to_string()));
    }
    keys.sort();
    keys.dedup();
    for (p, t) in keys {
        let got = stored.get(&(p.clone(), t.clone())).copied().unwrap_or(0) as u64;
        let lookup = |m: &BTreeMap<(&'static str, &'static str), u64>| {
            m.iter()
                .find(|((mp, mt), _)| *mp == p && *mt == t)
                .map_or(0, |(_, n)| *n)
        };
        let want = lookup(&ledger.webhook_accepted);
        let maybe = lookup(&ledger.webhook_uncertain);
        v.webhook_expected += want;
        v.webhook_stored += got;
        if got < want || got > want + maybe {
            v.webhook_mismatches.push(format!(
                "{p}/{t}: {want} acknowledged (+{maybe} unanswered) but {got} stored"
            ));
        }
    }
    for row in client
        .query(
            "SELECT reason, count(*) FROM public.webhook_dead_letters GROUP BY 1",
            &[],
        )
        .await?
    {
        v.dead_letters.insert(row.get(0), row.get(1));
    }
    v.ok = v.lost == 0
        && v.duplicated == 0
        && v.tampered_stored == 0
        && v.foreign_rows == 0
        && v.wrong_type == 0
        && v.refused_wrongly == 0
        && v.webhook_mismatches.is_empty()
        && v.dead_letters.is_empty();
    Ok(v)
}
