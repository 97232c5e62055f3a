// 16-byte vectors of logits or gradients in registers (nvcc only), shared by the kernels of
// csrc/cuda: a uint4 holds kVecBytes / sizeof(T) elements, unpacked to the math type and packed
// back with register bit operations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace gala::cuda {

constexpr int kVecBytes = 16;  // one 128-bit load or store per vector

// A 16-byte vector of T as four 32-bit words; elements are read and written with register bit
// operations (reinterpreting a local uint4 through a T* would put it in local memory).
__device__ __forceinline__ uint32_t word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ auto unpack(const uint4& v, int e) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(word(v, e));
  } else if constexpr (std::is_same_v<T, double>) {
    return __hiloint2double(static_cast<int>(word(v, 2 * e + 1)), static_cast<int>(word(v, 2 * e)));
  } else {
    const auto bits = static_cast<unsigned short>(word(v, e / 2) >> (16 * (e % 2)));
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __bfloat162float(__ushort_as_bfloat16(bits));
    } else {
      return __half2float(__ushort_as_half(bits));
    }
  }
}

template <typename T, typename A, int kVec>
__device__ __forceinline__ uint4 pack(const A (&g)[kVec]) {
  uint32_t w[4];
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = __float_as_uint(g[e]);
  } else if constexpr (std::is_same_v<T, double>) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      w[2 * e] = static_cast<uint32_t>(__double2loint(g[e]));
      w[2 * e + 1] = static_cast<uint32_t>(__double2hiint(g[e]));
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint32_t lo, hi;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        lo = __bfloat16_as_ushort(__float2bfloat16_rn(g[2 * k]));
        hi = __bfloat16_as_ushort(__float2bfloat16_rn(g[2 * k + 1]));
      } else {
        lo = __half_as_ushort(__float2half_rn(g[2 * k]));
        hi = __half_as_ushort(__float2half_rn(g[2 * k + 1]));
      }
      w[k] = lo | (hi << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace gala::cuda
