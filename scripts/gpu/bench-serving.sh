#!/usr/bin/env bash
# Serving under load (issue 16, target 6): `loraplex bench` against a -backend cuda shard holding the
# 8B-shaped random model of scripts/gpu/make_bench_model.py with 100 adapters (ranks 8-64, Zipf
# popularity, Poisson arrivals) at three rates, then the same three rates on the base model only.
# Build here first (no Go on the GPU machine):
#   CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations go build -tags nvml -ldflags "-s -w" -o .devrun/shard ./shard
#   go build -ldflags "-s -w" -o .devrun/loraplex ./cmd/loraplex
# then, on the GPU machine from the repository root: OUT=/tmp/out bash scripts/gpu/bench-serving.sh [RATE...]
# Reports (JSON, one per run) and logs land in $OUT.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/gpu-out}
dir=${BENCH_DIR:-/tmp/bench8b}
rates=("$@")
[ $# -eq 0 ] && rates=(4 12 24)
duration=${BENCH_DURATION:-25s}
mkdir -p "$out"
if [ ! -f "$root/kernels/libloraplex_kernels.so" ]; then
  (cd "$root/kernels" && make -j8 GENCODE='-gencode arch=compute_90a,code=sm_90a' NVCCFLAGS='-O3 -std=c++17') >"$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
fi
export LORAPLEX_KERNELS=$root/kernels/libloraplex_kernels.so
[ -d "$dir/adapters/a99" ] || python3 "$root/scripts/gpu/make_bench_model.py" "$dir" >"$out/make-model.log" 2>&1 || { tail -20 "$out/make-model.log"; exit 1; }
tail -2 "$out/make-model.log" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# A device tier that holds every adapter (2.6 GB in bf16; the budget counts float32 bytes): the
# default 512 MiB suits small models, not 100 adapters of an 8B one.
"$root/.devrun/shard" -backend cuda -model "$dir/model" -adapters "$dir/adapters" -listen 127.0.0.1:50061 \
  -adapter-device-bytes 17179869184 \
  -metrics-listen 127.0.0.1:9095 >"$out/bench-shard.log" 2>&1 &
pid=$!
start=$(date +%s)
until grep -q "shard serving" "$out/bench-shard.log"; do
  kill -0 $pid 2>/dev/null || { echo "shard exited:"; tail -20 "$out/bench-shard.log"; exit 1; }
  [ $(( $(date +%s) - start )) -gt 400 ] && { echo "shard not serving after 400 s"; tail -5 "$out/bench-shard.log"; exit 1; }
  sleep 1
done
echo "shard serving after $(( $(date +%s) - start )) s"
grep -E "budget|KV cache|model loaded" "$out/bench-shard.log" | cut -c1-300
bench() {
  "$root/.devrun/loraplex" bench -addr 127.0.0.1:50061 -adapters 100 -adapter-prefix a -prompt-tokens 128-512 \
    -max-new-tokens 64-128 -concurrency 1024 -request-timeout 2m -timeout 0 -chart none -quiet "$@"
}
# Warm-up: every adapter loaded once, step graphs recorded (not reported).
bench -rate 20 -duration 15s -out none >"$out/bench-warmup.txt" 2>&1
for mode in lora base; do
  extra=()
  [ $mode = base ] && extra=(-base-fraction 1)
  for r in "${rates[@]}"; do
    bench -rate "$r" -duration "$duration" -seed 7 -out "$out/bench-$mode-$r.json" "${extra[@]}" >"$out/bench-$mode-$r.txt" 2>&1
    echo "== $mode rate $r"; grep -iE "completed|throughput|ttft|time/output" "$out/bench-$mode-$r.txt" | head -12
  done
done
kill -TERM $pid; wait $pid; echo "shard exit $?"
