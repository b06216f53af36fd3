/* Captures SAE features while llama.cpp generates, from plain C.
 *
 *   llama_capture MODEL.gguf LAYER --random-sae D_SAE K "prompt"
 *
 * For brevity the SAE is a seeded random one with the model's width; a real program fills the
 * saehook_sae_desc with the weights of a released SAE (e.g. a file mapped with mmap). Prints,
 * for every evaluated token, its top features at LAYER. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "saehook_llama.h"

static float uniform(unsigned *s) { *s = *s * 1664525u + 1013904223u; return ((*s >> 8) / 16777216.0f) - 0.5f; }

static int decode(struct llama_context *ctx, saehook_llama_hook *hook, llama_token *toks, int n, int pos0, int generated) {
  int32_t *pos = malloc(sizeof(int32_t) * n);
  int8_t *out = calloc(n, 1), *gen = malloc(n);
  for (int i = 0; i < n; ++i) { pos[i] = pos0 + i; gen[i] = (int8_t)generated; }
  out[n - 1] = 1; /* llama_batch_get_one requests the last token's logits */
  saehook_llama_hook_announce(hook, toks, pos, NULL, out, gen, n);
  int rc = llama_decode(ctx, llama_batch_get_one(toks, n));
  free(pos); free(out); free(gen);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 6 || strcmp(argv[3], "--random-sae") != 0) {
    fprintf(stderr, "usage: %s MODEL.gguf LAYER --random-sae D_SAE K [prompt]\n", argv[0]);
    return 2;
  }
  const int layer = atoi(argv[2]), d_sae = atoi(argv[4]), k = atoi(argv[5]);
  const char *prompt = argc > 6 ? argv[6] : "Hello";

  llama_backend_init();
  struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
  const int n_embd = llama_model_n_embd(model);

  /* A random SAE of the model's width (weights owned by this program). */
  float *W_enc = malloc(sizeof(float) * (size_t)d_sae * n_embd), *W_dec = malloc(sizeof(float) * (size_t)d_sae * n_embd);
  unsigned seed = 1;
  for (size_t i = 0; i < (size_t)d_sae * n_embd; ++i) { W_enc[i] = uniform(&seed); W_dec[i] = uniform(&seed); }
  saehook_sae_desc desc = {0};
  desc.d_model = n_embd; desc.d_sae = d_sae; desc.k = k; desc.activation = SAEHOOK_ACT_TOPK;
  desc.W_enc = W_enc; desc.enc_dtype = SAEHOOK_F32; desc.W_dec = W_dec; desc.dec_dtype = SAEHOOK_F32;
  desc.dec_layout = SAEHOOK_DEC_ROWS;
  saehook_sae *sae;
  if (saehook_sae_create(&desc, &sae) != SAEHOOK_OK) { fprintf(stderr, "%s\n", saehook_last_error()); return 1; }

  /* The integration: a hook, an entry, and the callback in the context parameters. */
  saehook_ggml_api api = SAEHOOK_GGML_API_LINKED;
  saehook_llama_hook *hook = saehook_llama_hook_create(&api, n_embd, llama_model_n_layer(model));
  int entry = saehook_llama_hook_add(hook, layer, sae, 1, 0, NULL, 0, SAEHOOK_POS_ALL);
  if (entry < 0) { fprintf(stderr, "cannot hook layer %d\n", layer); return 1; }
  struct llama_context_params cparams = llama_context_default_params();
  cparams.n_ctx = 256;
  cparams.cb_eval = saehook_llama_callback;
  cparams.cb_eval_user_data = hook;
  struct llama_context *ctx = llama_init_from_model(model, cparams);

  const struct llama_vocab *vocab = llama_model_get_vocab(model);
  llama_token toks[256];
  int n = llama_tokenize(vocab, prompt, (int)strlen(prompt), toks, 256, false, false);
  if (n <= 0 || decode(ctx, hook, toks, n, 0, 0) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
  const int n_vocab = llama_vocab_n_tokens(vocab);
  for (int step = 0; step < 4; ++step) { /* greedy generation */
    const float *logits = llama_get_logits_ith(ctx, -1);
    llama_token best = 0;
    for (int t = 1; t < n_vocab; ++t) if (logits[t] > logits[best]) best = t;
    if (decode(ctx, hook, &best, 1, n + step, 1) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
  }
  if (saehook_llama_hook_error(hook)) { fprintf(stderr, "hook: %s\n", saehook_llama_hook_error(hook)); return 1; }

  const int64_t rows = saehook_llama_hook_captured(hook, entry);
  const int kk = saehook_llama_hook_k(hook, entry);
  int32_t *tk = malloc(sizeof(int32_t) * rows), *ps = malloc(sizeof(int32_t) * rows), *ix = malloc(sizeof(int32_t) * rows * kk);
  float *vs = malloc(sizeof(float) * rows * kk);
  saehook_llama_hook_read(hook, entry, tk, ps, NULL, vs, ix, NULL);
  for (int64_t r = 0; r < rows; ++r) {
    printf("token %d pos %d:", tk[r], ps[r]);
    for (int j = 0; j < kk && j < 5; ++j) printf(" f%d=%.3f", ix[r * kk + j], vs[r * kk + j]);
    printf("\n");
  }
  llama_free(ctx);
  saehook_llama_hook_destroy(hook);
  saehook_sae_destroy(sae);
  llama_model_free(model);
  free(W_enc); free(W_dec); free(tk); free(ps); free(ix); free(vs);
  return 0;
}
