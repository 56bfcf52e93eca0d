//! Unit tests of the SES provider: verification and extraction without a server.

use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Uri};
use serde_json::Map;
use uuid::Uuid;

use super::sns::*;
use super::*;
use crate::event::{BounceClass, Event, EventType};
use crate::machine::MachineDetector;
use crate::webhooks::testkit::sns::{
    CERT_URL, SUBSCRIBE_URL, Seam, TOPIC, certificate as test_key, other_key, sign, sign_with,
    sns_time,
};

const SNS_ID: &str = "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324";
const MESSAGE: &str = "0190a6f0-0000-7000-8000-000000000002";
const ORG: &str = "0190a6f0-0000-7000-8000-000000000001";

/// An SNS notification of the test message id carrying `message`, not yet signed.
fn notification(message: &str, version: &str, at: DateTime<Utc>) -> Map<String, Value> {
    crate::webhooks::testkit::sns::notification(message, SNS_ID, version, at)
}

fn provider(seam: &Arc<Seam>) -> Ses {
    Ses::new(
        vec![TOPIC.to_owned()],
        Arc::clone(seam) as Arc<dyn HttpsGet>,
    )
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/ses/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A documented SNS envelope, moved to the test topic, region and certificate.
fn sns_fixture(name: &str, at: DateTime<Utc>) -> Map<String, Value> {
    let mut env: Map<String, Value> = serde_json::from_str(&fixture(name)).unwrap();
    env.insert("TopicArn".into(), Value::from(TOPIC));
    env.insert("SigningCertURL".into(), Value::from(CERT_URL));
    env.insert("Timestamp".into(), Value::from(sns_time(at)));
    if env.contains_key("SubscribeURL") {
        env.insert("SubscribeURL".into(), Value::from(SUBSCRIBE_URL));
    }
    env
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
    at: DateTime<Utc>,
}

impl Req {
    fn new(env: &Map<String, Value>, at: DateTime<Utc>) -> Req {
        Req::raw(serde_json::to_vec_pretty(env).unwrap(), at)
    }

    fn raw(body: Vec<u8>, at: DateTime<Utc>) -> Req {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=UTF-8"),
        );
        headers.insert(
            "x-amz-sns-message-type",
            HeaderValue::from_static("Notification"),
        );
        Req {
            method: Method::POST,
            uri: Uri::from_static("/webhooks/ses"),
            headers,
            body,
            at,
        }
    }

    fn get(&self) -> WebhookRequest<'_> {
        WebhookRequest {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            body: &self.body,
            received_at: self.at,
            replay: crate::webhooks::MemoryReplayStore::shared(),
        }
    }
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn verify(p: &Ses, r: &Req) -> Result<(), WebhookError> {
    block(p.verify(&r.get()))
}

fn after_verify(p: &Ses, r: &Req) -> Result<(), WebhookError> {
    block(p.after_verify(&r.get()))
}

fn parse(p: &Ses, r: &Req) -> Result<Vec<Record>, WebhookError> {
    let machine = MachineDetector::default();
    p.parse(&r.get(), &ParseContext { machine: &machine })
}

/// Wraps an SES message in a signed notification, verifies and parses it.
fn deliver(p: &Ses, message: &str) -> Vec<Record> {
    let at = Utc::now();
    let mut env = notification(message, "2", at);
    sign(&mut env);
    let r = Req::new(&env, at);
    assert_eq!(verify(p, &r), Ok(()));
    parse(p, &r).unwrap()
}

fn events(recs: &[Record]) -> Vec<&Event> {
    recs.iter()
        .map(|r| match r {
            Record::Event(e) => e,
            Record::DeadLetter(d) => panic!("expected events, got dead letter {d:?}"),
        })
        .collect()
}

fn only_event(recs: &[Record]) -> &Event {
    let all = events(recs);
    assert_eq!(all.len(), 1);
    all[0]
}

fn ts(s: &str) -> DateTime<Utc> {
    rfc3339(s).unwrap()
}

fn sns_key() -> String {
    id_key(Source::Ses, SNS_ID)
}

#[test]
fn signature_versions_1_and_2_verify_and_the_certificate_is_fetched_once() {
    let seam = Seam::new();
    let p = provider(&seam);
    for version in ["1", "2"] {
        let at = Utc::now();
        let mut env = notification(&fixture("event-send.json"), version, at);
        sign(&mut env);
        assert_eq!(verify(&p, &Req::new(&env, at)), Ok(()), "v{version}");
        // Without a Subject (it is optional and then not signed).
        let mut env = notification(&fixture("event-send.json"), version, at);
        env.remove("Subject");
        sign(&mut env);
        assert_eq!(verify(&p, &Req::new(&env, at)), Ok(()), "v{version}");
    }
    assert_eq!(seam.calls(), [CERT_URL]);
}

