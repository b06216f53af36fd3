// Sparse decode (gather-accumulate of k decoder rows or columns per token) and steering.
// Accumulation order per output element is the CPU's: b_dec, then the entries in order.
#include "device.cuh"
#include "plan.cuh"
#include "../core/steer_formula.hpp"

namespace saehook::cuda {

namespace {

using dev::Load;
using dev::has_error;

constexpr int kRowsThreads = 128;  // decode_rows: threads per block = entries staged per chunk
constexpr int kColsThreads = 256;  // decode_cols

__global__ void decode_check_kernel(const float *__restrict__ vals, const int32_t *__restrict__ idx,
                                    int64_t count, int64_t m, ErrRec *err) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int32_t f = idx[e];
    if (f < -1 || f >= m || !isfinite(vals[e])) atomicMin(&err->idx_pos, (unsigned long long)e);
  }
}

// Feature-major decoder: block (row r, V * kRowsThreads output columns); each thread keeps V
// accumulators and reads V consecutive weights of every entry's decoder row with one load.
template <int DT>
__global__ void __launch_bounds__(kRowsThreads)
    decode_rows_kernel(const float *__restrict__ vals, const int32_t *__restrict__ idx, int32_t kk,
                       const void *__restrict__ W, int64_t d, const float *__restrict__ b_dec,
                       float *__restrict__ out, int64_t ldo, bool vec_ok, const ErrRec *err) {
  using L = Load<DT>;
  constexpr int V = L::V;
  __shared__ float sv[kRowsThreads];
  __shared__ int32_t si[kRowsThreads];
  if (has_error(err)) return;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;
  const int64_t c0 = (int64_t(blockIdx.y) * kRowsThreads + tid) * V;
  float acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = (b_dec && c0 + v < d) ? b_dec[c0 + v] : 0.f;
  const float *vr = vals + r * kk;
  const int32_t *ir = idx + r * kk;
  const bool full = vec_ok && c0 + V <= d;
  for (int32_t j0 = 0; j0 < kk; j0 += kRowsThreads) {
    const int cnt = kk - j0 < kRowsThreads ? kk - j0 : kRowsThreads;
    __syncthreads();  // the previous chunk is consumed
    if (tid < cnt) {
      sv[tid] = vr[j0 + tid];
      si[tid] = ir[j0 + tid];
    }
    __syncthreads();
    if (c0 < d) {
#pragma unroll 4
      for (int jj = 0; jj < cnt; ++jj) {
        const int32_t f = si[jj];
        if (f < 0) continue;
        const float a = sv[jj];
        const int64_t base = int64_t(f) * d + c0;
        if (full) {
          float w[V];
          L::vec(W, base, w);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] = fmaf(a, w[v], acc[v]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v)
            if (c0 + v < d) acc[v] = fmaf(a, L::one(W, base + v), acc[v]);
        }
      }
    }
  }
  float *o = out + r * ldo;
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (c0 + v < d) o[c0 + v] = acc[v];
}

// Model-dimension-major decoder (Qwen-Scope's W_dec (d_model, d_sae)): one thread per output
// column i, reading element (i, f) of every entry's feature f.
template <int DT>
__global__ void __launch_bounds__(kColsThreads)
    decode_cols_kernel(const float *__restrict__ vals, const int32_t *__restrict__ idx, int32_t kk,
                       const void *__restrict__ W, int64_t d, int64_t m, const float *__restrict__ b_dec,
                       float *__restrict__ out, int64_t ldo, const ErrRec *err) {
  using L = Load<DT>;
  __shared__ float sv[kColsThreads];
  __shared__ int32_t si[kColsThreads];
  if (has_error(err)) return;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;
  const int64_t i = int64_t(blockIdx.y) * kColsThreads + tid;
  float acc = (b_dec && i < d) ? b_dec[i] : 0.f;
  const float *vr = vals + r * kk;
  const int32_t *ir = idx + r * kk;
  for (int32_t j0 = 0; j0 < kk; j0 += kColsThreads) {
    const int cnt = kk - j0 < kColsThreads ? kk - j0 : kColsThreads;
    __syncthreads();
    if (tid < cnt) {
      sv[tid] = vr[j0 + tid];
      si[tid] = ir[j0 + tid];
    }
    __syncthreads();
    if (i < d) {
#pragma unroll 4
      for (int jj = 0; jj < cnt; ++jj) {
        const int32_t f = si[jj];
        if (f >= 0) acc = fmaf(sv[jj], L::one(W, i * m + f), acc);
      }
    }
  }
  if (i < d) out[r * ldo + i] = acc;
}

