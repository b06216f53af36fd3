// Host-side plumbing of the CUDA path: CUDA error reporting, the caller's device, per-call
// scratch memory (stream-ordered), and cuBLAS, which is loaded at run time (dlopen) so that the
// build needs no cuBLAS development files and the library uses whichever cuBLAS the process
// already has (torch's, typically). Plain C++ (runtime.cpp, ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../core/common.hpp"
#include "launch.cuh"

namespace saehook::cuda {

// Throws saehook::Error for a failed CUDA call (SAEHOOK_ERR_ALLOC for out-of-memory).
void check(cudaError_t e, const char *what);
// Checks the launches enqueued so far (cudaGetLastError).
void check_launch(const char *what);

// Makes `device` current for the scope of a call and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard &) = delete;
  DeviceGuard &operator=(const DeviceGuard &) = delete;

 private:
  int prev_ = -1, dev_ = -1;
};

// Is the stream being captured into a CUDA graph? (No synchronisation is allowed then.)
bool capturing(cudaStream_t st);

// Should calls wait for their kernels to report errors (NaN input, bad index)? Default yes;
// SAEHOOK_CUDA_SYNC=0 makes calls fully asynchronous (errors then go unreported, and the
// kernels leave outputs untouched when they find one).
bool sync_checks();

// One block of device scratch for a call, allocated on the call's stream from a per-device
// memory pool (stream-ordered: freed with cudaFreeAsync, reusable by the next call at once).
// Its first bytes are the call's ErrRec, set to "no error".
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t st, int device);
  ~Scratch();
  Scratch(const Scratch &) = delete;
  Scratch &operator=(const Scratch &) = delete;

  uint8_t *base() const { return base_; }
  template <class T>
  T *at(size_t offset) const {
    return reinterpret_cast<T *>(base_ + offset);
  }
  ErrRec *err() const { return reinterpret_cast<ErrRec *>(base_); }
  static size_t header() { return 256; }

  // Checks the launches, frees the block and, unless the stream is being captured or
  // SAEHOOK_CUDA_SYNC=0, waits for the stream and returns the kernels' ErrRec (else "none").
  ErrRec finish(const char *what);

 private:
  void release();
  uint8_t *base_ = nullptr;
  cudaStream_t st_;
  bool capturing_ = false, plain_ = false;
};

// ---- cuBLAS (loaded at run time) ----

// Is cuBLAS usable on this device for a call on `st`? (False if no libcublas could be loaded,
// SAEHOOK_CUBLAS=0 is set, creating a handle failed, or the handle does not exist yet and `st` is
// being captured into a CUDA graph; the custom kernels are used then.)
bool have_cublas(int device, cudaStream_t st);
// Bytes of workspace to give cuBLAS per call on this device.
size_t cublas_workspace_bytes(int device);
// Column-major C (m x n, ldc, f32) = op_T(A) (A: k x m, lda) * B (k x n, ldb) on the stream,
// f32 accumulation. a_type/b_type: cudaDataType codes (CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF).
void cublas_gemm_tn(int device, cudaStream_t st, void *workspace, size_t ws_bytes, int m, int n, int k,
                    const void *A, int a_type, int lda, const void *B, int b_type, int ldb, float *C, int ldc);
// What the CUDA path found (for saehook_cuda_describe).
std::string describe(int device);

}  // namespace saehook::cuda
