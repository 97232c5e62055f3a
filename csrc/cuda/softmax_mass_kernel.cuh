// The mass pass of post-hoc re-balancing, CUDA: parameters and the host launcher.
//
// Plain CUDA C++ without torch headers (compiled by nvcc alone in the GALA_CUDA_COMPILE_CHECK
// build). The torch binding (softmax_mass_cuda_binding.cpp) checks the tensors, allocates the
// workspace of softmax_colsum_workspace_bytes() and calls launch_softmax_colsum.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_types.h"

namespace gala::cuda {

// Everything one call reads and writes. Pointers are raw device pointers; offsets are int64.
struct SoftmaxColsumCudaParams {
  // data ptrs
  const void* logits;    // (B, C) in `dtype`, row stride `logits_row_stride`, unit column stride
  void* out;             // (C,) contiguous, float32 or float64 (`out_is_double`)
  void* workspace;       // softmax_colsum_workspace_bytes(*this) bytes, 16-byte aligned
  // shapes and strides
  int64_t batch;         // B (0 is allowed: nothing is read; `out` is zeroed unless `accumulate`)
  int64_t num_classes;   // C >= 1
  int64_t logits_row_stride;
  // constants
  DType dtype;
  bool out_is_double;
  bool accumulate;       // out[j] += colsum[j] (true) or out[j] = colsum[j] (false)
  // benchmark knobs of the row kernel (nullptr / 0: the default rule)
  const char* variant;   // a row-kernel variant by name (softmax_mass_kernel.cu, row_variants)
  int ctas_per_sm;       // CTAs per SM
};

// Bytes of scratch one call needs: the per-CTA partial column sums (and, for rows too long for
// registers, one logsumexp per row). Depends on the device's SM count.
cudaError_t softmax_colsum_workspace_bytes(const SoftmaxColsumCudaParams& params, size_t* bytes);

// out (+)= colsum, two or three launches on `stream`, no host synchronisation, deterministic:
// the same inputs give bitwise the same `out` on the same device.
cudaError_t launch_softmax_colsum(const SoftmaxColsumCudaParams& params, cudaStream_t stream);

// Name of the kernel path launch_softmax_colsum takes for `params` (benchmarks and tests): a
// row-kernel variant, or "lse_then_tiles" for rows longer than any variant holds (or when the
// named variant does not hold them).
const char* softmax_colsum_variant(const SoftmaxColsumCudaParams& params);

}  // namespace gala::cuda
