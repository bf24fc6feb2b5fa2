// The step driver: prefill, and one batch-shaped decode step that is either plain
// autoregressive (a root-only tree) or Medusa tree verification.
//
// A step for sequences S: each sequence contributes its tree's nodes as rows (root = the
// pending token, other nodes = head candidates), positions length + depth, K/V written at
// cache slots length + node, each row seeing its slot's committed prefix plus its ancestors.
// One forward covers all rows; per sequence the accepted path is chosen (greedy or typical),
// its K/V compacted to contiguous slots, the bonus token taken from the base logits at the
// last accepted node, and the heads run on that node's hidden state for the next step.
#pragma once

#include <cstdint>
#include <vector>

#include "medusa_rt/engine.h"
#include "decoding/acceptance.h"
#include "decoding/sampling.h"
#include "medusa_rt/tree.h"
#include "model/llama.h"
#include "model/medusa_heads.h"

namespace medusa_rt {

struct StepOptions {
  bool medusa = false;
  Acceptance acceptance = Acceptance::kGreedy;
  float posterior_threshold = 0.09f;
  float posterior_alpha = 0.3f;
  bool sample = false;      // draw each position's token (sampling: temperature, top_k, top_p, seed)
  SamplingParams sampling;  // its temperature is also typical acceptance's
  bool lookup = false;  // verify tokens looked up in the context (Decoder's lookup_tokens > 0)
};

struct SequenceState {
  int slot = -1;
  int length = 0;                   // tokens in the slot's KV cache
  int32_t root = -1;                // pending token: in the output, not yet in the cache
  std::vector<int32_t> candidates;  // the heads' candidates for the root's successors (HeadsPlan layout)
  bool has_candidates = false;
  StepOptions options;              // how this sequence decodes (medusa: run the heads, verify trees)
  // Filled by step(): the accepted speculative tokens followed by the bonus token (the new root).
  std::vector<int32_t> new_tokens;
  int accepted = 0;       // speculative tokens accepted in the last step
  bool tree_step = false;  // whether the last step verified a tree
  // The tokens in the slot's cache (its first `length` entries are current: what prompt lookup
  // searches and a session's next prompt is matched against), then for prompt lookup (Decoder with
  // lookup_tokens > 0) the chain the next step verifies and what the last step did.
  std::vector<int32_t> history;
  std::vector<int32_t> lookup;
  bool lookup_step = false;  // the last step verified a looked-up chain
  int lookup_accepted = 0;   // ... and accepted this many of its tokens
  // The fused step (Decoder::step_fused) keeps length, root and candidates on the device:
  bool device_synced = false;         // the device's length and root for this slot equal ours
  bool candidates_on_host = true;     // `candidates` is current
  bool candidates_on_device = false;  // the device's candidates for this slot are current
  // Heads with a draft layer: positions of the slot's draft cache in use (-1: none usable, the
  // next commit with heads starts it afresh). Mirrored on the device with length and root.
  int draft_len = -1;
  bool step_done = false;    // engine scheduler: the step this sequence was queued for ran
  bool step_failed = false;  // ... and threw

  // Test hooks (cpp/api/testing.h). oracle: the expected token sequence of the whole context;
  // when set, the heads' candidates are replaced so that the true continuation sits at a
  // varying rank of each head. record: keep every step's tree tokens, logits and accepted path.
  std::vector<int32_t> oracle;
  bool oracle_vary_rank = true;  // false: the true token is always rank 0 (perfect heads)
  bool record = false;
  struct StepRecord {
    std::vector<int32_t> tokens;
    std::vector<float> logits;  // [nodes, vocab]
    std::vector<int> path;      // accepted nodes after the root
  };
  std::vector<StepRecord> records;
};


class Decoder {
 public:
  // heads may be null (plain decoding only). tree: the engine's tree (root-only without heads).
  // lookup_tokens: the longest chain of context-lookup candidates a step verifies (0: none;
  // the model's limits must leave room for max(tree nodes, 1 + chain) rows per sequence and the
  // chain's depth).
  Decoder(LlamaModel& model, MedusaHeads* heads, TreeSpec tree, int max_batch, int lookup_tokens = 0);
  ~Decoder();

