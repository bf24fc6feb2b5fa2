#include "model/medusa_heads.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/json.h"
#include "core/safetensors.h"
#include "medusa_rt/errors.h"
#include "model/llama.h"

namespace medusa_rt {
namespace {

const std::string& meta(const SafetensorsFile& f, const std::string& key) {
  auto it = f.metadata().find(key);
  if (it == f.metadata().end()) {
    throw ModelFormatError(f.path() + ": not a medusa_rt heads file (metadata '" + key +
                           "' missing); convert Medusa checkpoints with medusa_rt.export");
  }
  return it->second;
}

int meta_int(const SafetensorsFile& f, const std::string& key) {
  const std::string& v = meta(f, key);
  char* end = nullptr;
  long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x <= 0 || x > (1 << 24)) {
    throw ModelFormatError(f.path() + ": metadata '" + key + "' must be a positive integer, got '" + v + "'");
  }
  return static_cast<int>(x);
}

TreeSpec parse_tree(const std::string& text, const std::string& where) {
  if (!text.empty() && text[0] == '[') {
    json::Value v = json::parse(text, where + " default_tree");
    std::vector<TreeSpec::Path> paths;
    if (!v.is_array()) throw ModelFormatError(where + ": default_tree must be a list of paths");
    for (const auto& p : v.as_array()) {
      if (!p.is_array()) throw ModelFormatError(where + ": default_tree must be a list of paths");
      TreeSpec::Path path;
      for (const auto& r : p.as_array()) {
        if (!r.is_integer()) throw ModelFormatError(where + ": default_tree ranks must be integers");
        path.push_back(static_cast<int>(r.as_int()));
      }
      paths.push_back(path);
    }
    return TreeSpec(paths, "default");
  }
  return TreeSpec::named(text);
}

MedusaHeadsMeta read_meta_of(const SafetensorsFile& f, const ModelConfig& base) {
  const std::string& file = f.path();
  if (meta(f, "format") != "medusa_rt_heads") {
    throw ModelFormatError(file + ": metadata format is '" + meta(f, "format") + "', expected 'medusa_rt_heads'");
  }
  const std::string& version = meta(f, "format_version");
  if (version != "1" && version != "2" && version != "3" && version != "4" && version != "5") {
    throw UnsupportedModelError(file + ": heads format_version " + version + " is not supported (1 to 5 are)");
  }
  MedusaHeadsMeta m;
  m.root_input = version != "1";
  m.path_input = version == "3";
  auto flag = [&](const std::string& key) {  // formats 4 and 5 name their inputs
    const std::string& v = meta(f, key);
    if (v != "true" && v != "false") throw ModelFormatError(file + ": metadata " + key + " must be 'true' or 'false'");
    return v == "true";
  };
  if (version == "5") {
    m.path_input = flag("path_input");
    if (!flag("root_input")) throw ModelFormatError(file + ": heads format_version 5 needs root_input 'true'");
    const json::Value v = json::parse(meta(f, "feature_layers"), file + " feature_layers");
    bool ok = v.is_array() && !v.as_array().empty() && v.as_array().size() <= size_t(LlamaModel::kMaxTaps);
    for (size_t j = 0; ok && j < v.as_array().size(); ++j) {
      const json::Value& x = v.as_array()[j];
      ok = x.is_integer() && x.as_int() >= 1 && x.as_int() < base.num_layers;
      if (ok) {
        const int L = static_cast<int>(x.as_int());
        ok = std::find(m.feature_layers.begin(), m.feature_layers.end(), L) == m.feature_layers.end();
        m.feature_layers.push_back(L);
      }
    }
    if (!ok) {
      throw ModelFormatError(file + ": metadata feature_layers must be a JSON list of 1 to " +
                             std::to_string(LlamaModel::kMaxTaps) + " distinct decoder layers in [1, " +
                             std::to_string(base.num_layers - 1) + "] (the base model has " +
                             std::to_string(base.num_layers) + " layers)");
    }
  }
  if (version == "4") {
    m.draft_layer = flag("draft_layer");
    m.path_input = flag("path_input");
    if (!flag("root_input") || !m.draft_layer) {
      throw ModelFormatError(file + ": heads format_version 4 needs root_input and draft_layer 'true'");
    }
    if (base.num_heads * base.head_dim != base.hidden_size) {
      throw UnsupportedModelError(file + ": the draft layer needs the base model's num_heads x head_dim (" +
                                  std::to_string(base.num_heads) + " x " + std::to_string(base.head_dim) +
                                  ") to equal its hidden_size (" + std::to_string(base.hidden_size) + ")");
    }
  }
  m.num_heads = meta_int(f, "num_heads");
  m.num_layers = meta_int(f, "num_layers");
  const std::string shared = meta(f, "shared_lm_head");
  if (shared != "true" && shared != "false") throw ModelFormatError(file + ": shared_lm_head must be 'true' or 'false'");
  m.shared_lm_head = shared == "true";
  if (meta_int(f, "hidden_size") != base.hidden_size || meta_int(f, "vocab_size") != base.vocab_size) {
    throw ModelFormatError(file + ": heads were made for hidden_size " + meta(f, "hidden_size") + " and vocab_size " +
                           meta(f, "vocab_size") + " but the model has " + std::to_string(base.hidden_size) + " and " +
                           std::to_string(base.vocab_size));
  }
  auto et = f.metadata().find("expected_tokens_per_step");
  if (et != f.metadata().end() && !et->second.empty()) {
    char* end = nullptr;
    m.expected_tokens_per_step = std::strtod(et->second.c_str(), &end);
    if (*end != '\0' || !(m.expected_tokens_per_step >= 1.0)) {
      throw ModelFormatError(file + ": metadata expected_tokens_per_step must be a number >= 1");
    }
  }
  auto at = f.metadata().find("accuracy_table");
  if (at != f.metadata().end() && !at->second.empty()) {
    const json::Value v = json::parse(at->second, file + " accuracy_table");
    bool ok = v.is_array() && !v.as_array().empty() && v.as_array().size() <= size_t(m.num_heads);
    for (size_t k = 0; ok && k < v.as_array().size(); ++k) {
      const json::Value& row = v.as_array()[k];
      ok = row.is_array() && !row.as_array().empty();
      std::vector<double> r;
      for (size_t j = 0; ok && j < row.as_array().size(); ++j) {
        const json::Value& x = row.as_array()[j];
        ok = x.is_number() && x.as_double() >= 0.0 && x.as_double() <= 1.0;
        if (ok) r.push_back(x.as_double());
      }
      if (ok) m.accuracy_table.push_back(std::move(r));
    }
    if (!ok) {
      throw ModelFormatError(file + ": metadata accuracy_table must be a JSON list (one per head, at most " +
                             std::to_string(m.num_heads) + ") of lists of probabilities");
    }
  }
  auto it = f.metadata().find("default_tree");
  if (it != f.metadata().end() && !it->second.empty()) {
    try {
      m.default_tree = parse_tree(it->second, file);
    } catch (const InvalidArgumentError& err) {
      throw ModelFormatError(file + ": bad default_tree: " + err.what());
    }
    m.has_default_tree = true;
  }
  auto dv = f.tensors().find("medusa.draft_vocab");  // checked when the heads load
  if (dv != f.tensors().end() && dv->second.shape.size() == 1) {
    m.draft_vocab = static_cast<int>(dv->second.shape[0]);
    m.draft_vocab_counts = f.tensors().count("medusa.draft_vocab_count") > 0;
  }
  return m;
}

// j of a tensor named medusa.fuse.{j}.weight (SIZE_MAX when the name is not of that form).
size_t fuse_index(const std::string& name) {
  const std::string pre = "medusa.fuse.", post = ".weight";
  if (name.size() <= pre.size() + post.size() || name.compare(0, pre.size(), pre) != 0 ||
      name.compare(name.size() - post.size(), post.size(), post) != 0) {
    return SIZE_MAX;
  }
  const std::string j = name.substr(pre.size(), name.size() - pre.size() - post.size());
  if (j.empty() || j.size() > 3 || j.find_first_not_of("0123456789") != std::string::npos) return SIZE_MAX;
  return std::stoul(j);
}

}  // namespace

