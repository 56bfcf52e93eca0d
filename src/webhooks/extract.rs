//! Reading ESP payloads leniently: the JSON body of a request, trimmed non-blank strings of
//! an object, times in the shapes ESPs send them (epoch seconds as numbers or text, RFC 3339),
//! and the `X-Reachly-Message-Id` header some ESPs echo. Shared by every provider's
//! extraction, so a field is read the same way whoever sends it.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{WebhookError, WebhookRequest};

/// The body of a JSON webhook: a JSON content type (or none), then valid JSON; else the
/// matching 415 or 400.
pub fn json_body(req: &WebhookRequest<'_>) -> Result<serde_json::Value, WebhookError> {
    require_json(req)?;
    serde_json::from_slice(req.body)
        .map_err(|e| WebhookError::BadRequest(format!("body is not JSON: {e}")))
}

/// Requires a JSON-ish content type (absent is tolerated: some ESPs omit it).
pub fn require_json(req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
    match req.header("content-type") {
        None => Ok(()),
        Some(ct) if ct.to_ascii_lowercase().contains("json") => Ok(()),
        Some(ct) => Err(WebhookError::UnsupportedMediaType(format!(
            "expected application/json, got {ct}"
        ))),
    }
}

/// A non-empty string field of a JSON object, trimmed.
pub fn json_str<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A non-empty string field of an optional JSON object, trimmed.
pub fn str_at<'a>(obj: Option<&'a Map<String, Value>>, field: &str) -> Option<&'a str> {
    obj?.get(field)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// An object field of an optional JSON object.
pub fn obj_at<'a>(
    obj: Option<&'a Map<String, Value>>,
    field: &str,
) -> Option<&'a Map<String, Value>> {
    obj?.get(field)?.as_object()
}

/// An ESP's event time: seconds since the epoch (a JSON number or a numeric string, as
/// SendGrid, Mailgun and SparkPost send it) or RFC 3339 text (Postmark, SparkPost samples).
pub fn json_time(v: &serde_json::Value) -> Option<DateTime<Utc>> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().and_then(unix_time),
        serde_json::Value::String(s) => {
            let s = s.trim();
            match s.parse::<f64>() {
                Ok(secs) => unix_time(secs),
                Err(_) => rfc3339(s),
            }
        }
        _ => None,
    }
}

/// Seconds (possibly fractional) since the epoch.
pub fn unix_time(secs: f64) -> Option<DateTime<Utc>> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    let whole = secs.trunc() as i64;
    let nanos = ((secs - secs.trunc()) * 1e9).round().min(999_999_999.0) as u32;
    DateTime::from_timestamp(whole, nanos)
}

/// RFC 3339 / ISO 8601 with offset.
pub fn rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.to_utc())
}

/// `X-Reachly-Message-Id` from a list of echoed headers (name, value), case-insensitively.
pub fn header_message_id<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<&'a str> {
    headers
        .into_iter()
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-reachly-message-id"))
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn esp_times_are_read_leniently() {
        let at = json_time(&json!(1_700_000_000)).unwrap();
        assert_eq!(at.timestamp(), 1_700_000_000);
        assert_eq!(json_time(&json!("1700000000")), Some(at));
        assert_eq!(json_time(&json!("2023-11-14T22:13:20Z")), Some(at));
        assert_eq!(json_time(&json!("2023-11-14T22:13:20.000+00:00")), Some(at));
        for bad in [
            json!("soon"),
            json!(null),
            json!(-1),
            json!("NaN"),
            json!({}),
        ] {
            assert_eq!(json_time(&bad), None, "{bad}");
        }
    }

    #[test]
    fn unix_times_with_fractions_parse() {
        let t = unix_time(1_700_000_000.5).unwrap();
        assert_eq!(t.timestamp(), 1_700_000_000);
        assert_eq!(t.timestamp_subsec_millis(), 500);
        assert!(unix_time(f64::NAN).is_none());
    }

    #[test]
    fn strings_are_trimmed_and_blank_ones_absent() {
        let v = json!({"a": " x ", "e": " ", "n": 1, "o": {"k": "v"}});
        assert_eq!(json_str(&v, "a"), Some("x"));
        assert_eq!(json_str(&v, "e"), None);
        assert_eq!(json_str(&v, "n"), None);
        let obj = v.as_object();
        assert_eq!(str_at(obj, "a"), Some("x"));
        assert_eq!(str_at(obj_at(obj, "o"), "k"), Some("v"));
        assert_eq!(str_at(None, "a"), None);
        assert_eq!(
            header_message_id([("X-Reachly-MESSAGE-id ", " m ")]),
            Some("m")
        );
    }
}
