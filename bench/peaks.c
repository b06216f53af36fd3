/* Per-core issue rates of the instructions the CPU kernels are built on (bench_peaks.py builds
 * and runs this). Each loop issues 16 independent accumulator chains (enough to hide the
 * latency of every instruction measured here), so the time per instruction is the issue
 * interval of one core. Times are in nanoseconds of wall clock: on a VM the core clock is not
 * visible, so the rates are per ns, and per cycle only where the caller passes a clock. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
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

YLOOP(fma_ymm, "vfmadd231ps")
YLOOP(maddubs_ymm, "vpmaddubsw")
YLOOP(maddwd_ymm, "vpmaddwd")

/* The avx2 path's int8 dot step (kernels_avx2_i8_impl.hpp dot_step): two vpsignb, vpmaddubsw,
 * vpmaddwd and vpaddd per 32 products, on 6 independent accumulators (ymm0..5; sources 14, 15,
 * temporaries 6..13). */
static void i8step_ymm(long iters) {
  __asm__ volatile("vpxor %%ymm14, %%ymm14, %%ymm14\n\tvpxor %%ymm15, %%ymm15, %%ymm15\n\t"
                   "vpcmpeqw %%ymm13, %%ymm13, %%ymm13\n\tvpsrlw $15, %%ymm13, %%ymm13" ::: "xmm13", "xmm14", "xmm15");
  for (long i = 0; i < iters; ++i) {
#define STEP(a, t, u)                                                                           \
  "vpsignb %%ymm14, %%ymm14, %%ymm" #t "\n\tvpsignb %%ymm14, %%ymm15, %%ymm" #u "\n\t"              \
  "vpmaddubsw %%ymm" #u ", %%ymm" #t ", %%ymm" #t "\n\tvpmaddwd %%ymm13, %%ymm" #t ", %%ymm" #t "\n\t" \
  "vpaddd %%ymm" #t ", %%ymm" #a ", %%ymm" #a "\n\t"
    __asm__ volatile(STEP(0, 6, 7) STEP(1, 8, 9) STEP(2, 10, 11) STEP(3, 6, 7) STEP(4, 8, 9) STEP(5, 10, 11)
                     STEP(0, 6, 7) STEP(1, 8, 9) STEP(2, 10, 11) STEP(3, 6, 7) STEP(4, 8, 9) STEP(5, 10, 11)
                     STEP(0, 6, 7) STEP(1, 8, 9) STEP(2, 10, 11) STEP(3, 6, 7)
                     ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
                     "xmm10", "xmm11");
#undef STEP
  }
}

/* bf16 -> f32 widening of the avx2 path (Load<BF16>: vpmovzxwd from memory, vpslld) plus the FMA
 * it feeds, on 8 accumulators: the bf16 encode's work per 8 weights without AVX512-BF16. */
