// Pieces the AVX-512 GEMM tiles share. Included only by translation units compiled with
// AVX-512 (kernels_avx512.cc, kernels_avx512_bf16.cc); internal linkage, like everything there.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace medusa_rt::cpu {
namespace {

// Lanes of a 16-column panel that exist (`valid` columns).
inline __mmask16 valid_mask(int valid) { return static_cast<__mmask16>(valid >= 16 ? 0xffffu : (1u << valid) - 1u); }

// Stores an MR x NP tile of 16-column accumulators at column n of y (row stride ldy), adding the
// bias (if any); the last panel has `valid` columns.
template <int MR, int NP>
__attribute__((always_inline)) inline void store_tile(const __m512 (&acc)[MR][NP], float* y, int ldy, int n,
                                                      int valid, const float* bias) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      const __mmask16 m = valid_mask(p == NP - 1 ? valid : 16);
      __m512 v = acc[i][p];
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n + 16 * p));
      _mm512_mask_storeu_ps(y + static_cast<int64_t>(i) * ldy + n + 16 * p, m, v);
    }
  }
}

}  // namespace
}  // namespace medusa_rt::cpu
