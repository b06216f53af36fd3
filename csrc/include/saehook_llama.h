/*
 * saehook_llama.h — SAE feature capture and steering inside llama.cpp's forward pass.
 *
 * The hook is a ggml_backend_sched_eval_callback (llama_context_params.cb_eval). It asks
 * llama.cpp to stop after each hooked node `l_out-L` (the residual stream after block L), reads
 * the rows with ggml_backend_tensor_get, encodes them with an SAE (capture), applies steering
 * and writes them back with ggml_backend_tensor_set, so every later layer sees the change.
 * It works with any backend (CPU, CUDA, Metal) and any weight type (the residual is f32). Where
 * the residual is in a CUDA device buffer and libsaehook has CUDA, it runs on the device instead,
 * without the host round trip (see "GPU offload: the device path" below).
 *
 * It uses no ggml struct layout: only the exported functions in saehook_ggml_api, taken by the
 * caller from the ggml library the running llama.cpp uses (SAEHOOK_GGML_API_LINKED when the
 * program links ggml itself).
 *
 * Five-line integration in a llama.cpp program (see examples/llama_capture.c):
 *
 *   saehook_ggml_api api = SAEHOOK_GGML_API_LINKED;           // needs ggml.h, ggml-backend.h
 *   saehook_llama_hook *hook = saehook_llama_hook_create(&api, llama_model_n_embd(model), llama_model_n_layer(model));
 *   int id = saehook_llama_hook_add(hook, 12, sae, 1, 0, NULL, 0, SAEHOOK_POS_ALL);  // capture block 12
 *   cparams.cb_eval = saehook_llama_callback; cparams.cb_eval_user_data = hook;       // then create the context
 *   SAEHOOK_LLAMA_ANNOUNCE(hook, batch, n_past, 0); llama_decode(ctx, batch);  // per decode; then saehook_llama_hook_read()
 *
 * Token identity. The callback sees rows, not tokens: announce each batch right before its
 * llama_decode (SAEHOOK_LLAMA_ANNOUNCE or saehook_llama_hook_announce) so captured rows carry
 * token ids, positions and sequence ids, and steering can select prompt or generated tokens.
 * An announcement describes exactly the next decode and replaces whatever the previous one left.
 * Rows arrive in batch order, micro-batch (n_ubatch) after micro-batch; the hook learns each
 * micro-batch's size from l_out-0 when llama.cpp asks about that node. A block may hold only
 * the rows whose outputs were requested (the last block, once llama.cpp has picked the logits'
 * rows): the row count tells, and rows that fit neither the micro-batch nor its announced
 * outputs are an error (saehook_llama_hook_error), never silently mislabelled. Rows no
 * announcement describes (e.g. a warm-up decode) are steered by SAEHOOK_POS_ALL entries but
 * never captured (saehook_llama_hook_unannounced counts them).
 * Several sequences in one batch. Every entry may be bound to one sequence
 * (saehook_llama_hook_add_for_seq): it then steers and captures only the rows announced with
 * that sequence id, so one decode can serve sequences with different steering. The hook maps
 * rows to tokens by assuming llama.cpp computes them in batch order, which holds when
 *   - the context has one KV stream and no recurrent state (a transformer model with
 *     llama_context_params.kv_unified, or n_seq_max = 1): llama_batch_allocr::split_simple cuts
 *     the batch into consecutive runs; any batch;
 *   - otherwise (one KV stream per sequence, or a recurrent/hybrid model such as qwen35 or
 *     qwen35moe, whose memory splits with split_equal, or split_seq when every token is an
 *     output), for a batch that holds every sequence as ONE run of consecutive tokens, each
 *     with one sequence id, all runs of the same length, and, when that length is above one,
 *     all of the batch in one micro-batch (n_ubatch rows); unless the split is non-sequential
 *     (a hybrid model with kv_unified), sequence ids increase in batch order. Why: split_equal
 *     picks the sequence sets in batch order (non-sequential), or, sequential, the first
 *     unused token's and then those whose id is the last one taken + 1, takes the same number
 *     of tokens of each (the fewest any has left, within n_ubatch) and concatenates them set
 *     by set; with equal runs in one micro-batch that is every run whole, in batch order (one
 *     token per sequence: a consecutive run of the batch per micro-batch). split_seq takes one
 *     sequence's run at a time. Counter-examples, checked in tests/test_llama_sequences.py:
 *     ids [0, 2, 1] (sequential) come as [0, 1] then [2]; a prompt of several tokens next to
 *     a shorter one is interleaved with it (the same number of tokens of each per
 *     micro-batch); equal runs over two micro-batches come part by part. So on such contexts
 *     continuous batching decodes the generation steps (one token per sequence) together and
 *     the prompt chunks together in equal lengths.
 * HookedLlama.announce/announce_batch refuse other multi-sequence batches on such contexts.
 *
 * Order at one block: steering and reconstruct entries run in the order added; capture entries
 * record the residual as it was before them (and before a control vector announced with
 * saehook_llama_hook_set_cvec), i.e. what the model computed at that block.
 * Shared encodes: at one block, every capture and clamp/scale/ablate entry that uses the same SAE
 * and the same k reads ONE encode, per micro-batch, of the rows any of them needs (8 sequences
 * with 8 different clamps cost one encode, not eight); a row that an earlier entry changed is
 * encoded again before a later entry with the same SAE reads it, so the order above holds.
 * saehook_llama_hook_encode_count tells how many encodes ran.
 *
 * Thread safety: the callback and the calls below lock the hook; one hook per llama_context.
 */
