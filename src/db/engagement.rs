//! Honest engagement per campaign, in one indexed query: human and machine opens and clicks
//! of each campaign, by reason. A stored event's reason is its `metadata.machine_reason`
//! (user agent, HEAD probe, Apple MPP prefetch: judged when the request arrived) or, for a
//! click the write path called human, a *behaviour* judged here at read time: a click within
//! [`SCANNER_TIMING_SECS`] after the message's `delivered_at` is `scanner_timing`, and a click
//! with another click of the same message on a different link within [`SCANNER_BURST_SECS`]
//! is `scanner_burst`. Behaviour is judged at read time, never written, because the write
//! path sees events in any order (a delivery may arrive after the click it explains): a
//! stored row that depended on other events would break the rule that stored rows and
//! `campaign_messages` depend only on the *set* of events. The query reads only that set, so
//! its answer is order-independent by construction. See `docs/engagement.md`.

use uuid::Uuid;

/// A click this soon after its message's delivery is a link scanner (a gateway that
/// fetches every link as the message arrives), not a person who read it.
pub const SCANNER_TIMING_SECS: i64 = 10;

/// Two clicks of one message on different links this close together are a scanner's burst.
pub const SCANNER_BURST_SECS: i64 = 1;

/// The shared part of both queries: every open and click of the campaigns in `$1` (an
/// array of ids) with its reason, as CTE `judged`. It reads `campaign_messages` by
/// `idx_messages_campaign_id` and `email_events` by `idx_events_message_id`; the burst test
/// is a window over each message's clicks (two different links inside the frame exactly
/// when `min(link_url) <> max(link_url)`).
macro_rules! judged_cte {
    () => {
        "\
WITH ev AS (
  SELECT m.campaign_id, e.id, e.message_id, e.event_type, e.created_at, e.link_url,
         m.delivered_at, e.metadata->>'machine_reason' AS stored_reason
  FROM campaign_messages m
  JOIN email_events e ON e.message_id = m.id
  WHERE m.campaign_id = ANY($1::uuid[]) AND e.event_type IN ('opened', 'clicked')
), judged AS (
  SELECT campaign_id, id, message_id, event_type, created_at,
    CASE
      WHEN stored_reason IS NOT NULL THEN stored_reason
      WHEN event_type <> 'clicked' THEN 'human'
      WHEN created_at >= delivered_at
       AND created_at < delivered_at + interval '10 seconds' THEN 'scanner_timing'
      WHEN min(link_url) OVER burst <> max(link_url) OVER burst THEN 'scanner_burst'
      ELSE 'human'
    END AS reason
  FROM ev
  WINDOW burst AS (PARTITION BY message_id, event_type ORDER BY created_at
                   RANGE BETWEEN interval '1 second' PRECEDING AND interval '1 second' FOLLOWING)
)
"
    };
}

/// The campaign query: `$1` is an array of campaign ids. Rows: campaign, event type
/// (`opened` or `clicked`), reason (`human` or the machine reason), events, distinct
/// messages.
pub const CAMPAIGN_ENGAGEMENT_SQL: &str = concat!(
    judged_cte!(),
    "SELECT campaign_id, event_type, reason, count(*) AS events,
       count(DISTINCT message_id) AS messages
FROM judged
GROUP BY campaign_id, event_type, reason
ORDER BY campaign_id, event_type, reason"
);

/// The same judgement per event (id, message, type, reason), for the labelled corpus score:
/// precision and recall are computed by exactly the classification the campaign query uses.
pub const EVENT_REASONS_SQL: &str = concat!(
    judged_cte!(),
    "SELECT id, message_id, event_type, reason FROM judged"
);

