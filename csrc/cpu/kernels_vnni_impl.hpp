// Body of the VNNI paths, included by kernels_avx512_vnni.cpp (AVX-512 + VNNI + BF16) and
// kernels_avx512_vnni_int8.cpp (AVX-512 + VNNI without BF16: Cascade Lake, Ice Lake, Tiger Lake),
// which define SAEHOOK_ISA_NS, SAEHOOK_VBYTES (64) and SAEHOOK_VNNI_BF16 (1 or 0) and the Kernels
// table.
//
// bf16 encoder (SAEHOOK_VNNI_BF16): the input rows are rounded to bfloat16 once per row chunk and
// multiplied with vdpbf16ps (32 products per instruction, float32 accumulation), as torch's bf16
// matmul does. Without BF16 the bf16 encoder takes the plain AVX-512 loops.
// int8 encoder: the input rows quantized as kernels_i8_operand.inc describes, multiplied with
// vpdpbusd (64 products per instruction, int32 accumulation per block).
// f32 and f16 encoders use the plain AVX-512 loops (the same source as the avx512 path).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels_impl.hpp"

namespace saehook::cpu::SAEHOOK_ISA_NS {

#include "kernels_i8_operand.inc"

// acc += u8 . s8 (vpdpbusd). Inline asm: with the intrinsic, GCC 12 copied every accumulator
// through a temporary and the stack on each update, halving the kernel's speed.
static inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// ---- operand layouts ----
// bf16: R rows of round_up(d, 32) uint16 (zero padded). int8: see kernels_i8_operand.inc.
inline int64_t bf16_ld(int64_t d) { return round_up(d, 32); }

// bf16 from kXPanelRows rows: the rows are also laid out as an input panel (x_panel_tile), and
// the weights are read where they lie instead of being packed into a panel per block, which
// took a fifth of the time at 64 rows (zen4, 4096 x 65536). The panel's groups of 16 rows
// compute their padding rows too: taken only when that adds fewer than kXPanelPadding rows
// (at 100 rows, 12 padding rows cost what the pack saved: 1.01x its time).
constexpr int64_t kXPanelRows = 17, kXPanelPadding = 8;
inline bool x_panel_bf16(int64_t R) {
  return SAEHOOK_VNNI_BF16 && R >= kXPanelRows && round_up(R, 16) - R < kXPanelPadding;
}
// The input panel: for each group q of 16 rows (the last one zero padded) and each step s (a pair
// of inputs), one 64-byte vector whose lane l holds row 16 q + l's inputs 2 s and 2 s + 1.
inline int64_t x_panel_steps(int64_t d) { return bf16_ld(d) / 2; }
inline size_t x_panel_bytes(int64_t R, int64_t d) { return size_t(round_up(R, 16) * x_panel_steps(d)) * 4; }

// Where the input panel starts in a bf16 operand of R rows (64-byte aligned after the rows).
inline uint32_t *x_panel_of(const void *operand, int64_t R, int64_t d) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(operand) + uintptr_t(R * bf16_ld(d)) * 2;
  return reinterpret_cast<uint32_t *>((end + 63) & ~uintptr_t(63));
}

static size_t operand_bytes(saehook_dtype dt, int64_t R, int64_t d) {
  if (SAEHOOK_VNNI_BF16 && dt == SAEHOOK_BF16)
    // room for the input panel whenever a chunk of up to R rows may take it (encode sizes the
    // buffer for its largest chunk and prepares smaller ones in it)
    return size_t(R * bf16_ld(d)) * 2 + (SAEHOOK_VNNI_BF16 && R >= kXPanelRows ? 64 + x_panel_bytes(R, d) : 0);
  if (dt == SAEHOOK_I8) return i8_operand_bytes(R, d);
  return operand_bytes_f32(dt, R, d);
}

static void prepare(const float *x, int64_t ldx, const float *shift, int64_t R, int64_t d,
                    saehook_dtype dt, void *operand) {
  if (SAEHOOK_VNNI_BF16 && dt == SAEHOOK_BF16) {
    const int64_t ld = bf16_ld(d);
    uint16_t *o = static_cast<uint16_t *>(operand);
    for (int64_t r = 0; r < R; ++r) {
      uint16_t *orow = o + r * ld;
      for (int64_t i = 0; i < d; ++i)
        orow[i] = f32_to_bf16(shift ? x[r * ldx + i] - shift[i] : x[r * ldx + i]);
      std::fill(orow + d, orow + ld, uint16_t(0));
    }
    if (x_panel_bf16(R)) {
      uint32_t *xp = x_panel_of(operand, R, d);
      const int64_t steps = x_panel_steps(d), groups = round_up(R, 16) / 16;
      for (int64_t q = 0; q < groups; ++q)
        for (int64_t l = 0; l < 16; ++l) {
          const int64_t r = 16 * q + l;
          for (int64_t st = 0; st < steps; ++st) {
            uint32_t pair = 0;
            if (r < R) std::memcpy(&pair, o + r * ld + 2 * st, 4);
            xp[(q * steps + st) * 16 + l] = pair;
          }
        }
    }
    return;
  }
  if (dt != SAEHOOK_I8) return prepare_f32(x, ldx, shift, R, d, dt, operand);
  prepare_i8(x, ldx, shift, R, d, operand);
}

