#include <pybind11/stl.h>

#include "medusa_rt/tree.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_tree(py::module_& m) {
  py::class_<TreeSpec>(m, "TreeSpec")
      .def(py::init<>())
      .def(py::init<const std::vector<TreeSpec::Path>&, std::string>(), py::arg("choices"), py::arg("name") = "custom")
      .def_static("named", &TreeSpec::named, py::arg("name"))
      .def_static("builtin_names", &TreeSpec::builtin_names)
      .def("check_fits", &TreeSpec::check_fits, py::arg("num_heads"), py::arg("top_k"))
      .def("truncated", &TreeSpec::truncated, py::arg("nodes"))
      .def_property_readonly("name", &TreeSpec::name)
      .def_property_readonly("num_nodes", &TreeSpec::num_nodes)
      .def_property_readonly("max_depth", &TreeSpec::max_depth)
      .def_property_readonly("max_rank", &TreeSpec::max_rank)
      .def_property_readonly("paths", &TreeSpec::paths)
      .def_property_readonly("depths", &TreeSpec::depths)
      .def_property_readonly("parents", &TreeSpec::parents)
      .def_property_readonly("ranks", &TreeSpec::ranks)
      .def_property_readonly("ancestors", &TreeSpec::ancestors)
      .def("tree_indices", &TreeSpec::tree_indices, py::arg("top_k"))
      .def("retrieve_indices", &TreeSpec::retrieve_indices);
  m.def("fit_tree_paths", &fit_tree_paths, py::arg("table"), py::arg("nodes"), py::arg("max_depth") = 0,
        py::arg("max_children") = 0);
  m.def("expected_tokens_per_step", &expected_tokens_per_step, py::arg("table"), py::arg("paths"));
}

}  // namespace medusa_rt::python
