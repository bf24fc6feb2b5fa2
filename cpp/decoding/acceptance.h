// Acceptance of a verified Medusa tree: which speculative nodes become output.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <vector>

#include "medusa_rt/tree.h"

namespace medusa_rt {

// Match acceptance (lossless): starting at the root, descend to the child whose token equals the
// base model's own token at the current node, target(node) (its argmax, or the token sampled at
// that position), while one exists. Siblings carry distinct tokens, so at most one child matches
// and this is the longest matching root-to-leaf prefix. target is called once per node on the
// accepted path, the root first and the last accepted node last (whose target is the bonus token).
// tokens: per node (num_nodes <= tree.num_nodes(), a prefix of the tree's node order).
// path receives the accepted nodes after the root, in order (its capacity is reused).
template <class Target>
void accept_match(const TreeSpec& tree, int num_nodes, const int32_t* tokens, Target&& target, std::vector<int>& path) {
  path.clear();
  const auto& parents = tree.parents();
  int cur = 0;
  while (true) {
    const int32_t want = target(cur);
    int next = -1;
    // Children of cur come later in node order; scan them (trees are small).
    for (int c = cur + 1; c < num_nodes; ++c) {
      if (parents[c] == cur && tokens[c] == want) {
        next = c;
        break;
      }
    }
    if (next < 0) return;
    path.push_back(next);
    cur = next;
  }
}

// Greedy acceptance: match acceptance against the base model's argmax per node.
inline void accept_greedy(const TreeSpec& tree, int num_nodes, const int32_t* tokens, const int32_t* argmax,
                          std::vector<int>& path) {
  accept_match(tree, num_nodes, tokens, [argmax](int u) { return argmax[u]; }, path);
}

// Typical acceptance (Medusa): a child c of an accepted node u is accepted when
// p(token_c | u) > min(posterior_threshold, posterior_alpha * exp(-entropy(u))). Among the
// accepted nodes the deepest wins; ties go to the larger sum of log p along the path, then to
// the earlier node. prob(u, token) and entropy(u) are evaluated lazily, only for accepted u.
// scratch: reused working memory; path receives the accepted nodes after the root.
struct TypicalScratch {
  std::vector<double> logp;
  std::vector<char> accepted;
};

template <class Prob, class Entropy>
void accept_typical(const TreeSpec& tree, int num_nodes, const int32_t* tokens, Prob&& prob, Entropy&& entropy,
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
      tau = std::min(posterior_threshold, posterior_alpha * std::exp(-static_cast<float>(entropy(u))));
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
