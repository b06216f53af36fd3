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
// Everything else is the shared float32 code (kernels_impl.hpp).
#define SAEHOOK_VBYTES 32
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels_impl.hpp"

namespace saehook::cpu::SAEHOOK_ISA_NS {

#include "kernels_i8_operand.inc"

static size_t operand_bytes(saehook_dtype dt, int64_t R, int64_t d) {
  return dt == SAEHOOK_I8 ? i8_operand_bytes(R, d) : operand_bytes_f32(dt, R, d);
}

static void prepare(const float *x, int64_t ldx, const float *shift, int64_t R, int64_t d,
                    saehook_dtype dt, void *operand) {
  if (dt == SAEHOOK_I8) return prepare_i8(x, ldx, shift, R, d, operand);
  prepare_f32(x, ldx, shift, R, d, dt, operand);
}

static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// 32 weight bytes from i (fewer at the row end: the rest zero, never read past the row), in the
// form dot_step takes: unsigned w + 128 for vpdpbusd (zero padding becomes 128 and meets
// zero-padded inputs), the int8 values themselves otherwise.
static inline __m256i load_weights(const int8_t *w, int64_t i, int64_t end) {
  __m256i v;
  if (end - i >= 32) {
    v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + i));
  } else {
    alignas(32) int8_t tail[32] = {};
    std::memcpy(tail, w + i, size_t(end - i));
    v = _mm256_load_si256(reinterpret_cast<const __m256i *>(tail));
  }
  return SAEHOOK_AVX2_VNNI ? _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80))) : v;
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

// One row: one feature row after the other (a sequential stream), a block's four 32-byte steps
// as independent dot products.
static void row_i8(const uint8_t *x, int64_t dpad, const int8_t *W, int64_t d, int64_t nf, const float *wscale,
                   float *out, int64_t prefetch) {
  static_assert(kQBlock == 128, "row_i8 unrolls a block into four 32-byte steps");
  const float *xs = reinterpret_cast<const float *>(x + dpad);
  const int64_t nb = i8_blocks(d);
  auto step = [&](const int8_t *w, int64_t i) {
    return dot_step(_mm256_setzero_si256(), load_weights(w, i, d),
                    _mm256_load_si256(reinterpret_cast<const __m256i *>(x + i)));
  };
  for (int64_t j = 0; j < nf; ++j) {
    const int8_t *w = W + j * d;
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t b0 = b * kQBlock, b1 = std::min(d, b0 + kQBlock);
      prefetch_ahead(w + b0, kQBlock, prefetch);
      __m256i sum;
      if (b1 - b0 == kQBlock) {
        sum = _mm256_add_epi32(_mm256_add_epi32(step(w, b0), step(w, b0 + 32)),
                               _mm256_add_epi32(step(w, b0 + 64), step(w, b0 + 96)));
      } else {
        sum = _mm256_setzero_si256();
        for (int64_t i = b0; i < b1; i += 32) sum = _mm256_add_epi32(sum, step(w, i));
      }
      acc += float(hsum_epi32(sum)) * xs[b];
    }
    out[j] = (acc - offset_correction(x, dpad, nb)) * wscale[j];
  }
}

static bool streams(saehook_dtype dt, int64_t R, const Tuning &tp) {
  return dt != SAEHOOK_I8 ? streams_f32(dt, R, tp) : R == 1;
}

static void dot_block(const void *operand, int64_t R, const void *Wv, saehook_dtype dt, const float *scales,
                      int64_t d, int64_t f0, int64_t nf, float *out, int64_t ldo, const Tuning &tp,
                      int64_t f_next) {
  if (dt != SAEHOOK_I8) return dot_block_f32(operand, R, Wv, dt, scales, d, f0, nf, out, ldo, tp, f_next);
  const uint8_t *x = i8_base(const_cast<void *>(operand));
  const int8_t *W = static_cast<const int8_t *>(Wv) + f0 * d;
  const float *ws = scales + f0;
  const int64_t rb = i8_row_bytes(d), dpad = round_up(d, 64);
  if (R == 1) return row_i8(x, dpad, W, d, nf, ws, out, tp.stream_prefetch);
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