// One block per item: the decoder direction as f32, normalised like ops.cpp (sum of squares in
// double, then one float reciprocal).
template <int DT>
__global__ void __launch_bounds__(256) directions_kernel(ItemBatch b, int layout, const void *__restrict__ W,
                                                         int64_t d, int64_t m, float *dirs, ErrRec *err) {
  __shared__ double red[32];
  const int t = blockIdx.x;
  if (steer_is_condition(b.op[t])) return;  // block-uniform: condition items have no direction
  const int64_t f = b.feature[t];
  float *o = dirs + int64_t(b.first + t) * d;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float w = Load<DT>::one(W, layout == SAEHOOK_DEC_ROWS ? f * d + i : i * m + f);
    o[i] = w;
    ss += double(w) * w;
  }
  if (!b.normalize[t]) return;  // block-uniform
  ss = dev::block_sum(ss, red);
  if (!(ss > 0)) {
    if (threadIdx.x == 0) atomicMin(&err->dir_item, (unsigned long long)(b.first + t));
    return;
  }
  const float inv = float(1.0 / sqrt(ss));
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] *= inv;  // this thread's own elements
}

// One block per row: the batch's coefficients from the row's encode, then h += c_t * d_t for
// the items in order. With a CAP or RESCALE item the items apply one after another, each
// projection a block-wide sum (in double, as the CPU path) over the row as the earlier items
// left it; each thread only ever touches its own elements of the row.
__global__ void __launch_bounds__(256) apply_kernel(ItemBatch b, float *h, int64_t ldh, int64_t d,
                                                    const uint8_t *__restrict__ mask, const uint8_t *__restrict__ act,
                                                    int32_t n_items, const float *__restrict__ vals,
                                                    const int32_t *__restrict__ idx, int32_t kk,
                                                    const float *__restrict__ dirs, const ErrRec *err) {
  __shared__ float z[kBatchItems];
  __shared__ float c[kBatchItems];
  __shared__ double red[32];
  if (has_error(err)) return;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;
  if (!act && mask && !mask[r]) return;  // block-uniform (with act, act holds the mask)
  const uint8_t *ar = act ? act + r * n_items + b.first : nullptr;
  for (int t = tid; t < b.n; t += blockDim.x) z[t] = 0.f;
  __syncthreads();
  if (vals) {  // an encode's indices are unique, so at most one thread writes each z[t]
    const float *vr = vals + r * kk;
    const int32_t *ir = idx + r * kk;
    const int64_t pairs = int64_t(b.n) * kk;
    for (int64_t p = tid; p < pairs; p += blockDim.x) {
      const int t = int(p / kk);
      const int64_t j = p - int64_t(t) * kk;
      if (steer_uses_activation(b.op[t]) && ir[j] == b.feature[t]) z[t] = vr[j];
    }
    __syncthreads();
  }
  for (int t = tid; t < b.n; t += blockDim.x)
    c[t] = (ar && !ar[t]) ? 0.f : steer_coefficient(b.op[t], b.value[t], b.value2[t], z[t], 0.f);
  __syncthreads();
  float *row = h + r * ldh;
  const float *dbase = dirs + int64_t(b.first) * d;
  if (!b.has_projection) {
    for (int64_t i = tid; i < d; i += blockDim.x) {
      float y = row[i];
      for (int t = 0; t < b.n; ++t) {
        const float ct = c[t];
        if (ct != 0.f) y = fmaf(ct, dbase[int64_t(t) * d + i], y);
      }
      row[i] = y;
    }
    return;
  }
  for (int t = 0; t < b.n; ++t) {
    const float *dt = dbase + int64_t(t) * d;
    float ct = c[t];
    if (steer_uses_projection(b.op[t]) && !(ar && !ar[t])) {  // block-uniform
      double acc = 0;
      for (int64_t i = tid; i < d; i += blockDim.x) acc += double(row[i]) * dt[i];
      const double p = dev::block_sum(acc, red);
      ct = steer_coefficient(b.op[t], b.value[t], b.value2[t], 0.f, float(p));
    }
    if (ct != 0.f)
      for (int64_t i = tid; i < d; i += blockDim.x) row[i] = fmaf(ct, dt[i], row[i]);
  }
}

