//! Facts to records: the one path every provider's events take after extraction. A provider
//! reads an ESP event into [`Facts`] (its name, the SPEC type it maps to, dedup key
//! material, the Reachly ids it echoed, the time, engagement data, error text and the fields
//! worth keeping); [`Facts::into_record`] decides, the same way for every ESP:
//!
//! 1. an event whose name maps to no SPEC type is a dead letter `unknown_event_type`;
//! 2. correlation: a missing or malformed `reachly_message_id`, or a malformed
//!    `reachly_organization_id`, is a dead letter ([`correlate`]);
//! 3. the event time, else the arrival time (SPEC: an unreadable time falls back), and then
//!    the event is marked `undated` so that the writer catches its re-delivery on the key
//!    alone (`webhook_event_keys`), whatever time that re-delivery arrives at;
//! 4. engagement: address and client as the ESP reported them (the HTTP layer then applies
//!    `REACHLY_IP_MODE`), the link of a click, and for opens and clicks the machine-traffic
//!    verdict: the ESP's own (SendGrid machine opens, Mailgun bots) or else the user agent's;
//! 5. text made storable: error text and every metadata string bounded to
//!    [`MAX_TEXT_BYTES`] and NUL-free ([`Metadata`]), since one NUL fails a whole COPY.
//!
//! Dead letters carry one vocabulary, [`DeadReason`], and a dedup key (the event's, or a
//! hash of the raw payload) so a re-delivery adds no second one.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{
    BounceClass, DeadLetter, Event, EventType, MAX_TEXT_BYTES, Record, Source, pg_text,
};
use crate::machine::MachineDetector;

/// Why an ESP event became a dead letter instead of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Not an event object at all (a number in SendGrid's array, an element without `msys`).
    MalformedEvent,
    /// The event's name maps to no SPEC type (list events, resubscribes, sync events, ...).
    UnknownEventType,
    /// No `reachly_message_id` (custom arg, variable, tag, metadata or echoed header).
    NoMessageId,
    /// A `reachly_message_id` that is not a UUID.
    InvalidMessageId,
    /// A `reachly_organization_id` that is not a UUID.
    InvalidOrganizationId,
    /// SES: an authenticated SNS notification whose `Message` is not a JSON object.
    UnparseableMessage,
    /// SES: a subscription preference change other than "unsubscribe from all".
    UnmappedSubscriptionChange,
    /// The ESP's notice that it suppressed an address because of an event it reports on its
    /// own (Postmark's SubscriptionChange after a Bounce or SpamComplaint), or a suppression
    /// that is not the recipient's (by the sender or the ESP): moves nothing.
    SuppressionNotice,
    /// A feedback report saying the message is not spam (SES `not-spam`).
    NotAComplaint,
    /// A "bounce" that is no failure of the send: an auto-reply, a subscribe request, a
    /// challenge-response (SparkPost classes 60, 80, 100).
    NotAFailure,
    /// SparkPost's top-pixel `initial_open` while `open` is the open counted (default).
    InitialOpenNotCounted,
    /// SparkPost's bottom-pixel `open` while `initial_open` is the open counted.
    OpenCountedAsInitialOpen,
}

impl DeadReason {
    /// The stored `reason` (snake_case, stable: rows and dashboards keep it).
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MalformedEvent => "malformed_event",
            DeadReason::UnknownEventType => "unknown_event_type",
            DeadReason::NoMessageId => "no_message_id",
            DeadReason::InvalidMessageId => "invalid_message_id",
            DeadReason::InvalidOrganizationId => "invalid_organization_id",
            DeadReason::UnparseableMessage => "unparseable_message",
            DeadReason::UnmappedSubscriptionChange => "unmapped_subscription_change",
            DeadReason::SuppressionNotice => "suppression_notice",
            DeadReason::NotAComplaint => "not_a_complaint",
            DeadReason::NotAFailure => "not_a_failure",
            DeadReason::InitialOpenNotCounted => "initial_open_not_counted",
            DeadReason::OpenCountedAsInitialOpen => "open_counted_as_initial_open",
        }
    }
}

/// A SPEC type with the bounce class an ESP's event name implies.
pub type Mapped = (EventType, Option<BounceClass>);

