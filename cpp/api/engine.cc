// Engine and Session: the public API over the model, the backend and the stop logic.
#include "medusa_rt/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "core/model_config.h"
#include "core/safetensors.h"
#include "core/thread_pool.h"
#include "decoding/decoder.h"
#include "decoding/stop_criteria.h"
#include "api/testing.h"
#include "cpu/host_memory.h"
#include "cpu/kernels.h"
#include "model/backend.h"
#include "model/llama.h"
#include "model/medusa_heads.h"

namespace medusa_rt {

const char* version() { return MEDUSA_RT_VERSION_STRING; }
int version_number() { return MEDUSA_RT_VERSION_NUMBER; }

int cuda_device_count() {
#ifdef MEDUSA_RT_HAVE_CUDA
  return cuda_runtime_device_count();
#else
  return 0;
#endif
}

const char* to_string(Acceptance acceptance) {
  return acceptance == Acceptance::kGreedy ? "greedy" : "typical";
}

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "?";
}

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

DType parse_engine_dtype(const std::string& s, const char* what = "dtype") {
  if (s == "fp32" || s == "float32") return DType::kF32;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  if (s == "fp16" || s == "float16") return DType::kF16;
  if (s == "int8") return DType::kI8;
  throw InvalidArgumentError(std::string(what) + " must be \"fp32\", \"bf16\", \"fp16\" or \"int8\", got \"" + s +
                             "\"");
}

const char* dtype_option_name(DType d) {
  return d == DType::kF32 ? "fp32" : d == DType::kBF16 ? "bf16" : d == DType::kF16 ? "fp16" : "int8";
}

std::string mib(size_t b) { return std::to_string((b + (1 << 20) - 1) >> 20) + " MiB"; }

// Length of the longest common start of a and b, counted up to `limit`.
size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b, size_t limit = SIZE_MAX) {
  const size_t n = std::min({a.size(), b.size(), limit});
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

// How many of the prompt's first tokens s's cache holds already (s.history): reused unless the
// request says otherwise. The last prompt token always runs: its logits give the first new token.
int cached_prompt(const SequenceState& s, const std::vector<int32_t>& prompt, bool reuse) {
  if (!reuse || prompt.empty()) return 0;
  return static_cast<int>(std::min(common_prefix(s.history, prompt), prompt.size() - 1));
}

}  // namespace

struct Engine::Impl {
  ModelConfig cfg;
  ModelInfo info;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<MedusaHeads> heads;
  std::unique_ptr<Decoder> decoder;

  std::mutex forward_mu;  // one forward at a time (the decoder's buffers are shared)
  std::mutex slot_mu;
  std::condition_variable slot_cv;
  std::vector<bool> slot_used;
  // What each slot's cache offers: tokens whose entries stay valid until the slot's sequence
  // writes over them. A free slot's are what its last sequence left (SequenceState::history),
  // handed to the next sequence that takes it, whose first request then prefills only what
  // follows the start it shares with them. A held slot's are those until its sequence writes,
  // then the prompt (or appended tokens) it last prefilled; they shrink before any write below
  // their end (unshare_from). Another sequence whose prompt starts the same way copies those
  // entries instead of prefilling them (take_shared_prefix). Anything else that writes a slot's
  // cache clears them.
  std::vector<std::vector<int32_t>> slot_tokens;
  // How many of each slot's offered tokens a later request has used (from the slot's own cache or
  // copied from it), or were copied in: a start worth keeping, such as a shared system prompt.
  // Never more than the offer.
  std::vector<size_t> slot_used_prefix;
  // When each slot was let go, or (free) last copied from: a count of releases. The oldest is
  // taken first.
  std::vector<uint64_t> slot_released;
  uint64_t releases = 0;
  int medusa_max_batch = 0;
  int prompt_lookup = 0;  // EngineOptions::prompt_lookup

  // Sessions generating from several threads share decode steps: a thread that needs a step
  // queues its sequence; the first queued thread that finds no step running becomes the leader,
  // gathers the queue (waiting briefly for the other active generations to queue too), runs one
  // batched step and wakes the others.
  std::mutex sched_mu;
  std::condition_variable sched_cv;
  std::vector<SequenceState*> queue;
  int generating = 0;  // sessions inside generate()
  bool stepping = false;

  // Tokens of slot i's used start (slot_used_prefix) that taking it for a request sharing `kept`
  // tokens with it would lose: those no other slot offers. Callers hold slot_mu.
  size_t used_prefix_lost(size_t i, size_t kept) const {
    const size_t used = slot_used_prefix[i];
    size_t covered = kept;
    for (size_t j = 0; j < slot_tokens.size() && covered < used; ++j) {
      if (j != i && slot_tokens[j].size() > covered) {
        covered = std::max(covered, common_prefix(slot_tokens[i], slot_tokens[j], used));
      }
    }
    return used > covered ? used - covered : 0;
  }
  // A free slot for s, waiting up to wait_seconds for one; -1 if none. The one whose cached
  // tokens share the most with `prompt` (the request s will make first, if known) less what it
  // would lose of a start that earlier requests used and no other slot holds, that loss halved
  // for every n slots let go since the slot last served (n slots: a conversation nobody continues
  // fades, a system prompt copied from again and again does not); on a tie the one let go
  // longest ago. Its cached tokens become s's (s's context stays empty).
  int acquire_slot(SequenceState& s, double wait_seconds = 0, const std::vector<int32_t>* prompt = nullptr) {
    std::unique_lock<std::mutex> lock(slot_mu);
    auto take = [&]() -> int {
      const double n = double(slot_used.size());
      int best = -1;
      double best_score = 0;
      for (size_t i = 0; i < slot_used.size(); ++i) {
        if (slot_used[i]) continue;
        const size_t len = prompt ? common_prefix(slot_tokens[i], *prompt) : 0;
        const double age = double(releases - slot_released[i]);
        const double score = double(len) - double(used_prefix_lost(i, len)) * std::exp2(-age / n);
        if (best < 0 || score > best_score || (score == best_score && slot_released[i] < slot_released[best])) {
          best = static_cast<int>(i);
          best_score = score;
        }
      }
      if (best >= 0) {
        slot_used[best] = true;
        s.slot = best;
        s.length = 0;
        s.history = slot_tokens[best];
      }
      return best;
    };
    int slot = take();
    if (slot < 0 && wait_seconds > 0) {
      const auto deadline = Clock::now() + std::chrono::duration<double>(wait_seconds);
      while (slot < 0 && slot_cv.wait_until(lock, deadline) != std::cv_status::timeout) slot = take();
      if (slot < 0) slot = take();
    }
    return slot;
  }
  // Lets s's slot go, keeping what its cache holds for the next sequence (nothing if `keep` is
  // false: after a failure).
  void release_slot(SequenceState& s, bool keep = true) {
    {
      std::lock_guard<std::mutex> lock(slot_mu);
      slot_used[s.slot] = false;
      slot_released[s.slot] = ++releases;
      if (keep) {
        set_offer(s.slot, std::move(s.history));
        s.history.clear();
      } else {
        set_offer(s.slot, {});
      }
    }
    s.slot = -1;
    slot_cv.notify_one();
  }

