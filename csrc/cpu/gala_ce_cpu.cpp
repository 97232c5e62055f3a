// CPU implementation of gala::fused_ce_fwd: argument checks, allocation, and the dispatch to
// the kernel compiled for this machine's widest vector ISA.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../ops.h"
#include "gala_ce_kernel.h"
#include "reusable_buffer_cpu.h"

namespace gala::cpu {
namespace {

using KernelFn = void (*)(const GalaCeParams&);

// at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, like PyTorch's own kernels.
KernelFn select_kernel() {
  static const KernelFn kernel = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef GALA_HAVE_AVX512
    if (capability == "AVX512") return &AVX512::gala_ce_forward_kernel;
#endif
#ifdef GALA_HAVE_AVX2
    if (capability == "AVX512" || capability == "AVX2") return &AVX2::gala_ce_forward_kernel;
#endif
    return &DEFAULT::gala_ce_forward_kernel;
  }();
  return kernel;
}

// Labels must be in [0, C) or equal ignore_index; the message names the first bad value.
// Returns N, the number of non-ignored rows.
int64_t check_labels(const at::Tensor& labels, int64_t C, int64_t ignore_index) {
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < labels.numel(); ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < C, "labels[", num_str(i), "] = ", num_str(y[i]),
                      " is out of range: labels must be in [0, ", num_str(C), ") or equal ignore_index=",
                      num_str(ignore_index));
    ++n_valid;
  }
  return n_valid;
}

// Class weights must be non-negative (as the Python entry points check); the message names the
// first negative entry. One branch-free (vectorised) sweep over C; the entry is looked for only
// when there is one.
template <typename weight_t>
void check_weight_values(const at::Tensor& weight) {
  const weight_t* wt = weight.data_ptr<weight_t>();
  const int64_t C = weight.numel();
  bool any_negative = false;
  for (int64_t j = 0; j < C; ++j) any_negative |= wt[j] < 0;
  if (!any_negative) return;
  const int64_t j = std::find_if(wt, wt + C, [](weight_t w) { return w < 0; }) - wt;
  TORCH_CHECK_VALUE(false, "weight must be non-negative, got weight[", num_str(j), "] = ",
                    std::to_string(static_cast<double>(wt[j])));
}

// W = sum of wt[y_i] over the non-ignored rows (labels already checked): the divisor of the mean.
template <typename weight_t>
double label_weight_total(const at::Tensor& labels, const at::Tensor& weight, int64_t ignore_index) {
  const int64_t* y = labels.data_ptr<int64_t>();
  const weight_t* wt = weight.data_ptr<weight_t>();
  double total = 0;
  for (int64_t i = 0; i < labels.numel(); ++i) {
    if (y[i] != ignore_index) total += static_cast<double>(wt[y[i]]);
  }
  return total;
}

// Where the gradient starts within a 4 KB page. The kernel's main loop loads row i + 1 of the
// logits while it stores row i of the gradient. A load whose address agrees in its low 12 bits
// with a store still in flight waits for that store ("4K aliasing"), and with the logits and the
// gradient both at the same offset in their pages (both fresh large allocations), the next
// logits row (C * itemsize = 32,568 bytes further for C = 8,142 fp32) trails the gradient row by
// 200 bytes modulo 4 KB: every load hits that. Measured, the kernel alone on one thread of the
// 2-core EPYC VM, ns per 16 columns of a 8,142-class fp32 row, hot / cold, by
// (logits row i + 1 - gradient row i) mod 4096: 3,896 (the default placement) 8.4 / 10.7; 3,992
// 12.7 / 13.7; 56 7.0 / 9.2; every tried value from 312 to 3,640: 6.2-7.3 / 8.6-9.1. So the
// gradient is placed 2 KB before the next logits row, modulo 4 KB (for logits whose row stride is
// not C the distance drifts from row to row; row 0 is placed).
int64_t gradient_page_offset(const at::Tensor& logits) {
  const int64_t itemsize = static_cast<int64_t>(logits.element_size());
  const auto next_row = reinterpret_cast<uintptr_t>(logits.data_ptr()) +
                        static_cast<uintptr_t>(logits.stride(0) * itemsize);
  return static_cast<int64_t>((next_row + 4096 - 2048) % 4096) / itemsize * itemsize;
}

}  // namespace

