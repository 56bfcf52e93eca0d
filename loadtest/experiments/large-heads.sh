#!/usr/bin/env bash
# Memory a request head can make the service hold: N connections each send K bytes of an
# HTTP/1 request head that never ends (a GET line, then one header of K bytes, no blank
# line), the server's VmRSS is read 1.5 s later, and each socket is read for an answer.
# hyper's default read buffer (~400 kB) held the whole head, on every connection, counted
# by no budget; since MAX_READ_BUFFER_BYTES (src/server.rs) a head past 32 kB is answered 431
# and its connection closed. Each round starts each given build afresh; builds alternate.
#
#   loadtest/experiments/large-heads.sh [connections] [head bytes] [rounds] [binary ...]
#
# Defaults: 500 connections, 300000 bytes, 2 rounds, target/release/reachly-ingest.
# Needs: PostgreSQL's server binaries, python3, curl; run as root (the cluster runs as postgres).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
n="${1:-500}"
k="${2:-300000}"
rounds="${3:-2}"
shift $(( $# < 3 ? $# : 3 ))
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/reachly-ingest")
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
start_cluster

ulimit -n "$(( n * 2 + 1024 ))" 2>/dev/null || true
for round in $(seq "$rounds"); do
  for bin in "${bins[@]}"; do
    start_service "$bin"
    python3 - "$pid" "$port" "$n" "$k" "$bin" "$round" <<'EOF'
import socket, sys, time
pid, port, n, k, binary, rnd = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                 int(sys.argv[4]), sys.argv[5], sys.argv[6])
def rss_kb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS for the server")
before = rss_kb()
head = b"GET /o/not-a-token.gif HTTP/1.1\r\nHost: heads\r\nX-Pad: " + b"a" * k
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    try:
        s.send(head)  # as much as the socket takes; the rest is never sent
    except BlockingIOError:
        pass
    socks.append(s)
time.sleep(1.5)
after = rss_kb()
answers = {}
for s in socks:
    s.setblocking(True)
    s.settimeout(0.2)
    try:
        got = s.recv(64)
        code = got[9:12].decode() if got.startswith(b"HTTP/1.1 ") else ("closed" if not got else "other")
    except (socket.timeout, BlockingIOError):
        code = "no answer (held)"
    except ConnectionResetError:
        code = "reset"
    answers[code] = answers.get(code, 0) + 1
print(f"round {rnd} {binary}: RSS {before} -> {after} kB with {n} heads of {k} bytes: "
      f"{(after - before) / n:.1f} kB per connection; answers {answers}")
EOF
    stop_service
  done
done
