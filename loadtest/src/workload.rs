//! The request mix. Each call to [`Workload::next_request`] prepares one request with a fresh
//! request id (`rid`):
//! - open pixels (`GET /o/{token}.gif`) and click redirects (`GET /c/{token}`) with browser
//!   user agents (a small share from a mail security scanner, which the service records as
//!   machine traffic but still stores), on messages picked so that the same message is
//!   opened several times and clicks mostly follow opens; a share of the tokens is tampered
//!   with (the service must answer as for any bad token and store nothing);
//! - SendGrid signed event webhooks (a JSON array of events, ECDSA P-256 signature over
//!   timestamp + body) and Mailgun webhooks (one event, HMAC-SHA256 signature).
//!
//! The rid travels in the request so the stored rows can be traced back: at the end of the
//! user agent (` lt/<rid>`) for pixels and clicks, and in the provider's event ids
//! (`lt<rid>x<i>`) for webhook events. [`Expect`] says what the request must produce.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use reachly_ingest::token::TokenKeys;
use reachly_ingest::token::{self, Purpose};
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

use crate::seed::{Message, Tenants};

/// A small, fast, seedable PRNG (SplitMix64): reproducible mixes without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Picks from `(weight, item)` pairs.
    pub fn weighted<T: Copy>(&mut self, choices: &[(f64, T)]) -> T {
        let total: f64 = choices.iter().map(|(w, _)| w).sum();
        let mut x = self.f64() * total;
        for (w, item) in choices {
            if x < *w {
                return *item;
            }
            x -= w;
        }
        choices[choices.len() - 1].1
    }
}

/// Random bytes from the OS (through UUIDv4, as the product's `dev` does).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(Uuid::new_v4().as_bytes());
    }
    v.truncate(n);
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    Pixel,
    Click,
    Sendgrid,
    Mailgun,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Pixel, Route::Click, Route::Sendgrid, Route::Mailgun];
    pub fn name(self) -> &'static str {
        match self {
            Route::Pixel => "pixel",
            Route::Click => "click",
            Route::Sendgrid => "sendgrid",
            Route::Mailgun => "mailgun",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The shares of each kind of request, and the rest of the mix's knobs.
#[derive(Debug, Clone)]
pub struct Mix {
    pub pixel: f64,
    pub click: f64,
    pub sendgrid: f64,
    pub mailgun: f64,
    /// Share of pixel and click requests whose token is tampered with.
    pub invalid: f64,
    /// Events per SendGrid request.
    pub sendgrid_batch: usize,
    /// Share of pixel and click requests from a mail security scanner (machine traffic).
    pub scanner: f64,
}

impl Mix {
    /// Mean events per request (valid ones, as stored).
    pub fn events_per_request(&self) -> f64 {
        let total = self.pixel + self.click + self.sendgrid + self.mailgun;
        ((self.pixel + self.click) * (1.0 - self.invalid)
            + self.sendgrid * self.sendgrid_batch as f64
            + self.mailgun)
            / total
    }

    /// The same events per request, with SendGrid's in `factor` times larger, rarer batches
    /// (SendGrid posts "every 30 seconds or when the batch size reaches 768 KB": a large
    /// campaign's webhooks arrive as batches of a thousand and more).
    pub fn with_sendgrid_batches_times(&self, factor: usize) -> Mix {
        let factor = factor.max(1);
        Mix {
            sendgrid: self.sendgrid / factor as f64,
            sendgrid_batch: self.sendgrid_batch * factor,
            ..self.clone()
        }
    }

    pub fn without_webhooks(&self) -> Mix {
        Mix {
            sendgrid: 0.0,
            mailgun: 0.0,
            ..self.clone()
        }
    }

    pub fn describe(&self) -> String {
        let total = self.pixel + self.click + self.sendgrid + self.mailgun;
        let pct = |x: f64| 100.0 * x / total;
        format!(
            "pixel {:.1}%, click {:.1}%, SendGrid {:.2}% (batches of {}), Mailgun {:.1}% of requests; {:.0}% of tracking tokens tampered, {:.0}% scanner user agents; {:.2} events per request",
            pct(self.pixel),
            pct(self.click),
            pct(self.sendgrid),
            self.sendgrid_batch,
            pct(self.mailgun),
            100.0 * self.invalid,
            100.0 * self.scanner,
            self.events_per_request()
        )
    }
}

/// The secrets shared by the generator and the server under test.
pub struct Secrets {
    pub token_keys: TokenKeys,
    /// `REACHLY_TOKEN_KEYS`.
    pub token_keys_env: String,
    pub sendgrid_key: p256::ecdsa::SigningKey,
    /// `REACHLY_SENDGRID_PUBLIC_KEY`: base64 DER SubjectPublicKeyInfo.
    pub sendgrid_public_key_b64: String,
    /// `REACHLY_MAILGUN_SIGNING_KEY`.
    pub mailgun_key: String,
}

impl Secrets {
    pub fn generate() -> anyhow::Result<Secrets> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let token_keys_env = format!("1:{}", b64.encode(random_bytes(32)));
        let token_keys: TokenKeys = token_keys_env.parse().map_err(anyhow::Error::msg)?;
        let sendgrid_key = loop {
            if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&random_bytes(32)) {
                break k;
            }
        };
        let point = sendgrid_key.verifying_key().to_sec1_point(false);
        // SubjectPublicKeyInfo of an uncompressed P-256 point: fixed DER header + 65 bytes.
        let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200")?;
        spki.extend_from_slice(point.as_bytes());
        Ok(Secrets {
            token_keys,
            token_keys_env,
            sendgrid_key,
            sendgrid_public_key_b64: b64.encode(spki),
            mailgun_key: hex::encode(random_bytes(24)),
        })
    }
}

