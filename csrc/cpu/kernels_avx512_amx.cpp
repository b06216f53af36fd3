// The avx512_amx path: the avx512_vnni path plus Intel AMX tile multiplies (Sapphire Rapids and
// later Xeons) for bf16 and int8 encoders from a few input rows up (kAmxRows*), where the AVX-512 loops
// are compute-bound (prompt processing). Everything else is the avx512_vnni body, included here
// under this path's name.
//
// A tile product C (16 x 16, f32 or int32) += A (16 rows x 64 bytes) . B (16 rows of 64 bytes,
// each holding 4-byte groups of 16 columns). Here A is 16 features x 64 bytes of their weight
// rows, loaded straight from W (feature-major rows are A's layout: nothing to pack), B is 64
// bytes of inputs (32 bf16 / 64 int8) of 16 input rows, interleaved in 4-byte groups by
// `prepare` once per row chunk, and C is features x input rows. Two A and two B tiles feed four
// C tiles: the 8 tile registers.
//
// What bounds it (2-core Sapphire Rapids-class VM): tile loads, not products. bench_peaks.py
// (2026-12-02): a TDPBF16PS or TDPBSSD issues every 5.2 ns per core; the kernel's step (2 A + 2 B
// tile loads, 4 products) takes 5.1 ns per product from L1, 6.4 ns from L2 (256 KiB spans), 7.3-
// 7.7 ns with A's 16 rows 8 KiB apart as W's are, 16-35 ns once the spans pass 1-1.5 MiB (L3).
// The encode runs ~25 ns per product (bf16, 256 rows): perf puts ~70% of tile_block on the A
// loads. Tried on that VM and not kept (alternating with this walk at 4096 x 65536 bf16, 256
// rows): K passes keeping a pass's inputs in L2 with the sums in memory between passes (0.96-1.03x
// the time, block 512 KiB to 4 MiB), row pairs outside feature pairs (1.03x), an L2 prefetch of
// the next feature pair's rows (in those); packing A into contiguous tiles cost more than it
// saved in a standalone model of the loop. What did help: W starting on a 64-byte boundary (an
// unaligned W splits every tile row over two lines: 1.17x the time at 256 rows, see
// python/saehook/_arrays.py WEIGHT_ALIGN). Earlier: K-chunking so that A comes from L1 for
// later row groups changed nothing (34 ms either way at 64 rows); prefetching the next feature
// rows into L2 was slower at 4 rows (25 against 19 ms).
//
// bf16: TDPBF16PS, float32 accumulation, inputs rounded to bf16 once (as the avx512_vnni path).
// int8: TDPBSSD, signed x signed, inputs quantized per kQBlock block as the VNNI paths do (the
// same values, so no +128 offset); after each block the int32 sums are scaled by the rows'
// block scales into float accumulators.
#define SAEHOOK_ISA_NS avx512_amx
#define SAEHOOK_VBYTES 64
#define SAEHOOK_VNNI_BF16 1
#include "kernels_vnni_impl.hpp"