/// An ESP's event names to SPEC types: the table a simple provider's module doc shows.
pub type EventTable = [(&'static str, EventType, Option<BounceClass>)];

/// The SPEC type of `name` in `table`, exactly as spelled.
pub fn lookup(table: &EventTable, name: &str) -> Option<Mapped> {
    table
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, t, c)| (*t, *c))
}

/// What a provider read from one ESP event.
#[derive(Debug, Default, Clone)]
pub struct Facts<'a> {
    /// The ESP's name for the event, as a dead letter records it.
    pub kind: Option<Cow<'a, str>>,
    /// The SPEC type; `None` makes a dead letter: `unknown_event_type`, or [`Self::unmapped`].
    pub mapped: Option<Mapped>,
    /// Why a known type maps to nothing here (SES preference changes), if it does not.
    pub unmapped: Option<DeadReason>,
    /// The event's dedup key ([`id_key`] or [`content_key`]); a dead letter without one is
    /// keyed on its raw payload.
    pub key: Option<String>,
    /// A dead letter's key when it must differ from the event's (`None`: [`Self::key`]).
    pub dead_letter_key: Option<String>,
    /// `reachly_message_id` as echoed, untrimmed and unparsed.
    pub message_id: Option<&'a str>,
    /// `reachly_organization_id` as echoed.
    pub organization_id: Option<&'a str>,
    /// When the ESP says it happened; `None` means the arrival time.
    pub occurred_at: Option<DateTime<Utc>>,
    pub engagement: Engagement<'a>,
    /// Why a bounce, deferral or drop happened, as the ESP says it.
    pub error: Option<String>,
    pub metadata: Metadata,
}

/// What an ESP reports about an open, click or unsubscribe.
#[derive(Debug, Default, Clone)]
pub struct Engagement<'a> {
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The clicked link (used only on clicks).
    pub link_url: Option<&'a str>,
    /// The ESP's own machine verdict, as a reason; overrides the user-agent check.
    pub machine: Option<String>,
}

impl Facts<'_> {
    /// The record: an event, or a dead letter saying why not (see the module doc).
    pub fn into_record(
        self,
        source: Source,
        raw: &str,
        received_at: DateTime<Utc>,
        machine: &MachineDetector,
    ) -> Record {
        let kind = self.kind.as_deref();
        let dead_key = || self.dead_letter_key.clone().or_else(|| self.key.clone());
        let Some((event_type, bounce_class)) = self.mapped else {
            let reason = self.unmapped.unwrap_or(DeadReason::UnknownEventType);
            return dead_letter(source, reason, raw, dead_key(), kind);
        };
        let (message_id, organization_id) = match correlate(self.message_id, self.organization_id) {
            Ok(ids) => ids,
            Err(reason) => return dead_letter(source, reason, raw, dead_key(), kind),
        };
        let mut e = Event::new(
            message_id,
            event_type,
            self.occurred_at.unwrap_or(received_at),
            source,
        );
        e.claimed_organization_id = organization_id;
        // No time of its own: stored at its arrival, so the writer deduplicates it on the
        // key alone (a re-delivery arrives at another time).
        e.undated = self.occurred_at.is_none();
        e.dedup_key = Some(
            self.key
                .unwrap_or_else(|| content_key(source, &["dead_letter", raw])),
        );
        e.bounce_class = bounce_class;
        let en = self.engagement;
        e.ip_address = en.ip.map(str::to_owned);
        e.user_agent = en.user_agent.map(str::to_owned);
        if event_type == EventType::Clicked {
            e.link_url = en.link_url.map(str::to_owned);
        }
        if matches!(event_type, EventType::Opened | EventType::Clicked) {
            e.machine_reason = en
                .machine
                .or_else(|| machine.classify_reported(en.user_agent));
        }
        e.error_message = self.error.map(|t| pg_text(&t, MAX_TEXT_BYTES));
        e.metadata = self.metadata.0;
        Record::Event(e)
    }
}

/// What differs between the recipients one ESP message reports (an SES bounce lists several).
#[derive(Debug, Default)]
pub struct Part {
    pub error: Option<String>,
    pub metadata: Metadata,
    /// This recipient's own dedup key (SES keys each recipient's event on its content);
    /// `None`: the message's key, suffixed `#<index>` when there are several parts.
    pub key: Option<String>,
}

