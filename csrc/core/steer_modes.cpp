// Steering items beyond a fixed push: projection caps, rescales, conditions on the encode
// (ABOVE/BELOW/AND/OR, each a condition item the op items point at with `when`) and latches.
// Cost: a cap or rescale reads no encoder, only one dot product per row with u_f (d_model
// FMAs); conditions read the encode the call makes anyway and keep n * n_items bytes.
#include "steer_modes.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../cpu/kernels.hpp"
#include "ops.hpp"
#include "steer_formula.hpp"
#include "threadpool.hpp"

namespace saehook::steer {

namespace {

std::string item_name(int32_t t) { return "steering item " + std::to_string(t); }

// f's activation in one row's encode (0 when f is not among the k entries).
inline float activation(const float *vals, const int32_t *idx, int32_t k, int32_t f) {
  for (int32_t j = 0; j < k; ++j)
    if (idx[j] == f) return vals[j];
  return 0.f;
}

}  // namespace

Plan check(const saehook_steer_item *items, int32_t n_items, int64_t d_sae) {
  if (n_items < 0 || (n_items > 0 && !items)) fail(SAEHOOK_ERR_INVALID_ARGUMENT, "steering items are missing");
  Plan plan;
  for (int32_t t = 0; t < n_items; ++t) {
    const saehook_steer_item &it = items[t];
    const int op = int(it.op);
    if (op < SAEHOOK_STEER_ADD || op > SAEHOOK_COND_OR)
      fail(SAEHOOK_ERR_INVALID_ARGUMENT, "unknown steering op " + std::to_string(op));
    const bool combine = op == SAEHOOK_COND_AND || op == SAEHOOK_COND_OR;
    if (!combine && (it.feature < 0 || it.feature >= d_sae))
      fail(SAEHOOK_ERR_INDEX, "steering feature " + std::to_string(it.feature) + " is out of range [0, " +
                                  std::to_string(d_sae) + ")");
    if (op == SAEHOOK_STEER_CAP) {
      // Bounds may be infinite (no bound on that side), never NaN, never the wrong infinity.
      if (std::isnan(it.value) || it.value == -INFINITY)
        fail(SAEHOOK_ERR_NAN, item_name(t) + ": cap max of feature " + std::to_string(it.feature) + " is " +
                                  std::to_string(it.value));
      if (std::isnan(it.value2) || it.value2 == INFINITY)
        fail(SAEHOOK_ERR_NAN, item_name(t) + ": cap min of feature " + std::to_string(it.feature) + " is " +
                                  std::to_string(it.value2));
      if (std::isinf(it.value) && std::isinf(it.value2))
        fail(SAEHOOK_ERR_INVALID_ARGUMENT,
             item_name(t) + ": cap of feature " + std::to_string(it.feature) + " has neither a max nor a min");
      if (it.value2 > it.value)
        fail(SAEHOOK_ERR_INVALID_ARGUMENT, item_name(t) + ": cap of feature " + std::to_string(it.feature) +
                                               " has min " + std::to_string(it.value2) + " > max " +
                                               std::to_string(it.value));
    } else if (!combine && !std::isfinite(it.value)) {
      fail(SAEHOOK_ERR_NAN, "steering value for feature " + std::to_string(it.feature) + " is NaN or Inf");
    }
    if (combine)
      for (int32_t a : {it.arg_a, it.arg_b})
        if (a < 0 || a >= t || !steer_is_condition(int(items[a].op)))
          fail(SAEHOOK_ERR_INVALID_ARGUMENT, item_name(t) + ": arg " + std::to_string(a) +
                                                 " is not an earlier condition item");
    if (steer_is_condition(op)) {
      if (it.when != 0)
        fail(SAEHOOK_ERR_INVALID_ARGUMENT, item_name(t) + ": a condition item has no `when` (combine with AND)");
      plan.has_conditions = true;
      if (!combine) plan.need_encode = true;
    } else {
      if (it.latch != 0)
        fail(SAEHOOK_ERR_INVALID_ARGUMENT, item_name(t) + ": latch is a property of condition items");
      if (it.when != 0 && (it.when < 0 || it.when > n_items || !steer_is_condition(int(items[it.when - 1].op))))
        fail(SAEHOOK_ERR_INVALID_ARGUMENT, item_name(t) + ": when = " + std::to_string(it.when) +
                                               " does not name a condition item (1 + its index)");
      if (steer_uses_activation(op)) plan.need_encode = true;
    }
  }
  return plan;
}

void check_state(const saehook_steer_state *state, int64_t n) {
  if (!state) return;
  const int32_t slots = state->n_slots > 0 ? state->n_slots : 1;
  if (state->latch_state && state->n_slots <= 0)
    fail(SAEHOOK_ERR_INVALID_ARGUMENT, "latch_state is given but n_slots = " + std::to_string(state->n_slots));
  if (state->row_slot)
    for (int64_t r = 0; r < n; ++r)
      if (state->row_slot[r] < 0 || state->row_slot[r] >= slots)
        fail(SAEHOOK_ERR_INDEX, "row_slot[" + std::to_string(r) + "] = " + std::to_string(state->row_slot[r]) +
                                    " is outside [0, " + std::to_string(slots) + ")");
}

void evaluate(const saehook_steer_item *items, int32_t n_items, const float *vals, const int32_t *idx,
              int64_t r0, int64_t n, int32_t k, const uint8_t *row_mask, const saehook_steer_state *state,
              std::vector<uint8_t> &latch_scratch, uint8_t *active) {
  const int32_t slots = state && state->n_slots > 0 ? state->n_slots : 1;
  uint8_t *latch = state ? state->latch_state : nullptr;
  if (!latch) {  // latches remember within this call only
    if (latch_scratch.size() != size_t(slots) * n_items) latch_scratch.assign(size_t(slots) * n_items, 0);
    latch = latch_scratch.data();
  }
  // Rows in order: a latch set on a row holds for the later rows of its slot in this call.
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = r0 + r;
    uint8_t *a = active + r * n_items;
    uint8_t *L = latch + size_t(state && state->row_slot ? state->row_slot[row] : 0) * n_items;
    const float *vr = vals ? vals + r * k : nullptr;
    const int32_t *ir = idx ? idx + r * k : nullptr;
    for (int32_t t = 0; t < n_items; ++t) {
      const saehook_steer_item &it = items[t];
      bool on;
      switch (int(it.op)) {
        case SAEHOOK_COND_ABOVE: on = activation(vr, ir, k, it.feature) > it.value; break;
        case SAEHOOK_COND_BELOW: on = activation(vr, ir, k, it.feature) < it.value; break;
        case SAEHOOK_COND_AND: on = a[it.arg_a] && a[it.arg_b]; break;
        case SAEHOOK_COND_OR: on = a[it.arg_a] || a[it.arg_b]; break;
        default: continue;  // op items below, once every condition of the row is known
      }
      if (it.latch) {
        on = on || L[t];
        L[t] = on;
      }
      a[t] = on;
    }
    const bool selected = !row_mask || row_mask[r];
    for (int32_t t = 0; t < n_items; ++t)
      if (!steer_is_condition(int(items[t].op))) a[t] = selected && (items[t].when == 0 || a[items[t].when - 1]);
  }
}

