//! Tracking tokens v1 (SPEC.md, `docs/tokens.md`): mint and verify.
//!
//! ```text
//! 0x01 | purpose | key id | org uuid (16) | message uuid (16) | [click: URL bytes] | HMAC-SHA256(key, all before)[..16]
//! ```
//! then base64url without padding. Verification checks, in order: the encoding, the
//! version, the purpose the route expects (an open token is never a click token), the key
//! id, the MAC (constant-time, via `hmac`'s `verify_truncated_left`), and for clicks that
//! the URL is absolute `http`/`https`. A URL of any other scheme can be neither minted nor
//! redirected to: a tracking link is never an open redirect.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

use std::fmt;
use std::str::FromStr;

type HmacSha256 = hmac::Hmac<Sha256>;

pub const VERSION: u8 = 0x01;
const HEADER_LEN: usize = 35;
pub const MAC_LEN: usize = 16;
/// Longest click URL accepted in a token (browsers and proxies cut URLs near 8 KiB).
pub const MAX_URL_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Purpose {
    Open = 0x01,
    Click = 0x02,
    Unsubscribe = 0x03,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Open => "open",
            Purpose::Click => "click",
            Purpose::Unsubscribe => "unsubscribe",
        }
    }
    fn from_byte(b: u8) -> Option<Purpose> {
        match b {
            0x01 => Some(Purpose::Open),
            0x02 => Some(Purpose::Click),
            0x03 => Some(Purpose::Unsubscribe),
            _ => None,
        }
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub purpose: Purpose,
    pub key_id: u8,
    pub organization_id: Uuid,
    pub message_id: Uuid,
    /// Click tokens only: the signed destination.
    pub url: Option<String>,
}

/// Why a token was refused. `reason()` is the log/metric label; the client learns nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not base64url")]
    Encoding,
    #[error("too short")]
    Length,
    #[error("unknown version")]
    Version,
    #[error("wrong purpose")]
    Purpose,
    #[error("unknown key id")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("URL not absolute http(s)")]
    Url,
}

impl TokenError {
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Encoding => "encoding",
            TokenError::Length => "length",
            TokenError::Version => "version",
            TokenError::Purpose => "purpose",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::Url => "url",
        }
    }
}

/// Minimum token key length in bytes (SPEC.md).
pub const MIN_TOKEN_KEY_BYTES: usize = 32;

/// The token keys: `(key id, key bytes)`, the first one mints.
#[derive(Clone)]
pub struct TokenKeys(Vec<TokenKey>);

#[derive(Clone)]
struct TokenKey {
    id: u8,
    bytes: Vec<u8>,
    /// The HMAC with the key already hashed in (its inner and outer pad blocks): a
    /// verification clones it and hashes only the token, two SHA-256 blocks instead of four
    /// (every pixel and click verifies one).
    keyed: HmacSha256,
}

impl PartialEq for TokenKeys {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.id == b.id && a.bytes == b.bytes)
    }
}

impl Eq for TokenKeys {}

impl TokenKeys {
    pub fn new(keys: Vec<(u8, Vec<u8>)>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("at least one key is required".into());
        }
        for (i, (id, key)) in keys.iter().enumerate() {
            if key.len() < MIN_TOKEN_KEY_BYTES {
                return Err(format!(
                    "key id {id} is {} bytes; at least {MIN_TOKEN_KEY_BYTES} are required",
                    key.len()
                ));
            }
            if keys[..i].iter().any(|(other, _)| other == id) {
                return Err(format!("key id {id} appears twice"));
            }
        }
        Ok(TokenKeys(
            keys.into_iter()
                .map(|(id, bytes)| TokenKey {
                    id,
                    keyed: mac(&bytes),
                    bytes,
                })
                .collect(),
        ))
    }
    /// The minting key.
    pub fn primary(&self) -> (u8, &[u8]) {
        let k = &self.0[0];
        (k.id, &k.bytes)
    }
    pub fn get(&self, id: u8) -> Option<&[u8]> {
        self.find(id).map(|k| k.bytes.as_slice())
    }
    /// A fresh HMAC under key `id`, ready for the message.
    fn keyed_mac(&self, id: u8) -> Option<HmacSha256> {
        self.find(id).map(|k| k.keyed.clone())
    }
    fn find(&self, id: u8) -> Option<&TokenKey> {
        self.0.iter().find(|k| k.id == id)
    }
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.0.iter().map(|k| k.id).collect();
        write!(f, "TokenKeys(ids={ids:?}, keys=[redacted])")
    }
}

