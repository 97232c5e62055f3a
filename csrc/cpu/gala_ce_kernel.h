// The fused GALA cross-entropy CPU kernel: parameters and the per-ISA entry points.
//
// gala_ce_kernel.cpp is compiled once per CPU capability (DEFAULT, AVX2, AVX512), each copy in
// its own namespace gala::cpu::<CAPABILITY>; gala_ce_cpu.cpp picks one at run time.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace gala::cpu {

// Everything one call of the kernel reads and writes. Pointers are typed void* so that one
// struct serves every input dtype; `dtype` says what `logits` and `grad` hold.
struct GalaCeParams {
  // data ptrs
  const void* logits;        // (B, C), row stride `logits_row_stride`, unit column stride
  const int64_t* labels;     // (B,), each in [0, C) or == ignore_index (checked by the caller)
  const void* class_bias;    // (C,) lambda1 * log(pos_grad + eps) in the math dtype (float, or
                             // double for double logits), or nullptr (plain CE)
  const void* class_weight;  // (C,) per-class weights wt >= 0 in the math dtype, or nullptr (all ones)
  void* grad;                // (B, C) contiguous, dloss/dlogits for grad_output = 1
  double* loss_rows;         // (B,) per-row loss, 0 for ignored rows, NaN for non-finite rows
  float* raw_stats;          // (3, C) raw_pos, raw_neg, raw_clsneg (zeroed), or nullptr
  float* raw_pairwise;       // (C, C) raw_pair[j, k] (zeroed), or nullptr
  int64_t* nonfinite_rows;   // (1,) count of non-ignored rows holding a non-finite logit
  // shapes and strides
  int64_t batch;
  int64_t num_classes;
  int64_t logits_row_stride;
  // constants
  int64_t ignore_index;
  double row_weight;         // r for non-ignored rows: 1/W ("mean"; W = sum of wt[y_i] over them,
                             // N without weights; NaN when W = 0 < N) or 1 ("sum", "none")
  double label_smoothing;    // ls in [0, 1]
  c10::ScalarType dtype;
};

#define GALA_DECLARE_KERNEL(CAPABILITY) \
  namespace CAPABILITY {                \
  void gala_ce_forward_kernel(const GalaCeParams& params); \
  }

GALA_DECLARE_KERNEL(DEFAULT)
GALA_DECLARE_KERNEL(AVX2)
GALA_DECLARE_KERNEL(AVX512)

#undef GALA_DECLARE_KERNEL

}  // namespace gala::cpu
