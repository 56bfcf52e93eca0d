//! The status merge of SPEC.md, in memory: a batch's events are folded per message into one
//! [`MessageUpdate`] so each `campaign_messages` row is touched once per batch. Every field
//! combines with a commutative, idempotent operation (max of status rank, min of each
//! timestamp, max of `(error time, error text)`, max of contact suppression), and the SQL in
//! `store.rs` combines an update with the stored row by the very same operations. So the
//! final row depends only on the *set* of events, not their order, batching or repetition.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{BounceClass, Event, EventType};

/// `campaign_messages.status`, in the order it may move (only up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageStatus {
    Pending = 0,
    Sent = 1,
    Delivered = 2,
    Opened = 3,
    Clicked = 4,
    Unsubscribed = 5,
    Complained = 6,
    Bounced = 7,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Opened => "opened",
            MessageStatus::Clicked => "clicked",
            MessageStatus::Unsubscribed => "unsubscribed",
            MessageStatus::Complained => "complained",
            MessageStatus::Bounced => "bounced",
        }
    }
    pub fn rank(self) -> i32 {
        self as i32
    }
}

/// `contacts.status` set by this service; `bounced` wins over `unsubscribed`, and neither
/// ever returns to `active` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContactStatus {
    Unsubscribed = 1,
    Bounced = 2,
}

impl ContactStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ContactStatus::Unsubscribed => "unsubscribed",
            ContactStatus::Bounced => "bounced",
        }
    }
    pub fn rank(self) -> i32 {
        self as i32
    }
}

/// What a set of events does to one message row (and its contact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageUpdate {
    pub message_id: Uuid,
    pub status: Option<MessageStatus>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub opened_at: Option<DateTime<Utc>>,
    pub clicked_at: Option<DateTime<Utc>>,
    /// The latest error: (event time, text); ties broken by the larger text.
    pub error: Option<(DateTime<Utc>, String)>,
    pub contact: Option<ContactStatus>,
}

impl MessageUpdate {
    pub fn new(message_id: Uuid) -> MessageUpdate {
        MessageUpdate {
            message_id,
            status: None,
            sent_at: None,
            delivered_at: None,
            opened_at: None,
            clicked_at: None,
            error: None,
            contact: None,
        }
    }

    /// Whether applying this update could change anything.
    pub fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.sent_at.is_none()
            && self.delivered_at.is_none()
            && self.opened_at.is_none()
            && self.clicked_at.is_none()
            && self.error.is_none()
            && self.contact.is_none()
    }

    /// Folds one event in. Machine traffic moves nothing.
    pub fn apply(&mut self, e: &Event) {
        if e.is_machine() {
            return;
        }
        let at = e.occurred_at;
        match e.event_type {
            EventType::Sent => {
                self.raise(MessageStatus::Sent);
                min_into(&mut self.sent_at, at);
            }
            EventType::Delivered => {
                self.raise(MessageStatus::Delivered);
                min_into(&mut self.delivered_at, at);
            }
            EventType::Opened => {
                self.raise(MessageStatus::Opened);
                min_into(&mut self.opened_at, at);
            }
            EventType::Clicked => {
                // A click implies an open (image blocking hides many opens).
                self.raise(MessageStatus::Clicked);
                min_into(&mut self.clicked_at, at);
                min_into(&mut self.opened_at, at);
            }
            EventType::Unsubscribed => {
                self.raise(MessageStatus::Unsubscribed);
                self.suppress(ContactStatus::Unsubscribed);
            }
            EventType::Complained => {
                self.raise(MessageStatus::Complained);
                self.suppress(ContactStatus::Unsubscribed);
            }
            EventType::Bounced => {
                // A bounce with no class is taken as hard: a missed hard bounce costs the
                // sender's reputation, a needless suppression costs one address.
                if e.bounce_class != Some(BounceClass::Soft) {
                    self.raise(MessageStatus::Bounced);
                    self.suppress(ContactStatus::Bounced);
                }
                self.note_error(
                    at,
                    e.error_message.as_deref().unwrap_or(match e.bounce_class {
                        Some(BounceClass::Soft) => "soft bounce",
                        _ => "hard bounce",
                    }),
                );
            }
            EventType::Deferred => {
                self.note_error(at, e.error_message.as_deref().unwrap_or("deferred"))
            }
            EventType::Dropped => {
                self.note_error(at, e.error_message.as_deref().unwrap_or("dropped"))
            }
        }
    }

    /// Combines two updates of the same message (commutative, associative, idempotent).
    pub fn combine(&mut self, other: &MessageUpdate) {
        if let Some(s) = other.status {
            self.raise(s);
        }
        for (mine, theirs) in [
            (&mut self.sent_at, other.sent_at),
            (&mut self.delivered_at, other.delivered_at),
            (&mut self.opened_at, other.opened_at),
            (&mut self.clicked_at, other.clicked_at),
        ] {
            if let Some(t) = theirs {
                min_into(mine, t);
            }
        }
        if let Some((at, text)) = &other.error {
            self.note_error(*at, text);
        }
        if let Some(c) = other.contact {
            self.suppress(c);
        }
    }

    fn raise(&mut self, s: MessageStatus) {
        if self.status.is_none_or(|cur| s > cur) {
            self.status = Some(s);
        }
    }

    fn suppress(&mut self, c: ContactStatus) {
        if self.contact.is_none_or(|cur| c > cur) {
            self.contact = Some(c);
        }
    }

    fn note_error(&mut self, at: DateTime<Utc>, text: &str) {
        let newer = match &self.error {
            None => true,
            Some((cur_at, cur_text)) => (at, text) > (*cur_at, cur_text.as_str()),
        };
        if newer {
            self.error = Some((
                at,
                crate::event::pg_text(text, crate::event::MAX_TEXT_BYTES),
            ));
        }
    }
}

