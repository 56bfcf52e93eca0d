//! The event model: [`Event`] is one future row of `email_events` (plus the typed fields
//! the status merge needs), [`DeadLetter`] one row of `webhook_dead_letters`, and
//! [`Record`] either of them as it travels through the pipeline and the spool. The column
//! order and binary COPY types of `email_events` live here, next to the struct.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_postgres::types::{IsNull, ToSql, Type, accepts, to_sql_checked};
use uuid::Uuid;

/// Event types of SPEC.md: the seed's seven plus `deferred` and `dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Sent,
    Delivered,
    Opened,
    Clicked,
    Bounced,
    Complained,
    Unsubscribed,
    Deferred,
    Dropped,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::Sent,
        EventType::Delivered,
        EventType::Opened,
        EventType::Clicked,
        EventType::Bounced,
        EventType::Complained,
        EventType::Unsubscribed,
        EventType::Deferred,
        EventType::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Sent => "sent",
            EventType::Delivered => "delivered",
            EventType::Opened => "opened",
            EventType::Clicked => "clicked",
            EventType::Bounced => "bounced",
            EventType::Complained => "complained",
            EventType::Unsubscribed => "unsubscribed",
            EventType::Deferred => "deferred",
            EventType::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceClass {
    /// Permanent: the address is dead; the contact is suppressed.
    Hard,
    /// Temporary: only `error_message` moves.
    Soft,
}

impl BounceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::Hard => "hard",
            BounceClass::Soft => "soft",
        }
    }
}

/// Where an event came from: our own tracking endpoints or an ESP webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Pixel,
    Click,
    Unsubscribe,
    Sendgrid,
    Mailgun,
    Ses,
    Postmark,
    Sparkpost,
    Mandrill,
    Resend,
}

impl Source {
    /// The metrics label (`reachly_events_received_total{source}`).
    pub fn label(self) -> &'static str {
        match self {
            Source::Pixel => "pixel",
            Source::Click => "click",
            Source::Unsubscribe => "unsubscribe",
            Source::Sendgrid => "sendgrid",
            Source::Mailgun => "mailgun",
            Source::Ses => "ses",
            Source::Postmark => "postmark",
            Source::Sparkpost => "sparkpost",
            Source::Mandrill => "mandrill",
            Source::Resend => "resend",
        }
    }

    /// The `email_events.provider` column: the ESP's name, or `reachly` for our own endpoints.
    pub fn provider(self) -> &'static str {
        match self {
            Source::Pixel | Source::Click | Source::Unsubscribe => "reachly",
            other => other.label(),
        }
    }
}

/// One event as it will be stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// UUIDv7 assigned when the event is accepted. Every write is `ON CONFLICT DO NOTHING`
    /// on it, so a retried batch or a replayed spool never stores an event twice.
    pub id: Uuid,
    pub message_id: Uuid,
    /// The tenant the request named (token or ESP metadata). Never stored as such: the
    /// writer takes `organization_id` from the message's row and dead-letters a mismatch.
    pub claimed_organization_id: Option<Uuid>,
    pub event_type: EventType,
    /// When the event happened: the ESP's timestamp, else the request's arrival. Partition key.
    pub occurred_at: DateTime<Utc>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub link_url: Option<String>,
    pub source: Source,
    /// Idempotency key of ESP events (provider-prefixed); `None` for our own tracking hits.
    pub dedup_key: Option<String>,
    /// The ESP gave no time of its own, so `occurred_at` is this delivery's arrival and
    /// differs between re-deliveries. The unique index of `email_events` includes the time
    /// (its partition key), so the writer deduplicates such an event on `dedup_key` alone,
    /// through `webhook_event_keys`.
    #[serde(default)]
    pub undated: bool,
    pub bounce_class: Option<BounceClass>,
    /// `Some(reason)`: machine traffic (HEAD, prefetcher, scanner). Stored, moves nothing.
    pub machine_reason: Option<String>,
    /// Diagnostic text for bounces, deferrals and drops (feeds `campaign_messages.error_message`).
    pub error_message: Option<String>,
    /// Provider fields worth keeping (reason, diagnostic code, ESP message id...).
    pub metadata: Map<String, Value>,
}

