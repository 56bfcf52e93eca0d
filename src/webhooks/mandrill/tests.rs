//! Unit tests of the Mandrill provider: verification and extraction without a server.

use super::*;
use crate::webhooks::testkit::sign::mandrill_signature as sign;

fn form(params: &[(&str, &str)]) -> Vec<u8> {
    crate::webhooks::testkit::sign::form(params).into_bytes()
}
use crate::event::Event;
use crate::machine::MachineDetector;
use chrono::{DateTime, Utc};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Uri};

const MESSAGE: &str = "0190a6f0-0000-7000-8000-000000000002";
const ORG: &str = "0190a6f0-0000-7000-8000-000000000001";
const URL: &str = "https://hooks.example.com/webhooks/mandrill?src=mandrill";

fn random_key() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn provider(key: &str) -> Mandrill {
    Mandrill {
        key: key.as_bytes().to_vec(),
        url: URL.to_owned(),
    }
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
    at: DateTime<Utc>,
}

impl Req {
    fn signed(key: &str, params: &[(&str, &str)]) -> Req {
        let mut r = Req::unsigned(&form(params));
        r.headers.insert(
            "x-mandrill-signature",
            HeaderValue::from_str(&sign(key, URL, params)).unwrap(),
        );
        r
    }

    fn unsigned(body: &[u8]) -> Req {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        Req {
            method: Method::POST,
            uri: Uri::from_static("/webhooks/mandrill"),
            headers: h,
            body: body.to_vec(),
            at: Utc::now(),
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

fn verify(p: &Mandrill, r: &Req) -> Result<(), WebhookError> {
    p.check(&r.get())
}

fn parse(p: &Mandrill, r: &Req) -> Result<Vec<Record>, WebhookError> {
    let machine = MachineDetector::default();
    p.parse(&r.get(), &ParseContext { machine: &machine })
}

fn fixture() -> String {
    let path = format!(
        "{}/tests/fixtures/mandrill/mandrill_events.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn event(r: &Record) -> &Event {
    match r {
        Record::Event(e) => e,
        Record::DeadLetter(d) => panic!("expected an event, got dead letter {d:?}"),
    }
}

#[test]
fn the_documented_example_batch_maps_to_the_expected_records() {
    let key = random_key();
    let p = provider(&key);
    let json = fixture();
    let r = Req::signed(&key, &[("mandrill_events", &json)]);
    assert_eq!(verify(&p, &r), Ok(()));
    let recs = parse(&p, &r).unwrap();
    assert_eq!(recs.len(), 14);

    let message = uuid::Uuid::parse_str(MESSAGE).unwrap();
    let org = uuid::Uuid::parse_str(ORG).unwrap();
    let at = unix_time(1_384_954_004.0).unwrap();
    let expected = [
        (
            EventType::Sent,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa",
            "send",
        ),
        (
            EventType::Deferred,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa1",
            "deferral",
        ),
        (
            EventType::Bounced,
            Some(BounceClass::Hard),
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa2",
            "hard_bounce",
        ),
        (
            EventType::Bounced,
            Some(BounceClass::Soft),
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa3",
            "soft_bounce",
        ),
        (
            EventType::Opened,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa4",
            "open",
        ),
        (
            EventType::Clicked,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa5",
            "click",
        ),
        (
            EventType::Complained,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa6",
            "spam",
        ),
        (
            EventType::Unsubscribed,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa7",
            "unsub",
        ),
        (
            EventType::Dropped,
            None,
            "exampleaaaaaaaaaaaaaaaaaaaaaaaaa8",
            "reject",
        ),
    ];
    for (rec, (t, class, id, name)) in recs.iter().zip(expected) {
        let e = event(rec);
        assert_eq!(e.event_type, t, "{name}");
        assert_eq!(e.bounce_class, class, "{name}");
        assert_eq!(e.message_id, message, "{name}");
        assert_eq!(e.claimed_organization_id, Some(org), "{name}");
        assert_eq!(e.occurred_at, at, "{name}");
        assert_eq!(e.source, Source::Mandrill);
        assert_eq!(e.metadata["mandrill_message_id"], id, "{name}");
        let url = if name == "click" {
            "http://mandrill.com"
        } else {
            ""
        };
        // The client (address, user agent) as the example gives it, when it gives one.
        let doc: Vec<Value> = serde_json::from_str(&fixture()).expect("json");
        let raw = doc.iter().find(|d| d["_id"] == id).expect("in the example");
        let ip = raw["ip"].as_str().unwrap_or("");
        let ua = raw["user_agent"].as_str().unwrap_or("");
        assert_eq!(
            e.dedup_key.as_deref(),
            Some(content_key(Source::Mandrill, &[id, name, "1384954004", url, ip, ua]).as_str()),
            "{name}"
        );
        assert_eq!(e.machine_reason, None, "{name}");
    }
    let deferral = event(&recs[1]);
    assert_eq!(
        deferral.error_message.as_deref(),
        Some("451 4.3.5 Temporarily unavailable, try again later.")
    );
    let hard = event(&recs[2]);
    assert!(
        hard.error_message
            .as_deref()
            .unwrap()
            .starts_with("smtp;550 5.1.1")
    );
    assert_eq!(hard.metadata["bounce_description"], "bad_mailbox");
    assert_eq!(hard.metadata["bgtools_code"], 10);
    let soft = event(&recs[3]);
    assert_eq!(
        soft.error_message.as_deref(),
        Some("smtp;552 5.2.2 Over Quota")
    );
    assert_eq!(soft.metadata["bounce_description"], "mailbox_full");
    let open = event(&recs[4]);
    assert_eq!(open.ip_address.as_deref(), Some("127.0.0.1"));
    assert!(
        open.user_agent
            .as_deref()
            .unwrap()
            .contains("Postbox/1.1.3")
    );
    assert_eq!(open.link_url, None);
    let click = event(&recs[5]);
    assert_eq!(click.link_url.as_deref(), Some("http://mandrill.com"));
    let reject = event(&recs[8]);
    assert_eq!(
        reject.error_message.as_deref(),
        Some("rejected by Mandrill")
    );
    for e in [&recs[0], &recs[4], &recs[5], &recs[6], &recs[7]] {
        assert_eq!(event(e).error_message, None);
    }

    // The five sync events: dead letters, keyed by content.
    for (rec, kind) in recs[9..].iter().zip([
        "blacklist",
        "blacklist",
        "blacklist",
        "whitelist",
        "whitelist",
    ]) {
        let Record::DeadLetter(d) = rec else {
            panic!("sync events are dead letters");
        };
        assert_eq!(d.reason, "unknown_event_type");
        assert_eq!(d.event_type.as_deref(), Some(kind));
        assert!(d.dedup_key.as_deref().unwrap().starts_with("mandrill:h:"));
        assert!(d.payload.contains("\"action\""));
    }
    // Re-delivery gives the same keys.
    let again = parse(&p, &r).unwrap();
    let keys = |v: &[Record]| -> Vec<Option<String>> {
        v.iter()
            .map(|r| match r {
                Record::Event(e) => e.dedup_key.clone(),
                Record::DeadLetter(d) => d.dedup_key.clone(),
            })
            .collect()
    };
    assert_eq!(keys(&recs), keys(&again));
    let mut unique = keys(&recs);
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 14, "no two records share a key");
}

#[test]
fn mandrills_empty_test_batch_is_accepted_with_no_records() {
    let key = random_key();
    let p = provider(&key);
    let r = Req::signed(&key, &[("mandrill_events", "[]")]);
    assert_eq!(verify(&p, &r), Ok(()));
    assert_eq!(parse(&p, &r), Ok(vec![]));
}

#[test]
fn the_signature_covers_the_configured_url_and_every_sorted_parameter() {
    let key = random_key();
    let p = provider(&key);
    // Three parameters, posted in an order that is neither sorted nor reverse-sorted:
    // signed sorted by key, values decoded.
    let params = [
        ("mandrill_events", "[]"),
        ("a_first", "x y&z"),
        ("z_last", "%41"),
    ];
    let mut r = Req::unsigned(&form(&params));
    r.headers.insert(
        "x-mandrill-signature",
        HeaderValue::from_str(&sign(&key, URL, &params)).unwrap(),
    );
    assert_eq!(verify(&p, &r), Ok(()));
    // Signed for another URL (a trailing slash is enough): refused.
    let mut r = Req::unsigned(&form(&params));
    r.headers.insert(
        "x-mandrill-signature",
        HeaderValue::from_str(&sign(&key, &format!("{URL}/"), &params)).unwrap(),
    );
    assert_eq!(
        verify(&p, &r),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
}

#[test]
fn tampered_body_wrong_key_and_missing_or_garbled_header_are_refused() {
    let key = random_key();
    let p = provider(&key);
    let json = fixture();
    let signed = Req::signed(&key, &[("mandrill_events", &json)]);

    let mut tampered = Req::signed(&key, &[("mandrill_events", &json)]);
    tampered.body = form(&[(
        "mandrill_events",
        &json.replace("hard_bounce", "soft_bounce"),
    )]);
    assert_eq!(
        verify(&p, &tampered),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    let wrong = Req::signed(&random_key(), &[("mandrill_events", &json)]);
    assert_eq!(
        verify(&p, &wrong),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );

    let mut missing = Req::unsigned(&signed.body);
    missing.headers.remove("x-mandrill-signature");
    assert_eq!(
        verify(&p, &missing),
        Err(WebhookError::Unauthorized(AuthFailure::MissingSignature))
    );

    let mut garbled = Req::unsigned(&signed.body);
    garbled
        .headers
        .insert("x-mandrill-signature", HeaderValue::from_static("%%%"));
    assert_eq!(
        verify(&p, &garbled),
        Err(WebhookError::Unauthorized(AuthFailure::BadSignature))
    );
    assert_eq!(verify(&p, &signed), Ok(()));
}

#[test]
fn malformed_bodies_and_wrong_content_types_are_refused_without_panic() {
    let key = random_key();
    let p = provider(&key);
    for params in [
        vec![],
        vec![("mandrill_events", "")],
        vec![("mandrill_events", "{")],
        vec![("mandrill_events", "{\"event\":\"send\"}")],
        vec![("mandrill_events", "[]"), ("mandrill_events", "[]")],
        vec![("other", "[]")],
    ] {
        let r = Req::signed(&key, &params);
        assert_eq!(verify(&p, &r), Ok(()), "{params:?}");
        assert!(
            matches!(parse(&p, &r), Err(WebhookError::BadRequest(_))),
            "{params:?}"
        );
    }
    let mut json = Req::signed(&key, &[("mandrill_events", "[]")]);
    json.headers
        .insert("content-type", HeaderValue::from_static("application/json"));
    assert!(matches!(
        verify(&p, &json),
        Err(WebhookError::UnsupportedMediaType(_))
    ));
    // Odd elements inside a valid array are dead letters, not errors.
    let r = Req::signed(&key, &[("mandrill_events", "[1, {\"event\":\"inbound\"}]")]);
    let recs = parse(&p, &r).unwrap();
    let reasons: Vec<&str> = recs
        .iter()
        .map(|r| match r {
            Record::DeadLetter(d) => d.reason.as_str(),
            Record::Event(_) => "event",
        })
        .collect();
    assert_eq!(reasons, ["malformed_event", "unknown_event_type"]);
}

#[test]
fn uncorrelatable_events_and_scanner_clicks() {
    let key = random_key();
    let p = provider(&key);
    let batch = format!(
        r#"[{{"event":"open","_id":"m1","ts":1700000000,"msg":{{"metadata":{{"user_id":1}}}}}},
           {{"event":"click","_id":"m2","ts":1700000001.5,"url":"https://x.test/","user_agent":"Mozilla/5.0 (compatible; Proofpoint URL Defense)","msg":{{"metadata":{{"reachly_message_id":"{MESSAGE}"}}}}}}]"#
    );
    let r = Req::signed(&key, &[("mandrill_events", &batch)]);
    let recs = parse(&p, &r).unwrap();
    let Record::DeadLetter(d) = &recs[0] else {
        panic!("no reachly id: dead letter");
    };
    assert_eq!(d.reason, "no_message_id");
    assert_eq!(d.event_type.as_deref(), Some("open"));
    assert_eq!(
        d.dedup_key.as_deref(),
        Some(content_key(Source::Mandrill, &["m1", "open", "1700000000", "", "", ""]).as_str())
    );
    let click = event(&recs[1]);
    assert_eq!(
        click.machine_reason.as_deref(),
        Some("user_agent:proofpoint")
    );
    assert_eq!(click.claimed_organization_id, None);
    assert_eq!(click.occurred_at.timestamp_subsec_millis(), 500);
}

#[test]
fn the_webhook_url_is_required_with_the_key() {
    struct NoNetwork;
    impl HttpsGet for NoNetwork {
        fn get<'a>(&'a self, _url: &'a url::Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
            Box::pin(async { Err("no network in tests".to_string()) })
        }
    }
    let https: Arc<dyn HttpsGet> = Arc::new(NoNetwork);
    let args = crate::config::ServeArgs::from_argv([
        "serve",
        "--mandrill-webhook-key",
        "k",
        "--mandrill-webhook-url",
        URL,
    ]);
    assert!(matches!(from_config(&args.webhooks, &https), Ok(Some(_))));
    let mut no_url = args.webhooks.clone();
    no_url.mandrill_webhook_url = None;
    assert!(from_config(&no_url, &https).is_err());
    let mut none = args.webhooks;
    none.mandrill_webhook_key = None;
    assert!(matches!(from_config(&none, &https), Ok(None)));
}

#[test]
fn the_module_doc_shows_the_event_table() {
    crate::webhooks::records::assert_doc_shows(include_str!("mod.rs"), EVENTS);
}

#[test]
fn kept_text_is_bounded_and_nul_free() {
    let key = random_key();
    let p = provider(&key);
    let long = "é".repeat(3000);
    let batch = serde_json::json!([{
        "event": "hard_bounce", "_id": "m1", "ts": 1700000000,
        "msg": {"state": " bounced\u{0} ", "diag": long, "bounce_description": "bad_mailbox",
                "metadata": {"reachly_message_id": MESSAGE}}
    }])
    .to_string();
    let r = Req::signed(&key, &[("mandrill_events", &batch)]);
    let recs = parse(&p, &r).unwrap();
    let e = event(&recs[0]);
    assert_eq!(e.metadata["mandrill_state"], "bounced\u{FFFD}");
    let diag = e.metadata["diagnostic_code"].as_str().unwrap();
    assert!(diag.len() <= crate::event::MAX_TEXT_BYTES && diag.len() > 4000);
    assert_eq!(e.error_message.as_deref(), Some(diag));
}
