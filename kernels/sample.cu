// sample.cu: sampling on the device (see loraplex_kernels.h for the contract).
//
// One block of 1024 threads per row. The row stays in global memory (vocabularies reach 256k) and is
// read in a few coalesced passes:
//   1. the repetition penalty over the row's seen ids (unique, so no two threads touch one logit);
//   2. NaN logits become -Inf, and the row's maximum and its first index are found; a temperature
//      takes a second pass that shifts and divides the row in place. The last of these passes also
//      keeps the log-sum-exp (online: float exp summed in double) and, when top logprobs are asked
//      for, each thread's 8 best tokens, merged by warps at the end;
//   3. top-k: a radix search (11+11+10-bit digits, shared-memory histograms) for the order-preserving
//      key tau of the k-th largest logit and the number m of tokens equal to it to keep;
//   4. top-p: the same search over the candidates, weighted by their masses;
//   5. the draw. The kept tokens are those whose key exceeds tau plus the first m equal to it, so the
//      inclusive prefix of kept mass at index i is GT(i) + q(tau) * min(T(i), m), with GT the mass of
//      keys above tau and T the count of keys equal to it up to i. Warps sum contiguous segments, one
//      warp finds the segment where the prefix first exceeds the threshold, the block scans that
//      segment in per-thread pieces and one thread walks its piece.
// Masses are integers: qmass is e^(x - max) * 2^40 from float32 operations that Go's sampling.Choose
// performs alike (the __f*_rn intrinsics keep nvcc from fusing them), truncated. Sums are therefore
// exact and independent of the order of atomics and reductions: the kernel is deterministic and draws
// the token the host reference draws. Log-probabilities only agree to rounding.
//
// Choices the header leaves open: NaN logits count as -Inf (and are written back as such);
// top_logprobs is clamped to [0, LP_MAX_TOP_LOGPROBS] (unused entries: id -1, logprob 0); u outside
// [0, 1) is clamped into it; seen may be NULL (no penalty); vocab above 2^22 is LP_ERR_UNSUPPORTED
// (the sum of a row's masses must fit in 64 bits). The workspace is not used.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "loraplex_kernels.h"

static_assert(sizeof(lp_sample_params) == 40 && offsetof(lp_sample_params, u) == 32, "lp_sample_params layout");
static_assert(sizeof(lp_sample_result) == 72, "lp_sample_result layout");

namespace {

typedef unsigned long long u64;

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
constexpr int NTOP = LP_MAX_TOP_LOGPROBS;
constexpr int MAX_VOCAB = 1 << 22;
constexpr int NB = 2048;  // bins of the widest radix digit
constexpr unsigned FULL = 0xffffffffu;

inline cudaStream_t cs(lp_stream s) { return reinterpret_cast<cudaStream_t>(s); }

inline int launched() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? LP_OK : static_cast<int>(e);
}

__device__ __forceinline__ u64 umin(u64 a, u64 b) { return a < b ? a : b; }

