// runtime.cu: devices, memory, streams, events and graphs behind the C ABI of loraplex_kernels.h.
// Thin wrappers over the CUDA runtime so the Go side needs no CUDA headers and no cgo.
#include <cuda_runtime.h>

#include <cstring>

#include "loraplex_kernels.h"

namespace {

inline int code(cudaError_t e) { return e == cudaSuccess ? LP_OK : static_cast<int>(e); }
inline cudaStream_t cs(lp_stream s) { return reinterpret_cast<cudaStream_t>(s); }
inline cudaEvent_t ce(lp_event e) { return reinterpret_cast<cudaEvent_t>(e); }

struct Graph {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
};

}  // namespace

// Whether kernels are launched as programmatic dependents of the kernel before them (lp_set_pdl).
int lp_pdl_enabled = 1;
// Whether kernels may run in thread-block clusters (lp_set_clusters).
int lp_clusters_enabled = 1;

extern "C" {

int lp_abi_version(void) { return LP_ABI_VERSION; }

int lp_set_pdl(int enabled) {
  lp_pdl_enabled = enabled != 0;
  return LP_OK;
}

int lp_set_clusters(int enabled) {
  lp_clusters_enabled = enabled != 0;
  return LP_OK;
}

const char *lp_error_string(int c) {
  switch (c) {
    case LP_OK:
      return "ok";
    case LP_ERR_INVALID:
      return "invalid argument";
    case LP_ERR_UNSUPPORTED:
      return "unsupported";
  }
  if (c > 0) return cudaGetErrorString(static_cast<cudaError_t>(c));
  if (c < LP_ERR_BLAS && c > LP_ERR_BLAS - 100) return "cuBLAS call failed (code = LP_ERR_BLAS - cublasStatus_t)";
  return "unknown error";
}

int lp_device_count(int *count) {
  if (count == nullptr) return LP_ERR_INVALID;
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear it: no GPU is an answer here, not an error
    *count = 0;
    return LP_OK;
  }
  return code(e);
}

int lp_set_device(int device) { return code(cudaSetDevice(device)); }

int lp_device_info(int device, char *name, int name_len, int *sm_count, int *cc_major, int *cc_minor,
                   size_t *l2_bytes) {
  cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e != cudaSuccess) return code(e);
  if (name != nullptr && name_len > 0) {
    std::strncpy(name, p.name, static_cast<size_t>(name_len) - 1);
    name[name_len - 1] = 0;
  }
  if (sm_count) *sm_count = p.multiProcessorCount;
  if (cc_major) *cc_major = p.major;
  if (cc_minor) *cc_minor = p.minor;
  if (l2_bytes) *l2_bytes = static_cast<size_t>(p.l2CacheSize);
  return LP_OK;
}

int lp_mem_get_info(size_t *free_bytes, size_t *total_bytes) {
  if (free_bytes == nullptr || total_bytes == nullptr) return LP_ERR_INVALID;
  return code(cudaMemGetInfo(free_bytes, total_bytes));
}

int lp_device_synchronize(void) { return code(cudaDeviceSynchronize()); }

int lp_malloc(void **ptr, size_t bytes) {
  if (ptr == nullptr) return LP_ERR_INVALID;
  *ptr = nullptr;
  if (bytes == 0) return LP_OK;
  return code(cudaMalloc(ptr, bytes));
}

int lp_free(void *ptr) { return ptr == nullptr ? LP_OK : code(cudaFree(ptr)); }

int lp_memcpy_h2d(void *dst, const void *src, size_t bytes, lp_stream stream) {
  if (bytes == 0) return LP_OK;
  if (dst == nullptr || src == nullptr) return LP_ERR_INVALID;
  return code(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cs(stream)));
}

int lp_memcpy_d2h(void *dst, const void *src, size_t bytes, lp_stream stream) {
  if (bytes == 0) return LP_OK;
  if (dst == nullptr || src == nullptr) return LP_ERR_INVALID;
  return code(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cs(stream)));
}

int lp_memcpy_d2d(void *dst, const void *src, size_t bytes, lp_stream stream) {
  if (bytes == 0) return LP_OK;
  if (dst == nullptr || src == nullptr) return LP_ERR_INVALID;
  return code(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cs(stream)));
}

int lp_memset(void *dst, int value, size_t bytes, lp_stream stream) {
  if (bytes == 0) return LP_OK;
  if (dst == nullptr) return LP_ERR_INVALID;
  return code(cudaMemsetAsync(dst, value, bytes, cs(stream)));
}

