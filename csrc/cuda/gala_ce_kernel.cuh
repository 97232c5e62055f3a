// The fused GALA cross-entropy CUDA kernels: parameters and the host launchers.
//
// Plain CUDA C++: no torch header, so that every .cu file of csrc/cuda compiles with nvcc alone
// (the GALA_CUDA_COMPILE_CHECK build). The torch binding (gala_ce_cuda_binding.cpp) allocates
// the tensors, fills GalaCeCudaParams with raw pointers and calls the two launchers in order:
//
//   1. launch_gala_ce_prepare   counts N (non-ignored rows) into counts[0], finds the first
//                               out-of-range label, zeroes the statistics scratch;
//   2. launch_gala_ce_forward   loss, gradient (already scaled by w_i) and raw statistics.
//
// Both are asynchronous on `stream`; neither synchronises with the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_types.h"

namespace gala::cuda {

// Reduction codes, the same numbers as gala::Reduction (csrc/ops.h) and gala_kernels/ops.py.
enum class ReductionCode : int32_t { None = 0, Mean = 1, Sum = 2 };

// Layout of the int64 workspace (kWorkspaceSlots slots), written by the prepare kernel.
enum WorkspaceSlot : int32_t {
  kLossSum = 0,      // double (bit pattern): sum of the row losses, for "mean" and "sum"
  kDoneCtas = 1,     // uint64: CTAs of the forward kernel that have finished (last one writes loss)
  kFirstBadRow = 2,  // int64: first row whose label is neither ignore_index nor in [0, C), or -1
  kBadLabel = 3,     // int64: the label of that row (undefined when kFirstBadRow is -1)
  kWorkspaceSlots = 4,
};

// Everything one call reads and writes. Pointers are raw device pointers; offsets are int64.
struct GalaCeCudaParams {
  // data ptrs
  const void* logits;       // (B, C) in `dtype`, row stride `logits_row_stride`, unit column stride
  const int64_t* labels;    // (B,) contiguous; each in [0, C) or == ignore_index (others flagged)
  const void* class_bias;   // (C,) lambda1 * log(pos_grad + eps) in the math dtype (float, or
                            // double for Float64 logits), or nullptr (plain cross-entropy)
  void* grad;               // (B, C) contiguous in `dtype`: dloss/dlogits for grad_output = 1
  void* loss;               // `dtype`: (B,) for reduction None, a single element otherwise
  float* raw_stats;         // (3, C) raw_pos, raw_neg, raw_clsneg, or nullptr (no statistics)
  float* raw_pairwise;      // (C, C) raw_pair[j, k], or nullptr (no pairwise tracking)
  int64_t* counts;          // (2,) [N non-ignored rows, non-ignored rows holding a non-finite logit]
  int64_t* workspace;       // (kWorkspaceSlots,), see WorkspaceSlot
  // shapes and strides
  int64_t batch;            // B
  int64_t num_classes;      // C
  int64_t logits_row_stride;
  // constants
  int64_t ignore_index;
  ReductionCode reduction;
  DType dtype;
};

// Step 1: N, the label range check and the zeroed scratch. One small kernel.
cudaError_t launch_gala_ce_prepare(const GalaCeCudaParams& params, cudaStream_t stream);

// Step 2: the fused forward (after step 1 on the same stream). Picks the kernel variant by C
// and dtype (see gala_ce_kernel.cu, "Choosing a kernel"). B must be >= 1.
cudaError_t launch_gala_ce_forward(const GalaCeCudaParams& params, cudaStream_t stream);

// The name of the variant launch_gala_ce_forward would run (for benchmarks and tests).
const char* gala_ce_forward_variant(const GalaCeCudaParams& params);

}  // namespace gala::cuda
