// Python module init. Loading it runs the TORCH_LIBRARY registrations of the
// other translation units; the attributes let resfast check at import that
// this build matches the running torch and Python.
#include <Python.h>
#include <pybind11/pybind11.h>

#ifndef RESFAST_TORCH_VERSION
#error "RESFAST_TORCH_VERSION must be defined by the build"
#endif

PYBIND11_MODULE(_C, m) {
  m.attr("torch_version") = RESFAST_TORCH_VERSION;
  m.attr("python_version") = PY_VERSION;
#ifdef RESFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
