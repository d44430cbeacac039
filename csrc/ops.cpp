// ops.cpp — the schemas of torch.ops.manualgrad.*: one op per layer and direction. Each device file
// (cpu/*.cpp, cuda/*.cu) registers its own kernels for them; Python adds fake kernels and autograd.
// Spatial rank comes from len(stride): 1 for conv1d/max_pool1d, 2 for conv2d/max_pool2d.
#include <Python.h>
#include <torch/library.h>

#include "cpu/blas.h"

// Importing torch_manualgrad._C loads this library, whose static initialisers register the ops. The module's
// own functions choose the CPU kernels' BLAS (cpu/blas.h); torch_manualgrad/_blas.py calls them at import.
namespace {

PyObject* use_openblas(PyObject*, PyObject* arg) {
  const char* path = PyUnicode_AsUTF8(arg);
  if (!path) return nullptr;
  return PyUnicode_FromString(manualgrad::use_openblas(path).c_str());
}

PyObject* use_torch_blas(PyObject*, PyObject*) {
  manualgrad::use_torch_blas();
  Py_RETURN_NONE;
}

PyObject* blas(PyObject*, PyObject*) { return PyUnicode_FromString(manualgrad::blas_description().c_str()); }

PyMethodDef methods[] = {
    {"_use_openblas", use_openblas, METH_O, "Load OpenBLAS from a path for the CPU kernels; '' or the reason it failed"},
    {"_use_torch_blas", use_torch_blas, METH_NOARGS, "Let the CPU kernels use ATen's matrix product"},
    {"_blas", blas, METH_NOARGS, "The CPU kernels' BLAS, in words"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "torch_manualgrad kernels (see torch.ops.manualgrad)", -1,
                                      methods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(manualgrad, m) {
  m.def("conv_forward(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor");
  // Entries of output_mask that are false come back undefined (None in Python): only asked-for work is done.
  m.def("conv_backward(Tensor grad_output, Tensor input, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Returns the pooled output and the argmax of each window as a flat index within its (n, c) plane.
  // With compute_indices=False (inference, where nothing will go backward) the indices are neither
  // computed nor written, a third of a float32 forward's bytes, and an empty int64 tensor comes back.
  m.def("max_pool_forward(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode, bool compute_indices=True) -> (Tensor, Tensor)");
  // Sends each output gradient to its argmax. The window geometry lets a device gather, for each
  // input element, from just the windows that cover it (deterministic, no atomics). An index that is
  // not -1 nor a tap of its own output's window inside the plane is an error; finding one costs a pass
  // (and on CUDA a host sync), which check_indices=False skips for indices known to come from
  // max_pool_forward (autograd's own call). The CPU checks the plane's bounds either way.
  m.def("max_pool_backward(Tensor grad_output, Tensor indices, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, bool check_indices=True) -> Tensor");

  // Each op's argument checks alone (csrc/shape_checks.h, the ones its kernels run first), returning the
  // shape of its first output. The fake kernels (_ops.py) call these on stand-ins that have the
  // arguments' shapes, dtypes and devices but no data, so meta tensors, torch.compile and torch.export
  // raise exactly the kernels' errors. Implemented once for every device (shape_ops.cpp).
  m.def("conv_forward_shape(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> int[]");
  m.def("conv_backward_shape(Tensor grad_output, Tensor input, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool[3] output_mask) -> int[]");
  m.def("max_pool_forward_shape(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode) -> int[]");
  m.def("max_pool_backward_shape(Tensor grad_output, Tensor indices, int[] input_size, int[] kernel_size, "
        "int[] stride, int[] padding, int[] dilation) -> int[]");
}
