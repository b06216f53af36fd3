// The llama.cpp eval-callback hook (see csrc/include/saehook_llama.h).
#include "saehook_llama.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Token {
  int32_t token, pos, seq;
  bool output, generated;
};

struct Entry {
  int32_t id, layer;
  const saehook_sae *sae;
  bool capture, reconstruct;
  int32_t k;
  std::vector<saehook_steer_item> items;
  saehook_positions positions;
  // captured rows
  std::vector<int32_t> tokens, pos, seq, indices;
  std::vector<float> values, residuals;
};

// "l_out-12" -> 12; anything else -> -1.
int layer_of(const char *name) {
  if (!name || std::strncmp(name, "l_out-", 6) != 0) return -1;
  char *end = nullptr;
  long v = std::strtol(name + 6, &end, 10);
  return (end && *end == '\0' && end != name + 6) ? int(v) : -1;
}

}  // namespace

struct saehook_llama_hook {
  saehook_ggml_api api{};
  int32_t n_embd = 0, n_layer = 0;
  std::mutex mu;
  std::vector<std::unique_ptr<Entry>> entries;
  int32_t next_id = 0;
  // Announced tokens not yet consumed by every hooked layer: queue[i] is token base + i.
  std::vector<Token> queue;
  int64_t base = 0, end = 0;
  std::vector<int64_t> cursor;  // per layer: absolute index of its next token
  bool keep_residuals = false;
  std::string error;
  std::vector<float> buf, vals;
  std::vector<int32_t> idx;
  std::vector<uint8_t> mask;

  bool hooked(int layer) const {
    for (const auto &e : entries)
      if (e->layer == layer) return true;
    return false;
  }

  // Drops tokens every hooked layer has consumed.
  void trim() {
    int64_t lo = end;
    for (const auto &e : entries) lo = std::min(lo, cursor[e->layer]);
    if (lo > base) {
      queue.erase(queue.begin(), queue.begin() + (lo - base));
      base = lo;
    }
  }

  // The tokens of the next n rows at `layer` (unknown rows get token -1).
  void rows_to_tokens(int layer, int64_t n, std::vector<Token> &out) {
    out.clear();
    int64_t &c = cursor[layer];
    const bool last = layer == n_layer - 1;
    for (int64_t r = 0; r < n; ++r) {
      if (last)  // only rows whose logits were requested exist after the output selection
        while (c < end && !queue[c - base].output) ++c;
      if (c < end)
        out.push_back(queue[c++ - base]);
      else
        out.push_back(Token{-1, -1, -1, false, false});
    }
  }