FusedCeOutputs fused_ce_fwd_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                const std::optional<at::Tensor>& class_bias,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                int64_t reduction, double label_smoothing, bool compute_stats,
                                bool track_pairwise) {
  check_fused_ce_args(logits_in, labels_in, class_bias, weight, reduction, label_smoothing);
  // Rows may be strided; columns must be unit-stride for the vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor bias = class_bias.has_value() ? class_bias->contiguous() : at::Tensor();
  const at::Tensor class_weight = weight.has_value() ? weight->contiguous() : at::Tensor();
  const bool double_math = logits.scalar_type() == at::kDouble;
  if (class_weight.defined()) {
    double_math ? check_weight_values<double>(class_weight) : check_weight_values<float>(class_weight);
  }
  const int64_t B = logits.size(0), C = logits.size(1);
  const int64_t n_valid = check_labels(labels, C, ignore_index);
  // W, the divisor of the mean: N without weights
  const double total_weight = !class_weight.defined() ? static_cast<double>(n_valid)
                              : double_math ? label_weight_total<double>(labels, class_weight, ignore_index)
                                            : label_weight_total<float>(labels, class_weight, ignore_index);

  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor grad = empty_reusable_at_page_offset({B, C}, logits.options(), gradient_page_offset(logits));
  at::Tensor loss_rows = at::empty({B}, logits.options().dtype(at::kDouble));
  at::Tensor raw_stats = compute_stats ? at::zeros({3, C}, f32) : at::empty({0}, f32);
  at::Tensor raw_pairwise = compute_stats && track_pairwise ? at::zeros({C, C}, f32) : at::empty({0}, f32);
  int64_t nonfinite = 0;

  const auto mode = static_cast<Reduction>(reduction);
  GalaCeParams params{};
  params.logits = logits.data_ptr();
  params.labels = labels.data_ptr<int64_t>();
  params.class_bias = bias.defined() ? bias.data_ptr() : nullptr;
  params.class_weight = class_weight.defined() ? class_weight.data_ptr() : nullptr;
  params.grad = grad.data_ptr();
  params.loss_rows = loss_rows.data_ptr<double>();
  params.raw_stats = compute_stats ? raw_stats.data_ptr<float>() : nullptr;
  params.raw_pairwise = compute_stats && track_pairwise ? raw_pairwise.data_ptr<float>() : nullptr;
  params.nonfinite_rows = &nonfinite;
  params.batch = B;
  params.num_classes = C;
  params.logits_row_stride = logits.stride(0);
  params.ignore_index = ignore_index;
  // r = 1/W for "mean", 1 otherwise. W = 0: NaN gradients for the non-ignored rows, as torch
  // (with no such row the value is unused).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  params.row_weight = mode != Reduction::Mean ? 1.0 : total_weight > 0 ? 1.0 / total_weight : n_valid > 0 ? nan : 1.0;
  params.label_smoothing = label_smoothing;
  params.dtype = logits.scalar_type();
  if (B > 0) select_kernel()(params);

  at::Tensor loss;
  if (mode == Reduction::None) {
    loss = loss_rows.to(logits.scalar_type());
  } else {
    double total = 0.0;  // a plain loop: at::sum + item cost ~12 us per call, a short step's host time
    const double* rows = loss_rows.data_ptr<double>();
    for (int64_t i = 0; i < B; ++i) total += rows[i];
    // the mean of torch: sum_i loss_i / W, NaN when W = 0 (also with smoothing, where the
    // numerator need not be 0: torch's unsmoothed part is 0 / 0 then)
    const double value = mode == Reduction::Sum ? total : total_weight > 0 ? total / total_weight : nan;
    loss = at::scalar_tensor(value, logits.options());
  }
  at::Tensor counts = at::empty({2}, logits.options().dtype(at::kLong));
  counts.data_ptr<int64_t>()[0] = n_valid;
  counts.data_ptr<int64_t>()[1] = nonfinite;
  return {loss, grad, raw_stats, raw_pairwise, counts};
}

}  // namespace gala::cpu

TORCH_LIBRARY_IMPL(gala, CPU, m) {
  m.impl("fused_ce_fwd", &gala::cpu::fused_ce_fwd_cpu);
}
