// CUDA implementations of the sync-free training step's ops (schemas in csrc/torch_bindings.cpp;
// the host glue that calls them is gala_kernels/backends/step.py):
//
//   fused_ce_step_  two launches of gala_ce_kernel.cu: the prepare kernel (label counts, the class
//                   bias lambda1 * log(pos_grad + eps) from the state as it is before the call)
//                   and the fused forward, whose last CTA writes the reduced loss, records a bad
//                   label, and with `fold` folds the step's scratch into the state;
//   fold_step_      one launch of gala_step_kernel.cu (the fold of sums left in the scratch);
//   scale_grad_     one launch of gala_step_kernel.cu (grad *= grad_output, a no-op read on the
//                   device when grad_output is 1).
//
// None of them synchronises with the host: no value is read back, labels are checked on the
// device (a bad one is recorded in label_error, gala_kernels/label_errors.py), every launch is on
// the current stream and every allocation goes through the caching allocator, so a step can be
// captured in a CUDA graph. The arguments are checked (shapes, dtypes, devices) before anything
// is launched.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "gala_ce_kernel.cuh"
#include "gala_step_kernel.cuh"
#include "torch_dtype.h"

namespace gala::cuda {
namespace {

// A float32 (or int64) state buffer of `numel` contiguous elements on `device`, named in errors.
void check_buffer(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, int64_t numel,
                  const std::string& op, const std::string& name) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", device_str(t.device()), " but logits are on ",
                    device_str(device));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel && t.is_contiguous(), op, ": ", name, " must be a contiguous tensor of ",
                    num_str(numel), " elements, got shape ", shape_str(t.sizes()));
}

// stats: [pos_grad, neg_grad, cls_neg_grad]; running: the same three for "cumulative", else none.
void check_state_vectors(at::TensorList stats, at::TensorList running, int64_t accumulation, int64_t C,
                         const at::Device& device, const std::string& op) {
  TORCH_CHECK_VALUE(accumulation >= 0 && accumulation <= 2, op, ": accumulation code must be 0, 1 or 2, got ",
                    num_str(accumulation));
  TORCH_CHECK_VALUE(stats.size() == 3, op, ": expected 3 state vectors, got ", num_str(stats.size()));
  const size_t expected_running = accumulation == static_cast<int64_t>(AccumulationCode::Cumulative) ? 3 : 0;
  TORCH_CHECK_VALUE(running.size() == expected_running, op, ": expected ", num_str(expected_running),
                    " running vectors for accumulation code ", num_str(accumulation), ", got ",
                    num_str(running.size()));
  for (size_t k = 0; k < stats.size(); ++k) {
    check_buffer(stats[k], device, at::kFloat, C, op, "stats[" + std::to_string(k) + "]");
  }
  for (size_t k = 0; k < running.size(); ++k) {
    check_buffer(running[k], device, at::kFloat, C, op, "running[" + std::to_string(k) + "]");
  }
}

void check_counters(const at::Tensor& steps, const at::Tensor& nonfinite_rows, const at::Device& device,
                    const std::string& op) {
  check_buffer(steps, device, at::kLong, 1, op, "steps");
  check_buffer(nonfinite_rows, device, at::kLong, 1, op, "nonfinite_rows");
}

void check_ema_beta(int64_t accumulation, double ema_beta, const std::string& op) {
  TORCH_CHECK_VALUE(accumulation != static_cast<int64_t>(AccumulationCode::Ema) || (ema_beta >= 0.0 && ema_beta < 1.0),
                    op, ": ema_beta must be in [0, 1), got ", std::to_string(ema_beta));
}

// The fold's constants of GalaStepParams / FoldStepCudaParams.
template <typename Params>
void set_fold_mode(Params& params, int64_t accumulation, double ema_beta) {
  params.accumulation = static_cast<AccumulationCode>(accumulation);
  params.ema_beta = static_cast<float>(ema_beta);
  params.ema_keep = static_cast<float>(1.0 - ema_beta);  // as reference.fold_increments' alpha
}

