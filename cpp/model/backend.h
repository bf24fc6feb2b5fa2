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

struct KVLayout {
  int slots = 0;
  int kv_heads = 0;
  int max_seq = 0;
  int head_dim = 0;
  size_t layer_elems() const { return size_t(slots) * kv_heads * max_seq * head_dim; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int num_threads() const = 0;

  // Memory. allocate() throws CapacityError naming `what` when memory is short.
  virtual void* allocate(size_t bytes, const char* what) = 0;
  virtual void deallocate(void* p) = 0;
  virtual void copy_to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  virtual void copy_on_device(void* dst, const void* src, size_t bytes) = 0;
  // Allocates a matrix and fills it from host data (row-major [rows, cols] of dtype) in the
  // layout the backend's kernels want. Free it with deallocate(matrix.data).
  virtual Matrix upload_matrix(const void* host, DType dtype, int rows, int cols, const char* what) = 0;
  // Bytes the device can still provide (0 if unknown).
  virtual size_t available_memory() const = 0;
  // Called once at engine creation with the KV cache layout, so that per-forward scratch is
  // reserved up front and steady-state steps allocate nothing.
  virtual void prepare(const KVLayout& layout) = 0;

  // out[r] = fp32(table[tokens[r]])
  virtual void embed(const Matrix& table, const int32_t* tokens, int rows, float* out) = 0;
  // out[r] = x[r] / rms(x[r]) * w
  virtual void rmsnorm(const float* x, const float* w, int rows, int dim, float eps, float* out) = 0;
  // y[r, n] = sum_k x[r, k] * w[n, k] + bias[n]   (bias may be null)
  virtual void linear(const float* x, int rows, const Matrix& w, const float* bias, float* y) = 0;
  // Rotary embedding, in place, on `heads` heads of each row starting at column col0 of a
  // row of width row_stride. cos and sin are tables [max_pos][head_dim/2].
  virtual void rope(float* x, int rows, int row_stride, int col0, int heads, int head_dim, const int32_t* positions,
                    const float* cos, const float* sin) = 0;
  // Writes K and V of each row (columns k_col0 / v_col0 of qkv, kv_heads x head_dim each)
  // into the layer's caches at (slots[r], cache_index[r]).
  virtual void kv_store(const float* qkv, int row_stride, int k_col0, int v_col0, const RowsMeta& meta,
                        const KVLayout& layout, float* k_cache, float* v_cache) = 0;
  // Attention of the query heads (columns [0, heads*head_dim) of qkv) over the visible keys
  // of each row's slot; writes [rows, heads*head_dim] to out.
  virtual void attention(const float* qkv, int row_stride, int heads, const RowsMeta& meta, const KVLayout& layout,
                         const float* k_cache, const float* v_cache, float* out) = 0;
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
  // out[r*k + j] = index of the j-th largest of logits[r] (descending; equal values: lower index first)
  virtual void topk(const float* logits, int rows, int vocab, int k, int32_t* out) = 0;
  // Per row r of z = logits[r] / temperature: lse[r] = log(sum exp z) and
  // entropy[r] = -sum p log(p + 1e-5) with p = softmax(z) (Medusa's typical acceptance).
  virtual void softmax_stats(const float* logits, int rows, int vocab, float temperature, float* lse,
                             float* entropy) = 0;
  // x += silu(y)   (Medusa head residual block)
  virtual void add_silu(float* x, const float* y, size_t n) = 0;
  // Copies K/V of every layer within sequence slots: (slots[i], src[i]) -> (slots[i], dst[i]),
  // for i = 0..n-1 in order (KV compaction after tree verification).
  virtual void kv_copy(float* k_cache, float* v_cache, int layers, const KVLayout& layout, const int32_t* slots,
                       const int32_t* src, const int32_t* dst, int n) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(int num_threads);

}  // namespace medusa_rt
