// The llama.cpp eval-callback hook (see csrc/include/saehook_llama.h for the protocol).
#include "saehook_llama.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../core/steer_formula.hpp"
#include "../core/steer_modes.hpp"
#include "device.hpp"

namespace {

struct Token {
  int32_t token, pos, seq;
  bool output, generated, known;  // known: described by an announcement
};

struct Entry {
  int32_t id, layer;
  int32_t bound_seq;  // the sequence whose rows it touches; -1: every row
  const saehook_sae *sae;
  bool capture, reconstruct;
  int32_t k;  // resolved (> 0)
  std::vector<saehook_steer_item> items;
  std::vector<float> dirs;  // the items' decoder directions (n_items x n_embd), read once at add
  std::map<int, saehook::llama_device::Buffer> ddirs;  // dirs copied to each CUDA device that runs it
  bool needs_encode = false;  // an item reads z_f (clamp, scale, ablate, a condition)
  saehook_positions positions;
  // Conditional steering: conditions are evaluated on every row the entry wants (so latches
  // follow their sequence through unsteered positions). A latch per sequence remembers the
  // position it latched at: a row at or before the sequence's last position means the sequence
  // was rewound (KV cache cut or reset) and the latches set from there on are forgotten.
  bool has_conditions = false;
  struct SeqLatch {
    int32_t last_pos = -1;
    std::vector<int32_t> at;  // per item: the position it latched at, INT_MAX: not latched
  };
  std::map<int32_t, SeqLatch> latch;
  int32_t pos_from = 0, pos_to = -1;  // steer only positions in [pos_from, pos_to) (-1: no end)
  bool record_fired = false;          // keep the rows on which a condition item held
  std::vector<int32_t> f_seq, f_pos;
  std::vector<int8_t> f_gen;
  std::vector<uint8_t> f_bytes;  // n_items per recorded row
  // captured rows
  std::vector<int32_t> tokens, pos, seq, indices;
  std::vector<int8_t> gen;
  std::vector<float> values, residuals;

  bool modifies() const { return reconstruct || !items.empty(); }
  bool wants(const Token &tk) const { return bound_seq < 0 || (tk.known && tk.seq == bound_seq); }
  bool steers(const Token &tk) const {
    if (!wants(tk)) return false;
    const bool windowed = pos_from > 0 || pos_to >= 0;
    if (windowed && !(tk.known && tk.pos >= pos_from && (pos_to < 0 || tk.pos < pos_to))) return false;
    return positions == SAEHOOK_POS_ALL || (positions == SAEHOOK_POS_PROMPT && tk.known && !tk.generated) ||
           (positions == SAEHOOK_POS_GENERATED && tk.known && tk.generated);
  }
  // The rows the entry reads: those it steers, and with conditions every row it wants.
  bool looks_at(const Token &tk) const { return reconstruct || steers(tk) || (has_conditions && wants(tk)); }
};

// The Top-K of some rows of one micro-batch under one (SAE, k), shared by every entry with that
// SAE and k at the layer. ver[r] is the row's version when it was encoded (0: never): a row
// changed by an entry since then (row_ver[r] moved on) is encoded again before it is read.
struct Encoding {
  const saehook_sae *sae;
  int32_t k;
  std::vector<float> v;
  std::vector<int32_t> ix;
  std::vector<uint32_t> ver;
  int id = 0;  // which device storage holds it on the device path
  // Device path: the encode lives in device memory (values then indices, rows x k each) and v/ix
  // are refreshed from it (one transfer) only where the host reads them: captures, conditions.
  float *dv = nullptr;
  int32_t *dix = nullptr;
  bool host_stale = false;
};

// ggml.h's struct ggml_tensor begins `enum ggml_type type; struct ggml_backend_buffer *buffer;`
// (unchanged since ggml's backend buffers, 2023; llama.cpp's own eval callback, common/debug.cpp,
// reads t->buffer the same way). Only this field is read, and only where the caller gave the
// backend-buffer functions but no tensor_buffer accessor.
struct GgmlTensorHead {
  int32_t type;
  void *buffer;
};

// "l_out-12" -> 12; anything else -> -1.
int layer_of(const char *name) {
  if (!name || std::strncmp(name, "l_out-", 6) != 0) return -1;
  char *end = nullptr;
  long v = std::strtol(name + 6, &end, 10);
  return (end && *end == '\0' && end != name + 6) ? int(v) : -1;
}

template <class T>
void append_rows(std::vector<T> &dst, const T *src, size_t width, const std::vector<int64_t> &rows) {
  for (int64_t r : rows) dst.insert(dst.end(), src + size_t(r) * width, src + size_t(r + 1) * width);
}

}  // namespace

struct saehook_llama_hook {
  saehook_ggml_api api{};
  int32_t n_embd = 0, n_layer = 0;
  mutable std::mutex mu;  // the callback runs on llama.cpp's thread, the API on the caller's
  std::vector<std::unique_ptr<Entry>> entries;
  int32_t next_id = 0;
  // The tokens of the announced decode, in batch order. llama.cpp computes them micro-batch
  // after micro-batch, in order; [ub_begin, ub_end) is the one being computed, learnt from the
  // row count of l_out-0 when llama.cpp asks about that node (every node is asked about, its
  // shape already known), so no extra graph split is needed.
  std::vector<Token> batch;
  size_t ub_begin = 0, ub_end = 0;
  bool ub_known = false;
  std::vector<size_t> cursor;  // per layer, for one-block models (l_out-0 is then pruned itself)
  int64_t unannounced = 0;
  // The control vector llama.cpp adds to each block's output (row L for block L), if any.
  std::vector<float> cvec;
  std::vector<uint8_t> cvec_on;
  bool keep_residuals = false;
  std::string error;
  int64_t n_encodes = 0, encoded_rows = 0;  // SAE encodes the callback ran, and their rows
  int64_t process_ns = 0;  // time the callback spent on hooked blocks (saehook_llama_hook_time_ns)
  // scratch, reused across calls
  std::vector<float> buf, src, gather, enc_v;
  std::vector<int32_t> enc_ix;
  std::vector<int64_t> enc_rows;
  std::vector<std::vector<uint8_t>> masks, need_of;
  std::vector<uint32_t> row_ver;
  std::vector<Encoding> encs, encs_in;
  std::vector<Token> toks;
  std::vector<int64_t> known_rows;
  std::vector<uint8_t> act, latch_bytes, latch_scratch;
  std::vector<uint8_t> row_act, row_steer;  // per row of one entry: act (n_items each), steered
  std::vector<uint8_t> dl;                  // device path: encodes downloaded for the host
  std::vector<int32_t> row_list;

