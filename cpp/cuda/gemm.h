// Tensor-core GEMM of the CUDA backend (CUTLASS), behind a CUDA-free interface so that only
// gemm.cu instantiates CUTLASS templates (the slowest translation unit to compile).
#pragma once

#include <cstddef>

namespace medusa_rt {
namespace cuda {

enum class GemmType { kBF16, kF16 };

// D[m, n] = sum_k A[m, k] * B[n, k] for m < M, n < N, k < K, with A row-major [M, lda] and
// B row-major [N, ldb] (the weight's [out, in] layout) in the 16-bit type `type`, D fp32
// row-major [M, ldd]; fp32 accumulation. K, lda and ldb must be multiples of 8 and A, B 16-byte
// aligned. The reduction over k of one output is the same instruction sequence for every M
// (one kernel configuration; split-K slices depend on N and K only), so a row's result does not
// depend on which other rows are in the batch: tree verification sees the logits plain decoding
// would. `workspace` holds gemm_workspace_bytes(); stream is a cudaStream_t.
void gemm(GemmType type, int M, int N, int K, const void* A, int lda, const void* B, int ldb, float* D, int ldd,
          int split_k, void* workspace, void* stream);

// Split-K slices for an [N, K] weight on a device with `sms` multiprocessors: enough column
// tiles x slices to cover the device twice at M <= one tile (decode and tree verification are
// bound by reading the weights, so every SM must be streaming).
int gemm_split_k(int N, int K, int sms);
// Workspace bytes gemm() needs for N columns with split_k slices, for any M up to max_m.
size_t gemm_workspace_bytes(int max_m, int N, int split_k);

}  // namespace cuda
}  // namespace medusa_rt
