// Body of the two AVX2 paths (256-bit vectors, 16 registers), included by kernels_avx2.cpp and
// kernels_avx2_vnni.cpp, which define SAEHOOK_ISA_NS, SAEHOOK_AVX2_VNNI (1 or 0) and the Kernels
// table. The int8 encoder quantizes the input rows as the AVX-512 VNNI paths do
// (kernels_i8_operand.inc), so every int8 path computes the same products:
// - avx2_vnni (AVX-VNNI: Alder Lake and later Intel cores, Zen 5): 256-bit vpdpbusd, 32
//   products per instruction, weights entering as unsigned w + 128 (the operand's correction
//   removes the offset);
// - avx2 (Haswell to Zen 4 without AVX-512): vpmaddubsw on |w| and sign(w) * x, then vpmaddwd:
//   |w| <= 128 and |x| <= 127 keep a pair's sum within int16 (2 * 128 * 127 < 32767), so the
//   products are exact; no offset.
// Float encoders from 24 rows (f32) or 128 (bf16, f16) take the packed panels below; everything
// else is the shared float32 code (kernels_impl.hpp).
#define SAEHOOK_VBYTES 32
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels_impl.hpp"

namespace saehook::cpu::SAEHOOK_ISA_NS {

#include "kernels_i8_operand.inc"

// ---------------- packed float panels (many rows) ----------------
// From kPanelRows rows, float32, bf16 and f16 weights are packed (widened to float32) into a
// panel where one vector holds 8 features' weights of one input, and a register tile of R rows
// x G groups of 8 features multiplies broadcast inputs with panel vectors: no horizontal sums,
// every panel vector is used for R rows, and with 6 x 2 tiles there are 12 FMAs to 8 loads
// (the dot-product tiles: 8 FMAs to 6 loads over 16 registers, and every weight read again
// for each pair of rows). 2-core Zen 3 (EPYC family 25 model 1), 4096 x 65536 at batch 256,
// before: f32 2238 ms (torch f32 2187 ms), bf16 1797 ms. f32 against the dot-product tiles: 1.03x
// the time at 17 rows, 0.84x at 32, 0.67-0.73x at 64 (so from 24).
constexpr int64_t kPanelRows = 24;

// bf16 and f16 panels from kPanelRowsWiden rows: their pack widens each weight (a panel twice the
// block), which 64 rows did not pay back (4096 x 65536 bf16, time against the split dot-product
// tiles: 1.06x at 64 rows, 0.91x at 256).
constexpr int64_t kPanelRowsWiden = 128;
inline bool float_panel(saehook_dtype dt, int64_t R) {
  return dt == SAEHOOK_F32 ? R >= kPanelRows : dt != SAEHOOK_I8 && R >= kPanelRowsWiden;
}

// In-register transpose of an 8 x 8 matrix of floats: r[i][j] -> r[j][i].
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Packs features [0, nf) of W (feature-major rows of d weights of type DT) into the panel: the
// vector of input i and group g at panel + (i * ng + g) * 8, lane l = feature 8 g + l (zero past
// nf). (One stream per group, panel + (g * d + i) * 8, took 1.15x the time at 2048 x 4096.)
template <saehook_dtype DT>
static void pack_float(const uint8_t *W, int64_t d, int64_t nf, float *panel) {
  using L = Load<DT>;
  const size_t row_bytes = size_t(d) * L::size;
  const int64_t ng = (nf + 7) / 8, d8 = d / 8 * 8;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t valid = std::min<int64_t>(8, nf - 8 * g);
    const uint8_t *rows[8];  // lanes past nf read the last feature again, then are zeroed
    for (int l = 0; l < 8; ++l) rows[l] = W + (8 * g + std::min<int64_t>(l, valid - 1)) * row_bytes;
    for (int64_t i = 0; i < d8; i += 8) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) {
        const vf v = L::vec(rows[l] + i * L::size);
        std::memcpy(&r[l], &v, 32);
      }
      if (valid < 8)
        for (int l = int(valid); l < 8; ++l) r[l] = _mm256_setzero_ps();
      transpose8(r);
      for (int c = 0; c < 8; ++c) _mm256_store_ps(panel + ((i + c) * ng + g) * 8, r[c]);
    }
    for (int64_t i = d8; i < d; ++i)
      for (int l = 0; l < 8; ++l)
        panel[(i * ng + g) * 8 + l] = l < valid ? L::one(W + (8 * g + l) * row_bytes + i * L::size) : 0.f;
  }
}

