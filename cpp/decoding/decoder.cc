#include "decoding/decoder.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>

#include "decoding/acceptance.h"
#include "medusa_rt/errors.h"
#include "model/step_ops.h"

namespace medusa_rt {
namespace {

using Clock = std::chrono::steady_clock;

// Prompt lookup matches the context's last kLookupMaxNgram .. kLookupMinNgram tokens (longest
// first) against its earlier tokens, most recent occurrence first.
constexpr int kLookupMaxNgram = 4;
constexpr int kLookupMinNgram = 2;

// Test oracle: head h's list holds the true token for position length + 1 + h at rank
// (length + h) % top_k (or rank 0), and distinct wrong tokens elsewhere; node (depth d, rank r)
// of the tree takes head d - 1's rank-r token (whatever the heads' kind), placed where the
// plan reads it.
void apply_oracle(SequenceState& s, const TreeSpec& tree, const HeadsPlan& plan, int num_heads, int top_k, int vocab,
                  std::vector<int32_t>& lists) {
  lists.resize(size_t(num_heads) * top_k);
  for (int h = 0; h < num_heads; ++h) {
    const size_t pos = size_t(s.length) + 1 + h;
    const int32_t truth = pos < s.oracle.size() ? s.oracle[pos] : 0;
    const int rank = s.oracle_vary_rank ? (s.length + h) % top_k : 0;
    int32_t wrong = truth;
    for (int j = 0; j < top_k; ++j) {
      int32_t tok = truth;
      if (j != rank || pos >= s.oracle.size()) {
        wrong = (wrong + 1) % vocab;
        if (wrong == truth) wrong = (wrong + 1) % vocab;
        tok = wrong;
      }
      lists[size_t(h) * top_k + j] = tok;
    }
  }
  s.candidates.assign(size_t(plan.blocks) * plan.width, 0);
  for (int i = 1; i < tree.num_nodes(); ++i) {
    s.candidates[plan.index[i]] = lists[size_t(tree.depths()[i] - 1) * top_k + tree.ranks()[i]];
  }
}

}  // namespace

Decoder::Decoder(LlamaModel& model, MedusaHeads* heads, TreeSpec tree, int max_batch, int lookup_tokens)
    : model_(model),
      heads_(heads),
      tree_(std::move(tree)),
      max_batch_(max_batch),
      vocab_(model.config().vocab_size),
      buffers_(model.backend()) {
  if (lookup_tokens < 0 || max_batch * std::max(tree_.num_nodes(), 1 + lookup_tokens) > model.limits().max_rows ||
      std::max(tree_.max_depth(), lookup_tokens) > model.limits().max_tree_depth) {
    throw Error("internal: the model's limits leave no room for the tree and the lookup chain");
  }
  lookup_tokens_ = lookup_tokens;
  if (lookup_tokens_ > 0) {
    // A chain of n nodes under the root in place of the base tree's last n nodes (a step with a
    // chain carries as many rows as one without, at least 1 + n: on the CPU, where rows cost,
    // that beat adding the chain to the tree in a replay of the dev answers for trees of 2-6
    // nodes). The chain's rank is one no head candidate has: after the base tree's nodes of each
    // depth in the node order, so where a head candidate and a looked-up token agree, greedy
    // acceptance follows the head's subtree.
    const TreeSpec root_only;
    for (const TreeSpec* full : {static_cast<const TreeSpec*>(&root_only), static_cast<const TreeSpec*>(&tree_)}) {
      for (int n = 1; n <= lookup_tokens_; ++n) {
        const TreeSpec base = full->truncated(std::max(1, full->num_nodes() - n));
        std::map<TreeSpec::Path, int> node_of;  // the base tree's paths are a prefix of the full tree's
        for (size_t i = 0; i < base.paths().size(); ++i) node_of[base.paths()[i]] = static_cast<int>(i) + 1;
        std::vector<TreeSpec::Path> paths = base.paths();
        TreeSpec::Path chain;
        for (int d = 1; d <= n; ++d) {
          chain.push_back(full->max_rank() + 1);
          paths.push_back(chain);
        }
        LookupTree lt{TreeSpec(paths, full->name() + "+lookup-" + std::to_string(n)), {0}};
        for (const auto& p : lt.tree.paths()) {
          auto it = node_of.find(p);
          lt.src.push_back(it != node_of.end() ? it->second : -static_cast<int>(p.size()));
        }
        lookup_trees_.push_back(std::move(lt));
      }
    }
    seq_lookup_.reserve(max_batch);
  }
  const int R = model.limits().max_rows;
  d_argmax_ = static_cast<int32_t*>(buffers_.buffer(sizeof(int32_t) * R, "argmax output"));
  d_index_ = static_cast<int32_t*>(buffers_.buffer(sizeof(int32_t) * max_batch, "row indices"));
  argmax_.resize(R);
  tokens_.reserve(R);
  copy_slots_.reserve(R);
  copy_src_.reserve(R);
  copy_dst_.reserve(R);
  hidden_rows_.reserve(max_batch);
  head_seqs_.reserve(max_batch);
  row_base_.reserve(max_batch);
  num_nodes_.reserve(max_batch);
  const int max_nodes = std::max(tree_.num_nodes(), 1 + lookup_tokens_);  // per sequence, a lookup chain included
  const int max_depth = std::max(tree_.max_depth(), lookup_tokens_);
  path_.reserve(max_depth + 1);
  lse_.reserve(max_nodes);
  entropy_.reserve(max_nodes);
  typical_.logp.reserve(max_nodes);
  typical_.accepted.reserve(max_nodes);
  logit_host_.resize(vocab_);
  drawn_.reserve(max_nodes);
  sampling_.reserve(vocab_);
  ForwardRows& r = rows_;
  for (auto* v : {&r.tokens, &r.positions, &r.slots, &r.cache_index, &r.prefix_len, &r.logit_rows}) v->reserve(R);
  r.extra_offsets.reserve(R + 1);
  r.extra.reserve(size_t(R) * (max_depth + 1));
  if (heads_) {
    const int H = model.config().hidden_size;
    d_head_in_ = static_cast<float*>(buffers_.buffer(sizeof(float) * H * max_batch, "Medusa head input"));
    d_head_roots_ = static_cast<int32_t*>(buffers_.buffer(sizeof(int32_t) * max_batch, "Medusa head input"));
    head_roots_.reserve(max_batch);
    plan_ = heads_->plan(tree_);
    cand_stride_ = plan_.blocks * plan_.width;
    const size_t nc = size_t(cand_stride_) * max_batch;
    d_candidates_ = static_cast<int32_t*>(buffers_.buffer(sizeof(int32_t) * nc, "Medusa candidates"));
    candidates_host_.resize(nc);
  }

  // Fused step state.
  const int slots = model.limits().slots;
  const int T = tree_.num_nodes(), D = tree_.max_depth();
  auto ibuf = [&](size_t n, const char* what) {
    return static_cast<int32_t*>(buffers_.buffer(sizeof(int32_t) * std::max<size_t>(n, 1), what));
  };
  d_len_ = ibuf(slots, "sequence lengths");
  d_root_ = ibuf(slots, "pending tokens");
  if (heads_) d_cand_ = ibuf(size_t(slots) * cand_stride_, "Medusa candidates per slot");
  d_bslots_ = ibuf(max_batch, "step slots");
  d_out_ = ibuf(size_t(max_batch) * (D + 2), "accepted tokens");
  out_host_.resize(size_t(max_batch) * (D + 2));
  std::vector<int32_t> depths(tree_.depths().begin(), tree_.depths().end());
  std::vector<int32_t> cidx(heads_ ? plan_.index : std::vector<int32_t>(T, 0));
  std::vector<int32_t> parents(tree_.parents().begin(), tree_.parents().end()), anc_off{0}, anc;
  for (int i = 0; i < T; ++i) {
    for (int a : tree_.ancestors()[i]) anc.push_back(a);
    anc_off.push_back(static_cast<int32_t>(anc.size()));
  }
  auto upload = [&](const std::vector<int32_t>& v, const char* what) {
    int32_t* d = ibuf(v.size(), what);
    model.backend().copy_to_device(d, v.data(), sizeof(int32_t) * v.size());
    return d;
  };
  d_depths_ = upload(depths, "tree");
  d_cidx_ = upload(cidx, "tree");
  d_parents_ = upload(parents, "tree");
  d_anc_off_ = upload(anc_off, "tree");
  d_anc_ = upload(anc, "tree");
  if (heads_ && heads_->draft_layer()) {
    const int E = max_depth + 1;  // draft rows per sequence: the committed nodes of a step
    draft_ = heads_->draft_state(slots, model.limits().max_seq, max_batch * E);
    d_draft_len_ = ibuf(slots, "Medusa draft cache lengths");
    std::vector<int32_t> last_tree(max_batch), last_plain(max_batch);
    for (int b = 0; b < max_batch; ++b) {
      last_tree[b] = b * (D + 1) + D;
      last_plain[b] = b;
    }
    d_draft_last_tree_ = upload(last_tree, "Medusa draft rows");
    d_draft_last_plain_ = upload(last_plain, "Medusa draft rows");
    for (auto* v : {&dr_rows_, &dr_tokens_, &dr_pos_, &dr_prefix_, &dr_slots_}) v->reserve(size_t(max_batch) * E);
    draft_commit_.reserve(max_depth + 1);
  }
  static std::atomic<uint64_t> next_graph_ns{1};
  graph_ns_ = next_graph_ns++ << 40;
  const char* f = std::getenv("MEDUSA_RT_FUSED_STEP");
  fused_ = !(f && std::string(f) == "0");
}

Decoder::~Decoder() = default;

int Decoder::queue_draft(SequenceState& s, const int32_t* rows, int a, const int32_t* next) {
  const step_ops::DraftSpan sp = step_ops::draft_span(s.draft_len, a);
  for (int j = sp.first; j <= a; ++j) {
    const int pos = sp.start + j - sp.first;
    dr_rows_.push_back(rows[j]);
    dr_tokens_.push_back(next[j]);
    dr_pos_.push_back(pos);
    dr_prefix_.push_back(pos + 1);
    dr_slots_.push_back(s.slot);
  }
  s.draft_len = sp.start + a + 1 - sp.first;
  return static_cast<int>(dr_rows_.size()) - 1;
}

int Decoder::stage_draft() {
  Backend& be = model_.backend();
  const int R = static_cast<int>(dr_rows_.size());
  const size_t bytes = sizeof(int32_t) * R;
  be.copy_to_device(draft_.rows, dr_rows_.data(), bytes);
  be.copy_to_device(draft_.tokens, dr_tokens_.data(), bytes);
  be.copy_to_device(draft_.positions, dr_pos_.data(), bytes);
  be.copy_to_device(draft_.prefix, dr_prefix_.data(), bytes);
  be.copy_to_device(draft_.slots, dr_slots_.data(), bytes);
  for (auto* v : {&dr_rows_, &dr_tokens_, &dr_pos_, &dr_prefix_, &dr_slots_}) v->clear();
  return R;
}

void Decoder::run_draft() {
  const auto t0 = Clock::now();
  heads_->draft_forward(model_.hidden(), stage_draft(), draft_);
  forward_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

void Decoder::run_heads(SequenceState* const* seqs, const int32_t* hidden_rows, int n, const float* source) {
  const auto t0 = Clock::now();
  Backend& be = model_.backend();
  const int H = model_.config().hidden_size;
  be.copy_to_device(d_index_, hidden_rows, sizeof(int32_t) * n);
  if (source == model_.hidden()) {
    heads_->gather_input(source, model_.taps(), model_.tap_stride(), d_index_, n, d_head_in_);
  } else {
    be.gather_rows(source, H, d_index_, n, d_head_in_);
  }
  if (heads_->root_input()) {
    head_roots_.clear();
    for (int r = 0; r < n; ++r) head_roots_.push_back(seqs[r]->root);
    be.copy_to_device(d_head_roots_, head_roots_.data(), sizeof(int32_t) * n);
  }
  heads_->candidates(d_head_in_, d_head_roots_, n, plan_, d_candidates_);
  const int B = plan_.blocks, W = plan_.width;
  be.copy_to_host(candidates_host_.data(), d_candidates_, sizeof(int32_t) * size_t(cand_stride_) * n);
  for (int r = 0; r < n; ++r) {
    SequenceState& s = *seqs[r];
    s.candidates.resize(cand_stride_);
    for (int b = 0; b < B; ++b) {
      std::copy_n(candidates_host_.data() + (size_t(b) * n + r) * W, W, s.candidates.data() + size_t(b) * W);
    }
    s.has_candidates = true;
    s.candidates_on_host = true;
    s.candidates_on_device = false;
    if (!s.oracle.empty()) apply_oracle(s, tree_, plan_, heads_->num_heads(), heads_->top_k(), vocab_, oracle_);
  }
  forward_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

void Decoder::append(SequenceState& s, const int32_t* tokens, int n, bool with_heads, std::vector<float>* logits,
                     bool all_logits, std::vector<float>* hidden) {
  if (logits) logits->clear();
  if (hidden) hidden->clear();
  if (!logits) all_logits = false;
  Backend& be = model_.backend();
  const int chunk = model_.limits().max_rows;
  const int start = s.length;
  // Once per sequence: room for the whole context, so that steps append without allocating.
  if (s.history.capacity() < size_t(model_.limits().max_seq)) s.history.reserve(model_.limits().max_seq);
  if (lookup_tokens_ > 0 && s.lookup.capacity() < size_t(lookup_tokens_)) s.lookup.reserve(lookup_tokens_);
  s.history.resize(start);
  s.history.insert(s.history.end(), tokens, tokens + n);
  // A forward that fails part way leaves the cache valid up to `start` only.
  struct TrimOnThrow {
    SequenceState& s;
    int start;
    bool armed = true;
    ~TrimOnThrow() {
      if (armed) s.history.resize(std::min(s.history.size(), size_t(start)));
    }
  } trim{s, start};
  for (int off = 0; off < n; off += chunk) {
    const int c = std::min(chunk, n - off);
    rows_.clear();
    for (int i = 0; i < c; ++i) {
      const int pos = start + off + i;
      rows_.tokens.push_back(tokens[off + i]);
      rows_.positions.push_back(pos);
      rows_.slots.push_back(s.slot);
      rows_.cache_index.push_back(pos);
      rows_.prefix_len.push_back(pos + 1);
      if (all_logits || hidden) rows_.logit_rows.push_back(i);
    }
    const bool last = off + c == n;
    if (hidden && !all_logits) rows_.logits_from = last ? c - 1 : c;  // hidden states of all, logits of the last
    if (!all_logits && !hidden && last) rows_.logit_rows.push_back(c - 1);
    // Unless the caller wants logits, only the last row's greedy token is: a fused lm_head argmax.
    int32_t* greedy = last && !logits && !s.options.sample ? d_argmax_ : nullptr;
    const auto tf = Clock::now();
    model_.forward(rows_, greedy);
    be.synchronize();
    forward_seconds_ += std::chrono::duration<double>(Clock::now() - tf).count();
    const int nl = static_cast<int>(rows_.logit_rows.size());
    if (all_logits || (logits && last)) {
      const int first = all_logits ? 0 : nl - 1;
      const size_t old = logits->size();
      logits->resize(old + size_t(nl - first) * vocab_);
      be.copy_to_host(logits->data() + old, model_.logits() + size_t(first) * vocab_,
                      size_t(nl - first) * vocab_ * sizeof(float));
    }
    if (hidden) {  // per row: the final hidden state, then the model's layer taps (if any)
      const size_t H = model_.config().hidden_size, T = model_.taps_layers().size();
      const size_t old = hidden->size();
      hidden->resize(old + size_t(c) * (1 + T) * H);
      if (T == 0) {
        be.copy_to_host(hidden->data() + old, model_.hidden(), size_t(c) * H * sizeof(float));
      } else {
        tap_host_.resize(size_t(c) * H);
        for (size_t j = 0; j <= T; ++j) {
          const float* src = j == 0 ? model_.hidden() : model_.taps() + (j - 1) * model_.tap_stride();
          be.copy_to_host(tap_host_.data(), src, size_t(c) * H * sizeof(float));
          for (int i = 0; i < c; ++i) {
            std::copy_n(tap_host_.data() + i * H, H, hidden->data() + old + (i * (1 + T) + j) * H);
          }
        }
      }
    }
    if (last) {
      s.length = start + n;
      trim.armed = false;
      s.device_synced = false;
      if (s.options.sample) {
        s.root = draw(s, nl - 1, s.length);
      } else {
        if (!greedy) be.argmax(model_.logits() + size_t(nl - 1) * vocab_, 1, vocab_, d_argmax_);
        be.copy_to_host(&s.root, greedy ? d_argmax_ + (nl - 1) : d_argmax_, sizeof(int32_t));
      }
      s.has_candidates = false;
      s.draft_len = -1;  // a new prompt: the draft cache starts at its last token
      if (with_heads && heads_) {
        int32_t row = nl - 1;
        const float* source = model_.hidden();
        if (heads_->draft_layer()) {
          row = queue_draft(s, &row, 0, &s.root);
          run_draft();
          source = draft_.x;
        }
        SequenceState* one = &s;
        run_heads(&one, &row, 1, source);
      }
    }
  }
}

int32_t Decoder::draw(const SequenceState& s, int row, int position) {
  model_.backend().copy_to_host(logit_host_.data(), model_.logits() + size_t(row) * vocab_, sizeof(float) * vocab_);
  const SamplingParams& p = s.options.sampling;
  return sample_token(logit_host_.data(), vocab_, p, position_uniform(p.seed, position), sampling_);
}

void Decoder::candidates_to_host(SequenceState& s) {
  if (s.candidates_on_host || !s.candidates_on_device) return;
  const size_t nc = cand_stride_;
  s.candidates.resize(nc);
  model_.backend().copy_to_host(s.candidates.data(), d_cand_ + size_t(s.slot) * nc, nc * sizeof(int32_t));
  s.candidates_on_host = true;
}

void Decoder::find_lookup(SequenceState& s) const {
  if (s.history.size() < size_t(s.length)) return;  // not appended through this decoder
  const int len = s.length + 1;                     // the cached tokens, then the root
  auto at = [&](int i) { return i < s.length ? s.history[i] : s.root; };
  for (int n = std::min(kLookupMaxNgram, len - 1); n >= kLookupMinNgram; --n) {
    for (int j = len - n - 1; j >= 0; --j) {
      int k = 0;
      while (k < n && at(j + k) == at(len - n + k)) ++k;
      if (k < n) continue;
      for (int i = j + n; i < len && int(s.lookup.size()) < lookup_tokens_; ++i) s.lookup.push_back(at(i));
      return;
    }
  }
}

void Decoder::commit_history(SequenceState& s) {
  s.history.resize(s.length);
  s.history.push_back(s.root);
  s.history.insert(s.history.end(), s.new_tokens.begin(), s.new_tokens.end() - 1);
}

bool Decoder::step_fused(SequenceState* const* seqs, int n, bool allow_trees) {
  if (!fused_) return false;
  const int max_seq = model_.limits().max_seq;
  const bool medusa = seqs[0]->options.medusa;
  bool any_tree = false, all_tree = true;
  for (int i = 0; i < n; ++i) {
    const SequenceState& s = *seqs[i];
    if (s.record || s.options.sample || s.options.medusa != medusa) return false;
    const bool tree = verifies_tree(s, allow_trees);
    if (tree && s.options.acceptance != Acceptance::kGreedy) return false;
    any_tree |= tree;
    all_tree &= tree;
  }
  if (any_tree != all_tree) return false;
  const int T = all_tree ? tree_.num_nodes() : 1;
  for (int i = 0; i < n; ++i) {
    if (seqs[i]->length + T > max_seq) return false;  // the host step cuts the tree
  }
  const bool with_heads = medusa && heads_;
  Backend& be = model_.backend();

  // State to the device: the batch's slots, and lengths, roots and candidates made on the host.
  bslots_.resize(n);
  for (int i = 0; i < n; ++i) bslots_[i] = seqs[i]->slot;
  if (bslots_ != bslots_dev_) {
    be.copy_to_device(d_bslots_, bslots_.data(), sizeof(int32_t) * n);
    bslots_dev_ = bslots_;
  }
  for (int i = 0; i < n; ++i) {
    SequenceState& s = *seqs[i];
    if (!s.device_synced) {
      be.copy_to_device(d_len_ + s.slot, &s.length, sizeof(int32_t));
      be.copy_to_device(d_root_ + s.slot, &s.root, sizeof(int32_t));
      if (d_draft_len_) be.copy_to_device(d_draft_len_ + s.slot, &s.draft_len, sizeof(int32_t));
      s.device_synced = true;
    }
    if (T > 1) {
      if (!s.oracle.empty()) {  // test hook: the oracle's candidates replace the heads'
        apply_oracle(s, tree_, plan_, heads_->num_heads(), heads_->top_k(), vocab_, oracle_);
        s.candidates_on_host = true;
        s.candidates_on_device = false;
      }
      if (!s.candidates_on_device) {
        be.copy_to_device(d_cand_ + size_t(s.slot) * cand_stride_, s.candidates.data(),
                          sizeof(int32_t) * cand_stride_);
        s.candidates_on_device = true;
      }
    }
  }

  // The step: replayed from its graph, recorded on first use, or run eagerly.
  const auto tf = Clock::now();
  const uint64_t key = graph_ns_ | (uint64_t(n) << 24) | (uint64_t(T) << 8) | (with_heads ? 1u : 0u);
  if (!be.graph_replay(key)) {
    bool done = false;
    if (be.graph_begin(key)) {
      bool recorded = true;
      try {
        fused_body(n, T, with_heads);
      } catch (const std::exception&) {
        recorded = false;  // ended below; the eager run reports a real error
      }
      done = be.graph_end(key, recorded);
    }
    if (!done) fused_body(n, T, with_heads);
  }
  const int D = T > 1 ? tree_.max_depth() : 0;
  be.copy_to_host(out_host_.data(), d_out_, sizeof(int32_t) * size_t(n) * (D + 2));
  forward_seconds_ += std::chrono::duration<double>(Clock::now() - tf).count();

  for (int i = 0; i < n; ++i) {
    SequenceState& s = *seqs[i];
    const int32_t* out = out_host_.data() + size_t(i) * (D + 2);
    const int a = out[0];
    s.new_tokens.assign(out + 1, out + 2 + a);
    commit_history(s);
    s.lookup_step = false;
    s.lookup_accepted = 0;
    s.root = s.new_tokens.back();
    s.accepted = a;
    s.length += a + 1;
    s.tree_step = T > 1;
    s.has_candidates = with_heads;
    s.candidates_on_host = false;
    s.candidates_on_device = with_heads;
    if (d_draft_len_) {  // mirror the device's update (step_ops::accept_sequence)
      if (with_heads) {
        const step_ops::DraftSpan sp = step_ops::draft_span(s.draft_len, a);
        s.draft_len = sp.start + a + 1 - sp.first;
      } else {
        s.draft_len = -1;
        s.device_synced = false;  // the device's draft_len is stale now
      }
    }
  }
  return true;
}

void Decoder::fused_body(int n, int T, bool with_heads) {
  Backend& be = model_.backend();
  const LlamaModel::DeviceRows d = model_.device_rows();
  TreeRowsArgs ta;
  ta.n = n;
  ta.T = T;
  ta.cand_stride = cand_stride_;
  ta.batch_slots = d_bslots_;
  ta.lengths = d_len_;
  ta.roots = d_root_;
  ta.candidates = d_cand_;
  ta.depths = d_depths_;
  ta.cand_index = d_cidx_;
  ta.anc_offsets = d_anc_off_;
  ta.ancestors = d_anc_;
  ta.tokens = d.tokens;
  ta.positions = d.positions;
  ta.slots = d.slots;
  ta.cache_index = d.cache_index;
  ta.prefix_len = d.prefix_len;
  ta.extra_offsets = d.extra_offsets;
  ta.extra = d.extra;
  ta.logit_rows = d.logit_rows;
  be.tree_rows(ta);
  model_.run_device_rows(n * T, true, d_argmax_);  // greedy acceptance needs only the argmax
  AcceptArgs aa;
  aa.n = n;
  aa.T = T;
  aa.max_depth = T > 1 ? tree_.max_depth() : 0;
  aa.batch_slots = d_bslots_;
  aa.tokens = d.tokens;
  aa.argmax = d_argmax_;
  aa.parents = d_parents_;
  aa.lengths = d_len_;
  aa.roots = d_root_;
  aa.out = d_out_;
  aa.copy_slots = d.copy_slots;
  aa.copy_src = d.copy_src;
  aa.copy_dst = d.copy_dst;
  aa.hidden_rows = d_index_;
  const bool draft = with_heads && d_draft_len_;
  if (draft) {
    aa.draft_len = d_draft_len_;
    aa.draft_rows = draft_.rows;
    aa.draft_tokens = draft_.tokens;
    aa.draft_positions = draft_.positions;
    aa.draft_prefix = draft_.prefix;
    aa.draft_slots = draft_.slots;
  }
  be.accept_greedy(aa);
  model_.copy_kv_device(n * aa.max_depth);
  if (with_heads) {
    const int H = model_.config().hidden_size;
    if (draft) {  // the draft layer over every sequence's committed nodes, the heads on the last
      heads_->draft_forward(model_.hidden(), n * (aa.max_depth + 1), draft_);
      be.gather_rows(draft_.x, H, aa.max_depth ? d_draft_last_tree_ : d_draft_last_plain_, n, d_head_in_);
    } else {
      heads_->gather_input(model_.hidden(), model_.taps(), model_.tap_stride(), d_index_, n, d_head_in_);
    }
    if (heads_->root_input()) {  // row r's root: the new root of its slot
      be.copy_on_device(d_head_roots_, d_bslots_, sizeof(int32_t) * n);
      be.map_ids(d_head_roots_, size_t(n), d_root_);
    }
    heads_->candidates(d_head_in_, d_head_roots_, n, plan_, d_candidates_);
    be.scatter_candidates(d_candidates_, n, plan_.blocks, plan_.width, d_bslots_, d_cand_);
  }
}

void Decoder::step(SequenceState* const* seqs, int n, bool allow_trees, bool allow_lookup) {
  if (n <= 0 || n > max_batch_) throw Error("internal: bad step batch");
  bool any_lookup = false;
  for (int i = 0; i < n; ++i) {
    SequenceState& s = *seqs[i];
    s.lookup.clear();
    if (lookup_tokens_ > 0 && allow_lookup && s.options.lookup) find_lookup(s);
    any_lookup |= !s.lookup.empty();
  }
  if (!any_lookup && step_fused(seqs, n, allow_trees)) return;
  const int max_seq = model_.limits().max_seq;
  Backend& be = model_.backend();

  // 1. Rows: every sequence's tree (cut to the room left in its cache).
  rows_.clear();
  tokens_.clear();
  row_base_.clear();
  num_nodes_.clear();
  seq_lookup_.clear();
  rows_.extra_offsets.push_back(0);
  for (int si = 0; si < n; ++si) {
    SequenceState& s = *seqs[si];
    const int room = max_seq - s.length;
    if (room < 1) throw Error("internal: step on a full sequence");
    s.tree_step = verifies_tree(s, allow_trees);
    if (s.tree_step) candidates_to_host(s);
    s.device_synced = false;
    // With a looked-up chain: the tree (or the root alone) plus the chain.
    const LookupTree* lt = s.lookup.empty() ? nullptr : &lookup_tree(s.tree_step, static_cast<int>(s.lookup.size()));
    const TreeSpec& tree = lt ? lt->tree : tree_;
    s.lookup_step = lt != nullptr;
    seq_lookup_.push_back(lt);
    const int T = s.tree_step || lt ? std::min(tree.num_nodes(), room) : 1;
    row_base_.push_back(rows_.size());
    num_nodes_.push_back(T);
    for (int i = 0; i < T; ++i) {
      const int depth = tree.depths()[i];
      const int src = lt ? lt->src[i] : i;
      const int32_t tok = i == 0 ? s.root : src < 0 ? s.lookup[-src - 1] : s.candidates[plan_.index[src]];
      rows_.tokens.push_back(tok);
      tokens_.push_back(tok);
      rows_.positions.push_back(s.length + depth);
      rows_.slots.push_back(s.slot);
      rows_.cache_index.push_back(s.length + i);
      rows_.prefix_len.push_back(s.length);
      for (int a : tree.ancestors()[i]) rows_.extra.push_back(s.length + a);
      rows_.extra_offsets.push_back(static_cast<int32_t>(rows_.extra.size()));
      rows_.logit_rows.push_back(rows_.size() - 1);
    }
  }

  // 2. One forward over all rows, and the base model's argmax at every node: fused into the
  // lm_head when no sequence needs the logits (typical acceptance, sampling, step records).
  bool argmax_only = true;
  for (int si = 0; si < n; ++si) {
    const SequenceState& s = *seqs[si];
    if (s.options.acceptance != Acceptance::kGreedy || s.options.sample || s.record) argmax_only = false;
  }
  const auto tf = Clock::now();
  model_.forward(rows_, argmax_only ? d_argmax_ : nullptr);
  be.synchronize();
  forward_seconds_ += std::chrono::duration<double>(Clock::now() - tf).count();
  const int R = rows_.size();
  if (!argmax_only) be.argmax(model_.logits(), R, vocab_, d_argmax_);
  be.copy_to_host(argmax_.data(), d_argmax_, sizeof(int32_t) * R);

  // 3. Acceptance, commit, KV compaction.
  copy_slots_.clear();
  copy_src_.clear();
  copy_dst_.clear();
  hidden_rows_.clear();
  head_seqs_.clear();
  for (int si = 0; si < n; ++si) {
    SequenceState& s = *seqs[si];
    const StepOptions& opt = s.options;
    const int base = row_base_[si], T = num_nodes_[si];
    const LookupTree* lt = seq_lookup_[si];
    const TreeSpec& tree = lt ? lt->tree : tree_;
    const int32_t* toks = tokens_.data() + base;
    std::vector<int>& path = path_;
    path.clear();
    // With sampling, the base model's token at node u is the one drawn for its position (the
    // node's own position + 1), drawn only for the nodes acceptance visits.
    drawn_.assign(opt.sample ? T : 0, -1);
    auto drawn = [&](int u) {
      if (drawn_[u] < 0) drawn_[u] = draw(s, base + u, s.length + tree.depths()[u] + 1);
      return drawn_[u];
    };
    if (opt.sample) {
      accept_match(tree, T, toks, drawn, path);
    } else if (T > 1) {
      if (opt.acceptance == Acceptance::kGreedy) {
        accept_greedy(tree, T, toks, argmax_.data() + base, path);
      } else {
        const float* logits = model_.logits();
        lse_.assign(T, NAN);
        entropy_.assign(T, NAN);
        auto stats = [&](int u) {
          if (std::isnan(lse_[u])) {
            be.softmax_stats(logits + size_t(base + u) * vocab_, 1, vocab_, opt.sampling.temperature, &lse_[u], &entropy_[u]);
          }
        };
        auto prob = [&](int u, int32_t tok) {
          stats(u);
          float l;
          be.copy_to_host(&l, logits + size_t(base + u) * vocab_ + tok, sizeof(float));
          return static_cast<float>(std::exp(double(l) / opt.sampling.temperature - lse_[u]));
        };
        auto entropy = [&](int u) {
          stats(u);
          return entropy_[u];
        };
        accept_typical(tree, T, toks, prob, entropy, opt.posterior_threshold, opt.posterior_alpha, typical_, path);
      }
    }
    const int a = static_cast<int>(path.size());
    const int last = a ? path.back() : 0;
    s.new_tokens.clear();
    for (int j = 0; j < a; ++j) {
      s.new_tokens.push_back(toks[path[j]]);
      if (path[j] != j + 1) {  // node path[j] moves to the slot right after the committed prefix
        copy_slots_.push_back(s.slot);
        copy_src_.push_back(s.length + path[j]);
        copy_dst_.push_back(s.length + j + 1);
      }
    }
    // Bonus token: the base model's own next token.
    s.new_tokens.push_back(opt.sample ? drawn(last) : argmax_[base + last]);
    s.lookup_accepted = 0;
    if (lt) {
      for (int u : path) s.lookup_accepted += lt->src[u] < 0;
    }
    commit_history(s);
    if (s.record) {
      SequenceState::StepRecord rec;
      rec.tokens.assign(toks, toks + T);
      rec.logits.resize(size_t(T) * vocab_);
      be.copy_to_host(rec.logits.data(), model_.logits() + size_t(base) * vocab_, rec.logits.size() * sizeof(float));
      rec.path = path;
      s.records.push_back(std::move(rec));
    }
    s.root = s.new_tokens.back();
    s.accepted = a;
    s.length += a + 1;
    s.has_candidates = false;
    if (s.options.medusa && heads_) {
      head_seqs_.push_back(&s);
      if (heads_->draft_layer()) {  // the draft layer reads every committed node: root, then the path
        draft_commit_.assign(1, base);
        for (int u : path) draft_commit_.push_back(base + u);
        hidden_rows_.push_back(queue_draft(s, draft_commit_.data(), a, s.new_tokens.data()));
      } else {
        hidden_rows_.push_back(base + last);
      }
    } else {
      s.draft_len = -1;
    }
  }
  model_.copy_kv(copy_slots_.data(), copy_src_.data(), copy_dst_.data(), static_cast<int>(copy_slots_.size()));

  // 4. Candidates for the next step from the heads at each last accepted node (through the draft
  // layer over the committed nodes, where the heads have one).
  if (!head_seqs_.empty()) {
    const float* source = model_.hidden();
    if (heads_->draft_layer()) {
      run_draft();
      source = draft_.x;
    }
    run_heads(head_seqs_.data(), hidden_rows_.data(), static_cast<int>(head_seqs_.size()), source);
  }
}

}  // namespace medusa_rt

namespace medusa_rt {

double Decoder::time_forward(int batch, const TreeSpec& tree, int nodes, int reps, int context) {
  nodes = std::min(nodes, tree.num_nodes());
  if (batch * nodes > model_.limits().max_rows || tree.max_depth() > model_.limits().max_tree_depth ||
      context < 0 || context + nodes > model_.limits().max_seq || batch > model_.limits().slots) {
    throw Error("internal: time_forward beyond the model's limits");
  }
  rows_.clear();
  rows_.extra_offsets.push_back(0);
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < nodes; ++i) {
      rows_.tokens.push_back(0);
      rows_.positions.push_back(context + tree.depths()[i]);
      rows_.slots.push_back(b);
      rows_.cache_index.push_back(context + i);
      rows_.prefix_len.push_back(context);
      for (int a : tree.ancestors()[i]) rows_.extra.push_back(context + a);
      rows_.extra_offsets.push_back(static_cast<int32_t>(rows_.extra.size()));
      rows_.logit_rows.push_back(rows_.size() - 1);
    }
  }
  double best = 1e30;
  Backend& be = model_.backend();
  be.synchronize();
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = Clock::now();
    model_.forward(rows_, d_argmax_);  // as a greedy step runs it
    be.synchronize();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

double Decoder::time_heads(int rows, int reps, const HeadsPlan* other) {
  if (!heads_) return 0;
  rows = std::min(rows, max_batch_);
  const HeadsPlan& plan = other ? *other : plan_;
  Backend& be = model_.backend();
  WeightArena scratch(be);
  int32_t* out = d_candidates_;
  if (plan.blocks * plan.width > cand_stride_) {  // a larger tree than this decoder's
    out = static_cast<int32_t*>(scratch.buffer(sizeof(int32_t) * size_t(plan.blocks) * plan.width * rows,
                                               "Medusa candidates"));
  }
  be.fill_zero(d_head_in_, sizeof(float) * size_t(rows) * model_.config().hidden_size);
  be.fill_zero(d_head_roots_, sizeof(int32_t) * size_t(rows));
  be.fill_zero(d_index_, sizeof(int32_t) * size_t(rows));
  // A draft layer runs first on a tree step's committed nodes: up to depth + 1 per sequence (as
  // the fused step runs it; written at draft positions 0..depth of slots 0..rows-1).
  const int draft_queued = heads_->draft_layer() ? std::min(rows * (plan.depth + 1), draft_.max_rows) : 0;
  for (int r = 0; r < draft_queued; ++r) {
    const int pos = r % (plan.depth + 1);
    dr_rows_.push_back(0);
    dr_tokens_.push_back(0);
    dr_pos_.push_back(pos);
    dr_prefix_.push_back(pos + 1);
    dr_slots_.push_back(r / (plan.depth + 1));
  }
  const int draft_rows = draft_queued ? stage_draft() : 0;
  be.synchronize();
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = Clock::now();
    if (draft_rows) {
      heads_->draft_forward(model_.hidden(), draft_rows, draft_);
      be.gather_rows(draft_.x, model_.config().hidden_size, d_draft_last_plain_, rows, d_head_in_);
    } else if (!heads_->feature_layers().empty()) {  // the feature layers' fusion into the heads' input
      heads_->gather_input(model_.hidden(), model_.taps(), model_.tap_stride(), d_index_, rows, d_head_in_);
    }
    heads_->candidates(d_head_in_, d_head_roots_, rows, plan, out);
    be.synchronize();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

int Decoder::calibrate_max_tree_batch(double tokens_per_step) {
  // Cache slots [0, T) of each sequence are written: a tree longer than the cache is cut, as in
  // decoding.
  const int T = std::min(tree_.num_nodes(), model_.limits().max_seq);
  if (!heads_ || T <= 1) return 0;
  const TreeSpec root;
  int chosen = 0;
  for (int b = 1; b <= max_batch_ && b * T <= model_.limits().max_rows; b *= 2) {
    const double plain = time_forward(b, root, 1), tree = time_forward(b, tree_, T);
    if (tree > tokens_per_step * plain) break;
    chosen = b;
  }
  return chosen;
}

}  // namespace medusa_rt
