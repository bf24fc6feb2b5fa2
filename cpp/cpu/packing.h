// Weight layout of the CPU backend: column panels for an outer-product small-M GEMM.
//
// A [N, K] weight matrix (out x in) is stored as ceil(N/16) panels of 16 output columns. A panel
// holds, for k = 0..K-1 in order, the 16 values W[n0 .. n0+15][k]: one GEMM step over k reads
// one contiguous 16-value row, and a panel is a single sequential stream. Columns past N are
// zero. In bf16 panels the 16 values of a row are interleaved (c0, c8, c1, c9, ..., c7, c15), so
// that one 32-byte load widens to fp32 with a shift (c0..c7) and a mask (c8..c15); packed_lane()
// gives a column's position.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

constexpr int kPanel = 16;

inline int64_t panel_elems(int K) { return int64_t(kPanel) * K; }
// Position of panel column c (0..15) within a packed 16-value row.
inline int packed_lane(int c, WType t) { return t == WType::kBF16 ? (c < 8 ? 2 * c : 2 * (c - 8) + 1) : c; }
// Offset (in elements) of W[n, 0] in a packed matrix; W[n, k] is at that + k * kPanel.
inline int64_t packed_offset(int n, int K, WType t) { return int64_t(n / kPanel) * panel_elems(K) + packed_lane(n % kPanel, t); }
size_t wtype_size(WType t);
size_t packed_bytes(int N, int K, WType t);

// src: row-major [N, K] in type t. dst: packed_bytes(N, K, t) bytes.
void pack_rows(const void* src, int N, int K, WType t, void* dst);
// Reads row n (output column n) of a packed matrix as fp32 into out[0, K).
void unpack_row(const void* packed, int N, int K, WType t, int n, float* out);

}  // namespace medusa_rt::cpu
