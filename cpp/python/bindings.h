// Registration functions of the pybind11 module, one per wrapped class group.
#pragma once

#include <pybind11/pybind11.h>

namespace medusa_rt::python {

void register_errors(pybind11::module_& m);
void register_options(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_session(pybind11::module_& m);
void register_tree(pybind11::module_& m);
void register_testing(pybind11::module_& m);

}  // namespace medusa_rt::python
