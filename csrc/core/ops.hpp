// The SAE operations behind the C API (validated inputs, throw saehook::Error on bad ones).
#pragma once

#include <atomic>

#include "common.hpp"

namespace saehook {

void check_finite(const float *x, int64_t n, int64_t d, int64_t stride, const char *what);
// Index of the first row of out (n rows, stride ld, d wide) holding an Inf/NaN, or -1.
int64_t first_nonfinite_row(const float *out, int64_t n, int64_t d, int64_t ld);
// Lowers `slot` to `r` (the first failing row wins, whichever thread finds it).
void record_row(std::atomic<int64_t> &slot, int64_t r);

void encode(const Sae &s, const float *x, int64_t n, int64_t ldx, int32_t k, float *values,
            int32_t *indices, int threads);
void preacts(const Sae &s, const float *x, int64_t n, int64_t ldx, float *out, int threads);
void decode(const Sae &s, const float *values, const int32_t *indices, int64_t n, int32_t k,
            float *out, int64_t ldo, int threads);
void reconstruct(const Sae &s, float *h, int64_t n, int64_t ldh, int threads);
// steer: steer_modes.hpp (steer::run)
void decoder_direction(const Sae &s, int32_t feature, bool normalize, float *out);

}  // namespace saehook
