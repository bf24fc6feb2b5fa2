// medusa_rt — the inference engine's public C++ API.
//
// An Engine loads a model directory in the runtime format (see docs/FORMAT.md), reserves
// everything it needs up front (weights, a KV cache for max_batch_size sequences of
// max_seq_len tokens, workspaces) and then generates without allocating in the decode loop.
// A Session holds one sequence slot of the engine. The API works on token ids; tokenization
// lives with the caller (the Python package provides it).
//
// Thread safety: an Engine may be shared by several threads, each with its own Session.
// Calls on different sessions are serialized inside the engine (one forward at a time).
// A Session serves one call at a time: a second concurrent call on the same session (another
// thread, or its own stream callback) throws InvalidArgumentError instead of corrupting it.
//
// Errors: every function reports failures by throwing one of the classes in errors.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "medusa_rt/errors.h"
#include "medusa_rt/tree.h"
#include "medusa_rt/version.h"

namespace medusa_rt {

/// Options fixed at engine creation.
struct EngineOptions {
  /// Where the model runs: "cpu", or "cuda" / "cuda:N" (GPU N; builds with the CUDA backend
  /// only, see cuda_device_count()).
  std::string device = "cpu";
  /// Weight precision in memory: "fp32", "bf16" or "fp16" ("bf16" or "fp16" on CUDA), or
  /// "int8" (CPU only): weight-only int8, quantized at load, symmetric with one scale per
  /// output feature and 32 inputs; about half the bytes of bf16, so decoding, which reads every
  /// weight per step, is faster; the outputs differ slightly from bf16's (greedy Medusa stays
  /// identical to greedy plain decoding in int8). Arithmetic and activations are fp32 (on CUDA
  /// the GEMM inputs are rounded to the weight type, with fp32 accumulation).
  std::string dtype = "bf16";
  /// Inputs of the matrix products with bf16 weights on the CPU: "fp32" (exact), or "bf16":
  /// rounded to bf16 and multiplied with the CPU's AVX512-BF16 dot product, twice the
  /// multiply-adds per instruction (prefill about 2x, batches 1.4x, decoding 1.1x on a Zen 4).
  /// Outputs change slightly, as on CUDA, which always rounds; Medusa stays lossless against
  /// plain decoding. "bf16" needs dtype "bf16" and a CPU with AVX512-BF16 (InvalidArgumentError
  /// otherwise). "auto": "bf16" where both hold, else "fp32" (ModelInfo::matmul_inputs says which).
  std::string matmul_inputs = "auto";
  /// KV cache precision: "fp32", or "bf16" (CPU only): keys and values are rounded to bf16 when
  /// stored, which halves the cache's memory and the bytes attention reads (long contexts, many
  /// sequences). Medusa stays lossless against plain decoding with the same cache.
  std::string kv_dtype = "fp32";
  /// Number of sequence slots (sessions that can exist at once).
  int max_batch_size = 1;
  /// Tokens per sequence (prompt + generated). 0 = min(model's max_position_embeddings, 4096).
  int max_seq_len = 0;
  /// Worker threads for the CPU backend. 0 = one per available core.
  int num_threads = 0;
  /// Rows processed per forward during prefill (bounds the activation workspace).
  int prefill_chunk = 128;

