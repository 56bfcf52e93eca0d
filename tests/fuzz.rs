//! Fuzzing of every parser that reads untrusted input, as property tests that run in the
//! normal suite (coverage-guided cargo-fuzz needs a nightly toolchain this project does not
//! assume). Inputs are arbitrary bytes and *structure-aware* random JSON built from each
//! ESP's own field names, so the generator reaches deep into the parsers instead of failing
//! at the first brace. The property everywhere: no panic, and a clear `Ok`/`Err`.
//! `REACHLY_FUZZ_CASES` raises the number of cases (default 2000 per target). The corpora of
//! the coverage-guided targets in `fuzz/` are replayed here too (`fuzz/README.md`).

use std::io::Write as _;

use base64::Engine as _;
use chrono::Utc;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Uri};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reachly_ingest::config::{Secret, ServeArgs};
use reachly_ingest::event::{MAX_TEXT_BYTES, Record};
use reachly_ingest::machine::MachineDetector;
use reachly_ingest::token::TokenKeys;
use reachly_ingest::token::{self, Purpose};
use reachly_ingest::webhooks::{ParseContext, Registry, WebhookRequest, testkit};
use serde_json::Value;

fn cases() -> u32 {
    std::env::var("REACHLY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Field names the seven ESPs use, plus ours.
const KEYS: &[&str] = &[
    "event",
    "timestamp",
    "sg_event_id",
    "sg_message_id",
    "sg_machine_open",
    "email",
    "url",
    "type",
    "reason",
    "status",
    "response",
    "useragent",
    "ip",
    "reachly_message_id",
    "reachly_organization_id",
    "event-data",
    "signature",
    "token",
    "user-variables",
    "severity",
    "delivery-status",
    "message",
    "headers",
    "recipient",
    "id",
    "client-info",
    "RecordType",
    "Metadata",
    "MessageID",
    "Type",
    "TypeCode",
    "BouncedAt",
    "DeliveredAt",
    "ReceivedAt",
    "OriginalLink",
    "Headers",
    "Name",
    "Value",
    "msys",
    "message_event",
    "track_event",
    "unsubscribe_event",
    "rcpt_meta",
    "metadata",
    "bounce_class",
    "event_id",
    "target_link_url",
    "Message",
    "MessageId",
    "TopicArn",
    "SignatureVersion",
    "SigningCertURL",
    "SubscribeURL",
    "notificationType",
    "eventType",
    "mail",
    "tags",
    "bounce",
    "bounceType",
    "bouncedRecipients",
    "complaint",
    "delivery",
    "open",
    "click",
    "link",
    "userAgent",
    "_id",
    "ts",
    "msg",
    "data",
    "created_at",
    "email_id",
    "name",
    "value",
];

fn uuidish() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0190a6f0-3b4c-7d2e-9a02-fedcba987654".to_string()),
        Just(uuid::Uuid::nil().to_string()),
        "[0-9a-f-]{0,40}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        (0i64..4_000_000_000).prop_map(Value::from),
        uuidish().prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::from),
        // A NUL (PostgreSQL refuses it in text and jsonb) and text past every length bound.
        Just(Value::from(" x\u{0}y ")),
        Just(Value::from("é".repeat(3000))),
        prop_oneof![
            Just("delivered"),
            Just("bounce"),
            Just("open"),
            Just("click"),
            Just("failed"),
            Just("Bounce"),
            Just("Permanent"),
            Just("Transient"),
            Just("hard_bounce"),
            Just("email.bounced"),
            Just("Notification"),
            Just("SubscriptionConfirmation"),
            Just("2026-11-25T07:00:00Z"),
            Just("1700000000.5"),
            Just("10"),
        ]
        .prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..8).prop_map(
                |kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

/// A body: arbitrary bytes, random JSON, or random JSON nested where SNS puts it (a
/// `Message` string) or Mandrill does (a form field).
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        json().prop_map(|v| v.to_string().into_bytes()),
        json().prop_map(
            |v| serde_json::json!({"Type": "Notification", "Message": v.to_string()})
                .to_string()
                .into_bytes()
        ),
        json().prop_map(|v| {
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("mandrill_events", &v.to_string())
                .finish()
                .into_bytes()
        }),
    ]
}

