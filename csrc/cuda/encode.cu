// Encode kernels: input check, GEMM operand, the two custom GEMMs (skinny: few rows, weights
// streamed once; tiled: many rows without cuBLAS), int8 -> f16 tiles for cuBLAS, and the fused
// scale + bias + activation + Top-K selection (segment kernel, then the per-row final kernel).
// See plan.cuh for how they fit together and select.cuh for the selection logic.
#include "device.cuh"
#include "plan.cuh"

namespace saehook::cuda {

namespace {

using dev::Load;
using dev::has_error;

constexpr int kSegThreads = 256;
constexpr int kFinalThreads = 512;
constexpr int kSkinnyWarps = 8;      // warps per block
constexpr int kSkinnyFeatures = 4;   // features per warp

// ---------------------------------------------------------------- input check

__global__ void check_finite_kernel(const float *__restrict__ x, int64_t d, int64_t ld, ErrRec *err) {
  const int64_t r = blockIdx.x;
  const float *row = x + r * ld;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    if (!isfinite(row[i])) {  // this thread's first bad column; atomicMin keeps the block's first
      atomicMin(&err->nan_pos, (unsigned long long)(r * d + i));
      break;
    }
  }
}

// ---------------------------------------------------------------- GEMM operand

// One block per row: (x - shift) into the operand row (zero padded to ldk). 16-bit operands
// are divided by a power of two so that max |row| lies in [0.5, 1): no f16 overflow, and the
// rounding is the same as rounding (x - shift) itself (scaling by 2^e is exact). The split
// operands (kOpF16Split, kOpBF16Split) hold two 16-bit rows per row, hi = round(y) at 2r and
// lo = round(y - hi) at 2r + 1: hi + lo carries 22 (f16) or 16 (bf16) significant bits of y.
template <int OP>
__global__ void __launch_bounds__(256) prepare_kernel(const float *__restrict__ x, int64_t ldx, int64_t d,
                                                      const float *__restrict__ shift, void *xop, int64_t ldk,
                                                      float *row_scale, const ErrRec *err) {
  __shared__ float red[32];
  if (has_error(err)) return;
  const int64_t r = blockIdx.x;
  const float *row = x + r * ldx;
  if constexpr (OP == kern::kOpF32) {
    float *o = static_cast<float *>(xop) + r * ldk;
    for (int64_t i = threadIdx.x; i < ldk; i += blockDim.x)
      o[i] = i < d ? (shift ? row[i] - shift[i] : row[i]) : 0.f;
    if (threadIdx.x == 0) row_scale[r] = 1.f;
  } else {
    constexpr bool kHalf = OP == kern::kOpF16 || OP == kern::kOpF16Split;
    constexpr bool kSplit = OP == kern::kOpF16Split || OP == kern::kOpBF16Split;
    float amax = 0.f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
      amax = fmaxf(amax, fabsf(shift ? row[i] - shift[i] : row[i]));
    amax = dev::block_max(amax, red);
    float s = 1.f;
    if (amax > 0.f && isfinite(amax)) {
      int e;
      frexpf(amax, &e);                    // amax = m * 2^e, m in [0.5, 1)
      e = e < -126 ? -126 : e > 127 ? 127 : e;  // s stays a finite normal power of two
      s = ldexpf(1.f, e);
    }
    unsigned short *o = static_cast<unsigned short *>(xop) + (kSplit ? 2 * r : r) * ldk;
    for (int64_t i = threadIdx.x; i < ldk; i += blockDim.x) {
      const float y = i < d ? (shift ? row[i] - shift[i] : row[i]) / s : 0.f;
      float hi;
      if constexpr (kHalf) {
        const __half h = __float2half_rn(y);
        o[i] = __half_as_ushort(h);
        hi = __half2float(h);
      } else {
        const __nv_bfloat16 h = __float2bfloat16_rn(y);
        o[i] = __bfloat16_as_ushort(h);
        hi = __bfloat162float(h);
      }
      if constexpr (kSplit) {
        if constexpr (kHalf)
          o[ldk + i] = __half_as_ushort(__float2half_rn(y - hi));
        else
          o[ldk + i] = __bfloat16_as_ushort(__float2bfloat16_rn(y - hi));
      }
    }
    if (threadIdx.x == 0) row_scale[r] = s;
  }
}

// ---------------------------------------------------------------- skinny GEMM

// Few rows (R <= 8): each warp computes kSkinnyFeatures features for all rows, its lanes
// walking the features' weight rows with one VB-byte load per feature per step (the operand
// values of those positions stay in registers for all the warp's features), then a warp sum.
// The weights are read exactly once: the bandwidth-bound regime of generation.
template <int DT, int R>
__global__ void __launch_bounds__(kSkinnyWarps * 32, 2)
    skinny_kernel(const float *__restrict__ xop, int64_t ldk, int rows, const void *__restrict__ W,
                  int64_t K, int64_t f0, int64_t nf, float *__restrict__ P, int64_t ldp, bool vec_ok,
                  const ErrRec *err) {
  using L = Load<DT>;
  constexpr int F = kSkinnyFeatures;
  if (has_error(err)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t j0 = (int64_t(blockIdx.x) * kSkinnyWarps + warp) * F;  // tile-local feature
  if (j0 >= nf) return;  // whole warp; no block barriers in this kernel
  const int nfw = int(nf - j0 < F ? nf - j0 : F);

  float acc[R][F];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int f = 0; f < F; ++f) acc[r][f] = 0.f;

  const float *xr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) xr[r] = xop + int64_t(r < rows ? r : rows - 1) * ldk;
  int64_t wrow[F];  // element offset of each feature's row (clamped to a real feature)
#pragma unroll
  for (int f = 0; f < F; ++f) wrow[f] = (f0 + j0 + (f < nfw ? f : nfw - 1)) * K;

