//! Amazon SES (via SNS) webhooks end to end: AWS's documented SES messages wrapped in SNS
//! notifications signed (v1 and v2) with a locally generated RSA key, whose self-signed
//! certificate the test `HttpsGet` seam serves at an allowlisted SNS URL; posted over a real
//! socket to the real server, and what lands in PostgreSQL. Subscription confirmation visits
//! the SubscribeURL only once verified; re-deliveries change nothing; bad signatures,
//! disallowed topics and certificate URLs write nothing and fetch nothing they should not.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use reachly_ingest::webhooks::HttpsGet;
use reachly_ingest::webhooks::testkit::sns::{
    CERT_URL, SUBSCRIBE_URL, Seam, TOPIC, notification, other_key, sign, sign_with, sns_time,
};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::helpers::*;

const FIXTURE_MESSAGE: &str = "0190a6f0-0000-7000-8000-000000000002";
const FIXTURE_ORG: &str = "0190a6f0-0000-7000-8000-000000000001";

struct Ses {
    app: TestApp,
    seam: Arc<Seam>,
}

async fn ses_app() -> Ses {
    let seam = Seam::new();
    let app = spawn_app_on(
        &fresh_database().await,
        |a| a.webhooks.ses_topic_arns = vec![TOPIC.to_string()],
        Some(Arc::clone(&seam) as Arc<dyn HttpsGet>),
    )
    .await;
    Ses { app, seam }
}

fn read_fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/ses/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ses_message_for(name: &str, s: &Seeded) -> String {
    read_fixture(name)
        .replace(FIXTURE_MESSAGE, &s.message.to_string())
        .replace(FIXTURE_ORG, &s.org.to_string())
}

/// A documented SNS envelope moved to the test topic, certificate and time.
fn sns_envelope(name: &str) -> Map<String, Value> {
    let mut env: Map<String, Value> = serde_json::from_str(&read_fixture(name)).unwrap();
    env.insert("TopicArn".into(), Value::from(TOPIC));
    env.insert("SigningCertURL".into(), Value::from(CERT_URL));
    env.insert("Timestamp".into(), Value::from(sns_time(Utc::now())));
    env.insert("SubscribeURL".into(), Value::from(SUBSCRIBE_URL));
    env
}

impl Ses {
    async fn post(&self, env: &Map<String, Value>) -> u16 {
        self.post_raw(
            serde_json::to_string_pretty(env).unwrap(),
            "text/plain; charset=UTF-8",
        )
        .await
    }

    async fn post_raw(&self, body: String, content_type: &str) -> u16 {
        self.app
            .post_webhook(
                "ses",
                &[
                    ("content-type", content_type),
                    ("x-amz-sns-message-type", "Notification"),
                ],
                body,
            )
            .await
            .status()
            .as_u16()
    }
}

fn ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

#[tokio::test]
async fn subscription_confirmation_is_visited_once_verified_and_never_unsigned() {
    let ses = ses_app().await;
    let mut unsigned = sns_envelope("sns-subscription-confirmation.json");
    unsigned.remove("Signature");
    assert_eq!(ses.post(&unsigned).await, 401);
    assert!(ses.seam.calls().is_empty(), "{:?}", ses.seam.calls());

    let mut forged = sns_envelope("sns-subscription-confirmation.json");
    sign_with(&mut forged, other_key());
    assert_eq!(ses.post(&forged).await, 401);
    assert_eq!(ses.seam.calls(), [CERT_URL], "only the certificate");

    let mut signed = sns_envelope("sns-subscription-confirmation.json");
    sign(&mut signed);
    assert_eq!(ses.post(&signed).await, 200);
    assert_eq!(ses.seam.calls(), [CERT_URL, SUBSCRIBE_URL]);

    let mut unsubscribed = sns_envelope("sns-unsubscribe-confirmation.json");
    sign(&mut unsubscribed);
    assert_eq!(ses.post(&unsubscribed).await, 200);
    assert_eq!(
        ses.seam.calls(),
        [CERT_URL, SUBSCRIBE_URL],
        "nothing visited for an unsubscribe confirmation, the certificate is cached"
    );
    assert_eq!(ses.app.count("SELECT count(*) FROM email_events").await, 0);
    assert_eq!(
        ses.app
            .count("SELECT count(*) FROM webhook_dead_letters")
            .await,
        0
    );
}

