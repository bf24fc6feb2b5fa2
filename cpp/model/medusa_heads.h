// Medusa heads: K heads, each L residual blocks x <- x + SiLU(W x + b) on the base model's final
// (normed) hidden state, then a vocabulary projection, its own or the base model's lm_head.
// Head k at position t predicts the token at t + 2 + k. Heads with a root input (format_version
// 2) also see the token t + 1, the one the base model emits at t (the tree's root, known when the
// heads run): their first x is h + R_k e, e the base model's input embedding of that token.
//
// Runtime file `medusa_heads.safetensors`: tensors medusa.{k}.{l}.weight [H, H],
// medusa.{k}.{l}.bias [H], medusa.{k}.lm_head.weight [V, H] (absent with a shared lm_head);
// medusa.{k}.root.weight [H, H] (format_version 2 only, every head);
// header metadata: format = "medusa_rt_heads", format_version = "1" or "2", num_heads, num_layers,
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
  bool root_input = false;  // format_version 2: the heads also read the root token's embedding
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
              const Matrix& base_lm_head, const Matrix& base_embed);

  int num_heads() const { return meta_.num_heads; }
  int num_layers() const { return meta_.num_layers; }
  bool shared_lm_head() const { return meta_.shared_lm_head; }
  bool root_input() const { return meta_.root_input; }
  int top_k() const { return top_k_; }
  size_t weight_bytes() const { return arena_.weight_bytes(); }
  int draft_vocab_size() const { return draft_ids_ ? proj_vocab_ : 0; }  ///< 0: the full vocabulary

  // hidden: [rows, H] final hidden states (backend memory); roots: [rows] the token the base
  // model emits at each of those positions (backend memory; read only when root_input()). Runs
  // heads 0..depth-1 (depth in [1, num_heads()]: a tree of that depth reads no deeper head) and
  // writes their top_k candidates, out[(k * rows + r) * top_k + j] (backend memory).
  void candidates(const float* hidden, const int32_t* roots, int rows, int depth, int32_t* out);

 private:
  struct Head {
    std::vector<Matrix> w;
    std::vector<const float*> b;
    Matrix root;  // R_k (root_input() only)
    Matrix proj;
  };
  Backend& be_;
  WeightArena arena_;
  MedusaHeadsMeta meta_;
  int hidden_ = 0, vocab_ = 0, max_rows_ = 0, top_k_ = 0;
  Matrix base_lm_head_, base_embed_;
  std::vector<Head> heads_;
  float *x_ = nullptr, *tmp_ = nullptr, *logits_ = nullptr, *root_emb_ = nullptr;
  Matrix draft_proj_;                // rows of the base lm_head for the draft vocabulary
  int32_t* draft_ids_ = nullptr;     // backend memory: draft index -> token id
  int proj_vocab_ = 0;               // columns of the heads' logits (vocab or draft size)
};

}  // namespace medusa_rt
