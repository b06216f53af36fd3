/*
 * saehook_llama.h — SAE feature capture and steering inside llama.cpp's forward pass.
 *
 * The hook is a ggml_backend_sched_eval_callback (llama_context_params.cb_eval). It asks
 * llama.cpp to stop after each hooked node `l_out-L` (the residual stream after block L), reads
 * the rows with ggml_backend_tensor_get, encodes them with an SAE (capture), applies steering
 * and writes them back with ggml_backend_tensor_set, so every later layer sees the change.
 * It works with any backend (CPU, CUDA, Metal) and any weight type (the residual is f32).
 *
 * It uses no ggml struct layout: only the exported functions in saehook_ggml_api, resolved by
 * the caller from the ggml library the running llama.cpp uses.
 *
 * Five-line integration in a llama.cpp program (see examples/llama_capture.c):
 *
 *   saehook_ggml_api api = SAEHOOK_GGML_API_LINKED;           // needs ggml.h, ggml-backend.h
 *   saehook_llama_hook *hook = saehook_llama_hook_create(&api, llama_model_n_embd(model), llama_model_n_layer(model));
 *   saehook_llama_hook_add(hook, 12, sae, 1, 0, NULL, 0, SAEHOOK_POS_ALL);  // capture layer 12
 *   cparams.cb_eval = saehook_llama_callback; cparams.cb_eval_user_data = hook;
 *   ctx = llama_init_from_model(model, cparams);  // ...decode; then saehook_llama_hook_read()
 *
 * Token identity: the callback sees rows, not tokens. Announce each batch with
 * saehook_llama_hook_announce() before llama_decode so captured rows carry token ids and
 * positions and steering can select prompt or generated positions. Rows arrive in batch order,
 * micro-batch after micro-batch; on the model's last layer only the rows whose logits were
 * requested exist, and they are matched with the announced tokens flagged as outputs.
 */
#ifndef SAEHOOK_LLAMA_H
#define SAEHOOK_LLAMA_H

#include <stdbool.h>

#include "saehook.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

typedef struct {
  const char *(*get_name)(const struct ggml_tensor *t);
  int64_t (*nelements)(const struct ggml_tensor *t);
  int64_t (*nrows)(const struct ggml_tensor *t);
  size_t (*nbytes)(const struct ggml_tensor *t);
  void (*tensor_get)(const struct ggml_tensor *t, void *data, size_t offset, size_t size);
  void (*tensor_set)(struct ggml_tensor *t, const void *data, size_t offset, size_t size);
} saehook_ggml_api;

/* For programs that link ggml directly (include ggml.h and ggml-backend.h first). */
#define SAEHOOK_GGML_API_LINKED \
  {ggml_get_name, ggml_nelements, ggml_nrows, ggml_nbytes, ggml_backend_tensor_get, ggml_backend_tensor_set}

typedef enum { SAEHOOK_POS_ALL = 0, SAEHOOK_POS_PROMPT = 1, SAEHOOK_POS_GENERATED = 2 } saehook_positions;

typedef struct saehook_llama_hook saehook_llama_hook;

/* n_layer tells which block is the last one (whose output holds only the requested rows). */
SAEHOOK_API saehook_llama_hook *saehook_llama_hook_create(const saehook_ggml_api *api, int32_t n_embd,
                                                          int32_t n_layer);
SAEHOOK_API void saehook_llama_hook_destroy(saehook_llama_hook *hook);

/* The callback to put in llama_context_params.cb_eval, with the hook as cb_eval_user_data. */
SAEHOOK_API bool saehook_llama_callback(struct ggml_tensor *t, bool ask, void *user_data);

/* Adds an entry at block `layer`: capture (record the Top-K of every row, k <= 0: the SAE's k)
 * and/or steering items applied to the positions chosen. Returns an id (>= 0) for
 * saehook_llama_hook_remove, or -1 for invalid arguments (layer outside the model, the SAE's
 * d_model != n_embd, a feature out of range). The SAE must outlive the entry;
 * entries of one layer run in the order added. */
SAEHOOK_API int32_t saehook_llama_hook_add(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae,
                                           int32_t capture, int32_t k, const saehook_steer_item *items,
                                           int32_t n_items, saehook_positions positions);
/* Adds an entry that replaces every row at block `layer` by the SAE's reconstruction
 * decode(encode(row)) ("splicing" the SAE in, for evaluation). Returns an id, or -1. */
SAEHOOK_API int32_t saehook_llama_hook_add_reconstruct(saehook_llama_hook *hook, int32_t layer,
                                                       const saehook_sae *sae);
SAEHOOK_API saehook_status saehook_llama_hook_remove(saehook_llama_hook *hook, int32_t id);

/* Describes the tokens of the next llama_decode (in batch order); appended to a queue consumed
 * as rows arrive. outputs[i]: logits requested; generated[i]: a sampled token (else prompt).
 * seq_ids may be NULL (sequence 0); generated may be NULL (all prompt). */
SAEHOOK_API saehook_status saehook_llama_hook_announce(saehook_llama_hook *hook, const int32_t *tokens,
                                                       const int32_t *positions, const int32_t *seq_ids,
                                                       const int8_t *outputs, const int8_t *generated,
                                                       int32_t n);
/* Forgets announced tokens not yet seen (e.g. after an aborted decode). */
SAEHOOK_API void saehook_llama_hook_reset_queue(saehook_llama_hook *hook);

/* Rows captured so far by entry `id`; read them (any pointer may be NULL), then optionally clear. */
SAEHOOK_API int64_t saehook_llama_hook_captured(const saehook_llama_hook *hook, int32_t id);
SAEHOOK_API int32_t saehook_llama_hook_k(const saehook_llama_hook *hook, int32_t id);
SAEHOOK_API saehook_status saehook_llama_hook_read(const saehook_llama_hook *hook, int32_t id, int32_t *tokens,
                                                   int32_t *positions, int32_t *seq_ids, float *values,
                                                   int32_t *indices, float *residuals);
SAEHOOK_API void saehook_llama_hook_clear_captured(saehook_llama_hook *hook, int32_t id);
/* Also keep the raw residual rows of capture entries (n_embd floats per row; for tests/analysis). */
SAEHOOK_API void saehook_llama_hook_keep_residuals(saehook_llama_hook *hook, int32_t keep);

/* Errors inside the callback cannot reach llama.cpp: the first one is kept here (NULL if none)
 * and the hook stops changing tensors until it is cleared. */
SAEHOOK_API const char *saehook_llama_hook_error(const saehook_llama_hook *hook);
SAEHOOK_API void saehook_llama_hook_clear_error(saehook_llama_hook *hook);

#ifdef __cplusplus
}
#endif
#endif /* SAEHOOK_LLAMA_H */
