// Host test of the CUDA kernels' selection logic (csrc/cuda/select.cuh) and encode planner
// (csrc/cuda/plan.cuh), compiled with the host compiler alone: no CUDA toolkit or GPU needed.
//
// The segment and final kernels are emulated with serial loops around the same functions the
// device code calls (keys, radix select, compaction in a random "thread" order, the bitonic
// network, output entries), and the result is compared with the CPU kernels' own selection
// (topk.hpp's finalize_topk over every candidate, the candidates chosen as in ops.cpp).
//
//   g++ -std=c++17 -O2 -I csrc/include tests/cuda_host/select_test.cpp -o select_test && ./select_test
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "saehook.h"
#include "../../csrc/cuda/plan.cuh"
#include "../../csrc/cuda/select.cuh"
#include "../../csrc/core/steer_formula.hpp"

using namespace saehook;
using namespace saehook::cuda;
using namespace saehook::cuda::sel;

static long g_checks = 0, g_failed = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    ++g_checks;                                           \
    if (!(cond)) {                                        \
      if (++g_failed <= 20) {                             \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

static std::mt19937_64 rng(12345);

// ---------------------------------------------------------------- keys

static void test_keys() {
  const float inf = std::numeric_limits<float>::infinity();
  const float denorm = std::numeric_limits<float>::denorm_min();
  std::vector<float> special = {0.f, -0.f, 1.f, -1.f, inf, -inf, denorm, -denorm, 1e-38f, -1e-38f,
                                3.4e38f, -3.4e38f, 0.5f, 0.25f, 1.0000001f, 0.99999994f};
  std::uniform_real_distribution<float> U(-10.f, 10.f);
  for (int i = 0; i < 200; ++i) special.push_back(U(rng));
  for (int i = 0; i < 50; ++i) special.push_back(std::ldexp(U(rng), int(rng() % 200) - 100));
  const std::vector<int32_t> idx = {0, 1, 2, 7, 1000, 131071, 2147483646, 2147483647};
  for (float a : special)
    for (float b : special)
      for (int32_t i : idx)
        for (int32_t j : {int32_t(0), int32_t(3), int32_t(131071)}) {
          if (i == j) continue;
          const bool kb = make_key(a, i) > make_key(b, j);
          CHECK(kb == better(a, i, b, j), "a=%g i=%d b=%g j=%d", a, i, b, j);
        }
  for (float a : special)
    for (int32_t i : idx) {
      const uint64_t key = make_key(a, i);
      CHECK(key != kEmpty && key >= (uint64_t(1) << 31), "key of %g %d", a, i);
      CHECK(key_value(key) == a, "value roundtrip %g", a);
      CHECK(key_index(key) == i, "index roundtrip %d", i);
      if (a != 0.f) {
        float back = key_value(key);
        CHECK(std::memcmp(&back, &a, 4) == 0, "bitwise roundtrip %g", a);
      }
    }
}

// ---------------------------------------------------------------- epilogue & steering

static void test_epilogue() {
  const float th[1] = {0.5f}, es[1] = {0.25f}, b[1] = {-1.f};
  CHECK(pre_activation(8.f, 1.f, nullptr, nullptr, 0) == 8.f, "plain");
  CHECK(pre_activation(8.f, 0.5f, es, b, 0) == 8.f * 0.5f * 0.25f - 1.f, "scaled");
  for (float v : {-2.f, -0.f, 0.f, 0.25f, 0.5f, 0.75f, std::nanf("")}) {
    CHECK(is_candidate(v, SAEHOOK_ACT_TOPK, 0.f) == !std::isnan(v), "topk %g", v);
    CHECK(is_candidate(v, SAEHOOK_ACT_TOPK_RELU, 0.f) == (v > 0.f), "topk_relu %g", v);
    CHECK(is_candidate(v, SAEHOOK_ACT_RELU, 0.f) == (v > 0.f), "relu %g", v);
    CHECK(is_candidate(v, SAEHOOK_ACT_JUMPRELU, th[0]) == (v > th[0] && v > 0.f), "jumprelu %g", v);
    CHECK(is_candidate(v, SAEHOOK_ACT_JUMPRELU, -1.f) == (v > 0.f), "jumprelu negative threshold %g", v);
  }
  const float z = 1.5f, val = 4.f;
  CHECK(steer_coefficient(SAEHOOK_STEER_ADD, val, 0.f, z, 0.f) == val, "add");
  CHECK(steer_coefficient(SAEHOOK_STEER_CLAMP, val, 0.f, z, 0.f) == val - z, "clamp");
  CHECK(steer_coefficient(SAEHOOK_STEER_SCALE, val, 0.f, z, 0.f) == (val - 1.f) * z, "scale");
  CHECK(steer_coefficient(SAEHOOK_STEER_ABLATE, 0.f, 0.f, z, 0.f) == -z, "ablate");
  // cap [lo, hi] = [-1, 2] on the projection p: moves only outside the bound, exactly 0 at it
  CHECK(steer_coefficient(SAEHOOK_STEER_CAP, 2.f, -1.f, z, 3.5f) == 2.f - 3.5f, "cap above");
  CHECK(steer_coefficient(SAEHOOK_STEER_CAP, 2.f, -1.f, z, -4.f) == -1.f + 4.f, "cap below");
  CHECK(steer_coefficient(SAEHOOK_STEER_CAP, 2.f, -1.f, z, 2.f) == 0.f, "cap at the bound");
  CHECK(steer_coefficient(SAEHOOK_STEER_CAP, INFINITY, -1.f, z, 1e30f) == 0.f, "cap without max");
  CHECK(steer_coefficient(SAEHOOK_STEER_RESCALE, 0.f, 0.f, z, 3.f) == -3.f, "rescale 0");
  CHECK(steer_coefficient(SAEHOOK_COND_ABOVE, 1.f, 0.f, z, 3.f) == 0.f, "a condition adds nothing");
}

// ---------------------------------------------------------------- radix select

static void check_threshold(const std::vector<uint64_t> &keys, uint32_t need, uint64_t T, const char *what) {
  std::vector<uint64_t> valid;
  for (uint64_t k : keys)
    if (k != kEmpty) valid.push_back(k);
  std::sort(valid.rbegin(), valid.rend());
  size_t count = 0;
  for (uint64_t k : valid) count += k >= T;
  CHECK(count == need, "%s: %zu keys >= T, need %u (valid %zu)", what, count, need, valid.size());
  if (need >= 1 && need <= valid.size()) {
    CHECK(valid[need - 1] >= T, "%s: need-th key below T", what);
    if (need < valid.size()) CHECK(valid[need] < T, "%s: key after need-th above T", what);
  }
}

static void test_radix() {
  // Lane-parallel bin choice == serial bin choice, on random histograms.
  for (int trial = 0; trial < 2000; ++trial) {
    uint32_t hist[256];
    uint32_t total = 0;
    const int sparse = trial % 3;
    for (int b = 0; b < 256; ++b) {
      hist[b] = sparse == 0 ? uint32_t(rng() % 4) : (rng() % 17 == 0 ? uint32_t(rng() % 50) : 0);
      total += hist[b];
    }
    if (!total) continue;
    RadixState a, b;
    radix_init(a, 1 + uint32_t(rng() % total));
    a.shift = int32_t(8 * (rng() % 8));
    b = a;
    radix_step_serial(a, hist);
    uint32_t incl = 0;
    bool found = false;
    for (int lane = 0; lane < 32; ++lane) {
      const uint32_t s = radix_lane_sum(hist, lane), excl = incl;
      incl += s;
      if (!found && excl < b.need && b.need <= incl) {
        radix_lane_walk(b, hist, lane, excl);
        found = true;
      }
    }
    CHECK(found && a.prefix == b.prefix && a.mask == b.mask && a.need == b.need && a.shift == b.shift &&
              a.done == b.done,
          "lane walk differs from serial (trial %d)", trial);
  }
  // Thresholds on lists with empties and heavy ties in value (so the index digits decide).
  for (int trial = 0; trial < 400; ++trial) {
    const int M = 1 + int(rng() % (trial < 300 ? 300 : 5000));
    const int mode = trial % 4;
    std::vector<uint64_t> keys(M);
    std::vector<int32_t> perm(M);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    uint32_t valid = 0;
    for (int i = 0; i < M; ++i) {
      if (rng() % 5 == 0) {
        keys[i] = kEmpty;
        continue;
      }
      float v;
      switch (mode) {
        case 0: v = float(int(rng() % 7) - 3); break;                       // many ties
        case 1: v = 0.f; break;                                             // all equal
        case 2: v = std::ldexp(float(rng() % 1000) / 1000.f, int(rng() % 40) - 20); break;
        default: v = float(rng() % 100000) / 7.f - 5000.f; break;
      }
      keys[i] = make_key(v, perm[i] * 3 + int(rng() % 3) * 0);
      ++valid;
    }
    if (!valid) continue;
    for (uint32_t need : {1u, valid, 1 + uint32_t(rng() % valid), (valid + 1) / 2}) {
      const uint64_t T = host_radix_select(ListKeys{keys.data()}, M, need);
      check_threshold(keys, need, T, "list");
    }
  }
}

// ---------------------------------------------------------------- bitonic

static void bitonic_host(uint64_t *a, uint32_t n) {  // the loops of dev::block_bitonic_desc
  for (uint32_t size = 2; size <= n; size <<= 1)
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1)
      for (uint32_t t = 0; t < n / 2; ++t) {
        uint32_t i, j;
        bool desc;
        bitonic_pair(t, size, stride, i, j, desc);
        CHECK(i < n && j < n && i < j, "pair out of range n=%u t=%u", n, t);
        bitonic_exchange(a, i, j, desc);
      }
}

static void test_bitonic() {
  for (uint32_t n = 1; n <= 8192; n <<= 1) {
    for (int trial = 0; trial < (n <= 64 ? 20 : 3); ++trial) {
      std::vector<uint64_t> a(n);
      for (auto &x : a) x = trial % 2 ? rng() % 5 : rng();
      std::vector<uint64_t> want = a;
      std::sort(want.rbegin(), want.rend());
      // each t of a step touches distinct elements (the device runs them concurrently)
      for (uint32_t size = 2; size <= n; size <<= 1)
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
          std::vector<char> seen(n, 0);
          bool ok = true;
          for (uint32_t t = 0; t < n / 2; ++t) {
            uint32_t i, j;
            bool desc;
            bitonic_pair(t, size, stride, i, j, desc);
            ok = ok && !seen[i] && !seen[j];
            seen[i] = seen[j] = 1;
          }
          CHECK(ok, "step (size %u, stride %u) of n=%u touches an element twice", size, stride, n);
        }
      bitonic_host(a.data(), n);
      CHECK(a == want, "bitonic n=%u trial %d", n, trial);
    }
  }
  CHECK(next_pow2(0) == 1 && next_pow2(1) == 1 && next_pow2(2) == 2 && next_pow2(3) == 4 && next_pow2(4096) == 4096 &&
            next_pow2(4097) == 8192,
        "next_pow2");
}

