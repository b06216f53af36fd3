// The device side of the llama.cpp hook (csrc/llama/device.cpp): what hook.cpp needs to run its
// per-micro-batch plan on a residual that lives in CUDA device memory (llama.cpp's CUDA backend,
// layers offloaded with n_gpu_layers). No CUDA types here: hook.cpp stays plain C++, and in a
// build without CUDA every function below but cuda_device_of_buffer_type reports that it has none
// (the hook then never calls them: it runs the host path).
//
// Why the residual's device pointer can be used as it is: saehook links the CUDA runtime
// statically and ggml-cuda links its own copy dynamically, but a runtime "uses the device's
// primary context" (CUDA 13.0 Runtime API, "Interactions with the CUDA Driver API": a one to one
// relationship between devices and driver CUcontexts within a process; runtime calls operate on
// the context current to the calling thread) and primary contexts are driver objects, "one per
// device per process" (CUDA Driver API, "Difference between the driver and runtime APIs"), so both
// runtimes work in the same context and address space. on_device() checks it for every tensor
// (cudaPointerGetAttributes must report device memory of that ordinal).
// Why no event is needed: ggml_backend_sched_compute_splits calls the eval callback with
// ask = false only after ggml_backend_synchronize(split_backend) (ggml-backend.cpp), so the node
// is computed when the callback starts; the device path runs on saehook's own stream and waits
// for it before the callback returns, so llama.cpp's next kernels see the changed rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "saehook.h"

namespace saehook::llama_device {

// Whether this build has the CUDA kernels (SAEHOOK_WITH_CUDA).
bool built();

// The emulated device: host memory stands for device memory and CPU loops for the kernels, in
// every build, so that tests without a GPU run the device path's orchestration against the host
// path (saehook_llama_hook_emulate_device). Pass it wherever a device ordinal goes.
constexpr int kEmulated = -100;
// The same, but its SAE copies fail as on a GPU this build has no kernels for (tests of the
// fallback to the host path).
constexpr int kEmulatedBroken = -101;

// ggml-cuda names the buffer type of device n "CUDA<n>" (GGML_CUDA_NAME + std::to_string(n));
// "CUDA_Host" (pinned host memory), "CUDA_Split", HIP's "ROCm<n>" and every other name give -1.
int cuda_device_of_buffer_type(const char *name);

// Whether p is device memory on CUDA device `device` as this library's CUDA runtime sees it;
// else false and why.
bool on_device(const void *p, int device, std::string &why);

// An SAE's weights copied to one device, with the CUDA handle over them.
struct Sae;
struct SaeDeleter {
  void operator()(Sae *s) const;
};
using SaePtr = std::unique_ptr<Sae, SaeDeleter>;
// Copies every weight of the host handle to `device` (synchronously; W_enc + W_dec bytes).
SaePtr upload(const saehook_sae *host, int device);
size_t bytes(const Sae &s);

// Device memory that grows on demand; ensure() may free and reallocate (after waiting for the
// device), so callers size a buffer once per callback before using it.
class Buffer {
 public:
  Buffer() = default;
  ~Buffer();
  Buffer(Buffer &&o) noexcept : p_(o.p_), cap_(o.cap_), device_(o.device_) { o.p_ = nullptr; o.cap_ = 0; }
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
  Buffer &operator=(Buffer &&) = delete;
  void *ensure(size_t bytes, int device);
  void *get() const { return p_; }

 private:
  void *p_ = nullptr;
  size_t cap_ = 0;
  int device_ = -1;
};

// One device's stream, error record, pinned staging memory and scratch buffers, for one hook.
struct Ctx;
struct CtxDeleter {
  void operator()(Ctx *c) const;
};
using CtxPtr = std::unique_ptr<Ctx, CtxDeleter>;
CtxPtr open(int device);
int device_of(const Ctx &c);

// Makes the context's device current for one callback and puts the caller's (llama.cpp's)
// current device back at the end; begins a callback (clears the error record, the staging).
class Scope {
 public:
  explicit Scope(Ctx &c);
  ~Scope();
  Scope(const Scope &) = delete;
  Scope &operator=(const Scope &) = delete;

 private:
  int prev_ = -1, dev_ = -1;
};

// Named scratch buffers of the context (grown on demand, see Buffer).
enum Slot { kSnapshot, kGather, kRows, kEncTmp, kMask, kCvec, kSlots };
void *scratch(Ctx &c, Slot s, size_t bytes);
// The device storage of one of the hook's encodings (by id), grown on demand like a slot.
void *encoding_storage(Ctx &c, int id, size_t bytes);
// Host data queued for the device on the context's stream (copied into pinned staging first, so
// the caller's memory may change at once).
void upload(Ctx &c, void *dst, const void *src, size_t bytes);
// Device data copied to host memory; complete when the call returns (waits for the stream).
void download(Ctx &c, void *dst, const void *src, size_t bytes);
void copy_device(Ctx &c, void *dst, const void *src, size_t bytes);
// Waits for everything queued on the context's stream; throws for an asynchronous error.
void sync(Ctx &c);

// Kernels on the context's stream (see csrc/cuda/hook_ops.hpp).
void copy_rows(Ctx &c, void *dst, int64_t ld_dst, const int32_t *dst_rows, const void *src, int64_t ld_src,
               const int32_t *src_rows, int64_t n, int64_t width);
void add_vector(Ctx &c, float *x, int64_t n, int64_t d, const float *v, float alpha);
// Records the first non-finite element of x (n x d) in the context's error record; the steering
// kernels then change nothing. nonfinite_row() reads it after sync(): its row, or -1.
void check_finite(Ctx &c, const float *x, int64_t n, int64_t d);
int64_t nonfinite_row(Ctx &c, int64_t d);
// saehook_encode / saehook_reconstruct with the device copy (they wait for their kernels' checks).
void encode(Ctx &c, const Sae &s, const float *x, int64_t n, int32_t k, float *values, int32_t *indices);
void reconstruct(Ctx &c, const Sae &s, float *h, int64_t n);
void steer_rows(Ctx &c, const saehook_steer_item *items, int32_t n_items, float *h, int64_t n, int64_t d,
                const uint8_t *mask, const uint8_t *act, const float *vals, const int32_t *idx, int32_t k,
                const float *dirs);

}  // namespace saehook::llama_device
