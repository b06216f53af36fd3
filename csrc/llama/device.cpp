// The device side of the llama.cpp hook (see device.hpp). Built into every libsaehook: with
// SAEHOOK_WITH_CUDA it runs on the CUDA runtime and saehook's kernels, without it every call but
// the buffer-name parsing fails with SAEHOOK_ERR_UNSUPPORTED (hook.cpp never makes them then).
#include "device.hpp"

#include <algorithm>
#include <cctype>
#include <map>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../core/common.hpp"

#ifdef SAEHOOK_WITH_CUDA
#include <cuda_runtime_api.h>

#include "../core/cuda_ops.hpp"
#include "../cuda/hook_ops.hpp"
#include "../cuda/runtime.cuh"
#endif

namespace saehook::llama_device {

int cuda_device_of_buffer_type(const char *name) {
  if (!name || std::strncmp(name, "CUDA", 4) != 0) return -1;
  const char *p = name + 4;
  if (!*p) return -1;
  for (const char *q = p; *q; ++q)
    if (!std::isdigit(static_cast<unsigned char>(*q))) return -1;
  if (std::strlen(p) > 6) return -1;
  return std::atoi(p);
}

#ifndef SAEHOOK_WITH_CUDA

namespace {
[[noreturn]] void no_cuda() { fail(SAEHOOK_ERR_UNSUPPORTED, "this saehook build has no CUDA kernels"); }
}  // namespace

bool built() { return false; }
bool on_device(const void *, int, std::string &why) {
  why = "this saehook build has no CUDA kernels";
  return false;
}
struct Sae {};
void SaeDeleter::operator()(Sae *s) const { delete s; }
SaePtr upload(const saehook_sae *, int) { no_cuda(); }
size_t bytes(const Sae &) { return 0; }
Buffer::~Buffer() = default;
void *Buffer::ensure(size_t, int) { no_cuda(); }
struct Ctx {};
void CtxDeleter::operator()(Ctx *c) const { delete c; }
CtxPtr open(int) { no_cuda(); }
int device_of(const Ctx &) { return -1; }
Scope::Scope(Ctx &) { no_cuda(); }
Scope::~Scope() = default;
void *scratch(Ctx &, Slot, size_t) { no_cuda(); }
void *encoding_storage(Ctx &, int, size_t) { no_cuda(); }
void upload(Ctx &, void *, const void *, size_t) { no_cuda(); }
void download(Ctx &, void *, const void *, size_t) { no_cuda(); }
void copy_device(Ctx &, void *, const void *, size_t) { no_cuda(); }
void sync(Ctx &) { no_cuda(); }
void copy_rows(Ctx &, void *, int64_t, const int32_t *, const void *, int64_t, const int32_t *, int64_t, int64_t) {
  no_cuda();
}
void add_vector(Ctx &, float *, int64_t, int64_t, const float *, float) { no_cuda(); }
void check_finite(Ctx &, const float *, int64_t, int64_t) { no_cuda(); }
int64_t nonfinite_row(Ctx &, int64_t) { no_cuda(); }
void encode(Ctx &, const Sae &, const float *, int64_t, int32_t, float *, int32_t *) { no_cuda(); }
void reconstruct(Ctx &, const Sae &, float *, int64_t) { no_cuda(); }
void steer_rows(Ctx &, const saehook_steer_item *, int32_t, float *, int64_t, int64_t, const uint8_t *,
                const uint8_t *, const float *, const int32_t *, int32_t, const float *) {
  no_cuda();
}

#else  // SAEHOOK_WITH_CUDA

using cuda::check;
using cuda::ErrRec;
using cuda::kNoError;

bool built() { return true; }

bool on_device(const void *p, int device, std::string &why) {
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
}

struct Sae {
  int device = -1;
  void *mem = nullptr;  // one allocation holding every weight
  size_t size = 0;
  saehook_sae *handle = nullptr;
};

void SaeDeleter::operator()(Sae *s) const {
  if (!s) return;
  saehook_sae_destroy(s->handle);
  if (s->mem) {
    int prev = -1;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(s->device);
    (void)cudaFree(s->mem);
    if (prev >= 0) (void)cudaSetDevice(prev);
    (void)cudaGetLastError();
  }
  delete s;
}

size_t bytes(const Sae &s) { return s.size; }

SaePtr upload(const saehook_sae *host, int device) {
  saehook_sae_desc d;
  if (saehook_sae_describe(host, &d) != SAEHOOK_OK) fail(SAEHOOK_ERR_INVALID_ARGUMENT, saehook_last_error());
  if (d.cuda) fail(SAEHOOK_ERR_INVALID_ARGUMENT, "the hook takes host SAE handles");
  const size_t ne = size_t(d.d_model) * size_t(d.d_sae), fs = size_t(d.d_sae) * 4;
  struct Part {
    const void *src;
    size_t bytes;
    const void **dst;
  };
  saehook_sae_desc g = d;
  Part parts[] = {
      {d.W_enc, ne * dtype_size(d.enc_dtype), &g.W_enc},
      {d.W_dec, ne * dtype_size(d.dec_dtype), &g.W_dec},
      {d.enc_scales, d.enc_dtype == SAEHOOK_I8 && d.enc_scales ? fs : 0, reinterpret_cast<const void **>(&g.enc_scales)},
      {d.b_enc, d.b_enc ? fs : 0, reinterpret_cast<const void **>(&g.b_enc)},
      {d.b_dec, d.b_dec ? size_t(d.d_model) * 4 : 0, reinterpret_cast<const void **>(&g.b_dec)},
      {d.threshold, d.activation == SAEHOOK_ACT_JUMPRELU && d.threshold ? fs : 0,
       reinterpret_cast<const void **>(&g.threshold)},
  };
  auto aligned = [](size_t b) { return (b + 255) & ~size_t(255); };
  size_t total = 0;
  for (const Part &p : parts) total += aligned(p.bytes);
  SaePtr s(new Sae());
  s->device = device;
  s->size = total;
  cuda::DeviceGuard guard(device);
  check(cudaMalloc(&s->mem, total), "allocating the SAE's device copy");
  uint8_t *cur = static_cast<uint8_t *>(s->mem);
  for (const Part &p : parts) {
    if (!p.bytes) {
      if (p.dst != &g.W_enc && p.dst != &g.W_dec) *p.dst = nullptr;
      continue;
    }
    check(cudaMemcpy(cur, p.src, p.bytes, cudaMemcpyHostToDevice), "copying the SAE to the device");
    *p.dst = cur;
    cur += aligned(p.bytes);
  }
  g.cuda = 1;
  g.cuda_device = device;
  g.copy_weights = 0;
  if (saehook_sae_create(&g, &s->handle) != SAEHOOK_OK) fail(SAEHOOK_ERR_INTERNAL, saehook_last_error());
  return s;
}

Buffer::~Buffer() {
  if (!p_) return;
  int prev = -1;
  (void)cudaGetDevice(&prev);
  (void)cudaSetDevice(device_);
  (void)cudaFree(p_);
  if (prev >= 0) (void)cudaSetDevice(prev);
  (void)cudaGetLastError();
}

void *Buffer::ensure(size_t bytes, int device) {
  if (p_ && cap_ >= bytes && device_ == device) return p_;
  if (p_) {
    cuda::DeviceGuard g(device_);
    check(cudaDeviceSynchronize(), "growing a hook buffer");  // kernels queued earlier may still read it
    check(cudaFree(p_), "growing a hook buffer");
    p_ = nullptr;
    cap_ = 0;
  }
  const size_t want = std::max<size_t>(bytes + bytes / 2, 4096);  // room to grow without reallocating
  cuda::DeviceGuard g(device);
  check(cudaMalloc(&p_, want), "allocating hook scratch memory");
  cap_ = want;
  device_ = device;
  return p_;
}

struct Ctx {
  int device = -1;
  cudaStream_t stream = nullptr;
  ErrRec *err = nullptr;  // device
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
  {
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
  delete c;
}

CtxPtr open(int device) {
  CtxPtr c(new Ctx());
  c->device = device;
  cuda::DeviceGuard g(device);
  // Non-blocking: never implicitly ordered with the legacy stream (llama.cpp's streams are
  // non-blocking too); the callback orders by waiting for it.
  check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "creating the hook's stream");
  check(cudaMalloc(reinterpret_cast<void **>(&c->err), sizeof(ErrRec)), "allocating the hook's error record");
  return c;
}

int device_of(const Ctx &c) { return c.device; }

Scope::Scope(Ctx &c) : dev_(c.device) {
  if (cudaGetDevice(&prev_) != cudaSuccess) {
    (void)cudaGetLastError();
    prev_ = -1;
  }
  if (prev_ != dev_) check(cudaSetDevice(dev_), "cudaSetDevice");
  c.stage_used = 0;
  const cudaError_t e = cudaMemsetAsync(c.err, 0xff, sizeof(ErrRec), c.stream);
  if (e != cudaSuccess) {
    if (prev_ >= 0 && prev_ != dev_) (void)cudaSetDevice(prev_);  // no destructor for a throwing constructor
    check(e, "clearing the hook's error record");
  }
}

Scope::~Scope() {
  if (prev_ >= 0 && prev_ != dev_) (void)cudaSetDevice(prev_);
}

void *scratch(Ctx &c, Slot s, size_t bytes) { return c.slots[s].ensure(bytes, c.device); }

void *encoding_storage(Ctx &c, int id, size_t bytes) { return c.encodings[id].ensure(bytes, c.device); }

void upload(Ctx &c, void *dst, const void *src, size_t bytes) {
  if (!bytes) return;
  const size_t need = (bytes + 255) & ~size_t(255);
  if (c.stage_used + need > c.stage_cap) {
    check(cudaStreamSynchronize(c.stream), "hook staging");
    if (c.stage) check(cudaFreeHost(c.stage), "hook staging");
    c.stage = nullptr;
    const size_t cap = std::max<size_t>(2 * (c.stage_cap + need), size_t(64) << 10);
    check(cudaMallocHost(reinterpret_cast<void **>(&c.stage), cap), "allocating pinned staging memory");
    c.stage_cap = cap;
    c.stage_used = 0;
  }
  uint8_t *p = c.stage + c.stage_used;
  c.stage_used += need;
  std::memcpy(p, src, bytes);
  check(cudaMemcpyAsync(dst, p, bytes, cudaMemcpyHostToDevice, c.stream), "hook upload");
}

void download(Ctx &c, void *dst, const void *src, size_t bytes) {
  if (!bytes) return;
  if (bytes > c.down_cap) {
    check(cudaStreamSynchronize(c.stream), "hook download");
    if (c.down) check(cudaFreeHost(c.down), "hook download");
    c.down = nullptr;
    const size_t cap = std::max<size_t>(bytes + bytes / 2, size_t(64) << 10);
    check(cudaMallocHost(reinterpret_cast<void **>(&c.down), cap), "allocating pinned download memory");
    c.down_cap = cap;
  }
  check(cudaMemcpyAsync(c.down, src, bytes, cudaMemcpyDeviceToHost, c.stream), "hook download");
  check(cudaStreamSynchronize(c.stream), "hook download");
  std::memcpy(dst, c.down, bytes);
}

void copy_device(Ctx &c, void *dst, const void *src, size_t bytes) {
  if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c.stream), "hook device copy");
}