// An unsigned key of the same order as the logit (no NaNs; -0 keyed as +0), and its inverse.
__device__ __forceinline__ uint32_t fkey(float f) {
  uint32_t b = __float_as_uint(f);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float kval(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// floor(e^d * 2^40) for d <= 0, 0 below -28: e^d = 2^k p(r), k = rint(d log2 e), r = d - k ln 2 in two
// parts (k * ln2_hi is exact), p a degree-6 Taylor polynomial. Operation for operation the same as
// qmass in shard/internal/sampling/choose.go; change both together.
__device__ __forceinline__ u64 qmass(float d) {
  if (!(d >= -28.f)) return 0;
  if (d > 0.f) d = 0.f;
  const float kf = rintf(__fmul_rn(d, 0x1.715476p+0f));
  const float r = __fsub_rn(__fsub_rn(d, __fmul_rn(kf, 0x1.62e4p-1f)), __fmul_rn(kf, 0x1.7f7d1cp-20f));
  float p = 0x1.6c16c2p-10f;
  p = __fadd_rn(__fmul_rn(p, r), 0x1.111112p-7f);
  p = __fadd_rn(__fmul_rn(p, r), 0x1.555556p-5f);
  p = __fadd_rn(__fmul_rn(p, r), 0x1.555556p-3f);
  p = __fadd_rn(__fmul_rn(p, r), 0.5f);
  p = __fadd_rn(__fmul_rn(p, r), 1.f);
  p = __fadd_rn(__fmul_rn(p, r), 1.f);
  const float scale = __uint_as_float(static_cast<uint32_t>(127 + 40 + static_cast<int>(kf)) << 23);  // 2^(40+k)
  return static_cast<u64>(__fmul_rn(p, scale));  // exact scaling, then truncation
}

// The mass of a logit in a row whose maximum is M (the maximum weighs 2^40, also when infinite).
__device__ __forceinline__ u64 mass_of(float x, float M) { return x == M ? qmass(0.f) : qmass(__fsub_rn(x, M)); }

// x - logsumexp of the row, given log(sum of e^(x - M)); -logS at the maximum, also when infinite.
__device__ __forceinline__ float logprob(float x, float M, double logS) {
  if (x == M) return static_cast<float>(-logS);
  return static_cast<float>(static_cast<double>(x) - static_cast<double>(M) - logS);
}

// floor(u * total) in double, kept below total (u clamped into [0, 1)); total > 0.
__device__ __forceinline__ u64 draw_threshold(double u, u64 total) {
  if (!(u >= 0.0)) u = 0.0;
  if (u >= 1.0) return total - 1;
  return umin(static_cast<u64>(__dmul_rn(u, static_cast<double>(total))), total - 1);
}

// A running maximum, the first index holding it and, online, the sum of e^(x - maximum).
struct Best {
  float m;
  int i;  // -1: nothing seen
  double s;
};

template <bool LSE>
__device__ __forceinline__ void best_add(Best &b, float x, int i) {
  if (x > b.m) {
    if (LSE) b.s = b.s * static_cast<double>(expf(b.m - x)) + 1.0;
    b.m = x;
    b.i = i;
  } else if (x == b.m) {
    if (LSE) b.s += 1.0;
    if (b.i < 0) b.i = i;  // indices only grow within a thread
  } else if (LSE) {
    b.s += static_cast<double>(expf(x - b.m));
  }
}

// Symmetric in a and b (the sum is one commutative add), so every lane of a butterfly agrees.
__device__ __forceinline__ Best best_merge(const Best &a, const Best &b) {
  if (b.i < 0) return a;
  if (a.i < 0) return b;
  Best r;
  r.m = fmaxf(a.m, b.m);
  r.i = a.m > b.m ? a.i : (b.m > a.m ? b.i : min(a.i, b.i));
  const double sa = a.m == r.m ? a.s : a.s * static_cast<double>(expf(a.m - r.m));
  const double sb = b.m == r.m ? b.s : b.s * static_cast<double>(expf(b.m - r.m));
  r.s = sa + sb;
  return r;
}

__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Best n;
    n.m = __shfl_xor_sync(FULL, b.m, o);
    n.i = __shfl_xor_sync(FULL, b.i, o);
    n.s = __shfl_xor_sync(FULL, b.s, o);
    b = best_merge(b, n);
  }
  return b;
}

// The block's Best, returned to every thread; part is WARPS entries of shared scratch.
__device__ Best block_best(Best b, Best *part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  b = warp_best(b);
  if (lane == 0) part[warp] = b;
  __syncthreads();
  if (warp == 0) {
    b = warp_best(part[lane]);
    if (lane == 0) part[0] = b;
  }
  __syncthreads();
  b = part[0];
  __syncthreads();  // part is reused
  return b;
}

// A thread's NTOP best tokens, best first: larger logit, then lower index. Empty: (-Inf, INT_MAX).
struct Top {
  float v[NTOP];
  int i[NTOP];
};

