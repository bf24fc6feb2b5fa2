// The kBF16Pairs GEMM: bf16 weights and inputs rounded to bf16, fp32 accumulation, with the
// AVX512-BF16 dot product (vdpbf16ps: 32 products per instruction, twice the multiply-adds of an
// fp32 FMA). This translation unit alone is compiled with -mavx512bf16; it runs only where
// bf16_pairs_supported() (the engine's matmul_inputs="bf16").
//
// Each output element is one chain of dot-product steps over the k pairs in order, started at
// zero, then the bias: the same sequence whatever the number of rows, the tile or the thread
// (the losslessness contract of tree verification).
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "cpu/avx512_tile.h"
#include "cpu/kernels.h"
#include "cpu/packing.h"

namespace medusa_rt::cpu {
namespace {

constexpr int kPrefetchBytes = 2048;

// MR rows of packed inputs (xp: [rows][kp] 32-bit pairs of bf16) against NP consecutive panels
// (panel p at p0 + p * ps, kp pairs of 16 columns: 64 bytes each).
template <int MR, int NP>
__attribute__((always_inline)) inline void tile(const uint32_t* xp, int kp, const uint16_t* p0, int64_t ps,
                                                const float* bias, int n, int valid, float* y, int ldy) {
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  }
  for (int k = 0; k < kp; ++k) {
    __m512i w[NP];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      const uint16_t* src = p0 + p * ps + int64_t(k) * 32;
      _mm_prefetch(reinterpret_cast<const char*>(src) + kPrefetchBytes, _MM_HINT_T0);
      w[p] = _mm512_loadu_si512(src);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[int64_t(i) * kp + k]));
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], (__m512bh)w[p], xv);
    }
  }
  store_tile<MR, NP>(acc, y, ldy, n, valid, bias);
}

// Panels per tile: 24 accumulators at 8 rows, more panels for fewer rows (chains in flight); one
// row takes 4 (measured side by side in the engine: 8 panels made a 1-row step 0-20% slower
// than the exact kernel, 4 made it 10-15% faster).
constexpr int panels_for(int mr) { return mr == 1 ? 4 : mr == 2 ? 6 : mr <= 4 ? 4 : 3; }

template <int MR, int NP>
void tile_np(const uint32_t* xp, int kp, const uint16_t* p0, int64_t ps, int np, const float* bias, int n,
             int valid, float* y, int ldy) {
  if constexpr (NP > 1) {
    if (np < NP) {
      tile_np<MR, NP - 1>(xp, kp, p0, ps, np, bias, n, valid, y, ldy);
      return;
    }
  }
  tile<MR, NP>(xp, kp, p0, ps, bias, n, valid, y, ldy);
}

}  // namespace

void gemm_avx512_bf16_pairs(const float* x, int ldx, int M, int K, const void* wv, const float* bias, int n0, int n1,
                            float* y, int ldy) {
  const uint16_t* w = static_cast<const uint16_t*>(wv);
  const int kp = (K + 1) / 2;
  const int64_t ps = int64_t(2) * kPanel * kp;
  // The inputs as bf16 pairs, rounded to nearest even (grows once to the largest call).
  thread_local std::vector<uint32_t> xp;
  if (xp.size() < size_t(M) * kp) xp.resize(size_t(M) * kp);
  for (int m = 0; m < M; ++m) {
    const float* xm = x + int64_t(m) * ldx;
    uint32_t* dst = xp.data() + int64_t(m) * kp;
    int k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + k + 16), _mm512_loadu_ps(xm + k));
      _mm512_storeu_si512(dst + k / 2, (__m512i)v);
    }
    for (; k < K; k += 2) {  // the tail (an odd K pads with zero)
      const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>(K - k >= 2 ? 3 : 1), xm + k);
      dst[k / 2] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128((__m256i)_mm512_cvtneps_pbh(v))));
    }
  }
  // Panel groups as wide as the first row block's tile; every row block passes over a group
  // while its weights are in cache, so they come from memory once.
  const int pan0 = n0 / kPanel, pan1 = (n1 + kPanel - 1) / kPanel;
  const int group = panels_for(M >= 8 ? 8 : M);
  for (int p = pan0; p < pan1; p += group) {
    const int np = pan1 - p < group ? pan1 - p : group;
    const int last = kPanel * (p + np - 1), valid = n1 - last < kPanel ? n1 - last : kPanel;
    const uint16_t* wp = w + p * ps;
    for (int m = 0; m < M;) {
      const int mr = M - m >= 8 ? 8 : M - m;
      const uint32_t* xm = xp.data() + int64_t(m) * kp;
      float* ym = y + int64_t(m) * ldy;
      const int n = kPanel * p;
      switch (mr) {
        case 1: tile_np<1, panels_for(1)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        case 2: tile_np<2, panels_for(2)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        case 3: tile_np<3, panels_for(3)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        case 4: tile_np<4, panels_for(4)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        case 5: tile_np<5, panels_for(5)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        case 6: tile_np<6, panels_for(6)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        case 7: tile_np<7, panels_for(7)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
        default: tile_np<8, panels_for(8)>(xm, kp, wp, ps, np, bias, n, valid, ym, ldy); break;
      }
      m += mr;
    }
  }
}

}  // namespace medusa_rt::cpu
