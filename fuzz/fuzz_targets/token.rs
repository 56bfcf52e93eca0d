//! Token verification on arbitrary input, for every purpose: never a panic, and nothing
//! unsigned ever verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reachly_ingest::token::{self, Purpose, TokenKeys};

fuzz_target!(|data: &[u8]| {
    let keys = TokenKeys::new(vec![(1, vec![1u8; 32])]).expect("keys");
    let raw = String::from_utf8_lossy(data);
    for p in [Purpose::Open, Purpose::Click, Purpose::Unsubscribe] {
        assert!(token::verify(&keys, p, &raw).is_err(), "an unsigned token verified");
    }
});
