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
        py::call_guard<py::gil_scoped_release>());
  t.def("stream_bandwidth", &testing::stream_bandwidth, py::arg("bytes") = size_t(1) << 29, py::arg("threads") = 0,
        py::arg("reps") = 3, py::call_guard<py::gil_scoped_release>());
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
}

}  // namespace medusa_rt::python
