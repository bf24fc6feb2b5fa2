// Medusa heads: K heads, each L residual blocks x <- x + SiLU(W x + b) on the base model's final
// (normed) hidden state, then a vocabulary projection, its own or the base model's lm_head.
// Head k at position t predicts the token at t + 2 + k.
//
// Runtime file `medusa_heads.safetensors`: tensors medusa.{k}.{l}.weight [H, H],
// medusa.{k}.{l}.bias [H], medusa.{k}.lm_head.weight [V, H] (absent with a shared lm_head);
// header metadata: format = "medusa_rt_heads", format_version = "1", num_heads, num_layers,
// shared_lm_head ("true"/"false"), hidden_size, vocab_size, and optionally default_tree
// (a built-in tree name or a JSON list of paths), expected_tokens_per_step, accuracy_table
// (JSON [head][rank] of probabilities, measured on held-out data). Optional tensor
// medusa.draft_vocab (I32 [n], increasing token ids; shared lm_head only): the heads rank only
// these tokens (a draft vocabulary: the lm_head pass of the heads reads n rows instead of all;
// drafts never change the output, the base model verifies every token).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model_config.h"
#include "medusa_rt/tree.h"
#include "model/backend.h"
#include "model/weights.h"

namespace medusa_rt {

// What a heads file's metadata says (checked against the base model).
struct MedusaHeadsMeta {
  int num_heads = 0;
  int num_layers = 0;
  bool shared_lm_head = false;
  bool has_default_tree = false;
  TreeSpec default_tree;
  double expected_tokens_per_step = 0;  // from the file's metadata, 0 if absent
  AccuracyTable accuracy_table;         // [head][rank] from the metadata, empty if absent
};

class MedusaHeads {
 public:
  // Reads and checks only the metadata (cheap): ModelFormatError / UnsupportedModelError.
  static MedusaHeadsMeta read_meta(const std::string& file, const ModelConfig& base);

  // Loads and checks the heads against the base model (ModelFormatError on any mismatch).
  // max_rows: sequences per call of candidates().
  MedusaHeads(const std::string& file, const ModelConfig& base, DType dtype, int max_rows, int top_k, Backend& be,
              const Matrix& base_lm_head);

  int num_heads() const { return meta_.num_heads; }
  int num_layers() const { return meta_.num_layers; }
  bool shared_lm_head() const { return meta_.shared_lm_head; }
  int top_k() const { return top_k_; }
  size_t weight_bytes() const { return arena_.weight_bytes(); }
  int draft_vocab_size() const { return draft_ids_ ? proj_vocab_ : 0; }  ///< 0: the full vocabulary

  // hidden: [rows, H] final hidden states (backend memory). Writes the top_k candidates of
  // every head, out[(k * rows + r) * top_k + j] (backend memory).
  void candidates(const float* hidden, int rows, int32_t* out);

 private:
  struct Head {
    std::vector<Matrix> w;
    std::vector<const float*> b;
    Matrix proj;
  };
  Backend& be_;
  WeightArena arena_;
  MedusaHeadsMeta meta_;
  int hidden_ = 0, vocab_ = 0, max_rows_ = 0, top_k_ = 0;
  Matrix base_lm_head_;
  std::vector<Head> heads_;
  float *x_ = nullptr, *tmp_ = nullptr, *logits_ = nullptr;
  Matrix draft_proj_;                // rows of the base lm_head for the draft vocabulary
  int32_t* draft_ids_ = nullptr;     // backend memory: draft index -> token id
  int proj_vocab_ = 0;               // columns of the heads' logits (vocab or draft size)
};

}  // namespace medusa_rt
