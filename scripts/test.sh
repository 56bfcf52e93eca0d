#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests (real PostgreSQL, real sockets, the
# real binary as a process), the fuzz tests, the headless-browser test, and the load test's
# own unit tests (its report's arithmetic and tables, its signed requests). Benchmarks are
# not tests: they run with `cargo bench` (and CI's clippy --all-targets compiles them).
# It brings its own throwaway PostgreSQL cluster; set REACHLY_TEST_DATABASE_URL to use an
# existing server instead. Extra arguments go to the product's `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The mail-client test drives Debian's headless Chromium; install it when missing and we
# can (root with apt). Otherwise that test fails with a message saying what to install.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "scripts/test.sh: installing chromium for the headless mail-client test..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the browser test will say what is missing" >&2
fi

# The observability and deploy tests run Debian's Prometheus server and promtool (package
# `prometheus`) and Debian's PgBouncer with deploy/pgbouncer/pgbouncer.ini; same rule:
# installed when missing and we can, else those tests say what to install.
missing=""
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || missing="$missing pgbouncer"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "scripts/test.sh: installing$missing for the metrics, alert-rule and PgBouncer tests..." >&2
  # shellcheck disable=SC2086
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null) \
    || echo "scripts/test.sh: could not install$missing; those tests will say what is missing" >&2
fi

# The Kubernetes manifests are validated by kubernetes-validate (PyPI; it bundles the
# schemas, so it works offline): installed with pip when missing, else that test says so.
if ! command -v kubernetes-validate >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
  echo "scripts/test.sh: installing kubernetes-validate for the manifest test..." >&2
  python3 -m pip install --quiet kubernetes-validate >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install kubernetes-validate; the manifest test will say what is missing" >&2
  hash -r
fi

# The bus tests (tests/api/bus.rs) start their own 3-node JetStream cluster from Debian's
# `nats-server` (2.9.10 in bookworm); install it when missing and we can.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "scripts/test.sh: installing nats-server for the bus tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null) \
    || echo "scripts/test.sh: could not install nats-server; the bus tests will say what is missing" >&2
fi

cargo test --locked "$@"
# The load test is its own crate (loadtest/, not a workspace member), so the command above
# does not build it. Same target directory as loadtest/run.sh; not --locked, as there.
(cd loadtest && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-../target}" cargo test --lib)