  // s is about to write its slot's cache from position `from` on: the slot offers only the
  // tokens before it from now on (share() offers more after a write that succeeds; one that
  // fails part way leaves this). Callers hold forward_mu, so no copy reads the slot meanwhile.
  void unshare_from(const SequenceState& s, int from) {
    std::lock_guard<std::mutex> lock(slot_mu);
    std::vector<int32_t>& t = slot_tokens[s.slot];
    if (t.size() > size_t(from)) t.resize(from);
    slot_used_prefix[s.slot] = std::min(slot_used_prefix[s.slot], t.size());
  }
  // s's cache holds s.history now (after a prefill or append): offered to other sequences. Its
  // first `used` tokens came from a cache (its own or copied): a start requests share.
  void share(const SequenceState& s, size_t used = 0) {
    std::lock_guard<std::mutex> lock(slot_mu);
    set_offer(s.slot, s.history);
    slot_used_prefix[s.slot] = std::max(slot_used_prefix[s.slot], std::min(used, s.history.size()));
  }
  // Slot i offers `tokens` now; what it had used stays used as far as the two agree. Callers hold
  // slot_mu.
  void set_offer(int i, std::vector<int32_t> tokens) {
    slot_used_prefix[i] = common_prefix(slot_tokens[i], tokens, slot_used_prefix[i]);
    slot_tokens[i] = std::move(tokens);
  }
  // Where another slot's cache holds a longer start of `prompt` than the `cached` tokens s's own
  // does, copies those entries into s's slot (they are what a prefill of the same tokens writes)
  // and returns the new number of cached tokens. At most prompt.size() - 1: the last prompt
  // token always runs. Callers hold forward_mu and have unshared s's slot from `cached`.
  int take_shared_prefix(SequenceState& s, const std::vector<int32_t>& prompt, int cached) {
    std::lock_guard<std::mutex> lock(slot_mu);
    const size_t limit = prompt.size() - 1;
    int from = -1;
    size_t best = size_t(cached);
    for (size_t i = 0; i < slot_tokens.size(); ++i) {
      if (int(i) == s.slot) continue;
      const size_t len = std::min(common_prefix(slot_tokens[i], prompt), limit);
      if (len > best) {
        best = len;
        from = static_cast<int>(i);
      }
    }
    if (from < 0) return cached;
    model->copy_slot_prefix(from, s.slot, cached, static_cast<int>(best));
    slot_used_prefix[from] = std::max(slot_used_prefix[from], best);
    if (!slot_used[from]) slot_released[from] = releases;  // a free slot just served: as if let go now
    s.history.assign(prompt.begin(), prompt.begin() + best);
    return static_cast<int>(best);
  }

  // Runs the steps of a batch under the forward lock, with the batch-size speculation policy.
  void step_batch(SequenceState* const* seqs, int n) {
    std::lock_guard<std::mutex> lock(forward_mu);
    decoder->step(seqs, n, n <= medusa_max_batch, n <= std::max(1, medusa_max_batch));
  }

  // One step for s, shared with whatever other sessions need a step at the same time.
  void step_shared(SequenceState* s) {
    std::unique_lock<std::mutex> lk(sched_mu);
    queue.push_back(s);
    s->step_done = false;
    s->step_failed = false;
    sched_cv.notify_all();  // a gathering leader may be waiting for this sequence
    while (!s->step_done) {
      if (stepping) {
        sched_cv.wait(lk);
        continue;
      }
      // Lead: give the other generating sessions a moment to queue their sequences.
      stepping = true;
      const int want = std::min<int>(generating, int(slot_used.size()));
      sched_cv.wait_for(lk, std::chrono::microseconds(500), [&] { return int(queue.size()) >= want; });
      std::vector<SequenceState*> batch;
      batch.swap(queue);
      lk.unlock();
      bool failed = false;
      try {
        step_batch(batch.data(), static_cast<int>(batch.size()));
      } catch (...) {
        failed = true;
      }
      lk.lock();
      for (SequenceState* b : batch) {
        b->step_done = true;
        b->step_failed = failed;
      }
      stepping = false;
      sched_cv.notify_all();
    }
    if (s->step_failed) throw Error("the batched decode step this sequence was part of failed");
  }

  void validate_tokens(const std::vector<int32_t>& tokens, const char* what) const {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= cfg.vocab_size) {
        throw InvalidArgumentError(std::string(what) + " token id " + std::to_string(tokens[i]) + " at index " +
                                   std::to_string(i) + " is out of range: the vocabulary has " +
                                   std::to_string(cfg.vocab_size) + " tokens (ids 0.." +
                                   std::to_string(cfg.vocab_size - 1) + ")");
      }
    }
  }
};

