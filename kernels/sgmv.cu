// sgmv.cu: segmented LoRA shrink and expand (see loraplex_kernels.h for the contract).
//
// Both halves are memory-bound: at decode sizes each segment holds a few tokens, so the bytes are
// the adapters' A and B, read once, plus x and the read-modify-write of y. The kernels therefore
// aim at DRAM bandwidth: 16-byte loads of whole rows, many independent loads in flight per thread,
// and a grid wide enough to keep every SM busy even when a step holds only a few segments.
//
// shrink  block = (segment, SHRINK_RB rank rows, SHRINK_TT tokens). Its 8 warps split in_features
//         (split-K inside the block); each lane keeps RB x TT partial dot products over 16-byte loads
//         of A and x (two K steps in flight, later steps prefetched into L2), reduced by warp
//         shuffles and then across warps in shared memory. A is read once per token tile.
// expand  block = (segment, column slice, EXPAND_TT tokens); the tile's v rows sit in shared memory.
//         Ranks 8..256 (powers of two) take a coalesced path: a warp's 16-byte loads cover 512
//         contiguous bytes of B, lanes holding parts of one row finish its dot product with shuffles,
//         and every load of a pass (B, y) is issued before any store. Other ranks or alignments take
//         a general path (a thread owns 8 consecutive output columns). Before waiting on shrink
//         (programmatic dependent launch) the block requests its B and y lines into L2.
// With PDL on, shrink too is a programmatic dependent of the kernel before it (often the previous
// expand, which triggers its dependents at once): it loads its first rows of A before waiting, and
// reads x / writes v only after; the CUDA-core shrink lets its own dependents start only after that
// wait (a matmul with a LoRA epilogue queued right after it reads x early, lp_lora_tail). Blocks that exit early
// still wait, so no grid of the chain can complete before the one it depends on.
// fused   (lp_sgmv_fused) both halves in one launch of thread-block clusters, for decode-sized
//         segments: see sgmv_fused_kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launch.cuh"
#include "loraplex_kernels.h"
#include "mma.cuh"

