//! Amazon SES through Amazon SNS (`POST /webhooks/ses`): this module owns the verification of
//! SNS HTTP(S) messages (signature version 1 = SHA1withRSA, 2 = SHA256withRSA, PKCS#1 v1.5,
//! with the certificate named by `SigningCertURL`), the allowlists that decide what is ever
//! fetched, the confirmation of SNS subscriptions, and the mapping of both SES message shapes
//! (feedback notifications with `notificationType`, event publishing with `eventType`) to
//! SPEC.md's events.
//!
//! Documentation this follows:
//! - <https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html> and
//!   <https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message-verify-message-signature.html>
//!   (string to sign: `Message`, `MessageId`, `Subject` if present, `Timestamp`, `TopicArn`,
//!   `Type` for notifications; `Message`, `MessageId`, `SubscribeURL`, `Timestamp`, `Token`,
//!   `TopicArn`, `Type` for (un)subscribe confirmations; each name and value followed by `\n`)
//! - <https://docs.aws.amazon.com/sns/latest/dg/http-subscription-confirmation-json.html>,
//!   <https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html>,
//!   <https://docs.aws.amazon.com/sns/latest/dg/http-unsubscribe-confirmation-json.html>
//! - <https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html> and
//!   <https://docs.aws.amazon.com/ses/latest/dg/notification-examples.html> (Bounce, Complaint,
//!   Delivery notifications)
//! - <https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-contents.html>
//!   and <https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-examples.html>
//!   (Send, Reject, Bounce, Complaint, Delivery, Open, Click, Rendering Failure,
//!   DeliveryDelay, Subscription records)
//!
//! Verification fails closed and makes no outbound request unless everything checkable
//! locally passed, in this order: content type; the body is an SNS JSON message of a known
//! `Type`; `TopicArn` is in `REACHLY_SES_TOPIC_ARNS`; `SignatureVersion` is 1 or 2;
//! `SigningCertURL` is `https://sns.<region>.amazonaws.com/<name>.pem` with `<region>` the
//! topic's region (no user info, port, query or fragment); a signature is present and base64;
//! the signed fields are present; `Timestamp` is within [`TIMESTAMP_TOLERANCE_SECS`] of the
//! request's arrival; for a subscription confirmation, `SubscribeURL` is
//! `https://sns.<region>.amazonaws.com/?Action=ConfirmSubscription&...` for the same topic.
//! Only then is the certificate fetched through [`HttpsGet`] (cached by URL, at most
//! [`CERT_CACHE_MAX`] entries; a failed fetch is 503 so SNS retries) and the signature checked.
//!
//! Mapping (`eventType` or `notificationType`): Send → sent (at `mail.timestamp`), Delivery →
//! delivered, Bounce → bounced (`bounceType` Permanent → hard; Transient, Undetermined → soft),
//! Complaint → complained, DeliveryDelay → deferred, Reject → dropped, Rendering Failure →
//! dropped (SES never sent it), Open → opened, Click → clicked, Subscription with
//! `newTopicPreferences.unsubscribeAll` → unsubscribed (other preference changes are
//! dead-lettered as `unmapped_subscription_change`). `AmazonSnsSubscriptionSucceeded` (SES's
//! notice that a topic was wired up) yields nothing. Anything else is dead-lettered as
//! `unknown_event_type`; an authenticated notification whose `Message` is not a JSON object
//! as `unparseable_message`. The dedup key is the SNS `MessageId` (stable across SNS
//! retries), suffixed `#<index>` when one notification carries several recipients
//! (bounce, complaint, delivery, delay recipient lists), so they do not collide.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;
use uuid::Uuid;

use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
    correlate, dead_letter, esp_event, header_message_id, id_key, rfc3339,
};
use crate::config::WebhookConfig;
use crate::event::{BounceClass, Event, EventType, Record, Source};
use crate::machine::MachineDetector;

/// How far an SNS `Timestamp` may be from the request's arrival, either way. SNS keeps the
/// original timestamp on retries; its default HTTP delivery policy retries within a minute and
/// a custom policy's retries are bounded in time too, while a captured message replayed later
/// is refused.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 60 * 60;

/// Signing certificates kept in memory (SNS uses a handful per region at a time).
pub const CERT_CACHE_MAX: usize = 32;

pub struct Ses {
    topics: Vec<String>,
    https: Arc<dyn HttpsGet>,
    certs: Mutex<CertCache>,
}

/// The provider if at least one topic ARN is configured.
pub fn from_config(
    cfg: &WebhookConfig,
    https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    let topics: Vec<String> = cfg
        .ses_topic_arns
        .iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if topics.is_empty() {
        return Ok(None);
    }
    for t in &topics {
        if topic_region(t).is_none() {
            return Err(format!(
                "REACHLY_SES_TOPIC_ARNS: {t:?} is not an SNS topic ARN (arn:aws:sns:<region>:<account>:<topic>)"
            ));
        }
    }
    Ok(Some(Arc::new(Ses::new(topics, Arc::clone(https)))))
}