MedusaHeadsMeta MedusaHeads::read_meta(const std::string& file, const ModelConfig& base) {
  return read_meta_of(SafetensorsFile(file), base);
}

MedusaHeads::MedusaHeads(const std::string& file, const ModelConfig& base, DType dtype, int max_rows, int top_k,
                         Backend& be, const Matrix& base_lm_head, const Matrix& base_embed, int draft_vocab)
    : be_(be), arena_(be), hidden_(base.hidden_size), vocab_(base.vocab_size), max_rows_(max_rows), top_k_(top_k),
      base_lm_head_(base_lm_head), base_embed_(base_embed) {
  SafetensorsFile f(file);
  meta_ = read_meta_of(f, base);
  if (top_k < 1 || top_k > vocab_) throw InvalidArgumentError("medusa_top_k must be in [1, vocab_size]");
  const int num_heads_ = meta_.num_heads, num_layers_ = meta_.num_layers;
  const bool shared_ = meta_.shared_lm_head;

  const std::string source = "the base model (hidden_size " + std::to_string(hidden_) + ", vocab_size " +
                             std::to_string(vocab_) + ")";
  heads_.resize(num_heads_);
  for (int k = 0; k < num_heads_; ++k) {
    Head& h = heads_[k];
    for (int l = 0; l < num_layers_; ++l) {
      const std::string p = "medusa." + std::to_string(k) + "." + std::to_string(l);
      const TensorView& w = f.get(p + ".weight");
      const TensorView& b = f.get(p + ".bias");
      check_shape(w, {hidden_, hidden_}, source);
      check_shape(b, {hidden_}, source);
      h.w.push_back(arena_.matrix({&w}, hidden_, dtype));
      h.b.push_back(arena_.vector({&b}));
    }
    const std::string root = "medusa." + std::to_string(k) + ".root.weight";
    if (meta_.root_input) {
      const TensorView& w = f.get(root);
      check_shape(w, {hidden_, hidden_}, source);
      h.root = arena_.matrix({&w}, hidden_, dtype);
    } else if (f.tensors().count(root)) {
      throw ModelFormatError(file + ": " + root + " needs format_version 2 (heads with a root input)");
    }
    for (int j = 1; j <= k; ++j) {
      const std::string path = "medusa." + std::to_string(k) + ".path." + std::to_string(j) + ".weight";
      if (meta_.path_input) {
        const TensorView& w = f.get(path);
        check_shape(w, {hidden_, hidden_}, source);
        h.path.push_back(arena_.matrix({&w}, hidden_, dtype));
      } else if (f.tensors().count(path)) {
        throw ModelFormatError(file + ": " + path + " needs format_version 3 (heads with a path input)");
      }
    }
    const std::string proj = "medusa." + std::to_string(k) + ".lm_head.weight";
    if (shared_) {
      if (f.tensors().count(proj)) throw ModelFormatError(file + ": shared_lm_head is true but " + proj + " is present");
      h.proj = base_lm_head_;
    } else {
      const TensorView& w = f.get(proj);
      check_shape(w, {vocab_, hidden_}, source);
      h.proj = arena_.matrix({&w}, hidden_, dtype);
    }
  }
  if (meta_.draft_layer) {
    const int H = hidden_;
    auto mat = [&](const std::string& name, int rows, int cols) {
      const TensorView& w = f.get("medusa.draft." + name + ".weight");
      check_shape(w, {rows, cols}, source);
      return arena_.matrix({&w}, cols, dtype);
    };
    auto vec = [&](const std::string& name) {
      const TensorView& w = f.get("medusa.draft." + name + ".weight");
      check_shape(w, {H}, source);
      return arena_.vector({&w});
    };
    const TensorView& gu = f.get("medusa.draft.gate_up.weight");
    if (gu.shape.size() != 2 || gu.shape[0] < 2 || gu.shape[0] % 2 != 0 || gu.shape[0] > (int64_t(1) << 20)) {
      throw ModelFormatError(file + ": medusa.draft.gate_up.weight must be [2 x intermediate, hidden_size]");
    }
    draft_.intermediate = static_cast<int>(gu.shape[0] / 2);
    draft_.root = mat("root", H, H);
    draft_.qkv = mat("qkv", 3 * H, H);
    draft_.o = mat("o", H, H);
    draft_.gate_up = mat("gate_up", 2 * draft_.intermediate, H);
    draft_.down = mat("down", H, draft_.intermediate);
    draft_.norm1 = vec("norm1");
    draft_.norm2 = vec("norm2");
    draft_.heads = base.num_heads;
    draft_.head_dim = base.head_dim;
    draft_.eps = static_cast<float>(base.rms_norm_eps);
    draft_.theta = base.rope.theta;
  } else {
    for (const auto& t : f.tensors()) {
      if (t.first.rfind("medusa.draft.", 0) == 0) {
        throw ModelFormatError(file + ": " + t.first + " and the other medusa.draft.* tensors need format_version 4 "
                               "(heads with a draft layer)");
      }
    }
  }
  for (size_t j = 0; j < meta_.feature_layers.size(); ++j) {
    const TensorView& w = f.get("medusa.fuse." + std::to_string(j) + ".weight");
    check_shape(w, {hidden_, hidden_}, source);
    fuse_.push_back(arena_.matrix({&w}, hidden_, dtype));
  }
  for (const auto& t : f.tensors()) {
    if (t.first.rfind("medusa.fuse.", 0) == 0 && fuse_index(t.first) >= fuse_.size()) {
      throw ModelFormatError(file + ": " + t.first + " is not one of the " + std::to_string(fuse_.size()) +
                             " fusion weights metadata feature_layers asks for (format_version 5)");
    }
  }
  if (!fuse_.empty()) {
    const size_t bytes = size_t(max_rows_) * hidden_ * sizeof(float);
    fuse_in_ = static_cast<float*>(arena_.buffer(bytes, "Medusa feature fusion workspace"));
    fuse_norm_ = static_cast<float*>(arena_.buffer(bytes, "Medusa feature fusion workspace"));
    fuse_ones_ = static_cast<float*>(arena_.buffer(sizeof(float) * hidden_, "Medusa feature fusion workspace"));
    const std::vector<float> ones(hidden_, 1.0f);
    be_.copy_to_device(fuse_ones_, ones.data(), sizeof(float) * hidden_);
    fuse_eps_ = static_cast<float>(base.rms_norm_eps);
  }
  proj_vocab_ = vocab_;
  auto dv = f.tensors().find("medusa.draft_vocab");
  if (dv == f.tensors().end() && f.tensors().count("medusa.draft_vocab_count")) {
    throw ModelFormatError(file + ": medusa.draft_vocab_count needs medusa.draft_vocab (the tokens it counts)");
  }
  if (draft_vocab > 0 && dv == f.tensors().end()) {
    throw InvalidArgumentError("medusa_draft_vocab=" + std::to_string(draft_vocab) + ": " + file +
                               " has no draft vocabulary (medusa.draft_vocab) to take the most frequent tokens of");
  }
  if (dv != f.tensors().end()) {
    const TensorView& t = dv->second;
    const std::string where = file + ": medusa.draft_vocab";
    if (!shared_) throw ModelFormatError(where + " needs shared_lm_head");
    if (t.dtype != DType::kI32 || t.shape.size() != 1) throw ModelFormatError(where + " must be a 1-D I32 tensor");
    const int n = static_cast<int>(t.shape[0]);
    if (n < top_k || n > vocab_) {
      throw ModelFormatError(where + " has " + std::to_string(n) + " tokens; it needs between medusa_top_k (" +
                             std::to_string(top_k) + ") and vocab_size (" + std::to_string(vocab_) + ")");
    }
    std::vector<int32_t> ids(n);
    std::memcpy(ids.data(), t.data, sizeof(int32_t) * size_t(n));
    for (int i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] >= vocab_ || (i > 0 && ids[i] <= ids[i - 1])) {
        throw ModelFormatError(where + " must hold increasing token ids in [0, vocab_size); entry " +
                               std::to_string(i) + " is " + std::to_string(ids[i]));
      }
    }
    std::vector<int32_t> counts;
    auto ct = f.tensors().find("medusa.draft_vocab_count");
    if (ct != f.tensors().end()) {
      const TensorView& c = ct->second;
      const std::string cwhere = file + ": medusa.draft_vocab_count";
      if (c.dtype != DType::kI32 || c.shape != std::vector<int64_t>{n}) {
        throw ModelFormatError(cwhere + " must be an I32 tensor of medusa.draft_vocab's shape [" + std::to_string(n) + "]");
      }
      counts.resize(n);
      std::memcpy(counts.data(), c.data, sizeof(int32_t) * size_t(n));
      for (int i = 0; i < n; ++i) {
        if (counts[i] < 0) throw ModelFormatError(cwhere + " must hold counts >= 0; entry " + std::to_string(i) + " is " +
                                                  std::to_string(counts[i]));
      }
    }
    if (draft_vocab > 0 && draft_vocab < n) {  // the most frequent of them (ties: the lower id)
      if (counts.empty()) {
        throw InvalidArgumentError("medusa_draft_vocab=" + std::to_string(draft_vocab) + " needs token counts, and " +
                                   file + " has no medusa.draft_vocab_count");
      }
      if (draft_vocab < top_k) {
        throw InvalidArgumentError("medusa_draft_vocab must be at least medusa_top_k (" + std::to_string(top_k) +
                                   "), got " + std::to_string(draft_vocab));
      }
      std::vector<int> order(n);
      for (int i = 0; i < n; ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return counts[a] > counts[b]; });
      order.resize(draft_vocab);
      std::sort(order.begin(), order.end());
      std::vector<int32_t> kept(draft_vocab);
      for (int i = 0; i < draft_vocab; ++i) kept[i] = ids[order[i]];
      ids.swap(kept);
    }
    const int kept = static_cast<int>(ids.size());
    draft_proj_ = arena_.rows_of(base_lm_head_, ids, dtype, "Medusa draft vocabulary projection");
    draft_ids_ = static_cast<int32_t*>(arena_.buffer(sizeof(int32_t) * size_t(kept), "Medusa draft vocabulary"));
    be_.copy_to_device(draft_ids_, ids.data(), sizeof(int32_t) * size_t(kept));
    proj_vocab_ = kept;
    draft_vocab_ = std::move(ids);
  }
  if (meta_.path_input) return;  // each tree's plan holds the workspace
  const size_t rows = size_t(num_heads_) * max_rows_;
  x_ = static_cast<float*>(arena_.buffer(rows * hidden_ * sizeof(float), "Medusa head workspace"));
  tmp_ = static_cast<float*>(arena_.buffer(size_t(max_rows_) * hidden_ * sizeof(float), "Medusa head workspace"));
  logits_ = static_cast<float*>(arena_.buffer(rows * proj_vocab_ * sizeof(float), "Medusa head logits"));
  if (meta_.root_input) {
    root_emb_ = static_cast<float*>(arena_.buffer(size_t(max_rows_) * hidden_ * sizeof(float), "Medusa head workspace"));
  }
  be_.reserve_rows(static_cast<int>(rows));
}

