// Device-side helpers shared by the kernels (nvcc only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "saehook.h"
#include "select.cuh"

namespace saehook::cuda::dev {

constexpr unsigned kFullMask = 0xffffffffu;

// Did an earlier kernel of this call find an error? Kernels that write user-visible memory
// return early then, so a failed call leaves its outputs (and in-place rows) untouched.
__device__ __forceinline__ bool has_error(const ErrRec *e) {
  return e->nan_pos != kNoError || e->idx_pos != kNoError || e->dir_item != kNoError;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// ---- weight loads (dtype codes of saehook_dtype: 0 f32, 1 f16, 2 bf16, 3 int8) ----
// one(W, i): element i as float. vec(W, i, out): V consecutive elements from i, one aligned load
// of VB bytes (the caller guarantees the alignment).
template <int DT>
struct Load;

template <>
struct Load<0> {
  static constexpr int V = 4, VB = 16, ES = 4;
  __device__ __forceinline__ static float one(const void *W, int64_t i) {
    return __ldg(static_cast<const float *>(W) + i);
  }
  __device__ __forceinline__ static void vec(const void *W, int64_t i, float (&o)[V]) {
    const float4 v = __ldg(reinterpret_cast<const float4 *>(static_cast<const float *>(W) + i));
    o[0] = v.x;
    o[1] = v.y;
    o[2] = v.z;
    o[3] = v.w;
  }
};

__device__ __forceinline__ float f16_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }
__device__ __forceinline__ float bf16_bits(uint32_t h) { return __uint_as_float(h << 16); }

template <>
struct Load<1> {
  static constexpr int V = 8, VB = 16, ES = 2;
  __device__ __forceinline__ static float one(const void *W, int64_t i) {
    return f16_bits(__ldg(static_cast<const unsigned short *>(W) + i));
  }
  __device__ __forceinline__ static void vec(const void *W, int64_t i, float (&o)[V]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4 *>(static_cast<const unsigned short *>(W) + i));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      o[2 * q] = f16_bits(w[q] & 0xffffu);
      o[2 * q + 1] = f16_bits(w[q] >> 16);
    }
  }
};

template <>
struct Load<2> {
  static constexpr int V = 8, VB = 16, ES = 2;
  __device__ __forceinline__ static float one(const void *W, int64_t i) {
    return bf16_bits(__ldg(static_cast<const unsigned short *>(W) + i));
  }
  __device__ __forceinline__ static void vec(const void *W, int64_t i, float (&o)[V]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4 *>(static_cast<const unsigned short *>(W) + i));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      o[2 * q] = __uint_as_float(w[q] << 16);
      o[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
    }
  }
};

template <>
struct Load<3> {
  static constexpr int V = 8, VB = 8, ES = 1;
  __device__ __forceinline__ static float one(const void *W, int64_t i) {
    return float(__ldg(static_cast<const signed char *>(W) + i));
  }
  __device__ __forceinline__ static void vec(const void *W, int64_t i, float (&o)[V]) {
    const uint2 u = __ldg(reinterpret_cast<const uint2 *>(static_cast<const signed char *>(W) + i));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      o[q] = float(int8_t(uint8_t(u.x >> (8 * q))));
      o[4 + q] = float(int8_t(uint8_t(u.y >> (8 * q))));
    }
  }
};

// ---- warp / block reductions ----

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Max over the block (every thread gets it). `red` holds one float per warp.
__device__ __forceinline__ float block_max(float v, float *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < nw; ++w) m = fmaxf(m, red[w]);
  __syncthreads();  // red may be reused
  return m;
}

// Sum over the block in double (every thread gets it). `red` holds one double per warp.
__device__ __forceinline__ double block_sum(double v, double *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < nw; ++w) s += red[w];
  __syncthreads();
  return s;
}

// ---- block-wide Top-K selection (the device side of sel::host_radix_select) ----

// hist[bin] += 1 for every lane with bin >= 0; lanes with the same bin add once together
// (a warp often holds many keys of one bin: values of one magnitude share the top digit).
// Every lane of the warp must call it (the callers' loops have block-uniform trip counts).
__device__ __forceinline__ void hist_add(uint32_t *hist, int bin) {
  const unsigned peers = __match_any_sync(kFullMask, bin);
  if (bin >= 0) {
    const int leader = __ffs(peers) - 1;
    if (int(threadIdx.x & 31) == leader) atomicAdd(&hist[bin], uint32_t(__popc(peers)));
  }
}

// The threshold T with #{valid keys >= T} == need among key_at(0 .. M-1) (kEmpty = invalid),
// for 1 <= need <= #valid keys (unique keys). All threads of the block call it and get T.
// blockDim.x must be a multiple of 32 and at least 32.
template <class KeyAt>
__device__ uint64_t block_radix_select(const KeyAt &key_at, int64_t M, uint32_t need,
                                       uint32_t *hist, sel::RadixState *st) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) sel::radix_init(*st, need);
  __syncthreads();
  for (;;) {
    for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const sel::RadixState s = *st;
    for (int64_t base = 0; base < M; base += blockDim.x) {
      const int64_t i = base + tid;
      int bin = -1;
      if (i < M) {
        const uint64_t key = key_at(i);
        if (key != sel::kEmpty && sel::radix_in_play(s, key)) bin = int(sel::radix_digit(s, key));
      }
      hist_add(hist, bin);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns bins 255-8l .. 248-8l; an inclusive scan of the lane sums finds the lane
      // whose bins hold the need-th key, which walks them (sel::radix_lane_walk).
      const uint32_t sum = sel::radix_lane_sum(hist, lane);
      uint32_t incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += y;
      }
      const uint32_t excl = incl - sum;
      const uint32_t total = __shfl_sync(kFullMask, incl, 31);
      if (total < s.need) {
        if (lane == 0) st->done = 1;  // cannot happen with correct counts; never loop forever
      } else if (excl < s.need && s.need <= incl) {
        sel::RadixState next = s;
        sel::radix_lane_walk(next, hist, lane, excl);
        *st = next;
      }
    }
    __syncthreads();
    if (st->done) break;
  }
  const uint64_t T = sel::radix_threshold(*st);
  __syncthreads();  // everyone has read st before a later call re-initialises it
  return T;
}

// Sorts a[0 .. n) descending (n a power of two) with the whole block; ends with a barrier when
// n >= 2 (n == 1 runs no step: the caller's barrier after writing a[0] is the last one).
__device__ __forceinline__ void block_bitonic_desc(uint64_t *a, uint32_t n) {
  for (uint32_t size = 2; size <= n; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t t = threadIdx.x; t < n / 2; t += blockDim.x) {
        uint32_t i, j;
        bool desc;
        sel::bitonic_pair(t, size, stride, i, j, desc);
        sel::bitonic_exchange(a, i, j, desc);
      }
      __syncthreads();
    }
  }
}

}  // namespace saehook::cuda::dev
