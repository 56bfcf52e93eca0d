#!/usr/bin/env bash
# Database CPU per event of the writer's insert path, alone: COPY into the temporary staging
# table plus `INSERT ... SELECT` (what src/pipeline/store.rs does, because a retried batch
# needs ON CONFLICT and a role under row-level security may not COPY into email_events)
# against COPY straight into email_events, each in batches of 250 pixel-shaped events, with
# `wal_compression` off and pglz (the B1ms setting). The backend's own CPU time is read from
# /proc before and after each run, so the figure is the statements' cost only.
#
#   loadtest/experiments/staging-vs-copy.sh postgres://postgres@127.0.0.1:5432/postgres [batches]
#
# `staging-as-reachly_app` is the same path run as the production writer role (made by
# deploy/sql/roles.sql: no BYPASSRLS, under row-level security with its own policy).
#
# Needs a superuser URL (it creates and drops the database reachly_staging_experiment, makes
# the roles reachly_owner and reachly_app if they are missing, connects as reachly_owner
# without a password, and reads /proc through pg_read_file, so the server must run on this
# machine and trust local connections), psql, and
# target/release/reachly-ingest (cargo build --release). Measured 2026-12-07 (PostgreSQL 15,
# 400 batches, five runs): staging 12.4-14.0 us/event, direct 9.8-11.4, with wal_compression
# off or pglz alike (1.2-1.3x); staging as reachly_app 12.4-13.4 (row-level security costs
# nothing measurable with the writer's policy).
set -euo pipefail
admin_url=${1:?usage: $0 SUPERUSER_URL [batches]}
batches=${2:-400}
db=reachly_staging_experiment
url=${admin_url%/*}/$db
bin=$(dirname "$0")/../../target/release/reachly-ingest
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
# The production roles (deploy/sql/roles.sql): the schema owned by reachly_owner, the writer
# running as reachly_app, under row-level security with its own permissive policy.
roles=$(dirname "$0")/../../deploy/sql/roles.sql
owner_url=$(printf '%s' "$url" | sed -E 's#^(postgres(ql)?://)[^@/]*@#\1reachly_owner@#')
psql -q "$url" -f "$roles" >/dev/null 2>&1
"$bin" migrate --database-url "$owner_url" >/dev/null 2>&1
psql -q "$url" -f "$roles" >/dev/null
"$bin" maintain --database-url "$owner_url" >/dev/null 2>&1
org=00000000-0000-0000-0000-0000000000aa
psql -q "$url" <<SQL
INSERT INTO organizations (id, name, slug) VALUES ('$org', 'experiment', 'experiment');
INSERT INTO campaigns (id, organization_id, name, subject, from_email, status)
  VALUES ('00000000-0000-0000-0000-0000000000bb', '$org', 'c', 's', 'a@example.com', 'sending');
INSERT INTO contacts (id, organization_id, email)
  SELECT md5('c' || i)::uuid, '$org', 'u' || i || '@example.com' FROM generate_series(1, 20000) i;
INSERT INTO campaign_messages (id, organization_id, campaign_id, contact_id, status)
  SELECT md5('m' || i)::uuid, '$org', '00000000-0000-0000-0000-0000000000bb', md5('c' || i)::uuid, 'sent'
  FROM generate_series(1, 20000) i;
SQL
cols="id,organization_id,message_id,event_type,ip_address,user_agent,metadata,created_at,provider"
# Time-ordered ids (UUIDv7 layout, as the service makes them), today's partition.
for b in $(seq 0 $((batches - 1))); do
  psql -q "$url" -c "\\copy (SELECT (lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint + i), 12, '0') || '7' || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid, '$org', md5('m' || (1 + (i * 7919) % 20000))::uuid, 'opened', '203.0.113.' || (i % 250), (ARRAY['Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36', 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148', 'Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)'])[1 + i % 3], CASE WHEN i % 2 = 0 THEN '{\"machine\": false}' ELSE '{}' END, now() - interval '1 minute', 'reachly' FROM generate_series($((b * 250)), $((b * 250 + 249))) i) TO '$work/$b.csv' csv"
done
cpu="SELECT 'cpu', split_part(pg_read_file('/proc/' || pg_backend_pid() || '/stat'), ' ', 14)::int + split_part(pg_read_file('/proc/' || pg_backend_pid() || '/stat'), ' ', 15)::int;"
run() { # name, setting[, role]
  local name=$1 setting=$2 role=${3:-} f="$work/$1.sql"
  { echo "$setting"; echo "$cpu"
    [ -z "$role" ] || echo "SET ROLE $role;"
    for b in $(seq 0 $((batches - 1))); do
      if [[ $name == staging* ]]; then
        echo "BEGIN; SET LOCAL client_min_messages = warning; CREATE TEMP TABLE IF NOT EXISTS s (LIKE public.email_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;"
        echo "\\copy s ($cols) from '$work/$b.csv' csv"
        echo "INSERT INTO public.email_events ($cols) SELECT $cols FROM s; COMMIT;"
      else
        echo "BEGIN;"; echo "\\copy public.email_events ($cols) from '$work/$b.csv' csv"; echo "COMMIT;"
      fi
    done
    [ -z "$role" ] || echo "RESET ROLE;"
    echo "$cpu"; } > "$f"
  psql -q "$url" -c "TRUNCATE email_events" -c "CHECKPOINT" >/dev/null
  local ticks hz events
  ticks=$(psql -v ON_ERROR_STOP=1 -At -q "$url" -f "$f" | awk -F'|' '/^cpu/ {v[n++] = $2} END {print v[1] - v[0]}')
  hz=$(getconf CLK_TCK); events=$((batches * 250))
  local stored
  stored=$(psql -At "$url" -c "SELECT count(*) FROM email_events")
  [ "$stored" = "$events" ] || { echo "$name: $stored of $events events stored" >&2; exit 1; }
  awk -v n="$name" -v t="$ticks" -v hz="$hz" -v e="$events" \
    'BEGIN {printf "| %s | %d | %.1f |\n", n, e, t / hz * 1e6 / e}'
}
echo "| path | events | backend CPU us/event |"
echo "|---|---|---|"
for pass in 1 2; do
  run staging "SET wal_compression = off;"
  run staging-as-reachly_app "SET wal_compression = off;" reachly_app
  run direct "SET wal_compression = off;"
  run staging-pglz "SET wal_compression = pglz;"
  run direct-pglz "SET wal_compression = pglz;"
done
psql -q "$admin_url" -c "DROP DATABASE $db"
