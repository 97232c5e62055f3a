// Declarations of the gala_kernels ops; schemas live in torch_bindings.cpp, one implementation
// file per device (cpu/gala_ce_cpu.cpp, cuda/gala_ce_cuda_binding.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace gala {

// reduction codes shared with gala_kernels/ops.py
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

using FusedCeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks shared by every device implementation; a user error raises ValueError / RuntimeError
// naming the argument, before anything is written.
void check_fused_ce_args(const at::Tensor& logits, const at::Tensor& labels,
                         const std::optional<at::Tensor>& class_bias, int64_t reduction);

}  // namespace gala