__device__ __forceinline__ bool ahead(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

__device__ __forceinline__ void top_init(Top &t) {
#pragma unroll
  for (int j = 0; j < NTOP; j++) {
    t.v[j] = -INFINITY;
    t.i[j] = INT_MAX;
  }
}

__device__ __forceinline__ void top_insert(Top &t, float x, int i) {
  if (!ahead(x, i, t.v[NTOP - 1], t.i[NTOP - 1])) return;
  t.v[NTOP - 1] = x;
  t.i[NTOP - 1] = i;
#pragma unroll
  for (int j = NTOP - 1; j > 0; j--) {
    if (ahead(t.v[j], t.i[j], t.v[j - 1], t.i[j - 1])) {
      const float tv = t.v[j];
      t.v[j] = t.v[j - 1];
      t.v[j - 1] = tv;
      const int ti = t.i[j];
      t.i[j] = t.i[j - 1];
      t.i[j - 1] = ti;
    }
  }
}

// Merges the lanes' lists (disjoint indices): lane 0 writes the warp's NTOP best to ov, oi in order.
__device__ void warp_top(Top &t, float *ov, int *oi) {
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int r = 0; r < NTOP; r++) {
    float bv = t.v[0];
    int bi = t.i[0];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float nv = __shfl_xor_sync(FULL, bv, o);
      const int ni = __shfl_xor_sync(FULL, bi, o);
      if (ahead(nv, ni, bv, bi)) {
        bv = nv;
        bi = ni;
      }
    }
    if (lane == 0) {
      ov[r] = bv;
      oi[r] = bi;
    }
    if (t.i[0] == bi && t.v[0] == bv) {  // the owner pops its head (empty heads pop harmlessly)
#pragma unroll
      for (int j = 0; j < NTOP - 1; j++) {
        t.v[j] = t.v[j + 1];
        t.i[j] = t.i[j + 1];
      }
      t.v[NTOP - 1] = -INFINITY;
      t.i[NTOP - 1] = INT_MAX;
    }
  }
}

// Exclusive prefix sum over the block in thread order; total gets the block's sum.
__device__ u64 block_exscan(u64 v, u64 *part, u64 &total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u64 inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(FULL, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) part[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    u64 w = part[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 n = __shfl_up_sync(FULL, w, o);
      if (lane >= o) w += n;
    }
    part[lane] = w;
  }
  __syncthreads();
  total = part[WARPS - 1];
  const u64 ex = (warp > 0 ? part[warp - 1] : 0) + inc - v;
  __syncthreads();  // part is reused
  return ex;
}

// The outcome of one radix level.
struct Pick {
  int bin;       // -1: the bins do not reach the target
  u64 above;     // weight of the keys above the bin (including what was above before)
  u64 at;        // the bin's weight
  u64 target;    // the target the level used
};

// Finds the highest bin b of hist[0, nb) with above + weight(bins >= b) >= target. With top_p > 0
// the target is first set to ceil(top_p * (above + the bins' total)), as the host reference does.
template <typename W>
__device__ Pick pick_bin(const W *hist, int nb, u64 above, u64 target, float top_p, u64 *part, Pick *out) {
  const int per = nb / THREADS;  // 1 or 2 bins per thread, the highest bins first
  const int j0 = threadIdx.x * per;
  u64 local = 0;
  for (int q = 0; q < per; q++) local += hist[nb - 1 - (j0 + q)];
  if (threadIdx.x == 0) out->bin = -1;
  u64 total;
  u64 run = above + block_exscan(local, part, total);
  if (top_p > 0.f)
    target = static_cast<u64>(ceil(__dmul_rn(static_cast<double>(top_p), static_cast<double>(above + total))));
  for (int q = 0; q < per; q++) {
    const int b = nb - 1 - (j0 + q);
    const u64 w = hist[b];
    if (run < target && run + w >= target) {  // exactly one bin crosses the target
      out->bin = b;
      out->above = run;
      out->at = w;
    }
    run += w;
  }
  if (threadIdx.x == 0) out->target = target;
  __syncthreads();
  const Pick p = *out;
  __syncthreads();  // out is reused
  return p;
}

