// The CUDA backend: Backend (model/backend.h) on one NVIDIA GPU.
//
// Memory: weights are bf16 or fp16 rows padded to a multiple of 8 columns (the tensor-core
// GEMM's alignment), activations, KV cache and workspaces fp32; everything is allocated at
// engine creation. All work runs in order on one stream; copies to the host wait for it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "cuda/check.h"
#include "cuda/gemm.h"
#include "cuda/kernels.cuh"
#include "model/backend.h"

namespace medusa_rt {
namespace cuda {
namespace {

std::string mib(size_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

int padded(int cols) { return (cols + 7) / 8 * 8; }

int blocks_for(size_t n) { return static_cast<int>(std::min<size_t>((n + kBlock - 1) / kBlock, 4096)); }

// The current device is per host thread, an engine may be driven from several threads, and the
// caller's own CUDA code may switch devices: every entry point makes this engine's GPU current
// (cheap: the runtime keeps it per thread).
void bind_device(int device) { MRT_CUDA_CHECK(cudaSetDevice(device)); }

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      (void)cudaGetLastError();
      throw InvalidArgumentError(std::string("device=\"cuda\": no usable CUDA GPU (") +
                                 (e != cudaSuccess ? cudaGetErrorString(e) : "no device found") + ")");
    }
    if (device < 0 || device >= count) {
      throw InvalidArgumentError("device=\"cuda:" + std::to_string(device) + "\": this machine has " +
                                 std::to_string(count) + " CUDA device(s)");
    }
    MRT_CUDA_CHECK(cudaSetDevice(device));
    MRT_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
    if (props_.major < 8) {
      throw UnsupportedModelError(std::string("the CUDA backend needs compute capability 8.0 or newer; ") + props_.name +
                                  " has " + std::to_string(props_.major) + "." + std::to_string(props_.minor));
    }
    MRT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const char* g = std::getenv("MEDUSA_RT_CUDA_GRAPHS");
    graphs_enabled_ = !(g && std::string(g) == "0");
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);
    if (a16_) cudaFree(a16_);
    if (gemm_ws_) cudaFree(gemm_ws_);
    if (stats_) cudaFree(stats_);
    for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override {
    return "cuda/sm_" + std::to_string(props_.major) + std::to_string(props_.minor);
  }
  std::string device_name() const override {
    return "cuda:" + std::to_string(device_) + " (" + props_.name + ", " + mib(props_.totalGlobalMem) + ")";
  }
  int num_threads() const override { return 1; }