  if (vec_ok) {
    constexpr int V = L::V;
    for (int64_t i = int64_t(lane) * V; i + V <= K; i += 32 * V) {
      float xv[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int q = 0; q < V; q += 4) {
          const float4 t = *reinterpret_cast<const float4 *>(xr[r] + i + q);
          xv[r][q] = t.x;
          xv[r][q + 1] = t.y;
          xv[r][q + 2] = t.z;
          xv[r][q + 3] = t.w;
        }
#pragma unroll
      for (int f = 0; f < F; ++f) {
        if (f < nfw) {
          float w[V];
          L::vec(W, wrow[f] + i, w);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int q = 0; q < V; ++q) acc[r][f] = fmaf(xv[r][q], w[q], acc[r][f]);
        }
      }
    }
  } else {
    for (int64_t i = lane; i < K; i += 32) {
      float xs[R];
#pragma unroll
      for (int r = 0; r < R; ++r) xs[r] = xr[r][i];
#pragma unroll
      for (int f = 0; f < F; ++f) {
        if (f < nfw) {
          const float w = L::one(W, wrow[f] + i);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][f] = fmaf(xs[r], w, acc[r][f]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int f = 0; f < F; ++f) acc[r][f] = dev::warp_sum(acc[r][f]);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < rows)
#pragma unroll
        for (int f = 0; f < F; ++f)
          if (f < nfw) P[int64_t(r) * ldp + j0 + f] = acc[r][f];
  }
}

// ---------------------------------------------------------------- tiled GEMM

