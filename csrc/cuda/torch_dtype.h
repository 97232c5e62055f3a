// at::ScalarType -> the kernels' DType, for the CUDA torch bindings (host compiler).
#pragma once

#include <ATen/ATen.h>

#include "cuda_types.h"

namespace gala::cuda {

inline DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_INTERNAL_ASSERT(false, "gala CUDA ops: unexpected dtype ", dtype);
  }
}

}  // namespace gala::cuda