void sync(Ctx &c) {
  check(cudaGetLastError(), "hook kernels");
  check(cudaStreamSynchronize(c.stream), "hook stream");
}

void copy_rows(Ctx &c, void *dst, int64_t ld_dst, const int32_t *dst_rows, const void *src, int64_t ld_src,
               const int32_t *src_rows, int64_t n, int64_t width) {
  cuda::kern::copy_rows(dst, ld_dst, dst_rows, src, ld_src, src_rows, n, width, c.stream);
}

void add_vector(Ctx &c, float *x, int64_t n, int64_t d, const float *v, float alpha) {
  cuda::kern::add_vector(x, n, d, d, v, alpha, c.stream);
}

void check_finite(Ctx &c, const float *x, int64_t n, int64_t d) {
  if (n > 0) cuda::kern::check_finite(x, n, d, d, c.err, c.stream);
}

int64_t nonfinite_row(Ctx &c, int64_t d) {
  ErrRec h;
  download(c, &h, c.err, sizeof h);
  return h.nan_pos == kNoError ? -1 : int64_t(h.nan_pos / uint64_t(d));
}

void encode(Ctx &c, const Sae &s, const float *x, int64_t n, int32_t k, float *values, int32_t *indices) {
  saehook_exec ex{0, c.stream};
  if (saehook_encode(s.handle, x, n, s.handle->d.d_model, k, values, indices, &ex) != SAEHOOK_OK)
    fail(SAEHOOK_ERR_INTERNAL, saehook_last_error());
}

void reconstruct(Ctx &c, const Sae &s, float *h, int64_t n) {
  saehook_exec ex{0, c.stream};
  if (saehook_reconstruct(s.handle, h, n, s.handle->d.d_model, &ex) != SAEHOOK_OK)
    fail(SAEHOOK_ERR_INTERNAL, saehook_last_error());
}

void steer_rows(Ctx &c, const saehook_steer_item *items, int32_t n_items, float *h, int64_t n, int64_t d,
                const uint8_t *mask, const uint8_t *act, const float *vals, const int32_t *idx, int32_t k,
                const float *dirs) {
  cuda::steer_rows(items, n_items, h, n, d, d, mask, act, vals, idx, k, dirs, c.err, c.stream);
}

#endif  // SAEHOOK_WITH_CUDA

}  // namespace saehook::llama_device
