//! SES messages (the `Message` of an authenticated SNS notification) to facts: both shapes,
//! feedback notifications (`notificationType`) and event publishing (`eventType`), mapped as
//! the module table of `ses` says. A bounce, complaint, delivery or delay lists its
//! recipients; each becomes one event ([`Part`]), keyed `<SNS MessageId>#<index>` when there
//! are several. Correlation comes from `mail.tags`, else an echoed `X-Reachly-Message-Id`.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::event::{BounceClass, EventType, Record, Source};
use crate::machine::MachineDetector;
use crate::webhooks::extract::{header_message_id, obj_at, rfc3339, str_at};
use crate::webhooks::records::{DeadReason, Engagement, Facts, Metadata, Part, content_key};

/// `mail.tags[name]`: event publishing gives an array of strings per tag.
fn mail_tag<'a>(mail: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a str> {
    match obj_at(mail, "tags")?.get(name)? {
        Value::Array(values) => values.iter().find_map(Value::as_str),
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// `X-Reachly-Message-Id` among the original headers (when SES was told to include them).
fn mail_header(mail: Option<&Map<String, Value>>) -> Option<&str> {
    let headers = mail?.get("headers")?.as_array()?;
    header_message_id(headers.iter().filter_map(|h| {
        let h = h.as_object()?;
        Some((h.get("name")?.as_str()?, h.get("value")?.as_str()?))
    }))
}

/// The dedup key of one SES event: the SES message, the event kind, the recipient, the
/// event's own time, and what tells two opens or clicks of one instant apart. Not the SNS
/// `MessageId`: the same bounce published by a configuration set and notified to the
/// identity arrives as two SNS messages, and must be one row.
pub(super) fn ses_key(
    mail_id: &str,
    kind: &str,
    recipient: &str,
    at: &str,
    extra: &[&str],
) -> String {
    let mut parts = vec![mail_id, kind, recipient, at];
    parts.extend_from_slice(extra);
    content_key(Source::Ses, &parts)
}

/// A recipient's address: a string (delivery `recipients`) or `emailAddress` of an object.
fn address(item: Option<&Value>) -> &str {
    match item {
        Some(Value::String(s)) => s.trim(),
        Some(Value::Object(o)) => o
            .get("emailAddress")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or(""),
        _ => "",
    }
}

/// `emailAddress` of a recipient object.
fn email_of(r: Option<&Map<String, Value>>) -> &str {
    str_at(r, "emailAddress").unwrap_or("")
}

/// The addresses of a recipients list (at least one slot).
fn addresses<'a>(detail: Option<&'a Map<String, Value>>, field: &str) -> Vec<&'a str> {
    match detail.and_then(|d| d.get(field)).and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.iter().map(|r| address(Some(r))).collect(),
        _ => vec![""],
    }
}

/// The recipients list of a bounce, complaint, delivery or delay (at least one slot, so a
/// message without a list still gives one event).
fn recipients<'a>(
    detail: Option<&'a Map<String, Value>>,
    field: &str,
) -> Vec<Option<&'a Map<String, Value>>> {
    match detail.and_then(|d| d.get(field)).and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.iter().map(Value::as_object).collect(),
        _ => vec![None],
    }
}

/// The records of one SES message; `fallback_time` is the SNS timestamp (or the arrival).
pub(super) fn map_message(
    obj: &Map<String, Value>,
    raw: &str,
    sns_id: &str,
    key: String,
    fallback_time: DateTime<Utc>,
    machine: &MachineDetector,
) -> Vec<Record> {
    let kind = str_at(Some(obj), "eventType").or_else(|| str_at(Some(obj), "notificationType"));
    if kind == Some("AmazonSnsSubscriptionSucceeded") {
        tracing::info!("SES reports its SNS topic is wired up");
        return Vec::new();
    }
    let (facts, parts) = facts(obj, kind, sns_id, key);
    facts.into_records(Source::Ses, raw, fallback_time, machine, parts)
}

