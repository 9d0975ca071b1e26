// forward.cu: the dense operations of a Llama forward pass (see loraplex_kernels.h for the contract).
//
// Activations are float32 row-major [tokens, width]; matrix weights are float32 or bfloat16. The
// kernels are deliberately plain (one block per row or per (token, head), grid-stride loops, fp32
// math) and read the batch metadata (positions, sequence index, flattened block tables) from
// device arrays, so a step's shapes never reach the kernels as host loops. Functions whose results
// the CPU backend defines bit for bit (RoPE's angles, RMSNorm's inverse, SiLU) do the same
// transcendental work in double precision, as the CPU reference does.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <utility>

#include "launch.cuh"
#include "loraplex_kernels.h"
#include "mma.cuh"

struct lp_blas_s {
  cublasHandle_t h;
};

namespace {

inline cudaStream_t cs(lp_stream s) { return reinterpret_cast<cudaStream_t>(s); }

inline int blas_code(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? LP_OK : LP_ERR_BLAS - static_cast<int>(s);
}

// Blocks for a grid-stride elementwise kernel over n elements.
inline unsigned elem_blocks(size_t n) {
  size_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 65535 ? (b == 0 ? 1 : b) : 65535);
}

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }

// The KV cache's element type is float or bf16 (LP_DTYPE_F32 / LP_DTYPE_BF16): written rounded to
// nearest even, read back to float32; attention accumulates in float32 either way.
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// Four consecutive elements c*4 .. c*4+3 of a row (16 bytes of float, 8 of bf16; aligned by the
// caller), through the read-only cache: as stored (raw4), then as float32 (widen4), so that a load
// can be issued long before its value is needed.
__device__ __forceinline__ float4 raw4(const float *row, int c) { return __ldg(reinterpret_cast<const float4 *>(row) + c); }
__device__ __forceinline__ uint2 raw4(const __nv_bfloat16 *row, int c) {
  return __ldg(reinterpret_cast<const uint2 *>(row) + c);
}
__device__ __forceinline__ float4 widen4(float4 v) { return v; }
__device__ __forceinline__ float4 widen4(uint2 u) {
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void st4(float *row, int c, float4 v) { reinterpret_cast<float4 *>(row)[c] = v; }
__device__ __forceinline__ void st4(__nv_bfloat16 *row, int c, float4 v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t *>(&a);
  u.y = *reinterpret_cast<uint32_t *>(&b);
  reinterpret_cast<uint2 *>(row)[c] = u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void gather_rows_kernel(float *out, const T *table, const int32_t *rows, int width) {
  pdl_enter();
  const size_t src = static_cast<size_t>(rows[blockIdx.x]) * width;
  float *o = out + static_cast<size_t>(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = ld(table, src + i);
}

// out may alias x: each thread rereads its own elements after the reduction, before writing them.
// ob, when not NULL, also receives the result rounded to bf16 (the next GEMM's input).
__global__ void rmsnorm_kernel(float *out, __nv_bfloat16 *ob, const float *x, const float *w, int d, float eps) {
  pdl_enter();
  const float *xr = x + static_cast<size_t>(blockIdx.x) * d;
  float *orow = out + static_cast<size_t>(blockIdx.x) * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
  __shared__ float red[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  ss = warp_sum(ss);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    ss = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0.f;
    ss = warp_sum(ss);
    if (lane == 0) red[0] = ss;
  }
  __syncthreads();
  const float inv = static_cast<float>(1.0 / sqrt(static_cast<double>(red[0] / static_cast<float>(d) + eps)));
  __nv_bfloat16 *brow = ob == nullptr ? nullptr : ob + static_cast<size_t>(blockIdx.x) * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float y = xr[i] * inv * w[i];
    orow[i] = y;
    if (brow != nullptr) brow[i] = __float2bfloat16_rn(y);
  }
}

// rmsnorm_kernel for d % 4 == 0, 16-byte aligned rows and d <= 4 * RMS_VEC * blockDim.x: the row is
// read once, with 16-byte loads, and kept in registers for the scaling pass.
constexpr int RMS_VEC = 4;
__global__ void rmsnorm_vec_kernel(float *out, __nv_bfloat16 *ob, const float *x, const float *w, int d, float eps) {
  pdl_enter();
  const int nv = d >> 2;
  const float4 *xr = reinterpret_cast<const float4 *>(x + static_cast<size_t>(blockIdx.x) * d);
  float4 v[RMS_VEC];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < RMS_VEC; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = i < nv ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  }
  __shared__ float red[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  ss = warp_sum(ss);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    ss = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0.f;
    ss = warp_sum(ss);
    if (lane == 0) red[0] = ss;
  }
  __syncthreads();
  const float inv = static_cast<float>(1.0 / sqrt(static_cast<double>(red[0] / static_cast<float>(d) + eps)));
  float4 *orow = reinterpret_cast<float4 *>(out + static_cast<size_t>(blockIdx.x) * d);
  const float4 *wr = reinterpret_cast<const float4 *>(w);
#pragma unroll
  for (int j = 0; j < RMS_VEC; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i >= nv) break;
    const float4 g = wr[i];
    const float4 y = make_float4(v[j].x * inv * g.x, v[j].y * inv * g.y, v[j].z * inv * g.z, v[j].w * inv * g.w);
    orow[i] = y;
    if (ob != nullptr) {
      __nv_bfloat162 *brow = reinterpret_cast<__nv_bfloat162 *>(ob + static_cast<size_t>(blockIdx.x) * d);
      brow[2 * i] = __floats2bfloat162_rn(y.x, y.y);
      brow[2 * i + 1] = __floats2bfloat162_rn(y.z, y.w);
    }
  }
}

__global__ void add_kernel(float *out, const float *a, const float *b, size_t n) {
  pdl_enter();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

// x[r, c] += bias[c] over [rows, n] (total = rows * n).
__global__ void add_bias_kernel(float *x, const float *bias, int n, size_t total) {
  pdl_enter();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] += bias[i % n];
}

__global__ void silu_mul_kernel(float *out, __nv_bfloat16 *ob, const float *g, const float *u, size_t n) {
  pdl_enter();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float gv = g[i];
    const float y = gv / (1.f + static_cast<float>(exp(-static_cast<double>(gv)))) * u[i];
    out[i] = y;
    if (ob != nullptr) ob[i] = __float2bfloat16_rn(y);
  }
}

// Stores v as row r's column c of a packed output split into parts of widths n0, n1, n2.
template <typename V>
__device__ __forceinline__ void store_part(V v, int r, int c, V *o0, int n0, V *o1, int n1, V *o2, int n2) {
  if (c < n0) {
    o0[static_cast<size_t>(r) * n0 + c] = v;
    return;
  }
  c -= n0;
  if (c < n1) {
    o1[static_cast<size_t>(r) * n1 + c] = v;
    return;
  }
  c -= n1;
  o2[static_cast<size_t>(r) * n2 + c] = v;
}

// Grid (rows, column chunks of 256): copies row r's columns into the part they fall in. V is float,
// or float4 (16-byte pieces) for widths and row strides that are multiples of 4 floats and 16-byte
// aligned rows, all counted in V.
template <typename V>
__global__ void split_cols_kernel(const V *p, int ldp, V *o0, int n0, V *o1, int n1, V *o2, int n2) {
  pdl_enter();
  const int r = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= n0 + n1 + n2) return;
  store_part(p[static_cast<size_t>(r) * ldp + c], r, c, o0, n0, o1, n1, o2, n2);
}

// The LoRA term of one output column of a packed projection for one token (lp_lora_tail): the B row
// of the token's adapter for the column's module, or none.
struct LoraCol {
  const __nv_bfloat16 *b;  // nullptr: no adapter applies
  int rank, v_off;
  float scale;
};

// lora_col finds the term of packed column c for a token of segment seg (-1: none). It reads only
// the batch's tables, which may be read before the wait: the batch description is uploaded before
// the step's first kernel.
__device__ __forceinline__ LoraCol lora_col(const lp_sgmv_group &g, int seg, int c, int max_rank) {
  if (seg >= 0) {
    for (int m = 0; m < g.modules; m++) {
      const int lc = c - g.y_off[m];
      if (lc < 0 || lc >= g.cols[m]) continue;
      const auto *bm = static_cast<const __nv_bfloat16 *const *>(g.ptrs[m])[seg];
      const int rk = min(g.ranks[m][seg], max_rank);
      if (bm != nullptr && rk > 0) return LoraCol{bm + static_cast<size_t>(lc) * rk, rk, g.v_off[m], g.scales[m][seg]};
      break;
    }
  }
  return LoraCol{nullptr, 0, 0, 0.f};
}

// lora_add returns val + scale * v_row[v_off : v_off + rank] . B row (v_row: the token's row of the
// shrink's output, read after the wait), summed in rank order; 16-byte loads where both rows allow.
__device__ __forceinline__ float lora_add(const LoraCol &l, const float *v_row, float val) {
  if (l.b == nullptr) return val;
  const float *vr = v_row + l.v_off;
  float a = 0.f;
  int j = 0;
  if (((reinterpret_cast<uintptr_t>(l.b) | reinterpret_cast<uintptr_t>(vr)) & 15) == 0) {
    for (; j + 8 <= l.rank; j += 8) {
      const uint4 u = __ldg(reinterpret_cast<const uint4 *>(l.b + j));
      const float4 v0 = *reinterpret_cast<const float4 *>(vr + j), v1 = *reinterpret_cast<const float4 *>(vr + j + 4);
      const __nv_bfloat162 *bp = reinterpret_cast<const __nv_bfloat162 *>(&u);
      const float2 b0 = __bfloat1622float2(bp[0]), b1 = __bfloat1622float2(bp[1]), b2 = __bfloat1622float2(bp[2]),
                   b3 = __bfloat1622float2(bp[3]);
      a = fmaf(v0.x, b0.x, a);
      a = fmaf(v0.y, b0.y, a);
      a = fmaf(v0.z, b1.x, a);
      a = fmaf(v0.w, b1.y, a);
      a = fmaf(v1.x, b2.x, a);
      a = fmaf(v1.y, b2.y, a);
      a = fmaf(v1.z, b3.x, a);
      a = fmaf(v1.w, b3.y, a);
    }
  }
  for (; j < l.rank; j++) a = fmaf(vr[j], __bfloat162float(l.b[j]), a);
  return fmaf(l.scale, a, val);
}