  /// Medusa heads file (runtime format, see docs/FORMAT.md). Empty: use
  /// <model_dir>/medusa_heads.safetensors if it exists, else run without heads.
  std::string medusa_heads;
  /// Medusa tree: a built-in name (see TreeSpec::named), "default": the heads file's own
  /// default_tree, or "auto": the tree sized to this
  /// machine (needs heads with an accuracy table): for trees fitted to the heads' accuracies
  /// (fit_tree_paths) of 2 .. auto_tree_max_nodes nodes, each also limited to every smaller
  /// depth, the engine times a verify step (forward, then the heads) and keeps the cheapest step
  /// among the trees predicted within 3% of the most tokens per second
  /// (ModelInfo::calibration, calibration_choice).
  /// Empty: "auto" when the heads have an accuracy table, else their default tree, else
  /// "mc_sim_7b_63" cut to the number of heads. Ignored without heads.
  std::string tree;
  /// Largest tree "auto" considers (nodes, root included). The calibration stops timing larger
  /// trees once none can win, so a machine where rows cost much (a CPU) pays little for it.
  int auto_tree_max_nodes = 128;
  /// Tree as explicit paths; overrides `tree` when non-empty.
  std::vector<std::vector<int>> tree_paths;
  /// Candidates kept per head; every rank in the tree must be below it.
  int medusa_top_k = 10;
  /// Precision of the heads' weights in memory: "fp32", "bf16", "fp16" or "int8" ("bf16" or
  /// "fp16" on CUDA). Empty: the model's dtype, except "bf16" for an fp32 or int8 model on the
  /// CPU. The heads only
  /// draft (the base model verifies every token), so this changes speed, not the output.
  std::string medusa_heads_dtype;
  /// Draft tokens the heads rank: N > 0 keeps the N most frequent of the heads file's draft
  /// vocabulary by its token counts (all of it when N is at least its size; InvalidArgumentError
  /// when the file has no draft vocabulary, or for N below its size without counts or below
  /// medusa_top_k); 0: all of it; -1: the device's default, 6144 on the CPU where the file has
  /// counts (each heads level then reads fewer rows of the vocabulary projection) and all on
  /// CUDA. Drafts only: this changes speed and tokens per step, not the output.
  int medusa_draft_vocab = -1;
  /// Speculation policy: a decode step of more sequences than this verifies no trees (each
  /// sequence decodes one token; a big batch is already compute-bound). 0 = never verify trees.
  /// -1 = measure it at engine creation: the largest batch for which a tree step costs at most
  /// `medusa_expected_tokens_per_step` plain steps on this machine (see ModelInfo).
  int medusa_max_batch = -1;
  /// The tokens per step the heads are expected to reach, for the measurement above. 0 = with
  /// the "auto" tree, its prediction (TreeCalibration::expected_tokens_per_step); otherwise the
  /// heads file's "expected_tokens_per_step" metadata if it has one, else 2.0.
  double medusa_expected_tokens_per_step = 0;
  /// Prompt lookup: the longest chain of tokens looked up in the context that a step verifies
  /// (0: off; at most 64; -1: the device's default, 4 on the CPU and 0 on CUDA, where it has not
  /// been measured). When the context's last 2-4 tokens occurred earlier in it, the tokens that
  /// followed there are verified as a chain under the pending token, in place of the tree's
  /// last nodes (a step then carries as many rows as without, at least 1 + the chain): lossless
  /// like every draft, and it pays where the output repeats its context (rewriting, summaries,
  /// code edits, lists). In steps of at most max(1, medusa_max_batch) sequences.
  int prompt_lookup = -1;
};

/// One tree measured by the "auto" tree calibration.
struct TreeCalibration {
  int nodes = 0;                          ///< tree nodes, root included
  int depth = 0;                          ///< tree depth (heads' levels drafted per step)
  double expected_tokens_per_step = 0;    ///< predicted from the heads' accuracy table: 1 (the bonus
                                          ///< token) + 0.8 x the speculative tokens it predicts
  double step_seconds = 0;                ///< measured: verify forward + heads, batch 1
  double heads_seconds = 0;               ///< the heads' share of step_seconds
  double tokens_per_second = 0;           ///< expected_tokens_per_step / step_seconds
};

/// Static facts about the loaded model and engine.
struct ModelInfo {
  std::string architecture;   ///< "llama", "mistral" or "qwen2"
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_seq_len = 0;        ///< the engine's limit (after defaults)
  int max_batch_size = 0;
  std::string dtype;          ///< weight dtype in memory
  std::string device;         ///< the device in words, e.g. "cpu (2 threads, avx2)"
  std::string isa;            ///< kernel set in use: "avx512", "avx2" or "generic" on the CPU, "sm_90" ... on CUDA
  int num_threads = 0;
  std::vector<int32_t> eos_token_ids;
  int32_t bos_token_id = -1;  ///< -1 if the model has none
  std::size_t weight_bytes = 0;    ///< bytes of weights held by the engine (heads included)
  std::size_t kv_cache_bytes = 0;  ///< bytes of the KV cache
  std::string kv_dtype;            ///< the KV cache's precision, "fp32" or "bf16"
  std::string matmul_inputs;       ///< "fp32" or "bf16": EngineOptions::matmul_inputs resolved
  int medusa_heads = 0;            ///< 0 when the engine has no Medusa heads
  bool medusa_shared_lm_head = false;
  std::string medusa_heads_dtype;  ///< precision of the heads' weights ("" without heads)
  int medusa_draft_vocab = 0;      ///< tokens the heads rank (0: the whole vocabulary, or no heads)
  std::string tree;                ///< name of the tree in use ("root" without heads)
  int medusa_max_batch = 0;        ///< batch size up to which steps verify trees (measured or given)
  int tree_nodes = 1;              ///< nodes of that tree, root included
  int prompt_lookup = 0;           ///< the chain length in use (EngineOptions::prompt_lookup resolved)
  /// With tree "auto": the trees measured (by size, then depth, in increasing size; the search
  /// stops once no larger tree can win) and the plain decode step they were compared with.
  std::vector<TreeCalibration> calibration;
  /// The entry of `calibration` in use: the least step_seconds among those predicted within 3% of
  /// the best tokens_per_second (a tie goes to the cheaper step); -1 without "auto".
  int calibration_choice = -1;
  double plain_step_seconds = 0;
};

/// How speculative tokens are accepted.
enum class Acceptance {
  /// exact match with the base model's own token at the position (its argmax, or with
  /// GenerationConfig::do_sample the token drawn there): output identical to plain decoding
  kGreedy,
  kTypical,  ///< Medusa's typical acceptance (not lossless)
};

/// How one generation is run.
struct GenerationConfig {
  /// Maximum number of new tokens (>= 0). Generation stops earlier at a stop token.
  int max_new_tokens = 128;
  /// Token ids that end generation (in addition to the model's EOS ids unless ignore_eos).
  /// The stop token itself is not part of the result.
  std::vector<int32_t> stop_token_ids;
  /// Token sequences that end generation when the generated tokens end with one of them.
  /// The matched sequence is removed from the result. (Matched on tokens: the Python API also
  /// matches stop strings on the decoded text, which the same text reaches as other tokens.)
  std::vector<std::vector<int32_t>> stop_sequences;
  /// Do not stop at the model's EOS tokens.
  bool ignore_eos = false;
  /// Use Medusa tree decoding when the engine has heads and its medusa_max_batch is not 0
  /// (trees measured not to pay on this machine); false = plain decoding (no prompt lookup
  /// either: nothing speculative).
  bool medusa = true;
  Acceptance acceptance = Acceptance::kGreedy;
  /// Typical acceptance: accept when p > min(posterior_threshold, posterior_alpha * exp(-entropy)),
  /// p from softmax(logits / temperature). Greedy acceptance does not use them, but they are
  /// checked in every mode: thresholds in (0, 1], temperature finite and >= 0 (> 0 for typical).
  float posterior_threshold = 0.09f;
  float posterior_alpha = 0.3f;
  float temperature = 1.0f;
  /// Sampling: the base model's token at each position is drawn from softmax(logits /
  /// temperature) truncated to the top_k most likely tokens and then to the smallest set of the
  /// most likely ones whose probability reaches top_p, instead of taken as the argmax. Each
  /// position's draw is fixed by (seed, position), and a Medusa draft token is accepted when it
  /// equals the token drawn at its position (lossless: greedy acceptance only), so a request
  /// gives the same tokens with or without Medusa and prompt lookup. Needs temperature > 0.
  bool do_sample = false;
  int top_k = 0;        ///< 0: no cut; else in [1, vocab_size]
  float top_p = 1.0f;   ///< in (0, 1]; 1: no cut
  /// Seed of the draws (>= 0), or -1: a random seed per request. Engine::generate_batch gives
  /// request i the seed seed + i. Checked in every mode, like the typical parameters.
  int64_t seed = -1;
  /// Use the engine's prompt lookup (EngineOptions::prompt_lookup) for this request (unless
  /// medusa is false).
  bool prompt_lookup = true;
  /// Keep the longest start of the prompt that the sequence slot's cache already holds (the
  /// previous request's prompt and answer, or what forward() appended, in this session or the
  /// last one that held the slot) and prefill only the rest; a multi-turn chat then prefills
  /// just the new turn. Where another slot's cache holds a longer start (a prompt another
  /// session prefilled, still generating or done; a shared system prompt), its entries are
  /// copied instead of computed. Cached and copied entries are bit for bit what a prefill of the
  /// same tokens writes, so the output is the same either way. false: prefill the whole prompt.
  bool reuse_context = true;
};

/// Why a generation ended.
enum class FinishReason {
  kStop,       ///< a stop token or stop sequence was generated
  kLength,     ///< max_new_tokens reached, or the sequence reached max_seq_len
  kCancelled,  ///< the stream callback asked to stop
};

/// Number of CUDA GPUs this build can use: 0 when it was built without the CUDA backend
/// (MEDUSA_RT_CUDA=OFF) or finds no GPU.
int cuda_device_count();

/// Returns "stop", "length" or "cancelled".
const char* to_string(FinishReason reason);
/// Returns "greedy" or "typical".
const char* to_string(Acceptance acceptance);

/// Statistics of one generation.
struct GenerationStats {
  int prompt_tokens = 0;
  /// Prompt tokens taken from the slot's cache, or copied from another slot's, instead of
  /// prefilled (reuse_context).
  int cached_prompt_tokens = 0;
  int new_tokens = 0;
  int steps = 0;                ///< decode steps (forwards after the prefill)
  bool medusa = false;          ///< whether Medusa decoding was on for this generation
  int tree_steps = 0;           ///< steps that verified a tree (the others ran plain: batch policy)
  /// Tokens committed per decode step, the bonus token included (1.0 for plain decoding).
  /// The first new token comes from the prefill and is not counted.
  double tokens_per_step = 0;
  /// accepted_per_head[d]: steps in which head d's candidate was accepted (d + 1 or more
  /// speculative tokens accepted).
  std::vector<int> accepted_per_head;
  int lookup_steps = 0;         ///< steps that verified tokens looked up in the context
  int lookup_tokens = 0;        ///< looked-up tokens accepted (included in tokens_per_step)
  double forward_seconds = 0;   ///< time in model and head forwards (prefill included)
  double other_seconds = 0;     ///< total_seconds - forward_seconds
  double prefill_seconds = 0;   ///< time of the prompt's forward (including the first token)
  double decode_seconds = 0;    ///< time after the first token
  double total_seconds = 0;
  /// new_tokens / total_seconds (0 if nothing was generated).
  double tokens_per_second = 0;
  /// (new_tokens - 1) / decode_seconds: decode speed without the prefill.
  double decode_tokens_per_second = 0;
};

/// Result of one generation.
struct GenerationResult {
  std::vector<int32_t> tokens;  ///< generated tokens (stop token/sequence removed)
  FinishReason finish_reason = FinishReason::kLength;
  GenerationStats stats;
};

/// Called with each block of newly committed tokens, in order, as they are decoded.
/// Return false to cancel the generation (finish reason kCancelled).
using TokenCallback = std::function<bool(const std::vector<int32_t>& new_tokens)>;
/// The same for a batch: index is the request's position in the batch.
using BatchCallback = std::function<bool(size_t index, const std::vector<int32_t>& new_tokens)>;

class Session;

/// The engine: weights, KV cache and workspaces of one model.
class Engine {
 public:
  /// Loads the model directory. Throws ModelNotFoundError, ModelFormatError,
  /// UnsupportedModelError, InvalidArgumentError (bad options) or CapacityError (memory).
  Engine(const std::string& model_dir, const EngineOptions& options = EngineOptions());
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelInfo& info() const;

