//! Shared-secret checks for the providers that authenticate with one (Postmark, SparkPost):
//! constant-time comparison and HTTP basic auth.

use hyper::header::HeaderMap;

/// Constant-time equality of secrets.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// HTTP basic auth against `USER:PASSWORD`, in constant time.
pub fn basic_auth_ok(headers: &HeaderMap, expected: &str) -> bool {
    use base64::Engine as _;
    let Some(v) = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return false;
    };
    match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
        Ok(given) => secrets_equal(&given, expected.as_bytes()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_checked() {
        use base64::Engine as _;
        let mut h = HeaderMap::new();
        let good = base64::engine::general_purpose::STANDARD.encode("u:p");
        h.insert("authorization", format!("Basic {good}").parse().unwrap());
        assert!(basic_auth_ok(&h, "u:p"));
        assert!(!basic_auth_ok(&h, "u:q"));
        assert!(!basic_auth_ok(&HeaderMap::new(), "u:p"));
        assert!(secrets_equal(b"a", b"a") && !secrets_equal(b"a", b"ab"));
    }
}
