//! The wire format of the bus: how one envelope (the records of one request) becomes
//! JetStream messages, and back.
//!
//! One message is one *chunk*: a JSON object `{"v":1,"envelope":ID,"shard":HH,"part":I,
//! "records":[...]}` whose records are complete [`Record`]s, so a writer never reassembles
//! anything and any writer may store any chunk. An envelope is split by shard first (the
//! subject `PREFIX.HH` carries `HH`, the first byte of SHA-256 of the organization id in hex,
//! or `unknown` when the request named no organization), then greedily into chunks that fit
//! the server's `max_payload` (default 1 MiB). A single record too large for a message alone
//! (in practice only a dead letter carrying a huge raw payload) is cut down to a dead letter
//! `too_large_for_bus` with its payload truncated to fit: the one lossy case, counted.
//!
//! Ids: the envelope id is derived from the ids of its records (SHA-256, truncated to a
//! UUID), so the same envelope, published again after a spool replay or a retry, yields the
//! same `Nats-Msg-Id`s (`ID.HH.I`) and the stream's duplicate window drops the copies. The
//! database's idempotent inserts catch anything outside that window.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::event::{DeadLetter, Record, truncate_utf8};

/// Bytes kept free in every message for the headers (`Nats-Msg-Id`) and the chunk's
/// wrapper object.
const OVERHEAD_BYTES: usize = 512;
/// Wire format version; a writer dead-letters versions it does not know.
pub const VERSION: u32 = 1;

/// One JetStream message, ready to publish.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The subject's last token: the organization's shard (`00`..`ff`) or `unknown`.
    pub shard: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    pub payload: Bytes,
    /// Records in this chunk.
    pub records: usize,
    /// Records cut down to fit (see the module doc).
    pub truncated: usize,
}

#[derive(Serialize, Deserialize)]
struct Wire<R> {
    v: u32,
    envelope: Uuid,
    shard: String,
    part: usize,
    records: R,
}

/// The shard of an organization: 256 buckets by the first byte of SHA-256 of its id.
/// Stable forever: a later split of the stream (or of writers) by subject needs no lookup.
pub fn shard(org: Option<Uuid>) -> String {
    match org {
        Some(o) => format!("{:02x}", Sha256::digest(o.as_bytes())[0]),
        None => "unknown".to_owned(),
    }
}

fn record_org(r: &Record) -> Option<Uuid> {
    match r {
        Record::Event(e) => e.claimed_organization_id,
        Record::DeadLetter(d) => d.organization_id,
    }
}

fn record_id(r: &Record) -> Uuid {
    match r {
        Record::Event(e) => e.id,
        Record::DeadLetter(d) => d.id,
    }
}

