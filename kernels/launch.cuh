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

// The process-wide switches (runtime.cu, lp_set_pdl and lp_set_clusters).
extern int lp_pdl_enabled;
extern int lp_clusters_enabled;

// clusters_ok says whether kernels may run in thread-block clusters: the current device launches
// them (sm_90 and later) and lp_set_clusters has not turned them off.
static inline bool clusters_ok() {
  static const bool device = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrClusterLaunch, dev) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return v != 0;
  }();
  return device && lp_clusters_enabled;
}

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

// launch_ex launches kernel with cudaLaunchKernelEx: as a programmatic dependent of the previous
// kernel in stream s when pdl, and in clusters of the given shape unless it is 1 x 1 x 1 (sm_90 and
// later; its sizes divide the grid's).
template <typename... KArgs, typename... Args>
static cudaError_t launch_ex(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                             dim3 cluster, bool pdl, Args &&...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    n++;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n].val.clusterDim.z = cluster.z;
    n++;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// launch_k launches kernel as a programmatic dependent of the previous kernel in stream s, plainly
// where the attribute is off or refused.
template <typename... KArgs, typename... Args>
static void launch_k(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args &&...args) {
  if (lp_pdl_enabled) {
    if (launch_ex(kernel, grid, block, smem, s, dim3(1, 1, 1), true, std::forward<Args>(args)...) == cudaSuccess) return;
    cudaGetLastError();  // refused: launch plainly
  }
  kernel<<<grid, block, smem, s>>>(std::forward<Args>(args)...);
}

// launched is the last launch's error, LP_OK when none.
static inline int launched() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? LP_OK : static_cast<int>(e);
}

// launch_cluster launches kernel in clusters of the given shape (launch_ex), as a programmatic
// dependent where that is on and taken, else plainly; the launch's status.
template <typename... KArgs, typename... Args>
static int launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, dim3 cluster, cudaStream_t s, Args &&...args) {
  for (const bool pdl : {lp_pdl_enabled != 0, false}) {
    if (launch_ex(kernel, grid, block, 0, s, cluster, pdl, std::forward<Args>(args)...) == cudaSuccess) return LP_OK;
    if (!pdl) break;
    cudaGetLastError();
  }
  return launched();
}
