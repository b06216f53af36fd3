// Host-side plumbing of the CUDA path (see runtime.cuh).
#include "runtime.cuh"

#include <library_types.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

namespace saehook::cuda {

void check(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
  const saehook_status st = e == cudaErrorMemoryAllocation ? SAEHOOK_ERR_ALLOC : SAEHOOK_ERR_INTERNAL;
  fail(st, std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

void check_launch(const char *what) { check(cudaGetLastError(), what); }

DeviceGuard::DeviceGuard(int device) : dev_(device) {
  if (cudaGetDevice(&prev_) != cudaSuccess) {
    (void)cudaGetLastError();
    prev_ = -1;
  }
  if (prev_ != dev_) check(cudaSetDevice(dev_), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  if (prev_ >= 0 && prev_ != dev_) (void)cudaSetDevice(prev_);
}

bool capturing(cudaStream_t st) {
  cudaStreamCaptureStatus s = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(st, &s) != cudaSuccess) {
    // E.g. the legacy stream while another stream captures: synchronising is not allowed.
    (void)cudaGetLastError();
    return true;
  }
  return s != cudaStreamCaptureStatusNone;
}

bool sync_checks() {
  const char *v = std::getenv("SAEHOOK_CUDA_SYNC");
  return !(v && std::strcmp(v, "0") == 0);
}

namespace {

// Per-device memory pools for the scratch blocks: kept (up to the release threshold) between
// calls so that the next call's allocation is a stream-ordered reuse, not a cudaMalloc.
constexpr uint64_t kPoolKeep = uint64_t(512) << 20;

struct Pools {
  std::mutex mu;
  std::vector<int> state;  // 0 unknown, 1 pool, 2 no pools on this device
  std::vector<cudaMemPool_t> pool;
};

Pools &pools() {
  static Pools *p = new Pools();  // never destroyed: in use until the process ends
  return *p;
}

cudaMemPool_t pool_for(int device) {
  Pools &P = pools();
  std::lock_guard<std::mutex> lock(P.mu);
  if (device >= int(P.state.size())) {
    P.state.resize(size_t(device) + 1, 0);
    P.pool.resize(size_t(device) + 1, nullptr);
  }
  if (P.state[device] == 0) {
    P.state[device] = 2;
    int supported = 0;
    if (cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) == cudaSuccess && supported) {
      cudaMemPoolProps props;
      std::memset(&props, 0, sizeof props);
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      cudaMemPool_t pool = nullptr;
      if (cudaMemPoolCreate(&pool, &props) == cudaSuccess) {
        uint64_t keep = kPoolKeep;
        (void)cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        P.pool[device] = pool;
        P.state[device] = 1;
      }
    }
    (void)cudaGetLastError();
  }
  return P.state[device] == 1 ? P.pool[device] : nullptr;
}

}  // namespace

Scratch::Scratch(size_t bytes, cudaStream_t st, int device) : st_(st) {
  capturing_ = capturing(st);
  void *p = nullptr;
  cudaError_t e;
  if (capturing_) {
    e = cudaMallocAsync(&p, bytes, st);  // becomes a memory node of the graph
  } else if (cudaMemPool_t pool = pool_for(device)) {
    e = cudaMallocFromPoolAsync(&p, bytes, pool, st);
  } else {
    plain_ = true;
    e = cudaMalloc(&p, bytes);
  }
  check(e, "allocating scratch memory");
  base_ = static_cast<uint8_t *>(p);
  const cudaError_t m = cudaMemsetAsync(base_, 0xff, sizeof(ErrRec), st);
  if (m != cudaSuccess) {
    release();
    check(m, "cudaMemsetAsync");
  }
}

Scratch::~Scratch() { release(); }

void Scratch::release() {
  if (!base_) return;
  if (plain_) {
    (void)cudaStreamSynchronize(st_);
    (void)cudaFree(base_);
  } else {
    (void)cudaFreeAsync(base_, st_);
  }
  base_ = nullptr;
}

ErrRec Scratch::finish(const char *what) {
  ErrRec h;
  std::memset(&h, 0xff, sizeof h);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) {
    release();
    check(launched, what);
  }
  if (capturing_ || !sync_checks()) {
    release();
    return h;
  }
  cudaError_t e = cudaMemcpyAsync(&h, base_, sizeof h, cudaMemcpyDeviceToHost, st_);
  release();  // stream-ordered after the copy
  if (e == cudaSuccess) e = cudaStreamSynchronize(st_);
  check(e, what);
  return h;
}

// ---------------------------------------------------------------- cuBLAS

namespace {

// The few cuBLAS entry points used, with their C ABI (cublas_api.h): enums are ints,
// handles pointers. Checked against the real header by tests/test_cuda_host.py where one is
// installed.
using cublasCreate_t = int (*)(void **);
using cublasSetStream_t = int (*)(void *, cudaStream_t);
using cublasSetWorkspace_t = int (*)(void *, void *, size_t);
using cublasGetVersion_t = int (*)(void *, int *);
using cublasGemmEx_t = int (*)(void *, int, int, int, int, int, const void *, const void *, int, int, const void *,
                               int, int, const void *, void *, int, int, int, int);
constexpr int kOpN = 0, kOpT = 1;          // cublasOperation_t
constexpr int kCompute32F = 68;            // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;           // CUBLAS_GEMM_DEFAULT

struct BlasApi {
  bool ok = false;
  std::string where, why;
  cublasCreate_t create = nullptr;
  cublasSetStream_t set_stream = nullptr;
  cublasSetWorkspace_t set_workspace = nullptr;
  cublasGetVersion_t version = nullptr;
  cublasGemmEx_t gemm = nullptr;
};

const BlasApi &blas_api() {
  static BlasApi *api = [] {
    auto *a = new BlasApi();
#if defined(_WIN32)
    a->why = "cuBLAS loading is implemented for Linux only";
#else
    void *lib = nullptr;
    std::vector<std::string> names;
    if (const char *p = std::getenv("SAEHOOK_CUBLAS_LIBRARY")) names.push_back(p);
    for (const char *n : {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"}) names.push_back(n);
#ifdef SAEHOOK_CUDA_LIBDIR
    for (const char *n : {"/libcublas.so.13", "/libcublas.so.12", "/libcublas.so"})
      names.push_back(std::string(SAEHOOK_CUDA_LIBDIR) + n);
#endif
    // A cuBLAS the process already has (torch's) first, then any the loader finds.
    for (const std::string &n : names)
      if (!lib && (lib = dlopen(n.c_str(), RTLD_NOW | RTLD_NOLOAD))) a->where = n;
    for (const std::string &n : names)
      if (!lib && (lib = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL))) a->where = n;
    if (!lib) {
      a->why = "no libcublas found (set SAEHOOK_CUBLAS_LIBRARY to its path)";
      return a;
    }
    a->create = reinterpret_cast<cublasCreate_t>(dlsym(lib, "cublasCreate_v2"));
    a->set_stream = reinterpret_cast<cublasSetStream_t>(dlsym(lib, "cublasSetStream_v2"));
    a->set_workspace = reinterpret_cast<cublasSetWorkspace_t>(dlsym(lib, "cublasSetWorkspace_v2"));
    a->version = reinterpret_cast<cublasGetVersion_t>(dlsym(lib, "cublasGetVersion_v2"));
    a->gemm = reinterpret_cast<cublasGemmEx_t>(dlsym(lib, "cublasGemmEx"));
    a->ok = a->create && a->set_stream && a->set_workspace && a->gemm;
    if (!a->ok) a->why = a->where + " lacks cublasGemmEx/cublasSetWorkspace_v2";
#endif
    return a;
  }();
  return *api;
}

struct BlasDevice {
  std::mutex mu;   // one call at a time sets the handle's stream and workspace
  int state = 0;   // 0 not tried, 1 ok, 2 failed
  void *handle = nullptr;
  std::string why;
};

struct BlasDevices {
  std::mutex mu;
  std::vector<BlasDevice *> dev;
};

BlasDevice &blas_device(int device) {
  static BlasDevices *all = new BlasDevices();  // handles live until the process ends
  std::lock_guard<std::mutex> lock(all->mu);
  if (device >= int(all->dev.size())) all->dev.resize(size_t(device) + 1, nullptr);
  if (!all->dev[device]) all->dev[device] = new BlasDevice();
  return *all->dev[device];
}

// The device's handle (created on first use, with `device` current), or null. Not created
// while `create` is false (a stream being captured into a graph: cublasCreate allocates).
void *blas_handle(int device, bool create = true) {
  const BlasApi &api = blas_api();
  if (!api.ok) return nullptr;
  BlasDevice &b = blas_device(device);
  std::lock_guard<std::mutex> lock(b.mu);
  if (b.state == 0 && create) {
    b.state = 2;
    DeviceGuard g(device);
    const int s = api.create(&b.handle);
    if (s == 0) {
      b.state = 1;
    } else {
      b.handle = nullptr;
      b.why = "cublasCreate failed with status " + std::to_string(s);
    }
  }
  return b.handle;
}

bool cublas_disabled() {
  const char *v = std::getenv("SAEHOOK_CUBLAS");
  return v && std::strcmp(v, "0") == 0;
}

}  // namespace

bool have_cublas(int device, cudaStream_t st) {
  return !cublas_disabled() && blas_handle(device, !capturing(st)) != nullptr;
}

size_t cublas_workspace_bytes(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    major = 0;
  }
  return major >= 9 ? (size_t(32) << 20) : (size_t(4) << 20);  // cuBLAS's recommendation
}

void cublas_gemm_tn(int device, cudaStream_t st, void *workspace, size_t ws_bytes, int m, int n, int k,
                    const void *A, int a_type, int lda, const void *B, int b_type, int ldb, float *C, int ldc) {
  const BlasApi &api = blas_api();
  void *h = blas_handle(device);
  if (!h) fail(SAEHOOK_ERR_INTERNAL, "cuBLAS is not available");
  BlasDevice &b = blas_device(device);
  std::lock_guard<std::mutex> lock(b.mu);
  // cublasSetStream resets the workspace, so the workspace is set after it. Each call brings
  // its own workspace: calls on different streams must not share one.
  int s = api.set_stream(h, st);
  if (s == 0) s = api.set_workspace(h, workspace, ws_bytes);
  if (s != 0) fail(SAEHOOK_ERR_INTERNAL, "cuBLAS stream/workspace setup failed with status " + std::to_string(s));
  const float one = 1.f, zero = 0.f;
  s = api.gemm(h, kOpT, kOpN, m, n, k, &one, A, a_type, lda, B, b_type, ldb, &zero, C, CUDA_R_32F, ldc,
               kCompute32F, kGemmDefault);
  if (s != 0) fail(SAEHOOK_ERR_INTERNAL, "cublasGemmEx failed with status " + std::to_string(s));
}

std::string describe(int device) {
  const BlasApi &api = blas_api();
  std::string out = "gemm=";
  if (cublas_disabled()) return out + "custom (SAEHOOK_CUBLAS=0)";
  if (!api.ok) return out + "custom (" + api.why + ")";
  void *h = blas_handle(device);
  if (!h) return out + "custom (" + blas_device(device).why + ")";
  int version = 0;
  if (api.version) api.version(h, &version);
  return out + "cublas (" + api.where + ", version " + std::to_string(version) + ")";
}

}  // namespace saehook::cuda
