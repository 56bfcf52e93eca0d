//! Our own tracking endpoints: the open pixel, the click redirect and the RFC 8058
//! one-click unsubscribe. Pixel and click never touch the database (the event goes to the
//! pipeline fire-and-forget), so they answer in microseconds and a click still redirects
//! while the database is down; only when the memory buffer is full do they wait for their
//! event to reach the spool's disk (a group commit, milliseconds). The unsubscribe POST checks the token's organization against
//! the message's row, then answers once the event is durable.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};

use super::reject::{NotDurableWhat, Reject};
use super::state::AppState;
use super::{Req, Resp, client_ip, html, read_body, stored_ip};
use crate::event::{self, Event, EventType, Record, Source};
use crate::machine;
use crate::metrics::INVALID_TOKENS_TOTAL;
use crate::token::{self, Purpose, Token};

/// A 1x1 transparent GIF (43 bytes).
pub const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

const NO_CACHE: &str = "no-store, no-cache, must-revalidate, private, max-age=0";

fn verify(state: &AppState, purpose: Purpose, raw: &str) -> Option<Token> {
    let result = match &state.config.tracking.token_keys {
        Some(keys) => token::verify(keys, purpose, raw),
        None => Err(token::TokenError::UnknownKey),
    };
    match result {
        Ok(t) => Some(t),
        Err(e) => {
            state
                .metrics
                .counter(INVALID_TOKENS_TOTAL, &[("purpose", purpose.as_str())])
                .increment(1);
            tracing::debug!(
                purpose = purpose.as_str(),
                reason = e.reason(),
                "invalid tracking token"
            );
            None
        }
    }
}

/// The event a tracking hit records: tenant as claimed by the token (checked by the
/// writer), client address per the privacy mode, user agent cut to a sane length.
fn tracking_event(
    state: &AppState,
    req: &Req,
    peer: SocketAddr,
    t: &Token,
    kind: EventType,
    source: Source,
) -> Event {
    let mut e = Event::happening_now(t.message_id, kind, source);
    e.claimed_organization_id = Some(t.organization_id);
    let tracking = &state.config.tracking;
    let client = client_ip(peer, req.headers(), &tracking.trusted_proxies);
    e.ip_address = stored_ip(client, tracking.ip_mode);
    let ua = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    e.user_agent = ua.map(|s| event::truncate_utf8(s, event::MAX_USER_AGENT_BYTES).to_owned());
    if kind != EventType::Unsubscribed {
        let is_head = req.method() == Method::HEAD;
        // Opens are judged with the full client address (Apple MPP prefetches come from the
        // relay's egress ranges); it is truncated only for storage.
        e.machine_reason = match kind {
            EventType::Opened => state.machine.classify_open(is_head, ua, client),
            _ => state.machine.classify(is_head, ua),
        };
        if e.machine_reason.is_none()
            && let Some(proxy) = machine::human_proxy(ua)
        {
            e.metadata.insert("proxy".into(), proxy.into());
        }
    }
    e
}

/// `GET`/`HEAD /o/{token}.gif`: always the GIF, whatever the token (no oracle).
pub async fn pixel(req: Req, peer: SocketAddr, state: Arc<AppState>, raw: &str) -> Resp {
    if let Some(t) = verify(&state, Purpose::Open, raw) {
        let e = tracking_event(&state, &req, peer, &t, EventType::Opened, Source::Pixel);
        state.ingest.submit(vec![Record::Event(e)]).await;
    }
    let mut r = Response::new(Full::new(Bytes::from_static(PIXEL_GIF)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_CACHE));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("0"));
    r
}

/// `GET`/`HEAD /c/{token}`: 302 to the signed URL, or 404 (never a redirect to anything
/// the token did not sign).
pub async fn click(
    req: Req,
    peer: SocketAddr,
    state: Arc<AppState>,
    raw: &str,
) -> Result<Resp, Reject> {
    let t = verify(&state, Purpose::Click, raw).ok_or(Reject::LinkNotFound)?;
    let location = t
        .url
        .as_deref()
        .and_then(|u| token::redirect_location(u).ok())
        .and_then(|l| HeaderValue::from_str(&l).ok())
        .ok_or(Reject::LinkNotFound)?;
    let mut e = tracking_event(&state, &req, peer, &t, EventType::Clicked, Source::Click);
    e.link_url = t.url.clone();
    state.ingest.submit(vec![Record::Event(e)]).await;
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    let h = r.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(r)
}

/// `GET /u/{token}`: a confirmation page whose button POSTs the one-click body. A GET
/// alone never unsubscribes: link scanners prefetch GETs.
pub fn unsubscribe_page(state: Arc<AppState>, raw: &str) -> Result<Resp, Reject> {
    verify(&state, Purpose::Unsubscribe, raw).ok_or(Reject::LinkNotFound)?;
    // The token is base64url (A-Z a-z 0-9 - _): nothing in it needs HTML escaping.
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>Unsubscribe</title></head><body>\
         <h1>Unsubscribe</h1><p>Stop receiving these emails?</p>\
         <form method=\"post\" action=\"/u/{raw}\">\
         <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\">Unsubscribe</button></form></body></html>\n"
    );
    Ok(html(StatusCode::OK, body))
}

