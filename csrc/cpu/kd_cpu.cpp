// CPU implementations of the logitstd ops: argument checks, output allocation, the choice of the
// kernel build for this CPU's instruction set, and the parallel loop over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "logitstd/checks.h"
#include "logitstd/kd_problem.h"
#include "logitstd/op_front.h"

namespace logitstd {
namespace cpu {

// One build of kd_cpu_kernel.cpp per instruction set (setup.py defines which ones exist).
namespace DEFAULT {
void kd_rows(const KdProblem& p, int64_t begin, int64_t end);
}
#if defined(LOGITSTD_CPU_AVX2)
namespace AVX2 {
void kd_rows(const KdProblem& p, int64_t begin, int64_t end);
}
#endif
#if defined(LOGITSTD_CPU_AVX512)
namespace AVX512 {
void kd_rows(const KdProblem& p, int64_t begin, int64_t end);
}
#endif

using RowsFn = void (*)(const KdProblem&, int64_t, int64_t);

// The widest build this CPU runs, as ATen decides for its own kernels (ATEN_CPU_CAPABILITY=default
// or avx2 in the environment forces a narrower one).
RowsFn select_rows_kernel() {
  static const RowsFn fn = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(LOGITSTD_CPU_AVX512)
    if (cap == "AVX512") return &AVX512::kd_rows;
#endif
#if defined(LOGITSTD_CPU_AVX2)
    if (cap == "AVX2" || cap == "AVX512") return &AVX2::kd_rows;
#endif
    return &DEFAULT::kd_rows;
  }();
  return fn;
}

// Rows per parallel task: at least this many elements so that a task outweighs its scheduling.
constexpr int64_t kMinElementsPerTask = 32768;

// A fresh gradient buffer is first touched by the kernel; with 4 KB pages that is one page fault
// per 4 KB (measured on the 2-core CI VM: ~40 ms of faults for a 131 MB float32 1024 x 32000
// gradient, more than the kernel itself). Asking for transparent huge pages on the (still
// untouched) buffer cuts the faults 512-fold; it is what torch's CPU allocator does for every
// allocation under THP_MEM_ALLOC_ENABLE=1. Only a hint: ignored where THP is off or unsupported.
constexpr int64_t kHugePageBytes = int64_t{1} << 21;

void advise_huge_pages(void* fresh, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < 4 * kHugePageBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(fresh);
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh;
  (void)bytes;
#endif
}

int64_t element_size(Dtype dtype) { return dtype == Dtype::kFloat64 ? 8 : dtype == Dtype::kFloat32 ? 4 : 2; }

// The rows of a checked problem, in parallel tasks of at least kMinElementsPerTask elements.
void run_rows(const KdProblem& p) {
  const RowsFn kernel = select_rows_kernel();
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / p.cols);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

ForwardOutputs fused_kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& grad_scale, double tau_s,
                                    double tau_t, bool standardize, int64_t correction, double eps, bool grad_student,
                                    bool grad_teacher, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                    double label_smoothing, double ce_weight, double kd_weight,
                                    const std::string& divergence, double beta, double dkd_alpha,
                                    double dkd_beta, const std::optional<at::Tensor>& temperature_rows,
                                    bool grad_temperature) {
  constexpr const char* op = "logitstd::fused_kd_forward";
  const FusedArgs a{student, teacher, mask, grad_scale, tau_s, tau_t, standardize, correction, eps, labels,
                    ignore_index, label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                    temperature_rows, grad_temperature};
  const at::ScalarType acc = check_forward_args(op, a, c10::DeviceType::CPU);
  check_label_values_cpu(op, labels, student.size(1), ignore_index);
  return fused_forward_front(a, acc, grad_student, grad_teacher, [&](const KdProblem& p) {
    if (p.grad_x != nullptr) advise_huge_pages(p.grad_x, p.rows * p.cols * element_size(p.x_dtype));
    if (p.grad_y != nullptr) advise_huge_pages(p.grad_y, p.rows * p.cols * element_size(p.y_dtype));
    run_rows(p);
  });
}

// Recompute the gradients of the rows where `active` is true with their factor grad_scale[r], in
// place (the other rows keep theirs); the loss is not written. One rounding of a low-precision
// gradient for any upstream factor (the op's backward), where scaling the saved one would round twice.
void fused_kd_regrad_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& active,
                         const at::Tensor& grad_scale, double tau_s, double tau_t, bool standardize,
                         int64_t correction, double eps, const at::Tensor& grad_x, const at::Tensor& grad_y,
                         const std::optional<at::Tensor>& labels, int64_t ignore_index, double label_smoothing,
                         double ce_weight, double kd_weight, const std::string& divergence, double beta,
                         double dkd_alpha, double dkd_beta, const std::optional<at::Tensor>& temperature_rows) {
  constexpr const char* op = "logitstd::fused_kd_regrad_";
  const std::optional<at::Tensor> rows(active);
  const FusedArgs a{student, teacher, rows, grad_scale, tau_s, tau_t, standardize, correction, eps, labels,
                    ignore_index, label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                    temperature_rows, false};
  fused_regrad_front(op, a, grad_x, grad_y, c10::DeviceType::CPU, [&](const KdProblem& p, at::ScalarType) {
    check_label_values_cpu(op, labels, student.size(1), ignore_index);
    run_rows(p);
  });
}

// grad[r] *= scale[r] (or scale[0]) in place, skipping rows whose scale is exactly 1. Traffic per
// element: nothing for skipped rows (the scalar loss.backward() case), else one read and one write
// of sizeof(grad) bytes.
void scale_rows_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_rows(grad, scale);
  TORCH_CHECK_VALUE(grad.device().is_cpu(), "logitstd::scale_rows_ (CPU): grad is on ", grad.device());
  const int64_t rows = grad.size(0);
  const int64_t cols = grad.size(1);
  if (rows == 0 || cols == 0) return;
  const at::Tensor factors = scale.reshape({-1}).to(at::kDouble).contiguous();
  const double* f = factors.data_ptr<double>();
  const bool one_factor = factors.numel() == 1;
  // The common case, loss.backward() on a scalar loss: nothing to do (no parallel region either).
  if (std::all_of(f, f + factors.numel(), [](double v) { return v == 1.0; })) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "logitstd_scale_rows_", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / cols);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const double factor = f[one_factor ? 0 : r];
        if (factor == 1.0) continue;
        scalar_t* row = g + r * cols;
        for (int64_t i = 0; i < cols; ++i) row[i] = static_cast<scalar_t>(static_cast<double>(row[i]) * factor);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(logitstd, CPU, m) {
  m.impl("fused_kd_forward", &fused_kd_forward_cpu);
  m.impl("fused_kd_regrad_", &fused_kd_regrad_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
}

}  // namespace cpu
}  // namespace logitstd
