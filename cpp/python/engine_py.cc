#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "python/bindings.h"
#include "medusa_rt/engine.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_engine(py::module_& m) {
  m.def("cuda_device_count", &cuda_device_count,
        "GPUs this build can use: 0 without the CUDA backend (MEDUSA_RT_CUDA=OFF) or without a GPU.");
  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::string&, const EngineOptions&>(), py::arg("model_dir"), py::arg("options"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("info", &Engine::info, py::return_value_policy::reference_internal)
      // The session keeps its engine alive.
      .def("session", &Engine::session, py::arg("wait_seconds") = 0.0, py::arg("prompt") = std::vector<int32_t>{},
           py::keep_alive<0, 1>(), py::call_guard<py::gil_scoped_release>())
      .def(
          "generate_batch",
          [](Engine& e, const std::vector<std::vector<int32_t>>& prompts, const GenerationConfig& config,
             py::object on_tokens) {
            BatchCallback cb;
            if (!on_tokens.is_none()) {
              if (!PyCallable_Check(on_tokens.ptr())) throw py::type_error("on_tokens must be callable or None");
              auto fn = py::reinterpret_borrow<py::function>(on_tokens);
              cb = [fn](size_t index, const std::vector<int32_t>& tokens) {
                py::gil_scoped_acquire gil;
                py::object r = fn(index, py::cast(tokens));
                return r.is_none() || r.cast<bool>();
              };
            }
            py::gil_scoped_release release;
            return e.generate_batch(prompts, config, cb);
          },
          py::arg("prompts"), py::arg("config"), py::arg("on_tokens") = py::none());
}

}  // namespace medusa_rt::python