namespace {

// The tree an engine runs: explicit paths, a name, the heads' default, or mc_sim_7b_63 cut to
// the number of heads.
// Whether the engine sizes the tree itself ("auto", the default for heads with an accuracy table).
// "cpu" -> -1, "cuda" -> 0, "cuda:N" -> N.
int parse_device(const std::string& d) {
  if (d == "cpu") return -1;
  int gpu = -1;
  if (d == "cuda") {
    gpu = 0;
  } else if (d.rfind("cuda:", 0) == 0 && d.size() > 5 && d.size() < 9 &&
             d.find_first_not_of("0123456789", 5) == std::string::npos) {
    gpu = std::stoi(d.substr(5));
  } else {
    throw InvalidArgumentError("device must be \"cpu\", \"cuda\" or \"cuda:N\", got \"" + d + "\"");
  }
#ifdef MEDUSA_RT_HAVE_CUDA
  return gpu;
#else
  (void)gpu;
  throw InvalidArgumentError("device=\"" + d + "\": this build of medusa_rt has no CUDA backend "
                             "(build it with -DMEDUSA_RT_CUDA=ON, see docs/CUDA.md)");
#endif
}

bool wants_auto_tree(const EngineOptions& o, const MedusaHeadsMeta& heads) {
  if (!o.tree_paths.empty()) return false;
  if (o.tree == "auto") {
    if (heads.accuracy_table.empty()) {
      throw InvalidArgumentError("tree \"auto\" needs Medusa heads with an accuracy table (train-heads writes one; "
                                 "`medusa-rt fit-tree --write` adds one)");
    }
    return true;
  }
  return o.tree.empty() && !heads.accuracy_table.empty();
}

// The auto tree's calibration: timing rounds, and the cached tokens a timed step attends to (a
// typical chat turn's context).
constexpr int kCalibrationRounds = 7;
constexpr int kCalibrationContext = 256;
constexpr double kCalibrationSlack = 1.25;
// What the auto tree's choice expects a tree to accept: this share of the speculative tokens its
// accuracy table predicts. The table's formula takes the heads' ranks as independent, and the
// table comes from other prompts than the ones decoded: on the shipped SmolLM2 heads, greedy
// answers to 24 of the evaluation prompts accepted 0.79-0.84 of the predicted speculative tokens
// with trees of 4-8 nodes (heads alone). Without it the choice leaned to larger trees, whose
// predicted gain is mostly that overstatement: an 8-node tree ran at 1.29x plain decoding where
// 4-5 nodes ran at 1.5-1.6x (bf16, 2-core EPYC).
constexpr double kTableAcceptance = 0.8;

double predicted_tokens_per_step(const AccuracyTable& table, const TreeSpec& tree) {
  return 1 + kTableAcceptance * (expected_tokens_per_step(table, tree.paths()) - 1);
}

// EngineOptions::prompt_lookup's default on the CPU: on SmolLM2-135M bf16, chains of up to 4
// tokens decoded 1.13x the heads alone with a 2-node tree (1.32 -> 1.52 tokens per step) and
// with a 5-node tree (1.56 -> 1.76), medians over 16 chat answers (2026-11-29, 2-core EPYC).
constexpr int kDefaultPromptLookup = 4;

// EngineOptions::medusa_draft_vocab's default on the CPU, where heads files count their draft
// tokens: on SmolLM2-135M bf16, the 6,144 most frequent of the shipped heads' 12,452 (96.5% of
// their training answers' tokens) made a 4-node tree step cost 1.12-1.14x a plain step instead of
// 1.18-1.19x (each heads level passes over half the projection rows) for 0.6% fewer tokens per
// step (12 evaluation prompts x 128 tokens, prompt lookup on, two runs, 2-core EPYC).
constexpr int kDefaultCpuDraftVocab = 6144;

double median(std::vector<double> v) {
  if (v.empty()) throw Error("internal: median of no values");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Candidate sizes of the auto tree, up to max_nodes.
std::vector<int> auto_tree_sizes(int max_nodes) {
  std::vector<int> out;
  for (int n : {2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256}) {
    if (n <= max_nodes) out.push_back(n);
  }
  if (out.empty() || out.back() != max_nodes) out.push_back(max_nodes);
  return out;
}

// The tree of `nodes` nodes fitted to the heads' accuracies, at most max_depth deep (0: as deep as
// the heads go): "auto-N", or "auto-N-dD" (D its depth) under a depth limit, N its nodes.
TreeSpec fitted_tree(const MedusaHeadsMeta& heads, int nodes, int top_k, int max_depth = 0) {
  const int ranks = std::min<int>(top_k, static_cast<int>(heads.accuracy_table[0].size()));
  const auto paths = fit_tree_paths(heads.accuracy_table, nodes, max_depth, ranks);
  std::string name = "auto-" + std::to_string(paths.size() + 1);  // fewer than `nodes` where the table runs out
  if (max_depth > 0) {
    size_t depth = 0;
    for (const auto& p : paths) depth = std::max(depth, p.size());
    name += "-d" + std::to_string(depth);
  }
  return TreeSpec(paths, name);
}

TreeSpec choose_tree(const EngineOptions& o, const MedusaHeadsMeta& heads) {
  const int num_heads = heads.num_heads;
  if (!o.tree_paths.empty()) return TreeSpec(o.tree_paths);
  // The largest auto candidate: buffers are sized for it, the calibration picks the size.
  if (wants_auto_tree(o, heads)) return fitted_tree(heads, o.auto_tree_max_nodes, o.medusa_top_k);
  if (o.tree == "default") {
    if (!heads.has_default_tree) throw InvalidArgumentError("tree \"default\": the Medusa heads file has no default_tree");
    return heads.default_tree;
  }
  if (!o.tree.empty()) return TreeSpec::named(o.tree);
  if (heads.has_default_tree) return heads.default_tree;
  std::vector<TreeSpec::Path> paths;
  const TreeSpec full = TreeSpec::named("mc_sim_7b_63");
  for (const auto& p : full.paths()) {
    if (int(p.size()) <= num_heads) paths.push_back(p);
  }
  return TreeSpec(paths, num_heads >= 4 ? "mc_sim_7b_63" : "mc_sim_7b_63[depth<=" + std::to_string(num_heads) + "]");
}

}  // namespace

Engine::Engine(const std::string& model_dir, const EngineOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& e = *impl_;
  e.cfg = load_model_config(model_dir);
  const ModelConfig& c = e.cfg;
  const DType dtype = parse_engine_dtype(options.dtype);
  const int gpu = parse_device(options.device);
  if (gpu >= 0 && (dtype == DType::kF32 || dtype == DType::kI8)) {
    throw InvalidArgumentError(std::string("dtype=\"") + dtype_option_name(dtype) +
                               "\" is not supported on CUDA (weights are bf16 or fp16 there)");
  }
  const std::string& mi = options.matmul_inputs;
  if (mi != "auto" && mi != "fp32" && mi != "bf16") {
    throw InvalidArgumentError("matmul_inputs must be \"auto\", \"fp32\" or \"bf16\", got \"" + mi + "\"");
  }
  // "auto": bf16 inputs where the CPU multiplies bf16 pairs natively (AVX512-BF16) and the weights
  // are bf16, exact fp32 inputs otherwise.
  const bool bf16_inputs =
      mi == "bf16" || (mi == "auto" && gpu < 0 && dtype == DType::kBF16 && cpu::bf16_pairs_supported());
  if (mi == "bf16" && (gpu >= 0 || dtype != DType::kBF16)) {
    throw InvalidArgumentError("matmul_inputs=\"bf16\" is for bf16 weights on the CPU (dtype=\"bf16\"; CUDA always "
                               "rounds the inputs to the weight type)");
  }
  const DType kv_dtype = parse_engine_dtype(options.kv_dtype, "kv_dtype");
  if (kv_dtype == DType::kF16 || kv_dtype == DType::kI8 || (gpu >= 0 && kv_dtype != DType::kF32)) {
    throw InvalidArgumentError("kv_dtype must be \"fp32\" or \"bf16\" (\"bf16\" on the CPU only), got \"" +
                               options.kv_dtype + "\"");
  }
  // The heads only draft (the base model verifies every token), so an fp32 model's heads run in
  // bf16 on the CPU by default: half the bytes per heads pass, the same acceptance (measured).
  // An int8 model's heads too (their few MB do not pay for quantizing them).
  const DType heads_dtype = !options.medusa_heads_dtype.empty()
                                ? parse_engine_dtype(options.medusa_heads_dtype, "medusa_heads_dtype")
                                : (gpu < 0 && (dtype == DType::kF32 || dtype == DType::kI8) ? DType::kBF16 : dtype);
  if (gpu >= 0 && (heads_dtype == DType::kF32 || heads_dtype == DType::kI8)) {
    throw InvalidArgumentError(std::string("medusa_heads_dtype=\"") + dtype_option_name(heads_dtype) +
                               "\" is not supported on CUDA (weights are bf16 or fp16 there)");
  }

  if (options.max_batch_size < 1 || options.max_batch_size > 4096) {
    throw InvalidArgumentError("max_batch_size must be in [1, 4096], got " + std::to_string(options.max_batch_size));
  }
  if (options.max_seq_len < 0) throw InvalidArgumentError("max_seq_len must be >= 0 (0 = default), got " + std::to_string(options.max_seq_len));
  if (options.num_threads < 0 || options.num_threads > 1024) {
    throw InvalidArgumentError("num_threads must be in [0, 1024] (0 = all cores), got " + std::to_string(options.num_threads));
  }
  if (options.prefill_chunk < 1 || options.prefill_chunk > 8192) {
    throw InvalidArgumentError("prefill_chunk must be in [1, 8192], got " + std::to_string(options.prefill_chunk));
  }
  int max_seq = options.max_seq_len ? options.max_seq_len : std::min(c.max_position_embeddings, 4096);
  if (max_seq < 2) throw InvalidArgumentError("max_seq_len must be at least 2, got " + std::to_string(max_seq));
  if (max_seq > c.max_position_embeddings) {
    throw InvalidArgumentError("max_seq_len " + std::to_string(max_seq) + " exceeds the model's max_position_embeddings " +
                               std::to_string(c.max_position_embeddings));
  }
  if (c.sliding_window > 0 && max_seq > c.sliding_window) {
    throw InvalidArgumentError("max_seq_len " + std::to_string(max_seq) + " exceeds the model's sliding_window " +
                               std::to_string(c.sliding_window) + "; sliding-window attention is not supported, "
                               "so max_seq_len must be <= " + std::to_string(c.sliding_window));
  }
  const int threads = options.num_threads ? options.num_threads : available_cores();
  const int prefill_chunk = std::min(options.prefill_chunk, max_seq);
  if (options.medusa_max_batch < -1) {
    throw InvalidArgumentError("medusa_max_batch must be >= 0, or -1 to measure it; got " +
                               std::to_string(options.medusa_max_batch));
  }
  if (options.medusa_expected_tokens_per_step != 0 && !(options.medusa_expected_tokens_per_step >= 1.0)) {
    throw InvalidArgumentError("medusa_expected_tokens_per_step must be >= 1 (or 0 for the default)");
  }
  if (options.prompt_lookup < -1 || options.prompt_lookup > 64) {
    throw InvalidArgumentError("prompt_lookup must be in [0, 64], or -1 for the device's default; got " +
                               std::to_string(options.prompt_lookup));
  }
  // Default: on for the CPU (measured to pay there); off on CUDA, where a step with a chain
  // leaves the recorded graph and has not been measured yet.
  const int prompt_lookup = options.prompt_lookup >= 0 ? options.prompt_lookup : gpu >= 0 ? 0 : kDefaultPromptLookup;
  if (options.auto_tree_max_nodes < 2 || options.auto_tree_max_nodes > 1024) {
    throw InvalidArgumentError("auto_tree_max_nodes must be in [2, 1024], got " + std::to_string(options.auto_tree_max_nodes));
  }
  if (options.medusa_top_k < 1 || options.medusa_top_k > c.vocab_size) {
    throw InvalidArgumentError("medusa_top_k must be in [1, vocab_size], got " + std::to_string(options.medusa_top_k));
  }
  if (options.medusa_draft_vocab < -1) {
    throw InvalidArgumentError("medusa_draft_vocab must be >= 0 (0: the heads' whole draft vocabulary), or -1 for the "
                               "device's default; got " + std::to_string(options.medusa_draft_vocab));
  }

  // Medusa heads: an explicit file must exist; the model directory's is optional.
  std::string heads_file = options.medusa_heads;
  if (!heads_file.empty()) {
    if (!file_exists(heads_file)) throw ModelNotFoundError("Medusa heads file not found: " + heads_file);
  } else if (file_exists(model_dir + "/medusa_heads.safetensors")) {
    heads_file = model_dir + "/medusa_heads.safetensors";
  }
  if (heads_file.empty() && (!options.tree.empty() || !options.tree_paths.empty())) {
    throw InvalidArgumentError("a Medusa tree was given but the model has no Medusa heads "
                               "(no medusa_heads.safetensors in " + model_dir + ")");
  }
  // Heads metadata and the tree are checked before anything big is allocated.
  TreeSpec tree;
  MedusaHeadsMeta heads_meta;
  if (!heads_file.empty()) {
    heads_meta = MedusaHeads::read_meta(heads_file, c);
    tree = choose_tree(options, heads_meta);
    tree.check_fits(heads_meta.num_heads, options.medusa_top_k);
  }

  e.backend = gpu >= 0 ? make_cuda_backend(gpu) : make_cpu_backend(threads, bf16_inputs);
  const size_t heads_bytes = heads_file.empty() ? 0 : MappedFile(heads_file).size();
  ModelLimits lim;
  lim.slots = options.max_batch_size;
  lim.max_seq = max_seq;
  // Rows of one forward: a tree per sequence, or a prefill chunk.
  // (A step with a prompt-lookup chain cuts the tree by the chain: at least 1 + chain rows.)
  lim.max_rows = std::max(prefill_chunk, options.max_batch_size * std::max(tree.num_nodes(), 1 + prompt_lookup));
  lim.max_logit_rows = lim.max_rows;
  lim.max_tree_depth = std::max(tree.max_depth(), prompt_lookup);
  lim.kv_dtype = kv_dtype;

  const size_t wbytes = LlamaModel::weight_bytes_for(c, dtype) + heads_bytes;
  const size_t kvbytes = LlamaModel::kv_bytes_for(c, lim) +
                         (heads_meta.draft_layer ? MedusaHeads::draft_cache_bytes(c, lim.slots, lim.max_seq) : 0);
  const size_t wsbytes = LlamaModel::workspace_bytes_for(c, lim);
  const size_t need = wbytes + kvbytes + wsbytes;
  const size_t avail = e.backend->available_memory();
  if (avail > 0 && need > avail) {
    throw CapacityError("not enough memory for this engine: it needs " + mib(need) + " (weights " + mib(wbytes) +
                        ", KV cache " + mib(kvbytes) + " for max_batch_size=" + std::to_string(lim.slots) +
                        " x max_seq_len=" + std::to_string(max_seq) + ", workspace " + mib(wsbytes) + ") but only " +
                        mib(avail) + " are available on " + e.backend->device_name() +
                        "; lower max_seq_len or max_batch_size, or use dtype=\"bf16\"");
  }

  {
    TensorStore store(model_dir, "model");
    e.model = std::make_unique<LlamaModel>(c, store, dtype, lim, *e.backend);
  }  // the mapping is released once the weights are converted
  if (!heads_file.empty()) {
    // Default: on the CPU the most frequent kDefaultCpuDraftVocab draft tokens, where the file
    // counts them; on CUDA all (not measured there).
    const int draft_vocab = options.medusa_draft_vocab >= 0 ? options.medusa_draft_vocab
                            : gpu < 0 && heads_meta.draft_vocab_counts && heads_meta.draft_vocab > kDefaultCpuDraftVocab
                                ? std::max(kDefaultCpuDraftVocab, options.medusa_top_k)
                                : 0;
    e.heads = std::make_unique<MedusaHeads>(heads_file, c, heads_dtype, options.max_batch_size, options.medusa_top_k,
                                            *e.backend, e.model->lm_head(), e.model->embedding(), draft_vocab);
    e.model->set_taps(e.heads->feature_layers());  // what heads with feature layers read
  }
  e.decoder = std::make_unique<Decoder>(*e.model, e.heads.get(), tree, options.max_batch_size, prompt_lookup);
  double expected_tps = options.medusa_expected_tokens_per_step > 0 ? options.medusa_expected_tokens_per_step
                        : heads_meta.expected_tokens_per_step > 0   ? heads_meta.expected_tokens_per_step
                                                                     : 2.0;
  bool trees_lose = false;  // the auto calibration found plain decoding faster than every tree
  const bool auto_tree = e.heads && wants_auto_tree(options, heads_meta);
  if (auto_tree) {
    // Size the tree to this machine: expected tokens per second of fitted trees of growing size,
    // each timed as one verify step at batch 1 after kCalibrationContext cached tokens (attention
    // grows with the rows times the context): its forward, against a plain step's, then the
    // heads, right after the forward as in a step (so their weights come from memory, not from a
    // cache that a timing of the heads alone would have warmed: on a CPU 2-3x the time).
    ModelInfo& info = e.info;
    const int limit = std::min(tree.num_nodes(), max_seq);
    const int context = std::max(0, std::min(kCalibrationContext, max_seq - limit));
    const TreeSpec plain;
    const AccuracyTable& table = heads_meta.accuracy_table;
    // Every size comes as the unlimited fit and as fits limited to each smaller depth (distinct
    // trees of that size only): the heads run once per tree level (heads with a path input pass
    // over their vocabulary projection at each), so a shallower tree can be the faster one
    // where rows are cheap and levels are not. The forward's cost depends on the size alone.
    struct Candidate {
      TreeSpec tree;
      std::vector<double> heads;  // seconds, one per timing
    };
    struct Size {
      int nodes;
      std::vector<Candidate> trees;  // [0]: the unlimited fit
      std::vector<double> ratios;    // [round]: forward / that round's plain forward
    };
    std::vector<Size> sizes;
    // A plan per timing (plans of every candidate at once would hold their buffers, sized for
    // max_batch_size sequences, all through the calibration); plan() writes its buffers, so the
    // timing does not pay for their first touch.
    auto time_heads = [&](Candidate& c) {
      const HeadsPlan plan = e.heads->plan(c.tree);
      c.heads.push_back(e.decoder->time_heads(1, 1, &plan));
    };
    const double best_possible = predicted_tokens_per_step(table, tree);
    // Round 0 finds the sizes worth timing: the search stops once no larger tree can win, with
    // slack for a single timing's noise.
    std::vector<double> plain_s{e.decoder->time_forward(1, plain, 1, 1, context)};
    double best_rate = 0;
    double least_heads = 1e30;  // no tree's heads take less than the cheapest timed (one level)
    for (int n : auto_tree_sizes(limit)) {
      Size z{0, {}, {}};
      for (int d = 0;;) {  // d = 0: unlimited; then each depth below the previous fit's
        TreeSpec t = fitted_tree(heads_meta, n, options.medusa_top_k, d);
        const int depth = t.max_depth();
        if (d == 0) z.nodes = t.num_nodes();  // below n where the table has no more paths
        if (t.num_nodes() == z.nodes) z.trees.push_back({std::move(t), {}});
        if (depth <= 1) break;
        d = depth - 1;
      }
      if (!sizes.empty() && z.nodes <= sizes.back().nodes) break;  // no larger tree to fit
      const double step = e.decoder->time_forward(1, z.trees[0].tree, z.nodes, 1, context);
      z.ratios.push_back(step / plain_s[0]);
      time_heads(z.trees[0]);
      for (size_t c = 1; c < z.trees.size(); ++c) {  // every tree's heads once, each after a forward
        z.ratios.push_back(e.decoder->time_forward(1, z.trees[0].tree, z.nodes, 1, context) / plain_s[0]);
        time_heads(z.trees[c]);
      }
      sizes.push_back(std::move(z));
      const Candidate& c = sizes.back().trees[0];
      least_heads = std::min(least_heads, c.heads[0]);
      best_rate = std::max(best_rate, predicted_tokens_per_step(table, c.tree) / (step + c.heads[0]));
      if (best_possible / (step + least_heads) < best_rate / kCalibrationSlack) break;
    }
    // More rounds, each a plain step then every size once, its trees' heads in turn (round 0
    // timed each tree's once): on a shared machine timings drift and jump by 10-20% between
    // runs, so a size's cost is the median of its ratios to the plain step of the same round,
    // not a best-of taken at a different moment than the plain step's; a tree's heads, the
    // median of its timings.
    for (int round = 1; round < kCalibrationRounds; ++round) {
      plain_s.push_back(e.decoder->time_forward(1, plain, 1, 1, context));
      for (Size& z : sizes) {
        z.ratios.push_back(e.decoder->time_forward(1, z.trees[0].tree, z.nodes, 1, context) / plain_s.back());
        time_heads(z.trees[round % z.trees.size()]);
      }
    }
    info.plain_step_seconds = median(plain_s);
    std::vector<const TreeSpec*> cal_tree;  // [calibration entry]
    best_rate = 0;
    double forward = 0;  // a larger tree's forward never costs less than a smaller one's (noise otherwise)
    for (const Size& z : sizes) {
      forward = std::max(forward, median(z.ratios) * info.plain_step_seconds);
      for (const Candidate& c : z.trees) {
        TreeCalibration cal;
        cal.nodes = z.nodes;
        cal.depth = c.tree.max_depth();
        cal.expected_tokens_per_step = predicted_tokens_per_step(table, c.tree);
        cal.heads_seconds = median(c.heads);
        cal.step_seconds = forward + cal.heads_seconds;
        cal.tokens_per_second = cal.expected_tokens_per_step / cal.step_seconds;
        info.calibration.push_back(cal);
        cal_tree.push_back(&c.tree);
        best_rate = std::max(best_rate, cal.tokens_per_second);
      }
    }
    // Predicted rates within kTreeTie of the best are a tie (timing noise alone moves them by
    // that much between engines), and a tie goes to the cheapest step: prompt lookup, on by
    // default on the CPU, adds tokens to small trees and almost none to large ones, which the
    // table cannot predict. Measured (bf16, 2-core EPYC, 12 evaluation prompts x 128 tokens,
    // prompt lookup on, three runs): 2 nodes decoded at 1.42x plain decoding, 3-6 nodes at
    // 1.43-1.64x (within each run's noise of each other), 8 nodes at 1.34-1.42x.
    constexpr double kTreeTie = 1.03;
    size_t chosen = 0;
    for (size_t i = 0; i < info.calibration.size(); ++i) {
      const TreeCalibration& c = info.calibration[i];
      if (c.tokens_per_second * kTreeTie >= best_rate &&
          (info.calibration[chosen].tokens_per_second * kTreeTie < best_rate ||
           c.step_seconds < info.calibration[chosen].step_seconds)) {
        chosen = i;
      }
    }
    const TreeSpec* best = cal_tree[chosen];
    info.calibration_choice = static_cast<int>(chosen);
    // A tree must promise a clear gain: accuracy tables measured on held-out data tend to
    // overstate acceptance on other prompts, and a predicted tie is a loss in practice.
    constexpr double kAutoTreeMargin = 1.1;
    trees_lose = best_rate * info.plain_step_seconds < kAutoTreeMargin;
    if (options.medusa_expected_tokens_per_step <= 0) expected_tps = predicted_tokens_per_step(table, *best);
    e.decoder = std::make_unique<Decoder>(*e.model, e.heads.get(), *best, options.max_batch_size, prompt_lookup);
  }
  if (options.medusa_max_batch >= 0) {
    e.medusa_max_batch = options.medusa_max_batch;
  } else if (e.heads) {
    // With the auto tree, batch 1 was decided by the calibration above (including the heads'
    // time); the threshold search only extends it to larger batches.
    const int measured = trees_lose ? 0 : e.decoder->calibrate_max_tree_batch(expected_tps);
    e.medusa_max_batch = auto_tree && !trees_lose ? std::max(1, measured) : measured;
  }
  e.slot_used.assign(lim.slots, false);
  e.slot_tokens.assign(lim.slots, {});
  e.slot_used_prefix.assign(lim.slots, 0);
  e.slot_released.assign(lim.slots, 0);

  ModelInfo& info = e.info;
  info.architecture = c.architecture;
  info.vocab_size = c.vocab_size;
  info.hidden_size = c.hidden_size;
  info.num_layers = c.num_layers;
  info.num_heads = c.num_heads;
  info.num_kv_heads = c.num_kv_heads;
  info.head_dim = c.head_dim;
  info.max_seq_len = max_seq;
  info.max_batch_size = lim.slots;
  info.dtype = dtype_option_name(dtype);
  const std::string bname = e.backend->name();
  info.isa = bname.substr(bname.find('/') + 1);
  info.device = e.backend->device_name();
  info.num_threads = e.backend->num_threads();
  info.eos_token_ids = c.eos_token_ids;
  info.bos_token_id = c.bos_token_id;
  info.weight_bytes = e.model->weight_bytes() + (e.heads ? e.heads->weight_bytes() : 0);
  info.kv_cache_bytes = e.model->kv_bytes() + (e.heads && e.heads->draft_layer()
                                                    ? MedusaHeads::draft_cache_bytes(c, lim.slots, lim.max_seq)
                                                    : 0);
  info.medusa_heads = e.heads ? e.heads->num_heads() : 0;
  info.medusa_shared_lm_head = e.heads && e.heads->shared_lm_head();
  info.medusa_heads_dtype = e.heads ? dtype_option_name(heads_dtype) : "";
  info.medusa_draft_vocab = e.heads ? e.heads->draft_vocab_size() : 0;
  info.kv_dtype = dtype_option_name(kv_dtype);
  info.matmul_inputs = bf16_inputs ? "bf16" : "fp32";
  info.tree = e.decoder->tree().name();
  info.tree_nodes = e.decoder->tree().num_nodes();
  info.medusa_max_batch = e.medusa_max_batch;
  e.prompt_lookup = prompt_lookup;
  info.prompt_lookup = prompt_lookup;
}

Engine::~Engine() = default;

const ModelInfo& Engine::info() const { return impl_->info; }


// A seed for a request that asked for a random one (GenerationConfig::seed -1).
static uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

// One generation's bookkeeping around its sequence: stop handling, streaming, cancellation,
// statistics. Shared by Session::generate and Engine::generate_batch.
class Generation {
 public:
  // index: the request's position in its batch (its seed is config.seed + index).
  Generation(Engine::Impl& e, SequenceState& s, const GenerationConfig& config, const TokenCallback* on_tokens,
             size_t index = 0)
      : e_(e), s_(s), stop_(config, e.cfg.eos_token_ids), on_tokens_(on_tokens) {
    // medusa_max_batch 0: no step ever verifies a tree, so the heads would run for nothing.
    s.options.medusa = config.medusa && e.heads != nullptr && e.medusa_max_batch > 0;
    s.options.acceptance = config.acceptance;
    s.options.posterior_threshold = config.posterior_threshold;
    s.options.posterior_alpha = config.posterior_alpha;
    s.options.sample = config.do_sample;
    s.options.sampling.temperature = config.temperature;
    s.options.sampling.top_k = config.top_k;
    s.options.sampling.top_p = config.top_p;
    s.options.sampling.seed = config.seed >= 0 ? static_cast<uint64_t>(config.seed) + index
                              : config.do_sample             ? random_seed()
                                                             : 0;
    s.options.lookup = config.prompt_lookup && config.medusa && e.prompt_lookup > 0;
    GenerationStats& st = result_.stats;
    st.medusa = s.options.medusa;
    st.accepted_per_head.assign(s.options.medusa ? e.heads->num_heads() : 0, 0);
    max_new_tokens_ = config.max_new_tokens;
    reuse_ = config.reuse_context;
  }

