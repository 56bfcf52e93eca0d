//! The client address from `X-Forwarded-For` behind a trusted proxy, in every storage mode.
#![no_main]

use hyper::header::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use reachly_ingest::config::IpMode;
use reachly_ingest::http::{client_ip, stored_ip};

fuzz_target!(|data: &[u8]| {
    let trusted = ["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
    let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut h = HeaderMap::new();
    for part in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            h.append("x-forwarded-for", v);
        }
    }
    let ip = client_ip(peer, &h, &trusted);
    assert!(stored_ip(ip, IpMode::Truncate).is_some());
    assert!(stored_ip(ip, IpMode::Full).is_some());
    assert!(stored_ip(ip, IpMode::None).is_none());
});