HeadsPlan MedusaHeads::plan(const TreeSpec& tree) const {
  tree.check_fits(meta_.num_heads, top_k_);
  HeadsPlan p;
  const int T = tree.num_nodes();
  p.depth = std::max(1, tree.max_depth());
  p.index.assign(T, 0);
  if (!meta_.path_input) {
    p.blocks = p.depth;  // the heads the tree reads
    p.width = top_k_;
    for (int i = 1; i < T; ++i) p.index[i] = (tree.depths()[i] - 1) * top_k_ + tree.ranks()[i];
    return p;
  }
  p.blocks = 1;
  p.width = std::max(1, T - 1);
  for (int i = 1; i < T; ++i) p.index[i] = i - 1;
  p.arena = std::make_unique<WeightArena>(be_);
  WeightArena& a = *p.arena;
  // Level d: the nodes at depth d with children, and each one's position among them.
  std::vector<std::vector<int>> parents(p.depth);
  std::vector<int> pos(T, -1);
  for (int i = 0; i < T; ++i) {
    const int d = tree.depths()[i];
    bool has_child = false;
    for (int c = 1; c < T && !has_child; ++c) has_child = tree.parents()[c] == i;
    if (has_child) {
      pos[i] = static_cast<int>(parents[d].size());
      parents[d].push_back(i);
    }
  }
  // Where node c's token sits in `drafts`, per sequence r: its parent's top_k list at its rank.
  std::vector<size_t> offset(p.depth);
  size_t drafts = 0;
  for (int d = 0; d < p.depth; ++d) {
    offset[d] = drafts;
    drafts += size_t(max_rows_) * parents[d].size() * top_k_;
  }
  auto draft_of = [&](int c, int r) {
    const int u = tree.parents()[c], d = tree.depths()[u];
    return static_cast<int32_t>(offset[d] + (size_t(r) * parents[d].size() + pos[u]) * top_k_ + tree.ranks()[c]);
  };
  auto upload = [&](const std::vector<int32_t>& v) {
    auto* dst = static_cast<int32_t*>(a.buffer(sizeof(int32_t) * std::max<size_t>(v.size(), 1), "Medusa draft plan"));
    be_.copy_to_device(dst, v.data(), sizeof(int32_t) * v.size());
    return dst;
  };
  size_t max_level_rows = 1;
  for (int d = 0; d < p.depth; ++d) {
    HeadsPlan::Level L;
    L.parents = static_cast<int>(parents[d].size());
    L.drafts_offset = offset[d];
    const size_t m = size_t(max_rows_) * L.parents;
    max_level_rows = std::max(max_level_rows, m);
    std::vector<int32_t> seq(m);
    std::vector<std::vector<int32_t>> path(d, std::vector<int32_t>(m));
    for (int r = 0; r < max_rows_; ++r) {
      for (int u = 0; u < L.parents; ++u) {
        const size_t row = size_t(r) * L.parents + u;
        seq[row] = r;
        for (int c = parents[d][u]; c > 0; c = tree.parents()[c]) path[tree.depths()[c] - 1][row] = draft_of(c, r);
      }
    }
    L.seq = upload(seq);
    for (const auto& v : path) L.path.push_back(upload(v));
    p.levels.push_back(std::move(L));
  }
  std::vector<int32_t> out(size_t(max_rows_) * p.width, 0);
  for (int r = 0; r < max_rows_; ++r) {
    for (int c = 1; c < T; ++c) out[size_t(r) * p.width + c - 1] = draft_of(c, r);
  }
  p.out_index = upload(out);
  p.drafts = static_cast<int32_t*>(a.buffer(sizeof(int32_t) * std::max<size_t>(drafts, 1), "Medusa drafts"));
  be_.fill_zero(p.drafts, sizeof(int32_t) * std::max<size_t>(drafts, 1));
  p.tokens = static_cast<int32_t*>(a.buffer(sizeof(int32_t) * max_level_rows, "Medusa draft plan"));
  const size_t H = hidden_;
  p.x = static_cast<float*>(a.buffer(sizeof(float) * max_level_rows * H, "Medusa head workspace"));
  p.tmp = static_cast<float*>(a.buffer(sizeof(float) * max_level_rows * H, "Medusa head workspace"));
  p.emb = static_cast<float*>(a.buffer(sizeof(float) * max_level_rows * H, "Medusa head workspace"));
  p.root_emb = static_cast<float*>(a.buffer(sizeof(float) * max_rows_ * H, "Medusa head workspace"));
  p.logits = static_cast<float*>(a.buffer(sizeof(float) * max_level_rows * proj_vocab_, "Medusa head logits"));
  // Written once here, so a plan's first use (a timed one, in the auto tree's calibration) does
  // not pay for the memory's first touch.
  for (float* b : {p.x, p.tmp, p.emb}) be_.fill_zero(b, sizeof(float) * max_level_rows * H);
  be_.fill_zero(p.root_emb, sizeof(float) * max_rows_ * H);
  be_.fill_zero(p.logits, sizeof(float) * max_level_rows * proj_vocab_);
  be_.reserve_rows(static_cast<int>(max_level_rows));
  return p;
}

