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
// Heads with a draft layer (format_version 4, Hydra++ / EAGLE-style) read, in place of h, the output z
// of one causal transformer layer over the sequence's committed positions since its prompt's last
// token (position 0): u = h + R e(root), u += O attn(RoPE(Q, K), V)(norm1(u)), z = u +
// D (silu(G) * U)(norm2(u)), with the base model's head count, head size, RoPE base (plain RoPE)
// and RMSNorm epsilon. Its keys and values at a position depend only on that position's h and root
// token, so a per-slot draft KV cache (DraftState) holds them for the committed positions.
// Tensors medusa.draft.{root,o}.weight [H, H], medusa.draft.qkv.weight [3H, H],
// medusa.draft.gate_up.weight [2I, H], medusa.draft.down.weight [H, I], medusa.draft.norm{1,2}.weight [H];
// metadata root_input = "true", path_input = "true"/"false", draft_layer = "true".
//
// Heads with feature layers (format_version 5, EAGLE-3-style multi-layer features) read, in place
// of h, h + sum_j F_j rmsnorm(x_Lj): x_L the base model's residual stream after decoder layer L
// (transformers' hidden_states[L]) at the same position, normalised without a weight (the base
// model's epsilon), F_j [H, H]. Metadata feature_layers = JSON list of the L (1 <= L <
// num_layers, at most 8), root_input = "true", path_input = "true"/"false"; tensors
// medusa.fuse.{j}.weight [H, H], j = 0.. in that list's order; otherwise as formats 2 and 3.
//
// header metadata: format = "medusa_rt_heads", format_version = "1" to "5", num_heads, num_layers,
// shared_lm_head ("true"/"false"), hidden_size, vocab_size, and optionally default_tree
// (a built-in tree name or a JSON list of paths), expected_tokens_per_step, accuracy_table
// (JSON [head][rank] of probabilities, measured on held-out data). Optional tensor
// medusa.draft_vocab (I32 [n], increasing token ids; shared lm_head only): the heads rank only
// these tokens (a draft vocabulary: the lm_head pass of the heads reads n rows instead of all;
// drafts never change the output, the base model verifies every token); with it, optional tensor
// medusa.draft_vocab_count (I32 [n], >= 0): each token's count in the training answers, so that an
// engine can rank only the most frequent of them (EngineOptions::medusa_draft_vocab).
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
  bool path_input = false;  // format_version 3 (or 4 with path_input): ... and their tree path's tokens
  bool draft_layer = false; // format_version 4: the heads read the draft layer's output
  std::vector<int> feature_layers;  // format_version 5: base-model layers fused into the heads' input
  bool has_default_tree = false;
  TreeSpec default_tree;
  double expected_tokens_per_step = 0;  // from the file's metadata, 0 if absent
  AccuracyTable accuracy_table;         // [head][rank] from the metadata, empty if absent
  int draft_vocab = 0;                  // entries of medusa.draft_vocab (0: none)
  bool draft_vocab_counts = false;      // medusa.draft_vocab_count is present
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

// The draft layer's KV cache and workspace (MedusaHeads::draft_state), for up to max_rows rows per
// draft_forward(). The caller fills the row metadata (backend memory, [max_rows] each): rows (the
// row of each committed position among the hidden states passed), tokens (its root: the token
// that follows it), positions (its draft cache index and RoPE position), prefix (positions + 1),
// slots. Rows of one call may repeat a row (same slot, position, inputs): it writes the same entry.
struct DraftState {
  KVLayout layout;
  int max_rows = 0;
  float *k_cache = nullptr, *v_cache = nullptr;
  int32_t *rows = nullptr, *tokens = nullptr, *positions = nullptr, *prefix = nullptr, *slots = nullptr;
  float *x = nullptr, *t = nullptr, *n = nullptr, *qkv = nullptr, *att = nullptr, *gu = nullptr, *act = nullptr;
  float *cos = nullptr, *sin = nullptr;  // RoPE tables [layout.max_seq][head_dim / 2]
  std::unique_ptr<WeightArena> arena;  // owns the buffers above
};

class MedusaHeads {
 public:
  // Reads and checks only the metadata (cheap): ModelFormatError / UnsupportedModelError.
  static MedusaHeadsMeta read_meta(const std::string& file, const ModelConfig& base);

