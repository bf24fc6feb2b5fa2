#include "medusa_rt/tree.h"

#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "medusa_rt/errors.h"

namespace medusa_rt {
namespace {

constexpr int kMaxDepth = 64;
constexpr int kMaxPaths = 1023;

std::string path_str(const TreeSpec::Path& p) {
  std::string s = "[";
  for (size_t i = 0; i < p.size(); ++i) s += (i ? ", " : "") + std::to_string(p[i]);
  return s + "]";
}

// The published Medusa trees (FasterDecoding/Medusa, medusa/model/medusa_choices.py), as data:
// space-separated paths, ranks separated by commas, in the published order.
struct BuiltinTree {
  const char* name;
  const char* paths;
};
const BuiltinTree kBuiltinTrees[] = {
    {"mc_sim_7b_63",
     "0 0,0 1 0,1 2 0,0,0 1,0 0,2 3 0,3 4 0,4 2,0 0,5 0,0,1 5 0,6 6 0,7 0,1,0 1,1 7 0,8 0,0,2 3,0 0,9 8 9 "
     "1,0,0 0,2,0 1,2 0,0,3 4,0 2,1 0,0,4 0,0,5 0,0,0,0 0,1,1 0,0,6 0,3,0 5,0 1,3 0,0,7 0,0,8 0,0,9 6,0 "
     "0,4,0 1,4 7,0 0,1,2 2,0,0 3,1 2,2 8,0 0,5,0 1,5 1,0,1 0,2,1 9,0 0,6,0 0,0,0,1 1,6 0,7,0 "},
    {"vicuna_7b_stage2",
     "0 0,0 1 0,1 0,0,0 1,0 2 0,2 0,0,1 0,3 3 0,1,0 2,0 4 0,0,2 0,4 1,1 1,0,0 0,0,0,0 5 0,0,3 0,5 0,2,0 "
     "3,0 0,1,1 0,6 6 0,7 0,0,4 4,0 1,2 0,8 7 0,3,0 0,0,0,1 0,0,5 2,1 0,0,6 1,0,1 0,0,1,0 2,0,0 5,0 0,9 "
     "0,1,2 8 0,4,0 0,2,1 1,3 0,0,7 0,0,0,2 0,0,8 1,1,0 0,1,0,0 6,0 9 0,1,3 0,0,0,3 1,0,2 0,5,0 3,1 "
     "0,0,2,0 7,0 1,4 "},
    {"vicuna_7b_stage1",
     "0 0,0 1 2 0,1 1,0 3 0,2 4 0,0,0 0,3 5 2,0 0,4 6 0,5 1,1 0,0,1 7 3,0 0,6 8 9 0,1,0 0,7 0,8 4,0 0,0,2 "
     "1,2 0,9 2,1 5,0 1,0,0 0,0,3 1,3 0,2,0 0,1,1 0,0,4 6,0 1,4 0,0,5 2,2 0,3,0 3,1 0,0,6 7,0 1,5 1,0,1 "
     "2,0,0 0,0,7 8,0 0,0,0,0 4,1 0,1,2 0,4,0 9,0 0,2,1 2,3 1,6 0,0,8 0,5,0 3,2 5,1 "},
    {"vicuna_7b_stage1_ablation",
     "0 0,0 1 0,0,0 0,1 1,0 2 0,2 0,0,1 3 0,3 0,1,0 2,0 0,0,2 0,4 4 0,0,0,0 1,0,0 1,1 0,0,3 0,2,0 0,5 5 "
     "3,0 0,1,1 0,6 6 0,0,4 1,2 0,0,0,1 4,0 0,0,5 0,7 0,8 0,3,0 0,0,1,0 1,0,1 7 2,0,0 0,0,6 2,1 0,1,2 5,0 "
     "0,2,1 0,9 0,0,0,2 0,4,0 8 1,3 0,0,7 0,1,0,0 1,1,0 6,0 9 0,0,8 0,0,9 0,5,0 0,0,2,0 1,0,2 0,1,3 "
     "0,0,0,3 3,0,0 3,1 "},
    {"vicuna_13b_stage2",
     "0 0,0 1 0,0,0 0,1 1,0 2 0,2 0,0,1 0,1,0 3 0,3 2,0 0,0,2 0,0,0,0 0,4 1,0,0 1,1 4 0,0,3 0,5 0,2,0 5 "
     "3,0 0,1,1 0,6 0,0,4 0,0,0,1 0,7 0,0,5 1,2 0,0,1,0 0,3,0 1,0,1 4,0 0,0,6 0,8 2,0,0 0,9 6 7 2,1 5,0 "
     "0,1,2 0,0,0,2 8 0,4,0 0,1,0,0 0,2,1 0,0,7 1,1,0 1,3 0,0,2,0 9 0,0,8 0,5,0 0,0,0,3 0,0,9 0,1,3 1,0,2 "
     "0,0,1,1 3,0,0 1,0,0,0 "},
    {"vicuna_13b_stage1",
     "0 0,0 1 0,1 2 1,0 0,0,0 0,2 3 0,3 4 2,0 0,4 0,0,1 0,5 5 1,1 0,1,0 6 0,6 0,0,2 7 3,0 8 0,7 0,8 1,0,0 "
     "0,0,3 4,0 1,2 9 0,9 2,1 0,2,0 0,0,4 1,3 0,1,1 0,0,5 5,0 0,3,0 0,0,0,0 0,0,6 6,0 1,4 2,0,0 0,1,2 3,1 "
     "0,4,0 1,0,1 2,2 0,0,7 1,5 7,0 0,0,8 8,0 0,5,0 0,0,9 0,2,1 1,1,0 0,1,3 4,1 2,3 1,6 "},
    {"vicuna_33b_stage2",
     "0 0,0 1 0,1 0,0,0 1,0 2 0,2 0,0,1 0,3 3 0,1,0 2,0 0,4 4 0,0,2 1,1 1,0,0 0,5 5 0,0,0,0 0,0,3 3,0 "
     "0,2,0 0,6 0,1,1 6 0,0,4 0,7 7 1,2 4,0 8 0,3,0 0,0,5 0,0,0,1 0,8 2,1 0,9 1,0,1 2,0,0 0,0,6 5,0 "
     "0,0,1,0 1,3 0,1,2 0,4,0 0,0,7 0,2,1 9 1,1,0 0,0,0,2 6,0 0,0,8 0,1,0,0 7,0 0,1,3 0,5,0 1,4 0,0,9 3,1 "
     "1,0,2 2,2 "},
    {"vicuna_33b_stage1",
     "0 1 0,0 2 0,1 3 1,0 4 0,2 5 0,3 0,0,0 6 0,4 2,0 7 1,1 0,5 3,0 8 9 0,6 0,7 0,0,1 1,2 4,0 0,1,0 0,8 "
     "0,9 2,1 0,0,2 5,0 1,3 0,0,3 1,0,0 1,4 6,0 0,2,0 3,1 2,2 0,0,4 7,0 0,1,1 1,5 4,1 0,0,5 0,3,0 9,0 8,0 "
     "1,6 0,0,6 2,3 0,1,2 3,2 0,4,0 2,0,0 1,7 1,0,1 0,0,7 5,1 2,4 0,0,8 0,2,1 "},
    {"zephyr_stage2",
     "0 0,0 1 0,1 2 0,0,0 1,0 0,2 3 0,3 4 2,0 0,0,1 0,4 5 0,5 0,1,0 1,1 6 0,0,2 3,0 0,6 7 0,7 0,8 0,0,3 "
     "1,0,0 0,9 0,2,0 1,2 4,0 8 9 2,1 0,1,1 0,0,4 0,0,0,0 5,0 0,3,0 1,3 0,0,5 0,0,6 6,0 2,0,0 1,0,1 0,1,2 "
     "0,4,0 1,4 3,1 2,2 0,0,7 7,0 0,2,1 0,0,8 0,1,3 0,5,0 1,5 0,0,9 1,1,0 0,0,0,1 0,0,1,0 4,1 2,3 "},
};

std::vector<TreeSpec::Path> parse_builtin(const char* text) {
  std::vector<TreeSpec::Path> out;
  std::istringstream words(text);
  std::string word;
  while (words >> word) {
    TreeSpec::Path p;
    std::istringstream ranks(word);
    std::string r;
    while (std::getline(ranks, r, ',')) p.push_back(std::stoi(r));
    out.push_back(p);
  }
  return out;
}

}  // namespace

TreeSpec::TreeSpec() : name_("root") { build(); }

TreeSpec::TreeSpec(const std::vector<Path>& choices, std::string name) : name_(std::move(name)) {
  if (choices.size() > size_t(kMaxPaths)) {
    throw InvalidArgumentError("tree has " + std::to_string(choices.size()) + " paths; at most " +
                               std::to_string(kMaxPaths) + " are supported");
  }
  std::set<Path> seen;
  for (const Path& p : choices) {
    if (p.empty()) throw InvalidArgumentError("tree path is empty (the root is implicit; list only its descendants)");
    if (p.size() > size_t(kMaxDepth)) {
      throw InvalidArgumentError("tree path " + path_str(p) + " is deeper than " + std::to_string(kMaxDepth));
    }
    for (int r : p) {
      if (r < 0) throw InvalidArgumentError("tree path " + path_str(p) + " has a negative rank");
    }
    if (!seen.insert(p).second) throw InvalidArgumentError("tree path " + path_str(p) + " appears twice");
  }
  for (const Path& p : choices) {
    for (size_t len = 1; len < p.size(); ++len) {
      Path prefix(p.begin(), p.begin() + len);
      if (!seen.count(prefix)) {
        throw InvalidArgumentError("tree path " + path_str(p) + " has no parent: its prefix " + path_str(prefix) +
                                   " is missing");
      }
    }
  }
  paths_ = choices;
  std::sort(paths_.begin(), paths_.end(), [](const Path& a, const Path& b) {
    return a.size() != b.size() ? a.size() < b.size() : a < b;
  });
  build();
}

void TreeSpec::build() {
  const int n = static_cast<int>(paths_.size()) + 1;
  depth_.assign(n, 0);
  parent_.assign(n, -1);
  rank_.assign(n, -1);
  ancestors_.assign(n, {});
  ancestors_[0] = {0};
  std::map<Path, int> index;
  max_depth_ = 0;
  max_rank_ = -1;
  for (int i = 1; i < n; ++i) {
    const Path& p = paths_[i - 1];
    index[p] = i;
    depth_[i] = static_cast<int>(p.size());
    rank_[i] = p.back();
    parent_[i] = p.size() == 1 ? 0 : index.at(Path(p.begin(), p.end() - 1));
    ancestors_[i] = ancestors_[parent_[i]];
    ancestors_[i].push_back(i);
    max_depth_ = std::max(max_depth_, depth_[i]);
    max_rank_ = std::max(max_rank_, rank_[i]);
  }
}

TreeSpec TreeSpec::named(const std::string& name) {
  for (const auto& t : kBuiltinTrees) {
    if (name == t.name) return TreeSpec(parse_builtin(t.paths), name);
  }
  if (name.rfind("chain-", 0) == 0) {
    const std::string num = name.substr(6);
    if (!num.empty() && num.size() <= 2 && std::all_of(num.begin(), num.end(), ::isdigit)) {
      const int len = std::stoi(num);
      if (len <= kMaxDepth) {
        std::vector<Path> paths;
        for (int d = 1; d <= len; ++d) paths.push_back(Path(d, 0));
        return TreeSpec(paths, name);
      }
    }
    throw InvalidArgumentError("bad chain tree name '" + name + "': use chain-N with 0 <= N <= 64");
  }
  std::string known;
  for (const auto& n : builtin_names()) known += (known.empty() ? "" : ", ") + n;
  throw InvalidArgumentError("unknown tree '" + name + "'; built-in trees: " + known + ", chain-N");
}

std::vector<std::string> TreeSpec::builtin_names() {
  std::vector<std::string> out;
  for (const auto& t : kBuiltinTrees) out.push_back(t.name);
  return out;
}

void TreeSpec::check_fits(int num_heads, int top_k) const {
  if (max_depth_ > num_heads) {
    for (const Path& p : paths_) {
      if (int(p.size()) > num_heads) {
        throw InvalidArgumentError("tree '" + name_ + "' is " + std::to_string(max_depth_) + " deep but the model has " +
                                   std::to_string(num_heads) + " Medusa heads (path " + path_str(p) + " needs head " +
                                   std::to_string(p.size() - 1) + ")");
      }
    }
  }
  if (max_rank_ >= top_k) {
    for (const Path& p : paths_) {
      for (int r : p) {
        if (r >= top_k) {
          throw InvalidArgumentError("tree '" + name_ + "' path " + path_str(p) + " uses rank " + std::to_string(r) +
                                     " but only the top " + std::to_string(top_k) + " candidates of each head are kept");
        }
      }
    }
  }
}

TreeSpec TreeSpec::truncated(int nodes) const {
  nodes = std::max(1, std::min(nodes, num_nodes()));
  TreeSpec t;
  t.name_ = name_;
  t.paths_.assign(paths_.begin(), paths_.begin() + (nodes - 1));
  t.build();
  return t;
}

std::vector<int> TreeSpec::tree_indices(int top_k) const {
  std::vector<int> out(num_nodes(), 0);
  for (int i = 1; i < num_nodes(); ++i) out[i] = 1 + top_k * (depth_[i] - 1) + rank_[i];
  return out;
}

std::vector<std::vector<int>> TreeSpec::retrieve_indices() const {
  // One row per leaf: walk the sorted paths from last to first, skipping prefixes of paths
  // already taken; rows are root-first node lists padded with -1 to max_depth + 1.
  std::vector<std::vector<int>> rows;
  std::vector<bool> taken(num_nodes(), false);
  for (int i = num_nodes() - 1; i >= 1; --i) {
    if (taken[i]) continue;
    std::vector<int> row = ancestors_[i];
    for (int a : row) taken[a] = true;
    row.resize(max_depth_ + 1, -1);
    rows.push_back(row);
  }
  return rows;
}

namespace {

void check_table(const AccuracyTable& table) {
  if (table.empty() || table[0].empty()) throw InvalidArgumentError("accuracy table must be [heads][ranks], got an empty table");
  for (size_t k = 0; k < table.size(); ++k) {
    if (table[k].size() != table[0].size()) {
      throw InvalidArgumentError("accuracy table rows differ in length (head " + std::to_string(k) + ")");
    }
    for (double a : table[k]) {
      if (!(a >= 0.0 && a <= 1.0)) {
        throw InvalidArgumentError("accuracy table entries must be probabilities in [0, 1] (head " +
                                   std::to_string(k) + ")");
      }
    }
  }
}

double path_probability(const AccuracyTable& table, const TreeSpec::Path& path) {
  double p = 1.0;
  for (size_t d = 0; d < path.size(); ++d) p *= table[d][path[d]];
  return p;
}

}  // namespace

std::vector<TreeSpec::Path> fit_tree_paths(const AccuracyTable& table, int nodes, int max_depth, int max_children) {
  check_table(table);
  const int heads = static_cast<int>(table.size()), ranks = static_cast<int>(table[0].size());
  if (max_depth == 0) max_depth = heads;
  if (max_children == 0) max_children = ranks;
  if (max_depth < 1 || max_depth > heads) {
    throw InvalidArgumentError("max_depth must be in 1.." + std::to_string(heads) + " (the heads measured), got " +
                               std::to_string(max_depth));
  }
  if (max_children < 1 || max_children > ranks) {
    throw InvalidArgumentError("max_children must be in 1.." + std::to_string(ranks) + " (the ranks measured), got " +
                               std::to_string(max_children));
  }
  if (nodes < 1) throw InvalidArgumentError("a tree needs at least 1 node (the root), got " + std::to_string(nodes));
  std::vector<TreeSpec::Path> tree, frontier{{0}};
  std::set<TreeSpec::Path> seen{{0}};
  while (static_cast<int>(tree.size()) < nodes - 1 && !frontier.empty()) {
    size_t best = 0;
    double best_p = -1.0;
    for (size_t i = 0; i < frontier.size(); ++i) {
      const double p = path_probability(table, frontier[i]);
      if (p > best_p) best_p = p, best = i;
    }
    TreeSpec::Path path = frontier[best];
    frontier.erase(frontier.begin() + static_cast<std::ptrdiff_t>(best));
    tree.push_back(path);
    if (path.back() + 1 < max_children) {
      TreeSpec::Path sib = path;
      ++sib.back();
      if (seen.insert(sib).second) frontier.push_back(sib);
    }
    if (static_cast<int>(path.size()) < max_depth) {
      TreeSpec::Path child = path;
      child.push_back(0);
      if (seen.insert(child).second) frontier.push_back(child);
    }
  }
  return tree;
}

double expected_tokens_per_step(const AccuracyTable& table, const std::vector<TreeSpec::Path>& paths) {
  check_table(table);
  double total = 1.0;
  for (const auto& p : paths) {
    bool inside = p.size() <= table.size();
    for (size_t d = 0; inside && d < p.size(); ++d) inside = p[d] >= 0 && p[d] < static_cast<int>(table[d].size());
    if (!inside) throw InvalidArgumentError("tree path " + path_str(p) + " is outside the accuracy table");
    total += path_probability(table, p);
  }
  return total;
}

}  // namespace medusa_rt