#[tokio::test]
async fn documented_ses_messages_land_once_with_their_effects() {
    let ses = ses_app().await;
    let app = &ses.app;
    let first = app.seed().await;
    // (fixture, stored types, message status, contact status, error_message, event time)
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static str,
        &'static str,
        Option<&'static str>,
        &'static str,
    );
    let cases: [Case; 14] = [
        (
            "event-send.json",
            &["sent"],
            "sent",
            "active",
            None,
            "2016-10-14T05:02:16.645Z",
        ),
        (
            "event-delivery.json",
            &["delivered"],
            "delivered",
            "active",
            None,
            "2016-10-19T23:21:04.133Z",
        ),
        (
            "event-bounce.json",
            &["bounced"],
            "bounced",
            "bounced",
            Some("smtp; 550 5.1.1 user unknown"),
            "2017-08-05T00:41:02.669Z",
        ),
        (
            "event-complaint.json",
            &["complained"],
            "complained",
            "unsubscribed",
            None,
            "2017-08-05T00:41:02.669Z",
        ),
        (
            "event-reject.json",
            &["dropped"],
            "sent",
            "active",
            Some("rejected by SES: Bad content"),
            "2016-10-14T17:38:15.211Z",
        ),
        (
            "event-open.json",
            &["opened"],
            "opened",
            "active",
            None,
            "2017-08-09T22:00:19.652Z",
        ),
        (
            "event-click.json",
            &["clicked"],
            "clicked",
            "active",
            None,
            "2017-08-09T23:51:25.570Z",
        ),
        (
            "event-rendering-failure.json",
            &["dropped"],
            "sent",
            "active",
            Some("Attribute 'attributeName' is not present in the rendering data."),
            "2018-01-22T18:43:06.197Z",
        ),
        (
            "event-delivery-delay.json",
            &["deferred"],
            "sent",
            "active",
            Some("smtp; 421 4.4.1 Unable to connect to remote host"),
            "2020-06-16T00:25:40.095Z",
        ),
        (
            "event-subscription.json",
            &["unsubscribed"],
            "unsubscribed",
            "unsubscribed",
            None,
            "2022-01-12T01:00:17.910Z",
        ),
        (
            "notification-bounce-dsn.json",
            &["bounced"],
            "bounced",
            "bounced",
            Some("smtp; 550 5.1.1 <jane@example.com>... User"),
            "2016-01-27T14:59:38.237Z",
        ),
        (
            "notification-bounce-no-dsn.json",
            &["bounced", "bounced"],
            "bounced",
            "bounced",
            Some("Permanent bounce (General)"),
            "2016-01-27T14:59:38.237Z",
        ),
        (
            "notification-complaint.json",
            &["complained"],
            "complained",
            "unsubscribed",
            None,
            "2016-01-27T14:59:38.237Z",
        ),
        (
            "notification-delivery.json",
            &["delivered"],
            "delivered",
            "active",
            None,
            "2016-01-27T14:59:38.237Z",
        ),
    ];
    let mut seeded = Vec::new();
    let mut envelopes = Vec::new();
    for (i, (name, ..)) in cases.iter().enumerate() {
        let s = if i == 0 {
            first
        } else {
            app.seed_message(&first).await
        };
        let version = if i % 2 == 0 { "1" } else { "2" };
        let mut env = notification(
            &ses_message_for(name, &s),
            &Uuid::new_v4().to_string(),
            version,
            Utc::now(),
        );
        sign(&mut env);
        assert_eq!(ses.post(&env).await, 200, "{name}");
        seeded.push(s);
        envelopes.push(env);
    }
    // The documented complaint without a feedback report names no Reachly message.
    let mut stray = notification(
        &read_fixture("notification-complaint-no-feedback.json"),
        "stray-sns-id",
        "2",
        Utc::now(),
    );
    sign(&mut stray);
    assert_eq!(ses.post(&stray).await, 200);
    envelopes.push(stray);

    let total_events: usize = cases.iter().map(|c| c.1.len()).sum();
    app.wait_count("SELECT count(*) FROM email_events", total_events as i64)
        .await;
    app.wait_count("SELECT count(*) FROM webhook_dead_letters", 1)
        .await;

    let (cases, seeded, envelopes) = (&cases, &seeded, &envelopes);
    let check = |label: &'static str| async move {
        for ((name, stored, status, contact, error, at), (s, _env)) in
            cases.iter().zip(seeded.iter().zip(envelopes.iter()))
        {
            let rows = app.events(s.message).await;
            let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
            assert_eq!(types, *stored, "{label} {name}");
            // Keyed on the SES event (one per recipient), not on the SNS message.
            let mut keys: Vec<String> = rows.iter().filter_map(|r| r.dedup_key.clone()).collect();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), stored.len(), "{name}");
            assert!(keys.iter().all(|k| k.starts_with("ses:h:")), "{name}");
            for row in &rows {
                assert_eq!(row.organization_id, s.org, "{name}");
                assert_eq!(row.provider, "ses", "{name}");
                assert_eq!(row.created_at, ts(at), "{name}");
            }
            let m = app.message(s.message).await;
            assert_eq!(m.status.as_deref(), Some(*status), "{label} {name}");
            assert_eq!(m.error_message.as_deref(), *error, "{label} {name}");
            assert_eq!(
                app.contact_status(s.contact).await,
                *contact,
                "{label} {name}"
            );
        }
        let open = &app.events(seeded[5].message).await[0];
        assert_eq!(open.ip_address.as_deref(), Some("192.0.2.0"));
        let click = &app.events(seeded[6].message).await[0];
        assert_eq!(
            click.link_url.as_deref(),
            Some("http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html")
        );
        assert_eq!(
            app.events(seeded[2].message).await[0].metadata["bounce_class"],
            "hard"
        );
        let dead: Vec<(String, Option<String>, Option<String>)> = app
            .db
            .query(
                "SELECT reason, event_type, dedup_key FROM webhook_dead_letters",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(dead.len(), 1, "{label}");
        assert_eq!(
            (dead[0].0.as_str(), dead[0].1.as_deref()),
            ("no_message_id", Some("Complaint")),
            "{label}"
        );
        assert!(
            dead[0]
                .2
                .as_deref()
                .is_some_and(|k| k.starts_with("ses:h:")),
            "{label}"
        );
    };
    check("first delivery").await;

    // SNS retries with the same MessageId: twice more, nothing changes.
    for _ in 0..2 {
        for env in envelopes {
            assert_eq!(ses.post(env).await, 200);
        }
    }
    check("after re-delivery").await;
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        total_events as i64
    );
    assert_eq!(ses.seam.calls(), [CERT_URL], "one certificate fetch in all");
}

