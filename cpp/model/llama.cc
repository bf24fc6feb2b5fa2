#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/safetensors.h"
#include "medusa_rt/errors.h"

namespace medusa_rt {
namespace {

std::string layer_name(int i, const char* suffix) { return "model.layers." + std::to_string(i) + "." + suffix; }

}  // namespace

void ForwardRows::clear() {
  tokens.clear();
  positions.clear();
  slots.clear();
  cache_index.clear();
  prefix_len.clear();
  extra_offsets.clear();
  extra.clear();
  logit_rows.clear();
  logits_from = 0;
}

size_t LlamaModel::weight_bytes_for(const ModelConfig& c, DType dtype) {
  const int H = c.hidden_size, F = c.intermediate_size, nq = c.num_heads * c.head_dim;
  const int qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
  const size_t per_layer = matrix_bytes(dtype, qkv, H) + matrix_bytes(dtype, H, nq) + matrix_bytes(dtype, 2 * F, H) +
                           matrix_bytes(dtype, H, F) + 4 * (2 * size_t(H) + (c.attention_bias ? qkv : 0));
  return per_layer * c.num_layers + matrix_bytes(dtype, c.vocab_size, H) * (c.tie_word_embeddings ? 1 : 2) + 4 * size_t(H);
}

size_t LlamaModel::kv_bytes_for(const ModelConfig& c, const ModelLimits& lim) {
  const KVLayout layer{lim.slots, c.num_kv_heads, lim.max_seq, c.head_dim, lim.kv_dtype};
  return 2 * layer.layer_bytes() * size_t(c.num_layers);
}

size_t LlamaModel::workspace_bytes_for(const ModelConfig& c, const ModelLimits& lim) {
  const size_t H = c.hidden_size, F = c.intermediate_size, hd = c.head_dim;
  const size_t qkv = (size_t(c.num_heads) + 2 * c.num_kv_heads) * hd;
  size_t per_row = 4 * (3 * H + qkv + c.num_heads * hd + 3 * F);
  return per_row * lim.max_rows + 4 * size_t(lim.max_logit_rows) * (H + c.vocab_size) +
         4 * size_t(lim.max_seq) * hd /* rope */ + 4 * size_t(lim.max_rows) * (9 + lim.max_tree_depth);
}

void rope_tables(const RopeConfig& r, int head_dim, int positions, std::vector<float>& c, std::vector<float>& s) {
  // Mirrors transformers' rope initialisation in fp32: inv_freq = 1 / theta^(2i/d), scaled per
  // rope type, angle = float(pos) * inv_freq.
  const int d = head_dim, half = d / 2;
  std::vector<float> inv(half);
  const float theta = static_cast<float>(r.theta);
  for (int i = 0; i < half; ++i) inv[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(d));
  if (r.type == RopeConfig::Type::kLinear) {
    for (float& f : inv) f /= static_cast<float>(r.factor);
  } else if (r.type == RopeConfig::Type::kLlama3) {
    const float factor = r.factor, lo = r.low_freq_factor, hi = r.high_freq_factor;
    const float old_ctx = static_cast<float>(r.original_max_position_embeddings);
    const float low_wavelen = old_ctx / lo, high_wavelen = old_ctx / hi;
    for (float& f : inv) {
      const float wavelen = 2.0f * static_cast<float>(M_PI) / f;
      float scaled = wavelen > low_wavelen ? f / factor : f;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const float smooth = (old_ctx / wavelen - lo) / (hi - lo);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  c.assign(size_t(positions) * half, 0.0f);
  s.assign(size_t(positions) * half, 0.0f);
  for (int p = 0; p < positions; ++p) {
    for (int i = 0; i < half; ++i) {
      const float a = static_cast<float>(p) * inv[i];
      c[size_t(p) * half + i] = std::cos(a);
      s[size_t(p) * half + i] = std::sin(a);
    }
  }
}

void LlamaModel::build_rope_tables() {
  std::vector<float> c, s;
  rope_tables(cfg_.rope, cfg_.head_dim, lim_.max_seq, c, s);
  rope_cos_ = alloc<float>(c.size(), "rope tables");
  rope_sin_ = alloc<float>(s.size(), "rope tables");
  be_.copy_to_device(rope_cos_, c.data(), c.size() * sizeof(float));
  be_.copy_to_device(rope_sin_, s.data(), s.size() * sizeof(float));
}

LlamaModel::LlamaModel(const ModelConfig& cfg, const TensorStore& store, DType dtype, const ModelLimits& lim,
                       Backend& backend)
    : cfg_(cfg), lim_(lim), be_(backend), arena_(backend) {
  if (lim.max_rows <= 0 || lim.max_logit_rows > lim.max_rows || lim.slots <= 0 || lim.max_seq <= 0) {
    throw Error("internal: bad model limits");
  }
  {
    const int H = cfg.hidden_size, F = cfg.intermediate_size, hd = cfg.head_dim;
    const int nq = cfg.num_heads * hd, nkv = cfg.num_kv_heads * hd;
    qkv_width_ = nq + 2 * nkv;

    // Validate every shape before converting anything.
    auto expect = [&](const std::string& name, std::vector<int64_t> shape) {
      check_shape(store.get(name), shape, "config.json");
    };
    auto T = [&](const std::string& name) { return &store.get(name); };
    expect("model.embed_tokens.weight", {cfg.vocab_size, H});
    expect("model.norm.weight", {H});
    if (!cfg.tie_word_embeddings) expect("lm_head.weight", {cfg.vocab_size, H});
    for (int i = 0; i < cfg.num_layers; ++i) {
      expect(layer_name(i, "input_layernorm.weight"), {H});
      expect(layer_name(i, "post_attention_layernorm.weight"), {H});
      expect(layer_name(i, "self_attn.q_proj.weight"), {nq, H});
      expect(layer_name(i, "self_attn.k_proj.weight"), {nkv, H});
      expect(layer_name(i, "self_attn.v_proj.weight"), {nkv, H});
      expect(layer_name(i, "self_attn.o_proj.weight"), {H, nq});
      expect(layer_name(i, "mlp.gate_proj.weight"), {F, H});
      expect(layer_name(i, "mlp.up_proj.weight"), {F, H});
      expect(layer_name(i, "mlp.down_proj.weight"), {H, F});
      if (cfg.attention_bias) {
        expect(layer_name(i, "self_attn.q_proj.bias"), {nq});
        expect(layer_name(i, "self_attn.k_proj.bias"), {nkv});
        expect(layer_name(i, "self_attn.v_proj.bias"), {nkv});
      }
    }

    embed_ = arena_.matrix({T("model.embed_tokens.weight")}, H, dtype);
    lm_head_ = cfg.tie_word_embeddings ? embed_ : arena_.matrix({T("lm_head.weight")}, H, dtype);
    final_norm_ = arena_.vector({T("model.norm.weight")});
    layers_.resize(cfg.num_layers);
    for (int i = 0; i < cfg.num_layers; ++i) {
      Layer& L = layers_[i];
      auto lt = [&](const char* suffix) { return T(layer_name(i, suffix)); };
      L.ln1 = arena_.vector({lt("input_layernorm.weight")});
      L.ln2 = arena_.vector({lt("post_attention_layernorm.weight")});
      L.qkv = arena_.matrix({lt("self_attn.q_proj.weight"), lt("self_attn.k_proj.weight"), lt("self_attn.v_proj.weight")},
                            H, dtype);
      if (cfg.attention_bias) {
        L.qkv_bias = arena_.vector({lt("self_attn.q_proj.bias"), lt("self_attn.k_proj.bias"), lt("self_attn.v_proj.bias")});
      }
      L.o = arena_.matrix({lt("self_attn.o_proj.weight")}, nq, dtype);
      L.gate_up = arena_.matrix({lt("mlp.gate_proj.weight"), lt("mlp.up_proj.weight")}, H, dtype);
      L.down = arena_.matrix({lt("mlp.down_proj.weight")}, F, dtype);
    }
    weight_bytes_ = arena_.weight_bytes();

    kv_layout_ = KVLayout{lim.slots, cfg.num_kv_heads, lim.max_seq, hd, lim.kv_dtype};
    const size_t kv_bytes = kv_layout_.layer_bytes() * cfg.num_layers;
    k_cache_ = alloc<char>(kv_bytes, "the KV cache (keys)");
    v_cache_ = alloc<char>(kv_bytes, "the KV cache (values)");
    be_.fill_zero(k_cache_, kv_bytes);  // commit the pages now, not mid-generation
    be_.fill_zero(v_cache_, kv_bytes);
    kv_bytes_ = 2 * kv_bytes;
    build_rope_tables();

    const size_t R = lim.max_rows, LR = lim.max_logit_rows;
    auto fbuf = [&](size_t n) { return alloc<float>(n, "activation workspace"); };
    auto ibuf = [&](size_t n) { return alloc<int32_t>(n, "row metadata"); };
    x_ = fbuf(R * H);
    xn_ = fbuf(R * std::max(H, nq));
    qkv_ = fbuf(R * qkv_width_);
    attn_ = fbuf(R * nq);
    tmp_ = fbuf(R * H);
    gu_ = fbuf(R * 2 * F);
    act_ = fbuf(R * F);
    hidden_ = fbuf(LR * H);
    logits_ = fbuf(LR * cfg.vocab_size);
    d_tokens_ = ibuf(R);
    d_positions_ = ibuf(R);
    d_slots_ = ibuf(R);
    d_cache_index_ = ibuf(R);
    d_prefix_len_ = ibuf(R);
    d_extra_offsets_ = ibuf(R + 1);
    d_extra_ = ibuf(R * (lim.max_tree_depth + 1));
    d_logit_rows_ = ibuf(LR);
    d_copy_slots_ = ibuf(R);
    d_copy_src_ = ibuf(R);
    d_copy_dst_ = ibuf(R);
    be_.prepare(kv_layout_);
    be_.reserve_rows(lim.max_rows);
  }
}

LlamaModel::~LlamaModel() = default;

void LlamaModel::read_kv(int slot, int layer, int length, std::vector<float>& k, std::vector<float>& v) {
  const KVLayout& L = kv_layout_;
  const size_t row = size_t(length) * L.head_dim;
  k.resize(size_t(L.kv_heads) * row);
  v.resize(k.size());
  std::vector<uint16_t> half(L.dtype == DType::kF32 ? 0 : row);
  auto read = [&](const char* cache, size_t base, float* out) {
    if (L.dtype == DType::kF32) {
      be_.copy_to_host(out, cache + base, row * sizeof(float));
      return;
    }
    be_.copy_to_host(half.data(), cache + base, row * sizeof(uint16_t));
    for (size_t i = 0; i < row; ++i) out[i] = bf16_to_f32(half[i]);
  };
  for (int h = 0; h < L.kv_heads; ++h) {
    const size_t base = L.layer_bytes() * layer + (size_t(slot) * L.kv_heads + h) * L.max_seq * L.head_dim * L.elem_bytes();
    read(k_cache_, base, k.data() + h * row);
    read(v_cache_, base, v.data() + h * row);
  }
}

void LlamaModel::copy_kv(const int32_t* slots, const int32_t* src, const int32_t* dst, int n) {
  if (n <= 0) return;
  if (n > lim_.max_rows) throw Error("internal: too many KV copies");
  be_.copy_to_device(d_copy_slots_, slots, n * sizeof(int32_t));
  be_.copy_to_device(d_copy_src_, src, n * sizeof(int32_t));
  be_.copy_to_device(d_copy_dst_, dst, n * sizeof(int32_t));
  be_.kv_copy(k_cache_, v_cache_, cfg_.num_layers, kv_layout_, d_copy_slots_, d_copy_src_, d_copy_dst_, n);
}

void LlamaModel::copy_slot_prefix(int src, int dst, int begin, int end) {
  const KVLayout& L = kv_layout_;
  if (src < 0 || src >= L.slots || dst < 0 || dst >= L.slots || src == dst || begin < 0 || end > L.max_seq) {
    throw Error("internal: KV prefix copy out of range");
  }
  if (begin >= end) return;
  // Per layer and cache: the slot's KV heads are max_seq rows apart, one strided copy of them.
  const size_t row = size_t(L.head_dim) * L.elem_bytes(), head_pitch = size_t(L.max_seq) * row;
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const size_t layer = L.layer_bytes() * l + size_t(begin) * row;
    const size_t from = layer + size_t(src) * L.kv_heads * head_pitch, to = layer + size_t(dst) * L.kv_heads * head_pitch;
    for (char* cache : {k_cache_, v_cache_}) {
      be_.copy_on_device_2d(cache + to, head_pitch, cache + from, head_pitch, size_t(end - begin) * row, L.kv_heads);
    }
  }
}

void LlamaModel::set_taps(const std::vector<int>& layers) {
  if (layers.size() > size_t(kMaxTaps)) {
    throw InvalidArgumentError("at most " + std::to_string(kMaxTaps) + " layer taps, got " + std::to_string(layers.size()));
  }
  for (size_t j = 0; j < layers.size(); ++j) {
    const int L = layers[j];
    if (std::find(layers.begin(), layers.begin() + j, L) != layers.begin() + j) {
      throw InvalidArgumentError("layer tap " + std::to_string(L) + " is listed twice");
    }
    if (L < 1 || L >= cfg_.num_layers) {
      throw InvalidArgumentError("layer tap " + std::to_string(L) + " is out of range: the model's decoder layers " +
                                 "are 1.." + std::to_string(cfg_.num_layers - 1) + " (the last one's output is the " +
                                 "final hidden state itself)");
    }
  }
  if (layers.size() > tap_capacity_) {  // grows only (a captured CUDA graph keeps the old buffer)
    taps_ = alloc<float>(layers.size() * tap_stride(), "layer taps");
    tap_capacity_ = layers.size();
  }
  tap_layers_ = layers;
  tap_at_.assign(cfg_.num_layers, -1);
  for (size_t j = 0; j < layers.size(); ++j) tap_at_[layers[j] - 1] = static_cast<int>(j);
}

void LlamaModel::forward(const ForwardRows& rows, int32_t* argmax) {
  const int R = rows.size();
  const int NL = static_cast<int>(rows.logit_rows.size());
  if (R <= 0 || R > lim_.max_rows || NL > lim_.max_logit_rows) throw Error("internal: forward row count out of limits");
  if (rows.extra.size() > size_t(R) * (lim_.max_tree_depth + 1)) throw Error("internal: too many tree keys");
  auto up = [&](int32_t* dst, const std::vector<int32_t>& src) {
    if (!src.empty()) be_.copy_to_device(dst, src.data(), src.size() * sizeof(int32_t));
  };
  up(d_tokens_, rows.tokens);
  up(d_positions_, rows.positions);
  up(d_slots_, rows.slots);
  up(d_cache_index_, rows.cache_index);
  up(d_prefix_len_, rows.prefix_len);
  up(d_extra_offsets_, rows.extra_offsets);
  up(d_extra_, rows.extra);
  up(d_logit_rows_, rows.logit_rows);
  run(R, NL, rows.logits_from, !rows.extra_offsets.empty(), argmax);
}

LlamaModel::DeviceRows LlamaModel::device_rows() const {
  return DeviceRows{d_tokens_, d_positions_, d_slots_,       d_cache_index_, d_prefix_len_, d_extra_offsets_,
                    d_extra_,  d_logit_rows_, d_copy_slots_, d_copy_src_,    d_copy_dst_};
}

void LlamaModel::run_device_rows(int R, bool has_extra, int32_t* argmax) {
  if (R <= 0 || R > lim_.max_rows || R > lim_.max_logit_rows) throw Error("internal: forward row count out of limits");
  run(R, R, 0, has_extra, argmax);
}

void LlamaModel::copy_kv_device(int n) {
  if (n <= 0) return;
  if (n > lim_.max_rows) throw Error("internal: too many KV copies");
  be_.kv_copy(k_cache_, v_cache_, cfg_.num_layers, kv_layout_, d_copy_slots_, d_copy_src_, d_copy_dst_, n);
}

void LlamaModel::run(int R, int NL, int logits_from, bool has_extra, int32_t* argmax) {
  const int H = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
  const int nq = cfg_.num_heads * hd, nkv = cfg_.num_kv_heads * hd;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  RowsMeta meta;
  meta.rows = R;
  meta.tokens = d_tokens_;
  meta.positions = d_positions_;
  meta.slots = d_slots_;
  meta.cache_index = d_cache_index_;
  meta.prefix_len = d_prefix_len_;
  meta.extra_offsets = has_extra ? d_extra_offsets_ : nullptr;
  meta.extra = has_extra ? d_extra_ : nullptr;

  // MEDUSA_RT_PROFILE=1: time of every op kind, printed when the model is destroyed.
  OpTimer t(prof_.get());
  t.run(OpTimer::kEmbed, [&] { be_.embed(embed_, d_tokens_, R, x_); });
  const size_t layer_bytes = kv_layout_.layer_bytes();
  t.run(OpTimer::kNorm, [&] { be_.rmsnorm(x_, layers_[0].ln1, R, H, eps, xn_); });
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const Layer& L = layers_[l];
    char* kc = k_cache_ + layer_bytes * l;
    char* vc = v_cache_ + layer_bytes * l;
    // xn_ holds ln1(x): every residual add is fused with the norm that follows it.
    t.run(OpTimer::kGemm, [&] { be_.linear(xn_, R, L.qkv, L.qkv_bias, qkv_); });
    t.run(OpTimer::kRope, [&] {
      be_.rope(qkv_, R, qkv_width_, 0, cfg_.num_heads, hd, d_positions_, rope_cos_, rope_sin_);
      be_.rope(qkv_, R, qkv_width_, nq, cfg_.num_kv_heads, hd, d_positions_, rope_cos_, rope_sin_);
      be_.kv_store(qkv_, qkv_width_, nq, nq + nkv, meta, kv_layout_, kc, vc);
    });
    t.run(OpTimer::kAttention, [&] { be_.attention(qkv_, qkv_width_, cfg_.num_heads, meta, kv_layout_, kc, vc, attn_); });
    t.run(OpTimer::kGemm, [&] { be_.linear(attn_, R, L.o, nullptr, tmp_); });
    t.run(OpTimer::kElementwise, [&] { be_.add_rmsnorm(x_, tmp_, L.ln2, R, H, eps, xn_); });
    t.run(OpTimer::kGemm, [&] { be_.linear(xn_, R, L.gate_up, nullptr, gu_); });
    t.run(OpTimer::kElementwise, [&] { be_.silu_mul(gu_, R, F, act_); });
    t.run(OpTimer::kGemm, [&] { be_.linear(act_, R, L.down, nullptr, tmp_); });
    t.run(OpTimer::kElementwise, [&] {
      if (l + 1 < cfg_.num_layers) {
        be_.add_rmsnorm(x_, tmp_, layers_[l + 1].ln1, R, H, eps, xn_);
      } else {
        be_.add(x_, tmp_, size_t(R) * H);  // the final norm runs on the logit rows only
      }
    });
    if (NL > 0 && !tap_layers_.empty() && tap_at_[l] >= 0) {
      t.run(OpTimer::kNorm, [&] { be_.gather_rows(x_, H, d_logit_rows_, NL, taps_ + tap_at_[l] * tap_stride()); });
    }
  }
  if (NL > 0) {
    t.run(OpTimer::kNorm, [&] {
      be_.gather_rows(x_, H, d_logit_rows_, NL, tmp_);
      be_.rmsnorm(tmp_, final_norm_, NL, H, eps, hidden_);
    });
    const int from = std::min(std::max(logits_from, 0), NL);
    if (from < NL) {
      t.run(OpTimer::kLmHead, [&] {
        const float* h = hidden_ + size_t(from) * H;
        float* logits = logits_ + size_t(from) * cfg_.vocab_size;
        if (argmax) {
          be_.linear_argmax(h, NL - from, lm_head_, logits, argmax + from);
        } else {
          be_.linear(h, NL - from, lm_head_, nullptr, logits);
        }
      });
    }
  }
  t.finish(R);
}

}  // namespace medusa_rt
