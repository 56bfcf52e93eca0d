//! Rebuild when a migration changes: `refinery::embed_migrations!` reads `migrations/` at
//! compile time, which Cargo does not track by itself.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
