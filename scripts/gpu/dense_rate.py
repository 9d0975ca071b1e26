#!/usr/bin/env python3
"""The dense bf16 GEMM rate of this GPU, measured with cuBLAS through torch.matmul, at the shapes of
an 8B Llama prefill step of 16384 tokens (the projections of TestCUDAPrefillBreakdown) and 8192^3.

Each shape is out [M, N] = x [M, K] @ W[N, K]^T as the shard's backend lays it out, timed with CUDA
events over 20 repetitions after a warm-up, with bf16 output and (where torch allows out_dtype)
float32 output as the backend writes it. Prints "dense M N K: X TFLOP/s" lines, one per shape and
output type. Needs torch with CUDA and no network.
"""

import sys

import torch

SHAPES = [
    # (M, N, K, what)
    (16384, 6144, 4096, "q/k/v"),
    (16384, 4096, 4096, "o"),
    (16384, 28672, 4096, "gate/up"),
    (16384, 4096, 14336, "down"),
    (8192, 8192, 8192, "square"),
]
REPS = 20


def timed(f):
    """Median milliseconds of one call of f over REPS calls, each between CUDA events."""
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        f()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2]


def main():
    if not torch.cuda.is_available():
        print("dense_rate: no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, cuBLAS via torch.matmul")
    for m, n, k, what in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        flops = 2.0 * m * n * k
        ms = timed(lambda: torch.matmul(x, w.t()))
        print(f"dense {m} {n} {k}: {flops / ms / 1e9:.0f} TFLOP/s ({what}, bf16 x bf16 -> bf16, {ms:.3f} ms)")
        # A float32 result from the GEMM itself (torch 2.8 and later); casting afterwards would time a
        # second kernel instead.
        try:
            ms = timed(lambda: torch.mm(x, w.t(), out_dtype=torch.float32))
            print(f"dense {m} {n} {k}: {flops / ms / 1e9:.0f} TFLOP/s ({what}, bf16 x bf16 -> f32, {ms:.3f} ms)")
        except (TypeError, RuntimeError) as e:
            print(f"dense {m} {n} {k}: no f32 output in this torch ({type(e).__name__}: {str(e).splitlines()[0]})")
        del x, w
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
