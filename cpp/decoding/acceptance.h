// Acceptance of a verified Medusa tree: which speculative nodes become output.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "medusa_rt/tree.h"

namespace medusa_rt {

// Greedy (lossless): starting at the root, descend to the child whose token equals the base
// model's argmax at the current node, while one exists. Siblings carry distinct tokens, so at
// most one child matches and this is the longest matching root-to-leaf prefix.
// tokens/argmax: per node (num_nodes <= tree.num_nodes(), a prefix of the tree's node order).
// path receives the accepted nodes after the root, in order (its capacity is reused).
void accept_greedy(const TreeSpec& tree, int num_nodes, const int32_t* tokens, const int32_t* argmax,
                   std::vector<int>& path);

// Typical acceptance (Medusa): a child c of an accepted node u is accepted when
// p(token_c | u) > min(posterior_threshold, posterior_alpha * exp(-entropy(u))). Among the
// accepted nodes the deepest wins; ties go to the larger sum of log p along the path, then to
// the earlier node. prob(u, token) and entropy(u) are evaluated lazily, only for accepted u.
// scratch: reused working memory.
struct TypicalScratch {
  std::vector<double> logp;
  std::vector<char> accepted;
};
void accept_typical(const TreeSpec& tree, int num_nodes, const int32_t* tokens,
                    const std::function<float(int node, int32_t token)>& prob,
                    const std::function<float(int node)>& entropy, float posterior_threshold, float posterior_alpha,
                    TypicalScratch& scratch, std::vector<int>& path);

}  // namespace medusa_rt
