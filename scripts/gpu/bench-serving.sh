#!/usr/bin/env bash
# Serving under load (issue 16, target 6): `loraplex bench` against a -backend cuda shard holding the
# 8B-shaped random model of scripts/gpu/make_bench_model.py with 100 adapters (ranks 8-64, Zipf
# popularity, Poisson arrivals) at three rates, then the same three rates on the base model only.
# Build here first (no Go on the GPU machine):
#   CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations go build -tags nvml -ldflags "-s -w" -o .devrun/shard ./shard
#   go build -ldflags "-s -w" -o .devrun/loraplex ./cmd/loraplex
# then, on the GPU machine from the repository root: OUT=/tmp/out bash scripts/gpu/bench-serving.sh [RATE...]
# Reports (JSON, one per run) and logs land in $OUT. BENCH_DURATION sets the seconds per rate (25s);
# BENCH_ALT_FLAGS (say "-cuda-clusters=false") repeats the adapter runs on a shard with those flags.
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
# default 512 MiB suits small models, not 100 adapters of an 8B one. start_shard NAME [FLAG...] starts
# it with extra flags, logging to $out/NAME-shard.log, and waits until it serves.
start_shard() {
  local log="$out/$1-shard.log"
  shift
  "$root/.devrun/shard" -backend cuda -model "$dir/model" -adapters "$dir/adapters" -listen 127.0.0.1:50061 \
    -adapter-device-bytes 17179869184 \
    -metrics-listen 127.0.0.1:9095 "$@" >"$log" 2>&1 &
  pid=$!
  local start
  start=$(date +%s)
  until grep -q "shard serving" "$log"; do
    kill -0 $pid 2>/dev/null || { echo "shard exited:"; tail -20 "$log"; exit 1; }
    [ $(( $(date +%s) - start )) -gt 400 ] && { echo "shard not serving after 400 s"; tail -5 "$log"; exit 1; }
    sleep 1
  done
  echo "shard serving after $(( $(date +%s) - start )) s"
  grep -E "budget|KV cache|model loaded" "$log" | cut -c1-300
}
bench() {
  "$root/.devrun/loraplex" bench -addr 127.0.0.1:50061 -adapters 100 -adapter-prefix a -prompt-tokens 128-512 \
    -max-new-tokens 64-128 -concurrency 1024 -request-timeout 2m -timeout 0 -chart none -quiet "$@"
}
# run MODE [BENCH FLAG...]: the rates against the running shard, reports $out/bench-MODE-RATE.*
run() {
  local mode=$1
  shift
  for r in "${rates[@]}"; do
    bench -rate "$r" -duration "$duration" -seed 7 -out "$out/bench-$mode-$r.json" "$@" >"$out/bench-$mode-$r.txt" 2>&1
    echo "== $mode rate $r"; grep -iE "completed|throughput|ttft|time/output" "$out/bench-$mode-$r.txt" | head -12
  done
}
start_shard bench
# Warm-up: every adapter loaded once, step graphs recorded (not reported).
bench -rate 20 -duration 15s -out none >"$out/bench-warmup.txt" 2>&1
run lora
run base -base-fraction 1
kill -TERM $pid; wait $pid; echo "shard exit $?"
# BENCH_ALT_FLAGS (say -cuda-clusters=false): the adapter runs again on a shard started with those
# flags, reports bench-lora-alt-RATE.*, for a comparison within one run.
if [ -n "${BENCH_ALT_FLAGS:-}" ]; then
  read -r -a alt <<<"$BENCH_ALT_FLAGS"
  start_shard alt "${alt[@]}"
  bench -rate 20 -duration 15s -out none >"$out/bench-warmup-alt.txt" 2>&1
  run lora-alt
  kill -TERM $pid; wait $pid; echo "shard exit $?"
fi
