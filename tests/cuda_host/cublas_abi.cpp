// Compile-time check that the cuBLAS declarations csrc/cuda/runtime.cpp uses for the library it
// loads at run time match the real header (built by tests/test_cuda_host.py where a
// cublas_v2.h is installed; nothing to run).
#include <cublas_v2.h>

#include <cstddef>
#include <type_traits>

static_assert(CUBLAS_OP_N == 0 && CUBLAS_OP_T == 1, "cublasOperation_t");
static_assert(CUBLAS_COMPUTE_32F == 68, "CUBLAS_COMPUTE_32F");
static_assert(CUBLAS_GEMM_DEFAULT == -1, "CUBLAS_GEMM_DEFAULT");
static_assert(CUDA_R_32F == 0 && CUDA_R_16F == 2 && CUDA_R_16BF == 14, "cudaDataType");
static_assert(CUBLAS_STATUS_SUCCESS == 0, "cublasStatus_t");
static_assert(sizeof(cublasOperation_t) == sizeof(int) && sizeof(cublasComputeType_t) == sizeof(int) &&
                  sizeof(cudaDataType) == sizeof(int) && sizeof(cublasGemmAlgo_t) == sizeof(int) &&
                  sizeof(cublasStatus_t) == sizeof(int),
              "enums passed as int");
static_assert(std::is_same<decltype(&cublasCreate_v2), cublasStatus_t (*)(cublasHandle_t *)>::value, "create");
static_assert(std::is_same<decltype(&cublasSetStream_v2), cublasStatus_t (*)(cublasHandle_t, cudaStream_t)>::value,
              "setStream");
static_assert(std::is_same<decltype(&cublasSetWorkspace_v2), cublasStatus_t (*)(cublasHandle_t, void *, size_t)>::value,
              "setWorkspace");
static_assert(std::is_same<decltype(&cublasGetVersion_v2), cublasStatus_t (*)(cublasHandle_t, int *)>::value,
              "getVersion");
// cublasGemmEx has a C++ overload (an inline wrapper taking cudaDataType as the compute type):
// the cast selects the exported function and fails to compile if its signature differs.
using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
                                  const void *, cudaDataType, int, const void *, cudaDataType, int, const void *,
                                  void *, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
[[maybe_unused]] constexpr GemmEx kGemmEx = static_cast<GemmEx>(&cublasGemmEx);

int main() { return 0; }
