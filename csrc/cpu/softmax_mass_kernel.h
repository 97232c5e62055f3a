// The mass pass of post-hoc re-balancing, CPU: parameters and the per-ISA entry points.
//
//   colsum[j] = sum_i softmax(z[i, :])[j]      (docs/rebalancing.md)
//
// softmax_mass_kernel.cpp is compiled once per CPU capability (DEFAULT, AVX2, AVX512), each
// copy in its own namespace gala::cpu::<CAPABILITY>; softmax_mass_cpu.cpp picks one at run time.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace gala::cpu {

// Everything one call of the kernel reads and writes.
struct SoftmaxColsumParams {
  // data ptrs
  const void* logits;  // (B, C), row stride `logits_row_stride`, unit column stride; `dtype`
  void* colsum;        // (C,) output, float (double for double logits); fully overwritten
  // shapes and strides
  int64_t batch;
  int64_t num_classes;
  int64_t logits_row_stride;
  // constants
  c10::ScalarType dtype;
};

#define GALA_DECLARE_KERNEL(CAPABILITY) \
  namespace CAPABILITY {                \
  void softmax_colsum_kernel(const SoftmaxColsumParams& params); \
  }

GALA_DECLARE_KERNEL(DEFAULT)
GALA_DECLARE_KERNEL(AVX2)
GALA_DECLARE_KERNEL(AVX512)

#undef GALA_DECLARE_KERNEL

}  // namespace gala::cpu
