// Internal definitions shared by the C API implementation and the CPU kernels.
#pragma once

#include "saehook.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace saehook {

// Error raised inside the library; the C API turns it into a status + thread-local message.
struct Error {
  saehook_status status;
  std::string message;
};

[[noreturn]] void fail(saehook_status status, std::string message);

inline size_t dtype_size(saehook_dtype d) {
  switch (d) {
    case SAEHOOK_F32: return 4;
    case SAEHOOK_F16:
    case SAEHOOK_BF16: return 2;
    case SAEHOOK_I8: return 1;
  }
  return 0;
}

const char *dtype_name(saehook_dtype d);

// ---- scalar half-precision conversions (round to nearest even) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

struct Prefilter;  // prefilter.hpp

// An SAE handle: the description plus the storage it owns when it copied its weights, and the
// bf16 copy of W_enc that exact encodes filter with when saehook_sae_set_prefilter asked for it.
struct Sae {
  saehook_sae_desc d{};
  std::vector<uint8_t> owned;  // one block holding every copied tensor
  std::shared_ptr<Prefilter> prefilter;
};

// Resolved execution settings.
int resolve_threads(const saehook_exec *exec);

}  // namespace saehook

struct saehook_sae : saehook::Sae {};