  const TreeSpec& tree() const { return tree_; }

  // Runs tokens through the model as causal rows appended at s.length; s.length grows by n.
  // Sets s.root to the token after the last one (argmax, or drawn with s.options.sample), and
  // s.candidates when with_heads.
  // logits, if non-null, receives the logits of every token (all_logits) or of the last one;
  // hidden, if non-null, the final normed hidden states of every token ([n, hidden_size]).
  void append(SequenceState& s, const int32_t* tokens, int n, bool with_heads, std::vector<float>* logits,
              bool all_logits, std::vector<float>* hidden = nullptr);

  // One decode step for each sequence (which must each have length < max_seq), each by its own
  // options. With allow_trees false every sequence takes a plain step (its heads still run, so
  // it can verify trees again in a later step): the batch-size speculation policy.
  // allow_lookup: sequences with options.lookup whose context's last 2-4 tokens occurred before
  // also verify the tokens that followed there, as a chain under the root in place of the tree's
  // last nodes (prompt lookup; such steps run on the host path).
  void step(SequenceState* const* seqs, int n, bool allow_trees = true, bool allow_lookup = false);

  // Measures the forward cost of batches of B sequences, plain (B rows) and with the tree
  // (B x nodes rows), for B = 1, 2, 4, ... up to max_batch, and returns the largest B for which
  // a tree step costs at most tokens_per_step plain steps (0 if none): the batch size up to which
  // speculation pays on this machine. Writes KV entries of slots [0, B) (call before use).
  int calibrate_max_tree_batch(double tokens_per_step);

  // Seconds (best of reps) of one forward of `batch` sequences each carrying the first `nodes`
  // nodes of `tree` (the argmax of every row, as a greedy step) after `context` cached tokens
  // (whatever the cache holds there), written at cache positions [context, context + nodes) of
  // slots 0..batch-1.
  double time_forward(int batch, const TreeSpec& tree, int nodes, int reps = 3, int context = 0);
  // Seconds (best of reps) of the heads' candidates for `rows` sequences (0 without heads), with
  // `plan` (MedusaHeads::plan of a tree; null: this decoder's tree). One rep right after a
  // forward times them as a step runs them, their weights read from memory; later reps find them
  // in the caches.
  double time_heads(int rows, int reps = 3, const HeadsPlan* plan = nullptr);

  // Seconds spent in model and head forwards since construction (statistics).
  double forward_seconds() const { return forward_seconds_; }

 private:
  // Whether s verifies a tree in this step (both step implementations decide alike).
  bool verifies_tree(const SequenceState& s, bool allow_trees) const {
    return allow_trees && s.options.medusa && heads_ && s.has_candidates;
  }
  // The heads for n sequences on rows hidden_rows of `source` ([rows, H] backend memory: the
  // model's hidden states, or the draft layer's output).
  void run_heads(SequenceState* const* seqs, const int32_t* hidden_rows, int n, const float* source);
  // Heads with a draft layer: queues sequence s's committed nodes of this commit (hidden rows
  // rows[0..a] of the forward, the root node first; next[j] the token after node j) into the host
  // draft rows (step_ops::draft_span decides which) and returns the draft row of the last.
  // Updates s.draft_len. run_draft() then runs the queued rows.
  int queue_draft(SequenceState& s, const int32_t* rows, int a, const int32_t* next);
  void run_draft();
  int stage_draft();  // copies the queued draft rows to the device (and empties the queue); returns their count
  // The step with row building, acceptance, KV compaction and the next candidates on the
  // device (recorded as one graph per (batch, tree size) where the backend can), one copy of
  // the accepted tokens to the host at the end. Returns false (and does nothing) when this
  // batch needs the host step: typical acceptance, recording hooks, a mixed batch, or a tree
  // cut at the end of the cache.
  bool step_fused(SequenceState* const* seqs, int n, bool allow_trees);
  void fused_body(int n, int T, bool with_heads);
  void candidates_to_host(SequenceState& s);
  // The token s.options.sampling draws from logits row `row` of the last forward for the token at
  // `position` of the sequence.
  int32_t draw(const SequenceState& s, int row, int position);
  // Prompt lookup: a tree (root-only, or tree_) cut by n nodes, with a chain of n looked-up tokens
  // under the root; src[i] = the tree's node for node i, or -d for the chain's node at depth d.
  struct LookupTree {
    TreeSpec tree;
    std::vector<int> src;
  };
  const LookupTree& lookup_tree(bool heads_tree, int n) const {
    return lookup_trees_[(heads_tree ? 1 : 0) * lookup_tokens_ + n - 1];
  }
  // s.lookup (empty on entry): the chain after the latest earlier occurrence of the context's end.
  void find_lookup(SequenceState& s) const;
  // Appends the step's committed tokens (the old root, then new_tokens but the new root) to s.history;
  // called before s.length and s.root advance.
  static void commit_history(SequenceState& s);
  int lookup_tokens_ = 0;
  std::vector<LookupTree> lookup_trees_;  // [root-only, heads tree][n = 1..lookup_tokens_]
  std::vector<const LookupTree*> seq_lookup_;
  std::vector<SequenceState*> head_seqs_;

