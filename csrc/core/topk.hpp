// Streaming Top-K selection shared by the CPU kernels (and usable from device code).
//
// Order: value descending, ties broken by the lower feature index. `better(a, b)` is that order.
// A TopK buffer accepts candidates in any order; it keeps at most `cap` (>= k) of them and, when
// full, compacts to the k best, raising the admission threshold. Each candidate is compared with
// the threshold once, so the cost per pre-activation is one comparison for almost all features.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define SAEHOOK_HD __host__ __device__
#else
#define SAEHOOK_HD
#endif

namespace saehook {

struct Cand {
  float v;
  int32_t i;
};

SAEHOOK_HD inline bool better(float av, int32_t ai, float bv, int32_t bi) {
  return av > bv || (av == bv && ai < bi);
}

struct CandBetter {
  bool operator()(const Cand &a, const Cand &b) const { return better(a.v, a.i, b.v, b.i); }
};

class TopK {
 public:
  // buf must hold cap >= k candidates.
  void reset(int32_t k, Cand *buf, int32_t cap) {
    k_ = k;
    buf_ = buf;
    cap_ = cap;
    n_ = 0;
    has_floor_ = false;
  }

  // Is (v, i) good enough to be among the k best seen so far?
  inline bool admits(float v, int32_t i) const {
    return !has_floor_ || better(v, i, floor_v_, floor_i_);
  }

  inline void push(float v, int32_t i) {
    if (!admits(v, i)) return;
    if (n_ == cap_) compact();
    buf_[n_++] = Cand{v, i};
  }

  // Keep only the k best; afterwards admits() rejects anything not better than the k-th.
  void compact() {
    if (n_ <= k_) return;
    std::nth_element(buf_, buf_ + (k_ - 1), buf_ + n_, CandBetter());
    floor_v_ = buf_[k_ - 1].v;
    floor_i_ = buf_[k_ - 1].i;
    has_floor_ = true;
    n_ = k_;
  }

  // Every candidate with a value below this is rejected (-inf until the first compaction).
  float floor_value() const { return has_floor_ ? floor_v_ : -__builtin_inff(); }

  int32_t size() const { return n_; }
  const Cand *data() const { return buf_; }
  Cand *data() { return buf_; }

 private:
  int32_t k_ = 0, cap_ = 0, n_ = 0;
  Cand *buf_ = nullptr;
  bool has_floor_ = false;
  float floor_v_ = 0.f;
  int32_t floor_i_ = 0;
};

// Writes the k best of cands[0:n] (sorted) to values/indices; missing entries are padding
// (value 0, index -1). Reorders cands.
inline void finalize_topk(Cand *cands, int64_t n, int32_t k, float *values, int32_t *indices) {
  int64_t m = std::min<int64_t>(n, k);
  std::partial_sort(cands, cands + m, cands + n, CandBetter());
  for (int64_t j = 0; j < m; ++j) {
    values[j] = cands[j].v;
    indices[j] = cands[j].i;
  }
  for (int64_t j = m; j < k; ++j) {
    values[j] = 0.f;
    indices[j] = -1;
  }
}

}  // namespace saehook