/// The envelope id: a digest of its records' ids (see the module doc).
pub fn envelope_id(records: &[Record]) -> Uuid {
    let mut h = Sha256::new();
    for r in records {
        h.update(record_id(r).as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// Splits `records` into messages of at most `max_payload` bytes (payload plus headers).
pub fn chunk(records: &[Record], max_payload: usize) -> Vec<Chunk> {
    let id = envelope_id(records);
    let budget = max_payload.saturating_sub(OVERHEAD_BYTES).max(1024);
    // Shards in order of first appearance, records in their order within each.
    let mut shards: Vec<(String, Vec<&Record>)> = Vec::new();
    for r in records {
        let s = shard(record_org(r));
        match shards.iter_mut().find(|(k, _)| *k == s) {
            Some((_, v)) => v.push(r),
            None => shards.push((s, vec![r])),
        }
    }
    let mut out = Vec::new();
    for (s, rs) in shards {
        let mut part = 0;
        let mut body: Vec<u8> = Vec::new();
        let mut count = 0;
        let mut truncated = 0;
        for r in rs {
            let (bytes, cut) = encode_record(r, budget);
            if count > 0 && body.len() + 1 + bytes.len() > budget {
                out.push(seal(id, &s, part, &body, count, truncated));
                part += 1;
                body.clear();
                count = 0;
                truncated = 0;
            }
            if count > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&bytes);
            count += 1;
            truncated += usize::from(cut);
        }
        if count > 0 {
            out.push(seal(id, &s, part, &body, count, truncated));
        }
    }
    out
}

fn seal(
    id: Uuid,
    shard: &str,
    part: usize,
    body: &[u8],
    records: usize,
    truncated: usize,
) -> Chunk {
    let head = format!(
        "{{\"v\":{VERSION},\"envelope\":\"{id}\",\"shard\":\"{shard}\",\"part\":{part},\"records\":["
    );
    let mut p = Vec::with_capacity(head.len() + body.len() + 2);
    p.extend_from_slice(head.as_bytes());
    p.extend_from_slice(body);
    p.extend_from_slice(b"]}");
    Chunk {
        shard: shard.to_owned(),
        msg_id: format!("{id}.{shard}.{part}"),
        payload: Bytes::from(p),
        records,
        truncated,
    }
}

/// A record's JSON, cut down to fit `budget` if it must be (`true` then).
fn encode_record(r: &Record, budget: usize) -> (Vec<u8>, bool) {
    let bytes = serde_json::to_vec(r).unwrap_or_default();
    if bytes.len() <= budget {
        return (bytes, false);
    }
    let mut dead = match r {
        Record::Event(e) => DeadLetter::from_event(e, "too_large_for_bus"),
        Record::DeadLetter(d) => DeadLetter {
            reason: format!("{}; too_large_for_bus", d.reason),
            ..d.clone()
        },
    };
    let full = std::mem::take(&mut dead.payload);
    // JSON escaping can grow text up to 6x; halve until it fits.
    let mut keep = budget / 2;
    loop {
        dead.payload = truncate_utf8(&full, keep).to_owned();
        let bytes = serde_json::to_vec(&Record::DeadLetter(dead.clone())).unwrap_or_default();
        if bytes.len() <= budget || keep == 0 {
            return (bytes, true);
        }
        keep /= 2;
    }
}

/// What a writer makes of one message.
#[derive(Debug)]
pub enum Decoded {
    Records(Vec<Record>),
    /// Not a chunk of a version we know: kept as a dead letter, then terminated.
    Undecodable(DeadLetter),
}

pub fn decode(payload: &[u8]) -> Decoded {
    match serde_json::from_slice::<Wire<Vec<Record>>>(payload) {
        Ok(w) if w.v == VERSION => Decoded::Records(w.records),
        Ok(w) => Decoded::Undecodable(undecodable(
            payload,
            &format!("unknown_bus_version_{}", w.v),
        )),
        Err(_) => Decoded::Undecodable(undecodable(payload, "undecodable_bus_message")),
    }
}

/// A dead letter whose id and dedup key derive from the payload, so a redelivered copy of the
/// same message adds no second dead letter.
fn undecodable(payload: &[u8], reason: &str) -> DeadLetter {
    let digest = Sha256::digest(payload);
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    let text = String::from_utf8_lossy(payload);
    let mut d = DeadLetter::new("bus", reason, truncate_utf8(&text, 64 << 10));
    d.id = uuid::Builder::from_random_bytes(b).into_uuid();
    d.dedup_key = Some(format!("bus:{}", hex::encode(&digest[..16])));
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType, Source};
    use chrono::Utc;

    fn event(org: Option<Uuid>) -> Record {
        let mut e = Event::new(
            Uuid::new_v4(),
            EventType::Delivered,
            Utc::now(),
            Source::Sendgrid,
        );
        e.claimed_organization_id = org;
        e.metadata.insert("pad".into(), "x".repeat(200).into());
        Record::Event(e)
    }

    fn decoded(c: &Chunk) -> Vec<Record> {
        match decode(&c.payload) {
            Decoded::Records(r) => r,
            Decoded::Undecodable(d) => panic!("undecodable: {}", d.reason),
        }
    }

    #[test]
    fn a_large_envelope_is_chunked_under_the_limit_and_round_trips() {
        let org = Some(Uuid::new_v4());
        let records: Vec<Record> = (0..500).map(|_| event(org)).collect();
        let chunks = chunk(&records, 16 << 10);
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        let mut back = Vec::new();
        for c in &chunks {
            assert!(
                c.payload.len() + 200 <= 16 << 10,
                "{} bytes",
                c.payload.len()
            );
            back.extend(decoded(c));
        }
        assert_eq!(back, records);
    }

    #[test]
    fn chunks_follow_the_organization_shard_and_ids_are_stable() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let records = vec![event(Some(a)), event(Some(b)), event(Some(a)), event(None)];
        let chunks = chunk(&records, 1 << 20);
        let shards: Vec<&str> = chunks.iter().map(|c| c.shard.as_str()).collect();
        let expect_distinct = if shard(Some(a)) == shard(Some(b)) {
            2
        } else {
            3
        };
        assert_eq!(chunks.len(), expect_distinct, "{shards:?}");
        assert_eq!(chunks[0].shard, shard(Some(a)));
        assert!(shards.contains(&"unknown"));
        let again = chunk(&records, 1 << 20);
        let ids = |cs: &[Chunk]| cs.iter().map(|c| c.msg_id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(&chunks),
            ids(&again),
            "a re-publish must reuse the Nats-Msg-Ids"
        );
        assert_eq!(shard(Some(a)).len(), 2);
    }

    #[test]
    fn a_record_too_large_for_any_message_becomes_a_truncated_dead_letter() {
        let mut d = DeadLetter::new("sendgrid", "no_message_id", "é".repeat(100_000));
        d.organization_id = None;
        let chunks = chunk(&[Record::DeadLetter(d)], 8 << 10);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].truncated, 1);
        assert!(chunks[0].payload.len() <= 8 << 10);
        match &decoded(&chunks[0])[0] {
            Record::DeadLetter(d) => assert!(d.reason.ends_with("too_large_for_bus")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_a_dead_letter_with_a_stable_id() {
        let (Decoded::Undecodable(a), Decoded::Undecodable(b)) =
            (decode(b"\xff{nope"), decode(b"\xff{nope"))
        else {
            panic!("garbage decoded");
        };
        assert_eq!(a.id, b.id);
        assert_eq!(a.dedup_key, b.dedup_key);
        assert_eq!(a.reason, "undecodable_bus_message");
        let Decoded::Undecodable(v) = decode(br#"{"v":9,"envelope":"00000000-0000-0000-0000-000000000000","shard":"x","part":0,"records":[]}"#) else {
            panic!("future version decoded");
        };
        assert_eq!(v.reason, "unknown_bus_version_9");
    }
}