  /// Acquires a free sequence slot, waiting up to wait_seconds for one to come free. Throws
  /// CapacityError if none does (all max_batch_size slots are held). The slot is released when
  /// the Session is destroyed. The Engine must outlive its sessions.
  /// A slot keeps its cache when let go: the session starts with an empty context, and its first
  /// request reuses what the cache holds like any later one (GenerationConfig::reuse_context).
  /// prompt (optional): the first request's prompt, so that the free slot whose cache shares the
  /// longest start with it is taken (a conversation's next turn finds its previous turns there).
  Session session(double wait_seconds = 0, const std::vector<int32_t>& prompt = {});

  /// Generates a continuation of every prompt, batched: the requests share decode steps (up to
  /// max_batch_size at once, in the slots no session holds), each with its own acceptance,
  /// stop handling and finish; waiting requests are prefilled and join between steps as slots
  /// free up. Results come in input order. on_tokens (if given) streams each request's tokens;
  /// returning false cancels that request only. Throws like Session::generate (naming the
  /// request), or CapacityError when sessions hold every slot. Each request takes the free slot
  /// whose cache shares the longest start with its prompt and prefills only the rest
  /// (config.reuse_context): a shared instruction or few-shot prefix is prefilled once, by the
  /// first request, and copied from its slot for the others.
  std::vector<GenerationResult> generate_batch(const std::vector<std::vector<int32_t>>& prompts,
                                               const GenerationConfig& config,
                                               const BatchCallback& on_tokens = BatchCallback());