// Two kernels per dtype. Few rows (generation, batch < kPackRows): a dot-product tile over
// each feature's contiguous weight row, which streams the weights once at full bandwidth.
// More rows (prompt processing): the block of feature rows is first packed into a panel where
// one vector holds 16 features x (2 bf16 | 4 int8) consecutive inputs, then a register tile of
// R rows x G*16 features multiplies broadcast input pairs/quads with panel vectors: no
// horizontal sums, every weight vector loaded once is used for R rows.
constexpr int64_t kPackRows = 4;
// float32 weights pack from more rows: packing costs a pass over the block, and below 16 rows
// the dot-product tiles were as fast (8 rows: 57 ms against 60 at 4096 x 65536); with the
// few-rows order of kernels_impl.hpp, 12 rows took 0.90x and 16 rows 1.16x the time of the
// 4-row tiles and the panel respectively (2048 x 32768, Zen 5, alternating in one process).
constexpr int64_t kPackRowsF32 = 16;
// Panel inputs per pass (a multiple of kQBlock, for L1/L2 reuse): Tuning::panel_chunk.
// bf16 and int8 weights from kPackRows rows up to these take the few-rows order (walk_few) instead
// of the panels when Tuning::few_rows allows. Zen 5, alternating with few_rows=0 in one process
// (time against the panels): bf16 2048 x 32768 0.52-0.63x at 4-8 rows, 0.83x at 12, 0.90x at 16,
// 0.97x at 24; 4096 x 65536 0.71x at 4-8, 0.92x at 16, 1.24x at 24. int8 2048 x 32768
// 0.43-0.61x at 4-8, 0.75x at 12, 0.87x at 16, 1.21x at 24; 4096 x 65536 0.67x at 4, 0.79x at 8,
// 1.20x at 16.
constexpr int64_t kFewRowsBF16 = 16, kFewRowsI8 = 12;
// With few_rows_l2 (the next group prefetched into L2) the order starts at 2 rows instead of the
// dot tiles below kPackRows: zen4, 2048 x 32768, 0.73x / 0.69x the time at 2 / 3 bf16 rows, int8
// 0.68x / 0.56x (bench_builds alternation).
// The choices of dot_block below, one place each (dot_block and streams both ask).
inline int64_t few_rows_from(const Tuning &tp) { return tp.few_rows_l2 ? 2 : kPackRows; }
inline bool few_rows_bf16(int64_t R, const Tuning &tp) {
  return R >= few_rows_from(tp) && R <= std::min<int64_t>(tp.few_rows, kFewRowsBF16);
}
inline bool few_rows_i8(int64_t R, const Tuning &tp) {
  return R >= few_rows_from(tp) && R <= std::min<int64_t>(tp.few_rows, kFewRowsI8);
}
inline bool f32_panel(saehook_dtype dt, int64_t R) { return dt == SAEHOOK_F32 && R >= kPackRowsF32; }

// ---------------- dot-product tiles (few rows) ----------------
#if SAEHOOK_VNNI_BF16
// ws: elements from one feature row of W to the next (d; a quarter block in walk_quarters).
template <int R, int F>
static inline void dot_bf16(const uint16_t *x, int64_t ldx, const uint16_t *W, int64_t ws, int64_t d, float *out,
                            int64_t ldo, int64_t prefetch, const uint16_t *pf = nullptr, int pa = 0, int pb = 0,
                            bool l2 = false) {
  __m512 acc[R][F];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) acc[r][f] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    if (pf)  // the few-rows order's next group (walk_few), into L2 when l2 (Tuning::few_rows_l2)
      for (int f = pa; f < pb; ++f) prefetch_t0_or_t1(pf + f * d + i, l2);
    for (int f = 0; f < F; ++f) {
      if (R == 1) prefetch_ahead(W + f * ws + i, 64, prefetch);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(W + f * ws + i);
      for (int r = 0; r < R; ++r)
        acc[r][f] = _mm512_dpbf16_ps(acc[r][f], (__m512bh)_mm512_loadu_si512(x + r * ldx + i), w);
    }
  }
  if (i < d) {  // the operand is zero padded; the weights must not be read past the row end
    const __mmask32 m = _cvtu32_mask32((1u << (d - i)) - 1u);
    for (int f = 0; f < F; ++f) {
      const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(m, W + f * ws + i);
      for (int r = 0; r < R; ++r)
        acc[r][f] = _mm512_dpbf16_ps(acc[r][f], (__m512bh)_mm512_loadu_si512(x + r * ldx + i), w);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) out[r * ldo + f] = _mm512_reduce_add_ps(acc[r][f]);
}