impl FromStr for TokenKeys {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut keys = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, b64) = part
                .split_once(':')
                .ok_or_else(|| "expected ID:BASE64KEY[,ID:BASE64KEY...]".to_string())?;
            let id: u8 = id
                .trim()
                .parse()
                .map_err(|_| format!("key id {id:?} is not a number 0-255"))?;
            let key = decode_base64_any(b64.trim())
                .ok_or_else(|| format!("key id {id} is not valid base64"))?;
            keys.push((id, key));
        }
        TokenKeys::new(keys)
    }
}

/// Accepts standard or URL-safe base64, padded or not.
pub fn decode_base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

fn mac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// Mints a token with the primary key. `url` is required for clicks and refused otherwise.
pub fn mint(
    keys: &TokenKeys,
    purpose: Purpose,
    org: Uuid,
    message: Uuid,
    url: Option<&str>,
) -> Result<String, TokenError> {
    let (key_id, key) = keys.primary();
    mint_with(key_id, key, purpose, org, message, url)
}

/// Mints with an explicit key (test vectors, rotation tests).
pub fn mint_with(
    key_id: u8,
    key: &[u8],
    purpose: Purpose,
    org: Uuid,
    message: Uuid,
    url: Option<&str>,
) -> Result<String, TokenError> {
    let url_bytes = match (purpose, url) {
        (Purpose::Click, Some(u)) => {
            validate_url(u)?;
            u.as_bytes()
        }
        (Purpose::Click, None) => return Err(TokenError::Url),
        (_, Some(_)) => return Err(TokenError::Url),
        (_, None) => &[][..],
    };
    let mut buf = Vec::with_capacity(HEADER_LEN + url_bytes.len() + MAC_LEN);
    buf.push(VERSION);
    buf.push(purpose as u8);
    buf.push(key_id);
    buf.extend_from_slice(org.as_bytes());
    buf.extend_from_slice(message.as_bytes());
    buf.extend_from_slice(url_bytes);
    let mut m = mac(key);
    m.update(&buf);
    let tag = m.finalize().into_bytes();
    buf.extend_from_slice(&tag[..MAC_LEN]);
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// Verifies a token for the purpose the route expects.
pub fn verify(keys: &TokenKeys, expected: Purpose, token: &str) -> Result<Token, TokenError> {
    // Largest token: header + URL + MAC, base64 grows 4/3.
    if token.len() > (HEADER_LEN + MAX_URL_BYTES + MAC_LEN) * 4 / 3 + 4 {
        return Err(TokenError::Length);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| TokenError::Encoding)?;
    if raw.len() < HEADER_LEN + MAC_LEN {
        return Err(TokenError::Length);
    }
    if raw[0] != VERSION {
        return Err(TokenError::Version);
    }
    let purpose = Purpose::from_byte(raw[1]).ok_or(TokenError::Purpose)?;
    if purpose != expected {
        return Err(TokenError::Purpose);
    }
    let key_id = raw[2];
    let mut m = keys.keyed_mac(key_id).ok_or(TokenError::UnknownKey)?;
    let (signed, tag) = raw.split_at(raw.len() - MAC_LEN);
    m.update(signed);
    m.verify_truncated_left(tag)
        .map_err(|_| TokenError::Signature)?;
    let organization_id = Uuid::from_slice(&signed[3..19]).map_err(|_| TokenError::Length)?;
    let message_id = Uuid::from_slice(&signed[19..35]).map_err(|_| TokenError::Length)?;
    let url_bytes = &signed[HEADER_LEN..];
    let url = match purpose {
        Purpose::Click => {
            let u = std::str::from_utf8(url_bytes).map_err(|_| TokenError::Url)?;
            validate_url(u)?;
            Some(u.to_owned())
        }
        _ if url_bytes.is_empty() => None,
        _ => return Err(TokenError::Length),
    };
    Ok(Token {
        purpose,
        key_id,
        organization_id,
        message_id,
        url,
    })
}

/// Absolute `http`/`https` with a host, no control characters, not too long.
pub fn validate_url(u: &str) -> Result<url::Url, TokenError> {
    if u.len() > MAX_URL_BYTES || u.chars().any(char::is_control) {
        return Err(TokenError::Url);
    }
    let parsed = url::Url::parse(u).map_err(|_| TokenError::Url)?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(parsed),
        _ => Err(TokenError::Url),
    }
}

