// The host front end of the fused ops, shared by their CPU and CUDA implementations: every argument
// check, the outputs' allocation and the kernel-facing KdProblem. Each device adds only what is its
// own (the CPU's label range check and page advice, the CUDA dtype pairs and device guard) and runs
// the problem.
#pragma once

#include <cmath>

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "logitstd/checks.h"
#include "logitstd/kd_problem.h"

namespace logitstd {

// The arguments of logitstd::fused_kd_forward and logitstd::fused_kd_regrad_ (schemas in
// csrc/logitstd.cpp), by name.
struct FusedArgs {
  const at::Tensor& student;
  const at::Tensor& teacher;
  const std::optional<at::Tensor>& mask;  // the forward's mask, or the recomputation's `active` rows
  const at::Tensor& grad_scale;
  double tau_s, tau_t;
  bool standardize;
  int64_t correction;
  double eps;
  const std::optional<at::Tensor>& labels;
  int64_t ignore_index;
  double label_smoothing, ce_weight, kd_weight;
  const std::string& divergence;
  double beta;
  double dkd_alpha, dkd_beta;
  const std::optional<at::Tensor>& temperature_rows;  // a per-row temperature (rows,) or (1,), or none
  bool grad_temperature;                              // the sixth output: d(row)/d(temperature)
};

// The kernels' code of a divergence name (logitstd/divergence.h); the generalized JSD at beta = 0
// and 1 is forward and reverse KL (TRL's and Liger's convention).
inline int32_t divergence_code(const char* op, const std::string& name, double beta) {
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, op, ": beta must be in [0, 1], got ", beta);
  if (name == "forward_kl" || (name == "jsd" && beta == 0)) return 0;
  if (name == "reverse_kl" || (name == "jsd" && beta == 1)) return 1;
  if (name == "jsd") return 2;
  if (name == "jeffreys") return 3;
  if (name == "tvd") return 4;
  if (name == "dkd") return 5;
  TORCH_CHECK_VALUE(false, op, ": divergence must be one of forward_kl, reverse_kl, jsd, jeffreys, tvd, dkd, got ",
                    name);
  return 0;
}

// The divergence's settings: a known name, beta in [0, 1], DKD's weights finite and >= 0 and its labels.
inline void check_divergence(const char* op, const FusedArgs& a) {
  if (divergence_code(op, a.divergence, a.beta) != 5) return;
  TORCH_CHECK_VALUE(std::isfinite(a.dkd_alpha) && a.dkd_alpha >= 0, op, ": dkd_alpha must be finite and >= 0, got ",
                    a.dkd_alpha);
  TORCH_CHECK_VALUE(std::isfinite(a.dkd_beta) && a.dkd_beta >= 0, op, ": dkd_beta must be finite and >= 0, got ",
                    a.dkd_beta);
  TORCH_CHECK_VALUE(a.labels.has_value(), op, ": divergence dkd needs labels");
}

// The forward's outputs: (rows, grad_student, grad_teacher, ce_rows, kd_rows).
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A per-row temperature: floating, on the logits' device, (rows,) or (1,); its values are the caller's
// to keep finite and > 0 (checked on the CPU by the Python layer, not here: no host synchronization).
inline void check_temperature_rows(const char* op, const FusedArgs& a, at::ScalarType acc) {
  if (!a.temperature_rows.has_value()) {
    TORCH_CHECK_VALUE(!a.grad_temperature, op, ": grad_temperature needs temperature_rows");
    return;
  }
  const at::Tensor& t = *a.temperature_rows;
  TORCH_CHECK_VALUE(t.dim() == 1 && (t.size(0) == a.student.size(0) || t.size(0) == 1), op,
                    ": temperature_rows must be of shape (", a.student.size(0), ",) or (1,), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == acc, op, ": temperature_rows must be in the accumulation dtype ", acc,
                    ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == a.student.device(), op, ": temperature_rows is on ", t.device(), ", the logits on ",
                    a.student.device());
}

// The checks of the forward on `device`; returns the accumulation dtype.
inline at::ScalarType check_forward_args(const char* op, const FusedArgs& a, c10::DeviceType device) {
  const at::ScalarType acc = check_fused_kd_forward(a.student, a.teacher, a.mask, a.grad_scale, a.tau_s, a.tau_t,
                                                    a.standardize, a.correction, a.eps);
  check_objective(op, a.student, a.labels, a.label_smoothing, a.ce_weight, a.kd_weight);
  check_divergence(op, a);
  check_temperature_rows(op, a, acc);
  TORCH_CHECK_VALUE(a.student.device().type() == device, op, " (", c10::DeviceTypeName(device), "): student is on ",
                    a.student.device());
  return acc;
}

