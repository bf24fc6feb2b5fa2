#include "decoding/sampling.h"

#include <algorithm>
#include <cmath>

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
  std::vector<double>& w = scratch.weights;
  ids.clear();
  float top = -INFINITY;
  for (int i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) {
      ids.push_back(i);
      top = std::max(top, logits[i]);
    }
  }
  if (ids.empty()) return 0;
  auto before = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  size_t k = ids.size();
  if (params.top_k > 0 && size_t(params.top_k) < k) {
    std::nth_element(ids.begin(), ids.begin() + params.top_k, ids.end(), before);
    k = params.top_k;
    ids.resize(k);
  }
  const double inv_t = 1.0 / params.temperature;
  auto weight = [&](int32_t id) { return std::exp((double(logits[id]) - double(top)) * inv_t); };
  size_t keep = k;
  if (params.top_p < 1.0f) {
    double total = 0;
    for (size_t i = 0; i < k; ++i) total += weight(ids[i]);
    const double target = double(params.top_p) * total;
    // The most likely tokens in order, a growing prefix at a time, until they reach top_p.
    for (size_t c = std::min<size_t>(k, 64);; c = std::min(k, c * 4)) {
      if (c < k) std::nth_element(ids.begin(), ids.begin() + c, ids.begin() + k, before);
      std::sort(ids.begin(), ids.begin() + c, before);
      double cum = 0;
      size_t j = 0;
      while (j < c && cum < target) cum += weight(ids[j++]);
      if (cum >= target || c == k) {
        keep = j;
        break;
      }
    }
  }
  w.resize(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += (w[i] = weight(ids[i]));
  const double at = u * total;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += w[i];
    if (at < cum) return ids[i];
  }
  return ids[keep - 1];  // u * total rounded up to the sum
}

}  // namespace medusa_rt
