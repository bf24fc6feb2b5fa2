#include "decoding/stop_criteria.h"

#include <algorithm>

namespace medusa_rt {

StopCriteria::StopCriteria(const GenerationConfig& config, const std::vector<int32_t>& eos_ids)
    : max_new_tokens_(config.max_new_tokens), stop_tokens_(config.stop_token_ids) {
  if (!config.ignore_eos) stop_tokens_.insert(stop_tokens_.end(), eos_ids.begin(), eos_ids.end());
  for (const auto& s : config.stop_sequences) {
    if (s.size() == 1) stop_tokens_.push_back(s[0]);
    else if (!s.empty()) stop_sequences_.push_back(s);
  }
}

bool StopCriteria::is_stop_token(int32_t t) const {
  return std::find(stop_tokens_.begin(), stop_tokens_.end(), t) != stop_tokens_.end();
}

bool StopCriteria::append(const int32_t* tokens, int n, std::vector<int32_t>& out) {
  for (int i = 0; i < n; ++i) {
    ++produced_;
    if (is_stop_token(tokens[i])) {
      reason_ = FinishReason::kStop;
      return true;
    }
    out.push_back(tokens[i]);
    for (const auto& seq : stop_sequences_) {
      if (out.size() >= seq.size() && std::equal(seq.begin(), seq.end(), out.end() - seq.size())) {
        out.resize(out.size() - seq.size());
        reason_ = FinishReason::kStop;
        return true;
      }
    }
    if (produced_ >= max_new_tokens_) {
      reason_ = FinishReason::kLength;
      return true;
    }
  }
  return false;
}

size_t StopCriteria::emittable(const std::vector<int32_t>& out, bool finished) const {
  if (finished) return out.size();
  size_t hold = 0;
  for (const auto& seq : stop_sequences_) {
    // Longest proper prefix of seq that is a suffix of out.
    for (size_t len = std::min(seq.size() - 1, out.size()); len > hold; --len) {
      if (std::equal(seq.begin(), seq.begin() + len, out.end() - len)) {
        hold = len;
        break;
      }
    }
  }
  return out.size() - hold;
}

}  // namespace medusa_rt
