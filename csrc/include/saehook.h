/*
 * saehook.h — the stable C API of saehook's Top-K sparse-autoencoder kernels.
 *
 * Conventions
 *  - Every call that can fail returns a saehook_status; on failure
 *    saehook_last_error() returns a message for the calling thread.
 *  - Activations (x, h) are float32, row-major, one row per token, with an explicit
 *    row stride in elements (>= d_model) so views into larger buffers work.
 *  - The encoder is always stored feature-major: W_enc has shape (d_sae, d_model).
 *    The decoder may be stored either way (saehook_dec_layout).
 *  - Weights are borrowed (zero copy: the caller keeps them alive for the life of the
 *    handle, e.g. an mmapped file) unless saehook_sae_desc.copy_weights is set.
 *  - A handle is immutable after creation and may be used from several threads at once.
 *  - A handle created with desc.cuda = 1 (CUDA builds) takes device pointers everywhere and
 *    runs on exec->cuda_stream; saehook_cuda_available() says whether this build has CUDA.
 */
#ifndef SAEHOOK_H
#define SAEHOOK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SAEHOOK_API __declspec(dllexport)
#else
#define SAEHOOK_API __attribute__((visibility("default")))
#endif

/* 2: steering items gained value2/when/arg_a/arg_b/latch (36 bytes instead of 16), the ops
 * CAP, RESCALE and the condition items COND_*, and saehook_steer_ex.
 * 3: saehook_sae_set_prefilter and saehook_sae_prefilter_stats. */
#define SAEHOOK_API_VERSION 3

typedef enum {
  SAEHOOK_OK = 0,
  SAEHOOK_ERR_INVALID_ARGUMENT = 1, /* null pointer, bad enum, bad k, ... */
  SAEHOOK_ERR_SHAPE = 2,            /* inconsistent or unsupported sizes */
  SAEHOOK_ERR_DTYPE = 3,            /* dtype not supported for this tensor */
  SAEHOOK_ERR_INDEX = 4,            /* feature index out of range */
  SAEHOOK_ERR_NAN = 5,              /* NaN or Inf in an input */
  SAEHOOK_ERR_ALLOC = 6,            /* out of memory */
  SAEHOOK_ERR_UNSUPPORTED = 7,      /* e.g. CUDA pointers in a build without CUDA */
  SAEHOOK_ERR_INTERNAL = 8,
  SAEHOOK_ERR_OVERFLOW = 9          /* a result is Inf/NaN although every input is finite
                                       (float32 overflow, e.g. inputs near 3e38) */
} saehook_status;

typedef enum {
  SAEHOOK_F32 = 0,
  SAEHOOK_F16 = 1,
  SAEHOOK_BF16 = 2,
  SAEHOOK_I8 = 3 /* symmetric int8 with one float scale per feature (encoder only) */
} saehook_dtype;

typedef enum {
  SAEHOOK_ACT_TOPK = 0,      /* k largest pre-activations kept as they are (Qwen-Scope) */
  SAEHOOK_ACT_TOPK_RELU = 1, /* ReLU, then Top-K (EleutherAI sparsify, OpenAI, SAELens topk) */
  SAEHOOK_ACT_RELU = 2,      /* ReLU (SAELens standard) */
  SAEHOOK_ACT_JUMPRELU = 3   /* pre if pre > threshold[f] else 0 (Gemma Scope) */
} saehook_activation;

typedef enum {
  SAEHOOK_DEC_ROWS = 0, /* W_dec has shape (d_sae, d_model): feature f is row f */
  SAEHOOK_DEC_COLS = 1  /* W_dec has shape (d_model, d_sae): feature f is column f (Qwen-Scope) */
} saehook_dec_layout;

typedef struct {
  int64_t d_model;
  int64_t d_sae;
  int32_t k;                     /* default number of active features per row */
  saehook_activation activation;
  int32_t subtract_b_dec;        /* encode (x - b_dec) instead of x */
  const void *W_enc;             /* (d_sae, d_model), enc_dtype */
  saehook_dtype enc_dtype;       /* F32, F16, BF16 or I8 */
  const float *enc_scales;       /* I8 only: (d_sae,), W_enc[f] ~= q[f] * enc_scales[f] */
  const float *b_enc;            /* (d_sae,) or NULL for zeros */
  const void *W_dec;             /* see dec_layout, dec_dtype */
  saehook_dtype dec_dtype;       /* F32, F16 or BF16 */
  saehook_dec_layout dec_layout;
  const float *b_dec;            /* (d_model,) or NULL for zeros */
  const float *threshold;        /* (d_sae,), JUMPRELU only */
  int32_t copy_weights;          /* 0: borrow the pointers; 1: copy them into the handle */
  int32_t cuda;                  /* 0: host memory (zero-initialised default); 1: every pointer
                                    above and every kernel argument is CUDA device memory */
  int32_t cuda_device;           /* the CUDA device ordinal when cuda = 1 */
} saehook_sae_desc;

