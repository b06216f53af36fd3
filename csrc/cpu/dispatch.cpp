// Run-time choice of the CPU kernel path from what the processor reports.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define SAEHOOK_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace saehook::cpu {

extern const Kernels kernels_baseline;
#ifdef SAEHOOK_HAVE_AVX2
extern const Kernels kernels_avx2;
#endif
#ifdef SAEHOOK_HAVE_AVX2_VNNI
extern const Kernels kernels_avx2_vnni;
#endif
#ifdef SAEHOOK_HAVE_AVX512
extern const Kernels kernels_avx512;
#endif
#ifdef SAEHOOK_HAVE_AVX512_VNNI
extern const Kernels kernels_avx512_vnni;
extern const Kernels kernels_avx512_vnni_int8;
#endif
#ifdef SAEHOOK_HAVE_AMX
extern const Kernels kernels_avx512_amx;
#endif

namespace {

#ifdef SAEHOOK_X86
// OS support for the AVX (ymm) and AVX-512 (opmask, zmm) register state.
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

bool cpu_has_avx2() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  if ((xgetbv0() & 0x6) != 0x6) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);
}

bool cpu_has_avx2_vnni() {  // AVX-VNNI: VEX-encoded vpdpbusd on ymm
  if (!cpu_has_avx2()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a & (1u << 4);
}

bool cpu_has_avx512() {
  if (!cpu_has_avx2()) return false;
  if ((xgetbv0() & 0xe6) != 0xe6) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  return f && bw && vl;
}

bool cpu_has_avx512_vnni_int8() {  // AVX512_VNNI (vpdpbusd)
  if (!cpu_has_avx512()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return c & (1u << 11);
}

bool cpu_has_avx512_vnni() {  // AVX512_VNNI and AVX512_BF16 (vdpbf16ps)
  if (!cpu_has_avx512_vnni_int8()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a & (1u << 5);
}

#ifdef SAEHOOK_HAVE_AMX
// AMX-TILE, AMX-BF16 and AMX-INT8, the OS saving the tile state (XCR0 bits 17, 18), and, on
// Linux, the process's permission to use it (asked once; a thread touching tile data without it
// dies of SIGILL).
bool cpu_has_amx() {
  static const bool ok = [] {
    if (!cpu_has_avx512_vnni()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool bf16 = d & (1u << 22), tile = d & (1u << 24), int8 = d & (1u << 25);
    if (!(bf16 && tile && int8)) return false;
    if ((xgetbv0() & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
#endif
#endif

struct Entry {
  const Kernels *k;
  bool (*runs_here)();
};

bool always() { return true; }

// Best first.
const Entry kEntries[] = {
#ifdef SAEHOOK_HAVE_AMX
    {&kernels_avx512_amx, cpu_has_amx},
#endif
#ifdef SAEHOOK_HAVE_AVX512_VNNI
    {&kernels_avx512_vnni, cpu_has_avx512_vnni},
    {&kernels_avx512_vnni_int8, cpu_has_avx512_vnni_int8},
#endif
#ifdef SAEHOOK_HAVE_AVX512
    {&kernels_avx512, cpu_has_avx512},
#endif
#ifdef SAEHOOK_HAVE_AVX2_VNNI
    {&kernels_avx2_vnni, cpu_has_avx2_vnni},
#endif
#ifdef SAEHOOK_HAVE_AVX2
    {&kernels_avx2, cpu_has_avx2},
#endif
    {&kernels_baseline, always},
};

const Kernels *best() {
  for (const Entry &e : kEntries)
    if (e.runs_here()) return e.k;
  return &kernels_baseline;
}

const Kernels *initial() {
  const char *env = std::getenv("SAEHOOK_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    for (const Entry &e : kEntries)
      if (std::strcmp(e.k->name, env) == 0 && e.runs_here()) return e.k;
  }
  return best();
}

std::atomic<const Kernels *> &current() {
  static std::atomic<const Kernels *> k{initial()};
  return k;
}

}  // namespace

const Kernels &active() { return *current().load(std::memory_order_relaxed); }

bool select(const char *name) {
  if (!name || std::strcmp(name, "auto") == 0) {
    current().store(best());
    return true;
  }
  for (const Entry &e : kEntries)
    if (std::strcmp(e.k->name, name) == 0 && e.runs_here()) {
      current().store(e.k);
      return true;
    }
  return false;
}

const char *available() {
  static const std::string names = [] {
    std::string s;
    for (const Entry &e : kEntries)
      if (e.runs_here()) s += (s.empty() ? "" : ",") + std::string(e.k->name);
    return s;
  }();
  return names.c_str();
}

}  // namespace saehook::cpu
