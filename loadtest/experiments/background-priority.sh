#!/usr/bin/env bash
# Tracking latency at half the saturation rate, with and without large webhook batches,
# for several builds or settings, alternating, each in a fresh load-test run of its own
# (throwaway B1ms-shaped cluster, warm-up step, then the two half-rate steps of a full run).
# Made for the pipeline's own runtime (src/pipeline/runtime.rs): main at 44ddf42 ran the
# writers on the request path's runtime; since, they run on threads of their own at
# REACHLY_BACKGROUND_NICE. A variant is NAME=BINARY[:ENV=VALUE,...], for example
#
#   loadtest/experiments/background-priority.sh 3 4750 \
#       head=/tmp/head/reachly-ingest bg5=target/release/reachly-ingest \
#       bg0=target/release/reachly-ingest:REACHLY_BACKGROUND_NICE=0
#
# Arguments: rounds, half rate (req/s), variants. Prints, per run, the worse of pixel and
# click p50 / p99 / p99.9 in both steps and the application core's load. Needs the load
# test built (target/release/reachly-loadtest, naive-server) and what it needs; root, ~80 s
# a run.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
rounds="${1:?rounds}"
rate="${2:?half rate}"
shift 2
[ $# -gt 0 ] || { echo "give at least one NAME=BINARY[:ENV=VALUE,...]" >&2; exit 2; }
out="$(mktemp -d /tmp/background-priority.XXXXXX)"
echo "results under $out"
printf '| round | variant | half: pixel p99 / click p99 / p99.9 ms | with SendGrid batches of 1000: pixel p99 / click p99 / p99.9 ms | app core busy (half; batches) | committed ev/s (half; batches) |\n|---|---|---|---|---|---|\n'
for round in $(seq "$rounds"); do
  for variant in "$@"; do
    name="${variant%%=*}"
    rest="${variant#*=}"
    bin="${rest%%:*}"
    envs=()
    if [[ "$rest" == *:* ]]; then IFS=',' read -r -a envs <<< "${rest#*:}"; fi
    dir="$out/r$round-$name"
    mkdir -p "$dir"
    env "${envs[@]}" "$root/target/release/reachly-loadtest" full --service-bin "$bin" \
      --naive-bin "$root/target/release/naive-server" --skip-bus --skip-outage --skip-naive \
      --skip-limit --rates 2000 --half-rate "$rate" --step-seconds 20 --quiet-wait 10 \
      --results-dir "$dir" > "$dir/console.txt" 2>&1 || { echo "run $dir failed: see console.txt" >&2; continue; }
    python3 - "$dir/latest.md" "$round" "$name" <<'PY'
import sys
path, rnd, name = sys.argv[1:]
rows = [l.split('|') for l in open(path) if l.startswith('| service half')][:2]
if len(rows) < 2:
    raise SystemExit(f"{path}: no half-rate rows")
def lat(r):
    px, ck = ([float(x) for x in r[c].split('/')] for c in (4, 5))
    return f"{px[1]:.2f} / {ck[1]:.2f} / {max(px[2], ck[2]):.1f}"
print(f"| {rnd} | {name} | {lat(rows[0])} | {lat(rows[1])} | {rows[0][14].strip()}; {rows[1][14].strip()} | {rows[0][8].strip()}; {rows[1][8].strip()} |")
PY
  done
done
