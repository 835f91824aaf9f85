// Argument checks of the C++ ops, shared by the CPU and CUDA implementations. Every message names
// the offending tensor or argument; the Python layer checks the public API first, these guard
// direct calls of torch.ops.logitstd.* and the kernel contract (docs/design.md, _backends.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "logitstd/kd_problem.h"

namespace logitstd {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline Dtype to_dtype(at::ScalarType t) {
  TORCH_CHECK_TYPE(is_supported_float(t), "logitstd: unsupported dtype ", t);
  if (t == at::kHalf) return Dtype::kFloat16;
  if (t == at::kBFloat16) return Dtype::kBFloat16;
  if (t == at::kDouble) return Dtype::kFloat64;
  return Dtype::kFloat32;
}

// float64 when either input is float64, else float32: the dtype of the loss and of the math.
inline at::ScalarType accumulation_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  return (student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble) ? at::kDouble
                                                                                          : at::kFloat;
}

inline void check_logits(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D (rows, classes) tensor, got ", t.dim(),
                    "-D with shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
                    " must have unit stride along the class dimension, got strides ", t.strides(),
                    " (call .contiguous())");
}

// Checks of logitstd::fused_kd_forward; returns the accumulation dtype.
inline at::ScalarType check_fused_kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                             const std::optional<at::Tensor>& mask, const at::Tensor& grad_scale,
                                             double tau_s, double tau_t, bool standardize, int64_t correction,
                                             double eps) {
  constexpr const char* op = "logitstd::fused_kd_forward";
  check_logits(op, "student", student);
  check_logits(op, "teacher", teacher);
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), op, ": teacher has shape ", teacher.sizes(),
                    " but student has shape ", student.sizes(), "; they must match");
  TORCH_CHECK_VALUE(teacher.device() == student.device(), op, ": teacher is on ", teacher.device(),
                    " but student is on ", student.device());
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  if (standardize) {
    TORCH_CHECK_VALUE(cols >= 2, op, ": student has ", cols,
                      " class(es); standardization needs at least 2");
    TORCH_CHECK_VALUE(correction >= 0 && correction < cols, op, ": correction=", correction,
                      " must be in [0, number of classes = ", cols, ")");
  } else {
    TORCH_CHECK_VALUE(cols >= 1, op, ": student has an empty class dimension");
  }
  TORCH_CHECK_VALUE(std::isfinite(tau_s) && tau_s > 0, op, ": tau_s must be finite and > 0, got ", tau_s);
  TORCH_CHECK_VALUE(std::isfinite(tau_t) && tau_t > 0, op, ": tau_t must be finite and > 0, got ", tau_t);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": mask must have dtype bool, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == rows, op, ": mask must have shape (", rows,
                      ",), got ", m.sizes());
    TORCH_CHECK_VALUE(m.is_contiguous(), op, ": mask must be contiguous");
    TORCH_CHECK_VALUE(m.device() == student.device(), op, ": mask is on ", m.device(), " but student is on ",
                      student.device());
  }
  const at::ScalarType acc = accumulation_dtype(student, teacher);
  TORCH_CHECK_VALUE(grad_scale.numel() == 1 || (grad_scale.dim() == 1 && grad_scale.size(0) == rows), op,
                    ": grad_scale must have one element or shape (", rows, ",), got shape ", grad_scale.sizes());
  TORCH_CHECK_TYPE(grad_scale.scalar_type() == acc, op, ": grad_scale must have the accumulation dtype ", acc,
                   " (float64 if an input is float64, else float32), got ", grad_scale.scalar_type());
  TORCH_CHECK_VALUE(grad_scale.device() == student.device(), op, ": grad_scale is on ", grad_scale.device(),
                    " but student is on ", student.device());
  return acc;
}

// Checks of logitstd::fused_kd_regrad_ (the inputs as for fused_kd_forward, `active` as its mask,
// which is required); the gradient buffers are those fused_kd_forward returned, or empty.
inline at::ScalarType check_fused_kd_regrad(const at::Tensor& student, const at::Tensor& teacher,
                                            const at::Tensor& active, const at::Tensor& grad_scale, double tau_s,
                                            double tau_t, bool standardize, int64_t correction, double eps,
                                            const at::Tensor& grad_x, const at::Tensor& grad_y) {
  constexpr const char* op = "logitstd::fused_kd_regrad_";
  const at::ScalarType acc = check_fused_kd_forward(student, teacher, active, grad_scale, tau_s, tau_t,
                                                    standardize, correction, eps);
  for (const auto& [name, grad, input] : {std::make_tuple("grad_x", &grad_x, &student),
                                          std::make_tuple("grad_y", &grad_y, &teacher)}) {
    if (grad->numel() == 0) continue;
    TORCH_CHECK_VALUE(grad->sizes() == input->sizes() && grad->is_contiguous(), op, ": ", name,
                      " must be a contiguous tensor of shape ", input->sizes(), " or empty, got shape ",
                      grad->sizes(), " and strides ", grad->strides());
    TORCH_CHECK_TYPE(grad->scalar_type() == input->scalar_type(), op, ": ", name, " must have dtype ",
                     input->scalar_type(), ", got ", grad->scalar_type());
    TORCH_CHECK_VALUE(grad->device() == input->device(), op, ": ", name, " is on ", grad->device());
  }
  return acc;
}