// Many rows without cuBLAS: 64 rows x 64 features per block, 16-deep shared-memory slices,
// 4 x 4 outputs per thread. Exact f32 math; correct for every shape, not tuned.
template <int DT>
__global__ void __launch_bounds__(256)
    tiled_kernel(const float *__restrict__ xop, int64_t ldk, int64_t rows, const void *__restrict__ W,
                 int64_t K, int64_t f0, int64_t nf, float *__restrict__ P, int64_t ldp, const ErrRec *err) {
  using L = Load<DT>;
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  if (has_error(err)) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t r0 = int64_t(blockIdx.y) * BM, j0 = int64_t(blockIdx.x) * BN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = tid + 256 * q;  // 0 .. 1023 = 64 rows x 16 columns
      const int row = e / BK, kk = e % BK;
      const int64_t gk = k0 + kk;
      const int64_t gr = r0 + row, gj = j0 + row;
      As[kk][row] = (gr < rows && gk < K) ? xop[gr * ldk + gk] : 0.f;
      Bs[kk][row] = (gj < nf && gk < K) ? L::one(W, (f0 + gj) * K + gk) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gr = r0 + ty * 4 + i;
    if (gr >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gj = j0 + tx * 4 + j;
      if (gj < nf) P[gr * ldp + gj] = acc[i][j];
    }
  }
}

// ---------------------------------------------------------------- tensor-core GEMM

// mma.sync m16n8k16, f32 accumulation: c (16 features x 8 rows) += a (16 x 16 weights) . b (16
// operand values x 8 rows). Lane (g = lane / 4, t = lane % 4) holds a = {row g, k 2t..2t+1},
// {row g+8, same k}, {row g, k 2t+8..2t+9}, {row g+8, same}; b = {k 2t..2t+1 of row g},
// {k 2t+8..2t+9}; c = {feature g: rows 2t, 2t+1}, {feature g+8: rows 2t, 2t+1}.
template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two int8 values (bytes 2h, 2h+1 of w) as an f16x2 word, exactly: the byte + 128 goes into the
// mantissa of 1024 (0x6400), then 1152 is subtracted.
__device__ __forceinline__ uint32_t i8x2_to_f16x2(uint32_t w, int h) {
  const uint32_t u = __byte_perm(w ^ 0x80808080u, 0x64646464u, h ? 0x4342 : 0x4140);
  const __half2 v = __hsub2(*reinterpret_cast<const __half2 *>(&u), __half2half2(__ushort_as_half(0x6480)));
  return *reinterpret_cast<const uint32_t *>(&v);
}

// The weights of the tensor-core kernel, per dtype: a lane loads E consecutive weights of a row
// per chunk (one 16-byte load), used as E / 2 16-bit pairs.
template <int DT>
struct MmaLoad {  // f16 (1), bf16 (2)
  static constexpr int E = 8;
  static constexpr bool kBF16 = DT == 2;
  __device__ __forceinline__ static void words(const uint4 &u, uint32_t (&w)[E / 2]) {
    w[0] = u.x;
    w[1] = u.y;
    w[2] = u.z;
    w[3] = u.w;
  }
};
template <>
struct MmaLoad<3> {  // int8, converted to f16 (exact)
  static constexpr int E = 16;
  static constexpr bool kBF16 = false;
  __device__ __forceinline__ static void words(const uint4 &u, uint32_t (&w)[E / 2]) {
    const uint32_t q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = i8x2_to_f16x2(q[i], 0);
      w[2 * i + 1] = i8x2_to_f16x2(q[i], 1);
    }
  }
};

constexpr int kMmaWarps = 4;