template <size_t N>
void set_vectors(float* (&out)[N], at::TensorList tensors) {
  for (size_t k = 0; k < N; ++k) out[k] = k < tensors.size() ? tensors[k].data_ptr<float>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> fused_ce_step_cuda(
    const at::Tensor& logits_in, const at::Tensor& labels_in, const std::optional<at::Tensor>& weight,
    at::TensorList stats, at::TensorList running, at::Tensor& steps, at::Tensor& nonfinite_rows, at::Tensor& scratch,
    const std::optional<at::Tensor>& raw_pairwise, at::Tensor& label_error, double lambda1, double eps,
    int64_t ignore_index, int64_t reduction, double label_smoothing, int64_t accumulation, double ema_beta, bool fold,
    int64_t row_offset) {
  const std::string op = "fused_ce_step_";
  check_fused_ce_args(logits_in, labels_in, std::nullopt, weight, reduction, label_smoothing);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), op, ": logits must be a CUDA tensor, got one on ",
                    device_str(logits_in.device()));
  const at::Device device = logits_in.device();
  const int64_t B = logits_in.size(0), C = logits_in.size(1);
  check_state_vectors(stats, running, accumulation, C, device, op);
  check_counters(steps, nonfinite_rows, device, op);
  check_ema_beta(accumulation, ema_beta, op);
  check_buffer(scratch, device, at::kFloat, 3 * C + kScratchSlots, op, "scratch");
  check_buffer(label_error, device, at::kLong, kErrorSlots, op, "label_error");
  if (raw_pairwise.has_value()) {
    check_buffer(*raw_pairwise, device, at::kFloat, C * C, op, "raw_pairwise");
    TORCH_CHECK_VALUE(!fold, op, ": fold must be false when raw_pairwise is given (fold_step_ folds it)");
  }
  TORCH_CHECK_VALUE(row_offset >= 0, op, ": row_offset must be >= 0, got ", num_str(row_offset));

  const c10::cuda::CUDAGuard device_guard(device);
  // Rows may be strided; columns must be unit-stride for the 16-byte vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor class_weight = weight.has_value() ? weight->contiguous() : at::Tensor();
  const DType dtype = kernel_dtype(logits.scalar_type());

  at::Tensor grad = at::empty({B, C}, logits.options());
  std::vector<int64_t> loss_shape;  // () for "mean" and "sum"
  if (static_cast<Reduction>(reduction) == Reduction::None) loss_shape.push_back(B);
  at::Tensor loss = at::empty(loss_shape, logits.options());
  // Written whole by the prepare kernel before the forward kernel reads it (no memset).
  at::Tensor workspace = at::empty({workspace_slots(C, dtype, /*training_step=*/true)}, logits.options().dtype(at::kLong));

  GalaCeCudaParams params{};
  params.logits = logits.data_ptr();
  params.labels = labels.data_ptr<int64_t>();
  params.class_bias = workspace.data_ptr<int64_t>() + kBiasSlot;
  params.weight = class_weight.defined() ? class_weight.data_ptr() : nullptr;
  params.grad = grad.data_ptr();
  params.loss = loss.data_ptr();
  params.raw_stats = scratch.data_ptr<float>();
  params.raw_pairwise = raw_pairwise.has_value() ? raw_pairwise->data_ptr<float>() : nullptr;
  params.counts = nullptr;
  params.workspace = workspace.data_ptr<int64_t>();
  params.batch = B;
  params.num_classes = C;
  params.logits_row_stride = logits.stride(0);
  params.ignore_index = ignore_index;
  params.reduction = static_cast<ReductionCode>(reduction);
  params.dtype = dtype;
  params.label_smoothing = label_smoothing;

  GalaStepParams& step = params.step;
  step.active = true;
  step.pos_grad = stats[0].data_ptr<float>();
  step.lambda1 = lambda1;
  step.eps = eps;
  set_vectors(step.stats, stats);
  set_vectors(step.running, running);
  step.steps = steps.data_ptr<int64_t>();
  step.nonfinite_rows = nonfinite_rows.data_ptr<int64_t>();
  step.scratch = scratch.data_ptr<float>();
  step.label_error = label_error.data_ptr<int64_t>();
  set_fold_mode(step, accumulation, ema_beta);
  step.fold = fold;
  step.row_offset = row_offset;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_gala_ce_prepare(params, stream));
  C10_CUDA_CHECK(launch_gala_ce_forward(params, stream));
  return {loss, grad};
}