  struct Impl;

 private:
  friend struct EngineAccess;  // internal test and benchmark hooks
  std::unique_ptr<Impl> impl_;
};

/// One sequence slot of an engine.
class Session {
 public:
  Session(Session&&) noexcept;
  Session& operator=(Session&&) noexcept;
  ~Session();

  /// Generates a continuation of prompt (token ids). The context becomes the prompt, prefilled
  /// after the start it shares with what the slot's cache holds (all of it without
  /// config.reuse_context). Afterwards it holds the prompt and the generated tokens but the last
  /// (which is not fed back until the next step; tokens past a stop may follow in it).
  /// With Medusa heads and config.medusa, each step verifies the engine's tree in one forward.
  /// Greedy acceptance gives exactly the tokens of plain greedy decoding.
  /// Throws InvalidArgumentError (empty prompt, token id out of range, negative max_new_tokens,
  /// bad acceptance parameters) or CapacityError (prompt longer than max_seq_len - 1).
  GenerationResult generate(const std::vector<int32_t>& prompt, const GenerationConfig& config,
                            const TokenCallback& on_tokens = TokenCallback());

  /// Clears the session's context.
  void reset();

  /// Lets the slot go now (what its cache holds stays for later sessions, as when the Session is
  /// destroyed). A call running on this session in another thread is not interrupted: the slot
  /// goes back when it returns. Afterwards every call but close() throws InvalidArgumentError.
  void close();

