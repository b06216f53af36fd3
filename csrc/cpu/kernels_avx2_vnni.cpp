// The avx2_vnni path: AVX2 with the VEX-encoded VNNI dot product (AVX-VNNI: Alder Lake and later
// Intel cores, Zen 5), for machines without AVX-512; the body is kernels_avx2_i8_impl.hpp.
#define SAEHOOK_ISA_NS avx2_vnni
#define SAEHOOK_AVX2_VNNI 1
#include "kernels_avx2_i8_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_avx2_vnni = {
    "avx2_vnni", avx2_vnni::operand_bytes, avx2_vnni::prepare, avx2_vnni::dot_block, avx2_vnni::streams,
    avx2_vnni::gather_sum, avx2_vnni::axpy, avx2_vnni::to_f32};
}
