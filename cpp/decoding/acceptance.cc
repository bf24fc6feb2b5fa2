#include "decoding/acceptance.h"

#include <cmath>

namespace medusa_rt {
namespace {

std::vector<std::vector<int>> children_of(const TreeSpec& tree, int num_nodes) {
  std::vector<std::vector<int>> ch(num_nodes);
  for (int i = 1; i < num_nodes; ++i) ch[tree.parents()[i]].push_back(i);
  return ch;
}

std::vector<int> path_to(const TreeSpec& tree, int node) {
  const auto& anc = tree.ancestors()[node];
  return std::vector<int>(anc.begin() + 1, anc.end());
}

}  // namespace

std::vector<int> accept_greedy(const TreeSpec& tree, int num_nodes, const int32_t* tokens, const int32_t* argmax) {
  std::vector<int> path;
  int cur = 0;
  const auto& parents = tree.parents();
  while (true) {
    int next = -1;
    // Children of cur are later in node order; scan them (trees are small).
    for (int c = cur + 1; c < num_nodes; ++c) {
      if (parents[c] == cur && tokens[c] == argmax[cur]) {
        next = c;
        break;
      }
    }
    if (next < 0) return path;
    path.push_back(next);
    cur = next;
  }
}

std::vector<int> accept_typical(const TreeSpec& tree, int num_nodes, const int32_t* tokens,
                                const std::function<float(int, int32_t)>& prob,
                                const std::function<float(int)>& entropy, float posterior_threshold,
                                float posterior_alpha) {
  const auto children = children_of(tree, num_nodes);
  std::vector<double> logp(num_nodes, 0.0);
  int best = 0;
  // Nodes are accepted top-down; process in node order so ties resolve to the earlier node.
  std::vector<bool> accepted(num_nodes, false);
  accepted[0] = true;
  for (int u = 0; u < num_nodes; ++u) {
    if (!accepted[u] || children[u].empty()) continue;
    const float tau = std::min(posterior_threshold, posterior_alpha * std::exp(-entropy(u)));
    for (int c : children[u]) {
      const float p = prob(u, tokens[c]);
      if (p > tau) {
        accepted[c] = true;
        logp[c] = logp[u] + std::log(static_cast<double>(p));
        const int dc = tree.depths()[c], db = tree.depths()[best];
        if (dc > db || (dc == db && logp[c] > logp[best])) best = c;
      }
    }
  }
  return best == 0 ? std::vector<int>() : path_to(tree, best);
}

}  // namespace medusa_rt
