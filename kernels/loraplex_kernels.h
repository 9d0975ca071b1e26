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

#define LP_ABI_VERSION 11

#define LP_OK 0
#define LP_ERR_INVALID (-1)     /* an argument is out of range or inconsistent */
#define LP_ERR_UNSUPPORTED (-2) /* a valid request this build does not implement */
/* A failed cuBLAS call: LP_ERR_BLAS - cublasStatus_t (so -1001 .. -1099). */
#define LP_ERR_BLAS (-1000)

/* Element types of activations, adapter weights and the KV cache. */
#define LP_DTYPE_BF16 1
#define LP_DTYPE_F16 2
#define LP_DTYPE_F32 3 /* the forward-pass functions below only */

/* The largest LoRA rank SGMV accepts. */
#define LP_MAX_RANK 512

typedef struct lp_stream_s *lp_stream;
typedef struct lp_event_s *lp_event;
typedef struct lp_graph_s *lp_graph;
typedef struct lp_blas_s *lp_blas;

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

/* Page-locked (pinned) host memory (cudaHostAlloc, portable); lp_memcpy_h2d/d2h from it are truly
 * asynchronous. */
LP_API int lp_host_alloc(void **ptr, size_t bytes);
LP_API int lp_host_free(void *ptr);

/* Streams. */
LP_API int lp_stream_create(lp_stream *stream);
LP_API int lp_stream_destroy(lp_stream stream);
LP_API int lp_stream_synchronize(lp_stream stream);
/* Work queued on stream after this call waits until event completes (cudaStreamWaitEvent). */
LP_API int lp_stream_wait_event(lp_stream stream, lp_event event);

/* Events (timing). */
LP_API int lp_event_create(lp_event *event);
LP_API int lp_event_destroy(lp_event event);
LP_API int lp_event_record(lp_event event, lp_stream stream);
LP_API int lp_event_synchronize(lp_event event);
LP_API int lp_event_elapsed_ms(lp_event start, lp_event end, float *ms);
/* An event without timing, cheaper to record and wait on (cudaEventDisableTiming). */
LP_API int lp_event_create_sync(lp_event *event);
/* *done = 1 when the work before event's most recent record has completed (or it was never
 * recorded), else 0; never waits (cudaEventQuery). */
LP_API int lp_event_query(lp_event event, int *done);

/* CUDA graphs: capture the work queued on a (non-default) stream, then replay it. */
LP_API int lp_graph_begin_capture(lp_stream stream);
LP_API int lp_graph_end_capture(lp_stream stream, lp_graph *graph);
LP_API int lp_graph_launch(lp_graph graph, lp_stream stream);
LP_API int lp_graph_destroy(lp_graph graph);

/* Whether kernels are launched as programmatic dependents of the kernel before them (Hopper): the
 * next kernel's blocks are scheduled while the last one drains, and each waits for its predecessors
 * before touching their results. Covers the forward-pass kernels (not cuBLAS) and SGMV (expand starts
 * and prefetches B while shrink finishes). On by default; one process-wide switch. */
LP_API int lp_set_pdl(int enabled);

/* Whether kernels may run in thread-block clusters (sm_90 and later; ABI 11): lp_sgmv_fused, and
 * decode attention split over at most 8 blocks in a grid of at most 4 blocks per multiprocessor,
 * whose splits then merge through distributed shared memory instead of in a second kernel. On by
 * default; off, lp_sgmv_fused declines every call (LP_ERR_UNSUPPORTED) and attention merges in a
 * second kernel. One process-wide switch, for comparisons. */
LP_API int lp_set_clusters(int enabled);

/*
 * The dense forward pass (forward.cu). Activations are float32 row-major
 * [tokens, width]; a matrix weight is float32 or bf16 (LP_DTYPE_F32 / LP_DTYPE_BF16). The batch
 * metadata lives in device int32 arrays: positions[T], seq_index[T] (the token's sequence),
 * block_tables (every sequence's KV block table, concatenated) and table_offsets[S] (where sequence
 * s's table starts in block_tables). A KV cache layer is [blocks, block_size, kv_heads, head_dim] for
 * keys and the same for values, of kv_dtype LP_DTYPE_F32 or LP_DTYPE_BF16 (written rounded to
 * nearest even, read as float32; attention accumulates in float32 either way). Nothing here checks indices against the host's view:
 * the caller validates the batch before it queues these.
 */

