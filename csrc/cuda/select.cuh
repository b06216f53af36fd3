// Top-K selection logic of the CUDA kernels, written as plain functions that compile for the
// device (nvcc) and for the host (g++: tests/cuda_host/select_test.cpp checks them against a
// brute-force reference). Everything here is pure logic: no CUDA runtime calls, no intrinsics
// outside `#ifdef __CUDA_ARCH__`.
//
// Keys. A candidate (value v, feature i) becomes one 64-bit key whose unsigned order is the
// selection order of the CPU kernels (topk.hpp's `better`: value descending, ties by the lower
// feature index):
//     key = ord(v) << 32 | ~i
// where ord maps floats to uint32 monotonically (-0.0 and +0.0 both map to ord(+0.0), since the
// CPU compares them equal and breaks the tie by index). i >= 0 makes ~i >= 2^31, so a real key is
// never 0: key 0 (kEmpty) marks an empty slot of a candidate list. NaN is never a candidate.
//
// Selection of the k best keys of a list (unique keys) is an MSD radix select on 8-bit digits:
// each pass histograms the digit of the keys still "in play" (matching the prefix chosen so far),
// and `radix_apply` descends into the bin that holds the need-th best key. It ends as soon as the
// chosen bin holds exactly the keys still needed, which leaves a threshold T with
//     #{valid keys >= T} == k.
// The selected keys are then compacted (in any order) and sorted with a bitonic network.
#pragma once

#include <cstdint>
#include <cstring>

#include "../core/topk.hpp"  // SAEHOOK_HD, better()

namespace saehook::cuda::sel {

constexpr uint64_t kEmpty = 0;           // an empty candidate slot; below every real key
constexpr uint64_t kNoneSelected = ~0ull;  // threshold that selects nothing

SAEHOOK_HD inline uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#endif
}

SAEHOOK_HD inline float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, 4);
  return v;
#endif
}