#endif  // SAEHOOK_VNNI_BF16

// ws as for dot_bf16.
template <int R, int F>
static inline void dot_i8(const uint8_t *x, int64_t rb, int64_t dpad, const int8_t *W, int64_t ws, int64_t d,
                          const float *wscale, float *out, int64_t ldo, const int8_t *pf = nullptr, int pa = 0,
                          int pb = 0, bool l2 = false) {
  const __m512i offset = _mm512_set1_epi8(char(0x80));
  __m512 facc[R][F];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) facc[r][f] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < d; b0 += kQBlock) {
    const int64_t b1 = std::min(d, b0 + kQBlock);
    __m512i iacc[R][F];
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) iacc[r][f] = _mm512_setzero_si512();
    int64_t i = b0;
    for (; i + 64 <= b1; i += 64) {
      if (pf)  // the few-rows order's next group (walk_few), into L2 when l2
        for (int f = pa; f < pb; ++f) prefetch_t0_or_t1(pf + f * d + i, l2);
      for (int f = 0; f < F; ++f) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(W + f * ws + i), offset);
        for (int r = 0; r < R; ++r) iacc[r][f] = dpbusd(iacc[r][f], w, _mm512_load_si512(x + r * rb + i));
      }
    }
    if (i < b1) {
      const __mmask64 m = _cvtu64_mask64((uint64_t(1) << (b1 - i)) - 1);
      for (int f = 0; f < F; ++f) {
        const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, W + f * ws + i), offset);
        for (int r = 0; r < R; ++r) iacc[r][f] = dpbusd(iacc[r][f], w, _mm512_load_si512(x + r * rb + i));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(reinterpret_cast<const float *>(x + r * rb + dpad)[b0 / kQBlock]);
      for (int f = 0; f < F; ++f) facc[r][f] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][f]), s, facc[r][f]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float correction = reinterpret_cast<const float *>(x + r * rb + dpad)[i8_blocks(d)];
    for (int f = 0; f < F; ++f) out[r * ldo + f] = (_mm512_reduce_add_ps(facc[r][f]) - correction) * wscale[f];
  }
}

// One input row against features [0, nf), one feature row after the other: the block's rows are
// adjacent in memory, so this reads the weights as one sequential stream (the prefetcher's best
// case: interleaving 8 short int8 rows of d bytes each starved it). A full quantization block is
// kQBlock / 64 independent 64-byte products (unrolled: with a runtime-indexed accumulator array
// GCC kept the accumulators on the stack).
static void row_i8(const uint8_t *x, int64_t dpad, const int8_t *W, int64_t d, int64_t nf,
                   const float *wscale, float *out, int64_t prefetch) {
  static_assert(kQBlock % 64 == 0 && kQBlock <= 256, "row_i8 unrolls a block into 64-byte steps");
  constexpr int kSteps = int(kQBlock / 64);
  const __m512i offset = _mm512_set1_epi8(char(0x80));
  const __m512i zero = _mm512_setzero_si512();
  const float *xs = reinterpret_cast<const float *>(x + dpad);
  const int64_t nb = i8_blocks(d);
  auto step = [&](const int8_t *w, int64_t i) {
    return dpbusd(zero, _mm512_xor_si512(_mm512_loadu_si512(w + i), offset), _mm512_load_si512(x + i));
  };
  for (int64_t j = 0; j < nf; ++j) {
    const int8_t *w = W + j * d;
    __m512 facc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t b0 = b * kQBlock, b1 = std::min(d, b0 + kQBlock);
      prefetch_ahead(w + b0, kQBlock, prefetch);
      __m512i sum;
      if (b1 - b0 == kQBlock) {
        sum = step(w, b0);
#pragma GCC unroll 4
        for (int q = 1; q < kSteps; ++q) sum = _mm512_add_epi32(sum, step(w, b0 + 64 * q));
      } else {  // the row's last, partial block: the weights must not be read past the row end
        sum = zero;
        for (int64_t i = b0; i < b1; i += 64) {
          const int64_t left = b1 - i;
          const __m512i wv = left >= 64 ? _mm512_loadu_si512(w + i)
                                        : _mm512_maskz_loadu_epi8(_cvtu64_mask64((uint64_t(1) << left) - 1), w + i);
          sum = dpbusd(sum, _mm512_xor_si512(wv, offset), _mm512_load_si512(x + i));
        }
      }
      facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xs[b]), facc);
    }
    out[j] = (_mm512_reduce_add_ps(facc) - xs[nb]) * wscale[j];
  }
}

