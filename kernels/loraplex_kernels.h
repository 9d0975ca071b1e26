/*
 * loraplex_kernels.h: the C ABI of libloraplex_kernels.so, the CUDA kernels of the Loraplex shard.
 *
 * The Go side (shard/internal/compute/cuda) loads the library at run time with dlopen and checks
 * lp_abi_version() against the version it was written for, so this header is the whole contract:
 * plain C types, opaque handles, int error codes. Change a signature or a meaning only together with
 * LP_ABI_VERSION.
 *
 * Conventions:
 *   - Every function returns LP_OK (0) or an error code: a negative LP_ERR_* of this library, or a
 *     positive cudaError_t value; lp_error_string() names either.
 *   - Device memory is addressed by plain pointers (void*) obtained from lp_malloc; they are only
 *     meaningful on the device and may be stored in device arrays (SGMV's per-segment weights).
 *   - Work is queued on a stream (NULL: the legacy default stream) and is asynchronous unless the
 *     function says otherwise.
 */
#ifndef LORAPLEX_KERNELS_H
#define LORAPLEX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Exported symbols; the library is built with hidden visibility otherwise. */
#if defined(__GNUC__)
#define LP_API __attribute__((visibility("default")))
#else
#define LP_API
#endif

#define LP_ABI_VERSION 1

#define LP_OK 0
#define LP_ERR_INVALID (-1)     /* an argument is out of range or inconsistent */
#define LP_ERR_UNSUPPORTED (-2) /* a valid request this build does not implement */

/* Element types of activations and adapter weights. */
#define LP_DTYPE_BF16 1
#define LP_DTYPE_F16 2

/* The largest LoRA rank SGMV accepts. */
#define LP_MAX_RANK 512

typedef struct lp_stream_s *lp_stream;
typedef struct lp_event_s *lp_event;
typedef struct lp_graph_s *lp_graph;

LP_API int lp_abi_version(void);
/* A static string naming code; never NULL. */
LP_API const char *lp_error_string(int code);

/* Devices. */
LP_API int lp_device_count(int *count);
LP_API int lp_set_device(int device);
/* name: a buffer of name_len bytes, NUL-terminated on return. */
LP_API int lp_device_info(int device, char *name, int name_len, int *sm_count, int *cc_major, int *cc_minor,
                   size_t *l2_bytes);
LP_API int lp_mem_get_info(size_t *free_bytes, size_t *total_bytes);
LP_API int lp_device_synchronize(void);

/* Device memory. */
LP_API int lp_malloc(void **ptr, size_t bytes);
LP_API int lp_free(void *ptr);
LP_API int lp_memcpy_h2d(void *dst, const void *src, size_t bytes, lp_stream stream);
LP_API int lp_memcpy_d2h(void *dst, const void *src, size_t bytes, lp_stream stream);
LP_API int lp_memcpy_d2d(void *dst, const void *src, size_t bytes, lp_stream stream);
LP_API int lp_memset(void *dst, int value, size_t bytes, lp_stream stream);

/* Streams. */
LP_API int lp_stream_create(lp_stream *stream);
LP_API int lp_stream_destroy(lp_stream stream);
LP_API int lp_stream_synchronize(lp_stream stream);

/* Events (timing). */
LP_API int lp_event_create(lp_event *event);
LP_API int lp_event_destroy(lp_event event);
LP_API int lp_event_record(lp_event event, lp_stream stream);
LP_API int lp_event_synchronize(lp_event event);
LP_API int lp_event_elapsed_ms(lp_event start, lp_event end, float *ms);

/* CUDA graphs: capture the work queued on a (non-default) stream, then replay it. */
LP_API int lp_graph_begin_capture(lp_stream stream);
LP_API int lp_graph_end_capture(lp_stream stream, lp_graph *graph);
LP_API int lp_graph_launch(lp_graph graph, lp_stream stream);
LP_API int lp_graph_destroy(lp_graph graph);

/*
 * SGMV (segmented gather matrix-vector) for LoRA: tokens are grouped in num_segs consecutive
 * segments; segment s covers rows [seg_starts[s], seg_starts[s+1]) and applies its own adapter.
 * All arrays below live in device memory:
 *   seg_starts int32[num_segs+1]   nondecreasing; empty segments allowed
 *   ranks      int32[num_segs]     rank r_s of the segment's adapter, 0 <= r_s <= max_rank
 *   a_ptrs     void*[num_segs]     A_s, [r_s, in] row-major (Hugging Face lora_A), or NULL
 *   b_ptrs     void*[num_segs]     B_s, [out, r_s] row-major (Hugging Face lora_B), or NULL
 *   scales     float[num_segs]     the adapter's scaling (alpha/r or rsLoRA)
 * A segment whose pointer is NULL or whose rank is 0 has no adapter: its rows are left untouched.
 * Activations and weights share one dtype (LP_DTYPE_*); accumulation is float32.
 * max_seg_len and max_rank bound the segments (they size the grid; larger values only cost idle
 * blocks). Vectorized 16-byte paths are taken when rows are 16-byte aligned; other shapes take a
 * scalar path and stay correct.
 */

/* shrink: v[t, 0:r_s] = x[t, :] A_s^T for every row t of segment s with an adapter.
 * x: dtype [num_tokens, ldx]; v: float32 [num_tokens, ldv], ldv >= max_rank. */
LP_API int lp_sgmv_shrink(int dtype, float *v, int ldv, const void *x, int ldx, const void *const *a_ptrs,
                   const int32_t *seg_starts, const int32_t *ranks, int num_segs, int max_seg_len,
                   int max_rank, int in_features, lp_stream stream);

/* expand: y[t, :] += scales[s] * v[t, 0:r_s] B_s^T for every row t of segment s with an adapter.
 * y: dtype [num_tokens, ldy], updated in place (read-modify-write in float32, rounded once). */
LP_API int lp_sgmv_expand(int dtype, void *y, int ldy, const float *v, int ldv, const void *const *b_ptrs,
                   const int32_t *seg_starts, const int32_t *ranks, const float *scales, int num_segs,
                   int max_seg_len, int max_rank, int out_features, lp_stream stream);

/* Whether expand is launched as a programmatic dependent of the kernel before it (Hopper: its blocks
 * start and prefetch B while shrink finishes). On by default; a process-wide switch. */
LP_API int lp_sgmv_set_pdl(int enabled);

#ifdef __cplusplus
}
#endif

#endif /* LORAPLEX_KERNELS_H */
