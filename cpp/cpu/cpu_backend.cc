// The CPU backend: host memory, a thread pool, and the kernels of cpu/kernels.h.
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "cpu/host_memory.h"
#include "cpu/kernels.h"
#include "cpu/packing.h"
#include "medusa_rt/errors.h"
#include "model/backend.h"
#include "model/step_ops.h"

namespace medusa_rt {
namespace {

cpu::WType wtype(DType d) {
  switch (d) {
    case DType::kF32: return cpu::WType::kF32;
    case DType::kBF16: return cpu::WType::kBF16;
    case DType::kF16: return cpu::WType::kF16;
    case DType::kI8: return cpu::WType::kI8;
    default: throw UnsupportedModelError(std::string("weight dtype ") + dtype_name(d) + " is not supported by the CPU backend");
  }
}

size_t mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t value = 0;
  std::string unit;
  while (in >> key >> value >> unit) {
    if (key == "MemAvailable:") return value * 1024;
  }
  struct sysinfo si;
  if (sysinfo(&si) == 0) return size_t(si.freeram) * si.mem_unit;
  return 0;
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int num_threads, bool bf16_matmul_inputs)
      : pool_(num_threads), k_(cpu::kernels()), bf16_pairs_(bf16_matmul_inputs) {
    if (bf16_pairs_ && !cpu::bf16_pairs_supported()) {
      throw InvalidArgumentError(std::string("matmul_inputs=\"bf16\" needs the AVX512-BF16 dot product, which this "
                                             "CPU or kernel set (") + k_.isa + ") does not have");
    }
  }

  std::string name() const override { return std::string("cpu/") + k_.isa; }
  // The packed type of a weight dtype: bf16 weights by k pairs when the inputs are rounded to bf16.
  cpu::WType wt_of(DType d) const { return d == DType::kBF16 && bf16_pairs_ ? cpu::WType::kBF16Pairs : wtype(d); }
  std::string device_name() const override {
    return "cpu (" + std::to_string(pool_.num_threads()) + " threads, " + k_.isa + ")";
  }
  int num_threads() const override { return pool_.num_threads(); }

  void* allocate(size_t bytes, const char* what) override {
    void* p = memory_.allocate(bytes);
    if (!p) {
      throw CapacityError(std::string("out of memory allocating ") + std::to_string(bytes >> 20) + " MiB for " + what);
    }
    return p;
  }
  void deallocate(void* p) override { memory_.deallocate(p); }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void fill_zero(void* dst, size_t bytes) override { std::memset(dst, 0, bytes); }
  void copy_on_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  size_t available_memory() const override { return mem_available_bytes(); }

  void prepare(const KVLayout&) override {}  // attention's scratch lives on the stack of its tasks

  Matrix upload_matrix(const void* host, DType dtype, int rows, int cols, const char* what) override {
    const cpu::WType wt = wt_of(dtype);
    void* p = allocate(cpu::packed_bytes(rows, cols, wt), what);
    cpu::pack_rows(host, rows, cols, wt, p);
    return Matrix{p, dtype, rows, cols};
  }

  void embed(const Matrix& table, const int32_t* tokens, int rows, float* out) override {
    const cpu::WType wt = wt_of(table.dtype);
    for (int r = 0; r < rows; ++r) {
      cpu::unpack_row(table.data, table.rows, table.cols, wt, tokens[r], out + int64_t(r) * table.cols);
    }
  }

