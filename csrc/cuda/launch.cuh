// Host-side declarations of the CUDA kernels' launchers (csrc/cuda/encode.cu, sparse.cu), used
// by the orchestration in ops.cpp. Plain C++: no device code here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace saehook::cuda {

// The first error a kernel found, in device memory at the start of every call's scratch block.
// Positions are minimised with atomicMin so the report names the same element the CPU's
// sequential scan would; kNoError (all bits set: the memset value) means none.
struct ErrRec {
  unsigned long long nan_pos;   // input: row * d_model + column of the first NaN/Inf
  unsigned long long idx_pos;   // decode: first entry (row * k + j) with a bad index or value
  unsigned long long dir_item;  // steer: first item whose decoder direction cannot be normalised
  unsigned long long unused;
};
constexpr unsigned long long kNoError = ~0ull;

// Up to kBatchItems steering items passed by value to the steering kernels.
constexpr int kBatchItems = 64;
struct ItemBatch {
  int32_t n;      // items in this batch
  int32_t first;  // index of the batch's first item in the call's item list
  int32_t feature[kBatchItems];
  int32_t op[kBatchItems];
  float value[kBatchItems];
  float value2[kBatchItems];
  int32_t normalize[kBatchItems];
  int32_t has_projection;  // a CAP or RESCALE item: the items then apply one after another
};

namespace kern {

// err->nan_pos <- first non-finite element of x (n rows of d, stride ld).
void check_finite(const float *x, int64_t n, int64_t d, int64_t ld, ErrRec *err, cudaStream_t st);

// GEMM operand formats: f32 rows; f16/bf16 rows (cuBLAS); split rows, hi and lo halves of the
// 16-bit type (the tensor-core kernel: 2 rows per row).
enum Operand : int { kOpF32 = 0, kOpF16 = 1, kOpBF16 = 2, kOpF16Split = 3, kOpBF16Split = 4 };

// The GEMM operand of n rows: (x - shift) as f32 (kOpF32, row_scale 1) or as 16-bit values
// divided by a power-of-two row scale (max |row| / scale in [0.5, 1)), ld ldk (zero padded).
void prepare_operand(const float *x, int64_t n, int64_t ldx, int64_t d, const float *shift,
                     int op_dtype, void *xop, int64_t ldk, float *row_scale, const ErrRec *err,
                     cudaStream_t st);

// P[r * ldp + j] = dot(xop row r, W row f0 + j) for r < rows, j < nf; W of `dtype` (f32, f16,
// bf16 or int8 values, unscaled), rows of K elements. Exact f32 accumulation.
void skinny_gemm(int dtype, const float *xop, int64_t ldk, int64_t rows, const void *W, int64_t K,
                 int64_t f0, int64_t nf, float *P, int64_t ldp, const ErrRec *err, cudaStream_t st);
// The same with tensor cores, for up to kMmaRows rows of f16/bf16/int8 weights (the operand
// split, kOpF16Split for f16 and int8 weights, kOpBF16Split for bf16) where mma_supported.
void mma_gemm(int dtype, const unsigned short *xop, int64_t ldk, int64_t rows, const void *W, int64_t K,
              int64_t f0, int64_t nf, float *P, int64_t ldp, const ErrRec *err, cudaStream_t st);
bool mma_supported(int dtype, const void *W, int64_t K);
void tiled_gemm(int dtype, const float *xop, int64_t ldk, int64_t rows, const void *W, int64_t K,
                int64_t f0, int64_t nf, float *P, int64_t ldp, const ErrRec *err, cudaStream_t st);

// dst[i] = half(q[i]) for i < count (exact: |q| <= 127).
void dequant_i8(const int8_t *q, int64_t count, void *dst, cudaStream_t st);

struct SegmentArgs {
  const float *P;           // the tile's raw dot products (rows x tile), ld ldp
  int64_t ldp;
  int64_t rows;
  int64_t f0;               // first feature of the tile (a multiple of S)
  int64_t nf;               // features in the tile
  int64_t d_sae;
  int64_t S;                // segment size
  int64_t kt;               // pool slots per segment
  int64_t n_seg;            // segments in d_sae (pool segments per row)
  const float *row_scale;   // (rows,)
  const float *enc_scales;  // int8 only, else null
  const float *b_enc;       // or null
  const float *threshold;   // jumprelu only
  int activation;
  uint64_t *pool;           // rows x n_seg x kt keys
  const ErrRec *err;
};
void segment_select(const SegmentArgs &a, cudaStream_t st);

struct FinalArgs {
  const uint64_t *pool;            // rows x M keys
  int64_t rows;
  int64_t M;
  int32_t k;
  bool stage;                      // copy a row's pool to shared memory first
  bool sort_global;                // sort in `sort_buf` (rows x sort_n) instead of shared memory
  int64_t sort_n;
  uint64_t *sort_buf;
  size_t smem;                     // dynamic shared memory
  float *values;                   // rows x k
  int32_t *indices;
  const ErrRec *err;
};
void final_select(const FinalArgs &a, cudaStream_t st);

// out[r * ld + f0 + j] = pre_activation(P[r * ldp + j], row_scale[r], enc_scales, b_enc, f0 + j)
// for r < rows, j < nf (nothing once err holds an error).
void preacts_epilogue(const float *P, int64_t ldp, float *out, int64_t rows, int64_t ld, int64_t f0,
                      int64_t nf, const float *row_scale, const float *enc_scales, const float *b_enc,
                      const ErrRec *err, cudaStream_t st);

// err->idx_pos <- first entry e < count with indices[e] outside [-1, m) or a non-finite value.
void decode_check(const float *values, const int32_t *indices, int64_t count, int64_t m,
                  ErrRec *err, cudaStream_t st);

// out rows (stride ldo) = b_dec + sum_j values[r, j] * d_{indices[r, j]} (index -1 skipped).
void decode(int dtype, int layout, const float *values, const int32_t *indices, int64_t n,
            int32_t kk, const void *W, int64_t d, int64_t m, const float *b_dec, float *out,
            int64_t ldo, const ErrRec *err, cudaStream_t st);

// dirs[(b.first + t) * d : +d] = decoder direction of item t (normalised where asked);
// a zero direction to normalise sets err->dir_item.
void steer_directions(const ItemBatch &b, int dtype, int layout, const void *W, int64_t d,
                      int64_t m, float *dirs, ErrRec *err, cudaStream_t st);

// Rows r < n of h (mask[r] != 0, or all when mask is null) += c_t * dirs[b.first + t] for the
// batch's items in order, c_t from the row's encode (vals/idx, kk per row; null when no item
// reads it) or, for CAP/RESCALE, from the row's projection on dirs[t] as the earlier items left
// it. act (n x n_items, or null): whether each item applies on each row (it then replaces mask).
void steer_apply(const ItemBatch &b, float *h, int64_t n, int64_t ldh, int64_t d,
                 const uint8_t *mask, const uint8_t *act, int32_t n_items, const float *vals,
                 const int32_t *idx, int32_t kk, const float *dirs, const ErrRec *err, cudaStream_t st);

// A kernel of this build, for checking that the device can run them.
const void *probe_kernel();

}  // namespace kern
}  // namespace saehook::cuda
