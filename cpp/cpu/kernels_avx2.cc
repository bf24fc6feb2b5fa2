// AVX2 + FMA + F16C kernels. This translation unit alone is compiled with -mavx2 -mfma -mf16c;
// everything in it has internal linkage so no AVX instruction can leak into code that runs
// on a CPU without AVX2 (it uses no inline library templates for the same reason).
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu/gemm_blocking.h"
#include "cpu/kernels.h"

namespace medusa_rt::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Loads of one k row of a panel (16 weights) as two fp32 vectors: columns 0..7 and 8..15.
struct F32W {
  using T = float;
  static constexpr bool kScaled = false;
  static inline void load16(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
};
struct BF16W {  // interleaved pairs (c_j, c_j+8) per 32-bit lane: a shift and a mask widen them
  using T = uint16_t;
  static constexpr bool kScaled = false;
  static inline void load16(const T* p, __m256& lo, __m256& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
  }
};
struct F16W {
  using T = uint16_t;
  static constexpr bool kScaled = false;
  static inline void load16(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};
struct I8W {  // widened exactly; the tile multiplies them by their group's scales
  using T = int8_t;
  static constexpr bool kScaled = true;
  static inline void load16(const T* p, __m256& lo, __m256& hi) {  // (the 8-byte loads fold into vpmovsxbd)
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
};

// Every output element is one fp32 FMA chain over k = 0..K-1 in order, started at zero, then
// the bias is added: the same sequence of operations in every tile shape below, whatever the
// number of rows M, the grouping of rows and panels or the thread. (The losslessness contract
// of tree verification.)

inline void store16(float* y, int n, int valid, __m256 lo, __m256 hi, const float* bias) {
  if (valid == 16 && !bias) {
    _mm256_storeu_ps(y + n, lo);
    _mm256_storeu_ps(y + n + 8, hi);
    return;
  }
  alignas(32) float tmp[16];
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  for (int j = 0; j < valid; ++j) y[n + j] = bias ? tmp[j] + bias[n + j] : tmp[j];
}

#ifndef MEDUSA_RT_PREFETCH
#define MEDUSA_RT_PREFETCH 4096
#endif
constexpr int kPrefetchBytes = MEDUSA_RT_PREFETCH;

// A tile: MR rows of x against NP consecutive panels (16 NP columns, panel p at p0 + p * ps),
// over all of k. Weights are read once per tile and reused by the MR rows; MR * NP * 2
// accumulators are independent chains. `valid`: columns of the last panel that exist. Scaled
// (int8) weights: sc holds the first panel's scales (16 per group of kI8Group k), the next
// panel's ps bytes further; each weight vector is multiplied by its scales before the FMAs.
template <class W, int MR, int NP>
__attribute__((always_inline)) inline void tile(const float* x, int ldx, int K, const typename W::T* p0, int64_t ps,
                                                const float* bias, int n, int valid, float* y, int ldy,
                                                const float* sc) {
  __m256 acc[MR][NP][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[i][p][0] = acc[i][p][1] = _mm256_setzero_ps();
  }
  for (int k = 0; k < K; ++k) {
    const int64_t o = static_cast<int64_t>(k) * 16;
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      // Software prefetch a few cache lines ahead of the weight stream, once per 64-byte line
      // (the hardware prefetcher alone leaves the FMA units waiting when several rows share
      // each weight).
      if (k % (64 / (16 * sizeof(typename W::T))) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(p0 + p * ps + o) + kPrefetchBytes, _MM_HINT_T0);
      }
      __m256 wl, wh;
      W::load16(p0 + p * ps + o, wl, wh);
      if constexpr (W::kScaled) {  // (the scales stay in L1: 64 bytes per panel and group)
        const float* s = reinterpret_cast<const float*>(reinterpret_cast<const char*>(sc) + p * ps) + (k / kI8Group) * 16;
        wl = _mm256_mul_ps(wl, _mm256_loadu_ps(s));
        wh = _mm256_mul_ps(wh, _mm256_loadu_ps(s + 8));
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_broadcast_ss(x + static_cast<int64_t>(i) * ldx + k);
        acc[i][p][0] = _mm256_fmadd_ps(xv, wl, acc[i][p][0]);
        acc[i][p][1] = _mm256_fmadd_ps(xv, wh, acc[i][p][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      store16(y + static_cast<int64_t>(i) * ldy, n + 16 * p, p == NP - 1 ? valid : 16, acc[i][p][0], acc[i][p][1],
              bias);
    }
  }
}

// Panels per tile for a row block of MR rows: as many as keep <= 12 accumulators (with the
// broadcast rows and two weight vectors that fills the 16 vector registers).
template <int MR>
constexpr int panels_for() {
  return MR == 1 ? 4 : MR == 2 ? 2 : 1;
}

// Row blocks [m, m + MR) of all M rows against the panel group at p0 (np panels, np <= NPmax).
template <class W, int MR>
inline void rows_tile(const float* x, int ldx, int K, const typename W::T* p0, int64_t ps, int np, const float* bias,
                      int n, int valid, float* y, int ldy, const float* sc) {
  constexpr int NP = panels_for<MR>();
  if (np == NP) {
    tile<W, MR, NP>(x, ldx, K, p0, ps, bias, n, valid, y, ldy, sc);
  } else {
    for (int p = 0; p < np; ++p) {
      tile<W, MR, 1>(x, ldx, K, p0 + p * ps, ps, bias, n + 16 * p, p == np - 1 ? valid : 16, y, ldy,
                     reinterpret_cast<const float*>(reinterpret_cast<const char*>(sc) + p * ps));
    }
  }
}

// The rows of x split into blocks of 6 (12 chains in flight) and the rest; a rest of 1 or 2 rows
// gets a panel group wide enough for 8 chains (see gemm_t), 6-row blocks loop over its panels.
template <class W>
inline void all_rows(const float* x, int ldx, int M, int K, const typename W::T* p0, int64_t ps, int np,
                     const float* bias, int n, int valid, float* y, int ldy, const float* sc) {
  int m = 0;
  while (m < M) {
    const int left = M - m;
    const int mr = left <= 6 ? left : 6;
    const float* xm = x + static_cast<int64_t>(m) * ldx;
    float* ym = y + static_cast<int64_t>(m) * ldy;
    switch (mr) {
      case 1: rows_tile<W, 1>(xm, ldx, K, p0, ps, np, bias, n, valid, ym, ldy, sc); break;
      case 2: rows_tile<W, 2>(xm, ldx, K, p0, ps, np, bias, n, valid, ym, ldy, sc); break;
      case 3: rows_tile<W, 3>(xm, ldx, K, p0, ps, np, bias, n, valid, ym, ldy, sc); break;
      case 4: rows_tile<W, 4>(xm, ldx, K, p0, ps, np, bias, n, valid, ym, ldy, sc); break;
      case 5: rows_tile<W, 5>(xm, ldx, K, p0, ps, np, bias, n, valid, ym, ldy, sc); break;
      default: rows_tile<W, 6>(xm, ldx, K, p0, ps, np, bias, n, valid, ym, ldy, sc); break;
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
  // Panel groups as wide as the tile of the last row block when it has 1 or 2 rows (they need
  // several panels for 8 chains; measured: 7 and 8 rows as 6 + 1 / 6 + 2 this way took 10-15%
  // less time than 4 + 3 / 4 + 4), else one panel; later row blocks find the weights in L1/L2.
  // No k blocks, however many rows: a panel (16 x K weights, 96 KB for SmolLM2's widest in
  // fp32) stays in L2 while the row blocks pass over it, and the weight stream stays sequential
  // for the hardware prefetcher (measured side by side on the 2-core EPYC, 2 threads: blocks of
  // 256 k took 1.15-1.35x the time at 12-256 rows, bf16, fp16 and fp32).
  const int rest = M % 6;
  const int group = rest == 1 ? panels_for<1>() : rest == 2 ? panels_for<2>() : 1;
  for_each_panel_pass(K, n0, n1, group, K, [&](const PanelPass& q) {
    const typename W::T* panel = w + (q.n / 16) * ps;
    all_rows<W>(x, ldx, M, K, panel + scale_bytes, ps, q.np, bias, q.n, q.valid, y, ldy,
                reinterpret_cast<const float*>(panel));
  });
}

void gemm_avx2(const float* x, int ldx, int M, int K, const void* w, WType wt, const float* bias, int n0, int n1,
               float* y, int ldy) {
  switch (wt) {
    case WType::kF32: gemm_t<F32W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kBF16: gemm_t<BF16W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kF16: gemm_t<F16W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kI8: gemm_t<I8W>(x, ldx, M, K, w, bias, n0, n1, y, ldy); break;
    case WType::kBF16Pairs: generic_kernels().gemm(x, ldx, M, K, w, wt, bias, n0, n1, y, ldy); break;
  }
}

// exp(x) for 8 floats: range reduction by ln 2 and a degree-6 polynomial (Cephes' expf), about
// 1 ulp; inputs below -87.3 give 0 (softmax scores minus their max are <= 0).
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// Loads of 8 consecutive cache values as fp32: a KV cache in fp32, or in bf16 (widened exactly).
struct KVF32 {
  using T = float;
  static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
};
struct KVBF16 {
  using T = uint16_t;
  static inline __m256 load8(const T* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};

// Scores of 4 keys (rows k[0..3] of head_dim values) against QB queries: per (query, key) one
// 8-lane FMA chain over d in order, then the fixed lane reduction ((l0 + l1) + (l2 + l3)) +
// ((l4 + l5) + (l6 + l7)); so a key's score depends neither on the other keys nor on the other
// queries. Two queries share each key load (QB = 2: 8 chains in registers, with the loads).
template <class KV, int QB>
inline void scores4(const float* const* q, const typename KV::T* const* k, int hd, __m128* out) {
  __m256 a[QB][4];
#pragma GCC unroll 4
  for (int i = 0; i < QB; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) a[i][j] = _mm256_setzero_ps();
  }
  for (int d = 0; d < hd; d += 8) {
    __m256 qv[QB];
#pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) qv[i] = _mm256_loadu_ps(q[i] + d);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 kv = KV::load8(k[j] + d);
#pragma GCC unroll 4
      for (int i = 0; i < QB; ++i) a[i][j] = _mm256_fmadd_ps(qv[i], kv, a[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < QB; ++i) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[i][0], a[i][1]), _mm256_hadd_ps(a[i][2], a[i][3]));
    out[i] = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  }
}

// Softmax numerators of one query's scores[0, n) in place: the max m, then exp(score - m) 8-wide
// by position with a fixed lane reduction of their sum l; stats = {m, l}.
inline void softmax_scores(float* scores, int n, float* stats) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 8 <= n; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(scores + j));
  alignas(32) float m8[8];
  _mm256_store_ps(m8, mx8);
  float mx = m8[0];
  for (int i = 1; i < 8; ++i) mx = m8[i] > mx ? m8[i] : mx;
  for (; j < n; ++j) mx = scores[j] > mx ? scores[j] : mx;
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mxv));
    _mm256_storeu_ps(scores + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  if (j < n) {
    alignas(32) float tmp[8];
    for (int i = 0; i < 8; ++i) tmp[i] = j + i < n ? scores[j + i] : -INFINITY;
    const __m256 e = exp256(_mm256_sub_ps(_mm256_load_ps(tmp), mxv));
    _mm256_store_ps(tmp, e);
    for (int i = 0; j + i < n; ++i) scores[j + i] = tmp[i];
    sum8 = _mm256_add_ps(sum8, e);
  }
  stats[0] = mx;
  stats[1] = hsum(sum8);
}

// Software prefetch distance of the attention kernel, in keys (K and V rows are read in key order;
// without it a core streamed the cache at about half the rate the GEMM reaches).
constexpr int kAttendPrefetchKeys = 16;

// Prefetches `bytes` at p (a key or value row, or the part of it a pass reads), a cache line at
// a time.
inline void prefetch_row(const void* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(static_cast<const char*>(p) + l, _MM_HINT_T0);
}

// Values in chunks of this many keys (16 KB of a 64-dim head): every query passes over a chunk
// while it is in L1.
constexpr int kValueChunk = 64;

// Values of dims [d0, d0 + 8 NV) for QB queries over list positions [j0, j1) (prefix keys, or
// extra keys of a query coming alone): for each dim, one FMA chain over the positions in order,
// continued from the partial sums in out unless `first`. Each value vector is loaded once for the
// QB queries (QB = 3, NV = 4: 12 accumulators in registers).
template <class KV, int QB, int NV>
inline void values_block(const AttendArgs* const* a, int j0, int j1, int d0, bool first, bool prefetch) {
  using T = typename KV::T;
  const int hd = a[0]->head_dim, begin = a[0]->begin, prefix = a[0]->prefix_len;
  const T* vc = static_cast<const T*>(a[0]->v);
  __m256 acc[QB][NV];
#pragma GCC unroll 4
  for (int i = 0; i < QB; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(a[i]->out + d0 + 8 * v);
  }
  for (int jj = j0; jj < j1; ++jj) {
    if (prefetch && jj + kAttendPrefetchKeys < j1) {
      prefetch_row(vc + static_cast<int64_t>(jj + kAttendPrefetchKeys) * hd + d0, 8 * NV * int(sizeof(T)));
    }
    __m256 p[QB];
#pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) p[i] = _mm256_broadcast_ss(a[i]->scores + (jj - begin));
    const int key = jj < prefix ? jj : a[0]->extra[jj - prefix];
    const T* vr = vc + static_cast<int64_t>(key) * hd + d0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m256 vv = KV::load8(vr + 8 * v);
#pragma GCC unroll 4
      for (int i = 0; i < QB; ++i) acc[i][v] = _mm256_fmadd_ps(p[i], vv, acc[i][v]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < QB; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(a[i]->out + d0 + 8 * v, acc[i][v]);
  }
}

// Values of dims [d0, d0 + 8 NV) for all queries: the shared prefix keys [begin, pe) in chunks,
// all queries per chunk in blocks of 3 (a query's partial sums wait in its out row), then each
// query's extra keys.
template <class KV, int NV>
void attend_values(const AttendArgs* qs, int nq, int pe, int d0) {
  constexpr int QB = 3;
  const int begin = qs[0].begin;
  for (int c0 = begin; c0 < pe; c0 += kValueChunk) {
    const int c1 = pe - c0 < kValueChunk ? pe : c0 + kValueChunk;
    int q = 0;
    for (; q + QB <= nq; q += QB) {  // the first block streams the chunk from memory: it prefetches
      const AttendArgs* a[QB] = {&qs[q], &qs[q + 1], &qs[q + 2]};
      values_block<KV, QB, NV>(a, c0, c1, d0, c0 == begin, q == 0);
    }
    for (; q < nq; ++q) {
      const AttendArgs* a[1] = {&qs[q]};
      values_block<KV, 1, NV>(a, c0, c1, d0, c0 == begin, q == 0);
    }
  }
  for (int q = 0; q < nq; ++q) {
    const AttendArgs* a[1] = {&qs[q]};
    values_block<KV, 1, NV>(a, pe, qs[q].end, d0, pe == begin, false);
  }
}

template <class KV>
void attend_t(const AttendArgs* qs, int nq) {
  using T = typename KV::T;
  const AttendArgs& a0 = qs[0];
  const int hd = a0.head_dim, begin = a0.begin, prefix = a0.prefix_len;
  const T* kc = static_cast<const T*>(a0.k);
  const T* vc = static_cast<const T*>(a0.v);
  const int row_bytes = hd * int(sizeof(T));
  // The prefix keys every query of the call covers: [begin, pe).
  const int pe = prefix < begin + kAttendRange ? (prefix > begin ? prefix : begin) : begin + kAttendRange;
  const __m128 scale = _mm_set1_ps(a0.scale);
  // Scores, 4 keys at a time: blocks of shared prefix keys for all queries, two at a time, while
  // the block is in L1 (its values are prefetched too, for the pass below), then each query's
  // last blocks (the rest of the prefix and its own extra keys; a partial block repeats its last
  // key in the unused lanes). A key's score does not depend on its block or on the queries beside.
  const int shared = begin + (pe - begin) / 4 * 4;
  for (int j0 = begin; j0 < shared; j0 += 4) {
    const T* k[4];
    for (int j = 0; j < 4; ++j) k[j] = kc + static_cast<int64_t>(j0 + j) * hd;
    if (j0 + kAttendPrefetchKeys + 4 <= pe) {
      for (int j = 0; j < 4; ++j) {
        prefetch_row(k[j] + static_cast<int64_t>(kAttendPrefetchKeys) * hd, row_bytes);
        prefetch_row(vc + static_cast<int64_t>(j0 + j + kAttendPrefetchKeys) * hd, row_bytes);
      }
    }
    int q = 0;
    for (; q + 2 <= nq; q += 2) {
      const float* qp[2] = {qs[q].q, qs[q + 1].q};
      __m128 s[2];
      scores4<KV, 2>(qp, k, hd, s);
      _mm_storeu_ps(qs[q].scores + (j0 - begin), _mm_mul_ps(s[0], scale));
      _mm_storeu_ps(qs[q + 1].scores + (j0 - begin), _mm_mul_ps(s[1], scale));
    }
    if (q < nq) {
      __m128 s[1];
      scores4<KV, 1>(&qs[q].q, k, hd, s);
      _mm_storeu_ps(qs[q].scores + (j0 - begin), _mm_mul_ps(s[0], scale));
    }
  }
  for (int q = 0; q < nq; ++q) {
    const AttendArgs& a = qs[q];
    const int n = a.end;
    auto key = [&](int j) { return j < prefix ? j : a.extra[j - prefix]; };
    for (int j0 = shared; j0 < n; j0 += 4) {
      const T* k[4];
      for (int j = 0; j < 4; ++j) k[j] = kc + static_cast<int64_t>(key(j0 + j < n ? j0 + j : n - 1)) * hd;
      __m128 s[1];
      scores4<KV, 1>(&a.q, k, hd, s);
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, _mm_mul_ps(s[0], scale));
      for (int j = j0; j < n && j < j0 + 4; ++j) a.scores[j - begin] = tmp[j - j0];
    }
    softmax_scores(a.scores, n - begin, a.stats);
  }
  // Output, 32 dims (4 vectors) per pass.
  for (int d0 = 0; d0 < hd; d0 += 32) {
    switch ((hd - d0 < 32 ? hd - d0 : 32) / 8) {
      case 4: attend_values<KV, 4>(qs, nq, pe, d0); break;
      case 3: attend_values<KV, 3>(qs, nq, pe, d0); break;
      case 2: attend_values<KV, 2>(qs, nq, pe, d0); break;
      default: attend_values<KV, 1>(qs, nq, pe, d0); break;
    }
  }
}

void attend_avx2(const AttendArgs* qs, int nq) {
  if (qs[0].head_dim % 8 != 0) {  // not seen in practice; the portable kernel keeps the contract
    generic_kernels().attend(qs, nq);
  } else if (qs[0].kv_bf16) {
    attend_t<KVBF16>(qs, nq);
  } else {
    attend_t<KVF32>(qs, nq);
  }
}

// silu(g) = g / (1 + exp(-g)), 8 at a time; the tail in the scalar form of the portable kernel.
inline __m256 silu256(__m256 g) {
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}
inline float silu1(float g) { return g / (1.0f + std::exp(-g)); }

void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu256(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = silu1(g[i]) * u[i];
}

void add_silu_avx2(float* x, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), silu256(_mm256_loadu_ps(y + i))));
  }
  for (; i < n; ++i) x[i] += silu1(y[i]);
}

