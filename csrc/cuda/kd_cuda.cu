// Host side of the CUDA kernel (kd_kernel.cuh): launch planning (cluster size, shared memory),
// the dispatch on dtypes, and the ops logitstd::fused_kd_forward, fused_kd_regrad_ and scale_rows_.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "kd_kernel.cuh"
#include "launch_config.h"
#include "logitstd/checks.h"
#include "logitstd/divergence.h"
#include "logitstd/kd_problem.h"
#include "logitstd/op_front.h"

namespace logitstd {
namespace cuda {

// ----------------------------------------------------------------------------------------------
// Host side: launch planning.
struct DeviceInfo {
  int major = 0;
  int max_smem_optin = 0;  // bytes of shared memory one CTA may use (opt-in)
};

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, info);
  return info;
}

struct LaunchPlan {
  int cluster = 1;
  int64_t chunk = 0;   // elements per CTA
  int64_t window = 0;  // elements staged at a time: the chunk (resident), or less (streamed)
  int64_t y_offset = 0;
  size_t smem = 0;  // dynamic shared memory bytes
  int threads = kThreads;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Raise the kernel's dynamic shared memory limit to the opt-in maximum and allow 16-CTA clusters,
// once per kernel and device; returns the dynamic shared memory a CTA may use. The limit is only
// raised, never lowered, so concurrent launches with different shared memory sizes cannot race.
template <class Kernel>
int64_t prepare_kernel(Kernel kernel, int device, const DeviceInfo& info) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> prepared;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = prepared.find(key);
  if (it != prepared.end()) return it->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int64_t max_dynamic =
      static_cast<int64_t>(info.max_smem_optin) - static_cast<int64_t>(attributes.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_dynamic)));
  if (info.major >= 9) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
  prepared.emplace(key, max_dynamic);
  return max_dynamic;
}

// Whether clusters of `cluster` CTAs with `smem` bytes of dynamic shared memory can be scheduled
// (cached per kernel, device and configuration; the answer does not change during a process).
template <class Kernel>
bool cluster_schedulable(Kernel kernel, int device, int cluster, size_t smem, int threads) {
  if (cluster == 1) return true;
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t, int>, bool> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, cluster, smem, threads);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
  if (!ok) (void)cudaGetLastError();  // a refused configuration is an answer, not an error
  cache.emplace(key, ok);
  return ok;
}

template <class S, class T, class Kernel>
LaunchPlan plan_launch(Kernel kernel, int device, int64_t cols, int pack) {
  const DeviceInfo info = device_info(device);
  const int64_t max_dynamic = prepare_kernel(kernel, device, info);
  const int max_cluster = info.major >= 9 ? kMaxCluster : 1;
  const int64_t packs = ceil_div(cols, pack);

  auto make = [&](int cluster, bool resident) {
    LaunchPlan plan;
    plan.cluster = cluster;
    const int64_t chunk_packs = ceil_div(packs, cluster);
    plan.chunk = chunk_packs * pack;
    // a streamed window: the most packs whose x and y (each rounded up to 16 bytes) fit kTargetCtaBytes
    const int64_t window_packs =
        (static_cast<int64_t>(kTargetCtaBytes) - 32) / (pack * static_cast<int64_t>(sizeof(S) + sizeof(T)));
    plan.window = resident ? plan.chunk : std::min(plan.chunk, window_packs * pack);
    plan.y_offset = round_up(plan.window * static_cast<int64_t>(sizeof(S)), 16);
    plan.smem = static_cast<size_t>(plan.y_offset + round_up(plan.window * static_cast<int64_t>(sizeof(T)), 16));
    plan.threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, round_up(chunk_packs, 32))));
    return plan;
  };
  // The smallest cluster whose chunk fits the per-CTA target (several CTAs per SM), then the
  // smallest whose chunk fits the opt-in shared memory (one CTA per SM), else stream the rows.
  for (const int64_t limit : {static_cast<int64_t>(kTargetCtaBytes), max_dynamic}) {
    for (int cluster = 1; cluster <= max_cluster; cluster *= 2) {
      const LaunchPlan plan = make(cluster, true);
      if (static_cast<int64_t>(plan.smem) <= limit &&
          cluster_schedulable(kernel, device, cluster, plan.smem, plan.threads)) {
        return plan;
      }
    }
  }
  for (int cluster = max_cluster; cluster > 1; cluster /= 2) {
    const LaunchPlan plan = make(cluster, false);
    if (cluster_schedulable(kernel, device, cluster, plan.smem, plan.threads)) return plan;
  }
  return make(1, false);
}

