/* Per-core issue rates of the instructions the CPU kernels are built on (bench_peaks.py builds
 * and runs this). Each loop issues 16 independent accumulator chains (enough to hide the
 * latency of every instruction measured here), so the time per instruction is the issue
 * interval of one core. Times are in nanoseconds of wall clock: on a VM the core clock is not
 * visible, so the rates are per ns, and per cycle only where the caller passes a clock. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define REPEAT16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

/* One loop per instruction and width: 16 instructions per iteration on registers 0..15 with
 * sources 16, 17 (zmm) or 14, 15 (ymm, 16 registers: chains on 0..11 plus two sources). */
#define ZLOOP(name, insn)                                                              \
  static void name(long iters) {                                                       \
    __asm__ volatile("vpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17" \
                     ::: "xmm16", "xmm17");                                            \
    for (long i = 0; i < iters; ++i) {                                                 \
      __asm__ volatile(                                                                \
          insn " %%zmm16, %%zmm17, %%zmm0\n\t" insn " %%zmm16, %%zmm17, %%zmm1\n\t"    \
          insn " %%zmm16, %%zmm17, %%zmm2\n\t" insn " %%zmm16, %%zmm17, %%zmm3\n\t"    \
          insn " %%zmm16, %%zmm17, %%zmm4\n\t" insn " %%zmm16, %%zmm17, %%zmm5\n\t"    \
          insn " %%zmm16, %%zmm17, %%zmm6\n\t" insn " %%zmm16, %%zmm17, %%zmm7\n\t"    \
          insn " %%zmm16, %%zmm17, %%zmm8\n\t" insn " %%zmm16, %%zmm17, %%zmm9\n\t"    \
          insn " %%zmm16, %%zmm17, %%zmm10\n\t" insn " %%zmm16, %%zmm17, %%zmm11\n\t"  \
          insn " %%zmm16, %%zmm17, %%zmm12\n\t" insn " %%zmm16, %%zmm17, %%zmm13\n\t"  \
          insn " %%zmm16, %%zmm17, %%zmm14\n\t" insn " %%zmm16, %%zmm17, %%zmm15\n\t"  \
          ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",  \
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");               \
    }                                                                                  \
  }
#define YLOOP(name, insn)                                                              \
  static void name(long iters) {                                                       \
    __asm__ volatile("vpxor %%ymm14, %%ymm14, %%ymm14\n\tvpxor %%ymm15, %%ymm15, %%ymm15" \
                     ::: "xmm14", "xmm15");                                            \
    for (long i = 0; i < iters; ++i) {                                                 \
      __asm__ volatile(                                                                \
          insn " %%ymm14, %%ymm15, %%ymm0\n\t" insn " %%ymm14, %%ymm15, %%ymm1\n\t"    \
          insn " %%ymm14, %%ymm15, %%ymm2\n\t" insn " %%ymm14, %%ymm15, %%ymm3\n\t"    \
          insn " %%ymm14, %%ymm15, %%ymm4\n\t" insn " %%ymm14, %%ymm15, %%ymm5\n\t"    \
          insn " %%ymm14, %%ymm15, %%ymm6\n\t" insn " %%ymm14, %%ymm15, %%ymm7\n\t"    \
          insn " %%ymm14, %%ymm15, %%ymm8\n\t" insn " %%ymm14, %%ymm15, %%ymm9\n\t"    \
          insn " %%ymm14, %%ymm15, %%ymm10\n\t" insn " %%ymm14, %%ymm15, %%ymm11\n\t"  \
          insn " %%ymm14, %%ymm15, %%ymm0\n\t" insn " %%ymm14, %%ymm15, %%ymm1\n\t"    \
          insn " %%ymm14, %%ymm15, %%ymm2\n\t" insn " %%ymm14, %%ymm15, %%ymm3\n\t"    \
          ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",  \
          "xmm9", "xmm10", "xmm11", "xmm14", "xmm15");                                 \
    }                                                                                  \
  }

ZLOOP(fma_zmm, "vfmadd231ps")
ZLOOP(bf16_zmm, "vdpbf16ps")
ZLOOP(vnni_zmm, "vpdpbusd")
YLOOP(fma_ymm, "vfmadd231ps")
YLOOP(bf16_ymm, "vdpbf16ps")
YLOOP(vnni_ymm, "%{evex%} vpdpbusd")

/* Loads: 16 independent 64-byte loads per iteration from an L1-resident buffer. */
static void load_zmm(long iters) {
  static __attribute__((aligned(64))) char buf[4096];
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile(
        "vmovdqu64 0(%0), %%zmm0\n\tvmovdqu64 64(%0), %%zmm1\n\tvmovdqu64 128(%0), %%zmm2\n\t"
        "vmovdqu64 192(%0), %%zmm3\n\tvmovdqu64 256(%0), %%zmm4\n\tvmovdqu64 320(%0), %%zmm5\n\t"
        "vmovdqu64 384(%0), %%zmm6\n\tvmovdqu64 448(%0), %%zmm7\n\tvmovdqu64 512(%0), %%zmm8\n\t"
        "vmovdqu64 576(%0), %%zmm9\n\tvmovdqu64 640(%0), %%zmm10\n\tvmovdqu64 704(%0), %%zmm11\n\t"
        "vmovdqu64 768(%0), %%zmm12\n\tvmovdqu64 832(%0), %%zmm13\n\tvmovdqu64 896(%0), %%zmm14\n\t"
        "vmovdqu64 960(%0), %%zmm15\n\t"
        :: "r"(buf) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
  }
}

struct Probe {
  const char *name;
  void (*fn)(long);
  int per_insn; /* multiply-adds (lanes x products per lane) per instruction */
};

int main(int argc, char **argv) {
  const double seconds = argc > 1 ? atof(argv[1]) : 0.2;
  const struct Probe probes[] = {
      {"vfmadd231ps zmm", fma_zmm, 16},   {"vdpbf16ps zmm", bf16_zmm, 32},
      {"vpdpbusd zmm", vnni_zmm, 64},     {"vfmadd231ps ymm", fma_ymm, 8},
      {"vdpbf16ps ymm", bf16_ymm, 16},    {"vpdpbusd ymm", vnni_ymm, 32},
      {"load zmm (L1)", load_zmm, 0},
  };
  printf("[");
  for (unsigned p = 0; p < sizeof probes / sizeof probes[0]; ++p) {
    long iters = 1000;
    double t;
    for (;;) { /* grow until one run takes `seconds` */
      double t0 = now();
      probes[p].fn(iters);
      t = now() - t0;
      if (t > seconds) break;
      iters *= 2;
    }
    double best = t;
    for (int rep = 0; rep < 4; ++rep) { /* the best of five: preemption only slows a run */
      double t0 = now();
      probes[p].fn(iters);
      double tt = now() - t0;
      if (tt < best) best = tt;
    }
    const double insns = 16.0 * iters;
    printf("%s{\"insn\": \"%s\", \"ns_per_insn\": %.5f, \"madds_per_ns\": %.3f}", p ? ", " : "",
           probes[p].name, 1e9 * best / insns, probes[p].per_insn * insns / best / 1e9);
  }
  printf("]\n");
  return 0;
}