// ---- the SNS message ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Notification,
    SubscriptionConfirmation,
    UnsubscribeConfirmation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignatureVersion {
    Sha1,
    Sha256,
}

/// The JSON document SNS posts. Every field is a string (or null/absent).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope {
    #[serde(rename = "Type")]
    kind: String,
    message_id: Option<String>,
    topic_arn: Option<String>,
    subject: Option<String>,
    message: Option<String>,
    timestamp: Option<String>,
    signature_version: Option<String>,
    signature: Option<String>,
    #[serde(rename = "SigningCertURL")]
    signing_cert_url: Option<String>,
    #[serde(rename = "SubscribeURL")]
    subscribe_url: Option<String>,
    token: Option<String>,
}

/// What verification established without the network.
struct Checked {
    envelope: Envelope,
    cert_url: Url,
    /// Set for a subscription confirmation: the allowlisted URL to visit.
    subscribe_url: Option<Url>,
    string_to_sign: String,
    signature: Vec<u8>,
    version: SignatureVersion,
}

fn envelope(req: &WebhookRequest<'_>) -> Result<(Envelope, Kind), WebhookError> {
    let env: Envelope = serde_json::from_slice(req.body)
        .map_err(|e| WebhookError::BadRequest(format!("not an SNS message: {e}")))?;
    let kind = match env.kind.as_str() {
        "Notification" => Kind::Notification,
        "SubscriptionConfirmation" => Kind::SubscriptionConfirmation,
        "UnsubscribeConfirmation" => Kind::UnsubscribeConfirmation,
        other => {
            return Err(WebhookError::BadRequest(format!(
                "unknown SNS message type {other:?}"
            )));
        }
    };
    Ok((env, kind))
}

/// SNS posts `text/plain; charset=UTF-8`; JSON types and an absent header are tolerated.
fn require_sns_content_type(req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
    match req.header("content-type").map(str::to_ascii_lowercase) {
        None => Ok(()),
        Some(ct) if ct.starts_with("text/plain") || ct.contains("json") => Ok(()),
        Some(ct) => Err(WebhookError::UnsupportedMediaType(format!(
            "expected text/plain (an SNS message), got {ct}"
        ))),
    }
}

/// The canonical string SNS signs, or the name of a missing field.
fn string_to_sign(env: &Envelope, kind: Kind) -> Result<String, &'static str> {
    fn field<'a>(v: &'a Option<String>, name: &'static str) -> Result<&'a str, &'static str> {
        v.as_deref().ok_or(name)
    }
    let mut fields: Vec<(&str, &str)> = vec![
        ("Message", field(&env.message, "Message")?),
        ("MessageId", field(&env.message_id, "MessageId")?),
    ];
    match kind {
        Kind::Notification => {
            if let Some(subject) = env.subject.as_deref() {
                fields.push(("Subject", subject));
            }
            fields.push(("Timestamp", field(&env.timestamp, "Timestamp")?));
        }
        Kind::SubscriptionConfirmation | Kind::UnsubscribeConfirmation => {
            fields.push(("SubscribeURL", field(&env.subscribe_url, "SubscribeURL")?));
            fields.push(("Timestamp", field(&env.timestamp, "Timestamp")?));
            fields.push(("Token", field(&env.token, "Token")?));
        }
    }
    fields.push(("TopicArn", field(&env.topic_arn, "TopicArn")?));
    fields.push(("Type", env.kind.as_str()));
    let mut s = String::new();
    for (name, value) in fields {
        s.push_str(name);
        s.push('\n');
        s.push_str(value);
        s.push('\n');
    }
    Ok(s)
}

// ---- allowlists ----

/// A region name of AWS's shape: `us-east-1`, `eu-central-1`, `us-gov-west-1`.
fn plausible_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    let Some((last, rest)) = parts.split_last() else {
        return false;
    };
    let Some((first, middle)) = rest.split_first() else {
        return false;
    };
    r.len() <= 24
        && (1..=3).contains(&middle.len())
        && first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && middle
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && (1..=2).contains(&last.len())
        && last.bytes().all(|b| b.is_ascii_digit())
}

/// The region of `arn:<partition>:sns:<region>:<account>:<topic>`.
fn topic_region(arn: &str) -> Option<&str> {
    let parts: Vec<&str> = arn.split(':').collect();
    match parts.as_slice() {
        ["arn", partition, "sns", region, account, topic]
            if partition.starts_with("aws")
                && plausible_region(region)
                && account.len() == 12
                && account.bytes().all(|b| b.is_ascii_digit())
                && !topic.is_empty() =>
        {
            Some(region)
        }
        _ => None,
    }
}

