// testing::BackendHarness: runs single Backend operations on host data (see testing.h).
#include <cstring>

#include "api/testing.h"
#include "core/dtype.h"
#include "medusa_rt/errors.h"
#include "model/backend.h"

namespace medusa_rt::testing {
namespace {

DType weight_dtype(const std::string& s) {
  if (s == "fp32") return DType::kF32;
  if (s == "bf16") return DType::kBF16;
  if (s == "fp16") return DType::kF16;
  if (s == "int8") return DType::kI8;
  throw InvalidArgumentError("dtype must be fp32, bf16, fp16 or int8, got " + s);
}

}  // namespace

// Backend memory that frees itself.
struct BackendHarness::Buf {
  Backend& be;
  void* p;
  Buf(Backend& b, size_t bytes) : be(b), p(b.allocate(bytes, "test buffer")) {}
  ~Buf() { be.deallocate(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

BackendHarness::BackendHarness(const std::string& device, int num_threads) {
  if (device == "cpu" || device == "cpu-bf16-inputs") {  // the latter: EngineOptions::matmul_inputs "bf16"
    be_ = make_cpu_backend(num_threads, device == "cpu-bf16-inputs");
  } else if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#ifdef MEDUSA_RT_HAVE_CUDA
    be_ = make_cuda_backend(device == "cuda" ? 0 : std::stoi(device.substr(5)));
#else
    throw InvalidArgumentError("this build has no CUDA backend");
#endif
  } else {
    throw InvalidArgumentError("device must be cpu, cpu-bf16-inputs or cuda[:N], got " + device);
  }
}

BackendHarness::~BackendHarness() = default;

std::string BackendHarness::device_name() const { return be_->device_name(); }

template <class T>
std::unique_ptr<BackendHarness::Buf> BackendHarness::upload(const std::vector<T>& v) {
  auto b = std::make_unique<Buf>(*be_, std::max<size_t>(1, v.size()) * sizeof(T));
  if (!v.empty()) be_->copy_to_device(b->p, v.data(), v.size() * sizeof(T));
  return b;
}

template <class T>
std::vector<T> BackendHarness::download(const Buf& b, size_t n) {
  std::vector<T> out(n);
  be_->copy_to_host(out.data(), b.p, n * sizeof(T));
  return out;
}

Matrix BackendHarness::matrix(const std::vector<float>& w, int rows, int cols, const std::string& dtype) {
  if (w.size() != size_t(rows) * cols) throw InvalidArgumentError("matrix data does not match its shape");
  const DType dt = weight_dtype(dtype);
  std::vector<uint8_t> host((dt == DType::kI8 ? 4 : dtype_size(dt)) * w.size());  // int8: quantized from fp32
  for (size_t i = 0; i < w.size(); ++i) {
    if (dt == DType::kF32 || dt == DType::kI8) {
      std::memcpy(host.data() + 4 * i, &w[i], 4);
    } else {
      const uint16_t h = dt == DType::kBF16 ? f32_to_bf16(w[i]) : f32_to_f16(w[i]);
      std::memcpy(host.data() + 2 * i, &h, 2);
    }
  }
  return be_->upload_matrix(host.data(), dt, rows, cols, "test matrix");
}

std::vector<float> BackendHarness::linear(const std::vector<float>& x, int rows, const std::vector<float>& w, int n,
                                          int k, const std::string& dtype, const std::vector<float>& bias) {
  const Matrix m = matrix(w, n, k, dtype);
  be_->reserve_rows(rows);
  auto dx = upload(x), db = upload(bias);
  Buf y(*be_, sizeof(float) * size_t(rows) * n);
  be_->linear(dx->as<float>(), rows, m, bias.empty() ? nullptr : db->as<float>(), y.as<float>());
  auto out = download<float>(y, size_t(rows) * n);
  be_->deallocate(const_cast<void*>(m.data));
  return out;
}

std::vector<int32_t> BackendHarness::linear_argmax(const std::vector<float>& x, int rows, const std::vector<float>& w,
                                                  int n, int k, const std::string& dtype) {
  const Matrix m = matrix(w, n, k, dtype);
  be_->reserve_rows(rows);
  auto dx = upload(x);
  Buf scratch(*be_, sizeof(float) * size_t(rows) * n), y(*be_, sizeof(int32_t) * rows);
  be_->linear_argmax(dx->as<float>(), rows, m, scratch.as<float>(), y.as<int32_t>());
  auto out = download<int32_t>(y, rows);
  be_->deallocate(const_cast<void*>(m.data));
  return out;
}

std::vector<float> BackendHarness::embed(const std::vector<float>& table, int rows, int cols, const std::string& dtype,
                                         const std::vector<int32_t>& tokens) {
  const Matrix m = matrix(table, rows, cols, dtype);
  auto dt = upload(tokens);
  Buf y(*be_, sizeof(float) * tokens.size() * cols);
  be_->embed(m, dt->as<int32_t>(), static_cast<int>(tokens.size()), y.as<float>());
  auto out = download<float>(y, tokens.size() * cols);
  std::vector<float> row(cols);
  be_->matrix_row(m, rows - 1, row.data());  // matrix_row agrees with embed on the last row
  out.insert(out.end(), row.begin(), row.end());
  be_->deallocate(const_cast<void*>(m.data));
  return out;
}

std::vector<float> BackendHarness::rmsnorm(const std::vector<float>& x, int rows, const std::vector<float>& w,
                                           float eps) {
  const int dim = static_cast<int>(w.size());
  auto dx = upload(x), dw = upload(w);
  Buf y(*be_, sizeof(float) * x.size());
  be_->rmsnorm(dx->as<float>(), dw->as<float>(), rows, dim, eps, y.as<float>());
  return download<float>(y, x.size());
}

std::vector<float> BackendHarness::add_rmsnorm(const std::vector<float>& x, const std::vector<float>& y, int rows,
                                               const std::vector<float>& w, float eps) {
  const int dim = static_cast<int>(w.size());
  auto dx = upload(x), dy = upload(y), dw = upload(w);
  Buf o(*be_, sizeof(float) * x.size());
  be_->add_rmsnorm(dx->as<float>(), dy->as<float>(), dw->as<float>(), rows, dim, eps, o.as<float>());
  std::vector<float> out = download<float>(*dx, x.size());
  const std::vector<float> normed = download<float>(o, x.size());
  out.insert(out.end(), normed.begin(), normed.end());
  return out;
}

std::vector<float> BackendHarness::rope(const std::vector<float>& x, int rows, int row_stride, int col0, int heads,
                                        int head_dim, const std::vector<int32_t>& positions,
                                        const std::vector<float>& cos, const std::vector<float>& sin) {
  auto dx = upload(x), dp = upload(positions), dc = upload(cos), ds = upload(sin);
  be_->rope(dx->as<float>(), rows, row_stride, col0, heads, head_dim, dp->as<int32_t>(), dc->as<float>(),
            ds->as<float>());
  return download<float>(*dx, x.size());
}

std::vector<float> BackendHarness::silu_mul(const std::vector<float>& gu, int rows) {
  const int dim = static_cast<int>(gu.size() / rows / 2);
  auto dg = upload(gu);
  Buf y(*be_, sizeof(float) * size_t(rows) * dim);
  be_->silu_mul(dg->as<float>(), rows, dim, y.as<float>());
  return download<float>(y, size_t(rows) * dim);
}

std::vector<float> BackendHarness::add(const std::vector<float>& x, const std::vector<float>& y, bool silu) {
  auto dx = upload(x), dy = upload(y);
  if (silu) {
    be_->add_silu(dx->as<float>(), dy->as<float>(), x.size());
  } else {
    be_->add(dx->as<float>(), dy->as<float>(), x.size());
  }
  return download<float>(*dx, x.size());
}

std::vector<float> BackendHarness::gather_rows(const std::vector<float>& x, int dim, const std::vector<int32_t>& index) {
  auto dx = upload(x), di = upload(index);
  Buf y(*be_, sizeof(float) * index.size() * dim);
  be_->gather_rows(dx->as<float>(), dim, di->as<int32_t>(), static_cast<int>(index.size()), y.as<float>());
  return download<float>(y, index.size() * dim);
}

std::vector<int32_t> BackendHarness::argmax(const std::vector<float>& logits, int rows) {
  const int vocab = static_cast<int>(logits.size() / rows);
  auto dl = upload(logits);
  Buf y(*be_, sizeof(int32_t) * rows);
  be_->argmax(dl->as<float>(), rows, vocab, y.as<int32_t>());
  return download<int32_t>(y, rows);
}

std::vector<int32_t> BackendHarness::topk(const std::vector<float>& logits, int rows, int k,
                                          const std::vector<int32_t>& id_map) {
  const int vocab = static_cast<int>(logits.size() / rows);
  auto dl = upload(logits), dm = upload(id_map);
  Buf y(*be_, sizeof(int32_t) * rows * k);
  be_->topk(dl->as<float>(), rows, vocab, k, y.as<int32_t>());
  if (!id_map.empty()) be_->map_ids(y.as<int32_t>(), size_t(rows) * k, dm->as<int32_t>());
  return download<int32_t>(y, size_t(rows) * k);
}

std::vector<float> BackendHarness::softmax_stats(const std::vector<float>& logits, int rows, float temperature) {
  const int vocab = static_cast<int>(logits.size() / rows);
  be_->reserve_rows(rows);
  auto dl = upload(logits);
  std::vector<float> out(2 * size_t(rows));
  be_->softmax_stats(dl->as<float>(), rows, vocab, temperature, out.data(), out.data() + rows);
  return out;
}

std::vector<float> BackendHarness::attention(const std::vector<float>& qkv, int rows, int row_stride, int heads,
                                             const KVLayout& layout, const std::vector<int32_t>& slots,
                                             const std::vector<int32_t>& cache_index,
                                             const std::vector<int32_t>& prefix_len,
                                             const std::vector<int32_t>& extra_offsets,
                                             const std::vector<int32_t>& extra, int k_col0, int v_col0,
                                             std::vector<float>& k_cache, std::vector<float>& v_cache) {
  if (k_cache.size() != layout.layer_elems() || v_cache.size() != layout.layer_elems()) {
    throw InvalidArgumentError("cache size does not match the layout");
  }
  be_->prepare(layout);
  const bool bf16 = layout.dtype == DType::kBF16;
  auto to_bf16 = [](const std::vector<float>& x) {
    std::vector<uint16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = f32_to_bf16(x[i]);
    return h;
  };
  auto dq = upload(qkv), ds = upload(slots), dci = upload(cache_index), dp = upload(prefix_len),
       deo = upload(extra_offsets), de = upload(extra);
  auto dk = bf16 ? upload(to_bf16(k_cache)) : upload(k_cache), dv = bf16 ? upload(to_bf16(v_cache)) : upload(v_cache);
  RowsMeta meta;
  meta.rows = rows;
  meta.slots = ds->as<int32_t>();
  meta.cache_index = dci->as<int32_t>();
  meta.prefix_len = dp->as<int32_t>();
  meta.extra_offsets = extra_offsets.empty() ? nullptr : deo->as<int32_t>();
  meta.extra = extra_offsets.empty() ? nullptr : de->as<int32_t>();
  // The rows' own K/V go into the cache first, as in the forward.
  be_->kv_store(dq->as<float>(), row_stride, k_col0, v_col0, meta, layout, dk->p, dv->p);
  Buf out(*be_, sizeof(float) * size_t(rows) * heads * layout.head_dim);
  be_->attention(dq->as<float>(), row_stride, heads, meta, layout, dk->p, dv->p, out.as<float>());
  auto back = [&](const Buf& b, std::vector<float>& cache) {
    if (!bf16) {
      cache = download<float>(b, cache.size());
      return;
    }
    const std::vector<uint16_t> h = download<uint16_t>(b, cache.size());
    for (size_t i = 0; i < h.size(); ++i) cache[i] = bf16_to_f32(h[i]);
  };
  back(*dk, k_cache);
  back(*dv, v_cache);
  return download<float>(out, size_t(rows) * heads * layout.head_dim);
}

void BackendHarness::kv_copy(std::vector<float>& k_cache, std::vector<float>& v_cache, int layers,
                             const KVLayout& layout, const std::vector<int32_t>& slots, const std::vector<int32_t>& src,
                             const std::vector<int32_t>& dst) {
  if (k_cache.size() != layout.layer_elems() * layers || v_cache.size() != k_cache.size()) {
    throw InvalidArgumentError("cache size does not match the layout");
  }
  auto dk = upload(k_cache), dv = upload(v_cache), ds = upload(slots), dsrc = upload(src), ddst = upload(dst);
  be_->kv_copy(dk->as<float>(), dv->as<float>(), layers, layout, ds->as<int32_t>(), dsrc->as<int32_t>(),
               ddst->as<int32_t>(), static_cast<int>(slots.size()));
  k_cache = download<float>(*dk, k_cache.size());
  v_cache = download<float>(*dv, v_cache.size());
}

}  // namespace medusa_rt::testing