// P (rows x nf, ld ldp) = split operand . W[f0 .. f0 + nf)^T for up to 8 * NT rows. A block
// takes 16 * FT features; its warps take every 4th chunk of 4 * E columns (a lane E
// consecutive ones: the mma's k order is the same permutation of them for weights and operand,
// which a dot product does not see), U chunks per step (their loads in flight together), and
// add their partial sums at the end. The weights are read once, in 16-byte loads; the operand
// (2 * rows x ldk, hi and lo rows, zero padded to a multiple of the chunk) comes from L1/L2.
template <int DT, int NT, int FT, int U>
__global__ void __launch_bounds__(kMmaWarps * 32)
    mma_kernel(const unsigned short *__restrict__ xop, int64_t ldk, int rows, const void *__restrict__ W,
               int64_t K, int64_t f0, int64_t nf, float *__restrict__ P, int64_t ldp, const ErrRec *err) {
  using L = MmaLoad<DT>;
  constexpr int E = L::E, C = 4 * E, NW = E / 2, NM = E / 4;  // chunk columns, words, mmas per chunk
  constexpr int ES = DT == 3 ? 1 : 2;
  __shared__ float red[kMmaWarps - 1][FT * NT * 4][32];
  if (has_error(err)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t jb = int64_t(blockIdx.x) * (16 * FT);
  const unsigned char *Wb = static_cast<const unsigned char *>(W);

  int64_t wrow[FT][2];  // byte offsets of the lane's two weight rows per tile (clamped)
#pragma unroll
  for (int f = 0; f < FT; ++f)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = jb + 16 * f + g + 8 * h;
      wrow[f][h] = ((f0 + (j < nf ? j : nf - 1)) * K + E * t) * ES;
    }
  const unsigned short *xrow[NT];  // the lane's hi row per n-tile (lo row: + ldk)
  bool xin[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int r = 8 * n + g;
    xin[n] = r < rows;
    xrow[n] = xop + int64_t(2 * (xin[n] ? r : 0)) * ldk + E * t;
  }
  float acc[FT][NT][4];
#pragma unroll
  for (int f = 0; f < FT; ++f)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[f][n][q] = 0.f;

  const int64_t n_chunks = (K + C - 1) / C;
  for (int64_t c0 = warp; c0 < n_chunks; c0 += kMmaWarps * U) {
    uint4 raw[U][FT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (c0 + int64_t(kMmaWarps) * u) * C;
      const bool in = k + E * t < K;  // K % E == 0: a lane's E columns are all in or all out
#pragma unroll
      for (int f = 0; f < FT; ++f)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          raw[u][f][h] = in ? __ldg(reinterpret_cast<const uint4 *>(Wb + wrow[f][h] + k * ES)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (c0 + int64_t(kMmaWarps) * u) * C;
      if (k >= K) break;  // warp-uniform
      uint32_t a[FT][2][NW];
#pragma unroll
      for (int f = 0; f < FT; ++f) {
        L::words(raw[u][f][0], a[f][0]);
        L::words(raw[u][f][1], a[f][1]);
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        uint32_t xh[NW], xl[NW];
#pragma unroll
        for (int v = 0; v < NW; v += 4) {  // the padded operand: always in bounds
          uint4 hv = make_uint4(0, 0, 0, 0), lv = make_uint4(0, 0, 0, 0);
          if (xin[n]) {
            hv = __ldg(reinterpret_cast<const uint4 *>(xrow[n] + k + 2 * v));
            lv = __ldg(reinterpret_cast<const uint4 *>(xrow[n] + ldk + k + 2 * v));
          }
          xh[v] = hv.x, xh[v + 1] = hv.y, xh[v + 2] = hv.z, xh[v + 3] = hv.w;
          xl[v] = lv.x, xl[v + 1] = lv.y, xl[v + 2] = lv.z, xl[v + 3] = lv.w;
        }
#pragma unroll
        for (int f = 0; f < FT; ++f)
#pragma unroll
          for (int m = 0; m < NM; ++m) {
            const uint32_t a0 = a[f][0][2 * m], a1 = a[f][1][2 * m], a2 = a[f][0][2 * m + 1],
                           a3 = a[f][1][2 * m + 1];
            mma16816<L::kBF16>(acc[f][n], a0, a1, a2, a3, xh[2 * m], xh[2 * m + 1]);
            mma16816<L::kBF16>(acc[f][n], a0, a1, a2, a3, xl[2 * m], xl[2 * m + 1]);
          }
      }
    }
  }

  if (warp > 0) {
#pragma unroll
    for (int f = 0; f < FT; ++f)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) red[warp - 1][(f * NT + n) * 4 + q][lane] = acc[f][n][q];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int f = 0; f < FT; ++f)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float v = acc[f][n][q];
#pragma unroll
          for (int w = 0; w < kMmaWarps - 1; ++w) v += red[w][(f * NT + n) * 4 + q][lane];
          const int64_t j = jb + 16 * f + g + 8 * (q >> 1);
          const int r = 8 * n + 2 * t + (q & 1);
          if (j < nf && r < rows) P[int64_t(r) * ldp + j] = v;
        }
  }
}