namespace saehook::cpu::avx512_amx {
namespace {

// From this many rows the tile kernels run; below, the AVX-512 dot-product tiles, which stream
// the weights near the read bandwidth there. Measured at 4096 x 65536 (2-core Sapphire Rapids-class,
// 31 GB/s): bf16 at 2 rows 19 ms against 26 ms, 1 row the same (19 ms); int8 even at 8 rows
// (15 ms each way; the tiles' per-block rescaling costs as much as the products), 16 rows 14
// against 18 ms.
constexpr int64_t kAmxRowsBF16 = 2, kAmxRowsI8 = 8;
constexpr int64_t kTileBytes = 64;  // bytes of a tile row (the K extent of one product)

bool uses_amx(saehook_dtype dt, int64_t R) {
  return (dt == SAEHOOK_BF16 && R >= kAmxRowsBF16) || (dt == SAEHOOK_I8 && R >= kAmxRowsI8);
}

// The B operand: row groups of 16 rows; a group holds kbytes / 4 steps of 64 bytes (step s:
// bytes 4s .. 4s + 3 of each of the 16 rows), so the tile of bytes [k0, k0 + 64) of group q is
// the 1 KiB at q * group_bytes + 16 * k0. Rows past R and bytes past the row end are zero.
// int8 adds, after the groups, 16 float scales per group and quantization block.
struct BLayout {
  int64_t groups, kbytes, group_bytes, n_blocks;
  BLayout(saehook_dtype dt, int64_t R, int64_t d)
      : groups((R + 15) / 16),
        kbytes(round_up(d * (dt == SAEHOOK_I8 ? 1 : 2), kTileBytes)),
        group_bytes(kbytes * 16),
        n_blocks(dt == SAEHOOK_I8 ? i8_blocks(d) : 0) {}
  size_t values_bytes() const { return size_t(groups * group_bytes); }
  size_t bytes() const { return values_bytes() + size_t(groups * n_blocks * 16) * 4; }
};

size_t amx_operand_bytes(saehook_dtype dt, int64_t R, int64_t d) {
  // encode sizes the buffer for its largest chunk and may prepare a smaller last one in it
  // with the other layout: room for both.
  const size_t vnni = operand_bytes(dt, R, d);
  return dt == SAEHOOK_BF16 || dt == SAEHOOK_I8 ? std::max(vnni, BLayout(dt, R, d).bytes() + 64) : vnni;
}

void amx_prepare(const float *x, int64_t ldx, const float *shift, int64_t R, int64_t d, saehook_dtype dt,
                 void *operand) {
  if (!uses_amx(dt, R)) return prepare(x, ldx, shift, R, d, dt, operand);
  const BLayout L(dt, R, d);
  uint8_t *base = i8_base(operand);
  std::memset(base, 0, L.bytes());
  for (int64_t r = 0; r < R; ++r) {
    uint8_t *col = base + (r / 16) * L.group_bytes + (r % 16) * 4;  // step s at col + 64 s
    const float *xr = x + r * ldx;
    if (dt == SAEHOOK_BF16) {
      auto v = [&](int64_t i) { return uint32_t(f32_to_bf16(shift ? xr[i] - shift[i] : xr[i])); };
      for (int64_t i = 0; i < d; i += 2) {
        const uint32_t pair = v(i) | (i + 1 < d ? v(i + 1) << 16 : 0u);
        std::memcpy(col + (i / 2) * 64, &pair, 4);
      }
      continue;
    }
    float *scales = reinterpret_cast<float *>(base + L.values_bytes()) + (r / 16) * L.n_blocks * 16 + r % 16;
    for (int64_t b = 0; b < L.n_blocks; ++b) {
      const int64_t i0 = b * kQBlock, len = std::min(kQBlock, d - i0);
      int8_t q[kQBlock];
      int32_t sum;
      scales[16 * b] = quantize_block(xr + i0, shift ? shift + i0 : nullptr, len, q, &sum);
      for (int64_t i = 0; i < len; i += 4)  // kQBlock is a multiple of 4: steps never straddle blocks
        std::memcpy(col + ((i0 + i) / 4) * 64, q + i, size_t(std::min<int64_t>(4, len - i)));
    }
  }
}

// Tile loads and the configuration load as asm that tells the compiler what they read. GCC 12's
// _tile_loadd declares no memory input at all (stores to a staging buffer read only by a tile
// load may be dropped) and _tile_loadconfig declares 8 bytes of the 64-byte configuration (GCC
// dropped the column widths, and ldtilecfg faulted).
#define SAEHOOK_TILE_LOAD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(int64_t(stride)) : "memory")

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register 16 rows x 64 bytes.
void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = kTileBytes;
    c.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

// The 16 feature rows of W starting at `rows` (valid of them exist), bytes [k0, k0 + 64) of rows
// of row_bytes: the address of the A tile and its stride. Straight from W where the whole tile
// lies inside the rows; otherwise a zero-padded copy in `stage` (the last group of a block that
// ends inside a 16-feature group, the tail of rows not a multiple of 64 bytes), so that no
// byte past a row's end (another feature's weights, maybe not even finite) enters a product.
inline const uint8_t *a_tile(const uint8_t *rows, int64_t valid, int64_t row_bytes, int64_t k0, uint8_t *stage,
                             int64_t &stride) {
  if (valid == 16 && k0 + kTileBytes <= row_bytes) {
    stride = row_bytes;
    return rows + k0;
  }
  std::memset(stage, 0, 16 * kTileBytes);
  const int64_t n = std::min(kTileBytes, row_bytes - k0);
  for (int64_t l = 0; l < valid; ++l) std::memcpy(stage + l * kTileBytes, rows + l * row_bytes + k0, size_t(n));
  stride = kTileBytes;
  return stage;
}

// out[r * ldo + j] for the 16 x 16 block of C (features j0 + l, rows r0 + c; c[l * 16 + c]),
// times the per-feature scales ws (int8) where given.
inline void write_transposed(const float *c, int64_t r0, int64_t R, int64_t j0, int64_t nf, const float *ws,
                             float *out, int64_t ldo) {
  __m512i v[16];
  for (int l = 0; l < 16; ++l) v[l] = _mm512_load_si512(c + 16 * l);
  transpose16(v);
  const __mmask16 m = lane_mask(nf - j0);
  const __m512 s = ws ? _mm512_maskz_loadu_ps(m, ws + j0) : _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < 16 && r0 + r < R; ++r)
    _mm512_mask_storeu_ps(out + (r0 + r) * ldo + j0, m, _mm512_mul_ps(_mm512_castsi512_ps(v[r]), s));
}

// C tiles 0..3 = (feature group g + a, row group q + b) for a < NA, b < NB (tile 2a + b).
// Tile numbers are immediates, hence one branch per tile.
template <int NA, int NB, bool I8>
inline void products() {
  if constexpr (I8) {
    _tile_dpbssd(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbssd(1, 4, 7);
    if constexpr (NA == 2) _tile_dpbssd(2, 5, 6);
    if constexpr (NA == 2 && NB == 2) _tile_dpbssd(3, 5, 7);
  } else {
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NA == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
  }
}

inline void store_tile(int t, void *dst) {
  switch (t) {
    case 0: _tile_stored(0, dst, 64); break;
    case 1: _tile_stored(1, dst, 64); break;
    case 2: _tile_stored(2, dst, 64); break;
    default: _tile_stored(3, dst, 64); break;
  }
}

inline void zero_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Feature groups g, g + 1 (NA of them) x row groups q, q + 1 (NB) over all of K.
template <int NA, int NB, bool I8>
void tile_block(const uint8_t *W, int64_t row_bytes, int64_t nf, int64_t g, const uint8_t *bop,
                const BLayout &L, int64_t q, int64_t R, const float *wscale, float *out, int64_t ldo) {
  alignas(64) uint8_t stage[2][16 * kTileBytes];
  alignas(64) float cbuf[16 * 16];
  alignas(64) float acc[4][16 * 16];  // int8: float sums of the C tiles
  const float *bscale = reinterpret_cast<const float *>(bop + L.values_bytes());
  if constexpr (I8) std::memset(acc, 0, sizeof acc);
  zero_tiles();
  const int64_t steps_per_block = kQBlock / kTileBytes;  // tile steps per quantization block (int8)
  for (int64_t k0 = 0, step = 0; k0 < L.kbytes; k0 += kTileBytes, ++step) {
    int64_t s0, s1 = 0;
    const uint8_t *a0 = a_tile(W + 16 * g * row_bytes, std::min<int64_t>(16, nf - 16 * g), row_bytes, k0, stage[0], s0);
    SAEHOOK_TILE_LOAD(4, a0, s0);
    if constexpr (NA == 2) {
      const uint8_t *a1 =
          a_tile(W + 16 * (g + 1) * row_bytes, std::min<int64_t>(16, nf - 16 * (g + 1)), row_bytes, k0, stage[1], s1);
      SAEHOOK_TILE_LOAD(5, a1, s1);
    }
    SAEHOOK_TILE_LOAD(6, bop + q * L.group_bytes + 16 * k0, 64);
    if constexpr (NB == 2) SAEHOOK_TILE_LOAD(7, bop + (q + 1) * L.group_bytes + 16 * k0, 64);
    products<NA, NB, I8>();
    if constexpr (I8) {
      // End of a quantization block: the int32 sums times the 16 rows' block scales.
      if ((step + 1) % steps_per_block != 0 && k0 + kTileBytes < L.kbytes) continue;
      const int64_t blk = step / steps_per_block;
      for (int t = 0; t < 4; ++t) {
        const int a = t / 2, b = t % 2;
        if (a >= NA || b >= NB) continue;
        store_tile(t, cbuf);
        const __m512 sx = _mm512_load_ps(bscale + ((q + b) * L.n_blocks + blk) * 16);
        for (int l = 0; l < 16; ++l) {
          const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(cbuf + 16 * l));
          _mm512_store_ps(acc[t] + 16 * l, _mm512_fmadd_ps(v, sx, _mm512_load_ps(acc[t] + 16 * l)));
        }
      }
      zero_tiles();
    }
  }
  for (int t = 0; t < 4; ++t) {
    const int a = t / 2, b = t % 2;
    if (a >= NA || b >= NB) continue;
    const float *c = acc[t];
    if constexpr (!I8) {
      store_tile(t, cbuf);
      c = cbuf;
    }
    write_transposed(c, 16 * (q + b), R, 16 * (g + a), nf, I8 ? wscale : nullptr, out, ldo);
  }
}

// Feature-group pairs outside, row-group pairs inside: a pair's weight rows come from memory
// once and from L2 for the other row groups.
template <bool I8>
void tile_pairs(const uint8_t *W, int64_t row_bytes, int64_t nf, const uint8_t *bop, const BLayout &L, int64_t R,
                const float *ws, float *out, int64_t ldo) {
  const int64_t ng = (nf + 15) / 16;
  for (int64_t g = 0; g < ng; g += 2)
    for (int64_t q = 0; q < L.groups; q += 2) {
      const bool a2 = g + 1 < ng, b2 = q + 1 < L.groups;
      if (a2 && b2) tile_block<2, 2, I8>(W, row_bytes, nf, g, bop, L, q, R, ws, out, ldo);
      else if (a2) tile_block<2, 1, I8>(W, row_bytes, nf, g, bop, L, q, R, ws, out, ldo);
      else if (b2) tile_block<1, 2, I8>(W, row_bytes, nf, g, bop, L, q, R, ws, out, ldo);
      else tile_block<1, 1, I8>(W, row_bytes, nf, g, bop, L, q, R, ws, out, ldo);
    }
}

bool amx_streams(saehook_dtype dt, int64_t R, const Tuning &tp) { return !uses_amx(dt, R) && streams(dt, R, tp); }

void amx_dot_block(const void *operand, int64_t R, const void *Wv, saehook_dtype dt, const float *scales,
                   int64_t d, int64_t f0, int64_t nf, float *out, int64_t ldo, const Tuning &tp,
                   int64_t f_next) {
  if (!uses_amx(dt, R)) return dot_block(operand, R, Wv, dt, scales, d, f0, nf, out, ldo, tp, f_next);
  const bool i8 = dt == SAEHOOK_I8;
  const BLayout L(dt, R, d);
  const uint8_t *bop = i8_base(const_cast<void *>(operand));
  const int64_t row_bytes = d * (i8 ? 1 : 2);
  const uint8_t *W = static_cast<const uint8_t *>(Wv) + f0 * row_bytes;
  configure_tiles();
  if (i8)
    tile_pairs<true>(W, row_bytes, nf, bop, L, R, scales + f0, out, ldo);
  else
    tile_pairs<false>(W, row_bytes, nf, bop, L, R, nullptr, out, ldo);
  _tile_release();  // leaves the thread's tile state clean (smaller context switches)
}

}  // namespace
}  // namespace saehook::cpu::avx512_amx

namespace saehook::cpu {
extern const Kernels kernels_avx512_amx = {
    "avx512_amx", avx512_amx::amx_operand_bytes, avx512_amx::amx_prepare, avx512_amx::amx_dot_block, avx512_amx::amx_streams,
    avx512_amx::gather_sum, avx512_amx::axpy, avx512_amx::to_f32};
}