impl Facts<'_> {
    /// One event per part, keyed `<key>#<index>` when there are several, so they do not
    /// collide; a message that cannot become events stays one dead letter.
    pub fn into_records(
        mut self,
        source: Source,
        raw: &str,
        received_at: DateTime<Utc>,
        machine: &MachineDetector,
        parts: Vec<Part>,
    ) -> Vec<Record> {
        let events =
            self.mapped.is_some() && correlate(self.message_id, self.organization_id).is_ok();
        if !events || parts.len() <= 1 {
            if let Some(part) = parts.into_iter().next() {
                self.absorb(part);
            }
            return vec![self.into_record(source, raw, received_at, machine)];
        }
        parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| {
                let mut f = self.clone();
                f.key = f.key.map(|k| format!("{k}#{i}"));
                f.absorb(part);
                f.into_record(source, raw, received_at, machine)
            })
            .collect()
    }

    fn absorb(&mut self, part: Part) {
        if part.error.is_some() {
            self.error = part.error;
        }
        if part.key.is_some() {
            self.key = part.key;
        }
        self.metadata.0.extend(part.metadata.0);
    }
}

/// Provider fields kept on an event, every string trimmed, bounded and NUL-free.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metadata(Map<String, Value>);

impl Metadata {
    /// A non-blank text field.
    pub fn text(&mut self, name: &str, value: Option<&str>) {
        if let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) {
            self.0
                .insert(name.to_owned(), Value::String(pg_text(v, MAX_TEXT_BYTES)));
        }
    }

    /// Any JSON value (a number, flag or object), its strings bounded as [`Self::text`]'s.
    pub fn value(&mut self, name: &str, mut value: Value) {
        bound_strings(&mut value);
        self.0.insert(name.to_owned(), value);
    }

    /// Copies scalar fields of an ESP object (`(field, our name)` pairs): non-blank strings,
    /// numbers and booleans; objects, arrays and nulls are left out.
    pub fn keep(&mut self, object: Option<&Value>, fields: &[(&str, &str)]) {
        let Some(object) = object else { return };
        for (from, to) in fields {
            match object.get(*from) {
                Some(Value::String(s)) => self.text(to, Some(s)),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                    self.0.insert((*to).to_owned(), v.clone());
                }
                _ => {}
            }
        }
    }

    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

fn bound_strings(v: &mut Value) {
    match v {
        Value::String(s) => *s = pg_text(s, MAX_TEXT_BYTES),
        Value::Array(items) => items.iter_mut().for_each(bound_strings),
        Value::Object(map) => map.values_mut().for_each(bound_strings),
        _ => {}
    }
}

/// The message and claimed tenant of an ESP event, from the values the sending application
/// attached. `Err` is the dead-letter reason.
pub fn correlate(
    message_id: Option<&str>,
    organization_id: Option<&str>,
) -> Result<(Uuid, Option<Uuid>), DeadReason> {
    let raw = message_id
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(DeadReason::NoMessageId)?;
    let message = Uuid::parse_str(raw).map_err(|_| DeadReason::InvalidMessageId)?;
    let org = match organization_id.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(o) => Some(Uuid::parse_str(o).map_err(|_| DeadReason::InvalidOrganizationId)?),
    };
    Ok((message, org))
}

/// Dedup key from the provider's own stable event id.
pub fn id_key(source: Source, id: &str) -> String {
    format!("{}:id:{}", source.label(), id.trim())
}

/// Dedup key from a hash of the event's content (provider, message, type, time, URL ...).
pub fn content_key(source: Source, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}:h:{hex}", source.label())
}

/// A dead letter of one ESP event (its raw text), keyed so a re-delivery adds no second one:
/// on `dedup_key`, else on the raw payload.
pub fn dead_letter(
    source: Source,
    reason: DeadReason,
    raw: &str,
    dedup_key: Option<String>,
    event_type: Option<&str>,
) -> Record {
    let mut d = DeadLetter::new(source.label(), reason.as_str(), raw);
    d.dedup_key = dedup_key.or_else(|| Some(content_key(source, &["dead_letter", raw])));
    d.event_type = event_type.map(str::to_owned);
    Record::DeadLetter(d)
}

/// A batch element that is not an event object.
pub fn malformed(source: Source, raw: &str) -> Record {
    dead_letter(source, DeadReason::MalformedEvent, raw, None, None)
}