// ---------------------------------------------------------------- the encode pipeline

struct Problem {
  int64_t m = 0;  // d_sae
  int act = 0;
  std::vector<float> raw;  // n x m raw dot products
  std::vector<float> rs, es, b, th;
  bool use_es = false, use_b = false;
};

// The CPU kernels' answer: candidates as ops.cpp chooses them, then topk.hpp's finalize_topk.
static void cpu_reference(const Problem &p, int64_t r, int k, float *values, int32_t *indices) {
  std::vector<Cand> cands;
  for (int64_t f = 0; f < p.m; ++f) {
    float v = p.raw[r * p.m + f] * p.rs[r];
    if (p.use_es) v = v * p.es[f];
    if (p.use_b) v = v + p.b[f];
    switch (p.act) {
      case SAEHOOK_ACT_TOPK: break;
      case SAEHOOK_ACT_TOPK_RELU:
      case SAEHOOK_ACT_RELU:
        if (!(v > 0.f)) continue;
        break;
      case SAEHOOK_ACT_JUMPRELU:
        if (!(v > p.th[f] && v > 0.f)) continue;
        break;
    }
    cands.push_back(Cand{v, int32_t(f)});
  }
  finalize_topk(cands.data(), int64_t(cands.size()), k, values, indices);
}

// Compaction as the kernels do it: every key >= T goes to the next free slot, the "threads"
// arriving in a random order. Returns the number of keys taken.
template <class KeyAt>
static uint32_t compact(const KeyAt &key_at, int64_t M, uint64_t T, uint32_t cap, uint64_t *out) {
  std::vector<int64_t> order(M);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  uint32_t slot = 0;
  for (int64_t i : order) {
    const uint64_t key = key_at(i);
    if (key != kEmpty && key >= T) {
      if (slot < cap) out[slot] = key;
      ++slot;
    }
  }
  return slot;
}

