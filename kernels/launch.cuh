// launch.cuh: programmatic dependent launch (Hopper), shared by forward.cu and sgmv.cu.
//
// Every kernel of the library is launched with it (launch_k), so in a stream or a recorded graph the
// next kernel's blocks are scheduled while the one before drains. A kernel waits (pdl_wait,
// griddepcontrol.wait) until the kernel before it has completed and its writes are visible before it
// reads anything a kernel writes; only weights and the batch description (uploaded before a step's
// first kernel) may be read earlier. pdl_launch_dependents lets the next kernel's blocks start.
// Most kernels do both on entry (pdl_enter), so when a kernel starts, every kernel before the one it
// follows has completed. Both are no-ops before sm_90 and for launches made without the attribute;
// lp_set_pdl(0) (runtime.cu) turns the attribute off.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "loraplex_kernels.h"

// The process-wide switch (runtime.cu, lp_set_pdl).
extern int lp_pdl_enabled;

static __device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

static __device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static __device__ __forceinline__ void pdl_enter() {
  pdl_wait();
  pdl_launch_dependents();
}

// launch_k launches kernel as a programmatic dependent of the previous kernel in stream s, plainly
// where the attribute is off or refused.
template <typename... KArgs, typename... Args>
static void launch_k(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args &&...args) {
  if (lp_pdl_enabled) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...) == cudaSuccess) return;
    cudaGetLastError();  // refused: launch plainly
  }
  kernel<<<grid, block, smem, s>>>(std::forward<Args>(args)...);
}

// launched is the last launch's error, LP_OK when none.
static inline int launched() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? LP_OK : static_cast<int>(e);
}