// ---------------------------------------------------------------- int8 -> f16

__global__ void dequant_kernel(const signed char *__restrict__ q, int64_t count, __half *__restrict__ dst,
                               bool aligned) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (aligned) {  // 4 values per thread step: q 4-byte aligned, dst 8-byte aligned
    const int64_t n4 = count / 4;
    const char4 *q4 = reinterpret_cast<const char4 *>(q);
    __half2 *d2 = reinterpret_cast<__half2 *>(dst);
    for (int64_t i = start; i < n4; i += stride) {
      const char4 c = q4[i];
      d2[2 * i] = __halves2half2(__int2half_rn(c.x), __int2half_rn(c.y));
      d2[2 * i + 1] = __halves2half2(__int2half_rn(c.z), __int2half_rn(c.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + start; i < count; i += stride) dst[i] = __int2half_rn(q[i]);
}

// ---------------------------------------------------------------- selection

// One block per (segment of S features, row): scale + bias + activation of the segment's raw
// dot products into shared memory, then its best min(kt, #candidates) keys into the row's pool
// (any order), the remaining slots kEmpty.
__global__ void __launch_bounds__(kSegThreads) segment_kernel(kern::SegmentArgs a) {
  __shared__ float vals[kSegment];
  __shared__ uint32_t hist[256];
  __shared__ sel::RadixState st;
  __shared__ uint32_t counter;
  if (has_error(a.err)) return;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.y;
  const int64_t g = a.f0 / a.S + blockIdx.x;  // segment index in d_sae
  const int64_t fb = g * a.S;                 // its first feature
  const int64_t cnt = a.d_sae - fb < a.S ? a.d_sae - fb : a.S;
  const float rs = a.row_scale[r];
  const float *prow = a.P + r * a.ldp + (fb - a.f0);

  uint32_t V = 0;  // candidates in the segment
  for (int64_t base = 0; base < cnt; base += blockDim.x) {
    const int64_t j = base + tid;
    bool c = false;
    if (j < cnt) {
      const int64_t f = fb + j;
      const float v = sel::pre_activation(prow[j], rs, a.enc_scales, a.b_enc, f);
      c = sel::is_candidate(v, a.activation, a.threshold ? a.threshold[f] : 0.f);
      vals[j] = c ? v : dev::quiet_nan();
    }
    V += uint32_t(__syncthreads_count(c));
  }
  const uint32_t kk = uint32_t(a.kt) < V ? uint32_t(a.kt) : V;
  uint64_t *out = a.pool + (r * a.n_seg + g) * a.kt;
  const sel::SegmentKeys keys{vals, fb};
  uint64_t T = sel::kNoneSelected;
  if (kk > 0) T = kk == V ? 1 : dev::block_radix_select(keys, cnt, kk, hist, &st);
  if (tid == 0) counter = 0;
  __syncthreads();
  if (kk > 0) {
    for (int64_t j = tid; j < cnt; j += blockDim.x) {
      const uint64_t key = keys(j);
      if (key != sel::kEmpty && key >= T) {
        const uint32_t slot = atomicAdd(&counter, 1u);
        if (slot < kk) out[slot] = key;
      }
    }
  }
  for (int64_t t = int64_t(kk) + tid; t < a.kt; t += blockDim.x) out[t] = sel::kEmpty;
}

// One block per row: the best min(k, #candidates) keys of the row's pool, sorted, then the
// output row with padding (0, -1) after them.
__global__ void __launch_bounds__(kFinalThreads) final_kernel(kern::FinalArgs a) {
  extern __shared__ uint64_t dyn[];
  __shared__ uint32_t hist[256];
  __shared__ sel::RadixState st;
  __shared__ uint32_t counter;
  if (has_error(a.err)) return;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;
  const uint64_t *keys = a.pool + r * a.M;
  uint64_t *sorted = a.sort_global ? a.sort_buf + r * a.sort_n : dyn + (a.stage ? a.M : 0);
  if (a.stage) {
    for (int64_t i = tid; i < a.M; i += blockDim.x) dyn[i] = keys[i];
    __syncthreads();
    keys = dyn;
  }
  uint32_t V = 0;
  for (int64_t base = 0; base < a.M; base += blockDim.x) {
    const int64_t i = base + tid;
    V += uint32_t(__syncthreads_count(i < a.M && keys[i] != sel::kEmpty));
  }
  const uint32_t kk = uint32_t(a.k) < V ? uint32_t(a.k) : V;
  if (kk > 0) {
    const uint64_t T = kk == V ? 1 : dev::block_radix_select(sel::ListKeys{keys}, a.M, kk, hist, &st);
    const uint32_t n2 = sel::next_pow2(kk);
    if (tid == 0) counter = 0;
    __syncthreads();
    for (int64_t i = tid; i < a.M; i += blockDim.x) {
      const uint64_t key = keys[i];
      if (key != sel::kEmpty && key >= T) {
        const uint32_t slot = atomicAdd(&counter, 1u);
        if (slot < kk) sorted[slot] = key;
      }
    }
    for (uint32_t i = kk + tid; i < n2; i += blockDim.x) sorted[i] = sel::kEmpty;
    __syncthreads();
    dev::block_bitonic_desc(sorted, n2);
  }
  float *vout = a.values + r * a.k;
  int32_t *iout = a.indices + r * a.k;
  for (int64_t j = tid; j < a.k; j += blockDim.x) {
    float v;
    int32_t i;
    sel::output_entry(sorted, kk, uint32_t(j), v, i);
    vout[j] = v;
    iout[j] = i;
  }
}

// Dense pre-activations: the tile's raw dot products (scratch P) -> scaled, plus b_enc, into the
// caller's output. The GEMM never writes the output itself (cuBLAS cannot check the ErrRec), so
// a call that found a NaN input leaves it untouched.
__global__ void epilogue_kernel(const float *__restrict__ P, int64_t ldp, float *__restrict__ out, int64_t ld,
                                int64_t f0, int64_t nf, const float *row_scale, const float *enc_scales,
                                const float *b_enc, const ErrRec *err) {
  if (has_error(err)) return;
  const int64_t r = blockIdx.y;
  const float rs = row_scale[r];
  const float *p = P + r * ldp;
  float *o = out + r * ld + f0;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nf; j += int64_t(gridDim.x) * blockDim.x)
    o[j] = sel::pre_activation(p[j], rs, enc_scales, b_enc, f0 + j);
}

__global__ void probe() {}

template <int DT>
void skinny_launch(int rows, const float *xop, int64_t ldk, const void *W, int64_t K, int64_t f0,
                   int64_t nf, float *P, int64_t ldp, bool vec_ok, const ErrRec *err, cudaStream_t st) {
  const int64_t per_block = int64_t(kSkinnyWarps) * kSkinnyFeatures;
  const dim3 grid(unsigned(ceil_div(nf, per_block)));
  const dim3 block(kSkinnyWarps * 32);
  switch (skinny_rows(rows)) {
    case 1: skinny_kernel<DT, 1><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, vec_ok, err); break;
    case 2: skinny_kernel<DT, 2><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, vec_ok, err); break;
    case 4: skinny_kernel<DT, 4><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, vec_ok, err); break;
    default: skinny_kernel<DT, 8><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, vec_ok, err); break;
  }
}

