// The sparse-teacher ops (logitstd::sparse_kd_forward, logitstd::sparse_kd_regrad_): their schemas, the
// argument checks, the outputs and the CPU implementation's parallel loop over rows. The kernel is
// sparse_cpu_kernel.cpp, built once per instruction set; there is no CUDA implementation (on CUDA
// tensors the Triton kernel of _triton/sparse_kernel.py runs; logitstd_kernels/_backends.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "logitstd/checks.h"
#include "logitstd/sparse_problem.h"

namespace logitstd {
namespace cpu {

namespace DEFAULT {
void sparse_rows(const SparseProblem& p, int64_t begin, int64_t end);
}
#if defined(LOGITSTD_CPU_AVX2)
namespace AVX2 {
void sparse_rows(const SparseProblem& p, int64_t begin, int64_t end);
}
#endif
#if defined(LOGITSTD_CPU_AVX512)
namespace AVX512 {
void sparse_rows(const SparseProblem& p, int64_t begin, int64_t end);
}
#endif

namespace {

using SparseRowsFn = void (*)(const SparseProblem&, int64_t, int64_t);

// The widest build this CPU runs (as kd_cpu.cpp picks the dense kernel's).
SparseRowsFn select_sparse_kernel() {
  static const SparseRowsFn fn = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(LOGITSTD_CPU_AVX512)
    if (cap == "AVX512") return &AVX512::sparse_rows;
#endif
#if defined(LOGITSTD_CPU_AVX2)
    if (cap == "AVX2" || cap == "AVX512") return &AVX2::sparse_rows;
#endif
    return &DEFAULT::sparse_rows;
  }();
  return fn;
}

// The arguments of both ops, by name (schemas below).
struct SparseArgs {
  const at::Tensor& student;
  const at::Tensor& ids;
  const at::Tensor& values;
  const std::optional<at::Tensor>& entry_mask;
  const std::optional<at::Tensor>& row_mean;
  const std::optional<at::Tensor>& row_std;
  const std::optional<at::Tensor>& log_normalizer;
  const std::optional<at::Tensor>& mask;  // the forward's rows, or the recomputation's active rows
  const at::Tensor& grad_scale;
  double tau_s, tau_t;
  bool standardize;
  int64_t correction;
  double eps;
  const std::optional<at::Tensor>& labels;
  int64_t ignore_index;
  double label_smoothing, ce_weight, kd_weight, value_scale;
  int64_t support;
};

void check_rows_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t rows,
                       bool boolean) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows, op, ": ", name, " must have shape (", rows, ",), got ",
                    t->sizes());
  TORCH_CHECK_TYPE(boolean ? t->scalar_type() == at::kBool : is_supported_float(t->scalar_type()), op, ": ", name,
                   boolean ? " must be bool" : " must be floating", ", got ", t->scalar_type());
}