/// `https://sns.<region>.amazonaws.com` with nothing unusual: no user info, no explicit port,
/// no fragment. The path and query are checked by the callers.
fn sns_url(raw: &str, region: &str) -> Option<Url> {
    let url = Url::parse(raw).ok()?;
    let host = format!("sns.{region}.amazonaws.com");
    (url.scheme() == "https"
        && url.username().is_empty()
        && url.password().is_none()
        && url.port().is_none()
        && url.fragment().is_none()
        && url.host_str() == Some(host.as_str()))
    .then_some(url)
}

/// The signing certificate's URL: one path segment ending `.pem`, no query, and already in
/// canonical form (nothing for the URL parser to resolve, such as `%2e%2e` or `:443`).
fn certificate_url(raw: &str, region: &str) -> Option<Url> {
    let url = sns_url(raw, region)?;
    let name = url.path().strip_prefix('/')?;
    let ok = url.as_str() == raw
        && url.query().is_none()
        && name.len() > ".pem".len()
        && name.ends_with(".pem")
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(url)
}

/// The subscription confirmation link: `/?Action=ConfirmSubscription&TopicArn=<topic>&Token=...`.
fn subscribe_url(raw: &str, region: &str, topic: &str) -> Option<Url> {
    let url = sns_url(raw, region)?;
    if url.path() != "/" {
        return None;
    }
    let mut action = Vec::new();
    let mut topics = Vec::new();
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "Action" => action.push(v),
            "TopicArn" => topics.push(v),
            _ => {}
        }
    }
    let ok = action.len() == 1
        && action[0] == "ConfirmSubscription"
        && topics.len() <= 1
        && topics.iter().all(|t| t == topic);
    ok.then_some(url)
}

// ---- certificates ----

struct CachedCert {
    key: rsa::PublicKey,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
}

#[derive(Default)]
struct CertCache {
    by_url: HashMap<String, Arc<CachedCert>>,
    order: VecDeque<String>,
}

impl CertCache {
    fn get(&self, url: &str) -> Option<Arc<CachedCert>> {
        self.by_url.get(url).cloned()
    }

    fn insert(&mut self, url: String, cert: Arc<CachedCert>) {
        if self.by_url.insert(url.clone(), cert).is_none() {
            self.order.push_back(url);
        }
        while self.order.len() > CERT_CACHE_MAX {
            if let Some(oldest) = self.order.pop_front() {
                self.by_url.remove(&oldest);
            }
        }
    }
}

fn to_utc(t: x509_cert::time::Time) -> Option<DateTime<Utc>> {
    let d = t.to_unix_duration();
    DateTime::from_timestamp(i64::try_from(d.as_secs()).ok()?, d.subsec_nanos())
}

/// The RSA key and validity of the first certificate of a PEM file.
fn parse_certificate(pem: &[u8]) -> Result<CachedCert, AuthFailure> {
    use rsa::pkcs8::DecodePublicKey as _;
    use x509_cert::der::Encode as _;
    let chain =
        x509_cert::Certificate::load_pem_chain(pem).map_err(|_| AuthFailure::BadCertificate)?;
    let cert = chain.first().ok_or(AuthFailure::BadCertificate)?;
    let tbs = cert.tbs_certificate();
    let spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|_| AuthFailure::BadCertificate)?;
    let key =
        rsa::PublicKey::from_public_key_der(&spki).map_err(|_| AuthFailure::BadCertificate)?;
    let validity = tbs.validity();
    Ok(CachedCert {
        key,
        not_before: to_utc(validity.not_before).ok_or(AuthFailure::BadCertificate)?,
        not_after: to_utc(validity.not_after).ok_or(AuthFailure::BadCertificate)?,
    })
}

// ---- the provider ----

impl Ses {
    fn new(topics: Vec<String>, https: Arc<dyn HttpsGet>) -> Ses {
        Ses {
            topics,
            https,
            certs: Mutex::new(CertCache::default()),
        }
    }