void directions(const Sae &s, const saehook_steer_item *items, int32_t n_items, float *dirs) {
  const int64_t d = s.d.d_model;
  for (int32_t t = 0; t < n_items; ++t) {
    const int op = int(items[t].op);
    if (!steer_is_condition(op))
      decoder_direction(s, items[t].feature, items[t].normalize != 0 || steer_uses_projection(op), dirs + size_t(t) * d);
  }
}

void apply_row(const saehook_steer_item *items, int32_t n_items, const uint8_t *act, const float *vals,
               const int32_t *idx, int32_t k, const float *dirs, int64_t d, float *row) {
  const cpu::Kernels &K = cpu::active();
  for (int32_t t = 0; t < n_items; ++t) {
    const saehook_steer_item &it = items[t];
    const int op = int(it.op);
    if (steer_is_condition(op) || (act && !act[t])) continue;
    const float *dir = dirs + size_t(t) * d;
    const float z = steer_uses_activation(op) ? activation(vals, idx, k, it.feature) : 0.f;
    float p = 0.f;
    if (steer_uses_projection(op)) {  // of the row as the earlier items left it
      double acc = 0;
      for (int64_t i = 0; i < d; ++i) acc += double(row[i]) * dir[i];
      p = float(acc);
    }
    const float c = steer_coefficient(op, it.value, it.value2, z, p);
    if (c != 0.f) K.axpy(c, dir, SAEHOOK_F32, d, row);
  }
}