// segment_kernel for (row r, segment g) of the tile starting at f0 (P: the tile, ld ldp).
static void emu_segment(const Problem &p, const float *P, int64_t ldp, int64_t r_local, int64_t r, int64_t f0,
                        int64_t g, int64_t S, int64_t kt, int64_t n_seg, std::vector<uint64_t> &pool) {
  const int64_t fb = g * S;
  const int64_t cnt = std::min(p.m - fb, S);
  const float *prow = P + r_local * ldp + (fb - f0);
  std::vector<float> vals(size_t(S), 12345.f);
  uint32_t V = 0;
  for (int64_t j = 0; j < cnt; ++j) {
    const int64_t f = fb + j;
    const float v = pre_activation(prow[j], p.rs[r], p.use_es ? p.es.data() : nullptr,
                                   p.use_b ? p.b.data() : nullptr, f);
    const bool c = is_candidate(v, p.act, p.act == SAEHOOK_ACT_JUMPRELU ? p.th[f] : 0.f);
    vals[j] = c ? v : std::numeric_limits<float>::quiet_NaN();
    V += c;
  }
  const uint32_t kk = uint32_t(std::min<int64_t>(kt, V));
  uint64_t *out = pool.data() + (r_local * n_seg + g) * kt;
  const SegmentKeys keys{vals.data(), fb};
  uint64_t T = kNoneSelected;
  if (kk > 0) T = kk == V ? 1 : host_radix_select(keys, cnt, kk);
  if (kk > 0) {
    const uint32_t taken = compact(keys, cnt, T, kk, out);
    CHECK(taken == kk, "segment %lld row %lld: took %u keys, want %u", (long long)g, (long long)r, taken, kk);
  }
  for (int64_t t = kk; t < kt; ++t) out[t] = kEmpty;
}