static inline __m256i lane_mask8(int64_t valid) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(valid)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out[r][8 (g0 + g) + l] (+)= sum over inputs [s0, s1) of x[r][i] * panel(i, g0 + g)[l]: stores on
// the first pass, adds on the others; the lanes past nf are not written.
// pf, pf_lines: lines of the next block to prefetch, one per input (NextBlock).
template <int R, int G>
static inline void panel_tile(const float *x, int64_t ldx, const float *panel, int64_t ng, int64_t g0, int64_t s0,
                              int64_t s1, bool first, float *out, int64_t ldo, int64_t nf, const char *pf,
                              int64_t pf_lines) {
  __m256 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
  const float *p = panel + (s0 * ng + g0) * 8;
  for (int64_t i = s0; i < s1; ++i, p += ng * 8) {
    if (i - s0 < pf_lines) prefetch_t1(pf + (i - s0) * 64);
    __m256 b[G];
    for (int g = 0; g < G; ++g) b[g] = _mm256_load_ps(p + g * 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + i);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm256_fmadd_ps(a, b[g], acc[r][g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const int64_t valid = nf - 8 * (g0 + g);
    for (int r = 0; r < R; ++r) {
      float *o = out + r * ldo + 8 * (g0 + g);
      if (valid >= 8) {
        _mm256_storeu_ps(o, first ? acc[r][g] : _mm256_add_ps(_mm256_loadu_ps(o), acc[r][g]));
      } else {
        const __m256i m = lane_mask8(valid);
        _mm256_maskstore_ps(o, m, first ? acc[r][g] : _mm256_add_ps(_mm256_maskload_ps(o, m), acc[r][g]));
      }
    }
  }
}

// next: the block this thread likely takes next (nf rows of d weights; nullptr: none), prefetched
// into L2 over this block's tile calls.
template <saehook_dtype DT>
static void dot_block_panel(const float *x, int64_t R, const uint8_t *W, int64_t d, int64_t nf, float *out,
                            int64_t ldo, int64_t chunk, const uint8_t *next) {
  const int64_t ng = (nf + 7) / 8;
  float *panel = panel_buffer<float>(size_t(d * ng * 8));
  pack_float<DT>(W, d, nf, panel);
  const int64_t passes = (d + chunk - 1) / chunk;
  NextBlock nb(next, nf * d * int64_t(Load<DT>::size), passes * panel_calls(R, ng, 6, 2), std::min(d, chunk));
  // Passes over chunks of the inputs, so that a chunk of the panel stays in L2 while every row
  // tile multiplies it, and each tile's rows stay in L1.
  for (int64_t s0 = 0; s0 < d; s0 += chunk) {
    const int64_t s1 = std::min(d, s0 + chunk);
    const bool first = s0 == 0;
    walk_panel<6, 2>(R, ng, [&](auto rg, auto gg, int64_t r, int64_t g) {
      int64_t lines;
      const char *pf = nb.take(&lines);
      panel_tile<decltype(rg)::value, decltype(gg)::value>(x + r * d, d, panel, ng, g, s0, s1, first, out + r * ldo,
                                                           ldo, nf, pf, lines);
    });
  }
}

static size_t operand_bytes(saehook_dtype dt, int64_t R, int64_t d) {
  return dt == SAEHOOK_I8 ? i8_operand_bytes(R, d) : operand_bytes_f32(dt, R, d);
}

static void prepare(const float *x, int64_t ldx, const float *shift, int64_t R, int64_t d,
                    saehook_dtype dt, void *operand) {
  if (dt == SAEHOOK_I8) return prepare_i8(x, ldx, shift, R, d, operand);
  // The panels take the rows in order; the bf16 dot-product tiles split them (kernels_impl.hpp).
  prepare_f32_rows(x, ldx, shift, R, d, dt == SAEHOOK_BF16 && !float_panel(dt, R), operand);
}

static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Weights in the form dot_step takes: unsigned w + 128 for vpdpbusd, the int8 values themselves
// otherwise.
static inline __m256i weight_form(__m256i v) {
  return SAEHOOK_AVX2_VNNI ? _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80))) : v;
}

// 32 weight bytes from i (fewer at the row end: the rest zero, never read past the row), in
// weight_form (for vpdpbusd the zero padding becomes 128 and meets zero-padded inputs).
static inline __m256i load_weights(const int8_t *w, int64_t i, int64_t end) {
  if (end - i >= 32) return weight_form(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + i)));
  alignas(32) int8_t tail[32] = {};
  std::memcpy(tail, w + i, size_t(end - i));
  return weight_form(_mm256_load_si256(reinterpret_cast<const __m256i *>(tail)));
}