// split_cols_kernel with the grouped LoRA expand of the packed projection folded in (lp_split_cols_lora):
// grid (rows, column chunks of 256); a thread adds its row's LoRA term for its column to the packed
// product and stores the sum into the part.
__global__ void split_lora_kernel(const float *p, int ldp, float *o0, int n0, float *o1, int n1, float *o2, int n2,
                                  const float *v, int ldv, lp_sgmv_group g, const int32_t *tok_seg, int max_rank) {
  const int r = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  const bool in = c < n0 + n1 + n2;
  const LoraCol l = lora_col(g, in ? tok_seg[r] : -1, c, max_rank);
  pdl_enter();
  if (!in) return;
  store_part(lora_add(l, v + static_cast<size_t>(r) * ldv, p[static_cast<size_t>(r) * ldp + c]), r, c, o0, n0, o1, n1,
             o2, n2);
}

// Round to nearest even, bit for bit as the host's cuda.BF16FromFloat32 (adapter uploads round on
// the device, and must store what a host conversion would): a NaN keeps its sign and top payload
// bits, made quiet, where __float2bfloat16_rn would store the canonical NaN.
__device__ __forceinline__ __nv_bfloat16 bf16_rne(float f) {
  uint32_t b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16(static_cast<unsigned short>((b >> 16) | 0x40u));
  b += 0x7fffu + ((b >> 16) & 1u);
  return __ushort_as_bfloat16(static_cast<unsigned short>(b >> 16));
}

__global__ void f32_to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
  pdl_enter();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = bf16_rne(src[i]);
}

__global__ void bf16_to_f32_kernel(float *dst, const __nv_bfloat16 *src, size_t n) {
  pdl_enter();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = __bfloat162float(src[i]);
}

// One block per token; the angle is formed in float32 (as Hugging Face does) and its cosine and
// sine taken in double, then rounded, as the CPU backend does.
// Grid (tokens, head groups of ROPE_HEADS): a thread owns one frequency i, computes its angle's cosine
// and sine once (in double, as the CPU backend does) and rotates pair i of each head of its group.
constexpr int ROPE_HEADS = 4;
__global__ void rope_kernel(float *x, int heads, int hd, const float *inv_freq, const int32_t *positions,
                            const int32_t *rope_set) {
  pdl_enter();
  const int half = hd / 2;
  const float p = static_cast<float>(positions[blockIdx.x]);
  if (rope_set != nullptr) inv_freq += rope_set[blockIdx.x] * half;
  float *row = x + static_cast<size_t>(blockIdx.x) * heads * hd;
  const int h0 = blockIdx.y * ROPE_HEADS, h1 = min(heads, h0 + ROPE_HEADS);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float ang = p * inv_freq[i];
    const float c = static_cast<float>(cos(static_cast<double>(ang)));
    const float s = static_cast<float>(sin(static_cast<double>(ang)));
    for (int h = h0; h < h1; h++) {
      float *v = row + h * hd;
      const float x1 = v[i], x2 = v[i + half];
      v[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
      v[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
  }
}

// RoPE on q and k and the KV cache write in one pass: grid (tokens, head groups of ROPE_HEADS over the
// heads of q then those of k); a thread owns frequency i, that is elements i and i + half of each
// head of its group. Before rotating, the family options of pp: bias added to q, k and v, then
// RMSNorm per head of q and k (a block reduction per head of the group; each thread rereads only its
// own elements, so nothing is overwritten before every thread has read it). For a k head it also
// writes the rotated k and the (biased) v into the cache slot of the token's position. Without
// options, the same arithmetic as rope_kv_write's unfused composition (rope_kernel, kv_write_kernel).
template <typename KV>
__global__ void rope_kv_write_kernel(float *q, float *k, const float *v, KV *kc, KV *vc, int heads, int kv_heads,
                                     int hd, const float *inv_freq, const int32_t *positions,
                                     const int32_t *rope_set, const int32_t *seq_index, const int32_t *bt,
                                     const int32_t *bt_off, int bs, lp_qkv_prep pp) {
  pdl_enter();
  const int half = hd / 2, t = blockIdx.x;
  if (rope_set != nullptr) inv_freq += rope_set[t] * half;
  const int pos = positions[t];
  const float p = static_cast<float>(pos);
  const int h0 = blockIdx.y * ROPE_HEADS, h1 = min(heads + kv_heads, h0 + ROPE_HEADS);
  const int kvw = kv_heads * hd;
  const int32_t *table = bt + bt_off[seq_index[t]];
  const size_t dst = (static_cast<size_t>(table[pos / bs]) * bs + pos % bs) * kvw;
  auto row_of = [&](int h) -> float * {
    return h >= heads ? k + static_cast<size_t>(t) * kvw + (h - heads) * hd : q + static_cast<size_t>(t) * heads * hd + h * hd;
  };
  auto bias_of = [&](int h) -> const float * {
    const float *b = h >= heads ? pp.k_bias : pp.q_bias;
    return b == nullptr ? nullptr : b + (h >= heads ? h - heads : h) * hd;
  };
  // Per-head RMSNorm multipliers (1 without a norm).
  float inv[ROPE_HEADS];
  const bool norm = pp.q_norm != nullptr || pp.k_norm != nullptr;
  if (norm) {
    float ss[ROPE_HEADS];
#pragma unroll
    for (int g = 0; g < ROPE_HEADS; g++) ss[g] = 0.f;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
#pragma unroll
      for (int g = 0; g < ROPE_HEADS; g++) {
        const int h = h0 + g;
        if (h >= h1) break;
        const float *row = row_of(h), *b = bias_of(h);
        const float x1 = b ? row[i] + b[i] : row[i], x2 = b ? row[i + half] + b[i + half] : row[i + half];
        ss[g] += x1 * x1 + x2 * x2;
      }
    }
    __shared__ float red[ROPE_HEADS][4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int g = 0; g < ROPE_HEADS; g++) {
      const float w = warp_sum(ss[g]);
      if (lane == 0) red[g][warp] = w;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < ROPE_HEADS; g++) {
      float tot = 0.f;
      for (int w = 0; w < static_cast<int>(blockDim.x >> 5); w++) tot += red[g][w];
      inv[g] = static_cast<float>(1.0 / sqrt(static_cast<double>(tot / static_cast<float>(hd) + pp.eps)));
    }
  }
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float ang = p * inv_freq[i];
    const float c = static_cast<float>(cos(static_cast<double>(ang)));
    const float s = static_cast<float>(sin(static_cast<double>(ang)));
    for (int h = h0; h < h1; h++) {
      const bool isk = h >= heads;
      const int hh = isk ? h - heads : h;
      float *row = row_of(h);
      const float *b = bias_of(h);
      float x1 = row[i], x2 = row[i + half];
      if (b != nullptr) {
        x1 += b[i];
        x2 += b[i + half];
      }
      const float *nw = isk ? pp.k_norm : pp.q_norm;
      if (nw != nullptr) {
        x1 = x1 * inv[h - h0] * nw[i];
        x2 = x2 * inv[h - h0] * nw[i + half];
      }
      const float y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
      const float y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
      row[i] = y1;
      row[i + half] = y2;
      if (isk) {
        const size_t o = dst + hh * hd;
        const float *vr = v + static_cast<size_t>(t) * kvw + hh * hd;
        float v1 = vr[i], v2 = vr[i + half];
        if (pp.v_bias != nullptr) {
          v1 += pp.v_bias[hh * hd + i];
          v2 += pp.v_bias[hh * hd + i + half];
        }
        st(kc, o + i, y1);
        st(kc, o + i + half, y2);
        st(vc, o + i, v1);
        st(vc, o + i + half, v2);
      }
    }
  }
}

inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

__device__ __forceinline__ size_t slot(const int32_t *table, int j, int bs) {
  return static_cast<size_t>(table[j / bs]) * bs + j % bs;
}

// Grid (tokens, column chunks): each thread moves four elements of k and of v (kvw % 4 == 0 and
// 16-byte aligned rows; kv_write_scalar_kernel otherwise).
template <typename KV>
__global__ void kv_write_kernel(KV *kc, KV *vc, const float *k, const float *v, int kvw, const int32_t *positions,
                                const int32_t *seq_index, const int32_t *bt, const int32_t *bt_off, int bs) {
  pdl_enter();
  const int t = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (4 * i >= kvw) return;
  const int32_t *table = bt + bt_off[seq_index[t]];
  const size_t off = slot(table, positions[t], bs) * kvw;
  const size_t src = static_cast<size_t>(t) * kvw;
  st4(kc + off, i, reinterpret_cast<const float4 *>(k + src)[i]);
  st4(vc + off, i, reinterpret_cast<const float4 *>(v + src)[i]);
}

template <typename KV>
__global__ void kv_write_scalar_kernel(KV *kc, KV *vc, const float *k, const float *v, int kvw,
                                       const int32_t *positions, const int32_t *seq_index, const int32_t *bt,
                                       const int32_t *bt_off, int bs) {
  pdl_enter();
  const int t = blockIdx.x;
  const int32_t *table = bt + bt_off[seq_index[t]];
  const size_t off = slot(table, positions[t], bs) * kvw;
  const size_t src = static_cast<size_t>(t) * kvw;
  for (int i = threadIdx.x; i < kvw; i += blockDim.x) {
    st(kc, off + i, k[src + i]);
    st(vc, off + i, v[src + i]);
  }
}

constexpr int ATT_WARPS = 4;

// One block per (token, query head). Each warp walks positions j = lo + warp, lo + warp + 4, ... <= the
// token's position p (lo = 0, or p - window + 1 with a sliding window) with its own online softmax;
// lanes hold head dims lane, lane+32, ...; the warps' partial results are merged at the end.
template <int DPL, typename KV>
__global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_kernel(float *out, const float *q, const KV *kc, const KV *vc, int heads, int kv_heads,
                     int hd, float scale, const int32_t *positions, const int32_t *seq_index,
                     const int32_t *bt, const int32_t *bt_off, int bs, int window) {
  pdl_enter();
  const int t = blockIdx.x, h = blockIdx.y;
  const int kvh = h / (heads / kv_heads);
  const int kvw = kv_heads * hd, qw = heads * hd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p = positions[t];
  const int32_t *table = bt + bt_off[seq_index[t]];
  const float *qr = q + static_cast<size_t>(t) * qw + h * hd;
  float qv[DPL], acc[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) {
    const int d = lane + 32 * i;
    qv[i] = d < hd ? qr[d] : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int lo = window > 0 ? max(0, p - window + 1) : 0;
  for (int j = lo + warp; j <= p; j += ATT_WARPS) {
    const size_t off = slot(table, j, bs) * kvw + static_cast<size_t>(kvh) * hd;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
      const int d = lane + 32 * i;
      if (d < hd) dot += qv[i] * ld(kc, off + d);
    }
    const float sc = warp_sum(dot) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = expf(m - mn);
    const float e = expf(sc - mn);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
      const int d = lane + 32 * i;
      acc[i] = acc[i] * corr + (d < hd ? e * ld(vc, off + d) : 0.f);
    }
    m = mn;
  }
  __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
  __shared__ float sacc[ATT_WARPS][DPL * 32];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < DPL; i++) sacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float M = -INFINITY;
  for (int w = 0; w < ATT_WARPS; w++)
    if (sl[w] > 0.f) M = fmaxf(M, sm[w]);
  float L = 0.f, o[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) o[i] = 0.f;
  for (int w = 0; w < ATT_WARPS; w++) {
    if (sl[w] <= 0.f) continue;  // a warp that saw no position
    const float c = expf(sm[w] - M);
    L += sl[w] * c;
#pragma unroll
    for (int i = 0; i < DPL; i++) o[i] += sacc[w][lane + 32 * i] * c;
  }
  float *orow = out + static_cast<size_t>(t) * qw + h * hd;