impl Event {
    /// A new event with a fresh time-ordered id (of now, its arrival: see [`new_event_id`])
    /// and nothing optional set.
    pub fn new(
        message_id: Uuid,
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        source: Source,
    ) -> Event {
        Event::arriving_at(message_id, event_type, occurred_at, source, Utc::now())
    }

    /// An event happening as it arrives (our own tracking hits): its time and its id's
    /// are the same reading of the clock.
    pub fn happening_now(message_id: Uuid, event_type: EventType, source: Source) -> Event {
        let now = Utc::now();
        Event::arriving_at(message_id, event_type, now, source, now)
    }

    fn arriving_at(
        message_id: Uuid,
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        source: Source,
        arrival: DateTime<Utc>,
    ) -> Event {
        Event {
            id: new_event_id(arrival),
            message_id,
            claimed_organization_id: None,
            event_type,
            occurred_at,
            ip_address: None,
            user_agent: None,
            link_url: None,
            source,
            dedup_key: None,
            undated: false,
            bounce_class: None,
            machine_reason: None,
            error_message: None,
            metadata: Map::new(),
        }
    }

    pub fn is_machine(&self) -> bool {
        self.machine_reason.is_some()
    }

    /// The `metadata` column: provider fields plus the typed flags SPEC.md names
    /// (`bounce_class`, `machine`, `machine_reason`, `error`), as a value.
    pub fn metadata_json(&self) -> Value {
        let mut v = serde_json::to_value(EventMetadata(self))
            .unwrap_or_else(|_| Value::Object(self.metadata.clone()));
        strip_nul(&mut v);
        v
    }
}

/// An event's `metadata` column as the writer encodes it: the provider fields and the typed
/// flags serialized straight from the event, without copying its map (the writer did that
/// once per row). A typed flag replaces a provider field of the same name, except `error`,
/// which a provider's own `error` field keeps. Encoded as `jsonb` (binary COPY); a NUL in a
/// key or string, which PostgreSQL refuses, takes the slower path of [`Event::metadata_json`]
/// (NUL made U+FFFD).
#[derive(Debug)]
pub struct EventMetadata<'a>(pub &'a Event);

impl Serialize for EventMetadata<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let mut map = s.serialize_map(None)?;
        for (k, v) in &e.metadata {
            let replaced = match k.as_str() {
                "bounce_class" => e.bounce_class.is_some(),
                "machine" | "machine_reason" => e.machine_reason.is_some(),
                _ => false,
            };
            if !replaced {
                map.serialize_entry(k, v)?;
            }
        }
        if let Some(b) = e.bounce_class {
            map.serialize_entry("bounce_class", b.as_str())?;
        }
        if let Some(reason) = &e.machine_reason {
            map.serialize_entry("machine", &true)?;
            map.serialize_entry("machine_reason", reason)?;
        }
        if let Some(err) = &e.error_message
            && !e.metadata.contains_key("error")
        {
            map.serialize_entry("error", err)?;
        }
        map.end()
    }
}

impl ToSql for EventMetadata<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1); // jsonb's binary format version
        }
        let start = out.len();
        serde_json::to_writer(out.writer(), self)?;
        // serde_json writes a NUL as the escape `\u0000` (a `\\u0000` in the text contains it
        // too: a false alarm costs only the slow path).
        if out[start..].windows(6).any(|w| w == b"\\u0000") {
            out.truncate(start);
            serde_json::to_writer(out.writer(), &self.0.metadata_json())?;
        }
        Ok(IsNull::No)
    }

    accepts!(JSON, JSONB);
    to_sql_checked!();
}

/// PostgreSQL's jsonb refuses `\u0000` in strings (and keys); one such value would fail
/// the whole COPY, so NULs become U+FFFD everywhere in the tree.
fn strip_nul(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
        Value::Array(a) => a.iter_mut().for_each(strip_nul),
        Value::Object(o) => {
            if o.keys().any(|k| k.contains('\0')) {
                *o = std::mem::take(o)
                    .into_iter()
                    .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), v))
                    .collect();
            }
            o.values_mut().for_each(strip_nul);
        }
        _ => {}
    }
}

