// The baseline path of the CPU kernels (vector width 16 bytes); target flags come from CMakeLists.txt.
#define SAEHOOK_ISA_NS baseline
#define SAEHOOK_VBYTES 16
#include "kernels_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_baseline = {"baseline", baseline::operand_bytes_f32, baseline::prepare_f32, baseline::dot_block_f32, baseline::streams_f32, baseline::gather_sum,
                                   baseline::axpy,
                                   baseline::to_f32};
}
