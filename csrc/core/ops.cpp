// Encode / decode / steer on the CPU. The ISA-specific inner loops live in csrc/cpu; this file
// does blocking, threading, the fused Top-K and validation.
#include "ops.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cmath>
#include <string>
#include <vector>

#include "../cpu/kernels.hpp"
#include "encode_blocks.hpp"
#include "prefilter.hpp"
#include "threadpool.hpp"
#include "topk.hpp"

namespace saehook {

namespace {

inline float load_scalar(const uint8_t *p, saehook_dtype dt) {
  switch (dt) {
    case SAEHOOK_F32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case SAEHOOK_F16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return f16_to_f32(h);
    }
    case SAEHOOK_BF16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return bf16_to_f32(h);
    }
    case SAEHOOK_I8: return float(int8_t(*p));
  }
  return 0.f;
}

}  // namespace

// Features per task. With several rows, about 512 KiB of encoder weights, so a block stays in L2
// while every row of the chunk is multiplied with it; a single row streams the weights once.
// The byte targets are the CPU class's (Tuning::block_bytes_n, block_bytes_1).
int64_t feature_block(const saehook_sae_desc &d, int64_t rows, const cpu::Kernels &K, const cpu::Tuning &tp) {
  int64_t row_bytes = d.d_model * int64_t(dtype_size(d.enc_dtype));
  // Batch 1 and the few-rows order stream the weights once: long sequential blocks keep the
  // hardware prefetcher running (batch 1, 2 MiB blocks vs 128 KiB, alternating in one process at
  // 4096 x 65536: f32 0.82 -> 0.91, bf16 0.95 -> 0.99, int8 0.93 -> 0.98 of the measured read
  // bandwidth; 2048 x 32768 f32 at 6 / 8 / 12 rows, 2 MiB against 512 KiB: 0.97x / 0.91x / 0.95x
  // the time, bf16 at 8 rows the same).
  const bool stream = K.streams(d.enc_dtype, rows, tp);
  int64_t target = stream ? tp.block_bytes_1 : tp.block_bytes_n;
  int64_t fb = std::clamp<int64_t>(target / std::max<int64_t>(row_bytes, 1), 8, 512);
  // Several rows: whole register tiles of the packed kernels (4 groups of 16 features), as long
  // as the block still fits L2. At d_model 5120 the 512 KiB target gave 48 bf16 features, three
  // groups, so every tile was one group wide: 129 ms at batch 64 against torch's 75 ms.
  if (!stream && fb % 64 != 0) {
    const int64_t down = fb / 64 * 64, up = down + 64;
    fb = down > 0 ? down : (up * row_bytes <= (int64_t(1) << 20) ? up : std::max<int64_t>(8, fb / 16 * 16));
  }
  return std::min<int64_t>(fb & ~int64_t(7), d.d_sae);
}

void check_finite(const float *x, int64_t n, int64_t d, int64_t stride, const char *what) {
  for (int64_t r = 0; r < n; ++r) {
    const float *row = x + r * stride;
    float acc = 0.f;
    for (int64_t i = 0; i < d; ++i) acc += row[i] * 0.f;  // NaN iff some element is NaN/Inf
    if (acc != acc) {
      for (int64_t i = 0; i < d; ++i)
        if (!std::isfinite(row[i]))
          fail(SAEHOOK_ERR_NAN, std::string(what) + " contains " +
                                    (std::isnan(row[i]) ? "NaN" : "Inf") + " at row " +
                                    std::to_string(r) + ", column " + std::to_string(i));
    }
  }
}

namespace {

// Why a row's result is not finite, for the error message: the largest |x| of the input row.
std::string overflow_hint(const float *row, int64_t d) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(row[i]));
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", double(amax));
  return std::string(" from a finite input row (largest |x| ") + buf +
         "): the input is too large for float32, or the SAE's weights hold Inf/NaN";
}

}  // namespace

// Index of the first row of out (n rows, stride ld, d wide) holding an Inf/NaN, or -1.
int64_t first_nonfinite_row(const float *out, int64_t n, int64_t d, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const float *row = out + r * ld;
    float acc = 0.f;
    for (int64_t i = 0; i < d; ++i) acc += row[i] * 0.f;  // NaN iff some element is NaN/Inf
    if (acc != acc) return r;
  }
  return -1;
}

// Lowers `slot` to `r` (the first failing row wins, whichever thread finds it).
void record_row(std::atomic<int64_t> &slot, int64_t r) {
  int64_t cur = slot.load();
  while (r < cur && !slot.compare_exchange_weak(cur, r)) {
  }
}