// Rows in groups of RG x features in groups of FG, then the last rows one at a time with
// `single` (1, 2, 4 or 8: Tuning::batch1_rows_bf16 for bf16) features interleaved, 1 at the edge.
template <int RG, int FG, class Tile>
static inline void walk_dot(int64_t R, int64_t nf, int single, const Tile &tile) {
  using std::integral_constant;
  int64_t r = 0;
  for (; r + RG <= R; r += RG) {
    int64_t j = 0;
    for (; j + FG <= nf; j += FG) tile(integral_constant<int, RG>(), integral_constant<int, FG>(), r, j);
    for (; j < nf; ++j) tile(integral_constant<int, RG>(), integral_constant<int, 1>(), r, j);
  }
  auto one_row = [&](auto f, int64_t r) {
    int64_t j = 0;
    for (; j + decltype(f)::value <= nf; j += decltype(f)::value) tile(integral_constant<int, 1>(), f, r, j);
    for (; j < nf; ++j) tile(integral_constant<int, 1>(), integral_constant<int, 1>(), r, j);
  };
  for (; r < R; ++r) switch (single) {
      case 1: one_row(integral_constant<int, 1>(), r); break;
      case 2: one_row(integral_constant<int, 2>(), r); break;
      case 4: one_row(integral_constant<int, 4>(), r); break;
      default: one_row(integral_constant<int, 8>(), r); break;
    }
}

// ---------------- packed panels (many rows) ----------------
// Panel layout: for each step s (a pair of bf16 / a quad of int8 inputs) and each group g of 16
// features, one 64-byte vector: lane l holds the step's inputs of feature 16 g + l. Inputs past
// d meet zero padding in the operand, so their weights never matter.
// In-register transpose of a 16 x 16 matrix of 32-bit elements: r[i][j] -> r[j][i].
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// Packs features [0, nf) of W (feature-major rows of `row_bytes`) into the panel, 16 steps of
// 4 bytes (2 bf16 / 4 int8) at a time with one 16 x 16 transpose per group. `flip` XORs every
// byte with it (0x80 turns int8 into the unsigned +128 form vpdpbusd takes). Bytes past the
// row end and features past nf are zero before the flip.
static void pack(const uint8_t *W, int64_t row_bytes, int64_t nf, uint32_t *panel, uint8_t flip) {
  const int64_t ng = (nf + 15) / 16, steps = (row_bytes + 3) / 4;
  const __m512i fl = _mm512_set1_epi8(char(flip));
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t s0 = 0; s0 < steps; s0 += 16) {
      const int64_t bytes = std::min<int64_t>(64, row_bytes - 4 * s0);
      const __mmask64 m = bytes >= 64 ? ~__mmask64(0) : _cvtu64_mask64((uint64_t(1) << bytes) - 1);
      __m512i r[16];
      for (int l = 0; l < 16; ++l) {
        const int64_t f = g * 16 + l;
        r[l] = f < nf ? _mm512_maskz_loadu_epi8(m, W + f * row_bytes + 4 * s0) : _mm512_setzero_si512();
        r[l] = _mm512_xor_si512(r[l], fl);
      }
      transpose16(r);
      const int64_t n_steps = std::min<int64_t>(16, steps - s0);
      for (int64_t c = 0; c < n_steps; ++c) _mm512_store_si512(panel + ((s0 + c) * ng + g) * 16, r[c]);
    }
}

static inline __mmask16 lane_mask(int64_t valid) {
  return valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1u);
}