/* A cuBLAS handle whose work is queued on stream. */
LP_API int lp_blas_create(lp_blas *blas, lp_stream stream);
LP_API int lp_blas_destroy(lp_blas blas);

/* out float32 [tokens, n] (+)= x [tokens, k] W^T with W [n, k] (cuBLAS); x and W share dtype (F32 or
 * BF16), accumulation is float32 (no TF32); out must not alias x. ldo >= n: out may be a column range
 * of a wider matrix; with accumulate non-zero, out += x W^T (beta = 1) instead of out = x W^T. */
LP_API int lp_gemm_ex(lp_blas blas, int dtype, float *out, int ldo, const void *x, const void *w, int tokens, int n,
                      int k, int accumulate);

/* The LoRA update a small matmul adds in its epilogue (defined below, after lp_sgmv_group). */
typedef struct lp_lora_tail lp_lora_tail;

/* Matrix-vector products for decode batches: out (+)= x W^T for tokens <= 8, x bf16
 * [tokens, k], W bf16 [n0+n1+n2, k] row-major, float32 accumulation, rows of W split over up to three
 * float32 outputs out_i [tokens, n_i] in order (a packed q/k/v weight writes q, k and v); with
 * accumulate, out_i += instead of =; with lora (NULL: none), plus its update. LP_ERR_UNSUPPORTED
 * (nothing queued) for more than 8 tokens, k not a multiple of 8 or x, w not 16-byte aligned: use
 * lp_gemm_ex then. */
LP_API int lp_gemv_bf16(float *out0, int n0, float *out1, int n1, float *out2, int n2, const void *x, const void *w,
                        int tokens, int k, int accumulate, const lp_lora_tail *lora, lp_stream stream);

/* The same product on tensor cores for any number of tokens, in slices of 64 rows (for 3-16 tokens,
 * and the batch-invariant mode's matmul): out_i (+)= x W^T, x bf16 [tokens, k], W bf16 [n0+n1+n2, k], float32
 * accumulation. A row's result depends on k alone, never on tokens or on the other rows.
 * LP_ERR_UNSUPPORTED (nothing queued) for k not a multiple of 8 or x, w not 16-byte aligned. */
LP_API int lp_gemm_skinny_bf16(float *out0, int n0, float *out1, int n1, float *out2, int n2, const void *x,
                               const void *w, int tokens, int k, int accumulate, const lp_lora_tail *lora,
                               lp_stream stream);

/* Splits the columns of p float32 [rows, ldp] into up to three parts, in order:
 * out0 [rows, n0] = p[:, 0:n0], out1 [rows, n1] = p[:, n0:n0+n1], out2 [rows, n2] = the next n2
 * (n0 + n1 + n2 <= ldp; a part of width 0 is skipped). Unpacks a fused q/k/v or gate/up GEMM. */
LP_API int lp_split_cols(const float *p, int rows, int ldp, float *out0, int n0, float *out1, int n1, float *out2,
                         int n2, lp_stream stream);

/* dst[i] = src[i] for n elements between F32 and BF16 (round to nearest even; a NaN keeps its sign and top
 * payload bits, made quiet, as the host conversion of the Go package does). */
LP_API int lp_convert(int dst_dtype, void *dst, int src_dtype, const void *src, size_t n, lp_stream stream);

/* out float32 [num_rows, width] = table[rows[i], :], table dtype F32 or BF16 (embedding lookup,
 * and the rows whose logits a step needs). */
LP_API int lp_gather_rows(int dtype, float *out, const void *table, const int32_t *rows, int num_rows, int width,
                          lp_stream stream);

/* out = x / sqrt(mean(x^2) + eps) * w, row-wise over [rows, d]; out may alias x. */
LP_API int lp_rmsnorm(float *out, const float *x, const float *w, int rows, int d, float eps, lp_stream stream);

/* out = a + b over n elements; out may alias a or b. */
LP_API int lp_add(float *out, const float *a, const float *b, size_t n, lp_stream stream);

