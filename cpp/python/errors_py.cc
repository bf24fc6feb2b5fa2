// Maps each C++ exception class of errors.h to the Python class of the same name in
// medusa_rt.errors, one to one.
#include "python/bindings.h"
#include "medusa_rt/errors.h"

namespace py = pybind11;

namespace medusa_rt::python {

void register_errors(py::module_& m) {
  py::module_ errors = py::module_::import("medusa_rt.errors");
  // Held for the life of the process (the translator may run at any time).
  static PyObject* invalid = py::object(errors.attr("InvalidArgumentError")).release().ptr();
  static PyObject* not_found = py::object(errors.attr("ModelNotFoundError")).release().ptr();
  static PyObject* format = py::object(errors.attr("ModelFormatError")).release().ptr();
  static PyObject* unsupported = py::object(errors.attr("UnsupportedModelError")).release().ptr();
  static PyObject* capacity = py::object(errors.attr("CapacityError")).release().ptr();
  static PyObject* base = py::object(errors.attr("MedusaError")).release().ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgumentError& e) {
      PyErr_SetString(invalid, e.what());
    } catch (const ModelNotFoundError& e) {
      PyErr_SetString(not_found, e.what());
    } catch (const ModelFormatError& e) {
      PyErr_SetString(format, e.what());
    } catch (const UnsupportedModelError& e) {
      PyErr_SetString(unsupported, e.what());
    } catch (const CapacityError& e) {
      PyErr_SetString(capacity, e.what());
    } catch (const Error& e) {
      PyErr_SetString(base, e.what());
    }
  });
  m.attr("MedusaError") = errors.attr("MedusaError");
}

}  // namespace medusa_rt::python