/// What a request must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Valid token: 200 (pixel) or 302 (click) and one row of `event_type`; tampered: 200
    /// (pixel) or 404 (click) and no row.
    Tracking {
        valid: bool,
        event_type: &'static str,
    },
    /// 200 and one row per event, of these types.
    Webhook {
        provider: &'static str,
        event_types: Vec<&'static str>,
    },
}

/// One request, ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub rid: u64,
    pub route: Route,
    pub post: bool,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    pub expect: Expect,
}

impl Prepared {
    /// Rows the request should produce when answered as expected.
    pub fn events(&self) -> usize {
        match &self.expect {
            Expect::Tracking { valid, .. } => usize::from(*valid),
            Expect::Webhook { event_types, .. } => event_types.len(),
        }
    }

    /// Whether `status` is the answer the request should get.
    pub fn status_ok(&self, status: u16) -> bool {
        match (&self.expect, self.route) {
            (Expect::Tracking { .. }, Route::Pixel) => status == 200,
            (Expect::Tracking { valid: true, .. }, _) => status == 302,
            (Expect::Tracking { valid: false, .. }, _) => status == 404,
            (Expect::Webhook { .. }, _) => (200..300).contains(&status),
        }
    }
}

const BROWSERS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
];
const SCANNER: &str = "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))";

/// SendGrid event kinds: (weight, SendGrid `event`, extra `type`, stored event type).
const SENDGRID_EVENTS: [(f64, &str, Option<&str>, &str); 7] = [
    (0.55, "delivered", None, "delivered"),
    (0.22, "open", None, "opened"),
    (0.10, "click", None, "clicked"),
    (0.05, "deferred", None, "deferred"),
    (0.04, "bounce", Some("bounce"), "bounced"),
    (0.02, "bounce", Some("blocked"), "bounced"),
    (0.02, "dropped", None, "dropped"),
];

/// Mailgun event kinds: (weight, Mailgun `event`, `severity`, stored event type).
const MAILGUN_EVENTS: [(f64, &str, Option<&str>, &str); 6] = [
    (0.55, "delivered", None, "delivered"),
    (0.22, "opened", None, "opened"),
    (0.10, "clicked", None, "clicked"),
    (0.05, "failed", Some("temporary"), "deferred"),
    (0.06, "failed", Some("permanent"), "bounced"),
    (0.02, "complained", None, "complained"),
];

/// Generates requests over the seeded messages.
pub struct Workload {
    tenants: Arc<Tenants>,
    secrets: Arc<Secrets>,
    mix: Mix,
    rng: Rng,
    /// Recently opened messages (repeat opens and clicks come from here).
    recent: Vec<usize>,
    recent_next: usize,
    next_rid: u64,
}

