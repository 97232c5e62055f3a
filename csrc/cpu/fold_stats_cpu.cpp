// CPU implementation of gala::fold_stats_: a training step's raw statistics folded into a
// GALAState in one pass (docs/contract.md, "Folding the increments into the state"), for eager CPU steps.
//
//   d = raw * s                      (s = 1/N, float32 like the state)
//   "cumulative" (mode 0):  R += d;  state += R
//   "sum"        (mode 1):  state += d
//   steps += 1;  nonfinite_rows += nonfinite
//
// The same float32 operations, in the same order, as the Python fold (reference.fold_increments:
// raw * s, then torch._foreach_add_), so both give the same bits; this file is compiled with
// -ffp-contract=off so that no multiply-add is fused. Why: the Python fold is ~10 tensor ops;
// measured on the 2-core EPYC VM, a 2-row step (all host time) took 175 us against
// 200 us with it, and in a 512 x 8,142 fp32 step the fold took 0.09-0.12 ms against 0.12 ms
// (the state vectors come back from memory after the fused op streamed B x C through the caches).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"

namespace gala::cpu {
namespace {

void check_vector(const at::Tensor& t, int64_t C, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == C &&
                        t.is_contiguous(),
                    "fold_stats_: ", what, " must be contiguous float32 (C,) = (", num_str(C), ",) CPU tensors, got ",
                    shape_str(t.sizes()));
}

}  // namespace

void fold_stats_cpu(const at::Tensor& raw, double scale, at::TensorList targets, at::TensorList running,
                    int64_t mode, at::Tensor& steps, at::Tensor& nonfinite_rows, int64_t nonfinite) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "fold_stats_: mode must be 0 (cumulative) or 1 (sum), got ",
                    num_str(mode));
  TORCH_CHECK_VALUE(raw.device().is_cpu() && raw.scalar_type() == at::kFloat && raw.dim() == 2 && raw.size(0) == 3 &&
                        raw.is_contiguous(),
                    "fold_stats_: raw must be a contiguous float32 (3, C) CPU tensor, got ", shape_str(raw.sizes()));
  const int64_t C = raw.size(1);
  TORCH_CHECK_VALUE(targets.size() == 3, "fold_stats_: expected 3 target vectors, got ", num_str(targets.size()));
  TORCH_CHECK_VALUE(running.size() == (mode == 0 ? 3u : 0u), "fold_stats_: expected ", num_str(mode == 0 ? 3 : 0),
                    " running vectors, got ", num_str(running.size()));
  for (const auto& t : targets) check_vector(t, C, "targets");
  for (const auto& t : running) check_vector(t, C, "running");
  for (const at::Tensor* counter : {&steps, &nonfinite_rows}) {
    TORCH_CHECK_VALUE(counter->device().is_cpu() && counter->scalar_type() == at::kLong && counter->numel() == 1,
                      "fold_stats_: steps and nonfinite_rows must be int64 CPU scalars");
  }
  const float s = static_cast<float>(scale);  // as torch does for a float32 tensor times a Python float
  // Serial: splitting the columns over the threads was not faster (0.09-0.12 ms either way).
  for (int64_t k = 0; k < 3; ++k) {
    const float* d = raw.data_ptr<float>() + k * C;
    float* target = targets[k].data_ptr<float>();
    if (mode == 0) {
      float* sums = running[k].data_ptr<float>();
      for (int64_t j = 0; j < C; ++j) {
        const float increment = d[j] * s;
        sums[j] = sums[j] + increment;
        target[j] = target[j] + sums[j];
      }
    } else {
      for (int64_t j = 0; j < C; ++j) target[j] = target[j] + d[j] * s;
    }
  }
  steps.data_ptr<int64_t>()[0] += 1;
  nonfinite_rows.data_ptr<int64_t>()[0] += nonfinite;
}

}  // namespace gala::cpu

TORCH_LIBRARY_IMPL(gala, CPU, m) {
  m.impl("fold_stats_", &gala::cpu::fold_stats_cpu);
}
