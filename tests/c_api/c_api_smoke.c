/* Uses the C API from plain C, as a C program embedding saehook would: creates a handle over
 * caller memory, encodes, decodes, steers, and checks an error path. Prints the results so the
 * Python test can compare them with its numpy reference. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "saehook.h"

#define D 20
#define M 50
#define K 4

int main(void) {
  static float W_enc[M * D], W_dec[M * D], b_enc[M], x[2 * D], vals[2 * K], out[2 * D];
  static int32_t idx[2 * K];
  for (int i = 0; i < M * D; ++i) {
    W_enc[i] = sinf(0.37f * i);
    W_dec[i] = cosf(0.11f * i);
  }
  for (int f = 0; f < M; ++f) b_enc[f] = 0.01f * f;
  for (int i = 0; i < 2 * D; ++i) x[i] = cosf(0.5f * i);

  saehook_sae_desc d = {0};
  d.d_model = D;
  d.d_sae = M;
  d.k = K;
  d.activation = SAEHOOK_ACT_TOPK;
  d.W_enc = W_enc;
  d.enc_dtype = SAEHOOK_F32;
  d.b_enc = b_enc;
  d.W_dec = W_dec;
  d.dec_dtype = SAEHOOK_F32;
  d.dec_layout = SAEHOOK_DEC_ROWS;
  saehook_sae *sae = NULL;
  if (saehook_sae_create(&d, &sae) != SAEHOOK_OK) {
    fprintf(stderr, "create: %s\n", saehook_last_error());
    return 1;
  }
  if (saehook_encode(sae, x, 2, D, 0, vals, idx, NULL) != SAEHOOK_OK) return 2;
  for (int j = 0; j < 2 * K; ++j) printf("%d %.6f\n", idx[j], vals[j]);
  if (saehook_decode(sae, vals, idx, 2, K, out, D, NULL) != SAEHOOK_OK) return 3;
  for (int i = 0; i < 2 * D; ++i) printf("%.6f\n", out[i]);

  /* Errors come back as a status and a message, never a crash. */
  x[3] = NAN;
  saehook_status st = saehook_encode(sae, x, 2, D, 0, vals, idx, NULL);
  printf("nan-status %d %s\n", (int)st, saehook_last_error());
  saehook_steer_item item = {M + 5, SAEHOOK_STEER_ADD, 1.0f, 0};
  x[3] = 0.f;
  st = saehook_steer(sae, x, 2, D, &item, 1, NULL, 0, NULL, NULL, NULL);
  printf("index-status %d %s\n", (int)st, saehook_last_error());
  /* The bf16 prefilter: the same encode, read through a bf16 copy of W_enc. */
  static float vals2[2 * K];
  static int32_t idx2[2 * K];
  x[3] = cosf(0.5f * 3);
  if (saehook_sae_set_prefilter(sae, SAEHOOK_BF16, NULL) != SAEHOOK_OK) return 4;
  if (saehook_encode(sae, x, 2, D, 0, vals2, idx2, NULL) != SAEHOOK_OK) return 5;
  int same = 1;
  for (int j = 0; j < 2 * K; ++j) same &= vals2[j] == vals[j] && idx2[j] == idx[j];
  int64_t stats[4];
  if (saehook_sae_prefilter_stats(sae, stats) != SAEHOOK_OK) return 6;
  printf("prefilter same %d bytes %lld rows %lld fallbacks %lld\n", same, (long long)stats[0],
         (long long)stats[1], (long long)stats[3]);
  st = saehook_sae_set_prefilter(sae, SAEHOOK_I8, NULL);
  printf("prefilter-status %d %s\n", (int)st, saehook_last_error());
  printf("isa %s\n", saehook_get_isa());
  saehook_sae_destroy(sae);
  return 0;
}
