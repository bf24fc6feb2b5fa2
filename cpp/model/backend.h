// The device interface the model forward is written against.
//
// A backend owns memory and runs the forward's operations. All tensor pointers passed to the
// operations live in backend memory (allocate()); activations are row-major fp32. Dispatch to
// the device happens here, once per operation; kernels behind it are plain functions.
// The CPU backend is cpu/cpu_backend.*; a CUDA backend implements the same interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/dtype.h"

namespace medusa_rt {

// A weight matrix [rows = out features, cols = in features] in backend memory, in the
// backend's own layout (made by Backend::upload_matrix; the CPU backend packs row panels).
struct Matrix {
  const void* data = nullptr;
  DType dtype = DType::kF32;  // kF32, kBF16 or kF16
  int rows = 0;
  int cols = 0;
};

// Per-row metadata of one forward (arrays of `rows` entries in backend memory).
struct RowsMeta {
  int rows = 0;
  const int32_t* tokens = nullptr;
  const int32_t* positions = nullptr;    // RoPE positions
  const int32_t* slots = nullptr;        // sequence slot (KV cache row) of each row
  const int32_t* cache_index = nullptr;  // where the row's K/V are written in its slot
  const int32_t* prefix_len = nullptr;   // keys [0, prefix_len) of the slot are visible
  const int32_t* extra_offsets = nullptr;  // rows+1 offsets into extra (CSR), or null
  const int32_t* extra = nullptr;          // further visible cache indices, increasing per row
};

// One layer's KV cache: [slots][kv_heads][max_seq][head_dim] keys, and values alike, in dtype
// (kF32, or kBF16: K/V rounded to bf16 when stored, widened exactly when read).
struct KVLayout {
  int slots = 0;
  int kv_heads = 0;
  int max_seq = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
  size_t layer_elems() const { return size_t(slots) * kv_heads * max_seq * head_dim; }
  size_t elem_bytes() const { return dtype == DType::kF32 ? 4 : 2; }
  size_t layer_bytes() const { return layer_elems() * elem_bytes(); }
};

// A decode step's tree rows built on the device (Backend::tree_rows): n sequences, each with the
// first T nodes of the tree, row s*T + i for node i of sequence s. Per-slot state: lengths,
// pending (root) tokens and head candidates [slot][cand_stride]. All backend memory.
struct TreeRowsArgs {
  int n = 0, T = 0, cand_stride = 0;
  const int32_t* batch_slots = nullptr;  // [n]
  const int32_t* lengths = nullptr;      // [slots]
  const int32_t* roots = nullptr;        // [slots]
  const int32_t* candidates = nullptr;   // [slots][cand_stride]
  const int32_t* depths = nullptr;       // [T] tree node depths (root 0)
  const int32_t* cand_index = nullptr;   // [T] each node's token among its slot's candidates (root unused)
  const int32_t* anc_offsets = nullptr;  // [T + 1] CSR offsets of each node's ancestors (root excluded)
  const int32_t* ancestors = nullptr;    // [anc_offsets[T]] ancestor node indices, increasing
  // Outputs, [n*T] each (extra_offsets [n*T + 1], extra [n * anc_offsets[T]]).
  int32_t *tokens = nullptr, *positions = nullptr, *slots = nullptr, *cache_index = nullptr, *prefix_len = nullptr,
          *extra_offsets = nullptr, *extra = nullptr, *logit_rows = nullptr;
};

// Greedy acceptance of n verified trees on the device (Backend::accept_greedy), the same rule as
// accept_greedy() in decoding/acceptance.h: from the root, descend to the first child whose
// token equals the argmax at the current node.
struct AcceptArgs {
  int n = 0, T = 0, max_depth = 0;
  const int32_t* batch_slots = nullptr;  // [n]
  const int32_t* tokens = nullptr;       // [n*T] the rows' tokens (TreeRowsArgs::tokens)
  const int32_t* argmax = nullptr;       // [n*T] base model argmax of every row
  const int32_t* parents = nullptr;      // [T] tree parents (root -1)
  int32_t* lengths = nullptr;            // [slots] += accepted + 1
  int32_t* roots = nullptr;              // [slots] = the bonus token
  // Outputs: out[s * (max_depth + 2) + 0] = accepted a, then the a accepted tokens and the bonus
  // token. KV compaction list, max_depth entries per sequence (unused ones copy an entry onto
  // itself): copy_slots / copy_src / copy_dst [n * max_depth]. hidden_rows[s] = row of the last
  // accepted node (the heads' input).
  int32_t *out = nullptr, *copy_slots = nullptr, *copy_src = nullptr, *copy_dst = nullptr, *hidden_rows = nullptr;
  // Heads with a draft layer (null otherwise): draft_len[slot] = positions the slot's draft cache
  // holds (-1: none usable), updated; and the draft layer's rows (DraftState's row metadata),
  // max_depth + 1 per sequence: the committed nodes (the root node, then the accepted ones; all of
  // them, or with draft_len -1 only the last, at position 0), padded with the last.
  int32_t* draft_len = nullptr;
  int32_t *draft_rows = nullptr, *draft_tokens = nullptr, *draft_positions = nullptr, *draft_prefix = nullptr,
          *draft_slots = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Kernel set, e.g. "cpu/avx2" or "cuda/sm_90".
  virtual std::string name() const = 0;
  // The device in words, e.g. "cpu (2 threads)" or "cuda:0 (NVIDIA H100 80GB HBM3, 81559 MiB)".
  virtual std::string device_name() const = 0;
  virtual int num_threads() const = 0;