// final_kernel for one row's pool of M keys.
static void emu_final(const uint64_t *keys, int64_t M, int k, float *values, int32_t *indices) {
  uint32_t V = 0;
  for (int64_t i = 0; i < M; ++i) V += keys[i] != kEmpty;
  const uint32_t kk = std::min<uint32_t>(uint32_t(k), V);
  std::vector<uint64_t> sorted(next_pow2(std::max<uint32_t>(kk, 1)), 777);
  if (kk > 0) {
    const uint64_t T = kk == V ? 1 : host_radix_select(ListKeys{keys}, M, kk);
    const uint32_t n2 = next_pow2(kk);
    const uint32_t taken = compact(ListKeys{keys}, M, T, kk, sorted.data());
    CHECK(taken == kk, "final: took %u keys, want %u", taken, kk);
    for (uint32_t i = kk; i < n2; ++i) sorted[i] = kEmpty;
    bitonic_host(sorted.data(), n2);
  }
  for (int j = 0; j < k; ++j) output_entry(sorted.data(), kk, uint32_t(j), values[j], indices[j]);
}

// The whole encode of p's rows with segment size S, tile T (a multiple of S or m), k.
static void run_pipeline(const Problem &p, int64_t n, int64_t S, int64_t T, int k, const char *what) {
  const int64_t n_seg = ceil_div(p.m, S), kt = std::min<int64_t>(k, S), M = n_seg * kt;
  std::vector<uint64_t> pool(size_t(n * M), 999);
  std::vector<float> tile(size_t(n * T));
  for (int64_t f0 = 0; f0 < p.m; f0 += T) {
    const int64_t nf = std::min(T, p.m - f0);
    for (int64_t r = 0; r < n; ++r)  // the GEMM's output tile (ld T)
      for (int64_t j = 0; j < nf; ++j) tile[r * T + j] = p.raw[r * p.m + f0 + j];
    for (int64_t r = 0; r < n; ++r)
      for (int64_t s = 0; s < ceil_div(nf, S); ++s) emu_segment(p, tile.data(), T, r, r, f0, f0 / S + s, S, kt, n_seg, pool);
  }
  for (int64_t r = 0; r < n; ++r) {
    std::vector<float> gv(k), rv(k);
    std::vector<int32_t> gi(k), ri(k);
    emu_final(pool.data() + r * M, M, k, gv.data(), gi.data());
    cpu_reference(p, r, k, rv.data(), ri.data());
    bool same = true;
    for (int j = 0; j < k; ++j) same = same && gi[j] == ri[j] && gv[j] == rv[j];
    CHECK(same, "%s: m=%lld S=%lld T=%lld k=%d act=%d row %lld differs (first: gpu %d %g, cpu %d %g)", what,
          (long long)p.m, (long long)S, (long long)T, k, p.act, (long long)r, gi[0], gv[0], ri[0], rv[0]);
  }
}

