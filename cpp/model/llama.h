// The Llama-family decoder (Llama, Mistral, Qwen2), written once against Backend.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/model_config.h"
#include "model/backend.h"
#include "model/profile.h"
#include "model/weights.h"

namespace medusa_rt {

class TensorStore;

// Host-side description of the rows of one forward. Vectors are reserved once and reused.
struct ForwardRows {
  std::vector<int32_t> tokens, positions, slots, cache_index, prefix_len;
  std::vector<int32_t> extra_offsets, extra;  // optional tree visibility (CSR), empty for causal rows
  std::vector<int32_t> logit_rows;            // rows whose final hidden states (and logits) are wanted
  int logits_from = 0;                        // the lm_head runs on logit_rows[logits_from:] only
  void clear();
  int size() const { return static_cast<int>(tokens.size()); }
};

struct ModelLimits {
  int max_rows = 0;        // rows per forward
  int max_logit_rows = 0;  // rows whose logits one forward returns
  int slots = 0;           // sequences in the KV cache
  int max_seq = 0;         // tokens per sequence
  int max_tree_depth = 0;  // deepest tree a forward carries (rows see at most depth + 1 tree keys)
  DType kv_dtype = DType::kF32;  // the KV cache's element type (KVLayout::dtype)
};

// RoPE tables cos, sin [positions][head_dim / 2] (fp32, host) for a rope configuration, as
// transformers initialises them (scaled per rope type).
void rope_tables(const RopeConfig& rope, int head_dim, int positions, std::vector<float>& cos,
                 std::vector<float>& sin);

class LlamaModel {
 public:
  // Bytes this model will allocate for the given options (for the memory check before loading).
  static size_t weight_bytes_for(const ModelConfig& cfg, DType dtype);
  static size_t kv_bytes_for(const ModelConfig& cfg, const ModelLimits& lim);
  static size_t workspace_bytes_for(const ModelConfig& cfg, const ModelLimits& lim);

  // Loads and validates the weights (shape or dtype mismatch: ModelFormatError naming the tensor).
  LlamaModel(const ModelConfig& cfg, const TensorStore& store, DType dtype, const ModelLimits& lim, Backend& backend);
  ~LlamaModel();
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  // Runs the decoder over rows (which must satisfy the limits and reference valid slots and
  // positions; the engine validates user input before). Afterwards logits() holds
  // [rows.logit_rows.size(), vocab] (rows before rows.logits_from left unset) and hidden() the
  // final normed hidden states of those rows. With `argmax` (backend memory, one entry per logit
  // row) only the greedy tokens are wanted: argmax[i] = the argmax of logit row i for i >=
  // rows.logits_from, computed by the lm_head with a fused argmax, and logits() is left unset.
  void forward(const ForwardRows& rows, int32_t* argmax = nullptr);

  // The forward's row metadata in backend memory, for callers that build rows on the device
  // (the fused decode step): fill them, then run_device_rows().
  struct DeviceRows {
    int32_t *tokens, *positions, *slots, *cache_index, *prefix_len, *extra_offsets, *extra, *logit_rows;
    int32_t *copy_slots, *copy_src, *copy_dst;  // [max_rows] KV compaction lists (copy_kv_device)
  };
  DeviceRows device_rows() const;
  // forward() over rows already in device_rows(): R rows, logits for rows [0, R) (logit_rows
  // filled), tree visibility from extra_offsets/extra when has_extra; `argmax` as in forward().
  void run_device_rows(int R, bool has_extra, int32_t* argmax = nullptr);
  // copy_kv() of the first n entries of device_rows().copy_* (already in backend memory).
  void copy_kv_device(int n);
  const float* logits() const { return logits_; }
  const float* hidden() const { return hidden_; }

