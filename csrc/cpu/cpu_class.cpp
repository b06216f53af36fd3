// The CPU class table (cpu_class.hpp) and its choice from cpuid.
#include "cpu_class.hpp"

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define SAEHOOK_X86 1
#endif

namespace saehook::cpu {

namespace {

// One row per class, each measured with bench/bench_tuning.py or bench/bench_builds.py in
// alternation with the read probe in one process (4096 x 65536 unless said).
//
// zen5 (2-core Zen 5 VM, family 26 model 2, 2026-12-02): stream_prefetch 0 / 512 / 1024 / 2048 /
// 3072 within noise at batch 1 (int8 1.03 / 1.02 / 1.00 / 1.15 / 0.99 of the 1024 time; bf16 0.98 /
// 1.03 / 1.00 / 1.03 / 0.98), 1024 kept -- but in that build GCC had deleted the prefetch loops of
// the VNNI paths' batch-1 kernels (prefetch_t0 in kernels_impl.hpp), so the sweep measured
// nothing: to be re-measured there. batch1_rows_bf16 4 against 8: 0.74, 0.99 and 0.86 of its time
// in three sweeps (0.86 on the idle VM: 1.01 of the probe's rate against 0.85), 1 row 0.96, 2 rows
// 1.02-1.04: 4; panel_chunk 1024 best at batch 256 (256: 1.07, 512: 1.03, 2048: 1.02 of its
// time); panel_prefetch_next on: batch 64 bf16 and int8 both 1.10x faster; few_rows (2048 x 32768
// f32, against few_rows=0): avx512_vnni 0.87x the time at 8 rows and 0.90x at 12; avx512 0.91x at
// 8, 0.95x at 16; avx2 0.81x at 8, 0.92x at 16: 16.
//
// spr (2-core Sapphire Rapids-class VM with AMX; values of earlier sessions, git log -- csrc/cpu),
// re-measured 2026-12-02 (the VM reports 480 MiB of L3): stream_prefetch, once the prefetch was
// really issued, int8 at batch 1 0 / 512 / 1024 / 2048 bytes ahead 1.26 / 1.06 / 1.00 / 0.98 of
// the 1024 time (1.10 of the probe at 1024), bf16 1.08 / 0.98 / 1.00 / 1.04: 1024. Later
// (2026-12-02 evening, the same VM class in a slower state: read probe 15-19 GB/s instead of
// 28-30, zmm FMA 0.24 ns instead of 0.15) int8 at 2048 / 4096 / 8192 took 0.93 / 0.92 / 0.95 of
// the 1024 time (4096 in two more runs: 0.86, 0.925; 0.95 of the probe against 0.86), bf16
// 1.05 / 1.02 / 1.00: int8 apart (stream_prefetch_i8) at 4096, bf16 stays at 1024;
// panel_prefetch_next 1.40x / 1.15x the time at batch 64 / 256 f32: off; gather_ahead 2 / 4 / 6
// against 8: 0.80 / 0.83 / 0.84 of its time at batch 256, 0.85 / 0.92 / 0.90 at 64, 0.89 / 0.89 /
// 1.00 at 1: 4; few_rows (f32, the few-rows order against the tiles): 0.87x the time at 8 rows,
// 0.94x at 12, 1.07x at 16: 12 (bf16 and int8 take the AMX tiles there either way).
//
// zen4 (2-core Zen 4 VM, EPYC family 25 model 17, 2026-12-04): batch1_rows_bf16 1 against 4: 0.881
// of its time over 10 rounds (0.968 of the probe against 0.861; a first sweep 1 / 2 / 4 / 8: 0.93 /
// 1.07 / 1.00 / 1.07): 1; stream_prefetch (with 1 row) 0 / 512 / 1024 / 2048: 1.01 / 1.10 / 1.00 /
// 0.99, 1024 kept; panel_prefetch_next off against on: 1.03 at batch 64 bf16, 0.975 at 256 (on
// kept). 2026-12-05, the same VM class: block_bytes_n 256 / 384 / 768 KiB against 512 at batch
// 256 bf16: 1.004 / 0.999 / 1.001 of its time (512 kept: the panels are compute-bound here);
// panel_chunk 256 / 512 / 2048 / 4096 against 1024: bf16 batch 256 1.087 / 1.046 / 0.985-0.988 /
// 0.978, batch 64 1.082 / 1.034 / 0.983; int8 batch 256 2048 1.001, 4096 1.016, batch 64 2048
// 0.985: 2048. Later that day: few_rows 0 against 16: 1.055 of its time at 8 rows (2048 x 32768
// f32), bf16 1.163, int8 1.072 (4096 x 65536), 12 rows f32 few_rows 8 1.016: 16 kept; decode
// gather_ahead 2 / 4 / 12 / 16 against 8: 1.056 / 1.084 / 1.090 / 1.014 at batch 64, 0.998-1.014
// at 256, flat at 1: 8 kept; gather_rows_f32 1.10-1.14x the time: off; gather_l2 (prefetcht1
// instead of prefetcht0) 0.74 / 0.73 / 0.82 / 0.81 of the time at batch 1 / 8 / 64 / 256 (the row
// walk 0.77 / 0.75 at 64 / 256): on. L1 prefetches of 8 features' pieces (240 lines) exceed what
// the L1 keeps in flight; the L2 takes them. 2026-12-06: the few-rows tiles' prefetch of the next
// group into L2 (few_rows_l2) against L1, bench_builds alternation, 2048 x 32768: f32 0.696 of the
// time at 8 rows (0.604 -> 0.885 of the probe's rate), 0.653 at 12, 0.989 at 4 (one tile, not the
// few-rows order); bf16 0.598 and int8 0.812 at 8 rows: on. Later that day: batch 1 from the
// block's quarters (batch1_quarters) against adjacent rows, bench_builds alternation: f32 0.939 of
// the time at 2048 x 32768 (0.904 -> 0.975 of the probe, 32-36 GB/s), 0.841 at 4096 x 65536
// (0.79 -> 0.959, the VM moving into its fast state, probe 36-64 GB/s); bf16 (one row at a time
// before) 1.004 / 0.991 with stream_prefetch 0, int8 (row_i8 before) 0.966-0.976, both in the slow
// state: on. The few-rows tiles with groups taken from the quarters were flat at 8 rows (1.02).
//
// zen3 (AMD family 25 without AVX-512: the avx2 path; 2-core Zen 3 VM, family 25 model 1,
// 2026-12-02): the int8 batch-1 prefetch 1024 against 0 / 2048 / 4096 / 8192: 1.08 / 1.04 / 1.02 /
// 1.05 of its time (kept), the avx2 panels' panel_prefetch_next 1.21x the time at batch 64 f32
// (off), f32 decode by whole rows (gather_rows_f32) 0.77x / 0.80x / 0.80x the time of the chunked
// walk at batch 1 / 64 / 256 (on); the other values are generic's. 2026-12-07, the same VM class:
// batch1_quarters (the avx2 int8 kernel given quarters too) against the row kernels, bench_builds
// alternation at 4096 x 65536, 8-16 rounds each, probe 12-35 GB/s: int8 0.876 / 0.909 / 0.938 of
// the time, bf16 0.887 / 0.958 / 0.950, f32 1.000 / 1.010 (flat); one thread int8 0.877. A
// software prefetch in the int8 quarters (1 KiB ahead into L1, 1 or 4 KiB into L2) was flat to
// worse (1.02 / 0.97 / 1.05 one thread): none. On.
//
// generic (AVX2 laptops, anything else): the former one-for-all values, not re-measured; few_rows
// 16 as measured on the avx2 path of the Zen 5 VM.
const Tuning kTable[] = {
    // cls      prefetch (bf16, int8) rows_bf16 quarters block_1  block_n    chunk next ahead rows l2 few l2
    {"zen5",    1024, 1024,         4, 0,        2 << 20, 512 << 10,  1024, 1,   8,    0,   0, 16,  0},
    {"zen4",    1024, 1024,         1, 1,        2 << 20, 512 << 10,  2048, 1,   8,    0,   1, 16,  1},
    {"spr",     1024, 4096,         8, 0,        2 << 20, 512 << 10,  1024, 0,   4,    0,   0, 12,  0},
    {"zen3",    1024, 1024,         8, 1,        2 << 20, 512 << 10,  1024, 0,   8,    1,   0, 16,  0},
    {"generic", 1024, 1024,         8, 0,        2 << 20, 512 << 10,  1024, 0,   8,    0,   0, 16,  0},
};

const Tuning *find_class(const char *name, size_t len) {
  for (const Tuning &t : kTable)
    if (std::strlen(t.cls) == len && std::strncmp(t.cls, name, len) == 0) return &t;
  return nullptr;
}

CpuId detect() {
  CpuId c{};
  std::strcpy(c.vendor, "unknown");
  c.detected_class = "generic";
#ifdef SAEHOOK_X86
  unsigned a, b, cx, d;
  if (!__get_cpuid(0, &a, &b, &cx, &d)) return c;
  std::memcpy(c.vendor, &b, 4);
  std::memcpy(c.vendor + 4, &d, 4);
  std::memcpy(c.vendor + 8, &cx, 4);
  c.vendor[12] = 0;
  if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
  const unsigned base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
  c.stepping = a & 0xf;
  c.family = base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family;
  c.model = (base_family == 0xf || base_family == 0x6) ? (((a >> 16) & 0xf) << 4) | base_model : base_model;
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7);
  const bool avx512f = b7 & (1u << 16), amx_tile = d7 & (1u << 24);
  if (std::strcmp(c.vendor, "AuthenticAMD") == 0) {
    if (c.family == 0x1a) c.detected_class = "zen5";
    // Zen 4 (Genoa, Bergamo, Raphael, Phoenix: models 0x10 and up) executes AVX-512 on 256-bit
    // units; Zen 3 and 3+ (Milan, Vermeer, Rembrandt, Cezanne) are family 0x19 without AVX-512.
    else if (c.family == 0x19 && c.model >= 0x10 && avx512f) c.detected_class = "zen4";
    else if (c.family == 0x19 && !avx512f) c.detected_class = "zen3";
  } else if (std::strcmp(c.vendor, "GenuineIntel") == 0) {
    // Sapphire/Emerald/Granite Rapids; VMs may hide the model, AMX tells the class apart.
    const bool spr_model = c.family == 6 && (c.model == 0x8f || c.model == 0xcf || c.model == 0xad || c.model == 0xae);
    if (spr_model || amx_tile) c.detected_class = "spr";
  }
#endif
  return c;
}

// The override keys, one row each: parse, its error's key list and cpu_info_json all read this,
// so a new Tuning field is one row here. A value must lie in [lo, hi], be a multiple of `step`
// and, where pow2, a power of two; `rule` is what the error says otherwise.
struct Param {
  const char *key;
  int64_t Tuning::*wide;  // the field, when int64_t ...
  int Tuning::*narrow;    // ... or when int
  int64_t lo, hi, step;
  bool pow2;
  const char *rule;
};

const Param kParams[] = {
    {"stream_prefetch", &Tuning::stream_prefetch, nullptr, 0, 1 << 20, 1, false, "at most 1048576 (bytes)"},
    {"stream_prefetch_i8", &Tuning::stream_prefetch_i8, nullptr, 0, 1 << 20, 1, false, "at most 1048576 (bytes)"},
    {"batch1_rows_bf16", nullptr, &Tuning::batch1_rows_bf16, 1, 8, 1, true, "1, 2, 4 or 8"},
    {"batch1_quarters", nullptr, &Tuning::batch1_quarters, 0, 1, 1, false, "0 or 1"},
    {"block_bytes_1", &Tuning::block_bytes_1, nullptr, 1024, 1 << 30, 1, false, "1024 to 1073741824 (bytes)"},
    {"block_bytes_n", &Tuning::block_bytes_n, nullptr, 1024, 1 << 30, 1, false, "1024 to 1073741824 (bytes)"},
    {"panel_chunk", &Tuning::panel_chunk, nullptr, 128, 1 << 20, 128, false, "a positive multiple of 128 (at most 1048576)"},
    {"panel_prefetch_next", nullptr, &Tuning::panel_prefetch_next, 0, 1, 1, false, "0 or 1"},
    {"gather_ahead", nullptr, &Tuning::gather_ahead, 0, 64, 1, false, "at most 64"},
    {"gather_rows_f32", nullptr, &Tuning::gather_rows_f32, 0, 1, 1, false, "0 or 1"},
    {"gather_l2", nullptr, &Tuning::gather_l2, 0, 1, 1, false, "0 or 1"},
    {"few_rows", nullptr, &Tuning::few_rows, 0, 64, 1, false, "at most 64"},
    {"few_rows_l2", nullptr, &Tuning::few_rows_l2, 0, 1, 1, false, "0 or 1"},
};

int64_t get(const Tuning &t, const Param &k) { return k.wide ? t.*k.wide : int64_t(t.*k.narrow); }

std::string parse(const char *spec, Tuning *out) {
  const char *p = spec ? spec : "auto";
  const char *comma = std::strchr(p, ',');
  const size_t len = comma ? size_t(comma - p) : std::strlen(p);
  const std::string name(p, len);
  const Tuning *base = (name.empty() || name == "auto") ? find_class(cpuid_info().detected_class.c_str(),
                                                                      cpuid_info().detected_class.size())
                                                        : find_class(p, len);
  if (!base) return "unknown CPU class '" + name + "'; classes: " + tuning_classes() + " (or auto)";
  Tuning t = *base;
  while (comma) {
    p = comma + 1;
    comma = std::strchr(p, ',');
    const std::string item(p, comma ? size_t(comma - p) : std::strlen(p));
    const size_t eq = item.find('=');
    char *end = nullptr;
    errno = 0;
    const long long v = eq == std::string::npos ? 0 : std::strtoll(item.c_str() + eq + 1, &end, 10);
    if (eq == std::string::npos || end == item.c_str() + eq + 1 || *end || v < 0 || errno == ERANGE)
      return "CPU tuning override '" + item + "' is not key=value with a non-negative integer value";
    const std::string key = item.substr(0, eq);
    const Param *k = nullptr;
    for (const Param &c : kParams)
      if (key == c.key) k = &c;
    if (!k) {
      std::string keys;
      for (const Param &c : kParams) keys += (keys.empty() ? "" : ", ") + std::string(c.key);
      return "unknown CPU tuning key '" + key + "'; keys: " + keys;
    }
    if (v < k->lo || v > k->hi || v % k->step || (k->pow2 && (v & (v - 1))))
      return key + " must be " + k->rule + ", not " + item.substr(eq + 1);
    if (k->wide) t.*k->wide = v;
    else t.*k->narrow = int(v);
  }
  *out = t;
  return {};
}

std::atomic<const Tuning *> &current() {
  static std::atomic<const Tuning *> t{[] {
    Tuning *init = new Tuning;
    const char *env = std::getenv("SAEHOOK_CPU_CLASS");
    const std::string err = parse(env && *env ? env : "auto", init);
    if (!err.empty()) {  // a bad override must not silently measure the wrong parameters
      std::fprintf(stderr, "saehook: SAEHOOK_CPU_CLASS ignored: %s\n", err.c_str());
      parse("auto", init);
    }
    return init;
  }()};
  return t;
}

}  // namespace