// Float accumulation over a panel: R rows x G groups over steps [s0, s1); accumulates into out
// (first pass starts from zero). `Step` multiplies one step: its inputs of a row, broadcast to
// every lane, with a panel vector (the same 4 bytes per lane in both).
// NextBlock (kernels_impl.hpp) spreads the prefetch of the next block over the calls.
template <class Step, int R, int G>
static inline void panel_float(const typename Step::In *x, int64_t ldx, const uint32_t *panel, int64_t ng,
                               int64_t g0, int64_t s0, int64_t s1, float *out, int64_t ldo, int64_t nf,
                               const char *pf = nullptr, int64_t pf_lines = 0) {
  __m512 acc[R][G];
  for (int g = 0; g < G; ++g) {
    const __mmask16 m = lane_mask(nf - (g0 + g) * 16);
    for (int r = 0; r < R; ++r)
      acc[r][g] = s0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, out + r * ldo + (g0 + g) * 16);
  }
  for (int64_t s = s0; s < s1; ++s) {
    if (s - s0 < pf_lines) prefetch_t1(pf + 64 * (s - s0));
    __m512i b[G];
    for (int g = 0; g < G; ++g) b[g] = _mm512_load_si512(panel + (s * ng + g0 + g) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i a = Step::broadcast(x + r * ldx, s);
      for (int g = 0; g < G; ++g) acc[r][g] = Step::madd(acc[r][g], a, b[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __mmask16 m = lane_mask(nf - (g0 + g) * 16);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo + (g0 + g) * 16, m, acc[r][g]);
  }
}

struct StepF32 {  // a step is one float input
  using In = float;
  static __m512i broadcast(const float *x, int64_t s) { return _mm512_castps_si512(_mm512_set1_ps(x[s])); }
  static __m512 madd(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
};

#if SAEHOOK_VNNI_BF16
struct StepBF16 {  // a step is a pair of bf16 inputs (vdpbf16ps)
  using In = uint16_t;
  static __m512i broadcast(const uint16_t *x, int64_t s) {
    int32_t pair;
    std::memcpy(&pair, x + 2 * s, 4);
    return _mm512_set1_epi32(pair);
  }
  static __m512 madd(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

// Many bf16 rows from the input panel: G groups of 16 rows x F features over steps [s0, s1),
// each weight pair broadcast from its row of W as it lies (no per-block pack: the panel of the
// inputs is built once per row chunk, in prepare) and multiplied with the G groups' vectors of
// that step. Accumulates feature-major into outT (feature f's 16 rows of group g at
// outT[f * ldt + 16 g]; the first pass starts from zero). W rows hold d inputs: with d odd the
// last step's second weight is past the row and taken as zero.
template <int G, int F>
static inline void x_panel_tile(const uint32_t *xp, int64_t steps, const uint16_t *W, int64_t d, int64_t s0,
                                int64_t s1, float *outT, int64_t ldt, const char *pf = nullptr, int64_t pf_lines = 0) {
  __m512 acc[G][F];
  for (int f = 0; f < F; ++f)
    for (int g = 0; g < G; ++g) acc[g][f] = s0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(outT + f * ldt + 16 * g);
  const int64_t full = std::min(s1, d / 2);
  for (int64_t s = s0; s < full; ++s) {
    if (s - s0 < pf_lines) prefetch_t1(pf + 64 * (s - s0));
    __m512i a[G];
    for (int g = 0; g < G; ++g) a[g] = _mm512_load_si512(xp + (g * steps + s) * 16);
    for (int f = 0; f < F; ++f) {
      int32_t pair;
      std::memcpy(&pair, W + f * d + 2 * s, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      for (int g = 0; g < G; ++g) acc[g][f] = _mm512_dpbf16_ps(acc[g][f], (__m512bh)a[g], b);
    }
  }
  if ((d & 1) && s0 <= d / 2 && d / 2 < s1) {  // the last, half step
    const int64_t s = d / 2;
    for (int f = 0; f < F; ++f) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int32_t(W[f * d + d - 1]));
      for (int g = 0; g < G; ++g)
        acc[g][f] = _mm512_dpbf16_ps(acc[g][f], (__m512bh)_mm512_load_si512(xp + (g * steps + s) * 16), b);
    }
  }
  for (int f = 0; f < F; ++f)
    for (int g = 0; g < G; ++g) _mm512_store_ps(outT + f * ldt + 16 * g, acc[g][f]);
}
#endif  // SAEHOOK_VNNI_BF16

// int8: int32 sums over one quantization block [b0, b1) of steps, scaled by the block's input
// scale and added into out (float). Kept as its own function so the accumulators of one block
// live in registers (GCC spilled them when the block loop was around them).
template <int R, int G>
__attribute__((always_inline)) static inline void panel_i8_block(
    const uint8_t *x, int64_t rb, int64_t dpad, const uint32_t *panel, int64_t ng, int64_t g0,
    int64_t b0, int64_t b1, bool first, float *out, int64_t ldo, int64_t nf, const char *pf, int64_t pf_lines) {
  __m512i acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_si512();
  for (int64_t s = b0; s < b1; ++s) {
    if (s - b0 < pf_lines) prefetch_t1(pf + 64 * (s - b0));
    __m512i b[G];
    for (int g = 0; g < G; ++g) b[g] = _mm512_load_si512(panel + (s * ng + g0 + g) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t *>(x + r * rb + 4 * s));
      for (int g = 0; g < G; ++g) acc[r][g] = dpbusd(acc[r][g], b[g], a);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sx = _mm512_set1_ps(reinterpret_cast<const float *>(x + r * rb + dpad)[b0 / (kQBlock / 4)]);
    for (int g = 0; g < G; ++g) {
      const __mmask16 m = lane_mask(nf - (g0 + g) * 16);
      float *o = out + r * ldo + (g0 + g) * 16;
      const __m512 prev = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, o);
      _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][g]), sx, prev));
    }
  }
}