// Monotonic map float -> uint32 (for non-NaN v): a < b  <=>  ord(a) < ord(b); ord(-0) == ord(+0).
SAEHOOK_HD inline uint32_t ord_f32(float v) {
  uint32_t u = v == 0.f ? 0u : float_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

SAEHOOK_HD inline float ord_to_f32(uint32_t o) {
  return bits_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

SAEHOOK_HD inline uint64_t make_key(float v, int32_t index) {
  return (uint64_t(ord_f32(v)) << 32) | uint64_t(~uint32_t(index));
}
SAEHOOK_HD inline float key_value(uint64_t key) { return ord_to_f32(uint32_t(key >> 32)); }
SAEHOOK_HD inline int32_t key_index(uint64_t key) { return int32_t(~uint32_t(key)); }

// ---- activation epilogue (ops.cpp's encode loop) ----

// The pre-activation of feature f from the raw dot product: raw * row_scale (the power-of-two
// scale the GEMM operand was divided by; 1 for exact f32 operands), times the int8 feature
// scale, plus b_enc. Same operation order as the CPU (dot * scale, then + b_enc).
SAEHOOK_HD inline float pre_activation(float raw, float row_scale, const float *enc_scales,
                                       const float *b_enc, int64_t f) {
  float v = raw * row_scale;
  if (enc_scales) v = v * enc_scales[f];
  if (b_enc) v = v + b_enc[f];
  return v;
}

// Is `pre` a candidate of the Top-K under activation `act` (saehook_activation)? Candidates keep
// their pre-activation as their value; the rest are never output (padding instead).
SAEHOOK_HD inline bool is_candidate(float pre, int act, float threshold) {
  switch (act) {
    case 0: return pre == pre;                       // TOPK: everything but NaN
    case 1:                                          // TOPK_RELU
    case 2: return pre > 0.f;                        // RELU
    case 3: return pre > threshold && pre > 0.f;     // JUMPRELU
  }
  return false;
}

// ---- radix select ----

struct RadixState {
  uint64_t prefix;  // digits chosen so far (bits below `shift + 8` are zero)
  uint64_t mask;    // bits of the chosen digits
  uint32_t need;    // keys still to take among those matching prefix under mask
  int32_t shift;    // bit position of the digit of the next pass
  int32_t done;     // threshold() now selects exactly the requested number of keys
};

SAEHOOK_HD inline void radix_init(RadixState &s, uint32_t need) {
  s.prefix = 0;
  s.mask = 0;
  s.need = need;
  s.shift = 56;
  s.done = 0;
}

SAEHOOK_HD inline bool radix_in_play(const RadixState &s, uint64_t key) {
  return (key & s.mask) == s.prefix;
}

SAEHOOK_HD inline uint32_t radix_digit(const RadixState &s, uint64_t key) {
  return uint32_t(key >> s.shift) & 0xffu;
}

// Descend into bin `d` of this pass: `above` in-play keys lie in higher bins (all taken), `count`
// in bin d, and above < need <= above + count.
SAEHOOK_HD inline void radix_apply(RadixState &s, uint32_t d, uint32_t above, uint32_t count) {
  s.need -= above;
  s.prefix |= uint64_t(d) << s.shift;
  s.mask |= uint64_t(0xffu) << s.shift;
  if (count == s.need || s.shift == 0)
    s.done = 1;
  else
    s.shift -= 8;
}

// Keys >= threshold are the selected ones once done.
SAEHOOK_HD inline uint64_t radix_threshold(const RadixState &s) { return s.prefix; }

// One pass's bin choice, serially (bins from 255 down). Returns false if the histogram holds
// fewer than `need` keys (cannot happen when the caller's counts are right).
SAEHOOK_HD inline bool radix_step_serial(RadixState &s, const uint32_t *hist) {
  uint32_t above = 0;
  for (int d = 255; d >= 0; --d) {
    if (above + hist[d] >= s.need) {
      radix_apply(s, uint32_t(d), above, hist[d]);
      return true;
    }
    above += hist[d];
  }
  s.done = 1;
  return false;
}

// The same choice by the 32 lanes of a warp: lane l owns bins 255-8l .. 248-8l (descending).
SAEHOOK_HD inline uint32_t radix_lane_bin(int lane, int q) { return uint32_t(255 - 8 * lane - q); }

SAEHOOK_HD inline uint32_t radix_lane_sum(const uint32_t *hist, int lane) {
  uint32_t s = 0;
  for (int q = 0; q < 8; ++q) s += hist[radix_lane_bin(lane, q)];
  return s;
}

// Called by the lane whose bins hold the need-th key (excl < need <= excl + its sum), where
// excl is the number of in-play keys in the bins of the lanes before it.
SAEHOOK_HD inline void radix_lane_walk(RadixState &s, const uint32_t *hist, int lane, uint32_t excl) {
  uint32_t above = excl;
  for (int q = 0; q < 8; ++q) {
    const uint32_t d = radix_lane_bin(lane, q);
    if (above + hist[d] >= s.need) {
      radix_apply(s, d, above, hist[d]);
      return;
    }
    above += hist[d];
  }
}

// ---- bitonic sort (descending) ----

SAEHOOK_HD inline uint32_t next_pow2(uint32_t v) {
  uint32_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Compare-exchange t (0 <= t < N/2) of the step (size, stride) of a bitonic network over N keys
// (N, size, stride powers of two, stride < size <= N): pair (i, j = i + stride), ordered
// descending where (i & size) == 0 and ascending otherwise. The last stage (size == N) is all
// descending, so the network sorts descending.
SAEHOOK_HD inline void bitonic_pair(uint32_t t, uint32_t size, uint32_t stride, uint32_t &i,
                                    uint32_t &j, bool &desc) {
  i = ((t & ~(stride - 1)) << 1) | (t & (stride - 1));
  j = i + stride;
  desc = (i & size) == 0;
}

SAEHOOK_HD inline void bitonic_exchange(uint64_t *a, uint32_t i, uint32_t j, bool desc) {
  const uint64_t x = a[i], y = a[j];
  if (desc ? x < y : x > y) {
    a[i] = y;
    a[j] = x;
  }
}

// ---- output ----

// Entry j of an output row from the kk selected keys sorted descending: the key's (value,
// index), or padding (0, -1) past them.
SAEHOOK_HD inline void output_entry(const uint64_t *sorted, uint32_t kk, uint32_t j, float &value,
                                    int32_t &index) {
  if (j < kk) {
    value = key_value(sorted[j]);
    index = key_index(sorted[j]);
  } else {
    value = 0.f;
    index = -1;
  }
}

// ---- steering ----

// The coefficient of each item: saehook::steer_coefficient (csrc/core/steer_formula.hpp), shared
// with the CPU path.

// ---- key sources for the block-wide select ----

// A candidate list of keys (kEmpty = no candidate).
struct ListKeys {
  const uint64_t *keys;
  SAEHOOK_HD uint64_t operator()(int64_t i) const { return keys[i]; }
};

// Activated values of one segment of features (NaN = not a candidate), feature = base + i.
struct SegmentKeys {
  const float *vals;
  int64_t base;
  SAEHOOK_HD uint64_t operator()(int64_t i) const {
    const float v = vals[i];
    return v != v ? kEmpty : make_key(v, int32_t(base + i));
  }
};

// The host model of the block-wide select the kernels run (serial loops in place of the
// threads): the threshold T with #{valid keys >= T} == need, for 1 <= need <= #valid keys.
// The device version (device.cuh, dev::block_radix_select) makes the same passes with the
// histogram built by all threads and the bin chosen by warp 0's lanes.
template <class KeyAt>
inline uint64_t host_radix_select(const KeyAt &key_at, int64_t M, uint32_t need) {
  RadixState s;
  radix_init(s, need);
  uint32_t hist[256];
  for (;;) {
    for (int b = 0; b < 256; ++b) hist[b] = 0;
    for (int64_t i = 0; i < M; ++i) {
      const uint64_t key = key_at(i);
      if (key != kEmpty && radix_in_play(s, key)) ++hist[radix_digit(s, key)];
    }
    // Warp 0's lanes: inclusive scan of the lane sums, then the owning lane walks its bins.
    uint32_t incl = 0;
    bool found = false;
    for (int lane = 0; lane < 32; ++lane) {
      const uint32_t sum = radix_lane_sum(hist, lane), excl = incl;
      incl += sum;
      if (!found && excl < s.need && s.need <= incl) {
        radix_lane_walk(s, hist, lane, excl);
        found = true;
      }
    }
    if (!found) s.done = 1;  // the device's guard against a (impossible) short histogram
    if (s.done) break;
  }
  return radix_threshold(s);
}

}  // namespace saehook::cuda::sel