fn min_into(slot: &mut Option<DateTime<Utc>>, t: DateTime<Utc>) {
    if slot.is_none_or(|cur| t < cur) {
        *slot = Some(t);
    }
}

/// Folds events into one update per message, in message-id order (the order rows are
/// locked in, so concurrent writers cannot deadlock on each other).
pub fn merge<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<MessageUpdate> {
    let mut by_message: BTreeMap<Uuid, MessageUpdate> = BTreeMap::new();
    for e in events {
        by_message
            .entry(e.message_id)
            .or_insert_with(|| MessageUpdate::new(e.message_id))
            .apply(e);
    }
    by_message.into_values().filter(|u| !u.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Source;

    fn ev(t: EventType, secs: i64) -> Event {
        Event::new(
            Uuid::nil(),
            t,
            DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap(),
            Source::Sendgrid,
        )
    }

    #[test]
    fn click_implies_open_and_status_only_moves_up() {
        let u = merge(&[
            ev(EventType::Clicked, 10),
            ev(EventType::Delivered, 5),
            ev(EventType::Opened, 20),
        ]);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].status, Some(MessageStatus::Clicked));
        assert_eq!(
            u[0].opened_at,
            Some(DateTime::from_timestamp(1_700_000_010, 0).unwrap())
        );
        assert_eq!(
            u[0].clicked_at,
            Some(DateTime::from_timestamp(1_700_000_010, 0).unwrap())
        );
    }

    #[test]
    fn soft_bounce_sets_only_the_error_and_hard_bounce_suppresses() {
        let mut soft = ev(EventType::Bounced, 1);
        soft.bounce_class = Some(BounceClass::Soft);
        soft.error_message = Some("mailbox full".into());
        let u = merge(&[soft.clone()]);
        assert_eq!(u[0].status, None);
        assert_eq!(u[0].contact, None);
        assert_eq!(u[0].error.as_ref().unwrap().1, "mailbox full");
        let mut hard = ev(EventType::Bounced, 0);
        hard.bounce_class = Some(BounceClass::Hard);
        let u = merge(&[soft, hard]);
        assert_eq!(u[0].status, Some(MessageStatus::Bounced));
        assert_eq!(u[0].contact, Some(ContactStatus::Bounced));
        assert_eq!(
            u[0].error.as_ref().unwrap().1,
            "mailbox full",
            "the later error wins"
        );
    }

    #[test]
    fn machine_opens_move_nothing() {
        let mut e = ev(EventType::Opened, 0);
        e.machine_reason = Some("head".into());
        assert!(merge(&[e]).is_empty());
    }

    #[test]
    fn merge_is_independent_of_order_and_batching() {
        let events = vec![
            ev(EventType::Complained, 9),
            ev(EventType::Opened, 3),
            ev(EventType::Unsubscribed, 7),
            ev(EventType::Deferred, 2),
            ev(EventType::Sent, 1),
        ];
        let whole = merge(&events);
        let mut reversed: Vec<Event> = events.clone();
        reversed.reverse();
        assert_eq!(merge(&reversed), whole);
        let mut a = merge(&events[..2])[0].clone();
        let b = merge(&events[2..])[0].clone();
        a.combine(&b);
        a.combine(&b);
        assert_eq!(a, whole[0]);
    }
}