template <int DT>
void mma_launch(int rows, const unsigned short *xop, int64_t ldk, const void *W, int64_t K, int64_t f0, int64_t nf,
                float *P, int64_t ldp, const ErrRec *err, cudaStream_t st) {
  const dim3 block(kMmaWarps * 32);
  const dim3 grid(unsigned(ceil_div(nf, 64)));
  // Two chunks in flight per step for int8 (half the bytes per load); 16-bit weights run
  // faster with one (fewer registers, more warps). Measured on an H100.
  constexpr int U = DT == 3 ? 2 : 1;
  switch (mma_rows(rows)) {
    case 8: mma_kernel<DT, 1, 4, U><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err); break;
    case 16: mma_kernel<DT, 2, 4, U><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err); break;
    default:
      // Chunks of up to kMmaRowsI8 rows only for int8; the plan never gives 16-bit weights more
      // than kMmaRows16 (the asserts keep the instantiations and the plan in step).
      static_assert(kMmaRows16 <= 16 && kMmaRowsI8 <= 32, "mma_launch instantiates up to 16 / 32 rows");
      if constexpr (DT == 3)
        mma_kernel<DT, 4, 4, 1><<<grid, block, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err);
      break;
  }
}

template <int DT>
bool vec_aligned(const void *W, int64_t K) {
  using L = Load<DT>;
  return reinterpret_cast<uintptr_t>(W) % L::VB == 0 && (K * L::ES) % L::VB == 0;
}