#[tokio::test]
async fn bad_signatures_and_disallowed_urls_are_401_write_nothing_and_fetch_nothing_more() {
    let ses = ses_app().await;
    let app = &ses.app;
    let s = app.seed().await;
    let message = ses_message_for("event-bounce.json", &s);

    let mut tampered = notification(&message, "sns-1", "2", Utc::now());
    sign(&mut tampered);
    tampered.insert(
        "Message".into(),
        Value::from(message.replace("Permanent", "Transient")),
    );
    let mut wrong_key = notification(&message, "sns-2", "1", Utc::now());
    sign_with(&mut wrong_key, other_key());
    let mut unsigned = notification(&message, "sns-3", "2", Utc::now());
    unsigned.remove("Signature");
    let mut stale = notification(&message, "sns-4", "2", Utc::now());
    stale.insert(
        "Timestamp".into(),
        Value::from(sns_time(Utc::now() - chrono::Duration::minutes(121))),
    );
    sign(&mut stale);
    let mut evil_cert = notification(&message, "sns-5", "2", Utc::now());
    evil_cert.insert(
        "SigningCertURL".into(),
        Value::from(
            "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-test.pem",
        ),
    );
    sign(&mut evil_cert);
    let mut plain_http = notification(&message, "sns-6", "2", Utc::now());
    plain_http.insert(
        "SigningCertURL".into(),
        Value::from("http://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem"),
    );
    sign(&mut plain_http);
    let mut other_topic = notification(&message, "sns-7", "2", Utc::now());
    other_topic.insert(
        "TopicArn".into(),
        Value::from("arn:aws:sns:us-east-1:123456789012:SomeoneElses"),
    );
    sign(&mut other_topic);

    let mut statuses = Vec::new();
    for env in [
        &tampered,
        &wrong_key,
        &unsigned,
        &stale,
        &evil_cert,
        &plain_http,
        &other_topic,
    ] {
        statuses.push(ses.post(env).await);
    }
    assert_eq!(statuses, [401; 7]);
    assert_eq!(
        ses.seam.calls(),
        [CERT_URL],
        "only the allowlisted certificate, once"
    );
    assert_eq!(
        app.metric(r#"reachly_webhook_auth_failures_total{provider="ses"}"#)
            .await,
        7.0
    );

    let mut good = notification(&message, "sns-ok", "2", Utc::now());
    sign(&mut good);
    assert_eq!(ses.post(&good).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
    assert!(
        app.events(s.message).await[0]
            .dedup_key
            .as_deref()
            .is_some_and(|k| k.starts_with("ses:h:"))
    );
    assert_eq!(app.contact_status(s.contact).await, "bounced");
}

#[tokio::test]
async fn malformed_bodies_are_4xx_and_an_unreachable_certificate_host_is_503() {
    let ses = ses_app().await;
    let app = &ses.app;
    let s = app.seed().await;
    for body in ["", "{", "[]", r#"{"Type":"Weird"}"#] {
        assert_eq!(
            ses.post_raw(body.to_string(), "text/plain; charset=UTF-8")
                .await,
            400,
            "{body:?}"
        );
    }
    let mut env = notification(
        &ses_message_for("event-delivery.json", &s),
        "sns-d",
        "2",
        Utc::now(),
    );
    sign(&mut env);
    let body = serde_json::to_string(&env).unwrap();
    assert_eq!(
        ses.post_raw(body.clone(), "application/x-www-form-urlencoded")
            .await,
        415
    );
    assert!(ses.seam.calls().is_empty(), "{:?}", ses.seam.calls());

    // The certificate host is down: 503, so SNS retries; nothing is written meanwhile.
    ses.seam.down.store(true, Ordering::SeqCst);
    assert_eq!(ses.post(&env).await, 503);
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);
    ses.seam.down.store(false, Ordering::SeqCst);
    assert_eq!(ses.post(&env).await, 200);
    app.wait_count("SELECT count(*) FROM email_events", 1).await;
    assert_eq!(
        app.message(s.message).await.status.as_deref(),
        Some("delivered")
    );
}

#[tokio::test]
async fn without_topic_arns_ses_is_404() {
    let app = spawn_app().await;
    let resp = app
        .post_webhook("ses", &[("content-type", "text/plain")], "{}")
        .await;
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn one_bounce_through_both_publishing_paths_is_stored_once() {
    let ses = ses_app().await;
    let app = &ses.app;
    let s = app.seed().await;
    // Configuration-set event publishing and the identity's feedback notification report the
    // same bounce in two SNS messages with different MessageIds.
    let mut published = notification(
        &ses_message_for("event-bounce.json", &s),
        "sns-pub-1",
        "2",
        Utc::now(),
    );
    sign(&mut published);
    let mut notified = notification(
        &ses_message_for("both-paths-notification-bounce.json", &s),
        "sns-feedback-1",
        "1",
        Utc::now(),
    );
    sign(&mut notified);
    assert_eq!(ses.post(&published).await, 200);
    assert_eq!(ses.post(&notified).await, 200);
    assert_eq!(ses.post(&notified).await, 200);
    let ev = app.events(s.message).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].event_type, "bounced");
    assert_eq!(ev[0].metadata["bounce_class"], "hard");
    assert_eq!(app.contact_status(s.contact).await, "bounced");
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
}