const CpuId &cpuid_info() {
  static const CpuId c = detect();
  return c;
}

const Tuning &tuning() { return *current().load(std::memory_order_acquire); }

std::string set_tuning(const char *spec) {
  Tuning t;
  std::string err = parse(spec, &t);
  if (err.empty()) current().store(new Tuning(t), std::memory_order_release);  // a few bytes per call, kept
  return err;
}

const char *tuning_classes() {
  static const std::string names = [] {
    std::string s;
    for (const Tuning &t : kTable) s += (s.empty() ? "" : ",") + std::string(t.cls);
    return s;
  }();
  return names.c_str();
}

const char *cpu_info_json() {
  static std::mutex mu;
  static std::string buf;
  std::lock_guard<std::mutex> lock(mu);
  const CpuId &c = cpuid_info();
  const Tuning &t = tuning();
  std::string classes, params;
  for (const Tuning &k : kTable) classes += (classes.empty() ? "\"" : ", \"") + std::string(k.cls) + "\"";
  for (const Param &k : kParams)
    params += (params.empty() ? "\"" : ", \"") + std::string(k.key) + "\": " + std::to_string(get(t, k));
  char s[256];
  std::snprintf(s, sizeof s,
                "{\"vendor\": \"%s\", \"family\": %u, \"model\": %u, \"stepping\": %u, \"detected_class\": \"%s\", ",
                c.vendor, c.family, c.model, c.stepping, c.detected_class.c_str());
  buf = std::string(s) + "\"classes\": [" + classes + "], \"class\": \"" + t.cls + "\", \"params\": {" + params + "}}";
  return buf.c_str();
}

}  // namespace saehook::cpu
