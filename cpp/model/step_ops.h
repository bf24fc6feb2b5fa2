// The per-row / per-sequence work of the fused decode step (TreeRowsArgs, AcceptArgs in
// backend.h), written once: the CPU backend loops over it, the CUDA backend runs it in device
// threads (compiled there as __host__ __device__). No CUDA header is needed here.
#pragma once

#include <cstdint>

#include "model/backend.h"

#if defined(__CUDACC__)
#define MRT_HOST_DEVICE __host__ __device__
#else
#define MRT_HOST_DEVICE
#endif

namespace medusa_rt {
namespace step_ops {

// Row s*T + i: node i of sequence s's tree at cache positions length + i, seeing the committed
// prefix and its ancestors-or-self (anc_offsets / ancestors). The same rows Decoder::step builds
// on the host.
MRT_HOST_DEVICE inline void tree_row(const TreeRowsArgs& a, int s, int i) {
  const int r = s * a.T + i;
  const int32_t slot = a.batch_slots[s];
  const int32_t len = a.lengths[slot];
  const int32_t depth = a.depths[i];
  a.tokens[r] = i == 0 ? a.roots[slot] : a.candidates[int64_t(slot) * a.cand_stride + a.cand_index[i]];
  a.positions[r] = len + depth;
  a.slots[r] = slot;
  a.cache_index[r] = len + i;
  a.prefix_len[r] = len;
  const int32_t per_seq = a.anc_offsets[a.T];
  a.extra_offsets[r] = s * per_seq + a.anc_offsets[i];
  for (int q = a.anc_offsets[i]; q < a.anc_offsets[i + 1]; ++q) a.extra[s * per_seq + q] = len + a.ancestors[q];
  a.logit_rows[r] = r;
  if (r == 0) a.extra_offsets[a.n * a.T] = a.n * per_seq;
}

// The draft cache's part of a step (heads with a draft layer): committed node j = 0..a (the root
// node, then the a accepted ones) of a slot whose draft cache holds `held` positions goes to
// position start + j - first for j >= first; nodes before `first` are not written. With held -1
// (nothing usable: the heads did not run at an earlier commit) only the last node is, at 0, as
// after a prompt. The cache then holds start + a + 1 - first positions.
struct DraftSpan {
  int first, start;
};
MRT_HOST_DEVICE inline DraftSpan draft_span(int held, int a) { return held < 0 ? DraftSpan{a, 0} : DraftSpan{0, held}; }

// Greedy acceptance of sequence s (accept_greedy() in decoding/acceptance.h, the same rule),
// the compaction list, the output block and the new length and root.
MRT_HOST_DEVICE inline void accept_sequence(const AcceptArgs& a, int s) {
  const int base = s * a.T, D = a.max_depth;
  const int32_t slot = a.batch_slots[s];
  const int32_t len = a.lengths[slot];
  int32_t* out = a.out + s * (D + 2);
  for (int j = 0; j < D; ++j) {  // unused entries copy cache entry 0 onto itself
    a.copy_slots[s * D + j] = slot;
    a.copy_src[s * D + j] = 0;
    a.copy_dst[s * D + j] = 0;
  }
  const int E = D + 1;  // draft rows per sequence
  if (a.draft_len) a.draft_rows[s * E] = base;
  int cur = 0, accepted = 0;
  while (true) {
    int next = -1;
    for (int c = cur + 1; c < a.T; ++c) {
      if (a.parents[c] == cur && a.tokens[base + c] == a.argmax[base + cur]) {
        next = c;
        break;
      }
    }
    if (next < 0 || accepted >= D) break;
    out[1 + accepted] = a.tokens[base + next];
    a.copy_src[s * D + accepted] = len + next;  // node `next` moves right after the committed prefix
    a.copy_dst[s * D + accepted] = len + accepted + 1;
    ++accepted;
    cur = next;
    if (a.draft_len) a.draft_rows[s * E + accepted] = base + next;
  }
  const int32_t bonus = a.argmax[base + cur];
  out[0] = accepted;
  out[1 + accepted] = bonus;
  if (a.draft_len) {  // node j's root is the token after it: out[1 + j]
    const DraftSpan sp = draft_span(a.draft_len[slot], accepted);
    for (int j = 0; j < E; ++j) {  // ascending: entry jj <= accepted is read before it could change
      const int jj = j < sp.first ? sp.first : j > accepted ? accepted : j;
      const int r = s * E + j;
      a.draft_rows[r] = a.draft_rows[s * E + jj];
      a.draft_tokens[r] = out[1 + jj];
      a.draft_positions[r] = sp.start + jj - sp.first;
      a.draft_prefix[r] = sp.start + jj - sp.first + 1;
      a.draft_slots[r] = slot;
    }
    a.draft_len[slot] = sp.start + accepted + 1 - sp.first;
  }
  a.hidden_rows[s] = base + cur;
  a.lengths[slot] = len + accepted + 1;
  a.roots[slot] = bonus;
}

MRT_HOST_DEVICE inline void scatter_candidate(const int32_t* cand, int n, int num_heads, int k, const int32_t* slots,
                                              int32_t* dst, int r, int h, int j) {
  dst[(int64_t(slots[r]) * num_heads + h) * k + j] = cand[(int64_t(h) * n + r) * k + j];
}

}  // namespace step_ops
}  // namespace medusa_rt
