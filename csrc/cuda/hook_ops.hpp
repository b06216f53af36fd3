// The pieces of the CUDA path that the llama.cpp hook's device path (csrc/llama/device.cpp)
// calls besides the C API's operations (core/cuda_ops.hpp): row moves (hook.cu) and the
// steering kernels on an encode the hook already holds (ops.cpp). Plain C++ declarations.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch.cuh"
#include "saehook.h"

namespace saehook::cuda {

namespace kern {
// dst row (dst_rows ? dst_rows[i] : i) <- src row (src_rows ? src_rows[i] : i) for i < n, `width`
// 4-byte elements per row; the row lists are device memory.
void copy_rows(void *dst, int64_t ld_dst, const int32_t *dst_rows, const void *src, int64_t ld_src,
               const int32_t *src_rows, int64_t n, int64_t width, cudaStream_t st);
// x rows (n x d, stride ld) += alpha * v.
void add_vector(float *x, int64_t n, int64_t d, int64_t ld, const float *v, float alpha, cudaStream_t st);
}  // namespace kern

// Applies the steering items to rows of h (n x d, stride ldh) on `st`, as saehook_steer does
// after its encode: vals/idx (kk per row, device; null when no item reads z_f) are the rows'
// encode, dirs (n_items x d, device) the items' directions as steer::directions makes them,
// mask (n bytes) the rows to change or act (n x n_items bytes) whether each item applies on each
// row (act replaces mask); both device memory or null. Kernels do nothing once err (device)
// holds an error.
void steer_rows(const saehook_steer_item *items, int32_t n_items, float *h, int64_t n, int64_t ldh, int64_t d,
                const uint8_t *mask, const uint8_t *act, const float *vals, const int32_t *idx, int32_t kk,
                const float *dirs, const ErrRec *err, cudaStream_t st);

}  // namespace saehook::cuda
