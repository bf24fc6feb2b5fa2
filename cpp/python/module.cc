// The extension module medusa_rt._core: a thin wrapper of include/medusa_rt/engine.h.
#include "python/bindings.h"
#include "medusa_rt/version.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "medusa_rt C++ engine (wraps include/medusa_rt/engine.h; use the medusa_rt package instead)";
  m.attr("__version__") = MEDUSA_RT_VERSION_STRING;
  m.attr("FORMAT_VERSION") = MEDUSA_RT_FORMAT_VERSION;
  medusa_rt::python::register_errors(m);
  medusa_rt::python::register_options(m);
  medusa_rt::python::register_engine(m);
  medusa_rt::python::register_session(m);
  medusa_rt::python::register_tree(m);
  medusa_rt::python::register_testing(m);
}