/* Per-call execution settings; pass NULL for the defaults. */
typedef struct {
  int32_t n_threads; /* CPU: <= 0 means saehook_get_num_threads() */
  void *cuda_stream; /* CUDA: the cudaStream_t to run on (NULL: the legacy default stream) */
} saehook_exec;

typedef struct saehook_sae saehook_sae;

typedef enum {
  SAEHOOK_STEER_ADD = 0,    /* h += value * d_f */
  SAEHOOK_STEER_CLAMP = 1,  /* h += (value - z_f) * d_f */
  SAEHOOK_STEER_SCALE = 2,  /* h += (value - 1) * z_f * d_f */
  SAEHOOK_STEER_ABLATE = 3, /* h -= z_f * d_f   (clamp to 0) */
  /* API version 2. p_f = h . u_f, the row's projection on the unit direction u_f = d_f / ||d_f||
   * (these two always use u_f and read no encoder; h is the row as the items before left it). */
  SAEHOOK_STEER_CAP = 4,     /* h += (clip(p_f, value2, value) - p_f) * u_f: value the upper bound,
                                value2 the lower one (+-INFINITY: none; value2 > value refused) */
  SAEHOOK_STEER_RESCALE = 5, /* h += (value - 1) * p_f * u_f (value 0 removes the direction) */
  /* Condition items change nothing; op items refer to them with `when`. z_f comes from the
   * encode of the unsteered rows (0 when f is not in the row's Top-K). */
  SAEHOOK_COND_ABOVE = 6,    /* holds where z_f > value */
  SAEHOOK_COND_BELOW = 7,    /* holds where z_f < value */
  SAEHOOK_COND_AND = 8,      /* holds where conditions arg_a and arg_b both hold */
  SAEHOOK_COND_OR = 9        /* holds where condition arg_a or arg_b holds */
} saehook_steer_op;

/* One steering item. A zero-initialised tail gives the version-1 behaviour.
 * Limits: AND/OR refer to condition items earlier in the list (arg_a, arg_b < own index), so one
 * pass in list order evaluates every condition; `when` may name any condition item. */
typedef struct {
  int32_t feature;   /* unused by AND/OR */
  saehook_steer_op op;
  float value;
  int32_t normalize; /* ADD/CLAMP/SCALE/ABLATE: use d_f / ||d_f|| instead of d_f */
  /* API version 2: */
  float value2;      /* CAP: the lower bound */
  int32_t when;      /* op items: 0 always; j > 0 only on rows where condition item j - 1 holds */
  int32_t arg_a, arg_b; /* AND/OR: indices of the condition items combined */
  int32_t latch;     /* condition items: once it holds on a row of a sequence it holds on every
                        later row of that sequence (see saehook_steer_state) */
} saehook_steer_item;

/* Per-call state of conditional steering (API version 2); any pointer may be NULL. Host memory
 * also for CUDA handles (the conditions are evaluated on the host from a copy of the encode).
 *  - Latches: row r belongs to sequence slot row_slot[r] (NULL: slot 0 for every row), rows of a
 *    slot in token order. latch_state (n_slots * n_items bytes, byte s * n_items + t for item t)
 *    holds what latched on earlier calls and is updated; NULL: latches hold within this call only.
 *  - fired (n * n_items bytes, out): per row, whether each condition item held (after latching)
 *    and whether each op item was applied (its condition held and row_mask selected the row).
 * Conditions are evaluated on every row, the rows row_mask leaves alone included, so a latch
 * follows its sequence even through unsteered positions. */
typedef struct {
  uint8_t *latch_state;
  const int32_t *row_slot;
  int32_t n_slots;
  uint8_t *fired;
} saehook_steer_state;

/* ---- library ---- */
SAEHOOK_API int saehook_api_version(void);
SAEHOOK_API const char *saehook_last_error(void);
SAEHOOK_API const char *saehook_status_string(saehook_status s);
/* Default thread count for kernels (initially the number of online CPUs). Every call uses at
 * most 4 x the CPUs (std::thread::hardware_concurrency), whatever is asked; the pool's threads
 * persist, are re-created in a forked child, and are not joined at process exit. */
