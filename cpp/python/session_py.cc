#include <pybind11/numpy.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "python/bindings.h"
#include "medusa_rt/engine.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_session(py::module_& m) {
  py::class_<Session>(m, "Session")
      .def(
          "generate",
          [](Session& s, const std::vector<int32_t>& prompt, const GenerationConfig& config, py::object on_tokens) {
            TokenCallback cb;
            if (!on_tokens.is_none()) {
              if (!PyCallable_Check(on_tokens.ptr())) throw py::type_error("on_tokens must be callable or None");
              auto fn = py::reinterpret_borrow<py::function>(on_tokens);
              cb = [fn](const std::vector<int32_t>& tokens) {
                py::gil_scoped_acquire gil;
                py::object r = fn(py::cast(tokens));
                return r.is_none() || r.cast<bool>();
              };
            }
            py::gil_scoped_release release;
            return s.generate(prompt, config, cb);
          },
          py::arg("prompt"), py::arg("config"), py::arg("on_tokens") = py::none())
      .def("reset", &Session::reset)
      .def("close", &Session::close)
      .def_property_readonly("context_length", &Session::context_length)
      .def(
          "forward",
          [](Session& s, const std::vector<int32_t>& tokens, bool all_logits) {
            std::vector<float> logits;
            {
              py::gil_scoped_release release;
              logits = s.forward(tokens, all_logits);
            }
            const py::ssize_t rows = all_logits ? static_cast<py::ssize_t>(tokens.size()) : 1;
            const py::ssize_t vocab = static_cast<py::ssize_t>(logits.size()) / rows;
            py::array_t<float> out({rows, vocab});
            std::copy(logits.begin(), logits.end(), out.mutable_data());
            return out;
          },
          py::arg("tokens"), py::arg("all_logits") = false)
      .def(
          "hidden_states",
          [](Session& s, const std::vector<int32_t>& tokens, const std::vector<int>& layers) {
            std::vector<float> hidden;
            {
              py::gil_scoped_release release;
              hidden = s.hidden_states(tokens, layers);
            }
            const py::ssize_t rows = static_cast<py::ssize_t>(tokens.size());
            const py::ssize_t per_row = static_cast<py::ssize_t>(hidden.size()) / rows;
            py::array_t<float> out = layers.empty()
                                         ? py::array_t<float>({rows, per_row})
                                         : py::array_t<float>({rows, static_cast<py::ssize_t>(1 + layers.size()),
                                                               per_row / static_cast<py::ssize_t>(1 + layers.size())});
            std::copy(hidden.begin(), hidden.end(), out.mutable_data());
            return out;
          },
          py::arg("tokens"), py::arg("layers") = std::vector<int>{});
}

}  // namespace medusa_rt::python