  // Memory. allocate() throws CapacityError naming `what` when memory is short.
  virtual void* allocate(size_t bytes, const char* what) = 0;
  virtual void deallocate(void* p) = 0;
  virtual void copy_to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  virtual void copy_on_device(void* dst, const void* src, size_t bytes) = 0;
  // `rows` copies of `bytes` bytes, row r from src + r * src_pitch to dst + r * dst_pitch (device
  // memory; one strided copy where the device has it).
  virtual void copy_on_device_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t bytes,
                                 int rows) {
    for (int r = 0; r < rows; ++r) {
      copy_on_device(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, bytes);
    }
  }
  // Waits until all work issued so far has finished (timing; a no-op on the CPU).
  virtual void synchronize() {}
  // Allocates a matrix and fills it from host data (row-major [rows, cols] of dtype; for kI8,
  // weight-only int8 (CPU only), fp32 values that the backend quantizes) in the layout the
  // backend's kernels want. Free it with deallocate(matrix.data).
  virtual Matrix upload_matrix(const void* host, DType dtype, int rows, int cols, const char* what) = 0;
  // Bytes the device can still provide (0 if unknown).
  virtual size_t available_memory() const = 0;
  // Called once at engine creation with the KV cache layout, so that per-forward scratch is
  // reserved up front and steady-state steps allocate nothing.
  virtual void prepare(const KVLayout& layout) = 0;
  // Called at engine creation, after the matrices are uploaded, by every user of the backend with
  // the most rows it will pass to one call (linear, norms, ...): scratch sized by rows is
  // reserved here, not during steps.
  virtual void reserve_rows(int rows) {}

