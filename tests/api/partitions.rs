//! Partition maintenance against a real database: premade days, expiry, the default
//! partition for far-off events, moving a day's rows out of it, and two instances at once.

use chrono::{Days, NaiveDate, Utc};
use reachly_ingest::db::partitions::{maintain, partition_name};

use crate::helpers::*;

async fn partitions(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'public.email_events'::regclass ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn maintenance_makes_the_premade_days_and_drops_expired_ones() {
    let url = fresh_database().await;
    let mut db = connect(&url).await;
    let long_ago = NaiveDate::from_ymd_opt(2024, 1, 10).unwrap();
    let r = maintain(&mut db, long_ago, 2, 400).await.unwrap();
    assert_eq!(
        r.created,
        vec![
            "email_events_p20240109",
            "email_events_p20240110",
            "email_events_p20240111",
            "email_events_p20240112"
        ]
    );
    let today = Utc::now().date_naive();
    let r = maintain(&mut db, today, 7, 30).await.unwrap();
    assert_eq!(
        r.created.len(),
        9,
        "yesterday, today and 7 ahead: {:?}",
        r.created
    );
    assert_eq!(
        r.dropped.len(),
        4,
        "the 2024 partitions are past 30 days: {:?}",
        r.dropped
    );
    let names = partitions(&db).await;
    assert!(names.contains(&partition_name(today)));
    assert!(names.contains(&partition_name(
        today.checked_add_days(Days::new(7)).unwrap()
    )));
    assert!(!names.contains(&"email_events_p20240110".to_string()));
    assert!(names.contains(&"email_events_default".to_string()));
    let again = maintain(&mut db, today, 7, 30).await.unwrap();
    assert!(
        again.created.is_empty() && again.dropped.is_empty(),
        "a second run changes nothing: {again:?}"
    );
}

#[tokio::test]
async fn a_far_future_event_lands_in_the_default_partition_and_moves_when_its_day_is_made() {
    let app = spawn_app().await;
    let s = app.seed().await;
    app.db
        .execute(
            "INSERT INTO email_events (organization_id, message_id, event_type, created_at) \
             VALUES ($1, $2, 'delivered', '2031-06-15 12:00:00+00')",
            &[&s.org, &s.message],
        )
        .await
        .expect("an event far in the future is accepted");
    let in_default: i64 = app.count("SELECT count(*) FROM email_events_default").await;
    assert_eq!(in_default, 1);
    let mut db = connect(&app.db_url).await;
    // The app runs its own maintenance at start; wait for its advisory lock to be free.
    let r = loop {
        let r = maintain(
            &mut db,
            NaiveDate::from_ymd_opt(2031, 6, 14).unwrap(),
            1,
            400,
        )
        .await
        .unwrap();
        if !r.skipped {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(r.created.contains(&"email_events_p20310615".to_string()));
    assert_eq!(r.moved_rows, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM email_events_default").await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM email_events_p20310615")
            .await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 1);
}

#[tokio::test]
async fn two_instances_maintaining_at_once_agree() {
    let url = fresh_database().await;
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    let day = NaiveDate::from_ymd_opt(2030, 3, 1).unwrap();
    let (ra, rb) = tokio::join!(maintain(&mut a, day, 5, 400), maintain(&mut b, day, 5, 400));
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    let made = ra.created.len() + rb.created.len();
    assert_eq!(made, 7, "each day made exactly once: {ra:?} {rb:?}");
    assert!(
        partitions(&a)
            .await
            .contains(&"email_events_p20300306".to_string())
    );
}

#[tokio::test]
async fn a_partition_made_by_hand_gets_row_level_security_at_the_next_round() {
    let url = fresh_database().await;
    let mut db = connect(&url).await;
    db.batch_execute(
        "CREATE TABLE email_events_p20400101 PARTITION OF email_events \
         FOR VALUES FROM ('2040-01-01 00:00:00+00') TO ('2040-01-02 00:00:00+00')",
    )
    .await
    .unwrap();
    assert_eq!(rls_of_2040(&db).await, (false, 0), "made by hand: nothing");
    let r = maintain(
        &mut db,
        NaiveDate::from_ymd_opt(2040, 1, 1).unwrap(),
        0,
        4000,
    )
    .await
    .unwrap();
    assert_eq!(r.secured, 1, "{r:?}");
    assert_eq!(rls_of_2040(&db).await, (true, 1));
    let again = maintain(
        &mut db,
        NaiveDate::from_ymd_opt(2040, 1, 1).unwrap(),
        0,
        4000,
    )
    .await
    .unwrap();
    assert_eq!(
        again.secured, 0,
        "a second round changes nothing: {again:?}"
    );
}

async fn rls_of_2040(db: &tokio_postgres::Client) -> (bool, i64) {
    let r = db
        .query_one(
            "SELECT c.relrowsecurity, (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) \
             FROM pg_class c WHERE c.oid = 'public.email_events_p20400101'::regclass",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Claimed keys of undated ESP events (`webhook_event_keys`) are kept a week, then deleted by
/// maintenance, so the table does not grow for ever.
#[tokio::test]
async fn maintenance_expires_event_keys_past_a_week() {
    let url = fresh_database().await;
    let mut db = connect(&url).await;
    db.batch_execute(
        "INSERT INTO webhook_event_keys (dedup_key, first_seen_at) VALUES \
           ('postmark:old', now() - interval '8 days'), \
           ('postmark:recent', now() - interval '6 days'), \
           ('postmark:new', now())",
    )
    .await
    .unwrap();
    let r = maintain(&mut db, Utc::now().date_naive(), 2, 400)
        .await
        .unwrap();
    assert_eq!(r.expired_event_keys, 1, "{r:?}");
    let left: Vec<String> = db
        .query("SELECT dedup_key FROM webhook_event_keys ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["postmark:new", "postmark:recent"]);
}