SAEHOOK_API void saehook_set_num_threads(int32_t n);
SAEHOOK_API int32_t saehook_get_num_threads(void);
/* Instruction-set path of the CPU kernels: "auto" (best the CPU supports), "baseline", "avx2"
 * (AVX2+FMA+F16C), "avx2_vnni" (plus AVX-VNNI: int8 on vpdpbusd), "avx512" (AVX-512 F/BW/VL),
 * "avx512_vnni_int8" (plus AVX512-VNNI), "avx512_vnni" (plus AVX512-VNNI and AVX512-BF16) or
 * "avx512_amx" (plus AMX-TILE, AMX-BF16 and AMX-INT8: tile products for bf16 encoders from 2
 * rows, int8 from 8). The AVX2, VNNI and AMX paths quantize the input rows of an int8 encoder
 * in blocks of 128 values, and avx512_vnni / avx512_amx round those of a bf16 encoder to bf16;
 * the others use the float32 rows. */
SAEHOOK_API saehook_status saehook_set_isa(const char *name);
SAEHOOK_API const char *saehook_get_isa(void);
/* Comma-separated list of the paths this build has and this CPU can run. */
SAEHOOK_API const char *saehook_available_isas(void);
/* The CPU class the kernels are tuned for (chosen once from cpuid: "zen5", "zen4", "spr", "zen3",
 * "generic") and its parameters, as JSON: {"vendor", "family", "model", "stepping",
 * "detected_class", "class", "params": {...}}. Valid until the next call. */
SAEHOOK_API const char *saehook_cpu_info(void);
/* Switches the kernel parameters to another class's ("auto" = the detected one), optionally
 * followed by ",key=value" overrides, e.g. "zen4" or "zen5,stream_prefetch=512" (keys as in
 * saehook_cpu_info's params). The environment variable SAEHOOK_CPU_CLASS takes the same spec at
 * start-up. For measurement and tests: not while kernels run in other threads. Results do not
 * depend on the parameters beyond float rounding order. */
SAEHOOK_API saehook_status saehook_set_cpu_class(const char *spec);
/* 1 if this build has the CUDA kernels, else 0. */
SAEHOOK_API int saehook_cuda_available(void);

/* ---- SAE handles ---- */
SAEHOOK_API saehook_status saehook_sae_create(const saehook_sae_desc *desc, saehook_sae **out);
SAEHOOK_API void saehook_sae_destroy(saehook_sae *sae);
/* The description the handle was created from (pointers are the handle's own if it copied). */
SAEHOOK_API saehook_status saehook_sae_describe(const saehook_sae *sae, saehook_sae_desc *out);

/* Exact float32 encodes from a narrower copy of W_enc (a CPU handle with a float32 encoder).
 * dtype SAEHOOK_BF16 makes a bfloat16 copy of W_enc (half its bytes, plus 12 bytes per feature)
 * that saehook_encode (and every call that encodes: reconstruct, steer, the llama.cpp hook)
 * reads first: it bounds each pre-activation's error, keeps the features that can still be in
 * the Top-K and recomputes only those from W_enc in float32. The results are the float32
 * encode's, not an approximation; the time is about the bf16 encode's where memory bandwidth or
 * the multiply rate bounds it (batch 1, a few rows). A call whose candidates do not fit its
 * buffers (e.g. thousands of features tied within bf16's precision) or that meets a non-finite
 * value takes the float32 encode instead. SAEHOOK_F32 drops the copy. Calls encoding in other
 * threads meanwhile finish with the copy they started with (the old one's memory is freed when
 * they are done). */
SAEHOOK_API saehook_status saehook_sae_set_prefilter(saehook_sae *sae, saehook_dtype dtype,
                                                     const saehook_exec *exec);
/* out[0]: bytes the prefilter holds (0: none); out[1]: rows encoded through it; out[2]:
 * features recomputed in float32 for them; out[3]: calls that took the float32 encode. */
SAEHOOK_API saehook_status saehook_sae_prefilter_stats(const saehook_sae *sae, int64_t out[4]);

/* ---- kernels ---- */
/* Encode n rows of x (row stride x_stride) into k (values, indices) per row, sorted by value
 * descending, ties by lower index. k <= 0 means the SAE's k. For RELU/JUMPRELU/TOPK_RELU the
 * entries whose activation is zero are padding: value 0, index -1. A pre-activation that
 * overflows float32 (finite x near 3e38) fails with SAEHOOK_ERR_OVERFLOW. Scratch is bounded
 * (about 64 MiB of Top-K buffers whatever k and the thread count). */
