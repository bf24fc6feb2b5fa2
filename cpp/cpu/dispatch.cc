#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

#ifdef MEDUSA_RT_HAVE_AVX2_TU
const Kernels* avx2_kernels_impl();  // kernels_avx2.cc
#endif

const Kernels* avx2_kernels() {
#if defined(MEDUSA_RT_HAVE_AVX2_TU) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? avx2_kernels_impl() : nullptr;
#else
  return nullptr;
#endif
}

const Kernels& kernels() {
  static const Kernels* chosen = [] {
    const char* force = std::getenv("MEDUSA_RT_ISA");
    if (force && std::strcmp(force, "generic") == 0) return &generic_kernels();
    const Kernels* k = avx2_kernels();
    return k ? k : &generic_kernels();
  }();
  return *chosen;
}

}  // namespace medusa_rt::cpu