    /// Everything that can be decided without the network, in the documented order.
    fn check_locally(&self, req: &WebhookRequest<'_>) -> Result<Checked, WebhookError> {
        require_sns_content_type(req)?;
        let (envelope, kind) = envelope(req)?;
        let topic = envelope
            .topic_arn
            .as_deref()
            .filter(|t| self.topics.iter().any(|allowed| allowed == t))
            .ok_or(WebhookError::Unauthorized(AuthFailure::TopicNotAllowed))?;
        let version = match envelope.signature_version.as_deref() {
            Some("1") => SignatureVersion::Sha1,
            Some("2") => SignatureVersion::Sha256,
            _ => {
                return Err(WebhookError::Unauthorized(
                    AuthFailure::UnsupportedSignatureVersion,
                ));
            }
        };
        let region =
            topic_region(topic).ok_or(WebhookError::Unauthorized(AuthFailure::TopicNotAllowed))?;
        let cert_url = envelope
            .signing_cert_url
            .as_deref()
            .and_then(|u| certificate_url(u, region))
            .ok_or(WebhookError::Unauthorized(
                AuthFailure::CertificateUrlNotAllowed,
            ))?;
        let signature = envelope
            .signature
            .as_deref()
            .ok_or(WebhookError::Unauthorized(AuthFailure::MissingSignature))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| WebhookError::Unauthorized(AuthFailure::BadSignature))?;
        let string_to_sign = string_to_sign(&envelope, kind)
            .map_err(|field| WebhookError::BadRequest(format!("SNS message without {field}")))?;
        let sent_at = envelope
            .timestamp
            .as_deref()
            .and_then(rfc3339)
            .ok_or(WebhookError::Unauthorized(AuthFailure::BadTimestamp))?;
        if (req.received_at - sent_at).num_seconds().abs() > TIMESTAMP_TOLERANCE_SECS {
            return Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp));
        }
        let subscribe_url = match kind {
            Kind::SubscriptionConfirmation => Some(
                envelope
                    .subscribe_url
                    .as_deref()
                    .and_then(|u| subscribe_url(u, region, topic))
                    .ok_or(WebhookError::Unauthorized(
                        AuthFailure::SubscribeUrlNotAllowed,
                    ))?,
            ),
            _ => None,
        };
        Ok(Checked {
            envelope,
            cert_url,
            subscribe_url,
            string_to_sign,
            signature,
            version,
        })
    }

    /// The signing key of an allowlisted certificate URL: cached, else fetched.
    async fn signing_key(
        &self,
        url: &Url,
        now: DateTime<Utc>,
    ) -> Result<Arc<CachedCert>, WebhookError> {
        let cached = self
            .certs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(url.as_str());
        let cert = match cached {
            Some(c) => c,
            None => {
                let pem = self.https.get(url).await.map_err(|e| {
                    WebhookError::Unavailable(format!(
                        "cannot fetch the SNS signing certificate: {e}"
                    ))
                })?;
                let cert = Arc::new(parse_certificate(&pem).map_err(WebhookError::Unauthorized)?);
                self.certs
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(url.as_str().to_owned(), Arc::clone(&cert));
                cert
            }
        };
        if now < cert.not_before || now > cert.not_after {
            return Err(WebhookError::Unauthorized(AuthFailure::CertificateExpired));
        }
        Ok(cert)
    }

    /// The full verification: local checks, then the certificate, then the signature.
    async fn authenticate(&self, req: &WebhookRequest<'_>) -> Result<Checked, WebhookError> {
        let checked = self.check_locally(req)?;
        let cert = self.signing_key(&checked.cert_url, req.received_at).await?;
        let msg = checked.string_to_sign.as_bytes();
        let verified = match checked.version {
            SignatureVersion::Sha1 => cert
                .key
                .pkcs1v15_verify::<sha1::Sha1>(msg, &checked.signature),
            SignatureVersion::Sha256 => cert
                .key
                .pkcs1v15_verify::<sha2::Sha256>(msg, &checked.signature),
        };
        verified.map_err(|_| WebhookError::Unauthorized(AuthFailure::BadSignature))?;
        Ok(checked)
    }
}

impl Provider for Ses {
    fn source(&self) -> Source {
        Source::Ses
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        Box::pin(async move { self.authenticate(req).await.map(|_| ()) })
    }

    /// Confirms a subscription by visiting its `SubscribeURL`. The message is authenticated
    /// again here (the certificate is cached by then), so the GET can only follow a verified
    /// signature whatever the caller did.
    fn after_verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        Box::pin(async move {
            if !matches!(envelope(req), Ok((_, Kind::SubscriptionConfirmation))) {
                return Ok(());
            }
            let checked = self.authenticate(req).await?;
            let Some(url) = checked.subscribe_url else {
                return Err(WebhookError::Unauthorized(
                    AuthFailure::SubscribeUrlNotAllowed,
                ));
            };
            self.https.get(&url).await.map_err(|e| {
                WebhookError::Unavailable(format!("cannot confirm the SNS subscription: {e}"))
            })?;
            tracing::info!(
                topic = checked.envelope.topic_arn.as_deref().unwrap_or_default(),
                "SNS subscription confirmed"
            );
            Ok(())
        })
    }

    fn parse(
        &self,
        req: &WebhookRequest<'_>,
        ctx: &ParseContext<'_>,
    ) -> Result<Vec<Record>, WebhookError> {
        let (env, kind) = envelope(req)?;
        if kind != Kind::Notification {
            return Ok(Vec::new());
        }
        let (Some(sns_id), Some(message)) = (env.message_id.as_deref(), env.message.as_deref())
        else {
            return Err(WebhookError::BadRequest(
                "SNS notification without MessageId or Message".into(),
            ));
        };
        let key = id_key(Source::Ses, sns_id);
        let Some(obj) = serde_json::from_str::<Value>(message)
            .ok()
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
        else {
            return Ok(vec![dead_letter(
                Source::Ses,
                "unparseable_message",
                message,
                Some(key),
                None,
            )]);
        };
        let fallback_time = env
            .timestamp
            .as_deref()
            .and_then(rfc3339)
            .unwrap_or(req.received_at);
        Ok(map_message(
            &obj,
            message,
            sns_id,
            key,
            fallback_time,
            ctx.machine,
        ))
    }
}