/// `POST /u/{token}` (RFC 8058): records `unsubscribed` and answers 200 once it is durable.
///
/// First the message is looked up: a validly signed token whose organization is not the
/// message's (or whose message does not exist) is refused as a bad link, never answered as
/// done (SPEC). While the database cannot be asked, the answer is 503 + `Retry-After`
/// rather than a spooled "unsubscribed": the spool would keep the event safe (the writer
/// dead-letters a mismatch), but the person would have been told it worked when it may not.
pub async fn unsubscribe(
    req: Req,
    peer: SocketAddr,
    state: Arc<AppState>,
    raw: &str,
) -> Result<Resp, Reject> {
    let t = verify(&state, Purpose::Unsubscribe, raw).ok_or(Reject::LinkNotFound)?;
    // A bus edge never touches the database: it cannot check, the writer will.
    let bus = &state.config.bus;
    let checkable = !bus.enabled() || bus.consumes();
    let verified = match checkable {
        true => token_names_the_owner(&state, &t).await,
        false => Err("this instance is a bus edge".to_string()),
    };
    let verified = match verified {
        Ok(true) => true,
        Ok(false) => {
            state
                .metrics
                .counter(
                    INVALID_TOKENS_TOTAL,
                    &[("purpose", Purpose::Unsubscribe.as_str())],
                )
                .increment(1);
            tracing::info!(
                reason = "organization_mismatch",
                "unsubscribe refused: the token's organization is not its message's"
            );
            return Err(Reject::LinkNotFound);
        }
        // The database cannot say now (outage, or a bus edge). Refusing would lose the
        // request (mailbox providers do not retry one-click POSTs), so it is made durable
        // and answered 202 "received": not "done", since its tenant is unchecked; the
        // writer checks it against the message row and dead-letters a mismatch.
        Err(why) => {
            tracing::info!(error = %why, "unsubscribe not checkable now; accepted unverified");
            false
        }
    };
    let e = tracking_event(
        &state,
        &req,
        peer,
        &t,
        EventType::Unsubscribed,
        Source::Unsubscribe,
    );
    let (_, body, _held) = read_body(
        req,
        8 * 1024,
        state.config.server.body_timeout,
        &state.body_budget,
    )
    .await?;
    if !is_one_click_body(&body) {
        return Err(Reject::BadRequest(
            "expected the RFC 8058 body List-Unsubscribe=One-Click",
        ));
    }
    match state.ingest.submit_durable(vec![Record::Event(e)]).await {
        Ok(()) if verified => Ok(html(
            StatusCode::OK,
            "<!doctype html><title>Unsubscribed</title><p>You have been unsubscribed.</p>\n",
        )),
        Ok(()) => Ok(html(
            StatusCode::ACCEPTED,
            "<!doctype html><title>Unsubscribe received</title><p>Your unsubscribe request has been received and will be applied shortly.</p>\n",
        )),
        Err(why) => Err(Reject::NotDurable {
            what: NotDurableWhat::Unsubscribe,
            why: why.to_string(),
        }),
    }
}

/// Whether the token's organization owns its message (`false` also when no such message
/// exists, or a row-level-security policy hides it from that organization); `Err` when the
/// database cannot say now. The lookup runs under the token's organization
/// (`app.current_organization_id`, transaction-local), so a role without BYPASSRLS sees
/// only that organization's rows, and the answer is the same with or without it.
async fn token_names_the_owner(state: &AppState, t: &Token) -> Result<bool, String> {
    let lookup = async {
        let mut client = state.pool.get().await.map_err(|e| e.to_string())?;
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| e.to_string())?;
        tx.execute(
            "SELECT set_config('app.current_organization_id', $1, true)",
            &[&t.organization_id.to_string()],
        )
        .await
        .map_err(|e| e.to_string())?;
        let row = tx
            .query_opt(
                "SELECT organization_id FROM campaign_messages WHERE id = $1",
                &[&t.message_id],
            )
            .await
            .map_err(|e| e.to_string())?;
        let _ = tx.commit().await;
        Ok(row.is_some_and(|r| r.get::<_, uuid::Uuid>(0) == t.organization_id))
    };
    tokio::time::timeout(state.config.db.connect_timeout * 2, lookup)
        .await
        .map_err(|_| "the message lookup timed out".to_string())?
}

/// `List-Unsubscribe=One-Click` as a urlencoded form field, or inside a multipart body
/// (RFC 8058 allows both encodings).
fn is_one_click_body(body: &[u8]) -> bool {
    let urlencoded = url::form_urlencoded::parse(body).any(|(k, v)| {
        k.eq_ignore_ascii_case("List-Unsubscribe") && v.eq_ignore_ascii_case("One-Click")
    });
    urlencoded || {
        let s = String::from_utf8_lossy(body);
        s.contains("name=\"List-Unsubscribe\"") && s.contains("One-Click")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_bodies_in_both_encodings_are_recognised() {
        assert!(is_one_click_body(b"List-Unsubscribe=One-Click"));
        assert!(is_one_click_body(
            b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n"
        ));
        assert!(!is_one_click_body(b""));
        assert!(!is_one_click_body(b"List-Unsubscribe=No"));
    }

    #[test]
    fn the_pixel_is_a_gif() {
        assert!(PIXEL_GIF.starts_with(b"GIF89a"));
        assert_eq!(PIXEL_GIF.len(), 43);
    }
}
