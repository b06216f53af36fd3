// The instruction-set-specific inner loops of the CPU kernels. Each ISA path is the same source
// (kernels_impl.hpp) compiled with different target flags; the dispatcher picks one at run time.
#pragma once

#include "../core/common.hpp"

namespace saehook::cpu {

struct Kernels {
  const char *name;
  // out[r * ldo + j] = scale(f0 + j) * dot(x[r * ldx : +d], W row (f0 + j)) for r < R, j < nf.
  // W is feature-major (row f at byte offset f * d * dtype_size); scales is used for I8 only.
  void (*dot_block)(const float *x, int64_t ldx, int64_t R, const void *W, saehook_dtype dt,
                    const float *scales, int64_t d, int64_t f0, int64_t nf, float *out,
                    int64_t ldo);
  // y[0:d] += a * w[0:d], w of dtype dt (F32/F16/BF16).
  void (*axpy)(float a, const void *w, saehook_dtype dt, int64_t d, float *y);
  // dst[0:n] = float(src[0:n]).
  void (*to_f32)(const void *src, saehook_dtype dt, int64_t n, float *dst);
};

// The kernels in use (chosen once from the CPU, or forced by saehook_set_isa / SAEHOOK_ISA).
const Kernels &active();
// Selects a path by name ("auto", "baseline", "avx2", "avx512"); false if unavailable here.
bool select(const char *name);
// Comma-separated names of the paths this build has and this CPU runs.
const char *available();

}  // namespace saehook::cpu