uint64_t stream_read_avx2(const void* p, size_t bytes) {
  // Eight interleaved streams, as the GEMM reads several weight panels at once (one stream per
  // core leaves memory-level parallelism unused and measures well below what decoding gets).
  const char* b = static_cast<const char*>(p);
  const size_t per = bytes / 8 / 64 * 64;
  __m256i a[8];
  for (int s = 0; s < 8; ++s) a[s] = _mm256_setzero_si256();
  for (size_t off = 0; off < per; off += 64) {
    for (int s = 0; s < 8; ++s) {
      const char* q = b + s * per + off;
      _mm_prefetch(q + kPrefetchBytes, _MM_HINT_T0);
      a[s] = _mm256_xor_si256(a[s], _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
                                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32))));
    }
  }
  for (size_t off = 8 * per; off < bytes; off += 32) {
    a[0] = _mm256_xor_si256(a[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + off)));
  }
  for (int s = 1; s < 8; ++s) a[0] = _mm256_xor_si256(a[0], a[s]);
  alignas(32) uint64_t out[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), a[0]);
  return out[0] ^ out[1] ^ out[2] ^ out[3];
}

float fma_burn_avx2(int64_t iters) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1e-3f * float(i));
  const __m256 m = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  }
  for (int i = 1; i < 12; ++i) a[0] = _mm256_add_ps(a[0], a[i]);
  return hsum(a[0]);
}

}  // namespace

const Kernels* avx2_kernels_impl() {
  static const Kernels k{"avx2", gemm_avx2, attend_avx2, silu_mul_avx2, add_silu_avx2, stream_read_avx2,
                         fma_burn_avx2};
  return &k;
}

}  // namespace medusa_rt::cpu
