#include "decoding/acceptance.h"

#include <algorithm>
#include <cmath>

namespace medusa_rt {

void accept_greedy(const TreeSpec& tree, int num_nodes, const int32_t* tokens, const int32_t* argmax,
                   std::vector<int>& path) {
  path.clear();
  const auto& parents = tree.parents();
  int cur = 0;
  while (true) {
    int next = -1;
    // Children of cur come later in node order; scan them (trees are small).
    for (int c = cur + 1; c < num_nodes; ++c) {
      if (parents[c] == cur && tokens[c] == argmax[cur]) {
        next = c;
        break;
      }
    }
    if (next < 0) return;
    path.push_back(next);
    cur = next;
  }
}

void accept_typical(const TreeSpec& tree, int num_nodes, const int32_t* tokens,
                    const std::function<float(int, int32_t)>& prob, const std::function<float(int)>& entropy,
                    float posterior_threshold, float posterior_alpha, TypicalScratch& scratch,
                    std::vector<int>& path) {
  path.clear();
  const auto& parents = tree.parents();
  const auto& depths = tree.depths();
  scratch.logp.assign(num_nodes, 0.0);
  scratch.accepted.assign(num_nodes, 0);
  scratch.accepted[0] = 1;
  int best = 0;
  // Nodes in order: a node's parent is decided before it, and ties go to the earlier node.
  float tau = 0.f;
  int tau_of = -1;
  for (int c = 1; c < num_nodes; ++c) {
    const int u = parents[c];
    if (!scratch.accepted[u]) continue;
    if (tau_of != u) {
      tau = std::min(posterior_threshold, posterior_alpha * std::exp(-entropy(u)));
      tau_of = u;
    }
    const float p = prob(u, tokens[c]);
    if (p > tau) {
      scratch.accepted[c] = 1;
      scratch.logp[c] = scratch.logp[u] + std::log(static_cast<double>(p));
      if (depths[c] > depths[best] || (depths[c] == depths[best] && scratch.logp[c] > scratch.logp[best])) best = c;
    }
  }
  if (best == 0) return;
  const auto& anc = tree.ancestors()[best];
  path.assign(anc.begin() + 1, anc.end());
}

}  // namespace medusa_rt