  // Prefills the prompt after its first `cached` tokens (which the sequence's cache holds
  // already: at most prompt.size() - 1), or after a longer start another slot's cache holds
  // (copied; with reuse_context), and takes the first token.
  void start(const std::vector<int32_t>& prompt, int cached = 0) {
    t0_ = Clock::now();
    fwd0_ = e_.decoder->forward_seconds();
    result_.stats.prompt_tokens = static_cast<int>(prompt.size());
    s_.length = cached;
    if (max_new_tokens_ == 0) {
      done_ = true;
      return;
    }
    {
      std::lock_guard<std::mutex> lock(e_.forward_mu);
      e_.unshare_from(s_, cached);
      if (reuse_) cached = s_.length = e_.take_shared_prefix(s_, prompt, cached);
      e_.decoder->append(s_, prompt.data() + cached, static_cast<int>(prompt.size()) - cached, s_.options.medusa,
                         nullptr, false);
      e_.share(s_, cached);
    }
    result_.stats.cached_prompt_tokens = cached;
    t_first_ = Clock::now();
    result_.stats.prefill_seconds = std::chrono::duration<double>(t_first_ - t0_).count();
    block_.assign(1, s_.root);
    consume();
  }

  // Takes the tokens of the step that just ran for the sequence.
  void after_step() {
    GenerationStats& st = result_.stats;
    ++st.steps;
    if (s_.tree_step) ++st.tree_steps;
    st.lookup_steps += s_.lookup_step;
    st.lookup_tokens += s_.lookup_accepted;
    for (int d = 0; d < s_.accepted && d < int(st.accepted_per_head.size()); ++d) ++st.accepted_per_head[d];
    block_ = s_.new_tokens;
    consume();
  }

