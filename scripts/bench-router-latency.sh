#!/usr/bin/env bash
# Measures the latency the router adds in front of a shard. Builds the binaries, starts one shard on
# the embedded tiny model and a router with a static shard list (no Consul) in front of it, then
# drives Generate with ghz (one new token, so the figure is mostly RPC and routing cost) against the
# shard directly and through the router, and prints p50/p99 for both with the load average.
#
#   scripts/bench-router-latency.sh            # 2000 requests, 8 concurrent, per target
#   N=5000 C=16 scripts/bench-router-latency.sh
#
# Needs ghz (installed with `go install` when missing) and jq or python3. Figures for
# docs/benchmarks.md: record the machine and the load average printed with them.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
n=${N:-2000}
c=${C:-8}
data='{"text":"hi","stopping":{"max_new_tokens":1}}'

ghz=$(command -v ghz || true)
if [ -z "$ghz" ]; then
  ghz="$(go env GOPATH)/bin/ghz"
  if [ ! -x "$ghz" ]; then
    echo "installing ghz" >&2
    go install github.com/bojand/ghz/cmd/ghz@latest
  fi
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/shard" ./shard
go build -o "$work/router" ./router

# wait_serving LOG MSG: waits for a process's "serving" log line and prints the address it names.
wait_serving() {
  local log=$1 msg=$2
  for _ in $(seq 300); do
    if line=$(grep -m1 "\"msg\":\"$msg\"" "$log" 2>/dev/null); then
      sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line"
      return 0
    fi
    sleep 0.1
  done
  echo "no \"$msg\" line in $log:" >&2
  cat "$log" >&2
  return 1
}

"$work/shard" -listen 127.0.0.1:0 -shard-id s0 -model test/tinyllama/model -adapters test/tinyllama/adapters \
  >"$work/shard.log" 2>&1 &
pids+=($!)
shard=$(wait_serving "$work/shard.log" "shard serving")
"$work/router" -listen 127.0.0.1:0 -shards "s0=$shard" >"$work/router.log" 2>&1 &
pids+=($!)
router=$(wait_serving "$work/router.log" "router serving")

# ghz releases up to at least v0.93.0 (what `go install ...@latest` resolves to) cannot parse the
# proto3 `optional` in generation.proto; both servers serve reflection, which ghz then uses instead.
schema=(--proto proto/loraplex/v1/generation.proto --import-paths proto)
if ! "$ghz" --insecure "${schema[@]}" --call loraplex.v1.GenerationService/Generate -d "$data" -n 1 "$shard" >"$work/probe.txt" 2>&1; then
  echo "ghz cannot use the .proto ($(head -c 200 "$work/probe.txt")); using server reflection" >&2
  schema=()
fi

# run NAME ADDR REQUESTS: one ghz run, its JSON report in $work/NAME.json.
run() {
  "$ghz" --insecure "${schema[@]}" \
    --call loraplex.v1.GenerationService/Generate -d "$data" -n "$3" -c "$c" \
    --format=json -o "$work/$1.json" "$2"
}

# summary NAME: "p50_ms p99_ms avg_ms rps errors" from a ghz JSON report (latencies are in ns).
summary() {
  local f="$work/$1.json"
  if command -v jq >/dev/null; then
    jq -r '[ (.latencyDistribution[] | select(.percentage == 50) | .latency / 1e6),
             (.latencyDistribution[] | select(.percentage == 99) | .latency / 1e6),
             (.average / 1e6), .rps,
             ([.statusCodeDistribution // {} | to_entries[] | select(.key != "OK") | .value] | add // 0) ]
           | "\(.[0]) \(.[1]) \(.[2]) \(.[3]) \(.[4])"' "$f"
  else
    python3 - "$f" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p = {d["percentage"]: d["latency"] / 1e6 for d in r["latencyDistribution"]}
errs = sum(v for k, v in (r.get("statusCodeDistribution") or {}).items() if k != "OK")
print(p[50], p[99], r["average"] / 1e6, r["rps"], errs)
EOF
  fi
}

# Warm up both paths (connections, adapter-less model path), then measure.
run warm-direct "$shard" 200 >/dev/null
run warm-router "$router" 200 >/dev/null
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)
run direct "$shard" "$n"
run router "$router" "$n"
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)

echo "ghz: Generate, max_new_tokens 1, $n requests, concurrency $c; $(nproc 2>/dev/null || echo '?') cores"
echo "load average before: $load_before; after: $load_after"
printf '%-22s %9s %9s %9s %9s %7s\n' target p50_ms p99_ms avg_ms rps errors
for t in direct router; do
  read -r p50 p99 avg rps errs < <(summary "$t")
  label="shard directly"
  [ "$t" = router ] && label="through the router"
  printf '%-22s %9.3f %9.3f %9.3f %9.0f %7s\n' "$label" "$p50" "$p99" "$avg" "$rps" "$errs"
done