const RECENT: usize = 4096;

impl Workload {
    pub fn new(tenants: Arc<Tenants>, secrets: Arc<Secrets>, mix: Mix, seed: u64) -> Workload {
        Workload {
            tenants,
            secrets,
            mix,
            rng: Rng::new(seed),
            recent: Vec::with_capacity(RECENT),
            recent_next: 0,
            next_rid: 0,
        }
    }

    /// Requests prepared so far (rids are 0..this).
    pub fn issued(&self) -> u64 {
        self.next_rid
    }

    pub fn mix(&self) -> &Mix {
        &self.mix
    }

    /// Another mix from the next request on (request ids go on, so one ledger holds both).
    pub fn set_mix(&mut self, mix: Mix) {
        self.mix = mix;
    }

    fn pick(&mut self, repeat: f64) -> usize {
        if !self.recent.is_empty() && self.rng.f64() < repeat {
            return self.recent[self.rng.below(self.recent.len())];
        }
        let i = self.rng.below(self.tenants.messages.len());
        if self.recent.len() < RECENT {
            self.recent.push(i);
        } else {
            self.recent[self.recent_next] = i;
            self.recent_next = (self.recent_next + 1) % RECENT;
        }
        i
    }

    pub fn next_request(&mut self) -> Prepared {
        let rid = self.next_rid;
        self.next_rid += 1;
        let m = &self.mix;
        let route = self.rng.weighted(&[
            (m.pixel, Route::Pixel),
            (m.click, Route::Click),
            (m.sendgrid, Route::Sendgrid),
            (m.mailgun, Route::Mailgun),
        ]);
        match route {
            Route::Pixel | Route::Click => self.tracking(rid, route),
            Route::Sendgrid => self.sendgrid(rid),
            Route::Mailgun => self.mailgun(rid),
        }
    }

    fn link(&mut self, msg: &Message) -> String {
        let c = &self.tenants.campaigns[msg.campaign as usize];
        let domain = &self.tenants.orgs[c.org].domain;
        format!(
            "https://www.{}/p/{}/{}?utm_source=reachly&utm_campaign={}",
            domain.trim_end_matches("-customers.example").to_owned() + ".example",
            c.slug,
            self.rng.below(4),
            c.slug
        )
    }

    fn tracking(&mut self, rid: u64, route: Route) -> Prepared {
        let (purpose, repeat, event_type) = match route {
            Route::Pixel => (Purpose::Open, 0.35, "opened"),
            _ => (Purpose::Click, 0.7, "clicked"),
        };
        let idx = self.pick(repeat);
        let msg = self.tenants.messages[idx];
        let url = (purpose == Purpose::Click).then(|| self.link(&msg));
        let mut tok = token::mint(
            &self.secrets.token_keys,
            purpose,
            self.tenants.org_id(&msg),
            msg.id,
            url.as_deref(),
        )
        .expect("seeded URLs are valid http(s)");
        let valid = self.rng.f64() >= self.mix.invalid;
        if !valid {
            tamper(&mut tok, &mut self.rng);
        }
        let ua = if self.rng.f64() < self.mix.scanner {
            SCANNER
        } else {
            BROWSERS[self.rng.below(BROWSERS.len())]
        };
        let path = match route {
            Route::Pixel => format!("/o/{tok}.gif"),
            _ => format!("/c/{tok}"),
        };
        Prepared {
            rid,
            route,
            post: false,
            path,
            headers: vec![("user-agent", format!("{ua} lt/{rid}"))],
            body: Bytes::new(),
            expect: Expect::Tracking { valid, event_type },
        }
    }

