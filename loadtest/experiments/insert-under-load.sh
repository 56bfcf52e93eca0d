#!/usr/bin/env bash
# Why the writer's insert costs more database CPU in the load test than alone: the staged
# `INSERT INTO email_events ... SELECT` of src/pipeline/store.rs, timed by the backend's own
# on-CPU nanoseconds (/proc/<pid>/schedstat, read just before and after each INSERT, so
# filling the staging table is not counted), one commit per batch, on a throwaway cluster
# with the B1ms settings of loadtest/src/cluster.rs (shared_buffers 256 MB, pglz full-page
# images, checkpoints every 10 min). One suspect changes at a time:
#
#   pixel, empty partition        the staging-vs-copy.sh case
#   pixel / esp, partition of N   the partition and its indexes outgrow shared_buffers; esp:
#                                 ESP events, a random dedup key, ON CONFLICT DO NOTHING;
#                                 under each shape of idx_events_dedup (V1's key first, V12's
#                                 time first), each grown from empty by the same preload
#   ..., messages updated         each batch's messages updated after its INSERT, as the
#                                 writer's status merge does (their HOT chains meet the
#                                 next foreign-key checks)
#   pixel, one batch of all       the limit's shape: all the batches' rows in one INSERT
#   ..., no foreign key           without email_events_message_fkey (V11's one check)
#
#   loadtest/experiments/insert-under-load.sh [preload_rows] [batches] [batch_size]
#
# Defaults: 2,000,000 rows preloaded (the load test's service phase stores ~2.1 million),
# 200 batches of 500 (the load test's sustained steps commit 300-1,500 events at a time).
# Needs root (the cluster runs as the postgres user), PostgreSQL 15's server binaries
# (initdb, pg_ctl under /usr/lib/postgresql/*/bin), psql, taskset, python3, and
# target/release/reachly-ingest (cargo build --release) for the migrations.
#
# Measured 2026-12-07 (the 2-core development machine, three passes): pixel insert 11.4 us
# per event into an empty partition, 10.5-16.1 into one of 2 million rows (the first pass
# after a checkpoint pays full-page images); ESP events 20.7-27.3 with V1's dedup index,
# 17.7-18.9 with V12's (migrations/V12__event_dedup_index_time_first.sql); the limit's one
# batch 11.6. The foreign key is half a pixel insert's cost: 5.5 us per event without it
# (5.6 in one batch), 13.7 for ESP events. A second run: ESP events 22.3-30.9 (V1) against
# 18.3-18.8 (V12); with each batch's messages updated, pixel events 13.6-13.8 against
# 11.7-12.3 without, ESP events 20.9. It is kept: it is how the database itself
# refuses an event filed under another tenant than its message's (V11), and the limit
# reference pays it too.
set -euo pipefail
preload=${1:-2000000}
batches=${2:-200}
size=${3:-500}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/../../target/release/reachly-ingest
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/insert-under-load.XXXXXX)
chmod 755 "$work"
chown postgres "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pg() { runuser -u postgres -- "$@"; }
cleanup() { pg "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
pg "$pgbin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = 50
shared_buffers = 256MB
effective_cache_size = 1792MB
maintenance_work_mem = 97MB
work_mem = 4MB
wal_buffers = 16MB
wal_compression = pglz
max_wal_size = 2GB
min_wal_size = 80MB
checkpoint_timeout = 10min
checkpoint_completion_target = 0.9
random_page_cost = 2
fsync = on
synchronous_commit = on
CONF
# The database on CPU 0, like the load test's.
pg taskset -c 0 "$pgbin/pg_ctl" -D "$work/data" -l "$work/log" -w start >/dev/null
url="postgres://postgres@127.0.0.1:$port/postgres"
q() { psql -v ON_ERROR_STOP=1 -qAt "$url" "$@"; }
"$bin" migrate --database-url "$url" >/dev/null 2>&1
"$bin" maintain --database-url "$url" >/dev/null 2>&1
org=00000000-0000-0000-0000-0000000000aa
messages=250000
q <<SQL
INSERT INTO organizations (id, name, slug) VALUES ('$org', 'experiment', 'experiment');
INSERT INTO campaigns (id, organization_id, name, subject, from_email, status)
  VALUES ('00000000-0000-0000-0000-0000000000bb', '$org', 'c', 's', 'a@example.com', 'sending');
INSERT INTO contacts (id, organization_id, email)
  SELECT md5('c' || i)::uuid, '$org', 'u' || i || '@example.com' FROM generate_series(1, $messages) i;
INSERT INTO campaign_messages (id, organization_id, campaign_id, contact_id, status)
  SELECT md5('m' || i)::uuid, '$org', '00000000-0000-0000-0000-0000000000bb', md5('c' || i)::uuid, 'sent'
  FROM generate_series(1, $messages) i;
-- Event number i: a UUIDv7-shaped id of its arrival (i ms after 01:00 today, UTC), a
-- message scattered over the campaign, and either a pixel open (a browser's user agent,
-- no key) or an ESP delivery (no user agent, a random key like SendGrid's sg_event_id,
-- its ESP time up to a minute before arrival).
CREATE FUNCTION exp_event(i bigint, esp boolean) RETURNS public.email_events LANGUAGE sql AS \$\$
  SELECT ROW(
    (lpad(to_hex((extract(epoch FROM date_trunc('day', now() AT TIME ZONE 'UTC')) * 1000)::bigint + 3600000 + i), 12, '0')
      || '7' || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid,
    '$org'::uuid,
    md5('m' || (1 + (i * 7919) % $messages))::uuid,
    CASE WHEN esp THEN 'delivered' ELSE 'opened' END,
    '203.0.113.' || (i % 250),
    CASE WHEN esp THEN NULL ELSE (ARRAY['Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36', 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148', 'Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)'])[1 + i % 3] END,
    NULL,
    CASE WHEN esp THEN '{"smtp-id": "<x@example.com>", "sg_message_id": "abc.filter"}' ELSE '{"machine": false}' END::jsonb,
    (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') + interval '1 hour' + i * interval '1 ms'
      - CASE WHEN esp THEN (('x' || substr(md5('t' || i), 1, 4))::bit(16)::int % 60000) * interval '1 ms' ELSE interval '0' END,
    CASE WHEN esp THEN 'sendgrid' ELSE 'reachly' END,
    CASE WHEN esp THEN 'sendgrid:' || md5('k' || i) END
  )::public.email_events
\$\$;
CREATE FUNCTION exp_cpu_ns() RETURNS bigint LANGUAGE sql AS \$\$
  SELECT split_part(pg_read_file('/proc/' || pg_backend_pid() || '/schedstat'), ' ', 1)::bigint
\$\$;
SQL
cols="id, organization_id, message_id, event_type, ip_address, user_agent, link_url, metadata, created_at, provider, dedup_key"
next=0 # the next event number, so every event of the run is new
# run NAME esp(true|false) BATCHES SIZE [update]: one batch per transaction, the INSERT's
# CPU and wall time summed.
run() {
  local name=$1 esp=$2 nb=$3 bs=$4 conflict="" update=""
  [ "$esp" = true ] && conflict="ON CONFLICT DO NOTHING"
  # update: each batch's messages updated after its INSERT, in its transaction (untimed),
  # as the writer's status merge does; their rows' HOT chains then meet the next batches'
  # foreign-key checks.
  [ "${5:-}" = update ] && update="UPDATE public.campaign_messages AS m SET status = 'delivered', updated_at = clock_timestamp() FROM (SELECT DISTINCT message_id FROM reachly_stage_events) AS s WHERE m.id = s.message_id;"
  local before out
  before=$(q -c "SELECT count(*) FROM email_events")
  out=$(q 2>&1 <<SQL
CREATE TEMP TABLE reachly_stage_events (LIKE public.email_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE exp_result (cpu_ns bigint, wall_ms float8);
DO \$\$
DECLARE t0 bigint; total bigint := 0; w0 timestamptz; wall float8 := 0;
BEGIN
  FOR b IN 0..$nb - 1 LOOP
    INSERT INTO reachly_stage_events ($cols)
      SELECT $cols FROM (SELECT (exp_event(i, $esp)).* FROM generate_series($next + b::bigint * $bs, $next + b::bigint * $bs + $bs - 1) i) e;
    w0 := clock_timestamp();
    t0 := exp_cpu_ns();
    INSERT INTO public.email_events ($cols) SELECT $cols FROM reachly_stage_events $conflict;
    total := total + exp_cpu_ns() - t0;
    wall := wall + extract(epoch FROM clock_timestamp() - w0) * 1000;
    $update
    IF b = $nb - 1 THEN
      INSERT INTO exp_result VALUES (total, wall);
    END IF;
    COMMIT;
  END LOOP;
END
\$\$;
SELECT 'result', cpu_ns, wall_ms FROM exp_result;
SQL
) || { echo "$name: $out" >&2; exit 1; }
  next=$((next + nb * bs))
  local after
  after=$(q -c "SELECT count(*) FROM email_events")
  [ $((after - before)) -eq $((nb * bs)) ] || { echo "$name: $((after - before)) of $((nb * bs)) events stored: $out" >&2; exit 1; }
  echo "$out" | awk -F'|' -v n="$name" -v e=$((nb * bs)) -v rows="$before" \
    '/^result/ {printf "| %s | %d | %d | %.1f | %.1f |\n", n, rows, e, $2 / 1000 / e, $3 * 1000 / e}'
}
preload() {
  local n=$1
  # ESP events 38% of the rows, as in the load test's mix (0.8 of 2.1 million).
  q -c "INSERT INTO public.email_events ($cols) SELECT $cols FROM (SELECT (exp_event(i, i % 100 < 38)).* FROM generate_series($next, $next + $n - 1) i) e" \
    -c "VACUUM ANALYZE public.email_events" -c "CHECKPOINT" >/dev/null
  next=$((next + n))
}
echo "| case | rows before | events | INSERT CPU us/event | INSERT wall us/event |"
echo "|---|---|---|---|---|"
dedup_index() { # the column order of idx_events_dedup
  q -c "DROP INDEX idx_events_dedup" \
    -c "CREATE UNIQUE INDEX idx_events_dedup ON public.email_events ($1) WHERE dedup_key IS NOT NULL" >/dev/null
}
run "pixel, empty partition" false "$batches" "$size"
# Each shape of the dedup index grows from empty with the same preload, as an index does
# in production (a freshly rebuilt one, packed full, splits leaves at every random insert).
for shape in "dedup_key, created_at" "created_at, dedup_key"; do
  q -c "TRUNCATE email_events" >/dev/null
  dedup_index "$shape"
  preload "$preload"
  for pass in 1 2 3; do
    run "pixel, partition of $preload rows, dedup index ($shape)" false "$batches" "$size"
    run "esp, partition of $preload rows, dedup index ($shape)" true "$batches" "$size"
  done
done
for pass in 1 2; do
  run "pixel, partition of $preload rows, V12" false "$batches" "$size"
  run "pixel, partition of $preload rows, V12, messages updated in each batch" false "$batches" "$size" update
done
run "esp, partition of $preload rows, V12, messages updated in each batch" true "$batches" "$size" update
run "pixel, one batch of all (the limit's shape)" false 1 $((batches * size))
q -c "ALTER TABLE public.email_events DROP CONSTRAINT email_events_message_fkey" >/dev/null
run "pixel, no foreign key" false "$batches" "$size"
run "esp, no foreign key" true "$batches" "$size"
run "pixel, one batch of all, no foreign key" false 1 $((batches * size))
