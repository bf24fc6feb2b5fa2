// medusa_rt — Medusa token trees.
//
// A tree is given as `medusa_choices`: a list of paths of ranks. The path [i0, i1, ..., im]
// is the node reached by taking the i0-th ranked candidate of head 0, then the i1-th of
// head 1, and so on; the root (the base model's own next token) is implicit. Every proper
// prefix of a path must be present. Nodes are numbered as in the reference implementation:
// root 0, then the paths sorted by (length, lexicographic), so every ancestor precedes its
// descendants and any prefix of the node order is itself a valid tree.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace medusa_rt {

class TreeSpec {
 public:
  using Path = std::vector<int>;

  /// A root-only tree (plain decoding).
  TreeSpec();
  /// Validates and builds a tree. Throws InvalidArgumentError naming the offending path:
  /// empty path, negative rank, duplicate path, missing prefix, depth > 64, > 1023 paths.
  explicit TreeSpec(const std::vector<Path>& choices, std::string name = "custom");

  /// A built-in tree: the nine published Medusa trees ("mc_sim_7b_63", "vicuna_7b_stage2",
  /// "vicuna_7b_stage1", "vicuna_7b_stage1_ablation", "vicuna_13b_stage2", "vicuna_13b_stage1",
  /// "vicuna_33b_stage2", "vicuna_33b_stage1", "zephyr_stage2") or "chain-N" (top-1 of the
  /// first N heads). Throws InvalidArgumentError for an unknown name.
  static TreeSpec named(const std::string& name);
  static std::vector<std::string> builtin_names();

  /// Throws InvalidArgumentError if the tree is deeper than num_heads or uses a rank >= top_k.
  void check_fits(int num_heads, int top_k) const;

  /// The tree cut to its first `nodes` nodes (still a valid tree).
  TreeSpec truncated(int nodes) const;

  const std::string& name() const { return name_; }
  int num_nodes() const { return static_cast<int>(depth_.size()); }  ///< root included
  int max_depth() const { return max_depth_; }
  int max_rank() const { return max_rank_; }  ///< -1 for a root-only tree
  /// Sorted paths; node i (i >= 1) is paths()[i - 1].
  const std::vector<Path>& paths() const { return paths_; }
  const std::vector<int>& depths() const { return depth_; }    ///< per node, root 0
  const std::vector<int>& parents() const { return parent_; }  ///< per node, root -1
  const std::vector<int>& ranks() const { return rank_; }      ///< per node, root -1
  /// Ancestors-or-self of every node, in increasing node order (root first).
  const std::vector<std::vector<int>>& ancestors() const { return ancestors_; }
  /// The reference implementation's buffers, for cross-checking:
  /// tree_indices[i] = 0 for the root, else 1 + top_k * (depth - 1) + rank.
  std::vector<int> tree_indices(int top_k) const;
  /// One row per leaf (deepest / last sorted first), node indices root first, padded with -1.
  std::vector<std::vector<int>> retrieve_indices() const;

 private:
  void build();
  std::string name_;
  std::vector<Path> paths_;
  std::vector<int> depth_, parent_, rank_;
  std::vector<std::vector<int>> ancestors_;
  int max_depth_ = 0;
  int max_rank_ = -1;
};

/// Measured head accuracies: table[k][r] is the probability that head k's rank-r candidate is
/// the token the base model produces k + 2 positions ahead (`medusa-rt fit-tree` measures it).
using AccuracyTable = std::vector<std::vector<double>>;

/// The tree of `nodes` nodes (root included) grown greedily for an accuracy table, as in the
/// Medusa reference: a path (r_1..r_d) is accepted with probability prod_i table[i-1][r_i] (heads
/// taken as independent); starting from [0], the frontier holds each chosen path's next sibling
/// (last rank + 1, below max_children) and first child (rank 0 one level deeper, up to
/// max_depth), and the most probable frontier path joins (ties: the one found first) until the
/// tree is full or no path is left. max_depth 0 = the table's heads, max_children 0 = its ranks.
/// Returns the paths in the order they joined. Throws InvalidArgumentError for a table that is
/// not [heads][ranks] of probabilities, nodes < 1, or limits outside the table.
std::vector<TreeSpec::Path> fit_tree_paths(const AccuracyTable& table, int nodes, int max_depth = 0,
                                           int max_children = 0);

/// 1 + the sum of the paths' acceptance probabilities: expected tokens per step of greedy
/// acceptance with independent heads. Throws InvalidArgumentError for a path outside the table.
double expected_tokens_per_step(const AccuracyTable& table, const std::vector<TreeSpec::Path>& paths);

}  // namespace medusa_rt
