//! The spool reader on arbitrary segment bytes: never a panic, never garbage replayed.
#![no_main]

use std::io::Write as _;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn path() -> &'static std::path::PathBuf {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("reachly-fuzz-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("spool-0000000000000001.log")
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::File::create(path())
        .and_then(|mut f| f.write_all(data))
        .expect("write segment");
    let c = reachly_ingest::pipeline::spool::read_segment(path()).expect("readable file");
    assert!(c.torn_records <= 1, "reading stops at the first bad record");
});
