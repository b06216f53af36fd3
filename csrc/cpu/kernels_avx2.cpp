// The avx2 path of the CPU kernels (vector width 32 bytes); target flags come from CMakeLists.txt.
#define SAEHOOK_ISA_NS avx2
#define SAEHOOK_VBYTES 32
#include "kernels_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_avx2 = {"avx2", avx2::operand_bytes_f32, avx2::prepare_f32, avx2::dot_block_f32, avx2::gather_sum,
                                   avx2::axpy,
                                   avx2::to_f32};
}