  /// Number of tokens in the session's context (the KV cache of its slot).
  int context_length() const;

  /// Appends tokens to the context, runs the model over them and returns logits
  /// (row-major, [rows, vocab]): of every appended token if all_logits, else of the last one.
  /// This is the scoring / debugging entry point: generate() uses the same forward.
  std::vector<float> forward(const std::vector<int32_t>& tokens, bool all_logits = false);

  /// Appends tokens to the context like forward() and returns the final normed hidden states of
  /// every appended token (row-major, [rows, hidden_size]): what Medusa heads read (training data).
  std::vector<float> hidden_states(const std::vector<int32_t>& tokens);
  /// The same, and each row also holds the residual stream after each of `layers` (at most 8
  /// distinct decoder layers L, 1 <= L < num_layers; transformers' hidden_states[L]), in order:
  /// [rows, 1 + layers.size(), hidden_size], the final hidden state first (what heads with
  /// feature layers read). A bad layer list throws InvalidArgumentError before anything is appended.
  std::vector<float> hidden_states(const std::vector<int32_t>& tokens, const std::vector<int>& layers);

 private:
  friend class Engine;
  friend struct SessionAccess;  // internal test hooks
  struct State;
  explicit Session(std::unique_ptr<State> state);
  State& live() const;  // the state, or InvalidArgumentError for a moved-from Session
  enum class Output { kLastLogits, kAllLogits, kHidden };
  std::vector<float> append(const std::vector<int32_t>& tokens, Output what,
                            const std::vector<int>* layers = nullptr);  // forward / hidden_states
  std::unique_ptr<State> state_;
};

}  // namespace medusa_rt
