#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests (real PostgreSQL, real sockets, the
# real binary as a process), the fuzz tests and the headless-browser test. Benchmarks are
# not tests: they run with `cargo bench` (and CI's clippy --all-targets compiles them).
# It brings its own throwaway PostgreSQL cluster; set REACHLY_TEST_DATABASE_URL to use an
# existing server instead. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The mail-client test drives Debian's headless Chromium; install it when missing and we
# can (root with apt). Otherwise that test fails with a message saying what to install.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "scripts/test.sh: installing chromium for the headless mail-client test..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the browser test will say what is missing" >&2
fi

# The bus tests (tests/api/bus.rs) start their own 3-node JetStream cluster from Debian's
# `nats-server` (2.9.10 in bookworm); install it when missing and we can.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "scripts/test.sh: installing nats-server for the bus tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null) \
    || echo "scripts/test.sh: could not install nats-server; the bus tests will say what is missing" >&2
fi

cargo test --locked "$@"