  // out[r] = fp32(table[tokens[r]])
  virtual void embed(const Matrix& table, const int32_t* tokens, int rows, float* out) = 0;
  // out[r] = x[r] / rms(x[r]) * w
  virtual void rmsnorm(const float* x, const float* w, int rows, int dim, float eps, float* out) = 0;
  // x += y, then rmsnorm(x) into out: the residual add and the next norm, the same values as the
  // two operations (the CPU backend makes one pass; the default runs both).
  virtual void add_rmsnorm(float* x, const float* y, const float* w, int rows, int dim, float eps, float* out) {
    add(x, y, size_t(rows) * dim);
    rmsnorm(x, w, rows, dim, eps, out);
  }
  // y[r, n] = sum_k x[r, k] * w[n, k] + bias[n]   (bias may be null)
  virtual void linear(const float* x, int rows, const Matrix& w, const float* bias, float* y) = 0;
  // Rotary embedding, in place, on `heads` heads of each row starting at column col0 of a
  // row of width row_stride. cos and sin are tables [max_pos][head_dim/2].
  virtual void rope(float* x, int rows, int row_stride, int col0, int heads, int head_dim, const int32_t* positions,
                    const float* cos, const float* sin) = 0;
  // Writes K and V of each row (columns k_col0 / v_col0 of qkv, kv_heads x head_dim each)
  // into the layer's caches at (slots[r], cache_index[r]).
  virtual void kv_store(const float* qkv, int row_stride, int k_col0, int v_col0, const RowsMeta& meta,
                        const KVLayout& layout, void* k_cache, void* v_cache) = 0;
  // Attention of the query heads (columns [0, heads*head_dim) of qkv) over the visible keys
  // of each row's slot; writes [rows, heads*head_dim] to out.
  virtual void attention(const float* qkv, int row_stride, int heads, const RowsMeta& meta, const KVLayout& layout,
                         const void* k_cache, const void* v_cache, float* out) = 0;
  // out[r, i] = silu(gu[r, i]) * gu[r, dim + i]
  virtual void silu_mul(const float* gu, int rows, int dim, float* out) = 0;
  // x += y
  virtual void add(float* x, const float* y, size_t n) = 0;
  // Row `row` of a matrix (as made by upload_matrix) as fp32 into host memory out[0, cols).
  virtual void matrix_row(const Matrix& m, int row, float* out) = 0;
  // ids[i] = table[ids[i]] for i < n (token ids of a sub-vocabulary back to the full one).
  virtual void map_ids(int32_t* ids, size_t n, const int32_t* table) = 0;
  // Gathers rows: out[i] = x[index[i]]
  virtual void gather_rows(const float* x, int dim, const int32_t* index, int n, float* out) = 0;
  // out[r] = first index of the maximum of logits[r]
  virtual void argmax(const float* logits, int rows, int vocab, int32_t* out) = 0;
  // out[r] = argmax of linear(x, rows, w, no bias)[r]: the same values and the same index as
  // linear() then argmax() (for finite logits), where only the argmax is wanted (greedy lm_head).
  // `logits` [rows, w.rows] is scratch a backend may use; its contents are unspecified after.
  // The CPU backend reduces each thread's columns chunk by chunk while they are in L1 and writes
  // no logits; the default runs the two operations.
  virtual void linear_argmax(const float* x, int rows, const Matrix& w, float* logits, int32_t* out) {
    linear(x, rows, w, nullptr, logits);
    argmax(logits, rows, w.rows, out);
  }
  // out[r*k + j] = index of the j-th largest of logits[r] (descending; equal values: lower index first)
  virtual void topk(const float* logits, int rows, int vocab, int k, int32_t* out) = 0;
  // Per row r of z = logits[r] / temperature: lse[r] = log(sum exp z) and entropy[r] =
  // -sum p log(p + 1e-5) with p = softmax(z) (Medusa's typical acceptance). lse and entropy
  // are host memory (rows <= the reserved rows).
  virtual void softmax_stats(const float* logits, int rows, int vocab, float temperature, float* lse,
                             float* entropy) = 0;
  // x += silu(y)   (Medusa head residual block)
  virtual void add_silu(float* x, const float* y, size_t n) = 0;
  // Copies K/V of every layer within sequence slots: (slots[i], src[i]) -> (slots[i], dst[i]),
  // for i = 0..n-1 in order (KV compaction after tree verification).
  virtual void kv_copy(void* k_cache, void* v_cache, int layers, const KVLayout& layout, const int32_t* slots,
                       const int32_t* src, const int32_t* dst, int n) = 0;

  // The fused decode step's device-side parts (see TreeRowsArgs, AcceptArgs).
  virtual void tree_rows(const TreeRowsArgs& args) = 0;
  virtual void accept_greedy(const AcceptArgs& args) = 0;
  // dst[slots[r]][h][j] = cand[(h * n + r) * k + j]: head candidates from the heads' batch
  // layout ([h][rows][k], HeadsPlan) into per-slot state.
  virtual void scatter_candidates(const int32_t* cand, int n, int num_heads, int k, const int32_t* slots,
                                  int32_t* dst) = 0;

  // Graphs of recorded work (CUDA graphs), keyed by the caller. graph_replay runs the graph
  // recorded under key and returns true, or returns false when there is none. graph_begin starts
  // recording the work issued until graph_end: false when this backend cannot record (the CPU)
  // or recording failed before. graph_end(key, keep) stops recording; with keep it stores the
  // graph and runs it once and returns true; it returns false when the recording failed or keep
  // is false: nothing of the recorded work has run then, the caller runs it eagerly.
  virtual bool graph_replay(uint64_t key) { return false; }
  virtual bool graph_begin(uint64_t key) { return false; }
  virtual bool graph_end(uint64_t key, bool keep) { return false; }
};

// bf16_matmul_inputs: bf16 weights multiply inputs rounded to bf16 (the AVX512-BF16 dot product;
// InvalidArgumentError where the CPU lacks it).
std::unique_ptr<Backend> make_cpu_backend(int num_threads, bool bf16_matmul_inputs = false);
// The CUDA backend on GPU `device` (cpp/cuda; only in builds with MEDUSA_RT_CUDA=ON). Throws
// InvalidArgumentError when there is no such GPU.
std::unique_ptr<Backend> make_cuda_backend(int device);
// GPUs the CUDA runtime reports (0 on error).
int cuda_runtime_device_count();

}  // namespace medusa_rt