void run(const Sae &s, float *h, int64_t n, int64_t ldh, const saehook_steer_item *items, int32_t n_items,
         const uint8_t *row_mask, int32_t k, float *values_out, int32_t *indices_out,
         const saehook_steer_state *state, int threads) {
  const saehook_sae_desc &D = s.d;
  const int64_t d = D.d_model;
  const Plan plan = check(items, n_items, D.d_sae);
  check_state(state, n);
  const bool need_encode = plan.need_encode || values_out != nullptr || indices_out != nullptr;
  if (n == 0) return;
  if (values_out == nullptr) indices_out = nullptr;  // outputs come as a pair
  const int32_t kk = k > 0 ? k : D.k;
  std::vector<float> vtmp;
  std::vector<int32_t> itmp;
  float *vals = values_out;
  int32_t *idx = indices_out;
  if (need_encode) {
    if (!vals) {
      vtmp.resize(size_t(n * kk));
      itmp.resize(size_t(n * kk));
      vals = vtmp.data();
      idx = itmp.data();
    }
    encode(s, h, n, ldh, kk, vals, idx, threads);
  } else {
    check_finite(h, n, d, ldh, "input");
  }
  if (n_items == 0) return;

  std::vector<float> dirs(size_t(n_items) * d);
  directions(s, items, n_items, dirs.data());
  uint8_t *fired = state ? state->fired : nullptr;
  std::vector<uint8_t> act_buf, latch_scratch, latch_copy;
  uint8_t *act = nullptr;
  saehook_steer_state eval_state{};
  if (plan.has_conditions || fired) {
    act_buf.resize(size_t(n) * n_items);
    act = act_buf.data();
    // The latches are updated on a copy, written back only once the call succeeds.
    if (state) {
      eval_state = *state;
      if (state->latch_state) {
        latch_copy.assign(state->latch_state, state->latch_state + size_t(state->n_slots) * n_items);
        eval_state.latch_state = latch_copy.data();
      }
    }
    evaluate(items, n_items, vals, idx, 0, n, kk, row_mask, state ? &eval_state : nullptr, latch_scratch, act);
  }
  auto steer_row = [&](int64_t r, float *row) {
    apply_row(items, n_items, act ? act + r * n_items : nullptr, vals ? vals + r * kk : nullptr,
              idx ? idx + r * kk : nullptr, kk, dirs.data(), d, row);
  };
  auto selected = [&](int64_t r) { return act || !row_mask || row_mask[r]; };  // act holds the mask
  // All or nothing: every steered row is first computed into scratch and checked for float32
  // overflow, then h (and the latch state) is written. The second pass repeats the row's
  // n_items x d_model multiply-adds, small next to the encode.
  const int T = std::max(1, std::min(threads, max_threads()));
  std::vector<float> scratch(size_t(T) * d);
  std::atomic<int64_t> bad_row{INT64_MAX};
  parallel_for(n, T, [&](int64_t r, int w) {
    if (!selected(r)) return;
    float *tmp = &scratch[size_t(w) * d];
    std::memcpy(tmp, h + r * ldh, size_t(d) * 4);
    steer_row(r, tmp);
    if (first_nonfinite_row(tmp, 1, d, d) == 0) record_row(bad_row, r);
  });
  const int64_t br = bad_row.load();
  if (br != INT64_MAX)
    fail(SAEHOOK_ERR_OVERFLOW, "steer: row " + std::to_string(br) +
                                   " overflows float32 (Inf/NaN) after steering; h is unchanged");
  parallel_for(n, T, [&](int64_t r, int) {
    if (selected(r)) steer_row(r, h + r * ldh);
  });
  if (!latch_copy.empty()) std::copy(latch_copy.begin(), latch_copy.end(), state->latch_state);
  if (fired) std::copy(act_buf.begin(), act_buf.end(), fired);
}

}  // namespace saehook::steer
