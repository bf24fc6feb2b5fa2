// Weight layout of the CPU backend: column panels for an outer-product small-M GEMM.
//
// A [N, K] weight matrix (out x in) is stored as ceil(N/16) panels of 16 output columns. A panel
// holds, for k = 0..K-1 in order, the 16 values W[n0 .. n0+15][k]: one GEMM step over k reads
// one contiguous 16-value row, and a panel is a single sequential stream. Columns past N are
// zero. In bf16 panels the 16 values of a row are interleaved (c0, c8, c1, c9, ..., c7, c15), so
// that one 32-byte load widens to fp32 with a shift (c0..c7) and a mask (c8..c15); packed_lane()
// gives a column's position. kBF16Pairs panels hold k in pairs (K rounded up to even, the pad
// zero): for each pair, (W[c][k], W[c][k+1]) for c = 0..15, the operand layout of the AVX512-BF16
// dot product. kI8 panels start with their scales, then hold the int8 values like fp32 panels
// (one 16-byte row per k): for each group g of kI8Group k (the last may be shorter), the 16
// columns' fp32 scales at byte 64 g; the values from byte 64 ceil(K / kI8Group) on.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

constexpr int kPanel = 16;

inline int i8_groups(int K) { return (K + kI8Group - 1) / kI8Group; }
// Bytes of a kI8 panel's scales (where its int8 values start).
inline int64_t i8_scale_bytes(int K) { return int64_t(i8_groups(K)) * kPanel * 4; }
inline int64_t panel_elems(int K, WType t) {
  if (t == WType::kI8) return i8_scale_bytes(K) + int64_t(kPanel) * K;
  return int64_t(kPanel) * (t == WType::kBF16Pairs ? (K + 1) / 2 * 2 : K);
}
// Position of panel column c (0..15) within a packed 16-value row.
inline int packed_lane(int c, WType t) { return t == WType::kBF16 ? (c < 8 ? 2 * c : 2 * (c - 8) + 1) : c; }
// Offset (in elements) of W[n, k] in a packed matrix.
inline int64_t packed_index(int n, int k, int K, WType t) {
  const int64_t panel = int64_t(n / kPanel) * panel_elems(K, t);
  if (t == WType::kBF16Pairs) return panel + int64_t(k / 2) * 2 * kPanel + 2 * (n % kPanel) + (k & 1);
  if (t == WType::kI8) return panel + i8_scale_bytes(K) + int64_t(k) * kPanel + n % kPanel;
  return panel + int64_t(k) * kPanel + packed_lane(n % kPanel, t);
}
// Byte offset of the kI8 scale of W[n, k] (column n, group k / kI8Group).
inline int64_t i8_scale_index(int n, int k, int K) {
  return int64_t(n / kPanel) * panel_elems(K, WType::kI8) + (int64_t(k / kI8Group) * kPanel + n % kPanel) * 4;
}
size_t wtype_size(WType t);
size_t packed_bytes(int N, int K, WType t);

// src: row-major [N, K] in type t (fp32 for kI8, which quantizes them). dst: packed_bytes(N, K, t)
// bytes.
void pack_rows(const void* src, int N, int K, WType t, void* dst);
// Reads row n (output column n) of a packed matrix as fp32 into out[0, K).
void unpack_row(const void* packed, int N, int K, WType t, int n, float* out);

}  // namespace medusa_rt::cpu
