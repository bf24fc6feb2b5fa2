// Test hooks into a Session. Not part of the public API: used by the test suite (through the
// Python module's _testing functions) to drive and observe the decoder.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "decoding/decoder.h"
#include "medusa_rt/engine.h"

namespace medusa_rt::testing {

// The expected token sequence of the session's whole context (prompt + continuation): every
// Medusa step then gets the true continuation as head candidates, at a rank that varies with
// the position and head (vary_rank) or always at rank 0 (perfect heads), so long paths are
// accepted and KV compaction moves entries. Empty clears the oracle.
void set_oracle(Session& s, const std::vector<int32_t>& tokens, bool vary_rank = true);
// Records every Medusa step (tree tokens, node logits, accepted path) while enabled.
void set_record(Session& s, bool on);
std::vector<SequenceState::StepRecord> take_records(Session& s);
// K and V of one layer for positions [0, length) of the session's slot: [kv_heads][length][head_dim].
void read_kv(Session& s, int layer, int length, std::vector<float>& k, std::vector<float>& v);
// One verify step of the engine's tree cut to `nodes` nodes at batch 1 after `context` cached
// tokens (best of reps): {forward seconds (as a greedy step runs it: the lm_head with a fused
// argmax), heads seconds}. nodes = 1 is a plain decode step's forward.
std::vector<double> time_tree_step(Engine& e, int nodes, int reps, int context = 0);
// The token ids the engine's heads rank (increasing; empty: the whole vocabulary or no heads).
std::vector<int32_t> draft_vocab(Engine& e);
// Runs `jobs` parallel_for jobs of 1 .. max_tasks tasks back to back on a pool of `threads` and
// returns how many tasks did not run exactly once in their job (0: the pool is sound).
int thread_pool_check(int threads, int jobs, int max_tasks);
// Streaming read bandwidth of this machine in bytes/s: `threads` threads (0 = all cores) sum a
// buffer of `bytes` (best of reps). The memory-bandwidth bound of decoding divides it.
double stream_bandwidth(size_t bytes, int threads, int reps);
// Arithmetic peak of this machine in fp32 flop/s: `threads` threads (0 = all cores) run
// independent FMA chains at once, no memory traffic (best of reps, summed over threads). A verify
// step of T tree tokens cannot take less than T * 2 * matmul weights / this.
double fma_peak(int threads, int reps);

// Runs single Backend operations on host data, to check a backend's kernels against another
// backend or an independent reference. Matrices are given as fp32 [rows, cols] and rounded to
// `dtype` ("fp32", "bf16", "fp16") on upload. Caches are one layer of `layout`.
class BackendHarness {
 public:
  explicit BackendHarness(const std::string& device, int num_threads = 1);  // "cpu", "cuda", "cuda:N"
  ~BackendHarness();
  std::string device_name() const;

  std::vector<float> linear(const std::vector<float>& x, int rows, const std::vector<float>& w, int n, int k,
                            const std::string& dtype, const std::vector<float>& bias);
  // linear() without bias fused with argmax() (the greedy lm_head).
  std::vector<int32_t> linear_argmax(const std::vector<float>& x, int rows, const std::vector<float>& w, int n, int k,
                                     const std::string& dtype);
  // Embeddings of `tokens`, followed by matrix_row() of the table's last row.
  std::vector<float> embed(const std::vector<float>& table, int rows, int cols, const std::string& dtype,
                           const std::vector<int32_t>& tokens);
  std::vector<float> rmsnorm(const std::vector<float>& x, int rows, const std::vector<float>& w, float eps);
  // add_rmsnorm(): [x + y..., the normed rows...]
  std::vector<float> add_rmsnorm(const std::vector<float>& x, const std::vector<float>& y, int rows,
                                 const std::vector<float>& w, float eps);
  std::vector<float> rope(const std::vector<float>& x, int rows, int row_stride, int col0, int heads, int head_dim,
                          const std::vector<int32_t>& positions, const std::vector<float>& cos,
                          const std::vector<float>& sin);
  std::vector<float> silu_mul(const std::vector<float>& gu, int rows);
  std::vector<float> add(const std::vector<float>& x, const std::vector<float>& y, bool silu);
  std::vector<float> gather_rows(const std::vector<float>& x, int dim, const std::vector<int32_t>& index);
  std::vector<int32_t> argmax(const std::vector<float>& logits, int rows);
  // topk, then map_ids through id_map when it is not empty.
  std::vector<int32_t> topk(const std::vector<float>& logits, int rows, int k, const std::vector<int32_t>& id_map);
  // [lse of every row..., entropy of every row...]
  std::vector<float> softmax_stats(const std::vector<float>& logits, int rows, float temperature);
  // kv_store of the rows' K/V (columns k_col0 / v_col0 of qkv) into the caches, then attention;
  // the caches come back updated. With a bf16 layout the caches are held in bf16 (given values
  // rounded, returned widened).
  std::vector<float> attention(const std::vector<float>& qkv, int rows, int row_stride, int heads,
                               const KVLayout& layout, const std::vector<int32_t>& slots,
                               const std::vector<int32_t>& cache_index, const std::vector<int32_t>& prefix_len,
                               const std::vector<int32_t>& extra_offsets, const std::vector<int32_t>& extra,
                               int k_col0, int v_col0, std::vector<float>& k_cache, std::vector<float>& v_cache);
  // Caches of `layers` layers.
  void kv_copy(std::vector<float>& k_cache, std::vector<float>& v_cache, int layers, const KVLayout& layout,
               const std::vector<int32_t>& slots, const std::vector<int32_t>& src, const std::vector<int32_t>& dst);

 private:
  struct Buf;
  template <class T>
  std::unique_ptr<Buf> upload(const std::vector<T>& v);
  template <class T>
  std::vector<T> download(const Buf& b, size_t n);
  Matrix matrix(const std::vector<float>& w, int rows, int cols, const std::string& dtype);
  std::unique_ptr<Backend> be_;
};

}  // namespace medusa_rt::testing
