// Weight layout of the CPU backend: column panels for an outer-product small-M GEMM.
//
// A [N, K] weight matrix (out x in) is stored as ceil(N/16) panels of 16 output columns. A panel
// holds, for k = 0..K-1 in order, the 16 values W[n0 .. n0+15][k]: one GEMM step over k reads
// one contiguous 16-value row, and a panel is a single sequential stream. Columns past N are
// zero. In bf16 panels the 16 values of a row are interleaved (c0, c8, c1, c9, ..., c7, c15), so
// that one 32-byte load widens to fp32 with a shift (c0..c7) and a mask (c8..c15); packed_lane()
// gives a column's position. kBF16Pairs panels hold k in pairs (K rounded up to even, the pad
// zero): for each pair, (W[c][k], W[c][k+1]) for c = 0..15, the operand layout of the AVX512-BF16
// dot product.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

constexpr int kPanel = 16;

inline int64_t panel_elems(int K, WType t) {
  return int64_t(kPanel) * (t == WType::kBF16Pairs ? (K + 1) / 2 * 2 : K);
}
// Position of panel column c (0..15) within a packed 16-value row.
inline int packed_lane(int c, WType t) { return t == WType::kBF16 ? (c < 8 ? 2 * c : 2 * (c - 8) + 1) : c; }
// Offset (in elements) of W[n, k] in a packed matrix.
inline int64_t packed_index(int n, int k, int K, WType t) {
  const int64_t panel = int64_t(n / kPanel) * panel_elems(K, t);
  if (t == WType::kBF16Pairs) return panel + int64_t(k / 2) * 2 * kPanel + 2 * (n % kPanel) + (k & 1);
  return panel + int64_t(k) * kPanel + packed_lane(n % kPanel, t);
}
size_t wtype_size(WType t);
size_t packed_bytes(int N, int K, WType t);

// src: row-major [N, K] in type t. dst: packed_bytes(N, K, t) bytes.
void pack_rows(const void* src, int N, int K, WType t, void* dst);
// Reads row n (output column n) of a packed matrix as fp32 into out[0, K).
void unpack_row(const void* packed, int N, int K, WType t, int n, float* out);

}  // namespace medusa_rt::cpu
