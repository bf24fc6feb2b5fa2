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

// MR rows of x times NR rows of w. One accumulator per output element, one FMA per 8 k:
// the reduction order of an element does not depend on MR or NR.
template <class W, int MR, int NR>
inline void micro(const float* x, int ldx, int K, const typename W::T* w, const float* bias, int n, float* y, int ldy) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int K8 = K & ~7;
  for (int k = 0; k < K8; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + static_cast<int64_t>(i) * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = W::load8(w + static_cast<int64_t>(j) * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const float* xi = x + static_cast<int64_t>(i) * ldx;
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      const typename W::T* wj = w + static_cast<int64_t>(j) * K;
      for (int k = K8; k < K; ++k) s = std::fma(xi[k], W::load1(wj + k), s);
      y[static_cast<int64_t>(i) * ldy + n + j] = bias ? s + bias[n + j] : s;
    }
  }
}

template <class W, int NR>
inline void column_block(const float* x, int ldx, int M, int K, const typename W::T* w, const float* bias, int n,
                         float* y, int ldy) {
  int m = 0;
  for (; m + 2 <= M; m += 2) {
    micro<W, 2, NR>(x + static_cast<int64_t>(m) * ldx, ldx, K, w, bias, n, y + static_cast<int64_t>(m) * ldy, ldy);
  }
  if (m < M) micro<W, 1, NR>(x + static_cast<int64_t>(m) * ldx, ldx, K, w, bias, n, y + static_cast<int64_t>(m) * ldy, ldy);
}

template <class W>
void gemm_t(const float* x, int ldx, int M, int K, const void* wv, const float* bias, int n0, int n1, float* y, int ldy) {
  const typename W::T* w = static_cast<const typename W::T*>(wv);
  int n = n0;
  // Large M (prefill): walk rows of x in blocks so that a block stays in L2 across columns.
  const int mblock = M <= 32 ? M : 32;
  for (; n + 4 <= n1; n += 4) {
    for (int m0 = 0; m0 < M; m0 += mblock) {
      const int mb = M - m0 < mblock ? M - m0 : mblock;
      column_block<W, 4>(x + static_cast<int64_t>(m0) * ldx, ldx, mb, K, w + static_cast<int64_t>(n) * K, bias, n,
                         y + static_cast<int64_t>(m0) * ldy, ldy);
    }
  }
  for (; n < n1; ++n) column_block<W, 1>(x, ldx, M, K, w + static_cast<int64_t>(n) * K, bias, n, y, ldy);
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