/// The `Location` a click redirects to: the signed URL in its ASCII (punycode,
/// percent-encoded) form, which is what a header may carry.
pub fn redirect_location(url: &str) -> Result<String, TokenError> {
    Ok(validate_url(url)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_keys_parse_rotation_list_and_reject_short_keys() {
        let k32 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let k40 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9u8; 40]);
        let keys: TokenKeys = format!("2:{k32}, 1:{k40}").parse().unwrap();
        assert_eq!(keys.primary().0, 2);
        assert_eq!(keys.get(1).unwrap().len(), 40);
        assert!(keys.get(3).is_none());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert!(format!("1:{short}").parse::<TokenKeys>().is_err());
        assert!(format!("1:{k32},1:{k32}").parse::<TokenKeys>().is_err());
        assert!("nonsense".parse::<TokenKeys>().is_err());
        assert!(!format!("{keys:?}").contains(&k32));
    }

    fn keys() -> TokenKeys {
        TokenKeys::new(vec![(1, vec![0x11; 32]), (2, vec![0x22; 32])]).unwrap()
    }

    fn ids() -> (Uuid, Uuid) {
        (
            Uuid::parse_str("0190a6f0-0000-7000-8000-000000000001").unwrap(),
            Uuid::parse_str("0190a6f0-0000-7000-8000-000000000002").unwrap(),
        )
    }

    #[test]
    fn open_token_round_trips_and_is_refused_for_other_purposes() {
        let (org, msg) = ids();
        let t = mint(&keys(), Purpose::Open, org, msg, None).unwrap();
        let v = verify(&keys(), Purpose::Open, &t).unwrap();
        assert_eq!((v.organization_id, v.message_id, v.url), (org, msg, None));
        assert_eq!(
            verify(&keys(), Purpose::Click, &t),
            Err(TokenError::Purpose)
        );
        assert_eq!(
            verify(&keys(), Purpose::Unsubscribe, &t),
            Err(TokenError::Purpose)
        );
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let (org, msg) = ids();
        let t = mint(
            &keys(),
            Purpose::Click,
            org,
            msg,
            Some("https://example.com/a?b=c"),
        )
        .unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        for byte in 0..raw.len() {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[byte] ^= 1 << bit;
                let enc = URL_SAFE_NO_PAD.encode(&bad);
                assert!(
                    verify(&keys(), Purpose::Click, &enc).is_err(),
                    "flip of byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn javascript_and_relative_urls_cannot_be_minted() {
        let (org, msg) = ids();
        for u in [
            "javascript:alert(1)",
            "data:text/html,x",
            "//evil.example",
            "/path",
            "ftp://x.example/",
            "https://",
        ] {
            assert_eq!(
                mint(&keys(), Purpose::Click, org, msg, Some(u)),
                Err(TokenError::Url),
                "{u}"
            );
        }
    }

    #[test]
    fn a_validly_signed_javascript_url_is_still_refused_at_verify() {
        // Forge what a buggy minter elsewhere could produce: correct MAC, bad scheme.
        let (org, msg) = ids();
        let mut buf = vec![VERSION, Purpose::Click as u8, 1];
        buf.extend_from_slice(org.as_bytes());
        buf.extend_from_slice(msg.as_bytes());
        buf.extend_from_slice(b"javascript:alert(1)");
        let mut m = mac(&[0x11; 32]);
        m.update(&buf);
        let tag = m.finalize().into_bytes();
        buf.extend_from_slice(&tag[..MAC_LEN]);
        assert_eq!(
            verify(&keys(), Purpose::Click, &URL_SAFE_NO_PAD.encode(buf)),
            Err(TokenError::Url)
        );
    }

    #[test]
    fn a_rotated_key_still_verifies_and_an_unknown_key_does_not() {
        let (org, msg) = ids();
        let old = mint_with(2, &[0x22; 32], Purpose::Open, org, msg, None).unwrap();
        assert_eq!(verify(&keys(), Purpose::Open, &old).unwrap().key_id, 2);
        let unknown = mint_with(9, &[0x22; 32], Purpose::Open, org, msg, None).unwrap();
        assert_eq!(
            verify(&keys(), Purpose::Open, &unknown),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        for t in ["", "a", "====", "!!!!", &"A".repeat(10_000), "AQEB"] {
            assert!(verify(&keys(), Purpose::Open, t).is_err());
        }
    }

    #[test]
    fn non_ascii_urls_redirect_in_ascii_form() {
        let loc = redirect_location("https://bücher.example/straße?q=ü").unwrap();
        assert!(loc.is_ascii());
        assert!(loc.starts_with("https://xn--bcher-kva.example/"));
    }
}