  // ---- where each hooked layer runs (host or CUDA device) ----
  saehook_ggml_backend_api bapi{};
  bool have_bapi = false;
  bool device_path = true;  // SAEHOOK_LLAMA_DEVICE=0 or saehook_llama_hook_set_device_path(0): host only
  int emulate = 0;  // tests: the device path on host memory (saehook_llama_hook_emulate_device)
  // Devices whose setup failed (e.g. a GPU this build has no kernels for), with the reason: their
  // layers take the host path.
  std::map<int, std::string> unusable;
  struct Path {
    int device = -2;  // -2: not run yet, -1: host, >= 0: CUDA device, -4: the emulated device
    const void *key = nullptr;  // the buffer type it was decided for
    std::string why = "not run yet";
  };
  std::vector<Path> paths;
  // Device path state: per device a stream and scratch, per (SAE, device) one copy of the SAE
  // (uploaded at first use, dropped when no entry uses the SAE any more), the control vector.
  std::map<int, saehook::llama_device::CtxPtr> ctxs;
  std::map<std::pair<const saehook_sae *, int>, saehook::llama_device::SaePtr> dev_saes;
  uint64_t cvec_version = 1;
  std::map<int, uint64_t> cvec_uploaded;
  saehook::llama_device::Ctx *dctx = nullptr;  // set while one callback runs on a device
  int ddev = -1;

  bool hooked(int layer) const {
    for (const auto &e : entries)
      if (e->layer == layer) return true;
    return false;
  }

  void begin_ubatch(int64_t n_tokens) {
    if (n_layer < 2) return;
    ub_begin = ub_known ? ub_end : 0;
    ub_end = ub_begin + size_t(n_tokens);
    ub_known = true;
  }

  void push(const Token &tk, int64_t r) {
    toks.push_back(tk);
    known_rows.push_back(r);
  }

  void push_unknown(int64_t n) {
    for (int64_t r = 0; r < n; ++r) toks.push_back(Token{-1, -1, -1, false, false, false});
    unannounced += n;
  }

  // The tokens of the n rows arriving at `layer`: the whole micro-batch, or only its output rows
  // where llama.cpp pruned the others (the model's last block, once the logits' rows are picked).
  bool rows_to_tokens(int layer, int64_t n) {
    toks.clear();
    known_rows.clear();
    if (!ub_known) {  // one-block model: rows in order, the block's output rows only
      size_t &c = cursor[size_t(layer)];
      for (int64_t r = 0; r < n; ++r) {
        while (c < batch.size() && !batch[c].output) ++c;
        if (c < batch.size())
          push(batch[c++], r);
        else
          push_unknown(1);
      }
      return true;
    }
    if (ub_begin >= batch.size()) {  // a decode nobody announced
      push_unknown(n);
      return true;
    }
    if (ub_end > batch.size())
      return fail(layer, "llama.cpp decodes more tokens than were announced (" + std::to_string(batch.size()) + ")");
    if (size_t(n) == ub_end - ub_begin) {
      for (int64_t r = 0; r < n; ++r) push(batch[ub_begin + size_t(r)], r);
      return true;
    }
    int64_t r = 0;
    for (size_t i = ub_begin; i < ub_end; ++i)
      if (batch[i].output) {
        if (r < n) push(batch[i], r);
        ++r;
      }
    if (r != n)
      return fail(layer, std::to_string(n) + " rows match neither the micro-batch (" + std::to_string(ub_end - ub_begin) +
                             " tokens) nor its " + std::to_string(r) + " outputs: the announcement does not describe this decode");
    return true;
  }

  bool fail(int layer, const std::string &what) {
    error = "l_out-" + std::to_string(layer) + ": " + what;
    return false;
  }

  // Encodes the rows of `x` selected by `need` (those whose encoding is missing or stale) into
  // e, one encode over all of them (gathered when they are not every row): saehook_encode on the
  // host, or on the device copy of the SAE with the encode left in device memory.
  bool encode_rows(int layer, Encoding &e, const float *x, int64_t nrows, const std::vector<uint8_t> &need) {
    std::vector<int64_t> &rows = enc_rows;
    rows.clear();
    for (int64_t r = 0; r < nrows; ++r)
      if (need[size_t(r)] && e.ver[size_t(r)] != row_ver[size_t(r)]) rows.push_back(r);
    if (rows.empty()) return true;
    const size_t d = size_t(n_embd), k = size_t(e.k), n = rows.size();
    const bool all = int64_t(n) == nrows;
    if (dctx) {
      device_encode(e, x, nrows, all);
    } else {
      if (!all) {
        gather.resize(n * d);
        for (size_t i = 0; i < n; ++i) std::copy_n(x + size_t(rows[i]) * d, d, gather.begin() + std::ptrdiff_t(i * d));
      }
      enc_v.resize(n * k);
      enc_ix.resize(n * k);
      if (saehook_encode(e.sae, all ? x : gather.data(), int64_t(n), n_embd, e.k, enc_v.data(), enc_ix.data(),
                         nullptr) != SAEHOOK_OK)
        return fail(layer, saehook_last_error());
      for (size_t i = 0; i < n; ++i) {
        const size_t r = size_t(rows[i]);
        std::copy_n(enc_v.begin() + std::ptrdiff_t(i * k), k, e.v.begin() + std::ptrdiff_t(r * k));
        std::copy_n(enc_ix.begin() + std::ptrdiff_t(i * k), k, e.ix.begin() + std::ptrdiff_t(r * k));
      }
    }
    ++n_encodes;
    encoded_rows += int64_t(n);
    for (int64_t r : rows) e.ver[size_t(r)] = row_ver[size_t(r)];
    return true;
  }

