/* Captures SAE features while llama.cpp generates, from plain C (and optionally steers).
 *
 *   llama_capture MODEL.gguf LAYER --random-sae D_SAE K [--clamp FEATURE VALUE] [--tokens N] [--no-repack] ["prompt"]
 *
 * For brevity the SAE is a seeded random one with the model's width; a real program fills the
 * saehook_sae_desc with the weights of a released SAE (e.g. a file mapped with mmap). Prints,
 * for every evaluated token, its top features at LAYER (before the steering, if any):
 *   token <id> pos <p> <prompt|gen>: f<index>=<value> ... (5 features)
 * --no-repack loads the model without llama.cpp's repacked CPU weight buffers: its AMX matrix
 * product crashes on Sapphire Rapids (ggml-org/llama.cpp#20824). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "saehook_llama.h"

static float uniform(unsigned *s) {
  *s = *s * 1664525u + 1013904223u;
  return ((*s >> 8) / 16777216.0f) - 0.5f;
}

/* Every decode is announced first, so the hook knows which token each row is. */
static int decode(struct llama_context *ctx, saehook_llama_hook *hook, llama_token *toks, int n, int n_past,
                  int flags) {
  struct llama_batch batch = llama_batch_get_one(toks, n); /* positions follow n_past; last token's logits */
  SAEHOOK_LLAMA_ANNOUNCE(hook, batch, n_past, flags);
  return llama_decode(ctx, batch);
}

int main(int argc, char **argv) {
  if (argc < 6 || strcmp(argv[3], "--random-sae") != 0) {
    fprintf(stderr, "usage: %s MODEL.gguf LAYER --random-sae D_SAE K [--clamp F V] [--tokens N] [--no-repack] [prompt]\n",
            argv[0]);
    return 2;
  }
  const int layer = atoi(argv[2]), d_sae = atoi(argv[4]), k = atoi(argv[5]);
  const char *prompt = "Hello";
  int n_gen = 4, clamp_feature = -1, repack = 1;
  float clamp_value = 0.f;
  for (int a = 6; a < argc; ++a) {
    if (!strcmp(argv[a], "--clamp") && a + 2 < argc) {
      clamp_feature = atoi(argv[++a]);
      clamp_value = (float)atof(argv[++a]);
    } else if (!strcmp(argv[a], "--no-repack")) {
      repack = 0;
    } else if (!strcmp(argv[a], "--tokens") && a + 1 < argc) {
      n_gen = atoi(argv[++a]);
    } else {
      prompt = argv[a];
    }
  }

  llama_backend_init();
  struct llama_model_params mparams = llama_model_default_params();
  mparams.use_extra_bufts = repack;
  struct llama_model *model = llama_model_load_from_file(argv[1], mparams);
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

  /* The integration: a hook, its entries, and the callback in the context parameters. */
  saehook_ggml_api api = SAEHOOK_GGML_API_LINKED;
  saehook_llama_hook *hook = saehook_llama_hook_create(&api, n_embd, llama_model_n_layer(model));
  int entry = saehook_llama_hook_add(hook, layer, sae, 1, 0, NULL, 0, SAEHOOK_POS_ALL);
  if (entry < 0) { fprintf(stderr, "cannot hook layer %d\n", layer); return 1; }
  if (clamp_feature >= 0) { /* steer the generated tokens: clamp one feature */
    saehook_steer_item item = {clamp_feature, SAEHOOK_STEER_CLAMP, clamp_value, 0};
    if (saehook_llama_hook_add(hook, layer, sae, 0, 0, &item, 1, SAEHOOK_POS_GENERATED) < 0) {
      fprintf(stderr, "cannot steer feature %d\n", clamp_feature);
      return 1;
    }
  }
  struct llama_context_params cparams = llama_context_default_params();
  cparams.n_ctx = 256;
  cparams.cb_eval = saehook_llama_callback;
  cparams.cb_eval_user_data = hook;
  struct llama_context *ctx = llama_init_from_model(model, cparams);
  if (!ctx) { fprintf(stderr, "cannot create the context\n"); return 1; }

  const struct llama_vocab *vocab = llama_model_get_vocab(model);
  llama_token toks[256];
  int n = llama_tokenize(vocab, prompt, (int)strlen(prompt), toks, 256, false, false);
  if (n <= 0 || n + n_gen > 256 || decode(ctx, hook, toks, n, 0, 0) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
  const int n_vocab = llama_vocab_n_tokens(vocab);
  for (int step = 0; step < n_gen; ++step) { /* greedy generation; each sampled token is fed back */
    const float *logits = llama_get_logits_ith(ctx, -1);
    llama_token best = 0;
    for (int t = 1; t < n_vocab; ++t) if (logits[t] > logits[best]) best = t;
    if (decode(ctx, hook, &best, 1, n + step, SAEHOOK_BATCH_GENERATED) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
  }
  if (saehook_llama_hook_error(hook)) { fprintf(stderr, "hook: %s\n", saehook_llama_hook_error(hook)); return 1; }

  const int64_t rows = saehook_llama_hook_captured(hook, entry);
  const int kk = saehook_llama_hook_k(hook, entry);
  int32_t *tk = malloc(sizeof(int32_t) * rows), *ps = malloc(sizeof(int32_t) * rows);
  int32_t *ix = malloc(sizeof(int32_t) * rows * kk);
  int8_t *gen = malloc((size_t)rows);
  float *vs = malloc(sizeof(float) * rows * kk);
  saehook_llama_hook_read(hook, entry, tk, ps, NULL, gen, vs, ix, NULL);
  for (int64_t r = 0; r < rows; ++r) {
    printf("token %d pos %d %s:", tk[r], ps[r], gen[r] ? "gen" : "prompt");
    for (int j = 0; j < kk && j < 5; ++j) printf(" f%d=%.3f", ix[r * kk + j], vs[r * kk + j]);
    printf("\n");
  }
  llama_free(ctx); /* the context first: it calls the hook */
  saehook_llama_hook_destroy(hook);
  saehook_sae_destroy(sae);
  llama_model_free(model);
  free(W_enc); free(W_dec); free(tk); free(ps); free(ix); free(gen); free(vs);
  return 0;
}