// acc (8 int32) += the 32 products of weights w (from load_weights) and int8 inputs x, in groups
// of four.
static inline __m256i dot_step(__m256i acc, __m256i w, __m256i x) {
#if SAEHOOK_AVX2_VNNI
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// The operand's offset correction of a row (0 where the weights enter unshifted).
static inline float offset_correction(const uint8_t *x_row, int64_t dpad, int64_t nb) {
  return SAEHOOK_AVX2_VNNI ? reinterpret_cast<const float *>(x_row + dpad)[nb] : 0.f;
}

// R rows x F features: per quantization block, int32 sums of weights x int8 inputs, scaled by
// the block's input scale into float accumulators; then minus the offset correction, times the
// feature's weight scale. R * F <= 6 keeps int and float accumulators in the 16 ymm registers.
template <int R, int F>
static void tile_i8(const uint8_t *x, int64_t rb, int64_t dpad, const int8_t *W, int64_t d, const float *wscale,
                    float *out, int64_t ldo) {
  const int64_t nb = i8_blocks(d);
  __m256 facc[R][F];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) facc[r][f] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t b0 = b * kQBlock, b1 = std::min(d, b0 + kQBlock);
    __m256i iacc[R][F];
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) iacc[r][f] = _mm256_setzero_si256();
    for (int64_t i = b0; i < b1; i += 32) {
      __m256i wv[F];
      for (int f = 0; f < F; ++f) wv[f] = load_weights(W + f * d, i, d);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i *>(x + r * rb + i));
        for (int f = 0; f < F; ++f) iacc[r][f] = dot_step(iacc[r][f], wv[f], xv);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(reinterpret_cast<const float *>(x + r * rb + dpad)[b]);
      for (int f = 0; f < F; ++f) facc[r][f] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][f]), s, facc[r][f]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float correction = offset_correction(x + r * rb, dpad, nb);
    for (int f = 0; f < F; ++f) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(facc[r][f]), _mm256_extractf128_ps(facc[r][f], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      v = _mm_add_ss(v, _mm_movehdup_ps(v));
      out[r * ldo + f] = (_mm_cvtss_f32(v) - correction) * wscale[f];
    }
  }
}

// One row of inputs against F feature rows at `stride` bytes from each other (F = 1: one row
// after the other, a sequential stream; F = 4: walk_quarters' four streams). A full quantization
// block is four 32-byte steps with direct loads, their int32 sums scaled by the block's input
// scale into a float vector (one horizontal sum per feature, not per block): on Zen 3 the former
// per-block horizontal sum, scalar accumulation and tail check per step ran one thread at 8.4
// GB/s (4096 x 65536), where float32 weights streamed at 13.7.
template <int F>
static inline void rows_i8(const uint8_t *x, int64_t dpad, const int8_t *W, int64_t stride, int64_t d,
                           const float *wscale, float *out, int64_t prefetch) {
  static_assert(kQBlock == 128, "rows_i8 unrolls a block into four 32-byte steps");
  const float *xs = reinterpret_cast<const float *>(x + dpad);
  const int64_t nb = i8_blocks(d), full = d / kQBlock;
  auto xv = [&](int64_t i) { return _mm256_load_si256(reinterpret_cast<const __m256i *>(x + i)); };
  __m256 facc[F];
  for (int f = 0; f < F; ++f) facc[f] = _mm256_setzero_ps();
  for (int64_t b = 0; b < full; ++b) {
    const int64_t b0 = b * kQBlock;
    for (int f = 0; f < F; ++f) prefetch_ahead(W + f * stride + b0, kQBlock, prefetch);
    const __m256i x0 = xv(b0), x1 = xv(b0 + 32), x2 = xv(b0 + 64), x3 = xv(b0 + 96);
    const __m256 s = _mm256_broadcast_ss(xs + b);
    for (int f = 0; f < F; ++f) {
      const int8_t *w = W + f * stride + b0;
      auto step = [&](int64_t i, __m256i xi) {  // a full block: no bounds check
        return dot_step(_mm256_setzero_si256(),
                        weight_form(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + i))), xi);
      };
      const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(step(0, x0), step(32, x1)),
                                           _mm256_add_epi32(step(64, x2), step(96, x3)));
      facc[f] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s, facc[f]);
    }
  }
  const float correction = offset_correction(x, dpad, nb);
  for (int f = 0; f < F; ++f) {
    const int8_t *w = W + f * stride;
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(facc[f]), _mm256_extractf128_ps(facc[f], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    float acc = _mm_cvtss_f32(v);
    for (int64_t b = full; b < nb; ++b) {  // the last, partial block
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = b * kQBlock; i < d; i += 32) sum = dot_step(sum, load_weights(w, i, d), xv(i));
      acc += float(hsum_epi32(sum)) * xs[b];
    }
    out[f] = (acc - correction) * wscale[f];
  }
}

