// Row moves for the llama.cpp hook's device path (csrc/llama/device.cpp): gathering the rows an
// encode needs, scattering its Top-K back to their rows, and adding one vector to every row
// (taking a control vector out of the residual the captures read).
#include <cstdint>

#include "hook_ops.hpp"

namespace saehook::cuda::kern {

namespace {

// One block per row: dst row (dst_rows ? dst_rows[i] : i) <- src row (src_rows ? src_rows[i] : i),
// `width` 4-byte elements.
__global__ void __launch_bounds__(256) copy_rows_kernel(uint32_t *dst, int64_t ld_dst, const int32_t *dst_rows,
                                                        const uint32_t *src, int64_t ld_src, const int32_t *src_rows,
                                                        int64_t width) {
  const int64_t i = blockIdx.x;
  const int64_t rd = dst_rows ? dst_rows[i] : i, rs = src_rows ? src_rows[i] : i;
  uint32_t *o = dst + rd * ld_dst;
  const uint32_t *s = src + rs * ld_src;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) o[j] = s[j];
}

__global__ void __launch_bounds__(256) add_vector_kernel(float *x, int64_t d, int64_t ld, const float *v, float alpha) {
  float *row = x + int64_t(blockIdx.x) * ld;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) row[j] = fmaf(alpha, v[j], row[j]);
}

}  // namespace

void copy_rows(void *dst, int64_t ld_dst, const int32_t *dst_rows, const void *src, int64_t ld_src,
               const int32_t *src_rows, int64_t n, int64_t width, cudaStream_t st) {
  if (n <= 0) return;
  copy_rows_kernel<<<unsigned(n), 256, 0, st>>>(static_cast<uint32_t *>(dst), ld_dst, dst_rows,
                                                static_cast<const uint32_t *>(src), ld_src, src_rows, width);
}

void add_vector(float *x, int64_t n, int64_t d, int64_t ld, const float *v, float alpha, cudaStream_t st) {
  if (n <= 0) return;
  add_vector_kernel<<<unsigned(n), 256, 0, st>>>(x, d, ld, v, alpha);
}

}  // namespace saehook::cuda::kern
