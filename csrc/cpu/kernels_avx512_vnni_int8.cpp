// The avx512_vnni_int8 path: AVX-512 with VNNI but without BF16 (Cascade Lake, Ice Lake, Tiger
// Lake): the int8 encoder runs on vpdpbusd, bf16 takes the plain AVX-512 loops. The body is
// kernels_vnni_impl.hpp.
#define SAEHOOK_ISA_NS avx512_vnni_int8
#define SAEHOOK_VBYTES 64
#define SAEHOOK_VNNI_BF16 0
#include "kernels_vnni_impl.hpp"

namespace saehook::cpu {
extern const Kernels kernels_avx512_vnni_int8 = {
    "avx512_vnni_int8", avx512_vnni_int8::operand_bytes, avx512_vnni_int8::prepare,
    avx512_vnni_int8::dot_block, avx512_vnni_int8::streams, avx512_vnni_int8::gather_sum, avx512_vnni_int8::axpy,
    avx512_vnni_int8::to_f32};
}
