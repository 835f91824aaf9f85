// Plain-data description of one fused forward call, passed from the op layer (which owns the
// tensors) to the kernels (which only see pointers). No ATen types, so the CPU kernel translation
// units compiled per instruction set and the CUDA kernels include nothing else from the op layer.
#pragma once

#include <cstdint>

namespace logitstd {

enum class Dtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct KdProblem {
  const void* x = nullptr;  // student logits, row r starts at x + r * x_stride elements
  int64_t x_stride = 0;
  Dtype x_dtype = Dtype::kFloat32;
  const void* y = nullptr;  // teacher logits
  int64_t y_stride = 0;
  Dtype y_dtype = Dtype::kFloat32;
  const bool* mask = nullptr;  // (rows,) or nullptr: every row included
  int64_t rows = 0;
  int64_t cols = 0;
  void* loss = nullptr;    // (rows,) in the accumulation dtype
  void* grad_x = nullptr;  // contiguous (rows, cols) in x_dtype, or nullptr when not requested
  void* grad_y = nullptr;  // contiguous (rows, cols) in y_dtype, or nullptr
  // Gradient factors in the accumulation dtype, on the inputs' device (CUDA: read by the kernel, no
  // host synchronization): row r uses grad_scale[r * grad_scale_stride] (stride 0: one factor).
  const void* grad_scale = nullptr;
  int64_t grad_scale_stride = 0;
  // Forward: rows excluded by the mask get loss 0 and zero gradients. Recomputation of gradients
  // (fused_kd_regrad_): excluded rows are not touched, and loss is nullptr (not written).
  bool zero_excluded = true;
  double tau_s = 1.0;
  double tau_t = 1.0;
  double eps = 0.0;
  int64_t correction = 1;
  bool standardize = true;
  // The distillation objective (objective.py): labels (rows,) int64 or nullptr (pure KD); a row
  // whose label is ignore_index is excluded like a masked row. loss = ce_weight * CE + kd_weight * KD,
  // the gradients likewise; ce_rows / kd_rows (rows,) receive the two parts (nullptr: not written).
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double ce_weight = 0.0;
  double kd_weight = 1.0;
  void* ce_rows = nullptr;
  void* kd_rows = nullptr;
  // The divergence (logitstd/divergence.h, Divergence), the generalized JSD's beta, and decoupled
  // KD's weights of its target-class and non-target terms (divergence kDkd; needs labels).
  int32_t divergence = 0;
  double beta = 0.5;
  double dkd_alpha = 1.0;
  double dkd_beta = 8.0;
  // A learnable temperature (CTKD): row r's tau_s = tau_t = tau_rows[r * tau_stride] (accumulation
  // dtype; nullptr: the scalars above), and tau_grad (rows,) receives grad_scale[r] * d(objective row)
  // / d tau (nullptr: not requested; the CPU kernel only).
  const void* tau_rows = nullptr;
  int64_t tau_stride = 0;
  void* tau_grad = nullptr;
  bool acc_double = false;  // accumulate in float64 (either input is float64), else float32
};

}  // namespace logitstd