  void rmsnorm(const float* x, const float* w, int rows, int dim, float eps, float* out) override {
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + int64_t(r) * dim;
      double ss = 0.0;
      for (int i = 0; i < dim; ++i) ss += double(xr[i]) * xr[i];
      scale_row(xr, w, dim, ss, eps, out + int64_t(r) * dim);
    }
  }

  void add_rmsnorm(float* x, const float* y, const float* w, int rows, int dim, float eps, float* out) override {
    for (int r = 0; r < rows; ++r) {
      float* xr = x + int64_t(r) * dim;
      const float* yr = y + int64_t(r) * dim;
      double ss = 0.0;
      for (int i = 0; i < dim; ++i) {
        xr[i] += yr[i];
        ss += double(xr[i]) * xr[i];
      }
      scale_row(xr, w, dim, ss, eps, out + int64_t(r) * dim);
    }
  }

  void linear(const float* x, int rows, const Matrix& w, const float* bias, float* y) override {
    const cpu::WType wt = wt_of(w.dtype);
    const int N = w.rows, K = w.cols;
    const int T = pool_.num_threads();
    // Split the output columns evenly, in whole 16-column panels (the kernels take a partial
    // group of panels at the end of a range).
    const int panels = (N + 15) / 16;
    const int chunk = (panels + T - 1) / T * 16;
    const int tasks = (N + chunk - 1) / chunk;
    pool_.parallel_for(tasks, [&](int t) {
      const int n0 = t * chunk, n1 = std::min(N, n0 + chunk);
      k_.gemm(x, K, rows, K, w.data, wt, bias, n0, n1, y, N);
    });
  }

  void reserve_rows(int rows) override {
    if (rows <= argmax_rows_) return;
    argmax_rows_ = rows;
    const size_t T = pool_.num_threads();
    argmax_chunk_.assign(T * rows * kArgmaxCols, 0.f);
    argmax_best_.assign(T * rows, 0.f);
    argmax_index_.assign(T * rows, 0);
  }

  void linear_argmax(const float* x, int rows, const Matrix& w, float* /*logits*/, int32_t* out) override {
    const cpu::WType wt = wt_of(w.dtype);
    const int N = w.rows, K = w.cols;
    if (rows <= 0 || N <= 0) return;
    reserve_rows(rows);  // no-op in steps: the model reserved its rows at creation
    const int T = pool_.num_threads();
    const int panels = (N + 15) / 16;
    const int span = (panels + T - 1) / T * 16;
    const int tasks = (N + span - 1) / span;
    const size_t panel_bytes = size_t(cpu::panel_elems(K, wt)) * cpu::wtype_size(wt);
    // Each task: its columns in chunks of kArgmaxCols (whole panels: a chunk is the packed matrix
    // from its first panel on, columns [0, width)), each reduced into a running first-max per row
    // while in L1. The per-element operations are the GEMM's, so the values are linear()'s.
    pool_.parallel_for(tasks, [&](int t) {
      float* chunk = argmax_chunk_.data() + size_t(t) * argmax_rows_ * kArgmaxCols;
      float* best = argmax_best_.data() + size_t(t) * argmax_rows_;
      int32_t* index = argmax_index_.data() + size_t(t) * argmax_rows_;
      const int n0 = t * span, n1 = std::min(N, n0 + span);
      for (int c0 = n0; c0 < n1; c0 += kArgmaxCols) {
        const int width = std::min(kArgmaxCols, n1 - c0);
        const void* wc = static_cast<const char*>(w.data) + size_t(c0 / 16) * panel_bytes;
        k_.gemm(x, K, rows, K, wc, wt, nullptr, 0, width, chunk, kArgmaxCols);
        for (int r = 0; r < rows; ++r) {
          const float* v = chunk + size_t(r) * kArgmaxCols;
          int j0 = 0;
          if (c0 == n0) {
            best[r] = v[0];
            index[r] = c0;
            j0 = 1;
          }
          float b = best[r];
          int bj = -1;
          for (int j = j0; j < width; ++j) {
            if (v[j] > b) {
              b = v[j];
              bj = j;
            }
          }
          if (bj >= 0) {
            best[r] = b;
            index[r] = c0 + bj;
          }
        }
      }
    });
    // Tasks hold increasing column ranges: a later one wins only with a strictly larger value.
    for (int r = 0; r < rows; ++r) {
      float b = argmax_best_[r];
      int32_t bi = argmax_index_[r];
      for (int t = 1; t < tasks; ++t) {
        const float v = argmax_best_[size_t(t) * argmax_rows_ + r];
        if (v > b) {
          b = v;
          bi = argmax_index_[size_t(t) * argmax_rows_ + r];
        }
      }
      out[r] = bi;
    }
  }

  void rope(float* x, int rows, int row_stride, int col0, int heads, int head_dim, const int32_t* positions,
            const float* cos, const float* sin) override {
    const int half = head_dim / 2;
    for (int r = 0; r < rows; ++r) {
      const float* c = cos + int64_t(positions[r]) * half;
      const float* s = sin + int64_t(positions[r]) * half;
      for (int h = 0; h < heads; ++h) {
        float* v = x + int64_t(r) * row_stride + col0 + int64_t(h) * head_dim;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i] + a * s[i];
        }
      }
    }
  }

  void kv_store(const float* qkv, int row_stride, int k_col0, int v_col0, const RowsMeta& meta, const KVLayout& L,
                void* k_cache, void* v_cache) override {
    const int hd = L.head_dim;
    for (int r = 0; r < meta.rows; ++r) {
      const float* row = qkv + int64_t(r) * row_stride;
      for (int h = 0; h < L.kv_heads; ++h) {
        const size_t dst = ((size_t(meta.slots[r]) * L.kv_heads + h) * L.max_seq + meta.cache_index[r]) * hd;
        const float* k = row + k_col0 + h * hd;
        const float* v = row + v_col0 + h * hd;
        if (L.dtype == DType::kBF16) {
          uint16_t* kd = static_cast<uint16_t*>(k_cache) + dst;
          uint16_t* vd = static_cast<uint16_t*>(v_cache) + dst;
          for (int d = 0; d < hd; ++d) {
            kd[d] = f32_to_bf16(k[d]);
            vd[d] = f32_to_bf16(v[d]);
          }
        } else {
          std::memcpy(static_cast<float*>(k_cache) + dst, k, size_t(hd) * sizeof(float));
          std::memcpy(static_cast<float*>(v_cache) + dst, v, size_t(hd) * sizeof(float));
        }
      }
    }
  }

  void attention(const float* qkv, int row_stride, int heads, const RowsMeta& meta, const KVLayout& L,
                 const void* k_cache, const void* v_cache, float* out) override {
    constexpr int S = cpu::kAttendRange;
    const int group = heads / L.kv_heads, hd = L.head_dim;
    const float scale = 1.0f / std::sqrt(float(hd));
    auto list_len = [&](int r) {
      return meta.prefix_len[r] + (meta.extra_offsets ? meta.extra_offsets[r + 1] - meta.extra_offsets[r] : 0);
    };
    // Tasks: one range of the queries that share a kv head and the visible prefix (the q heads of
    // one kv head, for consecutive rows of one sequence with the same prefix: a tree step's
    // rows), at most kMaxAttendQueries at once, so a range's keys and values are read once for
    // them. A query whose list spans several ranges gets partial results, merged afterwards.
    // (The vectors grow only when a forward needs more than any before.)
    attend_tasks_.clear();
    merges_.clear();
    groups_.clear();
    partial_offset_.assign(size_t(meta.rows) * heads, 0);
    size_t partial = 0;
    const size_t per_range = size_t(hd) + 2;  // o, then m and l
    int ranges_all = 0, queries_all = 0;      // (kv head, range) pairs, and queries over them
    for (int r0 = 0, r1; r0 < meta.rows; r0 = r1) {
      for (r1 = r0 + 1; r1 < meta.rows && meta.slots[r1] == meta.slots[r0] && meta.prefix_len[r1] == meta.prefix_len[r0];) ++r1;
      int ranges = 0;
      for (int r = r0; r < r1; ++r) {
        const int n = list_len(r);
        if (n <= 0) throw Error("internal: an attention row sees no keys");
        const int c = (n + S - 1) / S;
        ranges = std::max(ranges, c);
        if (c < 2) continue;
        for (int h = 0; h < heads; ++h) {
          partial_offset_[size_t(r) * heads + h] = partial;
          merges_.push_back({r, h, c, partial});
          partial += size_t(c) * per_range;
        }
      }
      groups_.push_back({r0, r1, ranges});
      ranges_all += L.kv_heads * ranges;
      queries_all += L.kv_heads * ranges * (r1 - r0) * group;
    }
    // Whole (kv head, range) pairs while there are enough of them to keep the threads busy (each
    // range's keys and values read once: long contexts are bound by that); else the queries too
    // are split, a few tasks per thread (short contexts with many queries are bound by arithmetic).
    const int threads = pool_.num_threads();
    const int per_task = ranges_all >= 3 * threads
                             ? cpu::kMaxAttendQueries
                             : std::clamp((queries_all + 3 * threads - 1) / (3 * threads), 1, cpu::kMaxAttendQueries);
    for (const AttendGroup& g : groups_) {
      const int nq = (g.r1 - g.r0) * group;
      for (int kvh = 0; kvh < L.kv_heads; ++kvh) {
        for (int c = 0; c < g.ranges; ++c) {
          for (int q0 = 0; q0 < nq; q0 += per_task) attend_tasks_.push_back({g.r0, kvh, q0, std::min(nq, q0 + per_task), c});
        }
      }
    }
    if (partial_.size() < partial) partial_.resize(partial);
    pool_.parallel_for(static_cast<int>(attend_tasks_.size()), [&](int i) {
      const AttendTask& task = attend_tasks_[i];
      alignas(32) float scores[cpu::kMaxAttendQueries * S];
      float stats[2 * cpu::kMaxAttendQueries];
      cpu::AttendArgs args[cpu::kMaxAttendQueries];
      const size_t base = ((size_t(meta.slots[task.row]) * L.kv_heads + task.kv_head) * L.max_seq * hd) * L.elem_bytes();
      int n = 0;
      for (int q = task.q0; q < task.q1; ++q) {
        const int r = task.row + q / group, h = task.kv_head * group + q % group;
        const int len = list_len(r);
        if (len <= task.range * S) continue;  // this query's list ends in an earlier range
        cpu::AttendArgs& a = args[n];
        a.q = qkv + int64_t(r) * row_stride + int64_t(h) * hd;
        a.k = static_cast<const char*>(k_cache) + base;
        a.v = static_cast<const char*>(v_cache) + base;
        a.kv_bf16 = L.dtype == DType::kBF16;
        a.head_dim = hd;
        a.prefix_len = meta.prefix_len[r];
        a.extra = meta.extra_offsets ? meta.extra + meta.extra_offsets[r] : nullptr;
        a.num_extra = len - a.prefix_len;
        a.begin = task.range * S;
        a.end = std::min(a.begin + S, len);
        a.scale = scale;
        a.scores = scores + size_t(n) * S;
        if (len <= S) {  // one range: the output directly
          a.out = out + int64_t(r) * heads * hd + int64_t(h) * hd;
          a.stats = stats + 2 * n;
        } else {
          a.out = partial_.data() + partial_offset_[size_t(r) * heads + h] + size_t(task.range) * per_range;
          a.stats = a.out + hd;
        }
        ++n;
      }
      if (n == 0) return;
      k_.attend(args, n);
      for (int j = 0; j < n; ++j) {
        if (args[j].stats != stats + 2 * j) continue;
        const float inv = 1.f / stats[2 * j + 1];
        for (int d = 0; d < hd; ++d) args[j].out[d] *= inv;
      }
    });
    if (merges_.empty()) return;
    // out = sum_c w_c o_c / sum_c w_c l_c with w_c = exp(m_c - max_c m_c), ranges in order.
    const int T = std::min<int>(pool_.num_threads(), static_cast<int>(merges_.size()));
    pool_.parallel_for(T, [&](int t) {
      for (size_t i = merges_.size() * t / T, i1 = merges_.size() * (t + 1) / T; i < i1; ++i) {
        const MergeItem& m = merges_[i];
        const float* p = partial_.data() + m.offset;
        float mx = -INFINITY;
        for (int c = 0; c < m.ranges; ++c) mx = std::max(mx, p[c * per_range + hd]);
        float* o = out + int64_t(m.row) * heads * hd + int64_t(m.head) * hd;
        float w = std::exp(p[hd] - mx), l = w * p[hd + 1];
        for (int d = 0; d < hd; ++d) o[d] = w * p[d];
        for (int c = 1; c < m.ranges; ++c) {
          const float* pc = p + c * per_range;
          w = std::exp(pc[hd] - mx);
          l += w * pc[hd + 1];
          for (int d = 0; d < hd; ++d) o[d] += w * pc[d];
        }
        const float inv = 1.f / l;
        for (int d = 0; d < hd; ++d) o[d] *= inv;
      }
    });
  }

  void silu_mul(const float* gu, int rows, int dim, float* out) override {
    for (int r = 0; r < rows; ++r) {
      const float* g = gu + int64_t(r) * 2 * dim;
      k_.silu_mul(g, g + dim, out + int64_t(r) * dim, dim);
    }
  }

  void add(float* x, const float* y, size_t n) override {
    for (size_t i = 0; i < n; ++i) x[i] += y[i];
  }

  void matrix_row(const Matrix& m, int row, float* out) override {
    cpu::unpack_row(m.data, m.rows, m.cols, wt_of(m.dtype), row, out);
  }

  void map_ids(int32_t* ids, size_t n, const int32_t* table) override {
    for (size_t i = 0; i < n; ++i) ids[i] = table[ids[i]];
  }

  void gather_rows(const float* x, int dim, const int32_t* index, int n, float* out) override {
    for (int i = 0; i < n; ++i) std::memcpy(out + int64_t(i) * dim, x + int64_t(index[i]) * dim, dim * sizeof(float));
  }

  void argmax(const float* logits, int rows, int vocab, int32_t* out) override {
    for (int r = 0; r < rows; ++r) {
      const float* l = logits + int64_t(r) * vocab;
      int best = 0;
      for (int i = 1; i < vocab; ++i) {
        if (l[i] > l[best]) best = i;
      }
      out[r] = best;
    }
  }

  void topk(const float* logits, int rows, int vocab, int k, int32_t* out) override {
    // Selection by insertion into a sorted list of k: O(vocab) for the small k Medusa uses.
    for (int r = 0; r < rows; ++r) {
      const float* l = logits + int64_t(r) * vocab;
      int32_t* o = out + int64_t(r) * k;
      int n = 0;
      for (int i = 0; i < vocab; ++i) {
        const float v = l[i];
        if (n == k && !(v > l[o[k - 1]])) continue;
        int pos = n < k ? n++ : k - 1;
        while (pos > 0 && v > l[o[pos - 1]]) {
          o[pos] = o[pos - 1];
          --pos;
        }
        o[pos] = i;
      }
    }
  }

  void softmax_stats(const float* logits, int rows, int vocab, float temperature, float* lse,
                     float* entropy) override {
    const float inv_t = 1.0f / temperature;
    for (int r = 0; r < rows; ++r) {
      const float* l = logits + int64_t(r) * vocab;
      float mx = -INFINITY;
      for (int i = 0; i < vocab; ++i) mx = std::max(mx, l[i] * inv_t);
      double sum = 0.0;
      for (int i = 0; i < vocab; ++i) sum += std::exp(double(l[i] * inv_t - mx));
      const double log_z = std::log(sum) + mx;
      double h = 0.0;
      for (int i = 0; i < vocab; ++i) {
        const double p = std::exp(double(l[i] * inv_t) - log_z);
        h -= p * std::log(p + 1e-5);
      }
      lse[r] = static_cast<float>(log_z);
      entropy[r] = static_cast<float>(h);
    }
  }

  void add_silu(float* x, const float* y, size_t n) override { k_.add_silu(x, y, static_cast<int64_t>(n)); }

  void kv_copy(void* k_cache, void* v_cache, int layers, const KVLayout& L, const int32_t* slots,
               const int32_t* src, const int32_t* dst, int n) override {
    const size_t es = L.elem_bytes(), row_bytes = size_t(L.head_dim) * es;
    char* kc = static_cast<char*>(k_cache);
    char* vc = static_cast<char*>(v_cache);
    for (int l = 0; l < layers; ++l) {
      for (int i = 0; i < n; ++i) {
        if (src[i] == dst[i]) continue;
        for (int h = 0; h < L.kv_heads; ++h) {
          const size_t base = L.layer_bytes() * l + (size_t(slots[i]) * L.kv_heads + h) * L.max_seq * row_bytes;
          std::memcpy(kc + base + size_t(dst[i]) * row_bytes, kc + base + size_t(src[i]) * row_bytes, row_bytes);
          std::memcpy(vc + base + size_t(dst[i]) * row_bytes, vc + base + size_t(src[i]) * row_bytes, row_bytes);
        }
      }
    }
  }

  void tree_rows(const TreeRowsArgs& a) override {
    for (int s = 0; s < a.n; ++s) {
      for (int i = 0; i < a.T; ++i) step_ops::tree_row(a, s, i);
    }
  }

  void accept_greedy(const AcceptArgs& a) override {
    for (int s = 0; s < a.n; ++s) step_ops::accept_sequence(a, s);
  }

  void scatter_candidates(const int32_t* cand, int n, int num_heads, int k, const int32_t* slots,
                          int32_t* dst) override {
    for (int r = 0; r < n; ++r) {
      for (int h = 0; h < num_heads; ++h) {
        for (int j = 0; j < k; ++j) step_ops::scatter_candidate(cand, n, num_heads, k, slots, dst, r, h, j);
      }
    }
  }

 private:
  // The second half of an RMSNorm row: out = w * (x / rms), rms from the sum of squares ss.
  static void scale_row(const float* x, const float* w, int dim, double ss, float eps, float* out) {
    const float inv = 1.0f / std::sqrt(float(ss / dim) + eps);
    for (int i = 0; i < dim; ++i) out[i] = w[i] * (x[i] * inv);
  }

  // Columns of the lm_head one argmax chunk holds (whole panels; 2 KB per row).
  static constexpr int kArgmaxCols = 512;

  cpu::HostMemory memory_;  // declared first: destroyed after everything that may hold its blocks
  ThreadPool pool_;
  const cpu::Kernels& k_;
  const bool bf16_pairs_;  // bf16 weights as kBF16Pairs: matmul inputs rounded to bf16
  // Attention work items: range `range` of queries q0..q1-1 of the group starting at `row`
  // (query q: row row + q / group, q head kv_head * group + q % group).
  struct AttendTask {
    int row, kv_head, q0, q1, range;
  };
  std::vector<AttendTask> attend_tasks_;
  struct AttendGroup {
    int r0, r1, ranges;  // rows [r0, r1) share a slot and prefix; their lists span `ranges` ranges
  };
  std::vector<AttendGroup> groups_;
  // Queries whose key list spans several ranges: their partial results at `offset` in partial_.
  struct MergeItem {
    int row, head, ranges;
    size_t offset;
  };
  std::vector<MergeItem> merges_;
  std::vector<size_t> partial_offset_;  // [row * heads + head]
  std::vector<float> partial_;          // per range: o [head_dim], m, l
  int argmax_rows_ = 0;                // rows the argmax scratch holds per thread
  std::vector<float> argmax_chunk_;    // [thread][row][kArgmaxCols]
  std::vector<float> argmax_best_;     // [thread][row]
  std::vector<int32_t> argmax_index_;  // [thread][row]
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads, bool bf16_matmul_inputs) {
  return std::make_unique<CpuBackend>(num_threads, bf16_matmul_inputs);
}

}  // namespace medusa_rt
