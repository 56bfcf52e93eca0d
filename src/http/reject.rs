//! [`Reject`]: every way the request path refuses a request, and the one place that turns
//! each into its status, headers and body. Handlers return `Result<Resp, Reject>`; the
//! route table calls [`Reject::into_response`]. Bodies say what the client can fix and
//! never echo why authentication failed (that reason is logged and counted instead).

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use super::{BodyError, Resp, html, text};
use crate::webhooks::WebhookError;

/// Seconds a client is asked to wait before retrying a 503.
pub const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug)]
pub enum Reject {
    /// 404, plain text (unknown path, unconfigured provider).
    NotFound,
    /// 404, the small HTML page a person sees for a bad tracking link.
    LinkNotFound,
    /// 405 with `Allow`.
    MethodNotAllowed(&'static str),
    /// 413, 408 or 400: the body could not be read within its limits.
    Body(BodyError),
    /// 400 with a message for the client.
    BadRequest(&'static str),
    /// A provider refused the request (401, 400, 415 or 503).
    Webhook(WebhookError),
    /// 503 + `Retry-After`: the events could not be made durable now.
    NotDurable { what: NotDurableWhat, why: String },
    /// 503 + `Retry-After`: the request did not finish within `REACHLY_REQUEST_TIMEOUT_MS`.
    Timeout,
}

/// Whose durability failed: the wording differs (an ESP retries, a person clicks again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDurableWhat {
    Webhook,
    Unsubscribe,
}

impl From<BodyError> for Reject {
    fn from(e: BodyError) -> Self {
        Reject::Body(e)
    }
}

impl From<WebhookError> for Reject {
    fn from(e: WebhookError) -> Self {
        Reject::Webhook(e)
    }
}

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::NotFound | Reject::LinkNotFound => StatusCode::NOT_FOUND,
            Reject::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Reject::Body(BodyError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::Body(BodyError::Timeout) => StatusCode::REQUEST_TIMEOUT,
            Reject::Body(BodyError::Broken(_)) | Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::Webhook(e) => match e {
                WebhookError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                WebhookError::BadRequest(_) => StatusCode::BAD_REQUEST,
                WebhookError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                WebhookError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            Reject::NotDurable { .. } | Reject::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn into_response(self) -> Resp {
        let status = self.status();
        let mut resp = match self {
            Reject::NotFound => text(status, "not found\n"),
            Reject::LinkNotFound => html(
                status,
                "<!doctype html><title>Link not found</title><p>This link is not valid.</p>\n",
            ),
            Reject::MethodNotAllowed(allow) => {
                let mut r = text(status, "method not allowed\n");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            Reject::Body(e) => text(status, format!("{e}\n")),
            Reject::BadRequest(msg) => text(status, format!("{msg}\n")),
            Reject::Webhook(WebhookError::Unauthorized(_)) => {
                text(status, "invalid signature or credentials\n")
            }
            Reject::Webhook(e) => text(status, format!("{e}\n")),
            Reject::NotDurable {
                what: NotDurableWhat::Webhook,
                why,
            } => text(
                status,
                format!("cannot store events now ({why}); retry later\n"),
            ),
            Reject::NotDurable {
                what: NotDurableWhat::Unsubscribe,
                why,
            } => text(
                status,
                format!("could not record the unsubscribe now ({why}); please retry\n"),
            ),
            Reject::Timeout => text(status, "request timed out\n"),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::AuthFailure;

    #[test]
    fn each_rejection_has_its_status_and_unavailable_ones_ask_for_a_retry() {
        let cases = [
            (Reject::NotFound, 404),
            (Reject::LinkNotFound, 404),
            (Reject::MethodNotAllowed("GET"), 405),
            (Reject::Body(BodyError::TooLarge(1)), 413),
            (Reject::Body(BodyError::Timeout), 408),
            (Reject::BadRequest("x"), 400),
            (
                Reject::Webhook(WebhookError::Unauthorized(AuthFailure::BadSignature)),
                401,
            ),
            (
                Reject::Webhook(WebhookError::UnsupportedMediaType("x".into())),
                415,
            ),
            (Reject::Timeout, 503),
        ];
        for (r, code) in cases {
            let resp = r.into_response();
            assert_eq!(resp.status().as_u16(), code);
            assert_eq!(
                resp.headers().contains_key(header::RETRY_AFTER),
                code == 503,
                "{code}"
            );
        }
    }

    #[test]
    fn an_authentication_failure_never_says_why() {
        let resp = Reject::Webhook(WebhookError::Unauthorized(AuthFailure::StaleTimestamp))
            .into_response();
        let body = format!("{:?}", resp.body());
        assert!(!body.contains("stale"), "{body}");
    }
}
