// The training step's two small CUDA kernels besides the fused forward (gala_ce_kernel.cuh):
// fold_step_ and scale_grad_. Plain CUDA C++ (no torch header); the torch binding is
// gala_step_cuda_binding.cpp. Both launchers are asynchronous on `stream` and never synchronise
// with the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_types.h"
#include "gala_ce_kernel.cuh"

namespace gala::cuda {

// fold_step_: the fold of a step whose raw sums a fused_ce_step_ launch left in the scratch
// (fold = false), e.g. after they were summed over ranks. Every pointer is a contiguous float32
// device buffer of a GALAState.
struct FoldStepCudaParams {
  float* scratch;           // (3C + kScratchSlots,): raw_pos, raw_neg, raw_cls, then ScratchSlot
  float* raw_pairwise;      // (C, C) raw pairwise sums, or nullptr
  float* stats[3];          // pos_grad, neg_grad, cls_neg_grad (C,)
  float* running[3];        // their cumulative running sums, or nullptr (other modes)
  float* pairwise;          // (C, C) or nullptr
  float* running_pairwise;  // (C, C) cumulative running sums of pairwise, or nullptr
  int64_t* steps;
  int64_t* nonfinite_rows;
  int64_t num_classes;
  AccumulationCode accumulation;
  float ema_beta;
  float ema_keep;  // 1 - ema_beta
};

// One launch: every CTA folds a share of the 3C vector elements (and the C x C pairwise ones)
// unless the scratch counts a bad-label row, zeroing the raw sums; the last CTA (a ticket in
// scratch[3C + kScratchFoldTicket]) adds 1 to steps and the non-finite rows to nonfinite_rows
// (when folded) and zeroes the count slots.
cudaError_t launch_fold_step(const FoldStepCudaParams& params, cudaStream_t stream);

// scale_grad_: grad *= grad_output in place; the kernel reads grad_output (a single element on
// the device) and returns at once when it is 1 after rounding to grad's dtype.
struct ScaleGradCudaParams {
  void* grad;               // contiguous, `grad_dtype`
  const void* grad_output;  // one element, `grad_output_dtype`
  int64_t numel;
  DType grad_dtype;
  DType grad_output_dtype;
};

// One launch (none when grad is empty).
cudaError_t launch_scale_grad(const ScaleGradCudaParams& params, cudaStream_t stream);

}  // namespace gala::cuda