unsigned grid_for(int64_t work, int threads, int64_t cap = 65535) {
  const int64_t b = ceil_div(work, threads);
  return unsigned(b < 1 ? 1 : b > cap ? cap : b);
}

}  // namespace

namespace kern {

void check_finite(const float *x, int64_t n, int64_t d, int64_t ld, ErrRec *err, cudaStream_t st) {
  check_finite_kernel<<<unsigned(n), 256, 0, st>>>(x, d, ld, err);
}

void prepare_operand(const float *x, int64_t n, int64_t ldx, int64_t d, const float *shift, int op_dtype,
                     void *xop, int64_t ldk, float *row_scale, const ErrRec *err, cudaStream_t st) {
  const unsigned b = unsigned(n);
  switch (op_dtype) {
    case kOpF16: prepare_kernel<kOpF16><<<b, 256, 0, st>>>(x, ldx, d, shift, xop, ldk, row_scale, err); break;
    case kOpBF16: prepare_kernel<kOpBF16><<<b, 256, 0, st>>>(x, ldx, d, shift, xop, ldk, row_scale, err); break;
    case kOpF16Split:
      prepare_kernel<kOpF16Split><<<b, 256, 0, st>>>(x, ldx, d, shift, xop, ldk, row_scale, err);
      break;
    case kOpBF16Split:
      prepare_kernel<kOpBF16Split><<<b, 256, 0, st>>>(x, ldx, d, shift, xop, ldk, row_scale, err);
      break;
    default: prepare_kernel<kOpF32><<<b, 256, 0, st>>>(x, ldx, d, shift, xop, ldk, row_scale, err); break;
  }
}

void skinny_gemm(int dtype, const float *xop, int64_t ldk, int64_t rows, const void *W, int64_t K,
                 int64_t f0, int64_t nf, float *P, int64_t ldp, const ErrRec *err, cudaStream_t st) {
  const int r = int(rows);
  switch (dtype) {
    case 0: skinny_launch<0>(r, xop, ldk, W, K, f0, nf, P, ldp, vec_aligned<0>(W, K), err, st); break;
    case 1: skinny_launch<1>(r, xop, ldk, W, K, f0, nf, P, ldp, vec_aligned<1>(W, K), err, st); break;
    case 2: skinny_launch<2>(r, xop, ldk, W, K, f0, nf, P, ldp, vec_aligned<2>(W, K), err, st); break;
    default: skinny_launch<3>(r, xop, ldk, W, K, f0, nf, P, ldp, vec_aligned<3>(W, K), err, st); break;
  }
}

void mma_gemm(int dtype, const unsigned short *xop, int64_t ldk, int64_t rows, const void *W, int64_t K,
              int64_t f0, int64_t nf, float *P, int64_t ldp, const ErrRec *err, cudaStream_t st) {
  const int r = int(rows);
  switch (dtype) {
    case 1: mma_launch<1>(r, xop, ldk, W, K, f0, nf, P, ldp, err, st); break;
    case 2: mma_launch<2>(r, xop, ldk, W, K, f0, nf, P, ldp, err, st); break;
    default: mma_launch<3>(r, xop, ldk, W, K, f0, nf, P, ldp, err, st); break;
  }
}

bool mma_supported(int dtype, const void *W, int64_t K) {
  if (dtype == 0) return false;  // f32 weights: the skinny kernel's exact f32 math
  const int64_t row_bytes = K * (dtype == 3 ? 1 : 2);
  const int64_t E = dtype == 3 ? MmaLoad<3>::E : MmaLoad<1>::E;
  return K % E == 0 && row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0;
}

void tiled_gemm(int dtype, const float *xop, int64_t ldk, int64_t rows, const void *W, int64_t K,
                int64_t f0, int64_t nf, float *P, int64_t ldp, const ErrRec *err, cudaStream_t st) {
  const dim3 grid(unsigned(ceil_div(nf, 64)), unsigned(ceil_div(rows, 64)));
  switch (dtype) {
    case 0: tiled_kernel<0><<<grid, 256, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err); break;
    case 1: tiled_kernel<1><<<grid, 256, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err); break;
    case 2: tiled_kernel<2><<<grid, 256, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err); break;
    default: tiled_kernel<3><<<grid, 256, 0, st>>>(xop, ldk, rows, W, K, f0, nf, P, ldp, err); break;
  }
}