template <int R, int G>
static inline void panel_i8(const uint8_t *x, int64_t rb, int64_t dpad, const uint32_t *panel,
                            int64_t ng, int64_t g0, int64_t s0, int64_t s1, float *out, int64_t ldo,
                            int64_t nf, const char *pf, int64_t pf_lines) {
  constexpr int64_t kStepsPerBlock = kQBlock / 4;
  for (int64_t b0 = s0; b0 < s1; b0 += kStepsPerBlock) {
    const int64_t b1 = std::min(s1, b0 + kStepsPerBlock), lines = std::min(pf_lines, b1 - b0);
    panel_i8_block<R, G>(x, rb, dpad, panel, ng, g0, b0, b1, b0 == 0, out, ldo, nf, pf, lines);
    pf += 64 * lines;
    pf_lines -= lines;
  }
}

// x_panel_tile's G (1-4) and F (1-6) as integral constants.
template <class Tile>
static inline void x_panel_dispatch(int64_t g, int64_t f, const Tile &tile) {
  using std::integral_constant;
  auto with_f = [&](auto gc) {
    switch (f) {
      case 1: return tile(gc, integral_constant<int, 1>());
      case 2: return tile(gc, integral_constant<int, 2>());
      case 3: return tile(gc, integral_constant<int, 3>());
      case 4: return tile(gc, integral_constant<int, 4>());
      case 5: return tile(gc, integral_constant<int, 5>());
      default: return tile(gc, integral_constant<int, 6>());
    }
  };
  switch (g) {
    case 1: return with_f(integral_constant<int, 1>());
    case 2: return with_f(integral_constant<int, 2>());
    case 3: return with_f(integral_constant<int, 3>());
    default: return with_f(integral_constant<int, 4>());
  }
}

// Whether dot_block below streams the block (batch 1, walk_few) or keeps it in L2 (panels).
static bool streams(saehook_dtype dt, int64_t R, const Tuning &tp) {
  if (R == 1) return true;
  if (SAEHOOK_VNNI_BF16 && dt == SAEHOOK_BF16) return few_rows_bf16(R, tp);
  if (dt == SAEHOOK_I8) return few_rows_i8(R, tp);
  return !f32_panel(dt, R) && streams_f32(dt, R, tp);
}