void MedusaHeads::candidates(const float* hidden, const int32_t* roots, int rows, const HeadsPlan& plan,
                             int32_t* out) {
  if (rows <= 0 || rows > max_rows_) throw Error("internal: Medusa head row count out of range");
  if (plan.depth < 1 || plan.depth > meta_.num_heads) throw Error("internal: Medusa head depth out of range");
  if (meta_.path_input) {
    path_candidates(hidden, roots, rows, plan, out);
    return;
  }
  const size_t H = hidden_;
  const int num_heads_ = plan.depth;
  const bool shared_ = meta_.shared_lm_head;
  if (meta_.root_input) be_.embed(base_embed_, roots, rows, root_emb_);
  for (int k = 0; k < num_heads_; ++k) {
    float* xk = x_ + size_t(k) * rows * H;
    if (meta_.root_input) {  // x = h + R_k e(root)
      be_.linear(root_emb_, rows, heads_[k].root, nullptr, xk);
      be_.add(xk, hidden, size_t(rows) * H);
    } else {
      be_.copy_on_device(xk, hidden, size_t(rows) * H * sizeof(float));
    }
    run_blocks(k, xk, rows, tmp_);
    if (!shared_) be_.linear(xk, rows, heads_[k].proj, nullptr, logits_ + size_t(k) * rows * vocab_);
  }
  // A shared projection reads the lm_head (or its draft rows) once for all heads.
  if (shared_) be_.linear(x_, num_heads_ * rows, draft_ids_ ? draft_proj_ : base_lm_head_, nullptr, logits_);
  be_.topk(logits_, num_heads_ * rows, proj_vocab_, top_k_, out);
  if (draft_ids_) be_.map_ids(out, size_t(num_heads_) * rows * top_k_, draft_ids_);
}

