#!/usr/bin/env bash
# Shared-buffer residency of `contacts` and `campaign_messages` on a running load test's
# cluster, every 5 s: time, relation, pages resident, of which dirty (pg_buffercache, which
# the load test installs). Used to test whether the baseline keeps `contacts` pages resident
# longer than this build (it does not: loadtest/experiments/results/2026-12-07T2201-*).
#
#   loadtest/experiments/buffer-residency.sh PORT [OUT]   # PORT: the load test's cluster
#
# Run it beside e.g. `reachly-loadtest full --skip-bus --skip-naive --skip-outage
# --baseline-bin ...`; stop it with Ctrl-C. Every database of the cluster but `postgres`
# is sampled, so the reset between phases (a new database) is followed.
set -euo pipefail
port="${1:?usage: buffer-residency.sh PORT [OUT]}"
out="${2:-/dev/stdout}"
conn() { echo "host=127.0.0.1 port=$port user=postgres dbname=$1"; }
while true; do
  for db in $(psql -X -A -t "$(conn postgres)" -c "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres'" 2>/dev/null); do
    psql -X -A -t -F' ' "$(conn "$db")" -c "SELECT now()::time(0), c.relname, count(*), count(*) FILTER (WHERE b.isdirty) FROM pg_buffercache b JOIN pg_class c ON b.relfilenode = pg_relation_filenode(c.oid) AND b.reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database()) WHERE c.relname IN ('contacts', 'campaign_messages') GROUP BY 1, 2" 2>/dev/null >> "$out" || true
  done
  sleep 5
done
