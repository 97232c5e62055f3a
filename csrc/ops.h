// Declarations of the gala_kernels ops; schemas live in torch_bindings.cpp, one implementation
// file per device (cpu/gala_ce_cpu.cpp, cuda/gala_ce_cuda_binding.cpp).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace gala {

// reduction codes shared with gala_kernels/ops.py
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

using FusedCeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Pieces of error messages as strings. Every number, shape and device in a message of this
// extension goes through these (std::to_string; Device::str() lives in libc10), never through
// an std::ostream: with the torch 2.11 wheel of the GPU machines (the extension built there with
// their own compiler) each TORCH_CHECK of this extension whose message streamed an integer killed
// the process with SIGSEGV, while messages of strings and dtype names raised.
inline std::string num_str(int64_t value) { return std::to_string(value); }

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

inline std::string device_str(const at::Device& device) { return device.str(); }

// Checks shared by every device implementation; a user error raises ValueError / RuntimeError
// naming the argument, before anything is written.
void check_fused_ce_args(const at::Tensor& logits, const at::Tensor& labels,
                         const std::optional<at::Tensor>& class_bias, const std::optional<at::Tensor>& weight,
                         int64_t reduction, double label_smoothing);

// The mass pass (softmax_colsum, softmax_colsum_add_): 2-D logits with C >= 1 of a float dtype;
// `out` a contiguous (C,) float32 / float64 tensor on the logits' device.
void check_softmax_colsum_args(const at::Tensor& logits);
void check_colsum_out(const at::Tensor& logits, const at::Tensor& out);

namespace cpu {
// The CPU implementations of fused_ce_fwd (cpu/gala_ce_cpu.cpp) and fold_stats_
// (cpu/fold_stats_cpu.cpp), which fused_ce_step_cpu_ (cpu/gala_step_cpu.cpp) calls in turn.
FusedCeOutputs fused_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                const std::optional<at::Tensor>& class_bias,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                int64_t reduction, double label_smoothing, bool compute_stats,
                                bool track_pairwise);
void fold_stats_cpu(const at::Tensor& raw, double scale, at::TensorList targets, at::TensorList running,
                    int64_t mode, at::Tensor& steps, at::Tensor& nonfinite_rows, int64_t nonfinite);
}  // namespace cpu

}  // namespace gala