#ifndef SAEHOOK_LLAMA_H
#define SAEHOOK_LLAMA_H

#include <stdbool.h>
#include <stddef.h>

#include "saehook.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

/* The ggml functions the hook calls (exported by ggml-base in every llama.cpp build). */
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

/* Flags of an announced batch. */
enum {
  SAEHOOK_BATCH_GENERATED = 1,  /* the tokens were sampled (else: prompt) */
  SAEHOOK_BATCH_OUTPUT_ALL = 2  /* every token is an output (a context with embeddings on) */
};

typedef struct saehook_llama_hook saehook_llama_hook;

/* n_layer tells which block is the last one (whose output holds only the requested rows). */
SAEHOOK_API saehook_llama_hook *saehook_llama_hook_create(const saehook_ggml_api *api, int32_t n_embd,
                                                          int32_t n_layer);
/* Destroy after the llama_context that uses it. */
SAEHOOK_API void saehook_llama_hook_destroy(saehook_llama_hook *hook);

/* The callback to put in llama_context_params.cb_eval, with the hook as cb_eval_user_data. */
SAEHOOK_API bool saehook_llama_callback(struct ggml_tensor *t, bool ask, void *user_data);

/* Adds an entry at block `layer`: capture (record the Top-K of every announced row, k <= 0: the
 * SAE's k; k is also the Top-K that clamp/scale/ablate read) and/or steering items applied to
 * the positions chosen. Returns an id (>= 0) for saehook_llama_hook_remove, or -1 for invalid
 * arguments (layer outside the model, the SAE's d_model != n_embd, a feature out of range).
 * The SAE must outlive the entry. Capture starts with the next announced decode. */
SAEHOOK_API int32_t saehook_llama_hook_add(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae,
                                           int32_t capture, int32_t k, const saehook_steer_item *items,
                                           int32_t n_items, saehook_positions positions);
/* The same for the rows announced with sequence id seq_id only (seq_id -1: every row, which is
 * saehook_llama_hook_add). Rows no announcement describes are never touched by such an entry. */
SAEHOOK_API int32_t saehook_llama_hook_add_for_seq(saehook_llama_hook *hook, int32_t layer, const saehook_sae *sae,
                                                   int32_t capture, int32_t k, const saehook_steer_item *items,
                                                   int32_t n_items, saehook_positions positions, int32_t seq_id);