/// A time-ordered UUID (v7) of `at`. Events get the time of their arrival, not the time
/// the ESP says they happened: ids then only grow, so every insert into the primary key
/// (id, created_at) lands on its rightmost page. With the event's own time, a webhook
/// reporting events up to minutes old scattered its inserts over the index's last minutes,
/// more pages than the buffer pool keeps, each dirtied and written again.
pub fn new_event_id(at: DateTime<Utc>) -> Uuid {
    let secs = at.timestamp().max(0) as u64;
    let nanos = at.timestamp_subsec_nanos();
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, nanos);
    Uuid::new_v7(ts)
}

/// Something an ESP sent that cannot become an event: kept with its raw payload and reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: Uuid,
    pub received_at: DateTime<Utc>,
    pub provider: String,
    /// snake_case reason, e.g. `no_message_id`, `unknown_message`, `unknown_event_type`.
    pub reason: String,
    pub organization_id: Option<Uuid>,
    pub message_id: Option<Uuid>,
    pub event_type: Option<String>,
    /// Same role as `Event::dedup_key`: a re-delivered request adds no second dead letter.
    pub dedup_key: Option<String>,
    /// The event exactly as received (one element of a batch, or the whole body).
    pub payload: String,
}

impl DeadLetter {
    pub fn new(provider: &str, reason: &str, payload: impl Into<String>) -> DeadLetter {
        let now = Utc::now();
        DeadLetter {
            id: new_event_id(now),
            received_at: now,
            provider: provider.to_owned(),
            reason: reason.to_owned(),
            organization_id: None,
            message_id: None,
            event_type: None,
            dedup_key: None,
            payload: payload.into(),
        }
    }

    /// An event the writer could not store (unknown message, tenant mismatch, rejected row).
    pub fn from_event(event: &Event, reason: &str) -> DeadLetter {
        let payload = serde_json::to_string(event).unwrap_or_else(|_| String::from("{}"));
        DeadLetter {
            id: event.id,
            received_at: Utc::now(),
            provider: event.source.label().to_owned(),
            reason: reason.to_owned(),
            // The claimed organization is unverified (it stays in the payload); the writer
            // sets the message row's organization when the message exists.
            organization_id: None,
            message_id: Some(event.message_id),
            event_type: Some(event.event_type.as_str().to_owned()),
            dedup_key: event.dedup_key.clone(),
            payload,
        }
    }
}

/// What flows through the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Event(Event),
    DeadLetter(DeadLetter),
}

impl Record {
    /// About how many bytes of memory this record holds while it is buffered: its own size,
    /// every string's capacity and the metadata's entries, each heap block rounded up to
    /// the allocator's 16-byte granule. An estimate, not an allocator reading: it only has
    /// to grow with what the record really holds, so that `REACHLY_BUFFER_MAX_BYTES` bounds
    /// the buffer's memory whatever the events carry (the load test's mix averages ~600 B;
    /// a bounce with a long diagnostic, or a dead letter with a whole webhook body as its
    /// payload, can hold many times that).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Record>()
            + match self {
                Record::Event(e) => {
                    [
                        &e.ip_address,
                        &e.user_agent,
                        &e.link_url,
                        &e.dedup_key,
                        &e.machine_reason,
                        &e.error_message,
                    ]
                    .into_iter()
                    .map(|s| s.as_ref().map_or(0, |s| heap_block(s.capacity())))
                    .sum::<usize>()
                        + map_bytes(&e.metadata)
                }
                Record::DeadLetter(d) => [
                    Some(&d.provider),
                    Some(&d.reason),
                    d.event_type.as_ref(),
                    d.dedup_key.as_ref(),
                    Some(&d.payload),
                ]
                .into_iter()
                .map(|s| s.map_or(0, |s| heap_block(s.capacity())))
                .sum(),
            }
    }
}

