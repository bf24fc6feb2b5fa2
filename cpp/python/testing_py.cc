// medusa_rt._core._testing: test hooks of cpp/api/testing.h (not a public API).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "api/testing.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_testing(py::module_& m) {
  py::module_ t = m.def_submodule("_testing", "test hooks (not a public API)");
  t.def("set_oracle", &testing::set_oracle, py::arg("session"), py::arg("tokens"), py::arg("vary_rank") = true);
  t.def("set_record", &testing::set_record, py::arg("session"), py::arg("on"));
  t.def("take_records", [](Session& s) {
    py::list out;
    for (auto& r : testing::take_records(s)) {
      const py::ssize_t n = static_cast<py::ssize_t>(r.tokens.size());
      py::array_t<float> logits({n, static_cast<py::ssize_t>(r.logits.size() / std::max<size_t>(1, r.tokens.size()))});
      std::copy(r.logits.begin(), r.logits.end(), logits.mutable_data());
      py::dict d;
      d["tokens"] = r.tokens;
      d["logits"] = logits;
      d["path"] = r.path;
      out.append(d);
    }
    return out;
  });
  t.def("time_tree_step", &testing::time_tree_step, py::arg("engine"), py::arg("nodes"), py::arg("reps") = 3,
        py::arg("context") = 0, py::call_guard<py::gil_scoped_release>());
  t.def("draft_vocab", &testing::draft_vocab, py::arg("engine"));
  t.def("stream_bandwidth", &testing::stream_bandwidth, py::arg("bytes") = size_t(1) << 29, py::arg("threads") = 0,
        py::arg("reps") = 3, py::call_guard<py::gil_scoped_release>());
  t.def("thread_pool_check", &testing::thread_pool_check, py::arg("threads"), py::arg("jobs"), py::arg("max_tasks"),
        py::call_guard<py::gil_scoped_release>());
  t.def("fma_peak", &testing::fma_peak, py::arg("threads") = 0, py::arg("reps") = 3,
        py::call_guard<py::gil_scoped_release>());
  t.def("read_kv", [](Session& s, int layer, int length) {
    std::vector<float> k, v;
    testing::read_kv(s, layer, length, k, v);
    auto arr = [&](const std::vector<float>& x) {
      py::array_t<float> a(static_cast<py::ssize_t>(x.size()));
      std::copy(x.begin(), x.end(), a.mutable_data());
      return a;
    };
    return py::make_tuple(arr(k), arr(v));
  });

  using testing::BackendHarness;
  using F = std::vector<float>;
  using I = std::vector<int32_t>;
  auto layout = [](int slots, int kv_heads, int max_seq, int head_dim) {
    return KVLayout{slots, kv_heads, max_seq, head_dim};
  };
  py::class_<BackendHarness>(t, "BackendHarness")
      .def(py::init<const std::string&, int>(), py::arg("device"), py::arg("num_threads") = 1)
      .def_property_readonly("device_name", &BackendHarness::device_name)
      .def("linear", &BackendHarness::linear)
      .def("linear_argmax", &BackendHarness::linear_argmax)
      .def("embed", &BackendHarness::embed)
      .def("rmsnorm", &BackendHarness::rmsnorm)
      .def("add_rmsnorm", &BackendHarness::add_rmsnorm)
      .def("rope", &BackendHarness::rope)
      .def("silu_mul", &BackendHarness::silu_mul)
      .def("add", &BackendHarness::add)
      .def("gather_rows", &BackendHarness::gather_rows)
      .def("argmax", &BackendHarness::argmax)
      .def("topk", &BackendHarness::topk)
      .def("softmax_stats", &BackendHarness::softmax_stats)
      .def("attention",
           [layout](BackendHarness& h, const F& qkv, int rows, int row_stride, int heads, int kv_heads, int max_seq,
                    int head_dim, const I& slots, const I& cache_index, const I& prefix_len, const I& extra_offsets,
                    const I& extra, int k_col0, int v_col0, F k_cache, F v_cache, bool kv_bf16) {
             const int nslots = static_cast<int>(k_cache.size() / (size_t(kv_heads) * max_seq * head_dim));
             KVLayout L = layout(nslots, kv_heads, max_seq, head_dim);
             if (kv_bf16) L.dtype = DType::kBF16;
             F out = h.attention(qkv, rows, row_stride, heads, L, slots, cache_index, prefix_len, extra_offsets, extra,
                                 k_col0, v_col0, k_cache, v_cache);
             return py::make_tuple(out, k_cache, v_cache);
           },
           py::arg("qkv"), py::arg("rows"), py::arg("row_stride"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("max_seq"), py::arg("head_dim"), py::arg("slots"), py::arg("cache_index"), py::arg("prefix_len"),
           py::arg("extra_offsets"), py::arg("extra"), py::arg("k_col0"), py::arg("v_col0"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("kv_bf16") = false)
      .def("kv_copy", [layout](BackendHarness& h, F k_cache, F v_cache, int layers, int slots, int kv_heads,
                               int max_seq, int head_dim, const I& slot, const I& src, const I& dst) {
        h.kv_copy(k_cache, v_cache, layers, layout(slots, kv_heads, max_seq, head_dim), slot, src, dst);
        return py::make_tuple(k_cache, v_cache);
      });
}

}  // namespace medusa_rt::python
