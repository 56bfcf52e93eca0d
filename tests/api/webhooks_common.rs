//! What the ESP webhook tests share: the documented fixtures (`tests/fixtures/`) bound to a
//! seeded tenant, a snapshot of every row the webhooks can touch (to prove a request wrote
//! nothing, or nothing more), and readers for dead letters.

use chrono::{DateTime, Utc};
use reachly_ingest::config::ServeArgs;
use reachly_ingest::webhooks::testkit;

use crate::helpers::*;

/// The fixtures' organization and messages, in the order of `World::msgs` (see
/// `tests/fixtures/README.md`): engaged, hard bounce, soft bounce/deferral, complaint,
/// unsubscribe, drop.
pub const FIXTURE_ORG: &str = testkit::ORG;
pub const FIXTURE_MESSAGES: [&str; 6] = [
    testkit::M_ENGAGED,
    testkit::M_HARD,
    testkit::M_SOFT,
    testkit::M_COMPLAINT,
    testkit::M_UNSUB,
    testkit::M_DROPPED,
];
pub const ENGAGED: usize = 0;
pub const HARD: usize = 1;
pub const SOFT: usize = 2;
pub const COMPLAINT: usize = 3;
pub const UNSUB: usize = 4;
pub const DROPPED: usize = 5;

/// A running app with a provider configured and one seeded message (each with its own
/// contact) per fixture message.
pub struct World {
    pub app: TestApp,
    pub msgs: Vec<Seeded>,
}

pub async fn world(configure: impl FnOnce(&mut ServeArgs)) -> World {
    let app = spawn_app_with(configure).await;
    let first = app.seed().await;
    let mut msgs = vec![first];
    for _ in 1..FIXTURE_MESSAGES.len() {
        msgs.push(app.seed_message(&first).await);
    }
    World { app, msgs }
}

impl World {
    /// A fixture's text with its Reachly ids replaced by this world's.
    pub fn fixture(&self, path: &str) -> String {
        let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
        let mut text =
            std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("fixture {full}: {e}"));
        text = text.replace(FIXTURE_ORG, &self.msgs[0].org.to_string());
        for (fixture_id, seeded) in FIXTURE_MESSAGES.iter().zip(&self.msgs) {
            text = text.replace(fixture_id, &seeded.message.to_string());
        }
        text
    }

    pub fn org(&self) -> uuid::Uuid {
        self.msgs[0].org
    }

    /// The event types of a message, sorted (events of one instant have no order).
    pub async fn types(&self, i: usize) -> Vec<String> {
        let mut types: Vec<String> = self
            .app
            .events(self.msgs[i].message)
            .await
            .into_iter()
            .map(|e| e.event_type)
            .collect();
        types.sort();
        types
    }

    pub async fn contact(&self, i: usize) -> String {
        self.app.contact_status(self.msgs[i].contact).await
    }
}

/// Every row a webhook can write or change, as text, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub events: Vec<String>,
    pub messages: Vec<String>,
    pub contacts: Vec<String>,
    pub dead_letters: Vec<String>,
}

pub async fn snapshot(app: &TestApp) -> Snapshot {
    async fn rows(app: &TestApp, sql: &str) -> Vec<String> {
        app.db
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    }
    Snapshot {
        events: rows(
            app,
            "SELECT to_jsonb(e)::text FROM email_events e ORDER BY id",
        )
        .await,
        messages: rows(
            app,
            "SELECT to_jsonb(m)::text FROM campaign_messages m ORDER BY id",
        )
        .await,
        contacts: rows(app, "SELECT to_jsonb(c)::text FROM contacts c ORDER BY id").await,
        dead_letters: rows(
            app,
            "SELECT to_jsonb(d)::text FROM webhook_dead_letters d ORDER BY id",
        )
        .await,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    pub reason: String,
    pub event_type: Option<String>,
    pub provider: String,
    pub payload: String,
    pub dedup_key: Option<String>,
}

pub async fn dead_letters(app: &TestApp) -> Vec<DeadLetterRow> {
    app.db
        .query(
            "SELECT reason, event_type, provider, payload, dedup_key FROM webhook_dead_letters \
             ORDER BY reason, event_type NULLS FIRST, payload",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| DeadLetterRow {
            reason: r.get(0),
            event_type: r.get(1),
            provider: r.get(2),
            payload: r.get(3),
            dedup_key: r.get(4),
        })
        .collect()
}

pub async fn total_events(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM email_events").await
}

pub async fn total_dead_letters(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM webhook_dead_letters").await
}

/// RFC 3339 to a time.
pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .to_utc()
}

/// Equal to the microsecond (PostgreSQL's resolution).
pub fn same_instant(got: Option<DateTime<Utc>>, want: &str) {
    let want = at(want);
    let got = got.unwrap_or_else(|| panic!("no time, expected {want}"));
    let off = (got - want).num_microseconds().map(i64::abs);
    assert!(off.is_some_and(|us| us <= 1), "{got} is not {want}");
}
