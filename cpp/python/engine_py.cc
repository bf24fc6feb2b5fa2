#include <pybind11/stl.h>

#include "python/bindings.h"
#include "medusa_rt/engine.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_engine(py::module_& m) {
  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::string&, const EngineOptions&>(), py::arg("model_dir"), py::arg("options"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("info", &Engine::info, py::return_value_policy::reference_internal)
      // The session keeps its engine alive.
      .def("session", &Engine::session, py::keep_alive<0, 1>());
}

}  // namespace medusa_rt::python