/* x[r, :] += bias over x float32 [rows, n], bias float32 [n] (Qwen2's q/k/v biases on the unfused
 * path). Per-head RMSNorm (Qwen3's q/k norms) is lp_rmsnorm over [tokens * heads, head_dim]. */
LP_API int lp_add_bias(float *x, const float *bias, int rows, int n, lp_stream stream);

/* out = silu(gate) * up over n elements; out may alias gate or up. */
LP_API int lp_silu_mul(float *out, const float *gate, const float *up, size_t n, lp_stream stream);

/* RMSNorm and SiLU-and-multiply that also write their result rounded to bf16 into out_bf16
 * (same shape), the input of the bf16 GEMM that follows, saving a conversion pass per GEMM. */
LP_API int lp_rmsnorm_bf16(float *out, void *out_bf16, const float *x, const float *w, int rows, int d, float eps,
                           lp_stream stream);
LP_API int lp_silu_mul_bf16(float *out, void *out_bf16, const float *gate, const float *up, size_t n,
                            lp_stream stream);

/* Positions, the paged KV cache and attention. */

/* Rotates x [tokens, heads*head_dim] in place, rotate-half layout, at each token's position:
 * angle = float(position) * f[i] (formed in float32), f the head_dim/2 float32 inverse frequencies
 * of the token's set: inv_freq + rope_set[token] * head_dim/2 (rope_set int32 [tokens], naming sets
 * of inv_freq the caller has checked; NULL: inv_freq itself for every token, as with one set). */
LP_API int lp_rope(float *x, int tokens, int heads, int head_dim, const float *inv_freq, const int32_t *positions,
                   const int32_t *rope_set, lp_stream stream);

/* Writes k and v [tokens, kv_width] into one layer of the paged cache at each token's position. */
LP_API int lp_kv_write(int kv_dtype, void *k_cache, void *v_cache, const float *k, const float *v, int tokens,
                       int kv_width, const int32_t *positions, const int32_t *seq_index, const int32_t *block_tables,
                       const int32_t *table_offsets, int block_size, lp_stream stream);

/* What some model families do to q, k and v between their projections and RoPE, in this order:
 * add a bias (q_bias float32 [heads * head_dim], k_bias and v_bias [kv_heads * head_dim]), then
 * RMSNorm each head of q and of k with weights q_norm, k_norm float32 [head_dim] and eps. A NULL
 * pointer skips that part; all NULL (or a NULL lp_qkv_prep*) is plain Llama. Read on the host
 * during the call (the pointers are device memory). */
typedef struct lp_qkv_prep {
  const float *q_bias, *k_bias, *v_bias;
  const float *q_norm, *k_norm;
  float eps;
  int32_t reserved; /* 0 */
} lp_qkv_prep; /* 48 bytes */

/* prep's options on q, k and v, lp_rope on q [tokens, heads*head_dim] and on k [tokens,
 * kv_heads*head_dim], then lp_kv_write of the rotated k and of v (with its bias), in one kernel (the
 * same results as the separate calls). q and k are updated in place; v is left as it was. */
LP_API int lp_rope_kv_write(int kv_dtype, float *q, float *k, const float *v, void *k_cache, void *v_cache,
                            int tokens, int heads, int kv_heads, int head_dim, const float *inv_freq,
                            const int32_t *positions, const int32_t *rope_set, const int32_t *seq_index,
                            const int32_t *block_tables,
                            const int32_t *table_offsets, int block_size, const lp_qkv_prep *prep,
                            lp_stream stream);

/* Causal grouped-query attention of q [tokens, heads*head_dim] over positions lo..position of each
 * token's sequence in one cache layer, into out [tokens, heads*head_dim]; head_dim <= 256; lo is 0,
 * or position - window + 1 (at least 0) for a sliding window (window > 0), so block-table entries
 * below it are never read. Scores are scaled by scale; softmax and accumulation in float32. Run
 * lp_kv_write first. max_ctx: the longest span any token attends to (its context, or the window if
 * smaller), which sizes the context split (see lp_attention_workspace). split_chunk 0 splits the
 * context as occupancy suggests (the split, and so the order of the float32 sums, then depends on the
 * batch); a positive multiple of 16 splits every token's span into chunks of that many positions from
 * its first, so a token's result depends on its own context only (batch-invariant attention). */
