// The schemas of every gala_kernels op, defined once. Device implementations register
// themselves with TORCH_LIBRARY_IMPL in their own files.
#include <torch/library.h>

#include "cpu/reusable_buffer_cpu.h"
#include "ops.h"

TORCH_LIBRARY(gala, m) {
  // Fused GALA cross-entropy forward. Returns
  //   loss          logits dtype; (B,) for reduction=None(0), () for Mean(1) and Sum(2)
  //   grad          (B, C) logits dtype, dloss/dlogits for grad_output = 1
  //   raw_stats     (3, C) float32 raw sums [pos, neg, cls_neg] before the 1/N scale, or (0,)
  //   raw_pairwise  (C, C) float32 raw pairwise sums, or (0,)
  //   counts        (2,) int64 [N non-ignored rows, non-ignored rows with a non-finite logit]
  // class_bias is lambda1 * log(pos_grad + eps) in the math dtype, or None for plain CE.
  // weight (per class, (C,) in the math dtype, >= 0) and label_smoothing (in [0, 1]) have the
  // semantics of torch.nn.functional.cross_entropy; they change the loss and its gradient, never
  // the statistics. The mean divides by W = sum of weight[y_i] over the non-ignored rows.
  m.def(
      "fused_ce_fwd(Tensor logits, Tensor labels, Tensor? class_bias, Tensor? weight, int ignore_index, "
      "int reduction, float label_smoothing, bool compute_stats, bool track_pairwise) -> "
      "(Tensor loss, Tensor grad, Tensor raw_stats, Tensor raw_pairwise, Tensor counts)");
  // Mass pass of post-hoc re-balancing: colsum[j] = sum_i softmax(logits[i, :])[j], (C,) float32
  // (float64 for float64 logits). A row holding NaN or +inf, or -inf everywhere, adds NaN to
  // every column (as torch.softmax); a -inf entry has probability 0.
  m.def("softmax_colsum(Tensor logits) -> Tensor colsum");
  // The same, added into `out` ((C,) float32 or float64, e.g. the running float64 mass): no
  // (C,) temporary. CUDA benchmark knobs (other devices ignore them): `variant` names a kernel
  // variant (csrc/cuda/softmax_mass_kernel.cu, row_variants), ctas_per_sm > 0 sets the row
  // kernel's CTAs per SM; "" and 0 are the default rule.
  m.def("softmax_colsum_add_(Tensor logits, Tensor(a!) out, str variant=\"\", int ctas_per_sm=0) -> ()");
  // CUDA only: the kernel variant softmax_colsum_add_ runs for these logits ("" = default rule).
  m.def("softmax_colsum_cuda_variant(Tensor logits, str variant=\"\") -> str");
  // A step's raw statistics (the (3, C) raw_stats of fused_ce_fwd) folded into a GALAState's
  // float32 vectors: mode 0 "cumulative" (running += raw * scale; targets += running), 1 "sum"
  // (targets += raw * scale, running empty); steps += 1, nonfinite_rows += nonfinite.
  // CPU only (cpu/fold_stats_cpu.cpp); the same bits as reference.fold_increments.
  m.def("fold_stats_(Tensor raw, float scale, Tensor(a!)[] targets, Tensor(b!)[] running, int mode, "
        "Tensor(c!) steps, Tensor(d!) nonfinite_rows, int nonfinite) -> ()");
  // One eager CPU training step of a cumulative (mode 0) or sum (mode 1) GALAState without
  // pairwise tracking, in one call: class_bias = lambda1 * log(stats[0] + eps) (the same aten ops
  // as reference.class_bias), fused_ce_fwd with statistics, then fold_stats_ with
  // scale = 1 / max(N, 1). stats: [pos_grad, neg_grad, cls_neg_grad]; running: the cumulative
  // sums, or empty. Returns fused_ce_fwd's loss and grad. CPU only (cpu/gala_step_cpu.cpp).
  m.def("fused_ce_step_cpu_(Tensor logits, Tensor labels, Tensor? weight, Tensor(a!)[] stats, "
        "Tensor(b!)[] running, Tensor(c!) steps, Tensor(d!) nonfinite_rows, float lambda1, float eps, "
        "int ignore_index, int reduction, float label_smoothing, int mode) -> (Tensor loss, Tensor grad)");
  // One GPU training step, with no host synchronisation (gala_kernels/backends/step.py has the
  // whole contract; the Triton backend implements the same op as gala_triton::fused_ce_step_):
  //   class_bias = lambda1 * log(stats[0] + eps), computed in the kernel;
  //   loss, grad as fused_ce_fwd (with weight, label_smoothing);
  //   the raw statistics and the counts of the step added into `scratch` ((3C + 8) float32, the
  //   layout of gala_kernels/state.py: raw_pos, raw_neg, raw_cls, then [rows, nonfinite rows,
  //   bad-label rows, and per-launch slots]), the raw pairwise sums into `raw_pairwise` when given;
  //   labels outside [0, C) that are not ignore_index: loss NaN, zero gradient rows, no statistics,
  //   the first such row recorded in `label_error` (gala_kernels/label_errors.py);
  //   fold: the last CTA folds scratch into stats / running (accumulation 0 cumulative, 1 sum,
  //   2 ema) unless the step met a bad label, adds 1 to steps and the non-finite rows to
  //   nonfinite_rows, and zeroes scratch. Without fold the sums stay in scratch for fold_step_.
  //   row_offset: the batch row of labels[0] (the fused linear layer's chunks), for the record.
  m.def("fused_ce_step_(Tensor logits, Tensor labels, Tensor? weight, Tensor(a!)[] stats, "
        "Tensor(b!)[] running, Tensor(c!) steps, Tensor(d!) nonfinite_rows, Tensor(e!) scratch, "
        "Tensor(f!)? raw_pairwise, Tensor(g!) label_error, float lambda1, float eps, int ignore_index, "
        "int reduction, float label_smoothing, int accumulation, float ema_beta, bool fold, "
        "int row_offset) -> (Tensor loss, Tensor grad)");
  // The fold of a step whose sums fused_ce_step_ left in scratch (distributed: after scratch was
  // summed over ranks; pairwise tracking): skipped when scratch counts a bad-label row; zeroes
  // scratch and raw_pairwise.
  m.def("fold_step_(Tensor(a!) scratch, Tensor(b!)? raw_pairwise, Tensor(c!)[] stats, Tensor(d!)[] running, "
        "Tensor(e!)? pairwise, Tensor(f!)? running_pairwise, Tensor(g!) steps, Tensor(h!) nonfinite_rows, "
        "int accumulation, float ema_beta) -> ()");
  // Backward of a fused op: grad *= grad_output (a 0-dim tensor), in place, unless grad_output
  // is 1, which the kernel reads on the device (no host synchronisation).
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // The CPU blocks kept for reuse (the fused op's freed gradients; cpu/reusable_buffer_cpu.cpp):
  // release them all (returns their bytes), or count them.
  m.def("release_cpu_buffers() -> int", &gala::cpu::release_cached_buffers);
  m.def("cached_cpu_buffer_bytes() -> int", &gala::cpu::cached_buffer_bytes);
}

