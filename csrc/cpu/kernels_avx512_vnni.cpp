// The avx512_vnni path: AVX-512 with the VNNI and BF16 dot-product instructions (Zen 4/5,
// Sapphire Rapids and later); the body is kernels_vnni_impl.hpp.
#define SAEHOOK_ISA_NS avx512_vnni
#define SAEHOOK_VBYTES 64
#define SAEHOOK_VNNI_BF16 1
#include "kernels_vnni_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_avx512_vnni = {
    "avx512_vnni", avx512_vnni::operand_bytes, avx512_vnni::prepare, avx512_vnni::dot_block, avx512_vnni::streams,
    avx512_vnni::gather_sum, avx512_vnni::axpy, avx512_vnni::to_f32};
}
