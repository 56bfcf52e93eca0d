//! How a provider refuses a request: [`WebhookError`] (the HTTP layer maps each case to a
//! status in `http::reject`) and, for a failed authentication, [`AuthFailure`]: why, as a
//! closed set with a stable snake_case [`AuthFailure::reason`]. The reason is a log field
//! (and may become a metric label), so it is never free text and never sent to the client.

/// A refusal of a webhook request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// 401; the reason is logged and never sent back.
    #[error("unauthorized: {0}")]
    Unauthorized(AuthFailure),
    /// 400 with the message.
    #[error("{0}")]
    BadRequest(String),
    /// 415 with the message.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503: a dependency (SNS certificate host) is unreachable; the ESP retries.
    #[error("{0}")]
    Unavailable(String),
}

/// Why a request failed authentication, across every provider's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No signature (header, form field or JSON object) where the scheme needs one.
    MissingSignature,
    /// The signature is present but not in the scheme's encoding (base64, DER).
    MalformedSignature,
    /// The signature does not match the signed bytes under the configured secret.
    BadSignature,
    /// The signed timestamp is absent.
    MissingTimestamp,
    /// The signed timestamp is not a time.
    BadTimestamp,
    /// The signed timestamp is outside the provider's replay window.
    StaleTimestamp,
    /// The configured key cannot key the MAC (not expected with a non-empty secret).
    BadKey,
    /// Mailgun: the signature's token was already used with another body.
    ReplayedToken,
    /// Basic auth (or a token) is required and absent.
    MissingCredentials,
    /// Basic auth (or a token) does not match.
    WrongCredentials,
    /// SNS: the topic is not in `REACHLY_SES_TOPIC_ARNS`.
    TopicNotAllowed,
    /// SNS: a `SignatureVersion` other than 1 or 2.
    UnsupportedSignatureVersion,
    /// SNS: the signing certificate URL is not an SNS host of the topic's region.
    CertificateUrlNotAllowed,
    /// SNS: the `SubscribeURL` is not an SNS host of the topic's region.
    SubscribeUrlNotAllowed,
    /// SNS: the signing certificate is outside its validity period.
    CertificateExpired,
    /// SNS: the signing certificate cannot be read as an RSA certificate.
    BadCertificate,
    /// SNS: raw message delivery is on (`x-amz-sns-rawdelivery: true`): no signed envelope.
    SnsRawDelivery,
}

impl AuthFailure {
    /// Stable snake_case name: a log field and a possible metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::MissingSignature => "missing_signature",
            AuthFailure::MalformedSignature => "malformed_signature",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::MissingTimestamp => "missing_timestamp",
            AuthFailure::BadTimestamp => "bad_timestamp",
            AuthFailure::StaleTimestamp => "stale_timestamp",
            AuthFailure::BadKey => "bad_key",
            AuthFailure::ReplayedToken => "replayed_token",
            AuthFailure::MissingCredentials => "missing_credentials",
            AuthFailure::WrongCredentials => "wrong_credentials",
            AuthFailure::TopicNotAllowed => "topic_not_allowed",
            AuthFailure::UnsupportedSignatureVersion => "unsupported_signature_version",
            AuthFailure::CertificateUrlNotAllowed => "certificate_url_not_allowed",
            AuthFailure::SubscribeUrlNotAllowed => "subscribe_url_not_allowed",
            AuthFailure::CertificateExpired => "certificate_expired",
            AuthFailure::BadCertificate => "bad_certificate",
            AuthFailure::SnsRawDelivery => "sns_raw_delivery",
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_snake_case_labels() {
        let all = [
            AuthFailure::MissingSignature,
            AuthFailure::MalformedSignature,
            AuthFailure::BadSignature,
            AuthFailure::MissingTimestamp,
            AuthFailure::BadTimestamp,
            AuthFailure::StaleTimestamp,
            AuthFailure::BadKey,
            AuthFailure::ReplayedToken,
            AuthFailure::MissingCredentials,
            AuthFailure::WrongCredentials,
            AuthFailure::TopicNotAllowed,
            AuthFailure::UnsupportedSignatureVersion,
            AuthFailure::CertificateUrlNotAllowed,
            AuthFailure::SubscribeUrlNotAllowed,
            AuthFailure::CertificateExpired,
            AuthFailure::BadCertificate,
            AuthFailure::SnsRawDelivery,
        ];
        let mut reasons: Vec<&str> = all.iter().map(|a| a.reason()).collect();
        for r in &reasons {
            assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
        }
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), all.len());
        assert_eq!(
            WebhookError::Unauthorized(AuthFailure::StaleTimestamp).to_string(),
            "unauthorized: stale_timestamp"
        );
    }
}