namespace {

constexpr int SHRINK_RB = 4;     // rank rows per block
constexpr int SHRINK_TT = 4;     // tokens per block
constexpr int SHRINK_WARPS = 8;  // warps per block, splitting in_features

constexpr int EXPAND_TT = 4;         // tokens per block
constexpr int EXPAND_THREADS = 128;  // threads per block
constexpr int EXPAND_NPT = 8;        // general path: output columns per thread (one 16-byte vector of y)
constexpr int EXPAND_J = 4;          // coalesced path: 16-byte loads of B in flight per lane per pass

template <typename T>
struct Conv;

template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  // bf16 is the top half of a float32: widening is a shift.
  static __device__ __forceinline__ void unpack8(const uint4 u, float f[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint4 pack8(const float f[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t *>(&h);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void unpack8(const uint4 u, float f[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      __half2 h = *reinterpret_cast<const __half2 *>(&w[i]);
      float2 p = __half22float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
  static __device__ __forceinline__ uint4 pack8(const float f[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t *>(&h);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ bool aligned16(const void *p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Hint that p's cache line will be read soon (no register result, so it never stalls the thread).
__device__ __forceinline__ void prefetch_l2(const void *p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// The segment a block works on and its tables: the call's, or with G (a projection group,
// lp_sgmv_group, where blockIdx.x enumerates (module, segment) pairs) the module's, whose ranks sit
// at column v_off of v and whose n columns at column y_off of y.
struct BlockSeg {
  int s;
  const void *const *ptrs;
  const int32_t *ranks;
  const float *scales;
  int v_off, y_off, n;
};

template <bool G>
__device__ __forceinline__ BlockSeg block_segment(const lp_sgmv_group &g, const void *const *ptrs, const int32_t *ranks,
                                                  const float *scales, int n) {
  BlockSeg b{static_cast<int>(blockIdx.x), ptrs, ranks, scales, 0, 0, n};
  if (G) {
    const int m = b.s / g.num_segs;
    b.s -= m * g.num_segs;
    b = BlockSeg{b.s, static_cast<const void *const *>(g.ptrs[m]), g.ranks[m], g.scales[m], g.v_off[m], g.y_off[m], g.cols[m]};
  }
  return b;
}

template <typename T, bool G = false>
__global__ void __launch_bounds__(SHRINK_WARPS * 32, 2)
    sgmv_shrink_kernel(float *__restrict__ v, int ldv, const T *__restrict__ x, int ldx,
                       const void *const *__restrict__ a_ptrs, const int32_t *__restrict__ seg_starts,
                       const int32_t *__restrict__ ranks, int max_rank, int K, lp_sgmv_group g) {
  constexpr int RB = SHRINK_RB, TT = SHRINK_TT, W = SHRINK_WARPS;
  const BlockSeg sg = block_segment<G>(g, a_ptrs, ranks, nullptr, 0);
  const int s = sg.s;
  v += sg.v_off;
  const T *A = static_cast<const T *>(sg.ptrs[s]);
  const int r = min(sg.ranks[s], max_rank);
  const int j0 = blockIdx.y * RB;
  const int seg_end = seg_starts[s + 1];
  const int t0 = seg_starts[s] + blockIdx.z * TT;
  // Block-uniform exit: no adapter, rows beyond the rank, or tokens beyond the segment. Exiting
  // blocks still wait for the previous kernel, so this grid never completes before it (the next
  // kernel's wait on this one then covers that one too).
  if (A == nullptr || j0 >= r || t0 >= seg_end) {
    pdl_wait();
    return;
  }
  const int nr = min(RB, r - j0);
  const int nt = min(TT, seg_end - t0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  float acc[RB][TT];
#pragma unroll
  for (int i = 0; i < RB; i++)
#pragma unroll
    for (int t = 0; t < TT; t++) acc[i][t] = 0.f;

  const T *Ab = A + static_cast<size_t>(j0) * K;
  const T *xb = x + static_cast<size_t>(t0) * ldx;
  if (K % 8 == 0 && ldx % 8 == 0 && aligned16(A) && aligned16(x)) {
    // Two K steps' loads are issued together below; the lines of any later steps are requested now
    // so that they do not each wait a full DRAM round trip.
    constexpr int STEP = W * 32 * 8;
    const int k0 = (warp * 32 + lane) * 8;
    uint4 ua[2][RB], ux[2][TT];
    // A is weights (never written by kernels): its first two K steps are loaded, and later steps
    // requested into L2, before waiting for the previous kernel (programmatic dependent launch), so
    // the DRAM round trip overlaps that kernel's tail. x and v are touched only after the wait.
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int kk = k0 + h * STEP;
      if (kk < K) {
#pragma unroll
        for (int i = 0; i < RB; i++)
          if (i < nr) ua[h][i] = __ldg(reinterpret_cast<const uint4 *>(Ab + static_cast<size_t>(i) * K + kk));
      }
    }
    for (int k = k0 + 2 * STEP; k < K; k += STEP)
      for (int i = 0; i < nr; i++) prefetch_l2(Ab + static_cast<size_t>(i) * K + k);
    pdl_enter();
    for (int k = k0 + 2 * STEP; k < K; k += STEP)
      for (int t = 0; t < nt; t++) prefetch_l2(xb + static_cast<size_t>(t) * ldx + k);
    for (int k = k0; k < K; k += 2 * STEP) {
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int kk = k + h * STEP;
        if (kk < K) {
          if (k != k0) {
#pragma unroll
            for (int i = 0; i < RB; i++)
              if (i < nr) ua[h][i] = __ldg(reinterpret_cast<const uint4 *>(Ab + static_cast<size_t>(i) * K + kk));
          }
#pragma unroll
          for (int t = 0; t < TT; t++)
            if (t < nt) ux[h][t] = __ldg(reinterpret_cast<const uint4 *>(xb + static_cast<size_t>(t) * ldx + kk));
        }
      }
#pragma unroll
      for (int h = 0; h < 2; h++) {
        if (k + h * STEP < K) {
          float xf[TT][8];
#pragma unroll
          for (int t = 0; t < TT; t++) {
            if (t < nt) {
              Conv<T>::unpack8(ux[h][t], xf[t]);
            } else {
#pragma unroll
              for (int e = 0; e < 8; e++) xf[t][e] = 0.f;
            }
          }
#pragma unroll
          for (int i = 0; i < RB; i++) {
            if (i < nr) {
              float a[8];
              Conv<T>::unpack8(ua[h][i], a);
#pragma unroll
              for (int t = 0; t < TT; t++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][t] = fmaf(a[e], xf[t][e], acc[i][t]);
            }
          }
        }
      }
    }
  } else {
    pdl_enter();
    for (int k = warp * 32 + lane; k < K; k += W * 32) {
      float a[RB];
#pragma unroll
      for (int i = 0; i < RB; i++) a[i] = i < nr ? Conv<T>::to_f(Ab[static_cast<size_t>(i) * K + k]) : 0.f;
#pragma unroll
      for (int t = 0; t < TT; t++) {
        if (t < nt) {
          const float xv = Conv<T>::to_f(xb[static_cast<size_t>(t) * ldx + k]);
#pragma unroll
          for (int i = 0; i < RB; i++) acc[i][t] = fmaf(a[i], xv, acc[i][t]);
        }
      }
    }
  }

  __shared__ float red[W][RB * TT];
#pragma unroll
  for (int i = 0; i < RB; i++) {
#pragma unroll
    for (int t = 0; t < TT; t++) {
      float sum = acc[i][t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) red[warp][i * TT + t] = sum;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < RB * TT; idx += blockDim.x) {
    const int i = idx / TT, t = idx % TT;
    if (i < nr && t < nt) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < W; w++) sum += red[w][idx];
      v[static_cast<size_t>(t0 + t) * ldv + j0 + i] = sum;
    }
  }
}

// y's element: the activations' dtype (T) or float32 (the forward pass's activations).
__device__ __forceinline__ float y_to_f(float v) { return v; }
__device__ __forceinline__ float y_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float y_to_f(__half v) { return __half2float(v); }
template <typename Y>
__device__ __forceinline__ Y y_from_f(float v);
template <>
__device__ __forceinline__ float y_from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 y_from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half y_from_f<__half>(float v) { return __float2half_rn(v); }

// RowSpan is the rows [lo, hi) of B (output columns of y) that a block expands, as part `part` of
// `parts` blocks sharing them: its warps (coalesced path) or threads (general path) take their
// first rows from lo + part's share and stride over the span.
struct RowSpan {
  int lo, hi, part, parts;
};

// coalesced says whether segment B of rank r takes expand_rows' coalesced path (ranks 8..256, powers
// of two, 16-byte aligned): a warp-wide 16-byte load then covers 512 contiguous bytes of B, i.e.
// 32/lpr whole rows with lpr = r/8 lanes per row.
template <typename T>
__device__ __forceinline__ bool coalesced(const T *B, int r) {
  return r >= 8 && r <= 256 && (r & (r - 1)) == 0 && aligned16(B);
}

// expand_prefetch requests a block's rows of B (weights, never written by kernels) and of y into
// L2 before the block waits for the kernel before it, so that later passes do not each wait a DRAM
// round trip. L2 is the point of coherence: a y line that kernel is still writing is merely fetched
// early, never read stale.
template <typename T, typename Y, int TT>
__device__ __forceinline__ void expand_prefetch(const T *B, int r, const Y *y, int ldy, int t0, int nt, RowSpan sp) {
  constexpr int NPT = EXPAND_NPT, J = EXPAND_J;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (coalesced(B, r)) {
    const int rpp = (32 / (r >> 3)) * J;
    const size_t end = static_cast<size_t>(sp.hi) * r;
    for (int row0 = sp.lo + (sp.part * warps + warp) * rpp; row0 < sp.hi; row0 += sp.parts * warps * rpp) {
#pragma unroll
      for (int j = 0; j < J; j++) {
        const size_t e = static_cast<size_t>(row0) * r + (j * 32 + lane) * 8;
        if (e < end) prefetch_l2(B + e);
      }
      if (lane < nt) {
        const Y *yr = y + static_cast<size_t>(t0 + lane) * ldy;
        prefetch_l2(yr + row0);
        prefetch_l2(yr + min(row0 + rpp, sp.hi) - 1);
      }
    }
    return;
  }
  for (int n0 = sp.lo + (sp.part * blockDim.x + threadIdx.x) * NPT; n0 < sp.hi; n0 += sp.parts * blockDim.x * NPT) {
    const char *p = reinterpret_cast<const char *>(B + static_cast<size_t>(n0) * r);
    const int bytes = min(NPT, sp.hi - n0) * r * static_cast<int>(sizeof(T));
    for (int off = 0; off < bytes; off += 128) prefetch_l2(p + off);
    prefetch_l2(p + bytes - 1);
    for (int t = 0; t < nt; t++) prefetch_l2(y + static_cast<size_t>(t0 + t) * ldy + n0);
  }
}

// expand_rows adds scale * vs[t] . B[n, 0:r] to y[t0 + t, n] for the block's rows n of sp and its
// nt <= TT tokens, vs[t] (shared memory, LDVS floats per token) holding v's row of token t0 + t.
// Coalesced path (see coalesced): each lane holds 8 ranks of one row, the row's dot products are
// finished with lpr-lane shuffles, and every load of a pass (B, y) is issued before any store.
// General path (any rank, any alignment): each thread owns NPT consecutive output columns.
template <typename T, typename Y, int TT, int LDVS>
__device__ __forceinline__ void expand_rows(Y *y, int ldy, const T *B, int r, const float (*vs)[LDVS], float scale,
                                            int t0, int nt, RowSpan sp) {
  constexpr int NPT = EXPAND_NPT, J = EXPAND_J;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (coalesced(B, r)) {
    const int lpr = r >> 3, rpl = 32 / lpr, rpp = rpl * J;
    const int c = (lane & (lpr - 1)) * 8;
    const bool owner = (lane & (lpr - 1)) == 0;
    float vv[TT][8];
#pragma unroll
    for (int t = 0; t < TT; t++) {
#pragma unroll
      for (int e = 0; e < 8; e++) vv[t][e] = t < nt ? vs[t][c + e] : 0.f;
    }
    for (int row0 = sp.lo + (sp.part * warps + warp) * rpp; row0 < sp.hi; row0 += sp.parts * warps * rpp) {
      const T *base = B + static_cast<size_t>(row0) * r;
      uint4 ub[J];
      Y yv[J][TT];
      // Rows of different tokens could alias as far as the compiler knows, so y is read before any store.
#pragma unroll
      for (int j = 0; j < J; j++) {
        const int row = row0 + j * rpl + lane / lpr;
        ub[j] = row < sp.hi ? __ldg(reinterpret_cast<const uint4 *>(base + (j * 32 + lane) * 8)) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int t = 0; t < TT; t++)
          if (owner && row < sp.hi && t < nt) yv[j][t] = y[static_cast<size_t>(t0 + t) * ldy + row];
      }
      float p[J][TT];
#pragma unroll
      for (int j = 0; j < J; j++) {
        float b[8];
        Conv<T>::unpack8(ub[j], b);
#pragma unroll
        for (int t = 0; t < TT; t++) {
          float a = 0.f;
#pragma unroll
          for (int e = 0; e < 8; e++) a = fmaf(vv[t][e], b[e], a);
          p[j][t] = a;
        }
      }
      for (int off = 1; off < lpr; off <<= 1) {
#pragma unroll
        for (int j = 0; j < J; j++)
#pragma unroll
          for (int t = 0; t < TT; t++) p[j][t] += __shfl_xor_sync(0xffffffffu, p[j][t], off);
      }
      if (owner) {
#pragma unroll
        for (int j = 0; j < J; j++) {
          const int row = row0 + j * rpl + lane / lpr;
          if (row < sp.hi) {
#pragma unroll
            for (int t = 0; t < TT; t++)
              if (t < nt)
                y[static_cast<size_t>(t0 + t) * ldy + row] =
                    y_from_f<Y>(fmaf(scale, p[j][t], y_to_f(yv[j][t])));
          }
        }
      }
    }
    return;
  }

  for (int n0 = sp.lo + (sp.part * blockDim.x + threadIdx.x) * NPT; n0 < sp.hi; n0 += sp.parts * blockDim.x * NPT) {
    const T *Bb = B + static_cast<size_t>(n0) * r;
    const bool yvec = sizeof(Y) == sizeof(T) && n0 + NPT <= sp.hi && ldy % 8 == 0 && aligned16(y + n0);
    uint4 yv[TT];
    if (yvec) {
#pragma unroll
      for (int t = 0; t < TT; t++)
        if (t < nt) yv[t] = *reinterpret_cast<const uint4 *>(y + static_cast<size_t>(t0 + t) * ldy + n0);
    }
    float acc[TT][NPT];
#pragma unroll
    for (int t = 0; t < TT; t++)
#pragma unroll
      for (int i = 0; i < NPT; i++) acc[t][i] = 0.f;
    if (r % 8 == 0 && n0 + NPT <= sp.hi && aligned16(Bb)) {
      for (int c = 0; c < r; c += 8) {
        uint4 ub[NPT];
#pragma unroll
        for (int i = 0; i < NPT; i++)
          ub[i] = __ldg(reinterpret_cast<const uint4 *>(Bb + static_cast<size_t>(i) * r + c));
        float vv[TT][8];
#pragma unroll
        for (int t = 0; t < TT; t++) {
#pragma unroll
          for (int e = 0; e < 8; e++) vv[t][e] = t < nt ? vs[t][c + e] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < NPT; i++) {
          float b[8];
          Conv<T>::unpack8(ub[i], b);
#pragma unroll
          for (int t = 0; t < TT; t++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[t][i] = fmaf(vv[t][e], b[e], acc[t][i]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < NPT; i++) {
        if (n0 + i < sp.hi) {
          for (int j = 0; j < r; j++) {
            const float bj = Conv<T>::to_f(Bb[static_cast<size_t>(i) * r + j]);
#pragma unroll
            for (int t = 0; t < TT; t++)
              if (t < nt) acc[t][i] = fmaf(vs[t][j], bj, acc[t][i]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
      if (t < nt) {
        Y *row = y + static_cast<size_t>(t0 + t) * ldy + n0;
        if (yvec) {
          float f[8];
          Conv<T>::unpack8(yv[t], f);
#pragma unroll
          for (int i = 0; i < NPT; i++) f[i] = fmaf(scale, acc[t][i], f[i]);
          *reinterpret_cast<uint4 *>(row) = Conv<T>::pack8(f);
        } else {
#pragma unroll
          for (int i = 0; i < NPT; i++)
            if (n0 + i < sp.hi) row[i] = y_from_f<Y>(fmaf(scale, acc[t][i], y_to_f(row[i])));
        }
      }
    }
  }
}

// With G, blockIdx.x enumerates (module, segment) pairs of a projection group (lp_sgmv_group): the
// module's tables and width replace b_ptrs, ranks, scales and N, and it reads v from column v_off
// and adds into y from column y_off.
template <typename T, typename Y = T, bool G = false>
__global__ void __launch_bounds__(EXPAND_THREADS, 4)
    sgmv_expand_kernel(Y *__restrict__ y, int ldy, const float *__restrict__ v, int ldv,
                       const void *const *__restrict__ b_ptrs, const int32_t *__restrict__ seg_starts,
                       const int32_t *__restrict__ ranks, const float *__restrict__ scales, int max_rank,
                       int N, lp_sgmv_group g) {
  constexpr int TT = EXPAND_TT;
  // The next shrink (launched as this kernel's programmatic dependent) may start its weight loads
  // now; it waits for this grid's completion before touching v or x.
  pdl_launch_dependents();
  const BlockSeg sg = block_segment<G>(g, b_ptrs, ranks, scales, N);
  const int s = sg.s;
  v += sg.v_off;
  y += sg.y_off;
  const T *B = static_cast<const T *>(sg.ptrs[s]);
  const int r = min(sg.ranks[s], max_rank);
  const int seg_end = seg_starts[s + 1];
  const int t0 = seg_starts[s] + blockIdx.z * TT;
  if (B == nullptr || r <= 0 || t0 >= seg_end) {
    pdl_wait();  // this grid must not complete before the kernel it depends on (see shrink)
    return;
  }
  const int nt = min(TT, seg_end - t0);
  const RowSpan sp{0, sg.n, static_cast<int>(blockIdx.y), static_cast<int>(gridDim.y)};
  expand_prefetch<T, Y, TT>(B, r, y, ldy, t0, nt, sp);
  pdl_wait();  // v (and y) may be written by the kernel before this one

  __shared__ __align__(16) float vs[TT][LP_MAX_RANK];
  for (int idx = threadIdx.x; idx < nt * r; idx += blockDim.x) {
    const int t = idx / r, j = idx - t * r;
    vs[t][j] = v[static_cast<size_t>(t0 + t) * ldv + j];
  }
  __syncthreads();
  expand_rows<T, Y, TT, LP_MAX_RANK>(y, ldy, B, r, vs, sg.scales[s], t0, nt, sp);
}

// The fused path (lp_sgmv_fused): shrink and expand in one launch for decode-sized segments. A
// cluster of C blocks (distributed shared memory, sm_90) takes one (module, segment, FUSED_TT-token
// tile); block c of the cluster reduces slice c of K for every rank row (v's partial sums, in its
// shared memory), the cluster synchronizes, each block adds the C partials in cluster order (one
// order whatever the grid) and expands slice c of the module's output columns. v never goes to
// memory, and the expand is not a second dependent launch. Unlike the kernels above it requests no
// weights into L2 before waiting on the kernel before it: in TestSGMVBench on the H200 (256 tokens
// over 128 adapters, whose A and B of 34-140 MB do not stay in L2 across the chained calls) those
// requests made it 11-13% slower, and they saved nothing on one-token segments.
constexpr int FUSED_TT = 4;                  // tokens per cluster
constexpr int FUSED_RANK = LP_FUSED_MAX_RANK;  // the largest rank it takes
constexpr int FUSED_THREADS = 128;           // threads per block
constexpr int FUSED_MAX_CLUSTER = 8;         // blocks per cluster: 4 or 8 (portable sizes)

// load8 reads 8 elements of a 16-bit type at p as one uint4, in one 16-byte load when al.
template <typename T>
__device__ __forceinline__ uint4 load8(const T *p, bool al) {
  if (al) return __ldg(reinterpret_cast<const uint4 *>(p));
  const auto *h = reinterpret_cast<const unsigned short *>(p);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; i++) w[i] = static_cast<uint32_t>(__ldg(h + 2 * i)) | static_cast<uint32_t>(__ldg(h + 2 * i + 1)) << 16;
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// fused_shrink adds, for rank rows i < r and tokens t < nt, x[t0 + t, k_lo:k_hi] . A[i, k_lo:k_hi]
// into part[t][i]: warps take 4 rank rows at a time, lanes 16-byte chunks of the slice (k_lo and K
// multiples of 8), finished with warp shuffles.
template <typename T>
__device__ __forceinline__ void fused_shrink(float (*part)[FUSED_RANK], const T *A, int r, int K, int k_lo, int k_hi,
                                             const T *x, int ldx, int t0, int nt) {
  constexpr int TT = FUSED_TT, RB = 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const bool al = aligned16(A);
  for (int i0 = warp * RB; i0 < r; i0 += warps * RB) {
    float acc[RB][TT];
#pragma unroll
    for (int i = 0; i < RB; i++)
#pragma unroll
      for (int t = 0; t < TT; t++) acc[i][t] = 0.f;
    for (int k = k_lo + lane * 8; k < k_hi; k += 32 * 8) {
      uint4 ua[RB], ux[TT];
#pragma unroll
      for (int i = 0; i < RB; i++)
        ua[i] = i0 + i < r ? load8(A + static_cast<size_t>(i0 + i) * K + k, al) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int t = 0; t < TT; t++)
        ux[t] = t < nt ? __ldg(reinterpret_cast<const uint4 *>(x + static_cast<size_t>(t0 + t) * ldx + k)) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int t = 0; t < TT; t++) {
        if (t < nt) {  // block-uniform: a one-token segment does a quarter of the work
          float xf[8];
          Conv<T>::unpack8(ux[t], xf);
#pragma unroll
          for (int i = 0; i < RB; i++) {
            float a[8];
            Conv<T>::unpack8(ua[i], a);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[i][t] = fmaf(a[e], xf[e], acc[i][t]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
      if (t < nt) {
#pragma unroll
        for (int i = 0; i < RB; i++) {
          float sum = acc[i][t];
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          if (lane == 0 && i0 + i < r) part[t][i0 + i] = sum;
        }
      }
    }
  }
}

// blockIdx.x = (module m, segment s) x cluster rank, blockIdx.y = token tile; f.g.ptrs are the B
// tables and f.a_ptrs the A tables.
template <typename T, typename Y>
__global__ void __launch_bounds__(FUSED_THREADS, 4)
    sgmv_fused_kernel(Y *__restrict__ y, int ldy, const T *__restrict__ x, int ldx, lp_lora_fused f,
                      const int32_t *__restrict__ seg_starts, int max_rank, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks()), c = static_cast<int>(cluster.block_rank());
  // The kernel after this one waits for its completion before reading y.
  pdl_launch_dependents();
  const lp_sgmv_group &g = f.g;
  const int w = static_cast<int>(blockIdx.x) / C;
  const int m = w / g.num_segs, s = w - m * g.num_segs;
  const T *A = static_cast<const T *const *>(f.a_ptrs[m])[s];
  const T *B = static_cast<const T *const *>(g.ptrs[m])[s];
  const int r = min(g.ranks[m][s], max_rank);
  const int N = g.cols[m];
  const int seg_end = seg_starts[s + 1];
  const int t0 = seg_starts[s] + blockIdx.y * FUSED_TT;
  // Cluster-uniform (one (module, segment, tile) per cluster): the whole cluster leaves together,
  // after waiting, so this grid never completes before the kernel it depends on.
  if (A == nullptr || B == nullptr || r <= 0 || t0 >= seg_end) {
    pdl_wait();
    return;
  }
  y += g.y_off[m];
  const int nt = min(FUSED_TT, seg_end - t0);
  const int kc = ceil_div_dev(ceil_div_dev(K, C), 8) * 8;
  const int k_lo = min(K, c * kc), k_hi = min(K, k_lo + kc);
  const int nc = ceil_div_dev(ceil_div_dev(N, C), 8) * 8;
  const RowSpan sp{min(N, c * nc), min(N, (c + 1) * nc), 0, 1};
  pdl_wait();  // x and y may be written by the kernels before this one

  __shared__ __align__(16) float part[FUSED_TT][FUSED_RANK];
  __shared__ __align__(16) float vs[FUSED_TT][FUSED_RANK];
  fused_shrink<T>(part, A, r, K, k_lo, k_hi, x, ldx, t0, nt);
  cluster.sync();  // every block's partial sums are written and visible to the cluster
  for (int idx = threadIdx.x; idx < nt * r; idx += blockDim.x) {
    const int t = idx / r, i = idx - t * r;
    float p[FUSED_MAX_CLUSTER];  // every remote load issued before the sum, added in cluster order
#pragma unroll
    for (int b = 0; b < FUSED_MAX_CLUSTER; b++) p[b] = b < C ? *cluster.map_shared_rank(&part[t][i], b) : 0.f;
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < FUSED_MAX_CLUSTER; b++) sum += p[b];
    vs[t][i] = sum;
  }
  // This block is done reading the others' shared memory; each waits below, before exiting, until
  // all are (a block's shared memory must outlive the cluster's remote reads of it).
  asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
  __syncthreads();
  expand_rows<T, Y, FUSED_TT, FUSED_RANK>(y, ldy, B, r, vs, g.scales[m][s], t0, nt, sp);
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();  // the host takes this path on sm_90 and later only (clusters)
#endif
}

// Tensor-core paths for long segments (prefill chunks): the CUDA-core kernels above are built for a
// few tokens per segment, where the bytes are the adapters' weights; with hundreds of tokens per
// segment the work is a small-K GEMM per segment, which mma.sync does at a fraction of the cost.
//   shrink  block = (segment [x module], TC_SHRINK_ROWS tokens) and every rank column (n-tiles of
//           8, ranks up to TC_SHRINK_RANK): v = x A^T, its 4 warps taking every 4th 32-wide chunk of K
//           (short dependent chains: K is thousands) and adding their partial sums in shared
//           memory; x and A exact bf16, accumulated in float32.
//   expand  block = (segment [x module], TC_COLS output columns, TC_ROWS tokens): y += scale v B^T,
//           v (float32) split into two bf16 parts (hi + lo, about 16 significant bits), B exact
//           bf16, float32 accumulation; the tile goes through shared memory so that y is read and
//           written once, in 16-byte pieces.
// A dot product does not depend on the order of its terms, so each lane's fragment columns are
// mapped to physically consecutive elements (shrink: 8 per lane over 32 k, one 16-byte load of x and
// of A; expand: 4 per lane over 16 k): lane t's logical columns 2t, 2t + 1, 2t + 8, 2t + 9 of a
// k-step are physical 4t .. 4t + 3 of it, for A and B alike. Rows past the segment, ranks past the
// adapter's and columns past N are masked (never read or written), as in the kernels above.
constexpr int TC_ROWS = 64;
constexpr int TC_COLS = 128;
constexpr int TC_SHRINK_RANK = 64;
constexpr int TC_SHRINK_ROWS = 16;  // shrink: tokens per block (its 4 warps split K)
constexpr int TC_MIN_SEG = 64;  // the longest segment of a call from which the tensor-core paths run

__device__ __forceinline__ uint32_t bf16_bits(const __nv_bfloat16 *p, int k, int lim) {
  return k < lim ? __bfloat16_as_ushort(p[k]) : 0u;
}

template <bool G>
__global__ void __launch_bounds__(128)
    sgmv_shrink_tc_kernel(float *__restrict__ v, int ldv, const __nv_bfloat16 *__restrict__ x, int ldx,
                          const void *const *__restrict__ a_ptrs, const int32_t *__restrict__ seg_starts,
                          const int32_t *__restrict__ ranks, int max_rank, int K, lp_sgmv_group g) {
  constexpr int NT = TC_SHRINK_RANK / 8;
  __shared__ float part[3][16][TC_SHRINK_RANK + 1];  // warps 1..3's partial sums
  // Unlike the CUDA-core shrink this one lets the expand after it start at once: no matmul with a
  // LoRA epilogue follows it (those steps are decode-sized).
  pdl_launch_dependents();
  const BlockSeg sg = block_segment<G>(g, a_ptrs, ranks, nullptr, 0);
  const int s = sg.s;
  v += sg.v_off;
  const auto *A = static_cast<const __nv_bfloat16 *>(sg.ptrs[s]);
  const int r = min(sg.ranks[s], max_rank);
  const int seg_end = seg_starts[s + 1];
  const int t0 = seg_starts[s] + blockIdx.y * TC_SHRINK_ROWS;
  pdl_wait();
  if (A == nullptr || r <= 0 || t0 >= seg_end) return;  // block-uniform
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int ra = t0 + gq, rb = ra + 8;
  // x rows (clamped into the segment) from this lane's 8 elements of each 32-wide chunk; the
  // block's 4 warps take every 4th chunk of K and add their partial sums at the end.
  const uint4 *xa = reinterpret_cast<const uint4 *>(x + static_cast<size_t>(min(ra, seg_end - 1)) * ldx) + tq;
  const uint4 *xb = reinterpret_cast<const uint4 *>(x + static_cast<size_t>(min(rb, seg_end - 1)) * ldx) + tq;
  const bool aal = (reinterpret_cast<uintptr_t>(A) & 15) == 0;
  const int nt = (r + 7) / 8;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 2
  for (int c = warp; c < K / 32; c += 4) {
    const uint4 ua = __ldg(xa + 4 * c), ub = __ldg(xb + 4 * c);
    // k-step 0: physical elements 0..3 of the lane's 8; k-step 1: 4..7.
    const uint32_t a0[4] = {ua.x, ub.x, ua.y, ub.y};
    const uint32_t a1[4] = {ua.z, ub.z, ua.w, ub.w};
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j < nt) {
        const int n = j * 8 + gq;
        uint4 w = make_uint4(0, 0, 0, 0);
        if (n < r) {
          const __nv_bfloat16 *ar = A + static_cast<size_t>(n) * K + 32 * c + 8 * tq;
          if (aal) {
            w = __ldg(reinterpret_cast<const uint4 *>(ar));
          } else {
            w.x = bf16_bits(ar, 0, 8) | bf16_bits(ar, 1, 8) << 16;
            w.y = bf16_bits(ar, 2, 8) | bf16_bits(ar, 3, 8) << 16;
            w.z = bf16_bits(ar, 4, 8) | bf16_bits(ar, 5, 8) << 16;
            w.w = bf16_bits(ar, 6, 8) | bf16_bits(ar, 7, 8) << 16;
          }
        }
        mma_bf16_16816(acc[j], a0, w.x, w.y);
        mma_bf16_16816(acc[j], a1, w.z, w.w);
      }
    }
  }
  if (warp > 0) {
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j < nt) {
        const int c = j * 8 + 2 * tq;
        part[warp - 1][gq][c] = acc[j][0];
        part[warp - 1][gq][c + 1] = acc[j][1];
        part[warp - 1][gq + 8][c] = acc[j][2];
        part[warp - 1][gq + 8][c + 1] = acc[j][3];
      }
    }
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int j = 0; j < NT; j++) {
    const int c = j * 8 + 2 * tq;
    if (j >= nt || c >= r) continue;
    float s0 = acc[j][0], s1 = acc[j][1], s2 = acc[j][2], s3 = acc[j][3];
#pragma unroll
    for (int w = 0; w < 3; w++) {
      s0 += part[w][gq][c];
      s1 += part[w][gq][c + 1];
      s2 += part[w][gq + 8][c];
      s3 += part[w][gq + 8][c + 1];
    }
    if (ra < seg_end) {
      float *vr = v + static_cast<size_t>(ra) * ldv + c;
      vr[0] = s0;
      if (c + 1 < r) vr[1] = s1;
    }
    if (rb < seg_end) {
      float *vr = v + static_cast<size_t>(rb) * ldv + c;
      vr[0] = s2;
      if (c + 1 < r) vr[1] = s3;
    }
  }
}

template <bool G>
__global__ void __launch_bounds__(128)
    sgmv_expand_tc_kernel(float *__restrict__ y, int ldy, const float *__restrict__ v, int ldv,
                          const void *const *__restrict__ b_ptrs, const int32_t *__restrict__ seg_starts,
                          const int32_t *__restrict__ ranks, const float *__restrict__ scales, int max_rank, int N,
                          lp_sgmv_group g) {
  constexpr int NT = TC_COLS / 8;
  constexpr int LDS = TC_COLS + 4;  // padded rows of the staged tile
  __shared__ __align__(16) float tile[4][16 * LDS];
  pdl_launch_dependents();
  const BlockSeg sg = block_segment<G>(g, b_ptrs, ranks, scales, N);
  const int s = sg.s;
  v += sg.v_off;
  y += sg.y_off;
  N = sg.n;
  scales = sg.scales;
  const auto *B = static_cast<const __nv_bfloat16 *>(sg.ptrs[s]);
  const int r = min(sg.ranks[s], max_rank);
  const int seg_end = seg_starts[s + 1];
  const int t0 = seg_starts[s] + blockIdx.z * TC_ROWS;
  const int n0 = blockIdx.y * TC_COLS;
  pdl_wait();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  if (B == nullptr || r <= 0 || n0 >= N || t0 + warp * 16 >= seg_end) return;
  const float scale = scales[s];
  const int ra = t0 + warp * 16 + gq, rb = ra + 8;
  const bool oka = ra < seg_end, okb = rb < seg_end;
  const float *va = v + static_cast<size_t>(oka ? ra : t0) * ldv;
  const float *vb = v + static_cast<size_t>(okb ? rb : t0) * ldv;
  const bool val = (ldv & 3) == 0 && (reinterpret_cast<uintptr_t>(v) & 15) == 0;
  const bool bal = (r & 3) == 0 && (reinterpret_cast<uintptr_t>(B) & 7) == 0;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int k0 = 0; k0 < r; k0 += 16) {
    const int k = k0 + 4 * tq;  // this lane's 4 physical elements of the k-step
    float4 pa = make_float4(0.f, 0.f, 0.f, 0.f), pb = pa;
    if (val && k + 3 < r) {
      if (oka) pa = *reinterpret_cast<const float4 *>(va + k);
      if (okb) pb = *reinterpret_cast<const float4 *>(vb + k);
    } else {
      if (oka) pa = make_float4(k < r ? va[k] : 0.f, k + 1 < r ? va[k + 1] : 0.f, k + 2 < r ? va[k + 2] : 0.f, k + 3 < r ? va[k + 3] : 0.f);
      if (okb) pb = make_float4(k < r ? vb[k] : 0.f, k + 1 < r ? vb[k + 1] : 0.f, k + 2 < r ? vb[k + 2] : 0.f, k + 3 < r ? vb[k + 3] : 0.f);
    }
    uint32_t ah[4], al[4];
    split_bf16x2(pa.x, pa.y, ah[0], al[0]);
    split_bf16x2(pb.x, pb.y, ah[1], al[1]);
    split_bf16x2(pa.z, pa.w, ah[2], al[2]);
    split_bf16x2(pb.z, pb.w, ah[3], al[3]);
#pragma unroll
    for (int j = 0; j < NT; j++) {
      const int n = n0 + j * 8 + gq;
      uint2 w = make_uint2(0, 0);
      if (n < N) {
        const __nv_bfloat16 *br = B + static_cast<size_t>(n) * r + k;
        if (bal && k + 3 < r) {
          w = __ldg(reinterpret_cast<const uint2 *>(br));
        } else {
          w.x = bf16_bits(br, 0, r - k) | bf16_bits(br, 1, r - k) << 16;
          w.y = bf16_bits(br, 2, r - k) | bf16_bits(br, 3, r - k) << 16;
        }
      }
      mma_bf16_16816(acc[j], ah, w.x, w.y);
      mma_bf16_16816(acc[j], al, w.x, w.y);
    }
  }
  // Stage the warp's 16 x TC_COLS tile, then update y row by row in 16-byte pieces (or elementwise
  // at the edges and where y's rows are not 16-byte aligned).
  float *tw = tile[warp];
#pragma unroll
  for (int j = 0; j < NT; j++) {
    const int c = j * 8 + 2 * tq;
    tw[gq * LDS + c] = acc[j][0];
    tw[gq * LDS + c + 1] = acc[j][1];
    tw[(gq + 8) * LDS + c] = acc[j][2];
    tw[(gq + 8) * LDS + c + 1] = acc[j][3];
  }
  __syncwarp();
  const int cols = min(TC_COLS, N - n0);
  const bool yal = (ldy & 3) == 0 && (reinterpret_cast<uintptr_t>(y + n0) & 15) == 0;
  if (yal && cols == TC_COLS) {
    // A whole tile: a lane's 16-byte piece of each of the warp's 16 rows, every load issued before
    // any store, so the read-modify-write of y runs at memory bandwidth rather than latency.
    static_assert(TC_COLS == 4 * 32, "one float4 per lane per row");
    const int rows = min(16, seg_end - (t0 + warp * 16));
    float *y0 = y + static_cast<size_t>(t0 + warp * 16) * ldy + n0;
    float4 yv[16];
#pragma unroll
    for (int row = 0; row < 16; row++)
      if (row < rows) yv[row] = reinterpret_cast<const float4 *>(y0 + static_cast<size_t>(row) * ldy)[lane];
#pragma unroll
    for (int row = 0; row < 16; row++) {
      if (row < rows) {
        const float4 d = *reinterpret_cast<const float4 *>(tw + row * LDS + 4 * lane);
        float4 a = yv[row];
        a.x = fmaf(scale, d.x, a.x);
        a.y = fmaf(scale, d.y, a.y);
        a.z = fmaf(scale, d.z, a.z);
        a.w = fmaf(scale, d.w, a.w);
        reinterpret_cast<float4 *>(y0 + static_cast<size_t>(row) * ldy)[lane] = a;
      }
    }
    return;
  }
  for (int row = 0; row < 16; row++) {
    const int t = t0 + warp * 16 + row;
    if (t >= seg_end) break;
    float *yr = y + static_cast<size_t>(t) * ldy + n0;
    const float *src = tw + row * LDS;
    if (yal) {
      for (int c4 = lane; c4 < cols / 4; c4 += 32) {
        float4 a = reinterpret_cast<float4 *>(yr)[c4];
        const float4 d = *reinterpret_cast<const float4 *>(src + 4 * c4);
        a.x = fmaf(scale, d.x, a.x);
        a.y = fmaf(scale, d.y, a.y);
        a.z = fmaf(scale, d.z, a.z);
        a.w = fmaf(scale, d.w, a.w);
        reinterpret_cast<float4 *>(yr)[c4] = a;
      }
      for (int c = (cols / 4) * 4 + lane; c < cols; c += 32) yr[c] = fmaf(scale, src[c], yr[c]);
    } else {
      for (int c = lane; c < cols; c += 32) yr[c] = fmaf(scale, src[c], yr[c]);
    }
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Multiprocessors of the current device, read once (a shard process drives one GPU).
int sm_count() {
  static int n = [] {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 132;
    }
    return sms;
  }();
  return n;
}

// launch_dep launches a 128-thread kernel as a programmatic dependent of the previous one in the
// stream (launch_k) and returns the launch's status.
template <typename... KArgs, typename... Args>
int launch_dep(void (*kernel)(KArgs...), dim3 grid, cudaStream_t st, Args &&...args) {
  launch_k(kernel, grid, dim3(128), 0, st, std::forward<Args>(args)...);
  return launched();
}

// tc_shrink_ok: the call takes the tensor-core shrink (bf16 x with 16-byte aligned rows, K a
// multiple of 32) when its grid (blocks of 16 tokens, each over the whole K) has at least two waves
// of blocks: a block is a long chain of dependent loads, so a few of them (one segment of 64-256
// tokens: 4-16 blocks) took 24-143 us on the H200 where the CUDA-core shrink takes 2-5 us.
inline bool tc_shrink_ok(int dtype, const void *x, int ldx, int num_segs, int max_seg_len, int max_rank,
                         int in_features) {
  const long long blocks = static_cast<long long>(num_segs) * ceil_div(max_seg_len, TC_SHRINK_ROWS);
  return dtype == LP_DTYPE_BF16 && max_seg_len >= TC_MIN_SEG && blocks >= 2LL * sm_count() &&
         max_rank <= TC_SHRINK_RANK && in_features % 32 == 0 && ldx % 8 == 0 &&
         (reinterpret_cast<uintptr_t>(x) & 15) == 0;
}

// launch_expand and launch_shrink queue the CUDA-core kernels as programmatic dependents (launch_k):
// expand's blocks prefetch B while the kernel before finishes; shrink's load their rows of A while
// that kernel (typically the previous layer's expand) finishes, and wait for it before reading x or
// writing v.
template <typename T, typename Y = T, bool G = false>
int launch_expand(dim3 grid, cudaStream_t st, Y *y, int ldy, const float *v, int ldv, const void *const *b_ptrs,
                  const int32_t *seg_starts, const int32_t *ranks, const float *scales, int max_rank, int n,
                  const lp_sgmv_group &g = lp_sgmv_group{}) {
  launch_k(sgmv_expand_kernel<T, Y, G>, grid, dim3(EXPAND_THREADS), 0, st, y, ldy, v, ldv, b_ptrs, seg_starts, ranks,
           scales, max_rank, n, g);
  return launched();
}

template <typename T, bool G = false>
int launch_shrink(dim3 grid, cudaStream_t st, float *v, int ldv, const T *x, int ldx, const void *const *a_ptrs,
                  const int32_t *seg_starts, const int32_t *ranks, int max_rank, int k,
                  const lp_sgmv_group &g = lp_sgmv_group{}) {
  launch_k(sgmv_shrink_kernel<T, G>, grid, dim3(SHRINK_WARPS * 32), 0, st, v, ldv, x, ldx, a_ptrs, seg_starts, ranks,
           max_rank, k, g);
  return launched();
}

}  // namespace

extern "C" int lp_sgmv_shrink(int dtype, float *v, int ldv, const void *x, int ldx, const void *const *a_ptrs,
                              const int32_t *seg_starts, const int32_t *ranks, int num_segs, int max_seg_len,
                              int max_rank, int in_features, lp_stream stream) {
  if (num_segs < 0 || max_seg_len < 0 || max_rank < 0 || max_rank > LP_MAX_RANK || in_features < 0 ||
      ldx < in_features || ldv < max_rank)
    return LP_ERR_INVALID;
  if (num_segs == 0 || max_seg_len == 0 || max_rank == 0) return LP_OK;
  if (v == nullptr || x == nullptr || a_ptrs == nullptr || seg_starts == nullptr || ranks == nullptr)
    return LP_ERR_INVALID;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (tc_shrink_ok(dtype, x, ldx, num_segs, max_seg_len, max_rank, in_features))
    return launch_dep(sgmv_shrink_tc_kernel<false>, dim3(num_segs, ceil_div(max_seg_len, TC_SHRINK_ROWS)), st, v, ldv,
                      static_cast<const __nv_bfloat16 *>(x), ldx, a_ptrs, seg_starts, ranks, max_rank, in_features,
                      lp_sgmv_group{});
  const dim3 grid(num_segs, ceil_div(max_rank, SHRINK_RB), ceil_div(max_seg_len, SHRINK_TT));
  if (grid.y > 65535 || grid.z > 65535) return LP_ERR_INVALID;
  switch (dtype) {
    case LP_DTYPE_BF16:
      return launch_shrink<__nv_bfloat16>(grid, st, v, ldv, static_cast<const __nv_bfloat16 *>(x), ldx, a_ptrs,
                                          seg_starts, ranks, max_rank, in_features);
    case LP_DTYPE_F16:
      return launch_shrink<__half>(grid, st, v, ldv, static_cast<const __half *>(x), ldx, a_ptrs, seg_starts, ranks,
                                   max_rank, in_features);
    default:
      return LP_ERR_INVALID;
  }
}

namespace {
// Column blocks per (segment, token tile): enough for about one full wave of blocks, but no more
// than the coalesced path can use at max_rank (blocks stride over the columns, so any count is correct).
dim3 expand_grid(int num_segs, int max_seg_len, int max_rank, int out_features) {
  const int tiles = ceil_div(max_seg_len, EXPAND_TT);
  const long long work = static_cast<long long>(num_segs) * tiles;
  const int useful = ceil_div(out_features, (EXPAND_THREADS / 32) * EXPAND_J * (256 / std::max(8, std::min(max_rank, 256))));
  const long long wave = 4LL * sm_count();
  const int gy = static_cast<int>(std::max(1LL, std::min<long long>(std::max(1LL, wave / work), useful)));
  return dim3(num_segs, gy, tiles);
}
}  // namespace

// expand_setup validates an expand call's arguments and sizes its grid; grid->x == 0 with LP_OK means
// there is nothing to do.
static int expand_setup(const void *y, int ldy, const float *v, int ldv, const void *const *b_ptrs,
                        const int32_t *seg_starts, const int32_t *ranks, const float *scales, int num_segs,
                        int max_seg_len, int max_rank, int out_features, dim3 *grid) {
  *grid = dim3(0, 0, 0);
  if (num_segs < 0 || max_seg_len < 0 || max_rank < 0 || max_rank > LP_MAX_RANK || out_features < 0 ||
      ldy < out_features || ldv < max_rank)
    return LP_ERR_INVALID;
  if (num_segs == 0 || max_seg_len == 0 || max_rank == 0 || out_features == 0) return LP_OK;
  if (y == nullptr || v == nullptr || b_ptrs == nullptr || seg_starts == nullptr || ranks == nullptr ||
      scales == nullptr)
    return LP_ERR_INVALID;
  const dim3 g = expand_grid(num_segs, max_seg_len, max_rank, out_features);
  if (g.y > 65535 || g.z > 65535) return LP_ERR_INVALID;
  *grid = g;
  return LP_OK;
}

extern "C" int lp_sgmv_expand(int dtype, void *y, int ldy, const float *v, int ldv, const void *const *b_ptrs,
                              const int32_t *seg_starts, const int32_t *ranks, const float *scales, int num_segs,
                              int max_seg_len, int max_rank, int out_features, lp_stream stream) {
  dim3 grid;
  if (const int rc = expand_setup(y, ldy, v, ldv, b_ptrs, seg_starts, ranks, scales, num_segs, max_seg_len, max_rank,
                                  out_features, &grid);
      rc != LP_OK || grid.x == 0)
    return rc;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case LP_DTYPE_BF16:
      return launch_expand<__nv_bfloat16>(grid, st, static_cast<__nv_bfloat16 *>(y), ldy, v, ldv, b_ptrs, seg_starts,
                                          ranks, scales, max_rank, out_features);
    case LP_DTYPE_F16:
      return launch_expand<__half>(grid, st, static_cast<__half *>(y), ldy, v, ldv, b_ptrs, seg_starts, ranks, scales,
                                   max_rank, out_features);
    default:
      return LP_ERR_INVALID;
  }
}

extern "C" int lp_sgmv_expand_y32(int wdtype, float *y, int ldy, const float *v, int ldv, const void *const *b_ptrs,
                                  const int32_t *seg_starts, const int32_t *ranks, const float *scales, int num_segs,
                                  int max_seg_len, int max_rank, int out_features, lp_stream stream) {
  dim3 grid;
  if (const int rc = expand_setup(y, ldy, v, ldv, b_ptrs, seg_starts, ranks, scales, num_segs, max_seg_len, max_rank,
                                  out_features, &grid);
      rc != LP_OK || grid.x == 0)
    return rc;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (wdtype == LP_DTYPE_BF16 && max_seg_len >= TC_MIN_SEG)
    return launch_dep(sgmv_expand_tc_kernel<false>,
                      dim3(num_segs, ceil_div(out_features, TC_COLS), ceil_div(max_seg_len, TC_ROWS)), st, y, ldy, v,
                      ldv, b_ptrs, seg_starts, ranks, scales, max_rank, out_features, lp_sgmv_group{});
  switch (wdtype) {
    case LP_DTYPE_BF16:
      return launch_expand<__nv_bfloat16, float>(grid, st, y, ldy, v, ldv, b_ptrs, seg_starts, ranks, scales, max_rank,
                                                 out_features);
    case LP_DTYPE_F16:
      return launch_expand<__half, float>(grid, st, y, ldy, v, ldv, b_ptrs, seg_starts, ranks, scales, max_rank,
                                          out_features);
    default:
      return LP_ERR_INVALID;
  }
}

// Grouped forms (ABI 4): one launch for the projections of a packed GEMM (q/k/v, gate/up).
static int group_check(const lp_sgmv_group *g, int num_segs, int max_rank) {
  if (g == nullptr || g->modules < 1 || g->modules > LP_SGMV_GROUP || g->num_segs != num_segs) return LP_ERR_INVALID;
  for (int m = 0; m < g->modules; m++)
    if (g->ptrs[m] == nullptr || g->ranks[m] == nullptr || g->v_off[m] < 0 || g->y_off[m] < 0 || g->cols[m] < 0)
      return LP_ERR_INVALID;
  return max_rank < 0 || max_rank > LP_MAX_RANK ? LP_ERR_INVALID : LP_OK;
}

extern "C" int lp_sgmv_shrink_group(int dtype, float *v, int ldv, const void *x, int ldx, const lp_sgmv_group *g,
                                    const int32_t *seg_starts, int num_segs, int max_seg_len, int max_rank,
                                    int in_features, lp_stream stream) {
  if (const int rc = group_check(g, num_segs, max_rank); rc != LP_OK) return rc;
  if (max_seg_len < 0 || in_features < 0 || ldx < in_features) return LP_ERR_INVALID;
  for (int m = 0; m < g->modules; m++)
    if (g->v_off[m] + max_rank > ldv) return LP_ERR_INVALID;
  if (num_segs == 0 || max_seg_len == 0 || max_rank == 0) return LP_OK;
  if (v == nullptr || x == nullptr || seg_starts == nullptr) return LP_ERR_INVALID;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (tc_shrink_ok(dtype, x, ldx, num_segs * g->modules, max_seg_len, max_rank, in_features))
    return launch_dep(sgmv_shrink_tc_kernel<true>, dim3(num_segs * g->modules, ceil_div(max_seg_len, TC_SHRINK_ROWS)), st, v,
                      ldv, static_cast<const __nv_bfloat16 *>(x), ldx, static_cast<const void *const *>(nullptr),
                      seg_starts, static_cast<const int32_t *>(nullptr), max_rank, in_features, *g);
  const dim3 grid(num_segs * g->modules, ceil_div(max_rank, SHRINK_RB), ceil_div(max_seg_len, SHRINK_TT));
  if (grid.y > 65535 || grid.z > 65535) return LP_ERR_INVALID;
  switch (dtype) {
    case LP_DTYPE_BF16:
      return launch_shrink<__nv_bfloat16, true>(grid, st, v, ldv, static_cast<const __nv_bfloat16 *>(x), ldx, nullptr,
                                                seg_starts, nullptr, max_rank, in_features, *g);
    case LP_DTYPE_F16:
      return launch_shrink<__half, true>(grid, st, v, ldv, static_cast<const __half *>(x), ldx, nullptr, seg_starts,
                                         nullptr, max_rank, in_features, *g);
    default:
      return LP_ERR_INVALID;
  }
}

extern "C" int lp_sgmv_expand_group_y32(int wdtype, float *y, int ldy, const float *v, int ldv,
                                        const lp_sgmv_group *g, const int32_t *seg_starts, int num_segs,
                                        int max_seg_len, int max_rank, lp_stream stream) {
  if (const int rc = group_check(g, num_segs, max_rank); rc != LP_OK) return rc;
  int widest = 0;
  for (int m = 0; m < g->modules; m++) {
    if (g->scales[m] == nullptr || g->y_off[m] + g->cols[m] > ldy || g->v_off[m] + max_rank > ldv)
      return LP_ERR_INVALID;
    widest = std::max(widest, g->cols[m]);
  }
  if (max_seg_len < 0) return LP_ERR_INVALID;
  if (num_segs == 0 || max_seg_len == 0 || max_rank == 0 || widest == 0) return LP_OK;
  if (y == nullptr || v == nullptr || seg_starts == nullptr) return LP_ERR_INVALID;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (wdtype == LP_DTYPE_BF16 && max_seg_len >= TC_MIN_SEG)
    return launch_dep(sgmv_expand_tc_kernel<true>,
                      dim3(num_segs * g->modules, ceil_div(widest, TC_COLS), ceil_div(max_seg_len, TC_ROWS)), st, y,
                      ldy, v, ldv, static_cast<const void *const *>(nullptr), seg_starts,
                      static_cast<const int32_t *>(nullptr), static_cast<const float *>(nullptr), max_rank, widest, *g);
  const dim3 grid = expand_grid(num_segs * g->modules, max_seg_len, max_rank, widest);
  if (grid.y > 65535 || grid.z > 65535) return LP_ERR_INVALID;
  switch (wdtype) {
    case LP_DTYPE_BF16:
      return launch_expand<__nv_bfloat16, float, true>(grid, st, y, ldy, v, ldv, nullptr, seg_starts, nullptr, nullptr,
                                                       max_rank, widest, *g);
    case LP_DTYPE_F16:
      return launch_expand<__half, float, true>(grid, st, y, ldy, v, ldv, nullptr, seg_starts, nullptr, nullptr,
                                                max_rank, widest, *g);
    default:
      return LP_ERR_INVALID;
  }
}

// Shrink and expand in one launch (sgmv_fused_kernel).
namespace {
template <typename T, typename Y>
int launch_fused(dim3 grid, unsigned cluster, cudaStream_t st, void *y, int ldy, const void *x, int ldx,
                 const lp_lora_fused &f, const int32_t *seg_starts, int max_rank, int k) {
  return launch_cluster(sgmv_fused_kernel<T, Y>, grid, dim3(FUSED_THREADS), dim3(cluster, 1, 1), st, static_cast<Y *>(y),
                        ldy, static_cast<const T *>(x), ldx, f, seg_starts, max_rank, k);
}
}  // namespace

extern "C" int lp_sgmv_fused(int dtype, int ydtype, void *y, int ldy, const void *x, int ldx, const lp_lora_fused *f,
                             const int32_t *seg_starts, int num_segs, int max_seg_len, int max_rank, int in_features,
                             lp_stream stream) {
  if (f == nullptr) return LP_ERR_INVALID;
  if (const int rc = group_check(&f->g, num_segs, max_rank); rc != LP_OK) return rc;
  int widest = 0;
  for (int m = 0; m < f->g.modules; m++) {
    if (f->a_ptrs[m] == nullptr || f->g.scales[m] == nullptr || f->g.y_off[m] + f->g.cols[m] > ldy) return LP_ERR_INVALID;
    widest = std::max(widest, f->g.cols[m]);
  }
  if ((dtype != LP_DTYPE_BF16 && dtype != LP_DTYPE_F16) || (ydtype != dtype && ydtype != LP_DTYPE_F32) ||
      max_seg_len < 0 || in_features < 0 || ldx < in_features)
    return LP_ERR_INVALID;
  if (num_segs == 0 || max_seg_len == 0 || max_rank == 0 || widest == 0 || in_features == 0) return LP_OK;
  if (y == nullptr || x == nullptr || seg_starts == nullptr) return LP_ERR_INVALID;
  if (max_seg_len > LP_FUSED_MAX_SEG || max_rank > LP_FUSED_MAX_RANK || in_features % 8 != 0 || ldx % 8 != 0 ||
      (reinterpret_cast<uintptr_t>(x) & 15) != 0 || !clusters_ok())
    return LP_ERR_UNSUPPORTED;
  // Clusters of 8 where a grid of them stays within two waves of blocks (few segments: each block
  // then reads less), else of 4.
  const long long work = static_cast<long long>(num_segs) * f->g.modules;
  const int tiles = ceil_div(max_seg_len, FUSED_TT);
  const unsigned cluster = work * tiles * FUSED_MAX_CLUSTER <= 2LL * sm_count() ? FUSED_MAX_CLUSTER : 4;
  if (work * cluster > 0x7fffffffLL) return LP_ERR_INVALID;
  const dim3 grid(static_cast<unsigned>(work * cluster), tiles);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool y32 = ydtype == LP_DTYPE_F32;
  if (dtype == LP_DTYPE_BF16)
    return y32 ? launch_fused<__nv_bfloat16, float>(grid, cluster, st, y, ldy, x, ldx, *f, seg_starts, max_rank, in_features)
               : launch_fused<__nv_bfloat16, __nv_bfloat16>(grid, cluster, st, y, ldy, x, ldx, *f, seg_starts, max_rank, in_features);
  return y32 ? launch_fused<__half, float>(grid, cluster, st, y, ldy, x, ldx, *f, seg_starts, max_rank, in_features)
             : launch_fused<__half, __half>(grid, cluster, st, y, ldy, x, ldx, *f, seg_starts, max_rank, in_features);
}