LP_API int lp_attention(int kv_dtype, float *out, const float *q, const void *k_cache, const void *v_cache,
                        int tokens, int heads, int kv_heads, int head_dim, float scale, const int32_t *positions,
                        const int32_t *seq_index, const int32_t *block_tables, const int32_t *table_offsets,
                        int block_size, int max_ctx, int window, int split_chunk, void *workspace,
                        size_t workspace_bytes, lp_stream stream);

/* lp_attention's result for a bf16 cache (no workspace) on tensor cores, for prefill: the tokens come
 * as tiles int32 [num_tiles * 2] of (first token, count), each 1..64 consecutive tokens of one
 * sequence at consecutive positions, every token in exactly one tile. q and the softmax weights are
 * used as two bf16 parts each (about 16 significant bits), so the result agrees with lp_attention's
 * to float32 rounding. head_dim 32, 64 or 128 (else LP_ERR_UNSUPPORTED); window as in lp_attention. */
LP_API int lp_attention_tiles(float *out, const float *q, const void *k_cache, const void *v_cache, int heads,
                              int kv_heads, int head_dim, float scale, const int32_t *positions,
                              const int32_t *seq_index, const int32_t *block_tables, const int32_t *table_offsets,
                              int block_size, int window, const int32_t *tiles, int num_tiles, lp_stream stream);

/* Bytes of device workspace lp_attention wants to split the context of a batch whose longest
 * context (largest position + 1) is max_ctx across blocks (flash-decoding); 0 when it would not split.
 * With a smaller or NULL workspace (or max_ctx <= 0) lp_attention runs unsplit, still correct. Splits
 * merged inside a thread-block cluster (lp_set_clusters) leave the workspace unused. */
LP_API size_t lp_attention_workspace(int tokens, int heads, int kv_heads, int head_dim, int max_ctx,
                                     int split_chunk);

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

/* Expand into float32 y (the forward pass's activations) with weights B in wdtype (BF16 or
 * F16): y[t, :] += scales[s] * v[t, 0:r_s] B_s^T in float32, no rounding of y. Same kernel as
 * lp_sgmv_expand otherwise, except for BF16 weights when the longest segment has 64 or more tokens
 * (prefill): tensor cores then multiply v carried as two bf16 parts (about 16 significant bits)
 * by B, with float32 accumulation. (lp_sgmv_shrink and lp_sgmv_shrink_group likewise use tensor
 * cores for such calls on bf16 x with ranks up to 64, in_features a multiple of 32 and 16-byte
 * aligned rows, when num_segs x ceil(max_seg_len / 16) [x modules] blocks make two waves over the
 * GPU's multiprocessors; their products are exact, only the order of the float32 sums differs.) */
LP_API int lp_sgmv_expand_y32(int wdtype, float *y, int ldy, const float *v, int ldv, const void *const *b_ptrs,
                              const int32_t *seg_starts, const int32_t *ranks, const float *scales, int num_segs,
                              int max_seg_len, int max_rank, int out_features, lp_stream stream);

/*
 * SGMV on float32 activations, adapter weights in wdtype (F32 or BF16). tok_seg int32[tokens] gives
 * each token's segment (-1: no adapter); per segment s: ranks[s], a_ptrs[s] (A [r, in]), b_ptrs[s]
 * (B [out, r]), scales[s]; a NULL pointer or rank 0 leaves the token's row untouched.
 * shrink: v[t, 0:r] = x[t, :] A^T (v float32 [tokens, ldv], ldv >= max_rank);
 * expand: y[t, :] += scale * v[t, 0:r] B^T (y float32 [tokens, out_features]).
 */
LP_API int lp_sgmv_shrink_f32(int wdtype, float *v, int ldv, const float *x, int in_features,
                              const void *const *a_ptrs, const int32_t *ranks, const int32_t *tok_seg, int tokens,
                              int max_rank, lp_stream stream);
LP_API int lp_sgmv_expand_f32(int wdtype, float *y, int out_features, const float *v, int ldv,
                              const void *const *b_ptrs, const int32_t *ranks, const float *scales,
                              const int32_t *tok_seg, int tokens, int max_rank, lp_stream stream);

