//! The SNS side of SES webhooks: the JSON envelope SNS posts and its string to sign, the
//! allowlists that decide which topic, certificate URL and subscription URL are ever
//! accepted or fetched, and the signing certificates (parsed, cached by URL, bounded).
//! Everything here is checkable without the network; `super` does the fetching.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use url::Url;

use super::CERT_CACHE_MAX;
use crate::webhooks::{AuthFailure, WebhookError, WebhookRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Notification,
    SubscriptionConfirmation,
    UnsubscribeConfirmation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SignatureVersion {
    Sha1,
    Sha256,
}

/// The JSON document SNS posts. Every field is a string (or null/absent).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Envelope {
    #[serde(rename = "Type")]
    pub(super) kind: String,
    pub(super) message_id: Option<String>,
    pub(super) topic_arn: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) message: Option<String>,
    pub(super) timestamp: Option<String>,
    pub(super) signature_version: Option<String>,
    pub(super) signature: Option<String>,
    #[serde(rename = "SigningCertURL")]
    pub(super) signing_cert_url: Option<String>,
    #[serde(rename = "SubscribeURL")]
    pub(super) subscribe_url: Option<String>,
    pub(super) token: Option<String>,
}

/// What verification established without the network.
pub(super) struct Checked {
    pub(super) envelope: Envelope,
    pub(super) cert_url: Url,
    /// Set for a subscription confirmation: the allowlisted URL to visit.
    pub(super) subscribe_url: Option<Url>,
    pub(super) string_to_sign: String,
    pub(super) signature: Vec<u8>,
    pub(super) version: SignatureVersion,
}

pub(super) fn envelope(req: &WebhookRequest<'_>) -> Result<(Envelope, Kind), WebhookError> {
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
pub(super) fn require_sns_content_type(req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
    match req.header("content-type").map(str::to_ascii_lowercase) {
        None => Ok(()),
        Some(ct) if ct.starts_with("text/plain") || ct.contains("json") => Ok(()),
        Some(ct) => Err(WebhookError::UnsupportedMediaType(format!(
            "expected text/plain (an SNS message), got {ct}"
        ))),
    }
}

/// The canonical string SNS signs, or the name of a missing field.
pub(super) fn string_to_sign(env: &Envelope, kind: Kind) -> Result<String, &'static str> {
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
pub(super) fn plausible_region(r: &str) -> bool {
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

/// The region of `arn:<partition>:sns:<region>:<account>:<topic>`, for the partitions whose
/// SNS certificate host is known: `aws` and `aws-us-gov` (`sns.<region>.amazonaws.com`) and
/// `aws-cn` (`sns.<region>.amazonaws.com.cn`, regions `cn-*`). Others (the isolated
/// partitions) are refused when the configuration is read, not at the first message.
pub(super) fn topic_region(arn: &str) -> Option<&str> {
    let parts: Vec<&str> = arn.split(':').collect();
    match parts.as_slice() {
        ["arn", partition, "sns", region, account, topic]
            if matches!(*partition, "aws" | "aws-us-gov" | "aws-cn")
                && (*partition == "aws-cn") == region.starts_with("cn-")
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

/// `https://sns.<region>.amazonaws.com` (`.amazonaws.com.cn` in the China regions) with
/// nothing unusual: no user info, no explicit port, no fragment. The path and query are
/// checked by the callers.
pub(super) fn sns_url(raw: &str, region: &str) -> Option<Url> {
    let url = Url::parse(raw).ok()?;
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    let host = format!("sns.{region}.{suffix}");
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
pub(super) fn certificate_url(raw: &str, region: &str) -> Option<Url> {
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
pub(super) fn subscribe_url(raw: &str, region: &str, topic: &str) -> Option<Url> {
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

pub(super) struct CachedCert {
    pub(super) key: rsa::PublicKey,
    pub(super) not_before: DateTime<Utc>,
    pub(super) not_after: DateTime<Utc>,
}

#[derive(Default)]
pub(super) struct CertCache {
    pub(super) by_url: HashMap<String, Arc<CachedCert>>,
    pub(super) order: VecDeque<String>,
}

impl CertCache {
    pub(super) fn get(&self, url: &str) -> Option<Arc<CachedCert>> {
        self.by_url.get(url).cloned()
    }

    pub(super) fn insert(&mut self, url: String, cert: Arc<CachedCert>) {
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

pub(super) fn to_utc(t: x509_cert::time::Time) -> Option<DateTime<Utc>> {
    let d = t.to_unix_duration();
    DateTime::from_timestamp(i64::try_from(d.as_secs()).ok()?, d.subsec_nanos())
}

/// The RSA key and validity of the first certificate of a PEM file.
pub(super) fn parse_certificate(pem: &[u8]) -> Result<CachedCert, AuthFailure> {
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