  bool done() const { return done_; }

  GenerationResult finish() {
    GenerationStats& st = result_.stats;
    if (st.prompt_tokens > 0 && max_new_tokens_ > 0) {
      st.new_tokens = static_cast<int>(result_.tokens.size());
      st.total_seconds = seconds_since(t0_);
      st.decode_seconds = std::chrono::duration<double>(Clock::now() - t_first_).count();
      st.tokens_per_second = st.total_seconds > 0 ? st.new_tokens / st.total_seconds : 0;
      st.decode_tokens_per_second =
          (st.decode_seconds > 0 && st.new_tokens > 1) ? (st.new_tokens - 1) / st.decode_seconds : 0;
      st.tokens_per_step = st.steps > 0 ? double(stop_.produced() - 1) / st.steps : 0;
      // Forward time of this generation alone is exact only when it ran alone; with other
      // generations interleaved it is the engine's forward time over the same period.
      st.forward_seconds = e_.decoder->forward_seconds() - fwd0_;
      st.other_seconds = std::max(0.0, st.total_seconds - st.forward_seconds);
    }
    return std::move(result_);
  }

 private:
  void consume() {
    bool finished = stop_.append(block_.data(), static_cast<int>(block_.size()), result_.tokens);
    FinishReason reason = stop_.finish_reason();
    if (!finished && s_.length >= e_.info.max_seq_len) {
      finished = true;  // the cache is full: the pending token cannot be fed back
      reason = FinishReason::kLength;
    }
    const size_t ready = stop_.emittable(result_.tokens, finished);
    if (on_tokens_ && *on_tokens_ && ready > emitted_) {
      piece_.assign(result_.tokens.begin() + emitted_, result_.tokens.begin() + ready);
      emitted_ = ready;
      if (!(*on_tokens_)(piece_)) {
        result_.finish_reason = FinishReason::kCancelled;
        done_ = true;
        return;
      }
    }
    if (finished) {
      result_.finish_reason = reason;
      done_ = true;
    }
  }