  // The device half of encode_rows: enc_rows of x (device) into e's device storage.
  void device_encode(Encoding &e, const float *x, int64_t nrows, bool all) {
    namespace dv = saehook::llama_device;
    dv::Ctx &c = *dctx;
    const int64_t d = n_embd, k = e.k, n = int64_t(enc_rows.size());
    if (!e.dv) {
      auto *p = static_cast<uint8_t *>(dv::encoding_storage(c, e.id, size_t(nrows * k) * 8));
      e.dv = reinterpret_cast<float *>(p);
      e.dix = reinterpret_cast<int32_t *>(p + size_t(nrows * k) * 4);
    }
    const dv::Sae &s = device_sae(e.sae);
    if (all) {
      dv::encode(c, s, x, n, e.k, e.dv, e.dix);
    } else {  // gather the rows, encode them, scatter the Top-K back to their rows
      row_list.assign(enc_rows.begin(), enc_rows.end());
      auto *rows = static_cast<int32_t *>(dv::scratch(c, dv::kRows, size_t(n) * 4));
      dv::upload(c, rows, row_list.data(), size_t(n) * 4);
      auto *g = static_cast<float *>(dv::scratch(c, dv::kGather, size_t(n * d) * 4));
      dv::copy_rows(c, g, d, nullptr, x, d, rows, n, d);
      auto *tv = static_cast<float *>(dv::scratch(c, dv::kEncTmp, size_t(n * k) * 8));
      auto *ti = reinterpret_cast<int32_t *>(tv + n * k);
      dv::encode(c, s, g, n, e.k, tv, ti);
      dv::copy_rows(c, e.dv, k, rows, tv, k, nullptr, n, k);
      dv::copy_rows(c, e.dix, k, rows, ti, k, nullptr, n, k);
    }
    e.host_stale = true;
  }

  // The host copy of an encode the device path holds: one transfer of every row's Top-K.
  const Encoding &host_view(Encoding &e, int64_t nrows) {
    if (!dctx || !e.host_stale) return e;
    const size_t half = size_t(nrows) * size_t(e.k);
    dl.resize(half * 8);
    saehook::llama_device::download(*dctx, dl.data(), e.dv, half * 8);
    std::memcpy(e.v.data(), dl.data(), half * 4);
    std::memcpy(e.ix.data(), dl.data() + half * 4, half * 4);
    e.host_stale = false;
    return e;
  }

  // The copy of `sae` on the device running now (uploaded at its first use there).
  const saehook::llama_device::Sae &device_sae(const saehook_sae *sae) {
    auto &p = dev_saes[{sae, ddev}];
    if (!p) p = saehook::llama_device::upload(sae, ddev);
    return *p;
  }

  // Drops the device copies of SAEs that no entry uses any more (their host handles may be freed).
  void drop_unused_copies() {
    for (auto it = dev_saes.begin(); it != dev_saes.end();) {
      const bool used = std::any_of(entries.begin(), entries.end(), [&](const auto &e) { return e->sae == it->first.first; });
      it = used ? std::next(it) : dev_saes.erase(it);
    }
  }

  Encoding &encoding(std::vector<Encoding> &list, const saehook_sae *sae, int32_t k, int64_t nrows) {
    for (auto &e : list)
      if (e.sae == sae && e.k == k) return e;
    list.push_back(Encoding{sae, k, {}, {}, {}});
    Encoding &e = list.back();
    e.v.assign(size_t(nrows) * size_t(k), 0.f);
    e.ix.assign(size_t(nrows) * size_t(k), -1);
    e.ver.assign(size_t(nrows), 0);
    e.id = int(list.size() - 1) + (&list == &encs_in ? 1 << 16 : 0);
    return e;
  }

  // The plan of a steering entry at one micro-batch, shared by both paths: for each row selected
  // by mask, whether the entry steers it (row_steer) and, with conditions, which items apply
  // there (row_act, n_items per row; evaluated with per-sequence latches from enc, the encode of
  // those rows as they are now, and recorded as fired where asked).
  bool plan_rows(int layer, Entry &m, int64_t nrows, const std::vector<uint8_t> &mask, const Encoding *enc) {
    const int32_t n_items = int32_t(m.items.size());
    row_steer.assign(size_t(nrows), 0);
    if (m.has_conditions) row_act.assign(size_t(nrows) * size_t(n_items), 0);
    act.resize(size_t(n_items));
    latch_bytes.resize(size_t(n_items));
    for (int64_t r = 0; r < nrows; ++r) {
      if (!mask[size_t(r)]) continue;
      const Token &tk = toks[size_t(r)];
      const bool steer_row = m.steers(tk);
      row_steer[size_t(r)] = steer_row;
      if (!m.has_conditions) continue;
      const float *v = enc ? &enc->v[size_t(r) * size_t(enc->k)] : nullptr;
      const int32_t *ix = enc ? &enc->ix[size_t(r) * size_t(enc->k)] : nullptr;
      const int32_t k = enc ? enc->k : 0;
      Entry::SeqLatch *L = tk.known ? &m.latch[tk.seq] : nullptr;  // unannounced rows: no memory
      if (L) {
        if (L->at.empty()) L->at.assign(size_t(n_items), INT_MAX);
        if (tk.pos <= L->last_pos)  // rewound: what latched from this position on is gone
          for (int32_t &p : L->at)
            if (p >= tk.pos) p = INT_MAX;
        for (int32_t t = 0; t < n_items; ++t) latch_bytes[size_t(t)] = L->at[size_t(t)] != INT_MAX;
      } else {
        std::fill(latch_bytes.begin(), latch_bytes.end(), 0);
      }
      saehook_steer_state st{latch_bytes.data(), nullptr, 1, nullptr};
      const uint8_t sel = steer_row;
      try {
        saehook::steer::evaluate(m.items.data(), n_items, v, ix, 0, 1, k, &sel, &st, latch_scratch, act.data());
      } catch (const saehook::Error &e) {
        return fail(layer, e.message);
      }
      bool any = false;
      for (int32_t t = 0; t < n_items; ++t) {
        if (L && latch_bytes[size_t(t)] && L->at[size_t(t)] == INT_MAX) L->at[size_t(t)] = tk.pos;
        any |= saehook::steer_is_condition(int(m.items[size_t(t)].op)) && act[size_t(t)];
      }
      if (L) L->last_pos = tk.pos;
      if (any && m.record_fired && tk.known) {
        m.f_seq.push_back(tk.seq);
        m.f_pos.push_back(tk.pos);
        m.f_gen.push_back(tk.generated);
        m.f_bytes.insert(m.f_bytes.end(), act.begin(), act.end());
      }
      if (steer_row) std::copy(act.begin(), act.end(), row_act.begin() + std::ptrdiff_t(size_t(r) * size_t(n_items)));
    }
    return true;
  }