#pragma unroll
  for (int i = 0; i < DPL; i++) {
    const int d = lane + 32 * i;
    if (d < hd) orow[d] = o[i] / L;
  }
}

// Memory-efficient attention (flash-decoding). One block per (token, group of GB query heads that
// share a KV head, split of the context). The block's 4 warps take interleaved runs of FA_P
// consecutive positions of its split; a warp loads the K and V rows of its FA_P positions at once
// (16-byte loads: lane c holds head dims 4c..4c+3, 4(c+32).., so one row is one coalesced 512-byte
// access per 128 dims), keeps an online softmax per query head, and the warps merge in shared
// memory. With one split the block writes the output; with several it writes (max, sum, unnormalized
// accumulator) per (token, head, split) to a workspace that attention_combine_kernel merges. The
// score is warp_sum(q.k) * scale and exp/max as in attention_kernel, so the result equals it up to
// the order of the float32 sums. Needs head_dim % 4 == 0 and 16-byte aligned rows (checked on the host).
constexpr int FA_WARPS = 4;
constexpr int FA_P = 4;
constexpr int FA_TBL = 256;  // block-table entries a block stages in shared memory
constexpr int FA_CLUSTER = 8;  // the most splits merged inside a cluster (the portable cluster size)

__device__ __forceinline__ float dot4(const float4 a, const float4 b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// cluster_merge: the splits of one (token, head group) run as one thread-block cluster (grid z,
// at most 8 blocks), each holding its merged partial (max pm, sum pl, unnormalized accumulator pacc
// per head of the group) in shared memory; block 0 merges them in split order with the arithmetic
// of attention_combine_kernel, reading the others' through distributed shared memory, and writes
// the output. The other blocks wait until it has read them before exiting.
template <int NV, int GB>
__device__ __forceinline__ void cluster_merge(float *out, float *pm, float *pl, float4 (*pacc)[NV * 32], int t, int qw,
                                              int h0, int hd) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every split's partial is in its block's shared memory
  if (cluster.block_rank() == 0) {
    const int splits = static_cast<int>(cluster.num_blocks());
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nv4 = hd >> 2;
    for (int g = warp; g < GB; g += FA_WARPS) {
      float M = -INFINITY;
      for (int s = 0; s < splits; s++)
        if (*cluster.map_shared_rank(pl + g, s) > 0.f) M = fmaxf(M, *cluster.map_shared_rank(pm + g, s));
#pragma unroll
      for (int i = 0; i < NV; i++) {
        const int c = lane + 32 * i;
        if (c >= nv4) continue;
        float L = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < splits; s++) {
          const float ls = *cluster.map_shared_rank(pl + g, s);
          if (ls <= 0.f) continue;  // a split past the token's position
          const float cf = expf(*cluster.map_shared_rank(pm + g, s) - M);
          L += ls * cf;
          const float4 a = *cluster.map_shared_rank(&pacc[g][c], s);
          o.x += a.x * cf;
          o.y += a.y * cf;
          o.z += a.z * cf;
          o.w += a.w * cf;
        }
        reinterpret_cast<float4 *>(out + static_cast<size_t>(t) * qw + (h0 + g) * hd)[c] =
            make_float4(o.x / L, o.y / L, o.z / L, o.w / L);
      }
    }
  }
  cluster.sync();  // block 0 has read every block's shared memory
#else
  __trap();  // the host takes this path on sm_90 and later only (clusters)
#endif
}

template <int NV, int GB, typename KV, bool CM = false>
__global__ void __launch_bounds__(FA_WARPS * 32)
    flash_attention_kernel(float *out, float *part, const float *q, const KV *kc, const KV *vc, int heads,
                           int kv_heads, int hd, float scale, const int32_t *positions, const int32_t *seq_index,
                           const int32_t *bt, const int32_t *bt_off, int bs, int chunk, int splits, int window) {
  const int t = blockIdx.x;
  const int G = heads / kv_heads;
  const int groups = G / GB;
  const int kvh = blockIdx.y / groups;
  const int h0 = kvh * G + (blockIdx.y % groups) * GB;
  const int split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p = positions[t];
  // The splits cover lo .. p: the whole context, or the sliding window's last positions.
  const int lo = window > 0 ? max(0, p - window + 1) : 0;
  const int j0 = lo + split * chunk;
  // The last split runs to the token's position whatever max_ctx said.
  const int j1 = split == splits - 1 ? p + 1 : min(j0 + chunk, p + 1);
  const int32_t *table = bt + bt_off[seq_index[t]];
  // The split's block-table entries, read once into shared memory, so a K/V load waits on one
  // memory round trip rather than two.
  __shared__ int32_t stab[FA_TBL];
  const int b0 = j0 / bs;
  const int nb = j1 > j0 ? (j1 - 1) / bs - b0 + 1 : 0;
  const bool stable = nb <= FA_TBL;
  if (stable)
    for (int i = threadIdx.x; i < nb; i += blockDim.x) stab[i] = table[b0 + i];
  __syncthreads();
  // Everything above reads the batch description, which no kernel writes: it overlaps the previous
  // kernel's tail (the RoPE + KV write); q and the cache come after the wait.
  pdl_enter();
  const int nv4 = hd >> 2;
  const int kvw = kv_heads * hd, qw = heads * hd;
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  float4 qv[GB][NV], acc[GB][NV];
  float m[GB], l[GB];
#pragma unroll
  for (int g = 0; g < GB; g++) {
    const float4 *qr = reinterpret_cast<const float4 *>(q + static_cast<size_t>(t) * qw + (h0 + g) * hd);
#pragma unroll
    for (int i = 0; i < NV; i++) {
      const int c = lane + 32 * i;
      qv[g][i] = c < nv4 ? qr[c] : zero;
      acc[g][i] = zero;
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  // The K and V rows of a warp's next FA_P positions are requested (as stored: raw, not widened)
  // while it works on the current ones, so each step waits on memory at most once.
  using Raw = decltype(raw4(kc, 0));
  Raw kn[FA_P][NV], vn[FA_P][NV];
  auto fetch = [&](int jb) {
#pragma unroll
    for (int pp = 0; pp < FA_P; pp++) {
      const int j = jb + pp;
      const bool in = j < j1;
      const size_t sl = !in ? 0 : stable ? static_cast<size_t>(stab[j / bs - b0]) * bs + j % bs : slot(table, j, bs);
      const size_t off = sl * kvw + static_cast<size_t>(kvh) * hd;
#pragma unroll
      for (int i = 0; i < NV; i++) {
        const int c = lane + 32 * i;
        kn[pp][i] = in && c < nv4 ? raw4(kc + off, c) : Raw{};
        vn[pp][i] = in && c < nv4 ? raw4(vc + off, c) : Raw{};
      }
    }
  };
  int jb = j0 + warp * FA_P;
  if (jb < j1) fetch(jb);
  for (; jb < j1; jb += FA_WARPS * FA_P) {
    float4 kr[FA_P][NV], vr[FA_P][NV];
#pragma unroll
    for (int pp = 0; pp < FA_P; pp++)
#pragma unroll
      for (int i = 0; i < NV; i++) kr[pp][i] = widen4(kn[pp][i]), vr[pp][i] = widen4(vn[pp][i]);
    if (jb + FA_WARPS * FA_P < j1) fetch(jb + FA_WARPS * FA_P);
#pragma unroll
    for (int g = 0; g < GB; g++) {
      float s[FA_P];
      float mx = -INFINITY;
#pragma unroll
      for (int pp = 0; pp < FA_P; pp++) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < NV; i++) d += dot4(qv[g][i], kr[pp][i]);
        s[pp] = jb + pp < j1 ? warp_sum(d) * scale : -INFINITY;
        mx = fmaxf(mx, s[pp]);
      }
      const float mn = fmaxf(m[g], mx);
      const float corr = expf(m[g] - mn);
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < NV; i++) {
        acc[g][i].x *= corr;
        acc[g][i].y *= corr;
        acc[g][i].z *= corr;
        acc[g][i].w *= corr;
      }
#pragma unroll
      for (int pp = 0; pp < FA_P; pp++) {
        const float e = expf(s[pp] - mn);
        l[g] += e;
#pragma unroll
        for (int i = 0; i < NV; i++) {
          acc[g][i].x += e * vr[pp][i].x;
          acc[g][i].y += e * vr[pp][i].y;
          acc[g][i].z += e * vr[pp][i].z;
          acc[g][i].w += e * vr[pp][i].w;
        }
      }
      m[g] = mn;
    }
  }
  __shared__ float sm[FA_WARPS][GB], sl[FA_WARPS][GB];
  __shared__ float4 sacc[FA_WARPS][GB][NV * 32];
