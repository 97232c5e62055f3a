// Device helpers shared by the CUDA kernels of csrc/cuda (nvcc only: not for the torch bindings,
// which include the host-side *_kernel.cuh headers).
//
//   MathType / to_math / softmax_exp       math in fp32 (fp64 for double inputs)
//   SoftmaxPartial / merge / team_merge    online (max, sum of exp) pairs merged across a warp or
//                                          a CTA:  (m1, S1) + (m2, S2) = (m, S1 e^(m1-m) + S2 e^(m2-m))
//   warp_sum / team_sum                    plain sums across a warp or a CTA
//   device_limits                          SM count and opt-in shared memory, cached per device
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <type_traits>

namespace gala::cuda {

constexpr int kWarpSize = 32;

// ------------------------------------------------------------------ numeric helpers

template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }

template <typename T, typename A>
__device__ __forceinline__ T from_math(A x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

// exp for the softmax: ex2.approx for fp32 math (a few ulp, ample for probabilities), full
// accuracy for fp64 math.
__device__ __forceinline__ float softmax_exp(float x) { return __expf(x); }
__device__ __forceinline__ double softmax_exp(double x) { return exp(x); }

template <typename A>
__device__ __forceinline__ A negative_infinity() {
  if constexpr (std::is_same_v<A, double>) {
    return -CUDART_INF;
  } else {
    return -CUDART_INF_F;
  }
}

template <typename A>
__device__ __forceinline__ A quiet_nan() {
  if constexpr (std::is_same_v<A, double>) {
    return CUDART_NAN;
  } else {
    return CUDART_NAN_F;
  }
}

// ------------------------------------------------------------------ team reductions

// A partial softmax over some columns of a row: the max of a, the sum over j != y of
// exp(a[j] - max), and whether any a[j] was non-finite.
template <typename A>
struct SoftmaxPartial {
  A max;
  A sum_other;
  int nonfinite;
};

template <typename A>
__device__ __forceinline__ SoftmaxPartial<A> merge(const SoftmaxPartial<A>& x, const SoftmaxPartial<A>& y) {
  const A m = fmax(x.max, y.max);
  // A zero sum stays zero even when its max is -inf (exp(-inf - -inf) would be NaN).
  const A sx = x.sum_other == A(0) ? A(0) : x.sum_other * softmax_exp(x.max - m);
  const A sy = y.sum_other == A(0) ? A(0) : y.sum_other * softmax_exp(y.max - m);
  return {m, sx + sy, x.nonfinite | y.nonfinite};
}

template <typename A>
__device__ __forceinline__ SoftmaxPartial<A> warp_merge(SoftmaxPartial<A> v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const SoftmaxPartial<A> other{__shfl_xor_sync(0xffffffffu, v.max, offset),
                                  __shfl_xor_sync(0xffffffffu, v.sum_other, offset),
                                  __shfl_xor_sync(0xffffffffu, v.nonfinite, offset)};
    v = merge(v, other);
  }
  return v;
}

// Merge over a team of kTeamThreads (one warp, or the whole CTA). Every thread of the team gets
// the same result. A CTA team writes `scratch` (one slot per warp); the caller must put a
// __syncthreads() between two uses of the same scratch.
template <typename A, int kTeamThreads, int kBlockThreads>
__device__ __forceinline__ SoftmaxPartial<A> team_merge(SoftmaxPartial<A> v, SoftmaxPartial<A>* scratch) {
  v = warp_merge(v);
  if constexpr (kTeamThreads == kWarpSize) {
    return v;
  } else {
    static_assert(kTeamThreads == kBlockThreads, "a team is one warp or the whole CTA");
    constexpr int kWarps = kBlockThreads / kWarpSize;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    // Every warp merges the per-warp partials itself: no second barrier for a broadcast.
    const SoftmaxPartial<A> identity{negative_infinity<A>(), A(0), 0};
    return warp_merge(lane < kWarps ? scratch[lane] : identity);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a team of kTeamThreads (one warp, or the whole CTA); every thread of the team gets the
// same result. As team_merge: a CTA team writes `scratch` (one slot per warp), and the caller
// must put a __syncthreads() between two uses of the same scratch.
template <typename A, int kTeamThreads, int kBlockThreads>
__device__ __forceinline__ A team_sum(A v, A* scratch) {
  v = warp_sum(v);
  if constexpr (kTeamThreads == kWarpSize) {
    return v;
  } else {
    static_assert(kTeamThreads == kBlockThreads, "a team is one warp or the whole CTA");
    constexpr int kWarps = kBlockThreads / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    A total = A(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
    return total;
  }
}


// ------------------------------------------------------------------ device properties

constexpr int kMaxDevices = 64;  // device ordinals the cache below covers

struct DeviceLimits {
  int sm_count = 0;
  int max_smem_optin = 0;  // bytes of dynamic + static shared memory a CTA may opt in to
};

inline cudaError_t device_limits(DeviceLimits* out) {
  static DeviceLimits cache[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  DeviceLimits& limits = cache[device % kMaxDevices];
  if (limits.sm_count == 0) {
    err = cudaDeviceGetAttribute(&limits.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
  }
  *out = limits;
  return cudaSuccess;
}

}  // namespace gala::cuda
