// The CUDA implementations behind the C API (csrc/cuda/*.cu), used for handles whose
// desc.cuda is set. Same contracts as ops.hpp, with device pointers and a caller's stream.
// For steer, `items` and `state` stay in host memory (a handful of structs, per-row bytes);
// h, row_mask and the outputs are device memory. Only declared when the build has CUDA (SAEHOOK_WITH_CUDA); api.cpp refuses CUDA handles
// with SAEHOOK_ERR_UNSUPPORTED otherwise.
#pragma once

#include "common.hpp"

namespace saehook::cuda {

// Checks the description of a CUDA handle (pointers are device memory on d.cuda_device).
void validate(const saehook_sae_desc &d);
void encode(const Sae &s, const float *x, int64_t n, int64_t ldx, int32_t k, float *values,
            int32_t *indices, void *stream);
void preacts(const Sae &s, const float *x, int64_t n, int64_t ldx, float *out, void *stream);
void decode(const Sae &s, const float *values, const int32_t *indices, int64_t n, int32_t k,
            float *out, int64_t ldo, void *stream);
void reconstruct(const Sae &s, float *h, int64_t n, int64_t ldh, void *stream);
void steer(const Sae &s, float *h, int64_t n, int64_t ldh, const saehook_steer_item *items,
           int32_t n_items, const uint8_t *row_mask, int32_t k, float *values_out,
           int32_t *indices_out, const saehook_steer_state *state, void *stream);
// out is host memory (d_model floats).
void decoder_direction(const Sae &s, int32_t feature, bool normalize, float *out);

}  // namespace saehook::cuda
