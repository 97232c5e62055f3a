// The fused GALA cross-entropy CUDA kernels: parameters and the host launchers.
//
// Plain CUDA C++: no torch header, so that every .cu file of csrc/cuda compiles with nvcc alone
// (the GALA_CUDA_COMPILE_CHECK build). The torch bindings (gala_ce_cuda_binding.cpp for
// fused_ce_fwd, gala_step_cuda_binding.cpp for fused_ce_step_) allocate the tensors, fill
// GalaCeCudaParams with raw pointers and call the two launchers in order:
//
//   1. launch_gala_ce_prepare   per-block partial counts of the labels (N, W, bad rows, the first
//                               bad row), the class bias of a training step, zeroed fresh outputs;
//   2. launch_gala_ce_forward   loss, gradient (already scaled), raw statistics; its last CTA
//                               writes the reduced loss and, in a training step, folds the
//                               statistics into the state.
//
// Both are asynchronous on `stream`; neither synchronises with the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_types.h"

namespace gala::cuda {

// Reduction codes, the same numbers as gala::Reduction (csrc/ops.h) and gala_kernels/ops.py.
enum class ReductionCode : int32_t { None = 0, Mean = 1, Sum = 2 };

// Accumulation codes of a GALAState (gala_kernels/state.py ACCUMULATIONS).
enum class AccumulationCode : int32_t { Cumulative = 0, Sum = 1, Ema = 2 };

// The int64 workspace of one call (workspace_slots(C, dtype) slots, allocated per call by the
// binding, never zeroed by the host: the prepare kernel writes every slot the forward kernel reads).
//
//   [kLossSum]     double (bit pattern): sum of the row losses, for "mean" and "sum"
//   [kDoneCtas]    uint64: CTAs of the forward kernel that have finished (the last one finishes)
//   [kPartials + b * kPartialSlots + PartialSlot]   block b of the prepare kernel's label counts
//   [kBiasSlot ..] a training step's class bias lambda1 * log(pos_grad + eps), C values of the
//                  math dtype (written by the prepare kernel, read by the forward kernel)
enum WorkspaceSlot : int32_t {
  kLossSum = 0,
  kDoneCtas = 1,
  kPartials = 2,
};
// The counts of the labels one prepare block scanned (its share of the rows).
enum PartialSlot : int32_t {
  kPartialRows = 0,          // int64: rows whose label is not ignore_index (bad labels included)
  kPartialBadRows = 1,       // int64: rows whose label is neither ignore_index nor in [0, C)
  kPartialFirstBadRow = 2,   // int64: the first such row, INT64_MAX when none
  kPartialFirstBadLabel = 3, // int64: its label
  kPartialLabelWeight = 4,   // double: sum of weight[y] over the rows with a label in [0, C)
                             //         (their number without weight)
  kPartialClassWeight = 5,   // double: sum of weight[j] over a share of the columns (only with a
                             //         weight and label smoothing; 0 otherwise)
  kPartialSlots = 6,
};
constexpr int kMaxPartials = 32;  // prepare blocks that scan labels, at most
constexpr int64_t kBiasSlot = kPartials + kMaxPartials * kPartialSlots + 2;  // 16-byte aligned
static_assert(kBiasSlot % 2 == 0, "the bias region starts on a 16-byte boundary");

// int64 slots of the workspace for C classes (the bias region only for a training step).
inline int64_t workspace_slots(int64_t num_classes, DType dtype, bool training_step) {
  if (!training_step) return kBiasSlot;
  const int64_t bias_bytes = num_classes * (dtype == DType::Float64 ? 8 : 4);
  return kBiasSlot + (bias_bytes + 7) / 8;
}

// Layout of a GALAState's label_error record (gala_kernels/label_errors.py).
enum LabelErrorSlot : int32_t {
  kErrorFlag = 0,
  kErrorRow = 1,
  kErrorLabel = 2,
  kErrorStep = 3,
  kErrorIgnoreIndex = 4,
  kErrorCallKey = 5,  // 0 between launches; these kernels find the first bad row without it
  kErrorSlots = 6,
};

// Slots after the 3C raw sums of a GALAState's step_scratch (gala_kernels/state.py).
enum ScratchSlot : int32_t {
  kScratchRows = 0,        // non-ignored rows of the step (bad labels included)
  kScratchNonfinite = 1,   // non-ignored rows holding a non-finite logit
  kScratchBadLabels = 2,   // rows with a label neither ignore_index nor in [0, C)
  kScratchFoldTicket = 7,  // fold_step_'s CTA counter (uint32 bits), 0 between launches
  kScratchSlots = 8,
};

// A training step's state (fused_ce_step_): everything the prepare kernel and the forward
// kernel's last CTA read and write besides the fused op's own outputs.
struct GalaStepParams {
  bool active = false;             // false: fused_ce_fwd
  const float* pos_grad = nullptr; // stats[0], read by the prepare kernel for the class bias
  double lambda1 = 0.0;
  double eps = 0.0;
  float* stats[3] = {nullptr, nullptr, nullptr};    // pos_grad, neg_grad, cls_neg_grad (C,)
  float* running[3] = {nullptr, nullptr, nullptr};  // the cumulative running sums, or nullptr
  int64_t* steps = nullptr;
  int64_t* nonfinite_rows = nullptr;
  float* scratch = nullptr;        // (3C + kScratchSlots,): raw sums then ScratchSlot
  int64_t* label_error = nullptr;  // (kErrorSlots,)
  AccumulationCode accumulation = AccumulationCode::Cumulative;
  float ema_beta = 0.0f;
  float ema_keep = 0.0f;           // 1 - ema_beta, rounded once on the host
  bool fold = false;               // the last CTA folds the scratch into the state
  int64_t row_offset = 0;          // batch row of labels[0], for the record
};

// Everything one call reads and writes. Pointers are raw device pointers; offsets are int64.
struct GalaCeCudaParams {
  // data ptrs
  const void* logits;       // (B, C) in `dtype`, row stride `logits_row_stride`, unit column stride
  const int64_t* labels;    // (B,) contiguous; each in [0, C) or == ignore_index (others: bad rows)
  const void* class_bias;   // (C,) lambda1 * log(pos_grad + eps) in the math dtype (float, or
                            // double for Float64 logits), or nullptr (plain cross-entropy). For a
                            // training step: the workspace's bias region
  const void* weight;       // (C,) class weights in the math dtype, or nullptr (all ones)
  void* grad;               // (B, C) contiguous in `dtype`: dloss/dlogits for grad_output = 1
  void* loss;               // `dtype`: (B,) for reduction None, a single element otherwise
  float* raw_stats;         // (3, C) raw_pos, raw_neg, raw_clsneg, or nullptr (no statistics);
                            // zeroed by the prepare kernel, except in a training step (scratch)
  float* raw_pairwise;      // (C, C) raw_pair[j, k], or nullptr (no pairwise tracking)
  int64_t* counts;          // fused_ce_fwd: (2,) [N, non-finite non-ignored rows]; nullptr in a step
  int64_t* workspace;       // see WorkspaceSlot
  // shapes and strides
  int64_t batch;            // B
  int64_t num_classes;      // C
  int64_t logits_row_stride;
  // constants
  int64_t ignore_index;
  ReductionCode reduction;
  DType dtype;
  double label_smoothing;   // ls, in [0, 1]
  // set by the launchers
  double smoothing_per_class;  // ls / C
  int32_t label_partials;      // prepare blocks that scan labels
  GalaStepParams step;
};

// Prepare blocks that count labels for a batch of B rows (each writes one partial, PartialSlot).
int gala_ce_label_partials(int64_t batch);

// Step 1: the label counts, the class bias of a training step, zeroed fresh outputs.
cudaError_t launch_gala_ce_prepare(const GalaCeCudaParams& params, cudaStream_t stream);

// Step 2: the fused forward (after step 1 on the same stream). Picks the kernel variant by C
// and dtype (see gala_ce_kernel.cu, "Choosing a kernel"). For fused_ce_fwd B must be >= 1; a
// training step launches one CTA even for B = 0 (its fold still runs).
cudaError_t launch_gala_ce_forward(const GalaCeCudaParams& params, cudaStream_t stream);

// The name of the variant launch_gala_ce_forward would run (for benchmarks and tests).
const char* gala_ce_forward_variant(const GalaCeCudaParams& params);

}  // namespace gala::cuda
