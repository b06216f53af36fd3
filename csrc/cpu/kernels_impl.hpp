// Body of one ISA path. Included by kernels_<isa>.cpp after defining
//   SAEHOOK_ISA_NS  namespace name of the path
//   SAEHOOK_VBYTES  vector width in bytes (16, 32 or 64)
// and compiled with that path's target flags; the includer defines the Kernels table. The loops use GCC/Clang vector extensions, which
// the compiler lowers to the widest registers the flags allow (SSE2/NEON, AVX2, AVX-512).
#include "kernels.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace saehook::cpu::SAEHOOK_ISA_NS {

constexpr int VB = SAEHOOK_VBYTES;
constexpr int VL = VB / 4;  // floats per vector
typedef float vf __attribute__((vector_size(VB)));
typedef uint32_t vu32 __attribute__((vector_size(VB)));
typedef uint16_t vu16 __attribute__((vector_size(VB / 2)));
typedef int8_t vi8 __attribute__((vector_size(VB / 4)));

// Every lane = a. (Filling the lanes in a loop made GCC emit one masked broadcast per lane.)
static inline vf splat(float a) { return vf{} + a; }

// A prefetch into L1 (Level 0: prefetcht0) or L2 (Level 1: prefetcht1) that the compiler keeps:
// GCC 12 at -O3 deleted loops whose only effect was __builtin_prefetch / _mm_prefetch in some
// kernels (row_i8 of the VNNI and AMX paths had none left in the object code, so its
// stream_prefetch did nothing: int8 at batch 1 read 0.78 of the probe's rate on the Sapphire
// Rapids-class VM, whatever the distance). The address goes in a register, not as a memory
// operand: with "m" GCC scheduled the f32 few-rows tile around the asm worse (8 rows at 4096 x
// 65536: 1.09x the time).
template <int Level>
static inline void prefetch_to(const void *p) {
  static_assert(Level == 0 || Level == 1, "prefetch_to: level 0 (L1) or 1 (L2)");
#if defined(__x86_64__) || defined(__i386__)
  __asm__ volatile("prefetcht%c1 (%0)" ::"r"(p), "i"(Level));
#else
  __builtin_prefetch(p, 0, 3 - Level);
#endif
}
static inline void prefetch_t0(const void *p) { prefetch_to<0>(p); }
static inline void prefetch_t1(const void *p) { prefetch_to<1>(p); }
// The decode's look-ahead (Tuning::gather_l2 picks the level).
static inline void prefetch_t0_or_t1(const void *p, bool l2) { l2 ? prefetch_t1(p) : prefetch_t0(p); }

// Software prefetch of the batch-1 kernels, which stream each weight row once: the `bytes` at
// p + ahead into L1 (past a row's or block's end too: prefetches never fault); ahead is the CPU
// class's Tuning::stream_prefetch (bf16 rows) or stream_prefetch_i8 (int8 rows; 0: none). On
// the 2-core Sapphire Rapids-class VM, 4096 x 65536 against the read probe (2026-12-02, two
// threads): int8 0.88 without, 1.04 at 512 bytes ahead, 1.10 at 1 KiB, 1.11 at 2 KiB; bf16 0.88
// without, 0.97 / 0.95 / 0.92 at 512 / 1024 / 2048.
static inline void prefetch_ahead(const void *p, int64_t bytes, int64_t ahead) {
  if (ahead <= 0) return;
  for (int64_t l = 0; l < bytes; l += 64) prefetch_t0(static_cast<const char *>(p) + ahead + l);
}

// One vector of floats from p, returned by value: with memcpy into an array element per row, GCC
// copied the 4 rows of a 4 x 3 tile through the stack on every step (avx2).
static inline vf load_vf(const void *p) {
  vf v;
  std::memcpy(&v, p, VB);
  return v;
}

template <saehook_dtype DT>
struct Load;

template <>
struct Load<SAEHOOK_F32> {
  static constexpr size_t size = 4;
  static inline vf vec(const uint8_t *p) { return load_vf(p); }
  static inline float one(const uint8_t *p) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
};

template <>
struct Load<SAEHOOK_BF16> {
  static constexpr size_t size = 2;
  static inline vf vec(const uint8_t *p) {
    vf v;
#if SAEHOOK_VBYTES == 64 && defined(__AVX512F__)
    __m512i u = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))), 16);
    std::memcpy(&v, &u, VB);