/// Asserts that a module doc (`source`, the module's text) shows `table`: every name is in
/// a table row whose SPEC column starts with its type (and names its bounce class).
#[cfg(test)]
pub(crate) fn assert_doc_shows(source: &str, table: &EventTable) {
    let rows: Vec<(&str, &str)> = source
        .lines()
        .filter_map(|l| l.strip_prefix("//! |"))
        .filter_map(|row| {
            let mut cells = row.split('|').map(str::trim);
            Some((cells.next()?, cells.next()?))
        })
        .collect();
    for (name, event_type, class) in table {
        let quoted = format!("`{name}`");
        let row = rows
            .iter()
            .find(|(names, _)| names.split(", ").any(|n| n.trim() == quoted));
        let Some((_, spec)) = row else {
            panic!("the module doc has no row for {quoted}");
        };
        assert!(spec.starts_with(event_type.as_str()), "{quoted}: {spec}");
        if let Some(c) = class {
            assert!(
                spec.contains(c.as_str()),
                "{quoted}: {spec} names no {}",
                c.as_str()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const M: &str = "0190a6f0-0000-7000-8000-000000000002";

    fn record(facts: Facts<'_>) -> Record {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        facts.into_record(Source::Sendgrid, "{}", at, &MachineDetector::default())
    }

    #[test]
    fn correlation_requires_a_uuid_message_id() {
        assert_eq!(correlate(Some(M), None).unwrap().0.to_string(), M);
        assert_eq!(correlate(None, None), Err(DeadReason::NoMessageId));
        assert_eq!(correlate(Some(" "), None), Err(DeadReason::NoMessageId));
        assert_eq!(
            correlate(Some("x"), None),
            Err(DeadReason::InvalidMessageId)
        );
        assert_eq!(
            correlate(Some(M), Some("y")),
            Err(DeadReason::InvalidOrganizationId)
        );
    }

    #[test]
    fn content_keys_are_stable_and_unambiguous() {
        assert_eq!(
            content_key(Source::Sendgrid, &["a", "b"]),
            content_key(Source::Sendgrid, &["a", "b"])
        );
        assert_ne!(
            content_key(Source::Sendgrid, &["ab", ""]),
            content_key(Source::Sendgrid, &["a", "b"])
        );
        assert!(content_key(Source::Mailgun, &["x"]).starts_with("mailgun:h:"));
    }

    #[test]
    fn kept_fields_and_metadata_text_are_trimmed_bounded_and_nul_free() {
        let mut meta = Metadata::default();
        let ev = json!({"a": " x\u{0}y ", "n": 5, "b": true, "o": {"k": 1}, "e": ""});
        meta.keep(
            Some(&ev),
            &[("a", "A"), ("n", "N"), ("b", "B"), ("o", "O"), ("e", "E")],
        );
        meta.text("long", Some(&"é".repeat(MAX_TEXT_BYTES)));
        meta.text("blank", Some("  "));
        meta.value("tags", json!({"t": ["\u{0}"]}));
        let m = meta.into_map();
        assert_eq!(m["A"], "x\u{FFFD}y");
        assert_eq!(m["N"], 5);
        assert_eq!(m["B"], true);
        assert!(!m.contains_key("O") && !m.contains_key("E") && !m.contains_key("blank"));
        let long = m["long"].as_str().expect("text");
        assert!(long.len() <= MAX_TEXT_BYTES && long.len() > MAX_TEXT_BYTES - 2);
        assert_eq!(m["tags"], json!({"t": ["\u{FFFD}"]}));
    }

    #[test]
    fn unknown_types_are_checked_before_correlation_and_keep_their_keys() {
        let Record::DeadLetter(d) = record(Facts {
            kind: Some("resubscribe".into()),
            key: Some("k".into()),
            ..Facts::default()
        }) else {
            panic!("an unmapped event is a dead letter");
        };
        assert_eq!(d.reason, "unknown_event_type");
        assert_eq!(d.event_type.as_deref(), Some("resubscribe"));
        assert_eq!(d.dedup_key.as_deref(), Some("k"));

        let Record::DeadLetter(d) = record(Facts {
            mapped: Some((EventType::Opened, None)),
            key: Some("k".into()),
            dead_letter_key: Some("dk".into()),
            message_id: Some("nope"),
            ..Facts::default()
        }) else {
            panic!("an uncorrelated event is a dead letter");
        };
        assert_eq!(d.reason, "invalid_message_id");
        assert_eq!(d.dedup_key.as_deref(), Some("dk"));
        assert_eq!(d.event_type, None);
    }

    #[test]
    fn events_get_the_arrival_time_the_machine_verdict_and_bounded_error_text() {
        let Record::Event(e) = record(Facts {
            mapped: Some((EventType::Opened, None)),
            key: Some("k".into()),
            message_id: Some(M),
            engagement: Engagement {
                user_agent: Some("Mozilla/5.0 (compatible; Barracuda Sentinel)"),
                link_url: Some("https://x.test/"),
                ..Engagement::default()
            },
            error: Some("x".repeat(MAX_TEXT_BYTES + 10)),
            ..Facts::default()
        }) else {
            panic!("a correlated open is an event");
        };
        assert_eq!(e.occurred_at.timestamp(), 1_700_000_000);
        assert_eq!(e.machine_reason.as_deref(), Some("user_agent:barracuda"));
        assert_eq!(e.link_url, None, "only a click keeps its link");
        assert_eq!(e.error_message.map(|t| t.len()), Some(MAX_TEXT_BYTES));

        let Record::Event(e) = record(Facts {
            mapped: Some((EventType::Clicked, None)),
            message_id: Some(M),
            engagement: Engagement {
                user_agent: Some("Mozilla/5.0 (compatible; Barracuda Sentinel)"),
                link_url: Some("https://x.test/"),
                machine: Some("esp_bot".into()),
                ..Engagement::default()
            },
            ..Facts::default()
        }) else {
            panic!("a correlated click is an event");
        };
        assert_eq!(e.machine_reason.as_deref(), Some("esp_bot"));
        assert_eq!(e.link_url.as_deref(), Some("https://x.test/"));

        let Record::Event(e) = record(Facts {
            mapped: Some((EventType::Unsubscribed, None)),
            message_id: Some(M),
            engagement: Engagement {
                user_agent: Some("Mozilla/5.0 (compatible; Barracuda Sentinel)"),
                ..Engagement::default()
            },
            ..Facts::default()
        }) else {
            panic!("a correlated unsubscribe is an event");
        };
        assert_eq!(
            e.machine_reason, None,
            "only opens and clicks are classified"
        );
        assert!(e.user_agent.is_some());
    }

    #[test]
    fn several_recipients_are_several_keyed_events_but_one_dead_letter() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        let machine = MachineDetector::default();
        let parts = || {
            (0..2)
                .map(|i| {
                    let mut metadata = Metadata::default();
                    metadata.text("status", Some(&format!("5.1.{i}")));
                    Part {
                        error: Some(format!("550 {i}")),
                        metadata,
                        key: None,
                    }
                })
                .collect::<Vec<_>>()
        };
        let facts = Facts {
            mapped: Some((EventType::Bounced, Some(BounceClass::Hard))),
            key: Some("ses:id:n".into()),
            message_id: Some(M),
            error: Some("shared".into()),
            ..Facts::default()
        };
        let records = facts
            .clone()
            .into_records(Source::Ses, "{}", at, &machine, parts());
        let keys: Vec<_> = records
            .iter()
            .map(|r| match r {
                Record::Event(e) => (
                    e.dedup_key.clone(),
                    e.error_message.clone(),
                    e.metadata["status"].clone(),
                ),
                Record::DeadLetter(_) => panic!("a correlated bounce is events"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                (
                    Some("ses:id:n#0".into()),
                    Some("550 0".into()),
                    json!("5.1.0")
                ),
                (
                    Some("ses:id:n#1".into()),
                    Some("550 1".into()),
                    json!("5.1.1")
                ),
            ]
        );
        let uncorrelated = Facts {
            message_id: None,
            ..facts
        };
        let records = uncorrelated.into_records(Source::Ses, "{}", at, &machine, parts());
        let [Record::DeadLetter(d)] = records.as_slice() else {
            panic!("one dead letter, not one per recipient: {records:?}");
        };
        assert_eq!(d.reason, "no_message_id");
        assert_eq!(d.dedup_key.as_deref(), Some("ses:id:n"));
    }

    #[test]
    fn event_tables_match_names_exactly() {
        const T: &EventTable = &[("open", EventType::Opened, None)];
        assert_eq!(lookup(T, "open"), Some((EventType::Opened, None)));
        assert_eq!(lookup(T, "Open"), None);
    }
}