/// What the message says, and what differs per recipient.
fn facts<'a>(
    obj: &'a Map<String, Value>,
    kind: Option<&'a str>,
    sns_id: &str,
    key: String,
) -> (Facts<'a>, Vec<Part>) {
    let mail = obj_at(Some(obj), "mail");
    let mut f = Facts {
        kind: kind.map(Into::into),
        key: Some(key),
        message_id: mail_tag(mail, "reachly_message_id").or_else(|| mail_header(mail)),
        organization_id: mail_tag(mail, "reachly_organization_id"),
        ..Facts::default()
    };
    let Some(kind) = kind else {
        return (f, Vec::new());
    };
    f.metadata.text("ses_event_type", Some(kind));
    f.metadata.text("sns_message_id", Some(sns_id));
    f.metadata.text("ses_message_id", str_at(mail, "messageId"));
    // The event's own time, else the message's.
    let at = |detail: Option<&Map<String, Value>>| {
        str_at(detail, "timestamp")
            .and_then(rfc3339)
            .or_else(|| str_at(mail, "timestamp").and_then(rfc3339))
    };
    // Keys on the SES event itself, when SES names its message (else the SNS MessageId's).
    let mail_id = str_at(mail, "messageId");
    fn time_text<'m>(
        detail: Option<&'m Map<String, Value>>,
        mail: Option<&'m Map<String, Value>>,
    ) -> &'m str {
        str_at(detail, "timestamp")
            .or_else(|| str_at(mail, "timestamp"))
            .unwrap_or("")
    }
    let key_for = |detail: Option<&Map<String, Value>>, recipient: &str, extra: &[&str]| {
        mail_id.map(|m| ses_key(m, kind, recipient, time_text(detail, mail), extra))
    };
    // Events of the whole message (no recipient list): one key.
    let whole = |f: &mut Facts<'a>, detail: Option<&Map<String, Value>>, extra: &[&str]| {
        if let Some(k) = key_for(detail, "", extra) {
            f.key = Some(k);
        }
    };
    let one = |f: Facts<'a>| (f, Vec::new());
    match kind {
        "Send" => {
            f.mapped = Some((EventType::Sent, None));
            f.occurred_at = at(None);
            whole(&mut f, None, &[]);
            one(f)
        }
        "Delivery" => {
            let d = obj_at(Some(obj), "delivery");
            f.mapped = Some((EventType::Delivered, None));
            f.occurred_at = at(d);
            f.metadata.text("smtp_response", str_at(d, "smtpResponse"));
            f.metadata.text("reporting_mta", str_at(d, "reportingMTA"));
            let parts = addresses(d, "recipients")
                .into_iter()
                .map(|r| Part {
                    key: key_for(d, r, &[]),
                    ..Part::default()
                })
                .collect();
            (f, parts)
        }
        "Bounce" => {
            let b = obj_at(Some(obj), "bounce");
            let bounce_type = str_at(b, "bounceType");
            let sub_type = str_at(b, "bounceSubType");
            let class = if bounce_type == Some("Permanent") {
                BounceClass::Hard
            } else {
                BounceClass::Soft
            };
            f.mapped = Some((EventType::Bounced, Some(class)));
            f.occurred_at = at(b);
            f.metadata.text("bounce_type", bounce_type);
            f.metadata.text("bounce_sub_type", sub_type);
            f.metadata.text("feedback_id", str_at(b, "feedbackId"));
            f.metadata.text("reporting_mta", str_at(b, "reportingMTA"));
            let parts = recipients(b, "bouncedRecipients")
                .into_iter()
                .map(|r| {
                    let key = key_for(b, email_of(r), &[]);
                    let diagnostic = str_at(r, "diagnosticCode");
                    let mut metadata = Metadata::default();
                    metadata.text("diagnostic_code", diagnostic);
                    metadata.text("status", str_at(r, "status"));
                    metadata.text("action", str_at(r, "action"));
                    let error = match diagnostic {
                        Some(d) => d.to_owned(),
                        None => format!(
                            "{} bounce ({})",
                            bounce_type.unwrap_or("Undetermined"),
                            sub_type.unwrap_or("no sub-type")
                        ),
                    };
                    Part {
                        error: Some(error),
                        metadata,
                        key,
                    }
                })
                .collect();
            (f, parts)
        }
        "Complaint" => {
            let c = obj_at(Some(obj), "complaint");
            f.mapped = Some((EventType::Complained, None));
            f.occurred_at = at(c);
            f.metadata.text(
                "complaint_feedback_type",
                str_at(c, "complaintFeedbackType"),
            );
            f.metadata
                .text("complaint_sub_type", str_at(c, "complaintSubType"));
            f.metadata.text("feedback_id", str_at(c, "feedbackId"));
            // The feedback loop's agent, not a person's browser: metadata only.
            f.metadata
                .text("feedback_user_agent", str_at(c, "userAgent"));
            // A feedback report saying "not spam" is no complaint.
            if str_at(c, "complaintFeedbackType")
                .is_some_and(|t| t.eq_ignore_ascii_case("not-spam"))
            {
                f.mapped = None;
                f.unmapped = Some(DeadReason::NotAComplaint);
                whole(&mut f, c, &[]);
                return one(f);
            }
            let parts = recipients(c, "complainedRecipients")
                .into_iter()
                .map(|r| Part {
                    key: key_for(c, email_of(r), &[]),
                    ..Part::default()
                })
                .collect();
            (f, parts)
        }
        "DeliveryDelay" => {
            let d = obj_at(Some(obj), "deliveryDelay");
            let delay_type = str_at(d, "delayType");
            f.mapped = Some((EventType::Deferred, None));
            f.occurred_at = at(d);
            f.metadata.text("delay_type", delay_type);
            f.metadata
                .text("expiration_time", str_at(d, "expirationTime"));
            let parts = recipients(d, "delayedRecipients")
                .into_iter()
                .map(|r| {
                    let diagnostic = str_at(r, "diagnosticCode");
                    let mut metadata = Metadata::default();
                    metadata.text("diagnostic_code", diagnostic);
                    metadata.text("status", str_at(r, "status"));
                    Part {
                        key: key_for(d, email_of(r), &[]),
                        error: Some(
                            diagnostic
                                .or(delay_type)
                                .unwrap_or("delivery delayed")
                                .to_owned(),
                        ),
                        metadata,
                    }
                })
                .collect();
            (f, parts)
        }
        "Reject" => {
            let reason = str_at(obj_at(Some(obj), "reject"), "reason");
            f.mapped = Some((EventType::Dropped, None));
            f.occurred_at = at(None);
            f.metadata.text("reason", reason);
            whole(&mut f, None, &[]);
            f.error = Some(match reason {
                Some(r) => format!("rejected by SES: {r}"),
                None => "rejected by SES".to_owned(),
            });
            one(f)
        }
        "Rendering Failure" | "RenderingFailure" => {
            let failure = obj_at(Some(obj), "failure");
            f.mapped = Some((EventType::Dropped, None));
            f.occurred_at = at(None);
            f.metadata
                .text("template_name", str_at(failure, "templateName"));
            whole(&mut f, None, &[]);
            f.error = Some(
                str_at(failure, "errorMessage")
                    .unwrap_or("template rendering failed")
                    .to_owned(),
            );
            one(f)
        }
        "Open" | "Click" => {
            let (t, field) = if kind == "Open" {
                (EventType::Opened, "open")
            } else {
                (EventType::Clicked, "click")
            };
            let action = obj_at(Some(obj), field);
            f.mapped = Some((t, None));
            f.occurred_at = at(action);
            whole(
                &mut f,
                action,
                &[
                    str_at(action, "ipAddress").unwrap_or(""),
                    str_at(action, "userAgent").unwrap_or(""),
                    str_at(action, "link").unwrap_or(""),
                ],
            );
            f.engagement = Engagement {
                ip: str_at(action, "ipAddress"),
                user_agent: str_at(action, "userAgent"),
                link_url: str_at(action, "link"),
                machine: None,
            };
            if let Some(tags) = action
                .and_then(|a| a.get("linkTags"))
                .filter(|tags| t == EventType::Clicked && tags.is_object())
            {
                f.metadata.value("link_tags", tags.clone());
            }
            one(f)
        }
        "Subscription" => {
            let s = obj_at(Some(obj), "subscription");
            let all = obj_at(s, "newTopicPreferences")
                .and_then(|p| p.get("unsubscribeAll"))
                .and_then(Value::as_bool)
                == Some(true);
            whole(&mut f, s, &[]);
            if all {
                f.mapped = Some((EventType::Unsubscribed, None));
                f.occurred_at = at(s);
                f.metadata.text("contact_list", str_at(s, "contactList"));
                f.metadata.text("unsubscribe_source", str_at(s, "source"));
            } else {
                f.unmapped = Some(DeadReason::UnmappedSubscriptionChange);
            }
            one(f)
        }
        _ => one(f),
    }
}