fn all_providers() -> Registry {
    let public = {
        use p256::pkcs8::EncodePublicKey as _;
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).expect("valid scalar");
        let der = secret.public_key().to_public_key_der().expect("der");
        base64::engine::general_purpose::STANDARD.encode(der.as_bytes())
    };
    let whsec = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([9u8; 24])
    );
    let mut args = ServeArgs::from_argv(["serve", "--database-url", "host=localhost"]);
    let w = &mut args.webhooks;
    w.sendgrid_public_key = Some(Secret::new(public));
    w.mailgun_signing_key = Some(Secret::new("key-fuzz"));
    w.ses_topic_arns = vec!["arn:aws:sns:us-east-1:123456789012:reachly".into()];
    w.postmark_basic_auth = Some(Secret::new("u:p"));
    w.sparkpost_basic_auth = Some(Secret::new("u:p"));
    w.mandrill_webhook_key = Some(Secret::new("mandrill-key"));
    w.mandrill_webhook_url = Some("https://t.example.com/webhooks/mandrill".into());
    w.resend_webhook_secret = Some(Secret::new(whsec));
    let r = Registry::from_config(&args.webhooks, testkit::no_network())
        .expect("every provider configures");
    assert_eq!(r.names().len(), 7, "{:?}", r.names());
    r
}

fn headers_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
    let names = proptest::sample::select(vec![
        "content-type",
        "authorization",
        "x-twilio-email-event-webhook-signature",
        "x-twilio-email-event-webhook-timestamp",
        "x-mandrill-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
        "x-amz-sns-message-type",
    ]);
    proptest::collection::vec((names.prop_map(str::to_string), "[ -~]{0,64}"), 0..6)
}

/// Every string in a JSON tree.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| strings(i, out)),
        _ => {}
    }
}

