// The loop structure the SIMD GEMMs share (no intrinsics here: each kernel translation unit
// instantiates it with its own tiles).
#pragma once

namespace medusa_rt::cpu {

// One pass of a GEMM: k in [k0, k0 + kb) over the panel group of np 16-column panels starting at
// column n (`valid` columns of the last panel exist). `resume`: the chains continue from partial
// sums stored in y; `finish`: this is the last k block (add the bias).
struct PanelPass {
  int k0, kb, n, np, valid;
  bool resume, finish;
};

// Calls pass(const PanelPass&) for columns [n0, n1) in groups of `group` panels and for k in
// blocks of `k_block`. Every row block of a tile passes over a group before the next group
// streams in, so weights come from memory once; with k blocks, a group's slice stays in cache
// while all row blocks pass over it, and each element's chain continues across blocks through y
// (the same operation sequence per element as without blocking).
template <class Pass>
inline void for_each_panel_pass(int K, int n0, int n1, int group, int k_block, Pass&& pass) {
  for (int k0 = 0; k0 < K; k0 += k_block) {
    const int kb = K - k0 < k_block ? K - k0 : k_block;
    for (int n = n0; n < n1; n += 16 * group) {
      const int np = (n1 - n + 15) / 16 < group ? (n1 - n + 15) / 16 : group;
      const int last = n + 16 * (np - 1);
      pass(PanelPass{k0, kb, n, np, n1 - last < 16 ? n1 - last : 16, k0 > 0, k0 + kb == K});
    }
  }
}

}  // namespace medusa_rt::cpu
