#include "core/model_config.h"

#include <algorithm>

#include "core/json.h"
#include "core/safetensors.h"
#include "medusa_rt/errors.h"
#include "medusa_rt/version.h"

namespace medusa_rt {
namespace {

class Reader {
 public:
  Reader(const json::Value& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  const json::Value* opt(const std::string& key) const {
    const json::Value* v = obj_.find(key);
    return (v && !v->is_null()) ? v : nullptr;
  }
  const json::Value& req(const std::string& key) const {
    const json::Value* v = opt(key);
    if (!v) throw ModelFormatError(where_ + ": missing required field '" + key + "'");
    return *v;
  }
  int positive_int(const std::string& key) const {
    const json::Value& v = req(key);
    if (!v.is_integer() || v.as_int() <= 0 || v.as_int() > (1 << 30)) {
      throw ModelFormatError(where_ + ": '" + key + "' must be a positive integer");
    }
    return static_cast<int>(v.as_int());
  }
  double positive_number(const std::string& key, double dflt, bool required) const {
    const json::Value* v = required ? &req(key) : opt(key);
    if (!v) return dflt;
    if (!v->is_number() || !(v->as_double() > 0)) throw ModelFormatError(where_ + ": '" + key + "' must be a positive number");
    return v->as_double();
  }
  bool boolean(const std::string& key, bool dflt) const {
    const json::Value* v = opt(key);
    if (!v) return dflt;
    if (!v->is_bool()) throw ModelFormatError(where_ + ": '" + key + "' must be true or false");
    return v->as_bool();
  }
  std::string string(const std::string& key) const {
    const json::Value& v = req(key);
    if (!v.is_string()) throw ModelFormatError(where_ + ": '" + key + "' must be a string");
    return v.as_string();
  }

 private:
  const json::Value& obj_;
  std::string where_;
};

}  // namespace

ModelConfig load_model_config(const std::string& dir) {
  if (!dir_exists(dir)) throw ModelNotFoundError("model directory not found: " + dir);
  const std::string path = dir + "/config.json";
  if (!file_exists(path)) {
    throw ModelNotFoundError("no config.json in " + dir + " (not a medusa_rt model directory; export one with `medusa-rt export`)");
  }
  json::Value root = json::parse(read_text_file(path), path);
  if (!root.is_object()) throw ModelFormatError(path + ": not a JSON object");
  Reader r(root, path);

  const json::Value* fmt = r.opt("format");
  if (!fmt || !fmt->is_string() || fmt->as_string() != "medusa_rt") {
    throw ModelFormatError(path + ": not a medusa_rt runtime config (\"format\": \"medusa_rt\" missing); "
                           "convert the checkpoint with `medusa-rt export`");
  }
  const json::Value& ver = r.req("format_version");
  if (!ver.is_integer() || ver.as_int() != MEDUSA_RT_FORMAT_VERSION) {
    throw UnsupportedModelError(path + ": format_version " + (ver.is_integer() ? std::to_string(ver.as_int()) : "?") +
                                " is not supported by this build (reads " + std::to_string(MEDUSA_RT_FORMAT_VERSION) + ")");
  }

  ModelConfig c;
  c.architecture = r.string("architecture");
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2") {
    throw UnsupportedModelError(path + ": unknown architecture '" + c.architecture +
                                "' (supported: llama, mistral, qwen2)");
  }
  c.hidden_size = r.positive_int("hidden_size");
  c.intermediate_size = r.positive_int("intermediate_size");
  c.num_layers = r.positive_int("num_hidden_layers");
  c.num_heads = r.positive_int("num_attention_heads");
  c.num_kv_heads = r.positive_int("num_key_value_heads");
  c.head_dim = r.opt("head_dim") ? r.positive_int("head_dim") : c.hidden_size / c.num_heads;
  c.vocab_size = r.positive_int("vocab_size");
  c.max_position_embeddings = r.positive_int("max_position_embeddings");
  c.rms_norm_eps = r.positive_number("rms_norm_eps", 1e-6, true);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.attention_bias = r.boolean("attention_bias", false);
  if (c.num_heads % c.num_kv_heads != 0) {
    throw ModelFormatError(path + ": num_attention_heads (" + std::to_string(c.num_heads) +
                           ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_kv_heads) + ")");
  }
  if (c.head_dim % 2 != 0) throw ModelFormatError(path + ": head_dim must be even for RoPE");
  if (const json::Value* sw = r.opt("sliding_window")) {
    if (!sw->is_integer() || sw->as_int() <= 0) throw ModelFormatError(path + ": 'sliding_window' must be a positive integer or null");
    c.sliding_window = static_cast<int>(std::min<int64_t>(sw->as_int(), 1 << 30));
  }

  const json::Value& rope = r.req("rope");
  if (!rope.is_object()) throw ModelFormatError(path + ": 'rope' must be an object");
  Reader rr(rope, path + " rope");
  c.rope.theta = rr.positive_number("theta", 10000.0, true);
  std::string rtype = rr.opt("type") ? rr.string("type") : "default";
  if (rtype == "default") {
    c.rope.type = RopeConfig::Type::kDefault;
  } else if (rtype == "linear") {
    c.rope.type = RopeConfig::Type::kLinear;
    c.rope.factor = rr.positive_number("factor", 1.0, true);
  } else if (rtype == "llama3") {
    c.rope.type = RopeConfig::Type::kLlama3;
    c.rope.factor = rr.positive_number("factor", 1.0, true);
    c.rope.low_freq_factor = rr.positive_number("low_freq_factor", 1.0, true);
    c.rope.high_freq_factor = rr.positive_number("high_freq_factor", 4.0, true);
    c.rope.original_max_position_embeddings = rr.positive_int("original_max_position_embeddings");
    if (c.rope.high_freq_factor <= c.rope.low_freq_factor) {
      throw ModelFormatError(path + ": llama3 rope needs high_freq_factor > low_freq_factor");
    }
  } else {
    throw UnsupportedModelError(path + ": rope type '" + rtype + "' is not supported (default, linear, llama3)");
  }

  if (const json::Value* b = r.opt("bos_token_id")) {
    if (!b->is_integer() || b->as_int() < 0 || b->as_int() >= c.vocab_size) throw ModelFormatError(path + ": bad bos_token_id");
    c.bos_token_id = static_cast<int32_t>(b->as_int());
  }
  if (const json::Value* e = r.opt("eos_token_ids")) {
    if (!e->is_array()) throw ModelFormatError(path + ": 'eos_token_ids' must be a list of token ids");
    for (const auto& t : e->as_array()) {
      if (!t.is_integer() || t.as_int() < 0 || t.as_int() >= c.vocab_size) throw ModelFormatError(path + ": bad id in eos_token_ids");
      c.eos_token_ids.push_back(static_cast<int32_t>(t.as_int()));
    }
  }
  std::string wd = r.opt("weight_dtype") ? r.string("weight_dtype") : "float32";
  if (wd == "float32") c.weight_dtype = DType::kF32;
  else if (wd == "bfloat16") c.weight_dtype = DType::kBF16;
  else if (wd == "float16") c.weight_dtype = DType::kF16;
  else throw ModelFormatError(path + ": unknown weight_dtype '" + wd + "'");
  return c;
}

}  // namespace medusa_rt
