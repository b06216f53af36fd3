// The instruction-set-specific inner loops of the CPU kernels. Each ISA path is the same source
// (kernels_impl.hpp) compiled with different target flags; the dispatcher picks one at run time.
#pragma once

#include "../core/common.hpp"
#include "cpu_class.hpp"

namespace saehook::cpu {

// Encoding runs in two steps: `prepare` converts a chunk of input rows once into the operand
// form this path multiplies with encoder weights of dtype dt (float32 rows for most paths;
// bfloat16 rows or block-quantized int8 rows where the CPU has AVX512-BF16 / VNNI dot
// products), then `dot_block` multiplies that operand with blocks of encoder rows.
struct Kernels {
  const char *name;
  // Bytes of the operand for R rows of width d.
  size_t (*operand_bytes)(saehook_dtype dt, int64_t R, int64_t d);
  // operand <- rows x[r * ldx : +d] (minus `shift`, e.g. b_dec, when not NULL).
  void (*prepare)(const float *x, int64_t ldx, const float *shift, int64_t R, int64_t d,
                  saehook_dtype dt, void *operand);
  // out[r * ldo + j] = scale(f0 + j) * dot(row r, W row (f0 + j)) for r < R, j < nf.
  // W is feature-major (row f at byte offset f * d * dtype_size); scales is used for I8 only.
  // tp: the CPU class's parameters (cpu_class.hpp). f_next: the first feature of the block of
  // nf features this thread will likely take next (-1: none), which the packed-panel kernels
  // may prefetch while multiplying this one.
  void (*dot_block)(const void *operand, int64_t R, const void *W, saehook_dtype dt,
                    const float *scales, int64_t d, int64_t f0, int64_t nf, float *out,
                    int64_t ldo, const Tuning &tp, int64_t f_next);
  // Whether dot_block reads each weight of a block once as a stream for R rows (batch 1, the
  // few-rows order) rather than keeping the block in L2 for many rows: the caller then gives it
  // the streaming block size (Tuning::block_bytes_1 instead of block_bytes_n).
  bool (*streams)(saehook_dtype dt, int64_t R, const Tuning &tp);
  // out[0:d] += sum_j vals[j] * W row idx[j] (rows of d elements of dtype dt; idx < 0 skipped).
  void (*gather_sum)(const float *vals, const int32_t *idx, int32_t k, const void *W,
                     saehook_dtype dt, int64_t d, float *out, const Tuning &tp);
  // y[0:d] += a * w[0:d], w of dtype dt (F32/F16/BF16).
  void (*axpy)(float a, const void *w, saehook_dtype dt, int64_t d, float *y);
  // dst[0:n] = float(src[0:n]).
  void (*to_f32)(const void *src, saehook_dtype dt, int64_t n, float *dst);
};

// The kernels in use (chosen once from the CPU, or forced by saehook_set_isa / SAEHOOK_ISA).
const Kernels &active();
// Selects a path by name ("auto", "baseline", "avx2", "avx2_vnni", "avx512", "avx512_vnni_int8",
// "avx512_vnni", "avx512_amx"); false if unavailable here.
bool select(const char *name);
// Comma-separated names of the paths this build has and this CPU runs.
const char *available();

}  // namespace saehook::cpu
