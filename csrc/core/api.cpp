// The C API: argument validation, error reporting and handle management around ops.cpp.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cmath>
#include <new>
#include <string>

#include "../cpu/kernels.hpp"
#include "common.hpp"
#include "ops.hpp"
#include "prefilter.hpp"
#include "steer_modes.hpp"
#include "threadpool.hpp"

#ifdef SAEHOOK_WITH_CUDA
#include "cuda_ops.hpp"
// Runs `call` (a saehook::cuda function) for a CUDA handle and leaves the enclosing lambda.
#define SAEHOOK_ON_CUDA(s, call) \
  if ((s).d.cuda) {              \
    call;                        \
    return;                      \
  }
#else
#define SAEHOOK_ON_CUDA(s, call) \
  if ((s).d.cuda) fail(SAEHOOK_ERR_UNSUPPORTED, "this saehook build has no CUDA kernels (build with -DSAEHOOK_CUDA=ON)");
#endif

namespace saehook {

namespace {
thread_local std::string tls_error;
std::atomic<int32_t> g_threads{0};

template <class F>
saehook_status guard(F &&f) {
  try {
    f();
    return SAEHOOK_OK;
  } catch (const Error &e) {
    tls_error = e.message;
    return e.status;
  } catch (const std::bad_alloc &) {
    tls_error = "out of memory";
    return SAEHOOK_ERR_ALLOC;
  } catch (const std::exception &e) {
    tls_error = e.what();
    return SAEHOOK_ERR_INTERNAL;
  } catch (...) {
    tls_error = "unknown internal error";
    return SAEHOOK_ERR_INTERNAL;
  }
}

void require(bool ok, saehook_status st, const std::string &msg) {
  if (!ok) fail(st, msg);
}

const Sae &sae_ref(const saehook_sae *s) {
  require(s != nullptr, SAEHOOK_ERR_INVALID_ARGUMENT, "SAE handle is NULL");
  return *s;
}

// a * b, failing with SAEHOOK_ERR_SHAPE when the product (as a count of `elem` bytes) does not fit
// in a pointer difference: every size and offset the kernels compute is at most this.
int64_t checked_mul(int64_t a, int64_t b, size_t elem, const std::string &what) {
  int64_t r, bytes;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r) || __builtin_mul_overflow(r, int64_t(elem), &bytes))
    fail(SAEHOOK_ERR_SHAPE, what + ": " + std::to_string(a) + " x " + std::to_string(b) + " x " +
                                std::to_string(elem) + " bytes overflows the address space");
  return r;
}

void check_rows(const void *p, int64_t n, int64_t stride, int64_t d, const char *what) {
  require(n >= 0, SAEHOOK_ERR_SHAPE, std::string(what) + ": negative row count");
  require(n == 0 || p != nullptr, SAEHOOK_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
  require(stride >= d, SAEHOOK_ERR_SHAPE,
          std::string(what) + ": row stride " + std::to_string(stride) + " is smaller than d_model " +
              std::to_string(d));
  if (n > 0) checked_mul(n, stride, 4, std::string(what) + " rows x row stride");
}

[[maybe_unused]] void *stream_of(const saehook_exec *exec) { return exec ? exec->cuda_stream : nullptr; }

bool valid_dtype(saehook_dtype d) { return d >= SAEHOOK_F32 && d <= SAEHOOK_I8; }

}  // namespace

void fail(saehook_status status, std::string message) { throw Error{status, std::move(message)}; }

const char *dtype_name(saehook_dtype d) {
  switch (d) {
    case SAEHOOK_F32: return "f32";
    case SAEHOOK_F16: return "f16";
    case SAEHOOK_BF16: return "bf16";
    case SAEHOOK_I8: return "int8";
  }
  return "unknown";
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400u));
      u = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);          // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);         // overflow -> Inf
  if (a < 0x38800000u) {                                          // subnormal or zero in f16
    if (a < 0x33000000u) return sign;                             // rounds to zero
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                               // 14..24
    uint32_t half = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t v = a - 0x38000000u;                                   // rebias exponent
  v += 0xfffu + ((v >> 13) & 1u);                                 // round to nearest even
  return uint16_t(sign | (v >> 13));
}