  void* allocate(size_t bytes, const char* what) override {
    bind_device(device_);
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw CapacityError("out of GPU memory allocating " + mib(bytes) + " for " + what + " on " + device_name() +
                          " (" + mib(free_b) + " free)");
    }
    return p;
  }
  void deallocate(void* p) override {
    bind_device(device_);
    cudaFree(p);
  }
  void copy_to_device(void* dst, const void* src, size_t bytes) override {
    bind_device(device_);
    MRT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    bind_device(device_);
    MRT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    MRT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void fill_zero(void* dst, size_t bytes) override {
    bind_device(device_);
    MRT_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_));
  }
  void copy_on_device(void* dst, const void* src, size_t bytes) override {
    bind_device(device_);
    MRT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void copy_on_device_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t bytes,
                         int rows) override {
    bind_device(device_);
    if (rows <= 0 || bytes == 0) return;
    MRT_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, bytes, size_t(rows), cudaMemcpyDeviceToDevice,
                                     stream_));
  }
  void synchronize() override {
    bind_device(device_);
    MRT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  size_t available_memory() const override {
    bind_device(device_);
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return free_b;
  }

  Matrix upload_matrix(const void* host, DType dtype, int rows, int cols, const char* what) override {
    bind_device(device_);
    if (dtype != DType::kBF16 && dtype != DType::kF16) {
      throw InvalidArgumentError(std::string("the CUDA backend holds weights in bf16 or fp16, not ") + dtype_name(dtype) +
                                 " (" + what + "); use dtype=\"bf16\" or \"fp16\"");
    }
    const int ld = padded(cols);
    const size_t row_bytes = size_t(cols) * 2, ld_bytes = size_t(ld) * 2;
    void* p = allocate(ld_bytes * rows, what);
    MRT_CUDA_CHECK(cudaMemsetAsync(p, 0, ld_bytes * rows, stream_));
    MRT_CUDA_CHECK(cudaMemcpy2DAsync(p, ld_bytes, host, row_bytes, row_bytes, rows, cudaMemcpyHostToDevice, stream_));
    MRT_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host buffer is the caller's staging
    max_k_ = std::max(max_k_, ld);
    max_n_ = std::max(max_n_, rows);
    return Matrix{p, dtype, rows, cols};
  }

  void prepare(const KVLayout& layout) override {
    bind_device(device_);
    if (layout.head_dim > kBlock || layout.head_dim % 2) {
      throw UnsupportedModelError("the CUDA attention kernel supports even head_dim up to " + std::to_string(kBlock) +
                                  ", the model has " + std::to_string(layout.head_dim));
    }
    const size_t smem = sizeof(float) * (size_t(layout.head_dim) + layout.max_seq + kBlock);
    const size_t static_smem = 32 * sizeof(float) + 64;  // the kernel's reduction scratch
    if (smem + static_smem > size_t(props_.sharedMemPerBlockOptin)) {
      const size_t most = (props_.sharedMemPerBlockOptin - static_smem) / sizeof(float) - layout.head_dim - kBlock;
      throw CapacityError("max_seq_len " + std::to_string(layout.max_seq) + " is too long for the CUDA attention kernel on " +
                          device_name() + ": at most " + std::to_string(most));
    }
    MRT_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    attn_smem_ = smem;
  }

  void reserve_rows(int rows) override {
    bind_device(device_);
    if (rows <= max_rows_ && max_k_ == reserved_k_ && max_n_ == reserved_n_) return;
    const int new_rows = std::max(max_rows_, rows);
    for (void** p : {&a16_, &gemm_ws_, reinterpret_cast<void**>(&stats_)}) {
      if (*p) cudaFree(*p);
      *p = nullptr;
    }
    max_rows_ = reserved_k_ = reserved_n_ = 0;  // nothing reserved until the allocations succeed
    for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);  // they point at the old scratch
    graphs_.clear();
    a16_ = allocate(size_t(new_rows) * max_k_ * 2, "GEMM activations");
    const size_t ws = gemm_workspace_bytes(new_rows, max_n_, 16);
    if (ws) gemm_ws_ = allocate(ws, "GEMM split-K workspace");
    stats_ = static_cast<float*>(allocate(sizeof(float) * 2 * new_rows, "softmax statistics"));
    max_rows_ = new_rows;
    reserved_k_ = max_k_;
    reserved_n_ = max_n_;
  }

  void embed(const Matrix& table, const int32_t* tokens, int rows, float* out) override {
    bind_device(device_);
    if (rows <= 0) return;
    const int ld = padded(table.cols);
    if (table.dtype == DType::kBF16) {
      embed_kernel<<<rows, kBlock, 0, stream_>>>(static_cast<const __nv_bfloat16*>(table.data), ld, table.cols, tokens, out);
    } else {
      embed_kernel<<<rows, kBlock, 0, stream_>>>(static_cast<const __half*>(table.data), ld, table.cols, tokens, out);
    }
    MRT_CUDA_LAUNCHED("embed");
  }

  void rmsnorm(const float* x, const float* w, int rows, int dim, float eps, float* out) override {
    bind_device(device_);
    if (rows <= 0) return;
    rmsnorm_kernel<<<rows, kBlock, 0, stream_>>>(x, w, dim, eps, out);
    MRT_CUDA_LAUNCHED("rmsnorm");
  }

  void linear(const float* x, int rows, const Matrix& w, const float* bias, float* y) override {
    bind_device(device_);
    if (rows <= 0) return;
    const int N = w.rows, K = w.cols, ld = padded(K);
    if (rows > max_rows_ || ld > reserved_k_ || N > reserved_n_) throw Error("internal: linear() beyond the reserved GEMM scratch");
    const GemmType type = w.dtype == DType::kBF16 ? GemmType::kBF16 : GemmType::kF16;
    if (type == GemmType::kBF16) {
      to_half_kernel<<<rows, kBlock, 0, stream_>>>(x, K, ld, static_cast<__nv_bfloat16*>(a16_));
    } else {
      to_half_kernel<<<rows, kBlock, 0, stream_>>>(x, K, ld, static_cast<__half*>(a16_));
    }
    MRT_CUDA_LAUNCHED("linear input conversion");
    const int split = gemm_split_k(N, ld, props_.multiProcessorCount);
    gemm(type, rows, N, ld, a16_, ld, w.data, ld, y, N, split, gemm_ws_, stream_);
    if (bias) {
      add_bias_kernel<<<rows, kBlock, 0, stream_>>>(y, bias, N);
      MRT_CUDA_LAUNCHED("bias");
    }
  }

  void rope(float* x, int rows, int row_stride, int col0, int heads, int head_dim, const int32_t* positions,
            const float* cos, const float* sin) override {
    bind_device(device_);
    rope_kernel<<<rows, kBlock, 0, stream_>>>(x, row_stride, col0, heads, head_dim, positions, cos, sin);
    MRT_CUDA_LAUNCHED("rope");
  }

  // The KV cache is fp32 on CUDA (the engine refuses another kv_dtype there).
  static float* fp32_cache(void* p, const KVLayout& L) {
    if (L.dtype != DType::kF32) throw Error("internal: the CUDA backend keeps an fp32 KV cache");
    return static_cast<float*>(p);
  }
  static const float* fp32_cache(const void* p, const KVLayout& L) { return fp32_cache(const_cast<void*>(p), L); }

  void kv_store(const float* qkv, int row_stride, int k_col0, int v_col0, const RowsMeta& meta, const KVLayout& L,
                void* k_cache, void* v_cache) override {
    bind_device(device_);
    if (meta.rows <= 0) return;
    kv_store_kernel<<<meta.rows, kBlock, 0, stream_>>>(qkv, row_stride, k_col0, v_col0, meta.slots, meta.cache_index,
                                                       L.kv_heads, L.max_seq, L.head_dim, fp32_cache(k_cache, L),
                                                       fp32_cache(v_cache, L));
    MRT_CUDA_LAUNCHED("kv_store");
  }

  void attention(const float* qkv, int row_stride, int heads, const RowsMeta& meta, const KVLayout& L,
                 const void* k_cache, const void* v_cache, float* out) override {
    bind_device(device_);
    if (meta.rows <= 0) return;
    if (!attn_smem_) throw Error("internal: CudaBackend::prepare() was not called");
    const dim3 grid(meta.rows, heads);
    attention_kernel<<<grid, kBlock, attn_smem_, stream_>>>(
        qkv, row_stride, heads, heads / L.kv_heads, meta.slots, meta.prefix_len, meta.extra_offsets, meta.extra,
        L.kv_heads, L.max_seq, L.head_dim, 1.0f / std::sqrt(float(L.head_dim)), fp32_cache(k_cache, L),
        fp32_cache(v_cache, L), out);
    MRT_CUDA_LAUNCHED("attention");
  }

  void silu_mul(const float* gu, int rows, int dim, float* out) override {
    bind_device(device_);
    if (rows <= 0) return;
    silu_mul_kernel<<<rows, kBlock, 0, stream_>>>(gu, dim, out);
    MRT_CUDA_LAUNCHED("silu_mul");
  }

  void add(float* x, const float* y, size_t n) override {
    bind_device(device_);
    if (n <= 0) return;
    add_kernel<<<blocks_for(n), kBlock, 0, stream_>>>(x, y, n);
    MRT_CUDA_LAUNCHED("add");
  }

  void matrix_row(const Matrix& m, int row, float* out) override {
    bind_device(device_);
    std::vector<uint16_t> h(m.cols);
    copy_to_host(h.data(), static_cast<const uint16_t*>(m.data) + size_t(row) * padded(m.cols), h.size() * 2);
    for (int c = 0; c < m.cols; ++c) out[c] = m.dtype == DType::kBF16 ? bf16_to_f32(h[c]) : f16_to_f32(h[c]);
  }

  void map_ids(int32_t* ids, size_t n, const int32_t* table) override {
    bind_device(device_);
    if (n <= 0) return;
    map_ids_kernel<<<blocks_for(n), kBlock, 0, stream_>>>(ids, n, table);
    MRT_CUDA_LAUNCHED("map_ids");
  }

  void gather_rows(const float* x, int dim, const int32_t* index, int n, float* out) override {
    bind_device(device_);
    if (n <= 0) return;
    gather_rows_kernel<<<n, kBlock, 0, stream_>>>(x, dim, index, out);
    MRT_CUDA_LAUNCHED("gather_rows");
  }

  void argmax(const float* logits, int rows, int vocab, int32_t* out) override {
    bind_device(device_);
    if (rows <= 0) return;
    argmax_kernel<<<rows, kBlock, 0, stream_>>>(logits, vocab, out);
    MRT_CUDA_LAUNCHED("argmax");
  }

  void topk(const float* logits, int rows, int vocab, int k, int32_t* out) override {
    bind_device(device_);
    if (rows <= 0) return;
    topk_kernel<<<rows, kBlock, 0, stream_>>>(logits, vocab, k, out);
    MRT_CUDA_LAUNCHED("topk");
  }

  void softmax_stats(const float* logits, int rows, int vocab, float temperature, float* lse, float* entropy) override {
    bind_device(device_);
    if (rows <= 0) return;
    // lse and entropy are host memory (the typical acceptance runs on the host): stage them.
    if (rows > max_rows_) throw Error("internal: softmax_stats() beyond the reserved rows");
    softmax_stats_kernel<<<rows, kBlock, 0, stream_>>>(logits, vocab, 1.0f / temperature, stats_, stats_ + rows);
    MRT_CUDA_LAUNCHED("softmax_stats");
    copy_to_host(lse, stats_, sizeof(float) * rows);
    copy_to_host(entropy, stats_ + rows, sizeof(float) * rows);
  }

  void add_silu(float* x, const float* y, size_t n) override {
    bind_device(device_);
    if (n <= 0) return;
    add_silu_kernel<<<blocks_for(n), kBlock, 0, stream_>>>(x, y, n);
    MRT_CUDA_LAUNCHED("add_silu");
  }

  void kv_copy(void* k_cache, void* v_cache, int layers, const KVLayout& L, const int32_t* slots, const int32_t* src,
               const int32_t* dst, int n) override {
    bind_device(device_);
    if (n <= 0) return;
    const size_t threads = size_t(layers) * L.kv_heads * L.head_dim;
    kv_copy_kernel<<<blocks_for(threads), kBlock, 0, stream_>>>(fp32_cache(k_cache, L), fp32_cache(v_cache, L), layers,
                                                               L.kv_heads, L.max_seq, L.head_dim,
                                                               L.layer_elems(), slots, src, dst, n);
    MRT_CUDA_LAUNCHED("kv_copy");
  }

  void tree_rows(const TreeRowsArgs& a) override {
    bind_device(device_);
    if (a.n * a.T <= 0) return;
    tree_rows_kernel<<<blocks_for(size_t(a.n) * a.T), kBlock, 0, stream_>>>(a);
    MRT_CUDA_LAUNCHED("tree_rows");
  }

  void accept_greedy(const AcceptArgs& a) override {
    bind_device(device_);
    if (a.n <= 0) return;
    accept_greedy_kernel<<<blocks_for(a.n), kBlock, 0, stream_>>>(a);
    MRT_CUDA_LAUNCHED("accept_greedy");
  }

  void scatter_candidates(const int32_t* cand, int n, int num_heads, int k, const int32_t* slots,
                          int32_t* dst) override {
    bind_device(device_);
    if (n <= 0) return;
    scatter_candidates_kernel<<<blocks_for(size_t(n) * num_heads * k), kBlock, 0, stream_>>>(cand, n, num_heads, k,
                                                                                           slots, dst);
    MRT_CUDA_LAUNCHED("scatter_candidates");
  }

  // CUDA graphs: one per key, recorded on first use and replayed after. MEDUSA_RT_CUDA_GRAPHS=0
  // turns them off (eager launches); a failed capture turns them off for this engine, said once.
  bool graph_replay(uint64_t key) override {
    bind_device(device_);
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return false;
    MRT_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
    return true;
  }

  bool graph_begin(uint64_t key) override {
    bind_device(device_);
    if (!graphs_enabled_) return false;
    const cudaError_t e = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
      disable_graphs(std::string("cudaStreamBeginCapture: ") + cudaGetErrorString(e));
      return false;
    }
    return true;
  }

  bool graph_end(uint64_t key, bool keep) override {
    bind_device(device_);
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamEndCapture(stream_, &graph);
    if (!keep) {  // the recorded work threw: do not try again every step
      if (graph) cudaGraphDestroy(graph);
      disable_graphs("the decode step failed while it was recorded");
      return false;
    }
    cudaGraphExec_t exec = nullptr;
    if (e == cudaSuccess && graph) e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess || !exec) {
      disable_graphs(std::string("capture of the decode step failed: ") + cudaGetErrorString(e));
      return false;
    }
    graphs_[key] = exec;
    MRT_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    return true;
  }

 private:
  void disable_graphs(const std::string& why) {
    (void)cudaGetLastError();
    if (graphs_enabled_) std::fprintf(stderr, "[medusa_rt] CUDA graphs off, running eagerly: %s\n", why.c_str());
    graphs_enabled_ = false;
  }

  int device_;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  size_t attn_smem_ = 0;
  int max_rows_ = 0, max_k_ = 0, max_n_ = 0;  // the largest linear() shapes (rows reserved, k, n uploaded)
  int reserved_k_ = 0, reserved_n_ = 0;        // the k and n the scratch below was sized for
  void* a16_ = nullptr;
  void* gemm_ws_ = nullptr;
  float* stats_ = nullptr;
  bool graphs_enabled_ = true;
  std::unordered_map<uint64_t, cudaGraphExec_t> graphs_;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<cuda::CudaBackend>(device); }

int cuda_runtime_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace medusa_rt