// ---- mapping ----

fn obj_at<'a>(obj: Option<&'a Map<String, Value>>, field: &str) -> Option<&'a Map<String, Value>> {
    obj?.get(field)?.as_object()
}

fn str_at<'a>(obj: Option<&'a Map<String, Value>>, field: &str) -> Option<&'a str> {
    obj?.get(field)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `mail.tags[name]`: event publishing gives an array of strings per tag.
fn mail_tag<'a>(mail: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a str> {
    match obj_at(mail, "tags")?.get(name)? {
        Value::Array(values) => values.iter().find_map(Value::as_str),
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// `X-Reachly-Message-Id` among the original headers (when SES was told to include them).
fn mail_header(mail: Option<&Map<String, Value>>) -> Option<&str> {
    let headers = mail?.get("headers")?.as_array()?;
    header_message_id(headers.iter().filter_map(|h| {
        let h = h.as_object()?;
        Some((h.get("name")?.as_str()?, h.get("value")?.as_str()?))
    }))
}

/// What every event of one SES message shares.
struct Common<'a> {
    kind: &'a str,
    key: String,
    message_id: Uuid,
    org_id: Option<Uuid>,
    mail: Option<&'a Map<String, Value>>,
    sns_id: &'a str,
    fallback_time: DateTime<Utc>,
}

impl Common<'_> {
    /// One event; `index` numbers it among `count` per-recipient events of the message.
    fn event(&self, event_type: EventType, at: Option<&str>, index: usize, count: usize) -> Event {
        let occurred_at = at
            .and_then(rfc3339)
            .or_else(|| str_at(self.mail, "timestamp").and_then(rfc3339))
            .unwrap_or(self.fallback_time);
        let key = if count > 1 {
            format!("{}#{index}", self.key)
        } else {
            self.key.clone()
        };
        let mut e = esp_event(
            Source::Ses,
            self.message_id,
            self.org_id,
            event_type,
            occurred_at,
            key,
        );
        e.metadata
            .insert("ses_event_type".into(), Value::from(self.kind));
        e.metadata
            .insert("sns_message_id".into(), Value::from(self.sns_id));
        if let Some(id) = str_at(self.mail, "messageId") {
            e.metadata.insert("ses_message_id".into(), Value::from(id));
        }
        e
    }
}

/// The recipients list of a bounce, complaint, delivery or delay (at least one slot, so a
/// message without a list still gives one event).
fn recipients<'a>(detail: Option<&'a Map<String, Value>>, field: &str) -> Vec<Option<&'a Value>> {
    match detail.and_then(|d| d.get(field)).and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.iter().map(Some).collect(),
        _ => vec![None],
    }
}

fn insert_str(e: &mut Event, name: &str, value: Option<&str>) {
    if let Some(v) = value {
        e.metadata.insert(name.into(), Value::from(v));
    }
}