#[tokio::test]
async fn raw_message_delivery_is_refused_counted_and_writes_nothing() {
    let ses = ses_app().await;
    let app = &ses.app;
    let s = app.seed().await;
    // With raw message delivery on, SNS posts the bare SES JSON: no envelope, no signature.
    let r = app
        .post_webhook(
            "ses",
            &[
                ("content-type", "text/plain; charset=UTF-8"),
                ("x-amz-sns-message-type", "Notification"),
                ("x-amz-sns-rawdelivery", "true"),
            ],
            ses_message_for("event-bounce.json", &s),
        )
        .await;
    // Nothing in it can be authenticated: 401 (SNS does not retry it; the subscription must
    // be fixed), counted with the provider's authentication failures, logged as
    // `sns_raw_delivery`.
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_dead_letters").await,
        0
    );
    assert_eq!(app.contact_status(s.contact).await, "active");
    assert_eq!(
        app.metric(r#"reachly_webhook_auth_failures_total{provider="ses"}"#)
            .await,
        1.0
    );
    assert!(ses.seam.calls().is_empty());
}

#[tokio::test]
async fn a_certificate_that_does_not_parse_is_503_so_sns_retries() {
    // The certificate host answers something that is not a certificate (a proxy's error
    // page, a truncated body): transient, so 503 and SNS retries; never a 401, which SNS
    // would take as final.
    let seam = Seam::serving(Ok(b"<html>502 Bad Gateway</html>".to_vec()));
    let app = spawn_app_on(
        &fresh_database().await,
        |a| a.webhooks.ses_topic_arns = vec![TOPIC.to_string()],
        Some(Arc::clone(&seam) as Arc<dyn HttpsGet>),
    )
    .await;
    let s = app.seed().await;
    let mut env = notification(
        &ses_message_for("event-bounce.json", &s),
        "sns-cert-1",
        "2",
        Utc::now(),
    );
    sign(&mut env);
    let r = app
        .post_webhook(
            "ses",
            &[
                ("content-type", "text/plain; charset=UTF-8"),
                ("x-amz-sns-message-type", "Notification"),
            ],
            serde_json::to_string(&env).unwrap(),
        )
        .await;
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(app.count("SELECT count(*) FROM email_events").await, 0);
    assert_eq!(app.contact_status(s.contact).await, "active");
}