#[test]
fn webhook_parsers_and_verifiers_never_panic() {
    let registry = all_providers();
    let machine = MachineDetector::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let uri: Uri = "/webhooks/x".parse().unwrap();
    let mut r = runner();
    r.run(&(body(), headers_strategy()), |(body, hdrs)| {
        let mut headers = HeaderMap::new();
        for (k, v) in hdrs {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                headers.append(k, v);
            }
        }
        let req = WebhookRequest {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            body: &body,
            received_at: Utc::now(),
            replay: reachly_ingest::webhooks::MemoryReplayStore::shared(),
        };
        for name in registry.names() {
            let p = registry.get(name).unwrap();
            // Authentication must refuse (nothing here is signed) without panicking.
            let verified = rt.block_on(p.verify(&req));
            prop_assert!(
                verified.is_err(),
                "{name} accepted an unsigned random request"
            );
            // And parsing, as if it had been authenticated, must not panic either.
            // Whatever an event keeps is storable as extracted: NUL-free and bounded.
            if let Ok(records) = p.parse(&req, &ParseContext { machine: &machine }) {
                for rec in records {
                    if let Record::Event(e) = rec {
                        prop_assert!(!e.metadata_json().to_string().contains("\\u0000"));
                        let mut texts = Vec::new();
                        strings(&Value::Object(e.metadata.clone()), &mut texts);
                        texts.extend(e.error_message.clone());
                        for t in texts {
                            prop_assert!(
                                !t.contains('\0') && t.len() <= MAX_TEXT_BYTES,
                                "{name}: {} bytes, NUL {}",
                                t.len(),
                                t.contains('\0')
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn token_verification_never_panics_on_any_input() {
    let keys = TokenKeys::new(vec![(1, vec![1u8; 32])]).unwrap();
    let mut r = runner();
    let input = prop_oneof![
        "\\PC{0,200}",
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)),
        // Well-formed headers with random tails: past base64, version and purpose.
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|tail| {
            let mut b = vec![1u8, 2, 1];
            b.extend_from_slice(&[0u8; 32]);
            b.extend(tail);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        }),
    ];
    r.run(&input, |t| {
        for p in [Purpose::Open, Purpose::Click, Purpose::Unsubscribe] {
            prop_assert!(
                token::verify(&keys, p, &t).is_err(),
                "a random token verified"
            );
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn the_spool_reader_never_panics_and_never_returns_garbage() {
    let dir = std::env::temp_dir().join(format!(
        "reachly-fuzz-spool-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spool-0000000000000001.log");
    let mut r = runner();
    let input = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        // A valid header claiming a length, followed by random bytes.
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..256)).prop_map(|(len, rest)| {
            let mut b = (len % 4096).to_le_bytes().to_vec();
            b.extend_from_slice(&crc32fast::hash(&rest).to_le_bytes());
            b.extend(rest);
            b
        }),
    ];
    r.run(&input, |bytes| {
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let c = reachly_ingest::pipeline::spool::read_segment(&path).unwrap();
        // Random bytes essentially never form a record with a valid CRC *and* valid JSON.
        prop_assert!(c.envelopes.iter().all(|e| e.is_empty()) || c.envelopes.is_empty());
        prop_assert!(c.torn_records <= 1);
        Ok(())
    })
    .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn client_address_parsing_never_panics() {
    let trusted = vec![
        "127.0.0.0/8".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut r = runner();
    r.run(&"[ -~]{0,120}", |xff| {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        let ip = reachly_ingest::http::client_ip(peer, &h, &trusted);
        for mode in [
            reachly_ingest::config::IpMode::Truncate,
            reachly_ingest::config::IpMode::Full,
        ] {
            prop_assert!(reachly_ingest::http::stored_ip(ip, mode).is_some());
        }
        Ok(())
    })
    .unwrap();
}

/// Every input of the committed libFuzzer corpora (`fuzz/corpus/<target>/`, seeded from the
/// fixtures and grown by `cargo fuzz` runs, findings included) replayed through the same
/// properties as the fuzz targets, on the stable toolchain, in the normal suite.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).expect("corpus file"))
        .collect()
}

#[test]
fn the_committed_fuzz_corpora_replay_cleanly() {
    let keys = TokenKeys::new(vec![(1, vec![1u8; 32])]).unwrap();
    let tokens = corpus("token");
    assert!(!tokens.is_empty());
    for input in &tokens {
        let raw = String::from_utf8_lossy(input);
        for p in [Purpose::Open, Purpose::Click, Purpose::Unsubscribe] {
            assert!(token::verify(&keys, p, &raw).is_err(), "{raw:?} verified");
        }
    }

    let trusted = vec![
        "127.0.0.0/8".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    for input in corpus("client_ip") {
        let mut h = HeaderMap::new();
        for part in input.split(|b| *b == b'\n') {
            if let Ok(v) = HeaderValue::from_bytes(part) {
                h.append("x-forwarded-for", v);
            }
        }
        let ip = reachly_ingest::http::client_ip(peer, &h, &trusted);
        assert!(
            reachly_ingest::http::stored_ip(ip, reachly_ingest::config::IpMode::Truncate).is_some()
        );
    }

    let dir = std::env::temp_dir().join(format!(
        "reachly-fuzz-corpus-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spool-0000000000000001.log");
    for input in corpus("spool") {
        std::fs::write(&path, &input).unwrap();
        let c = reachly_ingest::pipeline::spool::read_segment(&path).unwrap();
        assert!(c.torn_records <= 1);
    }
    std::fs::remove_dir_all(dir).unwrap();

    // The webhooks target: first byte = provider (sorted names), 0x80 = the right basic
    // auth, 0x40 = a form content type; the rest is the body.
    let registry = all_providers();
    let names = registry.names();
    let machine = MachineDetector::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let uri: Uri = "/webhooks/x".parse().unwrap();
    let hooks = corpus("webhooks");
    assert!(hooks.len() >= 50, "the fixtures seed the corpus");
    for input in &hooks {
        let Some((&selector, body)) = input.split_first() else {
            continue;
        };
        let name = names[usize::from(selector) % names.len()];
        let mut headers = HeaderMap::new();
        let ctype = if selector & 0x40 != 0 {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        };
        headers.insert("content-type", HeaderValue::from_static(ctype));
        let with_auth = selector & 0x80 != 0;
        if with_auth {
            headers.insert("authorization", HeaderValue::from_static("Basic dTpw"));
        }
        let req = WebhookRequest {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            body,
            received_at: Utc::now(),
            replay: reachly_ingest::webhooks::MemoryReplayStore::shared(),
        };
        let p = registry.get(name).unwrap();
        let verified = rt.block_on(p.verify(&req));
        if !(with_auth && matches!(name, "postmark" | "sparkpost")) {
            assert!(verified.is_err(), "{name} accepted an unsigned request");
        }
        let _ = p.parse(&req, &ParseContext { machine: &machine });
    }
}