KdCudaArgs kernel_args(const KdProblem& p, const LaunchPlan& plan) {
  KdCudaArgs args;
  args.x = p.x;
  args.y = p.y;
  args.x_stride = p.x_stride;
  args.y_stride = p.y_stride;
  args.mask = p.mask;
  args.labels = p.labels;
  args.ignore_index = p.ignore_index;
  args.label_smoothing = p.label_smoothing;
  args.ce_weight = p.ce_weight;
  args.kd_weight = p.kd_weight;
  args.ce_rows = p.ce_rows;
  args.kd_rows = p.kd_rows;
  args.grad_scale = p.grad_scale;
  args.grad_scale_stride = p.grad_scale_stride;
  args.zero_excluded = p.zero_excluded;
  args.loss = p.loss;
  args.grad_x = p.grad_x;
  args.grad_y = p.grad_y;
  args.cols = p.cols;
  args.chunk = plan.chunk;
  args.window = plan.window;
  args.y_smem_offset = plan.y_offset;
  args.cluster = plan.cluster;
  args.from_terms = p.cols <= kTermsMaxCols;
  args.standardize = p.standardize;
  args.correction = p.correction;
  args.tau_s = p.tau_s;
  args.tau_t = p.tau_t;
  args.eps = p.eps;
  args.beta = p.beta;
  return args;
}

template <class S, class T, int P, bool kVec, Divergence D>
void launch_fused(const KdProblem& p, cudaStream_t stream) {
  auto kernel = kd_fused_kernel<S, T, P, kVec, D>;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const LaunchPlan plan = plan_launch<S, T>(kernel, device, p.cols, P);
  TORCH_CHECK(p.rows <= (int64_t{1} << 31) / plan.cluster - 1, "logitstd::fused_kd_forward (CUDA): ", p.rows,
              " rows x ", plan.cluster, " CTAs per row exceed the grid limit");
  const KdCudaArgs args = kernel_args(p, plan);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.rows * plan.cluster));
  config.blockDim = dim3(static_cast<unsigned>(plan.threads));
  config.dynamicSmemBytes = plan.smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = plan.cluster > 1 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
}

