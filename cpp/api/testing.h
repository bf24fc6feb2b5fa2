// Test hooks into a Session. Not part of the public API: used by the test suite (through the
// Python module's _testing functions) to drive and observe the decoder.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "decoding/decoder.h"
#include "medusa_rt/engine.h"

namespace medusa_rt::testing {

// The expected token sequence of the session's whole context (prompt + continuation): every
// Medusa step then gets the true continuation as head candidates, at a rank that varies with
// the position and head (vary_rank) or always at rank 0 (perfect heads), so long paths are
// accepted and KV compaction moves entries. Empty clears the oracle.
void set_oracle(Session& s, const std::vector<int32_t>& tokens, bool vary_rank = true);
// Records every Medusa step (tree tokens, node logits, accepted path) while enabled.
void set_record(Session& s, bool on);
std::vector<SequenceState::StepRecord> take_records(Session& s);
// K and V of one layer for positions [0, length) of the session's slot: [kv_heads][length][head_dim].
void read_kv(Session& s, int layer, int length, std::vector<float>& k, std::vector<float>& v);
// One verify step of the engine's tree cut to `nodes` nodes at batch 1 (best of reps):
// {forward seconds (all rows' logits), heads seconds}. nodes = 1 is a plain decode step's forward.
std::vector<double> time_tree_step(Engine& e, int nodes, int reps);
// Streaming read bandwidth of this machine in bytes/s: `threads` threads (0 = all cores) sum a
// buffer of `bytes` (best of reps). The memory-bandwidth bound of decoding divides it.
double stream_bandwidth(size_t bytes, int threads, int reps);

}  // namespace medusa_rt::testing
