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
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
start_cluster

ulimit -n "$(( n * 2 + 1024 ))" 2>/dev/null || true
for round in $(seq "$rounds"); do
  for bin in "${bins[@]}"; do
    start_service "$bin"
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
    stop_service
  done
done