void encode(const Sae &s, const float *x, int64_t n, int64_t ldx, int32_t k, float *values,
            int32_t *indices, int threads) {
  const saehook_sae_desc &D = s.d;
  const int64_t d = D.d_model, m = D.d_sae;
  if (k <= 0) k = D.k;
  if (k > m)
    fail(SAEHOOK_ERR_SHAPE, "k = " + std::to_string(k) + " exceeds d_sae = " + std::to_string(m));
  if (n == 0) return;
  check_finite(x, n, d, ldx, "input");
  // A copy of the pointer: a prefilter swapped meanwhile (saehook_sae_set_prefilter from another
  // thread) stays alive until this call is done with it.
  if (const std::shared_ptr<Prefilter> pf = std::atomic_load(&s.prefilter))
    if (encode_prefiltered(s, *pf, x, n, ldx, k, values, indices, threads)) return;

  const cpu::Kernels &K = cpu::active();
  const cpu::Tuning &tp = cpu::tuning();
  const int64_t fb = feature_block(D, n, K, tp);
  const int64_t n_blocks = (m + fb - 1) / fb;
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(threads, n_blocks)));
  // Top-K buffer entries per row and worker: room for 2k (compacting to k when full), never more
  // than the d_sae candidates a row has (so a buffer of d_sae never fills; computed in int64: 2k
  // overflows int32 for k > 2**30).
  const int32_t cap = int32_t(std::min<int64_t>(std::max<int64_t>(2 * int64_t(k), k + 16), m));
  // Rows per pass over W_enc: up to kRowChunk, fewer when the per-thread Top-K buffers and
  // pre-activation tiles of that many rows would exceed kScratchBytes (very large k, many
  // threads), so scratch stays bounded whatever k and threads are.
  const int64_t per_row = int64_t(T) * (int64_t(cap) * int64_t(sizeof(Cand)) + fb * 4);
  const int64_t rc_max = std::max<int64_t>(1, std::min<int64_t>({kRowChunk, n, kScratchBytes / per_row}));

  std::vector<float> pre(size_t(T) * rc_max * fb);
  std::vector<Cand> cand(size_t(T) * rc_max * cap);
  std::vector<TopK> tk(size_t(T) * rc_max);
  std::vector<uint8_t> operand(K.operand_bytes(D.enc_dtype, rc_max, d));
  const float *shift = D.subtract_b_dec ? D.b_dec : nullptr;
  const Admission adm{D.activation, D.threshold};
  std::atomic<int64_t> bad_row{INT64_MAX};

  for (int64_t r0 = 0; r0 < n; r0 += rc_max) {
    const int64_t rc = std::min(rc_max, n - r0);
    K.prepare(x + r0 * ldx, ldx, shift, rc, d, D.enc_dtype, operand.data());
    for (int w = 0; w < T; ++w)
      for (int64_t r = 0; r < rc; ++r)
        tk[w * rc_max + r].reset(k, &cand[(size_t(w) * rc_max + r) * cap], cap);

    parallel_for(n_blocks, T, [&](int64_t b, int w) {
      const int64_t f0 = b * fb, nf = std::min(fb, m - f0);
      float *P = &pre[size_t(w) * rc_max * fb];
      // With tasks handed out in turn, this thread's next block is most likely T blocks on.
      const int64_t f_next = b + T < n_blocks && (b + T + 1) * fb <= m ? (b + T) * fb : -1;
      K.dot_block(operand.data(), rc, D.W_enc, D.enc_dtype, D.enc_scales, d, f0, nf, P, fb, tp, f_next);
      const float *be = D.b_enc ? D.b_enc + f0 : nullptr;
      for (int64_t r = 0; r < rc; ++r) {
        TopK &t = tk[w * rc_max + r];
        const float *p = P + r * fb;
        bool nonfinite = false;  // an overflowed pre-activation (finite input): Inf, or NaN from Inf - Inf
        // Groups of kScanGroup pre-activations whose largest is below the Top-K buffer's floor
        // (or not positive, for the ReLU activations) and all finite are skipped without a push.
        for (int64_t j0 = 0; j0 < nf; j0 += kScanGroup) {
          const int64_t j1 = std::min(nf, j0 + kScanGroup);
          if (j1 - j0 == kScanGroup) {
            if (!group_worth_a_look(p + j0, be ? be + j0 : nullptr, t.floor_value(), adm.least())) continue;
          }
          for (int64_t j = j0; j < j1; ++j) {
            const float v = be ? p[j] + be[j] : p[j];
            nonfinite |= !(v - v == 0.f);  // (a NaN is not pushed; the row fails below)
            if (!(v > adm.floor(f0 + j))) continue;
            t.push(v, int32_t(f0 + j));
          }
        }
        if (nonfinite) record_row(bad_row, r0 + r);
      }
    });
    if (bad_row.load() != INT64_MAX) break;

    // Merge: every worker's candidates of a row into worker 0's buffer (TopK keeps the k best).
    parallel_for(rc, T, [&](int64_t r, int) {
      TopK &t0 = tk[r];
      for (int u = 1; u < T; ++u) {
        const TopK &t = tk[u * rc_max + r];
        for (int32_t j = 0; j < t.size(); ++j) t0.push(t.data()[j].v, t.data()[j].i);
      }
      finalize_topk(t0.data(), t0.size(), k, values + (r0 + r) * k, indices + (r0 + r) * k);
    });
  }
  const int64_t br = bad_row.load();
  if (br != INT64_MAX)
    fail(SAEHOOK_ERR_OVERFLOW, "encode: the pre-activations of row " + std::to_string(br) +
                                   " overflow float32 (Inf/NaN)" + overflow_hint(x + br * ldx, d));
}