#elif SAEHOOK_VBYTES == 32 && defined(__AVX2__)
    __m256i u = _mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))), 16);
    std::memcpy(&v, &u, VB);
#else
    vu16 h;
    std::memcpy(&h, p, VB / 2);
    vu32 u = __builtin_convertvector(h, vu32) << 16;
    std::memcpy(&v, &u, VB);
#endif
    return v;
  }
  static inline float one(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return bf16_to_f32(h);
  }
};

template <>
struct Load<SAEHOOK_F16> {
  static constexpr size_t size = 2;
  static inline vf vec(const uint8_t *p) {
    vf v;
#if SAEHOOK_VBYTES == 64 && defined(__AVX512F__)
    __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
    std::memcpy(&v, &r, VB);
#elif SAEHOOK_VBYTES == 32 && defined(__F16C__)
    __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    std::memcpy(&v, &r, VB);
#else
    for (int i = 0; i < VL; ++i) v[i] = one(p + 2 * i);
#endif
    return v;
  }
  static inline float one(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
  }
};

template <>
struct Load<SAEHOOK_I8> {
  static constexpr size_t size = 1;
  static inline vf vec(const uint8_t *p) {
#if SAEHOOK_VBYTES == 64 && defined(__AVX512F__)
    __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
    vf v;
    std::memcpy(&v, &r, VB);
    return v;
#elif SAEHOOK_VBYTES == 32 && defined(__AVX2__)
    __m256 r = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
    vf v;
    std::memcpy(&v, &r, VB);
    return v;
#else
    vi8 q;
    std::memcpy(&q, p, VB / 4);
    return __builtin_convertvector(q, vf);
#endif
  }
  static inline float one(const uint8_t *p) { return float(int8_t(*p)); }
};

static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// Horizontal sum; the AVX-512 reduction is a log-depth tree (the lane loop of hsum is 15 serial adds).
static inline float hsum_fast(vf v) {
#if SAEHOOK_VBYTES == 64 && defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, VB);
  return _mm512_reduce_add_ps(m);
#else
  return hsum(v);
#endif
}

// R rows x F features register tile over the full reduction length d. pf: the few-rows order's
// next group (dot_few_rows): rows [pa, pb) of it at stride row_bytes are prefetched alongside,
// one line per line consumed (nullptr: none), into L2 when l2 (Tuning::few_rows_l2), else L1.
template <saehook_dtype DT, int R, int F>
static inline void tile(const float *x, int64_t ldx, const uint8_t *W, size_t row_bytes, int64_t d,
                        float *out, int64_t ldo, const float *scales, const uint8_t *pf = nullptr, int pa = 0,
                        int pb = 0, bool l2 = false) {
  using L = Load<DT>;
  vf acc[R][F];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) acc[r][f] = vf{};
  int64_t i = 0;
  if constexpr (DT == SAEHOOK_BF16) {
    // 2 VL weights per load, split into the even and the odd ones (bf16_split_len).
    for (; i + 2 * VL <= d; i += 2 * VL) {
      if (pf && (i * 2) % 64 == 0)
        for (int f = pa; f < pb; ++f) prefetch_t0_or_t1(pf + f * row_bytes + i * 2, l2);
      vf xe[R], xo[R];
      for (int r = 0; r < R; ++r) {
        xe[r] = load_vf(x + r * ldx + i);
        xo[r] = load_vf(x + r * ldx + i + VL);
      }
      for (int f = 0; f < F; ++f) {
        vu32 u;
        std::memcpy(&u, W + f * row_bytes + i * 2, VB);
        const vf we = (vf)(u << 16), wo = (vf)(u & 0xffff0000u);
        for (int r = 0; r < R; ++r) {
          acc[r][f] += xe[r] * we;
          acc[r][f] += xo[r] * wo;
        }
      }
    }
  }
  for (; i + VL <= d; i += VL) {
    if (pf && (i * L::size) % 64 == 0)
      for (int f = pa; f < pb; ++f) prefetch_t0_or_t1(pf + f * row_bytes + i * L::size, l2);
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load_vf(x + r * ldx + i);
    for (int f = 0; f < F; ++f) {
      vf w = L::vec(W + f * row_bytes + i * L::size);
      for (int r = 0; r < R; ++r) acc[r][f] += xv[r] * w;
    }
  }
  float res[R][F];
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) res[r][f] = hsum_fast(acc[r][f]);
  for (; i < d; ++i)
    for (int f = 0; f < F; ++f) {
      float w = L::one(W + f * row_bytes + i * L::size);
      for (int r = 0; r < R; ++r) res[r][f] += x[r * ldx + i] * w;
    }
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) out[r * ldo + f] = scales ? res[r][f] * scales[f] : res[r][f];
}

