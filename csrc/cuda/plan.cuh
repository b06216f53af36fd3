// How an encode is cut into row chunks and feature tiles, and the scratch memory that takes.
// Host-only arithmetic (compiled by nvcc into ops and by g++ into tests/cuda_host), so the
// invariants are unit-tested without a GPU.
//
// Encode of a chunk of R rows:
//   1. the rows become the GEMM operand (R x ldk: f32, or f16/bf16 divided by a power-of-two
//      row scale),
//   2. per feature tile of T features: P (R x T f32 scratch) = operand . W_enc[tile]^T, then the
//      segment kernel reads P one segment of S features per block, applies scale + bias +
//      activation, and writes the segment's best min(k, S) keys to the row's candidate pool,
//   3. the final kernel selects the k best keys of each row's pool and sorts them.
// The n x d_sae pre-activations never exist: P holds R x T of them, and the pool holds
// ceil(d_sae / S) * min(k, S) keys per row.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace saehook::cuda {

enum class Gemm : int {
  Skinny = 0,  // few rows: custom kernel, weights streamed once, exact f32 math
  Cublas = 1,  // cuBLAS GemmEx (f32 operand for f32 weights; f16/bf16 operand otherwise)
  Tiled = 2,   // custom shared-memory tiled kernel, exact f32 math (no cuBLAS)
  Mma = 3,     // up to kMmaRows rows of 16-bit or int8 weights: tensor cores, weights streamed
               // once per chunk, the operand split in two 16-bit halves (near-f32 products)
};

constexpr int64_t kSegment = 4096;      // features per selection block (16 KiB of floats)
constexpr int64_t kSortSmem = 4096;     // final sort in shared memory up to this many keys
constexpr int64_t kStageMax = 4096;     // final select stages a row's pool in shared memory
// The most dynamic shared memory the final kernel is ever given (a staged pool plus the sort
// buffer); final_select sets the kernel's limit to exactly this, whatever the call.
constexpr int64_t kFinalSmemMax = (kStageMax + kSortSmem) * 8;
constexpr int64_t kSkinnyRows = 8;      // row chunks up to this use the skinny kernel
constexpr int64_t kMaxRows = 8192;      // rows per chunk (grid.y of the segment kernel)
// Rows per chunk of the tensor-core kernel: 16 for 16-bit weights, 32 for int8 (more rows per
// pass are slower than cuBLAS there: the operand's L2 traffic grows with them). Calls of up to
// kMmaCallRows* rows use it: 16-bit weights one pass, as fast as cuBLAS and more exact; int8
// weights a pass per 32 rows, faster than converting every weight to f16 for cuBLAS up to about
// 64 rows (H100: 64 rows 0.50 ms, against 1.3 ms).
constexpr int64_t kMmaRows16 = 16, kMmaRowsI8 = 32;
constexpr int64_t kMmaCallRows16 = kMmaRows16, kMmaCallRowsI8 = 64;
constexpr int64_t kOperandAlign = 64;   // operand rows are zero padded to a multiple of this

