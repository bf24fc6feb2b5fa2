#include <cstdio>
#include <cstdlib>
#include <string>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

#ifdef MEDUSA_RT_HAVE_AVX2_TU
const Kernels* avx2_kernels_impl();  // kernels_avx2.cc
#endif
#ifdef MEDUSA_RT_HAVE_AVX512_TU
void gemm_avx512(const float* x, int ldx, int M, int K, const void* w, WType wt, const float* bias, int n0, int n1,
                 float* y, int ldy);  // kernels_avx512.cc
#endif

const Kernels* avx2_kernels() {
#if defined(MEDUSA_RT_HAVE_AVX2_TU) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? avx2_kernels_impl() : nullptr;
#else
  return nullptr;
#endif
}

// The AVX2 set with the AVX-512 GEMM: the matrix products are where the wider vectors and the
// 32 registers pay; attention and the elementwise kernels stay 256-bit.
const Kernels* avx512_kernels() {
#if defined(MEDUSA_RT_HAVE_AVX512_TU) && (defined(__x86_64__) || defined(__i386__))
  static const Kernels* k = []() -> const Kernels* {
    const Kernels* base = avx2_kernels();
    if (!base || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return nullptr;
    static Kernels t = *base;
    t.isa = "avx512";
    t.gemm = gemm_avx512;
    return &t;
  }();
  return k;
#else
  return nullptr;
#endif
}

bool bf16_pairs_supported() {
#if defined(MEDUSA_RT_HAVE_AVX512BF16_TU) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = &kernels() == avx512_kernels() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

const Kernels& kernels() {
  static const Kernels* chosen = [] {
    const char* force = std::getenv("MEDUSA_RT_ISA");
    std::string cap = force ? force : "";
    if (!cap.empty() && cap != "avx512" && cap != "avx2" && cap != "generic") {
      std::fprintf(stderr, "[medusa_rt] MEDUSA_RT_ISA=%s is not avx512, avx2 or generic; ignored\n", force);
      cap.clear();
    }
    const Kernels* k = nullptr;
    if (cap.empty() || cap == "avx512") k = avx512_kernels();
    if (!k && cap != "generic") k = avx2_kernels();
    return k ? k : &generic_kernels();
  }();
  return *chosen;
}

}  // namespace medusa_rt::cpu