void preacts(const Sae &s, const float *x, int64_t n, int64_t ldx, float *out, int threads) {
  const saehook_sae_desc &D = s.d;
  if (n == 0) return;
  check_finite(x, n, D.d_model, ldx, "input");
  const cpu::Kernels &K = cpu::active();
  const cpu::Tuning &tp = cpu::tuning();
  std::vector<uint8_t> operand(K.operand_bytes(D.enc_dtype, n, D.d_model));
  K.prepare(x, ldx, D.subtract_b_dec ? D.b_dec : nullptr, n, D.d_model, D.enc_dtype, operand.data());
  const int64_t fb = feature_block(D, n, K, tp), n_blocks = (D.d_sae + fb - 1) / fb;
  const int T = std::max(1, std::min<int>(threads, int(std::min<int64_t>(n_blocks, INT_MAX))));
  parallel_for(n_blocks, T, [&](int64_t b, int) {
    const int64_t f0 = b * fb, nf = std::min(fb, D.d_sae - f0);
    const int64_t f_next = b + T < n_blocks && (b + T + 1) * fb <= D.d_sae ? (b + T) * fb : -1;
    K.dot_block(operand.data(), n, D.W_enc, D.enc_dtype, D.enc_scales, D.d_model, f0, nf, out + f0,
                D.d_sae, tp, f_next);
    if (D.b_enc)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < nf; ++j) out[r * D.d_sae + f0 + j] += D.b_enc[f0 + j];
  });
  // Not checked for Inf/NaN: the dense analysis output shows them as they are (encode refuses).
}

namespace {

// decode without the check of its result: returns the first row that is not finite, or -1.
int64_t decode_rows(const Sae &s, const float *values, const int32_t *indices, int64_t n, int32_t k,
                    float *out, int64_t ldo, int threads) {
  const saehook_sae_desc &D = s.d;
  const int64_t d = D.d_model, m = D.d_sae;
  if (k <= 0) fail(SAEHOOK_ERR_SHAPE, "decode needs k >= 1 entries per row");
  for (int64_t e = 0; e < n * k; ++e) {
    if (indices[e] < -1 || indices[e] >= m)
      fail(SAEHOOK_ERR_INDEX, "feature index " + std::to_string(indices[e]) + " at row " +
                                  std::to_string(e / k) + " is out of range [0, " +
                                  std::to_string(m) + ")");
    if (!std::isfinite(values[e]))
      fail(SAEHOOK_ERR_NAN, "values contain NaN or Inf at row " + std::to_string(e / k));
  }
  const cpu::Kernels &K = cpu::active();
  const cpu::Tuning &tp = cpu::tuning();
  const size_t es = dtype_size(D.dec_dtype);
  const uint8_t *W = static_cast<const uint8_t *>(D.W_dec);

  if (D.dec_layout == SAEHOOK_DEC_ROWS) {
    // One row per task. Splitting a row's columns across threads when rows < threads was
    // measured slower at batch 1 (4096 x 65536 f32, k 100, Zen 5 VM, paired with EmbeddingBag:
    // 1.12-1.14x its time against 1.06-1.07x on one thread): waking a worker costs more than
    // half of 1.6 MB read from L3 saves.
    parallel_for(n, threads, [&](int64_t r, int) {
      float *o = out + r * ldo;
      for (int64_t i = 0; i < d; ++i) o[i] = D.b_dec ? D.b_dec[i] : 0.f;
      K.gather_sum(values + r * k, indices + r * k, k, W, D.dec_dtype, d, o, tp);
    });
  } else {
    // Column layout: feature f is strided by d_sae. Walk the decoder row by row (one model
    // dimension at a time) so each row of W_dec is touched once for all tokens.
    constexpr int64_t kDimBlock = 64;
    const int64_t n_blocks = (d + kDimBlock - 1) / kDimBlock;
    parallel_for(n_blocks, threads, [&](int64_t b, int) {
      const int64_t i0 = b * kDimBlock, i1 = std::min(d, i0 + kDimBlock);
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t *row = W + size_t(i) * m * es;
        for (int64_t r = 0; r < n; ++r) {
          float acc = D.b_dec ? D.b_dec[i] : 0.f;
          for (int32_t j = 0; j < k; ++j) {
            const int32_t f = indices[r * k + j];
            if (f >= 0) acc += values[r * k + j] * load_scalar(row + size_t(f) * es, D.dec_dtype);
          }
          out[r * ldo + i] = acc;
        }
      }
    });
  }
  return first_nonfinite_row(out, n, d, ldo);
}

}  // namespace

