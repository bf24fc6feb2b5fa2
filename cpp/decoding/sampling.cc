#include "decoding/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace medusa_rt {

namespace {

// SplitMix64's output function: a bijective 64-bit mix.
uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

double position_uniform(uint64_t seed, int64_t position) {
  const uint64_t x = mix64(mix64(seed) ^ static_cast<uint64_t>(position));
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, double u, SamplingScratch& scratch) {
  std::vector<int32_t>& ids = scratch.ids;
  std::vector<float>& w = scratch.weights;
  float top = -INFINITY;
  for (int i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) top = std::max(top, logits[i]);
  }
  if (top == -INFINITY) return 0;
  // Every token's weight exp((logit - top) / T) once, the exponential in float (0 for non-finite
  // logits).
  w.resize(vocab);
  const double inv_t = 1.0 / params.temperature;  // in double: finite for any temperature > 0
  for (int i = 0; i < vocab; ++i) {
    w[i] = std::isfinite(logits[i]) ? std::exp(static_cast<float>((double(logits[i]) - top) * inv_t)) : 0.f;
  }
  auto before = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  ids.clear();
  double total = 0;  // of the candidates: the top_k tokens, or all
  if (params.top_k > 0 && params.top_k < vocab) {
    for (int i = 0; i < vocab; ++i) {
      if (std::isfinite(logits[i])) ids.push_back(i);
    }
    if (size_t(params.top_k) < ids.size()) {
      std::nth_element(ids.begin(), ids.begin() + params.top_k, ids.end(), before);
      ids.resize(params.top_k);
    }
    for (int32_t id : ids) total += w[id];
  } else {
    for (int i = 0; i < vocab; ++i) total += w[i];
    // With top_p, only the tokens heavy enough to be in the nucleus are sorted: classes of weight
    // by power of two, heaviest first, until their sum reaches top_p of the total (with a margin
    // over any summation order's rounding). The nucleus (the most likely tokens until top_p) is
    // within those classes, so the selection below gives what it would on the whole vocabulary.
    float cut = 0.f;
    if (params.top_p < 1.0f) {
      constexpr int kClasses = 64;  // class c: weights in [2^-c, 2^(1-c)); the last: all below
      double sums[kClasses] = {};
      for (int i = 0; i < vocab; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &w[i], sizeof bits);
        const int c = 127 - static_cast<int>(bits >> 23);  // weights are in [0, 1]: sign bit 0
        sums[c < kClasses - 1 ? c : kClasses - 1] += w[i];
      }
      const double target = double(params.top_p) * total * (1 + 1e-9);
      double sum = 0;
      for (int c = 0; c < kClasses - 1; ++c) {
        sum += sums[c];
        if (sum >= target) {
          cut = std::ldexp(1.0f, -c);
          break;
        }
      }
    }
    for (int i = 0; i < vocab; ++i) {
      if (std::isfinite(logits[i]) && w[i] >= cut) ids.push_back(i);
    }
  }
  const size_t k = ids.size();
  size_t keep = k;
  double kept = total;
  if (params.top_p < 1.0f) {
    const double target = double(params.top_p) * total;
    // The most likely tokens in order, a growing prefix at a time, until they reach top_p.
    for (size_t c = std::min<size_t>(k, 64);; c = std::min(k, c * 4)) {
      if (c < k) std::nth_element(ids.begin(), ids.begin() + c, ids.begin() + k, before);
      std::sort(ids.begin(), ids.begin() + c, before);
      double cum = 0;
      size_t j = 0;
      while (j < c && cum < target) cum += w[ids[j++]];
      if (cum >= target || c == k) {
        keep = j;
        kept = cum;
        break;
      }
    }
  }
  const double at = u * kept;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += w[ids[i]];
    if (at < cum) return ids[i];
  }
  return ids[keep - 1];  // u * total rounded up to the sum
}

}  // namespace medusa_rt