namespace gala {

void check_fused_ce_args(const at::Tensor& logits, const at::Tensor& labels,
                         const std::optional<at::Tensor>& class_bias, const std::optional<at::Tensor>& weight,
                         int64_t reduction, double label_smoothing) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D (B, C), got shape ", shape_str(logits.sizes()));
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits must have at least one class, got shape ",
                    shape_str(logits.sizes()));
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "logits must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0),
                    "labels must have shape (B,) = (", num_str(logits.size(0)), ",), got ",
                    shape_str(labels.sizes()));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels are on ", device_str(labels.device()),
                    " but logits are on ", device_str(logits.device()));
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction code must be 0, 1 or 2, got ",
                    num_str(reduction));
  if (class_bias.has_value()) {
    const auto& bias = *class_bias;
    const auto math_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == logits.size(1),
                      "class_bias must have shape (C,) = (", num_str(logits.size(1)), ",), got ",
                      shape_str(bias.sizes()));
    TORCH_CHECK_TYPE(bias.scalar_type() == math_dtype, "class_bias must be ", math_dtype, " for ", dtype,
                     " logits, got ", bias.scalar_type());
    TORCH_CHECK_VALUE(bias.device() == logits.device(), "class_bias is on ", device_str(bias.device()),
                      " but logits are on ", device_str(logits.device()));
  }
  if (weight.has_value()) {
    const auto& w = *weight;
    const auto math_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == logits.size(1), "weight must have shape (C,) = (",
                      num_str(logits.size(1)), ",), got ", shape_str(w.sizes()));
    TORCH_CHECK_TYPE(w.scalar_type() == math_dtype, "weight must be ", math_dtype, " for ", dtype,
                     " logits, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == logits.device(), "weight is on ", device_str(w.device()),
                      " but logits are on ", device_str(logits.device()));
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", std::to_string(label_smoothing));
}

void check_softmax_colsum_args(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "softmax_colsum: logits must be 2-D (B, C), got shape ",
                    shape_str(logits.sizes()));
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "softmax_colsum: logits must have at least one class, got shape ",
                    shape_str(logits.sizes()));
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "softmax_colsum: logits must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_colsum_out(const at::Tensor& logits, const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == logits.size(1) && out.is_contiguous(),
                    "softmax_colsum_add_: out must be a contiguous (C,) = (", num_str(logits.size(1)),
                    ",) tensor, got shape ", shape_str(out.sizes()));
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
                   "softmax_colsum_add_: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == logits.device(), "softmax_colsum_add_: out is on ", device_str(out.device()),
                    " but logits are on ", device_str(logits.device()));
}

}  // namespace gala

// gala_kernels._C is imported as a Python module only to load the library above (its static
// initialisers register the ops); it defines no Python functions itself.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gala_kernels native ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
