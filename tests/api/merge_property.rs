//! Property test of the status merge against the real database: for random sets of events
//! over a few messages, writing them in any order, any batch split, with exact duplicates
//! and ESP re-deliveries (new id, same dedup key) gives the same `campaign_messages` and
//! `contacts` rows as writing the set once in one batch, and stores no ESP event twice.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};
use reachly_ingest::event::{BounceClass, Event, EventType, Record, Source};
use reachly_ingest::pipeline::store::write_batch;
use uuid::Uuid;

use crate::helpers::*;

const MESSAGES: usize = 3;

/// Ids shared by the reference and the test database.
struct Fixture {
    org: Uuid,
    messages: Vec<Uuid>,
    contacts: Vec<Uuid>,
}

async fn seed_fixed(db: &tokio_postgres::Client, f: &Fixture) {
    db.execute(
        "INSERT INTO organizations (id, name) VALUES ($1, 'prop')",
        &[&f.org],
    )
    .await
    .unwrap();
    let campaign = Uuid::new_v4();
    db.execute(
        "INSERT INTO campaigns (id, organization_id, name) VALUES ($1, $2, 'c')",
        &[&campaign, &f.org],
    )
    .await
    .unwrap();
    for (m, c) in f.messages.iter().zip(&f.contacts) {
        db.execute(
            "INSERT INTO contacts (id, organization_id, email) VALUES ($1, $2, $3)",
            &[c, &f.org, &format!("{c}@example.com")],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO campaign_messages (id, organization_id, campaign_id, contact_id, status) VALUES ($1, $2, $3, $4, 'sent')",
            &[m, &f.org, &campaign, c],
        )
        .await
        .unwrap();
    }
}

async fn reset(db: &tokio_postgres::Client) {
    db.batch_execute(
        "TRUNCATE email_events, webhook_dead_letters; \
         UPDATE campaign_messages SET status = 'sent', sent_at = NULL, delivered_at = NULL, opened_at = NULL, \
           clicked_at = NULL, error_message = NULL, error_at = NULL; \
         UPDATE contacts SET status = 'active';",
    )
    .await
    .unwrap();
}

type Snapshot = (
    Vec<(
        Uuid,
        Option<String>,
        [Option<DateTime<Utc>>; 5],
        Option<String>,
    )>,
    Vec<(Uuid, Option<String>)>,
);

