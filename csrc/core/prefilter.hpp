// Exact float32 encodes from a bfloat16 copy of W_enc (saehook_sae_set_prefilter).
//
// The encode reads the copy (half the bytes of W_enc, and on AVX512-BF16 half the dot-product
// instructions) to get every pre-activation to within a bound e_i, keeps the features whose
// upper bound reaches the k-th largest lower bound (the only ones that can be in the Top-K),
// and recomputes those exactly from W_enc with the float32 kernel. The result is the float32
// encode's: the same features and values (bit for bit where that encode takes the same
// dot-product tiles: batch 1 and the few-rows order), not an approximation.
//
// The bound, for input row x (minus b_dec if the SAE subtracts it), its bf16 rounding x^ (what
// the AVX512-BF16 and AMX paths multiply; the others multiply x itself), feature row w and its
// copy w^ (u = 2^-24, g = (d + 2) u / (1 - (d + 2) u)):
//   |x.w - x^.w^| <= |x - x^| |w| + |x^| |w - w^|                      (Cauchy-Schwarz)
//   each computed dot product is within g * sum |terms| <= g |a| |b| of its exact value
// plus the roundings of adding b_enc, and an absolute term for the flushed denormals of the
// BF16 instructions. Norms are computed in double and rounded up.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "common.hpp"

namespace saehook {

struct Prefilter {
  std::unique_ptr<uint16_t[]> W;  // bf16 W_enc, feature-major, d_model per row
  // Per feature: |w|, |w - w^|, |w^| (rounded up).
  std::unique_ptr<float[]> norm_w, norm_dw, norm_wh;
  float max_norm_w = 0.f, max_norm_dw = 0.f, max_norm_wh = 0.f;
  size_t bytes = 0;  // what the copy and the norms hold
  // Counters (saehook_sae_prefilter_stats): rows encoded, features recomputed exactly, calls that
  // took the exact encode instead (a candidate buffer overflowed, or a non-finite value).
  std::atomic<int64_t> rows{0}, recomputed{0}, fallbacks{0};
};

// Builds the copy and the norms of a CPU float32 encoder (threads: the pool width).
std::shared_ptr<Prefilter> build_prefilter(const Sae &s, int threads);

// The encode of ops.cpp's `encode` (k resolved, x checked finite) through the prefilter. Returns
// false, having written nothing the caller relies on, when the call must take the exact encode.
bool encode_prefiltered(const Sae &s, const Prefilter &pf, const float *x, int64_t n, int64_t ldx,
                        int32_t k, float *values, int32_t *indices, int threads);

}  // namespace saehook
