#!/usr/bin/env bash
# Memory an idle keep-alive connection holds in the service: mail clients and ESPs keep
# thousands open, and in the load test's overload steps they are most of the RSS beside the
# buffered events. Each round starts each given build afresh against a throwaway cluster,
# opens N connections, sends one pixel request on each (an unknown token: the GIF is served,
# nothing is stored), reads the answers, waits 1.5 s and reports the growth of the server's
# VmRSS per connection. Builds alternate, so neither always runs on a warmer machine.
#
#   loadtest/experiments/idle-connections.sh [connections] [rounds] [binary ...]
#
# Defaults: 2000 connections, 3 rounds, target/release/reachly-ingest. Give two binaries
# (e.g. this build and one built from another commit) to compare them.
# Needs: PostgreSQL's server binaries, python3; run as root (the cluster runs as postgres).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
n="${1:-2000}"
rounds="${2:-3}"
shift $(( $# < 2 ? $# : 2 ))
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/reachly-ingest")
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
work="$(mktemp -d /tmp/reachly-idle-XXXXXX)"
chown postgres "$work"
trap 'runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; pkill -f "$work/spool" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pgport="$(free_port)"
runuser -u postgres -- "$pgbin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -o "-p $pgport -k $work -c listen_addresses=127.0.0.1" -l "$work/pg.log" -w start >/dev/null
db="postgres://postgres@127.0.0.1:$pgport/postgres"

ulimit -n "$(( n * 2 + 1024 ))" 2>/dev/null || true
for round in $(seq "$rounds"); do
  for bin in "${bins[@]}"; do
    port="$(free_port)"
    admin="$(free_port)"
    rm -rf "$work/spool"
    DATABASE_URL="$db" REACHLY_MIGRATE_ON_START=true REACHLY_LISTEN="127.0.0.1:$port" \
      REACHLY_ADMIN_LISTEN="127.0.0.1:$admin" REACHLY_SPOOL_DIR="$work/spool" \
      "$bin" serve >"$work/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
      sleep 0.1
    done
    python3 - "$pid" "$port" "$n" "$bin" "$round" <<'EOF'
import socket, sys, time
pid, port, n, binary, rnd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def rss_kb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS for the server")
before = rss_kb()
req = (b"GET /o/not-a-token.gif HTTP/1.1\r\nHost: idle\r\n"
       b"User-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0\r\n\r\n")
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    socks.append(s)
for s in socks:
    if not s.recv(4096).startswith(b"HTTP/1.1 200"):
        raise SystemExit("the pixel was not served")
time.sleep(1.5)
after = rss_kb()
print(f"round {rnd} {binary}: RSS {before} -> {after} kB with {n} idle connections: "
      f"{(after - before) / n:.1f} kB per connection")
EOF
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