template <saehook_dtype DT, int R>
static void tile_row_group(const float *x, int64_t ldx, const uint8_t *W, int64_t d, int64_t f0,
                           int64_t nf, float *out, int64_t ldo, const float *scales) {
  // Four feature rows at a time, batch 1 included: measured alternating in one process at batch
  // 1 (f32, 4096 x 65536, 2 MiB blocks), 4 interleaved rows read 1.12x the read probe's rate, one
  // row at a time 0.77x, 16 interleaved rows less than one at a time.
  const size_t row_bytes = size_t(d) * Load<DT>::size;
  constexpr int F = 4;
  int64_t j = 0;
  for (; j + F <= nf; j += F)
    tile<DT, R, F>(x, ldx, W + (f0 + j) * row_bytes, row_bytes, d, out + j, ldo,
                   scales ? scales + f0 + j : nullptr);
  for (; j < nf; ++j)
    tile<DT, R, 1>(x, ldx, W + (f0 + j) * row_bytes, row_bytes, d, out + j, ldo,
                   scales ? scales + f0 + j : nullptr);
}

// The float32 operand: R contiguous rows of width d. For a bf16 encoder each run of 2 VL inputs
// (up to the last full one) holds its even-indexed inputs, then its odd-indexed ones: `tile`
// loads 2 VL bf16 weights as VL 32-bit lanes and widens them with one shift (the even weight,
// the low half) and one mask (the odd one, already in the high half), instead of a zero-extending
// shuffle per VL weights (on Zen 3, the avx2 path: 0.41 ns per 8 weights widened and multiplied
// that way, against 0.18 for the FMA alone: bench/bench_peaks.py).
static size_t operand_bytes_f32(saehook_dtype, int64_t R, int64_t d) { return size_t(R * d) * 4; }

// Inputs of a row that the bf16 tiles read split into even and odd ones (the rest in order).
static inline int64_t bf16_split_len(int64_t d) { return d / (2 * VL) * (2 * VL); }
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16 weight i is the low half of lane i / 2");

// split: whether a bf16 encoder's rows are split as above (prepare_f32: always; the avx2 path's
// packed panels take them in order).
static void prepare_f32_rows(const float *x, int64_t ldx, const float *shift, int64_t R, int64_t d, bool split,
                             void *operand) {
  float *o = static_cast<float *>(operand);
  for (int64_t r = 0; r < R; ++r) {
    const float *xr = x + r * ldx;
    float *orow = o + r * d;
    if (shift)
      for (int64_t i = 0; i < d; ++i) orow[i] = xr[i] - shift[i];
    else
      std::memcpy(orow, xr, size_t(d) * 4);
    if (split) {
      for (int64_t c = 0; c < bf16_split_len(d); c += 2 * VL) {
        float pair[2 * VL];
        std::memcpy(pair, orow + c, sizeof pair);
        for (int m = 0; m < VL; ++m) {
          orow[c + m] = pair[2 * m];
          orow[c + VL + m] = pair[2 * m + 1];
        }
      }
    }
  }
}

[[maybe_unused]] static void prepare_f32(const float *x, int64_t ldx, const float *shift, int64_t R,
                                         int64_t d, saehook_dtype dt, void *operand) {
  prepare_f32_rows(x, ldx, shift, R, d, dt == SAEHOOK_BF16, operand);
}

// One row tile: up to 4 rows, 2 with narrower vectors (16 registers).
constexpr int64_t kRowTile = VB < 64 ? 2 : 4;

