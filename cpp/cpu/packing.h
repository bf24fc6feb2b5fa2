// Weight layout of the CPU backend: column panels for an outer-product small-M GEMM.
//
// A [N, K] weight matrix (out x in) is stored as ceil(N/16) panels of 16 output columns. A panel
// holds, for k = 0..K-1 in order, the 16 values W[n0 .. n0+15][k]: one GEMM step over k reads
// one contiguous 16-value row, and a panel is a single sequential stream. Columns past N are
// zero.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace medusa_rt::cpu {

constexpr int kPanel = 16;

inline int64_t panel_elems(int K) { return int64_t(kPanel) * K; }
size_t wtype_size(WType t);
size_t packed_bytes(int N, int K, WType t);

// src: row-major [N, K] in type t. dst: packed_bytes(N, K, t) bytes.
void pack_rows(const void* src, int N, int K, WType t, void* dst);
// Reads row n (output column n) of a packed matrix as fp32 into out[0, K).
void unpack_row(const void* packed, int N, int K, WType t, int n, float* out);

}  // namespace medusa_rt::cpu
