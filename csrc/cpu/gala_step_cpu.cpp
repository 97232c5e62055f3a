// CPU implementation of gala::fused_ce_step_cpu_: one eager CPU training step of GALA, in one
// call from Python instead of three (class bias, fused_ce_fwd, fold_stats_), for a cumulative or
// sum GALAState without pairwise tracking (gala_kernels.loss.fused_gala_ce takes it when it can).
//
//   class_bias = lambda1 * log(pos_grad + eps)        the aten ops of reference.class_bias
//   loss, grad, raw, _, counts = fused_ce_fwd(logits, labels, class_bias, weight, ignore_index,
//                                             reduction, label_smoothing, compute_stats=True)
//   fold_stats_(raw, 1 / max(N, 1), [pos, neg, cls_neg], running, mode, steps, nonfinite_rows,
//               counts[1])
//
// The same operations as the three calls, so the same bits (tests/test_fused_ce.py checks it).
// Why: each call from Python costs far more right after a memory-heavy neighbour (the training
// step's own logits, the model's work) than in a tight loop, its interpreter and dispatcher state
// evicted from the caches; see the measurement in fused_gala_ce.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"

namespace gala::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> fused_ce_step_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                     const std::optional<at::Tensor>& weight,
                                                     at::TensorList stats, at::TensorList running,
                                                     at::Tensor& steps, at::Tensor& nonfinite_rows, double lambda1,
                                                     double eps, int64_t ignore_index, int64_t reduction,
                                                     double label_smoothing, int64_t mode) {
  TORCH_CHECK_VALUE(stats.size() == 3, "fused_ce_step_cpu_: expected 3 state vectors, got ", num_str(stats.size()));
  TORCH_CHECK_VALUE(stats[0].device().is_cpu() && stats[0].dim() == 1 && stats[0].size(0) == logits.size(-1),
                    "fused_ce_step_cpu_: the state's pos_grad must be a (C,) CPU tensor, got ",
                    shape_str(stats[0].sizes()));
  const auto math_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor class_bias = stats[0].to(math_dtype).add(eps).log_().mul_(lambda1);
  auto [loss, grad, raw, raw_pairwise, counts] =
      fused_ce_fwd_cpu(logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing,
                       /*compute_stats=*/true, /*track_pairwise=*/false);
  const int64_t* n = counts.data_ptr<int64_t>();  // [N, non-finite rows]
  fold_stats_cpu(raw, 1.0 / static_cast<double>(std::max<int64_t>(n[0], 1)), stats, running, mode, steps,
                 nonfinite_rows, n[1]);
  return {loss, grad};
}

}  // namespace
}  // namespace gala::cpu

TORCH_LIBRARY_IMPL(gala, CPU, m) {
  m.impl("fused_ce_step_cpu_", &gala::cpu::fused_ce_step_cpu);
}