  // Applies a steering entry's items to the rows plan_rows chose: steer::apply_row per row on the
  // host (as saehook_steer does), the steering kernels on the device.
  bool apply_items(int layer, Entry &m, float *h, int64_t nrows, const Encoding *enc) {
    const size_t d = size_t(n_embd);
    const int32_t n_items = int32_t(m.items.size());
    if (dctx) {
      namespace dv = saehook::llama_device;
      dv::Ctx &c = *dctx;
      dv::Buffer &db = m.ddirs[ddev];
      const bool fresh = db.get() == nullptr;
      auto *dirs = static_cast<float *>(db.ensure(std::max<size_t>(m.dirs.size(), 1) * 4, ddev));
      if (fresh) dv::upload(c, dirs, m.dirs.data(), m.dirs.size() * 4);
      const std::vector<uint8_t> &sel = m.has_conditions ? row_act : row_steer;
      auto *dsel = static_cast<uint8_t *>(dv::scratch(c, dv::kMask, sel.size()));
      dv::upload(c, dsel, sel.data(), sel.size());
      dv::steer_rows(c, m.items.data(), n_items, h, nrows, n_embd, m.has_conditions ? nullptr : dsel,
                     m.has_conditions ? dsel : nullptr, enc ? enc->dv : nullptr, enc ? enc->dix : nullptr,
                     enc ? enc->k : 0, dirs);
      return true;
    }
    for (int64_t r = 0; r < nrows; ++r) {
      if (!row_steer[size_t(r)]) continue;
      float *row = h + size_t(r) * d;
      if (!enc && !std::all_of(row, row + d, [](float x) { return std::isfinite(x); }))
        return fail(layer, "the residual of row " + std::to_string(r) + " contains NaN or Inf");
      const float *v = enc ? &enc->v[size_t(r) * size_t(enc->k)] : nullptr;
      const int32_t *ix = enc ? &enc->ix[size_t(r) * size_t(enc->k)] : nullptr;
      const uint8_t *a = m.has_conditions ? &row_act[size_t(r) * size_t(n_items)] : nullptr;
      saehook::steer::apply_row(m.items.data(), n_items, a, v, ix, enc ? enc->k : 0, m.dirs.data(), int64_t(d), row);
    }
    return true;
  }

  // Which path runs `layer` for tensor t: a CUDA device (its ordinal) when the tensor's buffer is
  // ggml-cuda's device buffer "CUDA<n>", this build has CUDA and the data pointer is device
  // memory of that device to saehook's CUDA runtime; else the host (-1). Recorded per layer with
  // the reason (saehook_llama_hook_path).
  int where(int layer, ggml_tensor *t) {
    Path &p = paths[size_t(layer)];
    // The sentence is built only when the decision changes (every micro-batch asks).
    auto host = [&](const void *key, const auto &why) {
      if (p.device != -1 || p.key != key) {
        p.device = -1;
        p.key = key;
        p.why = "host (" + std::string(why()) + ")";
      }
      return -1;
    };
    if (!device_path)
      return host(&device_path, [] { return "the device path is off: SAEHOOK_LLAMA_DEVICE=0 or saehook_llama_hook_set_device_path"; });
    if (!have_bapi)
      return host(&have_bapi, [] { return "the caller gave no ggml backend-buffer functions (saehook_llama_hook_set_backend_api)"; });
    if (emulate) {
      if (p.device != -4) {
        p.device = -4;
        p.key = nullptr;
        p.why = "emulated device (the device path on host memory, for tests: saehook_llama_hook_emulate_device)";
      }
      return emulate == 2 ? saehook::llama_device::kEmulatedBroken : saehook::llama_device::kEmulated;
    }
    ggml_backend_buffer *b = bapi.tensor_buffer ? bapi.tensor_buffer(t)
                                                : static_cast<ggml_backend_buffer *>(
                                                      reinterpret_cast<const GgmlTensorHead *>(t)->buffer);
    if (!b) return host(nullptr, [] { return "the tensor has no backend buffer"; });
    ggml_backend_buffer_type *bt = bapi.buffer_get_type(b);
    const char *name = bt ? bapi.buft_name(bt) : nullptr;
    auto nm = [name] { return std::string(name ? name : "?"); };
    if (bapi.buffer_is_host(b)) return host(bt, [&] { return "buffer type " + nm() + " is host memory"; });
    const int dev = saehook::llama_device::cuda_device_of_buffer_type(name);
    if (dev < 0)
      return host(bt, [&] {
        return "buffer type " + nm() + " is not a CUDA device buffer: read and written with ggml_backend_tensor_get/set";
      });
    if (!saehook::llama_device::built()) return host(bt, [&] { return nm() + ": this saehook build has no CUDA kernels"; });
    std::string why;
    if (!saehook::llama_device::on_device(bapi.get_data(t), dev, why)) return host(bt, [&] { return nm() + ": " + why; });
    if (p.device != dev || p.key != bt) {
      p.device = dev;
      p.key = bt;
      p.why = "device " + std::to_string(dev) + " (" + nm() + ")";
    }
    return dev;
  }

  void process(int layer, ggml_tensor *t) {
    if (!error.empty()) return;
    const int64_t nrows = api.nrows(t), ne = api.nelements(t);
    if (ne != nrows * n_embd || api.nbytes(t) != size_t(ne) * sizeof(float)) {
      fail(layer, "not an f32 tensor of " + std::to_string(n_embd) + "-wide rows (" + std::to_string(ne) +
                      " elements, " + std::to_string(api.nbytes(t)) + " bytes)");
      return;
    }
    if (!rows_to_tokens(layer, nrows)) return;
    const int dev = where(layer, t);
    if (dev != -1 && !device_ready(layer, dev)) {  // the host path, with the reason in the path report
      Path &p = paths[size_t(layer)];
      p.device = -1;
      p.key = nullptr;
      p.why = "host (" + device_name(dev) + " cannot run the device path: " + unusable[dev] + ")";
    } else if (dev != -1) {
      namespace dv = saehook::llama_device;
      try {
        dv::Scope scope(*ctxs[dev]);
        dctx = ctxs[dev].get();
        ddev = dev;
        run(layer, static_cast<float *>(bapi.get_data(t)), nrows);
      } catch (const saehook::Error &e) {
        fail(layer, device_name(dev) + ": " + e.message + kHostHint);
      } catch (const std::exception &e) {
        fail(layer, device_name(dev) + ": " + e.what() + kHostHint);
      }
      dctx = nullptr;
      ddev = -1;
      return;
    }
    buf.resize(size_t(ne));
    api.tensor_get(t, buf.data(), 0, size_t(ne) * sizeof(float));
    if (run(layer, buf.data(), nrows)) api.tensor_set(t, buf.data(), 0, size_t(ne) * sizeof(float));
  }