#pragma unroll
  for (int g = 0; g < GB; g++) {
    if (lane == 0) {
      sm[warp][g] = m[g];
      sl[warp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < NV; i++) sacc[warp][g][lane + 32 * i] = acc[g][i];
  }
  __syncthreads();
  for (int g = warp; g < GB; g += FA_WARPS) {
    float M = -INFINITY;
    for (int w = 0; w < FA_WARPS; w++)
      if (sl[w][g] > 0.f) M = fmaxf(M, sm[w][g]);
    float L = 0.f;
    float4 o[NV];
#pragma unroll
    for (int i = 0; i < NV; i++) o[i] = zero;
    for (int w = 0; w < FA_WARPS; w++) {
      if (sl[w][g] <= 0.f) continue;  // a warp that saw no position
      const float c = expf(sm[w][g] - M);
      L += sl[w][g] * c;
#pragma unroll
      for (int i = 0; i < NV; i++) {
        const float4 a = sacc[w][g][lane + 32 * i];
        o[i].x += a.x * c;
        o[i].y += a.y * c;
        o[i].z += a.z * c;
        o[i].w += a.w * c;
      }
    }
    const int h = h0 + g;
    if (splits == 1) {
      float4 *orow = reinterpret_cast<float4 *>(out + static_cast<size_t>(t) * qw + h * hd);
#pragma unroll
      for (int i = 0; i < NV; i++) {
        const int c = lane + 32 * i;
        if (c < nv4) orow[c] = make_float4(o[i].x / L, o[i].y / L, o[i].z / L, o[i].w / L);
      }
    } else if (CM) {
      // The merged partial stays in this block's shared memory for the cluster's merge below
      // (sacc's slot of warp 0, which only warp g == 0 reads, and it has read it by now).
      __syncwarp();  // every lane has read sm[0][g] and sl[0][g]
      if (lane == 0) {
        sm[0][g] = M;
        sl[0][g] = L;
      }
#pragma unroll
      for (int i = 0; i < NV; i++) sacc[0][g][lane + 32 * i] = o[i];
    } else {
      // Partial: [m, l, pad, pad, acc[hd]] per (token, head, split).
      float *pr = part + ((static_cast<size_t>(t) * heads + h) * splits + split) * (hd + 4);
      if (lane == 0) {
        pr[0] = M;
        pr[1] = L;
      }
      float4 *pa = reinterpret_cast<float4 *>(pr + 4);
#pragma unroll
      for (int i = 0; i < NV; i++) {
        const int c = lane + 32 * i;
        if (c < nv4) pa[c] = o[i];
      }
    }
  }
  if (CM && splits > 1) cluster_merge<NV, GB>(out, sm[0], sl[0], sacc[0], t, qw, h0, hd);
}

// Tensor-core attention for prefill (bf16 KV cache). One block per (tile, query head): a tile is up
// to AT_Q consecutive tokens of one sequence at consecutive positions; warp w owns its rows 16w..16w+15.
// For each run of AT_K key positions the block stages K and V in shared memory, and each warp computes
// S = q k^T with mma.sync m16n8k16 (float32 accumulate), masks it (causal, and the sliding window),
// keeps an online softmax per row in registers (FlashAttention-2's layout: a thread holds rows g and
// g + 8 of its warp's 16, columns 2t, 2t + 1 of each 8-column tile) and accumulates P V the same way.
// q and P are float32; each is split into a bf16 high part and the bf16 of the remainder, and both
// parts are multiplied (K and V are exact bf16 already), so the products carry about 16 bits of
// their float32 operands rather than bf16's 8: the result stays within float32 rounding of
// flash_attention_kernel's on the same cache (the kernel parity tests hold it to that).
constexpr int AT_Q = 64;
constexpr int AT_K = 64;

template <int HD>
__global__ void __launch_bounds__(128)
    attention_tiles_kernel(float *out, const float *q, const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, int heads,
                           int kv_heads, float scale, const int32_t *positions, const int32_t *seq_index,
                           const int32_t *bt, const int32_t *bt_off, int bs, int window, const int32_t *tiles) {
  pdl_enter();
  constexpr int LD = HD + 8;  // padded shared rows: the fragment loads below hit distinct banks
  constexpr int KS = HD / 16;
  constexpr int DN = HD / 8;
  constexpr int NT = AT_K / 8;
  __shared__ __align__(16) __nv_bfloat16 ks[AT_K * LD];
  __shared__ __align__(16) __nv_bfloat16 vs[AT_K * LD];
  const int t0 = tiles[2 * blockIdx.x], n = tiles[2 * blockIdx.x + 1];
  const int h = blockIdx.y, kvh = h / (heads / kv_heads);
  const int qw = heads * HD, kvw = kv_heads * HD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int p0 = positions[t0];
  const int32_t *table = bt + bt_off[seq_index[t0]];
  // The thread's two rows, clamped into the tile (rows past it compute a copy and are not stored).
  const int r0 = min(warp * 16 + g, n - 1), r1 = min(warp * 16 + g + 8, n - 1);
  const int pr0 = p0 + r0, pr1 = p0 + r1;
  const int lo0 = window > 0 ? max(0, pr0 - window + 1) : 0, lo1 = window > 0 ? max(0, pr1 - window + 1) : 0;
  const int wlast = p0 + min(warp * 16 + 15, n - 1);  // the warp's last row's position
  uint32_t qh[KS][4], ql[KS][4];
  {
    const float *q0 = q + static_cast<size_t>(t0 + r0) * qw + h * HD;
    const float *q1 = q + static_cast<size_t>(t0 + r1) * qw + h * HD;
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
      const int c = kk * 16 + 2 * tq;
      split_bf16x2(q0[c], q0[c + 1], qh[kk][0], ql[kk][0]);
      split_bf16x2(q1[c], q1[c + 1], qh[kk][1], ql[kk][1]);
      split_bf16x2(q0[c + 8], q0[c + 9], qh[kk][2], ql[kk][2]);
      split_bf16x2(q1[c + 8], q1[c + 9], qh[kk][3], ql[kk][3]);
    }
  }
  float o[DN][4];
#pragma unroll
  for (int d = 0; d < DN; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  const int last = p0 + n - 1;
  const int first = window > 0 ? max(0, p0 - window + 1) : 0;
  for (int kv0 = first; kv0 <= last; kv0 += AT_K) {
    __syncthreads();  // the previous run's reads of ks and vs are done
    constexpr int VPR = HD / 8;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < AT_K * VPR; i += blockDim.x) {
      const int r = i / VPR, c = i % VPR, j = kv0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (j <= last) {
        const size_t off = (static_cast<size_t>(table[j / bs]) * bs + j % bs) * kvw + static_cast<size_t>(kvh) * HD;
        kv = __ldg(reinterpret_cast<const uint4 *>(kc + off) + c);
        vv = __ldg(reinterpret_cast<const uint4 *>(vc + off) + c);
      }
      *reinterpret_cast<uint4 *>(&ks[r * LD + c * 8]) = kv;
      *reinterpret_cast<uint4 *>(&vs[r * LD + c * 8]) = vv;
    }
    __syncthreads();
    if (wlast < kv0) continue;  // every row of the warp precedes this run: all masked
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const __nv_bfloat16 *kr = ks + (j * 8 + g) * LD + 2 * tq;
#pragma unroll
      for (int kk = 0; kk < KS; kk++) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t *>(kr + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t *>(kr + kk * 16 + 8);
        mma_bf16_16816(s[j], qh[kk], b0, b1);
        mma_bf16_16816(s[j], ql[kk], b0, b1);
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; j++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int c = kv0 + j * 8 + 2 * tq + e;
        s[j][e] = c <= pr0 && c >= lo0 ? s[j][e] * scale : -INFINITY;
        s[j][2 + e] = c <= pr1 && c >= lo1 ? s[j][2 + e] * scale : -INFINITY;
        mx0 = fmaxf(mx0, s[j][e]);
        mx1 = fmaxf(mx1, s[j][2 + e]);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // A row with nothing unmasked yet keeps m = -inf; subtracting 0 then keeps exp(-inf) = 0.
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
    const float c0 = expf(m0 - mu0), c1 = expf(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    l0 *= c0;
    l1 *= c1;
#pragma unroll
    for (int d = 0; d < DN; d++) {
      o[d][0] *= c0;
      o[d][1] *= c0;
      o[d][2] *= c1;
      o[d][3] *= c1;
    }
#pragma unroll
    for (int j = 0; j < NT; j++) {
      s[j][0] = expf(s[j][0] - mu0);
      s[j][1] = expf(s[j][1] - mu0);
      s[j][2] = expf(s[j][2] - mu1);
      s[j][3] = expf(s[j][3] - mu1);
      l0 += s[j][0] + s[j][1];
      l1 += s[j][2] + s[j][3];
    }
#pragma unroll
    for (int kk = 0; kk < AT_K / 16; kk++) {
      uint32_t ah[4], al[4];
      split_bf16x2(s[2 * kk][0], s[2 * kk][1], ah[0], al[0]);
      split_bf16x2(s[2 * kk][2], s[2 * kk][3], ah[1], al[1]);
      split_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1], ah[2], al[2]);
      split_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3], ah[3], al[3]);
      const __nv_bfloat16 *vr = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
      for (int dp = 0; dp < DN / 2; dp++) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_trans(b0, b1, b2, b3, vr + dp * 16);
        mma_bf16_16816(o[2 * dp], ah, b0, b1);
        mma_bf16_16816(o[2 * dp], al, b0, b1);
        mma_bf16_16816(o[2 * dp + 1], ah, b2, b3);
        mma_bf16_16816(o[2 * dp + 1], al, b2, b3);
      }
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const int row0 = warp * 16 + g, row1 = row0 + 8;
#pragma unroll
  for (int d = 0; d < DN; d++) {
    const int c = h * HD + d * 8 + 2 * tq;
    if (row0 < n) {
      float *orow = out + static_cast<size_t>(t0 + row0) * qw + c;
      orow[0] = o[d][0] / l0;
      orow[1] = o[d][1] / l0;
    }
    if (row1 < n) {
      float *orow = out + static_cast<size_t>(t0 + row1) * qw + c;
      orow[0] = o[d][2] / l1;
      orow[1] = o[d][3] / l1;
    }
  }
}

// Merges the splits' partials of one (token, head).
__global__ void attention_combine_kernel(float *out, const float *part, int heads, int hd, int splits) {
  pdl_enter();
  const int t = blockIdx.x, h = blockIdx.y;
  const float *pr = part + (static_cast<size_t>(t) * heads + h) * splits * (hd + 4);
  float M = -INFINITY;
  for (int s = 0; s < splits; s++)
    if (pr[s * (hd + 4) + 1] > 0.f) M = fmaxf(M, pr[s * (hd + 4)]);
  float *orow = out + (static_cast<size_t>(t) * heads + h) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float L = 0.f, o = 0.f;
    for (int s = 0; s < splits; s++) {
      const float *ps = pr + s * (hd + 4);
      if (ps[1] <= 0.f) continue;  // a split past the token's position
      const float c = expf(ps[0] - M);
      L += ps[1] * c;
      o += ps[4 + d] * c;
    }
    orow[d] = o / L;
  }
}

// The vector kernel when the shapes allow (rows may alias out: each block reads its row before it
// writes it, and only its own row), else the scalar one.
int rmsnorm_launch(float *out, __nv_bfloat16 *ob, const float *x, const float *w, int rows, int d, float eps,
                   cudaStream_t s) {
  const int threads = d <= 1024 * RMS_VEC ? 256 : 1024;
  if (d % 4 == 0 && d <= 4 * RMS_VEC * threads && aligned16(out) && aligned16(x) && aligned16(w) &&
      (ob == nullptr || (reinterpret_cast<uintptr_t>(ob) & 3) == 0)) {
    const int t = min(threads, max(32, ((d / 4 + RMS_VEC - 1) / RMS_VEC + 31) / 32 * 32));
    launch_k(rmsnorm_vec_kernel, rows, t, 0, s, out, ob, x, w, d, eps);
  } else {
    launch_k(rmsnorm_kernel, rows, 256, 0, s, out, ob, x, w, d, eps);
  }
  return launched();
}

