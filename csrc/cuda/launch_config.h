// Launch constants of the CUDA kernel (csrc/cuda/kd_cuda.cu), each with the reason for its value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace logitstd {
namespace cuda {

// Threads per CTA: 8 warps. With kTargetCtaBytes of row data per CTA, three CTAs (768 threads)
// fit one SM's 228 KB of shared memory and its 65536 registers at <= 85 registers per thread
// (kMinCtasPerSm in __launch_bounds__), so one CTA's loads overlap another CTA's math.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinCtasPerSm = 3;
// jsd, tvd and Jeffreys keep more values per element (their pointwise terms, both KLs' sums): at
// three CTAs per SM (<= 80 registers) they spill; two (<= 128 registers) do not.
constexpr int kMinCtasPerSmHeavy = 2;

// Shared memory per CTA for its chunk of the (student, teacher) row pair: the cluster size is the
// smallest power of two that brings a CTA's chunk under this (bf16: V = 32768 -> 2 CTAs,
// V = 131072 -> 8, V = 262144 -> 16). 64 KB x 3 CTAs + static shared memory fit in 228 KB.
constexpr size_t kTargetCtaBytes = 64 * 1024;

// Cluster sizes: 8 is the portable maximum; Hopper (H100/H200) also runs 16 with
// cudaFuncAttributeNonPortableClusterSizeAllowed, which keeps bf16 rows of 256k classes at 64 KB
// per CTA. Whether a size can be scheduled is asked of cudaOccupancyMaxActiveClusters.
constexpr int kMaxPortableCluster = 8;
constexpr int kMaxCluster = 16;

// Rows up to this many classes evaluate the chain rule from the per-element terms (row_math.h,
// term_coefficients), one more pass over shared memory (two more exponentials per element): the
// numerically faithful form, needed where the two terms of the standardization gradient cancel
// (V = 2, where the exact gradient is O(eps)). Short rows are bound by launch and latency, not by
// this pass; the long rows of the performance targets (32k-256k classes) keep three passes.
constexpr int64_t kTermsMaxCols = 4096;

// Rows per CTA of the row-scaling kernel's grid-stride loop (grid = min(rows, this)).
constexpr int64_t kScaleMaxBlocks = 65535;
constexpr int kScaleThreads = 256;
// The row-scaling kernel's access width on aligned gradients (V a multiple of 16 / sizeof(grad)):
// 16 bytes, the widest single load/store per thread (8 bf16, 4 float, 2 double): an eighth (bf16)
// or a quarter (float) of the memory instructions of scalar accesses for the same bytes. Not yet
// timed on a GPU.
constexpr int kScaleVecBytes = 16;

}  // namespace cuda
}  // namespace logitstd
