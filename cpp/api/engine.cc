// Engine and Session: the public API over the model, the backend and the stop logic.
#include "medusa_rt/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <string>

#include "core/model_config.h"
#include "core/safetensors.h"
#include "core/thread_pool.h"
#include "decoding/decoder.h"
#include "decoding/stop_criteria.h"
#include "api/testing.h"
#include "model/backend.h"
#include "model/llama.h"
#include "model/medusa_heads.h"

namespace medusa_rt {

const char* version() { return MEDUSA_RT_VERSION_STRING; }
int version_number() { return MEDUSA_RT_VERSION_NUMBER; }

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

DType parse_engine_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return DType::kF32;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  if (s == "fp16" || s == "float16") return DType::kF16;
  throw InvalidArgumentError("dtype must be \"fp32\", \"bf16\" or \"fp16\", got \"" + s + "\"");
}

std::string mib(size_t b) { return std::to_string((b + (1 << 20) - 1) >> 20) + " MiB"; }

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
  std::vector<bool> slot_used;

  ~Impl() {
    decoder.reset();
    heads.reset();
    model.reset();
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
TreeSpec choose_tree(const EngineOptions& o, const MedusaHeadsMeta& heads) {
  const int num_heads = heads.num_heads;
  if (!o.tree_paths.empty()) return TreeSpec(o.tree_paths);
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
  if (options.medusa_top_k < 1 || options.medusa_top_k > c.vocab_size) {
    throw InvalidArgumentError("medusa_top_k must be in [1, vocab_size], got " + std::to_string(options.medusa_top_k));
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

  e.backend = make_cpu_backend(threads);
  const size_t heads_bytes = heads_file.empty() ? 0 : MappedFile(heads_file).size();
  ModelLimits lim;
  lim.slots = options.max_batch_size;
  lim.max_seq = max_seq;
  // Rows of one forward: a tree per sequence, or a prefill chunk.
  lim.max_rows = std::max(prefill_chunk, options.max_batch_size * tree.num_nodes());
  lim.max_logit_rows = lim.max_rows;
  lim.max_tree_depth = tree.max_depth();

  const size_t wbytes = LlamaModel::weight_bytes_for(c, dtype) + heads_bytes;
  const size_t kvbytes = LlamaModel::kv_bytes_for(c, lim);
  const size_t wsbytes = LlamaModel::workspace_bytes_for(c, lim);
  const size_t need = wbytes + kvbytes + wsbytes;
  const size_t avail = e.backend->available_memory();
  if (avail > 0 && need > avail) {
    throw CapacityError("not enough memory for this engine: it needs " + mib(need) + " (weights " + mib(wbytes) +
                        ", KV cache " + mib(kvbytes) + " for max_batch_size=" + std::to_string(lim.slots) +
                        " x max_seq_len=" + std::to_string(max_seq) + ", workspace " + mib(wsbytes) + ") but only " +
                        mib(avail) + " are available; lower max_seq_len or max_batch_size, or use dtype=\"bf16\"");
  }

  {
    TensorStore store(model_dir, "model");
    e.model = std::make_unique<LlamaModel>(c, store, dtype, lim, *e.backend);
  }  // the mapping is released once the weights are converted
  if (!heads_file.empty()) {
    e.heads = std::make_unique<MedusaHeads>(heads_file, c, dtype, options.max_batch_size, options.medusa_top_k,
                                            *e.backend, e.model->lm_head());
  }
  e.decoder = std::make_unique<Decoder>(*e.model, e.heads.get(), tree, options.max_batch_size);
  e.slot_used.assign(lim.slots, false);

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
  info.dtype = dtype == DType::kF32 ? "fp32" : dtype == DType::kBF16 ? "bf16" : "fp16";
  const std::string bname = e.backend->name();
  info.isa = bname.substr(bname.find('/') + 1);
  info.num_threads = e.backend->num_threads();
  info.eos_token_ids = c.eos_token_ids;
  info.bos_token_id = c.bos_token_id;
  info.weight_bytes = e.model->weight_bytes() + (e.heads ? e.heads->weight_bytes() : 0);
  info.kv_cache_bytes = e.model->kv_bytes();
  info.medusa_heads = e.heads ? e.heads->num_heads() : 0;
  info.medusa_shared_lm_head = e.heads && e.heads->shared_lm_head();
  info.tree = e.decoder->tree().name();
  info.tree_nodes = e.decoder->tree().num_nodes();
}

Engine::~Engine() = default;

const ModelInfo& Engine::info() const { return impl_->info; }

struct Session::State {
  Engine::Impl* engine = nullptr;
  SequenceState seq;
  std::mutex busy;  // a session serves one call at a time

  std::unique_lock<std::mutex> claim() {
    std::unique_lock<std::mutex> lock(busy, std::try_to_lock);
    if (!lock.owns_lock()) {
      throw InvalidArgumentError("this session is already generating (from another thread or from its own "
                                 "stream callback); use one session per concurrent request");
    }
    return lock;
  }
  ~State() {
    if (engine && seq.slot >= 0) {
      std::lock_guard<std::mutex> lock(engine->slot_mu);
      engine->slot_used[seq.slot] = false;
    }
  }
};

Session Engine::session() {
  std::lock_guard<std::mutex> lock(impl_->slot_mu);
  for (size_t i = 0; i < impl_->slot_used.size(); ++i) {
    if (!impl_->slot_used[i]) {
      impl_->slot_used[i] = true;
      auto st = std::make_unique<Session::State>();
      st->engine = impl_.get();
      st->seq.slot = static_cast<int>(i);
      return Session(std::move(st));
    }
  }
  throw CapacityError("all " + std::to_string(impl_->slot_used.size()) +
                      " sequence slots of this engine are in use (max_batch_size); close a session first");
}

Session::Session(std::unique_ptr<State> state) : state_(std::move(state)) {}
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;
Session::~Session() = default;

void Session::reset() {
  auto claim = state_->claim();
  state_->seq.length = 0;
}

int Session::context_length() const { return state_->seq.length; }

std::vector<float> Session::forward(const std::vector<int32_t>& tokens, bool all_logits) {
  auto claim = state_->claim();
  Engine::Impl& e = *state_->engine;
  if (tokens.empty()) throw InvalidArgumentError("forward() needs at least one token");
  e.validate_tokens(tokens, "input");
  const int max_seq = e.info.max_seq_len;
  SequenceState& s = state_->seq;
  if (s.length + tokens.size() > size_t(max_seq)) {
    throw CapacityError("context would hold " + std::to_string(s.length + tokens.size()) +
                        " tokens but the engine's max_seq_len is " + std::to_string(max_seq));
  }
  std::vector<float> out;
  std::lock_guard<std::mutex> lock(e.forward_mu);
  e.decoder->append(s, tokens.data(), static_cast<int>(tokens.size()), false, &out, all_logits);
  return out;
}

GenerationResult Session::generate(const std::vector<int32_t>& prompt, const GenerationConfig& config,
                                   const TokenCallback& on_tokens) {
  auto claim = state_->claim();
  Engine::Impl& e = *state_->engine;
  if (prompt.empty()) throw InvalidArgumentError("the prompt is empty: give at least one token");
  if (config.max_new_tokens < 0) {
    throw InvalidArgumentError("max_new_tokens must be >= 0, got " + std::to_string(config.max_new_tokens));
  }
  if (config.acceptance == Acceptance::kTypical) {
    if (!(config.posterior_threshold > 0.f && config.posterior_threshold <= 1.f)) {
      throw InvalidArgumentError("posterior_threshold must be in (0, 1], got " + std::to_string(config.posterior_threshold));
    }
    if (!(config.posterior_alpha > 0.f && config.posterior_alpha <= 1.f)) {
      throw InvalidArgumentError("posterior_alpha must be in (0, 1], got " + std::to_string(config.posterior_alpha));
    }
    if (!(config.temperature > 0.f && std::isfinite(config.temperature))) {
      throw InvalidArgumentError("temperature must be > 0 for typical acceptance, got " + std::to_string(config.temperature));
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

  SequenceState& s = state_->seq;
  const bool medusa = config.medusa && e.heads != nullptr;
  StepOptions opt;
  opt.medusa = medusa;
  opt.acceptance = config.acceptance;
  opt.posterior_threshold = config.posterior_threshold;
  opt.posterior_alpha = config.posterior_alpha;
  opt.temperature = config.temperature;

  GenerationResult result;
  GenerationStats& st = result.stats;
  st.prompt_tokens = static_cast<int>(prompt.size());
  st.medusa = medusa;
  st.accepted_per_head.assign(medusa ? e.heads->num_heads() : 0, 0);
  s.length = 0;
  if (config.max_new_tokens == 0) return result;

  StopCriteria stop(config, e.cfg.eos_token_ids);
  const double fwd0 = e.decoder->forward_seconds();
  const auto t0 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(e.forward_mu);
    e.decoder->append(s, prompt.data(), static_cast<int>(prompt.size()), medusa, nullptr, false);
  }
  const auto t_first = Clock::now();
  st.prefill_seconds = std::chrono::duration<double>(t_first - t0).count();

  std::vector<int32_t> block = {s.root};
  size_t emitted = 0;
  std::vector<int32_t> piece;
  SequenceState* seqs[1] = {&s};
  while (true) {
    bool finished = stop.append(block.data(), static_cast<int>(block.size()), result.tokens);
    FinishReason reason = stop.finish_reason();
    if (!finished && s.length >= max_seq) {
      finished = true;  // the cache is full: the pending token cannot be fed back
      reason = FinishReason::kLength;
    }
    const size_t ready = stop.emittable(result.tokens, finished);
    if (on_tokens && ready > emitted) {
      piece.assign(result.tokens.begin() + emitted, result.tokens.begin() + ready);
      emitted = ready;
      if (!on_tokens(piece)) {
        result.finish_reason = FinishReason::kCancelled;
        break;
      }
    }
    if (finished) {
      result.finish_reason = reason;
      break;
    }
    {
      std::lock_guard<std::mutex> lock(e.forward_mu);
      e.decoder->step(seqs, 1, opt);
    }
    ++st.steps;
    for (int d = 0; d < s.accepted && d < int(st.accepted_per_head.size()); ++d) ++st.accepted_per_head[d];
    block = s.new_tokens;
  }

  st.new_tokens = static_cast<int>(result.tokens.size());
  st.total_seconds = seconds_since(t0);
  st.decode_seconds = std::chrono::duration<double>(Clock::now() - t_first).count();
  st.tokens_per_second = st.total_seconds > 0 ? st.new_tokens / st.total_seconds : 0;
  st.decode_tokens_per_second =
      (st.decode_seconds > 0 && st.new_tokens > 1) ? (st.new_tokens - 1) / st.decode_seconds : 0;
  st.tokens_per_step = st.steps > 0 ? double(stop.produced() - 1) / st.steps : 0;
  st.forward_seconds = e.decoder->forward_seconds() - fwd0;
  st.other_seconds = std::max(0.0, st.total_seconds - st.forward_seconds);
  return result;
}

}  // namespace medusa_rt

namespace medusa_rt {

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

}  // namespace testing
}  // namespace medusa_rt
