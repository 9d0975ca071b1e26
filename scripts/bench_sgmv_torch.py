#!/usr/bin/env python3
"""Torch baselines for the SGMV microbenchmark (shard/internal/compute/cuda TestSGMVBench).

Runs on the GPU machine, in the same command as the Go benchmark so both see the same card:

    python3 scripts/bench_sgmv_torch.py

For one 4096x4096 projection in bf16 over the same grid (tokens, distinct adapters, ranks; tokens
dealt to adapters in contiguous, nearly equal segments, scale 0.5) it times two ways torch applies
many LoRA adapters in one batch:
  gather+bmm  per-token A and B gathered by adapter index, then two batched matmuls
  loop        one (x A^T) B^T per adapter segment
Each is captured in a CUDA graph and the graph replay timed with CUDA events (median of 20 after 3
warm-ups), like the Go benchmark's "one pair per graph" column. Weights are not rotated, so small
configurations may run from L2. Also prints the device-to-device copy bandwidth (read + write).
"""
import statistics

import torch

HIDDEN = 4096
RANKS = (8, 16, 64)
ADAPTERS = (1, 8, 32, 128)
TOKENS = (1, 8, 16, 32, 64, 128, 256)


def time_graph(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times) * 1e3  # us


def copy_bandwidth():
    n = 1 << 30
    a = torch.full((n // 2,), 0.5, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return 2 * n / (statistics.median(times) * 1e-3)


def main():
    torch.manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, device {dev.name}, {dev.multi_processor_count} SMs; "
          f"copy bandwidth (read+write) {bw / 1e9:.0f} GB/s")
    print("| tokens | adapters | rank | gather+bmm us | loop us | MB moved (SGMV count) |")
    print("|---|---|---|---|---|---|")
    for r in RANKS:
        for nad in ADAPTERS:
            for t in TOKENS:
                if nad > t:
                    continue
                x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
                y = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
                A = torch.randn(nad, r, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5
                B = torch.randn(nad, HIDDEN, r, device="cuda", dtype=torch.bfloat16) * r ** -0.5
                segs = [(a * t // nad, (a + 1) * t // nad) for a in range(nad)]
                idx = torch.tensor([a for a, (lo, hi) in enumerate(segs) for _ in range(lo, hi)],
                                   device="cuda", dtype=torch.long)

                def gather_bmm():
                    v = torch.bmm(x.unsqueeze(1), A.index_select(0, idx).transpose(1, 2))
                    y.add_(torch.bmm(v, B.index_select(0, idx).transpose(1, 2)).squeeze(1), alpha=0.5)

                def loop():
                    for a, (lo, hi) in enumerate(segs):
                        y[lo:hi].add_((x[lo:hi] @ A[a].t()) @ B[a].t(), alpha=0.5)

                g_us = time_graph(gather_bmm)
                l_us = time_graph(loop)
                mb = (nad * 2 * 2 * r * HIDDEN + 2 * t * HIDDEN + 2 * 2 * t * HIDDEN) / 1e6
                print(f"| {t} | {nad} | {r} | {g_us:.2f} | {l_us:.2f} | {mb:.2f} |", flush=True)
                del x, y, A, B


if __name__ == "__main__":
    main()