    fn sendgrid(&mut self, rid: u64) -> Prepared {
        let now = chrono::Utc::now().timestamp();
        let n = self.mix.sendgrid_batch.max(1);
        let mut events = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        for i in 0..n {
            let (_, kind, subtype, stored) = SENDGRID_EVENTS[self.rng.weighted(
                &SENDGRID_EVENTS
                    .iter()
                    .enumerate()
                    .map(|(k, e)| (e.0, k))
                    .collect::<Vec<_>>(),
            )];
            let idx = self.pick(if kind == "delivered" { 0.0 } else { 0.5 });
            let msg = self.tenants.messages[idx];
            let mut e = json!({
                "email": self.tenants.email(&msg),
                "timestamp": now - self.rng.below(120) as i64,
                "event": kind,
                "sg_event_id": format!("lt{rid}x{i}"),
                "sg_message_id": format!("lt{rid}.{i}.filter0001.16648.5515E0B88.0"),
                "smtp-id": format!("<lt{rid}.{i}@ismtpd0001p1lon1.sendgrid.net>"),
                "category": ["newsletter"],
                "reachly_message_id": msg.id.to_string(),
                "reachly_organization_id": self.tenants.org_id(&msg).to_string(),
            });
            let obj = e.as_object_mut().expect("object");
            match kind {
                "open" | "click" => {
                    obj.insert(
                        "useragent".into(),
                        BROWSERS[self.rng.below(BROWSERS.len())].into(),
                    );
                    obj.insert(
                        "ip".into(),
                        format!("203.0.113.{}", self.rng.below(250)).into(),
                    );
                    if kind == "click" {
                        obj.insert("url".into(), self.link(&msg).into());
                    }
                }
                "bounce" => {
                    obj.insert("type".into(), subtype.unwrap_or("bounce").into());
                    obj.insert(
                        "status".into(),
                        if subtype == Some("blocked") {
                            "4.7.1"
                        } else {
                            "5.1.1"
                        }
                        .into(),
                    );
                    obj.insert(
                        "reason".into(),
                        "550 5.1.1 The email account that you tried to reach does not exist".into(),
                    );
                }
                "deferred" => {
                    obj.insert("response".into(), "421 4.7.0 Try again later".into());
                    obj.insert("attempt".into(), "1".into());
                }
                "dropped" => {
                    obj.insert("reason".into(), "Bounced Address".into());
                }
                _ => {}
            }
            events.push(e);
            types.push(stored);
        }
        let body = serde_json::to_vec(&Value::Array(events)).expect("JSON");
        let ts = now.to_string();
        let mut signed = Vec::with_capacity(ts.len() + body.len());
        signed.extend_from_slice(ts.as_bytes());
        signed.extend_from_slice(&body);
        use p256::ecdsa::signature::Signer as _;
        let sig: p256::ecdsa::Signature = self.secrets.sendgrid_key.sign(&signed);
        let sig_b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes());
        Prepared {
            rid,
            route: Route::Sendgrid,
            post: true,
            path: "/webhooks/sendgrid".into(),
            headers: vec![
                ("content-type", "application/json".into()),
                ("user-agent", "SendGrid Event API".into()),
                ("x-twilio-email-event-webhook-timestamp", ts),
                ("x-twilio-email-event-webhook-signature", sig_b64),
            ],
            body: Bytes::from(body),
            expect: Expect::Webhook {
                provider: "sendgrid",
                event_types: types,
            },
        }
    }

    fn mailgun(&mut self, rid: u64) -> Prepared {
        let now = chrono::Utc::now();
        let (_, kind, severity, stored) = MAILGUN_EVENTS[self.rng.weighted(
            &MAILGUN_EVENTS
                .iter()
                .enumerate()
                .map(|(k, e)| (e.0, k))
                .collect::<Vec<_>>(),
        )];
        let idx = self.pick(if kind == "delivered" { 0.0 } else { 0.5 });
        let msg = self.tenants.messages[idx];
        let ts = now.timestamp().to_string();
        let token: String = hex::encode(random_bytes(25)); // 50 characters
        let mut mac =
            <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(self.secrets.mailgun_key.as_bytes())
                .expect("HMAC takes any key");
        mac.update(ts.as_bytes());
        mac.update(token.as_bytes());
        let signature = hex::encode(mac.finalize().into_bytes());
        let mut data = json!({
            "event": kind,
            "timestamp": now.timestamp_micros() as f64 / 1e6 - self.rng.below(120) as f64,
            "id": format!("lt{rid}x0"),
            "recipient": self.tenants.email(&msg),
            "user-variables": {
                "reachly_message_id": msg.id.to_string(),
                "reachly_organization_id": self.tenants.org_id(&msg).to_string(),
            },
            "message": {"headers": {"message-id": format!("lt{rid}.{}@mg.example", msg.id.simple())}},
            "tags": ["newsletter"],
        });
        let obj = data.as_object_mut().expect("object");
        match kind {
            "opened" | "clicked" => {
                obj.insert(
                    "client-info".into(),
                    json!({"user-agent": BROWSERS[self.rng.below(BROWSERS.len())], "client-type": "browser"}),
                );
                obj.insert(
                    "ip".into(),
                    format!("198.51.100.{}", self.rng.below(250)).into(),
                );
                if kind == "clicked" {
                    obj.insert("url".into(), self.link(&msg).into());
                }
            }
            "failed" => {
                obj.insert("severity".into(), severity.unwrap_or("permanent").into());
                obj.insert(
                    "reason".into(),
                    if severity == Some("temporary") {
                        "generic"
                    } else {
                        "bounce"
                    }
                    .into(),
                );
                obj.insert(
                    "delivery-status".into(),
                    if severity == Some("temporary") {
                        json!({"code": 421, "message": "4.7.0 Try again later", "description": ""})
                    } else {
                        json!({"code": 550, "message": "5.1.1 The email account that you tried to reach does not exist", "description": ""})
                    },
                );
            }
            _ => {}
        }
        let body = json!({
            "signature": {"timestamp": ts, "token": token, "signature": signature},
            "event-data": data,
        });
        Prepared {
            rid,
            route: Route::Mailgun,
            post: true,
            path: "/webhooks/mailgun".into(),
            headers: vec![
                ("content-type", "application/json".into()),
                ("user-agent", "mailgun/treq-16.12.0".into()),
            ],
            body: Bytes::from(serde_json::to_vec(&body).expect("JSON")),
            expect: Expect::Webhook {
                provider: "mailgun",
                event_types: vec![stored],
            },
        }
    }

    /// A signed SendGrid request with no events: 200 when the provider is there, 404 when
    /// it is not configured or not implemented.
    pub fn sendgrid_probe(&self) -> Prepared {
        let ts = chrono::Utc::now().timestamp().to_string();
        let body = b"[]".to_vec();
        let mut signed = ts.as_bytes().to_vec();
        signed.extend_from_slice(&body);
        use p256::ecdsa::signature::Signer as _;
        let sig: p256::ecdsa::Signature = self.secrets.sendgrid_key.sign(&signed);
        Prepared {
            rid: u64::MAX,
            route: Route::Sendgrid,
            post: true,
            path: "/webhooks/sendgrid".into(),
            headers: vec![
                ("content-type", "application/json".into()),
                ("x-twilio-email-event-webhook-timestamp", ts),
                (
                    "x-twilio-email-event-webhook-signature",
                    base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
                ),
            ],
            body: Bytes::from(body),
            expect: Expect::Webhook {
                provider: "sendgrid",
                event_types: vec![],
            },
        }
    }

    /// A Mailgun request with a bad signature: 401 when the provider is there, 404 when not.
    pub fn mailgun_probe(&self) -> Prepared {
        let body = json!({"signature": {"timestamp": chrono::Utc::now().timestamp().to_string(), "token": "x".repeat(50), "signature": "00"}, "event-data": {}});
        Prepared {
            rid: u64::MAX,
            route: Route::Mailgun,
            post: true,
            path: "/webhooks/mailgun".into(),
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(serde_json::to_vec(&body).expect("JSON")),
            expect: Expect::Webhook {
                provider: "mailgun",
                event_types: vec![],
            },
        }
    }
}