/* Adds an entry that replaces every row at block `layer` by the SAE's reconstruction
 * decode(encode(row)) ("splicing" the SAE in, for evaluation). Returns an id, or -1. */
SAEHOOK_API int32_t saehook_llama_hook_add_reconstruct(saehook_llama_hook *hook, int32_t layer,
                                                       const saehook_sae *sae);
SAEHOOK_API saehook_status saehook_llama_hook_remove(saehook_llama_hook *hook, int32_t id);
/* The ids of the live entries (up to cap of them written to ids); returns how many there are. */
SAEHOOK_API int32_t saehook_llama_hook_entry_ids(const saehook_llama_hook *hook, int32_t *ids, int32_t cap);
/* Forgets the hook's per-sequence state of seq_id (call it when a sequence ends, before its id
 * is reused). Entries bound to it stay until removed and their captured rows until read; the
 * hook keeps no other per-sequence state in this version, so this only orders the call after a
 * decode in flight. */
SAEHOOK_API void saehook_llama_hook_clear_seq(saehook_llama_hook *hook, int32_t seq_id);
/* SAE encodes (and reconstructions) the callback has run so far, and in *rows (may be NULL)
 * the rows they covered: a way to check that entries share their encodes. */
SAEHOOK_API int64_t saehook_llama_hook_encode_count(const saehook_llama_hook *hook, int64_t *rows);
/* Nanoseconds the callback has spent so far on hooked blocks (reading their rows, encodes,
 * steering write-back; on the device path the host's side of it, kernels launched not awaited):
 * the hook's own share of a decode, measured where it runs. -1 for a NULL hook. */
SAEHOOK_API int64_t saehook_llama_hook_time_ns(const saehook_llama_hook *hook);

/* Steering modes (saehook.h API version 2). Entries take every steering item, conditions and
 * latches included. Conditions are evaluated on every row an entry wants (its sequence, any
 * position); a latch is kept per entry and sequence id and holds from the position it latched
 * at: a row at or before the sequence's last evaluated position (the KV cache was cut back or
 * reset) forgets the latches set from that position on; saehook_llama_hook_clear_seq forgets
 * them all. */
/* Options of entry `id`: steer only rows at absolute positions pos_from <= pos < pos_to (pos_to
 * -1: no end; with the entry's saehook_positions); record_fired: keep each announced row on
 * which one of its condition items held, for saehook_llama_hook_take_fired. */
SAEHOOK_API saehook_status saehook_llama_hook_set_options(saehook_llama_hook *hook, int32_t id, int32_t pos_from,
                                                          int32_t pos_to, int32_t record_fired);
/* The recorded rows of entry `id`, oldest first: cap <= 0 returns how many there are; else up
 * to cap of them are written (seq_ids, positions, generated: one per row; fired: n_items bytes
 * per row, as saehook_steer_state.fired; any pointer may be NULL), forgotten, and counted in
 * the return value (-1: no such entry). */
SAEHOOK_API int64_t saehook_llama_hook_take_fired(saehook_llama_hook *hook, int32_t id, int32_t *seq_ids,
                                                  int32_t *positions, int8_t *generated, uint8_t *fired, int64_t cap);

/* Describes the tokens of the next llama_decode, in batch order (replacing any earlier
 * announcement). positions NULL: pos0, pos0 + 1, ...; seq_ids NULL: sequence 0; outputs NULL:
 * only the last token is an output (llama.cpp's default), unless SAEHOOK_BATCH_OUTPUT_ALL;
 * generated NULL: every token as SAEHOOK_BATCH_GENERATED says, else one flag per token (one
 * batch may hold a prompt chunk of one sequence and sampled tokens of others);
 * tokens NULL: an embeddings batch (token ids recorded as -1). flags: SAEHOOK_BATCH_*. */
