// Engine and Session: the public API over the model, the backend and the stop logic.
#include "medusa_rt/engine.h"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <string>

#include "core/model_config.h"
#include "core/safetensors.h"
#include "core/thread_pool.h"
#include "decoding/stop_criteria.h"
#include "model/backend.h"
#include "model/llama.h"

namespace medusa_rt {

const char* version() { return MEDUSA_RT_VERSION_STRING; }

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
  int prefill_chunk = 0;

  std::mutex forward_mu;  // one forward at a time; guards rows, host_logits, argmax buffers
  ForwardRows rows;
  int32_t* d_argmax = nullptr;
  std::vector<int32_t> host_argmax;

  std::mutex slot_mu;
  std::vector<bool> slot_used;

  ~Impl() {
    model.reset();
    if (d_argmax) backend->deallocate(d_argmax);
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

  // Runs tokens[begin, end) of one slot through the model as causal rows starting at cache
  // position `start`. Must hold forward_mu. If want_all, logits of every row are copied into
  // all_logits (appended); the argmax of the last row is returned.
  int32_t run_causal(int slot, int start, const int32_t* tokens, int n, std::vector<float>* all_logits) {
    int32_t last = -1;
    for (int off = 0; off < n; off += prefill_chunk) {
      const int c = std::min(prefill_chunk, n - off);
      rows.clear();
      for (int i = 0; i < c; ++i) {
        const int pos = start + off + i;
        rows.tokens.push_back(tokens[off + i]);
        rows.positions.push_back(pos);
        rows.slots.push_back(slot);
        rows.cache_index.push_back(pos);
        rows.prefix_len.push_back(pos + 1);
        if (all_logits) rows.logit_rows.push_back(i);
      }
      const bool last_chunk = off + c == n;
      if (!all_logits && last_chunk) rows.logit_rows.push_back(c - 1);
      model->forward(rows);
      const int nl = static_cast<int>(rows.logit_rows.size());
      if (all_logits) {
        const size_t old = all_logits->size();
        all_logits->resize(old + size_t(nl) * cfg.vocab_size);
        backend->copy_to_host(all_logits->data() + old, model->logits(), size_t(nl) * cfg.vocab_size * sizeof(float));
      }
      if (last_chunk) {
        backend->argmax(model->logits() + size_t(nl - 1) * cfg.vocab_size, 1, cfg.vocab_size, d_argmax);
        backend->copy_to_host(&last, d_argmax, sizeof(int32_t));
      }
    }
    return last;
  }
};

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
  e.prefill_chunk = std::min(options.prefill_chunk, max_seq);

  ModelLimits lim;
  lim.slots = options.max_batch_size;
  lim.max_seq = max_seq;
  lim.max_rows = std::max(e.prefill_chunk, options.max_batch_size);
  lim.max_logit_rows = lim.max_rows;

  e.backend = make_cpu_backend(threads);
  const size_t wbytes = LlamaModel::weight_bytes_for(c, dtype);
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
  e.d_argmax = static_cast<int32_t*>(e.backend->allocate(sizeof(int32_t) * lim.max_logit_rows, "argmax output"));
  e.slot_used.assign(lim.slots, false);
  const size_t R = lim.max_rows;
  ForwardRows& r = e.rows;
  for (auto* v : {&r.tokens, &r.positions, &r.slots, &r.cache_index, &r.prefix_len, &r.logit_rows}) v->reserve(R);
  r.extra_offsets.reserve(R + 1);

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
  info.weight_bytes = e.model->weight_bytes();
  info.kv_cache_bytes = e.model->kv_bytes();
}

Engine::~Engine() = default;

const ModelInfo& Engine::info() const { return impl_->info; }