/*
 * Grouped SGMV for the projections of one packed GEMM (q/k/v or gate/up): the modules share
 * the input x and the batch's segments, and each has its own per-segment tables (ptrs: A for shrink,
 * B for expand; ranks; scales, expand only), all in device memory. One launch covers every
 * (module, segment): shrink writes module m's v[t, v_off[m] : v_off[m] + r] and expand adds
 * scale * v[t, v_off[m] : ...] B^T into y[t, y_off[m] : y_off[m] + cols[m]] (y float32, the packed
 * GEMM output before it is split). max_rank bounds every module's ranks. The struct itself is read
 * on the host during the call.
 */
#define LP_SGMV_GROUP 3

typedef struct lp_sgmv_group {
  int32_t modules;  /* 1 .. LP_SGMV_GROUP */
  int32_t num_segs; /* segments per module, equal to the call's num_segs */
  int32_t cols[LP_SGMV_GROUP];
  int32_t y_off[LP_SGMV_GROUP];
  int32_t v_off[LP_SGMV_GROUP];
  int32_t reserved;
  const void *ptrs[LP_SGMV_GROUP]; /* each a device array: void*[num_segs] */
  const int32_t *ranks[LP_SGMV_GROUP];
  const float *scales[LP_SGMV_GROUP];
} lp_sgmv_group; /* 120 bytes */

LP_API int lp_sgmv_shrink_group(int dtype, float *v, int ldv, const void *x, int ldx, const lp_sgmv_group *g,
                                const int32_t *seg_starts, int num_segs, int max_seg_len, int max_rank,
                                int in_features, lp_stream stream);
LP_API int lp_sgmv_expand_group_y32(int wdtype, float *y, int ldy, const float *v, int ldv, const lp_sgmv_group *g,
                                    const int32_t *seg_starts, int num_segs, int max_seg_len, int max_rank,
                                    lp_stream stream);

/*
 * lp_split_cols with the grouped expand folded in, for decode-sized steps: out_i gets p's columns of
 * part i plus, for a token of segment s (tok_seg[t], -1 for none) and the module m whose columns
 * [y_off[m], y_off[m] + cols[m]) of p hold the column, scale * v[t, v_off[m] : v_off[m] + r] B^T, B
 * bf16 from g's ptrs (B tables, as for the expand). p stays unchanged. One launch instead of the
 * expand and the split; each output element reads its B row (r values), so it suits few tokens.
 */
LP_API int lp_split_cols_lora(const float *p, int rows, int ldp, float *out0, int n0, float *out1, int n1, float *out2,
                              int n2, const float *v, int ldv, const lp_sgmv_group *g, const int32_t *tok_seg,
                              int max_rank, lp_stream stream);

/*
 * The grouped expand as a matmul's epilogue (ABI 10), for decode-sized steps: lp_gemv_bf16 and
 * lp_gemm_skinny_bf16 add to output column c (counted over n0 + n1 + n2) of token t, for the segment
 * s = tok_seg[t] (-1: none) and the module m whose columns [g.y_off[m], g.y_off[m] + g.cols[m]) hold
 * c, scale * v[t, v_off[m] : v_off[m] + r] . B[c - y_off[m], :] with r = min(ranks_m[s], max_rank),
 * B bf16 [cols, r] from g.ptrs (B tables, as for the expand) and scales from g.scales: one launch for
 * the product and its adapters, where the expand would be a second. The matmul reads x before
 * waiting on the kernel before it (programmatic dependent launch) and v after: queue it right after
 * the lp_sgmv_shrink or lp_sgmv_shrink_group that writes v, on the same stream (the shrink lets its
 * dependents start only once every kernel before it has completed).
 */
struct lp_lora_tail {
  const float *v; /* [tokens, ldv] */
  const int32_t *tok_seg;
  int32_t ldv;
  int32_t max_rank;
  lp_sgmv_group g;
}; /* 144 bytes */

