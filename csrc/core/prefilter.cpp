// Exact float32 encodes filtered through a bfloat16 copy of W_enc: prefilter.hpp says what and why.
#include "prefilter.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../cpu/kernels.hpp"
#include "encode_blocks.hpp"
#include "threadpool.hpp"
#include "topk.hpp"

namespace saehook {

namespace {

constexpr double kU = 1.0 / 16777216.0;  // float32's unit roundoff, 2^-24
constexpr float kInf = std::numeric_limits<float>::infinity();
// The relative part of the bound for the roundings of adding b_enc to both dot products, with
// a margin for this code's own double arithmetic.
constexpr double kBiasRounding = 2.0001 * kU * (1 + 1e-6);

float round_up(double v) {
  float f = float(v);
  return double(f) < v ? std::nextafter(f, kInf) : f;
}
float round_down(double v) {
  float f = float(v);
  return double(f) > v ? std::nextafter(f, -kInf) : f;
}

// What the bound needs of one input row (prefilter.hpp): |x|, |x^|, |x - x^| rounded up, and
// the largest bound over all features (the scan's quick rejection).
struct RowNorms {
  double nx = 0, nxh = 0, ex = 0, e_max = 0;
};

struct Bound {
  double g, tiny;  // the summation term's factor, the flushed-denormal scale
  const Prefilter *pf;
  // The bound of feature i's approximate pre-activation a (b_enc added) for row norms r.
  double operator()(const RowNorms &r, double nw, double ndw, double nwh, double a) const {
    const double e = r.ex * nw + r.nxh * ndw + g * (std::max(r.nx, r.nxh) * nwh + r.nx * nw) +
                     tiny * (1 + r.nx + r.nxh + nw + nwh);
    return (e + kBiasRounding * (std::fabs(a) + e)) * (1 + 1e-6);
  }
  double of(const RowNorms &r, int64_t i, double a) const {
    return (*this)(r, pf->norm_w[i], pf->norm_dw[i], pf->norm_wh[i], a);
  }
};

// Into L2, through asm the compiler keeps (kernels_impl.hpp's prefetch_to says why).
inline void prefetch_l2(const void *p) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ volatile("prefetcht1 (%0)" ::"r"(p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// The least float a feature's approximate value must reach for its upper bound to reach
// `floor_l`, the worker's k-th best lower bound (a below it: neither bound can count).
float reject_below(float floor_l, double e_max) {
  if (!(floor_l > -kInf)) return -kInf;
  const double c = kBiasRounding * 1.01, t = double(floor_l) - e_max;
  // hi <= a (1 + c) + e_max for a >= 0 and hi <= a (1 - c) + e_max for a < 0 (e_max as the
  // bound's constant part, already past its own factor).
  const double a = t >= 0 ? t / (1 + c) : t / (1 - c);
  return round_down(a - std::fabs(a) * 1e-9);
}

// A worker's candidates of one row: (upper bound, feature) of every feature whose upper bound
// reached the worker's lower-bound floor when it was seen.
struct CandList {
  Cand *buf = nullptr;
  int32_t n = 0, cap = 0;
  bool overflow = false;
  void push(float hi, int32_t i, float floor_l) {
    if (n == cap) {
      int32_t w = 0;  // drop what the floor has since passed
      for (int32_t j = 0; j < n; ++j)
        if (buf[j].v >= floor_l) buf[w++] = buf[j];
      n = w;
      if (n > cap - cap / 4) {  // still nearly full: the call takes the exact encode
        overflow = true;
        return;
      }
    }
    buf[n++] = Cand{hi, i};
  }
};

}  // namespace

std::shared_ptr<Prefilter> build_prefilter(const Sae &s, int threads) {
  const saehook_sae_desc &D = s.d;
  const int64_t d = D.d_model, m = D.d_sae;
  const size_t n = size_t(m) * size_t(d);
  auto pf = std::make_shared<Prefilter>();
  pf->bytes = n * 2 + size_t(m) * 12;
  try {
    pf->W.reset(new uint16_t[n]);
    pf->norm_w.reset(new float[m]);
    pf->norm_dw.reset(new float[m]);
    pf->norm_wh.reset(new float[m]);
  } catch (const std::bad_alloc &) {
    fail(SAEHOOK_ERR_ALLOC, "prefilter: cannot allocate " + std::to_string(pf->bytes) +
                                " bytes for the bf16 copy of W_enc and its norms");
  }
  const float *W = static_cast<const float *>(D.W_enc);
  constexpr int64_t kRows = 256;
  parallel_for((m + kRows - 1) / kRows, threads, [&](int64_t b, int) {
    for (int64_t i = b * kRows; i < std::min(m, (b + 1) * kRows); ++i) {
      const float *w = W + i * d;
      uint16_t *h = pf->W.get() + i * d;
      double s2 = 0, ds2 = 0, h2 = 0;
      for (int64_t j = 0; j < d; ++j) {
        h[j] = f32_to_bf16(w[j]);
        const double wv = w[j], hv = bf16_to_f32(h[j]);
        s2 += wv * wv;
        ds2 += (wv - hv) * (wv - hv);
        h2 += hv * hv;
      }
      // Sums of d squares in double: relative error below d 2^-53, covered by the 1e-9.
      pf->norm_w[i] = round_up(std::sqrt(s2) * (1 + 1e-9));
      pf->norm_dw[i] = round_up(std::sqrt(ds2) * (1 + 1e-9));
      pf->norm_wh[i] = round_up(std::sqrt(h2) * (1 + 1e-9));
    }
  });
  for (int64_t i = 0; i < m; ++i) {  // NaN (a NaN weight) propagates: every encode then falls back
    auto mx = [](float a, float b) { return a != a || b != b ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); };
    pf->max_norm_w = mx(pf->max_norm_w, pf->norm_w[i]);
    pf->max_norm_dw = mx(pf->max_norm_dw, pf->norm_dw[i]);
    pf->max_norm_wh = mx(pf->max_norm_wh, pf->norm_wh[i]);
  }
  return pf;
}

bool encode_prefiltered(const Sae &s, const Prefilter &pf_c, const float *x, int64_t n, int64_t ldx,
                        int32_t k, float *values, int32_t *indices, int threads) {
  Prefilter &pf = const_cast<Prefilter &>(pf_c);  // the counters
  const saehook_sae_desc &D = s.d;
  const int64_t d = D.d_model, m = D.d_sae;
  const cpu::Kernels &K = cpu::active();
  const cpu::Tuning &tp = cpu::tuning();
  saehook_sae_desc Dh = D;  // the copy as an encoder, for the block size
  Dh.W_enc = pf.W.get();
  Dh.enc_dtype = SAEHOOK_BF16;
  const int64_t fb = feature_block(Dh, n, K, tp);
  const int64_t n_blocks = (m + fb - 1) / fb;
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(threads, n_blocks)));
  const int32_t cap_lo = int32_t(std::min<int64_t>(std::max<int64_t>(2 * int64_t(k), k + 16), m));
  const int32_t cap_c = int32_t(std::min<int64_t>(std::max<int64_t>(8 * int64_t(k), 1024), m));
  const int64_t per_row = int64_t(T) * ((int64_t(cap_lo) + cap_c) * int64_t(sizeof(Cand)) + fb * 4);
  const int64_t rc_max = std::max<int64_t>(1, std::min<int64_t>({kRowChunk, n, kScratchBytes / per_row}));

