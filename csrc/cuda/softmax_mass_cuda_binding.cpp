// CUDA implementation of gala::softmax_colsum and gala::softmax_colsum_add_ (schemas in
// csrc/torch_bindings.cpp): argument checks, the workspace, and the launches of
// softmax_mass_kernel.cu on the current CUDA stream. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../ops.h"
#include "softmax_mass_kernel.cuh"
#include "torch_dtype.h"

namespace gala::cuda {
namespace {

SoftmaxColsumCudaParams describe(const at::Tensor& logits, const std::string& variant) {
  SoftmaxColsumCudaParams params{};
  params.logits = logits.data_ptr();
  params.batch = logits.size(0);
  params.num_classes = logits.size(1);
  params.logits_row_stride = logits.stride(0);
  params.dtype = kernel_dtype(logits.scalar_type());
  params.variant = variant.c_str();
  return params;
}

// out (+)= colsum(logits); `out` already checked (contiguous (C,), float32 / float64, same device).
void run_softmax_colsum(const at::Tensor& logits_in, const at::Tensor& out, bool accumulate,
                        const std::string& variant, int64_t ctas_per_sm) {
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "softmax_colsum: logits must be a CUDA tensor, got one on ",
                    device_str(logits_in.device()));
  TORCH_CHECK_VALUE(ctas_per_sm >= 0 && ctas_per_sm <= 64, "softmax_colsum_add_: ctas_per_sm must be in [0, 64], got ",
                    num_str(ctas_per_sm));
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  // Rows may be strided; columns must be unit-stride.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();

  SoftmaxColsumCudaParams params = describe(logits, variant);
  params.out = out.data_ptr();
  params.out_is_double = out.scalar_type() == at::kDouble;
  params.accumulate = accumulate;
  params.ctas_per_sm = static_cast<int>(ctas_per_sm);

  if (!variant.empty()) {
    SoftmaxColsumCudaParams by_default = params;
    by_default.variant = nullptr;
    TORCH_CHECK_VALUE(softmax_colsum_variant(params) == variant, "softmax_colsum_add_: variant '", variant,
                      "' is neither a row-kernel variant holding C = ", num_str(params.num_classes),
                      " columns of this dtype nor 'lse_then_tiles' (the default here is '",
                      softmax_colsum_variant(by_default), "')");
  }
  size_t bytes = 0;
  C10_CUDA_CHECK(softmax_colsum_workspace_bytes(params, &bytes));
  // From the caching allocator: no cudaMalloc and no sync on the hot path.
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte));
  params.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_softmax_colsum(params, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor softmax_colsum_cuda(const at::Tensor& logits) {
  check_softmax_colsum_args(logits);
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor colsum = at::empty({logits.size(1)}, logits.options().dtype(out_dtype));
  run_softmax_colsum(logits, colsum, /*accumulate=*/false, /*variant=*/"", /*ctas_per_sm=*/0);
  return colsum;
}

void softmax_colsum_add_cuda(const at::Tensor& logits, const at::Tensor& out, c10::string_view variant,
                             int64_t ctas_per_sm) {
  check_softmax_colsum_args(logits);
  check_colsum_out(logits, out);
  run_softmax_colsum(logits, out, /*accumulate=*/true, std::string(variant), ctas_per_sm);
}

std::string softmax_colsum_cuda_variant(const at::Tensor& logits, c10::string_view variant) {
  check_softmax_colsum_args(logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const std::string name(variant);
  return softmax_colsum_variant(describe(logits, name));
}

}  // namespace
}  // namespace gala::cuda

TORCH_LIBRARY_IMPL(gala, CUDA, m) {
  m.impl("softmax_colsum", &gala::cuda::softmax_colsum_cuda);
  m.impl("softmax_colsum_add_", &gala::cuda::softmax_colsum_add_cuda);
  m.impl("softmax_colsum_cuda_variant", &gala::cuda::softmax_colsum_cuda_variant);
}
