//! Every provider's verify and parse on arbitrary requests. The first byte picks the
//! provider and which credentials the request carries (none, or the right basic auth so
//! Postmark and SparkPost reach their parsers through verify); the rest is the body.
//! Verify must refuse everything unsigned (basic auth aside) and nothing may panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use reachly_ingest::config::{Secret, ServeArgs};
use reachly_ingest::machine::MachineDetector;
use reachly_ingest::webhooks::{BoxFuture, HttpsGet, ParseContext, Registry, WebhookRequest};

struct NoNetwork;
impl HttpsGet for NoNetwork {
    fn get<'a>(&'a self, _url: &'a url::Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async { Err("no network while fuzzing".into()) })
    }
}

struct World {
    registry: Registry,
    names: Vec<String>,
    machine: MachineDetector,
    rt: tokio::runtime::Runtime,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        use p256::pkcs8::EncodePublicKey as _;
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).expect("valid scalar");
        let der = secret.public_key().to_public_key_der().expect("der");
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut args = ServeArgs::from_argv(["serve", "--database-url", "host=localhost"]);
        let w = &mut args.webhooks;
        w.sendgrid_public_key = Some(Secret::new(b64(der.as_bytes())));
        w.mailgun_signing_key = Some(Secret::new("key-fuzz"));
        w.ses_topic_arns = vec!["arn:aws:sns:us-east-1:123456789012:reachly".into()];
        w.postmark_basic_auth = Some(Secret::new("u:p"));
        w.sparkpost_basic_auth = Some(Secret::new("u:p"));
        w.mandrill_webhook_key = Some(Secret::new("mandrill-key"));
        w.mandrill_webhook_url = Some("https://t.example.com/webhooks/mandrill".into());
        w.resend_webhook_secret = Some(Secret::new(format!("whsec_{}", b64(&[9u8; 24]))));
        let registry =
            Registry::from_config(&args.webhooks, Arc::new(NoNetwork)).expect("providers");
        let names = registry.names().iter().map(|n| n.to_string()).collect();
        World {
            registry,
            names,
            machine: MachineDetector::default(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let w = world();
    let name = &w.names[usize::from(selector) % w.names.len()];
    let with_auth = selector & 0x80 != 0;
    let mut headers = HeaderMap::new();
    let ctype = if selector & 0x40 != 0 {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    headers.insert("content-type", HeaderValue::from_static(ctype));
    if with_auth {
        headers.insert("authorization", HeaderValue::from_static("Basic dTpw"));
    }
    let uri: Uri = "/webhooks/x".parse().expect("uri");
    let req = WebhookRequest {
        method: &Method::POST,
        uri: &uri,
        headers: &headers,
        body,
        received_at: chrono::Utc::now(),
    };
    let p = w.registry.get(name).expect("configured");
    let verified = w.rt.block_on(p.verify(&req));
    let basic_auth = matches!(name.as_str(), "postmark" | "sparkpost");
    if !(with_auth && basic_auth) {
        assert!(verified.is_err(), "{name} accepted an unsigned request");
    }
    let _ = p.parse(&req, &ParseContext { machine: &w.machine });
});
