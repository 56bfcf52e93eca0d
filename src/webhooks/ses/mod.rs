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
mod tests;
