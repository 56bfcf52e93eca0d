//! The `healthcheck` subcommand: one `GET` of `/healthz` or `/readyz` on a running instance's
//! admin listener, healthy only on `200`. It exists for the container image's HEALTHCHECK:
//! the slim runtime image has no curl or wget, and the service's own binary is already there.
//! Plain HTTP/1.1 over one TCP connection, the whole exchange bounded by a timeout; the
//! outcome is one line on stdout (healthy) or stderr (not).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::HealthcheckArgs;

/// Runs the check; `true` when the instance answered 200.
pub async fn run(args: &HealthcheckArgs) -> bool {
    let addr = dial_address(args.admin_listen);
    let timeout = args.timeout;
    match tokio::time::timeout(timeout, get_status(addr, &args.path)).await {
        Ok(Ok(200)) => {
            let _ = writeln!(std::io::stdout(), "{} {}: 200", addr, args.path);
            true
        }
        Ok(Ok(status)) => {
            eprintln!("reachly-ingest healthcheck: {addr}{}: {status}", args.path);
            false
        }
        Ok(Err(e)) => {
            eprintln!("reachly-ingest healthcheck: {addr}{}: {e}", args.path);
            false
        }
        Err(_) => {
            eprintln!(
                "reachly-ingest healthcheck: {addr}{}: no answer within {timeout:?}",
                args.path
            );
            false
        }
    }
}

/// The address to connect to: a listener bound to every interface is reached on loopback.
pub fn dial_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The status code of `GET path`.
async fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: reachly-ingest-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need: read until its end (or 1 KiB).
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the answer is not an HTTP status line",
        )
    })
}

/// `HTTP/1.1 200 OK\r\n...` gives 200.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_dialled_on_loopback() {
        let d = |s: &str| dial_address(s.parse().unwrap()).to_string();
        assert_eq!(d("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(d("[::]:9090"), "[::1]:9090");
        assert_eq!(d("10.1.2.3:9090"), "10.1.2.3:9090");
    }

    #[test]
    fn status_lines_parse_and_garbage_does_not() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nx: y\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