async fn snapshot(db: &tokio_postgres::Client) -> Snapshot {
    let messages = db
        .query(
            "SELECT id, status, sent_at, delivered_at, opened_at, clicked_at, error_at, error_message FROM campaign_messages ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), [r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)], r.get(7)))
        .collect();
    let contacts = db
        .query("SELECT id, status FROM contacts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (messages, contacts)
}

/// (rows, rows with a dedup key, distinct dedup keys) of email_events.
async fn event_counts(db: &tokio_postgres::Client) -> (i64, i64, i64) {
    let r = db
        .query_one(
            "SELECT count(*), count(dedup_key), count(DISTINCT dedup_key) FROM email_events",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// One generated event: which message, what, when, and how it came.
#[derive(Debug, Clone)]
struct Spec {
    msg: usize,
    kind: u8,
    secs: i64,
    err: u8,
    machine: bool,
    esp: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..MESSAGES,
        0u8..10,
        0i64..40,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(msg, kind, secs, err, machine, esp)| Spec {
            msg,
            kind,
            secs,
            err,
            machine,
            esp,
        })
}

fn to_event(s: &Spec, f: &Fixture) -> Event {
    let (t, class) = match s.kind {
        0 => (EventType::Sent, None),
        1 => (EventType::Delivered, None),
        2 => (EventType::Opened, None),
        3 => (EventType::Clicked, None),
        4 => (EventType::Bounced, Some(BounceClass::Hard)),
        5 => (EventType::Bounced, Some(BounceClass::Soft)),
        6 => (EventType::Complained, None),
        7 => (EventType::Unsubscribed, None),
        8 => (EventType::Deferred, None),
        _ => (EventType::Dropped, None),
    };
    let at = DateTime::from_timestamp(1_790_000_000 + s.secs, 0).unwrap();
    let mut e = Event::new(
        f.messages[s.msg],
        t,
        at,
        if s.esp {
            Source::Sendgrid
        } else {
            Source::Pixel
        },
    );
    e.claimed_organization_id = Some(f.org);
    e.bounce_class = class;
    if matches!(t, EventType::Opened | EventType::Clicked) && s.machine {
        e.machine_reason = Some("user_agent:bot".into());
    }
    if matches!(
        t,
        EventType::Bounced | EventType::Deferred | EventType::Dropped
    ) {
        e.error_message =
            Some(["550 no such user", "421 try later", "mailbox full"][s.err as usize].into());
    }
    if t == EventType::Clicked {
        e.link_url = Some(format!("https://example.com/{}", s.err));
    }
    if s.esp {
        e.dedup_key = Some(format!(
            "sendgrid:h:{}:{}:{}:{}:{}",
            s.msg, s.kind, s.secs, s.err, s.machine
        ));
    }
    e
}

#[test]
fn any_order_split_or_duplication_gives_the_same_rows_as_one_batch() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fixture = Fixture {
        org: Uuid::new_v4(),
        messages: (0..MESSAGES).map(|_| Uuid::new_v4()).collect(),
        contacts: (0..MESSAGES).map(|_| Uuid::new_v4()).collect(),
    };
    let (reference, subject) = rt.block_on(async {
        let a = connect(&fresh_database().await).await;
        let b = connect(&fresh_database().await).await;
        seed_fixed(&a, &fixture).await;
        seed_fixed(&b, &fixture).await;
        (tokio::sync::Mutex::new(a), tokio::sync::Mutex::new(b))
    });
    let strategy = (
        proptest::collection::vec(spec(), 1..24),
        any::<proptest::sample::Index>(),
        proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
        proptest::collection::vec(any::<proptest::sample::Index>(), 0..5),
        any::<u64>(),
    );
    let mut runner = TestRunner::new(PropConfig {
        cases: 40,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let result = runner.run(&strategy, |(specs, _, dup_picks, cuts, seed)| {
        rt.block_on(async {
            let mut reference = reference.lock().await;
            let mut subject = subject.lock().await;
            reset(&reference).await;
            reset(&subject).await;
            // Distinct ESP events by content, as the providers' dedup keys make them.
            let mut events: Vec<Event> = Vec::new();
            for s in &specs {
                let e = to_event(s, &fixture);
                if e.dedup_key.is_none() || !events.iter().any(|o| o.dedup_key == e.dedup_key) {
                    events.push(e);
                }
            }
            let once: Vec<Record> = events.iter().cloned().map(Record::Event).collect();
            let refs: Vec<&Record> = once.iter().collect();
            write_batch(&mut reference, &refs)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;

            // The same set shuffled, with duplicates: exact copies, and re-deliveries of ESP
            // events (new id, same key).
            let mut delivered: Vec<Event> = events.clone();
            for pick in &dup_picks {
                let mut copy = pick.get(&events).clone();
                if copy.dedup_key.is_some() && seed % 2 == 0 {
                    copy.id = Uuid::now_v7();
                }
                delivered.push(copy);
            }
            let mut state = seed | 1;
            for i in (1..delivered.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                delivered.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let records: Vec<Record> = delivered.into_iter().map(Record::Event).collect();
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(records.len() + 1)).collect();
            bounds.push(0);
            bounds.push(records.len());
            bounds.sort_unstable();
            bounds.dedup();
            for w in bounds.windows(2) {
                let part: Vec<&Record> = records[w[0]..w[1]].iter().collect();
                write_batch(&mut subject, &part)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }

            let (want, got) = (snapshot(&reference).await, snapshot(&subject).await);
            prop_assert_eq!(&got, &want);
            let (want_n, _, _) = event_counts(&reference).await;
            let (got_n, keyed, distinct_keys) = event_counts(&subject).await;
            prop_assert_eq!(got_n, want_n, "every distinct event stored exactly once");
            prop_assert_eq!(keyed, distinct_keys, "no ESP event stored twice");
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