#[test]
fn a_signature_of_one_version_does_not_pass_as_the_other() {
    let seam = Seam::new();
    let p = provider(&seam);
    let at = Utc::now();
    let mut env = notification(&fixture("event-send.json"), "1", at);
    sign(&mut env);
    env.insert("SignatureVersion".into(), Value::from("2"));
    assert_eq!(
        verify(&p, &Req::new(&env, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
}

#[test]
fn tampered_wrong_key_missing_and_stale_messages_are_refused() {
    let seam = Seam::new();
    let p = provider(&seam);
    let at = Utc::now();
    let message = fixture("event-bounce.json");

    let mut tampered = notification(&message, "2", at);
    sign(&mut tampered);
    tampered.insert(
        "Message".into(),
        Value::from(message.replace("Permanent", "Transient")),
    );
    assert_eq!(
        verify(&p, &Req::new(&tampered, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    let mut other_subject = notification(&message, "2", at);
    sign(&mut other_subject);
    other_subject.insert("Subject".into(), Value::from("changed"));
    assert_eq!(
        verify(&p, &Req::new(&other_subject, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    let mut wrong_key = notification(&message, "2", at);
    sign_with(&mut wrong_key, other_key());
    assert_eq!(
        verify(&p, &Req::new(&wrong_key, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
    assert_eq!(seam.calls(), [CERT_URL], "the certificate was fetched once");

    // Refused before any fetch: no signature, a garbled one, an unknown version, stale.
    let fresh = Seam::new();
    let p = provider(&fresh);
    let mut unsigned = notification(&message, "2", at);
    unsigned.remove("Signature");
    assert_eq!(
        verify(&p, &Req::new(&unsigned, at)),
        Err(WebhookError::Unauthorized(AuthFailure::MissingSignature))
    );
    let mut garbled = notification(&message, "2", at);
    garbled.insert("Signature".into(), Value::from("not base64 !"));
    assert_eq!(
        verify(&p, &Req::new(&garbled, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
    let mut v3 = notification(&message, "3", at);
    sign(&mut v3);
    assert_eq!(
        verify(&p, &Req::new(&v3, at)),
        Err(WebhookError::Unauthorized(
            AuthFailure::UnsupportedSignatureVersion
        ))
    );
    // SNS retries for at most an hour: two hours and a minute old, or 16 minutes ahead, is
    // stale.
    for minutes in [-121, 16] {
        let sent = at + chrono::Duration::minutes(minutes);
        let mut stale = notification(&message, "2", sent);
        sign(&mut stale);
        assert_eq!(
            verify(&p, &Req::new(&stale, at)),
            Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp)),
            "{minutes} min"
        );
    }
    let mut bad_time = notification(&message, "2", at);
    bad_time.insert("Timestamp".into(), Value::from("yesterday"));
    sign(&mut bad_time);
    assert_eq!(
        verify(&p, &Req::new(&bad_time, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadTimestamp))
    );
    assert!(fresh.calls().is_empty(), "{:?}", fresh.calls());

    // 50 minutes late is within the hour.
    let mut late = notification(&message, "2", at - chrono::Duration::minutes(50));
    sign(&mut late);
    assert_eq!(verify(&p, &Req::new(&late, at)), Ok(()));
}

#[test]
fn certificate_urls_outside_the_allowlist_are_refused_without_any_fetch() {
    let seam = Seam::new();
    let p = provider(&seam);
    let at = Utc::now();
    for url in [
        "https://example.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-test.pem",
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.amazonaws.com/SimpleNotificationService-test.pem",
        "https://evil.com/sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com@evil.com/SimpleNotificationService-test.pem",
        "https://user@sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com./SimpleNotificationService-test.pem",
        "https://s3.amazonaws.com/sns.us-east-1.amazonaws.com/test.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.crt",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem?x=1",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem#x",
        "https://sns.us-east-1.amazonaws.com/bucket/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com/%2e%2e/test.pem",
        "https://sns.us-east-1.amazonaws.com/a/../SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-test.pem",
        "https://SNS.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com/.pem",
        "ftp://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "//sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "",
    ] {
        let mut env = notification(&fixture("event-send.json"), "2", at);
        env.insert("SigningCertURL".into(), Value::from(url));
        sign(&mut env);
        assert_eq!(
            verify(&p, &Req::new(&env, at)),
            Err(WebhookError::Unauthorized(
                AuthFailure::CertificateUrlNotAllowed
            )),
            "{url}"
        );
    }
    let mut missing = notification(&fixture("event-send.json"), "2", at);
    missing.remove("SigningCertURL");
    sign(&mut missing);
    assert_eq!(
        verify(&p, &Req::new(&missing, at)),
        Err(WebhookError::Unauthorized(
            AuthFailure::CertificateUrlNotAllowed
        ))
    );
    assert!(seam.calls().is_empty(), "{:?}", seam.calls());
}

#[test]
fn a_topic_outside_the_allowlist_is_refused_without_any_fetch() {
    let seam = Seam::new();
    let p = provider(&seam);
    let at = Utc::now();
    for topic in [
        "arn:aws:sns:us-east-1:123456789012:OtherTopic",
        "arn:aws:sns:us-east-1:999999999999:MyTopic",
        "arn:aws:sns:us-east-1:123456789012:MyTopic ",
    ] {
        let mut env = notification(&fixture("event-send.json"), "2", at);
        env.insert("TopicArn".into(), Value::from(topic));
        sign(&mut env);
        assert_eq!(
            verify(&p, &Req::new(&env, at)),
            Err(WebhookError::Unauthorized(AuthFailure::TopicNotAllowed)),
            "{topic}"
        );
    }
    let mut env = notification(&fixture("event-send.json"), "2", at);
    env.remove("TopicArn");
    assert_eq!(
        verify(&p, &Req::new(&env, at)),
        Err(WebhookError::Unauthorized(AuthFailure::TopicNotAllowed))
    );
    assert!(seam.calls().is_empty(), "{:?}", seam.calls());
}

#[test]
fn subscription_confirmation_visits_the_subscribe_url_once_and_only_once_verified() {
    let at = Utc::now();
    let mut signed = sns_fixture("sns-subscription-confirmation.json", at);
    sign(&mut signed);

    let seam = Seam::new();
    let p = provider(&seam);
    let r = Req::new(&signed, at);
    assert_eq!(verify(&p, &r), Ok(()));
    assert_eq!(after_verify(&p, &r), Ok(()));
    assert_eq!(parse(&p, &r), Ok(vec![]));
    assert_eq!(seam.calls(), [CERT_URL, SUBSCRIBE_URL]);

    // Unsigned: nothing is fetched, nothing confirmed, whoever calls after_verify.
    let seam = Seam::new();
    let p = provider(&seam);
    let mut unsigned = signed.clone();
    unsigned.remove("Signature");
    let r = Req::new(&unsigned, at);
    assert_eq!(
        verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::MissingSignature))
    );
    assert_eq!(
        after_verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::MissingSignature))
    );
    assert!(seam.calls().is_empty(), "{:?}", seam.calls());

    // Signed by another key: the certificate is fetched, the subscription is not touched.
    let seam = Seam::new();
    let p = provider(&seam);
    let mut forged = signed.clone();
    sign_with(&mut forged, other_key());
    let r = Req::new(&forged, at);
    assert_eq!(
        verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
    assert_eq!(
        after_verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
    assert_eq!(seam.calls(), [CERT_URL]);

    // The token is signed: a changed SubscribeURL or Token fails verification.
    let seam = Seam::new();
    let p = provider(&seam);
    let mut swapped = signed.clone();
    swapped.insert(
        "SubscribeURL".into(),
        Value::from(SUBSCRIBE_URL.replace("Token=2336", "Token=9999")),
    );
    assert_eq!(
        verify(&p, &Req::new(&swapped, at)),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    // A SubscribeURL elsewhere, even correctly signed, is never visited.
    for url in [
        "https://evil.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:MyTopic&Token=1",
        "http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=1",
        "https://sns.us-east-1.amazonaws.com.evil.com/?Action=ConfirmSubscription&Token=1",
        "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&Token=1",
        "https://sns.us-east-1.amazonaws.com/?Action=Publish&Token=1",
        "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:Other&Token=1",
        "https://sns.us-east-1.amazonaws.com/x?Action=ConfirmSubscription&Token=1",
    ] {
        let seam = Seam::new();
        let p = provider(&seam);
        let mut env = signed.clone();
        env.insert("SubscribeURL".into(), Value::from(url));
        sign(&mut env);
        let r = Req::new(&env, at);
        assert_eq!(
            verify(&p, &r),
            Err(WebhookError::Unauthorized(
                AuthFailure::SubscribeUrlNotAllowed
            )),
            "{url}"
        );
        assert!(after_verify(&p, &r).is_err(), "{url}");
        assert!(seam.calls().is_empty(), "{url}: {:?}", seam.calls());
    }
}

#[test]
fn a_failed_confirmation_request_is_503_so_sns_retries() {
    struct CertOnly;
    impl HttpsGet for CertOnly {
        fn get<'a>(&'a self, url: &'a Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
            let answer = if url.as_str() == CERT_URL {
                Ok(test_key().pem.clone())
            } else {
                Err("connection reset".to_string())
            };
            Box::pin(async move { answer })
        }
    }
    let p = Ses::new(vec![TOPIC.to_owned()], Arc::new(CertOnly));
    let at = Utc::now();
    let mut env = sns_fixture("sns-subscription-confirmation.json", at);
    sign(&mut env);
    let r = Req::new(&env, at);
    assert_eq!(verify(&p, &r), Ok(()));
    assert!(matches!(
        after_verify(&p, &r),
        Err(WebhookError::Unavailable(_))
    ));
}

#[test]
fn unsubscribe_confirmations_are_acknowledged_and_nothing_is_visited() {
    let seam = Seam::new();
    let p = provider(&seam);
    let at = Utc::now();
    let mut env = sns_fixture("sns-unsubscribe-confirmation.json", at);
    sign(&mut env);
    let r = Req::new(&env, at);
    assert_eq!(verify(&p, &r), Ok(()));
    assert_eq!(after_verify(&p, &r), Ok(()));
    assert_eq!(parse(&p, &r), Ok(vec![]));
    assert_eq!(seam.calls(), [CERT_URL]);
}

#[test]
fn certificate_trouble_is_503_when_unreachable_or_unparseable_and_401_when_expired() {
    let at = Utc::now();
    let mut env = notification(&fixture("event-send.json"), "2", at);
    sign(&mut env);
    let r = Req::new(&env, at);

    let down = Seam::serving(Err("connection refused".into()));
    assert!(matches!(
        verify(&provider(&down), &r),
        Err(WebhookError::Unavailable(_))
    ));

    // What the SNS host served does not parse: transient too (503, SNS retries); a 401
    // would be final, since SNS never retries a 4xx.
    let garbage = Seam::serving(Ok(b"-----BEGIN CERTIFICATE-----\nnope\n".to_vec()));
    let p = provider(&garbage);
    assert!(matches!(verify(&p, &r), Err(WebhookError::Unavailable(_))));
    // Not cached: the next message fetches again.
    assert!(matches!(verify(&p, &r), Err(WebhookError::Unavailable(_))));
    assert_eq!(garbage.calls().len(), 2);

    // Past the certificate's validity (one day): refused.
    let seam = Seam::new();
    let p = provider(&seam);
    let later = at + chrono::Duration::days(2);
    let mut env = notification(&fixture("event-send.json"), "2", later);
    sign(&mut env);
    assert_eq!(
        verify(&p, &Req::new(&env, later)),
        Err(WebhookError::Unauthorized(AuthFailure::CertificateExpired))
    );
}

#[test]
fn the_certificate_cache_is_bounded() {
    let mut cache = CertCache::default();
    let cert = Arc::new(parse_certificate(&test_key().pem).unwrap());
    for i in 0..(CERT_CACHE_MAX + 10) {
        cache.insert(
            format!("https://sns.us-east-1.amazonaws.com/{i}.pem"),
            Arc::clone(&cert),
        );
    }
    assert_eq!(cache.by_url.len(), CERT_CACHE_MAX);
    assert_eq!(cache.order.len(), CERT_CACHE_MAX);
    assert!(
        cache
            .get("https://sns.us-east-1.amazonaws.com/0.pem")
            .is_none()
    );
    assert!(
        cache
            .get(&format!(
                "https://sns.us-east-1.amazonaws.com/{}.pem",
                CERT_CACHE_MAX + 9
            ))
            .is_some()
    );
}

#[test]
fn notification_fixtures_map_to_the_expected_events() {
    let seam = Seam::new();
    let p = provider(&seam);
    let message = Uuid::parse_str(MESSAGE).unwrap();

    let recs = deliver(&p, &fixture("notification-bounce-dsn.json"));
    let e = only_event(&recs);
    assert_eq!(e.event_type, EventType::Bounced);
    assert_eq!(e.bounce_class, Some(BounceClass::Hard));
    assert_eq!(e.message_id, message);
    assert_eq!(e.claimed_organization_id, None, "headers carry no tenant");
    assert_eq!(e.occurred_at, ts("2016-01-27T14:59:38.237Z"));
    // Keyed on the SES event, not on the SNS message that carried it.
    let key = super::mapping::ses_key(
        "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
        "Bounce",
        "jane@example.com",
        "2016-01-27T14:59:38.237Z",
        &[],
    );
    assert_eq!(e.dedup_key.as_deref(), Some(key.as_str()));
    assert_eq!(e.source, Source::Ses);
    assert_eq!(e.metadata["bounce_type"], "Permanent");
    assert_eq!(e.metadata["bounce_sub_type"], "General");
    assert_eq!(e.metadata["status"], "5.1.1");
    assert_eq!(e.metadata["action"], "failed");
    assert_eq!(
        e.metadata["ses_message_id"],
        "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000"
    );
    assert_eq!(e.metadata["sns_message_id"], SNS_ID);
    assert_eq!(
        e.error_message.as_deref(),
        Some("smtp; 550 5.1.1 <jane@example.com>... User")
    );

    // Two bounced recipients in one notification: two events, distinct keys.
    let recs = deliver(&p, &fixture("notification-bounce-no-dsn.json"));
    let two = events(&recs);
    assert_eq!(two.len(), 2);
    assert_ne!(two[0].dedup_key, two[1].dedup_key);
    for e in &two {
        assert_eq!(e.event_type, EventType::Bounced);
        assert_eq!(e.bounce_class, Some(BounceClass::Hard));
        assert!(
            e.dedup_key
                .as_deref()
                .is_some_and(|k| k.starts_with("ses:h:"))
        );
        assert_eq!(
            e.error_message.as_deref(),
            Some("Permanent bounce (General)")
        );
    }

    let recs = deliver(&p, &fixture("notification-complaint.json"));
    let e = only_event(&recs);
    assert_eq!(e.event_type, EventType::Complained);
    assert_eq!(e.metadata["complaint_feedback_type"], "abuse");
    assert_eq!(
        e.metadata["feedback_user_agent"],
        "AnyCompany Feedback Loop (V0.01)"
    );
    assert_eq!(e.user_agent, None);
    assert_eq!(e.occurred_at, ts("2016-01-27T14:59:38.237Z"));

    let recs = deliver(&p, &fixture("notification-delivery.json"));
    let e = only_event(&recs);
    assert_eq!(e.event_type, EventType::Delivered);
    assert_eq!(
        e.metadata["smtp_response"],
        "250 ok:  Message 64111812 accepted"
    );
    assert!(
        e.dedup_key
            .as_deref()
            .is_some_and(|k| k.starts_with("ses:h:"))
    );
    assert_eq!(e.error_message, None);

    // The documented complaint without a feedback report carries no Reachly id.
    let recs = deliver(&p, &fixture("notification-complaint-no-feedback.json"));
    let Record::DeadLetter(d) = &recs[0] else {
        panic!("uncorrelatable: dead letter");
    };
    assert_eq!(recs.len(), 1);
    assert_eq!(d.reason, "no_message_id");
    assert_eq!(d.event_type.as_deref(), Some("Complaint"));
    assert!(
        d.dedup_key
            .as_deref()
            .is_some_and(|k| k.starts_with("ses:h:"))
    );
    assert_eq!(
        d.payload,
        fixture("notification-complaint-no-feedback.json")
    );
}

#[test]
fn event_publishing_fixtures_map_to_the_expected_events() {
    let seam = Seam::new();
    let p = provider(&seam);
    let message = Uuid::parse_str(MESSAGE).unwrap();
    let org = Uuid::parse_str(ORG).unwrap();
    let one = |name: &str| -> Event {
        let recs = deliver(&p, &fixture(name));
        let e = only_event(&recs).clone();
        assert_eq!(e.message_id, message, "{name}");
        assert_eq!(e.claimed_organization_id, Some(org), "{name}");
        assert!(
            e.dedup_key
                .as_deref()
                .is_some_and(|k| k.starts_with("ses:h:")),
            "{name}"
        );
        assert_eq!(
            e.metadata["ses_message_id"],
            "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000",
            "{name}"
        );
        e
    };

    let e = one("event-send.json");
    assert_eq!(e.event_type, EventType::Sent);
    assert_eq!(e.occurred_at, ts("2016-10-14T05:02:16.645Z"));

    let e = one("event-delivery.json");
    assert_eq!(e.event_type, EventType::Delivered);
    assert_eq!(e.occurred_at, ts("2016-10-19T23:21:04.133Z"));
    assert_eq!(e.metadata["reporting_mta"], "mta.example.com");

    let e = one("event-bounce.json");
    assert_eq!(e.event_type, EventType::Bounced);
    assert_eq!(e.bounce_class, Some(BounceClass::Hard));
    assert_eq!(e.occurred_at, ts("2017-08-05T00:41:02.669Z"));
    assert_eq!(
        e.error_message.as_deref(),
        Some("smtp; 550 5.1.1 user unknown")
    );
    assert_eq!(
        e.metadata["diagnostic_code"],
        "smtp; 550 5.1.1 user unknown"
    );

    let e = one("event-complaint.json");
    assert_eq!(e.event_type, EventType::Complained);
    assert_eq!(e.occurred_at, ts("2017-08-05T00:41:02.669Z"));

    let e = one("event-reject.json");
    assert_eq!(e.event_type, EventType::Dropped);
    assert_eq!(
        e.error_message.as_deref(),
        Some("rejected by SES: Bad content")
    );
    assert_eq!(e.metadata["reason"], "Bad content");
    assert_eq!(e.occurred_at, ts("2016-10-14T17:38:15.211Z"));

    let e = one("event-open.json");
    assert_eq!(e.event_type, EventType::Opened);
    assert_eq!(e.occurred_at, ts("2017-08-09T22:00:19.652Z"));
    assert_eq!(e.ip_address.as_deref(), Some("192.0.2.1"));
    assert!(e.user_agent.as_deref().unwrap().contains("iPhone"));
    assert_eq!(e.machine_reason, None);

    let e = one("event-click.json");
    assert_eq!(e.event_type, EventType::Clicked);
    assert_eq!(e.occurred_at, ts("2017-08-09T23:51:25.570Z"));
    assert_eq!(
        e.link_url.as_deref(),
        Some("http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html")
    );
    assert_eq!(e.metadata["link_tags"]["samplekey0"][0], "samplevalue0");
    assert_eq!(e.machine_reason, None);

    let e = one("event-rendering-failure.json");
    assert_eq!(e.event_type, EventType::Dropped);
    assert_eq!(
        e.error_message.as_deref(),
        Some("Attribute 'attributeName' is not present in the rendering data.")
    );
    assert_eq!(e.metadata["template_name"], "MyTemplate");

    let e = one("event-delivery-delay.json");
    assert_eq!(e.event_type, EventType::Deferred);
    assert_eq!(e.occurred_at, ts("2020-06-16T00:25:40.095Z"));
    assert_eq!(
        e.error_message.as_deref(),
        Some("smtp; 421 4.4.1 Unable to connect to remote host")
    );
    assert_eq!(e.metadata["delay_type"], "TransientCommunicationFailure");

    let recs = deliver(&p, &fixture("event-subscription.json"));
    let e = only_event(&recs);
    assert_eq!(e.event_type, EventType::Unsubscribed);
    assert_eq!(e.occurred_at, ts("2022-01-12T01:00:17.910Z"));
    assert_eq!(e.metadata["unsubscribe_source"], "UnsubscribeHeader");
}

#[test]
fn transient_bounces_scanner_opens_and_odd_messages() {
    let seam = Seam::new();
    let p = provider(&seam);
    let tagged = |body: &str| {
        format!(
            r#"{{{body},"mail":{{"timestamp":"2024-01-01T00:00:00Z","messageId":"m1","tags":{{"reachly_message_id":["{MESSAGE}"]}}}}}}"#
        )
    };
    for (bounce_type, class) in [
        ("Transient", BounceClass::Soft),
        ("Undetermined", BounceClass::Soft),
        ("Permanent", BounceClass::Hard),
    ] {
        let recs = deliver(
            &p,
            &tagged(&format!(
                r#""eventType":"Bounce","bounce":{{"bounceType":"{bounce_type}","bounceSubType":"MailboxFull","timestamp":"2024-01-01T00:00:01Z","bouncedRecipients":[{{"emailAddress":"a@example.com"}}]}}"#
            )),
        );
        assert_eq!(only_event(&recs).bounce_class, Some(class), "{bounce_type}");
    }
    let recs = deliver(
        &p,
        &tagged(
            r#""eventType":"Open","open":{"timestamp":"2024-01-01T00:00:01Z","userAgent":"Mozilla/5.0 (Windows NT 10.0) Mimecast"}"#,
        ),
    );
    assert_eq!(
        only_event(&recs).machine_reason.as_deref(),
        Some("user_agent:mimecast")
    );

    // Topic-level preference changes are kept, not guessed at.
    let recs = deliver(
        &p,
        &tagged(
            r#""eventType":"Subscription","subscription":{"newTopicPreferences":{"unsubscribeAll":false}}"#,
        ),
    );
    let Record::DeadLetter(d) = &recs[0] else {
        panic!("dead letter");
    };
    assert_eq!(d.reason, "unmapped_subscription_change");

    let recs = deliver(&p, &tagged(r#""eventType":"Teleport""#));
    let Record::DeadLetter(d) = &recs[0] else {
        panic!("dead letter");
    };
    assert_eq!(d.reason, "unknown_event_type");
    assert_eq!(d.event_type.as_deref(), Some("Teleport"));
    assert_eq!(d.dedup_key.as_deref(), Some(sns_key().as_str()));

    let recs = deliver(
        &p,
        r#"{"notificationType":"AmazonSnsSubscriptionSucceeded","message":"You have successfully subscribed your Amazon SNS topic"}"#,
    );
    assert!(recs.is_empty());

    // The SNS guide's example notification, "Hello world!": authenticated, not SES.
    let at = Utc::now();
    let mut env = sns_fixture("sns-notification.json", at);
    sign(&mut env);
    let r = Req::new(&env, at);
    assert_eq!(verify(&p, &r), Ok(()));
    let recs = parse(&p, &r).unwrap();
    let Record::DeadLetter(d) = &recs[0] else {
        panic!("dead letter");
    };
    assert_eq!(d.reason, "unparseable_message");
    assert_eq!(d.payload, "Hello world!");
    assert_eq!(d.dedup_key.as_deref(), Some(sns_key().as_str()));
}

#[test]
fn malformed_bodies_and_wrong_content_types_are_refused_without_any_fetch() {
    let seam = Seam::new();
    let p = provider(&seam);
    let at = Utc::now();
    for body in [
        &b""[..],
        b"{",
        b"[]",
        b"null",
        b"\xff",
        br#"{"Type":"Weird","TopicArn":"arn:aws:sns:us-east-1:123456789012:MyTopic"}"#,
        br#"{"Type":7}"#,
        br#"{"Type":"Notification","Message":{"not":"a string"}}"#,
    ] {
        let r = Req::raw(body.to_vec(), at);
        assert!(
            matches!(verify(&p, &r), Err(WebhookError::BadRequest(_))),
            "{body:?}"
        );
        assert!(
            matches!(parse(&p, &r), Err(WebhookError::BadRequest(_))),
            "{body:?}"
        );
    }
    // Signed but without a signed field.
    let mut env = notification(&fixture("event-send.json"), "2", at);
    env.remove("MessageId");
    sign(&mut env);
    assert!(matches!(
        verify(&p, &Req::new(&env, at)),
        Err(WebhookError::BadRequest(_))
    ));
    let mut env = notification(&fixture("event-send.json"), "2", at);
    sign(&mut env);
    let mut r = Req::new(&env, at);
    r.headers.insert(
        "content-type",
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    assert!(matches!(
        verify(&p, &r),
        Err(WebhookError::UnsupportedMediaType(_))
    ));
    assert!(seam.calls().is_empty(), "{:?}", seam.calls());
}

#[test]
fn topic_arns_and_regions_are_checked() {
    assert_eq!(topic_region(TOPIC), Some("us-east-1"));
    assert_eq!(
        topic_region("arn:aws-us-gov:sns:us-gov-west-1:123456789012:T"),
        Some("us-gov-west-1")
    );
    for bad in [
        "",
        "MyTopic",
        "arn:aws:sqs:us-east-1:123456789012:MyTopic",
        "arn:aws:sns:us-east-1:1234:MyTopic",
        "arn:aws:sns:evil.com:123456789012:MyTopic",
        "arn:aws:sns:us-east-1.evil.com:123456789012:MyTopic",
        "arn:aws:sns:US-EAST-1:123456789012:MyTopic",
        "arn:aws:sns:us-east-1:123456789012:",
        "arn:aws:sns:us-east-1:123456789012:a:b",
    ] {
        assert_eq!(topic_region(bad), None, "{bad}");
    }
    for good in [
        "us-east-1",
        "eu-central-1",
        "ap-southeast-2",
        "il-central-1",
    ] {
        assert!(plausible_region(good), "{good}");
    }
    for bad in [
        "us",
        "us-east",
        "east-1",
        "us-east-123",
        "u-east-1",
        "us--1",
        "us-east-1a",
    ] {
        assert!(!plausible_region(bad), "{bad}");
    }

    let https: Arc<dyn HttpsGet> = Seam::new();
    let args = |topics: &str| {
        crate::config::ServeArgs::from_argv(["serve", "--ses-topic-arns", topics]).webhooks
    };
    assert!(matches!(from_config(&args(TOPIC), &https), Ok(Some(_))));
    let err = from_config(&args(&format!("{TOPIC},nonsense")), &https)
        .err()
        .unwrap();
    assert!(err.starts_with("REACHLY_SES_TOPIC_ARNS"), "{err}");
    let none = crate::config::ServeArgs::from_argv(["serve"]).webhooks;
    assert!(matches!(from_config(&none, &https), Ok(None)));
}

#[test]
fn kept_text_is_bounded_and_nul_free() {
    let seam = Seam::new();
    let p = provider(&seam);
    let message = serde_json::json!({
        "eventType": "Bounce",
        "bounce": {"bounceType": "Permanent", "bounceSubType": "Gen\u{0}eral",
                   "bouncedRecipients": [{"diagnosticCode": "é".repeat(3000)}]},
        "mail": {"messageId": "m1", "tags": {"reachly_message_id": [MESSAGE]}}
    })
    .to_string();
    let recs = deliver(&p, &message);
    let e = only_event(&recs);
    assert_eq!(e.metadata["bounce_sub_type"], "Gen\u{FFFD}eral");
    let diag = e.metadata["diagnostic_code"].as_str().unwrap();
    assert!(diag.len() <= crate::event::MAX_TEXT_BYTES && diag.len() > 4000);
    assert_eq!(e.error_message.as_deref(), Some(diag));
}

#[test]
fn raw_message_delivery_is_refused_before_anything_is_fetched() {
    let seam = Seam::new();
    let p = provider(&seam);
    let mut r = Req::raw(fixture("event-bounce.json").into_bytes(), Utc::now());
    r.headers
        .insert(RAW_DELIVERY_HEADER, HeaderValue::from_static("true"));
    assert_eq!(
        verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::SnsRawDelivery))
    );
    assert!(seam.calls().is_empty());
}

#[test]
fn china_topics_use_the_amazonaws_com_cn_host_and_unknown_partitions_are_refused_at_config() {
    use super::sns::{certificate_url, topic_region};
    let cn = "arn:aws-cn:sns:cn-north-1:123456789012:MyTopic";
    assert_eq!(topic_region(cn), Some("cn-north-1"));
    let region = topic_region(cn).unwrap();
    assert!(
        certificate_url(
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
            region
        )
        .is_some()
    );
    assert!(
        certificate_url(
            "https://sns.cn-north-1.amazonaws.com/SimpleNotificationService-abc.pem",
            region
        )
        .is_none()
    );
    // A partition and region that do not belong together, or an isolated partition.
    assert_eq!(
        topic_region("arn:aws:sns:cn-north-1:123456789012:MyTopic"),
        None
    );
    assert_eq!(
        topic_region("arn:aws-cn:sns:us-east-1:123456789012:MyTopic"),
        None
    );
    assert_eq!(
        topic_region("arn:aws-iso:sns:us-iso-east-1:123456789012:MyTopic"),
        None
    );
    use crate::webhooks::testkit::{no_network, no_secrets};
    let mut cfg = no_secrets();
    cfg.ses_topic_arns = vec!["arn:aws-iso:sns:us-iso-east-1:123456789012:T".into()];
    let err = from_config(&cfg, &no_network()).err().expect("refused");
    assert!(err.contains("REACHLY_SES_TOPIC_ARNS"), "{err}");
    cfg.ses_topic_arns = vec![cn.into()];
    assert!(from_config(&cfg, &no_network()).expect("ok").is_some());
}

#[test]
fn one_bounce_by_both_publishing_paths_has_one_key_and_not_spam_is_no_complaint() {
    let seam = Seam::new();
    let p = provider(&seam);
    let published = deliver(&p, &fixture("event-bounce.json"));
    let notified = deliver(&p, &fixture("both-paths-notification-bounce.json"));
    let (a, b) = (only_event(&published), only_event(&notified));
    assert_eq!(a.dedup_key, b.dedup_key);
    assert_eq!(a.occurred_at, b.occurred_at);
    assert_ne!(
        a.metadata["sns_message_id"],
        Value::Null,
        "the SNS message id is kept in metadata"
    );
    let not_spam = fixture("event-complaint.json").replace("\"abuse\"", "\"not-spam\"");
    let recs = deliver(&p, &not_spam);
    let Record::DeadLetter(d) = &recs[0] else {
        panic!("dead letter");
    };
    assert_eq!(recs.len(), 1);
    assert_eq!(d.reason, "not_a_complaint");
}