fn map_message(
    obj: &Map<String, Value>,
    raw: &str,
    sns_id: &str,
    key: String,
    fallback_time: DateTime<Utc>,
    machine: &MachineDetector,
) -> Vec<Record> {
    let Some(kind) =
        str_at(Some(obj), "eventType").or_else(|| str_at(Some(obj), "notificationType"))
    else {
        return vec![dead_letter(
            Source::Ses,
            "unknown_event_type",
            raw,
            Some(key),
            None,
        )];
    };
    if kind == "AmazonSnsSubscriptionSucceeded" {
        tracing::info!("SES reports its SNS topic is wired up");
        return Vec::new();
    }
    let known = matches!(
        kind,
        "Send"
            | "Delivery"
            | "Bounce"
            | "Complaint"
            | "Reject"
            | "Open"
            | "Click"
            | "DeliveryDelay"
            | "Rendering Failure"
            | "RenderingFailure"
            | "Subscription"
    );
    if !known {
        return vec![dead_letter(
            Source::Ses,
            "unknown_event_type",
            raw,
            Some(key),
            Some(kind),
        )];
    }
    let mail = obj_at(Some(obj), "mail");
    let (message_id, org_id) = match correlate(
        mail_tag(mail, "reachly_message_id").or_else(|| mail_header(mail)),
        mail_tag(mail, "reachly_organization_id"),
    ) {
        Ok(ids) => ids,
        Err(reason) => return vec![dead_letter(Source::Ses, reason, raw, Some(key), Some(kind))],
    };
    let common = Common {
        kind,
        key,
        message_id,
        org_id,
        mail,
        sns_id,
        fallback_time,
    };
    let mut out = Vec::new();
    match kind {
        "Send" => out.push(common.event(EventType::Sent, None, 0, 1)),
        "Delivery" => {
            let d = obj_at(Some(obj), "delivery");
            let list = recipients(d, "recipients");
            for (i, _) in list.iter().enumerate() {
                let mut e =
                    common.event(EventType::Delivered, str_at(d, "timestamp"), i, list.len());
                insert_str(&mut e, "smtp_response", str_at(d, "smtpResponse"));
                insert_str(&mut e, "reporting_mta", str_at(d, "reportingMTA"));
                out.push(e);
            }
        }
        "Bounce" => {
            let b = obj_at(Some(obj), "bounce");
            let bounce_type = str_at(b, "bounceType");
            let sub_type = str_at(b, "bounceSubType");
            let list = recipients(b, "bouncedRecipients");
            for (i, r) in list.iter().enumerate() {
                let r = r.and_then(Value::as_object);
                let mut e = common.event(EventType::Bounced, str_at(b, "timestamp"), i, list.len());
                e.bounce_class = Some(if bounce_type == Some("Permanent") {
                    BounceClass::Hard
                } else {
                    BounceClass::Soft
                });
                let diagnostic = str_at(r, "diagnosticCode");
                insert_str(&mut e, "bounce_type", bounce_type);
                insert_str(&mut e, "bounce_sub_type", sub_type);
                insert_str(&mut e, "diagnostic_code", diagnostic);
                insert_str(&mut e, "status", str_at(r, "status"));
                insert_str(&mut e, "action", str_at(r, "action"));
                insert_str(&mut e, "feedback_id", str_at(b, "feedbackId"));
                insert_str(&mut e, "reporting_mta", str_at(b, "reportingMTA"));
                e.error_message = Some(match diagnostic {
                    Some(d) => d.to_owned(),
                    None => format!(
                        "{} bounce ({})",
                        bounce_type.unwrap_or("Undetermined"),
                        sub_type.unwrap_or("no sub-type")
                    ),
                });
                out.push(e);
            }
        }
        "Complaint" => {
            let c = obj_at(Some(obj), "complaint");
            let list = recipients(c, "complainedRecipients");
            for (i, _) in list.iter().enumerate() {
                let mut e =
                    common.event(EventType::Complained, str_at(c, "timestamp"), i, list.len());
                insert_str(
                    &mut e,
                    "complaint_feedback_type",
                    str_at(c, "complaintFeedbackType"),
                );
                insert_str(&mut e, "complaint_sub_type", str_at(c, "complaintSubType"));
                insert_str(&mut e, "feedback_id", str_at(c, "feedbackId"));
                // The feedback loop's agent, not a person's browser: metadata only.
                insert_str(&mut e, "feedback_user_agent", str_at(c, "userAgent"));
                out.push(e);
            }
        }
        "DeliveryDelay" => {
            let d = obj_at(Some(obj), "deliveryDelay");
            let delay_type = str_at(d, "delayType");
            let list = recipients(d, "delayedRecipients");
            for (i, r) in list.iter().enumerate() {
                let r = r.and_then(Value::as_object);
                let mut e =
                    common.event(EventType::Deferred, str_at(d, "timestamp"), i, list.len());
                let diagnostic = str_at(r, "diagnosticCode");
                insert_str(&mut e, "delay_type", delay_type);
                insert_str(&mut e, "diagnostic_code", diagnostic);
                insert_str(&mut e, "status", str_at(r, "status"));
                insert_str(&mut e, "expiration_time", str_at(d, "expirationTime"));
                e.error_message = Some(
                    diagnostic
                        .or(delay_type)
                        .unwrap_or("delivery delayed")
                        .to_owned(),
                );
                out.push(e);
            }
        }
        "Reject" => {
            let reason = str_at(obj_at(Some(obj), "reject"), "reason");
            let mut e = common.event(EventType::Dropped, None, 0, 1);
            insert_str(&mut e, "reason", reason);
            e.error_message = Some(match reason {
                Some(r) => format!("rejected by SES: {r}"),
                None => "rejected by SES".to_owned(),
            });
            out.push(e);
        }
        "Rendering Failure" | "RenderingFailure" => {
            let f = obj_at(Some(obj), "failure");
            let mut e = common.event(EventType::Dropped, None, 0, 1);
            insert_str(&mut e, "template_name", str_at(f, "templateName"));
            e.error_message = Some(
                str_at(f, "errorMessage")
                    .unwrap_or("template rendering failed")
                    .to_owned(),
            );
            out.push(e);
        }
        "Open" | "Click" => {
            let (t, field) = if kind == "Open" {
                (EventType::Opened, "open")
            } else {
                (EventType::Clicked, "click")
            };
            let action = obj_at(Some(obj), field);
            let mut e = common.event(t, str_at(action, "timestamp"), 0, 1);
            e.ip_address = str_at(action, "ipAddress").map(str::to_owned);
            e.user_agent = str_at(action, "userAgent").map(str::to_owned);
            e.machine_reason = machine.classify_reported(e.user_agent.as_deref());
            if t == EventType::Clicked {
                e.link_url = str_at(action, "link").map(str::to_owned);
                if let Some(tags) = action
                    .and_then(|a| a.get("linkTags"))
                    .filter(|t| t.is_object())
                {
                    e.metadata.insert("link_tags".into(), tags.clone());
                }
            }
            out.push(e);
        }
        "Subscription" => {
            let s = obj_at(Some(obj), "subscription");
            let all = obj_at(s, "newTopicPreferences")
                .and_then(|p| p.get("unsubscribeAll"))
                .and_then(Value::as_bool)
                == Some(true);
            if !all {
                return vec![dead_letter(
                    Source::Ses,
                    "unmapped_subscription_change",
                    raw,
                    Some(common.key),
                    Some(kind),
                )];
            }
            let mut e = common.event(EventType::Unsubscribed, str_at(s, "timestamp"), 0, 1);
            insert_str(&mut e, "contact_list", str_at(s, "contactList"));
            insert_str(&mut e, "unsubscribe_source", str_at(s, "source"));
            out.push(e);
        }
        _ => {}
    }
    out.into_iter().map(Record::Event).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    use hyper::header::{HeaderMap, HeaderValue};
    use hyper::{Method, Uri};
    use serde_json::json;

    /// The test seam's certificate URL (allowlisted: https, `sns.us-east-1.amazonaws.com`).
    const CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";
    const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:MyTopic";
    const SUBSCRIBE_URL: &str = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:MyTopic&Token=2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82efd087cc3b7849e05798d2d2785c03b0879594eeac82c01f235d0e717736";
    const SNS_ID: &str = "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324";
    const MESSAGE: &str = "0190a6f0-0000-7000-8000-000000000002";
    const ORG: &str = "0190a6f0-0000-7000-8000-000000000001";

    /// A locally generated RSA key and a self-signed certificate for it (PEM), made once.
    struct TestKey {
        key: rsa::PrivateKey,
        pem: Vec<u8>,
    }

    fn generate() -> TestKey {
        use std::str::FromStr;
        use x509_cert::builder::profile::BuilderProfile;
        use x509_cert::builder::{Builder, CertificateBuilder};
        use x509_cert::der::EncodePem;
        use x509_cert::name::Name;
        use x509_cert::serial_number::SerialNumber;
        use x509_cert::spki::SubjectPublicKeyInfo;
        use x509_cert::time::Validity;

        /// Self-signed, no extensions: all SNS verification reads is the key and validity.
        struct SelfSigned(Name);
        impl BuilderProfile for SelfSigned {
            fn get_issuer(&self, subject: &Name) -> Name {
                subject.clone()
            }
            fn get_subject(&self) -> Name {
                self.0.clone()
            }
            fn build_extensions(
                &self,
                _spk: x509_cert::spki::SubjectPublicKeyInfoRef<'_>,
                _issuer_spk: x509_cert::spki::SubjectPublicKeyInfoRef<'_>,
                _tbs: &x509_cert::TbsCertificate,
            ) -> x509_cert::builder::Result<Vec<x509_cert::ext::Extension>> {
                Ok(Vec::new())
            }
        }

        let key = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key generation");
        let spki = SubjectPublicKeyInfo::from_key(&key.to_public_key()).expect("SPKI");
        let profile = SelfSigned(Name::from_str("CN=sns.amazonaws.com").expect("name"));
        // Valid from an hour ago (tests may take their "now" before the key exists) for a day.
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        let validity = Validity::new(
            x509_cert::time::Time::try_from(now - hour).expect("time"),
            x509_cert::time::Time::try_from(now + 24 * hour).expect("time"),
        );
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key.clone());
        let cert = CertificateBuilder::new(profile, SerialNumber::from(42u32), validity, spki)
            .expect("builder")
            .build::<_, rsa::pkcs1v15::Signature>(&signer)
            .expect("self-signed certificate");
        let pem = cert
            .to_pem(x509_cert::der::pem::LineEnding::LF)
            .expect("PEM");
        TestKey {
            key,
            pem: pem.into_bytes(),
        }
    }

    fn test_key() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(generate)
    }

    /// A second key, whose signatures the certificate above must not accept.
    fn other_key() -> &'static rsa::PrivateKey {
        static KEY: OnceLock<rsa::PrivateKey> = OnceLock::new();
        KEY.get_or_init(|| rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key"))
    }

    /// The test `HttpsGet`: serves the test certificate at [`CERT_URL`], answers the
    /// subscription URL, and records every URL it is asked for.
    struct Seam {
        calls: Mutex<Vec<String>>,
        cert: Result<Vec<u8>, String>,
    }

    impl Seam {
        fn new() -> Arc<Seam> {
            Seam::serving(Ok(test_key().pem.clone()))
        }

        fn serving(cert: Result<Vec<u8>, String>) -> Arc<Seam> {
            Arc::new(Seam {
                calls: Mutex::new(Vec::new()),
                cert,
            })
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl HttpsGet for Seam {
        fn get<'a>(&'a self, url: &'a Url) -> BoxFuture<'a, Result<Vec<u8>, String>> {
            self.calls.lock().unwrap().push(url.to_string());
            let answer = if url.as_str() == CERT_URL {
                self.cert.clone()
            } else if url
                .as_str()
                .starts_with("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription")
            {
                Ok(b"<ConfirmSubscriptionResponse/>".to_vec())
            } else {
                Err(format!("unexpected URL {url}"))
            };
            Box::pin(async move { answer })
        }
    }

    fn provider(seam: &Arc<Seam>) -> Ses {
        Ses::new(
            vec![TOPIC.to_owned()],
            Arc::clone(seam) as Arc<dyn HttpsGet>,
        )
    }

    fn sns_time(t: DateTime<Utc>) -> String {
        t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }

    /// The string to sign, built independently of the module: every signable key present, in
    /// the documented (alphabetical) order, name and value each followed by a newline.
    fn canonical(env: &Map<String, Value>) -> String {
        let mut s = String::new();
        for k in [
            "Message",
            "MessageId",
            "Subject",
            "SubscribeURL",
            "Timestamp",
            "Token",
            "TopicArn",
            "Type",
        ] {
            if let Some(v) = env.get(k).and_then(Value::as_str) {
                s.push_str(&format!("{k}\n{v}\n"));
            }
        }
        s
    }

    /// Signs the envelope (per its `SignatureVersion`) with `key`.
    fn sign_with(env: &mut Map<String, Value>, key: &rsa::PrivateKey) {
        let text = canonical(env);
        let sig = match env["SignatureVersion"].as_str() {
            Some("1") => key.pkcs1v15_sign::<sha1::Sha1>(text.as_bytes()),
            _ => key.pkcs1v15_sign::<sha2::Sha256>(text.as_bytes()),
        }
        .expect("signature");
        env.insert(
            "Signature".into(),
            Value::from(base64::engine::general_purpose::STANDARD.encode(sig)),
        );
    }

    fn sign(env: &mut Map<String, Value>) {
        sign_with(env, &test_key().key);
    }

    /// An SNS notification carrying `message`, as SNS posts it (not yet signed).
    fn notification(message: &str, version: &str, at: DateTime<Utc>) -> Map<String, Value> {
        let v = json!({
            "Type": "Notification",
            "MessageId": SNS_ID,
            "TopicArn": TOPIC,
            "Subject": "Amazon SES Email Event Notification",
            "Message": message,
            "Timestamp": sns_time(at),
            "SignatureVersion": version,
            "SigningCertURL": CERT_URL,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-1:123456789012:MyTopic:c9135db0-26c4-47ec-8998-413945fb5a96"
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
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
        for hours in [-2, 2] {
            let sent = at + chrono::Duration::hours(hours);
            let mut stale = notification(&message, "2", sent);
            sign(&mut stale);
            assert_eq!(
                verify(&p, &Req::new(&stale, at)),
                Err(WebhookError::Unauthorized(AuthFailure::StaleTimestamp)),
                "{hours}h"
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
    fn certificate_trouble_is_503_when_unreachable_and_401_when_unusable() {
        let at = Utc::now();
        let mut env = notification(&fixture("event-send.json"), "2", at);
        sign(&mut env);
        let r = Req::new(&env, at);

        let down = Seam::serving(Err("connection refused".into()));
        assert!(matches!(
            verify(&provider(&down), &r),
            Err(WebhookError::Unavailable(_))
        ));

        let garbage = Seam::serving(Ok(b"-----BEGIN CERTIFICATE-----\nnope\n".to_vec()));
        let p = provider(&garbage);
        assert_eq!(
            verify(&p, &r),
            Err(WebhookError::Unauthorized(AuthFailure::BadCertificate))
        );
        // Not cached: the next message fetches again.
        assert_eq!(
            verify(&p, &r),
            Err(WebhookError::Unauthorized(AuthFailure::BadCertificate))
        );
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
        assert_eq!(e.dedup_key.as_deref(), Some(sns_key().as_str()));
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
        for (i, e) in two.iter().enumerate() {
            assert_eq!(e.event_type, EventType::Bounced);
            assert_eq!(e.bounce_class, Some(BounceClass::Hard));
            assert_eq!(e.dedup_key, Some(format!("{}#{i}", sns_key())));
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
        assert_eq!(e.dedup_key.as_deref(), Some(sns_key().as_str()));
        assert_eq!(e.error_message, None);

        // The documented complaint without a feedback report carries no Reachly id.
        let recs = deliver(&p, &fixture("notification-complaint-no-feedback.json"));
        let Record::DeadLetter(d) = &recs[0] else {
            panic!("uncorrelatable: dead letter");
        };
        assert_eq!(recs.len(), 1);
        assert_eq!(d.reason, "no_message_id");
        assert_eq!(d.event_type.as_deref(), Some("Complaint"));
        assert_eq!(d.dedup_key.as_deref(), Some(sns_key().as_str()));
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
            assert_eq!(e.dedup_key.as_deref(), Some(sns_key().as_str()), "{name}");
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
}