DraftState MedusaHeads::draft_state(int slots, int max_seq, int max_rows) const {
  if (!meta_.draft_layer) throw Error("internal: draft_state() of heads without a draft layer");
  DraftState st;
  st.layout = KVLayout{slots, draft_.heads, max_seq, draft_.head_dim};
  st.max_rows = max_rows;
  st.arena = std::make_unique<WeightArena>(be_);
  WeightArena& a = *st.arena;
  auto fbuf = [&](size_t n, const char* what) { return static_cast<float*>(a.buffer(sizeof(float) * n, what)); };
  auto ibuf = [&](const char* what) {
    return static_cast<int32_t*>(a.buffer(sizeof(int32_t) * size_t(max_rows), what));
  };
  const size_t cache = st.layout.layer_elems();
  st.k_cache = fbuf(cache, "Medusa draft KV cache");
  st.v_cache = fbuf(cache, "Medusa draft KV cache");
  for (int32_t** p : {&st.rows, &st.tokens, &st.positions, &st.prefix, &st.slots}) *p = ibuf("Medusa draft rows");
  const size_t R = max_rows, H = hidden_;
  st.x = fbuf(R * H, "Medusa draft workspace");
  st.t = fbuf(R * H, "Medusa draft workspace");
  st.n = fbuf(R * H, "Medusa draft workspace");
  st.att = fbuf(R * H, "Medusa draft workspace");
  st.qkv = fbuf(R * 3 * H, "Medusa draft workspace");
  st.gu = fbuf(R * 2 * draft_.intermediate, "Medusa draft workspace");
  st.act = fbuf(R * draft_.intermediate, "Medusa draft workspace");
  // Plain RoPE with the base model's theta (its scaling, if any, does not apply).
  RopeConfig plain;
  plain.theta = draft_.theta;
  std::vector<float> c, s;
  rope_tables(plain, draft_.head_dim, max_seq, c, s);
  st.cos = fbuf(c.size(), "Medusa draft RoPE tables");
  st.sin = fbuf(s.size(), "Medusa draft RoPE tables");
  be_.copy_to_device(st.cos, c.data(), sizeof(float) * c.size());
  be_.copy_to_device(st.sin, s.data(), sizeof(float) * s.size());
  be_.fill_zero(st.k_cache, sizeof(float) * cache);
  be_.fill_zero(st.v_cache, sizeof(float) * cache);
  be_.reserve_rows(max_rows);
  return st;
}

