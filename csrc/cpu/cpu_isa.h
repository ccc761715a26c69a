// Run-time choice of the instruction set for the CPU kernels' hot loops (shared by
// masked_topk.cpp and mixture.cpp). Each kernel compiles its hot loops three times, with
// ACN_TARGET_AVX512, ACN_TARGET_AVX2 and no target attribute (the baseline the extension is built
// for), and calls the variant cpu_isa() names.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define ACN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma")))
#define ACN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else  // other architectures: three copies of the baseline, only kBase is ever picked
#define ACN_TARGET_AVX512
#define ACN_TARGET_AVX2
#endif

namespace acn {

enum class Isa { kBase, kAvx2, kAvx512 };

// The best variant this CPU runs, detected once. ACN_CPU_ISA=base|avx2 caps it (the tests run
// every variant on one machine that way).
inline Isa cpu_isa() {
  static const Isa chosen = [] {
    const char* cap = std::getenv("ACN_CPU_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return Isa::kBase;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap && std::strcmp(cap, "avx2") == 0) return avx2 ? Isa::kAvx2 : Isa::kBase;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
      return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kBase;
  }();
  return chosen;
}

}  // namespace acn