static Problem make_problem(int64_t n, int64_t m, int act, int style) {
  Problem p;
  p.m = m;
  p.act = act;
  p.raw.resize(size_t(n * m));
  std::normal_distribution<float> N(0.f, 1.f);
  for (auto &v : p.raw) {
    switch (style) {
      case 0: v = N(rng); break;
      case 1: v = float(int(rng() % 9) - 4) * 0.25f; break;  // ties everywhere
      case 2: v = -std::fabs(N(rng)) - 0.1f; break;          // nothing positive
      default: v = rng() % 10 == 0 ? std::fabs(N(rng)) : -1.f; break;  // few positives
    }
  }
  p.rs.resize(size_t(n));
  for (auto &s : p.rs) s = style == 1 ? 1.f : std::ldexp(1.f, int(rng() % 5) - 2);
  p.use_es = rng() % 2;
  p.use_b = style != 2 && rng() % 2;
  p.es.resize(size_t(m));
  p.b.resize(size_t(m));
  p.th.resize(size_t(m));
  for (int64_t f = 0; f < m; ++f) {
    p.es[f] = style == 1 ? 0.5f : 0.01f + float(rng() % 100) / 50.f;
    p.b[f] = style == 1 ? 0.f : 0.1f * N(rng);
    p.th[f] = std::fabs(0.3f * N(rng));
  }
  return p;
}

static void test_pipeline() {
  struct Shape {
    int64_t n, m, S, T;
  };
  const std::vector<Shape> shapes = {
      {3, 1, 1, 1},     {2, 2, 1, 2},      {4, 5, 2, 4},       {3, 40, 40, 40},    {3, 40, 7, 21},
      {2, 301, 64, 128}, {2, 301, 301, 301}, {2, 1000, 100, 1000}, {1, 4096, 4096, 4096}, {2, 5000, 4096, 4096},
      {1, 10000, 4096, 8192}, {1, 9000, 1024, 3072},
  };
  for (const Shape &s : shapes)
    for (int act = 0; act < 4; ++act)
      for (int style = 0; style < 4; ++style) {
        const Problem p = make_problem(s.n, s.m, act, style);
        std::set<int> ks = {1, int(s.m), int(1 + rng() % s.m), int(std::min<int64_t>(s.m, 2)),
                            int(std::min<int64_t>(s.m, s.S + 1))};
        for (int k : ks) run_pipeline(p, s.n, s.S, s.T, k, "pipeline");
      }
  // With the planner's own segment size and tile.
  for (int64_t m : {37, 4096, 4097, 12288}) {
    const Problem p = make_problem(2, m, int(rng() % 4), int(rng() % 4));
    for (int k : {1, 50, int(m)}) {
      if (k > m) continue;
      const EncodePlan pl = plan_encode(2, 64, m, k, false);
      run_pipeline(p, 2, pl.S, pl.T, k, "planned");
    }
  }
}

// ---------------------------------------------------------------- planner