  void process(int layer, ggml_tensor *t) {
    if (!error.empty()) return;
    const int64_t nrows = api.nrows(t), ne = api.nelements(t);
    if (ne != nrows * n_embd || api.nbytes(t) != size_t(ne) * 4) {
      error = "l_out-" + std::to_string(layer) + " is not an f32 tensor of " + std::to_string(n_embd) +
              "-wide rows (" + std::to_string(ne) + " elements, " + std::to_string(api.nbytes(t)) + " bytes)";
      return;
    }
    std::vector<Token> toks;
    rows_to_tokens(layer, nrows, toks);
    buf.resize(size_t(ne));
    api.tensor_get(t, buf.data(), 0, size_t(ne) * 4);
    bool changed = false;
    for (auto &ep : entries) {
      Entry &e = *ep;
      if (e.layer != layer) continue;
      mask.assign(size_t(nrows), 0);
      bool any = false;
      for (int64_t r = 0; r < nrows; ++r) {
        const Token &tk = toks[r];
        const bool on = e.positions == SAEHOOK_POS_ALL ||
                        (e.positions == SAEHOOK_POS_PROMPT && tk.token >= 0 && !tk.generated) ||
                        (e.positions == SAEHOOK_POS_GENERATED && tk.generated);
        mask[r] = on;
        any |= on;
      }
      if (e.reconstruct) {
        if (saehook_reconstruct(e.sae, buf.data(), nrows, n_embd, nullptr) != SAEHOOK_OK) {
          error = "layer " + std::to_string(layer) + ": " + saehook_last_error();
          return;
        }
        changed = true;
        continue;
      }
      const bool steer = !e.items.empty() && any;
      if (!steer && !e.capture) continue;
      if (e.capture && keep_residuals) e.residuals.insert(e.residuals.end(), buf.begin(), buf.end());
      float *v = nullptr;
      int32_t *ix = nullptr;
      if (e.capture) {
        vals.resize(size_t(nrows) * e.k);
        idx.resize(size_t(nrows) * e.k);
        v = vals.data();
        ix = idx.data();
      }
      saehook_status st = saehook_steer(e.sae, buf.data(), nrows, n_embd, steer ? e.items.data() : nullptr,
                                        steer ? int32_t(e.items.size()) : 0, mask.data(), e.k, v, ix, nullptr);
      if (st != SAEHOOK_OK) {
        error = "layer " + std::to_string(layer) + ": " + saehook_last_error();
        return;
      }
      changed |= steer;
      if (e.capture) {
        e.values.insert(e.values.end(), vals.begin(), vals.end());
        e.indices.insert(e.indices.end(), idx.begin(), idx.end());
        for (const Token &tk : toks) {
          e.tokens.push_back(tk.token);
          e.pos.push_back(tk.pos);
          e.seq.push_back(tk.seq);
        }
      }
    }
    if (changed) api.tensor_set(t, buf.data(), 0, size_t(ne) * 4);
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
  return h;
}

void saehook_llama_hook_destroy(saehook_llama_hook *hook) { delete hook; }

bool saehook_llama_callback(struct ggml_tensor *t, bool ask, void *user_data) {
  auto *h = static_cast<saehook_llama_hook *>(user_data);
  if (!h) return false;
  const int layer = layer_of(h->api.get_name(t));
  if (layer < 0 || layer >= h->n_layer) return false;
  std::lock_guard<std::mutex> lk(h->mu);
  if (ask) return h->hooked(layer);
  if (h->hooked(layer)) h->process(layer, t);
  return true;  // false would only skip the rest of the split, never what we want
}

namespace {
int32_t add_entry(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae, bool capture, bool reconstruct,
                  int32_t k, const saehook_steer_item *items, int32_t n_items, saehook_positions positions) {
  if (!hook || !sae || layer < 0 || layer >= hook->n_layer || n_items < 0 || (n_items && !items) ||
      positions < SAEHOOK_POS_ALL || positions > SAEHOOK_POS_GENERATED)
    return -1;
  saehook_sae_desc d;
  if (saehook_sae_describe(sae, &d) != SAEHOOK_OK || d.d_model != hook->n_embd) return -1;
  for (int32_t i = 0; i < n_items; ++i)
    if (items[i].feature < 0 || items[i].feature >= d.d_sae) return -1;
  std::lock_guard<std::mutex> lk(hook->mu);
  auto e = std::make_unique<Entry>();
  e->id = hook->next_id++;
  e->layer = layer;
  e->sae = sae;
  e->capture = capture;
  e->reconstruct = reconstruct;
  e->k = k > 0 ? std::min<int32_t>(k, int32_t(d.d_sae)) : d.k;
  e->items.assign(items, items + n_items);
  e->positions = positions;
  if (!hook->hooked(layer)) hook->cursor[layer] = hook->end;  // starts with the next decode
  hook->entries.push_back(std::move(e));
  return hook->entries.back()->id;
}
}  // namespace

int32_t saehook_llama_hook_add(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae, int32_t capture,
                               int32_t k, const saehook_steer_item *items, int32_t n_items,
                               saehook_positions positions) {
  return add_entry(hook, layer, sae, capture != 0, false, k, items, n_items, positions);
}

int32_t saehook_llama_hook_add_reconstruct(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae) {
  return add_entry(hook, layer, sae, false, true, 0, nullptr, 0, SAEHOOK_POS_ALL);
}

saehook_status saehook_llama_hook_remove(saehook_llama_hook *hook, int32_t id) {
  if (!hook) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  auto it = std::find_if(hook->entries.begin(), hook->entries.end(), [&](const auto &e) { return e->id == id; });
  if (it == hook->entries.end()) return SAEHOOK_ERR_INVALID_ARGUMENT;
  hook->entries.erase(it);
  hook->trim();
  return SAEHOOK_OK;
}

saehook_status saehook_llama_hook_announce(saehook_llama_hook *hook, const int32_t *tokens, const int32_t *positions,
                                           const int32_t *seq_ids, const int8_t *outputs, const int8_t *generated,
                                           int32_t n) {
  if (!hook || n < 0 || (n && (!tokens || !positions || !outputs))) return SAEHOOK_ERR_INVALID_ARGUMENT;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->trim();
  for (int32_t i = 0; i < n; ++i)
    hook->queue.push_back(Token{tokens[i], positions[i], seq_ids ? seq_ids[i] : 0, outputs[i] != 0,
                                generated ? generated[i] != 0 : false});
  hook->end += n;
  // Layers not hooked follow the end of the queue so a later hook starts at the next token.
  for (int32_t l = 0; l < hook->n_layer; ++l)
    if (!hook->hooked(l)) hook->cursor[l] = hook->end;
  return SAEHOOK_OK;
}

void saehook_llama_hook_reset_queue(saehook_llama_hook *hook) {
  if (!hook) return;
  std::lock_guard<std::mutex> lk(hook->mu);
  hook->base = hook->end;
  hook->queue.clear();
  std::fill(hook->cursor.begin(), hook->cursor.end(), hook->end);
}

int64_t saehook_llama_hook_captured(const saehook_llama_hook *hook, int32_t id) {
  const Entry *e = hook ? hook->find(id) : nullptr;
  return e ? int64_t(e->tokens.size()) : -1;
}

int32_t saehook_llama_hook_k(const saehook_llama_hook *hook, int32_t id) {
  const Entry *e = hook ? hook->find(id) : nullptr;
  return e ? e->k : -1;
}

saehook_status saehook_llama_hook_read(const saehook_llama_hook *hook, int32_t id, int32_t *tokens, int32_t *positions,
                                       int32_t *seq_ids, float *values, int32_t *indices, float *residuals) {
  const Entry *e = hook ? hook->find(id) : nullptr;
  if (!e) return SAEHOOK_ERR_INVALID_ARGUMENT;
  auto copy = [](auto *dst, const auto &src) {
    if (dst && !src.empty()) std::memcpy(dst, src.data(), src.size() * sizeof(src[0]));
  };
  copy(tokens, e->tokens);
  copy(positions, e->pos);
  copy(seq_ids, e->seq);
  copy(values, e->values);
  copy(indices, e->indices);
  copy(residuals, e->residuals);
  return SAEHOOK_OK;
}

void saehook_llama_hook_clear_captured(saehook_llama_hook *hook, int32_t id) {
  Entry *e = hook ? hook->find(id) : nullptr;
  if (!e) return;
  for (auto *v : {&e->tokens, &e->pos, &e->seq, &e->indices}) v->clear();
  e->values.clear();
  e->residuals.clear();
}

void saehook_llama_hook_keep_residuals(saehook_llama_hook *hook, int32_t keep) {
  if (hook) hook->keep_residuals = keep != 0;
}

const char *saehook_llama_hook_error(const saehook_llama_hook *hook) {
  return hook && !hook->error.empty() ? hook->error.c_str() : nullptr;
}

void saehook_llama_hook_clear_error(saehook_llama_hook *hook) {
  if (hook) hook->error.clear();
}

}  // extern "C"
