// Python module init. Loading it runs the TORCH_LIBRARY registrations of the
// other translation units; the attributes let resfast check at import that
// this build matches the running torch and Python.
#include <Python.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa.h"

#ifndef RESFAST_TORCH_VERSION
#error "RESFAST_TORCH_VERSION must be defined by the build"
#endif

namespace {

// The name of the level f() returns; c10::Error from a bad level name (an
// argument, or RESFAST_CPU_ISA) becomes ValueError.
template <typename F>
const char* isa_name_or_value_error(const F& f) {
  try {
    return resfast::cpu::isa_name(f());
  } catch (const c10::Error& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.attr("torch_version") = RESFAST_TORCH_VERSION;
  m.attr("python_version") = PY_VERSION;
#ifdef RESFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_isa", [] { return isa_name_or_value_error([] { return resfast::cpu::cpu_isa(); }); });
  m.def("hardware_isa", [] { return resfast::cpu::isa_name(resfast::cpu::hardware_isa()); });
  m.def("set_cpu_isa", [](const std::string& name) {
    return isa_name_or_value_error([&] { return resfast::cpu::set_cpu_isa(resfast::cpu::parse_isa(name, "isa")); });
  });
}