  // Loads and checks the heads against the base model (ModelFormatError on any mismatch).
  // max_rows: sequences per call of candidates().
  // draft_vocab > 0: rank only the file's draft_vocab most frequent draft tokens (by its
  // medusa.draft_vocab_count; all of them from the file's size on); InvalidArgumentError when the
  // file has no draft vocabulary, or below its size without counts or below top_k. 0: all.
  MedusaHeads(const std::string& file, const ModelConfig& base, DType dtype, int max_rows, int top_k, Backend& be,
              const Matrix& base_lm_head, const Matrix& base_embed, int draft_vocab = 0);

  int num_heads() const { return meta_.num_heads; }
  int num_layers() const { return meta_.num_layers; }
  bool shared_lm_head() const { return meta_.shared_lm_head; }
  bool root_input() const { return meta_.root_input; }
  bool path_input() const { return meta_.path_input; }
  bool draft_layer() const { return meta_.draft_layer; }
  const std::vector<int>& feature_layers() const { return meta_.feature_layers; }
  int top_k() const { return top_k_; }
  size_t weight_bytes() const { return arena_.weight_bytes(); }
  int draft_vocab_size() const { return draft_ids_ ? proj_vocab_ : 0; }  ///< in use; 0: the full vocabulary
  const std::vector<int32_t>& draft_vocab() const { return draft_vocab_; }  ///< the tokens ranked (empty: all)

  // The plan for drafting `tree` (checked to fit the heads: depth <= num_heads(), ranks < top_k)
  // for up to max_rows sequences per call. Allocates (once per tree; not per step).
  HeadsPlan plan(const TreeSpec& tree) const;

  // hidden: [rows, H] final hidden states (backend memory); roots: [rows] the token the base
  // model emits at each of those positions (backend memory; read only when root_input()). Runs
  // the heads the plan's tree reads (a tree of depth d reads no head past d - 1) and writes the
  // candidates as the plan lays them out (backend memory, [plan.blocks][rows][plan.width]).
  void candidates(const float* hidden, const int32_t* roots, int rows, const HeadsPlan& plan, int32_t* out);

  // The heads' input rows (backend memory): out[i] = hidden[index[i]] (final hidden states), plus,
  // for heads with feature layers, sum_j F_j rmsnorm(taps_j[index[i]]) with taps_j at taps + j *
  // tap_stride (the base model's layer taps of the same rows, LlamaModel::set_taps with
  // feature_layers()). rows <= the max_rows the heads were made for.
  void gather_input(const float* hidden, const float* taps, size_t tap_stride, const int32_t* index, int rows,
                    float* out);

  // Bytes of a draft layer's KV cache for `slots` sequences of max_seq positions.
  static size_t draft_cache_bytes(const ModelConfig& base, int slots, int max_seq) {
    return 2 * sizeof(float) * size_t(slots) * size_t(max_seq) * size_t(base.num_heads) * base.head_dim;
  }
  // Draft layer only: a draft KV cache for `slots` sequences of up to max_seq positions and the
  // workspace for max_rows rows per call (allocates).
  DraftState draft_state(int slots, int max_seq, int max_rows) const;
  // Draft layer only: for `rows` committed positions described by st's row metadata (hidden: the
  // base model's final hidden states the metadata's rows index), writes their keys and values
  // into st's cache and their states z into st.x [rows, H] (what candidates() then reads).
  void draft_forward(const float* hidden, int rows, DraftState& st);

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
  struct Draft {
    Matrix root, qkv, o, gate_up, down;
    const float *norm1 = nullptr, *norm2 = nullptr;
    int intermediate = 0, heads = 0, head_dim = 0;
    float eps = 0;
    double theta = 0;
  } draft_;
  float *x_ = nullptr, *tmp_ = nullptr, *logits_ = nullptr, *root_emb_ = nullptr;
  std::vector<Matrix> fuse_;         // F_j [H, H] (format_version 5)
  float *fuse_in_ = nullptr, *fuse_norm_ = nullptr, *fuse_ones_ = nullptr;
  float fuse_eps_ = 0;
  Matrix draft_proj_;                // rows of the base lm_head for the draft vocabulary
  int32_t* draft_ids_ = nullptr;     // backend memory: draft index -> token id
  std::vector<int32_t> draft_vocab_;  // the same, on the host
  int proj_vocab_ = 0;               // columns of the heads' logits (vocab or draft size)
};

}  // namespace medusa_rt