// The forward's outputs, allocated (gradients empty when not requested).
inline ForwardOutputs allocate_forward(const FusedArgs& a, at::ScalarType acc, bool grad_student, bool grad_teacher) {
  const int64_t rows = a.student.size(0);
  const int64_t cols = a.student.size(1);
  const auto options = a.student.options().dtype(acc);
  at::Tensor grad_x = grad_student ? at::empty({rows, cols}, a.student.options()) : at::empty({0}, a.student.options());
  at::Tensor grad_y = grad_teacher ? at::empty({rows, cols}, a.teacher.options()) : at::empty({0}, a.teacher.options());
  return {at::empty({rows}, options), grad_x, grad_y, at::empty({rows}, options), at::empty({rows}, options),
          a.grad_temperature ? at::empty({rows}, options) : at::empty({0}, options)};
}

// The kernel-facing problem of a checked call. `loss`, `ce_rows`, `kd_rows` may be empty (the
// recomputation writes none); `factors`: grad_scale flattened and contiguous, alive until the
// kernels return.
inline KdProblem problem_of(const FusedArgs& a, at::ScalarType acc, const at::Tensor& loss, const at::Tensor& grad_x,
                            const at::Tensor& grad_y, const at::Tensor& ce_rows, const at::Tensor& kd_rows,
                            const at::Tensor& factors) {
  KdProblem p = make_problem(a.student, a.teacher, a.mask, acc, loss, grad_x, grad_y, a.tau_s, a.tau_t,
                             a.standardize, a.correction, a.eps);
  set_objective_and_factors(p, a.labels, a.ignore_index, a.label_smoothing, a.ce_weight, a.kd_weight, factors);
  p.loss = loss.numel() > 0 ? loss.data_ptr() : nullptr;
  p.ce_rows = ce_rows.numel() > 0 ? ce_rows.data_ptr() : nullptr;
  p.kd_rows = kd_rows.numel() > 0 ? kd_rows.data_ptr() : nullptr;
  p.divergence = divergence_code("logitstd", a.divergence, a.beta);
  p.beta = a.beta;
  p.dkd_alpha = a.dkd_alpha;
  p.dkd_beta = a.dkd_beta;
  if (a.temperature_rows.has_value()) {
    p.tau_rows = a.temperature_rows->data_ptr();
    p.tau_stride = a.temperature_rows->size(0) == 1 ? 0 : a.temperature_rows->stride(0);
  }
  return p;
}

// The forward on a device: checks, outputs, then `run(problem)` unless there are no rows.
template <class Run>
ForwardOutputs fused_forward_front(const FusedArgs& a, at::ScalarType acc, bool grad_student, bool grad_teacher,
                                   Run&& run) {
  ForwardOutputs out = allocate_forward(a, acc, grad_student, grad_teacher);
  if (a.student.size(0) == 0) return out;
  const at::Tensor factors = a.grad_scale.reshape({-1}).contiguous();
  KdProblem p = problem_of(a, acc, std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
                           std::get<4>(out), factors);
  p.tau_grad = a.grad_temperature ? std::get<5>(out).data_ptr() : nullptr;
  run(p);
  return out;
}

// The in-place recomputation of the gradients of the rows where `active` (a.mask) is true: checks,
// then `run(problem)` (no loss written, excluded rows untouched).
template <class Run>
void fused_regrad_front(const char* op, const FusedArgs& a, const at::Tensor& grad_x, const at::Tensor& grad_y,
                        c10::DeviceType device, Run&& run) {
  const at::ScalarType acc = check_fused_kd_regrad(a.student, a.teacher, *a.mask, a.grad_scale, a.tau_s, a.tau_t,
                                                   a.standardize, a.correction, a.eps, grad_x, grad_y);
  check_objective(op, a.student, a.labels, a.label_smoothing, a.ce_weight, a.kd_weight);
  check_divergence(op, a);
  check_temperature_rows(op, a, acc);
  TORCH_CHECK_VALUE(a.student.device().type() == device, op, " (", c10::DeviceTypeName(device), "): student is on ",
                    a.student.device());
  if (a.student.size(0) == 0 || (grad_x.numel() == 0 && grad_y.numel() == 0)) return;
  const at::Tensor factors = a.grad_scale.reshape({-1}).contiguous();
  const at::Tensor none = at::empty({0}, a.student.options().dtype(acc));
  KdProblem p = problem_of(a, acc, none, grad_x, grad_y, none, none, factors);
  make_recomputation(p);
  run(p, acc);
}

}  // namespace logitstd