  LlamaModel& model_;
  MedusaHeads* heads_;
  TreeSpec tree_;
  int max_batch_;
  int vocab_;
  WeightArena buffers_;
  ForwardRows rows_;
  int32_t* d_argmax_ = nullptr;
  int32_t* d_index_ = nullptr;
  float* d_head_in_ = nullptr;
  int32_t* d_head_roots_ = nullptr;  // [max_batch] the root token of each head input row
  // Heads with a draft layer: the draft KV cache and workspace, per slot draft_len on the device,
  // the last committed node's draft row per sequence of a fused step ([max_batch], for trees
  // and for plain steps), and the host step's draft rows.
  DraftState draft_;
  int32_t *d_draft_len_ = nullptr, *d_draft_last_tree_ = nullptr, *d_draft_last_plain_ = nullptr;
  std::vector<int32_t> dr_rows_, dr_tokens_, dr_pos_, dr_prefix_, dr_slots_, draft_commit_;
  HeadsPlan plan_;                   // how the heads draft this decoder's tree
  int cand_stride_ = 0;              // candidates per sequence (plan_.blocks * plan_.width)
  int32_t* d_candidates_ = nullptr;
  std::vector<int32_t> argmax_, tokens_, candidates_host_, oracle_, head_roots_, copy_slots_, copy_src_, copy_dst_, hidden_rows_;
  std::vector<float> tap_host_;  // append(): one layer tap of a chunk, on its way to the hidden output
  std::vector<int> row_base_, num_nodes_, path_;
  std::vector<float> lse_, entropy_;
  std::vector<float> logit_host_;  // draw(): one logits row
  std::vector<int32_t> drawn_;     // the host step: the token drawn at each node of a sequence, -1 until drawn
  SamplingScratch sampling_;
  TypicalScratch typical_;
  double forward_seconds_ = 0;

  // Fused step state (backend memory): per slot length, root and candidates [slot][cand_stride_];
  // the batch's slots; the tree (depths, candidate indices, parents, ancestors-or-self CSR); the output
  // blocks [max_batch][max_depth + 2].
  int32_t *d_len_ = nullptr, *d_root_ = nullptr, *d_cand_ = nullptr, *d_bslots_ = nullptr, *d_out_ = nullptr;
  int32_t *d_depths_ = nullptr, *d_cidx_ = nullptr, *d_parents_ = nullptr, *d_anc_off_ = nullptr, *d_anc_ = nullptr;
  std::vector<int32_t> out_host_, bslots_, bslots_dev_;
  uint64_t graph_ns_ = 0;  // this decoder's graph keys
  bool fused_ = true;      // MEDUSA_RT_FUSED_STEP=0: always the host step
};

}  // namespace medusa_rt