// Few rows (Tuning::few_rows: the decode step of a few sequences, short prompts). The many-rows
// order below multiplies one row tile after the other over the whole block: the block is read
// from memory during the first tile, and the other tiles compute from L2 with no reads in
// flight, so compute and memory time add up (2048 x 32768 f32, 8 rows, 2-core Zen 5, standalone
// test: about 4 ms with the block always in L2, 12 ms streamed, against 5-6.5 ms to stream it at
// one row). Here each group of F features meets every row tile while it is in L1/L2, and every
// tile prefetches its share of the next group's rows (one line per line consumed), so the next
// group's reads overlap this group's products (8-9 ms in the same test).
// The few-rows walk, shared by every ISA path (kernels_vnni_impl.hpp uses it with its bf16 and
// int8 tiles): feature groups of FG outer, row tiles of up to RG rows inner;
// tile(rows, features, r, j, jn, pa, pb) also prefetches rows [pa, pb) of the group at feature
// jn (the block's next group; -1: the first group of the block this thread likely takes next;
// -2: none).
template <int RG, int FG, class Tile>
static inline void walk_few(int64_t R, int64_t nf, const Tile &tile) {
  using std::integral_constant;
  const int64_t groups = nf / FG, tiles = (R + RG - 1) / RG;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t j = g * FG, jn = g + 1 < groups ? j + FG : -1;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r = t * RG, rows = std::min<int64_t>(RG, R - r);
      const int pa = int(t * FG / tiles), pb = int((t + 1) * FG / tiles);
      auto run = [&](auto rg) { tile(rg, integral_constant<int, FG>(), r, j, jn, pa, pb); };
      if constexpr (RG >= 4) if (rows == 4) { run(integral_constant<int, 4>()); continue; }
      if constexpr (RG >= 3) if (rows == 3) { run(integral_constant<int, 3>()); continue; }
      if (rows == 2) run(integral_constant<int, 2>());
      else run(integral_constant<int, 1>());
    }
  }
  for (int64_t j = groups * FG; j < nf; ++j)  // the block's last features, one at a time
    for (int64_t r = 0; r < R; ++r) tile(integral_constant<int, 1>(), integral_constant<int, 1>(), r, j, int64_t(-2), 0, 0);
}

// F = 4 features per group, with 4-row tiles on AVX-512 and 2-row tiles on narrower vectors;
// f32 on AVX2 takes 4 x 3 tiles (12 accumulators, 4 input vectors: the 16 registers), 0.855x the
// time of 2 x 4 at 8 rows on the Zen 3 VM (2048 x 32768, bench_builds alternation; bf16, whose
// split inputs need two registers a row, 3 x 4 took 1.13x, so it keeps 2 x 4). On
// AVX-512, 4 x 6 tiles (24 accumulators) were within noise of 4 x 4 on the Zen 5 VM (the test
// above: 8.8-9.1 ms against 8.9-9.5) but GCC spilled their accumulators to the stack, and on the
// Sapphire Rapids-class VM 4 x 4 took 0.945x / 0.955x their time (f32, 8 rows, 2048 x 32768 /
// 4096 x 65536, bench_builds alternation); 8 x 2 tiles took 1.15x.
template <saehook_dtype DT>
static void dot_few_rows(const float *x, int64_t ldx, int64_t R, const uint8_t *W, const float *scales, int64_t d,
                         int64_t f0, int64_t nf, float *out, int64_t ldo, int64_t f_next, bool l2) {
  const size_t row_bytes = size_t(d) * Load<DT>::size;
  constexpr bool f32_avx2 = VB == 32 && DT == SAEHOOK_F32;
  walk_few<f32_avx2 ? 4 : int(kRowTile), f32_avx2 ? 3 : 4>(R, nf, [&](auto rg, auto fg, int64_t r, int64_t j,
                                                                     int64_t jn, int pa, int pb) {
    const uint8_t *pf = jn >= 0 ? W + (f0 + jn) * row_bytes : jn == -1 && f_next >= 0 ? W + f_next * row_bytes : nullptr;
    tile<DT, decltype(rg)::value, decltype(fg)::value>(x + r * ldx, ldx, W + (f0 + j) * row_bytes, row_bytes, d,
                                                       out + r * ldo + j, ldo, scales ? scales + f0 + j : nullptr, pf,
                                                       pa, pb, l2);
  });
}