void fold_step_cuda(at::Tensor& scratch, const std::optional<at::Tensor>& raw_pairwise, at::TensorList stats,
                    at::TensorList running, const std::optional<at::Tensor>& pairwise,
                    const std::optional<at::Tensor>& running_pairwise, at::Tensor& steps, at::Tensor& nonfinite_rows,
                    int64_t accumulation, double ema_beta) {
  const std::string op = "fold_step_";
  TORCH_CHECK_VALUE(scratch.is_cuda() && scratch.dim() == 1, op, ": scratch must be a 1-D CUDA tensor, got shape ",
                    shape_str(scratch.sizes()), " on ", device_str(scratch.device()));
  TORCH_CHECK_VALUE(stats.size() == 3 && stats[0].dim() == 1, op, ": expected 3 state vectors (C,)");
  const at::Device device = scratch.device();
  const int64_t C = stats[0].size(0);
  check_state_vectors(stats, running, accumulation, C, device, op);
  check_counters(steps, nonfinite_rows, device, op);
  check_ema_beta(accumulation, ema_beta, op);
  check_buffer(scratch, device, at::kFloat, 3 * C + kScratchSlots, op, "scratch");
  const bool cumulative = accumulation == static_cast<int64_t>(AccumulationCode::Cumulative);
  if (raw_pairwise.has_value()) check_buffer(*raw_pairwise, device, at::kFloat, C * C, op, "raw_pairwise");
  if (pairwise.has_value()) {
    check_buffer(*pairwise, device, at::kFloat, C * C, op, "pairwise");
    TORCH_CHECK_VALUE(running_pairwise.has_value() == cumulative, op, ": running_pairwise must be given exactly ",
                      "for cumulative accumulation");
  }
  if (running_pairwise.has_value()) {
    check_buffer(*running_pairwise, device, at::kFloat, C * C, op, "running_pairwise");
  }

  const c10::cuda::CUDAGuard device_guard(device);
  FoldStepCudaParams params{};
  params.scratch = scratch.data_ptr<float>();
  params.raw_pairwise = raw_pairwise.has_value() ? raw_pairwise->data_ptr<float>() : nullptr;
  set_vectors(params.stats, stats);
  set_vectors(params.running, running);
  params.pairwise = pairwise.has_value() ? pairwise->data_ptr<float>() : nullptr;
  params.running_pairwise = cumulative && running_pairwise.has_value() ? running_pairwise->data_ptr<float>() : nullptr;
  params.steps = steps.data_ptr<int64_t>();
  params.nonfinite_rows = nonfinite_rows.data_ptr<int64_t>();
  params.num_classes = C;
  set_fold_mode(params, accumulation, ema_beta);
  C10_CUDA_CHECK(launch_fold_step(params, c10::cuda::getCurrentCUDAStream()));
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  const std::string op = "scale_grad_";
  TORCH_CHECK_VALUE(grad.is_cuda() && grad.is_contiguous(), op, ": grad must be a contiguous CUDA tensor");
  TORCH_CHECK_VALUE(grad_output.device() == grad.device() && grad_output.numel() == 1 && grad_output.dim() == 0, op,
                    ": grad_output must be a 0-dim tensor on ", device_str(grad.device()), ", got shape ",
                    shape_str(grad_output.sizes()), " on ", device_str(grad_output.device()));
  const auto is_float = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
  };
  TORCH_CHECK_TYPE(is_float(grad.scalar_type()), op, ": grad must be float32, float64, bfloat16 or float16, got ",
                   grad.scalar_type());
  TORCH_CHECK_TYPE(is_float(grad_output.scalar_type()), op,
                   ": grad_output must be float32, float64, bfloat16 or float16, got ", grad_output.scalar_type());
  const c10::cuda::CUDAGuard device_guard(grad.device());
  ScaleGradCudaParams params{};
  params.grad = grad.data_ptr();
  params.grad_output = grad_output.data_ptr();
  params.numel = grad.numel();
  params.grad_dtype = kernel_dtype(grad.scalar_type());
  params.grad_output_dtype = kernel_dtype(grad_output.scalar_type());
  C10_CUDA_CHECK(launch_scale_grad(params, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace gala::cuda

TORCH_LIBRARY_IMPL(gala, CUDA, m) {
  m.impl("fused_ce_step_", &gala::cuda::fused_ce_step_cuda);
  m.impl("fold_step_", &gala::cuda::fold_step_cuda);
  m.impl("scale_grad_", &gala::cuda::scale_grad_cuda);
}