// One kernel per divergence (logitstd/divergence.h): its per-element math is compiled in.
template <class S, class T, int P, bool kVec>
void launch_divergence(const KdProblem& p, cudaStream_t stream) {
  switch (static_cast<Divergence>(p.divergence)) {
    case Divergence::kForwardKl: return launch_fused<S, T, P, kVec, Divergence::kForwardKl>(p, stream);
    case Divergence::kReverseKl: return launch_fused<S, T, P, kVec, Divergence::kReverseKl>(p, stream);
    case Divergence::kJsd: return launch_fused<S, T, P, kVec, Divergence::kJsd>(p, stream);
    case Divergence::kJeffreys: return launch_fused<S, T, P, kVec, Divergence::kJeffreys>(p, stream);
    case Divergence::kTvd: return launch_fused<S, T, P, kVec, Divergence::kTvd>(p, stream);
  }
  TORCH_CHECK(false, "logitstd::fused_kd_forward (CUDA): unknown divergence code ", p.divergence);
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// 16-byte packs when every row of both inputs and of the outputs starts 16-byte aligned and V is
// a multiple of the pack; element-wise loads otherwise.
template <class S, class T>
void launch_for_types(const KdProblem& p, cudaStream_t stream) {
  constexpr int kPack = static_cast<int>(16 / std::min(sizeof(S), sizeof(T)));
  const bool vec = aligned16(p.x) && aligned16(p.y) && (p.x_stride * static_cast<int64_t>(sizeof(S))) % 16 == 0 &&
                   (p.y_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 && p.cols % kPack == 0 &&
                   aligned16(p.grad_x) && aligned16(p.grad_y);
  if (vec) {
    launch_divergence<S, T, kPack, true>(p, stream);
  } else {
    launch_divergence<S, T, 1, false>(p, stream);
  }
}

// Dtype pairs with a kernel of their own; other pairs are computed in the accumulation dtype.
bool native_pair(at::ScalarType s, at::ScalarType t) {
  const auto low = [](at::ScalarType d) { return d == at::kHalf || d == at::kBFloat16; };
  return s == t || (low(s) && t == at::kFloat) || (s == at::kFloat && low(t));
}

#if defined(LOGITSTD_CUDA_REPORT_ONLY)
// scripts/cuda_sass_check.py: only the kernels of the static cost report (bf16 and float32 inputs,
// 16-byte packs), compiled exactly as in the full build; the result is not a working extension.
void launch(const KdProblem& p, at::ScalarType s, at::ScalarType, cudaStream_t stream) {
  constexpr int kBf16Pack = 8, kFloatPack = 4;
  if (s == at::kBFloat16) return launch_divergence<__nv_bfloat16, __nv_bfloat16, kBf16Pack, true>(p, stream);
  launch_divergence<float, float, kFloatPack, true>(p, stream);
}
#else
void launch(const KdProblem& p, at::ScalarType s, at::ScalarType t, cudaStream_t stream) {
  using bf16 = __nv_bfloat16;
  if (s == t) {
    switch (s) {
      case at::kFloat: return launch_for_types<float, float>(p, stream);
      case at::kDouble: return launch_for_types<double, double>(p, stream);
      case at::kHalf: return launch_for_types<__half, __half>(p, stream);
      case at::kBFloat16: return launch_for_types<bf16, bf16>(p, stream);
      default: break;
    }
  } else if (t == at::kFloat) {
    if (s == at::kHalf) return launch_for_types<__half, float>(p, stream);
    if (s == at::kBFloat16) return launch_for_types<bf16, float>(p, stream);
  } else if (s == at::kFloat) {
    if (t == at::kHalf) return launch_for_types<float, __half>(p, stream);
    if (t == at::kBFloat16) return launch_for_types<float, bf16>(p, stream);
  }
  TORCH_CHECK(false, "logitstd::fused_kd_forward (CUDA): no kernel for student ", s, " and teacher ", t);
}
#endif

// ----------------------------------------------------------------------------------------------
// The ops.
ForwardOutputs fused_kd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
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
  const at::ScalarType acc = check_forward_args(op, a, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(divergence_code(op, divergence, beta) != 5, op, " (CUDA): decoupled KD (dkd) runs on the cpu "
                    "and torch backends");
  TORCH_CHECK_VALUE(!temperature_rows.has_value(), op, " (CUDA): no per-row temperature in the CUDA kernel; use "
                    "backend=\"cpu\" or \"torch\"");
  TORCH_CHECK_VALUE(student.size(1) <= INT32_MAX, op, " (CUDA): student has ", student.size(1),
                    " classes, more than the kernel's limit of 2^31 - 1");
  const c10::cuda::CUDAGuard guard(student.device());
  if (!native_pair(student.scalar_type(), teacher.scalar_type())) {
    // no kernel for this dtype pair: both in the accumulation dtype, the gradients rounded back once
    auto out = fused_kd_forward_cuda(student.to(acc), teacher.to(acc), mask, grad_scale, tau_s, tau_t, standardize,
                                     correction, eps, grad_student, grad_teacher, labels, ignore_index,
                                     label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                                     temperature_rows, grad_temperature);
    return {std::get<0>(out), grad_student ? std::get<1>(out).to(student.scalar_type()) : student.new_empty({0}),
            grad_teacher ? std::get<2>(out).to(teacher.scalar_type()) : teacher.new_empty({0}), std::get<3>(out),
            std::get<4>(out), std::get<5>(out)};
  }
  return fused_forward_front(a, acc, grad_student, grad_teacher, [&](const KdProblem& p) {
    launch(p, student.scalar_type(), teacher.scalar_type(), c10::cuda::getCurrentCUDAStream());
  });
}

// Recompute the gradients of the rows where `active` is true, in place (the backward's one-rounding
// path for low-precision gradients). Rows not active are not touched and cost no memory traffic:
// the kernel returns before loading them (no host synchronization).
void fused_kd_regrad_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& active,
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
  const c10::cuda::CUDAGuard guard(student.device());
  fused_regrad_front(op, a, grad_x, grad_y, c10::DeviceType::CUDA, [&](const KdProblem& p, at::ScalarType acc) {
    if (native_pair(student.scalar_type(), teacher.scalar_type())) {
      launch(p, student.scalar_type(), teacher.scalar_type(), c10::cuda::getCurrentCUDAStream());
      return;
    }
    auto out = fused_kd_forward_cuda(student.to(acc), teacher.to(acc), active, grad_scale, tau_s, tau_t, standardize,
                                     correction, eps, grad_x.numel() > 0, grad_y.numel() > 0, labels, ignore_index,
                                     label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                                     temperature_rows, false);
    const at::Tensor picked = active.reshape({-1, 1});
    if (grad_x.numel() > 0) grad_x.copy_(at::where(picked, std::get<1>(out).to(grad_x.scalar_type()), grad_x));
    if (grad_y.numel() > 0) grad_y.copy_(at::where(picked, std::get<2>(out).to(grad_y.scalar_type()), grad_y));
  });
}

void scale_rows_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_rows(grad, scale);
  TORCH_CHECK_VALUE(grad.is_cuda(), "logitstd::scale_rows_ (CUDA): grad is on ", grad.device());
  const int64_t rows = grad.size(0);
  const int64_t cols = grad.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor factors = scale.reshape({-1}).contiguous();
  const bool one_factor = factors.numel() == 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, kScaleMaxBlocks));
  auto run = [&](auto grad_type, auto factor_type) {
    using G = decltype(grad_type);
    using F = decltype(factor_type);
    G* g = static_cast<G*>(grad.data_ptr());
    const F* f = static_cast<const F*>(factors.data_ptr());
    // grad is contiguous: every row starts 16-byte aligned when the first does and V is a multiple
    // of the pack (V * sizeof(G) a multiple of 16)
    if (aligned16(g) && cols % static_cast<int64_t>(kScaleVecBytes / sizeof(G)) == 0) {
      scale_rows_kernel<G, F, true><<<blocks, kScaleThreads, 0, stream>>>(g, f, rows, cols, one_factor);
    } else {
      scale_rows_kernel<G, F, false><<<blocks, kScaleThreads, 0, stream>>>(g, f, rows, cols, one_factor);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_factor = [&](auto grad_type) {
    if (factors.scalar_type() == at::kDouble) {
      run(grad_type, double{});
    } else {
      run(grad_type, float{});
    }
  };
  switch (grad.scalar_type()) {
    case at::kFloat: return with_factor(float{});
    case at::kDouble: return with_factor(double{});
    case at::kHalf: return with_factor(__half{});
    case at::kBFloat16: return with_factor(__nv_bfloat16{});
    default: TORCH_CHECK_TYPE(false, "logitstd::scale_rows_ (CUDA): unsupported dtype ", grad.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(logitstd, CUDA, m) {
  m.impl("fused_kd_forward", &fused_kd_forward_cuda);
  m.impl("fused_kd_regrad_", &fused_kd_regrad_cuda);
  m.impl("scale_rows_", &scale_rows_cuda);
}

}  // namespace cuda
}  // namespace logitstd