  // Sets up `dev` for the entries at `layer` before anything changes the residual: its stream and
  // scratch, and the copies of their SAEs. A failure (no kernels for this GPU, out of memory) marks
  // the device unusable: its layers then take the host path, and the path report says why.
  bool device_ready(int layer, int dev) {
    if (unusable.count(dev)) return false;
    try {
      auto &c = ctxs[dev];
      if (!c) c = saehook::llama_device::open(dev);
      ddev = dev;
      for (const auto &e : entries)
        if (e->layer == layer) device_sae(e->sae);
      ddev = -1;
      return true;
    } catch (const saehook::Error &e) {
      unusable[dev] = e.message;
    } catch (const std::exception &e) {
      unusable[dev] = e.what();
    }
    ddev = -1;
    ctxs.erase(dev);
    for (auto it = dev_saes.begin(); it != dev_saes.end();) it = it->first.second == dev ? dev_saes.erase(it) : std::next(it);
    return false;
  }

  static constexpr const char *kHostHint =
      " (saehook_llama_hook_set_device_path(hook, 0), HookedLlama.device_hook = False or SAEHOOK_LLAMA_DEVICE=0 "
      "runs hooked layers on the host path instead)";
  static std::string device_name(int dev) {
    return dev < 0 ? "emulated device" : "CUDA device " + std::to_string(dev);  // kEmulated(Broken) < 0
  }

  // The control vector rows on the running device (uploaded when set_cvec changed them).
  const float *device_cvec(int layer) {
    namespace dv = saehook::llama_device;
    auto *p = static_cast<float *>(dv::scratch(*dctx, dv::kCvec, cvec.size() * 4));
    uint64_t &have = cvec_uploaded[ddev];
    if (have != cvec_version) {
      dv::upload(*dctx, p, cvec.data(), cvec.size() * 4);
      have = cvec_version;
    }
    return p + size_t(layer) * size_t(n_embd);
  }

  // One micro-batch at a hooked block: x holds its nrows residual rows (host memory, or the
  // tensor's device memory while dctx is set). Returns whether x changed (host path: to write back).
  bool run(int layer, float *x, int64_t nrows) {
    namespace dv = saehook::llama_device;
    const size_t ne = size_t(nrows) * size_t(n_embd);
    std::vector<Entry *> caps, mods;
    for (auto &ep : entries) {
      if (ep->layer != layer) continue;
      if (ep->capture) caps.push_back(ep.get());
      if (ep->modifies()) mods.push_back(ep.get());
    }
    const bool cv = cvec_on[size_t(layer)] != 0;
    // Captures read the residual before this block's steering (and control vector): keep a copy
    // of it when something will change x, or when the control vector has to be taken out.
    const float *in = x;
    if (!caps.empty() && (cv || !mods.empty())) {
      if (dctx) {
        auto *s = static_cast<float *>(dv::scratch(*dctx, dv::kSnapshot, ne * 4));
        dv::copy_device(*dctx, s, x, ne * 4);
        if (cv) dv::add_vector(*dctx, s, nrows, n_embd, device_cvec(layer), -1.f);
        in = s;
      } else {
        src.assign(x, x + ne);
        if (cv) {
          const float *v = &cvec[size_t(layer) * n_embd];
          for (int64_t r = 0; r < nrows; ++r)
            for (int32_t j = 0; j < n_embd; ++j) src[size_t(r) * n_embd + j] -= v[j];
        }
        in = src.data();
      }
    }

    // The rows each entry touches (steering: its sequence and positions; capture: its sequence's
    // announced rows).
    masks.resize(mods.size() + caps.size());
    auto mask_of = [&](size_t i, const Entry &e, bool capture) {
      auto &m = masks[i];
      m.assign(size_t(nrows), 0);
      bool any = false;
      for (int64_t r = 0; r < nrows; ++r) {
        const Token &tk = toks[size_t(r)];
        const bool on = capture ? (tk.known && e.wants(tk)) : e.looks_at(tk);
        m[size_t(r)] = on;
        any |= on;
      }
      return any;
    };
    std::vector<bool> mod_on(mods.size()), cap_on(caps.size());
    for (size_t i = 0; i < mods.size(); ++i) mod_on[i] = mask_of(i, *mods[i], false);
    for (size_t i = 0; i < caps.size(); ++i) cap_on[i] = mask_of(mods.size() + i, *caps[i], true);

    // One encode per (SAE, k) of every row some entry of that SAE and k reads, before any change:
    // the captures' rows (when the control vector does not sit between them and x) and the rows
    // of the steering entries that read z_f. Entries that touch disjoint rows (one per sequence)
    // thus share it; a row an earlier entry changed is encoded again when a later one reads it.
    row_ver.assign(size_t(nrows), 1);
    encs.clear();
    encs_in.clear();
    encs.reserve(mods.size() + caps.size());  // no reallocation below: references into them stay valid
    encs_in.reserve(caps.size());
    need_of.clear();
    auto need_rows = [&](const Entry &e, const std::vector<uint8_t> &m) {
      const size_t g = size_t(&encoding(encs, e.sae, e.k, nrows) - encs.data());
      if (need_of.size() <= g) need_of.resize(g + 1, std::vector<uint8_t>(size_t(nrows), 0));
      for (int64_t r = 0; r < nrows; ++r) need_of[g][size_t(r)] |= m[size_t(r)];
    };
    for (size_t i = 0; i < mods.size(); ++i)
      if (mod_on[i] && mods[i]->needs_encode) need_rows(*mods[i], masks[i]);
    if (!cv)
      for (size_t i = 0; i < caps.size(); ++i)
        if (cap_on[i]) need_rows(*caps[i], masks[mods.size() + i]);
    for (size_t g = 0; g < encs.size(); ++g)
      if (!encode_rows(layer, encs[g], x, nrows, need_of[g])) return false;
    if (cv)  // the captures read the residual without the control vector: an encode of its own
      for (size_t i = 0; i < caps.size(); ++i)
        if (cap_on[i]) {
          Encoding &e = encoding(encs_in, caps[i]->sae, caps[i]->k, nrows);
          if (!encode_rows(layer, e, in, nrows, masks[mods.size() + i])) return false;
        }

    // Captures first: they read the encodings made before any change (on the device path copied
    // to the host once per encode, and the residuals only when they are kept).
    const float *in_host = in;
    if (dctx && keep_residuals && std::find(cap_on.begin(), cap_on.end(), true) != cap_on.end()) {
      dl.resize(ne * 4);
      dv::download(*dctx, dl.data(), in, ne * 4);
      in_host = reinterpret_cast<const float *>(dl.data());
      src.assign(in_host, in_host + ne);  // dl is reused by host_view below
      in_host = src.data();
    }
    for (size_t i = 0; i < caps.size(); ++i) {
      if (!cap_on[i]) continue;
      Entry *c = caps[i];
      const Encoding &e = host_view(encoding(cv ? encs_in : encs, c->sae, c->k, nrows), nrows);
      const auto &m = masks[mods.size() + i];
      for (int64_t r = 0; r < nrows; ++r) {
        if (!m[size_t(r)]) continue;
        const size_t k = size_t(c->k);
        c->values.insert(c->values.end(), e.v.begin() + std::ptrdiff_t(size_t(r) * k),
                         e.v.begin() + std::ptrdiff_t(size_t(r + 1) * k));
        c->indices.insert(c->indices.end(), e.ix.begin() + std::ptrdiff_t(size_t(r) * k),
                          e.ix.begin() + std::ptrdiff_t(size_t(r + 1) * k));
        if (keep_residuals)
          c->residuals.insert(c->residuals.end(), in_host + size_t(r) * n_embd, in_host + size_t(r + 1) * n_embd);
        const Token &tk = toks[size_t(r)];
        c->tokens.push_back(tk.token);
        c->pos.push_back(tk.pos);
        c->seq.push_back(tk.seq);
        c->gen.push_back(tk.generated);
      }
    }

    // Device path: rows with NaN/Inf stop every steering kernel (as the host's checks stop the
    // write-back); the encodes and reconstructions refuse them themselves.
    const bool checked = dctx && std::find(mod_on.begin(), mod_on.end(), true) != mod_on.end();
    if (checked) dv::check_finite(*dctx, x, nrows, n_embd);
    bool changed = false;
    for (size_t i = 0; i < mods.size(); ++i) {
      if (!mod_on[i]) continue;
      Entry *m = mods[i];
      if (m->reconstruct) {
        if (dctx) {
          dv::reconstruct(*dctx, device_sae(m->sae), x, nrows);
        } else if (saehook_reconstruct(m->sae, x, nrows, n_embd, nullptr) != SAEHOOK_OK) {
          return fail(layer, saehook_last_error());
        }
        ++n_encodes;
        encoded_rows += nrows;
        for (auto &v : row_ver) ++v;
        changed = true;
        continue;
      }
      Encoding *e = nullptr;
      if (m->needs_encode) {
        e = &encoding(encs, m->sae, m->k, nrows);
        if (!encode_rows(layer, *e, x, nrows, masks[i])) return false;  // only rows changed since
      }
      if (!plan_rows(layer, *m, nrows, masks[i], m->has_conditions && e ? &host_view(*e, nrows) : e)) return false;
      if (!apply_items(layer, *m, x, nrows, e)) return false;
      for (int64_t r = 0; r < nrows; ++r) row_ver[size_t(r)] += masks[i][size_t(r)];
      changed = true;
    }
    if (dctx) {  // llama.cpp's next kernels must see the rows as changed here
      if (checked) {
        const int64_t bad = dv::nonfinite_row(*dctx, n_embd);  // waits for the stream
        if (bad >= 0) return fail(layer, "the residual of row " + std::to_string(bad) + " contains NaN or Inf");
      }
      dv::sync(*dctx);
    }
    return changed;
  }

