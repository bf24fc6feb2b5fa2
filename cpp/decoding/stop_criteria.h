// Stop handling shared by every decode mode: stop tokens, stop sequences, max_new_tokens,
// and the hold-back of tokens that may be the start of a stop sequence while streaming.
#pragma once

#include <cstdint>
#include <vector>

#include "medusa_rt/engine.h"

namespace medusa_rt {

class StopCriteria {
 public:
  // eos_ids are added to the stop tokens unless config.ignore_eos.
  StopCriteria(const GenerationConfig& config, const std::vector<int32_t>& eos_ids);

  // Appends a block of newly decoded tokens to `out`, in order, until a stop condition hits.
  // Returns true when generation is finished (finish_reason() tells why). Tokens after the
  // stop point are dropped; a stop token or a matched stop sequence is not kept.
  bool append(const int32_t* tokens, int n, std::vector<int32_t>& out);

  // Tokens of `out` that can be shown now: all of them once finished, otherwise all but a
  // tail that could still grow into a stop sequence.
  size_t emittable(const std::vector<int32_t>& out, bool finished) const;

  FinishReason finish_reason() const { return reason_; }
  // Tokens consumed by append() so far (a stop token included, tokens after it not).
  int produced() const { return produced_; }

 private:
  bool is_stop_token(int32_t t) const;

  int max_new_tokens_;
  std::vector<int32_t> stop_tokens_;
  std::vector<std::vector<int32_t>> stop_sequences_;
  int produced_ = 0;
  FinishReason reason_ = FinishReason::kLength;
};

}  // namespace medusa_rt