static void test_plan() {
  const Budget b;
  size_t max_final_smem = 0;
  for (int64_t n : {1, 2, 8, 9, 64, 300, 4096, 100000})
    for (int64_t d : {16, 37, 64, 2048, 5120, 100000})
      for (int64_t m : {1, 40, 301, 4096, 4097, 65536, 131072})
        for (int64_t k : {1, 7, 64, 100, 4096, 4097, 131072}) {
          if (k > m) continue;
          for (bool deq : {false, true}) {
            const EncodePlan p = plan_encode(n, d, m, k, deq, b);
            const bool ok_basic = p.R >= 1 && p.R <= std::min<int64_t>(n, kMaxRows) && p.S >= 1 && p.S <= kSegment &&
                                  p.n_seg * p.S >= m && (p.n_seg - 1) * p.S < m && p.kt == std::min(k, p.S) &&
                                  p.M == p.n_seg * p.kt && p.M >= k;
            CHECK(ok_basic, "basic n=%lld d=%lld m=%lld k=%lld", (long long)n, (long long)d, (long long)m, (long long)k);
            CHECK(p.T == m || (p.T % p.S == 0 && p.T < m), "tile n=%lld m=%lld T=%lld S=%lld", (long long)n,
                  (long long)m, (long long)p.T, (long long)p.S);
            CHECK(p.T >= std::min(p.S, m), "tile too small");
            CHECK(p.ldk >= d && p.ldk % 8 == 0, "ldk");
            CHECK(p.sort_n >= k && (p.sort_n & (p.sort_n - 1)) == 0, "sort_n");
            CHECK(p.sort_global == (k > kSortSmem), "sort_global");
            CHECK(!p.stage || p.M <= kStageMax, "stage");
            // final_select sets the kernel's dynamic shared memory limit to kFinalSmemMax for every
            // call that needs more than the default 48 KiB: no plan may ask for more.
            CHECK(p.final_smem <= size_t(kFinalSmemMax), "final smem %zu", p.final_smem);
            max_final_smem = std::max(max_final_smem, p.final_smem);
            // Budgets hold unless one row alone exceeds them (R = 1 then).
            CHECK(p.R == 1 || plan_pool_bytes(p) + plan_sort_bytes(p) <= b.pool, "pool budget");
            CHECK(p.R == 1 || plan_operand_bytes(p) <= b.operand, "operand budget");
            CHECK(plan_preacts_bytes(p) <= std::max(b.preacts, size_t(p.R) * size_t(std::min(p.S, m)) * 4),
                  "preacts budget");
            CHECK(!deq || p.T == std::min(p.S, m) || plan_dequant_bytes(p) <= b.dequant || p.T == m, "dequant budget");
            // 32-bit launch dimensions
            CHECK(p.R <= 65535 && ceil_div(p.T, p.S) <= 2147483647, "grid");
          }
        }
  // The limit is reached (m = k = 4096: a staged pool of 4096 keys plus a 4096-key sort) and,
  // with the kernel's ~1 KiB of static shared memory, fits every architecture built (sm_86/89
  // allow 99 KiB per block).
  CHECK(max_final_smem == size_t(kFinalSmemMax), "largest final smem %zu", max_final_smem);
  CHECK(kFinalSmemMax + 2048 <= 99 * 1024, "kFinalSmemMax");
  CHECK(choose_gemm(1, true) == Gemm::Skinny && choose_gemm(8, true) == Gemm::Skinny &&
            choose_gemm(9, true) == Gemm::Cublas && choose_gemm(9, false) == Gemm::Tiled,
        "choose_gemm");
  CHECK(choose_gemm(1, true, true) == Gemm::Mma && choose_gemm(kMmaCallRows16, true, true) == Gemm::Mma &&
            choose_gemm(kMmaCallRows16 + 1, true, true) == Gemm::Cublas &&
            choose_gemm(kMmaCallRowsI8, true, true, true) == Gemm::Mma &&
            choose_gemm(kMmaCallRowsI8 + 1, false, true, true) == Gemm::Tiled,
        "choose_gemm (tensor cores)");
  for (bool i8 : {false, true})
    for (int64_t n : {1, 9, 16, 17, 32, 33, 64, 1000}) {
      const int64_t rows = i8 ? kMmaRowsI8 : kMmaRows16;
      const EncodePlan p = plan_encode(n, 4096, 65536, 100, false, b, gemm_max_rows(Gemm::Mma, i8));
      CHECK(p.R == std::min(n, rows) && p.ldk % kOperandAlign == 0, "mma plan n=%lld", (long long)n);
      CHECK(mma_rows(p.R) >= p.R && mma_rows(p.R) <= rows && mma_rows(p.R) % 8 == 0, "mma_rows %lld", (long long)p.R);
    }
  for (int r = 1; r <= 8; ++r) CHECK(skinny_rows(r) >= r && skinny_rows(r) <= 8, "skinny_rows %d", r);
  Layout L;
  const size_t a = L.take(1), c = L.take(300), e = L.take(0), f = L.take(8);
  CHECK(a == 0 && c == 256 && e == 768 && f == 768 && L.size == 1024, "layout %zu %zu %zu %zu", c, e, f, L.size);
}

int main() {
  test_keys();
  test_epilogue();
  test_radix();
  test_bitonic();
  test_pipeline();
  test_plan();
  std::printf("select_test: %ld checks, %ld failed\n", g_checks, g_failed);
  return g_failed ? 1 : 0;
}