static void dot_block(const void *operand, int64_t R, const void *Wv, saehook_dtype dt,
                      const float *scales, int64_t d, int64_t f0, int64_t nf, float *out,
                      int64_t ldo, const Tuning &tp, int64_t f_next) {
  const int64_t ng = (nf + 15) / 16;
  const int64_t kChunk = tp.panel_chunk;
  // The next block's weights (nf rows of row_bytes after W's f_next-th row), or none.
  auto next_block = [&](int64_t row_bytes, int64_t passes, int64_t steps_per_call) {
    const bool on = tp.panel_prefetch_next && f_next >= 0;
    return NextBlock(on ? static_cast<const char *>(Wv) + f_next * row_bytes : nullptr, nf * row_bytes,
                     passes * panel_calls(R, ng, 6, 4), steps_per_call);
  };
#if SAEHOOK_VNNI_BF16
  if (dt == SAEHOOK_BF16) {
    const uint16_t *x = static_cast<const uint16_t *>(operand);
    const uint16_t *W = static_cast<const uint16_t *>(Wv) + f0 * d;
    const int64_t ld = bf16_ld(d);
    if (few_rows_bf16(R, tp)) {
      const uint16_t *Wn = f_next >= 0 ? static_cast<const uint16_t *>(Wv) + f_next * d : nullptr;
      walk_few<4, 4>(R, nf, [&](auto rg, auto fg, int64_t r, int64_t j, int64_t jn, int pa, int pb) {
        dot_bf16<decltype(rg)::value, decltype(fg)::value>(x + r * ld, ld, W + j * d, d, d, out + r * ldo + j, ldo, 0,
                                                          jn >= 0 ? W + jn * d : jn == -1 ? Wn : nullptr, pa, pb,
                                                          tp.few_rows_l2);
      });
      return;
    }
    if (R == 1 && tp.batch1_quarters) {
      walk_quarters(
          nf, out,
          [&](int64_t j, int64_t q, float *o) { dot_bf16<1, 4>(x, ld, W + j * d, q * d, d, o, 0, tp.stream_prefetch); },
          [&](int64_t j) { dot_bf16<1, 1>(x, ld, W + j * d, d, d, out + j, 0, tp.stream_prefetch); });
      return;
    }
    if (x_panel_bf16(R)) {
      const uint32_t *xp = x_panel_of(operand, R, d);
      const int64_t steps = x_panel_steps(d), Rp = round_up(R, 16), groups = Rp / 16;
      const int64_t real_steps = (d + 1) / 2, chunk = kChunk / 2;
      float *outT = panel_buffer<float>(size_t(nf * Rp));  // feature-major (a buffer apart from the uint32 panels')
      constexpr int GG = 4, FF = 4;
      const int64_t calls = ((groups + GG - 1) / GG) * ((nf + FF - 1) / FF);
      NextBlock nb(tp.panel_prefetch_next && f_next >= 0 ? static_cast<const char *>(Wv) + f_next * 2 * d : nullptr,
                   nf * 2 * d, calls * ((real_steps + chunk - 1) / chunk), chunk);
      for (int64_t s0 = 0; s0 < real_steps; s0 += chunk) {
        const int64_t s1 = std::min(real_steps, s0 + chunk);
        for (int64_t q = 0; q < groups; q += GG) {
          const int64_t nq = std::min<int64_t>(GG, groups - q);
          for (int64_t f = 0; f < nf; f += FF) {
            const int64_t nff = std::min<int64_t>(FF, nf - f);
            int64_t lines;
            const char *pf = nb.take(&lines);
            const uint32_t *xq = xp + q * steps * 16;
            float *o = outT + f * Rp + 16 * q;
            const uint16_t *Wf = W + f * d;
            x_panel_dispatch(nq, nff, [&](auto gc, auto fc) {
              x_panel_tile<decltype(gc)::value, decltype(fc)::value>(xq, steps, Wf, d, s0, s1, o, Rp, pf, lines);
            });
          }
        }
      }
      // back to rows: 16 x 16 transposes, the ragged edges one by one
      const int64_t R16 = R / 16 * 16, nf16 = nf / 16 * 16;
      for (int64_t f = 0; f < nf16; f += 16)
        for (int64_t r = 0; r < R16; r += 16) {
          __m512i t[16];
          for (int i = 0; i < 16; ++i) t[i] = _mm512_load_si512(outT + (f + i) * Rp + r);
          transpose16(t);
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (r + i) * ldo + f, t[i]);
        }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t f = r < R16 ? nf16 : 0; f < nf; ++f) out[r * ldo + f] = outT[f * Rp + r];
      return;
    }
    if (R < kPackRows) {
      walk_dot<4, 4>(R, nf, tp.batch1_rows_bf16, [&](auto rg, auto fg, int64_t r, int64_t j) {
        dot_bf16<decltype(rg)::value, decltype(fg)::value>(x + r * ld, ld, W + j * d, d, d, out + r * ldo + j, ldo,
                                                          tp.stream_prefetch);
      });
      return;
    }
    const int64_t steps = (d + 1) / 2;
    uint32_t *panel = panel_buffer<uint32_t>(size_t(steps * ng * 16));
    pack(reinterpret_cast<const uint8_t *>(W), 2 * d, nf, panel, 0);
    NextBlock nb = next_block(2 * d, (steps + kChunk / 2 - 1) / (kChunk / 2), std::min(steps, kChunk / 2));
    for (int64_t s0 = 0; s0 < steps; s0 += kChunk / 2) {
      const int64_t s1 = std::min(steps, s0 + kChunk / 2);
      walk_panel<6, 4>(R, ng, [&](auto rg, auto gg, int64_t r, int64_t g) {
        int64_t lines;
        const char *pf = nb.take(&lines);
        panel_float<StepBF16, decltype(rg)::value, decltype(gg)::value>(x + r * ld, ld, panel, ng, g, s0, s1,
                                                             out + r * ldo, ldo, nf, pf, lines);
      });
    }
    return;
  }
