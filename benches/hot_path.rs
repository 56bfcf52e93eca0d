//! Criterion micro-benchmarks of what one tracking request costs the service before the
//! pipeline takes over: token verification (open, click), the click redirect's URL
//! normalisation, machine-traffic classification, an event's metadata as stored, and the
//! writer's in-memory merge of a 5,000-event batch.
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use reachly_ingest::event::{Event, EventType, Source};
use reachly_ingest::machine::MachineDetector;
use reachly_ingest::pipeline::merge;
use reachly_ingest::token::TokenKeys;
use reachly_ingest::token::{self, Purpose};
use uuid::Uuid;

const UA: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";

fn tokens(c: &mut Criterion) {
    let keys = TokenKeys::new(vec![(1, vec![7u8; 32]), (2, vec![9u8; 32])]).unwrap();
    let (org, msg) = (Uuid::new_v4(), Uuid::new_v4());
    let open = token::mint(&keys, Purpose::Open, org, msg, None).unwrap();
    let url =
        "https://shop.example.com/collections/winter-sale?utm_source=reachly&utm_campaign=nov";
    let click = token::mint(&keys, Purpose::Click, org, msg, Some(url)).unwrap();
    c.bench_function("token_verify_open", |b| {
        b.iter(|| token::verify(&keys, Purpose::Open, black_box(&open)))
    });
    c.bench_function("token_verify_click", |b| {
        b.iter(|| token::verify(&keys, Purpose::Click, black_box(&click)))
    });
    c.bench_function("token_mint_click", |b| {
        b.iter(|| token::mint(&keys, Purpose::Click, org, msg, Some(black_box(url))))
    });
    c.bench_function("redirect_location", |b| {
        b.iter(|| token::redirect_location(black_box(url)))
    });
}

fn request_work(c: &mut Criterion) {
    let machine = MachineDetector::default();
    c.bench_function("machine_classify_browser", |b| {
        b.iter(|| machine.classify(false, Some(black_box(UA))))
    });
    c.bench_function("pixel_event_build_and_metadata", |b| {
        b.iter(|| {
            let mut e = Event::new(Uuid::nil(), EventType::Opened, Utc::now(), Source::Pixel);
            e.user_agent = Some(UA.to_string());
            e.ip_address = Some("203.0.113.0".into());
            e.machine_reason = machine.classify(false, Some(UA));
            black_box(e.metadata_json())
        })
    });
}

fn batch_merge(c: &mut Criterion) {
    let messages: Vec<Uuid> = (0..2500).map(|_| Uuid::new_v4()).collect();
    let kinds = [
        EventType::Delivered,
        EventType::Opened,
        EventType::Clicked,
        EventType::Opened,
    ];
    let events: Vec<Event> = (0..5000)
        .map(|i| {
            Event::new(
                messages[i % messages.len()],
                kinds[i % kinds.len()],
                Utc::now(),
                Source::Sendgrid,
            )
        })
        .collect();
    c.bench_function("merge_5000_events", |b| {
        b.iter(|| merge::merge(black_box(&events)))
    });
}

criterion_group!(benches, tokens, request_work, batch_merge);
criterion_main!(benches);