// The radix digits: bits 31..21, 20..10, 9..0.
__device__ __forceinline__ int level_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
__device__ __forceinline__ int level_bins(int level) { return level == 2 ? 1024 : 2048; }

struct Shared {
  union {
    unsigned count[NB];  // top-k
    u64 mass[NB];        // top-p
  } hist;
  u64 part[WARPS];
  Best best[WARPS];
  u64 seg_gt[WARPS], seg_t[WARPS];
  float tv[WARPS][NTOP];
  int ti[WARPS][NTOP];
  float fv[NTOP];
  int fi[NTOP];
  Pick pick;
  int seg, id;
  u64 base_gt, base_t, thr;
};

__global__ void __launch_bounds__(THREADS)
    sample_kernel(float *logits, int V, const lp_sample_params *params, const int32_t *seen,
                  lp_sample_result *results) {
  __shared__ Shared sh;
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const lp_sample_params p = params[row];
  float *x = logits + static_cast<size_t>(row) * V;
  const bool greedy = p.temperature == 0.f;
  const bool shift = !greedy && p.temperature != 1.f;
  const int ntop = min(max(p.top_logprobs, 0), NTOP);

  // 1. Repetition penalty.
  const float pen = p.repetition_penalty;
  if (pen != 0.f && pen != 1.f && seen != nullptr) {
    const int32_t *ids = seen + p.seen_offset;
    for (int j = tid; j < p.seen_count; j += THREADS) {
      const int id = ids[j];
      if (id >= 0 && id < V) {
        const float v = x[id];
        x[id] = v > 0.f ? __fdiv_rn(v, pen) : __fmul_rn(v, pen);
      }
    }
    __syncthreads();
  }

  // 2. NaN to -Inf, maximum, temperature; the last pass also sums e^(x - max) and keeps the best.
  Top top;
  top_init(top);
  Best b = {-INFINITY, -1, 0.0};
  if (!shift) {
    for (int i = tid; i < V; i += THREADS) {
      float v = x[i];
      if (isnan(v)) x[i] = v = -INFINITY;
      best_add<true>(b, v, i);
      if (ntop > 0) top_insert(top, v, i);
    }
  } else {
    for (int i = tid; i < V; i += THREADS) {
      float v = x[i];
      if (isnan(v)) x[i] = v = -INFINITY;
      best_add<false>(b, v, i);
    }
    const float m0 = block_best(b, sh.best).m;
    b = Best{-INFINITY, -1, 0.0};
    for (int i = tid; i < V; i += THREADS) {
      const float v = x[i];
      float y = v == m0 ? 0.f : __fdiv_rn(__fsub_rn(v, m0), p.temperature);
      if (isnan(y)) y = -INFINITY;
      x[i] = y;
      best_add<true>(b, y, i);
      if (ntop > 0) top_insert(top, y, i);
    }
  }
  b = block_best(b, sh.best);
  const float M = b.m;
  const double logS = log(b.s);
  if (ntop > 0) {
    warp_top(top, sh.tv[warp], sh.ti[warp]);
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int j = 0; j < NTOP; j++) {
        top.v[j] = sh.tv[lane][j];
        top.i[j] = sh.ti[lane][j];
      }
      warp_top(top, sh.fv, sh.fi);
    }
    __syncthreads();
  }

  int id = b.i;
  if (!greedy) {
    // 3. Top-k: tau is the key of the k-th largest logit, m the ties at tau to keep. Without it
    //    tau = 0 and m = 0 keep every token (every logit's key exceeds 0).
    uint32_t tau = 0;
    u64 m = 0;
    if (p.top_k > 0 && p.top_k < V) {
      unsigned *h = sh.hist.count;
      uint32_t prefix = 0, mask = 0;
      u64 above = 0;
      bool ok = true;
      for (int level = 0; level < 3 && ok; level++) {
        const int ds = level_shift(level), nb = level_bins(level);
        for (int j = tid; j < nb; j += THREADS) h[j] = 0;
        __syncthreads();
        for (int i = tid; i < V; i += THREADS) {
          const uint32_t k = fkey(x[i]);
          if ((k & mask) == prefix) atomicAdd(&h[(k >> ds) & (nb - 1)], 1u);
        }
        __syncthreads();
        const Pick pk = pick_bin(h, nb, above, static_cast<u64>(p.top_k), 0.f, sh.part, &sh.pick);
        ok = pk.bin >= 0;  // always: more than k keys
        prefix |= static_cast<uint32_t>(pk.bin) << ds;
        mask |= static_cast<uint32_t>(nb - 1) << ds;
        above = pk.above;
      }
      if (ok) {
        tau = prefix;
        m = static_cast<u64>(p.top_k) - above;
      }
    }

    // 4. Top-p over the candidates: keys above tau, and the first m ties at tau as one virtual
    //    element of their total mass.
    if (p.top_p > 0.f && p.top_p < 1.f) {
      const uint32_t floor_key = tau;
      const u64 virt = m * mass_of(kval(floor_key), M);
      uint32_t prefix = 0, mask = 0;
      u64 above = 0, at = 0, target = 0;
      bool done = true;
      for (int level = 0; level < 3; level++) {
        const int ds = level_shift(level), nb = level_bins(level);
        for (int j = tid; j < nb; j += THREADS) sh.hist.mass[j] = 0;
        __syncthreads();
        for (int i = tid; i < V; i += THREADS) {
          const float v = x[i];
          const uint32_t k = fkey(v);
          if (k > floor_key && (k & mask) == prefix) {
            const u64 w = mass_of(v, M);
            if (w != 0) atomicAdd(&sh.hist.mass[(k >> ds) & (nb - 1)], w);
          }
        }
        if (tid == 0 && virt != 0 && (floor_key & mask) == prefix)
          atomicAdd(&sh.hist.mass[(floor_key >> ds) & (nb - 1)], virt);
        __syncthreads();
        const Pick pk = pick_bin(sh.hist.mass, nb, above, target, level == 0 ? p.top_p : 0.f, sh.part, &sh.pick);
        if (level == 0) target = pk.target;
        if (target == 0 || pk.bin < 0) {  // a share below one unit, or above the candidates' total
          done = false;
          break;
        }
        prefix |= static_cast<uint32_t>(pk.bin) << ds;
        mask |= static_cast<uint32_t>(nb - 1) << ds;
        above = pk.above;
        at = pk.at;
      }
      if (target == 0) {
        tau = fkey(M);
        m = 1;
      } else if (done) {
        const u64 q = mass_of(kval(prefix), M);  // every tie weighs q, and at > 0 makes q > 0
        tau = prefix;
        if (q == 0) {
          m = 1;
        } else {
          const u64 need = (target - above + q - 1) / q;
          m = umin(need < 1 ? 1 : need, at / q);
        }
      }  // else keep the candidates
    }

    // 5. The draw: the first index whose inclusive prefix of kept mass exceeds the threshold.
    const u64 q = mass_of(kval(tau), M);  // 0 for tau = 0 (kval(0) is NaN); then m is 0 too
    const int S = ((V + WARPS - 1) / WARPS + 31) & ~31;
    {
      const int lo = warp * S, hi = min(lo + S, V);
      u64 gt = 0, tc = 0;
      for (int i = lo + lane; i < hi; i += 32) {
        const float v = x[i];
        const uint32_t k = fkey(v);
        if (k > tau)
          gt += mass_of(v, M);
        else if (k == tau)
          tc++;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        gt += __shfl_xor_sync(FULL, gt, o);
        tc += __shfl_xor_sync(FULL, tc, o);
      }
      if (lane == 0) {
        sh.seg_gt[warp] = gt;
        sh.seg_t[warp] = tc;
      }
      if (tid == 0) {
        sh.id = id;  // unreachable fallback: the first maximum
        sh.seg = -1;
      }
    }
    __syncthreads();
    if (warp == 0) {
      const u64 g = sh.seg_gt[lane], c = sh.seg_t[lane];
      u64 G = g, C = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u64 ng = __shfl_up_sync(FULL, G, o), nc = __shfl_up_sync(FULL, C, o);
        if (lane >= o) {
          G += ng;
          C += nc;
        }
      }
      const u64 total = __shfl_sync(FULL, G, 31) + q * umin(__shfl_sync(FULL, C, 31), m);
      if (total > 0) {  // always: the first maximum is kept
        const u64 thr = draw_threshold(p.u, total);
        const unsigned crossed = __ballot_sync(FULL, G + q * umin(C, m) > thr);
        if (lane == __ffs(crossed) - 1) {
          sh.seg = lane;
          sh.base_gt = G - g;
          sh.base_t = C - c;
          sh.thr = thr;
        }
      }
    }
    __syncthreads();
    if (sh.seg >= 0) {
      const int lo = sh.seg * S, hi = min(lo + S, V);
      const int per = (hi - lo + THREADS - 1) / THREADS;
      const int a = min(lo + tid * per, hi), e = min(a + per, hi);
      u64 gt = 0, tc = 0;
      for (int i = a; i < e; i++) {
        const float v = x[i];
        const uint32_t k = fkey(v);
        if (k > tau)
          gt += mass_of(v, M);
        else if (k == tau)
          tc++;
      }
      const u64 base_gt0 = sh.base_gt, base_t0 = sh.base_t, thr = sh.thr;
      u64 total;
      const u64 g0 = base_gt0 + block_exscan(gt, sh.part, total);
      const u64 c0 = base_t0 + block_exscan(tc, sh.part, total);
      if (g0 + q * umin(c0, m) <= thr && g0 + gt + q * umin(c0 + tc, m) > thr) {
        u64 g = g0, c = c0;
        for (int i = a; i < e; i++) {
          const float v = x[i];
          const uint32_t k = fkey(v);
          if (k > tau)
            g += mass_of(v, M);
          else if (k == tau)
            c++;
          else
            continue;
          if (g + q * umin(c, m) > thr) {
            sh.id = i;
            break;
          }
        }
      }
    }
    __syncthreads();
    id = sh.id;
  }

  // 6. The result.
  if (tid == 0) {
    lp_sample_result *res = results + row;
    res->id = id;
    res->logprob = logprob(x[id], M, logS);
#pragma unroll
    for (int j = 0; j < NTOP; j++) {
      const bool used = j < ntop && sh.fi[j] != INT_MAX;
      res->top_ids[j] = used ? sh.fi[j] : -1;
      res->top_logprobs[j] = used ? logprob(sh.fv[j], M, logS) : 0.f;
    }
  }
}

}  // namespace

extern "C" {

size_t lp_sample_workspace(int rows, int vocab) {
  (void)rows;
  (void)vocab;
  return 0;
}

int lp_sample(float *logits, int rows, int vocab, const lp_sample_params *params, const int32_t *seen,
              lp_sample_result *results, void *workspace, size_t workspace_bytes, lp_stream stream) {
  (void)workspace;
  (void)workspace_bytes;
  if (rows < 0 || vocab <= 0) return LP_ERR_INVALID;
  if (vocab > MAX_VOCAB) return LP_ERR_UNSUPPORTED;
  if (rows == 0) return LP_OK;
  if (logits == nullptr || params == nullptr || results == nullptr) return LP_ERR_INVALID;
  sample_kernel<<<rows, THREADS, 0, cs(stream)>>>(logits, vocab, params, seen, results);
  return launched();
}

}  // extern "C"