struct Session::State {
  Engine::Impl* engine = nullptr;
  int slot = -1;
  int length = 0;  // tokens in the slot's KV cache
  ~State() {
    if (engine && slot >= 0) {
      std::lock_guard<std::mutex> lock(engine->slot_mu);
      engine->slot_used[slot] = false;
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
      st->slot = static_cast<int>(i);
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

void Session::reset() { state_->length = 0; }

int Session::context_length() const { return state_->length; }

std::vector<float> Session::forward(const std::vector<int32_t>& tokens, bool all_logits) {
  Engine::Impl& e = *state_->engine;
  if (tokens.empty()) throw InvalidArgumentError("forward() needs at least one token");
  e.validate_tokens(tokens, "input");
  const int max_seq = e.info.max_seq_len;
  if (state_->length + tokens.size() > size_t(max_seq)) {
    throw CapacityError("context would hold " + std::to_string(state_->length + tokens.size()) +
                        " tokens but the engine's max_seq_len is " + std::to_string(max_seq));
  }
  std::vector<float> out;
  std::lock_guard<std::mutex> lock(e.forward_mu);
  if (all_logits) {
    e.run_causal(state_->slot, state_->length, tokens.data(), static_cast<int>(tokens.size()), &out);
  } else {
    e.run_causal(state_->slot, state_->length, tokens.data(), static_cast<int>(tokens.size()), nullptr);
    out.resize(e.cfg.vocab_size);
    e.backend->copy_to_host(out.data(), e.model->logits() + size_t(e.rows.logit_rows.size() - 1) * e.cfg.vocab_size,
                            out.size() * sizeof(float));
  }
  state_->length += static_cast<int>(tokens.size());
  return out;
}

GenerationResult Session::generate(const std::vector<int32_t>& prompt, const GenerationConfig& config,
                                   const TokenCallback& on_tokens) {
  Engine::Impl& e = *state_->engine;
  if (prompt.empty()) throw InvalidArgumentError("the prompt is empty: give at least one token");
  if (config.max_new_tokens < 0) {
    throw InvalidArgumentError("max_new_tokens must be >= 0, got " + std::to_string(config.max_new_tokens));
  }
  e.validate_tokens(prompt, "prompt");
  e.validate_tokens(config.stop_token_ids, "stop");
  for (const auto& s : config.stop_sequences) e.validate_tokens(s, "stop sequence");
  const int max_seq = e.info.max_seq_len;
  if (prompt.size() >= size_t(max_seq)) {
    throw CapacityError("the prompt has " + std::to_string(prompt.size()) + " tokens but the engine's max_seq_len is " +
                        std::to_string(max_seq) + ": at most " + std::to_string(max_seq - 1) +
                        " prompt tokens leave room for a new token");
  }

  GenerationResult result;
  result.stats.prompt_tokens = static_cast<int>(prompt.size());
  state_->length = 0;
  if (config.max_new_tokens == 0) return result;

  StopCriteria stop(config, e.cfg.eos_token_ids);
  const auto t0 = Clock::now();
  int32_t next;
  {
    std::lock_guard<std::mutex> lock(e.forward_mu);
    next = e.run_causal(state_->slot, 0, prompt.data(), static_cast<int>(prompt.size()), nullptr);
  }
  state_->length = static_cast<int>(prompt.size());
  const auto t_first = Clock::now();
  result.stats.prefill_seconds = std::chrono::duration<double>(t_first - t0).count();

  size_t emitted = 0;
  std::vector<int32_t> block;
  while (true) {
    bool finished = stop.append(&next, 1, result.tokens);
    FinishReason reason = stop.finish_reason();
    if (!finished && state_->length >= max_seq) {
      finished = true;  // the cache is full: the last token cannot be fed back
      reason = FinishReason::kLength;
    }
    const size_t ready = stop.emittable(result.tokens, finished);
    if (on_tokens && ready > emitted) {
      block.assign(result.tokens.begin() + emitted, result.tokens.begin() + ready);
      emitted = ready;
      if (!on_tokens(block)) {
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
      next = e.run_causal(state_->slot, state_->length, &next, 1, nullptr);
    }
    ++state_->length;
    ++result.stats.steps;
  }

  GenerationStats& s = result.stats;
  s.new_tokens = static_cast<int>(result.tokens.size());
  s.total_seconds = seconds_since(t0);
  s.decode_seconds = std::chrono::duration<double>(Clock::now() - t_first).count();
  s.tokens_per_second = s.total_seconds > 0 ? s.new_tokens / s.total_seconds : 0;
  s.decode_tokens_per_second = (s.decode_seconds > 0 && s.new_tokens > 1) ? (s.new_tokens - 1) / s.decode_seconds : 0;
  return result;
}

}  // namespace medusa_rt
