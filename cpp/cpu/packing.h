// Weight layout of the CPU backend: row panels for weight-stationary small-M GEMM.
//
// A [N, K] matrix is stored as ceil(N/8) panels of 8 rows. Within a panel the K dimension is
// split into chunks of 8 (K padded with zeros to K8 = roundup(K, 8)); chunk c holds 8 values
// of row 0, then 8 of row 1, ..., 8 of row 7. A GEMM step over one chunk therefore reads one
// contiguous 8 x 8 block, and a whole panel is one sequential stream. Rows past N are zero.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

constexpr int kPanelRows = 8;
constexpr int kChunk = 8;

inline int padded_k(int K) { return (K + kChunk - 1) / kChunk * kChunk; }
inline int64_t panel_elems(int K) { return int64_t(kPanelRows) * padded_k(K); }
size_t wtype_size(WType t);
size_t packed_bytes(int N, int K, WType t);

// src: row-major [N, K] in type t. dst: packed_bytes(N, K, t) bytes.
void pack_rows(const void* src, int N, int K, WType t, void* dst);
// Reads row n of a packed matrix as fp32 into out[0, K).
void unpack_row(const void* packed, int N, int K, WType t, int n, float* out);

}  // namespace medusa_rt::cpu