int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0)
      n = v;
    else
      n = 1;
  }
  return n;
}

// Query heads per flash block: the largest of 4, 2, 1 that divides the group.
inline int flash_gb(int heads, int kv_heads) {
  const int g = heads / kv_heads;
  return g % 4 == 0 ? 4 : g % 2 == 0 ? 2 : 1;
}

// The context split for a launch: with fixed_chunk > 0, chunks of that many positions (what a token
// computes then depends on its own context only, not on the batch); otherwise enough blocks for
// about eight per SM, chunks of at least 32 positions.
inline void flash_split(int tokens, int heads, int kv_heads, int max_ctx, int fixed_chunk, int *splits, int *chunk) {
  if (fixed_chunk > 0 && max_ctx > 0) {
    *chunk = fixed_chunk;
    *splits = (max_ctx + fixed_chunk - 1) / fixed_chunk;
    return;
  }
  const long blocks = static_cast<long>(tokens) * (heads / flash_gb(heads, kv_heads));
  int s = 1;
  if (max_ctx > 0) {
    const long want = (8L * sm_count() + blocks - 1) / blocks;
    const int most = (max_ctx + 31) / 32;
    s = static_cast<int>(want < most ? want : most);
    if (s < 1) s = 1;
    if (s > 64) s = 64;
  }
  if (s == 1 || max_ctx <= 0) {
    *splits = 1;
    *chunk = 1 << 30;
    return;
  }
  int c = (max_ctx + s - 1) / s;
  c = (c + FA_P * FA_WARPS - 1) / (FA_P * FA_WARPS) * (FA_P * FA_WARPS);
  *chunk = c;
  *splits = (max_ctx + c - 1) / c;
}

constexpr int SGMV_RANK_ROWS = 8;  // shrink: rank rows per block, one warp each

template <typename W>
__global__ void sgmv_shrink_f32_kernel(float *v, int ldv, const float *x, int in, const void *const *a_ptrs,
                                       const int32_t *ranks, const int32_t *tok_seg) {
  pdl_enter();
  const int t = blockIdx.x;
  const int s = tok_seg[t];
  if (s < 0) return;
  const W *A = static_cast<const W *>(a_ptrs[s]);
  const int rr = blockIdx.y * SGMV_RANK_ROWS + (threadIdx.x >> 5);
  if (A == nullptr || rr >= ranks[s]) return;
  const int lane = threadIdx.x & 31;
  const float *xr = x + static_cast<size_t>(t) * in;
  const W *ar = A + static_cast<size_t>(rr) * in;
  float sum = 0.f;
  for (int k = lane; k < in; k += 32) sum += xr[k] * ld(ar, k);
  sum = warp_sum(sum);
  if (lane == 0) v[static_cast<size_t>(t) * ldv + rr] = sum;
}

template <typename W>
__global__ void sgmv_expand_f32_kernel(float *y, int out, const float *v, int ldv, const void *const *b_ptrs,
                                       const int32_t *ranks, const float *scales, const int32_t *tok_seg) {
  pdl_enter();
  const int t = blockIdx.x;
  const int s = tok_seg[t];
  if (s < 0) return;
  const W *B = static_cast<const W *>(b_ptrs[s]);
  const int r = ranks[s];
  const int o = blockIdx.y * blockDim.x + threadIdx.x;
  if (B == nullptr || r == 0 || o >= out) return;
  const float *vr = v + static_cast<size_t>(t) * ldv;
  const W *br = B + static_cast<size_t>(o) * r;
  float sum = 0.f;
  for (int k = 0; k < r; k++) sum += vr[k] * ld(br, k);
  y[static_cast<size_t>(t) * out + o] += sum * scales[s];
}


// GEMV for decode batches of at most GEMV_MAX_T tokens: out[t, n] (+)= sum_k x[t, k] W[n, k] with W
// and x bf16, float32 accumulation. One warp per output row; each lane streams 16-byte chunks of
// the row (four loads in flight, bypassing L1) and reads the matching x chunks (small, cached). The
// N output rows are split over up to three destinations in order (a packed q/k/v or gate/up weight
// writing its parts straight into their tensors).
constexpr int GEMV_MAX_T = 8;
constexpr int GEMV_WARPS = 8;

struct GemvOut {
  float *p[3];
  int cols[3];
};

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  const __nv_bfloat162 *wp = reinterpret_cast<const __nv_bfloat162 *>(&w);
  const __nv_bfloat162 *xp = reinterpret_cast<const __nv_bfloat162 *>(&x);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 a = __bfloat1622float2(wp[i]), b = __bfloat1622float2(xp[i]);
    s = fmaf(a.x, b.x, s);
    s = fmaf(a.y, b.y, s);
  }
  return s;
}

__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// With L, the kernel adds the LoRA update lt in its epilogue and reads x before waiting on the kernel
// before it (the shrink writing lt.v, which starts its dependents only after its own wait), v after.
template <int T, bool L>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16_kernel(const __nv_bfloat16 *__restrict__ w, const __nv_bfloat16 *__restrict__ x, int K, int N,
                     GemvOut o, int accumulate, lp_lora_tail lt) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * GEMV_WARPS + warp;
  if (n >= N) return;
  const int kv = K >> 3;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + static_cast<size_t>(n) * K);
  const uint4 *xr = reinterpret_cast<const uint4 *>(x);
  float a[T];
#pragma unroll
  for (int t = 0; t < T; t++) a[t] = 0.f;
  int i = lane;
  // The weights are never written by kernels: the first chunks stream in before waiting for the
  // kernel that writes x, and each iteration requests the next chunks before using the current ones.
  uint4 w0, w1, w2, w3;
  if (i + 96 < kv) {
    w0 = ld_stream(wr + i), w1 = ld_stream(wr + i + 32), w2 = ld_stream(wr + i + 64), w3 = ld_stream(wr + i + 96);
  }
  if (L)
    pdl_launch_dependents();
  else
    pdl_enter();
  for (; i + 96 < kv; i += 128) {
    const uint4 c0 = w0, c1 = w1, c2 = w2, c3 = w3;
    if (i + 224 < kv) {
      w0 = ld_stream(wr + i + 128), w1 = ld_stream(wr + i + 160), w2 = ld_stream(wr + i + 192),
      w3 = ld_stream(wr + i + 224);
    }
#pragma unroll
    for (int t = 0; t < T; t++) {
      const uint4 *xt = xr + static_cast<size_t>(t) * kv;
      a[t] += dot8(c0, __ldg(xt + i)) + dot8(c1, __ldg(xt + i + 32)) + dot8(c2, __ldg(xt + i + 64)) +
              dot8(c3, __ldg(xt + i + 96));
    }
  }
  for (; i < kv; i += 32) {
    const uint4 w0 = ld_stream(wr + i);
#pragma unroll
    for (int t = 0; t < T; t++) a[t] += dot8(w0, __ldg(xr + static_cast<size_t>(t) * kv + i));
  }
  // Every lane holds the sums after warp_sum; lane t stores token t's.
  float sum = 0.f;
#pragma unroll
  for (int t = 0; t < T; t++) {
    a[t] = warp_sum(a[t]);
    if (lane == t) sum = a[t];
  }
  if (lane >= T) return;
  int part = 0, col = n;
  while (part < 2 && col >= o.cols[part]) col -= o.cols[part++];
  float *d = o.p[part] + static_cast<size_t>(lane) * o.cols[part] + col;
  if (L) {
    const LoraCol l = lora_col(lt.g, lt.tok_seg[lane], n, lt.max_rank);
    pdl_wait();
    *d = lora_add(l, lt.v + static_cast<size_t>(lane) * lt.ldv, accumulate ? *d + sum : sum);
    return;
  }
  *d = accumulate ? *d + sum : sum;
}

// Tensor-core GEMM for small steps and the batch-invariant mode: out[m, n] (+)= sum_k x[m, k] W[n, k],
// x and W bf16, float32 accumulation, the N output columns split over up to three destinations as in
// the GEMV. Every block streams its SK_COLS rows of W once (16-byte loads that bypass L1, the next chunk
// in flight while the current one multiplies, the first chunk requested before the wait on the
// previous kernel) and multiplies them against up to 64 rows of x with mma.sync m16n8k16. Fragments
// come straight from global memory: the sum over k does not care which k a lane feeds in which mma
// slot as long as A and B agree, so lane (g, t) takes, per 64-wide chunk and per 16-byte piece i, the
// 8 consecutive elements 32i + 8t .. 32i + 8t + 7 of its row and feeds elements 0-3 to one k-step and
// 4-7 to the next (elements 0-1 as k = 2t, 2t+1 and 2-3 as k = 2t+8, 2t+9). The block's warps take
// its chunks in turn (chunk c to warp c % SK_WARPS) and add their partial sums in shared memory in
// warp order, so a row's result depends on K alone: never on how many rows share the launch, which
// row it is, or grid.y (slices of 64 rows). The default mode takes it for 3-16 rows on narrow, short
// weights; past 16 rows cuBLAS is faster (each block here re-reads all of x from L2), see
// TestGEMMBench in docs/benchmarks-cuda.md.
constexpr int SK_WARPS = 8;
constexpr int SK_COLS = 16;
constexpr int SK_CH = 64;
constexpr int SK_MAX_T = 64;

