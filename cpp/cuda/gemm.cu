#include "cuda/gemm.h"

#include <algorithm>
#include <string>

#include "cuda/check.h"
#include "cutlass/bfloat16.h"
#include "cutlass/gemm/device/gemm.h"
#include "cutlass/half.h"

namespace medusa_rt {
namespace cuda {
namespace {

// One configuration for every M (see gemm.h): 32 x 128 output tiles, 64-deep k steps, four
// warps, a 4-stage cp.async pipeline, serial split-K (slices add into D in a fixed order).
// sm_80 tensor-core kernels; they run unchanged on sm_90.
constexpr int kTileM = 32, kTileN = 128, kTileK = 64;

template <class T>
using Kernel = cutlass::gemm::device::Gemm<
    T, cutlass::layout::RowMajor,     // A: activations [M, K]
    T, cutlass::layout::ColumnMajor,  // B: weights [N, K] row-major = K x N column-major
    float, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<kTileM, kTileN, kTileK>, cutlass::gemm::GemmShape<32, 32, kTileK>,
    cutlass::gemm::GemmShape<16, 8, 16>,
    // One float per access in the epilogue: any N (vocabularies like 32001) and ldd.
    cutlass::epilogue::thread::LinearCombination<float, 1, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 4, 8, 8, /*SplitKSerial=*/true>;

template <class T>
void run(int M, int N, int K, const void* A, int lda, const void* B, int ldb, float* D, int ldd, int split_k,
         void* workspace, cudaStream_t stream) {
  using G = Kernel<T>;
  typename G::Arguments args({M, N, K}, {static_cast<const T*>(A), lda}, {static_cast<const T*>(B), ldb}, {D, ldd},
                             {D, ldd}, {1.0f, 0.0f}, split_k);
  G op;
  cutlass::Status st = op.can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    throw Error(std::string("internal: CUTLASS cannot run this GEMM (M=") + std::to_string(M) + " N=" +
                std::to_string(N) + " K=" + std::to_string(K) + "): " + cutlassGetStatusString(st));
  }
  st = op.initialize(args, workspace, stream);
  if (st == cutlass::Status::kSuccess) st = op.run(stream);
  if (st != cutlass::Status::kSuccess) {
    throw Error(std::string("CUDA GEMM failed: ") + cutlassGetStatusString(st) + " (" +
                cudaGetErrorString(cudaGetLastError()) + ")");
  }
}

}  // namespace

void gemm(GemmType type, int M, int N, int K, const void* A, int lda, const void* B, int ldb, float* D, int ldd,
          int split_k, void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (type == GemmType::kBF16) {
    run<cutlass::bfloat16_t>(M, N, K, A, lda, B, ldb, D, ldd, split_k, workspace, s);
  } else {
    run<cutlass::half_t>(M, N, K, A, lda, B, ldb, D, ldd, split_k, workspace, s);
  }
}

int gemm_split_k(int N, int K, int sms) {
  const int col_tiles = (N + kTileN - 1) / kTileN;
  const int want = (2 * sms + col_tiles - 1) / col_tiles;
  // Each slice keeps at least 4 k steps so the pipeline fills.
  const int most = std::max(1, K / (4 * kTileK));
  return std::max(1, std::min({want, most, 16}));
}

size_t gemm_workspace_bytes(int max_m, int N, int split_k) {
  using G = Kernel<cutlass::half_t>;  // both types share the tiling
  typename G::Arguments args({max_m, N, 8 * kTileK}, {nullptr, 0}, {nullptr, 0}, {nullptr, 0}, {nullptr, 0},
                             {1.0f, 0.0f}, split_k);
  return G::get_workspace_size(args);
}

}  // namespace cuda
}  // namespace medusa_rt
