//! The route table of both listeners: `match (method, path)` into a [`Route`], whose
//! `name()` labels the metrics (never the raw path) and whose `handle()` dispatches.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::Method;

use super::reject::Reject;
use super::state::AppState;
use super::{Req, Resp, admin, tracking, webhook};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Pixel(String),
    Click(String),
    UnsubscribePage(String),
    Unsubscribe(String),
    Webhook(String),
    Metrics,
    Healthz,
    Readyz,
    NotFound,
    MethodNotAllowed(&'static str),
}

impl Route {
    /// The public listener's routes.
    pub fn public(method: &Method, path: &str) -> Route {
        let get_or_head = method == Method::GET || method == Method::HEAD;
        if let Some(rest) = path.strip_prefix("/o/") {
            return match rest.strip_suffix(".gif") {
                Some(token) if get_or_head => Route::Pixel(token.to_owned()),
                Some(_) => Route::MethodNotAllowed("GET, HEAD"),
                None => Route::NotFound,
            };
        }
        if let Some(token) = path.strip_prefix("/c/") {
            return if get_or_head {
                Route::Click(token.to_owned())
            } else {
                Route::MethodNotAllowed("GET, HEAD")
            };
        }
        if let Some(token) = path.strip_prefix("/u/") {
            return match *method {
                Method::POST => Route::Unsubscribe(token.to_owned()),
                Method::GET | Method::HEAD => Route::UnsubscribePage(token.to_owned()),
                _ => Route::MethodNotAllowed("GET, HEAD, POST"),
            };
        }
        if let Some(provider) = path.strip_prefix("/webhooks/") {
            // HEAD: Mandrill checks a webhook URL with an unsigned HEAD before saving it.
            return if method == Method::POST || method == Method::HEAD {
                Route::Webhook(provider.to_owned())
            } else {
                Route::MethodNotAllowed("POST, HEAD")
            };
        }
        Route::NotFound
    }

    /// The admin listener's routes.
    pub fn admin(method: &Method, path: &str) -> Route {
        let route = match path {
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            _ => return Route::NotFound,
        };
        if method == Method::GET || method == Method::HEAD {
            route
        } else {
            Route::MethodNotAllowed("GET, HEAD")
        }
    }

    /// The `route` label.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Pixel(_) => "pixel",
            Route::Click(_) => "click",
            Route::UnsubscribePage(_) => "unsubscribe_page",
            Route::Unsubscribe(_) => "unsubscribe",
            Route::Webhook(_) => "webhook",
            Route::Metrics => "metrics",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::NotFound => "not_found",
            Route::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    /// Whether the handler can wait (on a body, the database or durability); only those
    /// need the request timeout. Pixel and click wait on nothing but, when memory is full,
    /// the spool's disk, and that wait has its own limit ([`crate::pipeline::SPOOL_WAIT_MAX`]).
    pub fn may_wait(&self) -> bool {
        matches!(
            self,
            Route::Unsubscribe(_) | Route::Webhook(_) | Route::Readyz
        )
    }

    /// Runs the handler; a [`Reject`] becomes its response here, in one place.
    pub async fn handle(self, req: Req, peer: SocketAddr, state: Arc<AppState>) -> Resp {
        let result = match self {
            Route::Pixel(t) => Ok(tracking::pixel(req, peer, state, &t).await),
            Route::Click(t) => tracking::click(req, peer, state, &t).await,
            Route::UnsubscribePage(t) => tracking::unsubscribe_page(state, &t),
            // Boxed: hyper keeps room for a connection's request future for as long as the
            // connection is open, so inline, every idle keep-alive connection held room for
            // the largest of these (body reading, verification, database calls). Boxed,
            // only a request that takes one of them allocates it; pixel and click, the bulk
            // of requests, stay inline (boxing the whole request cost the pixel route
            // 0.1-0.8 us of CPU per request in the pixel bench).
            Route::Unsubscribe(t) => Box::pin(tracking::unsubscribe(req, peer, state, &t)).await,
            Route::Webhook(p) => Box::pin(webhook::handle(req, state, &p)).await,
            Route::Metrics => Ok(Box::pin(admin::metrics(&state)).await),
            Route::Healthz => Ok(admin::healthz(&state)),
            Route::Readyz => Ok(Box::pin(admin::readyz(&state)).await),
            Route::NotFound => Err(Reject::NotFound),
            Route::MethodNotAllowed(allow) => Err(Reject::MethodNotAllowed(allow)),
        };
        result.unwrap_or_else(Reject::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_named_routes() {
        assert_eq!(
            Route::public(&Method::GET, "/o/abc.gif"),
            Route::Pixel("abc".into())
        );
        assert_eq!(
            Route::public(&Method::HEAD, "/c/xyz"),
            Route::Click("xyz".into())
        );
        assert_eq!(
            Route::public(&Method::POST, "/u/t"),
            Route::Unsubscribe("t".into())
        );
        assert_eq!(
            Route::public(&Method::GET, "/u/t"),
            Route::UnsubscribePage("t".into())
        );
        assert_eq!(
            Route::public(&Method::POST, "/webhooks/sendgrid"),
            Route::Webhook("sendgrid".into())
        );
        assert_eq!(
            Route::public(&Method::GET, "/webhooks/sendgrid").name(),
            "method_not_allowed"
        );
        assert_eq!(Route::public(&Method::GET, "/metrics"), Route::NotFound);
        assert_eq!(Route::admin(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(Route::admin(&Method::GET, "/o/abc.gif"), Route::NotFound);
    }
}
