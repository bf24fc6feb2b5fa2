// The runtime format's config.json (see docs/FORMAT.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace medusa_rt {

struct RopeConfig {
  enum class Type { kDefault, kLinear, kLlama3 };
  Type type = Type::kDefault;
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  int sliding_window = 0;  // 0 = none
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;
  DType weight_dtype = DType::kF32;
};

// Reads and validates <dir>/config.json. Throws ModelNotFoundError, ModelFormatError
// or UnsupportedModelError.
ModelConfig load_model_config(const std::string& dir);

}  // namespace medusa_rt