SAEHOOK_API saehook_status saehook_llama_hook_announce(saehook_llama_hook *hook, int32_t n, const int32_t *tokens,
                                                       const int32_t *positions, int32_t pos0,
                                                       const int32_t *seq_ids, const int8_t *outputs,
                                                       const int8_t *generated, int32_t flags);
/* The same for a llama_batch's arrays (seq_id: llama_seq_id **, the first id of each token). */
SAEHOOK_API saehook_status saehook_llama_hook_announce_batch(saehook_llama_hook *hook, int32_t n_tokens,
                                                             const int32_t *token, const int32_t *pos,
                                                             int32_t *const *seq_id, const int8_t *logits,
                                                             const int8_t *generated, int32_t pos0, int32_t flags);
/* Announces a struct llama_batch (needs llama.h). pos0: the first position when batch.pos is
 * NULL (llama_batch_get_one), i.e. the number of tokens already in the sequence. */
#define SAEHOOK_LLAMA_ANNOUNCE(hook, batch, pos0, flags)                                             \
  saehook_llama_hook_announce_batch((hook), (batch).n_tokens, (batch).token, (batch).pos, (batch).seq_id, \
                                    (batch).logits, NULL, (pos0), (flags))
/* Forgets the announced tokens not seen yet (e.g. after a failed decode). */
SAEHOOK_API void saehook_llama_hook_reset_queue(saehook_llama_hook *hook);
/* Rows seen at hooked blocks that no announced token described (not captured). */
SAEHOOK_API int64_t saehook_llama_hook_unannounced(const saehook_llama_hook *hook);

/* Tells the hook the control vector llama.cpp adds (same arguments as llama_set_adapter_cvec:
 * row j of data is added to block j + 1's output for blocks il_start..il_end; data NULL: none),
 * so that captures at those blocks record the residual before it. Returns SAEHOOK_OK or
 * SAEHOOK_ERR_SHAPE (n_embd differs from the hook's). */
SAEHOOK_API saehook_status saehook_llama_hook_set_cvec(saehook_llama_hook *hook, const float *data, size_t len,
                                                       int32_t n_embd, int32_t il_start, int32_t il_end);

/* Rows captured so far by entry `id` (-1: no such entry); read them (any pointer may be NULL:
 * tokens, positions, seq_ids, generated: one per row; values, indices: k per row, sorted by
 * value; residuals: n_embd per row, only with keep_residuals), then optionally clear. */
SAEHOOK_API int64_t saehook_llama_hook_captured(const saehook_llama_hook *hook, int32_t id);
SAEHOOK_API int32_t saehook_llama_hook_k(const saehook_llama_hook *hook, int32_t id);
SAEHOOK_API saehook_status saehook_llama_hook_read(const saehook_llama_hook *hook, int32_t id, int32_t *tokens,
                                                   int32_t *positions, int32_t *seq_ids, int8_t *generated,
                                                   float *values, int32_t *indices, float *residuals);
SAEHOOK_API void saehook_llama_hook_clear_captured(saehook_llama_hook *hook, int32_t id);
/* Also keep the raw residual rows of capture entries (n_embd floats per row; for tests/analysis). */
SAEHOOK_API void saehook_llama_hook_keep_residuals(saehook_llama_hook *hook, int32_t keep);

/* ---- GPU offload: the device path ----
 * A hooked block whose output lives in a CUDA device buffer (llama.cpp's CUDA backend, the layer
 * offloaded with n_gpu_layers) runs on that device when libsaehook was built with CUDA: the hook
 * keeps one copy of each SAE per device (uploaded at its first use there: W_enc + W_dec bytes;
 * dropped when no entry uses the SAE), and encode, capture and every steering op run on the
 * tensor's device memory with saehook's CUDA kernels on the hook's own stream, which the callback
 * waits for before it returns (llama.cpp synchronises its backend before the callback). Captured
 * features come to the host in one transfer per encode and micro-batch; the residual never does
 * (unless keep_residuals). Every other buffer (CPU, CUDA_Host, Metal, Vulkan, ...) takes the host
 * path above (ggml_backend_tensor_get/set). Results equal the host path's to float tolerance.
 * A device whose setup fails (no kernels of this build for it, no memory for the SAE copy) is
 * not used again by this hook: its layers take the host path and saehook_llama_hook_path says why.
 * The hook needs four more ggml functions to see where a tensor lives (all in ggml-base, also
 * in CPU-only builds); without them every block takes the host path. tensor_buffer may be NULL:
 * the hook then reads the tensor's `buffer` field itself (the second member of ggml.h's struct
 * ggml_tensor). */