#[tokio::test]
async fn a_not_spam_feedback_report_is_not_a_complaint() {
    let ses = ses_app().await;
    let app = &ses.app;
    let s = app.seed().await;
    let mut msg: Value =
        serde_json::from_str(&ses_message_for("event-complaint.json", &s)).unwrap();
    msg["complaint"]["complaintFeedbackType"] = Value::from("not-spam");
    let mut env = notification(&msg.to_string(), "sns-not-spam-1", "2", Utc::now());
    sign(&mut env);
    assert_eq!(ses.post(&env).await, 200);
    assert!(app.events(s.message).await.is_empty());
    assert_eq!(app.contact_status(s.contact).await, "active");
    let reasons: Vec<String> = app
        .db
        .query("SELECT reason FROM webhook_dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons, ["not_a_complaint"]);
}

#[tokio::test]
async fn a_retry_an_hour_after_publication_is_stored() {
    let ses = ses_app().await;
    let app = &ses.app;
    let s = app.seed().await;
    // SNS retries the same signed message for up to an hour (plus its own delays).
    let mut env = notification(
        &ses_message_for("event-bounce.json", &s),
        "sns-late-1",
        "2",
        Utc::now() - chrono::TimeDelta::minutes(75),
    );
    sign(&mut env);
    assert_eq!(ses.post(&env).await, 200);
    assert_eq!(app.contact_status(s.contact).await, "bounced");
    let mut stale = notification(
        &ses_message_for("event-delivery.json", &s),
        "sns-late-2",
        "2",
        Utc::now() - chrono::TimeDelta::minutes(125),
    );
    sign(&mut stale);
    assert_eq!(ses.post(&stale).await, 401);
    assert_eq!(app.events(s.message).await.len(), 1);
}