/// Per message of the campaigns in `$1`: its stored (raw) status, the first *human* open and
/// click, how many of its opens and clicks were machines, and its honest status: the raw
/// status with every open and click that was not a person's taken out (a message a scanner
/// clicked and nobody opened is `delivered`, not `clicked`). This is what segments such as
/// "re-engage who never opened" or "sunset who has not engaged" must read.
/// `campaign_messages.status` itself stays the ESP-style raw status: see the module's
/// documentation and docs/engagement.md for why it cannot be the honest one.
pub const MESSAGE_ENGAGEMENT_SQL: &str = concat!(
    judged_cte!(),
    "SELECT m.id, m.contact_id, COALESCE(m.status, 'pending')::text AS status,
       min(j.created_at) FILTER (WHERE j.event_type = 'opened' AND j.reason = 'human') AS human_opened_at,
       min(j.created_at) FILTER (WHERE j.event_type = 'clicked' AND j.reason = 'human') AS human_clicked_at,
       count(j.id) FILTER (WHERE j.reason <> 'human') AS machine_events,
       CASE
         WHEN COALESCE(m.status, 'pending') NOT IN ('opened', 'clicked') THEN COALESCE(m.status, 'pending')::text
         WHEN bool_or(j.event_type = 'clicked' AND j.reason = 'human') THEN 'clicked'
         WHEN bool_or(j.event_type = 'opened' AND j.reason = 'human') THEN 'opened'
         ELSE 'delivered'
       END::text AS honest_status
FROM campaign_messages m
LEFT JOIN judged j ON j.message_id = m.id
WHERE m.campaign_id = ANY($1::uuid[])
GROUP BY m.id, m.contact_id, m.status
ORDER BY m.id"
);

/// One row of [`MESSAGE_ENGAGEMENT_SQL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEngagement {
    pub message_id: Uuid,
    pub contact_id: Uuid,
    /// `campaign_messages.status` as stored (counts every open and click the write path
    /// did not flag, behavioural scanners included).
    pub status: String,
    pub human_opened_at: Option<chrono::DateTime<chrono::Utc>>,
    pub human_clicked_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Opens and clicks judged machine (any reason).
    pub machine_events: i64,
    /// The status with machine opens and clicks taken out.
    pub honest_status: String,
}

/// Runs the per-message query for `campaigns`.
pub async fn message_engagement(
    db: &tokio_postgres::Client,
    campaigns: &[Uuid],
) -> Result<Vec<MessageEngagement>, tokio_postgres::Error> {
    Ok(db
        .query(MESSAGE_ENGAGEMENT_SQL, &[&campaigns])
        .await?
        .iter()
        .map(|r| MessageEngagement {
            message_id: r.get(0),
            contact_id: r.get(1),
            status: r.get(2),
            human_opened_at: r.get(3),
            human_clicked_at: r.get(4),
            machine_events: r.get(5),
            honest_status: r.get(6),
        })
        .collect())
}

/// One row of [`CAMPAIGN_ENGAGEMENT_SQL`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EngagementRow {
    pub campaign_id: Uuid,
    pub event_type: String,
    /// `human` or the machine reason.
    pub reason: String,
    pub events: i64,
    pub messages: i64,
}

/// Runs the campaign query for `campaigns`.
pub async fn campaign_engagement(
    db: &tokio_postgres::Client,
    campaigns: &[Uuid],
) -> Result<Vec<EngagementRow>, tokio_postgres::Error> {
    Ok(db
        .query(CAMPAIGN_ENGAGEMENT_SQL, &[&campaigns])
        .await?
        .iter()
        .map(|r| EngagementRow {
            campaign_id: r.get(0),
            event_type: r.get(1),
            reason: r.get(2),
            events: r.get(3),
            messages: r.get(4),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_windows_are_the_named_constants() {
        for sql in [
            CAMPAIGN_ENGAGEMENT_SQL,
            EVENT_REASONS_SQL,
            MESSAGE_ENGAGEMENT_SQL,
        ] {
            assert!(sql.contains(&format!("interval '{SCANNER_TIMING_SECS} seconds'")));
            assert!(sql.contains(&format!(
                "RANGE BETWEEN interval '{SCANNER_BURST_SECS} second' PRECEDING AND interval '{SCANNER_BURST_SECS} second' FOLLOWING"
            )));
        }
    }
}