// Software prefetch of the weights of the block the thread takes next, spread over this block's
// tile calls (one line per step of each call's loop), so that reading them from memory overlaps
// these products instead of stalling the next pack (the packed-panel kernels of the avx2 and VNNI
// paths). Zen 5, 4096 x 65536: README "CPU kernel performance".
struct NextBlock {
  const char *p = nullptr;
  int64_t left = 0, per_call = 0;
  NextBlock(const void *next, int64_t bytes, int64_t calls, int64_t steps_per_call) {
    if (!next || calls <= 0) return;
    p = static_cast<const char *>(next);
    left = (bytes + 63) / 64;
    per_call = std::min<int64_t>((left + calls - 1) / calls, steps_per_call);
  }
  // The lines one tile call prefetches: *lines from the returned address.
  const char *take(int64_t *lines) {
    *lines = std::min(per_call, left);
    const char *q = p;
    p += *lines * 64;
    left -= *lines;
    return q;
  }
};

// Tile calls a packed-panel walk makes per pass over R rows and ng groups of features, in row
// tiles of RG and group tiles of GG (the last ones narrower).
inline int64_t panel_calls(int64_t R, int64_t ng, int RG, int GG) {
  return (R + RG - 1) / RG * (ng / GG + ng % GG);
}

// The packed-panel walk: row tiles of RG rows (the last one narrower), each over the groups in
// tiles of GG (the last ones one at a time); tile(rows, groups, r, g) as integral constants.
template <int RG, int GG, class Tile>
static inline void walk_panel(int64_t R, int64_t ng, const Tile &tile) {
  using std::integral_constant;
  auto groups = [&](auto rows, int64_t r) {
    int64_t g = 0;
    for (; g + GG <= ng; g += GG) tile(rows, integral_constant<int, GG>(), r, g);
    for (; g < ng; ++g) tile(rows, integral_constant<int, 1>(), r, g);
  };
  int64_t r = 0;
  for (; r + RG <= R; r += RG) groups(integral_constant<int, RG>(), r);
  switch (R - r) {  // RG - 1 rows at most remain
    case 5: groups(integral_constant<int, 5>(), r); break;
    case 4: groups(integral_constant<int, 4>(), r); break;
    case 3: groups(integral_constant<int, 3>(), r); break;
    case 2: groups(integral_constant<int, 2>(), r); break;
    case 1: groups(integral_constant<int, 1>(), r); break;
    default: break;
  }
}