int lp_stream_create(lp_stream *stream) {
  if (stream == nullptr) return LP_ERR_INVALID;
  cudaStream_t s = nullptr;
  cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  *stream = reinterpret_cast<lp_stream>(s);
  return code(e);
}

int lp_stream_destroy(lp_stream stream) {
  return stream == nullptr ? LP_OK : code(cudaStreamDestroy(cs(stream)));
}

int lp_stream_synchronize(lp_stream stream) { return code(cudaStreamSynchronize(cs(stream))); }

int lp_event_create(lp_event *event) {
  if (event == nullptr) return LP_ERR_INVALID;
  cudaEvent_t e = nullptr;
  cudaError_t err = cudaEventCreate(&e);
  *event = reinterpret_cast<lp_event>(e);
  return code(err);
}

int lp_event_destroy(lp_event event) {
  return event == nullptr ? LP_OK : code(cudaEventDestroy(ce(event)));
}

int lp_event_record(lp_event event, lp_stream stream) {
  if (event == nullptr) return LP_ERR_INVALID;
  return code(cudaEventRecord(ce(event), cs(stream)));
}

int lp_event_synchronize(lp_event event) {
  if (event == nullptr) return LP_ERR_INVALID;
  return code(cudaEventSynchronize(ce(event)));
}

int lp_event_elapsed_ms(lp_event start, lp_event end, float *ms) {
  if (start == nullptr || end == nullptr || ms == nullptr) return LP_ERR_INVALID;
  return code(cudaEventElapsedTime(ms, ce(start), ce(end)));
}

int lp_graph_begin_capture(lp_stream stream) {
  if (stream == nullptr) return LP_ERR_INVALID;  // the legacy default stream cannot be captured
  // Relaxed: the Go runtime may move the calling goroutine between OS threads during a capture.
  return code(cudaStreamBeginCapture(cs(stream), cudaStreamCaptureModeRelaxed));
}

int lp_graph_end_capture(lp_stream stream, lp_graph *graph) {
  if (stream == nullptr || graph == nullptr) return LP_ERR_INVALID;
  *graph = nullptr;
  cudaGraph_t g = nullptr;
  cudaError_t e = cudaStreamEndCapture(cs(stream), &g);
  if (e != cudaSuccess) return code(e);
  cudaGraphExec_t x = nullptr;
  e = cudaGraphInstantiateWithFlags(&x, g, 0);
  if (e != cudaSuccess) {
    cudaGraphDestroy(g);
    return code(e);
  }
  *graph = reinterpret_cast<lp_graph>(new Graph{g, x});
  return LP_OK;
}

int lp_graph_launch(lp_graph graph, lp_stream stream) {
  if (graph == nullptr) return LP_ERR_INVALID;
  return code(cudaGraphLaunch(reinterpret_cast<Graph *>(graph)->exec, cs(stream)));
}

int lp_graph_destroy(lp_graph graph) {
  if (graph == nullptr) return LP_OK;
  Graph *g = reinterpret_cast<Graph *>(graph);
  cudaError_t e1 = cudaGraphExecDestroy(g->exec);
  cudaError_t e2 = cudaGraphDestroy(g->graph);
  delete g;
  return code(e1 != cudaSuccess ? e1 : e2);
}

int lp_host_alloc(void **ptr, size_t bytes) {
  if (ptr == nullptr) return LP_ERR_INVALID;
  *ptr = nullptr;
  if (bytes == 0) return LP_OK;
  return code(cudaHostAlloc(ptr, bytes, cudaHostAllocPortable));
}

int lp_host_free(void *ptr) { return ptr == nullptr ? LP_OK : code(cudaFreeHost(ptr)); }

int lp_stream_wait_event(lp_stream stream, lp_event event) {
  if (event == nullptr) return LP_ERR_INVALID;
  return code(cudaStreamWaitEvent(cs(stream), ce(event), 0));
}

int lp_event_create_sync(lp_event *event) {
  if (event == nullptr) return LP_ERR_INVALID;
  cudaEvent_t e = nullptr;
  cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
  *event = reinterpret_cast<lp_event>(e);
  return code(err);
}

int lp_event_query(lp_event event, int *done) {
  if (event == nullptr || done == nullptr) return LP_ERR_INVALID;
  cudaError_t e = cudaEventQuery(ce(event));
  *done = e == cudaSuccess;
  if (e == cudaErrorNotReady) {
    cudaGetLastError();  // not an error: keep it from surfacing in a later launch check
    return LP_OK;
  }
  return code(e);
}

}  // extern "C"
