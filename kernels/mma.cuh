// mma.cuh: warp-level tensor-core helpers shared by the kernels (sm_80 and later): bf16 pairs packed
// as mma operands, the m16n8k16 bf16 mma with float32 accumulation, and ldmatrix. Fragment layouts
// (PTX ISA, mma.m16n8k16): with g = lane / 4 and t = lane % 4, A (16x16, row-major) holds rows g and
// g + 8 at columns 2t, 2t + 1 and 2t + 8, 2t + 9; B (16x8, k x n) holds k = 2t, 2t + 1 and 2t + 8,
// 2t + 9 at column g; C (16x8) holds rows g and g + 8 at columns 2t, 2t + 1.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

static __device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t *>(&v); }

// hi = bf16(a, b), lo = bf16 of what hi leaves out; the first value in the low half, as mma wants.
static __device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t &hi, uint32_t &lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  hi = bf16x2_bits(h);
  lo = bf16x2_bits(__floats2bfloat162_rn(a - hf.x, b - hf.y));
}

static __device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void ldsm_x4_trans(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

