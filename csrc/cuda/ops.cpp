// saehook::cuda (csrc/core/cuda_ops.hpp): the C API's operations for CUDA handles. Same
// contracts and error messages as the CPU path (ops.cpp); every device buffer is the caller's
// or part of one scratch block per call, and everything runs on the caller's stream.
//
// Errors that depend on data (NaN input, bad decode index, zero direction to normalise) are
// found by the kernels and reported when the call waits for its stream at the end (skipped
// while the stream is captured into a CUDA graph, or with SAEHOOK_CUDA_SYNC=0); the kernels
// that write outputs or rows in place do nothing once such an error is recorded, so a failed
// call leaves them unchanged.
#include <library_types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "../core/cuda_ops.hpp"
#include "../core/steer_formula.hpp"
#include "../core/steer_modes.hpp"
#include "hook_ops.hpp"
#include "launch.cuh"
#include "plan.cuh"
#include "runtime.cuh"

namespace saehook::cuda {

namespace {

cudaStream_t as_stream(void *s) { return static_cast<cudaStream_t>(s); }

// The operand format of a GEMM: f32 for the f32 kernels and f32 weights; the weights' 16-bit
// type for cuBLAS (f16 for int8 weights, converted tile by tile); split halves of it for the
// tensor-core kernel.
kern::Operand operand_of(Gemm g, saehook_dtype enc) {
  const bool bf16 = enc == SAEHOOK_BF16;
  if (g == Gemm::Mma) return bf16 ? kern::kOpBF16Split : kern::kOpF16Split;
  if (g != Gemm::Cublas || enc == SAEHOOK_F32) return kern::kOpF32;
  return bf16 ? kern::kOpBF16 : kern::kOpF16;
}

int cuda_type(saehook_dtype t) {
  switch (t) {
    case SAEHOOK_F16: return CUDA_R_16F;
    case SAEHOOK_BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

[[noreturn]] void fail_k(int64_t k, int64_t m) {
  fail(SAEHOOK_ERR_SHAPE, "k = " + std::to_string(k) + " exceeds d_sae = " + std::to_string(m));
}

// Reports an input NaN/Inf the kernels found, with the CPU's message.
void report_input(const ErrRec &h, const float *x, int64_t ld, int64_t d) {
  if (h.nan_pos == kNoError) return;
  const int64_t r = int64_t(h.nan_pos / uint64_t(d)), c = int64_t(h.nan_pos % uint64_t(d));
  float v = 0.f;
  if (cudaMemcpy(&v, x + r * ld + c, 4, cudaMemcpyDeviceToHost) != cudaSuccess) (void)cudaGetLastError();
  fail(SAEHOOK_ERR_NAN, std::string("input contains ") + (std::isnan(v) ? "NaN" : "Inf") + " at row " +
                            std::to_string(r) + ", column " + std::to_string(c));
}

// Encodes row chunks of one call: the plan, and where its buffers lie in the call's scratch.
struct Encoder {
  const saehook_sae_desc &D;
  int device;
  bool uses_blas;   // this call's GEMMs go through cuBLAS
  Gemm engine;      // one GEMM for every chunk of a call (so its precision is the same for all rows)
  EncodePlan p;
  size_t o_rs = 0, o_xop = 0, o_P = 0, o_pool = 0, o_sort = 0, o_deq = 0, o_ws = 0, ws_bytes = 0;

  // Reserves the buffers in L. `dense`: for preacts (the P tile, no candidate pools). The GEMM
  // always writes the P scratch, never the caller's output: cuBLAS cannot skip its work once a
  // kernel found a NaN input, and a failed call must leave the output untouched.
  Encoder(const saehook_sae_desc &d, int64_t n, int64_t k, Layout &L, bool dense, cudaStream_t st)
      : D(d), device(d.cuda_device) {
    const bool int8 = D.enc_dtype == SAEHOOK_I8;
    const bool mma = kern::mma_supported(D.enc_dtype, D.W_enc, D.d_model);
    engine = choose_gemm(n, n > kSkinnyRows && have_cublas(device, st), mma, int8);
    uses_blas = engine == Gemm::Cublas;
    p = plan_encode(n, D.d_model, D.d_sae, k, uses_blas && int8, Budget(), gemm_max_rows(engine, int8));
    o_rs = L.take(size_t(p.R) * 4);
    o_xop = L.take(plan_operand_bytes(p));
    o_P = L.take(plan_preacts_bytes(p));
    if (!dense) {
      o_pool = L.take(plan_pool_bytes(p));
      if (p.sort_global) o_sort = L.take(plan_sort_bytes(p));
    }
    if (uses_blas && D.enc_dtype == SAEHOOK_I8) o_deq = L.take(plan_dequant_bytes(p));
    if (uses_blas) {
      ws_bytes = cublas_workspace_bytes(device);
      o_ws = L.take(ws_bytes);
    }
  }

  // P[r * ldp + j] = raw dot products of the operand rows with features f0 .. f0 + nf.
  void gemm(const Scratch &sc, Gemm g, kern::Operand op, int64_t rows, int64_t f0, int64_t nf, float *P,
            int64_t ldp, cudaStream_t st) const {
    const int64_t d = D.d_model;
    const void *xop = sc.at<void>(o_xop);
    switch (g) {
      case Gemm::Skinny:
        kern::skinny_gemm(D.enc_dtype, static_cast<const float *>(xop), p.ldk, rows, D.W_enc, d, f0, nf, P, ldp,
                          sc.err(), st);
        return;
      case Gemm::Mma:
        kern::mma_gemm(D.enc_dtype, static_cast<const unsigned short *>(xop), p.ldk, rows, D.W_enc, d, f0, nf, P, ldp,
                       sc.err(), st);
        return;
      case Gemm::Tiled:
        kern::tiled_gemm(D.enc_dtype, static_cast<const float *>(xop), p.ldk, rows, D.W_enc, d, f0, nf, P, ldp,
                         sc.err(), st);
        return;
      case Gemm::Cublas: {
        const void *A;
        int a_type;
        if (D.enc_dtype == SAEHOOK_I8) {
          void *deq = sc.at<void>(o_deq);
          kern::dequant_i8(static_cast<const int8_t *>(D.W_enc) + f0 * d, nf * d, deq, st);
          A = deq;
          a_type = CUDA_R_16F;
        } else {
          A = static_cast<const uint8_t *>(D.W_enc) + size_t(f0) * size_t(d) * dtype_size(D.enc_dtype);
          a_type = cuda_type(D.enc_dtype);
        }
        cublas_gemm_tn(device, st, sc.at<void>(o_ws), ws_bytes, int(nf), int(rows), int(d), A, a_type, int(d), xop,
                       op == kern::kOpBF16 ? CUDA_R_16BF : op == kern::kOpF16 ? CUDA_R_16F : CUDA_R_32F, int(p.ldk),
                       P, int(ldp));
        return;
      }
    }
  }

  // The GEMM operand of `rows` rows of x; returns the GEMM that takes it.
  Gemm prepare(const Scratch &sc, const float *x, int64_t ldx, int64_t rows, kern::Operand &op,
               cudaStream_t st) const {
    const Gemm g = engine;
    op = operand_of(g, D.enc_dtype);
    kern::prepare_operand(x, rows, ldx, D.d_model, D.subtract_b_dec ? D.b_dec : nullptr, op, sc.at<void>(o_xop),
                          p.ldk, sc.at<float>(o_rs), sc.err(), st);
    return g;
  }

  // Top-K of `rows` (<= p.R) rows: values/indices rows x k.
  void chunk(const Scratch &sc, const float *x, int64_t ldx, int64_t rows, int32_t k, float *values,
             int32_t *indices, cudaStream_t st) const {
    kern::Operand op;
    const Gemm g = prepare(sc, x, ldx, rows, op, st);
    float *P = sc.at<float>(o_P);
    uint64_t *pool = sc.at<uint64_t>(o_pool);
    for (int64_t f0 = 0; f0 < D.d_sae; f0 += p.T) {
      const int64_t nf = std::min(p.T, D.d_sae - f0);
      gemm(sc, g, op, rows, f0, nf, P, p.T, st);
      kern::SegmentArgs a;
      a.P = P;
      a.ldp = p.T;
      a.rows = rows;
      a.f0 = f0;
      a.nf = nf;
      a.d_sae = D.d_sae;
      a.S = p.S;
      a.kt = p.kt;
      a.n_seg = p.n_seg;
      a.row_scale = sc.at<float>(o_rs);
      a.enc_scales = D.enc_dtype == SAEHOOK_I8 ? D.enc_scales : nullptr;
      a.b_enc = D.b_enc;
      a.threshold = D.activation == SAEHOOK_ACT_JUMPRELU ? D.threshold : nullptr;
      a.activation = int(D.activation);
      a.pool = pool;
      a.err = sc.err();
      kern::segment_select(a, st);
    }
    kern::FinalArgs f;
    f.pool = pool;
    f.rows = rows;
    f.M = p.M;
    f.k = k;
    f.stage = p.stage;
    f.sort_global = p.sort_global;
    f.sort_n = p.sort_n;
    f.sort_buf = p.sort_global ? sc.at<uint64_t>(o_sort) : nullptr;
    f.smem = p.final_smem;
    f.values = values;
    f.indices = indices;
    f.err = sc.err();
    kern::final_select(f, st);
  }
};

// Splits the items of a steer call into kernel-argument batches.
std::vector<ItemBatch> batches(const saehook_steer_item *items, int32_t n_items) {
  std::vector<ItemBatch> out;
  for (int32_t first = 0; first < n_items; first += kBatchItems) {
    ItemBatch b{};
    b.first = first;
    b.n = std::min(kBatchItems, n_items - first);
    for (int t = 0; t < b.n; ++t) {
      const saehook_steer_item &it = items[first + t];
      b.feature[t] = it.feature;
      b.op[t] = int32_t(it.op);
      b.value[t] = it.value;
      b.value2[t] = it.value2;
      // caps and rescales always use the unit direction (as the CPU path)
      b.normalize[t] = it.normalize != 0 || steer_uses_projection(int(it.op));
      b.has_projection |= steer_uses_projection(int(it.op)) ? 1 : 0;
    }
    out.push_back(b);
  }
  return out;
}

// Is p memory the kernels on `device` can read?
void check_device_pointer(const void *p, const char *name, int device) {
  if (!p) return;
  cudaPointerAttributes a;
  std::memset(&a, 0, sizeof a);
  const cudaError_t e = cudaPointerGetAttributes(&a, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail(SAEHOOK_ERR_INVALID_ARGUMENT, std::string(name) + " is not CUDA memory (" + cudaGetErrorString(e) + ")");
  }
  if (a.type == cudaMemoryTypeManaged) return;
  if (a.type != cudaMemoryTypeDevice)
    fail(SAEHOOK_ERR_INVALID_ARGUMENT,
         std::string(name) + " is not CUDA device memory (a CUDA handle takes device pointers)");
  if (a.device != device)
    fail(SAEHOOK_ERR_INVALID_ARGUMENT, std::string(name) + " is on CUDA device " + std::to_string(a.device) +
                                           ", not on the handle's device " + std::to_string(device));
}

void check_alignment(const void *p, size_t align, const char *name) {
  if (p && reinterpret_cast<uintptr_t>(p) % align != 0)
    fail(SAEHOOK_ERR_INVALID_ARGUMENT, std::string(name) + " is not aligned to its element size");
}

}  // namespace

void validate(const saehook_sae_desc &d) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    fail(SAEHOOK_ERR_UNSUPPORTED, std::string("no usable CUDA device") +
                                      (e != cudaSuccess ? std::string(": ") + cudaGetErrorString(e) : std::string()));
  }
  if (d.cuda_device < 0 || d.cuda_device >= count)
    fail(SAEHOOK_ERR_INVALID_ARGUMENT, "cuda_device " + std::to_string(d.cuda_device) + " is not one of the " +
                                           std::to_string(count) + " CUDA devices");
  if (d.d_model > INT32_MAX) fail(SAEHOOK_ERR_SHAPE, "d_model must fit in 32 bits for the CUDA kernels");
  DeviceGuard g(d.cuda_device);
  cudaFuncAttributes attr;
  const cudaError_t fe = cudaFuncGetAttributes(&attr, kern::probe_kernel());
  if (fe != cudaSuccess) {
    (void)cudaGetLastError();
    int major = 0, minor = 0;
    (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d.cuda_device);
    (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d.cuda_device);
    (void)cudaGetLastError();
    fail(SAEHOOK_ERR_UNSUPPORTED, "this saehook build cannot run on CUDA device " + std::to_string(d.cuda_device) +
                                      " (compute capability " + std::to_string(major) + "." + std::to_string(minor) +
                                      "): " + cudaGetErrorString(fe) +
                                      "; rebuild with -DSAEHOOK_CUDA_ARCHS=" + std::to_string(major) +
                                      std::to_string(minor));
  }
  const int dev = d.cuda_device;
  check_device_pointer(d.W_enc, "W_enc", dev);
  check_device_pointer(d.W_dec, "W_dec", dev);
  // Optional vectors only where the handle uses them (as the CPU path reads them).
  const float *scales = d.enc_dtype == SAEHOOK_I8 ? d.enc_scales : nullptr;
  const float *threshold = d.activation == SAEHOOK_ACT_JUMPRELU ? d.threshold : nullptr;
  check_device_pointer(scales, "enc_scales", dev);
  check_device_pointer(d.b_enc, "b_enc", dev);
  check_device_pointer(d.b_dec, "b_dec", dev);
  check_device_pointer(threshold, "threshold", dev);
  check_alignment(d.W_enc, dtype_size(d.enc_dtype), "W_enc");
  check_alignment(d.W_dec, dtype_size(d.dec_dtype), "W_dec");
  check_alignment(scales, 4, "enc_scales");
  check_alignment(d.b_enc, 4, "b_enc");
  check_alignment(d.b_dec, 4, "b_dec");
  check_alignment(threshold, 4, "threshold");
}

void encode(const Sae &s, const float *x, int64_t n, int64_t ldx, int32_t k, float *values, int32_t *indices,
            void *stream) {
  const saehook_sae_desc &D = s.d;
  if (k <= 0) k = D.k;
  if (k > D.d_sae) fail_k(k, D.d_sae);
  if (n == 0) return;
  DeviceGuard guard(D.cuda_device);
  const cudaStream_t st = as_stream(stream);
  Layout L;
  L.take(Scratch::header());
  const Encoder e(D, n, k, L, false, st);
  Scratch sc(L.size, st, D.cuda_device);
  kern::check_finite(x, n, D.d_model, ldx, sc.err(), st);
  for (int64_t r0 = 0; r0 < n; r0 += e.p.R) {
    const int64_t rows = std::min(e.p.R, n - r0);
    e.chunk(sc, x + r0 * ldx, ldx, rows, k, values + r0 * k, indices + r0 * k, st);
  }
  report_input(sc.finish("encode"), x, ldx, D.d_model);
}

void preacts(const Sae &s, const float *x, int64_t n, int64_t ldx, float *out, void *stream) {
  const saehook_sae_desc &D = s.d;
  if (n == 0) return;
  DeviceGuard guard(D.cuda_device);
  const cudaStream_t st = as_stream(stream);
  Layout L;
  L.take(Scratch::header());
  const Encoder e(D, n, D.k, L, true, st);
  Scratch sc(L.size, st, D.cuda_device);
  kern::check_finite(x, n, D.d_model, ldx, sc.err(), st);
  const int64_t m = D.d_sae;
  float *P = sc.at<float>(e.o_P);
  for (int64_t r0 = 0; r0 < n; r0 += e.p.R) {
    const int64_t rows = std::min(e.p.R, n - r0);
    kern::Operand op;
    const Gemm g = e.prepare(sc, x + r0 * ldx, ldx, rows, op, st);
    float *o = out + r0 * m;
    for (int64_t f0 = 0; f0 < m; f0 += e.p.T) {
      const int64_t nf = std::min(e.p.T, m - f0);
      e.gemm(sc, g, op, rows, f0, nf, P, e.p.T, st);
      kern::preacts_epilogue(P, e.p.T, o, rows, m, f0, nf, sc.at<float>(e.o_rs),
                             D.enc_dtype == SAEHOOK_I8 ? D.enc_scales : nullptr, D.b_enc, sc.err(), st);
    }
  }
  report_input(sc.finish("preacts"), x, ldx, D.d_model);
}

void decode(const Sae &s, const float *values, const int32_t *indices, int64_t n, int32_t k, float *out, int64_t ldo,
            void *stream) {
  const saehook_sae_desc &D = s.d;
  if (k <= 0) fail(SAEHOOK_ERR_SHAPE, "decode needs k >= 1 entries per row");
  if (n == 0) return;
  DeviceGuard guard(D.cuda_device);
  const cudaStream_t st = as_stream(stream);
  Scratch sc(Scratch::header(), st, D.cuda_device);
  kern::decode_check(values, indices, n * k, D.d_sae, sc.err(), st);
  kern::decode(D.dec_dtype, D.dec_layout, values, indices, n, k, D.W_dec, D.d_model, D.d_sae, D.b_dec, out, ldo,
               sc.err(), st);
  const ErrRec h = sc.finish("decode");
  if (h.idx_pos == kNoError) return;
  const int64_t e = int64_t(h.idx_pos);
  int32_t f = 0;
  float v = 0.f;
  if (cudaMemcpy(&f, indices + e, 4, cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(&v, values + e, 4, cudaMemcpyDeviceToHost) != cudaSuccess)
    (void)cudaGetLastError();
  if (f < -1 || f >= D.d_sae)
    fail(SAEHOOK_ERR_INDEX, "feature index " + std::to_string(f) + " at row " + std::to_string(e / k) +
                                " is out of range [0, " + std::to_string(D.d_sae) + ")");
  fail(SAEHOOK_ERR_NAN, "values contain NaN or Inf at row " + std::to_string(e / k));
}

void reconstruct(const Sae &s, float *h, int64_t n, int64_t ldh, void *stream) {
  const saehook_sae_desc &D = s.d;
  const int32_t k = D.k;
  if (n == 0) return;
  DeviceGuard guard(D.cuda_device);
  const cudaStream_t st = as_stream(stream);
  Layout L;
  L.take(Scratch::header());
  const Encoder e(D, n, k, L, false, st);
  const size_t o_v = L.take(size_t(e.p.R) * k * 4), o_i = L.take(size_t(e.p.R) * k * 4);
  Scratch sc(L.size, st, D.cuda_device);
  kern::check_finite(h, n, D.d_model, ldh, sc.err(), st);
  float *vals = sc.at<float>(o_v);
  int32_t *idx = sc.at<int32_t>(o_i);
  for (int64_t r0 = 0; r0 < n; r0 += e.p.R) {
    const int64_t rows = std::min(e.p.R, n - r0);
    float *rowp = h + r0 * ldh;
    e.chunk(sc, rowp, ldh, rows, k, vals, idx, st);
    kern::decode(D.dec_dtype, D.dec_layout, vals, idx, rows, k, D.W_dec, D.d_model, D.d_sae, D.b_dec, rowp, ldh,
                 sc.err(), st);
  }
  report_input(sc.finish("reconstruct"), h, ldh, D.d_model);
}

void steer(const Sae &s, float *h, int64_t n, int64_t ldh, const saehook_steer_item *items, int32_t n_items,
           const uint8_t *row_mask, int32_t k, float *values_out, int32_t *indices_out,
           const saehook_steer_state *state, void *stream) {
  const saehook_sae_desc &D = s.d;
  const int64_t d = D.d_model;
  // Item and state checks, and their messages, are steer_modes.cpp's.
  const steer::Plan plan = steer::check(items, n_items, D.d_sae);
  steer::check_state(state, n);
  const bool need_encode = plan.need_encode || values_out != nullptr || indices_out != nullptr;
  if (n == 0) return;
  if (values_out == nullptr) indices_out = nullptr;
  const int32_t kk = k > 0 ? k : D.k;
  if (need_encode && kk > D.d_sae) fail_k(kk, D.d_sae);
  // Conditions and latches are evaluated on the host (steer::evaluate, the CPU path's code) from
  // a copy of each chunk's encode: n * k * 8 bytes down and n * n_items bytes up per call, and a
  // stream synchronisation per chunk. Steering without conditions stays on the device.
  uint8_t *fired = state ? state->fired : nullptr;
  const bool host_conditions = plan.has_conditions || fired != nullptr;

  DeviceGuard guard(D.cuda_device);
  const cudaStream_t st = as_stream(stream);
  Layout L;
  L.take(Scratch::header());
  // The encoder's parts only when an encode runs (an add/cap/rescale-only steer needs none).
  std::optional<Encoder> enc;
  if (need_encode) enc.emplace(D, n, kk, L, false, st);
  const Encoder *e = enc ? &*enc : nullptr;
  const size_t o_dirs = L.take(size_t(n_items) * size_t(d) * 4);
  const int64_t R = e ? e->p.R : n;
  size_t o_v = 0, o_i = 0, o_act = 0;
  if (e && !values_out) {
    o_v = L.take(size_t(R) * kk * 4);
    o_i = L.take(size_t(R) * kk * 4);
  }
  if (host_conditions) o_act = L.take(size_t(R) * size_t(n_items));
  Scratch sc(L.size, st, D.cuda_device);
  kern::check_finite(h, n, d, ldh, sc.err(), st);
  const std::vector<ItemBatch> bs = batches(items, n_items);
  float *dirs = sc.at<float>(o_dirs);
  for (const ItemBatch &b : bs) kern::steer_directions(b, D.dec_dtype, D.dec_layout, D.W_dec, d, D.d_sae, dirs, sc.err(), st);
  std::vector<float> hv;
  std::vector<int32_t> hi;
  std::vector<uint8_t> hmask, hact(host_conditions ? size_t(n) * n_items : 0), latch_scratch;
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rows = std::min(R, n - r0);
    float *rowp = h + r0 * ldh;
    float *vals = nullptr;
    int32_t *idx = nullptr;
    if (e) {
      vals = values_out ? values_out + r0 * kk : sc.at<float>(o_v);
      idx = values_out ? indices_out + r0 * kk : sc.at<int32_t>(o_i);
      e->chunk(sc, rowp, ldh, rows, kk, vals, idx, st);
    }
    const uint8_t *act = nullptr;
    if (host_conditions) {
      if (e) {
        hv.resize(size_t(rows) * kk);
        hi.resize(size_t(rows) * kk);
        check(cudaMemcpyAsync(hv.data(), vals, hv.size() * 4, cudaMemcpyDeviceToHost, st), "steer");
        check(cudaMemcpyAsync(hi.data(), idx, hi.size() * 4, cudaMemcpyDeviceToHost, st), "steer");
      }
      if (row_mask) {
        hmask.resize(size_t(rows));
        check(cudaMemcpyAsync(hmask.data(), row_mask + r0, size_t(rows), cudaMemcpyDeviceToHost, st), "steer");
      }
      check(cudaStreamSynchronize(st), "steer");
      uint8_t *ha = hact.data() + size_t(r0) * n_items;
      steer::evaluate(items, n_items, e ? hv.data() : nullptr, e ? hi.data() : nullptr, r0, rows, kk,
                      row_mask ? hmask.data() : nullptr, state, latch_scratch, ha);
      uint8_t *da = sc.at<uint8_t>(o_act);
      check(cudaMemcpyAsync(da, ha, size_t(rows) * n_items, cudaMemcpyHostToDevice, st), "steer");
      act = da;
    }
    for (const ItemBatch &b : bs)
      kern::steer_apply(b, rowp, rows, ldh, d, row_mask ? row_mask + r0 : nullptr, act, n_items, vals, idx, kk,
                        dirs, sc.err(), st);
  }
  const ErrRec hr = sc.finish("steer");
  report_input(hr, h, ldh, d);
  if (hr.dir_item != kNoError)
    fail(SAEHOOK_ERR_INVALID_ARGUMENT, "feature " + std::to_string(items[hr.dir_item].feature) +
                                           " has a zero decoder direction; cannot normalize");
  if (fired) std::copy(hact.begin(), hact.end(), fired);
}

void steer_rows(const saehook_steer_item *items, int32_t n_items, float *h, int64_t n, int64_t ldh, int64_t d,
                const uint8_t *mask, const uint8_t *act, const float *vals, const int32_t *idx, int32_t kk,
                const float *dirs, const ErrRec *err, cudaStream_t st) {
  if (n <= 0 || n_items <= 0) return;
  for (const ItemBatch &b : batches(items, n_items))
    kern::steer_apply(b, h, n, ldh, d, mask, act, n_items, vals, idx, kk, dirs, err, st);
  check_launch("steer_rows");
}

void decoder_direction(const Sae &s, int32_t feature, bool normalize, float *out) {
  const saehook_sae_desc &D = s.d;
  if (feature < 0 || feature >= D.d_sae)
    fail(SAEHOOK_ERR_INDEX, "feature " + std::to_string(feature) + " is out of range [0, " + std::to_string(D.d_sae) +
                                ")");
  DeviceGuard guard(D.cuda_device);
  const size_t es = dtype_size(D.dec_dtype);
  const int64_t d = D.d_model;
  std::vector<uint8_t> raw(size_t(d) * es);
  const uint8_t *W = static_cast<const uint8_t *>(D.W_dec);
  if (D.dec_layout == SAEHOOK_DEC_ROWS)
    check(cudaMemcpy(raw.data(), W + size_t(feature) * d * es, raw.size(), cudaMemcpyDeviceToHost), "decoder_direction");
  else
    check(cudaMemcpy2D(raw.data(), es, W + size_t(feature) * es, size_t(D.d_sae) * es, es, size_t(d),
                       cudaMemcpyDeviceToHost),
          "decoder_direction");
  for (int64_t i = 0; i < d; ++i) {
    uint16_t u = 0;
    switch (D.dec_dtype) {
      case SAEHOOK_F32: std::memcpy(&out[i], &raw[size_t(i) * 4], 4); break;
      case SAEHOOK_F16: std::memcpy(&u, &raw[size_t(i) * 2], 2); out[i] = f16_to_f32(u); break;
      case SAEHOOK_BF16: std::memcpy(&u, &raw[size_t(i) * 2], 2); out[i] = bf16_to_f32(u); break;
      default: out[i] = 0.f; break;
    }
  }
  if (normalize) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(out[i]) * out[i];
    if (!(ss > 0))
      fail(SAEHOOK_ERR_INVALID_ARGUMENT,
           "feature " + std::to_string(feature) + " has a zero decoder direction; cannot normalize");
    const float inv = float(1.0 / std::sqrt(ss));
    for (int64_t i = 0; i < d; ++i) out[i] *= inv;
  }
}

}  // namespace saehook::cuda

// Not part of saehook.h: a line describing the CUDA path on a device (which GEMM runs), for
// benchmarks and bug reports (python: saehook.cuda.describe()).
extern "C" SAEHOOK_API const char *saehook_cuda_describe(int32_t device) {
  static thread_local std::string s;
  try {
    saehook::cuda::DeviceGuard g(device);
    s = saehook::cuda::describe(device);
  } catch (const saehook::Error &e) {
    s = e.message;
  } catch (...) {
    s = "unknown error";
  }
  return s.c_str();
}
