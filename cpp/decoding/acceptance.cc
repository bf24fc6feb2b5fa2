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

}  // namespace medusa_rt