__device__ __forceinline__ uint4 ld_if(const uint4 *p, bool ok) {
  return ok ? __ldg(p) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ uint4 ld_stream_if(const uint4 *p, bool ok) {
  return ok ? ld_stream(p) : make_uint4(0, 0, 0, 0);
}

// Two blocks per SM for up to 32 rows (the register cap keeps 16 warps' loads in flight). With L, the
// LoRA epilogue as in gemv_bf16_kernel (x read before the wait, v after).
template <int MT, bool L>
__global__ void __launch_bounds__(SK_WARPS * 32, MT <= 2 ? 2 : 1)
    gemm_skinny_kernel(const __nv_bfloat16 *__restrict__ w, const __nv_bfloat16 *__restrict__ x, int M, int K,
                       int N, GemvOut o, int accumulate, lp_lora_tail lt) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int n0 = blockIdx.x * SK_COLS;
  const int m0 = blockIdx.y * SK_MAX_T;
  // This lane's two weight rows (one per n8 tile); a row past N reads row N-1 and is not stored.
  const uint4 *w0 = reinterpret_cast<const uint4 *>(w + static_cast<size_t>(min(n0 + g, N - 1)) * K);
  const uint4 *w1 = reinterpret_cast<const uint4 *>(w + static_cast<size_t>(min(n0 + 8 + g, N - 1)) * K);
  const int chunks = (K + SK_CH - 1) / SK_CH;
  float acc[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
      for (int r = 0; r < 4; r++) acc[mt][nt][r] = 0.f;
  // The lane's 16-byte pieces of chunk c: element c * SK_CH + 32 i + 8 t4 (i = 0, 1), zero past K.
  auto piece = [&](int c, int i) { return c * SK_CH + 32 * i + 8 * t4; };
  // load_w streams the lane's pieces of chunk c of its two weight rows into wn.
  uint4 wn[2][2];
  auto load_w = [&](int c) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int e = piece(c, i);
      wn[0][i] = ld_stream_if(w0 + e / 8, e < K);
      wn[1][i] = ld_stream_if(w1 + e / 8, e < K);
    }
  };
  int c = warp;
  if (c < chunks) load_w(c);
  if (L)
    pdl_launch_dependents();
  else
    pdl_enter();
  for (; c < chunks; c += SK_WARPS) {
    uint4 wc[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
      for (int i = 0; i < 2; i++) wc[nt][i] = wn[nt][i];
    if (c + SK_WARPS < chunks) load_w(c + SK_WARPS);
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int e = piece(c, i);
      uint4 xa[MT], xb[MT];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const int ra = m0 + mt * 16 + g, rb = ra + 8;
        xa[mt] = ld_if(reinterpret_cast<const uint4 *>(x + static_cast<size_t>(ra) * K + e), ra < M && e < K);
        xb[mt] = ld_if(reinterpret_cast<const uint4 *>(x + static_cast<size_t>(rb) * K + e), rb < M && e < K);
      }
#pragma unroll
      for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          const uint32_t a[4] = {h ? xa[mt].z : xa[mt].x, h ? xb[mt].z : xb[mt].x, h ? xa[mt].w : xa[mt].y,
                                 h ? xb[mt].w : xb[mt].y};
#pragma unroll
          for (int nt = 0; nt < 2; nt++)
            mma_bf16_16816(acc[mt][nt], a, h ? wc[nt][i].z : wc[nt][i].x, h ? wc[nt][i].w : wc[nt][i].y);
        }
      }
    }
  }
  // Partial sums per warp, then each output summed over the warps in warp order.
  __shared__ float red[SK_WARPS][MT * 16][SK_COLS + 1];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
      const int col = nt * 8 + 2 * t4, row = mt * 16 + g;
      red[warp][row][col] = acc[mt][nt][0];
      red[warp][row][col + 1] = acc[mt][nt][1];
      red[warp][row + 8][col] = acc[mt][nt][2];
      red[warp][row + 8][col + 1] = acc[mt][nt][3];
    }
  __syncthreads();
  if (L) pdl_wait();
  for (int idx = threadIdx.x; idx < MT * 16 * SK_COLS; idx += SK_WARPS * 32) {
    const int row = idx / SK_COLS, col = idx % SK_COLS;
    const int m = m0 + row, n = n0 + col;
    if (m >= M || n >= N) continue;
    float s = 0.f;
#pragma unroll
    for (int ww = 0; ww < SK_WARPS; ww++) s += red[ww][row][col];
    int part = 0, cc = n;
    while (part < 2 && cc >= o.cols[part]) cc -= o.cols[part++];
    float *d = o.p[part] + static_cast<size_t>(m) * o.cols[part] + cc;
    s = accumulate ? *d + s : s;
    if (L) s = lora_add(lora_col(lt.g, lt.tok_seg[m], n, lt.max_rank), lt.v + static_cast<size_t>(m) * lt.ldv, s);
    *d = s;
  }
}

// lora_check validates a LoRA update of g's modules into outputs of total columns (lp_lora_tail,
// lp_split_cols_lora).
int lora_check(const lp_sgmv_group *g, const float *v, int ldv, const int32_t *tok_seg, int max_rank, int total) {
  if (g == nullptr || g->modules < 1 || g->modules > LP_SGMV_GROUP || v == nullptr || tok_seg == nullptr || max_rank < 0 ||
      max_rank > LP_MAX_RANK)
    return LP_ERR_INVALID;
  for (int m = 0; m < g->modules; m++) {
    if (g->ptrs[m] == nullptr || g->ranks[m] == nullptr || g->scales[m] == nullptr || g->cols[m] < 0 || g->y_off[m] < 0 ||
        g->y_off[m] + g->cols[m] > total || g->v_off[m] < 0 || g->v_off[m] + max_rank > ldv)
      return LP_ERR_INVALID;
  }
  return LP_OK;
}

// small_launch queues a small-step matmul kernel (gemv_bf16_kernel or gemm_skinny_kernel, both of
// 8 warps), the instance with the LoRA epilogue when lora is set.
static_assert(GEMV_WARPS == SK_WARPS, "one block size for the small-step matmuls");
template <typename... KArgs, typename... Args>
void small_launch(void (*plain)(KArgs...), void (*with_lora)(KArgs...), dim3 grid, cudaStream_t s,
                  const lp_lora_tail *lora, Args... args) {
  if (lora != nullptr)
    launch_k(with_lora, grid, GEMV_WARPS * 32, 0, s, args..., *lora);
  else
    launch_k(plain, grid, GEMV_WARPS * 32, 0, s, args..., lp_lora_tail{});
}

template <typename KV>
void kv_write_launch(KV *kc, KV *vc, const float *k, const float *v, int tokens, int kvw, const int32_t *positions,
                     const int32_t *seq_index, const int32_t *bt, const int32_t *bt_off, int bs, cudaStream_t s) {
  const bool vec = kvw % 4 == 0 && aligned16(kc) && aligned16(vc) && aligned16(k) && aligned16(v);
  if (vec)
    launch_k(kv_write_kernel<KV>, dim3(tokens, (kvw / 4 + 127) / 128), 128, 0, s, kc, vc, k, v, kvw, positions,
             seq_index, bt, bt_off, bs);
  else
    launch_k(kv_write_scalar_kernel<KV>, tokens, 128, 0, s, kc, vc, k, v, kvw, positions, seq_index, bt, bt_off, bs);
}

template <typename KV>
int attention_launch(float *out, const float *q, const KV *kc, const KV *vc, int tokens, int heads, int kv_heads,
                     int head_dim, float scale, const int32_t *positions, const int32_t *seq_index,
                     const int32_t *bt, const int32_t *bt_off, int bs, int max_ctx, int window, int split_chunk,
                     void *workspace, size_t workspace_bytes, cudaStream_t s) {
  const bool aligned = head_dim % 4 == 0 &&
                       ((reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(q) |
                         reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc)) &
                        15) == 0;
  if (aligned) {
    int splits = 1, chunk = 1 << 30;
    if (workspace != nullptr && max_ctx > 0 &&
        lp_attention_workspace(tokens, heads, kv_heads, head_dim, max_ctx, split_chunk) <= workspace_bytes &&
        (reinterpret_cast<uintptr_t>(workspace) & 15) == 0)
      flash_split(tokens, heads, kv_heads, max_ctx, split_chunk, &splits, &chunk);
    float *part = static_cast<float *>(workspace);
    const int gb = flash_gb(heads, kv_heads);
    const dim3 grid(tokens, heads / gb, splits);
    // Up to FA_CLUSTER splits merge inside a cluster of their blocks (cluster_merge), with no
    // second kernel, where the grid has at most 4 blocks per SM; others in attention_combine_kernel.
    // On the H200 (TestAttentionBench, 16/8 heads of 128, 5 splits) the cluster merge took a
    // 1-sequence launch from 7.96 to 6.03 us and 8 sequences of 144 positions (320 blocks) from 9.48
    // to 8.58 us, but made 32 sequences (1280 blocks) 22-50% slower at every context: blocks that
    // wait for their cluster hold the GPU's slots longer than a second kernel costs.
    const long long blocks = static_cast<long long>(tokens) * (heads / gb) * splits;
    const bool cm = splits > 1 && splits <= FA_CLUSTER && blocks <= 4LL * sm_count() && clusters_ok();
#define LP_FA(NV, GB)                                                                                                \
  do {                                                                                                               \
    if (cm) {                                                                                                        \
      if (const int c = launch_cluster(flash_attention_kernel<NV, GB, KV, true>, grid, dim3(FA_WARPS * 32),          \
                                       dim3(1, 1, splits), s, out, part, q, kc, vc, heads, kv_heads, head_dim, scale, \
                                       positions, seq_index, bt, bt_off, bs, chunk, splits, window);                 \
          c != LP_OK)                                                                                                \
        return c;                                                                                                    \
    } else {                                                                                                         \
      launch_k(flash_attention_kernel<NV, GB, KV>, grid, FA_WARPS * 32, 0, s, out, part, q, kc, vc, heads, kv_heads, \
               head_dim, scale, positions, seq_index, bt, bt_off, bs, chunk, splits, window);                        \
    }                                                                                                                \
  } while (0)
    if (head_dim <= 128) {
      if (gb == 4)
        LP_FA(1, 4);
      else if (gb == 2)
        LP_FA(1, 2);
      else
        LP_FA(1, 1);
    } else {
      if (gb == 4)
        LP_FA(2, 4);
      else if (gb == 2)
        LP_FA(2, 2);
      else
        LP_FA(2, 1);
    }
#undef LP_FA
    if (splits > 1 && !cm) {
      int c = launched();
      if (c != LP_OK) return c;
      launch_k(attention_combine_kernel, dim3(tokens, heads), 128, 0, s, out, part, heads, head_dim, splits);
    }
    return launched();
  }
  const dim3 grid(tokens, heads);
#define LP_ATT(DPL)                                                                                                \
  launch_k(attention_kernel<DPL, KV>, grid, ATT_WARPS * 32, 0, s, out, q, kc, vc, heads, kv_heads, head_dim, scale, \
           positions, seq_index, bt, bt_off, bs, window)
  if (head_dim <= 32)
    LP_ATT(1);
  else if (head_dim <= 64)
    LP_ATT(2);
  else if (head_dim <= 128)
    LP_ATT(4);
  else
    LP_ATT(8);
#undef LP_ATT
  return launched();
}

}  // namespace