  Engine::Impl& e_;
  SequenceState& s_;
  StopCriteria stop_;
  const TokenCallback* on_tokens_;
  GenerationResult result_;
  std::vector<int32_t> block_, piece_;
  size_t emitted_ = 0;
  int max_new_tokens_ = 0;
  bool reuse_ = true;  // GenerationConfig::reuse_context
  bool done_ = false;
  double fwd0_ = 0;
  Clock::time_point t0_, t_first_;
};

// Checks a request before any work: prompt, ids, options, capacity.
void validate_request(const Engine::Impl& e, const std::vector<int32_t>& prompt, const GenerationConfig& config) {
  if (prompt.empty()) throw InvalidArgumentError("the prompt is empty: give at least one token");
  if (config.max_new_tokens < 0) {
    throw InvalidArgumentError("max_new_tokens must be >= 0, got " + std::to_string(config.max_new_tokens));
  }
  // Checked whatever the acceptance mode: greedy ignores them, but a bad value is a caller's
  // mistake to report, not to drop silently. Temperature 0 is greedy's own (and only greedy's).
  if (!(config.posterior_threshold > 0.f && config.posterior_threshold <= 1.f)) {
    throw InvalidArgumentError("posterior_threshold must be in (0, 1], got " + std::to_string(config.posterior_threshold));
  }
  if (!(config.posterior_alpha > 0.f && config.posterior_alpha <= 1.f)) {
    throw InvalidArgumentError("posterior_alpha must be in (0, 1], got " + std::to_string(config.posterior_alpha));
  }
  if (!(config.temperature >= 0.f && std::isfinite(config.temperature))) {
    throw InvalidArgumentError("temperature must be a finite number >= 0, got " + std::to_string(config.temperature));
  }
  if (config.acceptance == Acceptance::kTypical && !(config.temperature > 0.f)) {
    throw InvalidArgumentError("temperature must be > 0 for typical acceptance, got " + std::to_string(config.temperature));
  }
  if (config.top_k < 0 || config.top_k > e.info.vocab_size) {
    throw InvalidArgumentError("top_k must be in [0, vocab_size " + std::to_string(e.info.vocab_size) + "] (0: no cut), got " +
                               std::to_string(config.top_k));
  }
  if (!(config.top_p > 0.f && config.top_p <= 1.f)) {
    throw InvalidArgumentError("top_p must be in (0, 1], got " + std::to_string(config.top_p));
  }
  if (config.seed < -1) throw InvalidArgumentError("seed must be >= 0, or -1 for a random seed, got " + std::to_string(config.seed));
  if (config.do_sample) {
    if (!(config.temperature > 0.f)) {
      throw InvalidArgumentError("do_sample needs temperature > 0 (temperature 0 is greedy decoding: do_sample false)");
    }
    if (config.acceptance != Acceptance::kGreedy) {
      throw InvalidArgumentError("do_sample needs greedy acceptance (a draft token accepted when it equals the token "
                                 "drawn at its position); typical acceptance picks its own tokens");
    }
  }
  e.validate_tokens(prompt, "prompt");
  e.validate_tokens(config.stop_token_ids, "stop");
  for (const auto& seq : config.stop_sequences) e.validate_tokens(seq, "stop sequence");
  const int max_seq = e.info.max_seq_len;
  if (prompt.size() >= size_t(max_seq)) {
    throw CapacityError("the prompt has " + std::to_string(prompt.size()) + " tokens but the engine's max_seq_len is " +
                        std::to_string(max_seq) + ": at most " + std::to_string(max_seq - 1) +
                        " prompt tokens leave room for a new token");
  }
}

struct Session::State {
  Engine::Impl* engine = nullptr;
  SequenceState seq;
  std::mutex mu;        // guards busy and closed
  bool busy = false;    // a call runs (a session serves one call at a time)
  bool closed = false;  // close() was called: no new calls; the slot goes back when no call runs