void MedusaHeads::draft_forward(const float* hidden, int rows, DraftState& st) {
  if (!meta_.draft_layer || rows <= 0 || rows > st.max_rows) throw Error("internal: bad draft layer call");
  const int H = hidden_, nh = draft_.heads, hd = draft_.head_dim, I = draft_.intermediate;
  const size_t n = size_t(rows) * H;
  RowsMeta meta;
  meta.rows = rows;
  meta.tokens = st.tokens;
  meta.positions = st.positions;
  meta.slots = st.slots;
  meta.cache_index = st.positions;
  meta.prefix_len = st.prefix;
  be_.gather_rows(hidden, H, st.rows, rows, st.x);  // u = h + R e(root)
  be_.embed(base_embed_, st.tokens, rows, st.t);
  be_.linear(st.t, rows, draft_.root, nullptr, st.n);
  be_.add(st.x, st.n, n);
  be_.rmsnorm(st.x, draft_.norm1, rows, H, draft_.eps, st.n);  // u += O attn(norm1(u))
  be_.linear(st.n, rows, draft_.qkv, nullptr, st.qkv);
  be_.rope(st.qkv, rows, 3 * H, 0, nh, hd, st.positions, st.cos, st.sin);
  be_.rope(st.qkv, rows, 3 * H, H, nh, hd, st.positions, st.cos, st.sin);
  be_.kv_store(st.qkv, 3 * H, H, 2 * H, meta, st.layout, st.k_cache, st.v_cache);
  be_.attention(st.qkv, 3 * H, nh, meta, st.layout, st.k_cache, st.v_cache, st.att);
  be_.linear(st.att, rows, draft_.o, nullptr, st.t);
  be_.add_rmsnorm(st.x, st.t, draft_.norm2, rows, H, draft_.eps, st.n);  // u += D (silu(G) * U)(norm2(u))
  be_.linear(st.n, rows, draft_.gate_up, nullptr, st.gu);
  be_.silu_mul(st.gu, rows, I, st.act);
  be_.linear(st.act, rows, draft_.down, nullptr, st.t);
  be_.add(st.x, st.t, n);
}