struct ggml_backend_buffer;
struct ggml_backend_buffer_type;
typedef struct {
  bool (*buffer_is_host)(struct ggml_backend_buffer *buffer);
  struct ggml_backend_buffer_type *(*buffer_get_type)(struct ggml_backend_buffer *buffer);
  const char *(*buft_name)(struct ggml_backend_buffer_type *buft);
  void *(*get_data)(const struct ggml_tensor *t);
  struct ggml_backend_buffer *(*tensor_buffer)(const struct ggml_tensor *t); /* optional */
} saehook_ggml_backend_api;

/* For programs that link ggml directly (ggml.h and ggml-backend.h included first). */
#define SAEHOOK_GGML_BACKEND_API_LINKED \
  {ggml_backend_buffer_is_host, ggml_backend_buffer_get_type, ggml_backend_buft_name, ggml_get_data, NULL}

/* Gives the hook the backend-buffer functions (copied; NULL: none, every block on the host). */
SAEHOOK_API saehook_status saehook_llama_hook_set_backend_api(saehook_llama_hook *hook,
                                                              const saehook_ggml_backend_api *api);
/* 0: every block on the host path even where its tensor is on a CUDA device (the default where
 * the environment has SAEHOOK_LLAMA_DEVICE=0); 1: the device path where it can run (default). */
SAEHOOK_API void saehook_llama_hook_set_device_path(saehook_llama_hook *hook, int32_t enable);
/* Which path block `layer` took at its last hooked micro-batch: the CUDA device ordinal, -1 the
 * host, -2 not run yet, -3 no such layer; why (cap bytes, may be NULL) gets a sentence, e.g.
 * "device 0 (CUDA0)" or "host (buffer type CPU is host memory)"; -4 the emulated device. */
SAEHOOK_API int32_t saehook_llama_hook_path(const saehook_llama_hook *hook, int32_t layer, char *why, size_t cap);
/* For tests on machines without a GPU: 1 runs every hooked block through the device path's code
 * on host memory (an emulated device: host buffers for device memory, CPU loops for the kernels;
 * needs saehook_llama_hook_set_backend_api), which must give the host path's results; the path
 * then reads -4. 2: an emulated device whose setup fails (as a GPU this build has no kernels for):
 * its layers fall back to the host path, which the path report explains. 0: off (default). */
SAEHOOK_API void saehook_llama_hook_emulate_device(saehook_llama_hook *hook, int32_t enable);
/* The device copies of SAEs the hook holds (one per SAE and device), and their bytes. */
SAEHOOK_API int32_t saehook_llama_hook_device_copies(const saehook_llama_hook *hook, int64_t *bytes);
/* The CUDA device a ggml buffer type name denotes ("CUDA<n>" -> n), else -1. */
SAEHOOK_API int32_t saehook_llama_buffer_type_device(const char *name);
/* 1 if this libsaehook has the device path (built with CUDA), else 0. */
SAEHOOK_API int32_t saehook_llama_device_path_built(void);

/* Errors inside the callback cannot reach llama.cpp: the first one is kept here (NULL if none)
 * and the hook stops changing tensors until it is cleared. */
SAEHOOK_API const char *saehook_llama_hook_error(const saehook_llama_hook *hook);
SAEHOOK_API void saehook_llama_hook_clear_error(saehook_llama_hook *hook);

#ifdef __cplusplus
}
#endif
#endif /* SAEHOOK_LLAMA_H */
