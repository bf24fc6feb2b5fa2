// AVX2 + FMA + F16C kernels. This translation unit alone is compiled with -mavx2 -mfma -mf16c;
// everything in it has internal linkage so no AVX instruction can leak into code that runs
// on a CPU without AVX2 (it uses no inline library templates for the same reason).
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

struct F32W {
  using T = float;
  static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const T* p) { return *p; }
};
struct BF16W {
  using T = uint16_t;
  static inline __m256 load8(const T* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  static inline float load1(const T* p) {
    uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
struct F16W {
  using T = uint16_t;
  static inline __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline float load1(const T* p) { return _cvtsh_ss(*p); }
};

// MR rows of x times NR rows (r0 .. r0+NR-1) of one packed panel (see packing.h). One
// accumulator per output element, one FMA per chunk of 8 k, chunks in order, then a fixed
// horizontal sum: the reduction order of an element does not depend on MR, NR or M.
template <class W, int MR, int NR>
__attribute__((always_inline)) inline void micro(const float* x, int ldx, int K, const typename W::T* panel, int r0, const float* bias, int n,
                  int valid, float* y, int ldy) {
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int full = K / 8, tail = K % 8;
  const typename W::T* w = panel + r0 * 8;
  for (int c = 0; c < full; ++c, w += 64) {
    __m256 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + static_cast<int64_t>(i) * ldx + c * 8);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = W::load8(w + j * 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (tail) {  // the packed weights are zero past K; mask x so nothing is read past a row
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_maskload_ps(x + static_cast<int64_t>(i) * ldx + full * 8, mask);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = W::load8(w + j * 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR && r0 + j < valid; ++j) {
      const float s = hsum(acc[i][j]);
      y[static_cast<int64_t>(i) * ldy + n + r0 + j] = bias ? s + bias[n + r0 + j] : s;
    }
  }
}

template <class W>
void gemm_t(const float* x, int ldx, int M, int K, const void* wv, const float* bias, int n0, int n1, float* y, int ldy) {
  const typename W::T* w = static_cast<const typename W::T*>(wv);
  const int64_t panel_stride = int64_t(8) * ((K + 7) / 8 * 8);
  // Large M (prefill): rows of x in blocks that stay in cache while a panel is reused.
  const int mblock = M <= 32 ? M : 32;
  for (int n = n0; n < n1; n += 8) {
    const typename W::T* panel = w + (n / 8) * panel_stride;
    const int valid = n1 - n < 8 ? n1 - n : 8;
    if (M == 1) {
      micro<W, 1, 8>(x, ldx, K, panel, 0, bias, n, valid, y, ldy);
      continue;
    }
    for (int m0 = 0; m0 < M; m0 += mblock) {
      const int mend = M < m0 + mblock ? M : m0 + mblock;
      for (int r0 = 0; r0 < valid; r0 += 4) {
        int m = m0;
        for (; m + 2 <= mend; m += 2) {
          micro<W, 2, 4>(x + static_cast<int64_t>(m) * ldx, ldx, K, panel, r0, bias, n, valid,
                         y + static_cast<int64_t>(m) * ldy, ldy);
        }
        if (m < mend) {
          micro<W, 1, 4>(x + static_cast<int64_t>(m) * ldx, ldx, K, panel, r0, bias, n, valid,
                         y + static_cast<int64_t>(m) * ldy, ldy);
        }
      }
    }
  }
}

void gemm_avx2(const float* x, int ldx, int M, int K, const void* w, WType wt, const float* bias, int n0, int n1,
               float* y, int ldy) {
  switch (wt) {
    case WType::kF32: gemm_t<F32W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kBF16: gemm_t<BF16W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kF16: gemm_t<F16W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
  }
}

inline float dot(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  const int n8 = n & ~7;
  for (int i = 0; i < n8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (int i = n8; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

void attend_avx2(const AttendArgs& a) {
  const int n = a.prefix_len + a.num_extra;
  const int hd = a.head_dim;
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const int key = j < a.prefix_len ? j : a.extra[j - a.prefix_len];
    const float s = dot(a.q, a.k + static_cast<int64_t>(key) * hd, hd) * a.scale;
    a.scores[j] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    const float e = std::exp(a.scores[j] - mx);
    a.scores[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
  const int hd8 = hd & ~7;
  // Accumulate the output 8 dims at a time over keys in index order.
  for (int d = 0; d < hd8; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const int key = j < a.prefix_len ? j : a.extra[j - a.prefix_len];
      acc = _mm256_fmadd_ps(_mm256_set1_ps(a.scores[j] * inv), _mm256_loadu_ps(a.v + static_cast<int64_t>(key) * hd + d), acc);
    }
    _mm256_storeu_ps(a.out + d, acc);
  }
  for (int d = hd8; d < hd; ++d) {
    float acc = 0.f;
    for (int j = 0; j < n; ++j) {
      const int key = j < a.prefix_len ? j : a.extra[j - a.prefix_len];
      acc = std::fma(a.scores[j] * inv, a.v[static_cast<int64_t>(key) * hd + d], acc);
    }
    a.out[d] = acc;
  }
}

}  // namespace

const Kernels* avx2_kernels_impl() {
  static const Kernels k{"avx2", gemm_avx2, attend_avx2};
  return &k;
}

}  // namespace medusa_rt::cpu
