// CPU classes and their kernel parameters: the tuning numbers that differ between machines
// (prefetch distance, block sizes, batch-1 interleaving), chosen once from cpuid and passed to
// the kernels, whose bodies stay one per ISA. README "CPU kernel performance" has the table per
// class with where each number was measured.
#pragma once

#include <cstdint>
#include <string>

namespace saehook::cpu {

struct Tuning {
  const char *cls;  // the class these parameters are for ("zen5", "zen4", "spr", "zen3", "generic")
  // Batch-1 row kernels: software prefetch this many bytes ahead in each weight row, bf16 and
  // int8 weights apart (0: none, the hardware prefetcher alone). An int8 row of d_model 4096 is
  // one 4 KiB page, where the hardware's stream prefetch stops, so int8 leans on this more.
  int64_t stream_prefetch, stream_prefetch_i8;
  // Batch-1 bf16 dot-product tiles: feature rows read interleaved (1, 2, 4 or 8).
  int batch1_rows_bf16;
  // Batch 1: whether each 4-feature tile takes its rows from the block's 4 quarters (four
  // sequential streams, as the read probe reads, 1) instead of the kernels above (0). Every path;
  // bf16 then ignores batch1_rows_bf16.
  int batch1_quarters;
  // Encoder weight bytes per task: at batch 1 (streamed once) and at several rows (the block
  // stays in L2 while every row of the chunk is multiplied with it).
  int64_t block_bytes_1, block_bytes_n;
  // Packed-panel kernels: inputs per pass over a block's panel (a multiple of 128), and whether
  // they prefetch (into L2) the weights of the block the thread takes next while multiplying
  // this one (1) or read them when packing (0).
  int64_t panel_chunk;
  int panel_prefetch_next;
  // Sparse decode: rows prefetched this many features ahead; whether float32 decoders take the
  // row walk (1: each feature row whole, as for 2-byte decoders) instead of the chunked one (0);
  // whether that prefetch goes into L2 (1: prefetcht1) or L1 (0: prefetcht0).
  int gather_ahead;
  int gather_rows_f32;
  int gather_l2;
  // Batches of more than one row tile and at most few_rows rows take the few-rows order of the
  // dot-product tiles (kernels_impl.hpp, kernels_vnni_impl.hpp) instead of the row-tile-major order
  // or the packed panels (avx512_vnni also caps it per dtype: f32 below 16 rows, bf16 16, int8 12);
  // 0: off. few_rows_l2: whether those tiles prefetch the next feature group into L2 (1: prefetcht1)
  // or L1 (0: prefetcht0); with 1 the order starts at 2 rows (one row tile gains from it too).
  int few_rows;
  int few_rows_l2;
};

// What cpuid says about the processor, and the class it was put in.
struct CpuId {
  char vendor[13];
  unsigned family, model, stepping;
  std::string detected_class;
};

const CpuId &cpuid_info();
// The parameters in use: the detected class's, or SAEHOOK_CPU_CLASS's at start-up, or the last
// set_tuning's.
const Tuning &tuning();
// Switches parameters: a class name ("auto" = the detected one), optionally followed by
// ",key=value" overrides (keys as in Tuning, e.g. "zen5,stream_prefetch=512"). Returns an error
// message, empty on success. For measurement and tests; not while kernels run in other threads.
std::string set_tuning(const char *spec);
// Comma-separated class names of the table.
const char *tuning_classes();
// JSON: vendor, family, model, stepping, detected class, parameters in use.
const char *cpu_info_json();

}  // namespace saehook::cpu