void MedusaHeads::gather_input(const float* hidden, const float* taps, size_t tap_stride, const int32_t* index,
                               int rows, float* out) {
  be_.gather_rows(hidden, hidden_, index, rows, out);
  if (fuse_.empty()) return;
  if (rows > max_rows_) throw Error("internal: more head input rows than the heads were made for");
  for (size_t j = 0; j < fuse_.size(); ++j) {  // out += F_j rmsnorm(tap_j)
    be_.gather_rows(taps + j * tap_stride, hidden_, index, rows, fuse_in_);
    be_.rmsnorm(fuse_in_, fuse_ones_, rows, hidden_, fuse_eps_, fuse_norm_);
    be_.linear(fuse_norm_, rows, fuse_[j], nullptr, fuse_in_);
    be_.add(out, fuse_in_, size_t(rows) * hidden_);
  }
}

void MedusaHeads::run_blocks(int k, float* x, int rows, float* tmp) {
  for (int l = 0; l < meta_.num_layers; ++l) {
    be_.linear(x, rows, heads_[k].w[l], heads_[k].b[l], tmp);
    be_.add_silu(x, tmp, size_t(rows) * hidden_);
  }
}

// Level by level: head d runs once per (sequence, node at depth d with children) on
// h + R_d e(root) + sum_j P_dj e(path_j), the path's tokens gathered from the earlier levels'
// top_k lists; then every node's token is gathered from its parent's list.
void MedusaHeads::path_candidates(const float* hidden, const int32_t* roots, int rows, const HeadsPlan& plan,
                                  int32_t* out) {
  const size_t H = hidden_;
  auto add_embedded = [&](const int32_t* index, const int32_t* table, int m, const Matrix& w, float* x) {
    be_.copy_on_device(plan.tokens, index, sizeof(int32_t) * size_t(m));
    be_.map_ids(plan.tokens, size_t(m), table);
    be_.embed(base_embed_, plan.tokens, m, plan.emb);
    be_.linear(plan.emb, m, w, nullptr, plan.tmp);
    be_.add(x, plan.tmp, size_t(m) * H);
  };
  be_.embed(base_embed_, roots, rows, plan.root_emb);
  for (size_t d = 0; d < plan.levels.size(); ++d) {
    const HeadsPlan::Level& L = plan.levels[d];
    const int m = rows * L.parents;
    if (m == 0) continue;  // a root-only tree
    const Head& head = heads_[d];
    // h + R_d e(root) once per sequence, then one copy per node with children.
    be_.linear(plan.root_emb, rows, head.root, nullptr, plan.tmp);
    be_.add(plan.tmp, hidden, size_t(rows) * H);
    be_.gather_rows(plan.tmp, hidden_, L.seq, m, plan.x);
    for (size_t j = 0; j < L.path.size(); ++j) add_embedded(L.path[j], plan.drafts, m, head.path[j], plan.x);
    run_blocks(static_cast<int>(d), plan.x, m, plan.tmp);
    be_.linear(plan.x, m, draft_ids_ ? draft_proj_ : head.proj, nullptr, plan.logits);
    int32_t* lists = plan.drafts + L.drafts_offset;
    be_.topk(plan.logits, m, proj_vocab_, top_k_, lists);
    if (draft_ids_) be_.map_ids(lists, size_t(m) * top_k_, draft_ids_);
  }
  const size_t n = size_t(rows) * plan.width;
  be_.copy_on_device(out, plan.out_index, sizeof(int32_t) * n);
  be_.map_ids(out, n, plan.drafts);
}

}  // namespace medusa_rt
