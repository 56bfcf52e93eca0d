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
//! - <https://docs.aws.amazon.com/sns/latest/dg/sns-message-delivery-retries.html> (HTTP/S
//!   retries: server errors only, at most 3,600 s in all)
//!
//! Verification fails closed and makes no outbound request unless everything checkable
//! locally passed, in this order: not raw message delivery (`x-amz-sns-rawdelivery: true`
//! means SNS posts the bare SES JSON without its signed envelope: 401, reason
//! `sns_raw_delivery`; docs/providers.md says to turn it off); content type; the body is an
//! SNS JSON message of a known `Type`; `TopicArn` is in `REACHLY_SES_TOPIC_ARNS`;
//! `SignatureVersion` is 1 or 2; `SigningCertURL` is `https://sns.<region>.amazonaws.com/<name>.pem`
//! (`.amazonaws.com.cn` for the China regions; other partitions are refused when the
//! configuration is read) with `<region>` the topic's region (no user info, port, query or
//! fragment); a signature is present and base64; the signed fields are present; `Timestamp`
//! is at most [`MAX_TIMESTAMP_AGE_SECS`] old and [`MAX_TIMESTAMP_AHEAD_SECS`] ahead; for a
//! subscription confirmation, `SubscribeURL` is
//! `https://sns.<region>.amazonaws.com/?Action=ConfirmSubscription&...` for the same topic.
//! Only then is the certificate fetched through [`HttpsGet`] (cached by URL, at most
//! [`CERT_CACHE_MAX`] entries) and the signature checked. A certificate that cannot be
//! fetched, or does not parse, is 503: SNS never retries a 4xx, so a 401 there would lose
//! the event for good.
//!
//! Retries and window: SNS retries an HTTP/S delivery only after a 5xx or a connection
//! failure, for at most 3,600 seconds (a hard limit of every delivery policy), keeping the
//! message's signed `Timestamp`; a 4xx is final. The window is two hours (that hour, plus
//! jitter, SNS's own queueing and clock skew). A replay inside it changes nothing: the whole
//! message is signed, and its events are keyed on their content.
//!
//! Mapping (`eventType` or `notificationType`): Send → sent (at `mail.timestamp`), Delivery →
//! delivered, Bounce → bounced, Complaint → complained (a `complaintFeedbackType` of
//! `not-spam` is no complaint: dead letter `not_a_complaint`), DeliveryDelay → deferred,
//! Reject → dropped, Rendering Failure → dropped (SES never sent it), Open → opened, Click →
//! clicked, Subscription with `newTopicPreferences.unsubscribeAll: true` → unsubscribed.
//! A topic-level change (`unsubscribeAll: false`, a topic opted out) is dead-lettered as
//! `unmapped_subscription_change`: Reachly has one contact status, and leaving one topic is
//! not leaving all mail. `AmazonSnsSubscriptionSucceeded` (SES's notice that a topic was
//! wired up) yields nothing. Anything else is dead-lettered as `unknown_event_type`; an
//! authenticated notification whose `Message` is not a JSON object as `unparseable_message`.
//!
//! Bounce classes: `bounceType` Permanent → hard (every sub-type: General, NoEmail,
//! Suppressed, OnAccountSuppressionList); Transient and Undetermined → soft.
//!
//! Dedup key: the SES event itself, not the SNS message: `mail.messageId`, the event kind,
//! the recipient (one event per recipient of a bounce, complaint, delivery or delay list),
//! the event's own `timestamp` (else `mail.timestamp`), and for opens and clicks the address,
//! user agent and link. When identity feedback notifications and configuration-set event
//! publishing both reach us, one bounce arrives as two SNS messages with different
//! `MessageId`s but the same SES fields, so it is one row. SNS retries repeat the message, so
//! they are caught; two real events differ in kind, recipient, time or client. A message
//! without `mail.messageId` falls back to the SNS `MessageId` (suffixed `#<index>` per
//! recipient).
//!
//! Files by role: this one is the provider (verification order, certificate fetch,
//! subscription confirmation, `parse`); `sns.rs` the envelope, string to sign, allowlists
//! and certificate cache; `mapping.rs` SES messages to facts; `tests.rs` the unit tests.

mod mapping;
mod sns;

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::Value;
use url::Url;

use super::extract::rfc3339;
use super::records::{DeadReason, dead_letter, id_key};
use super::{
    AuthFailure, BoxFuture, HttpsGet, ParseContext, Provider, WebhookError, WebhookRequest,
};
use crate::config::WebhookConfig;
use crate::event::{Record, Source};
use mapping::map_message;
use sns::{
    CachedCert, CertCache, Checked, Kind, SignatureVersion, certificate_url, envelope,
    parse_certificate, require_sns_content_type, string_to_sign, subscribe_url, topic_region,
};

/// Oldest SNS `Timestamp` accepted. SNS keeps the original timestamp on retries; an HTTP/S
/// delivery policy retries for at most 3,600 s (a hard limit), so the window is that hour
/// plus an hour for jitter, SNS's own queueing and clock skew. A replay inside it changes
/// nothing: the whole message is signed and its events are keyed on their content.
pub const MAX_TIMESTAMP_AGE_SECS: i64 = 2 * 3600;
/// Clock skew tolerated the other way.
pub const MAX_TIMESTAMP_AHEAD_SECS: i64 = 15 * 60;

/// The header SNS sets on every POST of a subscription with raw message delivery on.
pub const RAW_DELIVERY_HEADER: &str = "x-amz-sns-rawdelivery";

/// Signing certificates kept in memory (SNS uses a handful per region at a time).
pub const CERT_CACHE_MAX: usize = 32;

/// Largest body read. An SNS message is at most 256 KiB, carried as a JSON string in the SNS envelope (escaping roughly doubles quote-heavy JSON).
pub const MAX_BODY_BYTES: usize = 1 << 20;

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
                "REACHLY_SES_TOPIC_ARNS: {t:?} is not an SNS topic ARN of a supported partition (arn:aws:sns:<region>:<account>:<topic>; aws-us-gov, and aws-cn with a cn- region, also work)"
            ));
        }
    }
    Ok(Some(Arc::new(Ses::new(topics, Arc::clone(https)))))
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
        // Raw message delivery posts the bare SES JSON without the signed envelope: nothing
        // in it can be authenticated, and the subscription must be fixed (docs/providers.md).
        if req
            .header(RAW_DELIVERY_HEADER)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            return Err(WebhookError::Unauthorized(AuthFailure::SnsRawDelivery));
        }
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
        let age = (req.received_at - sent_at).num_seconds();
        if age > MAX_TIMESTAMP_AGE_SECS || -age > MAX_TIMESTAMP_AHEAD_SECS {
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
                // What the allowlisted SNS host served does not parse (a proxy's error page,
                // a truncated body): transient, so 503 and SNS retries; a 401 would be final.
                let cert = Arc::new(parse_certificate(&pem).map_err(|why| {
                    WebhookError::Unavailable(format!(
                        "the SNS signing certificate does not parse: {why}"
                    ))
                })?);
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

    fn max_body_bytes(&self) -> usize {
        MAX_BODY_BYTES
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
                DeadReason::UnparseableMessage,
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

#[cfg(test)]
mod tests;
