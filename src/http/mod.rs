//! The HTTP layer: the route table ([`routes`]), the handlers ([`tracking`], [`webhook`],
//! [`admin`]), the shared state they read ([`state`]), the one rejection type ([`reject`]),
//! and the small helpers they share: response builders, bounded body reading with a
//! timeout under a global memory budget ([`BodyBudget`]), and the client address as SPEC.md defines it (socket peer, or
//! `X-Forwarded-For` only from a trusted proxy, stored per `REACHLY_IP_MODE`).
//!
//! It sits below `server` (which accepts connections and calls [`routes::Route::handle`])
//! and above `pipeline`, `webhooks` and `db`, whose work it asks for.

pub mod admin;
pub mod reject;
pub mod replay;
pub mod routes;
pub mod state;
pub mod tracking;
pub mod webhook;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use std::sync::Arc;

use ::metrics::Counter;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::IpMode;
use crate::metrics::{HTTP_BODY_BUDGET_EXHAUSTED_TOTAL, Metrics};

pub type Req = Request<Incoming>;
pub type Resp = Response<Full<Bytes>>;

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An HTML response that is never cached, indexed or given a referrer.
pub fn html(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert("x-robots-tag", HeaderValue::from_static("noindex"));
    r
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body not received in time")]
    Timeout,
    #[error("request body could not be read: {0}")]
    Broken(String),
    /// The bodies of other requests already hold the whole budget.
    #[error("too many request bodies in memory right now")]
    OverBudget,
}

/// The global budget of request-body bytes held in memory (`REACHLY_BODY_BUDGET_BYTES`): a
/// body takes its bytes as they arrive (all of them at once when Content-Length announces
/// them) and gives them back when the request is finished with it. A body that would pass
/// the budget is refused at once, never queued: waiting would hold the connection and the
/// memory already read, and a 503 with `Retry-After` tells the sender exactly what to do.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    capacity: usize,
    exhausted: Counter,
}

/// Bytes of the budget held by one body; returned on drop.
pub struct BodyPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl BodyBudget {
    pub fn new(bytes: usize, metrics: &Metrics) -> BodyBudget {
        let capacity = bytes.min(Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(capacity)),
            capacity,
            exhausted: metrics.counter(HTTP_BODY_BUDGET_EXHAUSTED_TOTAL, &[]),
        }
    }

    /// Bytes not held by any body now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The whole budget (`REACHLY_BODY_BUDGET_BYTES`, capped at the semaphore's maximum).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by bodies now.
    pub fn held(&self) -> usize {
        self.capacity.saturating_sub(self.available())
    }

    /// Adds `n` bytes to `held`, or refuses (and counts) if the budget has no room.
    fn take(&self, held: &mut BodyPermit, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let n32 = u32::try_from(n).map_err(|_| BodyError::OverBudget)?;
        match self.bytes.clone().try_acquire_many_owned(n32) {
            Ok(p) => {
                match &mut held.0 {
                    Some(h) => h.merge(p),
                    None => held.0 = Some(p),
                }
                Ok(())
            }
            Err(_) => {
                self.exhausted.increment(1);
                Err(BodyError::OverBudget)
            }
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes (also when Content-Length says so
/// up front), giving up after `timeout`, and holding its bytes against `budget` (released
/// when the returned [`BodyPermit`] is dropped: keep it while the body or what was parsed
/// from it is alive).
pub async fn read_body(
    req: Req,
    limit: usize,
    timeout: Duration,
    budget: &BodyBudget,
) -> Result<(hyper::http::request::Parts, Bytes, BodyPermit), BodyError> {
    let (parts, mut body) = req.into_parts();
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut held = BodyPermit(None);
    let mut held_bytes = announced.map_or(0, |len| len as usize);
    budget.take(&mut held, held_bytes)?;
    let collect = async {
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Broken(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            let total = buf.len() + data.len();
            if total > limit {
                return Err(BodyError::TooLarge(limit));
            }
            if total > held_bytes {
                // Unannounced (chunked) or longer than announced: take as it arrives.
                budget.take(&mut held, total - held_bytes)?;
                held_bytes = total;
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    };
    let bytes = tokio::time::timeout(timeout, collect)
        .await
        .map_err(|_| BodyError::Timeout)??;
    Ok((parts, bytes, held))
}

/// The client's address: the socket peer, or the right-most untrusted address of
/// `X-Forwarded-For` when the peer is a trusted proxy (the left part of that header is
/// whatever the client wrote and cannot be believed).
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    if !is_trusted(peer_ip, trusted) {
        return peer_ip;
    }
    let mut candidate = peer_ip;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                candidate = canonical(ip);
                if !is_trusted(candidate, trusted) {
                    return candidate;
                }
            }
            Err(_) => return candidate,
        }
    }
    candidate
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Dotted-quad text of an IPv4 address, as `Ipv4Addr`'s `Display` writes it, without the
/// formatting machinery (it was 2% of the pixel route's CPU).
fn ipv4_text(octets: [u8; 4]) -> String {
    let mut s = String::with_capacity(15);
    for (i, o) in octets.into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if o >= 100 {
            s.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            s.push(char::from(b'0' + o / 10 % 10));
        }
        s.push(char::from(b'0' + o % 10));
    }
    s
}

/// The address as stored: `truncate` keeps the IPv4 /24 or IPv6 /48 network.
pub fn stored_ip(ip: IpAddr, mode: IpMode) -> Option<String> {
    match mode {
        IpMode::None => None,
        IpMode::Full => Some(match ip {
            IpAddr::V4(v4) => ipv4_text(v4.octets()),
            IpAddr::V6(v6) => v6.to_string(),
        }),
        IpMode::Truncate => Some(match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                ipv4_text([o[0], o[1], o[2], 0])
            }
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string()
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_text_matches_the_standard_display() {
        for a in [0u8, 1, 9, 10, 99, 100, 109, 110, 199, 200, 249, 255] {
            for b in [0u8, 7, 10, 100, 255] {
                let o = [a, b, 255 - a, b / 3];
                assert_eq!(ipv4_text(o), Ipv4Addr::from(o).to_string());
            }
        }
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let peer: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let ip = client_ip(peer, &headers("1.2.3.4"), &["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(ip.to_string(), "203.0.113.9");
    }

    #[test]
    fn forwarded_for_from_a_trusted_proxy_yields_the_rightmost_untrusted_hop() {
        let peer: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let ip = client_ip(peer, &headers("6.6.6.6, 198.51.100.7, 10.0.0.5"), &trusted);
        assert_eq!(ip.to_string(), "198.51.100.7");
        let ip = client_ip(peer, &headers("garbage"), &trusted);
        assert_eq!(ip.to_string(), "10.0.0.2");
    }

    #[test]
    fn ip_modes_truncate_v4_to_24_and_v6_to_48() {
        let v4: IpAddr = "198.51.100.77".parse().unwrap();
        let v6: IpAddr = "2001:db8:abcd:12:1:2:3:4".parse().unwrap();
        assert_eq!(stored_ip(v4, IpMode::Truncate).unwrap(), "198.51.100.0");
        assert_eq!(stored_ip(v6, IpMode::Truncate).unwrap(), "2001:db8:abcd::");
        assert_eq!(stored_ip(v4, IpMode::Full).unwrap(), "198.51.100.77");
        assert_eq!(stored_ip(v4, IpMode::None), None);
    }
}
