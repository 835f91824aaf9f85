// The logitstd_kernels._C extension: the schemas of the C++ ops (the kernels are registered for the
// CPU and CUDA dispatch keys in cpu/kd_cpu.cpp and cuda/kd_cuda.cu) and an empty Python module whose
// import loads the library, which runs these registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(logitstd, m) {
  // The fake (meta) implementations live in logitstd_kernels/_cpp.py.
  m.set_python_module("logitstd_kernels._cpp");
  // Loss of each row and, when requested, the gradients scaled by grad_scale, in one pass over the
  // inputs (the kernel contract documented in logitstd_kernels/_backends.py).
  // With labels, the distillation objective ce_weight * CE + kd_weight * KD (rows whose label is
  // ignore_index excluded like masked ones); returns (rows, grad_student, grad_teacher, ce_rows,
  // kd_rows), the last two the objective's parts per row. `divergence` (forward_kl, reverse_kl, jsd,
  // jeffreys, tvd, dkd) and `beta` (the generalized JSD's), `dkd_alpha`, `dkd_beta` (decoupled KD's
  // weights; dkd needs labels) choose the KD term. `temperature_rows` (rows,) or (1,): a per-row
  // temperature for student and teacher in place of tau_s and tau_t; `grad_temperature`: the sixth
  // output is grad_scale[r] * d(row)/d(temperature) per row (else empty).
  m.def(
      "fused_kd_forward(Tensor student, Tensor teacher, Tensor? mask, Tensor grad_scale, float tau_s, "
      "float tau_t, bool standardize, int correction, float eps, bool grad_student, bool grad_teacher, "
      "Tensor? labels=None, int ignore_index=-100, float label_smoothing=0.0, float ce_weight=0.0, "
      "float kd_weight=1.0, str divergence=\"forward_kl\", float beta=0.5, float dkd_alpha=1.0, float dkd_beta=8.0, Tensor? temperature_rows=None, "
      "bool grad_temperature=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // In place: recompute the requested gradients (grad_x / grad_y non-empty) of the rows where `active`
  // is true, with factor grad_scale[r] (or grad_scale[0]); other rows are not touched.
  m.def(
      "fused_kd_regrad_(Tensor student, Tensor teacher, Tensor active, Tensor grad_scale, float tau_s, "
      "float tau_t, bool standardize, int correction, float eps, Tensor(a!) grad_x, Tensor(b!) grad_y, "
      "Tensor? labels=None, int ignore_index=-100, float label_smoothing=0.0, float ce_weight=0.0, "
      "float kd_weight=1.0, str divergence=\"forward_kl\", float beta=0.5, float dkd_alpha=1.0, float dkd_beta=8.0, Tensor? temperature_rows=None) -> ()");
  // In place: grad[r] *= scale[r] (or scale[0]); rows whose scale is exactly 1 are not touched.
  m.def("scale_rows_(Tensor(a!) grad, Tensor scale) -> ()");
}

extern "C" {
// Importing logitstd_kernels._C only needs to load this library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "C++/CUDA kernels of logitstd_kernels; the ops are in torch.ops.logitstd",  // doc
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