SAEHOOK_API saehook_status saehook_encode(const saehook_sae *sae, const float *x, int64_t n,
                                          int64_t x_stride, int32_t k, float *values,
                                          int32_t *indices, const saehook_exec *exec);
/* Dense pre-activations (before the activation function): out (n, d_sae). For tests and
 * analysis; production paths use saehook_encode, which never materialises them. Values that
 * overflow float32 are returned as Inf/NaN (saehook_encode refuses them). */
SAEHOOK_API saehook_status saehook_preacts(const saehook_sae *sae, const float *x, int64_t n,
                                           int64_t x_stride, float *out, const saehook_exec *exec);
/* x_hat = sum_j values[j] * d_{indices[j]} + b_dec; out (n, d_model) with stride out_stride.
 * Index -1 is skipped; any other index outside [0, d_sae) is an error. A row of x_hat that
 * overflows float32 fails with SAEHOOK_ERR_OVERFLOW (out is then partly written). */
SAEHOOK_API saehook_status saehook_decode(const saehook_sae *sae, const float *values,
                                          const int32_t *indices, int64_t n, int32_t k,
                                          float *out, int64_t out_stride, const saehook_exec *exec);
/* Replace each row of h by its reconstruction decode(encode(h)), in place. Rows must not
 * overlap (h_stride >= d_model). All or nothing: on any error (NaN input, float32 overflow) h is
 * unchanged; for that the Top-K of all n rows is held (8k bytes per row). */
SAEHOOK_API saehook_status saehook_reconstruct(const saehook_sae *sae, float *h, int64_t n,
                                               int64_t h_stride, const saehook_exec *exec);
/* Steer rows of h in place with n_items operations sharing one encode. row_mask (n bytes, may be
 * NULL for all rows) selects the rows to change. If values_out/indices_out are not NULL they
 * receive the encode of the unsteered rows (n x k, k <= 0 meaning the SAE's k). The encode is
 * skipped when every item is ADD, CAP or RESCALE and no output is requested (saehook_steer_ex
 * with state NULL). All or nothing: a steered row that would overflow float32 fails with
 * SAEHOOK_ERR_OVERFLOW and leaves h (and the latch state) unchanged. */
SAEHOOK_API saehook_status saehook_steer(const saehook_sae *sae, float *h, int64_t n,
                                         int64_t h_stride, const saehook_steer_item *items,
                                         int32_t n_items, const uint8_t *row_mask, int32_t k,
                                         float *values_out, int32_t *indices_out,
                                         const saehook_exec *exec);
/* saehook_steer with the state of conditional steering (API version 2; state may be NULL). The
 * encode is skipped when every item is ADD, CAP or RESCALE without `when` and no output is
 * requested. */
SAEHOOK_API saehook_status saehook_steer_ex(const saehook_sae *sae, float *h, int64_t n,
                                            int64_t h_stride, const saehook_steer_item *items,
                                            int32_t n_items, const uint8_t *row_mask, int32_t k,
                                            float *values_out, int32_t *indices_out,
                                            const saehook_steer_state *state,
                                            const saehook_exec *exec);
/* The decoder direction of one feature as float32 (d_model), optionally unit-normalised. */
SAEHOOK_API saehook_status saehook_decoder_direction(const saehook_sae *sae, int32_t feature,
                                                     int32_t normalize, float *out);

/* ---- weight conversion helpers ---- */
/* Symmetric per-row int8 quantisation of a (rows, cols) matrix: scale = max|row| / 127. */
SAEHOOK_API saehook_status saehook_quantize_int8(const void *src, saehook_dtype src_dtype,
                                                 int64_t rows, int64_t cols, int8_t *q,
                                                 float *scales, const saehook_exec *exec);
/* Elementwise conversion between F32, F16 and BF16 (round to nearest even). */
SAEHOOK_API saehook_status saehook_convert(const void *src, saehook_dtype src_dtype, void *dst,
                                           saehook_dtype dst_dtype, int64_t n,
                                           const saehook_exec *exec);

/* Benchmark utility: reads `bytes` bytes at p (4-byte aligned) with the kernels' thread pool,
 * in the 2 MiB blocks the batch-1 encode streams, and returns the float sum of the data (so the
 * read cannot be optimised away): the read bandwidth the kernels can reach. */
SAEHOOK_API float saehook_read_probe(const void *p, size_t bytes, const saehook_exec *exec);

#ifdef __cplusplus
}
#endif
#endif /* SAEHOOK_H */
