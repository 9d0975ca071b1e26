#!/usr/bin/env bash
# Runs the GPU tests and benchmarks on a machine with nvcc and a GPU, from test binaries built
# elsewhere (no Go needed here):
#   CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations go test -tags nvml -c -o .devrun/cuda.test ./shard/internal/compute/cuda/
#   (the same for ./shard/internal/model/llama/ into .devrun/llama.test)
# Usage: scripts/gpu/run-tests.sh [tests|bench|lora|sgmv|attn|breakdown|prefill|e2e|8b|upload|smoke]... ; output in $OUT (or /tmp/gpu-out).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
cd "$root/kernels" && make -j8 GENCODE='-gencode arch=compute_90a,code=sm_90a' NVCCFLAGS='-O3 -std=c++17 -lineinfo' >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
export LORAPLEX_KERNELS=$root/kernels/libloraplex_kernels.so
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
cuda() { (cd "$root/shard/internal/compute/cuda" && "$root/.devrun/cuda.test" "$@"); }
llama() { (cd "$root/shard/internal/model/llama" && "$root/.devrun/llama.test" "$@"); }
rc=0
# show PKG TEST FLAG LOG PATTERN: runs one test of PKG (cuda or llama) with FLAG into $out/LOG and
# prints the lines matching PATTERN.
show() {
  "$1" -test.v -test.count=1 -test.run "$2" "$3" >"$out/$4" 2>&1 || rc=1
  grep -E "$5" "$out/$4" | tail -50
}
for what in "${@:-tests}"; do
  case $what in
    tests)
      cuda -test.v -test.count=1 -test.run 'TestBackend|TestInvariantMatMulRows|TestKVCacheDType|TestSGMVRandom|TestSGMVFused|TestBF16|TestF16|TestDeviceAndNVML|TestFused|TestLoRATail|TestUpload(AdapterReadBack|AdapterConcurrent|OverlapsCompute)|TestSample' >"$out/cuda-tests.log" 2>&1 || rc=1
      grep -E '^(--- |FAIL|ok|PASS)' "$out/cuda-tests.log" | grep -v '^--- PASS' | tail -30
      llama -test.v -test.count=1 -test.run 'TestCUDAMatchesReference|TestCUDAFamiliesMatchReference|TestCUDABatchInvariant|TestCUDAStepGraphsMatchEager' >"$out/llama-tests.log" 2>&1 || rc=1
      grep -E '^(--- |FAIL|ok|PASS)|worst logit|graph stats|steps:|bit-identical' "$out/llama-tests.log" | tail -40
      ;;
    bench) show llama TestCUDADecodeBench -cuda.bench decode-bench.log 'decode step|clusters off|FAIL|copy bandwidth' ;;
    lora) show llama TestCUDADecodeAdaptersBench -cuda.bench lora-bench.log 'batch|FAIL|bandwidth' ;;
    sgmv) show cuda '^TestSGMVBench$' -sgmv.bench sgmv-bench.log 'bandwidth|^ *\| (256|32|1) \||FAIL' ;;
    attn) show cuda '^TestAttentionBench$' -attn.bench attn-bench.log 'bandwidth|^ *\||FAIL' ;;
    breakdown) show llama TestCUDAOpBreakdown -cuda.bench breakdown.log 'cuda_test|RUN|FAIL' ;;
    prefill)
      # The dense bf16 rate (cuBLAS through torch) beside the prefill breakdown, in the same run.
      python3 "$root/scripts/gpu/dense_rate.py" >"$out/dense.log" 2>&1 || { rc=1; tail -5 "$out/dense.log"; }
      grep -E '^(device|dense)' "$out/dense.log"
      llama -test.v -test.count=1 -test.run 'TestCUDAPrefillBreakdown' -cuda.bench >"$out/prefill.log" 2>&1 || rc=1
      grep -E 'prefill_cuda_test|RUN|FAIL' "$out/prefill.log" | tail -40
      ;;
    smoke)
      (cd "$root" && OUT=$out timeout 240 bash scripts/gpusmoke/check.sh) >"$out/smoke.log" 2>&1 || rc=1
      grep -E 'held-out|exit|ttft' "$out/smoke.log"
      ;;
    upload)
      cuda -test.v -test.count=1 -test.run '^TestUploadBench$' -upload.bench >"$out/upload-bench.log" 2>&1 || rc=1
      tail -30 "$out/upload-bench.log"
      ;;
    e2e)
      [ -d /tmp/e2e ] || python3 "$root/scripts/bench_e2e_peft.py" /tmp/e2e >"$out/peft.log" 2>&1 || rc=1
      tail -12 "$out/peft.log"
      llama -test.v -test.count=1 -test.run 'TestCUDAE2E|TestCUDAEngineE2E' -cuda.e2e=/tmp/e2e >"$out/e2e.log" 2>&1 || rc=1
      grep -E 'E2E|FAIL|loaded' "$out/e2e.log" | tail -20
      ;;
    8b)
      llama -test.v -test.count=1 -test.run 'TestCUDADecode8B|TestCUDAColdAdapter8B' -cuda.bench8b >"$out/8b.log" 2>&1 || rc=1
      grep -E '8B|FAIL|prefill|decode step' "$out/8b.log" | tail -12
      ;;
  esac
done
exit $rc
