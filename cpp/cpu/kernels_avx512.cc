// AVX-512 (F + BW) GEMM. This translation unit alone is compiled with -mavx512f -mavx512bw
// -mfma -mf16c; everything in it has internal linkage (see kernels_avx2.cc for why).
//
// Same packed layout and the same per-element operation sequence as the AVX2 kernel (one fp32
// FMA chain over k in order, started at zero, then the bias): a 16-column panel row is one
// 512-bit vector, twice the columns per instruction, and 32 registers allow tiles of up to 8
// rows x 2 panels. Results are bit-identical to the AVX2 kernel's.
#include <immintrin.h>

#include <cstdint>

#include "cpu/avx512_tile.h"
#include "cpu/gemm_blocking.h"
#include "cpu/kernels.h"

namespace medusa_rt::cpu {
namespace {

struct F32W {
  using T = float;
  static constexpr bool kScaled = false;
  static inline __m512 load(const T* p, __m512i) { return _mm512_loadu_ps(p); }
};
// bf16 rows are interleaved (c0, c8, c1, c9, ..., c7, c15); one word permutation puts column j's
// 16 bits in the high half of lane j and zeroes the low halves: that is the fp32 value.
struct BF16W {
  using T = uint16_t;
  static constexpr bool kScaled = false;
  static inline __m512 load(const T* p, __m512i idx) {
    const __m512i v = _mm512_maskz_loadu_epi16(0xffffu, p);  // the row's 16 words, upper half zero
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, v));
  }
};
struct F16W {
  using T = uint16_t;
  static constexpr bool kScaled = false;
  static inline __m512 load(const T* p, __m512i) {
    return _mm512_maskz_cvtph_ps(0xffffu, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

// int8 rows widen exactly; the tile multiplies them by their group's scales (kScaled).
struct I8W {
  using T = int8_t;
  static constexpr bool kScaled = true;
  static inline __m512 load(const T* p, __m512i) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

// Word index for BF16W: output word 2j+1 takes the packed position of column j.
inline __m512i bf16_index() {
  alignas(64) int16_t idx[32];
  for (int j = 0; j < 16; ++j) {
    idx[2 * j] = 0;
    idx[2 * j + 1] = static_cast<int16_t>(j < 8 ? 2 * j : 2 * (j - 8) + 1);
  }
  return _mm512_load_si512(idx);
}


// Software prefetch distance in each panel's stream (measured: 2 KB beat 4 KB here with eight
// panels in flight per core).
constexpr int kPrefetchBytes = 2048;

// MR rows of x against NP consecutive panels (panel p at p0 + p * ps), k in [0, K). With
// `resume` the chains continue from the partial sums in y; with `finish` the bias is added,
// otherwise partial sums are stored for the next k block. `valid`: columns of the last panel.
// Scaled (int8) weights: sc holds the first panel's scales from this k range's first group on
// (the k range starts at a group boundary), the next panel's ps bytes further; each weight
// vector is multiplied by its group's scales before the FMAs.
template <class W, int MR, int NP>
__attribute__((always_inline)) inline void tile(const float* x, int ldx, int K, const typename W::T* p0, int64_t ps,
                                                const float* bias, int n, int valid, float* y, int ldy, bool resume,
                                                bool finish, __m512i idx, const float* sc) {
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      const __mmask16 m = valid_mask(p == NP - 1 ? valid : 16);
      acc[i][p] = resume ? _mm512_maskz_loadu_ps(m, y + static_cast<int64_t>(i) * ldy + n + 16 * p) : _mm512_setzero_ps();
    }
  }
  [[maybe_unused]] __m512 scale[NP];  // loaded at k = 0 and at each group's first k
  if constexpr (W::kScaled) {
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) scale[p] = _mm512_setzero_ps();
  }
  for (int k = 0; k < K; ++k) {
    const int64_t o = static_cast<int64_t>(k) * 16;
    if constexpr (W::kScaled) {
      if (k % kI8Group == 0) {
#pragma GCC unroll 8
        for (int p = 0; p < NP; ++p) {
          scale[p] = _mm512_loadu_ps(reinterpret_cast<const float*>(reinterpret_cast<const char*>(sc) + p * ps) +
                                     (k / kI8Group) * 16);
        }
      }
    }
    __m512 w[NP];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      if (k % (64 / (16 * sizeof(typename W::T))) == 0) {  // once per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(p0 + p * ps + o) + kPrefetchBytes, _MM_HINT_T0);
      }
      w[p] = W::load(p0 + p * ps + o, idx);
      if constexpr (W::kScaled) w[p] = _mm512_mul_ps(w[p], scale[p]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(x[static_cast<int64_t>(i) * ldx + k]);
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_fmadd_ps(xv, w[p], acc[i][p]);
    }
  }
  store_tile<MR, NP>(acc, y, ldy, n, valid, finish ? bias : nullptr);
}

// Panels per tile for a block of MR rows: 12-16 independent chains where the rows allow
// (FMA latency x two FMA ports needs at least 8 in flight).
constexpr int panels_for(int mr) { return mr == 1 ? 8 : mr == 2 ? 6 : mr == 3 ? 4 : mr == 4 ? 3 : 2; }

template <class W, int MR, int NP>
inline void tile_np(const float* x, int ldx, int K, const typename W::T* p0, int64_t ps, int np, const float* bias,
                    int n, int valid, float* y, int ldy, bool resume, bool finish, __m512i idx, const float* sc) {
  if constexpr (NP > 1) {
    if (np < NP) {
      tile_np<W, MR, NP - 1>(x, ldx, K, p0, ps, np, bias, n, valid, y, ldy, resume, finish, idx, sc);
      return;
    }
  }
  tile<W, MR, NP>(x, ldx, K, p0, ps, bias, n, valid, y, ldy, resume, finish, idx, sc);
}

// Row blocks of at most 8 rows (12 as 6 + 6 would keep fewer chains per block than 8 + 4).
template <class W>
inline void all_rows(const float* x, int ldx, int M, int K, const typename W::T* p0, int64_t ps, int np,
                     const float* bias, int n, int valid, float* y, int ldy, bool resume, bool finish, __m512i idx,
                     const float* sc) {
  for (int m = 0; m < M;) {
    const int left = M - m;
    const int mr = left >= 8 ? 8 : left;
    const float* xm = x + static_cast<int64_t>(m) * ldx;
    float* ym = y + static_cast<int64_t>(m) * ldy;
    // A block gets at most the group's panels, in tiles of its own width.
    const int width = panels_for(mr);
    for (int p = 0; p < np; p += width) {
      const int q = np - p < width ? np - p : width;
      const int v = p + q == np ? valid : 16;
      const typename W::T* pp = p0 + p * ps;
      const float* sp = W::kScaled ? reinterpret_cast<const float*>(reinterpret_cast<const char*>(sc) + p * ps) : sc;
      const int nn = n + 16 * p;
      switch (mr) {
        case 1: tile_np<W, 1, panels_for(1)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        case 2: tile_np<W, 2, panels_for(2)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        case 3: tile_np<W, 3, panels_for(3)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        case 4: tile_np<W, 4, panels_for(4)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        case 5: tile_np<W, 5, panels_for(5)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        case 6: tile_np<W, 6, panels_for(6)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        case 7: tile_np<W, 7, panels_for(7)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
        default: tile_np<W, 8, panels_for(8)>(xm, ldx, K, pp, ps, q, bias, nn, v, ym, ldy, resume, finish, idx, sp); break;
      }
    }
    m += mr;
  }
}

template <class W>
void gemm_t(const float* x, int ldx, int M, int K, const void* wv, const float* bias, int n0, int n1, float* y, int ldy) {
  const typename W::T* w = static_cast<const typename W::T*>(wv);
  // A panel: (int8) its scales, 64 bytes per group of kI8Group k, then 16 values per k.
  const int64_t scale_bytes = W::kScaled ? static_cast<int64_t>((K + kI8Group - 1) / kI8Group) * 64 : 0;
  const int64_t ps = scale_bytes + static_cast<int64_t>(16) * K;
  const __m512i idx = bf16_index();
  // Panel groups as wide as the first row block's tile; more than one row block: k in blocks
  // too (a multiple of kI8Group), so the group's slice stays in L1 while the blocks pass.
  const int group = panels_for(M >= 8 ? 8 : M);
  static_assert(256 % kI8Group == 0, "k blocks start at scale groups");
  for_each_panel_pass(K, n0, n1, group, M > 8 ? 256 : K, [&](const PanelPass& q) {
    const typename W::T* panel = w + (q.n / 16) * ps;
    all_rows<W>(x + q.k0, ldx, M, q.kb, panel + scale_bytes + static_cast<int64_t>(q.k0) * 16, ps, q.np, bias, q.n,
                q.valid, y, ldy, q.resume, q.finish, idx,
                reinterpret_cast<const float*>(panel) + (q.k0 / kI8Group) * 16);
  });
}

}  // namespace

#ifdef MEDUSA_RT_HAVE_AVX512BF16_TU
void gemm_avx512_bf16_pairs(const float* x, int ldx, int M, int K, const void* w, const float* bias, int n0, int n1,
                            float* y, int ldy);  // kernels_avx512_bf16.cc
#endif

void gemm_avx512(const float* x, int ldx, int M, int K, const void* w, WType wt, const float* bias, int n0, int n1,
                 float* y, int ldy) {
  switch (wt) {
    case WType::kF32: gemm_t<F32W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kBF16: gemm_t<BF16W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kF16: gemm_t<F16W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kI8: gemm_t<I8W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kBF16Pairs:
#ifdef MEDUSA_RT_HAVE_AVX512BF16_TU
      gemm_avx512_bf16_pairs(x, ldx, M, K, w, bias, n0, n1, y, ldy);
#else
      generic_kernels().gemm(x, ldx, M, K, w, wt, bias, n0, n1, y, ldy);
#endif
      break;
  }
}

}  // namespace medusa_rt::cpu