static void row_i8(const uint8_t *x, int64_t dpad, const int8_t *W, int64_t d, int64_t nf, const float *wscale,
                   float *out, int64_t prefetch) {
  for (int64_t j = 0; j < nf; ++j) rows_i8<1>(x, dpad, W + j * d, d, d, wscale + j, out + j, prefetch);
}

static bool streams(saehook_dtype dt, int64_t R, const Tuning &tp) {
  if (float_panel(dt, R)) return false;
  return dt != SAEHOOK_I8 ? streams_f32(dt, R, tp) : R == 1;
}

static void dot_block(const void *operand, int64_t R, const void *Wv, saehook_dtype dt, const float *scales,
                      int64_t d, int64_t f0, int64_t nf, float *out, int64_t ldo, const Tuning &tp,
                      int64_t f_next) {
  if (float_panel(dt, R)) {
    const float *x = static_cast<const float *>(operand);
    const int64_t row_bytes = d * int64_t(dtype_size(dt));
    const uint8_t *W = static_cast<const uint8_t *>(Wv) + f0 * row_bytes;
    const uint8_t *next =
        tp.panel_prefetch_next && f_next >= 0 ? static_cast<const uint8_t *>(Wv) + f_next * row_bytes : nullptr;
    switch (dt) {
      case SAEHOOK_F32: return dot_block_panel<SAEHOOK_F32>(x, R, W, d, nf, out, ldo, tp.panel_chunk, next);
      case SAEHOOK_F16: return dot_block_panel<SAEHOOK_F16>(x, R, W, d, nf, out, ldo, tp.panel_chunk, next);
      case SAEHOOK_BF16: return dot_block_panel<SAEHOOK_BF16>(x, R, W, d, nf, out, ldo, tp.panel_chunk, next);
      default: break;
    }
  }
  if (dt != SAEHOOK_I8) return dot_block_f32(operand, R, Wv, dt, scales, d, f0, nf, out, ldo, tp, f_next);
  const uint8_t *x = i8_base(const_cast<void *>(operand));
  const int8_t *W = static_cast<const int8_t *>(Wv) + f0 * d;
  const float *ws = scales + f0;
  const int64_t rb = i8_row_bytes(d), dpad = round_up(d, 64);
  if (R == 1 && tp.batch1_quarters) {  // four streams a quarter block apart, as the read probe reads
    walk_quarters(
        nf, out,
        [&](int64_t j, int64_t q, float *o) {
          const float s4[4] = {ws[j], ws[j + q], ws[j + 2 * q], ws[j + 3 * q]};
          rows_i8<4>(x, dpad, W + j * d, q * d, d, s4, o, 0);
        },
        [&](int64_t j) { rows_i8<1>(x, dpad, W + j * d, d, d, ws + j, out + j, 0); });
    return;
  }
  if (R == 1) return row_i8(x, dpad, W, d, nf, ws, out, tp.stream_prefetch_i8);
  int64_t r = 0;
  // 3 x 2 tiles, then 2 x 2: 4096 x 65536 at batch 64 (this VM, forced ISA) avx2_vnni 162-169
  // -> 146-150 ms, avx2 199-205 -> 180-183 ms against 2 x 2 alone.
  for (; r + 3 <= R; r += 3) {
    int64_t j = 0;
    for (; j + 2 <= nf; j += 2) tile_i8<3, 2>(x + r * rb, rb, dpad, W + j * d, d, ws + j, out + r * ldo + j, ldo);
    for (; j < nf; ++j) tile_i8<3, 1>(x + r * rb, rb, dpad, W + j * d, d, ws + j, out + r * ldo + j, ldo);
  }
  for (; r + 2 <= R; r += 2) {
    int64_t j = 0;
    for (; j + 2 <= nf; j += 2) tile_i8<2, 2>(x + r * rb, rb, dpad, W + j * d, d, ws + j, out + r * ldo + j, ldo);
    for (; j < nf; ++j) tile_i8<2, 1>(x + r * rb, rb, dpad, W + j * d, d, ws + j, out + r * ldo + j, ldo);
  }
  if (r < R) {
    int64_t j = 0;
    for (; j + 4 <= nf; j += 4) tile_i8<1, 4>(x + r * rb, rb, dpad, W + j * d, d, ws + j, out + r * ldo + j, ldo);
    for (; j < nf; ++j) tile_i8<1, 1>(x + r * rb, rb, dpad, W + j * d, d, ws + j, out + r * ldo + j, ldo);
  }
}

}  // namespace saehook::cpu::SAEHOOK_ISA_NS
