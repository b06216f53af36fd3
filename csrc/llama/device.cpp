// The device side of the llama.cpp hook (see device.hpp). Built into every libsaehook: with
// SAEHOOK_WITH_CUDA it runs on the CUDA runtime and saehook's kernels; without it, every call on a
// real device fails with SAEHOOK_ERR_UNSUPPORTED (hook.cpp never makes them then). The emulated
// device (kEmulated, for tests on machines without a GPU) works in every build: host memory stands
// for device memory and CPU loops for the kernels, so the tests run hook.cpp's device-path
// orchestration (what is copied where, gathers and scatters, the encodes' downloads, the uploaded
// masks and directions) against its host path.
#include "device.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../core/common.hpp"
#include "../core/steer_modes.hpp"

#ifdef SAEHOOK_WITH_CUDA
#include <cuda_runtime_api.h>

#include "../core/cuda_ops.hpp"
#include "../cuda/hook_ops.hpp"
#include "../cuda/runtime.cuh"
#endif

namespace saehook::llama_device {

namespace {

bool emu(int device) { return device == kEmulated || device == kEmulatedBroken; }

[[maybe_unused]] [[noreturn]] void no_cuda() {
  fail(SAEHOOK_ERR_UNSUPPORTED, "this saehook build has no CUDA kernels");
}

}  // namespace

int cuda_device_of_buffer_type(const char *name) {
  if (!name || std::strncmp(name, "CUDA", 4) != 0) return -1;
  const char *p = name + 4;
  if (!*p || std::strlen(p) > 6) return -1;
  for (const char *q = p; *q; ++q)
    if (!std::isdigit(static_cast<unsigned char>(*q))) return -1;
  return std::atoi(p);
}

bool built() {
#ifdef SAEHOOK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool on_device(const void *p, int device, std::string &why) {
#ifdef SAEHOOK_WITH_CUDA
  cudaPointerAttributes a;
  std::memset(&a, 0, sizeof a);
  const cudaError_t e = cudaPointerGetAttributes(&a, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    why = std::string("cudaPointerGetAttributes: ") + cudaGetErrorString(e);
    return false;
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {  // managed: GGML_CUDA_ENABLE_UNIFIED_MEMORY
    why = "the tensor's data is not CUDA device memory to saehook's CUDA runtime";
    return false;
  }
  if (a.type == cudaMemoryTypeDevice && a.device != device) {
    why = "the tensor's data is on CUDA device " + std::to_string(a.device) + ", its buffer type names device " +
          std::to_string(device);
    return false;
  }
  return true;
#else
  why = "this saehook build has no CUDA kernels";
  return false;
#endif
}

// ---------------------------------------------------------------- SAE copies

struct Sae {
  int device = -1;
  void *mem = nullptr;  // one device allocation holding every weight
  size_t size = 0;
  saehook_sae *handle = nullptr;
  bool borrowed = false;  // emulated: the host handle itself
};

void SaeDeleter::operator()(Sae *s) const {
  if (!s) return;
  if (!s->borrowed) saehook_sae_destroy(s->handle);
#ifdef SAEHOOK_WITH_CUDA
  if (s->mem) {
    int prev = -1;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(s->device);
    (void)cudaFree(s->mem);
    if (prev >= 0) (void)cudaSetDevice(prev);
    (void)cudaGetLastError();
  }
#endif
  delete s;
}

size_t bytes(const Sae &s) { return s.size; }

namespace {

// The parts of an SAE's weights a device copy holds, each 256-byte aligned in one allocation.
struct Part {
  const void *src;
  size_t bytes;
  const void **dst;
};
constexpr size_t aligned(size_t b) { return (b + 255) & ~size_t(255); }

std::vector<Part> parts_of(const saehook_sae_desc &d, saehook_sae_desc &g) {
  const size_t ne = size_t(d.d_model) * size_t(d.d_sae), fs = size_t(d.d_sae) * 4;
  return {
      {d.W_enc, ne * dtype_size(d.enc_dtype), &g.W_enc},
      {d.W_dec, ne * dtype_size(d.dec_dtype), &g.W_dec},
      {d.enc_scales, d.enc_dtype == SAEHOOK_I8 && d.enc_scales ? fs : 0, reinterpret_cast<const void **>(&g.enc_scales)},
      {d.b_enc, d.b_enc ? fs : 0, reinterpret_cast<const void **>(&g.b_enc)},
      {d.b_dec, d.b_dec ? size_t(d.d_model) * 4 : 0, reinterpret_cast<const void **>(&g.b_dec)},
      {d.threshold, d.activation == SAEHOOK_ACT_JUMPRELU && d.threshold ? fs : 0,
       reinterpret_cast<const void **>(&g.threshold)},
  };
}

}  // namespace

SaePtr upload(const saehook_sae *host, int device) {
  saehook_sae_desc d;
  if (saehook_sae_describe(host, &d) != SAEHOOK_OK) fail(SAEHOOK_ERR_INVALID_ARGUMENT, saehook_last_error());
  if (d.cuda) fail(SAEHOOK_ERR_INVALID_ARGUMENT, "the hook takes host SAE handles");
  saehook_sae_desc g = d;
  const std::vector<Part> parts = parts_of(d, g);
  size_t total = 0;
  for (const Part &p : parts) total += aligned(p.bytes);
  SaePtr s(new Sae());
  s->device = device;
  s->size = total;
  if (device == kEmulatedBroken)
    fail(SAEHOOK_ERR_UNSUPPORTED, "this saehook build cannot run on the emulated broken device (a stand-in for a GPU "
                                  "without kernels of this build)");
  if (emu(device)) {  // the host handle stands for the copy (its size counted as a copy's)
    s->handle = const_cast<saehook_sae *>(host);
    s->borrowed = true;
    return s;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::DeviceGuard guard(device);
  cuda::check(cudaMalloc(&s->mem, total), "allocating the SAE's device copy");
  uint8_t *cur = static_cast<uint8_t *>(s->mem);
  for (const Part &p : parts) {
    if (!p.bytes) {
      *p.dst = nullptr;
      continue;
    }
    cuda::check(cudaMemcpy(cur, p.src, p.bytes, cudaMemcpyHostToDevice), "copying the SAE to the device");
    *p.dst = cur;
    cur += aligned(p.bytes);
  }
  g.cuda = 1;
  g.cuda_device = device;
  g.copy_weights = 0;
  if (saehook_sae_create(&g, &s->handle) != SAEHOOK_OK) fail(SAEHOOK_ERR_INTERNAL, saehook_last_error());
  return s;
#else
  no_cuda();
#endif
}

// ---------------------------------------------------------------- buffers

namespace {
void release(void *p, int device) {
  if (!p) return;
  if (emu(device)) {
    std::free(p);
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  int prev = -1;
  (void)cudaGetDevice(&prev);
  (void)cudaSetDevice(device);
  (void)cudaDeviceSynchronize();  // kernels queued earlier may still read it
  (void)cudaFree(p);
  if (prev >= 0) (void)cudaSetDevice(prev);
  (void)cudaGetLastError();
#endif
}
}  // namespace

Buffer::~Buffer() { release(p_, device_); }

void *Buffer::ensure(size_t bytes, int device) {
  if (p_ && cap_ >= bytes && device_ == device) return p_;
  release(p_, device_);
  p_ = nullptr;
  cap_ = 0;
  const size_t want = std::max<size_t>(bytes + bytes / 2, 4096);  // room to grow without reallocating
  if (emu(device)) {
    p_ = std::malloc(want);
    if (!p_) fail(SAEHOOK_ERR_ALLOC, "out of memory for the hook's scratch");
  } else {
#ifdef SAEHOOK_WITH_CUDA
    cuda::DeviceGuard g(device);
    cuda::check(cudaMalloc(&p_, want), "allocating hook scratch memory");
#else
    no_cuda();
#endif
  }
  cap_ = want;
  device_ = device;
  return p_;
}

// ---------------------------------------------------------------- per-device context

struct Ctx {
  int device = -1;
  bool emulated = false;
  int64_t emu_nan = -1;  // emulated: the first non-finite element check_finite found
#ifdef SAEHOOK_WITH_CUDA
  cudaStream_t stream = nullptr;
  cuda::ErrRec *err = nullptr;  // device
#endif
  // Pinned staging for uploads: a bump region reset per callback; growing it waits for the stream
  // (the copies queued from the old region must have run).
  uint8_t *stage = nullptr;
  size_t stage_cap = 0, stage_used = 0;
  uint8_t *down = nullptr;  // pinned landing zone for downloads
  size_t down_cap = 0;
  Buffer slots[kSlots];
  std::map<int, Buffer> encodings;  // by the hook's encoding id
};

void CtxDeleter::operator()(Ctx *c) const {
  if (!c) return;
#ifdef SAEHOOK_WITH_CUDA
  if (!c->emulated) {
    int prev = -1;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(c->device);
    if (c->stream) (void)cudaStreamSynchronize(c->stream);
    if (c->err) (void)cudaFree(c->err);
    if (c->stage) (void)cudaFreeHost(c->stage);
    if (c->down) (void)cudaFreeHost(c->down);
    if (c->stream) (void)cudaStreamDestroy(c->stream);
    if (prev >= 0) (void)cudaSetDevice(prev);
    (void)cudaGetLastError();
  }
#endif
  delete c;
}

CtxPtr open(int device) {
  CtxPtr c(new Ctx());
  c->device = device;
  if (emu(device)) {
    c->emulated = true;
    return c;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::DeviceGuard g(device);
  // Non-blocking: never implicitly ordered with the legacy stream (llama.cpp's streams are
  // non-blocking too); the callback orders by waiting for it.
  cuda::check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "creating the hook's stream");
  cuda::check(cudaMalloc(reinterpret_cast<void **>(&c->err), sizeof(cuda::ErrRec)), "allocating the hook's error record");
  return c;
#else
  no_cuda();
#endif
}

int device_of(const Ctx &c) { return c.device; }

Scope::Scope(Ctx &c) : dev_(c.device) {
  c.stage_used = 0;
  c.emu_nan = -1;
  if (c.emulated) return;
#ifdef SAEHOOK_WITH_CUDA
  if (cudaGetDevice(&prev_) != cudaSuccess) {
    (void)cudaGetLastError();
    prev_ = -1;
  }
  if (prev_ != dev_) cuda::check(cudaSetDevice(dev_), "cudaSetDevice");
  const cudaError_t e = cudaMemsetAsync(c.err, 0xff, sizeof(cuda::ErrRec), c.stream);
  if (e != cudaSuccess) {
    if (prev_ >= 0 && prev_ != dev_) (void)cudaSetDevice(prev_);  // no destructor for a throwing constructor
    cuda::check(e, "clearing the hook's error record");
  }
#else
  no_cuda();
#endif
}

Scope::~Scope() {
#ifdef SAEHOOK_WITH_CUDA
  if (prev_ >= 0 && prev_ != dev_ && !emu(dev_)) (void)cudaSetDevice(prev_);
#endif
}

void *scratch(Ctx &c, Slot s, size_t bytes) { return c.slots[s].ensure(bytes, c.device); }

void *encoding_storage(Ctx &c, int id, size_t bytes) { return c.encodings[id].ensure(bytes, c.device); }

void upload(Ctx &c, void *dst, const void *src, size_t bytes) {
  if (!bytes) return;
  if (c.emulated) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  const size_t need = aligned(bytes);
  if (c.stage_used + need > c.stage_cap) {
    cuda::check(cudaStreamSynchronize(c.stream), "hook staging");
    if (c.stage) cuda::check(cudaFreeHost(c.stage), "hook staging");
    c.stage = nullptr;
    const size_t cap = std::max<size_t>(2 * (c.stage_cap + need), size_t(64) << 10);
    cuda::check(cudaMallocHost(reinterpret_cast<void **>(&c.stage), cap), "allocating pinned staging memory");
    c.stage_cap = cap;
    c.stage_used = 0;
  }
  uint8_t *p = c.stage + c.stage_used;
  c.stage_used += need;
  std::memcpy(p, src, bytes);
  cuda::check(cudaMemcpyAsync(dst, p, bytes, cudaMemcpyHostToDevice, c.stream), "hook upload");
#else
  no_cuda();
#endif
}

void download(Ctx &c, void *dst, const void *src, size_t bytes) {
  if (!bytes) return;
  if (c.emulated) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  if (bytes > c.down_cap) {
    cuda::check(cudaStreamSynchronize(c.stream), "hook download");
    if (c.down) cuda::check(cudaFreeHost(c.down), "hook download");
    c.down = nullptr;
    const size_t cap = std::max<size_t>(bytes + bytes / 2, size_t(64) << 10);
    cuda::check(cudaMallocHost(reinterpret_cast<void **>(&c.down), cap), "allocating pinned download memory");
    c.down_cap = cap;
  }
  cuda::check(cudaMemcpyAsync(c.down, src, bytes, cudaMemcpyDeviceToHost, c.stream), "hook download");
  cuda::check(cudaStreamSynchronize(c.stream), "hook download");
  std::memcpy(dst, c.down, bytes);
#else
  no_cuda();
#endif
}

void copy_device(Ctx &c, void *dst, const void *src, size_t bytes) {
  if (!bytes) return;
  if (c.emulated) {
    std::memmove(dst, src, bytes);
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c.stream), "hook device copy");
#else
  no_cuda();
#endif
}

void sync(Ctx &c) {
  if (c.emulated) return;
#ifdef SAEHOOK_WITH_CUDA
  cuda::check(cudaGetLastError(), "hook kernels");
  cuda::check(cudaStreamSynchronize(c.stream), "hook stream");
#endif
}

// ---------------------------------------------------------------- kernels

void copy_rows(Ctx &c, void *dst, int64_t ld_dst, const int32_t *dst_rows, const void *src, int64_t ld_src,
               const int32_t *src_rows, int64_t n, int64_t width) {
  if (c.emulated) {
    auto *o = static_cast<uint32_t *>(dst);
    const auto *s = static_cast<const uint32_t *>(src);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(o + (dst_rows ? dst_rows[i] : i) * ld_dst, s + (src_rows ? src_rows[i] : i) * ld_src,
                  size_t(width) * 4);
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::kern::copy_rows(dst, ld_dst, dst_rows, src, ld_src, src_rows, n, width, c.stream);
#else
  no_cuda();
#endif
}

void add_vector(Ctx &c, float *x, int64_t n, int64_t d, const float *v, float alpha) {
  if (c.emulated) {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < d; ++j) x[r * d + j] = std::fma(alpha, v[j], x[r * d + j]);
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::kern::add_vector(x, n, d, d, v, alpha, c.stream);
#else
  no_cuda();
#endif
}

void check_finite(Ctx &c, const float *x, int64_t n, int64_t d) {
  if (n <= 0) return;
  if (c.emulated) {
    for (int64_t i = 0; i < n * d && c.emu_nan < 0; ++i)
      if (!std::isfinite(x[i])) c.emu_nan = i;
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::kern::check_finite(x, n, d, d, c.err, c.stream);
#else
  no_cuda();
#endif
}

int64_t nonfinite_row(Ctx &c, int64_t d) {
  if (c.emulated) return c.emu_nan < 0 ? -1 : c.emu_nan / d;
#ifdef SAEHOOK_WITH_CUDA
  cuda::ErrRec h;
  download(c, &h, c.err, sizeof h);
  return h.nan_pos == cuda::kNoError ? -1 : int64_t(h.nan_pos / uint64_t(d));
#else
  no_cuda();
#endif
}

namespace {
saehook_exec exec_of([[maybe_unused]] Ctx &c) {
  saehook_exec ex{0, nullptr};
#ifdef SAEHOOK_WITH_CUDA
  if (!c.emulated) ex.cuda_stream = c.stream;
#endif
  return ex;
}
}  // namespace

void encode(Ctx &c, const Sae &s, const float *x, int64_t n, int32_t k, float *values, int32_t *indices) {
  const saehook_exec ex = exec_of(c);
  if (saehook_encode(s.handle, x, n, s.handle->d.d_model, k, values, indices, c.emulated ? nullptr : &ex) != SAEHOOK_OK)
    fail(SAEHOOK_ERR_INTERNAL, saehook_last_error());
}

void reconstruct(Ctx &c, const Sae &s, float *h, int64_t n) {
  const saehook_exec ex = exec_of(c);
  if (saehook_reconstruct(s.handle, h, n, s.handle->d.d_model, c.emulated ? nullptr : &ex) != SAEHOOK_OK)
    fail(SAEHOOK_ERR_INTERNAL, saehook_last_error());
}

void steer_rows(Ctx &c, const saehook_steer_item *items, int32_t n_items, float *h, int64_t n, int64_t d,
                const uint8_t *mask, const uint8_t *act, const float *vals, const int32_t *idx, int32_t k,
                const float *dirs) {
  if (c.emulated) {  // what the kernels do (csrc/cuda/sparse.cu apply_kernel), with the CPU's row op
    if (c.emu_nan >= 0) return;  // the kernels change nothing once the error record holds an error
    for (int64_t r = 0; r < n; ++r) {
      if (!act && mask && !mask[r]) continue;
      steer::apply_row(items, n_items, act ? act + r * n_items : nullptr, vals ? vals + r * k : nullptr,
                       idx ? idx + r * k : nullptr, vals ? k : 0, dirs, d, h + r * d);
    }
    return;
  }
#ifdef SAEHOOK_WITH_CUDA
  cuda::steer_rows(items, n_items, h, n, d, d, mask, act, vals, idx, k, dirs, c.err, c.stream);
#else
  no_cuda();
#endif
}

}  // namespace saehook::llama_device
