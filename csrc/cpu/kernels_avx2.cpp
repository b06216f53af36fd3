// The avx2 path (AVX2 + FMA + F16C, 256-bit vectors); target flags come from CMakeLists.txt. The
// body is kernels_avx2_i8_impl.hpp: the shared float32 code, and int8 on vpmaddubsw.
#define SAEHOOK_ISA_NS avx2
#define SAEHOOK_AVX2_VNNI 0
#include "kernels_avx2_i8_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_avx2 = {"avx2",         avx2::operand_bytes, avx2::prepare, avx2::dot_block, avx2::streams,
                                     avx2::gather_sum, avx2::axpy,        avx2::to_f32};
}
