#!/usr/bin/env bash
# The load test's one entry command: builds what it needs in release mode, then runs.
#
#   loadtest/run.sh full    # ~15-25 min: service ramp, outage, bus-mode ramp, naive and limit references,
#                           # report in loadtest/results/ (latest.md, latest.png, dated copies)
#   loadtest/run.sh smoke   # ~1.5 min after the build: a 20 s step at 200 req/s, single process
#                           # then bus mode (needs nats-server), each with the exactly-once check
#
# Extra arguments go to reachly-loadtest (see `--help`), e.g. `loadtest/run.sh full --step-seconds 30`.
# REACHLY_BASELINE=<commit> (full only): also build that commit of the service in a git worktree
# (under target/baseline-<commit>) and ramp it after this one, for side-by-side ratios (a
# baseline older than migration V11 runs on the foreign keys it was built for: loadtest/baseline/).
# Needs: Rust, PostgreSQL's server binaries (initdb, pg_ctl), taskset (util-linux), 2 CPUs,
# nats-server for the bus mode (Debian package nats-server; --skip-bus runs without it).
# Exit status: 0 pass; 1 an exactly-once check failed or the service misbehaved; 2 the run
# could not be carried out (with the reason on stderr).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
mode="${1:-full}"
[ $# -gt 0 ] && shift
case "$mode" in
  full) features=() ;;
  smoke) features=(--no-default-features) ;; # no chart: fewer crates to build
  -h|--help|help) sed -n '2,13p' "$0"; exit 0 ;;
  *) echo "usage: loadtest/run.sh [full|smoke] [reachly-loadtest options]" >&2; exit 64 ;;
esac
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 2; }
command -v taskset >/dev/null || { echo "taskset not found: install util-linux" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
echo "loadtest/run.sh: building reachly-ingest and the load test (release, target dir $CARGO_TARGET_DIR)" >&2
(cd "$root" && cargo build --release --locked --bin reachly-ingest)
# Not --locked: when the product gains a dependency, cargo adds it to this lock file.
(cd "$here" && cargo build --release "${features[@]}")
bin="$CARGO_TARGET_DIR/release"
baseline=()
if [ -n "${REACHLY_BASELINE:-}" ]; then
  commit="$(cd "$root" && git rev-parse --short "$REACHLY_BASELINE")"
  tree="$CARGO_TARGET_DIR/baseline-$commit/src"
  if [ ! -d "$tree" ]; then
    (cd "$root" && git worktree add --detach -f "$tree" "$commit" >/dev/null)
  fi
  echo "loadtest/run.sh: building the baseline $commit in $tree" >&2
  (cd "$tree" && CARGO_TARGET_DIR="$CARGO_TARGET_DIR/baseline-$commit/target" \
    cargo build --release --locked --bin reachly-ingest)
  baseline=(--baseline-bin "$CARGO_TARGET_DIR/baseline-$commit/target/release/reachly-ingest"
            --baseline-name "main at $commit")
  # A baseline from before V11 gets the foreign keys it was built against (the database is
  # migrated by this build; see loadtest/baseline/).
  if ! (cd "$root" && git cat-file -e "$commit:migrations/V11__event_message_tenant_key.sql" 2>/dev/null); then
    baseline+=(--baseline-schema-sql "$here/baseline/before-v11.sql"
               --baseline-restore-sql "$here/baseline/after-v11.sql")
  fi
fi
exec "$bin/reachly-loadtest" "$mode" \
  --service-bin "$bin/reachly-ingest" --naive-bin "$bin/naive-server" "${baseline[@]}" "$@"
