# Shared by the experiments that measure the service process itself (idle-connections.sh,
# large-heads.sh): a throwaway PostgreSQL cluster, removed on exit, and the service started
# afresh against it. Source it; it needs PostgreSQL's server binaries, python3 and curl, and
# root (the cluster runs as postgres).
#
#   start_cluster               # sets $work and $db; the cluster and $work go at exit
#   start_service BINARY        # sets $pid and $port (public) once /readyz answers
#   stop_service

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_cluster() {
  pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  work="$(mktemp -d /tmp/reachly-experiment-XXXXXX)"
  chown postgres "$work"
  trap 'runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; pkill -f "$work/spool" 2>/dev/null || true; rm -rf "$work"' EXIT
  local pgport
  pgport="$(free_port)"
  runuser -u postgres -- "$pgbin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -o "-p $pgport -k $work -c listen_addresses=127.0.0.1" -l "$work/pg.log" -w start >/dev/null
  db="postgres://postgres@127.0.0.1:$pgport/postgres"
}

start_service() {
  local admin
  port="$(free_port)"
  admin="$(free_port)"
  rm -rf "$work/spool"
  DATABASE_URL="$db" REACHLY_MIGRATE_ON_START=true REACHLY_LISTEN="127.0.0.1:$port" \
    REACHLY_ADMIN_LISTEN="127.0.0.1:$admin" REACHLY_SPOOL_DIR="$work/spool" \
    "$1" serve >"$work/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the service did not become ready; its log:" >&2
  tail -20 "$work/serve.log" >&2
  return 1
}

stop_service() {
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}