#endif  // without BF16 the bf16 encoder takes dot_block_f32 below
  if (dt == SAEHOOK_I8) {
    const uint8_t *x = i8_base(const_cast<void *>(operand));
    const int8_t *W = static_cast<const int8_t *>(Wv) + f0 * d;
    const int64_t rb = i8_row_bytes(d), dpad = round_up(d, 64);
    if (R == 1 && tp.batch1_quarters) {
      walk_quarters(
          nf, out,
          [&](int64_t j, int64_t q, float *o) {
            const float ws[4] = {scales[f0 + j], scales[f0 + j + q], scales[f0 + j + 2 * q], scales[f0 + j + 3 * q]};
            dot_i8<1, 4>(x, rb, dpad, W + j * d, q * d, d, ws, o, 0);
          },
          [&](int64_t j) { dot_i8<1, 1>(x, rb, dpad, W + j * d, d, d, scales + f0 + j, out + j, 0); });
      return;
    }
    // Batch 1 otherwise: one sequential stream (0.94x the read probe's rate vs 0.85x for 4
    // interleaved adjacent rows).
    if (R == 1) return row_i8(x, dpad, W, d, nf, scales + f0, out, tp.stream_prefetch_i8);
    if (few_rows_i8(R, tp)) {
      const int8_t *Wn = f_next >= 0 ? static_cast<const int8_t *>(Wv) + f_next * d : nullptr;
      walk_few<3, 4>(R, nf, [&](auto rg, auto fg, int64_t r, int64_t j, int64_t jn, int pa, int pb) {
        dot_i8<decltype(rg)::value, decltype(fg)::value>(x + r * rb, rb, dpad, W + j * d, d, d, scales + f0 + j,
                                                        out + r * ldo + j, ldo,
                                                        jn >= 0 ? W + jn * d : jn == -1 ? Wn : nullptr, pa, pb,
                                                        tp.few_rows_l2);
      });
      return;
    }
    if (R < kPackRows) {
      walk_dot<3, 4>(R, nf, 8, [&](auto rg, auto fg, int64_t r, int64_t j) {
        dot_i8<decltype(rg)::value, decltype(fg)::value>(x + r * rb, rb, dpad, W + j * d, d, d, scales + f0 + j,
                                                        out + r * ldo + j, ldo);
      });
      return;
    }
    const int64_t steps = (d + 3) / 4;
    uint32_t *panel = panel_buffer<uint32_t>(size_t(steps * ng * 16));
    pack(reinterpret_cast<const uint8_t *>(W), d, nf, panel, 0x80);
    NextBlock nb = next_block(d, (steps + kChunk / 4 - 1) / (kChunk / 4), std::min(steps, kChunk / 4));
    for (int64_t s0 = 0; s0 < steps; s0 += kChunk / 4) {
      const int64_t s1 = std::min(steps, s0 + kChunk / 4);
      walk_panel<6, 4>(R, ng, [&](auto rg, auto gg, int64_t r, int64_t g) {
        int64_t lines;
        const char *pf = nb.take(&lines);
        panel_i8<decltype(rg)::value, decltype(gg)::value>(x + r * rb, rb, dpad, panel, ng, g, s0, s1,
                                                           out + r * ldo, ldo, nf, pf, lines);
      });
    }
    // Remove the +128 offset's contribution and apply the per-feature weight scales.
    for (int64_t r = 0; r < R; ++r) {
      const float correction = reinterpret_cast<const float *>(x + r * rb + dpad)[i8_blocks(d)];
      for (int64_t j = 0; j < nf; ++j) out[r * ldo + j] = (out[r * ldo + j] - correction) * scales[f0 + j];
    }
    return;
  }
  if (f32_panel(dt, R)) {
    // The packed panel for float32 weights too: the dot-product tiles re-read every weight and
    // input vector from L2 for each 4 x 4 tile (4096 x 65536, 2-core Sapphire Rapids: batch 64
    // 243 -> 137 ms, batch 256 903 -> 468 ms; torch 179 and 479 ms). One pass over all of d:
    // chunks of 512 / 1024 / 2048 inputs took 522 / 505 / 487 ms at batch 256.
    const float *x = static_cast<const float *>(operand);  // prepare_f32: R rows of d floats
    uint32_t *panel = panel_buffer<uint32_t>(size_t(d * ng * 16));
    pack(static_cast<const uint8_t *>(Wv) + f0 * d * 4, 4 * d, nf, panel, 0);
    NextBlock nb = next_block(4 * d, 1, d);
    walk_panel<6, 4>(R, ng, [&](auto rg, auto gg, int64_t r, int64_t g) {
      int64_t lines;
      const char *pf = nb.take(&lines);
      panel_float<StepF32, decltype(rg)::value, decltype(gg)::value>(x + r * d, d, panel, ng, g, 0, d, out + r * ldo,
                                                                     ldo, nf, pf, lines);
    });
    return;
  }
  dot_block_f32(operand, R, Wv, dt, scales, d, f0, nf, out, ldo, tp, f_next);
}

}  // namespace saehook::cpu::SAEHOOK_ISA_NS