static void bf16fma_ymm(long iters) {
  static __attribute__((aligned(64))) char buf[4096];
  __asm__ volatile("vpxor %%ymm15, %%ymm15, %%ymm15" ::: "xmm15");
  for (long i = 0; i < iters; ++i) {
#define W(a, t, off)                                                                       \
  "vpmovzxwd " #off "(%0), %%ymm" #t "\n\tvpslld $16, %%ymm" #t ", %%ymm" #t "\n\t"             \
  "vfmadd231ps %%ymm15, %%ymm" #t ", %%ymm" #a "\n\t"
    __asm__ volatile(W(0, 8, 0) W(1, 9, 16) W(2, 10, 32) W(3, 11, 48) W(4, 12, 64) W(5, 13, 80) W(6, 14, 96)
                     W(7, 8, 112) W(0, 9, 128) W(1, 10, 144) W(2, 11, 160) W(3, 12, 176) W(4, 13, 192)
                     W(5, 14, 208) W(6, 8, 224) W(7, 9, 240)
                     :: "r"(buf) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                     "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "memory");
#undef W
  }
}

/* Loads: 16 independent 32-byte loads per iteration from an L1-resident buffer. */
static void load_ymm(long iters) {
  static __attribute__((aligned(64))) char buf[4096];
  for (long i = 0; i < iters; ++i) {
    __asm__ volatile(
        "vmovdqu 0(%0), %%ymm0\n\tvmovdqu 32(%0), %%ymm1\n\tvmovdqu 64(%0), %%ymm2\n\t"
        "vmovdqu 96(%0), %%ymm3\n\tvmovdqu 128(%0), %%ymm4\n\tvmovdqu 160(%0), %%ymm5\n\t"
        "vmovdqu 192(%0), %%ymm6\n\tvmovdqu 224(%0), %%ymm7\n\tvmovdqu 256(%0), %%ymm8\n\t"
        "vmovdqu 288(%0), %%ymm9\n\tvmovdqu 320(%0), %%ymm10\n\tvmovdqu 352(%0), %%ymm11\n\t"
        "vmovdqu 384(%0), %%ymm12\n\tvmovdqu 416(%0), %%ymm13\n\tvmovdqu 448(%0), %%ymm14\n\t"
        "vmovdqu 480(%0), %%ymm15\n\t"
        :: "r"(buf) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
  }
}

#ifdef __AVX512F__
ZLOOP(fma_zmm, "vfmadd231ps")
ZLOOP(bf16_zmm, "vdpbf16ps")
ZLOOP(vnni_zmm, "vpdpbusd")
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

#endif

#ifdef __AMX_TILE__
/* AMX (Sapphire Rapids and later): the tile products and tile loads of kernels_avx512_amx.cpp.
 * Every tile 16 rows x 64 bytes. A product C (16 x 16) += A (16 x 64 bytes) . B is 8192 bf16 or
 * 16384 int8 multiply-adds. Each loop issues 16 of the measured instruction per iteration. */
#include <sys/syscall.h>
#include <unistd.h>

struct __attribute__((aligned(64))) tile_config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static int amx_setup(void) {
  /* Linux hands a process the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA). */
  if (syscall(SYS_arch_prctl, 0x1023, 18)) return 0;
  struct tile_config c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
  __asm__ volatile("tilezero %%tmm6\n\ttilezero %%tmm7" ::: "memory");
  return 1;
}

/* Products alone on 6 accumulator tiles (0..5), sources tmm6 and tmm7. */
#define TLOOP(name, insn)                                                                      \
  static void name(long iters) {                                                               \
    for (long i = 0; i < iters; ++i)                                                           \
      __asm__ volatile(insn " %%tmm7, %%tmm6, %%tmm0\n\t" insn " %%tmm7, %%tmm6, %%tmm1\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm2\n\t" insn " %%tmm7, %%tmm6, %%tmm3\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm4\n\t" insn " %%tmm7, %%tmm6, %%tmm5\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm0\n\t" insn " %%tmm7, %%tmm6, %%tmm1\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm2\n\t" insn " %%tmm7, %%tmm6, %%tmm3\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm4\n\t" insn " %%tmm7, %%tmm6, %%tmm5\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm0\n\t" insn " %%tmm7, %%tmm6, %%tmm1\n\t"   \
                       insn " %%tmm7, %%tmm6, %%tmm2\n\t" insn " %%tmm7, %%tmm6, %%tmm3\n\t" ::: "memory"); \
  }
TLOOP(tdpbf16ps, "tdpbf16ps")
TLOOP(tdpbssd, "tdpbssd")

#define TLOAD(t, base, stride) __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"((long)(stride)) : "memory")

/* Tile loads alone: 16 per iteration, rows `stride` bytes apart, walking `span` bytes of a
 * buffer `step` bytes per load (so that the region sits in L1 or L2, or rows share L1 sets). */
static char *tile_buf;
static void tile_loads(long iters, long stride, long step, long span) {
  long off = 0;
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < 16; j += 4) {
      TLOAD(4, tile_buf + off, stride);
      TLOAD(5, tile_buf + off + step, stride);
      TLOAD(6, tile_buf + off + 2 * step, stride);
      TLOAD(7, tile_buf + off + 3 * step, stride);
      off = (off + 4 * step) % span;
    }
}
static void tload_l1(long iters) { tile_loads(iters, 64, 1024, 16 << 10); }
static void tload_l2(long iters) { tile_loads(iters, 64, 1024, 512 << 10); }
/* A tile straight from W: 16 feature rows of 8 KiB (bf16 d_model 4096), 64 bytes further each
 * load; the 16 rows map to one L1 set. */
static void tload_rows(long iters) { tile_loads(iters, 8192, 64, 8192 - 256); }

/* The kernel's step: 2 A and 2 B tile loads, then 4 bf16 products into C tiles 0..3; 4 steps per
 * iteration (16 products). A and B walk `a_span` / `b_span` bytes. */
static void tile_step(long iters, long a_stride, long a_step, long a_span, long b_span) {
  char *a = tile_buf, *b = tile_buf + (1 << 20);
  long ao = 0, bo = 0;
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < 4; ++j) {
      TLOAD(4, a + ao, a_stride);
      TLOAD(5, a + ao + (a_stride == 64 ? 1024 : 16 * a_stride), a_stride);
      TLOAD(6, b + bo, 64);
      TLOAD(7, b + bo + 1024, 64);
      __asm__ volatile("tdpbf16ps %%tmm6, %%tmm4, %%tmm0\n\ttdpbf16ps %%tmm7, %%tmm4, %%tmm1\n\t"
                       "tdpbf16ps %%tmm6, %%tmm5, %%tmm2\n\ttdpbf16ps %%tmm7, %%tmm5, %%tmm3" ::: "memory");
      ao = (ao + a_step) % a_span;
      bo = (bo + 2048) % b_span;
    }
}
static void step_l1(long iters) { tile_step(iters, 64, 2048, 8 << 10, 8 << 10); }
static void step_l2(long iters) { tile_step(iters, 64, 2048, 256 << 10, 256 << 10); }
static void step_rows(long iters) { tile_step(iters, 8192, 64, 8192 - 64, 256 << 10); }
#endif

