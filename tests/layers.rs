//! The layer rule, checked: imports only point down. Top to bottom:
//!
//! ```text
//! main -> {dev, healthcheck} -> app -> server -> http -> {pipeline, webhooks, db} -> config
//!      -> {token, machine, metrics, pgcluster, pgerror, shutdown} -> event
//! ```
//!
//! Every file under `src/` belongs to the top-level module it sits in (`src/http/webhook.rs`
//! is `http`). A file may name (in a `use` or an inline path) `crate::m` only when `m` is
//! in a layer strictly below its own; modules of one layer do not import each other. The
//! binary (`src/main.rs`) names the library as `reachly_ingest::m`. A new top-level module
//! must be given a layer here, or this test fails: the shape is a decision, not an accident.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layer of each top-level module; lower numbers are higher up.
const LAYERS: &[(&str, u32)] = &[
    ("main", 0),
    ("dev", 1),
    ("healthcheck", 1),
    ("app", 2),
    ("server", 3),
    ("http", 4),
    ("pipeline", 5),
    ("webhooks", 5),
    ("db", 5),
    ("config", 6),
    ("event", 8),
    ("token", 7),
    ("machine", 7),
    ("metrics", 7),
    ("pgcluster", 7),
    ("pgerror", 7),
    ("shutdown", 7),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to; `None` for the crate root (`lib.rs`),
/// which only declares modules and re-exports.
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.strip_suffix(".rs") {
        Some("lib") => None,
        Some(stem) => Some(stem.to_owned()),
        None => Some(first),
    }
}

/// Top-level modules a file names through `prefix` (`crate::` or `reachly_ingest::`),
/// outside comments, with the line they are named on. Grouped imports
/// (`use crate::{a, b::c}`) name each group member.
fn named_modules(text: &str, prefix: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = &rest[..at];
            let after = &rest[at + prefix.len()..];
            rest = after;
            // `foo_crate::` or `$crate::` is not our crate.
            if before
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
            {
                continue;
            }
            if let Some(group) = after.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((name, n + 1));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((name, n + 1));
                }
            }
        }
    }
    found
}

/// The crate root's re-exports (`pub use app::App;`) let other code say `crate::App`; such
/// a name resolves to the module it is re-exported from.
fn root_reexports(src: &Path) -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        let module = path.split("::").next().unwrap_or("").to_owned();
        let item = path.rsplit("::").next().unwrap_or("").to_owned();
        map.insert(item, module);
    }
    map
}

#[test]
fn imports_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let reexports = root_reexports(&src);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = owner(&src, file) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            violations.push(format!(
                "{}: module `{module}` has no layer; add it to LAYERS in tests/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        let prefix = if module == "main" {
            "reachly_ingest::"
        } else {
            "crate::"
        };
        for (name, line) in named_modules(&text, prefix) {
            let target = reexports.get(&name).cloned().unwrap_or(name);
            if target == module {
                continue;
            }
            checked += 1;
            match layer(&target) {
                Some(l) if l > own => {}
                Some(l) => violations.push(format!(
                    "{}:{line}: `{module}` (layer {own}) imports `{target}` (layer {l}), which is not below it",
                    file.display()
                )),
                // Items of the crate root other than modules (e.g. `init_tracing`).
                None if !src.join(format!("{target}.rs")).exists()
                    && !src.join(&target).is_dir() => {}
                None => violations.push(format!(
                    "{}:{line}: `{target}` has no layer; add it to LAYERS in tests/layers.rs",
                    file.display()
                )),
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} imports found: is the parser still reading src/?"
    );
    assert!(
        violations.is_empty(),
        "imports that point up or sideways:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_inline_and_binary_imports() {
    let text = "use crate::{config::Config, db};\nlet x = crate::http::text(); // crate::app\nuse tokio_util::sync;\nmacro $crate::x\n";
    let names: Vec<String> = named_modules(text, "crate::")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["config", "db", "http"]);
    assert_eq!(
        named_modules("use reachly_ingest::dev::run;", "reachly_ingest::")[0].0,
        "dev"
    );
}
