// Sampling of the base model's token at a position (GenerationConfig::do_sample).
//
// A position's draw depends only on the logits there and on (seed, position): the uniform number
// it uses is a hash of both. So a sequence sampled through Medusa trees (a draft token accepted
// when it equals the token drawn at its position) is exactly the sequence plain sampled decoding
// gives with the same seed: the verify forward's logits are those of a plain step.
#pragma once

#include <cstdint>
#include <vector>

namespace medusa_rt {

struct SamplingParams {
  float temperature = 1.0f;  // > 0
  int top_k = 0;             // 0: no cut
  float top_p = 1.0f;        // in (0, 1]
  uint64_t seed = 0;
};

// Working memory of sample_token (sized once to the vocabulary: nothing allocated per draw).
struct SamplingScratch {
  std::vector<int32_t> ids;
  std::vector<float> weights;  // [vocab]
  void reserve(int vocab) {
    ids.reserve(vocab);
    weights.reserve(vocab);
  }
};

// The uniform number in [0, 1) of the token at `position` (its index in the sequence: prompt
// tokens first) for `seed`.
double position_uniform(uint64_t seed, int64_t position);

// A token drawn from softmax(logits / temperature) truncated to the top_k most likely tokens and
// then to the smallest set of the most likely ones whose probability reaches top_p (ties in
// logit go to the lower token id), by inverse CDF at u in [0, 1) over those tokens in an order
// fixed by the logits (decreasing probability when top_p cuts, else the order the selection
// leaves). Non-finite logits count as -inf; if every logit is -inf, returns token 0.
int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, double u, SamplingScratch& scratch);

}  // namespace medusa_rt