// The thread's panel buffer of n 4-byte elements (64-byte aligned), reused across calls.
template <class T>
static T *panel_buffer(size_t n) {
  static_assert(sizeof(T) == 4, "panels hold 4-byte elements");
  thread_local std::vector<T> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  return reinterpret_cast<T *>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

// Batch 1 in quarters (Tuning::batch1_quarters): each 4-feature tile takes one row from each
// quarter of the block, so the block is read as four sequential streams a quarter apart (as the
// read probe reads it) instead of one. On the 2-core Zen 4 VM (f32, 2048 x 32768, 2 MiB blocks,
// a standalone loop alternating with the probe's) 4 adjacent rows read 0.79 of the probe's rate,
// rows a quarter apart 0.97. four(j, q, o) writes features j, j + q, j + 2q, j + 3q of the block
// to o[0..3]; one(j) writes feature j (the last nf % 4) to out[j]. Shared by every ISA path.
template <class Four, class One>
static inline void walk_quarters(int64_t nf, float *out, const Four &four, const One &one) {
  const int64_t q = nf / 4;
  for (int64_t j = 0; j < q; ++j) {
    float o[4];
    four(j, q, o);
    for (int s = 0; s < 4; ++s) out[j + s * q] = o[s];
  }
  for (int64_t j = 4 * q; j < nf; ++j) one(j);
}

template <saehook_dtype DT>
static void dot_row_quarters(const float *x, const uint8_t *W, const float *scales, int64_t d, int64_t f0,
                             int64_t nf, float *out) {
  const size_t row_bytes = size_t(d) * Load<DT>::size;
  walk_quarters(
      nf, out,
      [&](int64_t j, int64_t q, float *o) {
        tile<DT, 1, 4>(x, d, W + (f0 + j) * row_bytes, size_t(q) * row_bytes, d, o, 0, nullptr);
        if (scales)
          for (int s = 0; s < 4; ++s) o[s] *= scales[f0 + j + s * q];
      },
      [&](int64_t j) {
        tile<DT, 1, 1>(x, d, W + (f0 + j) * row_bytes, row_bytes, d, out + j, 0, scales ? scales + f0 + j : nullptr);
      });
}

// Whether dot_block_f32 takes the few-rows order for R rows. One row tile reads each weight once
// either way; what the order adds there is the next group's prefetch (and the streaming block
// size), which pays where it goes into L2: with few_rows_l2 it starts at 2 rows (zen4, 2048 x
// 32768 f32, against the row-tile order: 0.92x / 0.87x / 0.82x the time at 2 / 3 / 4 rows).
static inline bool few_rows_order(int64_t R, const Tuning &tp) {
  return R > (tp.few_rows_l2 ? 1 : kRowTile) && R <= tp.few_rows;
}

// dot_block_f32 streams the block at batch 1 and in the few-rows order.
static bool streams_f32(saehook_dtype, int64_t R, const Tuning &tp) { return R == 1 || few_rows_order(R, tp); }

template <saehook_dtype DT>
static void dot_block_t(const float *x, int64_t ldx, int64_t R, const void *Wv, const float *scales,
                        int64_t d, int64_t f0, int64_t nf, float *out, int64_t ldo, const Tuning &tp,
                        int64_t f_next) {
  const uint8_t *W = static_cast<const uint8_t *>(Wv);
  if (few_rows_order(R, tp))
    return dot_few_rows<DT>(x, ldx, R, W, scales, d, f0, nf, out, ldo, f_next, tp.few_rows_l2);
  if (R == 1 && tp.batch1_quarters) return dot_row_quarters<DT>(x, W, scales, d, f0, nf, out);
  int64_t r = 0;
  if constexpr (VB < 64) {
    // 16 vector registers: 2 rows x 4 features (8 accumulators) stay in registers; with 4 rows
    // GCC kept the 16 accumulators on the stack (AVX2, batch 64, 4096 x 65536 f32: 598 ms).
    for (; r + 2 <= R; r += 2)
      tile_row_group<DT, 2>(x + r * ldx, ldx, W, d, f0, nf, out + r * ldo, ldo, scales);
  }
  for (; r + 4 <= R; r += 4)
    tile_row_group<DT, 4>(x + r * ldx, ldx, W, d, f0, nf, out + r * ldo, ldo, scales);
  switch (R - r) {
    case 3: tile_row_group<DT, 3>(x + r * ldx, ldx, W, d, f0, nf, out + r * ldo, ldo, scales); break;
    case 2: tile_row_group<DT, 2>(x + r * ldx, ldx, W, d, f0, nf, out + r * ldo, ldo, scales); break;
    case 1: tile_row_group<DT, 1>(x + r * ldx, ldx, W, d, f0, nf, out + r * ldo, ldo, scales); break;
    default: break;
  }
}

static void dot_block_f32(const void *operand, int64_t R, const void *W, saehook_dtype dt,
                          const float *scales, int64_t d, int64_t f0, int64_t nf, float *out,
                          int64_t ldo, const Tuning &tp, int64_t f_next) {
  const float *x = static_cast<const float *>(operand);
  const int64_t ldx = d;
  switch (dt) {
    case SAEHOOK_F32: return dot_block_t<SAEHOOK_F32>(x, ldx, R, W, nullptr, d, f0, nf, out, ldo, tp, f_next);
    case SAEHOOK_F16: return dot_block_t<SAEHOOK_F16>(x, ldx, R, W, nullptr, d, f0, nf, out, ldo, tp, f_next);
    case SAEHOOK_BF16: return dot_block_t<SAEHOOK_BF16>(x, ldx, R, W, nullptr, d, f0, nf, out, ldo, tp, f_next);
    case SAEHOOK_I8: return dot_block_t<SAEHOOK_I8>(x, ldx, R, W, scales, d, f0, nf, out, ldo, tp, f_next);
  }
}

// Chunked walk: the output is walked in chunks held in registers (no load/store of the output
// per feature), and the same piece of the feature kGatherAhead places later is prefetched, so
// the k rows are read as k concurrent streams (kGatherAhead: Tuning::gather_ahead). Measured on Zen 5 (4096 x 65536 f32, k = 100,
// 64 tokens, one thread): 30-vector chunks with look-ahead 8 take 3.3 ms, the former 16-vector
// chunks with look-ahead 2 4.4 ms, torch's EmbeddingBag (fbgemm) 3.2 ms.
constexpr int kGatherChunk = VB == 64 ? 30 : 12;  // vectors: all registers but a few

// out[i0, i0 + CH * VL) += sum_j vals[j] * W[idx[j]][same range], the chunk in CH registers.
template <saehook_dtype DT, int CH>
static inline void gather_chunk(const float *vals, const int32_t *idx, int32_t k, const uint8_t *W,
                                size_t row_bytes, int64_t i0, float *out, int ahead, bool l2) {
  using L = Load<DT>;
  constexpr size_t piece = size_t(CH) * VL * L::size;  // bytes of one row in this chunk
  vf acc[CH];
#pragma GCC unroll 32
  for (int c = 0; c < CH; ++c) std::memcpy(&acc[c], out + i0 + c * VL, VB);
  for (int32_t j = 0; j < k; ++j) {
    if (idx[j] < 0) continue;
    const uint8_t *row = W + idx[j] * row_bytes + i0 * L::size;
    if (j + ahead < k && idx[j + ahead] >= 0) {
      const uint8_t *next = W + idx[j + ahead] * row_bytes + i0 * L::size;
#pragma GCC unroll 32
      for (size_t line = 0; line < piece; line += 64) prefetch_t0_or_t1(next + line, l2);
    }
    const vf a = splat(vals[j]);
#pragma GCC unroll 32
    for (int c = 0; c < CH; ++c) acc[c] += a * L::vec(row + c * VL * L::size);
  }
#pragma GCC unroll 32
  for (int c = 0; c < CH; ++c) std::memcpy(out + i0 + c * VL, &acc[c], VB);
}

template <saehook_dtype DT>
static void gather_sum_chunked(const float *vals, const int32_t *idx, int32_t k, const void *Wv,
                               int64_t d, float *out, int ahead, bool l2) {
  using L = Load<DT>;
  const uint8_t *W = static_cast<const uint8_t *>(Wv);
  const size_t row_bytes = size_t(d) * L::size;
  constexpr int CH = kGatherChunk;
  int64_t i0 = 0;
  for (; i0 + CH * VL <= d; i0 += CH * VL) gather_chunk<DT, CH>(vals, idx, k, W, row_bytes, i0, out, ahead, l2);
  // The rest in halving chunks (4096 = 8 x 480 + 256 on AVX-512), then scalars.
  if (i0 + 16 * VL <= d) { gather_chunk<DT, 16>(vals, idx, k, W, row_bytes, i0, out, ahead, l2); i0 += 16 * VL; }
  if (i0 + 8 * VL <= d) { gather_chunk<DT, 8>(vals, idx, k, W, row_bytes, i0, out, ahead, l2); i0 += 8 * VL; }
  if (i0 + 4 * VL <= d) { gather_chunk<DT, 4>(vals, idx, k, W, row_bytes, i0, out, ahead, l2); i0 += 4 * VL; }
  if (i0 + 2 * VL <= d) { gather_chunk<DT, 2>(vals, idx, k, W, row_bytes, i0, out, ahead, l2); i0 += 2 * VL; }
  if (i0 + VL <= d) { gather_chunk<DT, 1>(vals, idx, k, W, row_bytes, i0, out, ahead, l2); i0 += VL; }
  for (; i0 < d; ++i0) {
    float s = out[i0];
    for (int32_t j = 0; j < k; ++j)
      if (idx[j] >= 0) s += vals[j] * L::one(W + idx[j] * row_bytes + i0 * L::size);
    out[i0] = s;
  }
}

template <saehook_dtype DT>
static void gather_sum_rows(const float *vals, const int32_t *idx, int32_t k, const void *Wv, int64_t d,
                            float *out, int kAhead, bool l2) {
  // One feature row at a time into the output row (which stays in L1), prefetching the row
  // kAhead (Tuning::gather_ahead) features later line by line as this one streams, so several
  // rows are in flight.
  // Measured faster than the chunked walk for 2-byte weights (bf16 decode 2.2 -> 1.3 ms at
  // batch 64, 4096 x 65536, k = 100), slower for f32 on Zen 5 (2.6 -> 3.0 ms); on Zen 3 faster
  // for f32 too (0.77x / 0.80x / 0.80x the time at batch 1 / 64 / 256, rows not in L3).
  using L = Load<DT>;
  const uint8_t *W = static_cast<const uint8_t *>(Wv);
  const size_t row_bytes = size_t(d) * L::size;
  for (int32_t j = 0; j < k; ++j) {
    if (idx[j] < 0) continue;
    const uint8_t *row = W + idx[j] * row_bytes;
    const uint8_t *ahead = (j + kAhead < k && idx[j + kAhead] >= 0) ? W + idx[j + kAhead] * row_bytes : nullptr;
    const vf a = splat(vals[j]);
    int64_t i = 0;
    for (; i + VL <= d; i += VL) {
      if (ahead && (i * L::size) % 64 == 0) prefetch_t0_or_t1(ahead + i * L::size, l2);
      vf y;
      std::memcpy(&y, out + i, VB);
      y += a * L::vec(row + i * L::size);
      std::memcpy(out + i, &y, VB);
    }
    for (; i < d; ++i) out[i] += vals[j] * L::one(row + i * L::size);
  }
}

// Sparse decode of one token: out[0:d] += sum_j vals[j] * W[idx[j]]. Float32 decoders take the
// chunked walk unless the class says rows (Tuning::gather_rows_f32).
template <saehook_dtype DT>
static void gather_sum_t(const float *vals, const int32_t *idx, int32_t k, const void *W, int64_t d,
                         float *out, int ahead, bool rows_f32, bool l2) {
  if (DT == SAEHOOK_F32 && !rows_f32)
    gather_sum_chunked<DT>(vals, idx, k, W, d, out, ahead, l2);
  else
    gather_sum_rows<DT>(vals, idx, k, W, d, out, ahead, l2);
}

static void gather_sum(const float *vals, const int32_t *idx, int32_t k, const void *W,
                       saehook_dtype dt, int64_t d, float *out, const Tuning &tp) {
  const int ahead = tp.gather_ahead;
  const bool rows = tp.gather_rows_f32, l2 = tp.gather_l2;
  switch (dt) {
    case SAEHOOK_F32: return gather_sum_t<SAEHOOK_F32>(vals, idx, k, W, d, out, ahead, rows, l2);
    case SAEHOOK_F16: return gather_sum_t<SAEHOOK_F16>(vals, idx, k, W, d, out, ahead, rows, l2);
    case SAEHOOK_BF16: return gather_sum_t<SAEHOOK_BF16>(vals, idx, k, W, d, out, ahead, rows, l2);
    case SAEHOOK_I8: return gather_sum_t<SAEHOOK_I8>(vals, idx, k, W, d, out, ahead, rows, l2);
  }
}

template <saehook_dtype DT>
static void axpy_t(float a, const void *wv, int64_t d, float *y) {
  using L = Load<DT>;
  const uint8_t *w = static_cast<const uint8_t *>(wv);
  const vf av = splat(a);
  int64_t i = 0;
  for (; i + VL <= d; i += VL) {
    vf yv;
    std::memcpy(&yv, y + i, VB);
    yv += av * L::vec(w + i * L::size);
    std::memcpy(y + i, &yv, VB);
  }
  for (; i < d; ++i) y[i] += a * L::one(w + i * L::size);
}

static void axpy(float a, const void *w, saehook_dtype dt, int64_t d, float *y) {
  switch (dt) {
    case SAEHOOK_F32: return axpy_t<SAEHOOK_F32>(a, w, d, y);
    case SAEHOOK_F16: return axpy_t<SAEHOOK_F16>(a, w, d, y);
    case SAEHOOK_BF16: return axpy_t<SAEHOOK_BF16>(a, w, d, y);
    case SAEHOOK_I8: return axpy_t<SAEHOOK_I8>(a, w, d, y);
  }
}

template <saehook_dtype DT>
static void to_f32_t(const void *sv, int64_t n, float *dst) {
  using L = Load<DT>;
  const uint8_t *s = static_cast<const uint8_t *>(sv);
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf v = L::vec(s + i * L::size);
    std::memcpy(dst + i, &v, VB);
  }
  for (; i < n; ++i) dst[i] = L::one(s + i * L::size);
}

static void to_f32(const void *src, saehook_dtype dt, int64_t n, float *dst) {
  switch (dt) {
    case SAEHOOK_F32: return to_f32_t<SAEHOOK_F32>(src, n, dst);
    case SAEHOOK_F16: return to_f32_t<SAEHOOK_F16>(src, n, dst);
    case SAEHOOK_BF16: return to_f32_t<SAEHOOK_BF16>(src, n, dst);
    case SAEHOOK_I8: return to_f32_t<SAEHOOK_I8>(src, n, dst);
  }
}

}  // namespace saehook::cpu::SAEHOOK_ISA_NS