  std::vector<float> pre(size_t(T) * rc_max * fb);
  std::vector<Cand> lo_buf(size_t(T) * rc_max * cap_lo), c_buf(size_t(T) * rc_max * cap_c);
  std::vector<TopK> lows(size_t(T) * rc_max);
  std::vector<CandList> cands(size_t(T) * rc_max);
  std::vector<RowNorms> norms(rc_max);
  std::vector<uint8_t> op_h(K.operand_bytes(SAEHOOK_BF16, rc_max, d));
  const size_t op_f_bytes = (K.operand_bytes(SAEHOOK_F32, 1, d) + 63) & ~size_t(63);
  std::vector<uint8_t> op_f(op_f_bytes * rc_max + 64);
  uint8_t *op_f0 = op_f.data() + (64 - reinterpret_cast<uintptr_t>(op_f.data()) % 64) % 64;
  const float *shift = D.subtract_b_dec ? D.b_dec : nullptr;
  const Admission adm{D.activation, D.threshold};
  const double dn = double(d) + 2;
  const Bound bound{dn * kU / (1 - dn * kU), double(d) * std::ldexp(1.0, -100), &pf};
  std::atomic<bool> bail{false};  // a candidate list overflowed or a value was not finite
  int64_t recomputed = 0;

  for (int64_t r0 = 0; r0 < n; r0 += rc_max) {
    const int64_t rc = std::min(rc_max, n - r0);
    K.prepare(x + r0 * ldx, ldx, shift, rc, d, SAEHOOK_BF16, op_h.data());
    for (int64_t r = 0; r < rc; ++r) {
      const float *xr = x + (r0 + r) * ldx;
      K.prepare(xr, ldx, shift, 1, d, SAEHOOK_F32, op_f0 + r * op_f_bytes);
      double s2 = 0, h2 = 0, e2 = 0;
      for (int64_t i = 0; i < d; ++i) {
        const float v = shift ? xr[i] - shift[i] : xr[i];  // as `prepare` shifts
        const double hv = bf16_to_f32(f32_to_bf16(v));
        s2 += double(v) * v;
        h2 += hv * hv;
        e2 += (v - hv) * (v - hv);
      }
      RowNorms &R = norms[r];
      R.nx = std::sqrt(s2) * (1 + 1e-9);
      R.nxh = std::sqrt(h2) * (1 + 1e-9);
      R.ex = std::sqrt(e2) * (1 + 1e-9);
      R.e_max = bound(R, pf.max_norm_w, pf.max_norm_dw, pf.max_norm_wh, 0.0);
      for (int w = 0; w < T; ++w) {
        const size_t slot = size_t(w) * rc_max + r;
        lows[slot].reset(k, &lo_buf[slot * cap_lo], cap_lo);
        cands[slot] = CandList{&c_buf[slot * cap_c], 0, cap_c, false};
      }
    }

    parallel_for(n_blocks, T, [&](int64_t b, int w) {
      if (bail.load(std::memory_order_relaxed)) return;
      const int64_t f0 = b * fb, nf = std::min(fb, m - f0);
      float *P = &pre[size_t(w) * rc_max * fb];
      const int64_t f_next = b + T < n_blocks && (b + T + 1) * fb <= m ? (b + T) * fb : -1;
      K.dot_block(op_h.data(), rc, pf.W.get(), SAEHOOK_BF16, nullptr, d, f0, nf, P, fb, tp, f_next);
      const float *be = D.b_enc ? D.b_enc + f0 : nullptr;
      for (int64_t r = 0; r < rc; ++r) {
        TopK &lo = lows[size_t(w) * rc_max + r];
        CandList &cl = cands[size_t(w) * rc_max + r];
        const RowNorms &R = norms[r];
        const float *p = P + r * fb;
        bool bad = false;
        float floor_seen = lo.floor_value(), t = reject_below(floor_seen, R.e_max);
        for (int64_t j0 = 0; j0 < nf; j0 += kScanGroup) {
          const int64_t j1 = std::min(nf, j0 + kScanGroup);
          if (lo.floor_value() != floor_seen) t = reject_below(floor_seen = lo.floor_value(), R.e_max);
          if (j1 - j0 == kScanGroup && !group_worth_a_look(p + j0, be ? be + j0 : nullptr, t, -kInf)) continue;
          for (int64_t j = j0; j < j1; ++j) {
            const float a = be ? p[j] + be[j] : p[j];
            if (a < t) continue;  // (NaN goes on, to be caught below)
            const int64_t i = f0 + j;
            const double e = bound.of(R, i, a);
            // Not finite, or near float32's overflow (where the exact value may overflow): the
            // exact encode decides (and reports it).
            if (!(std::fabs(double(a)) + e < 1e38)) {
              bad = true;
              continue;
            }
            const float fl = adm.floor(i);
            const double lo_v = double(a) - e, hi_v = double(a) + e;
            if (lo_v > fl) lo.push(round_down(lo_v), int32_t(i));
            if (hi_v > fl && hi_v >= lo.floor_value()) cl.push(round_up(hi_v), int32_t(i), lo.floor_value());
          }
        }
        if (bad || cl.overflow) bail.store(true, std::memory_order_relaxed);
      }
    });
    if (bail.load()) break;

    // Per row: the k-th best lower bound over every worker and the candidates whose upper
    // bound reaches it.
    std::vector<std::vector<Cand>> take(rc);
    parallel_for(rc, T, [&](int64_t r, int) {
      std::vector<float> lv;
      for (int w = 0; w < T; ++w) {
        const TopK &lo = lows[size_t(w) * rc_max + r];
        for (int32_t j = 0; j < lo.size(); ++j) lv.push_back(lo.data()[j].v);
      }
      float L = -kInf;
      if (int64_t(lv.size()) >= k) {
        std::nth_element(lv.begin(), lv.begin() + (k - 1), lv.end(), std::greater<float>());
        L = lv[k - 1];
      }
      for (int w = 0; w < T; ++w) {
        const CandList &cl = cands[size_t(w) * rc_max + r];
        for (int32_t j = 0; j < cl.n; ++j)
          if (cl.buf[j].v >= L) take[r].push_back(cl.buf[j]);
      }
    });
    // Their exact values, in tasks of kRefine candidates over every row (batch 1 spreads its
    // rows of W_enc over the threads too); each value replaces its upper bound in place. Two
    // stages: the k best upper bounds first, whose k-th exact value (a lower bound of the k-th
    // value) then drops the rest whose upper bound is below it, about half of them.
    constexpr int64_t kRefine = 16;
    const size_t row_bytes = size_t(d) * 4;
    auto prefetch_row = [&](int32_t f) {
      const char *q = static_cast<const char *>(D.W_enc) + size_t(f) * row_bytes;
      for (size_t o = 0; o < row_bytes; o += 64) prefetch_l2(q + o);
    };
    // Recomputes take[r][lo[r] : hi[r]] for every row.
    auto refine = [&](const std::vector<size_t> &lo, const std::vector<size_t> &hi) {
      std::vector<int64_t> first(rc + 1, 0);  // the first task of each row
      for (int64_t r = 0; r < rc; ++r) first[r + 1] = first[r] + (int64_t(hi[r] - lo[r]) + kRefine - 1) / kRefine;
      parallel_for(first[rc], T, [&](int64_t task, int) {
        const int64_t r = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
        std::vector<Cand> &tr = take[r];
        const size_t c0 = lo[r] + size_t(task - first[r]) * kRefine, c1 = std::min(hi[r], c0 + kRefine);
        const uint8_t *op = op_f0 + r * op_f_bytes;
        // A few rows ahead are read while this one is multiplied: each row is a short stream of
        // its own, where the hardware prefetcher has no time to start.
        constexpr size_t kAhead = 3;
        for (size_t ci = c0; ci < std::min(c1, c0 + kAhead); ++ci) prefetch_row(tr[ci].i);
        for (size_t ci = c0; ci < c1; ++ci) {
          if (ci + kAhead < c1) prefetch_row(tr[ci + kAhead].i);
          float dot;
          K.dot_block(op, 1, D.W_enc, SAEHOOK_F32, nullptr, d, tr[ci].i, 1, &dot, 1, tp, -1);
          const float v = D.b_enc ? dot + D.b_enc[tr[ci].i] : dot;
          // Above its upper bound would mean the bound is wrong: never trusted, the exact encode runs.
          if (!(v - v == 0.f) || v > tr[ci].v) bail.store(true, std::memory_order_relaxed);
          tr[ci].v = v;
        }
      });
    };
    std::vector<size_t> zero(rc, 0), head(rc), end(rc);
    for (int64_t r = 0; r < rc; ++r) {
      std::sort(take[r].begin(), take[r].end(), CandBetter());
      head[r] = std::min(take[r].size(), size_t(k));
    }
    refine(zero, head);
    if (bail.load()) break;
    for (int64_t r = 0; r < rc; ++r) {
      std::vector<Cand> &tr = take[r];
      std::vector<float> kept;  // the admissible exact values of the head
      for (size_t c = 0; c < head[r]; ++c)
        if (tr[c].v > adm.floor(tr[c].i)) kept.push_back(tr[c].v);
      const float L2 = int64_t(kept.size()) >= k ? *std::min_element(kept.begin(), kept.end()) : -kInf;
      size_t w = head[r];
      for (size_t c = head[r]; c < tr.size(); ++c)
        if (tr[c].v >= L2) tr[w++] = tr[c];
      tr.resize(w);
      end[r] = w;
    }
    refine(head, end);
    if (bail.load()) break;
    parallel_for(rc, T, [&](int64_t r, int) {
      std::vector<Cand> &tr = take[r];
      std::vector<Cand> best(std::max<size_t>(tr.size(), size_t(k)));  // never compacts
      TopK t;
      t.reset(k, best.data(), int32_t(best.size()));
      for (const Cand &c : tr)
        if (c.v > adm.floor(c.i)) t.push(c.v, c.i);
      finalize_topk(t.data(), t.size(), k, values + (r0 + r) * k, indices + (r0 + r) * k);
    });
    for (int64_t r = 0; r < rc; ++r) recomputed += int64_t(take[r].size());
  }

  if (bail.load()) {
    pf.fallbacks.fetch_add(1);
    return false;
  }
  pf.rows.fetch_add(n);
  pf.recomputed.fetch_add(recomputed);
  return true;
}

}  // namespace saehook