/// A heap block of `n` bytes as the allocator hands it out (16-byte granules; none for 0).
fn heap_block(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Bytes a JSON map holds: its B-tree nodes (eleven key and value slots each, whatever
/// number is used; about eight used per node in a larger map) and each key's and value's
/// own heap blocks.
fn map_bytes(m: &Map<String, Value>) -> usize {
    const NODE: usize = 11 * (std::mem::size_of::<String>() + std::mem::size_of::<Value>()) + 16;
    m.len().div_ceil(8) * heap_block(NODE)
        + m.iter()
            .map(|(k, v)| heap_block(k.capacity()) + value_bytes(v))
            .sum::<usize>()
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => heap_block(s.capacity()),
        Value::Array(a) => {
            heap_block(a.capacity() * std::mem::size_of::<Value>())
                + a.iter().map(value_bytes).sum::<usize>()
        }
        Value::Object(m) => map_bytes(m),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// `email_events` columns in COPY order, and their types (binary COPY needs both).
pub const EVENT_COLUMNS: &str = "id, organization_id, message_id, event_type, ip_address, user_agent, link_url, metadata, created_at, provider, dedup_key";
pub const EVENT_COLUMN_TYPES: [Type; 11] = [
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::VARCHAR,
    Type::VARCHAR,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::VARCHAR,
    Type::TEXT,
];

/// Longest user agent stored; longer ones are cut at a character boundary.
pub const MAX_USER_AGENT_BYTES: usize = 512;
/// Longest link URL / error text stored.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Cuts `s` to at most `max` bytes on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Text PostgreSQL will accept: no NUL bytes (they would fail the whole COPY).
pub fn pg_text(s: &str, max: usize) -> String {
    pg_text_ref(s, max).into_owned()
}

/// [`pg_text`] without a copy when `s` needs no change (the writer's per-row case).
pub fn pg_text_ref(s: &str, max: usize) -> Cow<'_, str> {
    let cut = truncate_utf8(s, max);
    match cut.contains('\0') {
        true => Cow::Owned(cut.replace('\0', "\u{FFFD}")),
        false => Cow::Borrowed(cut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_memory_estimate_grows_with_what_it_holds() {
        let mut e = Event::new(Uuid::nil(), EventType::Opened, Utc::now(), Source::Pixel);
        let bare = Record::Event(e.clone()).memory_bytes();
        assert!(bare >= std::mem::size_of::<Record>(), "{bare}");
        e.user_agent = Some("Mozilla/5.0 ".repeat(40));
        let with_ua = Record::Event(e.clone()).memory_bytes();
        assert!(with_ua >= bare + 480, "{bare} -> {with_ua}");
        e.metadata.insert(
            "diagnostic".into(),
            Value::from("550 5.1.1 mailbox unavailable ".repeat(10)),
        );
        let with_meta = Record::Event(e).memory_bytes();
        assert!(with_meta >= with_ua + 300, "{with_ua} -> {with_meta}");
        let dead = Record::DeadLetter(DeadLetter::new(
            "sendgrid",
            "no_message_id",
            "x".repeat(5000),
        ));
        assert!(dead.memory_bytes() >= 5000);
    }

    #[test]
    fn an_event_id_is_of_its_arrival_not_of_the_time_it_reports() {
        let hour_ago = Utc::now() - chrono::Duration::hours(1);
        let before = new_event_id(Utc::now() - chrono::Duration::seconds(1));
        let e = Event::new(
            Uuid::nil(),
            EventType::Delivered,
            hour_ago,
            Source::Sendgrid,
        );
        assert_eq!(e.occurred_at, hour_ago);
        assert!(e.id > before, "{} is older than a second ago", e.id);
        assert!(e.id > new_event_id(hour_ago));
    }

    #[test]
    fn event_ids_are_time_ordered_by_event_time() {
        let t1 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let t2 = DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z")
            .unwrap()
            .to_utc();
        let a = new_event_id(t1);
        let b = new_event_id(t2);
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b);
    }

    #[test]
    fn metadata_carries_bounce_class_and_machine_flag() {
        let mut e = Event::new(
            Uuid::nil(),
            EventType::Bounced,
            Utc::now(),
            Source::Sendgrid,
        );
        e.bounce_class = Some(BounceClass::Hard);
        e.machine_reason = Some("head".into());
        let m = e.metadata_json();
        assert_eq!(m["bounce_class"], "hard");
        assert_eq!(m["machine"], true);
        assert_eq!(m["machine_reason"], "head");
    }

    /// A bounce with a NUL in a metadata key, in a nested string and in its error text.
    fn event_with_nuls() -> Event {
        let mut e = Event::new(Uuid::nil(), EventType::Bounced, Utc::now(), Source::Mailgun);
        e.metadata
            .insert("a\0b".into(), serde_json::json!({"x": ["ok", "bad\0"]}));
        e.error_message = Some("550\0".into());
        e
    }

    #[test]
    fn metadata_never_carries_a_nul_postgres_would_refuse() {
        let text = event_with_nuls().metadata_json().to_string();
        assert!(!text.contains("\\u0000"), "{text}");
        assert!(
            text.contains("a\u{FFFD}b") && text.contains("bad\u{FFFD}"),
            "{text}"
        );
    }

    /// What the writer's COPY sends for the `metadata` column, parsed back.
    fn encoded_metadata(e: &Event) -> Value {
        let mut out = BytesMut::new();
        let is_null = EventMetadata(e).to_sql(&Type::JSONB, &mut out).unwrap();
        assert!(matches!(is_null, IsNull::No));
        assert_eq!(out[0], 1, "jsonb version byte");
        serde_json::from_slice(&out[1..]).unwrap()
    }

    #[test]
    fn the_writers_metadata_encoding_is_the_metadata_value() {
        let mut cases = Vec::new();
        let bare = Event::new(Uuid::nil(), EventType::Opened, Utc::now(), Source::Pixel);
        cases.push(bare.clone());
        let mut proxied = bare.clone();
        proxied.metadata.insert("proxy".into(), "gmail".into());
        cases.push(proxied);
        // Typed flags replace a provider's fields of the same name; a provider's own
        // `error` stays.
        let mut bounce = Event::new(
            Uuid::nil(),
            EventType::Bounced,
            Utc::now(),
            Source::Sendgrid,
        );
        bounce.bounce_class = Some(BounceClass::Hard);
        bounce.machine_reason = Some("user_agent:curl".into());
        bounce.error_message = Some("550 5.1.1".into());
        for k in [
            "bounce_class",
            "machine",
            "machine_reason",
            "error",
            "reason",
        ] {
            bounce
                .metadata
                .insert(k.into(), serde_json::json!({"from": "provider", "k": k}));
        }
        cases.push(bounce.clone());
        bounce.metadata.remove("error");
        cases.push(bounce);
        // A NUL anywhere takes the slow path, which replaces it.
        let nul = event_with_nuls();
        cases.push(nul.clone());
        // A backslash before `u0000` is no NUL, and is kept as sent.
        let mut escaped = bare.clone();
        escaped.metadata.insert("path".into(), "C:\\u0000".into());
        cases.push(escaped);
        for e in &cases {
            assert_eq!(encoded_metadata(e), e.metadata_json(), "{e:?}");
        }
        let stored = encoded_metadata(&nul).to_string();
        assert!(
            !stored.contains("\\u0000") && stored.contains("bad\u{FFFD}"),
            "{stored}"
        );
        let m = encoded_metadata(&cases[2]);
        assert_eq!(m["bounce_class"], "hard");
        assert_eq!(m["machine"], true);
        assert_eq!(m["machine_reason"], "user_agent:curl");
        assert_eq!(m["error"]["from"], "provider");
        assert_eq!(encoded_metadata(&cases[3])["error"], "550 5.1.1");
        assert_eq!(encoded_metadata(&cases[5])["path"], "C:\\u0000");
    }

    #[test]
    fn text_is_copied_only_when_it_must_change() {
        assert!(matches!(pg_text_ref("plain", 10), Cow::Borrowed("plain")));
        assert!(matches!(pg_text_ref("héllo", 2), Cow::Borrowed("h")));
        assert_eq!(pg_text_ref("a\0b", 10), "a\u{FFFD}b");
    }

    #[test]
    fn truncation_keeps_utf8_valid_and_strips_nul() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(pg_text("a\0b", 10), "a\u{FFFD}b");
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }
}
