// What the exact encode (ops.cpp) and the prefiltered one (prefilter.cpp) share: the row chunk
// per pass over the encoder, the scratch bound, the feature block per task and the Top-K scan's
// group test, the activation's admission rule.
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../cpu/kernels.hpp"

namespace saehook {

// Rows of x handled per pass over the encoder weights; bounds the Top-K scratch memory. Each pass
// reads (and the panel kernels pack) every weight once: at 4096 x 65536, Zen 5, 256 rows in one
// pass instead of two of 128 took 0.935x the time in bf16, 0.957x in int8, 0.968x in f32, and 512
// rows 0.957x at 256 per pass against 1.024x at 512 (alternating in one process).
constexpr int64_t kRowChunk = 256;
// encode's Top-K scan: pre-activations tested as one vector before any is pushed (most of a row's
// d_sae are below the buffer's floor once it has filled).
constexpr int kScanGroup = 16;

// Whether the group p[0:kScanGroup] (+ be, the encoder bias, when not NULL) holds a lane to look
// at: at or above the Top-K floor and above relu_floor, or not finite (v - v is NaN exactly for
// Inf and NaN). SSE on x86-64 (GCC lowered the same test on 16-float vector types to one scalar
// comparison per lane, and the scalar max/sum loop before it took ~1/8 of a batch-256 encode).
inline bool group_worth_a_look(const float *p, const float *be, float floor_v, float relu_floor) {
#if defined(__SSE2__)
  const __m128 f = _mm_set1_ps(floor_v), rf = _mm_set1_ps(relu_floor);
  __m128 look = _mm_setzero_ps();
  for (int q = 0; q < kScanGroup; q += 4) {
    __m128 v = _mm_loadu_ps(p + q);
    if (be) v = _mm_add_ps(v, _mm_loadu_ps(be + q));
    const __m128 z = _mm_sub_ps(v, v);
    look = _mm_or_ps(look, _mm_or_ps(_mm_and_ps(_mm_cmpge_ps(v, f), _mm_cmpgt_ps(v, rf)), _mm_cmpunord_ps(z, z)));
  }
  return _mm_movemask_ps(look) != 0;
#else
  bool look = false;
  for (int l = 0; l < kScanGroup; ++l) {
    const float v = be ? p[l] + be[l] : p[l];
    look |= (v >= floor_v && v > relu_floor) || !(v - v == 0.f);
  }
  return look;
#endif
}

// Upper bound of encode's per-call Top-K scratch (candidate buffers and pre-activation tiles of
// all threads; README "Memory").
constexpr int64_t kScratchBytes = int64_t(64) << 20;

// The activation's rule for which pre-activations are features: v of feature i is kept only if
// v > floor(i) (topk: any; the ReLU ones: positive; jumprelu: above the threshold and positive).
struct Admission {
  saehook_activation act;
  const float *threshold;
  float floor(int64_t i) const {
    switch (act) {
      case SAEHOOK_ACT_TOPK: return -__builtin_inff();
      case SAEHOOK_ACT_TOPK_RELU:
      case SAEHOOK_ACT_RELU: return 0.f;
      case SAEHOOK_ACT_JUMPRELU: return threshold[i] > 0.f ? threshold[i] : 0.f;
    }
    return -__builtin_inff();
  }
  // The least floor of any feature (the scan's group test).
  float least() const { return act == SAEHOOK_ACT_TOPK ? -__builtin_inff() : 0.f; }
};

// Features per task for `rows` rows of this encoder (ops.cpp).
int64_t feature_block(const saehook_sae_desc &d, int64_t rows, const cpu::Kernels &K, const cpu::Tuning &tp);

}  // namespace saehook