int resolve_threads(const saehook_exec *exec) {
  int32_t t = exec && exec->n_threads > 0 ? exec->n_threads : g_threads.load();
  return t > 0 ? std::min<int>(t, max_threads()) : hardware_threads();
}

}  // namespace saehook

using namespace saehook;

extern "C" {

int saehook_api_version(void) { return SAEHOOK_API_VERSION; }

const char *saehook_last_error(void) { return tls_error.c_str(); }

const char *saehook_status_string(saehook_status s) {
  switch (s) {
    case SAEHOOK_OK: return "ok";
    case SAEHOOK_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SAEHOOK_ERR_SHAPE: return "shape mismatch";
    case SAEHOOK_ERR_DTYPE: return "unsupported dtype";
    case SAEHOOK_ERR_INDEX: return "index out of range";
    case SAEHOOK_ERR_NAN: return "NaN or Inf in input";
    case SAEHOOK_ERR_ALLOC: return "out of memory";
    case SAEHOOK_ERR_UNSUPPORTED: return "unsupported";
    case SAEHOOK_ERR_INTERNAL: return "internal error";
    case SAEHOOK_ERR_OVERFLOW: return "result overflows float32";
  }
  return "unknown status";
}

void saehook_set_num_threads(int32_t n) { g_threads.store(n > 0 ? n : 0); }
int32_t saehook_get_num_threads(void) { return resolve_threads(nullptr); }

saehook_status saehook_set_isa(const char *name) {
  return guard([&] {
    require(cpu::select(name), SAEHOOK_ERR_UNSUPPORTED,
            std::string("instruction-set path '") + (name ? name : "(null)") +
                "' is not available here; available: " + cpu::available());
  });
}
const char *saehook_get_isa(void) { return cpu::active().name; }
const char *saehook_available_isas(void) { return cpu::available(); }
const char *saehook_cpu_info(void) { return cpu::cpu_info_json(); }
saehook_status saehook_set_cpu_class(const char *spec) {
  return guard([&] {
    const std::string err = cpu::set_tuning(spec);
    require(err.empty(), SAEHOOK_ERR_INVALID_ARGUMENT, err);
  });
}

int saehook_cuda_available(void) {
#ifdef SAEHOOK_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

saehook_status saehook_sae_create(const saehook_sae_desc *desc, saehook_sae **out) {
  return guard([&] {
    require(desc && out, SAEHOOK_ERR_INVALID_ARGUMENT, "desc and out must not be NULL");
    *out = nullptr;
    const saehook_sae_desc &d = *desc;
    require(d.d_model > 0 && d.d_sae > 0, SAEHOOK_ERR_SHAPE, "d_model and d_sae must be positive");
    require(d.d_sae <= INT32_MAX, SAEHOOK_ERR_SHAPE, "d_sae must fit in int32 feature indices");
    require(d.k >= 1 && d.k <= d.d_sae, SAEHOOK_ERR_SHAPE,
            "k = " + std::to_string(d.k) + " must be in [1, d_sae = " + std::to_string(d.d_sae) + "]");
    require(d.activation >= SAEHOOK_ACT_TOPK && d.activation <= SAEHOOK_ACT_JUMPRELU,
            SAEHOOK_ERR_INVALID_ARGUMENT, "unknown activation");
    require(d.W_enc && d.W_dec, SAEHOOK_ERR_INVALID_ARGUMENT, "W_enc and W_dec are required");
    require(valid_dtype(d.enc_dtype), SAEHOOK_ERR_DTYPE, "unknown encoder dtype");
    require(valid_dtype(d.dec_dtype) && d.dec_dtype != SAEHOOK_I8, SAEHOOK_ERR_DTYPE,
            std::string("decoder dtype must be f32, f16 or bf16, not ") + dtype_name(d.dec_dtype));
    require(d.enc_dtype != SAEHOOK_I8 || d.enc_scales, SAEHOOK_ERR_INVALID_ARGUMENT,
            "an int8 encoder needs per-feature enc_scales");
    require(d.dec_layout == SAEHOOK_DEC_ROWS || d.dec_layout == SAEHOOK_DEC_COLS,
            SAEHOOK_ERR_INVALID_ARGUMENT, "unknown decoder layout");
    require(d.activation != SAEHOOK_ACT_JUMPRELU || d.threshold, SAEHOOK_ERR_INVALID_ARGUMENT,
            "a jumprelu SAE needs a threshold");
    require(!d.subtract_b_dec || d.b_dec, SAEHOOK_ERR_INVALID_ARGUMENT,
            "subtract_b_dec is set but b_dec is NULL");
    // Sizes of the weight matrices: every offset into them is smaller.
    const int64_t ne = checked_mul(d.d_model, d.d_sae, std::max(dtype_size(d.enc_dtype), dtype_size(d.dec_dtype)),
                                   "d_model x d_sae");

    if (d.cuda) {
#ifdef SAEHOOK_WITH_CUDA
      require(!d.copy_weights, SAEHOOK_ERR_UNSUPPORTED, "copy_weights is not supported for CUDA handles");
      cuda::validate(d);
#else
      fail(SAEHOOK_ERR_UNSUPPORTED, "this saehook build has no CUDA kernels (build with -DSAEHOOK_CUDA=ON)");
#endif
    }
    auto *s = new saehook_sae();
    s->d = d;
    if (d.copy_weights) {
      struct Part {
        const void *src;
        size_t bytes;
        const void **dst;
      };
      Part parts[] = {
          {d.W_enc, size_t(ne) * dtype_size(d.enc_dtype), &s->d.W_enc},
          {d.W_dec, size_t(ne) * dtype_size(d.dec_dtype), &s->d.W_dec},
          {d.enc_scales, d.enc_dtype == SAEHOOK_I8 ? size_t(d.d_sae) * 4 : 0,
           reinterpret_cast<const void **>(&s->d.enc_scales)},
          {d.b_enc, d.b_enc ? size_t(d.d_sae) * 4 : 0, reinterpret_cast<const void **>(&s->d.b_enc)},
          {d.b_dec, d.b_dec ? size_t(d.d_model) * 4 : 0, reinterpret_cast<const void **>(&s->d.b_dec)},
          {d.threshold, d.threshold ? size_t(d.d_sae) * 4 : 0,
           reinterpret_cast<const void **>(&s->d.threshold)},
      };
      auto aligned = [](size_t b) { return (b + 63) & ~size_t(63); };
      size_t total = 64;
      bool too_big = false;
      for (const Part &p : parts) too_big |= __builtin_add_overflow(total, aligned(p.bytes), &total);
      try {
        if (too_big || total > size_t(PTRDIFF_MAX)) throw std::bad_alloc();
        s->owned.resize(total);
      } catch (const std::exception &) {  // bad_alloc, or length_error past vector's max_size
        delete s;
        fail(SAEHOOK_ERR_ALLOC, "copy_weights: cannot allocate " + std::to_string(total) + " bytes for the weights");
      }
      uint8_t *base = s->owned.data();
      uint8_t *cur = base + ((64 - reinterpret_cast<uintptr_t>(base) % 64) % 64);
      for (const Part &p : parts) {
        if (!p.bytes) continue;
        std::memcpy(cur, p.src, p.bytes);
        *p.dst = cur;
        cur += aligned(p.bytes);
      }
      s->d.copy_weights = 1;
    }
    *out = s;
  });
}

void saehook_sae_destroy(saehook_sae *sae) { delete sae; }

saehook_status saehook_sae_describe(const saehook_sae *sae, saehook_sae_desc *out) {
  return guard([&] {
    require(out != nullptr, SAEHOOK_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = sae_ref(sae).d;
  });
}

saehook_status saehook_sae_set_prefilter(saehook_sae *sae, saehook_dtype dtype, const saehook_exec *exec) {
  return guard([&] {
    Sae &s = const_cast<Sae &>(sae_ref(sae));
    require(!s.d.cuda, SAEHOOK_ERR_UNSUPPORTED, "the prefilter is for CPU handles (a CUDA handle encodes on the GPU)");
    if (dtype == SAEHOOK_F32) {
      std::atomic_store(&s.prefilter, std::shared_ptr<Prefilter>());
      return;
    }
    require(dtype == SAEHOOK_BF16, SAEHOOK_ERR_DTYPE,
            std::string("the prefilter's dtype must be bf16 (or f32 to drop it), not ") + dtype_name(dtype));
    require(s.d.enc_dtype == SAEHOOK_F32, SAEHOOK_ERR_DTYPE,
            std::string("the prefilter makes float32 encodes exact from a bf16 copy; this encoder is ") +
                dtype_name(s.d.enc_dtype) + " already");
    std::atomic_store(&s.prefilter, std::shared_ptr<Prefilter>());  // the old copy's memory first
    std::atomic_store(&s.prefilter, build_prefilter(s, resolve_threads(exec)));
  });
}

saehook_status saehook_sae_prefilter_stats(const saehook_sae *sae, int64_t out[4]) {
  return guard([&] {
    require(out != nullptr, SAEHOOK_ERR_INVALID_ARGUMENT, "out is NULL");
    const Sae &s = sae_ref(sae);
    const std::shared_ptr<Prefilter> keep = std::atomic_load(&s.prefilter);
    const Prefilter *p = keep.get();
    out[0] = p ? int64_t(p->bytes) : 0;
    out[1] = p ? p->rows.load() : 0;
    out[2] = p ? p->recomputed.load() : 0;
    out[3] = p ? p->fallbacks.load() : 0;
  });
}

saehook_status saehook_encode(const saehook_sae *sae, const float *x, int64_t n, int64_t x_stride,
                              int32_t k, float *values, int32_t *indices,
                              const saehook_exec *exec) {
  return guard([&] {
    const Sae &s = sae_ref(sae);
    check_rows(x, n, x_stride, s.d.d_model, "x");
    require(n == 0 || (values && indices), SAEHOOK_ERR_INVALID_ARGUMENT, "outputs are NULL");
    checked_mul(n, k > 0 ? k : s.d.k, 8, "encode outputs: rows x k");
    SAEHOOK_ON_CUDA(s, cuda::encode(s, x, n, x_stride, k, values, indices, stream_of(exec)));
    encode(s, x, n, x_stride, k, values, indices, resolve_threads(exec));
  });
}

saehook_status saehook_preacts(const saehook_sae *sae, const float *x, int64_t n, int64_t x_stride,
                               float *out, const saehook_exec *exec) {
  return guard([&] {
    const Sae &s = sae_ref(sae);
    check_rows(x, n, x_stride, s.d.d_model, "x");
    require(n == 0 || out, SAEHOOK_ERR_INVALID_ARGUMENT, "out is NULL");
    checked_mul(n, s.d.d_sae, 4, "preacts output: rows x d_sae");
    SAEHOOK_ON_CUDA(s, cuda::preacts(s, x, n, x_stride, out, stream_of(exec)));
    preacts(s, x, n, x_stride, out, resolve_threads(exec));
  });
}

saehook_status saehook_decode(const saehook_sae *sae, const float *values, const int32_t *indices,
                              int64_t n, int32_t k, float *out, int64_t out_stride,
                              const saehook_exec *exec) {
  return guard([&] {
    const Sae &s = sae_ref(sae);
    check_rows(out, n, out_stride, s.d.d_model, "out");
    require(n == 0 || (values && indices), SAEHOOK_ERR_INVALID_ARGUMENT, "inputs are NULL");
    checked_mul(n, k, 8, "decode inputs: rows x k");
    SAEHOOK_ON_CUDA(s, cuda::decode(s, values, indices, n, k, out, out_stride, stream_of(exec)));
    decode(s, values, indices, n, k, out, out_stride, resolve_threads(exec));
  });
}

saehook_status saehook_reconstruct(const saehook_sae *sae, float *h, int64_t n, int64_t h_stride,
                                   const saehook_exec *exec) {
  return guard([&] {
    const Sae &s = sae_ref(sae);
    check_rows(h, n, h_stride, s.d.d_model, "h");
    checked_mul(n, s.d.k, 8, "reconstruct: rows x k");
    SAEHOOK_ON_CUDA(s, cuda::reconstruct(s, h, n, h_stride, stream_of(exec)));
    reconstruct(s, h, n, h_stride, resolve_threads(exec));
  });
}

saehook_status saehook_steer(const saehook_sae *sae, float *h, int64_t n, int64_t h_stride,
                             const saehook_steer_item *items, int32_t n_items,
                             const uint8_t *row_mask, int32_t k, float *values_out,
                             int32_t *indices_out, const saehook_exec *exec) {
  return saehook_steer_ex(sae, h, n, h_stride, items, n_items, row_mask, k, values_out, indices_out,
                          nullptr, exec);
}

saehook_status saehook_steer_ex(const saehook_sae *sae, float *h, int64_t n, int64_t h_stride,
                                const saehook_steer_item *items, int32_t n_items,
                                const uint8_t *row_mask, int32_t k, float *values_out,
                                int32_t *indices_out, const saehook_steer_state *state,
                                const saehook_exec *exec) {
  return guard([&] {
    const Sae &s = sae_ref(sae);
    check_rows(h, n, h_stride, s.d.d_model, "h");
    require((values_out == nullptr) == (indices_out == nullptr), SAEHOOK_ERR_INVALID_ARGUMENT,
            "values_out and indices_out must both be given or both be NULL");
    checked_mul(n, k > 0 ? k : s.d.k, 8, "steer: rows x k");
    checked_mul(std::max(n_items, 0), s.d.d_model, 4, "steer: items x d_model");
    SAEHOOK_ON_CUDA(s, cuda::steer(s, h, n, h_stride, items, n_items, row_mask, k, values_out,
                                   indices_out, state, stream_of(exec)));
    steer::run(s, h, n, h_stride, items, n_items, row_mask, k, values_out, indices_out, state,
               resolve_threads(exec));
  });
}

saehook_status saehook_decoder_direction(const saehook_sae *sae, int32_t feature, int32_t normalize,
                                         float *out) {
  return guard([&] {
    require(out != nullptr, SAEHOOK_ERR_INVALID_ARGUMENT, "out is NULL");
    const Sae &s = sae_ref(sae);
    SAEHOOK_ON_CUDA(s, cuda::decoder_direction(s, feature, normalize != 0, out));
    decoder_direction(s, feature, normalize != 0, out);
  });
}

saehook_status saehook_quantize_int8(const void *src, saehook_dtype src_dtype, int64_t rows,
                                     int64_t cols, int8_t *q, float *scales,
                                     const saehook_exec *exec) {
  return guard([&] {
    require(src && q && scales, SAEHOOK_ERR_INVALID_ARGUMENT, "NULL pointer");
    require(rows >= 0 && cols > 0, SAEHOOK_ERR_SHAPE, "bad shape");
    require(src_dtype != SAEHOOK_I8 && valid_dtype(src_dtype), SAEHOOK_ERR_DTYPE,
            "quantize_int8 takes f32, f16 or bf16");
    const size_t es = dtype_size(src_dtype);
    checked_mul(rows, cols, es, "quantize_int8: rows x cols");
    const cpu::Kernels &K = cpu::active();
    parallel_for(rows, resolve_threads(exec), [&](int64_t r, int) {
      std::vector<float> row(static_cast<size_t>(cols));
      K.to_f32(static_cast<const uint8_t *>(src) + size_t(r) * cols * es, src_dtype, cols, row.data());
      float amax = 0.f;
      for (float v : row) {
        if (!std::isfinite(v))
          fail(SAEHOOK_ERR_NAN, "weights contain NaN or Inf in row " + std::to_string(r));
        amax = std::max(amax, std::fabs(v));
      }
      const float scale = amax / 127.f;
      scales[r] = scale;
      const float inv = scale > 0 ? 1.f / scale : 0.f;
      int8_t *qr = q + size_t(r) * cols;
      for (int64_t i = 0; i < cols; ++i)
        qr[i] = int8_t(std::clamp(std::nearbyint(row[i] * inv), -127.f, 127.f));
    });
  });
}

saehook_status saehook_convert(const void *src, saehook_dtype src_dtype, void *dst,
                               saehook_dtype dst_dtype, int64_t n, const saehook_exec *exec) {
  return guard([&] {
    require(n == 0 || (src && dst), SAEHOOK_ERR_INVALID_ARGUMENT, "NULL pointer");
    auto ok = [](saehook_dtype d) { return d == SAEHOOK_F32 || d == SAEHOOK_F16 || d == SAEHOOK_BF16; };
    require(ok(src_dtype) && ok(dst_dtype), SAEHOOK_ERR_DTYPE, "convert takes f32, f16 and bf16");
    const cpu::Kernels &K = cpu::active();
    constexpr int64_t kChunk = 1 << 16;
    const size_t si = dtype_size(src_dtype), so = dtype_size(dst_dtype);
    require(n >= 0, SAEHOOK_ERR_SHAPE, "convert: negative element count");
    checked_mul(n, 1, std::max(si, so), "convert: elements");
    parallel_for((n + kChunk - 1) / kChunk, resolve_threads(exec), [&](int64_t c, int) {
      const int64_t i0 = c * kChunk, len = std::min(kChunk, n - i0);
      std::vector<float> buf(static_cast<size_t>(len));
      K.to_f32(static_cast<const uint8_t *>(src) + i0 * si, src_dtype, len, buf.data());
      uint8_t *o = static_cast<uint8_t *>(dst) + i0 * so;
      if (dst_dtype == SAEHOOK_F32) {
        std::memcpy(o, buf.data(), size_t(len) * 4);
      } else {
        uint16_t *h = reinterpret_cast<uint16_t *>(o);
        for (int64_t i = 0; i < len; ++i)
          h[i] = dst_dtype == SAEHOOK_BF16 ? f32_to_bf16(buf[i]) : f32_to_f16(buf[i]);
      }
    });
  });
}

float saehook_read_probe(const void *p, size_t bytes, const saehook_exec *exec) {
  // Baseline vectors (16 bytes), and each block read as four interleaved streams (a quarter of
  // the block each), which the hardware prefetchers serve faster than one stream: at two loads
  // per cycle the loop outruns memory, so the result measures memory.
  typedef float v4 __attribute__((vector_size(16)));
  constexpr size_t kBlock = size_t(2) << 20;
  const float *f = static_cast<const float *>(p);
  const size_t n = p ? bytes / 4 : 0, per_block = kBlock / 4;
  const int64_t n_blocks = int64_t((n + per_block - 1) / per_block);
  const int T = std::max(1, resolve_threads(exec));
  std::vector<float> part(size_t(T), 0.f);
  parallel_for(n_blocks, T, [&](int64_t b, int w) {
    const size_t i0 = size_t(b) * per_block, i1 = std::min(n, i0 + per_block);
    const size_t quarter = (i1 - i0) / 4 / 4 * 4;  // floats per stream, a multiple of 4
    v4 a[4] = {};
    for (size_t i = 0; i < quarter; i += 4)
      for (int q = 0; q < 4; ++q) {
        v4 x;
        std::memcpy(&x, f + i0 + size_t(q) * quarter + i, 16);
        a[q] += x;
      }
    float s = 0.f;
    for (size_t i = i0 + 4 * quarter; i < i1; ++i) s += f[i];
    const v4 t = (a[0] + a[1]) + (a[2] + a[3]);
    part[size_t(w)] += s + t[0] + t[1] + t[2] + t[3];
  });
  float total = 0.f;
  for (float v : part) total += v;
  return total;
}

}  // extern "C"
