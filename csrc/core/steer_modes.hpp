// Steering with conditions, latches, projection caps and rescales (saehook_steer_ex): item
// validation and condition evaluation shared by the CPU and CUDA paths, and the CPU steer.
#pragma once

#include "common.hpp"

namespace saehook::steer {

struct Plan {
  bool need_encode = false;   // some item reads z (CLAMP/SCALE/ABLATE, a condition)
  bool has_conditions = false;
};

// Validates the items (errors name the item and the field) against an SAE of d_sae features.
Plan check(const saehook_steer_item *items, int32_t n_items, int64_t d_sae);

// Checks the latch slots of n rows against the state (errors name the row).
void check_state(const saehook_steer_state *state, int64_t n);

// For rows [r0, r0 + n) of a call (vals/idx: their encode, k per row; row_mask: n bytes for
// these rows or NULL): active[r * n_items + t] = whether condition item t holds on row r0 + r
// (latches applied and updated in state; state->row_slot is indexed by the call's row) or
// whether op item t applies there. Chunks of a call must come in row order.
void evaluate(const saehook_steer_item *items, int32_t n_items, const float *vals, const int32_t *idx,
              int64_t r0, int64_t n, int32_t k, const uint8_t *row_mask, const saehook_steer_state *state,
              std::vector<uint8_t> &latch_scratch, uint8_t *active);

// dirs (n_items x d_model) <- the direction of each op item (unit for CAP/RESCALE and with
// normalize; condition items' rows are left alone). Throws on a zero direction to normalise.
void directions(const Sae &s, const saehook_steer_item *items, int32_t n_items, float *dirs);

// Applies the op items to one row (d floats) in list order: act (n_items bytes, NULL: every op
// item applies), the row's encode (vals/idx, k entries; NULL when no item reads z_f), dirs from
// directions(). The one place the steering arithmetic runs on the CPU (steer::run, the
// llama.cpp hook).
void apply_row(const saehook_steer_item *items, int32_t n_items, const uint8_t *act, const float *vals,
               const int32_t *idx, int32_t k, const float *dirs, int64_t d, float *row);

// The CPU steer (the contract of saehook_steer_ex).
void run(const Sae &s, float *h, int64_t n, int64_t ldh, const saehook_steer_item *items, int32_t n_items,
         const uint8_t *row_mask, int32_t k, float *values_out, int32_t *indices_out,
         const saehook_steer_state *state, int threads);

}  // namespace saehook::steer