  Entry *find(int32_t id) const {
    for (const auto &e : entries)
      if (e->id == id) return e.get();
    return nullptr;
  }
};

extern "C" {

saehook_llama_hook *saehook_llama_hook_create(const saehook_ggml_api *api, int32_t n_embd, int32_t n_layer) {
  if (!api || !api->get_name || !api->nelements || !api->nrows || !api->nbytes || !api->tensor_get ||
      !api->tensor_set || n_embd <= 0 || n_layer <= 0)
    return nullptr;
  auto *h = new saehook_llama_hook();
  h->api = *api;
  h->n_embd = n_embd;
  h->n_layer = n_layer;
  h->cursor.assign(size_t(n_layer), 0);
  h->cvec.assign(size_t(n_layer) * size_t(n_embd), 0.f);
  h->cvec_on.assign(size_t(n_layer), 0);
  h->paths.assign(size_t(n_layer), saehook_llama_hook::Path{});
  const char *env = std::getenv("SAEHOOK_LLAMA_DEVICE");
  h->device_path = !(env && std::strcmp(env, "0") == 0);
  return h;
}

void saehook_llama_hook_destroy(saehook_llama_hook *hook) { delete hook; }

bool saehook_llama_callback(struct ggml_tensor *t, bool ask, void *user_data) {
  auto *h = static_cast<saehook_llama_hook *>(user_data);
  if (!h) return !ask;
  const int layer = layer_of(h->api.get_name(t));
  if (layer < 0 || layer >= h->n_layer) return !ask;  // ask: not ours; compute: carry on
  std::lock_guard<std::mutex> lk(h->mu);
  if (ask) {
    if (layer == 0) h->begin_ubatch(h->api.nrows(t));
    return h->hooked(layer);
  }
  if (h->hooked(layer)) {
    const auto t0 = std::chrono::steady_clock::now();
    h->process(layer, t);
    h->process_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  }
  return true;  // false would only skip the rest of the split, never what we want
}

namespace {
int32_t add_entry(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae, bool capture, bool reconstruct,
                  int32_t k, const saehook_steer_item *items, int32_t n_items, saehook_positions positions,
                  int32_t seq) {
  if (!hook || !sae || layer < 0 || layer >= hook->n_layer || n_items < 0 || (n_items && !items) ||
      positions < SAEHOOK_POS_ALL || positions > SAEHOOK_POS_GENERATED || seq < -1)
    return -1;
  saehook_sae_desc d;
  if (saehook_sae_describe(sae, &d) != SAEHOOK_OK || d.d_model != hook->n_embd || d.cuda) return -1;
  auto e = std::make_unique<Entry>();
  e->dirs.resize(size_t(n_items) * size_t(d.d_model));
  try {  // the items' checks and directions are saehook_steer's (steer_modes.cpp)
    const saehook::steer::Plan plan = saehook::steer::check(items, n_items, d.d_sae);
    saehook::steer::directions(*sae, items, n_items, e->dirs.data());
    e->needs_encode = plan.need_encode;
    e->has_conditions = plan.has_conditions;
  } catch (const saehook::Error &) {
    return -1;
  }
  std::lock_guard<std::mutex> lk(hook->mu);
  e->id = hook->next_id++;
  e->layer = layer;
  e->bound_seq = seq;
  e->sae = sae;
  e->capture = capture;
  e->reconstruct = reconstruct;
  e->k = k > 0 ? int32_t(std::min<int64_t>(k, d.d_sae)) : d.k;
  e->items.assign(items, items + n_items);
  e->positions = positions;
  // One-block models map rows with a per-layer cursor: a layer hooked during a decode starts
  // with the next one.
  if (!hook->hooked(layer)) hook->cursor[size_t(layer)] = hook->batch.size();
  hook->entries.push_back(std::move(e));
  return hook->entries.back()->id;
}
}  // namespace

int32_t saehook_llama_hook_add(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae, int32_t capture,
                               int32_t k, const saehook_steer_item *items, int32_t n_items,
                               saehook_positions positions) {
  return add_entry(hook, layer, sae, capture != 0, false, k, items, n_items, positions, -1);
}

int32_t saehook_llama_hook_add_for_seq(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae,
                                       int32_t capture, int32_t k, const saehook_steer_item *items, int32_t n_items,
                                       saehook_positions positions, int32_t seq_id) {
  return add_entry(hook, layer, sae, capture != 0, false, k, items, n_items, positions, seq_id);
}

int32_t saehook_llama_hook_add_reconstruct(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae) {
  return add_entry(hook, layer, sae, false, true, 0, nullptr, 0, SAEHOOK_POS_ALL, -1);
}

saehook_status saehook_llama_hook_remove(saehook_llama_hook *hook, int32_t id) {
  if (!hook) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  auto it = std::find_if(hook->entries.begin(), hook->entries.end(), [&](const auto &e) { return e->id == id; });
  if (it == hook->entries.end()) return SAEHOOK_ERR_INVALID_ARGUMENT;
  hook->entries.erase(it);
  hook->drop_unused_copies();  // the SAE's host handle may be freed next
  return SAEHOOK_OK;
}

saehook_status saehook_llama_hook_announce_batch(saehook_llama_hook *hook, int32_t n_tokens, const int32_t *token,
                                                 const int32_t *pos, int32_t *const *seq_id, const int8_t *logits,
                                                 const int8_t *generated, int32_t pos0, int32_t flags) {
  if (!hook || n_tokens < 0) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->batch.resize(size_t(n_tokens));
  const bool all = (flags & SAEHOOK_BATCH_OUTPUT_ALL) != 0, gen = (flags & SAEHOOK_BATCH_GENERATED) != 0;
  for (int32_t i = 0; i < n_tokens; ++i) {
    // Output rows as llama_batch_allocr decides them: all with embeddings, else the flags,
    // else the last token only.
    const bool out = all || (logits ? logits[i] != 0 : i == n_tokens - 1);
    hook->batch[size_t(i)] = Token{token ? token[i] : -1, pos ? pos[i] : pos0 + i,
                                   seq_id && seq_id[i] ? seq_id[i][0] : 0, out, generated ? generated[i] != 0 : gen,
                                   true};
  }
  std::fill(hook->cursor.begin(), hook->cursor.end(), size_t(0));
  hook->ub_begin = hook->ub_end = 0;
  hook->ub_known = false;
  return SAEHOOK_OK;
}

saehook_status saehook_llama_hook_announce(saehook_llama_hook *hook, int32_t n, const int32_t *tokens,
                                           const int32_t *positions, int32_t pos0, const int32_t *seq_ids,
                                           const int8_t *outputs, const int8_t *generated, int32_t flags) {
  if (!hook || n < 0) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::vector<int32_t *> seq_ptrs;
  if (seq_ids) {
    seq_ptrs.resize(size_t(n));
    for (int32_t i = 0; i < n; ++i) seq_ptrs[size_t(i)] = const_cast<int32_t *>(seq_ids + i);
  }
  return saehook_llama_hook_announce_batch(hook, n, tokens, positions, seq_ids ? seq_ptrs.data() : nullptr, outputs,
                                           generated, pos0, flags);
}

void saehook_llama_hook_reset_queue(saehook_llama_hook *hook) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->batch.clear();
  std::fill(hook->cursor.begin(), hook->cursor.end(), size_t(0));
  hook->ub_begin = hook->ub_end = 0;
  hook->ub_known = false;
}