unsigned blocks_for(int64_t work, int threads, int64_t cap) {
  const int64_t b = ceil_div(work, threads);
  return unsigned(b < 1 ? 1 : b > cap ? cap : b);
}

template <int DT>
void decode_t(int layout, const float *values, const int32_t *indices, int64_t n, int32_t kk, const void *W,
              int64_t d, int64_t m, const float *b_dec, float *out, int64_t ldo, const ErrRec *err,
              cudaStream_t st) {
  using L = Load<DT>;
  if (layout == SAEHOOK_DEC_ROWS) {
    const bool vec_ok = reinterpret_cast<uintptr_t>(W) % L::VB == 0 && (d * L::ES) % L::VB == 0;
    const dim3 grid(unsigned(n), unsigned(ceil_div(d, int64_t(kRowsThreads) * L::V)));
    decode_rows_kernel<DT><<<grid, kRowsThreads, 0, st>>>(values, indices, kk, W, d, b_dec, out, ldo, vec_ok, err);
  } else {
    const dim3 grid(unsigned(n), unsigned(ceil_div(d, kColsThreads)));
    decode_cols_kernel<DT><<<grid, kColsThreads, 0, st>>>(values, indices, kk, W, d, m, b_dec, out, ldo, err);
  }
}

}  // namespace

namespace kern {

void decode_check(const float *values, const int32_t *indices, int64_t count, int64_t m, ErrRec *err,
                  cudaStream_t st) {
  decode_check_kernel<<<blocks_for(count, 256, 4096), 256, 0, st>>>(values, indices, count, m, err);
}

void decode(int dtype, int layout, const float *values, const int32_t *indices, int64_t n, int32_t kk,
            const void *W, int64_t d, int64_t m, const float *b_dec, float *out, int64_t ldo, const ErrRec *err,
            cudaStream_t st) {
  switch (dtype) {
    case 1: decode_t<1>(layout, values, indices, n, kk, W, d, m, b_dec, out, ldo, err, st); break;
    case 2: decode_t<2>(layout, values, indices, n, kk, W, d, m, b_dec, out, ldo, err, st); break;
    default: decode_t<0>(layout, values, indices, n, kk, W, d, m, b_dec, out, ldo, err, st); break;
  }
}

void steer_directions(const ItemBatch &b, int dtype, int layout, const void *W, int64_t d, int64_t m,
                      float *dirs, ErrRec *err, cudaStream_t st) {
  switch (dtype) {
    case 1: directions_kernel<1><<<unsigned(b.n), 256, 0, st>>>(b, layout, W, d, m, dirs, err); break;
    case 2: directions_kernel<2><<<unsigned(b.n), 256, 0, st>>>(b, layout, W, d, m, dirs, err); break;
    default: directions_kernel<0><<<unsigned(b.n), 256, 0, st>>>(b, layout, W, d, m, dirs, err); break;
  }
}

void steer_apply(const ItemBatch &b, float *h, int64_t n, int64_t ldh, int64_t d, const uint8_t *mask,
                 const uint8_t *act, int32_t n_items, const float *vals, const int32_t *idx, int32_t kk,
                 const float *dirs, const ErrRec *err, cudaStream_t st) {
  apply_kernel<<<unsigned(n), 256, 0, st>>>(b, h, ldh, d, mask, act, n_items, vals, idx, kk, dirs, err);
}

}  // namespace kern
}  // namespace saehook::cuda