/*
 * Shrink and expand in one launch (ABI 11), for decode-sized segments: for every module m of g and
 * segment s with an adapter, y[t, y_off[m] : y_off[m] + cols[m]] += scale * (x[t, :] A^T) B^T for
 * the segment's tokens t, A [r, in_features] from a_ptrs[m], B [cols[m], r] from g.ptrs[m], r =
 * min(ranks_m[s], max_rank), x and the weights in dtype (BF16 or F16), y in ydtype (dtype, or F32
 * for the forward pass's activations). x . A^T is summed in float32 and never leaves the GPU's
 * multiprocessors (a cluster of blocks shares it through distributed shared memory), so there is no
 * v and no second launch; g.v_off is unused. LP_ERR_UNSUPPORTED, nothing queued, where the fused
 * kernel does not apply: segments longer than LP_FUSED_MAX_SEG tokens, max_rank above
 * LP_FUSED_MAX_RANK, in_features or ldx not a multiple of 8, x not 16-byte aligned, or a GPU
 * without thread-block clusters (before sm_90, or lp_set_clusters(0)); use lp_sgmv_shrink(_group)
 * and the expand there.
 */
#define LP_FUSED_MAX_SEG 64
#define LP_FUSED_MAX_RANK 64

typedef struct lp_lora_fused {
  lp_sgmv_group g;                    /* B tables in g.ptrs */
  const void *a_ptrs[LP_SGMV_GROUP]; /* A tables, each a device array: void*[num_segs] */
} lp_lora_fused;                      /* 144 bytes */

LP_API int lp_sgmv_fused(int dtype, int ydtype, void *y, int ldy, const void *x, int ldx, const lp_lora_fused *f,
                         const int32_t *seg_starts, int num_segs, int max_seg_len, int max_rank, int in_features,
                         lp_stream stream);

/*
 * Sampling on the device, so logits never cross to the host. One call samples `rows` rows of
 * logits float32 [rows, vocab] (modified in place: penalty and temperature are applied to them).
 * params, seen and results live in device memory. Per row r with p = params[r]:
 *   1. repetition penalty (when p.repetition_penalty is neither 0 nor 1): for each of the
 *      p.seen_count unique ids seen[p.seen_offset ...] inside [0, vocab): a positive logit is divided
 *      by the penalty, any other multiplied by it;
 *   2. greedy when p.temperature == 0: id = the first index of the largest logit;
 *   3. otherwise, when p.temperature != 1, logits = (logits - max) / p.temperature;
 *   4. logprob of a token = logit - logsumexp over the whole (penalized, tempered) row;
 *   5. sampling: the candidate set is the whole row, or with 0 < top_k < vocab the top_k largest
 *      logits (ties: lower index first); with 0 < top_p < 1 it is cut to the smallest prefix of the
 *      candidates sorted by logit descending (ties: lower index first) whose probability mass, as a
 *      share of the candidates' mass, reaches top_p (at least one token). Then with
 *      total = the kept tokens' mass, the token is the first kept index i, in index order, whose
 *      inclusive prefix mass of kept tokens exceeds p.u * total (the last kept token if none does);
 *   6. results[r]: id, its logprob, and the p.top_logprobs (0..LP_MAX_TOP_LOGPROBS) most likely
 *      tokens of the row with their logprobs, most likely first, ties lower index first (unused
 *      entries id -1).
 * p.u is a uniform draw in [0, 1) from the sequence's seeded generator on the host, so a seeded
 * request draws the same tokens on every backend; it is ignored for greedy rows.
 */
#define LP_MAX_TOP_LOGPROBS 8

typedef struct lp_sample_params {
  float temperature;
  float top_p;
  int32_t top_k;
  float repetition_penalty;
  int32_t seen_offset;
  int32_t seen_count;
  int32_t top_logprobs;
  int32_t reserved; /* 0 */
  double u;
} lp_sample_params; /* 40 bytes */

typedef struct lp_sample_result {
  int32_t id;
  float logprob;
  int32_t top_ids[LP_MAX_TOP_LOGPROBS];
  float top_logprobs[LP_MAX_TOP_LOGPROBS];
} lp_sample_result; /* 72 bytes */

/* Bytes of device workspace lp_sample needs for rows x vocab (0 if none). */
LP_API size_t lp_sample_workspace(int rows, int vocab);
LP_API int lp_sample(float *logits, int rows, int vocab, const lp_sample_params *params, const int32_t *seen,
                     lp_sample_result *results, void *workspace, size_t workspace_bytes, lp_stream stream);

#ifdef __cplusplus
}
#endif

#endif /* LORAPLEX_KERNELS_H */