void dequant_i8(const int8_t *q, int64_t count, void *dst, cudaStream_t st) {
  const bool aligned = reinterpret_cast<uintptr_t>(q) % 4 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  dequant_kernel<<<grid_for(count / 4 + 1, 256, 4096), 256, 0, st>>>(
      reinterpret_cast<const signed char *>(q), count, static_cast<__half *>(dst), aligned);
}

void segment_select(const SegmentArgs &a, cudaStream_t st) {
  const dim3 grid(unsigned(ceil_div(a.nf, a.S)), unsigned(a.rows));
  segment_kernel<<<grid, kSegThreads, 0, st>>>(a);
}

void final_select(const FinalArgs &a, cudaStream_t st) {
  if (a.smem > (48u << 10)) {
    // The attribute is per function (and device), shared by every thread of the process: always
    // the same value, the most any plan asks for, so that a call from another thread with a
    // smaller pool can never lower it between this call's setting and its launch. A failure is
    // left in cudaGetLastError (and the launch then fails too): Scratch::finish reports it.
    (void)cudaFuncSetAttribute(final_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kFinalSmemMax));
  }
  final_kernel<<<unsigned(a.rows), kFinalThreads, a.smem, st>>>(a);
}

void preacts_epilogue(const float *P, int64_t ldp, float *out, int64_t rows, int64_t ld, int64_t f0, int64_t nf,
                      const float *row_scale, const float *enc_scales, const float *b_enc, const ErrRec *err,
                      cudaStream_t st) {
  const dim3 grid(grid_for(nf, 256, 1024), unsigned(rows));
  epilogue_kernel<<<grid, 256, 0, st>>>(P, ldp, out, ld, f0, nf, row_scale, enc_scales, b_enc, err);
}

const void *probe_kernel() { return reinterpret_cast<const void *>(&probe); }

}  // namespace kern
}  // namespace saehook::cuda