int64_t saehook_llama_hook_unannounced(const saehook_llama_hook *hook) {
  if (!hook) return 0;
  std::lock_guard<std::mutex> lk(hook->mu);
  return hook->unannounced;
}

void saehook_llama_hook_clear_seq(saehook_llama_hook *hook, int32_t seq_id) {
  // Entries and their captured rows are the caller's to remove and read; the hook keeps no other
  // state per sequence today, so there is nothing else to forget. Taking the lock still orders
  // the call after a decode in flight.
  if (!hook || seq_id < 0) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  for (auto &e : hook->entries) e->latch.erase(seq_id);  // the sequence's latches
}

saehook_status saehook_llama_hook_set_options(saehook_llama_hook *hook, int32_t id, int32_t pos_from, int32_t pos_to,
                                              int32_t record_fired) {
  if (!hook || pos_from < 0 || (pos_to >= 0 && pos_to < pos_from)) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  Entry *e = hook->find(id);
  if (!e) return SAEHOOK_ERR_INVALID_ARGUMENT;
  e->pos_from = pos_from;
  e->pos_to = pos_to < 0 ? -1 : pos_to;
  e->record_fired = record_fired != 0;
  return SAEHOOK_OK;
}

int64_t saehook_llama_hook_take_fired(saehook_llama_hook *hook, int32_t id, int32_t *seq_ids, int32_t *positions,
                                      int8_t *generated, uint8_t *fired, int64_t cap) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  Entry *e = hook->find(id);
  if (!e) return -1;
  const int64_t n = int64_t(e->f_seq.size());
  if (cap <= 0) return n;
  const int64_t m = std::min(n, cap);
  const size_t w = e->items.size();
  if (seq_ids) std::copy_n(e->f_seq.begin(), m, seq_ids);
  if (positions) std::copy_n(e->f_pos.begin(), m, positions);
  if (generated) std::copy_n(e->f_gen.begin(), m, generated);
  if (fired) std::copy_n(e->f_bytes.begin(), size_t(m) * w, fired);
  e->f_seq.erase(e->f_seq.begin(), e->f_seq.begin() + m);
  e->f_pos.erase(e->f_pos.begin(), e->f_pos.begin() + m);
  e->f_gen.erase(e->f_gen.begin(), e->f_gen.begin() + m);
  e->f_bytes.erase(e->f_bytes.begin(), e->f_bytes.begin() + std::ptrdiff_t(size_t(m) * w));
  return m;
}