  // Layer taps: after set_taps(layers), every forward also writes, for each logit row, the
  // residual stream after decoder layer layers[j] (1-based: the output of layer L, transformers'
  // hidden_states[L]; 1 <= L < num_layers) to taps() + j * tap_stride() (backend memory, rows in
  // logit-row order). At most kMaxTaps layers; the buffer is allocated when a list longer than any
  // before is set (never per forward). An empty list turns the taps off.
  static constexpr int kMaxTaps = 8;
  void set_taps(const std::vector<int>& layers);
  const std::vector<int>& taps_layers() const { return tap_layers_; }
  const float* taps() const { return taps_; }
  size_t tap_stride() const { return size_t(lim_.max_logit_rows) * cfg_.hidden_size; }

  // Copies KV entries of every layer within slots: (slots[i], src[i]) -> (slots[i], dst[i]),
  // i = 0..n-1 in order (host arrays; n <= limits().max_rows).
  void copy_kv(const int32_t* slots, const int32_t* src, const int32_t* dst, int n);

  // Copies the KV entries at positions [begin, end) of every layer from slot src to slot dst
  // (a prompt prefix one sequence computed, for another with the same start: the entries depend
  // only on the tokens and positions, so they are what dst's own prefill would write).
  void copy_slot_prefix(int src, int dst, int begin, int end);

  // K and V of one layer for positions [0, length) of a slot, as [kv_heads][length][head_dim].
  void read_kv(int slot, int layer, int length, std::vector<float>& k, std::vector<float>& v);

  const Matrix& lm_head() const { return lm_head_; }
  const Matrix& embedding() const { return embed_; }  ///< token embedding table [vocab, H]
  Backend& backend() { return be_; }

  const ModelConfig& config() const { return cfg_; }
  const ModelLimits& limits() const { return lim_; }
  size_t weight_bytes() const { return weight_bytes_; }
  size_t kv_bytes() const { return kv_bytes_; }

 private:
  struct Layer {
    const float* ln1 = nullptr;
    const float* ln2 = nullptr;
    Matrix qkv, o, gate_up, down;
    const float* qkv_bias = nullptr;
  };

  template <class T>
  T* alloc(size_t count, const char* what) {
    return static_cast<T*>(arena_.buffer(count * sizeof(T), what));
  }
  void build_rope_tables();
  // The forward over the row metadata in backend memory.
  void run(int R, int NL, int logits_from, bool has_extra, int32_t* argmax);

  ModelConfig cfg_;
  ModelLimits lim_;
  Backend& be_;
  WeightArena arena_;
  size_t weight_bytes_ = 0, kv_bytes_ = 0;

  Matrix embed_, lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  KVLayout kv_layout_;
  char* k_cache_ = nullptr;  // [layer] KVLayout caches, kv_layout_.layer_bytes() each
  char* v_cache_ = nullptr;
  float* rope_cos_ = nullptr;
  float* rope_sin_ = nullptr;

  // Workspace.
  float *x_ = nullptr, *xn_ = nullptr, *qkv_ = nullptr, *attn_ = nullptr, *tmp_ = nullptr, *gu_ = nullptr,
        *act_ = nullptr, *hidden_ = nullptr, *logits_ = nullptr;
  int32_t *d_tokens_ = nullptr, *d_positions_ = nullptr, *d_slots_ = nullptr, *d_cache_index_ = nullptr,
          *d_prefix_len_ = nullptr, *d_extra_offsets_ = nullptr, *d_extra_ = nullptr, *d_logit_rows_ = nullptr;
  int32_t *d_copy_slots_ = nullptr, *d_copy_src_ = nullptr, *d_copy_dst_ = nullptr;
  int qkv_width_ = 0;
  std::vector<int> tap_layers_;
  std::vector<int> tap_at_;  // [num_layers]: tap index after layer l (0-based), -1 for none
  float* taps_ = nullptr;
  size_t tap_capacity_ = 0;  // taps the buffer holds
  std::unique_ptr<ForwardProfile> prof_ = ForwardProfile::from_env();
};

}  // namespace medusa_rt