// Every check; returns the accumulation dtype.
at::ScalarType check_sparse(const char* op, const SparseArgs& a) {
  check_logits(op, "student", a.student);
  const int64_t rows = a.student.size(0), cols = a.student.size(1);
  TORCH_CHECK_VALUE(a.ids.dim() == 2 && a.ids.size(0) == rows && a.ids.scalar_type() == at::kLong &&
                        a.ids.is_contiguous(), op, ": ids must be a contiguous int64 (", rows, ", k) tensor, got ",
                    a.ids.scalar_type(), " ", a.ids.sizes());
  TORCH_CHECK_VALUE(a.values.sizes() == a.ids.sizes() && is_supported_float(a.values.scalar_type()), op,
                    ": values must be a floating tensor of the shape of ids ", a.ids.sizes(), ", got ",
                    a.values.scalar_type(), " ", a.values.sizes());
  if (a.entry_mask.has_value()) {
    TORCH_CHECK_VALUE(a.entry_mask->sizes() == a.ids.sizes() && a.entry_mask->scalar_type() == at::kBool, op,
                      ": entry_mask must be a bool tensor of the shape of ids");
  }
  check_rows_tensor(op, "row_mean", a.row_mean, rows, false);
  check_rows_tensor(op, "row_std", a.row_std, rows, false);
  check_rows_tensor(op, "log_normalizer", a.log_normalizer, rows, false);
  check_rows_tensor(op, "mask", a.mask, rows, true);
  TORCH_CHECK_VALUE(a.row_mean.has_value() == a.row_std.has_value(), op, ": give row_mean and row_std together");
  TORCH_CHECK_VALUE(a.support >= 0 && a.support <= 2, op, ": support must be 0, 1 or 2, got ", a.support);
  TORCH_CHECK_VALUE(a.tau_s > 0 && a.tau_t > 0 && a.value_scale > 0, op, ": temperatures must be > 0");
  TORCH_CHECK_VALUE(!a.standardize || cols - a.correction > 0, op, ": correction ", a.correction,
                    " leaves no degrees of freedom for ", cols, " classes");
  check_objective(op, a.student, a.labels, a.label_smoothing, a.ce_weight, a.kd_weight);
  check_label_values_cpu(op, a.labels, cols, a.ignore_index);
  TORCH_CHECK_VALUE(a.student.device().is_cpu(), op, " (CPU): student is on ", a.student.device());
  return (a.student.scalar_type() == at::kDouble || a.values.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// The problem of a checked call; `keep` holds the converted tensors alive until the rows have run.
SparseProblem make_sparse_problem(const SparseArgs& a, at::ScalarType acc, std::vector<at::Tensor>& keep) {
  auto as_acc = [&](const at::Tensor& t) -> const void* {
    keep.push_back(t.to(acc).contiguous());
    return keep.back().data_ptr();
  };
  SparseProblem p;
  p.x = a.student.data_ptr();
  p.x_stride = a.student.stride(0);
  p.x_dtype = to_dtype(a.student.scalar_type());
  p.rows = a.student.size(0);
  p.cols = a.student.size(1);
  p.k = a.ids.size(1);
  p.ids = a.ids.data_ptr<int64_t>();
  p.values = as_acc(a.values);
  if (a.entry_mask.has_value()) {
    keep.push_back(a.entry_mask->contiguous());
    p.entry_mask = keep.back().data_ptr<bool>();
  }
  p.row_mean = a.row_mean.has_value() ? as_acc(*a.row_mean) : nullptr;
  p.row_std = a.row_std.has_value() ? as_acc(*a.row_std) : nullptr;
  p.log_normalizer = a.log_normalizer.has_value() ? as_acc(*a.log_normalizer) : nullptr;
  p.value_scale = a.value_scale;
  p.support = static_cast<Support>(a.support);
  if (a.mask.has_value()) {
    keep.push_back(a.mask->contiguous());
    p.mask = keep.back().data_ptr<bool>();
  }
  keep.push_back(a.grad_scale.reshape({-1}).to(acc).contiguous());
  p.grad_scale = keep.back().data_ptr();
  p.grad_scale_stride = keep.back().numel() == 1 ? 0 : 1;
  p.tau_s = a.tau_s;
  p.tau_t = a.tau_t;
  p.eps = a.eps;
  p.correction = a.correction;
  p.standardize = a.standardize;
  p.labels = a.labels.has_value() ? a.labels->data_ptr<int64_t>() : nullptr;
  p.ignore_index = a.ignore_index;
  p.label_smoothing = a.label_smoothing;
  p.ce_weight = a.ce_weight;
  p.kd_weight = a.kd_weight;
  p.acc_double = acc == at::kDouble;
  return p;
}

// Rows per parallel task: at least this many elements of x per task (as the dense kernel's).
constexpr int64_t kMinElementsPerTask = 32768;

void run(const SparseProblem& p) {
  const SparseRowsFn kernel = select_sparse_kernel();
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(p.cols, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_kd_forward_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& values,
    const std::optional<at::Tensor>& entry_mask, const std::optional<at::Tensor>& row_mean,
    const std::optional<at::Tensor>& row_std, const std::optional<at::Tensor>& log_normalizer,
    const std::optional<at::Tensor>& mask, const at::Tensor& grad_scale, double tau_s, double tau_t, bool standardize,
    int64_t correction, double eps, bool grad_student, const std::optional<at::Tensor>& labels, int64_t ignore_index,
    double label_smoothing, double ce_weight, double kd_weight, double value_scale, int64_t support) {
  const SparseArgs a{student, ids, values, entry_mask, row_mean, row_std, log_normalizer, mask, grad_scale, tau_s,
                     tau_t, standardize, correction, eps, labels, ignore_index, label_smoothing, ce_weight,
                     kd_weight, value_scale, support};
  const at::ScalarType acc = check_sparse("logitstd::sparse_kd_forward", a);
  const int64_t rows = student.size(0);
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc));
  at::Tensor ce = at::empty_like(loss), kd = at::empty_like(loss);
  at::Tensor grad = grad_student ? at::empty({rows, student.size(1)}, student.options())
                                 : at::empty({0}, student.options());
  std::vector<at::Tensor> keep;
  SparseProblem p = make_sparse_problem(a, acc, keep);
  p.loss = loss.data_ptr();
  p.ce_rows = ce.data_ptr();
  p.kd_rows = kd.data_ptr();
  p.grad_x = grad_student ? grad.data_ptr() : nullptr;
  if (rows > 0) run(p);
  return {loss, grad, ce, kd};
}

// The gradients of the rows where `active` is true recomputed in place with their factor (the
// backward's one rounding of a low-precision gradient); other rows untouched, no loss written.
void sparse_kd_regrad_cpu(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& values,
                          const std::optional<at::Tensor>& entry_mask, const std::optional<at::Tensor>& row_mean,
                          const std::optional<at::Tensor>& row_std, const std::optional<at::Tensor>& log_normalizer,
                          const at::Tensor& active, const at::Tensor& grad_scale, double tau_s, double tau_t,
                          bool standardize, int64_t correction, double eps, const at::Tensor& grad_x,
                          const std::optional<at::Tensor>& labels, int64_t ignore_index, double label_smoothing,
                          double ce_weight, double kd_weight, double value_scale, int64_t support) {
  const std::optional<at::Tensor> rows_on(active);
  const SparseArgs a{student, ids, values, entry_mask, row_mean, row_std, log_normalizer, rows_on, grad_scale, tau_s,
                     tau_t, standardize, correction, eps, labels, ignore_index, label_smoothing, ce_weight,
                     kd_weight, value_scale, support};
  const at::ScalarType acc = check_sparse("logitstd::sparse_kd_regrad_", a);
  TORCH_CHECK_VALUE(grad_x.sizes() == student.sizes() && grad_x.is_contiguous() &&
                        grad_x.scalar_type() == student.scalar_type(), "logitstd::sparse_kd_regrad_: grad_x must be "
                    "a contiguous tensor of the student's shape and dtype");
  std::vector<at::Tensor> keep;
  SparseProblem p = make_sparse_problem(a, acc, keep);
  p.zero_excluded = false;
  p.grad_x = grad_x.data_ptr();
  if (student.size(0) > 0) run(p);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(logitstd, m) {
  // Loss of each row and, when requested, the student's gradient scaled by grad_scale, for a teacher of
  // k (id, value) entries per row (docs/design.md section 9): returns (rows, grad_student, ce_rows,
  // kd_rows). support: 0 renormalize, 1 renormalize_teacher, 2 tail; value_scale: T_gen for stored
  // log-probabilities, else 1. The fake implementations live in logitstd_kernels/_cpp_sparse.py.
  m.def(
      "sparse_kd_forward(Tensor student, Tensor ids, Tensor values, Tensor? entry_mask, Tensor? row_mean, "
      "Tensor? row_std, Tensor? log_normalizer, Tensor? mask, Tensor grad_scale, float tau_s, float tau_t, "
      "bool standardize, int correction, float eps, bool grad_student, Tensor? labels, int ignore_index, "
      "float label_smoothing, float ce_weight, float kd_weight, float value_scale, int support) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sparse_kd_regrad_(Tensor student, Tensor ids, Tensor values, Tensor? entry_mask, Tensor? row_mean, "
      "Tensor? row_std, Tensor? log_normalizer, Tensor active, Tensor grad_scale, float tau_s, float tau_t, "
      "bool standardize, int correction, float eps, Tensor(a!) grad_x, Tensor? labels, int ignore_index, "
      "float label_smoothing, float ce_weight, float kd_weight, float value_scale, int support) -> ()");
}

TORCH_LIBRARY_IMPL(logitstd, CPU, m) {
  m.impl("sparse_kd_forward", &sparse_kd_forward_cpu);
  m.impl("sparse_kd_regrad_", &sparse_kd_regrad_cpu);
}

}  // namespace cpu
}  // namespace logitstd