// Checks of logitstd::scale_rows_.
inline void check_scale_rows(const at::Tensor& grad, const at::Tensor& scale) {
  constexpr const char* op = "logitstd::scale_rows_";
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), op,
                    ": grad must be a contiguous 2-D (rows, classes) tensor, got shape ", grad.sizes(),
                    " and strides ", grad.strides());
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()), op, ": grad must be a float tensor, got ",
                   grad.scalar_type());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble, op,
                   ": scale must be float32 or float64, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.numel() == 1 || (scale.dim() == 1 && scale.size(0) == grad.size(0)), op,
                    ": scale must have one element or shape (", grad.size(0), ",), got ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == grad.device(), op, ": scale is on ", scale.device(), " but grad is on ",
                    grad.device());
}

// The objective's arguments (fused_kd_forward / fused_kd_regrad_ with labels).
inline void check_objective(const char* op, const at::Tensor& student, const std::optional<at::Tensor>& labels,
                            double label_smoothing, double ce_weight, double kd_weight) {
  TORCH_CHECK_VALUE(std::isfinite(kd_weight) && kd_weight >= 0, op, ": kd_weight must be finite and >= 0, got ",
                    kd_weight);
  if (!labels.has_value()) return;
  const at::Tensor& l = *labels;
  TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, op, ": labels must have dtype int64, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == student.size(0) && l.is_contiguous(), op,
                    ": labels must be a contiguous tensor of shape (", student.size(0), ",), got shape ", l.sizes());
  TORCH_CHECK_VALUE(l.device() == student.device(), op, ": labels is on ", l.device(), " but student is on ",
                    student.device());
  TORCH_CHECK_VALUE(std::isfinite(ce_weight) && ce_weight >= 0, op, ": ce_weight must be finite and >= 0, got ",
                    ce_weight);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1, op, ": label_smoothing must be in [0, 1), got ",
                    label_smoothing);
}

// Labels outside [0, V) that are not ignore_index: the CPU kernels raise (reading them costs nothing
// there); the CUDA kernels make such a row's loss and gradient NaN (no host synchronization).
inline void check_label_values_cpu(const char* op, const std::optional<at::Tensor>& labels, int64_t num_classes,
                                   int64_t ignore_index) {
  if (!labels.has_value()) return;
  const int64_t* l = labels->data_ptr<int64_t>();
  for (int64_t r = 0; r < labels->numel(); ++r) {
    TORCH_CHECK_INDEX(l[r] == ignore_index || (l[r] >= 0 && l[r] < num_classes), op, ": labels[", r, "] = ", l[r],
                      " is outside [0, ", num_classes, ") and is not ignore_index (", ignore_index, ")");
  }
}

// The rest of a fused call's description: the objective's arguments and the per-row gradient
// factors (`factors`: grad_scale flattened and contiguous, alive until the launch returns).
inline void set_objective_and_factors(KdProblem& p, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                      double label_smoothing, double ce_weight, double kd_weight,
                                      const at::Tensor& factors) {
  p.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.ce_weight = ce_weight;
  p.kd_weight = kd_weight;
  p.grad_scale = factors.data_ptr();
  p.grad_scale_stride = factors.numel() == 1 ? 0 : 1;
}

// fused_kd_regrad_: the gradients of some rows recomputed in place; no loss, excluded rows untouched.
inline void make_recomputation(KdProblem& p) {
  p.loss = nullptr;
  p.zero_excluded = false;
}

// The kernel-facing description of a checked call (outputs already allocated by the caller).
inline KdProblem make_problem(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& mask, at::ScalarType acc, const at::Tensor& loss,
                              const at::Tensor& grad_x, const at::Tensor& grad_y, double tau_s, double tau_t,
                              bool standardize, int64_t correction, double eps) {
  KdProblem p;
  p.x = student.data_ptr();
  p.x_stride = student.stride(0);
  p.x_dtype = to_dtype(student.scalar_type());
  p.y = teacher.data_ptr();
  p.y_stride = teacher.stride(0);
  p.y_dtype = to_dtype(teacher.scalar_type());
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.rows = student.size(0);
  p.cols = student.size(1);
  p.loss = loss.data_ptr();
  p.grad_x = grad_x.numel() > 0 ? grad_x.data_ptr() : nullptr;
  p.grad_y = grad_y.numel() > 0 ? grad_y.data_ptr() : nullptr;
  p.tau_s = tau_s;
  p.tau_t = tau_t;
  p.eps = eps;
  p.correction = correction;
  p.standardize = standardize;
  p.acc_double = acc == at::kDouble;
  return p;
}

}  // namespace logitstd
