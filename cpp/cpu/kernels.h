// CPU kernels with runtime ISA dispatch.
//
// The table is chosen once per process: AVX-512 (F+BW) GEMMs when the CPU has them, else
// AVX2+FMA+F16C, else a portable path. MEDUSA_RT_ISA=generic|avx2|avx512 caps the choice (for
// tests and side-by-side benchmarks); a set the CPU lacks falls back to the next one down.
//
// Reduction order contract (losslessness of speculative decoding): each output element of
// gemm() and each attention row is computed by the same sequence of operations whatever the
// number of rows M in flight, the column range, or the thread that computes it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace medusa_rt::cpu {

// Weight types of the packed GEMM. kBF16Pairs: bf16 weights packed by pairs of k for the
// AVX512-BF16 dot product; the inputs x are rounded to bf16 too (EngineOptions::matmul_inputs).
// kI8: weight-only int8, symmetric, one fp32 scale per output column and group of kI8Group k
// (packing.h); the GEMM multiplies x by the dequantized weight q * scale.
enum class WType { kF32, kBF16, kF16, kBF16Pairs, kI8 };
constexpr int kI8Group = kI8WeightGroup;

// A query's keys form a list: the visible prefix keys 0 .. prefix_len-1 in order, then its extra
// keys. Attention works on ranges of that list that start at multiples of kAttendRange (fixed
// positions, whatever the number of rows or threads): per range, the scores' max m, the sum
// l = sum_j exp(s_j - m) and the unnormalised output o = sum_j exp(s_j - m) v_j; the backend
// merges a query's ranges in order. So every query's result is the same sequence of operations
// however it is batched, and a range's keys and values are read once for all queries sharing it.
constexpr int kAttendRange = 256;

struct AttendArgs {
  const float* q;        // [head_dim]
  const void* k;         // keys of one kv head: [cache_len][head_dim], fp32 or (kv_bf16) bf16
  const void* v;         // values of one kv head, the same type
  bool kv_bf16;
  int head_dim;
  int prefix_len;        // keys [0, prefix_len) are visible
  const int32_t* extra;  // further visible key indices (increasing, all >= prefix_len), may be null
  int num_extra;
  int begin, end;        // the list positions this call covers: begin a multiple of kAttendRange,
                         // begin < end <= min(begin + kAttendRange, prefix_len + num_extra)
  float scale;
  float* scores;         // scratch, >= end - begin floats
  float* out;            // [head_dim]: o of the range
  float* stats;          // [2]: m and l of the range
};

// Queries attend() takes at once: they share k, v, kv_bf16, head_dim, prefix_len, begin and scale, and
// end wherever it is at most prefix_len (the q heads of one kv head, for the rows of one
// sequence's step), so each block of prefix keys and values is read once for all of them.
constexpr int kMaxAttendQueries = 16;

struct Kernels {
  const char* isa;
  // y[m*ldy + n] = bias[n] + sum_k x[m*ldx + k] * W[n, k]   for m in [0, M), n in [n0, n1),
  // W packed as in packing.h; n0 a multiple of 16. bias may be null.
  void (*gemm)(const float* x, int ldx, int M, int K, const void* w, WType wt, const float* bias, int n0, int n1,
               float* y, int ldy);
  // One range of softmax attention (see AttendArgs) for nq (1..kMaxAttendQueries) queries over
  // one kv head, keys in list order. Each query's result is the same sequence of operations as
  // when it comes alone.
  void (*attend)(const AttendArgs* a, int nq);
  // out[i] = silu(g[i]) * u[i] for i in [0, n): SwiGLU's elementwise half.
  void (*silu_mul)(const float* g, const float* u, float* out, int64_t n);
  // x[i] += silu(y[i]) for i in [0, n).
  void (*add_silu)(float* x, const float* y, int64_t n);
  // Reads `bytes` (a multiple of 256) as fast as the core can (several interleaved streams, as
  // the GEMM reads its weight panels) and returns an xor of them: the streaming-bandwidth probe
  // of the benchmarks.
  uint64_t (*stream_read)(const void* p, size_t bytes);
  // Runs `iters` rounds of 12 independent 8-lane fp32 FMA chains (192 flops per round, no memory
  // traffic) and returns a value of them: the arithmetic-peak probe of the benchmarks (the
  // compute floor of a verify step). 256-bit FMAs in the AVX2 and AVX-512 sets alike.
  float (*fma_burn)(int64_t iters);
};

const Kernels& kernels();
// True when kernels() can run kBF16Pairs GEMMs (the AVX-512 set and the CPU's AVX512-BF16).
bool bf16_pairs_supported();
const Kernels& generic_kernels();
// nullptr when this build or this CPU has no AVX2/FMA/F16C.
const Kernels* avx2_kernels();
// nullptr when this build or this CPU has no AVX-512 F+BW (or no AVX2 set to complete it).
const Kernels* avx512_kernels();

}  // namespace medusa_rt::cpu
