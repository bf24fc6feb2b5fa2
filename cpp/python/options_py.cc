// Plain data classes of engine.h: options, configs, statistics, results, model info.
#include <pybind11/stl.h>

#include "python/bindings.h"
#include "medusa_rt/engine.h"
#include "medusa_rt/errors.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_options(py::module_& m) {
  py::class_<EngineOptions>(m, "EngineOptions")
      .def(py::init<>())
      .def_readwrite("device", &EngineOptions::device)
      .def_readwrite("dtype", &EngineOptions::dtype)
      .def_readwrite("max_batch_size", &EngineOptions::max_batch_size)
      .def_readwrite("max_seq_len", &EngineOptions::max_seq_len)
      .def_readwrite("num_threads", &EngineOptions::num_threads)
      .def_readwrite("prefill_chunk", &EngineOptions::prefill_chunk)
      .def_readwrite("medusa_heads", &EngineOptions::medusa_heads)
      .def_readwrite("tree", &EngineOptions::tree)
      .def_readwrite("tree_paths", &EngineOptions::tree_paths)
      .def_readwrite("medusa_top_k", &EngineOptions::medusa_top_k)
      .def_readwrite("medusa_heads_dtype", &EngineOptions::medusa_heads_dtype)
      .def_readwrite("medusa_draft_vocab", &EngineOptions::medusa_draft_vocab)
      .def_readwrite("kv_dtype", &EngineOptions::kv_dtype)
      .def_readwrite("matmul_inputs", &EngineOptions::matmul_inputs)
      .def_readwrite("auto_tree_max_nodes", &EngineOptions::auto_tree_max_nodes)
      .def_readwrite("medusa_max_batch", &EngineOptions::medusa_max_batch)
      .def_readwrite("medusa_expected_tokens_per_step", &EngineOptions::medusa_expected_tokens_per_step)
      .def_readwrite("prompt_lookup", &EngineOptions::prompt_lookup);

  py::class_<GenerationConfig>(m, "GenerationConfig")
      .def(py::init<>())
      .def_readwrite("max_new_tokens", &GenerationConfig::max_new_tokens)
      .def_readwrite("stop_token_ids", &GenerationConfig::stop_token_ids)
      .def_readwrite("stop_sequences", &GenerationConfig::stop_sequences)
      .def_readwrite("ignore_eos", &GenerationConfig::ignore_eos)
      .def_readwrite("medusa", &GenerationConfig::medusa)
      .def_property(
          "acceptance", [](const GenerationConfig& c) { return std::string(to_string(c.acceptance)); },
          [](GenerationConfig& c, const std::string& v) {
            if (v == "greedy") c.acceptance = Acceptance::kGreedy;
            else if (v == "typical") c.acceptance = Acceptance::kTypical;
            else throw InvalidArgumentError("acceptance must be \"greedy\" or \"typical\", got \"" + v + "\"");
          })
      .def_readwrite("posterior_threshold", &GenerationConfig::posterior_threshold)
      .def_readwrite("posterior_alpha", &GenerationConfig::posterior_alpha)
      .def_readwrite("temperature", &GenerationConfig::temperature)
      .def_readwrite("do_sample", &GenerationConfig::do_sample)
      .def_readwrite("top_k", &GenerationConfig::top_k)
      .def_readwrite("top_p", &GenerationConfig::top_p)
      .def_readwrite("seed", &GenerationConfig::seed)
      .def_readwrite("prompt_lookup", &GenerationConfig::prompt_lookup)
      .def_readwrite("reuse_context", &GenerationConfig::reuse_context);

  py::class_<GenerationStats>(m, "GenerationStats")
      .def_readonly("prompt_tokens", &GenerationStats::prompt_tokens)
      .def_readonly("cached_prompt_tokens", &GenerationStats::cached_prompt_tokens)
      .def_readonly("new_tokens", &GenerationStats::new_tokens)
      .def_readonly("steps", &GenerationStats::steps)
      .def_readonly("prefill_seconds", &GenerationStats::prefill_seconds)
      .def_readonly("decode_seconds", &GenerationStats::decode_seconds)
      .def_readonly("total_seconds", &GenerationStats::total_seconds)
      .def_readonly("tokens_per_second", &GenerationStats::tokens_per_second)
      .def_readonly("decode_tokens_per_second", &GenerationStats::decode_tokens_per_second)
      .def_readonly("medusa", &GenerationStats::medusa)
      .def_readonly("tree_steps", &GenerationStats::tree_steps)
      .def_readonly("tokens_per_step", &GenerationStats::tokens_per_step)
      .def_readonly("accepted_per_head", &GenerationStats::accepted_per_head)
      .def_readonly("lookup_steps", &GenerationStats::lookup_steps)
      .def_readonly("lookup_tokens", &GenerationStats::lookup_tokens)
      .def_readonly("forward_seconds", &GenerationStats::forward_seconds)
      .def_readonly("other_seconds", &GenerationStats::other_seconds);

  py::class_<GenerationResult>(m, "GenerationResult")
      .def_readonly("tokens", &GenerationResult::tokens)
      .def_property_readonly("finish_reason", [](const GenerationResult& r) { return std::string(to_string(r.finish_reason)); })
      .def_readonly("stats", &GenerationResult::stats);

  py::class_<TreeCalibration>(m, "TreeCalibration")
      .def_readonly("nodes", &TreeCalibration::nodes)
      .def_readonly("depth", &TreeCalibration::depth)
      .def_readonly("expected_tokens_per_step", &TreeCalibration::expected_tokens_per_step)
      .def_readonly("step_seconds", &TreeCalibration::step_seconds)
      .def_readonly("heads_seconds", &TreeCalibration::heads_seconds)
      .def_readonly("tokens_per_second", &TreeCalibration::tokens_per_second)
      .def("__repr__", [](const TreeCalibration& c) {
        return "TreeCalibration(nodes=" + std::to_string(c.nodes) + ", depth=" + std::to_string(c.depth) +
               ", expected_tokens_per_step=" +
               std::to_string(c.expected_tokens_per_step) + ", step_seconds=" + std::to_string(c.step_seconds) +
               ", heads_seconds=" + std::to_string(c.heads_seconds) + ")";
      });

  py::class_<ModelInfo>(m, "ModelInfo")
      .def_readonly("architecture", &ModelInfo::architecture)
      .def_readonly("vocab_size", &ModelInfo::vocab_size)
      .def_readonly("hidden_size", &ModelInfo::hidden_size)
      .def_readonly("num_layers", &ModelInfo::num_layers)
      .def_readonly("num_heads", &ModelInfo::num_heads)
      .def_readonly("num_kv_heads", &ModelInfo::num_kv_heads)
      .def_readonly("head_dim", &ModelInfo::head_dim)
      .def_readonly("max_seq_len", &ModelInfo::max_seq_len)
      .def_readonly("max_batch_size", &ModelInfo::max_batch_size)
      .def_readonly("dtype", &ModelInfo::dtype)
      .def_readonly("isa", &ModelInfo::isa)
      .def_readonly("device", &ModelInfo::device)
      .def_readonly("num_threads", &ModelInfo::num_threads)
      .def_readonly("eos_token_ids", &ModelInfo::eos_token_ids)
      .def_readonly("bos_token_id", &ModelInfo::bos_token_id)
      .def_readonly("weight_bytes", &ModelInfo::weight_bytes)
      .def_readonly("kv_cache_bytes", &ModelInfo::kv_cache_bytes)
      .def_readonly("medusa_heads", &ModelInfo::medusa_heads)
      .def_readonly("medusa_heads_dtype", &ModelInfo::medusa_heads_dtype)
      .def_readonly("medusa_draft_vocab", &ModelInfo::medusa_draft_vocab)
      .def_readonly("kv_dtype", &ModelInfo::kv_dtype)
      .def_readonly("matmul_inputs", &ModelInfo::matmul_inputs)
      .def_readonly("medusa_shared_lm_head", &ModelInfo::medusa_shared_lm_head)
      .def_readonly("tree", &ModelInfo::tree)
      .def_readonly("tree_nodes", &ModelInfo::tree_nodes)
      .def_readonly("medusa_max_batch", &ModelInfo::medusa_max_batch)
      .def_readonly("prompt_lookup", &ModelInfo::prompt_lookup)
      .def_readonly("calibration", &ModelInfo::calibration)
      .def_readonly("calibration_choice", &ModelInfo::calibration_choice)
      .def_readonly("plain_step_seconds", &ModelInfo::plain_step_seconds);
}

}  // namespace medusa_rt::python
