//! The HTTP layer: the route table ([`routes`]), the handlers ([`tracking`], [`webhook`],
//! [`admin`]), the shared state they read ([`state`]), the one rejection type ([`reject`]),
//! and the small helpers they share: response builders, bounded body reading with a
//! timeout, and the client address as SPEC.md defines it (socket peer, or
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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use ipnet::IpNet;

use crate::config::IpMode;

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
}

/// Reads the whole body, refusing more than `limit` bytes (also when Content-Length says so
/// up front) and giving up after `timeout`.
pub async fn read_body(
    req: Req,
    limit: usize,
    timeout: Duration,
) -> Result<(hyper::http::request::Parts, Bytes), BodyError> {
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(BodyError::TooLarge(limit));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| BodyError::Timeout)?;
    match collected {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge(limit))
        }
        Err(e) => Err(BodyError::Broken(e.to_string())),
    }
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

/// The address as stored: `truncate` keeps the IPv4 /24 or IPv6 /48 network.
pub fn stored_ip(ip: IpAddr, mode: IpMode) -> Option<String> {
    match mode {
        IpMode::None => None,
        IpMode::Full => Some(ip.to_string()),
        IpMode::Truncate => Some(match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Ipv4Addr::new(o[0], o[1], o[2], 0).to_string()
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