void decode(const Sae &s, const float *values, const int32_t *indices, int64_t n, int32_t k,
            float *out, int64_t ldo, int threads) {
  const int64_t br = decode_rows(s, values, indices, n, k, out, ldo, threads);
  if (br >= 0) {
    float vmax = 0.f;
    for (int32_t j = 0; j < k; ++j) vmax = std::max(vmax, std::fabs(values[br * k + j]));
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", double(vmax));
    fail(SAEHOOK_ERR_OVERFLOW, "decode: the reconstruction of row " + std::to_string(br) +
                                   " overflows float32 (Inf/NaN) from finite values (largest |value| " + buf + ")");
  }
}

void reconstruct(const Sae &s, float *h, int64_t n, int64_t ldh, int threads) {
  const int32_t k = s.d.k;
  const int64_t d = s.d.d_model;
  if (n == 0) return;
  // All or nothing: h is rewritten only once every row is known to encode and decode to finite
  // values. Encode everything first (a NaN input or an overflowing pre-activation fails before
  // any row changes; the Top-K of all rows is 8k bytes per row), then decode chunks into scratch
  // to check them, and only then into h (a second decode, k x d_model per row: small next to the
  // encode's d_sae x d_model; a single chunk is copied instead).
  std::vector<float> vals(size_t(n) * k);
  std::vector<int32_t> idx(size_t(n) * k);
  encode(s, h, n, ldh, k, vals.data(), idx.data(), threads);
  const int64_t chunk = std::min<int64_t>(n, 256);
  std::vector<float> tmp(size_t(chunk) * d);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rc = std::min(chunk, n - r0);
    const int64_t br = decode_rows(s, vals.data() + r0 * k, idx.data() + r0 * k, rc, k, tmp.data(), d, threads);
    if (br >= 0)
      fail(SAEHOOK_ERR_OVERFLOW, "reconstruct: the reconstruction of row " + std::to_string(r0 + br) +
                                     " overflows float32 (Inf/NaN)" + overflow_hint(h + (r0 + br) * ldh, d) +
                                     "; h is unchanged");
    if (rc == n) {
      for (int64_t r = 0; r < n; ++r) std::memcpy(h + r * ldh, tmp.data() + r * d, size_t(d) * 4);
      return;
    }
  }
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rc = std::min(chunk, n - r0);
    decode(s, vals.data() + r0 * k, idx.data() + r0 * k, rc, k, h + r0 * ldh, ldh, threads);
  }
}

void decoder_direction(const Sae &s, int32_t feature, bool normalize, float *out) {
  const saehook_sae_desc &D = s.d;
  if (feature < 0 || feature >= D.d_sae)
    fail(SAEHOOK_ERR_INDEX, "feature " + std::to_string(feature) + " is out of range [0, " +
                                std::to_string(D.d_sae) + ")");
  const size_t es = dtype_size(D.dec_dtype);
  const uint8_t *W = static_cast<const uint8_t *>(D.W_dec);
  if (D.dec_layout == SAEHOOK_DEC_ROWS) {
    cpu::active().to_f32(W + size_t(feature) * D.d_model * es, D.dec_dtype, D.d_model, out);
  } else {
    for (int64_t i = 0; i < D.d_model; ++i)
      out[i] = load_scalar(W + (size_t(i) * D.d_sae + feature) * es, D.dec_dtype);
  }
  if (normalize) {
    double ss = 0;
    for (int64_t i = 0; i < D.d_model; ++i) ss += double(out[i]) * out[i];
    if (!(ss > 0))
      fail(SAEHOOK_ERR_INVALID_ARGUMENT,
           "feature " + std::to_string(feature) + " has a zero decoder direction; cannot normalize");
    const float inv = float(1.0 / std::sqrt(ss));
    for (int64_t i = 0; i < D.d_model; ++i) out[i] *= inv;
  }
}

}  // namespace saehook