struct Budget {
  size_t preacts = size_t(32) << 20;   // P tile
  size_t pool = size_t(64) << 20;      // candidate pools (+ global sort buffers)
  size_t operand = size_t(32) << 20;   // GEMM operand rows
  size_t dequant = size_t(128) << 20;  // int8 -> f16 weight tile for cuBLAS (few, wide tiles)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline uint64_t pow2_at_least(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

struct EncodePlan {
  int64_t d_model = 0, d_sae = 0, k = 0;
  int64_t S = 0;          // segment size (kSegment, or d_sae when smaller)
  int64_t n_seg = 0;      // segments in d_sae
  int64_t kt = 0;         // pool slots per segment: min(k, S)
  int64_t M = 0;          // pool keys per row: n_seg * kt
  int64_t ldk = 0;        // operand row stride (elements, multiple of kOperandAlign)
  int64_t R = 0;          // rows per chunk
  int64_t T = 0;          // features per tile: a multiple of S, or d_sae
  int64_t sort_n = 0;     // final sort size of a row (power of two >= k)
  bool sort_global = false;  // k > kSortSmem: the final sort runs in global memory
  bool stage = false;        // the pool of a row fits the final kernel's shared memory
  size_t final_smem = 0;     // dynamic shared memory of the final kernel
};

// A plan for n rows (n >= 1). `dequant_tile`: the int8 encoder may go through cuBLAS (the tile
// is then also bounded by the int8 -> f16 buffer). `max_rows`: the GEMM's own row limit.
inline EncodePlan plan_encode(int64_t n, int64_t d_model, int64_t d_sae, int64_t k,
                              bool dequant_tile, const Budget &b = Budget(), int64_t max_rows = kMaxRows) {
  EncodePlan p;
  p.d_model = d_model;
  p.d_sae = d_sae;
  p.k = k;
  p.S = std::min(kSegment, d_sae);
  p.n_seg = ceil_div(d_sae, p.S);
  p.kt = std::min(k, p.S);
  p.M = p.n_seg * p.kt;
  p.ldk = round_up(d_model, kOperandAlign);
  p.sort_n = int64_t(pow2_at_least(uint64_t(k)));
  p.sort_global = k > kSortSmem;
  p.stage = p.M <= kStageMax;
  p.final_smem = size_t(p.stage ? p.M : 0) * 8 + size_t(p.sort_global ? 0 : p.sort_n) * 8;

  const int64_t per_row_pool = p.M * 8 + (p.sort_global ? p.sort_n * 8 : 0);
  int64_t R = std::min<int64_t>(n, std::min(kMaxRows, max_rows));
  R = std::min<int64_t>(R, std::max<int64_t>(1, int64_t(b.pool) / per_row_pool));
  R = std::min<int64_t>(R, std::max<int64_t>(1, int64_t(b.operand) / (p.ldk * 4)));
  // Keep the GEMM wide: a full-size P tile needs T >= S, so R is bounded by the P budget too.
  R = std::min<int64_t>(R, std::max<int64_t>(1, int64_t(b.preacts) / (p.S * 4)));
  p.R = std::max<int64_t>(R, 1);

  int64_t T = int64_t(b.preacts) / (p.R * 4) / p.S * p.S;
  if (dequant_tile) T = std::min<int64_t>(T, int64_t(b.dequant) / (d_model * 2) / p.S * p.S);
  T = std::max<int64_t>(T, p.S);
  p.T = T >= d_sae ? d_sae : T;
  return p;
}

// Bytes of the P tile scratch.
inline size_t plan_preacts_bytes(const EncodePlan &p) { return size_t(p.R) * size_t(p.T) * 4; }
inline size_t plan_pool_bytes(const EncodePlan &p) { return size_t(p.R) * size_t(p.M) * 8; }
inline size_t plan_sort_bytes(const EncodePlan &p) {
  return p.sort_global ? size_t(p.R) * size_t(p.sort_n) * 8 : 0;
}
inline size_t plan_operand_bytes(const EncodePlan &p) { return size_t(p.R) * size_t(p.ldk) * 4; }
inline size_t plan_dequant_bytes(const EncodePlan &p) { return size_t(p.T) * size_t(p.d_model) * 2; }

// Which GEMM runs a call of n rows. `mma_ok`: the weights suit the tensor-core kernel
// (16-bit or int8, rows aligned for its vector loads); `int8`: they are int8.
inline Gemm choose_gemm(int64_t n, bool have_cublas, bool mma_ok = false, bool int8 = false) {
  if (mma_ok && n <= (int8 ? kMmaCallRowsI8 : kMmaCallRows16)) return Gemm::Mma;
  if (n <= kSkinnyRows) return Gemm::Skinny;
  return have_cublas ? Gemm::Cublas : Gemm::Tiled;
}

// The row limit of a chunk for a GEMM.
inline int64_t gemm_max_rows(Gemm g, bool int8) {
  return g != Gemm::Mma ? kMaxRows : int8 ? kMmaRowsI8 : kMmaRows16;
}

// The template row count of the tensor-core kernel (8 rows per n-tile) for a chunk of rows.
inline int mma_rows(int64_t rows) { return rows <= 8 ? 8 : rows <= 16 ? 16 : 32; }

// The template row count of the skinny kernel for a chunk of `rows` (1..kSkinnyRows) rows.
inline int skinny_rows(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

// A bump allocator laying out one scratch block (256-byte aligned parts).
struct Layout {
  size_t size = 0;
  size_t take(size_t bytes) {
    const size_t at = size;
    size += (bytes + 255) & ~size_t(255);
    return at;
  }
};

}  // namespace saehook::cuda
