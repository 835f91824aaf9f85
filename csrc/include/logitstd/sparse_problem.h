// Plain-data description of one sparse-teacher call (logitstd::sparse_kd_forward): a dense student
// row of V logits against a teacher stored as k (id, value) entries per row. No ATen types, like
// kd_problem.h, so the kernels compiled per instruction set include nothing from the op layer.
#pragma once

#include <cstdint>

#include "logitstd/kd_problem.h"

namespace logitstd {

// How the teacher's top-k support becomes a distribution (config.SUPPORTS, docs/design.md section 9).
enum class Support : int32_t { kRenormalize = 0, kRenormalizeTeacher = 1, kTail = 2 };

struct SparseProblem {
  const void* x = nullptr;  // student logits, row r at x + r * x_stride elements
  int64_t x_stride = 0;
  Dtype x_dtype = Dtype::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;  // V
  int64_t k = 0;
  // The teacher, contiguous (rows, k), values and the per-row tensors in the accumulation dtype.
  const int64_t* ids = nullptr;
  const void* values = nullptr;
  const bool* entry_mask = nullptr;  // (rows, k) or nullptr: every entry (but -inf values) is valid
  const void* row_mean = nullptr;    // (rows,) or nullptr: the teacher is standardized over its entries
  const void* row_std = nullptr;
  const void* log_normalizer = nullptr;  // (rows,) or nullptr: 0 (log-probabilities at the KD temperature)
  double value_scale = 1.0;              // T_gen for stored log-probabilities, else 1
  Support support = Support::kRenormalize;
  const bool* mask = nullptr;  // (rows,) or nullptr
  void* loss = nullptr;        // (rows,) accumulation dtype; nullptr: not written (recomputation)
  void* ce_rows = nullptr;
  void* kd_rows = nullptr;
  void* grad_x = nullptr;  // contiguous (rows, cols) in x_dtype, or nullptr
  const void* grad_scale = nullptr;
  int64_t grad_scale_stride = 0;
  bool zero_excluded = true;  // false: excluded rows are not touched (recomputation)
  double tau_s = 1.0;
  double tau_t = 1.0;
  double eps = 0.0;
  int64_t correction = 1;
  bool standardize = true;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double ce_weight = 0.0;
  double kd_weight = 1.0;
  bool acc_double = false;
};

}  // namespace logitstd