  // Held for the length of a call; the call that was running when close() came releases the slot.
  class Claim {
   public:
    explicit Claim(State& st) : st_(st) {}
    Claim(const Claim&) = delete;
    Claim& operator=(const Claim&) = delete;
    ~Claim() {
      std::lock_guard<std::mutex> lock(st_.mu);
      st_.busy = false;
      if (st_.closed) st_.release();
    }

   private:
    State& st_;
  };

  Claim claim() {
    std::lock_guard<std::mutex> lock(mu);
    if (closed) throw InvalidArgumentError("this session is closed");
    if (busy) {
      throw InvalidArgumentError("this session is already generating (from another thread or from its own "
                                 "stream callback); use one session per concurrent request");
    }
    busy = true;
    return Claim(*this);
  }
  void release() {
    if (engine && seq.slot >= 0) engine->release_slot(seq);
    engine = nullptr;
  }
  ~State() { release(); }
};

Session Engine::session(double wait_seconds, const std::vector<int32_t>& prompt) {
  if (!(wait_seconds >= 0)) throw InvalidArgumentError("wait_seconds must be >= 0");
  auto st = std::make_unique<Session::State>();
  if (impl_->acquire_slot(st->seq, wait_seconds, prompt.empty() ? nullptr : &prompt) >= 0) {
    st->engine = impl_.get();
    return Session(std::move(st));
  }
  throw CapacityError("all " + std::to_string(impl_->slot_used.size()) +
                      " sequence slots of this engine are in use (max_batch_size)" +
                      (wait_seconds > 0 ? " and none came free within " + std::to_string(wait_seconds) + " s" : "") +
                      "; close a session first, or wait for one");
}

Session::Session(std::unique_ptr<State> state) : state_(std::move(state)) {}
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;
Session::~Session() = default;

Session::State& Session::live() const {
  if (!state_) throw InvalidArgumentError("this Session was moved from");
  return *state_;
}

void Session::close() {
  if (!state_) return;
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->closed = true;
  if (!state_->busy) state_->release();  // else the running call releases the slot as it returns
}

void Session::reset() {
  auto claim = live().claim();
  state_->seq.length = 0;
}

int Session::context_length() const {
  State& st = live();
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.closed) throw InvalidArgumentError("this session is closed");
  return st.seq.length;
}

namespace {
// Validates tokens for an append to s (non-empty, in range, room left in the cache).
void check_append(const Engine::Impl& e, const SequenceState& s, const std::vector<int32_t>& tokens, const char* what) {
  if (tokens.empty()) throw InvalidArgumentError(std::string(what) + "() needs at least one token");
  e.validate_tokens(tokens, "input");
  const int max_seq = e.info.max_seq_len;
  if (s.length + tokens.size() > size_t(max_seq)) {
    throw CapacityError("context would hold " + std::to_string(s.length + tokens.size()) +
                        " tokens but the engine's max_seq_len is " + std::to_string(max_seq));
  }
}
}  // namespace

std::vector<float> Session::forward(const std::vector<int32_t>& tokens, bool all_logits) {
  return append(tokens, all_logits ? Output::kAllLogits : Output::kLastLogits);
}

std::vector<float> Session::hidden_states(const std::vector<int32_t>& tokens) {
  return append(tokens, Output::kHidden);
}

std::vector<float> Session::hidden_states(const std::vector<int32_t>& tokens, const std::vector<int>& layers) {
  return append(tokens, Output::kHidden, &layers);
}

std::vector<float> Session::append(const std::vector<int32_t>& tokens, Output what, const std::vector<int>* layers) {
  auto claim = live().claim();
  Engine::Impl& e = *state_->engine;
  SequenceState& s = state_->seq;
  check_append(e, s, tokens, what == Output::kHidden ? "hidden_states" : "forward");
  std::vector<float> out;
  std::lock_guard<std::mutex> lock(e.forward_mu);
  e.unshare_from(s, s.length);
  const int n = static_cast<int>(tokens.size());
  if (what == Output::kHidden) {
    // The model's layer taps are the heads' (feature layers) between calls: these layers for this
    // call only (set_taps checks them before anything runs).
    struct Taps {
      LlamaModel& m;
      std::vector<int> saved;
      Taps(LlamaModel& model, const std::vector<int>& layers) : m(model), saved(model.taps_layers()) {
        m.set_taps(layers);
      }
      ~Taps() { m.set_taps(saved); }
    } taps(*e.model, layers ? *layers : std::vector<int>{});
    e.decoder->append(s, tokens.data(), n, false, nullptr, false, &out);
  } else {
    e.decoder->append(s, tokens.data(), n, false, &out, what == Output::kAllLogits);
  }
  e.share(s);
  return out;
}

GenerationResult Session::generate(const std::vector<int32_t>& prompt, const GenerationConfig& config,
                                   const TokenCallback& on_tokens) {
  auto claim = live().claim();
  Engine::Impl& e = *state_->engine;
  validate_request(e, prompt, config);
  SequenceState& s = state_->seq;
  const int cached = cached_prompt(s, prompt, config.reuse_context);
  struct Active {  // this session counts as generating while it steps (the leader waits for it)
    Engine::Impl& e;
    explicit Active(Engine::Impl& impl) : e(impl) {
      std::lock_guard<std::mutex> lk(e.sched_mu);
      ++e.generating;
    }
    ~Active() {
      std::lock_guard<std::mutex> lk(e.sched_mu);
      --e.generating;
      e.sched_cv.notify_all();
    }
  };
  Generation g(e, s, config, &on_tokens);
  try {
    g.start(prompt, cached);
    if (!g.done()) {
      Active active(e);
      while (!g.done()) {
        e.step_shared(&s);
        g.after_step();
      }
    }
  } catch (...) {
    s.length = 0;  // a cache not known to be whole: the next request starts afresh
    s.history.clear();
    throw;
  }
  return g.finish();
}

