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

// Loads of 16 consecutive weights (one k row of a panel) as two fp32 vectors.
struct F32W {
  using T = float;
  static inline void load16(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
};
struct BF16W {
  using T = uint16_t;
  static inline __m256 cvt(__m128i v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  static inline void load16(const T* p, __m256& lo, __m256& hi) {
    lo = cvt(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = cvt(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};
struct F16W {
  using T = uint16_t;
  static inline void load16(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};

// Every output element is one fp32 FMA chain over k = 0..K-1 in order, started at zero, then
// the bias is added: the same sequence of operations in every kernel below, whatever the number
// of rows M, the panel grouping or the thread. (The losslessness contract of tree verification.)

inline void store16(float* y, int n, int valid, __m256 lo, __m256 hi, const float* bias) {
  alignas(32) float tmp[16];
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  for (int j = 0; j < valid; ++j) y[n + j] = bias ? tmp[j] + bias[n + j] : tmp[j];
}

// Reloads partial sums stored by store16 (without bias) to continue their chains.
inline void load16(const float* y, int n, int valid, __m256& lo, __m256& hi) {
  alignas(32) float tmp[16] = {0};
  for (int j = 0; j < valid; ++j) tmp[j] = y[n + j];
  lo = _mm256_load_ps(tmp);
  hi = _mm256_load_ps(tmp + 8);
}

// MR rows of x against one panel (16 columns), over k in [0, K) of the slices given. With
// `resume` the chains continue from the partial sums in y; with `finish` the bias is added,
// otherwise the partial sums are stored for the next k block.
template <class W, int MR>
__attribute__((always_inline)) inline void rows_x_panel(const float* x, int ldx, int K, const typename W::T* panel,
                                                        const float* bias, int n, int valid, float* y, int ldy,
                                                        bool resume, bool finish) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (resume) load16(y + static_cast<int64_t>(i) * ldy, n, valid, lo[i], hi[i]);
    else lo[i] = hi[i] = _mm256_setzero_ps();
  }
  for (int k = 0; k < K; ++k) {
    __m256 wl, wh;
    W::load16(panel + static_cast<int64_t>(k) * 16, wl, wh);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_broadcast_ss(x + static_cast<int64_t>(i) * ldx + k);
      lo[i] = _mm256_fmadd_ps(xv, wl, lo[i]);
      hi[i] = _mm256_fmadd_ps(xv, wh, hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    store16(y + static_cast<int64_t>(i) * ldy, n, valid, lo[i], hi[i], finish ? bias : nullptr);
  }
}

// One row of x against four panels (64 columns): eight independent chains keep the FMA units
// busy while the four panels stream from memory (the decode case, M = 1).
template <class W>
__attribute__((always_inline)) inline void row_x_4panels(const float* x, int K, const typename W::T* p0,
                                                         const float* bias, int n, float* y) {
  const int64_t ps = static_cast<int64_t>(16) * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const typename W::T* p1 = p0 + ps;
  const typename W::T* p2 = p1 + ps;
  const typename W::T* p3 = p2 + ps;
  for (int k = 0; k < K; ++k) {
    const __m256 xv = _mm256_broadcast_ss(x + k);
    const int64_t o = static_cast<int64_t>(k) * 16;
    __m256 l, h;
    W::load16(p0 + o, l, h);
    a0 = _mm256_fmadd_ps(xv, l, a0);
    a1 = _mm256_fmadd_ps(xv, h, a1);
    W::load16(p1 + o, l, h);
    a2 = _mm256_fmadd_ps(xv, l, a2);
    a3 = _mm256_fmadd_ps(xv, h, a3);
    W::load16(p2 + o, l, h);
    a4 = _mm256_fmadd_ps(xv, l, a4);
    a5 = _mm256_fmadd_ps(xv, h, a5);
    W::load16(p3 + o, l, h);
    a6 = _mm256_fmadd_ps(xv, l, a6);
    a7 = _mm256_fmadd_ps(xv, h, a7);
  }
  store16(y, n, 16, a0, a1, bias);
  store16(y, n + 16, 16, a2, a3, bias);
  store16(y, n + 32, 16, a4, a5, bias);
  store16(y, n + 48, 16, a6, a7, bias);
}

template <class W>
void gemm_t(const float* x, int ldx, int M, int K, const void* wv, const float* bias, int n0, int n1, float* y, int ldy) {
  const typename W::T* w = static_cast<const typename W::T*>(wv);
  const int64_t ps = static_cast<int64_t>(16) * K;
  if (M == 1) {
    int n = n0;
    for (; n + 64 <= n1; n += 64) row_x_4panels<W>(x, K, w + (n / 16) * ps, bias, n, y);
    for (; n < n1; n += 16) {
      rows_x_panel<W, 1>(x, ldx, K, w + (n / 16) * ps, bias, n, n1 - n < 16 ? n1 - n : 16, y, ldy, false, true);
    }
    return;
  }
  // Several rows: k in blocks so that a panel slice (16 x kKBlock) and the rows' x slices stay
  // in L1/L2 while every row block passes over them. The chains continue across blocks through
  // y, so each element's operation sequence is the same as without blocking.
  // Few rows reuse each weight little: no blocking, one pass over every panel.
  const int kKBlock = M >= 16 ? 256 : K;
  for (int k0 = 0; k0 < K; k0 += kKBlock) {
    const int kb = K - k0 < kKBlock ? K - k0 : kKBlock;
    const bool resume = k0 > 0, finish = k0 + kb == K;
    for (int n = n0; n < n1; n += 16) {
      const typename W::T* panel = w + (n / 16) * ps + static_cast<int64_t>(k0) * 16;
      const int valid = n1 - n < 16 ? n1 - n : 16;
      int m = 0;
      for (; m + 6 <= M; m += 6) {
        rows_x_panel<W, 6>(x + static_cast<int64_t>(m) * ldx + k0, ldx, kb, panel, bias, n, valid,
                           y + static_cast<int64_t>(m) * ldy, ldy, resume, finish);
      }
      const float* xm = x + static_cast<int64_t>(m) * ldx + k0;
      float* ym = y + static_cast<int64_t>(m) * ldy;
      switch (M - m) {
        case 5: rows_x_panel<W, 5>(xm, ldx, kb, panel, bias, n, valid, ym, ldy, resume, finish); break;
        case 4: rows_x_panel<W, 4>(xm, ldx, kb, panel, bias, n, valid, ym, ldy, resume, finish); break;
        case 3: rows_x_panel<W, 3>(xm, ldx, kb, panel, bias, n, valid, ym, ldy, resume, finish); break;
        case 2: rows_x_panel<W, 2>(xm, ldx, kb, panel, bias, n, valid, ym, ldy, resume, finish); break;
        case 1: rows_x_panel<W, 1>(xm, ldx, kb, panel, bias, n, valid, ym, ldy, resume, finish); break;
        default: break;
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
