// Medusa heads: K heads, each L residual blocks x <- x + SiLU(W x + b) on the base model's final
// (normed) hidden state, then a vocabulary projection, its own or the base model's lm_head.
// Head k at position t predicts the token at t + 2 + k. Heads with a root input (format_version
// 2) also see the token t + 1, the one the base model emits at t (the tree's root, known when the
// heads run): their first x is h + R_k e, e the base model's input embedding of that token.
// Heads with a path input (format_version 3, Hydra-style) also see the tree path they extend:
// head k drafting the children of a node at depth k starts from
// h + R_k e(root) + sum_{j=1..k} P_kj e(path_j), path_j the node's ancestor-or-self at depth j;
// every tree node with children then gets its own candidates.
//
// Runtime file `medusa_heads.safetensors`: tensors medusa.{k}.{l}.weight [H, H],
// medusa.{k}.{l}.bias [H], medusa.{k}.lm_head.weight [V, H] (absent with a shared lm_head);
// medusa.{k}.root.weight [H, H] (format_version 2 and 3, every head); medusa.{k}.path.{j}.weight
// [H, H] for j = 1..k (format_version 3 only);
// header metadata: format = "medusa_rt_heads", format_version = "1", "2" or "3", num_heads, num_layers,
// shared_lm_head ("true"/"false"), hidden_size, vocab_size, and optionally default_tree
// (a built-in tree name or a JSON list of paths), expected_tokens_per_step, accuracy_table
// (JSON [head][rank] of probabilities, measured on held-out data). Optional tensor
// medusa.draft_vocab (I32 [n], increasing token ids; shared lm_head only): the heads rank only
// these tokens (a draft vocabulary: the lm_head pass of the heads reads n rows instead of all;
// drafts never change the output, the base model verifies every token).
#pragma once

#include <cstdint>
#include <memory>
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
  bool root_input = false;  // format_version >= 2: the heads also read the root token's embedding
  bool path_input = false;  // format_version 3: ... and their tree path's tokens
  bool has_default_tree = false;
  TreeSpec default_tree;
  double expected_tokens_per_step = 0;  // from the file's metadata, 0 if absent
  AccuracyTable accuracy_table;         // [head][rank] from the metadata, empty if absent
};

// How the heads draft the candidates of one tree (MedusaHeads::plan). candidates() writes
// [blocks][rows][width] token ids; sequence r's candidates are the `blocks` pieces of `width`
// (block b at b * width), and index[i] is tree node i's token among them (root: unused).
// Independent heads: block k = head k's top_k (k < the tree's depth), node (depth d, rank r) at
// (d - 1) * top_k + r.
// Path input: one block per sequence, node i at i - 1.
struct HeadsPlan {
  int depth = 0;                 // heads 0..depth-1 run (the tree's depth)
  int blocks = 0, width = 0;
  std::vector<int32_t> index;    // [nodes]
  // Path input: level d drafts the children of the tree's nodes at depth d that have children
  // (`parents` of them), rows r-major (row r * parents + u). Gather indices in backend memory.
  struct Level {
    int parents = 0;
    int32_t* seq = nullptr;                // [max_rows * parents]: r (the sequence's row)
    std::vector<int32_t*> path;            // [j - 1][max_rows * parents]: index into `drafts` of the
                                           // path's token at depth j = 1..d
    size_t drafts_offset = 0;              // this level's top_k lists in `drafts`
  };
  std::vector<Level> levels;
  int32_t* out_index = nullptr;            // [max_rows * width]: node tokens from `drafts`
  int32_t* drafts = nullptr;               // every level's top_k lists (token ids)
  int32_t* tokens = nullptr;               // [max level rows] scratch
  float *x = nullptr, *tmp = nullptr, *emb = nullptr, *root_emb = nullptr, *logits = nullptr;
  std::unique_ptr<WeightArena> arena;      // owns the buffers above
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
  bool path_input() const { return meta_.path_input; }
  int top_k() const { return top_k_; }
  size_t weight_bytes() const { return arena_.weight_bytes(); }
  int draft_vocab_size() const { return draft_ids_ ? proj_vocab_ : 0; }  ///< 0: the full vocabulary

  // The plan for drafting `tree` (checked to fit the heads: depth <= num_heads(), ranks < top_k)
  // for up to max_rows sequences per call. Allocates (once per tree; not per step).
  HeadsPlan plan(const TreeSpec& tree) const;

  // hidden: [rows, H] final hidden states (backend memory); roots: [rows] the token the base
  // model emits at each of those positions (backend memory; read only when root_input()). Runs
  // the heads the plan's tree reads (a tree of depth d reads no head past d - 1) and writes the
  // candidates as the plan lays them out (backend memory, [plan.blocks][rows][plan.width]).
  void candidates(const float* hidden, const int32_t* roots, int rows, const HeadsPlan& plan, int32_t* out);

 private:
  void run_blocks(int k, float* x, int rows, float* tmp);
  void path_candidates(const float* hidden, const int32_t* roots, int rows, const HeadsPlan& plan, int32_t* out);
  struct Head {
    std::vector<Matrix> w;
    std::vector<const float*> b;
    Matrix root;               // R_k (root_input() only)
    std::vector<Matrix> path;  // P_kj, j = 1..k (path_input() only)
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
