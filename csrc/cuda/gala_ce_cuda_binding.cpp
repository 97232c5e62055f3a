// CUDA implementation of gala::fused_ce_fwd (schema in csrc/torch_bindings.cpp): argument checks,
// allocation, and the two launches of gala_ce_kernel.cu on the current CUDA stream. Compiled only
// when torch was built with CUDA (CMakeLists.txt); the kernels themselves include no torch header.
// weight and label_smoothing are computed in the same pass (gala_ce_kernel.cu); the training step
// with no host synchronisation is gala_step_cuda_binding.cpp.
//
// Label range check. A label that is neither ignore_index nor in [0, C) raises ValueError naming
// the first bad row and value, like the CPU op. The prepare kernel finds it on the device; reading
// it back costs one device -> host synchronisation per call (it waits for the work already queued
// on the stream, as `bool(bad.any())` would). The forward kernel is launched only after the
// check, so a bad call writes nothing. The synchronisation is skipped, and the kernels alone keep
// memory safe (a bad row gets a NaN loss and gradient and no statistics; its label is never used
// as an index), when
//   - the current stream is capturing a CUDA graph (a synchronisation is illegal there), or
//   - the environment variable GALA_CUDA_CHECK_LABELS=0 is set (read once, at the first call),
//     for evaluation loops that validate their labels elsewhere and want no host round trip.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../ops.h"
#include "gala_ce_kernel.cuh"
#include "torch_dtype.h"

namespace gala::cuda {
namespace {

bool label_check_wanted(cudaStream_t stream) {
  static const bool enabled = [] {
    const char* value = std::getenv("GALA_CUDA_CHECK_LABELS");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  if (!enabled) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone;
}

// Raises ValueError naming the first bad label found by the prepare kernel's blocks (one host
// sync: the partial counts are copied back).
void raise_on_bad_label(const at::Tensor& workspace, int64_t B, int64_t C, int64_t ignore_index) {
  const int64_t partials = gala_ce_label_partials(B);
  const at::Tensor found = workspace.slice(0, kPartials, kPartials + partials * kPartialSlots).to(at::kCPU);
  const int64_t* slots = found.data_ptr<int64_t>();
  int64_t row = -1, label = 0;
  for (int64_t b = 0; b < partials; ++b) {
    const int64_t* partial = slots + b * kPartialSlots;
    if (partial[kPartialBadRows] > 0 && (row < 0 || partial[kPartialFirstBadRow] < row)) {
      row = partial[kPartialFirstBadRow];
      label = partial[kPartialFirstBadLabel];
    }
  }
  TORCH_CHECK_VALUE(row < 0, "labels[", num_str(row), "] = ", num_str(label),
                    " is out of range: labels must be in [0, ", num_str(C), ") or equal ignore_index=",
                    num_str(ignore_index));
}

FusedCeOutputs fused_ce_fwd_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                 const std::optional<at::Tensor>& class_bias,
                                 const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                 int64_t reduction, double label_smoothing, bool compute_stats,
                                 bool track_pairwise) {
  check_fused_ce_args(logits_in, labels_in, class_bias, weight, reduction, label_smoothing);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "logits must be a CUDA tensor, got one on ",
                    device_str(logits_in.device()));
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  // Rows may be strided; columns must be unit-stride for the 16-byte vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor bias = class_bias.has_value() ? class_bias->contiguous() : at::Tensor();
  const at::Tensor class_weight = weight.has_value() ? weight->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), C = logits.size(1);
  const bool pairwise = compute_stats && track_pairwise;

  const auto f32 = logits.options().dtype(at::kFloat);
  const auto i64 = logits.options().dtype(at::kLong);
  const auto mode = static_cast<Reduction>(reduction);
  // The prepare kernel zeroes raw_stats / raw_pairwise and writes counts and the workspace.
  const DType dtype = kernel_dtype(logits.scalar_type());
  at::Tensor grad = at::empty({B, C}, logits.options());
  std::vector<int64_t> loss_shape;  // () for "mean" and "sum"
  if (mode == Reduction::None) loss_shape.push_back(B);
  at::Tensor loss = at::empty(loss_shape, logits.options());
  at::Tensor raw_stats = compute_stats ? at::empty({3, C}, f32) : at::empty({0}, f32);
  at::Tensor raw_pairwise = pairwise ? at::empty({C, C}, f32) : at::empty({0}, f32);
  at::Tensor counts = at::empty({2}, i64);
  at::Tensor workspace = at::empty({workspace_slots(C, dtype, /*training_step=*/false)}, i64);

  GalaCeCudaParams params{};
  params.logits = logits.data_ptr();
  params.labels = labels.data_ptr<int64_t>();
  params.class_bias = bias.defined() ? bias.data_ptr() : nullptr;
  params.weight = class_weight.defined() ? class_weight.data_ptr() : nullptr;
  params.grad = grad.data_ptr();
  params.loss = loss.data_ptr();
  params.raw_stats = compute_stats ? raw_stats.data_ptr<float>() : nullptr;
  params.raw_pairwise = pairwise ? raw_pairwise.data_ptr<float>() : nullptr;
  params.counts = counts.data_ptr<int64_t>();
  params.workspace = workspace.data_ptr<int64_t>();
  params.batch = B;
  params.num_classes = C;
  params.logits_row_stride = logits.stride(0);
  params.ignore_index = ignore_index;
  params.reduction = static_cast<ReductionCode>(reduction);
  params.dtype = dtype;
  params.label_smoothing = label_smoothing;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_gala_ce_prepare(params, stream));
  if (B > 0 && label_check_wanted(stream)) raise_on_bad_label(workspace, B, C, ignore_index);
  if (B > 0) {
    C10_CUDA_CHECK(launch_gala_ce_forward(params, stream));
  } else if (mode != Reduction::None) {
    // no row: "mean" is 0/0 = NaN (as F.cross_entropy), "sum" is 0
    loss.fill_(mode == Reduction::Mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
  }
  return {loss, grad, raw_stats, raw_pairwise, counts};
}

}  // namespace
}  // namespace gala::cuda

TORCH_LIBRARY_IMPL(gala, CUDA, m) {
  m.impl("fused_ce_fwd", &gala::cuda::fused_ce_fwd_cuda);
}
