// The arithmetic of one steering item, shared by the CPU path (steer_modes.cpp) and the CUDA
// kernels (csrc/cuda/sparse.cu) so both compute the same coefficient.
#pragma once

#include "saehook.h"
#include "topk.hpp"  // SAEHOOK_HD

namespace saehook {

// Whether an op reads p = h . u_f (the row's projection on the unit decoder direction).
SAEHOOK_HD inline bool steer_uses_projection(int op) {
  return op == SAEHOOK_STEER_CAP || op == SAEHOOK_STEER_RESCALE;
}
// Whether an op reads z_f, the feature's activation in the row's encode.
SAEHOOK_HD inline bool steer_uses_activation(int op) {
  return op == SAEHOOK_STEER_CLAMP || op == SAEHOOK_STEER_SCALE || op == SAEHOOK_STEER_ABLATE;
}
SAEHOOK_HD inline bool steer_is_condition(int op) { return op >= SAEHOOK_COND_ABOVE && op <= SAEHOOK_COND_OR; }

// The coefficient c of the direction added to a row (h += c * direction): z is f's activation in
// the row's Top-K (0 if absent), p the row's projection on u_f. Condition items add nothing.
// A cap moves the row only when p is outside [value2, value]: at the bound c is exactly 0.
SAEHOOK_HD inline float steer_coefficient(int op, float value, float value2, float z, float p) {
  switch (op) {
    case SAEHOOK_STEER_ADD: return value;
    case SAEHOOK_STEER_CLAMP: return value - z;
    case SAEHOOK_STEER_SCALE: return (value - 1.f) * z;
    case SAEHOOK_STEER_ABLATE: return -z;
    case SAEHOOK_STEER_CAP: return p > value ? value - p : p < value2 ? value2 - p : 0.f;
    case SAEHOOK_STEER_RESCALE: return (value - 1.f) * p;
    default: return 0.f;
  }
}

}  // namespace saehook