struct Probe {
  const char *name;
  void (*fn)(long);
  int per_insn; /* multiply-adds (lanes x products per lane) per instruction */
};

int main(int argc, char **argv) {
  const double seconds = argc > 1 ? atof(argv[1]) : 0.2;
#ifdef __AMX_TILE__
  if (!amx_setup()) {
    fprintf(stderr, "the kernel refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)\n");
    return 1;
  }
  tile_buf = aligned_alloc(4096, 4 << 20);
  memset(tile_buf, 0, 4 << 20);
#endif
  /* Built with AVX-512 flags only on CPUs that have AVX512-BF16/VNNI (bench_peaks.py). */
  const struct Probe probes[] = {
#ifdef __AVX512F__
      {"vfmadd231ps zmm", fma_zmm, 16},   {"vdpbf16ps zmm", bf16_zmm, 32},
      {"vpdpbusd zmm", vnni_zmm, 64},     {"vdpbf16ps ymm", bf16_ymm, 16},
      {"vpdpbusd ymm", vnni_ymm, 32},     {"load zmm (L1)", load_zmm, 0},
#endif
      {"vfmadd231ps ymm", fma_ymm, 8},    {"vpmaddubsw ymm", maddubs_ymm, 32},
      {"vpmaddwd ymm", maddwd_ymm, 16},   {"avx2 int8 step", i8step_ymm, 32},
      {"bf16 widen+fma", bf16fma_ymm, 8}, {"load ymm (L1)", load_ymm, 0},
#ifdef __AMX_TILE__
      {"tdpbf16ps", tdpbf16ps, 8192},     {"tdpbssd", tdpbssd, 16384},
      {"tileloadd L1", tload_l1, 0},      {"tileloadd L2", tload_l2, 0},
      {"tileloadd W rows", tload_rows, 0}, {"amx step L1", step_l1, 8192},
      {"amx step L2", step_l2, 8192},     {"amx step W rows", step_rows, 8192},
#endif
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