std::vector<GenerationResult> Engine::generate_batch(const std::vector<std::vector<int32_t>>& prompts,
                                                     const GenerationConfig& config, const BatchCallback& on_tokens) {
  Impl& e = *impl_;
  for (size_t i = 0; i < prompts.size(); ++i) {
    try {
      validate_request(e, prompts[i], config);
    } catch (const Error& err) {
      // Same class, with the request named.
      const std::string msg = "request " + std::to_string(i) + ": " + err.what();
      if (dynamic_cast<const CapacityError*>(&err)) throw CapacityError(msg);
      throw InvalidArgumentError(msg);
    }
  }
  const size_t n = prompts.size();
  std::vector<GenerationResult> results(n);
  std::vector<std::unique_ptr<SequenceState>> seqs(n);
  std::vector<std::unique_ptr<Generation>> gens(n);
  std::vector<TokenCallback> callbacks(n);
  std::vector<size_t> active;  // request indices holding a slot
  size_t next = 0;
  auto release = [&](size_t i) {
    results[i] = gens[i]->finish();
    e.release_slot(*seqs[i]);
  };
  try {
    while (next < n || !active.empty()) {
      // Admit waiting requests into free slots (continuous admission between steps).
      while (next < n) {
        auto seq = std::make_unique<SequenceState>();
        if (e.acquire_slot(*seq, 0, &prompts[next]) < 0) break;
        const size_t i = next++;
        seqs[i] = std::move(seq);
        if (on_tokens) callbacks[i] = [&on_tokens, i](const std::vector<int32_t>& t) { return on_tokens(i, t); };
        gens[i] = std::make_unique<Generation>(e, *seqs[i], config, &callbacks[i], i);
        active.push_back(i);  // from here a failure releases its slot
        gens[i]->start(prompts[i], cached_prompt(*seqs[i], prompts[i], config.reuse_context));
        if (gens[i]->done()) {
          active.pop_back();
          release(i);
        }
      }
      if (active.empty()) {
        if (next < n) {
          throw CapacityError("generate_batch needs a free sequence slot but all " +
                              std::to_string(e.slot_used.size()) + " are held by sessions");
        }
        break;
      }
      std::vector<SequenceState*> batch;
      for (size_t i : active) batch.push_back(seqs[i].get());
      e.step_batch(batch.data(), static_cast<int>(batch.size()));
      std::vector<size_t> still;
      for (size_t i : active) {
        gens[i]->after_step();
        if (gens[i]->done()) release(i);
        else still.push_back(i);
      }
      active.swap(still);
    }
  } catch (...) {
    for (size_t i : active) e.release_slot(*seqs[i], false);
    throw;
  }
  return results;
}

}  // namespace medusa_rt

namespace medusa_rt {

struct EngineAccess {
  static Engine::Impl* impl(Engine& e) { return e.impl_.get(); }
};

struct SessionAccess {
  static Session::State& state(Session& s) { return *s.state_; }
};

namespace testing {

void set_oracle(Session& s, const std::vector<int32_t>& tokens, bool vary_rank) {
  SessionAccess::state(s).seq.oracle = tokens;
  SessionAccess::state(s).seq.oracle_vary_rank = vary_rank;
}

void set_record(Session& s, bool on) { SessionAccess::state(s).seq.record = on; }

std::vector<SequenceState::StepRecord> take_records(Session& s) {
  return std::move(SessionAccess::state(s).seq.records);
}

void read_kv(Session& s, int layer, int length, std::vector<float>& k, std::vector<float>& v) {
  auto& st = SessionAccess::state(s);
  Engine::Impl& e = *st.engine;
  if (layer < 0 || layer >= e.cfg.num_layers || length < 0 || length > e.info.max_seq_len) {
    throw InvalidArgumentError("read_kv: layer or length out of range");
  }
  std::lock_guard<std::mutex> lock(e.forward_mu);
  e.model->read_kv(st.seq.slot, layer, length, k, v);
}

std::vector<int32_t> draft_vocab(Engine& engine) {
  const Engine::Impl& e = *EngineAccess::impl(engine);
  return e.heads ? e.heads->draft_vocab() : std::vector<int32_t>();
}

std::vector<double> time_tree_step(Engine& engine, int nodes, int reps, int context) {
  Engine::Impl& e = *EngineAccess::impl(engine);
  const TreeSpec& tree = e.decoder->tree();
  if (nodes < 1 || nodes > tree.num_nodes()) {
    throw InvalidArgumentError("time_tree_step: nodes must be in 1.." + std::to_string(tree.num_nodes()) +
                               " (the engine's tree)");
  }
  if (context < 0 || context + nodes > e.model->limits().max_seq) {
    throw InvalidArgumentError("time_tree_step: context + nodes must be within max_seq_len (" +
                               std::to_string(e.model->limits().max_seq) + ")");
  }
  std::lock_guard<std::mutex> lock(e.forward_mu);
  std::lock_guard<std::mutex> slots(e.slot_mu);  // no slot is taken meanwhile
  for (bool used : e.slot_used) {
    if (used) throw InvalidArgumentError("time_tree_step needs an idle engine (it writes slot 0's cache)");
  }
  e.set_offer(0, {});
  const TreeSpec t = tree.truncated(nodes);
  const double forward = e.decoder->time_forward(1, t, nodes, reps, context);
  if (nodes == 1) return {forward, 0.0};
  const HeadsPlan plan = e.heads->plan(t);
  return {forward, e.decoder->time_heads(1, reps, &plan)};
}

double stream_bandwidth(size_t bytes, int threads, int reps) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const size_t n = std::max<size_t>(bytes / sizeof(uint64_t), 1 << 20) / (64 * threads) * (64 * threads);
  // The weights' kind of memory (huge-page slabs where the system has them), written once: the
  // pages exist before timing. mem frees it.
  cpu::HostMemory mem;
  uint64_t* buf = static_cast<uint64_t*>(mem.allocate(n * sizeof(uint64_t)));
  if (!buf) throw CapacityError("stream_bandwidth: out of memory for a " + std::to_string(n >> 17) + " MiB buffer");
  std::fill(buf, buf + n, uint64_t(1));
  std::vector<uint64_t> sums(threads);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t chunk = n / threads;
        sums[t] = cpu::kernels().stream_read(buf + chunk * t, chunk * sizeof(uint64_t));
      });
    }
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (sums[0] == 42) return 0;  // keeps the sums observable
  return double(n) * sizeof(uint64_t) / best;
}

double fma_peak(int threads, int reps) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  constexpr int64_t kIters = 10'000'000;  // 1.92 GFLOP per thread: tens of ms at tens of GFLOP/s
  std::vector<float> sink(threads);
  double best = 1e30;
  for (int r = 0; r < std::max(1, reps); ++r) {
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[t] = cpu::kernels().fma_burn(kIters); });
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (sink[0] == 42.f) return 0;  // keeps the chains observable
  return 192.0 * double(kIters) * threads / best;
}

int thread_pool_check(int threads, int jobs, int max_tasks) {
  ThreadPool pool(threads);
  std::vector<std::atomic<int>> runs(std::max(1, max_tasks));
  int wrong = 0;
  for (int j = 0; j < jobs; ++j) {
    const int n = 1 + j % std::max(1, max_tasks);  // jobs of 1 .. max_tasks tasks, back to back
    for (int t = 0; t < n; ++t) runs[t].store(0);
    pool.parallel_for(n, [&](int t) { runs[t].fetch_add(1); });
    for (int t = 0; t < n; ++t) wrong += runs[t].load() != 1;
  }
  return wrong;
}

}  // namespace testing
}  // namespace medusa_rt
