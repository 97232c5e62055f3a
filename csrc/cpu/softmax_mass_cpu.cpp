// CPU implementation of gala::softmax_colsum (the mass pass of post-hoc re-balancing):
// argument checks, allocation, and the dispatch to the kernel compiled for this machine's
// widest vector ISA.
//
//   softmax_colsum(logits (B, C)) -> colsum (C,),  colsum[j] = sum_i softmax(logits[i, :])[j]
//   float32 for float32 / bfloat16 / float16 logits, float64 for float64 logits.
//   softmax_colsum_add_(logits, out): out += colsum.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "../ops.h"
#include "softmax_mass_kernel.h"

namespace gala::cpu {
namespace {

using KernelFn = void (*)(const SoftmaxColsumParams&);

// at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, like PyTorch's own kernels.
KernelFn select_kernel() {
  static const KernelFn kernel = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef GALA_HAVE_AVX512
    if (capability == "AVX512") return &AVX512::softmax_colsum_kernel;
#endif
#ifdef GALA_HAVE_AVX2
    if (capability == "AVX512" || capability == "AVX2") return &AVX2::softmax_colsum_kernel;
#endif
    return &DEFAULT::softmax_colsum_kernel;
  }();
  return kernel;
}

at::Tensor softmax_colsum_cpu(const at::Tensor& logits_in) {
  check_softmax_colsum_args(logits_in);
  const auto dtype = logits_in.scalar_type();
  // Rows may be strided; columns must be unit-stride for the vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (B == 0) return at::zeros({C}, logits.options().dtype(out_dtype));

  at::Tensor colsum = at::empty({C}, logits.options().dtype(out_dtype));
  SoftmaxColsumParams params{};
  params.logits = logits.data_ptr();
  params.colsum = colsum.data_ptr();
  params.batch = B;
  params.num_classes = C;
  params.logits_row_stride = logits.stride(0);
  params.dtype = dtype;
  select_kernel()(params);
  return colsum;
}

// out += colsum (out float64 for the running mass of PredictionRebalancer, or float32).
void softmax_colsum_add_cpu(const at::Tensor& logits, const at::Tensor& out, c10::string_view /*variant*/,
                            int64_t /*ctas_per_sm*/) {
  check_softmax_colsum_args(logits);
  check_colsum_out(logits, out);
  out.add_(softmax_colsum_cpu(logits));
}

}  // namespace
}  // namespace gala::cpu

TORCH_LIBRARY_IMPL(gala, CPU, m) {
  m.impl("softmax_colsum", &gala::cpu::softmax_colsum_cpu);
  m.impl("softmax_colsum_add_", &gala::cpu::softmax_colsum_add_cpu);
}