extern "C" {

int lp_blas_create(lp_blas *blas, lp_stream stream) {
  if (blas == nullptr) return LP_ERR_INVALID;
  *blas = nullptr;
  cublasHandle_t h;
  int c = blas_code(cublasCreate(&h));
  if (c != LP_OK) return c;
  c = blas_code(cublasSetStream(h, cs(stream)));
  if (c != LP_OK) {
    cublasDestroy(h);
    return c;
  }
  *blas = new lp_blas_s{h};
  return LP_OK;
}

int lp_blas_destroy(lp_blas blas) {
  if (blas == nullptr) return LP_OK;
  int c = blas_code(cublasDestroy(blas->h));
  delete blas;
  return c;
}

int lp_gemm_ex(lp_blas blas, int dtype, float *out, int ldo, const void *x, const void *w, int tokens, int n, int k,
               int accumulate) {
  if (blas == nullptr || tokens < 0 || n < 0 || k < 0 || ldo < n) return LP_ERR_INVALID;
  cudaDataType_t ab;
  switch (dtype) {
    case LP_DTYPE_F32:
      ab = CUDA_R_32F;
      break;
    case LP_DTYPE_BF16:
      ab = CUDA_R_16BF;
      break;
    default:
      return LP_ERR_UNSUPPORTED;
  }
  if (tokens == 0 || n == 0) return LP_OK;
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  return blas_code(cublasGemmEx(blas->h, CUBLAS_OP_T, CUBLAS_OP_N, n, tokens, k, &alpha, w, ab, k, x, ab, k, &beta,
                                out, CUDA_R_32F, ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

int lp_gemv_bf16(float *out0, int n0, float *out1, int n1, float *out2, int n2, const void *x, const void *w,
                 int tokens, int k, int accumulate, const lp_lora_tail *lora, lp_stream stream) {
  if (tokens < 0 || k < 0 || n0 < 0 || n1 < 0 || n2 < 0 || x == nullptr || w == nullptr) return LP_ERR_INVALID;
  if ((n0 > 0 && out0 == nullptr) || (n1 > 0 && out1 == nullptr) || (n2 > 0 && out2 == nullptr)) return LP_ERR_INVALID;
  const int n = n0 + n1 + n2;
  if (lora != nullptr && lora_check(&lora->g, lora->v, lora->ldv, lora->tok_seg, lora->max_rank, n) != LP_OK)
    return LP_ERR_INVALID;
  if (tokens > GEMV_MAX_T || k % 8 != 0 || !aligned16(x) || !aligned16(w)) return LP_ERR_UNSUPPORTED;
  if (tokens == 0 || n == 0) return LP_OK;
  GemvOut o{{out0, out1, out2}, {n0, n1, n2}};
  const dim3 grid((n + GEMV_WARPS - 1) / GEMV_WARPS);
  const auto *wb = static_cast<const __nv_bfloat16 *>(w);
  const auto *xb = static_cast<const __nv_bfloat16 *>(x);
  cudaStream_t s = cs(stream);
  switch (tokens) {
#define LP_GEMV_CASE(T)                                                                                       \
  case T:                                                                                                     \
    small_launch(gemv_bf16_kernel<T, false>, gemv_bf16_kernel<T, true>, grid, s, lora, wb, xb, k, n, o, accumulate); \
    break;
    LP_GEMV_CASE(1)
    LP_GEMV_CASE(2)
    LP_GEMV_CASE(3)
    LP_GEMV_CASE(4)
    LP_GEMV_CASE(5)
    LP_GEMV_CASE(6)
    LP_GEMV_CASE(7)
    LP_GEMV_CASE(8)
#undef LP_GEMV_CASE
  }
  return launched();
}

int lp_gemm_skinny_bf16(float *out0, int n0, float *out1, int n1, float *out2, int n2, const void *x, const void *w,
                        int tokens, int k, int accumulate, const lp_lora_tail *lora, lp_stream stream) {
  if (tokens < 0 || k < 0 || n0 < 0 || n1 < 0 || n2 < 0 || x == nullptr || w == nullptr) return LP_ERR_INVALID;
  if ((n0 > 0 && out0 == nullptr) || (n1 > 0 && out1 == nullptr) || (n2 > 0 && out2 == nullptr)) return LP_ERR_INVALID;
  const int n = n0 + n1 + n2;
  if (lora != nullptr && lora_check(&lora->g, lora->v, lora->ldv, lora->tok_seg, lora->max_rank, n) != LP_OK)
    return LP_ERR_INVALID;
  if (k % 8 != 0 || !aligned16(x) || !aligned16(w)) return LP_ERR_UNSUPPORTED;
  if (tokens == 0 || n == 0 || k == 0) return LP_OK;
  GemvOut o{{out0, out1, out2}, {n0, n1, n2}};
  const int slices = (tokens + SK_MAX_T - 1) / SK_MAX_T;
  if (slices > 65535) return LP_ERR_INVALID;
  const dim3 grid((n + SK_COLS - 1) / SK_COLS, slices);
  const auto *wb = static_cast<const __nv_bfloat16 *>(w);
  const auto *xb = static_cast<const __nv_bfloat16 *>(x);
  cudaStream_t s = cs(stream);
  // Fewer m-tiles for a small step; a step of several slices uses all four in each (a row's sums are
  // the same either way).
  switch (slices > 1 ? 4 : (tokens + 15) / 16) {
#define LP_SKINNY_CASE(MT)                                                                                              \
  small_launch(gemm_skinny_kernel<MT, false>, gemm_skinny_kernel<MT, true>, grid, s, lora, wb, xb, tokens, k, n, o, \
               accumulate);                                                                                             \
  break;
    case 1:
      LP_SKINNY_CASE(1)
    case 2:
      LP_SKINNY_CASE(2)
    case 3:
      LP_SKINNY_CASE(3)
    default:
      LP_SKINNY_CASE(4)
#undef LP_SKINNY_CASE
  }
  return launched();
}

int lp_split_cols(const float *p, int rows, int ldp, float *out0, int n0, float *out1, int n1, float *out2, int n2,
                  lp_stream stream) {
  if (p == nullptr || rows < 0 || n0 < 0 || n1 < 0 || n2 < 0 || n0 + n1 + n2 > ldp) return LP_ERR_INVALID;
  if ((n0 > 0 && out0 == nullptr) || (n1 > 0 && out1 == nullptr) || (n2 > 0 && out2 == nullptr)) return LP_ERR_INVALID;
  const int total = n0 + n1 + n2;
  if (rows == 0 || total == 0) return LP_OK;
  const bool vec = ldp % 4 == 0 && n0 % 4 == 0 && n1 % 4 == 0 && n2 % 4 == 0 && aligned16(p) &&
                   (n0 == 0 || aligned16(out0)) && (n1 == 0 || aligned16(out1)) && (n2 == 0 || aligned16(out2));
  if (vec) {
    const dim3 grid(rows, (total / 4 + 255) / 256);
    launch_k(split_cols_kernel<float4>, grid, 256, 0, cs(stream), reinterpret_cast<const float4 *>(p), ldp / 4,
             reinterpret_cast<float4 *>(out0), n0 / 4, reinterpret_cast<float4 *>(out1), n1 / 4,
             reinterpret_cast<float4 *>(out2), n2 / 4);
    return launched();
  }
  const dim3 grid(rows, (total + 255) / 256);
  launch_k(split_cols_kernel<float>, grid, 256, 0, cs(stream), p, ldp, out0, n0, out1, n1, out2, n2);
  return launched();
}

int lp_split_cols_lora(const float *p, int rows, int ldp, float *out0, int n0, float *out1, int n1, float *out2, int n2,
                       const float *v, int ldv, const lp_sgmv_group *g, const int32_t *tok_seg, int max_rank,
                       lp_stream stream) {
  if (p == nullptr || rows < 0 || n0 < 0 || n1 < 0 || n2 < 0 || n0 + n1 + n2 > ldp) return LP_ERR_INVALID;
  if ((n0 > 0 && out0 == nullptr) || (n1 > 0 && out1 == nullptr) || (n2 > 0 && out2 == nullptr)) return LP_ERR_INVALID;
  const int total = n0 + n1 + n2;
  if (lora_check(g, v, ldv, tok_seg, max_rank, total) != LP_OK) return LP_ERR_INVALID;
  if (rows == 0 || total == 0) return LP_OK;
  const dim3 grid(rows, (total + 255) / 256);
  launch_k(split_lora_kernel, grid, 256, 0, cs(stream), p, ldp, out0, n0, out1, n1, out2, n2, v, ldv, *g, tok_seg, max_rank);
  return launched();
}

int lp_convert(int dst_dtype, void *dst, int src_dtype, const void *src, size_t n, lp_stream stream) {
  if (n == 0) return LP_OK;
  if (dst == nullptr || src == nullptr) return LP_ERR_INVALID;
  if (dst_dtype == LP_DTYPE_BF16 && src_dtype == LP_DTYPE_F32) {
    launch_k(f32_to_bf16_kernel, elem_blocks(n), 256, 0, cs(stream), static_cast<__nv_bfloat16 *>(dst),
                                                              static_cast<const float *>(src), n);
  } else if (dst_dtype == LP_DTYPE_F32 && src_dtype == LP_DTYPE_BF16) {
    launch_k(bf16_to_f32_kernel, elem_blocks(n), 256, 0, cs(stream), static_cast<float *>(dst),
                                                              static_cast<const __nv_bfloat16 *>(src), n);
  } else {
    return LP_ERR_UNSUPPORTED;
  }
  return launched();
}

int lp_gather_rows(int dtype, float *out, const void *table, const int32_t *rows, int num_rows, int width,
                   lp_stream stream) {
  if (num_rows < 0 || width < 0) return LP_ERR_INVALID;
  if (num_rows == 0 || width == 0) return LP_OK;
  switch (dtype) {
    case LP_DTYPE_F32:
      launch_k(gather_rows_kernel<float>, num_rows, 256, 0, cs(stream), out, static_cast<const float *>(table), rows, width);
      break;
    case LP_DTYPE_BF16:
      launch_k(gather_rows_kernel<__nv_bfloat16>, num_rows, 256, 0, cs(stream), out, static_cast<const __nv_bfloat16 *>(table), rows,
                                                           width);
      break;
    default:
      return LP_ERR_UNSUPPORTED;
  }
  return launched();
}

int lp_rmsnorm(float *out, const float *x, const float *w, int rows, int d, float eps, lp_stream stream) {
  if (rows < 0 || d <= 0) return LP_ERR_INVALID;
  if (rows == 0) return LP_OK;
  return rmsnorm_launch(out, nullptr, x, w, rows, d, eps, cs(stream));
}

int lp_rmsnorm_bf16(float *out, void *out_bf16, const float *x, const float *w, int rows, int d, float eps,
                    lp_stream stream) {
  if (rows < 0 || d <= 0) return LP_ERR_INVALID;
  if (rows == 0) return LP_OK;
  return rmsnorm_launch(out, static_cast<__nv_bfloat16 *>(out_bf16), x, w, rows, d, eps, cs(stream));
}

int lp_add(float *out, const float *a, const float *b, size_t n, lp_stream stream) {
  if (n == 0) return LP_OK;
  launch_k(add_kernel, elem_blocks(n), 256, 0, cs(stream), out, a, b, n);
  return launched();
}

int lp_silu_mul(float *out, const float *gate, const float *up, size_t n, lp_stream stream) {
  if (n == 0) return LP_OK;
  launch_k(silu_mul_kernel, elem_blocks(n), 256, 0, cs(stream), out, nullptr, gate, up, n);
  return launched();
}

int lp_silu_mul_bf16(float *out, void *out_bf16, const float *gate, const float *up, size_t n, lp_stream stream) {
  if (n == 0) return LP_OK;
  launch_k(silu_mul_kernel, elem_blocks(n), 256, 0, cs(stream), out, static_cast<__nv_bfloat16 *>(out_bf16), gate, up, n);
  return launched();
}

int lp_rope(float *x, int tokens, int heads, int head_dim, const float *inv_freq, const int32_t *positions,
            const int32_t *rope_set, lp_stream stream) {
  if (tokens < 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0) return LP_ERR_INVALID;
  if (tokens == 0) return LP_OK;
  const dim3 grid(tokens, (heads + ROPE_HEADS - 1) / ROPE_HEADS);
  launch_k(rope_kernel, grid, min(128, (head_dim / 2 + 31) / 32 * 32), 0, cs(stream), x, heads, head_dim, inv_freq, positions,
           rope_set);
  return launched();
}

int lp_rope_kv_write(int kv_dtype, float *q, float *k, const float *v, void *k_cache, void *v_cache, int tokens,
                     int heads, int kv_heads, int head_dim, const float *inv_freq, const int32_t *positions,
                     const int32_t *rope_set, const int32_t *seq_index, const int32_t *block_tables,
                     const int32_t *table_offsets,
                     int block_size, const lp_qkv_prep *prep, lp_stream stream) {
  if (tokens < 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || block_size <= 0)
    return LP_ERR_INVALID;
  if (kv_dtype != LP_DTYPE_F32 && kv_dtype != LP_DTYPE_BF16) return LP_ERR_INVALID;
  lp_qkv_prep pp = {};
  if (prep != nullptr) pp = *prep;
  if ((pp.q_norm != nullptr || pp.k_norm != nullptr) && !(pp.eps >= 0.f)) return LP_ERR_INVALID;
  if (tokens == 0) return LP_OK;
  const dim3 grid(tokens, (heads + kv_heads + ROPE_HEADS - 1) / ROPE_HEADS);
  const int threads = min(128, (head_dim / 2 + 31) / 32 * 32);
  if (kv_dtype == LP_DTYPE_BF16)
    launch_k(rope_kv_write_kernel<__nv_bfloat16>, grid, threads, 0, cs(stream), q, k, v,
             static_cast<__nv_bfloat16 *>(k_cache), static_cast<__nv_bfloat16 *>(v_cache), heads, kv_heads, head_dim,
             inv_freq, positions, rope_set, seq_index, block_tables, table_offsets, block_size, pp);
  else
    launch_k(rope_kv_write_kernel<float>, grid, threads, 0, cs(stream), q, k, v, static_cast<float *>(k_cache),
             static_cast<float *>(v_cache), heads, kv_heads, head_dim, inv_freq, positions, rope_set, seq_index,
             block_tables, table_offsets, block_size, pp);
  return launched();
}

int lp_kv_write(int kv_dtype, void *k_cache, void *v_cache, const float *k, const float *v, int tokens, int kv_width,
                const int32_t *positions, const int32_t *seq_index, const int32_t *block_tables,
                const int32_t *table_offsets, int block_size, lp_stream stream) {
  if (tokens < 0 || kv_width <= 0 || block_size <= 0) return LP_ERR_INVALID;
  if (kv_dtype != LP_DTYPE_F32 && kv_dtype != LP_DTYPE_BF16) return LP_ERR_INVALID;
  if (tokens == 0) return LP_OK;
  if (kv_dtype == LP_DTYPE_BF16)
    kv_write_launch(static_cast<__nv_bfloat16 *>(k_cache), static_cast<__nv_bfloat16 *>(v_cache), k, v, tokens,
                    kv_width, positions, seq_index, block_tables, table_offsets, block_size, cs(stream));
  else
    kv_write_launch(static_cast<float *>(k_cache), static_cast<float *>(v_cache), k, v, tokens, kv_width, positions,
                    seq_index, block_tables, table_offsets, block_size, cs(stream));
  return launched();
}

int lp_add_bias(float *x, const float *bias, int rows, int n, lp_stream stream) {
  if (rows < 0 || n <= 0) return LP_ERR_INVALID;
  if (rows == 0) return LP_OK;
  const size_t total = static_cast<size_t>(rows) * n;
  launch_k(add_bias_kernel, elem_blocks(total), 256, 0, cs(stream), x, bias, n, total);
  return launched();
}

size_t lp_attention_workspace(int tokens, int heads, int kv_heads, int head_dim, int max_ctx, int split_chunk) {
  if (tokens <= 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0 || max_ctx <= 0 ||
      split_chunk < 0)
    return 0;
  int splits, chunk;
  flash_split(tokens, heads, kv_heads, max_ctx, split_chunk, &splits, &chunk);
  if (splits == 1) return 0;
  return static_cast<size_t>(tokens) * heads * splits * (head_dim + 4) * sizeof(float);
}

int lp_attention(int kv_dtype, float *out, const float *q, const void *k_cache, const void *v_cache, int tokens,
                 int heads, int kv_heads, int head_dim, float scale, const int32_t *positions,
                 const int32_t *seq_index, const int32_t *block_tables, const int32_t *table_offsets, int block_size,
                 int max_ctx, int window, int split_chunk, void *workspace, size_t workspace_bytes,
                 lp_stream stream) {
  if (tokens < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim <= 0 || block_size <= 0 ||
      window < 0 || split_chunk < 0 || split_chunk % (FA_P * FA_WARPS) != 0)
    return LP_ERR_INVALID;
  if (kv_dtype != LP_DTYPE_F32 && kv_dtype != LP_DTYPE_BF16) return LP_ERR_INVALID;
  if (head_dim > 256) return LP_ERR_UNSUPPORTED;
  if (tokens == 0) return LP_OK;
  if (kv_dtype == LP_DTYPE_BF16)
    return attention_launch(out, q, static_cast<const __nv_bfloat16 *>(k_cache),
                            static_cast<const __nv_bfloat16 *>(v_cache), tokens, heads, kv_heads, head_dim, scale,
                            positions, seq_index, block_tables, table_offsets, block_size, max_ctx, window,
                            split_chunk, workspace, workspace_bytes, cs(stream));
  return attention_launch(out, q, static_cast<const float *>(k_cache), static_cast<const float *>(v_cache), tokens,
                          heads, kv_heads, head_dim, scale, positions, seq_index, block_tables, table_offsets,
                          block_size, max_ctx, window, split_chunk, workspace, workspace_bytes, cs(stream));
}

int lp_attention_tiles(float *out, const float *q, const void *k_cache, const void *v_cache, int heads, int kv_heads,
                       int head_dim, float scale, const int32_t *positions, const int32_t *seq_index,
                       const int32_t *block_tables, const int32_t *table_offsets, int block_size, int window,
                       const int32_t *tiles, int num_tiles, lp_stream stream) {
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || block_size <= 0 || window < 0 || num_tiles < 0)
    return LP_ERR_INVALID;
  if (num_tiles == 0) return LP_OK;
  const dim3 grid(num_tiles, heads);
  const auto *kc = static_cast<const __nv_bfloat16 *>(k_cache);
  const auto *vc = static_cast<const __nv_bfloat16 *>(v_cache);
  switch (head_dim) {
    case 32:
      launch_k(attention_tiles_kernel<32>, grid, 128, 0, cs(stream), out, q, kc, vc, heads, kv_heads, scale, positions,
               seq_index, block_tables, table_offsets, block_size, window, tiles);
      break;
    case 64:
      launch_k(attention_tiles_kernel<64>, grid, 128, 0, cs(stream), out, q, kc, vc, heads, kv_heads, scale, positions,
               seq_index, block_tables, table_offsets, block_size, window, tiles);
      break;
    case 128:
      launch_k(attention_tiles_kernel<128>, grid, 128, 0, cs(stream), out, q, kc, vc, heads, kv_heads, scale, positions,
               seq_index, block_tables, table_offsets, block_size, window, tiles);
      break;
    default:
      return LP_ERR_UNSUPPORTED;
  }
  return launched();
}

int lp_sgmv_shrink_f32(int wdtype, float *v, int ldv, const float *x, int in_features, const void *const *a_ptrs,
                       const int32_t *ranks, const int32_t *tok_seg, int tokens, int max_rank, lp_stream stream) {
  if (tokens < 0 || max_rank < 0 || ldv < max_rank || in_features <= 0) return LP_ERR_INVALID;
  if (tokens == 0 || max_rank == 0) return LP_OK;
  const dim3 grid(tokens, (max_rank + SGMV_RANK_ROWS - 1) / SGMV_RANK_ROWS);
  switch (wdtype) {
    case LP_DTYPE_F32:
      launch_k(sgmv_shrink_f32_kernel<float>, grid, SGMV_RANK_ROWS * 32, 0, cs(stream), v, ldv, x, in_features, a_ptrs,
                                                                                ranks, tok_seg);
      break;
    case LP_DTYPE_BF16:
      launch_k(sgmv_shrink_f32_kernel<__nv_bfloat16>, grid, SGMV_RANK_ROWS * 32, 0, cs(stream), 
          v, ldv, x, in_features, a_ptrs, ranks, tok_seg);
      break;
    default:
      return LP_ERR_UNSUPPORTED;
  }
  return launched();
}

int lp_sgmv_expand_f32(int wdtype, float *y, int out_features, const float *v, int ldv, const void *const *b_ptrs,
                       const int32_t *ranks, const float *scales, const int32_t *tok_seg, int tokens, int max_rank,
                       lp_stream stream) {
  if (tokens < 0 || max_rank < 0 || ldv < max_rank || out_features <= 0) return LP_ERR_INVALID;
  if (tokens == 0 || max_rank == 0) return LP_OK;
  const dim3 grid(tokens, (out_features + 255) / 256);
  switch (wdtype) {
    case LP_DTYPE_F32:
      launch_k(sgmv_expand_f32_kernel<float>, grid, 256, 0, cs(stream), y, out_features, v, ldv, b_ptrs, ranks, scales,
                                                                  tok_seg);
      break;
    case LP_DTYPE_BF16:
      launch_k(sgmv_expand_f32_kernel<__nv_bfloat16>, grid, 256, 0, cs(stream), y, out_features, v, ldv, b_ptrs, ranks,
                                                                          scales, tok_seg);
      break;
    default:
      return LP_ERR_UNSUPPORTED;
  }
  return launched();
}

}  // extern "C"
