// fold_step_ and scale_grad_ (gala_step_kernel.cuh): the fold of a step's statistics that
// fused_ce_step_ left in the scratch, and the backward's in-place scaling of the gradient.
//
// fold_step_kernel      grid-stride over the 3C state elements and the C x C pairwise ones; the
//                       formulas are those of fold_common.cuh (the training step's last CTA
//                       uses the same functions):  s = 1 / max(N, 1), d = s * raw,
//                       cumulative: running += d, state += running; sum: state += d;
//                       ema: state = beta * state + (1 - beta) * d.
//                       Skipped (but the scratch still zeroed) when the step met a bad label.
// scale_grad_kernel     grad *= grad_output, 16-byte vectors; reads grad_output on the device
//                       and returns at once when it is 1 (no host synchronisation anywhere).

#include "gala_step_kernel.cuh"

#include "device_common.cuh"
#include "fold_common.cuh"
#include "vector_io.cuh"

#include <algorithm>
#include <cstdint>

namespace gala::cuda {
namespace {

// ------------------------------------------------------------------ fold_step_

constexpr int kFoldThreads = 256;

// Ordering: every CTA reads the three count slots at its start and zeroes only raw sums; the count
// slots are zeroed by the last CTA, after every CTA has taken its ticket (thread 0: barrier, fence,
// ticket; the fence is cumulative over the CTA's reads and writes ordered by the barrier), so no
// CTA can read a zeroed count. The last ticket's thread 0 fences again (acquire) before its reads.
__global__ void __launch_bounds__(kFoldThreads) fold_step_kernel(const FoldStepCudaParams p) {
  const int64_t C = p.num_classes;
  float* slots = p.scratch + 3 * C;
  const float rows = __ldcg(slots + kScratchRows);
  const bool fold = __ldcg(slots + kScratchBadLabels) == 0.0f;
  const float s = fold_scale(rows);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kFoldThreads + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kFoldThreads;

  if (fold) {
    fold_state_vectors(p.scratch, p.stats, p.running, C, s, p.accumulation, p.ema_beta, p.ema_keep, first, threads);
  } else {
    for (int64_t k = first; k < 3 * C; k += threads) p.scratch[k] = 0.0f;
  }
  if (p.raw_pairwise) {
    if (fold && p.pairwise) {
      fold_vector(p.raw_pairwise, p.pairwise, p.running_pairwise, C * C, s, p.accumulation, p.ema_beta,
                  p.ema_keep, first, threads);
    } else {
      for (int64_t k = first; k < C * C; k += threads) p.raw_pairwise[k] = 0.0f;
    }
  }

  __shared__ int is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // release
    auto* ticket = reinterpret_cast<unsigned int*>(slots + kScratchFoldTicket);
    is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last || threadIdx.x != 0) return;
  __threadfence();  // acquire
  if (fold) {
    *p.steps += 1;
    *p.nonfinite_rows += static_cast<int64_t>(__ldcg(slots + kScratchNonfinite));
  }
  for (int k = 0; k < kScratchSlots; ++k) slots[k] = 0.0f;  // the counts and the ticket itself
}

// ------------------------------------------------------------------ scale_grad_

constexpr int kScaleThreads = 256;

// grad *= g, with g = grad_output rounded to T (as grad * grad_output.to(grad.dtype)), in the
// math type; nothing to do when g is 1.
template <typename T, typename G>
__global__ void __launch_bounds__(kScaleThreads) scale_grad_kernel(T* grad, const G* grad_output, int64_t numel) {
  using A = typename MathType<T>::type;
  const A g = to_math(from_math<T>(to_math(*grad_output)));
  if (g == A(1)) return;
  constexpr int kVec = kVecBytes / sizeof(T);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kScaleThreads + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kScaleThreads;
  int64_t done = 0;  // elements handled by the vector loop
  if (reinterpret_cast<uintptr_t>(grad) % kVecBytes == 0) {
    const int64_t vectors = numel / kVec;
    uint4* vec = reinterpret_cast<uint4*>(grad);
    for (int64_t v = first; v < vectors; v += threads) {
      const uint4 raw = vec[v];
      A scaled[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) scaled[e] = static_cast<A>(unpack<T>(raw, e)) * g;
      vec[v] = pack<T, A, kVec>(scaled);
    }
    done = vectors * kVec;
  }
  for (int64_t k = done + first; k < numel; k += threads) grad[k] = from_math<T>(to_math(grad[k]) * g);
}

template <typename T>
const void* scale_kernel_for(DType grad_output_dtype) {
  switch (grad_output_dtype) {
    case DType::Float32: return reinterpret_cast<const void*>(&scale_grad_kernel<T, float>);
    case DType::Float64: return reinterpret_cast<const void*>(&scale_grad_kernel<T, double>);
    case DType::BFloat16: return reinterpret_cast<const void*>(&scale_grad_kernel<T, __nv_bfloat16>);
    case DType::Float16: return reinterpret_cast<const void*>(&scale_grad_kernel<T, __half>);
  }
  return nullptr;
}

const void* scale_kernel(const ScaleGradCudaParams& p) {
  switch (p.grad_dtype) {
    case DType::Float32: return scale_kernel_for<float>(p.grad_output_dtype);
    case DType::Float64: return scale_kernel_for<double>(p.grad_output_dtype);
    case DType::BFloat16: return scale_kernel_for<__nv_bfloat16>(p.grad_output_dtype);
    case DType::Float16: return scale_kernel_for<__half>(p.grad_output_dtype);
  }
  return nullptr;
}

int dtype_size(DType dtype) {
  return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2;
}

}  // namespace

cudaError_t launch_fold_step(const FoldStepCudaParams& params, cudaStream_t stream) {
  DeviceLimits limits;
  cudaError_t err = device_limits(&limits);
  if (err != cudaSuccess) return err;
  int64_t elems = 3 * params.num_classes;
  if (params.raw_pairwise) elems = std::max(elems, params.num_classes * params.num_classes);
  // about 4 elements per thread and sweep, at most 8 CTAs per SM (grid-stride beyond)
  const int64_t wanted = (elems + kFoldThreads * 4 - 1) / (kFoldThreads * 4);
  const int blocks = static_cast<int>(std::clamp<int64_t>(wanted, 1, 8 * static_cast<int64_t>(limits.sm_count)));
  fold_step_kernel<<<blocks, kFoldThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_scale_grad(const ScaleGradCudaParams& params, cudaStream_t stream) {
  if (params.numel <= 0) return cudaSuccess;
  DeviceLimits limits;
  cudaError_t err = device_limits(&limits);
  if (err != cudaSuccess) return err;
  const void* kernel = scale_kernel(params);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  const int64_t vec = kVecBytes / dtype_size(params.grad_dtype);
  const int64_t wanted = (params.numel / vec + kScaleThreads - 1) / kScaleThreads;
  const int blocks = static_cast<int>(std::clamp<int64_t>(wanted, 1, 8 * static_cast<int64_t>(limits.sm_count)));
  void* grad = params.grad;
  const void* grad_output = params.grad_output;
  int64_t numel = params.numel;
  void* args[] = {&grad, &grad_output, &numel};
  return cudaLaunchKernel(kernel, dim3(blocks), dim3(kScaleThreads), args, 0, stream);
}

}  // namespace gala::cuda