/// Changes one character of the signed part, so the MAC no longer matches.
fn tamper(tok: &mut String, rng: &mut Rng) {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = std::mem::take(tok).into_bytes();
    let i = 4 + rng.below(bytes.len().saturating_sub(30).max(1));
    let old = bytes[i];
    let mut new = ALPHABET[rng.below(ALPHABET.len())];
    while new == old {
        new = ALPHABET[rng.below(ALPHABET.len())];
    }
    bytes[i] = new;
    *tok = String::from_utf8(bytes).expect("base64url is ASCII");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::{Campaign, Org};

    fn tenants() -> Arc<Tenants> {
        let org = Org {
            id: Uuid::now_v7(),
            domain: "acme-customers.example".into(),
        };
        let messages = (0..100)
            .map(|i| Message {
                id: Uuid::now_v7(),
                org: 0,
                campaign: 0,
                contact: i,
            })
            .collect();
        Arc::new(Tenants {
            orgs: vec![org],
            campaigns: vec![Campaign {
                id: Uuid::now_v7(),
                org: 0,
                slug: "acme-c0".into(),
            }],
            messages,
            contacts: 100,
        })
    }

    #[test]
    fn valid_tokens_verify_and_tampered_ones_do_not() {
        let secrets = Arc::new(Secrets::generate().unwrap());
        let mix = Mix {
            pixel: 1.0,
            click: 1.0,
            sendgrid: 0.0,
            mailgun: 0.0,
            invalid: 0.3,
            sendgrid_batch: 1,
            scanner: 0.0,
        };
        let mut w = Workload::new(tenants(), secrets.clone(), mix, 7);
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..500 {
            let p = w.next_request();
            let (purpose, tok) = match p.route {
                Route::Pixel => (
                    Purpose::Open,
                    p.path.trim_start_matches("/o/").trim_end_matches(".gif"),
                ),
                _ => (Purpose::Click, p.path.trim_start_matches("/c/")),
            };
            let ok = token::verify(&secrets.token_keys, purpose, tok).is_ok();
            match p.expect {
                Expect::Tracking { valid: true, .. } => {
                    assert!(ok);
                    valid += 1
                }
                _ => {
                    assert!(!ok, "tampered token verified: {tok}");
                    invalid += 1
                }
            }
            let ua = &p.headers[0].1;
            assert!(ua.ends_with(&format!(" lt/{}", p.rid)));
            assert!(
                reachly_ingest::machine::MachineDetector::default()
                    .classify(false, Some(ua))
                    .is_none()
            );
        }
        assert!(valid > 250 && invalid > 100, "{valid} {invalid}");
    }

    #[test]
    fn webhooks_are_signed() {
        use p256::ecdsa::signature::Verifier as _;
        let secrets = Arc::new(Secrets::generate().unwrap());
        let mix = Mix {
            pixel: 0.0,
            click: 0.0,
            sendgrid: 1.0,
            mailgun: 1.0,
            invalid: 0.0,
            sendgrid_batch: 10,
            scanner: 0.0,
        };
        let mut w = Workload::new(tenants(), secrets.clone(), mix, 9);
        for _ in 0..20 {
            let p = w.next_request();
            let h = |name: &str| {
                p.headers
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            };
            match p.route {
                Route::Sendgrid => {
                    let ts = h("x-twilio-email-event-webhook-timestamp").unwrap();
                    let sig = base64::engine::general_purpose::STANDARD
                        .decode(h("x-twilio-email-event-webhook-signature").unwrap())
                        .unwrap();
                    let sig = p256::ecdsa::Signature::from_der(&sig).unwrap();
                    let der = base64::engine::general_purpose::STANDARD
                        .decode(&secrets.sendgrid_public_key_b64)
                        .unwrap();
                    use p256::pkcs8::DecodePublicKey as _;
                    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&der).unwrap();
                    let mut msg = ts.into_bytes();
                    msg.extend_from_slice(&p.body);
                    vk.verify(&msg, &sig).unwrap();
                    let v: Value = serde_json::from_slice(&p.body).unwrap();
                    assert_eq!(v.as_array().unwrap().len(), 10);
                }
                _ => {
                    let v: Value = serde_json::from_slice(&p.body).unwrap();
                    let s = &v["signature"];
                    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(
                        secrets.mailgun_key.as_bytes(),
                    )
                    .unwrap();
                    mac.update(s["timestamp"].as_str().unwrap().as_bytes());
                    mac.update(s["token"].as_str().unwrap().as_bytes());
                    assert_eq!(
                        hex::encode(mac.finalize().into_bytes()),
                        s["signature"].as_str().unwrap()
                    );
                    assert_eq!(s["token"].as_str().unwrap().len(), 50);
                }
            }
        }
    }
}