int32_t saehook_llama_hook_entry_ids(const saehook_llama_hook *hook, int32_t *ids, int32_t cap) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  const int32_t n = int32_t(hook->entries.size());
  for (int32_t i = 0; i < n && i < cap && ids; ++i) ids[i] = hook->entries[size_t(i)]->id;
  return n;
}

int64_t saehook_llama_hook_encode_count(const saehook_llama_hook *hook, int64_t *rows) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  if (rows) *rows = hook->encoded_rows;
  return hook->n_encodes;
}

int64_t saehook_llama_hook_time_ns(const saehook_llama_hook *hook) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  return hook->process_ns;
}

saehook_status saehook_llama_hook_set_cvec(saehook_llama_hook *hook, const float *data, size_t len, int32_t n_embd,
                                           int32_t il_start, int32_t il_end) {
  if (!hook) return SAEHOOK_ERR_INVALID_ARGUMENT;
  if (data && n_embd != hook->n_embd) return SAEHOOK_ERR_SHAPE;
  std::lock_guard<std::mutex> lk(hook->mu);
  std::fill(hook->cvec.begin(), hook->cvec.end(), 0.f);
  std::fill(hook->cvec_on.begin(), hook->cvec_on.end(), 0);
  ++hook->cvec_version;  // the device copies are stale
  if (!data) return SAEHOOK_OK;
  const size_t d = size_t(n_embd);
  // As llama_adapter_cvec: no row for block 0; row il - 1 for block il within [il_start, il_end].
  for (int32_t il = std::max(1, il_start); il <= il_end && il < hook->n_layer; ++il) {
    const size_t off = d * size_t(il - 1);
    if (off + d > len) break;
    const float *row = data + off;
    if (std::all_of(row, row + d, [](float x) { return x == 0.f; })) continue;
    std::copy(row, row + d, hook->cvec.begin() + std::ptrdiff_t(size_t(il) * d));
    hook->cvec_on[size_t(il)] = 1;
  }
  return SAEHOOK_OK;
}

int64_t saehook_llama_hook_captured(const saehook_llama_hook *hook, int32_t id) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  const Entry *e = hook->find(id);
  return e ? int64_t(e->tokens.size()) : -1;
}

int32_t saehook_llama_hook_k(const saehook_llama_hook *hook, int32_t id) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  const Entry *e = hook->find(id);
  return e ? e->k : -1;
}

saehook_status saehook_llama_hook_read(const saehook_llama_hook *hook, int32_t id, int32_t *tokens, int32_t *positions,
                                       int32_t *seq_ids, int8_t *generated, float *values, int32_t *indices,
                                       float *residuals) {
  if (!hook) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  const Entry *e = hook->find(id);
  if (!e) return SAEHOOK_ERR_INVALID_ARGUMENT;
  auto copy = [](auto *dst, const auto &src) {
    if (dst && !src.empty()) std::memcpy(dst, src.data(), src.size() * sizeof(src[0]));
  };
  copy(tokens, e->tokens);
  copy(positions, e->pos);
  copy(seq_ids, e->seq);
  copy(generated, e->gen);
  copy(values, e->values);
  copy(indices, e->indices);
  copy(residuals, e->residuals);
  return SAEHOOK_OK;
}

void saehook_llama_hook_clear_captured(saehook_llama_hook *hook, int32_t id) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  Entry *e = hook->find(id);
  if (!e) return;
  for (auto *v : {&e->tokens, &e->pos, &e->seq, &e->indices}) v->clear();
  e->gen.clear();
  e->values.clear();
  e->residuals.clear();
}

void saehook_llama_hook_keep_residuals(saehook_llama_hook *hook, int32_t keep) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->keep_residuals = keep != 0;
}

saehook_status saehook_llama_hook_set_backend_api(saehook_llama_hook *hook, const saehook_ggml_backend_api *api) {
  if (!hook) return SAEHOOK_ERR_INVALID_ARGUMENT;
  if (api && (!api->buffer_is_host || !api->buffer_get_type || !api->buft_name || !api->get_data))
    return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->bapi = api ? *api : saehook_ggml_backend_api{};
  hook->have_bapi = api != nullptr;
  return SAEHOOK_OK;
}

void saehook_llama_hook_set_device_path(saehook_llama_hook *hook, int32_t enable) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->device_path = enable != 0;
}

int32_t saehook_llama_hook_path(const saehook_llama_hook *hook, int32_t layer, char *why, size_t cap) {
  if (!hook) return -3;
  std::lock_guard<std::mutex> lk(hook->mu);
  if (layer < 0 || layer >= hook->n_layer) return -3;
  const auto &p = hook->paths[size_t(layer)];
  if (why && cap) {
    const size_t n = std::min(cap - 1, p.why.size());
    std::memcpy(why, p.why.data(), n);
    why[n] = '\0';
  }
  return p.device;
}

void saehook_llama_hook_emulate_device(saehook_llama_hook *hook, int32_t enable) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->emulate = enable == 2 ? 2 : enable != 0;
  hook->unusable.clear();
}

int32_t saehook_llama_hook_device_copies(const saehook_llama_hook *hook, int64_t *bytes) {
  if (!hook) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  int64_t total = 0;
  for (const auto &kv : hook->dev_saes) total += int64_t(saehook::llama_device::bytes(*kv.second));
  if (bytes) *bytes = total;
  return int32_t(hook->dev_saes.size());
}

int32_t saehook_llama_buffer_type_device(const char *name) {
  return saehook::llama_device::cuda_device_of_buffer_type(name);
}

int32_t saehook_llama_device_path_built(void) { return saehook::llama_device::built() ? 1 : 0; }

const char *saehook_llama_hook_error(const saehook_llama_hook *hook) {
  return hook && !hook->error.empty() ? hook->error.c_str() : nullptr;
}

void saehook_llama_hook_clear_error(saehook_llama_hook *hook) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->error.clear();
}

}  // extern "C"
