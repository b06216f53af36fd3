// The avx512 path of the CPU kernels (vector width 64 bytes); target flags come from CMakeLists.txt.
#define SAEHOOK_ISA_NS avx512
#define SAEHOOK_VBYTES 64
#include "kernels_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_avx512 = {"avx512", avx512::operand_bytes_f32, avx512::prepare_f32, avx512::dot_block_f32, avx512::streams_f32, avx512::gather_sum,
                                   avx512::axpy,
                                   avx512::to_f32};
}
